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

/// Parses `bytes` as a payload of `kind`: the top level holds exactly `critical` and
/// `optional`; `critical` exactly `type`, `image` and `identity`; `image` exactly
/// `docker-manifest-digest`; `identity` exactly `docker-reference`. Members of
/// `optional` are not interpreted beyond their types.
pub fn parse(bytes: &[u8], kind: Kind) -> Result<Claim, PayloadError> {
    let err = |why: &str| PayloadError(why.to_string());
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| PayloadError(format!("not JSON ({e})")))?;
    let top = exact_object(&value, "the payload", &["critical", "optional"])?;
    let critical = exact_object(&top["critical"], "critical", &["type", "image", "identity"])?;
    let expected = match kind {
        Kind::SimpleSigning => SIMPLE_SIGNING_TYPE,
        Kind::Sigstore => SIGSTORE_TYPE,
    };
    match critical["type"].as_str() {
        Some(t) if t == expected => {}
        Some(t) => {
            return Err(PayloadError(format!(
                "critical.type is {t:?}, not {expected:?}"
            )))
        }
        None => return Err(err("critical.type is not a string")),
    }
    let image = exact_object(
        &critical["image"],
        "critical.image",
        &["docker-manifest-digest"],
    )?;
    let identity = exact_object(
        &critical["identity"],
        "critical.identity",
        &["docker-reference"],
    )?;
    let manifest_digest = image["docker-manifest-digest"]
        .as_str()
        .ok_or_else(|| err("critical.image.docker-manifest-digest is not a string"))?;
    let docker_reference = identity["docker-reference"]
        .as_str()
        .ok_or_else(|| err("critical.identity.docker-reference is not a string"))?;
    match (&top["optional"], kind) {
        (Value::Null, Kind::Sigstore) => {}
        (Value::Object(optional), _) => check_optional(optional)?,
        _ => return Err(err("optional is not an object")),
    }
    Ok(Claim {
        docker_reference: docker_reference.to_string(),
        manifest_digest: manifest_digest.to_string(),
    })
}

fn exact_object<'a>(
    value: &'a Value,
    what: &str,
    members: &[&str],
) -> Result<&'a Map<String, Value>, PayloadError> {
    let Value::Object(map) = value else {
        return Err(PayloadError(format!("{what} is not an object")));
    };
    if let Some(extra) = map.keys().find(|k| !members.contains(&k.as_str())) {
        return Err(PayloadError(format!(
            "{what} has an unexpected member {extra:?}"
        )));
    }
    if let Some(missing) = members.iter().find(|m| !map.contains_key(**m)) {
        return Err(PayloadError(format!("{what} lacks {missing:?}")));
    }
    Ok(map)
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
            (simple("{}").replace(DIGEST, ""), Kind::SimpleSigning).clone(),
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
    }
}
