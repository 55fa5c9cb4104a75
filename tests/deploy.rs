//! deploy/ checked as an operator would use it: the systemd units with
//! `systemd-analyze`, every YAML document against the Kubernetes kind it declares and
//! the Dockerfile's stages (tests/deploy/check_deploy.py in a venv), and every
//! example configuration loaded by the binary's own `check-config`, installed where
//! the examples say, with broken copies refused by name.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{require_tool, run};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn must<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("test harness: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------
// systemd

/// A root for `systemd-analyze --root`: the host's unit directory (systemd's own
/// targets, and containerd.service from Debian's containerd package), the binary
/// where the unit runs it, a stand-in kubelet.service, and `units` in
/// /etc/systemd/system. systemd need not be running (not PID 1 in a container).
fn systemd_root(units: &[(&str, &str)]) -> tempfile::TempDir {
    must(require_tool("systemd-analyze", "systemd"));
    let host_units = Path::new("/lib/systemd/system");
    if !host_units.join("containerd.service").is_file() {
        panic!("test harness: no containerd.service in {}; install with: apt-get install containerd (or run scripts/install-deps.sh)", host_units.display());
    }
    let root = tempfile::tempdir().unwrap();
    let dir = |path: &str| {
        let dir = root.path().join(path);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    must(run(Command::new("cp")
        .arg("-a")
        .arg(host_units)
        .arg(dir("lib/systemd"))));
    std::fs::copy(
        env!("CARGO_BIN_EXE_cri-imaged"),
        dir("usr/local/bin").join("cri-imaged"),
    )
    .unwrap();
    // kubelet is not packaged in Debian 12: a stand-in for the drop-in to attach to.
    let kubelet = dir("usr/bin").join("kubelet");
    std::fs::write(&kubelet, "#!/bin/sh\n").unwrap();
    must(run(Command::new("chmod").arg("0755").arg(&kubelet)));
    let etc = dir("etc/systemd/system");
    std::fs::write(
        etc.join("kubelet.service"),
        "[Unit]\nDescription=kubelet (stand-in)\n[Service]\nExecStart=/usr/bin/kubelet\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    for (path, content) in units {
        let path = etc.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    root
}

/// `systemd-analyze verify` of `unit` under `root`: Ok unless it exits non-zero or
/// says anything (an unknown key is only a warning there, and still a mistake).
fn verify(root: &Path, unit: &str) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .unwrap();
    if out.status.success() && out.stdout.is_empty() && out.stderr.is_empty() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

fn unit_text() -> String {
    std::fs::read_to_string(deploy().join("cri-imaged.service")).unwrap()
}

#[test]
fn systemd_unit_verifies_and_a_typo_in_it_does_not() {
    let unit = unit_text();
    let root = systemd_root(&[("cri-imaged.service", &unit)]);
    if let Err(e) = verify(root.path(), "cri-imaged.service") {
        panic!("deploy/cri-imaged.service: {e}");
    }

    let broken = unit.replace("ProtectHome=", "ProtectHom=");
    let root = systemd_root(&[("cri-imaged.service", &broken)]);
    let e = verify(root.path(), "cri-imaged.service").unwrap_err();
    assert!(e.contains("Unknown key 'ProtectHom'"), "{e}");
}

#[test]
fn systemd_unit_depends_on_containerd_and_reaches_its_paths() {
    let unit = unit_text();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    let values = |key: &str| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .flat_map(|v| v.split_whitespace().map(String::from))
            .collect()
    };
    for (key, wanted) in [
        ("Requires", "containerd.service"),
        ("After", "containerd.service"),
        ("Restart", "on-failure"),
        ("RuntimeDirectory", "cri-imaged"),
        ("RuntimeDirectoryMode", "0750"),
        ("ReadWritePaths", "/var/lib/containerd"),
        ("ReadWritePaths", "/run/containerd"),
        ("RestartPreventExitStatus", "64"),
    ] {
        assert!(
            values(key).iter().any(|v| v == wanted),
            "{key}={wanted} missing"
        );
    }
    // Read access to kubelet's dir and /etc/containers: nothing hides them.
    for key in ["InaccessiblePaths", "TemporaryFileSystem", "ProtectSystem"] {
        for path in ["/var", "/var/lib/kubelet", "/etc", "/etc/containers"] {
            assert!(!values(key).iter().any(|v| v == path), "{key} hides {path}");
        }
    }
    assert_eq!(
        values("ProtectSystem"),
        ["strict"],
        "/etc and /var stay readable"
    );
    // The socket kubelet dials lives in the runtime directory.
    assert!(unit.contains("unix:///run/cri-imaged/cri-imaged.sock"));
}

#[test]
fn systemd_unit_hardening_scores_at_most_3_of_10() {
    let root = systemd_root(&[("cri-imaged.service", &unit_text())]);
    let out = Command::new("systemd-analyze")
        .arg("security")
        .arg("--offline=yes")
        .arg(format!("--root={}", root.path().display()))
        // Exposure above 3.0 (of 10) fails; the unit scored 2.5 when written.
        .arg("--threshold=30")
        .arg("cri-imaged.service")
        .output()
        .unwrap();
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("Overall exposure level"), "{shown}");
}

