//! Test images built here as OCI image layouts (busybox-static, an /etc/passwd with
//! `nobody`, an app file), multi-arch indexes and large random images, pushed to a
//! [`Registry`] with skopeo. Digests are known from building, so tests can assert IDs.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tempfile::TempDir;

use super::registry::{Credentials, Registry};
use super::{must, require_tool, run, HarnessError, IoContext, Result};

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Commands the busybox layer links to `/bin/busybox`.
const BUSYBOX_APPLETS: &[&str] = &["sh", "echo", "cat", "id", "true", "ls", "sleep", "env"];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
app:x:1000:1000:app:/home/app:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n";

/// The OCI architecture name of the machine running the tests.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// `linux/<host arch>`.
pub fn host_platform() -> String {
    format!("linux/{}", host_arch())
}

/// A content-addressed blob as written to the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// One platform's image manifest inside an [`OciImage`].
#[derive(Debug, Clone)]
pub struct ManifestInfo {
    /// `os/arch`.
    pub platform: String,
    pub manifest: Descriptor,
    /// The image ID containerd and CRI report.
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// Digests of the uncompressed layers (`rootfs.diff_ids`).
    pub diff_ids: Vec<String>,
}

impl ManifestInfo {
    pub fn config_digest(&self) -> &str {
        &self.config.digest
    }

    /// Config plus compressed layers.
    pub fn content_size(&self) -> u64 {
        self.config.size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

/// An OCI image layout in a temp dir with one tagged image or index.
pub struct OciImage {
    dir: TempDir,
    pub tag: String,
    /// What the tag points at: a manifest, or an index for multi-arch images.
    pub top: Descriptor,
    /// One per platform; a single-platform image has one.
    pub manifests: Vec<ManifestInfo>,
}

/// An image as pushed: its references and the digests to expect.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `HOST/REPO` (no tag).
    pub repository: String,
    /// `HOST/REPO:TAG`.
    pub reference: String,
    /// `HOST/REPO@sha256:…` of the manifest or index.
    pub digest_reference: String,
    /// Manifest (or index) digest.
    pub digest: String,
    /// Config digest of the host-platform manifest: the image ID.
    pub config_digest: String,
    pub manifests: Vec<ManifestInfo>,
}

impl OciImage {
    pub fn layout(&self) -> &Path {
        self.dir.path()
    }

    /// Where a blob of this layout is stored.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    pub fn is_index(&self) -> bool {
        self.top.media_type == MEDIA_INDEX
    }

    /// The manifest for `platform` (`linux/amd64`).
    pub fn manifest_for(&self, platform: &str) -> Option<&ManifestInfo> {
        self.manifests.iter().find(|m| m.platform == platform)
    }

    /// The manifest for the machine running the tests.
    pub fn host(&self) -> &ManifestInfo {
        match self.manifest_for(&host_platform()) {
            Some(m) => m,
            None => panic!("test image has no {} manifest", host_platform()),
        }
    }

    /// Pushes as `REPO:TAG` using the registry's push credentials and CA.
    pub fn push(&self, registry: &Registry, repo: &str) -> PushedImage {
        must(self.push_as(registry, repo, &self.tag, registry.push_credentials()))
    }

    /// Pushes as `REPO:TAG` with explicit credentials (`None`: anonymous).
    pub fn push_as(
        &self,
        registry: &Registry,
        repo: &str,
        tag: &str,
        credentials: Option<&Credentials>,
    ) -> Result<PushedImage> {
        require_tool("skopeo", "skopeo")?;
        let repository = format!("{}/{repo}", registry.host());
        let reference = format!("{repository}:{tag}");
        let mut command = Command::new("skopeo");
        // --insecure-policy: do not depend on the host's /etc/containers/policy.json.
        command.args(["--insecure-policy", "copy", "--preserve-digests", "--quiet"]);
        if self.is_index() {
            command.arg("--all");
        }
        match registry.cert_dir() {
            Some(dir) => command.arg("--dest-cert-dir").arg(dir),
            None => command.arg("--dest-tls-verify=false"),
        };
        match credentials {
            Some(c) => command.arg("--dest-creds").arg(c.joined()),
            None => command.arg("--dest-no-creds"),
        };
        command
            .arg(format!("oci:{}:{}", self.layout().display(), self.tag))
            .arg(format!("docker://{reference}"));
        run(&mut command)?;
        Ok(PushedImage {
            digest_reference: format!("{repository}@{}", self.top.digest),
            repository,
            reference,
            digest: self.top.digest.clone(),
            config_digest: self
                .manifest_for(&host_platform())
                .map(|m| m.config.digest.clone())
                .unwrap_or_default(),
            manifests: self.manifests.clone(),
        })
    }
}

