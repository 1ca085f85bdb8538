//! Generates the gRPC contracts from `proto/` with protox (pure Rust, no `protoc`)
//! and writes the encoded file descriptor set used by server reflection.

use std::path::PathBuf;

use prost::Message as _;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &[
    "form/types/v1/types.proto",
    "form/state/v1/state.proto",
    "form/state/v1/gossip.proto",
    "form/rplb/v1/rplb.proto",
    "form/vmm/v1/vmm.proto",
    "form/scaler/v1/scaler.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let fds = protox::compile(PROTOS, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("form_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // JSON output of tools (formctl state dump --json) and the gateway.
        .type_attribute(".form", "#[derive(serde::Serialize)]")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
