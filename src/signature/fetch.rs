//! Reading the stored signatures of one manifest: `signature-1`, `signature-2`, … from
//! lookaside storage until the first missing one, and, where registries.d enables
//! them, the sigstore attachments on the registry: the `sha256-<hex>.sig` tag and,
//! when the registry offers the OCI referrers API, every referrer whose
//! `artifactType` is cosign's signature type (one layer per signature in both). Everything is bounded: a hostile store cannot make us hold more than
//! [`MAX_SIGNATURES`] × [`MAX_SIGNATURE_BYTES`].

use super::registries_d::SignatureSources;
use super::Signature;
use crate::digest::Digest;
use crate::oci::{Descriptor, Manifest};
use crate::registry::{redacted, Credential, Endpoint, RegistryClient, RegistryError};
use futures_util::StreamExt;

/// Signatures read per manifest, over all sources, at most.
pub const MAX_SIGNATURES: usize = 128;
/// Bytes of signatures read per manifest, over all sources, at most.
pub const MAX_TOTAL_BYTES: usize = 32 * 1024 * 1024;
/// The `artifactType` of a cosign signature manifest stored as a referrer.
pub const COSIGN_SIGNATURE_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// One signature (or payload) at most: containers/image's limit.
pub const MAX_SIGNATURE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot read signature {url}: {source}")]
    Lookaside {
        url: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("cannot read signature {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("signature {path} is larger than {MAX_SIGNATURE_BYTES} bytes")]
    FileTooLarge { path: String },
    #[error("more than {MAX_SIGNATURES} signatures or {MAX_TOTAL_BYTES} bytes of them for one manifest (last from {from}); refusing to read on")]
    TooMany { from: String },
    #[error("cannot read sigstore attachments {tag} from registry {host}: {source}")]
    Attachments {
        host: String,
        tag: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("sigstore attachments {tag} on registry {host}: {why}")]
    BadAttachments {
        host: String,
        tag: String,
        why: String,
    },
}

/// The registry repository that served the image: where attachments are read.
pub struct Registry<'a> {
    pub client: &'a RegistryClient,
    pub endpoint: &'a Endpoint,
    pub repository: &'a str,
    pub credential: Option<&'a Credential>,
}

/// What was read, and where from (named in errors when nothing was found).
#[derive(Debug, Default)]
pub struct Fetched {
    pub signatures: Vec<Signature>,
    /// Stored signatures that could not be read as any format, with the reason.
    pub unreadable: Vec<String>,
    pub looked_in: Vec<String>,
    /// Signatures (readable or not) and bytes read so far, against the budget.
    count: usize,
    bytes: usize,
}

impl Fetched {
    /// Counts `len` more bytes of one more signature from `from`.
    fn take(&mut self, len: usize, from: &str) -> Result<(), FetchError> {
        self.count += 1;
        self.bytes += len;
        if self.count > MAX_SIGNATURES || self.bytes > MAX_TOTAL_BYTES {
            return Err(FetchError::TooMany {
                from: from.to_string(),
            });
        }
        Ok(())
    }
}

/// Reads every signature of `digest` from the configured sources.
pub async fn fetch(
    sources: &SignatureSources,
    registry: &Registry<'_>,
    digest: &Digest,
) -> Result<Fetched, FetchError> {
    let mut fetched = Fetched::default();
    fetched.looked_in.push(format!(
        "lookaside {} ({})",
        redacted(&sources.signature_url(digest, 1)),
        sources.configured_by
    ));
    for n in 1.. {
        let url = sources.signature_url(digest, n);
        let Some(bytes) = read_lookaside(registry.client, &url).await? else {
            break;
        };
        fetched.take(bytes.len(), &redacted(&url))?;
        match Signature::from_stored(&bytes) {
            Ok(sig) => fetched.signatures.push(sig),
            Err(why) => fetched
                .unreadable
                .push(format!("{}: {why}", redacted(&url))),
        }
    }
    if sources.attachments {
        let tag = format!("{}-{}.sig", digest.algorithm(), digest.hex());
        fetched.looked_in.push(format!(
            "sigstore attachments {}/{}:{tag}",
            registry.endpoint.host, registry.repository
        ));
        attachments(registry, &tag, &tag, &mut fetched).await?;
        referrers(registry, digest, &mut fetched).await?;
    } else {
        fetched.looked_in.push(format!(
            "no sigstore attachments (registries.d sets no use-sigstore-attachments: true; {})",
            sources.configured_by
        ));
    }
    Ok(fetched)
}

