//! Writing a Hugging Face model folder atomically: every file goes into a temporary
//! folder beside the target, is synced, and the folder is renamed into place, so a
//! process killed at any instant leaves either the old state or the complete new one.
//! Shared by `init`, checkpoints and the final model.
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use infer::Gpt2Config;
use safetensors::{Dtype, View};
use tch::{Device, Kind, Tensor};

/// Prefix of the temporary folders; leftovers of a killed process are removed on the
/// next start (`remove_leftovers`).
pub const TMP_PREFIX: &str = ".tmp-";

/// Tokenizer files copied from a model folder when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
];

/// A tensor's bytes, ready for the safetensors writer.
pub struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl RawTensor {
    /// Copies a float tensor (f32, f16 or bf16, any device) to host bytes.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Int64 => Dtype::I64,
            k => bail!("cannot save a tensor of kind {k:?}"),
        };
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        Ok(Self {
            dtype,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            bytes,
        })
    }
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` as one safetensors file with `{"format": "pt"}` metadata, as
/// transformers' `save_pretrained` does.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let raw: Vec<(String, RawTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                RawTensor::from_tensor(t).with_context(|| n.clone())?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(raw.iter().map(|(n, r)| (n.as_str(), r)), Some(meta), path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads every tensor of a safetensors file onto `device` (kinds as stored).
pub fn read_safetensors(path: &Path, device: Device) -> Result<HashMap<String, Tensor>> {
    let tensors =
        Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(tensors
        .into_iter()
        .map(|(n, t)| (n, t.to_device(device)))
        .collect())
}

/// Model tensors under save_pretrained's names: `transformer.` before the body,
/// `lm_head.weight` only for an untied head.
pub fn hf_names(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    named
        .iter()
        .map(|(n, t)| {
            let name = if n == "lm_head.weight" {
                n.clone()
            } else {
                format!("transformer.{n}")
            };
            (name, t.shallow_clone())
        })
        .collect()
}

/// `config.json` as transformers writes it for GPT2LMHeadModel.
pub fn config_json(config: &Gpt2Config) -> Result<String> {
    let mut value = serde_json::to_value(config)?;
    let obj = value.as_object_mut().expect("a config is an object");
    obj.insert(
        "architectures".into(),
        serde_json::json!(["GPT2LMHeadModel"]),
    );
    obj.insert("dtype".into(), serde_json::json!("float32"));
    obj.entry("initializer_range")
        .or_insert(serde_json::json!(crate::init::INITIALIZER_RANGE));
    for drop in [
        "attn_pdrop",
        "embd_pdrop",
        "resid_pdrop",
        "summary_first_dropout",
    ] {
        obj.entry(drop).or_insert(serde_json::json!(0.1));
    }
    obj.entry("use_cache").or_insert(serde_json::json!(true));
    Ok(serde_json::to_string_pretty(&value)?)
}

/// `generation_config.json`: the config's bos/eos, nothing else.
pub fn generation_config_json(config: &Gpt2Config) -> Result<String> {
    let mut obj = serde_json::Map::new();
    if let Some(b) = &config.bos_token_id {
        obj.insert("bos_token_id".into(), serde_json::to_value(b)?);
    }
    if let Some(e) = &config.eos_token_id {
        obj.insert("eos_token_id".into(), serde_json::to_value(e)?);
    }
    Ok(serde_json::to_string_pretty(&obj)?)
}

/// The tokenizer files of a model folder (those of `TOKENIZER_FILES` present), read
/// into memory; at least one is required.
pub fn read_tokenizer_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for file in TOKENIZER_FILES {
        let src = dir.join(file);
        if src.symlink_metadata().is_ok() {
            infer::checkpoint::check_regular_file(&src)?;
            let bytes = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            files.push((file.to_string(), bytes));
        }
    }
    if files.is_empty() {
        bail!(
            "{}: no tokenizer files ({})",
            dir.display(),
            TOKENIZER_FILES.join(", ")
        );
    }
    Ok(files)
}

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
}

/// Writes `contents` to `target` atomically. `target` must not exist unless `replace`,
/// in which case the old folder is swapped out only after the new one is complete.
pub fn write_model_folder(target: &Path, contents: &FolderContents, replace: bool) -> Result<()> {
    let parent = parent_of(target);
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    if target.exists() && !replace {
        bail!(infer::Error::Input(format!(
            "{} already exists; choose a new folder",
            target.display()
        )));
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = (|| -> Result<()> {
        write_file(
            &tmp.join("config.json"),
            config_json(contents.config)?.as_bytes(),
        )?;
        write_file(
            &tmp.join("generation_config.json"),
            generation_config_json(contents.config)?.as_bytes(),
        )?;
        let st = tmp.join(infer::checkpoint::SINGLE_FILE);
        write_safetensors(&st, &hf_names(contents.tensors))?;
        sync_file(&st)?;
        for (file, tensors) in &contents.extra_tensors {
            let p = tmp.join(file);
            write_safetensors(&p, tensors)?;
            sync_file(&p)?;
        }
        if contents.tokenizer_files.is_empty() {
            bail!("no tokenizer files to write");
        }
        for (file, bytes) in contents.tokenizer_files {
            write_file(&tmp.join(file), bytes)?;
        }
        for (file, bytes) in &contents.extra_files {
            write_file(&tmp.join(file), bytes)?;
        }
        sync_dir(&tmp)
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if target.exists() {
        // Swap: the old folder moves aside, the new one in, then the old one goes.
        let old = parent.join(format!("{TMP_PREFIX}old-{name}-{}", std::process::id()));
        fs::rename(target, &old).with_context(|| format!("moving {}", target.display()))?;
        fs::rename(&tmp, target).with_context(|| format!("renaming to {}", target.display()))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, target).with_context(|| format!("renaming to {}", target.display()))?;
    }
    sync_dir(&parent)
}

/// Removes temporary folders a killed process left in `dir`. A process killed between
/// the two renames of a swap (see `write_model_folder`) left the earlier folder aside as
/// `.tmp-old-NAME-PID` and no `NAME`: that folder is complete, so it is moved back first.
pub fn remove_leftovers(dir: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(0);
    };
    let leftovers: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX) && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    let old_prefix = format!("{TMP_PREFIX}old-");
    for path in &leftovers {
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(name) = file
            .strip_prefix(&old_prefix)
            .and_then(|rest| rest.rsplit_once('-'))
            .map(|(name, _pid)| name)
        else {
            continue;
        };
        let target = dir.join(name);
        if !name.is_empty() && !target.exists() {
            fs::rename(path, &target).with_context(|| {
                format!("restoring {} from {}", target.display(), path.display())
            })?;
        }
    }
    let mut n = 0;
    for path in leftovers.iter().filter(|p| p.exists()) {
        fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
        n += 1;
    }
    Ok(n)
}

fn parent_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes and syncs one file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Syncs a written file's data to disk.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// Syncs a folder's entries (a file created or renamed in it) to disk.
pub fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gpt2kit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_swap_killed_between_its_renames_gets_the_earlier_folder_back() {
        let dir = scratch("swap-killed");
        // The state after `rename(target, old)` and before `rename(tmp, target)`.
        fs::create_dir(dir.join(".tmp-old-final-77")).unwrap();
        fs::write(dir.join(".tmp-old-final-77/config.json"), "old").unwrap();
        fs::create_dir(dir.join(".tmp-final-77")).unwrap();
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert_eq!(
            fs::read_to_string(dir.join("final/config.json")).unwrap(),
            "old"
        );
        assert!(!dir.join(".tmp-final-77").exists());
        // After the second rename the new folder is in place: the old copy just goes.
        fs::create_dir(dir.join(".tmp-old-final-78")).unwrap();
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert_eq!(
            fs::read_to_string(dir.join("final/config.json")).unwrap(),
            "old"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
