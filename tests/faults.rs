//! Registry misbehaviour, from an in-process fake registry, against the real daemon
//! and a real containerd: corrupt and dropped blobs, cross-host redirects, error
//! statuses, schema 1 and inconsistent images, credentials over plain HTTP, and a
//! client that gives up mid-pull. Each failure must leave nothing in containerd and
//! the daemon serving.

mod common;

use std::time::Duration;

use common::containerd::Containerd;
use common::cri::{self, proto, Daemon, DaemonConfig};
use common::fake_registry::{FakeRegistry, Faults, Hostile};
use common::images::{self, OciImage, MEDIA_MANIFEST};
use common::leftovers::{self, assert_nothing_left, assert_serving};
use common::scenario::{containerd_without_cri as containerd, password_auth, pull, pull_fails};
use tonic::Code;

/// The most memory the daemon may take at any point of a fault test: hostile
/// registries (endless bodies, huge documents) must never grow it.
const PEAK_RSS_LIMIT: u64 = 200 << 20;

/// A daemon whose peak RSS is checked when the test is done with it.
struct Watched(Daemon);

impl std::ops::Deref for Watched {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.0
    }
}

impl std::ops::DerefMut for Watched {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.0
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // Not over a failing test's own panic; and a killed daemon has no figure.
        if std::thread::panicking() {
            return;
        }
        if let Some(peak) = self.0.peak_rss_bytes() {
            eprintln!("cri-imaged peak RSS: {} MiB", peak >> 20);
            assert!(
                peak < PEAK_RSS_LIMIT,
                "the daemon's peak RSS was {} MiB (limit {} MiB)",
                peak >> 20,
                PEAK_RSS_LIMIT >> 20
            );
        }
    }
}

/// A daemon storing into `containerd` whose registries.conf is `registries_conf`.
fn daemon(containerd: &Containerd, registries_conf: &str) -> Watched {
    Watched(
        DaemonConfig::new(containerd)
            .registries_conf(registries_conf)
            .env("RUST_LOG", "cri_imaged=debug")
            .start(),
    )
}

