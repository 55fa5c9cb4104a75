//! A pull's containerd lease: everything the pull writes is held by it until the
//! records reference it; then, or on failure or cancellation, it is deleted.

use crate::store::{ImageStore, Lease, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a failed pull's lease deletion is retried while containerd is away.
const RELEASE_RETRY_FOR: Duration = Duration::from_secs(30 * 60);

/// Releases a pull's lease when the pull is done, failed, or was dropped where it
/// stood (cancelled): what it wrote and no record references is collected.
pub(super) struct LeaseCleanup {
    pub(super) store: Arc<dyn ImageStore>,
    /// `None` once released.
    pub(super) lease: Option<Lease>,
    /// The pull's ingest references (config, then layers).
    pub(super) ingests: Vec<String>,
}

impl LeaseCleanup {
    /// After a failure, partial ingests are dropped too (downloads cancelled by the
    /// failure did not clean up after themselves), and containerd collects before
    /// this returns, so a failed pull leaves nothing behind.
    pub(super) async fn run(mut self, failed: bool) {
        if let Some(lease) = self.lease.take() {
            release(
                &self.store,
                &lease,
                failed.then_some(&self.ingests[..]),
                failed,
            )
            .await;
        }
    }
}

impl Drop for LeaseCleanup {
    /// Dropped unfinished: the pull was cancelled. Its staged blobs stay for the
    /// next pull to resume (as after a restart); the lease goes at once instead of
    /// expiring in `lease_expiry`.
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let store = self.store.clone();
            tokio::spawn(async move { release(&store, &lease, None, true).await });
        }
    }
}

/// Drops `abort_ingests`, then deletes `lease`; with `collect`, containerd collects
/// what it held before this returns. If containerd cannot be reached (restarting
/// under us), the deletion is retried in the background until it is back, so the
/// lease does not hold the pull's leftovers until it expires.
async fn release(
    store: &Arc<dyn ImageStore>,
    lease: &Lease,
    abort_ingests: Option<&[String]>,
    collect: bool,
) {
    for reference in abort_ingests.unwrap_or_default() {
        if let Err(e) = store.abort_ingest(reference).await {
            tracing::debug!(ingest = %reference, error = %e, "could not abort the ingest");
        }
    }
    match store.delete_lease(lease, collect).await {
        Ok(()) => {}
        Err(e @ StoreError::Unavailable { .. }) => {
            tracing::info!(lease = %lease.id, error = %e, "could not delete the pull's lease; retrying until containerd answers");
            let (store, lease) = (store.clone(), lease.clone());
            let ingests = abort_ingests.map(<[String]>::to_vec);
            tokio::spawn(async move { release_later(&store, &lease, ingests, collect).await });
        }
        Err(e) => {
            tracing::warn!(lease = %lease.id, error = %e, "could not delete the pull's lease; it expires by itself");
        }
    }
}

/// Retries [`release`] 1 s, 2 s, 4 s … (at most a minute) apart while containerd
/// is unavailable, for up to [`RELEASE_RETRY_FOR`].
async fn release_later(
    store: &Arc<dyn ImageStore>,
    lease: &Lease,
    ingests: Option<Vec<String>>,
    collect: bool,
) {
    let started = Instant::now();
    let mut delay = Duration::from_secs(1);
    loop {
        tokio::time::sleep(delay).await;
        for reference in ingests.iter().flatten() {
            let _ = store.abort_ingest(reference).await;
        }
        match store.delete_lease(lease, collect).await {
            Ok(()) => {
                tracing::info!(lease = %lease.id, "deleted the pull's lease once containerd answered");
                return;
            }
            Err(StoreError::Unavailable { .. }) if started.elapsed() < RELEASE_RETRY_FOR => {
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            Err(e) => {
                tracing::warn!(lease = %lease.id, error = %e, "gave up deleting the pull's lease; it expires by itself");
                return;
            }
        }
    }
}
