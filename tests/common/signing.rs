//! Signed images for policy tests, made only with independent tools: throwaway GPG
//! keys, `skopeo copy --sign-by` pushes whose simple signatures land in a lookaside
//! staging directory, an HTTP server for that lookaside, cosign-format signatures
//! (`sha256-<hex>.sig` tags) signed with ring, and skopeo's own verdict on a
//! policy.json as the reference the daemon's verifier is compared against.
//!
//! # Lookaside layout
//!
//! skopeo 1.9.3 (containers/image 5.23) given `lookaside-staging: file:///ROOT` writes
//! the simple signatures of `HOST:PORT/team/app` at manifest `sha256:HEX` to
//!
//! ```text
//! ROOT/team/app@sha256=HEX/signature-1   (then signature-2, … for more signatures)
//! ```
//!
//! The repository path is relative to the registry: no host in it. A reader (skopeo,
//! the daemon) configured with `lookaside: http://127.0.0.1:PORT` for that registry
//! fetches `GET /team/app@sha256=HEX/signature-1`, then `signature-2`, … until the
//! first 404. So the lookaside URL is the staging root served as is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode};
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use tempfile::TempDir;

use super::http_server::ServerThread;
use super::images::{OciImage, PushedImage, MEDIA_CONFIG, MEDIA_MANIFEST};
use super::registry::Registry;
use super::{must, require_tool, run, HarnessError, IoContext, Result};

/// The layer media type of a cosign simple-signing payload.
pub const MEDIA_COSIGN_SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding base64 of the DER ECDSA signature over the payload.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// The OpenPGP algorithm of a [`GpgKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpgKeyType {
    /// EdDSA over Ed25519 (OpenPGP algorithm 22); fast to generate.
    Ed25519,
    /// RSA 2048.
    Rsa2048,
}

/// A throwaway OpenPGP signing key (no passphrase) in a GNUPGHOME of its own. Its
/// gpg-agent is stopped on drop.
pub struct GpgKey {
    fingerprint: String,
    public_key_path: PathBuf,
    home: PathBuf,
    // Last: removed after the agent is stopped.
    dir: TempDir,
}

impl std::fmt::Debug for GpgKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpgKey({})", self.fingerprint)
    }
}

impl GpgKey {
    /// An Ed25519 key for the user ID `name <name@cri-imaged.test>`.
    pub fn generate(name: &str) -> GpgKey {
        must(GpgKey::try_generate(name, GpgKeyType::Ed25519))
    }

    pub fn generate_with(name: &str, key_type: GpgKeyType) -> GpgKey {
        must(GpgKey::try_generate(name, key_type))
    }

    pub fn try_generate(name: &str, key_type: GpgKeyType) -> Result<GpgKey> {
        require_tool("gpg", "gnupg")?;
        let dir = tempfile::Builder::new()
            .prefix("cri-imaged-gpg-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let home = dir.path().join("gnupg");
        {
            use std::os::unix::fs::DirBuilderExt as _;
            // gpg warns about (and gpgme may refuse) a group- or world-readable home.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&home)
                .ctx(|| format!("creating {}", home.display()))?;
        }
        let algorithm = match key_type {
            GpgKeyType::Ed25519 => "Key-Type: eddsa\nKey-Curve: ed25519\n",
            GpgKeyType::Rsa2048 => "Key-Type: RSA\nKey-Length: 2048\n",
        };
        let params = dir.path().join("key-params");
        std::fs::write(
            &params,
            format!(
                "%no-protection\n{algorithm}Key-Usage: sign\nName-Real: {name}\n\
                 Name-Email: {name}@cri-imaged.test\nExpire-Date: 0\n%commit\n"
            ),
        )
        .ctx(|| format!("writing {}", params.display()))?;
        let gpg = |args: &[&str]| {
            let mut command = Command::new("gpg");
            command
                .arg("--homedir")
                .arg(&home)
                .arg("--batch")
                .args(args);
            command
        };
        let mut key = GpgKey {
            fingerprint: String::new(),
            public_key_path: dir.path().join("public-key.asc"),
            home: home.clone(),
            dir,
        };
        run(gpg(&["--generate-key"]).arg(&params))?;
        let listing = run(&mut gpg(&["--with-colons", "--list-secret-keys"]))?.stdout;
        let listing = String::from_utf8_lossy(&listing);
        // `sec:…` is followed by its `fpr:::::::::FINGERPRINT:` line.
        let fingerprint = listing
            .lines()
            .find_map(|line| line.strip_prefix("fpr:"))
            .and_then(|rest| rest.split(':').nth(8))
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| HarnessError::Io {
                what: format!("no fingerprint in gpg's key listing:\n{listing}"),
                source: std::io::Error::other("unexpected gpg output"),
            })?;
        let armored = run(&mut gpg(&["--armor", "--export", &fingerprint]))?.stdout;
        std::fs::write(&key.public_key_path, &armored)
            .ctx(|| format!("writing {}", key.public_key_path.display()))?;
        key.fingerprint = fingerprint;
        Ok(key)
    }

