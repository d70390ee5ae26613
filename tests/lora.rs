//! LoRA fine-tuning, gradient checkpointing and `merge-lora` against Hugging Face `peft`
//! (tests/reference/lora_reference.py, through GPT2KIT_PYTHON): an adapter gpt2kit
//! trains loads in `PeftModel.from_pretrained` with gpt2kit's logits, an adapter peft
//! makes merges in gpt2kit with peft's logits, one LoRA step moves the adapter as peft
//! and torch's AdamW do; resumed and checkpointed runs equal plain ones bit for bit;
//! bad adapters are refused by name.
mod common;

use common::{assert_clean_failure, assert_ok, corpus, gpt2kit, python, reference, TempDir};
use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use train::checkpointing::{forward_backward, Pass};
use train::lora::LoraOptions;
use train::optim::{clip_coefficient, total_grad_norm, AdamW, AdamWConfig};
use train::trainable::Trainable;

const IDS: &str = "0,5,17,99,230,3,41,41,7,300,12,64;8,250,31,2,2,77,190,5,9,360,44,1";
const LABELS: &str =
    "-100,-100,-100,-100,230,3,41,41,7,300,12,64;8,250,31,2,2,77,190,5,-100,-100,-100,-100";

fn rows(text: &str) -> Tensor {
    let rows: Vec<Vec<i64>> = text
        .split(';')
        .map(|r| r.split(',').map(|x| x.parse().unwrap()).collect())
        .collect();
    let n = rows.len() as i64;
    Tensor::from_slice(&rows.concat()).view([n, -1])
}

