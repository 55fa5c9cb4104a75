//! Benchmark: cri-imaged's PullImage against containerd's own CRI PullImage, on the
//! same registry and the same containerd in one run, reported as a ratio (never
//! asserted). Run as root with `cargo bench --bench pull` (or `scripts/bench.sh`).
//!
//! Knobs (environment): `BENCH_ROUNDS` (default 3) rounds per image; `BENCH_MB`
//! (default 200) size of the random image and `BENCH_LAYERS` (default 8) its layer
//! count (the rows: `BENCH_MB=210 BENCH_LAYERS=10`, `BENCH_MB=1024
//! BENCH_LAYERS=5`); `BENCH_UNPACK` (`auto` by default, or `containerd`) cri-imaged's
//! `[pull] unpack`; `BENCH_BUSYBOX=0` skips the busybox row; `BENCH_LOG_DIR` turns on debug logging in
//! containerd and cri-imaged and copies both logs there at the end, to see where the
//! time goes (debug logging costs a little, so leave it off for the headline numbers);
//! `BENCH_RECORDS` (default 1000) and `BENCH_READS` (default 1000) for the read RPC
//! rows (see `support/reads.rs`); `BENCH_ONLY=reads` skips the pull rows;
//! `BENCH_TREE` (directories of this machine, `:`-separated, e.g.
//! `/usr/include:/usr/bin:/usr/share/locale`) adds a file-heavy image of one layer
//! per directory, and with it puts containerd's root on a journaled loop-mounted ext4
//! of `BENCH_ROOT_MIB` (default 16384) MiB.
//!
//! After the pulls: ListImages and ImageStatus p50/p99 over `BENCH_RECORDS` image
//! records, both servers over their unix sockets, calls alternating.
//!
//! Method, per image and round:
//! - the two pullers take turns going first (A then B, B then A), so drift over the
//!   run (page cache, disk writeback, the filesystem's allocator) hits both alike;
//! - before each cold pull: the image is removed through containerd's CRI
//!   RemoveImage, then we wait until its records, blobs and snapshots are really gone
//!   (`ctr images/content/snapshots ls`), then `sync` so neither pull pays for the
//!   other's writeback;
//! - the time is the wall time of one PullImage call over the unix socket, measured
//!   in this process, for a cold pull (nothing present) and then a warm one (image
//!   present: both re-resolve the manifest and find everything stored).
//!
//! Without `BENCH_TREE`, containerd's root stays on the machine's ext4. On these
//! machines that filesystem has no journal, and creating many files right after
//! deleting many gets slower each round; the random and busybox images are a few big
//! files (about 50 of 4 MiB, and 15), so the effect is negligible there, and the
//! alternating order spreads it over both pullers anyway. A file-heavy image is
//! only fair on the journaled loop filesystem `BENCH_TREE` sets up.
#![forbid(unsafe_code)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/reads.rs"]
mod reads;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::bench::{env_number, median, median_f64, sync_disks};
use common::containerd::{Containerd, ContainerdOptions};
use common::cpu_seconds;
use common::cri::{self, proto, DaemonConfig};
use common::images::{self, PushedImage};
use common::registry::Registry;
use proto::image_service_client::ImageServiceClient;
use tonic::transport::Channel;

const DEFAULT_ROUNDS: usize = 3;
const DEFAULT_MB: u64 = 200;
const DEFAULT_LAYERS: u64 = 8;
/// Bounds waiting for containerd's GC; only a hang guard, never a measurement.
const CLEANUP_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Puller {
    Containerd,
    CriImaged,
}

impl Puller {
    const BOTH: [Puller; 2] = [Puller::Containerd, Puller::CriImaged];

    fn name(self) -> &'static str {
        match self {
            Puller::Containerd => "containerd",
            Puller::CriImaged => "cri-imaged",
        }
    }
}

/// One image under test and what was measured for it.
struct Subject {
    label: String,
    pushed: PushedImage,
    /// Manifest + config + compressed layers: what crosses the network.
    bytes: u64,
    /// Per puller (index as in `Puller::BOTH`), one entry per round.
    cold: [Vec<Duration>; 2],
    warm: [Vec<Duration>; 2],
    /// CPU seconds each process spent during each cold pull, per puller.
    cold_cpu: [Vec<Cpu>; 2],
    /// Which puller went first, per round.
    first: Vec<Puller>,
    /// cri-imaged's peak resident set (KiB) during each of its cold pulls.
    peak_rss_kib: Vec<u64>,
}

