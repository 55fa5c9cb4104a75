//! Whiteouts (`.wh.<name>` deletes `<name>` from the layers below; `.wh..wh..opq`
//! hides everything below its directory), written as containerd writes them:
//! - into an overlay upper directory: `<name>` as a character device 0/0 owned as
//!   the whiteout entry, and the xattr `trusted.overlay.opaque=y` on the directory;
//! - onto a plain directory (first layer, `native`): the paths are deleted.

use super::extract::{EntryPath, Extractor, Meta};
use super::root::{remove_all_at, remove_children};
use super::{UnpackError, Whiteouts};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode};
use rustix::io::Errno;
use std::os::fd::{AsFd, BorrowedFd};

pub(super) const PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

pub(super) fn apply(
    x: &mut Extractor<'_>,
    parent: BorrowedFd<'_>,
    path: &EntryPath,
    meta: &Meta,
) -> Result<(), UnpackError> {
    let io = |op: &'static str| {
        let layer = x.layer().to_string();
        let path = String::from_utf8_lossy(&path.joined).into_owned();
        move |source: std::io::Error| UnpackError::Io {
            layer,
            op,
            path,
            source,
        }
    };
    let base = path.base();
    match (x.whiteout_mode(), base == OPAQUE) {
        (Whiteouts::Overlay, true) => {
            rfs::fsetxattr(parent, OVERLAY_OPAQUE_XATTR, b"y", rfs::XattrFlags::empty())
                .map_err(|e| io("mark opaque")(e.into()))
        }
        (Whiteouts::Overlay, false) => {
            let name = &base[PREFIX.len()..];
            rfs::mknodat(
                parent,
                name,
                FileType::CharacterDevice,
                Mode::empty(),
                rfs::makedev(0, 0),
            )
            .map_err(|e| io("create whiteout")(e.into()))?;
            rfs::chownat(
                parent,
                name,
                Some(rfs::Uid::from_raw(meta.uid)),
                Some(rfs::Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io("chown whiteout")(e.into()))
        }
        (Whiteouts::Delete, true) => {
            let dir = path.parent().to_vec();
            remove_not_unpacked(x, parent, &dir).map_err(io("clear opaque directory"))?;
            x.forget_cached_dirs();
            Ok(())
        }
        (Whiteouts::Delete, false) => {
            let name = &base[PREFIX.len()..];
            if name.is_empty() || name == b"." || name == b".." {
                return Ok(());
            }
            remove_all_at(parent, name).map_err(io("delete whited-out path"))?;
            x.forget_cached_dirs();
            Ok(())
        }
    }
}

/// Removes everything under directory `dir_rel` (open as `dir`) that this layer did
/// not write, keeping what it did, recursively (containerd walks the whole tree).
fn remove_not_unpacked(
    x: &Extractor<'_>,
    dir: BorrowedFd<'_>,
    dir_rel: &[u8],
) -> std::io::Result<()> {
    let child = |name: &[u8]| {
        let mut p = dir_rel.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        p
    };
    remove_children(dir, |name| x.unpacked.contains(&child(name)))?;
    // What is kept may be a directory holding older content: walk into it.
    let mut reader = rfs::Dir::read_from(dir)?;
    let mut kept_dirs = Vec::new();
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." && entry.file_type() == FileType::Directory {
            kept_dirs.push(name.to_vec());
        }
    }
    for name in kept_dirs {
        let sub = match rfs::openat(
            dir,
            name.as_slice(),
            rfs::OFlags::RDONLY
                | rfs::OFlags::DIRECTORY
                | rfs::OFlags::NOFOLLOW
                | rfs::OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        remove_not_unpacked(x, sub.as_fd(), &child(&name))?;
    }
    Ok(())
}
