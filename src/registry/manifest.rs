//! Resolving a tag or digest to its manifest or index: bounded read, digest
//! verification, media type from the response (or the body), schema 1 refused.

use super::transport::read_capped;
use super::{Credential, Endpoint, FetchedManifest, NotFound, RegistryClient, RegistryError};
use crate::digest::Digest;
use crate::oci::{self, Descriptor, ManifestKind};
use http::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use http::HeaderMap;
use serde::Deserialize;

/// Larger than any real manifest or index (containerd and distribution use 4 MiB);
/// bounds what a hostile registry can make us hold.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

const SCHEMA1_WHY: &str =
    "Docker schema 1 manifests are deprecated; push the image again with a current client";

/// What a manifest `HEAD` says: the digest the registry resolves the reference to
/// (`Docker-Content-Digest`), the media type and the size, each when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
}

impl RegistryClient {
    /// Asks what `reference` (a tag or a digest) in `repository` resolves to without
    /// reading the manifest: a `HEAD` with the manifest Accept header, as containerd
    /// resolves. Docker Hub does not count HEADs against its pull rate limit.
    #[tracing::instrument(skip(self, credential), fields(host = %endpoint.host, auth = credential.map(Credential::kind).unwrap_or("anonymous")))]
    pub async fn head_manifest(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        reference: &str,
        credential: Option<&Credential>,
    ) -> Result<ManifestHead, RegistryError> {
        let response = self
            .manifest_request(
                http::Method::HEAD,
                endpoint,
                repository,
                reference,
                credential,
            )
            .await?;
        Ok(ManifestHead::from_headers(response.headers()))
    }

    /// Resolves `reference` (a tag or a `sha256:` digest) in `repository` to its
    /// manifest or index (GET with the manifest Accept header).
    #[tracing::instrument(skip(self, credential), fields(host = %endpoint.host, auth = credential.map(Credential::kind).unwrap_or("anonymous")))]
    pub async fn fetch_manifest(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        reference: &str,
        credential: Option<&Credential>,
    ) -> Result<FetchedManifest, RegistryError> {
        // Tags cannot hold ':', digests always do.
        let expected: Option<Digest> = if reference.contains(':') {
            Some(
                reference
                    .parse()
                    .map_err(|source| RegistryError::InvalidReference {
                        reference: reference.to_string(),
                        source,
                    })?,
            )
        } else {
            None
        };
        let response = self
            .manifest_request(
                http::Method::GET,
                endpoint,
                repository,
                reference,
                credential,
            )
            .await?;
        let head = ManifestHead::from_headers(response.headers());
        if head.size.is_some_and(|len| len > MAX_MANIFEST_BYTES as u64) {
            return Err(RegistryError::ManifestTooLarge {
                host: endpoint.host.clone(),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let mut body = response.into_body();
        let (body, truncated) = read_capped(
            &mut body,
            MAX_MANIFEST_BYTES,
            self.inner.transport.idle_timeout(),
            &endpoint.host,
        )
        .await?;
        if truncated {
            return Err(RegistryError::ManifestTooLarge {
                host: endpoint.host.clone(),
                limit: MAX_MANIFEST_BYTES,
            });
        }

        let actual = Digest::of(&body);
        if let Some(expected) = expected {
            if expected != actual {
                return Err(RegistryError::DigestMismatch { expected, actual });
            }
        } else if let Some(declared) = head.digest {
            if declared != actual {
                return Err(RegistryError::DigestMismatch {
                    expected: declared,
                    actual,
                });
            }
        }

        let media_type = media_type(head.media_type.as_deref(), &body);
        match oci::manifest_kind(&media_type) {
            ManifestKind::Index | ManifestKind::Manifest => {}
            ManifestKind::Schema1 => {
                return Err(RegistryError::Unsupported {
                    media_type,
                    why: SCHEMA1_WHY,
                })
            }
            ManifestKind::Unknown => {
                return Err(RegistryError::Unsupported {
                    media_type,
                    why: "the registry answered the manifest request with something that is \
                          neither an OCI/Docker manifest nor an index",
                })
            }
        }
        tracing::debug!(%actual, %media_type, size = body.len(), "fetched manifest");
        Ok(FetchedManifest {
            descriptor: Descriptor::new(media_type, actual, body.len() as u64),
            body,
        })
    }

    /// Sends a manifest request (`HEAD` or `GET`) for `reference` with the Accept
    /// header containerd sends: every manifest and index type we read.
    async fn manifest_request(
        &self,
        method: http::Method,
        endpoint: &Endpoint,
        repository: &str,
        reference: &str,
        credential: Option<&Credential>,
    ) -> Result<http::Response<hyper::body::Incoming>, RegistryError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(oci::MANIFEST_ACCEPT));
        let subject = NotFound::Manifest {
            repository: repository.to_string(),
            reference: reference.to_string(),
        };
        let path = format!("/v2/{repository}/manifests/{reference}");
        self.send(
            method, endpoint, repository, &path, headers, credential, &subject,
        )
        .await
    }
}

impl ManifestHead {
    /// What a manifest response's headers declare. A `Docker-Content-Digest` that is
    /// not a sha256 digest is left out: another algorithm is not a lie, just opaque.
    fn from_headers(headers: &HeaderMap) -> ManifestHead {
        let header = |name: http::header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let digest = header(http::header::HeaderName::from_static(
            "docker-content-digest",
        ))
        .and_then(|v| match v.parse::<Digest>() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring Docker-Content-Digest");
                None
            }
        });
        ManifestHead {
            digest,
            media_type: header(CONTENT_TYPE)
                .map(|v| v.split(';').next().unwrap_or_default().trim().to_string()),
            size: header(http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        }
    }
}

#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u32>,
}

