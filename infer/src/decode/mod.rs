//! The arithmetic of a fused CPU decode step on plain f32 slices: layer norm, the
//! activations, residual adds, and attention over the KV cache read in place
//! (`attend`). `model::fused` runs the model's blocks on these ops, with no libtorch op
//! between the matrix products.
//!
//! A batch-1 step of gpt2-124M is ~50 matrix products on the decode kernels and, around
//! them, ~250 small libtorch ops (layer norms, the q/k/v split, cache writes, attention,
//! GELU, residual adds, dtype casts), each a dispatch and an allocation of a few
//! microseconds to tens of microseconds: measured, they took a third to a half of the
//! step (bf16: 21.8 ms a token against 11.4 ms for the products). On slices the hidden
//! rows stay in f32 buffers, the kernels write into preallocated ones, keys and values go
//! straight into the cache tensors' storage and attention reads them there, threads over
//! (row, head) pairs on the kernels' pool.
//!
//! A step computes what the libtorch path computes, rounding to the model's dtype where
//! that path makes a tensor of it: in bf16, after each layer norm, `c_attn` (q, k and v),
//! attention, activation and residual add (a projection's output as it is added), and the
//! unnormalised attention weights before they multiply the values (as libtorch's CPU
//! flash attention does, unless the config asks for `reorder_and_upcast_attn`); `c_fc`'s
//! output goes into the activation unrounded. f32 differs only in summation order. Every
//! op is `#[inline(always)]`, so that its loops vectorise for the ISA of the entry point
//! (`Simd`) it is inlined into.
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::cache::{KvCache, Span};
use crate::config::Activation;
use crate::gguf::matmul::BlockLinear;
use crate::kernels::{PackedLinear, ThreadPool};
use crate::linear::Linear;

mod attend;
mod math;
mod pick;

pub use pick::{bad_of_max, bad_rows, greedy, logprobs, BadRow, Rows};

use attend::{Attend, CacheView, SyncPtr};
use math::{bf16_bits, erf, exp, round, round_bf16, sum, sum_sq_dev, tanh};

/// A layer norm's parameters as f32, for the fused step.
pub(crate) struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}
impl Norm {
    pub(crate) fn new(weight: &Tensor, bias: &Tensor, eps: f64) -> Option<Self> {
        let f = |t: &Tensor| Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1])).ok();
        Some(Self {
            weight: f(weight)?,
            bias: f(bias)?,
            eps: eps as f32,
        })
    }

    /// Normalises each row of `x` (rows × E) into `out`, rounded.
    #[inline(always)]
    pub(crate) fn forward(&self, x: &[f32], out: &mut [f32], bf16: bool) {
        let e = self.weight.len();
        for (xr, yr) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
            let mean = sum(xr) / e as f32;
            // 16 lanes (a left-to-right f32 sum is a chain of dependent scalar adds).
            let var = sum_sq_dev(xr, mean) / e as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            for (((y, x), w), b) in yr.iter_mut().zip(xr).zip(&self.weight).zip(&self.bias) {
                *y = round((x - mean) * rstd * w + b, bf16);
            }
        }
    }
}
/// A layer's decode kernel: a packed weight, or a GGUF weight's blocks.
pub(crate) enum Kernel<'a> {
    Packed(&'a PackedLinear),
    Blocks(&'a BlockLinear),
}

impl Kernel<'_> {
    pub(crate) fn out_features(&self) -> usize {
        match self {
            Kernel::Packed(p) => p.out_features(),
            Kernel::Blocks(b) => b.out_features(),
        }
    }

    /// y = x·W + b for `rows` rows of `x` (rows, in) into `out` (rows, out).
    pub(crate) fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        match self {
            Kernel::Packed(p) => p.forward(x, rows, out),
            Kernel::Blocks(b) => b.forward_rows(x, rows, out),
        }
    }

    pub(crate) fn pool(&self) -> &Arc<ThreadPool> {
        match self {
            Kernel::Packed(p) => p.pool(),
            Kernel::Blocks(b) => b.pool(),
        }
    }
}

/// The decode kernel of a layer, if it has one.
pub(crate) fn kernel(l: &Linear) -> Option<Kernel<'_>> {
    match l {
        Linear::Packed { packed, .. } => Some(Kernel::Packed(packed)),
        Linear::Int8Weight {
            packed: Some(p), ..
        } => Some(Kernel::Packed(p)),
        Linear::Int8(q) => q.packed.as_ref().map(Kernel::Packed),
        Linear::Blocks(b) => Some(Kernel::Blocks(b)),
        _ => None,
    }
}
/// Where one step's rows attend: the KV cache, each row's cache row and new slot, and a
/// left-padded batch's mask; and how (the dtype, the ISA, the threads).
pub(crate) struct StepCache<'a> {
    cache: &'a KvCache,
    /// The cache row of each of the step's rows.
    rows: &'a [usize],
    /// Each row's new slot (its position).
    slots: Vec<usize>,
    /// A left-padded batch: which slots each row may attend to, (rows × (slot + 1)).
    valid: Option<Vec<u8>>,
    n_head: usize,
    bf16: bool,
    simd: Simd,
    pool: &'a ThreadPool,
}
impl<'a> StepCache<'a> {
    /// The attention context for one new token per row of `span`, or `None` when the
    /// cache is not laid out as the fused step reads it: per layer one contiguous
    /// (B, nh, cap, hs) tensor of the model's dtype (f32, or bf16 when `bf16`).
    pub(crate) fn new(
        cache: &'a KvCache,
        span: &'a Span,
        n_head: usize,
        e: usize,
        bf16: bool,
        simd: Simd,
        pool: &'a ThreadPool,
    ) -> Option<Self> {
        let hs = e / n_head;
        let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
        let shape = [
            cache.batch_size(),
            n_head as i64,
            cache.capacity(),
            hs as i64,
        ];
        for t in cache.k.iter().chain(&cache.v).flatten() {
            if t.kind() != kind || t.size() != shape || !t.is_contiguous() {
                return None;
            }
        }
        let slots: Vec<usize> = span.starts.iter().map(|&s| s as usize).collect();
        // A left-padded batch: which slots each row may attend to (its valid ones, and
        // always its own). Its rows are at one slot.
        let valid: Option<Vec<u8>> = if cache.padded() {
            let slot = span.uniform()?;
            let rows: Vec<i64> = span.rows.iter().map(|&r| r as i64).collect();
            let v = cache
                .valid()
                .index_select(
                    0,
                    &Tensor::from_slice(&rows).to_device(cache.valid().device()),
                )
                .narrow(1, 0, slot + 1)
                .to_kind(Kind::Uint8);
            Some(Vec::<u8>::try_from(v.contiguous().reshape([-1])).ok()?)
        } else {
            None
        };
        Some(Self {
            cache,
            rows: &span.rows,
            slots,
            valid,
            n_head,
            bf16,
            simd,
            pool,
        })
    }

