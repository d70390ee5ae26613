//! CPU decode kernels: y = x·W (+ b) for a handful of activation rows (batch 1–8) against
//! a GPT-2 `Conv1D` weight W of shape (in, out), with the weight in fp32, bf16 or int8
//! (int8 with float activations, or W8A8 with activations quantized per row: `vnni`).
//!
//! Why not libtorch: decoding one token reads every weight once and does two flops per
//! weight, so on a CPU the speed of a decode step is the speed at which weights stream
//! from memory. libtorch's fp32 matvec gets there, but its bf16 matvec does not, and its
//! GEMM with 8 rows costs ~3x the time of 1 row although the bytes read are the same.
//!
//! How: each weight is repacked once (`PackedLinear`) into panels of `PANEL` = 16 output
//! columns, a panel holding all `in` rows of its columns contiguously in 64-byte lines
//! (one line = one input row in fp32, two input rows interleaved in bf16). The inner loop
//! then reads W strictly sequentially, one aligned cache line per step, while the panel's
//! accumulators for all x rows stay in registers, so x's rows cost nothing extra. bf16
//! is widened with one shift (even input row) and one mask (odd row) per line, which is
//! why the two rows are interleaved. Threads split the panels (a persistent pool: see
//! `pool`); each SIMD path (`avx512`, `avx2`, `scalar`) reads the same packed layout, so
//! one packed weight can be run, and tested, on every path.
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::mapped::MappedFile;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod isa;
mod pack;
mod pool;
mod qtile;
mod scalar;
mod stored;
mod vnni;

use isa::has_vnni;
pub use isa::Isa;
pub use pool::ThreadPool;
pub use stored::{panel_len, side_len, ALIGN, LAYOUT};

/// Output columns per panel: one AVX-512 register of f32, one 64-byte cache line.
pub const PANEL: usize = 16;
/// Rows of x one pass over W serves; more rows are processed in chunks of this many.
pub const MAX_ROWS: usize = 8;
/// Rows a fused decode step serves at once. Each task of a kernel call runs its panels
/// for every chunk of `MAX_ROWS` rows in turn, so past the first chunk its slice of W
/// (under a megabyte on the 124M shape) is read from cache, not memory: a step of 64 rows
/// reads the weights from memory once, where steps of 8 rows each would read them 8 times.
pub const STEP_MAX_ROWS: usize = 64;
/// Tasks per thread: more than one, so that a thread that the OS (or another build on
/// the machine) delays leaves its share to the others instead of stalling the call.
const TASKS_PER_THREAD: usize = 4;
/// Below this many weight bytes per task, splitting costs more than it gains.
const MIN_TASK_BYTES: usize = 64 << 10;

/// One 64-byte line of a panel: 16 f32 (as bits) or 16 pairs of bf16. The alignment
/// keeps every SIMD load inside one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
struct Line([u32; PANEL]);

/// How W is stored in the packed buffer; activations and accumulation are fp32 in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    /// bfloat16: the upper 16 bits of an f32, widened in registers.
    Bf16,
    /// Symmetric int8 with one f32 scale per output column (gpt2kit's int8 artifacts):
    /// a line holds 4 input rows of 16 bytes, widened in registers; y = (x·q)·scale + b.
    Int8,
    /// W8A8, as gpt2kit's int8-dynamic artifacts compute (`quant::Int8Linear`): the same
    /// int8 weights and scales, each x row quantized per call to int8 with its own scale
    /// s_r, int32 sums, y = acc·s_r·scale + b, bit for bit. A line holds 4 input rows of
    /// each column in one 32-bit lane (the layout of VNNI's `vpdpbusd`: see `vnni`).
    Int8Dynamic,
}

/// What one kernel call computes: y[r, c] for every row r < `rows` (1..=MAX_ROWS) and
/// the columns of `n_panels` consecutive panels. Private to this module and built only
/// by `PackedLinear::run_task`; the kernels rely on its fields' contracts below.
struct Tile<'a> {
    /// `n_panels * lines_per_panel` lines.
    w: &'a [Line],
    n_panels: usize,
    /// `k` for fp32, `ceil(k / 2)` for bf16.
    lines_per_panel: usize,
    /// Input features: rows of W, length of an x row.
    k: usize,
    /// `rows * k` values, row-major.
    x: &'a [f32],
    rows: usize,
    /// `n_panels * PANEL` values, zero past the last real column.
    bias: &'a [f32],
    /// y[0, first column of the tile], writable for `rows` rows (stride `ldy`) of `cols`
    /// columns, by the thread running this tile alone.
    y: *mut f32,
    ldy: usize,
    /// Real columns in this tile (the last panel of W may be partial):
    /// `(n_panels - 1) * PANEL < cols <= n_panels * PANEL`.
    cols: usize,
}

