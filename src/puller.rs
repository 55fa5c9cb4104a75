//! The pull: for one image, walk sources × credentials until one works, then
//! fetch manifest, config and layers into the store, unpack, and write the image
//! records containerd's CRI writes. Concurrent pulls of the same image share one.
//!
//! Order of writes (DESIGN.md): everything under a lease; blobs, then snapshots,
//! then the config's snapshot label, manifest and index with their GC labels, and
//! the image records last, so containerd's CRI sees a complete image or none.
//!
//! This file holds the sharing of identical pulls, the walk over sources and
//! credentials, and what the stages have in common. One try at one source goes
//! through the stages, a module each:
//! - `resolve.rs`: the manifest for this platform, its checks and signatures, and
//!   whether the image is whole here already (then `warm.rs`: a manifest HEAD only);
//! - `fetch.rs`: blobs from the registry into the content store, in parallel;
//! - `stage.rs` and `unpack.rs`: layers extracted as they arrive, then committed as
//!   snapshots in layer order;
//! - `record.rs`: GC labels, manifest and index, and the image records;
//! - `lease.rs`: the lease everything is written under, released at the end.

use crate::auth::{AuthError, Candidate, Keyring, RequestAuth};
use crate::digest::Digest;
use crate::metrics::{Metrics, PullMeter};
use crate::oci::{Descriptor, ImageConfig, Index, Manifest};
use crate::platform::PlatformSpec;
use crate::policy::short_names::Resolution;
use crate::policy::{Blocked, Candidates, Policy, ShortNameError, Source, SourceKind};
use crate::progress::{Progress, PullProgress};
use crate::reference::Reference;
use crate::registry::{Credential, RegistryClient, RegistryError};
use crate::reload::Reloading;
use crate::store::{ImageStore, Labels, Lease, StoreError};
use crate::trust_policy::{Pending, Refusal, TrustPolicy};
use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;

mod fetch;
mod lease;
mod record;
mod resolve;
mod stage;
mod unpack;
mod warm;

use fetch::fetch_blob;
use lease::LeaseCleanup;

/// Manifests and configs above this size are refused.
const MAX_DOCUMENT_BYTES: u64 = crate::catalog::MAX_DOCUMENT_BYTES;
/// The most layers an image may have. Real images have tens; overlayfs itself stops
/// stacking long before this.
const MAX_LAYERS: usize = 1000;

/// How pulls are done; from the `[containerd]` and `[pull]` config.
#[derive(Debug, Clone)]
pub struct PullSettings {
    pub snapshotter: String,
    pub platform: PlatformSpec,
    pub max_concurrent_downloads: usize,
    /// Layers extracted at once per pull when the store unpacks in-house.
    pub max_concurrent_unpacks: usize,
    /// Pulls running at once on the node (others wait in arrival order); 0: no limit.
    pub max_concurrent_pulls: usize,
    pub lease_expiry: Duration,
    /// References or globs of images recorded as pinned (see `[pull] pinned`).
    pub pinned: Vec<String>,
    pub metrics: Arc<Metrics>,
}

impl PullSettings {
    /// Whether `image` is to be pinned: equal to a listed reference once normalised,
    /// or matching a listed glob (`*`, `?`, `[...]`) over its full text.
    pub fn is_pinned(&self, image: &Reference) -> bool {
        let text = image.to_string();
        self.pinned.iter().any(|pattern| {
            if pattern.contains(['*', '?', '[']) {
                crate::auth::matcher::glob_match(pattern, &text, true)
            } else {
                Reference::parse(pattern).is_ok_and(|r| &r == image)
            }
        })
    }
}

/// A finished pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The image ID: the config digest.
    pub image_id: Digest,
    /// The descriptor the reference resolved to (index or manifest).
    pub target: Descriptor,
    /// Which candidate's credentials worked (key and source, never the secret).
    pub credential_key: String,
    pub credential_source: String,
}