async fn read_lookaside(
    client: &RegistryClient,
    url: &url::Url,
) -> Result<Option<Vec<u8>>, FetchError> {
    if url.scheme() == "file" {
        let Ok(file) = url.to_file_path() else {
            return Err(FetchError::File {
                path: url.path().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a local path"),
            });
        };
        let path = file.display().to_string();
        let file_err = |source| FetchError::File {
            path: path.clone(),
            source,
        };
        return match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_err(e)),
            Ok(meta) if meta.len() > MAX_SIGNATURE_BYTES as u64 => {
                Err(FetchError::FileTooLarge { path })
            }
            Ok(_) => std::fs::read(&path).map(Some).map_err(file_err),
        };
    }
    client
        .fetch_lookaside(url, MAX_SIGNATURE_BYTES)
        .await
        .map(|b| b.map(|b| b.to_vec()))
        .map_err(|source| FetchError::Lookaside {
            url: redacted(url),
            source: Box::new(source),
        })
}

/// The signature manifests that name `digest` as their subject, when the registry
/// offers the referrers API; a registry without it answers 404 and is skipped.
async fn referrers(
    registry: &Registry<'_>,
    digest: &Digest,
    fetched: &mut Fetched,
) -> Result<(), FetchError> {
    let what = format!("referrers of {digest}");
    let found = match registry
        .client
        .fetch_referrers(
            registry.endpoint,
            registry.repository,
            digest,
            COSIGN_SIGNATURE_ARTIFACT,
            registry.credential,
        )
        .await
    {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::info!(registry = %registry.endpoint.host, error = %e, "the OCI referrers API failed; reading the .sig tag only");
            fetched.looked_in.push(format!(
                "OCI referrers of {digest} on {}/{}: unavailable ({e})",
                registry.endpoint.host, registry.repository
            ));
            return Ok(());
        }
    };
    fetched.looked_in.push(format!(
        "OCI referrers of {digest} on {}/{} ({} signature manifest(s))",
        registry.endpoint.host,
        registry.repository,
        found.len()
    ));
    for referrer in &found {
        attachments(registry, &referrer.digest.to_string(), &what, fetched).await?;
    }
    Ok(())
}

/// Reads the signature manifest `reference` (a tag or digest); `what` names it in
/// errors. A missing manifest holds no signatures.
async fn attachments(
    registry: &Registry<'_>,
    reference: &str,
    tag: &str,
    fetched: &mut Fetched,
) -> Result<(), FetchError> {
    let host = &registry.endpoint.host;
    let err = |source| FetchError::Attachments {
        host: host.clone(),
        tag: tag.to_string(),
        source: Box::new(source),
    };
    let bad = |why: String| FetchError::BadAttachments {
        host: host.clone(),
        tag: tag.to_string(),
        why,
    };
    let manifest = match registry
        .client
        .fetch_manifest(
            registry.endpoint,
            registry.repository,
            reference,
            registry.credential,
        )
        .await
    {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    let manifest: Manifest = serde_json::from_slice(&manifest.body)
        .map_err(|e| bad(format!("not an image manifest: {e}")))?;
    if manifest.layers.len() > MAX_SIGNATURES {
        return Err(bad(format!(
            "{} layers; at most {MAX_SIGNATURES} signatures are read",
            manifest.layers.len()
        )));
    }
    for layer in &manifest.layers {
        fetched.take(
            layer.size.min(MAX_TOTAL_BYTES as u64 + 1) as usize,
            &format!("{host}/{}:{tag}", registry.repository),
        )?;
        if layer.size > MAX_SIGNATURE_BYTES as u64 {
            return Err(bad(format!(
                "layer {} is {} bytes; at most {MAX_SIGNATURE_BYTES} are read",
                layer.digest, layer.size
            )));
        }
        let payload = read_blob(registry, layer).await.map_err(err)?;
        fetched.signatures.push(Signature::Sigstore {
            mime_type: layer.media_type.clone(),
            payload,
            annotations: layer.annotations.clone().unwrap_or_default(),
        });
    }
    Ok(())
}

async fn read_blob(registry: &Registry<'_>, layer: &Descriptor) -> Result<Vec<u8>, RegistryError> {
    let mut stream = registry
        .client
        .fetch_blob(
            registry.endpoint,
            registry.repository,
            layer,
            0,
            registry.credential,
        )
        .await?;
    let mut out = Vec::with_capacity(layer.size as usize);
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_covers_every_source_together() {
        let mut fetched = Fetched::default();
        for _ in 0..MAX_SIGNATURES {
            fetched.take(10, "lookaside").unwrap();
        }
        assert!(matches!(
            fetched.take(10, "tag"),
            Err(FetchError::TooMany { .. })
        ));
        let mut fetched = Fetched::default();
        fetched.take(MAX_SIGNATURE_BYTES, "a").unwrap();
        for _ in 1..MAX_TOTAL_BYTES / MAX_SIGNATURE_BYTES {
            fetched.take(MAX_SIGNATURE_BYTES, "b").unwrap();
        }
        assert!(fetched.take(1, "c").is_err());
    }
}
