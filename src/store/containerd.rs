//! `ImageStore` over containerd's gRPC API (content, snapshots, diff, images, leases,
//! introspection), reached through its unix socket.
//!
//! Every request carries the `containerd-namespace` header; requests made on behalf
//! of a pull also carry `containerd-lease`, so whatever they create stays alive until
//! the lease is deleted or expires.
//!
//! - `content`: blob info, labels, resumable ingests, small reads.
//! - `direct`: blobs written straight into containerd's content directory.
//! - `snapshots`: unpacking layers with `Diff.Apply` and the snapshotter's disk usage.
//! - `unpack`: unpacking layers in-house into overlayfs/native snapshots.
//! - `images`: image records.
//! - `events`: the image records' changes, from containerd's event stream.

mod content;
mod direct;
mod events;
mod images;
mod snapshots;
mod unpack;

use direct::DirectContent;
use unpack::LocalUnpack;
pub use unpack::UnpackMode;

/// In-house unpacking found usable for one snapshotter (its name), if any.
type FoundUnpack = Option<(String, Arc<LocalUnpack>)>;

/// Removes a staging tree left by an unused [`crate::store::StagedLayer`].
pub(crate) fn remove_staged_tree(dir: &std::path::Path) {
    unpack::remove_tree(dir)
}

use super::{
    ContentInfo, FsUsage, ImageEvents, ImageRecord, ImageStore, Ingest, Labels, LayerBytes, Lease,
    StagedLayer, StoreError, LABEL_GC_EXPIRE,
};
use crate::digest::Digest;
use crate::oci::Descriptor;
use async_trait::async_trait;
use bytes::Bytes;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{
    AddResourceRequest, CreateRequest, DeleteRequest, ListRequest, Resource,
};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

const NAMESPACE_HEADER: &str = "containerd-namespace";
const LEASE_HEADER: &str = "containerd-lease";
/// Bound on establishing the unix connection; containerd answers locally or not at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The containerd-backed store. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct ContainerdStore {
    channel: Channel,
    address: Arc<str>,
    namespace: AsciiMetadataValue,
    direct_content: bool,
    /// containerd's content directory, once containerd has told us where it is.
    direct: Arc<tokio::sync::OnceCell<Option<Arc<DirectContent>>>>,
    /// Set once the leases of dead processes were let go (before our first lease).
    stale_leases_cleared: Arc<tokio::sync::OnceCell<()>>,
    unpack_mode: UnpackMode,
    /// In-house unpacking for the (one) snapshotter asked, once looked into.
    local_unpack: Arc<tokio::sync::OnceCell<FoundUnpack>>,
}