/// One credential that a registry refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub key: String,
    pub source: String,
    pub kind: &'static str,
    /// 401 or 403.
    pub status: u16,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.source == "anonymous" {
            write!(f, "anonymous → {}", self.status)
        } else {
            write!(
                f,
                "{} {:?} from {} → {}",
                self.kind, self.key, self.source, self.status
            )
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("pulling {image} from {registry}: {source}")]
    Registry {
        image: String,
        registry: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error(
        "pulling {image}: registry {registry} refused every credential tried ({})",
        list(attempts)
    )]
    Unauthorized {
        image: String,
        registry: String,
        attempts: Vec<Attempt>,
        /// Every attempt was a 403 (authenticated but not allowed).
        forbidden: bool,
    },
    #[error("pulling {image}: no manifest for platform {wanted} (the index has: {})", available.join(", "))]
    NoMatchingPlatform {
        image: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error("pulling {image}: invalid image: {what}")]
    InvalidImage { image: String, what: String },
    #[error("pulling {image}: {source}")]
    Store {
        image: String,
        #[source]
        source: StoreError,
    },
    #[error("pulling {image}: download task failed: {detail}")]
    Task { image: String, detail: String },
    /// Every caller of the pull went away before it finished.
    #[error("pulling {image}: cancelled, every caller went away")]
    Cancelled { image: String },
    #[error("{0}")]
    Blocked(#[from] Blocked),
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// policy.json needs signatures, and they could not be read.
    #[error("{image}: {source}")]
    Signatures {
        image: String,
        #[source]
        source: Box<crate::signature::fetch::FetchError>,
    },
    #[error("{0}")]
    ShortName(#[from] ShortNameError),
    /// Every candidate for a short name failed: the last one's error in full.
    #[error("{last} (tried first for short name {name:?}: {})", list(failed))]
    Candidates {
        name: String,
        failed: Vec<String>,
        last: Arc<PullError>,
    },
    /// Every source failed: the earlier ones listed, the last one's error in full.
    #[error("{last} (sources tried before: {})", list(failed))]
    Sources {
        failed: Vec<SourceFailure>,
        last: Box<PullError>,
    },
}

/// How one source (a mirror, or the origin) failed before the next was tried.
#[derive(Debug, Clone)]
pub struct SourceFailure {
    pub kind: SourceKind,
    pub registry: String,
    pub error: String,
}

impl fmt::Display for SourceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.registry, self.error)
    }
}

impl PullError {
    /// Whether the next candidate for a short name may do better: the image is not
    /// at this candidate, or not allowed from it.
    fn is_candidate_failure(&self) -> bool {
        self.is_source_failure()
            || matches!(
                self,
                PullError::Blocked(_) | PullError::Refused(_) | PullError::Sources { .. }
            )
    }

    /// Whether this is the source's failure (unreachable, refusing, not having the
    /// image, serving something broken), so that the next source may do better;
    /// not so for local faults (containerd, a malformed request).
    fn is_source_failure(&self) -> bool {
        match self {
            PullError::Registry { .. }
            | PullError::Unauthorized { .. }
            | PullError::NoMatchingPlatform { .. }
            | PullError::InvalidImage { .. }
            | PullError::Signatures { .. } => true,
            PullError::Auth(_)
            | PullError::Store { .. }
            | PullError::Task { .. }
            | PullError::Cancelled { .. }
            | PullError::Blocked(_)
            | PullError::Refused(_)
            | PullError::ShortName(_)
            | PullError::Candidates { .. }
            | PullError::Sources { .. } => false,
        }
    }
}

