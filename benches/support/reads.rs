//! The read RPCs over a store of many image records: ListImages and ImageStatus
//! p99 (and p50), cri-imaged against containerd's own CRI, both over their unix
//! sockets, calls alternating between the two servers, in the same run as the pulls.
//!
//! The records are one pulled image tagged `BENCH_RECORDS` times (default 1,000)
//! under names of their own (`HOST/bench/many-N:1`, so each brings a repo tag and a
//! repo digest) through containerd's image service, as `ctr images tag` would.
//! containerd's CRI learns of them from the same image events as cri-imaged; the
//! measurement starts once both list every one of them, so both answer over the same
//! set. `BENCH_READS` (default 1,000) calls of each RPC per server.

use std::time::{Duration, Instant};

use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, GetImageRequest, Image,
};
use tonic::transport::Channel;

use super::common::containerd::NAMESPACE;
use super::common::cri::{self, proto};
use super::common::images::PushedImage;
use super::{env_number, Bench, Puller};

const DEFAULT_RECORDS: u64 = 1000;
const DEFAULT_READS: u64 = 1000;
/// Bounds waiting for both CRIs to list every record; a hang guard only.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

/// p50 and p99 per server (index as in `Puller::BOTH`), per RPC.
pub struct ReadFigures {
    pub records: usize,
    pub calls: usize,
    /// (RPC name, [containerd, cri-imaged] samples).
    pub rows: Vec<(&'static str, [Vec<Duration>; 2])>,
}

/// Tags `image` (pulled here first) `BENCH_RECORDS` times, waits until both CRIs
/// list every tag, measures, and removes the tags again.
pub fn measure(bench: &mut Bench, image: &PushedImage, host: &str) -> ReadFigures {
    let records = env_number("BENCH_RECORDS", DEFAULT_RECORDS).max(1) as usize;
    let calls = env_number("BENCH_READS", DEFAULT_READS).max(1) as usize;
    bench.pull(Puller::CriImaged, image);
    let names: Vec<String> = (0..records)
        .map(|i| format!("{host}/bench/many-{i}:1"))
        .collect();
    let mut images = bench
        .runtime
        .block_on(async { ImagesClient::new(cri::channel(bench.containerd.socket()).await) });
    bench
        .runtime
        .block_on(tag_all(&mut images, &image.reference, &names));

    let want = records + 1;
    let started = Instant::now();
    loop {
        let counts = Puller::BOTH.map(|p| tag_count(bench, p, &image.config_digest));
        if counts == [want, want] {
            break;
        }
        assert!(
            started.elapsed() < CATCH_UP_LIMIT,
            "the CRIs list {counts:?} tags of {want} (containerd, cri-imaged)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut list = [Vec::with_capacity(calls), Vec::with_capacity(calls)];
    let mut status = [Vec::with_capacity(calls), Vec::with_capacity(calls)];
    for call in 0..calls {
        // Alternate which server goes first, so drift hits both alike.
        let order = if call % 2 == 0 {
            Puller::BOTH
        } else {
            [Puller::CriImaged, Puller::Containerd]
        };
        let name = &names[call % names.len()];
        for puller in order {
            list[puller as usize].push(time_list(bench, puller, want));
            status[puller as usize].push(time_status(bench, puller, name, &image.config_digest));
        }
    }

    bench.runtime.block_on(delete_all(&mut images, &names));
    ReadFigures {
        records: want,
        calls,
        rows: vec![("ListImages", list), ("ImageStatus", status)],
    }
}

fn client(
    bench: &Bench,
    puller: Puller,
) -> cri_imaged::proto::image_service_client::ImageServiceClient<Channel> {
    match puller {
        Puller::Containerd => bench.containerd_cri.clone(),
        Puller::CriImaged => bench.daemon_cri.clone(),
    }
}

/// How many repo tags `puller`'s ListImages gives image `id`.
fn tag_count(bench: &Bench, puller: Puller, id: &str) -> usize {
    let mut client = client(bench, puller);
    let listed = bench
        .runtime
        .block_on(client.list_images(proto::ListImagesRequest { filter: None }))
        .unwrap_or_else(|s| panic!("{} ListImages: {s}", puller.name()))
        .into_inner()
        .images;
    listed
        .iter()
        .find(|i| i.id == id)
        .map_or(0, |i| i.repo_tags.len())
}

fn time_list(bench: &Bench, puller: Puller, want: usize) -> Duration {
    let mut client = client(bench, puller);
    let started = Instant::now();
    let listed = bench
        .runtime
        .block_on(client.list_images(proto::ListImagesRequest { filter: None }));
    let elapsed = started.elapsed();
    let tags: usize = listed
        .unwrap_or_else(|s| panic!("{} ListImages: {s}", puller.name()))
        .into_inner()
        .images
        .iter()
        .map(|i| i.repo_tags.len())
        .sum();
    assert!(tags >= want, "{} listed {tags} tags", puller.name());
    elapsed
}

fn time_status(bench: &Bench, puller: Puller, name: &str, id: &str) -> Duration {
    let mut client = client(bench, puller);
    let request = proto::ImageStatusRequest {
        image: Some(cri::image_spec(name)),
        verbose: false,
    };
    let started = Instant::now();
    let answered = bench.runtime.block_on(client.image_status(request));
    let elapsed = started.elapsed();
    let image = answered
        .unwrap_or_else(|s| panic!("{} ImageStatus {name}: {s}", puller.name()))
        .into_inner()
        .image;
    assert_eq!(
        image.map(|i| i.id).as_deref(),
        Some(id),
        "{} ImageStatus {name}",
        puller.name()
    );
    elapsed
}

fn namespaced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "containerd-namespace",
        NAMESPACE.parse().expect("namespace is ASCII"),
    );
    request
}

/// Creates a record per name with `source`'s target and labels.
async fn tag_all(images: &mut ImagesClient<Channel>, source: &str, names: &[String]) {
    let original = images
        .get(namespaced(GetImageRequest {
            name: source.to_owned(),
        }))
        .await
        .unwrap_or_else(|s| panic!("Images.Get {source}: {s}"))
        .into_inner()
        .image
        .unwrap_or_else(|| panic!("no image record {source}"));
    for name in names {
        let image = Image {
            name: name.clone(),
            ..original.clone()
        };
        images
            .create(namespaced(CreateImageRequest {
                image: Some(image),
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|s| panic!("Images.Create {name}: {s}"));
    }
}

async fn delete_all(images: &mut ImagesClient<Channel>, names: &[String]) {
    for name in names {
        images
            .delete(namespaced(DeleteImageRequest {
                name: name.clone(),
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|s| panic!("Images.Delete {name}: {s}"));
    }
}

/// The `q` quantile (0..=1) in milliseconds, nearest rank.
pub fn quantile_ms(samples: &[Duration], q: f64) -> f64 {
    let mut sorted: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn print(figures: &ReadFigures) {
    println!();
    println!(
        "read RPCs over {} image records ({} calls each, alternating; milliseconds):",
        figures.records, figures.calls
    );
    println!(
        "{:<12} {:>5} {:>14} {:>14} {:>7}",
        "rpc", "", "containerd ms", "cri-imaged ms", "ratio"
    );
    for (rpc, samples) in &figures.rows {
        for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
            let containerd = quantile_ms(&samples[Puller::Containerd as usize], q);
            let ours = quantile_ms(&samples[Puller::CriImaged as usize], q);
            println!(
                "{:<12} {:>5} {:>14.3} {:>14.3} {:>7.2}",
                rpc,
                label,
                containerd,
                ours,
                ours / containerd
            );
        }
    }
    println!("ratio = cri-imaged / containerd (< 1: cri-imaged is faster)");
}