impl std::fmt::Debug for ContainerdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerdStore")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl ContainerdStore {
    /// Prepares a connection to containerd's socket at `address` for `namespace`.
    /// The socket is dialled on first use (and again after containerd restarts), so
    /// the daemon may start before containerd; an unreachable socket surfaces as
    /// `StoreError::Unavailable` from the first call. Must be called inside a tokio
    /// runtime (the connection's worker task is spawned here).
    pub fn connect(address: &str, namespace: &str) -> Result<Self, StoreError> {
        let namespace_value = ascii_header_value("containerd namespace", namespace)?;
        let path = std::path::PathBuf::from(address);
        // The URI is ignored: the connector below dials the unix socket instead.
        let channel = Endpoint::from_static("http://containerd.invalid")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }));
        Ok(ContainerdStore {
            channel,
            address: Arc::from(address),
            namespace: namespace_value,
            direct_content: true,
            direct: Arc::new(tokio::sync::OnceCell::new()),
            stale_leases_cleared: Arc::new(tokio::sync::OnceCell::new()),
            unpack_mode: UnpackMode::Auto,
            local_unpack: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    /// How layers are unpacked (`[pull] unpack`; default: in-house when possible).
    pub fn with_unpack(mut self, mode: UnpackMode) -> Self {
        self.unpack_mode = mode;
        self
    }

    /// Whether blobs may be written straight into containerd's content directory
    /// when it is visible from here (default: yes); otherwise every byte is
    /// streamed through `Content.Write`.
    pub fn with_direct_content(mut self, enabled: bool) -> Self {
        self.direct_content = enabled;
        self
    }

    /// Adds a resource (`content` by digest, `snapshots/<snapshotter>` by key) to a
    /// lease, as containerd does itself for content a lease-bearing write finds present.
    async fn add_to_lease(&self, lease: &Lease, id: &str, kind: &str) -> Result<(), StoreError> {
        let request = self.request(
            AddResourceRequest {
                id: lease.id.clone(),
                resource: Some(Resource {
                    id: id.to_string(),
                    r#type: kind.to_string(),
                }),
            },
            None,
        )?;
        self.leases()
            .add_resource(request)
            .await
            .map_err(|status| {
                self.status_error("Leases.AddResource", status, || {
                    format!("lease {}", lease.id)
                })
            })?;
        Ok(())
    }

    /// Deletes the pull leases of cri-imaged processes that died (`kill -9`, a crash,
    /// a reboot) instead of waiting for them to expire, so the content they held is
    /// collectable at once. Blobs they had half-downloaded are staged outside
    /// containerd and resumed by the next pull. Failures are logged: the leases
    /// expire by themselves.
    async fn clear_stale_leases(&self) {
        let request = match self.request(
            ListRequest {
                filters: Vec::new(),
            },
            None,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list leases to clear stale ones");
                return;
            }
        };
        let leases = match self.leases().list(request).await {
            Ok(r) => r.into_inner().leases,
            Err(status) => {
                tracing::warn!(error = %status.message(), "cannot list leases to clear stale ones; they expire by themselves");
                return;
            }
        };
        for lease in leases {
            let Some(owner) = lease.labels.get(LABEL_LEASE_OWNER) else {
                continue;
            };
            if !lease.id.starts_with("cri-imaged-") || !owner_is_gone(owner) {
                continue;
            }
            match self
                .delete_lease(
                    &Lease {
                        id: lease.id.clone(),
                    },
                    false,
                )
                .await
            {
                Ok(()) => {
                    tracing::info!(lease = %lease.id, owner = %owner, "deleted the lease of a cri-imaged that is gone")
                }
                Err(e) => {
                    tracing::warn!(lease = %lease.id, error = %e, "cannot delete a stale lease; it expires by itself")
                }
            }
        }
    }

    /// Holds content found already present with the pull's lease.
    pub(super) async fn lease_content(
        &self,
        lease: &Lease,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        self.add_to_lease(lease, &digest.to_string(), "content")
            .await
    }

    /// The content directory for direct writes, found on first use. Not cached
    /// while containerd cannot be asked.
    async fn direct(&self) -> Result<Option<Arc<DirectContent>>, StoreError> {
        if !self.direct_content {
            return Ok(None);
        }
        let found = self
            .direct
            .get_or_try_init(|| async {
                Ok::<_, StoreError>(DirectContent::discover(self).await?.map(Arc::new))
            })
            .await?;
        Ok(found.clone())
    }

    /// The socket path this store talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Wraps `message` with the namespace header and, if given, the lease header.
    fn request<T>(&self, message: T, lease: Option<&Lease>) -> Result<Request<T>, StoreError> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(NAMESPACE_HEADER, self.namespace.clone());
        if let Some(lease) = lease {
            metadata.insert(LEASE_HEADER, ascii_header_value("lease id", &lease.id)?);
        }
        Ok(request)
    }

    /// Maps a failed call to a `StoreError`: the one place that decides which
    /// gRPC codes mean "containerd is down" and which mean "no such object".
    fn status_error(
        &self,
        op: &'static str,
        status: Status,
        what: impl FnOnce() -> String,
    ) -> StoreError {
        match status.code() {
            // tonic reports a socket it cannot dial (missing, refused) as Unavailable too.
            Code::Unavailable => StoreError::Unavailable {
                address: self.address.to_string(),
                detail: unavailable_detail(&status),
            },
            // A status carrying a source was made by our own transport, not sent by
            // containerd: the connection broke mid-call (containerd restarting).
            Code::Unknown | Code::Internal | Code::Cancelled
                if std::error::Error::source(&status).is_some() =>
            {
                StoreError::Unavailable {
                    address: self.address.to_string(),
                    detail: format!(
                        "the connection broke during {op}: {}",
                        deepest_cause(&status)
                    ),
                }
            }
            Code::NotFound => StoreError::NotFound { what: what() },
            _ => StoreError::Grpc { op, status },
        }
    }

    fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
}

