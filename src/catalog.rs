//! The image view over containerd's image store: records grouped by image ID (the
//! config digest), with the names, size and user containerd's CRI reports.
//!
//! Every record in the namespace is an image, whoever wrote it; a record whose
//! content is missing (or has no manifest for our platform) is skipped, as
//! containerd's CRI skips it.

use crate::digest::Digest;
use crate::oci::{self, Descriptor, ImageConfig, Index, Manifest, ManifestKind};
use crate::platform::PlatformSpec;
use crate::reference::ImageQuery;
use crate::store::{FsUsage, ImageRecord, ImageStore, StoreError, LABEL_PINNED};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Manifests, indexes and configs above this size are refused.
pub const MAX_DOCUMENT_BYTES: u64 = 8 << 20;
/// containerd 1.7+ marks images kubelet must never garbage-collect with this label.

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
    pub config: serde_json::Value,
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
    config: serde_json::Value,
}

pub struct Catalog {
    store: Arc<dyn ImageStore>,
    platform: PlatformSpec,
    resolved: Mutex<HashMap<Digest, Arc<Resolved>>>,
}

impl Catalog {
    pub fn new(store: Arc<dyn ImageStore>, platform: PlatformSpec) -> Self {
        Catalog {
            store,
            platform,
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// Every image, sorted by ID.
    pub async fn list(&self) -> Result<Vec<ImageView>, CatalogError> {
        let records = self.store.list_images().await?;
        let mut groups: BTreeMap<Digest, (Arc<Resolved>, Vec<ImageRecord>)> = BTreeMap::new();
        for record in records {
            let Some(resolved) = self.resolve(&record.target).await? else {
                tracing::debug!(name = %record.name, "skipping image record whose content is not here");
                continue;
            };
            groups
                .entry(resolved.config_digest.clone())
                .or_insert_with(|| (resolved.clone(), Vec::new()))
                .1
                .push(record);
        }
        Ok(groups
            .into_values()
            .map(|(resolved, records)| view(&resolved, &records))
            .collect())
    }

    /// The image a query names, if present.
    pub async fn find(&self, query: &ImageQuery) -> Result<Option<ImageView>, CatalogError> {
        // A name lookup first: it needs one record, not the whole list.
        if let ImageQuery::Ref(r) = query {
            if let Some(record) = self.store.get_image(&r.to_string()).await? {
                if let Some(resolved) = self.resolve(&record.target).await? {
                    let id = resolved.config_digest.clone();
                    return self.by_id(&id).await;
                }
            }
        }
        let images = self.list().await?;
        Ok(images.into_iter().find(|image| matches_query(image, query)))
    }

    async fn by_id(&self, id: &Digest) -> Result<Option<ImageView>, CatalogError> {
        Ok(self.list().await?.into_iter().find(|i| &i.id == id))
    }

    /// Removes every record of the image a query names; absent is not an error.
    /// Returns the removed image, if there was one.
    pub async fn remove(&self, query: &ImageQuery) -> Result<Option<ImageView>, CatalogError> {
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

    pub async fn filesystem_usage(&self, snapshotter: &str) -> Result<FsUsage, CatalogError> {
        Ok(self.store.filesystem_usage(snapshotter).await?)
    }

    /// Reads target → (platform manifest) → config, or `None` if content is missing.
    async fn resolve(&self, target: &Descriptor) -> Result<Option<Arc<Resolved>>, CatalogError> {
        if let Some(r) = self.lock().get(&target.digest) {
            return Ok(Some(r.clone()));
        }
        let Some(resolved) = self.resolve_uncached(target).await? else {
            return Ok(None);
        };
        let resolved = Arc::new(resolved);
        self.lock().insert(target.digest.clone(), resolved.clone());
        Ok(Some(resolved))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Resolved>>> {
        // The map is only a cache of immutable documents: a poisoned lock still holds
        // valid entries.
        self.resolved.lock().unwrap_or_else(|p| p.into_inner())
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
            config: raw,
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

fn view(resolved: &Resolved, records: &[ImageRecord]) -> ImageView {
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

fn matches_query(image: &ImageView, query: &ImageQuery) -> bool {
    match query {
        ImageQuery::Id(id) => &image.id == id,
        ImageQuery::Ref(r) => {
            let s = r.to_string();
            image.repo_tags.contains(&s) || image.repo_digests.contains(&s)
        }
    }
}
