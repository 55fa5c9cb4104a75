//! Registry errors. STUB: the registry implementer refines the variants.

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {host} is unreachable: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("registry {host} answered 401 Unauthorized{detail}")]
    Unauthorized { host: String, detail: String },
    #[error("registry {host} answered 403 Forbidden{detail}")]
    Denied { host: String, detail: String },
    #[error("{what} not found on registry {host}")]
    NotFound { host: String, what: String },
    #[error("registry {host} is rate limiting requests (429){retry}")]
    TooManyRequests { host: String, retry: String },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("{media_type} is not supported: {why}")]
    Unsupported {
        media_type: String,
        why: &'static str,
    },
}
