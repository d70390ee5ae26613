//! GPT-2 (Radford et al. 2019) as transformers' `GPT2LMHeadModel` computes it. Field
//! names are the checkpoint's (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, `mlp.c_fc`,
//! `ln_f`), so a reader holding a Hugging Face checkpoint can follow every tensor.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::cache::KvCache;
use crate::checkpoint::WeightFiles;
use crate::config::{Activation, Gpt2Config};
use crate::error::{Error, Result};

/// A linear layer. GPT-2 stores its projections as `Conv1D`: weight (in, out), y = x·W + b.
/// The one seam where weight formats differ (quantized variants join this enum).
pub enum Linear {
    Float { weight: Tensor, bias: Tensor },
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Linear::Float { weight, bias } => {
                let mut shape = x.size();
                let n_in = *shape.last().expect("input has a feature dimension");
                *shape.last_mut().unwrap() = weight.size()[1];
                // Conv1D's own op: addmm over the flattened rows.
                bias.addmm(&x.reshape([-1, n_in]), weight).reshape(shape)
            }
        }
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = *x.size().last().expect("input has a feature dimension");
        x.layer_norm([n], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

pub struct Attention {
    pub c_attn: Linear,
    pub c_proj: Linear,
    n_head: i64,
    /// Multiplier of q·kᵀ: 1/√hs (scale_attn_weights), / (layer + 1) (by inverse layer).
    scale: f64,
    upcast: bool,
}

pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    act: Activation,
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
    kind: Kind,
    device: Device,
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
    /// x: (B, T, E) → (B, T, E). Keys and values of the new tokens go into the cache
    /// slots `[len, len + T)`; attention runs over slots `[0, len + T)`.
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (b, t, e) = x.size3().expect("(B, T, E)");
        let hs = e / self.n_head;
        let heads = |z: Tensor| z.view([b, t, self.n_head, hs]).transpose(1, 2); // (B, nh, T, hs)
        let qkv = self.c_attn.forward(x).split(e, 2); // 3 × (B, T, E)
        let [q, k, v] = <[Tensor; 3]>::try_from(qkv).expect("c_attn gives q, k, v");
        let (q, k, v) = (heads(q), heads(k), heads(v));
        let start = cache.len();
        let s = start + t;
        cache.k[layer].narrow(2, start, t).copy_(&k);
        cache.v[layer].narrow(2, start, t).copy_(&v);
        let k_all = cache.k[layer].narrow(2, 0, s); // (B, nh, S, hs)
        let v_all = cache.v[layer].narrow(2, 0, s); // (B, nh, S, hs)
        let causal = mask.is_none() && cache.plain_causal(t);
        let y = if self.upcast && q.kind() != Kind::Float {
            // reorder_and_upcast_attn: scores and softmax in fp32.
            let f = |z: &Tensor| z.to_kind(Kind::Float);
            Tensor::scaled_dot_product_attention(
                &f(&q),
                &f(&k_all),
                &f(&v_all),
                mask,
                0.0,
                causal,
                self.scale,
                false,
            )
            .to_kind(q.kind())
        } else {
            Tensor::scaled_dot_product_attention(
                &q, &k_all, &v_all, mask, 0.0, causal, self.scale, false,
            )
        }; // (B, nh, T, hs)
        let y = y.transpose(1, 2).reshape([b, t, e]); // (B, T, E)
        self.c_proj.forward(&y)
    }
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), layer, cache, mask);
        let h = self.mlp.c_fc.forward(&self.ln_2.forward(&x));
        &x + self.mlp.c_proj.forward(&act(self.mlp.act, &h))
    }
}

/// Refuses a path that is not a folder before anything is read from it.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let what = if dir.exists() {
        "is not a folder"
    } else {
        "does not exist"
    };
    Err(Error::ModelFolder {
        path: dir.into(),
        reason: format!("{what} (expected a Hugging Face model folder with config.json)"),
    })
}

