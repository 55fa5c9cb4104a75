//! Benchmark: what the HTTP/2 edge (`[server] rewrite_authority`, on by default)
//! costs. Two cri-imaged daemons serve the same containerd and registry in one run,
//! one with the edge and one without; the same tonic client (which sends a valid
//! `:authority`, so both serve it) times cold pulls and bursts of ListImages and
//! ImageStatus through each, alternating which goes first. Reported as ratios
//! edge / direct (1.00: no cost), never asserted. Run as root with
//! `cargo bench --bench edge`.
//!
//! Cold pulls need no removal between rounds: every round pulls images no daemon has
//! pulled before (`BENCH_ROUNDS` × 2 small random images pushed up front).
#![forbid(unsafe_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::cpu_seconds;
use common::cri::{self, proto, Daemon, DaemonConfig};
use common::images::{self, PushedImage};
use common::registry::Registry;
use futures_util::future::join_all;
use proto::image_service_client::ImageServiceClient;
use tonic::transport::Channel;

const DEFAULT_ROUNDS: u64 = 5;
/// Calls per burst, and how many are in flight at once.
const BURST: usize = 2000;
const IN_FLIGHT: usize = 16;
const IMAGE_BYTES: u64 = 8 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Edge,
    Direct,
}

const SIDES: [Side; 2] = [Side::Edge, Side::Direct];

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Edge => "edge",
            Side::Direct => "direct",
        }
    }
}

/// One measurement kind: per round for each side, the wall seconds and the CPU
/// seconds the serving daemon spent (less noisy than wall time on 2 shared cores).
struct Series {
    label: &'static str,
    times: [Vec<f64>; 2],
    cpu: [Vec<f64>; 2],
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("edge benchmark: built; run it with `cargo bench --bench edge`");
        return;
    }
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_ROUNDS)
        .max(1) as usize;
    let containerd = Containerd::start();
    let registry = Registry::open();
    let daemons: Vec<Daemon> = SIDES
        .iter()
        .map(|side| {
            DaemonConfig::new(&containerd)
                .registry(&registry)
                .rewrite_authority(*side == Side::Edge)
                .start()
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("starting the tokio runtime: {e}"));
    let clients: Vec<ImageServiceClient<Channel>> = daemons
        .iter()
        .map(|d| runtime.block_on(d.client()))
        .collect();

    let images: Vec<PushedImage> = (0..2 * rounds + 1)
        .map(|i| {
            images::random_image(IMAGE_BYTES, 2, &format!("edge{i}"))
                .push(&registry, &format!("bench/edge{i}"))
        })
        .collect();
    println!(
        "edge benchmark: {rounds} rounds; cold pulls of {} MB images; bursts of {BURST} calls, {IN_FLIGHT} in flight",
        IMAGE_BYTES >> 20
    );
    // Untimed: first connections and the first pull.
    runtime.block_on(pull(&clients[0], &images[2 * rounds]));

    let mut series = [
        Series::new("cold PullImage"),
        Series::new("ListImages burst"),
        Series::new("ImageStatus burst"),
    ];
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            SIDES
        } else {
            [Side::Direct, Side::Edge]
        };
        for (k, side) in order.into_iter().enumerate() {
            let client = &clients[side as usize];
            let pid = daemons[side as usize].pid();
            let image = &images[2 * round + k];
            let cpu = cpu_seconds(pid);
            let started = Instant::now();
            runtime.block_on(pull(client, image));
            series[0].push(side, started.elapsed(), cpu_seconds(pid) - cpu);
            let cpu = cpu_seconds(pid);
            let elapsed = runtime.block_on(burst(client, None));
            series[1].push(side, elapsed, cpu_seconds(pid) - cpu);
            let cpu = cpu_seconds(pid);
            let elapsed = runtime.block_on(burst(client, Some(&image.reference)));
            series[2].push(side, elapsed, cpu_seconds(pid) - cpu);
        }
    }

    println!();
    println!(
        "{:<20} {:>10} {:>10} {:>7}   {:>10} {:>10} {:>7}",
        "what", "edge s", "direct s", "ratio", "edge CPU", "direct CPU", "ratio"
    );
    for s in &series {
        let [edge, direct] = [Side::Edge, Side::Direct].map(|side| median(&s.times[side as usize]));
        let [edge_cpu, direct_cpu] =
            [Side::Edge, Side::Direct].map(|side| median(&s.cpu[side as usize]));
        println!(
            "{:<20} {:>10.4} {:>10.4} {:>7.3}   {:>10.3} {:>10.3} {:>7.3}",
            s.label,
            edge,
            direct,
            round_ratio(&s.times),
            edge_cpu,
            direct_cpu,
            round_ratio(&s.cpu)
        );
    }
    println!(
        "ratio = median over rounds of edge / direct in that round (1.00: no cost; rounds \
         differ, since the store grows); CPU = the serving daemon's CPU seconds"
    );
    println!();
    println!("per round (seconds):");
    for s in &series {
        for round in 0..rounds {
            let cell = |side: Side| {
                let i = side as usize;
                format!(
                    "{} {:.4} s, CPU {:.2} s",
                    side.name(),
                    s.times[i][round],
                    s.cpu[i][round]
                )
            };
            println!(
                "  {:<20} round {}: {} | {}",
                s.label,
                round + 1,
                cell(Side::Edge),
                cell(Side::Direct)
            );
        }
    }
}