/// The busybox image's first (largest) layer: the busybox binary.
fn big_layer(image: &OciImage) -> String {
    image.host().layers[0].digest.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_layer_is_data_loss_and_leaves_nothing() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/corrupt");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    let layer = big_layer(&image);

    fake.set_faults(Faults {
        corrupt_blob: Some(layer.clone()),
        ..Default::default()
    });
    let status = pull_fails(&daemon, cri::pull_request(&reference, None), Code::DataLoss).await;
    assert!(status.message().contains(&layer), "{}", status.message());
    assert_nothing_left(&containerd, &[], "a corrupt layer");
    assert_serving(daemon.socket()).await;

    fake.set_faults(Faults::default());
    let id = pull(&daemon, &reference, None)
        .await
        .expect("pull once the layer is served right");
    assert_eq!(id, image.host().config.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_dropped_mid_blob_resumes_with_a_range_request() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/resume");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    let layer = big_layer(&image);
    let size = image.host().layers[0].size as usize;
    let sent = size / 3;
    assert!(sent > 0, "the busybox layer is {size} bytes");

    fake.set_faults(Faults {
        drop_blob_once: Some((layer.clone(), sent)),
        ..Default::default()
    });
    let id = pull(&daemon, &reference, None)
        .await
        .expect("the pull survives one dropped connection");
    assert_eq!(id, image.host().config.digest);

    let gets: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(&layer))
        .collect();
    assert!(gets.len() >= 2, "expected a retry: {gets:?}");
    assert_eq!(gets[0].header("range"), None, "{gets:?}");
    let range = gets[1]
        .header("range")
        .unwrap_or_else(|| panic!("the retry has no Range header: {gets:?}"));
    let offset: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("Range {range:?} is not `bytes=N-`"));
    assert!(
        offset > 0 && offset <= sent,
        "resumed at {offset}, {sent} bytes were sent"
    );
    assert_eq!(gets[1].status, 206);
    if cri::unpacks_in_house_by_default() {
        // The resumed body continued the stream where it broke: the layer was still
        // extracted as it downloaded.
        let log = daemon.log();
        assert!(log.contains(&cri::staged_line(&layer, true)), "{log}");
    }
    assert_nothing_left(&containerd, &containerd.image_names(), "a resumed pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_another_host_does_not_carry_the_credentials() {
    let fake = FakeRegistry::start();
    let storage = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/redirect");
    storage.serve_image(&image, "faults/redirect");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());

    let password = "redirect-S3cret";
    fake.set_faults(Faults {
        basic_auth: Some(("alice".into(), password.into())),
        redirect_blobs_to: Some(storage.host()),
        ..Default::default()
    });
    // Without credentials the registry refuses: credentials are really in play.
    pull_fails(
        &daemon,
        cri::pull_request(&reference, None),
        Code::Unauthenticated,
    )
    .await;
    fake.clear_requests();

    let id = pull(&daemon, &reference, password_auth("alice", password))
        .await
        .expect("pull through the redirect");
    assert_eq!(id, image.host().config.digest);
    let seen = fake.requests();
    assert!(
        seen.iter()
            .any(|r| r.path.contains("/manifests/") && r.status == 200 && r.has_authorization),
        "the registry got the credentials: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.is_blob() && r.status == 307 && r.has_authorization),
        "blob GETs went to the registry with credentials and were redirected: {seen:?}"
    );
    let redirected = storage.requests();
    assert!(
        redirected.iter().any(|r| r.is_blob() && r.status == 200),
        "the storage host served the blobs: {redirected:?}"
    );
    let leaked: Vec<_> = redirected.iter().filter(|r| r.has_authorization).collect();
    assert!(
        leaked.is_empty(),
        "Authorization followed the redirect: {leaked:?}"
    );
    assert!(!daemon.log().contains(password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_schema1_and_inconsistent_images_map_to_their_codes() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/status");
    let containerd = containerd();
    // Retries wait no longer than the progress timeout: keep this test quick.
    let daemon = daemon_with_pull(
        &containerd,
        &fake.insecure_entry(),
        "progress_timeout = \"1s\"",
    );

    // (HTTP status, Retry-After, expected code, what the message must say, tries)
    let cases = [
        (
            429,
            Some("7"),
            Code::ResourceExhausted,
            "retry after 7 s",
            4,
        ),
        (503, None, Code::Unavailable, "RegistryUnavailable", 4),
        (403, None, Code::PermissionDenied, "403", 1),
    ];
    for (http, retry_after, code, says, tries) in cases {
        let headers = retry_after
            .map(|secs| vec![("Retry-After".to_owned(), secs.to_owned())])
            .unwrap_or_default();
        fake.set_faults(Faults {
            manifest_status: Some((http, headers)),
            ..Default::default()
        });
        fake.clear_requests();
        let status = pull_fails(&daemon, cri::pull_request(&reference, None), code).await;
        let manifest_gets = fake
            .requests()
            .iter()
            .filter(|r| r.path.contains("/manifests/"))
            .count();
        assert_eq!(
            manifest_gets, tries,
            "HTTP {http}: 5xx and 429 are retried, 4xx not"
        );
        assert!(
            status.message().contains(says),
            "HTTP {http}: {}",
            status.message()
        );
        if http == 503 {
            assert!(status.message().starts_with("RegistryUnavailable"));
        }
        assert_nothing_left(&containerd, &[], &format!("HTTP {http}"));
    }
    fake.set_faults(Faults::default());

    // A Docker schema 1 manifest (signed; no config, no diff IDs).
    let schema1 = serde_json::json!({
        "schemaVersion": 1,
        "name": "faults/status",
        "tag": "schema1",
        "architecture": images::host_arch(),
        "fsLayers": [{"blobSum": big_layer(&image)}],
        "history": [{"v1Compatibility": "{}"}],
        "signatures": [],
    });
    fake.put_manifest(
        "faults/status",
        "schema1",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        serde_json::to_vec(&schema1).expect("schema 1 JSON"),
    );
    let status = pull_fails(
        &daemon,
        cri::pull_request(&format!("{}/faults/status:schema1", fake.host()), None),
        Code::FailedPrecondition,
    )
    .await;
    assert!(
        status.message().contains("schema 1") && status.message().contains("not supported"),
        "{}",
        status.message()
    );
    assert_nothing_left(&containerd, &[], "a schema 1 manifest");

    // The config lists one diff ID fewer than the manifest has layers.
    let host = image.host();
    let config_bytes = fake.blob(&host.config.digest).expect("config blob");
    let mut config: serde_json::Value = serde_json::from_slice(&config_bytes).expect("config JSON");
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("diff_ids");
    diff_ids.pop();
    let config_bytes = serde_json::to_vec(&config).expect("config JSON");
    let config_size = config_bytes.len();
    let config_digest = fake.put_blob(config_bytes);
    let manifest_bytes = fake.blob(&host.manifest.digest).expect("manifest blob");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&manifest_bytes).expect("manifest JSON");
    manifest["config"]["digest"] = serde_json::json!(config_digest);
    manifest["config"]["size"] = serde_json::json!(config_size);
    fake.put_manifest(
        "faults/status",
        "short-diff-ids",
        MEDIA_MANIFEST,
        serde_json::to_vec(&manifest).expect("manifest JSON"),
    );
    let status = pull_fails(
        &daemon,
        cri::pull_request(
            &format!("{}/faults/status:short-diff-ids", fake.host()),
            None,
        ),
        Code::FailedPrecondition,
    )
    .await;
    assert!(
        status.message().contains("invalid image") && status.message().contains("diff ID"),
        "{}",
        status.message()
    );
    assert_nothing_left(&containerd, &[], "a config with too few diff IDs");

    // A manifest declaring an absurd config, or more layers than any image has, is
    // refused before any blob is fetched.
    let mut huge = manifest.clone();
    huge["config"]["size"] = serde_json::json!(1u64 << 40);
    let mut many = manifest.clone();
    let layer = many["layers"][0].clone();
    many["layers"] = serde_json::Value::Array(vec![layer; 1001]);
    for (tag, bad, says) in [
        ("huge-config", huge, "config"),
        ("many-layers", many, "1001 layers; at most 1000"),
    ] {
        fake.put_manifest(
            "faults/status",
            tag,
            MEDIA_MANIFEST,
            serde_json::to_vec(&bad).expect("manifest JSON"),
        );
        let before = fake.requests().len();
        let status = pull_fails(
            &daemon,
            cri::pull_request(&format!("{}/faults/status:{tag}", fake.host()), None),
            Code::FailedPrecondition,
        )
        .await;
        assert!(
            status.message().contains(says),
            "{tag}: {}",
            status.message()
        );
        assert!(
            fake.requests()[before..]
                .iter()
                .all(|r| !r.path.contains("/blobs/")),
            "{tag}: a blob was fetched"
        );
        assert_nothing_left(&containerd, &[], tag);
    }

    assert_serving(daemon.socket()).await;
    let id = pull(&daemon, &reference, None)
        .await
        .expect("a good pull after the faults");
    assert_eq!(id, host.config.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_over_plain_http_only_to_registries_configured_insecure() {
    let plain = FakeRegistry::start();
    let insecure = FakeRegistry::start();
    let image = images::busybox().build();
    let plain_ref = plain.serve_image(&image, "faults/plain");
    let insecure_ref = insecure.serve_image(&image, "faults/plain");
    let faults = Faults {
        basic_auth: Some(("alice".into(), "plain-S3cret".into())),
        ..Default::default()
    };
    plain.set_faults(faults.clone());
    insecure.set_faults(faults);
    let containerd = containerd();
    // Only `insecure` is configured insecure; `plain` gets the default (HTTPS only).
    let daemon = daemon(&containerd, &insecure.insecure_entry());

    let status = pull_fails(
        &daemon,
        cri::pull_request(&plain_ref, Some(("alice", "plain-S3cret"))),
        Code::Unavailable,
    )
    .await;
    assert!(
        status.message().starts_with("RegistryUnavailable"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("insecure = true"),
        "the message should hint at configuring the registry insecure: {}",
        status.message()
    );
    // Only a TLS hello reached it, which is no HTTP request at all.
    let seen = plain.requests();
    assert!(
        seen.iter().all(|r| !r.has_authorization),
        "credentials went over plain HTTP: {seen:?}"
    );
    assert!(seen.is_empty(), "no HTTP request was expected: {seen:?}");
    assert_nothing_left(&containerd, &[], "a refused plain-HTTP registry");

    let id = pull(
        &daemon,
        &insecure_ref,
        password_auth("alice", "plain-S3cret"),
    )
    .await
    .expect("pull from the registry configured insecure");
    assert_eq!(id, image.host().config.digest);
    let seen = insecure.requests();
    assert!(
        seen.iter()
            .any(|r| r.path.contains("/manifests/") && r.status == 200 && r.has_authorization),
        "the insecure registry got Basic credentials: {seen:?}"
    );
    assert!(!daemon.log().contains("plain-S3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_giving_up_mid_pull_leaves_the_daemon_serving() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/cancel");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    let layer = big_layer(&image);

    fake.set_faults(Faults {
        stall_blobs: vec![(layer.clone(), 16 * 1024)],
        ..Default::default()
    });
    let pulling = spawn_pull(&daemon, &reference).await;
    let started = fake
        .wait_for(Duration::from_secs(60), |r| r.path.ends_with(&layer))
        .await;
    assert!(started.is_some(), "the layer download never started");
    // The client goes away (kubelet's context cancelled): the request future is dropped.
    pulling.abort();
    assert!(pulling.await.is_err_and(|e| e.is_cancelled()));

    assert_serving(daemon.socket()).await;
    let mut client = daemon.client().await;
    client
        .image_fs_info(proto::ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo while an abandoned pull is stalled");

    fake.release(&layer);
    let id = pull(&daemon, &reference, None)
        .await
        .expect("the image can be pulled after the cancelled pull");
    assert_eq!(id, image.host().config.digest);
    assert_nothing_left(
        &containerd,
        &containerd.image_names(),
        "the pull after a cancel",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_whose_only_caller_went_away_stops_downloading_and_releases_its_lease() {
    let fake = FakeRegistry::start();
    let image = images::random_image(8 << 20, 1, "cancelled");
    let reference = fake.serve_image(&image, "faults/cancelled");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    let layer = big_layer(&image);
    // 640 KiB/s: the 8 MiB layer would take 13 s.
    fake.set_faults(Faults {
        trickle_blobs: vec![(layer.clone(), 64 << 10)],
        ..Default::default()
    });
    let pulling = spawn_pull(&daemon, &reference).await;
    // Until the daemon has staged some of it (it writes in 1 MiB steps).
    let downloading = wait_until(|| {
        fake.bodies_sending() == 1
            && leftovers::staged_blobs(&containerd)
                .iter()
                .any(|(_, size)| *size >= 1 << 20)
    })
    .await;
    assert!(downloading, "the layer download never got far");
    // `ctr leases ls` prints a header line, then one line per lease.
    let leases = || containerd.ctr_ok(&["leases", "ls"]).lines().count() - 1;
    assert_eq!(leases(), 1, "the pull holds its lease");

    pulling.abort();
    let left = std::time::Instant::now();
    assert!(
        wait_until(|| fake.bodies_sending() == 0).await,
        "the download went on after its only caller left"
    );
    // The daemon promises a second; the slack is for a loaded machine.
    let stopped = left.elapsed();
    eprintln!("the download stopped {stopped:?} after its only caller left");
    assert!(
        stopped < Duration::from_secs(10),
        "the download stopped {stopped:?} after the caller left"
    );
    let released = wait_until(|| leases() == 0).await;
    assert!(
        released,
        "the cancelled pull's lease is still there: {}",
        containerd.ctr_ok(&["leases", "ls"])
    );
    assert!(
        daemon
            .log()
            .contains("pull cancelled: every caller went away"),
        "{}",
        daemon.log()
    );
    assert!(containerd.image_names().is_empty());
    assert_serving(daemon.socket()).await;

    // The next pull (kubelet's retry) resumes what the cancelled one staged.
    let staged: u64 = leftovers::staged_blobs(&containerd)
        .iter()
        .map(|(_, size)| *size)
        .sum();
    fake.set_faults(Faults::default());
    fake.clear_requests();
    let id = pull(&daemon, &reference, None)
        .await
        .expect("the pull after the cancelled one");
    assert_eq!(id, image.host().config.digest);
    let ranges: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with(&layer))
        .map(|r| r.header("range").unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        ranges,
        [format!("bytes={staged}-")],
        "resumed from the staged bytes"
    );
    assert_nothing_left(&containerd, &containerd.image_names(), "the resumed pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pull_goes_on_for_the_caller_who_stays() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/shared");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    let layer = big_layer(&image);
    fake.set_faults(Faults {
        stall_blobs: vec![(layer.clone(), 16 * 1024)],
        ..Default::default()
    });
    let left = spawn_pull(&daemon, &reference).await;
    let started = fake
        .wait_for(Duration::from_secs(60), |r| r.path.ends_with(&layer))
        .await;
    assert!(started.is_some(), "the layer download never started");
    let stays = spawn_pull(&daemon, &reference).await;
    let joined = wait_until(|| daemon.log().contains("joining a pull already under way")).await;
    assert!(joined, "the second caller did not join: {}", daemon.log());

    left.abort();
    assert!(left.await.is_err_and(|e| e.is_cancelled()));
    // Still downloading for the caller who stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.bodies_sending(), 1, "the shared download was stopped");
    fake.release(&layer);
    let response = stays
        .await
        .expect("pull task")
        .expect("the caller who stayed gets the image");
    assert_eq!(response.into_inner().image_ref, image.host().config.digest);
    let gets = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(&layer))
        .count();
    assert_eq!(gets, 1, "the layer was fetched once");
    assert!(!daemon.log().contains("pull cancelled"), "{}", daemon.log());
    assert_nothing_left(&containerd, &containerd.image_names(), "the shared pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_failing_while_another_downloads_leaves_no_ingest_behind() {
    let fake = FakeRegistry::start();
    let image = images::random_image(6 << 20, 2, "parallel");
    let reference = fake.serve_image(&image, "faults/parallel");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    let layers = &image.host().layers;
    let (bad, busy) = (layers[0].digest.clone(), layers[1].digest.clone());

    // Layer 1 sends 2 MiB (more than the daemon gathers before writing) and stalls;
    // layer 0 is corrupt and held back until layer 1's partial data is stored —
    // staged by the direct ingest, or in containerd's ingest when streaming — so it
    // fails while layer 1 is mid-download.
    fake.set_faults(Faults {
        corrupt_blob: Some(bad.clone()),
        stall_blobs: vec![(busy.clone(), 2 << 20), (bad.clone(), 1024)],
        ..Default::default()
    });
    let pulling = spawn_pull(&daemon, &reference).await;
    let busy_hex = busy.trim_start_matches("sha256:").to_owned();
    let writing = wait_until(|| {
        let staged = leftovers::staged_blobs(&containerd)
            .iter()
            .any(|(name, size)| name.contains(&busy_hex) && *size > 0);
        // REF SIZE AGE; SIZE is human-readable ("0B", "1.049MB").
        let active = containerd.ctr_ok(&["content", "active"]);
        staged
            || active
                .lines()
                .any(|l| l.contains(&busy_hex) && l.split_whitespace().nth(1) != Some("0B"))
    })
    .await;
    assert!(writing, "layer 1 never reached containerd");
    fake.release(&bad);

    let status = match pulling.await.expect("pull task") {
        Ok(r) => panic!("pull with a corrupt layer succeeded: {:?}", r.into_inner()),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::DataLoss, "{}", status.message());
    assert!(status.message().contains(&bad), "{}", status.message());
    assert_nothing_left(&containerd, &[], "a layer failing mid-pull");

    fake.set_faults(Faults::default());
    let id = pull(&daemon, &reference, None)
        .await
        .expect("pull once the layer is served right");
    assert_eq!(id, image.host().config.digest);
}

/// A PullImage of `reference` through `daemon`'s socket in a task of its own (abort
/// it to make the client go away, as kubelet's cancelled context does).
async fn spawn_pull(
    daemon: &Daemon,
    reference: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<proto::PullImageResponse>, tonic::Status>> {
    let mut client = daemon.client().await;
    let request = cri::pull_request(reference, None);
    tokio::spawn(async move { client.pull_image(request).await })
}

/// Polls `ready` (a blocking check) every 50 ms; `false` if it never held within a
/// minute (which only bounds a hang).
async fn wait_until(mut ready: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A daemon whose `[pull]` section sets `progress` (TOML lines).
fn daemon_with_pull(containerd: &Containerd, registries_conf: &str, progress: &str) -> Watched {
    Watched(
        DaemonConfig::new(containerd)
            .registries_conf(registries_conf)
            .extra_toml(&format!("[pull]\n{progress}"))
            .start(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_blob_fails_the_pull_with_deadline_exceeded_while_the_daemon_answers() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/stall");
    let containerd = containerd();
    let daemon = daemon_with_pull(
        &containerd,
        &fake.insecure_entry(),
        "progress_timeout = \"2s\"",
    );
    let layer = big_layer(&image);
    fake.set_faults(Faults {
        stall_blobs: vec![(layer.clone(), 16 * 1024)],
        ..Default::default()
    });
    let pulling = spawn_pull(&daemon, &reference).await;
    fake.wait_for(Duration::from_secs(60), |r| r.path.ends_with(&layer))
        .await
        .expect("the layer download started");
    // The read RPCs are not held up by the stalled pull.
    let mut client = daemon.client().await;
    tokio::time::timeout(
        Duration::from_secs(1),
        client.list_images(proto::ListImagesRequest { filter: None }),
    )
    .await
    .expect("ListImages answers within a second during a stall")
    .expect("ListImages");
    let status = pulling
        .await
        .expect("the pull task")
        .expect_err("a stalled pull fails");
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    let message = status.message();
    assert!(
        message.contains(&fake.host())
            && message.contains(&layer)
            && message.contains("after 16384 bytes")
            && message.contains("progress_timeout"),
        "{message}"
    );
    assert_nothing_left(&containerd, &[], "a stalled pull");
    fake.release(&layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_below_the_minimum_rate_is_a_stall() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/trickle");
    let containerd = containerd();
    let daemon = daemon_with_pull(
        &containerd,
        &fake.insecure_entry(),
        "progress_timeout = \"1s\"\nmin_bytes_per_second = 100000",
    );
    let layer = big_layer(&image);
    // 1 KiB every 100 ms: about 10 kB/s, a tenth of the minimum.
    fake.set_faults(Faults {
        trickle_blobs: vec![(layer.clone(), 1024)],
        ..Default::default()
    });
    let status = pull(&daemon, &reference, None)
        .await
        .expect_err("a trickling pull fails");
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains(&layer)
            && status
                .message()
                .contains("below pull.min_bytes_per_second 100000"),
        "{}",
        status.message()
    );
    assert_nothing_left(&containerd, &[], "a trickling pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_mirror_hands_over_to_the_origin() {
    let (mirror, origin) = (FakeRegistry::start(), FakeRegistry::start());
    let image = images::busybox().build();
    let reference = origin.serve_image(&image, "faults/mirrored");
    mirror.serve_image(&image, "faults/mirrored");
    let layer = big_layer(&image);
    mirror.set_faults(Faults {
        stall_blobs: vec![(layer.clone(), 4096)],
        ..Default::default()
    });
    let containerd = containerd();
    let conf = format!(
        "{}\n{}\n[[registry]]\nprefix = \"{}\"\ninsecure = true\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
        origin.insecure_entry(),
        mirror.insecure_entry(),
        origin.host(),
        mirror.host()
    );
    let daemon = daemon_with_pull(&containerd, &conf, "progress_timeout = \"1s\"");
    let id = pull(&daemon, &reference, None)
        .await
        .unwrap_or_else(|s| panic!("{}: {}\n{}", s.code(), s.message(), daemon.log()));
    assert_eq!(id, image.host().config.digest);
    assert!(
        mirror.requests().iter().any(|r| r.path.ends_with(&layer)),
        "the mirror was tried first"
    );
    mirror.release(&layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_5xx_is_retried_with_backoff_and_the_pull_succeeds() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/flaky");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    fake.set_faults(Faults {
        manifest_status: Some((503, Vec::new())),
        manifest_status_times: Some(std::sync::Arc::new(2.into())),
        ..Default::default()
    });
    let id = pull(&daemon, &reference, None)
        .await
        .unwrap_or_else(|s| panic!("{}: {}", s.code(), s.message()));
    assert_eq!(id, image.host().config.digest);
    let manifest_gets = fake
        .requests()
        .iter()
        .filter(|r| r.path.contains("/manifests/") && r.method == "GET")
        .count();
    assert!(
        manifest_gets >= 3,
        "two 503s, then the manifest: {manifest_gets}"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("transient registry failure; retrying").count(),
        2,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_wide_pull_limit_queues_the_rest_in_arrival_order() {
    let fake = FakeRegistry::start();
    // Three images with layers of their own, each stalled after 1 KiB.
    let images: Vec<OciImage> = (0..3)
        .map(|i| images::random_image(256 << 10, 1, &format!("q{i}")))
        .collect();
    let references: Vec<String> = images
        .iter()
        .enumerate()
        .map(|(i, image)| fake.serve_image(image, &format!("faults/q{i}")))
        .collect();
    let layers: Vec<String> = images.iter().map(big_layer).collect();
    let containerd = containerd();
    let daemon = daemon_with_pull(
        &containerd,
        &fake.insecure_entry(),
        "max_concurrent_pulls = 2",
    );
    fake.set_faults(Faults {
        stall_blobs: layers.iter().map(|l| (l.clone(), 1024)).collect(),
        ..Default::default()
    });
    let mut pulls = Vec::new();
    for reference in &references {
        let mut client = daemon.client().await;
        let request = cri::pull_request(reference, None);
        pulls.push(tokio::spawn(
            async move { client.pull_image(request).await },
        ));
    }
    // Two pulls reach their stalled layers; the third waits for a slot and has not
    // contacted the registry at all.
    let started = || {
        let seen = fake.requests();
        (0..3)
            .filter(|i| {
                let repo = format!("/v2/faults/q{i}/");
                seen.iter().any(|r| r.path.starts_with(&repo))
            })
            .count()
    };
    let downloading = || {
        let seen = fake.requests();
        layers
            .iter()
            .filter(|l| seen.iter().any(|r| r.path.ends_with(l.as_str())))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while downloading() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "two pulls never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        started(),
        2,
        "a third pull contacted the registry: {:?}",
        fake.requests()
    );
    assert!(
        daemon.log().contains("all pull slots taken"),
        "{}",
        daemon.log()
    );
    for layer in &layers {
        fake.release(layer);
    }
    for (pull, image) in pulls.into_iter().zip(&images) {
        let id = pull
            .await
            .expect("pull task")
            .expect("every queued pull completes");
        assert_eq!(id.into_inner().image_ref, image.host().config.digest);
    }
    assert_eq!(started(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_images_sharing_a_layer_fetch_it_once() {
    let fake = FakeRegistry::start();
    // Same busybox layer, different configs: two images, one shared blob.
    let root = images::busybox().build();
    let other = images::busybox()
        .user(images::ImageUser::Uid("1000".into()))
        .build();
    assert_ne!(root.host().config.digest, other.host().config.digest);
    let layer = big_layer(&root);
    assert_eq!(layer, big_layer(&other));
    let references = [
        fake.serve_image(&root, "faults/shared-a"),
        fake.serve_image(&other, "faults/shared-b"),
    ];
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    fake.set_faults(Faults {
        stall_blobs: vec![(layer.clone(), 4096)],
        ..Default::default()
    });
    let mut pulls = Vec::new();
    for reference in &references {
        let mut client = daemon.client().await;
        let request = cri::pull_request(reference, None);
        pulls.push(tokio::spawn(
            async move { client.pull_image(request).await },
        ));
    }
    // Both pulls are under way (both configs fetched) before the layer moves on.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = fake.requests();
        let configs = [&root, &other]
            .iter()
            .filter(|i| {
                seen.iter()
                    .any(|r| r.path.ends_with(&i.host().config.digest))
            })
            .count();
        if configs == 2 && seen.iter().any(|r| r.path.ends_with(&layer)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both pulls never started: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    fake.release(&layer);
    for pull in pulls {
        pull.await.expect("pull task").expect("both pulls complete");
    }
    let layer_gets = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(&layer) && r.method == "GET")
        .count();
    assert_eq!(layer_gets, 1, "the shared layer was fetched once");
    if cri::unpacks_in_house_by_default() {
        // ... and extracted once: the other pull waited for its snapshot.
        let log = daemon.log();
        let staged = log
            .lines()
            .filter(|l| l.contains(&format!("layer staged digest={layer} ")))
            .count();
        assert_eq!(
            staged, 1,
            "the shared layer was extracted {staged} times: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_cut_by_kill_9_resumes_its_blob_with_a_range_request_after_restart() {
    let fake = FakeRegistry::start();
    let image = images::random_image(8 << 20, 1, "1");
    let reference = fake.serve_image(&image, "faults/killed");
    let containerd = containerd();
    let layer = big_layer(&image);
    let sent = 6 << 20;
    fake.set_faults(Faults {
        stall_blobs: vec![(layer.clone(), sent)],
        ..Default::default()
    });
    let mut first = daemon(&containerd, &fake.insecure_entry());
    let pulling = spawn_pull(&first, &reference).await;
    // What arrived is staged beside containerd's content before the process dies.
    let staging = containerd
        .root()
        .join("io.containerd.content.v1.content/cri-imaged-ingest");
    let staged = || -> u64 {
        std::fs::read_dir(&staging)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    assert!(
        wait_until(|| staged() >= 4 << 20).await,
        "staged {} bytes",
        staged()
    );
    first.kill();
    let _ = pulling.await;
    let kept = staged();
    fake.set_faults(Faults::default());
    fake.clear_requests();

    let second = daemon(&containerd, &fake.insecure_entry());
    pull(&second, &reference, None)
        .await
        .expect("the pull after the restart");
    let ranges: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with(&layer))
        .map(|r| r.header("range").unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        ranges,
        [format!("bytes={kept}-")],
        "resumed from what was staged"
    );
    if cri::unpacks_in_house_by_default() {
        // The first bytes came from the dead daemon's ingest, not the stream: the
        // layer is extracted from the content store once complete.
        let log = second.log();
        assert!(log.contains(&cri::staged_line(&layer, false)), "{log}");
    }
    assert_nothing_left(&containerd, &containerd.image_names(), "the resumed pull");
    assert_eq!(staged(), 0, "the staged file is gone once the blob is in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_and_slowloris_bodies_are_cut_off_without_growing_memory() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "faults/hostile");
    let containerd = containerd();
    let daemon = daemon_with_pull(
        &containerd,
        &fake.insecure_entry(),
        "progress_timeout = \"2s\"",
    );
    let host = fake.host();
    let cases = [
        (
            Hostile::EndlessManifest,
            Code::FailedPrecondition,
            "exceeds the 4194304-byte limit",
        ),
        (Hostile::EndlessErrorBody, Code::Unavailable, "500"),
        (
            Hostile::EndlessToken,
            Code::Unavailable,
            "token response exceeds 1048576 bytes",
        ),
        (
            Hostile::SlowToken,
            Code::DeadlineExceeded,
            "not complete within 2s (pull.progress_timeout)",
        ),
    ];
    for (hostile, code, says) in cases {
        fake.set_faults(Faults {
            hostile: Some(hostile.clone()),
            ..Default::default()
        });
        let asked = std::time::Instant::now();
        let status = pull_fails(&daemon, cri::pull_request(&reference, None), code).await;
        let took = asked.elapsed();
        let message = status.message();
        assert!(message.contains(says), "{hostile:?}: {message}");
        assert!(message.contains(&host), "{hostile:?}: {message}");
        // Only a hang guard: retries of a 500 wait a few seconds, nothing waits long.
        assert!(took < Duration::from_secs(60), "{hostile:?} took {took:?}");
        // The daemon stopped reading: the fake's endless bodies were dropped.
        assert!(
            wait_until(|| fake.bodies_sending() == 0).await,
            "{hostile:?}: still reading an endless body"
        );
        assert_serving(daemon.socket()).await;
        assert_nothing_left(&containerd, &[], &format!("{hostile:?}"));
    }
    // The daemon remembered the Bearer challenge; the registry no longer asks for
    // one, and the realm it named answers 404: the challenge is forgotten.
    fake.set_faults(Faults::default());
    let id = pull(&daemon, &reference, None)
        .await
        .expect("the pull once the registry behaves");
    assert_eq!(id, image.host().config.digest);
    // `Watched` checks the peak RSS when the daemon is dropped.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_callers_of_one_image_share_one_download_of_each_blob() {
    let fake = FakeRegistry::start();
    let image = images::random_image(4 << 20, 3, "twenty");
    let reference = fake.serve_image(&image, "faults/twenty");
    let containerd = containerd();
    let daemon = daemon(&containerd, &fake.insecure_entry());
    // Held until every caller has asked, so all twenty meet one pull in flight.
    let layer = big_layer(&image);
    fake.set_faults(Faults {
        stall_blobs: vec![(layer.clone(), 4096)],
        ..Default::default()
    });
    let mut pulls = Vec::new();
    for _ in 0..20 {
        // Each caller on its own connection, as separate kubelet pod workers.
        let mut client = cri::connect(daemon.socket()).await;
        let request = cri::pull_request(&reference, None);
        pulls.push(tokio::spawn(
            async move { client.pull_image(request).await },
        ));
    }
    let joined = wait_until(|| {
        daemon
            .log()
            .matches("joining a pull already under way")
            .count()
            == 19
    })
    .await;
    assert!(joined, "not every caller joined: {}", daemon.log());
    fake.release(&layer);
    for pull in pulls {
        let response = pull
            .await
            .expect("pull task")
            .expect("every caller gets the image");
        assert_eq!(response.into_inner().image_ref, image.host().config.digest);
    }
    let seen = fake.requests();
    let host = image.host();
    for blob in std::iter::once(&host.config).chain(&host.layers) {
        let gets = seen
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&blob.digest))
            .count();
        assert_eq!(gets, 1, "blob {} fetched {gets} times", blob.digest);
    }
    let manifests = seen
        .iter()
        .filter(|r| r.path.contains("/manifests/"))
        .count();
    assert_eq!(manifests, 1, "the manifest was resolved {manifests} times");
    assert_nothing_left(&containerd, &containerd.image_names(), "twenty callers");
}
