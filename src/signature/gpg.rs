//! OpenPGP "simple signing" signatures (policy.json `signedBy`, `keyType: GPGKeys`):
//! the trusted keys of one requirement, and the check of one signature message
//! against them.
//!
//! rPGP parses the packets, hashes and does the public-key arithmetic (RSA, DSA,
//! ECDSA, EdDSA; version 3 and version 4 signature packets alike). It leaves the
//! verdict to the caller: `Message::verify` does not look at the signature type,
//! expiry, revocations or key bindings, so [`verify`] re-checks each signature with
//! `Signature::verify` over the literal data it read and then decides, at `now`,
//! whether the signing key was allowed to sign: not revoked, not expired, bound to
//! its primary key, marked for signing, and cross-certified if it is a subkey.

use std::borrow::Cow;
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use pgp::armor::Dearmor;
use pgp::composed::{Message, SignedPublicKey, SignedPublicKeyParser, SignedPublicSubKey};
use pgp::crypto::hash::HashAlgorithm;
use pgp::packet::{Packet, PacketParser, Signature, SignatureType, SubpacketData};
use pgp::types::{Fingerprint, KeyDetails, KeyId, Tag};

/// Largest signed payload we read out of a message. Simple-signing payloads are a
/// few hundred bytes; the limit stops a small compressed message from inflating
/// into gigabytes.
const MAX_PAYLOAD_BYTES: usize = 4 << 20;

/// How many compressed layers we unwrap before calling the message malformed.
const MAX_COMPRESSION_LAYERS: usize = 4;

/// OpenPGP public keys trusted by one requirement.
#[derive(Debug, Clone)]
pub struct GpgKeyring {
    keys: Vec<SignedPublicKey>,
}

impl GpgKeyring {
    /// Each source is the bytes of one keyPath file or one keyData value: one or more
    /// transferable public keys, binary or ASCII-armored, possibly concatenated (a
    /// keyring file such as pubring.gpg holds several; the same file twice is fine).
    /// A source with no key in it is an error (containers/image refuses it).
    pub fn parse(sources: &[Vec<u8>]) -> Result<GpgKeyring, GpgError> {
        let mut keys = Vec::new();
        for (index, source) in sources.iter().enumerate() {
            let found =
                parse_source(source).map_err(|cause| GpgError::NoKeyInSource { index, cause })?;
            keys.extend(found);
        }
        Ok(GpgKeyring { keys })
    }

    /// Primary-key fingerprints, upper-case hex, in file order (duplicates kept).
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|key| fingerprint_hex(&key.primary_key.fingerprint()))
            .collect()
    }
}

/// A cryptographically good signature by a trusted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The signed literal data (the JSON payload, unparsed).
    pub payload: Vec<u8>,
    /// Primary fingerprint (upper-case hex) of the trusted key; a signature made by a
    /// subkey reports its primary key.
    pub signer: String,
}

/// Why a key source or a signature was refused. Key IDs and fingerprints are
/// upper-case hex, times are UTC.
#[derive(Debug, thiserror::Error)]
pub enum GpgError {
    #[error("GPG key source {index} holds no usable OpenPGP public key: {cause}")]
    NoKeyInSource {
        /// Position of the source in the list given to [`GpgKeyring::parse`].
        index: usize,
        #[source]
        cause: KeySourceError,
    },
    #[error("not an OpenPGP signature: {}", first_byte_text(.first_byte))]
    NotOpenPgp { first_byte: Option<u8> },
    #[error("malformed OpenPGP message: {0}")]
    Malformed(#[source] pgp::errors::Error),
    #[error("OpenPGP message is encrypted, not signed")]
    Encrypted,
    #[error("OpenPGP message holds no signature")]
    NoSignature,
    #[error("signed payload is larger than {MAX_PAYLOAD_BYTES} bytes")]
    PayloadTooLarge,
    #[error("signature by key {key_id} has type {}, only binary-document signatures (0x00) are accepted", signature_type_text(.typ))]
    UnsupportedSignatureType { key_id: String, typ: Option<u8> },
    #[error("signed by key {key_id}, which is not among the trusted GPG keys")]
    UnknownKey { key_id: String },
    #[error("signature by key {key_id} uses hash algorithm {hash}, which is too weak to trust")]
    WeakHash { key_id: String, hash: String },
    #[error(
        "signature by key {key_id} carries a critical notation {name:?} that is not understood"
    )]
    CriticalNotation { key_id: String, name: String },
    #[error("signature by key {key_id} does not verify: {source}")]
    BadSignature {
        key_id: String,
        #[source]
        source: pgp::errors::Error,
    },
    #[error("signature by key {key_id} has no creation time")]
    NoCreationTime { key_id: String },
    #[error("signature by key {key_id} expired at {}", utc(.at))]
    SignatureExpired {
        key_id: String,
        /// Seconds since the Unix epoch.
        at: u64,
    },
    #[error("GPG key {fingerprint} has been revoked")]
    KeyRevoked { fingerprint: String },
    #[error("GPG key {fingerprint} expired at {}", utc(.at))]
    KeyExpired {
        fingerprint: String,
        /// Seconds since the Unix epoch.
        at: u64,
    },
    #[error("GPG key {fingerprint} has no valid self-signature")]
    NoSelfSignature { fingerprint: String },
    #[error(
        "GPG subkey {subkey} is not bound to primary key {primary} by a valid binding signature"
    )]
    SubkeyNotBound { subkey: String, primary: String },
    #[error("GPG subkey {subkey} carries no valid back-signature to primary key {primary}, so it may not sign for it")]
    SubkeyNotCrossCertified { subkey: String, primary: String },
    #[error("GPG key {fingerprint} is not marked as a signing key")]
    NotSigningKey { fingerprint: String },
}

