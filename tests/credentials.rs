//! Credentials through the daemon: node config.json / .dockercfg files, listed files,
//! secret directories, both matching modes, request auth, identity tokens, delegated
//! token realms, hot reload, `explain`, and secrets kept out of logs and errors —
//! against real docker-registry instances, a real containerd, over the CRI socket.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::cri::{explain, Daemon, DaemonConfig};
use common::images;
use common::registry::Registry;
use common::scenario::{password_auth, pull, pull_err, pull_ok, start_many as start};
use common::token::{TokenOptions, TokenUser};

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A docker `auths` entry with the `auth` field.
fn auth_entry(user: &str, password: &str) -> String {
    format!(r#"{{"auth": "{}"}}"#, b64(&format!("{user}:{password}")))
}

/// `{"auths": {KEY: ENTRY, ...}}`.
fn config_json(entries: &[(&str, String)]) -> String {
    let body: Vec<String> = entries
        .iter()
        .map(|(key, entry)| format!("{key:?}: {entry}"))
        .collect();
    format!("{{\"auths\": {{{}}}}}", body.join(", "))
}

/// `.dockercfg`: the flat map.
fn dockercfg(entries: &[(&str, String)]) -> String {
    let body: Vec<String> = entries
        .iter()
        .map(|(key, entry)| format!("{key:?}: {entry}"))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// Pulls until it works; a file change must count within a few seconds. The limit
/// only bounds a hang.
async fn pull_eventually(daemon: &Daemon, image: &str) -> String {
    let started = Instant::now();
    loop {
        match pull(daemon, image, None).await {
            Ok(id) => return id,
            Err(status) if started.elapsed() < Duration::from_secs(10) => {
                let _ = status;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!(
                "PullImage {image} still failing: {:?}: {}\ndaemon log:\n{}",
                status.code(),
                status.message(),
                daemon.log()
            ),
        }
    }
}

/// The daemon's "pulled" log lines.
fn pulled_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" pulled ")).collect()
}

fn refused_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("credential refused"))
        .collect()
}

fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!text.contains(secret), "a secret is in the {what}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_config_json_glob_and_prefix_keys_choose_between_two_registries() {
    const P1: &str = "ann-pw-5e1d";
    const P2: &str = "ben-pw-83a0";
    const WRONG: &str = "ben-wrong-1c44";
    const WRONG2: &str = "ben-wrong-9d27";
    let (containerd, registries) = start(vec![
        Box::new(|| Registry::htpasswd("ann", P1)),
        Box::new(|| Registry::htpasswd("ben", P2)),
    ]);
    let (r1, r2) = (&registries[0], &registries[1]);
    let image = images::busybox().app_text("private\n").build();
    let on_r1 = image.push(r1, "team/app");
    let on_r2 = image.push(r2, "team/app");
    let refused_everywhere = image.push(r2, "wrong/app");
    let port1 = r1.host().rsplit(':').next().expect("port");
    let glob_key = format!("127.0.0.*:{port1}");
    let exact_wrong = format!("{}/team/app", r2.host());
    let team_key = format!("{}/team", r2.host());
    let wrong_key = format!("{}/wrong", r2.host());
    let json = config_json(&[
        (&glob_key, auth_entry("ann", P1)),
        (&exact_wrong, auth_entry("ben", WRONG)),
        (&team_key, auth_entry("ben", P2)),
        (&wrong_key, auth_entry("ben", WRONG2)),
    ]);
    let daemon = DaemonConfig::new(&containerd)
        .registry(r1)
        .registry(r2)
        .docker_config(&json)
        .start();
    let node_file = daemon.kubelet_root_dir().join("config.json");

    // The glob key (a real glob: `*` for one label, as kubelet matches) picks r1's user.
    assert_eq!(
        pull_ok(&daemon, &on_r1.reference, None).await,
        on_r1.config_digest
    );
    let log = daemon.log();
    let pulled = pulled_lines(&log);
    assert_eq!(pulled.len(), 1, "{log}");
    assert!(
        pulled[0].contains(&format!("key={glob_key} ")),
        "{}",
        pulled[0]
    );
    assert!(
        pulled[0].contains(&format!("credential_source={}", node_file.display())),
        "{}",
        pulled[0]
    );
    assert!(refused_lines(&log).is_empty(), "{log}");

    // r2/team/app: the longer key (wrong password) is tried first, then the prefix.
    assert_eq!(
        pull_ok(&daemon, &on_r2.reference, None).await,
        on_r2.config_digest
    );
    let log = daemon.log();
    let refused = refused_lines(&log);
    assert_eq!(refused.len(), 1, "{log}");
    assert!(
        refused[0].contains(&format!("key={exact_wrong} ")),
        "{}",
        refused[0]
    );
    assert!(refused[0].contains("status=401"), "{}", refused[0]);
    let pulled = pulled_lines(&log);
    assert!(
        pulled[1].contains(&format!("key={team_key} ")),
        "the key that worked is named: {}",
        pulled[1]
    );

    // The candidate that worked is remembered for the repository: no second 401.
    pull_ok(&daemon, &on_r2.reference, None).await;
    assert_eq!(refused_lines(&daemon.log()).len(), 1, "{}", daemon.log());

    // Every matching credential refused: the error lists each attempt, then anonymous.
    let status = pull_err(&daemon, &refused_everywhere.reference, None).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let message = status.message();
    assert!(
        message.contains(&format!(
            "basic \"{wrong_key}\" from {} → 401",
            node_file.display()
        )),
        "{message}"
    );
    assert!(message.contains("anonymous → 401"), "{message}");

    let secrets = [
        P1,
        P2,
        WRONG,
        WRONG2,
        &b64(&format!("ann:{P1}")),
        &b64(&format!("ben:{P2}")),
        &b64(&format!("ben:{WRONG}")),
    ];
    assert_no_secret("error", message, &secrets);
    assert_no_secret("daemon log", &daemon.log(), &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_dirs_and_both_matching_modes() {
    const PASSWORD: &str = "cat-pw-40b9";
    let (containerd, registries) = start(vec![Box::new(|| Registry::htpasswd("cat", PASSWORD))]);
    let registry = &registries[0];
    let image = images::busybox().build();
    let team = image.push(registry, "team/app");
    let other = image.push(registry, "other/app");
    let port = registry.host().rsplit(':').next().expect("port");
    // `*0.0.1` spans "127." only when `*` may cross dots (span-labels), never in
    // kubelet's label-by-label matching.
    let spanning_key = format!("*0.0.1:{port}");
    let secret = config_json(&[(&spanning_key, auth_entry("cat", PASSWORD))]);
    let legacy_key = format!("{}/team", registry.host());
    let legacy = dockercfg(&[(&legacy_key, auth_entry("cat", PASSWORD))]);

    let span = DaemonConfig::new(&containerd)
        .registry(registry)
        .matching("span-labels")
        .secret("global-pull-secret", ".dockerconfigjson", &secret)
        .start();
    let secret_file = span
        .dir()
        .join("secrets/global-pull-secret/.dockerconfigjson");
    assert_eq!(
        pull_ok(&span, &other.reference, None).await,
        other.config_digest
    );
    let log = span.log();
    let pulled = pulled_lines(&log);
    assert!(pulled[0].contains(&format!("key={spanning_key} ")), "{log}");
    assert!(
        pulled[0].contains(&format!("credential_source={}", secret_file.display())),
        "{log}"
    );

    let kubelet = DaemonConfig::new(&containerd)
        .registry(registry)
        .matching("kubelet")
        .secret("global-pull-secret", ".dockerconfigjson", &secret)
        .secret("legacy", ".dockercfg", &legacy)
        .start();
    let status = pull_err(&kubelet, &other.reference, None).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        !status.message().contains(&spanning_key),
        "the spanning glob does not match in kubelet mode: {}",
        status.message()
    );
    // A kubernetes.io/dockercfg secret (flat format) with a path prefix key.
    assert_eq!(
        pull_ok(&kubelet, &team.reference, None).await,
        team.config_digest
    );
    let log = kubelet.log();
    assert!(
        pulled_lines(&log)[0].contains("secrets/legacy/.dockercfg"),
        "{log}"
    );
    assert_no_secret("daemon log", &log, &[PASSWORD]);
    assert_no_secret("daemon log", &span.log(), &[PASSWORD]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_auth_wrong_then_dockercfg_right_and_dockercfg_only_without_config_json() {
    const PASSWORD: &str = "dan-pw-2b6e";
    const WRONG: &str = "dan-wrong-77f0";
    let (containerd, registries) = start(vec![Box::new(|| Registry::htpasswd("dan", PASSWORD))]);
    let registry = &registries[0];
    let pushed = images::busybox().build().push(registry, "team/app");
    // Old docker wrote keys with a scheme; it is stripped.
    let key = format!("https://{}", registry.host());
    let daemon = DaemonConfig::new(&containerd)
        .registry(registry)
        .kubelet_file(
            ".dockercfg",
            &dockercfg(&[(&key, auth_entry("dan", PASSWORD))]),
        )
        .start();
    let dockercfg_path = daemon.kubelet_root_dir().join(".dockercfg");

    // The request's (kubelet's) credential first; refused, the node file's works.
    let id = pull_ok(&daemon, &pushed.reference, password_auth("dan", WRONG)).await;
    assert_eq!(id, pushed.config_digest);
    let log = daemon.log();
    assert!(
        refused_lines(&log)[0].contains("credential_source=request"),
        "{log}"
    );
    assert!(
        pulled_lines(&log)[0].contains(&format!("credential_source={}", dockercfg_path.display())),
        "{log}"
    );

    // A valid config.json (even one without a matching key) hides every .dockercfg,
    // as in kubelet — and the change counts without a restart.
    let config_json_path = daemon.kubelet_root_dir().join("config.json");
    std::fs::write(
        &config_json_path,
        config_json(&[("elsewhere.example", auth_entry("x", "y"))]),
    )
    .expect("writing config.json");
    let status = pull_err(&daemon, &pushed.reference, password_auth("dan", WRONG)).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("from request → 401"),
        "{}",
        status.message()
    );
    assert!(
        !status.message().contains(".dockercfg"),
        "{}",
        status.message()
    );
    std::fs::remove_file(&config_json_path).expect("removing config.json");
    pull_eventually(&daemon, &pushed.reference).await;
    assert_no_secret("daemon log", &daemon.log(), &[PASSWORD, WRONG]);
    assert_no_secret("error", status.message(), &[PASSWORD, WRONG]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_after_start_are_used_and_a_broken_one_is_logged_once() {
    const PASSWORD: &str = "eve-pw-c0d3";
    let (containerd, registries) = start(vec![Box::new(|| Registry::htpasswd("eve", PASSWORD))]);
    let registry = &registries[0];
    let pushed = images::busybox().build().push(registry, "team/app");
    let daemon = DaemonConfig::new(&containerd)
        .registry(registry)
        .credential_file("auth.json", None)
        .start();
    let listed = daemon.dir().join("auth.json");
    let node = daemon.kubelet_root_dir().join("config.json");
    let status = pull_err(&daemon, &pushed.reference, None).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // Broken (cut short): logged with its path and the JSON error, once, and skipped.
    let full = config_json(&[(registry.host(), auth_entry("eve", PASSWORD))]);
    std::fs::write(&node, &full[..full.len() - 3]).expect("writing config.json");
    pull_err(&daemon, &pushed.reference, None).await;
    pull_err(&daemon, &pushed.reference, None).await;
    let log = daemon.log();
    let reports: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not valid") && l.contains(&node.display().to_string()))
        .collect();
    assert_eq!(reports.len(), 1, "{log}");
    assert!(
        reports[0].contains("line 1"),
        "the JSON error: {}",
        reports[0]
    );

    // Fixed: picked up.
    std::fs::write(&node, &full).expect("writing config.json");
    assert_eq!(
        pull_eventually(&daemon, &pushed.reference).await,
        pushed.config_digest
    );
    std::fs::remove_file(&node).expect("removing config.json");
    // A listed file that appears after start (podman's auth.json format).
    std::fs::write(&listed, &full).expect("writing auth.json");
    pull_eventually(&daemon, &pushed.reference).await;
    let log = daemon.log();
    assert!(
        pulled_lines(&log)
            .last()
            .is_some_and(|l| l.contains(&format!("credential_source={}", listed.display()))),
        "{log}"
    );
    assert_no_secret(
        "daemon log",
        &log,
        &[PASSWORD, &b64(&format!("eve:{PASSWORD}"))],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_token_and_delegated_realm_credentials_against_token_servers() {
    const CARL: &str = "carl-pw-6a1f";
    let (containerd, registries) = start(vec![
        Box::new(|| Registry::token(vec![TokenUser::new("bob", "bob-pw-0e9b").pull("team/*")])),
        Box::new(|| {
            Registry::token_with(TokenOptions {
                users: vec![TokenUser::new("carl", CARL).pull("*")],
                realm_host: "localhost".into(),
                ..TokenOptions::default()
            })
        }),
    ]);
    let (tokens, delegated) = (&registries[0], &registries[1]);
    let image = images::busybox().build();
    let by_identity = image.push(tokens, "team/app");
    let by_realm = image.push(delegated, "sso/app");
    let token_server = tokens.token_server().expect("token server");
    let realm_server = delegated.token_server().expect("token server");
    let refresh = token_server.issue_refresh_token("bob");
    // No key for the delegated registry itself: only its token realm's host has one.
    let realm_key = realm_server.realm_host_port();
    assert!(realm_key.starts_with("localhost:"), "{realm_key}");
    let json = config_json(&[
        (
            tokens.host(),
            format!(r#"{{"identitytoken": "{refresh}"}}"#),
        ),
        (&realm_key, auth_entry("carl", CARL)),
    ]);
    let daemon = DaemonConfig::new(&containerd)
        .registry(tokens)
        .registry(delegated)
        .docker_config(&json)
        .start();

    token_server.clear_requests();
    assert_eq!(
        pull_ok(&daemon, &by_identity.reference, None).await,
        by_identity.config_digest
    );
    let requests = token_server.requests();
    assert!(
        requests.iter().any(|r| r.status == 200
            && r.form
                .contains(&("grant_type".into(), "refresh_token".into()))
            && r.form.contains(&("refresh_token".into(), refresh.clone()))),
        "{requests:?}"
    );

    realm_server.clear_requests();
    assert_eq!(
        pull_ok(&daemon, &by_realm.reference, None).await,
        by_realm.config_digest
    );
    let requests = realm_server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.status == 200 && r.basic_user.as_deref() == Some("carl")),
        "the realm got the realm host's credential: {requests:?}"
    );
    assert_no_secret("daemon log", &daemon.log(), &[CARL, &refresh]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_provider_plugin_end_to_end_after_node_files() {
    const PASSWORD: &str = "fay-pw-a7c1";
    let (containerd, registries) = start(vec![Box::new(|| Registry::htpasswd("fay", PASSWORD))]);
    let registry = &registries[0];
    let pushed = images::busybox().build().push(registry, "team/app");
    let port = registry.host().rsplit(':').next().expect("port");
    let plugins = tempfile::tempdir().expect("temp dir");
    let bin = plugins.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    // A shell plugin, as kubelet runs them: request on stdin, response on stdout.
    let request_copy = plugins.path().join("request.json");
    let script = format!(
        "#!/bin/sh\ncat > \"{}\"\nprintf '%s' '{{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Registry\",\"cacheDuration\":\"60s\",\"auth\":{{\"*.0.0.1:{port}\":{{\"username\":\"fay\",\"password\":\"{PASSWORD}\"}}}}}}'\n",
        request_copy.display()
    );
    let plugin = bin.join("test-plugin");
    std::fs::write(&plugin, script).expect("plugin");
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let config = plugins.path().join("providers.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: test-plugin\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n    defaultCacheDuration: \"1m\"\n    matchImages:\n      - \"*.0.0.1:{port}\"\n"
        ),
    )
    .expect("provider config");
    // A wrong node-file credential comes first; the provider's is tried after it.
    let daemon = DaemonConfig::new(&containerd)
        .registry(registry)
        .docker_config(&config_json(&[(
            registry.host(),
            auth_entry("fay", "wrong-pw-31b8"),
        )]))
        .credentials_line(&format!("provider_config = \"{}\"", config.display()))
        .credentials_line(&format!("provider_bin_dir = \"{}\"", bin.display()))
        .start();
    assert_eq!(
        pull_ok(&daemon, &pushed.reference, None).await,
        pushed.config_digest
    );
    let request = std::fs::read_to_string(&request_copy).expect("the plugin ran");
    assert!(
        request.contains(&format!("{}/team/app", registry.host())),
        "{request}"
    );
    let log = daemon.log();
    assert_eq!(refused_lines(&log).len(), 1, "{log}");
    assert!(
        pulled_lines(&log)[0].contains("credential_source=provider:test-plugin"),
        "{log}"
    );
    assert_no_secret("daemon log", &log, &[PASSWORD, "wrong-pw-31b8"]);

    // explain runs the providers too and shows them after the node file.
    let out = daemon_explain(&daemon, &pushed.reference);
    let sources: Vec<&str> = out["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter_map(|c| c["source"].as_str())
        .collect();
    assert_eq!(sources.len(), 2, "{out}");
    assert!(sources[0].ends_with("config.json"), "{out}");
    assert_eq!(sources[1], "provider:test-plugin");
}

/// `cri-imaged explain --config <the daemon's config> IMAGE`.
fn daemon_explain(daemon: &Daemon, image: &str) -> serde_json::Value {
    explain(daemon.config_path(), image).0
}

/// Writes a daemon config for `explain` (no daemon runs) and returns its path.
fn explain_setup(dir: &Path, matching: &str) -> std::path::PathBuf {
    let kubelet = dir.join("kubelet");
    let secret = dir.join("secrets/pull");
    std::fs::create_dir_all(&kubelet).expect("mkdir");
    std::fs::create_dir_all(&secret).expect("mkdir");
    std::fs::write(
        kubelet.join("config.json"),
        config_json(&[
            ("127.0.0.1:5000", auth_entry("node", "node-secret-1")),
            ("*.0.0.1:5000/team", auth_entry("glob", "glob-secret-2")),
            (
                "127.0.0.1:5000/team/app",
                r#"{"identitytoken": "id-secret-3"}"#.into(),
            ),
            ("other.example", auth_entry("x", "other-secret-4")),
        ]),
    )
    .expect("config.json");
    std::fs::write(
        secret.join(".dockerconfigjson"),
        config_json(&[(
            "127.0.0.1:5000/team",
            r#"{"registrytoken": "reg-secret-5"}"#.into(),
        )]),
    )
    .expect("secret");
    let config = dir.join("cri-imaged.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\nregistries_conf = \"{}\"\n[credentials]\nkubelet_root_dir = \"{}\"\nsecret_dirs = [\"{}\"]\nmatching = \"{matching}\"\n",
            dir.join("registries.conf").display(),
            kubelet.display(),
            dir.join("secrets").display()
        ),
    )
    .expect("config");
    config
}

#[test]
fn explain_prints_candidates_in_trial_order_without_secrets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = explain_setup(dir.path(), "kubelet");
    let (json, output) = explain(&config, "127.0.0.1:5000/team/app");
    let node = dir.path().join("kubelet/config.json").display().to_string();
    let secret = dir
        .path()
        .join("secrets/pull/.dockerconfigjson")
        .display()
        .to_string();
    assert_eq!(json["image"], "127.0.0.1:5000/team/app:latest");
    assert_eq!(json["matching"], "kubelet");
    let candidates: Vec<(String, String, String)> = json["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| {
            (
                c["key"].as_str().unwrap_or_default().to_owned(),
                c["source"].as_str().unwrap_or_default().to_owned(),
                c["kind"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let t = |k: &str, s: &str, kind: &str| (k.to_owned(), s.to_owned(), kind.to_owned());
    // kubelet order: reverse-lexicographic keys; a key's credentials in source order.
    assert_eq!(
        candidates,
        vec![
            t("127.0.0.1:5000/team/app", &node, "identitytoken"),
            t("127.0.0.1:5000/team", &secret, "registrytoken"),
            t("127.0.0.1:5000", &node, "basic"),
            t("*.0.0.1:5000/team", &node, "basic"),
        ]
    );
    assert_no_secret(
        "explain output",
        &output,
        &[
            "node-secret-1",
            "glob-secret-2",
            "id-secret-3",
            "other-secret-4",
            "reg-secret-5",
        ],
    );

    let config = explain_setup(dir.path(), "span-labels");
    let (json, _) = explain(&config, "127.0.0.1:5000/team/app");
    assert_eq!(json["matching"], "span-labels");
    // Most specific first: the longest path, then literal hosts before globs.
    let keys: Vec<&str> = json["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter_map(|c| c["key"].as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "127.0.0.1:5000/team/app",
            "127.0.0.1:5000/team",
            "*.0.0.1:5000/team",
            "127.0.0.1:5000"
        ]
    );

    // Bad configuration: exit 64 before anything else.
    std::fs::write(&config, "[credentials]\nmatching = \"fuzzy\"\n").expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cri-imaged"))
        .args(["explain", "--config"])
        .arg(&config)
        .arg("busybox")
        .output()
        .expect("running cri-imaged explain");
    assert_eq!(out.status.code(), Some(64));
}
