//! `gpt2kit quantize` and `gpt2kit dequantize` end to end on the reference models:
//! quantize → dequantize error within scale/2 per element, the engine's logits on the
//! artifact against transformers' on the dequantized folder, every decoding strategy
//! on an artifact, pruning patterns, layer dropping, the report, and bad input (exit 2,
//! nothing written).
mod common;

use common::{gpt2kit, python, reference};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use infer::checkpoint::WeightFiles;
use infer::{Gpt2, KvCache};
use tch::{Device, Kind, Tensor};

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("quantize-{test}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a small JSONL file of text rows.
fn jsonl(dir: &Path, name: &str, rows: usize) -> PathBuf {
    let words = "the model reads every weight once per token so decode speed is set by \
                 memory a cache holds keys and values quick brown fox"
        .split(' ')
        .collect::<Vec<_>>();
    let mut text = String::new();
    for i in 0..rows {
        let line: Vec<&str> = (0..24)
            .map(|j| words[(i * 7 + j * 3) % words.len()])
            .collect();
        text.push_str(&serde_json::json!({ "text": line.join(" ") }).to_string());
        text.push('\n');
    }
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn quantize(model: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "quantize",
        "--model",
        s(model),
        "--out",
        s(out),
        "--decode-tokens",
        "0",
    ];
    args.extend_from_slice(extra);
    ok(&gpt2kit(&args));
    let report = std::fs::read_to_string(out.join("quantize_report.json")).unwrap();
    serde_json::from_str(&report).unwrap()
}

fn tensors(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    let files = WeightFiles::open_dir(dir).unwrap();
    files
        .names()
        .map(|n| {
            let t = files.tensor_as_stored(n, Device::Cpu).unwrap();
            (n.strip_prefix("transformer.").unwrap_or(n).to_string(), t)
        })
        .collect()
}

/// Logits of whole sequences (B, T, V) from the engine.
fn engine_logits(dir: &Path, ids: &Tensor) -> Tensor {
    let model = Gpt2::load(dir, Some(Kind::Float), Device::Cpu).unwrap();
    tch::no_grad(|| {
        let (b, t) = ids.size2().unwrap();
        let mut cache: KvCache = model.new_cache(b, t);
        model.forward(ids, &mut cache)
    })
}

#[test]
fn int8_weight_roundtrip_is_within_half_a_scale_and_transformers_loads_it() {
    let tmp = scratch("roundtrip");
    let src = reference("hub-tied");
    let art = tmp.join("int8");
    let report = quantize(&src, &art, &["--method", "int8-weight"]);
    // The artifact: int8 weights with f32 scales per output channel, floats elsewhere.
    let a = tensors(&art);
    let f = tensors(&src);
    let mut checked = 0;
    for (name, q) in &a {
        if q.kind() != Kind::Int8 {
            continue;
        }
        let scale = &a[&format!("{name}_scale")];
        assert_eq!(scale.kind(), Kind::Float, "{name}");
        let w = f[name].to_kind(Kind::Float);
        // Conv1D (in, out): scales per column; wte (V, E): per row.
        let dim = if name == "wte.weight" { 1 } else { 0 };
        let deq = q.to_kind(Kind::Float) * scale.unsqueeze(dim);
        let err = (&w - &deq).abs();
        // |w - q·s| ≤ s/2, plus f32 rounding of w/s and q·s (a few ulps of |w|).
        let bound = scale.unsqueeze(dim) / 2.0 + w.abs() * 1e-6 + 1e-12;
        assert!(
            err.le_tensor(&bound).all().int64_value(&[]) == 1,
            "{name}: max error {} beyond scale/2",
            err.max().double_value(&[])
        );
        checked += 1;
    }
    assert_eq!(checked, 2 * 4 + 1, "every linear and wte are int8");
    assert!(a["h.0.ln_1.weight"].kind() == Kind::Float && a["wpe.weight"].kind() == Kind::Float);
    // The report's bytes match the files.
    let after = std::fs::metadata(art.join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(report["bytes_after"].as_u64(), Some(after));
    let qc = &report["quantization_config"];
    assert_eq!(qc["method"], "int8-weight");
    assert_eq!(qc["bits"], 8);
    assert_eq!(qc["source_sha256"].as_str().unwrap().len(), 64);

    // Dequantize, then transformers' logits on that folder against the engine's logits
    // on the artifact. The engine dequantizes int8-weight exactly as `dequantize` does
    // (q·scale in f32), so the two compute the same float model: 1e-4, the tolerance of
    // the fp32 reference tests (accumulation order only).
    let deq = tmp.join("float");
    ok(&gpt2kit(&[
        "dequantize",
        "--model",
        s(&art),
        "--out",
        s(&deq),
    ]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deq.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    let ids_json = "[[5, 17, 99, 3, 250, 42, 7, 1], [300, 2, 8, 64, 33, 120, 9, 11]]";
    let logits_file = tmp.join("hf_logits.safetensors");
    let o = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/check_dequantized.py"
        ))
        .args([
            "--model",
            s(&deq),
            "--ids",
            ids_json,
            "--out",
            s(&logits_file),
        ])
        .output()
        .unwrap();
    ok(&o);
    let hf = Tensor::read_safetensors(&logits_file).unwrap().remove(0).1;
    let ids: Vec<Vec<i64>> = serde_json::from_str(ids_json).unwrap();
    let ids = Tensor::from_slice2(&ids);
    let ours = engine_logits(&art, &ids);
    let diff = (&ours - &hf).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "artifact vs transformers on the dequantized folder: {diff}"
    );
    // And the dequantized folder in the engine gives the same logits as the artifact.
    let diff = (engine_logits(&deq, &ids) - &ours)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "dequantized folder vs artifact: {diff}");
}