    /// 40 hex digits, upper case, as `--sign-by` takes it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The GNUPGHOME holding the secret key.
    pub fn gnupg_home(&self) -> &Path {
        &self.home
    }

    /// The ASCII-armored public key (policy.json `keyPath` / `keyData` content).
    pub fn public_key_armored(&self) -> Vec<u8> {
        std::fs::read(&self.public_key_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.public_key_path.display()))
    }

    /// A file holding [`GpgKey::public_key_armored`].
    pub fn public_key_path(&self) -> &Path {
        &self.public_key_path
    }

    /// A simple signing signature (`skopeo standalone-sign`) claiming that `manifest`
    /// is `docker_reference`: for signatures of other digests or identities, written
    /// into a staging dir with [`SignatureStaging::write_signature`].
    pub fn standalone_sign(&self, manifest: &[u8], docker_reference: &str) -> Result<Vec<u8>> {
        require_tool("skopeo", "skopeo")?;
        let work = tempfile::Builder::new()
            .prefix("cri-imaged-sign-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let manifest_path = work.path().join("manifest.json");
        std::fs::write(&manifest_path, manifest)
            .ctx(|| format!("writing {}", manifest_path.display()))?;
        let output = work.path().join("signature");
        run(Command::new("skopeo")
            .env("GNUPGHOME", &self.home)
            .arg("standalone-sign")
            .arg(&manifest_path)
            .arg(docker_reference)
            .arg(&self.fingerprint)
            .arg("--output")
            .arg(&output))?;
        std::fs::read(&output).ctx(|| format!("reading {}", output.display()))
    }
}

