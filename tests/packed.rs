//! The packed file (`infer::packed`): a model loaded from it (the run that writes it, and
//! the runs that map it) computes what packing at start computes, bit for bit; a stale,
//! truncated or corrupt file is rebuilt, never used or crashed on; a folder marked
//! read-only gets its file in the user's cache folder instead.
mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use infer::{EngineOptions, Gpt2, PackedCache};
use tch::{Device, Kind, Tensor};

fn options(cache: PackedCache) -> EngineOptions {
    EngineOptions {
        packed_cache: cache,
        ..EngineOptions::default()
    }
}

fn auto(fallback: Option<&Path>) -> EngineOptions {
    options(PackedCache::Auto {
        fallback: fallback.map(Path::to_path_buf),
    })
}

fn load(dir: &Path, kind: Kind, opts: &EngineOptions) -> Gpt2 {
    Gpt2::load_with(dir, Some(kind), &[Device::Cpu], opts)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Logits of a 3-token prompt, then of 3 decode steps: the prefill and decode paths.
fn logits(model: &Gpt2) -> Tensor {
    assert!(model.decodes_on_kernels(1), "the model runs on the kernels");
    prompt_and_step_logits(model)
}

/// Bit for bit: the same panels run the same kernels in the same order, wherever they
/// lie, so any difference is a panel read wrong (or a stale one used).
fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}");
    assert!(a.equal(b), "{what}: logits differ");
}

fn scratch(test: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("packed-{test}"));
    if d.exists() {
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
    }
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A writable copy of a reference model.
fn model_copy(test: &str, name: &str) -> PathBuf {
    let dir = scratch(test).join(name);
    copy_files(&reference(name), &dir);
    dir
}

fn packed_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "packed-bf16.gpt2kit",
        _ => "packed-f32.gpt2kit",
    }
}

/// (inode, length) of a file: a rebuilt packed file is a new inode (renamed into place).
fn identity(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.ino(), m.len())
}

#[test]
fn a_packed_file_gives_the_logits_of_packing_at_start() {
    // Tied and untied heads, a prefixed checkpoint, sharded weight files, bf16 on disk.
    for name in [
        "hub-tied",
        "prefixed-untied",
        "sharded-f16",
        "bf16-quickgelu",
    ] {
        let dir = model_copy(&format!("same-{name}"), name);
        for kind in [Kind::Float, Kind::BFloat16] {
            let what = format!("{name} {kind:?}");
            let want = logits(&load(&dir, kind, &options(PackedCache::Off)));
            let file = dir.join(packed_name(kind));
            assert!(!file.exists());
            // First run: packs, then writes the file.
            let first = load(&dir, kind, &auto(None));
            assert_same(&logits(&first), &want, &format!("{what}, writing"));
            let written = identity(&file);
            // Later runs: map it (not rewritten).
            for run in 0..2 {
                let mapped = load(&dir, kind, &auto(None));
                assert_same(&logits(&mapped), &want, &format!("{what}, mapped {run}"));
                assert_eq!(identity(&file), written, "{what}: rewritten");
                mapped.check_files().unwrap();
            }
        }
    }
}

/// Rewrites a weight file in place, same size, with its last 64 bytes changed (the test
/// checks that they change the logits), then sets its modification time back.
fn rewrite_in_place(file: &Path) {
    let before = std::fs::metadata(file).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(file).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 64..] {
        *b = b.wrapping_add(1);
    }
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).unwrap();
    f.set_modified(before).unwrap();
    assert_eq!(std::fs::metadata(file).unwrap().len() as usize, n);
}