fn list(attempts: &[impl ToString]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

type SharedPull = Shared<BoxFuture<'static, Result<Pulled, Arc<PullError>>>>;

/// A pull under way and the callers waiting for it.
struct InflightPull {
    result: SharedPull,
    /// Callers awaiting `result`: when the last goes away unanswered, the pull is
    /// cancelled (its downloads stop and its lease is released).
    callers: usize,
    /// Told when the last caller went away; also this pull's identity in the map
    /// (a new pull of the same image may take the key once this one is cancelled).
    cancel: Arc<Notify>,
}

type Inflight = Mutex<HashMap<String, InflightPull>>;

/// One caller's share of an in-flight pull; dropping it (the caller went away, or
/// got its answer) gives the share back.
struct Caller<'a> {
    inflight: &'a Inflight,
    key: String,
    cancel: Arc<Notify>,
}

impl Drop for Caller<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(self.inflight);
        let Some(entry) = inflight.get_mut(&self.key) else {
            return; // finished: the pull removed its own entry
        };
        if !Arc::ptr_eq(&entry.cancel, &self.cancel) {
            return; // a later pull of the same image
        }
        entry.callers -= 1;
        if entry.callers == 0 {
            inflight.remove(&self.key);
            self.cancel.notify_one();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the pull's own entry (not a later pull's under the same key).
fn remove_entry(inflight: &Inflight, key: &str, cancel: &Arc<Notify>) {
    let mut inflight = lock(inflight);
    if inflight
        .get(key)
        .is_some_and(|e| Arc::ptr_eq(&e.cancel, cancel))
    {
        inflight.remove(key);
    }
}

/// Pulls images; cheap to clone.
#[derive(Clone)]
pub struct Puller {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ImageStore>,
    registry: RegistryClient,
    policy: Reloading<Policy>,
    trust: Reloading<TrustPolicy>,
    keyring: Keyring,
    settings: PullSettings,
    inflight: Inflight,
    /// Node-wide pull slots (tokio's semaphore is fair: first come, first served).
    slots: Option<Semaphore>,
    /// Every pull in flight, for the status socket.
    progress: Arc<Progress>,
    /// Snapshots being unpacked by this daemon's pulls (each by one pull at a
    /// time), and the node-wide bound on layers extracted from their downloads.
    staging: Arc<stage::NodeStaging>,
}

impl Puller {
    pub fn new(
        store: Arc<dyn ImageStore>,
        registry: RegistryClient,
        policy: Reloading<Policy>,
        trust: Reloading<TrustPolicy>,
        keyring: Keyring,
        settings: PullSettings,
    ) -> Self {
        Puller {
            inner: Arc::new(Inner {
                store,
                registry,
                policy,
                trust,
                keyring,
                slots: (settings.max_concurrent_pulls > 0)
                    .then(|| Semaphore::new(settings.max_concurrent_pulls)),
                settings,
                inflight: Mutex::new(HashMap::new()),
                progress: Progress::new(),
                staging: Arc::new(stage::NodeStaging::new(stage::MAX_STREAMED)),
            }),
        }
    }

    /// The pulls in flight and how far each got.
    pub fn progress(&self) -> Arc<Progress> {
        self.inner.progress.clone()
    }

    /// Pulls the image `name` as the user wrote it: a short name is tried at each of
    /// its registries.conf candidates in order (alias, search registries, Docker Hub)
    /// and recorded under the fully qualified name that served it.
    pub async fn pull_name(
        &self,
        name: &str,
        auth: Option<RequestAuth>,
    ) -> Result<Pulled, Arc<PullError>> {
        let candidates = self
            .inner
            .policy
            .get()
            .candidates(name)
            .map_err(|e| Arc::new(PullError::from(e)))?;
        if candidates.resolution != Resolution::Qualified {
            tracing::debug!(
                name,
                resolution = %candidates.resolution,
                candidates = ?candidates.references.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "resolved the image name"
            );
        }
        let result = self.pull_candidates(name, candidates, auth).await;
        if let Err(e) = &result {
            // One line per failed pull, with the reason (after every candidate).
            tracing::warn!(image = name, error = %e, "pull failed");
        }
        result
    }

