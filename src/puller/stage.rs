//! Layers staged for in-house unpacking, in parallel, ahead of their turn to be
//! committed in layer order ([`Staging::take`]).
//!
//! A layer is extracted while it downloads: its bytes reach the extraction through
//! the download's tee as they arrive, so the layer is staged about when its last
//! byte lands. That extraction counts only if the download stored the whole blob,
//! verified, and the tee carried all of it ([`Fetched::streamed_whole`]). Otherwise
//! (the blob was present, its ingest resumed from an earlier pull's bytes, or the
//! extraction stopped early) the layer is extracted from the content store after
//! its download, at most `max_concurrent_unpacks` such layers at once. Streamed
//! extractions are not counted against that bound: each runs at its download's
//! pace, and the downloads are bounded by `max_concurrent_downloads`. But each
//! holds a blocking thread while it waits for bytes, and the downloads feeding them
//! need blocking threads too (file writes): so at most [`MAX_STREAMED`] layers are
//! extracted from their downloads node-wide, and a layer that finds none of those
//! slots free is extracted from the content store. So is a layer that inflates past
//! its budget before its blob is verified (`UnpackError::OverBudget`).
//!
//! One snapshot is unpacked by one pull at a time ([`ChainClaims`]): when pulls of
//! different images need the same layer at once, one extracts and commits it and
//! the others wait for that, then find it committed.
//!
//! A layer whose snapshot exists already is not staged; a store that does not stage
//! (another snapshotter, `unpack = "containerd"`, `native`) answers
//! [`Staged::Unsupported`] and the pull falls back to `ImageStore::apply_layer`.
//! Dropping [`Staging`] aborts what is still running; staged directories not
//! committed are removed (`StagedLayer`'s drop).

use super::fetch::{BlobError, Fetched, LayerDownload};
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::{ImageStore, LayerBytes, StagedLayer, StoreError};
use crate::unpack::UnpackError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{oneshot, OwnedMutexGuard, Semaphore};
use tokio::task::JoinHandle;

/// Layers extracted from their downloads at once, node-wide: well below tokio's
/// 512 blocking threads, which the downloads' file writes need as well.
pub(super) const MAX_STREAMED: usize = 64;

/// What the staging of every pull in this daemon shares.
pub(super) struct NodeStaging {
    chains: ChainClaims,
    streams: Semaphore,
}

impl NodeStaging {
    pub(super) fn new(max_streamed: usize) -> Self {
        NodeStaging {
            chains: ChainClaims::default(),
            streams: Semaphore::new(max_streamed),
        }
    }
}

/// What became of one layer before its turn to be committed.
pub(super) enum Staged {
    /// Extracted into a staging directory; its diff ID checked. Hold the claim
    /// until the snapshot is committed (or the pull gave up).
    Ready(StagedLayer, ChainClaim),
    /// Its snapshot was committed already when its download began.
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
    pub download: LayerDownload,
}

/// The chain IDs (snapshots) this daemon's pulls are unpacking. Whoever holds a
/// chain ID's claim extracts and commits that snapshot; a pull that needs it too
/// waits for the claim, then finds it committed (or, if the holder failed, takes
/// over). A claim is held from staging until the commit, and pulls commit in layer
/// order, so the holder of the lowest claimed layer can always finish: no pull waits
/// for another in a circle.
#[derive(Default)]
struct ChainClaims {
    held: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

/// One pull's claim on a chain ID, given back on drop.
pub(super) struct ChainClaim {
    _held: OwnedMutexGuard<()>,
}

impl ChainClaims {
    fn lock_of(&self, chain_id: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // Locks nobody holds or waits for are forgotten.
        held.retain(|_, lock| Arc::strong_count(lock) > 1);
        held.entry(chain_id.clone()).or_default().clone()
    }

    /// The claim, if no other pull holds it.
    fn try_claim(&self, chain_id: &Digest) -> Option<ChainClaim> {
        self.lock_of(chain_id)
            .try_lock_owned()
            .ok()
            .map(|held| ChainClaim { _held: held })
    }