fn ascii_header_value(what: &'static str, value: &str) -> Result<AsciiMetadataValue, StoreError> {
    value
        .parse()
        .map_err(|_invalid: tonic::metadata::errors::InvalidMetadataValue| {
            // The parse error carries no detail beyond "invalid", which `reason` states.
            StoreError::InvalidArgument {
                what,
                value: value.to_string(),
                reason: "must be visible ASCII to travel in a gRPC header",
            }
        })
}

/// A name no other call of this process (or, by the clock, of another) produces.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Who holds a lease: this boot and process (`<boot id>/<pid>`).
const LABEL_LEASE_OWNER: &str = "cri-imaged/owner";

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn lease_owner() -> String {
    format!("{}/{}", boot_id(), std::process::id())
}

/// Whether the process named by an owner label is gone: another boot, or no such
/// process. A process we cannot see (another PID namespace) counts as alive.
fn owner_is_gone(owner: &str) -> bool {
    let Some((boot, pid)) = owner.rsplit_once('/') else {
        return false;
    };
    if boot != boot_id() {
        return true;
    }
    match pid.parse::<u32>() {
        Ok(pid) if pid == std::process::id() => false,
        Ok(pid) => {
            // Alive only if that PID is a cri-imaged: a recycled PID is not ours.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            !comm.trim().starts_with("cri-imaged")
        }
        Err(_) => false,
    }
}

fn to_proto_labels(labels: &Labels) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn from_proto_labels(labels: HashMap<String, String>) -> Labels {
    labels.into_iter().collect()
}

#[async_trait]
impl ImageStore for ContainerdStore {
    async fn create_lease(&self, expire: Duration) -> Result<Lease, StoreError> {
        self.stale_leases_cleared
            .get_or_init(|| self.clear_stale_leases())
            .await;
        let id = format!("cri-imaged-{}", unique_suffix());
        let expires_at = crate::timestamp::system(SystemTime::now() + expire);
        let labels = HashMap::from([
            (LABEL_GC_EXPIRE.to_string(), expires_at),
            (LABEL_LEASE_OWNER.to_string(), lease_owner()),
        ]);
        let request = self.request(CreateRequest { id, labels }, None)?;
        let response = self
            .leases()
            .create(request)
            .await
            .map_err(|status| self.status_error("Leases.Create", status, || "lease".into()))?;
        let lease = response.into_inner().lease.ok_or(StoreError::Malformed {
            what: "Leases.Create response",
            detail: "no lease".into(),
        })?;
        tracing::debug!(lease = %lease.id, "created lease");
        Ok(Lease { id: lease.id })
    }

    async fn delete_lease(&self, lease: &Lease, sync: bool) -> Result<(), StoreError> {
        let request = self.request(
            DeleteRequest {
                id: lease.id.clone(),
                sync,
            },
            None,
        )?;
        match self.leases().delete(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => {
                Err(self.status_error("Leases.Delete", status, || format!("lease {}", lease.id)))
            }
        }
    }

    async fn content_info(&self, digest: &Digest) -> Result<Option<ContentInfo>, StoreError> {
        self.info(digest).await
    }

    async fn abort_ingest(&self, reference: &str) -> Result<(), StoreError> {
        if let Some(Some(direct)) = self.direct.get() {
            direct.discard(reference).await;
        }
        // Failures are logged there: an ingest left behind is resumed or expires with
        // the lease, so it must not turn a pull's real error into another one.
        self.abort_quietly(reference).await;
        Ok(())
    }

    async fn update_labels(&self, digest: &Digest, labels: Labels) -> Result<(), StoreError> {
        self.set_labels(digest, labels).await
    }

