//! Fine-tuning GPT-2 on JSONL data: datasets and packing, the training loop, AdamW and
//! the LR schedule, crash-safe checkpoints and exact resume, eval and TensorBoard logs;
//! GPT-2's random initialisation and byte-level BPE tokenizer training.
pub mod checkpoint;
pub mod checkpointing;
pub mod data;
mod distributed;
pub mod eval;
pub mod events;
pub mod folder;
pub mod fused;
pub mod init;
pub mod lora;
pub mod memory;
pub mod merge;
pub mod metrics;
pub mod optim;
pub mod options;
mod order;
pub mod output;
pub mod pieces;
pub mod resume;
pub mod schedule;
pub mod tokenizer_train;
pub mod trainable;
pub mod trainer;
mod util;
