//! Loading a GPT-2 from a `.gguf` file: the config from the `gpt2.*` keys, every tensor
//! checked against it by name and dims before any is read, and the same model built as
//! from a folder (`Gpt2::from_weights`), each tensor dequantized to f32 as it is asked for
//! (`blocks::dequantize`), the Conv1D weights transposed back to transformers' (in, out).
//! An f32 run on the CPU kernels never dequantizes its quantized matrices: they run on
//! their blocks (`matmul`) read in place from the file's mapping, as llama.cpp maps a
//! model, and the embedding's rows are dequantized as they are looked up.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::blocks;
use super::dot;
use super::file::{GgufFile, TensorInfo};
use super::gpt2;
use super::matmul::{BlockBytes, BlockLinear};
use crate::checkpoint::TensorSource;
use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::model::Gpt2;
use crate::options::EngineOptions;

/// The config a GGUF file describes, its tensors checked against it.
pub fn config(path: &Path) -> Result<Gpt2Config> {
    let file = GgufFile::open(path)?;
    let c = gpt2::config_from(&file.header, path)?;
    gpt2::check_tensors(&file.header, &c, path)?;
    Ok(c)
}

/// The config and every tensor in f32 under its checkpoint name (Conv1D weights
/// (in, out), as transformers stores them).
pub fn read(path: &Path) -> Result<(Gpt2Config, Vec<(String, Tensor)>)> {
    read_open(&GgufFile::open(path)?, path)
}

fn read_open(file: &GgufFile, path: &Path) -> Result<(Gpt2Config, Vec<(String, Tensor)>)> {
    let h = &file.header;
    let config = gpt2::config_from(h, path)?;
    gpt2::check_tensors(h, &config, path)?;
    let mut out = Vec::with_capacity(h.tensors.len());
    for t in &h.tensors {
        let hf = gpt2::hf_name(&t.name).ok_or_else(|| bad(path, &t.name, "unknown name"))?;
        let mut x = dequantized(file, t, path)?;
        if gpt2::is_conv1d_weight(&hf) {
            // (out, in) → (in, out); `check_tensors` fixed these weights at two dims
            x = x.transpose(0, 1).contiguous();
        }
        out.push((hf, x));
    }
    Ok((config, out))
}

/// Loads a GGUF GPT-2 as `Gpt2::load_with` loads a folder: in `kind` (`None`: the file's
/// own, `own_kind`), split over `devices`, readied as `options` say. An f32 run on the
/// CPU kernels reads the quantized matrices in place from the file's mapping (`Source`);
/// every other tensor is dequantized when the model is built from it, one at a time.
pub fn load(
    path: &Path,
    kind: Option<Kind>,
    devices: &[Device],
    options: &EngineOptions,
) -> Result<Gpt2> {
    let file = GgufFile::open(path)?;
    let config = gpt2::config_from(&file.header, path)?;
    gpt2::check_tensors(&file.header, &config, path)?;
    crate::parallel::check_layout(config.n_head, config.inner_dim(), devices)?;
    options.apply_threads()?;
    let kind = kind.unwrap_or_else(|| own_kind(&file));
    let in_place = options.kernels && kind == Kind::Float && devices == [Device::Cpu];
    let source = Source::new(&file, path, in_place)?.copied(!options.map_weights);
    let mut model = Gpt2::from_weights(config, &source, kind, devices)?;
    source.put_on_blocks(&mut model)?;
    if options.map_weights {
        model.files = vec![file.map().clone()];
    } else {
        // nothing reads the mapping after loading: a change to the file since is harmless
        file.map().check()?;
    }
    if options.kernels {
        model.pack_for_cpu_decode()?;
        model.set_fused_decode(options.fused_decode);
    }
    model.set_cuda_graphs(options.cuda_graphs);
    // a file truncated or rewritten while it was read is an error here, not a model
    model.check_files()?;
    Ok(model)
}

/// A GGUF file's tensors under their checkpoint names, for `Gpt2::from_weights`. Each
/// is dequantized when asked for (never the whole file at once), except the matrices in
/// a quantized type that an f32 CPU run computes on in place (`blocks`): the model is
/// built with a placeholder for each (a zero broadcast to the shape, which holds no
/// memory), and `put_on_blocks` replaces every one with a layer over the file's bytes
/// (or over a copy of them, `copied`: `--no-mmap`).
struct Source<'a> {
    file: &'a GgufFile,
    path: &'a Path,
    by_name: HashMap<String, &'a TensorInfo>,
    blocks: HashSet<String>,
    copied: bool,
}

impl<'a> Source<'a> {
    fn new(file: &'a GgufFile, path: &'a Path, in_place: bool) -> Result<Self> {
        let mut by_name = HashMap::new();
        for t in &file.header.tensors {
            let hf = gpt2::hf_name(&t.name).ok_or_else(|| bad(path, &t.name, "unknown name"))?;
            by_name.insert(hf, t);
        }
        let mut blocks = HashSet::new();
        for (hf, t) in &by_name {
            let matrix = gpt2::is_conv1d_weight(hf) || hf == "wte.weight" || hf == "lm_head.weight";
            if !(in_place && matrix && t.dims.len() == 2 && dot::vec_dot_type(t.ty).is_some()) {
                continue;
            }
            // What dequantizing checks for every other tensor, from the scales alone.
            match blocks::all_finite(t.ty, file.bytes(t)) {
                Some(true) => {}
                Some(false) => return Err(bad(path, &t.name, "holds NaN or infinite values")),
                None => continue,
            }
            blocks.insert(hf.clone());
        }
        Ok(Self {
            file,
            path,
            by_name,
            blocks,
            copied: false,
        })
    }

