//! What the crates' build scripts share: the libtorch named by `LIBTORCH` (a libtorch, or
//! a PyPI torch package folder, as `make setup` writes in `.cargo/config.toml`), and a
//! C++ build against its headers as torch-sys compiles its own wrapper (C++17, the
//! wheel's ABI, libtorch's headers as system headers so that their warnings are not
//! ours). The libraries a shim calls are linked by torch-sys.
use std::path::PathBuf;

/// The libtorch folder, or `None` after telling cargo the build cannot go on.
pub fn libtorch() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    match std::env::var_os("LIBTORCH") {
        Some(root) => Some(PathBuf::from(root)),
        None => {
            println!(
                "cargo::error=LIBTORCH is not set: point it at a libtorch (or a PyPI torch \
                 package folder), as `make setup` does in .cargo/config.toml"
            );
            None
        }
    }
}

/// A C++17 build of `shim/NAME.cpp` (rerun when it changes) against libtorch's headers
/// in `root`.
pub fn shim(root: &std::path::Path, name: &str) -> cc::Build {
    let file = format!("shim/{name}.cpp");
    println!("cargo:rerun-if-changed={file}");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1");
    for dir in ["include", "include/torch/csrc/api/include"] {
        build.flag("-isystem").flag(root.join(dir));
    }
    build.file(file);
    build
}