    /// Each candidate of a resolved name in order, until one is pulled.
    async fn pull_candidates(
        &self,
        name: &str,
        candidates: Candidates,
        auth: Option<RequestAuth>,
    ) -> Result<Pulled, Arc<PullError>> {
        let count = candidates.references.len();
        let mut failed = Vec::new();
        for (i, reference) in candidates.references.into_iter().enumerate() {
            match self.pull(reference.clone(), auth.clone()).await {
                Ok(pulled) => return Ok(pulled),
                Err(e) if i + 1 < count && e.is_candidate_failure() => {
                    tracing::info!(name, candidate = %reference, error = %e, "short-name candidate failed; trying the next one");
                    failed.push(format!("{reference}: {e}"));
                }
                Err(e) if failed.is_empty() => return Err(e),
                Err(e) => {
                    return Err(Arc::new(PullError::Candidates {
                        name: name.to_string(),
                        failed,
                        last: e,
                    }))
                }
            }
        }
        unreachable!("Policy::candidates returns at least one reference or an error")
    }

    /// The fully qualified references `name` may be stored under, most likely first.
    /// A fully qualified name is answered without the policy files, so ImageStatus
    /// of one costs no `stat` of registries.conf.
    pub fn stored_candidates(&self, name: &str) -> Result<Candidates, ShortNameError> {
        Candidates::qualified(name)
            .unwrap_or_else(|| self.inner.policy.get().stored_candidates(name))
    }

    /// Pulls `reference`. A pull of the same reference with the same request
    /// credentials already under way is joined rather than repeated. The pull runs
    /// in its own task for as long as someone waits for it: when the last caller goes
    /// away (kubelet's context cancelled), it is cancelled, so its downloads stop and
    /// its lease is released; blobs staged so far are kept for the next pull to resume.
    pub async fn pull(
        &self,
        reference: Reference,
        auth: Option<RequestAuth>,
    ) -> Result<Pulled, Arc<PullError>> {
        let key = inflight_key(&reference, auth.as_ref());
        let (result, caller) = {
            let mut inflight = lock(&self.inner.inflight);
            let entry = match inflight.get_mut(&key) {
                Some(existing) => {
                    tracing::debug!(image = %reference, "joining a pull already under way");
                    existing
                }
                None => {
                    let cancel = Arc::new(Notify::new());
                    let result = self.spawn_pull(reference, auth, key.clone(), cancel.clone());
                    inflight.entry(key.clone()).or_insert(InflightPull {
                        result,
                        callers: 0,
                        cancel,
                    })
                }
            };
            entry.callers += 1;
            let caller = Caller {
                inflight: &self.inner.inflight,
                key,
                cancel: entry.cancel.clone(),
            };
            (entry.result.clone(), caller)
        };
        let result = result.await;
        drop(caller);
        result
    }

    /// Starts the task of one pull; it ends with the pull, or when `cancel` is told.
    fn spawn_pull(
        &self,
        reference: Reference,
        auth: Option<RequestAuth>,
        key: String,
        cancel: Arc<Notify>,
    ) -> SharedPull {
        let inner = self.inner.clone();
        let (task_key, task_cancel) = (key.clone(), cancel.clone());
        let handle: JoinHandle<Result<Pulled, Arc<PullError>>> = tokio::spawn(async move {
            let tracked = inner.progress.begin(&reference.to_string());
            let cancelled = || {
                tracing::info!(image = %reference, "pull cancelled: every caller went away");
                PullError::Cancelled {
                    image: reference.to_string(),
                }
            };
            // Losing a race to `cancel` drops the pull where it stands: the slot is
            // given back, downloads are aborted and the lease released by the guards
            // that own them.
            let result = async {
                let _slot = tokio::select! {
                    slot = inner.slot(&reference) => slot,
                    () = task_cancel.notified() => return Err(cancelled()),
                };
                tracked.pull().resolving();
                let meter = inner.settings.metrics.pull_started();
                let result = tokio::select! {
                    result = inner.pull_once(&reference, auth.as_ref(), &meter, tracked.pull()) => result,
                    () = task_cancel.notified() => Err(cancelled()),
                };
                meter.finish(&reference, &result);
                result
            }
            .await;
            remove_entry(&inner.inflight, &task_key, &task_cancel);
            result.map_err(Arc::new)
        });
        let image = reference_text(&key);
        let inner = self.inner.clone();
        async move {
            handle.await.unwrap_or_else(|e| {
                // The task panicked before removing its entry: remove it here, or
                // every later pull of this image would get this error.
                remove_entry(&inner.inflight, &key, &cancel);
                Err(Arc::new(PullError::Task {
                    image,
                    detail: e.to_string(),
                }))
            })
        }
        .boxed()
        .shared()
    }
}

