//! Prometheus metrics (`[metrics] listen`): the series cri-imaged exports, recorded by
//! one-line calls from the pull path, rendered in the text exposition format 0.0.4.
//!
//! - [`family`]: counters, gauges and histograms with labels, and their rendering.
//! - [`process`]: the standard `process_*` series from `/proc/self`.
//! - [`store`]: an [`ImageStore`](crate::store::ImageStore) wrapper counting
//!   containerd call errors and blobs already in the content store.
//! - [`http`]: the `GET /metrics` endpoint.
//!
//! Written here rather than taken from the `prometheus` or `prometheus-client` crates:
//! the handful of types we need is ~200 lines, the latter renders OpenMetrics rather
//! than the classic format, and the former pulls in more than it would save.
//!
//! Label values are bounded: registry hosts, `mirror`/`origin`, failure classes,
//! credential source kinds, store operations. Never an image name, a credential key,
//! a username or a secret.

pub mod family;
pub mod http;
pub mod process;
pub mod store;

use crate::auth::Candidate;
use crate::policy::Source;
use crate::puller::{PullError, Pulled};
use crate::reference::Reference;
use crate::registry::RegistryError;
use family::{Counter, Family, Gauge, GaugeGuard, Histogram};
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the pull duration buckets, in seconds: a warm pull takes
/// milliseconds, a cold pull of a large image minutes.
static PULL_SECONDS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Every series the daemon exports; one per process, shared by `Arc`.
pub struct Metrics {
    pulls: Family<Counter, 3>,
    pull_duration: Family<Histogram, 1>,
    pulls_in_flight: Family<Gauge, 0>,
    pulls_queued: Family<Gauge, 0>,
    bytes: Family<Counter, 1>,
    blob_cache_hits: Family<Counter, 1>,
    credential_attempts: Family<Counter, 2>,
    retries: Family<Counter, 1>,
    stalls: Family<Counter, 1>,
    containerd_errors: Family<Counter, 2>,
    /// Registry hosts given their own label value so far (at most [`MAX_HOSTS`]).
    hosts: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Distinct registry hosts labelled by name; later ones share `other`, so a pod
/// spec naming random hosts cannot grow the series without bound.
pub const MAX_HOSTS: usize = 64;

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            pulls: Family::new(
                "cri_imaged_pulls_total",
                "Image pulls finished, by result (success or the failure's class), the registry host and kind of source (mirror, origin) that served or last failed them; source \"none\" when no registry was contacted.",
                ["result", "registry", "source"],
                Counter::default,
            ),
            pull_duration: Family::new(
                "cri_imaged_pull_duration_seconds",
                "Time taken by successful pulls from taking a pull slot to the image records written, by the registry host that served them.",
                ["registry"],
                || Histogram::new(&PULL_SECONDS),
            ),
            pulls_in_flight: Family::new(
                "cri_imaged_pulls_in_flight",
                "Pulls running now.",
                [],
                Gauge::default,
            ),
            pulls_queued: Family::new(
                "cri_imaged_pulls_queued",
                "Pulls waiting for a slot (pull.max_concurrent_pulls).",
                [],
                Gauge::default,
            ),
            bytes: Family::new(
                "cri_imaged_downloaded_bytes_total",
                "Blob bytes received from registries, by registry host.",
                ["registry"],
                Counter::default,
            ),
            blob_cache_hits: Family::new(
                "cri_imaged_blob_cache_hits_total",
                "Blobs a pull needed that containerd's content store already held, so they were not downloaded, by kind (layer, config, manifest, index).",
                ["kind"],
                Counter::default,
            ),
            credential_attempts: Family::new(
                "cri_imaged_credential_attempts_total",
                "Credentials presented to registries, by outcome (accepted, refused) and where they came from (pull_secret: the request's, config_file, provider, anonymous).",
                ["outcome", "source"],
                Counter::default,
            ),
            retries: Family::new(
                "cri_imaged_registry_retries_total",
                "Registry requests retried after a transient failure (dropped connection, 5xx, 429) and blob downloads resumed, by registry host.",
                ["registry"],
                Counter::default,
            ),
            stalls: Family::new(
                "cri_imaged_registry_stalls_total",
                "Pull attempts given up because the registry stalled (pull.progress_timeout, pull.min_bytes_per_second), by registry host.",
                ["registry"],
                Counter::default,
            ),
            containerd_errors: Family::new(
                "cri_imaged_containerd_errors_total",
                "containerd calls that failed, by operation and error kind (\"not found\" answers are not errors).",
                ["operation", "kind"],
                Counter::default,
            ),
            hosts: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The `registry` label value for `host`: the host itself, or `other` once
    /// [`MAX_HOSTS`] other hosts have their own.
    fn host_label(&self, host: &str) -> String {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if hosts.contains(host) {
            return host.to_string();
        }
        if hosts.len() < MAX_HOSTS {
            hosts.insert(host.to_string());
            return host.to_string();
        }
        "other".to_string()
    }