impl Drop for GpgKey {
    fn drop(&mut self) {
        // gpg (and skopeo's gpgme) started an agent for this home; it would outlive
        // the temp dir. `--kill` reaches only the agent of this home.
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

/// A lookaside staging directory and the registries.d that makes skopeo write
/// signatures into it (and read the ones already there). Layout: see the module doc.
pub struct SignatureStaging {
    dir: TempDir,
}

impl SignatureStaging {
    pub fn new() -> SignatureStaging {
        must(SignatureStaging::try_new())
    }

    pub fn try_new() -> Result<SignatureStaging> {
        let dir = tempfile::Builder::new()
            .prefix("cri-imaged-lookaside-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let root = dir.path().join("lookaside");
        let registries_d = dir.path().join("registries.d");
        for path in [&root, &registries_d] {
            std::fs::create_dir_all(path).ctx(|| format!("creating {}", path.display()))?;
        }
        // `lookaside` too, so copying an already signed image keeps its signatures
        // and appends the new one as the next signature-N.
        let yaml = format!(
            "default-docker:\n  lookaside: file://{root}\n  lookaside-staging: file://{root}\n",
            root = root.display()
        );
        let file = registries_d.join("staging.yaml");
        std::fs::write(&file, yaml).ctx(|| format!("writing {}", file.display()))?;
        Ok(SignatureStaging { dir })
    }

    /// The lookaside root: serve this directory as is.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("lookaside")
    }

    /// The registries.d skopeo writes signatures here with (`--registries.d`).
    pub fn registries_d(&self) -> PathBuf {
        self.dir.path().join("registries.d")
    }

    /// `ROOT/REPO@sha256=HEX/signature-N`; `repository` has no host (`team/app`), `n`
    /// counts from 1.
    pub fn signature_path(&self, repository: &str, digest: &str, n: usize) -> PathBuf {
        self.root()
            .join(format!("{repository}@{}", digest.replacen(':', "=", 1)))
            .join(format!("signature-{n}"))
    }

    /// The signatures stored for `repository@digest`, signature-1 first.
    pub fn signatures(&self, repository: &str, digest: &str) -> Vec<Vec<u8>> {
        (1..)
            .map_while(|n| std::fs::read(self.signature_path(repository, digest, n)).ok())
            .collect()
    }

    /// Stores `signature` as signature-`n` of `repository@digest` (bypassing skopeo,
    /// for hand-made or broken signatures).
    pub fn write_signature(
        &self,
        repository: &str,
        digest: &str,
        n: usize,
        signature: &[u8],
    ) -> Result<()> {
        let path = self.signature_path(repository, digest, n);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, signature).ctx(|| format!("writing {}", path.display()))
    }

    /// An HTTP server for the lookaside root.
    pub fn serve(&self) -> LookasideServer {
        LookasideServer::start(&self.root())
    }
}

/// Pushes `image` as `REPO:TAG` (the image's tag) and signs it with `key`; the
/// signature goes to `staging`. Returns what was pushed; its `digest` is the signed
/// manifest digest as skopeo reports it.
pub fn push_gpg_signed(
    image: &OciImage,
    registry: &Registry,
    repo: &str,
    key: &GpgKey,
    staging: &SignatureStaging,
) -> PushedImage {
    must(try_push_gpg_signed(
        image, registry, repo, &image.tag, key, staging, None,
    ))
}

/// [`push_gpg_signed`] with an explicit tag and, optionally, a signed identity other
/// than `HOST/REPO:TAG` (`--sign-identity`, a full docker reference). For an index,
/// skopeo (`--all`) signs the index and every platform manifest.
pub fn try_push_gpg_signed(
    image: &OciImage,
    registry: &Registry,
    repo: &str,
    tag: &str,
    key: &GpgKey,
    staging: &SignatureStaging,
    sign_identity: Option<&str>,
) -> Result<PushedImage> {
    require_tool("skopeo", "skopeo")?;
    let repository = format!("{}/{repo}", registry.host());
    let reference = format!("{repository}:{tag}");
    let work = tempfile::Builder::new()
        .prefix("cri-imaged-push-")
        .tempdir()
        .ctx(|| "creating a temp dir".into())?;
    let digest_file = work.path().join("digest");
    let mut command = Command::new("skopeo");
    command
        .env("GNUPGHOME", key.gnupg_home())
        .arg("--insecure-policy")
        .arg("--registries.d")
        .arg(staging.registries_d())
        .args(["copy", "--preserve-digests", "--quiet"])
        .args(["--sign-by", key.fingerprint()])
        .arg("--digestfile")
        .arg(&digest_file);
    if let Some(identity) = sign_identity {
        command.args(["--sign-identity", identity]);
    }
    if image.is_index() {
        command.arg("--all");
    }
    dest_flags(&mut command, registry);
    command
        .arg(format!("oci:{}:{}", image.layout().display(), image.tag))
        .arg(format!("docker://{reference}"));
    run(&mut command)?;
    let digest = std::fs::read_to_string(&digest_file)
        .ctx(|| format!("reading {}", digest_file.display()))?
        .trim()
        .to_owned();
    Ok(PushedImage {
        digest_reference: format!("{repository}@{digest}"),
        repository,
        reference,
        digest,
        config_digest: image
            .manifest_for(&super::images::host_platform())
            .map(|m| m.config.digest.clone())
            .unwrap_or_default(),
        manifests: image.manifests.clone(),
    })
}

/// Adds a signature by `key` to an image already pushed (and possibly signed) into
/// `staging`: skopeo copies it onto its own tag, keeping the signatures it reads
/// from `staging` and appending the new one. The identity is `pushed.reference`.
pub fn add_gpg_signature(
    registry: &Registry,
    pushed: &PushedImage,
    key: &GpgKey,
    staging: &SignatureStaging,
) -> Result<()> {
    require_tool("skopeo", "skopeo")?;
    let mut command = Command::new("skopeo");
    command
        .env("GNUPGHOME", key.gnupg_home())
        .arg("--insecure-policy")
        .arg("--registries.d")
        .arg(staging.registries_d())
        .args(["copy", "--preserve-digests", "--quiet"])
        .args(["--sign-by", key.fingerprint()]);
    src_flags(&mut command, registry);
    dest_flags(&mut command, registry);
    command
        .arg(format!("docker://{}", pushed.digest_reference))
        .arg(format!("docker://{}", pushed.reference));
    run(&mut command).map(drop)
}

/// A registries.d directory for readers (skopeo, the daemon).
pub struct RegistriesD {
    dir: TempDir,
}

impl RegistriesD {
    /// `docker: { SCOPE: { lookaside: URL } }`; `scope` is a host (`127.0.0.1:PORT`)
    /// or `HOST/REPO` prefix.
    pub fn lookaside(scope: &str, url: &str) -> RegistriesD {
        RegistriesD::from_yaml(&format!("docker:\n  \"{scope}\":\n    lookaside: {url}\n"))
    }

