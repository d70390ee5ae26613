//! An int8 artifact's linear layers as the engine loads them, whole or split for tensor
//! parallelism.
use tch::{Device, Kind, Tensor};

use crate::checkpoint::TensorSource;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::parallel::{local_indices, slice, Shards, Split};
use crate::quant::{
    outlier_name, read_int8_checking, read_outliers, Int8Linear, Method, QuantRows,
};

/// An int8 artifact's linear layers, read as tensor-parallel shards split as the float
/// ones are (`parallel.rs`). A column split takes rows of `q` (output channels), their
/// scales and bias entries, and keeps every input channel, so each shard computes exactly
/// its columns of the unsplit layer. A row split takes columns of `q` (input channels)
/// with the whole per-output scale vector, and each shard's outlier columns are those in
/// its slice. SmoothQuant left nothing per input channel in the layer (it is folded into
/// the LayerNorms, which stay whole).
///
/// int8-dynamic quantizes each shard's input on its own: a row-split shard's per-token
/// scale is the absmax of its slice of the row, not of the whole row, so split logits
/// differ from unsplit ones by activation rounding (each shard's rounding error is at
/// most the unsplit one's), as they would on several GPUs.
pub(crate) struct Int8Layers<'a> {
    files: &'a dyn TensorSource,
    /// `transformer.` or empty.
    prefix: &'a str,
    method: Method,
    /// Of the biases (float in every artifact).
    kind: Kind,
    /// Never empty (`check_layout` refuses no device); `devices[0]` is the main one.
    devices: &'a [Device],
    /// The shards built here (`Shards`).
    shards: &'a Shards,
    /// Whether the weights' -128 check is left to the loader (`Gpt2::check_deferred`),
    /// which packing or a packed file spare a scan of every byte. Layers with outlier
    /// columns are checked here all the same.
    pub(super) defer_min_check: bool,
}

impl<'a> Int8Layers<'a> {
    /// The reader for an artifact of `method`: None when its linear layers are float.
    /// int8-dynamic runs on the CPU only (libtorch's int8 GEMM on CUDA needs more than 16
    /// rows and dimensions that are multiples of 8, which decode steps do not have).
    pub(crate) fn new(
        files: &'a dyn TensorSource,
        prefix: &'a str,
        method: Method,
        kind: Kind,
        (devices, shards): (&'a [Device], &'a Shards),
        defer_min_check: bool,
    ) -> Result<Option<Self>> {
        if !method.is_int8() {
            return Ok(None);
        }
        if let Some(d) = devices.iter().find(|d| **d != Device::Cpu) {
            if method == Method::Int8Dynamic {
                return Err(Error::Input(format!(
                    "int8-dynamic artifacts run on the CPU (libtorch's int8 GEMM), not {d:?}; \
                     int8-weight artifacts run anywhere"
                )));
            }
        }
        Ok(Some(Self {
            files,
            prefix,
            method,
            kind,
            devices,
            shards,
            defer_min_check,
        }))
    }

    /// The Conv1D layer `name` (`n_in` → `n_out`, no prefix) as one `Linear` per shard,
    /// and the bias to add after the shards' sum (row splits over several shards only).
    pub(crate) fn layer(
        &self,
        name: &str,
        [n_in, n_out]: [i64; 2],
        split: Split,
    ) -> Result<(Vec<Linear>, Option<Tensor>)> {
        let full = format!("{}{name}", self.prefix);
        let n = self.shards.n;
        let main = self.devices[0];
        // Split layers are read whole on the CPU, sliced, then moved.
        let staging = if n > 1 { Device::Cpu } else { main };
        let outliers = read_outliers(self.files, &full, n_in, staging)?;
        let rows = read_int8_checking(
            self.files,
            &format!("{full}.weight"),
            [n_in, n_out],
            false,
            staging,
            !self.defer_min_check || n > 1 || outliers.is_some(),
        )?;
        let bias = self
            .files
            .tensor(&format!("{full}.bias"), &[n_out], self.kind, staging)?;
        if outliers.is_some() && self.method != Method::Int8Dynamic {
            return Err(Error::ModelFolder {
                path: self.files.path_of(&full),
                reason: format!(
                    "`{}` belongs to int8-dynamic artifacts, this one is int8-weight",
                    outlier_name(&full)
                ),
            });
        }
        if n == 1 {
            return Ok((vec![self.linear(rows, Some(bias), outliers)], None));
        }
        let parts = self
            .shards
            .local
            .iter()
            .map(|&(r, d)| {
                let (w, b, idx) = match &split {
                    Split::Columns(part) => (
                        QuantRows {
                            q: part(&rows.q, 0, r),
                            scale: part(&rows.scale, 0, r),
                        },
                        Some(part(&bias, 0, r)),
                        outliers.as_ref().map(Tensor::shallow_clone),
                    ),
                    Split::Rows => (
                        QuantRows {
                            q: slice(&rows.q, 1, r, n),
                            scale: rows.scale.shallow_clone(),
                        },
                        None,
                        outliers.as_ref().map(|i| local_indices(i, n_in, r, n)),
                    ),
                };
                let w = QuantRows {
                    q: w.q.to_device(d),
                    scale: w.scale.to_device(d),
                };
                self.linear(w, b.map(|b| b.to_device(d)), idx.map(|i| i.to_device(d)))
            })
            .collect();
        let after = matches!(split, Split::Rows).then(|| bias.to_device(main));
        // Each shard's part is a copy (`part`, `slice`): the whole weight's pages go back.
        self.files.release(&format!("{full}.weight"));
        Ok((parts, after))
    }

    fn linear(&self, w: QuantRows, bias: Option<Tensor>, outliers: Option<Tensor>) -> Linear {
        match self.method {
            Method::Int8Dynamic => Linear::Int8(Box::new(Int8Linear::new(w, bias, outliers))),
            _ => Linear::Int8Weight {
                w,
                bias,
                packed: None,
            },
        }
    }
}
