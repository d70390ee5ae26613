//! Row dot products of ggml weight blocks with quantized activations, as ggml-cpu's
//! `ggml_vec_dot_*_q8_*` compute them (`ggml-cpu/quants.c`, `arch/x86/quants.c`): the
//! activations are quantized to the weight type's `vec_dot_type` (Q8_0, Q8_1 or Q8_K) as
//! ggml's x86 build does, each block's integer sum is exact, and the blocks are then scaled
//! and summed in f32, in ggml's generic order for the 32-weight types. The portable path and
//! the AVX2 path compute the same integer sums and share the f32 step, so they agree bit for
//! bit. Q4_K and Q6_K run in `kquants`, in the order of ggml's AVX2 kernels.
use super::blocks::half::{f16_at, f32_to_f16, le16};
use super::blocks::kquants::{q45k_levels, scale_min_k4};
use super::blocks::legacy::{self, Legacy};
use super::blocks::search::nearest_int;
use super::types::{GgmlType, QK_K};
use crate::error::{Error, Result};

pub(crate) mod avx2;
pub(crate) mod kquants;

/// Weights per block of the 32-weight types.
const QK: usize = 32;

/// Which implementation of the integer sums runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotPath {
    /// AVX2 (`vpmaddubsw`/`vpmaddwd`), detected at run time.
    Avx2,
    /// AVX2, with AVX-512 VNNI's `vpdpbusd` for the integer sums of the Q8_0 and Q4_0
    /// layer kernels (`matmul`; two activation rows to a 512-bit register where there
    /// are several): the same integers, so the same bits; elsewhere as `Avx2`.
    Vnni,
    /// Portable Rust, for any CPU, and the reference the AVX2 path must equal.
    Scalar,
}

impl DotPath {
    /// The fastest path this CPU supports.
    pub fn detect() -> DotPath {
        if DotPath::Vnni.is_supported() {
            DotPath::Vnni
        } else if DotPath::Avx2.is_supported() {
            DotPath::Avx2
        } else {
            DotPath::Scalar
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            DotPath::Avx2 => {
                // The block kernels (`matmul`) also fuse multiply-adds and widen halves.
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            DotPath::Vnni => {
                DotPath::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            DotPath::Avx2 | DotPath::Vnni => false,
            DotPath::Scalar => true,
        }
    }
}

/// Eight f32 lanes summed as ggml's `hsum_float_8` sums them: the high half added to the
/// low, then pairwise (`avx2::lanes_sum` in registers).
pub(crate) fn lanes_sum(acc: [f32; 8]) -> f32 {
    let q: [f32; 4] = std::array::from_fn(|i| acc[i + 4] + acc[i]);
    (q[0] + q[2]) + (q[1] + q[3])
}

/// The type ggml quantizes activations to for a dot product with `ty` weights (the
/// `vec_dot_type` of ggml-cpu's type traits), for the quantized types handled here.
pub fn vec_dot_type(ty: GgmlType) -> Option<GgmlType> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(GgmlType::Q8_0),
        GgmlType::Q4_1 | GgmlType::Q5_1 => Some(GgmlType::Q8_1),
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => Some(GgmlType::Q8_K),
        _ => None,
    }
}

fn no_dot(ty: GgmlType) -> Error {
    Error::Input(format!(
        "no quantized dot product for ggml type {}",
        ty.name()
    ))
}

/// Quantizes one activation row for a dot product with `weight_ty` weights: ggml-cpu's
/// `quantize_row_q8_0`/`quantize_row_q8_1` of its x86 build (scale 127/amax, ties to even)
/// or `quantize_row_q8_K_ref` (which `quantize_row_q8_K` is on x86).
pub fn quantize_activations(weight_ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let act = vec_dot_type(weight_ty).ok_or_else(|| no_dot(weight_ty))?;
    let bytes = act.row_bytes(x.len()).ok_or_else(|| {
        Error::Input(format!(
            "{} activations are not a whole number of {} blocks of {}",
            x.len(),
            act.name(),
            act.block_size()
        ))
    })?;
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::Input(
            "activations hold NaN or infinite values".into(),
        ));
    }
    let mut out = Vec::with_capacity(bytes);
    match act {
        GgmlType::Q8_K => x.chunks_exact(QK_K).for_each(|xb| q8_k(xb, &mut out)),
        _ => x
            .chunks_exact(QK)
            .for_each(|xb| q8_x86(xb, act == GgmlType::Q8_1, &mut out)),
    }
    Ok(out)
}

