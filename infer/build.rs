//! Compiles `shim/rng.cpp` (libtorch's generator state, which tch does not bind) against
//! the headers of the libtorch in `LIBTORCH`, as torch-sys compiles its own C++ wrapper;
//! the libraries it calls (torch_cpu, c10) are linked by torch-sys.
//!
//! Builds `shim/cuda_graph.cpp` into a shared object of its own (embedded in the crate,
//! loaded at run time after `libtorch_cuda.so`, see `src/cuda_graph.rs`) against the
//! wheel's CUDA headers (`nvidia/cu13/include` beside torch) and the CUDA `crt` headers
//! the wheels leave out (`CUDA_CRT_INCLUDE`, which `make setup` unpacks from PyPI's
//! `nvidia-cuda-crt`). Without those headers the crate builds with no CUDA graphs (a
//! warning says so): asking for them on CUDA then says so once and runs uncaptured.
//!
//! Also keeps `libtorch_cuda.so` linked into the engine's test and example binaries, as
//! the root `build.rs` does for `gpt2kit` itself: nothing in them names a symbol of it, so
//! the linker's default `--as-needed` drops it and CUDA is then silently unavailable
//! (tests that compare CUDA with the CPU would skip on a GPU machine).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/cuda_graph.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_CRT_INCLUDE");
    println!("cargo::rustc-check-cfg=cfg(gpt2kit_cuda_graphs)");
    let Some(root) = shimbuild::libtorch() else {
        return;
    };
    shimbuild::shim(&root, "rng").compile("gpt2kit_rng");
    compile_graph_plugin(&root);

    let lib = root.join("lib");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        for kind in ["tests", "examples"] {
            println!("cargo:rustc-link-arg-{kind}=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}

/// The CUDA graph plugin, or a warning and no `gpt2kit_cuda_graphs` cfg when the headers
/// it needs are missing. Its symbols (libtorch_cuda's, c10_cuda's, the CUDA runtime's)
/// stay undefined: they resolve against the libraries `device::load_cuda` loads (with
/// RTLD_GLOBAL) before the plugin is opened.
fn compile_graph_plugin(root: &std::path::Path) {
    let cuda = root.join("../nvidia/cu13/include");
    let crt = std::env::var_os("CUDA_CRT_INCLUDE").map(PathBuf::from);
    let graph_h = root.join("include/ATen/cuda/CUDAGraph.h");
    let ready = cuda.join("cuda_runtime_api.h").exists()
        && graph_h.exists()
        && crt
            .as_ref()
            .is_some_and(|c| c.join("crt/host_config.h").exists());
    if !ready {
        println!(
            "cargo::warning=no CUDA graphs in this build: the CUDA headers beside torch \
             (nvidia/cu13/include), ATen/cuda/CUDAGraph.h or CUDA_CRT_INCLUDE's \
             crt/host_config.h are missing (`make setup` provides them)"
        );
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("libgpt2kit_cuda_graph.so");
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args([
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-shared",
        "-D_GLIBCXX_USE_CXX11_ABI=1",
    ]);
    let crt = crt.expect("checked above");
    for dir in [
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
        cuda,
        crt,
    ] {
        cmd.arg("-isystem").arg(dir);
    }
    cmd.arg("shim/cuda_graph.cpp").arg("-o").arg(&out);
    let status = cmd.status().expect("running the C++ compiler");
    assert!(status.success(), "compiling shim/cuda_graph.cpp failed");
    println!("cargo:rustc-cfg=gpt2kit_cuda_graphs");
    println!(
        "cargo:rustc-env=GPT2KIT_CUDA_GRAPH_PLUGIN={}",
        out.display()
    );
}
