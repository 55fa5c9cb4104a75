//! The error half of the pull path against real components (docker-registry,
//! containerd): every bad input gets a gRPC status naming the problem, a failed pull
//! leaves nothing half-written in containerd, secrets never reach a message or the
//! log, and the daemon keeps serving afterwards. Also: bad config files stop the
//! binary with exit code 64 before it serves.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::containerd::Containerd;
use common::cri::{self, proto, DaemonConfig};
use common::fake_registry::{FakeRegistry, Faults};
use common::images;
use common::leftovers::{assert_nothing_left, assert_serving};
use common::registry::Registry;
use common::scenario::{
    containerd_without_cri as containerd, password_auth, pull, pull_fails, start_with,
};
use common::token::TokenUser;
use tonic::Code;

/// A port on 127.0.0.1 with nothing listening (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    listener.local_addr().expect("probe address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_unknown_names_and_a_dead_registry_get_clear_statuses() {
    let (containerd, registry) = start_with(containerd, Registry::open);
    let pushed = images::busybox().build().push(&registry, "errors/app");
    let dead = format!("127.0.0.1:{}", closed_port());
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .registries_conf(&format!(
            "[[registry]]\nlocation = \"{dead}\"\ninsecure = true\n"
        ))
        .start();

    for bad in ["Bad/Upper", "a//b", "x@sha256:short"] {
        let status = pull_fails(&daemon, cri::pull_request(bad, None), Code::InvalidArgument).await;
        assert!(
            status.message().contains(bad),
            "{bad}: message does not name the reference: {}",
            status.message()
        );
    }
    // An empty image name and no ImageSpec at all.
    for request in [
        cri::pull_request("", None),
        proto::PullImageRequest::default(),
    ] {
        let status = pull_fails(&daemon, request, Code::InvalidArgument).await;
        assert!(
            status.message().contains("image"),
            "empty spec: {}",
            status.message()
        );
    }

    let unknown_tag = format!("{}:nope", pushed.repository);
    let status = pull_fails(
        &daemon,
        cri::pull_request(&unknown_tag, None),
        Code::NotFound,
    )
    .await;
    assert!(
        status.message().contains("errors/app:nope"),
        "{}",
        status.message()
    );
    let unknown_repo = format!("{}/errors/nosuch:latest", registry.host());
    let status = pull_fails(
        &daemon,
        cri::pull_request(&unknown_repo, None),
        Code::NotFound,
    )
    .await;
    assert!(
        status.message().contains("errors/nosuch"),
        "{}",
        status.message()
    );

    // Nothing listens there: kubelet's RegistryUnavailable reason, naming the host.
    let status = pull_fails(
        &daemon,
        cri::pull_request(&format!("{dead}/errors/app:latest"), None),
        Code::Unavailable,
    )
    .await;
    assert!(
        status.message().starts_with("RegistryUnavailable"),
        "{}",
        status.message()
    );
    assert!(status.message().contains(&dead), "{}", status.message());

    assert_nothing_left(&containerd, &[], "the failed pulls");
    assert_serving(daemon.socket()).await;
    let id = pull(&daemon, &pushed.reference, None)
        .await
        .expect("a good pull after the failures");
    assert_eq!(id, pushed.config_digest);
}

const PASSWORD: &str = "Corr3ct-H0rse-pw";
const WRONG_PASSWORD: &str = "Wr0ng-B4ttery-pw";

