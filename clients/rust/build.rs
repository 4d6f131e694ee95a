//! Generates the tonic clients from `../../protos` at build time.
//!
//! protoc comes from the `protoc-bin-vendored` crate (crates.io ships the
//! binary and the well-known-type includes), so the build needs no protoc on
//! the machine.
//!
//! The protos' rule annotations resolve from the same include root
//! (`buf/validate/validate.proto`, `sysdesign/rules/v1/rules.proto`). prost
//! keeps no options, so the stubs never refer to them: it writes
//! `buf.validate.rs` for the import, which `src/main.rs` does not include, and
//! nothing for `sysdesign.rules.v1`, which declares only extensions.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "sysdesign/identity/v1/identity.proto",
    "sysdesign/shortener/v1/shortener.proto",
    "sysdesign/feed/v1/feed.proto",
    "sysdesign/chat/v1/chat.proto",
    "sysdesign/media/v1/media.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../protos");
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let includes = [root.clone(), protoc_bin_vendored::include_path()?];
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure().build_server(false).compile_protos(&files, &includes)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