struct Bench {
    runtime: tokio::runtime::Runtime,
    containerd: Containerd,
    /// Kept alive for the whole run; cri-imaged serves from it.
    daemon: cri::Daemon,
    containerd_cri: ImageServiceClient<Channel>,
    daemon_cri: ImageServiceClient<Channel>,
    registry_pid: u32,
    /// Things that went differently than planned (e.g. leftovers GC did not remove).
    notes: Vec<String>,
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs bench targets
    // too (without it). The benchmark takes minutes, so there it only proves it builds.
    if !std::env::args().any(|a| a == "--bench") {
        println!("pull benchmark: built; run it with `cargo bench --bench pull`");
        return;
    }
    let rounds = env_number("BENCH_ROUNDS", DEFAULT_ROUNDS as u64).max(1) as usize;
    let megabytes = env_number("BENCH_MB", DEFAULT_MB).max(1);
    let layers = env_number("BENCH_LAYERS", DEFAULT_LAYERS).max(1) as usize;
    let unpack = std::env::var("BENCH_UNPACK").unwrap_or_else(|_| "auto".into());
    let with_busybox = env_number("BENCH_BUSYBOX", 1) != 0;
    let log_dir = std::env::var_os("BENCH_LOG_DIR").map(std::path::PathBuf::from);
    let tree: Vec<std::path::PathBuf> = std::env::var("BENCH_TREE")
        .map(|dirs| {
            dirs.split(':')
                .filter(|d| !d.is_empty())
                .map(std::path::PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    let root_mib = env_number("BENCH_ROOT_MIB", 16384);

    refuse_unpigz();
    let debug = log_dir.is_some();
    let (containerd, registry) = std::thread::scope(|s| {
        let containerd = s.spawn(|| {
            let mut options = ContainerdOptions::default();
            if !tree.is_empty() {
                options.journaled_root_mib = Some(root_mib);
            }
            if debug {
                options
                    .extra_toml
                    .push_str("\n[debug]\n  level = \"debug\"\n");
            }
            Containerd::start_with(options)
        });
        let registry = s.spawn(Registry::open);
        (
            containerd.join().expect("containerd thread"),
            registry.join().expect("registry thread"),
        )
    });
    containerd.add_registry(&registry);
    let mut bench = Bench::start(containerd, &registry, debug, &unpack);

    // Pushed once; the layouts go as soon as the registry has them.
    let random = images::random_image(megabytes << 20, layers, "bench");
    let random = random.push(&registry, "bench/random");
    let busybox = images::busybox().tag("bench").build();
    let busybox = busybox.push(&registry, "bench/busybox");
    let only_reads = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "reads");
    let mut subjects = vec![Subject::new(format!("random {layers} layers"), random)];
    if with_busybox {
        subjects.push(Subject::new("busybox".into(), busybox.clone()));
    }
    if !tree.is_empty() {
        let dirs: Vec<&Path> = tree.iter().map(|d| d.as_path()).collect();
        let built = Instant::now();
        let image = images::host_tree_image(&dirs, "bench").push(&registry, "bench/tree");
        eprintln!(
            "built and pushed the tree image in {:.0} s",
            built.elapsed().as_secs_f64()
        );
        subjects.push(Subject::new(format!("tree {} layers", dirs.len()), image));
    }
    if only_reads {
        subjects.clear();
    }

    println!(
        "pull benchmark: {} rounds per image, containerd {}, {} CPUs, cri-imaged unpack = {unpack:?}",
        rounds,
        containerd_version(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // Untimed: first connections, first token-less round trips, containerd's first
    // CRI pull; none of that belongs to either puller's steady state.
    let warmup = busybox.clone();
    for puller in Puller::BOTH {
        bench.pull(puller, &warmup);
        bench.remove(&warmup);
    }

    for subject in &mut subjects {
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                Puller::BOTH
            } else {
                [Puller::CriImaged, Puller::Containerd]
            };
            subject.first.push(order[0]);
            for puller in order {
                bench.remove(&subject.pushed);
                sync_disks();
                bench.reset_peak_rss();
                let before = bench.cpu();
                let cold = bench.pull(puller, &subject.pushed);
                let cpu = bench.cpu().since(&before);
                if puller == Puller::CriImaged {
                    subject.peak_rss_kib.push(bench.peak_rss_kib());
                }
                bench.check_unpacked(&subject.pushed);
                let warm = bench.pull(puller, &subject.pushed);
                let i = puller as usize;
                subject.cold[i].push(cold);
                subject.warm[i].push(warm);
                subject.cold_cpu[i].push(cpu);
                eprintln!(
                    "  {} round {}: {} cold {:.3} s ({cpu}), warm {:.3} s",
                    subject.label,
                    round + 1,
                    puller.name(),
                    cold.as_secs_f64(),
                    warm.as_secs_f64()
                );
            }
        }
        bench.remove(&subject.pushed);
    }

    if !subjects.is_empty() {
        print_report(&subjects, rounds);
    }
    let reads = reads::measure(&mut bench, &busybox, registry.host());
    reads::print(&reads);
    for note in &bench.notes {
        println!("note: {note}");
    }
    if let Some(dir) = log_dir {
        bench.save_logs(&dir, &registry);
    }
}

impl Subject {
    fn new(label: String, pushed: PushedImage) -> Subject {
        let host = images::host_platform();
        let manifest = pushed
            .manifests
            .iter()
            .find(|m| m.platform == host)
            .unwrap_or_else(|| panic!("{} has no {host} manifest", pushed.reference));
        let bytes = manifest.manifest.size + manifest.content_size();
        Subject {
            label,
            pushed,
            bytes,
            cold: [Vec::new(), Vec::new()],
            warm: [Vec::new(), Vec::new()],
            cold_cpu: [Vec::new(), Vec::new()],
            first: Vec::new(),
            peak_rss_kib: Vec::new(),
        }
    }
}

impl Bench {
    /// cri-imaged against `containerd`, allowed to reach `registry` over plain HTTP
    /// (containerd's CRI already is, through its hosts.toml).
    fn start(containerd: Containerd, registry: &Registry, debug: bool, unpack: &str) -> Bench {
        // Debug for cri-imaged's own phases only: h2/hyper at debug write a line per
        // frame (14,000 per pull here), which slows the daemon and drowns the phases.
        let daemon = DaemonConfig::new(&containerd)
            .registry(registry)
            .unpack(unpack)
            .env(
                "RUST_LOG",
                if debug {
                    "info,cri_imaged=debug"
                } else {
                    "info"
                },
            )
            .start();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("starting the tokio runtime: {e}"));
        let containerd_cri = runtime.block_on(cri::connect(containerd.socket()));
        let daemon_cri = runtime.block_on(daemon.client());
        Bench {
            runtime,
            containerd,
            daemon,
            containerd_cri,
            daemon_cri,
            registry_pid: registry.pid(),
            notes: Vec::new(),
        }
    }

    /// CPU time so far of the three processes a pull keeps busy.
    fn cpu(&self) -> Cpu {
        Cpu {
            containerd: cpu_seconds(self.containerd.pid()),
            cri_imaged: cpu_seconds(self.daemon.pid()),
            registry: cpu_seconds(self.registry_pid),
        }
    }

    /// Resets cri-imaged's peak RSS (`VmHWM`) so the next reading covers one pull.
    fn reset_peak_rss(&self) {
        let path = format!("/proc/{}/clear_refs", self.daemon.pid());
        if let Err(e) = std::fs::write(&path, "5") {
            panic!("writing {path}: {e}");
        }
    }

    /// cri-imaged's peak RSS in KiB since the last reset.
    fn peak_rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.daemon.pid());
        let status =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{path}: no VmHWM"))
    }

    /// One PullImage through `puller`'s CRI socket; returns its wall time.
    fn pull(&mut self, puller: Puller, image: &PushedImage) -> Duration {
        let mut client = match puller {
            Puller::Containerd => self.containerd_cri.clone(),
            Puller::CriImaged => self.daemon_cri.clone(),
        };
        let request = cri::pull_request(&image.reference, None);
        let started = Instant::now();
        let result = self.runtime.block_on(client.pull_image(request));
        let elapsed = started.elapsed();
        match result {
            Ok(response) => {
                let image_ref = response.into_inner().image_ref;
                assert_eq!(
                    image_ref,
                    image.config_digest,
                    "{} pulled {} as the wrong image",
                    puller.name(),
                    image.reference
                );
            }
            Err(status) => panic!(
                "{} could not pull {}: {status}\n{}",
                puller.name(),
                image.reference,
                self.logs_for(puller)
            ),
        }
        elapsed
    }

    fn logs_for(&self, puller: Puller) -> String {
        match puller {
            Puller::Containerd => format!("containerd log:\n{}", self.containerd.log()),
            Puller::CriImaged => format!("cri-imaged log:\n{}", self.daemon.log()),
        }
    }

    /// Both pullers must leave the image unpacked in the snapshotter, or the
    /// comparison is unfair (containerd's CRI always unpacks).
    fn check_unpacked(&self, image: &PushedImage) {
        assert!(
            self.containerd.is_unpacked(&image.reference),
            "{} is not unpacked after the pull",
            image.reference
        );
    }

    /// Removes `image` through containerd's CRI and waits until its records, blobs
    /// and every snapshot in k8s.io are gone.
    fn remove(&mut self, image: &PushedImage) {
        let started = Instant::now();
        let names = [
            image.reference.clone(),
            image.digest_reference.clone(),
            image.config_digest.clone(),
        ];
        loop {
            // containerd's CRI learns of cri-imaged's records from events, so right
            // after a cri-imaged pull it may not know the image yet: RemoveImage is
            // then a no-op, and we ask again.
            let request = proto::RemoveImageRequest {
                image: Some(cri::image_spec(&image.reference)),
            };
            if let Err(status) = self
                .runtime
                .block_on(self.containerd_cri.remove_image(request))
            {
                panic!("containerd RemoveImage {}: {status}", image.reference);
            }
            let left: Vec<String> = self
                .containerd
                .image_names()
                .into_iter()
                .filter(|n| names.contains(n))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < CLEANUP_LIMIT,
                "image records {left:?} survived RemoveImage"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let blobs: Vec<String> = image
            .manifests
            .iter()
            .flat_map(|m| {
                [m.manifest.digest.clone(), m.config.digest.clone()]
                    .into_iter()
                    .chain(m.layers.iter().map(|l| l.digest.clone()))
            })
            .chain([image.digest.clone()])
            .collect();
        loop {
            let content = self.containerd.content_digests();
            let left_blobs: Vec<&String> = blobs.iter().filter(|b| content.contains(b)).collect();
            let snapshots = self.containerd.snapshot_keys();
            if left_blobs.is_empty() && snapshots.is_empty() {
                return;
            }
            if started.elapsed() > CLEANUP_LIMIT {
                self.notes.push(format!(
                    "GC left {} blobs and {} snapshots of {} after RemoveImage; removed with ctr",
                    left_blobs.len(),
                    snapshots.len(),
                    image.reference
                ));
                for blob in left_blobs {
                    self.containerd.ctr(&["content", "rm", blob]);
                }
                self.remove_snapshots();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes every snapshot, children before parents (`ctr snapshots rm` refuses a
    /// snapshot that still has children).
    fn remove_snapshots(&self) {
        let snapshotter = self.containerd.snapshotter().to_owned();
        loop {
            let keys = self.containerd.snapshot_keys();
            if keys.is_empty() {
                return;
            }
            let removed = keys
                .iter()
                .filter(|key| {
                    self.containerd
                        .ctr(&["snapshots", "--snapshotter", &snapshotter, "rm", key])
                        .status
                        .success()
                })
                .count();
            assert!(removed > 0, "cannot remove snapshots {keys:?}");
        }
    }

    fn save_logs(&self, dir: &Path, registry: &Registry) {
        if let Err(e) = std::fs::create_dir_all(dir) {
            panic!("creating {}: {e}", dir.display());
        }
        for (name, text) in [
            ("containerd.log", self.containerd.log()),
            ("cri-imaged.log", self.daemon.log()),
            ("registry.log", registry.log()),
        ] {
            let path = dir.join(name);
            if let Err(e) = std::fs::write(&path, text) {
                panic!("writing {}: {e}", path.display());
            }
        }
        println!("logs: {}", dir.display());
    }
}

fn print_report(subjects: &[Subject], rounds: usize) {
    println!();
    println!(
        "{:<18} {:>9} {:>6} {:>5} {:>14} {:>14} {:>7}",
        "image", "size MB", "rounds", "pull", "containerd s", "cri-imaged s", "ratio"
    );
    for subject in subjects {
        for (kind, times) in [("cold", &subject.cold), ("warm", &subject.warm)] {
            let containerd = median(&times[Puller::Containerd as usize]);
            let ours = median(&times[Puller::CriImaged as usize]);
            println!(
                "{:<18} {:>9.1} {:>6} {:>5} {:>14.3} {:>14.3} {:>7.2}",
                subject.label,
                subject.bytes as f64 / 1e6,
                rounds,
                kind,
                containerd,
                ours,
                ours / containerd
            );
        }
    }
    println!("ratio = cri-imaged median / containerd median (< 1: cri-imaged is faster)");
    println!();
    println!("CPU seconds spent during a cold pull (median per process; 2 CPUs in all):");
    println!(
        "{:<18} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "image", "puller", "containerd", "cri-imaged", "registry", "total"
    );
    for subject in subjects {
        for puller in Puller::BOTH {
            let cpu = &subject.cold_cpu[puller as usize];
            let of = |f: fn(&Cpu) -> f64| median_f64(cpu.iter().map(f).collect());
            println!(
                "{:<18} {:>11} {:>11.2} {:>11.2} {:>11.2} {:>11.2}",
                subject.label,
                puller.name(),
                of(|c| c.containerd),
                of(|c| c.cri_imaged),
                of(|c| c.registry),
                of(Cpu::total)
            );
        }
    }
    println!();
    println!("cri-imaged peak RSS during a cold pull (MiB): ");
    for subject in subjects {
        let max = subject.peak_rss_kib.iter().max().copied().unwrap_or(0);
        let med = median_f64(subject.peak_rss_kib.iter().map(|&k| k as f64).collect());
        println!(
            "  {:<18} median {:.1}, max {:.1}",
            subject.label,
            med / 1024.0,
            max as f64 / 1024.0
        );
    }
    println!();
    println!("per round (seconds; * = pulled first in that round):");
    for subject in subjects {
        for round in 0..subject.first.len() {
            let cell = |puller: Puller, times: &[Vec<Duration>; 2]| {
                let mark = if subject.first[round] == puller {
                    "*"
                } else {
                    " "
                };
                format!("{:.3}{mark}", times[puller as usize][round].as_secs_f64())
            };
            println!(
                "  {:<18} round {}: cold containerd {} cri-imaged {} | warm containerd {} cri-imaged {}",
                subject.label,
                round + 1,
                cell(Puller::Containerd, &subject.cold),
                cell(Puller::CriImaged, &subject.cold),
                cell(Puller::Containerd, &subject.warm),
                cell(Puller::CriImaged, &subject.warm),
            );
        }
    }
}

/// containerd 1.6 unpacks with `unpigz` when it finds one on PATH, which makes its
/// pull of big layers markedly slower here: the baseline would not be containerd's
/// usual self.
fn refuse_unpigz() {
    if common::require_tool("unpigz", "pigz").is_ok() {
        panic!(
            "unpigz is on PATH; containerd would use it and skew the baseline: apt-get remove pigz"
        );
    }
}

fn containerd_version() -> String {
    Command::new("containerd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .nth(2)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "(unknown version)".into())
}

/// CPU seconds (user + system) of the processes involved in a pull.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    containerd: f64,
    cri_imaged: f64,
    registry: f64,
}

impl Cpu {
    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            containerd: self.containerd - before.containerd,
            cri_imaged: self.cri_imaged - before.cri_imaged,
            registry: self.registry - before.registry,
        }
    }

    fn total(&self) -> f64 {
        self.containerd + self.cri_imaged + self.registry
    }
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU s: containerd {:.2}, cri-imaged {:.2}, registry {:.2}",
            self.containerd, self.cri_imaged, self.registry
        )
    }
}
