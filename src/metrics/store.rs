//! An [`ImageStore`] that passes every call to another one and counts, on the way,
//! the calls that failed (`cri_imaged_containerd_errors_total`) and the blobs the
//! store already held when a pull opened their ingest
//! (`cri_imaged_blob_cache_hits_total`). The puller and catalog see no difference.

use super::Metrics;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::{
    ContentInfo, ContentWriter, FsUsage, ImageEvents, ImageRecord, ImageStore, Ingest, Labels,
    LayerBytes, Lease, StagedLayer, StoreError,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// Counts what `inner` does; see the module documentation.
pub struct MeteredStore {
    inner: Arc<dyn ImageStore>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn ImageStore>, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    fn count<T>(&self, operation: &str, result: Result<T, StoreError>) -> Result<T, StoreError> {
        count(&self.metrics, operation, result)
    }
}

fn count<T>(
    metrics: &Metrics,
    operation: &str,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    if let Err(e) = &result {
        if let Some(kind) = error_kind(e) {
            metrics.containerd_error(operation, kind);
        }
    }
    result
}

/// The label value of a store error; `None` for "not found", which is an answer
/// (the pull asks whether a config or snapshot is there), not a failure.
fn error_kind(e: &StoreError) -> Option<&'static str> {
    Some(match e {
        StoreError::NotFound { .. } => return None,
        StoreError::Unavailable { .. } => "unavailable",
        StoreError::DigestMismatch { .. } => "digest_mismatch",
        StoreError::TooLarge { .. } => "too_large",
        StoreError::Grpc { .. } => "grpc",
        StoreError::InvalidArgument { .. } => "invalid_argument",
        StoreError::Local { .. } => "local",
        StoreError::Malformed { .. } => "malformed",
        StoreError::Unpack(_) => "unpack",
    })
}

/// What an ingest holds, from its name (`layer-sha256:…`; see `puller::ingest_ref`).
fn ingest_kind(reference: &str) -> &'static str {
    match reference.split_once('-').map(|(kind, _)| kind) {
        Some("layer") => "layer",
        Some("config") => "config",
        Some("manifest") => "manifest",
        Some("index") => "index",
        _ => "other",
    }
}

#[async_trait]
impl ImageStore for MeteredStore {
    async fn create_lease(&self, expire: Duration) -> Result<Lease, StoreError> {
        self.count("create_lease", self.inner.create_lease(expire).await)
    }

    async fn delete_lease(&self, lease: &Lease, sync: bool) -> Result<(), StoreError> {
        self.count("delete_lease", self.inner.delete_lease(lease, sync).await)
    }

    async fn content_info(&self, digest: &Digest) -> Result<Option<ContentInfo>, StoreError> {
        self.count("content_info", self.inner.content_info(digest).await)
    }

    async fn update_labels(&self, digest: &Digest, labels: Labels) -> Result<(), StoreError> {
        self.count(
            "update_labels",
            self.inner.update_labels(digest, labels).await,
        )
    }

    async fn open_writer(
        &self,
        lease: &Lease,
        reference: &str,
        expected: &Descriptor,
    ) -> Result<Ingest, StoreError> {
        let ingest = self.count(
            "open_writer",
            self.inner.open_writer(lease, reference, expected).await,
        )?;
        Ok(match ingest {
            Ingest::Present => {
                self.metrics.blob_cache_hit(ingest_kind(reference));
                Ingest::Present
            }
            Ingest::Writer(inner) => Ingest::Writer(Box::new(MeteredWriter {
                inner,
                metrics: self.metrics.clone(),
            })),
        })
    }

    async fn abort_ingest(&self, reference: &str) -> Result<(), StoreError> {
        self.count("abort_ingest", self.inner.abort_ingest(reference).await)
    }

    async fn read_content(&self, digest: &Digest, max: u64) -> Result<Bytes, StoreError> {
        self.count("read_content", self.inner.read_content(digest, max).await)
    }

