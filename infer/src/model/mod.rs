//! GPT-2 (Radford et al. 2019) as transformers' `GPT2LMHeadModel` computes it. Field
//! names are the checkpoint's (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, `mlp.c_fc`,
//! `ln_f`), so a reader holding a Hugging Face checkpoint can follow every tensor.
//! Loading (tensor names, size checks, the tensor-parallel split) is in `load`; which
//! paths a model runs (decode kernels, fused steps, calibration observers) in `paths`.
use tch::{Device, Kind, Tensor};

use crate::attention::{sdpa, Pass};
use crate::cache::{KvCache, Span};
use crate::config::{Activation, Gpt2Config};
use crate::decode::{Layers, Plan};

pub use crate::check::{check_model_dir, check_sizes, stored_kind};
use crate::kernels::PackedLinear;
pub use crate::linear::Linear;
use crate::linear::{kernel_max_rows, packed_forward};

mod paths;
use crate::parallel::{per_shard, Communicator};
use crate::quant::{QuantRows, QuantizationConfig};

pub struct LayerNorm {
    pub weight: Tensor, // (E,)
    pub bias: Tensor,   // (E,)
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = *x.size().last().expect("input has a feature dimension");
        x.layer_norm([n], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// One tensor-parallel shard of the attention: its heads' slice of `c_attn` and the
/// matching input rows of `c_proj` (the whole layer when there is one shard).
pub struct AttentionShard {
    pub c_attn: Linear, // (E, 3·nh·hs): this shard's q, k and v columns
    pub c_proj: Linear, // (nh·hs, E)
    /// Heads of this shard.
    pub(crate) n_head: i64,
}

pub struct Attention {
    pub shards: Vec<AttentionShard>,
    /// `c_proj`'s bias, added after the shards' sum (None when unsharded: it is in c_proj).
    pub c_proj_bias: Option<Tensor>, // (E,)
    /// Multiplier of q·kᵀ: 1/√hs (scale_attn_weights), / (layer + 1) (by inverse layer).
    pub(crate) scale: f64,
    pub(crate) upcast: bool,
}

/// One tensor-parallel shard of the MLP: columns of `c_fc`, the matching rows of `c_proj`.
pub struct MlpShard {
    pub c_fc: Linear,   // (E, inner/N)
    pub c_proj: Linear, // (inner/N, E)
}

pub struct Mlp {
    pub shards: Vec<MlpShard>,
    /// `c_proj`'s bias, added after the shards' sum (None when unsharded).
    pub c_proj_bias: Option<Tensor>, // (E,)
    pub(crate) act: Activation,
}

pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

pub struct Gpt2 {
    pub config: Gpt2Config,
    pub wte: Tensor, // (V, E)
    pub wpe: Tensor, // (P, E)
    pub h: Vec<Block>,
    pub ln_f: LayerNorm,
    /// `None` when tied to `wte`.
    pub lm_head: Option<Tensor>, // (V, E)
    /// int8-dynamic artifacts with int8 embeddings: `wte` as int8 rows (then `wte` is
    /// empty) and the head on the int8 GEMM (`lm_head` is then `None`).
    pub(crate) wte_q: Option<QuantRows>,
    pub(crate) head_q: Option<Linear>,
    /// The artifact's `quantization_config`, if any.
    pub(crate) quantization: Option<QuantizationConfig>,
    pub(crate) kind: Kind,
    /// One per tensor-parallel shard; the first holds everything that is not sharded.
    pub(crate) devices: Vec<Device>,
    /// The head (`lm_head`, or `wte`ᵀ when tied) packed for the CPU decode kernels.
    pub(crate) head_packed: Option<PackedLinear>,
    pub(crate) comm: Box<dyn Communicator>,
    /// Fused CPU decode steps (`decode`), made with the packed copies.
    pub(crate) fused: Option<Plan>,
}

impl Block {
    /// The block's linear layers, each tensor-parallel shard's, with their names under
    /// the block (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`), shard by shard:
    /// the one walk over a block's layers.
    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = Vec::new();
        for s in &mut self.attn.shards {
            out.push(("attn.c_attn", &mut s.c_attn));
            out.push(("attn.c_proj", &mut s.c_proj));
        }
        for s in &mut self.mlp.shards {
            out.push(("mlp.c_fc", &mut s.c_fc));
            out.push(("mlp.c_proj", &mut s.c_proj));
        }
        out
    }

    /// `linears_mut`, shared.
    fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut out = Vec::new();
        for s in &self.attn.shards {
            out.push(("attn.c_attn", &s.c_attn));
            out.push(("attn.c_proj", &s.c_proj));
        }
        for s in &self.mlp.shards {
            out.push(("mlp.c_fc", &s.c_fc));
            out.push(("mlp.c_proj", &s.c_proj));
        }
        out
    }
}

