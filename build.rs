//! Generates the gRPC code from proto/ with a vendored protoc, so a fresh
//! machine needs no system protoc. The file descriptor set is kept for
//! server reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tandem_descriptor.bin"))
        .compile_protos(&["proto/tandem/v1/participant.proto", "proto/tandem/v1/coordinator.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
