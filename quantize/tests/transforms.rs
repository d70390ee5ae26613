//! The quantize crate's transforms against invariants: SmoothQuant's folding leaves the
//! float function unchanged, int8 rounding stays within half a scale, pruning zeroes
//! what it says, layer lists are checked.
use std::collections::BTreeMap;

use quantize::int8::{fold_smoothing, quantize_per_channel, smooth_scales};
use quantize::{kept_layers, prune, Prune};
use tch::{Device, Kind, Tensor};

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

#[test]
fn smoothing_folded_into_the_layernorm_keeps_the_float_output() {
    tch::manual_seed(0);
    let (e, out) = (32, 48);
    let mut map = BTreeMap::new();
    map.insert("ln.weight".to_string(), randn(&[e]));
    map.insert("ln.bias".to_string(), randn(&[e]));
    map.insert("fc.weight".to_string(), randn(&[e, out]));
    let x = randn(&[7, e]) * 3.0;
    let f = |m: &BTreeMap<String, Tensor>| {
        let h = x.layer_norm([e], Some(&m["ln.weight"]), Some(&m["ln.bias"]), 1e-5, false);
        (h.mm(&m["fc.weight"]), h)
    };
    let (before, h) = f(&map);
    let x_max = h.abs().amax([0], false);
    let s = smooth_scales(&x_max, &map["fc.weight"], 0.5);
    fold_smoothing(&mut map, "ln", "fc.weight", &s);
    let (after, h2) = f(&map);
    // Exact in real arithmetic; f32 rounding of the division and product only.
    let d = (&after - &before).abs().max().double_value(&[]);
    assert!(d < 1e-4 * before.abs().max().double_value(&[]), "{d}");
    // And the smoothed activations' channel maxima are x_max / s.
    let m2 = h2.abs().amax([0], false);
    assert!((&m2 - &x_max / &s).abs().max().double_value(&[]) < 1e-4);
}

#[test]
fn per_channel_int8_is_within_half_a_scale() {
    tch::manual_seed(1);
    let w = randn(&[40, 24]);
    let _ = w.narrow(1, 5, 1).zero_(); // an all-zero channel gets scale 0
    for dim in [0i64, 1] {
        let (q, s) = quantize_per_channel(&w, dim);
        assert_eq!(q.kind(), Kind::Int8);
        assert!(q.abs().max().int64_value(&[]) <= 127);
        let back = q.to_kind(Kind::Float) * s.unsqueeze(dim);
        let err = (&w - back).abs();
        let bound = s.unsqueeze(dim) / 2.0 + w.abs() * 1e-6;
        assert!(
            err.le_tensor(&bound).all().int64_value(&[]) == 1,
            "dim {dim}"
        );
    }
}

#[test]
fn pruning_zeroes_the_smallest_weights() {
    tch::manual_seed(2);
    let w = randn(&[64, 32]);
    let mut ws = vec![
        ("a".to_string(), w.copy()),
        ("b".to_string(), randn(&[16, 8]) * 10.0),
    ];
    let p = Prune::new(Some(0.25), "layer", "unstructured")
        .unwrap()
        .unwrap();
    prune::prune(&mut ws, &p).unwrap();
    let zeros = ws[0].1.eq(0.0).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(zeros, 64 * 32 / 4);
    // Every kept weight is at least as large as every pruned one.
    let kept_min = w
        .abs()
        .masked_select(&ws[0].1.ne(0.0))
        .min()
        .double_value(&[]);
    let pruned_max = w
        .abs()
        .masked_select(&ws[0].1.eq(0.0))
        .max()
        .double_value(&[]);
    assert!(kept_min >= pruned_max);
    // Global scope: the large-valued tensor keeps more than the small one.
    let mut ws = vec![
        ("a".to_string(), w.copy()),
        ("b".to_string(), randn(&[16, 8]) * 10.0),
    ];
    let p = Prune::new(Some(0.5), "global", "unstructured")
        .unwrap()
        .unwrap();
    prune::prune(&mut ws, &p).unwrap();
    let frac = |t: &Tensor| {
        t.eq(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    assert!(frac(&ws[0].1) > frac(&ws[1].1));
    // 2:4 needs input rows in multiples of 4.
    let p = Prune::new(None, "layer", "2:4").unwrap().unwrap();
    let mut ws = vec![("odd".to_string(), randn(&[6, 4]))];
    assert!(prune::prune(&mut ws, &p).is_err());
    assert!(Prune::new(Some(1.0), "layer", "unstructured").is_err());
    assert!(Prune::new(Some(0.0), "layer", "unstructured")
        .unwrap()
        .is_none());
}

#[test]
fn layer_lists_are_checked() {
    assert_eq!(kept_layers(4, &[1, 3], &[]).unwrap(), vec![0, 2]);
    assert_eq!(kept_layers(4, &[], &[3, 0]).unwrap(), vec![0, 3]);
    assert!(kept_layers(4, &[4], &[]).is_err());
    assert!(kept_layers(4, &[0, 1, 2, 3], &[]).is_err());
    assert!(kept_layers(4, &[1, 1], &[]).is_err());
    assert!(kept_layers(4, &[1], &[2]).is_err());
}
