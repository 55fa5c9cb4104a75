//! The pull: for one image, walk sources × credentials until one works, then
//! fetch manifest, config and layers into the store, unpack, and write the image
//! records containerd's CRI writes. Concurrent pulls of the same image share one.
//!
//! Order of writes (DESIGN.md): everything under a lease; blobs, then snapshots,
//! then the config's snapshot label, manifest and index with their GC labels, and
//! the image records last, so containerd's CRI sees a complete image or none.

use crate::auth::{AuthError, Candidate, Keyring, RequestAuth};
use crate::digest::Digest;
use crate::metrics::{Metrics, PullMeter};
use crate::oci::{self, Descriptor, ImageConfig, Index, Manifest, ManifestKind};
use crate::platform::PlatformSpec;
use crate::policy::short_names::Resolution;
use crate::policy::{Blocked, Candidates, Policy, ShortNameError, Source, SourceKind};
use crate::progress::{Progress, PullProgress};
use crate::reference::Reference;
use crate::registry::{Credential, Endpoint, RegistryClient, RegistryError};
use crate::reload::Reloading;
use crate::signature;
use crate::store::{
    ImageRecord, ImageStore, Ingest, Labels, Lease, StoreError, LABEL_CRI_MANAGED, LABEL_PINNED,
    LABEL_UNCOMPRESSED,
};
use crate::trust_policy::{Pending, Refusal, TrustPolicy};
use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

mod stage;
mod warm;

