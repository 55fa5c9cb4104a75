//! Public keys for sigstore signatures and Rekor SETs: SPKI parsing, a strict PEM
//! reader shared with [`super::x509`] and [`super::rekor`], and signature checks
//! done the way cosign signs.

use ring::signature::{self as ring_sig, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// RSA modulus sizes that ring (and so this verifier) accepts.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// A public key that verifies sigstore payload signatures or Rekor SETs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    spki: Vec<u8>,
    algorithm: KeyAlgorithm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Rsa,
    Ed25519,
}

impl PublicKey {
    /// One PEM "PUBLIC KEY" (SPKI) block; ECDSA P-256/P-384, RSA (2048–8192), Ed25519.
    ///
    /// Only whitespace may surround the block: a second block or stray text is
    /// refused, so that a doubled or truncated key file is noticed.
    pub fn from_pem(pem: &[u8]) -> Result<PublicKey, KeyError> {
        let mut blocks = parse_pem(pem)?;
        match blocks.len() {
            0 => Err(KeyError::NoPublicKey),
            1 => {
                let block = blocks.remove(0);
                expect_public_key_label(&block)?;
                PublicKey::from_spki_der(&block.der)
            }
            n => Err(KeyError::MultiplePemBlocks(n)),
        }
    }

    /// Every PEM "PUBLIC KEY" block in the text (keyPaths files may hold one each;
    /// error if none).
    pub fn all_from_pem(pem: &[u8]) -> Result<Vec<PublicKey>, KeyError> {
        let blocks = parse_pem(pem)?;
        if blocks.is_empty() {
            return Err(KeyError::NoPublicKey);
        }
        blocks
            .iter()
            .map(|block| {
                expect_public_key_label(block)?;
                PublicKey::from_spki_der(&block.der)
            })
            .collect()
    }

    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, KeyError> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der)
            .map_err(|e| KeyError::MalformedSpki(e.to_string()))?;
        if !rest.is_empty() {
            return Err(KeyError::TrailingData);
        }
        if spki.subject_public_key.unused_bits != 0 {
            return Err(KeyError::MalformedSpki(
                "public key BIT STRING has unused bits".to_string(),
            ));
        }
        let key: &[u8] = &spki.subject_public_key.data;
        let oid = &spki.algorithm.algorithm;
        let params = spki.algorithm.parameters.as_ref();
        let algorithm = if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = params
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| KeyError::MalformedSpki("EC key without a named curve".into()))?;
            let (algorithm, point_len) = if curve == OID_EC_P256 {
                (KeyAlgorithm::EcdsaP256, 65)
            } else if curve == OID_NIST_EC_P384 {
                (KeyAlgorithm::EcdsaP384, 97)
            } else {
                return Err(KeyError::UnsupportedCurve(curve.to_id_string()));
            };
            // Uncompressed points only, as Go's x509.ParsePKIXPublicKey.
            if key.len() != point_len || key[0] != 0x04 {
                return Err(KeyError::MalformedSpki(
                    "EC point is not an uncompressed point of the named curve".into(),
                ));
            }
            algorithm
        } else if *oid == OID_PKCS1_RSAENCRYPTION {
            if params.map(|p| p.as_bytes().is_empty() && p.tag().0 == 5) != Some(true) {
                return Err(KeyError::MalformedSpki(
                    "RSA key parameters are not NULL".into(),
                ));
            }
            let bits = rsa_modulus_bits(key)?;
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                return Err(KeyError::RsaKeySize(bits));
            }
            KeyAlgorithm::Rsa
        } else if *oid == OID_SIG_ED25519 {
            if params.is_some() || key.len() != 32 {
                return Err(KeyError::MalformedSpki("malformed Ed25519 key".into()));
            }
            KeyAlgorithm::Ed25519
        } else {
            return Err(KeyError::UnsupportedAlgorithm(oid.to_id_string()));
        };
        Ok(PublicKey {
            spki: der.to_vec(),
            algorithm,
        })
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    pub fn is_ecdsa(&self) -> bool {
        matches!(
            self.algorithm,
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384
        )
    }

    /// Verifies `signature` over `message` the way cosign signs and containers/image
    /// verifies: SHA-256 whatever the key (sigstore's hard-coded hash, also for a
    /// P-384 key), ECDSA with an ASN.1 DER signature; RSA PKCS#1 v1.5; Ed25519.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let algorithm: &dyn VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::EcdsaP256 => &ring_sig::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::EcdsaP384 => &ring_sig::ECDSA_P384_SHA256_ASN1,
            KeyAlgorithm::Rsa => &ring_sig::RSA_PKCS1_2048_8192_SHA256,
            KeyAlgorithm::Ed25519 => &ring_sig::ED25519,
        };
        self.verify_with(algorithm, message, signature)
    }

    /// ECDSA over SHA-256 whatever the curve: how Rekor SETs are checked
    /// (`ecdsa.VerifyASN1(key, sha256(canonical payload), set)` upstream).
    /// False for a key that is not ECDSA.
    pub(crate) fn verify_ecdsa_sha256(&self, message: &[u8], signature: &[u8]) -> bool {
        let algorithm: &dyn VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::EcdsaP256 => &ring_sig::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::EcdsaP384 => &ring_sig::ECDSA_P384_SHA256_ASN1,
            KeyAlgorithm::Rsa | KeyAlgorithm::Ed25519 => return false,
        };
        self.verify_with(algorithm, message, signature)
    }

    fn verify_with(
        &self,
        algorithm: &'static dyn VerificationAlgorithm,
        message: &[u8],
        signature: &[u8],
    ) -> bool {
        // from_spki_der checked this parses; the key bits are what ring wants
        // (the EC point, the PKCS#1 RSAPublicKey, the raw Ed25519 key).
        let Ok((_, spki)) = SubjectPublicKeyInfo::from_der(&self.spki) else {
            return false;
        };
        UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data)
            .verify(message, signature)
            .is_ok()
    }
}

