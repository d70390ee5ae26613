//! Fused CPU decode steps: the model's blocks (`Block::forward`, the same code as the
//! libtorch path) run by `Slices`, a backend of f32 slices whose ops are `decode`'s,
//! with no libtorch op between the matrix products. Its arithmetic and rounding are
//! described in `decode`.
//!
//! Used for decode steps (one new token per row, each row at its own slot of its own
//! cache row; up to `kernels::STEP_MAX_ROWS` rows a call, larger steps in chunks) of a
//! one-device CPU model whose every linear runs on a decode kernel; anything else (and
//! `EngineOptions::fused_decode` off) takes the libtorch path.
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use tch::{Kind, Tensor};

use super::backend::Backend;
use super::lora::Served;
use super::{Attention, Gpt2, LayerNorm, Linear, Named, Part, Site};
use crate::cache::{KvCache, Span};
use crate::config::Activation;
use crate::decode::{activate, add_residual, kernel, Simd, StepCache};
use crate::kernels::{self, ThreadPool};

/// What a model needs for fused decode steps, made once when it is packed for the
/// decode kernels (`Gpt2::set_fused_decode`).
pub(crate) struct Plan {
    bf16: bool,
    pool: Arc<ThreadPool>,
    simd: Simd,
}

/// Whether `model`'s blocks can run fused: unsplit, every linear on a decode kernel,
/// every layer norm with its f32 copy.
fn runnable(model: &Gpt2) -> bool {
    let unsplit = model.h.iter().all(|b| {
        b.attn.shards.len() == 1
            && b.mlp.shards.len() == 1
            && b.attn.c_proj_bias.is_none()
            && b.mlp.c_proj_bias.is_none()
    });
    let ready = |(_, _, part): Named<&LayerNorm, &Linear>| match part {
        Part::Norm(n) => n.host.is_some(),
        Part::Linear(l) => kernel(l).is_some(),
    };
    unsplit && model.ln_f.host.is_some() && model.parts().all(ready)
}

impl Plan {
    /// The plan for a one-device CPU model whose layer norms have their f32 copies, or
    /// `None` when its steps cannot run fused (a dtype other than f32/bf16, a linear
    /// without a decode kernel, a tensor-parallel split, heads over 256 wide, no blocks).
    pub(crate) fn new(model: &Gpt2) -> Option<Self> {
        let bf16 = match model.kind {
            Kind::Float => false,
            Kind::BFloat16 => true,
            _ => return None,
        };
        let e = model.config.n_embd as usize;
        // Attention keeps a head's accumulators on the stack: up to 256 values.
        if e / (model.config.n_head as usize).max(1) > 256 || !runnable(model) {
            return None;
        }
        let pool = kernel(&model.h.first()?.attn.shards[0].c_attn)?
            .pool()
            .clone();
        Some(Self {
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
        model: &Gpt2,
        x: &Tensor,
        cache: &KvCache,
        span: &Span,
    ) -> Option<Tensor> {
        let (b, t, e) = x.size3().ok()?;
        let (rows, e) = (b as usize, e as usize);
        if t != 1 || rows > kernels::STEP_MAX_ROWS || rows == 0 || x.requires_grad() {
            return None;
        }
        if span.t != 1 || span.rows.len() != rows || !runnable(model) {
            return None;
        }
        let n_head = model.config.n_head as usize;
        let (bf16, simd) = (self.bf16, self.simd);
        let attention = StepCache::new(cache, span, n_head, e, bf16, simd, &self.pool)?;
        let h = Vec::<f32>::try_from(x.to_kind(Kind::Float).reshape([-1])).ok()?;
        // The most live at once: the hidden rows, a norm's output, q|k|v and attention's.
        let widest = rows * (3 * e).max(model.config.inner_dim() as usize);
        let spare = RefCell::new((0..4).map(|_| vec![0f32; widest]).collect());
        let adapters = match model.adapters.is_empty() {
            true => Vec::new(),
            false => span.rows.iter().map(|&r| cache.adapter(r)).collect(),
        };
        let slices = Slices {
            rows,
            bf16,
            attention,
            spare: &spare,
            served: &model.adapters,
            adapters,
        };
        let h = Buf {
            len: h.len(),
            data: h,
            spare: &spare,
        };
        let out = match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` saw avx512f on this CPU.
            Simd::Avx512 => unsafe { trunk_avx512(model, &slices, h) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` saw avx2 and fma on this CPU.
            Simd::Avx2 => unsafe { trunk_avx2(model, &slices, h) },
            _ => model.trunk(&slices, h),
        };
        let out = Tensor::from_slice(&out).view([b, 1, e as i64]);
        Some(if bf16 {
            out.to_kind(Kind::BFloat16)
        } else {
            out
        })
    }
}

/// `Gpt2::trunk` on slices compiled for AVX-512.
///
/// # Safety
/// The CPU has avx512f.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn trunk_avx512<'a>(model: &Gpt2, b: &Slices<'a>, h: Buf<'a>) -> Buf<'a> {
    model.trunk(b, h)
}

