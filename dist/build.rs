//! Compiles `shim/c10d.cpp` (c10d's TCPStore and ProcessGroupGloo, which tch does not
//! bind) against the headers of the libtorch in `LIBTORCH` and the gloo headers in
//! `GLOO_INCLUDE` (the PyPI wheel ships none; `make setup` unpacks Debian's
//! `libgloo-dev` and names its include folder in `.cargo/config.toml`). Gloo itself is
//! inside `libtorch_cpu.so`, which torch-sys links: nothing else is linked.
fn main() {
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    let Some(root) = shimbuild::libtorch() else {
        return;
    };
    let Some(gloo) = std::env::var_os("GLOO_INCLUDE") else {
        println!(
            "cargo::error=GLOO_INCLUDE is not set: `make setup` sets it in .cargo/config.toml \
             (gloo's headers from Debian's libgloo-dev)"
        );
        return;
    };
    let mut build = shimbuild::shim(&root, "c10d");
    // `-isystem`: gloo's warnings are not ours either.
    build
        .define("USE_C10D_GLOO", None)
        .flag("-isystem")
        .flag(gloo);
    build.compile("gpt2kit_c10d");
}