impl Gpt2 {
    /// Every linear layer of every block and shard, with its layer index and name under
    /// the block.
    pub(crate) fn linears(&self) -> impl Iterator<Item = (usize, &'static str, &Linear)> {
        self.h
            .iter()
            .enumerate()
            .flat_map(|(l, b)| b.linears().into_iter().map(move |(n, x)| (l, n, x)))
    }

    /// `linears`, mutable.
    pub(crate) fn linears_mut(
        &mut self,
    ) -> impl Iterator<Item = (usize, &'static str, &mut Linear)> {
        self.h
            .iter_mut()
            .enumerate()
            .flat_map(|(l, b)| b.linears_mut().into_iter().map(move |(n, x)| (l, n, x)))
    }
}

/// An unsplit model's linears, for fused decode steps.
impl Layers for Vec<Block> {
    fn linears(&self, layer: usize) -> [&Linear; 4] {
        let (a, m) = (&self[layer].attn.shards[0], &self[layer].mlp.shards[0]);
        [&a.c_attn, &a.c_proj, &m.c_fc, &m.c_proj]
    }
}

/// Adds a bias that was kept out of the shards.
fn add_bias(y: Tensor, bias: &Option<Tensor>) -> Tensor {
    match bias {
        Some(b) => y + b,
        None => y,
    }
}

fn act(a: Activation, x: &Tensor) -> Tensor {
    match a {
        Activation::GeluTanh => x.gelu("tanh"),
        Activation::Gelu => x.gelu("none"),
        Activation::QuickGelu => x * (x * 1.702).sigmoid(),
        Activation::Relu => x.relu(),
        Activation::Relu6 => x.clamp(0.0, 6.0),
        Activation::Silu => x.silu(),
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => x.sigmoid(),
        Activation::Mish => x.mish(),
        Activation::LeakyRelu => x.leaky_relu(),
        Activation::Linear => x.shallow_clone(),
    }
}

impl Attention {
    /// x: (R, T, E) → (R, T, E). With a cache, the new tokens' keys and values go into
    /// the span's slots and attention runs over each row's slots up to its own; without
    /// one (training) every row is a whole causal sequence. Each shard attends with its
    /// own heads and cache; their `c_proj` outputs are summed.
    fn forward(&self, x: &Tensor, layer: usize, pass: Option<&Pass>, model: &Gpt2) -> Tensor {
        let (b, t, e) = x.size3().expect("(B, T, E)");
        let hs = e / model.config.n_head;
        let mask = pass.and_then(|p| p.mask.as_ref());
        let causal = pass.map_or(true, |p| p.causal);
        let partial = |r: usize| -> Tensor {
            let shard = &self.shards[r];
            let device = model.devices[r];
            let (x, mask) = (x.to_device(device), mask.map(|m| m.to_device(device)));
            let nh = shard.n_head;
            let heads = |z: Tensor| z.view([b, t, nh, hs]).transpose(1, 2); // (B, nh, T, hs)
            let qkv = shard.c_attn.forward(&x).split(nh * hs, 2); // 3 × (B, T, nh·hs)
            let [q, k, v] = <[Tensor; 3]>::try_from(qkv).expect("c_attn gives q, k, v");
            let (q, k, v) = (heads(q), heads(k), heads(v));
            let (k_all, v_all) = match pass {
                // (B, nh, S, hs)
                Some(p) => (
                    p.write_read(&p.cache.k[layer][r], &k),
                    p.write_read(&p.cache.v[layer][r], &v),
                ),
                None => (k, v),
            };
            let y = if self.upcast && q.kind() != Kind::Float {
                // reorder_and_upcast_attn: scores and softmax in fp32.
                let f = |z: &Tensor| z.to_kind(Kind::Float);
                sdpa(
                    &f(&q),
                    &f(&k_all),
                    &f(&v_all),
                    mask.as_ref(),
                    causal,
                    self.scale,
                )
                .to_kind(q.kind())
            } else {
                sdpa(&q, &k_all, &v_all, mask.as_ref(), causal, self.scale)
            }; // (B, nh, T, hs)
            let y = y.transpose(1, 2).reshape([b, t, nh * hs]); // (B, T, nh·hs)
            shard.c_proj.forward(&y) // (B, T, E), partial when sharded
        };
        let parts = per_shard(self.shards.len(), &partial);
        add_bias(
            model.comm.all_reduce(parts, model.devices[0]),
            &self.c_proj_bias,
        )
    }
}

