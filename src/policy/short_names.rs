//! Which fully qualified references a name written without a registry host stands
//! for, as containers-registries.conf(5) says: an alias first; else each
//! `unqualified-search-registries` entry in order, unless `short-name-mode` is
//! `enforcing` and more than one is configured (a daemon has no terminal to ask on,
//! so that is an error naming the candidates); with neither, Docker Hub, as
//! Kubernetes documents.

use super::Policy;
use crate::reference::{Reference, ReferenceError, ShortName, DOCKER_HUB};
use std::path::PathBuf;

/// `short-name-mode`; unset or empty is permissive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShortNameMode {
    Enforcing,
    #[default]
    Permissive,
    Disabled,
}

/// How a name became its candidates (for logs and `explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The name was fully qualified.
    Qualified,
    /// `[aliases]` in this file.
    Alias { name: String, file: PathBuf },
    /// `unqualified-search-registries` from this file.
    Search { file: PathBuf },
    /// Nothing configured: Docker Hub.
    DockerHub,
}

impl std::fmt::Display for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resolution::Qualified => f.write_str("fully qualified"),
            Resolution::Alias { name, file } => {
                write!(f, "alias {name:?} in {}", file.display())
            }
            Resolution::Search { file } => {
                write!(f, "unqualified-search-registries in {}", file.display())
            }
            Resolution::DockerHub => f.write_str("short name, Docker Hub"),
        }
    }
}

/// The references to try for a name, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    pub references: Vec<Reference>,
    pub resolution: Resolution,
}

impl Candidates {
    /// The one candidate of a name with a registry host, which no policy file
    /// changes (so callers on hot paths need not look at the files); None for a
    /// short name.
    pub fn qualified(name: &str) -> Option<Result<Candidates, ShortNameError>> {
        ShortName::of(name).is_none().then(|| qualified(name))
    }
}

