//! Which paths a loaded model runs: its linears repacked for the CPU decode kernels,
//! fused decode steps over them (`fused::Plan`), and calibration observers on every
//! linear's inputs. The forward itself is in `model`.
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::{Gpt2, LayerNorm, Part, Plan};
use crate::cache::{KvCache, Span};
use crate::decode::Norm;
use crate::error::{Error, Result};
use crate::kernels;
use crate::linear::Linear;
use crate::mapped::MappedFile;
use crate::quant::QuantizationConfig;

impl Gpt2 {
    /// Repacks every linear layer and the head for the CPU decode kernels: a one-device
    /// CPU model in f32 or bf16 (f16 and GPUs stay on libtorch).
    pub fn pack_for_cpu_decode(&mut self) -> Result<()> {
        self.pack_with(&[])
    }

    /// Packs at load: weights viewed in the model's mapped files give their pages back as
    /// they are packed, so the packed layout is the one copy in memory (only at load: a
    /// weight written in place since, a merged adapter, would revert to the file).
    pub(super) fn pack_with(&mut self, files: &[Arc<MappedFile>]) -> Result<()> {
        let packable = matches!(self.kind, Kind::Float | Kind::BFloat16);
        let packed = matches!(
            self.head,
            Linear::Rows {
                packed: Some(_),
                ..
            }
        );
        if self.devices != [Device::Cpu] || !packable || packed {
            return Ok(());
        }
        let take = |l: &mut Linear| {
            std::mem::replace(
                l,
                Linear::Float {
                    weight: Tensor::new(),
                    bias: None,
                },
            )
        };
        let kind = self.kind;
        for (_, _, l) in self.linears_mut() {
            *l = take(l).pack(kind, files)?;
        }
        self.head = take(&mut self.head).pack(kind, files)?;
        self.set_fused_decode(true);
        Ok(())
    }

    /// Turns fused CPU decode steps (`fused`) on or off; returns whether they are on.
    /// They need the packed copies (`pack_for_cpu_decode`, which turns them on) on one
    /// CPU device, and no tensor-parallel split. Off, decode steps run libtorch between
    /// the kernels. On, the layer norms' f32 copies are made afresh.
    pub fn set_fused_decode(&mut self, on: bool) -> bool {
        self.fused = None;
        let dtype = matches!(self.kind, Kind::Float | Kind::BFloat16);
        if on && dtype && self.devices == [Device::Cpu] {
            let host = |ln: &mut LayerNorm| ln.host = Norm::new(&ln.weight, &ln.bias, ln.eps);
            for (_, _, part) in self.parts_mut() {
                if let Part::Norm(ln) = part {
                    host(ln);
                }
            }
            host(&mut self.ln_f);
            self.fused = Plan::new(self);
        }
        self.fused.is_some()
    }

