//! GPT-2 (Radford et al. 2019) as transformers' `GPT2LMHeadModel` computes it. Field
//! names are the checkpoint's (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, `mlp.c_fc`,
//! `ln_f`), so a reader holding a Hugging Face checkpoint can follow every tensor.
//! Loading (tensor names, size checks, the tensor-parallel split) is in `load`.
use tch::{Device, Kind, Tensor};

use crate::attention::sdpa;
use crate::cache::{KvCache, Span};
use crate::config::{Activation, Gpt2Config};
use crate::decode::{LayerParts, Layers, Plan};
use crate::error::{Error, Result};
use crate::kernels::{self, PackedLinear};
pub use crate::linear::Linear;
use crate::linear::{kernel_max_rows, packed_forward};
pub use crate::load::{check_model_dir, check_sizes, stored_kind};
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

/// What one cached forward pass attends with: the cache, the rows it feeds and where
/// (`Span`), and the mask of their queries.
struct Pass<'a> {
    cache: &'a KvCache,
    span: &'a Span,
    mask: Option<Tensor>,
    causal: bool,
}

impl Pass<'_> {
    /// Writes the new keys or values `new` (R, nh, t, hs) of shard `r` into `which`
    /// (`k` or `v`), and returns the rows' slots `[0, end)`: (R, nh, S, hs).
    fn write_read(&self, cache: &Tensor, new: &Tensor) -> Tensor {
        let span = self.span;
        let (t, s) = (span.t, span.end());
        let first = span.consecutive();
        match (first, span.uniform()) {
            (Some(first), Some(start)) => {
                let rows = cache.narrow(0, first as i64, span.rows.len() as i64);
                rows.narrow(2, start, t).copy_(new);
                rows.narrow(2, 0, s)
            }
            _ => {
                // One indexed write for every row: cache[rows[i], :, starts[i] + j, :].
                let device = cache.device();
                let (r, nh, hs) = (span.rows.len() as i64, new.size()[1], new.size()[3]);
                let rows: Vec<i64> = span.rows.iter().map(|&x| x as i64).collect();
                let rows = Tensor::from_slice(&rows).to_device(device);
                let slots = Tensor::from_slice(&span.starts)
                    .to_device(device)
                    .view([r, 1])
                    + Tensor::arange(t, (Kind::Int64, device)).view([1, t]); // (R, t)
                let row_of = rows.view([r, 1]).expand([r, t], false).reshape([-1]);
                let values = new.permute([0, 2, 1, 3]).reshape([r * t, nh, hs]); // (R·t, nh, hs)
                let mut c = cache.shallow_clone();
                let _ = c.index_put_(
                    &[Some(row_of), None, Some(slots.reshape([-1]))],
                    &values,
                    false,
                );
                match first {
                    Some(first) => cache.narrow(0, first as i64, r).narrow(2, 0, s),
                    None => cache.index_select(0, &rows).narrow(2, 0, s),
                }
            }
        }
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
    /// Repacks every linear layer and the head for the CPU decode kernels: a one-device
    /// CPU model in f32 or bf16 (f16 and GPUs stay on libtorch). The packed copies
    /// double the weights' memory.
    pub fn pack_for_cpu_decode(&mut self) -> Result<()> {
        let packable = matches!(self.kind, Kind::Float | Kind::BFloat16);
        if self.devices != [Device::Cpu] || !packable || self.head_packed.is_some() {
            return Ok(());
        }
        let take = |l: &mut Linear| {
            std::mem::replace(
                l,
                Linear::Float {
                    weight: Tensor::new(),
                    bias: None,
                },
            )
        };
        for block in &mut self.h {
            for shard in &mut block.attn.shards {
                shard.c_attn = take(&mut shard.c_attn).pack()?;
                shard.c_proj = take(&mut shard.c_proj).pack()?;
            }
            for shard in &mut block.mlp.shards {
                shard.c_fc = take(&mut shard.c_fc).pack()?;
                shard.c_proj = take(&mut shard.c_proj).pack()?;
            }
        }
        match self.head_q.take() {
            Some(h) => self.head_q = Some(h.pack()?),
            None => {
                let head = self.lm_head.as_ref().unwrap_or(&self.wte).tr(); // (E, V)
                self.head_packed = Some(PackedLinear::from_tensor(&head, None)?);
            }
        }
        self.set_fused_decode(true);
        Ok(())
    }

    /// Turns fused CPU decode steps (`decode`) on or off; returns whether they are on.
    /// They need the packed copies (`pack_for_cpu_decode`, which turns them on) on one
    /// CPU device, and no tensor-parallel split. Off, decode steps run libtorch between
    /// the kernels.
    pub fn set_fused_decode(&mut self, on: bool) -> bool {
        self.fused = None;
        let unsplit = |b: &Block| {
            b.attn.shards.len() == 1
                && b.mlp.shards.len() == 1
                && b.attn.c_proj_bias.is_none()
                && b.mlp.c_proj_bias.is_none()
        };
        if on && self.devices == [Device::Cpu] && self.h.iter().all(unsplit) {
            let parts: Vec<LayerParts> = self
                .h
                .iter()
                .map(|b| LayerParts {
                    ln_1: [&b.ln_1.weight, &b.ln_1.bias],
                    ln_2: [&b.ln_2.weight, &b.ln_2.bias],
                    ln_eps: b.ln_1.eps,
                    scale: b.attn.scale,
                    upcast: b.attn.upcast,
                })
                .collect();
            let act = self.h.first().map_or(Activation::Linear, |b| b.mlp.act);
            let ln_f = ([&self.ln_f.weight, &self.ln_f.bias], self.ln_f.eps);
            let n_head = self.config.n_head as usize;
            self.fused = Plan::new(self.kind, n_head, &parts, &self.h, ln_f, act);
        }
        self.fused.is_some()
    }

    /// Whether decode steps run fused (`set_fused_decode`).
    pub fn fuses_decode(&self) -> bool {
        self.fused.is_some()
    }

    /// The artifact's `quantization_config` (None for a float model folder).
    pub fn quantization(&self) -> Option<&QuantizationConfig> {
        self.quantization.as_ref()
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for block in &mut self.h {
            for shard in &mut block.attn.shards {
                out.push(&mut shard.c_attn);
                out.push(&mut shard.c_proj);
            }
            for shard in &mut block.mlp.shards {
                out.push(&mut shard.c_fc);
                out.push(&mut shard.c_proj);
            }
        }
        out
    }

    /// Starts recording the per-input-channel max |x| of every linear layer's inputs
    /// (calibration for SmoothQuant and outlier columns); read with `observed_input_max`.
    /// Decode steps then run on libtorch, through the observers (observed layers have no
    /// fused plan).
    pub fn observe_linear_inputs(&mut self) -> Result<()> {
        if self.devices.len() != 1 {
            return Err(Error::Input("calibration needs an unsharded model".into()));
        }
        for l in self.linears_mut() {
            let taken = std::mem::replace(
                l,
                Linear::Float {
                    weight: Tensor::new(),
                    bias: None,
                },
            );
            *l = taken.observed();
        }
        let fused = self.fused.is_some();
        self.set_fused_decode(fused);
        Ok(())
    }

    /// Per layer (checkpoint name without `.weight`), the max |x| of each input channel
    /// over every input seen since `observe_linear_inputs`: (in,) f32 on the CPU.
    pub fn observed_input_max(&self) -> Vec<(String, Tensor)> {
        self.named_linears()
            .into_iter()
            .filter_map(|(n, l)| l.observed_max().map(|m| (n, m)))
            .collect()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether a decode step of `rows` rows runs its matrix products on the CPU decode
    /// kernels (their own thread pool) rather than libtorch.
    pub fn decodes_on_kernels(&self, rows: usize) -> bool {
        let head = self.head_packed.is_some()
            || self.head_q.as_ref().is_some_and(|h| h.runs_on_pool(rows));
        head && rows <= kernels::MAX_ROWS && self.blocks_on_kernels(rows)
    }

    /// Whether a pass over `rows` prompt tokens (all rows of a batch together) runs the
    /// blocks' matrix products on the CPU decode kernels.
    pub fn prefills_on_kernels(&self, rows: usize) -> bool {
        self.blocks_on_kernels(rows)
    }

    fn blocks_on_kernels(&self, rows: usize) -> bool {
        self.h.iter().all(|b| {
            b.attn
                .shards
                .iter()
                .all(|s| s.c_attn.runs_on_pool(rows) && s.c_proj.runs_on_pool(rows))
                && b.mlp
                    .shards
                    .iter()
                    .all(|s| s.c_fc.runs_on_pool(rows) && s.c_proj.runs_on_pool(rows))
        })
    }

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

    /// A decode step on the fused plan, in chunks of at most `kernels::MAX_ROWS` rows (the
    /// kernels read the weights once per chunk in any case), or `None` when it cannot
    /// run fused (then nothing was written).
    fn fused_step(&self, x: &Tensor, cache: &KvCache, span: &Span) -> Option<Tensor> {
        let plan = self.fused.as_ref()?;
        if span.rows.len() <= kernels::MAX_ROWS {
            return plan.step(&self.h, x, cache, span);
        }
        let mut out = Vec::new();
        for (i, rows) in span.rows.chunks(kernels::MAX_ROWS).enumerate() {
            let at = i * kernels::MAX_ROWS;
            let part = Span {
                rows: rows.to_vec(),
                starts: span.starts[at..at + rows.len()].to_vec(),
                t: span.t,
            };
            let x = x.narrow(0, at as i64, rows.len() as i64);
            // Every chunk meets the same checks, so either the first fails or none does.
            out.push(plan.step(&self.h, &x, cache, &part)?);
        }
        Some(Tensor::cat(&out, 0))
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
