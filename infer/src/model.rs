//! GPT-2 (Radford et al. 2019) as transformers' `GPT2LMHeadModel` computes it. Field
//! names are the checkpoint's (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, `mlp.c_fc`,
//! `ln_f`), so a reader holding a Hugging Face checkpoint can follow every tensor.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::attention::sdpa;
use crate::cache::KvCache;
use crate::checkpoint::{TensorSource, WeightFiles};
use crate::config::{Activation, Gpt2Config};
use crate::decode::{LayerSettings, Plan};
use crate::error::{Error, Result};
use crate::kernels::{self, PackedLinear};
use crate::linear::{kernel_max_rows, packed_forward};
pub use crate::linear::{kernels_enabled, Linear};
use crate::parallel::{
    check_layout, per_shard, qkv_columns, slice, Communicator, CopyCommunicator,
};
use crate::quant::{self, Int8Linear, Method, QuantRows, QuantizationConfig};

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

/// One tensor-parallel shard of the attention: its heads' slice of `c_attn` and the
/// matching input rows of `c_proj` (the whole layer when there is one shard).
pub struct AttentionShard {
    pub c_attn: Linear,
    pub c_proj: Linear,
    /// Heads of this shard.
    n_head: i64,
}

pub struct Attention {
    pub shards: Vec<AttentionShard>,
    /// `c_proj`'s bias, added after the shards' sum (None when unsharded: it is in c_proj).
    pub c_proj_bias: Option<Tensor>,
    /// Multiplier of q·kᵀ: 1/√hs (scale_attn_weights), / (layer + 1) (by inverse layer).
    scale: f64,
    upcast: bool,
}

/// One tensor-parallel shard of the MLP: columns of `c_fc`, the matching rows of `c_proj`.
pub struct MlpShard {
    pub c_fc: Linear,
    pub c_proj: Linear,
}

