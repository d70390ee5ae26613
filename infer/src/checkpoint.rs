//! Reading Hugging Face safetensors checkpoints: one `model.safetensors`, or shards
//! listed by `model.safetensors.index.json`. Headers are validated by the `safetensors`
//! crate (sizes, offsets, overflow, trailing bytes) before any tensor is touched, and
//! every error names the file and the tensor. Only regular files are opened (a FIFO
//! would block the reader), and float tensors are checked for NaN and ±inf as they are
//! read, on the mapped bytes.
//!
//! Files are mapped (`mapped`), never read whole. In place (`in_place`), a tensor whose
//! stored dtype is the one asked for, on the CPU, is a view of the mapping (no copy); else
//! it is copied out of the mapping, or converted from it, one tensor at a time. Either way
//! the tensor's pages of the mapping are given back after it is read (`release`), so what
//! stays resident is what the model holds and what it touches later.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::mapped::MappedFile;

pub use crate::folder::{SHARD_INDEX, SINGLE_FILE};

/// Where one tensor's bytes live.
/// `file` indexes `WeightFiles::files` and `start..end` lies inside that file's mapping
/// (safetensors checked every tensor's offsets against the file's length when it was
/// opened, and entries are never made otherwise): indexing by an entry cannot panic.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<i64>,
    /// Byte range inside the file's mapping.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint, memory-mapped; reads copy out one tensor at a time, or
/// (`in_place`) view it in the mapping.
pub struct WeightFiles {
    files: Vec<Arc<MappedFile>>,
    in_place: bool,
    entries: HashMap<String, Entry>,
    /// Names read so far (`tensor`, `tensor_as_stored`): what a model left unused.
    used: Mutex<HashSet<String>>,
    /// Names whose finite check the caller makes later (`defer_finite_check`).
    deferred: HashSet<String>,
}

/// Whether float bytes of `dtype` hold a NaN or an infinity (all exponent bits set).
/// Runs on the mapped bytes, a block at a time so that the loop vectorises.
fn has_non_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    fn scan<const N: usize>(bytes: &[u8], mask: u32) -> bool {
        let word = |c: &[u8]| -> u32 {
            let mut b = [0u8; 4];
            // `c` is one of `chunks_exact(N)`, N ≤ 4.
            b[..N].copy_from_slice(c);
            u32::from_le_bytes(b)
        };
        bytes.chunks(N * 1024).any(|block| {
            block
                .chunks_exact(N)
                .fold(false, |bad, c| bad | (word(c) & mask == mask))
        })
    }
    match dtype {
        Dtype::F32 => scan::<4>(bytes, 0x7f80_0000),
        Dtype::F16 => scan::<2>(bytes, 0x7c00),
        Dtype::BF16 => scan::<2>(bytes, 0x7f80),
        _ => false,
    }
}

/// `has_non_finite` over a large tensor split across the cores (scoped threads: a
/// gpt2-xl scan reads 6 GB, and the kernels' pool may not be sized yet).
fn has_non_finite_parallel(dtype: Dtype, bytes: &[u8]) -> bool {
    const MIN_SPLIT: usize = 16 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if bytes.len() < MIN_SPLIT || threads < 2 {
        return has_non_finite(dtype, bytes);
    }
    // Chunks of whole 4096-byte blocks, so no value straddles two chunks.
    let chunk = bytes.len().div_ceil(threads).next_multiple_of(4096);
    std::thread::scope(|s| {
        let parts: Vec<_> = bytes
            .chunks(chunk)
            .map(|c| s.spawn(move || has_non_finite(dtype, c)))
            .collect();
        parts.into_iter().any(|h| h.join().unwrap_or(true))
    })
}

