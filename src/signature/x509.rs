//! Certificates behind sigstore signatures: a Fulcio leaf (keyless signing,
//! checked at the Rekor SET's integrated time) or a leaf from a private PKI
//! (checked now), each chained to configured roots with webpki, then matched
//! against the identity the policy requires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage, VerifiedPath};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::signature::keys::{parse_pem, KeyError, PemError, PublicKey};

/// id-kp-codeSigning (1.3.6.1.5.5.7.3.3), the DER value bytes of the OID.
const EKU_CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];
/// Fulcio "issuer" v1: the extension value is the raw issuer string.
const OID_FULCIO_ISSUER_V1: &str = "1.3.6.1.4.1.57264.1.1";
/// Fulcio "issuer" v2: the extension value is a DER UTF8String.
const OID_FULCIO_ISSUER_V2: &str = "1.3.6.1.4.1.57264.1.8";
/// anyExtendedKeyUsage (2.5.29.37.0), which Go accepts on a root for any usage.
const OID_ANY_EKU: &str = "2.5.29.37.0";
const OID_CODE_SIGNING: &str = "1.3.6.1.5.5.7.3.3";

/// Trust for keyless (Fulcio) signatures: `sigstoreSigned.fulcio` in policy.json.
#[derive(Debug, Clone)]
pub struct FulcioTrust {
    pub roots_pem: Vec<u8>,
    pub oidc_issuer: String,
    pub subject_email: String,
}

/// Trust for signatures by a private PKI: `sigstoreSigned.pki` in policy.json.
#[derive(Debug, Clone)]
pub struct PkiTrust {
    pub roots_pem: Vec<u8>,
    pub intermediates_pem: Option<Vec<u8>>,
    pub subject_email: Option<String>,
    pub subject_hostname: Option<String>,
}

/// A leaf certificate that passed verification.
#[derive(Debug)]
pub struct Leaf {
    pub key: PublicKey,
    pub der: Vec<u8>,
}

/// Verifies a Fulcio leaf (PEM) against the roots, using the chain annotation
/// (PEM, last cert dropped) as intermediates, at time `at`; checks codeSigning
/// EKU, the SAN email and the OIDC issuer (extension 1.3.6.1.4.1.57264.1.1 raw
/// string and/or 1.3.6.1.4.1.57264.1.8 DER UTF8String; must agree if both).
/// Returns the leaf's key and the leaf DER.
pub fn verify_fulcio(
    trust: &FulcioTrust,
    leaf_pem: &[u8],
    chain_pem: Option<&[u8]>,
    at: SystemTime,
) -> Result<Leaf, CertError> {
    let roots = parse_certificates(&trust.roots_pem, CertSource::Roots)?;
    let intermediates = chain_intermediates(chain_pem)?;
    let leaf_der = parse_leaf(leaf_pem)?;
    let leaf = parse_der(&leaf_der, CertSource::Leaf, 1)?;
    verify_chain(&leaf_der, &leaf, &roots, &intermediates, at)?;
    check_fulcio_issuer(&leaf, &trust.oidc_issuer)?;
    check_email(&leaf, &trust.subject_email)?;
    let key = leaf_key(&leaf)?;
    Ok(Leaf { key, der: leaf_der })
}

/// Verifies a leaf from a private PKI against the roots, with the configured
/// intermediates and the chain annotation (last cert dropped) as intermediates,
/// at `now`; checks codeSigning EKU (a missing EKU allows any usage, as in Go)
/// and whichever of the SAN email and hostname the trust names (at least one).
pub fn verify_pki(
    trust: &PkiTrust,
    leaf_pem: &[u8],
    chain_pem: Option<&[u8]>,
    now: SystemTime,
) -> Result<Leaf, CertError> {
    if trust.subject_email.is_none() && trust.subject_hostname.is_none() {
        return Err(CertError::NoPkiIdentity);
    }
    let roots = parse_certificates(&trust.roots_pem, CertSource::Roots)?;
    let mut intermediates = match &trust.intermediates_pem {
        Some(pem) => parse_certificates(pem, CertSource::Intermediates)?,
        None => Vec::new(),
    };
    intermediates.extend(chain_intermediates(chain_pem)?);
    let leaf_der = parse_leaf(leaf_pem)?;
    let leaf = parse_der(&leaf_der, CertSource::Leaf, 1)?;
    verify_chain(&leaf_der, &leaf, &roots, &intermediates, now)?;
    if let Some(email) = &trust.subject_email {
        check_email(&leaf, email)?;
    }
    if let Some(hostname) = &trust.subject_hostname {
        check_hostname(&leaf_der, &leaf, hostname)?;
    }
    let key = leaf_key(&leaf)?;
    Ok(Leaf { key, der: leaf_der })
}

