//! The signed JSON payload, shared by both signature kinds: what the signer claims
//! (an image name and a manifest digest), read strictly as containers/image does so
//! that a payload one verifier accepts no other verifier reads differently.

use serde_json::{Map, Value};

/// `critical.type` of a GPG simple-signing payload.
pub const SIMPLE_SIGNING_TYPE: &str = "atomic container signature";
/// `critical.type` of a sigstore (cosign) payload.
pub const SIGSTORE_TYPE: &str = "cosign container image signature";

/// What a verified signature claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `critical.identity.docker-reference`, as written.
    pub docker_reference: String,
    /// `critical.image.docker-manifest-digest`, as written.
    pub manifest_digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the signed payload is not a container signature: {0}")]
pub struct PayloadError(String);

/// Which payload is expected: the `type` string and whether `optional` may be null.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SimpleSigning,
    Sigstore,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Top {
    critical: Critical,
    // Required, but may be null (sigstore): hence a Value rather than an Option.
    optional: Value,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Critical {
    #[serde(rename = "type")]
    kind: String,
    image: Image,
    identity: Identity,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

/// Parses `bytes` as a payload of `kind`: the top level holds exactly `critical` and
/// `optional`; `critical` exactly `type`, `image` and `identity`; `image` exactly
/// `docker-manifest-digest`; `identity` exactly `docker-reference`; no member twice.
/// Members of `optional` are not interpreted beyond their types.
pub fn parse(bytes: &[u8], kind: Kind) -> Result<Claim, PayloadError> {
    let top: Top = serde_json::from_slice(bytes).map_err(|e| PayloadError(format!("{e}")))?;
    let expected = match kind {
        Kind::SimpleSigning => SIMPLE_SIGNING_TYPE,
        Kind::Sigstore => SIGSTORE_TYPE,
    };
    if top.critical.kind != expected {
        return Err(PayloadError(format!(
            "critical.type is {:?}, not {expected:?}",
            top.critical.kind
        )));
    }
    match (&top.optional, kind) {
        (Value::Null, Kind::Sigstore) => {}
        (Value::Object(optional), _) => check_optional(optional)?,
        _ => return Err(PayloadError("optional is not an object".into())),
    }
    Ok(Claim {
        docker_reference: top.critical.identity.docker_reference,
        manifest_digest: top.critical.image.docker_manifest_digest,
    })
}

fn check_optional(optional: &Map<String, Value>) -> Result<(), PayloadError> {
    if let Some(creator) = optional.get("creator") {
        if !creator.is_string() {
            return Err(PayloadError("optional.creator is not a string".into()));
        }
    }
    if let Some(timestamp) = optional.get("timestamp") {
        if !(timestamp.is_i64() || timestamp.is_u64()) {
            return Err(PayloadError("optional.timestamp is not an integer".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:20bf21ed457b390829cdbeec8795a7bea1626991fda603e0d01b4e7f60427e55";

    fn simple(optional: &str) -> String {
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"testing/manifest"}},"image":{{"docker-manifest-digest":"{DIGEST}"}},"type":"atomic container signature"}},"optional":{optional}}}"#
        )
    }

    #[test]
    fn reads_both_kinds() {
        let claim = parse(
            simple(r#"{"creator":"atomic ","timestamp":1458239713}"#).as_bytes(),
            Kind::SimpleSigning,
        )
        .unwrap();
        assert_eq!(claim.docker_reference, "testing/manifest");
        assert_eq!(claim.manifest_digest, DIGEST);
        let cosign = simple("null").replace(SIMPLE_SIGNING_TYPE, SIGSTORE_TYPE);
        assert!(parse(cosign.as_bytes(), Kind::Sigstore).is_ok());
        // Trailing whitespace is fine; other trailing data is not.
        assert!(parse(format!("{cosign}\n").as_bytes(), Kind::Sigstore).is_ok());
        assert!(parse(format!("{cosign}x").as_bytes(), Kind::Sigstore).is_err());
    }

    #[test]
    fn refuses_anything_looser() {
        for (payload, kind) in [
            ("&".to_string(), Kind::Sigstore),
            ("{}".to_string(), Kind::Sigstore),
            (simple("null"), Kind::SimpleSigning),
            (simple("{}"), Kind::Sigstore),
            (simple(r#"{"timestamp":"yesterday"}"#), Kind::SimpleSigning),
            (simple(r#"{"timestamp":1.5}"#), Kind::SimpleSigning),
            (simple(r#"{"creator":1}"#), Kind::SimpleSigning),
            (
                simple("{}").replace(r#""type""#, r#""extra":1,"type""#),
                Kind::SimpleSigning,
            ),
            (
                simple("{}").replace("}}", r#"},"x":1}"#),
                Kind::SimpleSigning,
            ),
            (
                simple("{}").replace(r#"{"docker-reference":"testing/manifest"}"#, "{}"),
                Kind::SimpleSigning,
            ),
            (simple("{}").replace(DIGEST, ""), Kind::SimpleSigning),
        ] {
            let parsed = parse(payload.as_bytes(), kind);
            if payload.contains(r#""docker-manifest-digest":"""#) {
                // An empty digest parses; it simply never matches a manifest.
                assert!(parsed.is_ok(), "{payload}");
            } else {
                assert!(parsed.is_err(), "{payload} parsed as {parsed:?}");
            }
        }
        assert!(parse(br#"{"critical":{"identity":{"docker-reference":1},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature"},"optional":{}}"#, Kind::SimpleSigning).is_err());
        // A member given twice (the second would win in a lax parser).
        let twice = simple("{}").replace(
            r#"{"docker-reference":"testing/manifest"}"#,
            r#"{"docker-reference":"testing/manifest","docker-reference":"evil/image"}"#,
        );
        assert!(
            parse(twice.as_bytes(), Kind::SimpleSigning).is_err(),
            "{twice}"
        );
    }
}
