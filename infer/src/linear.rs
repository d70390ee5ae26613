//! The linear layer: GPT-2's `Conv1D` projections in every weight format the engine
//! runs (float, float repacked for the CPU decode kernels, int8 per-channel weights,
//! W8A8), behind one `forward`. Tensor-parallel shards are `Linear`s too.
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::gguf::matmul::BlockLinear;
use crate::kernels::{PackedLinear, WeightFormat};
use crate::mapped::{release_tensor, MappedFile};
use crate::quant::{InputObserver, Int8Linear, QuantRows};

/// A linear layer. GPT-2 stores its projections as `Conv1D`: weight (in, out), y = x·W + b.
/// The one seam where weight formats differ (quantized variants join this enum).
/// A row-split shard of a tensor-parallel layer has no bias: it is added once after the
/// shards' partial outputs are summed.
pub enum Linear {
    Float {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Float weights packed for the CPU decode kernels (`kernels`), which serve inputs of
    /// up to `kernel_max_rows` rows; libtorch serves the rest from `weight`. When loaded
    /// from a file, `weight` is the file's tensor in place (a view of its mapping, given
    /// back after packing: no memory until a long prompt reads it), possibly in the
    /// file's dtype (fp32 on disk, bf16 run: converted per call off the kernels).
    Packed {
        weight: Tensor,
        bias: Option<Tensor>,
        packed: PackedLinear,
    },
    /// Int8 weights and per-token int8 activations (`int8-dynamic` artifacts).
    Int8(Box<Int8Linear>),
    /// Int8 weights, float activations (`int8-weight` artifacts): decode steps run on
    /// the int8 decode kernel (`packed`, made by `pack_for_cpu_decode`), which widens
    /// the weights in registers; other calls dequantize the weight per call.
    Int8Weight {
        w: QuantRows,
        bias: Option<Tensor>,
        packed: Option<PackedLinear>,
    },
    /// Weights stored one row per output (out, in), as `nn.Linear` stores them: the LM
    /// head, `lm_head.weight` or, when tied, `wte` itself (the same tensor, so training's
    /// gradients reach it; a transposed view made before `requires_grad` was set would
    /// not carry them). y = x·Wᵀ; `packed` is the transposed copy for the decode kernels.
    Rows {
        weight: Tensor,
        packed: Option<PackedLinear>,
    },
    /// A GGUF file's weight in its ggml block format (`gguf::matmul`), (out, in) rows:
    /// every call quantizes its activations and runs the block kernels, as llama.cpp's
    /// CPU backend does. Used for the LM head too.
    Blocks(Box<BlockLinear>),
    /// Any layer, recording the per-channel max |x| of its inputs (calibration).
    Observed {
        inner: Box<Linear>,
        observer: InputObserver,
    },
}

impl Linear {
    /// Whether an inference call (no autograd, CPU) with `rows` input rows runs on the
    /// decode kernels' thread pool rather than on libtorch.
    pub fn runs_on_pool(&self, rows: usize) -> bool {
        let rows = rows as i64;
        match self {
            Linear::Packed { packed, .. } => rows <= kernel_max_rows(packed),
            Linear::Int8Weight { packed, .. } => packed.is_some() && rows <= INT8_KERNEL_MAX_ROWS,
            Linear::Int8(q) => q.decodes_on_pool(rows as usize),
            Linear::Rows { packed, .. } => {
                packed.as_ref().is_some_and(|p| rows <= kernel_max_rows(p))
            }
            // Every row count: prompts run on the block kernels too.
            Linear::Blocks(_) => true,
            Linear::Float { .. } | Linear::Observed { .. } => false,
        }
    }

    /// The layer's panels for the decode kernels, when it has them.
    pub(crate) fn packed(&self) -> Option<&PackedLinear> {
        match self {
            Linear::Packed { packed, .. } => Some(packed),
            Linear::Int8(q) => q.packed.as_ref(),
            Linear::Int8Weight { packed, .. } | Linear::Rows { packed, .. } => packed.as_ref(),
            _ => None,
        }
    }