/// The `User` a busybox image's config names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageUser {
    None,
    /// A numeric uid, e.g. `"1000"`.
    Uid(String),
    /// A name from the image's /etc/passwd, e.g. `"nobody"`.
    Name(String),
}

/// Builds a runnable busybox image.
#[derive(Debug, Clone)]
pub struct BusyboxImage {
    user: ImageUser,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    app_text: String,
    tag: String,
}

/// A runnable busybox image: `/bin/busybox` plus applet links, /etc/passwd with
/// `nobody`, `/app/hello.txt`; Cmd `/bin/sh`, no User.
pub fn busybox() -> BusyboxImage {
    BusyboxImage {
        user: ImageUser::None,
        entrypoint: Vec::new(),
        cmd: vec!["/bin/sh".to_owned()],
        app_text: "hello from cri-imaged tests\n".to_owned(),
        tag: "latest".to_owned(),
    }
}

impl BusyboxImage {
    pub fn user(mut self, user: ImageUser) -> BusyboxImage {
        self.user = user;
        self
    }

    pub fn entrypoint(mut self, args: &[&str]) -> BusyboxImage {
        self.entrypoint = args.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn cmd(mut self, args: &[&str]) -> BusyboxImage {
        self.cmd = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Content of `/app/hello.txt`; different text gives a different image.
    pub fn app_text(mut self, text: &str) -> BusyboxImage {
        self.app_text = text.to_owned();
        self
    }

    pub fn tag(mut self, tag: &str) -> BusyboxImage {
        self.tag = tag.to_owned();
        self
    }

    pub fn build(&self) -> OciImage {
        must(self.try_build())
    }

    pub fn try_build(&self) -> Result<OciImage> {
        let layout = Layout::create()?;
        let layers = vec![busybox_layer()?.clone(), app_layer(&self.app_text)?];
        let user = match &self.user {
            ImageUser::None => None,
            ImageUser::Uid(u) | ImageUser::Name(u) => Some(u.as_str()),
        };
        let config = ImageConfig {
            arch: host_arch(),
            entrypoint: &self.entrypoint,
            cmd: &self.cmd,
            user,
        };
        let manifest = layout.image(&config, &layers)?;
        let top = manifest.manifest.clone();
        layout.finish(&self.tag, top, vec![manifest])
    }
}

/// A two-platform index: the host's busybox image and an arm64 (or amd64, on an
/// arm64 host) manifest with different layers that is never run.
pub fn multi_arch(tag: &str) -> OciImage {
    must(try_multi_arch(tag))
}

fn try_multi_arch(tag: &str) -> Result<OciImage> {
    let layout = Layout::create()?;
    let cmd = vec!["/bin/sh".to_owned()];
    let host = layout.image(
        &ImageConfig {
            arch: host_arch(),
            entrypoint: &[],
            cmd: &cmd,
            user: None,
        },
        &[
            busybox_layer()?.clone(),
            app_layer(&format!("{} image\n", host_arch()))?,
        ],
    )?;
    let other_arch = if host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let placeholder = Layer::from_entries(&[Entry::File {
        path: "bin/README",
        mode: 0o644,
        data: b"placeholder: this manifest is for another architecture\n",
    }])?;
    let other = layout.image(
        &ImageConfig {
            arch: other_arch,
            entrypoint: &[],
            cmd: &cmd,
            user: None,
        },
        &[placeholder, app_layer(&format!("{other_arch} image\n"))?],
    )?;
    let manifests = vec![host, other];
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": manifests.iter().map(|m| {
            let (os, arch) = m.platform.split_once('/').unwrap_or(("linux", &m.platform));
            let mut d = m.manifest.json();
            d["platform"] = serde_json::json!({"os": os, "architecture": arch});
            d
        }).collect::<Vec<_>>(),
    });
    let top = layout.write_blob(MEDIA_INDEX, &serde_json::to_vec(&index)?)?;
    layout.finish(tag, top, manifests)
}