/// `Gpt2::trunk` on slices compiled for AVX2 and FMA (Rust never contracts a·b + c into
/// an FMA on its own, so every path computes the same values).
///
/// # Safety
/// The CPU has avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn trunk_avx2<'a>(model: &Gpt2, b: &Slices<'a>, h: Buf<'a>) -> Buf<'a> {
    model.trunk(b, h)
}

/// The fused step's backend: activations are f32 rows (rows × features) in buffers
/// drawn from the step's spares, the linears run on their decode kernels, attention on
/// `decode`'s. Every op is inlined (into the entry points above, for their ISA).
struct Slices<'a> {
    rows: usize,
    bf16: bool,
    attention: StepCache<'a>,
    spare: &'a RefCell<Vec<Vec<f32>>>,
    /// The model's adapters, and per row the one it runs with (empty when none does).
    served: &'a [Served],
    adapters: Vec<Option<usize>>,
}

impl<'a> Slices<'a> {
    /// A buffer of `len` values (their contents unspecified: every op writes all of its
    /// output), a spare one when there is one.
    #[inline(always)]
    fn take(&self, len: usize) -> Buf<'a> {
        let mut data = self.spare.borrow_mut().pop().unwrap_or_default();
        if data.len() < len {
            data.resize(len, 0.0);
        }
        Buf {
            data,
            len,
            spare: self.spare,
        }
    }
}

/// Rows of f32 values, back among the step's spares when dropped.
struct Buf<'a> {
    data: Vec<f32>,
    len: usize,
    spare: &'a RefCell<Vec<Vec<f32>>>,
}

impl Deref for Buf<'_> {
    type Target = [f32];
    #[inline(always)]
    fn deref(&self) -> &[f32] {
        &self.data[..self.len]
    }
}

impl DerefMut for Buf<'_> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.len]
    }
}

impl Drop for Buf<'_> {
    fn drop(&mut self) {
        self.spare.borrow_mut().push(std::mem::take(&mut self.data));
    }
}

// `runnable` checked, before the step, every `expect` below.
impl<'a> Backend for Slices<'a> {
    type X = Buf<'a>;

    #[inline(always)]
    fn layer_norm(&self, ln: &LayerNorm, x: &Buf<'a>) -> Buf<'a> {
        let mut out = self.take(x.len());
        let norm = ln.host.as_ref().expect("the f32 copy checked by the step");
        norm.forward(x, &mut out, self.bf16);
        out
    }

    /// Unrounded: `attend` rounds q, k and v, `residual` a projection, and `c_fc`'s
    /// output goes into the activation as it is.
    #[inline(always)]
    fn linear(&self, site: Site, w: &Linear, x: &Buf<'a>) -> Buf<'a> {
        let k = kernel(w).expect("a decode kernel checked by the step");
        let n_out = k.out_features();
        let mut out = self.take(self.rows * n_out);
        k.forward(x, self.rows, &mut out);
        let n_in = x.len() / self.rows;
        for (i, a) in self.adapters.iter().enumerate() {
            if let Some(a) = a {
                let x = &x[i * n_in..(i + 1) * n_in];
                site.add_row(&self.served[*a], x, &mut out[i * n_out..(i + 1) * n_out]);
            }
        }
        out
    }

    #[inline(always)]
    fn attend(&self, attn: &Attention, layer: usize, _shard: usize, mut qkv: Buf<'a>) -> Buf<'a> {
        let mut out = self.take(qkv.len() / 3);
        let scale = attn.scale as f32;
        self.attention
            .attend(layer, &mut qkv, &mut out, scale, attn.upcast);
        out
    }

    #[inline(always)]
    fn activate(&self, act: Activation, mut x: Buf<'a>) -> Buf<'a> {
        activate(act, &mut x, self.bf16);
        x
    }

    #[inline(always)]
    fn residual(&self, mut x: Buf<'a>, y: Buf<'a>) -> Buf<'a> {
        add_residual(&mut x, &y, self.bf16);
        x
    }

    /// One shard, its bias inside: `runnable` refuses split models.
    #[inline(always)]
    fn shard_sum<F>(&self, n: usize, x: &Buf<'a>, bias: Option<&Tensor>, f: F) -> Buf<'a>
    where
        F: Fn(usize, &Buf<'a>) -> Buf<'a>,
    {
        debug_assert!(n == 1 && bias.is_none(), "checked by the step");
        f(0, x)
    }
}
