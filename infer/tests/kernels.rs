//! The decode kernels (`infer::kernels`) against libtorch's own matmul, on every kernel
//! path this CPU has (each forced in turn), for odd and GPT-2 shapes, rows 1..=8 (and a
//! few more, served in chunks), with and without bias.
//!
//! Reference: libtorch's `x.matmul(w) + b` in f64. For bf16 weights the reference uses
//! the same bf16-rounded weights upcast (bf16 → f32 → f64 is exact), so it measures the
//! kernels' arithmetic alone, not the rounding of W.
//!
//! Tolerance: |y − ref| ≤ 1e-5 · (Σᵢ |x_i·W_ij| + |b_j|), for both formats: fp32
//! accumulation of k terms errs by about √k·2⁻²⁴ of that magnitude (≈ 3e-6 at k = 3072
//! with random signs) and by at most k·2⁻²⁴ in the worst case.
use std::sync::Arc;

use infer::kernels::{Isa, PackedLinear, ThreadPool, WeightFormat};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn paths() -> Vec<Isa> {
    let paths: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.is_supported()).collect();
    #[cfg(target_arch = "x86_64")]
    {
        // Skipping a path this CPU has would make a pass prove less than it claims.
        if is_x86_feature_detected!("avx512f") {
            assert!(paths.contains(&Isa::Avx512));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert!(paths.contains(&Isa::Avx2));
        }
    }
    paths
}

/// Three threads on any machine, so that work splitting is exercised even on 2 cores.
fn pool() -> Arc<ThreadPool> {
    static POOL: std::sync::OnceLock<Arc<ThreadPool>> = std::sync::OnceLock::new();
    Arc::clone(POOL.get_or_init(|| Arc::new(ThreadPool::new(3))))
}

struct Case {
    x: Tensor,    // (rows_max, k) f32
    w: Tensor,    // (k, n) in the packed format
    bias: Tensor, // (n) f32
    w64: Tensor,  // w as the reference sees it
}

fn case(k: i64, n: i64, rows: i64, format: WeightFormat, seed: i64) -> Case {
    tch::manual_seed(seed);
    let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([k, n], (Kind::Float, Device::Cpu)) * 0.05;
    let bias = Tensor::randn([n], (Kind::Float, Device::Cpu));
    let w = match format {
        WeightFormat::F32 => w,
        WeightFormat::Bf16 => w.to_kind(Kind::BFloat16),
        // Int8 kernels are tested in quantized.rs (they pack from int8 rows and scales),
        // Int8Dynamic's at the end of this file.
        WeightFormat::Int8 | WeightFormat::Int8Dynamic => unreachable!("not a case here"),
    };
    let w64 = w.to_kind(Kind::Float).to_kind(Kind::Double);
    Case { x, w, bias, w64 }
}

/// Checks y (rows, n) against the f64 reference; returns the worst error / tolerance.
fn check(c: &Case, rows: i64, bias: bool, y: &[f32], what: &str) -> f64 {
    let x64 = c.x.narrow(0, 0, rows).to_kind(Kind::Double);
    let b64 = c.bias.to_kind(Kind::Double);
    let mut reference = x64.matmul(&c.w64);
    let mut scale = x64.abs().matmul(&c.w64.abs());
    if bias {
        reference += &b64;
        scale += b64.abs();
    }
    let n = c.w64.size()[1];
    let got = Tensor::from_slice(y).view([rows, n]).to_kind(Kind::Double);
    let ratio = (got - reference).abs() / (scale * TOL + 1e-30);
    let worst = ratio.max().double_value(&[]);
    assert!(worst <= 1.0, "{what}: error {worst:.3} x the tolerance");
    worst
}

fn pack(c: &Case, bias: bool, isa: Isa) -> PackedLinear {
    PackedLinear::from_tensor(&c.w, bias.then_some(&c.bias))
        .unwrap()
        .with_isa(isa)
        .unwrap()
        .with_pool(pool())
}