/// An image of about `total_bytes` in `layers` gzip layers of random data (gzip
/// cannot shrink it), for benchmarks. Every call produces new content, so each pull
/// is cold. Not runnable (no busybox).
pub fn random_image(total_bytes: u64, layers: usize, tag: &str) -> OciImage {
    must(try_random_image(total_bytes, layers, tag))
}

fn try_random_image(total_bytes: u64, layers: usize, tag: &str) -> Result<OciImage> {
    let layout = Layout::create()?;
    let layers = layers.max(1);
    let per_layer = total_bytes / layers as u64;
    let rng = ring::rand::SystemRandom::new();
    let mut built = Vec::with_capacity(layers);
    for index in 0..layers {
        built.push(random_layer(&rng, index, per_layer)?);
    }
    let config = ImageConfig {
        arch: host_arch(),
        entrypoint: &[],
        cmd: &[],
        user: None,
    };
    let manifest = layout.image(&config, &built)?;
    let top = manifest.manifest.clone();
    layout.finish(tag, top, vec![manifest])
}

/// An image of one gzip layer holding `zeros.bin`, `mib` MiB of zeros: a layer that
/// inflates about a thousand times. The gzip is one member per MiB (gzip readers,
/// Go's and ours, read concatenated members as one stream), so a debug build
/// compresses one MiB of zeros, not all of them. Not runnable (no busybox).
pub fn zeros_image(mib: usize, tag: &str) -> OciImage {
    must(try_zeros_image(mib, tag))
}

fn try_zeros_image(mib: usize, tag: &str) -> Result<OciImage> {
    use std::io::Write as _;
    const MIB: usize = 1 << 20;
    let gzip = |raw: &[u8]| -> Result<Vec<u8>> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(raw).ctx(|| "gzip".into())?;
        gz.finish().ctx(|| "gzip".into())
    };
    let mut header = tar::Header::new_gnu();
    header.set_path("zeros.bin").ctx(|| "tar header".into())?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size((mib * MIB) as u64);
    header.set_mtime(0);
    header.set_cksum();
    let zeros = vec![0u8; MIB];
    // The data ends on a 512-byte boundary; two zero blocks end the archive.
    let tail = [0u8; 1024];
    let mut diff_id = ring::digest::Context::new(&ring::digest::SHA256);
    diff_id.update(header.as_bytes());
    let mut gz = gzip(header.as_bytes())?;
    let zeros_gz = gzip(&zeros)?;
    for _ in 0..mib {
        diff_id.update(&zeros);
        gz.extend_from_slice(&zeros_gz);
    }
    diff_id.update(&tail);
    gz.extend_from_slice(&gzip(&tail)?);
    let layer = Layer {
        gz,
        diff_id: format!("sha256:{}", hex::encode(diff_id.finish())),
    };
    let layout = Layout::create()?;
    let config = ImageConfig {
        arch: host_arch(),
        entrypoint: &[],
        cmd: &[],
        user: None,
    };
    let manifest = layout.image(&config, &[layer])?;
    let top = manifest.manifest.clone();
    layout.finish(tag, top, vec![manifest])
}

/// An image of real files: one gzip layer (default level, as image builders write)
/// per directory of this machine, each stored under its own path (`/usr/include` →
/// `usr/include/…`); symlinks are kept as links. For benchmarks of file-heavy images.
pub fn host_tree_image(dirs: &[&Path], tag: &str) -> OciImage {
    must(try_host_tree_image(dirs, tag))
}

fn try_host_tree_image(dirs: &[&Path], tag: &str) -> Result<OciImage> {
    let layout = Layout::create()?;
    let mut built = Vec::with_capacity(dirs.len());
    for dir in dirs {
        built.push(host_tree_layer(dir)?);
    }
    let config = ImageConfig {
        arch: host_arch(),
        entrypoint: &[],
        cmd: &[],
        user: None,
    };
    let manifest = layout.image(&config, &built)?;
    let top = manifest.manifest.clone();
    layout.finish(tag, top, vec![manifest])
}

