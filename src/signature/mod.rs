//! Image signatures: policy.json's `signedBy` (GPG simple signing) and
//! `sigstoreSigned` (cosign-style) requirements, checked against the platform manifest
//! that was pulled, before anything of the image is written.
//!
//! - [`requirement`]: the requirements as policy.json states them.
//! - [`registries_d`]: where signatures are read from (lookaside, registry attachments).
//! - [`fetch`]: reading them.
//! - [`verify`]: the verdict, in containers/image's order: the cryptographic signature,
//!   the signer is trusted, the payload parses, its manifest digest is the pulled one,
//!   its name satisfies `signedIdentity`.
//! - [`gpg`], [`keys`], [`x509`], [`rekor`], [`payload`], [`identity`]: the pieces.

pub mod fetch;
pub mod gpg;
pub mod identity;
pub mod keys;
pub mod payload;
pub mod registries_d;
pub mod rekor;
pub mod requirement;
pub mod verify;
pub mod x509;

use crate::digest::Digest;
use crate::reference::Reference;
use crate::trust_policy::{Pending, Refusal, Requirement};
use base64::Engine;
use registries_d::SignatureSources;
use std::collections::BTreeMap;
use std::time::SystemTime;
use verify::{Rejection, Subject};

/// The media type of a cosign signature payload; other attachments are not signatures.
pub const SIGSTORE_PAYLOAD_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Annotations of a sigstore signature.
pub const ANNOTATION_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
pub const ANNOTATION_BUNDLE: &str = "dev.sigstore.cosign/bundle";
pub const ANNOTATION_CERTIFICATE: &str = "dev.sigstore.cosign/certificate";
pub const ANNOTATION_CHAIN: &str = "dev.sigstore.cosign/chain";

/// One signature as stored, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// An OpenPGP message (GPG simple signing).
    SimpleSigning(Vec<u8>),
    /// A sigstore signature: payload bytes plus annotations.
    Sigstore {
        mime_type: String,
        payload: Vec<u8>,
        annotations: BTreeMap<String, String>,
    },
}

impl Signature {
    /// Reads one stored signature (a lookaside `signature-N` file): `\0` + a format
    /// name + LF + the body, or, for compatibility, an untagged OpenPGP message.
    pub fn from_stored(bytes: &[u8]) -> Result<Signature, String> {
        let Some(tagged) = bytes.strip_prefix(b"\0") else {
            return Ok(Signature::SimpleSigning(bytes.to_vec()));
        };
        let Some(lf) = tagged.iter().position(|b| *b == b'\n') else {
            return Err("a tagged signature without a format line".into());
        };
        let (name, body) = (&tagged[..lf], &tagged[lf + 1..]);
        if !name.iter().all(|b| (0x20..=0x7e).contains(b)) {
            return Err("a signature format name with non-printable bytes".into());
        }
        match name {
            b"simple-signing" => Ok(Signature::SimpleSigning(body.to_vec())),
            b"sigstore-json" => Self::from_sigstore_json(body),
            other => Err(format!(
                "unknown signature format {:?}",
                String::from_utf8_lossy(other)
            )),
        }
    }

    fn from_sigstore_json(body: &[u8]) -> Result<Signature, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        struct Json {
            mime_type: String,
            payload: String,
            annotations: BTreeMap<String, String>,
        }
        let json: Json = serde_json::from_slice(body)
            .map_err(|e| format!("a sigstore-json signature that does not parse: {e}"))?;
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&json.payload)
            .map_err(|e| format!("a sigstore-json payload that is not base64: {e}"))?;
        Ok(Signature::Sigstore {
            mime_type: json.mime_type,
            payload,
            annotations: json.annotations,
        })
    }
}

/// Why [`enforce`] did not accept an image.
#[derive(Debug)]
pub enum EnforceError {
    /// A requirement was not met: the verdict.
    Refused(Refusal),
    /// The signatures could not be read: no verdict.
    Unreadable(fetch::FetchError),
}

/// The manifest to verify: the platform manifest pulled, and the index it was
/// chosen from, if any (named when a signature is missing, since signing only the
/// index is the usual mistake).
#[derive(Debug, Clone, Copy)]
pub struct Pulled<'a> {
    pub digest: &'a Digest,
    pub manifest: &'a [u8],
    pub index: Option<&'a Digest>,
}

