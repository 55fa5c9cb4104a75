//! Short names (a name without a registry host) against real registries and a real
//! containerd, as registries.conf and its drop-ins say: unqualified-search registries
//! in order, an alias from a `.d` drop-in, enforcing mode's ambiguity error, and
//! Docker Hub when nothing is configured. Whatever served it, the image is recorded
//! fully qualified, and ImageStatus of the short name finds it (kubelet asks so).

mod common;

use common::cri::{explain, DaemonConfig};
use common::images;
use common::registry::Registry;
use common::scenario::{pull_err_code, pull_ok, start_many, status};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_registries_are_tried_in_order_and_the_image_recorded_fully_qualified() {
    let (containerd, registries) =
        start_many(vec![Box::new(Registry::open), Box::new(Registry::open)]);
    let (first, second) = (&registries[0], &registries[1]);
    let image = images::busybox().tag("1").build().push(second, "team/app");
    let daemon = DaemonConfig::new(&containerd)
        .registry(first)
        .registry(second)
        .registries_conf(&format!(
            "unqualified-search-registries = [\"{}\", \"{}\"]\n",
            first.host(),
            second.host()
        ))
        .start();
    assert_eq!(
        pull_ok(&daemon, "team/app:1", None).await,
        image.config_digest
    );
    let found = status(daemon.socket(), "team/app:1")
        .await
        .expect("ImageStatus of the short name finds the pulled image");
    assert_eq!(found.repo_tags, std::slice::from_ref(&image.reference));
    assert_eq!(
        found.repo_digests,
        std::slice::from_ref(&image.digest_reference)
    );
    // containerd's own CRI knows it by the fully qualified name only.
    let mut theirs = None;
    for _ in 0..100 {
        theirs = status(containerd.socket(), &image.reference).await;
        if theirs.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        theirs.expect("containerd's CRI sees it").id,
        image.config_digest
    );
    let log = daemon.log();
    assert!(
        log.contains("short-name candidate failed; trying the next one"),
        "the first registry's 404 is logged before the second serves:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_from_a_drop_in_wins_over_search_and_enforcing_refuses_ambiguity() {
    let (containerd, registries) =
        start_many(vec![Box::new(Registry::open), Box::new(Registry::open)]);
    let (first, second) = (&registries[0], &registries[1]);
    let tool = images::busybox()
        .tag("3")
        .build()
        .push(second, "tools/tool");
    let daemon = DaemonConfig::new(&containerd)
        .registry(first)
        .registry(second)
        .registries_conf(&format!(
            "unqualified-search-registries = [\"{}\", \"{}\"]\nshort-name-mode = \"enforcing\"\n",
            first.host(),
            second.host()
        ))
        .registries_drop_in(
            "50-site.conf",
            &format!("[aliases]\n\"tool\" = \"{}/tools/tool\"\n", second.host()),
        )
        .start();
    assert_eq!(pull_ok(&daemon, "tool:3", None).await, tool.config_digest);
    assert!(status(daemon.socket(), "tool:3").await.is_some());
    // explain shows how the name resolved.
    let (explained, _) = explain(daemon.config_path(), "tool:3");
    assert_eq!(explained["image"], tool.reference);
    assert!(
        explained["resolution"]
            .as_str()
            .is_some_and(|r| r.starts_with("alias \"tool\"") && r.contains("50-site.conf")),
        "{explained}"
    );
    let ambiguous = pull_err_code(&daemon, "other:1", Code::InvalidArgument).await;
    let message = ambiguous.message();
    assert!(
        message.contains("ambiguous")
            && message.contains(&format!("{}/other:1", first.host()))
            && message.contains(&format!("{}/other:1", second.host())),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_candidate_failing_lists_each() {
    let (containerd, registries) =
        start_many(vec![Box::new(Registry::open), Box::new(Registry::open)]);
    let (first, second) = (&registries[0], &registries[1]);
    let daemon = DaemonConfig::new(&containerd)
        .registry(first)
        .registry(second)
        .registries_conf(&format!(
            "unqualified-search-registries = [\"{}\", \"{}\"]\n",
            first.host(),
            second.host()
        ))
        .start();
    let missing = pull_err_code(&daemon, "nowhere:1", Code::NotFound).await;
    assert!(
        missing
            .message()
            .contains(&format!("{}/nowhere:1", first.host()))
            && missing
                .message()
                .contains(&format!("{}/nowhere:1", second.host())),
        "{}",
        missing.message()
    );
}
