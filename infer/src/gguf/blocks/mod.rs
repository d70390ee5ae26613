//! ggml's block codecs: f32 rows to a type's bytes and back, bit for bit as `ggml-quants.c`
//! (`ggml_quantize_chunk`, `dequantize_row_*`), with fp16/bf16 as `ggml-impl.h` converts them.
use super::types::GgmlType;
use crate::error::{Error, Result};

pub mod half;
pub(crate) mod kquants;
pub(crate) mod legacy;
pub mod search;

use legacy::Legacy;

/// Quantizes `src`, rows of `n_per_row` weights, into `ty`'s blocks as `ggml_quantize_chunk`
/// does. `importance`, one weight per column (llama.cpp's imatrix), switches to ggml's
/// weighted search (`quantize_row_*_impl`) where the type has one; Q8_0 and the float types
/// ignore it, as ggml does.
pub fn quantize(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    check_quantize(ty, src, n_per_row, importance)?;
    let mut out = Vec::with_capacity(src.len() / ty.block_size() * ty.type_size());
    match ty {
        GgmlType::F32 => src.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => src
            .iter()
            .for_each(|&v| out.extend(half::f32_to_f16(v).to_le_bytes())),
        GgmlType::BF16 => src
            .iter()
            .for_each(|&v| out.extend(half::f32_to_bf16(v).to_le_bytes())),
        GgmlType::Q8_0 => src
            .chunks_exact(legacy::QK)
            .for_each(|xb| legacy::q8_block(xb, false, &mut out)),
        _ => {
            for row in src.chunks_exact(n_per_row) {
                match ty {
                    GgmlType::Q4_0 => legacy::quantize_row(Legacy::Q4_0, row, importance, &mut out),
                    GgmlType::Q4_1 => legacy::quantize_row(Legacy::Q4_1, row, importance, &mut out),
                    GgmlType::Q5_0 => legacy::quantize_row(Legacy::Q5_0, row, importance, &mut out),
                    GgmlType::Q5_1 => legacy::quantize_row(Legacy::Q5_1, row, importance, &mut out),
                    _ => kquants::quantize_row(ty, row, importance, &mut out),
                }
            }
        }
    }
    Ok(out)
}

/// Dequantizes `n` weights of type `ty` from `bytes` (`dequantize_row_*`, or `to_float` of
/// ggml's type traits for the float types).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    if !supported(ty) {
        return Err(unsupported(ty, "dequantizing"));
    }
    let want = ty.row_bytes(n).ok_or_else(|| {
        Error::Input(format!(
            "{n} weights are not a whole number of {} blocks of {}",
            ty.name(),
            ty.block_size()
        ))
    })?;
    if bytes.len() != want {
        return Err(Error::Input(format!(
            "{n} {} weights take {want} bytes, got {}",
            ty.name(),
            bytes.len()
        )));
    }
    let mut y = vec![0f32; n];
    let (bs, ts) = (ty.block_size(), ty.type_size());
    // Whole blocks only (`bytes.len()` checked above): each `b` is one block of the type's
    // `type_size` bytes and `yb` its `block_size` weights, so the block decoders' fixed
    // offsets are in range.
    for (b, yb) in bytes.chunks_exact(ts).zip(y.chunks_exact_mut(bs)) {
        match ty {
            GgmlType::F32 => yb[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => yb[0] = half::f16_at(b, 0),
            GgmlType::BF16 => yb[0] = half::bf16_to_f32(half::le16(b, 0)),
            GgmlType::Q8_0 => legacy::dequantize_q8_0(b, yb),
            GgmlType::Q4_0 => legacy::dequantize_block(Legacy::Q4_0, b, yb),
            GgmlType::Q4_1 => legacy::dequantize_block(Legacy::Q4_1, b, yb),
            GgmlType::Q5_0 => legacy::dequantize_block(Legacy::Q5_0, b, yb),
            GgmlType::Q5_1 => legacy::dequantize_block(Legacy::Q5_1, b, yb),
            _ => kquants::dequantize_block(ty, b, yb),
        }
    }
    Ok(y)
}

