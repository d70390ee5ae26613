//! LoRA adapters in peft's format: the format module is the engine's
//! (`infer::adapter`: options, folder reader, initialisation, merge), used here by the
//! trainer, the checkpoint writer and `merge-lora`; and the adapter's layers as the
//! training forward takes them.
pub use infer::adapter::*;
use infer::model::LoraLayer;
use tch::Tensor;

/// The adapter of each layer `lora` adapts, over `tensors` (its own, or the trained
/// leaves in the same order): (block, module, layer).
pub fn lora_layers(lora: &Lora, tensors: &[(String, Tensor)]) -> Vec<(usize, String, LoraLayer)> {
    lora.layers
        .iter()
        .zip(tensors.chunks(2))
        .map(|(&(l, m), ab)| {
            let layer = LoraLayer {
                a: ab[0].1.shallow_clone(),
                b: ab[1].1.shallow_clone(),
                scaling: lora.options.scaling(),
                dropout: lora.options.dropout,
            };
            (l, m.to_string(), layer)
        })
        .collect()
}
