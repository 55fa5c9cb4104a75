//! Direct ingest: a blob is written (and verified) straight into containerd's content
//! directory on this host, then registered through `Content.Write`, which for a blob
//! already on disk only records it (containerd's default "shared" content policy).
//!
//! Why: streaming every byte through `Content.Write` made containerd hash, decode
//! and copy it once more; on a 200 MB image that cost more than containerd's own
//! pull spent downloading (measured with benches/pull.rs). Written here, the bytes
//! cross one process and are hashed once.
//!
//! Safety: bytes are staged in `<content root>/cri-imaged-ingest/` and hard-linked
//! into `blobs/sha256/<hex>` only once their digest matched. If containerd does not
//! take the linked file as the blob (another host path, another content policy, or
//! its GC removed the unreferenced file first), the staged file is streamed through
//! `Content.Write` as before. Nothing ever appears under `blobs/` unverified.

use super::ContainerdStore;
use crate::digest::Verifier;
use crate::oci::Descriptor;
use crate::store::{ContentWriter, Ingest, Labels, Lease, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

const CONTENT_PLUGIN_TYPE: &str = "io.containerd.content.v1";
const CONTENT_PLUGIN_ID: &str = "content";
const STAGING_DIR: &str = "cri-imaged-ingest";
/// Buffered file writes: network chunks are small, a blocking write per chunk is not.
const FILE_BUFFER: usize = 1 << 20;
/// A staged file untouched this long is no pull's to resume (the default lease
/// expiry, after which containerd has let go of the pull's other content too).
const STALE_STAGED: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Chunk size when the staged file has to be streamed through `Content.Write`.
const STREAM_CHUNK: usize = 1 << 20;
/// How long `discard` waits for a cancelled writer to let go of its staged file.
const DISCARD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn remove_staged(path: &Path) {
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove staged blob"),
    }
}

/// Maps an I/O error on `path` to the store's error, naming what was being done.
fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Local {
        detail: format!("{what} {}: {source}", path.display()),
    }
}

