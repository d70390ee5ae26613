//! Compiles `shim/optim.cpp` (libtorch's fused AdamW, TF32 switches and autocast, which
//! tch does not bind) against the headers of the libtorch in `LIBTORCH`.
fn main() {
    let Some(root) = shimbuild::libtorch() else {
        return;
    };
    shimbuild::shim(&root, "optim").compile("gpt2kit_optim");
}