impl WeightFiles {
    /// Opens the weights of a model folder (single file or shards).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open_files(&crate::folder::weight_paths(dir)?)
    }

    /// Opens the given safetensors files as one checkpoint; a tensor in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let map = MappedFile::open(path)?;
            let st =
                SafeTensors::deserialize(map.bytes()).map_err(|source| Error::Safetensors {
                    path: path.clone(),
                    source,
                })?;
            let base = map.bytes().as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                // a dimension past i64 (possible beside a zero one) has no tensor shape
                let shape: Option<Vec<i64>> = view
                    .shape()
                    .iter()
                    .map(|&d| i64::try_from(d).ok())
                    .collect();
                let shape = shape.ok_or_else(|| Error::ShardIndex {
                    path: path.clone(),
                    reason: format!("tensor `{name}` has shape {:?}, too large", view.shape()),
                })?;
                let entry = Entry {
                    file: i,
                    dtype: view.dtype(),
                    shape,
                    start,
                    end: start + view.data().len(),
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(Error::ShardIndex {
                        path: path.clone(),
                        reason: format!("tensor `{name}` appears in more than one shard"),
                    });
                }
            }
            drop(st);
            files.push(Arc::new(map));
        }
        Ok(Self {
            files,
            in_place: false,
            entries,
            used: Mutex::new(HashSet::new()),
            deferred: HashSet::new(),
        })
    }

    /// Reads `names` without the NaN/inf scan: the caller checks them later, by packing
    /// (which reads every value), by a packed file made from them, or `check_finite_of`.
    pub(crate) fn defer_finite_check(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.deferred.extend(names);
        self
    }

    /// The NaN/inf check of `name` (one `defer_finite_check` left out), now; its pages are
    /// given back after the scan, as packing gives them back.
    pub(crate) fn check_finite_of(&self, name: &str) -> Result<()> {
        let entry = self.entry(name)?;
        let checked = self.scan_finite(name, entry);
        self.release(name);
        checked
    }

    /// Whether tensors read in their stored dtype on the CPU are views of the mapping
    /// (default: copies, which a trainer may update in place without touching the map).
    pub fn in_place(mut self, on: bool) -> Self {
        self.in_place = on;
        self
    }

    /// The mapped files, for a model to hold (their SIGBUS slots and `check`).
    pub fn maps(&self) -> Vec<Arc<MappedFile>> {
        self.files.clone()
    }

    /// An error when a file changed on disk since it was mapped (`MappedFile::check`).
    pub fn check(&self) -> Result<()> {
        self.files.iter().try_for_each(|f| f.check())
    }

    /// The stored bytes, dtype and shape of `name`, checked finite, marked used (packing
    /// reads them straight from the mapping; `release` gives the pages back after).
    pub fn raw(&self, name: &str) -> Result<(&[u8], Dtype, &[i64])> {
        let entry = self.entry(name)?;
        self.check_finite(name, entry)?;
        self.mark_used(name);
        Ok((self.bytes(entry), entry.dtype, &entry.shape))
    }

    /// Gives back the process's pages of `name`'s bytes (see `MappedFile::release`).
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            // In range: see `Entry`.
            self.files[e.file].release(e.start, e.end);
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path_of(name).into(),
            name: name.into(),
        })
    }

    /// `entry`'s bytes as a tensor of `kind` (its stored one): a view of the mapping when
    /// in place and aligned, else a copy. The pages are given back either way: the NaN
    /// scan touched them all, and a model's views are read again only when used (packing
    /// reads each once more, then gives it back), so a whole file is never resident at
    /// once for a model that keeps less than it (bf16 packed from fp32, int8).
    fn read(&self, entry: &Entry, kind: Kind) -> Result<Tensor> {
        let map = &self.files[entry.file];
        let view = match self.in_place {
            true => map.view(entry.start, entry.end, kind, &entry.shape),
            false => None,
        };
        let t = match view {
            Some(v) => v,
            None => Tensor::f_from_data_size(self.bytes(entry), &entry.shape, kind)?,
        };
        map.release(entry.start, entry.end);
        Ok(t)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of `name`, from the header (nothing is read).
    pub fn shape_of(&self, name: &str) -> Option<Vec<i64>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    /// Tensors not read since the files were opened, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = self
            .entries
            .keys()
            .filter(|n| !used.contains(*n))
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn mark_used(&self, name: &str) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if !used.contains(name) {
            used.insert(name.to_string());
        }
    }

    /// Float tensors holding NaN or ±inf, sorted by name (every tensor is scanned).
    pub fn non_finite(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                let bad = has_non_finite(e.dtype, self.bytes(e));
                // In range: see `Entry`.
                self.files[e.file].release(e.start, e.end);
                bad
            })
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        // In range: see `Entry`.
        &self.files[e.file].bytes()[e.start..e.end]
    }

    /// Refuses a float tensor holding NaN or ±inf.
    fn check_finite(&self, name: &str, entry: &Entry) -> Result<()> {
        match self.deferred.contains(name) {
            true => Ok(()),
            false => self.scan_finite(name, entry),
        }
    }

    fn scan_finite(&self, name: &str, entry: &Entry) -> Result<()> {
        if has_non_finite_parallel(entry.dtype, self.bytes(entry)) {
            return Err(Error::NonFinite {
                // In range: see `Entry`.
                path: self.files[entry.file].path().into(),
                name: name.into(),
            });
        }
        Ok(())
    }

    /// The file a tensor lives in, or the first file when it is absent (for messages).
    pub fn path_of(&self, name: &str) -> &Path {
        let i = self.entries.get(name).map_or(0, |e| e.file);
        self.files.get(i).map_or(Path::new(""), |f| f.path())
    }

    /// Dtype names and element counts of every tensor, for `inspect`.
    pub fn dtype_summary(&self) -> Vec<(String, i64)> {
        let mut by: HashMap<String, i64> = HashMap::new();
        for e in self.entries.values() {
            // saturating: a header may pair a zero dimension with huge ones
            let count = e.shape.iter().fold(1i64, |n, &d| n.saturating_mul(d));
            let sum = by.entry(format!("{:?}", e.dtype)).or_default();
            *sum = sum.saturating_add(count);
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort();
        v
    }

    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|m| m.len() as u64).sum()
    }

    /// The float kind a tensor is stored in, if it is present and float.
    pub fn stored_kind(&self, name: &str) -> Option<Kind> {
        self.entries.get(name).and_then(|e| float_kind(e.dtype))
    }

    /// Reads a float tensor, checks its shape, and converts it to `kind` on `device`.
    pub fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let entry = self.entry(name)?;
        let path = self.files[entry.file].path(); // in range: see `Entry`
        if entry.shape != shape {
            return Err(Error::Shape {
                path: path.into(),
                name: name.into(),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        if entry.dtype == Dtype::I8 {
            return Err(Error::ModelFolder {
                path: path.into(),
                reason: format!(
                    "tensor `{name}` is int8, but config.json has no gpt2kit \
                     quantization_config saying how to read it"
                ),
            });
        }
        let file_kind = float_kind(entry.dtype).ok_or_else(|| Error::Dtype {
            path: path.into(),
            name: name.into(),
            dtype: format!("{:?}", entry.dtype),
        })?;
        self.check_finite(name, entry)?;
        self.mark_used(name);
        let t = self.read(entry, file_kind)?;
        Ok(t.f_to_kind(kind)?.f_to_device(device)?)
    }

    /// Reads a tensor in the dtype it is stored in (floats, I8, I32, I64), any shape.
    pub fn tensor_as_stored(&self, name: &str, device: Device) -> Result<Tensor> {
        let entry = self.entry(name)?;
        let kind = stored_kind(entry.dtype).ok_or_else(|| Error::ModelFolder {
            path: self.files[entry.file].path().into(), // in range: see `Entry`
            reason: format!("tensor `{name}` has unsupported dtype {:?}", entry.dtype),
        })?;
        self.check_finite(name, entry)?;
        self.mark_used(name);
        Ok(self.read(entry, kind)?.f_to_device(device)?)
    }
}

/// Where a model's tensors come from: checkpoint files, or tensors already in memory
/// (a model being trained, a freshly initialised one). Names are the checkpoint's.
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;
    /// The tensor `name`, checked to have `shape`, converted to `kind` on `device`.
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor>;
    /// The file holding `name`, for error messages.
    fn path_of(&self, _name: &str) -> PathBuf {
        PathBuf::from("<memory>")
    }
    /// Gives back the memory of `name`'s stored bytes where the source maps them (a
    /// tensor read whole only to copy a part out); nothing otherwise.
    fn release(&self, _name: &str) {}
    /// The tensor `name` in the dtype it is stored in (int8 artifacts), any shape.
    fn tensor_as_stored(&self, name: &str, _device: Device) -> Result<Tensor> {
        Err(Error::MissingTensor {
            path: self.path_of(name),
            name: name.into(),
        })
    }
    /// Every tensor name, when the source can list them without reading (file headers);
    /// empty otherwise, and then the checks against config.json are skipped.
    fn tensor_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// The stored shape of `name`, from a header, if known without reading it.
    fn shape_of(&self, _name: &str) -> Option<Vec<i64>> {
        None
    }
    /// Tensors nothing has read so far (empty when the source does not track it).
    fn unused(&self) -> Vec<String> {
        Vec::new()
    }
    /// The float kind `name` is stored in, when known without reading it.
    fn stored_float_kind(&self, _name: &str) -> Option<Kind> {
        None
    }
}

