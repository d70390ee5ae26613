//! Loading a GPT-2 from a `.gguf` file: the config from the `gpt2.*` keys, every tensor
//! checked against it by name and dims before any is read, then dequantized to f32
//! (`blocks::dequantize`), the Conv1D weights transposed back to transformers' (in, out),
//! and the same model built as from a folder (`Gpt2::from_weights`).
use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::blocks;
use super::file::GgufFile;
use super::gpt2;
use crate::config::Gpt2Config;
use crate::error::{Error, Result};
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
    let file = GgufFile::open(path)?;
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
        let mut x = Tensor::from_slice(&values).reshape(t.shape());
        if gpt2::is_conv1d_weight(&hf) {
            x = x.transpose(0, 1).contiguous(); // (out, in) → (in, out)
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
    let (config, tensors) = read(path)?;
    crate::parallel::check_layout(config.n_head, config.inner_dim(), devices)?;
    options.apply_threads()?;
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let kind = kind.unwrap_or(Kind::Float);
    let mut model = Gpt2::from_weights(config, &map, kind, devices)?;
    if options.kernels {
        model.pack_for_cpu_decode()?;
        model.set_fused_decode(options.fused_decode);
    }
    Ok(model)
}