    /// Layer `layer`'s attention: rounds `qkv` (rows × 3E: q | k | v, `c_attn`'s
    /// output), writes each row's key and value into its slot of the cache, and writes
    /// each row's attention over its slots into `out` (rows × E), rounded.
    #[inline(always)]
    pub(crate) fn attend(
        &self,
        layer: usize,
        qkv: &mut [f32],
        out: &mut [f32],
        scale: f32,
        upcast: bool,
    ) {
        round_all(qkv, self.bf16);
        let nh = self.n_head;
        let hs = out.len() / self.rows.len() / nh;
        let cache = CacheView {
            k: self.cache.k[layer][0].data_ptr(),
            v: self.cache.v[layer][0].data_ptr(),
            slot_rows: self.cache.slot_rows(),
            rows: self.rows,
            bf16: self.bf16,
            nh,
            cap: self.cache.capacity() as usize,
            hs,
        };
        cache.write(qkv, &self.slots);
        let job = Attend {
            cache: &cache,
            qkv,
            out: SyncPtr(out.as_mut_ptr()),
            valid: self.valid.as_deref(),
            slots: &self.slots,
            scale,
            round_p: self.bf16 && !upcast,
            bf16: self.bf16,
            simd: self.simd,
        };
        let tasks = self.rows.len() * nh;
        let work: usize = self.slots.iter().map(|s| (s + 1) * nh * hs).sum();
        if work >= PARALLEL_ATTENTION_MIN {
            self.pool.run(tasks, &|i| job.run(i));
        } else {
            for i in 0..tasks {
                job.run(i);
            }
        }
    }
}
/// The widest vector ISA the small ops are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    Avx512,
    Avx2,
    Base,
}
impl Simd {
    pub(crate) fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Base
    }
}
/// Attention work below which threads cost more than they save (rows·heads·slots·hs).
/// A layer's heads at batch 1 already pay: their keys and values come from memory (the
/// weights streamed since evicted them), so one head waits ~3.5 µs at 44 slots, and two
/// threads took a batch-1 step's attention from 0.52 to 0.40 ms (gpt2, 64 tokens).
const PARALLEL_ATTENTION_MIN: usize = 1 << 12;
/// h += round(p), rounded (p is a linear's f32 output).
#[inline(always)]
pub(crate) fn add_residual(h: &mut [f32], p: &[f32], bf16: bool) {
    for (x, y) in h.iter_mut().zip(p.iter()) {
        *x = round(*x + round(*y, bf16), bf16);
    }
}
#[inline(always)]
fn round_all(xs: &mut [f32], bf16: bool) {
    if bf16 {
        for x in xs.iter_mut() {
            *x = round_bf16(*x);
        }
    }
}
/// The activation in place, rounded (libtorch computes these in f32 for bf16 inputs).
/// One loop per function, each a plain loop over an inlined scalar function, so that it
/// vectorises for the ISA of the entry point it is inlined into.
#[inline(always)]
pub(crate) fn activate(act: Activation, xs: &mut [f32], bf16: bool) {
    macro_rules! each {
        ($f:expr) => {
            for x in xs.iter_mut() {
                *x = round($f(*x), bf16);
            }
        };
    }
    match act {
        Activation::GeluTanh => each!(gelu_tanh),
        // 0.5·x·(1 + erf(x/√2)).
        Activation::Gelu => {
            each!(|x: f32| 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)))
        }
        Activation::QuickGelu => each!(|x: f32| x * (1.0 / (1.0 + exp(-(x * 1.702))))),
        Activation::Relu => each!(|x: f32| x.max(0.0)),
        Activation::Relu6 => each!(|x: f32| x.clamp(0.0, 6.0)),
        Activation::Silu => each!(|x: f32| x / (1.0 + exp(-x))),
        Activation::Tanh => each!(tanh),
        Activation::Sigmoid => each!(|x: f32| 1.0 / (1.0 + exp(-x))),
        Activation::LeakyRelu => each!(|x: f32| if x > 0.0 { x } else { 0.01 * x }),
        Activation::Linear => {}
        // x·tanh(softplus(x)).
        Activation::Mish => each!(|x: f32| x * x.exp().ln_1p().tanh()),
    }
}
/// libtorch's tanh-approximated GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const BETA: f32 = 0.797_884_6; // √(2/π)
    0.5 * x * (1.0 + tanh(BETA * (x + 0.044715 * x * x * x)))
}
