//! Compiles the CRI v1 ImageService proto (server and client stubs; the client
//! is what the integration tests and the `cri-imaged` client subcommands use).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/runtime/v1/api.proto"], &["proto"])?;
    Ok(())
}
