//! Calibration: what a linear layer's inputs look like.
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

/// Running per-input-channel max |x| of a linear layer's inputs, for calibration.
pub struct InputObserver {
    pub max_abs: Mutex<Option<Tensor>>,
}

impl InputObserver {
    pub fn new() -> Self {
        Self {
            max_abs: Mutex::new(None),
        }
    }

    pub fn observe(&self, x: &Tensor) {
        let n = *x.size().last().expect("input has a feature dimension");
        let m = x
            .detach()
            .reshape([-1, n])
            .abs()
            .amax([0], false)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let mut guard = self.max_abs.lock().unwrap_or_else(|p| p.into_inner());
        *guard = Some(match guard.take() {
            Some(prev) => prev.maximum(&m),
            None => m,
        });
    }
}

impl Default for InputObserver {
    fn default() -> Self {
        Self::new()
    }
}
