//! The image store: containerd's content, snapshot and image services behind one
//! trait, so the puller and catalog can be unit-tested against an in-memory store.
//!
//! `ContainerdStore` (containerd.rs) is the real implementation; `MemoryStore`
//! (memory.rs) is the fake for unit tests of the modules above, chosen explicitly.

use crate::digest::Digest;
use crate::oci::Descriptor;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use std::collections::BTreeMap;
use std::time::Duration;

pub mod containerd;
pub mod memory;

pub use self::containerd::{ContainerdStore, UnpackMode};
pub use self::memory::MemoryStore;

pub type Labels = BTreeMap<String, String>;

/// Label containerd's CRI puts on the images it manages.
pub const LABEL_CRI_MANAGED: &str = "io.cri-containerd.image";
/// Label (value `pinned`) marking an image kubelet's image GC must keep; containerd
/// 1.7+'s CRI reads it too.
pub const LABEL_PINNED: &str = "io.cri-containerd.pinned";
/// Label holding the uncompressed digest (diff ID) of a layer blob.
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Label asking containerd's GC to drop a lease (or ingest) after an RFC 3339 time.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";

/// One named image record in containerd's image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub target: Descriptor,
    pub labels: Labels,
}

/// A change to an image record of the store's namespace, as its event stream tells
/// it. containerd's events carry the name (and labels) but not the target, so a
/// follower asks [`ImageStore::get_image`] for the record as it now is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageEvent {
    /// The record was created or updated.
    Changed {
        name: String,
    },
    Deleted {
        name: String,
    },
}

/// Image record changes, in the order the store made them. Ends (or yields an error)
/// when the connection breaks: changes after that are not on it.
pub type ImageEvents = BoxStream<'static, Result<ImageEvent, StoreError>>;

/// What containerd knows about one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentInfo {
    pub digest: Digest,
    pub size: u64,
    pub labels: Labels,
}

/// A containerd lease protecting everything a pull writes until the image
/// records reference it. It expires by itself, so a crash leaks nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
}

/// Space used by the snapshotter that holds unpacked images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUsage {
    /// The snapshotter's root directory on the host.
    pub mountpoint: String,
    /// Summed over the snapshotter's snapshots.
    pub used_bytes: u64,
    pub inodes_used: u64,
    /// The content store (compressed blobs: the other half of what images take).
    pub content_bytes: u64,
    pub content_blobs: u64,
}

/// Result of opening an ingest for a blob.
pub enum Ingest {
    /// The blob is already committed in the content store (and now held by the lease
    /// the ingest was opened under).
    Present,
    /// Write from `writer.offset()` on, then commit.
    Writer(Box<dyn ContentWriter>),
}

/// A resumable writer for one blob with a known digest and size.
#[async_trait]
pub trait ContentWriter: Send {
    /// Bytes already in the ingest (non-zero when resuming an interrupted write).
    fn offset(&self) -> u64;
    /// Appends a chunk. Writes may still be on their way to the store when this
    /// returns; a writer dropped without `sync` or `commit` may lose the latest.
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError>;
    /// Waits until the store holds every byte written so far: a checkpoint after
    /// which a dropped writer's ingest resumes at `offset()`.
    async fn sync(&mut self) -> Result<(), StoreError>;
    /// Commits with the expected digest and size given at open; the store checks them.
    /// `AlreadyExists` from the store counts as success.
    async fn commit(self: Box<Self>, labels: Labels) -> Result<(), StoreError>;
}

#[async_trait]
pub trait ImageStore: Send + Sync {
    async fn create_lease(&self, expire: Duration) -> Result<Lease, StoreError>;
    /// Deletes the lease. `sync` asks containerd to garbage-collect before returning
    /// (used after a failed pull, so nothing it wrote outlives the call).
    async fn delete_lease(&self, lease: &Lease, sync: bool) -> Result<(), StoreError>;

    async fn content_info(&self, digest: &Digest) -> Result<Option<ContentInfo>, StoreError>;
    /// Merges `labels` into the blob's labels.
    async fn update_labels(&self, digest: &Digest, labels: Labels) -> Result<(), StoreError>;
    /// Opens (or resumes) the ingest named `reference` for `expected`, under `lease`.
    async fn open_writer(
        &self,
        lease: &Lease,
        reference: &str,
        expected: &Descriptor,
    ) -> Result<Ingest, StoreError>;
    /// Drops the partial ingest `reference` (after a pull gave up on that blob).
    /// A missing ingest is not an error.
    async fn abort_ingest(&self, reference: &str) -> Result<(), StoreError>;
    /// Reads a whole (small) blob: manifests, indexes, configs. Refuses blobs over `max` bytes.
    async fn read_content(&self, digest: &Digest, max: u64) -> Result<Bytes, StoreError>;