    /// The claim, once the pull holding it is done with it.
    async fn claim(&self, chain_id: &Digest) -> ChainClaim {
        ChainClaim {
            _held: self.lock_of(chain_id).lock_owned().await,
        }
    }
}

pub(super) struct Staging {
    tasks: Vec<Option<JoinHandle<Result<Staged, StageError>>>>,
}

/// What every layer's staging shares.
struct Shared {
    store: Arc<dyn ImageStore>,
    snapshotter: String,
    /// Extractions from the content store at once (`max_concurrent_unpacks`).
    permits: Semaphore,
    node: Arc<NodeStaging>,
}

impl Staging {
    pub(super) fn spawn(
        store: &Arc<dyn ImageStore>,
        snapshotter: &str,
        node: &Arc<NodeStaging>,
        jobs: Vec<Job>,
        concurrency: usize,
    ) -> Staging {
        let shared = Arc::new(Shared {
            store: store.clone(),
            snapshotter: snapshotter.to_string(),
            permits: Semaphore::new(concurrency.max(1)),
            node: node.clone(),
        });
        let tasks = jobs
            .into_iter()
            .enumerate()
            .map(|(i, job)| {
                let shared = shared.clone();
                Some(tokio::spawn(
                    async move { stage(&shared, job, i == 0).await },
                ))
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

async fn downloaded(
    result: oneshot::Receiver<Result<Fetched, BlobError>>,
) -> Result<Fetched, StageError> {
    match result.await {
        Ok(Ok(fetched)) => Ok(fetched),
        Ok(Err(e)) => Err(StageError::Download(e)),
        Err(_) => Err(StageError::Lost),
    }
}

/// Stages one layer: from its download stream if that carries the whole verified
/// blob, else from the content store once the download is done.
async fn stage(shared: &Shared, job: Job, first: bool) -> Result<Staged, StageError> {
    let Shared {
        store,
        snapshotter,
        node,
        ..
    } = shared;
    let Job {
        layer,
        diff_id,
        chain_id,
        download,
    } = job;
    let started = Instant::now();
    let exists = || async {
        store
            .snapshot_exists(snapshotter, &chain_id)
            .await
            .map_err(StageError::Store)
    };
    // Dropping the stream lets the download go on without it.
    if exists().await? {
        drop(download.stream);
        downloaded(download.result).await?;
        return Ok(Staged::Present);
    }
    let Some(claim) = node.chains.try_claim(&chain_id) else {
        // Another pull is unpacking this snapshot: wait for it without holding up
        // our download, then use its snapshot, or do it ourselves if it failed.
        drop(download.stream);
        let claim = node.chains.claim(&chain_id).await;
        if exists().await? {
            downloaded(download.result).await?;
            return Ok(Staged::Present);
        }
        downloaded(download.result).await?;
        let staged = stage_stored(shared, &layer, &diff_id, first).await;
        return finish(staged, claim, &layer, false, started);
    };
    let Ok(stream_slot) = node.streams.try_acquire() else {
        drop(download.stream);
        downloaded(download.result).await?;
        let staged = stage_stored(shared, &layer, &diff_id, first).await;
        return finish(staged, claim, &layer, false, started);
    };
    let streamed = store.stage_layer(
        snapshotter,
        &layer,
        &diff_id,
        first,
        LayerBytes::Streamed(download.stream),
    );
    let (streamed, fetched) = tokio::join!(streamed, downloaded(download.result));
    drop(stream_slot);
    let whole = fetched?.streamed_whole;
    let (staged, streamed) = match (streamed, whole) {
        // Too big to trust unverified; the stored blob is verified.
        (Err(StoreError::Unpack(UnpackError::OverBudget { limit, .. })), _) => {
            tracing::debug!(digest = %layer.digest, limit, "layer inflates past its streaming budget; extracting it from the content store");
            (stage_stored(shared, &layer, &diff_id, first).await, false)
        }
        // The extraction read exactly the verified blob: its verdict stands, a
        // refused entry or a wrong diff ID included.
        (streamed, true) | (streamed @ Ok(None), false) => (streamed, whole),
        // It did not (nothing is lost but time): from the content store.
        (streamed, false) => {
            drop(streamed);
            (stage_stored(shared, &layer, &diff_id, first).await, false)
        }
    };
    finish(staged, claim, &layer, streamed, started)
}

/// Extracts the layer from the content store, at most `max_concurrent_unpacks`
/// at once.
async fn stage_stored(
    shared: &Shared,
    layer: &Descriptor,
    diff_id: &Digest,
    first: bool,
) -> Result<Option<StagedLayer>, StoreError> {
    let _permit = shared.permits.acquire().await;
    shared
        .store
        .stage_layer(
            &shared.snapshotter,
            layer,
            diff_id,
            first,
            LayerBytes::Stored,
        )
        .await
}

fn finish(
    staged: Result<Option<StagedLayer>, StoreError>,
    claim: ChainClaim,
    layer: &Descriptor,
    streamed: bool,
    started: Instant,
) -> Result<Staged, StageError> {
    match staged.map_err(StageError::Store)? {
        None => Ok(Staged::Unsupported),
        Some(staged) => {
            tracing::debug!(digest = %layer.digest, streamed, elapsed_ms = started.elapsed().as_millis() as u64, "layer staged");
            Ok(Staged::Ready(staged, claim))
        }
    }
}
