//! The tar walk: each entry checked, resolved inside the root and written with the
//! type, mode, owner, xattrs and times containerd's applier gives it.
//!
//! Order of attribute writes per entry, as containerd's `createTarFile`: owner (a
//! chown clears set-id bits and file capabilities), then xattrs, then mode, then
//! times. Directory times are set after the whole layer, since every entry created
//! inside a directory changes its mtime.

use super::root::{proc_path, remove_all_at, Root};
use super::whiteout;
use super::{Options, UnpackError, Whiteouts};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tar::EntryType;

const PAX_XATTR: &str = "SCHILY.xattr.";
/// What the tar parser may read between the end of one entry's data and the next
/// entry: its header, and GNU long name and link (`L`, `K`) and PAX (`x`) records,
/// which the parser reads whole into memory. Go's archive/tar (containerd's parser)
/// refuses each such record over 1 MiB; three of those, their headers and the
/// entry's own header fit in this.
const HEADER_BUDGET: u64 = 3 * ((1 << 20) + 512) + 4 * 512;
/// File data is copied in chunks of this size.
const COPY_BUFFER: usize = 256 << 10;
/// Longest path component Linux accepts.
const NAME_MAX: usize = 255;

/// A cleaned entry path: components without `.`, never `..`, relative.
pub(super) struct EntryPath {
    /// `a/b/c` for `./a//b/c/`.
    pub(super) joined: Vec<u8>,
    /// Where the last component starts in `joined`.
    base_at: usize,
}

impl EntryPath {
    pub(super) fn parent(&self) -> &[u8] {
        if self.base_at == 0 {
            b""
        } else {
            &self.joined[..self.base_at - 1]
        }
    }
    pub(super) fn base(&self) -> &[u8] {
        &self.joined[self.base_at..]
    }
}

/// Cleans a tar path the way containerd does (`filepath.Clean`, relative to the
/// root), refusing what could leave it. `Ok(None)`: the root itself.
fn clean(raw: &[u8], max: usize) -> Result<Option<EntryPath>, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    if raw.len() > max {
        return Err(format!("path longer than {max} bytes"));
    }
    let mut joined = Vec::with_capacity(raw.len());
    let mut base_at = 0;
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => return Err("path contains '..'".into()),
            c if c.len() > NAME_MAX => {
                return Err(format!("a path component is longer than {NAME_MAX} bytes"))
            }
            c => {
                if !joined.is_empty() {
                    joined.push(b'/');
                }
                base_at = joined.len();
                joined.extend_from_slice(c);
            }
        }
    }
    if joined.is_empty() {
        return Ok(None);
    }
    Ok(Some(EntryPath { joined, base_at }))
}

/// What the extraction needs from one tar header (plus its PAX records).
pub(super) struct Meta {
    mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    mtime: Timespec,
    xattrs: Vec<(String, Vec<u8>)>,
    /// PAX-format sparse file (`GNU.sparse.*` records; GNU tar's `--format=posix
    /// --sparse`, any of its `--sparse-version`s).
    sparse: Option<Sparse>,
}

/// A PAX sparse file: the archive holds only its data regions.
struct Sparse {
    /// The real name (1.0 names a placeholder in the header; 0.x keep the name).
    name: Option<Vec<u8>>,
    /// The real size.
    size: u64,
    /// Versions 0.0 and 0.1 carry the map in records; 1.0 at the start of the data.
    map: Option<Vec<(u64, u64)>>,
}

/// More regions than any real sparse file has; bounds what a hostile map takes.
const MAX_SPARSE_REGIONS: u64 = 1 << 20;

pub(super) struct Extractor<'a> {
    root: Root,
    layer: &'a str,
    options: &'a Options,
    entries: u64,
    /// Directories listed by the layer, with their times, set last.
    dir_times: Vec<(EntryPath, Timespec)>,
    /// Paths written by this layer (for opaque whiteouts in delete mode).
    pub(super) unpacked: HashSet<Vec<u8>>,
    /// Directories created only because an entry needed them.
    implicit: Vec<PathBuf>,
    /// Directories the layer listed (so an implicit one that is listed later is not
    /// given its parent's attributes).
    listed_dirs: HashSet<Vec<u8>>,
    buffer: Vec<u8>,
}