/// Why one key source yielded no key.
#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    #[error("it is empty")]
    Empty,
    #[error("it is neither binary OpenPGP data nor ASCII armor")]
    NotOpenPgp,
    #[error("its ASCII armor cannot be decoded: {0}")]
    Armor(#[source] pgp::errors::Error),
    #[error("it holds a {0} armor block, expected PGP PUBLIC KEY BLOCK")]
    NotPublicKeyBlock(String),
    #[error("it holds no public key packet")]
    NoKey,
    #[error("its key cannot be parsed: {0}")]
    Key(#[source] pgp::errors::Error),
}

/// Verifies one OpenPGP message (the bytes of a simple-signing signature, already
/// stripped of the optional `\0simple-signing\n` tag by the caller) at time `now`.
pub fn verify(keyring: &GpgKeyring, message: &[u8], now: SystemTime) -> Result<Verified, GpgError> {
    let first_byte = message.first().copied();
    if !first_byte.is_some_and(is_signature_first_byte) {
        return Err(GpgError::NotOpenPgp { first_byte });
    }
    let (payload, signatures) = read_signed_message(message)?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());

    // A message may carry several signatures; one good one by a trusted key is
    // enough. Otherwise report the most telling failure: a problem with a trusted
    // key says more than "unknown key".
    let mut refusal = None;
    for signature in &signatures {
        match check_signature(keyring, signature, &payload, now) {
            Ok(signer) => return Ok(Verified { payload, signer }),
            Err(error) => {
                let replace = match &refusal {
                    None => true,
                    Some(GpgError::UnknownKey { .. }) => {
                        !matches!(error, GpgError::UnknownKey { .. })
                    }
                    Some(_) => false,
                };
                if replace {
                    refusal = Some(error);
                }
            }
        }
    }
    Err(refusal.unwrap_or(GpgError::NoSignature))
}

/// The first bytes containers/image accepts for an untagged signature: the packet
/// header of compressed data (`0xA0`–`0xA3`, `0xC8`), a one-pass signature
/// (`0x90`–`0x92`, `0xC4`) or a signature (`0x88`–`0x8B`, `0xC2`).
fn is_signature_first_byte(byte: u8) -> bool {
    matches!(byte, 0xA0..=0xA3 | 0xC8 | 0x90..=0x92 | 0xC4 | 0x88..=0x8B | 0xC2)
}

fn first_byte_text(first_byte: &Option<u8>) -> String {
    match first_byte {
        None => "the signature is empty".to_owned(),
        Some(byte) => format!(
            "first byte {byte:#04x} is not the header of a compressed, one-pass signature or signature packet"
        ),
    }
}

fn signature_type_text(typ: &Option<u8>) -> String {
    match typ {
        Some(typ) => format!("{typ:#04x}"),
        None => "unknown".to_owned(),
    }
}

/// Reads the literal data out of the message and collects its signatures.
fn read_signed_message(message: &[u8]) -> Result<(Vec<u8>, Vec<Signature>), GpgError> {
    let mut message = Message::from_bytes(message).map_err(GpgError::Malformed)?;
    let mut layers = 0;
    loop {
        match innermost(&message) {
            Message::Encrypted { .. } => return Err(GpgError::Encrypted),
            Message::Compressed { .. } if layers < MAX_COMPRESSION_LAYERS => {
                message = message.decompress().map_err(GpgError::Malformed)?;
                layers += 1;
            }
            Message::Compressed { .. } => {
                return Err(GpgError::Malformed(pgp::errors::Error::from(
                    std::io::Error::other("too many nested compressed packets"),
                )));
            }
            Message::Literal { .. } | Message::Signed { .. } => break,
        }
    }
    if !message.is_signed() {
        return Err(GpgError::NoSignature);
    }

    let mut payload = Vec::new();
    (&mut message)
        .take(MAX_PAYLOAD_BYTES as u64 + 1)
        .read_to_end(&mut payload)
        .map_err(|error| GpgError::Malformed(error.into()))?;
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(GpgError::PayloadTooLarge);
    }
    // Only now, with every layer read to its end, do the signature readers hold
    // their signature packets.
    let mut signatures = Vec::new();
    collect_signatures(&message, &mut signatures);
    Ok((payload, signatures))
}