impl TensorSource for WeightFiles {
    fn contains(&self, name: &str) -> bool {
        WeightFiles::contains(self, name)
    }
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        WeightFiles::tensor(self, name, shape, kind, device)
    }
    fn path_of(&self, name: &str) -> PathBuf {
        WeightFiles::path_of(self, name).into()
    }
    fn release(&self, name: &str) {
        WeightFiles::release(self, name)
    }
    fn tensor_as_stored(&self, name: &str, device: Device) -> Result<Tensor> {
        WeightFiles::tensor_as_stored(self, name, device)
    }
    fn tensor_names(&self) -> Vec<String> {
        self.names().map(str::to_string).collect()
    }
    fn shape_of(&self, name: &str) -> Option<Vec<i64>> {
        WeightFiles::shape_of(self, name)
    }
    fn unused(&self) -> Vec<String> {
        WeightFiles::unused(self)
    }
    fn stored_float_kind(&self, name: &str) -> Option<Kind> {
        self.stored_kind(name)
    }
}

/// In-memory tensors by checkpoint name. `tensor` returns the stored tensor itself (not
/// a copy) when kind and device already match, so a model built from it shares storage
/// with the map: the trainer updates the map's tensors and the model sees the change.
impl TensorSource for HashMap<String, Tensor> {
    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let path = PathBuf::from("<memory>");
        let t = self.get(name).ok_or_else(|| Error::MissingTensor {
            path: path.clone(),
            name: name.into(),
        })?;
        if t.size() != shape {
            return Err(Error::Shape {
                path,
                name: name.into(),
                expected: shape.to_vec(),
                got: t.size(),
            });
        }
        if t.kind() == kind && t.device() == device {
            Ok(t.shallow_clone())
        } else {
            Ok(t.f_to_kind(kind)?.f_to_device(device)?)
        }
    }
    fn tensor_as_stored(&self, name: &str, device: Device) -> Result<Tensor> {
        let t = self.get(name).ok_or_else(|| Error::MissingTensor {
            path: PathBuf::from("<memory>"),
            name: name.into(),
        })?;
        Ok(t.f_to_device(device)?)
    }
}

