//! Live pull progress against the real daemon and a real containerd, during a pull
//! the fake registry throttles: the status socket's JSON as bytes arrive,
//! `cri-imaged pulls --watch` read off a real terminal (tmux), and the plain output
//! when stdout is not a terminal; and a pull waiting for a slot shown as queued.
//! Waits are bounded; no time is asserted.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::cri::{Daemon, DaemonConfig};
use common::fake_registry::{FakeRegistry, Faults};
use common::images::{self, OciImage};
use common::scenario::{containerd_without_cri, cri_pull};
use tokio::task::JoinHandle;
use tonic::Status;

/// What bounds every wait (only a hang hits it).
const LIMIT: Duration = Duration::from_secs(60);
const CLI: &str = env!("CARGO_BIN_EXE_cri-imaged");

/// A daemon whose registry trickles the image's largest layer (in about 60 steps of
/// 100 ms, so the pull lasts several seconds).
struct Throttled {
    fake: FakeRegistry,
    image: OciImage,
    reference: String,
    daemon: Daemon,
    _containerd: Containerd,
}

impl Throttled {
    fn start(repo: &str) -> Throttled {
        let fake = FakeRegistry::start();
        let image = images::busybox().build();
        let reference = fake.serve_image(&image, repo);
        let layer = image.host().layers[0].clone();
        let step = (layer.size as usize / 60).max(1024);
        fake.set_faults(Faults {
            trickle_blobs: vec![(layer.digest, step)],
            ..Default::default()
        });
        let containerd = containerd_without_cri();
        let daemon = DaemonConfig::new(&containerd)
            .registries_conf(&fake.insecure_entry())
            .start();
        Throttled {
            fake,
            image,
            reference,
            daemon,
            _containerd: containerd,
        }
    }

    /// Starts PullImage in the background.
    fn pull(&self) -> JoinHandle<Result<String, Status>> {
        let socket = self.daemon.socket().to_path_buf();
        let reference = self.reference.clone();
        tokio::spawn(async move { cri_pull(&socket, &reference, None).await })
    }

    /// Waits for the pull to succeed.
    async fn finish(&self, pull: JoinHandle<Result<String, Status>>) {
        let id = tokio::time::timeout(LIMIT, pull)
            .await
            .expect("the pull ends")
            .expect("the pull task")
            .unwrap_or_else(|s| panic!("{s}\n{}", self.daemon.log()));
        assert_eq!(id, self.image.host().config.digest);
    }

    fn layers(&self) -> usize {
        self.image.host().layers.len()
    }
}

/// `GET /pulls` over the status socket, spoken by hand (HTTP/1.1, as curl would):
/// the JSON body of a 200 with `Content-Type: application/json`.
fn get_pulls(socket: &Path) -> serde_json::Value {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    stream
        .write_all(b"GET /pulls HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("sending the request");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("reading the answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {answer:?}"));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The entry for `image` in a `GET /pulls` answer.
fn entry<'a>(pulls: &'a serde_json::Value, image: &str) -> Option<&'a serde_json::Value> {
    pulls["pulls"]
        .as_array()
        .expect("`pulls` is a list")
        .iter()
        .find(|p| p["image"] == image)
}