fn expect_public_key_label(block: &PemBlock) -> Result<(), KeyError> {
    if block.label == "PUBLIC KEY" {
        Ok(())
    } else {
        Err(KeyError::UnexpectedPemLabel(block.label.clone()))
    }
}

/// Bit length of the modulus of a PKCS#1 RSAPublicKey.
fn rsa_modulus_bits(rsa_public_key: &[u8]) -> Result<usize, KeyError> {
    let (rest, key) = x509_parser::public_key::RSAPublicKey::from_der(rsa_public_key)
        .map_err(|e| KeyError::MalformedSpki(format!("RSA public key: {e}")))?;
    if !rest.is_empty() {
        return Err(KeyError::TrailingData);
    }
    let modulus = match key.modulus.iter().position(|&b| b != 0) {
        Some(first) => &key.modulus[first..],
        None => return Err(KeyError::MalformedSpki("RSA modulus is zero".into())),
    };
    Ok((modulus.len() - 1) * 8 + (8 - modulus[0].leading_zeros() as usize))
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("no PEM \"PUBLIC KEY\" block found")]
    NoPublicKey,
    #[error("expected one PEM public key, found {0} PEM blocks")]
    MultiplePemBlocks(usize),
    #[error("PEM block is {0:?}, expected \"PUBLIC KEY\"")]
    UnexpectedPemLabel(String),
    #[error("malformed SubjectPublicKeyInfo: {0}")]
    MalformedSpki(String),
    #[error("trailing data after the public key")]
    TrailingData,
    #[error("unsupported public key algorithm {0} (expected ECDSA, RSA or Ed25519)")]
    UnsupportedAlgorithm(String),
    #[error("unsupported elliptic curve {0} (expected P-256 or P-384)")]
    UnsupportedCurve(String),
    #[error("RSA key of {0} bits (supported: 2048 to 8192)")]
    RsaKeySize(usize),
}

/// One PEM block: its label (`CERTIFICATE`, `PUBLIC KEY`, …) and decoded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PemBlock {
    pub(crate) label: String,
    pub(crate) der: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PemError {
    #[error("PEM text is not UTF-8")]
    NotUtf8,
    #[error("unexpected text outside a PEM block on line {line}")]
    TextOutsideBlock { line: usize },
    #[error("PEM block {label:?} starting on line {line} has no END line")]
    Unterminated { label: String, line: usize },
    #[error("PEM block {label:?} starting on line {line} is not valid base64")]
    Base64 { label: String, line: usize },
    #[error("PEM block {label:?} starting on line {line} is empty")]
    Empty { label: String, line: usize },
}

