//! The model being trained: f32 leaves that require grad (the masters), the model over
//! them, and a bf16 copy per micro-batch for bf16 runs.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use infer::checkpoint::WeightFiles;
use infer::{Gpt2, Gpt2Config};
use tch::{Device, Kind, Tensor};

use crate::options::input;

/// The trainable model: f32 leaf tensors that require grad, and the model over them.
pub struct Trainable {
    pub config: Gpt2Config,
    pub params: Vec<(String, Tensor)>,
    map: HashMap<String, Tensor>,
    /// The model sharing `params` (f32 runs); bf16 runs build one per micro-batch.
    pub model: Gpt2,
    bf16: bool,
    device: Device,
}

impl Trainable {
    pub fn load(dir: &Path, device: Device, bf16: bool) -> Result<Self> {
        infer::model::check_model_dir(dir)?;
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let files = WeightFiles::open_dir(dir)?;
        let model = Gpt2::from_weights(config.clone(), &files, Kind::Float, &[device])
            .with_context(|| format!("loading {}", dir.display()))?;
        let mut params = model.named_tensors()?;
        for (_, p) in &mut params {
            let _ = p.requires_grad_(true);
        }
        let map = params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        Ok(Self {
            config,
            params,
            map,
            model,
            bf16,
            device,
        })
    }

    /// Replaces the leaves by fresh ones over the same storage, so the next backward
    /// writes new gradient buffers instead of adding into zeroed ones (PyTorch's
    /// `zero_grad(set_to_none=True)`), and the old gradients are freed.
    pub fn fresh_leaves(&mut self) -> Result<()> {
        for (name, p) in &mut self.params {
            let mut q = p.detach();
            let _ = q.requires_grad_(true);
            self.map.insert(name.clone(), q.shallow_clone());
            *p = q;
        }
        if !self.bf16 {
            self.model =
                Gpt2::from_weights(self.config.clone(), &self.map, Kind::Float, &[self.device])?;
        }
        Ok(())
    }

    /// The model to run: the shared f32 one, or a bf16 cast whose gradients flow back
    /// to the f32 masters.
    pub fn compute_model(&self) -> Result<Option<Gpt2>> {
        if !self.bf16 {
            return Ok(None);
        }
        Ok(Some(Gpt2::from_weights(
            self.config.clone(),
            &self.map,
            Kind::BFloat16,
            &[self.device],
        )?))
    }

    pub fn all_finite(&self) -> bool {
        let _g = tch::no_grad_guard();
        self.params
            .iter()
            .all(|(_, p)| p.isfinite().all().int64_value(&[]) == 1)
    }
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
