//! Rekor signed entry timestamps (SETs): the `dev.sigstore.cosign/bundle`
//! annotation proves that the transparency log recorded this signature, by this
//! signer, over this payload, at a time that a Fulcio certificate is checked at.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::signature::keys::{parse_pem, PemError, PublicKey};

/// Integers above this lose precision in RFC 8785 (ES6 number) serialization,
/// so the canonical form of the signed payload would not be the decimal text.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// What the Rekor entry must record as the signer.
pub enum Signer<'a> {
    Key(&'a PublicKey),
    Certificate { der: &'a [u8] },
}

/// The bundle annotation: exactly these two members, as upstream's
/// `UntrustedRekorSET` requires.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UntrustedSet {
    #[serde(rename = "SignedEntryTimestamp")]
    signed_entry_timestamp: String,
    #[serde(rename = "Payload")]
    payload: UntrustedSetPayload,
}

/// The signed part of the SET: exactly these four members.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UntrustedSetPayload {
    body: String,
    #[serde(rename = "integratedTime")]
    integrated_time: i64,
    #[serde(rename = "logIndex")]
    log_index: i64,
    #[serde(rename = "logID")]
    log_id: String,
}

impl UntrustedSetPayload {
    /// RFC 8785 canonical JSON: members sorted by name (`body`, `integratedTime`,
    /// `logID`, `logIndex`), no whitespace; serde_json's string escaping is the
    /// RFC's (only `"`, `\` and controls, lowercase `\u00xx`).
    fn canonical_json(&self) -> Result<Vec<u8>, RekorError> {
        for (field, value) in [
            ("integratedTime", self.integrated_time),
            ("logIndex", self.log_index),
        ] {
            if !(-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&value) {
                return Err(RekorError::OutOfRange(field));
            }
        }
        let string = |s: &str| serde_json::to_string(s).map_err(RekorError::MalformedSet);
        Ok(format!(
            "{{\"body\":{},\"integratedTime\":{},\"logID\":{},\"logIndex\":{}}}",
            string(&self.body)?,
            self.integrated_time,
            string(&self.log_id)?,
            self.log_index
        )
        .into_bytes())
    }
}

/// The Rekor entry (the SET payload's `body`), read as upstream does: the
/// listed members must be present, others are ignored (the body is covered by
/// the SET signature).
#[derive(Deserialize)]
struct RekorEntry {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    spec: Option<HashedRekordSpec>,
}

#[derive(Deserialize)]
struct HashedRekordSpec {
    data: Option<HashedRekordData>,
    signature: Option<HashedRekordSignature>,
}

#[derive(Deserialize)]
struct HashedRekordData {
    hash: Option<HashedRekordHash>,
}

