//! The verdict of one requirement over the signatures found for one manifest. One
//! accepted signature satisfies a requirement; when none is, the reason for each is
//! given, so an operator can tell "unsigned" from "signed by someone else" from
//! "signed for another image".

use super::gpg::{self, GpgKeyring};
use super::keys::PublicKey;
use super::payload::{self, Kind};
use super::requirement::{Material, SignedBy, SigstoreSigned, SigstoreTrust};
use super::x509::{self, FulcioTrust, PkiTrust};
use super::{
    rekor, Signature, ANNOTATION_BUNDLE, ANNOTATION_CERTIFICATE, ANNOTATION_CHAIN,
    ANNOTATION_SIGNATURE, SIGSTORE_PAYLOAD_TYPE,
};
use crate::reference::Reference;
use base64::Engine;
use sha2::{Digest as _, Sha256, Sha512};
use std::time::SystemTime;

/// What is being verified: the image as asked for and the manifest that was pulled.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub image: &'a Reference,
    /// The exact manifest bytes (the platform manifest, not an index).
    pub manifest: &'a [u8],
}

/// Why a requirement was not met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The requirement's own configuration is unusable (a key file that cannot be
    /// read or holds no key).
    Config(String),
    /// No signature of the kind the requirement reads.
    NoSignature,
    /// Signatures exist; none was accepted, each for the reason given.
    NoneAccepted(Vec<String>),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Config(why) => write!(f, "cannot be checked: {why}"),
            Rejection::NoSignature => f.write_str("no signature found"),
            Rejection::NoneAccepted(reasons) => {
                write!(f, "none of {} signature(s) was accepted: ", reasons.len())?;
                for (i, r) in reasons.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "#{}: {r}", i + 1)?;
                }
                Ok(())
            }
        }
    }
}

/// Checks a `signedBy` requirement. Returns the accepted signer's fingerprint.
pub fn signed_by(
    req: &SignedBy,
    subject: Subject<'_>,
    signatures: &[Signature],
    now: SystemTime,
) -> Result<String, Rejection> {
    if req.key_type != "GPGKeys" {
        // containers/image implements no other key type either.
        return Err(Rejection::Config(format!(
            "keyType {} is not implemented (only GPGKeys is)",
            req.key_type
        )));
    }
    let sources = req.keys.read().map_err(Rejection::Config)?;
    let keyring = GpgKeyring::parse(&sources)
        .map_err(|e| Rejection::Config(format!("{} holds no usable key: {e}", req.keys)))?;
    let mut reasons = Vec::new();
    for sig in signatures {
        let Signature::SimpleSigning(message) = sig else {
            continue;
        };
        let checked = gpg::verify(&keyring, message, now)
            .map_err(|e| e.to_string())
            .and_then(|v| {
                let claim =
                    payload::parse(&v.payload, Kind::SimpleSigning).map_err(|e| e.to_string())?;
                check_claim(
                    req.identity_matches(subject.image, &claim.docker_reference),
                    &claim,
                    subject,
                )?;
                Ok(v.signer)
            });
        match checked {
            Ok(signer) => return Ok(signer),
            Err(why) => reasons.push(why),
        }
    }
    if reasons.is_empty() {
        Err(Rejection::NoSignature)
    } else {
        Err(Rejection::NoneAccepted(reasons))
    }
}

impl SignedBy {
    fn identity_matches(&self, image: &Reference, signed: &str) -> Result<(), String> {
        identity_check(&self.identity, image, signed)
    }
}

fn identity_check(
    identity: &super::identity::SignedIdentity,
    image: &Reference,
    signed: &str,
) -> Result<(), String> {
    if identity.matches(image, signed) {
        Ok(())
    } else {
        Err(format!(
            "signed for {signed:?}, which signedIdentity {identity} does not accept for {image}"
        ))
    }
}

