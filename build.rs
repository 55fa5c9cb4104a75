//! Compiles the CRI v1 ImageService proto (server and client stubs; the client
//! serves the integration tests and the `cri-imaged` client subcommands).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
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