/// x86 `quantize_row_q8_0` (and `_q8_1`, which adds `s = fp16(d·Σq)`) of one block.
fn q8_x86(xb: &[f32], with_sum: bool, out: &mut Vec<u8>) {
    let max = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max / 127.0;
    let id = if max != 0.0 { 127.0 / max } else { 0.0 };
    // A block too small for 127/max in f32 (0 < max < ~3.7e-37; its f16 scale is 0):
    // ggml converts the infinite and NaN products to i32::MIN, packed to -128, and its
    // Q8_1 sum of those i32s wraps to 0.
    let (qs, sum) = if id.is_finite() {
        let qs = q8_levels(xb, id);
        (qs, qs.iter().map(|&q| i32::from(q)).sum::<i32>())
    } else {
        ([-128i8; QK], 0)
    };
    out.extend(f32_to_f16(d).to_le_bytes());
    if with_sum {
        out.extend(f32_to_f16(d * sum as f32).to_le_bytes());
    }
    out.extend(qs.map(|q| q as u8));
}

/// A block's levels: x·id rounded to nearest, ties to even, as i8.
fn q8_levels(xb: &[f32], id: f32) -> [i8; QK] {
    #[inline(always)]
    fn levels(xb: &[f32], id: f32) -> [i8; QK] {
        let mut qs = [0i8; QK];
        for (q, &x) in qs.iter_mut().zip(xb) {
            *q = ((x * id).round_ties_even() as i32).clamp(-128, 127) as i8;
        }
        qs
    }
    // The same steps compiled for AVX2, where rounding is one instruction instead of a
    // call into libm per value (an f32 product has no sum to fuse, so FMA changes nothing).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn levels_avx2(xb: &[f32], id: f32) -> [i8; QK] {
        levels(xb, id)
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { levels_avx2(xb, id) };
    }
    levels(xb, id)
}

/// `quantize_row_q8_K_ref` of one super-block: f32 scale, 256 levels, 16 sums of 16.
fn q8_k(xb: &[f32], out: &mut Vec<u8>) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in xb {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        out.extend([0u8; 4 + QK_K + 32]);
        return;
    }
    let iscale = -127.0 / max;
    let qs: [i8; QK_K] = std::array::from_fn(|j| nearest_int(iscale * xb[j]).min(127) as i8);
    out.extend((1.0 / iscale).to_le_bytes());
    out.extend(qs.map(|q| q as u8));
    for group in qs.chunks_exact(16) {
        let sum: i16 = group.iter().map(|&q| i16::from(q)).sum();
        out.extend(sum.to_le_bytes());
    }
}

/// Dot product of one row of `n` weights of type `ty` with activations quantized by
/// [`quantize_activations`] for `ty`, on the fastest path (`ggml_vec_dot_*_q8_*`).
pub fn vec_dot(ty: GgmlType, n: usize, weights: &[u8], acts: &[u8]) -> Result<f32> {
    vec_dot_on(DotPath::detect(), ty, n, weights, acts)
}

/// [`vec_dot`] on a chosen path; an unsupported path is an error.
pub fn vec_dot_on(
    path: DotPath,
    ty: GgmlType,
    n: usize,
    weights: &[u8],
    acts: &[u8],
) -> Result<f32> {
    let act = vec_dot_type(ty).ok_or_else(|| no_dot(ty))?;
    if !path.is_supported() {
        return Err(Error::Input(format!("this CPU lacks the {path:?} path")));
    }
    for (t, bytes, what) in [(ty, weights, "weights"), (act, acts, "activations")] {
        if t.row_bytes(n) != Some(bytes.len()) {
            return Err(Error::Input(format!(
                "{n} {} {what} do not fit {} bytes",
                t.name(),
                bytes.len()
            )));
        }
    }
    Ok(row_dot(path, ty, n, weights, acts))
}

/// [`vec_dot_on`] without its checks: `path` supported, `ty` a quantized type, both rows
/// of `n` weights' bytes.
pub(crate) fn row_dot(path: DotPath, ty: GgmlType, n: usize, weights: &[u8], acts: &[u8]) -> f32 {
    if kquants::handles(ty) {
        let mut out = [0f32];
        kquants::rows(
            path,
            ty,
            n,
            &weights[..ty.row_bytes(n).unwrap_or(0)],
            &[acts],
            &mut out,
        );
        return out[0];
    }
    let act = vec_dot_type(ty).expect("a quantized type");
    // integer sums a chunk of blocks at a time, then the f32 step over them
    const CHUNK: usize = 64;
    let (ws, as_) = (ty.type_size(), act.type_size());
    let mut ints = [0i32; CHUNK];
    let mut sumf = 0f32;
    let blocks = n / ty.block_size();
    for first in (0..blocks).step_by(CHUNK) {
        let count = CHUNK.min(blocks - first);
        let w = &weights[first * ws..(first + count) * ws];
        let a = &acts[first * as_..(first + count) * as_];
        let ints = &mut ints[..count];
        match path {
            DotPath::Scalar => scalar_ints(ty, w, a, ints),
            // SAFETY: the path is supported on this CPU (checked above).
            DotPath::Avx2 | DotPath::Vnni => unsafe { avx2::ints(ty, w, a, ints) },
        }
        sumf = scale_and_sum(ty, w, a, ints, sumf);
    }
    sumf
}

