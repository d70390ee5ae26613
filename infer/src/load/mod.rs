//! Loading a GPT-2 from a Hugging Face model folder or from named tensors: the
//! checkpoint's tensor names (with or without `transformer.`), config.json's sizes checked
//! against the weight files' headers, the tensor-parallel split (`parallel`), int8 layers
//! routed to `quant`, the head tied to `wte`; and the reverse, the model's tensors under
//! their checkpoint names.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::check::{check_all_used, check_model_dir, check_sizes, stored_kind};
use crate::checkpoint::{TensorSource, WeightFiles};
use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::model::{Attention, AttentionShard, Block, Gpt2, LayerNorm, Mlp, MlpShard, Part};
use crate::options::EngineOptions;
use crate::parallel::{
    check_layout, check_split, qkv_columns, slice, Communicator, CopyCommunicator, ProcessSplit,
    Shards, Split,
};
use crate::quant::{self, Int8Linear, Method, QuantRows, QuantizationConfig};

mod int8;
use int8::Int8Layers;

impl Gpt2Config {
    /// The config of a model: a folder's `config.json`, or a `.gguf` file's metadata
    /// (its tensors checked against it).
    pub fn of_model(path: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(path) {
            return crate::gguf::load::config(path);
        }
        Self::from_file(&path.join("config.json"))
    }
}

impl Gpt2 {
    /// Loads a Hugging Face model folder's `config.json` and weights, converted to
    /// `kind` (`None`: the dtype the checkpoint stores `wte` in), with the default
    /// `EngineOptions`.
    pub fn load(dir: &Path, kind: Option<Kind>, device: Device) -> Result<Self> {
        Self::load_with(dir, kind, &[device], &EngineOptions::default())
    }

    /// Loads the model split over `devices` (tensor parallelism, one shard per entry;
    /// the same device may appear several times), with the default `EngineOptions`.
    pub fn load_sharded(dir: &Path, kind: Option<Kind>, devices: &[Device]) -> Result<Self> {
        Self::load_with(dir, kind, devices, &EngineOptions::default())
    }

    /// Loads the model split over `devices` and readies it as `options` say (packed for
    /// the CPU decode kernels, fused decode steps). The layout is checked against the
    /// config before any weight is read.
    pub fn load_with(
        dir: &Path,
        kind: Option<Kind>,
        devices: &[Device],
        options: &EngineOptions,
    ) -> Result<Self> {
        let model = Self::load_inner(dir, kind, devices, options, None)?;
        give_back_freed_heap();
        Ok(model)
    }