impl Tile<'_> {
    /// Real columns of panel `p` of this tile.
    #[inline]
    fn panel_cols(&self, p: usize) -> usize {
        (self.cols - p * PANEL).min(PANEL)
    }
}

/// y's buffer, shared by the tasks of one call.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks of one `forward` write disjoint column ranges of y (each task owns
// whole panels), and `ThreadPool::run` returns only after every task has finished, so the
// pointer never outlives the `&mut [f32]` it came from and no two threads write one value.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The panels' storage: packed at load into memory of its own, or used in place from a
/// packed file's memory map (`stored`), which the map's reference keeps alive.
enum Lines {
    Owned(Vec<Line>),
    /// Large buffers: anonymous pages of their own (`pack::zeroed_lines`), unmapped on drop.
    Anonymous {
        ptr: *mut Line,
        len: usize,
    },
    Mapped {
        ptr: *const Line,
        len: usize,
        _map: Arc<MappedFile>,
    },
}

// SAFETY: `Mapped` points into a read-only use of a private mapping that `_map` keeps
// alive; nothing writes through it, so sharing and sending it is as safe as a `&[Line]`.
// `Anonymous` owns its mapping as a `Vec` owns its buffer, written only through
// `owned_mut` (a `&mut self`).
unsafe impl Send for Lines {}
unsafe impl Sync for Lines {}

