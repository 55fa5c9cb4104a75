//! Registry errors: what went wrong talking to a registry, with the registry's own JSON
//! error codes parsed so callers match variants rather than strings. No message here
//! ever carries a credential or a token.

use crate::digest::{Digest, DigestError};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// DNS, connect, TLS, or the connection dropped before a response came.
    #[error("registry {host} is unreachable: {detail}")]
    Unreachable {
        host: String,
        detail: String,
        /// The connection was made and then failed or went unanswered (a reset, a
        /// timeout): worth a retry. A refused or unresolvable host is not: the next
        /// source is tried at once.
        transient: bool,
    },
    /// The connection broke while a body was arriving.
    #[error("transfer from registry {host} was interrupted: {detail}")]
    Interrupted { host: String, detail: String },
    /// No progress within `[pull] progress_timeout` (nothing arrived, or a trickle
    /// below `min_bytes_per_second`): the pull is given up, not resumed.
    #[error("registry {host} stalled on {what} after {received} bytes: {why}")]
    Stalled {
        host: String,
        what: String,
        received: u64,
        why: String,
    },
    /// 401 after every authentication step we could take.
    #[error("registry {host} answered 401 Unauthorized{}", detail_suffix(.detail))]
    Unauthorized { host: String, detail: String },
    /// 403, or a `DENIED` error code.
    #[error("registry {host} answered 403 Forbidden{}", detail_suffix(.detail))]
    Denied { host: String, detail: String },
    #[error("{what} not found on registry {host}")]
    NotFound { host: String, what: NotFound },
    #[error("registry {host} is rate limiting requests (429){}", retry_suffix(.retry_after))]
    TooManyRequests {
        host: String,
        retry_after: Option<RetryAfter>,
    },
    /// A 5xx answer (or another status we have no better name for).
    #[error("registry {host} failed with HTTP {status}{}{}", code_suffix(.code), detail_suffix(.detail))]
    Server {
        host: String,
        status: u16,
        code: Option<ErrorCode>,
        detail: String,
    },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// A blob ended early or ran past the size its descriptor declares.
    #[error("blob {digest} size mismatch: descriptor says {expected} bytes, registry sent {}{received}", if *.received > *.expected { "at least " } else { "" })]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        received: u64,
    },
    #[error("{media_type} is not supported: {why}")]
    Unsupported {
        media_type: String,
        why: &'static str,
    },
    #[error("manifest from registry {host} exceeds the {limit}-byte limit")]
    ManifestTooLarge { host: String, limit: usize },
    /// The registry broke the protocol: a redirect without `Location`, a bad
    /// `Content-Range`, an unreadable token response, and the like.
    #[error("registry {host} sent an invalid response: {detail}")]
    BadResponse { host: String, detail: String },
    #[error("registry {host} redirected more than {limit} times")]
    TooManyRedirects { host: String, limit: usize },
    /// We refuse to leave HTTPS for plain HTTP, or to use a plain-HTTP token realm
    /// for a registry that is not configured insecure.
    #[error("refusing plain HTTP URL {url} for registry {host}: it is not configured insecure")]
    InsecureUrl { host: String, url: String },
    /// A redirect from HTTPS to plain HTTP, refused for every endpoint.
    #[error("registry {host} redirected from HTTPS to plain HTTP ({url}); refusing to follow")]
    DowngradeRedirect { host: String, url: String },
    #[error("reference {reference:?} is not a valid tag or digest")]
    InvalidReference {
        reference: String,
        #[source]
        source: DigestError,
    },
    #[error("cannot build a request URL for {what}: {source}")]
    InvalidUrl {
        what: String,
        #[source]
        source: url::ParseError,
    },
    #[error("cannot resume blob {digest} at offset {offset}: it is only {size} bytes")]
    OffsetBeyondEnd {
        digest: Digest,
        offset: u64,
        size: u64,
    },
    /// An extra CA file for this host could not be read or parsed.
    #[error("cannot load extra CA certificates for {host} from {path}: {source}")]
    TrustStore {
        host: String,
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

impl RegistryError {
    /// The registry could not serve us right now (network trouble, 5xx, rate limit,
    /// a broken transfer): another mirror or a later retry may well succeed.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. }
            | RegistryError::Interrupted { .. }
            | RegistryError::Stalled { .. }
            | RegistryError::TooManyRequests { .. } => true,
            RegistryError::Server { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// Whether the same request may well succeed if sent again shortly: a dropped or
    /// unanswered connection, 5xx, 429. Never 4xx, a refused connection, or a stall.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { transient, .. } => *transient,
            RegistryError::Interrupted { .. } | RegistryError::TooManyRequests { .. } => true,
            RegistryError::Server { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// The credential (or its absence) was the problem: the next credential may work.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            RegistryError::Unauthorized { .. } | RegistryError::Denied { .. }
        )
    }
}

/// What was missing, as precisely as the registry told us. A request's manifest or
/// blob is also what [`from_status`] reports missing on a 404.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotFound {
    Repository(String),
    Manifest {
        repository: String,
        reference: String,
    },
    Blob {
        repository: String,
        digest: Digest,
    },
}

