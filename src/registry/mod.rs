//! Distribution API v2 client over hyper + rustls.
//!
//! - `transport`: per-host HTTPS/HTTP clients (system roots + extra CAs), redirects
//!   (Authorization dropped when the host changes), plain HTTP only when insecure.
//! - `challenge`: `WWW-Authenticate` parsing, Basic and Bearer token flows, token cache.
//! - `manifest`: resolving tags/digests to manifests, with digest verification.
//! - `blob`: streaming blobs (ranged for resume), verified as they go by.
//! - `credential`: the secrets we may send, redacted in `Debug`.
//! - `error`: `RegistryError`, with the registry's JSON error codes parsed.

mod blob;
pub mod challenge;
pub mod credential;
pub mod error;
mod lookaside;
mod manifest;
pub mod proxy;
pub mod referrers;
mod transport;

#[cfg(test)]
mod fake;

pub use challenge::{RealmCredential, RealmCredentials};
pub use credential::Credential;
pub use error::{ErrorCode, NotFound, RegistryError, RetryAfter};
pub use proxy::ProxySettings;
pub(crate) use transport::redacted;
pub use transport::{tls_files, TlsFiles};

use crate::metrics::Metrics;
use crate::oci::Descriptor;
use bytes::Bytes;
use challenge::Authenticator;
use futures_util::stream::BoxStream;
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use transport::{Outgoing, Transport};

/// Where and how to talk to one registry host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `host` or `host:port` as contacted (docker.io already mapped to registry-1.docker.io).
    pub host: String,
    /// Configured insecure: plain HTTP (and unverified TLS) allowed, credentials may go over it.
    pub insecure: bool,
}

/// Settings for the whole client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Directory of extra CA PEM files: `<host>`, `<host>..<port>`, or `<host:port>/*.crt`.
    pub ca_dir: Option<PathBuf>,
    /// A containers-certs.d(5) directory (`<host[:port]>/*.crt`, `NAME.cert` +
    /// `NAME.key`); read like `ca_dir`, after it.
    pub certs_d: Option<PathBuf>,
    /// Sent as `User-Agent`; empty means `cri-imaged/<version>`.
    pub user_agent: String,
    /// Limit on establishing a TCP connection (TLS handshake excluded).
    pub connect_timeout: Duration,
    /// Longest wait for response headers or for the next piece of a body. There is
    /// no whole-request limit: a large layer may take long, as long as it moves.
    pub idle_timeout: Duration,
    /// A blob slower than this over an `idle_timeout` window is stalled (0: off).
    pub min_bytes_per_second: u64,
    /// Credentials for token realms on another host (delegated auth); `None`: the
    /// registry's credential goes to the realm.
    pub realm_credentials: Option<Arc<dyn challenge::RealmCredentials>>,
    /// An HTTP proxy for registry and token traffic (`CONNECT` tunnels).
    pub proxy: Option<Arc<ProxySettings>>,
    /// Where retries and blob bytes are counted.
    pub metrics: Arc<Metrics>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            ca_dir: None,
            certs_d: None,
            user_agent: String::new(),
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            min_bytes_per_second: 0,
            realm_credentials: None,
            proxy: None,
            metrics: Arc::default(),
        }
    }
}

/// A manifest or index fetched from a registry, its bytes verified against its digest.
/// `descriptor.media_type` is what the registry declared (or the body's `mediaType`).
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub descriptor: Descriptor,
    pub body: Bytes,
}

/// A blob body arriving in chunks. When started at offset 0 (or when the registry
/// ignored the range and sent it whole) the stream checks the digest at the end and
/// yields `RegistryError::DigestMismatch` instead of ending; a body longer or shorter
/// than the descriptor's size yields `RegistryError::SizeMismatch`.
pub type BlobStream = BoxStream<'static, Result<Bytes, RegistryError>>;

/// How many times a transient failure is retried (so at most 4 tries in all).
const RETRIES: u32 = 3;
/// The first backoff; it doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The wait before retry number `retry` (0-based) after `error`: the registry's
/// `Retry-After` when it gave a number of seconds, else 250 ms × 2^retry with ±50 %
/// jitter (so many nodes retrying do not stay in step); capped by `cap`.
fn retry_delay(retry: u32, error: &RegistryError, cap: Duration) -> Duration {
    let delay = match error {
        RegistryError::TooManyRequests {
            retry_after: Some(RetryAfter::Delay(after)),
            ..
        } => (*after).min(MAX_RETRY_AFTER),
        _ => {
            let base = FIRST_BACKOFF * 2u32.pow(retry);
            // Jitter from the clock's nanoseconds: spread, not secrecy, is the point.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let factor = 0.5 + f64::from(nanos % 1000) / 1000.0;
            base.mul_f64(factor)
        }
    };
    delay.min(cap)
}

/// The registry client; cheap to clone, shares its connections and token cache.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    auth: Authenticator,
    metrics: Arc<Metrics>,
}