/// Where a certificate came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertSource {
    Roots,
    Intermediates,
    Chain,
    Leaf,
}

impl std::fmt::Display for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertSource::Roots => "trusted root certificates",
            CertSource::Intermediates => "configured intermediate certificates",
            CertSource::Chain => "certificate chain annotation",
            CertSource::Leaf => "certificate annotation",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{source_of}: {error}")]
    Pem {
        source_of: CertSource,
        #[source]
        error: PemError,
    },
    #[error("{0}: no certificate found")]
    NoCertificate(CertSource),
    #[error("{source_of}: PEM block {label:?} is not a CERTIFICATE")]
    NotACertificate {
        source_of: CertSource,
        label: String,
    },
    #[error("{source_of}: certificate {index} is not a valid X.509 certificate: {reason}")]
    MalformedCertificate {
        source_of: CertSource,
        index: usize,
        reason: String,
    },
    #[error("certificate annotation holds {0} certificates, expected exactly one")]
    MultipleLeaves(usize),
    #[error("trusted root certificate {index} cannot be used as a trust anchor: {error}")]
    BadRoot {
        index: usize,
        #[source]
        error: webpki::Error,
    },
    #[error("the signing certificate is not valid before {not_before} (checked at {at})")]
    LeafNotYetValid { at: String, not_before: String },
    #[error("the signing certificate expired at {not_after} (checked at {at})")]
    LeafExpired { at: String, not_after: String },
    #[error("a CA certificate of the chain is not yet valid at {at}")]
    ChainNotYetValid { at: String },
    #[error("a CA certificate of the chain expired at {not_after} (checked at {at})")]
    ChainExpired { at: String, not_after: String },
    #[error(
        "no path from the signing certificate to a trusted root \
         (chain annotation missing or incomplete, or the issuing CA is not trusted)"
    )]
    NoPathToTrustedRoot,
    #[error("the certificate chain does not allow code signing (extended key usage)")]
    CodeSigningNotAllowed,
    #[error("the certificate chain is invalid: {0}")]
    InvalidChain(#[source] webpki::Error),
    #[error("the time to check the certificate at is before 1970")]
    TimeBeforeEpoch,
    #[error("the signing certificate's public key: {0}")]
    LeafKey(#[from] KeyError),
    #[error("the signing certificate's subjectAltName extension is malformed: {0}")]
    MalformedSan(String),
    #[error("email mismatch: policy requires {required:?}, certificate has {found:?}")]
    EmailMismatch {
        required: String,
        found: Vec<String>,
    },
    #[error(
        "hostname mismatch: policy requires {required:?}, certificate has DNS names {found:?}"
    )]
    HostnameMismatch {
        required: String,
        found: Vec<String>,
    },
    #[error("policy subject hostname {0:?} is not a DNS name or IP address")]
    InvalidHostname(String),
    #[error("PKI trust names neither a subject email nor a subject hostname")]
    NoPkiIdentity,
    #[error("the Fulcio certificate has no OIDC issuer extension ({OID_FULCIO_ISSUER_V1} or {OID_FULCIO_ISSUER_V2})")]
    IssuerMissing,
    #[error("the Fulcio certificate's OIDC issuer extension {oid} is malformed: {reason}")]
    IssuerMalformed { oid: &'static str, reason: String },
    #[error("the Fulcio certificate's OIDC issuer extensions disagree: {v1:?} vs {v2:?}")]
    IssuerInconsistent { v1: String, v2: String },
    #[error(
        "issuer mismatch: policy requires OIDC issuer {required:?}, certificate has {found:?}"
    )]
    IssuerMismatch { required: String, found: String },
}

