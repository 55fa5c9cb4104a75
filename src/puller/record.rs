//! Pull stage four: what makes the image visible. The config's GC reference to its
//! top snapshot, the manifest and index with their GC labels, and the image records
//! last, so containerd's CRI sees a complete image or none (DESIGN.md).

use super::fetch::ingest_ref;
use super::{Attempting, Inner, PullError};
use crate::digest::Digest;
use crate::oci::{Descriptor, Index, Manifest};
use crate::reference::Reference;
use crate::store::{ImageRecord, Ingest, Labels, Lease, LABEL_CRI_MANAGED, LABEL_PINNED};
use bytes::Bytes;

impl Inner {
    /// Writes the labels, documents and records of a pulled image whose layers are
    /// committed (`top`: its top snapshot). Returns (image ID, record target).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn record_image(
        &self,
        at: &Attempting<'_>,
        lease: &Lease,
        manifest_desc: &Descriptor,
        manifest_body: Bytes,
        manifest: &Manifest,
        index: Option<(crate::registry::FetchedManifest, Index)>,
        top: Option<&Digest>,
        source_label: &(String, String),
    ) -> Result<(Digest, Descriptor), PullError> {
        // GC references: config → top snapshot; manifest → config and layers; index → manifests.
        if let Some(top) = top {
            let mut labels = Labels::new();
            labels.insert(
                format!(
                    "containerd.io/gc.ref.snapshot.{}",
                    self.settings.snapshotter
                ),
                top.to_string(),
            );
            self.store_call(
                at,
                self.store.update_labels(&manifest.config.digest, labels),
            )
            .await?;
        }
        let mut labels = Labels::new();
        labels.insert(source_label.0.clone(), source_label.1.clone());
        labels.insert(
            "containerd.io/gc.ref.content.config".into(),
            manifest.config.digest.to_string(),
        );
        for (i, layer) in manifest.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.to_string(),
            );
        }
        self.write_document(at, lease, manifest_desc, manifest_body, "manifest", labels)
            .await?;
        let target = match index {
            Some((top, index)) => {
                let mut labels = Labels::new();
                labels.insert(source_label.0.clone(), source_label.1.clone());
                for (i, m) in index.manifests.iter().enumerate() {
                    labels.insert(
                        format!("containerd.io/gc.ref.content.m.{i}"),
                        m.digest.to_string(),
                    );
                }
                self.write_document(at, lease, &top.descriptor, top.body, "index", labels)
                    .await?;
                top.descriptor
            }
            None => manifest_desc.clone(),
        };

        // The records last: containerd's CRI learns of the image from these events.
        let target = Descriptor::new(
            target.media_type.clone(),
            target.digest.clone(),
            target.size,
        );
        let names = record_names(at.image, &target.digest, &manifest.config.digest);
        let mut labels = Labels::new();
        labels.insert(LABEL_CRI_MANAGED.to_string(), "managed".to_string());
        if self.settings.is_pinned(at.image) {
            labels.insert(LABEL_PINNED.to_string(), "pinned".to_string());
        }
        for name in names {
            let record = ImageRecord {
                name,
                target: target.clone(),
                labels: labels.clone(),
            };
            self.store_call(at, self.store.put_image(record)).await?;
        }
        Ok((manifest.config.digest.clone(), target))
    }

    async fn write_document(
        &self,
        at: &Attempting<'_>,
        lease: &Lease,
        desc: &Descriptor,
        body: Bytes,
        kind: &str,
        labels: Labels,
    ) -> Result<(), PullError> {
        let reference = ingest_ref(kind, &desc.digest);
        match self
            .store_call(at, self.store.open_writer(lease, &reference, desc))
            .await?
        {
            Ingest::Present => {
                self.store_call(at, self.store.update_labels(&desc.digest, labels))
                    .await
            }
            Ingest::Writer(mut w) => {
                let offset = usize::try_from(w.offset())
                    .unwrap_or(usize::MAX)
                    .min(body.len());
                self.store_call(at, w.write(body.slice(offset..))).await?;
                self.store_call(at, w.commit(labels)).await
            }
        }
    }
}

/// The image records containerd's CRI writes for a pull: `name:tag` (when pulled
/// by tag), `name@<target digest>` and the image ID.
pub(super) fn record_names(image: &Reference, target: &Digest, config: &Digest) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(tagged) = image.tagged_name() {
        names.push(tagged);
    }
    names.push(image.digest_name(target));
    names.push(config.to_string());
    names
}
