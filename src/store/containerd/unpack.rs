//! In-house unpacking into containerd's `overlayfs` and `native` snapshotters
//! (`[pull] unpack = "auto"`), instead of `Diff.Apply`.
//!
//! Why: `Diff.Apply` runs one layer at a time, after its download, and decompresses
//! in containerd; here each layer is extracted (by [`crate::unpack`]) into a staging
//! directory beside the snapshots, possibly while other layers download, and only
//! the cheap part is in layer order: `Snapshots.Prepare` → the staged tree renamed
//! onto the directory the returned mounts name → `Snapshots.Commit`.
//!
//! When: like direct content writes (direct.rs), this needs containerd's directories
//! on this host. The snapshotter must be `overlayfs` or `native`, its root (from
//! introspection) must hold `snapshots/` visible from here, the content root must
//! hold `blobs/sha256/`, and our staging directory must be on the same filesystem as
//! `snapshots/` (a rename cannot cross filesystems). The snapshot's directory is
//! always the one Prepare's mounts name (bind `source`, overlay `upperdir`), never a
//! path we build. Otherwise, and for every other snapshotter: `Diff.Apply`.
//!
//! `native` snapshots start as a copy of their parent, so those layers are
//! extracted straight into the prepared directory (whiteouts delete), in order,
//! without staging; containerd 1.6's native snapshotter exports no root, so only
//! the content directory must be visible, and a layer whose prepared directory is
//! not goes through `Diff.Apply`.

use super::ContainerdStore;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::{LayerBytes, Lease, StagedLayer, StoreError};
use crate::unpack::{self, Limits, Options, Whiteouts};
use containerd_client::types::Mount;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CONTENT_PLUGIN_TYPE: &str = "io.containerd.content.v1";
const CONTENT_PLUGIN_ID: &str = "content";
/// Our staging directory inside the snapshotter's root (same filesystem as its
/// `snapshots/`); containerd only looks at `snapshots/` and `metadata.db` there.
const STAGING_DIR: &str = "cri-imaged-unpack";
/// A layer extracted from its download is read before its blob's digest is
/// verified: it may inflate to this many times its compressed size (at least
/// [`STREAMED_FLOOR`] bytes), else the pull extracts it from the content store
/// once verified (`UnpackError::OverBudget`). Real layers rarely pass 10 times;
/// a zstd bomb from a hostile mirror would write without end.
const STREAMED_RATIO: u64 = 32;
const STREAMED_FLOOR: u64 = 64 << 20;

/// How layers are unpacked (`[pull] unpack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnpackMode {
    /// In-house for `overlayfs`/`native` when containerd's directories are visible
    /// here; `Diff.Apply` otherwise.
    #[default]
    Auto,
    /// Always containerd's `Diff.Apply`.
    Containerd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Overlay,
    Native,
}

/// What in-house unpacking into one snapshotter needs, found once.
#[derive(Debug)]
pub(super) struct LocalUnpack {
    kind: Kind,
    staging: PathBuf,
    blobs: PathBuf,
}