    async fn snapshot_exists(
        &self,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<bool, StoreError> {
        let result = self.inner.snapshot_exists(snapshotter, chain_id).await;
        self.count("snapshot_exists", result)
    }

    async fn lease_snapshot(
        &self,
        lease: &Lease,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        let result = self
            .inner
            .lease_snapshot(lease, snapshotter, chain_id)
            .await;
        self.count("lease_snapshot", result)
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
        let result = self
            .inner
            .apply_layer(lease, snapshotter, layer, diff_id, parent, chain_id)
            .await;
        self.count("apply_layer", result)
    }

    async fn stage_layer(
        &self,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        first: bool,
        bytes: LayerBytes,
    ) -> Result<Option<StagedLayer>, StoreError> {
        let result = self
            .inner
            .stage_layer(snapshotter, layer, diff_id, first, bytes)
            .await;
        self.count("stage_layer", result)
    }

    async fn commit_staged(
        &self,
        lease: &Lease,
        snapshotter: &str,
        staged: StagedLayer,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        let result = self
            .inner
            .commit_staged(lease, snapshotter, staged, parent, chain_id)
            .await;
        self.count("commit_staged", result)
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.count("list_images", self.inner.list_images().await)
    }

    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.count("get_image", self.inner.get_image(name).await)
    }

    async fn put_image(&self, record: ImageRecord) -> Result<(), StoreError> {
        self.count("put_image", self.inner.put_image(record).await)
    }

    async fn delete_image(&self, name: &str, sync: bool) -> Result<(), StoreError> {
        self.count("delete_image", self.inner.delete_image(name, sync).await)
    }

    async fn image_events(&self) -> Result<ImageEvents, StoreError> {
        self.count("image_events", self.inner.image_events().await)
    }

    async fn filesystem_usage(&self, snapshotter: &str) -> Result<FsUsage, StoreError> {
        self.count(
            "filesystem_usage",
            self.inner.filesystem_usage(snapshotter).await,
        )
    }
}

struct MeteredWriter {
    inner: Box<dyn ContentWriter>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl ContentWriter for MeteredWriter {
    fn offset(&self) -> u64 {
        self.inner.offset()
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        count(&self.metrics, "write", self.inner.write(chunk).await)
    }

    async fn sync(&mut self) -> Result<(), StoreError> {
        count(&self.metrics, "write", self.inner.sync().await)
    }

    async fn commit(self: Box<Self>, labels: Labels) -> Result<(), StoreError> {
        let MeteredWriter { inner, metrics } = *self;
        count(&metrics, "commit", inner.commit(labels).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn ingest_names_give_bounded_kinds() {
        assert_eq!(ingest_kind("layer-sha256:ab"), "layer");
        assert_eq!(ingest_kind("config-sha256:ab"), "config");
        assert_eq!(ingest_kind("index-sha256:ab"), "index");
        assert_eq!(ingest_kind("my/own/ingest"), "other");
    }

    #[tokio::test]
    async fn a_present_blob_is_a_cache_hit_and_failures_are_counted() {
        let metrics = Arc::new(Metrics::new());
        let store = MeteredStore::new(Arc::new(MemoryStore::new()), metrics.clone());
        let body = Bytes::from_static(b"layer bytes");
        let digest = Digest::of(&body);
        let desc = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            digest.clone(),
            body.len() as u64,
        );
        let lease = store.create_lease(Duration::from_secs(60)).await.unwrap();
        let reference = format!("layer-{digest}");
        let Ingest::Writer(mut writer) =
            store.open_writer(&lease, &reference, &desc).await.unwrap()
        else {
            panic!("a new blob needs writing");
        };
        writer.write(body).await.unwrap();
        writer.commit(Labels::new()).await.unwrap();
        assert!(matches!(
            store.open_writer(&lease, &reference, &desc).await,
            Ok(Ingest::Present)
        ));
        assert_eq!(metrics.blob_cache_hits.with(["layer"]).get(), 1);

        assert!(store.read_content(&digest, 1).await.is_err(), "too large");
        assert_eq!(
            metrics
                .containerd_errors
                .with(["read_content", "too_large"])
                .get(),
            1
        );
        let missing = Digest::of(b"nothing");
        assert!(store.read_content(&missing, 100).await.is_err());
        let text = metrics.render();
        assert!(!text.contains("not_found"), "{text}");
    }
}
