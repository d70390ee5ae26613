//! W8A8 (`WeightFormat::Int8Dynamic`): int8 weights times int8 activations, each x row
//! quantized at call time, int32 sums, laid out for AVX-512 VNNI's `vpdpbusd`. This is
//! the arithmetic of gpt2kit's int8-dynamic artifacts (`quant::Int8Linear`: per-token
//! activation quantization, libtorch's `_int_mm`, then `acc·s_x·scale + b`), reproduced
//! bit for bit, with one byte of weight streamed per multiply-add.
//!
//! `vpdpbusd` (Intel SDM, "VPDPBUSD") multiplies 4 unsigned bytes by 4 signed bytes per
//! 32-bit lane and adds the 4 products to the lane. The weights are the signed operand,
//! so line l of a panel holds, in column c's lane, the bytes q[c][4l..4l+3]; x is the
//! unsigned one, stored as u = xq + 128, and the excess is removed once per column after
//! the sum: Σ u·q − 128·Σ q = Σ xq·q, with corr[c] = 128·Σ_k q[c][k] precomputed (the
//! "compensation" oneDNN uses for s8×s8 on this instruction). Padding past k is weight 0
//! (and u = 128, which times 0 adds nothing). Sums wrap in i32, the correction too, so
//! the difference is exact whenever the true Σ xq·q fits i32, as `_int_mm`'s must.
use super::qtile::QTile;
use super::{Isa, OutPtr, PackedLinear, MAX_ROWS, PANEL};

/// Quantizes each x row (rows × k, row-major) as `quant::Int8Linear` does: s = max(max|x|
/// / 127, 1e-12), xq = round_ties_even(x / s) clamped to ±127, stored as xq + 128 from
/// byte r·`row_bytes` of `xq` (the bytes past k are left as they are: 128). One pass for
/// the max (16 lanes, so that it vectorizes; the max of a set does not depend on the
/// order, and `f32::max` skips NaN as the sequential fold does) and one to quantize.
#[inline(always)]
pub(super) fn quantize_rows(x: &[f32], k: usize, row_bytes: usize, xq: &mut [u8], sx: &mut [f32]) {
    if k == 0 {
        sx.fill(1e-12);
        return;
    }
    for ((row, q), s_out) in x
        .chunks_exact(k)
        .zip(xq.chunks_exact_mut(row_bytes))
        .zip(sx)
    {
        let mut lanes = [0f32; 16];
        let mut blocks = row.chunks_exact(16);
        for b in &mut blocks {
            for (m, v) in lanes.iter_mut().zip(b) {
                *m = m.max(v.abs());
            }
        }
        let max = blocks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(0f32, |m, v| m.max(v.abs()));
        let s = (max / 127.0).max(1e-12);
        *s_out = s;
        for (q, v) in q.iter_mut().zip(row) {
            let xq = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
            *q = (xq as i16 + 128) as u8;
        }
    }
}

/// `quantize_rows` compiled for AVX-512 (the same code, so the same results; this only
/// lets the compiler vectorize its division and rounding 16 wide).
///
/// # Safety
/// The CPU has avx512f.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_rows_avx512(
    x: &[f32],
    k: usize,
    row_bytes: usize,
    xq: &mut [u8],
    sx: &mut [f32],
) {
    quantize_rows(x, k, row_bytes, xq, sx)
}

impl PackedLinear {
    /// `forward` for Int8Dynamic (`forward` checked the lengths; rows, out > 0): x
    /// quantized once on the calling thread, then the panels split into `n_tasks` tasks.
    pub(super) fn forward_dynamic(&self, x: &[f32], rows: usize, y: OutPtr, n_tasks: usize) {
        let Some((corr, scale)) = &self.dynamic else {
            return;
        };
        let row_bytes = 4 * self.lines_per_panel;
        // 128 = xq 0: the padding past k (times weight 0) adds nothing.
        let mut xq = vec![128u8; rows * row_bytes];
        let mut sx = vec![0f32; rows];
        let k = self.in_features;
        match self.kernel_isa() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the Avx512 path is taken only where avx512f is supported.
            Isa::Avx512 => unsafe { quantize_rows_avx512(x, k, row_bytes, &mut xq, &mut sx) },
            _ => quantize_rows(x, k, row_bytes, &mut xq, &mut sx),
        }
        let q = QuantX {
            xq: &xq,
            sx: &sx,
            corr,
            scale,
        };
        let task = |t: usize| {
            let p0 = t * self.n_panels / n_tasks;
            let p1 = (t + 1) * self.n_panels / n_tasks;
            self.run_task_dynamic(p0, p1, &q, rows, y);
        };
        self.pool.run(n_tasks, &task);
    }

    /// Int8Dynamic: panels [p0, p1) for every row of the quantized x.
    fn run_task_dynamic(&self, p0: usize, p1: usize, q: &QuantX, rows: usize, y: OutPtr) {
        let (n, lpp) = (self.out_features, self.lines_per_panel);
        let (c0, c1) = (p0 * PANEL, p1 * PANEL);
        for r0 in (0..rows).step_by(MAX_ROWS) {
            let r = (rows - r0).min(MAX_ROWS);
            let tile = QTile {
                w: &self.lines[p0 * lpp..p1 * lpp],
                n_panels: p1 - p0,
                lines_per_panel: lpp,
                xq: &q.xq[r0 * 4 * lpp..(r0 + r) * 4 * lpp],
                sx: &q.sx[r0..r0 + r],
                rows: r,
                corr: &q.corr[c0..c1],
                scale: &q.scale[c0..c1],
                bias: &self.bias[c0..c1],
                // Stays inside `out` (checked in `forward`): row r0 < rows, column c0 < n.
                y: y.0.wrapping_add(r0 * n + c0),
                ldy: n,
                cols: (n - c0).min(c1 - c0),
            };
            // SAFETY: the slices above have the lengths QTile promises (`forward` sized
            // xq and sx for `rows` rows, `from_int8_rows_dynamic` corr and scale, `empty`
            // the lines and bias); rows r0..r0+r of y's columns [c0, c1) lie in `out` and
            // are this task's alone (tasks split the panels, see OutPtr); `kernel_isa`
            // names Avx512 only where avx512f and avx512vnni are supported, Avx2 only
            // where avx2 and fma are (`Isa::is_supported`).
            unsafe {
                match self.kernel_isa() {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => super::avx512::int8_dynamic(&tile),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => super::avx2::int8_dynamic(&tile),
                    _ => super::scalar::int8_dynamic(&tile),
                }
            }
        }
    }
}

/// One Int8Dynamic call's quantized x, and the layer's per-column constants.
struct QuantX<'a> {
    /// `rows * 4 * lines_per_panel` bytes (see `qtile::QTile::xq`).
    xq: &'a [u8],
    sx: &'a [f32],
    corr: &'a [i32],
    scale: &'a [f32],
}
