//! What identifies one version of a file on disk, so configuration can be re-read
//! when, and only when, it changes: a `stat` per look, no polling task.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::SystemTime;

/// Size, mtime and inode: an edit in place changes the first two, a rename over
/// (how editors and Kubernetes secret mounts replace files) the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

/// What a stat of a path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    File(Stamp),
    Missing,
    Unreadable(std::io::ErrorKind),
}

impl Seen {
    pub fn of(path: &Path) -> Seen {
        match std::fs::metadata(path) {
            Ok(m) => Seen::File(Stamp {
                len: m.len(),
                modified: m.modified().ok(),
                dev: m.dev(),
                ino: m.ino(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Seen::Missing,
            Err(e) => Seen::Unreadable(e.kind()),
        }
    }
}
