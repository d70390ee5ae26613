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
        // Int8 kernels are tested in quantized.rs (they pack from int8 rows and scales).
        WeightFormat::Int8 => unreachable!("not a case of this file"),
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