    /// Whether the committed snapshot `chain_id` exists in `snapshotter`.
    async fn snapshot_exists(
        &self,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<bool, StoreError>;
    /// Adds an existing committed snapshot to `lease`, so it cannot be collected
    /// (by a concurrent RemoveImage, say) before this pull's records reference it.
    async fn lease_snapshot(
        &self,
        lease: &Lease,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<(), StoreError>;
    /// Unpacks `layer` on top of `parent` and commits the snapshot named `chain_id`.
    /// `diff_id` is the uncompressed digest the image config promises for this layer:
    /// if the differ computes another one, nothing is committed and the result is
    /// `DigestMismatch` from `Diff.Apply`, `Unpack(DiffIdMismatch)` (naming the layer)
    /// from in-house unpacking (a chain ID must never name the wrong content).
    /// Returns the digest of the uncompressed layer as the differ computed it.
    async fn apply_layer(
        &self,
        lease: &Lease,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<Digest, StoreError>;

    /// In-house unpacking, first half: extracts `layer` (from the content store, or
    /// from its download as it arrives: `bytes`) into a staging directory beside
    /// `snapshotter`'s snapshots and checks its diff ID, without touching any
    /// snapshot, so layers can be staged in parallel and ahead of their parents.
    /// `first`: the layer has no parent. `Ok(None)`: this store does not stage for
    /// `snapshotter` (use `apply_layer`).
    ///
    /// No default, here or for `commit_staged`: a store wrapping another must pass
    /// both on (a default once hid that the index's wrapper never staged at all).
    async fn stage_layer(
        &self,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        first: bool,
        bytes: LayerBytes,
    ) -> Result<Option<StagedLayer>, StoreError>;
    /// In-house unpacking, second half, in layer order: prepares the snapshot on
    /// `parent`, moves the staged tree into it and commits it as `chain_id`. On
    /// failure nothing is committed and the prepared snapshot is removed.
    async fn commit_staged(
        &self,
        lease: &Lease,
        snapshotter: &str,
        staged: StagedLayer,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<(), StoreError>;

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError>;
    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError>;
    /// Creates the record, or updates target and labels if the name exists.
    async fn put_image(&self, record: ImageRecord) -> Result<(), StoreError>;
    /// Deletes the record; a missing name is not an error. `sync` asks containerd
    /// to garbage-collect before returning.
    async fn delete_image(&self, name: &str, sync: bool) -> Result<(), StoreError>;
    /// Subscribes to the namespace's image record changes. Returns once the
    /// subscription is live: every change made after this returns is on the stream,
    /// so a list taken afterwards plus the stream is the whole truth.
    async fn image_events(&self) -> Result<ImageEvents, StoreError>;

    async fn filesystem_usage(&self, snapshotter: &str) -> Result<FsUsage, StoreError>;
}

/// Where [`ImageStore::stage_layer`] reads a layer from.
pub enum LayerBytes {
    /// The blob in the content store.
    Stored,
    /// The blob as its download writes it to the content store. The result counts
    /// only if the download then stored the whole blob, verified.
    Streamed(crate::unpack::TeeReader),
}

/// A layer extracted into a staging directory, not yet a snapshot
/// ([`ImageStore::stage_layer`]). Dropped unused, its directory is removed.
#[derive(Debug)]
pub struct StagedLayer {
    pub(crate) dir: Option<std::path::PathBuf>,
    pub(crate) implicit_dirs: Vec<std::path::PathBuf>,
    pub(crate) whiteouts: crate::unpack::Whiteouts,
    /// The layer blob's digest.
    pub layer: Digest,
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            containerd::remove_staged_tree(&dir);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("containerd at {address} is unavailable: {detail}")]
    Unavailable { address: String, detail: String },
    #[error("content digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: String },
    #[error("{what} not found in containerd")]
    NotFound { what: String },
    #[error("blob {digest} is {size} bytes, more than the {max} allowed for this read")]
    TooLarge { digest: Digest, size: u64, max: u64 },
    #[error("containerd {op} failed: {status}")]
    Grpc {
        op: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("containerd's content directory: {detail}")]
    Local { detail: String },
    #[error("containerd returned a malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    /// In-house unpacking refused or failed on a layer.
    #[error(transparent)]
    Unpack(#[from] crate::unpack::UnpackError),
}
