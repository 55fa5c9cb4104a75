//! Which images may be pulled at all: containers-policy.json(5), as CRI-O and podman
//! read it from `/etc/containers/policy.json`.
//!
//! Read: `default` and `transports.docker` scopes (a reference with tag or digest, a
//! repository, each namespace above it, `host[:port]`, `*.domain` wildcards, and `""`
//! for the whole transport), most specific first. Requirements: `insecureAcceptAnything`
//! and `reject`. `signedBy` and `sigstoreSigned` need signature verification, which
//! is not here yet: they refuse the image (fail closed), never accept it unchecked.

use crate::reference::Reference;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrustPolicyError {
    #[error("cannot read policy.json {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy.json {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_path_to_error::Error<serde_json::Error>,
    },
    #[error("policy.json {path}: {scope}: {why}")]
    Invalid {
        path: PathBuf,
        scope: String,
        why: String,
    },
}

#[derive(Debug, Deserialize)]
struct File {
    default: Option<Vec<RawRequirement>>,
    #[serde(default)]
    transports: HashMap<String, HashMap<String, Vec<RawRequirement>>>,
}

#[derive(Debug, Deserialize)]
struct RawRequirement {
    #[serde(rename = "type")]
    kind: String,
}

/// One policy requirement, as far as this module judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    InsecureAcceptAnything,
    Reject,
    /// `signedBy` (GPG simple signing) or `sigstoreSigned`: refused until verified.
    Signature(&'static str),
}

/// Why an image was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub image: String,
    pub path: PathBuf,
    /// The scope whose requirements applied (`default` for the global default).
    pub scope: String,
    pub requirement: Requirement,
}