pub struct Mlp {
    pub shards: Vec<MlpShard>,
    /// `c_proj`'s bias, added after the shards' sum (None when unsharded).
    pub c_proj_bias: Option<Tensor>,
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
    /// int8-dynamic artifacts with int8 embeddings: `wte` as int8 rows (then `wte` is
    /// empty) and the head on the int8 GEMM (`lm_head` is then `None`).
    wte_q: Option<QuantRows>,
    head_q: Option<Linear>,
    /// The artifact's `quantization_config`, if any.
    quantization: Option<QuantizationConfig>,
    kind: Kind,
    /// One per tensor-parallel shard; the first holds everything that is not sharded.
    devices: Vec<Device>,
    /// The head (`lm_head`, or `wte`ᵀ when tied) packed for the CPU decode kernels.
    head_packed: Option<PackedLinear>,
    comm: Box<dyn Communicator>,
    /// Fused CPU decode steps (`decode`), made with the packed copies.
    fused: Option<Plan>,
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
    /// x: (B, T, E) → (B, T, E). Keys and values of the new tokens go into the cache
    /// slots `[len, len + T)`; attention runs over slots `[0, len + T)`. Each shard
    /// attends with its own heads and cache; their `c_proj` outputs are summed.
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: Option<&KvCache>,
        mask: Option<&Tensor>,
        model: &Gpt2,
    ) -> Tensor {
        let (b, t, e) = x.size3().expect("(B, T, E)");
        let hs = e / model.config.n_head;
        let start = cache.map_or(0, |c| c.len());
        let s = start + t;
        // Without a cache (training) every row is a whole causal sequence.
        let causal = mask.is_none() && cache.map_or(true, |c| c.plain_causal(t));
        let partial = |r: usize| -> Tensor {
            let shard = &self.shards[r];
            let device = model.devices[r];
            let (x, mask) = (x.to_device(device), mask.map(|m| m.to_device(device)));
            let nh = shard.n_head;
            let heads = |z: Tensor| z.view([b, t, nh, hs]).transpose(1, 2); // (B, nh, T, hs)
            let qkv = shard.c_attn.forward(&x).split(nh * hs, 2); // 3 × (B, T, nh·hs)
            let [q, k, v] = <[Tensor; 3]>::try_from(qkv).expect("c_attn gives q, k, v");
            let (q, k, v) = (heads(q), heads(k), heads(v));
            let (k_all, v_all) = match cache {
                Some(cache) => {
                    let (kc, vc) = (&cache.k[layer][r], &cache.v[layer][r]); // (B, nh, capacity, hs)
                    kc.narrow(2, start, t).copy_(&k);
                    vc.narrow(2, start, t).copy_(&v);
                    (kc.narrow(2, 0, s), vc.narrow(2, 0, s)) // (B, nh, S, hs)
                }
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
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: Option<&KvCache>,
        mask: Option<&Tensor>,
        model: &Gpt2,
    ) -> Tensor {
        let x = x + self
            .attn
            .forward(&self.ln_1.forward(x), layer, cache, mask, model);
        &x + self.mlp.forward(&self.ln_2.forward(&x), model)
    }
}

/// The float kind a checkpoint stores `wte` in (f32 when unknown): `--dtype auto`.
pub fn stored_kind(files: &WeightFiles) -> Kind {
    ["wte.weight", "transformer.wte.weight"]
        .iter()
        .find_map(|n| files.stored_kind(n))
        .unwrap_or(Kind::Float)
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

/// How many names a message lists before it says "and N more".
const LIST: usize = 5;

fn listed(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST {
        s += &format!(" and {} more", names.len() - LIST);
    }
    s
}

/// The layer index of `h.N.…` (after the prefix), if the name is a block's.
fn layer_of(name: &str, prefix: &str) -> Option<i64> {
    let rest = name.strip_prefix(prefix)?.strip_prefix("h.")?;
    rest.split('.').next()?.parse().ok()
}

/// Sorts names with their layer numbers in numeric order (`h.2` before `h.10`).
fn sort_by_layer(names: &mut [String], prefix: &str) {
    names.sort_by(|a, b| (layer_of(a, prefix), a.as_str()).cmp(&(layer_of(b, prefix), b.as_str())));
}

/// Compares config.json's sizes with the shapes in the weight files' headers, before
/// any tensor is read or any layer allocated (`from_weights` runs it first; callers
/// that size work by the config before loading run it themselves). Errors name
/// config.json, the key and the tensor. Sources that cannot list their tensors
/// (in-memory ones) are not checked here; each tensor's shape is checked as it is read.
pub fn check_sizes(config: &Gpt2Config, files: &dyn TensorSource) -> Result<()> {
    let names = files.tensor_names();
    if names.is_empty() {
        return Ok(());
    }
    let prefix = if files.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let config_path = files.path_of("config.json").with_file_name("config.json");
    let weights = |name: &str| files.path_of(name);
    let bad = |reason: String| Error::Config {
        path: config_path.clone(),
        reason,
    };
    let (e, v, p, i) = (
        config.n_embd,
        config.vocab_size,
        config.n_positions,
        config.inner_dim(),
    );
    // (tensor, the shape the config implies, the key behind each axis).
    let checks: [(&str, Vec<i64>, &[&str]); 4] = [
        ("ln_f.weight", vec![e], &["n_embd"]),
        ("wte.weight", vec![v, e], &["vocab_size", "n_embd"]),
        ("wpe.weight", vec![p, e], &["n_positions", "n_embd"]),
        ("h.0.mlp.c_fc.bias", vec![i], &["n_inner"]),
    ];
    for (tensor, expected, keys) in checks {
        let name = format!("{prefix}{tensor}");
        let Some(got) = files.shape_of(&name) else {
            continue; // missing tensors are reported, by name, when read
        };
        if got == expected {
            continue;
        }
        // The first axis that differs names the key (both keys when the rank differs).
        let key = match (0..keys.len()).find(|&a| got.get(a) != Some(&expected[a])) {
            Some(a) if got.len() == expected.len() => format!("{} is {}", keys[a], expected[a]),
            _ => keys
                .iter()
                .zip(&expected)
                .map(|(k, v)| format!("{k} is {v}"))
                .collect::<Vec<_>>()
                .join(" and "),
        };
        return Err(bad(format!(
            "{key}, but tensor `{name}` has shape {got:?}, expected {expected:?} (in {})",
            weights(&name).display()
        )));
    }
    // Layers: the weights must hold h.0 .. h.{n_layer-1} and nothing past them.
    let held = names
        .iter()
        .filter_map(|n| layer_of(n, prefix))
        .max()
        .map_or(0, |l| l + 1);
    if config.n_layer > held {
        let first = format!("{prefix}h.{held}.ln_1.weight");
        return Err(bad(format!(
            "n_layer is {}, but {} holds {held} layer(s) (tensor `{first}` is missing)",
            config.n_layer,
            weights(&first).display()
        )));
    }
    let mut extra: Vec<String> = names
        .into_iter()
        .filter(|n| layer_of(n, prefix).is_some_and(|l| l >= config.n_layer))
        .filter(|n| !is_legacy_buffer(n))
        .collect();
    if !extra.is_empty() {
        sort_by_layer(&mut extra, prefix);
        return Err(Error::UnusedTensors {
            path: config_path.clone(),
            reason: format!(
                "n_layer is {}, but {} holds {held} layers: {} tensor(s) would be unused: {}",
                config.n_layer,
                weights(&extra[0]).display(),
                extra.len(),
                listed(&extra)
            ),
        });
    }
    Ok(())
}

/// GPT-2's causal-mask buffers, saved by older transformers: not weights.
fn is_legacy_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

/// Refuses weights that the model did not read (transformers warns about them; a
/// silently ignored tensor is usually a config that does not describe the file).
/// GPT-2's legacy attention buffers and a stored head of a tied model are not weights.
fn check_all_used(config: &Gpt2Config, files: &dyn TensorSource) -> Result<()> {
    let ignorable =
        |n: &str| is_legacy_buffer(n) || (config.tie_word_embeddings && n == "lm_head.weight");
    let mut unused: Vec<String> = files
        .unused()
        .into_iter()
        .filter(|n| !ignorable(n))
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    sort_by_layer(&mut unused, "");
    Err(Error::UnusedTensors {
        path: files.path_of(&unused[0]),
        reason: format!(
            "{} tensor(s) are not used by the GPT-2 that config.json describes: {}",
            unused.len(),
            listed(&unused)
        ),
    })
}

impl Gpt2 {
    /// Loads a Hugging Face model folder's `config.json` and weights, converted to
    /// `kind` (`None`: the dtype the checkpoint stores `wte` in).
    pub fn load(dir: &Path, kind: Option<Kind>, device: Device) -> Result<Self> {
        Self::load_sharded(dir, kind, &[device])
    }

    /// Loads the model split over `devices` (tensor parallelism, one shard per entry;
    /// the same device may appear several times). The layout is checked against the
    /// config before any weight is read.
    pub fn load_sharded(dir: &Path, kind: Option<Kind>, devices: &[Device]) -> Result<Self> {
        check_model_dir(dir)?;
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        check_layout(config.n_head, config.inner_dim(), devices)?;
        let files = WeightFiles::open_dir(dir)?;
        let kind = kind.unwrap_or_else(|| stored_kind(&files));
        let mut model = Self::from_weights(config, &files, kind, devices)?;
        if kernels_enabled() {
            model.pack_for_cpu_decode()?;
        }
        Ok(model)
    }

    /// Builds the model from checkpoint tensors, named with or without `transformer.`,
    /// split over `devices`. Float layers only: no kernel packing (see
    /// `pack_for_cpu_decode`), so a model built from trainable tensors stays trainable.
    pub fn from_weights(
        config: Gpt2Config,
        files: &dyn TensorSource,
        kind: Kind,
        devices: &[Device],
    ) -> Result<Self> {
        use crate::parallel::Split;
        check_layout(config.n_head, config.inner_dim(), devices)?;
        let main = devices[0];
        let n = devices.len() as i64;
        let sharded = n > 1;
        let prefix = if files.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        // Sizes against the headers first: nothing is allocated for a config.json that
        // disagrees with the weights (an n_layer of 10¹² would try to).
        check_sizes(&config, files)?;
        let (e, v, p, i) = (
            config.n_embd,
            config.vocab_size,
            config.n_positions,
            config.inner_dim(),
        );
        // Sharded tensors are read whole on the CPU, sliced, then moved.
        let staging = if sharded { Device::Cpu } else { main };
        let get = |name: &str, shape: &[i64]| {
            files.tensor(&format!("{prefix}{name}"), shape, kind, staging)
        };
        let quantization = QuantizationConfig::from_config(
            &config,
            &files.path_of("config.json").with_file_name("config.json"),
        )?;
        let method = quantization.as_ref().map_or(Method::None, |q| q.method);
        // An int8 artifact's linear layers come from `quant`, split the same way.
        let int8 = quant::Int8Layers::new(files, prefix, method, kind, devices)?;
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: get(&format!("{name}.weight"), &[e])?.to_device(main),
                bias: get(&format!("{name}.bias"), &[e])?.to_device(main),
                eps: config.layer_norm_epsilon,
            })
        };
        // One `Linear` per shard, and the bias that a row split leaves to be added once
        // after the shards' sum. Conv1D weights are (in, out).
        let linear = |name: &str,
                      n_in: i64,
                      n_out: i64,
                      split: Split|
         -> Result<(Vec<Linear>, Option<Tensor>)> {
            if let Some(int8) = &int8 {
                return int8.layer(name, [n_in, n_out], split);
            }
            let (w, b) = (
                get(&format!("{name}.weight"), &[n_in, n_out])?,
                get(&format!("{name}.bias"), &[n_out])?,
            );
            if !sharded {
                let one = Linear::Float {
                    weight: w,
                    bias: Some(b),
                };
                return Ok((vec![one], None));
            }
            let on = |t: Tensor, r: i64| t.to_device(devices[r as usize]);
            Ok(match split {
                Split::Columns(part) => {
                    let parts = (0..n).map(|r| Linear::Float {
                        weight: on(part(&w, 1, r), r),
                        bias: Some(on(part(&b, 0, r), r)),
                    });
                    (parts.collect(), None)
                }
                Split::Rows => {
                    let parts = (0..n).map(|r| Linear::Float {
                        weight: on(slice(&w, 0, r, n), r),
                        bias: None,
                    });
                    (parts.collect(), Some(b.to_device(main)))
                }
            })
        };
        let qkv = |t: &Tensor, dim: i64, r: i64| qkv_columns(t, dim, r, n);
        let even = |t: &Tensor, dim: i64, r: i64| slice(t, dim, r, n);
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
            let (attn, mlp) = (format!("h.{l}.attn"), format!("h.{l}.mlp"));
            let (c_attn, _) = linear(&format!("{attn}.c_attn"), e, 3 * e, Split::Columns(&qkv))?;
            let (attn_proj, attn_bias) = linear(&format!("{attn}.c_proj"), e, e, Split::Rows)?;
            let (c_fc, _) = linear(&format!("{mlp}.c_fc"), e, i, Split::Columns(&even))?;
            let (mlp_proj, mlp_bias) = linear(&format!("{mlp}.c_proj"), i, e, Split::Rows)?;
            let n_head = config.n_head / n;
            h.push(Block {
                ln_1: ln(&format!("h.{l}.ln_1"))?,
                attn: Attention {
                    shards: c_attn
                        .into_iter()
                        .zip(attn_proj)
                        .map(|(c_attn, c_proj)| AttentionShard {
                            c_attn,
                            c_proj,
                            n_head,
                        })
                        .collect(),
                    c_proj_bias: attn_bias,
                    scale,
                    upcast: config.reorder_and_upcast_attn,
                },
                ln_2: ln(&format!("h.{l}.ln_2"))?,
                mlp: Mlp {
                    shards: c_fc
                        .into_iter()
                        .zip(mlp_proj)
                        .map(|(c_fc, c_proj)| MlpShard { c_fc, c_proj })
                        .collect(),
                    c_proj_bias: mlp_bias,
                    act: config.activation(),
                },
            });
        }
        let int8_embeddings = quantization.as_ref().is_some_and(|q| q.quantize_embeddings);
        // Embedding rows (and the head's output channels) per row: (V, E).
        let rows = |name: &str| -> Result<Tensor> {
            Ok(if int8_embeddings {
                quant::read_int8(files, name, [v, e], true, main)?.dequantize(kind)
            } else {
                files.tensor(name, &[v, e], kind, main)?
            })
        };
        let (mut wte_q, mut head_q) = (None, None);
        let mut lm_head = None;
        // The head over int8 rows (out = V, in = E), as the method runs its linears.
        let int8_head = |w: QuantRows| match method {
            Method::Int8Dynamic => Linear::Int8(Box::new(Int8Linear::new(w, None, None))),
            _ => Linear::Int8Weight {
                w,
                bias: None,
                packed: None,
            },
        };
        let wte = if int8_embeddings {
            let w = quant::read_int8(files, &format!("{prefix}wte.weight"), [v, e], true, main)?;
            if config.tie_word_embeddings {
                head_q = Some(int8_head(QuantRows {
                    q: w.q.shallow_clone(),
                    scale: w.scale.shallow_clone(),
                }));
            }
            wte_q = Some(w);
            Tensor::new()
        } else {
            rows(&format!("{prefix}wte.weight"))?
        };
        // transformers ties the head to wte whenever tie_word_embeddings is set, even
        // when the file also stores `lm_head.weight`; untied models must store it.
        if !config.tie_word_embeddings {
            if int8_embeddings {
                let w = quant::read_int8(files, "lm_head.weight", [v, e], true, main)?;
                head_q = Some(int8_head(w));
            } else {
                lm_head = Some(rows("lm_head.weight")?);
            }
        }
        let (wpe, ln_f) = (get("wpe.weight", &[p, e])?.to_device(main), ln("ln_f")?);
        check_all_used(&config, files)?;
        Ok(Self {
            wte,
            wpe,
            ln_f,
            h,
            lm_head,
            wte_q,
            head_q,
            quantization,
            config,
            kind,
            devices: devices.to_vec(),
            head_packed: None,
            comm: Box::new(CopyCommunicator),
            fused: None,
        })
    }

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
    /// They need the packed copies (`pack_for_cpu_decode`) and are on after it, unless
    /// `GPT2KIT_FUSED_DECODE=0`. Off, decode steps run libtorch between the kernels.
    pub fn set_fused_decode(&mut self, on: bool) -> bool {
        self.fused = None;
        if on {
            let settings: Vec<LayerSettings> = self
                .h
                .iter()
                .map(|b| LayerSettings {
                    ln_eps: b.ln_1.eps,
                    scale: b.attn.scale,
                    upcast: b.attn.upcast,
                })
                .collect();
            let act = self.h.first().map_or(Activation::Linear, |b| b.mlp.act);
            let ln_f = (&self.ln_f, self.ln_f.eps);
            self.fused = Plan::new(self, &self.h, &settings, ln_f, act);
        }
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

    /// Every linear layer by checkpoint name (`h.N.attn.c_attn`, ...), unsharded models.
    fn named_linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (l, block) in self.h.iter().enumerate() {
            out.push((format!("h.{l}.attn.c_attn"), &block.attn.shards[0].c_attn));
            out.push((format!("h.{l}.attn.c_proj"), &block.attn.shards[0].c_proj));
            out.push((format!("h.{l}.mlp.c_fc"), &block.mlp.shards[0].c_fc));
            out.push((format!("h.{l}.mlp.c_proj"), &block.mlp.shards[0].c_proj));
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

    /// Replaces the all-reduce backend (the copy-based one is the default).
    pub fn set_communicator(&mut self, comm: Box<dyn Communicator>) {
        self.comm = comm;
    }

    /// An empty KV cache for this model (sharded by heads with the attention).
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        KvCache::new(&self.config, batch, capacity, self.kind, &self.devices)
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
        let mut x = self.embed_tokens(ids) + embed(&self.wpe, &pos); // (B, T, E)
        if let Some(h) = self.fused.as_ref().and_then(|p| p.step(&self.h, &x, cache)) {
            cache.advance(t);
            return h;
        }
        cache.materialize();
        let mask = cache.attention_mask(t);
        for (l, block) in self.h.iter().enumerate() {
            x = block.forward(&x, l, Some(cache), mask.as_ref(), self);
        }
        cache.advance(t);
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
            x = block.forward(&x, l, None, None, self);
        }
        self.logits(&self.ln_f.forward(&x))
    }

    /// Every tensor of an unsharded float model under its checkpoint name (no
    /// `transformer.` prefix; `lm_head.weight` only when untied). The tensors share
    /// storage with the model.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        if self.devices.len() != 1 {
            return Err(Error::Input(
                "named_tensors needs an unsharded model (--tp 1)".into(),
            ));
        }
        if self.wte_q.is_some() || self.head_q.is_some() {
            return Err(Error::Input(
                "named_tensors needs float weights; this model runs int8 tensors".into(),
            ));
        }
        let mut out = vec![
            ("wte.weight".to_string(), self.wte.shallow_clone()),
            ("wpe.weight".to_string(), self.wpe.shallow_clone()),
        ];
        let ln = |out: &mut Vec<(String, Tensor)>, name: String, ln: &LayerNorm| {
            out.push((format!("{name}.weight"), ln.weight.shallow_clone()));
            out.push((format!("{name}.bias"), ln.bias.shallow_clone()));
        };
        let lin = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| -> Result<()> {
            let (weight, bias) = l.float_parts().ok_or_else(|| {
                Error::Input(format!("named_tensors: `{name}` is int8, not float"))
            })?;
            out.push((format!("{name}.weight"), weight.shallow_clone()));
            if let Some(b) = bias {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
            Ok(())
        };
        for (l, block) in self.h.iter().enumerate() {
            ln(&mut out, format!("h.{l}.ln_1"), &block.ln_1);
            lin(
                &mut out,
                format!("h.{l}.attn.c_attn"),
                &block.attn.shards[0].c_attn,
            )?;
            lin(
                &mut out,
                format!("h.{l}.attn.c_proj"),
                &block.attn.shards[0].c_proj,
            )?;
            ln(&mut out, format!("h.{l}.ln_2"), &block.ln_2);
            lin(
                &mut out,
                format!("h.{l}.mlp.c_fc"),
                &block.mlp.shards[0].c_fc,
            )?;
            lin(
                &mut out,
                format!("h.{l}.mlp.c_proj"),
                &block.mlp.shards[0].c_proj,
            )?;
        }
        ln(&mut out, "ln_f".into(), &self.ln_f);
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), head.shallow_clone()));
        }
        Ok(out)
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