/// The message inside any signature layers.
fn innermost<'m, 'a>(message: &'m Message<'a>) -> &'m Message<'a> {
    match message {
        Message::Signed { reader, .. } => innermost(reader.get_ref()),
        other => other,
    }
}

fn collect_signatures(message: &Message<'_>, out: &mut Vec<Signature>) {
    if let Message::Signed { reader, .. } = message {
        if let Some(found) = reader.signatures() {
            out.extend(found.iter().map(|packet| packet.signature().clone()));
        }
        collect_signatures(reader.get_ref(), out);
    }
}

/// Checks one signature; on success returns the signer's primary fingerprint.
fn check_signature(
    keyring: &GpgKeyring,
    signature: &Signature,
    payload: &[u8],
    now: u64,
) -> Result<String, GpgError> {
    let key_id = issuer_text(signature);
    if signature.typ() != Some(SignatureType::Binary) {
        return Err(GpgError::UnsupportedSignatureType {
            key_id,
            typ: signature.typ().map(u8::from),
        });
    }
    let candidates: Vec<(&SignedPublicKey, Component<'_>)> = keyring
        .keys
        .iter()
        .flat_map(|cert| {
            std::iter::once((cert, Component::Primary)).chain(
                cert.public_subkeys
                    .iter()
                    .map(move |sub| (cert, Component::Subkey(sub))),
            )
        })
        .filter(|(cert, component)| issued_by(signature, cert, *component))
        .collect();
    let mut refusal = GpgError::UnknownKey { key_id };
    for (cert, component) in candidates {
        match check_signature_by(cert, component, signature, payload, now) {
            Ok(()) => return Ok(fingerprint_hex(&cert.primary_key.fingerprint())),
            // Keep the first refusal by a matching key; later candidates only share
            // a key ID with it.
            Err(error) => {
                if matches!(refusal, GpgError::UnknownKey { .. }) {
                    refusal = error;
                }
            }
        }
    }
    Err(refusal)
}

/// One key of a certificate: the primary key or one of its subkeys.
#[derive(Clone, Copy)]
enum Component<'a> {
    Primary,
    Subkey(&'a SignedPublicSubKey),
}

impl Component<'_> {
    fn key_id(self, cert: &SignedPublicKey) -> KeyId {
        match self {
            Component::Primary => cert.primary_key.legacy_key_id(),
            Component::Subkey(sub) => sub.key.legacy_key_id(),
        }
    }

    fn fingerprint(self, cert: &SignedPublicKey) -> Fingerprint {
        match self {
            Component::Primary => cert.primary_key.fingerprint(),
            Component::Subkey(sub) => sub.key.fingerprint(),
        }
    }
}

/// Does the signature name this key as its issuer? A signature that names none
/// is tried against every key.
fn issued_by(signature: &Signature, cert: &SignedPublicKey, component: Component<'_>) -> bool {
    let ids = signature.issuer_key_id();
    let fingerprints = signature.issuer_fingerprint();
    if ids.is_empty() && fingerprints.is_empty() {
        return true;
    }
    let id = component.key_id(cert);
    let fingerprint = component.fingerprint(cert);
    ids.iter().any(|issuer| **issuer == id) || fingerprints.iter().any(|fp| **fp == fingerprint)
}

fn check_signature_by(
    cert: &SignedPublicKey,
    component: Component<'_>,
    signature: &Signature,
    payload: &[u8],
    now: u64,
) -> Result<(), GpgError> {
    let key_id = hex::encode_upper(component.key_id(cert));
    if let Some(hash) = signature.hash_alg().filter(|hash| !acceptable_hash(*hash)) {
        return Err(GpgError::WeakHash {
            key_id,
            hash: hash.to_string(),
        });
    }
    // RFC 9580 5.2.3.24: a critical notation we do not understand invalidates the
    // signature (rPGP only refuses unknown critical subpacket types).
    if let Some(name) = critical_notation(signature) {
        return Err(GpgError::CriticalNotation { key_id, name });
    }
    let checked = match component {
        Component::Primary => signature.verify(&cert.primary_key, payload),
        Component::Subkey(sub) => signature.verify(&sub.key, payload),
    };
    checked.map_err(|source| GpgError::BadSignature {
        key_id: key_id.clone(),
        source,
    })?;

    let created = signature
        .created()
        .ok_or_else(|| GpgError::NoCreationTime {
            key_id: key_id.clone(),
        })?;
    if let Some(at) = expiry(
        u64::from(created.as_secs()),
        signature.signature_expiration_time(),
    ) {
        if now >= at {
            return Err(GpgError::SignatureExpired { key_id, at });
        }
    }
    check_key_may_sign(cert, component, now)
}

