//! Weights used in place from a memory map: the same model as weights copied out of the
//! file, bit for bit (float, bf16 converted while packing, int8 artifacts, with and
//! without the decode kernels), and a weight file truncated, rewritten or replaced while
//! a model is mapped from it is an error or harmless, never a crash (SIGBUS).
mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::*;
use infer::checkpoint::WeightFiles;
use infer::generate::{generate, GenerationConfig};
use infer::{EngineOptions, Gpt2, Gpt2Config};
use tch::{Device, Kind, Tensor};

const MODELS: [&str; 4] = [
    "hub-tied",
    "prefixed-untied",
    "sharded-f16",
    "bf16-quickgelu",
];

fn options(map_weights: bool, kernels: bool) -> EngineOptions {
    EngineOptions {
        map_weights,
        kernels,
        ..EngineOptions::default()
    }
}

fn load(dir: &Path, kind: Option<Kind>, opts: &EngineOptions) -> Gpt2 {
    Gpt2::load_with(dir, kind, &[Device::Cpu], opts)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Logits of a 3-token prompt, then of 3 decode steps: the prefill and decode paths.
fn logits(model: &Gpt2) -> Tensor {
    prompt_and_step_logits(model)
}

fn assert_same_bits(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}");
    // Bit for bit: the same values packed or used in place run the same kernels in the
    // same order, so any difference is a weight read wrong.
    assert!(a.equal(b), "{what}: max diff {}", max_diff(a, b));
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

fn scratch(test: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("memory-{test}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn mapped_models_equal_copied_ones_bit_for_bit_on_the_kernels() {
    for name in MODELS {
        let dir = reference(name);
        for kind in [None, Some(Kind::Float), Some(Kind::BFloat16)] {
            for kernels in [true, false] {
                let what = format!("{name} {kind:?} kernels={kernels}");
                let mapped = load(&dir, kind, &options(true, kernels));
                let copied = load(&dir, kind, &options(false, kernels));
                assert_eq!(mapped.decodes_on_kernels(1), copied.decodes_on_kernels(1));
                let (a, b) = (logits(&mapped), logits(&copied));
                if mapped.decodes_on_kernels(1) {
                    assert_same_bits(&a, &b, &what);
                    continue;
                }
                // libtorch's BLAS picks its code path by the operands' alignment (a view of
                // the map is 4-byte aligned, a copy 64), so the sums' order may differ:
                // a few roundings of the compute dtype relative to the logits' scale.
                let eps = match mapped.kind() {
                    Kind::Float => 1e-5,
                    _ => 2e-2,
                };
                let scale = f64::try_from(b.abs().max()).unwrap().max(1.0);
                assert!(
                    max_diff(&a, &b) <= eps * scale,
                    "{what}: {}",
                    max_diff(&a, &b)
                );
            }
        }
    }
}

#[test]
fn bf16_converted_while_packing_equals_libtorchs_conversion() {
    // hub-tied stores fp32. Loaded as bf16 its weights are rounded as they are packed
    // (no bf16 tensor is made); the reference converts every tensor with libtorch's
    // `to_kind` first, then packs those bf16 tensors.
    let dir = reference("hub-tied");
    let mapped = load(&dir, Some(Kind::BFloat16), &EngineOptions::default());
    let config = Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let files = WeightFiles::open_dir(&dir).unwrap();
    let mut converted = Gpt2::from_weights(config, &files, Kind::BFloat16, &[Device::Cpu]).unwrap();
    converted.pack_for_cpu_decode().unwrap();
    assert!(mapped.decodes_on_kernels(1) && converted.decodes_on_kernels(1));
    assert_same_bits(&logits(&mapped), &logits(&converted), "bf16");
}

#[test]
fn int8_artifacts_mapped_equal_copied_ones() {
    let src = reference("hub-tied");
    for method in ["int8-weight", "int8-dynamic"] {
        let art = scratch(&format!("int8-{method}")).join("artifact");
        quantize_int8(&src, &art, method, &[]);
        for kernels in [true, false] {
            let mapped = load(&art, None, &options(true, kernels));
            let copied = load(&art, None, &options(false, kernels));
            let what = format!("{method} kernels={kernels}");
            assert_same_bits(&logits(&mapped), &logits(&copied), &what);
        }
    }
}

/// A copy of hub-tied that the test may damage, and its weight file.
fn damaged_copy(test: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(test);
    copy_files(&reference("hub-tied"), &dir);
    let file = dir.join("model.safetensors");
    (dir, file)
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        ..GenerationConfig::default()
    }
}

#[test]
fn a_file_truncated_under_a_mapped_model_is_an_error_not_a_crash() {
    for kernels in [false, true] {
        let (dir, file) = damaged_copy(&format!("truncated-{kernels}"));
        let model = load(&dir, None, &options(true, kernels));
        truncated_is_reported(&model, &file, &format!("kernels={kernels}"));
    }
}

/// Truncates `file` under `model` (mapped from it) and checks that the model still runs
/// and that the file check and generation report it by name.
fn truncated_is_reported(model: &Gpt2, file: &Path, what: &str) {
    let before = logits(model);
    truncate_to_a_third(file);
    // Every weight page past the new end is gone: reading it would raise SIGBUS. The
    // handler gives zeros instead and flags the file.
    let after = logits(model);
    assert_eq!(after.size(), before.size(), "{what}");
    let name = file.file_name().unwrap().to_str().unwrap();
    let err = model.check_files().unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("trunc"), "{what}: {err}");
    // Generation reports it rather than returning tokens of another model.
    let err = generate(model, &[vec![5, 17]], &greedy(3), &|_| false, |_, _| {})
        .err()
        .unwrap_or_else(|| panic!("{what}: generation ignored the truncation"))
        .to_string();
    assert!(err.contains(name), "{what}: {err}");
}

