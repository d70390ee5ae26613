//! The GGUF container (version 3, ggml's `docs/gguf.md`): magic, version, tensor and
//! key/value counts, the metadata, the tensor infos (name, dims with ne0 first, type,
//! offset), padding to `general.alignment`, then the data section.
//!
//! `parse` checks everything against the file's length before reading it: counts and
//! string lengths the bytes left cannot hold, unknown value or tensor types, dims whose
//! row is not a whole number of blocks, offsets that are misaligned, past the end or
//! overlapping. Errors name the key or tensor. `write` writes beside the target, syncs,
//! and links the file into place only when it is complete.
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::meta::{self, Cursor, Value};
use super::types::GgmlType;
use crate::error::{Error, Result};
use crate::folder::{sync_dir, TempFolder};
use crate::mapped::MappedFile;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// Where one tensor lies in the data section and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's order: ne0 (the row length) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
    /// Bytes of the data, from the dims and the type's block layout.
    pub size: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in torch's order (outermost first): dims reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// Everything before the data section.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Offset of the data section in the file.
    pub data_start: u64,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn align(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

/// Bytes of a tensor of `dims` and type `ty`, or why it has none.
pub fn tensor_size(ty: GgmlType, dims: &[u64]) -> std::result::Result<u64, String> {
    let row = dims.first().copied().unwrap_or(1);
    if row % ty.block_size() as u64 != 0 {
        return Err(format!(
            "its row of {row} weights is not a whole number of {} blocks ({} weights each)",
            ty.name(),
            ty.block_size()
        ));
    }
    let row_bytes = usize::try_from(row)
        .ok()
        .and_then(|n| ty.row_bytes(n))
        .ok_or_else(|| format!("dims {dims:?} overflow"))? as u64;
    dims.iter()
        .skip(1)
        .try_fold(row_bytes, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dims {dims:?} overflow"))
}

/// Parses and checks a whole GGUF file held in `bytes`.
pub fn parse(bytes: &[u8]) -> std::result::Result<Header, String> {
    let mut c = Cursor::new(bytes);
    let magic = c.take(4, &|| "magic".into())?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file (magic {:?}, expected \"GGUF\")",
            String::from_utf8_lossy(magic)
        ));
    }
    let version = c.u32(&|| "version".into())?;
    if !(2..=VERSION).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (versions 2 and 3 are)"
        ));
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;
    // A key/value takes at least 13 bytes, a tensor info at least 24.
    for (n, min, what) in [(n_kv, 13u64, "metadata"), (n_tensors, 24, "tensor")] {
        if n.saturating_mul(min) > c.left() as u64 {
            return Err(format!(
                "{what} count {n} cannot fit in the {} bytes left (truncated or corrupt)",
                c.left()
            ));
        }
    }
    let metadata = read_metadata(&mut c, n_kv)?;
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(format!(
                "key `{ALIGNMENT_KEY}` is {v:?}; it must be a u32 power of two"
            ))
        }
    };
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let t = read_tensor_info(&mut c, i, alignment)?;
        if !names.insert(t.name.clone()) {
            return Err(format!("tensor `{}` appears twice", t.name));
        }
        tensors.push(t);
    }
    let data_start = align(c.pos as u64, alignment);
    check_data(&tensors, data_start, bytes.len() as u64)?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

fn read_metadata(c: &mut Cursor, n: u64) -> std::result::Result<Vec<(String, Value)>, String> {
    let mut out: Vec<(String, Value)> = Vec::with_capacity(n as usize);
    for i in 0..n {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("key `{key}` appears twice"));
        }
        let what = || format!("key `{key}`");
        let t = c.u32(&what)?;
        let v = c.value(t, &what)?;
        out.push((key, v));
    }
    Ok(out)
}