    async fn open_writer(
        &self,
        lease: &Lease,
        reference: &str,
        expected: &Descriptor,
    ) -> Result<Ingest, StoreError> {
        match self.direct().await? {
            Some(direct) => direct.open(self, lease, reference, expected).await,
            None => self.open_ingest(lease, reference, expected).await,
        }
    }

    async fn read_content(&self, digest: &Digest, max: u64) -> Result<Bytes, StoreError> {
        self.read(digest, max).await
    }

    async fn snapshot_exists(
        &self,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<bool, StoreError> {
        self.committed_snapshot_exists(snapshotter, chain_id).await
    }

    async fn lease_snapshot(
        &self,
        lease: &Lease,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        self.add_to_lease(
            lease,
            &chain_id.to_string(),
            &format!("snapshots/{snapshotter}"),
        )
        .await
    }

    async fn apply_layer(
        &self,
        lease: &Lease,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<Digest, StoreError> {
        match self.local_unpack(snapshotter).await? {
            Some(local) => {
                self.unpack_in_house(&local, lease, snapshotter, layer, diff_id, parent, chain_id)
                    .await?;
                Ok(diff_id.clone())
            }
            None => {
                self.unpack_layer(lease, snapshotter, layer, diff_id, parent, chain_id)
                    .await
            }
        }
    }

    async fn stage_layer(
        &self,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        first: bool,
        bytes: LayerBytes,
    ) -> Result<Option<StagedLayer>, StoreError> {
        match self.local_unpack(snapshotter).await? {
            Some(local) if local.stages() => {
                Ok(Some(local.stage(layer, diff_id, first, bytes).await?))
            }
            _ => Ok(None),
        }
    }

    async fn commit_staged(
        &self,
        lease: &Lease,
        snapshotter: &str,
        staged: StagedLayer,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        match self.local_unpack(snapshotter).await? {
            Some(local) => {
                self.commit_staged_layer(&local, lease, snapshotter, staged, parent, chain_id)
                    .await
            }
            None => Err(StoreError::Local {
                detail: format!(
                    "cannot commit the staged layer {}: in-house unpacking is off",
                    staged.layer
                ),
            }),
        }
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.images_list().await
    }

    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.images_get(name).await
    }

    async fn put_image(&self, record: ImageRecord) -> Result<(), StoreError> {
        self.images_put(record).await
    }

    async fn delete_image(&self, name: &str, sync: bool) -> Result<(), StoreError> {
        self.images_delete(name, sync).await
    }

    async fn image_events(&self) -> Result<ImageEvents, StoreError> {
        self.image_event_stream().await
    }

    async fn filesystem_usage(&self, snapshotter: &str) -> Result<FsUsage, StoreError> {
        self.snapshotter_usage(snapshotter).await
    }
}

/// What an operator needs from an Unavailable status: for a socket that cannot be
/// dialled, the innermost cause ("No such file or directory (os error 2)") rather
/// than tonic's debug dump of the transport error.
fn unavailable_detail(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(_) => format!("cannot connect: {}", deepest_cause(status)),
        None => status.message().to_string(),
    }
}

/// The innermost error under a status made by our transport (its own message
/// is a debug dump of the chain).
fn deepest_cause(status: &tonic::Status) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut deepest = None;
    while let Some(e) = cause {
        deepest = Some(e);
        cause = e.source();
    }
    deepest.map_or_else(|| status.message().to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_a_namespace_that_cannot_be_a_header() {
        let err = ContainerdStore::connect("/nonexistent.sock", "k8s\nio").unwrap_err();
        assert!(matches!(err, StoreError::InvalidArgument { .. }), "{err}");
    }

    #[test]
    fn lease_owners_of_other_boots_and_dead_processes_are_gone() {
        assert!(!owner_is_gone(&lease_owner()));
        assert!(owner_is_gone("another-boot/1"));
        // PID 1 is alive, but it is not a cri-imaged.
        assert!(owner_is_gone(&format!("{}/1", boot_id())));
        assert!(owner_is_gone(&format!("{}/4194304", boot_id())));
        assert!(!owner_is_gone("garbage"));
    }

    #[test]
    fn unique_suffixes_differ() {
        assert_ne!(unique_suffix(), unique_suffix());
    }
}
