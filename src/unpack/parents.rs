//! Directories a layer implies without listing them (`a/b/file` with no `a/b/`
//! entry). containerd's `mkparent` gives such a directory the owner, mode, times and
//! xattrs of the same directory in the nearest parent snapshot that has it (0755
//! and root otherwise). An extraction staged before the parents are known records
//! them, and this copies the attributes once the parent snapshots are.

use super::root::{open_dir_in, open_path_in};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Gives each directory of `implicit` (relative to `root`, parents first) the
/// attributes of the same path in the first of `parents` (top layer first) that has
/// it; stops looking at a parent where that path is not a directory.
pub fn copy_parent_attributes(
    root: &Path,
    implicit: &[PathBuf],
    parents: &[PathBuf],
) -> io::Result<()> {
    if implicit.is_empty() || parents.is_empty() {
        return Ok(());
    }
    let root_fd = rfs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let parent_fds = parents
        .iter()
        .map(|p| {
            rfs::open(
                p,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    for rel in implicit {
        let rel = rel.as_os_str().as_bytes();
        let ours = match open_dir_in(root_fd.as_fd(), rel) {
            Ok(fd) => fd,
            // Removed or replaced later in the layer.
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut copied = false;
        for parent in &parent_fds {
            match copy_from(parent.as_fd(), rel, ours.as_fd())? {
                Found::Copied => {
                    copied = true;
                    break;
                }
                Found::NotADirectory => break,
                Found::Missing => continue,
            }
        }
        if !copied {
            inherit_group(root_fd.as_fd(), rel, ours.as_fd())?;
        }
    }
    Ok(())
}

/// A directory containerd creates inside a set-gid directory gets that directory's
/// group from the kernel. Here the parent may have received its set-gid bit (from
/// the parent snapshots) only after the child was made: give the group now.
fn inherit_group(root: BorrowedFd<'_>, rel: &[u8], ours: BorrowedFd<'_>) -> io::Result<()> {
    let parent_rel = match rel.iter().rposition(|&b| b == b'/') {
        Some(at) => &rel[..at],
        None => b"",
    };
    let parent = open_dir_in(root, parent_rel)?;
    let stat = rfs::fstat(&parent)?;
    if stat.st_mode & 0o2000 != 0 {
        rfs::fchown(ours, None, Some(rfs::Gid::from_raw(stat.st_gid)))?;
    }
    Ok(())
}

enum Found {
    Copied,
    NotADirectory,
    Missing,
}

fn copy_from(parent: BorrowedFd<'_>, rel: &[u8], ours: BorrowedFd<'_>) -> io::Result<Found> {
    let theirs = match open_path_in(parent, rel) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Found::Missing),
        Err(Errno::NOTDIR) => return Ok(Found::NotADirectory),
        Err(e) => return Err(e.into()),
    };
    let stat = rfs::fstat(&theirs)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return Ok(Found::NotADirectory);
    }
    let theirs = open_dir_in(parent, rel)?;
    rfs::fchown(
        ours,
        Some(rfs::Uid::from_raw(stat.st_uid)),
        Some(rfs::Gid::from_raw(stat.st_gid)),
    )?;
    rfs::fchmod(ours, Mode::from_raw_mode(stat.st_mode & 0o7777))?;
    copy_xattrs(theirs.as_fd(), ours)?;
    // containerd copies the times too, but then creates the entry inside, which
    // sets the mtime to the time of the apply: only a directory that got nothing
    // (an opaque marker only) keeps the parent's times.
    if is_empty(ours)? {
        let times = Timestamps {
            last_access: rfs::Timespec {
                tv_sec: stat.st_atime as _,
                tv_nsec: stat.st_atime_nsec as _,
            },
            last_modification: rfs::Timespec {
                tv_sec: stat.st_mtime as _,
                tv_nsec: stat.st_mtime_nsec as _,
            },
        };
        rfs::utimensat(ours, ".", &times, AtFlags::empty())?;
    }
    Ok(Found::Copied)
}

fn copy_xattrs(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> io::Result<()> {
    let mut names = vec![0u8; 64 << 10];
    let n = match rfs::flistxattr(from, &mut names[..]) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut value = vec![0u8; 64 << 10];
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let len = match rfs::fgetxattr(from, name, &mut value[..]) {
            Ok(len) => len,
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(e.into()),
        };
        match rfs::fsetxattr(to, name, &value[..len], rfs::XattrFlags::CREATE) {
            Ok(()) | Err(Errno::NOTSUP) | Err(Errno::NODATA) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn is_empty(dir: BorrowedFd<'_>) -> io::Result<bool> {
    let mut reader = rfs::Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}
