//! Tensor parallelism on the CPU: the Megatron split over 2, 3 and 4 shards (where the
//! heads divide) gives the unsplit model's logits within 1e-5 (only the summation order
//! of the row-split projections changes), and identical greedy and beam tokens.
mod common;

use common::*;
use infer::generate::{generate, GenerationConfig};
use infer::Gpt2;
use tch::{Device, Kind, Tensor};

fn logits(model: &Gpt2, ids: &[Vec<i64>]) -> Tensor {
    // A left-padded batch, so masks and positions cross the shards too.
    let t = ids.iter().map(Vec::len).max().unwrap();
    let mut flat = Vec::new();
    let mut mask = Vec::new();
    for row in ids {
        flat.extend(std::iter::repeat_n(0, t - row.len()).chain(row.iter().copied()));
        mask.extend(
            std::iter::repeat_n(0i64, t - row.len()).chain(std::iter::repeat_n(1, row.len())),
        );
    }
    let (b, t) = (ids.len() as i64, t as i64);
    let mut cache = model.new_cache(b, t + 1);
    cache.set_attention_mask(&Tensor::from_slice(&mask).view([b, t]));
    let full = model.forward(&Tensor::from_slice(&flat).view([b, t]), &mut cache);
    let next = model.forward(
        &Tensor::from_slice(&vec![1i64; b as usize]).view([b, 1]),
        &mut cache,
    );
    Tensor::cat(&[full, next], 1).masked_fill(
        &Tensor::cat(
            &[
                Tensor::from_slice(&mask).view([b, t]),
                Tensor::ones([b, 1], (Kind::Int64, Device::Cpu)),
            ],
            1,
        )
        .eq(0)
        .unsqueeze(-1),
        0.0,
    )
}

#[test]
fn split_models_match_the_unsplit_one() {
    tch::no_grad(|| {
        // (model, heads): hub-tied 4, prefixed-untied 2, sharded-f16 3.
        for (name, sizes) in [
            ("hub-tied", vec![2, 4]),
            ("prefixed-untied", vec![2]),
            ("sharded-f16", vec![3]),
        ] {
            let dir = model_dir(name);
            let one = Gpt2::load(&dir, Some(Kind::Float), Device::Cpu).unwrap();
            let ids = expected(name).ids;
            let want = logits(&one, &ids);
            let greedy = GenerationConfig {
                max_new_tokens: 10,
                ..GenerationConfig::default()
            };
            let beam = GenerationConfig {
                max_new_tokens: 8,
                num_beams: 3,
                num_return_sequences: 2,
                ..GenerationConfig::default()
            };
            let want_greedy = generate(&one, &ids, &greedy, &|_| false, |_, _| {})
                .unwrap()
                .sequences;
            let want_beam = generate(&one, &ids, &beam, &|_| false, |_, _| {})
                .unwrap()
                .sequences;
            for n in sizes {
                let split =
                    Gpt2::load_sharded(&dir, Some(Kind::Float), &vec![Device::Cpu; n]).unwrap();
                assert_eq!(split.devices().len(), n);
                let d = max_abs_diff(&logits(&split, &ids), &want);
                assert!(d <= 1e-5, "{name} tp {n}: max |Δlogit| {d:e}");
                let g = generate(&split, &ids, &greedy, &|_| false, |_, _| {})
                    .unwrap()
                    .sequences;
                let b = generate(&split, &ids, &beam, &|_| false, |_, _| {})
                    .unwrap()
                    .sequences;
                let tokens = |s: &Vec<Vec<infer::generate::Generated>>| -> Vec<Vec<i64>> {
                    s.iter().flatten().map(|g| g.tokens.clone()).collect()
                };
                assert_eq!(tokens(&g), tokens(&want_greedy), "{name} tp {n} greedy");
                assert_eq!(tokens(&b), tokens(&want_beam), "{name} tp {n} beams");
            }
        }
    })
}

#[test]
fn layouts_that_do_not_divide_are_refused_before_loading() {
    // hub-tied has 4 heads: 3 shards cannot split them. The folder's weights are never
    // read: the same error comes back with the weights file removed.
    let dir = copy_model("hub-tied", "tp-layout");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = Gpt2::load_sharded(&dir, None, &[Device::Cpu; 3])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("--tp 3") && e.contains("4 attention heads"),
        "{e}"
    );
    let e = Gpt2::load_sharded(&dir, None, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--tp"), "{e}");
}
