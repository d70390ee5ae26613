//! `merge-lora`: a base model and a `peft` LoRA adapter made into one plain Hugging Face
//! folder, the weights merged as peft's `merge_and_unload` merges them
//! (`lora::Lora::merge_into`), written atomically (`folder::write_plain_model`).
//! (`infer --adapter` runs an adapter unmerged: `infer::model::lora`.)
use std::path::Path;

use anyhow::{Context, Result};
use infer::checkpoint::WeightFiles;
use infer::{Gpt2, Gpt2Config};
use tch::{Device, Kind, Tensor};

use crate::folder;
use crate::lora::Lora;

/// A base model with an adapter merged into its weights (in f32).
pub struct Merged {
    pub config: Gpt2Config,
    pub tensors: Vec<(String, Tensor)>,
    /// The base's stored dtype.
    pub stored: Kind,
    pub lora: Lora,
}

/// The model of `base` with the adapter of `adapter` merged in, in f32 on the CPU.
pub fn merged(base: &Path, adapter: &Path) -> Result<Merged> {
    infer::model::check_model_dir(base)?;
    infer::model::check_model_dir(adapter)?;
    let config = Gpt2Config::from_file(&base.join("config.json"))?;
    let files = WeightFiles::open_dir(base)?;
    infer::model::check_sizes(&config, &files)?;
    let stored = infer::model::stored_kind(&files);
    let model = Gpt2::from_weights(config.clone(), &files, Kind::Float, &[Device::Cpu])
        .with_context(|| format!("loading {}", base.display()))?;
    let mut tensors = model
        .named_tensors()
        .with_context(|| format!("{}", base.display()))?;
    drop(model);
    let lora = Lora::read(adapter, &config, Device::Cpu)
        .with_context(|| format!("the adapter {} on {}", adapter.display(), base.display()))?;
    lora.merge_into(&mut tensors)?;
    Ok(Merged {
        config,
        tensors,
        stored,
        lora,
    })
}

/// Merges the adapter of `adapter` into the model of `base` and writes the result to
/// `out` (which must not exist), in the base's stored dtype.
pub fn merge_lora(base: &Path, adapter: &Path, out: &Path) -> Result<Merged> {
    let mut m = merged(base, adapter)?;
    if m.stored != Kind::Float {
        for (_, t) in &mut m.tensors {
            *t = t.to_kind(m.stored);
        }
    }
    let tokenizer_files = folder::read_tokenizer_files(base)?;
    folder::write_plain_model(out, &m.config, &m.tensors, &tokenizer_files, false)?;
    Ok(m)
}
