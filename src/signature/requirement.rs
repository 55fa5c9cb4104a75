//! The signature requirements of containers-policy.json(5), parsed strictly (an
//! unknown or misplaced member is an error, as in containers/image). Key material is
//! named here and read when an image is verified, so a rotated key file needs no
//! reload.

use super::identity::SignedIdentity;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::path::PathBuf;

/// Where one requirement's keys (or certificates) come from: files, or inline data
/// (base64 in policy.json, decoded here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Material {
    Paths(Vec<PathBuf>),
    Data(Vec<Vec<u8>>),
}

impl Material {
    /// The bytes of every source, in order.
    pub fn read(&self) -> Result<Vec<Vec<u8>>, String> {
        match self {
            Material::Data(data) => Ok(data.clone()),
            Material::Paths(paths) => paths
                .iter()
                .map(|p| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
                .collect(),
        }
    }
}

impl fmt::Display for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Material::Paths(paths) => {
                let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                write!(f, "{}", names.join(", "))
            }
            Material::Data(data) if data.len() == 1 => f.write_str("inline key data"),
            Material::Data(data) => write!(f, "{} inline keys", data.len()),
        }
    }
}

/// `signedBy`: a GPG simple signature by one of the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBy {
    pub key_type: String,
    pub keys: Material,
    pub identity: SignedIdentity,
}

/// Who a `sigstoreSigned` signature must come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigstoreTrust {
    /// One of these public keys.
    Keys(Material),
    /// A Fulcio certificate for this OIDC issuer and email, chaining to `ca`.
    Fulcio {
        ca: Material,
        oidc_issuer: String,
        subject_email: String,
    },
    /// A certificate from a private PKI.
    Pki {
        roots: Material,
        intermediates: Option<Material>,
        subject_email: Option<String>,
        subject_hostname: Option<String>,
    },
}

/// `sigstoreSigned`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigstoreSigned {
    pub trust: SigstoreTrust,
    /// Rekor public keys; when set, every signature needs a valid Rekor SET.
    pub rekor_keys: Option<Material>,
    pub identity: SignedIdentity,
}

impl fmt::Display for SignedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "signedBy {} ({}), signedIdentity {}",
            self.key_type, self.keys, self.identity
        )
    }
}

