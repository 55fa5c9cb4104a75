//! The daemon: wires config into the modules, binds the unix socket and serves the
//! CRI ImageService and gRPC health until shutdown.
//!
//! - [`h2_edge`]: each accepted connection's client → server bytes, re-framed so
//!   that hyper accepts the `:authority` every gRPC client sends on a unix socket.
//! - [`header_block`]: the HPACK rewrite of one header block.
//! - [`status`]: the status socket, answering the pulls in flight as JSON.

pub mod h2_edge;
pub mod header_block;
pub mod status;

use crate::auth::files::FileSettings;
use crate::auth::provider::{ProviderError, Providers};
use crate::auth::{Keyring, KeyringSettings, ProviderSource};
use crate::catalog::Catalog;
use crate::config::{Config, UnpackSetting};
use crate::cri::ImageServiceImpl;
use crate::image_index::{ImageIndex, IndexedStore};
use crate::metrics::store::MeteredStore;
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyError};
use crate::proto::image_service_server::ImageServiceServer;
use crate::puller::{PullSettings, Puller};
use crate::registry::proxy::ProxyError;
use crate::registry::{ClientSettings, ProxySettings, RegistryClient, RegistryError};
use crate::reload::Reloading;
use crate::store::{ContainerdStore, ImageStore, StoreError, UnpackMode};
use crate::trust_policy::{TrustPolicy, TrustPolicyError};
use h2_edge::H2Edge;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::Connected;

/// kubelet's gRPC client accepts messages up to 16 MiB; so do we.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// SETTINGS_MAX_HEADER_LIST_SIZE we advertise (hyper's default, written out because
/// [`H2_EDGE_MAX_HEADER_LIST`] must stay above it).
const MAX_HEADER_LIST: u32 = 16 << 10;

