//! `gpt2kit inspect`: what a model folder holds, checked by loading it; or, with
//! `--verify`, whether a folder gpt2kit wrote still matches its manifest.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use infer::checkpoint::WeightFiles;
use infer::device::dtype_name;
use infer::{Gpt2, Gpt2Config, Tokenizer};
use serde_json::json;

use crate::Out;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, required_unless_present = "verify", conflicts_with = "verify")]
    model: Option<PathBuf>,
    /// Check a folder gpt2kit wrote (a model, artifact, tokenizer, checkpoint, or a
    /// training output folder: each checkpoint and final/) against its manifest.
    #[arg(long, value_name = "DIR")]
    verify: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args, out: &mut Out) -> anyhow::Result<()> {
    if let Some(dir) = &args.verify {
        return verify(dir, args.json, out);
    }
    let Some(dir) = &args.model else {
        anyhow::bail!("--model or --verify is required");
    };
    let model = Inspected::load(dir)?;
    if args.json {
        return crate::write_json(out, &model.json());
    }
    for (k, v) in model.table() {
        writeln!(out, "{k:<11}{v}")?;
    }
    Ok(())
}

/// `--verify DIR`: the folder against its manifest, or, for a folder without one (a
/// training output folder), each subfolder that has one. Every folder is reported; the
/// first failure is the error (exit 1), naming the file.
fn verify(dir: &Path, json: bool, out: &mut Out) -> anyhow::Result<()> {
    use infer::manifest::{self, Verified, MANIFEST_FILE};
    let mut folders = vec![dir.to_path_buf()];
    if !dir.join(MANIFEST_FILE).exists() && dir.is_dir() {
        let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .filter(|p| p.join(MANIFEST_FILE).exists())
            .collect();
        subs.sort();
        if !subs.is_empty() {
            folders = subs;
        }
    }
    let mut rows = Vec::new();
    let mut first_err = None;
    for f in &folders {
        let row = match manifest::verify(f) {
            Ok(Verified::Complete { files, bytes }) => {
                json!({"folder": f.to_string_lossy(), "ok": true, "files": files, "bytes": bytes})
            }
            Ok(Verified::NoManifest) => {
                let e = infer::Error::Integrity {
                    path: f.clone(),
                    reason: format!(
                        "no {MANIFEST_FILE} (written before manifests existed, or not by                          gpt2kit): nothing to verify"
                    ),
                };
                let row =
                    json!({"folder": f.to_string_lossy(), "ok": false, "error": e.to_string()});
                first_err.get_or_insert(e);
                row
            }
            Err(e) => {
                let row =
                    json!({"folder": f.to_string_lossy(), "ok": false, "error": e.to_string()});
                first_err.get_or_insert(e);
                row
            }
        };
        rows.push(row);
    }
    if json {
        crate::write_json(out, &json!({ "verified": rows }))?;
    } else {
        for r in &rows {
            if r["ok"] == true {
                writeln!(
                    out,
                    "ok    {}: {} files, {} bytes match {MANIFEST_FILE}",
                    r["folder"].as_str().unwrap_or_default(),
                    r["files"],
                    r["bytes"]
                )?;
            } else {
                writeln!(out, "FAIL  {}", r["error"].as_str().unwrap_or_default())?;
            }
        }
    }
    match first_err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// A model folder loaded and checked: its weight files, the model, its tokenizer if any.
struct Inspected<'a> {
    dir: &'a Path,
    /// Stored dtypes (ggml types for a GGUF file) with their element counts.
    stored: Vec<(String, i64)>,
    file_bytes: u64,
    model: Gpt2,
    tokenizer: Option<Tokenizer>,
}

