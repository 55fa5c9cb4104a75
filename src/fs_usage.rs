//! ImageFsInfo's answer, cached. Summing a snapshotter's usage means one Usage call
//! per snapshot, which on a node with thousands of them takes seconds; kubelet asks
//! every few seconds for eviction and image GC. So the answer comes from a cache
//! refreshed in the background every [`REFRESH_EVERY`] (containers' writable layers
//! change without us), and again after each pull or removal of ours: the first
//! ImageFsInfo after one waits (at most [`STALE_WAIT`]) for the new figure, then
//! answers with the last one it has.

use crate::catalog::{Catalog, CatalogError};
use crate::store::FsUsage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

/// Background refresh period (containerd's CRI refreshes its snapshot stats as often).
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// How long an ImageFsInfo waits for a refresh after the store changed.
pub const STALE_WAIT: Duration = Duration::from_secs(2);

/// One computed answer: the usage, when it was taken, and the store generation it
/// reflects.
#[derive(Debug, Clone)]
pub struct Sample {
    pub usage: FsUsage,
    pub taken: SystemTime,
    generation: u64,
}

pub struct FsUsageCache {
    catalog: Arc<Catalog>,
    snapshotter: String,
    sample: Mutex<Option<Sample>>,
    /// Bumped by [`Self::invalidate`] whenever our own writes change the usage.
    generation: AtomicU64,
    /// One computation at a time; waiters take its result.
    computing: tokio::sync::Mutex<()>,
}

impl FsUsageCache {
    pub fn new(catalog: Arc<Catalog>, snapshotter: String) -> Arc<FsUsageCache> {
        Arc::new(FsUsageCache {
            catalog,
            snapshotter,
            sample: Mutex::new(None),
            generation: AtomicU64::new(0),
            computing: tokio::sync::Mutex::new(()),
        })
    }

    /// Refreshes every [`REFRESH_EVERY`] until the cache is dropped. Needs a tokio
    /// runtime.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<FsUsageCache> = Arc::downgrade(self);
        tokio::spawn(async move {
            let first = tokio::time::Instant::now() + REFRESH_EVERY;
            let mut tick = tokio::time::interval_at(first, REFRESH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                // Only once someone asked: a daemon nobody asks ImageFsInfo of does
                // not dial containerd for it (it connects on first need).
                if cache.cached().is_none() {
                    continue;
                }
                if let Err(e) = cache.compute(true).await {
                    tracing::warn!(error = %e, "refreshing the image filesystem usage failed");
                }
            }
        })
    }

    /// Marks the cached figure out of date (after a pull or removal).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The usage to report: cached when current; after our own writes, a fresh one
    /// if it comes within [`STALE_WAIT`]; computed at once when there is none yet.
    pub async fn get(self: &Arc<Self>) -> Result<Sample, CatalogError> {
        let cached = self.cached();
        match cached {
            Some(sample) if sample.generation == self.generation.load(Ordering::SeqCst) => {
                Ok(sample)
            }
            Some(stale) => {
                // In a task of its own, so a caller that stops waiting does not throw
                // the work away: the figure lands in the cache for the next one.
                let cache = self.clone();
                let computing = tokio::spawn(async move { cache.compute(false).await });
                match tokio::time::timeout(STALE_WAIT, computing).await {
                    Ok(Ok(Ok(fresh))) => Ok(fresh),
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(error = %e, "image filesystem usage failed; answering the last figure");
                        Ok(stale)
                    }
                    Ok(Err(_)) | Err(_) => Ok(stale),
                }
            }
            None => self.compute(false).await,
        }
    }

    fn cached(&self) -> Option<Sample> {
        self.sample
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Computes and stores a sample. Unless `force`, a sample that became current
    /// while waiting for the lock is answered instead.
    async fn compute(&self, force: bool) -> Result<Sample, CatalogError> {
        let _one = self.computing.lock().await;
        let generation = self.generation.load(Ordering::SeqCst);
        if !force {
            if let Some(sample) = self.cached().filter(|s| s.generation == generation) {
                return Ok(sample);
            }
        }
        let usage = self.catalog.filesystem_usage(&self.snapshotter).await?;
        let sample = Sample {
            usage,
            taken: SystemTime::now(),
            generation,
        };
        *self.sample.lock().unwrap_or_else(PoisonError::into_inner) = Some(sample.clone());
        Ok(sample)
    }
}
