//! `gpt2kit quantize --out FILE.gguf`: the GGUF file llama.cpp's converter and
//! `llama-quantize` write for the model (`quantize::gguf`), after layer dropping and
//! pruning, with the same report (bytes, perplexity, decode speed) as the artifacts.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use infer::folder::{self, TempFolder};
use infer::gguf::vocab::SpecialIds;
use infer::Tokenizer;
use quantize::gguf::{self as gg, Stored};
use quantize::Options;
use serde_json::json;

use crate::choices::name;
use crate::quantize_cmd::{check_file, check_out, load_source, usage, Args, DequantizeArgs};
use crate::Out;

/// The GGUF method, every flag checked before any work.
fn check_flags(args: &Args) -> anyhow::Result<(gg::Method, Option<quantize::Prune>)> {
    let method = args.method.gguf().ok_or_else(|| {
        usage(format!(
            "--method {}: a .gguf --out takes q8_0, q4_0, q4_k_m, f16, bf16 or f32 \
             (the int8 methods write a gpt2kit artifact folder)",
            name(&args.method)
        ))
    })?;
    if !infer::gguf::is_gguf(&args.out) {
        return Err(usage(format!(
            "--method {}: writes a GGUF file; give --out a name ending in .gguf",
            name(&args.method)
        )));
    }
    let refused = [
        (args.smooth_alpha.is_some(), "--smooth-alpha (SmoothQuant)"),
        (args.outlier_threshold.is_some(), "--outlier-threshold"),
        (args.keep_embeddings_float, "--keep-embeddings-float"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(on, _)| *on) {
        return Err(usage(format!(
            "{flag} applies to the int8 artifacts, not to a .gguf --out"
        )));
    }
    let (scope, pattern) = (name(&args.prune_scope), name(&args.prune_pattern));
    let prune = quantize::Prune::new(args.prune_sparsity, &scope, &pattern)?;
    if let Some(e) = &args.eval {
        check_file("--eval", e)?;
    }
    if let Some(c) = &args.calibration {
        check_file("--calibration", c)?;
    }
    if args.calibration_samples == 0 {
        return Err(usage("--calibration-samples must be at least 1".into()));
    }
    check_out(&args.out)?;
    Ok((method, prune))
}

/// The special ids as gguf-py's `SpecialVocab` reads them: bos/eos from the config,
/// `unk_token` and `add_bos_token` / `add_eos_token` from `tokenizer_config.json`.
fn special_ids(dir: &Path, config: &infer::Gpt2Config, tokenizer: &Tokenizer) -> SpecialIds {
    let json: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let unk = &json["unk_token"];
    SpecialIds {
        bos: config.bos_ids().first().copied(),
        eos: config.eos_ids().first().copied(),
        unk: unk
            .as_str()
            .or_else(|| unk["content"].as_str())
            .and_then(|u| tokenizer.token_to_id(u)),
        add_bos: json["add_bos_token"].as_bool(),
        add_eos: json["add_eos_token"].as_bool(),
    }
}

pub(crate) fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    let (method, prune) = check_flags(args)?;
    let dir = &args.model;
    let src = load_source(args)?;
    let opts = Options {
        method: infer::quant::Method::None,
        keep_embeddings_float: false,
        prune,
        kept_layers: src.kept.clone(),
        smooth_alpha: None,
        outlier_threshold: None,
        source_sha256: String::new(),
    };
    let artifact = quantize::quantize(&src.config, src.model.named_tensors()?, &opts, None)?;
    drop(src.model);
    let mut config = artifact.config;
    config.extra.remove(infer::quant::CONFIG_KEY);
    let tensors: BTreeMap<_, _> = artifact.tensors.into_iter().collect();
    let ids = special_ids(dir, &config, &src.tokenizer);
    // llama.cpp's importance matrix over the calibration text, on the tensors as written.
    let importance = match &args.calibration {
        Some(path) => {
            let blocks = crate::quantize_cmd::calibration_blocks(
                &config,
                &src.tokenizer,
                path,
                src.block,
                args.calibration_samples,
                &args.text_field,
            )?;
            quantize::imatrix::importance(&config, &tensors, &blocks)?
        }
        None => BTreeMap::new(),
    };
    let model_name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "gpt2".into());
    let (meta, data) = gg::encode(
        &config,
        &tensors,
        method,
        &src.tokenizer,
        &ids,
        &model_name,
        &importance,
    )?;
    drop(tensors);
    let stored: Vec<Stored> = data
        .iter()
        .map(|t| Stored {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty.name(),
            bytes: t.bytes.len(),
        })
        .collect();
    gg::write(&args.out, &meta, &data).with_context(|| format!("--out {}", args.out.display()))?;
    drop(data);
    // Measured on the file as written; a failure removes it (a failed quantize writes nothing).
    let report = report(args, &src.paths, src.block, name(&args.method), &stored);
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&args.out);
            return Err(e);
        }
    };
    if args.json {
        return crate::write_json(out, &report);
    }
    print_table(out, &report, &stored, &args.out)
}

