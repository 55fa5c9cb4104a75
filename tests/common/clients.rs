//! gRPC clients whose transport we did not write, driven over a CRI socket: a grpc-go
//! 1.33 program dialled as kubelet 1.26 dials (tests/clients/go) and a Python grpcio
//! script (tests/clients/python). Each runs an RPC sequence and prints JSON, read
//! back here into [`SequenceRun`], the same shape [`tonic_sequence`] gives for our
//! own client. [`HeaderRecorder`] shows the HTTP/2 headers a client sends.
//!
//! The Go binary is built once per test process, offline, from Debian's packaged
//! sources in GOPATH mode; the Python venv is created once per requirements file and
//! kept under `target/`. Both are made in a temp path and renamed into place, so test
//! processes running at once never see half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tonic::Code;

use super::cri::{self, proto};
use super::registry::Credentials;
use super::{
    must, read_log, require_tool, run, spawn_logged, terminate, wait_ready, HarnessError,
    IoContext, Result,
};

/// Debian's GOPATH: golang-google-grpc-dev and golang-google-protobuf-dev put their
/// sources here.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";
/// Debian's own interpreter, the one python3-venv provides `venv` for (a pyenv or
/// other `python3` earlier on PATH may lack it).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// Every RPC, in the order kubelet's image manager would use them.
pub const FULL_SEQUENCE: &[&str] = &[
    "ImageFsInfo",
    "PullImage",
    "ListImages",
    "ImageStatus",
    "StreamImages",
    "RemoveImage",
    "ImageStatus",
];

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Where the built client, the descriptor set and the venv live: target/tmp/clients.
fn work_dir() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("clients");
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A path beside `path` that no other process or thread writes to.
fn private_temp(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

/// Caches a harness result for the whole test process; every caller gets the first
/// outcome (a failure is reported to each test that needs it).
fn once(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    make: fn() -> Result<PathBuf>,
) -> &'static Path {
    match cell.get_or_init(|| make().map_err(|e| e.to_string())) {
        Ok(path) => path,
        Err(e) => panic!("test harness: {e}"),
    }
}

/// The FileDescriptorSet of proto/runtime/v1/api.proto both clients build their
/// messages from (so neither needs generated code).
pub fn descriptor_set() -> &'static Path {
    static CELL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&CELL, make_descriptor_set)
}

fn make_descriptor_set() -> Result<PathBuf> {
    require_tool("protoc", "protobuf-compiler")?;
    let proto_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let out = work_dir()?.join("api.pb");
    let temp = private_temp(&out);
    run(Command::new("protoc")
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", temp.display()))
        .arg("-I")
        .arg(&proto_root)
        .arg(proto_root.join("runtime/v1/api.proto")))?;
    std::fs::rename(&temp, &out).ctx(|| format!("renaming {} into place", temp.display()))?;
    Ok(out)
}

/// The grpc-go client binary, built on first use in this process.
pub fn go_client() -> &'static Path {
    static CELL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&CELL, build_go_client)
}

fn build_go_client() -> Result<PathBuf> {
    require_tool("go", "golang")?;
    for (package_dir, package) in [
        ("google.golang.org/grpc", "golang-google-grpc-dev"),
        ("google.golang.org/protobuf", "golang-google-protobuf-dev"),
    ] {
        if !Path::new(DEBIAN_GOPATH)
            .join("src")
            .join(package_dir)
            .is_dir()
        {
            return Err(HarnessError::MissingTool {
                tool: "grpc-go / Go protobuf sources in /usr/share/gocode",
                package,
            });
        }
    }
    let work = work_dir()?;
    let binary = work.join("cri-client-go");
    let temp = private_temp(&binary);
    // GOPATH mode against Debian's packaged sources: no go.mod, no module download,
    // and GOPROXY=off in case anything still tried. A go.mod would pull grpc-go and
    // protobuf from the module proxy, which must not be used for this.
    run(Command::new("go")
        .current_dir(source_dir().join("go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", DEBIAN_GOPATH)
        .env("GOCACHE", work.join("go-cache"))
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        // No C toolchain needed, and the binary does not depend on the host's libc.
        .env("CGO_ENABLED", "0")
        .arg("build")
        .arg("-o")
        .arg(&temp)
        .arg(".")
        .stdin(Stdio::null()))?;
    // Atomic: a test in another process may be running the previous binary.
    std::fs::rename(&temp, &binary).ctx(|| format!("renaming {} into place", temp.display()))?;
    Ok(binary)
}

/// The venv's interpreter, with the pinned grpcio and protobuf installed; the venv
/// is created on first use and then reused by every later test process.
pub fn python_venv() -> &'static Path {
    static CELL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&CELL, || {
        venv_with(&source_dir().join("python/requirements.txt"))
    })
}

