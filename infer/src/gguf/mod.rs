//! llama.cpp's GGUF format: the ggml tensor types and their block codecs (`types`, `blocks`).
pub mod blocks;
pub mod dot;
pub mod types;

pub use types::GgmlType;
