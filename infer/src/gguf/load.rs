//! Loading a GPT-2 from a `.gguf` file: the config from the `gpt2.*` keys, every tensor
//! checked against it by name and dims before any is read, then dequantized to f32
//! (`blocks::dequantize`), the Conv1D weights transposed back to transformers' (in, out),
//! and the same model built as from a folder (`Gpt2::from_weights`). An f32 run on the CPU
//! then puts the quantized layers back on their blocks (`matmul`).
use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::blocks;
use super::file::GgufFile;
use super::gpt2;
use super::matmul::BlockLinear;
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
    let bad = |name: &str, reason: String| Error::ModelFolder {
        path: path.into(),
        reason: format!("tensor `{name}`: {reason}"),
    };
    let mut out = Vec::with_capacity(h.tensors.len());
    for t in &h.tensors {
        let hf = gpt2::hf_name(&t.name).ok_or_else(|| bad(&t.name, "unknown name".into()))?;
        let values = blocks::dequantize(t.ty, file.bytes(t), t.numel() as usize)
            .map_err(|e| bad(&t.name, e.to_string()))?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad(&t.name, "holds NaN or infinite values".into()));
        }
        // `dequantize` gave exactly the shape's element count (checked against the file)
        let mut x = Tensor::from_slice(&values).reshape(t.shape());
        if gpt2::is_conv1d_weight(&hf) {
            // (out, in) → (in, out); `check_tensors` fixed these weights at two dims
            x = x.transpose(0, 1).contiguous();
        }
        out.push((hf, x));
    }
    Ok((config, out))
}

/// Loads a GGUF GPT-2 as `Gpt2::load_with` loads a folder: in `kind` (`None`: f32),
/// split over `devices`, readied as `options` say.
pub fn load(
    path: &Path,
    kind: Option<Kind>,
    devices: &[Device],
    options: &EngineOptions,
) -> Result<Gpt2> {
    let file = GgufFile::open(path)?;
    let (config, tensors) = read_open(&file, path)?;
    crate::parallel::check_layout(config.n_head, config.inner_dim(), devices)?;
    options.apply_threads()?;
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let kind = kind.unwrap_or_else(|| own_kind(&file));
    let mut model = Gpt2::from_weights(config, &map, kind, devices)?;
    drop(map);
    if options.kernels {
        if kind == Kind::Float && devices == [Device::Cpu] {
            on_blocks(&mut model, &file, path)?;
        }
        model.pack_for_cpu_decode()?;
        model.set_fused_decode(options.fused_decode);
    }
    Ok(model)
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

/// The block linears and the head whose tensors are in a quantized ggml type run on
/// those blocks (`matmul`), the file's bytes, in place of their f32 copies: an f32 run
/// on the CPU computes as llama.cpp's CPU backend does, reading the file's bytes per
/// token. Float tensors (f32, f16, bf16) stay float layers.
fn on_blocks(model: &mut Gpt2, file: &GgufFile, path: &Path) -> Result<()> {
    let tensor = |name: &str| file.header.tensors.iter().find(|t| t.name == name);
    let layer = |name: &str, bias: Option<&Tensor>| -> Result<Option<Linear>> {
        let Some(t) = tensor(name) else {
            return Ok(None);
        };
        let (n_in, n_out) = match t.dims[..] {
            [n_in, n_out] => (n_in as usize, n_out as usize),
            _ => return Ok(None),
        };
        let bias = bias
            .map(|b| Vec::<f32>::try_from(b.to_kind(Kind::Float)))
            .transpose()?;
        let made = BlockLinear::new(t.ty, n_in, n_out, file.bytes(t).to_vec(), bias);
        let made = made.map_err(|e| Error::ModelFolder {
            path: path.into(),
            reason: format!("tensor `{name}`: {e}"),
        })?;
        Ok(made.map(|b| Linear::Blocks(Box::new(b))))
    };
    for (l, module, linear) in model.linears_mut() {
        let hf = format!("h.{l}.{module}.weight");
        let Some(name) = gpt2::gguf_name(&hf) else {
            continue;
        };
        let bias = match &*linear {
            Linear::Float { bias, .. } => bias.as_ref().map(Tensor::shallow_clone),
            _ => continue,
        };
        if let Some(blocks) = layer(&name, bias.as_ref())? {
            *linear = blocks;
        }
    }
    // The head: `output`, or `token_embd` when the file ties them (the embedding keeps
    // its f32 rows for the lookups).
    let head = ["output.weight", "token_embd.weight"]
        .into_iter()
        .find(|n| tensor(n).is_some());
    if let Some(name) = head {
        if let Some(blocks) = layer(name, None)? {
            model.head = blocks;
        }
    }
    Ok(())
}
