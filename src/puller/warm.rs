//! A re-pull of an image that is already here: one manifest `HEAD` to the registry
//! and no `GET`, as containerd resolves (Docker Hub counts manifest GETs against its
//! pull rate limit, not HEADs).
//!
//! The image is "here" when the record the reference names exists, the documents
//! behind its target are in the content store, and [`Inner::already_pulled`] holds
//! (every record ours, config stored, top snapshot unpacked). Then the registry is
//! asked what the reference resolves to now: the same digest (for a tag, from
//! `Docker-Content-Digest`; for a digest, a successful HEAD) finishes the pull, once
//! policy.json's signatures are verified on the manifest read from the content store.
//! Anything else (a moved tag, no digest header, a registry refusing HEAD) falls
//! back to the full pull with its GET.

use super::{Attempting, Inner, PullError, MAX_DOCUMENT_BYTES};
use crate::digest::Digest;
use crate::oci::{self, Descriptor, Index, Manifest, ManifestKind};
use crate::registry::RegistryError;
use crate::store::StoreError;
use bytes::Bytes;

impl Inner {
    /// Finishes the pull without a manifest GET if the image is whole here and the
    /// registry still resolves the reference to it. `None`: do the full pull.
    pub(super) async fn warm_pull(
        &self,
        at: &Attempting<'_>,
    ) -> Result<Option<(Digest, Descriptor)>, PullError> {
        let name = match (at.image.digest(), at.image.tagged_name()) {
            (Some(digest), _) => at.image.digest_name(digest),
            (None, Some(tagged)) => tagged,
            (None, None) => return Ok(None),
        };
        let Some(record) = self.store_call(at, self.store.get_image(&name)).await? else {
            return Ok(None);
        };
        let target = record.target;
        if at.image.digest().is_some_and(|d| *d != target.digest) {
            return Ok(None);
        }
        let Some(stored) = self.stored_manifest(at, &target).await? else {
            return Ok(None);
        };
        if !self
            .already_pulled(at, &target.digest, &stored.manifest)
            .await?
        {
            return Ok(None);
        }

        let reference = at.source.reference.manifest_reference();
        let head = self
            .registry
            .head_manifest(
                &at.source.endpoint,
                at.source.reference.path(),
                &reference,
                at.credential,
            )
            .await;
        let head = match head {
            Ok(head) => head,
            Err(e) if is_refused_head(&e) => {
                tracing::debug!(image = %at.image, error = %e, "manifest HEAD refused; fetching the manifest");
                return Ok(None);
            }
            Err(e) => {
                return Err(PullError::Registry {
                    image: at.image.to_string(),
                    registry: at.source.endpoint.host.clone(),
                    source: Box::new(e),
                })
            }
        };
        match (&head.digest, at.image.digest()) {
            (Some(now), _) if *now == target.digest => {}
            // By digest, a successful HEAD is the answer (the digest is the name).
            (None, Some(_)) => {}
            (Some(now), _) => {
                tracing::debug!(image = %at.image, was = %target.digest, now = %now, "the tag moved; fetching the new manifest");
                return Ok(None);
            }
            (None, None) => {
                tracing::debug!(image = %at.image, "manifest HEAD gave no Docker-Content-Digest; fetching the manifest");
                return Ok(None);
            }
        }
        self.verify_signatures(at, &stored.digest, &stored.body, stored.index.as_ref())
            .await?;
        tracing::debug!(image = %at.image, digest = %target.digest, "already pulled; nothing to write (manifest HEAD: unchanged at the registry)");
        Ok(Some((
            stored.manifest.config.digest.clone(),
            Descriptor::new(target.media_type, target.digest, target.size),
        )))
    }

    /// The platform manifest behind `target`, read from the content store; `None`
    /// when a document is missing, unreadable or has nothing for our platform.
    async fn stored_manifest(
        &self,
        at: &Attempting<'_>,
        target: &Descriptor,
    ) -> Result<Option<StoredManifest>, PullError> {
        let Some(top) = self.stored_document(at, &target.digest).await? else {
            return Ok(None);
        };
        let (digest, body, index) = match oci::manifest_kind(&target.media_type) {
            ManifestKind::Manifest => (target.digest.clone(), top, None),
            ManifestKind::Index => {
                let Ok(index) = serde_json::from_slice::<Index>(&top) else {
                    return Ok(None);
                };
                let Some(child) = self.settings.platform.select(&index.manifests) else {
                    return Ok(None);
                };
                let Some(body) = self.stored_document(at, &child.digest).await? else {
                    return Ok(None);
                };
                (child.digest.clone(), body, Some(target.digest.clone()))
            }
            ManifestKind::Schema1 | ManifestKind::Unknown => return Ok(None),
        };
        let Ok(manifest) = serde_json::from_slice::<Manifest>(&body) else {
            return Ok(None);
        };
        Ok(Some(StoredManifest {
            digest,
            body,
            index,
            manifest,
        }))
    }

    async fn stored_document(
        &self,
        at: &Attempting<'_>,
        digest: &Digest,
    ) -> Result<Option<Bytes>, PullError> {
        match self.store.read_content(digest, MAX_DOCUMENT_BYTES).await {
            Ok(body) => Ok(Some(body)),
            Err(StoreError::NotFound { .. } | StoreError::TooLarge { .. }) => Ok(None),
            Err(source) => Err(PullError::Store {
                image: at.image.to_string(),
                source,
            }),
        }
    }
}

/// The platform manifest of a stored image.
struct StoredManifest {
    digest: Digest,
    body: Bytes,
    /// The index it was reached through.
    index: Option<Digest>,
    manifest: Manifest,
}

/// A HEAD the registry would not answer usefully (405, another 4xx, a 404 a GET may
/// explain better): the GET decides. Refused credentials, rate limits and an
/// unreachable registry are the answer already.
fn is_refused_head(e: &RegistryError) -> bool {
    match e {
        RegistryError::NotFound { .. } => true,
        RegistryError::Server { status, .. } => (400..500).contains(status),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NotFound;

    #[test]
    fn only_a_refused_head_falls_back_to_get() {
        let server = |status| RegistryError::Server {
            host: "r.io".into(),
            status,
            code: None,
            detail: String::new(),
        };
        assert!(is_refused_head(&server(405)));
        assert!(is_refused_head(&server(400)));
        assert!(is_refused_head(&RegistryError::NotFound {
            host: "r.io".into(),
            what: NotFound::Manifest {
                repository: "a".into(),
                reference: "1".into(),
            },
        }));
        assert!(!is_refused_head(&server(503)));
        assert!(!is_refused_head(&RegistryError::Unauthorized {
            host: "r.io".into(),
            detail: String::new(),
        }));
        assert!(!is_refused_head(&RegistryError::TooManyRequests {
            host: "r.io".into(),
            retry_after: None,
        }));
    }
}
