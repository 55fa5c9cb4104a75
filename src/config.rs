//! The daemon's configuration: plain data read from TOML, every default written
//! out once here and in `deploy/config.example.toml`.

use crate::auth::matcher::Matching;
use crate::platform::PlatformSpec;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub containerd: ContainerdConfig,
    pub registry: RegistryConfig,
    pub pull: PullConfig,
    pub credentials: CredentialsConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` where `GET /metrics` answers in Prometheus' text format
    /// (`"127.0.0.1:9102"`, `"[::]:9102"`); empty: no metrics endpoint.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `info,cri_imaged=debug`. `RUST_LOG` and
    /// `--log-level` take precedence.
    pub level: String,
    /// `text` (one human-readable line per event) or `json` (one JSON object per
    /// line, for log shippers). `--log-format` takes precedence.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Unix socket the CRI ImageService listens on.
    pub listen: PathBuf,
    /// Rewrite each request's `:authority` that is not an RFC 3986 authority (the
    /// socket path grpc-go, grpc-core and grpc-java clients send) so hyper serves it.
    /// `false` only to measure what the rewrite costs: such clients then fail.
    pub rewrite_authority: bool,
    /// Unix socket answering `GET /pulls` (HTTP/1.1, JSON) with the pulls in flight,
    /// for `cri-imaged pulls`. Unset: `<listen's stem>.status.sock` beside `listen`
    /// (so it is unique to this daemon); a relative path is beside `listen`;
    /// empty: off.
    pub status_listen: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: PathBuf::from("/run/cri-imaged/cri-imaged.sock"),
            rewrite_authority: true,
            status_listen: None,
        }
    }
}

