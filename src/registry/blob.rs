//! Streaming blobs: ranged GETs for resume, frames passed on as they arrive (never
//! buffered whole), size and digest checked on the way.

use super::transport::next_data;
use super::{BlobStream, Credential, Endpoint, NotFound, RegistryClient, RegistryError};
use crate::digest::{Digest, Verifier};
use crate::metrics::family::Counter;
use crate::oci::Descriptor;
use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{HeaderValue, CONTENT_RANGE, RANGE};
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use std::time::{Duration, Instant};

impl RegistryClient {
    /// Streams a blob from `offset` (a `Range` request when non-zero). A registry that
    /// ignores the range is handled: its leading `offset` bytes are dropped here.
    #[tracing::instrument(skip(self, descriptor, credential), fields(host = %endpoint.host, digest = %descriptor.digest, size = descriptor.size, auth = credential.map(Credential::kind).unwrap_or("anonymous")))]
    pub async fn fetch_blob(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        descriptor: &Descriptor,
        offset: u64,
        credential: Option<&Credential>,
    ) -> Result<BlobStream, RegistryError> {
        let digest = descriptor.digest.clone();
        let size = descriptor.size;
        if offset > size {
            return Err(RegistryError::OffsetBeyondEnd {
                digest,
                offset,
                size,
            });
        }
        if offset == size && offset > 0 {
            // Nothing left to send; a `Range: bytes=size-` would only earn a 416.
            return Ok(futures_util::stream::empty().boxed());
        }
        let mut headers = HeaderMap::new();
        if offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={offset}-")).map_err(|e| {
                RegistryError::BadResponse {
                    host: endpoint.host.clone(),
                    detail: format!("cannot build Range header: {e}"),
                }
            })?;
            headers.insert(RANGE, range);
        }
        let subject = NotFound::Blob {
            repository: repository.to_string(),
            digest: digest.clone(),
        };
        let path = format!("/v2/{repository}/blobs/{digest}");
        let response = self
            .get(endpoint, repository, &path, headers, credential, &subject)
            .await?;
        let status = response.status();
        let mut state = if offset > 0 && status == StatusCode::PARTIAL_CONTENT {
            check_content_range(&endpoint.host, response.headers(), offset)?;
            BlobBody::new(response.into_body(), &endpoint.host, digest, size, offset).idle(
                self.inner.transport.idle_timeout(),
                self.inner.transport.min_bytes_per_second(),
            )
        } else if status == StatusCode::OK {
            if offset > 0 {
                tracing::debug!(offset, "registry ignored the range; skipping the head");
            }
            // The whole blob comes anyway, so it can be verified whole.
            let mut b = BlobBody::new(response.into_body(), &endpoint.host, digest, size, 0).idle(
                self.inner.transport.idle_timeout(),
                self.inner.transport.min_bytes_per_second(),
            );
            b.skip = offset;
            b.verifier = Some(Verifier::new());
            b
        } else {
            return Err(RegistryError::BadResponse {
                host: endpoint.host.clone(),
                detail: format!("blob GET answered {status}, expected 200 or 206"),
            });
        };
        state.downloaded = self.inner.metrics.downloaded_bytes(&endpoint.host);
        Ok(futures_util::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            match st.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), st)),
                Ok(None) => None,
                Err(e) => {
                    st.done = true;
                    Some((Err(e), st))
                }
            }
        })
        .boxed())
    }
}

/// A 206 must start where we asked; anything else would splice wrong bytes in.
fn check_content_range(host: &str, headers: &HeaderMap, offset: u64) -> Result<(), RegistryError> {
    let Some(value) = headers.get(CONTENT_RANGE) else {
        tracing::debug!("206 without Content-Range; trusting it starts at the offset");
        return Ok(());
    };
    let start = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match start {
        Some(s) if s == offset => Ok(()),
        _ => Err(RegistryError::BadResponse {
            host: host.to_string(),
            detail: format!(
                "Content-Range {value:?} does not start at the requested offset {offset}"
            ),
        }),
    }
}

struct BlobBody {
    body: Incoming,
    host: String,
    digest: Digest,
    size: u64,
    /// Blob offset of the next byte off the wire.
    position: u64,
    /// Bytes still to drop before handing data on (a range the registry ignored).
    skip: u64,
    /// Present when the body starts at byte 0, so the whole blob passes through it.
    verifier: Option<Verifier>,
    idle: Duration,
    /// Trickle check: the least acceptable rate, and the bytes and the time spent
    /// waiting on the registry in the current window. Only waiting counts: while
    /// the caller is busy with a chunk (writing it, or extracting the layer it
    /// feeds), the registry is not the one being slow.
    min_bytes_per_second: u64,
    window_waited: Duration,
    window_bytes: u64,
    done: bool,
    /// Bytes off the wire, counted per registry.
    downloaded: Counter,
}