#[test]
fn kubelet_drop_in_verifies() {
    let drop_in = std::fs::read_to_string(deploy().join("kubelet/10-cri-imaged.conf")).unwrap();
    let root = systemd_root(&[
        ("cri-imaged.service", &unit_text()),
        ("kubelet.service.d/10-cri-imaged.conf", &drop_in),
    ]);
    if let Err(e) = verify(root.path(), "kubelet.service") {
        panic!("deploy/kubelet/10-cri-imaged.conf: {e}");
    }
}

// ---------------------------------------------------------------------------
// YAML and the Dockerfile

/// tests/deploy/check_deploy.py on `deploy_dir`, in its venv.
fn check_deploy(deploy_dir: &Path) -> Output {
    let python = must(common::clients::venv_with(
        &repo().join("tests/deploy/requirements.txt"),
    ));
    Command::new(python)
        .arg(repo().join("tests/deploy/check_deploy.py"))
        .arg(deploy_dir)
        .arg(repo().join("Cargo.toml"))
        .output()
        .unwrap()
}

#[test]
fn manifests_match_their_kubernetes_schemas_and_the_dockerfile_builds_the_binary() {
    let out = check_deploy(&deploy());
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    for wanted in [
        "DaemonSet valid against Kubernetes 1.27.0 (strict)",
        "ConfigMap valid against Kubernetes",
        "Service valid against Kubernetes",
        "ServiceMonitor required fields",
        "KubeletConfiguration endpoints",
        "CredentialProviderConfig required fields",
        "Dockerfile: 2 stages",
    ] {
        assert!(shown.contains(wanted), "{wanted}: {shown}");
    }
    println!("{shown}");
}

/// Copies deploy/ to a temp dir, applies `edits` (file, from, to), and returns the
/// checker's verdict on the copy.
fn check_edited_copy(edits: &[(&str, &str, &str)]) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("deploy");
    must(run(Command::new("cp").arg("-a").arg(deploy()).arg(&copy)));
    for (file, from, to) in edits {
        let path = copy.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} no longer contains {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }
    check_deploy(&copy)
}