/// DER of every CERTIFICATE block in `pem`, each checked to parse as X.509.
fn parse_certificates(pem: &[u8], source_of: CertSource) -> Result<Vec<Vec<u8>>, CertError> {
    let blocks = parse_pem(pem).map_err(|error| CertError::Pem { source_of, error })?;
    if blocks.is_empty() {
        return Err(CertError::NoCertificate(source_of));
    }
    let mut ders = Vec::with_capacity(blocks.len());
    for (i, block) in blocks.into_iter().enumerate() {
        if block.label != "CERTIFICATE" {
            return Err(CertError::NotACertificate {
                source_of,
                label: block.label,
            });
        }
        parse_der(&block.der, source_of, i + 1)?;
        ders.push(block.der);
    }
    Ok(ders)
}

fn parse_der(
    der: &[u8],
    source_of: CertSource,
    index: usize,
) -> Result<X509Certificate<'_>, CertError> {
    let malformed = |reason: String| CertError::MalformedCertificate {
        source_of,
        index,
        reason,
    };
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed("trailing data after the certificate".into()));
    }
    Ok(cert)
}

fn parse_leaf(pem: &[u8]) -> Result<Vec<u8>, CertError> {
    let mut certs = parse_certificates(pem, CertSource::Leaf)?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        n => Err(CertError::MultipleLeaves(n)),
    }
}

/// The chain annotation minus its last certificate, which is taken to be the root
/// and never trusted from the signature: trust comes only from the configuration.
fn chain_intermediates(chain_pem: Option<&[u8]>) -> Result<Vec<Vec<u8>>, CertError> {
    let Some(pem) = chain_pem.filter(|pem| !pem.trim_ascii().is_empty()) else {
        return Ok(Vec::new());
    };
    let mut certs = parse_certificates(pem, CertSource::Chain)?;
    certs.pop();
    Ok(certs)
}

fn leaf_key(leaf: &X509Certificate<'_>) -> Result<PublicKey, CertError> {
    Ok(PublicKey::from_spki_der(leaf.public_key().raw)?)
}

/// Builds a path leaf → intermediates → root valid at `at` in which every
/// certificate that lists extended key usages allows codeSigning.
fn verify_chain(
    leaf_der: &[u8],
    leaf: &X509Certificate<'_>,
    roots: &[Vec<u8>],
    intermediates: &[Vec<u8>],
    at: SystemTime,
) -> Result<(), CertError> {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CertError::TimeBeforeEpoch)?
        .as_secs();
    let secs_i64 = i64::try_from(secs).unwrap_or(i64::MAX);

    // webpki reports an expiry without saying which certificate; check the
    // leaf first so the usual case (a ten-minute Fulcio leaf) is named.
    let validity = leaf.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if secs_i64 < not_before {
        return Err(CertError::LeafNotYetValid {
            at: crate::timestamp::unix(secs_i64),
            not_before: crate::timestamp::unix(not_before),
        });
    }
    if secs_i64 > not_after {
        return Err(CertError::LeafExpired {
            at: crate::timestamp::unix(secs_i64),
            not_after: crate::timestamp::unix(not_after),
        });
    }

    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors = root_ders
        .iter()
        .enumerate()
        .map(|(i, der)| {
            webpki::anchor_from_trusted_cert(der).map_err(|error| CertError::BadRoot {
                index: i + 1,
                error,
            })
        })
        .collect::<Result<Vec<TrustAnchor<'_>>, _>>()?;
    let intermediate_ders: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let leaf_cert_der = CertificateDer::from(leaf_der);
    let end_entity =
        EndEntityCert::try_from(&leaf_cert_der).map_err(|e| CertError::MalformedCertificate {
            source_of: CertSource::Leaf,
            index: 1,
            reason: e.to_string(),
        })?;

    // webpki treats a trust anchor as bare name + key; Go's verifier also checks
    // the root certificate's validity and EKU, so do that for the chosen anchor.
    let check_root = |path: &VerifiedPath<'_>| -> Result<(), webpki::Error> {
        let Some(index) = anchors.iter().position(|a| std::ptr::eq(a, path.anchor())) else {
            return Ok(());
        };
        check_root_certificate(&roots[index], secs_i64)
    };

    let time = UnixTime::since_unix_epoch(Duration::from_secs(secs));
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediate_ders,
            time,
            KeyUsage::required_if_present(EKU_CODE_SIGNING),
            None,
            Some(&check_root),
        )
        .map(|_| ())
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer => CertError::NoPathToTrustedRoot,
            webpki::Error::CertExpired { time, not_after } => CertError::ChainExpired {
                at: crate::timestamp::unix(unix_secs(time)),
                not_after: crate::timestamp::unix(unix_secs(not_after)),
            },
            webpki::Error::CertNotValidYet { time, .. } => CertError::ChainNotYetValid {
                at: crate::timestamp::unix(unix_secs(time)),
            },
            webpki::Error::RequiredEkuNotFoundContext(_) => CertError::CodeSigningNotAllowed,
            other => CertError::InvalidChain(other),
        })
}

