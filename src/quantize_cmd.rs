//! `gpt2kit quantize` and `gpt2kit dequantize`: int8 artifacts and pruning, with a
//! report of what they cost (bytes, perplexity, decode speed, sparsity per tensor).
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args as ClapArgs;
use infer::checkpoint::WeightFiles;
use infer::folder::{self, TempFolder};
use infer::quant::{Method, QuantizationConfig};
use infer::{Gpt2, Gpt2Config, Tokenizer};
use quantize::{Calibration, Options, Prune};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::choices::{name, PrunePattern, PruneScope, QuantMethod};
use crate::Out;

#[derive(ClapArgs)]
/// Negative numbers are values, not flags (`--seed -1` is refused by its type).
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Float model folder to quantize (Hugging Face layout).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Artifact folder to write; must not exist.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// int8-weight (int8 weights, float activations), int8-dynamic (int8 weights and
    /// activations) or none (float weights: pruning / layer dropping only).
    #[arg(long, value_enum)]
    pub(crate) method: QuantMethod,
    /// Keep wte (and the tied head) in float.
    #[arg(long)]
    pub(crate) keep_embeddings_float: bool,
    /// Fraction of each linear weight to zero by magnitude, in [0, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) prune_sparsity: Option<f64>,
    /// layer (a threshold per tensor) or global (one over all linear weights).
    #[arg(long, value_enum, default_value_t = PruneScope::Layer)]
    pub(crate) prune_scope: PruneScope,
    /// unstructured, or 2:4 (2 of every 4 consecutive input rows per output column).
    #[arg(long, value_enum, default_value_t = PrunePattern::Unstructured)]
    pub(crate) prune_pattern: PrunePattern,
    /// Layers to remove, e.g. 3,7.
    #[arg(long, value_delimiter = ',')]
    pub(crate) drop_layers: Vec<i64>,
    /// Layers to keep (the others are removed), e.g. 0,1,2,5.
    #[arg(long, value_delimiter = ',')]
    pub(crate) keep_layers: Vec<i64>,
    /// JSONL sample for activation statistics (SmoothQuant, outlier columns; for a
    /// .gguf --out, llama.cpp's importance matrix).
    #[arg(long)]
    pub(crate) calibration: Option<PathBuf>,
    /// Blocks of the calibration file to run (each up to --block-size tokens).
    #[arg(long, default_value_t = 64)]
    pub(crate) calibration_samples: usize,
    /// SmoothQuant migration strength in [0, 1] (int8-dynamic; needs --calibration).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) smooth_alpha: Option<f64>,
    /// Input channels whose calibration max |x| exceeds this stay float (int8-dynamic).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) outlier_threshold: Option<f64>,
    /// JSONL file for perplexity before and after.
    #[arg(long)]
    pub(crate) eval: Option<PathBuf>,
    /// The JSON field holding a text row's text in --eval and --calibration files (as
    /// train's --text-field).
    #[arg(long, default_value = "text")]
    pub(crate) text_field: String,
    /// Tokens per block for --eval and --calibration (default: n_positions, at most 256).
    #[arg(long)]
    pub(crate) block_size: Option<i64>,
    /// Greedy tokens timed for decode speed before and after (0 skips it).
    #[arg(long, default_value_t = 32)]
    pub(crate) decode_tokens: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    engine: crate::EngineArgs,
}

#[derive(ClapArgs)]
pub struct DequantizeArgs {
    /// gpt2kit int8 artifact folder, or a .gguf file.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Float model folder to write; must not exist.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn usage(msg: String) -> anyhow::Error {
    infer::Error::Input(msg).into()
}

/// Refuses an existing output path before any work.
pub(crate) fn check_out(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        return Err(usage(format!(
            "--out {}: already exists; choose a new folder",
            out.display()
        )));
    }
    Ok(())
}

impl Args {
    /// What `quantize_report` measures the source and the result with.
    pub(crate) fn report_settings(&self) -> crate::quantize_report::Settings<'_> {
        crate::quantize_report::Settings {
            model: &self.model,
            eval: self.eval.as_deref(),
            text_field: &self.text_field,
            decode_tokens: self.decode_tokens,
            // A packed file is used when present, never written (a measured artifact is
            // in a temporary folder; the source is not run here again).
            engine: self.engine.infer_options(),
        }
    }
}

