//! LoRA adapters in peft's format: the format module is the engine's
//! (`infer::adapter`: options, folder reader, initialisation, merge), used here by the
//! trainer, the checkpoint writer and `merge-lora`.
pub use infer::adapter::*;
