//! Post-training int8 quantization, magnitude pruning and layer dropping: pure
//! transforms over named tensors (checkpoint names without `transformer.`) that produce
//! the artifact format the `infer` engine defines (`infer::quant`, which also reads
//! it back and dequantizes it).
//!
//! Order of one call: drop layers → prune (float) → smooth (SmoothQuant, folded into
//! the LayerNorms) → pick outlier columns → quantize per output channel.
use std::collections::BTreeMap;

use infer::quant::{self, Method, QuantizationConfig};
use infer::{Error, Gpt2Config, Result};
use tch::{Kind, Tensor};

pub mod gguf;
pub mod imatrix;
pub mod int8;
pub mod prune;

pub use prune::{Pattern, Prune, Scope};

/// The four Conv1D layers of a block, by checkpoint name suffix.
pub const LINEARS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

pub struct Options {
    pub method: Method,
    pub keep_embeddings_float: bool,
    pub prune: Option<Prune>,
    /// Source layer indices to keep, in order (all of them when nothing is dropped).
    pub kept_layers: Vec<i64>,
    /// SmoothQuant's migration strength (needs calibration).
    pub smooth_alpha: Option<f64>,
    /// Input channels whose calibration max |x| exceeds this stay float (int8-dynamic).
    pub outlier_threshold: Option<f64>,
    /// SHA-256 of the source weights, recorded in the artifact.
    pub source_sha256: String,
}

/// Per-layer (`h.N.attn.c_attn`, ... in source numbering) max |x| per input channel.
pub type Calibration = BTreeMap<String, Tensor>;

/// What one tensor looks like after the transforms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorStat {
    pub name: String,
    pub numel: i64,
    /// Zeros of the float weight after pruning (before quantization).
    pub zeros: i64,
    pub sparsity: f64,
    /// "int8" or the float dtype it is stored in.
    pub stored: String,
    /// Outlier columns kept in float (int8-dynamic with `--outlier-threshold`).
    pub outlier_columns: i64,
}

pub struct Artifact {
    pub config: Gpt2Config,
    /// Tensors to write, by their artifact names.
    pub tensors: Vec<(String, Tensor)>,
    pub stats: Vec<TensorStat>,
}

/// Parses `--drop-layers` / `--keep-layers` into the kept source indices.
pub fn kept_layers(n_layer: i64, drop: &[i64], keep: &[i64]) -> Result<Vec<i64>> {
    let check = |flag: &str, list: &[i64]| -> Result<()> {
        for &l in list {
            if l < 0 || l >= n_layer {
                return Err(Error::Input(format!(
                    "{flag}: layer {l} is out of range (the model has layers 0..{})",
                    n_layer - 1
                )));
            }
        }
        let mut seen = list.to_vec();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != list.len() {
            return Err(Error::Input(format!("{flag}: a layer is listed twice")));
        }
        Ok(())
    };
    if !drop.is_empty() && !keep.is_empty() {
        return Err(Error::Input(
            "use either --drop-layers or --keep-layers, not both".into(),
        ));
    }
    check("--drop-layers", drop)?;
    check("--keep-layers", keep)?;
    let kept: Vec<i64> = if keep.is_empty() {
        (0..n_layer).filter(|l| !drop.contains(l)).collect()
    } else {
        let mut k = keep.to_vec();
        k.sort_unstable();
        k
    };
    if kept.is_empty() {
        return Err(Error::Input(
            "--drop-layers / --keep-layers would leave no layer; keep at least one".into(),
        ));
    }
    Ok(kept)
}

