//! Compiles `shim/rng.cpp` (libtorch's generator state, which tch does not bind) against
//! the headers of the libtorch in `LIBTORCH`, as torch-sys compiles its own C++ wrapper;
//! the libraries it calls (torch_cpu, c10) are linked by torch-sys.
//!
//! Also keeps `libtorch_cuda.so` linked into the engine's test and example binaries, as
//! the root `build.rs` does for `gpt2kit` itself: nothing in them names a symbol of it, so
//! the linker's default `--as-needed` drops it and CUDA is then silently unavailable
//! (tests that compare CUDA with the CPU would skip on a GPU machine).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim/rng.cpp");
    let Some(root) = std::env::var_os("LIBTORCH") else {
        println!(
            "cargo::error=LIBTORCH is not set: point it at a libtorch (or a PyPI torch \
             package folder), as `make setup` does in .cargo/config.toml"
        );
        return;
    };
    let root = PathBuf::from(root);
    compile_shim(&root);

    let lib = root.join("lib");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        for kind in ["tests", "examples"] {
            println!("cargo:rustc-link-arg-{kind}=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}

fn compile_shim(root: &std::path::Path) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1");
    // `-isystem`: libtorch's headers' warnings are not ours; the shim's own still show.
    for dir in ["include", "include/torch/csrc/api/include"] {
        build.flag("-isystem").flag(root.join(dir));
    }
    build.file("shim/rng.cpp").compile("gpt2kit_rng");
}
