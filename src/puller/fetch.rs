//! Pull stage two: blobs from the registry into the content store. Layers download
//! in parallel tasks, begun in manifest order; a body that breaks off is resumed
//! with a `Range` request on the same ingest.

use super::{Attempting, Inner, PullError};
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::policy::Source;
use crate::progress::PullProgress;
use crate::reference::Reference;
use crate::registry::{Credential, Endpoint, RegistryClient, RegistryError};
use crate::store::{ImageStore, Ingest, Labels, Lease, StoreError, LABEL_UNCOMPRESSED};
use crate::unpack::{self, TeeReader, TeeSender};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Times a blob download is resumed after the connection broke mid-body.
const BLOB_RESUMES: usize = 3;
/// Bytes a download may be ahead of its extraction (memory per layer in flight).
const TEE_AHEAD: usize = 1 << 20;

impl Inner {
    /// Starts the layer downloads: at most `max_concurrent_downloads` at once, begun
    /// in manifest order, so the layer the next unpack needs is never queued behind a
    /// later one (tasks spawned all at once start in no useful order). Each layer's
    /// bytes are also handed on as they arrive ([`LayerDownload::stream`]), for
    /// extraction during the download.
    pub(super) fn spawn_downloads(
        &self,
        at: &Attempting<'_>,
        lease: &Lease,
        layers: &[Descriptor],
        diff_ids: &[Digest],
        source_label: &(String, String),
    ) -> Downloads {
        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent_downloads));
        let mut results = Vec::with_capacity(layers.len());
        let mut jobs = Vec::with_capacity(layers.len());
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let mut labels = Labels::new();
            labels.insert(source_label.0.clone(), source_label.1.clone());
            labels.insert(LABEL_UNCOMPRESSED.to_string(), diff_id.to_string());
            let (done, result) = oneshot::channel();
            let (tee, stream) = unpack::tee(TEE_AHEAD);
            results.push(LayerDownload { result, stream });
            jobs.push((layer.clone(), labels, done, tee));
        }
        let store = self.store.clone();
        let registry = self.registry.clone();
        let source = at.source.clone();
        let credential = at.credential.cloned();
        let lease = lease.clone();
        let progress = at.progress.clone();
        let dispatcher = tokio::spawn(async move {
            // Owning the set ties the downloads to the dispatcher: aborting it (when
            // the pull fails) drops the set, which aborts them all.
            let mut running = JoinSet::new();
            for (layer, labels, done, tee) in jobs {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (store, registry, source, credential, lease, progress) = (
                    store.clone(),
                    registry.clone(),
                    source.clone(),
                    credential.clone(),
                    lease.clone(),
                    progress.clone(),
                );
                running.spawn(async move {
                    let result = fetch_blob(
                        &store,
                        &registry,
                        &source,
                        credential.as_ref(),
                        &lease,
                        &layer,
                        "layer",
                        labels,
                        &progress,
                        Some(tee),
                        Some(permit),
                    )
                    .await;
                    if result.is_ok() {
                        progress.layer_stored();
                    }
                    let _ = done.send(result);
                });
            }
            while running.join_next().await.is_some() {}
        });
        Downloads {
            results,
            dispatcher,
        }
    }
}

/// The stable ingest name of a blob (`layer-sha256:…`, as containerd names its own),
/// so an interrupted write is resumed rather than restarted.
pub(super) fn ingest_ref(kind: &str, digest: &Digest) -> String {
    format!("{kind}-{digest}")
}

/// The layer downloads of one pull, each result arriving on its own channel;
/// all of them are aborted if this is dropped unfinished.
pub(super) struct Downloads {
    results: Vec<LayerDownload>,
    dispatcher: JoinHandle<()>,
}

/// One layer's download, as the unpacking sees it.
pub(super) struct LayerDownload {
    /// The outcome, once the blob is stored (or the download failed).
    pub result: oneshot::Receiver<Result<Fetched, BlobError>>,
    /// The blob's bytes as they arrive; dropping it costs the download nothing.
    pub stream: TeeReader,
}

/// A blob now in the content store.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fetched {
    /// Every byte of the blob went through the tee, from the first to the last: an
    /// extraction that read the stream saw exactly the blob that was verified. Not
    /// so when the blob was present already, or its ingest resumed from bytes an
    /// earlier pull had written.
    pub streamed_whole: bool,
}