/// How many bytes the tar parser may still read (`None`: no bound), shared between
/// the walk, which sets it, and the reader under the parser, which spends it.
#[derive(Clone, Default)]
struct Budget {
    left: Rc<Cell<Option<u64>>>,
    exceeded: Rc<Cell<bool>>,
}

impl Budget {
    fn limit(&self, bytes: Option<u64>) {
        self.left.set(bytes);
    }
}

/// The stream under the tar parser, failing a read once the budget is spent.
struct Budgeted<'a, R> {
    inner: &'a mut R,
    budget: Budget,
}

impl<R: Read> Read for Budgeted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.budget.left.get() else {
            return self.inner.read(buf);
        };
        if left == 0 && !buf.is_empty() {
            self.budget.exceeded.set(true);
            return Err(io::Error::other("the tar header budget is spent"));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.left.set(Some(left - n as u64));
        Ok(n)
    }
}

/// Walks the tar stream and writes it under `root`. Returns the entry count and the
/// implicit directories. Leaves the reader just after the archive's end marker.
pub(super) fn extract<R: Read>(
    tar: &mut R,
    layer: &str,
    root: &Path,
    options: &Options,
) -> Result<(u64, Vec<PathBuf>), UnpackError> {
    let io_err = |op: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |source: io::Error| UnpackError::Io {
            layer: layer.to_string(),
            op,
            path,
            source,
        }
    };
    let mut x = Extractor {
        root: Root::open(root).map_err(io_err("open extraction root", root))?,
        layer,
        options,
        entries: 0,
        dir_times: Vec::new(),
        unpacked: HashSet::new(),
        implicit: Vec::new(),
        listed_dirs: HashSet::new(),
        buffer: vec![0; COPY_BUFFER],
    };
    let budget = Budget::default();
    let mut archive = tar::Archive::new(Budgeted {
        inner: tar,
        budget: budget.clone(),
    });
    let corrupt = |source| UnpackError::Corrupt {
        layer: layer.to_string(),
        source,
    };
    budget.limit(Some(HEADER_BUDGET));
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(|e| match budget.exceeded.get() {
            true => x.hostile(
                "",
                format!("tar headers and long-name or PAX records over {HEADER_BUDGET} bytes for one entry"),
            ),
            false => corrupt(e),
        })?;
        budget.limit(None);
        x.entries += 1;
        if x.entries > options.limits.max_entries {
            return Err(x.hostile(
                "",
                format!("more than {} entries", options.limits.max_entries),
            ));
        }
        x.entry(&mut entry)?;
        // Data the entry did not use (a directory's, say) is skipped here, so only
        // headers and records count against the budget.
        io::copy(&mut entry, &mut io::sink()).map_err(corrupt)?;
        budget.limit(Some(HEADER_BUDGET));
    }
    x.finish()?;
    let implicit = x
        .implicit
        .into_iter()
        .filter(|p| {
            use std::os::unix::ffi::OsStrExt;
            !x.listed_dirs.contains(p.as_os_str().as_bytes())
        })
        .collect();
    Ok((x.entries, implicit))
}