impl Gpt2 {
    /// Loads a Hugging Face model folder's `config.json` and weights, converted to
    /// `kind` (`None`: the dtype the checkpoint stores `wte` in).
    pub fn load(dir: &Path, kind: Option<Kind>, device: Device) -> Result<Self> {
        check_model_dir(dir)?;
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let files = WeightFiles::open_dir(dir)?;
        let kind = kind.unwrap_or_else(|| {
            ["wte.weight", "transformer.wte.weight"]
                .iter()
                .find_map(|n| files.stored_kind(n))
                .unwrap_or(Kind::Float)
        });
        Self::from_weights(config, &files, kind, device)
    }

    /// Builds the model from checkpoint tensors, named with or without `transformer.`.
    pub fn from_weights(
        config: Gpt2Config,
        files: &WeightFiles,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let prefix = if files.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let (e, v, p, i) = (
            config.n_embd,
            config.vocab_size,
            config.n_positions,
            config.inner_dim(),
        );
        let get = |name: &str, shape: &[i64]| {
            files.tensor(&format!("{prefix}{name}"), shape, kind, device)
        };
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: get(&format!("{name}.weight"), &[e])?,
                bias: get(&format!("{name}.bias"), &[e])?,
                eps: config.layer_norm_epsilon,
            })
        };
        let linear = |name: &str, n_in: i64, n_out: i64| -> Result<Linear> {
            Ok(Linear::Float {
                weight: get(&format!("{name}.weight"), &[n_in, n_out])?,
                bias: get(&format!("{name}.bias"), &[n_out])?,
            })
        };
        let hs = config.head_dim() as f64;
        let mut h = Vec::with_capacity(config.n_layer as usize);
        for l in 0..config.n_layer {
            let mut scale = if config.scale_attn_weights {
                1.0 / hs.sqrt()
            } else {
                1.0
            };
            if config.scale_attn_by_inverse_layer_idx {
                scale /= (l + 1) as f64;
            }
            h.push(Block {
                ln_1: ln(&format!("h.{l}.ln_1"))?,
                attn: Attention {
                    c_attn: linear(&format!("h.{l}.attn.c_attn"), e, 3 * e)?,
                    c_proj: linear(&format!("h.{l}.attn.c_proj"), e, e)?,
                    n_head: config.n_head,
                    scale,
                    upcast: config.reorder_and_upcast_attn,
                },
                ln_2: ln(&format!("h.{l}.ln_2"))?,
                mlp: Mlp {
                    c_fc: linear(&format!("h.{l}.mlp.c_fc"), e, i)?,
                    c_proj: linear(&format!("h.{l}.mlp.c_proj"), i, e)?,
                    act: config.activation(),
                },
            });
        }
        // transformers ties the head to wte whenever tie_word_embeddings is set, even
        // when the file also stores `lm_head.weight`; untied models must store it.
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(files.tensor("lm_head.weight", &[v, e], kind, device)?)
        };
        Ok(Self {
            wte: get("wte.weight", &[v, e])?,
            wpe: get("wpe.weight", &[p, e])?,
            ln_f: ln("ln_f")?,
            h,
            lm_head,
            config,
            kind,
            device,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        KvCache::new(&self.config, batch, capacity, self.kind, self.device)
    }

    /// Hidden states after `ln_f` for `ids` (B, T), appended to `cache`: (B, T, E).
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let (_, t) = ids.size2().expect("ids are (B, T)");
        assert!(
            cache.len() + t <= cache.capacity(),
            "KV cache holds {} slots, {} needed",
            cache.capacity(),
            cache.len() + t
        );
        let pos = cache.next_positions(t); // (B, T)
        let embed = |w: &Tensor, i: &Tensor| Tensor::embedding(w, i, -1, false, false);
        let mut x = embed(&self.wte, ids) + embed(&self.wpe, &pos); // (B, T, E)
        let mask = cache.attention_mask(t);
        for (l, block) in self.h.iter().enumerate() {
            x = block.forward(&x, l, cache, mask.as_ref());
        }
        cache.advance(t);
        self.ln_f.forward(&x)
    }

    /// Logits of hidden states (…, E) → (…, V).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.lm_head.as_ref().unwrap_or(&self.wte).tr())
    }

    /// Logits for every position of `ids` (B, T): (B, T, V).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Tensor {
        self.logits(&self.forward_hidden(ids, cache))
    }
}
