//! Benchmark: 20 PullImage calls of one image at once (kubelet with
//! `serializeImagePulls: false` starting 20 pods of one Deployment) against one
//! PullImage of it, for cri-imaged and for containerd's own CRI, on the same
//! registry and containerd in one run. Reported as ratios, never asserted.
//! Run as root with `cargo bench --bench concurrent` (or `scripts/bench.sh`).
//!
//! Knobs (environment): `BENCH_ROUNDS` (default 3), `BENCH_MB` (default 100: the
//! random image's size), `BENCH_CALLERS` (default 20).
//!
//! Method, per round: for each puller (the order alternates between rounds), a
//! cold single pull, then a cold burst of `BENCH_CALLERS` pulls, each on its own
//! connection and all started together; the time is from the first call to the last
//! answer. Before each cold pull the image is removed and we wait until its blobs and
//! snapshots are gone, then `sync`.
#![forbid(unsafe_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::bench::{env_number, median, sync_disks};
use common::containerd::Containerd;
use common::cri::{self, proto, DaemonConfig};
use common::images::{self, PushedImage};
use common::registry::Registry;
use proto::image_service_client::ImageServiceClient;
use tonic::transport::Channel;

const DEFAULT_ROUNDS: u64 = 3;
const DEFAULT_MB: u64 = 100;
const DEFAULT_CALLERS: u64 = 20;
const LAYERS: usize = 5;
/// Bounds waiting for containerd's GC; only a hang guard, never a measurement.
const CLEANUP_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Puller {
    Containerd,
    CriImaged,
}

impl Puller {
    fn name(self) -> &'static str {
        match self {
            Puller::Containerd => "containerd",
            Puller::CriImaged => "cri-imaged",
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("concurrent-pull benchmark: built; run it with `cargo bench --bench concurrent`");
        return;
    }
    let rounds = env_number("BENCH_ROUNDS", DEFAULT_ROUNDS).max(1) as usize;
    let megabytes = env_number("BENCH_MB", DEFAULT_MB).max(1);
    let callers = env_number("BENCH_CALLERS", DEFAULT_CALLERS).max(1) as usize;

    let (containerd, registry) = std::thread::scope(|s| {
        let containerd = s.spawn(Containerd::start);
        let registry = s.spawn(Registry::open);
        (
            containerd.join().expect("containerd thread"),
            registry.join().expect("registry thread"),
        )
    });
    containerd.add_registry(&registry);
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .env("RUST_LOG", "info")
        .start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("starting the tokio runtime: {e}"));
    let image = images::random_image(megabytes << 20, LAYERS, "concurrent")
        .push(&registry, "bench/concurrent");
    println!(
        "concurrent-pull benchmark: {rounds} rounds, {callers} callers, {megabytes} MB in {LAYERS} layers, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let sockets = |puller: Puller| match puller {
        Puller::Containerd => containerd.socket().to_path_buf(),
        Puller::CriImaged => daemon.socket().to_path_buf(),
    };
    // Untimed warm-up: first connections and each puller's first pull.
    for puller in [Puller::Containerd, Puller::CriImaged] {
        runtime.block_on(burst(&sockets(puller), &image, 1));
        remove(&runtime, &containerd, &image);
    }

    // [puller][single, burst] → one time per round.
    let mut times: [[Vec<Duration>; 2]; 2] = Default::default();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Puller::Containerd, Puller::CriImaged]
        } else {
            [Puller::CriImaged, Puller::Containerd]
        };
        for puller in order {
            for (kind, n) in [(0, 1), (1, callers)] {
                remove(&runtime, &containerd, &image);
                sync_disks();
                let took = runtime.block_on(burst(&sockets(puller), &image, n));
                eprintln!(
                    "  round {}: {} {n} caller(s) {:.3} s",
                    round + 1,
                    puller.name(),
                    took.as_secs_f64()
                );
                times[puller as usize][kind].push(took);
            }
        }
    }
    remove(&runtime, &containerd, &image);

    println!();
    println!(
        "{:<12} {:>10} {:>16} {:>14}",
        "puller",
        "1 pull s",
        format!("{callers} at once s"),
        "burst / one"
    );
    for puller in [Puller::Containerd, Puller::CriImaged] {
        let [one, many] = &times[puller as usize];
        let (one, many) = (median(one), median(many));
        println!(
            "{:<12} {:>10.3} {:>16.3} {:>14.2}",
            puller.name(),
            one,
            many,
            many / one
        );
    }
    let theirs = median(&times[Puller::Containerd as usize][1]);
    let ours = median(&times[Puller::CriImaged as usize][1]);
    println!(
        "{callers} at once, cri-imaged / containerd: {:.2} (< 1: cri-imaged is faster)",
        ours / theirs
    );
    println!("medians over {rounds} rounds; min–max per cell:");
    for puller in [Puller::Containerd, Puller::CriImaged] {
        for (kind, label) in [(0, "1 pull"), (1, "burst")] {
            let cell = &times[puller as usize][kind];
            let secs: Vec<f64> = cell.iter().map(Duration::as_secs_f64).collect();
            let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = secs.iter().copied().fold(0.0, f64::max);
            println!("  {:<12} {label:<7} {min:.3}–{max:.3} s", puller.name());
        }
    }
}

/// `n` PullImage calls of `image` at once, each on its own connection to `socket`;
/// the time from the first call to the last answer. Every answer must be the image.
async fn burst(socket: &std::path::Path, image: &PushedImage, n: usize) -> Duration {
    let mut clients: Vec<ImageServiceClient<Channel>> = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(cri::connect(socket).await);
    }
    let started = Instant::now();
    let calls = clients.into_iter().map(|mut client| {
        let request = cri::pull_request(&image.reference, None);
        async move { client.pull_image(request).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    for answer in answers {
        match answer {
            Ok(response) => assert_eq!(response.into_inner().image_ref, image.config_digest),
            Err(status) => panic!(
                "pulling {} at {}: {status}",
                image.reference,
                socket.display()
            ),
        }
    }
    took
}

/// Removes `image` through containerd's CRI and waits until no content or snapshot
/// of it is left (falling back to `ctr` if GC leaves some).
fn remove(runtime: &tokio::runtime::Runtime, containerd: &Containerd, image: &PushedImage) {
    let started = Instant::now();
    let mut client = runtime.block_on(cri::connect(containerd.socket()));
    loop {
        let request = proto::RemoveImageRequest {
            image: Some(cri::image_spec(&image.reference)),
        };
        if let Err(status) = runtime.block_on(client.remove_image(request)) {
            panic!("containerd RemoveImage {}: {status}", image.reference);
        }
        // containerd's CRI learns of cri-imaged's records from events: ask again
        // until the records are gone.
        if containerd.image_names().is_empty() {
            break;
        }
        assert!(
            started.elapsed() < CLEANUP_LIMIT,
            "image records survived RemoveImage"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    while !(containerd.content_digests().is_empty() && containerd.snapshot_keys().is_empty()) {
        if started.elapsed() > CLEANUP_LIMIT {
            for blob in containerd.content_digests() {
                containerd.ctr(&["content", "rm", &blob]);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
