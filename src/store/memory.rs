//! An in-memory `ImageStore` for unit tests of the puller and catalog: blobs with
//! labels, resumable ingests, leases, snapshots and image records, all in one map
//! each. Chosen explicitly by tests; the daemon never uses it.

use super::{
    ContentInfo, ContentWriter, FsUsage, ImageEvent, ImageEvents, ImageRecord, ImageStore, Ingest,
    Labels, LayerBytes, Lease, StagedLayer, StoreError,
};
use crate::digest::{Digest, Verifier};
use crate::oci::Descriptor;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before its stream breaks (as a slow
/// containerd subscriber's would).
const EVENT_BACKLOG: usize = 1024;

#[derive(Default)]
struct Inner {
    blobs: BTreeMap<Digest, (Bytes, Labels)>,
    /// Partial writes by ingest ref; they survive a dropped writer, as in containerd.
    ingests: HashMap<String, Vec<u8>>,
    leases: BTreeSet<String>,
    /// Committed snapshots: (snapshotter, chain ID) → the layer size unpacked into it.
    snapshots: BTreeMap<(String, Digest), u64>,
    images: BTreeMap<String, ImageRecord>,
    diff_ids: HashMap<Digest, Digest>,
}

/// The in-memory store. Clones share the same state.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    next_lease: Arc<AtomicU64>,
    /// Image record changes; `None` ends every stream open at the time.
    events: broadcast::Sender<Option<ImageEvent>>,
    /// Image record calls fail with `Unavailable`, as when containerd is down.
    unavailable: Arc<AtomicBool>,
    /// Calls that read image records or content (list, get, read), for tests that
    /// check a cache answered instead.
    reads: Arc<AtomicU64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            inner: Arc::default(),
            next_lease: Arc::default(),
            events: broadcast::channel(EVENT_BACKLOG).0,
            unavailable: Arc::default(),
            reads: Arc::default(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends every image event stream open now, as a containerd restart does.
    pub fn break_event_streams(&self) {
        let _ = self.events.send(None);
    }

    /// While set, image record calls (list, get, put, delete, subscribe) fail with
    /// `Unavailable`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// How many image record and content reads were made so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    fn image_call(&self) -> Result<(), StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                address: "memory".into(),
                detail: "set unavailable by the test".into(),
            });
        }
        Ok(())
    }

    fn emit(&self, event: ImageEvent) {
        // No subscriber is not an error.
        let _ = self.events.send(Some(event));
    }

    /// Makes `apply_layer` report `diff_id` for `layer` (by default it reports the
    /// sha256 of the layer blob's bytes, as if layers were stored uncompressed).
    pub fn set_diff_id(&self, layer: Digest, diff_id: Digest) {
        self.lock().diff_ids.insert(layer, diff_id);
    }

    /// A committed blob's bytes.
    pub fn blob(&self, digest: &Digest) -> Option<Bytes> {
        self.lock().blobs.get(digest).map(|(data, _)| data.clone())
    }

    /// Ids of leases created and not yet deleted.
    pub fn leases(&self) -> Vec<String> {
        self.lock().leases.iter().cloned().collect()
    }

    /// Bytes held by the unfinished ingest `reference`.
    pub fn ingest_len(&self, reference: &str) -> Option<usize> {
        self.lock().ingests.get(reference).map(Vec::len)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in another test thread holding the lock leaves consistent maps.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl ImageStore for MemoryStore {
    async fn create_lease(&self, _expire: Duration) -> Result<Lease, StoreError> {
        let id = format!(
            "memory-lease-{}",
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        self.lock().leases.insert(id.clone());
        Ok(Lease { id })
    }

    async fn delete_lease(&self, lease: &Lease, _sync: bool) -> Result<(), StoreError> {
        self.lock().leases.remove(&lease.id);
        Ok(())
    }

    async fn abort_ingest(&self, reference: &str) -> Result<(), StoreError> {
        self.lock().ingests.remove(reference);
        Ok(())
    }

    async fn content_info(&self, digest: &Digest) -> Result<Option<ContentInfo>, StoreError> {
        Ok(self
            .lock()
            .blobs
            .get(digest)
            .map(|(data, labels)| ContentInfo {
                digest: digest.clone(),
                size: data.len() as u64,
                labels: labels.clone(),
            }))
    }

    async fn update_labels(&self, digest: &Digest, labels: Labels) -> Result<(), StoreError> {
        match self.lock().blobs.get_mut(digest) {
            Some((_, existing)) => {
                existing.extend(labels);
                Ok(())
            }
            None => Err(StoreError::NotFound {
                what: format!("blob {digest}"),
            }),
        }
    }

    async fn open_writer(
        &self,
        lease: &Lease,
        reference: &str,
        expected: &Descriptor,
    ) -> Result<Ingest, StoreError> {
        let mut inner = self.lock();
        if !inner.leases.contains(&lease.id) {
            return Err(StoreError::NotFound {
                what: format!("lease {}", lease.id),
            });
        }
        if inner.blobs.contains_key(&expected.digest) {
            return Ok(Ingest::Present);
        }
        let partial = inner.ingests.entry(reference.to_string()).or_default();
        if partial.len() as u64 > expected.size {
            partial.clear();
        }
        let offset = partial.len() as u64;
        Ok(Ingest::Writer(Box::new(MemoryWriter {
            store: self.clone(),
            reference: reference.to_string(),
            expected: expected.clone(),
            offset,
        })))
    }

    async fn read_content(&self, digest: &Digest, max: u64) -> Result<Bytes, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let data = self.blob(digest).ok_or_else(|| StoreError::NotFound {
            what: format!("blob {digest}"),
        })?;
        if data.len() as u64 > max {
            return Err(StoreError::TooLarge {
                digest: digest.clone(),
                size: data.len() as u64,
                max,
            });
        }
        Ok(data)
    }

    async fn snapshot_exists(
        &self,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .snapshots
            .contains_key(&(snapshotter.to_string(), chain_id.clone())))
    }

    async fn lease_snapshot(
        &self,
        _lease: &Lease,
        _snapshotter: &str,
        _chain_id: &Digest,
    ) -> Result<(), StoreError> {
        // Nothing is ever collected in memory.
        Ok(())
    }

    async fn stage_layer(
        &self,
        _snapshotter: &str,
        _layer: &Descriptor,
        _diff_id: &Digest,
        _first: bool,
        _bytes: LayerBytes,
    ) -> Result<Option<StagedLayer>, StoreError> {
        // Layers are "unpacked" by apply_layer alone here.
        Ok(None)
    }

    async fn commit_staged(
        &self,
        _lease: &Lease,
        _snapshotter: &str,
        staged: StagedLayer,
        _parent: Option<&Digest>,
        _chain_id: &Digest,
    ) -> Result<(), StoreError> {
        Err(StoreError::Local {
            detail: format!(
                "the memory store stages nothing, so it cannot commit the staged layer {}",
                staged.layer
            ),
        })
    }

    async fn apply_layer(
        &self,
        _lease: &Lease,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<Digest, StoreError> {
        let mut inner = self.lock();
        if let Some(parent) = parent {
            if !inner
                .snapshots
                .contains_key(&(snapshotter.to_string(), parent.clone()))
            {
                return Err(StoreError::NotFound {
                    what: format!("parent snapshot {parent}"),
                });
            }
        }
        let (data, _) = inner
            .blobs
            .get(&layer.digest)
            .ok_or_else(|| StoreError::NotFound {
                what: format!("blob {}", layer.digest),
            })?;
        let applied = match inner.diff_ids.get(&layer.digest) {
            Some(seeded) => seeded.clone(),
            None => Digest::of(data),
        };
        if &applied != diff_id {
            return Err(StoreError::DigestMismatch {
                expected: diff_id.clone(),
                actual: applied.to_string(),
            });
        }
        inner
            .snapshots
            .insert((snapshotter.to_string(), chain_id.clone()), layer.size);
        Ok(applied)
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.image_call()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.lock().images.values().cloned().collect())
    }

    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.image_call()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.lock().images.get(name).cloned())
    }

    async fn put_image(&self, record: ImageRecord) -> Result<(), StoreError> {
        self.image_call()?;
        let name = record.name.clone();
        // Emitted under the lock, so events come in the order of the changes.
        let mut inner = self.lock();
        inner.images.insert(name.clone(), record);
        self.emit(ImageEvent::Changed { name });
        Ok(())
    }

    async fn delete_image(&self, name: &str, _sync: bool) -> Result<(), StoreError> {
        self.image_call()?;
        let mut inner = self.lock();
        if inner.images.remove(name).is_some() {
            self.emit(ImageEvent::Deleted {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    async fn image_events(&self) -> Result<ImageEvents, StoreError> {
        self.image_call()?;
        let receiver = self.events.subscribe();
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(Some(event)) => Some((Ok(event), receiver)),
                Ok(None) | Err(broadcast::error::RecvError::Closed) => None,
                Err(broadcast::error::RecvError::Lagged(missed)) => Some((
                    Err(StoreError::Malformed {
                        what: "image event stream",
                        detail: format!("{missed} events missed"),
                    }),
                    receiver,
                )),
            }
        });
        Ok(Box::pin(stream))
    }

    async fn filesystem_usage(&self, snapshotter: &str) -> Result<FsUsage, StoreError> {
        let inner = self.lock();
        let sizes = inner
            .snapshots
            .iter()
            .filter(|((name, _), _)| name == snapshotter)
            .map(|(_, size)| *size);
        Ok(FsUsage {
            mountpoint: format!("/memory/{snapshotter}"),
            used_bytes: sizes.clone().sum(),
            inodes_used: sizes.count() as u64,
            content_bytes: inner.blobs.values().map(|(b, _)| b.len() as u64).sum(),
            content_blobs: inner.blobs.len() as u64,
        })
    }
}