impl NotFound {
    /// The repository it is (or would be) in.
    pub fn repository(&self) -> &str {
        match self {
            NotFound::Repository(repository)
            | NotFound::Manifest { repository, .. }
            | NotFound::Blob { repository, .. } => repository,
        }
    }
}

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotFound::Repository(r) => write!(f, "repository {r}"),
            NotFound::Manifest {
                repository,
                reference,
            } if reference.contains(':') => write!(f, "manifest {repository}@{reference}"),
            NotFound::Manifest {
                repository,
                reference,
            } => write!(f, "manifest {repository}:{reference}"),
            NotFound::Blob { repository, digest } => write!(f, "blob {digest} in {repository}"),
        }
    }
}

/// `Retry-After`: delta-seconds, or an HTTP date kept as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryAfter {
    Delay(Duration),
    At(String),
}

impl RetryAfter {
    pub fn from_headers(headers: &HeaderMap) -> Option<RetryAfter> {
        let value = headers
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim();
        match value.parse::<u64>() {
            Ok(secs) => Some(RetryAfter::Delay(Duration::from_secs(secs))),
            Err(_) if !value.is_empty() => Some(RetryAfter::At(value.to_string())),
            Err(_) => None,
        }
    }
}

/// The distribution spec's error codes (plus the ones registries commonly send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    NameInvalid,
    ManifestInvalid,
    DigestInvalid,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// A code outside the spec, kept verbatim so it can be shown.
    Unrecognized(String),
}

