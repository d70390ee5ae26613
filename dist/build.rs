//! Compiles `shim/c10d.cpp` (c10d's TCPStore and ProcessGroupGloo, which tch does not
//! bind) against the headers of the libtorch in `LIBTORCH` and the gloo headers in
//! `GLOO_INCLUDE` (the PyPI wheel ships none; `make setup` unpacks Debian's
//! `libgloo-dev` and names its include folder in `.cargo/config.toml`). Gloo itself is
//! inside `libtorch_cpu.so`, which torch-sys links: nothing else is linked.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim/c10d.cpp");
    let (Some(root), Some(gloo)) = (
        std::env::var_os("LIBTORCH"),
        std::env::var_os("GLOO_INCLUDE"),
    ) else {
        println!(
            "cargo::error=LIBTORCH or GLOO_INCLUDE is not set: `make setup` sets both in \
             .cargo/config.toml (libtorch from PyPI, gloo's headers from Debian's libgloo-dev)"
        );
        return;
    };
    let root = PathBuf::from(root);
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .define("USE_C10D_GLOO", None);
    // `-isystem`: libtorch's and gloo's warnings are not ours; the shim's own still show.
    for dir in [
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
        gloo.into(),
    ] {
        build.flag("-isystem").flag(dir);
    }
    build.file("shim/c10d.cpp").compile("gpt2kit_c10d");
}
