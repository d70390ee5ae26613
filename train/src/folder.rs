//! Writing a model folder atomically (`infer::folder` holds the Hugging Face folder's
//! files and the temporary-folder writer): shared by `init`, checkpoints and the final
//! model.
use std::path::Path;

use anyhow::{bail, Context, Result};
use infer::folder::{TempFolder, CONFIG_FILE, GENERATION_CONFIG_FILE, SINGLE_FILE};
use infer::Gpt2Config;
use tch::Tensor;

use crate::lora::{LoraOptions, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

pub use infer::folder::{
    config_json, generation_config_json, hf_names, read_safetensors, read_tokenizer_files,
    remove_leftovers, sync_dir, sync_file, write_file, write_safetensors, TMP_PREFIX,
    TOKENIZER_FILES,
};

/// What goes into one model folder.
pub struct FolderContents<'a> {
    pub config: &'a Gpt2Config,
    /// Model tensors by checkpoint name (without `transformer.`).
    pub tensors: &'a [(String, Tensor)],
    /// Tokenizer files (name, bytes), read once by `read_tokenizer_files`: a run
    /// keeps them in memory, as the folder they came from may be rotated away.
    pub tokenizer_files: &'a [(String, Vec<u8>)],
    /// Further files: (name, bytes).
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// Further safetensors files: (name, tensors).
    pub extra_tensors: Vec<(String, Vec<(String, Tensor)>)>,
    /// A LoRA adapter folder instead (peft's `save_pretrained`): `tensors` are the
    /// adapter's, written to adapter_model.safetensors as named, with
    /// adapter_config.json naming the base model; no config.json or model weights.
    pub adapter: Option<(&'a LoraOptions, String)>,
}

/// A plain model folder (config, weights and tokenizer files, nothing else): see
/// `write_model_folder`.
pub fn write_plain_model(
    target: &Path,
    config: &Gpt2Config,
    tensors: &[(String, Tensor)],
    tokenizer_files: &[(String, Vec<u8>)],
    replace: bool,
) -> Result<()> {
    let contents = FolderContents {
        config,
        tensors,
        tokenizer_files,
        extra_files: vec![],
        extra_tensors: vec![],
        adapter: None,
    };
    write_model_folder(target, &contents, replace)
}

/// Writes `contents` to `target` atomically. `target` must not exist unless `replace`,
/// in which case the old folder is swapped out only after the new one is complete.
pub fn write_model_folder(target: &Path, contents: &FolderContents, replace: bool) -> Result<()> {
    write_folder(target, contents, replace).with_context(|| format!("saving {}", target.display()))
}

fn write_folder(target: &Path, contents: &FolderContents, replace: bool) -> Result<()> {
    if target.exists() && !replace {
        bail!(infer::Error::Input(format!(
            "{} already exists; choose a new folder",
            target.display()
        )));
    }
    let tmp = TempFolder::beside(target)?;
    if contents.tokenizer_files.is_empty() {
        bail!("no tokenizer files to write");
    }
    match &contents.adapter {
        Some((options, base)) => {
            let json = serde_json::to_vec_pretty(&options.config_json(base))?;
            tmp.write(ADAPTER_CONFIG, &json)?;
            write_safetensors(&tmp.path().join(ADAPTER_WEIGHTS), contents.tensors)?;
        }
        None => {
            tmp.write(CONFIG_FILE, config_json(contents.config)?.as_bytes())?;
            tmp.write(
                GENERATION_CONFIG_FILE,
                generation_config_json(contents.config)?.as_bytes(),
            )?;
            let st = tmp.path().join(SINGLE_FILE);
            write_safetensors(&st, &hf_names(contents.tensors))?;
        }
    }
    for (file, tensors) in &contents.extra_tensors {
        write_safetensors(&tmp.path().join(file), tensors)?;
    }
    for (file, bytes) in contents.tokenizer_files.iter().chain(&contents.extra_files) {
        tmp.write(file, bytes)?;
    }
    tmp.replace(target)?;
    Ok(())
}
