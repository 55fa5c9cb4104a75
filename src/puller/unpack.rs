//! Pull stage three: the layers. Each downloads in its own task (fetch.rs) and is
//! staged as it arrives (stage.rs); here they become snapshots in layer order, each
//! on its parent: a staged tree is committed, anything else goes through
//! `ImageStore::apply_layer`.

use super::{stage, Attempting, Inner, PullError};
use crate::digest::Digest;
use crate::oci::Manifest;
use crate::store::Lease;
use std::time::Instant;

impl Inner {
    /// Downloads, unpacks and commits every layer of `manifest` under `lease`;
    /// returns once the top snapshot (`chain_ids`' last) is committed.
    pub(super) async fn unpack_layers(
        &self,
        at: &Attempting<'_>,
        lease: &Lease,
        manifest: &Manifest,
        diff_ids: &[Digest],
        chain_ids: &[Digest],
        source_label: &(String, String),
    ) -> Result<(), PullError> {
        // Layers download in parallel tasks. Each is staged (extracted in-house) while
        // it downloads, several at once; then committed in layer order.
        let mut downloads =
            self.spawn_downloads(at, lease, &manifest.layers, diff_ids, source_label);
        let jobs = downloads
            .take_layers()
            .into_iter()
            .enumerate()
            .map(|(i, download)| stage::Job {
                layer: manifest.layers[i].clone(),
                diff_id: diff_ids[i].clone(),
                chain_id: chain_ids[i].clone(),
                download,
            })
            .collect();
        let mut staging = stage::Staging::spawn(
            &self.store,
            &self.settings.snapshotter,
            &self.staging,
            jobs,
            self.settings.max_concurrent_unpacks,
        );
        let mut parent: Option<&Digest> = None;
        for i in 0..manifest.layers.len() {
            let staged = staging.take(i).await.map_err(|e| match e {
                stage::StageError::Download(e) => {
                    e.into_pull_error(at.image, &at.source.endpoint.host)
                }
                stage::StageError::Store(source) => PullError::Store {
                    image: at.image.to_string(),
                    source,
                },
                stage::StageError::Lost => PullError::Task {
                    image: at.image.to_string(),
                    detail: format!("the download or unpack of layer {i} ended without a result"),
                },
            })?;
            let layer = &manifest.layers[i];
            let unpack_started = Instant::now();
            let chain_id = &chain_ids[i];
            // Held first, then looked at: a snapshot of another image found here cannot
            // be collected before our records reference it.
            self.store_call(
                at,
                self.store
                    .lease_snapshot(lease, &self.settings.snapshotter, chain_id),
            )
            .await?;
            let exists = self
                .store_call(
                    at,
                    self.store
                        .snapshot_exists(&self.settings.snapshotter, chain_id),
                )
                .await?;
            if !exists {
                match staged {
                    // Staged and diff-ID-checked already: Prepare, move in, Commit.
                    stage::Staged::Ready(staged, _claim) => {
                        self.store_call(
                            at,
                            self.store.commit_staged(
                                lease,
                                &self.settings.snapshotter,
                                staged,
                                parent,
                                chain_id,
                            ),
                        )
                        .await?;
                    }
                    // The store checks the unpacked digest against the config's diff
                    // ID and commits nothing on a mismatch.
                    stage::Staged::Present | stage::Staged::Unsupported => {
                        self.store_call(
                            at,
                            self.store.apply_layer(
                                lease,
                                &self.settings.snapshotter,
                                layer,
                                &diff_ids[i],
                                parent,
                                chain_id,
                            ),
                        )
                        .await?;
                    }
                }
                tracing::debug!(layer = i, digest = %layer.digest, elapsed_ms = unpack_started.elapsed().as_millis() as u64, "layer unpacked");
            }
            at.progress.layer_unpacked();
            parent = Some(chain_id);
        }
        drop(downloads);
        Ok(())
    }
}
