//! Compiles `shim/optim.cpp` (libtorch's fused AdamW and TF32 switches, which tch does
//! not bind) against the headers of the libtorch in `LIBTORCH`, as infer's build script
//! compiles its generator shim; the libraries it calls are linked by torch-sys.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim/optim.cpp");
    let Some(root) = std::env::var_os("LIBTORCH") else {
        println!(
            "cargo::error=LIBTORCH is not set: point it at a libtorch (or a PyPI torch \
             package folder), as `make setup` does in .cargo/config.toml"
        );
        return;
    };
    let root = PathBuf::from(root);
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1");
    // `-isystem`: libtorch's headers' warnings are not ours; the shim's own still show.
    for dir in ["include", "include/torch/csrc/api/include"] {
        build.flag("-isystem").flag(root.join(dir));
    }
    build.file("shim/optim.cpp").compile("gpt2kit_optim");
}