fn report(
    args: &Args,
    paths: &[std::path::PathBuf],
    block: i64,
    method: String,
    stored: &[Stored],
) -> anyhow::Result<serde_json::Value> {
    let mut r = crate::quantize_report::report(
        &args.report_settings(),
        paths,
        (&args.out, &[args.out.clone()]),
        block,
    )?;
    r["out"] = json!(args.out.to_string_lossy());
    r["method"] = json!(method);
    r["format"] = json!("gguf");
    r["tensors"] = json!(stored);
    Ok(r)
}

fn print_table(
    out: &mut Out,
    r: &serde_json::Value,
    stored: &[Stored],
    path: &Path,
) -> anyhow::Result<()> {
    let num = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
    writeln!(
        out,
        "wrote {} (GGUF, {})",
        path.display(),
        r["method"].as_str().unwrap_or("")
    )?;
    writeln!(out, "| measure | before | after |")?;
    writeln!(out, "|---|---|---|")?;
    writeln!(
        out,
        "| bytes | {} | {} |",
        r["bytes_before"], r["bytes_after"]
    )?;
    let (p0, p1) = (num("perplexity_before"), num("perplexity_after"));
    writeln!(out, "| perplexity | {p0} | {p1} |")?;
    let (t0, t1) = (
        num("decode_tokens_per_s_before"),
        num("decode_tokens_per_s_after"),
    );
    writeln!(out, "| decode tok/s (batch 1, greedy) | {t0} | {t1} |")?;
    writeln!(out)?;
    writeln!(out, "| tensor | type | dims | bytes |")?;
    writeln!(out, "|---|---|---|---|")?;
    for s in stored {
        writeln!(
            out,
            "| {} | {} | {:?} | {} |",
            s.name, s.ty, s.dims, s.bytes
        )?;
    }
    Ok(())
}

/// `gpt2kit dequantize --model FILE.gguf`: the float folder transformers loads (config,
/// f32 weights under save_pretrained's names, tokenizer.json, generation config).
pub(crate) fn dequantize(args: &DequantizeArgs, out: &mut Out) -> anyhow::Result<()> {
    let path = &args.model;
    let (config, tensors) = infer::gguf::load::read(path)?;
    let file = infer::gguf::GgufFile::open(path)?;
    let tokenizer = infer::gguf::vocab::tokenizer_json(&file.header, path)?;
    // Built once to check it, as every model is before it is written.
    Tokenizer::from_json_value(&tokenizer, path)?;
    let tmp = TempFolder::beside(&args.out)?;
    tmp.write(
        folder::CONFIG_FILE,
        folder::config_json(&config)?.as_bytes(),
    )?;
    folder::write_safetensors(
        &tmp.path().join(folder::SINGLE_FILE),
        &folder::hf_names(&tensors),
    )?;
    tmp.write("tokenizer.json", tokenizer.to_string().as_bytes())?;
    tmp.write(
        folder::GENERATION_CONFIG_FILE,
        folder::generation_config_json(&config)?.as_bytes(),
    )?;
    check_out(&args.out)?;
    tmp.commit(&args.out)?;
    writeln!(
        out,
        "wrote {} ({} float tensors from {}, transformers-loadable)",
        args.out.display(),
        tensors.len(),
        path.display()
    )?;
    Ok(())
}
