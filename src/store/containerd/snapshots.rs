//! containerd's snapshotter and differ: unpacking a layer into a committed snapshot
//! named by its chain ID, and the snapshotter's disk usage for `ImageFsInfo`.

use super::images::to_proto_descriptor;
use super::{unique_suffix, ContainerdStore};
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::{FsUsage, Lease, StoreError};
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::introspection_client::IntrospectionClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Kind, ListSnapshotsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest, UsageRequest,
};
use containerd_client::services::v1::{ApplyRequest, PluginsRequest};
use futures_util::{StreamExt as _, TryStreamExt as _};
use std::collections::HashMap;
use tonic::transport::Channel;
use tonic::Code;

/// Label the unpacker puts on the extraction snapshot, naming the chain ID it will
/// be committed as (remote snapshotters use it to recognise layers they already have).
const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
const SNAPSHOTTER_PLUGIN_TYPE: &str = "io.containerd.snapshotter.v1";
/// Snapshots whose usage is asked for at once by `filesystem_usage`.
const USAGE_CONCURRENCY: usize = 8;

impl ContainerdStore {
    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    pub(super) async fn committed_snapshot_exists(
        &self,
        snapshotter: &str,
        chain_id: &Digest,
    ) -> Result<bool, StoreError> {
        let request = self.request(
            StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: chain_id.to_string(),
            },
            None,
        )?;
        match self.snapshots().stat(request).await {
            Ok(response) => Ok(response
                .into_inner()
                .info
                .is_some_and(|info| info.kind == Kind::Committed as i32)),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => {
                Err(self.status_error("Snapshots.Stat", status, || format!("snapshot {chain_id}")))
            }
        }
    }

    pub(super) async fn unpack_layer(
        &self,
        lease: &Lease,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<Digest, StoreError> {
        self.extract_and_commit(lease, snapshotter, parent, chain_id, async |_, mounts| {
            self.apply_diff(lease, mounts, layer, diff_id).await
        })
        .await?;
        Ok(diff_id.clone())
    }

    /// Prepares the extraction snapshot for `chain_id`, has `work` write the layer
    /// into it (given its key and mounts), and commits it; on failure the prepared
    /// snapshot is removed and nothing is committed. When the chain ID is committed
    /// already, `work` does not run (and is dropped).
    pub(super) async fn extract_and_commit(
        &self,
        lease: &Lease,
        snapshotter: &str,
        parent: Option<&Digest>,
        chain_id: &Digest,
        work: impl AsyncFnOnce(&str, Vec<containerd_client::types::Mount>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let Some((key, mounts)) = self
            .prepare_extraction(lease, snapshotter, parent, chain_id)
            .await?
        else {
            return Ok(());
        };
        let result = async {
            work(&key, mounts).await?;
            self.commit_extraction(lease, snapshotter, &key, chain_id)
                .await
        }
        .await;
        if let Err(error) = &result {
            tracing::debug!(%key, %error, "unpack failed; removing the extraction snapshot");
            self.remove_snapshot(snapshotter, &key).await;
        }
        result
    }

    /// Prepares the active snapshot a layer is extracted into, labelled with the
    /// chain ID it will be committed as. Returns its key and mounts, or `None` when
    /// that chain ID is committed already (another pull won the race).
    async fn prepare_extraction(
        &self,
        lease: &Lease,
        snapshotter: &str,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<Option<(String, Vec<containerd_client::types::Mount>)>, StoreError> {
        // The same key form containerd's unpacker uses, so tools recognise it.
        let key = format!("extract-{} {chain_id}", unique_suffix());
        let request = self.request(
            PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.clone(),
                parent: parent.map(Digest::to_string).unwrap_or_default(),
                labels: HashMap::from([(LABEL_SNAPSHOT_REF.to_string(), chain_id.to_string())]),
            },
            Some(lease),
        )?;
        match self.snapshots().prepare(request).await {
            Ok(response) => Ok(Some((key, response.into_inner().mounts))),
            // With the snapshot.ref label, containerd answers `target snapshot
            // "<chain id>": already exists` when that chain ID is committed already
            // (another pull won). Whoever committed it checked the same diff ID.
            Err(status)
                if status.code() == Code::AlreadyExists
                    && self
                        .committed_snapshot_exists(snapshotter, chain_id)
                        .await? =>
            {
                tracing::debug!(%chain_id, "snapshot already unpacked");
                Ok(None)
            }
            Err(status) => Err(
                self.status_error("Snapshots.Prepare", status, || match parent {
                    Some(parent) => format!("parent snapshot {parent}"),
                    None => format!("snapshotter {snapshotter}"),
                }),
            ),
        }
    }

    /// `Diff.Apply` of `layer` onto `mounts`, checking the diff ID it computes.
    pub(super) async fn apply_diff(
        &self,
        lease: &Lease,
        mounts: Vec<containerd_client::types::Mount>,
        layer: &Descriptor,
        diff_id: &Digest,
    ) -> Result<(), StoreError> {
        let request = self.request(
            ApplyRequest {
                diff: Some(to_proto_descriptor(layer)),
                mounts,
                ..Default::default()
            },
            Some(lease),
        )?;
        let applied = DiffClient::new(self.channel.clone())
            .apply(request)
            .await
            .map_err(|status| {
                self.status_error("Diff.Apply", status, || format!("layer {}", layer.digest))
            })?
            .into_inner()
            .applied
            .ok_or(StoreError::Malformed {
                what: "Diff.Apply response",
                detail: "no applied descriptor".into(),
            })?;
        let applied: Digest =
            applied
                .digest
                .parse()
                .map_err(|error: crate::digest::DigestError| StoreError::Malformed {
                    what: "Diff.Apply digest",
                    detail: error.to_string(),
                })?;
        if &applied != diff_id {
            return Err(StoreError::DigestMismatch {
                expected: diff_id.clone(),
                actual: applied.to_string(),
            });
        }
        Ok(())
    }

    /// Commits the extraction snapshot `key` as `chain_id`. Another pull having
    /// committed that chain ID first is success (ours is removed).
    async fn commit_extraction(
        &self,
        lease: &Lease,
        snapshotter: &str,
        key: &str,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        // containerd's unpacker commits with the labels it prepared with, so the
        // committed snapshot carries `containerd.io/snapshot.ref` too.
        let request = self.request(
            CommitSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                name: chain_id.to_string(),
                key: key.to_string(),
                labels: HashMap::from([(LABEL_SNAPSHOT_REF.to_string(), chain_id.to_string())]),
            },
            Some(lease),
        )?;
        match self.snapshots().commit(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => {
                // Another pull committed this chain ID first; ours is redundant.
                tracing::debug!(%chain_id, "snapshot already committed by another unpack");
                self.remove_snapshot(snapshotter, key).await;
                Ok(())
            }
            Err(status) => Err(self.status_error("Snapshots.Commit", status, || {
                format!("extraction snapshot {key}")
            })),
        }
    }

    /// Best-effort removal of an extraction snapshot; the lease's expiry cleans up
    /// whatever this misses.
    pub(super) async fn remove_snapshot(&self, snapshotter: &str, key: &str) {
        let request = match self.request(
            RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            },
            None,
        ) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(key, %error, "cannot remove snapshot");
                return;
            }
        };
        if let Err(status) = self.snapshots().remove(request).await {
            if status.code() != Code::NotFound {
                tracing::warn!(key, %status, "cannot remove extraction snapshot");
            }
        }
    }

    pub(super) async fn snapshotter_usage(&self, snapshotter: &str) -> Result<FsUsage, StoreError> {
        let mountpoint = self.snapshotter_root(snapshotter).await?;

        let request = self.request(
            ListSnapshotsRequest {
                snapshotter: snapshotter.to_string(),
                filters: Vec::new(),
            },
            None,
        )?;
        let list_error = |status| {
            self.status_error("Snapshots.List", status, || {
                format!("snapshotter {snapshotter}")
            })
        };
        let mut names = Vec::new();
        let mut stream = self
            .snapshots()
            .list(request)
            .await
            .map_err(list_error)?
            .into_inner();
        while let Some(page) = stream.message().await.map_err(list_error)? {
            names.extend(page.info.into_iter().map(|info| info.name));
        }

        // As containerd's CRI does: the sum of every snapshot's usage. Committed
        // snapshots answer from stored totals; active ones are walked on disk.
        let usages: Vec<Option<(u64, u64)>> = futures_util::stream::iter(names)
            .map(|name| async move { self.snapshot_usage(snapshotter, &name).await })
            .buffer_unordered(USAGE_CONCURRENCY)
            .try_collect()
            .await?;
        let (used_bytes, inodes_used) = usages
            .into_iter()
            .flatten()
            .fold((0u64, 0u64), |(b, i), (size, inodes)| {
                (b + size, i + inodes)
            });
        let (content_bytes, content_blobs) = self.content_usage().await?;
        Ok(FsUsage {
            mountpoint,
            used_bytes,
            inodes_used,
            content_bytes,
            content_blobs,
        })
    }

    /// Usage of one snapshot; `None` if it vanished since it was listed.
    async fn snapshot_usage(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let request = self.request(
            UsageRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            },
            None,
        )?;
        match self.snapshots().usage(request).await {
            Ok(response) => {
                let usage = response.into_inner();
                // Negative counts would be a containerd bug; count them as nothing.
                Ok(Some((
                    u64::try_from(usage.size).unwrap_or_default(),
                    u64::try_from(usage.inodes).unwrap_or_default(),
                )))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => {
                Err(self.status_error("Snapshots.Usage", status, || format!("snapshot {key}")))
            }
        }
    }

    /// The snapshotter plugin's root directory, from its introspection exports.
    pub(super) async fn snapshotter_root(&self, snapshotter: &str) -> Result<String, StoreError> {
        self.plugin_root(SNAPSHOTTER_PLUGIN_TYPE, snapshotter).await
    }

    /// A plugin's root directory on the host, from its introspection exports.
    pub(super) async fn plugin_root(
        &self,
        plugin_type: &str,
        id: &str,
    ) -> Result<String, StoreError> {
        let request = self.request(
            PluginsRequest {
                filters: vec![format!("type=={plugin_type},id=={id}")],
            },
            None,
        )?;
        let plugins = IntrospectionClient::new(self.channel.clone())
            .plugins(request)
            .await
            .map_err(|status| {
                self.status_error("Introspection.Plugins", status, || {
                    format!("plugin {plugin_type}.{id}")
                })
            })?
            .into_inner()
            .plugins;
        let plugin = plugins
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound {
                what: format!("plugin {plugin_type} {id:?}"),
            })?;
        if let Some(root) = plugin.exports.get("root") {
            return Ok(root.clone());
        }
        Err(StoreError::NotFound {
            what: match plugin.init_err {
                Some(init_err) => format!(
                    "root of plugin {plugin_type} {id:?} (the plugin failed to start: {})",
                    init_err.message
                ),
                None => format!("root export of plugin {plugin_type} {id:?}"),
            },
        })
    }
}
