//! Registry policy from containers-registries.conf(5) v2: which host serves a
//! reference and whether it may be reached insecurely.
//!
//! Read today: `[[registry]]` `prefix`, `location` and `insecure`. The rest of the
//! format (mirrors, blocked, short names) is accepted and not yet acted on.

use crate::reference::{Reference, DOCKER_HUB, DOCKER_HUB_REGISTRY};
use crate::registry::Endpoint;
use serde::Deserialize;
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
}

#[derive(Debug, Deserialize, Default)]
struct File {
    #[serde(default)]
    registry: Vec<RegistryEntry>,
}

#[derive(Debug, Deserialize, Clone, Default)]
struct RegistryEntry {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    insecure: bool,
}

/// One `[[registry]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// `host[:port][/path]`, or `*.domain` for a wildcard.
    prefix: String,
    /// Where matching references are pulled from (the prefix is replaced by it).
    location: String,
    insecure: bool,
}

/// Where to pull one reference from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The reference at that location (domain and path rewritten by `location`).
    pub reference: Reference,
    pub endpoint: Endpoint,
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Loads `path`; a missing file is an empty policy.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policy::default()),
            Err(source) => Err(PolicyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let file: File = toml::from_str(text).map_err(|source| PolicyError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let mut rules = Vec::new();
        for (index, entry) in file.registry.into_iter().enumerate() {
            let invalid = |why: &str| PolicyError::Invalid {
                path: path.to_path_buf(),
                index,
                why: why.to_string(),
            };
            let location = entry.location.clone().unwrap_or_default();
            let prefix = entry.prefix.clone().unwrap_or_else(|| location.clone());
            if prefix.is_empty() {
                return Err(invalid("needs a prefix or a location"));
            }
            if prefix.starts_with("*.") && !location.is_empty() {
                return Err(invalid("a wildcard prefix cannot have a location"));
            }
            if !location.is_empty() && !is_registry_location(&normalize_hub(&location)) {
                return Err(invalid(
                    "location is not a registry host[:port] optionally followed by /path",
                ));
            }
            rules.push(Rule {
                prefix: normalize_hub(&prefix),
                location: normalize_hub(if location.is_empty() {
                    &prefix
                } else {
                    &location
                }),
                insecure: entry.insecure,
            });
        }
        Ok(Policy { rules })
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

    /// The sources to try for `reference`, in order.
    pub fn sources(&self, reference: &Reference) -> Vec<Source> {
        let name = reference.name();
        let (reference, insecure) = match self.rule_for(&name) {
            Some(rule) if !rule.prefix.starts_with("*.") && rule.location != rule.prefix => {
                let rewritten = format!("{}{}", rule.location, &name[rule.prefix.len()..]);
                match Reference::parse(&format!("{rewritten}:latest")) {
                    Ok(r) => (reference.with_location(r.domain(), r.path()), rule.insecure),
                    // A valid location can still make a name too long: pull from the
                    // original, and never with the rule's insecure flag, which was
                    // meant for the location.
                    Err(e) => {
                        tracing::warn!(image = %reference, location = %rule.location, error = %e, "cannot rewrite the image to its registries.conf location; pulling from the original");
                        (reference.clone(), false)
                    }
                }
            }
            Some(rule) => (reference.clone(), rule.insecure),
            None => (reference.clone(), false),
        };
        // The host may itself be insecure under another rule (`location` of one entry is
        // the `prefix` of another only by convention), so ask again for the final host.
        let insecure = insecure || self.host_insecure(reference.domain());
        vec![Source {
            endpoint: Endpoint {
                host: reference.registry_host().to_string(),
                insecure,
            },
            reference,
        }]
    }

    /// Whether `host` (`host[:port]`) is configured insecure.
    pub fn host_insecure(&self, host: &str) -> bool {
        self.rule_for(host).is_some_and(|r| r.insecure)
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
        p.sources(&Reference::parse(image).unwrap()).remove(0)
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
        assert!(Policy::load(Path::new("/nonexistent/registries.conf")).is_ok());
    }
}