/// The tar of `dir` streamed through a SHA-256 (the diff ID) into gzip, so a layer
/// of a gigabyte never sits in memory uncompressed.
fn host_tree_layer(dir: &Path) -> Result<Layer> {
    struct Hashing<W> {
        hash: ring::digest::Context,
        inner: W,
    }
    impl<W: std::io::Write> std::io::Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hash.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let name = dir.strip_prefix("/").unwrap_or(dir);
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(Hashing {
        hash: ring::digest::Context::new(&ring::digest::SHA256),
        inner: gz,
    });
    tar.follow_symlinks(false);
    tar.append_dir_all(name, dir)
        .ctx(|| format!("adding {} to a layer", dir.display()))?;
    let hashing = tar.into_inner().ctx(|| "finishing a tar".into())?;
    let gz = hashing.inner.finish().ctx(|| "gzip".into())?;
    Ok(Layer {
        gz,
        diff_id: format!("sha256:{}", hex::encode(hashing.hash.finish())),
    })
}

/// Files of at most 4 MiB, so unpacking writes several files per layer.
fn random_layer(rng: &ring::rand::SystemRandom, index: usize, bytes: u64) -> Result<Layer> {
    use ring::rand::SecureRandom as _;
    const FILE: u64 = 4 << 20;
    let mut tar = tar::Builder::new(Vec::with_capacity(bytes as usize + 64 * 1024));
    append_dir(&mut tar, &format!("data/{index}"))?;
    let mut left = bytes;
    let mut n = 0;
    let mut data = vec![0u8; FILE as usize];
    while left > 0 {
        let len = left.min(FILE) as usize;
        // The kernel's RNG is fast and stays fast in a debug build.
        rng.fill(&mut data[..len])
            .map_err(|_unspecified| HarnessError::Random)?;
        append_file(
            &mut tar,
            &format!("data/{index}/{n}.bin"),
            0o644,
            &data[..len],
        )?;
        left -= len as u64;
        n += 1;
    }
    let raw = tar.into_inner().ctx(|| "finishing a tar".into())?;
    let diff_id = sha256(&raw);
    Ok(Layer {
        gz: gzip_stored(&raw),
        diff_id,
    })
}

/// gzip (RFC 1952) made of stored deflate blocks. Random data ends up stored at any
/// compression level anyway; writing the blocks directly keeps building a 200 MB
/// image to a couple of seconds in a debug build (flate2 there: ~20 s).
fn gzip_stored(raw: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 65535;
    let mut out = Vec::with_capacity(raw.len() + raw.len() / BLOCK * 5 + 32);
    // Magic, deflate, no flags, mtime 0, no extra flags, OS unix.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]);
    let mut chunks = raw.chunks(BLOCK).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        // BFINAL bit, BTYPE 00 (stored), padding to the byte boundary.
        out.push(u8::from(last));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(raw);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out
}

/// A gzip layer blob and the digest of its uncompressed tar.
#[derive(Debug, Clone)]
struct Layer {
    gz: Vec<u8>,
    diff_id: String,
}

enum Entry<'a> {
    Dir(&'a str),
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    Symlink {
        path: &'a str,
        target: &'a str,
    },
}

impl Layer {
    fn from_entries(entries: &[Entry<'_>]) -> Result<Layer> {
        let mut tar = tar::Builder::new(Vec::new());
        for entry in entries {
            match entry {
                Entry::Dir(path) => append_dir(&mut tar, path)?,
                Entry::File { path, mode, data } => append_file(&mut tar, path, *mode, data)?,
                Entry::Symlink { path, target } => {
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    header.set_mtime(0);
                    tar.append_link(&mut header, path, target)
                        .ctx(|| format!("adding symlink {path}"))?;
                }
            }
        }
        let raw = tar.into_inner().ctx(|| "finishing a tar".into())?;
        Layer::from_tar(raw)
    }

    fn from_tar(raw: Vec<u8>) -> Result<Layer> {
        let diff_id = sha256(&raw);
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(raw.len() / 2),
            flate2::Compression::fast(),
        );
        gz.write_all(&raw).ctx(|| "gzip".into())?;
        let gz = gz.finish().ctx(|| "gzip".into())?;
        Ok(Layer { gz, diff_id })
    }
}

fn append_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    header.set_mtime(0);
    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
        .ctx(|| format!("adding dir {path}"))
}

fn append_file(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_mtime(0);
    tar.append_data(&mut header, path, data)
        .ctx(|| format!("adding file {path}"))
}