impl BlobBody {
    fn new(body: Incoming, host: &str, digest: Digest, size: u64, start: u64) -> Self {
        BlobBody {
            body,
            host: host.to_string(),
            verifier: (start == 0).then(Verifier::new),
            digest,
            size,
            position: start,
            skip: 0,
            idle: Duration::from_secs(300),
            min_bytes_per_second: 0,
            window_waited: Duration::ZERO,
            window_bytes: 0,
            done: false,
            downloaded: Counter::default(),
        }
    }

    fn idle(mut self, idle: Duration, min_bytes_per_second: u64) -> Self {
        self.idle = idle;
        self.min_bytes_per_second = min_bytes_per_second;
        self
    }

    /// The stall error for this blob, with what arrived so far.
    fn stalled(&self, why: String) -> RegistryError {
        RegistryError::Stalled {
            host: self.host.clone(),
            what: format!("blob {}", self.digest),
            received: self.position,
            why,
        }
    }

    /// A trickle is a stall: below the minimum rate over a whole window of time
    /// spent waiting on the registry.
    fn check_rate(&mut self, arrived: u64, waited: Duration) -> Result<(), RegistryError> {
        if self.min_bytes_per_second == 0 {
            return Ok(());
        }
        self.window_bytes += arrived;
        self.window_waited += waited;
        let elapsed = self.window_waited;
        if elapsed < self.idle {
            return Ok(());
        }
        let rate = (self.window_bytes as f64 / elapsed.as_secs_f64()) as u64;
        if rate < self.min_bytes_per_second {
            return Err(self.stalled(format!(
                "{rate} bytes/s over {elapsed:.0?}, below pull.min_bytes_per_second {}",
                self.min_bytes_per_second
            )));
        }
        self.window_waited = Duration::ZERO;
        self.window_bytes = 0;
        Ok(())
    }

