//! Compiles the CRI v1 ImageService proto (server and client stubs; the client
//! serves the integration tests and the `cri-imaged` client subcommands), and records
//! the build's commit and compiler for `cri-imaged version`.

use std::process::Command;

/// The first line a command prints, if it runs.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then_some(())?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().next().map(|l| l.trim().to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // A new commit re-runs this script (a build from a tarball has no .git: "unknown").
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = output("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or("unknown".into());
    let dirty = output("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|line| !line.is_empty());
    let commit = if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let compiler = output(&rustc, &["--version"]).unwrap_or("unknown".into());
    println!("cargo:rustc-env=CRI_IMAGED_COMMIT={commit}");
    println!("cargo:rustc-env=CRI_IMAGED_RUSTC={compiler}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // AuthConfig carries passwords and tokens: its Debug is written by hand in
        // src/cri/convert.rs so that no log line can print them. (Upstream marks
        // these fields `debug_redact`, which Debian's protoc 3.21 does not know.)
        .skip_debug(["runtime.v1.AuthConfig"])
        .compile_protos(&["proto/runtime/v1/api.proto"], &["proto"])?;
    Ok(())
}