/// The busybox layer, built once per test process (the same bytes every time).
fn busybox_layer() -> Result<&'static Layer> {
    static LAYER: OnceLock<Layer> = OnceLock::new();
    if let Some(layer) = LAYER.get() {
        return Ok(layer);
    }
    let busybox = std::fs::read("/bin/busybox").map_err(|_| HarnessError::MissingTool {
        tool: "/bin/busybox (static)",
        package: "busybox-static",
    })?;
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::File {
            path: "bin/busybox",
            mode: 0o755,
            data: &busybox,
        },
    ];
    let links: Vec<String> = BUSYBOX_APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    entries.extend(links.iter().map(|path| Entry::Symlink {
        path,
        target: "busybox",
    }));
    let layer = Layer::from_entries(&entries)?;
    Ok(LAYER.get_or_init(|| layer))
}

/// /etc/passwd and /etc/group (with `nobody`), /tmp, and /app/hello.txt.
fn app_layer(app_text: &str) -> Result<Layer> {
    Layer::from_entries(&[
        Entry::Dir("etc"),
        Entry::File {
            path: "etc/passwd",
            mode: 0o644,
            data: PASSWD.as_bytes(),
        },
        Entry::File {
            path: "etc/group",
            mode: 0o644,
            data: GROUP.as_bytes(),
        },
        Entry::Dir("tmp"),
        Entry::Dir("app"),
        Entry::File {
            path: "app/hello.txt",
            mode: 0o644,
            data: app_text.as_bytes(),
        },
    ])
}

struct ImageConfig<'a> {
    arch: &'a str,
    entrypoint: &'a [String],
    cmd: &'a [String],
    user: Option<&'a str>,
}

/// An OCI layout directory being filled.
struct Layout {
    dir: TempDir,
}

impl Layout {
    fn create() -> Result<Layout> {
        let dir = tempfile::Builder::new()
            .prefix("cri-imaged-image-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).ctx(|| format!("creating {}", blobs.display()))?;
        Ok(Layout { dir })
    }

    fn write_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let digest = sha256(bytes);
        let path: PathBuf = self
            .dir
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, bytes).ctx(|| format!("writing {}", path.display()))?;
        Ok(Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size: bytes.len() as u64,
        })
    }

    /// Writes layers, config and manifest for one platform.
    fn image(&self, config: &ImageConfig<'_>, layers: &[Layer]) -> Result<ManifestInfo> {
        let layer_descs = layers
            .iter()
            .map(|l| self.write_blob(MEDIA_LAYER_GZIP, &l.gz))
            .collect::<Result<Vec<_>>>()?;
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let mut inner = serde_json::json!({
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        });
        if !config.entrypoint.is_empty() {
            inner["Entrypoint"] = serde_json::json!(config.entrypoint);
        }
        if !config.cmd.is_empty() {
            inner["Cmd"] = serde_json::json!(config.cmd);
        }
        if let Some(user) = config.user {
            inner["User"] = serde_json::json!(user);
        }
        let config_json = serde_json::json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": config.arch,
            "os": "linux",
            "config": inner,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": layers.iter().map(|_| serde_json::json!({
                "created": "2024-01-01T00:00:00Z",
                "created_by": "cri-imaged test harness",
            })).collect::<Vec<_>>(),
        });
        let config_desc = self.write_blob(MEDIA_CONFIG, &serde_json::to_vec(&config_json)?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_desc.json(),
            "layers": layer_descs.iter().map(Descriptor::json).collect::<Vec<_>>(),
        });
        let manifest_desc = self.write_blob(MEDIA_MANIFEST, &serde_json::to_vec(&manifest)?)?;
        Ok(ManifestInfo {
            platform: format!("linux/{}", config.arch),
            manifest: manifest_desc,
            config: config_desc,
            layers: layer_descs,
            diff_ids,
        })
    }

    /// Writes `oci-layout` and `index.json` naming `top` as `tag`.
    fn finish(self, tag: &str, top: Descriptor, manifests: Vec<ManifestInfo>) -> Result<OciImage> {
        let root = self.dir.path();
        std::fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .ctx(|| "writing oci-layout".into())?;
        let mut entry = top.json();
        entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry]});
        std::fs::write(root.join("index.json"), serde_json::to_vec(&index)?)
            .ctx(|| "writing index.json".into())?;
        Ok(OciImage {
            dir: self.dir,
            tag: tag.to_owned(),
            top,
            manifests,
        })
    }
}

/// ring's SHA-256 is assembly, fast even in a debug build (sha2 there: ~30 MB/s).
fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    )
}
