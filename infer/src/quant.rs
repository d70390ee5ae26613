//! The int8 artifact format that `gpt2kit quantize` writes and the engine runs, and the
//! int8 linear layers that run it.
//!
//! Format (documented in the README's "Artifact format"): `config.json` carries a
//! `quantization_config` with `quant_method: "gpt2kit"`; in `model.safetensors`, every
//! quantized weight `<name>.weight` is I8 with the float tensor's shape and
//! `<name>.weight_scale` is F32, one scale per output channel: (out,) for a Conv1D
//! weight (in, out), (V,) for `wte` (V, E), whose rows are the tied head's output
//! channels. Symmetric: w ≈ q · scale, q in [-127, 127]. With outlier columns
//! (LLM.int8(), Dettmers et al. 2022, arXiv 2208.07339) `<name>.outlier_columns` (I64,
//! (k,)) lists the input channels that bypass activation quantization: their products
//! run in float against the dequantized weight rows.
//!
//! `int8-dynamic` (W8A8) quantizes each token's activations on the fly (one scale per
//! row, absmax / 127) and multiplies on libtorch's int8 GEMM (`_int_mm`, int32
//! accumulation). SmoothQuant's smoothing (Xiao et al. 2022, arXiv 2211.10438) needs
//! nothing at run time: `quantize` folds it into the LayerNorm before `c_attn`/`c_fc`.
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::TensorSource;
use crate::error::{Error, Result};
use crate::kernels::{PackedLinear, ThreadPool, MAX_ROWS};
use crate::linear::Linear;
use crate::parallel::{local_indices, slice, Split};

/// Below this many weight bytes per task, splitting across the pool costs more than it
/// gains (each task is one `_int_mm` call, with its own fixed cost).
const MIN_TASK_BYTES: i64 = 256 << 10;
/// Tasks per pool thread, so a thread the OS delays leaves its share to the others.
const TASKS_PER_THREAD: i64 = 2;

/// `quantization_config.quant_method` of gpt2kit artifacts.
pub const QUANT_METHOD: &str = "gpt2kit";
/// Suffix of the per-output-channel scale beside an int8 `<name>.weight`.
pub const SCALE_SUFFIX: &str = "_scale";
/// `<layer>.outlier_columns`: input channels kept in float (int8-dynamic).
pub const OUTLIER_SUFFIX: &str = "outlier_columns";
pub const GRANULARITY: &str = "per-output-channel";

/// How an artifact's weights are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// Int8 weights, float activations.
    #[serde(rename = "int8-weight")]
    Int8Weight,
    /// Int8 weights, per-token int8 activations, int8 GEMM.
    #[serde(rename = "int8-dynamic")]
    Int8Dynamic,
    /// Float weights (pruning or layer dropping only).
    #[serde(rename = "none")]
    None,
}

impl Method {
    pub const NAMES: &'static [&'static str] = &["int8-weight", "int8-dynamic", "none"];

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "int8-weight" => Self::Int8Weight,
            "int8-dynamic" => Self::Int8Dynamic,
            "none" => Self::None,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Int8Weight => "int8-weight",
            Self::Int8Dynamic => "int8-dynamic",
            Self::None => "none",
        }
    }

    pub fn is_int8(self) -> bool {
        self != Self::None
    }
}

