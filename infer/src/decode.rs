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
//! Used for decode steps (one new token per row, up to `kernels::MAX_ROWS` rows) of a
//! one-device CPU model whose every linear runs on a decode kernel; anything else (and
//! `GPT2KIT_FUSED_DECODE=0`) takes the libtorch path.
use tch::{Device, Kind, Tensor};

use crate::cache::KvCache;
use crate::config::Activation;
use crate::kernels::{self, PackedLinear, ThreadPool};
use crate::linear::Linear;
use crate::model::{Block, Gpt2, LayerNorm};

/// A layer norm's parameters as f32.
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn new(ln: &LayerNorm, eps: f64) -> Option<Self> {
        let f = |t: &Tensor| Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1])).ok();
        Some(Self {
            weight: f(&ln.weight)?,
            bias: f(&ln.bias)?,
            eps: eps as f32,
        })
    }

    /// Normalises each row of `x` (rows × E) into `out`.
    #[inline(always)]
    fn forward(&self, x: &[f32], out: &mut [f32], bf16: bool) {
        let e = self.weight.len();
        for (xr, yr) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
            let mean = sum(xr) / e as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / e as f32;
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

/// Whether fused decode steps are allowed: on unless `GPT2KIT_FUSED_DECODE=0` (which
/// keeps the kernels but runs libtorch between them, for comparison).
pub fn fused_decode_enabled() -> bool {
    std::env::var("GPT2KIT_FUSED_DECODE").map_or(true, |v| v != "0")
}

/// Per-layer settings `Plan::new` reads from each block (private to `model`).
pub(crate) struct LayerSettings {
    pub ln_eps: f64,
    pub scale: f64,
    pub upcast: bool,
}

impl Plan {
    /// The plan for `model`, or `None` when its steps cannot run fused (not one CPU
    /// device, a dtype other than f32/bf16, a linear without a decode kernel, an
    /// activation this module does not compute).
    pub(crate) fn new(
        model: &Gpt2,
        blocks: &[Block],
        settings: &[LayerSettings],
        ln_f: (&LayerNorm, f64),
        act: Activation,
    ) -> Option<Self> {
        let bf16 = match model.kind() {
            Kind::Float => false,
            Kind::BFloat16 => true,
            _ => return None,
        };
        // Attention keeps a head's accumulators on the stack: up to 256 values.
        let small_heads = model.config.head_dim() <= 256;
        if model.devices() != [Device::Cpu] || !fused_decode_enabled() || !small_heads {
            return None;
        }
        let mut pool = None;
        let mut layers = Vec::new();
        for (block, s) in blocks.iter().zip(settings) {
            let [a] = &block.attn.shards[..] else {
                return None;
            };
            let [m] = &block.mlp.shards[..] else {
                return None;
            };
            for l in [&a.c_attn, &a.c_proj, &m.c_fc, &m.c_proj] {
                pool.get_or_insert_with(|| kernel(l).map(|k| k.pool().clone()));
                kernel(l)?;
            }
            if block.attn.c_proj_bias.is_some() || block.mlp.c_proj_bias.is_some() {
                return None;
            }
            layers.push(LayerPlan {
                ln_1: Norm::new(&block.ln_1, s.ln_eps)?,
                ln_2: Norm::new(&block.ln_2, s.ln_eps)?,
                scale: s.scale as f32,
                upcast: s.upcast,
            });
        }
        Some(Self {
            layers,
            ln_f: Norm::new(ln_f.0, ln_f.1)?,
            act,
            n_head: model.config.n_head as usize,
            bf16,
            pool: pool.flatten()?,
            simd: Simd::detect(),
        })
    }

    /// Runs the blocks and `ln_f` for one new token per row: `x` (B, 1, E) is the
    /// embedded input, the result (B, 1, E) in the model's dtype. Writes the keys and
    /// values into the cache's next slot (the caller advances it). `None` (nothing
    /// written) when this step cannot run fused; the caller then takes libtorch's path.
    pub(crate) fn step(&self, blocks: &[Block], x: &Tensor, cache: &KvCache) -> Option<Tensor> {
        let (b, t, e) = x.size3().ok()?;
        let (rows, e) = (b as usize, e as usize);
        if t != 1 || rows > kernels::MAX_ROWS || rows == 0 || x.requires_grad() {
            return None;
        }
        let (nh, slot, cap) = (self.n_head, cache.len() as usize, cache.capacity() as usize);
        let hs = e / nh;
        let cache_kind = if self.bf16 {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let shape = [b, nh as i64, cap as i64, hs as i64];
        for t in cache.k.iter().chain(&cache.v).flatten() {
            if t.kind() != cache_kind || t.size() != shape || !t.is_contiguous() {
                return None;
            }
        }
        // Which slots each row may attend to: its valid ones, and always its own.
        let valid: Option<Vec<u8>> = if cache.padded() {
            let v = cache
                .valid()
                .narrow(1, 0, slot as i64 + 1)
                .to_kind(Kind::Uint8);
            Some(Vec::<u8>::try_from(v.contiguous().reshape([-1])).ok()?)
        } else {
            None
        };
        let mut h = Vec::<f32>::try_from(x.to_kind(Kind::Float).reshape([-1])).ok()?;
        let step = Step {
            blocks,
            cache,
            valid: valid.as_deref(),
            rows,
            slot,
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
            blocks,
            cache,
            valid,
            rows,
            slot,
        } = *step;
        let nh = self.n_head;
        let e = h.len() / rows;
        let hs = e / nh;
        let cap = cache.capacity() as usize;
        let inner = kernel(&blocks[0].mlp.shards[0].c_fc).map_or(0, |k| k.out_features());
        let mut normed = vec![0f32; rows * e];
        let mut qkv = vec![0f32; rows * 3 * e];
        let mut attn = vec![0f32; rows * e];
        let mut proj = vec![0f32; rows * e];
        let mut mid = vec![0f32; rows * inner];
        let bf16 = self.bf16;
        for ((block, lp), (kc, vc)) in blocks
            .iter()
            .zip(&self.layers)
            .zip(cache.k.iter().zip(&cache.v))
        {
            let (a, m) = (&block.attn.shards[0], &block.mlp.shards[0]);
            // `Plan::new` checked that every linear has a kernel.
            let k = |l| kernel(l).expect("checked by Plan::new");
            lp.ln_1.forward(h, &mut normed, bf16);
            k(&a.c_attn).forward(&normed, rows, &mut qkv);
            round_all(&mut qkv, bf16);
            let cache = CacheView {
                k: kc[0].data_ptr(),
                v: vc[0].data_ptr(),
                slot_rows: cache.slot_rows(),
                bf16,
                nh,
                cap,
                hs,
            };
            cache.write(&qkv, rows, slot);
            let job = Attend {
                cache: &cache,
                qkv: &qkv,
                out: SyncPtr(attn.as_mut_ptr()),
                valid,
                slot,
                scale: lp.scale,
                round_p: bf16 && !lp.upcast,
                bf16,
                simd: self.simd,
            };
            let tasks = rows * nh;
            if tasks * (slot + 1) * hs >= PARALLEL_ATTENTION_MIN {
                self.pool.run(tasks, &|i| job.run(i));
            } else {
                for i in 0..tasks {
                    job.run(i);
                }
            }
            k(&a.c_proj).forward(&attn, rows, &mut proj);
            add_residual(h, &proj, bf16);
            lp.ln_2.forward(h, &mut normed, bf16);
            k(&m.c_fc).forward(&normed, rows, &mut mid);
            activate(self.act, &mut mid, bf16);
            k(&m.c_proj).forward(&mid, rows, &mut proj);
            add_residual(h, &proj, bf16);
        }
        self.ln_f.forward(h, &mut normed, bf16);
        normed
    }
}

/// One step's inputs to `Plan::blocks`.
#[derive(Clone, Copy)]
struct Step<'a> {
    blocks: &'a [Block],
    cache: &'a KvCache,
    valid: Option<&'a [u8]>,
    rows: usize,
    slot: usize,
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
const PARALLEL_ATTENTION_MIN: usize = 1 << 16;

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

#[inline(always)]
fn round(x: f32, bf16: bool) -> f32 {
    if bf16 {
        round_bf16(x)
    } else {
        x
    }
}

/// f32 → bf16 → f32, rounding to nearest even as libtorch's conversion does.
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    // Sixteen partial sums: vectorises, and sums in a tree like libtorch's reductions.
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    tree_sum(acc) + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        // Fixed-size arrays, so that the 16 lanes become one vector operation.
        let x: &[f32; 16] = x.try_into().expect("chunks of 16");
        let y: &[T; 16] = y.try_into().expect("chunks of 16");
        let y = y.map(Elem::f32);
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    tree_sum(acc) + ra.iter().zip(rb).map(|(x, y)| x * y.f32()).sum::<f32>()
}

/// The 16 lanes summed by halves (8 + 8, 4 + 4, ...): a few vector adds, where a
/// left-to-right sum is 15 dependent scalar adds (it dominated attention's q·k).
#[inline(always)]
fn tree_sum(mut acc: [f32; 16]) -> f32 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
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

/// eˣ in f32 to about 1 ulp (Cephes' `expf`), without branches so loops vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + 0.5;
    let n = t as i32 - (t < (t as i32) as f32) as i32; // floor
    let nf = n as f32;
    let z = x - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * z + 1.398_199_9e-3;
    p = p * z + 8.333_452e-3;
    p = p * z + 4.166_579_6e-2;
    p = p * z + 1.666_666_5e-1;
    p = p * z + 5.000_000_1e-1;
    p = p * z * z + z + 1.0;
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// tanh via eˣ: 1 − 2 / (e²ˣ + 1); for |x| < 0.05 its odd series (relative accuracy
/// near 0, where the subtraction would cancel).
#[inline(always)]
fn tanh(x: f32) -> f32 {
    let big = 1.0 - 2.0 / (exp(2.0 * x) + 1.0);
    let x2 = x * x;
    let small = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)));
    if x.abs() < 0.05 {
        small
    } else {
        big
    }
}