impl ServerConfig {
    /// The status socket's path (`status_listen`, a relative one in `listen`'s
    /// directory); `None` when it is turned off.
    pub fn status_socket(&self) -> Option<PathBuf> {
        let dir = self.listen.parent().unwrap_or(Path::new(""));
        match &self.status_listen {
            None => {
                let stem = self
                    .listen
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "cri-imaged".into());
                Some(dir.join(format!("{stem}.status.sock")))
            }
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => Some(dir.join(path)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// Namespace whose images containerd's CRI runs (`k8s.io`).
    pub namespace: String,
    /// Snapshotter to unpack into; must be the one containerd's CRI uses.
    pub snapshotter: String,
    /// Write blobs straight into containerd's content directory when it is visible
    /// from here, instead of streaming every byte through containerd's API.
    pub direct_content: bool,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            address: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "k8s.io".to_string(),
            snapshotter: "overlayfs".to_string(),
            direct_content: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// containers-registries.conf(5) file; a missing file means no policy.
    pub registries_conf: PathBuf,
    /// containers-registries.conf.d(5) drop-ins (`*.conf`, name order); may be missing.
    pub registries_conf_d: PathBuf,
    /// containers-policy.json(5) file; a missing file accepts every image.
    pub policy_json: PathBuf,
    /// containers-registries.d(5): where signatures are read from (lookaside URLs,
    /// `use-sigstore-attachments`); may be missing.
    pub registries_d: PathBuf,
    /// HTTP proxy URL for registry and token traffic; empty: `HTTPS_PROXY` /
    /// `HTTP_PROXY` / `NO_PROXY` from the environment.
    pub proxy: String,
    /// Hosts that bypass `proxy` (comma-separated hosts, `.domain`s, `host:port`, `*`).
    pub no_proxy: String,
    /// Extra CAs: files named `<host>` or `<host>..<port>` (OpenShift's
    /// additionalTrustedCA keys), or the certs.d layout; empty: none.
    pub ca_dir: PathBuf,
    /// containers-certs.d(5): `<host[:port]>/*.crt` CAs and `NAME.cert` + `NAME.key`
    /// client certificates; may be missing.
    pub certs_d: PathBuf,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            registries_conf: PathBuf::from("/etc/containers/registries.conf"),
            registries_conf_d: PathBuf::from("/etc/containers/registries.conf.d"),
            policy_json: PathBuf::from("/etc/containers/policy.json"),
            registries_d: PathBuf::from("/etc/containers/registries.d"),
            proxy: String::new(),
            no_proxy: String::new(),
            ca_dir: PathBuf::new(),
            certs_d: PathBuf::from("/etc/containers/certs.d"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PullConfig {
    /// `os/arch[/variant]` to select from multi-platform images; empty means this host.
    pub platform: String,
    /// Layers downloaded at once per pull.
    pub max_concurrent_downloads: usize,
    /// Pulls running at once on the node; more wait in arrival order (kubelet's
    /// `serializeImagePulls: false` sends them all at once). 0: no limit.
    pub max_concurrent_pulls: usize,
    /// Seconds a pull's lease protects unreferenced content if the daemon dies mid-pull.
    pub lease_expiry_seconds: u64,
    /// A registry that sends nothing for this long (`"90s"`, `"1m"`, `"500ms"`) fails
    /// the pull with DeadlineExceeded (a mirror hands over to the next source), like
    /// containerd's `image_pull_progress_timeout`. kubelet gives PullImage no deadline.
    pub progress_timeout: String,
    /// A blob arriving slower than this over a whole `progress_timeout` of waiting
    /// on the registry counts as stalled too (a trickle); time we spend writing
    /// and extracting what arrived does not count. 0 turns the check off.
    pub min_bytes_per_second: u64,
    /// Images kubelet's image GC must keep (`Image.pinned`): references, normalised
    /// (`busybox` is `docker.io/library/busybox:latest`), or globs over the full
    /// reference (`registry.k8s.io/pause:*`).
    pub pinned: Vec<String>,
    /// How layers are unpacked into containerd's snapshotter: `auto` (in-house for
    /// `overlayfs` and `native` when containerd's snapshot and content directories
    /// are visible from this process, each layer extracted while it downloads;
    /// containerd's `Diff.Apply` otherwise) or `containerd` (always `Diff.Apply`).
    pub unpack: UnpackSetting,
    /// Layers extracted at once per pull from the content store when unpacking
    /// in-house; 0: one per CPU. (Layers extracted from their downloads as they
    /// arrive go at their download's pace, bounded by `max_concurrent_downloads`.)
    pub max_concurrent_unpacks: usize,
    /// Images pulled at start-up, in the background, retried until they are in
    /// (backoff from 1 s to 5 min): the sandbox (pause) image, which containerd would
    /// otherwise pull itself, and whatever the node must have before pods land.
    /// Names as kubelet sends them; short names resolve through registries.conf.
    pub prepull: Vec<String>,
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            platform: String::new(),
            max_concurrent_downloads: 4,
            max_concurrent_pulls: 0,
            lease_expiry_seconds: 86400,
            progress_timeout: "1m".into(),
            min_bytes_per_second: 0,
            pinned: Vec::new(),
            prepull: Vec::new(),
            unpack: UnpackSetting::Auto,
            max_concurrent_unpacks: 0,
        }
    }
}

/// `[pull] unpack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnpackSetting {
    #[default]
    Auto,
    Containerd,
}

impl PullConfig {
    /// `max_concurrent_unpacks` with 0 resolved to the number of CPUs.
    pub fn unpack_concurrency(&self) -> usize {
        match self.max_concurrent_unpacks {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

impl PullConfig {
    /// `progress_timeout` as a duration (checked when the config loads).
    pub fn progress_timeout(&self) -> Result<std::time::Duration, String> {
        let d = parse_duration(&self.progress_timeout)?;
        if d < std::time::Duration::from_millis(100) {
            return Err(format!("{:?} is shorter than 100ms", self.progress_timeout));
        }
        Ok(d)
    }
}

/// A duration as containerd and Kubernetes write them: a sequence of numbers with
/// units `ms`, `s`, `m`, `h` (`"1m30s"`, `"500ms"`, `"2h"`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a duration such as \"90s\", \"1m\" or \"500ms\"");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = std::time::Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, millis) = if rest.starts_with("ms") {
            ("ms", 1)
        } else if rest.starts_with('s') {
            ("s", 1_000)
        } else if rest.starts_with('m') {
            ("m", 60_000)
        } else if rest.starts_with('h') {
            ("h", 3_600_000)
        } else {
            return Err(bad());
        };
        rest = &rest[unit.len()..];
        let millis = number.checked_mul(millis).ok_or_else(bad)?;
        total = total
            .checked_add(std::time::Duration::from_millis(millis))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialsConfig {
    /// kubelet's `--root-dir`; its `config.json` is the first node credentials file.
    pub kubelet_root_dir: PathBuf,
    /// How `auths` keys match images: `kubelet` or `span-labels`.
    pub matching: Matching,
    /// Extra docker config.json-format files (podman's auth.json too), merged.
    pub files: Vec<PathBuf>,
    /// Directories of mounted pull secrets (`.dockerconfigjson` / `.dockercfg`, in
    /// the directory itself or in each subdirectory).
    pub secret_dirs: Vec<PathBuf>,
    /// kubelet's `--image-credential-provider-config`; empty means no providers.
    pub provider_config: PathBuf,
    /// kubelet's `--image-credential-provider-bin-dir`.
    pub provider_bin_dir: PathBuf,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        CredentialsConfig {
            kubelet_root_dir: PathBuf::from("/var/lib/kubelet"),
            matching: Matching::Kubelet,
            files: Vec::new(),
            secret_dirs: Vec::new(),
            provider_config: PathBuf::new(),
            provider_bin_dir: PathBuf::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config file {path}: key `{key}`: {why}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        why: String,
    },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let invalid = |key, why: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            why,
        };
        config
            .platform()
            .map_err(|e| invalid("pull.platform", e.to_string()))?;
        if config.pull.max_concurrent_downloads == 0 {
            return Err(invalid(
                "pull.max_concurrent_downloads",
                "must be at least 1".into(),
            ));
        }
        config
            .pull
            .progress_timeout()
            .map_err(|why| invalid("pull.progress_timeout", why))?;
        for name in &config.pull.prepull {
            let qualified = crate::reference::Reference::parse(name);
            if qualified.is_err() && crate::reference::ShortName::of(name).is_none() {
                let why = qualified.err().map(|e| e.to_string()).unwrap_or_default();
                return Err(invalid("pull.prepull", why));
            }
        }
        if config.pull.lease_expiry_seconds < 60 {
            return Err(invalid(
                "pull.lease_expiry_seconds",
                "must be at least 60".into(),
            ));
        }
        if config.containerd.namespace.is_empty() {
            return Err(invalid("containerd.namespace", "must not be empty".into()));
        }
        if config.containerd.snapshotter.is_empty() {
            return Err(invalid(
                "containerd.snapshotter",
                "must not be empty".into(),
            ));
        }
        let credentials = &config.credentials;
        if !credentials.provider_config.as_os_str().is_empty()
            && credentials.provider_bin_dir.as_os_str().is_empty()
        {
            return Err(invalid(
                "credentials.provider_bin_dir",
                "must be set when credentials.provider_config is".into(),
            ));
        }
        if config.server.listen.as_os_str().is_empty() {
            return Err(invalid("server.listen", "must not be empty".into()));
        }
        if !config.metrics.listen.is_empty() {
            let port = config
                .metrics
                .listen
                .rsplit_once(':')
                .and_then(|(host, port)| {
                    (!host.is_empty())
                        .then(|| port.parse::<u16>().ok())
                        .flatten()
                });
            if port.is_none() {
                return Err(invalid(
                    "metrics.listen",
                    format!("{:?} is not a host:port", config.metrics.listen),
                ));
            }
        }
        if config.server.status_socket().as_ref() == Some(&config.server.listen) {
            return Err(invalid(
                "server.status_listen",
                "must not be the socket server.listen names".into(),
            ));
        }
        Ok(config)
    }

