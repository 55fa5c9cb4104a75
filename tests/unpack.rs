//! In-house unpacking (`[pull] unpack = "auto"`) against containerd's own
//! `Diff.Apply`, on a real containerd 1.6 with the overlayfs snapshotter.
//!
//! A corpus of tricky layers is applied twice, into two namespaces of the same
//! containerd: once by `Diff.Apply` (`unpack = "containerd"`), once by us. Every
//! snapshot directory is then compared tree for tree: type, mode, owner, size,
//! content hash, link target, rdev, xattrs and mtime must be equal (an mtime the
//! clock chose during the apply, as for a whiteout device, only has to be recent on
//! both sides). Hostile layers are refused and leave nothing. Last, an image pulled
//! by the daemon with in-house unpacking runs under containerd, and containerd's
//! own CRI pulling it afterwards reuses our snapshots.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::containerd::{Containerd, ContainerdOptions};
use common::cri::DaemonConfig;
use common::images;
use common::registry::Registry;
use common::scenario::{cri_pull, pull_ok, start};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{RemoveSnapshotRequest, ViewSnapshotRequest};
use cri_imaged::digest::Digest;
use cri_imaged::oci::Descriptor;
use cri_imaged::store::{
    ContainerdStore, ImageStore, Ingest, Labels, Lease, StoreError, UnpackMode,
};
use cri_imaged::unpack::UnpackError;
use sha2::Digest as _;

const SNAPSHOTTER: &str = "overlayfs";
const REF_NS: &str = "unpack-containerd";
const OURS_NS: &str = "unpack-ours";

#[derive(Clone, Copy, Debug)]
enum Compress {
    Gzip,
    Zstd,
    None,
}

/// One layer as a registry would serve it.
struct Layer {
    blob: Vec<u8>,
    media_type: &'static str,
    diff_id: Digest,
}

fn compress(tar: Vec<u8>, how: Compress) -> Layer {
    let diff_id = Digest::of(&tar);
    let (blob, media_type) = match how {
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            (
                e.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compress::Zstd => (
            zstd::encode_all(&tar[..], 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        Compress::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
    };
    Layer {
        blob,
        media_type,
        diff_id,
    }
}

/// Builds a tar layer entry by entry.
struct TarBuilder {
    tar: tar::Builder<Vec<u8>>,
}

/// One entry's header fields.
struct Entry<'a> {
    path: &'a str,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: &'a [u8],
    link: Option<&'a str>,
    dev: (u32, u32),
    pax: Vec<(String, Vec<u8>)>,
}

impl<'a> Entry<'a> {
    fn new(path: &'a str, kind: tar::EntryType) -> Entry<'a> {
        Entry {
            path,
            kind,
            mode: if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            },
            uid: 0,
            gid: 0,
            mtime: 1_500_000_000,
            data: b"",
            link: None,
            dev: (0, 0),
            pax: Vec::new(),
        }
    }
    fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    fn data(mut self, data: &'a [u8]) -> Self {
        self.data = data;
        self
    }
    fn link(mut self, target: &'a str) -> Self {
        self.link = Some(target);
        self
    }
    fn dev(mut self, major: u32, minor: u32) -> Self {
        self.dev = (major, minor);
        self
    }
    fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
    fn pax(mut self, key: &str, value: &[u8]) -> Self {
        self.pax.push((key.to_owned(), value.to_vec()));
        self
    }
    fn xattr(self, name: &str, value: &[u8]) -> Self {
        self.pax(&format!("SCHILY.xattr.{name}"), value)
    }
}

fn file(path: &str) -> Entry<'_> {
    Entry::new(path, tar::EntryType::Regular)
}
fn dir(path: &str) -> Entry<'_> {
    Entry::new(path, tar::EntryType::Directory)
}
fn symlink<'a>(path: &'a str, target: &'a str) -> Entry<'a> {
    Entry::new(path, tar::EntryType::Symlink)
        .link(target)
        .mode(0o777)
}
fn hardlink<'a>(path: &'a str, target: &'a str) -> Entry<'a> {
    Entry::new(path, tar::EntryType::Link).link(target)
}
fn whiteout(path: &str) -> Entry<'_> {
    Entry::new(path, tar::EntryType::Regular).mode(0o600)
}

