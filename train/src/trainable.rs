//! The model being trained: f32 leaves that require grad (the masters) and the model over
//! them, run under bf16 autocast in bf16 runs. A LoRA run's leaves are the
//! adapter's tensors; its base model is frozen (no gradients, no optimizer state).
use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use infer::checkpoint::WeightFiles;
use infer::model::{Adapters, LoraLayer};
use infer::{Gpt2, Gpt2Config};
use tch::{Device, Kind, Tensor};

use crate::lora::{Lora, LoraOptions};
use crate::options::input;

/// The trainable model: f32 leaf tensors that require grad, and the model over them.
pub struct Trainable {
    pub config: Gpt2Config,
    pub params: Vec<(String, Tensor)>,
    map: HashMap<String, Tensor>,
    /// The model sharing `params` (a LoRA run: the frozen base).
    pub model: Gpt2,
    /// Forward passes run under bf16 autocast (`autocast`).
    bf16: bool,
    device: Device,
    /// LoRA runs: the adapted layers and the options; `params` are the adapter's
    /// tensors, by peft's names.
    pub lora: Option<Lora>,
}

impl Trainable {
    pub fn load(dir: &Path, device: Device, bf16: bool) -> Result<Self> {
        let (config, model, params) = open(dir, device, Kind::Float)?;
        let map = params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        Ok(Self::assemble(
            (config, model),
            params,
            map,
            (bf16, device),
            None,
        ))
    }

    /// The trainable over `params` (made leaves that require grad here).
    fn assemble(
        (config, model): (Gpt2Config, Gpt2),
        mut params: Vec<(String, Tensor)>,
        map: HashMap<String, Tensor>,
        (bf16, device): (bool, Device),
        lora: Option<Lora>,
    ) -> Self {
        for (_, p) in &mut params {
            let _ = p.requires_grad_(true);
        }
        Self {
            config,
            params,
            map,
            model,
            bf16,
            device,
            lora,
        }
    }

    /// A LoRA run: the frozen base model of `base`, held in `base_kind` (f32 or bf16:
    /// then the whole forward runs in bf16, the adapter cast to it), and the adapter of
    /// `adapter` (a checkpoint resumed from, whose adapter_config.json must agree with
    /// `options`) or a fresh one drawn with `seed`.
    pub fn load_lora(
        base: &Path,
        adapter: Option<&Path>,
        options: &LoraOptions,
        seed: u64,
        device: Device,
        (bf16, base_kind): (bool, Kind),
    ) -> Result<Self> {
        let (config, model, tensors) = open(base, device, base_kind)?;
        // A bf16 base runs in bf16 as it is: no autocast.
        let bf16 = bf16 && base_kind == Kind::Float;
        let map = tensors.into_iter().collect();
        let mut lora = match adapter {
            Some(dir) => {
                let saved = Lora::read(dir, &config, device)?;
                if saved.options != *options {
                    return Err(input(format!(
                        "--resume {}: the checkpoint's adapter has r {}, lora_alpha {}, \
                         lora_dropout {}, target_modules {:?}; this run asks for {}, {}, {}, \
                         {:?} (--lora-r, --lora-alpha, --lora-dropout, --lora-target-modules)",
                        dir.display(),
                        saved.options.r,
                        saved.options.alpha,
                        saved.options.dropout,
                        saved.options.target_modules,
                        options.r,
                        options.alpha,
                        options.dropout,
                        options.target_modules
                    )));
                }
                saved
            }
            None => Lora::init(options, &config, seed, device)?,
        };
        let params = std::mem::take(&mut lora.tensors);
        Ok(Self::assemble(
            (config, model),
            params,
            map,
            (bf16, device),
            Some(lora),
        ))
    }

