//! `gpt2kit inspect`: what a model folder holds, checked by loading it.
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use infer::checkpoint::WeightFiles;
use infer::device::dtype_name;
use infer::{Gpt2, Gpt2Config, Tokenizer};
use serde_json::json;

use crate::Out;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    let dir = &args.model;
    // Every tensor is read and checked, once, with no decode-kernel packing.
    infer::model::check_model_dir(dir)?;
    let config = Gpt2Config::from_file(&dir.join("config.json"))?;
    let files = WeightFiles::open_dir(dir)?;
    let kind = infer::model::stored_kind(&files);
    let model = Gpt2::from_weights(config, &files, kind, &[tch::Device::Cpu])
        .with_context(|| format!("loading model {}", dir.display()))?;
    let tokenizer = Tokenizer::from_dir(dir).ok();
    let c = &model.config;
    let params = c.num_parameters();
    let bytes = files.file_bytes();
    let stored: Vec<String> = files
        .dtype_summary()
        .iter()
        .map(|(d, n)| format!("{d} {}", group(*n)))
        .collect();
    if args.json {
        return crate::write_json(
            out,
            &json!({
                "model": dir,
                "config": c,
                "parameters": params,
                "dtype": dtype_name(model.kind()),
                "stored_dtypes": files.dtype_summary().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "file_bytes": bytes,
                "tokenizer_vocab_size": tokenizer.as_ref().map(Tokenizer::vocab_size),
            }),
        );
    }
    let rows = [
        ("model", dir.display().to_string()),
        (
            "shape",
            format!(
                "n_layer {} · n_head {} · n_embd {} · n_inner {} · n_positions {} · vocab_size {}",
                c.n_layer,
                c.n_head,
                c.n_embd,
                c.inner_dim(),
                c.n_positions,
                c.vocab_size
            ),
        ),
        (
            "options",
            format!(
                "activation {} · layer_norm_epsilon {} · scale_attn_weights {} · \
                 scale_attn_by_inverse_layer_idx {} · reorder_and_upcast_attn {}",
                c.activation_function,
                c.layer_norm_epsilon,
                c.scale_attn_weights,
                c.scale_attn_by_inverse_layer_idx,
                c.reorder_and_upcast_attn
            ),
        ),
        (
            "parameters",
            format!(
                "{} ({})",
                group(params),
                if c.tie_word_embeddings {
                    "head tied to wte"
                } else {
                    "own lm_head"
                }
            ),
        ),
        (
            "dtype",
            format!(
                "{} (stored: {})",
                dtype_name(model.kind()),
                stored.join(", ")
            ),
        ),
        (
            "bytes",
            format!(
                "{} ({:.1} MiB on disk)",
                group(bytes as i64),
                bytes as f64 / (1 << 20) as f64
            ),
        ),
        (
            "tokenizer",
            tokenizer.map_or("none found".into(), |t| {
                format!("{} tokens", t.vocab_size())
            }),
        ),
        ("eos", format!("{:?}", c.eos_ids())),
    ];
    for (k, v) in rows {
        writeln!(out, "{k:<11}{v}")?;
    }
    Ok(())
}

/// 124439808 → "124,439,808".
fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut g = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            g.push(',');
        }
        g.push(ch);
    }
    if n < 0 {
        format!("-{g}")
    } else {
        g
    }
}