    /// The most input rows one call runs on the decode kernels (`usize::MAX` when no
    /// kernel serves this layer, or when every path computes the same values).
    pub(crate) fn kernel_rows(&self) -> usize {
        match self {
            Linear::Packed { packed, .. }
            | Linear::Rows {
                packed: Some(packed),
                ..
            } => kernel_max_rows(packed) as usize,
            Linear::Int8Weight {
                packed: Some(_), ..
            } => INT8_KERNEL_MAX_ROWS as usize,
            // W8A8's integer sums and rescale are the same on every path.
            _ => usize::MAX,
        }
    }

    /// Output channels `start..start + len` of a float row-major layer (the head), or
    /// None for any other kind of layer.
    pub(crate) fn rows_part(&self, x: &Tensor, start: i64, len: i64) -> Option<Tensor> {
        match self {
            Linear::Rows {
                weight,
                packed: None,
            } => Some(x.matmul(&in_kind(&weight.narrow(0, start, len), x).tr())),
            _ => None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (weight, bias) = match self {
            Linear::Float { weight, bias } => (weight, bias),
            Linear::Packed {
                weight,
                bias,
                packed,
            } => {
                if let Some(y) = packed_forward(packed, x, kernel_max_rows(packed)) {
                    return y;
                }
                (weight, bias)
            }
            Linear::Int8(q) => return q.forward(x),
            Linear::Blocks(b) => {
                let y = b.forward(x);
                return if x.kind() == Kind::Float {
                    y
                } else {
                    y.to_kind(x.kind())
                };
            }
            Linear::Rows { weight, packed } => {
                if let Some(y) = packed
                    .as_ref()
                    .and_then(|p| packed_forward(p, x, kernel_max_rows(p)))
                {
                    return y;
                }
                return x.matmul(&in_kind(weight, x).tr());
            }
            Linear::Int8Weight { w, bias, packed } => {
                if let Some(y) = packed
                    .as_ref()
                    .and_then(|p| packed_forward(p, x, INT8_KERNEL_MAX_ROWS))
                {
                    return y;
                }
                let mut shape = x.size();
                let n_in = *shape.last().expect("input has a feature dimension");
                *shape.last_mut().unwrap() = w.q.size()[0];
                let x2 = x.reshape([-1, n_in]);
                // On CUDA a decode step's few rows read the int8 weights directly. (On
                // the CPU libtorch's kernel is slower than dequantizing past one row;
                // the CPU decode kernels serve those rows anyway.)
                let few = x2.size()[0] <= INT8PACK_MAX_ROWS as i64;
                if let Some(y) = (x.device().is_cuda() && few)
                    .then(|| int8pack_mm(&x2, w))
                    .flatten()
                {
                    let y = match bias {
                        Some(b) => y + in_kind(b, x),
                        None => y,
                    };
                    return y.reshape(shape);
                }
                let wf = w.dequantize(x.kind()).tr(); // (in, out)
                let y = match bias {
                    Some(b) => b.addmm(&x2, &wf),
                    None => x2.mm(&wf),
                };
                return y.reshape(shape);
            }
            Linear::Observed { inner, observer } => {
                observer.observe(x);
                return inner.forward(x);
            }
        };
        let mut shape = x.size();
        let n_in = *shape.last().expect("input has a feature dimension");
        *shape.last_mut().unwrap() = weight.size()[1];
        let x2 = x.reshape([-1, n_in]);
        let weight = in_kind(weight, x);
        // Conv1D's own op: addmm over the flattened rows.
        let y = match bias {
            Some(b) => b.addmm(&x2, &weight),
            None => x2.mm(&weight),
        };
        y.reshape(shape)
    }

    /// Packs the layer for the CPU decode kernels in the model's `kind` (no-op if already
    /// packed), then gives back the source's pages when it is a view of one of `maps`.
    pub(crate) fn pack(self, kind: Kind, maps: &[Arc<MappedFile>]) -> Result<Linear> {
        let format = match kind {
            Kind::BFloat16 => WeightFormat::Bf16,
            _ => WeightFormat::F32,
        };
        Ok(match self {
            Linear::Float { weight, bias } => {
                let packed = PackedLinear::from_tensor_as(&weight, bias.as_ref(), format)?;
                release_tensor(maps, &weight);
                Linear::Packed {
                    weight,
                    bias,
                    packed,
                }
            }
            Linear::Int8Weight {
                w,
                bias,
                packed: None,
            } => {
                let scale = Vec::<f32>::try_from(w.scale.to_kind(Kind::Float))?;
                let b = match &bias {
                    Some(b) => Some(Vec::<f32>::try_from(b.to_kind(Kind::Float))?),
                    None => None,
                };
                // read in place: the (out, in) view of a stored (in, out) weight
                let packed = PackedLinear::from_int8_tensor(&w.q, &scale, b.as_deref())?;
                release_tensor(maps, &w.q);
                Linear::Int8Weight {
                    w,
                    bias,
                    packed: Some(packed),
                }
            }
            Linear::Rows {
                weight,
                packed: None,
            } => {
                // (in, out), read in place from the (out, in) rows.
                let packed = PackedLinear::from_tensor_as(&weight.tr(), None, format)?;
                release_tensor(maps, &weight);
                Linear::Rows {
                    weight,
                    packed: Some(packed),
                }
            }
            Linear::Int8(mut q) => {
                q.pack()?;
                release_tensor(maps, &q.w.q);
                Linear::Int8(q)
            }
            other => other,
        })
    }

    /// Wraps the layer in an input observer (no-op if already observed).
    pub(crate) fn observed(self) -> Linear {
        match self {
            Linear::Observed { .. } => self,
            inner => Linear::Observed {
                inner: Box::new(inner),
                observer: InputObserver::new(),
            },
        }
    }

    /// The recorded per-input-channel max |x| (after `observe_linear_inputs`).
    pub(crate) fn observed_max(&self) -> Option<Tensor> {
        match self {
            Linear::Observed { observer, .. } => observer
                .max_abs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(Tensor::shallow_clone),
            _ => None,
        }
    }

    /// The float weight (in, out) and bias, if this layer is float.
    pub(crate) fn float_parts(&self) -> Option<(&Tensor, &Option<Tensor>)> {
        match self {
            Linear::Float { weight, bias } | Linear::Packed { weight, bias, .. } => {
                Some((weight, bias))
            }
            Linear::Observed { inner, .. } => inner.float_parts(),
            Linear::Int8(_)
            | Linear::Int8Weight { .. }
            | Linear::Rows { .. }
            | Linear::Blocks(_) => None,
        }
    }
}

/// `weight` in `x`'s kind: itself, or converted for this call (a weight kept in the
/// file's dtype, on a path off the kernels).
fn in_kind(weight: &Tensor, x: &Tensor) -> Tensor {
    match weight.kind() == x.kind() {
        true => weight.shallow_clone(),
        false => weight.to_kind(x.kind()),
    }
}

/// The values of a contiguous CPU int8 tensor, borrowed (a view of a mapped file is
/// packed straight from the mapping).
pub(crate) fn int8_slice(q: &Tensor) -> &[i8] {
    assert!(q.kind() == Kind::Int8 && q.is_contiguous() && q.device() == Device::Cpu);
    if q.numel() == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU int8 tensor holds numel() bytes from its data pointer,
    // alive as long as the borrowed tensor and not written while packing reads them.
    unsafe { std::slice::from_raw_parts(q.data_ptr() as *const i8, q.numel()) }
}

/// The kernels' result for up to `max_rows` rows of float activations without autograd
/// (`kernels::MAX_ROWS` for float weights, `INT8_KERNEL_MAX_ROWS` for int8); `None` sends
/// the call to libtorch.
pub(crate) fn packed_forward(packed: &PackedLinear, x: &Tensor, max_rows: i64) -> Option<Tensor> {
    let size = x.size();
    let rows: i64 = size[..size.len() - 1].iter().product();
    if rows > max_rows || x.requires_grad() || x.device() != Device::Cpu {
        return None;
    }
    let kind = x.kind();
    let y = packed.forward_tensor(&x.to_kind(Kind::Float)).ok()?;
    Some(if kind == Kind::Float {
        y
    } else {
        y.to_kind(kind)
    })
}

/// Rows up to which a float layer runs on its decode kernel, in passes of
/// `kernels::MAX_ROWS` rows (a prompt's rows, a batch of them), rather than on
/// libtorch's GEMM. Measured on gpt2-124M's block linears (kernel_bench, "gpt2 prompt",
/// 2-core AVX-512 Xeon): fp32 kernels 2.3× libtorch at 11 rows, 1.1× at 128, 0.86× at
/// 256; bf16 kernels 3–6.5× at 11–256 rows (libtorch's CPU bf16 GEMM is slow without
/// AVX-512 BF16).
pub(crate) fn kernel_max_rows(packed: &PackedLinear) -> i64 {
    match packed.format() {
        WeightFormat::F32 => 128,
        _ => i64::MAX,
    }
}

/// Rows up to which an int8-weight layer runs on its decode kernel (in passes of
/// `kernels::MAX_ROWS` rows) rather than dequantizing its weight per call: a pass reads
/// a quarter of the f32 bytes, while dequantizing writes and reads the f32 weight again
/// (a prompt of up to 64 tokens costs at most 8 passes).
const INT8_KERNEL_MAX_ROWS: i64 = 64;

/// Rows up to which int8-weight layers on CUDA multiply by `_weight_int8pack_mm`.
const INT8PACK_MAX_ROWS: usize = 16;

/// x (M, in) times int8 rows `w` (out, in) with their scales, by libtorch's
/// `_weight_int8pack_mm` (kernels for few rows that read the int8 weights as they are,
/// where dequantizing first writes and reads a float copy of the matrix every call):
/// (M, out) in x's kind. `None` where libtorch refuses (a kind or device it has no
/// kernel for; remembered per device type), then the caller dequantizes.
fn int8pack_mm(x: &Tensor, w: &QuantRows) -> Option<Tensor> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static REFUSED_CPU: AtomicBool = AtomicBool::new(false);
    static REFUSED_OTHER: AtomicBool = AtomicBool::new(false);
    let refused = match x.device() {
        Device::Cpu => &REFUSED_CPU,
        _ => &REFUSED_OTHER,
    };
    let kind_ok = matches!(x.kind(), Kind::Float | Kind::BFloat16 | Kind::Half);
    if !kind_ok || refused.load(Ordering::Relaxed) || x.requires_grad() {
        return None;
    }
    let scale = w.scale.to_kind(x.kind());
    match x.contiguous().f_internal_weight_int8pack_mm(&w.q, &scale) {
        Ok(y) => Some(y),
        Err(_) => {
            refused.store(true, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtorch's int8 product equals the dequantized one to the rounding of the kind
    /// it returns: f32 within 1e-5 of the largest output (~1e-6 seen: the scale is
    /// applied after the sum instead of to each weight), bf16 within 2⁻⁷ (one bf16 ulp
    /// of the output, which is rounded to bf16 either way).
    #[test]
    fn int8pack_equals_the_dequantized_product() {
        tch::manual_seed(1);
        let (m, k, n) = (4, 96, 40);
        let q = Tensor::randint_low(-127, 128, [n, k], (Kind::Int8, Device::Cpu));
        let w = QuantRows {
            q,
            scale: Tensor::rand([n], (Kind::Float, Device::Cpu)) * 0.01,
        };
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 1.0 / 128.0)] {
            let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(kind);
            let want = x.mm(&w.dequantize(kind).tr()).to_kind(Kind::Float);
            let got = int8pack_mm(&x, &w)
                .expect("libtorch's CPU kernel")
                .to_kind(Kind::Float);
            let rel =
                (&got - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
            assert!(rel < tol, "{kind:?}: {rel}");
        }
    }
}