impl LocalUnpack {
    /// Checks whether layers for `snapshotter` can be unpacked here; logs the answer.
    pub(super) async fn discover(
        store: &ContainerdStore,
        snapshotter: &str,
    ) -> Result<Option<LocalUnpack>, StoreError> {
        let kind = match snapshotter {
            "overlayfs" => Kind::Overlay,
            "native" => Kind::Native,
            other => {
                tracing::info!(snapshotter = other, "layers unpack through containerd's Diff.Apply (in-house unpacking supports overlayfs and native)");
                return Ok(None);
            }
        };
        if kind == Kind::Native {
            return Self::discover_native(store, snapshotter).await;
        }
        let roots = async {
            let snapshots = store.snapshotter_root(snapshotter).await?;
            let content = store
                .plugin_root(CONTENT_PLUGIN_TYPE, CONTENT_PLUGIN_ID)
                .await?;
            Ok::<_, StoreError>((PathBuf::from(snapshots), PathBuf::from(content)))
        };
        let (root, content) = match roots.await {
            Ok(roots) => roots,
            Err(StoreError::NotFound { what }) => {
                tracing::info!(%what, "layers unpack through containerd's Diff.Apply (containerd does not say where its snapshots or content live)");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let snapshots = root.join("snapshots");
        let blobs = content.join("blobs").join("sha256");
        // One directory per process, so a second daemon on the node (or a restarted
        // one) never removes what another is staging.
        let shared = root.join(STAGING_DIR);
        let staging = shared.join(std::process::id().to_string());
        let usable = (|| {
            let snapshots_meta = std::fs::metadata(&snapshots)
                .map_err(|e| format!("{}: {e}", snapshots.display()))?;
            if !blobs.is_dir() {
                return Err(format!("{} is not a directory here", blobs.display()));
            }
            remove_dead_stagings(&shared);
            std::fs::create_dir_all(&staging)
                .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
            let staging_meta =
                std::fs::metadata(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
            if staging_meta.dev() != snapshots_meta.dev() {
                return Err(format!(
                    "{} and {} are on different filesystems",
                    staging.display(),
                    snapshots.display()
                ));
            }
            Ok(())
        })();
        match usable {
            Ok(()) => {
                tracing::info!(snapshotter, root = %root.display(), "unpacking layers in-house (Diff.Apply is the fallback)");
                Ok(Some(LocalUnpack {
                    kind,
                    staging,
                    blobs,
                }))
            }
            Err(why) => {
                tracing::info!(snapshotter, %why, "layers unpack through containerd's Diff.Apply (containerd's directories are not usable from here)");
                Ok(None)
            }
        }
    }

    /// `native` extracts straight into the directory Prepare names (a copy of the
    /// parent), so it stages nothing and needs only the content directory (containerd
    /// 1.6's native snapshotter does not export its root).
    async fn discover_native(
        store: &ContainerdStore,
        snapshotter: &str,
    ) -> Result<Option<LocalUnpack>, StoreError> {
        let content = match store
            .plugin_root(CONTENT_PLUGIN_TYPE, CONTENT_PLUGIN_ID)
            .await
        {
            Ok(root) => PathBuf::from(root),
            Err(StoreError::NotFound { what }) => {
                tracing::info!(%what, "layers unpack through containerd's Diff.Apply (containerd does not say where its content lives)");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let blobs = content.join("blobs").join("sha256");
        if !blobs.is_dir() {
            tracing::info!(snapshotter, dir = %blobs.display(), "layers unpack through containerd's Diff.Apply (its content directory is not visible here)");
            return Ok(None);
        }
        tracing::info!(
            snapshotter,
            "unpacking layers in-house, into each prepared snapshot (Diff.Apply is the fallback)"
        );
        Ok(Some(LocalUnpack {
            kind: Kind::Native,
            staging: PathBuf::new(),
            blobs,
        }))
    }

    fn blob_path(&self, layer: &Descriptor) -> PathBuf {
        self.blobs.join(layer.digest.hex())
    }

    /// Whether layers can be staged ahead of their parents (overlay) or must be
    /// extracted onto the parent's copy at commit (native).
    pub(super) fn stages(&self) -> bool {
        self.kind == Kind::Overlay
    }

    /// Extracts `layer` (from the content store or its download) into a new staging
    /// directory. `first`: the layer has no parent (its snapshot is a plain
    /// directory, where containerd deletes whited-out paths instead of writing
    /// overlay whiteouts).
    pub(super) async fn stage(
        &self,
        layer: &Descriptor,
        diff_id: &Digest,
        first: bool,
        mut bytes: LayerBytes,
    ) -> Result<StagedLayer, StoreError> {
        let dir = self.staging.join(format!(
            "{}-{}",
            &layer.digest.hex()[..16],
            super::unique_suffix()
        ));
        let whiteouts = if first {
            Whiteouts::Delete
        } else {
            Whiteouts::Overlay
        };
        let blob = self.blob_path(layer);
        let digest = layer.digest.clone();
        let diff_id = diff_id.clone();
        let mut limits = Limits::default();
        if let LayerBytes::Streamed(reader) = &mut bytes {
            limits.max_uncompressed_bytes = Some(
                layer
                    .size
                    .saturating_mul(STREAMED_RATIO)
                    .max(STREAMED_FLOOR),
            );
            // A blocking thread for the extraction once its download is under way.
            reader.ready().await;
        }
        // Everything in the blocking task, the guard included: if the pull is
        // cancelled meanwhile, the finished task's output (the guard) is dropped,
        // which removes the directory.
        on_blocking_thread("extraction", move || {
            std::fs::create_dir(&dir).map_err(|e| StoreError::Local {
                detail: format!("cannot create staging directory {}: {e}", dir.display()),
            })?;
            let mut staged = StagedLayer {
                dir: Some(dir.clone()),
                implicit_dirs: Vec::new(),
                whiteouts,
                layer: digest.clone(),
            };
            let source: Box<dyn BufRead> = match bytes {
                LayerBytes::Stored => Box::new(open_blob(&blob)?),
                LayerBytes::Streamed(reader) => Box::new(reader),
            };
            let options = Options { whiteouts, limits };
            let extracted =
                unpack::extract_layer(source, &digest.to_string(), &dir, &diff_id, &options)?;
            staged.implicit_dirs = extracted.implicit_dirs;
            Ok(staged)
        })
        .await
    }

    /// Moves a staged layer into a prepared snapshot: the directory its mounts name.
    pub(super) async fn place(
        &self,
        mut staged: StagedLayer,
        mounts: &[Mount],
    ) -> Result<(), StoreError> {
        let (target, lowers) = snapshot_dirs(mounts)?;
        let expected = if lowers.is_empty() {
            Whiteouts::Delete
        } else {
            Whiteouts::Overlay
        };
        if expected != staged.whiteouts {
            return Err(StoreError::Local {
                detail: format!(
                    "layer {} was staged for {:?} whiteouts but its snapshot needs {expected:?}",
                    staged.layer, staged.whiteouts
                ),
            });
        }
        let Some(dir) = staged.dir.take() else {
            return Err(StoreError::Local {
                detail: format!("layer {} was placed twice", staged.layer),
            });
        };
        let implicit = std::mem::take(&mut staged.implicit_dirs);
        on_blocking_thread("placing", move || {
            let result = place_tree(&dir, &target, &implicit, &lowers);
            if result.is_err() {
                remove_tree(&dir);
            }
            result
        })
        .await
    }

    /// Extracts `layer` straight into a prepared `native` snapshot (a copy of its
    /// parent), deleting what the layer whites out.
    pub(super) async fn extract_into(
        &self,
        layer: &Descriptor,
        diff_id: &Digest,
        mounts: &[Mount],
    ) -> Result<(), StoreError> {
        let (target, _) = snapshot_dirs(mounts)?;
        let blob = self.blob_path(layer);
        let name = layer.digest.to_string();
        let diff_id = diff_id.clone();
        on_blocking_thread("extraction", move || {
            let file = open_blob(&blob)?;
            let options = Options {
                whiteouts: Whiteouts::Delete,
                limits: Limits::default(),
            };
            unpack::extract_layer(file, &name, &target, &diff_id, &options)
                .map(|_| ())
                .map_err(StoreError::from)
        })
        .await
    }
}

/// Runs filesystem work on a blocking thread; a panic there is a local error naming
/// the `task`.
async fn on_blocking_thread<T: Send + 'static>(
    task: &str,
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Local {
            detail: format!("the {task} task failed: {e}"),
        })?
}

fn open_blob(blob: &Path) -> Result<BufReader<std::fs::File>, StoreError> {
    let file = std::fs::File::open(blob).map_err(|e| StoreError::Local {
        detail: format!("cannot read layer blob {}: {e}", blob.display()),
    })?;
    Ok(BufReader::with_capacity(unpack::BLOB_BUFFER, file))
}

/// The writable directory of a prepared snapshot and its parents' directories (top
/// first), from the mounts Prepare returned.
fn snapshot_dirs(mounts: &[Mount]) -> Result<(PathBuf, Vec<PathBuf>), StoreError> {
    let unexpected = || StoreError::Local {
        detail: format!(
            "cannot tell the snapshot's directory from its mounts {:?}",
            mounts
                .iter()
                .map(|m| (&m.r#type, &m.source, &m.options))
                .collect::<Vec<_>>()
        ),
    };
    let [mount] = mounts else {
        return Err(unexpected());
    };
    let (target, lowers) = match mount.r#type.as_str() {
        "bind" | "rbind" => (PathBuf::from(&mount.source), Vec::new()),
        "overlay" => {
            let option = |name: &str| {
                mount
                    .options
                    .iter()
                    .find_map(|o| o.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            };
            let upper = option("upperdir").ok_or_else(unexpected)?;
            let lowers = option("lowerdir")
                .map(|l| l.split(':').map(PathBuf::from).collect())
                .unwrap_or_default();
            (PathBuf::from(upper), lowers)
        }
        _ => return Err(unexpected()),
    };
    if !target.is_dir() {
        return Err(StoreError::Local {
            detail: format!(
                "the snapshot directory {} is not visible here",
                target.display()
            ),
        });
    }
    Ok((target, lowers))
}

/// Gives implicit directories their parents' attributes, the staged root the
/// attributes of the snapshot's directory (containerd never changes those: it
/// ignores `./` entries), then renames the staged tree onto the (empty) snapshot
/// directory.
fn place_tree(
    staged: &Path,
    target: &Path,
    implicit: &[PathBuf],
    lowers: &[PathBuf],
) -> Result<(), StoreError> {
    let local = |what: &str, path: &Path| {
        let what = format!("{what} {}", path.display());
        move |e: std::io::Error| StoreError::Local {
            detail: format!("{what}: {e}"),
        }
    };
    unpack::copy_parent_attributes(staged, implicit, lowers)
        .map_err(local("cannot copy parent attributes into", staged))?;
    let meta = std::fs::metadata(target).map_err(local("cannot inspect", target))?;
    std::os::unix::fs::chown(staged, Some(meta.uid()), Some(meta.gid()))
        .map_err(local("cannot chown", staged))?;
    std::fs::set_permissions(staged, meta.permissions()).map_err(local("cannot chmod", staged))?;
    // rename(2) replaces an empty directory atomically; a non-empty one is refused
    // (ENOTEMPTY), so nothing of the snapshot is ever overwritten.
    std::fs::rename(staged, target).map_err(local("cannot move the staged layer onto", target))
}

/// Removes the staging directories of processes that are gone (a daemon killed
/// mid-unpack): named by PID, kept while a process of that PID runs.
fn remove_dead_stagings(shared: &Path) {
    let Ok(entries) = std::fs::read_dir(shared) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let alive = name
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            tracing::info!(dir = %entry.path().display(), "removing layers staged by a daemon that is gone");
            remove_tree(&entry.path());
        }
    }
}

/// Removes a staging tree (never following symlinks: `remove_dir_all` does not).
pub(super) fn remove_tree(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a staged layer"),
    }
}

impl ContainerdStore {
    /// In-house unpacking for `snapshotter`, if usable (found once per store).
    pub(super) async fn local_unpack(
        &self,
        snapshotter: &str,
    ) -> Result<Option<Arc<LocalUnpack>>, StoreError> {
        if self.unpack_mode == UnpackMode::Containerd {
            return Ok(None);
        }
        let found = self
            .local_unpack
            .get_or_try_init(|| async {
                Ok::<_, StoreError>(
                    LocalUnpack::discover(self, snapshotter)
                        .await?
                        .map(|l| (snapshotter.to_string(), Arc::new(l))),
                )
            })
            .await?;
        // One snapshotter per daemon; another name asked later gets Diff.Apply.
        Ok(found
            .as_ref()
            .filter(|(name, _)| name == snapshotter)
            .map(|(_, l)| l.clone()))
    }

    /// `apply_layer` done in-house: staged then placed (overlayfs) or extracted into
    /// the prepared copy of the parent (native).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn unpack_in_house(
        &self,
        local: &LocalUnpack,
        lease: &Lease,
        snapshotter: &str,
        layer: &Descriptor,
        diff_id: &Digest,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        if local.stages() {
            let staged = local
                .stage(layer, diff_id, parent.is_none(), LayerBytes::Stored)
                .await?;
            return self
                .commit_staged_layer(local, lease, snapshotter, staged, parent, chain_id)
                .await;
        }
        self.extract_and_commit(lease, snapshotter, parent, chain_id, async |key, mounts| {
            if snapshot_dirs(&mounts).is_ok() {
                local.extract_into(layer, diff_id, &mounts).await
            } else {
                // The prepared directory is not visible from here: containerd applies.
                tracing::info!(%key, "snapshot directory not visible here; this layer goes through Diff.Apply");
                self.apply_diff(lease, mounts, layer, diff_id).await
            }
        })
        .await
    }

    /// Prepare → move the staged tree in → Commit; on failure the prepared snapshot
    /// is removed and nothing is committed.
    pub(super) async fn commit_staged_layer(
        &self,
        local: &LocalUnpack,
        lease: &Lease,
        snapshotter: &str,
        staged: StagedLayer,
        parent: Option<&Digest>,
        chain_id: &Digest,
    ) -> Result<(), StoreError> {
        // Committed by another pull meanwhile: `staged` is removed on drop.
        self.extract_and_commit(lease, snapshotter, parent, chain_id, async |_, mounts| {
            local.place(staged, &mounts).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.into(),
            source: source.into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn snapshot_directory_comes_from_the_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        let up = upper.to_str().unwrap();
        let (target, lowers) = snapshot_dirs(&[mount("bind", up, &["rbind", "rw"])]).unwrap();
        assert_eq!((target, lowers.len()), (upper.clone(), 0));
        let (target, lowers) = snapshot_dirs(&[mount(
            "overlay",
            "overlay",
            &[
                "index=off",
                "workdir=/w",
                &format!("upperdir={up}"),
                "lowerdir=/a:/b",
            ],
        )])
        .unwrap();
        assert_eq!(target, upper);
        assert_eq!(lowers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(snapshot_dirs(&[mount("overlay", "overlay", &["lowerdir=/a"])]).is_err());
        assert!(snapshot_dirs(&[mount("fuse", up, &[])]).is_err());
        assert!(snapshot_dirs(&[]).is_err());
        assert!(snapshot_dirs(&[mount("bind", "/nonexistent/x", &[])]).is_err());
    }
}