/// `config.json`'s `quantization_config` for a gpt2kit artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    pub method: Method,
    /// 8 for the int8 methods, the float width otherwise.
    pub bits: u32,
    pub granularity: String,
    /// Whether `wte` (and so the tied head) is int8.
    pub quantize_embeddings: bool,
    /// Zeros over all pruned linear weights (0 when not pruned).
    #[serde(default)]
    pub sparsity: f64,
    #[serde(default)]
    pub prune: Option<serde_json::Value>,
    /// Source layer indices dropped, and kept (renumbered 0.. in this artifact).
    #[serde(default)]
    pub dropped_layers: Vec<i64>,
    #[serde(default)]
    pub kept_layers: Vec<i64>,
    /// SHA-256 of the source checkpoint's weight files, in order.
    #[serde(default)]
    pub source_sha256: String,
    #[serde(default)]
    pub smooth_alpha: Option<f64>,
    #[serde(default)]
    pub outlier_threshold: Option<f64>,
    /// Fields a later version may add, kept on a round trip.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl QuantizationConfig {
    /// The `quantization_config` of a config's extra fields, validated against the
    /// config; `None` for a plain float model folder.
    pub fn from_config(config: &crate::Gpt2Config, path: &Path) -> Result<Option<Self>> {
        let Some(v) = config.extra.get("quantization_config") else {
            return Ok(None);
        };
        let bad = |reason: String| Error::Config {
            path: path.into(),
            reason: format!("quantization_config: {reason}"),
        };
        let q: Self = serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
        if q.quant_method != QUANT_METHOD {
            return Err(bad(format!(
                "quant_method {:?} is not gpt2kit's ({QUANT_METHOD:?})",
                q.quant_method
            )));
        }
        if q.method.is_int8() && q.bits != 8 {
            return Err(bad(format!(
                "bits {} with method {}",
                q.bits,
                q.method.name()
            )));
        }
        if q.granularity != GRANULARITY {
            return Err(bad(format!(
                "granularity {:?}; supported: {GRANULARITY:?}",
                q.granularity
            )));
        }
        if !(0.0..1.0).contains(&q.sparsity) {
            return Err(bad(format!("sparsity {} outside [0, 1)", q.sparsity)));
        }
        if !q.kept_layers.is_empty() && q.kept_layers.len() as i64 != config.n_layer {
            return Err(bad(format!(
                "kept_layers lists {} layers but n_layer is {}",
                q.kept_layers.len(),
                config.n_layer
            )));
        }
        if q.quantize_embeddings && !q.method.is_int8() {
            return Err(bad("quantize_embeddings with method none".into()));
        }
        Ok(Some(q))
    }
}

/// An int8 tensor with one f32 scale per row of `q` (an output channel): (out, in).
pub struct QuantRows {
    /// (out, in) int8, contiguous.
    pub q: Tensor,
    /// (out,) f32.
    pub scale: Tensor,
}

impl QuantRows {
    /// The float tensor it stands for, (out, in).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        (self.q.to_kind(Kind::Float) * self.scale.unsqueeze(1)).to_kind(kind)
    }
}

/// Reads the int8 `<name>` and its `<name>_scale` as stored ((in, out) with scales per
/// column when `rows_are_out` is false, (out, in) with scales per row otherwise) and
/// returns them as rows per output channel, checking dtypes, shapes and scale values.
pub fn read_int8(
    files: &dyn TensorSource,
    name: &str,
    shape: [i64; 2],
    rows_are_out: bool,
    device: Device,
) -> Result<QuantRows> {
    let path = files.path_of(name);
    let q = files.tensor_as_stored(name, device)?;
    if q.kind() != Kind::Int8 {
        return Err(Error::ModelFolder {
            path,
            reason: format!(
                "tensor `{name}` is {:?}, but quantization_config says int8",
                q.kind()
            ),
        });
    }
    if q.size() != shape {
        return Err(Error::Shape {
            path,
            name: name.into(),
            expected: shape.to_vec(),
            got: q.size(),
        });
    }
    let out = if rows_are_out { shape[0] } else { shape[1] };
    let scale_name = format!("{name}{SCALE_SUFFIX}");
    let spath = files.path_of(&scale_name);
    if !files.contains(&scale_name) {
        return Err(Error::ModelFolder {
            path: spath,
            reason: format!("int8 tensor `{name}` has no scale `{scale_name}`"),
        });
    }
    let scale = files.tensor_as_stored(&scale_name, device)?;
    if scale.kind() != Kind::Float {
        return Err(Error::ModelFolder {
            path: spath,
            reason: format!("scale `{scale_name}` is {:?}, expected F32", scale.kind()),
        });
    }
    if scale.size() != [out] {
        return Err(Error::Shape {
            path: spath,
            name: scale_name,
            expected: vec![out],
            got: scale.size(),
        });
    }
    let finite_positive =
        scale.isfinite().all().int64_value(&[]) == 1 && scale.ge(0.0).all().int64_value(&[]) == 1;
    if !finite_positive {
        return Err(Error::ModelFolder {
            path: spath,
            reason: format!("scale `{scale_name}` has negative, infinite or NaN values"),
        });
    }
    if q.eq(-128).any().int64_value(&[]) == 1 {
        return Err(Error::ModelFolder {
            path,
            reason: format!("int8 tensor `{name}` holds -128 (symmetric range is ±127)"),
        });
    }
    let q = if rows_are_out { q } else { q.tr().contiguous() };
    Ok(QuantRows { q, scale })
}