    /// One file with this YAML.
    pub fn from_yaml(yaml: &str) -> RegistriesD {
        must(RegistriesD::try_from_yaml(yaml))
    }

    pub fn try_from_yaml(yaml: &str) -> Result<RegistriesD> {
        let dir = tempfile::Builder::new()
            .prefix("cri-imaged-registries-d-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let file = dir.path().join("test.yaml");
        std::fs::write(&file, yaml).ctx(|| format!("writing {}", file.display()))?;
        Ok(RegistriesD { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A policy.json rejecting everything except `scope` (`HOST` or `HOST/REPO`), which
/// needs a GPG signature by the key in `key_path` (default `matchRepoDigestOrExact`
/// identity).
pub fn gpg_policy(scope: &str, key_path: &Path) -> String {
    serde_json::json!({
        "default": [{"type": "reject"}],
        "transports": {"docker": {scope: [{
            "type": "signedBy",
            "keyType": "GPGKeys",
            "keyPath": key_path,
        }]}},
    })
    .to_string()
}

/// Whether containers/image's own verifier, run by `skopeo copy`, accepts `image`
/// (`HOST/REPO:TAG` or `HOST/REPO@DIGEST`, on `registry`) under `policy_json` with
/// signatures looked up through `registries_d`. `Err` carries skopeo's stderr (a
/// rejection, or any other failure: read the text). Panics if skopeo is missing.
pub fn skopeo_accepts(
    policy_json: &str,
    registries_d: &Path,
    image: &str,
    registry: &Registry,
) -> std::result::Result<(), String> {
    must(require_tool("skopeo", "skopeo"));
    let work = must(
        tempfile::Builder::new()
            .prefix("cri-imaged-verify-")
            .tempdir()
            .ctx(|| "creating a temp dir".into()),
    );
    let policy = work.path().join("policy.json");
    must(std::fs::write(&policy, policy_json).ctx(|| format!("writing {}", policy.display())));
    let mut command = Command::new("skopeo");
    command
        .arg("--policy")
        .arg(&policy)
        .arg("--registries.d")
        .arg(registries_d)
        .args(["copy", "--quiet"]);
    src_flags(&mut command, registry);
    let image = image.strip_prefix("docker://").unwrap_or(image);
    command
        .arg(format!("docker://{image}"))
        .arg(format!("dir:{}", work.path().join("image").display()));
    match run(&mut command) {
        Ok(_) => Ok(()),
        Err(HarnessError::CommandFailed { stderr, .. }) => Err(stderr),
        Err(other) => Err(other.to_string()),
    }
}

/// `--dest-…` TLS and credential flags for pushing to `registry`, as
/// [`OciImage::push_as`] uses them.
fn dest_flags(command: &mut Command, registry: &Registry) {
    match registry.cert_dir() {
        Some(dir) => command.arg("--dest-cert-dir").arg(dir),
        None => command.arg("--dest-tls-verify=false"),
    };
    match registry.push_credentials() {
        Some(c) => command.arg("--dest-creds").arg(c.joined()),
        None => command.arg("--dest-no-creds"),
    };
}

/// `--src-…` flags for reading from `registry` with its push credentials.
fn src_flags(command: &mut Command, registry: &Registry) {
    match registry.cert_dir() {
        Some(dir) => command.arg("--src-cert-dir").arg(dir),
        None => command.arg("--src-tls-verify=false"),
    };
    match registry.push_credentials() {
        Some(c) => command.arg("--src-creds").arg(c.joined()),
        None => command.arg("--src-no-creds"),
    };
}

/// One request the [`LookasideServer`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookasideRequest {
    pub method: String,
    /// Percent-decoded path, e.g. `/team/app@sha256=HEX/signature-1`.
    pub path: String,
    /// 200, or 404 for a missing file.
    pub status: u16,
}

/// Serves a directory over plain HTTP on 127.0.0.1 (GET and HEAD of files; 404 for
/// anything else) and records every request. Stopped on drop.
pub struct LookasideServer {
    requests: Arc<Mutex<Vec<LookasideRequest>>>,
    server: ServerThread,
}

impl LookasideServer {
    pub fn start(root: &Path) -> LookasideServer {
        must(LookasideServer::try_start(root))
    }

    pub fn try_start(root: &Path) -> Result<LookasideServer> {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let root = Arc::new(root.to_path_buf());
        let server = ServerThread::start("lookaside server", None, move |request| {
            let answer = serve_file(&root, &request);
            let path = percent_decode(request.uri().path());
            lock(&seen).push(LookasideRequest {
                method: request.method().to_string(),
                path,
                status: answer.status().as_u16(),
            });
            async move { answer }
        })?;
        Ok(LookasideServer { requests, server })
    }

    /// `http://127.0.0.1:PORT`: the `lookaside` URL for registries.d.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn requests(&self) -> Vec<LookasideRequest> {
        lock(&self.requests).clone()
    }

    /// Paths of the requests answered 200.
    pub fn served(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.status == 200)
            .map(|r| r.path)
            .collect()
    }
}

fn serve_file(root: &Path, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = percent_decode(request.uri().path());
    let relative = path.trim_start_matches('/');
    let escapes = relative.split('/').any(|part| part == "..");
    let is_read = request.method() == hyper::Method::GET || request.method() == hyper::Method::HEAD;
    let file = if escapes || !is_read {
        None
    } else {
        std::fs::read(root.join(relative)).ok()
    };
    let (status, body) = match file {
        Some(bytes) => (StatusCode::OK, bytes),
        None => (StatusCode::NOT_FOUND, b"not found\n".to_vec()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// `%XX` escapes decoded; anything malformed is kept as is.
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An ECDSA P-256 key as `cosign generate-key-pair` makes (the private half never
/// leaves the test).
pub struct CosignKey {
    pkcs8: Vec<u8>,
    pair: EcdsaKeyPair,
}

impl std::fmt::Debug for CosignKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CosignKey({})", hex::encode(self.pair.public_key()))
    }
}

impl CosignKey {
    pub fn generate() -> CosignKey {
        must(CosignKey::try_generate())
    }

    pub fn try_generate() -> Result<CosignKey> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_unspecified| HarnessError::Random)?
            .as_ref()
            .to_vec();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
            .map_err(HarnessError::SigningKey)?;
        Ok(CosignKey { pkcs8, pair })
    }

    pub fn key_pair(&self) -> &EcdsaKeyPair {
        &self.pair
    }

    /// The private key, PKCS#8 DER.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The uncompressed public point (65 bytes), as ring's verifier takes it.
    pub fn public_key_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// `-----BEGIN PUBLIC KEY-----` (SPKI), as in cosign.pub and policy `keyPath`.
    pub fn public_key_pem(&self) -> String {
        public_key_pem(&self.pair)
    }

    /// Writes [`CosignKey::public_key_pem`] to `path`.
    pub fn write_public_key(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.public_key_pem()).ctx(|| format!("writing {}", path.display()))
    }
}

/// The SPKI PEM of a P-256 key pair.
pub fn public_key_pem(pair: &EcdsaKeyPair) -> String {
    // SubjectPublicKeyInfo { id-ecPublicKey, prime256v1 } then the 65-byte point in
    // a BIT STRING: the DER prefix is fixed for P-256.
    const SPKI_P256_PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut der = SPKI_P256_PREFIX.to_vec();
    der.extend_from_slice(pair.public_key().as_ref());
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// The simple-signing payload cosign signs, byte for byte:
/// `{"critical":{"identity":{"docker-reference":REF},"image":{"docker-manifest-digest":DIGEST},"type":"cosign container image signature"},"optional":null}`.
/// cosign's `REF` is the repository without tag or digest (`HOST/REPO`).
pub fn cosign_payload(docker_reference: &str, manifest_digest: &str) -> Vec<u8> {
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":{}}},"image":{{"docker-manifest-digest":{}}},"type":"cosign container image signature"}},"optional":null}}"#,
        quoted(docker_reference),
        quoted(manifest_digest)
    )
    .into_bytes()
}

/// `sha256-HEX.sig`: the tag cosign stores the signatures of `sha256:HEX` under.
pub fn cosign_tag(manifest_digest: &str) -> String {
    format!("{}.sig", manifest_digest.replacen(':', "-", 1))
}

/// One layer of a cosign signature manifest: the payload blob and its annotations
/// (at least [`COSIGN_SIGNATURE_ANNOTATION`]; add `dev.sigstore.cosign/certificate`,
/// `…/chain` or `…/bundle` as a test needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignSignature {
    pub payload: Vec<u8>,
    pub annotations: BTreeMap<String, String>,
}

impl CosignSignature {
    /// `key`'s signature over [`cosign_payload`] for this reference and digest. Any
    /// digest or reference may be claimed, for mismatch tests.
    pub fn sign(
        key: &EcdsaKeyPair,
        docker_reference: &str,
        manifest_digest: &str,
    ) -> Result<CosignSignature> {
        CosignSignature::sign_payload(key, cosign_payload(docker_reference, manifest_digest))
    }