    /// The platform to pull for.
    pub fn platform(&self) -> Result<PlatformSpec, crate::platform::PlatformError> {
        if self.pull.platform.is_empty() {
            Ok(PlatformSpec::host())
        } else {
            self.pull.platform.parse()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_containerd_writes_them() {
        use std::time::Duration;
        for (text, millis) in [
            ("90s", 90_000),
            ("1m", 60_000),
            ("1m30s", 90_000),
            ("500ms", 500),
            ("2h", 7_200_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
        }
        for bad in ["", "10", "1x", "m", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/cri-imaged/config.toml"))
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(
            c.server.listen,
            PathBuf::from("/run/cri-imaged/cri-imaged.sock")
        );
        assert_eq!(c.containerd.namespace, "k8s.io");
        assert_eq!(c.containerd.snapshotter, "overlayfs");
        assert_eq!(
            c.credentials.kubelet_root_dir,
            PathBuf::from("/var/lib/kubelet")
        );
        assert_eq!(c.platform().unwrap(), PlatformSpec::host());
        assert_eq!(
            c.server.status_socket(),
            Some(PathBuf::from("/run/cri-imaged/cri-imaged.status.sock"))
        );
    }

    #[test]
    fn status_socket_beside_listen_absolute_or_off() {
        let c = parse("[server]\nlisten = \"/tmp/x/cri.sock\"\n").unwrap();
        assert_eq!(
            c.server.status_socket(),
            Some(PathBuf::from("/tmp/x/cri.status.sock"))
        );
        let c =
            parse("[server]\nlisten = \"/tmp/x/cri.sock\"\nstatus_listen = \"st.sock\"\n").unwrap();
        assert_eq!(
            c.server.status_socket(),
            Some(PathBuf::from("/tmp/x/st.sock"))
        );
        let c = parse("[server]\nstatus_listen = \"/run/s.sock\"\n").unwrap();
        assert_eq!(c.server.status_socket(), Some(PathBuf::from("/run/s.sock")));
        let c = parse("[server]\nstatus_listen = \"\"\n").unwrap();
        assert_eq!(c.server.status_socket(), None);
        let e = parse("[server]\nstatus_listen = \"cri-imaged.sock\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.status_listen"), "{e}");
    }

    #[test]
    fn example_config_parses_to_the_defaults() {
        let text = include_str!("../deploy/config.example.toml");
        let c = parse(text).unwrap();
        let d = Config::default();
        assert_eq!(c.server.listen, d.server.listen);
        assert_eq!(c.server.rewrite_authority, d.server.rewrite_authority);
        assert_eq!(c.server.status_listen, d.server.status_listen);
        assert_eq!(c.registry.registries_conf_d, d.registry.registries_conf_d);
        assert_eq!(c.registry.policy_json, d.registry.policy_json);
        assert_eq!(c.registry.proxy, d.registry.proxy);
        assert_eq!(c.registry.no_proxy, d.registry.no_proxy);
        assert_eq!(c.registry.certs_d, d.registry.certs_d);
        assert_eq!(c.pull.max_concurrent_pulls, d.pull.max_concurrent_pulls);
        assert_eq!(c.pull.progress_timeout, d.pull.progress_timeout);
        assert_eq!(c.pull.min_bytes_per_second, d.pull.min_bytes_per_second);
        assert_eq!(c.pull.pinned, d.pull.pinned);
        assert_eq!(c.pull.unpack, d.pull.unpack);
        assert_eq!(c.pull.max_concurrent_unpacks, d.pull.max_concurrent_unpacks);
        assert_eq!(c.log.level, d.log.level);
        assert_eq!(c.log.format, d.log.format);
        assert_eq!(c.metrics.listen, d.metrics.listen);
        assert_eq!(c.containerd.address, d.containerd.address);
        assert_eq!(c.containerd.direct_content, d.containerd.direct_content);
        assert_eq!(c.registry.registries_conf, d.registry.registries_conf);
        assert_eq!(c.registry.ca_dir, d.registry.ca_dir);
        assert_eq!(
            c.pull.max_concurrent_downloads,
            d.pull.max_concurrent_downloads
        );
        assert_eq!(c.pull.lease_expiry_seconds, d.pull.lease_expiry_seconds);
        assert_eq!(
            c.credentials.kubelet_root_dir,
            d.credentials.kubelet_root_dir
        );
        assert_eq!(c.credentials.matching, d.credentials.matching);
        assert_eq!(c.credentials.files, d.credentials.files);
        assert_eq!(c.credentials.secret_dirs, d.credentials.secret_dirs);
        assert_eq!(c.credentials.provider_config, d.credentials.provider_config);
        assert_eq!(
            c.credentials.provider_bin_dir,
            d.credentials.provider_bin_dir
        );
    }

    #[test]
    fn credentials_section_reads_every_key() {
        let c = parse(
            r#"
[credentials]
matching = "span-labels"
files = ["/root/.config/containers/auth.json"]
secret_dirs = ["/etc/pull-secrets"]
provider_config = "/etc/kubernetes/credential-providers.yaml"
provider_bin_dir = "/usr/libexec/kubernetes/credential-providers"
"#,
        )
        .unwrap();
        assert_eq!(c.credentials.matching, Matching::SpanLabels);
        assert_eq!(
            c.credentials.files,
            vec![PathBuf::from("/root/.config/containers/auth.json")]
        );
        assert_eq!(
            c.credentials.secret_dirs,
            vec![PathBuf::from("/etc/pull-secrets")]
        );
        let e = parse("[credentials]\nmatching = \"fuzzy\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("matching"), "{e}");
        let e = parse("[credentials]\nprovider_config = \"/x.yaml\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("credentials.provider_bin_dir"), "{e}");
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse("[server]\nlisten = 3\n").unwrap_err().to_string();
        assert!(e.contains("/etc/cri-imaged/config.toml"), "{e}");
        assert!(e.contains("listen"), "{e}");
        let e = parse("[pull]\nplatfrom = \"linux/amd64\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("platfrom"), "{e}");
        let e = parse("[pull]\nplatform = \"linux\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pull.platform"), "{e}");
        let e = parse("[pull]\nmax_concurrent_downloads = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pull.max_concurrent_downloads"), "{e}");
        for bad in ["9102", ":9102", "localhost:http", "127.0.0.1:70000"] {
            let e = parse(&format!("[metrics]\nlisten = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("metrics.listen"), "{bad}: {e}");
        }
        for good in ["127.0.0.1:9102", "[::]:9102", "node.local:9102"] {
            let c = parse(&format!("[metrics]\nlisten = \"{good}\"\n")).unwrap();
            assert_eq!(c.metrics.listen, good);
        }
    }
}
