//! Where signatures are read from: containers-registries.d(5), the `*.yaml` files in
//! `/etc/containers/registries.d` that CRI-O, podman and skopeo read.
//!
//! Per namespace (the image reference, its repository, each namespace above it, the
//! host, `*.` wildcards) or `default-docker`: a `lookaside` URL (or the older
//! `sigstore`) under which GPG simple signatures live at
//! `<url>/<repository path>@sha256=<hex>/signature-<n>`, and
//! `use-sigstore-attachments` (or the older `use-cosign-attachments`), whether sigstore
//! signatures are read from the registry's `sha256-<hex>.sig` tag. Nothing configured
//! means the built-in lookaside `file:///var/lib/containers/sigstore` and no
//! attachments, as containers/image does for root. Two files configuring the same
//! namespace (or two `default-docker`) are an error, as there.

use crate::digest::Digest;
use crate::reference::Reference;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use url::Url;

/// containers/image's lookaside for root when none is configured.
pub const DEFAULT_LOOKASIDE: &str = "file:///var/lib/containers/sigstore";

#[derive(Debug, thiserror::Error)]
pub enum RegistriesDError {
    #[error("cannot read registries.d {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registries.d {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("registries.d: {what} is configured both in {first} and in {second}")]
    Duplicate {
        what: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("registries.d {path}: {namespace}: lookaside URL {url:?} is invalid: {why}")]
    Url {
        path: PathBuf,
        namespace: String,
        url: String,
        why: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    default_docker: Option<RawNamespace>,
    #[serde(default)]
    docker: HashMap<String, RawNamespace>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawNamespace {
    lookaside: Option<String>,
    sigstore: Option<String>,
    // Write-side settings, read so that files written for skopeo load here too.
    #[allow(dead_code)]
    lookaside_staging: Option<String>,
    #[allow(dead_code)]
    sigstore_staging: Option<String>,
    use_sigstore_attachments: Option<bool>,
    use_cosign_attachments: Option<bool>,
}

#[derive(Debug, Clone, Default)]
struct Namespace {
    lookaside: Option<Url>,
    attachments: Option<bool>,
    file: PathBuf,
}

/// The merged registries.d configuration.
#[derive(Debug, Clone, Default)]
pub struct RegistriesD {
    dir: PathBuf,
    default: Option<Namespace>,
    docker: HashMap<String, Namespace>,
}

/// Where to look for one image's signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureSources {
    /// The lookaside base for the repository (`<url>/<repository path>`).
    pub lookaside: Url,
    /// Whether sigstore attachments are read from the registry.
    pub attachments: bool,
    /// Which part of registries.d decided (for explain and errors).
    pub configured_by: String,
}

impl SignatureSources {
    /// The URL of signature number `n` (from 1) of the manifest `digest`.
    pub fn signature_url(&self, digest: &Digest, n: usize) -> Url {
        let mut url = self.lookaside.clone();
        let path = format!(
            "{}@{}={}/signature-{n}",
            url.path().trim_end_matches('/'),
            digest.algorithm(),
            digest.hex()
        );
        url.set_path(&path);
        url
    }
}

impl RegistriesD {
    /// Loads every `*.yaml` in `dir`; a missing directory configures nothing.
    pub fn load(dir: &Path) -> Result<RegistriesD, RegistriesDError> {
        let mut merged = RegistriesD {
            dir: dir.to_path_buf(),
            ..RegistriesD::default()
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(merged),
            Err(source) => {
                return Err(RegistriesDError::Read {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read(&path).map_err(|source| RegistriesDError::Read {
                path: path.clone(),
                source,
            })?;
            // An empty file is an empty mapping.
            let file: File = if text.iter().all(u8::is_ascii_whitespace) {
                File::default()
            } else {
                serde_yaml_ng::from_slice(&text).map_err(|source| RegistriesDError::Parse {
                    path: path.clone(),
                    source,
                })?
            };
            if let Some(raw) = file.default_docker {
                let ns = namespace(&path, "default-docker", raw)?;
                if let Some(first) = &merged.default {
                    return Err(RegistriesDError::Duplicate {
                        what: "default-docker".into(),
                        first: first.file.clone(),
                        second: path,
                    });
                }
                merged.default = Some(ns);
            }
            for (name, raw) in file.docker {
                let ns = namespace(&path, &name, raw)?;
                if let Some(first) = merged.docker.get(&name) {
                    return Err(RegistriesDError::Duplicate {
                        what: format!("docker namespace {name:?}"),
                        first: first.file.clone(),
                        second: path,
                    });
                }
                merged.docker.insert(name, ns);
            }
        }
        Ok(merged)
    }

    /// Where the signatures of `reference` are read from. As in containers/image, the
    /// lookaside and the attachment switch are each taken from the most specific
    /// namespace that sets them, then `default-docker`.
    pub fn sources_for(&self, reference: &Reference) -> SignatureSources {
        let scopes = crate::trust_policy::scopes(reference);
        let chain = || {
            scopes
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| {
                    self.docker
                        .get(s)
                        .map(|ns| (format!("namespace {s:?}"), ns))
                })
                .chain(
                    self.default
                        .iter()
                        .map(|ns| ("default-docker".to_string(), ns)),
                )
        };
        let lookaside = chain().find_map(|(by, ns)| ns.lookaside.clone().map(|u| (by, u)));
        let attachments = chain().find_map(|(_, ns)| ns.attachments).unwrap_or(false);
        let (by, mut url) = lookaside.unwrap_or_else(|| {
            (
                "the built-in default".to_string(),
                Url::parse(DEFAULT_LOOKASIDE).expect("a valid constant URL"),
            )
        });
        let path = format!("{}/{}", url.path().trim_end_matches('/'), reference.path());
        url.set_path(&path);
        SignatureSources {
            lookaside: url,
            attachments,
            configured_by: if self.dir.as_os_str().is_empty() {
                by
            } else {
                format!("{by} in {}", self.dir.display())
            },
        }
    }
}

fn namespace(path: &Path, name: &str, raw: RawNamespace) -> Result<Namespace, RegistriesDError> {
    let lookaside = match raw.lookaside.or(raw.sigstore) {
        Some(text) => {
            let url = Url::parse(&text).map_err(|e| RegistriesDError::Url {
                path: path.to_path_buf(),
                namespace: name.to_string(),
                url: text.clone(),
                why: e.to_string(),
            })?;
            if !matches!(url.scheme(), "http" | "https" | "file") {
                return Err(RegistriesDError::Url {
                    path: path.to_path_buf(),
                    namespace: name.to_string(),
                    url: text,
                    why: "only http, https and file URLs are read".into(),
                });
            }
            Some(url)
        }
        None => None,
    };
    Ok(Namespace {
        lookaside,
        attachments: raw.use_sigstore_attachments.or(raw.use_cosign_attachments),
        file: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn most_specific_namespace_then_default() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "default.yaml",
            "default-docker:\n  lookaside: https://sigs.example.com/base/\n  lookaside-staging: file:///tmp/x\n",
        );
        write(
            dir.path(),
            "quay.yaml",
            "docker:\n  quay.io/team:\n    sigstore: http://team-sigs:8080\n    use-sigstore-attachments: true\n  quay.io:\n    use-cosign-attachments: false\n",
        );
        write(dir.path(), "notes.txt", "not: [yaml");
        write(dir.path(), "empty.yaml", "");
        let d = RegistriesD::load(dir.path()).unwrap();
        let team = d.sources_for(&Reference::parse("quay.io/team/app:1").unwrap());
        assert_eq!(team.lookaside.as_str(), "http://team-sigs:8080/team/app");
        assert!(team.attachments);
        let other = d.sources_for(&Reference::parse("quay.io/other/app:1").unwrap());
        assert_eq!(
            other.lookaside.as_str(),
            "https://sigs.example.com/base/other/app"
        );
        assert!(!other.attachments);
        let digest: Digest =
            "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"
                .parse()
                .unwrap();
        assert_eq!(
            other.signature_url(&digest, 2).as_str(),
            "https://sigs.example.com/base/other/app@sha256=634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00/signature-2"
        );
        let none = RegistriesD::load(&dir.path().join("missing")).unwrap();
        let hub = none.sources_for(&Reference::parse("busybox").unwrap());
        assert_eq!(
            hub.lookaside.as_str(),
            "file:///var/lib/containers/sigstore/library/busybox"
        );
        assert!(!hub.attachments);
    }

    #[test]
    fn duplicates_and_bad_urls_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            "docker:\n  quay.io:\n    lookaside: https://a\n",
        );
        write(
            dir.path(),
            "b.yaml",
            "docker:\n  quay.io:\n    lookaside: https://b\n",
        );
        let err = RegistriesD::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("\"quay.io\"") && err.contains("a.yaml") && err.contains("b.yaml"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            "default-docker:\n  lookaside: ftp://x/\n",
        );
        let err = RegistriesD::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ftp://x/"), "{err}");
        write(dir.path(), "a.yaml", "default-docker: [1\n");
        assert!(matches!(
            RegistriesD::load(dir.path()),
            Err(RegistriesDError::Parse { .. })
        ));
    }
}