#[test]
fn artifacts_run_every_decoding_strategy() {
    let tmp = scratch("strategies");
    for (name, method) in [
        ("hub-tied", "int8-dynamic"),
        ("prefixed-untied", "int8-weight"),
    ] {
        let art = tmp.join(format!("{name}-{method}"));
        quantize(&reference(name), &art, &["--method", method]);
        let deq = tmp.join(format!("{name}-{method}-float"));
        ok(&gpt2kit(&[
            "dequantize",
            "--model",
            s(&art),
            "--out",
            s(&deq),
        ]));
        for flags in [
            &["--max-new-tokens", "8"][..],
            &["--max-new-tokens", "8", "--num-beams", "3"],
            &[
                "--max-new-tokens",
                "8",
                "--do-sample",
                "--seed",
                "3",
                "--top-k",
                "20",
            ],
            &["--max-new-tokens", "8", "--repetition-penalty", "1.3"],
            &["--max-new-tokens", "8", "--prompt-lookup", "3"],
        ] {
            let run = |m: &Path| {
                let mut a = vec!["infer", "--model", s(m), "--prompt", "The quick brown fox"];
                a.extend_from_slice(flags);
                ok(&gpt2kit(&a))
            };
            let text = run(&art);
            assert!(text.starts_with("The quick brown fox"), "{text}");
            if method == "int8-weight" {
                // Float activations over exactly the dequantized weights: same tokens.
                assert_eq!(text, run(&deq), "{name} {method} {flags:?}");
            }
        }
    }
}

#[test]
fn int8_dynamic_logits_stay_close_to_the_dequantized_model() {
    // W8A8 differs from its dequantized float model only by the per-token activation
    // rounding: uniform in ±s_x/2 with s_x = max|x|/127, an RMS error of
    // max|x|/(127·√12) ≈ 0.8% of an activation row's RMS when max|x| ≈ 3.5 × RMS. Nine
    // quantized products (4 per block, the head) add independent errors of that size:
    // ≈ √9 × 0.8% ≈ 2.4% of the logits' RMS. The test allows 5% (twice that), and the
    // argmax must agree at ≥ 90% of the positions.
    let tmp = scratch("dynamic");
    for name in ["hub-tied", "prefixed-untied"] {
        let art = tmp.join(name);
        quantize(&reference(name), &art, &["--method", "int8-dynamic"]);
        let deq = tmp.join(format!("{name}-float"));
        ok(&gpt2kit(&[
            "dequantize",
            "--model",
            s(&art),
            "--out",
            s(&deq),
        ]));
        let ids = Tensor::randint(300, [4, 24], (Kind::Int64, Device::Cpu));
        let (a, f) = (engine_logits(&art, &ids), engine_logits(&deq, &ids));
        let rms = |t: &Tensor| t.square().mean(Kind::Float).sqrt().double_value(&[]);
        let rel = rms(&(&a - &f)) / rms(&f);
        eprintln!("{name}: relative RMS logit error {rel:.4}");
        assert!(rel < 0.05, "{name}: relative RMS logit error {rel}");
        let agree = a
            .argmax(-1, false)
            .eq_tensor(&f.argmax(-1, false))
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(agree >= 0.9, "{name}: argmax agrees at {agree}");
    }
}

