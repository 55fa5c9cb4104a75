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