/// The digest and identity checks shared by both kinds; the identity result is
/// computed by the caller so each kind names its own identity rule.
fn check_claim(
    identity: Result<(), String>,
    claim: &payload::Claim,
    subject: Subject<'_>,
) -> Result<(), String> {
    if !digest_matches(&claim.manifest_digest, subject.manifest) {
        return Err(format!(
            "signed manifest digest {} is not the pulled manifest's {}",
            claim.manifest_digest,
            crate::digest::Digest::of(subject.manifest)
        ));
    }
    identity
}

/// Whether `claimed` (`algorithm:hex`) is the digest of `manifest`.
fn digest_matches(claimed: &str, manifest: &[u8]) -> bool {
    match claimed.split_once(':') {
        Some(("sha256", hex)) => hex == hex::encode(Sha256::digest(manifest)),
        Some(("sha512", hex)) => hex == hex::encode(Sha512::digest(manifest)),
        _ => false,
    }
}

/// The keys, CA or PKI a `sigstoreSigned` requirement trusts, read once per check.
enum Trust {
    Keys(Vec<PublicKey>),
    Fulcio(FulcioTrust),
    Pki(PkiTrust),
}

fn read_one(material: &Material) -> Result<Vec<u8>, String> {
    let mut all = material.read()?;
    if all.len() != 1 {
        return Err(format!("{material}: exactly one source expected"));
    }
    Ok(all.remove(0))
}

fn load_trust(req: &SigstoreSigned) -> Result<(Trust, Option<Vec<PublicKey>>), String> {
    let trust = match &req.trust {
        SigstoreTrust::Keys(material) => {
            let mut keys = Vec::new();
            for source in material.read()? {
                keys.extend(
                    PublicKey::all_from_pem(&source).map_err(|e| format!("{material}: {e}"))?,
                );
            }
            Trust::Keys(keys)
        }
        SigstoreTrust::Fulcio {
            ca,
            oidc_issuer,
            subject_email,
        } => Trust::Fulcio(FulcioTrust {
            roots_pem: read_one(ca)?,
            oidc_issuer: oidc_issuer.clone(),
            subject_email: subject_email.clone(),
        }),
        SigstoreTrust::Pki {
            roots,
            intermediates,
            subject_email,
            subject_hostname,
        } => Trust::Pki(PkiTrust {
            roots_pem: read_one(roots)?,
            intermediates_pem: intermediates.as_ref().map(read_one).transpose()?,
            subject_email: subject_email.clone(),
            subject_hostname: subject_hostname.clone(),
        }),
    };
    let rekor = match &req.rekor_keys {
        None => None,
        Some(material) => {
            let mut keys = Vec::new();
            for source in material.read()? {
                keys.extend(
                    PublicKey::all_from_pem(&source)
                        .map_err(|e| format!("Rekor key {material}: {e}"))?,
                );
            }
            if let Some(bad) = keys.iter().find(|k| !k.is_ecdsa()) {
                let _ = bad;
                return Err(format!("Rekor key {material}: Rekor keys must be ECDSA"));
            }
            Some(keys)
        }
    };
    Ok((trust, rekor))
}

/// Checks a `sigstoreSigned` requirement.
pub fn sigstore_signed(
    req: &SigstoreSigned,
    subject: Subject<'_>,
    signatures: &[Signature],
    now: SystemTime,
) -> Result<(), Rejection> {
    let (trust, rekor) = load_trust(req).map_err(Rejection::Config)?;
    let mut reasons = Vec::new();
    for sig in signatures {
        let Signature::Sigstore {
            mime_type,
            payload,
            annotations,
        } = sig
        else {
            continue;
        };
        // Other attachments (SBOMs, attestations) are not signatures.
        if mime_type != SIGSTORE_PAYLOAD_TYPE {
            continue;
        }
        match one_sigstore(
            req,
            &trust,
            rekor.as_deref(),
            subject,
            payload,
            annotations,
            now,
        ) {
            Ok(()) => return Ok(()),
            Err(why) => reasons.push(why),
        }
    }
    if reasons.is_empty() {
        Err(Rejection::NoSignature)
    } else {
        Err(Rejection::NoneAccepted(reasons))
    }
}