fn run_shape(k: i64, n: i64, rows: &[i64], paths: &[Isa]) {
    let max_rows = *rows.iter().max().unwrap();
    for format in [WeightFormat::F32, WeightFormat::Bf16] {
        let c = case(k, n, max_rows, format, k * 1000 + n);
        for bias in [false, true] {
            for &isa in paths {
                let lin = pack(&c, bias, isa);
                assert_eq!(lin.format(), format);
                for &r in rows {
                    let x =
                        Vec::<f32>::try_from(c.x.narrow(0, 0, r).contiguous().view([-1])).unwrap();
                    // NaN-filled so that an unwritten output cannot pass.
                    let mut y = vec![f32::NAN; (r * n) as usize];
                    lin.forward(&x, r as usize, &mut y);
                    let what = format!("{k}x{n} {format:?} {isa:?} rows {r} bias {bias}");
                    check(&c, r, bias, &y, &what);
                }
            }
        }
    }
}

const ALL_ROWS: [i64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

#[test]
fn odd_shapes_every_path() {
    let paths = paths();
    for (k, n) in [
        (1, 1),
        (1, 17),
        (7, 1),
        (7, 17),
        (17, 7),
        (2, 16),
        (16, 16),
        (17, 33),
        (33, 31),
        (63, 63),
        (64, 48),
        (129, 100),
        (255, 257),
    ] {
        run_shape(k, n, &ALL_ROWS, &paths);
    }
}

#[test]
fn gpt2_block_shapes_every_path() {
    let paths = paths();
    for (k, n) in [(768, 2304), (3072, 768), (768, 768)] {
        run_shape(k, n, &ALL_ROWS, &paths);
    }
}

#[test]
fn tied_head_best_path() {
    // 768 x 50257 (the tied head, transposed), on the detected path only: its size makes
    // it the slow test; the smaller shapes cover the other paths' code.
    run_shape(768, 50257, &[1, 8], &[Isa::detect()]);
}

#[test]
fn more_than_eight_rows_in_chunks() {
    run_shape(100, 70, &[9, 11, 16, 20], &paths());
}

#[test]
fn tensor_api_matches_slice_api() {
    for format in [WeightFormat::F32, WeightFormat::Bf16] {
        let c = case(96, 80, 6, format, 7);
        let lin = pack(&c, true, Isa::detect());
        // (2, 3, k): leading dimensions are flattened into rows and restored.
        let x = c.x.view([2, 3, 96]);
        let y = lin.forward_tensor(&x).unwrap();
        assert_eq!(y.size(), [2, 3, 80]);
        let y = Vec::<f32>::try_from(y.view([-1])).unwrap();
        check(&c, 6, true, &y, &format!("forward_tensor {format:?}"));
        // A non-contiguous input is accepted too.
        let xt = c.x.tr().contiguous().tr();
        assert!(!xt.is_contiguous());
        let yt = Vec::<f32>::try_from(lin.forward_tensor(&xt).unwrap().view([-1])).unwrap();
        assert_eq!(y, yt);
    }
}

#[test]
fn non_contiguous_weight_is_packed_as_its_values() {
    // The tied head is wte (V, E) used as wte.tr() (E, V).
    tch::manual_seed(3);
    let wte = Tensor::randn([50, 40], (Kind::Float, Device::Cpu));
    let lin = PackedLinear::from_tensor(&wte.tr(), None).unwrap();
    let x = Tensor::randn([2, 40], (Kind::Float, Device::Cpu));
    let y = lin.forward_tensor(&x).unwrap();
    let reference = x.matmul(&wte.tr());
    let diff = (y - reference).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn every_thread_count_gives_the_same_bits() {
    // Each column is summed by one thread in a fixed order, so the split cannot matter.
    let c = case(300, 1000, 8, WeightFormat::F32, 11);
    let x = Vec::<f32>::try_from(c.x.contiguous().view([-1])).unwrap();
    let mut first: Option<Vec<f32>> = None;
    for threads in [1, 2, 3, 5] {
        let lin = PackedLinear::from_tensor(&c.w, Some(&c.bias))
            .unwrap()
            .with_pool(Arc::new(ThreadPool::new(threads)));
        let mut y = vec![0.0; 8 * 1000];
        lin.forward(&x, 8, &mut y);
        match &first {
            None => first = Some(y),
            Some(f) => assert_eq!(f, &y, "{threads} threads"),
        }
    }
}

#[test]
fn concurrent_callers_share_a_pool() {
    // Two threads calling at once: the second runs its tasks itself, neither waits.
    let c = case(256, 512, 4, WeightFormat::Bf16, 5);
    let lin = pack(&c, true, Isa::detect());
    let x = Vec::<f32>::try_from(c.x.contiguous().view([-1])).unwrap();
    let mut want = vec![0.0; 4 * 512];
    lin.forward(&x, 4, &mut want);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..200 {
                    let mut y = vec![0.0; 4 * 512];
                    lin.forward(&x, 4, &mut y);
                    assert_eq!(y, want);
                }
            });
        }
    });
}

