//! Int8 artifacts in the engine: the W8A8 linear layer against the float product of its
//! quantized operands, artifacts built here (independently of the quantize crate) run
//! as their dequantized float model, and tampered or inconsistent artifacts are refused
//! with errors that name the file and the tensor.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use infer::checkpoint::WeightFiles;
use infer::quant::{Int8Linear, QuantRows};
use infer::{Gpt2, Gpt2Config};
use tch::{Device, Kind, Tensor};

/// Symmetric per-row int8 of w (R, C): (q, scale (R,)).
fn per_row(w: &Tensor) -> (Tensor, Tensor) {
    let s = w.abs().amax([1], false) / 127.0;
    let q = (w / s.unsqueeze(1))
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (q, s)
}

fn fake_quant_rows(x: &Tensor) -> Tensor {
    let s = x.abs().amax([1], true) / 127.0;
    (x / &s).round().clamp(-127.0, 127.0) * s
}

#[test]
fn int8_linear_equals_the_float_product_of_its_quantized_operands() {
    tch::manual_seed(0);
    let (m, k, n) = (5, 64, 48);
    let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu));
    // Two outlier channels, 40× the others.
    let _ = x.narrow(1, 3, 1).g_mul_scalar_(40.0);
    let _ = x.narrow(1, 17, 1).g_mul_scalar_(40.0);
    let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)); // (out, in)
    let b = Tensor::randn([n], (Kind::Float, Device::Cpu));
    let (q, s) = per_row(&w);
    let wq = q.to_kind(Kind::Float) * s.unsqueeze(1); // (out, in)
                                                      // int32 accumulation of integer products is exact; only the f32 rescale rounds.
    let lin = Int8Linear::new(
        QuantRows {
            q: q.shallow_clone(),
            scale: s.shallow_clone(),
        },
        Some(b.shallow_clone()),
        None,
    );
    let expect = fake_quant_rows(&x).mm(&wq.tr()) + &b;
    // 5 rows take the decode path (host quantization, pooled int8 GEMM); 10 rows take
    // libtorch's ops: both must compute the same thing.
    assert!(lin.decodes_on_pool(5) && !lin.decodes_on_pool(10));
    let got = lin.forward(&x);
    let rel = (&got - &expect).abs().max().double_value(&[]) / expect.abs().max().double_value(&[]);
    assert!(rel < 1e-5, "{rel}");
    let twice = lin.forward(&Tensor::cat(&[&x, &x], 0)).narrow(0, 5, 5);
    let rel =
        (&twice - &expect).abs().max().double_value(&[]) / expect.abs().max().double_value(&[]);
    assert!(rel < 1e-5, "libtorch path: {rel}");
    // Outlier columns: those inputs multiply the dequantized rows in float, the rest is
    // quantized without them (so the outliers no longer set the activation scale).
    let idx = Tensor::from_slice(&[3i64, 17]);
    let lin = Int8Linear::new(
        QuantRows {
            q: q.shallow_clone(),
            scale: s.shallow_clone(),
        },
        Some(b.shallow_clone()),
        Some(idx.shallow_clone()),
    );
    let rest = x.index_fill(1, &idx, 0.0);
    let expect = fake_quant_rows(&rest).mm(&wq.tr())
        + x.index_select(1, &idx).mm(&wq.index_select(1, &idx).tr())
        + &b;
    let got = lin.forward(&x.view([1, m, k])).view([m, n]);
    let rel = (&got - &expect).abs().max().double_value(&[]) / expect.abs().max().double_value(&[]);
    assert!(rel < 1e-5, "{rel}");
    // And the outliers make it far more accurate than plain W8A8 on this input.
    let exact = x.mm(&wq.tr()) + &b;
    let err = |y: &Tensor| (y - &exact).abs().mean(Kind::Float).double_value(&[]);
    let plain = Int8Linear::new(QuantRows { q, scale: s }, Some(b), None).forward(&x);
    assert!(
        err(&got) * 4.0 < err(&plain),
        "{} vs {}",
        err(&got),
        err(&plain)
    );
}

