//! Compiles the contracts once, with a vendored `protoc` so a fresh machine needs no
//! system protobuf compiler, and writes the file descriptor set that reflection serves.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/registry.proto",
    "proto/logging.proto",
    "proto/messages.proto",
    "proto/facade.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if env::var_os("PROTOC").is_none() {
        // prost-build finds the compiler through PROTOC.
        env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("descriptor.bin"))
        .compile_protos(PROTOS, &["proto"])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
