//! A private containerd 1.6 per test: root, state, socket and registry host config in a
//! temp dir, its own CRI plugin enabled (runtime.v1 on the same socket), nothing bound
//! to a fixed port or shared path, so instances run side by side.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::registry::Registry;
use super::{
    must, read_log, require_tool, spawn_logged, terminate, wait_ready, HarnessError, IoContext,
    Result,
};

/// How to configure a [`Containerd`].
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// Load containerd's own CRI plugin (default: yes).
    pub cri: bool,
    /// The snapshotter CRI unpacks into (default: `overlayfs`).
    pub snapshotter: String,
    /// Appended verbatim to config.toml (for plugin options a test needs).
    pub extra_toml: String,
    /// Put containerd's root on a fresh journaled ext4 of this many MiB, loop-mounted
    /// in the temp dir (benchmarks: the machine's root ext4 has no journal, and
    /// creating many files right after deleting many slows down there round by round).
    pub journaled_root_mib: Option<u64>,
}

impl Default for ContainerdOptions {
    fn default() -> ContainerdOptions {
        ContainerdOptions {
            cri: true,
            snapshotter: "overlayfs".to_owned(),
            extra_toml: String::new(),
            journaled_root_mib: None,
        }
    }
}

/// A running containerd; stopped, unmounted and deleted on drop.
pub struct Containerd {
    child: Child,
    socket: PathBuf,
    snapshotter: String,
    log: PathBuf,
    /// Whether the CRI plugin runs (what readiness waits for).
    cri: bool,
    // Last: removed after the process is gone.
    dir: TempDir,
}

/// The namespace containerd's CRI (and cri-imaged) keep images in.
pub const NAMESPACE: &str = "k8s.io";

impl Containerd {
    /// containerd with its CRI plugin and the overlayfs snapshotter.
    pub fn start() -> Containerd {
        must(Containerd::try_start(ContainerdOptions::default()))
    }

    pub fn start_with(options: ContainerdOptions) -> Containerd {
        must(Containerd::try_start(options))
    }

    pub fn try_start(options: ContainerdOptions) -> Result<Containerd> {
        require_tool("containerd", "containerd runc")?;
        require_tool("ctr", "containerd")?;
        require_tool("runc", "runc")?;
        let dir = tempfile::Builder::new()
            .prefix("cri-imaged-containerd-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let base = dir.path();
        for sub in ["root", "state", "certs.d", "cni/conf", "cni/bin", "opt"] {
            std::fs::create_dir_all(base.join(sub))
                .ctx(|| format!("creating {}", base.join(sub).display()))?;
        }
        if let Some(mib) = options.journaled_root_mib {
            mount_journaled(&base.join("root-fs.img"), mib, &base.join("root"))?;
        }
        let socket = base.join("containerd.sock");
        let config_path = base.join("config.toml");
        std::fs::write(&config_path, config_toml(base, &socket, &options))
            .ctx(|| format!("writing {}", config_path.display()))?;

        let log = base.join("containerd.log");
        let mut child = spawn_logged(
            Command::new("containerd").arg("--config").arg(&config_path),
            &log,
            "containerd",
        )?;

        // "successfully booted" follows the gRPC server start; "Start streaming
        // server" is the CRI plugin's last step before it accepts requests (before
        // that, CRI calls fail with "server is not initialized yet").
        let cri = options.cri;
        let waited = wait_ready(
            "containerd",
            &mut child,
            &log,
            Duration::from_secs(60),
            || {
                let text = read_log(&log);
                let booted = text.contains("containerd successfully booted");
                let cri_ready = !cri || text.contains("Start streaming server");
                (booted && cri_ready).then_some(())
            },
        );
        let containerd = Containerd {
            child,
            socket,
            snapshotter: options.snapshotter,
            log,
            cri,
            dir,
        };
        waited?;
        let version = containerd.ctr(&["version"]);
        if !version.status.success() {
            return Err(HarnessError::NotReady {
                what: format!(
                    "containerd (ctr version: {})",
                    String::from_utf8_lossy(&version.stderr)
                ),
                waited: Duration::ZERO,
                log: containerd.log(),
            });
        }
        Ok(containerd)
    }

    /// The gRPC socket path (what `--address` and cri-imaged's config take).
    pub fn address(&self) -> String {
        self.socket.display().to_string()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// The CRI plugin's `registry.config_path` (one `HOST:PORT/hosts.toml` per host).
    /// containerd reads it on every pull, so hosts can be added after start.
    pub fn certs_d(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// Writes `hosts.toml` for `host` (`127.0.0.1:PORT`) under [`Containerd::certs_d`].
    pub fn add_hosts_toml(&self, host: &str, hosts_toml: &str) {
        let dir = self.certs_d().join(host);
        must(std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display())));
        let path = dir.join("hosts.toml");
        must(std::fs::write(&path, hosts_toml).ctx(|| format!("writing {}", path.display())));
    }

    /// Lets containerd's CRI pull from `registry`: plain HTTP for an open registry,
    /// the registry's CA for TLS ones. Credentials come with each PullImage request.
    pub fn add_registry(&self, registry: &Registry) {
        let mut toml = format!(
            "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n",
            registry.url(),
            registry.url()
        );
        if let Some(ca) = registry.ca_path() {
            toml.push_str(&format!("  ca = \"{}\"\n", ca.display()));
        }
        self.add_hosts_toml(registry.host(), &toml);
    }

    /// Runs `ctr --address SOCK -n k8s.io ARGS…` and returns whatever happened.
    pub fn ctr(&self, args: &[&str]) -> Output {
        must(
            self.ctr_command(args)
                .output()
                .ctx(|| format!("running ctr {args:?}")),
        )
    }

    /// `ctr --address SOCK -n k8s.io ARGS…` with stdin closed, not yet run.
    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", NAMESPACE])
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// [`Containerd::ctr`] that must succeed; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        succeeded(self.ctr(args), || format!("ctr {args:?}"))
    }

