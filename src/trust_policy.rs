//! Which images may be pulled at all: containers-policy.json(5), as CRI-O and podman
//! read it from `/etc/containers/policy.json`.
//!
//! Read: `default` and `transports.docker` scopes (a reference with tag or digest, a
//! repository, each namespace above it, `host[:port]`, `*.domain` wildcards, and `""`
//! for the whole transport), most specific first. Every requirement of the scope must
//! hold: `insecureAcceptAnything`, `reject`, and the signature requirements
//! `signedBy` and `sigstoreSigned` (parsed in [`crate::signature::requirement`],
//! checked against the pulled manifest by [`crate::signature::verify`]).
//! `signedBaseLayer` parses and refuses, as in containers/image.

use crate::reference::Reference;
use crate::signature::registries_d::{RegistriesD, RegistriesDError};
use crate::signature::requirement::{self, SignedBy, SigstoreSigned};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error(transparent)]
    RegistriesD(#[from] RegistriesDError),
}

#[derive(Debug, Deserialize)]
struct File {
    default: Option<Vec<Value>>,
    #[serde(default)]
    transports: HashMap<String, HashMap<String, Vec<Value>>>,
}

/// One policy requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    InsecureAcceptAnything,
    Reject,
    /// A GPG simple signature (checked once the manifest is known).
    SignedBy(Arc<SignedBy>),
    /// A sigstore signature (checked once the manifest is known).
    SigstoreSigned(Arc<SigstoreSigned>),
    /// containers/image parses it and implements no check: it refuses, and so do we.
    SignedBaseLayer,
}

impl Requirement {
    /// Whether the requirement is about signatures (kubelet's SignatureValidationFailed).
    pub fn is_signature(&self) -> bool {
        matches!(
            self,
            Requirement::SignedBy(_)
                | Requirement::SigstoreSigned(_)
                | Requirement::SignedBaseLayer
        )
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requirement::InsecureAcceptAnything => f.write_str("insecureAcceptAnything"),
            Requirement::Reject => f.write_str("reject"),
            Requirement::SignedBy(r) => r.fmt(f),
            Requirement::SigstoreSigned(r) => r.fmt(f),
            Requirement::SignedBaseLayer => f.write_str("signedBaseLayer"),
        }
    }
}

/// Why an image was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub image: String,
    pub path: PathBuf,
    /// The scope whose requirements applied (`default` for the global default).
    pub scope: String,
    pub requirement: Requirement,
    /// For a signature requirement checked against a manifest: the manifest digest
    /// and why no signature was accepted.
    pub verdict: Option<Box<(String, String)>>,
}

