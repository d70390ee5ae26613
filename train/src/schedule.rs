//! Learning-rate schedules as transformers' `get_scheduler` builds them (LambdaLR over
//! the optimizer step index): constant (with warmup when warmup steps are given),
//! linear and cosine (half a cycle) decay after a linear warmup.
use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Constant,
    Linear,
    Cosine,
}

impl SchedulerKind {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "constant" | "constant_with_warmup" => Self::Constant,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub base_lr: f64,
    pub warmup_steps: i64,
    pub total_steps: i64,
}

impl Schedule {
    /// Warmup steps from a ratio of the total, rounded up as transformers'
    /// `get_warmup_steps` does.
    pub fn warmup_from_ratio(ratio: f64, total_steps: i64) -> i64 {
        (ratio * total_steps as f64).ceil() as i64
    }

    /// The multiplier of `base_lr` for the update with 0-based index `step`.
    pub fn factor(&self, step: i64) -> f64 {
        let (s, w, n) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            SchedulerKind::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    pub fn lr(&self, step: i64) -> f64 {
        self.base_lr * self.factor(step)
    }
}