impl TarBuilder {
    fn new() -> TarBuilder {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Complete);
        TarBuilder { tar }
    }

    fn add(&mut self, e: Entry<'_>) -> &mut Self {
        if !e.pax.is_empty() {
            self.tar
                .append_pax_extensions(e.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(e.data.len() as u64);
        if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        match e.link {
            // Long names and link targets become GNU 'L'/'K' entries.
            Some(target) => self.tar.append_link(&mut h, e.path, target).unwrap(),
            None => self.tar.append_data(&mut h, e.path, e.data).unwrap(),
        }
        self
    }

    /// A PAX `path` record instead of a GNU long name (what Go writes).
    fn add_pax_long(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.tar
            .append_pax_extensions([("path", path.as_bytes())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o640);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_400_000_000);
        h.set_size(data.len() as u64);
        h.as_ustar_mut().unwrap().name[..9].copy_from_slice(b"truncated");
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }
}

/// `security.capability` v2: cap_net_bind_service, effective.
const CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The base layer: every kind of entry and attribute.
fn base_layer(tag: &str) -> Vec<u8> {
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "n".repeat(150));
    let long_target = format!("/{}", "t".repeat(300));
    let pax_long = format!("pax/{}", "p".repeat(200));
    let mut t = TarBuilder::new();
    t.add(dir("./"))
        .add(file("tag").data(tag.as_bytes()))
        .add(dir("etc").mode(0o755))
        .add(file("etc/passwd").data(b"root:x:0:0::/root:/bin/sh\n"))
        .add(dir("bin").mode(0o755).mtime(1_000_000_001))
        .add(file("bin/suid").mode(0o4755).data(b"#!suid"))
        .add(file("bin/sgid").mode(0o2711).data(b"#!sgid"))
        .add(
            file("bin/ping")
                .mode(0o755)
                .data(b"ping")
                .xattr("security.capability", &CAPABILITY),
        )
        .add(dir("tmp").mode(0o1777))
        .add(dir("srv").mode(0o2775).owner(100000, 200000))
        .add(file("srv/big-ids").owner(3_000_000, 4_000_000).data(b"ids"))
        .add(
            file("srv/nanos")
                .pax("mtime", b"1600000000.123456789")
                .data(b"n"),
        )
        .add(
            file("srv/xattrs")
                .xattr("user.note", b"hello")
                .xattr("trusted.t", b"tv"),
        )
        .add(file("srv/xattr-nul").xattr("user.nul", b"\x00\x01"))
        .add(
            dir("xdir")
                .xattr("user.dir", b"d")
                .xattr("trusted.overlay.custom", b"x"),
        )
        .add(symlink("lib", "usr/lib"))
        .add(symlink("abs", "/etc/passwd"))
        .add(symlink("dangling", "../../nowhere"))
        .add(dir("usr"))
        .add(dir("usr/lib"))
        .add(file("usr/lib/libc.so").data(&[7u8; 70_000]))
        .add(hardlink("bin/link-to-lib", "usr/lib/libc.so"))
        .add(Entry::new("dev-fifo", tar::EntryType::Fifo).mode(0o620))
        .add(
            Entry::new("dev-null", tar::EntryType::Char)
                .dev(1, 3)
                .mode(0o666),
        )
        .add(
            Entry::new("dev-loop", tar::EntryType::Block)
                .dev(7, 0)
                .mode(0o660),
        )
        .add(file(&long_name).data(b"gnu long name"))
        .add(symlink("long-link", &long_target))
        .add(hardlink("long-hardlink", &long_name))
        .add_pax_long(&pax_long, b"pax long name")
        // No directory entries for these: created implicitly.
        .add(file("implicit/a/b/file").data(b"deep"))
        .add(dir("replaced"))
        .add(file("replaced/child"))
        .add(dir("gone-dir"))
        .add(file("gone-dir/x"))
        .add(file("gone-file"))
        .add(dir("opaque").mode(0o700))
        .add(file("opaque/old"))
        .add(dir("keep"))
        .add(file("keep/f"));
    t.finish()
}

