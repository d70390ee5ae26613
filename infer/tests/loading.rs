//! Damaged or inconsistent model folders: each gives an error that names the file and
//! the tensor (or field), never a panic. Cases follow the robustness checklist of
//! shared safetensors loaders (header too large/small, bad offsets, trailing bytes).
mod common;

use std::path::Path;

use common::*;
use infer::{Error, Gpt2};
use tch::{Device, Kind, Tensor};

fn load(dir: &Path) -> Result<Gpt2, Error> {
    Gpt2::load(dir, Some(Kind::Float), Device::Cpu)
}

fn err_text(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors of `dir` after `edit` changes its tensor list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &path).unwrap();
}

#[test]
fn missing_folder_and_missing_weights() {
    let e = err_text(Path::new("/nonexistent/gpt2kit-model"));
    assert!(
        e.contains("/nonexistent/gpt2kit-model") && e.contains("does not exist"),
        "{e}"
    );
    let dir = copy_model("hub-tied", "no-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = err_text(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_and_malformed_safetensors() {
    let dir = copy_model("hub-tied", "malformed");
    let path = dir.join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good[..good.len() - 100].to_vec(),
            "MetadataIncompleteBuffer",
        ),
        ("empty", Vec::new(), "HeaderTooSmall"),
        ("7 bytes", good[..7].to_vec(), "HeaderTooSmall"),
        (
            "header u64::MAX",
            [u64::MAX.to_le_bytes().as_slice(), b"{}"].concat(),
            "HeaderTooLarge",
        ),
        (
            "header past the end",
            [1000u64.to_le_bytes().as_slice(), b"{}"].concat(),
            "InvalidHeaderLength",
        ),
        (
            "not JSON",
            [4u64.to_le_bytes().as_slice(), b"{xx}"].concat(),
            "InvalidHeaderDeserialization",
        ),
        (
            "trailing bytes",
            [good.as_slice(), b"junk"].concat(),
            "MetadataIncompleteBuffer",
        ),
    ];
    for (what, bytes, variant) in cases {
        std::fs::write(&path, bytes).unwrap();
        assert_safetensors_error(&dir, variant, what);
    }
    // Overlapping offsets: the second tensor claims the first one's bytes.
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let file = [
        (header.len() as u64).to_le_bytes().as_slice(),
        header,
        &[0u8; 8],
    ]
    .concat();
    std::fs::write(&path, file).unwrap();
    assert_safetensors_error(&dir, "InvalidOffset", "overlapping offsets");
}

/// The load fails with the safetensors crate's `variant`, reported against the file.
fn assert_safetensors_error(dir: &Path, variant: &str, what: &str) {
    match load(dir) {
        Err(e @ Error::Safetensors { .. }) => {
            let Error::Safetensors { path, source } = &e else {
                unreachable!()
            };
            assert!(path.ends_with("model.safetensors"), "{what}: {e}");
            assert!(
                format!("{source:?}").starts_with(variant),
                "{what}: {source:?}"
            );
            assert!(e.to_string().contains("model.safetensors"), "{what}: {e}");
        }
        Err(e) => panic!("{what}: expected {variant}, got {e}"),
        Ok(_) => panic!("{what}: loaded"),
    }
}

#[test]
fn missing_tensor_wrong_shape_and_dtype_name_the_tensor() {
    let dir = copy_model("hub-tied", "missing-tensor");
    rewrite(&dir, |t| t.retain(|(n, _)| n != "h.1.mlp.c_fc.bias"));
    let e = err_text(&dir);
    assert!(
        e.contains("`h.1.mlp.c_fc.bias` is missing") && e.contains("model.safetensors"),
        "{e}"
    );

    let dir = copy_model("hub-tied", "wrong-shape");
    rewrite(&dir, |t| {
        let w = t.iter_mut().find(|(n, _)| n == "wte.weight").unwrap();
        w.1 = Tensor::zeros([10, 64], (Kind::Float, Device::Cpu));
    });
    let e = err_text(&dir);
    assert!(e.contains("`wte.weight` has shape [10, 64]"), "{e}");

    let dir = copy_model("hub-tied", "wrong-dtype");
    rewrite(&dir, |t| {
        let w = t.iter_mut().find(|(n, _)| n == "ln_f.weight").unwrap();
        w.1 = w.1.to_kind(Kind::Int64);
    });
    let e = err_text(&dir);
    assert!(e.contains("`ln_f.weight` has dtype I64"), "{e}");

    // An untied model must carry its own head.
    let dir = copy_model("prefixed-untied", "untied-no-head");
    rewrite(&dir, |t| t.retain(|(n, _)| n != "lm_head.weight"));
    assert!(err_text(&dir).contains("`lm_head.weight` is missing"));
}

#[test]
fn bad_config_names_the_file_and_field() {
    let dir = copy_model("hub-tied", "bad-config");
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, "{ not json").unwrap();
    let e = err_text(&dir);
    assert!(
        e.contains("config.json") && e.contains("invalid config"),
        "{e}"
    );
    std::fs::write(
        &cfg,
        r#"{"n_embd": 64, "n_head": 5, "vocab_size": 400, "eos_token_id": 0}"#,
    )
    .unwrap();
    let e = err_text(&dir);
    assert!(e.contains("n_head"), "{e}");
    // Config and weights disagree on the width: the first tensor read names it.
    std::fs::write(&cfg, r#"{"n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 64, "vocab_size": 400, "eos_token_id": 0, "bos_token_id": 0}"#).unwrap();
    let e = err_text(&dir);
    assert!(
        e.contains("expected [32]") || e.contains("expected [32,"),
        "{e}"
    );
    std::fs::remove_file(&cfg).unwrap();
    assert!(err_text(&dir).contains("config.json"));
}

#[test]
fn shard_index_errors_name_the_index_or_shard() {
    let dir = copy_model("sharded-f16", "bad-shards");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_text(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"wte.weight": "../../etc/passwd"}}"#,
    )
    .unwrap();
    let e = err_text(&dir);
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("not a file name"),
        "{e}"
    );
    std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    assert!(err_text(&dir).contains("weight_map"));
}

#[test]
fn both_key_namings_and_legacy_buffers_load() {
    // hub-tied: unprefixed keys plus attn.bias / attn.masked_bias buffers;
    // prefixed-untied: `transformer.` keys and its own lm_head.
    let hub = load(&model_dir("hub-tied")).unwrap();
    assert!(hub.lm_head().is_none());
    let pre = load(&model_dir("prefixed-untied")).unwrap();
    assert!(pre.lm_head().is_some());
}

/// A tied head is `wte` itself: gradients of the training forward reach `wte` through the
/// head even for tokens that never appear in the input (whose embedding rows get none),
/// however late `requires_grad` is set.
#[test]
fn a_tied_head_trains_wte() {
    let model = load(&model_dir("hub-tied")).unwrap();
    assert!(model.lm_head().is_none(), "hub-tied is tied");
    let wte = model.wte.shallow_clone();
    let _ = wte.set_requires_grad(true);
    let ids = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let logits = model.forward_train(&ids); // (1, 3, V)
    logits.sum(Kind::Float).backward();
    let grad = model.wte.grad();
    assert!(grad.defined(), "wte has a gradient");
    // Row 0 is not an input token: only the head can have put a gradient there.
    let row = grad.get(0).abs().sum(Kind::Float).double_value(&[]);
    assert!(row > 0.0, "the head's gradient reaches wte (row 0: {row})");
}