/// Polls `probe` every 100 ms until it returns `Some`; panics with `what` and the
/// last thing seen after `LIMIT`.
async fn poll<T>(what: &str, mut probe: impl FnMut() -> (Option<T>, String)) -> T {
    let started = Instant::now();
    loop {
        let (found, seen) = probe();
        if let Some(found) = found {
            return found;
        }
        assert!(started.elapsed() < LIMIT, "{what}; last seen:\n{seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_socket_reports_a_throttled_pull_as_bytes_arrive() {
    let t = Throttled::start("progress/json");
    let socket = t.daemon.status_socket();
    let mode = std::fs::metadata(&socket)
        .expect("the status socket")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o660,
        "mode of {}",
        socket.display()
    );
    let idle = get_pulls(&socket);
    assert_eq!(idle, serde_json::json!({"pulls": []}));

    let pull = t.pull();
    let downloading = |pulls: &serde_json::Value| {
        entry(pulls, &t.reference)
            .filter(|p| p["state"] == "downloading" && p["bytes"]["done"].as_u64() > Some(0))
            .cloned()
    };
    let first = poll("the pull shows as downloading", || {
        let pulls = get_pulls(&socket);
        (downloading(&pulls), pulls.to_string())
    })
    .await;
    let host = t.image.host();
    assert_eq!(first["source"]["registry"], t.fake.host(), "{first}");
    assert_eq!(first["source"]["kind"], "origin", "{first}");
    assert_eq!(first["layers"]["total"], t.layers(), "{first}");
    assert_eq!(first["bytes"]["total"], host.content_size(), "{first}");
    assert!(
        first["layers"]["done"].as_u64() < Some(t.layers() as u64),
        "{first}"
    );
    assert!(
        first["started"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{first}"
    );
    let bytes = |p: &serde_json::Value| p["bytes"]["done"].as_u64().unwrap_or_default();

    // The same pull, further along: the counter moves while the layer trickles in.
    let later = poll("the pull's bytes grow", || {
        let pulls = get_pulls(&socket);
        let grown = downloading(&pulls).filter(|p| bytes(p) > bytes(&first));
        (grown, pulls.to_string())
    })
    .await;
    assert_eq!(later["id"], first["id"], "{later}");
    assert!(bytes(&later) <= host.content_size(), "{later}");

    t.finish(pull).await;
    assert_eq!(get_pulls(&socket), serde_json::json!({"pulls": []}));
}

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: PathBuf,
    session: &'static str,
    _dir: tempfile::TempDir,
}

impl Tmux {
    /// Runs `command` (a shell command line) in a detached 160×40 session.
    fn start(command: &str) -> Tmux {
        common::must(common::require_tool("tmux", "tmux"));
        let dir = tempfile::tempdir().expect("a temp dir");
        let tmux = Tmux {
            socket: dir.path().join("tmux.sock"),
            session: "pulls",
            _dir: dir,
        };
        common::must(common::run(tmux.command().args([
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "40",
            "-s",
            tmux.session,
            command,
        ])));
        tmux
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command.arg("-S").arg(&self.socket);
        command
    }

    /// The text on the screen.
    fn screen(&self) -> String {
        let output = common::must(common::run(self.command().args([
            "capture-pane",
            "-p",
            "-t",
            self.session,
        ])));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").output();
    }
}

/// The row for `image` in a `pulls --watch` screen, split into its cells: image,
/// source kind, registry, state, layers, bytes, rate, ETA, bar, percentage.
fn row(screen: &str, image: &str) -> Option<Vec<String>> {
    let line = screen
        .lines()
        .find(|l| l.split_whitespace().next() == Some(image))?;
    Some(line.split_whitespace().map(str::to_owned).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_watch_redraws_a_progress_bar_in_a_terminal() {
    let t = Throttled::start("progress/watch");
    // The socket comes from the daemon's config; a failure stays on screen.
    let tmux = Tmux::start(&format!(
        "{CLI} pulls --watch --interval 200ms --config {} 2>&1; echo \"pulls exited: $?\"; sleep 600",
        t.daemon.config_path().display()
    ));
    poll("the idle screen", || {
        let screen = tmux.screen();
        (screen.contains("no pulls in flight").then_some(()), screen)
    })
    .await;

    let pull = t.pull();
    let layers_total = format!("/{}", t.layers());
    let downloading = |screen: &str| {
        row(screen, &t.reference).filter(|cells| cells.len() == 10 && cells[3] == "downloading")
    };
    let first = poll("a row for the pull with a bar", || {
        let screen = tmux.screen();
        (downloading(&screen), screen)
    })
    .await;
    assert_eq!(
        first[0..3],
        [t.reference.clone(), "origin".into(), t.fake.host()]
    );
    assert!(first[4].ends_with(&layers_total), "layers {first:?}");
    assert!(
        first[5].ends_with('B') && first[5].contains("B/"),
        "bytes done/total {first:?}"
    );
    let bar = &first[8];
    assert!(
        bar.starts_with('[')
            && bar.ends_with(']')
            && bar[1..bar.len() - 1].chars().all(|c| c == '#' || c == '-'),
        "bar {first:?}"
    );
    assert!(first[9].ends_with('%'), "percentage {first:?}");

    // Redrawn in place: the bytes change and the pull still has exactly one row.
    let screen = poll("the row redrawn with more bytes", || {
        let screen = tmux.screen();
        let moved = downloading(&screen).filter(|cells| cells[5] != first[5]);
        (moved.map(|_| screen.clone()), screen)
    })
    .await;
    let rows = screen.lines().filter(|l| l.contains(&t.reference)).count();
    assert_eq!(rows, 1, "one row per pull, redrawn in place:\n{screen}");
    assert_eq!(screen.matches("IMAGE").count(), 1, "one header:\n{screen}");

    t.finish(pull).await;
    let screen = poll("the screen says nothing is in flight", || {
        let screen = tmux.screen();
        let idle = screen.contains("no pulls in flight") && !screen.contains(&t.reference);
        (idle.then(|| screen.clone()), screen)
    })
    .await;
    assert!(!screen.contains("pulls exited"), "{screen}");
}

/// `cri-imaged pulls ARGS` with stdout a pipe: its stdout, which must not fail.
fn pulls_once(socket: &Path) -> String {
    let output = common::must(common::run(
        Command::new(CLI)
            .args(["pulls", "--status-socket"])
            .arg(socket),
    ));
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_without_a_terminal_print_plain_lines() {
    let t = Throttled::start("progress/plain");
    let socket = t.daemon.status_socket();
    assert_eq!(pulls_once(&socket), "no pulls in flight\n");

    // --watch into a pipe, read line by line on a thread.
    let mut watch = Command::new(CLI)
        .args(["pulls", "--watch", "--interval", "200ms", "--status-socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting cri-imaged pulls --watch");
    let stdout = watch.stdout.take().expect("piped stdout");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let pull = t.pull();
    let once = poll("the one-shot table shows the pull", || {
        let out = pulls_once(&socket);
        let row = row(&out, &t.reference).filter(|cells| cells[3] == "downloading");
        (row.map(|_| out.clone()), out)
    })
    .await;
    assert!(once.starts_with("IMAGE "), "{once}");
    assert!(!once.contains('\x1b'), "no escapes: {once:?}");
    t.finish(pull).await;

    // The watch printed a line for the pull, then said when it was idle again.
    let mut seen = Vec::new();
    let started = Instant::now();
    let wanted = |seen: &[String]| {
        let pulled = seen.iter().position(|l| {
            l.contains(&t.reference) && l.contains(" layers ") && l.contains(" bytes ")
        });
        pulled.is_some_and(|at| seen[at..].iter().any(|l| l.ends_with("no pulls in flight")))
    };
    while !wanted(&seen) {
        assert!(
            started.elapsed() < LIMIT,
            "watch output so far:\n{}",
            seen.join("\n")
        );
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    common::terminate(&mut watch, Duration::from_secs(2));
    let all = seen.join("\n");
    assert!(
        !all.contains('\x1b'),
        "no escapes when not a terminal: {all:?}"
    );
    let downloading: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains(&t.reference) && l.contains(" state downloading "))
        .collect();
    assert!(!downloading.is_empty(), "{all}");
    assert!(
        downloading
            .iter()
            .all(|l| l.contains(" layers ") && l.contains(&format!("/{} bytes ", t.layers()))),
        "{all}"
    );
    assert_eq!(pulls_once(&socket), "no pulls in flight\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_waiting_for_a_slot_shows_as_queued() {
    let fake = FakeRegistry::start();
    let first = images::busybox().app_text("first\n").build();
    let second = images::busybox().app_text("second\n").build();
    let first_ref = fake.serve_image(&first, "progress/first");
    let second_ref = fake.serve_image(&second, "progress/second");
    // The first pull holds the only slot until its big layer is released.
    let layer = first.host().layers[0].digest.clone();
    fake.set_faults(Faults {
        stall_blobs: vec![(layer.clone(), 4096)],
        ..Default::default()
    });
    let containerd = containerd_without_cri();
    let daemon = DaemonConfig::new(&containerd)
        .registries_conf(&fake.insecure_entry())
        .extra_toml("[pull]\nmax_concurrent_pulls = 1")
        .start();
    let socket = daemon.status_socket();
    let start = |reference: &str| {
        let (cri, reference) = (daemon.socket().to_path_buf(), reference.to_owned());
        tokio::spawn(async move { cri_pull(&cri, &reference, None).await })
    };

    let first_pull = start(&first_ref);
    poll("the first pull downloading", || {
        let pulls = get_pulls(&socket);
        let found = entry(&pulls, &first_ref).filter(|p| p["state"] == "downloading");
        (found.map(|_| ()), pulls.to_string())
    })
    .await;
    let second_pull = start(&second_ref);
    let queued = poll("the second pull queued", || {
        let pulls = get_pulls(&socket);
        (entry(&pulls, &second_ref).cloned(), pulls.to_string())
    })
    .await;
    assert_eq!(queued["state"], "queued", "{queued}");
    assert_eq!(queued["source"], serde_json::Value::Null, "{queued}");
    assert_eq!(
        queued["layers"]["total"],
        serde_json::Value::Null,
        "{queued}"
    );

    fake.release(&layer);
    for (pull, image) in [(first_pull, &first), (second_pull, &second)] {
        let id = tokio::time::timeout(LIMIT, pull)
            .await
            .expect("the pull ends")
            .expect("the pull task")
            .unwrap_or_else(|s| panic!("{s}\n{}", daemon.log()));
        assert_eq!(id, image.host().config.digest);
    }
    assert_eq!(get_pulls(&socket), serde_json::json!({"pulls": []}));
}