/// containerd's content directory as seen from here.
#[derive(Debug)]
pub(super) struct DirectContent {
    blobs: PathBuf,
    staging: PathBuf,
    /// Staged files being written, by name: one writer per blob at a time.
    active: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl DirectContent {
    /// Finds containerd's content root and checks it is this host's: the directory
    /// exists with containerd's `ingest` beside where blobs go, and we can stage
    /// files next to it. `None` when it is not usable (the caller streams instead).
    pub(super) async fn discover(
        store: &ContainerdStore,
    ) -> Result<Option<DirectContent>, StoreError> {
        let root = match store
            .plugin_root(CONTENT_PLUGIN_TYPE, CONTENT_PLUGIN_ID)
            .await
        {
            Ok(root) => PathBuf::from(root),
            Err(StoreError::NotFound { what }) => {
                tracing::info!(%what, "containerd does not say where its content lives; streaming blobs through its API");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if !root.join("ingest").is_dir() {
            tracing::info!(root = %root.display(), "containerd's content directory is not visible here; streaming blobs through its API");
            return Ok(None);
        }
        let staging = root.join(STAGING_DIR);
        let blobs = root.join("blobs").join("sha256");
        for dir in [&staging, &blobs] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::info!(dir = %dir.display(), error = %e, "cannot write beside containerd's content; streaming blobs through its API");
                return Ok(None);
            }
        }
        // Files staged by an earlier run that died mid-pull (`kill -9`, a crash, a
        // reboot) are kept: the next pull of that blob resumes from them with a
        // Range request, and checks the whole blob's digest as ever. Ones older
        // than [`STALE_STAGED`] belong to pulls nobody retried: removed.
        if let Ok(entries) = std::fs::read_dir(&staging) {
            for entry in entries.flatten() {
                let age = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                match age {
                    Some(age) if age < STALE_STAGED => {
                        tracing::info!(path = %entry.path().display(), "keeping a blob staged by an earlier run; the next pull resumes it");
                    }
                    _ => {
                        if let Err(e) = std::fs::remove_file(entry.path()) {
                            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a stale staged blob");
                        }
                    }
                }
            }
        }
        tracing::info!(root = %root.display(), "writing blobs straight into containerd's content directory");
        Ok(Some(DirectContent {
            blobs,
            staging,
            active: Mutex::new(HashMap::new()),
        }))
    }

    fn staged_path(&self, reference: &str) -> PathBuf {
        let name: String = reference
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        self.staging.join(name)
    }

    fn lock_for(&self, path: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        // Locks nobody holds or waits for (only the map has them) are forgotten.
        active.retain(|_, lock| Arc::strong_count(lock) > 1);
        active
            .entry(path.to_string_lossy().into_owned())
            .or_default()
            .clone()
    }

    /// Removes a staged file after a pull gave up on it. A writer still holding it
    /// (a download being cancelled, which lets go at once) is waited for briefly; one
    /// that keeps it belongs to another pull, which cleans up after itself.
    pub(super) async fn discard(&self, reference: &str) {
        let path = self.staged_path(reference);
        let lock = self.lock_for(&path);
        match tokio::time::timeout(DISCARD_WAIT, lock.lock_owned()).await {
            Ok(_guard) => remove_staged(&path).await,
            Err(_) => tracing::debug!(reference, "staged blob in use by another pull; leaving it"),
        }
    }

    /// Opens (or resumes) the staged file for `expected`.
    pub(super) async fn open(
        self: &Arc<Self>,
        store: &ContainerdStore,
        lease: &Lease,
        reference: &str,
        expected: &Descriptor,
    ) -> Result<Ingest, StoreError> {
        let path = self.staged_path(reference);
        let guard = self.lock_for(&path).lock_owned().await;
        // Another pull may have finished this blob while we waited for the lock.
        // Held first, then looked at (see `open_ingest`).
        store.lease_content(lease, &expected.digest).await?;
        if store.info(&expected.digest).await?.is_some() {
            return Ok(Ingest::Present);
        }
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .await
            .map_err(io_err("cannot open staged blob", &path))?;
        let mut file = file;
        let mut verifier = Verifier::new();
        let existing = file
            .metadata()
            .await
            .map_err(io_err("cannot stat staged blob", &path))?
            .len();
        if existing > expected.size {
            file.set_len(0)
                .await
                .map_err(io_err("cannot truncate staged blob", &path))?;
        } else if existing > 0 {
            // Resuming: the digest must cover the bytes already staged.
            let mut buf = vec![0u8; STREAM_CHUNK];
            loop {
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(io_err("cannot read staged blob", &path))?;
                if n == 0 {
                    break;
                }
                verifier.update(&buf[..n]);
            }
            tracing::debug!(reference, offset = existing, "resuming staged blob");
        }
        Ok(Ingest::Writer(Box::new(DirectWriter {
            direct: self.clone(),
            store: store.clone(),
            lease: lease.clone(),
            reference: reference.to_string(),
            expected: expected.clone(),
            path,
            file: BufWriter::with_capacity(FILE_BUFFER, file),
            verifier,
            _guard: guard,
        })))
    }
}

struct DirectWriter {
    direct: Arc<DirectContent>,
    store: ContainerdStore,
    lease: Lease,
    reference: String,
    expected: Descriptor,
    path: PathBuf,
    file: BufWriter<tokio::fs::File>,
    verifier: Verifier,
    /// Held while this writer lives: one writer per staged file.
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl DirectWriter {
    fn mismatch(&self, actual: String) -> StoreError {
        StoreError::DigestMismatch {
            expected: self.expected.digest.clone(),
            actual,
        }
    }

    /// Makes the verified staged file containerd's blob and records it in the
    /// namespace under the pull's lease.
    async fn publish(&mut self, labels: Labels) -> Result<(), StoreError> {
        let blob = self.direct.blobs.join(self.expected.digest.hex());
        let file = self.file.get_ref();
        file.sync_all()
            .await
            .map_err(io_err("cannot sync staged blob", &self.path))?;
        // containerd keeps committed blobs read-only.
        tokio::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o444))
            .await
            .map_err(io_err("cannot make staged blob read-only", &self.path))?;
        match tokio::fs::hard_link(&self.path, &blob).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                // Another filesystem, say: containerd will get the bytes streamed.
                tracing::debug!(blob = %blob.display(), error = %e, "cannot link the staged blob; streaming it");
            }
        }
        match self
            .store
            .open_ingest(&self.lease, &self.reference, &self.expected)
            .await?
        {
            Ingest::Present => self.store.set_labels(&self.expected.digest, labels).await?,
            Ingest::Writer(mut writer) => {
                let taken = writer.offset();
                if taken < self.expected.size {
                    tracing::debug!(
                        reference = %self.reference,
                        offset = taken,
                        "containerd did not take the blob from disk; streaming it"
                    );
                    self.stream_from(taken, writer.as_mut()).await?;
                }
                writer.commit(labels).await?;
            }
        }
        // containerd's GC removes files under blobs/ that no record names, and only
        // locks against writers while one is opening or committing: between our STAT
        // and COMMIT it may have taken the linked file. The staged copy still exists.
        if !tokio::fs::try_exists(&blob).await.unwrap_or(true) {
            tracing::info!(blob = %blob.display(), "blob file collected before it was recorded; linking it again");
            tokio::fs::hard_link(&self.path, &blob)
                .await
                .map_err(io_err("cannot link blob", &blob))?;
        }
        Ok(())
    }

    async fn stream_from(
        &self,
        offset: u64,
        writer: &mut dyn ContentWriter,
    ) -> Result<(), StoreError> {
        let mut file = tokio::fs::File::open(&self.path)
            .await
            .map_err(io_err("cannot reopen staged blob", &self.path))?;
        tokio::io::AsyncSeekExt::seek(&mut file, io::SeekFrom::Start(offset))
            .await
            .map_err(io_err("cannot seek staged blob", &self.path))?;
        loop {
            let mut buf = vec![0u8; STREAM_CHUNK];
            let n = file
                .read(&mut buf)
                .await
                .map_err(io_err("cannot read staged blob", &self.path))?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            writer.write(Bytes::from(buf)).await?;
        }
    }
}