fn stored_kind(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::I8 => Some(Kind::Int8),
        Dtype::I32 => Some(Kind::Int),
        Dtype::I64 => Some(Kind::Int64),
        other => float_kind(other),
    }
}

fn float_kind(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le16(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn non_finite_bits_per_dtype() {
        let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        assert!(!has_non_finite(
            Dtype::F32,
            &f32s(&[0.0, -1.0, f32::MAX, f32::MIN, 1e-40])
        ));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // Past the first block too, and at the very end.
            let mut v = vec![1.0f32; 5000];
            v[4999] = bad;
            assert!(has_non_finite(Dtype::F32, &f32s(&v)), "{bad}");
        }
        // f16: 0x7bff is the largest finite, 0x7c00 inf, 0xfe00 a NaN.
        assert!(!has_non_finite(
            Dtype::F16,
            &le16(&[0x7bff, 0xfbff, 0x0001])
        ));
        assert!(has_non_finite(Dtype::F16, &le16(&[0x3c00, 0x7c00])));
        assert!(has_non_finite(Dtype::F16, &le16(&[0xfe00])));
        // bf16: 0x7f7f is the largest finite, 0x7f80 inf, 0xffc1 a NaN.
        assert!(!has_non_finite(Dtype::BF16, &le16(&[0x7f7f, 0xff7f])));
        assert!(has_non_finite(Dtype::BF16, &le16(&[0x7f80])));
        assert!(has_non_finite(Dtype::BF16, &le16(&[0x3f80, 0xffc1])));
        // Integers are not floats.
        assert!(!has_non_finite(Dtype::I32, &[0xff; 8]));
    }
}