    /// Runs `args` in a new container from `image` (`ctr run --rm`) and returns what
    /// happened. Use this rather than a raw `ctr run`: runc keeps container state under
    /// a host-wide root and cgroups are named `/k8s.io/<id>`, so two containerds
    /// running the same container ID collide. Here the ID is unique and runc's root
    /// lives in this instance's temp dir.
    pub fn run_container(&self, image: &str, args: &[&str]) -> Output {
        let id = self.unique_id("run");
        let runc_root = self.state().join("runc");
        let runc_root = runc_root.display().to_string();
        let mut ctr_args = vec!["run", "--rm", "--runc-root", &runc_root, image, &id];
        ctr_args.extend_from_slice(args);
        self.ctr(&ctr_args)
    }

    /// [`Containerd::run_container`] that must succeed; returns stdout.
    pub fn run_ok(&self, image: &str, args: &[&str]) -> String {
        succeeded(self.run_container(image, args), || {
            format!("running {args:?} in {image}")
        })
    }

    /// An ID no other containerd instance (in this or another test process) uses.
    pub fn unique_id(&self, prefix: &str) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let instance = self
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!(
            "{prefix}-{}-{}",
            instance.trim_start_matches("cri-imaged-containerd-"),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Image record names in `k8s.io` (`ctr images ls -q`).
    pub fn image_names(&self) -> Vec<String> {
        self.ctr_ok(&["images", "ls", "-q"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Whether `image` is complete and unpacked into this containerd's snapshotter
    /// (`ctr images check`). `ctr run` unpacks on its own, so a test that wants to
    /// prove someone else unpacked must ask before running.
    pub fn is_unpacked(&self, image: &str) -> bool {
        let out = self.ctr_ok(&[
            "images",
            "check",
            "--snapshotter",
            &self.snapshotter,
            &format!("name=={image}"),
        ]);
        // Columns: REF TYPE DIGEST STATUS SIZE UNPACKED
        out.lines()
            .skip(1)
            .any(|line| line.starts_with(image) && line.trim_end().ends_with("true"))
    }

    /// Digests of every blob in the content store in `k8s.io` (`ctr content ls -q`).
    pub fn content_digests(&self) -> Vec<String> {
        self.ctr_ok(&["content", "ls", "-q"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Keys of every snapshot in `k8s.io` in this containerd's snapshotter.
    pub fn snapshot_keys(&self) -> Vec<String> {
        // Columns: KEY PARENT KIND.
        self.ctr_ok(&["snapshots", "--snapshotter", &self.snapshotter, "ls"])
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// Stops containerd (SIGTERM, as a service restart does) and starts it again with
    /// the same config: same socket, root and state. Clients' connections break; its
    /// log goes on in a new file.
    pub fn restart(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
        let config = self.dir.path().join("config.toml");
        self.log = self.dir.path().join("containerd-restarted.log");
        self.child = must(spawn_logged(
            Command::new("containerd").arg("--config").arg(&config),
            &self.log,
            "the restarted containerd",
        ));
        let (log, cri) = (self.log.clone(), self.cri);
        must(wait_ready(
            "restarted containerd",
            &mut self.child,
            &self.log,
            Duration::from_secs(60),
            || {
                let text = read_log(&log);
                let booted = text.contains("containerd successfully booted");
                (booted && (!cri || text.contains("Start streaming server"))).then_some(())
            },
        ));
    }

    /// The containerd process's ID (to read its CPU time from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Containerd {
    /// Kills and deletes tasks left running (a test that failed mid-run): killing
    /// only the shim would orphan the container's processes.
    fn remove_tasks(&self) {
        let run = |args: &[&str]| self.ctr_command(args).output().ok();
        let Some(listed) = run(&["tasks", "ls", "-q"]) else {
            return;
        };
        for id in String::from_utf8_lossy(&listed.stdout).lines() {
            run(&["tasks", "rm", "-f", id]);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Never panic here: a drop during a failing test's unwind would abort.
        self.remove_tasks();
        terminate(&mut self.child, Duration::from_secs(10));
        kill_shims(&self.socket);
        unmount_under(self.dir.path());
    }
}

fn config_toml(base: &Path, socket: &Path, options: &ContainerdOptions) -> String {
    let p = |sub: &str| base.join(sub).display().to_string();
    let mut toml = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
{disabled}
[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = p("root"),
        state = p("state"),
        socket = socket.display(),
        opt = p("opt"),
        // Top-level keys must come before the first table.
        disabled = if options.cri {
            ""
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        },
    );
    if options.cri {
        // Stream server on an ephemeral loopback port; CNI config in our dir (no pod
        // networking is needed to pull images or for `ctr run`).
        toml.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"

  # runc's state root defaults to the host-wide /run/containerd/runc.
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    Root = "{runc_root}"

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs_d}"
"#,
            cni_bin = p("cni/bin"),
            cni_conf = p("cni/conf"),
            snapshotter = options.snapshotter,
            certs_d = p("certs.d"),
            runc_root = p("state/runc"),
        ));
    }
    toml.push_str(&options.extra_toml);
    toml
}

/// The stdout of a command that must have succeeded; a failure panics with both
/// streams.
fn succeeded(out: Output, what: impl FnOnce() -> String) -> String {
    assert!(
        out.status.success(),
        "{} failed ({}): {}\nstdout: {}",
        what(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills shims left by this containerd (a container still running when the test
/// ended). They carry our socket path in their `-address` argument.
fn kill_shims(socket: &Path) {
    let needle = socket.as_os_str().as_encoded_bytes();
    for (pid, dir) in super::processes() {
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        let is_shim = args
            .next()
            .is_some_and(|arg0| arg0.ends_with(b"containerd-shim-runc-v2"));
        if is_shim && cmdline.split(|b| *b == 0).any(|arg| arg == needle) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Detaches every mount below `dir` (overlay rootfs, shm), deepest first, so the temp
/// dir can be removed.
/// Makes `image` a sparse file of `mib` MiB holding a journaled ext4, and mounts it
/// on `at` (unmounted with the rest of the temp dir by [`unmount_under`]).
fn mount_journaled(image: &Path, mib: u64, at: &Path) -> Result<()> {
    require_tool("mkfs.ext4", "e2fsprogs")?;
    let file = std::fs::File::create(image).ctx(|| format!("creating {}", image.display()))?;
    file.set_len(mib << 20)
        .ctx(|| format!("sizing {}", image.display()))?;
    drop(file);
    super::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "has_journal"])
            .arg(image),
    )?;
    super::run(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(at),
    )?;
    Ok(())
}

fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut targets: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|target| target.starts_with(dir))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    for target in targets {
        let _ = rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH);
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(Ok(v)) = field.get(i + 1..i + 4).map(|o| u8::from_str_radix(o, 8)) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
