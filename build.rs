//! The `gpt2kit` binary does not link `libtorch_cuda.so`: nothing in it names a symbol of
//! that library, so the linker's default `--as-needed` leaves it out, and a run that asks
//! for a CUDA device loads it then (`infer::device::load_cuda`). A CPU run so never loads
//! CUDA's libraries (~350 MB of memory). The rpath to the libtorch lib folder comes from
//! `.cargo/config.toml`, which `make setup` writes.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