/// The 32-weight kind of a weight type, `None` for Q8_0 (whose levels are its bytes).
fn legacy_kind(ty: GgmlType) -> Option<Legacy> {
    match ty {
        GgmlType::Q4_0 => Some(Legacy::Q4_0),
        GgmlType::Q4_1 => Some(Legacy::Q4_1),
        GgmlType::Q5_0 => Some(Legacy::Q5_0),
        GgmlType::Q5_1 => Some(Legacy::Q5_1),
        _ => None,
    }
}

fn levels_8(bytes: &[u8]) -> impl Iterator<Item = i32> + '_ {
    bytes.iter().map(|&q| i32::from(q as i8))
}

fn dot_i32(a: impl Iterator<Item = i32>, b: impl Iterator<Item = i32>) -> i32 {
    a.zip(b).map(|(x, y)| x * y).sum()
}

/// Σ over groups of `group` weights of scale(g)·Σ level·q8: a K-quant super-block's sum.
fn scaled_groups(levels: &[i32], q8: &[u8], group: usize, scale: impl Fn(usize) -> i32) -> i32 {
    let pairs = levels.chunks_exact(group).zip(q8.chunks_exact(group));
    pairs
        .enumerate()
        .map(|(g, (l, q))| scale(g) * dot_i32(l.iter().copied(), levels_8(q)))
        .sum()
}

/// Each block's integer sum, portably: Σ level·q8 for the 32-weight types, Σ scale·(Σ
/// level·q8) over the sub-blocks for Q5_K (its mins come in `scale_and_sum`).
fn scalar_ints(ty: GgmlType, w: &[u8], a: &[u8], ints: &mut [i32]) {
    let act = vec_dot_type(ty).expect("a quantized type");
    let blocks = w
        .chunks_exact(ty.type_size())
        .zip(a.chunks_exact(act.type_size()));
    for ((wb, ab), out) in blocks.zip(ints.iter_mut()) {
        // the activation levels: after d (Q8_0), d and s (Q8_1), or the f32 d (Q8_K)
        let q8 = match act {
            GgmlType::Q8_0 => &ab[2..2 + QK],
            GgmlType::Q8_1 => &ab[4..4 + QK],
            _ => &ab[4..4 + QK_K],
        };
        *out = match ty {
            GgmlType::Q5_K => {
                let lv = q45k_levels(wb, true).map(i32::from);
                scaled_groups(&lv, q8, 32, |j| i32::from(scale_min_k4(j, &wb[4..16]).0))
            }
            _ => match legacy_kind(ty) {
                Some(kind) => dot_i32(
                    legacy::levels(kind, wb).map(i32::from).into_iter(),
                    levels_8(q8),
                ),
                None => dot_i32(levels_8(&wb[2..]), levels_8(q8)),
            },
        };
    }
}

/// The f32 step, shared by both paths: each block's integer sum times its scales, plus the
/// min terms, accumulated into `sumf` in block order as ggml's generic kernels write it.
fn scale_and_sum(ty: GgmlType, w: &[u8], a: &[u8], ints: &[i32], mut sumf: f32) -> f32 {
    let act = vec_dot_type(ty).expect("a quantized type");
    let blocks = w
        .chunks_exact(ty.type_size())
        .zip(a.chunks_exact(act.type_size()));
    for ((wb, ab), &sumi) in blocks.zip(ints) {
        let sumi = sumi as f32;
        match ty {
            GgmlType::Q4_0 => sumf += sumi * f16_at(wb, 0) * f16_at(ab, 0),
            GgmlType::Q5_0 => sumf += (f16_at(wb, 0) * f16_at(ab, 0)) * sumi,
            GgmlType::Q8_0 => sumf += sumi * (f16_at(wb, 0) * f16_at(ab, 0)),
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let (d, m) = (f16_at(wb, 0), f16_at(wb, 2));
                sumf += (d * f16_at(ab, 0)) * sumi + m * f16_at(ab, 2);
            }
            _ => {
                let yd = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
                let bsums = (0..16).map(|j| i32::from(le16(ab, 4 + QK_K + 2 * j) as i16));
                let mins: i32 = bsums
                    .enumerate()
                    .map(|(j, s)| s * i32::from(scale_min_k4(j / 2, &wb[4..16]).1))
                    .sum();
                sumf += (f16_at(wb, 0) * yd) * sumi;
                sumf -= (f16_at(wb, 2) * yd) * mins as f32;
            }
        }
    }
    sumf
}