/// Appends straight into the store's ingest map, so a dropped writer leaves a
/// partial ingest that the next `open_writer` resumes.
struct MemoryWriter {
    store: MemoryStore,
    reference: String,
    expected: Descriptor,
    offset: u64,
}

#[async_trait]
impl ContentWriter for MemoryWriter {
    fn offset(&self) -> u64 {
        self.offset
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let after = self.offset + chunk.len() as u64;
        if after > self.expected.size {
            return Err(StoreError::DigestMismatch {
                expected: self.expected.digest.clone(),
                actual: format!(
                    "at least {after} bytes for a blob of {}",
                    self.expected.size
                ),
            });
        }
        self.store
            .lock()
            .ingests
            .entry(self.reference.clone())
            .or_default()
            .extend_from_slice(&chunk);
        self.offset = after;
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), StoreError> {
        // Every write lands at once in memory.
        Ok(())
    }

    async fn commit(self: Box<Self>, labels: Labels) -> Result<(), StoreError> {
        let mut inner = self.store.lock();
        if inner.blobs.contains_key(&self.expected.digest) {
            inner.ingests.remove(&self.reference);
            return Ok(());
        }
        let data = inner.ingests.remove(&self.reference).unwrap_or_default();
        let mut verifier = Verifier::new();
        verifier.update(&data);
        let actual = verifier.finish();
        if data.len() as u64 != self.expected.size || actual != self.expected.digest {
            return Err(StoreError::DigestMismatch {
                expected: self.expected.digest.clone(),
                actual: format!("{actual} ({} bytes)", data.len()),
            });
        }
        inner
            .blobs
            .insert(self.expected.digest.clone(), (Bytes::from(data), labels));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(data: &[u8]) -> Descriptor {
        Descriptor::new(
            "application/octet-stream",
            Digest::of(data),
            data.len() as u64,
        )
    }

    async fn writer(
        store: &MemoryStore,
        lease: &Lease,
        reference: &str,
        d: &Descriptor,
    ) -> Box<dyn ContentWriter> {
        match store.open_writer(lease, reference, d).await.unwrap() {
            Ingest::Writer(writer) => writer,
            Ingest::Present => panic!("blob unexpectedly present"),
        }
    }

    #[tokio::test]
    async fn interrupted_write_resumes_and_commits_with_labels() {
        let store = MemoryStore::new();
        let lease = store.create_lease(Duration::from_secs(60)).await.unwrap();
        let data = b"hello, layer";
        let d = descriptor(data);

        let mut first = writer(&store, &lease, "ref-1", &d).await;
        first.write(Bytes::from_static(&data[..5])).await.unwrap();
        drop(first);

        let mut second = writer(&store, &lease, "ref-1", &d).await;
        assert_eq!(second.offset(), 5);
        second.write(Bytes::from_static(&data[5..])).await.unwrap();
        let labels = Labels::from([("k".to_string(), "v".to_string())]);
        second.commit(labels.clone()).await.unwrap();

        let info = store.content_info(&d.digest).await.unwrap().unwrap();
        assert_eq!((info.size, info.labels), (data.len() as u64, labels));
        assert!(matches!(
            store.open_writer(&lease, "ref-1", &d).await.unwrap(),
            Ingest::Present
        ));
        assert_eq!(store.read_content(&d.digest, 100).await.unwrap(), &data[..]);
        assert!(matches!(
            store.read_content(&d.digest, 3).await,
            Err(StoreError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn wrong_bytes_fail_at_commit_and_leave_no_ingest() {
        let store = MemoryStore::new();
        let lease = store.create_lease(Duration::from_secs(60)).await.unwrap();
        let d = descriptor(b"expected");
        let mut w = writer(&store, &lease, "ref-2", &d).await;
        w.write(Bytes::from_static(b"tampered")).await.unwrap();
        assert!(matches!(
            w.commit(Labels::new()).await,
            Err(StoreError::DigestMismatch { .. })
        ));
        assert_eq!(store.ingest_len("ref-2"), None);
        assert!(store.content_info(&d.digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn apply_layer_uses_seeded_diff_id_and_needs_parent() {
        let store = MemoryStore::new();
        let lease = store.create_lease(Duration::from_secs(60)).await.unwrap();
        let layer = descriptor(b"layer bytes");
        let mut w = writer(&store, &lease, "layer", &layer).await;
        w.write(Bytes::from_static(b"layer bytes")).await.unwrap();
        w.commit(Labels::new()).await.unwrap();

        let diff_id = Digest::of(b"uncompressed");
        store.set_diff_id(layer.digest.clone(), diff_id.clone());
        let chain = Digest::of(b"chain");
        let missing = Digest::of(b"missing parent");
        assert!(matches!(
            store
                .apply_layer(
                    &lease,
                    "overlayfs",
                    &layer,
                    &diff_id,
                    Some(&missing),
                    &chain
                )
                .await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            store
                .apply_layer(&lease, "overlayfs", &layer, &layer.digest, None, &chain)
                .await,
            Err(StoreError::DigestMismatch { .. })
        ));
        let applied = store
            .apply_layer(&lease, "overlayfs", &layer, &diff_id, None, &chain)
            .await
            .unwrap();
        assert_eq!(applied, diff_id);
        assert!(store.snapshot_exists("overlayfs", &chain).await.unwrap());
        assert!(!store.snapshot_exists("native", &chain).await.unwrap());
        let usage = store.filesystem_usage("overlayfs").await.unwrap();
        assert_eq!(usage.used_bytes, layer.size);
    }

    #[tokio::test]
    async fn image_records_create_update_delete() {
        let store = MemoryStore::new();
        let target = descriptor(b"manifest");
        let mut record = ImageRecord {
            name: "docker.io/library/x:1".into(),
            target: target.clone(),
            labels: Labels::new(),
        };
        store.put_image(record.clone()).await.unwrap();
        record
            .labels
            .insert("io.cri-containerd.image".into(), "managed".into());
        store.put_image(record.clone()).await.unwrap();
        assert_eq!(
            store.get_image(&record.name).await.unwrap(),
            Some(record.clone())
        );
        assert_eq!(store.list_images().await.unwrap(), vec![record.clone()]);
        store.delete_image(&record.name, true).await.unwrap();
        store.delete_image(&record.name, true).await.unwrap();
        assert_eq!(store.get_image(&record.name).await.unwrap(), None);
    }
}