    /// Every series, process metrics included, in the text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.pulls.render(&mut out);
        self.pull_duration.render(&mut out);
        self.pulls_in_flight.render(&mut out);
        self.pulls_queued.render(&mut out);
        self.bytes.render(&mut out);
        self.blob_cache_hits.render(&mut out);
        self.credential_attempts.render(&mut out);
        self.retries.render(&mut out);
        self.stalls.render(&mut out);
        self.containerd_errors.render(&mut out);
        process::render(&mut out);
        out
    }

    /// A pull waiting for a slot, until the guard is dropped.
    pub fn pull_queued(&self) -> GaugeGuard {
        self.pulls_queued.with([]).hold()
    }

    /// A pull has begun; [`PullMeter::finish`] counts it when it ends.
    pub fn pull_started(&self) -> PullMeter<'_> {
        PullMeter {
            metrics: self,
            started: Instant::now(),
            _in_flight: self.pulls_in_flight.with([]).hold(),
            source: Mutex::new(None),
        }
    }

    /// A credential presented to a registry was accepted or refused.
    pub fn credential_attempt(&self, candidate: &Candidate, accepted: bool) {
        let outcome = if accepted { "accepted" } else { "refused" };
        self.credential_attempts
            .with([outcome, credential_source_kind(&candidate.source)])
            .inc();
    }

    /// A request to `registry` is sent again after a transient failure.
    pub fn registry_retry(&self, registry: &str) {
        self.retries.with([&self.host_label(registry)]).inc();
    }

    /// The counter of blob bytes received from `registry`.
    pub fn downloaded_bytes(&self, registry: &str) -> Counter {
        self.bytes.with([&self.host_label(registry)])
    }

    fn blob_cache_hit(&self, kind: &str) {
        self.blob_cache_hits.with([kind]).inc();
    }

    fn containerd_error(&self, operation: &str, kind: &str) {
        self.containerd_errors.with([operation, kind]).inc();
    }
}

/// One pull from its start to its end: holds the in-flight gauge, and remembers the
/// source tried last, to label the result with.
pub struct PullMeter<'a> {
    metrics: &'a Metrics,
    started: Instant,
    _in_flight: GaugeGuard,
    source: Mutex<Option<(String, &'static str)>>,
}

impl PullMeter<'_> {
    /// The attempt at `source` ended with `result`: it labels the pull's result
    /// unless a later source is tried; a stall is counted against its registry.
    pub fn tried<T>(&self, source: &Source, result: &Result<T, PullError>) {
        if let Err(e) = result {
            if matches!(registry_error(e), Some(RegistryError::Stalled { .. })) {
                let host = self.metrics.host_label(&source.endpoint.host);
                self.metrics.stalls.with([&host]).inc();
            }
        }
        let kind = match source.kind {
            crate::policy::SourceKind::Mirror => "mirror",
            crate::policy::SourceKind::Origin => "origin",
        };
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((source.endpoint.host.clone(), kind));
    }

    /// Counts the pull of `image`; a success also times it.
    pub fn finish(self, image: &Reference, result: &Result<Pulled, PullError>) {
        let (registry, source) = self
            .source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| (image.registry_host().to_string(), "none"));
        let registry = self.metrics.host_label(&registry);
        let outcome = match result {
            Ok(_) => "success",
            Err(e) => failure_class(e),
        };
        self.metrics.pulls.with([outcome, &registry, source]).inc();
        if result.is_ok() {
            self.metrics
                .pull_duration
                .with([&registry])
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

/// Where a credential came from, as a label value: the `source` of a
/// [`Candidate`] is `request`, `provider:<name>`, `anonymous` or a file's path.
fn credential_source_kind(source: &str) -> &'static str {
    match source {
        "request" => "pull_secret",
        "anonymous" => "anonymous",
        s if s.starts_with("provider:") => "provider",
        _ => "config_file",
    }
}

/// The registry error behind a pull failure, if it was one.
fn registry_error(e: &PullError) -> Option<&RegistryError> {
    match e {
        PullError::Registry { source, .. } => Some(source),
        PullError::Sources { last, .. } => registry_error(last),
        PullError::Candidates { last, .. } => registry_error(last),
        _ => None,
    }
}