    /// Layers on blocks own a copy of their bytes rather than reading the mapping.
    fn copied(self, copied: bool) -> Self {
        Self { copied, ..self }
    }

    /// A layer over the file's bytes of checkpoint tensor `hf` (out, in), with `bias`.
    fn layer(&self, hf: &str, bias: Option<&Tensor>) -> Result<Linear> {
        Ok(Linear::Blocks(Box::new(self.block_linear(hf, bias)?)))
    }

    fn block_linear(&self, hf: &str, bias: Option<&Tensor>) -> Result<BlockLinear> {
        let t = self.by_name[hf];
        let [n_in, n_out] = t.dims[..] else {
            unreachable!("`new` chose two-dim tensors")
        };
        let bias = bias
            .map(|b| Vec::<f32>::try_from(b.to_kind(Kind::Float)))
            .transpose()?;
        let bytes = match self.copied {
            true => BlockBytes::Owned(self.file.bytes(t).to_vec()),
            false => BlockBytes::Mapped {
                file: self.file.map().clone(),
                range: self.file.range(t),
            },
        };
        BlockLinear::new(t.ty, n_in as usize, n_out as usize, bytes, bias)
            .map_err(|e| bad(self.path, &t.name, &e.to_string()))?
            .ok_or_else(|| bad(self.path, &t.name, "has no block dot product"))
    }

    /// Replaces the model's placeholders (`blocks`) with layers over the file's bytes;
    /// an error if any is left.
    fn put_on_blocks(&self, model: &mut Gpt2) -> Result<()> {
        let mut placed = 0;
        for (l, module, linear) in model.linears_mut() {
            let hf = format!("h.{l}.{module}.weight");
            if !self.blocks.contains(&hf) {
                continue;
            }
            let bias = match &*linear {
                Linear::Float { bias, .. } => bias.as_ref().map(Tensor::shallow_clone),
                _ => continue,
            };
            *linear = self.layer(&hf, bias.as_ref())?;
            placed += 1;
        }
        let tied = model.config.tie_word_embeddings;
        if self.blocks.contains("wte.weight") {
            // looked-up rows are dequantized from the blocks (`Gpt2::embed_tokens`)
            model.wte_blocks = Some(Box::new(self.block_linear("wte.weight", None)?));
            model.wte = Tensor::new();
            placed += 1;
            if tied {
                model.head = self.layer("wte.weight", None)?;
            }
        }
        if !tied && self.blocks.contains("lm_head.weight") {
            model.head = self.layer("lm_head.weight", None)?;
            placed += 1;
        }
        if placed != self.blocks.len() {
            return Err(Error::Input(format!(
                "{}: {} of {} quantized matrices were placed on their blocks",
                self.path.display(),
                placed,
                self.blocks.len()
            )));
        }
        Ok(())
    }
}

fn bad(path: &Path, name: &str, reason: &str) -> Error {
    Error::ModelFolder {
        path: path.into(),
        reason: format!("tensor `{name}`: {reason}"),
    }
}

impl TensorSource for Source<'_> {
    fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let t = *self.by_name.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.into(),
            name: name.into(),
        })?;
        let mut stored = t.shape();
        if gpt2::is_conv1d_weight(name) {
            stored.reverse();
        }
        if stored != shape {
            return Err(Error::Shape {
                path: self.path.into(),
                name: name.into(),
                expected: shape.to_vec(),
                got: stored,
            });
        }
        if self.blocks.contains(name) {
            return Ok(Tensor::zeros([1], (kind, device)).expand(shape, false));
        }
        let x = dequantized(self.file, t, self.path)?;
        let x = match gpt2::is_conv1d_weight(name) {
            // (out, in) → (in, out); `check_tensors` fixed these weights at two dims
            true => x.transpose(0, 1).contiguous(),
            false => x,
        };
        Ok(x.f_to_kind(kind)?.f_to_device(device)?)
    }

    fn path_of(&self, _name: &str) -> PathBuf {
        self.path.into()
    }
}

/// Tensor `t` of `file` in f32, in torch's shape.
fn dequantized(file: &GgufFile, t: &TensorInfo, path: &Path) -> Result<Tensor> {
    let values = blocks::dequantize(t.ty, file.bytes(t), t.numel() as usize)
        .map_err(|e| bad(path, &t.name, &e.to_string()))?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(bad(path, &t.name, "holds NaN or infinite values"));
    }
    // `dequantize` gave exactly the shape's element count (checked against the file)
    Ok(Tensor::from_slice(&values).reshape(t.shape()))
}

/// The dtype a file's own weights ask for (`--dtype auto`): bf16 when every matrix but
/// `position_embd` (which llama.cpp keeps in F32) is BF16, as a bf16 checkpoint folder runs
/// in bf16; else f32 (quantized types run on their
/// blocks in an f32 model, f16 is widened).
pub fn own_kind(file: &GgufFile) -> Kind {
    let types: Vec<_> = file
        .header
        .tensors
        .iter()
        .filter(|t| t.dims.len() == 2 && t.name != "position_embd.weight")
        .map(|t| t.ty)
        .collect();
    match !types.is_empty() && types.iter().all(|&t| t == super::GgmlType::BF16) {
        true => Kind::BFloat16,
        false => Kind::Float,
    }
}
