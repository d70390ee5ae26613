//! What a path must be before the engine reads it: a regular file (or a link to one).
use std::path::Path;

use crate::error::{Error, Result};

/// Refuses a path that exists but is not a regular file (or a link to one): a FIFO
/// would block the reader forever, a device or folder is not a model file.
pub fn check_regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(());
    }
    Err(Error::ModelFolder {
        path: path.into(),
        reason: format!(
            "not a regular file ({}); refusing to read it",
            file_type_name(&meta.file_type())
        ),
    })
}

/// Whether `path` names something (a file, FIFO, folder, ...), following links.
pub(crate) fn exists(path: &Path) -> bool {
    std::fs::metadata(path).is_ok()
}

fn file_type_name(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a plain file"
    }
}