/// The interpreter of a venv holding `requirements` (a pinned requirements file),
/// created under target/ on first use, named after the file's hash and reused by
/// every later test process.
pub fn venv_with(requirements: &Path) -> Result<PathBuf> {
    if !Path::new(SYSTEM_PYTHON).is_file() {
        return Err(HarnessError::MissingTool {
            tool: "python3",
            package: "python3-venv",
        });
    }
    let pinned =
        std::fs::read(requirements).ctx(|| format!("reading {}", requirements.display()))?;
    let key = hex::encode(Sha256::digest(&pinned));
    let venv = work_dir()?.join(format!("venv-{}", &key[..16]));
    let python = venv.join("bin/python");
    // Written last, so a venv whose creation was interrupted is never used.
    let complete = |dir: &Path| dir.join("cri-imaged-tests-complete");
    if complete(&venv).is_file() {
        return Ok(python);
    }
    let temp = private_temp(&venv);
    if let Err(e) = fill_venv(&temp, requirements) {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e);
    }
    std::fs::write(complete(&temp), b"").ctx(|| format!("marking {}", temp.display()))?;
    // A venv finds its packages from its own location (pyvenv.cfg beside bin/), so
    // it may be renamed. If another process won the race, use its venv.
    match std::fs::rename(&temp, &venv) {
        Ok(()) => {}
        Err(_) if complete(&venv).is_file() => {
            let _ = std::fs::remove_dir_all(&temp);
        }
        Err(source) => {
            return Err(HarnessError::Io {
                what: format!("renaming {} to {}", temp.display(), venv.display()),
                source,
            })
        }
    }
    Ok(python)
}

/// Creates a venv at `dir` and installs `requirements` into it from PyPI.
fn fill_venv(dir: &Path, requirements: &Path) -> Result<()> {
    let made = run(Command::new(SYSTEM_PYTHON)
        .args(["-m", "venv"])
        .arg(dir)
        .stdin(Stdio::null()));
    if let Err(e) = made {
        return Err(match e {
            // Debian splits ensurepip into python3-venv; say so rather than only
            // passing on Python's message.
            HarnessError::CommandFailed { stderr, .. } if stderr.contains("ensurepip") => {
                HarnessError::MissingTool {
                    tool: "python3 -m venv",
                    package: "python3-venv",
                }
            }
            other => other,
        });
    }
    // The interpreter is called directly, since the pip script's shebang names this
    // temp path and the venv is about to move.
    run(Command::new(dir.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("-r")
        .arg(requirements)
        .env("PIP_NO_INPUT", "1")
        .stdin(Stdio::null()))?;
    Ok(())
}

/// How the Python client sets the channel's authority (`grpc.default_authority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PythonAuthority {
    /// No option: grpc-core derives it from the `unix://` target.
    Default,
    /// The raw socket path, as a client copying kubelet's habit would set it.
    SocketPath,
    /// The empty string.
    Empty,
}

/// A client program we did not write the gRPC transport of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// grpc-go 1.33, dialled with the bare socket path (kubelet 1.26, crictl 1.26).
    Go,
    /// Python grpcio, target `unix:///abs/path`.
    Python(PythonAuthority),
}

/// What to ask for: the image, the PullImage credentials, and which RPCs in order.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub image: String,
    pub auth: Option<Credentials>,
    pub steps: Vec<&'static str>,
}

impl Sequence {
    /// [`FULL_SEQUENCE`] on `image`, pulling with `auth`.
    pub fn full(image: &str, auth: Option<&Credentials>) -> Sequence {
        Sequence::of(image, auth, FULL_SEQUENCE)
    }

