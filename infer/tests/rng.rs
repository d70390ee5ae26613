//! Per-sequence generators against libtorch's global one, on the CPU: a `SeqRng` seeded
//! with `s` draws what `manual_seed(s)` and the same draws give (what transformers'
//! sampling does), sequences do not disturb each other, and the global stream is left
//! alone. A binary of its own: tests elsewhere draw from the global generator unlocked.
use infer::rng::{self, RngLock, SeqRng};
use tch::{Device, Kind, Tensor};

const DRAWS: usize = 40;

/// A fixed (1, 1000) probability row, spread enough that draws vary.
fn probs(_lock: &RngLock) -> Tensor {
    tch::manual_seed(20240601);
    (Tensor::randn([1, 1000], (Kind::Float, Device::Cpu)) * 2.0).softmax(-1, Kind::Float)
}

fn draw(probs: &Tensor) -> i64 {
    probs.multinomial(1, false).int64_value(&[0, 0])
}

/// `manual_seed(seed)` then `n` draws on the global generator.
fn global_draws(_lock: &RngLock, probs: &Tensor, seed: u64, n: usize) -> Vec<i64> {
    tch::manual_seed(seed as i64);
    (0..n).map(|_| draw(probs)).collect()
}

/// `n` draws, one `with` each, as the engine draws a row per step.
fn seq_draws(lock: &RngLock, rng: &mut SeqRng, probs: &Tensor, n: usize) -> Vec<i64> {
    (0..n)
        .map(|_| rng.with(lock, || draw(probs)).unwrap())
        .collect()
}

fn distinct(ids: &[i64]) -> usize {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

#[test]
fn seeded_draws_what_manual_seed_draws() {
    let lock = rng::lock();
    let probs = probs(&lock);
    for seed in [0, 1, 42, u32::MAX as u64 + 7] {
        let expected = global_draws(&lock, &probs, seed, DRAWS);
        assert!(distinct(&expected) > DRAWS / 2, "{expected:?}");

        let mut one_call = SeqRng::seeded(seed, Device::Cpu).unwrap();
        let ids = one_call
            .with(&lock, || {
                (0..DRAWS).map(|_| draw(&probs)).collect::<Vec<_>>()
            })
            .unwrap();
        assert_eq!(ids, expected, "seed {seed}, one `with`");

        let mut per_draw = SeqRng::seeded(seed, Device::Cpu).unwrap();
        let ids = seq_draws(&lock, &mut per_draw, &probs, DRAWS);
        assert_eq!(ids, expected, "seed {seed}, a `with` per draw");
    }
    assert_ne!(
        global_draws(&lock, &probs, 42, DRAWS),
        global_draws(&lock, &probs, 43, DRAWS)
    );
}

#[test]
fn cached_normal_samples_travel_with_the_state() {
    // A short randn draws normals in pairs and keeps one for the next call: the saved
    // state must carry it, or each `with` after the first would start a pair afresh.
    let lock = rng::lock();
    let randn = || Vec::<f32>::try_from(Tensor::randn([3], (Kind::Float, Device::Cpu))).unwrap();
    tch::manual_seed(5);
    let expected: Vec<Vec<f32>> = (0..6).map(|_| randn()).collect();
    let mut seq = SeqRng::seeded(5, Device::Cpu).unwrap();
    let got: Vec<Vec<f32>> = (0..6).map(|_| seq.with(&lock, randn).unwrap()).collect();
    assert_eq!(got, expected);
}

#[test]
fn interleaved_sequences_draw_as_if_alone() {
    let lock = rng::lock();
    let probs = probs(&lock);
    let seed = 1234;
    let alone_a = global_draws(&lock, &probs, seed, DRAWS);
    let alone_b = global_draws(&lock, &probs, seed + 1, DRAWS);
    assert_ne!(alone_a, alone_b);

    let mut a = SeqRng::seeded(seed, Device::Cpu).unwrap();
    let mut b = SeqRng::seeded(seed + 1, Device::Cpu).unwrap();
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for _ in 0..DRAWS {
        got_a.push(a.with(&lock, || draw(&probs)).unwrap());
        got_b.push(b.with(&lock, || draw(&probs)).unwrap());
    }
    assert_eq!(got_a, alone_a);
    assert_eq!(got_b, alone_b);
}

#[test]
fn draws_inside_with_leave_the_global_stream_alone() {
    let lock = rng::lock();
    let probs = probs(&lock);
    let uninterrupted = global_draws(&lock, &probs, 99, 2 * DRAWS);

    tch::manual_seed(99);
    let mut seq = SeqRng::seeded(7, Device::Cpu).unwrap();
    let mut got = Vec::new();
    for _ in 0..DRAWS {
        got.push(draw(&probs));
        seq.with(&lock, || {
            draw(&probs);
            draw(&probs)
        })
        .unwrap();
        got.push(draw(&probs));
    }
    assert_eq!(got, uninterrupted);
}

#[test]
fn a_state_survives_other_threads_drawing() {
    let lock = rng::lock();
    let probs = probs(&lock);
    let expected = global_draws(&lock, &probs, 3, 2 * DRAWS);

    let mut seq = SeqRng::seeded(3, Device::Cpu).unwrap();
    let mut got = seq_draws(&lock, &mut seq, &probs, DRAWS);
    // Unlocked draws elsewhere, between this sequence's steps, as an unseeded run makes.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| Tensor::rand([4096], (Kind::Float, Device::Cpu)));
        }
    });
    got.extend(seq_draws(&lock, &mut seq, &probs, DRAWS));
    assert_eq!(got, expected);
}

#[test]
fn a_panic_inside_with_restores_the_global_generator() {
    let lock = rng::lock();
    let probs = probs(&lock);
    let uninterrupted = global_draws(&lock, &probs, 11, 2);
    tch::manual_seed(11);
    let first = draw(&probs);
    let mut seq = SeqRng::seeded(12, Device::Cpu).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        seq.with(&lock, || {
            draw(&probs);
            panic!("boom")
        })
    }));
    assert!(caught.is_err());
    assert_eq!(vec![first, draw(&probs)], uninterrupted);
}

#[test]
fn devices_without_a_generator_are_errors_not_aborts() {
    // libtorch throws for a CUDA device that is not there; the shim turns that into an
    // error rather than letting the C++ exception reach Rust.
    let missing = Device::Cuda(99);
    let err = SeqRng::seeded(0, missing).unwrap_err().to_string();
    assert!(err.starts_with("libtorch: "), "{err}");
    let err = SeqRng::seeded(0, Device::Vulkan).unwrap_err().to_string();
    assert!(err.contains("CPU and CUDA only"), "{err}");
}
