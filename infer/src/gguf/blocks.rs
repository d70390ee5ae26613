//! ggml's block codecs: f32 rows to a type's bytes and back, bit for bit as `ggml-quants.c`.
use super::types::GgmlType;
use crate::error::{Error, Result};

/// Quantizes `src`, rows of `n_per_row` weights, into `ty`'s blocks. `importance`, one weight
/// per column (llama.cpp's imatrix), switches to ggml's weighted search where the type has one.
pub fn quantize(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let _ = (src, n_per_row, importance);
    Err(Error::Input(format!(
        "quantizing to ggml type {} is not supported",
        ty.name()
    )))
}

/// Dequantizes `n` weights of type `ty` from `bytes`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let _ = (bytes, n);
    Err(Error::Input(format!(
        "dequantizing ggml type {} is not supported",
        ty.name()
    )))
}
