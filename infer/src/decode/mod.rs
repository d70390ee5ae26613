//! One decode step on the CPU with no libtorch op between the matrix products.
//!
//! A batch-1 step of gpt2-124M is ~50 matrix products on the decode kernels and, around
//! them, ~250 small libtorch ops (layer norms, the q/k/v split, cache writes, attention,
//! GELU, residual adds, dtype casts), each a dispatch and an allocation of a few
//! microseconds to tens of microseconds: measured, they took a third to a half of the
//! step (bf16: 21.8 ms a token against 11.4 ms for the products). Here the whole block
//! runs on plain slices: the hidden rows stay in one f32 buffer, the kernels write into
//! preallocated buffers, keys and values go straight into the cache tensors' storage and
//! attention reads them there, threads over (row, head) pairs on the kernels' pool.
//!
//! It computes what the libtorch path computes, rounding to the model's dtype where
//! that path makes a tensor of it: in bf16, after each layer norm, linear, attention,
//! activation and residual add, and the unnormalised attention weights before they
//! multiply the values (as libtorch's CPU flash attention does, unless the config asks
//! for `reorder_and_upcast_attn`). f32 differs only in summation order.
//!
//! Used for decode steps (one new token per row, each row at its own slot of its own
//! cache row; up to `kernels::MAX_ROWS` rows a call, larger steps in chunks) of a
//! one-device CPU model whose every linear runs on a decode kernel; anything else (and
//! `EngineOptions::fused_decode` off) takes the libtorch path. The model hands this
//! module its layers' parameters (`LayerParts`) and linears (`Layers`), so that `decode`
//! does not depend on `model`.
use tch::{Kind, Tensor};

use crate::cache::{KvCache, Span};
use crate::config::Activation;
use crate::kernels::{self, PackedLinear, ThreadPool};
use crate::linear::Linear;

mod attend;
mod math;
mod pick;

pub use pick::{bad_rows, greedy, logprobs, BadRow, Rows};

use attend::{Attend, CacheView, SyncPtr};
use math::{bf16_bits, erf, exp, round, round_bf16, sum, sum_sq_dev, tanh};

