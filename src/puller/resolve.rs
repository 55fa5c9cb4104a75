//! Pull stage one: what to pull. The manifest (through an index, for this
//! platform), the checks it must pass before anything is written (signatures,
//! sizes, media types), and whether the image is already whole here.

use super::fetch::ingest_ref;
use super::record::record_names;
use super::{Attempting, Inner, LeaseCleanup, PullError, MAX_DOCUMENT_BYTES, MAX_LAYERS};
use crate::digest::Digest;
use crate::oci::{self, Descriptor, ImageConfig, Index, Manifest, ManifestKind};
use crate::registry::RegistryError;
use crate::signature;
use crate::store::{ImageRecord, StoreError, LABEL_CRI_MANAGED, LABEL_PINNED};
use bytes::Bytes;

impl Inner {
    /// One try at one source with one credential. Returns (image ID, target).
    pub(super) async fn pull_from(
        &self,
        at: &Attempting<'_>,
    ) -> Result<(Digest, Descriptor), PullError> {
        // An image already here costs one manifest HEAD, as with containerd.
        if let Some(done) = self.warm_pull(at).await? {
            return Ok(done);
        }
        let endpoint = &at.source.endpoint;
        let repo = at.source.reference.path();
        let reg_err = |source: RegistryError| PullError::Registry {
            image: at.image.to_string(),
            registry: endpoint.host.clone(),
            source: Box::new(source),
        };
        let top = self
            .registry
            .fetch_manifest(
                endpoint,
                repo,
                &at.source.reference.manifest_reference(),
                at.credential,
            )
            .await
            .map_err(reg_err)?;
        let (manifest_desc, manifest_body, index) =
            match oci::manifest_kind(&top.descriptor.media_type) {
                ManifestKind::Index => {
                    let index: Index = self.parse_document(at, &top.body, "image index")?;
                    let Some(child) = self.settings.platform.select(&index.manifests) else {
                        return Err(PullError::NoMatchingPlatform {
                            image: at.image.to_string(),
                            wanted: self.settings.platform.to_string(),
                            available: index
                                .manifests
                                .iter()
                                .filter_map(|d| d.platform.as_ref())
                                .map(|p| match &p.variant {
                                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                                    None => format!("{}/{}", p.os, p.architecture),
                                })
                                .collect(),
                        });
                    };
                    let fetched = self
                        .registry
                        .fetch_manifest(endpoint, repo, &child.digest.to_string(), at.credential)
                        .await
                        .map_err(reg_err)?;
                    if oci::manifest_kind(&fetched.descriptor.media_type) != ManifestKind::Manifest
                    {
                        return Err(self.invalid(
                            at,
                            format!(
                                "index entry {} is a {}, not an image manifest",
                                child.digest, fetched.descriptor.media_type
                            ),
                        ));
                    }
                    (fetched.descriptor, fetched.body, Some((top, index)))
                }
                ManifestKind::Manifest => (top.descriptor, top.body, None),
                ManifestKind::Schema1 | ManifestKind::Unknown => {
                    return Err(reg_err(RegistryError::Unsupported {
                        media_type: top.descriptor.media_type.clone(),
                        why: "not an OCI or Docker schema 2 image",
                    }))
                }
            };
        // Signatures are judged on the platform manifest, before anything is written.
        self.verify_signatures(
            at,
            &manifest_desc.digest,
            &manifest_body,
            index.as_ref().map(|(top, _)| &top.descriptor.digest),
        )
        .await?;
        let manifest: Manifest = self.parse_document(at, &manifest_body, "image manifest")?;
        // The config is read whole: refuse an absurd one before downloading it.
        if manifest.config.size > MAX_DOCUMENT_BYTES {
            return Err(self.invalid(
                at,
                format!(
                    "the config {} is {} bytes; at most {MAX_DOCUMENT_BYTES} are accepted",
                    manifest.config.digest, manifest.config.size
                ),
            ));
        }
        // Each layer becomes a snapshot: a hostile manifest must not make thousands.
        if manifest.layers.len() > MAX_LAYERS {
            return Err(self.invalid(
                at,
                format!(
                    "the manifest lists {} layers; at most {MAX_LAYERS} are accepted",
                    manifest.layers.len()
                ),
            ));
        }
        if let Some(bad) = manifest
            .layers
            .iter()
            .find(|l| !oci::is_layer(&l.media_type))
        {
            return Err(self.invalid(
                at,
                format!(
                    "layer {} has media type {:?}, which cannot be unpacked",
                    bad.digest, bad.media_type
                ),
            ));
        }

        let target_digest = index
            .as_ref()
            .map_or(&manifest_desc.digest, |(top, _)| &top.descriptor.digest);
        if self.already_pulled(at, target_digest, &manifest).await? {
            let target = index.map_or(manifest_desc, |(top, _)| top.descriptor);
            tracing::debug!(image = %at.image, "already pulled; nothing to write");
            return Ok((
                manifest.config.digest.clone(),
                Descriptor::new(target.media_type, target.digest, target.size),
            ));
        }

        at.progress.downloading(&manifest);
        let lease = self
            .store_call(at, self.store.create_lease(self.settings.lease_expiry))
            .await?;
        let cleanup = LeaseCleanup {
            store: self.store.clone(),
            lease: Some(lease.clone()),
            ingests: std::iter::once(ingest_ref("config", &manifest.config.digest))
                .chain(
                    manifest
                        .layers
                        .iter()
                        .map(|l| ingest_ref("layer", &l.digest)),
                )
                .collect(),
        };
        let result = self
            .fetch_and_unpack(at, &lease, &manifest_desc, manifest_body, &manifest, index)
            .await;
        cleanup.run(result.is_err()).await;
        result
    }