/// What one header block may decode to inside [`H2Edge`] before it stops copying:
/// four times hyper's limit, so that hyper, not the edge, refuses large lists.
const H2_EDGE_MAX_HEADER_LIST: usize = 4 * MAX_HEADER_LIST as usize;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another process is already serving on {0}")]
    InUse(PathBuf),
    #[error("cannot bind unix socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config key `pull.progress_timeout`: {0}")]
    ProgressTimeout(String),
    #[error("config key `pull.platform`: {0}")]
    Platform(#[from] crate::platform::PlatformError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    TrustPolicy(#[from] TrustPolicyError),
    #[error("config key `registry.proxy` (or HTTPS_PROXY): {0}")]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    CredentialFile(#[from] crate::auth::files::CheckError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Builds the ImageService from configuration. containerd need not be up yet:
/// calls made while it is down fail with `Unavailable` and the daemon keeps serving.
/// Everything it does is counted in `metrics`.
pub fn build_service(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<ImageServiceImpl, ServerError> {
    let address = config.containerd.address.to_string_lossy().into_owned();
    let containerd: Arc<dyn ImageStore> = Arc::new(
        ContainerdStore::connect(&address, &config.containerd.namespace)?
            .with_direct_content(config.containerd.direct_content)
            .with_unpack(match config.pull.unpack {
                UnpackSetting::Auto => UnpackMode::Auto,
                UnpackSetting::Containerd => UnpackMode::Containerd,
            }),
    );
    let store: Arc<dyn ImageStore> = Arc::new(MeteredStore::new(containerd, metrics.clone()));
    // Our own record writes reach the index as soon as containerd accepted them.
    let index = ImageIndex::new(store.clone());
    let store: Arc<dyn ImageStore> = Arc::new(IndexedStore::new(store, index.clone()));
    let keyring = keyring(config)?;
    keyring.preload();
    let proxy = if config.registry.proxy.is_empty() {
        ProxySettings::from_env()?
    } else {
        ProxySettings::new(&config.registry.proxy, &config.registry.no_proxy)?
    };
    if let Some(proxy) = &proxy {
        tracing::info!(?proxy, "registry traffic goes through a proxy");
    }
    let progress_timeout = config
        .pull
        .progress_timeout()
        .map_err(ServerError::ProgressTimeout)?;
    let registry = RegistryClient::new(ClientSettings {
        idle_timeout: progress_timeout,
        min_bytes_per_second: config.pull.min_bytes_per_second,
        ca_dir: Some(config.registry.ca_dir.clone()),
        certs_d: Some(config.registry.certs_d.clone()),
        realm_credentials: Some(Arc::new(keyring.clone())),
        proxy: proxy.map(Arc::new),
        metrics: metrics.clone(),
        ..ClientSettings::default()
    })?;
    let policy = registries_policy(config)?;
    let platform = config.platform()?;
    let settings = PullSettings {
        snapshotter: config.containerd.snapshotter.clone(),
        platform: platform.clone(),
        max_concurrent_downloads: config.pull.max_concurrent_downloads,
        max_concurrent_unpacks: config.pull.unpack_concurrency(),
        max_concurrent_pulls: config.pull.max_concurrent_pulls,
        pinned: config.pull.pinned.clone(),
        lease_expiry: Duration::from_secs(config.pull.lease_expiry_seconds),
        metrics,
    };
    let trust = trust_policy(config)?;
    let puller = Puller::new(store.clone(), registry, policy, trust, keyring, settings);
    let catalog = Arc::new(Catalog::new(store, index, platform));
    Ok(ImageServiceImpl::new(
        puller,
        catalog,
        config.containerd.snapshotter.clone(),
    ))
}

/// policy.json and registries.d, reloaded when any of them changes.
fn trust_policy(config: &Config) -> Result<Reloading<TrustPolicy>, ServerError> {
    let (policy_json, dir) = (
        config.registry.policy_json.clone(),
        config.registry.registries_d.clone(),
    );
    let (watched_json, watched_dir) = (policy_json.clone(), dir.clone());
    let watched = move || {
        let mut paths = vec![watched_json.clone(), watched_dir.clone()];
        paths.extend(files_in(&watched_dir));
        paths
    };
    Ok(Reloading::new("policy.json", watched, move || {
        TrustPolicy::load_with(&policy_json, &dir)
    })?)
}

/// The entries of `dir`, in name order; none when it cannot be read.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// registries.conf and its drop-ins, reloaded when any of them changes.
fn registries_policy(config: &Config) -> Result<Reloading<Policy>, ServerError> {
    let (conf, dir) = (
        config.registry.registries_conf.clone(),
        config.registry.registries_conf_d.clone(),
    );
    let (watched_conf, watched_dir) = (conf.clone(), dir.clone());
    let watched = move || {
        let mut paths = vec![watched_conf.clone(), watched_dir.clone()];
        paths.extend(files_in(&watched_dir));
        paths
    };
    Ok(Reloading::new("registries.conf", watched, move || {
        Policy::load(&conf, Some(&dir))
    })?)
}

/// The keyring `[credentials]` describes, for this process: kubelet's `{cwd}` and
/// `$HOME` search paths are the daemon's own.
pub fn keyring(config: &Config) -> Result<Keyring, ServerError> {
    let c = &config.credentials;
    let settings = KeyringSettings {
        matching: c.matching,
        files: credential_files(config),
    };
    let providers: Option<Arc<dyn ProviderSource>> = if c.provider_config.as_os_str().is_empty() {
        None
    } else {
        Some(Arc::new(Providers::load(
            &c.provider_config,
            &c.provider_bin_dir,
        )?))
    };
    Ok(Keyring::new(settings, providers))
}

/// Where `[credentials]` says to look for credential files, for this process.
fn credential_files(config: &Config) -> FileSettings {
    let c = &config.credentials;
    FileSettings {
        kubelet_root_dir: c.kubelet_root_dir.clone(),
        cwd: std::env::current_dir().ok(),
        home: std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from),
        files: c.files.clone(),
        secret_dirs: c.secret_dirs.clone(),
    }
}

/// `check-config`: builds the service as `serve` would (containerd is not
/// contacted), then reads every credential file strictly, since the daemon only
/// logs a broken one. Returns the entries the daemon would skip, as warnings.
pub fn check_config(config: &Config) -> Result<Vec<String>, ServerError> {
    build_service(config, Arc::default())?;
    Ok(credential_files(config).check()?.warnings)
}

/// Binds `path`: creates its directory, replaces a stale socket (refusing one that a
/// live process still answers on), and restricts it to owner and group (0660).
pub async fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::SocketDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse(path.to_path_buf()));
        }
        // Only a stale socket is ours to replace; any other file is someone's.
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(ServerError::Bind {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ),
            });
        }
        tracing::info!(socket = %path.display(), "replacing stale socket");
        std::fs::remove_file(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let bind_err = |source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    Ok(listener)
}

/// How accepted connections reach the gRPC server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// Through [`H2Edge`], which makes every client's `:authority` acceptable.
    RewriteAuthority,
    /// Straight to hyper (only to measure what the rewrite costs).
    Direct,
}

/// Serves the ImageService and `grpc.health.v1.Health` on `listener` until `shutdown`.
pub async fn run(
    listener: UnixListener,
    service: ImageServiceImpl,
    edge: Edge,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let incoming = UnixListenerStream::new(listener);
    match edge {
        Edge::RewriteAuthority => {
            let incoming =
                incoming.map(|conn| conn.map(|c| H2Edge::new(c, H2_EDGE_MAX_HEADER_LIST)));
            serve(incoming, service, shutdown).await
        }
        Edge::Direct => serve(incoming, service, shutdown).await,
    }
}

async fn serve<IO>(
    incoming: impl Stream<Item = std::io::Result<IO>>,
    service: ImageServiceImpl,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ImageServiceServer<ImageServiceImpl>>()
        .await;
    let images = ImageServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        // H2Edge writes frames up to the protocol's default size and bounds header
        // lists above this limit; both numbers are pinned here so they cannot drift.
        .max_frame_size(h2_edge::MAX_FRAME_SIZE as u32)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .add_service(health_service)
        .add_service(images)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