    /// Loads this process's shard of a model split across the processes of `split`
    /// (`ProcessSplit`): only its part of each block is read and kept, on `device`; the
    /// embeddings, layer norms and head are whole on every process. libtorch runs it
    /// (no decode kernels, which do not split across processes).
    pub fn load_split(
        dir: &Path,
        kind: Option<Kind>,
        device: Device,
        options: &EngineOptions,
        split: &ProcessSplit,
    ) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            return Err(Error::Input(format!(
                "{}: GGUF files are not split across processes; use a model folder",
                dir.display()
            )));
        }
        // Weights mapped: each split tensor is read from the map, this shard's part
        // copied out and the whole tensor's pages given back (`TensorSource::release`),
        // so a rank holds its shard; tensors every rank uses whole (the embeddings, whose
        // head rows each rank reads only its vocabulary slice of, the norms, biases)
        // stay views of the map, their pages counting once read.
        let options = EngineOptions {
            kernels: false,
            fused_decode: false,
            ..options.clone()
        };
        let model = Self::load_inner(dir, kind, &[device], &options, Some(split))?;
        // The whole tensors read to cut this shard's part from are freed (~60 MB on the
        // 124M shape).
        give_back_freed_heap();
        Ok(model)
    }

    fn load_inner(
        dir: &Path,
        kind: Option<Kind>,
        devices: &[Device],
        options: &EngineOptions,
        split: Option<&ProcessSplit>,
    ) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            return crate::gguf::load::load(dir, kind, devices, options);
        }
        check_model_dir(dir)?;
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let shards = split.map_or(devices.len(), |s| s.world);
        check_split(config.n_head, config.inner_dim(), shards)?;
        options.apply_threads()?;
        let files = WeightFiles::open_dir(dir)?.in_place(options.map_weights);
        let kind = kind.unwrap_or_else(|| stored_kind(&files));
        // Packed for the bf16 kernels, fp32 weights convert as they are packed (no bf16
        // copy of them is ever made: the kernels serve every row count in bf16).
        let packs = options.kernels && devices == [Device::Cpu];
        let convert_late = packs && kind == Kind::BFloat16;
        // The weights that packing reads whole (the linears, the head) are checked as
        // they are packed (NaN/inf, an int8 artifact's -128), or not at all when a packed
        // file made from them is used: not scanned as they are read (`check_deferred`).
        let defer_checks = packs && split.is_none();
        let files = match defer_checks {
            true => {
                let names = packed_weight_names(&config, &files);
                files.defer_finite_check(names)
            }
            false => files,
        };
        let late = (convert_late, defer_checks, split);
        let mut model = Self::from_source(config, &files, kind, devices, late)?;
        model.files = files.maps();
        if options.kernels {
            model.pack_loaded(dir, options)?;
            model.set_fused_decode(options.fused_decode);
        }
        model.set_cuda_graphs(options.cuda_graphs);
        if defer_checks {
            model.check_deferred(&files)?;
        }
        // A file truncated or rewritten while it was read is an error here, not a model.
        files.check()?;
        Ok(model)
    }

    /// The checks of the weights that packing reads whole, which loading left to it
    /// (`packed_weight_names`): NaN/inf in a float weight, -128 in an int8 one. Packing
    /// noted them as it read each weight, panels mapped from a packed file were checked
    /// when it was written, and a weight left unpacked is scanned now.
    fn check_deferred(&self, files: &WeightFiles) -> Result<()> {
        let prefix = weight_prefix(files);
        let head = head_weight_name(&self.config, prefix);
        let linears = self
            .linears()
            .map(|(l, name, x)| (format!("{prefix}h.{l}.{name}.weight"), x));
        for (weight, x) in linears.chain([(head, &self.head)]) {
            let path = || files.path_of(&weight).to_path_buf();
            match (x.packed(), x) {
                (Some(p), _) if p.held_non_finite() => {
                    return Err(Error::NonFinite {
                        path: path(),
                        name: weight,
                    })
                }
                (Some(p), _) if p.held_int8_min() => return Err(quant::held_min(path(), &weight)),
                (Some(_), _) => {}
                // Layers with outlier columns were checked as they were read.
                (None, Linear::Int8(q)) if q.outliers.is_some() => {}
                (None, Linear::Int8(q)) => quant::check_int8_min(&q.w.q, &weight, path())?,
                (None, Linear::Int8Weight { w, .. }) => {
                    quant::check_int8_min(&w.q, &weight, path())?
                }
                (None, _) => files.check_finite_of(&weight)?,
            }
        }
        Ok(())
    }

    /// An error when a weight file the model is mapped from changed on disk since it was
    /// loaded (truncated, resized or rewritten in place): its results are then not the
    /// model's. Generation calls it when it finishes.
    pub fn check_files(&self) -> Result<()> {
        self.files.iter().try_for_each(|f| f.check())
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
        Self::from_source(config, files, kind, devices, (false, false, None))
    }

    /// As `from_weights`; `convert_late`: linear weights stored in fp32 or bf16 are read
    /// in their stored dtype (in place when the source maps them), for packing to
    /// convert them (`Linear::pack`); `defer_min_check`: int8 weights are not scanned
    /// for -128 as they are read, the caller checks them (`check_deferred`); `split`:
    /// only this process's shard is built.
    fn from_source(
        config: Gpt2Config,
        files: &dyn TensorSource,
        kind: Kind,
        devices: &[Device],
        (convert_late, defer_min_check, split): (bool, bool, Option<&ProcessSplit>),
    ) -> Result<Self> {
        check_layout(config.n_head, config.inner_dim(), devices)?;
        if let Some(s) = split {
            check_split(config.n_head, config.inner_dim(), s.world)?;
        }
        let shards = Shards::of(devices, split);
        let prefix = weight_prefix(files);
        // Sizes against the headers first: nothing is allocated for a config.json that
        // disagrees with the weights (an n_layer of 10¹² would try to).
        check_sizes(&config, files)?;
        let quantization = QuantizationConfig::from_config(
            &config,
            &files.path_of("config.json").with_file_name("config.json"),
        )?;
        let method = quantization.as_ref().map_or(Method::None, |q| q.method);
        let reader = Reader {
            config: &config,
            files,
            prefix,
            kind,
            devices,
            shards: &shards,
            convert_late,
            // An int8 artifact's linear layers come from `quant`, split the same way.
            int8: Int8Layers::new(
                files,
                prefix,
                method,
                kind,
                (devices, &shards),
                defer_min_check,
            )?,
        };
        let h = (0..config.n_layer)
            .map(|l| reader.block(l))
            .collect::<Result<Vec<_>>>()?;
        let int8_embeddings = quantization.as_ref().is_some_and(|q| q.quantize_embeddings);
        let (wte, wte_q, head) = reader.embeddings_and_head(int8_embeddings, method)?;
        let (p, e) = (config.n_positions, config.n_embd);
        // Not empty: `check_layout` above.
        let wpe = reader.get("wpe.weight", &[p, e])?.to_device(devices[0]);
        let ln_f = reader.ln("ln_f")?;
        check_all_used(&config, files)?;
        Ok(Self {
            wte,
            wpe,
            ln_f,
            h,
            head,
            wte_q,
            wte_blocks: None,
            quantization,
            config,
            kind,
            devices: devices.to_vec(),
            comm: split.map_or_else(
                || std::sync::Arc::new(CopyCommunicator) as std::sync::Arc<dyn Communicator>,
                |s| s.comm.clone(),
            ),
            fused: None,
            files: Vec::new(),
            packed_wanted: false,
            adapters: Vec::new(),
            default_adapter: None,
            fixed_decode: false,
        })
    }
}