fn peft(args: &[&str]) {
    let o = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/lora_reference.py"
        ))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn named(path: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(path).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn get(tensors: &[(String, Tensor)], name: &str) -> Tensor {
    let t = tensors.iter().find(|(n, _)| n == name);
    t.unwrap_or_else(|| panic!("no tensor {name}"))
        .1
        .shallow_clone()
}

/// peft's logits of base + adapter: unmerged, merged, and the base's own, for IDS' first row.
fn peft_logits(t: &TempDir, base: &Path, adapter: &Path) -> Vec<(String, Tensor)> {
    let out = t.path("peft_logits.safetensors");
    let first = IDS.split(';').next().unwrap();
    peft(&[
        "logits",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--ids",
        first,
        "--out",
        out.to_str().unwrap(),
    ]);
    named(&out)
}

/// An adapter made by peft (r 4) in `out`: B drawn non-zero (see lora_reference.py).
fn peft_make(base: &Path, out: &Path, alpha: &str, targets: &str, seed: &str) {
    let (base, out) = (base.to_str().unwrap(), out.to_str().unwrap());
    peft(&[
        "make",
        "--base",
        base,
        "--out",
        out,
        "--r",
        "4",
        "--alpha",
        alpha,
        "--targets",
        targets,
        "--seed",
        seed,
    ]);
}

fn first_row() -> Tensor {
    rows(IDS).narrow(0, 0, 1)
}

/// gpt2kit's logits of a plain model folder (the merged one).
fn merged_logits(folder: &Path) -> Tensor {
    let model = infer::Gpt2::load(folder, Some(Kind::Float), Device::Cpu).unwrap();
    let _g = tch::no_grad_guard();
    model.forward_train(&first_row()).get(0)
}

/// gpt2kit's logits of base + adapter, unmerged (the training forward).
fn adapter_logits(base: &Path, adapter: &Path) -> Tensor {
    let options = LoraOptions::read(adapter).unwrap();
    let tr = Trainable::load_lora(
        base,
        Some(adapter),
        &options,
        0,
        Device::Cpu,
        (false, Kind::Float),
    )
    .unwrap();
    let _g = tch::no_grad_guard();
    tr.logits(&tr.model, &first_row(), false).unwrap().get(0)
}

/// The engine's logits of base + adapter held unmerged beside the packed base
/// (`Gpt2::add_adapter`, as `infer --adapter` runs it), for IDS' first row: the prompt in
/// one pass (libtorch, or a fused step for a short piece) and fed one token a step (the
/// fused decode steps). Both, (T, V).
fn engine_logits(base: &Path, adapter: &Path) -> (Tensor, Tensor) {
    let opts = infer::EngineOptions::default();
    let mut model = infer::Gpt2::load_with(base, Some(Kind::Float), &[Device::Cpu], &opts).unwrap();
    let lora = infer::adapter::Lora::read(adapter, &model.config, Device::Cpu).unwrap();
    let k = model.add_adapter(&lora).unwrap();
    model.set_default_adapter(Some(k)).unwrap();
    assert!(model.fuses_decode());
    let _g = tch::no_grad_guard();
    let ids = first_row();
    let t = ids.size()[1];
    let mut cache = model.new_cache(1, t);
    let pass = model.forward(&ids, &mut cache).get(0);
    let mut cache = model.new_cache(1, t);
    let steps: Vec<Tensor> = (0..t)
        .map(|i| model.forward(&ids.narrow(1, i, 1), &mut cache).get(0))
        .collect();
    (pass, Tensor::cat(&steps, 0))
}

/// The engine's greedy tokens (`infer --json`'s `token_ids`) for `prompt`.
fn infer_tokens(model: &Path, adapter: Option<&Path>, prompt: &str) -> Vec<i64> {
    let mut args = vec!["infer", "--model", model.to_str().unwrap()];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    args.extend(["--prompt", prompt, "--max-new-tokens", "12", "--json"]);
    let o = gpt2kit(&args);
    assert_ok(&o);
    let line = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    serde_json::from_value(v["token_ids"].clone()).unwrap()
}

/// `infer --adapter` (unmerged) against `infer` on the merged folder: the same tokens up
/// to the first step where the merged model's top two logits lie within `tolerance`
/// (then either may win: the two differ by rounding only).
fn assert_tokens_match_merged(base: &Path, adapter: &Path, merged: &Path, tolerance: f64) {
    let prompt = "the model reads";
    let unmerged = infer_tokens(base, Some(adapter), prompt);
    let want = infer_tokens(merged, None, prompt);
    assert_ne!(
        unmerged,
        infer_tokens(base, None, prompt),
        "the adapter changes nothing"
    );
    let Some(s) = unmerged.iter().zip(&want).position(|(a, b)| a != b) else {
        assert_eq!(unmerged.len(), want.len());
        return;
    };
    let tok = infer::Tokenizer::from_dir(base).unwrap();
    let mut seq = tok.encode(prompt).unwrap();
    seq.extend(&want[..s]);
    let model = infer::Gpt2::load(merged, Some(Kind::Float), Device::Cpu).unwrap();
    let _g = tch::no_grad_guard();
    let ids = Tensor::from_slice(&seq).view([1, -1]);
    let last = model
        .forward_train(&ids)
        .get(0)
        .get(-1)
        .to_kind(Kind::Double);
    let (top, _) = last.topk(2, -1, true, true);
    let gap = top.double_value(&[0]) - top.double_value(&[1]);
    assert!(
        gap < tolerance,
        "token {s}: {} unmerged, {} merged, with a top-two gap of {gap}",
        unmerged[s],
        want[s]
    );
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn merge(t: &TempDir, base: &Path, adapter: &Path, out: &str) -> std::process::Output {
    gpt2kit(&[
        "merge-lora",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        &t.s(out),
    ])
}

/// `gpt2kit train` on the hub-tied reference model and a fixed corpus, with `extra`.
fn run_train(t: &TempDir, out: &str, extra: &[&str]) -> std::process::Output {
    let model = reference("hub-tied");
    if !t.path("train.jsonl").exists() {
        std::fs::write(t.path("train.jsonl"), corpus(40, 7)).unwrap();
    }
    let (model, data) = (model.to_str().unwrap(), t.s("train.jsonl"));
    let mut args = vec!["train", "--model", model, "--data", &data, "--output", out];
    args.extend([
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--logging-steps",
        "1",
    ]);
    args.extend(extra);
    gpt2kit(&args)
}

/// A LoRA run of six steps saving every three, with `extra`.
fn train_lora(t: &TempDir, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--max-steps", "6", "--lr", "1e-2", "--save-steps", "3"];
    args.extend(["--lora-r", "4", "--lora-alpha", "16"]);
    args.extend(["--lora-target-modules", "c_attn,c_proj,c_fc"]);
    args.extend(extra);
    run_train(t, out, &args)
}

#[test]
fn our_adapter_loads_in_peft_with_our_logits_and_merges() {
    let t = TempDir::new("lora-ours");
    let base = reference("hub-tied");
    let o = train_lora(
        &t,
        &t.s("out"),
        &["--eval-split", "0.2", "--eval-steps", "3"],
    );
    assert_ok(&o);
    let adapter = t.path("out/final");
    // peft's own folder for the same shape: the same tensor names and config fields.
    peft_make(&base, &t.path("peft"), "16", "c_attn,c_proj,c_fc", "0");
    let ours = named(&adapter.join("adapter_model.safetensors"));
    let theirs = named(&t.path("peft/adapter_model.safetensors"));
    let names = |v: &[(String, Tensor)]| {
        v.iter()
            .map(|(n, t)| (n.clone(), t.size()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&ours), names(&theirs));
    let cfg = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (c, pc) = (cfg(&adapter), cfg(&t.path("peft")));
    for key in [
        "peft_type",
        "r",
        "fan_in_fan_out",
        "bias",
        "task_type",
        "lora_dropout",
        "use_dora",
    ] {
        assert_eq!(c[key], pc[key], "adapter_config.json `{key}`");
    }
    assert_eq!(c["lora_alpha"].as_f64(), pc["lora_alpha"].as_f64());
    assert_eq!(c["base_model_name_or_path"], base.to_str().unwrap());

    let p = peft_logits(&t, &base, &adapter);
    let ours_unmerged = adapter_logits(&base, &adapter);
    // The adapter moved the logits well beyond the tolerances below, so they test it.
    let effect = max_diff(&get(&p, "logits"), &get(&p, "base"));
    assert!(
        effect > 1e-2,
        "the trained adapter changes the logits by only {effect}"
    );
    // fp32 on both sides, the same weights and the same unmerged formula: only the
    // order of the matmuls' sums differs (~1e-6 on logits of size ~1); a wrong scaling,
    // a transposed or missing layer would be off by ~`effect`.
    let d = max_diff(&ours_unmerged, &get(&p, "logits"));
    assert!(d < 1e-4, "unmerged: max |Δlogits| against peft {d}");
    assert_ok(&merge(&t, &base, &adapter, "merged"));
    let ours_merged = merged_logits(&t.path("merged"));
    let d = max_diff(&ours_merged, &get(&p, "merged"));
    // Both merged the same way (W + (B·A)ᵀ·s in f32): the merged weights agree to ~1 ulp.
    assert!(
        d < 1e-5,
        "merged: max |Δlogits| against peft's merge_and_unload {d}"
    );
    let d = max_diff(&ours_merged, &ours_unmerged);
    // Merged against unmerged: x·(W + ΔW) against x·W + x·ΔW, reassociated sums only.
    assert!(d < 1e-5, "merged against unmerged: max |Δlogits| {d}");
    // `infer --adapter` (unmerged) decodes as the merged folder does, and unlike the
    // base. Tolerance 1e-4: merged and unmerged logits differ by < 1e-5 (asserted above),
    // so a pick can flip only where two logits lie within 2e-5; 1e-4 leaves room for the
    // decode kernels' own summation order against libtorch's.
    assert_tokens_match_merged(&base, &adapter, &t.path("merged"), 1e-4);
}

#[test]
fn peft_adapter_merges_in_gpt2kit_with_peft_logits() {
    let t = TempDir::new("lora-peft");
    let base = reference("hub-tied");
    peft_make(
        &base,
        &t.path("peft"),
        "8",
        "c_attn,attn.c_proj,mlp.c_fc",
        "3",
    );
    let adapter = t.path("peft");
    let p = peft_logits(&t, &base, &adapter);
    let effect = max_diff(&get(&p, "logits"), &get(&p, "base"));
    assert!(
        effect > 1e-2,
        "peft's adapter changes the logits by only {effect}"
    );
    assert_ok(&merge(&t, &base, &adapter, "merged"));
    // As above: fp32, same formula, summation order only.
    let d = max_diff(&merged_logits(&t.path("merged")), &get(&p, "logits"));
    assert!(d < 1e-4, "merge-lora of peft's adapter: max |Δlogits| {d}");
    let d = max_diff(&adapter_logits(&base, &adapter), &get(&p, "logits"));
    assert!(
        d < 1e-4,
        "peft's adapter unmerged in gpt2kit: max |Δlogits| {d}"
    );
    // Unmerged beside the packed base, as `infer --adapter` and `serve` run it: the same
    // fp32 formula with the decode kernels' summation order (their logits against
    // transformers' are checked to 1e-4 in the reference tests), both for a prompt pass
    // and for decode steps one token at a time.
    let (pass, steps) = engine_logits(&base, &adapter);
    let d = max_diff(&pass, &get(&p, "logits"));
    assert!(
        d < 1e-4,
        "the engine's prompt pass with the adapter: max |Δlogits| {d}"
    );
    let d = max_diff(&steps, &get(&p, "logits"));
    assert!(
        d < 1e-4,
        "the engine's decode steps with the adapter: max |Δlogits| {d}"
    );
    assert_tokens_match_merged(&base, &adapter, &t.path("merged"), 1e-4);
}

/// One step of gpt2kit's trainer pieces from the adapter in `dir`: the loss, the gradient
/// norm and the adapter after the step.
fn our_step(
    base: &Path,
    dir: &Path,
    checkpointing: bool,
    lr: f64,
    wd: f64,
) -> (f64, f64, Vec<(String, Tensor)>) {
    let options = LoraOptions::read(dir).unwrap();
    let tr = Trainable::load_lora(
        base,
        Some(dir),
        &options,
        0,
        Device::Cpu,
        (false, Kind::Float),
    )
    .unwrap();
    let config = AdamWConfig {
        weight_decay: wd,
        ..AdamWConfig::default()
    };
    let mut adam = AdamW::new(&tr.params, config);
    let (ids, labels) = (rows(IDS), rows(LABELS));
    let targets = labels
        .narrow(1, 1, 11)
        .ne(-100)
        .sum(Kind::Int64)
        .int64_value(&[]);
    let pass = Pass {
        ids: &ids,
        labels: &labels,
        targets,
        checkpointing,
        dropout_seed: 0,
        autocast: None,
    };
    let sum = forward_backward(&tr, &tr.model, &pass)
        .unwrap()
        .double_value(&[]);
    let norm = total_grad_norm(&tr.params).unwrap();
    let scale = clip_coefficient(&norm, 1.0);
    assert!(adam.step(&tr.params, lr, scale).is_none());
    (
        sum / targets as f64,
        norm.double_value(&[]),
        tr.params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach()))
            .collect(),
    )
}

#[test]
fn one_lora_step_matches_peft_and_torch_adamw() {
    let t = TempDir::new("lora-step");
    let base = reference("hub-tied");
    let (lr, wd) = (1e-3, 0.1);
    peft_make(&base, &t.path("peft"), "8", "c_attn,c_proj,c_fc", "5");
    let out = t.path("step.safetensors");
    peft(&[
        "step",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        &t.s("peft"),
        "--ids",
        IDS,
        &format!("--labels={LABELS}"),
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let meta = std::fs::read(&out).unwrap();
    let header_len = u64::from_le_bytes(meta[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&meta[8..8 + header_len]).unwrap();
    let their_loss: f64 = header["__metadata__"]["loss"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let their_norm: f64 = header["__metadata__"]["grad_norm"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let theirs = named(&out);
    let before = named(&t.path("peft/adapter_model.safetensors"));
    let (loss, norm, ours) = our_step(&base, &t.path("peft"), false, lr, wd);
    // fp32 sums in another order: relative 1e-6.
    assert!(
        (loss - their_loss).abs() < 1e-5 * their_loss.abs(),
        "loss {loss} against {their_loss}"
    );
    assert!(
        (norm - their_norm).abs() < 1e-5 * their_norm,
        "grad norm {norm} against {their_norm}"
    );
    assert_eq!(ours.len(), theirs.len());
    for (name, t_ours) in &ours {
        let t_theirs = get(&theirs, name);
        let moved = max_diff(&t_theirs, &get(&before, name));
        // A first AdamW step moves each weight by lr·g/(|g| + ε) ≈ ±lr (plus the decay,
        // lr·wd·w): the steps are all about 1e-3, so a wrong sign, scale or decay is off
        // by ~1e-3. Gradients that agree to ~1e-6 relative give updates that agree to
        // far below 1e-6, except where a gradient is itself rounding noise (then its
        // sign may differ); none is, at these sizes (B non-zero, every layer in use).
        assert!(moved > 0.5 * lr, "{name}: peft moved it by only {moved}");
        let d = max_diff(t_ours, &t_theirs);
        assert!(
            d < 1e-6,
            "{name}: max |Δ| after one step {d} (the step is ~{lr})"
        );
    }
    // Gradient checkpointing: the same step bit for bit.
    let (loss_c, norm_c, ours_c) = our_step(&base, &t.path("peft"), true, lr, wd);
    assert_eq!((loss_c, norm_c), (loss, norm));
    for ((n, a), (_, b)) in ours.iter().zip(&ours_c) {
        assert!(a.equal(b), "{n} differs with gradient checkpointing");
    }
}

#[test]
fn lora_resume_and_gradient_checkpointing_equal_a_plain_run_bit_for_bit() {
    let t = TempDir::new("lora-resume");
    let dropout = ["--lora-dropout", "0.1"];
    assert_ok(&train_lora(&t, &t.s("plain"), &dropout));
    // A crash in the middle of step 5, then --resume from checkpoint-3.
    let mut crash = dropout.to_vec();
    crash.extend(["--stop-after-micro-batches", "5"]);
    assert!(!train_lora(&t, &t.s("resumed"), &crash).status.success());
    let mut resume = dropout.to_vec();
    resume.push("--resume");
    assert_ok(&train_lora(&t, &t.s("resumed"), &resume));
    let mut gc = dropout.to_vec();
    gc.push("--gradient-checkpointing");
    assert_ok(&train_lora(&t, &t.s("gc"), &gc));
    let final_of =
        |run: &str| std::fs::read(t.path(run).join("final/adapter_model.safetensors")).unwrap();
    assert!(
        final_of("plain") == final_of("resumed"),
        "resumed LoRA run differs"
    );
    assert!(
        final_of("plain") == final_of("gc"),
        "gradient-checkpointed LoRA run differs"
    );
    // Only the adapter is trained: the optimizer holds its tensors' moments and no other.
    let opt = named(&t.path("plain/checkpoint-6/optimizer.safetensors"));
    let adapter = named(&t.path("plain/checkpoint-6/adapter_model.safetensors"));
    assert_eq!(opt.len(), 2 * adapter.len() + 1);
    for (n, a) in &adapter {
        assert_eq!(get(&opt, &format!("exp_avg.{n}")).size(), a.size(), "{n}");
    }
    // Dropout is on: a run without it trains another adapter.
    assert_ok(&train_lora(&t, &t.s("nodrop"), &[]));
    assert!(final_of("plain") != final_of("nodrop"));
    // A LoRA checkpoint resumed with other LoRA flags is refused by name.
    let o = train_lora(&t, &t.s("plain"), &["--lora-dropout", "0.2", "--resume"]);
    assert_clean_failure(&o, 2, "--lora-dropout");
}

#[test]
fn full_fine_tuning_with_gradient_checkpointing_equals_without() {
    let t = TempDir::new("gc-full");
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec!["--max-steps", "3", "--lr", "1e-3"];
        args.extend(["--gradient-accumulation-steps", "2"]);
        args.extend(extra);
        assert_ok(&run_train(&t, &t.s(out), &args));
        std::fs::read(t.path(out).join("final/model.safetensors")).unwrap()
    };
    // f32 on the CPU: the same ops on the same inputs in both, so bit for bit (with
    // gradient accumulation: the tied wte's two gradients are summed before they join
    // the earlier micro-batch's, as in the plain pass).
    assert!(run("plain", &[]) == run("gc", &["--gradient-checkpointing"]));
}

#[test]
fn bad_adapters_are_refused_naming_the_tensor_or_key() {
    let t = TempDir::new("lora-bad");
    let base = reference("hub-tied");
    peft_make(&base, &t.path("good"), "8", "c_attn,c_proj", "0");
    let copy = |name: &str| {
        let d = t.path(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(t.path("good").join(f), d.join(f)).unwrap();
        }
        d
    };
    let edit_config = |dir: &Path, key: &str, value: serde_json::Value| {
        let p = dir.join("adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&p, v.to_string()).unwrap();
    };
    let key = "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight";
    // A missing tensor.
    let d = copy("missing");
    let tensors: Vec<(String, Tensor)> = named(&d.join("adapter_model.safetensors"))
        .into_iter()
        .filter(|(n, _)| n != key)
        .collect();
    Tensor::write_safetensors(&tensors, d.join("adapter_model.safetensors")).unwrap();
    assert_clean_failure(&merge(&t, &base, &d, "m1"), 2, key);
    // r disagreeing with the tensors.
    let d = copy("r");
    edit_config(&d, "r", serde_json::json!(8));
    assert_clean_failure(
        &merge(&t, &base, &d, "m2"),
        2,
        "lora_A.weight` has shape [4, 64]",
    );
    // A module the base lacks.
    let d = copy("module");
    edit_config(
        &d,
        "target_modules",
        serde_json::json!(["c_attn", "q_proj"]),
    );
    assert_clean_failure(&merge(&t, &base, &d, "m3"), 2, "`q_proj`");
    // Not LoRA, or DoRA.
    let d = copy("dora");
    edit_config(&d, "use_dora", serde_json::json!(true));
    assert_clean_failure(&merge(&t, &base, &d, "m4"), 2, "`use_dora`");
    // A tensor no target accounts for.
    let d = copy("extra");
    let mut tensors = named(&d.join("adapter_model.safetensors"));
    let stray = "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight";
    tensors.push((
        stray.into(),
        Tensor::zeros([4, 64], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&tensors, d.join("adapter_model.safetensors")).unwrap();
    assert_clean_failure(&merge(&t, &base, &d, "m5"), 2, stray);
    // A base of another width: the shapes disagree, named.
    let other = reference("bf16-quickgelu");
    let o = merge(&t, &other, &t.path("good"), "m6");
    assert_clean_failure(&o, 2, "has shape");
    for m in ["m1", "m2", "m3", "m4", "m5", "m6"] {
        assert!(!t.path(m).exists(), "{m} was written by a failed merge");
    }
    // An existing --out is not overwritten.
    std::fs::create_dir_all(t.path("taken/x")).unwrap();
    assert_clean_failure(
        &merge(&t, &base, &t.path("good"), "taken"),
        2,
        "already exists",
    );
}

#[test]
fn a_bf16_base_trains_an_adapter_close_to_the_f32_base() {
    let t = TempDir::new("lora-bf16");
    let eval_loss = |out: &str, extra: &[&str]| -> f64 {
        let mut args = vec!["--eval-split", "0.2", "--eval-steps", "6"];
        args.extend(extra);
        let o = if extra.contains(&"--lr") {
            args.extend(["--max-steps", "6", "--lora-r", "4"]);
            run_train(&t, &t.s(out), &args)
        } else {
            train_lora(&t, &t.s(out), &args)
        };
        assert_ok(&o);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("final model's eval loss"));
        let line = line.unwrap_or_else(|| panic!("no eval line: {text}"));
        line.split_whitespace().nth(4).unwrap().parse().unwrap()
    };
    let f32_loss = eval_loss("f32", &[]);
    let bf16_loss = eval_loss(
        "bf16",
        &["--base-dtype", "bf16", "--gradient-checkpointing"],
    );
    // bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 0.2% per value); over six
    // steps the eval loss moved ~1e-4 relative here. 1% bounds that, while an adapter
    // not applied in bf16 would leave the base's loss, which six steps at lr 1e-2 of
    // this adapter lower by more than 1% on this corpus.
    let rel = (bf16_loss - f32_loss).abs() / f32_loss;
    assert!(
        rel < 1e-2,
        "bf16 base {bf16_loss} against f32 base {f32_loss}"
    );
    let o = run_train(
        &t,
        &t.s("full"),
        &["--max-steps", "1", "--base-dtype", "bf16"],
    );
    assert_clean_failure(&o, 2, "--base-dtype bf16 needs --lora-r");
}