#[test]
fn degenerate_shapes() {
    // No inputs: y is the bias.
    let b = [1.0f32, 2.0, 3.0];
    let lin = PackedLinear::from_f32(&[], 0, 3, Some(&b)).unwrap();
    let mut y = [0.0; 6];
    lin.forward(&[], 2, &mut y);
    assert_eq!(y, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let yt = lin
        .forward_tensor(&Tensor::zeros([2, 0], (Kind::Float, Device::Cpu)))
        .unwrap();
    assert_eq!(Vec::<f32>::try_from(yt.view([-1])).unwrap(), y);
    // No outputs, no rows.
    let lin = PackedLinear::from_f32(&[], 4, 0, None).unwrap();
    lin.forward(&[0.0; 8], 2, &mut []);
    let lin = PackedLinear::from_f32(&[1.0; 8], 4, 2, None).unwrap();
    lin.forward(&[], 0, &mut []);
}

#[test]
fn bad_inputs_are_errors() {
    assert!(PackedLinear::from_f32(&[0.0; 5], 2, 3, None).is_err());
    assert!(PackedLinear::from_f32(&[0.0; 6], 2, 3, Some(&[0.0; 2])).is_err());
    let w = Tensor::zeros([4, 3], (Kind::Double, Device::Cpu));
    assert!(PackedLinear::from_tensor(&w, None).is_err());
    let w = Tensor::zeros([4, 3, 1], (Kind::Float, Device::Cpu));
    assert!(PackedLinear::from_tensor(&w, None).is_err());
    let lin = PackedLinear::from_tensor(&Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)), None)
        .unwrap();
    assert!(lin
        .forward_tensor(&Tensor::zeros([2, 5], (Kind::Float, Device::Cpu)))
        .is_err());
    assert!(lin
        .forward_tensor(&Tensor::zeros([2, 4], (Kind::Double, Device::Cpu)))
        .is_err());
}

#[test]
#[should_panic(expected = "x must be (rows, in_features)")]
fn wrong_x_length_panics() {
    let lin = PackedLinear::from_f32(&[0.0; 6], 2, 3, None).unwrap();
    lin.forward(&[0.0; 3], 2, &mut [0.0; 6]);
}