fn read_tensor_info(
    c: &mut Cursor,
    i: u64,
    alignment: u64,
) -> std::result::Result<TensorInfo, String> {
    let name = c.string(&|| format!("tensor info #{i}"))?;
    let what = || format!("tensor `{name}`");
    let n_dims = c.u32(&what)?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(format!(
            "{}: {n_dims} dims (1 to {MAX_DIMS} allowed)",
            what()
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        let d = c.u64(&what)?;
        if d == 0 || d > i64::MAX as u64 {
            return Err(format!("{}: dim {d} is out of range", what()));
        }
        dims.push(d);
    }
    let id = c.u32(&what)?;
    let ty =
        GgmlType::from_id(id).ok_or_else(|| format!("{}: unknown ggml type id {id}", what()))?;
    let offset = c.u64(&what)?;
    if offset % alignment != 0 {
        return Err(format!(
            "{}: offset {offset} is not a multiple of the alignment {alignment}",
            what()
        ));
    }
    let size = tensor_size(ty, &dims).map_err(|e| format!("{}: {e}", what()))?;
    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
        size,
    })
}

/// Every tensor's bytes lie inside the file, none overlapping another.
fn check_data(
    tensors: &[TensorInfo],
    data_start: u64,
    file_len: u64,
) -> std::result::Result<(), String> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    let mut end_prev = 0u64;
    let mut prev = "";
    for t in by_offset {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.size))
            .filter(|&e| e <= file_len)
            .ok_or_else(|| {
                format!(
                    "tensor `{}`: its {} bytes at offset {} run past the end of the file \
                     ({file_len} bytes; truncated or corrupt)",
                    t.name, t.size, t.offset
                )
            })?;
        if t.offset < end_prev {
            return Err(format!(
                "tensor `{}` overlaps tensor `{prev}` (offset {} < {end_prev})",
                t.name, t.offset
            ));
        }
        end_prev = end - data_start;
        prev = &t.name;
    }
    Ok(())
}

/// A GGUF file, memory-mapped and checked. The mapping (`MappedFile`: private, guarded
/// against a file truncated under it) is shared by the layers that run on the file's
/// blocks in place, and lives as long as the last of them.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    map: Arc<MappedFile>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let map = Arc::new(MappedFile::open(path)?);
        let header = parse(map.bytes()).map_err(|reason| Error::ModelFolder {
            path: path.into(),
            reason,
        })?;
        Ok(Self {
            path: path.into(),
            header,
            map,
        })
    }

    /// Where a tensor's bytes lie in the file: [start, end), inside it (`parse` refused
    /// any tensor outside the file).
    pub fn range(&self, t: &TensorInfo) -> std::ops::Range<usize> {
        let start = (self.header.data_start + t.offset) as usize;
        start..start + t.size as usize
    }

    /// The stored bytes of a tensor.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map.bytes()[self.range(t)]
    }

    /// The mapping itself, for layers that keep reading it.
    pub fn map(&self) -> &Arc<MappedFile> {
        &self.map
    }

    pub fn file_bytes(&self) -> u64 {
        self.map.len() as u64
    }
}

/// One tensor to write: its dims (ne0 first), type and encoded bytes.
pub struct TensorData {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
}