/// The declared `Content-Type` when it names a manifest kind; otherwise (absent, or a
/// generic `application/json`) the body's `mediaType`; a schema 1 body has none but
/// says `schemaVersion: 1`.
fn media_type(content_type: Option<&str>, body: &[u8]) -> String {
    if let Some(ct) = content_type {
        if oci::manifest_kind(ct) != ManifestKind::Unknown {
            return ct.to_string();
        }
    }
    let peek: Option<Peek> = serde_json::from_slice(body).ok();
    match peek {
        Some(Peek {
            media_type: Some(mt),
            ..
        }) if !mt.is_empty() => mt,
        Some(Peek {
            schema_version: Some(1),
            ..
        }) => oci::DOCKER_SCHEMA1.to_string(),
        _ => content_type.unwrap_or("(no content type)").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_prefers_header_then_body() {
        assert_eq!(
            media_type(Some(oci::OCI_INDEX), br#"{"mediaType":"x"}"#),
            oci::OCI_INDEX
        );
        assert_eq!(
            media_type(
                Some("application/json"),
                br#"{"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#
            ),
            oci::OCI_MANIFEST
        );
        assert_eq!(
            media_type(None, br#"{"schemaVersion":1,"name":"x"}"#),
            oci::DOCKER_SCHEMA1
        );
        assert_eq!(media_type(Some("text/html"), b"<html>"), "text/html");
    }

    use crate::registry::error::NotFound;
    use crate::registry::fake::{self, Fake};

    #[tokio::test]
    async fn fetches_manifest_by_tag_with_accept_header() {
        let registry = Fake::start(fake::serve_image).await;
        let got = fake::client()
            .fetch_manifest(&fake::insecure(&registry), "team/app", "v1", None)
            .await
            .unwrap();
        assert_eq!(got.body, fake::manifest_body());
        assert_eq!(got.descriptor.digest, Digest::of(&fake::manifest_body()));
        assert_eq!(got.descriptor.media_type, oci::OCI_MANIFEST);
        let seen = registry.seen();
        assert_eq!(seen[0].path(), "/v2/team/app/manifests/v1");
        assert_eq!(seen[0].header("accept"), Some(oci::MANIFEST_ACCEPT));
    }

    #[tokio::test]
    async fn head_gives_digest_type_and_size_without_a_body() {
        let registry = Fake::start(|seen: &fake::Seen| {
            fake::with_header(
                fake::serve_image(seen),
                "docker-content-digest",
                &Digest::of(&fake::manifest_body()).to_string(),
            )
        })
        .await;
        let head = fake::client()
            .head_manifest(&fake::insecure(&registry), "team/app", "v1", None)
            .await
            .unwrap();
        assert_eq!(head.digest, Some(Digest::of(&fake::manifest_body())));
        assert_eq!(head.media_type.as_deref(), Some(oci::OCI_MANIFEST));
        assert_eq!(head.size, Some(fake::manifest_body().len() as u64));
        let seen = registry.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, http::Method::HEAD);
        assert_eq!(seen[0].path(), "/v2/team/app/manifests/v1");
        assert_eq!(seen[0].header("accept"), Some(oci::MANIFEST_ACCEPT));
    }

    #[tokio::test]
    async fn digest_reference_is_verified() {
        let registry = Fake::start(fake::serve_image).await;
        let client = fake::client();
        let endpoint = fake::insecure(&registry);
        let right = Digest::of(&fake::manifest_body()).to_string();
        client
            .fetch_manifest(&endpoint, "app", &right, None)
            .await
            .unwrap();
        let wrong = Digest::of(b"something else").to_string();
        let err = client
            .fetch_manifest(&endpoint, "app", &wrong, None)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn docker_content_digest_is_checked_for_tags() {
        let registry = Fake::start(|seen: &fake::Seen| {
            fake::with_header(
                fake::serve_image(seen),
                "docker-content-digest",
                &Digest::of(b"another manifest").to_string(),
            )
        })
        .await;
        let err = fake::client()
            .fetch_manifest(&fake::insecure(&registry), "app", "latest", None)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn schema1_is_unsupported_with_a_reason() {
        let registry = Fake::start(|_: &fake::Seen| {
            fake::with_header(
                fake::reply(200, r#"{"schemaVersion":1,"name":"app","tag":"old"}"#),
                "content-type",
                oci::DOCKER_SCHEMA1_SIGNED,
            )
        })
        .await;
        let err = fake::client()
            .fetch_manifest(&fake::insecure(&registry), "app", "old", None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::Unsupported { why, .. } if why.contains("schema 1")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn manifest_unknown_is_not_found_naming_the_tag() {
        let registry = Fake::start(|_: &fake::Seen| {
            fake::error_reply(404, "MANIFEST_UNKNOWN", "manifest unknown")
        })
        .await;
        let err = fake::client()
            .fetch_manifest(&fake::insecure(&registry), "app", "nope", None)
            .await
            .unwrap_err();
        match &err {
            RegistryError::NotFound {
                what: NotFound::Manifest { reference, .. },
                ..
            } => assert_eq!(reference, "nope"),
            other => panic!("want NotFound manifest, got {other}"),
        }
        assert!(err.to_string().contains("manifest app:nope"));
    }

    #[tokio::test]
    async fn oversized_manifest_is_refused() {
        let registry = Fake::start(|_: &fake::Seen| {
            fake::with_header(
                fake::reply(200, vec![b' '; MAX_MANIFEST_BYTES + 1]),
                "content-type",
                oci::OCI_MANIFEST,
            )
        })
        .await;
        let err = fake::client()
            .fetch_manifest(&fake::insecure(&registry), "app", "big", None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::ManifestTooLarge { .. }),
            "{err}"
        );
    }
}