/// A config.json naming the quantization it carries, if any, as an error message.
fn already_quantized(config: &Gpt2Config, dir: &Path) -> Option<String> {
    let q = config.extra.get(infer::quant::CONFIG_KEY)?;
    let method = q.get("method").and_then(|m| m.as_str()).unwrap_or("?");
    let qm = q
        .get("quant_method")
        .and_then(|m| m.as_str())
        .unwrap_or("?");
    let src = q
        .get("source_sha256")
        .and_then(|m| m.as_str())
        .map(|s| {
            let short: String = s.chars().take(12).collect();
            format!(", from source weights sha256 {short}")
        })
        .unwrap_or_default();
    Some(format!(
        "--model {}: already a quantized artifact (quant_method {qm}, method {method}{src}); \
         quantize the float model it came from, or `gpt2kit dequantize` it first",
        dir.display()
    ))
}

pub(crate) fn check_file(flag: &str, path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path)
        .map_err(|_| usage(format!("{flag} {}: no such file", path.display())))?;
    if !meta.is_file() {
        return Err(usage(format!("{flag} {}: not a file", path.display())));
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim().is_empty() {
        return Err(usage(format!(
            "{flag} {}: the file is empty",
            path.display()
        )));
    }
    Ok(())
}

/// The first `samples` token blocks (each up to `block` tokens) of a calibration file.
pub(crate) fn calibration_blocks(
    config: &Gpt2Config,
    tokenizer: &Tokenizer,
    path: &Path,
    block: i64,
    samples: usize,
    text_field: &str,
) -> anyhow::Result<Vec<Vec<i64>>> {
    let eos = train::data::eos_id(config, tokenizer)?;
    let mut opts = train::data::DataOptions::new(block);
    opts.truncation = true;
    opts.text_field = text_field.to_string();
    let (rows, _) = train::data::load_jsonl(&[path.to_path_buf()], tokenizer, eos, &opts)
        .with_context(|| format!("--calibration {}", path.display()))?;
    if rows.is_empty() {
        return Err(usage(format!(
            "--calibration {}: no rows to calibrate on",
            path.display()
        )));
    }
    Ok(rows
        .into_iter()
        .take(samples.max(1))
        .map(|s| s.ids)
        .collect())
}

/// Runs the calibration sample through the float model, recording every linear
/// layer's per-input-channel max |x|.
fn calibrate(
    model: &mut Gpt2,
    tokenizer: &Tokenizer,
    path: &Path,
    block: i64,
    samples: usize,
    text_field: &str,
) -> anyhow::Result<Calibration> {
    let rows = calibration_blocks(&model.config, tokenizer, path, block, samples, text_field)?;
    model.observe_linear_inputs()?;
    let _g = tch::no_grad_guard();
    for ids in &rows {
        // The embedding lookup does not check its ids: refuse them here.
        model.config.check_ids(ids)?;
        let ids = Tensor::from_slice(ids).unsqueeze(0);
        let _ = model.forward_train(&ids);
    }
    Ok(model.observed_input_max().into_iter().collect())
}

/// Writes config (with transformers' GPT2LMHeadModel fields) and weights into `tmp`,
/// with the tokenizer files and generation config of the `source` folder.
fn write_folder(
    tmp: &TempFolder,
    config: &Gpt2Config,
    tensors: &[(String, Tensor)],
    source: &Path,
) -> anyhow::Result<()> {
    tmp.write(folder::CONFIG_FILE, folder::config_json(config)?.as_bytes())?;
    folder::write_safetensors(&tmp.path().join(folder::SINGLE_FILE), tensors)?;
    let names: Vec<&str> = folder::TOKENIZER_FILES
        .iter()
        .copied()
        .chain([folder::GENERATION_CONFIG_FILE])
        .collect();
    for (file, bytes) in folder::read_present(source, &names)? {
        tmp.write(&file, &bytes)?;
    }
    Ok(())
}

/// Renames the written folder into place, refusing an `out` made meanwhile.
fn commit(tmp: TempFolder, out: &Path) -> anyhow::Result<()> {
    check_out(out)?;
    Ok(tmp.commit(out)?)
}

