//! In-house layer unpacking: a layer blob (gzip, zstd or plain tar) is decompressed,
//! hashed (the SHA-256 of the uncompressed stream must equal the config's diff ID)
//! and extracted into a directory, the way containerd's own applier
//! (`archive.Apply` behind `Diff.Apply`) would write it into a snapshot.
//!
//! Extraction is a security boundary: we write as root into host directories, from
//! archives anybody can publish. So:
//! - every entry is resolved inside the extraction root with `openat2` and
//!   `RESOLVE_IN_ROOT`: a symlink in the layer (absolute or relative) resolves as if
//!   the root were `/`, as containerd's `fs.RootPath` does, and never leads out;
//! - the last component is never followed: it is created with `O_EXCL`/`mknodat`/
//!   `symlinkat`/`linkat`, after removing whatever the layer put there before
//!   (as containerd does), and its attributes are set through the new file or with
//!   `AT_SYMLINK_NOFOLLOW`;
//! - names that are absolute or contain `..`, hard links whose target is not in the
//!   extraction root, too many entries and too long names are refused
//!   ([`UnpackError::Hostile`]); the caller removes whatever was written.
//!
//! Layout:
//! - `mod.rs`: the entry point [`extract_layer`], decompression and diff-ID hashing.
//! - `extract.rs`: the tar walk and the filesystem writes.
//! - `whiteout.rs`: `.wh.` entries, in overlay form or as deletions.
//! - `root.rs`: the extraction root: resolving, creating parents, removing safely.
//! - `parents.rs`: attributes of directories the layer implies but does not list,
//!   copied from the parent snapshots as containerd's `mkparent` does.
//! - `stream.rs`: the tee that hands a layer's bytes from its download to its
//!   extraction as they arrive.

mod extract;
mod parents;
mod root;
mod stream;
mod whiteout;

pub use parents::copy_parent_attributes;
pub use stream::{tee, TeeReader, TeeSender};

use crate::digest::Digest;
use sha2::{Digest as _, Sha256};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// How `.wh.` entries are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// As containerd's overlay applier writes them into an upper directory: `.wh.x`
    /// becomes a character device 0/0 named `x`, `.wh..wh..opq` the xattr
    /// `trusted.overlay.opaque=y` on its directory.
    Overlay,
    /// As containerd's generic applier does on a plain directory (the first layer of
    /// an overlay chain, the `native` snapshotter): `.wh.x` deletes `x`, and
    /// `.wh..wh..opq` deletes what its directory holds that this layer did not write.
    Delete,
}

/// Bounds on what one layer may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries (of every kind) in one layer.
    pub max_entries: u64,
    /// Bytes in one entry's path or link target, after cleaning.
    pub max_path_bytes: usize,
    /// Bytes of the uncompressed stream ([`UnpackError::OverBudget`] past them);
    /// `None`: no bound. A layer read before its blob's digest is verified gets one,
    /// so that bytes nobody vouched for cannot inflate without end.
    pub max_uncompressed_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // More than any real image layer holds (a full distro is ~100k files).
            max_entries: 4 << 20,
            // PATH_MAX: the kernel refuses longer paths anyway.
            max_path_bytes: 4096,
            max_uncompressed_bytes: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub whiteouts: Whiteouts,
    pub limits: Limits,
}

/// What an extraction produced.
#[derive(Debug)]
pub struct Extracted {
    /// SHA-256 of the uncompressed stream (checked against the expected diff ID).
    pub diff_id: Digest,
    /// Uncompressed bytes read.
    pub uncompressed_bytes: u64,
    /// Tar entries processed.
    pub entries: u64,
    /// Directories created because an entry needed them but the layer did not list
    /// them, relative to the root, parents first. They get the attributes of the same
    /// directory in the parent snapshots ([`copy_parent_attributes`]).
    pub implicit_dirs: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The uncompressed layer is not what the image config promised.
    #[error(
        "layer {layer}: uncompressed digest is {actual}, but the image config says {expected}"
    )]
    DiffIdMismatch {
        layer: String,
        expected: Digest,
        actual: Digest,
    },
    /// An entry that would write outside the root, or breaks a limit.
    #[error("layer {layer}: refused entry {entry:?}: {reason}")]
    Hostile {
        layer: String,
        entry: String,
        reason: String,
    },
    /// The stream is not a well-formed (compressed) tar archive.
    #[error("layer {layer}: not a readable tar stream: {source}")]
    Corrupt {
        layer: String,
        #[source]
        source: io::Error,
    },
    /// The uncompressed stream went past [`Limits::max_uncompressed_bytes`].
    #[error("layer {layer}: more than {limit} bytes uncompressed")]
    OverBudget { layer: String, limit: u64 },
    /// Writing the tree failed (disk full, permissions, an unsupported filesystem).
    #[error("layer {layer}: {op} {path:?}: {source}")]
    Io {
        layer: String,
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Compression of a layer stream, told by its first bytes (media types lie more
/// often than magic numbers: `tar+gzip` layers that are plain tar exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    fn sniff(head: &[u8]) -> Compression {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }
}

/// Blob reads from a file: big enough that the inflater is never starved by small
/// reads. (A streamed layer needs none: its buffer is the download's chunk.)
pub const BLOB_BUFFER: usize = 1 << 20;
/// Uncompressed reads by the tar parser (headers are 512 bytes each).
const TAR_BUFFER: usize = 256 << 10;

/// Hashes everything read through it, and stops with an error past `budget` bytes.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    budget: Option<u64>,
}