/// The image part of an in-flight key.
fn reference_text(key: &str) -> String {
    key.split_once(' ')
        .map_or(key, |(image, _)| image)
        .to_string()
}

/// Pulls are shared only between callers presenting the same credentials: one
/// caller's wrong password must not fail another's pull. The key holds a hash of the
/// request's auth, never the secret.
fn inflight_key(reference: &Reference, auth: Option<&RequestAuth>) -> String {
    let fingerprint = auth.map(|a| {
        // Length-prefixed, so no two different logins encode alike.
        let encoded: String = [
            &a.username,
            &a.password,
            &a.auth,
            &a.identity_token,
            &a.registry_token,
        ]
        .iter()
        .map(|s| format!("{}:{s}", s.len()))
        .collect();
        Digest::of(encoded.as_bytes()).hex()[..16].to_string()
    });
    format!("{reference} {}", fingerprint.unwrap_or_default())
}

/// Everything one attempt at one source needs.
struct Attempting<'a> {
    image: &'a Reference,
    source: &'a Source,
    credential: Option<&'a Credential>,
    signatures: &'a SignatureCheck,
    progress: &'a Arc<PullProgress>,
}

/// policy.json's signature requirements for the image asked for (the name it must
/// be signed under, whichever source serves it), and the registries.d that says
/// where each source's signatures are read from.
struct SignatureCheck {
    pending: Pending,
    trust: Arc<TrustPolicy>,
}