fn assert_no_secret(text: &str, what: &str) {
    let b64 = |p: &str| base64::engine::general_purpose::STANDARD.encode(format!("alice:{p}"));
    for secret in [
        PASSWORD.to_owned(),
        WRONG_PASSWORD.to_owned(),
        b64(PASSWORD),
        b64(WRONG_PASSWORD),
    ] {
        assert!(!text.contains(&secret), "{what} contains a secret:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_refusals_list_the_attempts_without_secrets_and_untrusted_tls_is_unavailable() {
    let (containerd, registry) = start_with(containerd, || Registry::htpasswd("alice", PASSWORD));
    let pushed = images::busybox()
        .app_text("private\n")
        .build()
        .push(&registry, "errors/private");
    // Debug logging: the secrets must stay out of the most talkative log too.
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .env("RUST_LOG", "cri_imaged=debug")
        .start();
    let host = registry.host();

    let status = pull_fails(
        &daemon,
        cri::pull_request(&pushed.reference, None),
        Code::Unauthenticated,
    )
    .await;
    let message = status.message();
    assert!(message.contains(host), "{message}");
    assert!(message.contains("anonymous → 401"), "{message}");

    let status = pull_fails(
        &daemon,
        cri::pull_request(&pushed.reference, Some(("alice", WRONG_PASSWORD))),
        Code::Unauthenticated,
    )
    .await;
    let message = status.message();
    assert!(message.contains(host), "{message}");
    let request_attempt = message
        .find("basic ")
        .and_then(|basic| Some((basic, message[basic..].find("from request → 401")?)))
        .unwrap_or_else(|| panic!("no `basic … from request → 401` in: {message}"));
    let anonymous = message
        .find("anonymous → 401")
        .unwrap_or_else(|| panic!("no `anonymous → 401` in: {message}"));
    assert!(
        request_attempt.0 < anonymous,
        "the request's credentials are tried before anonymous: {message}"
    );
    assert_no_secret(message, "the Unauthenticated message");

    // Not base64: refused before any request, without echoing the field.
    let garbage = "%%not*base64:alice:Wr0ng%%";
    let status = pull_fails(
        &daemon,
        proto::PullImageRequest {
            image: Some(cri::image_spec(&pushed.reference)),
            auth: Some(proto::AuthConfig {
                auth: garbage.to_owned(),
                ..Default::default()
            }),
            sandbox_config: None,
        },
        Code::InvalidArgument,
    )
    .await;
    assert!(
        !status.message().contains(garbage) && !status.message().contains("Wr0ng"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("auth"), "{}", status.message());

    assert_nothing_left(&containerd, &[], "refused pulls");
    let id = pull(&daemon, &pushed.reference, password_auth("alice", PASSWORD))
        .await
        .expect("pull with the right password");
    assert_eq!(id, pushed.config_digest);
    assert_no_secret(&daemon.log(), "the daemon log");

    // A daemon that does not trust the registry's CA (no ca_dir entry).
    let untrusting = DaemonConfig::new(&containerd)
        .env("RUST_LOG", "cri_imaged=debug")
        .start();
    let status = pull_fails(
        &untrusting,
        cri::pull_request(&pushed.reference, Some(("alice", PASSWORD))),
        Code::Unavailable,
    )
    .await;
    let message = status.message();
    assert!(message.starts_with("RegistryUnavailable"), "{message}");
    assert!(message.contains(host), "{message}");
    assert!(
        message.to_ascii_lowercase().contains("certificate"),
        "the message names the certificate problem: {message}"
    );
    assert_no_secret(message, "the TLS failure message");
    assert_no_secret(&untrusting.log(), "the untrusting daemon's log");
    assert_serving(untrusting.socket()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_registry_refuses_a_user_without_a_grant_for_the_repository() {
    let (containerd, registry) = start_with(containerd, || {
        Registry::token(vec![
            TokenUser::new("bob", "bob-pw").pull("team/*"),
            TokenUser::new("eve", "eve-Secr3t-pw").pull("other/*"),
        ])
    });
    let pushed = images::busybox().build().push(&registry, "team/app");
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .env("RUST_LOG", "cri_imaged=debug")
        .start();

    // The token server authenticates eve but grants her no access to team/app (an
    // empty `access` list, as distribution's own token servers do); docker-registry
    // then answers the token with 401 `insufficient_scope`, not 403. Anonymous gets
    // the same. So the outcome is Unauthenticated, listing both attempts.
    let status = pull_fails(
        &daemon,
        cri::pull_request(&pushed.reference, Some(("eve", "eve-Secr3t-pw"))),
        Code::Unauthenticated,
    )
    .await;
    let message = status.message();
    assert!(message.contains(registry.host()), "{message}");
    assert!(message.contains("from request → 401"), "{message}");
    assert!(message.contains("anonymous → 401"), "{message}");
    assert!(!message.contains("eve-Secr3t-pw"), "{message}");
    // The explanation above, checked: eve got a token, with nothing granted in it.
    let token = registry.token_server().expect("token server");
    let issued = token.requests();
    assert!(
        issued.iter().any(|r| r.status == 200
            && r.subject.as_deref() == Some("eve")
            && r.granted.is_empty()),
        "eve was not issued an empty-handed token: {issued:?}"
    );
    assert!(!daemon.log().contains("eve-Secr3t-pw"));

    assert_nothing_left(&containerd, &[], "a refused token pull");
    let id = pull(&daemon, &pushed.reference, password_auth("bob", "bob-pw"))
        .await
        .expect("bob may pull team/app");
    assert_eq!(id, pushed.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_down_is_unavailable_naming_it_and_the_daemon_recovers() {
    let (mut containerd, registry) = start_with(containerd, Registry::open);
    let pushed = images::busybox().build().push(&registry, "errors/store");
    let daemon = DaemonConfig::new(&containerd).registry(&registry).start();

    // Nothing behind containerd's socket path: moved aside before the daemon ever
    // dialled it (it connects lazily), so every connection attempt fails.
    let socket = containerd.socket().to_path_buf();
    let aside = socket.with_extension("aside");
    std::fs::rename(&socket, &aside).expect("moving containerd's socket aside");
    let status = pull_fails(
        &daemon,
        cri::pull_request(&pushed.reference, None),
        Code::Unavailable,
    )
    .await;
    let message = status.message();
    assert!(message.contains(&containerd.address()), "{message}");
    assert!(
        message.contains("No such file or directory") && !message.contains("ConnectError"),
        "the message should give the cause, not a debug dump: {message}"
    );
    assert!(
        !message.starts_with("RegistryUnavailable"),
        "containerd being down is not the registry's fault: {message}"
    );
    assert_serving(daemon.socket()).await;
    let mut client = daemon.client().await;
    let listed = client
        .list_images(proto::ListImagesRequest { filter: None })
        .await;
    match listed {
        Err(s) => {
            assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
            assert!(
                s.message().contains(&containerd.address()),
                "{}",
                s.message()
            );
        }
        Ok(r) => panic!(
            "ListImages with containerd down answered {:?}",
            r.into_inner()
        ),
    }

    // containerd is back at its address: the daemon dials again and serves.
    std::fs::rename(&aside, &socket).expect("restoring containerd's socket");
    let id = pull(&daemon, &pushed.reference, None)
        .await
        .expect("pull after containerd came back");
    assert_eq!(id, pushed.config_digest);
    let listed = client
        .list_images(proto::ListImagesRequest { filter: None })
        .await
        .expect("ListImages after containerd came back")
        .into_inner()
        .images;
    assert!(
        listed.iter().any(|i| i.id == pushed.config_digest),
        "{listed:?}"
    );
    assert_nothing_left(&containerd, &containerd.image_names(), "the recovered pull");

    // A real restart: the daemon's established connection breaks under it, and a
    // containerd on the same socket and root comes up again.
    containerd.restart();
    let second = images::busybox()
        .app_text("after a containerd restart\n")
        .build()
        .push(&registry, "errors/restarted");
    let id = pull(&daemon, &second.reference, None)
        .await
        .expect("pull after containerd restarted");
    assert_eq!(id, second.config_digest);
    assert_serving(daemon.socket()).await;
    assert_nothing_left(
        &containerd,
        &containerd.image_names(),
        "the pull after a restart",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_in_flight_when_containerd_restarts_completes_or_fails_cleanly() {
    // Blobs staged by the daemon and committed through containerd, then blobs
    // streamed through containerd's own ingest (a Write stream the restart breaks).
    for direct in [true, false] {
        pull_across_a_containerd_restart(direct).await;
    }
}

async fn pull_across_a_containerd_restart(direct: bool) {
    let fake = FakeRegistry::start();
    let image = images::random_image(6 << 20, 2, &format!("restart-{direct}"));
    let reference = fake.serve_image(&image, "errors/restart-mid-pull");
    let mut containerd = containerd();
    let daemon = DaemonConfig::new(&containerd)
        .registries_conf(&fake.insecure_entry())
        .direct_content(direct)
        .start();
    // The second layer stalls after 2 MiB, while the first may be unpacked already.
    let stalled = image.host().layers[1].digest.clone();
    fake.set_faults(Faults {
        stall_blobs: vec![(stalled.clone(), 2 << 20)],
        ..Default::default()
    });
    let mut client = daemon.client().await;
    let request = cri::pull_request(&reference, None);
    let pulling = tokio::spawn(async move { client.pull_image(request).await });
    let started = fake
        .wait_for(Duration::from_secs(60), |r| r.path.ends_with(&stalled))
        .await;
    assert!(started.is_some(), "the stalled layer was never asked for");
    tokio::time::sleep(Duration::from_millis(500)).await;

    containerd.restart();
    fake.release(&stalled);
    // Only a hang guard: the daemon has no business waiting this long.
    let outcome = tokio::time::timeout(Duration::from_secs(120), pulling)
        .await
        .unwrap_or_else(|_| panic!("(direct {direct}) the pull hung across containerd's restart"))
        .expect("pull task");
    match outcome {
        Ok(response) => assert_eq!(
            response.into_inner().image_ref,
            image.host().config.digest,
            "(direct {direct})"
        ),
        Err(status) => {
            assert_eq!(
                status.code(),
                Code::Unavailable,
                "(direct {direct}) {}",
                status.message()
            );
            assert!(
                status.message().contains("containerd"),
                "(direct {direct}) {}",
                status.message()
            );
            println!("(direct {direct}) failed: {}", status.message());
            // The lease is deleted once containerd answers again.
            let released = wait_for_leases_gone(&containerd).await;
            assert!(released, "(direct {direct}) the failed pull's lease stayed");
            assert_nothing_left(&containerd, &[], "a pull cut by containerd's restart");
        }
    }
    assert_serving(daemon.socket()).await;
    let id = pull(&daemon, &reference, None)
        .await
        .unwrap_or_else(|e| panic!("(direct {direct}) pull after the restart: {e:?}"));
    assert_eq!(id, image.host().config.digest);
    assert_nothing_left(
        &containerd,
        &containerd.image_names(),
        "the pull after containerd's restart",
    );
}

/// Whether `ctr leases ls` lists none within a minute (a hang guard).
async fn wait_for_leases_gone(containerd: &Containerd) -> bool {
    for _ in 0..600 {
        // A header line, then one per lease.
        if containerd.ctr_ok(&["leases", "ls"]).lines().count() <= 1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Runs the daemon binary with `--config path` and returns (exit code, stderr). A
/// daemon that starts serving instead of exiting is killed and fails the test.
fn run_daemon_with_config(config: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cri-imaged"))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting cri-imaged");
    let started = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cri-imaged did not exit with config {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("cri-imaged output");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_config_files_exit_64_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("never.sock");
    let base = format!("[server]\nlisten = \"{}\"\n", socket.display());
    let cases = [
        (
            "unknown-key",
            format!("{base}surprise = true\n"),
            "surprise",
        ),
        (
            "wrong-type",
            format!("{base}\n[pull]\nmax_concurrent_downloads = \"four\"\n"),
            "max_concurrent_downloads",
        ),
        (
            "bad-platform",
            format!("{base}\n[pull]\nplatform = \"linux/amd64/v1/extra\"\n"),
            "pull.platform",
        ),
    ];
    for (name, text, key) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("writing config");
        let (code, stderr) = run_daemon_with_config(&path);
        assert_eq!(code, Some(64), "{name}: stderr: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{name}: stderr does not name the file: {stderr}"
        );
        assert!(
            stderr.contains(key),
            "{name}: stderr does not name `{key}`: {stderr}"
        );
        assert!(!socket.exists(), "{name}: the daemon bound its socket");
    }

    let missing = dir.path().join("no-such-config.toml");
    let (code, stderr) = run_daemon_with_config(&missing);
    assert_eq!(code, Some(64), "missing file: stderr: {stderr}");
    assert!(
        stderr.contains(&missing.display().to_string()),
        "stderr does not name the missing file: {stderr}"
    );
}
