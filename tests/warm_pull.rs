//! A re-pull of an image that is already here sends one manifest request, a HEAD
//! (as containerd resolves; Docker Hub counts GETs against its pull rate limit),
//! and nothing else; by tag and by digest, for a manifest and for an index, with the
//! in-process fake registry (which records every request) and with the real
//! docker-registry (its access log). A moved tag, a registry refusing HEAD or one
//! giving no digest fall back to the GET. policy.json signatures are still verified
//! on a warm pull, on the manifest read from containerd's content store.

mod common;

use common::cri::{Daemon, DaemonConfig};
use common::fake_registry::{FakeRegistry, Faults, SeenRequest};
use common::images;
use common::leftovers::assert_nothing_left;
use common::registry::Registry;
use common::scenario::{containerd_without_cri, pull_err_code, pull_ok, start, start_with};
use common::signing::{self, CosignKey};
use serde_json::json;
use tonic::Code;

const ACCEPT_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn daemon(containerd: &common::containerd::Containerd, fake: &FakeRegistry) -> Daemon {
    DaemonConfig::new(containerd)
        .registries_conf(&fake.insecure_entry())
        .env("RUST_LOG", "cri_imaged=debug")
        .start()
}

/// The requests since the last clear, as `METHOD PATH STATUS`.
fn shown(requests: &[SeenRequest]) -> Vec<String> {
    requests
        .iter()
        .map(|r| format!("{} {} {}", r.method, r.path, r.status))
        .collect()
}

