//! Live pull progress: every pull in flight, what it is doing and how far it got,
//! for the status socket (`[server] status_listen`) and `cri-imaged pulls`. CRI has
//! no progress of its own yet (KEP-3542).
//!
//! The puller feeds one [`PullProgress`] per pull; bytes are counted per chunk on an
//! atomic, and a lock is taken only at state changes and at most every
//! [`SAMPLE_EVERY`] for the rate's samples. [`view`] renders snapshots as text and
//! [`watch`] prints them for `cri-imaged pulls`.

pub mod view;
pub mod watch;

use crate::oci::Manifest;
use crate::policy::Source;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How often the byte counter is sampled for the rate (at most).
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The rate is the bytes received over this recent window.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Every pull in flight on this daemon; shared by the puller and the status socket.
#[derive(Default)]
pub struct Progress {
    pulls: Mutex<BTreeMap<u64, Arc<PullProgress>>>,
    next_id: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// Registers a pull of `image` (as asked), queued for a pull slot. It is listed
    /// until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>, image: &str) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let pull = Arc::new(PullProgress::new(id, image));
        lock(&self.pulls).insert(id, pull.clone());
        Tracked {
            registry: self.clone(),
            pull,
        }
    }

    /// Every pull in flight, oldest first.
    pub fn snapshot(&self) -> Pulls {
        let pulls: Vec<Arc<PullProgress>> = lock(&self.pulls).values().cloned().collect();
        let now = Instant::now();
        Pulls {
            pulls: pulls.iter().map(|p| p.status(now)).collect(),
        }
    }
}

/// A pull's entry in [`Progress`]; removes it when dropped (also when the pull's
/// task panics).
pub struct Tracked {
    registry: Arc<Progress>,
    pull: Arc<PullProgress>,
}

impl Tracked {
    /// The handle the puller reports through.
    pub fn pull(&self) -> &Arc<PullProgress> {
        &self.pull
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.registry.pulls).remove(&self.pull.id);
    }
}

/// One pull's progress, updated by the puller.
pub struct PullProgress {
    id: u64,
    image: String,
    started_at: SystemTime,
    started: Instant,
    bytes_done: AtomicU64,
    /// Of `bytes_done`, what came off the wire (not found already stored).
    bytes_fetched: AtomicU64,
    layers_stored: AtomicU64,
    layers_unpacked: AtomicU64,
    /// `SAMPLE_EVERY` periods since `started` at the last sample.
    last_sample: AtomicU64,
    detail: Mutex<Detail>,
}

#[derive(Default)]
struct Detail {
    state: PullState,
    source: Option<SourceStatus>,
    layers_total: Option<u64>,
    bytes_total: Option<u64>,
    /// (when, bytes done then), oldest first, spanning about `RATE_WINDOW`.
    samples: VecDeque<(Instant, u64)>,
}

impl PullProgress {
    fn new(id: u64, image: &str) -> PullProgress {
        PullProgress {
            id,
            image: image.to_string(),
            started_at: SystemTime::now(),
            started: Instant::now(),
            bytes_done: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            layers_stored: AtomicU64::new(0),
            layers_unpacked: AtomicU64::new(0),
            last_sample: AtomicU64::new(u64::MAX),
            detail: Mutex::new(Detail::default()),
        }
    }

    /// Holds a pull slot; resolving what to pull.
    pub fn resolving(&self) {
        lock(&self.detail).state = PullState::Resolving;
    }

    /// Trying `source` (a mirror or the origin): everything counted at an earlier
    /// source starts over.
    pub fn source(&self, source: &Source) {
        let mut detail = lock(&self.detail);
        *detail = Detail {
            state: PullState::Resolving,
            source: Some(SourceStatus {
                registry: source.endpoint.host.clone(),
                kind: source.kind.to_string(),
            }),
            ..Detail::default()
        };
        self.bytes_done.store(0, Ordering::Relaxed);
        self.bytes_fetched.store(0, Ordering::Relaxed);
        self.layers_stored.store(0, Ordering::Relaxed);
        self.layers_unpacked.store(0, Ordering::Relaxed);
    }

    /// The manifest is in: its config and layers are to be fetched.
    pub fn downloading(&self, manifest: &Manifest) {
        let bytes = manifest.layers.iter().map(|l| l.size).sum::<u64>() + manifest.config.size;
        let mut detail = lock(&self.detail);
        detail.state = PullState::Downloading;
        detail.layers_total = Some(manifest.layers.len() as u64);
        detail.bytes_total = Some(bytes);
    }

    /// `n` more bytes of a blob arrived (or were found already stored).
    pub fn add_bytes(&self, n: u64) {
        let done = self.bytes_done.fetch_add(n, Ordering::Relaxed) + n;
        let now = Instant::now();
        let period = (now - self.started).as_millis() as u64 / SAMPLE_EVERY.as_millis() as u64;
        if self.last_sample.swap(period, Ordering::Relaxed) != period {
            let mut detail = lock(&self.detail);
            detail.samples.push_back((now, done));
            // Keep one sample older than the window, as the rate's base.
            while detail.samples.len() > 2 && now - detail.samples[1].0 > RATE_WINDOW {
                detail.samples.pop_front();
            }
        }
    }

    /// `n` more bytes of a blob arrived from the registry.
    pub fn add_fetched(&self, n: u64) {
        self.bytes_fetched.fetch_add(n, Ordering::Relaxed);
        self.add_bytes(n);
    }

