//! Registry policy from containers-registries.conf(5) and its `.d` drop-ins: which
//! references a name written by the user stands for (aliases, unqualified-search
//! registries, short-name-mode), which sources serve a reference, in order (mirrors,
//! then the origin unless it is blocked), and whether each may be reached insecurely.
//!
//! - [`file`]: one file (v2, or the v1 tables) read into a layer.
//! - [`short_names`]: candidates for a name without a registry host.

mod file;
pub mod short_names;

use crate::reference::{Reference, DOCKER_HUB, DOCKER_HUB_REGISTRY};
use crate::registry::Endpoint;
pub use short_names::{Candidates, ShortNameError, ShortNameMode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read registries.conf {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registries.conf {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("registries.conf {path}: [[registry]] entry {index}: {why}")]
    Invalid {
        path: PathBuf,
        index: usize,
        why: String,
    },
    #[error("registries.conf {path}: {why}")]
    InvalidFile { path: PathBuf, why: String },
}

/// A reference that no source may serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub image: String,
    pub path: PathBuf,
    pub prefix: String,
    /// Mirrors configured but not used for this kind of reference.
    pub mirrors_skipped: usize,
    pub by_digest: bool,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is blocked: registries.conf {} blocks prefix {:?}",
            self.image,
            self.path.display(),
            self.prefix
        )?;
        if self.mirrors_skipped > 0 {
            let kind = if self.by_digest {
                "pull by digest"
            } else {
                "pull by tag"
            };
            write!(
                f,
                " and none of its {} mirrors serves a {kind}",
                self.mirrors_skipped
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Blocked {}

/// One `[[registry]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// `host[:port][/path]`, or `*.domain` for a wildcard.
    prefix: String,
    /// Where matching references are pulled from (the prefix is replaced by it).
    location: String,
    insecure: bool,
    /// The origin is never contacted (OpenShift's NeverContactSource); mirrors are.
    blocked: bool,
    mirrors: Vec<Mirror>,
    /// The file the rule came from, for messages.
    path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Mirror {
    /// Replaces the rule's prefix, as `location` does.
    location: String,
    insecure: bool,
    serves: MirrorUse,
}

/// Which references a mirror serves (`pull-from-mirror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MirrorUse {
    All,
    DigestOnly,
    TagOnly,
}

impl MirrorUse {
    fn serves(self, by_digest: bool) -> bool {
        match self {
            MirrorUse::All => true,
            MirrorUse::DigestOnly => by_digest,
            MirrorUse::TagOnly => !by_digest,
        }
    }
}

/// Whether a source is a mirror or the reference's own registry (or its `location`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Mirror,
    Origin,
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKind::Mirror => "mirror",
            SourceKind::Origin => "origin",
        })
    }
}

/// Where to pull one reference from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The reference at that location (domain and path rewritten by `location`).
    pub reference: Reference,
    pub endpoint: Endpoint,
    pub kind: SourceKind,
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    /// `unqualified-search-registries`, and the file that set it.
    search: Vec<String>,
    search_from: PathBuf,
    mode: ShortNameMode,
    /// Short name → (fully qualified repository, the file that set it).
    aliases: BTreeMap<String, (String, PathBuf)>,
}

