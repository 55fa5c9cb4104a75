//! Distribution API v2 client over hyper + rustls.
//!
//! - `transport`: per-host HTTPS/HTTP clients (system roots + extra CAs), redirects
//!   (Authorization dropped when the host changes), plain HTTP only when insecure.
//! - `challenge`: `WWW-Authenticate` parsing, Basic and Bearer token flows, token cache.
//! - `manifest`: resolving tags/digests to manifests, with digest verification.
//! - `blob`: streaming blobs (ranged for resume), verified as they go by.
//! - `credential`: the secrets we may send, redacted in `Debug`.
//! - `error`: `RegistryError`, with the registry's JSON error codes parsed.
//!
//! STUB INTERFACE: the implementation is being written; signatures are the contract.

pub mod credential;
pub mod error;

pub use credential::Credential;
pub use error::RegistryError;

use crate::oci::Descriptor;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use std::path::PathBuf;

/// Where and how to talk to one registry host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `host` or `host:port` as contacted (docker.io already mapped to registry-1.docker.io).
    pub host: String,
    /// Configured insecure: plain HTTP (and unverified TLS) allowed, credentials may go over it.
    pub insecure: bool,
}

/// Settings for the whole client.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    /// Directory of extra CA PEM files: `<host>`, `<host>..<port>`, or `<host:port>/ca.crt`.
    pub ca_dir: Option<PathBuf>,
    /// Sent as `User-Agent`.
    pub user_agent: String,
}

/// A manifest or index fetched from a registry, its bytes verified against its digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub descriptor: Descriptor,
    pub body: Bytes,
}

/// A blob body arriving in chunks. When started at offset 0 the stream checks the
/// digest at the end and yields `RegistryError::DigestMismatch` instead of ending.
pub type BlobStream = BoxStream<'static, Result<Bytes, RegistryError>>;

#[derive(Clone)]
pub struct RegistryClient {}

impl RegistryClient {
    pub fn new(_settings: ClientSettings) -> Result<Self, RegistryError> {
        todo!("registry client")
    }

    /// Resolves `reference` (a tag or a `sha256:` digest) in `repository` to its
    /// manifest or index (GET with the manifest Accept header).
    pub async fn fetch_manifest(
        &self,
        _endpoint: &Endpoint,
        _repository: &str,
        _reference: &str,
        _credential: Option<&Credential>,
    ) -> Result<FetchedManifest, RegistryError> {
        todo!()
    }

    /// Streams a blob from `offset` (a `Range` request when non-zero).
    pub async fn fetch_blob(
        &self,
        _endpoint: &Endpoint,
        _repository: &str,
        _descriptor: &Descriptor,
        _offset: u64,
        _credential: Option<&Credential>,
    ) -> Result<BlobStream, RegistryError> {
        todo!()
    }
}