/// `transformer.` when the checkpoint's names carry it, else empty.
fn weight_prefix(files: &dyn TensorSource) -> &'static str {
    match files.contains("transformer.wte.weight") {
        true => "transformer.",
        false => "",
    }
}

/// The checkpoint tensor the head is read from: `wte` when tied (transformers ties it
/// whenever the config says so), else `lm_head.weight`, which is never prefixed.
fn head_weight_name(config: &Gpt2Config, prefix: &str) -> String {
    match config.tie_word_embeddings {
        true => format!("{prefix}wte.weight"),
        false => "lm_head.weight".into(),
    }
}

/// The weights that packing for the CPU kernels reads whole, among those the files hold
/// (a config's n_layer is checked against them later): every block's linears and the
/// head (`wte` when tied).
fn packed_weight_names(config: &Gpt2Config, files: &dyn TensorSource) -> Vec<String> {
    let prefix = weight_prefix(files);
    let head = head_weight_name(config, prefix);
    let linear = |name: &str| {
        let Some(rest) = name.strip_prefix(prefix).and_then(|n| n.strip_prefix("h.")) else {
            return false;
        };
        let Some((layer, rest)) = rest.split_once('.') else {
            return false;
        };
        let kinds = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];
        layer.bytes().all(|b| b.is_ascii_digit())
            && kinds
                .iter()
                .any(|k| rest.strip_prefix(k) == Some(".weight"))
    };
    files
        .tensor_names()
        .into_iter()
        .filter(|n| *n == head || linear(n))
        .collect()
}

/// Returns the heap that loading freed (headers, names, conversions; ~10 MB on the 124M
/// shape) to the system: glibc keeps freed blocks in the process unless asked.
fn give_back_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `wte`, its int8 rows, and the head, as `Gpt2` holds them.
type EmbeddingsAndHead = (Tensor, Option<QuantRows>, Linear);

/// Reads one model's tensors from a source, split over its devices.
struct Reader<'a> {
    config: &'a Gpt2Config,
    files: &'a dyn TensorSource,
    /// `transformer.` or empty.
    prefix: &'a str,
    kind: Kind,
    /// Never empty (`check_layout` refuses no device): `devices[0]` is the main one, and
    /// shard `r` of `0..devices.len()` is on `devices[r]`.
    devices: &'a [Device],
    /// The shards this process builds, and how many there are in all.
    shards: &'a Shards,
    /// Linear weights in their stored float dtype (see `Gpt2::from_source`).
    convert_late: bool,
    int8: Option<Int8Layers<'a>>,
}