impl Series {
    fn new(label: &'static str) -> Series {
        Series {
            label,
            times: [Vec::new(), Vec::new()],
            cpu: [Vec::new(), Vec::new()],
        }
    }

    fn push(&mut self, side: Side, elapsed: Duration, cpu: f64) {
        self.times[side as usize].push(elapsed.as_secs_f64());
        self.cpu[side as usize].push(cpu);
    }
}

async fn pull(client: &ImageServiceClient<Channel>, image: &PushedImage) {
    let response = client
        .clone()
        .pull_image(cri::pull_request(&image.reference, None))
        .await
        .unwrap_or_else(|s| panic!("PullImage {}: {s}", image.reference));
    assert_eq!(response.into_inner().image_ref, image.config_digest);
}

/// `BURST` ListImages calls (or ImageStatus of `image`), `IN_FLIGHT` at a time on
/// the client's one connection; the wall time of the whole burst.
async fn burst(client: &ImageServiceClient<Channel>, image: Option<&str>) -> Duration {
    let started = Instant::now();
    for _ in 0..BURST / IN_FLIGHT {
        let calls = (0..IN_FLIGHT).map(|_| {
            let mut client = client.clone();
            async move {
                match image {
                    None => {
                        let images = client
                            .list_images(proto::ListImagesRequest { filter: None })
                            .await
                            .unwrap_or_else(|s| panic!("ListImages: {s}"))
                            .into_inner()
                            .images;
                        assert!(!images.is_empty());
                    }
                    Some(image) => {
                        let status = client
                            .image_status(proto::ImageStatusRequest {
                                image: Some(cri::image_spec(image)),
                                verbose: false,
                            })
                            .await
                            .unwrap_or_else(|s| panic!("ImageStatus {image}: {s}"))
                            .into_inner();
                        assert!(status.image.is_some());
                    }
                }
            }
        });
        join_all(calls).await;
    }
    started.elapsed()
}

/// The median over rounds of edge / direct within the round.
fn round_ratio(values: &[Vec<f64>; 2]) -> f64 {
    let ratios: Vec<f64> = values[Side::Edge as usize]
        .iter()
        .zip(&values[Side::Direct as usize])
        .map(|(edge, direct)| edge / direct)
        .collect();
    median(&ratios)
}

fn median(secs: &[f64]) -> f64 {
    let mut secs = secs.to_vec();
    secs.sort_by(f64::total_cmp);
    match secs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => secs[n / 2],
        n => (secs[n / 2 - 1] + secs[n / 2]) / 2.0,
    }
}