#[test]
fn a_stale_packed_file_is_rebuilt() {
    let dir = model_copy("stale", "hub-tied");
    let file = dir.join(packed_name(Kind::Float));
    let old = logits(&load(&dir, Kind::Float, &auto(None)));
    let written = identity(&file);
    rewrite_in_place(&dir.join("model.safetensors"));
    let want = logits(&load(&dir, Kind::Float, &options(PackedCache::Off)));
    assert!(
        !old.equal(&want),
        "the rewrite changed no logit: the test proves nothing"
    );
    let rebuilt = load(&dir, Kind::Float, &auto(None));
    assert_same(&logits(&rebuilt), &want, "after the rewrite");
    assert_ne!(identity(&file), written, "the stale file was kept");
    // And the rebuilt file is then mapped.
    let again = identity(&file);
    assert_same(
        &logits(&load(&dir, Kind::Float, &auto(None))),
        &want,
        "mapped",
    );
    assert_eq!(identity(&file), again);
}

#[test]
fn a_truncated_or_corrupt_packed_file_is_rebuilt() {
    let dir = model_copy("damaged", "hub-tied");
    let file = dir.join(packed_name(Kind::BFloat16));
    let want = logits(&load(&dir, Kind::BFloat16, &auto(None)));
    let full = identity(&file).1;
    type Damage = fn(&Path, u64);
    let damages: [(&str, Damage); 4] = [
        ("truncated in the panels", |f, n| truncate(f, n / 2)),
        ("truncated in the header", |f, _| truncate(f, 40)),
        ("empty", |f, _| truncate(f, 0)),
        ("header corrupt", |f, _| {
            let f = std::fs::OpenOptions::new().write(true).open(f).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, b"XXXX", 100).unwrap();
        }),
    ];
    for (what, damage) in damages {
        damage(&file, full);
        let model = load(&dir, Kind::BFloat16, &auto(None));
        assert_same(&logits(&model), &want, what);
        assert_eq!(identity(&file).1, full, "{what}: not rebuilt");
    }
    // Through the CLI: a one-line note, and the same tokens.
    let m = dir.to_str().unwrap();
    let args = [
        "infer",
        "--model",
        m,
        "--prompt",
        "hello",
        "--max-new-tokens",
        "6",
    ];
    let args = [&args[..], &["--dtype", "bf16", "--packed-cache", "auto"]].concat();
    let clean = gpt2kit(&args);
    assert_ok(&clean);
    truncate(&file, 100);
    let o = gpt2kit(&args);
    assert_ok(&o);
    assert_eq!(stdout(&o), stdout(&clean));
    let note = stderr(&o);
    assert!(
        note.contains("note: packed file") && note.contains("header"),
        "{note}"
    );
    // `infer` leaves the file to a detached process.
    wait_for("the rebuilt file", || identity(&file).1 == full);
}

/// Waits (up to two minutes: a machine busy with other builds) for the detached process
/// that writes a packed file after an `infer` run.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1200 {
        if done() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{what} was never written");
}

fn truncate(file: &Path, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.set_len(len).unwrap();
}

#[test]
fn a_read_only_folder_gets_its_packed_file_in_the_user_cache() {
    let dir = model_copy("read-only", "hub-tied");
    let user = scratch("read-only-cache");
    let want = logits(&load(&dir, Kind::Float, &options(PackedCache::Off)));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let first = logits(&load(&dir, Kind::Float, &auto(Some(&user))));
    let second = logits(&load(&dir, Kind::Float, &auto(Some(&user))));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!dir.join(packed_name(Kind::Float)).exists());
    let cached: Vec<_> = std::fs::read_dir(&user)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        cached.len() == 1 && cached[0].ends_with(packed_name(Kind::Float)),
        "{cached:?}"
    );
    assert_same(&first, &want, "writing");
    assert_same(&second, &want, "mapped");
    // The CLI's fallback is $XDG_CACHE_HOME/gpt2kit/packed.
    let xdg = scratch("read-only-xdg");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let m = dir.to_str().unwrap();
    let o = gpt2kit_env(
        &[
            "infer",
            "--model",
            m,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
        ],
        &[
            ("GPT2KIT_PACKED_CACHE", "auto"),
            ("XDG_CACHE_HOME", xdg.to_str().unwrap()),
        ],
    );
    assert_ok(&o);
    let packed = xdg.join("gpt2kit/packed");
    let written = || {
        std::fs::read_dir(&packed).is_ok_and(|d| {
            let names: Vec<_> = d.flatten().map(|e| e.file_name()).collect();
            names.len() == 1 && names[0].to_string_lossy().ends_with(".gpt2kit")
        })
    };
    wait_for("the user cache's file", written);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!dir.join(packed_name(Kind::Float)).exists());
}

