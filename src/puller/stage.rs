//! Layers staged for in-house unpacking as soon as each one's download lands, in
//! parallel (at most `max_concurrent_unpacks` at once), while later layers are still
//! downloading. The pull then commits them in layer order ([`Staging::take`]).
//!
//! A layer whose snapshot exists already is not staged; a store that does not stage
//! (another snapshotter, `unpack = "containerd"`, `native`) answers
//! [`Staged::Unsupported`] and the pull falls back to `ImageStore::apply_layer`.
//! Dropping [`Staging`] aborts what is still running; staged directories not
//! committed are removed (`StagedLayer`'s drop).

use super::fetch::BlobError;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::{ImageStore, StagedLayer, StoreError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

/// What became of one layer before its turn to be committed.
pub(super) enum Staged {
    /// Extracted into a staging directory; its diff ID checked.
    Ready(StagedLayer),
    /// Its snapshot was committed already when its download landed.
    Present,
    /// The store does not stage for this snapshotter: unpack with `apply_layer`.
    Unsupported,
}

#[derive(Debug)]
pub(super) enum StageError {
    Download(BlobError),
    Store(StoreError),
    /// The download task ended without a result (it was cancelled).
    Lost,
}

/// One layer to stage.
pub(super) struct Job {
    pub layer: Descriptor,
    pub diff_id: Digest,
    pub chain_id: Digest,
    pub downloaded: oneshot::Receiver<Result<(), BlobError>>,
}

pub(super) struct Staging {
    tasks: Vec<Option<JoinHandle<Result<Staged, StageError>>>>,
}

impl Staging {
    pub(super) fn spawn(
        store: &Arc<dyn ImageStore>,
        snapshotter: &str,
        jobs: Vec<Job>,
        concurrency: usize,
    ) -> Staging {
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let tasks = jobs
            .into_iter()
            .enumerate()
            .map(|(i, job)| {
                let store = store.clone();
                let snapshotter = snapshotter.to_string();
                let permits = permits.clone();
                Some(tokio::spawn(async move {
                    match job.downloaded.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(StageError::Download(e)),
                        Err(_) => return Err(StageError::Lost),
                    }
                    if store
                        .snapshot_exists(&snapshotter, &job.chain_id)
                        .await
                        .map_err(StageError::Store)?
                    {
                        return Ok(Staged::Present);
                    }
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return Err(StageError::Lost);
                    };
                    let started = Instant::now();
                    let staged = store
                        .stage_layer(&snapshotter, &job.layer, &job.diff_id, i == 0)
                        .await
                        .map_err(StageError::Store)?;
                    Ok(match staged {
                        Some(staged) => {
                            tracing::debug!(layer = i, digest = %job.layer.digest, elapsed_ms = started.elapsed().as_millis() as u64, "layer staged");
                            Staged::Ready(staged)
                        }
                        None => Staged::Unsupported,
                    })
                }))
            })
            .collect();
        Staging { tasks }
    }

    /// Waits for layer `i` (each layer once).
    pub(super) async fn take(&mut self, i: usize) -> Result<Staged, StageError> {
        let Some(task) = self.tasks.get_mut(i).and_then(Option::take) else {
            return Err(StageError::Lost);
        };
        match task.await {
            Ok(result) => result,
            Err(_) => Err(StageError::Lost),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for task in self.tasks.iter().flatten() {
            task.abort();
        }
    }
}