/// Header, metadata and tensor infos, padded to the default alignment.
fn header_bytes(metadata: &[(String, Value)], tensors: &[TensorData]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(VERSION.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        meta::write_str(&mut out, k);
        out.extend(v.type_id().to_le_bytes());
        v.write(&mut out);
    }
    let mut offset = 0u64;
    for t in tensors {
        let size = tensor_size(t.ty, &t.dims)
            .map_err(|e| Error::Input(format!("tensor `{}`: {e}", t.name)))?;
        if size != t.bytes.len() as u64 {
            return Err(Error::Input(format!(
                "tensor `{}`: {} bytes, but dims {:?} of type {} take {size}",
                t.name,
                t.bytes.len(),
                t.dims,
                t.ty.name()
            )));
        }
        meta::write_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend((t.ty as u32).to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = align(offset + size, DEFAULT_ALIGNMENT);
    }
    out.resize(align(out.len() as u64, DEFAULT_ALIGNMENT) as usize, 0);
    Ok(out)
}

/// Writes a GGUF file at `path`, which must not exist: into a temporary folder beside
/// it, synced, then linked into place (refused if `path` appeared meanwhile).
pub fn write(path: &Path, metadata: &[(String, Value)], tensors: &[TensorData]) -> Result<()> {
    let head = header_bytes(metadata, tensors)?;
    let tmp = TempFolder::beside(path)?;
    let name = path.file_name().unwrap_or_default();
    let staged = tmp.path().join(name);
    let file = File::create(&staged).map_err(|e| Error::io(&staged, e))?;
    let mut w = BufWriter::new(file);
    let io = |e| Error::io(&staged, e);
    w.write_all(&head).map_err(io)?;
    for t in tensors {
        crate::faults::point();
        w.write_all(&t.bytes).map_err(io)?;
        let pad = align(t.bytes.len() as u64, DEFAULT_ALIGNMENT) as usize - t.bytes.len();
        w.write_all(&vec![0u8; pad]).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    crate::faults::point();
    // A hard link fails if `path` exists: nothing is ever replaced.
    fs::hard_link(&staged, path).map_err(|e| Error::io(path, e))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("gpt2".into()),
            ),
            ("x.count".to_string(), Value::U32(3)),
        ];
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let tensors = vec![
            TensorData {
                name: "a".into(),
                dims: vec![3],
                ty: GgmlType::F32,
                bytes: f32s(&[1.0, 2.0, 3.0]),
            },
            TensorData {
                name: "b".into(),
                dims: vec![2, 2],
                ty: GgmlType::F32,
                bytes: f32s(&[4.0, 5.0, 6.0, 7.0]),
            },
        ];
        let mut out = header_bytes(&meta, &tensors).unwrap();
        for t in &tensors {
            out.extend(&t.bytes);
            out.resize(align(out.len() as u64, 32) as usize, 0);
        }
        out
    }

    #[test]
    fn written_bytes_parse_back() {
        let b = sample();
        let h = parse(&b).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.get("x.count"), Some(&Value::U32(3)));
        assert_eq!(h.tensors[1].dims, [2, 2]);
        assert_eq!(h.tensors[1].offset, 32);
        assert_eq!(h.data_start % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let b = sample();
        // The last tensor's 16 bytes end 16 bytes before the file's padded end.
        for n in 0..b.len() - 16 {
            assert!(parse(&b[..n]).is_err(), "{n} bytes parsed");
        }
    }

    #[test]
    fn corrupt_fields_are_named() {
        let b = sample();
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(parse(&bad).unwrap_err().contains("magic"));
        let mut bad = b.clone();
        bad[4] = 9;
        assert!(parse(&bad).unwrap_err().contains("version 9"));
        let h = parse(&b).unwrap();
        // Type id of tensor `b`: 12 bytes after its name's u64 length, "b", n_dims, dims.
        let pos = find(&b, b"\x01\x00\x00\x00\x00\x00\x00\x00b") + 9 + 4 + 16;
        let mut bad = b.clone();
        bad[pos] = 99;
        let e = parse(&bad).unwrap_err();
        assert!(
            e.contains("tensor `b`") && e.contains("unknown ggml type id 99"),
            "{e}"
        );
        let mut bad = b.clone();
        bad[pos + 4] = 4; // offset 32 → 36: misaligned
        assert!(parse(&bad).unwrap_err().contains("not a multiple"));
        let mut bad = b.clone();
        bad[pos + 4] = 0; // offset 32 → 0: on top of `a`
        assert!(parse(&bad).unwrap_err().contains("overlaps"));
        let mut bad = b.clone();
        bad[pos + 5] = 1; // offset 32 → 288: past the end
        assert!(parse(&bad).unwrap_err().contains("past the end"));
        assert_eq!(h.tensors.len(), 2);
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).position(|w| w == needle).unwrap()
    }
}
