//! `cri-imaged`: with no subcommand, serves the CRI ImageService; the subcommands
//! are a small crictl for images (Debian does not package crictl).

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use cri_imaged::config::{Config, LogFormat};
use cri_imaged::metrics::Metrics;
use cri_imaged::proto;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// sysexits' EX_CONFIG-adjacent EX_USAGE: bad configuration is fixed by the operator.
const EXIT_CONFIG: u8 = 64;
const DEFAULT_ENDPOINT: &str = "unix:///run/cri-imaged/cri-imaged.sock";

#[derive(Parser)]
#[command(version, about = "CRI ImageService that pulls images into containerd")]
struct Cli {
    /// Configuration file (TOML); every key has a default.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log filter (`info`, `debug`, `info,cri_imaged=debug`); overrides `[log] level`,
    /// and `RUST_LOG` overrides both.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format; overrides `[log] format`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Pull an image through a CRI ImageService.
    Pull {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// `username[:password]` for the registry.
        #[arg(long)]
        creds: Option<String>,
        /// docker's `auth` field: base64 of `username:password`.
        #[arg(long)]
        auth: Option<String>,
        /// OAuth2 refresh token (docker's `identitytoken`).
        #[arg(long)]
        identity_token: Option<String>,
        /// Bearer token sent as is (docker's `registrytoken`).
        #[arg(long)]
        registry_token: Option<String>,
        image: String,
    },
    /// List images.
    Images {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Only image IDs.
        #[arg(short, long)]
        quiet: bool,
        /// Only this image.
        image: Option<String>,
    },
    /// Show an image's status, with verbose info, as JSON.
    Inspecti {
        #[command(flatten)]
        endpoint: EndpointArg,
        image: String,
    },
    /// Remove images (every name of each).
    Rmi {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Show the image filesystem's usage as JSON.
    Imagefsinfo {
        #[command(flatten)]
        endpoint: EndpointArg,
    },
    /// Load and check every configured file (the config, registries.conf and its
    /// drop-ins, policy.json, credential files and provider config, the proxy) as the
    /// daemon would at start; exit 64 naming the first problem.
    CheckConfig,
    /// Print the version, the commit it was built from and the compiler.
    Version,
    /// Print, as JSON, what a pull of IMAGE would do, from the daemon's --config:
    /// the policy.json verdict and its scope, the sources in order (mirrors, then the
    /// origin unless blocked) and the credentials each would try (keys and where they
    /// come from, never secrets).
    Explain { image: String },
    /// Show the pulls in flight on this node (image, source, layers, bytes, rate,
    /// ETA), read from the daemon's status socket.
    Pulls {
        /// Keep showing them: redrawn in place with a progress bar per pull on a
        /// terminal, one plain line per pull and refresh otherwise. Ctrl-C stops.
        #[arg(short, long)]
        watch: bool,
        /// Time between refreshes with --watch (`500ms`, `2s`).
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: std::time::Duration,
        /// The daemon's status socket; default: `[server] status_listen` of --config
        /// (or of the default configuration).
        #[arg(long)]
        status_socket: Option<PathBuf>,
    },
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    cri_imaged::config::parse_duration(text).and_then(|d| {
        (d > std::time::Duration::ZERO)
            .then_some(d)
            .ok_or("must not be zero".into())
    })
}

#[derive(Args)]
struct EndpointArg {
    /// CRI image endpoint.
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    image_endpoint: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The `[log]` section, if the config loads; a broken config is reported later by
    // the command that needs it, with logging already set up.
    let log = cli
        .config
        .as_ref()
        .and_then(|p| Config::load(p).ok())
        .map(|c| c.log)
        .unwrap_or_default();
    init_logging(
        cli.log_level.as_deref().unwrap_or(&log.level),
        cli.log_format.unwrap_or(log.format),
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cri-imaged: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        None => runtime.block_on(serve(cli.config)),
        Some(Command::Explain { image }) => runtime.block_on(explain(cli.config, &image)),
        Some(Command::Pulls {
            watch,
            interval,
            status_socket,
        }) => runtime.block_on(pulls(cli.config, watch, interval, status_socket)),
        Some(Command::CheckConfig) => {
            // The containerd client is built (not connected) inside a runtime.
            let _runtime = runtime.enter();
            check_config(cli.config)
        }
        Some(Command::Version) => {
            println!(
                "cri-imaged {} (commit {}, {})",
                env!("CARGO_PKG_VERSION"),
                env!("CRI_IMAGED_COMMIT"),
                env!("CRI_IMAGED_RUSTC")
            );
            ExitCode::SUCCESS
        }
        Some(command) => match runtime.block_on(client(command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cri-imaged: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Logs to stderr: `RUST_LOG`, else `level`; text (colour on a terminal) or JSON.
fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|e| {
            eprintln!("cri-imaged: log level {level:?}: {e}; using info");
            tracing_subscriber::EnvFilter::new("info")
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// `check-config`: every file `serve` would read, checked (containerd is not contacted).
fn check_config(config_path: Option<PathBuf>) -> ExitCode {
    let config = match load_config(config_path.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cri_imaged::server::check_config(&config) {
        Ok(warnings) => {
            for warning in warnings {
                eprintln!("cri-imaged: warning: {warning}");
            }
            let shown = config_path.map_or("the defaults".into(), |p| p.display().to_string());
            println!("cri-imaged: configuration OK ({shown})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cri-imaged: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// The configuration at `path`, or the defaults; on error, the exit code.
fn load_config(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    match path {
        Some(path) => Config::load(path).map_err(|e| {
            eprintln!("cri-imaged: {e}");
            ExitCode::from(EXIT_CONFIG)
        }),
        None => Ok(Config::default()),
    }
}

async fn serve(config_path: Option<PathBuf>) -> ExitCode {
    let config = match load_config(config_path.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let metrics = Arc::new(Metrics::new());
    let service = match cri_imaged::server::build_service(&config, metrics.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cri-imaged: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The status and metrics endpoints first: once the CRI socket exists, a
    // client (or a test) may expect them.
    let status = match config.server.status_socket() {
        Some(path) => match cri_imaged::server::bind(&path).await {
            Ok(listener) => {
                tracing::info!(socket = %path.display(), "serving pull progress (GET /pulls)");
                let progress = service.progress();
                let task = tokio::spawn(cri_imaged::server::status::serve(listener, progress));
                Some((path, task))
            }
            // The CRI matters more than its progress view: serve without it.
            Err(e) => {
                tracing::warn!(error = %e, "no status socket ([server] status_listen); `cri-imaged pulls` will not work");
                None
            }
        },
        None => None,
    };
    if !config.metrics.listen.is_empty() {
        match cri_imaged::metrics::http::bind(&config.metrics.listen).await {
            Ok(listener) => {
                tracing::info!(address = %config.metrics.listen, "serving Prometheus metrics at /metrics");
                tokio::spawn(cri_imaged::metrics::http::serve(listener, metrics));
            }
            Err(e) => {
                eprintln!("cri-imaged: {e}");
                if let Some((path, _)) = &status {
                    let _ = std::fs::remove_file(path);
                }
                return ExitCode::FAILURE;
            }
        }
    }
    let listener = match cri_imaged::server::bind(&config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cri-imaged: {e}");
            if let Some((path, _)) = &status {
                let _ = std::fs::remove_file(path);
            }
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        socket = %config.server.listen.display(),
        containerd = %config.containerd.address.display(),
        namespace = %config.containerd.namespace,
        snapshotter = %config.containerd.snapshotter,
        "serving runtime.v1.ImageService"
    );
    let mut background = cri_imaged::prepull::spawn(service.puller(), &config.pull.prepull);
    background.push(service.fs_usage().spawn_refresher());
    let edge = if config.server.rewrite_authority {
        cri_imaged::server::Edge::RewriteAuthority
    } else {
        cri_imaged::server::Edge::Direct
    };
    let result = cri_imaged::server::run(listener, service, edge, shutdown_signal()).await;
    background.iter().for_each(tokio::task::JoinHandle::abort);
    let _ = std::fs::remove_file(&config.server.listen);
    if let Some((path, task)) = status {
        task.abort();
        let _ = std::fs::remove_file(path);
    }
    match result {
        Ok(()) => {
            tracing::info!("shut down");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cri-imaged: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `explain`: the candidates for each host the image would be pulled from, in trial
/// order (anonymous, always last, is left out).
async fn explain(config_path: Option<PathBuf>, image: &str) -> ExitCode {
    let config = match load_config(config_path.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let out = match cri_imaged::explain::explain(&config, image).await {
        Ok(out) => out,
        Err(e @ cri_imaged::explain::ExplainError::Name(_)) => {
            eprintln!("cri-imaged: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("cri-imaged: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match serde_json::to_string_pretty(&out) {
        Ok(text) => {
            use std::io::Write as _;
            // A closed pipe is not worth a failure.
            let _ = writeln!(std::io::stdout(), "{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cri-imaged: printing JSON: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pulls`: the status socket from `--status-socket`, else from the configuration.
async fn pulls(
    config_path: Option<PathBuf>,
    watch: bool,
    interval: std::time::Duration,
    status_socket: Option<PathBuf>,
) -> ExitCode {
    let socket = match status_socket {
        Some(path) => path,
        None => {
            let config = match load_config(config_path.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match config.server.status_socket() {
                Some(path) => path,
                None => {
                    let shown =
                        config_path.map_or("the defaults".into(), |p| p.display().to_string());
                    eprintln!("cri-imaged: the status socket is off (`[server] status_listen = \"\"` in {shown}); pass --status-socket");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    if watch {
        cri_imaged::progress::watch::watch(&socket, interval).await;
        return ExitCode::SUCCESS;
    }
    match cri_imaged::progress::watch::once(&socket).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cri-imaged: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Prints a line to stdout; a closed pipe (`| head`) ends the command quietly
/// instead of panicking as `println!` does.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            return Ok(());
        }
    }};
}

fn spec(image: &str) -> Option<proto::ImageSpec> {
    Some(proto::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn client(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Pull {
            endpoint,
            creds,
            auth,
            identity_token,
            registry_token,
            image,
        } => {
            let mut client = cri_imaged::client::connect(&endpoint.image_endpoint).await?;
            let (username, password) = match creds
                .as_deref()
                .map(|c| c.split_once(':').unwrap_or((c, "")))
            {
                Some((u, p)) => (u.to_string(), p.to_string()),
                None => Default::default(),
            };
            let request = proto::PullImageRequest {
                image: spec(&image),
                auth: Some(proto::AuthConfig {
                    username,
                    password,
                    auth: auth.unwrap_or_default(),
                    identity_token: identity_token.unwrap_or_default(),
                    registry_token: registry_token.unwrap_or_default(),
                    ..Default::default()
                }),
                sandbox_config: None,
            };
            let response = client
                .pull_image(request)
                .await
                .map_err(status_error)?
                .into_inner();
            out!("Image is up to date for {}", response.image_ref);
        }
        Command::Images {
            endpoint,
            quiet,
            image,
        } => {
            let mut client = cri_imaged::client::connect(&endpoint.image_endpoint).await?;
            let filter = image.map(|i| proto::ImageFilter { image: spec(&i) });
            let images = client
                .list_images(proto::ListImagesRequest { filter })
                .await
                .map_err(status_error)?
                .into_inner()
                .images;
            if !quiet {
                out!(
                    "{:<50} {:<20} {:<15} {:>10}",
                    "IMAGE",
                    "TAG",
                    "IMAGE ID",
                    "SIZE"
                );
            }
            for image in images {
                let short_id = image
                    .id
                    .trim_start_matches("sha256:")
                    .chars()
                    .take(13)
                    .collect::<String>();
                if quiet {
                    out!("{}", image.id);
                    continue;
                }
                let size = format!("{:.1}MB", image.size as f64 / 1e6);
                if image.repo_tags.is_empty() {
                    out!(
                        "{:<50} {:<20} {:<15} {:>10}",
                        "<none>",
                        "<none>",
                        short_id,
                        size
                    );
                }
                for tag in &image.repo_tags {
                    let (repo, t) = tag.rsplit_once(':').unwrap_or((tag, "<none>"));
                    out!("{repo:<50} {t:<20} {short_id:<15} {size:>10}");
                }
            }
        }
        Command::Inspecti { endpoint, image } => {
            let mut client = cri_imaged::client::connect(&endpoint.image_endpoint).await?;
            let response = client
                .image_status(proto::ImageStatusRequest {
                    image: spec(&image),
                    verbose: true,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let Some(status) = response.image else {
                anyhow::bail!("no such image {image:?}");
            };
            let info: serde_json::Map<String, serde_json::Value> = response
                .info
                .into_iter()
                .map(|(k, v)| {
                    let v = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
                    (k, v)
                })
                .collect();
            let out = serde_json::json!({
                "status": {
                    "id": status.id,
                    "repoTags": status.repo_tags,
                    "repoDigests": status.repo_digests,
                    "size": status.size.to_string(),
                    "uid": status.uid.map(|u| serde_json::json!({"value": u.value.to_string()})),
                    "username": status.username,
                    "pinned": status.pinned,
                },
                "info": info,
            });
            out!(
                "{}",
                serde_json::to_string_pretty(&out).context("printing JSON")?
            );
        }
        Command::Rmi { endpoint, images } => {
            let mut client = cri_imaged::client::connect(&endpoint.image_endpoint).await?;
            for image in images {
                client
                    .remove_image(proto::RemoveImageRequest {
                        image: spec(&image),
                    })
                    .await
                    .map_err(status_error)?;
                out!("Deleted: {image}");
            }
        }
        // Dispatched in `main`: it reads the config and talks to no daemon.
        Command::Explain { .. }
        | Command::CheckConfig
        | Command::Version
        | Command::Pulls { .. } => {
            anyhow::bail!("not a client command")
        }
        Command::Imagefsinfo { endpoint } => {
            let mut client = cri_imaged::client::connect(&endpoint.image_endpoint).await?;
            let response = client
                .image_fs_info(proto::ImageFsInfoRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let fs = |list: &[proto::FilesystemUsage]| -> Vec<serde_json::Value> {
                list.iter()
                    .map(|f| {
                        serde_json::json!({
                            "timestamp": f.timestamp.to_string(),
                            "fsId": {"mountpoint": f.fs_id.as_ref().map(|i| i.mountpoint.clone()).unwrap_or_default()},
                            "usedBytes": {"value": f.used_bytes.as_ref().map(|v| v.value).unwrap_or_default().to_string()},
                            "inodesUsed": {"value": f.inodes_used.as_ref().map(|v| v.value).unwrap_or_default().to_string()},
                        })
                    })
                    .collect()
            };
            let out = serde_json::json!({
                "status": {
                    "imageFilesystems": fs(&response.image_filesystems),
                    "containerFilesystems": fs(&response.container_filesystems),
                }
            });
            out!(
                "{}",
                serde_json::to_string_pretty(&out).context("printing JSON")?
            );
        }
    }
    Ok(())
}