/// Reads the optional outlier columns of an int8-dynamic layer with `n_in` inputs.
pub fn read_outliers(
    files: &dyn TensorSource,
    layer: &str,
    n_in: i64,
    device: Device,
) -> Result<Option<Tensor>> {
    let name = format!("{layer}.{OUTLIER_SUFFIX}");
    if !files.contains(&name) {
        return Ok(None);
    }
    let path = files.path_of(&name);
    let idx = files.tensor_as_stored(&name, device)?;
    let bad = |reason: String| Error::ModelFolder {
        path: path.clone(),
        reason: format!("tensor `{name}`: {reason}"),
    };
    if idx.kind() != Kind::Int64 || idx.dim() != 1 {
        return Err(bad(format!(
            "expected I64 of shape (k,), got {:?} {:?}",
            idx.kind(),
            idx.size()
        )));
    }
    if idx.numel() > 0 {
        let (lo, hi) = (idx.min().int64_value(&[]), idx.max().int64_value(&[]));
        if lo < 0 || hi >= n_in {
            return Err(bad(format!("column indices must lie in [0, {n_in})")));
        }
        if idx.unique_dim(0, false, false, false).0.numel() != idx.numel() {
            return Err(bad("column indices repeat".into()));
        }
    }
    Ok(Some(idx))
}

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
    devices: &'a [Device],
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
        devices: &'a [Device],
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
        let n = self.devices.len() as i64;
        let main = self.devices[0];
        // Split layers are read whole on the CPU, sliced, then moved.
        let staging = if n > 1 { Device::Cpu } else { main };
        let rows = read_int8(
            self.files,
            &format!("{full}.weight"),
            [n_in, n_out],
            false,
            staging,
        )?;
        let bias = self
            .files
            .tensor(&format!("{full}.bias"), &[n_out], self.kind, staging)?;
        let outliers = read_outliers(self.files, &full, n_in, staging)?;
        if outliers.is_some() && self.method != Method::Int8Dynamic {
            return Err(Error::ModelFolder {
                path: self.files.path_of(&full),
                reason: format!(
                    "`{full}.{OUTLIER_SUFFIX}` belongs to int8-dynamic artifacts, this one is int8-weight"
                ),
            });
        }
        if n == 1 {
            return Ok((vec![self.linear(rows, Some(bias), outliers)], None));
        }
        let parts = (0..n)
            .map(|r| {
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
                let d = self.devices[r as usize];
                let w = QuantRows {
                    q: w.q.to_device(d),
                    scale: w.scale.to_device(d),
                };
                self.linear(w, b.map(|b| b.to_device(d)), idx.map(|i| i.to_device(d)))
            })
            .collect();
        let after = matches!(split, Split::Rows).then(|| bias.to_device(main));
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

/// Per-row symmetric int8 quantization of x (M, K) in f32: (q int8, scale (M, 1)).
pub fn quantize_per_token(x: &Tensor) -> (Tensor, Tensor) {
    let scale = x.abs().amax([-1], true).clamp_min(1e-12) / 127.0; // (M, 1)
    let q = (x / &scale)
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (q, scale)
}