fn check_root_certificate(der: &[u8], at: i64) -> Result<(), webpki::Error> {
    let (_, root) = X509Certificate::from_der(der).map_err(|_| webpki::Error::BadDer)?;
    let validity = root.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let unix = |secs: i64| UnixTime::since_unix_epoch(Duration::from_secs(secs.max(0) as u64));
    if at < not_before {
        return Err(webpki::Error::CertNotValidYet {
            time: unix(at),
            not_before: unix(not_before),
        });
    }
    if at > not_after {
        return Err(webpki::Error::CertExpired {
            time: unix(at),
            not_after: unix(not_after),
        });
    }
    match root.extended_key_usage() {
        Ok(None) => Ok(()),
        Ok(Some(eku)) => {
            let eku = eku.value;
            let allowed = eku.any
                || eku.code_signing
                || eku.other.iter().any(|oid| {
                    matches!(oid.to_id_string().as_str(), OID_ANY_EKU | OID_CODE_SIGNING)
                });
            if allowed {
                Ok(())
            } else {
                Err(webpki::Error::RequiredEkuNotFoundContext(
                    webpki::RequiredEkuNotFoundContext {
                        required: KeyUsage::required_if_present(EKU_CODE_SIGNING),
                        present: Vec::new(),
                    },
                ))
            }
        }
        Err(_) => Err(webpki::Error::BadDer),
    }
}

fn unix_secs(time: UnixTime) -> i64 {
    i64::try_from(time.as_secs()).unwrap_or(i64::MAX)
}

/// The SAN email addresses (rfc822Name) of a certificate.
fn san_emails(cert: &X509Certificate<'_>) -> Result<Vec<String>, CertError> {
    Ok(san_names(cert)?
        .into_iter()
        .filter_map(|name| match name {
            GeneralName::RFC822Name(email) => Some(email.to_string()),
            _ => None,
        })
        .collect())
}

fn san_names<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<GeneralName<'a>>, CertError> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => Ok(san.value.general_names.clone()),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(CertError::MalformedSan(e.to_string())),
    }
}

/// The email must be one of the SAN emails, compared exactly (as Go's
/// `slices.Contains(cert.EmailAddresses, email)` upstream).
fn check_email(cert: &X509Certificate<'_>, required: &str) -> Result<(), CertError> {
    let found = san_emails(cert)?;
    if found.iter().any(|email| email == required) {
        Ok(())
    } else {
        Err(CertError::EmailMismatch {
            required: required.to_string(),
            found,
        })
    }
}

/// Hostname matching as Go's `VerifyHostname`: SAN DNS names (case-insensitive,
/// wildcards) or SAN IP addresses, never the subject CN.
fn check_hostname(
    leaf_der: &[u8],
    cert: &X509Certificate<'_>,
    required: &str,
) -> Result<(), CertError> {
    let name = ServerName::try_from(required)
        .map_err(|_| CertError::InvalidHostname(required.to_string()))?;
    let leaf_cert_der = CertificateDer::from(leaf_der);
    let end_entity =
        EndEntityCert::try_from(&leaf_cert_der).map_err(|e| CertError::MalformedCertificate {
            source_of: CertSource::Leaf,
            index: 1,
            reason: e.to_string(),
        })?;
    end_entity
        .verify_is_valid_for_subject_name(&name)
        .map_err(|_| {
            let found = san_names(cert)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_string()),
                    _ => None,
                })
                .collect();
            CertError::HostnameMismatch {
                required: required.to_string(),
                found,
            }
        })
}