    /// Enforces policy.json's signature requirements (if any) on the platform
    /// manifest `digest` with body `manifest`, reached through the index `index`.
    pub(super) async fn verify_signatures(
        &self,
        at: &Attempting<'_>,
        digest: &Digest,
        manifest: &Bytes,
        index: Option<&Digest>,
    ) -> Result<(), PullError> {
        if at.signatures.pending.is_empty() {
            return Ok(());
        }
        let registry = signature::fetch::Registry {
            client: &self.registry,
            endpoint: &at.source.endpoint,
            repository: at.source.reference.path(),
            credential: at.credential,
        };
        // As containers/image does, registries.d is looked up for the source
        // contacted (a mirror may keep its own lookaside).
        let sources = at
            .signatures
            .trust
            .registries_d()
            .sources_for(&at.source.reference);
        let pulled = signature::Pulled {
            digest,
            manifest,
            index,
        };
        let accepted = signature::enforce(
            &at.signatures.pending,
            &sources,
            &registry,
            at.image,
            pulled,
        )
        .await
        .map_err(|e| match e {
            signature::EnforceError::Refused(r) => PullError::Refused(r),
            signature::EnforceError::Unreadable(source) => PullError::Signatures {
                image: at.image.to_string(),
                source: Box::new(source),
            },
        })?;
        tracing::info!(image = %at.image, manifest = %digest, accepted = ?accepted, "signatures verified");
        Ok(())
    }

    /// Whether the image is already whole here: every record we would write names
    /// this target as ours, the config is stored and its top snapshot is unpacked.
    /// A warm pull then writes nothing (and takes no lease).
    pub(super) async fn already_pulled(
        &self,
        at: &Attempting<'_>,
        target: &Digest,
        manifest: &Manifest,
    ) -> Result<bool, PullError> {
        let pinned = self.settings.is_pinned(at.image);
        for name in record_names(at.image, target, &manifest.config.digest) {
            let record = self.store_call(at, self.store.get_image(&name)).await?;
            let label = |r: &ImageRecord, key: &str, value: &str| {
                r.labels.get(key).is_some_and(|v| v == value)
            };
            // A newly pinned image gets its records written again, with the label.
            let ours = record.is_some_and(|r| {
                &r.target.digest == target
                    && label(&r, LABEL_CRI_MANAGED, "managed")
                    && (!pinned || label(&r, LABEL_PINNED, "pinned"))
            });
            if !ours {
                return Ok(false);
            }
        }
        let config = match self
            .store
            .read_content(&manifest.config.digest, MAX_DOCUMENT_BYTES)
            .await
        {
            Ok(body) => body,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(source) => {
                return Err(PullError::Store {
                    image: at.image.to_string(),
                    source,
                })
            }
        };
        let Ok(config) = serde_json::from_slice::<ImageConfig>(&config) else {
            return Ok(false);
        };
        match config.chain_ids().last() {
            Some(top) => {
                self.store_call(
                    at,
                    self.store.snapshot_exists(&self.settings.snapshotter, top),
                )
                .await
            }
            None => Ok(false),
        }
    }
}