#[derive(Deserialize)]
struct HashedRekordHash {
    algorithm: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
struct HashedRekordSignature {
    content: Option<String>,
    #[serde(rename = "publicKey")]
    public_key: Option<HashedRekordPublicKey>,
}

#[derive(Deserialize)]
struct HashedRekordPublicKey {
    content: Option<String>,
}

/// Verifies a Rekor SET (the `dev.sigstore.cosign/bundle` annotation text) with
/// one of `rekor_keys`, and that its hashedrekord body records exactly this
/// signer, this signature (raw bytes, already base64-decoded from the
/// annotation) and SHA-256 of this payload. Returns the integrated time.
pub fn verify_set(
    rekor_keys: &[PublicKey],
    set_json: &[u8],
    signer: Signer<'_>,
    signature: &[u8],
    payload: &[u8],
) -> Result<SystemTime, RekorError> {
    if rekor_keys.is_empty() {
        return Err(RekorError::NoRekorKeys);
    }
    let set: UntrustedSet = serde_json::from_slice(set_json).map_err(RekorError::MalformedSet)?;
    let canonical = set.payload.canonical_json()?;
    let set_signature = decode_base64(&set.signed_entry_timestamp, "SignedEntryTimestamp")?;
    // Rekor signs SHA-256 of the canonical payload with ECDSA whatever the curve
    // (upstream: `ecdsa.VerifyASN1(key, sha256(canonical), set)`).
    if !rekor_keys
        .iter()
        .any(|key| key.verify_ecdsa_sha256(&canonical, &set_signature))
    {
        return Err(RekorError::SetSignatureInvalid);
    }

    let payload_fields = &set.payload;
    let body = decode_base64(&payload_fields.body, "Payload.body")?;
    let entry: RekorEntry = serde_json::from_slice(&body).map_err(RekorError::MalformedBody)?;
    if entry.kind.as_deref() != Some("hashedrekord") {
        return Err(RekorError::WrongKind(entry.kind));
    }
    if entry.api_version.as_deref() != Some("0.0.1") {
        return Err(RekorError::WrongApiVersion(entry.api_version));
    }
    let spec = entry.spec.ok_or(RekorError::MissingField("spec"))?;

    let recorded_signature = spec
        .signature
        .ok_or(RekorError::MissingField("spec.signature"))?;
    let content = recorded_signature
        .content
        .ok_or(RekorError::MissingField("spec.signature.content"))?;
    if decode_base64(&content, "spec.signature.content")? != signature {
        return Err(RekorError::SignatureMismatch);
    }

    let key_or_cert = recorded_signature
        .public_key
        .ok_or(RekorError::MissingField("spec.signature.publicKey"))?
        .content
        .ok_or(RekorError::MissingField("spec.signature.publicKey.content"))?;
    let key_or_cert_pem = decode_base64(&key_or_cert, "spec.signature.publicKey.content")?;
    let blocks = parse_pem(&key_or_cert_pem).map_err(RekorError::PublicKeyNotPem)?;
    let recorded_der = match blocks.as_slice() {
        [block] => &block.der,
        [] => return Err(RekorError::PublicKeyBlocks(0)),
        more => return Err(RekorError::PublicKeyBlocks(more.len())),
    };
    let signer_der = match signer {
        Signer::Key(key) => key.spki_der(),
        Signer::Certificate { der } => der,
    };
    if recorded_der.as_slice() != signer_der {
        return Err(RekorError::SignerMismatch);
    }

    let hash = spec
        .data
        .ok_or(RekorError::MissingField("spec.data"))?
        .hash
        .ok_or(RekorError::MissingField("spec.data.hash"))?;
    let algorithm = hash
        .algorithm
        .ok_or(RekorError::MissingField("spec.data.hash.algorithm"))?;
    if algorithm != "sha256" {
        return Err(RekorError::UnsupportedHashAlgorithm(algorithm));
    }
    let recorded = hash
        .value
        .ok_or(RekorError::MissingField("spec.data.hash.value"))?;
    let computed = hex::encode(Sha256::digest(payload));
    if recorded != computed {
        return Err(RekorError::PayloadHashMismatch { recorded, computed });
    }

    let integrated_time = u64::try_from(payload_fields.integrated_time)
        .map_err(|_| RekorError::OutOfRange("integratedTime"))?;
    Ok(UNIX_EPOCH + Duration::from_secs(integrated_time))
}

fn decode_base64(text: &str, field: &'static str) -> Result<Vec<u8>, RekorError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|source| RekorError::Base64 { field, source })
}

#[derive(Debug, thiserror::Error)]
pub enum RekorError {
    #[error("no Rekor public key is configured to check the SET with")]
    NoRekorKeys,
    #[error(
        "the Rekor SET is not a JSON object of exactly SignedEntryTimestamp and \
         Payload {{body, integratedTime, logIndex, logID}}: {0}"
    )]
    MalformedSet(#[source] serde_json::Error),
    #[error("Rekor SET field {field} is not valid base64: {source}")]
    Base64 {
        field: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("Rekor SET field {0} is out of range")]
    OutOfRange(&'static str),
    #[error("no configured Rekor key verifies the SET signature")]
    SetSignatureInvalid,
    #[error("the Rekor entry body is not valid JSON: {0}")]
    MalformedBody(#[source] serde_json::Error),
    #[error("the Rekor entry kind is {0:?}, expected \"hashedrekord\"")]
    WrongKind(Option<String>),
    #[error("the Rekor entry apiVersion is {0:?}, expected \"0.0.1\"")]
    WrongApiVersion(Option<String>),
    #[error("the Rekor entry has no {0}")]
    MissingField(&'static str),
    #[error("the signature recorded in Rekor is not this signature")]
    SignatureMismatch,
    #[error("the public key recorded in Rekor is not PEM: {0}")]
    PublicKeyNotPem(#[source] PemError),
    #[error("the public key recorded in Rekor holds {0} PEM blocks, expected exactly one")]
    PublicKeyBlocks(usize),
    #[error("the key or certificate recorded in Rekor is not this signer's")]
    SignerMismatch,
    #[error("the Rekor entry hashes the payload with {0:?}, only sha256 is accepted")]
    UnsupportedHashAlgorithm(String),
    #[error("the payload hash recorded in Rekor ({recorded}) is not this payload's ({computed})")]
    PayloadHashMismatch { recorded: String, computed: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::x509::{verify_fulcio, FulcioTrust};
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
    use serde_json::{json, Value};

    const REKOR_SET_TIME: u64 = 1_670_870_899;

    use crate::signature::fixtures::read as fixture;

    fn key(name: &str) -> PublicKey {
        PublicKey::from_pem(&fixture(name)).unwrap()
    }

    fn b64(bytes: impl AsRef<[u8]>) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(bytes)
            .unwrap()
    }

    fn b64_encode(bytes: impl AsRef<[u8]>) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn fulcio_cert_der() -> Vec<u8> {
        parse_pem(&fixture("fulcio-cert")).unwrap().remove(0).der
    }

    /// `rekor-set` checked against its own signature, certificate and payload.
    fn verify_rekor_set(
        keys: &[PublicKey],
        set: &[u8],
        signature: &[u8],
        payload: &[u8],
    ) -> Result<SystemTime, RekorError> {
        let cert = fulcio_cert_der();
        verify_set(
            keys,
            set,
            Signer::Certificate { der: &cert },
            signature,
            payload,
        )
    }

    /// (payload, signature, annotations) of a `dir-img-cosign-*/signature-N` file.
    fn cosign_signature(path: &str) -> (Vec<u8>, Vec<u8>, Value) {
        let raw = fixture(path);
        let body = raw.strip_prefix(b"\0sigstore-json\n").unwrap();
        let json: Value = serde_json::from_slice(body).unwrap();
        let payload = b64(json["payload"].as_str().unwrap());
        let annotations = json["annotations"].clone();
        let signature = b64(annotations["dev.cosignproject.cosign/signature"]
            .as_str()
            .unwrap());
        (payload, signature, annotations)
    }

    #[test]
    fn rekor_set_verifies_with_rekor_key_in_any_position() {
        let (rekor, cosign) = (key("rekor.pub"), key("cosign.pub"));
        let signature = b64(fixture("rekor-sig"));
        for keys in [
            vec![rekor.clone()],
            vec![rekor.clone(), cosign.clone()],
            vec![cosign.clone(), rekor.clone()],
        ] {
            let time = verify_rekor_set(
                &keys,
                &fixture("rekor-set"),
                &signature,
                &fixture("rekor-payload"),
            )
            .unwrap();
            assert_eq!(time, at(REKOR_SET_TIME));
        }
    }

    #[test]
    fn rekor_set_fails_with_other_keys_or_none() {
        let signature = b64(fixture("rekor-sig"));
        for keys in [vec![key("cosign.pub")], vec![key("some-rsa-key.pub")]] {
            let err = verify_rekor_set(
                &keys,
                &fixture("rekor-set"),
                &signature,
                &fixture("rekor-payload"),
            )
            .unwrap_err();
            assert!(matches!(err, RekorError::SetSignatureInvalid), "{err:?}");
        }
        let err = verify_rekor_set(
            &[],
            &fixture("rekor-set"),
            &signature,
            &fixture("rekor-payload"),
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::NoRekorKeys), "{err:?}");
    }

    #[test]
    fn rekor_set_fails_for_another_payload_or_signature() {
        let keys = [key("rekor.pub")];
        let signature = b64(fixture("rekor-sig"));
        let err = verify_rekor_set(
            &keys,
            &fixture("rekor-set"),
            &signature,
            b"this payload does not match",
        )
        .unwrap_err();
        assert!(
            matches!(err, RekorError::PayloadHashMismatch { .. }),
            "{err:?}"
        );
        let err = verify_rekor_set(
            &keys,
            &fixture("rekor-set"),
            &signature[..signature.len() - 1],
            &fixture("rekor-payload"),
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::SignatureMismatch), "{err:?}");
    }

    #[test]
    fn rekor_set_fails_for_another_signer() {
        let signature = b64(fixture("rekor-sig"));
        let cosign = key("cosign.pub");
        let err = verify_set(
            &[key("rekor.pub")],
            &fixture("rekor-set"),
            Signer::Key(&cosign),
            &signature,
            &fixture("rekor-payload"),
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::SignerMismatch), "{err:?}");
    }

    #[test]
    fn empty_or_non_json_or_reshaped_set_is_refused() {
        let keys = [key("rekor.pub")];
        let signature = b64(fixture("rekor-sig"));
        let payload = fixture("rekor-payload");
        let set: Value = serde_json::from_slice(&fixture("rekor-set")).unwrap();
        let mut extra_top = set.clone();
        extra_top["extra"] = json!(1);
        let mut extra_payload = set.clone();
        extra_payload["Payload"]["extra"] = json!(1);
        let mut missing = set.clone();
        missing["Payload"].as_object_mut().unwrap().remove("logID");
        let mut float_time = set.clone();
        float_time["Payload"]["integratedTime"] = json!(1670870899.0);
        for bad in [
            b"".to_vec(),
            b"this is not a valid SET".to_vec(),
            serde_json::to_vec(&extra_top).unwrap(),
            serde_json::to_vec(&extra_payload).unwrap(),
            serde_json::to_vec(&missing).unwrap(),
            serde_json::to_vec(&float_time).unwrap(),
        ] {
            let err = verify_rekor_set(&keys, &bad, &signature, &payload).unwrap_err();
            assert!(matches!(err, RekorError::MalformedSet(_)), "{err:?}");
        }
        let trailing = [fixture("rekor-set"), b"{}".to_vec()].concat();
        assert!(verify_rekor_set(&keys, &trailing, &signature, &payload).is_err());
        // Whitespace and member order do not matter: the signature is over the
        // canonical form.
        let reordered = format!(
            "{{ \"Payload\" : {}, \"SignedEntryTimestamp\": {} }}\n",
            set["Payload"], set["SignedEntryTimestamp"]
        );
        verify_rekor_set(&keys, reordered.as_bytes(), &signature, &payload).unwrap();
    }

    #[test]
    fn key_rekor_fixture_verifies_with_cosign2_and_rekor_key() {
        let (payload, signature, annotations) =
            cosign_signature("dir-img-cosign-key-rekor-valid/signature-1");
        let bundle = annotations["dev.sigstore.cosign/bundle"].as_str().unwrap();
        let (rekor, cosign, cosign2) = (key("rekor.pub"), key("cosign.pub"), key("cosign2.pub"));
        assert!(cosign2.verify(&payload, &signature));
        for keys in [
            vec![rekor.clone()],
            vec![rekor.clone(), cosign.clone()],
            vec![cosign.clone(), rekor.clone()],
        ] {
            let time = verify_set(
                &keys,
                bundle.as_bytes(),
                Signer::Key(&cosign2),
                &signature,
                &payload,
            )
            .unwrap();
            assert_eq!(time, at(1_674_251_859));
        }
        let err = verify_set(
            std::slice::from_ref(&cosign),
            bundle.as_bytes(),
            Signer::Key(&cosign2),
            &signature,
            &payload,
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::SetSignatureInvalid), "{err:?}");
        let err = verify_set(
            std::slice::from_ref(&rekor),
            bundle.as_bytes(),
            Signer::Key(&cosign),
            &signature,
            &payload,
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::SignerMismatch), "{err:?}");
        let err = verify_set(
            &[rekor],
            b"this is not a valid SET",
            Signer::Key(&cosign2),
            &signature,
            &payload,
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::MalformedSet(_)), "{err:?}");
    }

    #[test]
    fn key_rekor_bundle_does_not_vouch_for_cosign_valid_signature() {
        let (_, _, annotations) = cosign_signature("dir-img-cosign-key-rekor-valid/signature-1");
        let bundle = annotations["dev.sigstore.cosign/bundle"].as_str().unwrap();
        let (payload, signature, _) = cosign_signature("dir-img-cosign-valid/signature-1");
        let cosign = key("cosign.pub");
        let err = verify_set(
            &[key("rekor.pub")],
            bundle.as_bytes(),
            Signer::Key(&cosign),
            &signature,
            &payload,
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::SignatureMismatch), "{err:?}");
    }

    #[test]
    fn fulcio_rekor_fixture_verifies_end_to_end() {
        let (payload, signature, annotations) =
            cosign_signature("dir-img-cosign-fulcio-rekor-valid/signature-1");
        let cert = annotations["dev.sigstore.cosign/certificate"]
            .as_str()
            .unwrap();
        let chain = annotations["dev.sigstore.cosign/chain"].as_str().unwrap();
        let bundle = annotations["dev.sigstore.cosign/bundle"].as_str().unwrap();
        let trust = FulcioTrust {
            roots_pem: fixture("fulcio_v1.crt.pem"),
            oidc_issuer: "https://github.com/login/oauth".into(),
            subject_email: "mitr@redhat.com".into(),
        };
        let cert_der = parse_pem(cert.as_bytes()).unwrap().remove(0).der;
        let time = verify_set(
            &[key("cosign.pub"), key("rekor.pub")],
            bundle.as_bytes(),
            Signer::Certificate { der: &cert_der },
            &signature,
            &payload,
        )
        .unwrap();
        assert_eq!(time, at(1_674_247_893));
        let leaf = verify_fulcio(&trust, cert.as_bytes(), Some(chain.as_bytes()), time).unwrap();
        assert_eq!(leaf.der, cert_der);
        assert!(leaf.key.verify(&payload, &signature));

        // The SET records this leaf, not fulcio-cert.
        let other = fulcio_cert_der();
        let err = verify_set(
            &[key("rekor.pub")],
            bundle.as_bytes(),
            Signer::Certificate { der: &other },
            &signature,
            &payload,
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::SignerMismatch), "{err:?}");
        let wrong_email = FulcioTrust {
            subject_email: "this-does-not-match@example.com".into(),
            ..trust
        };
        assert!(
            verify_fulcio(&wrong_email, cert.as_bytes(), Some(chain.as_bytes()), time).is_err()
        );
    }

    /// A throw-away log key, to sign SETs whose body fields are altered.
    struct TestLog {
        key_pair: EcdsaKeyPair,
        public: PublicKey,
    }

    impl TestLog {
        fn new() -> TestLog {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
            let key_pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            // SPKI header for an uncompressed P-256 point.
            let header =
                hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
            let spki = [&header[..], key_pair.public_key().as_ref()].concat();
            let public = PublicKey::from_spki_der(&spki).unwrap();
            TestLog { key_pair, public }
        }

        /// A SET over `body` (JSON), logged at REKOR_SET_TIME.
        fn sign(&self, body: &[u8]) -> Vec<u8> {
            self.sign_encoded(&b64_encode(body))
        }

        /// A SET whose `Payload.body` is `body` as given (normally base64).
        fn sign_encoded(&self, body: &str) -> Vec<u8> {
            let payload = UntrustedSetPayload {
                body: body.to_string(),
                integrated_time: REKOR_SET_TIME as i64,
                log_index: 1,
                log_id: "00".into(),
            };
            let canonical = payload.canonical_json().unwrap();
            let signature = self
                .key_pair
                .sign(&SystemRandom::new(), &canonical)
                .unwrap();
            serde_json::to_vec(&json!({
                "SignedEntryTimestamp": b64_encode(signature),
                "Payload": {
                    "body": payload.body,
                    "integratedTime": payload.integrated_time,
                    "logIndex": payload.log_index,
                    "logID": payload.log_id,
                },
            }))
            .unwrap()
        }
    }

    /// `rekor-set`'s body, as JSON to alter.
    fn rekor_set_body() -> Value {
        let set: Value = serde_json::from_slice(&fixture("rekor-set")).unwrap();
        serde_json::from_slice(&b64(set["Payload"]["body"].as_str().unwrap())).unwrap()
    }

    #[test]
    fn resigned_rekor_set_body_verifies_unchanged() {
        let log = TestLog::new();
        let set = log.sign(&serde_json::to_vec(&rekor_set_body()).unwrap());
        verify_rekor_set(
            std::slice::from_ref(&log.public),
            &set,
            &b64(fixture("rekor-sig")),
            &fixture("rekor-payload"),
        )
        .unwrap();
        let err = verify_rekor_set(
            &[key("rekor.pub")],
            &set,
            &b64(fixture("rekor-sig")),
            &fixture("rekor-payload"),
        )
        .unwrap_err();
        assert!(matches!(err, RekorError::SetSignatureInvalid), "{err:?}");
    }

    /// Signs `rekor-set`'s body as changed by `alter` with a test log and checks
    /// it against `rekor-set`'s signature, certificate and payload.
    fn verify_altered_body(alter: impl FnOnce(&mut Value)) -> Result<SystemTime, RekorError> {
        let log = TestLog::new();
        let mut body = rekor_set_body();
        alter(&mut body);
        let set = log.sign(&serde_json::to_vec(&body).unwrap());
        verify_rekor_set(
            std::slice::from_ref(&log.public),
            &set,
            &b64(fixture("rekor-sig")),
            &fixture("rekor-payload"),
        )
    }

    fn remove(value: &mut Value, member: &str) {
        value.as_object_mut().unwrap().remove(member);
    }

    #[test]
    fn altered_body_kind_or_version_is_refused() {
        let err = verify_altered_body(|b| b["kind"] = json!("rekord")).unwrap_err();
        assert!(matches!(err, RekorError::WrongKind(Some(_))), "{err:?}");
        let err = verify_altered_body(|b| remove(b, "kind")).unwrap_err();
        assert!(matches!(err, RekorError::WrongKind(None)), "{err:?}");
        let err = verify_altered_body(|b| b["apiVersion"] = json!("0.0.2")).unwrap_err();
        assert!(matches!(err, RekorError::WrongApiVersion(_)), "{err:?}");
        let err = verify_altered_body(|b| *b = json!("not an object")).unwrap_err();
        assert!(matches!(err, RekorError::MalformedBody(_)), "{err:?}");
    }

    #[test]
    fn altered_body_missing_fields_are_refused() {
        type Alteration = fn(&mut Value);
        let cases: [(&str, Alteration); 8] = [
            ("spec", |b| remove(b, "spec")),
            ("spec.signature", |b| remove(&mut b["spec"], "signature")),
            ("spec.signature.content", |b| {
                remove(&mut b["spec"]["signature"], "content")
            }),
            ("spec.signature.publicKey", |b| {
                remove(&mut b["spec"]["signature"], "publicKey")
            }),
            ("spec.data", |b| remove(&mut b["spec"], "data")),
            ("spec.data.hash", |b| remove(&mut b["spec"]["data"], "hash")),
            ("spec.data.hash.algorithm", |b| {
                remove(&mut b["spec"]["data"]["hash"], "algorithm")
            }),
            ("spec.data.hash.value", |b| {
                remove(&mut b["spec"]["data"]["hash"], "value")
            }),
        ];
        for (field, alter) in cases {
            let err = verify_altered_body(alter).unwrap_err();
            assert!(
                matches!(err, RekorError::MissingField(f) if f == field),
                "{field}: {err:?}"
            );
        }
    }

    #[test]
    fn altered_body_signature_is_refused() {
        let err =
            verify_altered_body(|b| b["spec"]["signature"]["content"] = json!("%%%")).unwrap_err();
        assert!(matches!(err, RekorError::Base64 { .. }), "{err:?}");
        let err = verify_altered_body(|b| {
            let content = b["spec"]["signature"]["content"].as_str().unwrap();
            // Drop the last base64 quantum: valid base64 of a truncated signature.
            let truncated = content[..content.len() - 4].to_string();
            b["spec"]["signature"]["content"] = json!(truncated);
        })
        .unwrap_err();
        assert!(matches!(err, RekorError::SignatureMismatch), "{err:?}");
    }

    #[test]
    fn altered_body_public_key_is_refused() {
        let err = verify_altered_body(|b| {
            b["spec"]["signature"]["publicKey"]["content"] = json!(b64_encode(b"not PEM"))
        })
        .unwrap_err();
        assert!(matches!(err, RekorError::PublicKeyNotPem(_)), "{err:?}");
        let err = verify_altered_body(|b| {
            let content = &mut b["spec"]["signature"]["publicKey"]["content"];
            let pem = b64(content.as_str().unwrap());
            *content = json!(b64_encode([&pem[..], &pem[..]].concat()));
        })
        .unwrap_err();
        assert!(matches!(err, RekorError::PublicKeyBlocks(2)), "{err:?}");
        let err = verify_altered_body(|b| {
            b["spec"]["signature"]["publicKey"]["content"] =
                json!(b64_encode(fixture("cosign.pub")))
        })
        .unwrap_err();
        assert!(matches!(err, RekorError::SignerMismatch), "{err:?}");
    }

    #[test]
    fn altered_body_hash_is_refused() {
        let err = verify_altered_body(|b| b["spec"]["data"]["hash"]["algorithm"] = json!("sha512"))
            .unwrap_err();
        assert!(
            matches!(err, RekorError::UnsupportedHashAlgorithm(_)),
            "{err:?}"
        );
        let err = verify_altered_body(|b| {
            let value = &mut b["spec"]["data"]["hash"]["value"];
            *value = json!(value.as_str().unwrap().to_uppercase());
        })
        .unwrap_err();
        assert!(
            matches!(err, RekorError::PayloadHashMismatch { .. }),
            "{err:?}"
        );
        let err =
            verify_altered_body(|b| b["spec"]["data"]["hash"]["value"] = json!(1)).unwrap_err();
        assert!(matches!(err, RekorError::MalformedBody(_)), "{err:?}");
    }

    #[test]
    fn set_body_not_json_or_not_base64_is_refused() {
        let log = TestLog::new();
        let (signature, payload) = (b64(fixture("rekor-sig")), fixture("rekor-payload"));
        let keys = std::slice::from_ref(&log.public);
        let err = verify_rekor_set(keys, &log.sign(b"not JSON"), &signature, &payload).unwrap_err();
        assert!(matches!(err, RekorError::MalformedBody(_)), "{err:?}");
        let set = log.sign_encoded("not base64!");
        let err = verify_rekor_set(keys, &set, &signature, &payload).unwrap_err();
        assert!(
            matches!(
                err,
                RekorError::Base64 {
                    field: "Payload.body",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn canonical_json_escapes_like_rfc8785() {
        let payload = UntrustedSetPayload {
            body: "a\"b\\c\u{1}\n\u{7f}é/".into(),
            integrated_time: 1,
            log_index: -2,
            log_id: "x".into(),
        };
        assert_eq!(
            String::from_utf8(payload.canonical_json().unwrap()).unwrap(),
            "{\"body\":\"a\\\"b\\\\c\\u0001\\n\u{7f}é/\",\"integratedTime\":1,\"logID\":\"x\",\"logIndex\":-2}"
        );
        let too_big = UntrustedSetPayload {
            log_index: 1 << 60,
            ..payload
        };
        assert!(matches!(
            too_big.canonical_json(),
            Err(RekorError::OutOfRange("logIndex"))
        ));
    }
}