/// The OIDC issuer Fulcio recorded, from the v1 (raw string) and/or v2 (DER
/// UTF8String) extension; each may appear once, and both must agree.
fn check_fulcio_issuer(cert: &X509Certificate<'_>, required: &str) -> Result<(), CertError> {
    let mut v1: Option<String> = None;
    let mut v2: Option<String> = None;
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        let (slot, oid, value) = match oid.as_str() {
            OID_FULCIO_ISSUER_V1 => (
                &mut v1,
                OID_FULCIO_ISSUER_V1,
                String::from_utf8(ext.value.to_vec()).map_err(|_| CertError::IssuerMalformed {
                    oid: OID_FULCIO_ISSUER_V1,
                    reason: "not UTF-8".into(),
                })?,
            ),
            OID_FULCIO_ISSUER_V2 => (
                &mut v2,
                OID_FULCIO_ISSUER_V2,
                der_utf8_string(ext.value).map_err(|reason| CertError::IssuerMalformed {
                    oid: OID_FULCIO_ISSUER_V2,
                    reason: reason.into(),
                })?,
            ),
            _ => continue,
        };
        if slot.is_some() {
            return Err(CertError::IssuerMalformed {
                oid,
                reason: "present more than once".into(),
            });
        }
        *slot = Some(value);
    }
    let found = match (v1, v2) {
        (None, None) => return Err(CertError::IssuerMissing),
        (Some(v1), Some(v2)) if v1 != v2 => return Err(CertError::IssuerInconsistent { v1, v2 }),
        (Some(issuer), _) | (None, Some(issuer)) => issuer,
    };
    if found == required {
        Ok(())
    } else {
        Err(CertError::IssuerMismatch {
            required: required.to_string(),
            found,
        })
    }
}