    /// `key`'s signature over arbitrary payload bytes.
    pub fn sign_payload(key: &EcdsaKeyPair, payload: Vec<u8>) -> Result<CosignSignature> {
        let signature = key
            .sign(&ring::rand::SystemRandom::new(), &payload)
            .map_err(|_unspecified| HarnessError::Random)?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(signature.as_ref());
        Ok(CosignSignature {
            payload,
            annotations: BTreeMap::from([(COSIGN_SIGNATURE_ANNOTATION.to_owned(), encoded)]),
        })
    }

    /// The DER signature from the annotation (empty if missing or not base64).
    pub fn signature_der(&self) -> Vec<u8> {
        self.annotations
            .get(COSIGN_SIGNATURE_ANNOTATION)
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .unwrap_or_default()
    }
}

/// A pushed cosign signature manifest.
#[derive(Debug, Clone)]
pub struct CosignPush {
    /// `sha256-HEX.sig`.
    pub tag: String,
    /// `HOST/REPO:sha256-HEX.sig`.
    pub reference: String,
    /// The signature manifest's own digest.
    pub manifest_digest: String,
    /// The manifest bytes as pushed (the registry serves exactly these).
    pub manifest: Vec<u8>,
}

/// Signs `manifest_digest` as `docker_reference` with `key` and pushes the one-layer
/// signature manifest to `REPO:sha256-HEX.sig` on `registry`.
pub fn sign_sigstore(
    registry: &Registry,
    repo: &str,
    manifest_digest: &str,
    docker_reference: &str,
    key: &EcdsaKeyPair,
) -> CosignPush {
    must(
        CosignSignature::sign(key, docker_reference, manifest_digest).and_then(|signature| {
            push_cosign_signatures(registry, repo, manifest_digest, &[signature])
        }),
    )
}

/// Pushes a cosign signature manifest for `signed_digest` to `REPO:sha256-HEX.sig`
/// (replacing any there): OCI image manifest, config `application/vnd.oci.image.
/// config.v1+json` as cosign writes it, one [`MEDIA_COSIGN_SIMPLESIGNING`] layer per
/// signature, in order.
///
/// Pushed with `skopeo copy --preserve-digests` from an OCI layout rather than over
/// the registry API by hand: skopeo already handles every [`Registry`] kind (TLS,
/// htpasswd, token auth) exactly as the image pushes do, and `--preserve-digests`
/// makes it fail rather than rewrite the manifest, so the registry holds these exact
/// bytes (checked by [`CosignPush::manifest_digest`] against skopeo's digest file).
pub fn push_cosign_signatures(
    registry: &Registry,
    repo: &str,
    signed_digest: &str,
    signatures: &[CosignSignature],
) -> Result<CosignPush> {
    require_tool("skopeo", "skopeo")?;
    let layout = tempfile::Builder::new()
        .prefix("cri-imaged-cosign-")
        .tempdir()
        .ctx(|| "creating a temp dir".into())?;
    let blobs = layout.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).ctx(|| format!("creating {}", blobs.display()))?;
    let write_blob = |bytes: &[u8]| -> Result<(String, usize)> {
        let digest = sha256(bytes);
        let path = blobs.join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, bytes).ctx(|| format!("writing {}", path.display()))?;
        Ok((digest, bytes.len()))
    };
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for signature in signatures {
        let (digest, size) = write_blob(&signature.payload)?;
        layers.push(serde_json::json!({
            "mediaType": MEDIA_COSIGN_SIMPLESIGNING,
            "size": size,
            "digest": digest,
            "annotations": signature.annotations,
        }));
        diff_ids.push(digest);
    }
    // What go-containerregistry's empty image plus appended layers gives cosign.
    let config = serde_json::json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": signatures.iter().map(|_| serde_json::json!({"created": "0001-01-01T00:00:00Z"})).collect::<Vec<_>>(),
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {},
    });
    let (config_digest, config_size) = write_blob(&serde_json::to_vec(&config)?)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "size": config_size, "digest": config_digest},
        "layers": layers,
    }))?;
    let (manifest_digest, manifest_size) = write_blob(&manifest)?;
    let tag = cosign_tag(signed_digest);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": MEDIA_MANIFEST,
        "digest": manifest_digest,
        "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": "sig"},
    }]});
    std::fs::write(
        layout.path().join("index.json"),
        serde_json::to_vec(&index)?,
    )
    .ctx(|| "writing index.json".into())?;
    std::fs::write(
        layout.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .ctx(|| "writing oci-layout".into())?;
    let reference = format!("{}/{repo}:{tag}", registry.host());
    let digest_file = layout.path().join("pushed-digest");
    // An empty registries.d: nothing from the host's configuration applies.
    let registries_d = layout.path().join("registries.d");
    std::fs::create_dir_all(&registries_d)
        .ctx(|| format!("creating {}", registries_d.display()))?;
    let mut command = Command::new("skopeo");
    command
        .arg("--insecure-policy")
        .arg("--registries.d")
        .arg(&registries_d)
        .args(["copy", "--preserve-digests", "--quiet"])
        .arg("--digestfile")
        .arg(&digest_file);
    dest_flags(&mut command, registry);
    command
        .arg(format!("oci:{}:sig", layout.path().display()))
        .arg(format!("docker://{reference}"));
    run(&mut command)?;
    let pushed = std::fs::read_to_string(&digest_file)
        .ctx(|| format!("reading {}", digest_file.display()))?;
    if pushed.trim() != manifest_digest {
        return Err(HarnessError::Io {
            what: format!(
                "skopeo pushed the cosign manifest {manifest_digest} as {}",
                pushed.trim()
            ),
            source: std::io::Error::other("manifest rewritten"),
        });
    }
    Ok(CosignPush {
        tag,
        reference,
        manifest_digest,
        manifest,
    })
}

/// An HTTP response read by [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// A plain-HTTP GET (no TLS, no auth, no redirects), e.g. of an open registry's
/// `/v2/…` or a lookaside URL. Runs on a thread and runtime of its own, so sync and
/// async tests can both call it.
pub fn http_get(url: &str, accept: Option<&str>) -> Result<HttpReply> {
    let url = url.to_owned();
    let accept = accept.map(str::to_owned);
    let what = format!("GET {url}");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(get(&url, accept.as_deref()))
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the request thread panicked")))
    .ctx(|| what)
}

async fn get(url: &str, accept: Option<&str>) -> std::io::Result<HttpReply> {
    let uri: hyper::Uri = url.parse().map_err(std::io::Error::other)?;
    let authority = uri
        .authority()
        .ok_or_else(|| std::io::Error::other("no host in the URL"))?
        .to_string();
    let stream = tokio::net::TcpStream::connect(&authority).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    let mut request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, &authority);
    if let Some(accept) = accept {
        request = request.header(hyper::header::ACCEPT, accept);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(std::io::Error::other)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes()
        .to_vec();
    Ok(HttpReply {
        status,
        content_type,
        body,
    })
}

fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    )
}
