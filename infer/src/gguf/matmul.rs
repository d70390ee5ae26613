//! A linear layer that runs on its ggml blocks: the weight stays in the file's format
//! (one row of blocks per output channel, as ggml stores a `(out, in)` tensor), each
//! input row is quantized to the type's activation format (`dot::quantize_activations`,
//! Q8_0 for the 32-weight types), and every output is one row dot product, as llama.cpp's
//! CPU backend computes a matrix product. A token reads each weight byte once: Q4_0 is
//! 4.5 bits a weight against fp32's 32.
//!
//! Q8_0 and Q4_0 have their own kernels, in the order of ggml-cpu's AVX2 `vec_dot`: per
//! block, eight lanes of integer sums (four weights each), each lane multiplied by the
//! block's two scales and added into its lane's f32 accumulator with one fused
//! multiply-add, the eight lanes summed pairwise at the end. The portable path computes
//! the same operations in the same order, so both agree bit for bit. Q4_K and Q6_K run
//! in ggml's AVX2 order too (`dot::kquants`); the other types (Q4_1, Q5_*) use `dot`'s
//! row products. Each output is one row's dot product
//! whatever else runs beside it, so a sequence's logits do not depend on its batch.
use std::sync::Arc;

use tch::{Kind, Tensor};

use super::blocks;
use super::blocks::half::{f16_at, f16_to_f32, f32_to_f16};
use super::dot::{self, DotPath};
use super::types::GgmlType;
use crate::error::{Error, Result};
use crate::kernels::ThreadPool;
use crate::mapped::MappedFile;

/// Weights per block of Q8_0 and Q4_0, and bytes per block.
const QK: usize = 32;
const Q8_0_BYTES: usize = 34;
const Q4_0_BYTES: usize = 18;

/// Below this many weight bytes per task, splitting the outputs costs more than it gains.
const MIN_TASK_BYTES: usize = 32 << 10;

/// Where a layer's blocks are: its own bytes, or a tensor's bytes read in place from a
/// mapped GGUF file (the mapping lives as long as the layer).
pub enum BlockBytes {
    Owned(Vec<u8>),
    Mapped {
        file: Arc<MappedFile>,
        range: std::ops::Range<usize>,
    },
}

impl std::ops::Deref for BlockBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            BlockBytes::Owned(v) => v,
            BlockBytes::Mapped { file, range } => &file.bytes()[range.clone()],
        }
    }
}

impl From<Vec<u8>> for BlockBytes {
    fn from(v: Vec<u8>) -> Self {
        BlockBytes::Owned(v)
    }
}

/// A `(out, in)` weight in a ggml block format, with its bias.
pub struct BlockLinear {
    ty: GgmlType,
    n_in: usize,
    n_out: usize,
    /// `n_out` rows of `ty.row_bytes(n_in)` bytes.
    bytes: BlockBytes,
    bias: Option<Vec<f32>>,
    path: DotPath,
    pool: Arc<ThreadPool>,
}

impl BlockLinear {
    /// A layer over `bytes`, `n_out` rows of `n_in` weights of type `ty`; `None` when
    /// the type has no row dot product (float types run as float layers).
    pub fn new(
        ty: GgmlType,
        n_in: usize,
        n_out: usize,
        bytes: impl Into<BlockBytes>,
        bias: Option<Vec<f32>>,
    ) -> Result<Option<Self>> {
        let bytes = bytes.into();
        if dot::vec_dot_type(ty).is_none() {
            return Ok(None);
        }
        let row = ty.row_bytes(n_in);
        if row.and_then(|r| r.checked_mul(n_out)) != Some(bytes.len()) {
            return Err(Error::Input(format!(
                "{n_out} rows of {n_in} {} weights do not fit {} bytes",
                ty.name(),
                bytes.len()
            )));
        }
        if bias.as_ref().is_some_and(|b| b.len() != n_out) {
            return Err(Error::Input(format!(
                "a bias of {} values for {n_out} outputs",
                bias.map_or(0, |b| b.len())
            )));
        }
        Ok(Some(Self {
            ty,
            n_in,
            n_out,
            bytes,
            bias,
            path: DotPath::detect(),
            pool: ThreadPool::global(),
        }))
    }