/// erf to 1.5e-7 absolute (Abramowitz and Stegun 7.1.26, evaluated in f64).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-a * a).exp();
    (if x < 0.0 { -y } else { y }) as f32
}

/// Raw access to one layer's key and value cache: (B, nh, cap, hs), f32 or bf16.
struct CacheView<'a> {
    k: *mut std::ffi::c_void,
    v: *mut std::ffi::c_void,
    /// `KvCache::slot_rows`: which stored row holds each row's slot (None: its own).
    slot_rows: Option<&'a [u32]>,
    bf16: bool,
    nh: usize,
    cap: usize,
    hs: usize,
}

// SAFETY: the pointers address the cache tensors of a `&KvCache` that outlives every use
// (`Plan::step` borrows it for the whole step); tasks read them only after `write`
// returned, and nothing writes them while tasks run.
unsafe impl Sync for CacheView<'_> {}

impl CacheView<'_> {
    /// Element offset of (row, head, slot, 0).
    fn at(&self, row: usize, head: usize, slot: usize) -> usize {
        ((row * self.nh + head) * self.cap + slot) * self.hs
    }

    /// Stores the new token's keys and values (from qkv rows: q | k | v) at `slot`.
    #[inline(always)]
    fn write(&self, qkv: &[f32], rows: usize, slot: usize) {
        let e = self.nh * self.hs;
        for r in 0..rows {
            for h in 0..self.nh {
                let at = self.at(r, h, slot);
                let k = &qkv[r * 3 * e + e + h * self.hs..][..self.hs];
                let v = &qkv[r * 3 * e + 2 * e + h * self.hs..][..self.hs];
                // SAFETY: `Plan::step` checked each cache tensor is contiguous with shape
                // (B ≥ rows, nh, cap > slot, hs) and this dtype, so [at, at + hs) lies
                // inside it; no other reference to the storage is live during the step.
                unsafe {
                    if self.bf16 {
                        let (kp, vp) = (self.k as *mut u16, self.v as *mut u16);
                        for i in 0..self.hs {
                            *kp.add(at + i) = bf16_bits(k[i]);
                            *vp.add(at + i) = bf16_bits(v[i]);
                        }
                    } else {
                        let (kp, vp) = (self.k as *mut f32, self.v as *mut f32);
                        std::ptr::copy_nonoverlapping(k.as_ptr(), kp.add(at), self.hs);
                        std::ptr::copy_nonoverlapping(v.as_ptr(), vp.add(at), self.hs);
                    }
                }
            }
        }
    }

    /// Row `row`'s key or value of `head` at slot `s` (hs values), in the cache's
    /// storage: in the stored row `slot_rows` names (its own when there is no table).
    ///
    /// # Safety
    /// `T` is the cache's element type (f32, or u16 for bf16 bits), `row` < B, `head` <
    /// nh, `s` < cap, and nothing writes the cache while the slice lives.
    #[inline(always)]
    unsafe fn slot<T>(
        &self,
        which: *mut std::ffi::c_void,
        row: usize,
        head: usize,
        s: usize,
    ) -> &[T] {
        let stored = self
            .slot_rows
            .map_or(row, |m| m[row * self.cap + s] as usize);
        // SAFETY: `Plan::step` checked each cache tensor is contiguous with shape
        // (B, nh, cap, hs); `KvCache` keeps every table entry < B; so hs elements from
        // (stored, head, s) lie inside it. The caller vouches for the rest.
        unsafe {
            std::slice::from_raw_parts((which as *const T).add(self.at(stored, head, s)), self.hs)
        }
    }
}