/// The method and pruning the flags ask for, every flag checked before any work.
fn check_flags(args: &Args) -> anyhow::Result<(Method, Option<Prune>)> {
    let method = args.method.method();
    let (scope, pattern) = (name(&args.prune_scope), name(&args.prune_pattern));
    let prune = Prune::new(args.prune_sparsity, &scope, &pattern)?;
    if args.calibration_samples == 0 {
        return Err(usage(
            "--calibration-samples must be at least 1 (omit --calibration to skip calibrating)"
                .into(),
        ));
    }
    if let Some(a) = args.smooth_alpha {
        if !(0.0..=1.0).contains(&a) {
            return Err(usage(format!("--smooth-alpha {a}: must lie in [0, 1]")));
        }
    }
    if let Some(t) = args.outlier_threshold {
        if t.is_nan() || t <= 0.0 {
            return Err(usage(format!("--outlier-threshold {t}: must be positive")));
        }
    }
    if args.keep_embeddings_float && !method.is_int8() {
        return Err(usage(
            "--keep-embeddings-float applies to the int8 methods".into(),
        ));
    }
    let needs_calibration = args.smooth_alpha.is_some() || args.outlier_threshold.is_some();
    if needs_calibration && method != Method::Int8Dynamic {
        return Err(usage(
            "--smooth-alpha / --outlier-threshold apply to --method int8-dynamic".into(),
        ));
    }
    if needs_calibration && args.calibration.is_none() {
        return Err(usage(
            "--smooth-alpha / --outlier-threshold need --calibration FILE.jsonl".into(),
        ));
    }
    if let Some(c) = &args.calibration {
        check_file("--calibration", c)?;
        if !needs_calibration {
            return Err(usage(
                "--calibration is used by --smooth-alpha / --outlier-threshold; give one".into(),
            ));
        }
    }
    if let Some(e) = &args.eval {
        check_file("--eval", e)?;
    }
    check_out(&args.out)?;
    Ok((method, prune))
}

/// The float model a quantize run starts from, every check done.
pub(crate) struct Source {
    pub(crate) config: Gpt2Config,
    pub(crate) block: i64,
    pub(crate) kept: Vec<i64>,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) paths: Vec<PathBuf>,
    pub(crate) model: Gpt2,
}

/// Reads and checks `--model` (config, sizes, layers to keep, tokenizer) and loads it.
pub(crate) fn load_source(args: &Args) -> anyhow::Result<Source> {
    let dir = &args.model;
    infer::model::check_model_dir(dir)?;
    if !dir.is_dir() {
        return Err(usage(format!(
            "--model {}: quantize reads a Hugging Face model folder (`gpt2kit dequantize` \
             turns a .gguf file into one)",
            dir.display()
        )));
    }
    let config = Gpt2Config::from_file(&dir.join(folder::CONFIG_FILE))?;
    if let Some(msg) = already_quantized(&config, dir) {
        return Err(usage(msg));
    }
    let block = args.block_size.unwrap_or(config.n_positions.min(256));
    if block < 2 || block > config.n_positions {
        return Err(usage(format!(
            "--block-size {block}: must lie in [2, n_positions = {}]",
            config.n_positions
        )));
    }
    // The config's sizes are checked against the weights' headers before the layer
    // list is built from n_layer.
    let files = WeightFiles::open_dir(dir)?;
    infer::model::check_sizes(&config, &files)
        .with_context(|| format!("loading model {}", dir.display()))?;
    let kept = quantize::kept_layers(config.n_layer, &args.drop_layers, &args.keep_layers)?;
    // The report runs text through both models: the tokenizer must fit the embeddings.
    let tokenizer = Tokenizer::from_dir(dir)?;
    infer::check_vocab(&config, &tokenizer, dir)?;
    let paths = folder::weight_paths(dir)?;
    let model = Gpt2::from_weights(config.clone(), &files, Kind::Float, &[Device::Cpu])
        .with_context(|| format!("loading model {}", dir.display()))?;
    Ok(Source {
        config,
        block,
        kept,
        tokenizer,
        paths,
        model,
    })
}

/// Whether `quantize` writes a GGUF file (a GGUF method, or an `--out` ending in
/// `.gguf`): `quantize_gguf::run`, not `run`.
pub fn writes_gguf(args: &Args) -> bool {
    args.method.gguf().is_some() || infer::gguf::is_gguf(&args.out)
}

/// Checks dequantize's `--model` and `--out`; a GGUF `--model` goes on to
/// `quantize_gguf::dequantize`, a folder to `run_dequantize`.
pub fn check_dequantize(args: &DequantizeArgs) -> anyhow::Result<()> {
    infer::model::check_model_dir(&args.model)?;
    check_out(&args.out)
}