#[test]
fn pruning_reaches_the_asked_sparsity_and_pattern() {
    let tmp = scratch("prune");
    let src = reference("hub-tied");
    let linear = |n: &str| n.starts_with("h.") && n.ends_with("weight") && !n.contains("ln_");
    // 30% per layer, float output: every linear weight has ≥ 30% zeros.
    let art = tmp.join("layer");
    let r = quantize(&src, &art, &["--method", "none", "--prune-sparsity", "0.3"]);
    for (n, t) in tensors(&art).iter().filter(|(n, _)| linear(n)) {
        let z = t
            .eq(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        // floor(0.3 · numel) zeros exactly (a random float weight has no zeros).
        assert!((0.299..0.301).contains(&z), "{n}: {z}");
    }
    for t in r["tensors"].as_array().unwrap() {
        assert!(t["sparsity"].as_f64().unwrap() >= 0.299, "{t}");
    }
    // Global: 30% over all linear weights together, not per tensor.
    let art = tmp.join("global");
    let r = quantize(
        &src,
        &art,
        &[
            "--method",
            "int8-weight",
            "--prune-sparsity",
            "0.3",
            "--prune-scope",
            "global",
        ],
    );
    let total = r["quantization_config"]["sparsity"].as_f64().unwrap();
    assert!((0.299..0.31).contains(&total), "{total}");
    // 2:4: in every group of 4 consecutive input rows, per column, at most 2 non-zeros;
    // the int8 weights keep the zeros.
    let art = tmp.join("two-four");
    quantize(
        &src,
        &art,
        &["--method", "int8-weight", "--prune-pattern", "2:4"],
    );
    for (n, t) in tensors(&art)
        .iter()
        .filter(|(n, _)| linear(n) && !n.ends_with("_scale"))
    {
        let (i, o) = t.size2().unwrap();
        let nz = t
            .ne(0)
            .reshape([i / 4, 4, o])
            .sum_dim_intlist(1, false, Kind::Int64);
        assert!(nz.le(2).all().int64_value(&[]) == 1, "{n}");
    }
}

#[test]
fn dropping_layers_renumbers_and_runs() {
    let tmp = scratch("drop");
    let art = tmp.join("drop");
    let r = quantize(
        &reference("prefixed-untied"),
        &art,
        &["--method", "int8-weight", "--drop-layers", "0,2"],
    );
    assert_eq!(
        r["quantization_config"]["dropped_layers"],
        serde_json::json!([0, 2])
    );
    let a = tensors(&art);
    assert!(a.contains_key("h.0.attn.c_attn.weight") && !a.contains_key("h.1.attn.c_attn.weight"));
    // The kept layer is source layer 1, renumbered 0.
    let f = tensors(&reference("prefixed-untied"));
    assert!(a["h.0.ln_1.weight"].equal(&f["h.1.ln_1.weight"].to_kind(Kind::Float)));
    ok(&gpt2kit(&[
        "infer",
        "--model",
        s(&art),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
    ]));
}

#[test]
fn calibrated_int8_dynamic_reports_perplexity_and_outliers() {
    let tmp = scratch("calibrated");
    let data = jsonl(&tmp, "eval.jsonl", 12);
    let art = tmp.join("smooth");
    let r = quantize(
        &reference("hub-tied"),
        &art,
        &[
            "--method",
            "int8-dynamic",
            "--calibration",
            s(&data),
            "--smooth-alpha",
            "0.5",
            "--outlier-threshold",
            "2",
            "--eval",
            s(&data),
        ],
    );
    let (p0, p1) = (
        r["perplexity_before"].as_f64().unwrap(),
        r["perplexity_after"].as_f64().unwrap(),
    );
    assert!(
        p0 > 1.0 && p1 > 1.0 && (p1 / p0 - 1.0).abs() < 0.1,
        "{p0} → {p1}"
    );
    let outliers: i64 = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["outlier_columns"].as_i64().unwrap())
        .sum();
    assert!(
        outliers > 0,
        "threshold 2 on unit-scale activations keeps some columns"
    );
    ok(&gpt2kit(&[
        "infer",
        "--model",
        s(&art),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
    ]));
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let tmp = scratch("bad");
    let src = reference("hub-tied");
    let empty = tmp.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let art = tmp.join("artifact");
    quantize(&src, &art, &["--method", "int8-weight"]);
    let out = tmp.join("out");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--method", "int4"], "--method"),
        (
            vec!["--method", "int8-weight", "--prune-sparsity", "1"],
            "--prune-sparsity",
        ),
        (
            vec!["--method", "int8-weight", "--prune-sparsity", "-0.1"],
            "--prune-sparsity",
        ),
        (
            vec!["--method", "none", "--drop-layers", "2"],
            "out of range",
        ),
        (vec!["--method", "none", "--drop-layers", "0,1"], "no layer"),
        (
            vec![
                "--method",
                "none",
                "--keep-layers",
                "0",
                "--drop-layers",
                "1",
            ],
            "not both",
        ),
        (
            vec![
                "--method",
                "int8-dynamic",
                "--smooth-alpha",
                "0.5",
                "--calibration",
                "/nonexistent.jsonl",
            ],
            "no such file",
        ),
        (
            vec![
                "--method",
                "int8-dynamic",
                "--smooth-alpha",
                "0.5",
                "--calibration",
                s(&empty),
            ],
            "empty",
        ),
        (
            vec!["--method", "int8-dynamic", "--smooth-alpha", "0.5"],
            "--calibration",
        ),
        (
            vec![
                "--method",
                "int8-weight",
                "--prune-pattern",
                "2:4",
                "--prune-sparsity",
                "0.3",
            ],
            "2:4",
        ),
        (
            vec!["--method", "int8-weight", "--prune-scope", "row"],
            "--prune-scope",
        ),
    ];
    for (flags, needle) in cases {
        let mut a = vec!["quantize", "--model", s(&src), "--out", s(&out)];
        a.extend_from_slice(&flags);
        let o = gpt2kit(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!out.exists(), "{flags:?} left {}", out.display());
    }
    // Quantizing an artifact says what it is.
    let o = gpt2kit(&[
        "quantize",
        "--model",
        s(&art),
        "--out",
        s(&out),
        "--method",
        "int8-weight",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("already a quantized artifact") && err.contains("int8-weight"),
        "{err}"
    );
    // An existing --out is never replaced.
    let o = gpt2kit(&[
        "quantize",
        "--model",
        s(&src),
        "--out",
        s(&art),
        "--method",
        "none",
    ]);
    assert_eq!(o.status.code(), Some(2));
    // Dequantizing a float model is refused.
    let o = gpt2kit(&["dequantize", "--model", s(&src), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());
    // No temporary folders are left beside --out.
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(left.is_empty());
}

/// `folder` with its `model.safetensors` moved to one shard, and an index that maps the
/// tensors there and one more name to `escape`.
fn shard_with_escape(folder: &Path, escape: &str) {
    let shard = "model-00001-of-00001.safetensors";
    std::fs::rename(folder.join("model.safetensors"), folder.join(shard)).unwrap();
    let files = WeightFiles::open_files(&[folder.join(shard)]).unwrap();
    let mut map: serde_json::Map<String, serde_json::Value> = files
        .names()
        .map(|n| (n.to_string(), shard.into()))
        .collect();
    drop(files);
    map.insert("transformer.zz.weight".into(), escape.into());
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
}

#[test]
fn shard_indexes_naming_files_outside_the_folder_are_refused() {
    let tmp = scratch("shard-escape");
    let art = tmp.join("artifact");
    quantize(&reference("hub-tied"), &art, &["--method", "int8-weight"]);
    for (i, escape) in ["../../../../../../etc/passwd", "/etc/passwd"]
        .iter()
        .enumerate()
    {
        let float = tmp.join(format!("float-{i}"));
        let artifact = tmp.join(format!("artifact-{i}"));
        let copy = |from: &Path, to: &Path| {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap().flatten() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        };
        copy(&reference("hub-tied"), &float);
        copy(&art, &artifact);
        shard_with_escape(&float, escape);
        shard_with_escape(&artifact, escape);
        let out = tmp.join(format!("out-{i}"));
        for (cmd, model) in [
            (vec!["quantize", "--method", "int8-weight"], &float),
            (vec!["dequantize"], &artifact),
        ] {
            let mut args = cmd.clone();
            args.extend(["--model", s(model), "--out", s(&out)]);
            let o = gpt2kit(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{cmd:?} {escape}: {err}");
            assert!(
                err.contains(&format!("shard name {escape:?}")) && err.contains("not a file name"),
                "{cmd:?} {escape}: {err}"
            );
            assert!(!out.exists(), "{cmd:?} {escape}");
        }
    }
}