/// The second layer: whiteouts, opaque directories, replacements, links.
fn upper_layer() -> Vec<u8> {
    let mut t = TarBuilder::new();
    t.add(whiteout(".wh.gone-dir"))
        .add(whiteout(".wh.gone-file").owner(1000, 1000))
        .add(dir("opaque").mode(0o750))
        .add(whiteout("opaque/.wh..wh..opq"))
        .add(file("opaque/new").data(b"new"))
        // A directory replaced by a file and a file by a directory.
        .add(file("replaced").data(b"now a file"))
        .add(dir("tag"))
        .add(file("tag/inside"))
        // Implied parents that exist below: they take the lower directories'
        // attributes (srv is 2775 and owned by 100000:200000; xdir has xattrs).
        .add(file("srv/sub/new").data(b"under srv"))
        .add(whiteout("xdir/.wh..wh..opq"))
        .add(file("bin/added").mode(0o700))
        // A whiteout in a directory the layer does not list.
        .add(whiteout("usr/lib/.wh.libc.so"))
        // Hard links within this layer, across directories.
        .add(file("h/one").data(b"linked"))
        .add(hardlink("other/two", "h/one"))
        // A symlink, then a file written through it: stays in the snapshot.
        .add(symlink("escape", "/"))
        .add(file("escape/etc/through-link").data(b"inside"))
        .add(symlink("up", "../../../../.."))
        .add(file("up/through-up").data(b"inside too"));
    t.finish()
}

/// The third layer: the file replaced back by a directory, an opaque directory made
/// again, and a whiteout of something whited out already.
fn third_layer() -> Vec<u8> {
    let mut t = TarBuilder::new();
    t.add(dir("replaced").mode(0o711))
        .add(file("replaced/back"))
        .add(whiteout(".wh.tag"))
        .add(whiteout("keep/.wh.f"))
        .add(file("keep/g").mode(0o600));
    t.finish()
}

fn empty_layer() -> Vec<u8> {
    TarBuilder::new().finish()
}