    /// The next non-empty chunk to hand on, `None` after a verified end.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        loop {
            let asked = Instant::now();
            let next = next_data(&mut self.body, self.idle, &self.host).await;
            let waited = asked.elapsed();
            let next = match next {
                Err(RegistryError::Stalled { why, .. }) => return Err(self.stalled(why)),
                other => other?,
            };
            let Some(mut chunk) = next else {
                return self.finish().map(|()| None);
            };
            self.position += chunk.len() as u64;
            self.downloaded.add(chunk.len() as u64);
            self.check_rate(chunk.len() as u64, waited)?;
            if self.position > self.size {
                return Err(RegistryError::SizeMismatch {
                    digest: self.digest.clone(),
                    expected: self.size,
                    received: self.position,
                });
            }
            if let Some(v) = &mut self.verifier {
                v.update(&chunk);
            }
            if self.skip > 0 {
                let drop = self.skip.min(chunk.len() as u64);
                self.skip -= drop;
                // `drop` <= chunk.len(), so the conversion cannot truncate.
                chunk = chunk.slice(drop as usize..);
            }
            if !chunk.is_empty() {
                return Ok(Some(chunk));
            }
        }
    }

    fn finish(&mut self) -> Result<(), RegistryError> {
        self.done = true;
        if self.position != self.size {
            return Err(RegistryError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                received: self.position,
            });
        }
        if let Some(v) = self.verifier.take() {
            let actual = v.finish();
            if actual != self.digest {
                return Err(RegistryError::DigestMismatch {
                    expected: self.digest.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::fake::{self, Fake, LAYER};
    use crate::registry::{NotFound, RetryAfter};

    /// Serves `LAYER`, honouring `Range` only when `honour_range`.
    fn ranged(honour_range: bool) -> impl Fn(&fake::Seen) -> fake::Reply {
        move |seen: &fake::Seen| {
            let start = seen
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok());
            match start {
                Some(s) if honour_range => fake::with_header(
                    fake::reply(206, &LAYER[s..]),
                    "content-range",
                    &format!("bytes {s}-{}/{}", LAYER.len() - 1, LAYER.len()),
                ),
                _ => fake::reply(200, LAYER),
            }
        }
    }

    /// A 4 MiB blob fetched with a minimum rate over 200 ms windows.
    async fn fetch_rated(
        reply: impl Fn(&fake::Seen) -> fake::Reply + Send + Sync + 'static,
        body: &[u8],
        min_bytes_per_second: u64,
    ) -> (Fake, crate::registry::BlobStream) {
        let registry = Fake::start(reply).await;
        let client = RegistryClient::new(crate::registry::ClientSettings {
            idle_timeout: Duration::from_millis(200),
            min_bytes_per_second,
            ..fake::settings()
        })
        .unwrap();
        let desc = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar",
            Digest::of(body),
            body.len() as u64,
        );
        let stream = client
            .fetch_blob(&fake::insecure(&registry), "app", &desc, 0, None)
            .await
            .unwrap();
        (registry, stream)
    }

    #[tokio::test]
    async fn a_slow_reader_is_not_a_slow_registry() {
        use futures_util::StreamExt;
        let body: Bytes = (0..4u32 << 20).map(|i| i as u8).collect::<Vec<_>>().into();
        let served = body.clone();
        // Far more than loopback could be blamed for, were our own pauses counted.
        let (_registry, mut stream) =
            fetch_rated(move |_| fake::reply(200, served.clone()), &body, 50 << 20).await;
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.expect("no stall: the reader was the slow one"));
            // The caller busy with each chunk (writing, extracting) for a while.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(got, body);
    }

    #[tokio::test]
    async fn streams_and_verifies_a_whole_blob() {
        let registry = Fake::start(fake::serve_image).await;
        let stream = fake::fetch_layer(&registry, 0, None).await.unwrap();
        assert_eq!(fake::collect(stream).await.unwrap(), LAYER);
        assert_eq!(registry.seen()[0].header("range"), None);
    }

    #[tokio::test]
    async fn resumes_with_range_when_honoured() {
        let registry = Fake::start(ranged(true)).await;
        let stream = fake::fetch_layer(&registry, 10, None).await.unwrap();
        assert_eq!(fake::collect(stream).await.unwrap(), &LAYER[10..]);
        assert_eq!(registry.seen()[0].header("range"), Some("bytes=10-"));
    }

    #[tokio::test]
    async fn resumes_by_skipping_when_range_ignored() {
        let registry = Fake::start(ranged(false)).await;
        let stream = fake::fetch_layer(&registry, 10, None).await.unwrap();
        assert_eq!(fake::collect(stream).await.unwrap(), &LAYER[10..]);
    }

    #[tokio::test]
    async fn wrong_content_is_a_digest_mismatch() {
        let mut evil = LAYER.to_vec();
        evil[0] ^= 1;
        let registry = Fake::start(move |_: &fake::Seen| fake::reply(200, evil.clone())).await;
        let stream = fake::fetch_layer(&registry, 0, None).await.unwrap();
        let err = fake::collect(stream).await.unwrap_err();
        assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn short_and_long_bodies_are_size_mismatches() {
        for body in [&LAYER[..5], [LAYER, b"extra"].concat().as_slice()] {
            let body = body.to_vec();
            let registry = Fake::start(move |_: &fake::Seen| fake::reply(200, body.clone())).await;
            let stream = fake::fetch_layer(&registry, 0, None).await.unwrap();
            let err = fake::collect(stream).await.unwrap_err();
            assert!(matches!(err, RegistryError::SizeMismatch { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn rate_limit_carries_retry_after() {
        let registry = Fake::start(|_: &fake::Seen| {
            fake::with_header(
                fake::error_reply(429, "TOOMANYREQUESTS", "slow down"),
                "retry-after",
                "17",
            )
        })
        .await;
        let err = fake::fetch_layer(&registry, 0, None).await.err().unwrap();
        match &err {
            RegistryError::TooManyRequests { retry_after, .. } => {
                assert_eq!(
                    *retry_after,
                    Some(RetryAfter::Delay(Duration::from_secs(17)))
                )
            }
            other => panic!("want TooManyRequests, got {other}"),
        }
        assert!(err.is_unavailable());
    }

    #[tokio::test]
    async fn missing_blob_is_not_found_naming_the_blob() {
        let registry = Fake::start(|_: &fake::Seen| fake::reply(404, "")).await;
        let err = fake::fetch_layer(&registry, 0, None).await.err().unwrap();
        assert!(
            matches!(
                &err,
                RegistryError::NotFound {
                    what: NotFound::Blob { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn offset_past_the_end_is_refused_without_a_request() {
        let registry = Fake::start(fake::serve_image).await;
        let err = fake::fetch_layer(&registry, fake::layer().size + 1, None)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, RegistryError::OffsetBeyondEnd { .. }),
            "{err}"
        );
        assert!(registry.seen().is_empty());
    }
}