/// A layer norm's parameters as f32.
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}
impl Norm {
    fn new([weight, bias]: [&Tensor; 2], eps: f64) -> Option<Self> {
        let f = |t: &Tensor| Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1])).ok();
        Some(Self {
            weight: f(weight)?,
            bias: f(bias)?,
            eps: eps as f32,
        })
    }

    /// Normalises each row of `x` (rows × E) into `out`.
    #[inline(always)]
    fn forward(&self, x: &[f32], out: &mut [f32], bf16: bool) {
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
/// Per layer: what the step needs beyond the layer's `Linear`s.
struct LayerPlan {
    ln_1: Norm,
    ln_2: Norm,
    /// Multiplier of q·kᵀ.
    scale: f32,
    /// `reorder_and_upcast_attn`: attention weights stay f32 in a bf16 model.
    upcast: bool,
}
/// What a model needs for fused decode steps, made once when it is packed for the
/// decode kernels.
pub(crate) struct Plan {
    layers: Vec<LayerPlan>,
    ln_f: Norm,
    act: Activation,
    n_head: usize,
    bf16: bool,
    pool: std::sync::Arc<ThreadPool>,
    simd: Simd,
}
/// The decode kernel of a layer, if it has one.
fn kernel(l: &Linear) -> Option<&PackedLinear> {
    match l {
        Linear::Packed { packed, .. } => Some(packed),
        Linear::Int8Weight {
            packed: Some(p), ..
        } => Some(p),
        Linear::Int8(q) => q.packed.as_ref(),
        _ => None,
    }
}
/// The linears of a one-device CPU model's blocks, in the order a block runs them:
/// `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`.
pub(crate) trait Layers {
    fn linears(&self, layer: usize) -> [&Linear; 4];
}
/// What `Plan::new` reads from one block besides its linears.
pub(crate) struct LayerParts<'a> {
    /// `ln_1`'s and `ln_2`'s weight and bias, and their epsilon.
    pub ln_1: [&'a Tensor; 2],
    pub ln_2: [&'a Tensor; 2],
    pub ln_eps: f64,
    /// Multiplier of q·kᵀ.
    pub scale: f64,
    /// `reorder_and_upcast_attn`.
    pub upcast: bool,
}
/// Whether every linear of `layers` (`n` of them) has a decode kernel.
fn all_on_kernels(layers: &dyn Layers, n: usize) -> bool {
    (0..n).all(|l| layers.linears(l).iter().all(|x| kernel(x).is_some()))
}
impl Plan {
    /// The plan for a one-device CPU model of dtype `kind` with `n_head` heads, whose
    /// blocks are `parts` and `layers`, or `None` when its steps cannot run fused (a
    /// dtype other than f32/bf16, a linear without a decode kernel, heads over 256 wide).
    pub(crate) fn new(
        kind: Kind,
        n_head: usize,
        parts: &[LayerParts],
        layers: &dyn Layers,
        ln_f: ([&Tensor; 2], f64),
        act: Activation,
    ) -> Option<Self> {
        let bf16 = match kind {
            Kind::Float => false,
            Kind::BFloat16 => true,
            _ => return None,
        };
        let ln_f = Norm::new(ln_f.0, ln_f.1)?;
        // Attention keeps a head's accumulators on the stack: up to 256 values.
        if ln_f.weight.len() / n_head.max(1) > 256 || !all_on_kernels(layers, parts.len()) {
            return None;
        }
        parts.first()?;
        let pool = kernel(layers.linears(0)[0])?.pool().clone();
        let mut plans = Vec::new();
        for s in parts {
            plans.push(LayerPlan {
                ln_1: Norm::new(s.ln_1, s.ln_eps)?,
                ln_2: Norm::new(s.ln_2, s.ln_eps)?,
                scale: s.scale as f32,
                upcast: s.upcast,
            });
        }
        Some(Self {
            layers: plans,
            ln_f,
            act,
            n_head,
            bf16,
            pool,
            simd: Simd::detect(),
        })
    }

    /// Runs the blocks and `ln_f` for one new token per row of `span`: `x` (R, 1, E) is
    /// the embedded input, the result (R, 1, E) in the model's dtype. Writes the keys
    /// and values into each row's next slot (the caller advances the cache). `None`
    /// (nothing written) when this step cannot run fused, or a layer lost its kernel
    /// since the plan was made; the caller then takes libtorch's path.
    pub(crate) fn step(
        &self,
        layers: &dyn Layers,
        x: &Tensor,
        cache: &KvCache,
        span: &Span,
    ) -> Option<Tensor> {
        let (b, t, e) = x.size3().ok()?;
        let (rows, e) = (b as usize, e as usize);
        if t != 1 || rows > kernels::MAX_ROWS || rows == 0 || x.requires_grad() {
            return None;
        }
        if span.t != 1 || span.rows.len() != rows || !all_on_kernels(layers, self.layers.len()) {
            return None;
        }
        let (nh, cap) = (self.n_head, cache.capacity() as usize);
        let hs = e / nh;
        let cache_kind = if self.bf16 {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let shape = [cache.batch_size(), nh as i64, cap as i64, hs as i64];
        for t in cache.k.iter().chain(&cache.v).flatten() {
            if t.kind() != cache_kind || t.size() != shape || !t.is_contiguous() {
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
        let mut h = Vec::<f32>::try_from(x.to_kind(Kind::Float).reshape([-1])).ok()?;
        let step = Step {
            layers,
            cache,
            valid: valid.as_deref(),
            rows: &span.rows,
            slots: &slots,
        };
        let out = match self.simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` saw avx512f on this CPU.
            Simd::Avx512 => unsafe { self.blocks_avx512(&step, &mut h) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` saw avx2 and fma on this CPU.
            Simd::Avx2 => unsafe { self.blocks_avx2(&step, &mut h) },
            _ => self.blocks(&step, &mut h),
        };
        let out = Tensor::from_slice(&out).view([b, 1, e as i64]);
        Some(if self.bf16 {
            out.to_kind(Kind::BFloat16)
        } else {
            out
        })
    }

    /// `blocks` compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU has avx512f.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn blocks_avx512(&self, step: &Step, h: &mut [f32]) -> Vec<f32> {
        self.blocks(step, h)
    }

    /// `blocks` compiled for AVX2 and FMA (Rust never contracts a·b + c into an FMA on
    /// its own, so every path computes the same values).
    ///
    /// # Safety
    /// The CPU has avx2 and fma.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn blocks_avx2(&self, step: &Step, h: &mut [f32]) -> Vec<f32> {
        self.blocks(step, h)
    }

    /// Every block and `ln_f` over the hidden rows `h` (rows × E, f32): the normed result.
    /// Inlined into the entry points above, so that its loops vectorise for their ISA.
    #[inline(always)]
    fn blocks(&self, step: &Step, h: &mut [f32]) -> Vec<f32> {
        let Step {
            layers,
            cache,
            valid,
            rows: row_of,
            slots,
        } = *step;
        let rows = row_of.len();
        let nh = self.n_head;
        let e = h.len() / rows;
        let hs = e / nh;
        let cap = cache.capacity() as usize;
        let inner = kernel(layers.linears(0)[2]).map_or(0, |k| k.out_features());
        let mut normed = vec![0f32; rows * e];
        let mut qkv = vec![0f32; rows * 3 * e];
        let mut attn = vec![0f32; rows * e];
        let mut proj = vec![0f32; rows * e];
        let mut mid = vec![0f32; rows * inner];
        let bf16 = self.bf16;
        for (l, (lp, (kc, vc))) in self
            .layers
            .iter()
            .zip(cache.k.iter().zip(&cache.v))
            .enumerate()
        {
            // `step` checked that every linear has a kernel.
            let [c_attn, attn_proj, c_fc, mlp_proj] = layers
                .linears(l)
                .map(|x| kernel(x).expect("checked by step"));
            lp.ln_1.forward(h, &mut normed, bf16);
            c_attn.forward(&normed, rows, &mut qkv);
            round_all(&mut qkv, bf16);
            let cache = CacheView {
                k: kc[0].data_ptr(),
                v: vc[0].data_ptr(),
                slot_rows: cache.slot_rows(),
                rows: row_of,
                bf16,
                nh,
                cap,
                hs,
            };
            cache.write(&qkv, slots);
            let job = Attend {
                cache: &cache,
                qkv: &qkv,
                out: SyncPtr(attn.as_mut_ptr()),
                valid,
                slots,
                scale: lp.scale,
                round_p: bf16 && !lp.upcast,
                bf16,
                simd: self.simd,
            };
            let tasks = rows * nh;
            let work: usize = slots.iter().map(|s| (s + 1) * nh * hs).sum();
            if work >= PARALLEL_ATTENTION_MIN {
                self.pool.run(tasks, &|i| job.run(i));
            } else {
                for i in 0..tasks {
                    job.run(i);
                }
            }
            attn_proj.forward(&attn, rows, &mut proj);
            add_residual(h, &proj, bf16);
            lp.ln_2.forward(h, &mut normed, bf16);
            c_fc.forward(&normed, rows, &mut mid);
            activate(self.act, &mut mid, bf16);
            mlp_proj.forward(&mid, rows, &mut proj);
            add_residual(h, &proj, bf16);
        }
        self.ln_f.forward(h, &mut normed, bf16);
        normed
    }
}
/// One step's inputs to `Plan::blocks`.
#[derive(Clone, Copy)]
struct Step<'a> {
    layers: &'a dyn Layers,
    cache: &'a KvCache,
    valid: Option<&'a [u8]>,
    /// The cache row and the new slot of each of the step's rows.
    rows: &'a [usize],
    slots: &'a [usize],
}
/// The widest vector ISA the small ops are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Simd {
    Avx512,
    Avx2,
    Base,
}
impl Simd {
    fn detect() -> Simd {
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
fn add_residual(h: &mut [f32], p: &[f32], bf16: bool) {
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
fn activate(act: Activation, xs: &mut [f32], bf16: bool) {
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