/// 16 cache elements as f32.
///
/// # Safety
/// avx512f; `p` points at 16 readable elements of type `T`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<T: Elem>(p: *const T) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: this function's contract.
    unsafe {
        if T::BF16 {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }
}

/// acc[..16·C] += Σ_s p_s · v_s over the slots with p_s ≠ 0, in slot order (the same sums
/// as the portable loop), with the C accumulators in registers.
///
/// # Safety
/// avx512f; `values(s)` points at 16·C readable elements of type `T` for every slot s
/// of `scores`; 16·C ≤ acc.len().
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn weigh<T: Elem, const C: usize>(
    scores: &[f32],
    values: impl Fn(usize) -> *const T,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut regs = [_mm512_setzero_ps(); C];
    for (s, &p) in scores.iter().enumerate() {
        if p != 0.0 {
            let v = values(s);
            let pv = _mm512_set1_ps(p);
            for (j, r) in regs.iter_mut().enumerate() {
                // SAFETY: this function's contract: 16·C elements at v.
                *r = _mm512_add_ps(*r, _mm512_mul_ps(pv, unsafe { load16(v.add(16 * j)) }));
            }
        }
    }
    for (j, r) in regs.iter().enumerate() {
        // SAFETY: 16·C ≤ acc.len().
        unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(16 * j), *r) };
    }
}