impl RegistryClient {
    pub fn new(settings: ClientSettings) -> Result<Self, RegistryError> {
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                transport: Transport::new(&settings)?,
                auth: Authenticator::new(settings.realm_credentials.clone()),
                metrics: settings.metrics.clone(),
            }),
        })
    }

    /// Where this client counts retries and blob bytes (shared with the puller).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// A GET through [`Self::send`].
    async fn get(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        path: &str,
        headers: HeaderMap,
        credential: Option<&Credential>,
        subject: &NotFound,
    ) -> Result<http::Response<Incoming>, RegistryError> {
        self.send(
            http::Method::GET,
            endpoint,
            repository,
            path,
            headers,
            credential,
            subject,
        )
        .await
    }

    /// [`Self::send_once`], again after a transient failure (a dropped or unanswered
    /// connection, 5xx, 429): up to [`RETRIES`] more times, waiting an exponential
    /// backoff with jitter, or the registry's `Retry-After`, never longer than the
    /// progress timeout. 4xx and refused connections are answered at once.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        method: http::Method,
        endpoint: &Endpoint,
        repository: &str,
        path: &str,
        headers: HeaderMap,
        credential: Option<&Credential>,
        subject: &NotFound,
    ) -> Result<http::Response<Incoming>, RegistryError> {
        let mut retry = 0;
        loop {
            let result = self
                .send_once(
                    method.clone(),
                    endpoint,
                    repository,
                    path,
                    headers.clone(),
                    credential,
                    subject,
                )
                .await;
            match result {
                Err(e) if retry < RETRIES && e.is_retryable() => {
                    let delay = retry_delay(retry, &e, self.inner.transport.idle_timeout());
                    retry += 1;
                    self.inner.metrics.registry_retry(&endpoint.host);
                    tracing::info!(
                        registry = %endpoint.host,
                        path,
                        error = %e,
                        retry,
                        delay_ms = delay.as_millis() as u64,
                        "transient registry failure; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// Sends `method` (GET or HEAD) for `path` on the endpoint, authenticating as the
    /// registry asks: a first try with what we already hold, then, on a 401, one more
    /// with what the challenge wants. Any non-2xx answer left after that becomes a
    /// `RegistryError`.
    #[tracing::instrument(level = "debug", skip(self, headers, credential, subject), fields(host = %endpoint.host))]
    #[allow(clippy::too_many_arguments)]
    async fn send_once(
        &self,
        method: http::Method,
        endpoint: &Endpoint,
        repository: &str,
        path: &str,
        headers: HeaderMap,
        credential: Option<&Credential>,
        subject: &NotFound,
    ) -> Result<http::Response<Incoming>, RegistryError> {
        let transport = &self.inner.transport;
        let url = transport.registry_url(endpoint, path)?;
        let (mut authorization, source) = self
            .inner
            .auth
            .initial(transport, endpoint, repository, credential)
            .await?;
        let mut retried = false;
        loop {
            let req = Outgoing::new(method.clone(), headers.clone(), authorization.clone());
            let response = transport.send(endpoint, url.clone(), &req).await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !retried {
                retried = true;
                let next = self
                    .inner
                    .auth
                    .after_unauthorized(
                        transport,
                        endpoint,
                        repository,
                        credential,
                        source,
                        response.headers(),
                    )
                    .await?;
                // Retry only with something new to offer: the same request would
                // fail the same way.
                if next.is_some() && next != authorization {
                    tracing::debug!("answering the registry's challenge");
                    authorization = next;
                    continue;
                }
            }
            if status.is_success() {
                return Ok(response);
            }
            return Err(self.error_from(endpoint, response, subject).await);
        }
    }

    async fn error_from(
        &self,
        endpoint: &Endpoint,
        response: http::Response<Incoming>,
        subject: &NotFound,
    ) -> RegistryError {
        /// Enough for any registry error document; the rest is not read.
        const MAX_ERROR_BODY: usize = 64 * 1024;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = response.into_body();
        let bytes = match transport::read_capped(
            &mut body,
            MAX_ERROR_BODY,
            self.inner.transport.idle_timeout(),
            &endpoint.host,
        )
        .await
        {
            Ok((b, _)) => b,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the error body");
                Bytes::new()
            }
        };
        error::from_status(&endpoint.host, status, &headers, &bytes, subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(status: u16) -> RegistryError {
        RegistryError::Server {
            host: "r.io".into(),
            status,
            code: None,
            detail: String::new(),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after_within_caps() {
        let cap = Duration::from_secs(60);
        for retry in 0..3 {
            let base = FIRST_BACKOFF * 2u32.pow(retry);
            let d = retry_delay(retry, &server_error(503), cap);
            assert!(d >= base / 2 && d <= base * 3 / 2, "retry {retry}: {d:?}");
        }
        let limited = |secs| RegistryError::TooManyRequests {
            host: "r.io".into(),
            retry_after: Some(RetryAfter::Delay(Duration::from_secs(secs))),
        };
        assert_eq!(retry_delay(0, &limited(3), cap), Duration::from_secs(3));
        assert_eq!(retry_delay(0, &limited(3600), cap), MAX_RETRY_AFTER);
        assert_eq!(
            retry_delay(2, &limited(3), Duration::from_secs(1)),
            Duration::from_secs(1),
            "never longer than the progress timeout"
        );
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(server_error(503).is_retryable());
        assert!(!server_error(404).is_retryable());
        let unreachable = |transient| RegistryError::Unreachable {
            host: "r.io".into(),
            detail: String::new(),
            transient,
        };
        assert!(unreachable(true).is_retryable());
        assert!(
            !unreachable(false).is_retryable(),
            "a refused connection moves on at once"
        );
        let stalled = RegistryError::Stalled {
            host: "r.io".into(),
            what: "blob".into(),
            received: 0,
            why: String::new(),
        };
        assert!(
            !stalled.is_retryable(),
            "a stall already waited its whole deadline"
        );
    }
}