/// Pulls `image` (already here) and returns what the registry saw for it.
async fn repull(daemon: &Daemon, fake: &FakeRegistry, image: &str, id: &str) -> Vec<SeenRequest> {
    fake.clear_requests();
    assert_eq!(pull_ok(daemon, image, None).await, id, "re-pull of {image}");
    fake.requests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_repull_sends_only_a_manifest_head_by_tag_and_by_digest() {
    let fake = FakeRegistry::start();
    let single = images::busybox().tag("1").build();
    let index = images::multi_arch("multi");
    let single_ref = fake.serve_image(&single, "warm/single");
    let index_ref = fake.serve_image(&index, "warm/index");
    let containerd = containerd_without_cri();
    let daemon = daemon(&containerd, &fake);

    for (image, top) in [(&single, &single_ref), (&index, &index_ref)] {
        let id = image.host().config.digest.clone();
        let repo = top
            .split_once('/')
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(repo, _)| repo.to_string())
            .expect("HOST/REPO:TAG");
        let by_digest = format!("{}/{repo}@{}", fake.host(), image.top.digest);
        for reference in [top.clone(), by_digest] {
            assert_eq!(pull_ok(&daemon, &reference, None).await, id);
            let seen = repull(&daemon, &fake, &reference, &id).await;
            let manifest_ref = reference
                .rsplit_once('@')
                .map(|(_, d)| d.to_string())
                .unwrap_or_else(|| image.tag.clone());
            assert_eq!(
                shown(&seen),
                [format!("HEAD /v2/{repo}/manifests/{manifest_ref} 200")],
                "re-pull of {reference}"
            );
            let accept = seen[0].header("accept").unwrap_or_default();
            assert!(accept.contains(ACCEPT_INDEX), "{accept}");
        }
    }
    assert!(
        daemon
            .log()
            .contains("nothing to write (manifest HEAD: unchanged at the registry)"),
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_a_refused_head_and_a_missing_digest_fall_back_to_get() {
    let fake = FakeRegistry::start();
    let first = images::busybox().tag("v").app_text("first\n").build();
    let reference = fake.serve_image(&first, "warm/moving");
    let containerd = containerd_without_cri();
    let daemon = daemon(&containerd, &fake);
    let first_id = first.host().config.digest.clone();
    assert_eq!(pull_ok(&daemon, &reference, None).await, first_id);
    let tag_path = "/v2/warm/moving/manifests/v";

    // A registry that answers HEAD with 405: the GET decides.
    fake.set_faults(Faults {
        manifest_head_status: Some(405),
        ..Default::default()
    });
    let seen = repull(&daemon, &fake, &reference, &first_id).await;
    assert_eq!(
        shown(&seen),
        [
            format!("HEAD {tag_path} 405"),
            format!("GET {tag_path} 200")
        ]
    );

    // No Docker-Content-Digest on the HEAD: the GET too.
    fake.set_faults(Faults {
        manifest_head_without_digest: true,
        ..Default::default()
    });
    let seen = repull(&daemon, &fake, &reference, &first_id).await;
    assert_eq!(
        shown(&seen),
        [
            format!("HEAD {tag_path} 200"),
            format!("GET {tag_path} 200")
        ]
    );
    fake.set_faults(Faults::default());

    // The tag moves to another image: HEAD sees it, GET fetches it, and the blobs.
    let second = images::busybox().tag("v").app_text("second\n").build();
    assert_eq!(fake.serve_image(&second, "warm/moving"), reference);
    let second_id = second.host().config.digest.clone();
    let seen = repull(&daemon, &fake, &reference, &second_id).await;
    let manifests: Vec<String> = shown(&seen)
        .into_iter()
        .filter(|r| r.contains("/manifests/"))
        .collect();
    assert_eq!(
        manifests,
        [
            format!("HEAD {tag_path} 200"),
            format!("GET {tag_path} 200")
        ]
    );
    assert!(seen.iter().any(SeenRequest::is_blob), "{:?}", shown(&seen));
    // And now that one is here: a HEAD again.
    let seen = repull(&daemon, &fake, &reference, &second_id).await;
    assert_eq!(shown(&seen), [format!("HEAD {tag_path} 200")]);
}

/// Lines of docker-registry's access log that ask for a manifest of `repo`.
fn manifest_requests(log: &str, repo: &str) -> Vec<String> {
    let needle = format!(" /v2/{repo}/manifests/");
    log.lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| {
            // `… "HEAD /v2/… HTTP/1.1" 200 …`: the quoted request line.
            let start = line.find(&needle)?;
            let method_start = line[..start].rfind('"')? + 1;
            Some(line[method_start..start].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_registry_sees_one_head_for_a_warm_repull() {
    let (containerd, registry) = start_with(containerd_without_cri, Registry::open);
    let pushed = images::busybox().build().push(&registry, "warm/real");
    let daemon = DaemonConfig::new(&containerd).registry(&registry).start();
    assert_eq!(
        pull_ok(&daemon, &pushed.reference, None).await,
        pushed.config_digest
    );
    let before = registry.log().len();
    assert_eq!(
        pull_ok(&daemon, &pushed.reference, None).await,
        pushed.config_digest
    );
    assert_eq!(
        pull_ok(&daemon, &pushed.digest_reference, None).await,
        pushed.config_digest
    );
    let log = registry.log();
    let since = log.get(before..).unwrap_or(&log);
    assert_eq!(
        manifest_requests(since, "warm/real"),
        ["HEAD", "HEAD"],
        "registry log of the re-pulls:\n{since}"
    );
    assert!(
        !since.contains("/blobs/"),
        "a warm re-pull fetched blobs:\n{since}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_repull_still_verifies_signatures() {
    let (containerd, registry) = start(Registry::open);
    let host = registry.host().to_string();
    let key = CosignKey::generate();
    let stranger = CosignKey::generate();
    let keys = tempfile::tempdir().unwrap();
    let (key_path, stranger_path) = (keys.path().join("key.pub"), keys.path().join("other.pub"));
    key.write_public_key(&key_path).unwrap();
    stranger.write_public_key(&stranger_path).unwrap();
    let signed = images::busybox()
        .tag("1")
        .app_text("signed\n")
        .build()
        .push(&registry, "warm/signed");
    signing::sign_sigstore(
        &registry,
        "warm/signed",
        &signed.digest,
        &format!("{host}/warm/signed"),
        key.key_pair(),
    );
    let policy = |path: &std::path::Path| {
        json!({
            "default": [{"type": "reject"}],
            "transports": {"docker": {
                host.clone(): [{"type": "sigstoreSigned", "keyPath": path, "signedIdentity": {"type": "matchRepository"}}],
            }}
        })
        .to_string()
    };
    let sigstore_d = format!("docker:\n  \"{host}\":\n    use-sigstore-attachments: true\n");
    let trusting = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&policy(&key_path))
        .registries_d("sigstore.yaml", &sigstore_d)
        .start();
    assert_eq!(
        pull_ok(&trusting, &signed.reference, None).await,
        signed.config_digest
    );
    let before = registry.log().len();
    assert_eq!(
        pull_ok(&trusting, &signed.reference, None).await,
        signed.config_digest
    );
    let log = registry.log();
    let since = log.get(before..).unwrap_or(&log);
    let requests = manifest_requests(since, "warm/signed");
    // The image's manifest: one HEAD; its signature's tag: read as before.
    assert_eq!(
        requests.iter().filter(|m| *m == "HEAD").count(),
        1,
        "{since}"
    );
    assert!(
        since.contains("/manifests/sha256-"),
        "the warm re-pull read no signature:\n{since}"
    );
    assert_eq!(
        trusting.log().matches("signatures verified").count(),
        2,
        "{}",
        trusting.log()
    );

    // Another daemon, trusting only a stranger's key, finds the image here and still
    // refuses it.
    let distrusting = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&policy(&stranger_path))
        .registries_d("sigstore.yaml", &sigstore_d)
        .start();
    let names = containerd.image_names();
    let status = pull_err_code(&distrusting, &signed.reference, Code::PermissionDenied).await;
    assert!(
        status.message().starts_with("SignatureValidationFailed: "),
        "{}",
        status.message()
    );
    assert_nothing_left(&containerd, &names, "the refused warm re-pull");
}
