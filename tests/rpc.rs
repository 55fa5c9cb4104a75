//! The other CRI image RPCs over cri-imaged's unix socket, against a real containerd
//! and docker-registry: ImageStatus (every way of naming an image, verbose info),
//! ListImages and StreamImages with filters, RemoveImage, ImageFsInfo, gRPC health,
//! the server's socket handling and signals, the CLI subcommands, and secrets kept
//! out of the daemon's log.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::containerd::Containerd;
use common::cri::{self, proto, Daemon, DaemonConfig};
use common::images::{self, ImageUser, PushedImage};
use common::records::chain_ids;
use common::registry::Registry;
use common::scenario::{pull, pull_ok, start, status, status_of};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Waits (bounded) until containerd's own CRI, which learns of image changes from
/// events, reports `image` as present or absent.
async fn wait_containerd_cri(containerd: &Containerd, image: &str, present: bool) {
    let started = Instant::now();
    while status(containerd.socket(), image).await.is_some() != present {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "containerd's CRI still says present={} for {image}",
            !present
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn list(socket: &Path, filter: Option<&str>) -> Vec<proto::Image> {
    cri::connect(socket)
        .await
        .list_images(proto::ListImagesRequest {
            filter: filter.map(|f| proto::ImageFilter {
                image: Some(cri::image_spec(f)),
            }),
        })
        .await
        .unwrap_or_else(|s| panic!("ListImages {filter:?}: {s}"))
        .into_inner()
        .images
}

async fn stream(socket: &Path, filter: Option<&str>) -> Vec<proto::Image> {
    let mut responses = cri::connect(socket)
        .await
        .stream_images(proto::StreamImagesRequest {
            filter: filter.map(|f| proto::ImageFilter {
                image: Some(cri::image_spec(f)),
            }),
        })
        .await
        .unwrap_or_else(|s| panic!("StreamImages {filter:?}: {s}"))
        .into_inner();
    let mut images = Vec::new();
    while let Some(message) = responses
        .message()
        .await
        .unwrap_or_else(|s| panic!("StreamImages {filter:?} message: {s}"))
    {
        images.extend(message.images);
    }
    images
}

fn ids(images: &[proto::Image]) -> BTreeSet<String> {
    images.iter().map(|i| i.id.clone()).collect()
}

async fn remove(daemon: &Daemon, image: &str) {
    daemon
        .client()
        .await
        .remove_image(proto::RemoveImageRequest {
            image: Some(cri::image_spec(image)),
        })
        .await
        .unwrap_or_else(|s| panic!("RemoveImage {image}: {s}"));
}

async fn health(socket: &Path, service: &str) -> ServingStatus {
    let response = HealthClient::new(cri::channel(socket).await)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("Health.Check({service:?}): {s}"))
        .into_inner();
    ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown)
}

fn verbose_info(response: &proto::ImageStatusResponse) -> serde_json::Value {
    let info = response
        .info
        .get("info")
        .unwrap_or_else(|| panic!("no info[\"info\"] in {:?}", response.info));
    serde_json::from_str(info).unwrap_or_else(|e| panic!("info is not JSON ({e}): {info}"))
}