    /// The same layer on another path (tests run each path against the others).
    pub fn with_path(mut self, path: DotPath) -> Result<Self> {
        if !path.is_supported() {
            return Err(Error::Input(format!("this CPU lacks the {path:?} path")));
        }
        self.path = path;
        Ok(self)
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    pub fn in_features(&self) -> usize {
        self.n_in
    }

    pub fn out_features(&self) -> usize {
        self.n_out
    }

    /// The threads the layer runs on.
    pub fn pool(&self) -> &Arc<ThreadPool> {
        &self.pool
    }

    /// Bytes of weight a call reads.
    pub fn weight_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The blocks' bytes (in place in the file's mapping, or a copy).
    pub fn block_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// y = x·Wᵀ + b for `x` (…, in) in any float kind; y (…, out) in f32. Activations that
    /// are not finite give NaN outputs (the engine then reports scores that are not).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let n_in = *shape.last().expect("input has a feature dimension");
        assert_eq!(n_in as usize, self.n_in, "input features");
        *shape.last_mut().unwrap() = self.n_out as i64;
        let x = x.to_kind(Kind::Float).contiguous().reshape([-1]);
        let xs = Vec::<f32>::try_from(&x).expect("f32 activations");
        let rows = xs.len() / self.n_in.max(1);
        let mut y = vec![0f32; rows * self.n_out];
        self.forward_rows(&xs, rows, &mut y);
        Tensor::from_slice(&y).reshape(shape)
    }

    /// `forward` on host rows: `x` (rows × in) into `y` (rows × out). A row whose
    /// activations are not finite gets NaN outputs; one whose activations are too large
    /// for an f16 block scale (|x| past 65504·127, which ggml's Q8_0 would turn into
    /// inf) is computed in f32 from the dequantized weight. Either way the other rows
    /// are computed as they would be alone.
    ///
    /// # Panics
    /// If `x.len() != rows * in_features` or `y.len() != rows * out_features`.
    pub fn forward_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        assert_eq!(x.len(), rows * self.n_in, "x must be (rows, in_features)");
        assert_eq!(y.len(), rows * self.n_out, "y must be (rows, out_features)");
        let act = dot::vec_dot_type(self.ty).expect("checked at construction");
        let act_row = act.row_bytes(self.n_in).expect("checked at construction");
        let zeros = vec![0f32; self.n_in];
        let mut acts = Vec::with_capacity(rows * act_row);
        let mut apart = Vec::new();
        for (m, r) in x.chunks_exact(self.n_in).enumerate() {
            let amax = r.iter().fold(0f32, |a, v| a.max(v.abs()));
            let f16_scale = matches!(act, GgmlType::Q8_0 | GgmlType::Q8_1);
            let row = if !r.iter().all(|v| v.is_finite()) {
                apart.push((m, Apart::NotFinite));
                &zeros[..]
            } else if f16_scale && f16_to_f32(f32_to_f16(amax / 127.0)).is_infinite() {
                apart.push((m, Apart::TooLarge));
                &zeros[..]
            } else {
                r
            };
            acts.extend(dot::quantize_activations(self.ty, row).expect("finite activations"));
        }
        let w_row = self.bytes.len() / self.n_out.max(1);
        let per_task = (MIN_TASK_BYTES / w_row.max(1)).max(1);
        let tasks = self
            .n_out
            .div_ceil(per_task)
            .min(self.pool.threads() * 4)
            .max(1);
        // Whole groups of `GROUP` outputs per task, but the last.
        let chunk = self.n_out.div_ceil(tasks).next_multiple_of(GROUP);
        let out = Out(y.as_mut_ptr());
        let n_out = self.n_out;
        // the side tables of the x86 Q8_0/Q4_0 kernels
        let tables = matches!(self.path, DotPath::Avx2 | DotPath::Vnni);
        let scales = match self.ty {
            GgmlType::Q8_0 | GgmlType::Q4_0 if tables => acts
                .chunks_exact(Q8_0_BYTES)
                .map(|b| f16_at(b, 0))
                .collect(),
            _ => Vec::new(),
        };
        let offsets = match self.ty {
            GgmlType::Q4_0 if tables => acts
                .chunks_exact(Q8_0_BYTES)
                .flat_map(|b| {
                    let lane =
                        |l: usize| b[2 + 4 * l..6 + 4 * l].iter().map(|&q| i32::from(q as i8));
                    (0..8).map(move |l| -8 * lane(l).sum::<i32>())
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut acts = Acts {
            bytes: &acts,
            row: act_row,
            rows,
            scales,
            offsets,
            #[cfg(target_arch = "x86_64")]
            pairs: Vec::new(),
        };
        // the 512-bit kernel's layout, one per pass of up to `MAX_ROWS` rows
        #[cfg(target_arch = "x86_64")]
        if self.path == DotPath::Vnni && rows >= 2 {
            if let GgmlType::Q8_0 | GgmlType::Q4_0 = self.ty {
                let blocks = self.n_in / QK;
                acts.pairs = (0..rows)
                    .step_by(MAX_ROWS)
                    .map(|first| {
                        let group = first..(first + MAX_ROWS).min(rows);
                        let a: Vec<&[u8]> = group.clone().map(|m| acts.row(m)).collect();
                        let d: Vec<&[f32]> = group.map(|m| acts.scales(m)).collect();
                        avx512::Pairs::new(self.ty == GgmlType::Q4_0, blocks, &a, &d)
                    })
                    .collect();
            }
        }
        let acts = acts;
        self.pool.run(tasks, &|t| {
            let first = (t * chunk).min(n_out);
            let last = (first + chunk).min(n_out);
            // SAFETY: each task writes only its own outputs `first..last` of each row,
            // inside `y` (rows × n_out), which outlives `run`.
            unsafe { self.outputs(first..last, &acts, &out, w_row) };
        });
        for (m, why) in apart {
            let y = &mut y[m * n_out..(m + 1) * n_out];
            match why {
                Apart::NotFinite => y.fill(f32::NAN),
                Apart::TooLarge => self.float_row(&x[m * self.n_in..(m + 1) * self.n_in], y),
            }
        }
    }

    /// One row's outputs in f32 from the dequantized weight rows.
    fn float_row(&self, x: &[f32], y: &mut [f32]) {
        let w_row = self.bytes.len() / self.n_out.max(1);
        for (n, y) in y.iter_mut().enumerate() {
            let w = &self.bytes[n * w_row..(n + 1) * w_row];
            let w = blocks::dequantize(self.ty, w, self.n_in).expect("checked at construction");
            let b = self.bias.as_ref().map_or(0.0, |b| b[n]);
            *y = w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + b;
        }
    }

    /// Weight rows `ids`, dequantized (`dequantize_row_*`): an embedding's lookups,
    /// (ids.len(), in) in f32, as ggml's `get_rows` reads a quantized `token_embd`.
    /// None when an id is not a row.
    pub fn rows(&self, ids: &[i64]) -> Option<Vec<f32>> {
        let w_row = self.bytes.len() / self.n_out.max(1);
        let mut out = Vec::with_capacity(ids.len() * self.n_in);
        for &id in ids {
            let n = usize::try_from(id).ok().filter(|&n| n < self.n_out)?;
            let w = &self.bytes[n * w_row..(n + 1) * w_row];
            out.extend(blocks::dequantize(self.ty, w, self.n_in).expect("checked at construction"));
        }
        Some(out)
    }

    /// Outputs `range` of every row into `out` (rows × n_out).
    ///
    /// # Safety
    /// `out` points at rows × n_out values that nothing else writes in `range`.
    unsafe fn outputs(&self, range: std::ops::Range<usize>, acts: &Acts, out: &Out, w_row: usize) {
        let bytes: &[u8] = &self.bytes;
        let row = |n: usize| &bytes[n * w_row..(n + 1) * w_row];
        let bias = |n: usize| self.bias.as_ref().map_or(0.0, |b| b[n]);
        let put = |m: usize, n: usize, v: f32| {
            // SAFETY: m < rows and n < n_out, in this task's range (the caller's promise).
            unsafe { *out.at(m * self.n_out + n) = v + bias(n) }
        };
        let blocks = self.n_in / QK;
        let fast = matches!(self.ty, GgmlType::Q8_0 | GgmlType::Q4_0);
        #[cfg(target_arch = "x86_64")]
        if fast && matches!(self.path, DotPath::Avx2 | DotPath::Vnni) {
            let q4 = self.ty == GgmlType::Q4_0;
            let w = &bytes[range.start * w_row..range.end * w_row];
            let mut v = vec![0f32; range.len() * MAX_ROWS];
            for first in (0..acts.rows).step_by(MAX_ROWS) {
                let count = MAX_ROWS.min(acts.rows - first);
                if let Some(pairs) = acts.pairs.get(first / MAX_ROWS) {
                    let v = &mut v[..range.len() * count];
                    // SAFETY: the pairs exist only on the `Vnni` path (supported: AVX-512
                    // F, BW and VNNI, AVX2, FMA, F16C), made from these `count` rows of
                    // `blocks` blocks; whole weight rows.
                    unsafe { avx512::outputs(q4, w, pairs, count, v) };
                    for (o, v) in v.chunks_exact(count).enumerate() {
                        for (i, &v) in v.iter().enumerate() {
                            put(first + i, range.start + o, v);
                        }
                    }
                    continue;
                }
                let a: Vec<&[u8]> = (first..first + count).map(|m| acts.row(m)).collect();
                let d: Vec<&[f32]> = (first..first + count).map(|m| acts.scales(m)).collect();
                let off: Vec<&[i32]> = (first..first + count).map(|m| acts.offsets(m)).collect();
                let v = &mut v[..range.len() * count];
                // SAFETY: AVX2, FMA and F16C, and for `Vnni` AVX-512 VNNI and VL (the
                // path, supported); whole rows of `blocks` blocks.
                unsafe {
                    if self.path == DotPath::Vnni {
                        avx2::outputs_vnni(q4, blocks, w, &a, &d, &off, v)
                    } else {
                        avx2::outputs(q4, blocks, w, &a, &d, &off, v)
                    }
                };
                for (o, v) in v.chunks_exact(count).enumerate() {
                    for (i, &v) in v.iter().enumerate() {
                        put(first + i, range.start + o, v);
                    }
                }
            }
            return;
        }
        if dot::kquants::handles(self.ty) {
            // every output of the range against up to 8 rows at a time
            let w = &bytes[range.start * w_row..range.end * w_row];
            let mut v = vec![0f32; range.len() * MAX_ROWS];
            for first in (0..acts.rows).step_by(MAX_ROWS) {
                let count = MAX_ROWS.min(acts.rows - first);
                let a: Vec<&[u8]> = (first..first + count).map(|m| acts.row(m)).collect();
                let v = &mut v[..range.len() * count];
                dot::kquants::rows(self.path, self.ty, self.n_in, w, &a, v);
                for (o, v) in v.chunks_exact(count).enumerate() {
                    for (i, &v) in v.iter().enumerate() {
                        put(first + i, range.start + o, v);
                    }
                }
            }
            return;
        }
        // Q5_0 (most of a q4_k_m file whose rows are not whole super-blocks, as
        // gpt2-xl's 1600): four outputs at a time, the same bits as `row_dot`
        #[cfg(target_arch = "x86_64")]
        let range =
            if self.ty == GgmlType::Q5_0 && matches!(self.path, DotPath::Avx2 | DotPath::Vnni) {
                let four = range.start + range.len() / 4 * 4;
                let all: Vec<&[u8]> = (0..acts.rows).map(|m| acts.row(m)).collect();
                for n in (range.start..four).step_by(4) {
                    let w = [0, 1, 2, 3].map(|g| row(n + g));
                    for (first, a) in (0..).step_by(MAX_ROWS).zip(all.chunks(MAX_ROWS)) {
                        let count = a.len();
                        // SAFETY: the path is supported (AVX2, F16C); whole rows of
                        // blocks; 1 to 8 activation rows.
                        let v = unsafe { dot::avx2::q5_0_rows4(w, a, self.n_in / QK) };
                        for (i, v) in v[..count].iter().enumerate() {
                            for (g, &v) in v.iter().enumerate() {
                                put(first + i, n + g, v);
                            }
                        }
                    }
                }
                four..range.end
            } else {
                range
            };
        for n in range {
            if fast {
                for m in 0..acts.rows {
                    put(
                        m,
                        n,
                        scalar_dot(self.ty == GgmlType::Q4_0, row(n), acts.row(m), blocks),
                    );
                }
                continue;
            }
            let mut v = [0f32; MAX_ROWS];
            for first in (0..acts.rows).step_by(MAX_ROWS) {
                let count = MAX_ROWS.min(acts.rows - first);
                let a: [&[u8]; MAX_ROWS] =
                    std::array::from_fn(|i| acts.row(first + i.min(count - 1)));
                let v = &mut v[..count];
                for (v, a) in v.iter_mut().zip(&a[..count]) {
                    *v = dot::row_dot(self.path, self.ty, self.n_in, row(n), a);
                }
                for (i, &v) in v.iter().enumerate() {
                    put(first + i, n, v);
                }
            }
        }
    }
}

/// Why a row is not run on the blocks.
enum Apart {
    NotFinite,
    TooLarge,
}

/// Outputs the AVX2 kernel computes together for a single row (independent chains).
const GROUP: usize = 4;
/// Activation rows one pass over a weight row serves.
const MAX_ROWS: usize = 8;

/// The call's quantized activation rows.
struct Acts<'a> {
    bytes: &'a [u8],
    row: usize,
    rows: usize,
    /// For Q8_0 activations, each row's block scales widened to f32 once per call (the
    /// kernels would otherwise widen each one once per output).
    scales: Vec<f32>,
    /// For Q4_0 weights, each row's blocks' eight lanes of −8·Σ of four levels: the x86
    /// kernels multiply the unsigned nibbles and start each lane's sum from these, which
    /// takes the offset of 8 off.
    offsets: Vec<i32>,
    /// On the `Vnni` path, for 2 or more rows: each pass's rows laid out for the 512-bit
    /// kernel.
    #[cfg(target_arch = "x86_64")]
    pairs: Vec<avx512::Pairs>,
}