fn one_sigstore(
    req: &SigstoreSigned,
    trust: &Trust,
    rekor_keys: Option<&[PublicKey]>,
    subject: Subject<'_>,
    payload: &[u8],
    annotations: &std::collections::BTreeMap<String, String>,
    now: SystemTime,
) -> Result<(), String> {
    let encoded = annotations
        .get(ANNOTATION_SIGNATURE)
        .ok_or("no dev.cosignproject.cosign/signature annotation")?;
    // Line breaks inside the base64 are tolerated, as Go's decoder does.
    let cleaned: String = encoded
        .chars()
        .filter(|c| *c != '\n' && *c != '\r')
        .collect();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(cleaned)
        .map_err(|e| format!("the signature annotation is not base64: {e}"))?;
    let bundle = annotations.get(ANNOTATION_BUNDLE);
    let certificate = annotations.get(ANNOTATION_CERTIFICATE);
    let chain = annotations.get(ANNOTATION_CHAIN).map(String::as_bytes);
    match trust {
        Trust::Keys(keys) => {
            let key = keys
                .iter()
                .find(|k| k.verify(payload, &raw))
                .ok_or("not signed by any configured key")?;
            if let Some(rekor_keys) = rekor_keys {
                let bundle = bundle.ok_or(
                    "no Rekor bundle (dev.sigstore.cosign/bundle), and the policy requires one",
                )?;
                rekor::verify_set(
                    rekor_keys,
                    bundle.as_bytes(),
                    rekor::Signer::Key(key),
                    &raw,
                    payload,
                )
                .map_err(|e| format!("Rekor bundle: {e}"))?;
            }
        }
        Trust::Fulcio(fulcio) => {
            let certificate =
                certificate.ok_or("no certificate (dev.sigstore.cosign/certificate)")?;
            let rekor_keys = rekor_keys.ok_or("Fulcio trust needs a Rekor key")?;
            let bundle = bundle.ok_or("no Rekor bundle (dev.sigstore.cosign/bundle)")?;
            let pem = certificate.as_bytes();
            let leaf_der =
                first_pem_der(pem).ok_or("the certificate annotation holds no PEM certificate")?;
            let integrated = rekor::verify_set(
                rekor_keys,
                bundle.as_bytes(),
                rekor::Signer::Certificate { der: &leaf_der },
                &raw,
                payload,
            )
            .map_err(|e| format!("Rekor bundle: {e}"))?;
            let leaf = x509::verify_fulcio(fulcio, pem, chain, integrated)
                .map_err(|e| format!("certificate: {e}"))?;
            if !leaf.key.verify(payload, &raw) {
                return Err("the signature does not verify with the certificate's key".into());
            }
        }
        Trust::Pki(pki) => {
            let certificate =
                certificate.ok_or("no certificate (dev.sigstore.cosign/certificate)")?;
            let leaf = x509::verify_pki(pki, certificate.as_bytes(), chain, now)
                .map_err(|e| format!("certificate: {e}"))?;
            if !leaf.key.verify(payload, &raw) {
                return Err("the signature does not verify with the certificate's key".into());
            }
        }
    }
    let claim = payload::parse(payload, Kind::Sigstore).map_err(|e| e.to_string())?;
    check_claim(
        identity_check(&req.identity, subject.image, &claim.docker_reference),
        &claim,
        subject,
    )
}

