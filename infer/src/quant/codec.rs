//! The int8 format's arithmetic and stored tensors, for the writer (`quantize`) and the
//! engine alike: symmetric per-output-channel weight quantization and its inverse,
//! per-token activation quantization, and reading, writing and dequantizing the tensors
//! as an artifact stores them.
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use super::{is_auxiliary, outlier_name, rows_are_out, scale_name, QuantizationConfig, CONFIG_KEY};
use crate::checkpoint::TensorSource;
use crate::error::{Error, Result};
use crate::folder::CONFIG_FILE;
use crate::Gpt2Config;

/// q = round(w / s) in [-127, 127], s = max|w| / 127 over `dim` (the reduced dimension:
/// 0 for a Conv1D weight (in, out) → scales (out,), 1 for embeddings (V, E) → (V,)).
/// An all-zero channel gets scale 0 and zeros.
pub fn quantize_per_channel(w: &Tensor, dim: i64) -> (Tensor, Tensor) {
    let w = w.to_kind(Kind::Float);
    let scale = w.abs().amax([dim], true) / 127.0;
    let safe = scale.clamp_min(f32::MIN_POSITIVE as f64);
    let q = (&w / &safe)
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (q, scale.reshape([-1]).contiguous())
}

/// The float weight `name` (checkpoint layout) as the artifact stores it: its scale
/// `<name>_scale` (one per output channel, see `rows_are_out`) and the int8 `<name>`.
pub fn encode_weight(name: &str, w: &Tensor) -> [(String, Tensor); 2] {
    let dim = if rows_are_out(name) { 1 } else { 0 };
    let (q, scale) = quantize_per_channel(w, dim);
    [(scale_name(name), scale), (name.to_string(), q)]
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

/// `quantize_per_token` of one row on the host, into `q`; returns the row's scale.
/// Rounds ties to even, as `torch.round` does, so both give the same bytes.
pub fn quantize_row(row: &[f32], q: &mut [i8]) -> f32 {
    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = (max / 127.0).max(1e-12);
    for (q, v) in q.iter_mut().zip(row) {
        *q = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    s
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
    read_int8_checking(files, name, shape, rows_are_out, device, true)
}

/// `read_int8`; without `check_min` the weight is not scanned for -128 here, and the
/// caller checks it later (`check_int8_min`, or packing, which reads every byte anyway).
pub(crate) fn read_int8_checking(
    files: &dyn TensorSource,
    name: &str,
    shape: [i64; 2],
    rows_are_out: bool,
    device: Device,
    check_min: bool,
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
    let out = if rows_are_out { shape[0] } else { shape[1] }; // `shape` is `[i64; 2]`
    let scale_name = scale_name(name);
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
    if check_min {
        check_int8_min(&q, name, path)?;
    }
    // Conv1D's (in, out) seen as rows (out, in): a view, not a copy (in place over a
    // mapped file, packing reads it once; libtorch's int8 GEMM takes its transpose as is).
    let q = if rows_are_out { q } else { q.tr() };
    Ok(QuantRows { q, scale })
}

/// An error naming `name` (in `path`) when `q` holds -128 (`held_min`).
pub(crate) fn check_int8_min(q: &Tensor, name: &str, path: PathBuf) -> Result<()> {
    match holds_min(q) {
        true => Err(held_min(path, name)),
        false => Ok(()),
    }
}

/// The error for an int8 weight `name` (in `path`) that holds -128.
pub(crate) fn held_min(path: PathBuf, name: &str) -> Error {
    Error::ModelFolder {
        path,
        reason: format!("int8 tensor `{name}` holds -128 (symmetric range is ±127)"),
    }
}

/// Whether `q` holds -128. A contiguous CPU tensor (over a mapped file) is scanned where
/// it lies, in blocks whose test vectorises; libtorch's `eq(-128).any()` would write a
/// bool tensor of the whole weight first.
fn holds_min(q: &Tensor) -> bool {
    // Only whether some element is -128: a transposed view of contiguous bytes (how the
    // engine holds a Conv1D's int8 weight) is scanned as those bytes lie.
    if q.dim() == 2 && !q.is_contiguous() && q.tr().is_contiguous() {
        return holds_min(&q.tr());
    }
    if q.device() != Device::Cpu || !q.is_contiguous() {
        return q.eq(-128).any().int64_value(&[]) == 1;
    }
    crate::linear::int8_slice(q)
        .chunks(1 << 14)
        .any(|c| c.iter().fold(false, |a, &v| a | (v == i8::MIN)))
}

/// Reads the optional outlier columns of an int8-dynamic layer with `n_in` inputs.
pub fn read_outliers(
    files: &dyn TensorSource,
    layer: &str,
    n_in: i64,
    device: Device,
) -> Result<Option<Tensor>> {
    let name = outlier_name(layer);
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

/// A float model's tensors from an artifact's `names` (scales and outlier lists
/// dropped, int8 weights dequantized back to their stored layout), with the
/// `quantization_config` removed from the config: what `gpt2kit dequantize` writes.
pub fn dequantize_artifact(
    config: &Gpt2Config,
    stored: &dyn TensorSource,
    names: &[String],
) -> Result<(Gpt2Config, Vec<(String, Tensor)>)> {
    let path = stored.path_of(CONFIG_FILE).with_file_name(CONFIG_FILE);
    if QuantizationConfig::from_config(config, &path)?.is_none() {
        return Err(Error::Input(format!(
            "{}: not a gpt2kit artifact (no {CONFIG_KEY}); it is already a float model",
            path.display()
        )));
    }
    let mut out = Vec::new();
    for name in names.iter().filter(|n| !is_auxiliary(n)) {
        let t = stored.tensor_as_stored(name, Device::Cpu)?;
        let t = if t.kind() == Kind::Int8 {
            let &[a, b] = t.size().as_slice() else {
                return Err(Error::Input(format!("int8 tensor `{name}` is not 2-D")));
            };
            let rows_are_out = rows_are_out(name);
            let w =
                read_int8(stored, name, [a, b], rows_are_out, Device::Cpu)?.dequantize(Kind::Float); // (out, in)
            if rows_are_out {
                w
            } else {
                w.tr().contiguous()
            }
        } else {
            t
        };
        out.push((name.clone(), t));
    }
    let mut config = config.clone();
    config.extra.remove(CONFIG_KEY);
    Ok((config, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_quantized_on_the_host_matches_libtorch_to_the_byte() {
        tch::manual_seed(3);
        // Rows with exact ties (x / s = k + 0.5) as well as random ones.
        let ties = Tensor::from_slice(&[127.0f32, 0.5, 1.5, 2.5, -0.5, -3.5, 0.0, 64.5]);
        let rand = Tensor::randn([5, 8], (Kind::Float, Device::Cpu)) * 3.0;
        let x = Tensor::cat(
            &[
                ties.unsqueeze(0),
                rand,
                Tensor::zeros([1, 8], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let (q, s) = quantize_per_token(&x);
        let q = Vec::<i8>::try_from(q.reshape([-1])).unwrap();
        let s = Vec::<f32>::try_from(s.reshape([-1])).unwrap();
        let xs = Vec::<f32>::try_from(x.reshape([-1])).unwrap();
        for r in 0..s.len() {
            let mut row = [0i8; 8];
            let scale = quantize_row(&xs[r * 8..(r + 1) * 8], &mut row);
            // An all-zero row's scale is only a floor (1e-12 here, 1e-12 / 127 in
            // libtorch's): its codes are zeros either way.
            if s[r] > 1e-12 {
                assert_eq!(scale, s[r], "row {r}");
            }
            assert_eq!(row, q[r * 8..(r + 1) * 8], "row {r}");
        }
    }

    #[test]
    fn weights_encode_per_output_channel_and_decode_within_half_a_scale() {
        tch::manual_seed(4);
        let conv = Tensor::randn([6, 10], (Kind::Float, Device::Cpu)); // (in, out)
        let [(sn, scale), (qn, q)] = encode_weight("h.0.mlp.c_fc.weight", &conv);
        assert_eq!(
            (sn.as_str(), qn.as_str()),
            ("h.0.mlp.c_fc.weight_scale", "h.0.mlp.c_fc.weight")
        );
        assert_eq!((q.size(), scale.size()), (vec![6, 10], vec![10]));
        let back = QuantRows {
            q: q.tr(),
            scale: scale.shallow_clone(),
        }
        .dequantize(Kind::Float)
        .tr();
        let err = (back - &conv).abs().amax([0], false);
        assert!(bool::try_from(err.le_tensor(&(scale / 2.0 + 1e-7)).all()).unwrap());
        for name in ["wte.weight", "transformer.wte.weight", "lm_head.weight"] {
            let [(_, scale), _] = encode_weight(name, &conv);
            assert_eq!(scale.size(), [6], "{name}: one scale per row");
        }
        assert!(
            is_auxiliary("h.0.mlp.c_fc.weight_scale")
                && is_auxiliary(&outlier_name("h.0.mlp.c_fc"))
        );
        assert!(!is_auxiliary("h.0.mlp.c_fc.weight"));
    }
}
