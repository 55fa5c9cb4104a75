//! The image records of our namespace, held in memory so that ListImages and
//! ImageStatus answer without asking containerd.
//!
//! - Built by a full list once something first reads it (the daemon dials
//!   containerd lazily: it must start, and answer health, while containerd is down).
//! - Kept current by a follower task on containerd's event stream (image create,
//!   update and delete in our namespace), so changes made by containerd's CRI or
//!   `ctr` are seen; the events name the record, which is then read again.
//! - Listed again in full whenever the stream is opened anew (containerd restarted,
//!   the connection broke): changes made while it was down are not on any stream.
//! - Our own writes ([`IndexedStore`]) update it as soon as containerd accepted them,
//!   so a read right after our own pull or removal sees it.
//!
//! While the index is not in step (before the first list, while the stream is down)
//! a read lists the records from containerd itself, as if there were no index: an
//! unreachable containerd is then an error, never an empty list.

use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::{
    ContentInfo, FsUsage, ImageEvent, ImageEvents, ImageRecord, ImageStore, Ingest, Labels,
    LayerBytes, Lease, StagedLayer, StoreError,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;

/// The first wait before opening the stream again after it failed; it doubles.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between attempts (a read that finds the index out of step cuts
/// it short).
const MAX_RETRY: Duration = Duration::from_secs(5);
/// A burst of changes naming more records than this is read with one list rather
/// than one get per name (`ctr images tag` in a loop, an import of many images).
const RELIST_ABOVE: usize = 64;

/// Image records by name.
pub type RecordMap = BTreeMap<String, ImageRecord>;

/// The records as of one moment.
#[derive(Debug, Clone)]
pub struct Records {
    pub records: Arc<RecordMap>,
    /// The index's generation when they came from it: equal generations hold equal
    /// records. `None`: listed from the store just now (the index is not in step).
    pub generation: Option<u64>,
}

/// The index; cheap to clone, clones share it. The follower task stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct ImageIndex {
    shared: Arc<Shared>,
    follower: Arc<Follower>,
}

impl std::fmt::Debug for ImageIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("ImageIndex")
            .field("records", &state.records.len())
            .field("generation", &state.generation)
            .field("synced", &state.synced)
            .finish()
    }
}

struct Shared {
    store: Arc<dyn ImageStore>,
    state: Mutex<State>,
    /// Wakes the follower from its wait between attempts.
    kick: Notify,
}

#[derive(Default)]
struct State {
    records: Arc<RecordMap>,
    /// Bumped whenever `records` or `synced` change.
    generation: u64,
    /// `records` is the store's truth, kept current from the event stream.
    synced: bool,
    /// The follower is reading records from the store; `written` collects the names
    /// we wrote meanwhile, whose answer may predate our write (they are read again).
    reading: bool,
    written: HashSet<String>,
}

/// Aborts the follower task when the last index clone goes.
#[derive(Default)]
struct Follower(OnceLock<tokio::task::AbortHandle>);

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(task) = self.0.get() {
            task.abort();
        }
    }
}

impl ImageIndex {
    /// An index over `store`'s image records. Nothing is asked of the store until
    /// the first read.
    pub fn new(store: Arc<dyn ImageStore>) -> Self {
        ImageIndex {
            shared: Arc::new(Shared {
                store,
                state: Mutex::new(State::default()),
                kick: Notify::new(),
            }),
            follower: Arc::default(),
        }
    }

    /// Every record: from memory once the index is in step with the store, else
    /// listed from the store (and the follower is woken to catch up). Needs a tokio
    /// runtime (the first call starts the follower).
    pub async fn records(&self) -> Result<Records, StoreError> {
        self.start_follower();
        {
            let state = self.shared.lock();
            if state.synced {
                return Ok(Records {
                    records: state.records.clone(),
                    generation: Some(state.generation),
                });
            }
        }
        self.shared.kick.notify_one();
        let listed = self.shared.store.list_images().await?;
        Ok(Records {
            records: Arc::new(by_name(listed)),
            generation: None,
        })
    }

