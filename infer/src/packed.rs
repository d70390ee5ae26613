//! The packed file: a model's linear layers in the decode kernels' layout, kept on disk so
//! that later runs map it instead of packing at every start (issue #23, item 3).
//!
//! One file per model folder and run format (`packed-f32.gpt2kit`, `packed-bf16.gpt2kit`;
//! an int8 artifact's `packed-int8-dynamic-f32.gpt2kit` names its layers' format, then
//! its head's):
//! beside the weights when the folder is writable, else in the user's cache folder under
//! a name derived from the folder's path. Layout: `MAGIC`, the format version, the
//! header's length and SHA-256, the header (JSON: the source key, the run format, the
//! panel layout's version, the file's length, and each layer's name, format, shape and
//! offset), then each layer's panels at a page-aligned offset (for int8-dynamic layers
//! followed by their per-column corrections; scales and biases stay in the weight file). A later run maps the file (privately,
//! read-only use, with `mapped`'s SIGBUS guard) and the kernels read the panels in place.
//!
//! The key names the source without reading all of it (SHA-256 of gpt2-xl's 6.2 GB costs
//! seconds, the time the file is there to save): per weight file its name, size, inode,
//! modification and change times (nanoseconds; the change time cannot be set back by a
//! tool restoring the modification time), its whole safetensors header (every name,
//! dtype, shape and offset), and `SAMPLES` 4 KiB blocks spread over it. A rewrite in
//! place changes the times; what the key cannot see is a same-size rewrite within one
//! tick of the file system's clock (a few ms) of the previous write that touches no
//! sampled block. The key is taken again after packing, and the file is written only
//! when it is unchanged, so a model rewritten while it was being packed is not cached.
//!
//! Written to a temporary name in the same folder, synced, then renamed over the old one:
//! a run killed while writing leaves a temporary file (removed by the next writer once
//! its process is gone), never a partial packed file. A file that is truncated, corrupt
//! (header checksum), of another version or layout, or keyed to other weights is noted
//! on stderr in one line and rebuilt.
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::kernels::{panel_len, side_len, PackedLinear, WeightFormat, LAYOUT};
use crate::mapped::MappedFile;

const MAGIC: &[u8; 8] = b"GPT2KPAK";
/// The file's own format (this header and its placement of the panels).
const VERSION: u32 = 2;
/// Bytes before the header: magic, version, header length, header SHA-256.
const PREAMBLE: usize = 8 + 4 + 4 + 32;
const PAGE: usize = 4096;
/// Sampled 4 KiB blocks per weight file, in the key.
const SAMPLES: u64 = 64;

/// Where packed files are kept, as the caller chose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PackedCache {
    /// Pack at every start (the library's default: nothing is written).
    #[default]
    Off,
    /// Beside the model when its folder is writable, else in `fallback` (the user's cache
    /// folder, which the caller resolves; None: only beside the model).
    Auto { fallback: Option<PathBuf> },
    /// Always in this folder.
    Dir(PathBuf),
}

/// One layer of the file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct Layer {
    pub name: String,
    pub format: String,
    #[serde(rename = "in")]
    pub k: usize,
    #[serde(rename = "out")]
    pub n: usize,
    pub at: usize,
}

#[derive(Serialize, Deserialize)]
struct Header {
    key: String,
    format: String,
    layout: u32,
    len: usize,
    layers: Vec<Layer>,
}

/// The packed file of one model folder and run format, and the source's key.
pub(crate) struct Store {
    /// Where an existing file is looked for, in order; the first is written.
    paths: Vec<PathBuf>,
    /// The run format's name (`format_name`, or two of them joined by `-`).
    format: String,
    key: String,
    maps: Vec<Arc<MappedFile>>,
}

impl Store {
    /// The store for `dir`'s weights (`maps`) run in `format` (the name in the file's),
    /// or None when `cache` is off.
    pub(crate) fn new(
        dir: &Path,
        format: &str,
        cache: &PackedCache,
        maps: &[Arc<MappedFile>],
    ) -> Result<Option<Self>> {
        let name = format!("packed-{format}.gpt2kit");
        let elsewhere = |folder: &Path| {
            let canonical = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            let id = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
            folder.join(format!("{}-{name}", hex(&id[..8])))
        };
        let paths = match cache {
            PackedCache::Off => return Ok(None),
            PackedCache::Dir(d) => vec![elsewhere(d)],
            PackedCache::Auto { fallback } => {
                let mut p = vec![dir.join(&name)];
                p.extend(fallback.as_deref().map(elsewhere));
                if !writable(dir) {
                    p.reverse();
                }
                p
            }
        };
        Ok(Some(Self {
            paths,
            format: format.into(),
            key: key(format, maps)?,
            maps: maps.to_vec(),
        }))
    }

