//! `[pull] pinned`: images kubelet's image GC must keep are reported `pinned` and
//! their containerd records carry `io.cri-containerd.pinned=pinned` (read with `ctr`),
//! also when the image was already on the node before it was listed.

mod common;

use common::cri::DaemonConfig;
use common::images;
use common::registry::Registry;
use common::scenario::{pull_ok, start, status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_images_are_pinned_in_status_and_in_containerds_records() {
    let (containerd, registry) = start(Registry::open);
    let pause = images::busybox()
        .tag("3.9")
        .build()
        .push(&registry, "pause");
    let app = images::random_image(64 << 10, 1, "1").push(&registry, "team/app");
    // First without the list: the app is on the node, unpinned.
    let plain = DaemonConfig::new(&containerd).registry(&registry).start();
    pull_ok(&plain, &app.reference, None).await;
    drop(plain);
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .extra_toml(&format!(
            "[pull]\npinned = [\"{}\", \"*/team/*\"]\n",
            pause.reference
        ))
        .start();
    for image in [&pause, &app] {
        pull_ok(&daemon, &image.reference, None).await;
        let found = status(daemon.socket(), &image.reference)
            .await
            .expect("pulled");
        assert!(found.pinned, "{} is pinned", image.reference);
    }
    // Three distinct images (one image ID pinned by any of its names is pinned).
    let other = images::random_image(64 << 10, 1, "2").push(&registry, "other/app");
    pull_ok(&daemon, &other.reference, None).await;
    assert!(
        !status(daemon.socket(), &other.reference)
            .await
            .expect("pulled")
            .pinned
    );
    let records = containerd.image_records();
    for row in &records {
        let pinned = row
            .labels
            .get("io.cri-containerd.pinned")
            .map(String::as_str);
        let is_other = row.name.contains("other/app") || row.target == other.digest;
        let expected = (!is_other).then_some("pinned");
        assert_eq!(pinned, expected, "{row:?}");
    }
}

/// Waits (bounded) until ImageStatus of `image` finds it.
async fn appears(daemon: &common::cri::Daemon, image: &str) -> common::cri::proto::Image {
    for _ in 0..600 {
        if let Some(found) = status(daemon.socket(), image).await {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "{image} was not pre-pulled within a minute; log:\n{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepull_images_arrive_without_a_pull_request_and_missing_ones_are_retried() {
    let (containerd, registry) = start(Registry::open);
    let pause = images::busybox()
        .tag("3.9")
        .build()
        .push(&registry, "pause");
    // Not in the registry yet when the daemon starts.
    let late = images::random_image(64 << 10, 1, "1");
    let late_reference = format!("{}/team/late:1", registry.host());
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .extra_toml(&format!(
            "[pull]\nprepull = [\"{}\", \"{late_reference}\"]\npinned = [\"{}\"]\n",
            pause.reference, pause.reference
        ))
        .start();
    let found = appears(&daemon, &pause.reference).await;
    assert!(found.pinned, "the sandbox image is pre-pulled and pinned");
    assert_eq!(found.id, pause.config_digest);
    assert!(status(daemon.socket(), &late_reference).await.is_none());
    let pushed = late.push(&registry, "team/late");
    let found = appears(&daemon, &late_reference).await;
    assert_eq!(found.id, pushed.config_digest);
    let log = daemon.log();
    assert!(log.contains("pre-pull failed; will retry"), "{log}");
    assert!(log.contains("pre-pulled"), "{log}");
}