impl Inner {
    /// A node-wide pull slot, waited for in arrival order when all are taken.
    async fn slot(&self, reference: &Reference) -> Option<SemaphorePermit<'_>> {
        let slots = self.slots.as_ref()?;
        if let Ok(permit) = slots.try_acquire() {
            return Some(permit);
        }
        tracing::info!(
            image = %reference,
            limit = self.settings.max_concurrent_pulls,
            "all pull slots taken (pull.max_concurrent_pulls); waiting in line"
        );
        let _queued = self.settings.metrics.pull_queued();
        // The semaphore is never closed, so acquiring only waits.
        slots.acquire().await.ok()
    }

    #[tracing::instrument(skip_all, fields(image = %reference))]
    async fn pull_once(
        &self,
        reference: &Reference,
        auth: Option<&RequestAuth>,
        meter: &PullMeter<'_>,
        progress: &Arc<PullProgress>,
    ) -> Result<Pulled, PullError> {
        let started = Instant::now();
        // policy.json judges the name that was asked for, before any registry is
        // contacted, as containers/image does.
        let trust = self.trust.get();
        let signatures = SignatureCheck {
            pending: trust.check(reference)?,
            trust: trust.clone(),
        };
        let sources = self.policy.get().sources(reference)?;
        let mut failed: Vec<SourceFailure> = Vec::new();
        let count = sources.len();
        for (i, source) in sources.iter().enumerate() {
            let result = self
                .pull_source(reference, auth, source, &signatures, started, progress)
                .await;
            meter.tried(source, &result);
            match result {
                Ok(pulled) => return Ok(pulled),
                // A source that cannot serve the image hands over to the next one; the
                // last source's error is the pull's, with every earlier one listed.
                Err(e) if i + 1 < count && e.is_source_failure() => {
                    tracing::info!(
                        source = %source.kind,
                        registry = %source.endpoint.host,
                        error = %e,
                        "source failed; trying the next one"
                    );
                    failed.push(SourceFailure {
                        kind: source.kind,
                        registry: source.endpoint.host.clone(),
                        error: e.to_string(),
                    });
                }
                Err(e) if failed.is_empty() => return Err(e),
                Err(e) => {
                    return Err(PullError::Sources {
                        failed,
                        last: Box::new(e),
                    })
                }
            }
        }
        unreachable!("Policy::sources returns at least one source or an error")
    }

    /// Every credential candidate at one source, in order, until one works.
    async fn pull_source(
        &self,
        reference: &Reference,
        auth: Option<&RequestAuth>,
        source: &Source,
        signatures: &SignatureCheck,
        started: Instant,
        progress: &Arc<PullProgress>,
    ) -> Result<Pulled, PullError> {
        let mut attempts = Vec::new();
        // Credentials are looked up for the host contacted; the request's (kubelet's
        // match for the image) go only to the image's own registry, never to a mirror.
        let request = auth.filter(|_| source.reference.domain() == reference.domain());
        let candidates = self.keyring.candidates(&source.reference, request).await?;
        // Anonymous comes last and is reached only when every credential was
        // refused: any other failure ends the attempt at this source at once.
        for candidate in &candidates {
            // Counts start over with each attempt: a refused credential's partial
            // download is not this one's.
            progress.source(source);
            let attempt_started = Instant::now();
            let attempt = Attempting {
                image: reference,
                source,
                credential: candidate.credential.as_ref(),
                signatures,
                progress,
            };
            match self.pull_from(&attempt).await {
                Ok(target) => {
                    let seconds = attempt_started.elapsed().as_secs_f64();
                    let bytes = progress.fetched();
                    tracing::info!(
                        source = %source.kind,
                        registry = %source.endpoint.host,
                        key = %candidate.key,
                        credential_source = %candidate.source,
                        kind = candidate.kind(),
                        refused_before = attempts.len(),
                        image_id = %target.0,
                        digest = %target.1.digest,
                        bytes,
                        seconds = (seconds * 1000.0).round() / 1000.0,
                        mb_per_s = (bytes as f64 / 1e6 / seconds.max(1e-3) * 10.0).round() / 10.0,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "pulled"
                    );
                    self.keyring.remember(&source.reference, candidate);
                    self.settings.metrics.credential_attempt(candidate, true);
                    return Ok(Pulled {
                        image_id: target.0,
                        target: target.1,
                        credential_key: candidate.key.clone(),
                        credential_source: candidate.source.clone(),
                    });
                }
                Err(PullError::Registry { source: e, .. }) if e.is_auth_failure() => {
                    let status = auth_status(&e);
                    tracing::info!(
                        registry = %source.endpoint.host,
                        key = %candidate.key,
                        credential_source = %candidate.source,
                        kind = candidate.kind(),
                        status,
                        "credential refused; trying the next one"
                    );
                    attempts.push(attempt_of(candidate, status));
                    self.settings.metrics.credential_attempt(candidate, false);
                }
                Err(e) => return Err(e),
            }
        }
        let forbidden = !attempts.is_empty() && attempts.iter().all(|a| a.status == 403);
        Err(PullError::Unauthorized {
            image: reference.to_string(),
            registry: source.endpoint.host.clone(),
            attempts,
            forbidden,
        })
    }

    /// Under `lease`: the config, then the layers (downloaded, unpacked), then the
    /// records. Each stage is a module: fetch.rs, unpack.rs, record.rs.
    async fn fetch_and_unpack(
        &self,
        at: &Attempting<'_>,
        lease: &Lease,
        manifest_desc: &Descriptor,
        manifest_body: Bytes,
        manifest: &Manifest,
        index: Option<(crate::registry::FetchedManifest, Index)>,
    ) -> Result<(Digest, Descriptor), PullError> {
        let source_label = distribution_source_label(&at.source.reference);

        // The config first: its diff IDs name the snapshots.
        let mut labels = Labels::new();
        labels.insert(source_label.0.clone(), source_label.1.clone());
        fetch_blob(
            &self.store,
            &self.registry,
            at.source,
            at.credential,
            lease,
            &manifest.config,
            "config",
            labels,
            at.progress,
            None,
            None,
        )
        .await
        .map_err(|e| e.into_pull_error(at.image, &at.source.endpoint.host))?;
        let config_body = self
            .store_call(
                at,
                self.store
                    .read_content(&manifest.config.digest, MAX_DOCUMENT_BYTES),
            )
            .await?;
        let config: ImageConfig = self.parse_document(at, &config_body, "image config")?;
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(self.invalid(
                at,
                format!(
                    "the manifest has {} layers but the config lists {} diff IDs",
                    manifest.layers.len(),
                    diff_ids.len()
                ),
            ));
        }
        let chain_ids = config.chain_ids();

        self.unpack_layers(at, lease, manifest, diff_ids, &chain_ids, &source_label)
            .await?;
        self.record_image(
            at,
            lease,
            manifest_desc,
            manifest_body,
            manifest,
            index,
            chain_ids.last(),
            &source_label,
        )
        .await
    }

    fn parse_document<T: serde::de::DeserializeOwned>(
        &self,
        at: &Attempting<'_>,
        body: &[u8],
        what: &str,
    ) -> Result<T, PullError> {
        serde_json::from_slice(body)
            .map_err(|e| self.invalid(at, format!("the {what} does not parse: {e}")))
    }

    fn invalid(&self, at: &Attempting<'_>, what: String) -> PullError {
        PullError::InvalidImage {
            image: at.image.to_string(),
            what,
        }
    }

    async fn store_call<T>(
        &self,
        at: &Attempting<'_>,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, PullError> {
        call.await.map_err(|source| PullError::Store {
            image: at.image.to_string(),
            source,
        })
    }
}