    /// The first valid packed file with this key and the layers `want` (name, format,
    /// in, out),
    /// mapped, with each layer's offset. A file that exists but does not fit is noted
    /// on stderr (and rebuilt by `save`).
    pub(crate) fn open(
        &self,
        want: &[(String, WeightFormat, usize, usize)],
    ) -> Option<(Arc<MappedFile>, Vec<Layer>)> {
        for path in &self.paths {
            if !path.exists() {
                continue;
            }
            match self.read(path, want) {
                Ok(found) => return Some(found),
                Err(why) => eprintln!(
                    "note: packed file {} {why}; packing the model again",
                    path.display()
                ),
            }
        }
        None
    }

    fn read(
        &self,
        path: &Path,
        want: &[(String, WeightFormat, usize, usize)],
    ) -> std::result::Result<(Arc<MappedFile>, Vec<Layer>), String> {
        let map = MappedFile::open(path).map_err(|e| format!("cannot be read ({e})"))?;
        let bytes = map.bytes();
        if bytes.len() < PREAMBLE || &bytes[..8] != MAGIC {
            return Err("is not a packed file (truncated or corrupt)".into());
        }
        // every word read lies in the preamble (at + 4 ≤ PREAMBLE ≤ the length checked
        // above), and a 4-byte slice converts to [u8; 4]
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        if word(8) != VERSION {
            return Err(format!("is of format version {}, not {VERSION}", word(8)));
        }
        let end = PREAMBLE + word(12) as usize;
        if end > bytes.len() || Sha256::digest(&bytes[PREAMBLE..end])[..] != bytes[16..48] {
            return Err("has a corrupt or truncated header".into());
        }
        let header: Header = serde_json::from_slice(&bytes[PREAMBLE..end])
            .map_err(|e| format!("has a corrupt header ({e})"))?;
        if header.layout != LAYOUT || header.format != self.format {
            return Err("holds another panel layout or format".into());
        }
        if header.key != self.key {
            return Err(
                "does not match the weights (changed, replaced or copied since it was packed)"
                    .into(),
            );
        }
        if header.len != bytes.len() {
            return Err(format!(
                "is {} bytes, its header says {}",
                bytes.len(),
                header.len
            ));
        }
        let listed = header
            .layers
            .iter()
            .map(|l| (&l.name, &l.format[..], l.k, l.n));
        let wanted = want.iter().map(|(n, f, k, o)| (n, format_name(*f), *k, *o));
        if !listed.eq(wanted) {
            return Err("holds other layers than this model's".into());
        }
        // Every layer's bytes lie in the file, page-aligned (as `fill` places them).
        let misplaced = header.layers.iter().zip(want).any(|(l, (_, f, _, _))| {
            let end =
                l.at.checked_add(panel_len(*f, l.k, l.n) + side_len(*f, l.n));
            l.at % PAGE != 0 || end.is_none_or(|end| end > bytes.len())
        });
        if misplaced {
            return Err("places a layer off a page or past its end".into());
        }
        Ok((Arc::new(map), header.layers))
    }

    /// Whether another running process is writing this file now (its temporary file).
    pub(crate) fn being_written(&self) -> bool {
        self.paths.iter().any(|path| {
            let (Some(folder), Some(name)) = (path.parent(), path.file_name()) else {
                return false;
            };
            let prefix = format!("{}.tmp.", name.to_string_lossy());
            let Ok(entries) = fs::read_dir(folder) else {
                return false;
            };
            entries.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix(&prefix)
                    .is_some_and(|pid| Path::new("/proc").join(pid).exists())
            })
        })
    }

    /// Writes `layers` (name, packed) to the first path, replacing what was there; when
    /// that folder cannot be written, to the next. Errors are notes on stderr: the model
    /// runs packed in memory either way.
    pub(crate) fn save(&self, layers: &[(String, &PackedLinear)]) {
        match key(&self.format, &self.maps) {
            Ok(k) if k == self.key => {}
            _ => {
                eprintln!(
                    "note: the weights changed while they were packed; no packed file written"
                );
                return;
            }
        }
        let mut why = String::new();
        for path in &self.paths {
            match write(path, &self.key, &self.format, layers) {
                Ok(()) => return,
                Err(e) => why = e.to_string(),
            }
        }
        eprintln!("note: no packed file written ({why}); the model is packed at every start");
    }
}