/// Whether the key that made a good signature was, at `now`, a valid signing key
/// of a valid certificate.
fn check_key_may_sign(
    cert: &SignedPublicKey,
    component: Component<'_>,
    now: u64,
) -> Result<(), GpgError> {
    let primary = &cert.primary_key;
    let primary_fp = fingerprint_hex(&primary.fingerprint());

    // A revocation counts whatever its date and reason, as gpg and containers/image
    // treat it (upstream's subkey-revoked fixture is revoked after it signed).
    let revoked = cert.details.revocation_signatures.iter().any(|revocation| {
        revocation.typ() == Some(SignatureType::KeyRevocation)
            && hash_ok(revocation)
            && revocation.verify_key(primary).is_ok()
    });
    if revoked {
        return Err(GpgError::KeyRevoked {
            fingerprint: primary_fp,
        });
    }
    let self_signature = newest_self_signature(cert).ok_or_else(|| GpgError::NoSelfSignature {
        fingerprint: primary_fp.clone(),
    })?;
    let primary_created = u64::from(primary.created_at().as_secs());
    let primary_expiry =
        expiry(primary_created, self_signature.key_expiration_time()).or_else(|| {
            primary
                .legacy_v3_expiration_days()
                .filter(|days| *days > 0)
                .map(|days| primary_created + u64::from(days) * 86_400)
        });
    if let Some(at) = primary_expiry {
        if now >= at {
            return Err(GpgError::KeyExpired {
                fingerprint: primary_fp,
                at,
            });
        }
    }

    let Component::Subkey(sub) = component else {
        return if may_sign(self_signature) {
            Ok(())
        } else {
            Err(GpgError::NotSigningKey {
                fingerprint: primary_fp,
            })
        };
    };
    let subkey_fp = fingerprint_hex(&sub.key.fingerprint());
    let revoked = sub.signatures.iter().any(|revocation| {
        revocation.typ() == Some(SignatureType::SubkeyRevocation)
            && hash_ok(revocation)
            && revocation.verify_subkey_binding(primary, &sub.key).is_ok()
    });
    if revoked {
        return Err(GpgError::KeyRevoked {
            fingerprint: subkey_fp,
        });
    }
    let binding = newest(sub.signatures.iter().filter(|binding| {
        binding.typ() == Some(SignatureType::SubkeyBinding)
            && hash_ok(binding)
            && binding.verify_subkey_binding(primary, &sub.key).is_ok()
    }))
    .ok_or_else(|| GpgError::SubkeyNotBound {
        subkey: subkey_fp.clone(),
        primary: primary_fp.clone(),
    })?;
    if !may_sign(binding) {
        return Err(GpgError::NotSigningKey {
            fingerprint: subkey_fp,
        });
    }
    // A signing subkey must sign its primary key back (0x19, embedded in the
    // binding), or anyone could bind someone else's signing subkey to their own
    // certificate and claim that key's signatures; gpg requires the same.
    let cross_certified = binding.embedded_signature().is_some_and(|back| {
        hash_ok(back) && back.verify_primary_key_binding(&sub.key, primary).is_ok()
    });
    if !cross_certified {
        return Err(GpgError::SubkeyNotCrossCertified {
            subkey: subkey_fp,
            primary: primary_fp,
        });
    }
    let subkey_created = u64::from(sub.key.created_at().as_secs());
    if let Some(at) = expiry(subkey_created, binding.key_expiration_time()) {
        if now >= at {
            return Err(GpgError::KeyExpired {
                fingerprint: subkey_fp,
                at,
            });
        }
    }
    Ok(())
}

/// The newest valid self-signature over the primary key: a direct-key signature or
/// a certification of a user ID that has not been revoked. It carries the key's
/// flags and expiry.
fn newest_self_signature(cert: &SignedPublicKey) -> Option<&Signature> {
    let primary = &cert.primary_key;
    let direct = cert.details.direct_signatures.iter().filter(|signature| {
        signature.typ() == Some(SignatureType::Key)
            && hash_ok(signature)
            && signature.verify_key(primary).is_ok()
    });
    let certifications = cert
        .details
        .users
        .iter()
        .filter(|user| {
            !user.signatures.iter().any(|revocation| {
                revocation.typ() == Some(SignatureType::CertRevocation)
                    && hash_ok(revocation)
                    && revocation
                        .verify_certification(primary, Tag::UserId, &user.id)
                        .is_ok()
            })
        })
        .flat_map(|user| {
            user.signatures.iter().filter(move |signature| {
                signature.is_certification()
                    && signature.typ() != Some(SignatureType::CertRevocation)
                    && hash_ok(signature)
                    && signature
                        .verify_certification(primary, Tag::UserId, &user.id)
                        .is_ok()
            })
        });
    newest(direct.chain(certifications))
}