impl Policy {
    /// Loads `path`, then every `*.conf` in `dir` in name order (containers-
    /// registries.conf.d(5)); a missing file or directory adds nothing.
    pub fn load(path: &Path, dir: Option<&Path>) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        if let Some(text) = read_optional(path)? {
            policy.add(file::parse(&text, path)?);
        }
        let Some(dir) = dir else {
            return Ok(policy);
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(policy),
            Err(source) => {
                return Err(PolicyError::Read {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let mut drop_ins: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conf") && p.is_file())
            .collect();
        drop_ins.sort();
        for path in drop_ins {
            if let Some(text) = read_optional(&path)? {
                let layer = file::parse(&text, &path)?;
                if layer.v1 {
                    return Err(PolicyError::InvalidFile {
                        path,
                        why: "drop-in files must use the v2 format".into(),
                    });
                }
                policy.add(layer);
            }
        }
        Ok(policy)
    }

    /// One registries.conf file on its own (no `.d` directory).
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        policy.add(file::parse(text, path)?);
        Ok(policy)
    }

    /// Lays `layer` over what earlier files said: a `[[registry]]` with a known
    /// prefix replaces the earlier one, search registries and the mode are replaced
    /// when set, aliases merge (an empty value removes one).
    fn add(&mut self, layer: file::Layer) {
        for rule in layer.rules {
            match self.rules.iter_mut().find(|r| r.prefix == rule.prefix) {
                Some(earlier) => *earlier = rule,
                None => self.rules.push(rule),
            }
        }
        if let Some(search) = layer.search {
            self.search = search.iter().map(|s| normalize_hub(s)).collect();
            self.search_from = layer.path.clone();
        }
        if let Some(mode) = layer.mode {
            self.mode = mode;
        }
        for (short, target) in layer.aliases {
            if target.is_empty() {
                self.aliases.remove(&short);
            } else {
                self.aliases.insert(short, (target, layer.path.clone()));
            }
        }
    }

    /// The rule whose prefix matches `name` (`domain/path`) most specifically.
    fn rule_for(&self, name: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| prefix_matches(&r.prefix, name))
            .max_by_key(|r| {
                if r.prefix.starts_with("*.") {
                    0
                } else {
                    r.prefix.len() + 1
                }
            })
    }

    /// The sources to try for `reference`, in order: the rule's mirrors that serve
    /// this kind of reference (by digest or by tag), then the origin unless blocked.
    pub fn sources(&self, reference: &Reference) -> Result<Vec<Source>, Blocked> {
        let name = reference.name();
        let Some(rule) = self.rule_for(&name) else {
            return Ok(vec![self.source_at(
                reference.clone(),
                false,
                SourceKind::Origin,
            )]);
        };
        let by_digest = reference.digest().is_some();
        let mut sources: Vec<Source> = rule
            .mirrors
            .iter()
            .filter(|m| m.serves.serves(by_digest))
            .filter_map(|m| {
                let at = self.relocated(reference, &name, &rule.prefix, &m.location)?;
                Some(self.source_at(at, m.insecure, SourceKind::Mirror))
            })
            .collect();
        if !rule.blocked {
            let origin = if rule.prefix.starts_with("*.") || rule.location == rule.prefix {
                Some(reference.clone())
            } else {
                self.relocated(reference, &name, &rule.prefix, &rule.location)
            };
            match origin {
                Some(at) => sources.push(self.source_at(at, rule.insecure, SourceKind::Origin)),
                // A valid location can still make a name too long: pull from the
                // original, and never with the rule's insecure flag, which was meant
                // for the location.
                None => sources.push(self.source_at(reference.clone(), false, SourceKind::Origin)),
            }
        }
        if sources.is_empty() {
            return Err(Blocked {
                image: reference.to_string(),
                path: rule.path.clone(),
                prefix: rule.prefix.clone(),
                mirrors_skipped: rule.mirrors.len(),
                by_digest,
            });
        }
        Ok(sources)
    }

    /// `reference` with `prefix` (which its `name` starts with) replaced by `location`.
    fn relocated(
        &self,
        reference: &Reference,
        name: &str,
        prefix: &str,
        location: &str,
    ) -> Option<Reference> {
        let rewritten = format!("{location}{}", &name[prefix.len()..]);
        match Reference::parse(&format!("{rewritten}:latest")) {
            Ok(r) => Some(reference.with_location(r.domain(), r.path())),
            Err(e) => {
                tracing::warn!(image = %reference, %location, error = %e, "cannot rewrite the image to a registries.conf location");
                None
            }
        }
    }

    /// A source for `reference`. The host may itself be insecure under another rule
    /// (`location` of one entry is the `prefix` of another only by convention), so
    /// the final host is asked too.
    fn source_at(&self, reference: Reference, insecure: bool, kind: SourceKind) -> Source {
        let insecure = insecure || self.host_insecure(reference.domain());
        Source {
            endpoint: Endpoint {
                host: reference.registry_host().to_string(),
                insecure,
            },
            reference,
            kind,
        }
    }

    /// Whether `host` (`host[:port]`) is configured insecure.
    pub fn host_insecure(&self, host: &str) -> bool {
        self.rule_for(host).is_some_and(|r| r.insecure)
    }
}

/// The text of `path`, or None when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, PolicyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PolicyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Whether `location` is `host[:port][/path]` with a real registry host first (a
/// name without '.' or ':' would be read as a Docker Hub repository).
fn is_registry_location(location: &str) -> bool {
    match Reference::parse(&format!("{location}/x")) {
        Ok(r) => location.split('/').next() == Some(r.domain()),
        Err(_) => false,
    }
}

/// containers-registries.conf prefix semantics: the prefix equals the name, or is
/// followed in it by '/'; `*.example.com` matches any subdomain of example.com.
fn prefix_matches(prefix: &str, name: &str) -> bool {
    if let Some(domain) = prefix.strip_prefix("*.") {
        let host = name.split('/').next().unwrap_or(name);
        return host.ends_with(&format!(".{domain}"));
    }
    name == prefix || (name.starts_with(prefix) && name.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn normalize_hub(s: &str) -> String {
    for alias in ["index.docker.io", DOCKER_HUB_REGISTRY] {
        if let Some(rest) = s.strip_prefix(alias) {
            if rest.is_empty() || rest.starts_with('/') {
                return format!("{DOCKER_HUB}{rest}");
            }
        }
    }
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Fuzzing on the stable toolchain (more cases by hand: PROPTEST_CASES).
        #[test]
        fn any_registries_conf_loads_or_errors_without_panicking(
            prefix in r"[a-z0-9.*:/-]{0,30}|\PC{0,20}",
            location in r"[a-z0-9.:/-]{0,30}|\PC{0,20}",
            insecure in proptest::bool::ANY,
            text in r"\PC{0,200}",
        ) {
            let conf = format!("[[registry]]\nprefix = {prefix:?}\nlocation = {location:?}\ninsecure = {insecure}\n");
            let _ = Policy::parse(&conf, Path::new("registries.conf"));
            let _ = Policy::parse(&text, Path::new("registries.conf"));
        }
    }

    fn policy(text: &str) -> Policy {
        Policy::parse(text, Path::new("registries.conf")).unwrap()
    }

    fn source(p: &Policy, image: &str) -> Source {
        p.sources(&Reference::parse(image).unwrap())
            .unwrap()
            .remove(0)
    }

    const D: &str = "sha256:5cf0e4f0d3c5e1b8a5d9e6f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

    /// (kind, reference) of every source, in order.
    fn plan(p: &Policy, image: &str) -> Result<Vec<(SourceKind, String)>, Blocked> {
        Ok(p.sources(&Reference::parse(image).unwrap())?
            .into_iter()
            .map(|s| (s.kind, s.reference.to_string()))
            .collect())
    }

    fn mirror(r: &str) -> (SourceKind, String) {
        (SourceKind::Mirror, r.to_string())
    }

    fn origin(r: &str) -> (SourceKind, String) {
        (SourceKind::Origin, r.to_string())
    }

    #[test]
    fn seed_004_mirror_sets_by_digest_and_by_tag() {
        let p = Policy::parse(
            include_str!("../../tests/fixtures/registries/seed004-9.2.3-mirrors.conf"),
            Path::new("registries.conf"),
        )
        .unwrap();
        let ubi = "registry.access.redhat.com/ubi9/ubi-minimal";
        // By digest: the two digest-only mirrors; the source is never contacted.
        assert_eq!(
            plan(&p, &format!("{ubi}@{D}")).unwrap(),
            [
                mirror(&format!("example.io/example/ubi-minimal@{D}")),
                mirror(&format!("example.com/example/ubi-minimal@{D}")),
            ]
        );
        // By tag: only the tag-only mirror.
        assert_eq!(
            plan(&p, &format!("{ubi}:latest")).unwrap(),
            [mirror("example.io/example/ubi-minimal-tag:latest")]
        );
        // Longest prefix wins, the rest of the path is kept, and a digest-only mirror
        // is skipped for a tag.
        assert_eq!(
            plan(&p, &format!("registry.example.com/example/myimage@{D}")).unwrap(),
            [
                mirror(&format!("mirror.example.net/image@{D}")),
                origin(&format!("registry.example.com/example/myimage@{D}")),
            ]
        );
        assert_eq!(
            plan(&p, &format!("registry.example.com/example/other@{D}")).unwrap(),
            [
                mirror(&format!("mirror.example.net/other@{D}")),
                origin(&format!("registry.example.com/example/other@{D}")),
            ]
        );
        assert_eq!(
            plan(&p, &format!("registry.example.com/team/app@{D}")).unwrap(),
            [
                mirror(&format!(
                    "mirror.example.net/registry-example-com/team/app@{D}"
                )),
                mirror(&format!("mirror.example.com/team/app@{D}")),
                origin(&format!("registry.example.com/team/app@{D}")),
            ]
        );
        assert_eq!(
            plan(&p, "registry.example.com/team/app:1").unwrap(),
            [origin("registry.example.com/team/app:1")]
        );
    }

    #[test]
    fn seed_004_blocked_registries() {
        let p = Policy::parse(
            include_str!("../../tests/fixtures/registries/seed004-9.2.2-blocked.conf"),
            Path::new("/etc/containers/registries.conf"),
        )
        .unwrap();
        let e = plan(&p, "untrusted.com/app:1").unwrap_err().to_string();
        assert!(e.contains("untrusted.com/app:1 is blocked"), "{e}");
        assert!(e.contains("/etc/containers/registries.conf"), "{e}");
        let payload = "quay.io/openshift-payload/release";
        assert_eq!(
            plan(&p, &format!("{payload}@{D}")).unwrap(),
            [mirror(&format!(
                "internal-mirror.io/openshift-payload/release@{D}"
            ))]
        );
        let e = plan(&p, &format!("{payload}:4.17"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("none of its 1 mirrors serves a pull by tag"),
            "{e}"
        );
        assert_eq!(
            plan(&p, "quay.io/other:1").unwrap(),
            [origin("quay.io/other:1")]
        );
    }

    #[test]
    fn mirrors_come_first_in_order_each_with_its_own_insecure_flag() {
        let p = policy(
            r#"
[[registry]]
prefix = "docker.io/library"
location = "127.0.0.1:6000/hub"

[[registry.mirror]]
location = "127.0.0.1:5001/cache"
insecure = true

[[registry.mirror]]
location = "mirror.example"
"#,
        );
        let sources = p.sources(&Reference::parse("busybox:1").unwrap()).unwrap();
        let got: Vec<(String, bool, SourceKind)> = sources
            .iter()
            .map(|s| (s.reference.to_string(), s.endpoint.insecure, s.kind))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "127.0.0.1:5001/cache/busybox:1".into(),
                    true,
                    SourceKind::Mirror
                ),
                ("mirror.example/busybox:1".into(), false, SourceKind::Mirror),
                (
                    "127.0.0.1:6000/hub/busybox:1".into(),
                    false,
                    SourceKind::Origin
                ),
            ]
        );
    }