/// The float tensors of a reference model, unprefixed, in f32.
fn float_tensors(name: &str) -> (Gpt2Config, HashMap<String, Tensor>) {
    let dir = common::model_dir(name);
    let config = Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let files = WeightFiles::open_dir(&dir).unwrap();
    let model = Gpt2::from_weights(config.clone(), &files, Kind::Float, &[Device::Cpu]).unwrap();
    let map = model
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    (config, map)
}

fn is_linear(n: &str) -> bool {
    n.starts_with("h.") && n.ends_with(".weight") && !n.contains(".ln_")
}

/// An artifact of `method` written here: Conv1D weights (in, out) per column, wte per
/// row. Returns the folder and the float tensors the artifact stands for.
fn write_artifact(
    dir: &Path,
    name: &str,
    method: &str,
    edit: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>),
) -> (PathBuf, HashMap<String, Tensor>) {
    let (config, float) = float_tensors(name);
    let mut out = HashMap::new();
    let mut deq = HashMap::new();
    for (n, t) in &float {
        if is_linear(n) || n == "wte.weight" || n == "lm_head.weight" {
            let rows = if is_linear(n) {
                t.tr()
            } else {
                t.shallow_clone()
            }; // (out, in)
            let (q, s) = per_row(&rows);
            let back = q.to_kind(Kind::Float) * s.unsqueeze(1);
            let (q, back) = if is_linear(n) {
                (q.tr().contiguous(), back.tr().contiguous())
            } else {
                (q, back)
            };
            out.insert(format!("{n}_scale"), s);
            out.insert(n.clone(), q);
            deq.insert(n.clone(), back);
        } else {
            out.insert(n.clone(), t.shallow_clone());
            deq.insert(n.clone(), t.shallow_clone());
        }
    }
    let mut cfg = common::int8_config(&config, method);
    edit(&mut cfg, &mut out);
    let folder = dir.to_path_buf();
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder).unwrap();
    common::write_model_folder(&folder, &cfg, &out);
    (folder, deq)
}

fn scratch(test: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("quantized-{test}"))
}

fn logits(model: &Gpt2, ids: &Tensor) -> Tensor {
    tch::no_grad(|| model.forward_train(ids))
}

#[test]
fn int8_artifacts_run_as_their_dequantized_model() {
    let ids = Tensor::from_slice2(&[[5i64, 17, 99, 3, 250, 42], [300, 2, 8, 64, 33, 120]]);
    for name in ["hub-tied", "prefixed-untied"] {
        let (dir, deq) = write_artifact(
            &scratch(&format!("ok-{name}")),
            name,
            "int8-weight",
            |_, _| {},
        );
        let art = Gpt2::load(&dir, None, Device::Cpu).unwrap();
        assert_eq!(art.quantization().unwrap().method.name(), "int8-weight");
        let config = Gpt2Config::from_file(&common::model_dir(name).join("config.json")).unwrap();
        let float = Gpt2::from_weights(config, &deq, Kind::Float, &[Device::Cpu]).unwrap();
        // Same f32 weights, same ops: identical up to accumulation order.
        let d = (logits(&art, &ids) - logits(&float, &ids))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-5, "{name}: {d}");
        // Decoding one token at a time runs the int8 decode kernels (≤ 8 rows); it must
        // agree with the full forward (per-call dequantized weights on libtorch) within
        // the 1e-4 of the f32 cache tests (summation order only).
        assert!(art.decodes_on_kernels(2));
        let mut cache = art.new_cache(2, 6);
        let steps: Vec<Tensor> = (0..6)
            .map(|t| tch::no_grad(|| art.forward(&ids.narrow(1, t, 1), &mut cache)))
            .collect();
        let d = (Tensor::cat(&steps, 1) - logits(&art, &ids))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-4, "{name}: cached {d}");

        let (dir, _) = write_artifact(
            &scratch(&format!("dyn-{name}")),
            name,
            "int8-dynamic",
            |_, _| {},
        );
        let art = Gpt2::load(&dir, None, Device::Cpu).unwrap();
        let mut cache = art.new_cache(2, 6);
        let a = tch::no_grad(|| art.forward(&ids, &mut cache));
        let f = logits(&float, &ids);
        let rms = |t: &Tensor| t.square().mean(Kind::Float).sqrt().double_value(&[]);
        // Activation rounding only (see quantize_cli's int8_dynamic test for the 5%).
        let rel = rms(&(&a - &f)) / rms(&f);
        assert!(rel < 0.05, "{name}: int8-dynamic relative RMS error {rel}");
    }
}

