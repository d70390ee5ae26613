//! A folder's manifest, `gpt2kit-manifest.json`: every file's size and SHA-256, written
//! last into each folder this tool writes (by `folder::TempFolder` just before the
//! rename that puts the folder in place, so a folder holding a manifest is complete),
//! and checked before a checkpoint is trusted (`train --resume`) or on request
//! (`gpt2kit inspect --verify`). A folder written before manifests existed has none: it
//! is reported as unverified and still loads. Files added to a folder after it was
//! written (a user's notes) are not the folder's and are not judged.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const MANIFEST_FILE: &str = "gpt2kit-manifest.json";
/// The manifest's `format` value; another format is refused, not guessed at.
pub const FORMAT: &str = "gpt2kit-manifest/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// Paths relative to the folder (`/`-separated), in name order.
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// What `verify` found in a folder that passed.
#[derive(Debug, Clone, PartialEq)]
pub enum Verified {
    /// Every listed file is present with its recorded size and SHA-256.
    Complete { files: usize, bytes: u64 },
    /// No manifest: a folder from before manifests existed, or not written by this tool.
    NoManifest,
}

/// Size and lower-case hex SHA-256 of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    sha256_files(&[path])
}

/// Total size and lower-case hex SHA-256 of the bytes of `paths`, in order.
pub fn sha256_files<P: AsRef<Path>>(paths: &[P]) -> Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    for path in paths {
        let path = path.as_ref();
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        loop {
            let got = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if got == 0 {
                break;
            }
            h.update(&buf[..got]); // `read` returns at most `buf.len()`
            n += got as u64;
        }
    }
    Ok((n, format!("{:x}", h.finalize())))
}

/// The manifest of every regular file under `dir` (the manifest itself aside).
pub fn build(dir: &Path) -> Result<Manifest> {
    let mut files = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        for e in fs::read_dir(&here).map_err(|e| Error::io(&here, e))? {
            let e = e.map_err(|e| Error::io(&here, e))?;
            let rel = rel.join(e.file_name());
            let t = e.file_type().map_err(|err| Error::io(e.path(), err))?;
            if t.is_dir() {
                stack.push(rel);
            } else if t.is_file() && rel != Path::new(MANIFEST_FILE) {
                let (bytes, sha256) = sha256_file(&e.path())?;
                files.insert(rel_name(&rel), FileEntry { bytes, sha256 });
            }
        }
    }
    Ok(Manifest {
        format: FORMAT.into(),
        files,
    })
}

fn rel_name(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Writes (and syncs) the manifest of `dir`'s files into it.
pub fn write(dir: &Path) -> Result<()> {
    crate::faults::point();
    let m = build(dir)?;
    let text = serde_json::to_string_pretty(&m)
        .map_err(|e| Error::Input(format!("{MANIFEST_FILE}: {e}")))?;
    let path = dir.join(MANIFEST_FILE);
    let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(&path, e))
}

/// Parses a manifest's text, refusing entries that could name a file outside the
/// folder (absolute paths, `..`) or that are not a SHA-256 in hex. `path` names errors.
pub fn parse(path: &Path, text: &str) -> Result<Manifest> {
    let bad = |reason: String| Error::Integrity {
        path: path.into(),
        reason,
    };
    let m: Manifest =
        serde_json::from_str(text).map_err(|e| bad(format!("not a manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(format!(
            "format {:?}; this version reads {FORMAT:?}",
            m.format
        )));
    }
    for (name, entry) in &m.files {
        let inside = !name.is_empty()
            && Path::new(name)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !inside || name.contains('\\') {
            return Err(bad(format!("{name:?} is not a file inside the folder")));
        }
        let hex_ok = entry.sha256.len() == 64
            && entry
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(bad(format!(
                "`{name}`: sha256 {:?} is not one",
                entry.sha256
            )));
        }
    }
    Ok(m)
}