/// An int8 artifact of hub-tied made by `quantize` in the test's scratch folder.
fn int8_artifact(test: &str, method: &str, float_embeddings: bool) -> PathBuf {
    let art = scratch(test).join("artifact");
    let extra: &[&str] = match float_embeddings {
        true => &["--keep-embeddings-float"],
        false => &[],
    };
    quantize_int8(&reference("hub-tied"), &art, method, extra);
    art
}

#[test]
fn int8_artifacts_get_a_packed_file_too() {
    // Both int8 methods, with the head int8 (the tied embeddings quantized) or float: a
    // file of int8 panels (int8-dynamic's with their column sums) and the head's.
    for (method, float_embeddings, name) in [
        ("int8-dynamic", false, "packed-int8-dynamic.gpt2kit"),
        ("int8-dynamic", true, "packed-int8-dynamic-f32.gpt2kit"),
        ("int8-weight", false, "packed-int8.gpt2kit"),
        ("int8-weight", true, "packed-int8-f32.gpt2kit"),
    ] {
        let what = format!("{method}, float embeddings {float_embeddings}");
        let test = format!("int8-{method}-{float_embeddings}");
        let dir = int8_artifact(&test, method, float_embeddings);
        let want = logits(&load(&dir, Kind::Float, &options(PackedCache::Off)));
        let file = dir.join(name);
        assert!(!file.exists(), "{what}");
        let first = load(&dir, Kind::Float, &auto(None));
        assert_same(&logits(&first), &want, &format!("{what}, writing"));
        let written = identity(&file);
        for run in 0..2 {
            let mapped = load(&dir, Kind::Float, &auto(None));
            assert_same(&logits(&mapped), &want, &format!("{what}, mapped {run}"));
            assert_eq!(identity(&file), written, "{what}: rewritten");
        }
    }
}

/// Sets one value of the tensor ending in `suffix` to `value` (NaN, ±inf, an int8
/// -128), rewriting the file; its name.
fn put_value(dir: &Path, suffix: &str, value: f64) -> String {
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    let (name, t) = tensors
        .iter_mut()
        .find(|(n, _)| n.ends_with(suffix))
        .unwrap_or_else(|| panic!("no tensor ending in {suffix}"));
    let _ = t.view([-1]).get(5).fill_(value);
    let name = name.clone();
    Tensor::write_safetensors(&tensors, &path).unwrap();
    name
}

