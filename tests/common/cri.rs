//! The CRI side of the tests: a tonic `ImageService` client over a unix socket (for
//! cri-imaged and for containerd's own CRI), and [`Daemon`], the cri-imaged binary
//! started with a generated config.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cri_imaged::proto::image_service_client::ImageServiceClient;
use tempfile::TempDir;
use tonic::transport::Channel;

use super::containerd::{Containerd, NAMESPACE};
use super::registry::Registry;
use super::{must, read_log, spawn_logged, terminate, wait_ready, HarnessError, IoContext, Result};

pub use cri_imaged::proto;

/// A gRPC channel to a unix socket (any service on it), dialled by the daemon's
/// own client code.
pub async fn channel(socket: &Path) -> Channel {
    cri_imaged::client::channel(&socket.display().to_string())
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()))
}

/// Connects an `ImageService` client to a unix socket (cri-imaged's or containerd's
/// own CRI), with the client the `cri-imaged` subcommands use.
pub async fn connect(socket: &Path) -> ImageServiceClient<Channel> {
    cri_imaged::client::connect(&socket.display().to_string())
        .await
        .unwrap_or_else(|e| panic!("connecting to CRI at {}: {e}", socket.display()))
}

/// A `PullImageRequest` for `image`, with username/password if given (what kubelet
/// sends: it passes only username and password).
pub fn pull_request(image: &str, auth: Option<(&str, &str)>) -> proto::PullImageRequest {
    proto::PullImageRequest {
        image: Some(image_spec(image)),
        auth: auth.map(|(username, password)| proto::AuthConfig {
            username: username.to_owned(),
            password: password.to_owned(),
            ..Default::default()
        }),
        sandbox_config: None,
    }
}