    /// Replaces the leaves by fresh ones over the same storage, so the next backward
    /// writes new gradient buffers instead of adding into zeroed ones (PyTorch's
    /// `zero_grad(set_to_none=True)`), and the old gradients are freed.
    pub fn fresh_leaves(&mut self) -> Result<()> {
        for (name, p) in &mut self.params {
            let mut q = p.detach();
            let _ = q.requires_grad_(true);
            if self.lora.is_none() {
                self.map.insert(name.clone(), q.shallow_clone());
            }
            *p = q;
        }
        if self.lora.is_none() {
            self.model =
                Gpt2::from_weights(self.config.clone(), &self.map, Kind::Float, &[self.device])?;
        }
        Ok(())
    }

    /// bf16 runs: the device whose autocast the forward passes run under (as
    /// transformers' `bf16=True` runs them under `torch.autocast`): products and
    /// attention in bf16 over the f32 masters, each weight cast once per pass, layer
    /// norms, softmax and the loss in f32, the gradients flowing back to the masters.
    pub fn autocast(&self) -> Option<Device> {
        self.bf16.then_some(self.device)
    }

    /// The adapter's layers over the current leaves (None for full fine-tuning).
    pub fn lora_layers(&self) -> Option<Vec<(usize, String, LoraLayer)>> {
        Some(crate::lora::lora_layers(self.lora.as_ref()?, &self.params))
    }

    /// Logits (B, T, V) of `model` with the adapter
    /// on its layers; `train` applies the adapter's dropout.
    pub fn logits(&self, model: &Gpt2, ids: &Tensor, train: bool) -> Result<Tensor> {
        let Some(layers) = self.lora_layers() else {
            return Ok(model.forward_train(ids));
        };
        let adapters = adapters(model, &layers, train)?;
        Ok(model.forward_adapted(ids, Some(&adapters)))
    }

    /// What a LoRA run's folders say instead of a model: the options and the base model
    /// (`base_model_name_or_path`).
    pub fn adapter_folder(&self, base: &Path) -> Option<(&LoraOptions, String)> {
        let lora = self.lora.as_ref()?;
        Some((&lora.options, base.display().to_string()))
    }

    pub fn all_finite(&self) -> bool {
        let _g = tch::no_grad_guard();
        self.params
            .iter()
            .all(|(_, p)| p.isfinite().all().int64_value(&[]) == 1)
    }
}

/// The model of the folder `dir` in `kind`, with its config and its tensors by name.
fn open(
    dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<(Gpt2Config, Gpt2, Vec<(String, Tensor)>)> {
    infer::model::check_model_dir(dir)?;
    let config = Gpt2Config::from_file(&dir.join("config.json"))?;
    let files = WeightFiles::open_dir(dir)?;
    let model = Gpt2::from_weights(config.clone(), &files, kind, &[device])
        .with_context(|| format!("loading {}", dir.display()))?;
    let tensors = model.named_tensors()?;
    Ok((config, model, tensors))
}

/// The adapters of `layers` tied to `model`'s layers.
pub fn adapters<'a>(
    model: &Gpt2,
    layers: &'a [(usize, String, LoraLayer)],
    train: bool,
) -> Result<Adapters<'a>> {
    let refs: Vec<(usize, String, &LoraLayer)> =
        layers.iter().map(|(l, m, a)| (*l, m.clone(), a)).collect();
    Adapters::new(model, &refs, train)
        .map_err(|name| anyhow::anyhow!("the model has no layer {name} to adapt"))
}

/// Whether bf16 training runs on `device`: a bf16 matmul must run there.
pub fn check_bf16(device: Device) -> Result<()> {
    let t = Tensor::ones([4, 4], (Kind::BFloat16, device));
    match t.f_matmul(&t) {
        Ok(_) => Ok(()),
        Err(e) => Err(input(format!(
            "--dtype bf16 is not supported on {device:?}: {}",
            first_line(&e)
        ))),
    }
}

/// libtorch errors carry a C++ backtrace after their first line.
pub fn first_line(e: &tch::TchError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
