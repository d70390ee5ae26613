//! gpt2kit's engine: GPT-2 on Hugging Face checkpoints, the tokenizer, the KV cache and
//! the decoding loop. Knows nothing of training or of how an artifact was made.
mod attention;
pub mod cache;
mod check;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod device;
pub mod ensemble;
pub mod error;
pub mod faults;
mod files;
pub mod folder;
pub mod genconfig;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod linear;
mod load;
pub mod manifest;
pub mod mapped;
pub mod model;
pub mod options;
pub mod parallel;
pub mod prefix;
pub mod processors;
pub mod quant;
pub mod rng;
pub mod sequence;
pub mod speculative;
pub mod tokenizer;

pub use cache::KvCache;
pub use config::Gpt2Config;
pub use error::{Error, Result};
pub use model::Gpt2;
pub use options::EngineOptions;
pub use tokenizer::{check_vocab, Tokenizer};