pub fn image_spec(image: &str) -> proto::ImageSpec {
    proto::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// One `[[registry]]` entry of registries.conf.
#[derive(Debug, Clone)]
struct RegistryEntry {
    location: String,
    insecure: bool,
}

/// Builds cri-imaged's config. Keys are the daemon's contract:
/// `[server] listen`, `[containerd] address/namespace/snapshotter`,
/// `[registry] registries_conf/ca_dir`, `[pull] platform`, `[credentials]
/// kubelet_root_dir`.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    containerd_address: String,
    snapshotter: String,
    platform: Option<String>,
    direct_content: Option<bool>,
    rewrite_authority: Option<bool>,
    /// policy.json written next to the config; None: no file (every image accepted).
    policy_json: Option<String>,
    registries_d: Vec<(String, String)>,
    /// (file name, text) written into `registries.conf.d/`.
    registries_drop_ins: Vec<(String, String)>,
    /// (path, PEM) written into the `certs_d` directory.
    certs_d_files: Vec<(String, String)>,
    /// `[registry] proxy` and `no_proxy`.
    proxy: Option<(String, String)>,
    registries: Vec<RegistryEntry>,
    registries_conf_extra: String,
    /// (file name `host..port`, PEM).
    cas: Vec<(String, String)>,
    docker_config: Option<String>,
    /// (file name, content) written into `{kubelet_root_dir}`.
    kubelet_files: Vec<(String, String)>,
    /// (file name, config.json text) written into the base dir, listed in `files`.
    credential_files: Vec<(String, String)>,
    /// (secret name, file name, content) written to `secrets/<name>/<file>`.
    secrets: Vec<(String, String, String)>,
    /// Lines added to `[credentials]`.
    credentials_toml: String,
    extra_toml: String,
    /// `[pull] unpack`; None: the daemon's default, unless the suite is run with
    /// `CRI_IMAGED_TEST_UNPACK=containerd` (to run every test on the fallback path).
    unpack: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Whether daemons started with the default `[pull] unpack` unpack in-house (the
/// suite is not being run on the `Diff.Apply` fallback path).
pub fn unpacks_in_house_by_default() -> bool {
    std::env::var("CRI_IMAGED_TEST_UNPACK").map_or(true, |mode| mode == "auto")
}

/// The debug line the daemon logs when `layer` was staged for in-house unpacking,
/// `streamed`: extracted from its download as it arrived, or read back from the
/// content store.
pub fn staged_line(layer: &str, streamed: bool) -> String {
    format!("layer staged digest={layer} streamed={streamed}")
}

impl DaemonConfig {
    /// Stores into `containerd` (namespace k8s.io, its snapshotter).
    pub fn new(containerd: &Containerd) -> DaemonConfig {
        DaemonConfig {
            containerd_address: containerd.address(),
            snapshotter: containerd.snapshotter().to_owned(),
            platform: None,
            direct_content: None,
            rewrite_authority: None,
            policy_json: None,
            registries_d: Vec::new(),
            registries_drop_ins: Vec::new(),
            certs_d_files: Vec::new(),
            proxy: None,
            registries: Vec::new(),
            registries_conf_extra: String::new(),
            cas: Vec::new(),
            docker_config: None,
            kubelet_files: Vec::new(),
            credential_files: Vec::new(),
            secrets: Vec::new(),
            credentials_toml: String::new(),
            extra_toml: String::new(),
            unpack: std::env::var("CRI_IMAGED_TEST_UNPACK").ok(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Makes `registry` reachable: `insecure = true` for plain HTTP; its CA in
    /// `ca_dir` as `127.0.0.1..PORT` for TLS (and for its token realm's host..port).
    pub fn registry(mut self, registry: &Registry) -> DaemonConfig {
        if registry.is_tls() {
            if let Some(pem) = registry.ca_pem() {
                self.cas
                    .push((registry.host().replace(':', ".."), pem.clone()));
                // The token realm is another host:port served with the same CA.
                if let Some(token) = registry.token_server() {
                    self.cas
                        .push((token.realm_host_port().replace(':', ".."), pem));
                }
            }
        } else {
            self.registries.push(RegistryEntry {
                location: registry.host().to_owned(),
                insecure: true,
            });
        }
        self
    }

    /// Appended verbatim to registries.conf (mirrors, blocked, short names, …).
    pub fn registries_conf(mut self, toml: &str) -> DaemonConfig {
        self.registries_conf_extra.push_str(toml);
        self.registries_conf_extra.push('\n');
        self
    }

    /// An extra CA file in `ca_dir` under `name` (`host..port` or `host`).
    pub fn ca(mut self, name: &str, pem: &str) -> DaemonConfig {
        self.cas.push((name.to_owned(), pem.to_owned()));
        self
    }

    /// The registry's client certificate for mutual TLS, in the certs.d layout
    /// (`<host:port>/client.cert` and `client.key` under `certs_d`).
    pub fn client_certificate(mut self, registry: &Registry) -> DaemonConfig {
        let (cert, key) = registry
            .client_certificate()
            .expect("a registry started with Registry::mutual_tls");
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
        };
        self.certs_d_files
            .push((format!("{}/client.cert", registry.host()), read(&cert)));
        self.certs_d_files
            .push((format!("{}/client.key", registry.host()), read(&key)));
        self
    }

    /// `[containerd] direct_content` (the daemon's default when not set).
    pub fn direct_content(mut self, enabled: bool) -> DaemonConfig {
        self.direct_content = Some(enabled);
        self
    }

    /// `[registry] proxy = url` and `no_proxy`.
    pub fn proxy(mut self, url: &str, no_proxy: &str) -> DaemonConfig {
        self.proxy = Some((url.to_owned(), no_proxy.to_owned()));
        self
    }

    /// A drop-in file `registries.conf.d/<name>` (`[registry] registries_conf_d`).
    pub fn registries_drop_in(mut self, name: &str, toml: &str) -> DaemonConfig {
        self.registries_drop_ins
            .push((name.to_owned(), toml.to_owned()));
        self
    }

    /// A `registries.d/NAME` file (containers-registries.d(5)): where the daemon
    /// reads signatures. Without one the directory is empty (never the host's).
    pub fn registries_d(mut self, name: &str, yaml: &str) -> DaemonConfig {
        self.registries_d.push((name.to_owned(), yaml.to_owned()));
        self
    }

    /// A policy.json for the daemon (`[registry] policy_json`). Without one the
    /// daemon is pointed at a file that does not exist, never at the host's.
    pub fn policy_json(mut self, json: &str) -> DaemonConfig {
        self.policy_json = Some(json.to_owned());
        self
    }

    /// `[server] rewrite_authority` (default: the daemon's, on).
    pub fn rewrite_authority(mut self, enabled: bool) -> DaemonConfig {
        self.rewrite_authority = Some(enabled);
        self
    }

    pub fn platform(mut self, platform: &str) -> DaemonConfig {
        self.platform = Some(platform.to_owned());
        self
    }

    /// Written as `{kubelet_root_dir}/config.json` (docker config with `auths`).
    pub fn docker_config(mut self, json: &str) -> DaemonConfig {
        self.docker_config = Some(json.to_owned());
        self
    }

    /// Any file in `{kubelet_root_dir}` (e.g. `.dockercfg`).
    pub fn kubelet_file(mut self, name: &str, content: &str) -> DaemonConfig {
        self.kubelet_files
            .push((name.to_owned(), content.to_owned()));
        self
    }

    /// A config.json-format file `name` in the daemon's dir, listed in
    /// `[credentials] files`. Listed even if `content` is `None` (not written).
    pub fn credential_file(mut self, name: &str, content: Option<&str>) -> DaemonConfig {
        self.credential_files.push((
            name.to_owned(),
            content.map(str::to_owned).unwrap_or_default(),
        ));
        self
    }

    /// A mounted pull secret: `secrets/<name>/<file>` (`.dockerconfigjson` or
    /// `.dockercfg`); the `secrets` dir is listed in `[credentials] secret_dirs`.
    pub fn secret(mut self, name: &str, file: &str, content: &str) -> DaemonConfig {
        self.secrets
            .push((name.to_owned(), file.to_owned(), content.to_owned()));
        self
    }

    /// `[credentials] matching` (`kubelet` or `span-labels`).
    pub fn matching(self, mode: &str) -> DaemonConfig {
        self.credentials_line(&format!("matching = \"{mode}\""))
    }

    /// A raw line in `[credentials]` (e.g. `provider_config = "…"`).
    pub fn credentials_line(mut self, line: &str) -> DaemonConfig {
        self.credentials_toml.push_str(line);
        self.credentials_toml.push('\n');
        self
    }

    /// Appended verbatim to the daemon's TOML config.
    /// `[pull] unpack` (`"auto"` or `"containerd"`).
    pub fn unpack(mut self, mode: &str) -> DaemonConfig {
        self.unpack = Some(mode.to_owned());
        self
    }

    pub fn extra_toml(mut self, toml: &str) -> DaemonConfig {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    /// Extra command-line arguments after `--config FILE`.
    pub fn arg(mut self, arg: &str) -> DaemonConfig {
        self.args.push(arg.to_owned());
        self
    }

    /// An environment variable for the daemon (e.g. `RUST_LOG`). The test process's
    /// own environment is never changed.
    pub fn env(mut self, key: &str, value: &str) -> DaemonConfig {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn start(self) -> Daemon {
        must(self.try_start())
    }

    /// Writes the files into a fresh temp dir and starts the daemon on a socket there.
    pub fn try_start(self) -> Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("cri-imaged-daemon-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let base = dir.path();
        let socket = base.join("cri-imaged.sock");
        let ca_dir = base.join("ca.d");
        let kubelet_root = base.join("kubelet");
        for d in [&ca_dir, &kubelet_root] {
            std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
        }
        let certs_d = ca_dir.with_file_name("certs.d");
        let files = self.cas.iter().map(|(n, p)| (ca_dir.join(n), p));
        let certs_d_files = self.certs_d_files.iter().map(|(n, p)| (certs_d.join(n), p));
        for (path, pem) in files.chain(certs_d_files) {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&path, pem).ctx(|| format!("writing {}", path.display()))?;
        }
        if let Some(json) = &self.docker_config {
            let path = kubelet_root.join("config.json");
            std::fs::write(&path, json).ctx(|| format!("writing {}", path.display()))?;
        }
        for (name, content) in &self.kubelet_files {
            let path = kubelet_root.join(name);
            std::fs::write(&path, content).ctx(|| format!("writing {}", path.display()))?;
        }
        for (name, content) in &self.credential_files {
            if content.is_empty() {
                continue;
            }
            let path = base.join(name);
            std::fs::write(&path, content).ctx(|| format!("writing {}", path.display()))?;
        }
        for (name, file, content) in &self.secrets {
            let dir = base.join("secrets").join(name);
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
            let path = dir.join(file);
            std::fs::write(&path, content).ctx(|| format!("writing {}", path.display()))?;
        }
        let registries_conf = base.join("registries.conf");
        std::fs::write(&registries_conf, self.registries_conf_text())
            .ctx(|| format!("writing {}", registries_conf.display()))?;
        if !self.registries_drop_ins.is_empty() {
            let dir = base.join("registries.conf.d");
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
            for (name, text) in &self.registries_drop_ins {
                let path = dir.join(name);
                std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))?;
            }
        }
        let registries_d = base.join("registries.d");
        std::fs::create_dir_all(&registries_d)
            .ctx(|| format!("creating {}", registries_d.display()))?;
        for (name, text) in &self.registries_d {
            let path = registries_d.join(name);
            std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))?;
        }
        if let Some(json) = &self.policy_json {
            let path = base.join("policy.json");
            std::fs::write(&path, json).ctx(|| format!("writing {}", path.display()))?;
        }
        let config = base.join("cri-imaged.toml");
        std::fs::write(
            &config,
            self.config_text(&socket, &registries_conf, &ca_dir, &kubelet_root),
        )
        .ctx(|| format!("writing {}", config.display()))?;

        let log = base.join("cri-imaged.log");
        let mut child = spawn_logged(
            without_runner_env(&mut Command::new(env!("CARGO_BIN_EXE_cri-imaged")))
                .arg("--config")
                .arg(&config)
                .args(&self.args)
                .envs(self.env.iter().map(|(k, v)| (k, v))),
            &log,
            "cri-imaged",
        )?;
        let waited = wait_ready(
            "cri-imaged",
            &mut child,
            &log,
            Duration::from_secs(30),
            || {
                std::os::unix::net::UnixStream::connect(&socket)
                    .ok()
                    .map(|_| ())
            },
        );
        if let Err(e) = waited {
            terminate(&mut child, Duration::from_secs(2));
            return Err(e);
        }
        Ok(Daemon {
            child,
            socket,
            config,
            registries_conf,
            ca_dir,
            kubelet_root,
            log,
            dir,
        })
    }

    /// The daemon config and registries.conf this builder writes for a daemon whose
    /// files live in `base` (what [`DaemonConfig::try_start`] writes).
    pub fn render(&self, base: &Path) -> (String, String) {
        (
            self.config_text(
                &base.join("cri-imaged.sock"),
                &base.join("registries.conf"),
                &base.join("ca.d"),
                &base.join("kubelet"),
            ),
            self.registries_conf_text(),
        )
    }

    fn registries_conf_text(&self) -> String {
        // The test's own text first: its top-level keys (search registries, mode)
        // must come before any table.
        let mut text = self.registries_conf_extra.clone();
        text.push('\n');
        for entry in &self.registries {
            text.push_str(&format!(
                "[[registry]]\nlocation = \"{}\"\ninsecure = {}\n\n",
                entry.location, entry.insecure
            ));
        }
        text
    }

    fn config_text(
        &self,
        socket: &Path,
        registries_conf: &Path,
        ca_dir: &Path,
        kubelet_root: &Path,
    ) -> String {
        let mut text = format!(
            "[server]\nlisten = \"{}\"\n{}\n[containerd]\naddress = \"{}\"\nnamespace = \"{NAMESPACE}\"\nsnapshotter = \"{}\"\n{}\n[registry]\nregistries_conf = \"{}\"\nregistries_conf_d = \"{}\"\npolicy_json = \"{}\"\nregistries_d = \"{}\"\nca_dir = \"{}\"\ncerts_d = \"{}\"\n{}\n[credentials]\nkubelet_root_dir = \"{}\"\n",
            socket.display(),
            self.rewrite_authority
                .map(|r| format!("rewrite_authority = {r}\n"))
                .unwrap_or_default(),
            self.containerd_address,
            self.snapshotter,
            self.direct_content
                .map(|d| format!("direct_content = {d}\n"))
                .unwrap_or_default(),
            registries_conf.display(),
            registries_conf.with_file_name("registries.conf.d").display(),
            registries_conf.with_file_name("policy.json").display(),
            registries_conf.with_file_name("registries.d").display(),
            ca_dir.display(),
            ca_dir.with_file_name("certs.d").display(),
            self.proxy
                .as_ref()
                .map(|(url, no)| format!("proxy = \"{url}\"\nno_proxy = \"{no}\"\n"))
                .unwrap_or_default(),
            kubelet_root.display(),
        );
        // Paths of the credential files and secrets live next to the socket.
        let base = socket.parent().unwrap_or(Path::new("/"));
        if !self.credential_files.is_empty() {
            let files: Vec<String> = self
                .credential_files
                .iter()
                .map(|(name, _)| format!("\"{}\"", base.join(name).display()))
                .collect();
            text.push_str(&format!("files = [{}]\n", files.join(", ")));
        }
        if !self.secrets.is_empty() {
            text.push_str(&format!(
                "secret_dirs = [\"{}\"]\n",
                base.join("secrets").display()
            ));
        }
        text.push_str(&self.credentials_toml);
        if let Some(platform) = &self.platform {
            text.push_str(&format!("\n[pull]\nplatform = \"{platform}\"\n"));
        }
        text.push_str(&self.extra_toml);
        if let Some(mode) = &self.unpack {
            // Into the one `[pull]` table, wherever a test's own text opened it.
            let line = format!("unpack = \"{mode}\"\n");
            match text.find("[pull]\n") {
                Some(at) => text.insert_str(at + "[pull]\n".len(), &line),
                None => text.push_str(&format!("\n[pull]\n{line}")),
            }
        }
        text
    }
}

/// A running cri-imaged; SIGTERM (then SIGKILL) on drop.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    config: PathBuf,
    registries_conf: PathBuf,
    ca_dir: PathBuf,
    kubelet_root: PathBuf,
    log: PathBuf,
    // Last: removed after the process is gone.
    dir: TempDir,
}

