//! Reading signatures from lookaside storage (containers-registries.d(5)): a plain
//! GET of a configured URL, never with credentials. Plain HTTP is allowed because the
//! operator wrote an `http://` URL; the signature itself is what is verified.

use super::transport::{read_capped, Outgoing};
use super::{Endpoint, RegistryClient, RegistryError};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use url::Url;

impl RegistryClient {
    /// GETs `url`; `None` when the server answers 404 (no such signature). A body over
    /// `limit` bytes is refused.
    pub async fn fetch_lookaside(
        &self,
        url: &Url,
        limit: usize,
    ) -> Result<Option<Bytes>, RegistryError> {
        let transport = &self.inner.transport;
        let host = super::transport::authority(url);
        let endpoint = Endpoint {
            host: host.clone(),
            insecure: url.scheme() == "http",
        };
        let response = transport
            .send(
                &endpoint,
                url.clone(),
                &Outgoing::get(HeaderMap::new(), None),
            )
            .await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(RegistryError::Server {
                host,
                status: status.as_u16(),
                code: None,
                detail: format!("reading signature {}", super::transport::redacted(url)),
            });
        }
        let mut body = response.into_body();
        let (bytes, truncated) =
            read_capped(&mut body, limit, transport.idle_timeout(), &host).await?;
        if truncated {
            return Err(RegistryError::BadResponse {
                host,
                detail: format!(
                    "signature {} is larger than {limit} bytes",
                    super::transport::redacted(url)
                ),
            });
        }
        Ok(Some(bytes))
    }
}
