//! GPT-2's random initialisation, as transformers' `GPT2PreTrainedModel._init_weights`
//! does it: embeddings and every Conv1D/Linear weight ~ N(0, initializer_range), the
//! residual projections (`attn.c_proj`, `mlp.c_proj`) ~ N(0, initializer_range/√(2·n_layer))
//! (the GPT-2 paper's scaled init), biases 0, layer norms weight 1 and bias 0.
use std::path::Path;

use anyhow::{Context, Result};
use infer::config::TokenIds;
use infer::{Gpt2Config, Tokenizer};
use tch::{Device, Kind, Tensor};

use crate::folder::write_plain_model;

pub use infer::folder::INITIALIZER_RANGE;

/// Preset names `init` accepts: `tiny` and `small` (ours) and the published shapes.
pub const PRESET_NAMES: &[&str] = &[
    "tiny",
    "small",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "distilgpt2",
];

/// A preset's config (vocab_size still GPT-2's: the tokenizer sets it).
/// `tiny`: 4 layers × 4 heads × 256 wide, 256 positions, trains in minutes on a laptop
/// CPU; `small`: 6 × 8 × 512, 512 positions.
pub fn preset(name: &str) -> Option<Gpt2Config> {
    let shape = |l, h, e, p| {
        let mut c = Gpt2Config::preset("gpt2")?;
        (c.n_layer, c.n_head, c.n_embd, c.n_positions) = (l, h, e, p);
        Some(c)
    };
    match name {
        "tiny" => shape(4, 4, 256, 256),
        "small" => shape(6, 8, 512, 512),
        _ => Gpt2Config::preset(name),
    }
}

/// Random tensors for `config`, by checkpoint name (no `transformer.` prefix), drawn in
/// a fixed order from libtorch's generator seeded with `seed`.
pub fn init_tensors(config: &Gpt2Config, std: f64, seed: u64) -> Vec<(String, Tensor)> {
    // libtorch's default generator is process-wide: hold it for the whole draw.
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    let (e, v, p, i) = (
        config.n_embd,
        config.vocab_size,
        config.n_positions,
        config.inner_dim(),
    );
    let opts = (Kind::Float, Device::Cpu);
    let normal = |shape: &[i64], s: f64| Tensor::empty(shape, opts).normal_(0.0, s);
    let proj_std = std / ((2 * config.n_layer) as f64).sqrt();
    let mut out = vec![
        ("wte.weight".to_string(), normal(&[v, e], std)),
        ("wpe.weight".to_string(), normal(&[p, e], std)),
    ];
    let ln = |out: &mut Vec<(String, Tensor)>, name: String| {
        out.push((format!("{name}.weight"), Tensor::ones([e], opts)));
        out.push((format!("{name}.bias"), Tensor::zeros([e], opts)));
    };
    for l in 0..config.n_layer {
        let lin = |out: &mut Vec<(String, Tensor)>, name: &str, n_in, n_out, s| {
            out.push((format!("h.{l}.{name}.weight"), normal(&[n_in, n_out], s)));
            out.push((format!("h.{l}.{name}.bias"), Tensor::zeros([n_out], opts)));
        };
        ln(&mut out, format!("h.{l}.ln_1"));
        lin(&mut out, "attn.c_attn", e, 3 * e, std);
        lin(&mut out, "attn.c_proj", e, e, proj_std);
        ln(&mut out, format!("h.{l}.ln_2"));
        lin(&mut out, "mlp.c_fc", e, i, std);
        lin(&mut out, "mlp.c_proj", i, e, proj_std);
    }
    ln(&mut out, "ln_f".into());
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), normal(&[v, e], std)));
    }
    out
}

/// Options of `gpt2kit init`.
pub struct InitOptions<'a> {
    pub preset: &'a str,
    pub tokenizer_dir: &'a Path,
    pub out: &'a Path,
    pub seed: u64,
    pub n_layer: Option<i64>,
    pub n_head: Option<i64>,
    pub n_embd: Option<i64>,
    pub n_positions: Option<i64>,
}

/// Makes the config (preset, overrides, the tokenizer's vocabulary and end-of-text id),
/// draws the weights and writes the model folder. Returns the config.
pub fn init_model(opts: &InitOptions) -> Result<Gpt2Config> {
    let mut config = preset(opts.preset).ok_or_else(|| {
        infer::Error::Input(format!(
            "--preset {:?}: expected one of {}",
            opts.preset,
            PRESET_NAMES.join(", ")
        ))
    })?;
    for (flag, value, field) in [
        ("--n-layer", opts.n_layer, &mut config.n_layer),
        ("--n-head", opts.n_head, &mut config.n_head),
        ("--n-embd", opts.n_embd, &mut config.n_embd),
        ("--n-positions", opts.n_positions, &mut config.n_positions),
    ] {
        if let Some(v) = value {
            if v <= 0 {
                return Err(
                    infer::Error::Input(format!("{flag} must be positive, got {v}")).into(),
                );
            }
            *field = v;
        }
    }
    let tokenizer = Tokenizer::from_dir(opts.tokenizer_dir)
        .with_context(|| format!("--tokenizer {}", opts.tokenizer_dir.display()))?;
    config.vocab_size = tokenizer.id_bound() as i64;
    // GPT-2 separates documents with <|endoftext|> (its bos and eos): a tokenizer without
    // it would make some arbitrary token the separator.
    let eos = tokenizer.token_to_id("<|endoftext|>").ok_or_else(|| {
        infer::Error::Input(format!(
            "--tokenizer {}: has no <|endoftext|> token, which GPT-2 uses as bos and eos \
             (`gpt2kit tokenizer train` adds it)",
            opts.tokenizer_dir.display()
        ))
    })?;
    config.bos_token_id = Some(TokenIds::One(eos));
    config.eos_token_id = Some(TokenIds::One(eos));
    config.extra.insert(
        "initializer_range".into(),
        serde_json::json!(INITIALIZER_RANGE),
    );
    config
        .validate()
        .map_err(|reason| infer::Error::Input(format!("the model's config: {reason}")))?;
    check_fits_in_memory(&config)?;
    if opts.out.exists() && std::fs::read_dir(opts.out).map_or(true, |mut d| d.next().is_some()) {
        return Err(infer::Error::Input(format!(
            "--out {}: already exists and is not empty",
            opts.out.display()
        ))
        .into());
    }
    let tensors = init_tensors(&config, INITIALIZER_RANGE, opts.seed);
    let tokenizer_files = crate::folder::read_tokenizer_files(opts.tokenizer_dir)?;
    write_plain_model(opts.out, &config, &tensors, &tokenizer_files, true)?;
    Ok(config)
}

/// Refuses a model whose f32 weights alone exceed the machine's memory, naming the
/// sizes, before drawing them (the draw would grow until the kernel killed it).
fn check_fits_in_memory(config: &Gpt2Config) -> Result<()> {
    let bytes = config.num_parameters().saturating_mul(4) as u64;
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    match total {
        Some(total) if bytes > total => Err(infer::Error::Input(format!(
            "a model of n_layer {}, n_embd {}, n_positions {} and vocab_size {} has {} \
             parameters: {:.1} GB of f32 weights, more than this machine's {:.1} GB of memory",
            config.n_layer,
            config.n_embd,
            config.n_positions,
            config.vocab_size,
            config.num_parameters(),
            bytes as f64 / 1e9,
            total as f64 / 1e9
        ))
        .into()),
        _ => Ok(()),
    }
}