impl Daemon {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The status socket (`[server] status_listen`, by default named after the CRI
    /// socket, beside it).
    pub fn status_socket(&self) -> PathBuf {
        let stem = self
            .socket
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        self.socket.with_file_name(format!("{stem}.status.sock"))
    }

    /// `unix:///…/cri-imaged.sock`, as `--image-endpoint` takes it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub async fn client(&self) -> ImageServiceClient<Channel> {
        connect(&self.socket).await
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn registries_conf_path(&self) -> &Path {
        &self.registries_conf
    }

    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    pub fn kubelet_root_dir(&self) -> &Path {
        &self.kubelet_root
    }

    /// The cri-imaged process's ID (to read its CPU time from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon wrote to stdout and stderr so far (to assert that
    /// secrets never reach the log).
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// The daemon's peak resident set so far (`VmHWM`), in bytes; `None` once the
    /// process is gone.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()?;
        Some(kib * 1024)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the daemon with SIGKILL (no cleanup of its own, as `kill -9`) and
    /// waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the daemon now (SIGTERM, then SIGKILL) and returns its exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        terminate(&mut self.child, Duration::from_secs(10));
        self.child.wait().map_err(|source| HarnessError::Io {
            what: "waiting for cri-imaged".into(),
            source,
        })
    }

