//! `EngineOptions`, the engine's switches, decide at load which paths a model runs: the
//! CPU decode kernels, fused decode steps, the size of the kernels' pool.
mod common;

use common::*;
use infer::kernels::ThreadPool;
use infer::{EngineOptions, Error, Gpt2};
use tch::{Device, Kind, Tensor};

fn load(options: &EngineOptions) -> Gpt2 {
    Gpt2::load_with(
        &model_dir("hub-tied"),
        Some(Kind::Float),
        &[Device::Cpu],
        options,
    )
    .unwrap()
}

/// Logits of a 3-token prompt and 3 decode steps, one row.
fn logits(model: &Gpt2) -> Tensor {
    tch::no_grad(|| {
        let mut cache = model.new_cache(1, 6);
        let mut out = vec![model.forward(
            &Tensor::from_slice(&[5i64, 17, 99]).view([1, 3]),
            &mut cache,
        )];
        for t in [3i64, 250, 42] {
            out.push(model.forward(&Tensor::from_slice(&[t]).view([1, 1]), &mut cache));
        }
        Tensor::cat(&out, 1)
    })
}

#[test]
fn options_choose_the_paths() {
    let all = load(&EngineOptions::default());
    assert!(all.decodes_on_kernels(1) && all.fuses_decode());
    let unfused = load(&EngineOptions {
        fused_decode: false,
        ..EngineOptions::default()
    });
    assert!(unfused.decodes_on_kernels(1) && !unfused.fuses_decode());
    let libtorch = load(&EngineOptions {
        kernels: false,
        ..EngineOptions::default()
    });
    assert!(!libtorch.decodes_on_kernels(1) && !libtorch.fuses_decode());
    // The same model on every path, to summation order (as fused_decode's 1e-5).
    let want = logits(&libtorch);
    for (what, m) in [("fused", &all), ("unfused", &unfused)] {
        let d = f64::try_from((logits(m) - &want).abs().max()).unwrap();
        assert!(d <= 1e-4, "{what} vs libtorch: {d:e}");
    }
}

#[test]
fn kernel_threads_size_the_pool_once() {
    // The pool is the process's: whatever made it first, its size is accepted again and
    // another size is refused rather than ignored.
    let threads = ThreadPool::global().threads();
    let same = EngineOptions {
        kernel_threads: Some(threads),
        ..EngineOptions::default()
    };
    assert!(load(&same).decodes_on_kernels(1));
    for bad in [threads + 1, 0] {
        let other = EngineOptions {
            kernel_threads: Some(bad),
            ..EngineOptions::default()
        };
        let dir = model_dir("hub-tied");
        match Gpt2::load_with(&dir, None, &[Device::Cpu], &other) {
            Err(Error::Input(msg)) => assert!(msg.contains("thread"), "{msg}"),
            Err(e) => panic!("{bad} threads: {e}"),
            Ok(_) => panic!("{bad} threads accepted with a pool of {threads}"),
        }
    }
}