#[async_trait]
impl ContentWriter for DirectWriter {
    fn offset(&self) -> u64 {
        self.verifier.len()
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let after = self.verifier.len() + chunk.len() as u64;
        if after > self.expected.size {
            return Err(self.mismatch(format!(
                "at least {after} bytes for a blob of {}",
                self.expected.size
            )));
        }
        self.file
            .write_all(&chunk)
            .await
            .map_err(io_err("cannot write staged blob", &self.path))?;
        self.verifier.update(&chunk);
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), StoreError> {
        self.file
            .flush()
            .await
            .map_err(io_err("cannot write staged blob", &self.path))
    }

    async fn commit(mut self: Box<Self>, labels: Labels) -> Result<(), StoreError> {
        self.sync().await?;
        let written = self.verifier.len();
        if written < self.expected.size {
            // A short body is not bad data: keep it staged so the next attempt resumes.
            return Err(self.mismatch(format!("only {written} of {} bytes", self.expected.size)));
        }
        let actual = self.verifier.clone().finish();
        if actual != self.expected.digest {
            remove_staged(&self.path).await;
            return Err(self.mismatch(actual.to_string()));
        }
        let published = self.publish(labels).await;
        // Registered (or failed for good): the staged copy has done its job either way;
        // on failure the pull is retried from scratch.
        remove_staged(&self.path).await;
        published
    }
}