/// A layer made by GNU tar with a sparse file: `format` `posix` writes PAX sparse
/// 1.0 (which Go's reader, and so containerd, expands), `gnu` the old type 'S'
/// (which containerd refuses: "unhandled tar header type 83").
/// A layer holding one 16 MiB sparse file, archived by GNU tar as `format`
/// (`posix`: PAX sparse records; `gnu`: old GNU sparse entries), with `extra` tar
/// options (e.g. `--sparse-version=0.1`).
fn sparse_layer(format: &str, extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(16 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(b"head", 0).unwrap();
    f.write_at(b"middle", 5 << 20).unwrap();
    f.write_at(b"tail", (16 << 20) - 4).unwrap();
    drop(f);
    let out = std::process::Command::new("tar")
        .arg(format!("--format={format}"))
        .args(["--sparse", "--numeric-owner", "--mtime=@1400000000"])
        .args(extra)
        .arg("-C")
        .arg(dir.path())
        .args(["-cf", "-", "sparse"])
        .output()
        .expect("GNU tar is needed to build a sparse layer (apt-get install tar)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Containerd without its CRI (the store needs only the core services).
fn start_containerd() -> Containerd {
    Containerd::start_with(ContainerdOptions {
        cri: false,
        ..ContainerdOptions::default()
    })
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

async fn put_blob(store: &ContainerdStore, lease: &Lease, layer: &Layer) -> Descriptor {
    let desc = Descriptor::new(
        layer.media_type,
        Digest::of(&layer.blob),
        layer.blob.len() as u64,
    );
    let reference = format!("layer-{}", desc.digest.hex());
    match store.open_writer(lease, &reference, &desc).await.unwrap() {
        Ingest::Present => {}
        Ingest::Writer(mut w) => {
            w.write(layer.blob.clone().into()).await.unwrap();
            let mut labels = Labels::new();
            labels.insert(
                "containerd.io/uncompressed".into(),
                layer.diff_id.to_string(),
            );
            w.commit(labels).await.unwrap();
        }
    }
    desc
}

fn chain_ids(layers: &[Layer]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::new();
    for layer in layers {
        let next = match out.last() {
            None => layer.diff_id.clone(),
            Some(prev) => Digest::of(format!("{prev} {}", layer.diff_id).as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Applies `layers` in order; returns the chain IDs.
async fn apply_chain(
    store: &ContainerdStore,
    lease: &Lease,
    layers: &[Layer],
) -> Result<Vec<Digest>, StoreError> {
    apply_chain_in(store, lease, layers, SNAPSHOTTER).await
}

async fn apply_chain_in(
    store: &ContainerdStore,
    lease: &Lease,
    layers: &[Layer],
    snapshotter: &str,
) -> Result<Vec<Digest>, StoreError> {
    let chains = chain_ids(layers);
    let mut parent: Option<&Digest> = None;
    for (layer, chain) in layers.iter().zip(&chains) {
        let desc = put_blob(store, lease, layer).await;
        store
            .apply_layer(lease, snapshotter, &desc, &layer.diff_id, parent, chain)
            .await?;
        parent = Some(chain);
    }
    Ok(chains)
}

/// The directory of committed snapshot `chain` (through a view: the first lower
/// directory, or the bind source of a single-layer view). The view is removed on
/// the next call with the same key.
async fn snapshot_dir(containerd: &Containerd, namespace: &str, chain: &Digest) -> PathBuf {
    snapshot_dir_in(containerd, namespace, chain, SNAPSHOTTER).await
}

/// For `native`, a view is a copy of the whole tree (what a container would see).
async fn snapshot_dir_in(
    containerd: &Containerd,
    namespace: &str,
    chain: &Digest,
    snapshotter: &str,
) -> PathBuf {
    let mut client = SnapshotsClient::new(common::cri::channel(containerd.socket()).await);
    let key = format!("view-{}", &chain.hex()[..12]);
    let mut request = tonic::Request::new(RemoveSnapshotRequest {
        snapshotter: snapshotter.into(),
        key: key.clone(),
    });
    request
        .metadata_mut()
        .insert("containerd-namespace", namespace.parse().unwrap());
    let _ = client.remove(request).await;
    let mut request = tonic::Request::new(ViewSnapshotRequest {
        snapshotter: snapshotter.into(),
        key,
        parent: chain.to_string(),
        labels: Default::default(),
    });
    request
        .metadata_mut()
        .insert("containerd-namespace", namespace.parse().unwrap());
    let mounts = client.view(request).await.unwrap().into_inner().mounts;
    let mount = &mounts[0];
    match mount.r#type.as_str() {
        "bind" => PathBuf::from(&mount.source),
        "overlay" => {
            let lower = mount
                .options
                .iter()
                .find_map(|o| o.strip_prefix("lowerdir="))
                .expect("lowerdir");
            PathBuf::from(lower.split(':').next().unwrap())
        }
        other => panic!("unexpected view mount {other}: {mount:?}"),
    }
}

/// What is compared of one file.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Regular files and symlinks.
    size: Option<u64>,
    sha256: Option<String>,
    link: Option<PathBuf>,
    rdev: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// Not compared directly: see [`assert_same_tree`].
    mtime: (i64, i64),
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 64 << 10];
    let n = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 64 << 10];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..]).unwrap();
        out.insert(
            String::from_utf8_lossy(name).into_owned(),
            value[..len].to_vec(),
        );
    }
    out
}

fn walk(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let node = Node {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: (ft.is_file() || ft.is_symlink()).then_some(meta.len()),
            sha256: ft
                .is_file()
                .then(|| hex::encode(sha2::Sha256::digest(std::fs::read(&path).unwrap()))),
            link: ft.is_symlink().then(|| std::fs::read_link(&path).unwrap()),
            rdev: meta.rdev(),
            xattrs: xattrs(&path),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        };
        if ft.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
        out.insert(path.strip_prefix(root).unwrap().to_path_buf(), node);
    }
    out
}