pub fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    let (method, prune) = check_flags(args)?;
    let dir = &args.model;
    let Source {
        config,
        block,
        kept,
        tokenizer,
        paths,
        mut model,
    } = load_source(args)?;
    let source_sha256 = quantize::sha256_files(&paths)?;
    let calibration = match &args.calibration {
        Some(path) => Some(calibrate(
            &mut model,
            &tokenizer,
            path,
            block,
            args.calibration_samples,
            &args.text_field,
        )?),
        None => None,
    };
    let opts = Options {
        method,
        keep_embeddings_float: args.keep_embeddings_float,
        prune,
        kept_layers: kept,
        smooth_alpha: args.smooth_alpha,
        outlier_threshold: args.outlier_threshold,
        source_sha256,
    };
    let artifact =
        quantize::quantize(&config, model.named_tensors()?, &opts, calibration.as_ref())?;
    drop(model);
    let tmp = TempFolder::beside(&args.out)?;
    write_folder(&tmp, &artifact.config, &artifact.tensors, dir)?;
    // Measured on the folder as written, before it is renamed into place.
    let weights = folder::weight_paths(tmp.path())?;
    let mut report = crate::quantize_report::report(
        &args.report_settings(),
        &paths,
        (tmp.path(), &weights),
        block,
    )?;
    let qc =
        QuantizationConfig::from_config(&artifact.config, &tmp.path().join(folder::CONFIG_FILE))?;
    report["method"] = json!(method.name());
    report["quantization_config"] = json!(qc);
    report["tensors"] = json!(artifact.stats);
    tmp.write(
        "quantize_report.json",
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    commit(tmp, &args.out)?;
    if args.json {
        return crate::write_json(out, &report);
    }
    print_table(out, &report, &artifact.stats, &args.out)
}

fn print_table(
    out: &mut Out,
    r: &serde_json::Value,
    stats: &[quantize::TensorStat],
    path: &Path,
) -> anyhow::Result<()> {
    let num = |k: &str| r[k].as_f64();
    let fmt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let ratio = |a: Option<f64>, b: Option<f64>, pct: bool| match (a, b) {
        (Some(a), Some(b)) if pct => format!("{:+.2}%", (b / a - 1.0) * 100.0),
        (Some(a), Some(b)) => format!("{:.2}×", b / a),
        _ => "-".into(),
    };
    writeln!(
        out,
        "wrote {} ({})",
        path.display(),
        r["method"].as_str().unwrap_or("")
    )?;
    writeln!(out, "| measure | before | after | change |")?;
    writeln!(out, "|---|---|---|---|")?;
    let (b0, b1) = (num("bytes_before"), num("bytes_after"));
    writeln!(
        out,
        "| bytes | {} | {} | {:.1}% of before |",
        fmt(b0, 0),
        fmt(b1, 0),
        b1.unwrap_or(0.0) / b0.unwrap_or(1.0).max(1.0) * 100.0
    )?;
    let (p0, p1) = (num("perplexity_before"), num("perplexity_after"));
    writeln!(
        out,
        "| perplexity | {} | {} | {} |",
        fmt(p0, 3),
        fmt(p1, 3),
        ratio(p0, p1, true)
    )?;
    let (t0, t1) = (
        num("decode_tokens_per_s_before"),
        num("decode_tokens_per_s_after"),
    );
    writeln!(
        out,
        "| decode tok/s (batch 1, greedy) | {} | {} | {} |",
        fmt(t0, 1),
        fmt(t1, 1),
        ratio(t0, t1, false)
    )?;
    writeln!(out)?;
    writeln!(out, "| tensor | stored | sparsity | outlier columns |")?;
    writeln!(out, "|---|---|---|---|")?;
    for s in stats {
        writeln!(
            out,
            "| {} | {} | {:.1}% | {} |",
            s.name,
            s.stored,
            s.sparsity * 100.0,
            s.outlier_columns
        )?;
    }
    Ok(())
}

pub fn run_dequantize(args: &DequantizeArgs, out: &mut Out) -> anyhow::Result<()> {
    let dir = &args.model;
    let config = Gpt2Config::from_file(&dir.join(folder::CONFIG_FILE))?;
    if !config.extra.contains_key(infer::quant::CONFIG_KEY) {
        return Err(usage(format!(
            "--model {}: not a gpt2kit artifact (config.json has no quantization_config); \
             it is a float model already",
            dir.display()
        )));
    }
    // Loading the artifact validates it (scales, shapes, dtypes, config) first.
    Gpt2::from_weights(
        config.clone(),
        &WeightFiles::open_dir(dir)?,
        Kind::Float,
        &[Device::Cpu],
    )
    .with_context(|| format!("loading artifact {}", dir.display()))?;
    let files = WeightFiles::open_dir(dir)?;
    let mut names: Vec<String> = files.names().map(str::to_string).collect();
    names.sort();
    let (float_config, tensors) = infer::quant::dequantize_artifact(&config, &files, &names)?;
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| {
            let n = n
                .strip_prefix("transformer.")
                .map_or(n.clone(), str::to_string);
            (n, t)
        })
        .collect();
    let tmp = TempFolder::beside(&args.out)?;
    // transformers' names: `transformer.` before the body, `lm_head.weight` alone.
    write_folder(&tmp, &float_config, &folder::hf_names(&tensors), dir)?;
    let n = tensors.len();
    commit(tmp, &args.out)?;
    writeln!(
        out,
        "wrote {} ({n} float tensors, transformers-loadable)",
        args.out.display()
    )?;
    Ok(())
}
