//! The image view over containerd's image store: records grouped by image ID (the
//! config digest), with the names, size and user containerd's CRI reports.
//!
//! Every record in the namespace is an image, whoever wrote it; a record whose
//! content is missing (or has no manifest for our platform) is skipped, as
//! containerd's CRI skips it.
//!
//! The records come from the [`ImageIndex`]; what a record's target resolves to
//! (manifest, config: size, user, chain ID) is immutable per target digest and read
//! once. The views built from them are kept until the index changes, so in steady
//! state a read RPC asks containerd nothing.

use crate::digest::Digest;
use crate::image_index::{ImageIndex, Records};
use crate::oci::{self, Descriptor, ImageConfig, Index, Manifest, ManifestKind};
use crate::platform::PlatformSpec;
use crate::reference::ImageQuery;
use crate::store::{FsUsage, ImageRecord, ImageStore, StoreError, LABEL_PINNED};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Manifests, indexes and configs above this size are refused.
pub const MAX_DOCUMENT_BYTES: u64 = 8 << 20;
/// How long views that had to skip a record (its content missing) are kept before
/// its content is looked for again, if no record changed meanwhile.
const RETRY_UNRESOLVED: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One image as the CRI sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageView {
    /// The config digest.
    pub id: Digest,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// Index (if any) + manifest + config + compressed layers, as containerd counts it.
    pub size: u64,
    /// The config's `User`, as written.
    pub user: Option<String>,
    pub pinned: bool,
    /// Chain ID of the top layer: the snapshot a container starts from.
    pub chain_id: Option<Digest>,
    /// The whole image config document.
    pub config: Arc<serde_json::Value>,
    /// Names of every image record of this image (tags, digests, ID).
    pub record_names: Vec<String>,
}

impl ImageView {
    /// The uid or user name of the config's `User` (`user[:group]`), as kubelet
    /// wants it: a numeric user is a uid, anything else a name.
    pub fn uid_or_username(&self) -> (Option<i64>, String) {
        let Some(user) = self.user.as_deref().filter(|u| !u.is_empty()) else {
            return (None, String::new());
        };
        let name = user.split(':').next().unwrap_or(user);
        match name.parse::<i64>() {
            Ok(uid) => (Some(uid), String::new()),
            Err(_) => (None, name.to_string()),
        }
    }
}

/// What a record's target resolves to; immutable for a given target digest.
#[derive(Debug, Clone)]
struct Resolved {
    config_digest: Digest,
    size: u64,
    user: Option<String>,
    chain_id: Option<Digest>,
    config: Arc<serde_json::Value>,
}

/// Every image, as of one index generation, with lookups by name and ID.
struct Views {
    /// `None`: built from a live list (the index was not in step); never reused.
    generation: Option<u64>,
    built: Instant,
    /// Some record was skipped because its content could not be read.
    unresolved: bool,
    /// Sorted by ID.
    images: Vec<Arc<ImageView>>,
    /// Repo tags and repo digests → position in `images`.
    by_name: HashMap<String, usize>,
    by_id: HashMap<Digest, usize>,
}

impl Views {
    fn reusable_at(&self, generation: Option<u64>) -> bool {
        generation.is_some()
            && self.generation == generation
            && !(self.unresolved && self.built.elapsed() > RETRY_UNRESOLVED)
    }
}

pub struct Catalog {
    store: Arc<dyn ImageStore>,
    index: ImageIndex,
    platform: PlatformSpec,
    /// By target digest.
    resolved: Mutex<HashMap<Digest, Arc<Resolved>>>,
    views: Mutex<Option<Arc<Views>>>,
    /// One build of the views at a time; the others wait and take it.
    building: tokio::sync::Mutex<()>,
}

impl Catalog {
    /// The images of `index`'s records. `store` reads their content and removes
    /// records (it should be the [`crate::image_index::IndexedStore`] feeding `index`).
    pub fn new(store: Arc<dyn ImageStore>, index: ImageIndex, platform: PlatformSpec) -> Self {
        Catalog {
            store,
            index,
            platform,
            resolved: Mutex::new(HashMap::new()),
            views: Mutex::new(None),
            building: tokio::sync::Mutex::new(()),
        }
    }

    /// Every image, sorted by ID.
    pub async fn list(&self) -> Result<Vec<Arc<ImageView>>, CatalogError> {
        Ok(self.views().await?.images.clone())
    }