impl<R> Hashing<R> {
    fn over_budget(&self) -> bool {
        self.budget.is_some_and(|budget| self.bytes > budget)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.over_budget() {
            return Err(io::Error::other("the layer is larger than its budget"));
        }
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Extracts the layer `blob` (named `layer` in errors) into `root`, an existing
/// directory that nothing else writes to meanwhile, and checks its diff ID.
///
/// On error the tree under `root` is partial: the caller removes it (a staging
/// directory) or the snapshot it belongs to. Blocking: run it on a blocking thread.
pub fn extract_layer(
    mut blob: impl BufRead,
    layer: &str,
    root: &Path,
    expected_diff_id: &Digest,
    options: &Options,
) -> Result<Extracted, UnpackError> {
    let corrupt = |source| UnpackError::Corrupt {
        layer: layer.to_string(),
        source,
    };
    let compression = Compression::sniff(blob.fill_buf().map_err(corrupt)?);
    let decoded: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(blob).map_err(corrupt)?)
        }
        Compression::None => Box::new(blob),
    };
    let hashing = Hashing {
        inner: decoded,
        hasher: Sha256::new(),
        bytes: 0,
        budget: options.limits.max_uncompressed_bytes,
    };
    let mut tar = BufReader::with_capacity(TAR_BUFFER, hashing);
    let extracted = extract::extract(&mut tar, layer, root, options).and_then(|extracted| {
        // containerd hashes the whole stream, the zero blocks after the archive's end
        // and any padding included: so do we.
        io::copy(&mut tar, &mut io::sink()).map_err(corrupt)?;
        Ok(extracted)
    });
    // Whatever the walk made of the budget's read error, it is the budget's.
    if let (Err(_), Some(limit)) = (&extracted, options.limits.max_uncompressed_bytes) {
        if tar.get_ref().over_budget() {
            return Err(UnpackError::OverBudget {
                layer: layer.to_string(),
                limit,
            });
        }
    }
    let (entries, implicit_dirs) = extracted?;
    let hashing = tar.into_inner();
    let diff_id: Digest = format!("sha256:{}", hex::encode(hashing.hasher.finalize()))
        .parse()
        .map_err(|e: crate::digest::DigestError| corrupt(io::Error::other(e.to_string())))?;
    if &diff_id != expected_diff_id {
        return Err(UnpackError::DiffIdMismatch {
            layer: layer.to_string(),
            expected: expected_diff_id.clone(),
            actual: diff_id,
        });
    }
    tracing::debug!(
        layer,
        ?compression,
        entries,
        bytes = hashing.bytes,
        "layer extracted"
    );
    Ok(Extracted {
        diff_id,
        uncompressed_bytes: hashing.bytes,
        entries,
        implicit_dirs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// A tar entry with a raw name (the `tar` builder refuses `..` and absolute ones).
    fn raw(
        tar: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        tar.append(&h, data).unwrap();
    }

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> (Vec<u8>, Digest) {
        let mut tar = tar::Builder::new(Vec::new());
        build(&mut tar);
        let bytes = tar.into_inner().unwrap();
        let digest = Digest::of(&bytes);
        (bytes, digest)
    }

    /// Extracts `tar` (a layer named "l") into `root` with default limits.
    fn extract(
        tar: &[u8],
        root: &Path,
        diff_id: &Digest,
        whiteouts: Whiteouts,
    ) -> Result<Extracted, UnpackError> {
        extract_layer(tar, "l", root, diff_id, &options(whiteouts))
    }

    fn options(whiteouts: Whiteouts) -> Options {
        Options {
            whiteouts,
            limits: Limits::default(),
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn writes_files_links_and_overlay_whiteouts() {
        let (tar, diff_id) = layer(|t| {
            raw(t, tar::EntryType::Directory, b"d/", b"", b"");
            raw(t, tar::EntryType::Regular, b"d/f", b"", b"hello");
            raw(t, tar::EntryType::Link, b"other/hl", b"d/f", b"");
            raw(t, tar::EntryType::Symlink, b"abs", b"/d", b"");
            raw(t, tar::EntryType::Regular, b"abs/through", b"", b"x");
            raw(t, tar::EntryType::Regular, b"d/.wh.gone", b"", b"");
            raw(t, tar::EntryType::Regular, b"d/.wh..wh..opq", b"", b"");
        });
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let out = extract(&gzip(&tar), root, &diff_id, Whiteouts::Overlay).unwrap();
        assert_eq!(out.diff_id, diff_id);
        assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"hello");
        assert_eq!(
            std::fs::metadata(root.join("other/hl")).unwrap().ino(),
            std::fs::metadata(root.join("d/f")).unwrap().ino()
        );
        // Written through the absolute symlink, inside the root.
        assert_eq!(std::fs::read(root.join("d/through")).unwrap(), b"x");
        let wh = std::fs::symlink_metadata(root.join("d/gone")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert_eq!(out.implicit_dirs, vec![PathBuf::from("other")]);
        assert_eq!(
            std::fs::metadata(root.join("d/f"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o644
        );
        assert_eq!(
            std::fs::metadata(root.join("d")).unwrap().mtime(),
            1_600_000_000
        );
        let mut opaque = [0u8; 4];
        let n = rustix::fs::getxattr(root.join("d"), "trusted.overlay.opaque", &mut opaque[..])
            .unwrap();
        assert_eq!(&opaque[..n], b"y");
    }

    #[test]
    fn delete_whiteouts_remove_what_the_layer_wrote_before() {
        let (tar, diff_id) = layer(|t| {
            raw(t, tar::EntryType::Regular, b"a", b"", b"1");
            raw(t, tar::EntryType::Regular, b".wh.a", b"", b"");
            raw(t, tar::EntryType::Regular, b"d/keep", b"", b"");
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/old"), b"").unwrap();
        let (tar2, diff_id2) = layer(|t| {
            raw(t, tar::EntryType::Regular, b"d/new", b"", b"");
            raw(t, tar::EntryType::Regular, b"d/.wh..wh..opq", b"", b"");
        });
        extract(&tar, dir.path(), &diff_id, Whiteouts::Delete).unwrap();
        assert!(!dir.path().join("a").exists());
        extract_layer(
            &tar2[..],
            "l2",
            dir.path(),
            &diff_id2,
            &options(Whiteouts::Delete),
        )
        .unwrap();
        assert!(dir.path().join("d/new").exists());
        assert!(!dir.path().join("d/old").exists());
        assert!(!dir.path().join("d/keep").exists());
    }

    #[test]
    fn long_name_and_pax_records_are_bounded_before_the_parser_reads_them() {
        // 5 MiB records, which the tar parser would read whole into memory: refused
        // as hostile (not a path-length or parse error found after reading them).
        for kind in [tar::EntryType::GNULongName, tar::EntryType::XHeader] {
            let (tar, diff_id) = layer(|t| {
                raw(t, kind, b"././@LongLink", b"", &vec![b'a'; 5 << 20]);
                raw(t, tar::EntryType::Regular, b"f", b"", b"x");
            });
            let dir = tempfile::tempdir().unwrap();
            let err = extract(&tar, dir.path(), &diff_id, Whiteouts::Overlay).unwrap_err();
            match err {
                UnpackError::Hostile { reason, .. } => {
                    assert!(reason.contains("PAX records"), "{kind:?}: {reason}")
                }
                other => panic!("{kind:?}: {other}"),
            }
        }
        // A directory carrying data (skipped, not read into memory) is no record.
        let (tar, diff_id) = layer(|t| {
            raw(t, tar::EntryType::Directory, b"d/", b"", &vec![0; 4 << 20]);
            raw(t, tar::EntryType::Regular, b"d/f", b"", b"x");
        });
        let dir = tempfile::tempdir().unwrap();
        extract(&tar, dir.path(), &diff_id, Whiteouts::Overlay).unwrap();
        assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), b"x");
    }

    #[test]
    fn a_stream_past_its_budget_is_over_budget_wherever_it_stops() {
        let (tar, diff_id) = layer(|t| {
            raw(t, tar::EntryType::Regular, b"big", b"", &vec![7; 1 << 20]);
        });
        let total = tar.len() as u64;
        // In the middle of a file, in the zero blocks after the archive, and not at
        // all when the budget is the stream's size.
        for (budget, over) in [(512 << 10, true), (total - 100, true), (total, false)] {
            let dir = tempfile::tempdir().unwrap();
            let mut options = options(Whiteouts::Overlay);
            options.limits.max_uncompressed_bytes = Some(budget);
            let result = extract_layer(&tar[..], "l", dir.path(), &diff_id, &options);
            match result {
                Err(UnpackError::OverBudget { limit, .. }) if over => assert_eq!(limit, budget),
                Ok(extracted) if !over => assert_eq!(extracted.uncompressed_bytes, total),
                other => panic!("budget {budget}: {other:?}"),
            }
        }
    }

    #[test]
    fn hostile_entries_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"safe").unwrap();
        type Build = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;
        let cases: Vec<(&str, Build)> = vec![
            (
                "dotdot",
                Box::new(|t| raw(t, tar::EntryType::Regular, b"a/../../x", b"", b"x")),
            ),
            (
                "absolute",
                Box::new(|t| raw(t, tar::EntryType::Regular, b"/x", b"", b"x")),
            ),
            (
                "hard link out",
                Box::new(|t| raw(t, tar::EntryType::Link, b"h", b"../../../etc/passwd", b"")),
            ),
            (
                "hard link absent",
                Box::new(|t| raw(t, tar::EntryType::Link, b"h", b"etc/passwd", b"")),
            ),
        ];
        for (what, build) in cases {
            let (tar, diff_id) = layer(build);
            let dir = tempfile::tempdir().unwrap();
            let err = extract(&tar, dir.path(), &diff_id, Whiteouts::Overlay).unwrap_err();
            assert!(matches!(err, UnpackError::Hostile { .. }), "{what}: {err}");
        }
        // A symlink to the host path, then a file through it: lands inside the root.
        let target = victim.to_str().unwrap().as_bytes().to_vec();
        let (tar, diff_id) = layer(|t| {
            raw(
                t,
                tar::EntryType::Symlink,
                b"link",
                outside.path().to_str().unwrap().as_bytes(),
                b"",
            );
            raw(t, tar::EntryType::Regular, b"link/victim", b"", b"owned");
            raw(t, tar::EntryType::Symlink, b"up", b"../../../../..", b"");
            raw(t, tar::EntryType::Regular, b"up/escaped", b"", b"owned");
        });
        let dir = tempfile::tempdir().unwrap();
        extract(&tar, dir.path(), &diff_id, Whiteouts::Overlay).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"safe");
        assert!(dir
            .path()
            .join(String::from_utf8(target).unwrap().trim_start_matches('/'))
            .exists());
        assert!(dir.path().join("escaped").exists());
    }

    #[test]
    fn a_wrong_diff_id_is_an_error() {
        let (tar, _) = layer(|t| raw(t, tar::EntryType::Regular, b"f", b"", b"x"));
        let dir = tempfile::tempdir().unwrap();
        let wrong = Digest::of(b"something else");
        let err = extract(&tar, dir.path(), &wrong, Whiteouts::Overlay).unwrap_err();
        assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
    }

    #[test]
    fn zstd_layers_and_the_entry_limit() {
        let (tar, diff_id) = layer(|t| {
            for i in 0..10 {
                raw(
                    t,
                    tar::EntryType::Regular,
                    format!("f{i}").as_bytes(),
                    b"",
                    b"x",
                );
            }
        });
        let compressed = zstd::encode_all(&tar[..], 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        extract(&compressed, dir.path(), &diff_id, Whiteouts::Overlay).unwrap();
        assert!(dir.path().join("f9").exists());
        let dir = tempfile::tempdir().unwrap();
        let mut tight = options(Whiteouts::Overlay);
        tight.limits.max_entries = 5;
        let err = extract_layer(&compressed[..], "l", dir.path(), &diff_id, &tight).unwrap_err();
        assert!(matches!(err, UnpackError::Hostile { .. }), "{err}");
    }
}
