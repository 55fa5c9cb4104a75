//! PullImage over cri-imaged's unix socket against a real containerd and real
//! docker-registry instances: the records, labels and snapshots containerd's own CRI
//! would write, containerd's CRI seeing the same image, multi-arch selection (OCI
//! index and Docker manifest list), Docker schema 2 and zstd layers, the image user,
//! idempotent and concurrent pulls, every kind of request credential, pulls by digest
//! and a tag that moved.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::containerd::Containerd;
use common::cri::{self, proto, Daemon, DaemonConfig};
use common::images::{self, ImageUser, OciImage, PushedImage, MEDIA_INDEX, MEDIA_MANIFEST};
use common::must;
use common::records::{chain_ids, LABEL_CRI_MANAGED};
use common::registry::Registry;
use common::scenario::{cri_pull, password_auth, pull, pull_ok, start, status};
use common::token::{Access, TokenUser};

/// containerd's own CRI learns of images from image events, asynchronously: wait
/// (bounded) until it reports `image`.
async fn containerd_cri_status(containerd: &Containerd, image: &str) -> proto::Image {
    let started = Instant::now();
    loop {
        if let Some(found) = status(containerd.socket(), image).await {
            return found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "containerd's CRI never reported {image}; containerd log:\n{}",
            containerd.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fields both CRIs must agree on, with lists sorted.
fn comparable(
    image: &proto::Image,
) -> (String, Vec<String>, Vec<String>, u64, Option<i64>, String) {
    let mut tags = image.repo_tags.clone();
    tags.sort();
    let mut digests = image.repo_digests.clone();
    digests.sort();
    (
        image.id.clone(),
        tags,
        digests,
        image.size,
        image.uid.as_ref().map(|u| u.value),
        image.username.clone(),
    )
}

/// Asserts the image record names are exactly `names`, each pointing at `target`
/// (of `media_type`) and labelled as managed by containerd's CRI.
fn assert_records(containerd: &Containerd, names: &[&str], target: &str, media_type: &str) {
    let records = containerd.image_records();
    let got: BTreeSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
    let want: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(got, want, "image records: {records:#?}");
    for record in &records {
        assert_eq!(record.target, target, "{record:?}");
        assert_eq!(record.media_type, media_type, "{record:?}");
        assert_eq!(
            record.labels.get(LABEL_CRI_MANAGED).map(String::as_str),
            Some("managed"),
            "{record:?}"
        );
    }
}

/// Runs `image` with `ctr run` and asserts its `/app/hello.txt` holds `text`. The
/// verdict is the exit status: a short-lived container's stdout can get lost between
/// the shim and ctr (containerd/containerd#770), which would make `cat` output flaky.
fn assert_app_text(containerd: &Containerd, image: &str, text: &str) {
    let script = format!(
        "[ \"$(cat /app/hello.txt)\" = '{}' ] && echo same",
        text.trim_end_matches('\n')
    );
    let out = containerd.run_container(image, &["/bin/sh", "-c", &script]);
    assert!(
        out.status.success(),
        "running {image}: /app/hello.txt is not {text:?} or the container failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The repository path (without host) of a pushed image.
fn repo_path(pushed: &PushedImage) -> &str {
    pushed
        .repository
        .split_once('/')
        .map(|(_, path)| path)
        .unwrap_or(&pushed.repository)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_open_registry_writes_containerds_records_labels_and_snapshots_and_runs() {
    pull_from_open_registry(true).await;
}

/// The same pull with every blob streamed through containerd's `Content.Write`
/// (`direct_content = false`): the records, labels and snapshots are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_streaming_blobs_through_containerds_api_writes_the_same() {
    pull_from_open_registry(false).await;
}

async fn pull_from_open_registry(direct_content: bool) {
    let (containerd, open) = start(Registry::open);
    let text = "hello from the open registry\n";
    let pushed = images::busybox()
        .app_text(text)
        .build()
        .push(&open, "pull/busybox");
    let daemon = DaemonConfig::new(&containerd)
        .registry(&open)
        .direct_content(direct_content)
        .start();

    // As kubelet sends it: with the pod's sandbox config and the image as the user
    // wrote it.
    let request = proto::PullImageRequest {
        image: Some(proto::ImageSpec {
            image: pushed.reference.clone(),
            user_specified_image: pushed.reference.clone(),
            ..Default::default()
        }),
        auth: None,
        sandbox_config: Some(proto::PodSandboxConfig {
            metadata: Some(proto::PodSandboxMetadata {
                name: "pod".into(),
                uid: "2b7c1a4e-0000-4000-8000-000000000001".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "pod".into(),
            log_directory: "/var/log/pods/default_pod".into(),
            labels: [("app".to_owned(), "test".to_owned())].into(),
            ..Default::default()
        }),
    };
    let id = daemon
        .client()
        .await
        .pull_image(request)
        .await
        .unwrap_or_else(|s| panic!("PullImage: {s}\n{}", daemon.log()))
        .into_inner()
        .image_ref;
    assert_eq!(id, pushed.config_digest, "image_ref is the config digest");

    // The three names containerd's CRI writes, all targeting the manifest.
    assert_records(
        &containerd,
        &[
            &pushed.reference,
            &pushed.digest_reference,
            &pushed.config_digest,
        ],
        &pushed.digest,
        MEDIA_MANIFEST,
    );

    // GC labels: manifest → config and layers; config → top snapshot; layers carry
    // their diff ID; every blob names the repository it came from.
    let manifest = &pushed.manifests[0];
    let source_key = "containerd.io/distribution.source.127.0.0.1";
    let repo = repo_path(&pushed);
    let labels = containerd
        .content_labels(&pushed.digest)
        .expect("manifest in the content store");
    assert_eq!(
        labels.get("containerd.io/gc.ref.content.config"),
        Some(&manifest.config.digest),
        "{labels:?}"
    );
    for (i, layer) in manifest.layers.iter().enumerate() {
        assert_eq!(
            labels.get(&format!("containerd.io/gc.ref.content.l.{i}")),
            Some(&layer.digest),
            "{labels:?}"
        );
    }
    assert_eq!(labels.get(source_key).map(String::as_str), Some(repo));

    let chains = chain_ids(&manifest.diff_ids);
    let top = chains.last().expect("layers");
    let labels = containerd
        .content_labels(&manifest.config.digest)
        .expect("config in the content store");
    assert_eq!(
        labels.get("containerd.io/gc.ref.snapshot.overlayfs"),
        Some(top),
        "{labels:?}"
    );
    assert_eq!(labels.get(source_key).map(String::as_str), Some(repo));
    for (layer, diff_id) in manifest.layers.iter().zip(&manifest.diff_ids) {
        let labels = containerd
            .content_labels(&layer.digest)
            .unwrap_or_else(|| panic!("layer {} in the content store", layer.digest));
        assert_eq!(
            labels.get("containerd.io/uncompressed"),
            Some(diff_id),
            "{labels:?}"
        );
        assert_eq!(labels.get(source_key).map(String::as_str), Some(repo));
    }

    // Unpacked by cri-imaged (asked before anything runs: ctr run would unpack).
    let mut parent = String::new();
    for chain in &chains {
        let (kind, got_parent) = containerd
            .snapshot(chain)
            .unwrap_or_else(|| panic!("no snapshot named {chain}"));
        assert_eq!(kind, "Committed", "snapshot {chain}");
        assert_eq!(got_parent, parent, "parent of snapshot {chain}");
        parent = chain.clone();
    }
    assert!(containerd.is_unpacked(&pushed.reference));

    assert_app_text(&containerd, &pushed.reference, text);
    // Direct ingest stages beside containerd's content and leaves nothing there;
    // streaming never stages at all.
    let staging = common::leftovers::staging_dir(&containerd);
    assert_eq!(staging.exists(), direct_content, "{}", staging.display());
    assert!(common::leftovers::staged_blobs(&containerd).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerds_cri_reports_each_image_and_user_as_cri_imaged_does() {
    let (containerd, open) = start(Registry::open);
    // (user, /app text, repository, the uid and username ImageStatus must report).
    // In the `user:group` forms the group is not part of the answer.
    let users = [
        (
            ImageUser::Uid("1000".into()),
            "uid\n",
            "user/uid",
            Some(1000),
            "",
        ),
        (
            ImageUser::Name("nobody".into()),
            "named\n",
            "user/named",
            None,
            "nobody",
        ),
        (
            ImageUser::Uid("1000:1000".into()),
            "uid:gid\n",
            "user/uid-gid",
            Some(1000),
            "",
        ),
        (
            ImageUser::Name("nobody:nogroup".into()),
            "name:group\n",
            "user/name-group",
            None,
            "nobody",
        ),
    ];
    let with_user: Vec<(PushedImage, Option<i64>, &str)> = users
        .into_iter()
        .map(|(user, text, repository, uid, username)| {
            let pushed = images::busybox()
                .user(user)
                .app_text(text)
                .build()
                .push(&open, repository);
            (pushed, uid, username)
        })
        .collect();
    let plain_image = images::busybox().app_text("plain\n").build();
    let plain = plain_image.push(&open, "user/none");
    // The same image under a second tag and a second repository: one image with
    // several names.
    let second_tag = must(plain_image.push_as(&open, "user/none", "v2", None));
    let other_repo = plain_image.push(&open, "user/alias");
    let all: Vec<&PushedImage> = with_user
        .iter()
        .map(|(pushed, _, _)| pushed)
        .chain([&plain, &second_tag, &other_repo])
        .collect();
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    for pushed in &all {
        assert_eq!(
            pull_ok(&daemon, &pushed.reference, None).await,
            pushed.config_digest
        );
    }

    for (pushed, uid, username) in &with_user {
        let ours = status(daemon.socket(), &pushed.reference)
            .await
            .expect("cri-imaged ImageStatus");
        let want_uid = uid.map(|value| proto::Int64Value { value });
        assert_eq!(ours.uid, want_uid, "{}", pushed.reference);
        assert_eq!(ours.username, *username, "{}", pushed.reference);
        assert_eq!(ours.repo_tags, vec![pushed.reference.clone()]);
        assert_eq!(ours.repo_digests, vec![pushed.digest_reference.clone()]);
    }
    let ours = status(daemon.socket(), &plain.reference)
        .await
        .expect("plain image");
    assert_eq!(ours.uid, None);
    assert_eq!(ours.username, "");

    // containerd's CRI (the runtime kubelet starts containers through) agrees on
    // every field kubelet reads, image by image.
    for pushed in &all {
        let theirs = containerd_cri_status(&containerd, &pushed.reference).await;
        let ours = status(daemon.socket(), &pushed.reference)
            .await
            .expect("cri-imaged ImageStatus");
        assert_eq!(
            comparable(&ours),
            comparable(&theirs),
            "{}",
            pushed.reference
        );
        assert_eq!(ours.id, pushed.config_digest);
        let m = &pushed.manifests[0];
        assert_eq!(ours.size, m.content_size() + m.manifest.size);
    }
    let ours = status(daemon.socket(), &plain.config_digest)
        .await
        .expect("ImageStatus by ID");
    let mut tags = vec![
        plain.reference.clone(),
        second_tag.reference.clone(),
        other_repo.reference.clone(),
    ];
    tags.sort();
    let mut digests = vec![
        plain.digest_reference.clone(),
        other_repo.digest_reference.clone(),
    ];
    digests.sort();
    assert_eq!(comparable(&ours).1, tags);
    assert_eq!(comparable(&ours).2, digests);

    // And ListImages gives the same set from both.
    let list = |socket: std::path::PathBuf| async move {
        let mut images: Vec<_> = cri::connect(&socket)
            .await
            .list_images(proto::ListImagesRequest { filter: None })
            .await
            .expect("ListImages")
            .into_inner()
            .images
            .iter()
            .map(comparable)
            .collect();
        images.sort();
        images
    };
    let ours = list(daemon.socket().to_path_buf()).await;
    assert_eq!(ours.len(), 5, "one entry per image: {ours:?}");
    assert_eq!(ours, list(containerd.socket().to_path_buf()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_index_selects_the_configured_platform_and_keeps_the_index_as_target() {
    let (containerd, open) = start(Registry::open);
    let other_containerd = Containerd::start();
    let built = images::multi_arch("v1");
    let pushed = built.push(&open, "multi/app");
    let host = built.host().clone();
    let other = built
        .manifests
        .iter()
        .find(|m| m.platform != images::host_platform())
        .expect("a second platform")
        .clone();
    assert_ne!(host.config_digest(), other.config_digest());

    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    let id = pull_ok(&daemon, &pushed.reference, None).await;
    assert_eq!(id, host.config.digest, "the host platform's config");
    assert_records(
        &containerd,
        &[
            &pushed.reference,
            &pushed.digest_reference,
            host.config_digest(),
        ],
        &pushed.digest,
        MEDIA_INDEX,
    );
    let labels = containerd
        .content_labels(&pushed.digest)
        .expect("index in the content store");
    for (i, m) in built.manifests.iter().enumerate() {
        assert_eq!(
            labels.get(&format!("containerd.io/gc.ref.content.m.{i}")),
            Some(&m.manifest.digest),
            "{labels:?}"
        );
    }
    let theirs = containerd_cri_status(&containerd, &pushed.reference).await;
    let ours = status(daemon.socket(), &pushed.reference)
        .await
        .expect("ImageStatus");
    assert_eq!(comparable(&ours), comparable(&theirs));
    assert_eq!(ours.id, host.config.digest);
    assert!(containerd.is_unpacked(&pushed.reference));

    // Removing it takes every name, the index and the host manifest's content.
    daemon
        .client()
        .await
        .remove_image(proto::RemoveImageRequest {
            image: Some(cri::image_spec(&pushed.reference)),
        })
        .await
        .expect("RemoveImage");
    assert!(containerd.image_records().is_empty());
    let content: BTreeSet<String> = containerd.content().into_iter().map(|c| c.digest).collect();
    for digest in [&pushed.digest, &host.manifest.digest, &host.config.digest] {
        assert!(!content.contains(digest), "{digest} left after RemoveImage");
    }

    // `[pull] platform` picks the other manifest instead.
    let platform_daemon = DaemonConfig::new(&other_containerd)
        .registry(&open)
        .platform(&other.platform)
        .start();
    let id = pull_ok(&platform_daemon, &pushed.reference, None).await;
    assert_eq!(id, other.config.digest, "the {} config", other.platform);
    assert_records(
        &other_containerd,
        &[
            &pushed.reference,
            &pushed.digest_reference,
            other.config_digest(),
        ],
        &pushed.digest,
        MEDIA_INDEX,
    );
    let ours = status(platform_daemon.socket(), &pushed.reference)
        .await
        .expect("ImageStatus");
    assert_eq!(ours.id, other.config.digest);
    let top = chain_ids(&other.diff_ids).pop().expect("layers");
    assert_eq!(
        other_containerd
            .snapshot(&top)
            .map(|(kind, _)| kind)
            .as_deref(),
        Some("Committed")
    );
}

/// Lines of docker-registry's access log that GET `repo`'s manifest by `tag`.
fn manifest_gets_by_tag(log: &str, repo: &str, tag: &str) -> usize {
    let needle = format!("\"GET /v2/{repo}/manifests/{tag} HTTP/");
    log.matches(&needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_concurrent_pulls_of_one_image_give_one_image() {
    let (containerd, open) = start(Registry::open);
    let small = images::busybox().build().push(&open, "again/busybox");
    // Big enough that a pull lasts well beyond the moment both requests arrive.
    // More layers than downloads run at once (4): unpacking must still go in order.
    let big = images::random_image(24 << 20, 6, "big").push(&open, "again/big");
    let daemon = DaemonConfig::new(&containerd)
        .registry(&open)
        .env("RUST_LOG", "cri_imaged=debug")
        .start();

    let first = pull_ok(&daemon, &small.reference, None).await;
    let records = containerd.image_records();
    let content: BTreeSet<String> = containerd.content().into_iter().map(|c| c.digest).collect();
    let second = pull_ok(&daemon, &small.reference, None).await;
    assert_eq!(first, second);
    assert_eq!(first, small.config_digest);
    assert_eq!(
        containerd.image_records(),
        records,
        "no new or changed records"
    );
    let again: BTreeSet<String> = containerd.content().into_iter().map(|c| c.digest).collect();
    assert_eq!(again, content, "no new content");
    // The warm pull saw the image whole and wrote nothing: no lease, no blob.
    assert!(
        daemon.log().contains("already pulled; nothing to write"),
        "{}",
        daemon.log()
    );
    assert_eq!(records.len(), 3, "{records:#?}");

    let log_before = open.log().len();
    let (a, b) = tokio::join!(
        pull(&daemon, &big.reference, None),
        pull(&daemon, &big.reference, None)
    );
    let (a, b) = (
        a.expect("first concurrent pull"),
        b.expect("second concurrent pull"),
    );
    assert_eq!(a, big.config_digest);
    assert_eq!(b, big.config_digest);
    let names: BTreeSet<String> = containerd
        .image_records()
        .into_iter()
        .filter(|r| r.target == big.digest)
        .map(|r| r.name)
        .collect();
    let want: BTreeSet<String> = [
        big.reference.clone(),
        big.digest_reference.clone(),
        big.config_digest.clone(),
    ]
    .into();
    assert_eq!(names, want);
    let mut parent = String::new();
    for chain in chain_ids(&big.manifests[0].diff_ids) {
        let (kind, got_parent) = containerd
            .snapshot(&chain)
            .unwrap_or_else(|| panic!("no snapshot named {chain}"));
        assert_eq!(
            (kind.as_str(), got_parent.as_str()),
            ("Committed", parent.as_str())
        );
        parent = chain;
    }
    // The registry saw one pull: the second call joined the first.
    let log = open.log();
    let log = log.get(log_before..).unwrap_or(&log);
    assert_eq!(
        manifest_gets_by_tag(log, repo_path(&big), "big"),
        1,
        "registry log of the concurrent pulls:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_tls_htpasswd_registry_with_username_password_and_auth_field() {
    const PASSWORD: &str = "htpasswd-pw-7f3a";
    let (containerd, private) = start(|| Registry::htpasswd("alice", PASSWORD));
    let by_password = images::busybox()
        .app_text("password\n")
        .build()
        .push(&private, "private/password");
    let by_auth = images::busybox()
        .app_text("auth field\n")
        .build()
        .push(&private, "private/auth");
    // The CA reaches the daemon only through ca_dir, as `127.0.0.1..PORT`.
    let daemon = DaemonConfig::new(&containerd).registry(&private).start();
    let ca_file = daemon.ca_dir().join(private.host().replace(':', ".."));
    assert!(ca_file.is_file(), "{} missing", ca_file.display());

    let id = pull_ok(
        &daemon,
        &by_password.reference,
        password_auth("alice", PASSWORD),
    )
    .await;
    assert_eq!(id, by_password.config_digest);

    let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"));
    let id = pull_ok(
        &daemon,
        &by_auth.reference,
        Some(proto::AuthConfig {
            auth: auth.clone(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(id, by_auth.config_digest);

    // The registry refuses anonymous pulls, so these only worked with the credentials.
    assert!(pull(&daemon, &by_auth.reference, None).await.is_err());
    assert!(containerd.is_unpacked(&by_auth.reference));
    let log = daemon.log();
    assert!(!log.contains(PASSWORD), "password in the daemon log");
    assert!(!log.contains(&auth), "auth field in the daemon log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_token_registry_with_password_identity_token_and_registry_token() {
    const PASSWORD: &str = "bob-token-pw-91c2";
    let (containerd, registry) =
        start(|| Registry::token(vec![TokenUser::new("bob", PASSWORD).pull("team/*")]));
    let token = registry.token_server().expect("token server");
    let by_password = images::busybox()
        .app_text("token password\n")
        .build()
        .push(&registry, "team/password");
    let by_identity = images::busybox()
        .app_text("identity token\n")
        .build()
        .push(&registry, "team/identity");
    let by_registry_token = images::busybox()
        .app_text("registry token\n")
        .build()
        .push(&registry, "team/registry-token");
    // At debug level, so that any secret a debug line would carry shows up.
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .env("RUST_LOG", "debug")
        .start();

    token.clear_requests();
    let id = pull_ok(
        &daemon,
        &by_password.reference,
        password_auth("bob", PASSWORD),
    )
    .await;
    assert_eq!(id, by_password.config_digest);
    let requests = token.requests();
    assert!(
        requests.iter().any(|r| r.status == 200
            && r.subject.as_deref() == Some("bob")
            && r.granted.iter().any(|g| g.name == "team/password")),
        "no token issued to bob for team/password: {requests:#?}"
    );

    token.clear_requests();
    let refresh = token.issue_refresh_token("bob");
    let id = pull_ok(
        &daemon,
        &by_identity.reference,
        Some(proto::AuthConfig {
            identity_token: refresh.clone(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(id, by_identity.config_digest);
    let requests = token.requests();
    assert!(
        requests.iter().any(|r| r.method == "POST"
            && r.status == 200
            && r.form
                .contains(&("grant_type".to_owned(), "refresh_token".to_owned()))
            && r.form
                .contains(&("refresh_token".to_owned(), refresh.clone()))),
        "no refresh_token grant: {requests:#?}"
    );

    // A registry token is sent as is: the token server is not asked.
    let minted = token.mint(
        "bob",
        vec![Access {
            kind: "repository".into(),
            name: repo_path(&by_registry_token).into(),
            actions: vec!["pull".into()],
        }],
    );
    token.clear_requests();
    let id = pull_ok(
        &daemon,
        &by_registry_token.reference,
        Some(proto::AuthConfig {
            registry_token: minted.clone(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(id, by_registry_token.config_digest);
    assert!(token.requests().is_empty(), "{:#?}", token.requests());

    for pushed in [&by_password, &by_identity, &by_registry_token] {
        assert!(
            containerd.is_unpacked(&pushed.reference),
            "{}",
            pushed.reference
        );
    }
    let log = daemon.log();
    assert!(log.contains("DEBUG"), "no debug output:\n{log}");
    for secret in [PASSWORD, refresh.as_str(), minted.as_str()] {
        assert!(!log.contains(secret), "a secret in the daemon log");
    }
    // Every JWT starts with base64 of `{"`: no access token the server issued either.
    assert!(!log.contains("eyJ"), "a token in the daemon log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_digest_and_by_tag_plus_digest_writes_no_tag_record_like_containerds_cri() {
    let (containerd, open) = start(Registry::open);
    // containerd's own CRI pulls the same references into a second containerd: the
    // records it writes are the reference for ours.
    let witness = Containerd::start();
    witness.add_registry(&open);
    let pushed = images::busybox()
        .app_text("by digest\n")
        .build()
        .push(&open, "digest/app");
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();

    let tag_and_digest = format!(
        "{}:{}@{}",
        pushed.repository,
        pushed
            .reference
            .rsplit_once(':')
            .map(|(_, t)| t)
            .unwrap_or("latest"),
        pushed.digest
    );
    for reference in [&pushed.digest_reference, &tag_and_digest] {
        let id = pull_ok(&daemon, reference, None).await;
        assert_eq!(id, pushed.config_digest, "{reference}");
        let theirs = cri_pull(witness.socket(), reference, None)
            .await
            .unwrap_or_else(|s| panic!("containerd's CRI pulling {reference}: {s}"));
        assert_eq!(theirs, pushed.config_digest, "{reference}");
        // The digest name and the ID, no tag: the tag is dropped when a digest is given.
        assert_records(
            &containerd,
            &[&pushed.digest_reference, &pushed.config_digest],
            &pushed.digest,
            MEDIA_MANIFEST,
        );
        let ours: Vec<_> = containerd
            .image_records()
            .into_iter()
            .map(|r| (r.name, r.media_type, r.target))
            .collect();
        let witnessed: Vec<_> = witness
            .image_records()
            .into_iter()
            .map(|r| (r.name, r.media_type, r.target))
            .collect();
        assert_eq!(ours, witnessed, "records after pulling {reference}");
    }

    let ours = status(daemon.socket(), &pushed.digest_reference)
        .await
        .expect("ImageStatus by digest");
    assert!(ours.repo_tags.is_empty(), "{ours:?}");
    assert_eq!(ours.repo_digests, vec![pushed.digest_reference.clone()]);
    let theirs = containerd_cri_status(&containerd, &pushed.digest_reference).await;
    assert_eq!(comparable(&ours), comparable(&theirs));
    assert!(containerd.is_unpacked(&pushed.digest_reference));
    assert_app_text(&containerd, &pushed.digest_reference, "by digest\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulling_a_moved_tag_moves_the_tag_record_and_keeps_the_old_image_by_digest() {
    let (containerd, open) = start(Registry::open);
    let old = images::busybox()
        .app_text("old\n")
        .build()
        .push(&open, "moved/app");
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    assert_eq!(
        pull_ok(&daemon, &old.reference, None).await,
        old.config_digest
    );

    // The tag now names other content (what `:latest` does every release).
    let new = images::busybox()
        .app_text("new\n")
        .build()
        .push(&open, "moved/app");
    assert_eq!(new.reference, old.reference);
    assert_eq!(
        pull_ok(&daemon, &new.reference, None).await,
        new.config_digest
    );

    let records: Vec<(String, String)> = containerd
        .image_records()
        .into_iter()
        .map(|r| (r.name, r.target))
        .collect();
    let mut want = vec![
        (new.reference.clone(), new.digest.clone()),
        (new.digest_reference.clone(), new.digest.clone()),
        (new.config_digest.clone(), new.digest.clone()),
        (old.digest_reference.clone(), old.digest.clone()),
        (old.config_digest.clone(), old.digest.clone()),
    ];
    want.sort();
    assert_eq!(records, want);

    let by_tag = status(daemon.socket(), &new.reference)
        .await
        .expect("by tag");
    assert_eq!(by_tag.id, new.config_digest);
    assert_eq!(by_tag.repo_tags, vec![new.reference.clone()]);
    let previous = status(daemon.socket(), &old.config_digest)
        .await
        .expect("the old image by ID");
    assert!(previous.repo_tags.is_empty(), "{previous:?}");
    assert_eq!(previous.repo_digests, vec![old.digest_reference.clone()]);

    // containerd's CRI agrees (it updates its view from events: wait for it).
    let started = Instant::now();
    loop {
        let theirs = containerd_cri_status(&containerd, &old.config_digest).await;
        if comparable(&theirs) == comparable(&previous) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "containerd's CRI: {theirs:?}\ncri-imaged: {previous:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let theirs = containerd_cri_status(&containerd, &new.reference).await;
    assert_eq!(comparable(&theirs), comparable(&by_tag));
    assert_app_text(&containerd, &new.reference, "new\n");
}

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Pushes `image` to the open `registry` converted to Docker schema 2 (what most
/// registries serve): skopeo rewrites the manifest, or the index into a manifest
/// list. Returns the digest reference and the manifest as stored.
fn push_docker_schema2(
    image: &OciImage,
    registry: &Registry,
    repo: &str,
) -> (String, serde_json::Value) {
    push_converted(image, registry, repo, &["--format", "v2s2"])
}

/// Pushes `image` to the open `registry` through `skopeo copy` with `options`
/// (which rewrite the manifest or layers, so digests are read back from the
/// registry). Returns the digest reference and the manifest as stored.
fn push_converted(
    image: &OciImage,
    registry: &Registry,
    repo: &str,
    options: &[&str],
) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    let digest_file = dir.path().join("digest");
    let reference = format!("docker://{}/{repo}:{}", registry.host(), image.tag);
    let mut copy = std::process::Command::new("skopeo");
    copy.args(["--insecure-policy", "copy", "--quiet"])
        .args(options);
    if image.is_index() {
        copy.arg("--all");
    }
    copy.args(["--dest-tls-verify=false", "--dest-no-creds", "--digestfile"])
        .arg(&digest_file)
        .arg(format!("oci:{}:{}", image.layout().display(), image.tag))
        .arg(&reference);
    must(common::run(&mut copy));
    let digest = std::fs::read_to_string(&digest_file).expect("skopeo's digest file");
    let digest_reference = format!("{}/{repo}@{}", registry.host(), digest.trim());
    (digest_reference.clone(), raw_manifest(&digest_reference))
}

/// The manifest stored at `reference`, as the registry serves it.
fn raw_manifest(reference: &str) -> serde_json::Value {
    let out = must(common::run(std::process::Command::new("skopeo").args([
        "--insecure-policy",
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--no-creds",
        &format!("docker://{reference}"),
    ])));
    serde_json::from_slice(&out.stdout).expect("a JSON manifest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_docker_schema2_manifest_and_manifest_list() {
    let (containerd, open) = start(Registry::open);
    let single = images::busybox().app_text("docker schema 2\n").build();
    let (single_ref, manifest) = push_docker_schema2(&single, &open, "docker/single");
    assert_eq!(manifest["mediaType"], DOCKER_MANIFEST);
    let config = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_owned();
    let multi = images::multi_arch("v1");
    let (list_ref, list) = push_docker_schema2(&multi, &open, "docker/list");
    assert_eq!(list["mediaType"], DOCKER_MANIFEST_LIST, "{list}");
    let host_manifest = list["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["platform"]["architecture"] == images::host_arch())
        .expect("a host manifest in the list");
    let host_manifest_ref = format!(
        "{}/docker/list@{}",
        open.host(),
        host_manifest["digest"].as_str().expect("digest")
    );
    let list_config = raw_manifest(&host_manifest_ref)["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_owned();
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();

    let single_tag = format!("{}/docker/single:latest", open.host());
    assert_eq!(pull_ok(&daemon, &single_tag, None).await, config);
    let list_tag = format!("{}/docker/list:v1", open.host());
    assert_eq!(pull_ok(&daemon, &list_tag, None).await, list_config);

    let records = containerd.image_records();
    for (tag, digest_ref, id, media_type) in [
        (&single_tag, &single_ref, &config, DOCKER_MANIFEST),
        (&list_tag, &list_ref, &list_config, DOCKER_MANIFEST_LIST),
    ] {
        let target = digest_ref.rsplit_once('@').map(|(_, d)| d).expect("digest");
        let names: BTreeSet<&str> = records
            .iter()
            .filter(|r| r.target == target)
            .inspect(|r| assert_eq!(r.media_type, media_type, "{r:?}"))
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(
            names,
            BTreeSet::from([tag.as_str(), digest_ref.as_str(), id.as_str()])
        );
        let theirs = containerd_cri_status(&containerd, tag).await;
        let ours = status(daemon.socket(), tag).await.expect("ImageStatus");
        assert_eq!(comparable(&ours), comparable(&theirs), "{tag}");
        assert!(containerd.is_unpacked(tag), "{tag}");
    }
    let labels = containerd
        .content_labels(single_ref.rsplit_once('@').map(|(_, d)| d).expect("digest"))
        .expect("manifest in the content store");
    assert_eq!(
        labels.get("containerd.io/gc.ref.content.config"),
        Some(&config)
    );
    assert_app_text(&containerd, &single_tag, "docker schema 2\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_an_image_with_zstd_layers() {
    let (containerd, open) = start(Registry::open);
    let image = images::busybox().app_text("zstd layers\n").build();
    let (digest_ref, manifest) = push_converted(
        &image,
        &open,
        "zstd/app",
        &["--dest-compress-format", "zstd"],
    );
    let layers = manifest["layers"].as_array().expect("layers");
    assert!(
        layers
            .iter()
            .all(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"),
        "{manifest}"
    );
    let config = manifest["config"]["digest"]
        .as_str()
        .expect("config")
        .to_owned();
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    let tag = format!("{}/zstd/app:latest", open.host());
    assert_eq!(pull_ok(&daemon, &tag, None).await, config);
    // Same uncompressed content, so the same chain IDs as the gzip build.
    for chain in chain_ids(&image.host().diff_ids) {
        assert_eq!(
            containerd.snapshot(&chain).map(|(kind, _)| kind).as_deref(),
            Some("Committed"),
            "{chain}"
        );
    }
    let theirs = containerd_cri_status(&containerd, &digest_ref).await;
    let ours = status(daemon.socket(), &digest_ref)
        .await
        .expect("ImageStatus");
    assert_eq!(comparable(&ours), comparable(&theirs));
    assert_app_text(&containerd, &tag, "zstd layers\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_different_images_sharing_a_layer_all_succeed() {
    let (containerd, open) = start(Registry::open);
    // Every busybox image shares the busybox layer: the pulls race to write the same
    // blob and commit the same snapshot (kubelet pulls in parallel when
    // serializeImagePulls is false).
    let pushed: Vec<PushedImage> = (0..4)
        .map(|i| {
            images::busybox()
                .app_text(&format!("parallel {i}\n"))
                .build()
                .push(&open, &format!("parallel/app{i}"))
        })
        .collect();
    let shared = &pushed[0].manifests[0].layers[0].digest;
    assert!(pushed
        .iter()
        .all(|p| &p.manifests[0].layers[0].digest == shared));
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();

    let results =
        futures_util::future::join_all(pushed.iter().map(|p| pull(&daemon, &p.reference, None)))
            .await;
    for (p, result) in pushed.iter().zip(results) {
        match result {
            Ok(id) => assert_eq!(id, p.config_digest),
            Err(s) => panic!(
                "pulling {} alongside the others: {:?}: {}\ndaemon log:\n{}",
                p.reference,
                s.code(),
                s.message(),
                daemon.log()
            ),
        }
    }
    for (i, p) in pushed.iter().enumerate() {
        assert!(containerd.is_unpacked(&p.reference), "{}", p.reference);
        for chain in chain_ids(&p.manifests[0].diff_ids) {
            assert_eq!(
                containerd.snapshot(&chain).map(|(kind, _)| kind).as_deref(),
                Some("Committed"),
                "{chain}"
            );
        }
        if i == 0 {
            assert_app_text(&containerd, &p.reference, "parallel 0\n");
        }
    }
    assert_eq!(list_ids(&daemon).await.len(), 4);
}

async fn list_ids(daemon: &Daemon) -> BTreeSet<String> {
    daemon
        .client()
        .await
        .list_images(proto::ListImagesRequest { filter: None })
        .await
        .expect("ListImages")
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.id)
        .collect()
}