/// Every PEM block in `text`. Stricter than Go's `pem.Decode` loop: only
/// whitespace may appear between blocks, headers are refused and the base64 must
/// be canonical, so garbage and trailing data are errors rather than skipped.
pub(crate) fn parse_pem(text: &[u8]) -> Result<Vec<PemBlock>, PemError> {
    use base64::Engine as _;
    let text = std::str::from_utf8(text).map_err(|_| PemError::NotUtf8)?;
    let mut blocks = Vec::new();
    let mut open: Option<(String, usize, String)> = None; // label, line, base64
    for (index, raw_line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw_line.trim();
        match open.as_mut() {
            None => {
                if line.is_empty() {
                    continue;
                }
                let label = line
                    .strip_prefix("-----BEGIN ")
                    .and_then(|l| l.strip_suffix("-----"))
                    .ok_or(PemError::TextOutsideBlock { line: line_no })?;
                open = Some((label.to_string(), line_no, String::new()));
            }
            Some((label, start, body)) => {
                if let Some(end) = line
                    .strip_prefix("-----END ")
                    .and_then(|l| l.strip_suffix("-----"))
                {
                    if end != label {
                        return Err(PemError::Unterminated {
                            label: label.clone(),
                            line: *start,
                        });
                    }
                    let der = base64::engine::general_purpose::STANDARD
                        .decode(body.as_bytes())
                        .map_err(|_| PemError::Base64 {
                            label: label.clone(),
                            line: *start,
                        })?;
                    if der.is_empty() {
                        return Err(PemError::Empty {
                            label: label.clone(),
                            line: *start,
                        });
                    }
                    blocks.push(PemBlock {
                        label: label.clone(),
                        der,
                    });
                    open = None;
                } else {
                    body.push_str(line);
                }
            }
        }
    }
    if let Some((label, line, _)) = open {
        return Err(PemError::Unterminated { label, line });
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    use crate::signature::fixtures::read as fixture;

    fn key(name: &str) -> PublicKey {
        PublicKey::from_pem(&fixture(name)).unwrap()
    }

    fn b64(text: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap()
    }

    /// (payload, signature) of a `dir-img-cosign-*/signature-N` file.
    fn cosign_signature(path: &str) -> (Vec<u8>, Vec<u8>) {
        let raw = fixture(path);
        let body = raw.strip_prefix(b"\0sigstore-json\n").unwrap();
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        let payload = b64(json["payload"].as_str().unwrap());
        let signature: String = json["annotations"]["dev.cosignproject.cosign/signature"]
            .as_str()
            .unwrap()
            .chars()
            .filter(|c| *c != '\n')
            .collect();
        (payload, b64(&signature))
    }

    #[test]
    fn fixture_keys_parse_with_their_algorithms() {
        for name in ["cosign.pub", "cosign2.pub", "rekor.pub"] {
            assert!(key(name).is_ecdsa(), "{name}");
        }
        let rsa = key("some-rsa-key.pub");
        assert!(!rsa.is_ecdsa());
        assert_eq!(rsa.algorithm, KeyAlgorithm::Rsa);
    }

    #[test]
    fn rekor_key_spki_hash_is_the_log_id() {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(key("rekor.pub").spki_der());
        assert_eq!(
            hex::encode(digest),
            "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d"
        );
    }

    #[test]
    fn cosign_pub_verifies_cosign_valid_and_cosign2_does_not() {
        let (payload, signature) = cosign_signature("dir-img-cosign-valid/signature-1");
        assert!(key("cosign.pub").verify(&payload, &signature));
        assert!(!key("cosign2.pub").verify(&payload, &signature));
        assert!(!key("cosign.pub").verify(b"other payload", &signature));
    }

    #[test]
    fn cosign2_pub_verifies_key_rekor_fixture() {
        let (payload, signature) = cosign_signature("dir-img-cosign-key-rekor-valid/signature-1");
        assert!(key("cosign2.pub").verify(&payload, &signature));
        assert!(!key("cosign.pub").verify(&payload, &signature));
    }

    #[test]
    fn unknown_cosign_key_signature_verifies_with_neither_key() {
        let (payload, signature) = cosign_signature("unknown-cosign-key.signature");
        assert!(!key("cosign.pub").verify(&payload, &signature));
        assert!(!key("cosign2.pub").verify(&payload, &signature));
    }

    #[test]
    fn upstream_extra_vectors_verify_with_cosign_pub() {
        let cosign = key("cosign.pub");
        assert!(cosign.verify(
            b"&",
            &b64("MEUCIARnnxZQPALBfqkB4aNAYXad79Qs6VehcrgIeZ8p7I2FAiEAzq2HXwXlz1iJeh+ucUR3L0zpjynQk6Rk0+/gXYp49RU=")
        ));
        assert!(cosign.verify(
            b"{}",
            &b64("MEUCIQDkySOBGxastVP0+koTA33NH5hXjwosFau4rxTPN6g48QIgb7eWKkGqfEpHMM3aT4xiqyP/170jEkdFuciuwN4mux4=")
        ));
    }

    #[test]
    fn bad_signatures_are_refused() {
        let cosign = key("cosign.pub");
        let (payload, signature) = cosign_signature("dir-img-cosign-valid/signature-1");
        let doubled = [signature.clone(), signature.clone()].concat();
        for bad in [
            &b""[..],
            b"invalid signature",
            &signature[..signature.len() - 1],
            &doubled,
        ] {
            assert!(!cosign.verify(&payload, bad));
        }
    }

    #[test]
    fn rekor_sig_verifies_with_fulcio_leaf_key_from_spki() {
        let blocks = parse_pem(&fixture("fulcio-cert")).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&blocks[0].der).unwrap();
        let leaf = PublicKey::from_spki_der(cert.public_key().raw).unwrap();
        let signature = b64(std::str::from_utf8(&fixture("rekor-sig")).unwrap());
        assert!(leaf.verify(&fixture("rekor-payload"), &signature));
    }

    #[test]
    fn all_from_pem_reads_every_block() {
        let text = [fixture("cosign.pub"), fixture("cosign2.pub")].concat();
        let keys = PublicKey::all_from_pem(&text).unwrap();
        assert_eq!(keys, vec![key("cosign.pub"), key("cosign2.pub")]);
        assert!(matches!(
            PublicKey::from_pem(&text),
            Err(KeyError::MultiplePemBlocks(2))
        ));
    }

    #[test]
    fn garbage_and_wrong_blocks_are_refused() {
        assert!(matches!(
            PublicKey::from_pem(b"nonsense"),
            Err(KeyError::Pem(PemError::TextOutsideBlock { line: 1 }))
        ));
        assert!(matches!(
            PublicKey::all_from_pem(b"\n  \n"),
            Err(KeyError::NoPublicKey)
        ));
        assert!(matches!(
            PublicKey::from_pem(&fixture("fulcio_v1.crt.pem")),
            Err(KeyError::UnexpectedPemLabel(_))
        ));
        let cosign = fixture("cosign.pub");
        let truncated = &cosign[..cosign.len() - 10];
        assert!(PublicKey::from_pem(truncated).is_err());
        let with_trailer = [&cosign[..], b"trailing"].concat();
        assert!(PublicKey::from_pem(&with_trailer).is_err());
        let mut der = key("cosign.pub").spki_der().to_vec();
        der.push(0);
        assert!(matches!(
            PublicKey::from_spki_der(&der),
            Err(KeyError::TrailingData)
        ));
    }

    #[test]
    fn ed25519_key_parses_and_verifies_rfc8032_test_1() {
        // RFC 8032 section 7.1, TEST 1 (empty message).
        let public =
            hex::decode("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
                .unwrap();
        let signature = hex::decode(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        )
        .unwrap();
        let spki = [
            &hex::decode("302a300506032b6570032100").unwrap()[..],
            &public,
        ]
        .concat();
        let key = PublicKey::from_spki_der(&spki).unwrap();
        assert!(!key.is_ecdsa());
        assert!(key.verify(b"", &signature));
        assert!(!key.verify(b"x", &signature));
    }

    #[test]
    fn pem_with_crlf_line_endings_parses() {
        let text = String::from_utf8(fixture("cosign.pub"))
            .unwrap()
            .replace('\n', "\r\n");
        assert_eq!(
            PublicKey::from_pem(text.as_bytes()).unwrap(),
            key("cosign.pub")
        );
    }
}