    /// The image a query names, if present.
    pub async fn find(&self, query: &ImageQuery) -> Result<Option<Arc<ImageView>>, CatalogError> {
        let views = self.views().await?;
        let at = match query {
            ImageQuery::Id(id) => views.by_id.get(id),
            ImageQuery::Ref(r) => views.by_name.get(&r.to_string()),
        };
        Ok(at.map(|&i| views.images[i].clone()))
    }

    /// Removes every record of the image a query names; absent is not an error.
    /// Returns the removed image, if there was one.
    pub async fn remove(&self, query: &ImageQuery) -> Result<Option<Arc<ImageView>>, CatalogError> {
        let Some(image) = self.find(query).await? else {
            return Ok(None);
        };
        let id_name = image.id.to_string();
        for name in image.record_names.iter().filter(|n| **n != id_name) {
            self.store.delete_image(name, false).await?;
        }
        // The ID record goes last, and synchronously: once RemoveImage returns the
        // image is gone from containerd's CRI too and its content is collectable.
        self.store.delete_image(&id_name, true).await?;
        Ok(Some(image))
    }

    /// The views of the index's records now: the last ones built if the index has
    /// not changed since, else built anew.
    async fn views(&self) -> Result<Arc<Views>, CatalogError> {
        let records = self.index.records().await?;
        if let Some(views) = self.cached(records.generation) {
            return Ok(views);
        }
        let _building = self.building.lock().await;
        if let Some(views) = self.cached(records.generation) {
            return Ok(views);
        }
        let views = Arc::new(self.build(&records).await?);
        if views.generation.is_some() {
            *lock(&self.views) = Some(views.clone());
        }
        Ok(views)
    }

    fn cached(&self, generation: Option<u64>) -> Option<Arc<Views>> {
        lock(&self.views)
            .as_ref()
            .filter(|v| v.reusable_at(generation))
            .cloned()
    }