impl ErrorCode {
    pub fn parse(code: &str) -> ErrorCode {
        match code {
            "BLOB_UNKNOWN" => ErrorCode::BlobUnknown,
            "MANIFEST_UNKNOWN" => ErrorCode::ManifestUnknown,
            "NAME_UNKNOWN" => ErrorCode::NameUnknown,
            "NAME_INVALID" => ErrorCode::NameInvalid,
            "MANIFEST_INVALID" => ErrorCode::ManifestInvalid,
            "DIGEST_INVALID" => ErrorCode::DigestInvalid,
            "SIZE_INVALID" => ErrorCode::SizeInvalid,
            "UNAUTHORIZED" => ErrorCode::Unauthorized,
            "DENIED" => ErrorCode::Denied,
            "UNSUPPORTED" => ErrorCode::Unsupported,
            "TOOMANYREQUESTS" => ErrorCode::TooManyRequests,
            other => ErrorCode::Unrecognized(other.to_string()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unrecognized(s) => s,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the registry's `{"errors":[...]}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryMessage {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Deserialize)]
struct ErrorsBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Longest registry message we repeat; the rest is noise in a pod event.
const MAX_MESSAGE: usize = 200;

/// Parses a distribution error body; anything else (HTML from a proxy, empty) gives none.
pub fn parse_error_body(body: &[u8]) -> Vec<RegistryMessage> {
    let Ok(parsed) = serde_json::from_slice::<ErrorsBody>(body) else {
        return Vec::new();
    };
    parsed
        .errors
        .into_iter()
        .map(|e| RegistryMessage {
            code: ErrorCode::parse(&e.code),
            message: truncate(&e.message),
        })
        .collect()
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Turns a non-success response into the matching error. `body` is the (bounded)
/// start of the response body; `subject` is the manifest or blob asked for.
pub(crate) fn from_status(
    host: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    subject: &NotFound,
) -> RegistryError {
    let messages = parse_error_body(body);
    let detail = messages
        .iter()
        .map(|m| format!("{} ({})", m.message, m.code))
        .collect::<Vec<_>>()
        .join("; ");
    let host = host.to_string();
    let has = |code: ErrorCode| messages.iter().any(|m| m.code == code);

    // The codes are more precise than the status: a 404 may be a missing repository
    // or a missing tag, and some registries send codes with unusual statuses.
    if has(ErrorCode::NameUnknown) {
        return RegistryError::NotFound {
            host,
            what: NotFound::Repository(subject.repository().to_string()),
        };
    }
    if has(ErrorCode::ManifestUnknown) || has(ErrorCode::BlobUnknown) {
        return RegistryError::NotFound {
            host,
            what: subject.clone(),
        };
    }
    match status {
        StatusCode::UNAUTHORIZED => RegistryError::Unauthorized { host, detail },
        StatusCode::FORBIDDEN => RegistryError::Denied { host, detail },
        StatusCode::NOT_FOUND => RegistryError::NotFound {
            host,
            what: subject.clone(),
        },
        StatusCode::TOO_MANY_REQUESTS => RegistryError::TooManyRequests {
            host,
            retry_after: RetryAfter::from_headers(headers),
        },
        _ if has(ErrorCode::Denied) => RegistryError::Denied { host, detail },
        _ if has(ErrorCode::TooManyRequests) => RegistryError::TooManyRequests {
            host,
            retry_after: RetryAfter::from_headers(headers),
        },
        _ => RegistryError::Server {
            host,
            status: status.as_u16(),
            code: messages.first().map(|m| m.code.clone()),
            detail,
        },
    }
}

/// The error's cause chain as one line (`a: b: c`), skipping repeats; hyper's own
/// top-level messages ("client error (Connect)") say little without their sources.
pub(crate) fn cause_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

fn code_suffix(code: &Option<ErrorCode>) -> String {
    code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
}

fn retry_suffix(retry: &Option<RetryAfter>) -> String {
    match retry {
        Some(RetryAfter::Delay(d)) => format!("; retry after {} s", d.as_secs()),
        Some(RetryAfter::At(at)) => format!("; retry after {at}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error for a GET of manifest `library/busybox:latest` on `r.example`
    /// answered with `status` and `body`.
    fn manifest_error(status: StatusCode, body: &[u8]) -> RegistryError {
        let subject = NotFound::Manifest {
            repository: "library/busybox".into(),
            reference: "latest".into(),
        };
        from_status("r.example", status, &HeaderMap::new(), body, &subject)
    }

    #[test]
    fn manifest_unknown_names_the_tag() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"latest"}}]}"#;
        let err = manifest_error(StatusCode::NOT_FOUND, body);
        assert_eq!(
            err.to_string(),
            "manifest library/busybox:latest not found on registry r.example"
        );
    }

    #[test]
    fn name_unknown_names_the_repository() {
        let body = br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#;
        let err = manifest_error(StatusCode::NOT_FOUND, body);
        assert!(matches!(
            err,
            RegistryError::NotFound {
                what: NotFound::Repository(_),
                ..
            }
        ));
    }

    #[test]
    fn server_error_keeps_status_and_code() {
        let body = br#"{"errors":[{"code":"UNKNOWN","message":"storage backend down"}]}"#;
        let err = manifest_error(StatusCode::SERVICE_UNAVAILABLE, body);
        assert!(err.is_unavailable());
        assert_eq!(
            err.to_string(),
            "registry r.example failed with HTTP 503 (UNKNOWN): storage backend down (UNKNOWN)"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "30".parse().unwrap());
        assert_eq!(
            RetryAfter::from_headers(&h),
            Some(RetryAfter::Delay(Duration::from_secs(30)))
        );
        h.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert!(matches!(
            RetryAfter::from_headers(&h),
            Some(RetryAfter::At(_))
        ));
    }

    #[test]
    fn non_json_body_gives_no_messages() {
        assert!(parse_error_body(b"<html>bad gateway</html>").is_empty());
    }
}