/// Checks every pending signature requirement for the `pulled` manifest of
/// `image`: reads the signatures once, then each requirement must accept one of
/// them. Returns a description of what was accepted, for the log.
pub async fn enforce(
    pending: &Pending,
    sources: &SignatureSources,
    registry: &fetch::Registry<'_>,
    image: &Reference,
    pulled: Pulled<'_>,
) -> Result<Vec<String>, EnforceError> {
    let Pulled {
        digest,
        manifest,
        index,
    } = pulled;
    let refusal = |requirement: &Requirement, why: String| Refusal {
        image: image.to_string(),
        path: pending.path.clone(),
        scope: pending.scope.clone(),
        requirement: requirement.clone(),
        verdict: Some(Box::new((digest.to_string(), why))),
    };
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let fetched = fetch::fetch(sources, registry, digest)
        .await
        .map_err(EnforceError::Unreadable)?;
    tracing::debug!(
        image = %image,
        manifest = %digest,
        signatures = fetched.signatures.len(),
        unreadable = fetched.unreadable.len(),
        "signatures read"
    );
    let subject = Subject { image, manifest };
    let now = SystemTime::now();
    let mut accepted = Vec::new();
    for requirement in &pending.requirements {
        let verdict = match requirement {
            Requirement::SignedBy(r) => verify::signed_by(r, subject, &fetched.signatures, now)
                .map(|signer| format!("signedBy: key {signer}")),
            Requirement::SigstoreSigned(r) => {
                verify::sigstore_signed(r, subject, &fetched.signatures, now)
                    .map(|()| "sigstoreSigned".to_string())
            }
            // check() refuses the others before any registry is contacted.
            other => Err(Rejection::Config(format!("{other} cannot be verified"))),
        };
        match verdict {
            Ok(what) => accepted.push(what),
            Err(rejection) => {
                let mut why = rejection.to_string();
                if matches!(rejection, Rejection::NoSignature) {
                    why.push_str(&format!(" (looked in: {})", fetched.looked_in.join("; ")));
                    if !fetched.unreadable.is_empty() {
                        why.push_str(&format!("; unreadable: {}", fetched.unreadable.join("; ")));
                    }
                    if let Some(index) = index {
                        why.push_str(&format!(
                            "; the platform manifest {digest} must be signed, not only the \
                             index {index} (cosign sign --recursive and skopeo copy --all \
                             --sign-by sign both)"
                        ));
                    }
                }
                return Err(EnforceError::Refused(refusal(requirement, why)));
            }
        }
    }
    Ok(accepted)
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! The containers/image signature fixtures in `../shared/fixtures`.
    use std::path::PathBuf;

    pub fn path(name: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/containers-image-signature"
        ))
        .join(name)
    }

    pub fn read(name: &str) -> Vec<u8> {
        let path = path(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Fuzzing what a registry or lookaside hands us (stored signatures, payloads,
        // signed names): never a panic, and a verdict only through the real checks.
        #[test]
        fn stored_signatures_and_payloads_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            text in "\\PC{0,120}",
            signed in "[a-zA-Z0-9._:/@-]{0,60}",
        ) {
            let _ = Signature::from_stored(&bytes);
            let mut tagged = b"\0sigstore-json\n".to_vec();
            tagged.extend_from_slice(text.as_bytes());
            let _ = Signature::from_stored(&tagged);
            let _ = payload::parse(text.as_bytes(), payload::Kind::Sigstore);
            let _ = payload::parse(&bytes, payload::Kind::SimpleSigning);
            let image = Reference::parse("quay.io/team/app:1").unwrap();
            for identity in [
                identity::SignedIdentity::MatchExact,
                identity::SignedIdentity::MatchRepoDigestOrExact,
                identity::SignedIdentity::MatchRepository,
                identity::SignedIdentity::ExactReference(signed.clone()),
                identity::SignedIdentity::ExactRepository(signed.clone()),
                identity::SignedIdentity::RemapIdentity { prefix: "quay.io".into(), signed_prefix: signed.clone() },
            ] {
                let _ = identity.matches(&image, &signed);
            }
        }
    }

    #[test]
    fn stored_formats() {
        let cosign =
            Signature::from_stored(&fixtures::read("dir-img-cosign-valid/signature-1")).unwrap();
        let Signature::Sigstore {
            mime_type,
            payload,
            annotations,
        } = cosign
        else {
            panic!("not sigstore");
        };
        assert_eq!(mime_type, SIGSTORE_PAYLOAD_TYPE);
        assert!(payload.starts_with(b"{\"critical\""));
        assert!(annotations.contains_key(ANNOTATION_SIGNATURE));
        // A trailing LF after the JSON is accepted.
        assert!(matches!(
            Signature::from_stored(&fixtures::read("unknown-cosign-key.signature")),
            Ok(Signature::Sigstore { .. })
        ));
        let gpg = Signature::from_stored(&fixtures::read("image.signature")).unwrap();
        assert!(matches!(gpg, Signature::SimpleSigning(ref b) if b[0] == 0xa3));
        assert_eq!(
            Signature::from_stored(b"\0simple-signing\n\xa3x").unwrap(),
            Signature::SimpleSigning(b"\xa3x".to_vec())
        );
        for bad in [
            &b"\0unknown\n{}"[..],
            b"\0sigstore-json",
            b"\0sig\x01\n{}",
            b"\0sigstore-json\n{}",
        ] {
            assert!(Signature::from_stored(bad).is_err(), "{bad:?}");
        }
    }
}