    /// Runs the binary's client subcommands (`pull`, `images`, `inspecti`, `rmi`,
    /// `imagefsinfo`) against this daemon: `cri-imaged SUB --image-endpoint unix://… ARGS`.
    pub fn client_command(&self, subcommand: &str, args: &[&str]) -> std::process::Output {
        must(
            Command::new(env!("CARGO_BIN_EXE_cri-imaged"))
                .arg(subcommand)
                .arg("--image-endpoint")
                .arg(self.endpoint())
                .args(args)
                .stdin(Stdio::null())
                .output()
                .ctx(|| format!("running cri-imaged {subcommand}")),
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
    }
}

/// `command` without the variables of whoever runs the tests that would change what
/// a daemon does: proxies (every daemon talks to the loopback registries directly
/// unless a test sets `[registry] proxy`) and `RUST_LOG` (tests that want one set it).
fn without_runner_env(command: &mut Command) -> &mut Command {
    for name in [
        "RUST_LOG",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        command.env_remove(name);
    }
    command
}

/// `cri-imaged explain --config CONFIG IMAGE`, which must succeed: its JSON, and
/// everything it printed (for messages).
pub fn explain(config: &Path, image: &str) -> (serde_json::Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cri-imaged"))
        .arg("explain")
        .arg("--config")
        .arg(config)
        .arg(image)
        .output()
        .expect("running cri-imaged explain");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "explain failed: {stderr}");
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("explain printed no JSON ({e}): {stdout}"));
    (json, format!("{stdout}{stderr}"))
}
