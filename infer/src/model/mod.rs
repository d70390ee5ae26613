//! GPT-2 (Radford et al. 2019) as transformers' `GPT2LMHeadModel` computes it. Field
//! names are the checkpoint's (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, `mlp.c_fc`,
//! `ln_f`), so a reader holding a Hugging Face checkpoint can follow every tensor.
//!
//! The block is written once (`Block::forward`), against a `backend::Backend`: libtorch
//! tensors (`backend::Tensors`: any device, tensor-parallel shards, training) or the
//! fused CPU decode step's f32 slices (`fused`). Loading (tensor names, size checks, the
//! tensor-parallel split) is in `load`; which paths a model runs (decode kernels, fused
//! steps, calibration observers) in `paths`.
use tch::{Device, Kind, Tensor};

use crate::attention::Pass;
use crate::cache::{KvCache, Span};
use crate::config::{Activation, Gpt2Config};
use crate::decode::Norm;

pub use crate::check::{check_model_dir, check_sizes, stored_kind};
pub use crate::linear::Linear;
pub use adapted::{Adapters, LoraLayer};
pub(crate) use graphed::FixedStep;

mod adapted;
mod backend;
mod fused;
mod graphed;
mod lora;
mod paths;
mod stored;
use crate::parallel::Communicator;
use crate::quant::{QuantRows, QuantizationConfig};
use backend::{Backend, Tensors};
use fused::Plan;

pub struct LayerNorm {
    pub weight: Tensor, // (E,)
    pub bias: Tensor,   // (E,)
    pub(crate) eps: f64,
    /// The parameters as f32, for fused decode steps (made by `set_fused_decode`).
    pub(crate) host: Option<Norm>,
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
    /// The LM head (V, E) as a linear: `lm_head.weight`, or `wte` itself when tied
    /// (`Linear::Rows`); an int8 artifact's head on its int8 kernels.
    pub head: Linear,
    /// int8 artifacts with int8 embeddings: `wte` as int8 rows (then `wte` is empty).
    pub(crate) wte_q: Option<QuantRows>,
    /// A GGUF file's quantized `token_embd`, read in place: looked-up rows are
    /// dequantized (then `wte` is empty).
    pub(crate) wte_blocks: Option<Box<crate::gguf::matmul::BlockLinear>>,
    /// The artifact's `quantization_config`, if any.
    pub(crate) quantization: Option<QuantizationConfig>,
    pub(crate) kind: Kind,
    /// One per tensor-parallel shard; the first holds everything that is not sharded.
    pub(crate) devices: Vec<Device>,
    pub(crate) comm: std::sync::Arc<dyn Communicator>,
    /// Fused CPU decode steps (`fused`), made with the packed copies.
    pub(crate) fused: Option<Plan>,
    /// The weight files the model's tensors may be views of (`mapped`): their SIGBUS
    /// guards live as long as the model, and `check_files` asks them what changed.
    pub(crate) files: Vec<std::sync::Arc<crate::mapped::MappedFile>>,
    /// A packed file was wanted and left unwritten (`EngineOptions::packed_write_later`).
    pub(crate) packed_wanted: bool,
    /// LoRA adapters held beside the base weights (`lora`), and the one a new cache's
    /// rows run with.
    pub(crate) adapters: Vec<lora::Served>,
    pub(crate) default_adapter: Option<usize>,
    /// Decode steps take the fixed-shape step (`graphed`), captured as CUDA graphs on
    /// CUDA (`set_cuda_graphs`).
    pub(crate) fixed_decode: bool,
}

/// A block's linear layer by place: block `layer`, and which of its four
/// (`adapter::MODULES`: `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Site {
    pub(crate) layer: usize,
    pub(crate) module: usize,
}

impl Site {
    pub(crate) fn index(self) -> usize {
        self.layer * crate::adapter::MODULES.len() + self.module
    }
}

/// One of a block's layers, as `parts!` hands them out (shared or mutable).
pub(crate) enum Part<N, L> {
    Norm(N),
    Linear(L),
}

impl<N, L> Part<N, L> {
    pub(crate) fn linear(self) -> Option<L> {
        match self {
            Part::Linear(x) => Some(x),
            Part::Norm(_) => None,
        }
    }
}