    pub fn of(image: &str, auth: Option<&Credentials>, steps: &[&'static str]) -> Sequence {
        Sequence {
            image: image.to_owned(),
            auth: auth.cloned(),
            steps: steps.to_vec(),
        }
    }
}

impl Client {
    /// Runs `sequence` against the CRI socket `socket` and returns what the client
    /// printed. Fails only if the program itself fails; gRPC errors are in the run.
    pub fn run(self, socket: &Path, sequence: &Sequence) -> SequenceRun {
        must(self.try_run(socket, sequence))
    }

    pub fn try_run(self, socket: &Path, sequence: &Sequence) -> Result<SequenceRun> {
        let mut spec = serde_json::json!({
            "descriptor_set": descriptor_set(),
            "image": sequence.image,
            "steps": sequence.steps,
            // Bounds a hang; a pull of the small test images takes well under this.
            "timeout_seconds": 60,
        });
        if let Some(c) = &sequence.auth {
            spec["auth"] = serde_json::json!({"username": c.username, "password": c.password});
        }
        let mut command = match self {
            Client::Go => {
                spec["socket"] = socket.display().to_string().into();
                Command::new(go_client())
            }
            Client::Python(authority) => {
                spec["target"] = format!("unix://{}", socket.display()).into();
                let options = match authority {
                    PythonAuthority::Default => serde_json::json!([]),
                    PythonAuthority::SocketPath => {
                        serde_json::json!([[
                            "grpc.default_authority",
                            socket.display().to_string()
                        ]])
                    }
                    PythonAuthority::Empty => serde_json::json!([["grpc.default_authority", ""]]),
                };
                spec["channel_options"] = options;
                let mut command = Command::new(python_venv());
                command.arg(source_dir().join("python/cri_client.py"));
                command
            }
        };
        // The spec (with the password) goes on stdin, never on the command line.
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ctx(|| format!("starting the {self:?} client"))?;
        let stdin = child.stdin.take();
        let written = stdin
            .map(|mut stdin| std::io::Write::write_all(&mut stdin, spec.to_string().as_bytes()))
            .unwrap_or(Ok(()));
        let output = child
            .wait_with_output()
            .ctx(|| format!("waiting for the {self:?} client"))?;
        written.ctx(|| format!("writing the spec to the {self:?} client"))?;
        if !output.status.success() {
            return Err(HarnessError::CommandFailed {
                command: format!("{self:?} client on {}", socket.display()),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        let printed: PrintedRun = serde_json::from_slice(&output.stdout)?;
        Ok(printed.into_run())
    }
}

/// An image as the RPCs report it, the fields a client can compare across servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageView {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
    pub uid: Option<i64>,
    pub username: String,
    pub pinned: bool,
}

impl From<&proto::Image> for ImageView {
    fn from(image: &proto::Image) -> ImageView {
        ImageView {
            id: image.id.clone(),
            repo_tags: image.repo_tags.clone(),
            repo_digests: image.repo_digests.clone(),
            size: image.size,
            uid: image.uid.as_ref().map(|u| u.value),
            username: image.username.clone(),
            pinned: image.pinned,
        }
    }
}

/// A gRPC error as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

/// One RPC's answer, reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// ImageFsInfo: the image filesystems' mountpoints.
    FsInfo {
        mountpoints: Vec<String>,
    },
    /// PullImage: `image_ref`.
    Pulled {
        image_ref: String,
    },
    /// ListImages, or every StreamImages message's images in order.
    Images(Vec<ImageView>),
    /// ImageStatus: the image (None when missing) and the verbose `info` map.
    Status {
        image: Option<ImageView>,
        info: BTreeMap<String, String>,
    },
    Removed,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub rpc: String,
    pub answer: std::result::Result<Answer, RpcError>,
}

/// What a client got for a whole sequence.
#[derive(Debug, Clone)]
pub struct SequenceRun {
    /// `grpc-go`, `grpcio` or `tonic`.
    pub client: String,
    /// The client library's own version string (`grpc.Version`, `grpc.__version__`).
    pub version: String,
    pub steps: Vec<Step>,
}

impl SequenceRun {
    /// The answer of the `nth` (from 0) step named `rpc`.
    pub fn answer(&self, rpc: &str, nth: usize) -> &std::result::Result<Answer, RpcError> {
        &self
            .steps
            .iter()
            .filter(|s| s.rpc == rpc)
            .nth(nth)
            .unwrap_or_else(|| panic!("{} ran no {rpc} #{nth}: {self:#?}", self.client))
            .answer
    }
}

/// The clients' JSON output (see tests/clients/go/main.go).
#[derive(Debug, Deserialize)]
struct PrintedRun {
    client: String,
    version: String,
    results: Vec<PrintedResult>,
}

#[derive(Debug, Deserialize)]
struct PrintedResult {
    rpc: String,
    ok: bool,
    #[serde(default)]
    response: Value,
    #[serde(default)]
    responses: Vec<Value>,
    #[serde(default)]
    code: i32,
    #[serde(default)]
    message: String,
}

impl PrintedRun {
    fn into_run(self) -> SequenceRun {
        SequenceRun {
            client: self.client,
            version: self.version,
            steps: self
                .results
                .into_iter()
                .map(|r| Step {
                    answer: if r.ok {
                        Ok(answer_from_json(&r.rpc, &r.response, &r.responses))
                    } else {
                        Err(RpcError {
                            code: Code::from_i32(r.code),
                            message: r.message,
                        })
                    },
                    rpc: r.rpc,
                })
                .collect(),
        }
    }
}

/// Reads proto3 JSON (proto field names; defaults may be absent, 64-bit integers
/// are strings) into an [`Answer`].
fn answer_from_json(rpc: &str, response: &Value, responses: &[Value]) -> Answer {
    match rpc {
        "ImageFsInfo" => Answer::FsInfo {
            mountpoints: array(&response["image_filesystems"])
                .iter()
                .map(|fs| string(&fs["fs_id"]["mountpoint"]))
                .collect(),
        },
        "PullImage" => Answer::Pulled {
            image_ref: string(&response["image_ref"]),
        },
        "ListImages" => Answer::Images(
            array(&response["images"])
                .iter()
                .map(image_from_json)
                .collect(),
        ),
        "StreamImages" => Answer::Images(
            responses
                .iter()
                .flat_map(|r| array(&r["images"]))
                .map(|image| image_from_json(&image))
                .collect(),
        ),
        "ImageStatus" => Answer::Status {
            image: match &response["image"] {
                Value::Null => None,
                image => Some(image_from_json(image)),
            },
            info: response["info"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), string(v))).collect())
                .unwrap_or_default(),
        },
        "RemoveImage" => Answer::Removed,
        other => panic!("a client answered an RPC the harness never asks for: {other}"),
    }
}

