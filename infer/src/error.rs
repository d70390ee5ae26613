//! The engine's error type: every variant names the file, tensor or input at fault.
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    ModelFolder { path: PathBuf, reason: String },
    #[error("{}: invalid config: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: malformed safetensors file", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: {reason}", path.display())]
    ShardIndex { path: PathBuf, reason: String },
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?}", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("{}: tensor `{name}` has dtype {dtype}; supported: F32, F16, BF16", path.display())]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    /// A tensor holding NaN or ±inf: loading it would run, and print NaN.
    #[error("{}: tensor `{name}` holds NaN or infinite values", path.display())]
    NonFinite { path: PathBuf, name: String },
    /// Tensors of the weight files that no part of the model reads.
    #[error("{}: {reason}", path.display())]
    UnusedTensors { path: PathBuf, reason: String },
    /// A file of a folder this tool wrote no longer matches the folder's manifest.
    #[error("{}: {reason}", path.display())]
    Integrity { path: PathBuf, reason: String },
    #[error("{0}")]
    Input(String),
    /// libtorch's message, first line only: the C++ backtrace after it is not for users
    /// (and not chained as a source, so `{:#}` does not print it either).
    #[error("libtorch: {}", first_line(.0))]
    Torch(tch::TchError),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e)
    }
}

/// The first line of a libtorch error (the rest is a C++ backtrace).
pub fn first_line(e: &tch::TchError) -> String {
    let text = e.to_string();
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_errors_show_their_first_line_only() {
        let e = Error::from(tch::TchError::Torch(
            "index out of range in self\nException raised from operator() at x.cpp:1\n\
             frame #0: c10::Error::Error() + 0x9d"
                .into(),
        ));
        let text = e.to_string();
        assert!(text.starts_with("libtorch: "), "{text}");
        assert!(text.ends_with("index out of range in self"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        // Not chained either: `{:#}` printers walk sources.
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn sources_are_chained_not_repeated() {
        let e = Error::Safetensors {
            path: "m/model.safetensors".into(),
            source: safetensors::SafeTensorError::MetadataIncompleteBuffer,
        };
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(!e.to_string().contains(&source), "{e}");
        let e = Error::io("m/config.json", std::io::Error::other("boom"));
        assert_eq!(e.to_string(), "m/config.json");
        assert_eq!(std::error::Error::source(&e).unwrap().to_string(), "boom");
    }
}