    /// Decode steps through the fixed-shape step (`graphed`): on CUDA captured once per
    /// batch and width as a CUDA graph and replayed; elsewhere run as it is (the same
    /// computation, for comparison). Off: the libtorch or fused decode paths.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.fixed_decode = on;
    }

    /// Whether decode steps run fused (`set_fused_decode`).
    pub fn fuses_decode(&self) -> bool {
        self.fused.is_some()
    }

    /// The artifact's `quantization_config` (None for a float model folder).
    pub fn quantization(&self) -> Option<&QuantizationConfig> {
        self.quantization.as_ref()
    }

    /// Starts recording the per-input-channel max |x| of every linear layer's inputs
    /// (calibration for SmoothQuant and outlier columns); read with `observed_input_max`.
    /// Decode steps then run on libtorch, through the observers (observed layers have no
    /// fused plan).
    pub fn observe_linear_inputs(&mut self) -> Result<()> {
        if self.devices.len() != 1 {
            return Err(Error::Input("calibration needs an unsharded model".into()));
        }
        for (_, _, l) in self.linears_mut() {
            let taken = std::mem::replace(
                l,
                Linear::Float {
                    weight: Tensor::new(),
                    bias: None,
                },
            );
            *l = taken.observed();
        }
        let fused = self.fused.is_some();
        self.set_fused_decode(fused);
        Ok(())
    }

    /// Per layer (checkpoint name without `.weight`), the max |x| of each input channel
    /// over every input seen since `observe_linear_inputs`: (in,) f32 on the CPU.
    pub fn observed_input_max(&self) -> Vec<(String, Tensor)> {
        self.named_linears()
            .into_iter()
            .filter_map(|(n, l)| l.observed_max().map(|m| (n, m)))
            .collect()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether a decode step of `rows` rows runs its matrix products on the CPU decode
    /// kernels (their own thread pool) rather than libtorch.
    pub fn decodes_on_kernels(&self, rows: usize) -> bool {
        self.head.runs_on_pool(rows)
            && rows <= kernels::STEP_MAX_ROWS
            && self.blocks_on_kernels(rows)
    }

    /// Whether a pass over `rows` prompt tokens (all rows of a batch together) runs the
    /// blocks' matrix products on the CPU decode kernels.
    pub fn prefills_on_kernels(&self, rows: usize) -> bool {
        self.blocks_on_kernels(rows)
    }

    fn blocks_on_kernels(&self, rows: usize) -> bool {
        self.linears().all(|(_, _, l)| l.runs_on_pool(rows))
    }

    /// Logits of one hidden row per sequence (R, E) → (R, V), in chunks that the head's
    /// decode kernel takes whole, so that a row's logits do not depend on how many rows
    /// are scored beside it (past the kernel's rows libtorch would round differently).
    pub(crate) fn decode_logits(&self, hidden: &Tensor) -> Tensor {
        let chunk = self.head.kernel_rows();
        let rows = hidden.size()[0] as usize;
        if rows <= chunk {
            return self.logits(hidden);
        }
        let parts: Vec<Tensor> = (0..rows)
            .step_by(chunk)
            .map(|s| self.logits(&hidden.narrow(0, s as i64, chunk.min(rows - s) as i64)))
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// A decode step on the fused plan, in chunks of at most `kernels::STEP_MAX_ROWS` rows (the
    /// kernels read the weights once per chunk in any case), or `None` when it cannot
    /// run fused (then nothing was written).
    pub(super) fn fused_step(&self, x: &Tensor, cache: &KvCache, span: &Span) -> Option<Tensor> {
        let plan = self.fused.as_ref()?;
        let tokens = span.rows.len() * span.t as usize;
        if span.t > 1 && tokens <= kernels::MAX_ROWS {
            // A short prompt piece: each token a row of its own, at its own slot of its
            // sequence's cache row. The step writes every row's key and value before any
            // row attends, so token j sees tokens ..= j of its sequence: the piece
            // computes what feeding its tokens one a step computes, bit for bit (the
            // engine feeds a short prompt beside running sequences that way).
            let (r, t, e) = x.size3().ok()?;
            let flat = Span {
                rows: span
                    .rows
                    .iter()
                    .flat_map(|&row| std::iter::repeat_n(row, t as usize))
                    .collect(),
                starts: span.starts.iter().flat_map(|&s| s..s + t).collect(),
                t: 1,
            };
            let h = plan.step(self, &x.reshape([r * t, 1, e]), cache, &flat)?;
            return Some(h.view([r, t, e]));
        }
        if span.rows.len() <= kernels::STEP_MAX_ROWS {
            return plan.step(self, x, cache, span);
        }
        let mut out = Vec::new();
        for (i, rows) in span.rows.chunks(kernels::STEP_MAX_ROWS).enumerate() {
            let at = i * kernels::STEP_MAX_ROWS;
            let part = Span {
                rows: rows.to_vec(),
                starts: span.starts[at..at + rows.len()].to_vec(),
                t: span.t,
            };
            let x = x.narrow(0, at as i64, rows.len() as i64);
            // Every chunk meets the same checks, so either the first fails or none does.
            out.push(plan.step(self, &x, cache, &part)?);
        }
        Some(Tensor::cat(&out, 0))
    }
}
