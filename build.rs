//! Keeps `libtorch_cuda.so` linked into the `gpt2kit` binary.
//!
//! Nothing in the binary names a symbol of `libtorch_cuda.so`, so the linker's default
//! `--as-needed` drops it and CUDA is then silently unavailable at run time. Where the
//! libtorch in use ships the library, link it explicitly. The rpath to the libtorch lib
//! folder comes from `.cargo/config.toml`, which `make setup` writes.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(root) = std::env::var_os("LIBTORCH") else {
        return;
    };
    let lib = PathBuf::from(root).join("lib");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