/// A W8A8 linear layer: int8 weights per output channel, activations quantized per
/// token at run time, int32 accumulation on `_int_mm`.
pub struct Int8Linear {
    pub w: QuantRows,
    pub bias: Option<Tensor>,
    /// Input channels that skip activation quantization, and their weight rows in f32
    /// ((k,), (k, out)); those rows are zero in the int8 weight.
    pub outliers: Option<(Tensor, Tensor)>,
    /// For decode steps on the CPU: scales and bias as host values, and the output
    /// channel ranges the pool's tasks take.
    host: Option<HostSide>,
    /// The weights repacked for the W8A8 decode kernel (`pack`, made by
    /// `Gpt2::pack_for_cpu_decode`): decode steps then run there, bit-identical to the
    /// `_int_mm` path, without libtorch.
    pub(crate) packed: Option<PackedLinear>,
}

struct HostSide {
    scale: Vec<f32>,
    bias: Vec<f32>,
    chunks: Vec<(i64, i64)>,
    pool: Arc<ThreadPool>,
}

/// Tensors only read by the pool's tasks, and the output they write disjoint parts of.
struct Shared<'a> {
    xq: &'a Tensor,
    q: &'a Tensor,
    y: *mut f32,
}
// SAFETY: the tasks only read `xq` and `q` (never written while a call runs; libtorch
// reads of the same tensor from several threads are safe), and each writes the columns
// of its own chunk of `y`, which outlives `ThreadPool::run` (it returns after every task).
unsafe impl Sync for Shared<'_> {}

impl Shared<'_> {
    /// The whole struct, so that closures capture it (and its Sync) rather than fields.
    fn get(&self) -> &Self {
        self
    }
}

