//! Fine-tuning GPT-2 on JSONL data: datasets and packing, the training loop, AdamW and
//! the LR schedule, crash-safe checkpoints and exact resume, eval and TensorBoard logs.
//!
//! Not built yet: the crate exists so that the dependency direction
//! `gpt2kit → train → infer` is fixed from the start.
