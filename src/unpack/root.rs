//! The extraction root: directories resolved inside it with `openat2`
//! (`RESOLVE_IN_ROOT`, so no symlink leads out), parents created on demand, and
//! removal that never follows a link.

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `openat2` with a scoped resolve fails with EAGAIN when a rename elsewhere raced
/// a `..` step (the kernel cannot prove the walk stayed inside); retry a few times.
const RESOLVE_RETRIES: usize = 32;
/// Dangling symlinks followed while creating parents, as the kernel's own limit.
const MAX_SYMLINK_DEPTH: usize = 40;

/// `target` (a symlink's content) read from directory `base` (relative to the
/// root), as a root-relative path with `.`/`..` resolved lexically and clamped at
/// the root, as `RESOLVE_IN_ROOT` and containerd's `fs.RootPath` treat it.
fn scoped_join(base: &[u8], target: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    if target.first() != Some(&b'/') {
        parts.extend(base.split(|&b| b == b'/').filter(|c| !c.is_empty()));
    }
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join(&b'/')
}

pub(super) struct Root {
    fd: OwnedFd,
    /// The root's canonical path, to name implicit directories relative to it.
    real: PathBuf,
    /// The last parent directory resolved, by relative path: entries of a layer
    /// come grouped by directory, so most lookups hit it.
    cache: Option<(Vec<u8>, OwnedFd)>,
}

impl Root {
    pub(super) fn open(path: &Path) -> io::Result<Root> {
        let fd = rfs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let real = std::fs::canonicalize(path)?;
        Ok(Root {
            fd,
            real,
            cache: None,
        })
    }

    /// Forgets the cached parent: after anything was removed or replaced, a cached
    /// descriptor could name a directory no longer in the tree.
    pub(super) fn invalidate(&mut self) {
        self.cache = None;
    }

    /// The directory `rel` (components joined by `/`, no `.` or `..`; empty for the
    /// root), resolved inside the root. Missing directories are created (mode 0755,
    /// as containerd's `mkparent` does) and reported in `implicit`.
    pub(super) fn parent(
        &mut self,
        rel: &[u8],
        implicit: &mut Vec<PathBuf>,
    ) -> io::Result<BorrowedFd<'_>> {
        let hit = matches!(&self.cache, Some((path, _)) if path.as_slice() == rel);
        if !hit {
            let fd = match open_dir_in(self.fd.as_fd(), rel) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => self.create_dirs(rel, implicit)?,
                Err(e) => return Err(e.into()),
            };
            self.cache = Some((rel.to_vec(), fd));
        }
        match &self.cache {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => unreachable!("the cache was filled above"),
        }
    }

    /// The directory `rel` if it exists, resolved inside the root; nothing created.
    pub(super) fn existing_dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        Ok(open_dir_in(self.fd.as_fd(), rel)?)
    }

    fn create_dirs(&mut self, rel: &[u8], implicit: &mut Vec<PathBuf>) -> io::Result<OwnedFd> {
        self.create_dirs_following(rel, implicit, 0)
    }

    fn create_dirs_following(
        &mut self,
        rel: &[u8],
        implicit: &mut Vec<PathBuf>,
        depth: usize,
    ) -> io::Result<OwnedFd> {
        if depth > MAX_SYMLINK_DEPTH {
            return Err(Errno::LOOP.into());
        }
        let mut current = open_dir_in(self.fd.as_fd(), b"")?;
        let mut end = 0;
        for component in rel.split(|&b| b == b'/') {
            end += component.len();
            let prefix = &rel[..end];
            current = match open_dir_in(self.fd.as_fd(), prefix) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rfs::mkdirat(&current, component, Mode::from_raw_mode(0o755)) {
                        // Exactly 0755, whatever the umask, and without the set-gid
                        // bit a set-gid parent passes on (containerd chmods it too).
                        Ok(()) => {
                            let fd = rfs::openat(
                                &current,
                                component,
                                OFlags::RDONLY
                                    | OFlags::DIRECTORY
                                    | OFlags::NOFOLLOW
                                    | OFlags::CLOEXEC,
                                Mode::empty(),
                            )?;
                            rfs::fchmod(&fd, Mode::from_raw_mode(0o755))?;
                        }
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    match open_dir_in(self.fd.as_fd(), prefix) {
                        Ok(fd) => {
                            implicit.push(self.relative(&fd)?);
                            fd
                        }
                        // A dangling symlink: containerd's `fs.RootPath` resolves it
                        // (inside the root) and `mkparent` creates its target.
                        Err(Errno::NOENT) => {
                            let target = rfs::readlinkat(&current, component, Vec::new())?;
                            let base = self.relative(&current)?;
                            let target_rel =
                                scoped_join(base.as_os_str().as_bytes(), target.as_bytes());
                            self.create_dirs_following(&target_rel, implicit, depth + 1)?;
                            open_dir_in(self.fd.as_fd(), prefix)?
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            end += 1; // the '/'
        }
        Ok(current)
    }

    /// Where `fd` (a directory inside the root) is, relative to the root.
    fn relative(&self, fd: &OwnedFd) -> io::Result<PathBuf> {
        use std::os::fd::AsRawFd;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        path.strip_prefix(&self.real)
            .map(Path::to_path_buf)
            .map_err(|_| io::Error::other(format!("{} left the root", path.display())))
    }
}

/// Opens directory `rel` under `dir` with every symlink resolved as if `dir` were `/`.
pub(super) fn open_dir_in(dir: BorrowedFd<'_>, rel: &[u8]) -> Result<OwnedFd, Errno> {
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    let mut tries = 0;
    loop {
        match rfs::openat2(
            dir,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::AGAIN) if tries < RESOLVE_RETRIES => tries += 1,
            other => return other,
        }
    }
}

/// Opens `rel` (any file type) under `dir` for reading attributes, resolved in root;
/// the last component is followed too (containerd's `fs.RootPath` does).
pub(super) fn open_path_in(dir: BorrowedFd<'_>, rel: &[u8]) -> Result<OwnedFd, Errno> {
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    let mut tries = 0;
    loop {
        match rfs::openat2(
            dir,
            rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::AGAIN) if tries < RESOLVE_RETRIES => tries += 1,
            other => return other,
        }
    }
}

/// Removes `name` in `dir` and, for a directory, everything below it, without
/// following any symlink. A missing `name` is not an error.
pub(super) fn remove_all_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let stat = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if rfs::FileType::from_raw_mode(stat.st_mode) != rfs::FileType::Directory {
        return match rfs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let sub = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    remove_children(sub.as_fd(), |_| false)?;
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes every entry of directory `dir` for which `keep(name)` is false.
pub(super) fn remove_children(dir: BorrowedFd<'_>, keep: impl Fn(&[u8]) -> bool) -> io::Result<()> {
    // Names first, then removals: the directory must not change under the reader.
    let mut names = Vec::new();
    let mut reader = rfs::Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." || keep(name) {
            continue;
        }
        names.push(name.to_vec());
    }
    for name in names {
        remove_all_at(dir, &name)?;
    }
    Ok(())
}

/// The path of `name` in the directory `dir`, through `/proc/self/fd`, for the few
/// calls that have no `*at` form without following the last component (`lsetxattr`,
/// `llistxattr`, `lgetxattr`). `dir` was resolved safely; `name` is not followed.
pub(super) fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    use std::os::fd::AsRawFd;
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    path.push(std::ffi::OsStr::from_bytes(name));
    path
}