#[test]
fn broken_manifests_and_dockerfile_are_refused_by_name() {
    for (edit, wanted) in [
        (
            ("kubernetes/daemonset.yaml", "hostNetwork: true", "hostNetwrk: true"),
            "kubernetes/daemonset.yaml: DaemonSet invalid against Kubernetes 1.27.0: spec.template.spec: Additional properties are not allowed ('hostNetwrk' was unexpected)",
        ),
        (
            ("kubernetes/daemonset.yaml", "containerPort: 9102", "containerPort: \"9102\""),
            "kubernetes/daemonset.yaml: DaemonSet invalid",
        ),
        (
            ("kubernetes/service.yaml", "targetPort: metrics", "targetPort: metrix"),
            "kubernetes/service.yaml: port `metrics` must target the container's metrics port",
        ),
        (
            ("kubernetes/servicemonitor.yaml", "  selector:\n", "  selectr:\n"),
            "kubernetes/servicemonitor.yaml: ServiceMonitor: unknown spec fields ['selectr']",
        ),
        (
            ("kubernetes/servicemonitor.yaml", "interval: 30s", "interval: 30 seconds"),
            "is not a Prometheus duration",
        ),
        (
            ("kubernetes/configmap.yaml", "listen = \"0.0.0.0:9102\"", "listen = \"0.0.0.0:9103\""),
            "kubernetes/configmap.yaml: [metrics] listen '0.0.0.0:9103' is not on the container's metrics port",
        ),
        (
            ("kubelet/kubelet-config.yaml", "imageServiceEndpoint: unix:///run/cri-imaged", "imageServiceEndpoint: unix:///run/containerd"),
            "kubelet/kubelet-config.yaml: imageServiceEndpoint must be",
        ),
        (
            ("Dockerfile", "COPY --from=builder /out/cri-imaged", "COPY --from=builder /out/other"),
            "Dockerfile: final stage must COPY the binary from the builder stage",
        ),
        (
            ("Dockerfile", "protobuf-compiler", "protobuf"),
            "Dockerfile: builder stage must install protobuf-compiler",
        ),
        (
            ("kubernetes/kustomization.yaml", "  - service.yaml\n", ""),
            "Kustomization leaves out ['service.yaml']",
        ),
        (
            ("examples/credential-provider.yaml", "    defaultCacheDuration: \"12h\"\n", ""),
            "providers[0].defaultCacheDuration is required",
        ),
    ] {
        let out = check_edited_copy(&[edit]);
        let shown = text(&out);
        assert_eq!(out.status.code(), Some(1), "{edit:?}: {shown}");
        assert!(shown.contains(wanted), "{edit:?}: wanted {wanted:?} in {shown}");
    }
}

// ---------------------------------------------------------------------------
// Example configurations, loaded by the binary

/// Where each example goes on a node (deploy/examples/config.toml names these).
const INSTALLED: &[(&str, &str)] = &[
    ("registries.conf", "etc/containers/registries.conf"),
    ("policy.json", "etc/containers/policy.json"),
    (
        "registries.d/default.yaml",
        "etc/containers/registries.d/default.yaml",
    ),
    ("config.json", "var/lib/kubelet/config.json"),
    (
        "credential-provider.yaml",
        "etc/kubernetes/credential-provider.yaml",
    ),
];
/// The plugin credential-provider.yaml names, where config.toml's provider_bin_dir
/// says.
const PROVIDER: &str =
    "usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec/ecr-credential-provider";

/// A temp dir laid out as a node with the examples installed, and a stand-in
/// provider plugin (check-config wants the binary; it never runs it).
fn node_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (example, installed) in INSTALLED {
        let to = root.path().join(installed);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(deploy().join("examples").join(example), to).unwrap();
    }
    let provider = root.path().join(PROVIDER);
    std::fs::create_dir_all(provider.parent().unwrap()).unwrap();
    std::fs::write(&provider, "#!/bin/sh\nexit 1\n").unwrap();
    must(run(Command::new("chmod").arg("0755").arg(&provider)));
    root
}

/// `config` with every absolute path moved under `root` (every path in it is a
/// quoted string starting with `/`), written into `root`.
fn rooted_config(root: &Path, config: &str) -> PathBuf {
    let moved = config.replace("\"/", &format!("\"{}/", root.display()));
    let path = root.join("config.toml");
    std::fs::write(&path, moved).unwrap();
    path
}

/// `cri-imaged --config CONFIG check-config`, with the node's working directory and
/// `$HOME` (two of kubelet's credential search paths) inside `root`.
fn check_config(root: &Path, config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cri-imaged"))
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .current_dir(root)
        .env("HOME", root)
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .output()
        .unwrap()
}

fn example_config() -> String {
    std::fs::read_to_string(deploy().join("examples/config.toml")).unwrap()
}

/// The config.toml inside deploy/kubernetes/configmap.yaml.
fn configmap_config() -> String {
    let text = std::fs::read_to_string(deploy().join("kubernetes/configmap.yaml")).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    doc["data"]["config.toml"]
        .as_str()
        .expect("configmap.yaml has data.config.toml")
        .to_string()
}

#[test]
fn example_configs_pass_check_config_where_they_are_installed() {
    let config = example_config();
    // The example names every file it is checked with here.
    for (_, installed) in INSTALLED {
        let dir = Path::new(installed).parent().unwrap().display().to_string();
        assert!(
            config.contains(&format!("\"/{dir}")),
            "config.toml does not name /{dir}"
        );
    }
    let root = node_root();
    let out = check_config(root.path(), &rooted_config(root.path(), &config));
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("configuration OK"), "{shown}");
    assert!(!shown.contains("warning"), "{shown}");
}