    #[test]
    fn bad_mirror_settings_name_the_entry_and_mirror() {
        for (text, wants) in [
            (
                "[[registry]]\nlocation = \"a.io\"\n[[registry.mirror]]\nlocation = \"m.io\"\npull-from-mirror = \"sometimes\"\n",
                "mirror 0: pull-from-mirror \"sometimes\"",
            ),
            (
                "[[registry]]\nlocation = \"a.io\"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = \"m.io\"\npull-from-mirror = \"tag-only\"\n",
                "cannot be combined with mirror-by-digest-only",
            ),
            (
                "[[registry]]\nlocation = \"a.io\"\n[[registry.mirror]]\nlocation = \"not a host\"\n",
                "mirror 0: location",
            ),
            (
                "[[registry]]\nprefix = \"a.io\"\nlocation = \"b.io\"\n[[registry]]\nprefix = \"a.io\"\nlocation = \"c.io\"\n",
                "appears again with another location",
            ),
        ] {
            let e = Policy::parse(text, Path::new("r.conf")).unwrap_err().to_string();
            assert!(e.contains(wants), "{text}: {e}");
        }
    }

    #[test]
    fn no_rules_means_secure_and_unchanged() {
        let s = source(&Policy::default(), "busybox");
        assert_eq!(s.endpoint.host, "registry-1.docker.io");
        assert!(!s.endpoint.insecure);
        assert_eq!(s.reference.to_string(), "docker.io/library/busybox:latest");
    }