/// A block's layers with their names under the block, in the checkpoint's order, each
/// tensor-parallel shard's linears in turn: `ln_1`, (`attn.c_attn`, `attn.c_proj`) per
/// shard, `ln_2`, (`mlp.c_fc`, `mlp.c_proj`) per shard. `$r` is `&` or `&mut`: the one
/// walk over a block's layers, spelled once for both.
macro_rules! parts {
    ($block:expr, $($r:tt)+) => {{
        let b = $block;
        let mut out = Vec::with_capacity(2 + 2 * (b.attn.shards.len() + b.mlp.shards.len()));
        out.push(("ln_1", Part::Norm($($r)+ b.ln_1)));
        for s in $($r)+ b.attn.shards {
            out.push(("attn.c_attn", Part::Linear($($r)+ s.c_attn)));
            out.push(("attn.c_proj", Part::Linear($($r)+ s.c_proj)));
        }
        out.push(("ln_2", Part::Norm($($r)+ b.ln_2)));
        for s in $($r)+ b.mlp.shards {
            out.push(("mlp.c_fc", Part::Linear($($r)+ s.c_fc)));
            out.push(("mlp.c_proj", Part::Linear($($r)+ s.c_proj)));
        }
        out
    }};
}

/// A layer of block `.0`, named under the block (`.1`).
pub(crate) type Named<N, L> = (usize, &'static str, Part<N, L>);

impl Gpt2 {
    /// Every block's layers, block by block, as `parts!` walks them.
    pub(crate) fn parts(&self) -> impl Iterator<Item = Named<&LayerNorm, &Linear>> {
        self.h.iter().enumerate().flat_map(|(l, b)| {
            let named = parts!(b, &).into_iter();
            named.map(move |(n, p)| (l, n, p))
        })
    }

    /// `parts`, mutable.
    pub(crate) fn parts_mut(&mut self) -> impl Iterator<Item = Named<&mut LayerNorm, &mut Linear>> {
        self.h.iter_mut().enumerate().flat_map(|(l, b)| {
            let named = parts!(b, &mut).into_iter();
            named.map(move |(n, p)| (l, n, p))
        })
    }

    /// Every linear layer of every block and shard, with its layer index and name.
    pub(crate) fn linears(&self) -> impl Iterator<Item = (usize, &'static str, &Linear)> {
        self.parts()
            .filter_map(|(l, n, p)| Some((l, n, p.linear()?)))
    }

    /// `linears`, mutable.
    pub(crate) fn linears_mut(
        &mut self,
    ) -> impl Iterator<Item = (usize, &'static str, &mut Linear)> {
        self.parts_mut()
            .filter_map(|(l, n, p)| Some((l, n, p.linear()?)))
    }
}

impl Block {
    /// x (R, T, E) → (R, T, E): x + attn(ln_1(x)), then x + mlp(ln_2(x)), as `b` runs
    /// each op; `layer` is this block's index (its KV cache).
    #[inline(always)]
    fn forward<B: Backend>(&self, b: &B, layer: usize, x: B::X) -> B::X {
        let a = self.attn.forward(b, layer, &b.layer_norm(&self.ln_1, &x));
        let x = b.residual(x, a);
        let m = self.mlp.forward(b, layer, &b.layer_norm(&self.ln_2, &x));
        b.residual(x, m)
    }
}

impl Attention {
    /// x (R, T, E) → (R, T, E). Each shard: its heads' q, k and v (`c_attn`), attention
    /// over the cache (the new keys and values written into it first), its `c_proj`;
    /// the shards' outputs summed, then the bias kept out of them.
    #[inline(always)]
    fn forward<B: Backend>(&self, b: &B, layer: usize, x: &B::X) -> B::X {
        let bias = self.c_proj_bias.as_ref();
        b.shard_sum(
            self.shards.len(),
            x,
            bias,
            #[inline(always)]
            |r, x| {
                let shard = &self.shards[r];
                let site = |module| Site { layer, module };
                let qkv = b.linear(site(0), &shard.c_attn, x); // (R, T, 3·nh·hs)
                let y = b.attend(self, layer, r, qkv); // (R, T, nh·hs)
                b.linear(site(1), &shard.c_proj, &y) // (R, T, E), partial when sharded
            },
        )
    }
}

impl Mlp {
    /// x (R, T, E) → (R, T, E); each shard's slice of the inner dimension, summed.
    #[inline(always)]
    fn forward<B: Backend>(&self, b: &B, layer: usize, x: &B::X) -> B::X {
        let bias = self.c_proj_bias.as_ref();
        b.shard_sum(
            self.shards.len(),
            x,
            bias,
            #[inline(always)]
            |r, x| {
                let shard = &self.shards[r];
                let site = |module| Site { layer, module };
                let h = b.linear(site(2), &shard.c_fc, x); // (R, T, inner/N)
                b.linear(site(3), &shard.c_proj, &b.activate(self.act, h)) // (R, T, E)
            },
        )
    }
}

impl Gpt2 {
    /// Token embeddings of `ids` (…) → (…, E).
    fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        if let Some(w) = &self.wte_blocks {
            let flat = Vec::<i64>::try_from(ids.reshape([-1])).expect("int64 token ids");
            let rows = w.rows(&flat).expect("token ids below the vocabulary size");
            let mut shape = ids.size();
            shape.push(w.in_features() as i64);
            return Tensor::from_slice(&rows).reshape(shape).to_kind(self.kind);
        }
        match &self.wte_q {
            Some(w) => {
                let flat = ids.reshape([-1]);
                let rows = w.q.index_select(0, &flat).to_kind(Kind::Float)
                    * w.scale.index_select(0, &flat).unsqueeze(1); // (N, E)
                let mut shape = ids.size();
                shape.push(w.q.size()[1]);
                rows.to_kind(self.kind).reshape(shape)
            }
            // `wte` may be kept in the file's dtype (`load`): rows convert as looked up.
            None => Tensor::embedding(&self.wte, ids, -1, false, false).to_kind(self.kind),
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
        // Heads per shard from the blocks: a model split across processes holds fewer
        // heads than config.n_head / its devices.
        let heads = self
            .h
            .first()
            .map_or(self.config.n_head, |b| b.attn.shards[0].n_head);
        let mut cache = KvCache::with_heads(
            &self.config,
            heads,
            batch,
            capacity,
            self.kind,
            &self.devices,
        );
        cache.set_adapter_default(self.default_adapter);
        cache
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
        if let Some(h) = self.fixed_step(ids, cache, span) {
            return h;
        }
        let pos = cache.positions(span); // (R, T)
        let embed = |w: &Tensor, i: &Tensor| Tensor::embedding(w, i, -1, false, false);
        let x = self.embed_tokens(ids) + embed(&self.wpe, &pos); // (R, T, E)
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
            fixed: None,
        };
        let hidden = self.trunk(&Tensors::new(self, Some(&pass)), x);
        cache.advance(span);
        hidden
    }

    /// Logits (B, T, V) of whole causal sequences `ids` (B, T) at positions 0..T, with no
    /// cache: the training forward. Autograd flows to every tensor that requires grad.
    pub fn forward_train(&self, ids: &Tensor) -> Tensor {
        let (_, t) = ids.size2().expect("ids are (B, T)");
        let pos = Tensor::arange(t, (Kind::Int64, ids.device())).unsqueeze(0);
        let embed = |w: &Tensor, i: &Tensor| Tensor::embedding(w, i, -1, false, false);
        let x = self.embed_tokens(ids) + embed(&self.wpe, &pos); // (B, T, E)
        self.logits(&self.trunk(&Tensors::new(self, None), x))
    }

    /// Every block over the embedded input x (R, T, E), then `ln_f`: the hidden states
    /// (R, T, E) the head reads. The layers loop, for every backend.
    #[inline(always)]
    fn trunk<B: Backend>(&self, b: &B, mut x: B::X) -> B::X {
        for (layer, block) in self.h.iter().enumerate() {
            x = block.forward(b, layer, x);
        }
        b.layer_norm(&self.ln_f, &x)
    }

    /// Logits of hidden states (…, E) → (…, V).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        if let Some(l) = self.vocab_parallel_logits(hidden) {
            return l;
        }
        self.comm.agree(self.head.forward(hidden))
    }

    /// A model split across processes with a float head: each rank computes its slice
    /// of the vocabulary (the last one padded to the others' length), and the gathered
    /// slices are the whole logits, the same on every rank.
    fn vocab_parallel_logits(&self, hidden: &Tensor) -> Option<Tensor> {
        let (rank, world) = self.comm.vocab_shard()?;
        let v = self.config.vocab_size;
        let part = (v + world as i64 - 1) / world as i64;
        let start = (rank as i64 * part).min(v);
        let len = part.min(v - start);
        let mine = self.head.rows_part(hidden, start, len)?;
        let mine = match len < part {
            true => mine.constant_pad_nd([0, part - len]),
            false => mine,
        };
        let slices = self.comm.all_gather(mine); // (world, ..., part)
        let parts: Vec<Tensor> = (0..world as i64).map(|r| slices.get(r)).collect();
        Some(Tensor::cat(&parts, -1).narrow(-1, 0, v))
    }

    /// `lm_head.weight` (V, E) when the model has its own head (not tied to `wte`, not
    /// int8).
    pub fn lm_head(&self) -> Option<&Tensor> {
        match &self.head {
            Linear::Rows { weight, .. } if !self.config.tie_word_embeddings => Some(weight),
            _ => None,
        }
    }

    /// Logits for every position of `ids` (B, T): (B, T, V).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Tensor {
        self.logits(&self.forward_hidden(ids, cache))
    }
}
