//! Keeps `libtorch_cuda.so` linked into the engine's test and example binaries, as the
//! root `build.rs` does for `gpt2kit` itself: nothing in them names a symbol of it, so the
//! linker's default `--as-needed` drops it and CUDA is then silently unavailable (tests
//! that compare CUDA with the CPU would skip on a GPU machine).
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
        for kind in ["tests", "examples"] {
            println!("cargo:rustc-link-arg-{kind}=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