impl Reader<'_> {
    fn shards(&self) -> i64 {
        self.shards.n
    }

    /// Tensor `name` (no prefix) of `shape`, on the device it is split from: the CPU when
    /// sharded (read whole, sliced, then moved), else the model's device.
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let staging = if self.shards() > 1 {
            Device::Cpu
        } else {
            self.devices[0]
        };
        let name = format!("{}{name}", self.prefix);
        self.files.tensor(&name, shape, self.kind, staging)
    }

    /// A linear weight: as `get`, or in its stored float dtype (`convert_late`).
    fn weight(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        match self.late_kind(&full) {
            Some(k) => self.files.tensor(&full, shape, k, self.devices[0]),
            None => self.get(name, shape),
        }
    }

    /// The stored fp32 or bf16 dtype of `full` when it converts late (`convert_late`).
    fn late_kind(&self, full: &str) -> Option<Kind> {
        let stored = self.files.stored_float_kind(full);
        stored.filter(|k| self.convert_late && matches!(k, Kind::Float | Kind::BFloat16))
    }

    fn ln(&self, name: &str) -> Result<LayerNorm> {
        let (e, main) = (self.config.n_embd, self.devices[0]);
        Ok(LayerNorm {
            weight: self.get(&format!("{name}.weight"), &[e])?.to_device(main),
            bias: self.get(&format!("{name}.bias"), &[e])?.to_device(main),
            eps: self.config.layer_norm_epsilon,
            host: None,
        })
    }

    /// One `Linear` per shard, and the bias that a row split leaves to be added once
    /// after the shards' sum. Conv1D weights are (in, out).
    fn linear(
        &self,
        name: &str,
        n_in: i64,
        n_out: i64,
        split: Split,
    ) -> Result<(Vec<Linear>, Option<Tensor>)> {
        if let Some(int8) = &self.int8 {
            return int8.layer(name, [n_in, n_out], split);
        }
        let (w, b) = (
            self.weight(&format!("{name}.weight"), &[n_in, n_out])?,
            self.get(&format!("{name}.bias"), &[n_out])?,
        );
        let n = self.shards();
        if n == 1 {
            let one = Linear::Float {
                weight: w,
                bias: Some(b),
            };
            return Ok((vec![one], None));
        }
        let local = self.shards.local.iter();
        let out = match split {
            Split::Columns(part) => {
                let parts = local.map(|&(r, d)| Linear::Float {
                    weight: part(&w, 1, r).to_device(d),
                    bias: Some(part(&b, 0, r).to_device(d)),
                });
                (parts.collect(), None)
            }
            Split::Rows => {
                let parts = local.map(|&(r, d)| Linear::Float {
                    weight: slice(&w, 0, r, n).to_device(d),
                    bias: None,
                });
                (parts.collect(), Some(b.to_device(self.devices[0])))
            }
        };
        // Each shard's part is a copy (`part`, `slice`): the whole weight's pages go back.
        self.files.release(&format!("{}{name}.weight", self.prefix));
        Ok(out)
    }

    /// Block `l`: its attention split by heads, its MLP by the inner dimension.
    fn block(&self, l: i64) -> Result<Block> {
        let config = self.config;
        let (n, e, i) = (self.shards(), config.n_embd, config.inner_dim());
        let qkv = |t: &Tensor, dim: i64, r: i64| qkv_columns(t, dim, r, n);
        let even = |t: &Tensor, dim: i64, r: i64| slice(t, dim, r, n);
        let mut scale = if config.scale_attn_weights {
            1.0 / (config.head_dim() as f64).sqrt()
        } else {
            1.0
        };
        if config.scale_attn_by_inverse_layer_idx {
            scale /= (l + 1) as f64;
        }
        let (attn, mlp) = (format!("h.{l}.attn"), format!("h.{l}.mlp"));
        let (c_attn, _) = self.linear(&format!("{attn}.c_attn"), e, 3 * e, Split::Columns(&qkv))?;
        let (attn_proj, attn_bias) = self.linear(&format!("{attn}.c_proj"), e, e, Split::Rows)?;
        let (c_fc, _) = self.linear(&format!("{mlp}.c_fc"), e, i, Split::Columns(&even))?;
        let (mlp_proj, mlp_bias) = self.linear(&format!("{mlp}.c_proj"), i, e, Split::Rows)?;
        let n_head = config.n_head / n;
        Ok(Block {
            ln_1: self.ln(&format!("h.{l}.ln_1"))?,
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
            ln_2: self.ln(&format!("h.{l}.ln_2"))?,
            mlp: Mlp {
                shards: c_fc
                    .into_iter()
                    .zip(mlp_proj)
                    .map(|(c_fc, c_proj)| MlpShard { c_fc, c_proj })
                    .collect(),
                c_proj_bias: mlp_bias,
                act: config.activation(),
            },
        })
    }

    /// `wte` and the head: float rows, or int8 rows when the artifact quantized the
    /// embeddings (then `wte` is empty and the head runs on the int8 GEMM). transformers
    /// ties the head to wte whenever tie_word_embeddings is set, even when the file also
    /// stores `lm_head.weight`; untied models must store it.
    fn embeddings_and_head(&self, int8: bool, method: Method) -> Result<EmbeddingsAndHead> {
        let (v, e, main) = (self.config.vocab_size, self.config.n_embd, self.devices[0]);
        let tied = self.config.tie_word_embeddings;
        let wte_name = format!("{}wte.weight", self.prefix);
        if !int8 {
            // (V, E); kept in the file's dtype when the packed head converts it, and then
            // only the rows looked up are read (and converted).
            let wte_kind = self.late_kind(&wte_name).unwrap_or(self.kind);
            let wte = self.files.tensor(&wte_name, &[v, e], wte_kind, main)?;
            // Tied: `wte` itself (one tensor, one gradient), not a view of it.
            let weight = match tied {
                true => wte.shallow_clone(),
                false => {
                    let kind = self.late_kind("lm_head.weight").unwrap_or(self.kind);
                    self.files.tensor("lm_head.weight", &[v, e], kind, main)?
                }
            };
            let head = Linear::Rows {
                weight,
                packed: None,
            };
            return Ok((wte, None, head));
        }
        // The head over int8 rows (out = V, in = E), as the method runs its linears.
        let int8_head = |w: QuantRows| match method {
            Method::Int8Dynamic => Linear::Int8(Box::new(Int8Linear::new(w, None, None))),
            _ => Linear::Int8Weight {
                w,
                bias: None,
                packed: None,
            },
        };
        // The head's -128 check is deferred with the linears' (its packing reads every
        // byte); a tied head's bytes are wte's, an untied model's wte is checked here.
        let defer = self.int8.as_ref().is_some_and(|l| l.defer_min_check) && self.shards() == 1;
        let read = |name: &str, check: bool| {
            quant::read_int8_checking(self.files, name, [v, e], true, main, check)
        };
        let w = read(&wte_name, !(defer && tied))?;
        let head_q = if tied {
            int8_head(QuantRows {
                q: w.q.shallow_clone(),
                scale: w.scale.shallow_clone(),
            })
        } else {
            int8_head(read("lm_head.weight", !defer)?)
        };
        Ok((Tensor::new(), Some(w), head_q))
    }
}

/// The model's tensors under their checkpoint names.
impl Gpt2 {
    /// Every linear layer by checkpoint name (`h.N.attn.c_attn`, ...), unsharded models.
    pub(crate) fn named_linears(&self) -> Vec<(String, &Linear)> {
        self.linears()
            .map(|(l, name, x)| (format!("h.{l}.{name}"), x))
            .collect()
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
        if self.wte_q.is_some()
            || self.wte_blocks.is_some()
            || !matches!(self.head, Linear::Rows { .. })
        {
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
        for (l, name, part) in self.parts() {
            let name = format!("h.{l}.{name}");
            let lin = match part {
                Part::Norm(n) => {
                    ln(&mut out, name, n);
                    continue;
                }
                Part::Linear(x) => x,
            };
            let (weight, bias) = lin.float_parts().ok_or_else(|| {
                Error::Input(format!("named_tensors: `{name}` is int8, not float"))
            })?;
            out.push((format!("{name}.weight"), weight.shallow_clone()));
            if let Some(b) = bias {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
        }
        ln(&mut out, "ln_f".into(), &self.ln_f);
        if let Some(head) = self.lm_head() {
            out.push(("lm_head.weight".into(), head.shallow_clone()));
        }
        Ok(out)
    }
}
