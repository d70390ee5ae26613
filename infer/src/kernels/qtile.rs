//! The unit of work of an Int8Dynamic (W8A8) kernel call and its dequantization, shared
//! by `vnni` (which builds tiles) and every ISA's kernel (which computes them).
use super::{Line, PANEL};

/// What one Int8Dynamic kernel call computes: y[r, c] for every row r < `rows`
/// (1..=MAX_ROWS) and the columns of `n_panels` consecutive panels. Built only by
/// `PackedLinear::run_task_dynamic`; the kernels rely on its fields' contracts below.
pub(super) struct QTile<'a> {
    /// `n_panels * lines_per_panel` lines.
    pub(super) w: &'a [Line],
    pub(super) n_panels: usize,
    /// `ceil(k / 4)`.
    pub(super) lines_per_panel: usize,
    /// `rows * 4 * lines_per_panel` bytes: row r's u = xq + 128 from byte
    /// `r * 4 * lines_per_panel`, 128 past k.
    pub(super) xq: &'a [u8],
    /// `rows` activation scales s_r.
    pub(super) sx: &'a [f32],
    pub(super) rows: usize,
    /// `n_panels * PANEL` values each, zero past the last real column.
    pub(super) corr: &'a [i32],
    pub(super) scale: &'a [f32],
    pub(super) bias: &'a [f32],
    /// y[0, first column of the tile], writable for `rows` rows (stride `ldy`) of `cols`
    /// columns, by the thread running this tile alone.
    pub(super) y: *mut f32,
    pub(super) ldy: usize,
    /// Real columns in this tile: `(n_panels - 1) * PANEL < cols <= n_panels * PANEL`.
    pub(super) cols: usize,
}

impl QTile<'_> {
    /// Real columns of panel `p` of this tile.
    #[inline]
    pub(super) fn panel_cols(&self, p: usize) -> usize {
        (self.cols - p * PANEL).min(PANEL)
    }
}

/// y = (acc − corr)·s_r·scale + b, in this order, in f32 (no fused multiply-add), as
/// `quant::Int8Linear` computes `acc as f32 * s_r * scale + bias`. Every path's output
/// must equal this, bit for bit.
#[inline(always)]
pub(super) fn dequant(acc: i32, corr: i32, s_r: f32, scale: f32, bias: f32) -> f32 {
    acc.wrapping_sub(corr) as f32 * s_r * scale + bias
}