fn newest<'s>(signatures: impl Iterator<Item = &'s Signature>) -> Option<&'s Signature> {
    signatures.max_by_key(|signature| signature.created().map(|created| created.as_secs()))
}

/// Signing is allowed when the key-flags subpacket says so or is absent (then the
/// algorithm decides, and rPGP refuses keys whose algorithm cannot sign).
fn may_sign(self_signature: &Signature) -> bool {
    let flags = self_signature.config().and_then(|config| {
        config
            .hashed_subpackets()
            .find_map(|subpacket| match &subpacket.data {
                SubpacketData::KeyFlags(flags) => Some(flags.sign()),
                _ => None,
            })
    });
    flags.unwrap_or(true)
}

fn critical_notation(signature: &Signature) -> Option<String> {
    signature.config().and_then(|config| {
        config
            .hashed_subpackets()
            .find_map(|subpacket| match &subpacket.data {
                SubpacketData::Notation(notation) if subpacket.is_critical => {
                    Some(String::from_utf8_lossy(&notation.name).into_owned())
                }
                _ => None,
            })
    })
}

/// MD5 is broken outright. SHA-1 is still accepted: containers/image and gpg accept
/// it, and a simple-signing payload leaves an attacker no room for the chosen
/// prefix a SHA-1 collision needs.
fn acceptable_hash(hash: HashAlgorithm) -> bool {
    !matches!(hash, HashAlgorithm::None | HashAlgorithm::Md5)
}

fn hash_ok(signature: &Signature) -> bool {
    signature.hash_alg().is_some_and(acceptable_hash)
}

/// `created + lifetime`, where a missing or zero lifetime means "never".
fn expiry(created: u64, lifetime: Option<pgp::types::Duration>) -> Option<u64> {
    lifetime
        .map(|lifetime| u64::from(lifetime.as_secs()))
        .filter(|secs| *secs > 0)
        .map(|secs| created + secs)
}

/// The issuer named by a signature, for messages: its key ID, or the key ID part
/// of its issuer fingerprint.
fn issuer_text(signature: &Signature) -> String {
    if let Some(id) = signature.issuer_key_id().first() {
        return hex::encode_upper(id);
    }
    match signature.issuer_fingerprint().first() {
        // A v4 key ID is the low 64 bits of the fingerprint, a v6 key ID the high ones.
        Some(Fingerprint::V4(fp)) => hex::encode_upper(&fp[12..]),
        Some(fp) => hex::encode_upper(&fp.as_bytes()[..8.min(fp.len())]),
        None => "(not named in the signature)".to_owned(),
    }
}

fn fingerprint_hex(fingerprint: &Fingerprint) -> String {
    format!("{fingerprint:X}")
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch.
fn utc(secs: &u64) -> String {
    crate::timestamp::unix(i64::try_from(*secs).unwrap_or(i64::MAX))
}

/// Parses every transferable public key in one source.
fn parse_source(source: &[u8]) -> Result<Vec<SignedPublicKey>, KeySourceError> {
    let start = source
        .iter()
        .position(|byte| !byte.is_ascii_whitespace())
        .ok_or(KeySourceError::Empty)?;
    let source = &source[start..];
    let binary: Cow<'_, [u8]> = if source[0] & 0x80 != 0 {
        Cow::Borrowed(source)
    } else {
        Cow::Owned(dearmor_all(source)?)
    };

    let packets = PacketParser::new(&binary[..])
        .filter_map(keep_key_packet)
        .peekable();
    let mut keys = Vec::new();
    let mut last_error = None;
    // Like containers/image (Go's openpgp.ReadKeyRing), a key that cannot be parsed
    // is skipped as long as the source yields another one.
    for key in SignedPublicKeyParser::from_packets(packets) {
        match key {
            Ok(key) => keys.push(key),
            Err(error) => {
                tracing::warn!(%error, "skipping an unparseable OpenPGP key");
                last_error = Some(error);
            }
        }
    }
    if keys.is_empty() {
        return Err(last_error.map_or(KeySourceError::NoKey, KeySourceError::Key));
    }
    Ok(keys)
}