/// Decodes exactly one DER UTF8String, nothing after it.
fn der_utf8_string(der: &[u8]) -> Result<String, &'static str> {
    const UTF8_STRING: u8 = 0x0c;
    let (&tag, rest) = der.split_first().ok_or("empty")?;
    if tag != UTF8_STRING {
        return Err("not a UTF8String");
    }
    let (&first, rest) = rest.split_first().ok_or("missing length")?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => match rest.split_first() {
            Some((&len, rest)) if len >= 0x80 => (usize::from(len), rest),
            _ => return Err("non-minimal length"),
        },
        0x82 => match rest {
            [hi, lo, rest @ ..] if *hi != 0 => ((usize::from(*hi) << 8) | usize::from(*lo), rest),
            _ => return Err("non-minimal length"),
        },
        _ => return Err("unsupported length"),
    };
    if rest.len() != len {
        return Err("length does not match the value (truncated or trailing data)");
    }
    String::from_utf8(rest.to_vec()).map_err(|_| "not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// integratedTime of `rekor-set`, inside `fulcio-cert`'s ten minutes.
    const REKOR_SET_TIME: u64 = 1_670_870_899;

    use crate::signature::fixtures::read as fixture;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn fulcio_trust() -> FulcioTrust {
        FulcioTrust {
            roots_pem: fixture("fulcio_v1.crt.pem"),
            oidc_issuer: "https://github.com/login/oauth".into(),
            subject_email: "mitr@redhat.com".into(),
        }
    }

    fn pki_trust() -> PkiTrust {
        PkiTrust {
            roots_pem: fixture("pki_root_crts.pem"),
            intermediates_pem: Some(fixture("pki_intermediate_crts.pem")),
            subject_email: Some("qiwan@redhat.com".into()),
            subject_hostname: Some("myhost.example.com".into()),
        }
    }

    fn annotations(path: &str) -> serde_json::Value {
        let raw = fixture(path);
        let body = raw.strip_prefix(b"\0sigstore-json\n").unwrap();
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        json["annotations"].clone()
    }

    fn fulcio_leaf_spki() -> Vec<u8> {
        let blocks = parse_pem(&fixture("fulcio-cert")).unwrap();
        let (_, cert) = X509Certificate::from_der(&blocks[0].der).unwrap();
        cert.public_key().raw.to_vec()
    }

    #[test]
    fn fulcio_cert_with_chain_is_valid_at_set_time() {
        let leaf = verify_fulcio(
            &fulcio_trust(),
            &fixture("fulcio-cert"),
            Some(&fixture("fulcio-chain")),
            at(REKOR_SET_TIME),
        )
        .unwrap();
        assert_eq!(leaf.key.spki_der(), fulcio_leaf_spki());
        assert_eq!(leaf.der, parse_pem(&fixture("fulcio-cert")).unwrap()[0].der);
        let signature = base64::engine::general_purpose::STANDARD
            .decode(fixture("rekor-sig"))
            .unwrap();
        assert!(leaf.key.verify(&fixture("rekor-payload"), &signature));
    }

    #[test]
    fn fulcio_cert_outside_its_ten_minutes_is_refused() {
        // 2022-12-12T18:48:17Z and 18:58:19Z, one second outside the validity.
        for (secs, expired) in [(1_670_870_897, false), (1_670_871_499, true)] {
            let err = verify_fulcio(
                &fulcio_trust(),
                &fixture("fulcio-cert"),
                Some(&fixture("fulcio-chain")),
                at(secs),
            )
            .unwrap_err();
            match err {
                CertError::LeafExpired { at, not_after } if expired => {
                    assert_eq!(at, "2022-12-12T18:58:19Z");
                    assert_eq!(not_after, "2022-12-12T18:58:18Z");
                }
                CertError::LeafNotYetValid { not_before, .. } if !expired => {
                    assert_eq!(not_before, "2022-12-12T18:48:18Z");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(verify_fulcio(
            &fulcio_trust(),
            &fixture("fulcio-cert"),
            Some(&fixture("fulcio-chain")),
            SystemTime::now(),
        )
        .is_err());
    }

    #[test]
    fn fulcio_cert_without_chain_has_no_path_unless_chain_is_trusted() {
        for chain in [None, Some(&b""[..])] {
            let err = verify_fulcio(
                &fulcio_trust(),
                &fixture("fulcio-cert"),
                chain,
                at(REKOR_SET_TIME),
            )
            .unwrap_err();
            assert!(matches!(err, CertError::NoPathToTrustedRoot), "{err:?}");
        }
        // The chain annotation's last certificate (the root) is dropped, so a
        // chain of the root alone gives no intermediate either.
        let err = verify_fulcio(
            &fulcio_trust(),
            &fixture("fulcio-cert"),
            Some(&fixture("fulcio_v1.crt.pem")),
            at(REKOR_SET_TIME),
        )
        .unwrap_err();
        assert!(matches!(err, CertError::NoPathToTrustedRoot), "{err:?}");

        let trust = FulcioTrust {
            roots_pem: fixture("fulcio-chain"),
            ..fulcio_trust()
        };
        verify_fulcio(&trust, &fixture("fulcio-cert"), None, at(REKOR_SET_TIME)).unwrap();
    }

    #[test]
    fn fulcio_chain_only_as_intermediates_never_as_roots() {
        // Trusting only an unrelated root: the chain annotation cannot supply trust.
        let trust = FulcioTrust {
            roots_pem: fixture("pki_root_crts.pem"),
            ..fulcio_trust()
        };
        let err = verify_fulcio(
            &trust,
            &fixture("fulcio-cert"),
            Some(&fixture("fulcio-chain")),
            at(REKOR_SET_TIME),
        )
        .unwrap_err();
        assert!(matches!(err, CertError::NoPathToTrustedRoot), "{err:?}");
    }

    #[test]
    fn fulcio_wrong_email_or_issuer_is_refused() {
        let trust = FulcioTrust {
            subject_email: "this-does-not-match@example.com".into(),
            ..fulcio_trust()
        };
        let err = verify_fulcio(
            &trust,
            &fixture("fulcio-cert"),
            Some(&fixture("fulcio-chain")),
            at(REKOR_SET_TIME),
        )
        .unwrap_err();
        match &err {
            CertError::EmailMismatch { required, found } => {
                assert_eq!(required, "this-does-not-match@example.com");
                assert_eq!(found, &["mitr@redhat.com"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("mitr@redhat.com"));

        let trust = FulcioTrust {
            oidc_issuer: "https://accounts.google.com".into(),
            ..fulcio_trust()
        };
        let err = verify_fulcio(
            &trust,
            &fixture("fulcio-cert"),
            Some(&fixture("fulcio-chain")),
            at(REKOR_SET_TIME),
        )
        .unwrap_err();
        assert!(
            matches!(&err, CertError::IssuerMismatch { found, .. } if found == "https://github.com/login/oauth"),
            "{err:?}"
        );
    }

    #[test]
    fn fulcio_garbage_leaf_or_chain_is_refused() {
        let chain = fixture("fulcio-chain");
        let cert = fixture("fulcio-cert");
        let garbage = b"this is not a certificate".as_slice();
        let err =
            verify_fulcio(&fulcio_trust(), garbage, Some(&chain), at(REKOR_SET_TIME)).unwrap_err();
        assert!(
            matches!(
                err,
                CertError::Pem {
                    source_of: CertSource::Leaf,
                    ..
                }
            ),
            "{err:?}"
        );
        let err =
            verify_fulcio(&fulcio_trust(), &cert, Some(garbage), at(REKOR_SET_TIME)).unwrap_err();
        assert!(
            matches!(
                err,
                CertError::Pem {
                    source_of: CertSource::Chain,
                    ..
                }
            ),
            "{err:?}"
        );
        let err =
            verify_fulcio(&fulcio_trust(), b"", Some(&chain), at(REKOR_SET_TIME)).unwrap_err();
        assert!(
            matches!(err, CertError::NoCertificate(CertSource::Leaf)),
            "{err:?}"
        );
        let doubled = [&cert[..], &cert[..]].concat();
        let err =
            verify_fulcio(&fulcio_trust(), &doubled, Some(&chain), at(REKOR_SET_TIME)).unwrap_err();
        assert!(matches!(err, CertError::MultipleLeaves(2)), "{err:?}");
    }

    #[test]
    fn fulcio_rekor_fixture_leaf_chains_at_its_integrated_time() {
        let annotations = annotations("dir-img-cosign-fulcio-rekor-valid/signature-1");
        let cert = annotations["dev.sigstore.cosign/certificate"]
            .as_str()
            .unwrap();
        let chain = annotations["dev.sigstore.cosign/chain"].as_str().unwrap();
        assert_eq!(chain.as_bytes(), fixture("fulcio-chain").trim_ascii_end());
        verify_fulcio(
            &fulcio_trust(),
            cert.as_bytes(),
            Some(chain.as_bytes()),
            at(1_674_247_893),
        )
        .unwrap();
        let err =
            verify_fulcio(&fulcio_trust(), cert.as_bytes(), None, at(1_674_247_893)).unwrap_err();
        assert!(matches!(err, CertError::NoPathToTrustedRoot), "{err:?}");
    }

    #[test]
    fn pki_cert_with_configured_intermediates_is_valid_now() {
        let leaf = verify_pki(&pki_trust(), &fixture("pki-cert"), None, SystemTime::now()).unwrap();
        let leaf_with_chain = verify_pki(
            &pki_trust(),
            &fixture("pki-cert"),
            Some(&fixture("pki-chain")),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(leaf.key, leaf_with_chain.key);
        assert!(!leaf.key.is_ecdsa());
    }

    #[test]
    fn pki_roots_only_needs_the_chain_annotation() {
        let trust = PkiTrust {
            intermediates_pem: None,
            ..pki_trust()
        };
        let err = verify_pki(&trust, &fixture("pki-cert"), None, SystemTime::now()).unwrap_err();
        assert!(matches!(err, CertError::NoPathToTrustedRoot), "{err:?}");
        verify_pki(
            &trust,
            &fixture("pki-cert"),
            Some(&fixture("pki-chain")),
            SystemTime::now(),
        )
        .unwrap();
    }

    #[test]
    fn pki_email_and_hostname_are_checked() {
        let now = SystemTime::now();
        let cert = fixture("pki-cert");
        for (email, hostname) in [
            (Some("qiwan@redhat.com"), None),
            (None, Some("myhost.example.com")),
            (None, Some("MYHOST.example.com")),
        ] {
            let trust = PkiTrust {
                subject_email: email.map(Into::into),
                subject_hostname: hostname.map(Into::into),
                ..pki_trust()
            };
            verify_pki(&trust, &cert, None, now).unwrap();
        }
        let trust = PkiTrust {
            subject_email: Some("someone@example.com".into()),
            ..pki_trust()
        };
        let err = verify_pki(&trust, &cert, None, now).unwrap_err();
        assert!(matches!(err, CertError::EmailMismatch { .. }), "{err:?}");
        let trust = PkiTrust {
            subject_hostname: Some("otherhost.example.com".into()),
            ..pki_trust()
        };
        let err = verify_pki(&trust, &cert, None, now).unwrap_err();
        match err {
            CertError::HostnameMismatch { found, .. } => assert_eq!(found, ["myhost.example.com"]),
            other => panic!("unexpected {other:?}"),
        }
        let trust = PkiTrust {
            subject_email: None,
            subject_hostname: None,
            ..pki_trust()
        };
        assert!(matches!(
            verify_pki(&trust, &cert, None, now),
            Err(CertError::NoPkiIdentity)
        ));
    }

    #[test]
    fn pki_garbage_leaf_or_chain_is_refused() {
        let now = SystemTime::now();
        assert!(verify_pki(&pki_trust(), b"garbage", None, now).is_err());
        assert!(verify_pki(&pki_trust(), &fixture("pki-cert"), Some(b"garbage"), now).is_err());
    }

    #[test]
    fn pki_fixture_payload_signature_verifies_with_leaf_key() {
        let annotations = annotations("dir-img-cosign-pki-valid/signature-1");
        let cert = annotations["dev.sigstore.cosign/certificate"]
            .as_str()
            .unwrap();
        let chain = annotations["dev.sigstore.cosign/chain"].as_str().unwrap();
        let trust = PkiTrust {
            intermediates_pem: None,
            ..pki_trust()
        };
        let leaf = verify_pki(
            &trust,
            cert.as_bytes(),
            Some(chain.as_bytes()),
            SystemTime::now(),
        )
        .unwrap();
        let raw = fixture("dir-img-cosign-pki-valid/signature-1");
        let json: serde_json::Value =
            serde_json::from_slice(raw.strip_prefix(b"\0sigstore-json\n").unwrap()).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = b64.decode(json["payload"].as_str().unwrap()).unwrap();
        let signature: String = annotations["dev.cosignproject.cosign/signature"]
            .as_str()
            .unwrap()
            .chars()
            .filter(|c| !matches!(c, '\r' | '\n'))
            .collect();
        let signature = b64.decode(signature).unwrap();
        assert!(leaf.key.verify(&payload, &signature));
        assert!(!leaf.key.verify(b"other", &signature));
    }

    #[test]
    fn chain_annotation_last_certificate_is_never_used() {
        // A chain annotation of the intermediate alone: it is taken as the root
        // and dropped, so there is no path (as upstream).
        let intermediate = parse_pem(&fixture("fulcio-chain")).unwrap().remove(0).der;
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::engine::general_purpose::STANDARD.encode(intermediate)
        );
        let err = verify_fulcio(
            &fulcio_trust(),
            &fixture("fulcio-cert"),
            Some(pem.as_bytes()),
            at(REKOR_SET_TIME),
        )
        .unwrap_err();
        assert!(matches!(err, CertError::NoPathToTrustedRoot), "{err:?}");
    }

    #[test]
    fn root_certificate_validity_is_checked() {
        let root = parse_pem(&fixture("fulcio_v1.crt.pem"))
            .unwrap()
            .remove(0)
            .der;
        // Valid 2021-10-07 – 2031-10-05.
        check_root_certificate(&root, REKOR_SET_TIME as i64).unwrap();
        assert!(matches!(
            check_root_certificate(&root, 1_600_000_000),
            Err(webpki::Error::CertNotValidYet { .. })
        ));
        assert!(matches!(
            check_root_certificate(&root, 2_000_000_000),
            Err(webpki::Error::CertExpired { .. })
        ));
    }

    #[test]
    fn der_utf8_string_is_strict() {
        assert_eq!(der_utf8_string(b"\x0c\x03abc").unwrap(), "abc");
        assert!(der_utf8_string(b"\x0c\x03ab").is_err());
        assert!(der_utf8_string(b"\x0c\x02abc").is_err());
        assert!(der_utf8_string(b"\x13\x03abc").is_err());
        assert!(der_utf8_string(b"\x0c\x81\x03abc").is_err());
    }
}