/// Manifests and configs above this size are refused.
const MAX_DOCUMENT_BYTES: u64 = crate::catalog::MAX_DOCUMENT_BYTES;
/// The most layers an image may have. Real images have tens; overlayfs itself stops
/// stacking long before this.
const MAX_LAYERS: usize = 1000;
/// How long a failed pull's lease deletion is retried while containerd is away.
const RELEASE_RETRY_FOR: Duration = Duration::from_secs(30 * 60);
/// Times a blob download is resumed after the connection broke mid-body.
const BLOB_RESUMES: usize = 3;

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
    slots: Option<tokio::sync::Semaphore>,
    /// Every pull in flight, for the status socket.
    progress: Arc<Progress>,
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
                    .then(|| tokio::sync::Semaphore::new(settings.max_concurrent_pulls)),
                settings,
                inflight: Mutex::new(HashMap::new()),
                progress: Progress::new(),
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
    async fn slot(&self, reference: &Reference) -> Option<tokio::sync::SemaphorePermit<'_>> {
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

    /// One try at one source with one credential. Returns (image ID, target).
    async fn pull_from(&self, at: &Attempting<'_>) -> Result<(Digest, Descriptor), PullError> {
        // An image already here costs one manifest HEAD, as with containerd.
        if let Some(done) = self.warm_pull(at).await? {
            return Ok(done);
        }
        let endpoint = &at.source.endpoint;
        let repo = at.source.reference.path();
        let reg_err = |source: RegistryError| PullError::Registry {
            image: at.image.to_string(),
            registry: endpoint.host.clone(),
            source: Box::new(source),
        };
        let top = self
            .registry
            .fetch_manifest(
                endpoint,
                repo,
                &at.source.reference.manifest_reference(),
                at.credential,
            )
            .await
            .map_err(reg_err)?;
        let (manifest_desc, manifest_body, index) =
            match oci::manifest_kind(&top.descriptor.media_type) {
                ManifestKind::Index => {
                    let index: Index = self.parse_document(at, &top.body, "image index")?;
                    let Some(child) = self.settings.platform.select(&index.manifests) else {
                        return Err(PullError::NoMatchingPlatform {
                            image: at.image.to_string(),
                            wanted: self.settings.platform.to_string(),
                            available: index
                                .manifests
                                .iter()
                                .filter_map(|d| d.platform.as_ref())
                                .map(|p| match &p.variant {
                                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                                    None => format!("{}/{}", p.os, p.architecture),
                                })
                                .collect(),
                        });
                    };
                    let fetched = self
                        .registry
                        .fetch_manifest(endpoint, repo, &child.digest.to_string(), at.credential)
                        .await
                        .map_err(reg_err)?;
                    if oci::manifest_kind(&fetched.descriptor.media_type) != ManifestKind::Manifest
                    {
                        return Err(self.invalid(
                            at,
                            format!(
                                "index entry {} is a {}, not an image manifest",
                                child.digest, fetched.descriptor.media_type
                            ),
                        ));
                    }
                    (fetched.descriptor, fetched.body, Some((top, index)))
                }
                ManifestKind::Manifest => (top.descriptor, top.body, None),
                ManifestKind::Schema1 | ManifestKind::Unknown => {
                    return Err(reg_err(RegistryError::Unsupported {
                        media_type: top.descriptor.media_type.clone(),
                        why: "not an OCI or Docker schema 2 image",
                    }))
                }
            };
        // Signatures are judged on the platform manifest, before anything is written.
        self.verify_signatures(
            at,
            &manifest_desc.digest,
            &manifest_body,
            index.as_ref().map(|(top, _)| &top.descriptor.digest),
        )
        .await?;
        let manifest: Manifest = self.parse_document(at, &manifest_body, "image manifest")?;
        // The config is read whole: refuse an absurd one before downloading it.
        if manifest.config.size > MAX_DOCUMENT_BYTES {
            return Err(self.invalid(
                at,
                format!(
                    "the config {} is {} bytes; at most {MAX_DOCUMENT_BYTES} are accepted",
                    manifest.config.digest, manifest.config.size
                ),
            ));
        }
        // Each layer becomes a snapshot: a hostile manifest must not make thousands.
        if manifest.layers.len() > MAX_LAYERS {
            return Err(self.invalid(
                at,
                format!(
                    "the manifest lists {} layers; at most {MAX_LAYERS} are accepted",
                    manifest.layers.len()
                ),
            ));
        }
        if let Some(bad) = manifest
            .layers
            .iter()
            .find(|l| !oci::is_layer(&l.media_type))
        {
            return Err(self.invalid(
                at,
                format!(
                    "layer {} has media type {:?}, which cannot be unpacked",
                    bad.digest, bad.media_type
                ),
            ));
        }

        let target_digest = index
            .as_ref()
            .map_or(&manifest_desc.digest, |(top, _)| &top.descriptor.digest);
        if self.already_pulled(at, target_digest, &manifest).await? {
            let target = index.map_or(manifest_desc, |(top, _)| top.descriptor);
            tracing::debug!(image = %at.image, "already pulled; nothing to write");
            return Ok((
                manifest.config.digest.clone(),
                Descriptor::new(target.media_type, target.digest, target.size),
            ));
        }

        at.progress.downloading(&manifest);
        let lease = self
            .store_call(at, self.store.create_lease(self.settings.lease_expiry))
            .await?;
        let cleanup = LeaseCleanup {
            store: self.store.clone(),
            lease: Some(lease.clone()),
            ingests: std::iter::once(ingest_ref("config", &manifest.config.digest))
                .chain(
                    manifest
                        .layers
                        .iter()
                        .map(|l| ingest_ref("layer", &l.digest)),
                )
                .collect(),
        };
        let result = self
            .fetch_and_unpack(at, &lease, &manifest_desc, manifest_body, &manifest, index)
            .await;
        cleanup.run(result.is_err()).await;
        result
    }

    /// Enforces policy.json's signature requirements (if any) on the platform
    /// manifest `digest` with body `manifest`, reached through the index `index`.
    async fn verify_signatures(
        &self,
        at: &Attempting<'_>,
        digest: &Digest,
        manifest: &Bytes,
        index: Option<&Digest>,
    ) -> Result<(), PullError> {
        if at.signatures.pending.is_empty() {
            return Ok(());
        }
        let registry = signature::fetch::Registry {
            client: &self.registry,
            endpoint: &at.source.endpoint,
            repository: at.source.reference.path(),
            credential: at.credential,
        };
        // As containers/image does, registries.d is looked up for the source
        // contacted (a mirror may keep its own lookaside).
        let sources = at
            .signatures
            .trust
            .registries_d()
            .sources_for(&at.source.reference);
        let pulled = signature::Pulled {
            digest,
            manifest,
            index,
        };
        let accepted = signature::enforce(
            &at.signatures.pending,
            &sources,
            &registry,
            at.image,
            pulled,
        )
        .await
        .map_err(|e| match e {
            signature::EnforceError::Refused(r) => PullError::Refused(r),
            signature::EnforceError::Unreadable(source) => PullError::Signatures {
                image: at.image.to_string(),
                source: Box::new(source),
            },
        })?;
        tracing::info!(image = %at.image, manifest = %digest, accepted = ?accepted, "signatures verified");
        Ok(())
    }

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

        // Layers download in parallel tasks. Each is staged (extracted in-house) as
        // soon as it lands, several at once; then committed in layer order.
        let mut downloads =
            self.spawn_downloads(at, lease, &manifest.layers, diff_ids, &source_label);
        let jobs = downloads
            .take_results()
            .into_iter()
            .enumerate()
            .map(|(i, downloaded)| stage::Job {
                layer: manifest.layers[i].clone(),
                diff_id: diff_ids[i].clone(),
                chain_id: chain_ids[i].clone(),
                downloaded,
            })
            .collect();
        let mut staging = stage::Staging::spawn(
            &self.store,
            &self.settings.snapshotter,
            jobs,
            self.settings.max_concurrent_unpacks,
        );
        let mut parent: Option<&Digest> = None;
        for i in 0..manifest.layers.len() {
            let staged = staging.take(i).await.map_err(|e| match e {
                stage::StageError::Download(e) => {
                    e.into_pull_error(at.image, &at.source.endpoint.host)
                }
                stage::StageError::Store(source) => PullError::Store {
                    image: at.image.to_string(),
                    source,
                },
                stage::StageError::Lost => PullError::Task {
                    image: at.image.to_string(),
                    detail: format!("the download or unpack of layer {i} ended without a result"),
                },
            })?;
            let layer = &manifest.layers[i];
            let unpack_started = Instant::now();
            let chain_id = &chain_ids[i];
            // Held first, then looked at: a snapshot of another image found here cannot
            // be collected before our records reference it.
            self.store_call(
                at,
                self.store
                    .lease_snapshot(lease, &self.settings.snapshotter, chain_id),
            )
            .await?;
            let exists = self
                .store_call(
                    at,
                    self.store
                        .snapshot_exists(&self.settings.snapshotter, chain_id),
                )
                .await?;
            if !exists {
                match staged {
                    // Staged and diff-ID-checked already: Prepare, move in, Commit.
                    stage::Staged::Ready(staged) => {
                        self.store_call(
                            at,
                            self.store.commit_staged(
                                lease,
                                &self.settings.snapshotter,
                                staged,
                                parent,
                                chain_id,
                            ),
                        )
                        .await?;
                    }
                    // The store checks the unpacked digest against the config's diff
                    // ID and commits nothing on a mismatch.
                    stage::Staged::Present | stage::Staged::Unsupported => {
                        self.store_call(
                            at,
                            self.store.apply_layer(
                                lease,
                                &self.settings.snapshotter,
                                layer,
                                &diff_ids[i],
                                parent,
                                chain_id,
                            ),
                        )
                        .await?;
                    }
                }
                tracing::debug!(layer = i, digest = %layer.digest, elapsed_ms = unpack_started.elapsed().as_millis() as u64, "layer unpacked");
            }
            at.progress.layer_unpacked();
            parent = Some(chain_id);
        }
        drop(downloads);

        // GC references: config → top snapshot; manifest → config and layers; index → manifests.
        if let Some(top) = chain_ids.last() {
            let mut labels = Labels::new();
            labels.insert(
                format!(
                    "containerd.io/gc.ref.snapshot.{}",
                    self.settings.snapshotter
                ),
                top.to_string(),
            );
            self.store_call(
                at,
                self.store.update_labels(&manifest.config.digest, labels),
            )
            .await?;
        }
        let mut labels = Labels::new();
        labels.insert(source_label.0.clone(), source_label.1.clone());
        labels.insert(
            "containerd.io/gc.ref.content.config".into(),
            manifest.config.digest.to_string(),
        );
        for (i, layer) in manifest.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.to_string(),
            );
        }
        self.write_document(at, lease, manifest_desc, manifest_body, "manifest", labels)
            .await?;
        let target = match index {
            Some((top, index)) => {
                let mut labels = Labels::new();
                labels.insert(source_label.0.clone(), source_label.1.clone());
                for (i, m) in index.manifests.iter().enumerate() {
                    labels.insert(
                        format!("containerd.io/gc.ref.content.m.{i}"),
                        m.digest.to_string(),
                    );
                }
                self.write_document(at, lease, &top.descriptor, top.body, "index", labels)
                    .await?;
                top.descriptor
            }
            None => manifest_desc.clone(),
        };

        // The records last: containerd's CRI learns of the image from these events.
        let target = Descriptor::new(
            target.media_type.clone(),
            target.digest.clone(),
            target.size,
        );
        let names = record_names(at.image, &target.digest, &manifest.config.digest);
        let mut labels = Labels::new();
        labels.insert(LABEL_CRI_MANAGED.to_string(), "managed".to_string());
        if self.settings.is_pinned(at.image) {
            labels.insert(LABEL_PINNED.to_string(), "pinned".to_string());
        }
        for name in names {
            let record = ImageRecord {
                name,
                target: target.clone(),
                labels: labels.clone(),
            };
            self.store_call(at, self.store.put_image(record)).await?;
        }
        Ok((manifest.config.digest.clone(), target))
    }

    /// Starts the layer downloads: at most `max_concurrent_downloads` at once, begun
    /// in manifest order, so the layer the next unpack needs is never queued behind a
    /// later one (tasks spawned all at once start in no useful order).
    fn spawn_downloads(
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
            results.push(result);
            jobs.push((layer.clone(), labels, done));
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
            for (layer, labels, done) in jobs {
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
                    )
                    .await;
                    if result.is_ok() {
                        progress.layer_stored();
                    }
                    drop(permit);
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

    async fn write_document(
        &self,
        at: &Attempting<'_>,
        lease: &Lease,
        desc: &Descriptor,
        body: Bytes,
        kind: &str,
        labels: Labels,
    ) -> Result<(), PullError> {
        let reference = ingest_ref(kind, &desc.digest);
        match self
            .store_call(at, self.store.open_writer(lease, &reference, desc))
            .await?
        {
            Ingest::Present => {
                self.store_call(at, self.store.update_labels(&desc.digest, labels))
                    .await
            }
            Ingest::Writer(mut w) => {
                let offset = usize::try_from(w.offset())
                    .unwrap_or(usize::MAX)
                    .min(body.len());
                self.store_call(at, w.write(body.slice(offset..))).await?;
                self.store_call(at, w.commit(labels)).await
            }
        }
    }

    /// Whether the image is already whole here: every record we would write names
    /// this target as ours, the config is stored and its top snapshot is unpacked.
    /// A warm pull then writes nothing (and takes no lease).
    async fn already_pulled(
        &self,
        at: &Attempting<'_>,
        target: &Digest,
        manifest: &Manifest,
    ) -> Result<bool, PullError> {
        let pinned = self.settings.is_pinned(at.image);
        for name in record_names(at.image, target, &manifest.config.digest) {
            let record = self.store_call(at, self.store.get_image(&name)).await?;
            let label = |r: &ImageRecord, key: &str, value: &str| {
                r.labels.get(key).is_some_and(|v| v == value)
            };
            // A newly pinned image gets its records written again, with the label.
            let ours = record.is_some_and(|r| {
                &r.target.digest == target
                    && label(&r, LABEL_CRI_MANAGED, "managed")
                    && (!pinned || label(&r, LABEL_PINNED, "pinned"))
            });
            if !ours {
                return Ok(false);
            }
        }
        let config = match self
            .store
            .read_content(&manifest.config.digest, MAX_DOCUMENT_BYTES)
            .await
        {
            Ok(body) => body,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(source) => {
                return Err(PullError::Store {
                    image: at.image.to_string(),
                    source,
                })
            }
        };
        let Ok(config) = serde_json::from_slice::<ImageConfig>(&config) else {
            return Ok(false);
        };
        match config.chain_ids().last() {
            Some(top) => {
                self.store_call(
                    at,
                    self.store.snapshot_exists(&self.settings.snapshotter, top),
                )
                .await
            }
            None => Ok(false),
        }
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

/// The image records containerd's CRI writes for a pull: `name:tag` (when pulled
/// by tag), `name@<target digest>` and the image ID.
fn record_names(image: &Reference, target: &Digest, config: &Digest) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(tagged) = image.tagged_name() {
        names.push(tagged);
    }
    names.push(image.digest_name(target));
    names.push(config.to_string());
    names
}

/// The stable ingest name of a blob (`layer-sha256:…`, as containerd names its own),
/// so an interrupted write is resumed rather than restarted.
fn ingest_ref(kind: &str, digest: &Digest) -> String {
    format!("{kind}-{digest}")
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

/// Releases a pull's lease when the pull is done, failed, or was dropped where it
/// stood (cancelled): what it wrote and no record references is collected.
struct LeaseCleanup {
    store: Arc<dyn ImageStore>,
    /// `None` once released.
    lease: Option<Lease>,
    /// The pull's ingest references (config, then layers).
    ingests: Vec<String>,
}

impl LeaseCleanup {
    /// After a failure, partial ingests are dropped too (downloads cancelled by the
    /// failure did not clean up after themselves), and containerd collects before
    /// this returns, so a failed pull leaves nothing behind.
    async fn run(mut self, failed: bool) {
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

/// The layer downloads of one pull, each result arriving on its own channel;
/// all of them are aborted if this is dropped unfinished.
struct Downloads {
    results: Vec<oneshot::Receiver<Result<(), BlobError>>>,
    dispatcher: JoinHandle<()>,
}

impl Downloads {
    /// Each layer's result channel, in manifest order (the downloads keep running
    /// until this is dropped).
    fn take_results(&mut self) -> Vec<oneshot::Receiver<Result<(), BlobError>>> {
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
enum BlobError {
    Registry(Box<RegistryError>),
    Store(StoreError),
}

impl BlobError {
    fn into_pull_error(self, image: &Reference, host: &str) -> PullError {
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
/// On giving up, the partial ingest is dropped.
#[allow(clippy::too_many_arguments)]
async fn fetch_blob(
    store: &Arc<dyn ImageStore>,
    registry: &RegistryClient,
    source: &Source,
    credential: Option<&Credential>,
    lease: &Lease,
    desc: &Descriptor,
    kind: &str,
    labels: Labels,
    progress: &PullProgress,
) -> Result<(), BlobError> {
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
) -> Result<(), BlobError> {
    // One writer for every try: it holds what arrived before a break (some of it not
    // yet sent to containerd), so the next request asks for the rest from there.
    let mut writer = match store
        .open_writer(lease, reference, desc)
        .await
        .map_err(BlobError::Store)?
    {
        Ingest::Present => {
            progress.add_bytes(desc.size);
            return Ok(());
        }
        Ingest::Writer(w) => w,
    };
    progress.add_bytes(writer.offset());
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
                    writer.write(bytes).await.map_err(BlobError::Store)?
                }
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        match broken {
            None => return writer.commit(labels).await.map_err(BlobError::Store),
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