/// Whether every weight of `bytes` (whole blocks of `ty`) dequantizes to a finite value,
/// without dequantizing: the quantized types' weights are small integers times their
/// blocks' f16 scales (and minus f16 mins), each bounded by 65504·255, so they are all
/// finite exactly when those f16 fields are. None for a type this does not cover.
pub fn all_finite(ty: GgmlType, bytes: &[u8]) -> Option<bool> {
    // the byte offsets of the f16 scale and min fields in one block (`ggml-common.h`)
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => return None,
    };
    let finite = |b: &[u8], at: usize| half::le16(b, at) & 0x7c00 != 0x7c00;
    Some(
        bytes
            .chunks_exact(ty.type_size())
            .all(|b| fields.iter().all(|&at| finite(b, at))),
    )
}

/// Whether `quantize` and `dequantize` handle `ty`: the types `llama-quantize` writes for a
/// GPT-2 under q8_0, q4_0 and q4_k_m (with their fallbacks), and the float types.
pub fn supported(ty: GgmlType) -> bool {
    !matches!(
        ty,
        GgmlType::Q8_1 | GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q8_K
    )
}

fn unsupported(ty: GgmlType, what: &str) -> Error {
    Error::Input(format!("{what} ggml type {} is not supported", ty.name()))
}

fn check_quantize(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    importance: Option<&[f32]>,
) -> Result<()> {
    if !supported(ty) {
        return Err(unsupported(ty, "quantizing to"));
    }
    let name = ty.name();
    if n_per_row == 0 || !n_per_row.is_multiple_of(ty.block_size()) {
        return Err(Error::Input(format!(
            "rows of {n_per_row} weights are not a whole number of {name} blocks of {}",
            ty.block_size()
        )));
    }
    if !src.len().is_multiple_of(n_per_row) {
        return Err(Error::Input(format!(
            "{} weights are not a whole number of rows of {n_per_row}",
            src.len()
        )));
    }
    if let Some(imp) = importance {
        if imp.len() != n_per_row {
            return Err(Error::Input(format!(
                "the importance vector has {} entries, rows have {n_per_row} weights",
                imp.len()
            )));
        }
        if imp.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(Error::Input(
                "the importance vector holds a negative, NaN or infinite entry".into(),
            ));
        }
    }
    // ggml's block searches have no defined result for NaN or ±inf (its float-to-int
    // conversions are undefined there); only the float types carry them through.
    let float = matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    if !float && src.iter().any(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "weights hold NaN or infinite values, which {name} cannot represent"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `all_finite` agrees with dequantizing, whatever 16-bit field of a block is made
    /// infinite or NaN: it reads exactly the fields that scale the weights.
    #[test]
    fn all_finite_reads_exactly_the_scale_fields() {
        let n = 256;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let src: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        let finite = |ty, b: &[u8]| dequantize(ty, b, n).unwrap().iter().all(|v| v.is_finite());
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_1,
            GgmlType::Q5_1,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let bytes = quantize(ty, &src, n, None).unwrap();
            assert_eq!(all_finite(ty, &bytes), Some(true), "{ty:?}");
            let mut flagged = 0;
            for at in 0..ty.type_size() - 1 {
                for bits in [0x7c00u16, 0xfe00] {
                    let mut b = bytes.clone();
                    b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
                    let ours = all_finite(ty, &b).unwrap();
                    assert_eq!(ours, finite(ty, &b), "{ty:?}, {bits:#x} at byte {at}");
                    flagged += usize::from(!ours);
                }
            }
            assert!(flagged > 0, "{ty:?}: no field was found");
        }
        assert_eq!(all_finite(GgmlType::F32, &[0; 4]), None);
    }
}