fn top_chain_id(pushed: &PushedImage) -> String {
    chain_ids(&pushed.manifests[0].diff_ids)
        .pop()
        .expect("an image with layers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_status_finds_an_image_by_tag_digest_id_and_bare_hex_with_verbose_info() {
    let (containerd, open) = start(Registry::open);
    let pushed = images::busybox()
        .user(ImageUser::Uid("1000".into()))
        .build()
        .push(&open, "rpc/status");
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    assert_eq!(
        pull_ok(&daemon, &pushed.reference, None).await,
        pushed.config_digest
    );

    let bare_hex = pushed
        .config_digest
        .trim_start_matches("sha256:")
        .to_owned();
    for name in [
        &pushed.reference,
        &pushed.digest_reference,
        &pushed.config_digest,
        &bare_hex,
    ] {
        let image = status(daemon.socket(), name)
            .await
            .unwrap_or_else(|| panic!("ImageStatus {name} found nothing"));
        assert_eq!(image.id, pushed.config_digest, "by {name}");
        assert_eq!(image.repo_tags, vec![pushed.reference.clone()], "by {name}");
        assert_eq!(
            image.repo_digests,
            vec![pushed.digest_reference.clone()],
            "by {name}"
        );
        assert_eq!(image.uid, Some(proto::Int64Value { value: 1000 }));
        assert!(image.size > 0);
    }

    // Missing images are an empty answer, not an error.
    let missing_tag = format!("{}/rpc/status:missing", open.host());
    let missing_id = format!("sha256:{}", "0".repeat(64));
    for name in [missing_tag.as_str(), missing_id.as_str()] {
        let response = status_of(daemon.socket(), name, true).await;
        assert_eq!(response.image, None, "{name}");
        assert!(response.info.is_empty(), "{name}");
    }

    // Short names normalise to docker.io/library (no network: the record is made here).
    containerd.ctr_ok(&[
        "images",
        "tag",
        &pushed.reference,
        "docker.io/library/rpc-short:latest",
    ]);
    for name in [
        "rpc-short",
        "rpc-short:latest",
        "docker.io/rpc-short",
        "docker.io/library/rpc-short:latest",
    ] {
        let image = status(daemon.socket(), name)
            .await
            .unwrap_or_else(|| panic!("ImageStatus {name} found nothing"));
        assert_eq!(image.id, pushed.config_digest, "by {name}");
        assert!(
            image
                .repo_tags
                .contains(&"docker.io/library/rpc-short:latest".to_owned()),
            "{image:?}"
        );
    }

    // verbose: the top layer's chain ID and the image config.
    let response = status_of(daemon.socket(), &pushed.reference, true).await;
    let info = verbose_info(&response);
    assert_eq!(info["chainID"], top_chain_id(&pushed), "{info}");
    assert_eq!(info["imageSpec"]["architecture"], images::host_arch());
    assert_eq!(info["imageSpec"]["os"], "linux");
    assert_eq!(info["imageSpec"]["config"]["User"], "1000");
    assert_eq!(
        info["imageSpec"]["rootfs"]["diff_ids"],
        serde_json::json!(pushed.manifests[0].diff_ids)
    );
    // containerd's CRI gives the same chain ID and config.
    wait_containerd_cri(&containerd, &pushed.reference, true).await;
    let theirs = verbose_info(&status_of(containerd.socket(), &pushed.reference, true).await);
    assert_eq!(info["chainID"], theirs["chainID"]);
    assert_eq!(info["imageSpec"], theirs["imageSpec"]);
    let non_verbose = status_of(daemon.socket(), &pushed.reference, false).await;
    assert!(non_verbose.info.is_empty(), "{:?}", non_verbose.info);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_stream_images_return_every_image_and_filter_by_name() {
    let (containerd, open) = start(Registry::open);
    let first = images::busybox()
        .app_text("first\n")
        .build()
        .push(&open, "rpc/first");
    let second = images::busybox()
        .app_text("second\n")
        .build()
        .push(&open, "rpc/second");
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    assert!(list(daemon.socket(), None).await.is_empty());
    for pushed in [&first, &second] {
        pull_ok(&daemon, &pushed.reference, None).await;
    }
    let socket = daemon.socket();

    let all = list(socket, None).await;
    assert_eq!(
        ids(&all),
        BTreeSet::from([first.config_digest.clone(), second.config_digest.clone()])
    );
    assert_eq!(all.len(), 2, "one entry per image: {all:#?}");
    for pushed in [&first, &second] {
        let image = all
            .iter()
            .find(|i| i.id == pushed.config_digest)
            .expect("listed");
        assert_eq!(image.repo_tags, vec![pushed.reference.clone()]);
        assert_eq!(image.repo_digests, vec![pushed.digest_reference.clone()]);
    }

    for (filter, want) in [
        (first.reference.as_str(), &first),
        (second.digest_reference.as_str(), &second),
        (first.config_digest.as_str(), &first),
    ] {
        let found = list(socket, Some(filter)).await;
        assert_eq!(ids(&found), BTreeSet::from([want.config_digest.clone()]));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(stream(socket, Some(filter)).await, found, "stream {filter}");
    }
    let missing = format!("{}/rpc/missing:latest", open.host());
    assert!(list(socket, Some(&missing)).await.is_empty());
    assert!(stream(socket, Some(&missing)).await.is_empty());

    // StreamImages carries the same set as ListImages.
    let mut streamed = stream(socket, None).await;
    let mut listed = all.clone();
    streamed.sort_by(|a, b| a.id.cmp(&b.id));
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(streamed, listed);

    // An image containerd's own CRI pulled is listed too, the way containerd lists it.
    containerd.add_registry(&open);
    let third = images::busybox()
        .app_text("pulled by containerd\n")
        .build()
        .push(&open, "rpc/third");
    let pulled = cri::connect(containerd.socket())
        .await
        .pull_image(cri::pull_request(&third.reference, None))
        .await
        .expect("containerd's CRI pull")
        .into_inner()
        .image_ref;
    assert_eq!(pulled, third.config_digest);
    let ours = status(socket, &third.reference)
        .await
        .expect("cri-imaged sees containerd's pull");
    let theirs = status(containerd.socket(), &third.reference)
        .await
        .expect("containerd's CRI ImageStatus");
    assert_eq!(
        (&ours.id, &ours.repo_tags, &ours.repo_digests, ours.size),
        (
            &theirs.id,
            &theirs.repo_tags,
            &theirs.repo_digests,
            theirs.size
        )
    );
    assert_eq!(list(socket, None).await.len(), 3);
    // Pulling it again through cri-imaged reuses containerd's content and snapshots.
    assert_eq!(
        pull_ok(&daemon, &third.reference, None).await,
        third.config_digest
    );
    assert_eq!(list(socket, None).await.len(), 3);

    // A restarted daemon finds everything again: the state lives in containerd.
    let before = {
        let mut images = list(socket, None).await;
        images.sort_by(|a, b| a.id.cmp(&b.id));
        images
    };
    drop(daemon);
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    let mut after = list(daemon.socket(), None).await;
    after.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_image_removes_every_name_and_collects_the_content_synchronously() {
    let (containerd, open) = start(Registry::open);
    let by_tag_image = images::busybox().app_text("removed by tag\n").build();
    let by_tag = by_tag_image.push(&open, "rm/tag");
    // A second tag of the same image: removing by one tag removes it too.
    let also = common::must(by_tag_image.push_as(&open, "rm/tag", "also", None));
    let by_id = images::busybox()
        .app_text("removed by id\n")
        .build()
        .push(&open, "rm/id");
    let kept = images::busybox()
        .app_text("kept\n")
        .build()
        .push(&open, "rm/kept");
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    for pushed in [&by_tag, &also, &by_id, &kept] {
        pull_ok(&daemon, &pushed.reference, None).await;
        // containerd's CRI must have seen it, so its disappearing later means something.
        wait_containerd_cri(&containerd, &pushed.reference, true).await;
    }
    // Every image has the busybox layer; each has its own app layer.
    let shared_layer = by_tag.manifests[0].layers[0].digest.clone();
    assert_eq!(kept.manifests[0].layers[0].digest, shared_layer);

    remove(&daemon, &by_tag.reference).await;
    let names: Vec<String> = containerd
        .image_records()
        .into_iter()
        .filter(|r| r.target == by_tag.digest)
        .map(|r| r.name)
        .collect();
    assert!(
        names.is_empty(),
        "records left after RemoveImage: {names:?}"
    );
    for name in [
        &by_tag.reference,
        &also.reference,
        &by_tag.digest_reference,
        &by_tag.config_digest,
    ] {
        assert_eq!(status(daemon.socket(), name).await, None, "{name}");
    }
    // Content is collected before RemoveImage returns (no waiting here).
    let content: BTreeSet<String> = containerd.content().into_iter().map(|c| c.digest).collect();
    let own = &by_tag.manifests[0];
    for digest in [&by_tag.digest, &own.config.digest, &own.layers[1].digest] {
        assert!(
            !content.contains(digest),
            "{digest} still in the content store"
        );
    }
    assert!(
        content.contains(&shared_layer),
        "a layer other images use was collected"
    );
    wait_containerd_cri(&containerd, &by_tag.reference, false).await;
    wait_containerd_cri(&containerd, &also.reference, false).await;

    // Removing again, by any name, is a no-op success.
    remove(&daemon, &by_tag.reference).await;
    remove(&daemon, &by_tag.config_digest).await;

    // By ID: every name goes too.
    remove(&daemon, &by_id.config_digest).await;
    assert!(containerd
        .image_records()
        .iter()
        .all(|r| r.target != by_id.digest));
    let content: BTreeSet<String> = containerd.content().into_iter().map(|c| c.digest).collect();
    assert!(!content.contains(&by_id.config_digest));
    assert_eq!(status(daemon.socket(), &by_id.reference).await, None);
    wait_containerd_cri(&containerd, &by_id.reference, false).await;

    // The other image is untouched, for both CRIs.
    let left = list(daemon.socket(), None).await;
    assert_eq!(ids(&left), BTreeSet::from([kept.config_digest.clone()]));
    assert_eq!(ids(&list(containerd.socket(), None).await), ids(&left));
    assert_eq!(containerd.image_records().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_fs_info_and_health_report_and_cli_subcommands_work() {
    let (containerd, open) = start(Registry::open);
    let pushed = images::busybox().build().push(&open, "cli/app");
    let other = images::busybox()
        .app_text("pulled by the CLI\n")
        .build()
        .push(&open, "cli/other");
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();

    assert_eq!(health(daemon.socket(), "").await, ServingStatus::Serving);
    assert_eq!(
        health(daemon.socket(), "runtime.v1.ImageService").await,
        ServingStatus::Serving
    );
    assert_eq!(
        daemon
            .socket()
            .metadata()
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o660
    );

    pull_ok(&daemon, &pushed.reference, None).await;
    let fs = daemon
        .client()
        .await
        .image_fs_info(proto::ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    let snapshotter_root = containerd
        .root()
        .join("io.containerd.snapshotter.v1.overlayfs")
        .display()
        .to_string();
    let image_fs = fs.image_filesystems.first().expect("an image filesystem");
    assert_eq!(
        image_fs.fs_id.as_ref().map(|f| f.mountpoint.as_str()),
        Some(snapshotter_root.as_str())
    );
    assert!(
        image_fs.used_bytes.as_ref().is_some_and(|v| v.value > 0),
        "{image_fs:?}"
    );
    assert!(
        image_fs.inodes_used.as_ref().is_some_and(|v| v.value > 0),
        "{image_fs:?}"
    );
    assert!(image_fs.timestamp > 0);
    assert!(!fs.container_filesystems.is_empty(), "{fs:?}");
    // containerd's own CRI names the same filesystem.
    let theirs = cri::connect(containerd.socket())
        .await
        .image_fs_info(proto::ImageFsInfoRequest {})
        .await
        .expect("containerd's ImageFsInfo")
        .into_inner();
    assert_eq!(
        theirs
            .image_filesystems
            .first()
            .and_then(|f| f.fs_id.clone()),
        image_fs.fs_id.clone()
    );

    // The CLI, as crictl would be used.
    let run = |sub: &str, args: &[&str]| {
        let out = daemon.client_command(sub, args);
        assert!(
            out.status.success(),
            "cri-imaged {sub} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run("pull", &[&other.reference]);
    assert!(out.contains(&other.config_digest), "{out}");
    assert!(status(daemon.socket(), &other.reference).await.is_some());

    let out = run("images", &["-q"]);
    let listed: BTreeSet<&str> = out.lines().collect();
    assert_eq!(
        listed,
        BTreeSet::from([pushed.config_digest.as_str(), other.config_digest.as_str()])
    );
    let out = run("images", &[]);
    let short_id = &pushed.config_digest["sha256:".len()..][..13];
    assert!(
        out.lines().any(|l| l.contains(&pushed.repository)
            && l.contains("latest")
            && l.contains(short_id)),
        "{out}"
    );

    let out = run("inspecti", &[&pushed.reference]);
    let json: serde_json::Value = serde_json::from_str(&out).expect("inspecti prints JSON");
    assert_eq!(json["status"]["id"], pushed.config_digest.as_str());
    assert_eq!(json["status"]["repoTags"][0], pushed.reference.as_str());
    assert_eq!(
        json["info"]["info"]["chainID"],
        top_chain_id(&pushed).as_str()
    );

    let out = run("imagefsinfo", &[]);
    let json: serde_json::Value = serde_json::from_str(&out).expect("imagefsinfo prints JSON");
    assert_eq!(
        json["status"]["imageFilesystems"][0]["fsId"]["mountpoint"],
        snapshotter_root.as_str()
    );

    let out = run("rmi", &[&pushed.reference]);
    assert!(out.contains("Deleted"), "{out}");
    assert_eq!(status(daemon.socket(), &pushed.reference).await, None);

    // A missing image is an error for inspecti (crictl behaves the same way).
    let out = daemon.client_command("inspecti", &[&pushed.reference]);
    assert!(!out.status.success());
}

/// A cri-imaged started by hand, for the socket tests that need a `listen` path the
/// harness does not choose. containerd is not needed: the daemon serves without it.
struct Server {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    fn spawn(dir: &Path, socket: &Path) -> Server {
        let config = dir.join("cri-imaged.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{}\"\n\n[containerd]\naddress = \"{}\"\n\n[registry]\nregistries_conf = \"{}\"\nca_dir = \"{}\"\n\n[credentials]\nkubelet_root_dir = \"{}\"\n",
                socket.display(),
                dir.join("no-containerd.sock").display(),
                dir.join("registries.conf").display(),
                dir.display(),
                dir.display(),
            ),
        )
        .expect("writing the config");
        let log = dir.join(format!(
            "cri-imaged-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        let child = common::must(common::spawn_logged(
            Command::new(env!("CARGO_BIN_EXE_cri-imaged"))
                .arg("--config")
                .arg(&config),
            &log,
            "cri-imaged",
        ));
        Server {
            child,
            socket: socket.to_path_buf(),
            log,
        }
    }

    fn log(&self) -> String {
        common::read_log(&self.log)
    }

    /// Waits (bounded) until the daemon answers health checks on its socket.
    async fn wait_serving(&mut self) {
        let started = Instant::now();
        loop {
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok()
                && health(&self.socket, "").await == ServingStatus::Serving
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("cri-imaged exited ({status}): {}", self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "cri-imaged not serving: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit status (SIGKILL only if it hangs).
    fn terminate(&mut self) -> std::process::ExitStatus {
        common::terminate(&mut self.child, Duration::from_secs(10));
        self.child.wait().expect("waiting for cri-imaged")
    }

    /// Waits (bounded) for the process to exit on its own.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "cri-imaged did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        common::terminate(&mut self.child, Duration::from_secs(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_dir_is_created_mode_is_0660_stale_socket_is_replaced_and_sigterm_cleans_up() {
    let dir = tempfile::Builder::new()
        .prefix("cri-imaged-server-")
        .tempdir()
        .expect("temp dir");

    // The socket's directory does not exist yet.
    let socket = dir.path().join("run/cri-imaged/cri-imaged.sock");
    assert!(!socket.parent().expect("parent").exists());
    let mut server = Server::spawn(dir.path(), &socket);
    server.wait_serving().await;
    let meta = std::fs::metadata(&socket).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let status = server.terminate();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}; {}",
        server.log()
    );
    assert!(!socket.exists(), "socket left behind after SIGTERM");

    // A socket file nobody listens on (a crashed daemon's) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("binding a socket"));
    assert!(stale.exists());
    let mut server = Server::spawn(dir.path(), &stale);
    server.wait_serving().await;
    assert_eq!(
        std::fs::metadata(&stale)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o660
    );
    assert!(server.terminate().success());
    assert!(!stale.exists());

    // One a live process answers on is not taken over.
    let live = dir.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).expect("binding a socket");
    let mut server = Server::spawn(dir.path(), &live);
    let status = server.wait_exit();
    assert!(
        !status.success(),
        "took over a live socket: {}",
        server.log()
    );
    assert!(server.log().contains("already serving"), "{}", server.log());
    assert!(live.exists(), "the live socket was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_log_never_contains_request_secrets_even_at_debug_level() {
    const PASSWORD: &str = "log-test-pw-5e8d1";
    const WRONG_PASSWORD: &str = "wrong-pw-c0ffee42";
    let (containerd, private) = start(|| Registry::htpasswd("carol", PASSWORD));
    let pushed = images::busybox()
        .app_text("secret-free logs\n")
        .build()
        .push(&private, "logs/app");
    let daemon = DaemonConfig::new(&containerd)
        .registry(&private)
        .env("RUST_LOG", "debug")
        .start();
    let auth = |username: &str, password: &str| {
        Some(proto::AuthConfig {
            username: username.to_owned(),
            password: password.to_owned(),
            ..Default::default()
        })
    };
    let encoded = |password: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("carol:{password}"))
    };

    // Refused first, so the failure paths log too.
    let refused = pull(&daemon, &pushed.reference, auth("carol", WRONG_PASSWORD))
        .await
        .expect_err("the wrong password worked");
    let refused_auth = pull(
        &daemon,
        &pushed.reference,
        Some(proto::AuthConfig {
            auth: encoded(WRONG_PASSWORD),
            ..Default::default()
        }),
    )
    .await
    .expect_err("the wrong auth field worked");
    assert_eq!(
        pull(&daemon, &pushed.reference, auth("carol", PASSWORD))
            .await
            .expect("pull with the password"),
        pushed.config_digest
    );
    assert_eq!(
        pull(
            &daemon,
            &pushed.digest_reference,
            Some(proto::AuthConfig {
                auth: encoded(PASSWORD),
                ..Default::default()
            })
        )
        .await
        .expect("pull with the auth field"),
        pushed.config_digest
    );

    let log = daemon.log();
    // The log is not empty: the pulls were logged, at debug level.
    assert!(log.contains("DEBUG"), "no debug output:\n{log}");
    assert!(log.contains(&pushed.config_digest), "{log}");
    let secrets: HashMap<&str, String> = HashMap::from([
        ("password", PASSWORD.to_owned()),
        ("wrong password", WRONG_PASSWORD.to_owned()),
        ("auth field", encoded(PASSWORD)),
        ("wrong auth field", encoded(WRONG_PASSWORD)),
        // What a Basic header would carry.
        (
            "basic credentials",
            base64::engine::general_purpose::STANDARD.encode(format!("carol:{PASSWORD}")),
        ),
    ]);
    for (what, secret) in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "the {what} is in the daemon log"
        );
        for status in [&refused, &refused_auth] {
            assert!(
                !status.message().contains(secret.as_str()),
                "the {what} is in an error message"
            );
        }
    }
}

/// A re-pull leaves labels others put on the records (containerd 1.7's pin) alone,
/// and an image record we cannot read (a target digest that is not sha256, written by
/// some other tool) is skipped rather than failing ListImages for every image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repull_keeps_the_pin_and_an_unreadable_record_does_not_hide_the_others() {
    let (containerd, open) = start(Registry::open);
    let pushed = images::busybox().build().push(&open, "rpc/pinned");
    let daemon = DaemonConfig::new(&containerd).registry(&open).start();
    pull_ok(&daemon, &pushed.reference, None).await;
    containerd.ctr_ok(&[
        "images",
        "label",
        &pushed.reference,
        "io.cri-containerd.pinned=pinned",
    ]);
    assert!(
        status(daemon.socket(), &pushed.reference)
            .await
            .expect("present")
            .pinned
    );
    pull_ok(&daemon, &pushed.reference, None).await;
    let image = status(daemon.socket(), &pushed.reference)
        .await
        .expect("present");
    assert!(image.pinned, "the re-pull dropped the pin: {image:?}");

    // A record whose target digest is not sha256, created through containerd's API.
    let channel = cri_imaged::client::channel(&format!("unix://{}", containerd.address()))
        .await
        .expect("containerd channel");
    let mut images_client =
        containerd_client::services::v1::images_client::ImagesClient::new(channel);
    let mut request = tonic::Request::new(containerd_client::services::v1::CreateImageRequest {
        image: Some(containerd_client::services::v1::Image {
            name: "example.com/odd:1".into(),
            target: Some(containerd_client::types::Descriptor {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: format!("sha512:{}", "ab".repeat(64)),
                size: 10,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("containerd-namespace", "k8s.io".parse().expect("header"));
    images_client
        .create(request)
        .await
        .expect("create the odd record");
    assert!(containerd
        .image_names()
        .contains(&"example.com/odd:1".to_string()));
    let listed = list(daemon.socket(), None).await;
    assert_eq!(ids(&listed), BTreeSet::from([pushed.config_digest.clone()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_fs_info_answers_from_a_cache_that_our_pulls_and_removals_refresh() {
    let (containerd, registry) = start(Registry::open);
    let image = images::random_image(256 << 10, 2, "1").push(&registry, "team/app");
    let daemon = DaemonConfig::new(&containerd).registry(&registry).start();
    let fs_info = || async {
        let answer = daemon
            .client()
            .await
            .image_fs_info(proto::ImageFsInfoRequest {})
            .await
            .expect("ImageFsInfo")
            .into_inner();
        let fs = answer.image_filesystems[0].clone();
        (
            fs.timestamp,
            fs.used_bytes.map(|v| v.value).unwrap_or_default(),
        )
    };
    // Asked again at once: the same sample (a background refresh every 10 s may
    // fall between two asks, not between all three).
    let samples = [fs_info().await, fs_info().await, fs_info().await];
    assert!(
        samples[0] == samples[1] || samples[1] == samples[2],
        "repeated ImageFsInfo is served from the cache: {samples:?}"
    );
    let (before, empty_usage) = samples[2];
    pull_ok(&daemon, &image.reference, None).await;
    let (after_pull, pulled_usage) = fs_info().await;
    assert!(after_pull > before, "a pull refreshes the figure");
    assert!(pulled_usage > empty_usage, "{pulled_usage} > {empty_usage}");
    daemon
        .client()
        .await
        .remove_image(proto::RemoveImageRequest {
            image: Some(proto::ImageSpec {
                image: image.reference.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("RemoveImage");
    let (after_remove, _) = fs_info().await;
    assert!(after_remove > after_pull, "a removal refreshes the figure");
}