impl Mlp {
    /// x: (B, T, E) → (B, T, E); each shard's slice of the inner dimension, summed.
    fn forward(&self, x: &Tensor, model: &Gpt2) -> Tensor {
        let partial = |r: usize| -> Tensor {
            let shard = &self.shards[r];
            let h = shard.c_fc.forward(&x.to_device(model.devices[r])); // (B, T, inner/N)
            shard.c_proj.forward(&act(self.act, &h))
        };
        let parts = per_shard(self.shards.len(), &partial);
        add_bias(
            model.comm.all_reduce(parts, model.devices[0]),
            &self.c_proj_bias,
        )
    }
}

impl Block {
    fn forward(&self, x: &Tensor, layer: usize, pass: Option<&Pass>, model: &Gpt2) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), layer, pass, model);
        &x + self.mlp.forward(&self.ln_2.forward(&x), model)
    }
}

impl Gpt2 {
    /// Token embeddings of `ids` (…) → (…, E).
    fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        match &self.wte_q {
            Some(w) => {
                let flat = ids.reshape([-1]);
                let rows = w.q.index_select(0, &flat).to_kind(Kind::Float)
                    * w.scale.index_select(0, &flat).unsqueeze(1); // (N, E)
                let mut shape = ids.size();
                shape.push(w.q.size()[1]);
                rows.to_kind(self.kind).reshape(shape)
            }
            None => Tensor::embedding(&self.wte, ids, -1, false, false),
        }
    }

    /// The device of the unsharded parts (embeddings, head, layer norms): inputs go here.
    pub fn device(&self) -> Device {
        self.devices[0]
    }

    /// One device per tensor-parallel shard.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// An empty KV cache for this model (sharded by heads with the attention).
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        KvCache::new(&self.config, batch, capacity, self.kind, &self.devices)
    }

    /// Hidden states after `ln_f` for `ids` (B, T), appended to every row of `cache`:
    /// (B, T, E).
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let (_, t) = ids.size2().expect("ids are (B, T)");
        let span = cache.span(None, t).unwrap_or_else(|e| panic!("{e}"));
        self.forward_span(ids, cache, &span)
    }

    /// Hidden states after `ln_f` for `ids` (R, T), one input row per row of `span`
    /// (made by `cache.span`), each at its own position: (R, T, E). A left-padded cache
    /// (`set_attention_mask`) runs all its rows together.
    pub fn forward_span(&self, ids: &Tensor, cache: &mut KvCache, span: &Span) -> Tensor {
        assert!(
            !cache.padded()
                || (span.uniform().is_some() && span.rows.len() as i64 == cache.batch_size()),
            "a left-padded cache runs all its rows at one length"
        );
        let pos = cache.positions(span); // (R, T)
        let embed = |w: &Tensor, i: &Tensor| Tensor::embedding(w, i, -1, false, false);
        let mut x = self.embed_tokens(ids) + embed(&self.wpe, &pos); // (R, T, E)
        if let Some(h) = self.fused_step(&x, cache, span) {
            cache.advance(span);
            return h;
        }
        cache.materialize();
        let pass = Pass {
            mask: cache.attention_mask(span),
            causal: cache.plain_causal(span),
            cache,
            span,
        };
        for (l, block) in self.h.iter().enumerate() {
            x = block.forward(&x, l, Some(&pass), self);
        }
        cache.advance(span);
        self.ln_f.forward(&x)
    }

    /// Logits (B, T, V) of whole causal sequences `ids` (B, T) at positions 0..T, with no
    /// cache: the training forward. Autograd flows to every tensor that requires grad.
    pub fn forward_train(&self, ids: &Tensor) -> Tensor {
        let (_, t) = ids.size2().expect("ids are (B, T)");
        let pos = Tensor::arange(t, (Kind::Int64, ids.device())).unsqueeze(0);
        let embed = |w: &Tensor, i: &Tensor| Tensor::embedding(w, i, -1, false, false);
        let mut x = self.embed_tokens(ids) + embed(&self.wpe, &pos);
        for (l, block) in self.h.iter().enumerate() {
            x = block.forward(&x, l, None, self);
        }
        self.logits(&self.ln_f.forward(&x))
    }

    /// Logits of hidden states (…, E) → (…, V).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        if let Some(head) = &self.head_q {
            return head.forward(hidden);
        }
        if let Some(y) = self
            .head_packed
            .as_ref()
            .and_then(|p| packed_forward(p, hidden, kernel_max_rows(p)))
        {
            return y;
        }
        hidden.matmul(&self.lm_head.as_ref().unwrap_or(&self.wte).tr())
    }

    /// Logits for every position of `ids` (B, T): (B, T, V).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Tensor {
        self.logits(&self.forward_hidden(ids, cache))
    }
}
