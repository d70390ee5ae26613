//! The training stage against PyTorch and transformers (tests/reference/
//! make_train_reference.py): two AdamW steps with clipping equal torch.optim.AdamW's,
//! the LR schedules equal get_scheduler's, and eval loss equals transformers' on the
//! same packed blocks.
use std::path::PathBuf;

use infer::checkpoint::WeightFiles;
use infer::{Gpt2, Gpt2Config, Tokenizer};
use tch::{Device, Kind, Tensor};
use train::data;
use train::optim::{
    clip_coefficient, clip_coefficient_tensor, total_grad_norm, zero_grad, AdamW, AdamWConfig,
};
use train::schedule::{Schedule, SchedulerKind};

fn reference_dir() -> PathBuf {
    let dir = std::env::var_os("GPT2KIT_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/reference"));
    assert!(
        dir.join("train/expected.json").exists(),
        "{}/train missing: run `make reference`",
        dir.display()
    );
    dir
}

fn expected() -> serde_json::Value {
    let p = reference_dir().join("train/expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids_tensor(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t) = (rows.len() as i64, rows[0].len() as i64);
    Tensor::from_slice(&rows.concat()).view([b, t])
}

#[test]
fn two_adamw_steps_equal_pytorch() {
    two_adamw_steps(false);
}

/// libtorch's fused kernel (`--optim adamw_torch_fused`, the default off the CPU), run
/// here on the CPU, within the same bound of PyTorch's unfused update.
#[test]
fn two_fused_adamw_steps_equal_pytorch() {
    two_adamw_steps(true);
}

fn two_adamw_steps(fused: bool) {
    let exp = expected();
    let dir = reference_dir().join("hub-tied");
    let config = Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let files = WeightFiles::open_dir(&dir).unwrap();
    let model = Gpt2::from_weights(config, &files, Kind::Float, &[Device::Cpu]).unwrap();
    let mut params = model.named_tensors().unwrap();
    for (_, p) in &mut params {
        let _ = p.requires_grad_(true);
    }
    let f = |k: &str| exp[k].as_f64().unwrap();
    let betas: Vec<f64> = serde_json::from_value(exp["betas"].clone()).unwrap();
    let mut adam = AdamW::new(
        &params,
        AdamWConfig {
            beta1: betas[0],
            beta2: betas[1],
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        },
    );
    let (ids, labels) = (ids_tensor(&exp["ids"]), ids_tensor(&exp["labels"]));
    let targets = labels
        .narrow(1, 1, labels.size()[1] - 1)
        .ne(-100)
        .sum(Kind::Int64)
        .int64_value(&[]);
    for step in 0..2 {
        let loss = data::lm_loss_sum(&model.forward_train(&ids), &labels) / targets as f64;
        let want = exp["losses"][step].as_f64().unwrap();
        let got = loss.double_value(&[]);
        // fp32 forward in another library: agreement to ~1e-6 relative; 1e-5 stated.
        assert!(
            (got - want).abs() < 1e-5 * want.abs(),
            "step {step}: loss {got} vs {want}"
        );
        loss.backward();
        let total = total_grad_norm(&params).unwrap();
        let norm = total.double_value(&[]);
        let want_norm = exp["grad_norms"][step].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() < 1e-4 * want_norm,
            "grad norm {norm} vs {want_norm}"
        );
        let non_finite = if fused {
            let k = clip_coefficient_tensor(&total, f("max_grad_norm"));
            adam.step_fused(&params, f("lr"), k.as_ref()).unwrap()
        } else {
            adam.step(
                &params,
                f("lr"),
                clip_coefficient(&total, f("max_grad_norm")),
            )
        };
        assert_eq!(non_finite, None);
        zero_grad(&params);
    }
    let want =
        Tensor::read_safetensors(reference_dir().join("train/adamw_weights.safetensors")).unwrap();
    let mut checked = 0;
    for (name, w) in want {
        let (_, p) = params
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name}"));
        let mut d = (p.detach() - &w).abs();
        if name.ends_with("attn.c_attn.bias") {
            // The key bias gets a zero gradient in exact arithmetic (softmax is
            // invariant to adding the same q·b_k to every score), so both libraries
            // see rounding noise there and Adam's normalised step turns it into updates
            // of up to ~lr of either sign. Bounded by 2·lr per step; the rest is exact.
            let e = d.size()[0] / 3;
            let k = d.narrow(0, e, e).max().double_value(&[]);
            assert!(k <= 4.0 * f("lr"), "{name}: key bias moved {k}");
            d = Tensor::cat(&[d.narrow(0, 0, e), d.narrow(0, 2 * e, e)], 0);
        }
        let diff = d.max().double_value(&[]);
        // The task's bound: updated weights within 1e-5 of PyTorch's.
        assert!(diff < 1e-5, "{name}: max |Δ| {diff}");
        checked += 1;
    }
    assert_eq!(checked, params.len());
    assert_eq!(adam.step, 2);
}

#[test]
fn schedules_equal_get_scheduler() {
    let exp = expected();
    let s = &exp["schedules"];
    for (name, kind) in [
        ("constant_with_warmup", SchedulerKind::Constant),
        ("linear", SchedulerKind::Linear),
        ("cosine", SchedulerKind::Cosine),
    ] {
        let sched = Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: s["warmup_steps"].as_i64().unwrap(),
            total_steps: s["total_steps"].as_i64().unwrap(),
        };
        let want: Vec<f64> = serde_json::from_value(s[name].clone()).unwrap();
        for (i, w) in want.iter().enumerate() {
            let got = sched.lr(i as i64);
            assert!((got - w).abs() < 1e-12, "{name} step {i}: {got} vs {w}");
        }
    }
    assert_eq!(Schedule::warmup_from_ratio(0.1, 25), 3);
}

#[test]
fn eval_loss_equals_transformers() {
    let exp = expected();
    let dir = reference_dir().join("hub-tied");
    let model = Gpt2::load(&dir, None, Device::Cpu).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let block = exp["eval_block_size"].as_i64().unwrap();
    for batch in [1, 3] {
        let r = train::eval::perplexity_on_jsonl(
            &model,
            &tok,
            &reference_dir().join("train/eval.jsonl"),
            block,
            batch,
        )
        .unwrap();
        let want = exp["eval_loss"].as_f64().unwrap();
        assert_eq!(r.tokens, exp["eval_tokens"].as_i64().unwrap());
        // fp32 in both; sums of ~80 token losses: 1e-5 relative.
        assert!(
            (r.loss - want).abs() < 1e-5 * want,
            "batch {batch}: {} vs {want}",
            r.loss
        );
        assert!((r.perplexity - want.exp()).abs() < 1e-4 * want.exp());
    }
}