    /// Bytes that came off the wire at the current source.
    pub fn fetched(&self) -> u64 {
        self.bytes_fetched.load(Ordering::Relaxed)
    }

    /// A layer is stored in the content store.
    pub fn layer_stored(&self) {
        self.layers_stored.fetch_add(1, Ordering::Relaxed);
    }

    /// A layer is unpacked into its snapshot.
    pub fn layer_unpacked(&self) {
        self.layers_unpacked.fetch_add(1, Ordering::Relaxed);
    }

    fn status(&self, now: Instant) -> PullStatus {
        let detail = lock(&self.detail);
        let bytes_done = self.bytes_done.load(Ordering::Relaxed);
        let stored = self.layers_stored.load(Ordering::Relaxed);
        let state = match detail.state {
            PullState::Downloading if detail.layers_total.is_some_and(|t| stored >= t) => {
                PullState::Unpacking
            }
            state => state,
        };
        let rate = (state == PullState::Downloading)
            .then(|| rate(&detail.samples, now, bytes_done))
            .flatten();
        let eta = match (rate, detail.bytes_total) {
            (Some(r), Some(total)) if r > 0 => Some(total.saturating_sub(bytes_done).div_ceil(r)),
            _ => None,
        };
        PullStatus {
            id: self.id,
            image: self.image.clone(),
            source: detail.source.clone(),
            state,
            layers: Layers {
                done: stored,
                unpacked: self.layers_unpacked.load(Ordering::Relaxed),
                total: detail.layers_total,
            },
            bytes: Bytes {
                done: bytes_done,
                total: detail.bytes_total,
            },
            bytes_per_second: rate,
            eta_seconds: eta,
            started: crate::timestamp::system(self.started_at),
            elapsed_seconds: (now - self.started).as_secs_f64(),
        }
    }
}

/// Bytes per second since the oldest sample in the window (or the newest before
/// it); none before there is half a second to measure.
fn rate(samples: &VecDeque<(Instant, u64)>, now: Instant, done: u64) -> Option<u64> {
    let base = samples
        .iter()
        .find(|(at, _)| now - *at <= RATE_WINDOW)
        .or(samples.back())?;
    let elapsed = (now - base.0).as_secs_f64();
    (elapsed >= 0.5).then(|| (done.saturating_sub(base.1) as f64 / elapsed) as u64)
}

/// What `GET /pulls` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pulls {
    pub pulls: Vec<PullStatus>,
}

/// One pull in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullStatus {
    /// Distinguishes two pulls of one image (with different credentials).
    pub id: u64,
    /// The image as asked (a short name's candidate, fully qualified).
    pub image: String,
    /// The source being tried; none while queued.
    pub source: Option<SourceStatus>,
    pub state: PullState,
    pub layers: Layers,
    /// Blob bytes (config and layers) received or found stored.
    pub bytes: Bytes,
    /// Over the last few seconds, while downloading.
    pub bytes_per_second: Option<u64>,
    /// Until the last byte is in, at that rate.
    pub eta_seconds: Option<u64>,
    /// RFC 3339, UTC.
    pub started: String,
    pub elapsed_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// `host[:port]` contacted.
    pub registry: String,
    /// `mirror` or `origin`.
    pub kind: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullState {
    /// Waiting for a pull slot (`pull.max_concurrent_pulls`).
    #[default]
    Queued,
    /// Manifests, signatures, credentials.
    Resolving,
    Downloading,
    /// Every layer is in; unpacking and writing the image records.
    Unpacking,
}

impl std::fmt::Display for PullState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PullState::Queued => "queued",
            PullState::Resolving => "resolving",
            PullState::Downloading => "downloading",
            PullState::Unpacking => "unpacking",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layers {
    /// Stored in the content store.
    pub done: u64,
    pub unpacked: u64,
    /// Known once the manifest is in.
    pub total: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    pub done: u64,
    /// Known once the manifest is in.
    pub total: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_over_the_recent_window() {
        let now = Instant::now();
        let at = |secs_ago: u64| now - Duration::from_secs(secs_ago);
        let samples: VecDeque<_> = [(at(20), 0), (at(4), 1000), (at(2), 3000)].into();
        // From the oldest sample inside the window: 5000 bytes in 4 s.
        assert_eq!(rate(&samples, now, 6000), Some(1250));
        // Nothing sampled lately: measured from the newest sample, so it decays.
        let stale: VecDeque<_> = [(at(20), 0), (at(10), 1000)].into();
        assert_eq!(rate(&stale, now, 1000), Some(0));
        assert_eq!(rate(&VecDeque::new(), now, 10), None);
    }

    #[test]
    fn a_pull_is_listed_until_its_guard_drops() {
        let progress = Progress::new();
        let tracked = progress.begin("example.com/app:1");
        let status = &progress.snapshot().pulls[0];
        assert_eq!(status.image, "example.com/app:1");
        assert_eq!(status.state, PullState::Queued);
        assert_eq!(status.source, None);
        tracked.pull().resolving();
        tracked.pull().add_bytes(10);
        tracked.pull().add_bytes(5);
        let status = &progress.snapshot().pulls[0];
        assert_eq!(
            (status.state, status.bytes.done),
            (PullState::Resolving, 15)
        );
        drop(tracked);
        assert!(progress.snapshot().pulls.is_empty());
    }
}