/// An int8-dynamic artifact's decode step gives each row the same logits, bit for bit,
/// whatever the step's row count: alone (the packed kernels), 16 rows (the packed kernels
/// past their 8-row tile, the head included) and 80 rows (the head on libtorch's
/// `_int_mm`): W8A8's integer sums and rescale are the same on every path.
#[test]
fn int8_dynamic_rows_are_the_same_alone_and_in_any_batch() {
    let (dir, _) = write_artifact(&scratch("rows-dyn"), "hub-tied", "int8-dynamic", |_, _| {});
    let art = Gpt2::load(&dir, None, Device::Cpu).unwrap();
    assert!(art.decodes_on_kernels(1) && art.decodes_on_kernels(16));
    assert!(!art.decodes_on_kernels(80));
    let ids: Vec<i64> = (0..80).map(|i| (i * 37 + 11) % 400).collect();
    let step = |ids: &[i64]| {
        let n = ids.len() as i64;
        let mut cache = art.new_cache(n, 1);
        let ids = Tensor::from_slice(ids).view([n, 1]);
        tch::no_grad(|| art.forward(&ids, &mut cache)).view([n, -1])
    };
    let alone: Vec<Tensor> = ids.iter().map(|&t| step(&[t])).collect();
    for rows in [16, 80] {
        let batch = step(&ids[..rows]);
        for (r, a) in alone.iter().take(rows).enumerate() {
            let d = (batch.get(r as i64) - a.view([-1]))
                .abs()
                .max()
                .double_value(&[]);
            assert_eq!(d, 0.0, "row {r} of {rows}");
        }
    }
}

