//! containerd store (stub until the store branch lands).
use super::*;
pub struct ContainerdStore;
impl ContainerdStore {
    pub fn connect(_address: &str, _namespace: &str) -> Result<Self, StoreError> {
        Ok(ContainerdStore)
    }
}
#[async_trait]
impl ImageStore for ContainerdStore {
    async fn create_lease(&self, _e: Duration) -> Result<Lease, StoreError> {
        todo!()
    }
    async fn delete_lease(&self, _l: &Lease, _s: bool) -> Result<(), StoreError> {
        todo!()
    }
    async fn content_info(&self, _d: &Digest) -> Result<Option<ContentInfo>, StoreError> {
        todo!()
    }
    async fn update_labels(&self, _d: &Digest, _l: Labels) -> Result<(), StoreError> {
        todo!()
    }
    async fn open_writer(
        &self,
        _l: &Lease,
        _r: &str,
        _e: &Descriptor,
    ) -> Result<Ingest, StoreError> {
        todo!()
    }
    async fn abort_ingest(&self, _r: &str) -> Result<(), StoreError> {
        todo!()
    }
    async fn read_content(&self, _d: &Digest, _m: u64) -> Result<Bytes, StoreError> {
        todo!()
    }
    async fn snapshot_exists(&self, _s: &str, _c: &Digest) -> Result<bool, StoreError> {
        todo!()
    }
    async fn apply_layer(
        &self,
        _l: &Lease,
        _s: &str,
        _d: &Descriptor,
        _p: Option<&Digest>,
        _c: &Digest,
    ) -> Result<Digest, StoreError> {
        todo!()
    }
    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        todo!()
    }
    async fn get_image(&self, _n: &str) -> Result<Option<ImageRecord>, StoreError> {
        todo!()
    }
    async fn put_image(&self, _r: ImageRecord) -> Result<(), StoreError> {
        todo!()
    }
    async fn delete_image(&self, _n: &str, _s: bool) -> Result<(), StoreError> {
        todo!()
    }
    async fn filesystem_usage(&self, _s: &str) -> Result<FsUsage, StoreError> {
        todo!()
    }
}