impl fmt::Display for SigstoreSigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.trust {
            SigstoreTrust::Keys(keys) => write!(f, "sigstoreSigned by key ({keys})")?,
            SigstoreTrust::Fulcio {
                oidc_issuer,
                subject_email,
                ..
            } => write!(
                f,
                "sigstoreSigned by Fulcio certificate for {subject_email} from {oidc_issuer}"
            )?,
            SigstoreTrust::Pki { roots, .. } => {
                write!(f, "sigstoreSigned by PKI certificate (roots {roots})")?
            }
        }
        if self.rekor_keys.is_some() {
            f.write_str(" with a Rekor SET")?;
        }
        write!(f, ", signedIdentity {}", self.identity)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSignedBy {
    #[serde(rename = "type")]
    _kind: String,
    key_type: String,
    key_path: Option<PathBuf>,
    key_paths: Option<Vec<PathBuf>>,
    key_data: Option<String>,
    signed_identity: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSigstore {
    #[serde(rename = "type")]
    _kind: String,
    key_path: Option<PathBuf>,
    key_paths: Option<Vec<PathBuf>>,
    key_data: Option<String>,
    key_datas: Option<Vec<String>>,
    fulcio: Option<RawFulcio>,
    pki: Option<RawPki>,
    rekor_public_key_path: Option<PathBuf>,
    rekor_public_key_paths: Option<Vec<PathBuf>>,
    rekor_public_key_data: Option<String>,
    rekor_public_key_datas: Option<Vec<String>>,
    signed_identity: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFulcio {
    ca_path: Option<PathBuf>,
    ca_data: Option<String>,
    oidc_issuer: Option<String>,
    subject_email: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPki {
    ca_roots_path: Option<PathBuf>,
    ca_roots_data: Option<String>,
    ca_intermediates_path: Option<PathBuf>,
    ca_intermediates_data: Option<String>,
    subject_email: Option<String>,
    subject_hostname: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawIdentity {
    #[serde(rename = "type")]
    kind: String,
    docker_reference: Option<String>,
    docker_repository: Option<String>,
    prefix: Option<String>,
    signed_prefix: Option<String>,
}

fn decode(what: &str, text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("{what} is not base64: {e}"))
}

/// Exactly one of a path, a list of paths, inline data or a list of inline data.
fn material(
    what: &str,
    path: Option<PathBuf>,
    paths: Option<Vec<PathBuf>>,
    data: Option<String>,
    datas: Option<Vec<String>>,
) -> Result<Option<Material>, String> {
    let given = [
        path.is_some(),
        paths.is_some(),
        data.is_some(),
        datas.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(format!(
            "{what}: give only one of the path, paths, data or datas forms"
        ));
    }
    let empty = |v: &[_]| v.is_empty();
    Ok(match (path, paths, data, datas) {
        (Some(p), ..) => Some(Material::Paths(vec![p])),
        (_, Some(ps), ..) if empty(&ps) => {
            return Err(format!("{what}: the list of paths is empty"))
        }
        (_, Some(ps), ..) => Some(Material::Paths(ps)),
        (_, _, Some(d), _) => Some(Material::Data(vec![decode(what, &d)?])),
        (_, _, _, Some(ds)) if ds.is_empty() => {
            return Err(format!("{what}: the list of data is empty"))
        }
        (_, _, _, Some(ds)) => Some(Material::Data(
            ds.iter()
                .map(|d| decode(what, d))
                .collect::<Result<_, _>>()?,
        )),
        _ => None,
    })
}

fn identity(value: Option<Value>) -> Result<SignedIdentity, String> {
    let Some(value) = value else {
        return Ok(SignedIdentity::MatchRepoDigestOrExact);
    };
    let raw: RawIdentity =
        serde_json::from_value(value).map_err(|e| format!("signedIdentity: {e}"))?;
    let only = |ok: &[bool]| {
        let given = [
            raw.docker_reference.is_some(),
            raw.docker_repository.is_some(),
            raw.prefix.is_some(),
            raw.signed_prefix.is_some(),
        ];
        if given.iter().zip(ok).any(|(g, ok)| *g && !ok) {
            Err(format!("signedIdentity {}: unexpected member", raw.kind))
        } else {
            Ok(())
        }
    };
    let valid_ref = |r: &str, want_tag: bool| -> Result<(), String> {
        let parsed = crate::reference::Reference::parse(r)
            .map_err(|e| format!("signedIdentity {}: {e}", raw.kind))?;
        let _ = parsed;
        let last = r.rsplit('/').next().unwrap_or(r);
        let tagged = last.contains(':') || r.contains('@');
        if want_tag && !tagged {
            return Err(format!(
                "signedIdentity {}: {r:?} needs a tag or digest",
                raw.kind
            ));
        }
        if !want_tag && tagged {
            return Err(format!(
                "signedIdentity {}: {r:?} must be a repository, without tag or digest",
                raw.kind
            ));
        }
        Ok(())
    };
    match raw.kind.as_str() {
        "matchExact" => only(&[false; 4]).map(|_| SignedIdentity::MatchExact),
        "matchRepoDigestOrExact" => {
            only(&[false; 4]).map(|_| SignedIdentity::MatchRepoDigestOrExact)
        }
        "matchRepository" => only(&[false; 4]).map(|_| SignedIdentity::MatchRepository),
        "exactReference" => {
            only(&[true, false, false, false])?;
            let r = raw
                .docker_reference
                .clone()
                .ok_or("signedIdentity exactReference needs dockerReference")?;
            valid_ref(&r, true)?;
            Ok(SignedIdentity::ExactReference(r))
        }
        "exactRepository" => {
            only(&[false, true, false, false])?;
            let r = raw
                .docker_repository
                .clone()
                .ok_or("signedIdentity exactRepository needs dockerRepository")?;
            valid_ref(&r, false)?;
            Ok(SignedIdentity::ExactRepository(r))
        }
        "remapIdentity" => {
            only(&[false, false, true, true])?;
            match (raw.prefix.clone(), raw.signed_prefix.clone()) {
                (Some(prefix), Some(signed_prefix)) => Ok(SignedIdentity::RemapIdentity {
                    prefix,
                    signed_prefix,
                }),
                _ => Err("signedIdentity remapIdentity needs prefix and signedPrefix".into()),
            }
        }
        other => Err(format!("unknown signedIdentity type {other:?}")),
    }
}

/// Parses a `signedBy` requirement.
pub fn signed_by(value: &Value) -> Result<SignedBy, String> {
    let raw: RawSignedBy =
        serde_json::from_value(value.clone()).map_err(|e| format!("signedBy: {e}"))?;
    if !matches!(
        raw.key_type.as_str(),
        "GPGKeys" | "signedByGPGKeys" | "X509Certificates" | "signedByX509CAs"
    ) {
        return Err(format!("signedBy: unknown keyType {:?}", raw.key_type));
    }
    let keys = material(
        "signedBy keys",
        raw.key_path,
        raw.key_paths,
        raw.key_data,
        None,
    )?
    .ok_or("signedBy needs keyPath, keyPaths or keyData")?;
    Ok(SignedBy {
        key_type: raw.key_type,
        keys,
        identity: identity(raw.signed_identity)?,
    })
}

/// Parses a `sigstoreSigned` requirement.
pub fn sigstore_signed(value: &Value) -> Result<SigstoreSigned, String> {
    let raw: RawSigstore =
        serde_json::from_value(value.clone()).map_err(|e| format!("sigstoreSigned: {e}"))?;
    let keys = material(
        "sigstoreSigned keys",
        raw.key_path,
        raw.key_paths,
        raw.key_data,
        raw.key_datas,
    )?;
    let rekor_keys = material(
        "sigstoreSigned rekorPublicKey",
        raw.rekor_public_key_path,
        raw.rekor_public_key_paths,
        raw.rekor_public_key_data,
        raw.rekor_public_key_datas,
    )?;
    let trust = match (keys, raw.fulcio, raw.pki) {
        (Some(keys), None, None) => SigstoreTrust::Keys(keys),
        (None, Some(f), None) => {
            let ca = material("fulcio CA", f.ca_path, None, f.ca_data, None)?
                .ok_or("sigstoreSigned fulcio needs caPath or caData")?;
            let oidc_issuer = f
                .oidc_issuer
                .ok_or("sigstoreSigned fulcio needs oidcIssuer")?;
            let subject_email = f
                .subject_email
                .ok_or("sigstoreSigned fulcio needs subjectEmail")?;
            if rekor_keys.is_none() {
                return Err("sigstoreSigned with fulcio needs a Rekor public key (rekorPublicKeyPath and friends)".into());
            }
            SigstoreTrust::Fulcio {
                ca,
                oidc_issuer,
                subject_email,
            }
        }
        (None, None, Some(p)) => {
            let roots = material("pki roots", p.ca_roots_path, None, p.ca_roots_data, None)?
                .ok_or("sigstoreSigned pki needs caRootsPath or caRootsData")?;
            let intermediates = material(
                "pki intermediates",
                p.ca_intermediates_path,
                None,
                p.ca_intermediates_data,
                None,
            )?;
            if p.subject_email.is_none() && p.subject_hostname.is_none() {
                return Err("sigstoreSigned pki needs subjectEmail or subjectHostname".into());
            }
            if rekor_keys.is_some() {
                return Err("sigstoreSigned with pki cannot use a Rekor public key".into());
            }
            SigstoreTrust::Pki {
                roots,
                intermediates,
                subject_email: p.subject_email,
                subject_hostname: p.subject_hostname,
            }
        }
        (None, None, None) => {
            return Err(
                "sigstoreSigned needs keys (keyPath, keyPaths, keyData, keyDatas), fulcio or pki"
                    .into(),
            )
        }
        _ => return Err("sigstoreSigned takes only one of keys, fulcio and pki".into()),
    };
    Ok(SigstoreSigned {
        trust,
        rekor_keys,
        identity: identity(raw.signed_identity)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn signed_by_forms() {
        let r = signed_by(&json!({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"}))
            .unwrap();
        assert_eq!(r.keys, Material::Paths(vec!["/k.gpg".into()]));
        assert_eq!(r.identity, SignedIdentity::MatchRepoDigestOrExact);
        let r = signed_by(&json!({"type": "signedBy", "keyType": "GPGKeys", "keyData": "bm9uc2Vuc2U=",
            "signedIdentity": {"type": "remapIdentity", "prefix": "a.io/x", "signedPrefix": "b.io/y"}})).unwrap();
        assert_eq!(r.keys, Material::Data(vec![b"nonsense".to_vec()]));
        for bad in [
            json!({"type": "signedBy", "keyType": "GPGKeys"}),
            json!({"type": "signedBy", "keyType": "Other", "keyPath": "/k"}),
            json!({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "keyData": "AA=="}),
            json!({"type": "signedBy", "keyType": "GPGKeys", "keyPaths": []}),
            json!({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "extra": 1}),
            json!({"type": "signedBy", "keyType": "GPGKeys", "keyData": "!!"}),
            json!({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "signedIdentity": {"type": "exactReference", "dockerReference": "a.io/x"}}),
            json!({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "signedIdentity": {"type": "exactRepository", "dockerRepository": "a.io/x:1"}}),
            json!({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "signedIdentity": {"type": "matchExact", "prefix": "a"}}),
            json!({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "signedIdentity": {"type": "remapIdentity", "prefix": "a"}}),
        ] {
            assert!(signed_by(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sigstore_forms() {
        let r = sigstore_signed(&json!({"type": "sigstoreSigned", "keyPaths": ["/a", "/b"], "rekorPublicKeyPath": "/r"})).unwrap();
        assert_eq!(
            r.trust,
            SigstoreTrust::Keys(Material::Paths(vec!["/a".into(), "/b".into()]))
        );
        assert!(r.rekor_keys.is_some());
        assert!(sigstore_signed(&json!({"type": "sigstoreSigned", "fulcio": {"caPath": "/ca", "oidcIssuer": "https://i", "subjectEmail": "a@b"}, "rekorPublicKeyData": "AA=="})).is_ok());
        assert!(sigstore_signed(
            &json!({"type": "sigstoreSigned", "pki": {"caRootsPath": "/ca", "subjectEmail": "a@b"}})
        )
        .is_ok());
        for bad in [
            json!({"type": "sigstoreSigned"}),
            json!({"type": "sigstoreSigned", "keyPath": "/a", "fulcio": {"caPath": "/ca", "oidcIssuer": "i", "subjectEmail": "e"}, "rekorPublicKeyPath": "/r"}),
            json!({"type": "sigstoreSigned", "fulcio": {"caPath": "/ca", "oidcIssuer": "i", "subjectEmail": "e"}}),
            json!({"type": "sigstoreSigned", "fulcio": {"caPath": "/ca", "oidcIssuer": "i", "subjectEmail": "e"}, "pki": {"caRootsPath": "/r", "subjectEmail": "e"}, "rekorPublicKeyPath": "/r"}),
            json!({"type": "sigstoreSigned", "pki": {"caRootsPath": "/ca", "subjectEmail": "e"}, "rekorPublicKeyPath": "/r"}),
            json!({"type": "sigstoreSigned", "keyPath": "/a", "keyDatas": ["AA=="]}),
            json!({"type": "sigstoreSigned", "keyPath": "/a", "unknown": true}),
        ] {
            assert!(sigstore_signed(&bad).is_err(), "{bad}");
        }
    }
}