/// Equal trees; an mtime must be equal too, unless the clock set it during the
/// apply on both sides (whiteout devices, implied directories, the root).
fn assert_same_tree(theirs: &Path, ours: &Path, since: i64, what: &str) {
    let a = walk(theirs);
    let b = walk(ours);
    let names_a: Vec<_> = a.keys().collect();
    let names_b: Vec<_> = b.keys().collect();
    assert_eq!(
        names_a, names_b,
        "{what}: different entries (containerd's, then ours)"
    );
    for (path, x) in &a {
        let y = &b[path];
        let recent = |n: &Node| n.mtime.0 >= since;
        let same_time = x.mtime == y.mtime || (recent(x) && recent(y));
        assert!(
            x.kind == y.kind
                && x.mode == y.mode
                && x.uid == y.uid
                && x.gid == y.gid
                && x.size == y.size
                && x.sha256 == y.sha256
                && x.link == y.link
                && x.rdev == y.rdev
                && x.xattrs == y.xattrs
                && same_time,
            "{what}: {} differs\ncontainerd: {x:?}\nours:       {y:?}",
            path.display()
        );
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Pair {
    containerd: Containerd,
    snapshotter: &'static str,
    theirs: ContainerdStore,
    ours: ContainerdStore,
    lease_theirs: Lease,
    lease_ours: Lease,
}

async fn pair() -> Pair {
    pair_in(SNAPSHOTTER).await
}

async fn pair_in(snapshotter: &'static str) -> Pair {
    init_tracing();
    let containerd = start_containerd();
    let theirs = ContainerdStore::connect(&containerd.address(), REF_NS)
        .unwrap()
        .with_unpack(UnpackMode::Containerd);
    let ours = ContainerdStore::connect(&containerd.address(), OURS_NS)
        .unwrap()
        .with_unpack(UnpackMode::Auto);
    let lease_theirs = theirs
        .create_lease(Duration::from_secs(3600))
        .await
        .unwrap();
    let lease_ours = ours.create_lease(Duration::from_secs(3600)).await.unwrap();
    Pair {
        containerd,
        snapshotter,
        theirs,
        ours,
        lease_theirs,
        lease_ours,
    }
}

/// Applies the chain both ways and compares every snapshot of it.
async fn assert_both_unpack_the_same(p: &Pair, layers: &[Layer], what: &str) {
    let since = now() - 1;
    let chains = apply_chain_in(&p.theirs, &p.lease_theirs, layers, p.snapshotter)
        .await
        .unwrap_or_else(|e| panic!("{what}: Diff.Apply: {e}"));
    let ours = apply_chain_in(&p.ours, &p.lease_ours, layers, p.snapshotter)
        .await
        .unwrap_or_else(|e| panic!("{what}: in-house: {e}"));
    assert_eq!(chains, ours);
    for (i, chain) in chains.iter().enumerate() {
        let a = snapshot_dir_in(&p.containerd, REF_NS, chain, p.snapshotter).await;
        let b = snapshot_dir_in(&p.containerd, OURS_NS, chain, p.snapshotter).await;
        assert_ne!(a, b);
        assert_same_tree(&a, &b, since, &format!("{what}, layer {i}"));
    }
}

/// The staging directory of whoever unpacks in-house: this test process, or the
/// daemon with PID `pid`.
fn staging_dir_of(containerd: &Containerd, pid: u32) -> PathBuf {
    containerd
        .root()
        .join("io.containerd.snapshotter.v1.overlayfs")
        .join("cri-imaged-unpack")
        .join(pid.to_string())
}

fn staging_dir(containerd: &Containerd) -> PathBuf {
    staging_dir_of(containerd, std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricky_layers_unpack_exactly_as_diff_apply_does() {
    let p = pair().await;
    for how in [Compress::Gzip, Compress::Zstd, Compress::None] {
        let tag = format!("{how:?}");
        let layers = vec![
            compress(base_layer(&tag), how),
            compress(upper_layer(), how),
            compress(third_layer(), how),
            compress(empty_layer(), how),
        ];
        assert_both_unpack_the_same(&p, &layers, &tag).await;
    }
    // In-house unpacking really ran: it staged beside the snapshots, and left nothing.
    let staging = staging_dir(&p.containerd);
    assert!(staging.is_dir(), "{}", staging.display());
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
}

/// The `native` snapshotter: each snapshot starts as a copy of its parent and
/// whiteouts delete from it. Compared as whole trees (views are copies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_snapshots_unpack_as_diff_apply_does() {
    let p = pair_in("native").await;
    let layers = vec![
        compress(base_layer("native"), Compress::Gzip),
        compress(upper_layer(), Compress::Zstd),
        compress(third_layer(), Compress::None),
    ];
    assert_both_unpack_the_same(&p, &layers, "native").await;
    // In-house unpacking really ran for native: only our extractor answers a hostile
    // layer with its own typed error (Diff.Apply's would be a gRPC one).
    let hostile_layer = vec![compress(
        hostile(tar::EntryType::Regular, "a/../../escape", ""),
        Compress::Gzip,
    )];
    let err = apply_chain_in(&p.ours, &p.lease_ours, &hostile_layer, "native")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unpack(UnpackError::Hostile { .. })),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_files_and_layers_that_start_empty_unpack_as_diff_apply_does() {
    let p = pair().await;
    let layers = vec![
        compress(empty_layer(), Compress::Gzip),
        compress(sparse_layer("posix", &[]), Compress::Gzip),
        compress(base_layer("on-empty"), Compress::Zstd),
    ];
    assert_both_unpack_the_same(&p, &layers, "sparse").await;
    // The older PAX sparse versions, whose maps are in the records.
    for version in ["0.0", "0.1"] {
        let option = format!("--sparse-version={version}");
        let layer = vec![compress(sparse_layer("posix", &[&option]), Compress::Gzip)];
        assert_both_unpack_the_same(&p, &layer, &format!("sparse {version}")).await;
    }
    let chains = chain_ids(&layers);
    let dir = snapshot_dir(&p.containerd, OURS_NS, &chains[1]).await;
    let meta = std::fs::metadata(dir.join("sparse")).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "written sparse: {} blocks",
        meta.blocks()
    );

    // Old GNU sparse entries: containerd refuses them, and so do we.
    let old = vec![compress(sparse_layer("gnu", &[]), Compress::Gzip)];
    let theirs = apply_chain(&p.theirs, &p.lease_theirs, &old).await;
    assert!(
        theirs.is_err(),
        "containerd applied an old GNU sparse entry"
    );
    let ours = apply_chain(&p.ours, &p.lease_ours, &old).await.unwrap_err();
    assert!(
        matches!(ours, StoreError::Unpack(UnpackError::Hostile { .. })),
        "{ours}"
    );
}

/// A layer of one PAX sparse file `f` described by `records` (`GNU.sparse.*`),
/// whose archived data is `data`.
fn pax_sparse(records: &[(&str, &str)], data: &[u8]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    t.append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("f").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_400_000_000);
    h.set_cksum();
    t.append(&h, data).unwrap();
    t.into_inner().unwrap()
}

/// Sparse maps that Go's reader (containerd's) refuses are refused here too; the
/// same file with a well-formed map unpacks the same on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pax_sparse_maps_are_refused_as_containerd_refuses_them() {
    let p = pair().await;
    let v01 = [("GNU.sparse.major", "0"), ("GNU.sparse.minor", "1")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut records = v01.to_vec();
        records.push(("GNU.sparse.size", "16"));
        records.extend_from_slice(extra);
        records
    };
    let good = vec![compress(
        pax_sparse(
            &with(&[
                ("GNU.sparse.numblocks", "2"),
                ("GNU.sparse.map", "0,4,12,4"),
            ]),
            b"headtail",
        ),
        Compress::Gzip,
    )];
    assert_both_unpack_the_same(&p, &good, "well-formed 0.1 sparse map").await;

    let cases = [
        (
            "data longer than the map",
            pax_sparse(
                &with(&[("GNU.sparse.numblocks", "1"), ("GNU.sparse.map", "0,4")]),
                b"headtail",
            ),
        ),
        (
            "a map without its region count",
            pax_sparse(&with(&[("GNU.sparse.map", "0,4,12,4")]), b"headtail"),
        ),
        (
            "a map of another region count",
            pax_sparse(
                &with(&[
                    ("GNU.sparse.numblocks", "1"),
                    ("GNU.sparse.map", "0,4,12,4"),
                ]),
                b"headtail",
            ),
        ),
        (
            "0.0 records out of turn",
            pax_sparse(
                &[
                    ("GNU.sparse.major", "0"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.size", "16"),
                    ("GNU.sparse.numblocks", "2"),
                    ("GNU.sparse.offset", "0"),
                    ("GNU.sparse.offset", "12"),
                    ("GNU.sparse.numbytes", "4"),
                    ("GNU.sparse.numbytes", "4"),
                ],
                b"headtail",
            ),
        ),
    ];
    for (what, tar) in cases {
        let layers = vec![compress(tar, Compress::Gzip)];
        let theirs = apply_chain(&p.theirs, &p.lease_theirs, &layers).await;
        assert!(theirs.is_err(), "containerd applied: {what}");
        let ours = apply_chain(&p.ours, &p.lease_ours, &layers)
            .await
            .expect_err(what);
        assert!(
            matches!(ours, StoreError::Unpack(UnpackError::Hostile { .. })),
            "{what}: {ours}"
        );
    }
}

/// A layer with one raw entry (the tar builder refuses these names).
fn hostile(kind: tar::EntryType, name: &str, link: &str) -> Vec<u8> {
    let mut t = TarBuilder::new();
    t.add(file("innocent").data(b"x"));
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(1);
    h.set_cksum();
    t.tar.append(&h, &b"!"[..]).unwrap();
    t.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_are_refused_and_leave_nothing() {
    let p = pair().await;
    let cases = [
        (
            "dot-dot",
            hostile(tar::EntryType::Regular, "a/../../escape", ""),
        ),
        (
            "absolute",
            hostile(tar::EntryType::Regular, "/etc/escape", ""),
        ),
        (
            "hard link out",
            hostile(tar::EntryType::Link, "h", "../../../../etc/passwd"),
        ),
        (
            "hard link to nothing",
            hostile(tar::EntryType::Link, "h", "etc/shadow"),
        ),
        (
            "hard link absolute",
            hostile(tar::EntryType::Link, "h", "/etc/passwd"),
        ),
    ];
    let base = compress(base_layer("hostile-base"), Compress::Gzip);
    for (what, tar) in cases {
        for (first, layers) in [
            (true, vec![compress(tar.clone(), Compress::Gzip)]),
            (
                false,
                vec![base.clone_layer(), compress(tar, Compress::Gzip)],
            ),
        ] {
            let chains = chain_ids(&layers);
            let err = apply_chain(&p.ours, &p.lease_ours, &layers)
                .await
                .expect_err(what);
            assert!(
                matches!(err, StoreError::Unpack(UnpackError::Hostile { .. })),
                "{what} (first layer: {first}): {err}"
            );
            assert!(
                !p.ours
                    .snapshot_exists(SNAPSHOTTER, chains.last().unwrap())
                    .await
                    .unwrap(),
                "{what}: committed"
            );
        }
    }
    // A layer whose content is not the config's diff ID: DataLoss's error, no snapshot.
    let mut wrong = compress(upper_layer(), Compress::Gzip);
    wrong.diff_id = Digest::of(b"not this layer");
    let err = apply_chain(&p.ours, &p.lease_ours, &[wrong])
        .await
        .expect_err("diff ID mismatch");
    assert!(
        matches!(err, StoreError::Unpack(UnpackError::DiffIdMismatch { .. })),
        "{err}"
    );
    // Nothing staged, no extraction snapshot left, nothing written outside.
    assert_eq!(
        std::fs::read_dir(staging_dir(&p.containerd))
            .unwrap()
            .count(),
        0
    );
    let active = p.containerd.ctr_ok(&[
        "-n",
        OURS_NS,
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "ls",
    ]);
    assert!(!active.contains("extract-"), "{active}");
    assert!(!Path::new("/etc/escape").exists());
}

impl Layer {
    fn clone_layer(&self) -> Layer {
        Layer {
            blob: self.blob.clone(),
            media_type: self.media_type,
            diff_id: self.diff_id.clone(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpacked_in_house_runs_and_containerds_cri_reuses_the_snapshots() {
    let (containerd, registry) = start(Registry::open);
    let text = "unpacked by cri-imaged\n";
    let pushed = images::busybox()
        .app_text(text)
        .build()
        .push(&registry, "unpack/busybox");
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .unpack("auto")
        .env("RUST_LOG", "cri_imaged=debug")
        .start();
    pull_ok(&daemon, &pushed.reference, None).await;
    let log = daemon.log();
    assert!(log.contains("unpacking layers in-house"), "{log}");
    // Every layer was extracted from its download as it arrived, not read back.
    for layer in &pushed.manifests[0].layers {
        assert!(
            log.contains(&common::cri::staged_line(&layer.digest, true)),
            "{}: {log}",
            layer.digest
        );
    }
    assert!(containerd.is_unpacked(&pushed.reference));
    let created = |key: &str| {
        let info: serde_json::Value = serde_json::from_str(&containerd.ctr_ok(&[
            "snapshots",
            "--snapshotter",
            containerd.snapshotter(),
            "info",
            key,
        ]))
        .unwrap();
        info["Created"].as_str().unwrap_or_default().to_owned()
    };
    let chains = common::records::chain_ids(&pushed.manifests[0].diff_ids);
    // Committed with the label containerd's unpacker commits with.
    for chain in &chains {
        let info: serde_json::Value = serde_json::from_str(&containerd.ctr_ok(&[
            "snapshots",
            "--snapshotter",
            containerd.snapshotter(),
            "info",
            chain,
        ]))
        .unwrap();
        assert_eq!(
            info["Labels"]["containerd.io/snapshot.ref"].as_str(),
            Some(chain.as_str()),
            "{info}"
        );
    }
    let before: Vec<String> = chains.iter().map(|c| created(c)).collect();
    let keys_before = containerd.snapshot_keys();

    let out = containerd.run_ok(&pushed.reference, &["cat", "/app/hello.txt"]);
    assert_eq!(out, text);

    // containerd's own CRI pulls the same image: it finds every snapshot committed
    // and unpacks nothing.
    cri_pull(containerd.socket(), &pushed.reference, None)
        .await
        .unwrap_or_else(|s| panic!("containerd's CRI pull: {s}\n{}", containerd.log()));
    let after: Vec<String> = chains.iter().map(|c| created(c)).collect();
    assert_eq!(before, after, "containerd re-created snapshots");
    let mut keys_after = containerd.snapshot_keys();
    keys_after.retain(|k| !k.starts_with("run-"));
    assert_eq!(keys_before, keys_after);
}

/// A config whose last diff ID is not its layer's: the pull fails with DataLoss
/// naming the layer and leaves nothing, with in-house unpacking and with
/// `Diff.Apply`; the staging directory is empty again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_diff_id_fails_the_pull_with_data_loss_and_leaves_nothing() {
    use common::fake_registry::FakeRegistry;
    use common::images::MEDIA_MANIFEST;
    use common::leftovers::assert_nothing_left;
    use tonic::Code;

    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    fake.serve_image(&image, "unpack/wrong");
    let host = image.host();
    let config_bytes = fake.blob(&host.config.digest).expect("config blob");
    let mut config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array_mut().unwrap();
    let last = diff_ids.len() - 1;
    diff_ids[last] = serde_json::json!(Digest::of(b"not the layer").to_string());
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_size = config_bytes.len();
    let config_digest = fake.put_blob(config_bytes);
    let manifest_bytes = fake.blob(&host.manifest.digest).expect("manifest blob");
    let mut manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    manifest["config"]["digest"] = serde_json::json!(config_digest);
    manifest["config"]["size"] = serde_json::json!(config_size);
    let bad_layer = manifest["layers"][last]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    fake.put_manifest(
        "unpack/wrong",
        "wrong-diff-id",
        MEDIA_MANIFEST,
        serde_json::to_vec(&manifest).unwrap(),
    );
    let reference = format!("{}/unpack/wrong:wrong-diff-id", fake.host());

    for mode in ["auto", "containerd"] {
        let containerd = common::scenario::containerd_without_cri();
        let daemon = DaemonConfig::new(&containerd)
            .registries_conf(&fake.insecure_entry())
            .unpack(mode)
            .start();
        let status = common::scenario::pull_fails(
            &daemon,
            common::cri::pull_request(&reference, None),
            Code::DataLoss,
        )
        .await;
        if mode == "auto" {
            assert!(
                status.message().contains(&bad_layer),
                "{mode}: {}",
                status.message()
            );
            let staging = staging_dir_of(&containerd, daemon.pid());
            assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
        }
        assert_nothing_left(&containerd, &[], &format!("a wrong diff ID ({mode})"));
    }
}

/// A layer read from its download is not yet verified, so it may inflate only so
/// far (32 times its compressed size, at least 64 MiB) before the pull stops
/// streaming it and extracts the verified blob from the content store instead:
/// 80 MiB of zeros in a layer of about 100 KB is unpacked that way, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_inflating_past_its_streaming_budget_is_extracted_from_the_stored_blob() {
    const MIB: u64 = 80;
    let (containerd, registry) = start(Registry::open);
    let pushed = images::zeros_image(MIB as usize, "zeros").push(&registry, "unpack/zeros");
    let layer = &pushed.manifests[0].layers[0];
    assert!(
        layer.size * 32 < 64 << 20,
        "the layer is {} bytes",
        layer.size
    );
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .unpack("auto")
        .env("RUST_LOG", "cri_imaged=debug")
        .start();
    pull_ok(&daemon, &pushed.reference, None).await;
    let log = daemon.log();
    assert!(log.contains("inflates past its streaming budget"), "{log}");
    assert!(
        log.contains(&common::cri::staged_line(&layer.digest, false)),
        "{log}"
    );
    assert!(containerd.is_unpacked(&pushed.reference));
    let chain: Digest = pushed.manifests[0].diff_ids[0].parse().unwrap();
    let dir = snapshot_dir(&containerd, "k8s.io", &chain).await;
    let zeros = std::fs::read(dir.join("zeros.bin")).unwrap();
    assert_eq!(zeros.len() as u64, MIB << 20);
    assert!(zeros.iter().all(|&b| b == 0));
    let staging = staging_dir_of(&containerd, daemon.pid());
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
}