impl Acts<'_> {
    fn row(&self, m: usize) -> &[u8] {
        &self.bytes[m * self.row..(m + 1) * self.row]
    }

    fn scales(&self, m: usize) -> &[f32] {
        let blocks = self.scales.len() / self.rows.max(1);
        &self.scales[m * blocks..(m + 1) * blocks]
    }

    fn offsets(&self, m: usize) -> &[i32] {
        let per_row = self.offsets.len() / self.rows.max(1);
        &self.offsets[m * per_row..(m + 1) * per_row]
    }
}

/// The output buffer, shared by the pool's tasks (each writes its own columns).
struct Out(*mut f32);

impl Out {
    fn at(&self, i: usize) -> *mut f32 {
        // SAFETY (of the callers' writes): see `forward_rows`.
        self.0.wrapping_add(i)
    }
}

// SAFETY: tasks write disjoint elements through it.
unsafe impl Sync for Out {}

/// The 32 weight levels of a Q8_0 or Q4_0 block in weight order (Q4_0: the low nibbles
/// are weights 0–15, the high ones 16–31, each less 8).
fn levels(q4: bool, block: &[u8]) -> [i32; QK] {
    std::array::from_fn(|j| match q4 {
        false => i32::from(block[2 + j] as i8),
        true => {
            let byte = block[2 + j % 16];
            i32::from(if j < 16 { byte & 0x0F } else { byte >> 4 }) - 8
        }
    })
}

/// The portable kernel: ggml's AVX2 order, lane by lane.
fn scalar_dot(q4: bool, w: &[u8], a: &[u8], blocks: usize) -> f32 {
    let wb = if q4 { Q4_0_BYTES } else { Q8_0_BYTES };
    let mut acc = [0f32; 8];
    for b in 0..blocks {
        let (wblock, ablock) = (&w[b * wb..(b + 1) * wb], &a[b * Q8_0_BYTES..]);
        let d = f16_at(wblock, 0) * f16_at(ablock, 0);
        let lv = levels(q4, wblock);
        for (l, lane) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * l..4 * l + 4)
                .map(|j| lv[j] * i32::from(ablock[2 + j] as i8))
                .sum();
            *lane = d.mul_add(sum as f32, *lane);
        }
    }
    dot::lanes_sum(acc)
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;