/// `name`, which has a registry host, as its one candidate.
fn qualified(name: &str) -> Result<Candidates, ShortNameError> {
    Ok(Candidates {
        references: vec![Reference::parse(name)?],
        resolution: Resolution::Qualified,
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShortNameError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(
        "short name {name:?} is ambiguous: short-name-mode is enforcing and {} lists \
         several unqualified-search-registries ({}); use a fully qualified name or add an alias",
        file.display(),
        candidates.join(", ")
    )]
    Ambiguous {
        name: String,
        candidates: Vec<String>,
        file: PathBuf,
    },
    #[error("short name {name:?}: unqualified-search-registries in {} is empty", file.display())]
    NoSearchRegistries { name: String, file: PathBuf },
}

impl Policy {
    /// The references `name` (as the user wrote it) stands for, in order, to pull.
    pub fn candidates(&self, name: &str) -> Result<Candidates, ShortNameError> {
        self.resolve(name, true)
    }

    /// The references `name` may be stored under, in order, to look up locally:
    /// enforcing mode's ambiguity does not matter when nothing is pulled.
    pub fn stored_candidates(&self, name: &str) -> Result<Candidates, ShortNameError> {
        self.resolve(name, false)
    }

    fn resolve(&self, name: &str, enforce: bool) -> Result<Candidates, ShortNameError> {
        let Some(short) = ShortName::of(name) else {
            return qualified(name);
        };
        if let Some((target, file)) = self.aliases.get(short.repository()) {
            return Ok(Candidates {
                references: vec![short.aliased_to(target)?],
                resolution: Resolution::Alias {
                    name: short.repository().to_string(),
                    file: file.clone(),
                },
            });
        }
        if self.search_from.as_os_str().is_empty() {
            return Ok(Candidates {
                references: vec![short.at(DOCKER_HUB)?],
                resolution: Resolution::DockerHub,
            });
        }
        let references = self
            .search
            .iter()
            .map(|registry| short.at(registry))
            .collect::<Result<Vec<_>, _>>()?;
        if references.is_empty() {
            return Err(ShortNameError::NoSearchRegistries {
                name: short.to_string(),
                file: self.search_from.clone(),
            });
        }
        if enforce && self.mode == ShortNameMode::Enforcing && references.len() > 1 {
            return Err(ShortNameError::Ambiguous {
                name: short.to_string(),
                candidates: references.iter().map(ToString::to_string).collect(),
                file: self.search_from.clone(),
            });
        }
        Ok(Candidates {
            references,
            resolution: Resolution::Search {
                file: self.search_from.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn names(p: &Policy, name: &str) -> Result<Vec<String>, ShortNameError> {
        Ok(p.candidates(name)?
            .references
            .iter()
            .map(ToString::to_string)
            .collect())
    }

    #[test]
    fn nothing_configured_means_docker_hub_as_kubernetes_documents() {
        let p = Policy::default();
        assert_eq!(
            names(&p, "busybox").unwrap(),
            ["docker.io/library/busybox:latest"]
        );
        assert_eq!(names(&p, "team/app:1").unwrap(), ["docker.io/team/app:1"]);
        assert_eq!(names(&p, "quay.io/a/b").unwrap(), ["quay.io/a/b:latest"]);
        assert_eq!(
            p.candidates("busybox").unwrap().resolution,
            Resolution::DockerHub
        );
    }

    #[test]
    fn search_registries_in_order_and_enforcing_refuses_ambiguity() {
        let text = r#"
unqualified-search-registries = ["registry.access.redhat.com", "docker.io"]
short-name-mode = "permissive"
"#;
        let p = Policy::parse(text, Path::new("/etc/containers/registries.conf")).unwrap();
        assert_eq!(
            names(&p, "ubi9:latest").unwrap(),
            [
                "registry.access.redhat.com/ubi9:latest",
                "docker.io/library/ubi9:latest"
            ]
        );
        let enforcing = text.replace("permissive", "enforcing");
        let p = Policy::parse(&enforcing, Path::new("/etc/containers/registries.conf")).unwrap();
        assert_eq!(p.stored_candidates("ubi9").unwrap().references.len(), 2);
        let e = p.candidates("ubi9").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous")
                && e.contains(
                    "registry.access.redhat.com/ubi9:latest, docker.io/library/ubi9:latest"
                )
                && e.contains("/etc/containers/registries.conf"),
            "{e}"
        );
        // One registry is no ambiguity, even when enforcing.
        let one =
            "unqualified-search-registries = [\"quay.io\"]\nshort-name-mode = \"enforcing\"\n";
        let p = Policy::parse(one, Path::new("r.conf")).unwrap();
        assert_eq!(names(&p, "app").unwrap(), ["quay.io/app:latest"]);
        // Empty list: nowhere to look.
        let none = "unqualified-search-registries = []\n";
        let p = Policy::parse(none, Path::new("r.conf")).unwrap();
        assert!(matches!(
            p.candidates("app"),
            Err(ShortNameError::NoSearchRegistries { .. })
        ));
    }

    #[test]
    fn aliases_win_over_search_and_keep_the_tag() {
        let text = r#"
unqualified-search-registries = ["quay.io", "docker.io"]
short-name-mode = "enforcing"
[aliases]
"fedora" = "registry.fedoraproject.org/fedora"
"opensuse/leap" = "registry.opensuse.org/opensuse/leap"
"#;
        let p = Policy::parse(text, Path::new("a.conf")).unwrap();
        assert_eq!(
            names(&p, "fedora:40").unwrap(),
            ["registry.fedoraproject.org/fedora:40"]
        );
        assert_eq!(
            names(&p, "opensuse/leap").unwrap(),
            ["registry.opensuse.org/opensuse/leap:latest"]
        );
        assert!(matches!(
            p.candidates("fedora").unwrap().resolution,
            Resolution::Alias { .. }
        ));
    }

    #[test]
    fn debians_shipped_shortnames_conf_loads_as_a_drop_in() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("registries.conf");
        std::fs::write(
            &main,
            "unqualified-search-registries = [\"docker.io\", \"quay.io\"]\n",
        )
        .unwrap();
        let d = dir.path().join("registries.conf.d");
        std::fs::create_dir(&d).unwrap();
        // The real-world file: containers/shortnames as Debian ships it.
        let shipped = "/etc/containers/registries.conf.d/shortnames.conf";
        let text = std::fs::read_to_string(shipped).unwrap_or_else(|e| {
            panic!("{shipped}: {e}; apt-get install golang-github-containers-common")
        });
        std::fs::write(d.join("000-shortnames.conf"), text).unwrap();
        // A later drop-in overrides the mode, removes an alias and adds another.
        std::fs::write(
            d.join("50-site.conf"),
            "short-name-mode = \"enforcing\"\n[aliases]\n\"centos\" = \"\"\n\"tool\" = \"registry.example.com/tools/tool\"\n",
        )
        .unwrap();
        std::fs::write(d.join("README"), "not a conf file").unwrap();
        let p = Policy::load(&main, Some(&d)).unwrap();
        assert_eq!(
            names(&p, "podman").unwrap(),
            ["quay.io/podman/stable:latest"]
        );
        assert_eq!(
            names(&p, "tool:2").unwrap(),
            ["registry.example.com/tools/tool:2"]
        );
        // centos's alias is gone, so enforcing mode with two registries refuses it.
        assert!(matches!(
            p.candidates("centos"),
            Err(ShortNameError::Ambiguous { .. })
        ));
        // A v1 drop-in is refused, naming the file.
        std::fs::write(
            d.join("90-old.conf"),
            "[registries.search]\nregistries = [\"x.io\"]\n",
        )
        .unwrap();
        let e = Policy::load(&main, Some(&d)).unwrap_err().to_string();
        assert!(e.contains("90-old.conf") && e.contains("v2"), "{e}");
    }

    #[test]
    fn debians_shipped_registries_conf_and_policy_json_load() {
        for shipped in [
            "/etc/containers/registries.conf",
            "/etc/containers/policy.json",
        ] {
            assert!(
                Path::new(shipped).is_file(),
                "{shipped} is missing; apt-get install golang-github-containers-common"
            );
        }
        let p = Policy::load(
            Path::new("/etc/containers/registries.conf"),
            Some(Path::new("/etc/containers/registries.conf.d")),
        )
        .unwrap();
        // Debian sets no search registries: short names stay Docker Hub's.
        assert!(p.candidates("busybox").is_ok());
        let trust =
            crate::trust_policy::TrustPolicy::load(Path::new("/etc/containers/policy.json"))
                .unwrap();
        assert!(trust.check(&Reference::parse("busybox").unwrap()).is_ok());
    }

    #[test]
    fn the_v1_format_is_read() {
        let text = r#"
[registries.search]
registries = ["quay.io", "docker.io"]
[registries.insecure]
registries = ["127.0.0.1:5000"]
[registries.block]
registries = ["untrusted.com"]
"#;
        let p = Policy::parse(text, Path::new("v1.conf")).unwrap();
        assert_eq!(
            names(&p, "app").unwrap(),
            ["quay.io/app:latest", "docker.io/library/app:latest"]
        );
        assert!(p.host_insecure("127.0.0.1:5000"));
        let blocked = p.sources(&Reference::parse("untrusted.com/x").unwrap());
        assert!(blocked.is_err());
        let mixed = format!("{text}\n[[registry]]\nlocation = \"a.io\"\n");
        let e = Policy::parse(&mixed, Path::new("v1.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mixes"), "{e}");
    }
}
