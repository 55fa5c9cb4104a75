//! Integration-test harness: real containerd, real docker-registry instances, test
//! images built in Rust, an in-process token server, and the cri-imaged daemon.
//!
//! # Layout
//!
//! - [`containerd`]: a private containerd (CRI plugin enabled) in a temp dir.
//! - [`registry`]: docker-registry 2.8 instances: open HTTP, TLS + htpasswd, TLS + token.
//! - [`token`]: the token server the token registries delegate to (docker token spec).
//! - [`tls`]: a throwaway CA and the certificates/keys issued from it (openssl CLI).
//! - [`images`]: OCI image layouts built here and pushed with skopeo.
//! - [`cri`]: a tonic CRI client over a unix socket, and the cri-imaged `Daemon`.
//! - [`records`]: containerd's image records, content labels and snapshots, read with `ctr`.
//! - [`fake_registry`]: an in-process plain-HTTP registry that misbehaves on request.
//! - [`http_server`]: the in-process hyper server thread the token server and the fake run on.
//! - [`log`]: the daemon code's log at debug, captured in memory (one global subscriber).
//! - [`leftovers`]: what a failed pull must not leave in containerd; daemon health.
//! - [`proxy`]: an HTTP CONNECT proxy that records the tunnels asked of it.
//! - [`prometheus`]: a real Prometheus scraping the daemon, `promtool check metrics`,
//!   and a plain HTTP GET for `/metrics`.
//! - [`bench`]: what the benchmarks share (knobs, medians, `sync`).
//! - [`scenario`]: the shared steps: start containerd and registries, pull, ImageStatus.
//! - [`clients`]: stock gRPC clients (grpc-go as kubelet dials, Python grpcio) built
//!   under target/ and run over a CRI socket; a recorder of the headers they send.
//!
//! Every instance owns its temp dir and ports, so tests run in parallel. Anything that
//! cannot start fails the test with an install hint; nothing is skipped.
#![allow(dead_code)]

pub mod bench;
pub mod clients;
pub mod containerd;
pub mod cri;
pub mod fake_registry;
pub mod http_server;
pub mod images;
pub mod leftovers;
pub mod log;
pub mod prometheus;
pub mod proxy;
pub mod records;
pub mod registry;
pub mod scenario;
pub mod signing;
pub mod tls;
pub mod token;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Everything that can go wrong while setting up the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("`{tool}` is not installed; install with: apt-get install {package} (or run scripts/install-deps.sh)")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{what} not ready after {waited:?}; its log:\n{log}")]
    NotReady {
        what: String,
        waited: Duration,
        log: String,
    },
    #[error("{what} exited early ({status}); its log:\n{log}")]
    ExitedEarly {
        what: String,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("PEM in {path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("token signing key: {0}")]
    SigningKey(ring::error::KeyRejected),
    #[error("the system random number generator failed")]
    Random,
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Attaches what was being done to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| HarnessError::Io {
            what: what(),
            source,
        })
    }
}

/// Fails with an install hint unless `tool` is on PATH.
pub fn require_tool(tool: &'static str, package: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .ok_or(HarnessError::MissingTool { tool, package })
}

/// Runs a command to completion and fails unless it exits 0.
pub fn run(command: &mut Command) -> Result<Output> {
    let shown = format!("{command:?}");
    let output = command.output().ctx(|| format!("running {shown}"))?;
    if !output.status.success() {
        return Err(HarnessError::CommandFailed {
            command: shown,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output)
}

/// Starts `command` (named `what` in errors) with stdin closed and stdout and stderr
/// both going to a new file at `log`.
pub fn spawn_logged(command: &mut Command, log: &Path, what: &str) -> Result<Child> {
    let log_file = std::fs::File::create(log).ctx(|| format!("creating {}", log.display()))?;
    let stdout = log_file
        .try_clone()
        .ctx(|| format!("opening {}", log.display()))?;
    command
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(log_file)
        .spawn()
        .ctx(|| format!("starting {what}"))
}

/// Polls `ready` every 20 ms until it returns `Some`, `child` exits, or `limit` passes.
/// The limit only bounds a hang; nothing asserts on how long it took.
pub fn wait_ready<T>(
    what: &str,
    child: &mut Child,
    log: &Path,
    limit: Duration,
    mut ready: impl FnMut() -> Option<T>,
) -> Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = ready() {
            return Ok(value);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HarnessError::ExitedEarly {
                what: what.to_owned(),
                status,
                log: read_log(log),
            });
        }
        if started.elapsed() > limit {
            return Err(HarnessError::NotReady {
                what: what.to_owned(),
                waited: limit,
                log: read_log(log),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A log file's content, or a note saying why it could not be read.
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// Every process in /proc, with its /proc directory (none if /proc cannot be read).
pub fn processes() -> Vec<(rustix::process::Pid, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            Some((rustix::process::Pid::from_raw(pid)?, entry.path()))
        })
        .collect()
}

/// Stops a child we started: SIGTERM, then SIGKILL if it is still there after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = rustix::process::Pid::from_child(child);
    // The error case is "already gone", which is what we want anyway.
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let started = Instant::now();
    while started.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Unwraps a harness result, turning the error (with its install hint or log) into
/// the test failure message.
pub fn must<T>(result: Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("test harness: {e}"))
}

/// User + system CPU seconds of process `pid`, all threads (`/proc/PID/stat` fields
/// 14 and 15, in clock ticks of 1/100 s on Linux).
pub fn cpu_seconds(pid: u32) -> f64 {
    const TICKS_PER_SECOND: f64 = 100.0;
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    // The command name (field 2) may hold spaces; the fields after it do not.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> f64 {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{path}: no CPU time in field {}", i + 3)) as f64
    };
    // Field 3 (state) is index 0 here: utime is field 14, stime field 15.
    (ticks(11) + ticks(12)) / TICKS_PER_SECOND
}