/// Turns float tensors (as `Gpt2::named_tensors` gives them) into an artifact.
pub fn quantize(
    config: &Gpt2Config,
    tensors: Vec<(String, Tensor)>,
    opts: &Options,
    calibration: Option<&Calibration>,
) -> Result<Artifact> {
    if config.extra.contains_key(quant::CONFIG_KEY) {
        return Err(Error::Input(
            "the source is already a quantized artifact; quantize its float original".into(),
        ));
    }
    let needs_calibration = opts.smooth_alpha.is_some() || opts.outlier_threshold.is_some();
    if needs_calibration && opts.method != Method::Int8Dynamic {
        return Err(Error::Input(
            "--smooth-alpha and --outlier-threshold apply to --method int8-dynamic".into(),
        ));
    }
    if needs_calibration && calibration.is_none() {
        return Err(Error::Input(
            "--smooth-alpha / --outlier-threshold need --calibration FILE.jsonl".into(),
        ));
    }
    let mut map = keep_layers(tensors, &opts.kept_layers)?;
    let n_layer = opts.kept_layers.len() as i64;
    let linear_names: Vec<String> = (0..n_layer)
        .flat_map(|l| LINEARS.iter().map(move |s| format!("h.{l}.{s}")))
        .collect();
    let zeros = prune_linears(&mut map, &linear_names, opts.prune.as_ref())?;
    let outliers = match calibration.filter(|_| needs_calibration) {
        Some(calib) => smooth(&mut map, &linear_names, calib, opts)?,
        None => BTreeMap::new(),
    };
    let int8 = opts.method.is_int8();
    let quantize_embeddings = int8 && !opts.keep_embeddings_float;
    let (tensors, stats) = encode(
        map,
        &linear_names,
        &zeros,
        &outliers,
        int8,
        quantize_embeddings,
    );
    let (total_zeros, total): (i64, i64) = stats
        .iter()
        .filter(|s| !quant::rows_are_out(&s.name))
        .fold((0, 0), |(z, n), s| (z + s.zeros, n + s.numel));
    let qc = QuantizationConfig {
        sparsity: total_zeros as f64 / total.max(1) as f64,
        prune: opts.prune.as_ref().map(Prune::to_json),
        dropped_layers: (0..config.n_layer)
            .filter(|l| !opts.kept_layers.contains(l))
            .collect(),
        kept_layers: opts.kept_layers.clone(),
        source_sha256: opts.source_sha256.clone(),
        smooth_alpha: opts.smooth_alpha,
        outlier_threshold: opts.outlier_threshold,
        ..QuantizationConfig::new(opts.method, quantize_embeddings)
    };
    let mut config = config.clone();
    config.n_layer = n_layer;
    qc.insert_into(&mut config)?;
    Ok(Artifact {
        config,
        tensors,
        stats,
    })
}

/// The tensors in f32 on the CPU by name, the blocks `kept` (source indices) only,
/// renumbered from 0.
fn keep_layers(tensors: Vec<(String, Tensor)>, kept: &[i64]) -> Result<BTreeMap<String, Tensor>> {
    let mut map = BTreeMap::new();
    for (name, t) in tensors {
        let t = t.detach().to_kind(t.kind()).to_device(tch::Device::Cpu);
        if let Some(rest) = name.strip_prefix("h.") {
            let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let idx: i64 = idx
                .parse()
                .map_err(|_| Error::Input(format!("tensor `{name}`")))?;
            if let Some(new) = kept.iter().position(|&k| k == idx) {
                map.insert(format!("h.{new}.{tail}"), t.to_kind(Kind::Float));
            }
        } else {
            map.insert(name, t.to_kind(Kind::Float));
        }
    }
    Ok(map)
}

/// Prunes the linear layers' weights (when asked) and counts each one's zeros.
fn prune_linears(
    map: &mut BTreeMap<String, Tensor>,
    linear_names: &[String],
    prune: Option<&Prune>,
) -> Result<BTreeMap<String, i64>> {
    if let Some(p) = prune {
        let mut weights: Vec<(String, Tensor)> = linear_names
            .iter()
            .map(|n| {
                let w = format!("{n}.weight");
                let t = map.get(&w).map(Tensor::shallow_clone);
                t.map(|t| (w.clone(), t))
                    .ok_or_else(|| Error::Input(format!("tensor `{w}` is missing")))
            })
            .collect::<Result<_>>()?;
        prune::prune(&mut weights, p)?;
        for (n, t) in weights {
            map.insert(n, t);
        }
    }
    let mut zeros = BTreeMap::new();
    for n in linear_names {
        let w = &map[&format!("{n}.weight")];
        zeros.insert(n.clone(), w.eq(0.0).sum(Kind::Int64).int64_value(&[]));
    }
    Ok(zeros)
}