/// The HTTP status of a registry error that means "these credentials won't do".
fn auth_status(e: &RegistryError) -> u16 {
    match e {
        RegistryError::Denied { .. } => 403,
        _ => 401,
    }
}

fn attempt_of(candidate: &Candidate, status: u16) -> Attempt {
    Attempt {
        key: candidate.key.clone(),
        source: candidate.source.clone(),
        kind: candidate.kind(),
        status,
    }
}

/// containerd's label recording where a blob came from:
/// `containerd.io/distribution.source.<host name>` = `<repository>`. containerd keys
/// it by host name without the port (a label key cannot hold ':').
fn distribution_source_label(reference: &Reference) -> (String, String) {
    (
        format!(
            "containerd.io/distribution.source.{}",
            reference.host_name()
        ),
        reference.path().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_by_normalised_reference_or_glob() {
        let settings = PullSettings {
            snapshotter: "overlayfs".into(),
            platform: PlatformSpec::host(),
            max_concurrent_downloads: 1,
            max_concurrent_unpacks: 1,
            max_concurrent_pulls: 0,
            lease_expiry: Duration::from_secs(60),
            pinned: vec!["busybox".into(), "registry.k8s.io/pause:*".into()],
            metrics: Arc::default(),
        };
        let pinned = |r: &str| settings.is_pinned(&Reference::parse(r).unwrap());
        assert!(pinned("docker.io/library/busybox:latest"));
        assert!(!pinned("busybox:1.36"));
        assert!(pinned("registry.k8s.io/pause:3.9"));
        assert!(!pinned("registry.k8s.io/pause-other:3.9"));
    }
}