/// Loads `dir` and returns the error message.
fn refused(dir: &Path) -> String {
    match Gpt2::load(dir, None, Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tampered_or_inconsistent_artifacts_are_refused() {
    let st = "model.safetensors";
    let w = "h.0.attn.c_attn.weight";
    type Edit = Box<dyn FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>)>;
    let cases: Vec<(&str, Edit, Vec<String>)> = vec![
        (
            "missing-scale",
            Box::new(move |_, t| {
                t.remove(&format!("{w}_scale"));
            }),
            vec![st.into(), format!("{w}_scale")],
        ),
        (
            "scale-shape",
            Box::new(move |_, t| {
                let s = t[&format!("{w}_scale")].narrow(0, 0, 10);
                t.insert(format!("{w}_scale"), s);
            }),
            vec![st.into(), format!("{w}_scale"), "[10]".into()],
        ),
        (
            "scale-dtype",
            Box::new(move |_, t| {
                let s = t[&format!("{w}_scale")].to_kind(Kind::Half);
                t.insert(format!("{w}_scale"), s);
            }),
            vec![st.into(), format!("{w}_scale"), "F32".into()],
        ),
        (
            "negative-scale",
            Box::new(move |_, t| {
                let s = -&t[&format!("{w}_scale")];
                t.insert(format!("{w}_scale"), s);
            }),
            vec![st.into(), format!("{w}_scale"), "negative".into()],
        ),
        (
            "float-weight",
            Box::new(move |_, t| {
                let f = t[w].to_kind(Kind::Float);
                t.insert(w.into(), f);
            }),
            vec![st.into(), w.into(), "int8".into()],
        ),
        (
            "no-quantization-config",
            Box::new(|c, _| {
                c.as_object_mut().unwrap().remove("quantization_config");
            }),
            vec![st.into(), "int8".into(), "quantization_config".into()],
        ),
        (
            "foreign-quant-method",
            Box::new(|c, _| c["quantization_config"]["quant_method"] = "bitsandbytes".into()),
            vec!["config.json".into(), "bitsandbytes".into()],
        ),
        (
            "bits",
            Box::new(|c, _| c["quantization_config"]["bits"] = 4.into()),
            vec!["config.json".into(), "bits 4".into()],
        ),
        (
            "kept-layers",
            Box::new(|c, _| c["quantization_config"]["kept_layers"] = serde_json::json!([0])),
            vec!["config.json".into(), "kept_layers".into()],
        ),
        (
            "unknown-method",
            Box::new(|c, _| c["quantization_config"]["method"] = "int4".into()),
            vec!["config.json".into(), "int4".into()],
        ),
        (
            "outliers-out-of-range",
            Box::new(move |_, t| {
                t.insert(
                    "h.0.attn.c_attn.outlier_columns".into(),
                    Tensor::from_slice(&[1i64, 64]),
                );
            }),
            vec![st.into(), "h.0.attn.c_attn.outlier_columns".into()],
        ),
        (
            "wte-scale-missing",
            Box::new(|_, t| {
                t.remove("wte.weight_scale");
            }),
            vec![st.into(), "wte.weight_scale".into()],
        ),
    ];
    for (case, edit, needles) in cases {
        let method = if case == "outliers-out-of-range" {
            "int8-dynamic"
        } else {
            "int8-weight"
        };
        let (dir, _) = write_artifact(&scratch(case), "hub-tied", method, edit);
        let err = refused(&dir);
        for n in needles {
            assert!(err.contains(&n), "{case}: {err:?} lacks {n:?}");
        }
    }
    // Splitting int8 artifacts, and refusing what cannot be split: tests/tensor_parallel.rs.
}

#[test]
fn int8_decode_kernel_equals_the_dequantized_product_on_every_isa() {
    use infer::kernels::{Isa, PackedLinear};
    tch::manual_seed(1);
    // Shapes with a partial last line (k % 4 != 0) and a partial last panel (n % 16 != 0).
    for (k, n) in [(64i64, 48i64), (37, 21), (768, 50), (3, 5)] {
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)); // (out, in)
        let (q, s) = per_row(&w);
        let b = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let wq = q.to_kind(Kind::Float) * s.unsqueeze(1);
        let qv = Vec::<i8>::try_from(q.reshape([-1])).unwrap();
        let sv = Vec::<f32>::try_from(&s).unwrap();
        let bv = Vec::<f32>::try_from(&b).unwrap();
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            for bias in [false, true] {
                let lin = PackedLinear::from_int8_rows(
                    &qv,
                    &sv,
                    k as usize,
                    n as usize,
                    bias.then_some(&bv[..]),
                )
                .unwrap()
                .with_isa(isa)
                .unwrap();
                // The same panels from the (out, in) view of the weight stored (in, out),
                // as an artifact's Conv1D weight is packed in place.
                let stored = q.tr().contiguous();
                let scale = bias.then_some(&bv[..]);
                let viewed = PackedLinear::from_int8_tensor(&stored.tr(), &sv, scale)
                    .unwrap()
                    .with_isa(isa)
                    .unwrap();
                for rows in 1..=9i64 {
                    let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
                    let mut expect = x.mm(&wq.tr());
                    if bias {
                        expect += &b;
                    }
                    let got = lin.forward_tensor(&x).unwrap();
                    assert!(
                        got.equal(&viewed.forward_tensor(&x).unwrap()),
                        "{isa:?} k {k} n {n}"
                    );
                    // f32 sums in another order: relative to the largest output.
                    let d = (&got - &expect).abs().max().double_value(&[])
                        / expect.abs().max().double_value(&[]).max(1e-6);
                    assert!(d < 1e-5, "{isa:?} k {k} n {n} rows {rows} bias {bias}: {d}");
                }
            }
        }
    }
}