/// Every way a model loads that a check of its weights must hold for: from a packed
/// file made before they changed, again (the failed run left no file made from the
/// changed weights), packed at start, and off the kernels.
fn every_way() -> [(&'static str, EngineOptions); 4] {
    let kernels_off = EngineOptions {
        kernels: false,
        ..EngineOptions::default()
    };
    [
        ("packed file", auto(None)),
        ("packed file, again", auto(None)),
        ("packed at start", options(PackedCache::Off)),
        ("no kernels", kernels_off),
    ]
}

/// The error loading `dir` in `kind` with `opts` gives (a panic when it loads).
fn load_error(dir: &Path, kind: Kind, opts: &EngineOptions, what: &str) -> String {
    match Gpt2::load_with(dir, Some(kind), &[Device::Cpu], opts) {
        Ok(_) => panic!("{what}: loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_int8_weight_holding_minus_128_is_refused_however_it_loads() {
    // The check runs while packing reads the weights; a packed file made from the sound
    // weights before they changed must not stand in for it.
    for (method, suffix) in [
        ("int8-dynamic", "h.1.mlp.c_proj.weight"),
        ("int8-dynamic", "wte.weight"),
        ("int8-weight", "h.0.attn.c_attn.weight"),
    ] {
        let dir = int8_artifact(&format!("min-{method}-{suffix}"), method, false);
        drop(load(&dir, Kind::Float, &auto(None)));
        let name = put_value(&dir, suffix, -128.0);
        for (how, opts) in every_way() {
            let what = format!("{method} {suffix}, {how}");
            let err = load_error(&dir, Kind::Float, &opts, &what);
            assert!(
                err.contains(&format!("`{name}` holds -128")),
                "{what}: {err}"
            );
        }
    }
}

#[test]
fn a_weight_holding_nan_or_inf_is_refused_however_it_loads() {
    // Packing checks the values it reads; a packed file made from the sound weights
    // before they changed must not stand in for the check. fp32 and bf16 on disk, run
    // in f32 and in bf16 (converted while packing), a linear and the tied head's wte.
    for (model, suffix, value) in [
        ("hub-tied", "h.1.mlp.c_fc.weight", f64::NAN),
        ("hub-tied", "wte.weight", f64::INFINITY),
        (
            "bf16-quickgelu",
            "h.0.attn.c_proj.weight",
            f64::NEG_INFINITY,
        ),
        ("bf16-quickgelu", "wte.weight", f64::NAN),
    ] {
        for kind in [Kind::Float, Kind::BFloat16] {
            let what = format!("{model} {suffix} {kind:?}");
            let dir = model_copy(&format!("nan-{model}-{suffix}-{kind:?}"), model);
            drop(load(&dir, kind, &auto(None)));
            assert!(dir.join(packed_name(kind)).exists(), "{what}");
            let name = put_value(&dir, suffix, value);
            for (how, opts) in every_way() {
                let what = format!("{what}, {how}");
                let err = load_error(&dir, kind, &opts, &what);
                assert!(
                    err.contains(&format!("`{name}`")) && err.contains("NaN"),
                    "{what}: {err}"
                );
            }
        }
    }
}

#[test]
fn switching_the_tie_of_the_head_rebuilds_the_packed_file() {
    // prefixed-untied stores lm_head.weight; tied, the head is wte (as transformers ties
    // it whenever the config says so): the file's head must not be the other tensor's.
    let dir = model_copy("tie", "prefixed-untied");
    let file = dir.join(packed_name(Kind::Float));
    let untied = logits(&load(&dir, Kind::Float, &auto(None)));
    let written = identity(&file);
    let config = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["tie_word_embeddings"] = serde_json::json!(true);
    std::fs::write(&config, c.to_string()).unwrap();
    let want = logits(&load(&dir, Kind::Float, &options(PackedCache::Off)));
    assert!(
        !want.equal(&untied),
        "tying changed no logit: the test proves nothing"
    );
    assert_same(
        &logits(&load(&dir, Kind::Float, &auto(None))),
        &want,
        "tied",
    );
    assert_ne!(identity(&file), written, "the untied head's file was kept");
}

#[test]
fn an_fp32_weight_beyond_bf16s_range_is_refused_in_bf16_only() {
    // 3.4e38 is finite in f32 (max 3.40e38) and rounds to +inf in bf16 (max 3.39e38).
    let dir = model_copy("bf16-range", "hub-tied");
    let name = put_value(&dir, "h.0.mlp.c_fc.weight", 3.4e38);
    for cache in [PackedCache::Off, PackedCache::Auto { fallback: None }] {
        let opts = options(cache);
        let err = load_error(&dir, Kind::BFloat16, &opts, "bf16");
        assert!(err.contains(&format!("`{name}`")), "{err}");
        load(&dir, Kind::Float, &opts);
    }
}