impl<'a> Inspected<'a> {
    /// Reads and checks every tensor, once, with no decode-kernel packing; a tensor
    /// holding NaN or ±inf, a broken tokenizer or one larger than the embedding table
    /// is an error.
    fn load(dir: &'a Path) -> anyhow::Result<Self> {
        infer::model::check_model_dir(dir)?;
        if infer::gguf::is_gguf(dir) {
            return Self::load_gguf(dir);
        }
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let files = WeightFiles::open_dir(dir)?;
        // Every float tensor is scanned for NaN and ±inf first, so that all of them are named.
        let bad = files.non_finite();
        if !bad.is_empty() {
            // `bad[0]`: not empty (checked above)
            anyhow::bail!(
                "{}: {} tensor(s) hold NaN or infinite values: {}",
                files.path_of(&bad[0]).display(),
                bad.len(),
                bad.iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let kind = infer::model::stored_kind(&files);
        let model = Gpt2::from_weights(config, &files, kind, &[tch::Device::Cpu])
            .with_context(|| format!("loading model {}", dir.display()))?;
        // No tokenizer is reported as such; a broken one, or one larger than the
        // embedding table, is an error.
        let tokenizer = match Tokenizer::from_dir(dir) {
            Ok(t) => {
                infer::check_vocab(&model.config, &t, dir)?;
                Some(t)
            }
            Err(infer::Error::Tokenizer { path, .. }) if path == dir => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            dir,
            stored: files.dtype_summary(),
            file_bytes: files.file_bytes(),
            model,
            tokenizer,
        })
    }

    /// A GGUF file, loaded as `infer` loads it in its own dtype (f32, or bf16 for an
    /// all-BF16 file): every tensor checked (quantized ones from their blocks' scales,
    /// read in place; float ones dequantized one at a time).
    fn load_gguf(path: &'a Path) -> anyhow::Result<Self> {
        let file = infer::gguf::GgufFile::open(path)?;
        let mut by: std::collections::BTreeMap<String, i64> = Default::default();
        for t in &file.header.tensors {
            *by.entry(t.ty.name().to_string()).or_default() += t.numel() as i64;
        }
        let options = infer::EngineOptions {
            fused_decode: false,
            ..infer::EngineOptions::default()
        };
        let model = infer::gguf::load::load(path, None, &[tch::Device::Cpu], &options)
            .with_context(|| format!("loading model {}", path.display()))?;
        let tokenizer = Tokenizer::from_dir(path)?;
        infer::check_vocab(&model.config, &tokenizer, path)?;
        Ok(Self {
            dir: path,
            stored: by.into_iter().collect(),
            file_bytes: file.file_bytes(),
            model,
            tokenizer: Some(tokenizer),
        })
    }

    /// The `--json` object.
    fn json(&self) -> serde_json::Value {
        let (dir, model) = (self.dir, &self.model);
        let c = &model.config;
        json!({
            "model": dir.to_string_lossy(),
            "config": c,
            "parameters": c.num_parameters(),
            "dtype": dtype_name(model.kind()),
            "stored_dtypes": self.stored.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "file_bytes": self.file_bytes,
            "tokenizer_vocab_size": self.tokenizer.as_ref().map(Tokenizer::vocab_size),
            "quantization": model.quantization().map(|q| json!({
                "method": q.method.name(),
                "quant_method": q.quant_method,
                "bits": q.bits,
                "granularity": q.granularity,
                "quantize_embeddings": q.quantize_embeddings,
                "sparsity": q.sparsity,
                "dropped_layers": q.dropped_layers,
            })),
        })
    }

    /// The table's rows: (label, value).
    fn table(&self) -> [(&'static str, String); 9] {
        let (dir, model) = (self.dir, &self.model);
        let c = &model.config;
        let params = c.num_parameters();
        let bytes = self.file_bytes;
        let stored: Vec<String> = self
            .stored
            .iter()
            .map(|(d, n)| format!("{d} {}", group(*n)))
            .collect();
        [
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
                "quantized",
                match model.quantization() {
                    Some(q) => describe(q),
                    // a GGUF file's quantized tensors show in `stored`
                    None if stored.iter().any(|s| is_ggml_quantized(s)) => {
                        "GGUF blocks (see stored)".into()
                    }
                    None => "no (float weights)".into(),
                },
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
                self.tokenizer
                    .as_ref()
                    .map_or("none found".into(), |t| format!("{} tokens", t.vocab_size())),
            ),
            ("eos", format!("{:?}", c.eos_ids())),
        ]
    }
}

/// "int8-dynamic (gpt2kit, 8 bits per-output-channel, embeddings int8)".
fn describe(q: &infer::quant::QuantizationConfig) -> String {
    let mut parts = vec![
        q.quant_method.clone(),
        format!("{} bits {}", q.bits, q.granularity),
    ];
    if q.method.is_int8() {
        parts.push(if q.quantize_embeddings {
            "embeddings int8".into()
        } else {
            "embeddings float".into()
        });
    }
    if q.sparsity > 0.0 {
        parts.push(format!("sparsity {:.1}%", q.sparsity * 100.0));
    }
    if !q.dropped_layers.is_empty() {
        parts.push(format!("dropped layers {:?}", q.dropped_layers));
    }
    format!("{} ({})", q.method.name(), parts.join(", "))
}

/// 124439808 → "124,439,808".
fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut g = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
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

/// Whether a stored-dtype line names a quantized ggml type (`q4_0: ...`, `q6_K: ...`).
fn is_ggml_quantized(stored: &str) -> bool {
    stored.starts_with('q') || stored.starts_with("iq")
}