#[test]
fn packed_size_and_paths() {
    let lin = PackedLinear::from_f32(&vec![0.0; 768 * 2304], 768, 2304, None).unwrap();
    assert_eq!(lin.weight_bytes(), 768 * 2304 * 4);
    let bits = vec![0u16; 768 * 50257];
    let lin = PackedLinear::from_bf16_bits(&bits, 768, 50257, None).unwrap();
    // 50257 columns pad to 3142 panels of 16.
    assert_eq!(lin.weight_bytes(), 768 * 3142 * 16 * 2);
    assert_eq!(lin.isa(), Isa::detect());
    for isa in Isa::ALL {
        let mut lin = PackedLinear::from_f32(&[0.0; 4], 2, 2, None).unwrap();
        assert_eq!(lin.set_isa(isa).is_ok(), isa.is_supported());
    }
}

#[test]
fn pool_runs_each_task_once_and_survives_a_panic() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = ThreadPool::new(3);
    for n_tasks in [1, 2, 3, 7, 64] {
        let hits: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..100 {
            pool.run(n_tasks, &|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 100));
    }
    // A panicking task, on whichever thread ran it, reaches the caller only after the
    // other tasks finished; the pool stays usable.
    let finished = AtomicUsize::new(0);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.run(8, &|t| {
            if t == 5 {
                panic!("task 5");
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            finished.fetch_add(1, Ordering::Relaxed);
        })
    }));
    assert!(r.is_err());
    assert_eq!(finished.load(Ordering::Relaxed), 7);
    let count = AtomicUsize::new(0);
    pool.run(4, &|_| {
        count.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(count.load(Ordering::Relaxed), 4);
}

// ---- W8A8 (`WeightFormat::Int8Dynamic`) ----------------------------------------------
//
// Reference: the arithmetic of `quant::Int8Linear` (the int8-dynamic artifacts' decode
// path): each x row quantized on the host (`host_quantize`, that code's formula, checked
// against libtorch's `quant::quantize_per_token`), the int32 sums as libtorch's `_int_mm`
// gives them (checked against exact f64 sums), then `acc as f32 * s_r * scale + bias`
// (bias zero when absent, as there). The kernels must match it bit for bit, every path.

/// Per-row quantization as `quant::Int8Linear::forward_pooled` does it: (xq, s) per row.
fn host_quantize(x: &[f32], rows: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut xq = vec![0i8; rows * k];
    let mut sx = vec![0f32; rows];
    for r in 0..rows {
        let row = &x[r * k..(r + 1) * k];
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = (max / 127.0).max(1e-12);
        sx[r] = s;
        for (q, v) in xq[r * k..(r + 1) * k].iter_mut().zip(row) {
            *q = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
    (xq, sx)
}

struct QCase {
    k: usize,
    n: usize,
    q: Vec<i8>, // (n, k)
    qt: Tensor, // (n, k) Int8
    scale: Vec<f32>,
    bias: Vec<f32>,
}

fn qcase(k: usize, n: usize, seed: i64) -> QCase {
    tch::manual_seed(seed);
    let qt = Tensor::randint_low(-127, 128, [n as i64, k as i64], (Kind::Int8, Device::Cpu));
    let q = Vec::<i8>::try_from(qt.view([-1])).unwrap();
    let scale =
        Vec::<f32>::try_from(Tensor::rand([n as i64], (Kind::Float, Device::Cpu)) * 0.02 + 1e-3)
            .unwrap();
    let bias = Vec::<f32>::try_from(Tensor::randn([n as i64], (Kind::Float, Device::Cpu))).unwrap();
    QCase {
        k,
        n,
        q,
        qt,
        scale,
        bias,
    }
}

/// The reference y (rows, n) for x (rows, k).
fn qreference(c: &QCase, x: &[f32], rows: usize, bias: bool) -> Vec<f32> {
    let (xq, sx) = host_quantize(x, rows, c.k);
    let xqt = Tensor::from_slice(&xq).view([rows as i64, c.k as i64]);
    if c.k > 0 {
        // libtorch's own per-token quantization agrees with the host formula wherever
        // their scales coincide (max|x| ≥ 127e-12; below, both give xq = 0).
        let (tq, _) = infer::quant::quantize_per_token(
            &Tensor::from_slice(x).view([rows as i64, c.k as i64]),
        );
        assert_eq!(Vec::<i8>::try_from(tq.view([-1])).unwrap(), xq);
    }
    // The sums in f64 (exact: |Σ| < 2⁵³) and from `_int_mm`, which must agree, except
    // for k = 1: libtorch 2.11's CPU `_int_mm` returns garbage for k = 1, n > 1.
    let exact = xqt
        .to_kind(Kind::Double)
        .matmul(&c.qt.to_kind(Kind::Double).tr())
        .to_kind(Kind::Int);
    let acc = Vec::<i32>::try_from(exact.view([-1])).unwrap();
    if c.k >= 2 {
        let int_mm = Vec::<i32>::try_from(xqt.internal_int_mm(&c.qt.tr()).view([-1])).unwrap();
        assert_eq!(int_mm, acc, "_int_mm vs the exact sums, {}x{}", c.k, c.n);
    }
    let mut y = vec![0f32; rows * c.n];
    for r in 0..rows {
        for j in 0..c.n {
            let b = if bias { c.bias[j] } else { 0.0 };
            y[r * c.n + j] = acc[r * c.n + j] as f32 * sx[r] * c.scale[j] + b;
        }
    }
    y
}

fn qpack(c: &QCase, bias: bool, isa: Isa) -> PackedLinear {
    qpack_from(c, bias, isa, false)
}

/// `from_tensor`: packed from the (out, in) view of the weight stored (in, out), as an
/// artifact's Conv1D weight is read in place, rather than from (out, in) rows.
fn qpack_from(c: &QCase, bias: bool, isa: Isa, from_tensor: bool) -> PackedLinear {
    let bias = bias.then_some(c.bias.as_slice());
    let packed = match from_tensor {
        false => PackedLinear::from_int8_rows_dynamic(&c.q, &c.scale, c.k, c.n, bias),
        true => {
            let rows = Tensor::from_slice(&c.q).view([c.n as i64, c.k as i64]);
            let stored = rows.tr().contiguous(); // (in, out)
            PackedLinear::from_int8_tensor_dynamic(&stored.tr(), &c.scale, bias)
        }
    };
    packed.unwrap().with_isa(isa).unwrap().with_pool(pool())
}

/// The kernel paths Int8Dynamic runs on this CPU, each forced through `with_isa`: the
/// VNNI kernel must be among them where the CPU has it.
fn qpaths(c: &QCase) -> Vec<Isa> {
    let paths = paths();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni") {
        assert_eq!(qpack(c, false, Isa::Avx512).kernel_isa(), Isa::Avx512);
    }
    assert_eq!(qpack(c, false, Isa::Scalar).kernel_isa(), Isa::Scalar);
    paths
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: {g} vs {w}");
    }
}

fn run_qshape(k: usize, n: usize, rows: &[usize], x_of: impl Fn(usize) -> Vec<f32>) {
    let c = qcase(k, n, (k * 1000 + n) as i64);
    let paths = qpaths(&c);
    for &r in rows {
        let x = x_of(r);
        for bias in [false, true] {
            let want = qreference(&c, &x, r, bias);
            for (&isa, from_tensor) in paths.iter().flat_map(|i| [(i, false), (i, true)]) {
                let lin = qpack_from(&c, bias, isa, from_tensor);
                assert_eq!(lin.format(), WeightFormat::Int8Dynamic);
                let mut y = vec![f32::NAN; r * n];
                lin.forward(&x, r, &mut y);
                let what = format!(
                    "{k}x{n} Int8Dynamic {isa:?} (runs {:?}) rows {r} bias {bias} \
                     from (in, out) {from_tensor}",
                    lin.kernel_isa()
                );
                assert_bits(&y, &want, &what);
            }
        }
    }
}

fn randn_rows(k: usize, seed: i64) -> impl Fn(usize) -> Vec<f32> {
    move |r| {
        tch::manual_seed(seed + r as i64);
        // Rows of different magnitudes, so that each has its own scale.
        let mag = Tensor::logspace(-3, 3, r as i64, 10.0, (Kind::Float, Device::Cpu));
        let x = Tensor::randn([r as i64, k as i64], (Kind::Float, Device::Cpu)) * mag.unsqueeze(1);
        Vec::<f32>::try_from(x.view([-1])).unwrap()
    }
}

const Q_ROWS: [usize; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 11];

#[test]
fn int8_dynamic_odd_shapes_every_path_bit_exact() {
    for (k, n) in [
        (1, 1),
        (1, 17),
        (3, 5),
        (7, 1),
        (7, 17),
        (17, 7),
        (2, 16),
        (16, 16),
        (17, 33),
        (33, 31),
        (63, 63),
        (9, 100),
        (65, 130),
        (64, 48),
        (129, 100),
        (255, 257),
    ] {
        run_qshape(k, n, &Q_ROWS, randn_rows(k, 1));
    }
}

#[test]
fn int8_dynamic_gpt2_shapes_every_path_bit_exact() {
    for (k, n) in [(768, 2304), (3072, 768), (768, 3072)] {
        run_qshape(k, n, &Q_ROWS, randn_rows(k, 2));
    }
    // The tied head, one row (its size makes it the slow case).
    run_qshape(768, 50257, &[1], randn_rows(768, 3));
}

#[test]
fn int8_dynamic_zero_huge_tiny_and_tied_rows() {
    // Row 0 all zero (s = 1e-12), row 1 huge, row 2 below 127e-12 (s clamped to 1e-12,
    // xq = 0), row 3 with max 127 (s = 1) and halves that round to even, row 4 near
    // f32::MAX, row 5 one spike among zeros.
    let k = 37;
    let rows: Vec<Vec<f32>> = vec![
        vec![0.0; k],
        (0..k).map(|i| (i as f32 - 18.0) * 1e30).collect(),
        (0..k).map(|i| (i as f32 - 18.0) * 1e-21).collect(),
        (0..k)
            .map(|i| if i == 0 { 127.0 } else { i as f32 * 0.5 - 9.0 })
            .collect(),
        (0..k).map(|i| f32::MAX / (1.0 + i as f32)).collect(),
        (0..k).map(|i| if i == 30 { -3.0 } else { 0.0 }).collect(),
    ];
    let x: Vec<f32> = rows.concat();
    let r = rows.len();
    run_qshape(k, 70, &[r], |rr| {
        assert_eq!(rr, r);
        x.clone()
    });
}

#[test]
fn int8_dynamic_rounding_boundaries() {
    // Values next to the .5 boundaries of x/s, where dividing by s and multiplying by
    // 1/s round differently (random rows almost never hit one): the quantization must
    // divide, as quant.rs does. Each row: its max first (setting s), then such values.
    let k = 64;
    let mut x = Vec::new();
    let mut found = 0;
    for max in [1.0f32, 3.0, 0.7, 10.0, 0.013, 255.0, 1e-3, 42.0] {
        let s = (max / 127.0).max(1e-12);
        let mut row = vec![max];
        for j in 0..127 {
            let base = (j as f32 + 0.5) * s;
            for d in -8i32..=8 {
                let v = f32::from_bits((base.to_bits() as i32 + d) as u32);
                let differs = (v / s).round_ties_even() != (v * (1.0 / s)).round_ties_even();
                if differs && v < max && row.len() < k {
                    row.push(if row.len() % 2 == 0 { v } else { -v });
                }
            }
        }
        found += row.len() - 1;
        row.resize(k, 0.0);
        x.extend(row);
    }
    assert!(found >= 16, "only {found} boundary values");
    run_qshape(k, 40, &[8], |r| {
        assert_eq!(r, 8);
        x.clone()
    });
}

#[test]
fn int8_dynamic_tensor_api_threads_and_size() {
    let c = qcase(96, 80, 9);
    let lin = qpack(&c, true, Isa::detect());
    let x = randn_rows(96, 4)(6);
    let want = qreference(&c, &x, 6, true);
    let xt = Tensor::from_slice(&x).view([2, 3, 96]);
    let y = lin.forward_tensor(&xt).unwrap();
    assert_eq!(y.size(), [2, 3, 80]);
    assert_bits(
        &Vec::<f32>::try_from(y.view([-1])).unwrap(),
        &want,
        "forward_tensor",
    );
    // Each column is one thread's, summed in a fixed order: the split cannot matter.
    for threads in [1, 2, 5] {
        let lin = PackedLinear::from_int8_rows_dynamic(&c.q, &c.scale, 96, 80, Some(&c.bias))
            .unwrap()
            .with_pool(Arc::new(ThreadPool::new(threads)));
        let mut y = vec![f32::NAN; 6 * 80];
        lin.forward(&x, 6, &mut y);
        assert_bits(&y, &want, &format!("{threads} threads"));
    }
    // One byte per weight.
    let q = vec![1i8; 768 * 2304];
    let lin = PackedLinear::from_int8_rows_dynamic(&q, &[1.0; 2304], 768, 2304, None).unwrap();
    assert_eq!(lin.weight_bytes(), 768 * 2304);
    let q = vec![1i8; 768 * 50257];
    let lin =
        PackedLinear::from_int8_rows_dynamic(&q, &vec![1.0; 50257], 768, 50257, None).unwrap();
    assert_eq!(lin.weight_bytes(), 768 * 3142 * 16);
}

#[test]
fn int8_dynamic_degenerate_shapes_and_bad_inputs() {
    // No inputs: acc = 0, so y = 0·s·scale + b = b.
    let lin =
        PackedLinear::from_int8_rows_dynamic(&[], &[0.5, 2.0, 1.0], 0, 3, Some(&[1.0, -2.0, 3.0]))
            .unwrap();
    let mut y = [0.0; 6];
    lin.forward(&[], 2, &mut y);
    assert_eq!(y, [1.0, -2.0, 3.0, 1.0, -2.0, 3.0]);
    let lin = PackedLinear::from_int8_rows_dynamic(&[], &[], 4, 0, None).unwrap();
    lin.forward(&[0.0; 8], 2, &mut []);
    let lin = PackedLinear::from_int8_rows_dynamic(&[1; 8], &[1.0; 2], 4, 2, None).unwrap();
    lin.forward(&[], 0, &mut []);
    // Wrong lengths of weight, scale or bias; wrong input tensors.
    assert!(PackedLinear::from_int8_rows_dynamic(&[0; 5], &[1.0; 3], 2, 3, None).is_err());
    assert!(PackedLinear::from_int8_rows_dynamic(&[0; 6], &[1.0; 2], 2, 3, None).is_err());
    assert!(
        PackedLinear::from_int8_rows_dynamic(&[0; 6], &[1.0; 3], 2, 3, Some(&[0.0; 2])).is_err()
    );
    let lin = PackedLinear::from_int8_rows_dynamic(&[0; 12], &[1.0; 3], 4, 3, None).unwrap();
    assert!(lin
        .forward_tensor(&Tensor::zeros([2, 5], (Kind::Float, Device::Cpu)))
        .is_err());
    assert!(lin
        .forward_tensor(&Tensor::zeros([2, 4], (Kind::Double, Device::Cpu)))
        .is_err());
}

#[test]
#[should_panic(expected = "x must be (rows, in_features)")]
fn int8_dynamic_wrong_x_length_panics() {
    let lin = PackedLinear::from_int8_rows_dynamic(&[0; 6], &[1.0; 3], 2, 3, None).unwrap();
    lin.forward(&[0.0; 3], 2, &mut [0.0; 6]);
}