#[test]
fn a_file_truncated_while_loading_is_an_error() {
    // Truncated after its header was read, before its tensors were: loading reads zeros
    // where the pages were (no SIGBUS), and the file check refuses the result.
    let (dir, file) = damaged_copy("truncated-load");
    let files = WeightFiles::open_dir(&dir).unwrap().in_place(true);
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len / 2).unwrap();
    let config = Gpt2Config::from_file(&dir.join("config.json")).unwrap();
    let model = Gpt2::from_weights(config, &files, Kind::Float, &[Device::Cpu]).unwrap();
    let _ = logits(&model);
    let err = files.check().unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // A fresh load of the truncated file is refused by its header check.
    let err = Gpt2::load_with(&dir, None, &[Device::Cpu], &EngineOptions::default())
        .err()
        .expect("a truncated file loads")
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn a_file_rewritten_in_place_is_an_error_and_one_replaced_by_rename_is_harmless() {
    let (dir, file) = damaged_copy("rewritten");
    let model = load(&dir, None, &options(true, false));
    let want = logits(&model);
    // Replaced by rename (how every writer here saves): the old file stays mapped.
    let bytes = std::fs::read(&file).unwrap();
    let tmp = dir.join("model.safetensors.tmp");
    std::fs::write(&tmp, vec![0u8; bytes.len()]).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    assert_same_bits(&logits(&model), &want, "after a rename over the file");
    model.check_files().unwrap();
    // Rewritten in place, same size: the bytes not yet read change under the model.
    let back = dir.join("model.safetensors.back");
    std::fs::write(&back, &bytes).unwrap();
    std::fs::rename(&back, &file).unwrap();
    let model = load(&dir, None, &options(true, false));
    model.check_files().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.seek(SeekFrom::End(-4)).unwrap();
    f.write_all(&[1, 2, 3, 4]).unwrap();
    drop(f);
    let err = model.check_files().unwrap_err().to_string();
    assert!(err.contains("rewritten"), "{err}");
}

/// Reference model `model` quantized to a GGUF file of `method` in `dir`.
/// `prefixed-untied` (its own head) is first given what llama.cpp's gpt2 computes:
/// GELU (tanh), attention scaled by 1/sqrt(head_dim) only.
fn gguf_of(model: &str, dir: &Path, method: &str) -> PathBuf {
    let out = dir.join(format!("{model}-{method}.gguf"));
    let mut m = reference(model);
    if model == "prefixed-untied" {
        let copy = dir.join(model);
        copy_files(&m, &copy);
        let path = copy.join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        c["activation_function"] = "gelu_new".into();
        c["scale_attn_by_inverse_layer_idx"] = false.into();
        c["reorder_and_upcast_attn"] = false.into();
        std::fs::write(&path, c.to_string()).unwrap();
        m = copy;
    }
    let o = out.to_str().unwrap().to_string();
    assert_ok(&gpt2kit(&[
        "quantize",
        "--model",
        m.to_str().unwrap(),
        "--out",
        &o,
        "--method",
        method,
    ]));
    out
}

#[test]
fn gguf_blocks_read_in_place_equal_copied_ones() {
    let dir = scratch("gguf-mapped");
    // tied (the head and the embedding read `token_embd`'s blocks) and untied (`output`)
    for model in ["hub-tied", "prefixed-untied"] {
        for method in ["q8_0", "q4_0", "q4_k_m"] {
            let file = gguf_of(model, &dir, method);
            let mapped = load(&file, None, &options(true, true));
            let copied = load(&file, None, &options(false, true));
            let what = format!("{model} {method}");
            assert_same_bits(&logits(&mapped), &logits(&copied), &what);
        }
    }
}

#[test]
fn a_gguf_file_truncated_under_a_mapped_model_is_an_error_not_a_crash() {
    let dir = scratch("gguf-truncated");
    let file = gguf_of("hub-tied", &dir, "q4_0");
    let model = load(&file, None, &options(true, true));
    // the blocks past the new end read as zeros, as a safetensors file's pages do
    truncated_is_reported(&model, &file, "gguf q4_0");
}