#[test]
fn configmap_config_passes_check_config() {
    let root = node_root();
    let out = check_config(
        root.path(),
        &rooted_config(root.path(), &configmap_config()),
    );
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("configuration OK"), "{shown}");
}

/// The daemon itself started from each config where it is installed (containerd is
/// not needed to serve: it is dialled on the first call that needs it): its CRI
/// socket answers gRPC health, its status socket answers, and SIGTERM stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_from_each_example_config() {
    // The ConfigMap's metrics port, on loopback and any free port here.
    let configmap = configmap_config().replace("0.0.0.0:9102", "127.0.0.1:0");
    for (name, config) in [
        ("examples/config.toml", example_config()),
        ("configmap", configmap),
    ] {
        let root = node_root();
        let path = rooted_config(root.path(), &config);
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_cri-imaged"))
            .arg("--config")
            .arg(&path)
            .current_dir(root.path())
            .env("HOME", root.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let socket = root.path().join("run/cri-imaged/cri-imaged.sock");
        let status = root.path().join("run/cri-imaged/cri-imaged.status.sock");
        for _ in 0..200 {
            if socket.exists() && status.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            socket.exists() && status.exists(),
            "{name}: sockets {} and {}",
            socket.display(),
            status.display()
        );
        common::leftovers::assert_serving(&socket).await;
        // SIGTERM: a clean stop that removes both sockets.
        let _ = Command::new("kill").arg(daemon.id().to_string()).status();
        let exit = daemon.wait().unwrap();
        assert!(exit.success(), "{name}: {exit}");
        assert!(
            !socket.exists() && !status.exists(),
            "{name}: sockets left behind"
        );
    }
}

#[test]
fn broken_example_copies_fail_check_config_naming_the_problem() {
    // (installed file, from, to, what stderr must name besides the file)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "etc/containers/policy.json",
            "\"type\": \"reject\"",
            "\"type\": \"rejectAll\"",
            "rejectAll",
        ),
        (
            "etc/containers/registries.conf",
            "location = \"registry.example.com\"",
            "location = \"not a host\"",
            "entry 3: location is not a registry host",
        ),
        (
            "etc/containers/registries.d/default.yaml",
            "  lookaside: file:///var/lib/containers/sigstore",
            "  lookaside: [file:///var/lib/containers/sigstore",
            "",
        ),
        (
            "etc/kubernetes/credential-provider.yaml",
            "apiVersion: credentialprovider.kubelet.k8s.io/v1",
            "apiVersion: credentialprovider.kubelet.k8s.io/v9",
            "credentialprovider.kubelet.k8s.io/v9",
        ),
        (PROVIDER, "", "", "ecr-credential-provider"),
        (
            "config.toml",
            "max_concurrent_pulls = 8",
            "max_concurrent_pulls = \"eight\"",
            "max_concurrent_pulls",
        ),
    ];
    for (file, from, to, names) in cases {
        let root = node_root();
        let config = rooted_config(root.path(), &example_config());
        let path = root.path().join(file);
        if from.is_empty() {
            // A missing provider plugin.
            std::fs::remove_file(&path).unwrap();
        } else {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(from), "{file} no longer contains {from:?}");
            std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        }
        let out = check_config(root.path(), &config);
        let shown = text(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{file}: {shown}");
        let file_name = Path::new(file).file_name().unwrap().to_string_lossy();
        assert!(
            stderr.contains(&*file_name) && stderr.contains(names),
            "{file}: wanted {file_name} and {names:?} in {shown}"
        );
        // Never a secret from the credentials file.
        assert!(!stderr.contains("CHANGE-ME"), "{shown}");
    }
    // kubelet's config.json is one of its search paths: a broken one is skipped by
    // the daemon (as by kubelet), so check-config warns, naming it, and passes.
    let root = node_root();
    let config = rooted_config(root.path(), &example_config());
    let path = root.path().join("var/lib/kubelet/config.json");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, original.replacen("\"auths\": {", "\"auths\": [", 1)).unwrap();
    let out = check_config(root.path(), &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stderr.contains("warning") && stderr.contains("config.json") && stderr.contains("skipped"),
        "{stderr}"
    );
    assert!(!stderr.contains("CHANGE-ME"), "{stderr}");
}