impl Refusal {
    /// Whether the refusal is about signatures (kubelet's SignatureValidationFailed).
    pub fn is_signature(&self) -> bool {
        self.requirement.is_signature()
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = if self.scope == "default" {
            "the default".to_string()
        } else {
            format!("scope {:?}", self.scope)
        };
        let file = self.path.display();
        match (&self.requirement, &self.verdict) {
            (Requirement::Reject, _) => {
                write!(
                    f,
                    "{} is rejected by {scope} in policy.json {file}",
                    self.image
                )
            }
            (Requirement::SignedBaseLayer, _) => write!(
                f,
                "{} falls under {scope} in policy.json {file}, whose signedBaseLayer \
                 requirement is not implemented (by containers/image either): refused",
                self.image
            ),
            (requirement, Some(verdict)) => write!(
                f,
                "{} (manifest {}) is refused by {scope} in policy.json {file}: \
                 requirement {requirement}: {}",
                self.image, verdict.0, verdict.1
            ),
            (requirement, None) => write!(
                f,
                "{} is refused by {scope} in policy.json {file}: requirement {requirement}",
                self.image
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// What [`TrustPolicy::check`] leaves to be verified once the manifest is known.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    pub scope: String,
    pub path: PathBuf,
    /// Signature requirements, all of which must be met.
    pub requirements: Vec<Requirement>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// A loaded policy.json, with the registries.d that says where signatures live.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    path: PathBuf,
    default: Vec<Requirement>,
    docker: HashMap<String, Vec<Requirement>>,
    registries_d: RegistriesD,
}

impl TrustPolicy {
    /// Accepts every image: what a node without a policy.json gets.
    pub fn accept_all() -> TrustPolicy {
        TrustPolicy {
            path: PathBuf::new(),
            default: vec![Requirement::InsecureAcceptAnything],
            docker: HashMap::new(),
            registries_d: RegistriesD::default(),
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

    /// [`Self::load`], with signature sources from the registries.d directory `dir`.
    pub fn load_with(path: &Path, dir: &Path) -> Result<TrustPolicy, TrustPolicyError> {
        let mut policy = Self::load(path)?;
        policy.registries_d = RegistriesD::load(dir)?;
        Ok(policy)
    }

    /// Where signatures are read from.
    pub fn registries_d(&self) -> &RegistriesD {
        &self.registries_d
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
        let requirements = |scope: &str, raw: &[Value]| {
            if raw.is_empty() {
                // containers/image refuses an empty list rather than guess.
                return Err(invalid(scope, "no requirements".into()));
            }
            raw.iter()
                .enumerate()
                .map(|(i, r)| {
                    let at = |why: String| invalid(&format!("{scope}[{i}]"), why);
                    let kind = r
                        .get("type")
                        .and_then(Value::as_str)
                        .ok_or_else(|| at("a requirement needs a \"type\"".into()))?;
                    let only_type = || match r.as_object().map(|o| o.len()) {
                        Some(1) => Ok(()),
                        _ => Err(at(format!("{kind} takes no other members"))),
                    };
                    match kind {
                        "insecureAcceptAnything" => {
                            only_type().map(|_| Requirement::InsecureAcceptAnything)
                        }
                        "reject" => only_type().map(|_| Requirement::Reject),
                        "signedBy" => requirement::signed_by(r)
                            .map(|r| Requirement::SignedBy(Arc::new(r)))
                            .map_err(at),
                        "sigstoreSigned" => requirement::sigstore_signed(r)
                            .map(|r| Requirement::SigstoreSigned(Arc::new(r)))
                            .map_err(at),
                        "signedBaseLayer" => Ok(Requirement::SignedBaseLayer),
                        other => Err(at(format!("unknown requirement type {other:?}"))),
                    }
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
            registries_d: RegistriesD::default(),
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

    /// Whether `reference` may be pulled, as far as can be told before any registry
    /// is contacted: a `reject` (or unimplemented) requirement refuses it now; the
    /// signature requirements are returned, to be checked against the manifest.
    pub fn check(&self, reference: &Reference) -> Result<Pending, Refusal> {
        let (scope, requirements) = self.scope_for(reference);
        let refusal = |requirement: &Requirement| Refusal {
            image: reference.to_string(),
            path: self.path.clone(),
            scope: scope.to_string(),
            requirement: requirement.clone(),
            verdict: None,
        };
        let mut pending = Pending {
            scope: scope.to_string(),
            path: self.path.clone(),
            requirements: Vec::new(),
        };
        for requirement in requirements {
            match requirement {
                Requirement::InsecureAcceptAnything => {}
                Requirement::Reject | Requirement::SignedBaseLayer => {
                    return Err(refusal(requirement))
                }
                Requirement::SignedBy(_) | Requirement::SigstoreSigned(_) => {
                    pending.requirements.push(requirement.clone())
                }
            }
        }
        Ok(pending)
    }
}

/// The docker transport's scopes for `reference`, most specific first: the reference
/// itself, its repository, each namespace above it, the host, `*.` wildcards of the
/// host's parent domains, then `""`.
pub(crate) fn scopes(reference: &Reference) -> Vec<String> {
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
        match p.check(&Reference::parse(image).unwrap()) {
            Ok(pending) if pending.is_empty() => Ok(()),
            Ok(pending) => Err(format!(
                "{}:{}",
                pending.scope,
                pending
                    .requirements
                    .iter()
                    .map(|r| r
                        .to_string()
                        .split(' ')
                        .next()
                        .unwrap_or_default()
                        .to_string())
                    .collect::<Vec<_>>()
                    .join("+")
            )),
            Err(r) => Err(format!("{}:{}", r.scope, r.requirement)),
        }
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
            Err("docker.io/library/busybox:reject".into())
        );
        assert_eq!(verdict(&p, "busybox:stable"), Ok(()));
        assert_eq!(verdict(&p, "registry.example.com/app"), Ok(()));
        assert_eq!(
            verdict(&p, "registry.example.com/private/app"),
            Err("registry.example.com/private:reject".into())
        );
        assert_eq!(verdict(&p, "quay.io/other"), Err("default:reject".into()));
        assert_eq!(
            verdict(&p, "quay.io/signed/app"),
            Err("quay.io/signed:signedBy".into())
        );
        // Requirements are ANDed: accepting one does not waive the signature.
        assert_eq!(
            verdict(&p, "ghcr.io/x/y"),
            Err("ghcr.io:sigstoreSigned".into())
        );
    }

    #[test]
    fn refusals_name_the_scope_file_and_reason() {
        let p = policy(
            r#"{"default": [{"type": "insecureAcceptAnything"}], "transports": {"docker": {"quay.io": [{"type": "sigstoreSigned", "keyPath": "/k"}], "": [{"type": "insecureAcceptAnything"}], "bad.io": [{"type": "reject"}], "base.io": [{"type": "signedBaseLayer", "baseLayerIdentity": {"type": "matchExact"}}]}}}"#,
        );
        let pending = p
            .check(&Reference::parse("quay.io/a/b:1").unwrap())
            .unwrap();
        assert_eq!(pending.scope, "quay.io");
        assert!(pending.requirements[0].is_signature());
        let r = p.check(&Reference::parse("bad.io/x").unwrap()).unwrap_err();
        assert!(!r.is_signature());
        assert!(
            r.to_string()
                .contains("bad.io/x:latest is rejected by scope \"bad.io\""),
            "{r}"
        );
        let r = p
            .check(&Reference::parse("base.io/x").unwrap())
            .unwrap_err();
        assert!(
            r.is_signature() && r.to_string().contains("signedBaseLayer"),
            "{r}"
        );
        assert_eq!(verdict(&p, "docker.io/x"), Ok(()));
    }

    #[test]
    fn upstream_example_policy_parses() {
        // containers/image's own example (keys are named, not read, at parse time).
        let p = TrustPolicy::parse(
            &std::fs::read(crate::signature::fixtures::path("policy.json")).unwrap(),
            Path::new("policy.json"),
        )
        .unwrap();
        assert_eq!(verdict(&p, "example.com/playground/x"), Ok(()));
        assert_eq!(
            verdict(&p, "example.com/production/x"),
            Err("example.com/production:signedBy".into())
        );
        assert_eq!(
            verdict(&p, "example.com/hardened/x"),
            Err("example.com/hardened:signedBaseLayer".into())
        );
        assert_eq!(
            verdict(&p, "example.com/sigstore/key-path-example"),
            Err("example.com/sigstore/key-path-example:sigstoreSigned".into())
        );
        assert_eq!(verdict(&p, "quay.io/x"), Err("default:reject".into()));
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
            Err("default:reject".into())
        );
        assert_eq!(verdict(&p, "busybox"), Err("default:reject".into()));
        assert_eq!(verdict(&p, "sub.quay.io/x"), Err("default:reject".into()));
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
            (
                r#"{"default": [{"type": "reject", "x": 1}]}"#,
                "default[0]: reject takes no other members",
            ),
            (
                r#"{"default": [{"type": "signedBy", "keyType": "GPGKeys"}]}"#,
                "default[0]: signedBy needs keyPath",
            ),
        ] {
            let e = TrustPolicy::parse(json.as_bytes(), Path::new("/p.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(wants), "{json}: {e}");
        }
        assert!(TrustPolicy::load(Path::new("/nonexistent/policy.json")).is_ok());
    }
}
