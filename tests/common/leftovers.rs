//! The safety half of a failed pull: what must not be left in containerd (image
//! records, active ingests, extraction snapshots, leases), and proof that the daemon
//! still serves (gRPC health over its socket).

use std::path::{Path, PathBuf};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::containerd::Containerd;
use super::cri::channel;

/// Asserts `grpc.health.v1.Health/Check` (whole server) answers SERVING.
pub async fn assert_serving(socket: &Path) {
    let mut health = HealthClient::new(channel(socket).await);
    let answer = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("Health/Check failed: {s:?}"))
        .into_inner();
    assert_eq!(
        answer.status,
        ServingStatus::Serving as i32,
        "Health/Check: {answer:?}"
    );
}

/// Rows of a `ctr … ls` table, header dropped (ctr prints one even when empty).
fn rows(containerd: &Containerd, args: &[&str]) -> Vec<String> {
    containerd
        .ctr_ok(args)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Asserts a failed pull left nothing half-written: the image records are those of
/// `images_before`, no ingest is active, no `extract-` snapshot remains, no lease is
/// left. With no image at all, no content may remain either (the pull's lease was
/// the only thing keeping it).
pub fn assert_nothing_left(containerd: &Containerd, images_before: &[String], after: &str) {
    let mut images = containerd.image_names();
    images.sort();
    let mut before = images_before.to_vec();
    before.sort();
    assert_eq!(images, before, "image records changed after {after}");
    let active = rows(containerd, &["content", "active"]);
    assert!(
        active.is_empty(),
        "active ingests after {after}: {active:?}"
    );
    let snapshots = rows(
        containerd,
        &["snapshots", "--snapshotter", containerd.snapshotter(), "ls"],
    );
    let extract: Vec<_> = snapshots
        .iter()
        .filter(|l| l.starts_with("extract-"))
        .collect();
    assert!(
        extract.is_empty(),
        "extraction snapshots after {after}: {extract:?}"
    );
    let leases = rows(containerd, &["leases", "ls"]);
    assert!(leases.is_empty(), "leases after {after}: {leases:?}");
    let staged = staged_blobs(containerd);
    assert!(
        staged.is_empty(),
        "blobs staged by cri-imaged's direct ingest after {after}: {staged:?}"
    );
    if before.is_empty() {
        let content = rows(containerd, &["content", "ls"]);
        assert!(content.is_empty(), "content after {after}: {content:?}");
        assert!(
            snapshots.is_empty(),
            "snapshots after {after}: {snapshots:?}"
        );
    }
}

/// Where cri-imaged stages blobs it writes straight into containerd's content dir.
pub fn staging_dir(containerd: &Containerd) -> PathBuf {
    containerd
        .root()
        .join("io.containerd.content.v1.content")
        .join("cri-imaged-ingest")
}

/// Staged files and their sizes (none when direct ingest is off or idle).
pub fn staged_blobs(containerd: &Containerd) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(staging_dir(containerd)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| {
            let size = e.metadata().map(|m| m.len()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), size)
        })
        .collect()
}
