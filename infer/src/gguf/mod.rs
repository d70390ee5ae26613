//! llama.cpp's GGUF format: the ggml tensor types and their block codecs (`types`, `blocks`),
//! row dot products over the blocks (`dot`) and layers that run on them (`matmul`),
//! the container (`file`, `meta`), and a GPT-2 read from one (`load`).
pub mod blocks;
pub mod dot;
pub mod file;
pub mod gpt2;
pub mod load;
pub mod matmul;
pub mod meta;
pub mod types;
pub mod vocab;

pub use file::{GgufFile, Header, TensorData, TensorInfo};
pub use meta::Value;
pub use types::GgmlType;

/// Whether `path` names a GGUF file (a file whose name ends in `.gguf`), not a folder.
pub fn is_gguf(path: &std::path::Path) -> bool {
    !path.is_dir()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
