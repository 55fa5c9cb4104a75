//! The OCI distribution 1.1 referrers API: which manifests name a given manifest as
//! their `subject` (signatures, SBOMs), filtered by `artifactType`.

use super::transport::read_capped;
use super::{Credential, Endpoint, NotFound, RegistryClient, RegistryError};
use crate::digest::Digest;
use http::header::{HeaderValue, ACCEPT};
use http::HeaderMap;
use serde::Deserialize;

/// Larger than any real referrers index; the rest is not read.
const MAX_REFERRERS_BYTES: usize = 4 * 1024 * 1024;

/// One manifest that refers to the subject.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Referrer {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(rename = "artifactType", default)]
    pub artifact_type: String,
}

#[derive(Deserialize)]
struct ReferrersIndex {
    #[serde(default)]
    manifests: Vec<Referrer>,
}

impl RegistryClient {
    /// The referrers of `subject` with `artifact_type`. `None` when the registry does
    /// not offer the API (404, as registries without it answer). The filter is applied
    /// here too: a registry may ignore it.
    pub async fn fetch_referrers(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        subject: &Digest,
        artifact_type: &str,
        credential: Option<&Credential>,
    ) -> Result<Option<Vec<Referrer>>, RegistryError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("artifactType", artifact_type)
            .finish();
        let path = format!("/v2/{repository}/referrers/{subject}?{query}");
        let not_found = NotFound::Manifest {
            repository: repository.to_string(),
            reference: format!("referrers of {subject}"),
        };
        let response = match self
            .get(endpoint, repository, &path, headers, credential, &not_found)
            .await
        {
            Ok(r) => r,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut body = response.into_body();
        let (bytes, truncated) = read_capped(
            &mut body,
            MAX_REFERRERS_BYTES,
            self.inner.transport.idle_timeout(),
            &endpoint.host,
        )
        .await?;
        if truncated {
            return Err(RegistryError::BadResponse {
                host: endpoint.host.clone(),
                detail: format!("the referrers of {subject} exceed {MAX_REFERRERS_BYTES} bytes"),
            });
        }
        let index: ReferrersIndex =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadResponse {
                host: endpoint.host.clone(),
                detail: format!("the referrers of {subject} are not an image index: {e}"),
            })?;
        Ok(Some(
            index
                .manifests
                .into_iter()
                .filter(|r| r.artifact_type == artifact_type)
                .collect(),
        ))
    }
}