impl std::ops::Deref for Lines {
    type Target = [Line];
    fn deref(&self) -> &[Line] {
        match self {
            Lines::Owned(v) => v,
            // SAFETY: `len` zero-initialised lines mapped for this value alone
            // (`pack::zeroed_lines`), alive until it drops.
            Lines::Anonymous { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
            // SAFETY: `stored::mapped_lines` checked that [ptr, ptr + len) lies in the
            // mapping, 64-byte aligned; the mapping lives as long as `_map`.
            Lines::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl Lines {
    /// The lines being packed: only packing writes them, into memory of their own.
    fn owned_mut(&mut self) -> &mut [Line] {
        match self {
            Lines::Owned(v) => v,
            // SAFETY: as in `deref`, borrowed mutably through `self`.
            Lines::Anonymous { ptr, len } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
            Lines::Mapped { .. } => unreachable!("mapped panels are never packed into"),
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if let Lines::Anonymous { ptr, len } = *self {
            // SAFETY: the mapping `pack::zeroed_lines` made for these `len` lines, unmapped
            // once; nothing borrows it past its owner.
            #[cfg(target_os = "linux")]
            unsafe {
                libc::munmap(ptr as *mut libc::c_void, len * std::mem::size_of::<Line>())
            };
        }
    }
}

/// A linear layer's weight (and bias) repacked for the decode kernels.
pub struct PackedLinear {
    in_features: usize,
    out_features: usize,
    format: WeightFormat,
    n_panels: usize,
    lines_per_panel: usize,
    /// `n_panels * lines_per_panel` lines: packed here, or mapped from a packed file.
    lines: Lines,
    /// `n_panels * PANEL`, zero-padded; all zero without a bias (and for Int8, whose
    /// bias is added after the scale).
    bias: Vec<f32>,
    has_bias: bool,
    /// Int8 only: per output column, the scale and then the bias applied to x·q.
    int8_post: Option<(Vec<f32>, Vec<f32>)>,
    /// Int8Dynamic only: per column (`n_panels * PANEL`, zero-padded) the correction
    /// 128·Σ_k q and the scale (the bias, applied after it, is `bias`).
    dynamic: Option<(Vec<i32>, Vec<f32>)>,
    /// Int8 and Int8Dynamic packed from int8 bytes: whether they held -128, which
    /// gpt2kit's symmetric artifacts never hold (`held_int8_min`).
    held_min: bool,
    /// F32 and Bf16 packed from stored floats: whether they held NaN or ±inf
    /// (`held_non_finite`).
    held_non_finite: bool,
    isa: Isa,
    pool: Arc<ThreadPool>,
}

impl PackedLinear {
    /// Forces a kernel path (tests, benchmarks); fails if this CPU lacks it.
    pub fn set_isa(&mut self, isa: Isa) -> Result<()> {
        if !isa.is_supported() {
            return Err(Error::Input(format!(
                "this CPU does not support the {isa:?} kernels"
            )));
        }
        self.isa = isa;
        Ok(())
    }

    pub fn with_isa(mut self, isa: Isa) -> Result<Self> {
        self.set_isa(isa)?;
        Ok(self)
    }

    /// Runs on `pool` instead of the process-wide `ThreadPool::global()`.
    pub fn with_pool(mut self, pool: Arc<ThreadPool>) -> Self {
        self.pool = pool;
        self
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Whether the int8 weight this layer was packed from held -128, outside the ±127 of
    /// a symmetric artifact (the loader's range check, made while packing reads every
    /// byte anyway). False for float layers and for panels mapped from a packed file.
    pub fn held_int8_min(&self) -> bool {
        self.held_min
    }

    /// Whether the float weight this layer was packed from held NaN or ±inf (the
    /// loader's finite check, made while packing reads every value). False for int8
    /// layers and for panels mapped from a packed file.
    pub fn held_non_finite(&self) -> bool {
        self.held_non_finite
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The kernel path `forward` runs: `isa()`, except for Int8Dynamic on Avx512 without
    /// VNNI, which runs the Avx2 kernel (or the scalar one without AVX2). Every path
    /// computes the same integers, so the same bits; only the speed differs.
    pub fn kernel_isa(&self) -> Isa {
        match (self.format, self.isa) {
            (WeightFormat::Int8Dynamic, Isa::Avx512) if !has_vnni() => {
                if Isa::Avx2.is_supported() {
                    Isa::Avx2
                } else {
                    Isa::Scalar
                }
            }
            (_, isa) => isa,
        }
    }

    pub fn has_bias(&self) -> bool {
        self.has_bias
    }

    pub fn pool(&self) -> &Arc<ThreadPool> {
        &self.pool
    }

    /// Bytes of packed weight one pass reads (what bounds the speed of a call).
    pub fn weight_bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>()
    }

    /// y = x·W + b for `rows` rows: `x` is (rows, in) and `out` (rows, out), row-major.
    /// Allocates nothing, except for Int8Dynamic: x quantized (rows·in bytes, once per
    /// call, on the calling thread). Rows beyond `MAX_ROWS` are served in chunks of
    /// `MAX_ROWS`, each a pass over W.
    ///
    /// # Panics
    /// If `x.len() != rows * in_features` or `out.len() != rows * out_features`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert_eq!(
            x.len(),
            rows * self.in_features,
            "x must be (rows, in_features)"
        );
        assert_eq!(
            out.len(),
            rows * self.out_features,
            "out must be (rows, out_features)"
        );
        if rows == 0 || self.out_features == 0 {
            return;
        }
        let y = OutPtr(out.as_mut_ptr());
        let n_tasks = self.n_tasks(rows);
        if self.dynamic.is_some() {
            self.forward_dynamic(x, rows, y, n_tasks);
            return;
        }
        let task = |t: usize| {
            let p0 = t * self.n_panels / n_tasks;
            let p1 = (t + 1) * self.n_panels / n_tasks;
            self.run_task(p0, p1, x, rows, y);
        };
        self.pool.run(n_tasks, &task);
    }

    /// `forward` on tensors: x is a Float CPU tensor (…, in), the result (…, out).
    pub fn forward_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape = x.size();
        if x.kind() != Kind::Float
            || x.device() != Device::Cpu
            || shape.last().copied() != Some(self.in_features as i64)
        {
            return Err(Error::Input(format!(
                "PackedLinear input must be a Float CPU tensor (…, {}), got {:?} {:?} on {:?}",
                self.in_features,
                x.kind(),
                shape,
                x.device()
            )));
        }
        let x = x.contiguous();
        let rows = shape[..shape.len() - 1].iter().product::<i64>() as usize;
        *shape.last_mut().unwrap() = self.out_features as i64;
        let y = Tensor::empty(shape.as_slice(), (Kind::Float, Device::Cpu));
        if rows * self.in_features > 0 && rows * self.out_features > 0 {
            // SAFETY: `x` is a contiguous Float CPU tensor of rows * in_features elements
            // and `y` a fresh contiguous one of rows * out_features, both alive (and not
            // otherwise accessed) until the slices' last use in `forward` below. Zero
            // sizes are skipped: an empty tensor's data pointer may be null.
            let (xs, ys) = unsafe {
                (
                    std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * self.in_features),
                    std::slice::from_raw_parts_mut(
                        y.data_ptr() as *mut f32,
                        rows * self.out_features,
                    ),
                )
            };
            self.forward(xs, rows, ys);
        } else if rows * self.out_features > 0 {
            // No inputs: y is the bias on every row.
            let b = Tensor::from_slice(&self.bias[..self.out_features]);
            y.view([rows as i64, self.out_features as i64])
                .copy_(&b.unsqueeze(0));
        }
        Ok(y)
    }

    /// Splits the panels into a few tasks per thread, none too small to be worth a thread.
    fn n_tasks(&self, rows: usize) -> usize {
        let threads = self.pool.threads();
        if threads <= 1 || self.n_panels <= 1 {
            return 1;
        }
        let passes = rows.div_ceil(MAX_ROWS);
        let by_size = (self.weight_bytes() * passes / MIN_TASK_BYTES).max(1);
        (threads * TASKS_PER_THREAD).min(by_size).min(self.n_panels)
    }

    /// Panels [p0, p1) for every row of x.
    fn run_task(&self, p0: usize, p1: usize, x: &[f32], rows: usize, y: OutPtr) {
        let (k, n, lpp) = (self.in_features, self.out_features, self.lines_per_panel);
        for r0 in (0..rows).step_by(MAX_ROWS) {
            let r = (rows - r0).min(MAX_ROWS);
            let tile = Tile {
                w: &self.lines[p0 * lpp..p1 * lpp],
                n_panels: p1 - p0,
                lines_per_panel: lpp,
                k,
                x: &x[r0 * k..(r0 + r) * k],
                rows: r,
                bias: &self.bias[p0 * PANEL..p1 * PANEL],
                // Stays inside `out` (checked in `forward`): row r0 < rows, column p0*16 < n.
                y: y.0.wrapping_add(r0 * n + p0 * PANEL),
                ldy: n,
                cols: (n - p0 * PANEL).min((p1 - p0) * PANEL),
            };
            // SAFETY: the slices above have the lengths Tile promises (n_panels * lpp
            // lines, r * k inputs, n_panels * 16 bias values: `empty` sized the buffers,
            // `forward` checked x and out); rows r0..r0+r of y's columns [p0*16, p1*16)
            // lie in `out` and are this task's alone (tasks split the panels, see OutPtr);
            // `self.isa` passed `Isa::is_supported` (detect / set_isa).
            unsafe { run_tile(self.isa, self.format, &tile) };
            if let Some((scale, bias)) = &self.int8_post {
                let (c0, c1) = (p0 * PANEL, (p1 * PANEL).min(n));
                for row in r0..r0 + r {
                    // SAFETY: row < rows and columns c0..c1 < n are this task's part of
                    // `out` (as for the tile just written), written by this thread alone.
                    let ys =
                        unsafe { std::slice::from_raw_parts_mut(y.0.add(row * n + c0), c1 - c0) };
                    for ((v, s), b) in ys.iter_mut().zip(&scale[c0..c1]).zip(&bias[c0..c1]) {
                        *v = *v * s + b;
                    }
                }
            }
        }
    }
}

/// # Safety
/// `t` meets `Tile`'s field contracts and `isa.is_supported()`.
unsafe fn run_tile(isa: Isa, format: WeightFormat, t: &Tile) {
    match (isa, format) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: this function's contract; Avx512 is supported only with avx512f.
        (Isa::Avx512, WeightFormat::F32) => unsafe { avx512::f32(t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Isa::Avx512, WeightFormat::Bf16) => unsafe { avx512::bf16(t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Isa::Avx512, WeightFormat::Int8) => unsafe { avx512::int8(t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: this function's contract; Avx2 is supported only with avx2 and fma.
        (Isa::Avx2, WeightFormat::F32) => unsafe { avx2::f32(t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Isa::Avx2, WeightFormat::Bf16) => unsafe { avx2::bf16(t) },
        // SAFETY: this function's contract; the scalar path needs no CPU feature.
        (_, format) => unsafe { scalar::run(t, format) },
    }
}

fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Input(format!(
            "PackedLinear {what} has {got} values, expected {expected}"
        )));
    }
    Ok(())
}
