//! The image index behind ListImages and ImageStatus, against a real containerd:
//! our own pulls and removals read back at once, changes made behind the daemon's
//! back with `ctr -n k8s.io images tag/rm` are followed from containerd's event
//! stream, and after containerd restarts the index lists everything again. Waits are
//! polls with a generous bound; nothing asserts how long anything took.

mod common;

use std::time::{Duration, Instant};

use common::cri::{proto, DaemonConfig};
use common::images;
use common::registry::Registry;
use common::scenario::{containerd_without_cri, pull_ok, start_with, status};

/// Bounds every wait for the index to follow; only a hang guard.
const FOLLOW_LIMIT: Duration = Duration::from_secs(60);
/// The daemon's debug line once its index has listed and follows the event stream.
const IN_STEP: &str = "image index in step with containerd";

async fn list(daemon: &common::cri::Daemon) -> Vec<proto::Image> {
    daemon
        .client()
        .await
        .list_images(proto::ListImagesRequest { filter: None })
        .await
        .unwrap_or_else(|s| panic!("ListImages: {s}\ndaemon log:\n{}", daemon.log()))
        .into_inner()
        .images
}

/// The repo tags ListImages gives image `id` (empty when it is not listed).
async fn tags_of(daemon: &common::cri::Daemon, id: &str) -> Vec<String> {
    list(daemon)
        .await
        .into_iter()
        .find(|i| i.id == id)
        .map(|i| i.repo_tags)
        .unwrap_or_default()
}

/// Polls ListImages until `want` holds for image `id`'s tags; panics after
/// [`FOLLOW_LIMIT`] with what it saw last.
async fn until_tags(
    daemon: &common::cri::Daemon,
    id: &str,
    what: &str,
    want: impl Fn(&[String]) -> bool,
) {
    let started = Instant::now();
    loop {
        let tags = tags_of(daemon, id).await;
        if want(&tags) {
            return;
        }
        assert!(
            started.elapsed() < FOLLOW_LIMIT,
            "ListImages never showed {what}; last tags: {tags:?}\ndaemon log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_tag_and_rm_behind_our_back_are_seen_by_list_and_status() {
    let (containerd, registry) = start_with(containerd_without_cri, Registry::open);
    let pushed = images::busybox().build().push(&registry, "index/app");
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .env("RUST_LOG", "cri_imaged=debug")
        .start();
    // Read before the pull, so the index is built and following first.
    assert!(list(&daemon).await.is_empty());

    let id = pull_ok(&daemon, &pushed.reference, None).await;
    // Our own write is listed at once, not after its event comes back.
    assert_eq!(tags_of(&daemon, &id).await, [pushed.reference.as_str()]);

    let alias = format!("{}/index/alias:v1", registry.host());
    containerd.ctr_ok(&["images", "tag", &pushed.reference, &alias]);
    until_tags(&daemon, &id, "the tag ctr added", |tags| {
        tags.contains(&alias)
    })
    .await;
    let found = status(daemon.socket(), &alias)
        .await
        .expect("ImageStatus of the tag ctr added");
    assert_eq!(found.id, id);

    containerd.ctr_ok(&["images", "rm", &alias]);
    until_tags(&daemon, &id, "the tag ctr removed gone", |tags| {
        tags == [pushed.reference.clone()]
    })
    .await;
    assert!(status(daemon.socket(), &alias).await.is_none());

    // Every name of the image removed behind our back: the image is gone.
    let names: Vec<String> = containerd
        .image_names()
        .into_iter()
        .filter(|n| n.contains("index/app") || *n == id)
        .collect();
    let mut rm = vec!["images", "rm"];
    rm.extend(names.iter().map(String::as_str));
    containerd.ctr_ok(&rm);
    let started = Instant::now();
    while list(&daemon).await.iter().any(|i| i.id == id) {
        assert!(
            started.elapsed() < FOLLOW_LIMIT,
            "the removed image stays listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(status(daemon.socket(), &pushed.reference).await.is_none());
    // Followed from the event stream, not listed anew on every read (the line comes
    // once the first list is in; it was long before here, but waiting costs nothing).
    let started = Instant::now();
    while !daemon.log().contains(IN_STEP) {
        assert!(
            started.elapsed() < FOLLOW_LIMIT,
            "the index never caught up:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_containerd_restarts_the_index_lists_again_and_follows() {
    let (mut containerd, registry) = start_with(containerd_without_cri, Registry::open);
    let pushed = images::busybox().build().push(&registry, "index/restart");
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .env("RUST_LOG", "cri_imaged=debug")
        .start();
    let id = pull_ok(&daemon, &pushed.reference, None).await;
    assert_eq!(tags_of(&daemon, &id).await, [pushed.reference.as_str()]);

    // In step before the restart (the first read started the index; its stream may
    // still be subscribing), so that the count below is of lists after it.
    let started = Instant::now();
    while !daemon.log().contains(IN_STEP) {
        assert!(
            started.elapsed() < FOLLOW_LIMIT,
            "the index never got in step:\n{}",
            daemon.log()
        );
        list(&daemon).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The daemon's event stream breaks; a tag made as soon as containerd is back may
    // come before the daemon subscribes again, so only the new list can show it.
    containerd.restart();
    let before = format!("{}/index/before-resubscribe:v1", registry.host());
    containerd.ctr_ok(&["images", "tag", &pushed.reference, &before]);
    // Until the index is in step again reads list from containerd; wait for it (a
    // read wakes it from its wait between attempts), then the tag is in memory too.
    let started = Instant::now();
    while daemon.log().matches(IN_STEP).count() < 2 {
        assert!(
            started.elapsed() < FOLLOW_LIMIT,
            "the index did not list again after the restart:\n{}",
            daemon.log()
        );
        list(&daemon).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_tags(
        &daemon,
        &id,
        "the tag made right after the restart",
        |tags| tags.contains(&before),
    )
    .await;

    // And it follows the new stream.
    let after = format!("{}/index/after-resubscribe:v1", registry.host());
    containerd.ctr_ok(&["images", "tag", &pushed.reference, &after]);
    containerd.ctr_ok(&["images", "rm", &before]);
    until_tags(
        &daemon,
        &id,
        "the later tag, without the removed one",
        |tags| tags.contains(&after) && !tags.contains(&before),
    )
    .await;
    assert_eq!(
        status(daemon.socket(), &after).await.map(|i| i.id),
        Some(id.clone())
    );
    assert!(status(daemon.socket(), &before).await.is_none());
}