    async fn build(&self, records: &Records) -> Result<Views, CatalogError> {
        let mut groups: BTreeMap<Digest, (Arc<Resolved>, Vec<&ImageRecord>)> = BTreeMap::new();
        let mut unresolved = false;
        let mut targets = HashSet::new();
        for record in records.records.values() {
            targets.insert(record.target.digest.clone());
            let Some(resolved) = self.resolve(&record.target).await? else {
                tracing::debug!(name = %record.name, "skipping image record whose content is not here");
                unresolved = true;
                continue;
            };
            groups
                .entry(resolved.config_digest.clone())
                .or_insert_with(|| (resolved.clone(), Vec::new()))
                .1
                .push(record);
        }
        // Documents of targets no record names any more are not kept.
        lock(&self.resolved).retain(|digest, _| targets.contains(digest));
        let images: Vec<Arc<ImageView>> = groups
            .into_values()
            .map(|(resolved, records)| Arc::new(view(&resolved, &records)))
            .collect();
        let mut by_name = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, image) in images.iter().enumerate() {
            by_id.insert(image.id.clone(), i);
            for name in image.repo_tags.iter().chain(&image.repo_digests) {
                by_name.insert(name.clone(), i);
            }
        }
        Ok(Views {
            generation: records.generation,
            built: Instant::now(),
            unresolved,
            images,
            by_name,
            by_id,
        })
    }

    pub async fn filesystem_usage(&self, snapshotter: &str) -> Result<FsUsage, CatalogError> {
        Ok(self.store.filesystem_usage(snapshotter).await?)
    }

    /// Reads target → (platform manifest) → config, or `None` if content is missing.
    async fn resolve(&self, target: &Descriptor) -> Result<Option<Arc<Resolved>>, CatalogError> {
        if let Some(r) = lock(&self.resolved).get(&target.digest) {
            return Ok(Some(r.clone()));
        }
        let Some(resolved) = self.resolve_uncached(target).await? else {
            return Ok(None);
        };
        let resolved = Arc::new(resolved);
        lock(&self.resolved).insert(target.digest.clone(), resolved.clone());
        Ok(Some(resolved))
    }

    async fn resolve_uncached(
        &self,
        target: &Descriptor,
    ) -> Result<Option<Resolved>, CatalogError> {
        let mut size = 0;
        let mut desc = target.clone();
        let mut kind = oci::manifest_kind(&desc.media_type);
        if kind == ManifestKind::Index {
            let Some(body) = self.read(&desc.digest).await? else {
                return Ok(None);
            };
            let Ok(index) = serde_json::from_slice::<Index>(&body) else {
                tracing::warn!(digest = %desc.digest, "image index in the content store does not parse");
                return Ok(None);
            };
            let Some(child) = self.platform.select(&index.manifests) else {
                return Ok(None);
            };
            size += desc.size;
            desc = child.clone();
            kind = oci::manifest_kind(&desc.media_type);
        }
        if kind != ManifestKind::Manifest {
            return Ok(None);
        }
        let Some(body) = self.read(&desc.digest).await? else {
            return Ok(None);
        };
        let Ok(manifest) = serde_json::from_slice::<Manifest>(&body) else {
            tracing::warn!(digest = %desc.digest, "image manifest in the content store does not parse");
            return Ok(None);
        };
        size +=
            desc.size + manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        let Some(config_body) = self.read(&manifest.config.digest).await? else {
            return Ok(None);
        };
        let (Ok(config), Ok(raw)) = (
            serde_json::from_slice::<ImageConfig>(&config_body),
            serde_json::from_slice::<serde_json::Value>(&config_body),
        ) else {
            tracing::warn!(digest = %manifest.config.digest, "image config in the content store does not parse");
            return Ok(None);
        };
        Ok(Some(Resolved {
            config_digest: manifest.config.digest.clone(),
            size,
            user: config.config.as_ref().and_then(|c| c.user.clone()),
            chain_id: config.chain_ids().last().cloned(),
            config: Arc::new(raw),
        }))
    }

    async fn read(&self, digest: &Digest) -> Result<Option<bytes::Bytes>, CatalogError> {
        match self.store.read_content(digest, MAX_DOCUMENT_BYTES).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            // A document too big or unreadable makes that image unlistable, not all.
            Err(e @ (StoreError::TooLarge { .. } | StoreError::Malformed { .. })) => {
                tracing::warn!(%digest, error = %e, "skipping an image whose content cannot be read");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The caches behind these locks hold whole values only: a poisoned lock still
/// holds valid entries.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn view(resolved: &Resolved, records: &[&ImageRecord]) -> ImageView {
    let id_name = resolved.config_digest.to_string();
    let mut repo_tags = Vec::new();
    let mut repo_digests = Vec::new();
    for record in records.iter().filter(|r| r.name != id_name) {
        // Names not parseable as references (written by other tools) still count
        // as records of the image, but are not reported as tags.
        let Ok(reference) = crate::reference::Reference::parse(&record.name) else {
            continue;
        };
        match reference.digest() {
            Some(_) => repo_digests.push(record.name.clone()),
            None => {
                repo_tags.push(record.name.clone());
                repo_digests.push(reference.digest_name(&record.target.digest));
            }
        }
    }
    repo_tags.sort();
    repo_tags.dedup();
    repo_digests.sort();
    repo_digests.dedup();
    let mut record_names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    record_names.sort();
    ImageView {
        id: resolved.config_digest.clone(),
        repo_tags,
        repo_digests,
        size: resolved.size,
        user: resolved.user.clone(),
        pinned: records
            .iter()
            .any(|r| r.labels.get(LABEL_PINNED).is_some_and(|v| v == "pinned")),
        chain_id: resolved.chain_id.clone(),
        config: resolved.config.clone(),
        record_names,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_index::IndexedStore;
    use crate::store::{Ingest, Labels, MemoryStore};

    /// Stores `body` as a committed blob; returns its descriptor.
    async fn blob(store: &MemoryStore, media_type: &str, body: &[u8]) -> Descriptor {
        let desc = Descriptor::new(media_type, Digest::of(body), body.len() as u64);
        let lease = store.create_lease(Duration::from_secs(60)).await.unwrap();
        if let Ingest::Writer(mut w) = store.open_writer(&lease, "doc", &desc).await.unwrap() {
            w.write(bytes::Bytes::copy_from_slice(body)).await.unwrap();
            w.commit(Labels::new()).await.unwrap();
        }
        desc
    }

    /// A one-layer image whose config says `user`; returns (manifest, config digest).
    async fn image(store: &MemoryStore, user: &str) -> (Descriptor, Digest) {
        let layer = Digest::of(user.as_bytes());
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"User": user},
            "rootfs": {"type": "layers", "diff_ids": [layer.to_string()]},
        });
        let config = blob(store, oci::OCI_CONFIG, config.to_string().as_bytes()).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::OCI_MANIFEST,
            "config": {"mediaType": oci::OCI_CONFIG, "digest": config.digest.to_string(), "size": config.size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": 1000}],
        });
        let manifest = blob(store, oci::OCI_MANIFEST, manifest.to_string().as_bytes()).await;
        (manifest, config.digest)
    }

    fn record(name: &str, target: &Descriptor) -> ImageRecord {
        ImageRecord {
            name: name.to_string(),
            target: target.clone(),
            labels: Labels::new(),
        }
    }

    fn catalog(store: &MemoryStore) -> (Catalog, Arc<dyn ImageStore>) {
        let raw: Arc<dyn ImageStore> = Arc::new(store.clone());
        let index = ImageIndex::new(raw.clone());
        let ours: Arc<dyn ImageStore> = Arc::new(IndexedStore::new(raw, index.clone()));
        (
            Catalog::new(ours.clone(), index, PlatformSpec::host()),
            ours,
        )
    }

    fn query(text: &str) -> ImageQuery {
        ImageQuery::parse(text).unwrap()
    }

    #[tokio::test]
    async fn records_group_by_config_and_are_found_by_any_name() {
        let store = MemoryStore::new();
        let (manifest, id) = image(&store, "1000:1000").await;
        let (catalog, ours) = catalog(&store);
        for name in [
            "docker.io/library/app:1".to_string(),
            "docker.io/library/app:latest".to_string(),
            format!("docker.io/library/app@{}", manifest.digest),
            id.to_string(),
        ] {
            ours.put_image(record(&name, &manifest)).await.unwrap();
        }
        let images = catalog.list().await.unwrap();
        assert_eq!(images.len(), 1);
        let image = &images[0];
        assert_eq!(image.id, id);
        assert_eq!(
            image.repo_tags,
            ["docker.io/library/app:1", "docker.io/library/app:latest"]
        );
        assert_eq!(
            image.repo_digests,
            [format!("docker.io/library/app@{}", manifest.digest)]
        );
        assert_eq!(image.uid_or_username(), (Some(1000), String::new()));
        // Index absent + manifest + config + the layer.
        assert!(image.size > 1000, "{}", image.size);
        for name in [
            "docker.io/library/app:1".to_string(),
            format!("docker.io/library/app@{}", manifest.digest),
            id.to_string(),
        ] {
            let found = catalog.find(&query(&name)).await.unwrap();
            assert_eq!(found.map(|i| i.id.clone()), Some(id.clone()), "{name}");
        }
        assert!(catalog
            .find(&query("docker.io/library/app:2"))
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn reads_in_steady_state_ask_the_store_nothing() {
        let store = MemoryStore::new();
        let (manifest, id) = image(&store, "nobody").await;
        let (catalog, ours) = catalog(&store);
        ours.put_image(record("docker.io/library/app:1", &manifest))
            .await
            .unwrap();
        catalog.list().await.unwrap();
        for _ in 0..2000 {
            if catalog.index.is_synced() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(catalog.index.is_synced());
        catalog.list().await.unwrap();
        let reads = store.reads();
        for _ in 0..3 {
            assert_eq!(catalog.list().await.unwrap().len(), 1);
            let found = catalog.find(&query("app:1")).await.unwrap().unwrap();
            assert_eq!(found.uid_or_username(), (None, "nobody".to_string()));
            assert!(catalog
                .find(&ImageQuery::Id(id.clone()))
                .await
                .unwrap()
                .is_some());
        }
        assert_eq!(store.reads(), reads, "no store call");
        // Another tag of the same image: its documents are not read again.
        ours.put_image(record("docker.io/library/app:2", &manifest))
            .await
            .unwrap();
        let found = catalog.find(&query("app:2")).await.unwrap().unwrap();
        assert_eq!(found.repo_tags.len(), 2);
        assert_eq!(store.reads(), reads, "content is cached by digest");
    }

    #[tokio::test]
    async fn a_record_without_content_is_skipped_and_removal_reaches_every_name() {
        let store = MemoryStore::new();
        let (manifest, id) = image(&store, "").await;
        let (catalog, ours) = catalog(&store);
        let missing = Descriptor::new(oci::OCI_MANIFEST, Digest::of(b"absent"), 6);
        ours.put_image(record("docker.io/library/ghost:1", &missing))
            .await
            .unwrap();
        ours.put_image(record("docker.io/library/app:1", &manifest))
            .await
            .unwrap();
        ours.put_image(record(&id.to_string(), &manifest))
            .await
            .unwrap();
        let images = catalog.list().await.unwrap();
        assert_eq!(images.len(), 1);
        let removed = catalog.remove(&query("app:1")).await.unwrap().unwrap();
        assert_eq!(removed.id, id);
        // Read back at once: our removal is in the index before any event.
        assert!(catalog.list().await.unwrap().is_empty());
        assert!(catalog.remove(&query("app:1")).await.unwrap().is_none());
        let left: Vec<String> = store
            .list_images()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(left, ["docker.io/library/ghost:1"]);
    }
}
