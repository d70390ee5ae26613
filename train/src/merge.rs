//! `merge-lora`: a base model and a `peft` LoRA adapter made into one plain Hugging Face
//! folder, the weights merged as peft's `merge_and_unload` merges them
//! (`lora::Lora::merge_into`), written atomically (`folder::write_model_folder`).
use std::path::Path;

use anyhow::{Context, Result};
use infer::checkpoint::WeightFiles;
use infer::{Gpt2, Gpt2Config};
use tch::{Device, Kind};

use crate::folder;
use crate::lora::Lora;

/// What a merge did: the layers merged and the adapter's options.
pub struct Merged {
    pub layers: usize,
    pub r: i64,
    pub scaling: f64,
    pub config: Gpt2Config,
}

/// Merges the adapter of `adapter` into the model of `base` and writes the result to
/// `out` (which must not exist). The merge runs in f32; the weights are written in the
/// base's stored dtype.
pub fn merge_lora(base: &Path, adapter: &Path, out: &Path) -> Result<Merged> {
    infer::model::check_model_dir(base)?;
    infer::model::check_model_dir(adapter)?;
    let config = Gpt2Config::from_file(&base.join("config.json"))?;
    let files = WeightFiles::open_dir(base)?;
    infer::model::check_sizes(&config, &files)?;
    let kind = infer::model::stored_kind(&files);
    let model = Gpt2::from_weights(config.clone(), &files, Kind::Float, &[Device::Cpu])
        .with_context(|| format!("loading {}", base.display()))?;
    let mut tensors = model
        .named_tensors()
        .with_context(|| format!("{}", base.display()))?;
    drop(model);
    let lora = Lora::read(adapter, &config, Device::Cpu)
        .with_context(|| format!("the adapter {} on {}", adapter.display(), base.display()))?;
    lora.merge_into(&mut tensors)?;
    if kind != Kind::Float {
        for (_, t) in &mut tensors {
            *t = t.to_kind(kind);
        }
    }
    let tokenizer_files = folder::read_tokenizer_files(base)?;
    folder::write_plain_model(out, &config, &tensors, &tokenizer_files, false)?;
    Ok(Merged {
        layers: lora.layers.len(),
        r: lora.options.r,
        scaling: lora.options.scaling(),
        config,
    })
}
