//! The Hugging Face model folder as files: which files hold the weights (one
//! `model.safetensors`, or the shards `model.safetensors.index.json` lists, each a plain
//! file name inside the folder), the tokenizer files, `config.json` as transformers'
//! `save_pretrained` writes it for GPT2LMHeadModel, the one safetensors writer, and
//! atomic writing: every file goes into a temporary folder beside the target, is
//! synced, and the folder is renamed into place, so a process killed at any instant
//! leaves either the old state or the complete new one; the folder's manifest
//! (`manifest`) is its last file. Tensors are read by `checkpoint::WeightFiles`.
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::files::{check_regular_file, exists};
use crate::Gpt2Config;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Tokenizer files copied from a model folder when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
];

/// Prefix of the temporary folders, `.tmp-NAME-PID`: leftovers of a killed process are
/// removed on the next start (`remove_leftovers`, `TempFolder::beside`), those of a
/// process still running never.
pub const TMP_PREFIX: &str = ".tmp-";

/// transformers' `GPT2Config.initializer_range` default.
pub const INITIALIZER_RANGE: f64 = 0.02;

/// The distinct shard files named by `model.safetensors.index.json`, in the order the
/// index first names them. Shard names are plain file names inside the folder: a name
/// with a path separator, `..` or an absolute path is refused, so an index cannot make
/// a reader open files elsewhere.
pub fn read_shard_index(index: &Path) -> Result<Vec<PathBuf>> {
    let bad = |reason: String| Error::ShardIndex {
        path: index.into(),
        reason,
    };
    check_regular_file(index)?;
    let text = fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map[{name:?}]` is not a file name")))?;
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!(
                "shard name {file:?} for `{name}` is not a file name"
            )));
        }
        let path = dir.join(file);
        if !shards.contains(&path) {
            shards.push(path);
        }
    }
    if shards.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(shards)
}

/// The weight files of a model folder: `model.safetensors`, or else the shards its
/// index lists, in name order (what a source hash and byte counts cover; optimizer
/// state and other files beside them are not the model).
pub fn weight_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if exists(&single) {
        return Ok(vec![single]);
    }
    let index = dir.join(SHARD_INDEX);
    if !exists(&index) {
        return Err(Error::ModelFolder {
            path: dir.into(),
            reason: format!("no {SINGLE_FILE} or {SHARD_INDEX} in this folder"),
        });
    }
    let mut paths = read_shard_index(&index)?;
    paths.sort();
    Ok(paths)
}

/// Those of `names` present in `dir` (regular files only), read into memory.
pub fn read_present(dir: &Path, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for name in names {
        let src = dir.join(name);
        if src.symlink_metadata().is_ok() {
            check_regular_file(&src)?;
            let bytes = fs::read(&src).map_err(|e| Error::io(&src, e))?;
            files.push((name.to_string(), bytes));
        }
    }
    Ok(files)
}

/// The tokenizer files of a model folder (those of `TOKENIZER_FILES` present), read
/// into memory; at least one is required.
pub fn read_tokenizer_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let files = read_present(dir, TOKENIZER_FILES)?;
    if files.is_empty() {
        return Err(Error::ModelFolder {
            path: dir.into(),
            reason: format!("no tokenizer files ({})", TOKENIZER_FILES.join(", ")),
        });
    }
    Ok(files)
}

/// Reads every tensor of a safetensors file onto `device` (kinds as stored).
pub fn read_safetensors(path: &Path, device: Device) -> Result<HashMap<String, Tensor>> {
    check_regular_file(path)?;
    let tensors = Tensor::read_safetensors(path).map_err(|e| Error::ModelFolder {
        path: path.into(),
        reason: crate::error::first_line(&e),
    })?;
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

fn to_json(what: &str, v: impl serde::Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Input(format!("{what}: {e}")))
}

/// `config.json` as transformers writes it for GPT2LMHeadModel.
pub fn config_json(config: &Gpt2Config) -> Result<String> {
    let mut value = to_json(CONFIG_FILE, config)?;
    // A struct serializes as an object: written, not read from a file.
    let obj = value.as_object_mut().expect("a config is an object");
    obj.insert(
        "architectures".into(),
        serde_json::json!(["GPT2LMHeadModel"]),
    );
    obj.insert("dtype".into(), serde_json::json!("float32"));
    obj.entry("initializer_range")
        .or_insert(serde_json::json!(INITIALIZER_RANGE));
    for drop in [
        "attn_pdrop",
        "embd_pdrop",
        "resid_pdrop",
        "summary_first_dropout",
    ] {
        obj.entry(drop).or_insert(serde_json::json!(0.1));
    }
    obj.entry("use_cache").or_insert(serde_json::json!(true));
    // A `Value` (string keys only) always prints.
    Ok(serde_json::to_string_pretty(&value).expect("a JSON value prints"))
}

/// `generation_config.json`: the config's bos/eos, nothing else.
pub fn generation_config_json(config: &Gpt2Config) -> Result<String> {
    let mut obj = serde_json::Map::new();
    if let Some(b) = &config.bos_token_id {
        obj.insert("bos_token_id".into(), to_json("bos_token_id", b)?);
    }
    if let Some(e) = &config.eos_token_id {
        obj.insert("eos_token_id".into(), to_json("eos_token_id", e)?);
    }
    // A `Value` map (string keys only) always prints.
    Ok(serde_json::to_string_pretty(&obj).expect("a JSON value prints"))
}

/// A tensor's bytes, ready for the safetensors writer.
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl RawTensor {
    /// Copies a tensor (any device) to host bytes.
    fn from_tensor(name: &str, t: &Tensor) -> Result<Self> {
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Int8 => Dtype::I8,
            Kind::Int => Dtype::I32,
            Kind::Int64 => Dtype::I64,
            k => return Err(Error::Input(format!("tensor `{name}`: cannot save {k:?}"))),
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
/// transformers' `save_pretrained` does (transformers checks it when loading), and
/// syncs it.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    crate::faults::point();
    let raw: Vec<(String, RawTensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), RawTensor::from_tensor(n, t)?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(raw.iter().map(|(n, r)| (n.as_str(), r)), Some(meta), path)
        .map_err(|e| Error::ModelFolder {
            path: path.into(),
            reason: format!("writing: {e}"),
        })?;
    sync_file(path)
}

/// Writes and syncs one file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::faults::point();
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    f.write_all(head).map_err(|e| Error::io(path, e))?;
    crate::faults::point();
    f.write_all(tail)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Syncs a written file's data to disk.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Syncs a folder's entries (a file created or renamed in it) to disk.
pub fn sync_dir(path: &Path) -> Result<()> {
    sync_file(path)
}

/// A temporary folder beside a target folder, `.tmp-NAME-PID`, removed when dropped
/// unless renamed into place by `commit` or `replace`.
pub struct TempFolder {
    path: PathBuf,
    parent: PathBuf,
    name: String,
    placed: bool,
}

impl TempFolder {
    /// Creates the target's parent if needed, and the temporary folder in it (a stale one
    /// of this process id, or of a process no longer running, is removed first).
    pub fn beside(target: &Path) -> Result<Self> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        remove_dead_temps(&parent, &format!("{TMP_PREFIX}{name}-"))?;
        let path = parent.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            parent,
            name,
            placed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes and syncs the file `name` in the folder.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_file(&self.path.join(name), bytes)
    }

    /// Renames the folder to `target`, which must not exist (or, as rename(2) allows, be
    /// an empty folder). Synced before and after the rename, so that after a crash
    /// `target` is either absent or complete.
    pub fn commit(mut self, target: &Path) -> Result<()> {
        crate::manifest::write(&self.path)?;
        sync_dir(&self.path)?;
        crate::faults::point();
        fs::rename(&self.path, target).map_err(|e| Error::io(target, e))?;
        self.placed = true;
        crate::faults::point();
        sync_dir(&self.parent)
    }

    /// As `commit`, but an existing `target` is swapped out only once the new folder is
    /// complete: the old folder moves aside (`.tmp-old-NAME-PID`), the new one in, then
    /// the old one goes (`remove_leftovers` finishes a swap a kill interrupted).
    pub fn replace(mut self, target: &Path) -> Result<()> {
        if !target.exists() {
            return self.commit(target);
        }
        crate::manifest::write(&self.path)?;
        sync_dir(&self.path)?;
        let old = self.parent.join(format!(
            "{TMP_PREFIX}old-{}-{}",
            self.name,
            std::process::id()
        ));
        crate::faults::point();
        fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
        crate::faults::point();
        fs::rename(&self.path, target).map_err(|e| Error::io(target, e))?;
        self.placed = true;
        crate::faults::point();
        let _ = fs::remove_dir_all(&old);
        sync_dir(&self.parent)
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        if !self.placed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The process id a temporary folder's name ends with (`.tmp-NAME-PID`).
fn owner_pid(file_name: &str) -> Option<i32> {
    file_name.rsplit_once('-')?.1.parse().ok()
}

/// Whether a process other than this one with id `pid` is running (or may be: a
/// process of another user answers EPERM).
fn running_elsewhere(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that `pid` exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Temporary folders in `dir` whose name starts with `prefix` and whose owner is no
/// longer running (or is this process).
fn dead_temps(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(prefix) && owner_pid(&name).is_none_or(|p| !running_elsewhere(p))
        })
        .map(|e| e.path())
        .collect()
}

fn remove_dead_temps(dir: &Path, prefix: &str) -> Result<()> {
    for path in dead_temps(dir, prefix) {
        fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Removes temporary folders a killed process left in `dir` (never those of a process
/// still running). A process killed between
/// the two renames of a swap (`TempFolder::replace`) left the earlier folder aside as
/// `.tmp-old-NAME-PID` and no `NAME`: that folder is complete, so it is moved back first.
pub fn remove_leftovers(dir: &Path) -> Result<usize> {
    let leftovers = dead_temps(dir, TMP_PREFIX);
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
            fs::rename(path, &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    let mut n = 0;
    for path in leftovers.iter().filter(|p| p.exists()) {
        fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
        n += 1;
    }
    Ok(n)
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
        fs::create_dir(dir.join(".tmp-old-final-2000000077")).unwrap();
        fs::write(dir.join(".tmp-old-final-2000000077/config.json"), "old").unwrap();
        fs::create_dir(dir.join(".tmp-final-2000000077")).unwrap();
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert_eq!(
            fs::read_to_string(dir.join("final/config.json")).unwrap(),
            "old"
        );
        assert!(!dir.join(".tmp-final-2000000077").exists());
        // After the second rename the new folder is in place: the old copy just goes.
        fs::create_dir(dir.join(".tmp-old-final-2000000078")).unwrap();
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert_eq!(
            fs::read_to_string(dir.join("final/config.json")).unwrap(),
            "old"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_running_processs_temporary_folder_is_never_removed() {
        let dir = scratch("live-temp");
        let live = format!(".tmp-out-{}", std::os::unix::process::parent_id());
        fs::create_dir(dir.join(&live)).unwrap();
        fs::create_dir(dir.join(".tmp-out-2000000001")).unwrap();
        fs::create_dir(dir.join(".tmp-other-2000000002")).unwrap();
        // The next writer of `out` removes the dead writer's folder of that name only.
        let tmp = TempFolder::beside(&dir.join("out")).unwrap();
        assert!(dir.join(&live).exists() && dir.join(".tmp-other-2000000002").exists());
        assert!(!dir.join(".tmp-out-2000000001").exists());
        drop(tmp);
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert!(dir.join(&live).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shard_names_that_leave_the_folder_are_refused() {
        let dir = scratch("shard-escape");
        for (i, shard) in ["../../etc/passwd", "/etc/passwd", "..", "a\\b", ""]
            .iter()
            .enumerate()
        {
            let index = serde_json::json!({"weight_map": {
                "wte.weight": "model-00001.safetensors", "x": shard}});
            fs::write(dir.join(SHARD_INDEX), index.to_string()).unwrap();
            let err = weight_paths(&dir).unwrap_err().to_string();
            assert!(err.contains("is not a file name"), "{i}: {err}");
        }
        let index = serde_json::json!({"weight_map": {
            "a": "model-00002.safetensors", "b": "model-00001.safetensors",
            "c": "model-00002.safetensors"}});
        fs::write(dir.join(SHARD_INDEX), index.to_string()).unwrap();
        assert_eq!(
            weight_paths(&dir).unwrap(),
            [
                dir.join("model-00001.safetensors"),
                dir.join("model-00002.safetensors")
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_temporary_folder_goes_unless_placed() {
        let dir = scratch("temp-folder");
        let target = dir.join("out");
        let tmp = TempFolder::beside(&target).unwrap();
        tmp.write("a.txt", b"a").unwrap();
        let tmp_path = tmp.path().to_path_buf();
        drop(tmp);
        assert!(!tmp_path.exists() && !target.exists());
        let tmp = TempFolder::beside(&target).unwrap();
        tmp.write("a.txt", b"new").unwrap();
        tmp.commit(&target).unwrap();
        assert_eq!(fs::read(target.join("a.txt")).unwrap(), b"new");
        let tmp = TempFolder::beside(&target).unwrap();
        assert!(tmp.commit(&target).is_err(), "a folder with files is kept");
        let tmp = TempFolder::beside(&target).unwrap();
        tmp.write("b.txt", b"b").unwrap();
        tmp.replace(&target).unwrap();
        assert!(!target.join("a.txt").exists() && target.join("b.txt").exists());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