    /// Whether reads are answered from memory.
    pub fn is_synced(&self) -> bool {
        self.shared.lock().synced
    }

    /// Our own write of `record`, accepted by the store: created, or the target and
    /// the given labels set on an existing record (other labels stay), as
    /// [`ImageStore::put_image`] does.
    pub fn recorded(&self, record: &ImageRecord) {
        let mut state = self.shared.lock();
        state.note_written(&record.name);
        let records = Arc::make_mut(&mut state.records);
        match records.get_mut(&record.name) {
            Some(existing) => {
                existing.target = record.target.clone();
                existing
                    .labels
                    .extend(record.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            None => {
                records.insert(record.name.clone(), record.clone());
            }
        }
        state.generation += 1;
    }

    /// Our own removal of the record `name`, accepted by the store.
    pub fn removed(&self, name: &str) {
        let mut state = self.shared.lock();
        state.note_written(name);
        if Arc::make_mut(&mut state.records).remove(name).is_some() {
            state.generation += 1;
        }
    }

    fn start_follower(&self) {
        self.follower.0.get_or_init(|| {
            let shared = self.shared.clone();
            tokio::spawn(async move { shared.follow().await }).abort_handle()
        });
    }
}

impl State {
    fn note_written(&mut self, name: &str) {
        if self.reading {
            self.written.insert(name.to_string());
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the state is a single assignment or map operation: a
        // panic elsewhere cannot leave it half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the stream, lists, follows; again after every break, waiting longer
    /// each time it fails straight away.
    async fn follow(&self) {
        let mut delay = FIRST_RETRY;
        loop {
            match self.follow_once().await {
                Ok(()) => {
                    tracing::info!(
                        "containerd's event stream ended; listing the images again once it is back"
                    );
                    delay = FIRST_RETRY;
                }
                Err(e) => {
                    tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "image index cannot follow containerd");
                }
            }
            self.set_unsynced();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.kick.notified() => {}
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }

    /// One subscription: the full list, then every change until the stream breaks.
    /// `Ok` when the stream ended, `Err` when something failed.
    async fn follow_once(&self) -> Result<(), StoreError> {
        let mut events = self.store.image_events().await?;
        self.resync().await?;
        tracing::debug!(
            records = self.lock().records.len(),
            "image index in step with containerd"
        );
        loop {
            let Some(first) = events.next().await else {
                return Ok(());
            };
            // Whatever else is already waiting goes in the same round.
            let mut changed = BTreeSet::new();
            changed.insert(event_name(first?));
            while let Some(Some(next)) = events.next().now_or_never() {
                changed.insert(event_name(next?));
            }
            if changed.len() > RELIST_ABOVE {
                self.resync().await?;
            } else {
                self.refresh(changed).await?;
            }
        }
    }

    /// Replaces the index with a full list of the store's records.
    async fn resync(&self) -> Result<(), StoreError> {
        self.begin_read();
        let listed = by_name(self.store.list_images().await?);
        let again = {
            let mut state = self.lock();
            let written = std::mem::take(&mut state.written);
            state.reading = false;
            // What we wrote during the list stays as we wrote it, and is read again.
            let mut records = listed;
            for name in &written {
                match state.records.get(name) {
                    Some(ours) => records.insert(name.clone(), ours.clone()),
                    None => records.remove(name),
                };
            }
            state.records = Arc::new(records);
            state.synced = true;
            state.generation += 1;
            written
        };
        self.refresh(again.into_iter().collect()).await
    }

    /// Reads the named records again and puts what the store says in the index.
    async fn refresh(&self, mut names: BTreeSet<String>) -> Result<(), StoreError> {
        while !names.is_empty() {
            self.begin_read();
            let mut found = Vec::with_capacity(names.len());
            for name in &names {
                found.push((name.clone(), self.store.get_image(name).await?));
            }
            names = self.apply_read(found);
        }
        Ok(())
    }

    /// Puts records read since [`Self::begin_read`] in the index, except those we
    /// wrote meanwhile: their answer may predate our write. Returns those names, to
    /// be read again.
    fn apply_read(&self, found: Vec<(String, Option<ImageRecord>)>) -> BTreeSet<String> {
        let mut state = self.lock();
        let written = std::mem::take(&mut state.written);
        state.reading = false;
        let mut changed = false;
        let mut again = BTreeSet::new();
        let records = Arc::make_mut(&mut state.records);
        for (name, record) in found {
            if written.contains(&name) {
                again.insert(name);
                continue;
            }
            changed |= match record {
                Some(record) => records.insert(name, record.clone()) != Some(record),
                None => records.remove(&name).is_some(),
            };
        }
        if changed {
            state.generation += 1;
        }
        again
    }

    fn begin_read(&self) {
        let mut state = self.lock();
        state.reading = true;
        state.written.clear();
    }

    fn set_unsynced(&self) {
        let mut state = self.lock();
        state.reading = false;
        state.written.clear();
        if state.synced {
            state.synced = false;
            state.generation += 1;
        }
    }
}

fn event_name(event: ImageEvent) -> String {
    match event {
        ImageEvent::Changed { name } | ImageEvent::Deleted { name } => name,
    }
}

fn by_name(records: Vec<ImageRecord>) -> RecordMap {
    records.into_iter().map(|r| (r.name.clone(), r)).collect()
}

/// An [`ImageStore`] that tells the index about every image record it writes or
/// removes, once the store accepted it. Everything else, reads of records included,
/// goes straight to the store (a pull deciding whether to write checks containerd
/// itself).
pub struct IndexedStore {
    inner: Arc<dyn ImageStore>,
    index: ImageIndex,
}

impl IndexedStore {
    pub fn new(inner: Arc<dyn ImageStore>, index: ImageIndex) -> Self {
        IndexedStore { inner, index }
    }
}

#[async_trait]
impl ImageStore for IndexedStore {
    async fn create_lease(&self, expire: Duration) -> Result<Lease, StoreError> {
        self.inner.create_lease(expire).await
    }

    async fn delete_lease(&self, lease: &Lease, sync: bool) -> Result<(), StoreError> {
        self.inner.delete_lease(lease, sync).await
    }

    async fn content_info(&self, digest: &Digest) -> Result<Option<ContentInfo>, StoreError> {
        self.inner.content_info(digest).await
    }

    async fn update_labels(&self, digest: &Digest, labels: Labels) -> Result<(), StoreError> {
        self.inner.update_labels(digest, labels).await
    }

    async fn open_writer(
        &self,
        lease: &Lease,
        reference: &str,
        expected: &Descriptor,
    ) -> Result<Ingest, StoreError> {
        self.inner.open_writer(lease, reference, expected).await
    }

    async fn abort_ingest(&self, reference: &str) -> Result<(), StoreError> {
        self.inner.abort_ingest(reference).await
    }

    async fn read_content(&self, digest: &Digest, max: u64) -> Result<Bytes, StoreError> {
        self.inner.read_content(digest, max).await
    }

    async fn snapshot_exists(
        &self,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<bool, StoreError> {
        self.inner.snapshot_exists(snapshotter, chain_id).await
    }

    async fn lease_snapshot(
        &self,
        lease: &Lease,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        self.inner
            .lease_snapshot(lease, snapshotter, chain_id)
            .await
    }

    async fn apply_layer(
        &self,
        lease: &Lease,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<Digest, StoreError> {
        self.inner
            .apply_layer(lease, snapshotter, layer, diff_id, parent, chain_id)
            .await
    }

    async fn stage_layer(
        &self,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        first: bool,
        bytes: LayerBytes,
    ) -> Result<Option<StagedLayer>, StoreError> {
        self.inner
            .stage_layer(snapshotter, layer, diff_id, first, bytes)
            .await
    }

    async fn commit_staged(
        &self,
        lease: &Lease,
        snapshotter: &str,
        staged: StagedLayer,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        self.inner
            .commit_staged(lease, snapshotter, staged, parent, chain_id)
            .await
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.inner.list_images().await
    }

    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.inner.get_image(name).await
    }

    async fn put_image(&self, record: ImageRecord) -> Result<(), StoreError> {
        self.inner.put_image(record.clone()).await?;
        self.index.recorded(&record);
        Ok(())
    }

    async fn delete_image(&self, name: &str, sync: bool) -> Result<(), StoreError> {
        self.inner.delete_image(name, sync).await?;
        self.index.removed(name);
        Ok(())
    }

    async fn image_events(&self) -> Result<ImageEvents, StoreError> {
        self.inner.image_events().await
    }

    async fn filesystem_usage(&self, snapshotter: &str) -> Result<FsUsage, StoreError> {
        self.inner.filesystem_usage(snapshotter).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn record(name: &str, target: &[u8]) -> ImageRecord {
        ImageRecord {
            name: name.to_string(),
            target: Descriptor::new(
                crate::oci::OCI_MANIFEST,
                Digest::of(target),
                target.len() as u64,
            ),
            labels: Labels::from([("io.cri-containerd.image".into(), "managed".into())]),
        }
    }

    /// Polls `done` (the follower runs meanwhile) until it holds; the bound only
    /// guards against a hang.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{what} did not happen");
    }

    async fn names(index: &ImageIndex) -> Vec<String> {
        index
            .records()
            .await
            .unwrap()
            .records
            .keys()
            .cloned()
            .collect()
    }

    async fn synced_index(store: &MemoryStore) -> ImageIndex {
        let index = ImageIndex::new(Arc::new(store.clone()));
        index.records().await.unwrap();
        eventually("the first sync", || index.is_synced()).await;
        index
    }

    #[tokio::test]
    async fn first_read_lists_and_then_reads_come_from_memory() {
        let store = MemoryStore::new();
        store.put_image(record("a:1", b"m1")).await.unwrap();
        let index = ImageIndex::new(Arc::new(store.clone()));
        assert_eq!(store.reads(), 0, "nothing is asked before the first read");
        let first = index.records().await.unwrap();
        assert_eq!(first.records.keys().collect::<Vec<_>>(), ["a:1"]);
        eventually("the first sync", || index.is_synced()).await;
        let reads = store.reads();
        let again = index.records().await.unwrap();
        let third = index.records().await.unwrap();
        assert_eq!(store.reads(), reads, "no store call once in step");
        assert!(again.generation.is_some());
        assert_eq!(again.generation, third.generation);
        assert_eq!(again.records, first.records);
    }

    #[tokio::test]
    async fn unreachable_store_is_an_error_not_an_empty_list() {
        let store = MemoryStore::new();
        store.set_unavailable(true);
        let index = ImageIndex::new(Arc::new(store.clone()));
        let err = index.records().await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        assert!(!index.is_synced());
        store.set_unavailable(false);
        assert!(index.records().await.unwrap().records.is_empty());
        eventually("the sync once the store is back", || index.is_synced()).await;
    }

    #[tokio::test]
    async fn changes_behind_our_back_are_followed() {
        let store = MemoryStore::new();
        let index = synced_index(&store).await;
        store.put_image(record("b:1", b"m1")).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..2000 {
            seen = names(&index).await;
            if seen == ["b:1"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(seen, ["b:1"]);
        // Retargeted behind our back.
        store.put_image(record("b:1", b"m2")).await.unwrap();
        let want = Digest::of(b"m2");
        for _ in 0..2000 {
            let r = index.records().await.unwrap();
            if r.records
                .get("b:1")
                .is_some_and(|r| r.target.digest == want)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            index.records().await.unwrap().records["b:1"].target.digest,
            want
        );
        store.delete_image("b:1", false).await.unwrap();
        for _ in 0..2000 {
            if names(&index).await.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(names(&index).await.is_empty());
        assert!(index.is_synced());
    }

    #[tokio::test]
    async fn a_burst_of_changes_is_read_with_a_list() {
        let store = MemoryStore::new();
        let index = synced_index(&store).await;
        let reads = store.reads();
        for i in 0..(RELIST_ABOVE * 3) {
            store
                .put_image(record(&format!("burst:{i}"), b"m"))
                .await
                .unwrap();
        }
        for _ in 0..2000 {
            if index.is_synced() && names(&index).await.len() == RELIST_ABOVE * 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(names(&index).await.len(), RELIST_ABOVE * 3);
        let made = store.reads() - reads;
        assert!(
            made < (RELIST_ABOVE * 2) as u64,
            "{made} reads for {} changes: a list, not a get per name",
            RELIST_ABOVE * 3
        );
    }

    #[tokio::test]
    async fn changes_missed_while_the_stream_was_down_are_listed_again() {
        let store = MemoryStore::new();
        store.put_image(record("gone:1", b"m")).await.unwrap();
        let index = synced_index(&store).await;
        // containerd goes away: the stream breaks and cannot be opened again.
        store.set_unavailable(true);
        store.break_event_streams();
        eventually("losing step", || !index.is_synced()).await;
        assert!(matches!(
            index.records().await,
            Err(StoreError::Unavailable { .. })
        ));
        // Back, and changed before the follower is back on the stream (the test's
        // runtime has one thread, and nothing yields until the changes are made):
        // these events reach no one.
        store.set_unavailable(false);
        store.delete_image("gone:1", false).await.unwrap();
        store.put_image(record("new:1", b"m")).await.unwrap();
        eventually("the resync", || index.is_synced()).await;
        let reads = store.reads();
        assert_eq!(names(&index).await, ["new:1"]);
        assert_eq!(store.reads(), reads, "answered from memory");
    }

    #[tokio::test]
    async fn our_writes_are_read_back_at_once() {
        let store = MemoryStore::new();
        let index = synced_index(&store).await;
        let ours = IndexedStore::new(Arc::new(store.clone()), index.clone());
        let mut pinned = record("c:1", b"m");
        ours.put_image(pinned.clone()).await.unwrap();
        // No yield since: the follower has not seen the event yet.
        assert_eq!(names(&index).await, ["c:1"]);
        // An update keeps the labels it does not name, as containerd does.
        pinned.labels = Labels::from([("io.cri-containerd.pinned".into(), "pinned".into())]);
        ours.put_image(pinned).await.unwrap();
        let labels = index.records().await.unwrap().records["c:1"].labels.clone();
        assert_eq!(labels.len(), 2, "{labels:?}");
        ours.delete_image("c:1", false).await.unwrap();
        assert!(names(&index).await.is_empty());
    }

    #[tokio::test]
    async fn a_read_older_than_our_write_does_not_undo_it() {
        let store = MemoryStore::new();
        let index = synced_index(&store).await;
        let shared = index.shared.clone();
        // The follower asks for d:1 and hears "absent"; our pull writes d:1 before
        // that answer is applied.
        shared.begin_read();
        index.recorded(&record("d:1", b"m"));
        let again = shared.apply_read(vec![("d:1".into(), None)]);
        assert_eq!(again, BTreeSet::from(["d:1".to_string()]));
        assert_eq!(names(&index).await, ["d:1"]);
        // Read again afterwards, the answer stands.
        shared.begin_read();
        let again = shared.apply_read(vec![("d:1".into(), None)]);
        assert!(again.is_empty());
        assert!(names(&index).await.is_empty());
    }
}