/// A cache element: f32, or bf16 stored as its bits.
trait Elem: Copy {
    /// Whether the element is bf16 bits (else f32).
    const BF16: bool;
    fn f32(self) -> f32;
}

impl Elem for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Elem for u16 {
    const BF16: bool = true;
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: each attention task writes only its own (row, head) slice through it.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

/// Attention of the new token of every row over its cached slots, one (row, head) per task.
struct Attend<'a> {
    cache: &'a CacheView<'a>,
    qkv: &'a [f32],
    out: SyncPtr,
    valid: Option<&'a [u8]>,
    slot: usize,
    scale: f32,
    round_p: bool,
    bf16: bool,
    simd: Simd,
}

impl Attend<'_> {
    fn run(&self, task: usize) {
        match self.simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` saw avx512f on this CPU.
            Simd::Avx512 => unsafe { self.run_avx512(task) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` saw avx2 and fma on this CPU.
            Simd::Avx2 => unsafe { self.run_avx2(task) },
            _ => self.run_any(task),
        }
    }

    /// # Safety
    /// The CPU has avx512f.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, task: usize) {
        if self.cache.hs % 16 == 0 {
            // SAFETY: avx512f (this function's contract); the cache's element type as
            // in `run_any`.
            unsafe {
                if self.bf16 {
                    self.run_on_avx512::<u16>(task)
                } else {
                    self.run_on_avx512::<f32>(task)
                }
            }
        } else {
            self.run_any(task)
        }
    }

    /// `run_on` with AVX-512 intrinsics for heads of a multiple of 16 values: the same
    /// products, sums and order (mul then add, no FMA; lanes summed by `tree_sum`), so
    /// the same values; the compiler had left q·k as 2-wide loads (perf annotate).
    ///
    /// # Safety
    /// The CPU has avx512f; hs % 16 == 0; as `CacheView::slot` for `T`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_on_avx512<T: Elem>(&self, task: usize) {
        use std::arch::x86_64::*;
        let c = self.cache;
        let (nh, hs) = (c.nh, c.hs);
        let e = nh * hs;
        let (row, head) = (task / nh, task % nh);
        let n = self.slot + 1;
        let q = &self.qkv[row * 3 * e + head * hs..][..hs];
        // SAFETY (all loads below): `p` points at 16 elements of type `T` inside a slot
        // (hs values, hs % 16 == 0).
        let load = |p: *const T| unsafe { load16(p) };
        let seen = |s: usize| s == self.slot || self.valid.map_or(true, |v| v[row * n + s] != 0);
        let mut scores = Vec::with_capacity(n);
        let mut max = f32::NEG_INFINITY;
        for s in 0..n {
            let v = if seen(s) {
                // SAFETY: row < B, head < nh, s < n ≤ cap (the caller's contract).
                let k = unsafe { c.slot::<T>(c.k, row, head, s) };
                let mut acc = _mm512_setzero_ps();
                for i in (0..hs).step_by(16) {
                    // SAFETY: i + 16 ≤ hs = q.len() = k.len().
                    let (qv, kv) =
                        unsafe { (_mm512_loadu_ps(q.as_ptr().add(i)), load(k.as_ptr().add(i))) };
                    acc = _mm512_add_ps(acc, _mm512_mul_ps(qv, kv));
                }
                let mut lanes = [0f32; 16];
                // SAFETY: 16 f32 into a 16-element array.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
                tree_sum(lanes) * self.scale
            } else {
                f32::NEG_INFINITY
            };
            max = max.max(v);
            scores.push(v);
        }
        let mut total = 0.0;
        for p in scores.iter_mut() {
            let w = exp(*p - max) * (*p != f32::NEG_INFINITY) as u8 as f32;
            total += w;
            *p = round(w, self.round_p);
        }
        let mut acc = [0f32; 256];
        // The weighted sum of values, its accumulators in registers for the common head
        // sizes (a round trip through memory per slot was the loop's bottleneck).
        // SAFETY: avx512f (this function's contract); `values` as `slot` above.
        unsafe {
            let values = |s: usize| c.slot::<T>(c.v, row, head, s).as_ptr();
            match hs / 16 {
                1 => weigh::<T, 1>(&scores, values, &mut acc),
                2 => weigh::<T, 2>(&scores, values, &mut acc),
                4 => weigh::<T, 4>(&scores, values, &mut acc),
                8 => weigh::<T, 8>(&scores, values, &mut acc),
                _ => {
                    for (s, &p) in scores.iter().enumerate() {
                        if p != 0.0 {
                            let v = values(s);
                            let pv = _mm512_set1_ps(p);
                            for i in (0..hs).step_by(16) {
                                let a = _mm512_loadu_ps(acc.as_ptr().add(i));
                                let t = _mm512_add_ps(a, _mm512_mul_ps(pv, load16(v.add(i))));
                                _mm512_storeu_ps(acc.as_mut_ptr().add(i), t);
                            }
                        }
                    }
                }
            }
        }
        // SAFETY: `out` holds rows × e values; [row·e + head·hs, + hs) is this task's.
        let out =
            unsafe { std::slice::from_raw_parts_mut(self.out.0.add(row * e + head * hs), hs) };
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            *o = round(a / total, self.bf16);
        }
    }

    /// # Safety
    /// The CPU has avx2 and fma.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, task: usize) {
        self.run_any(task)
    }

    #[inline(always)]
    fn run_any(&self, task: usize) {
        // SAFETY: the cache holds bf16 bits when `bf16`, f32 otherwise (checked by
        // `Plan::step`), and nothing writes it while attention runs.
        if self.bf16 {
            unsafe { self.run_on::<u16>(task) }
        } else {
            unsafe { self.run_on::<f32>(task) }
        }
    }

    /// # Safety
    /// As `CacheView::slab`.
    #[inline(always)]
    unsafe fn run_on<T: Elem>(&self, task: usize) {
        let c = self.cache;
        let (nh, hs) = (c.nh, c.hs);
        let e = nh * hs;
        let (row, head) = (task / nh, task % nh);
        let n = self.slot + 1;
        let q = &self.qkv[row * 3 * e + head * hs..][..hs];
        // SAFETY: the caller's contract; row < B, head < nh, every s < n ≤ cap.
        let keys = (0..n).map(|s| unsafe { c.slot::<T>(c.k, row, head, s) });
        let values = (0..n).map(|s| unsafe { c.slot::<T>(c.v, row, head, s) });
        {
            // A local buffer, not a thread-local one: `LocalKey::with` would not inline,
            // and its closure would lose the caller's ISA.
            let mut scores = Vec::with_capacity(n);
            let seen =
                |s: usize| s == self.slot || self.valid.map_or(true, |v| v[row * n + s] != 0);
            let mut max = f32::NEG_INFINITY;
            for (s, k) in keys.enumerate() {
                let v = if seen(s) {
                    dot(q, k) * self.scale
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(v);
                scores.push(v);
            }
            let mut total = 0.0;
            for p in scores.iter_mut() {
                let w = exp(*p - max) * (*p != f32::NEG_INFINITY) as u8 as f32;
                total += w;
                *p = round(w, self.round_p);
            }
            let mut acc = [0f32; 256];
            let acc = &mut acc[..hs];
            for (&p, v) in scores.iter().zip(values) {
                if p != 0.0 {
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a += p * v.f32();
                    }
                }
            }
            // SAFETY: `out` holds rows × e values; [row·e + head·hs, + hs) is this
            // task's alone.
            let out =
                unsafe { std::slice::from_raw_parts_mut(self.out.0.add(row * e + head * hs), hs) };
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                *o = round(a / total, self.bf16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_match_std() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let (e, want) = (exp(x), x.exp());
            assert!(
                (e - want).abs() <= 2.0 * f32::EPSILON * want,
                "exp({x}) = {e}, std {want}"
            );
            let (t, want) = (tanh(x), x.tanh());
            assert!(
                (t - want).abs() <= 4.0 * f32::EPSILON,
                "tanh({x}) = {t}, std {want}"
            );
        }
        assert!(exp(-200.0) < 1e-37 && exp(200.0) > 1e38);
        // erf against libtorch's.
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.01).collect();
        let want = Vec::<f32>::try_from(Tensor::from_slice(&xs).erf()).unwrap();
        for (x, w) in xs.iter().zip(&want) {
            assert!(
                (erf(*x) - w).abs() <= 2e-7,
                "erf({x}) = {}, libtorch {w}",
                erf(*x)
            );
        }
    }

    /// Attention on every ISA this CPU has gives the same bits as the portable code, in
    /// f32 and bf16, with a padding mask and a reordered slot table.
    #[test]
    fn attention_is_the_same_on_every_isa() {
        let (rows, nh, hs, cap, slot) = (3usize, 2usize, 64usize, 40usize, 33usize);
        let e = nh * hs;
        let mut seed = 7u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        let qkv: Vec<f32> = (0..rows * 3 * e).map(|_| rand()).collect();
        let mut k32: Vec<f32> = (0..rows * nh * cap * hs).map(|_| rand()).collect();
        let mut v32: Vec<f32> = (0..rows * nh * cap * hs).map(|_| rand()).collect();
        let mut k16: Vec<u16> = k32.iter().map(|&x| bf16_bits(x)).collect();
        let mut v16: Vec<u16> = v32.iter().map(|&x| bf16_bits(x)).collect();
        let valid: Vec<u8> = (0..rows * (slot + 1)).map(|i| (i % 7 != 3) as u8).collect();
        let table: Vec<u32> = (0..rows * cap)
            .map(|i| ((i / cap + i % 3) % rows) as u32)
            .collect();
        let mut isas = vec![Simd::Base];
        isas.extend([Simd::Avx2, Simd::Avx512].into_iter().filter(|&s| match s {
            Simd::Avx512 => Simd::detect() == Simd::Avx512,
            _ => Simd::detect() != Simd::Base,
        }));
        for bf16 in [false, true] {
            for slot_rows in [None, Some(&table[..])] {
                let (k, v) = if bf16 {
                    (
                        k16.as_mut_ptr() as *mut std::ffi::c_void,
                        v16.as_mut_ptr() as *mut std::ffi::c_void,
                    )
                } else {
                    (
                        k32.as_mut_ptr() as *mut std::ffi::c_void,
                        v32.as_mut_ptr() as *mut std::ffi::c_void,
                    )
                };
                let cache = CacheView {
                    k,
                    v,
                    slot_rows,
                    bf16,
                    nh,
                    cap,
                    hs,
                };
                let outs: Vec<Vec<f32>> = isas
                    .iter()
                    .map(|&simd| {
                        let mut out = vec![f32::NAN; rows * e];
                        let job = Attend {
                            cache: &cache,
                            qkv: &qkv,
                            out: SyncPtr(out.as_mut_ptr()),
                            valid: Some(&valid),
                            slot,
                            scale: 0.125,
                            round_p: bf16,
                            bf16,
                            simd,
                        };
                        for t in 0..rows * nh {
                            job.run(t);
                        }
                        out
                    })
                    .collect();
                for (isa, out) in isas.iter().zip(&outs) {
                    assert!(out.iter().all(|x| x.is_finite()), "{isa:?}");
                    let same = out
                        .iter()
                        .zip(&outs[0])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} differs from the portable code (bf16 {bf16})");
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_libtorch() {
        let xs: Vec<f32> = (0..10_000)
            .map(|i| ((i as f32) * 0.7371).sin() * 10f32.powi(i % 7 - 3))
            .collect();
        let want = Vec::<f32>::try_from(
            Tensor::from_slice(&xs)
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float),
        )
        .unwrap();
        for (x, w) in xs.iter().zip(&want) {
            assert_eq!(round_bf16(*x), *w, "{x}");
        }
    }
}