/// Decodes each `-----BEGIN PGP PUBLIC KEY BLOCK-----` block in the text (a keyring
/// may be several exports concatenated) into one binary packet stream.
fn dearmor_all(text: &[u8]) -> Result<Vec<u8>, KeySourceError> {
    const BEGIN: &[u8] = b"-----BEGIN PGP ";
    let starts: Vec<usize> = text
        .windows(BEGIN.len())
        .enumerate()
        .filter(|(_, window)| *window == BEGIN)
        .map(|(at, _)| at)
        .collect();
    if starts.is_empty() {
        return Err(KeySourceError::NotOpenPgp);
    }
    let mut binary = Vec::new();
    for (n, start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(text.len());
        let mut dearmor = Dearmor::new(&text[*start..end]);
        dearmor.read_header().map_err(KeySourceError::Armor)?;
        match dearmor.typ {
            Some(pgp::armor::BlockType::PublicKey) => {}
            other => {
                return Err(KeySourceError::NotPublicKeyBlock(
                    other.map_or_else(|| "unknown".to_owned(), |typ| typ.to_string()),
                ))
            }
        }
        dearmor
            .read_to_end(&mut binary)
            .map_err(|error| KeySourceError::Armor(error.into()))?;
    }
    Ok(binary)
}

/// Drops what a keyring may hold between key packets that is not part of a key:
/// gpg's trust packets (in every pubring.gpg; left in, they would cut a key off
/// before its subkeys), marker and padding packets, and packets rPGP marks as safe
/// to skip (unknown non-critical types, unsupported versions).
fn keep_key_packet(
    packet: Result<Packet, pgp::errors::Error>,
) -> Option<Result<Packet, pgp::errors::Error>> {
    use pgp::errors::Error;
    match packet {
        Ok(Packet::Trust(_) | Packet::Marker(_) | Packet::Padding(_)) => None,
        Err(Error::Unsupported { .. } | Error::PacketIncomplete { .. }) => None,
        Err(Error::InvalidPacketContent { ref source })
            if matches!(**source, Error::Unsupported { .. }) =>
        {
            None
        }
        other => Some(other),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pgp::packet::SignatureVersion;

    use super::*;

    const TEST_KEY: &str = "08CD26E446E2E95249B7A405E932F44B23E8DD43";
    const SUBKEY_PRIMARY: &str = "B9F4CDB9FD8C475BFA340AC38D54A947EE396F36";

    use crate::signature::fixtures::read as fixture;

    fn keyring(files: &[&str]) -> GpgKeyring {
        let sources: Vec<Vec<u8>> = files.iter().map(|file| fixture(file)).collect();
        GpgKeyring::parse(&sources).expect("fixture keys parse")
    }

    fn check(keys: &[&str], signature: &str) -> Result<Verified, GpgError> {
        verify(&keyring(keys), &fixture(signature), SystemTime::now())
    }

    #[test]
    fn image_signature_verifies_with_armored_key() {
        let verified = check(&["public-key.gpg"], "image.signature").expect("good signature");
        assert!(verified.payload.starts_with(br#"{"critical""#));
        assert_eq!(verified.signer, TEST_KEY);
    }

    #[test]
    fn image_signature_verifies_with_binary_key() {
        let verified = check(&["public-key-1.gpg"], "image.signature").expect("good signature");
        assert_eq!(verified.signer, TEST_KEY);
    }

    #[test]
    fn pubring_twice_lists_four_primaries_twice_and_verifies() {
        let ring = keyring(&["pubring.gpg", "pubring.gpg"]);
        let four = [
            "F2B501009F78B0B340221A12A3CD242DA6028093",
            TEST_KEY,
            SUBKEY_PRIMARY,
            "6D88C5A1993648A17B2BB0DC6B8499AF63388D63",
        ];
        let expected: Vec<String> = four.iter().chain(&four).map(|fp| fp.to_string()).collect();
        assert_eq!(ring.fingerprints(), expected);
        // The trust packets of the binary keyring must not cut the subkeys off.
        let now = SystemTime::now();
        let image = verify(&ring, &fixture("image.signature"), now).expect("good signature");
        assert_eq!(image.signer, TEST_KEY);
        let subkey = verify(&ring, &fixture("subkey.signature"), now).expect("good signature");
        assert_eq!(subkey.signer, SUBKEY_PRIMARY);
    }

    #[test]
    fn armored_keys_concatenated_in_one_source_are_all_read() {
        let mut both = fixture("public-key.gpg");
        both.extend(fixture("public-key-with-subkey.gpg"));
        let ring = GpgKeyring::parse(&[both]).expect("keys parse");
        assert_eq!(ring.fingerprints(), [TEST_KEY, SUBKEY_PRIMARY]);
    }

    #[test]
    fn signature_without_optional_fields_verifies() {
        let verified =
            check(&["public-key.gpg"], "no-optional-fields.signature").expect("good signature");
        assert_eq!(verified.signer, TEST_KEY);
        assert!(verified.payload.starts_with(br#"{"critical""#));
    }

    #[test]
    fn dir_img_valid_signature_verifies() {
        let verified =
            check(&["public-key.gpg"], "dir-img-valid/signature-1").expect("good signature");
        assert_eq!(verified.signer, TEST_KEY);
        assert!(verified.payload.starts_with(br#"{"critical""#));
    }

    #[test]
    fn invalid_blob_is_a_good_signature_over_non_json_in_v4_and_v3() {
        for file in ["invalid-blob.signature", "invalid-blob.signature-v3"] {
            let verified =
                check(&["public-key.gpg"], file).unwrap_or_else(|error| panic!("{file}: {error}"));
            assert_eq!(verified.payload, b"This is not JSON\n", "{file}");
            assert_eq!(verified.signer, TEST_KEY, "{file}");
        }
        assert_signature_version("invalid-blob.signature-v3", SignatureVersion::V3);
        assert_signature_version("invalid-blob.signature", SignatureVersion::V4);
    }

    fn assert_signature_version(file: &str, version: SignatureVersion) {
        let (_, signatures) = read_signed_message(&fixture(file)).expect("readable message");
        assert_eq!(signatures.len(), 1, "{file}");
        assert_eq!(signatures[0].version(), version, "{file}");
    }

    #[test]
    fn corrupt_signatures_are_bad_in_v4_and_v3() {
        for file in ["corrupt.signature", "corrupt.signature-v3"] {
            let error = check(&["public-key.gpg"], file).expect_err(file);
            assert!(
                matches!(&error, GpgError::BadSignature { key_id, .. } if key_id == "E932F44B23E8DD43"),
                "{file}: {error}"
            );
        }
    }

    #[test]
    fn expired_signature_is_refused_after_its_expiry_only() {
        let error = check(&["public-key.gpg"], "expired.signature").expect_err("expired");
        assert!(
            matches!(
                error,
                GpgError::SignatureExpired {
                    at: 1_750_759_200,
                    ..
                }
            ),
            "{error}"
        );
        assert!(
            error.to_string().contains("2025-06-24T10:00:00Z"),
            "{error}"
        );
        // An hour before it expired it was good.
        let before = UNIX_EPOCH + Duration::from_secs(1_750_759_200 - 3_600);
        let verified = verify(
            &keyring(&["public-key.gpg"]),
            &fixture("expired.signature"),
            before,
        )
        .expect("good before expiry");
        assert_eq!(verified.payload, b"This signature is expired.\n");
    }

    #[test]
    fn unknown_key_signatures_name_the_key_id_in_v4_and_v3() {
        for file in ["unknown-key.signature", "unknown-key.signature-v3"] {
            for keys in [&["public-key.gpg"][..], &["pubring.gpg"]] {
                let error = check(keys, file).expect_err(file);
                assert!(
                    matches!(&error, GpgError::UnknownKey { key_id } if key_id == "5F9470E3BC6C3B55"),
                    "{file}: {error}"
                );
                assert!(error.to_string().contains("5F9470E3BC6C3B55"), "{error}");
            }
        }
    }

    #[test]
    fn keyring_without_the_signer_reports_unknown_key() {
        let error = check(&["public-key-2.gpg"], "image.signature").expect_err("unknown key");
        assert!(
            matches!(&error, GpgError::UnknownKey { key_id } if key_id == "E932F44B23E8DD43"),
            "{error}"
        );
        let error = verify(
            &GpgKeyring::parse(&[]).expect("no sources"),
            &fixture("image.signature"),
            SystemTime::now(),
        )
        .expect_err("empty keyring");
        assert!(matches!(error, GpgError::UnknownKey { .. }), "{error}");
    }

    #[test]
    fn subkey_signatures_report_the_primary_in_v4_and_v3() {
        for file in ["subkey.signature", "subkey.signature-v3"] {
            let verified = check(&["public-key-with-subkey.gpg"], file)
                .unwrap_or_else(|error| panic!("{file}: {error}"));
            assert_eq!(verified.signer, SUBKEY_PRIMARY, "{file}");
            assert!(verified.payload.starts_with(br#"{"critical""#), "{file}");
        }
        assert_signature_version("subkey.signature-v3", SignatureVersion::V3);
        let error = check(&["public-key.gpg"], "subkey.signature").expect_err("other key");
        assert!(
            matches!(&error, GpgError::UnknownKey { key_id } if key_id == "D75B3109B3BAAEAF"),
            "{error}"
        );
    }

    #[test]
    fn revoked_subkey_signatures_are_refused_in_v4_and_v3() {
        for file in ["subkey-revoked.signature", "subkey-revoked.signature-v3"] {
            let error = check(&["public-key-with-revoked-subkey.gpg"], file).expect_err(file);
            assert!(
                matches!(&error, GpgError::KeyRevoked { fingerprint }
                    if fingerprint == "4D33404E00B470050709F3233EF0F93A1F602997"),
                "{file}: {error}"
            );
        }
    }

    #[test]
    fn subkey_without_binding_signature_is_refused() {
        let mut ring = keyring(&["public-key-with-subkey.gpg"]);
        ring.keys[0].public_subkeys[0].signatures.clear();
        let error = verify(&ring, &fixture("subkey.signature"), SystemTime::now())
            .expect_err("unbound subkey");
        assert!(matches!(error, GpgError::SubkeyNotBound { .. }), "{error}");
    }

    #[test]
    fn subkey_without_back_signature_is_refused() {
        let mut ring = keyring(&["public-key-with-subkey.gpg"]);
        for binding in &mut ring.keys[0].public_subkeys[0].signatures {
            // gpg stores the back-signature unhashed, so the binding stays valid.
            while let Some(at) = binding.config().and_then(|config| {
                config
                    .unhashed_subpackets()
                    .position(|sp| matches!(sp.data, SubpacketData::EmbeddedSignature(_)))
            }) {
                binding
                    .unhashed_subpacket_remove(at)
                    .expect("remove subpacket");
            }
        }
        let error = verify(&ring, &fixture("subkey.signature"), SystemTime::now())
            .expect_err("subkey not cross-certified");
        assert!(
            matches!(error, GpgError::SubkeyNotCrossCertified { .. }),
            "{error}"
        );
    }

    #[test]
    fn certify_only_primary_key_may_not_sign() {
        // The primary of public-key-with-subkey.gpg is certify-only; pretend the
        // signature came from it by dropping the subkey.
        let mut ring = keyring(&["public-key-with-subkey.gpg"]);
        ring.keys[0].public_subkeys.clear();
        let error = verify(&ring, &fixture("subkey.signature"), SystemTime::now())
            .expect_err("subkey gone");
        assert!(matches!(error, GpgError::UnknownKey { .. }), "{error}");
        assert!(!may_sign(
            newest_self_signature(&ring.keys[0]).expect("self-signature")
        ));
    }

    #[test]
    fn unsigned_literal_has_no_signature() {
        let error = check(&["public-key.gpg"], "unsigned-literal.signature").expect_err("unsigned");
        assert!(matches!(error, GpgError::NoSignature), "{error}");
    }

    #[test]
    fn encrypted_message_is_refused() {
        let error =
            check(&["public-key.gpg"], "unsigned-encrypted.signature").expect_err("encrypted");
        assert!(
            matches!(
                error,
                GpgError::NotOpenPgp {
                    first_byte: Some(0x84)
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn only_signature_packet_headers_are_accepted_as_first_byte() {
        let accepted = [
            0xA0, 0xA1, 0xA2, 0xA3, 0xC8, 0x90, 0x91, 0x92, 0xC4, 0x88, 0x89, 0x8A, 0x8B, 0xC2,
        ];
        for byte in 0..=u8::MAX {
            assert_eq!(
                is_signature_first_byte(byte),
                accepted.contains(&byte),
                "{byte:#04x}"
            );
        }
        let ring = keyring(&["public-key.gpg"]);
        let error = verify(&ring, b"", SystemTime::now()).expect_err("empty");
        assert!(
            matches!(error, GpgError::NotOpenPgp { first_byte: None }),
            "{error}"
        );
        let error = verify(&ring, b"{\"critical\":{}}", SystemTime::now()).expect_err("json");
        assert!(
            matches!(
                error,
                GpgError::NotOpenPgp {
                    first_byte: Some(b'{')
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn truncated_message_is_refused() {
        let whole = fixture("image.signature");
        for len in [1, 2, whole.len() / 2, whole.len() - 1] {
            let error = verify(
                &keyring(&["public-key.gpg"]),
                &whole[..len],
                SystemTime::now(),
            )
            .expect_err("truncated");
            assert!(
                matches!(error, GpgError::Malformed(_) | GpgError::NoSignature),
                "{len}: {error}"
            );
        }
    }

    #[test]
    fn key_sources_without_a_key_are_errors() {
        for (source, why) in [
            (&b""[..], "empty"),
            (b" \n", "blank"),
            (b"nonsense", "garbage keyData"),
            (&[0xA3, 0x01, 0x02][..], "binary garbage"),
            (b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!!\n-----END PGP PUBLIC KEY BLOCK-----\n", "bad armor"),
        ] {
            let sources = vec![fixture("public-key.gpg"), source.to_vec()];
            let error = GpgKeyring::parse(&sources).expect_err(why);
            assert!(matches!(error, GpgError::NoKeyInSource { index: 1, .. }), "{why}: {error}");
        }
        let text = String::from_utf8(fixture("public-key.gpg")).expect("armored key is text");
        let wrong_block = text.replace("PUBLIC KEY BLOCK", "MESSAGE");
        let error = GpgKeyring::parse(&[wrong_block.into_bytes()]).expect_err("message block");
        assert!(
            matches!(
                error,
                GpgError::NoKeyInSource {
                    index: 0,
                    cause: KeySourceError::NotPublicKeyBlock(_)
                }
            ),
            "{error}"
        );
    }
}