impl Extractor<'_> {
    fn hostile(&self, entry: &str, reason: String) -> UnpackError {
        UnpackError::Hostile {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            reason,
        }
    }

    fn io(&self, op: &'static str, path: &[u8]) -> impl FnOnce(io::Error) -> UnpackError {
        let layer = self.layer.to_string();
        let path = String::from_utf8_lossy(path).into_owned();
        move |source| UnpackError::Io {
            layer,
            op,
            path,
            source,
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        // Global PAX headers carry nothing for the files; Go's reader (and so
        // containerd) skips them as well.
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let meta = self.meta(entry, &shown)?;
        // A PAX 1.0 sparse file's header names a placeholder; its name is in the records.
        let raw_path = match meta.sparse.as_ref().and_then(|s| s.name.clone()) {
            Some(name) => name,
            None => raw_path,
        };
        let max = self.options.limits.max_path_bytes;
        let Some(path) = clean(&raw_path, max).map_err(|r| self.hostile(&shown, r))? else {
            // containerd ignores entries that resolve to the root (`./`).
            return Ok(());
        };

        // Resolve (and create) the parent inside the root.
        let parent_rel = path.parent().to_vec();
        let mut implicit = std::mem::take(&mut self.implicit);
        // A clone of the (cached) descriptor, so `self` is free for the writes below.
        let parent = self
            .root
            .parent(&parent_rel, &mut implicit)
            .and_then(|fd| fd.try_clone_to_owned());
        self.implicit = implicit;
        let parent = parent.map_err(self.io("resolve the parent of", &path.joined))?;

        if path.base().starts_with(whiteout::PREFIX) {
            return whiteout::apply(self, parent.as_fd(), &path, &meta);
        }

        // Whatever the layer wrote at this name before goes, unless both are
        // directories (containerd's rule: a later entry replaces an earlier one).
        let existing = match rfs::statat(&parent, path.base(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Some(FileType::from_raw_mode(stat.st_mode)),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(self.io("inspect", &path.joined)(e.into())),
        };
        let keep_dir = existing == Some(FileType::Directory) && kind == EntryType::Directory;
        if existing.is_some() && !keep_dir {
            remove_all_at(parent.as_fd(), path.base()).map_err(self.io("replace", &path.joined))?;
            self.root.invalidate();
        }

        match kind {
            // Old GNU sparse entries (type 'S') fall through to "unsupported", as
            // containerd refuses them ("unhandled tar header type 83").
            EntryType::Regular | EntryType::Continuous => {
                self.file(entry, parent.as_fd(), &path, &meta)?
            }
            EntryType::Directory => {
                self.directory(parent.as_fd(), &path, &meta, keep_dir)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.hostile(&shown, "symlink without a target".into()))?
                    .into_owned();
                if target.len() > max {
                    return Err(
                        self.hostile(&shown, format!("link target longer than {max} bytes"))
                    );
                }
                // The target is stored as is: it is only ever resolved inside a
                // root (ours, by RESOLVE_IN_ROOT; the container's, by its mount
                // namespace), never by this process on the host.
                rfs::symlinkat(target.as_slice(), &parent, path.base())
                    .map_err(|e| self.io("create symlink", &path.joined)(e.into()))?;
                self.attributes(parent.as_fd(), &path, &meta, false, true)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.hostile(&shown, "hard link without a target".into()))?
                    .into_owned();
                self.hard_link(parent.as_fd(), &path, &target, &shown)?;
                // containerd chowns and times a hard link but does not chmod it.
                self.attributes(parent.as_fd(), &path, &meta, false, true)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let file_type = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                rfs::mknodat(
                    &parent,
                    path.base(),
                    file_type,
                    Mode::from_raw_mode(0o600),
                    rfs::makedev(major, minor),
                )
                .map_err(|e| self.io("create device node", &path.joined)(e.into()))?;
                self.attributes(parent.as_fd(), &path, &meta, true, true)?;
            }
            other => {
                return Err(self.hostile(&shown, format!("unsupported tar entry type {other:?}")))
            }
        }
        self.unpacked.insert(path.joined);
        Ok(())
    }

    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        shown: &str,
    ) -> Result<Meta, UnpackError> {
        let header = entry.header();
        let bad = |what: &str, e: io::Error| self.hostile(shown, format!("bad {what}: {e}"));
        let old = header.as_old();
        let mode = or_blank(header.mode().map(u64::from), &old.mode).map_err(|e| bad("mode", e))?
            as u32
            & 0o7777;
        let uid = or_blank(header.uid(), &old.uid).map_err(|e| bad("uid", e))?;
        let gid = or_blank(header.gid(), &old.gid).map_err(|e| bad("gid", e))?;
        let uid = u32::try_from(uid)
            .ok()
            .filter(|&u| u != u32::MAX)
            .ok_or_else(|| self.hostile(shown, format!("uid {uid} out of range")))?;
        let gid = u32::try_from(gid)
            .ok()
            .filter(|&g| g != u32::MAX)
            .ok_or_else(|| self.hostile(shown, format!("gid {gid} out of range")))?;
        let mut mtime = Timespec {
            tv_sec: or_blank(header.mtime(), &old.mtime).map_err(|e| bad("mtime", e))? as i64,
            tv_nsec: 0,
        };
        let mut xattrs = Vec::new();
        let mut sparse = SparseRecords::default();
        if let Some(pax) = entry.pax_extensions().map_err(|e| bad("PAX header", e))? {
            for record in pax {
                let record = record.map_err(|e| bad("PAX record", e))?;
                let Ok(key) = record.key() else { continue };
                if let Some(name) = key.strip_prefix(PAX_XATTR) {
                    // `trusted.*` is the overlay driver's own namespace
                    // (`trusted.overlay.opaque`, `.redirect`, `.metacopy` steer
                    // lookups into other layers): never taken from a layer. containerd's
                    // applier ends up with none either (checked by tests/unpack.rs).
                    if name.starts_with("trusted.") {
                        tracing::debug!(
                            layer = self.layer,
                            entry = shown,
                            xattr = name,
                            "trusted.* xattr in a layer; skipped"
                        );
                        continue;
                    }
                    xattrs.push((name.to_string(), record.value_bytes().to_vec()));
                } else if key == "mtime" {
                    if let Some(t) = std::str::from_utf8(record.value_bytes())
                        .ok()
                        .and_then(parse_pax_time)
                    {
                        mtime = t;
                    }
                } else if let Some(field) = key.strip_prefix("GNU.sparse.") {
                    sparse
                        .add(field, record.value_bytes())
                        .map_err(|r| self.hostile(shown, r))?;
                }
            }
        }
        let sparse = sparse.finish().map_err(|r| self.hostile(shown, r))?;
        // containerd bounds times below at the epoch.
        if mtime.tv_sec < 0 {
            mtime = Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
            sparse,
        })
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: BorrowedFd<'_>,
        path: &EntryPath,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let fd = rfs::openat(
            parent,
            path.base(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.io("create", &path.joined)(e.into()))?;
        let mut file = std::fs::File::from(fd);
        match &meta.sparse {
            None => {
                self.copy(entry, &mut file, u64::MAX, path)?;
            }
            Some(Sparse {
                size: real_size,
                map,
                ..
            }) => {
                let shown = String::from_utf8_lossy(&path.joined).into_owned();
                let map = match map {
                    Some(map) => map.clone(),
                    None => {
                        read_sparse_map(entry, *real_size).map_err(|r| self.hostile(&shown, r))?
                    }
                };
                // Holes are skipped, so the file stays sparse (its content is the
                // same as containerd's, which writes the zeros).
                for (offset, len) in map {
                    use std::io::Seek;
                    file.seek(io::SeekFrom::Start(offset))
                        .map_err(self.io("write", &path.joined))?;
                    if self.copy(entry, &mut file, len, path)? != len {
                        return Err(self.hostile(&shown, "sparse data shorter than its map".into()));
                    }
                }
                // Data the map does not place is an error to Go's reader too.
                let mut more = [0u8; 1];
                let left = entry
                    .read(&mut more)
                    .map_err(|source| UnpackError::Corrupt {
                        layer: self.layer.to_string(),
                        source,
                    })?;
                if left > 0 {
                    return Err(self.hostile(&shown, "sparse data longer than its map".into()));
                }
                file.set_len(*real_size)
                    .map_err(self.io("write", &path.joined))?;
            }
        }
        let fd = OwnedFd::from(file);
        self.fd_attributes(fd.as_fd(), path, meta)?;
        rfs::futimens(&fd, &times(meta.mtime))
            .map_err(|e| self.io("set times of", &path.joined)(e.into()))
    }

    /// Copies up to `limit` bytes of the entry into `file`; returns how many.
    fn copy<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        file: &mut std::fs::File,
        limit: u64,
        path: &EntryPath,
    ) -> Result<u64, UnpackError> {
        let mut copied = 0u64;
        while copied < limit {
            let want = (limit - copied).min(self.buffer.len() as u64) as usize;
            let n = match entry.read(&mut self.buffer[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(UnpackError::Corrupt {
                        layer: self.layer.to_string(),
                        source: e,
                    })
                }
            };
            file.write_all(&self.buffer[..n])
                .map_err(self.io("write", &path.joined))?;
            copied += n as u64;
        }
        Ok(copied)
    }

    fn directory(
        &mut self,
        parent: BorrowedFd<'_>,
        path: &EntryPath,
        meta: &Meta,
        exists: bool,
    ) -> Result<(), UnpackError> {
        if !exists {
            rfs::mkdirat(parent, path.base(), Mode::from_raw_mode(0o700))
                .map_err(|e| self.io("create directory", &path.joined)(e.into()))?;
        }
        let fd = rfs::openat(
            parent,
            path.base(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io("open directory", &path.joined)(e.into()))?;
        self.fd_attributes(fd.as_fd(), path, meta)?;
        self.listed_dirs.insert(path.joined.clone());
        self.dir_times.push((
            EntryPath {
                joined: path.joined.clone(),
                base_at: path.base_at,
            },
            meta.mtime,
        ));
        Ok(())
    }

    fn hard_link(
        &mut self,
        parent: BorrowedFd<'_>,
        path: &EntryPath,
        target: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        let max = self.options.limits.max_path_bytes;
        let Some(target) = clean(target, max)
            .map_err(|r| self.hostile(shown, format!("hard link target: {r}")))?
        else {
            return Err(self.hostile(shown, "hard link to the root".into()));
        };
        let target_dir = self
            .root
            .existing_dir(target.parent())
            .map_err(|_| self.hostile(shown, "hard link target is not in the layer".into()))?;
        match rfs::linkat(
            &target_dir,
            target.base(),
            parent,
            path.base(),
            AtFlags::empty(),
        ) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(self.hostile(
                shown,
                format!(
                    "hard link target {:?} is not in the layer",
                    String::from_utf8_lossy(&target.joined)
                ),
            )),
            Err(e) => Err(self.io("create hard link", &path.joined)(e.into())),
        }
    }

    /// Owner, xattrs and mode through an open descriptor (files, directories).
    fn fd_attributes(
        &self,
        fd: BorrowedFd<'_>,
        path: &EntryPath,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        rfs::fchown(
            fd,
            Some(rfs::Uid::from_raw(meta.uid)),
            Some(rfs::Gid::from_raw(meta.gid)),
        )
        .map_err(|e| self.io("chown", &path.joined)(e.into()))?;
        for (name, value) in &meta.xattrs {
            match rfs::fsetxattr(fd, name.as_str(), value, rfs::XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::NOTSUP) => {
                    tracing::warn!(layer = self.layer, path = %String::from_utf8_lossy(&path.joined), xattr = %name, "xattr not supported here; skipped, as containerd does")
                }
                Err(e) => return Err(self.io("set xattr on", &path.joined)(e.into())),
            }
        }
        rfs::fchmod(fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| self.io("chmod", &path.joined)(e.into()))
    }

    /// Owner, xattrs, mode (if `chmod`) and times (if `touch`) by name in `parent`,
    /// never following the entry (symlinks, hard links, device nodes, FIFOs: opening
    /// those could block or reach a device).
    fn attributes(
        &self,
        parent: BorrowedFd<'_>,
        path: &EntryPath,
        meta: &Meta,
        chmod: bool,
        touch: bool,
    ) -> Result<(), UnpackError> {
        rfs::chownat(
            parent,
            path.base(),
            Some(rfs::Uid::from_raw(meta.uid)),
            Some(rfs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io("chown", &path.joined)(e.into()))?;
        if !meta.xattrs.is_empty() {
            let at = proc_path(parent, path.base());
            for (name, value) in &meta.xattrs {
                match rfs::lsetxattr(&at, name.as_str(), value, rfs::XattrFlags::empty()) {
                    Ok(()) => {}
                    Err(Errno::NOTSUP) | Err(Errno::PERM) if is_user_xattr(name) => {
                        // user.* xattrs cannot exist on symlinks and device nodes.
                        tracing::warn!(layer = self.layer, path = %String::from_utf8_lossy(&path.joined), xattr = %name, "xattr not supported on this file type; skipped")
                    }
                    Err(Errno::NOTSUP) => {
                        tracing::warn!(layer = self.layer, path = %String::from_utf8_lossy(&path.joined), xattr = %name, "xattr not supported here; skipped, as containerd does")
                    }
                    Err(e) => return Err(self.io("set xattr on", &path.joined)(e.into())),
                }
            }
        }
        if chmod {
            rfs::chmodat(
                parent,
                path.base(),
                Mode::from_raw_mode(meta.mode),
                AtFlags::empty(),
            )
            .map_err(|e| self.io("chmod", &path.joined)(e.into()))?;
        }
        if touch {
            rfs::utimensat(
                parent,
                path.base(),
                &times(meta.mtime),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.io("set times of", &path.joined)(e.into()))?;
        }
        Ok(())
    }

    /// Directory times, deepest first so setting one cannot disturb another.
    fn finish(&mut self) -> Result<(), UnpackError> {
        let mut dirs = std::mem::take(&mut self.dir_times);
        dirs.reverse();
        for (path, mtime) in dirs {
            let parent = match self.root.existing_dir(path.parent()) {
                Ok(fd) => fd,
                // Removed later in the layer (replaced, whited out): nothing to time.
                Err(_) => continue,
            };
            match rfs::statat(&parent, path.base(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                _ => continue,
            }
            rfs::utimensat(
                &parent,
                path.base(),
                &times(mtime),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.io("set times of", &path.joined)(e.into()))?;
        }
        Ok(())
    }

    pub(super) fn whiteout_mode(&self) -> Whiteouts {
        self.options.whiteouts
    }

    pub(super) fn layer(&self) -> &str {
        self.layer
    }

    pub(super) fn forget_cached_dirs(&mut self) {
        self.root.invalidate();
    }
}

/// The `GNU.sparse.*` records of one entry, as read. Which version they are is told
/// as Go's archive/tar (containerd's parser) tells it: by `major`/`minor`, else
/// by a `map` record (0.1).
#[derive(Default)]
struct SparseRecords {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    /// `size` (0.x) or `realsize` (1.0).
    size: Option<u64>,
    /// 0.1: `offset,length,offset,length…`.
    map: Option<Vec<u8>>,
    /// 0.x: how many regions the map holds (Go's reader requires it).
    numblocks: Option<u64>,
    /// 0.0: repeated `offset` and `numbytes` records, in pairs.
    pairs: Vec<u64>,
    any: bool,
}

impl SparseRecords {
    fn add(&mut self, field: &str, value: &[u8]) -> Result<(), String> {
        let number = || {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("GNU.sparse.{field} is not a number"))
        };
        self.any = true;
        match field {
            "major" => self.major = Some(value.to_vec()),
            "minor" => self.minor = Some(value.to_vec()),
            "name" => self.name = Some(value.to_vec()),
            "size" | "realsize" => self.size = Some(number()?),
            "map" => self.map = Some(value.to_vec()),
            "numblocks" => self.numblocks = Some(number()?),
            "offset" | "numbytes" => {
                if self.pairs.len() as u64 >= 2 * MAX_SPARSE_REGIONS {
                    return Err("a sparse map with too many regions".into());
                }
                // In turns, offset first, as Go's reader insists.
                if (field == "offset") != self.pairs.len().is_multiple_of(2) {
                    return Err(format!("GNU.sparse.{field} out of turn"));
                }
                self.pairs.push(number()?);
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self) -> Result<Option<Sparse>, String> {
        if !self.any {
            return Ok(None);
        }
        let version = (self.major.as_deref(), self.minor.as_deref());
        let in_records = match version {
            (Some(b"1"), Some(b"0")) => false,
            (Some(b"0"), Some(b"0" | b"1")) => true,
            (None, None) if self.map.is_some() || !self.pairs.is_empty() => true,
            // Go's reader takes an unknown version for a plain file, whose data
            // would then be the packed regions: refuse rather than write that.
            _ => return Err("a PAX sparse file of an unknown version".into()),
        };
        let size = self.size.ok_or("a PAX sparse file without its real size")?;
        let map = if in_records {
            let numbers = match &self.map {
                Some(map) => std::str::from_utf8(map)
                    .map_err(|_| "a malformed sparse map".to_string())?
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(|n| {
                        n.parse::<u64>()
                            .map_err(|_| "a malformed sparse map".to_string())
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                None => self.pairs,
            };
            let regions = self
                .numblocks
                .ok_or("a sparse map without its region count")?;
            if numbers.len() % 2 != 0
                || numbers.len() as u64 > 2 * MAX_SPARSE_REGIONS
                || (numbers.len() / 2) as u64 != regions
            {
                return Err("a malformed sparse map".into());
            }
            let map: Vec<(u64, u64)> = numbers.chunks(2).map(|p| (p[0], p[1])).collect();
            check_sparse_map(&map, size)?;
            Some(map)
        } else {
            None
        };
        if !in_records && self.name.is_none() {
            return Err("a PAX 1.0 sparse file without its real name".into());
        }
        Ok(Some(Sparse {
            name: self.name,
            size,
            map,
        }))
    }
}

/// Regions must be in order, not overlap, and end inside the file.
fn check_sparse_map(map: &[(u64, u64)], real_size: u64) -> Result<(), String> {
    let mut end = 0u64;
    for &(offset, len) in map {
        end = offset
            .checked_add(len)
            .filter(|&e| offset >= end && e <= real_size)
            .ok_or_else(|| "sparse region out of order or beyond the file".to_string())?;
    }
    Ok(())
}

/// Reads the map at the start of a PAX 1.0 sparse file's data: decimal numbers,
/// one per line (the count, then offset and length of each data region), padded
/// to a 512-byte block. Regions must be in order and inside `real_size`.
fn read_sparse_map(entry: &mut impl Read, real_size: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut consumed = 0usize;
    let mut next_number = |entry: &mut dyn Read| -> Result<u64, String> {
        let mut digits = Vec::new();
        loop {
            let mut byte = [0u8];
            entry
                .read_exact(&mut byte)
                .map_err(|e| format!("sparse map: {e}"))?;
            consumed += 1;
            match byte[0] {
                b'\n' => break,
                b @ b'0'..=b'9' if digits.len() < 20 => digits.push(b),
                _ => return Err("malformed sparse map".into()),
            }
        }
        std::str::from_utf8(&digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| "malformed sparse map".to_string())
    };
    let count = next_number(entry)?;
    if count > MAX_SPARSE_REGIONS {
        return Err(format!("sparse map with {count} regions"));
    }
    let mut map = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let offset = next_number(entry)?;
        let len = next_number(entry)?;
        map.push((offset, len));
    }
    check_sparse_map(&map, real_size)?;
    let padding = (512 - consumed % 512) % 512;
    io::copy(&mut entry.take(padding as u64), &mut io::sink())
        .map_err(|e| format!("sparse map: {e}"))?;
    Ok(map)
}

/// A numeric header field; one left blank (NULs or spaces) reads as 0, as Go's
/// reader (and so containerd) takes it.
fn or_blank(parsed: io::Result<u64>, field: &[u8]) -> io::Result<u64> {
    match parsed {
        Err(_) if field.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        other => other,
    }
}

fn is_user_xattr(name: &str) -> bool {
    name.starts_with("user.")
}

fn times(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

/// A PAX time (`1700000000.123456789`, possibly negative) as a timespec.
fn parse_pax_time(text: &str) -> Option<Timespec> {
    let (secs, frac) = match text.split_once('.') {
        Some((s, f)) => (s, f),
        None => (text, ""),
    };
    let negative = secs.starts_with('-');
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: i64 = digits.parse().ok()?;
    Some(if negative && nanos > 0 {
        Timespec {
            tv_sec: secs - 1,
            tv_nsec: (1_000_000_000 - nanos) as _,
        }
    } else {
        Timespec {
            tv_sec: secs,
            tv_nsec: nanos as _,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_normalises_and_refuses_escapes() {
        let ok = |raw: &str| {
            clean(raw.as_bytes(), 4096)
                .unwrap()
                .map(|p| String::from_utf8(p.joined).unwrap())
        };
        assert_eq!(ok("./a//b/./c/"), Some("a/b/c".into()));
        assert_eq!(ok("./"), None);
        assert_eq!(ok("."), None);
        assert!(clean(b"/etc/passwd", 4096).is_err());
        assert!(clean(b"a/../../etc", 4096).is_err());
        assert!(clean(b"..", 4096).is_err());
        assert!(clean(&[b'a'; 300], 4096).is_err());
        assert!(clean(&[b'a'; 100], 50).is_err());
        let p = clean(b"x/y/z", 4096).unwrap().unwrap();
        assert_eq!(p.parent(), b"x/y");
        assert_eq!(p.base(), b"z");
        let p = clean(b"z", 4096).unwrap().unwrap();
        assert_eq!(p.parent(), b"");
    }

    #[test]
    fn pax_times_keep_nanoseconds() {
        let t = parse_pax_time("1700000000.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1_700_000_000, 500_000_000));
        let t = parse_pax_time("12").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (12, 0));
        let t = parse_pax_time("-1.25").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 750_000_000));
        assert!(parse_pax_time("1.x").is_none());
    }
}