    #[test]
    fn insecure_by_location_and_prefix() {
        let p = policy(
            r#"
unqualified-search-registries = ["docker.io"]
[[registry]]
location = "127.0.0.1:5000"
insecure = true

[[registry]]
prefix = "*.corp.example"
insecure = true
blocked = false
"#,
        );
        assert!(source(&p, "127.0.0.1:5000/app:1").endpoint.insecure);
        assert!(!source(&p, "127.0.0.1:5001/app:1").endpoint.insecure);
        assert!(source(&p, "reg.corp.example/a/b").endpoint.insecure);
        assert!(!source(&p, "corp.example/a").endpoint.insecure);
        assert!(!source(&p, "quay.io/a").endpoint.insecure);
    }

    #[test]
    fn location_rewrites_the_prefix() {
        let p = policy(
            r#"
[[registry]]
prefix = "example.com/foo"
location = "127.0.0.1:5000/bar"
insecure = true
"#,
        );
        let s = source(&p, "example.com/foo/app:2");
        assert_eq!(s.reference.to_string(), "127.0.0.1:5000/bar/app:2");
        assert_eq!(s.endpoint.host, "127.0.0.1:5000");
        assert!(s.endpoint.insecure);
        // Prefix matches only at a path boundary.
        let s = source(&p, "example.com/foobar/app");
        assert_eq!(s.reference.to_string(), "example.com/foobar/app:latest");
    }

    #[test]
    fn bad_files_name_the_problem() {
        let e = Policy::parse("[[registry]]\ninsecure = true\n", Path::new("/x/r.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/r.conf") && e.contains("entry 0"), "{e}");
        for bad in ["quay io", "myregistry/path", "host:port/x", "r.io//x"] {
            let text = format!("[[registry]]\nprefix = \"example.com\"\nlocation = \"{bad}\"\n");
            let e = Policy::parse(&text, Path::new("/x/r.conf"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("location"), "{bad}: {e}");
        }
        let e = Policy::parse("[[registry]\n", Path::new("/x/r.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/r.conf"), "{e}");
        assert!(Policy::load(
            Path::new("/nonexistent/registries.conf"),
            Some(Path::new("/nonexistent/d"))
        )
        .is_ok());
    }
}