pub(crate) fn format_name(format: WeightFormat) -> &'static str {
    match format {
        WeightFormat::F32 => "f32",
        WeightFormat::Bf16 => "bf16",
        WeightFormat::Int8 => "int8",
        WeightFormat::Int8Dynamic => "int8-dynamic",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether packed files go into `dir`: a folder whose permission bits allow no one to
/// write is left alone even for a user (root) whom they would not stop.
fn writable(dir: &Path) -> bool {
    fs::metadata(dir).is_ok_and(|m| m.mode() & 0o222 != 0)
}

/// The source's key (see the module's header).
fn key(format: &str, maps: &[Arc<MappedFile>]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "gpt2kit packed v{VERSION} layout {LAYOUT} {format}\n"
    ));
    let mut block = vec![0u8; 4096];
    for m in maps {
        let path = m.path();
        let meta = m.file().metadata().map_err(|e| Error::io(path, e))?;
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        h.update(name);
        for v in [meta.len() as i64, meta.ino() as i64, meta.dev() as i64] {
            h.update(v.to_le_bytes());
        }
        for v in [
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
        ] {
            h.update(v.to_le_bytes());
        }
        let len = meta.len();
        // The safetensors header: its 8-byte length, then the JSON.
        let mut n = [0u8; 8];
        let header_len = match m.file().read_exact_at(&mut n, 0) {
            Ok(()) => u64::from_le_bytes(n).min(len.saturating_sub(8)),
            Err(_) => 0,
        };
        let mut head = vec![0u8; header_len as usize];
        m.file()
            .read_exact_at(&mut head, 8)
            .map_err(|e| Error::io(path, e))?;
        h.update(&head);
        for i in 0..SAMPLES {
            let at = (len / SAMPLES * i) & !4095;
            let got = m
                .file()
                .read_at(&mut block, at)
                .map_err(|e| Error::io(path, e))?;
            h.update(&block[..got]);
        }
    }
    Ok(hex(&h.finalize()))
}

/// Writes the packed file at `path` through a temporary file in its folder.
fn write(path: &Path, key: &str, format: &str, layers: &[(String, &PackedLinear)]) -> Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    remove_abandoned(folder, &file_name);
    let tmp = folder.join(format!("{file_name}.tmp.{}", std::process::id()));
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    let written = fill(&out, key, format, layers)
        .and_then(|()| out.sync_all())
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| Error::io(path, e));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // The rename itself, durable.
    if let Ok(d) = File::open(folder) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The header and every layer's panels, at page-aligned offsets.
fn fill(
    out: &File,
    key: &str,
    format: &str,
    layers: &[(String, &PackedLinear)],
) -> std::io::Result<()> {
    let mut header = Header {
        key: key.into(),
        format: format.into(),
        layout: LAYOUT,
        len: 0,
        layers: Vec::new(),
    };
    // Offsets depend on the header's length, which depends on the offsets' digits: lay
    // the panels out after room for the header, which a second pass confirms.
    let mut room = PAGE;
    loop {
        let mut at = room;
        header.layers.clear();
        for (name, p) in layers {
            let (k, n, f) = (p.in_features(), p.out_features(), p.format());
            header.layers.push(Layer {
                name: name.clone(),
                format: format_name(f).into(),
                k,
                n,
                at,
            });
            at = (at + panel_len(f, k, n) + side_len(f, n)).next_multiple_of(PAGE);
        }
        header.len = at;
        let json = serde_json::to_vec(&header)?;
        if PREAMBLE + json.len() > room {
            room = (PREAMBLE + json.len()).next_multiple_of(PAGE);
            continue;
        }
        let mut pre = Vec::with_capacity(room);
        pre.extend_from_slice(MAGIC);
        pre.extend_from_slice(&VERSION.to_le_bytes());
        pre.extend_from_slice(&(json.len() as u32).to_le_bytes());
        pre.extend_from_slice(&Sha256::digest(&json));
        pre.extend_from_slice(&json);
        out.write_all_at(&pre, 0)?;
        break;
    }
    for (layer, (_, p)) in header.layers.iter().zip(layers) {
        let panels = p.panel_bytes();
        out.write_all_at(panels, layer.at as u64)?;
        out.write_all_at(&p.side_bytes(), (layer.at + panels.len()) as u64)?;
    }
    out.set_len(header.len as u64)
}

/// Removes temporary files of `file_name` left by writers that are gone (killed while
/// writing): their process id no longer runs.
fn remove_abandoned(folder: &Path, file_name: &str) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    let prefix = format!("{file_name}.tmp.");
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let mine = pid == std::process::id().to_string();
        if mine || pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_file(e.path());
        }
    }
}