impl Refusal {
    /// Whether the refusal is about signatures (kubelet's SignatureValidationFailed).
    pub fn is_signature(&self) -> bool {
        matches!(self.requirement, Requirement::Signature(_))
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = if self.scope == "default" {
            "the default".to_string()
        } else {
            format!("scope {:?}", self.scope)
        };
        match self.requirement {
            Requirement::Reject => write!(
                f,
                "{} is rejected by {scope} in policy.json {}",
                self.image,
                self.path.display()
            ),
            Requirement::Signature(kind) => write!(
                f,
                "{} needs a {kind} signature by {scope} in policy.json {}, and cri-imaged \
                 does not verify signatures yet: refused rather than accepted unverified",
                self.image,
                self.path.display()
            ),
            Requirement::InsecureAcceptAnything => {
                write!(f, "{} is accepted by {scope}", self.image)
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// A loaded policy.json.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    path: PathBuf,
    default: Vec<Requirement>,
    docker: HashMap<String, Vec<Requirement>>,
}

impl TrustPolicy {
    /// Accepts every image: what a node without a policy.json gets.
    pub fn accept_all() -> TrustPolicy {
        TrustPolicy {
            path: PathBuf::new(),
            default: vec![Requirement::InsecureAcceptAnything],
            docker: HashMap::new(),
        }
    }

    /// Loads `path`; a missing file accepts every image (containerd nodes have none).
    pub fn load(path: &Path) -> Result<TrustPolicy, TrustPolicyError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no policy.json; every image is accepted");
                Ok(Self::accept_all())
            }
            Err(source) => Err(TrustPolicyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(bytes: &[u8], path: &Path) -> Result<TrustPolicy, TrustPolicyError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let file: File = serde_path_to_error::deserialize(&mut de).map_err(|source| {
            TrustPolicyError::Parse {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let invalid = |scope: &str, why: String| TrustPolicyError::Invalid {
            path: path.to_path_buf(),
            scope: scope.to_string(),
            why,
        };
        let requirements = |scope: &str, raw: &[RawRequirement]| {
            if raw.is_empty() {
                // containers/image refuses an empty list rather than guess.
                return Err(invalid(scope, "no requirements".into()));
            }
            raw.iter()
                .map(|r| match r.kind.as_str() {
                    "insecureAcceptAnything" => Ok(Requirement::InsecureAcceptAnything),
                    "reject" => Ok(Requirement::Reject),
                    "signedBy" => Ok(Requirement::Signature("signedBy")),
                    "sigstoreSigned" => Ok(Requirement::Signature("sigstoreSigned")),
                    other => Err(invalid(
                        scope,
                        format!("unknown requirement type {other:?}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let Some(default) = file.default else {
            return Err(invalid(
                "default",
                "missing (containers-policy.json(5) requires it)".into(),
            ));
        };
        let default = requirements("default", &default)?;
        let mut docker = HashMap::new();
        if let Some(scopes) = file.transports.get("docker") {
            for (scope, raw) in scopes {
                docker.insert(scope.clone(), requirements(scope, raw)?);
            }
        }
        Ok(TrustPolicy {
            path: path.to_path_buf(),
            default,
            docker,
        })
    }

    /// The scope that decides for `reference` and its requirements.
    pub fn scope_for(&self, reference: &Reference) -> (&str, &[Requirement]) {
        for scope in scopes(reference) {
            if let Some((key, reqs)) = self.docker.get_key_value(scope.as_str()) {
                return (key, reqs);
            }
        }
        ("default", &self.default)
    }

    /// Whether `reference` may be pulled: every requirement of its scope must hold.
    pub fn check(&self, reference: &Reference) -> Result<(), Refusal> {
        let (scope, requirements) = self.scope_for(reference);
        match requirements
            .iter()
            .find(|r| **r != Requirement::InsecureAcceptAnything)
        {
            None => Ok(()),
            Some(requirement) => Err(Refusal {
                image: reference.to_string(),
                path: self.path.clone(),
                scope: scope.to_string(),
                requirement: *requirement,
            }),
        }
    }
}

/// The docker transport's scopes for `reference`, most specific first: the reference
/// itself, its repository, each namespace above it, the host, `*.` wildcards of the
/// host's parent domains, then `""`.
fn scopes(reference: &Reference) -> Vec<String> {
    let mut scopes = vec![reference.to_string()];
    let mut name = reference.name();
    loop {
        scopes.push(name.clone());
        match name.rfind('/') {
            Some(i) => name.truncate(i),
            None => break,
        }
    }
    let host = reference.domain();
    let host = host.split(':').next().unwrap_or(host);
    let mut rest = host;
    while let Some((_, parent)) = rest.split_once('.') {
        scopes.push(format!("*.{parent}"));
        rest = parent;
    }
    scopes.push(String::new());
    scopes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> TrustPolicy {
        TrustPolicy::parse(json.as_bytes(), Path::new("/etc/containers/policy.json")).unwrap()
    }

    fn verdict(p: &TrustPolicy, image: &str) -> Result<(), String> {
        p.check(&Reference::parse(image).unwrap())
            .map_err(|r| format!("{}:{:?}", r.scope, r.requirement))
    }

    #[test]
    fn scopes_run_from_the_reference_to_the_transport() {
        let r = Reference::parse("a.b.example.com:5000/ns/sub/app:1").unwrap();
        assert_eq!(
            scopes(&r),
            [
                "a.b.example.com:5000/ns/sub/app:1",
                "a.b.example.com:5000/ns/sub/app",
                "a.b.example.com:5000/ns/sub",
                "a.b.example.com:5000/ns",
                "a.b.example.com:5000",
                "*.b.example.com",
                "*.example.com",
                "*.com",
                "",
            ]
        );
    }

    #[test]
    fn most_specific_scope_wins() {
        let p = policy(
            r#"{
  "default": [{"type": "reject"}],
  "transports": {
    "docker": {
      "docker.io": [{"type": "insecureAcceptAnything"}],
      "docker.io/library/busybox": [{"type": "reject"}],
      "docker.io/library/busybox:stable": [{"type": "insecureAcceptAnything"}],
      "*.example.com": [{"type": "insecureAcceptAnything"}],
      "registry.example.com/private": [{"type": "reject"}],
      "quay.io/signed": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"}],
      "ghcr.io": [{"type": "insecureAcceptAnything"}, {"type": "sigstoreSigned", "keyPath": "/k.pub"}]
    },
    "docker-daemon": {"": [{"type": "insecureAcceptAnything"}]}
  }
}"#,
        );
        assert_eq!(verdict(&p, "nginx"), Ok(()));
        assert_eq!(
            verdict(&p, "busybox"),
            Err("docker.io/library/busybox:Reject".into())
        );
        assert_eq!(verdict(&p, "busybox:stable"), Ok(()));
        assert_eq!(verdict(&p, "registry.example.com/app"), Ok(()));
        assert_eq!(
            verdict(&p, "registry.example.com/private/app"),
            Err("registry.example.com/private:Reject".into())
        );
        assert_eq!(verdict(&p, "quay.io/other"), Err("default:Reject".into()));
        assert_eq!(
            verdict(&p, "quay.io/signed/app"),
            Err("quay.io/signed:Signature(\"signedBy\")".into())
        );
        // Requirements are ANDed: accepting one does not waive the signature.
        assert_eq!(
            verdict(&p, "ghcr.io/x/y"),
            Err("ghcr.io:Signature(\"sigstoreSigned\")".into())
        );
    }

    #[test]
    fn refusals_name_the_scope_file_and_reason() {
        let p = policy(
            r#"{"default": [{"type": "insecureAcceptAnything"}], "transports": {"docker": {"quay.io": [{"type": "sigstoreSigned", "keyPath": "/k"}], "": [{"type": "insecureAcceptAnything"}], "bad.io": [{"type": "reject"}]}}}"#,
        );
        let r = p
            .check(&Reference::parse("quay.io/a/b:1").unwrap())
            .unwrap_err();
        assert!(r.is_signature());
        let text = r.to_string();
        assert!(
            text.contains("sigstoreSigned")
                && text.contains("\"quay.io\"")
                && text.contains("/etc/containers/policy.json")
                && text.contains("refused rather than accepted unverified"),
            "{text}"
        );
        let r = p.check(&Reference::parse("bad.io/x").unwrap()).unwrap_err();
        assert!(!r.is_signature());
        assert!(
            r.to_string()
                .contains("bad.io/x:latest is rejected by scope \"bad.io\""),
            "{r}"
        );
        assert_eq!(verdict(&p, "docker.io/x"), Ok(()));
    }

    #[test]
    fn seed_004_allowed_registries_policy() {
        // OpenShift's registrySources.allowedRegistries as a node's policy.json
        // (seed 004 §9.2.1, example 9.1 and the node listing after it).
        let p = TrustPolicy::parse(
            include_bytes!("../tests/fixtures/policy/seed004-allowed-registries.json"),
            Path::new("/etc/containers/policy.json"),
        )
        .unwrap();
        assert_eq!(verdict(&p, "quay.io/team/app:1"), Ok(()));
        assert_eq!(verdict(&p, "example.com/x"), Ok(()));
        assert_eq!(
            verdict(&p, "image-registry.openshift-image-registry.svc:5000/ns/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            Ok(())
        );
        assert_eq!(verdict(&p, "reg4.io/myrepo/myapp:latest"), Ok(()));
        assert_eq!(
            verdict(&p, "reg4.io/myrepo/myapp:v2"),
            Err("default:Reject".into())
        );
        assert_eq!(verdict(&p, "busybox"), Err("default:Reject".into()));
        assert_eq!(verdict(&p, "sub.quay.io/x"), Err("default:Reject".into()));
    }

    #[test]
    fn debian_default_accepts_everything() {
        let p = policy(r#"{"default": [{"type": "insecureAcceptAnything"}]}"#);
        assert_eq!(verdict(&p, "anything.io/at/all@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"), Ok(()));
        assert_eq!(verdict(&TrustPolicy::accept_all(), "busybox"), Ok(()));
    }

    #[test]
    fn broken_files_name_the_problem() {
        for (json, wants) in [
            ("{", "policy.json /p.json"),
            (r#"{"transports": {}}"#, "default: missing"),
            (r#"{"default": []}"#, "default: no requirements"),
            (
                r#"{"default": [{"type": "acceptIfNice"}]}"#,
                "unknown requirement type \"acceptIfNice\"",
            ),
            (
                r#"{"default": [{"type": "reject"}], "transports": {"docker": {"quay.io": []}}}"#,
                "quay.io: no requirements",
            ),
            (r#"{"default": [{"kind": "reject"}]}"#, "default[0]"),
        ] {
            let e = TrustPolicy::parse(json.as_bytes(), Path::new("/p.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(wants), "{json}: {e}");
        }
        assert!(TrustPolicy::load(Path::new("/nonexistent/policy.json")).is_ok());
    }
}