/// The DER of the first PEM `CERTIFICATE` block in `pem`.
fn first_pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let start = text.find(begin)? + begin.len();
    let end = start + text[start..].find("-----END CERTIFICATE-----")?;
    let body: String = text[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::super::fixtures;
    use super::super::identity::SignedIdentity;
    use super::*;

    fn stored(dir: &str) -> Vec<Signature> {
        (1..)
            .map_while(|n| std::fs::read(fixtures::path(&format!("{dir}/signature-{n}"))).ok())
            .map(|b| Signature::from_stored(&b).unwrap())
            .collect()
    }

    fn manifest(dir: &str) -> Vec<u8> {
        fixtures::read(&format!("{dir}/manifest.json"))
    }

    fn gpg_req(keys: &[&str], identity: SignedIdentity) -> SignedBy {
        SignedBy {
            key_type: "GPGKeys".into(),
            keys: Material::Paths(keys.iter().map(|k| fixtures::path(k)).collect()),
            identity,
        }
    }

    fn gpg_verdict(dir: &str, image: &str, req: &SignedBy) -> Result<String, Rejection> {
        let image = Reference::parse(image).unwrap();
        let m = manifest(dir);
        signed_by(
            req,
            Subject {
                image: &image,
                manifest: &m,
            },
            &stored(dir),
            SystemTime::now(),
        )
    }

    #[test]
    fn gpg_directories_get_upstream_verdicts() {
        let exact = gpg_req(&["public-key.gpg"], SignedIdentity::MatchExact);
        let image = "testing/manifest:latest";
        for dir in ["dir-img-valid", "dir-img-valid-2", "dir-img-mixed"] {
            assert_eq!(
                gpg_verdict(dir, image, &exact),
                Ok("08CD26E446E2E95249B7A405E932F44B23E8DD43".to_string()),
                "{dir}"
            );
        }
        for keys in [
            &["public-key-1.gpg", "public-key-1.gpg"][..],
            &["public-key-2.gpg", "public-key-1.gpg"],
        ] {
            assert!(gpg_verdict(
                "dir-img-valid",
                image,
                &gpg_req(keys, SignedIdentity::MatchExact)
            )
            .is_ok());
        }
        let inline = SignedBy {
            keys: Material::Data(vec![fixtures::read("public-key.gpg")]),
            ..exact.clone()
        };
        assert!(gpg_verdict("dir-img-valid", image, &inline).is_ok());
        assert!(matches!(
            gpg_verdict(
                "dir-img-valid",
                image,
                &SignedBy {
                    keys: Material::Data(vec![b"nonsense".to_vec()]),
                    ..exact.clone()
                }
            ),
            Err(Rejection::Config(_))
        ));
        // Identity and digest mismatches.
        let why = gpg_verdict("dir-img-valid", "testing/manifest:notlatest", &exact)
            .unwrap_err()
            .to_string();
        assert!(why.contains("signedIdentity matchExact"), "{why}");
        let other = gpg_req(
            &["public-key.gpg"],
            SignedIdentity::ExactReference("this/does-not:match".into()),
        );
        assert!(gpg_verdict("dir-img-valid", image, &other).is_err());
        let why = gpg_verdict("dir-img-modified-manifest", image, &exact)
            .unwrap_err()
            .to_string();
        assert!(why.contains("is not the pulled manifest's"), "{why}");
        assert!(gpg_verdict("dir-img-manifest-digest-error", image, &exact).is_err());
        assert_eq!(
            gpg_verdict("dir-img-unsigned", image, &exact),
            Err(Rejection::NoSignature)
        );
        let subkey = gpg_req(&["public-key-with-subkey.gpg"], SignedIdentity::MatchExact);
        assert_eq!(
            gpg_verdict("dir-img-valid-subkey", image, &subkey),
            Ok("B9F4CDB9FD8C475BFA340AC38D54A947EE396F36".to_string())
        );
        // A sigstore requirement finds no sigstore signature among GPG ones.
        let sigstore = SigstoreSigned {
            trust: SigstoreTrust::Keys(Material::Paths(vec![fixtures::path("cosign.pub")])),
            rekor_keys: None,
            identity: SignedIdentity::MatchRepository,
        };
        let image_ref = Reference::parse(image).unwrap();
        let m = manifest("dir-img-valid");
        assert_eq!(
            sigstore_signed(
                &sigstore,
                Subject {
                    image: &image_ref,
                    manifest: &m
                },
                &stored("dir-img-valid"),
                SystemTime::now()
            ),
            Err(Rejection::NoSignature)
        );
    }

    #[test]
    fn standalone_gpg_signatures() {
        let req = gpg_req(&["public-key.gpg"], SignedIdentity::MatchRepoDigestOrExact);
        let image = Reference::parse("testing/manifest:latest").unwrap();
        let m = fixtures::read("image.manifest.json");
        let verdict = |file: &str, req: &SignedBy| {
            let sig = Signature::from_stored(&fixtures::read(file)).unwrap();
            signed_by(
                req,
                Subject {
                    image: &image,
                    manifest: &m,
                },
                &[sig],
                SystemTime::now(),
            )
        };
        // image.signature names `testing/manifest` without a tag: good for a digest
        // reference or matchRepository only.
        let repo = gpg_req(&["public-key.gpg"], SignedIdentity::MatchRepository);
        assert!(verdict("image.signature", &repo).is_ok());
        assert!(verdict("image.signature", &req).is_err());
        for bad in [
            "invalid-reference.signature",
            "invalid-blob.signature",
            "corrupt.signature",
            "expired.signature",
            "unknown-key.signature",
            "unsigned-literal.signature",
            "unsigned-encrypted.signature",
        ] {
            assert!(verdict(bad, &repo).is_err(), "{bad}");
        }
        let unknown = verdict("unknown-key.signature", &repo)
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("5F9470E3BC6C3B55"), "{unknown}");
        let empty = SignedBy {
            keys: Material::Data(vec![]),
            ..repo.clone()
        };
        assert!(verdict("image.signature", &empty).is_err());
        let unexpected = b"unexpected manifest".to_vec();
        let sig = Signature::from_stored(&fixtures::read("image.signature")).unwrap();
        assert!(signed_by(
            &repo,
            Subject {
                image: &image,
                manifest: &unexpected
            },
            &[sig],
            SystemTime::now()
        )
        .is_err());
    }

    fn cosign_req(keys: &[&str], identity: SignedIdentity) -> SigstoreSigned {
        SigstoreSigned {
            trust: SigstoreTrust::Keys(Material::Paths(
                keys.iter().map(|k| fixtures::path(k)).collect(),
            )),
            rekor_keys: None,
            identity,
        }
    }

    fn cosign_verdict(dir: &str, image: &str, req: &SigstoreSigned) -> Result<(), Rejection> {
        let image = Reference::parse(image).unwrap();
        let m = std::fs::read(fixtures::path(&format!("{dir}/manifest.json"))).unwrap_or_default();
        sigstore_signed(
            req,
            Subject {
                image: &image,
                manifest: &m,
            },
            &stored(dir),
            SystemTime::now(),
        )
    }

    const SAMPLE: &str = "192.168.64.2:5000/cosign-signed-single-sample";

    #[test]
    fn cosign_key_directories_get_upstream_verdicts() {
        let repo = cosign_req(&["cosign.pub"], SignedIdentity::MatchRepository);
        for dir in [
            "dir-img-cosign-valid",
            "dir-img-cosign-valid-2",
            "dir-img-cosign-mixed",
        ] {
            assert_eq!(cosign_verdict(dir, SAMPLE, &repo), Ok(()), "{dir}");
        }
        for keys in [
            &["cosign.pub", "cosign2.pub"][..],
            &["cosign2.pub", "cosign.pub"],
        ] {
            assert_eq!(
                cosign_verdict(
                    "dir-img-cosign-valid",
                    SAMPLE,
                    &cosign_req(keys, SignedIdentity::MatchRepository)
                ),
                Ok(())
            );
        }
        let inline = SigstoreSigned {
            trust: SigstoreTrust::Keys(Material::Data(vec![
                fixtures::read("cosign2.pub"),
                fixtures::read("cosign.pub"),
            ])),
            ..repo.clone()
        };
        assert_eq!(
            cosign_verdict("dir-img-cosign-valid", SAMPLE, &inline),
            Ok(())
        );
        // Rejections.
        let exact = cosign_req(&["cosign.pub"], SignedIdentity::MatchExact);
        assert!(cosign_verdict("dir-img-cosign-valid", SAMPLE, &exact).is_err());
        assert!(
            cosign_verdict("dir-img-cosign-valid", "testing/manifest:notlatest", &repo).is_err()
        );
        assert!(cosign_verdict("dir-img-cosign-valid-2", "this/does-not:match", &repo).is_err());
        let other_key = cosign_req(&["cosign2.pub"], SignedIdentity::MatchRepository);
        let why = cosign_verdict("dir-img-cosign-valid", SAMPLE, &other_key)
            .unwrap_err()
            .to_string();
        assert!(why.contains("not signed by any configured key"), "{why}");
        let why = cosign_verdict("dir-img-cosign-modified-manifest", SAMPLE, &repo)
            .unwrap_err()
            .to_string();
        assert!(why.contains("is not the pulled manifest's"), "{why}");
        assert!(cosign_verdict("dir-img-cosign-manifest-digest-error", SAMPLE, &repo).is_err());
        assert!(cosign_verdict("dir-img-cosign-no-manifest", SAMPLE, &repo).is_err());
        assert_eq!(
            cosign_verdict(
                "dir-img-cosign-other-attachment",
                "testing/manifest:latest",
                &repo
            ),
            Err(Rejection::NoSignature)
        );
        let tagged = cosign_req(&["cosign.pub"], SignedIdentity::MatchExact);
        assert_eq!(
            cosign_verdict(
                "dir-img-cosign-valid-with-tag",
                "192.168.64.2:5000/skopeo-signed:tag",
                &tagged
            ),
            Ok(())
        );
        assert!(cosign_verdict(
            "dir-img-cosign-valid-with-tag",
            "192.168.64.2:5000/skopeo-signed:othertag",
            &tagged
        )
        .is_err());
        // A key + Rekor requirement refuses a signature without a matching SET.
        let with_rekor = SigstoreSigned {
            rekor_keys: Some(Material::Paths(vec![fixtures::path("rekor.pub")])),
            ..cosign_req(
                &["cosign.pub", "cosign2.pub"],
                SignedIdentity::MatchRepository,
            )
        };
        assert!(cosign_verdict("dir-img-cosign-valid", SAMPLE, &with_rekor).is_err());
    }

    #[test]
    fn tampered_signature_annotations_are_refused() {
        let repo = cosign_req(&["cosign.pub"], SignedIdentity::MatchRepository);
        let image = Reference::parse(SAMPLE).unwrap();
        let m = manifest("dir-img-cosign-valid");
        let Signature::Sigstore {
            mime_type,
            payload,
            annotations,
        } = stored("dir-img-cosign-valid").remove(0)
        else {
            panic!()
        };
        let good = annotations[ANNOTATION_SIGNATURE].clone();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&good)
            .unwrap();
        for value in [
            format!("{good}="),
            good[..good.len() - 1].to_string(),
            "&".to_string(),
            String::new(),
            b64(b"invalid signature"),
            b64(&[decoded.clone(), decoded.clone()].concat()),
        ] {
            let mut annotations = annotations.clone();
            annotations.insert(ANNOTATION_SIGNATURE.into(), value.clone());
            let sig = Signature::Sigstore {
                mime_type: mime_type.clone(),
                payload: payload.clone(),
                annotations,
            };
            assert!(
                sigstore_signed(
                    &repo,
                    Subject {
                        image: &image,
                        manifest: &m
                    },
                    &[sig],
                    SystemTime::now()
                )
                .is_err(),
                "{value}"
            );
        }
        let sig = Signature::Sigstore {
            mime_type,
            payload,
            annotations: Default::default(),
        };
        assert!(sigstore_signed(
            &repo,
            Subject {
                image: &image,
                manifest: &m
            },
            &[sig],
            SystemTime::now()
        )
        .is_err());
    }

    #[test]
    fn key_with_rekor_and_keyless_fixtures() {
        let rekor = |paths: &[&str]| {
            Some(Material::Paths(
                paths.iter().map(|p| fixtures::path(p)).collect(),
            ))
        };
        let key1 = "192.168.64.2:5000/cosign-signed/key-1";
        for keys in [
            &["cosign2.pub"][..],
            &["cosign2.pub", "cosign.pub"],
            &["cosign.pub", "cosign2.pub"],
        ] {
            for rekor_keys in [
                &["rekor.pub"][..],
                &["rekor.pub", "cosign.pub"],
                &["cosign.pub", "rekor.pub"],
            ] {
                let req = SigstoreSigned {
                    rekor_keys: rekor(rekor_keys),
                    ..cosign_req(keys, SignedIdentity::MatchRepository)
                };
                assert_eq!(
                    cosign_verdict("dir-img-cosign-key-rekor-valid", key1, &req),
                    Ok(()),
                    "{keys:?} {rekor_keys:?}"
                );
            }
        }
        let wrong_rekor = SigstoreSigned {
            rekor_keys: rekor(&["cosign.pub"]),
            ..cosign_req(&["cosign2.pub"], SignedIdentity::MatchRepository)
        };
        assert!(cosign_verdict("dir-img-cosign-key-rekor-valid", key1, &wrong_rekor).is_err());

        let fulcio = |email: &str, rekor_keys| SigstoreSigned {
            trust: SigstoreTrust::Fulcio {
                ca: Material::Paths(vec![fixtures::path("fulcio_v1.crt.pem")]),
                oidc_issuer: "https://github.com/login/oauth".into(),
                subject_email: email.into(),
            },
            rekor_keys,
            identity: SignedIdentity::MatchRepository,
        };
        let keyless = "192.168.64.2:5000/cosign-signed/fulcio-rekor-1";
        for rekor_keys in [
            &["rekor.pub"][..],
            &["rekor.pub", "cosign.pub"],
            &["cosign.pub", "rekor.pub"],
        ] {
            assert_eq!(
                cosign_verdict(
                    "dir-img-cosign-fulcio-rekor-valid",
                    keyless,
                    &fulcio("mitr@redhat.com", rekor(rekor_keys))
                ),
                Ok(())
            );
        }
        assert!(cosign_verdict(
            "dir-img-cosign-fulcio-rekor-valid",
            keyless,
            &fulcio("this-does-not-match@example.com", rekor(&["rekor.pub"]))
        )
        .is_err());
        assert!(cosign_verdict(
            "dir-img-cosign-fulcio-rekor-valid",
            keyless,
            &fulcio("mitr@redhat.com", rekor(&["cosign.pub"]))
        )
        .is_err());

        let pki = |intermediates: Option<Material>| SigstoreSigned {
            trust: SigstoreTrust::Pki {
                roots: Material::Paths(vec![fixtures::path("pki_root_crts.pem")]),
                intermediates,
                subject_email: Some("qiwan@redhat.com".into()),
                subject_hostname: Some("myhost.example.com".into()),
            },
            rekor_keys: None,
            identity: SignedIdentity::MatchRepository,
        };
        let with_intermediates = pki(Some(Material::Paths(vec![fixtures::path(
            "pki_intermediate_crts.pem",
        )])));
        assert_eq!(
            cosign_verdict(
                "dir-img-cosign-pki-valid",
                "localhost:5000/test",
                &with_intermediates
            ),
            Ok(())
        );
        assert_eq!(
            cosign_verdict(
                "dir-img-cosign-pki-valid",
                "localhost:5000/test",
                &pki(None)
            ),
            Ok(())
        );
    }
}