impl Downloads {
    /// Each layer's download, in manifest order (the downloads keep running until
    /// this is dropped).
    pub(super) fn take_layers(&mut self) -> Vec<LayerDownload> {
        std::mem::take(&mut self.results)
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

/// Why one blob could not be stored.
#[derive(Debug)]
pub(super) enum BlobError {
    Registry(Box<RegistryError>),
    Store(StoreError),
}

impl BlobError {
    pub(super) fn into_pull_error(self, image: &Reference, host: &str) -> PullError {
        match self {
            BlobError::Registry(source) => PullError::Registry {
                image: image.to_string(),
                registry: host.to_string(),
                source,
            },
            BlobError::Store(source) => PullError::Store {
                image: image.to_string(),
                source,
            },
        }
    }
}

/// Streams one blob from the registry into the store, resuming the ingest (same
/// `ref`) when the connection breaks mid-body. A blob already present is skipped.
/// On giving up, the partial ingest is dropped. `tee` gets a copy of every chunk;
/// `slot` (a `max_concurrent_downloads` permit) is given back once the body is in.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_blob(
    store: &Arc<dyn ImageStore>,
    registry: &RegistryClient,
    source: &Source,
    credential: Option<&Credential>,
    lease: &Lease,
    desc: &Descriptor,
    kind: &str,
    labels: Labels,
    progress: &PullProgress,
    tee: Option<TeeSender>,
    slot: Option<OwnedSemaphorePermit>,
) -> Result<Fetched, BlobError> {
    let reference = ingest_ref(kind, &desc.digest);
    let started = Instant::now();
    let result = fetch_blob_resuming(
        store,
        registry,
        &source.endpoint,
        source.reference.path(),
        credential,
        lease,
        desc,
        &reference,
        labels,
        progress,
        tee,
        slot,
    )
    .await;
    if result.is_ok() {
        tracing::debug!(blob = %desc.digest, kind, size = desc.size, elapsed_ms = started.elapsed().as_millis() as u64, "blob stored");
    }
    // On failure the pull drops every ingest it opened, this one included.
    result
}

#[allow(clippy::too_many_arguments)]
async fn fetch_blob_resuming(
    store: &Arc<dyn ImageStore>,
    registry: &RegistryClient,
    endpoint: &Endpoint,
    repo: &str,
    credential: Option<&Credential>,
    lease: &Lease,
    desc: &Descriptor,
    reference: &str,
    labels: Labels,
    progress: &PullProgress,
    tee: Option<TeeSender>,
    mut slot: Option<OwnedSemaphorePermit>,
) -> Result<Fetched, BlobError> {
    // One writer for every try: it holds what arrived before a break (some of it not
    // yet sent to containerd), so the next request asks for the rest from there.
    let mut writer = match store
        .open_writer(lease, reference, desc)
        .await
        .map_err(BlobError::Store)?
    {
        Ingest::Present => {
            progress.add_bytes(desc.size);
            return Ok(Fetched {
                streamed_whole: false,
            });
        }
        Ingest::Writer(w) => w,
    };
    progress.add_bytes(writer.offset());
    // The tee sees the blob from its first byte or not at all. A resumed body
    // continues exactly where the writer stands, so it keeps the stream whole.
    let mut tee = tee.filter(|_| writer.offset() == 0);
    let mut tries = 0;
    loop {
        let offset = writer.offset();
        let mut body = registry
            .fetch_blob(endpoint, repo, desc, offset, credential)
            .await
            .map_err(|e| BlobError::Registry(Box::new(e)))?;
        let mut broken = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    progress.add_fetched(bytes.len() as u64);
                    if let Some(tee) = &mut tee {
                        tee.send(&bytes).await;
                    }
                    writer.write(bytes).await.map_err(BlobError::Store)?
                }
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        match broken {
            None => {
                // The body is in: the next download may start while this blob is
                // synced and committed (disk work, not the network's).
                drop(slot.take());
                // The end goes to the extraction before the commit, so its last
                // bytes and containerd's commit overlap; either way, the extraction
                // counts only if the commit (which verifies the digest) succeeds.
                let streamed_whole = match tee {
                    Some(tee) => tee.finish().await,
                    None => false,
                };
                writer.commit(labels).await.map_err(BlobError::Store)?;
                return Ok(Fetched { streamed_whole });
            }
            Some(e) if is_resumable(&e) && tries < BLOB_RESUMES => {
                tries += 1;
                registry.metrics().registry_retry(&endpoint.host);
                tracing::info!(blob = %desc.digest, error = %e, tries, offset = writer.offset(), "blob download broke off; resuming");
            }
            Some(e) => return Err(BlobError::Registry(Box::new(e))),
        }
    }
}

/// A body that broke off can be resumed; a body that was wrong cannot.
fn is_resumable(e: &RegistryError) -> bool {
    matches!(
        e,
        RegistryError::Interrupted { .. } | RegistryError::Unreachable { .. }
    )
}