fn image_from_json(image: &Value) -> ImageView {
    ImageView {
        id: string(&image["id"]),
        repo_tags: array(&image["repo_tags"]).iter().map(string).collect(),
        repo_digests: array(&image["repo_digests"]).iter().map(string).collect(),
        size: integer(&image["size"]) as u64,
        uid: match &image["uid"] {
            Value::Null => None,
            uid => Some(integer(&uid["value"])),
        },
        username: string(&image["username"]),
        pinned: image["pinned"].as_bool().unwrap_or(false),
    }
}

fn array(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

fn string(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// proto3 JSON writes 64-bit integers as strings; absent means 0.
fn integer(value: &Value) -> i64 {
    match value {
        Value::String(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("not an integer ({e}): {s:?}")),
        Value::Number(n) => n.as_i64().unwrap_or_else(|| panic!("not an i64: {n}")),
        _ => 0,
    }
}

/// [`Client::run`] for our own tonic client (`cri_imaged::client`), so its answers
/// compare with the stock clients' and with containerd's.
pub async fn tonic_sequence(socket: &Path, sequence: &Sequence) -> SequenceRun {
    let mut client = cri::connect(socket).await;
    let image = || Some(cri::image_spec(&sequence.image));
    let error = |status: tonic::Status| RpcError {
        code: status.code(),
        message: status.message().to_owned(),
    };
    let mut steps = Vec::new();
    for &rpc in &sequence.steps {
        let answer = match rpc {
            "ImageFsInfo" => client
                .image_fs_info(proto::ImageFsInfoRequest {})
                .await
                .map(|r| Answer::FsInfo {
                    mountpoints: r
                        .into_inner()
                        .image_filesystems
                        .iter()
                        .map(|fs| {
                            fs.fs_id
                                .as_ref()
                                .map(|f| f.mountpoint.clone())
                                .unwrap_or_default()
                        })
                        .collect(),
                }),
            "PullImage" => client
                .pull_image(cri::pull_request(
                    &sequence.image,
                    sequence
                        .auth
                        .as_ref()
                        .map(|c| (c.username.as_str(), c.password.as_str())),
                ))
                .await
                .map(|r| Answer::Pulled {
                    image_ref: r.into_inner().image_ref,
                }),
            "ListImages" => client
                .list_images(proto::ListImagesRequest { filter: None })
                .await
                .map(|r| {
                    Answer::Images(r.into_inner().images.iter().map(ImageView::from).collect())
                }),
            "ImageStatus" => client
                .image_status(proto::ImageStatusRequest {
                    image: image(),
                    verbose: true,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    Answer::Status {
                        image: r.image.as_ref().map(ImageView::from),
                        info: r.info.into_iter().collect(),
                    }
                }),
            "StreamImages" => stream_images(&mut client).await,
            "RemoveImage" => client
                .remove_image(proto::RemoveImageRequest { image: image() })
                .await
                .map(|_| Answer::Removed),
            other => panic!("unknown step {other}"),
        };
        steps.push(Step {
            rpc: rpc.to_owned(),
            answer: answer.map_err(error),
        });
    }
    SequenceRun {
        client: "tonic".into(),
        version: String::new(),
        steps,
    }
}

async fn stream_images(
    client: &mut cri_imaged::proto::image_service_client::ImageServiceClient<
        tonic::transport::Channel,
    >,
) -> std::result::Result<Answer, tonic::Status> {
    let mut responses = client
        .stream_images(proto::StreamImagesRequest { filter: None })
        .await?
        .into_inner();
    let mut images = Vec::new();
    while let Some(message) = responses.message().await? {
        images.extend(message.images.iter().map(ImageView::from));
    }
    Ok(Answer::Images(images))
}

/// An HTTP/2 server on a unix socket that records each request's headers and
/// answers Unimplemented (the Go client's `record-headers` mode): it sees a
/// client's `:authority` even where a validating server would reset the stream.
pub struct HeaderRecorder {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    // Last: removed after the process is gone.
    dir: tempfile::TempDir,
}

impl HeaderRecorder {
    pub fn start() -> HeaderRecorder {
        must(HeaderRecorder::try_start())
    }

    pub fn try_start() -> Result<HeaderRecorder> {
        let binary = go_client();
        let dir = tempfile::Builder::new()
            .prefix("cri-imaged-recorder-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let socket = dir.path().join("recorder.sock");
        // Stdout (one JSON line per request) and stderr share the log; the reader
        // keeps only lines that parse.
        let log = dir.path().join("recorder.log");
        let mut child = spawn_logged(
            Command::new(binary).arg("record-headers").arg(&socket),
            &log,
            "the header recorder",
        )?;
        let ready = wait_ready(
            "the header recorder",
            &mut child,
            &log,
            Duration::from_secs(10),
            || {
                std::os::unix::net::UnixStream::connect(&socket)
                    .ok()
                    .map(|_| ())
            },
        );
        if let Err(e) = ready {
            terminate(&mut child, Duration::from_secs(2));
            return Err(e);
        }
        Ok(HeaderRecorder {
            child,
            socket,
            log,
            dir,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every request recorded so far: its header fields in the order sent.
    pub fn requests(&self) -> Vec<Vec<(String, String)>> {
        #[derive(Deserialize)]
        struct Line {
            headers: Vec<(String, String)>,
        }
        read_log(&self.log)
            .lines()
            .filter_map(|line| serde_json::from_str::<Line>(line).ok())
            .map(|line| line.headers)
            .collect()
    }

    /// Waits (bounded) until `count` requests were recorded; returns them all.
    pub fn wait_requests(&self, count: usize) -> Vec<Vec<(String, String)>> {
        let started = Instant::now();
        loop {
            let requests = self.requests();
            if requests.len() >= count || started.elapsed() > Duration::from_secs(10) {
                return requests;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for HeaderRecorder {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(2));
    }
}

/// The value of header `name` in one recorded request (the first, if repeated).
pub fn header<'a>(request: &'a [(String, String)], name: &str) -> Option<&'a str> {
    request
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}