/// Checks every file `dir`'s manifest lists: present, a regular file, its size and its
/// SHA-256 as recorded. The error names the first file that fails and why.
pub fn verify(dir: &Path) -> Result<Verified> {
    let path = dir.join(MANIFEST_FILE);
    let meta = match fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !dir.is_dir() {
                return Err(Error::ModelFolder {
                    path: dir.into(),
                    reason: "not a folder".into(),
                });
            }
            return Ok(Verified::NoManifest);
        }
        Err(e) => return Err(Error::io(&path, e)),
        Ok(m) => m,
    };
    if !meta.is_file() {
        return Err(Error::Integrity {
            path,
            reason: "not a regular file".into(),
        });
    }
    let text = fs::read_to_string(&path).map_err(|e| Error::Integrity {
        path: path.clone(),
        reason: format!("unreadable: {e}"),
    })?;
    let m = parse(&path, &text)?;
    let mut total = 0u64;
    for (name, want) in &m.files {
        let file = dir.join(name);
        let fail = |reason: String| Error::Integrity {
            path: file.clone(),
            reason,
        };
        let meta = match fs::symlink_metadata(&file) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(format!("missing (listed in {MANIFEST_FILE})")))
            }
            Err(e) => return Err(fail(format!("unreadable: {e}"))),
        };
        if !meta.is_file() {
            return Err(fail("not a regular file".into()));
        }
        if meta.len() != want.bytes {
            return Err(fail(format!(
                "{} bytes, {MANIFEST_FILE} says {} (truncated or rewritten)",
                meta.len(),
                want.bytes
            )));
        }
        let (_, got) = sha256_file(&file)?;
        if got != want.sha256 {
            return Err(fail(format!(
                "SHA-256 {got} differs from {MANIFEST_FILE}'s {} (the bytes changed since \
                 it was written)",
                want.sha256
            )));
        }
        total += want.bytes;
    }
    Ok(Verified::Complete {
        files: m.files.len(),
        bytes: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gpt2kit-manifest-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        dir
    }

    #[test]
    fn a_written_folder_verifies_and_any_changed_file_is_named() {
        let dir = scratch("verify");
        fs::write(dir.join("a.bin"), b"hello").unwrap();
        fs::write(dir.join("sub/b.txt"), b"world!").unwrap();
        assert_eq!(verify(&dir).unwrap(), Verified::NoManifest);
        write(&dir).unwrap();
        let m = parse(&dir, &fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
        // SHA-256("hello"), as `sha256sum` prints it.
        assert_eq!(
            m.files["a.bin"].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            verify(&dir).unwrap(),
            Verified::Complete {
                files: 2,
                bytes: 11
            }
        );
        // A file added later is not the folder's.
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        assert!(verify(&dir).is_ok());
        // Same size, other bytes.
        fs::write(dir.join("sub/b.txt"), b"world?").unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(
            err.contains("sub/b.txt") && err.contains("SHA-256"),
            "{err}"
        );
        fs::write(dir.join("sub/b.txt"), b"world").unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("5 bytes") && err.contains("says 6"), "{err}");
        fs::remove_file(dir.join("sub/b.txt")).unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("sub/b.txt: missing"), "{err}");
        fs::write(dir.join(MANIFEST_FILE), b"{\"format\": 1").unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(
            err.contains(MANIFEST_FILE) && err.contains("not a manifest"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_naming_files_outside_the_folder_are_refused() {
        let p = Path::new("m").join(MANIFEST_FILE);
        let sha = "0".repeat(64);
        for name in ["../x", "/etc/passwd", "", "a/../../b", "a\\b", "./a"] {
            let text = serde_json::json!({"format": FORMAT,
                "files": {name: {"bytes": 1, "sha256": sha}}})
            .to_string();
            let err = parse(&p, &text).unwrap_err().to_string();
            assert!(err.contains("is not a file inside"), "{name}: {err}");
        }
        let text = serde_json::json!({"format": FORMAT,
            "files": {"a": {"bytes": 1, "sha256": "XYZ"}}})
        .to_string();
        assert!(parse(&p, &text)
            .unwrap_err()
            .to_string()
            .contains("is not one"));
        let text = serde_json::json!({"format": "other", "files": {}}).to_string();
        assert!(parse(&p, &text)
            .unwrap_err()
            .to_string()
            .contains("this version reads"));
    }
}