impl Int8Linear {
    pub fn new(w: QuantRows, bias: Option<Tensor>, outliers: Option<Tensor>) -> Self {
        let outliers = outliers.filter(|i| i.numel() > 0).map(|idx| {
            let rows = w
                .dequantize(Kind::Float)
                .index_select(1, &idx)
                .tr()
                .contiguous(); // (k, out)
            (idx, rows)
        });
        let w = match &outliers {
            Some((idx, _)) => QuantRows {
                q: w.q.index_fill(1, idx, 0),
                scale: w.scale,
            },
            None => w,
        };
        let host = (w.q.device() == Device::Cpu && outliers.is_none()).then(|| {
            let (n_out, n_in) = (w.q.size()[0], w.q.size()[1]);
            let pool = ThreadPool::global();
            let by_size = (n_out * n_in / MIN_TASK_BYTES).max(1);
            let n = (pool.threads() as i64 * TASKS_PER_THREAD)
                .min(by_size)
                .min(n_out.max(1));
            let step = (n_out + n - 1) / n.max(1);
            let chunks = (0..n_out)
                .step_by(step.max(1) as usize)
                .map(|c0| (c0, step.min(n_out - c0)))
                .collect();
            let host = |t: &Tensor| Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1]));
            HostSide {
                scale: host(&w.scale).unwrap_or_default(),
                bias: bias
                    .as_ref()
                    .map_or(Ok(vec![0.0; n_out as usize]), host)
                    .unwrap_or_default(),
                chunks,
                pool,
            }
        });
        Self {
            w,
            bias,
            outliers,
            host,
            packed: None,
        }
    }

    /// Packs the weights for the W8A8 decode kernel, where decode steps can run pooled
    /// (a CPU layer without outlier columns); a no-op elsewhere or when already packed.
    pub(crate) fn pack(&mut self) -> Result<()> {
        let Some(host) = &self.host else {
            return Ok(());
        };
        if self.packed.is_some() {
            return Ok(());
        }
        let (n_out, n_in) = (self.w.q.size()[0] as usize, self.w.q.size()[1] as usize);
        let q = Vec::<i8>::try_from(self.w.q.contiguous().reshape([-1]))?;
        let packed =
            PackedLinear::from_int8_rows_dynamic(&q, &host.scale, n_in, n_out, Some(&host.bias))?;
        self.packed = Some(packed.with_pool(host.pool.clone()));
        Ok(())
    }

    /// Whether a call with `rows` input rows takes the pooled decode path.
    pub fn decodes_on_pool(&self, rows: usize) -> bool {
        self.host.is_some() && rows <= MAX_ROWS
    }

    /// A decode step: activations quantized on the host, the int8 GEMM split by output
    /// channels across the decode kernels' pool (libtorch held to one thread there), the
    /// rescale and bias written straight into the output. None: not this path.
    fn forward_pooled(&self, x2: &Tensor, rows: usize) -> Option<Tensor> {
        let host = self.host.as_ref()?;
        let (n_out, n_in) = (self.w.q.size()[0] as usize, self.w.q.size()[1] as usize);
        let xs = Vec::<f32>::try_from(x2.to_kind(Kind::Float).contiguous().reshape([-1])).ok()?;
        let mut xq = vec![0i8; rows * n_in];
        let mut sx = vec![0f32; rows];
        for r in 0..rows {
            let row = &xs[r * n_in..(r + 1) * n_in];
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = (max / 127.0).max(1e-12);
            sx[r] = s;
            for (q, v) in xq[r * n_in..(r + 1) * n_in].iter_mut().zip(row) {
                *q = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8; // ties to even, as torch.round in quantize_per_token
            }
        }
        let xq = Tensor::from_slice(&xq).view([rows as i64, n_in as i64]);
        let mut y = vec![0f32; rows * n_out];
        let shared = Shared {
            xq: &xq,
            q: &self.w.q,
            y: y.as_mut_ptr(),
        };
        let task = |t: usize| {
            let shared = shared.get();
            one_libtorch_thread();
            let (c0, len) = host.chunks[t];
            let w = shared.q.narrow(0, c0, len); // (len, in), contiguous rows
            let acc = shared.xq.internal_int_mm(&w.tr()); // (rows, len) int32
            let acc = Vec::<i32>::try_from(acc.reshape([-1])).unwrap_or_default();
            let (c0, len) = (c0 as usize, len as usize);
            for (r, &s_r) in sx.iter().enumerate() {
                for j in 0..len {
                    let c = c0 + j;
                    let v = acc.get(r * len + j).copied().unwrap_or(0) as f32 * s_r * host.scale[c]
                        + host.bias[c];
                    // SAFETY: r < rows, c < n_out: inside y; column c belongs to this chunk only.
                    unsafe { *shared.y.add(r * n_out + c) = v };
                }
            }
        };
        host.pool.run(host.chunks.len(), &task);
        Some(Tensor::from_slice(&y).view([rows as i64, n_out as i64]))
    }

    /// x (…, in) → (…, out), in x's kind.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let n_in = *shape.last().expect("input has a feature dimension");
        *shape.last_mut().unwrap() = self.w.q.size()[0];
        let kind = x.kind();
        let mut x2 = x.reshape([-1, n_in]).to_kind(Kind::Float); // (M, in)
        let rows = x2.size()[0] as usize;
        if self.decodes_on_pool(rows) && !x.requires_grad() {
            if let Some(y) = self
                .packed
                .as_ref()
                .and_then(|p| p.forward_tensor(&x2).ok())
            {
                return y.to_kind(kind).reshape(shape);
            }
            if let Some(y) = self.forward_pooled(&x2, rows) {
                return y.to_kind(kind).reshape(shape);
            }
        }
        let mut extra = None;
        if let Some((idx, rows)) = &self.outliers {
            extra = Some(x2.index_select(1, idx).mm(rows)); // (M, out)
            x2 = x2.index_fill(1, idx, 0.0);
        }
        let (xq, sx) = quantize_per_token(&x2);
        let acc = xq.internal_int_mm(&self.w.q.tr()); // (M, out) int32
        let mut y = acc.to_kind(Kind::Float) * sx * &self.w.scale;
        if let Some(e) = extra {
            y += e;
        }
        if let Some(b) = &self.bias {
            y += b.to_kind(Kind::Float);
        }
        y.to_kind(kind).reshape(shape)
    }
}

/// Pool threads run libtorch ops single-threaded (once per thread): the pool is the
/// parallelism, and a nested team would wait on cores the pool already holds.
fn one_libtorch_thread() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    DONE.with(|d| {
        if !d.get() {
            d.set(true);
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("gpt2kit-kernel"))
            {
                tch::set_num_threads(1);
            }
        }
    });
}

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