/// SmoothQuant's smoothing folded into the LayerNorms before `c_attn` and `c_fc`, then
/// the outlier columns of every linear layer (by its smoothed input statistics).
fn smooth(
    map: &mut BTreeMap<String, Tensor>,
    linear_names: &[String],
    calib: &Calibration,
    opts: &Options,
) -> Result<BTreeMap<String, Tensor>> {
    // Source name of an artifact layer `h.N.x` for the calibration statistics.
    let source_name = |n: &str| -> String {
        let rest = &n[2..];
        let (idx, tail) = rest.split_once('.').unwrap();
        let idx: usize = idx.parse().unwrap();
        format!("h.{}.{tail}", opts.kept_layers[idx])
    };
    let mut outliers = BTreeMap::new();
    for n in linear_names {
        let src = source_name(n);
        let mut stat = calib
            .get(&src)
            .ok_or_else(|| Error::Input(format!("calibration has no statistics for `{src}`")))?
            .to_kind(Kind::Float);
        let ln = if n.ends_with("attn.c_attn") {
            Some(n.replace("attn.c_attn", "ln_1"))
        } else if n.ends_with("mlp.c_fc") {
            Some(n.replace("mlp.c_fc", "ln_2"))
        } else {
            None // c_proj: no LayerNorm to fold into; not smoothed (README).
        };
        if let (Some(alpha), Some(ln)) = (opts.smooth_alpha, ln) {
            let wname = format!("{n}.weight");
            let s = int8::smooth_scales(&stat, &map[&wname], alpha);
            int8::fold_smoothing(map, &ln, &wname, &s);
            stat /= &s;
        }
        if let Some(thr) = opts.outlier_threshold {
            let idx = stat.gt(thr).nonzero().reshape([-1]);
            outliers.insert(n.clone(), idx);
        }
    }
    Ok(outliers)
}

/// The artifact's tensors (`quant::encode_weight` for those stored int8) and a
/// `TensorStat` for every linear weight and int8 embedding.
fn encode(
    map: BTreeMap<String, Tensor>,
    linear_names: &[String],
    zeros: &BTreeMap<String, i64>,
    outliers: &BTreeMap<String, Tensor>,
    int8: bool,
    quantize_embeddings: bool,
) -> (Vec<(String, Tensor)>, Vec<TensorStat>) {
    let mut out = Vec::new();
    let mut stats = Vec::new();
    for (name, t) in map {
        let layer = name
            .strip_suffix(".weight")
            .filter(|l| linear_names.iter().any(|n| n == l));
        let is_int8 =
            int8 && (layer.is_some() || (quant::rows_are_out(&name) && quantize_embeddings));
        if layer.is_none() && !is_int8 {
            out.push((name, t));
            continue;
        }
        let numel = t.numel() as i64;
        let zeros = layer.map_or(0, |l| zeros[l]);
        let mut stat = TensorStat {
            name: name.clone(),
            numel,
            zeros,
            sparsity: zeros as f64 / numel.max(1) as f64,
            stored: if is_int8 { "int8" } else { "f32" }.into(),
            outlier_columns: 0,
        };
        if !is_int8 {
            stats.push(stat);
            out.push((name, t));
            continue;
        }
        if let Some((l, idx)) = layer.and_then(|l| Some((l, outliers.get(l)?))) {
            stat.outlier_columns = idx.numel() as i64;
            out.push((quant::outlier_name(l), idx.shallow_clone()));
        }
        stats.push(stat);
        out.extend(quant::encode_weight(&name, &t));
    }
    (out, stats)
}

/// SHA-256 (hex) over the bytes of `paths`, in order.
pub fn sha256_files(paths: &[std::path::PathBuf]) -> Result<String> {
    infer::manifest::sha256_files(paths).map(|(_, hex)| hex)
}
