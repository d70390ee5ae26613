//! LoRA adapters on the libtorch path (Hu et al. 2021, as Hugging Face `peft`'s
//! `tuners/lora/layer.py` runs them on GPT-2's `Conv1D`): a targeted layer computes
//! `x·W + b + (dropout(x)·Aᵀ)·Bᵀ · alpha/r`, A (r, in) and B (out, r) stored as peft's
//! `lora_A.weight` and `lora_B.weight`, the base weight untouched (unmerged). The block
//! is `Block::forward`, run on `Adapted`, a backend that adds each adapter's term to its
//! layer's output; the per-block entry points (`train_embed`, `train_block`,
//! `train_head`) let a trainer recompute one block at a time (gradient checkpointing).
use tch::{Kind, Tensor};

use super::backend::{Backend, Tensors};
use super::{Attention, Gpt2, LayerNorm, Linear, Site};
use crate::adapter::MODULES;
use crate::config::Activation;

/// One layer's adapter: A (r, in), B (out, r), the scaling alpha/r and the dropout
/// probability on the adapter's input (training only).
pub struct LoraLayer {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraLayer {
    /// The adapter's term for input x (…, in) → (…, out).
    pub fn delta(&self, x: &Tensor, train: bool) -> Tensor {
        let x = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let a = self.a.to_kind(x.kind());
        let b = self.b.to_kind(x.kind());
        x.matmul(&a.tr()).matmul(&b.tr()) * self.scaling
    }
}

/// Adapters by the model's layer they belong to: (block, name under the block as
/// `Gpt2::linears` names them, e.g. `attn.c_attn`, adapter).
pub struct Adapters<'a> {
    by_layer: Vec<(Site, &'a LoraLayer)>,
    train: bool,
}

impl<'a> Adapters<'a> {
    /// Ties each adapter to the layer of `model` it names. Returns the first name that
    /// names no layer of a one-shard model.
    pub fn new(
        model: &Gpt2,
        layers: &[(usize, String, &'a LoraLayer)],
        train: bool,
    ) -> Result<Self, String> {
        let mut by_layer = Vec::with_capacity(layers.len());
        for (block, name, lora) in layers {
            let module = MODULES.iter().position(|m| m == name);
            let site = module
                .map(|module| Site {
                    layer: *block,
                    module,
                })
                .filter(|_| *block < model.h.len() && model.devices.len() == 1)
                .ok_or_else(|| format!("h.{block}.{name}"))?;
            by_layer.push((site, *lora));
        }
        Ok(Self { by_layer, train })
    }

    fn of(&self, site: Site) -> Option<&LoraLayer> {
        self.by_layer
            .iter()
            .find(|(s, _)| *s == site)
            .map(|(_, l)| *l)
    }
}

/// The libtorch backend with adapters added to their layers' outputs.
struct Adapted<'a> {
    inner: Tensors<'a>,
    adapters: Option<&'a Adapters<'a>>,
}

impl Backend for Adapted<'_> {
    type X = Tensor;

    fn layer_norm(&self, ln: &LayerNorm, x: &Tensor) -> Tensor {
        self.inner.layer_norm(ln, x)
    }

    fn linear(&self, site: Site, w: &Linear, x: &Tensor) -> Tensor {
        let y = self.inner.linear(site, w, x);
        match self.adapters.and_then(|a| Some((a.of(site)?, a.train))) {
            Some((lora, train)) => y + lora.delta(x, train),
            None => y,
        }
    }

    fn attend(&self, attn: &Attention, layer: usize, shard: usize, qkv: Tensor) -> Tensor {
        self.inner.attend(attn, layer, shard, qkv)
    }

    fn activate(&self, act: Activation, x: Tensor) -> Tensor {
        self.inner.activate(act, x)
    }

    fn residual(&self, x: Tensor, y: Tensor) -> Tensor {
        self.inner.residual(x, y)
    }

    fn shard_sum<F>(&self, n: usize, x: &Tensor, bias: Option<&Tensor>, f: F) -> Tensor
    where
        F: Fn(usize, &Tensor) -> Tensor,
    {
        self.inner.shard_sum(n, x, bias, f)
    }
}

impl Gpt2 {
    /// Token plus position embeddings of whole causal sequences `ids` (B, T) at
    /// positions 0..T: (B, T, E), the input of block 0.
    pub fn train_embed(&self, ids: &Tensor) -> Tensor {
        let (_, t) = ids.size2().expect("ids are (B, T)");
        let pos = Tensor::arange(t, (Kind::Int64, ids.device())).unsqueeze(0);
        self.embed_tokens(ids) + Tensor::embedding(&self.wpe, &pos, -1, false, false)
    }

    /// Block `layer` over x (B, T, E) of whole causal sequences, with `adapters` on
    /// their layers: (B, T, E).
    pub fn train_block(&self, layer: usize, x: Tensor, adapters: Option<&Adapters>) -> Tensor {
        let b = Adapted {
            inner: Tensors::new(self, None),
            adapters,
        };
        self.h[layer].forward(&b, layer, x)
    }

    /// `ln_f` and the head over the last block's output (B, T, E): logits (B, T, V).
    pub fn train_head(&self, x: &Tensor) -> Tensor {
        self.logits(&self.ln_f.forward(x))
    }

    /// Logits (B, T, V) of whole causal sequences with `adapters` on their layers: as
    /// `forward_train`, one block after another.
    pub fn forward_adapted(&self, ids: &Tensor, adapters: Option<&Adapters>) -> Tensor {
        let mut x = self.train_embed(ids);
        for layer in 0..self.h.len() {
            x = self.train_block(layer, x, adapters);
        }
        self.train_head(&x)
    }
}