/// A failed pull's class: a small fixed set of label values, following the gRPC code
/// mapping in `cri::convert` but finer where an operator acts differently.
pub fn failure_class(e: &PullError) -> &'static str {
    match e {
        PullError::Auth(_) | PullError::ShortName(_) => "invalid_request",
        PullError::Registry { source, .. } => registry_failure_class(source),
        PullError::Unauthorized {
            forbidden: true, ..
        } => "forbidden",
        PullError::Unauthorized { .. } => "unauthorized",
        PullError::NoMatchingPlatform { .. } => "no_matching_platform",
        PullError::InvalidImage { .. } => "invalid_image",
        PullError::Store { .. } => "containerd",
        PullError::Task { .. } => "internal",
        PullError::Cancelled { .. } => "cancelled",
        PullError::Blocked(_) => "blocked",
        PullError::Refused(r) if r.is_signature() => "signature_refused",
        PullError::Refused(_) => "policy_refused",
        PullError::Signatures { .. } => "signatures_unreadable",
        PullError::Sources { last, .. } => failure_class(last),
        PullError::Candidates { last, .. } => failure_class(last),
    }
}

fn registry_failure_class(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::Unreachable { .. }
        | RegistryError::Interrupted { .. }
        | RegistryError::TooManyRedirects { .. }
        | RegistryError::BadResponse { .. } => "unavailable",
        RegistryError::Server { status, .. } if *status >= 500 => "unavailable",
        RegistryError::Stalled { .. } => "stalled",
        RegistryError::Unauthorized { .. } => "unauthorized",
        RegistryError::Denied { .. } => "forbidden",
        RegistryError::NotFound { .. } => "not_found",
        RegistryError::TooManyRequests { .. } => "rate_limited",
        RegistryError::DigestMismatch { .. } | RegistryError::SizeMismatch { .. } => {
            "digest_mismatch"
        }
        RegistryError::Unsupported { .. } | RegistryError::ManifestTooLarge { .. } => {
            "invalid_image"
        }
        RegistryError::InsecureUrl { .. }
        | RegistryError::DowngradeRedirect { .. }
        | RegistryError::TrustStore { .. }
        | RegistryError::Tls(_) => "tls",
        RegistryError::InvalidReference { .. } | RegistryError::InvalidUrl { .. } => {
            "invalid_request"
        }
        RegistryError::Server { .. } | RegistryError::OffsetBeyondEnd { .. } => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_sources_map_to_bounded_kinds() {
        for (source, kind) in [
            ("request", "pull_secret"),
            ("anonymous", "anonymous"),
            ("provider:ecr-credential-provider", "provider"),
            ("/var/lib/kubelet/config.json", "config_file"),
            ("/etc/pull-secrets/global/.dockerconfigjson", "config_file"),
        ] {
            assert_eq!(credential_source_kind(source), kind, "{source}");
        }
    }

    #[test]
    fn failures_are_classed_through_the_source_list() {
        let stalled = PullError::Registry {
            image: "r.io/a:1".into(),
            registry: "r.io".into(),
            source: Box::new(RegistryError::Stalled {
                host: "r.io".into(),
                what: "blob".into(),
                received: 1,
                why: String::new(),
            }),
        };
        assert_eq!(failure_class(&stalled), "stalled");
        let listed = PullError::Sources {
            failed: Vec::new(),
            last: Box::new(stalled),
        };
        assert_eq!(failure_class(&listed), "stalled");
        assert!(registry_error(&listed).is_some());
    }

    #[test]
    fn pulls_are_counted_once_with_the_last_source_and_timed_on_success() {
        let metrics = Metrics::new();
        let image = Reference::parse("r.io/app:1").unwrap();
        let meter = metrics.pull_started();
        assert_eq!(metrics.pulls_in_flight.with([]).get(), 1);
        let refused = PullError::Blocked(crate::policy::Blocked {
            image: "r.io/app:1".into(),
            path: "/etc/containers/registries.conf".into(),
            prefix: "r.io".into(),
            mirrors_skipped: 0,
            by_digest: false,
        });
        meter.finish(&image, &Err(refused));
        assert_eq!(metrics.pulls_in_flight.with([]).get(), 0);
        assert_eq!(metrics.pulls.with(["blocked", "r.io", "none"]).get(), 1);
        for i in 0..MAX_HOSTS + 10 {
            metrics.registry_retry(&format!("host-{i}.example"));
        }
        assert_eq!(
            metrics.retries.with(["other"]).get(),
            11,
            "r.io and 63 more have names"
        );
        let text = metrics.render();
        assert!(
            text.contains(
                "cri_imaged_pulls_total{result=\"blocked\",registry=\"r.io\",source=\"none\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("\ncri_imaged_pulls_queued 0\n"), "{text}");
        assert!(
            !text.contains("cri_imaged_pull_duration_seconds_count"),
            "failures are not timed: {text}"
        );
    }
}
