//! Benchmark of the decode kernels (`infer::kernels`) against libtorch on the shapes of
//! GPT-2 124M's linear layers, batch (rows) 1 and 8, fp32, bf16 and int8 weights (int8
//! with float activations, and W8A8: `int8dynamic`, whose libtorch figure is the
//! artifacts' own path, per-token quantization + `_int_mm` + rescale; plain int8 has no
//! libtorch counterpart here).
//!
//! Decoding is bound by how fast weights stream from memory, so the yardstick is this
//! machine's own read bandwidth, measured first (summing a 1 GiB buffer with the same
//! thread count), and each call is reported as GB/s of weight bytes read and % of that.
//! Every measurement cycles through enough distinct copies of the weights (≥ 256 MiB,
//! several times the last-level cache) that none is served from cache, as in a real
//! decode step. Other jobs may share the machine, so ours and libtorch's measurements
//! alternate in rounds and every figure is a median.
//!
//! GGUF's block formats (`infer::gguf::matmul`: Q8_0, Q4_0, Q4_K, Q6_K weights, the
//! activations quantized per call) have rows of their own, without a libtorch figure;
//! their GB/s counts the blocks' bytes (scales included).
//!
//! `cargo run --release -p infer --example kernel_bench [-- --quick] [--threads N] [--ggml]`.
//! Threads: N, else every core, for the kernels and libtorch alike. `--ggml`: the
//! bandwidth probe and the block formats' rows only.
use std::sync::Arc;
use std::time::{Duration, Instant};

use infer::gguf::matmul::BlockLinear;
use infer::gguf::{blocks, GgmlType};
use infer::kernels::{Isa, PackedLinear, ThreadPool, WeightFormat};
use tch::{Device, Kind, Tensor};

const MIN_SET_BYTES: usize = 256 << 20;
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Sums a slice in 16 independent lanes: vectorizes, and stays far from compute-bound.
fn sum_plain(c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for b in c.chunks_exact(16) {
        for (a, v) in acc.iter_mut().zip(b) {
            *a += v;
        }
    }
    acc.iter().sum()
}

/// As `sum_plain`, prefetching 2 KiB ahead as the kernels do (the hardware prefetcher
/// alone stalls at every 4 KiB page): the best a plain read of memory gets here.
fn sum_prefetch(c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for (j, b) in c.chunks_exact(16).enumerate() {
        #[cfg(target_arch = "x86_64")]
        #[allow(unused_unsafe)]
        // SAFETY: a prefetch is a hint: it never faults, whatever the address, and
        // `wrapping_add` keeps the arithmetic defined past the end of `c`.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(c.as_ptr().wrapping_add(j * 16 + 512) as *const i8);
        }
        for (a, v) in acc.iter_mut().zip(b) {
            *a += v;
        }
    }
    acc.iter().sum()
}

/// GB/s of reading a 1 GiB buffer on `threads` threads with `sum`; median of `reps`.
fn read_bandwidth(buf: &[f32], threads: usize, reps: usize, sum: fn(&[f32]) -> f32) -> f64 {
    let mut times = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let chunk = buf.len().div_ceil(threads);
        let total: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || sum(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(total);
    }
    (buf.len() * 4) as f64 / median(times) / 1e9
}

/// Seconds per call of `f(i)`, i = 0, 1, … (callers pick copy i % copies): at least
/// `min_calls` calls and `min_time`, after one warm-up call per copy.
fn sample_calls(
    copies: usize,
    min_calls: usize,
    min_time: Duration,
    mut f: impl FnMut(usize),
) -> Vec<f64> {
    for i in 0..copies {
        f(i);
    }
    let mut times = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while times.len() < min_calls || (start.elapsed() < min_time && times.len() < 5000) {
        let t0 = Instant::now();
        f(i % copies);
        times.push(t0.elapsed().as_secs_f64());
        i += 1;
    }
    times
}

fn kind_of(f: WeightFormat) -> Kind {
    match f {
        WeightFormat::F32 => Kind::Float,
        WeightFormat::Bf16 => Kind::BFloat16,
        WeightFormat::Int8 | WeightFormat::Int8Dynamic => Kind::Int8,
    }
}

fn elem_bytes(f: WeightFormat) -> usize {
    match f {
        WeightFormat::F32 => 4,
        WeightFormat::Bf16 => 2,
        WeightFormat::Int8 | WeightFormat::Int8Dynamic => 1,
    }
}

/// One layer's weight as libtorch and as the kernels hold it. Int8 formats: `torch_w`
/// is q (out, in) and `torch_scale` the per-column scale.
struct Layer {
    torch_w: Tensor,
    torch_b: Option<Tensor>,
    torch_scale: Option<Tensor>,
    ours: PackedLinear,
}

fn layer(
    k: i64,
    n: i64,
    bias: bool,
    format: WeightFormat,
    isa: Isa,
    pool: &Arc<ThreadPool>,
) -> Layer {
    if kind_of(format) == Kind::Int8 {
        let q = Tensor::randint_low(-127, 128, [n, k], (Kind::Int8, Device::Cpu));
        let scale = Tensor::rand([n], (Kind::Float, Device::Cpu)) * 1e-3;
        let b = bias.then(|| Tensor::randn([n], (Kind::Float, Device::Cpu)));
        let qv = Vec::<i8>::try_from(q.view([-1])).unwrap();
        let sv = Vec::<f32>::try_from(&scale).unwrap();
        let bv = b.as_ref().map(|b| Vec::<f32>::try_from(b).unwrap());
        let (k, n) = (k as usize, n as usize);
        let ours = match format {
            WeightFormat::Int8 => PackedLinear::from_int8_rows(&qv, &sv, k, n, bv.as_deref()),
            _ => PackedLinear::from_int8_rows_dynamic(&qv, &sv, k, n, bv.as_deref()),
        };
        return Layer {
            torch_w: q,
            torch_b: b,
            torch_scale: Some(scale),
            ours: ours
                .unwrap()
                .with_isa(isa)
                .unwrap()
                .with_pool(Arc::clone(pool)),
        };
    }
    let kind = kind_of(format);
    let w = (Tensor::randn([k, n], (Kind::Float, Device::Cpu)) * 0.02).to_kind(kind);
    let b = bias.then(|| Tensor::randn([n], (Kind::Float, Device::Cpu)).to_kind(kind));
    let ours = PackedLinear::from_tensor(&w, b.as_ref())
        .unwrap()
        .with_isa(isa)
        .unwrap()
        .with_pool(Arc::clone(pool));
    Layer {
        torch_w: w,
        torch_b: b,
        torch_scale: None,
        ours,
    }
}

/// x as libtorch's matmul for `format` takes it: in the weight's kind, Float for int8.
fn torch_input(x: &Tensor, format: WeightFormat) -> Tensor {
    match kind_of(format) {
        Kind::Int8 => x.shallow_clone(),
        kind => x.to_kind(kind),
    }
}

/// libtorch as the model calls it (`Linear::forward`): addmm with a bias, else mm; for
/// int8, `quant::Int8Linear`'s libtorch path (x is Float then).
fn torch_forward(l: &Layer, x: &Tensor) -> Tensor {
    if let Some(scale) = &l.torch_scale {
        let (xq, sx) = infer::quant::quantize_per_token(x);
        let y = xq.internal_int_mm(&l.torch_w.tr()).to_kind(Kind::Float) * sx * scale;
        return match &l.torch_b {
            Some(b) => y + b,
            None => y,
        };
    }
    match &l.torch_b {
        Some(b) => b.addmm(x, &l.torch_w),
        None => x.mm(&l.torch_w),
    }
}

struct Timing {
    ours_s: f64,
    torch_s: f64,
    bytes: f64,
}

struct Opts {
    quick: bool,
    pool: Arc<ThreadPool>,
}

/// Median time per call of one shape, ours and (unless `with_torch` is false) libtorch's.
fn bench_shape(
    k: i64,
    n: i64,
    format: WeightFormat,
    isa: Isa,
    rows: &[i64],
    with_torch: bool,
    o: &Opts,
) -> Vec<Timing> {
    let bytes = (k * n) as usize * elem_bytes(format);
    let copies = MIN_SET_BYTES.div_ceil(bytes);
    let bias = n != 50257; // the head has none
    let layers: Vec<Layer> = (0..copies)
        .map(|_| layer(k, n, bias, format, isa, &o.pool))
        .collect();
    let (calls, time) = if o.quick {
        (5, Duration::from_millis(40))
    } else {
        (15, Duration::from_millis(150))
    };
    rows.iter()
        .map(|&r| {
            let x = Tensor::randn([r, k], (Kind::Float, Device::Cpu));
            let xs = Vec::<f32>::try_from(x.view([-1])).unwrap();
            let xt = torch_input(&x, format);
            let mut y = vec![0.0f32; (r * n) as usize];
            let (mut ours, mut torch) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                ours.extend(sample_calls(copies, calls, time, |i| {
                    layers[i].ours.forward(&xs, r as usize, &mut y)
                }));
                if with_torch {
                    torch.extend(sample_calls(copies, calls, time, |i| {
                        let _ = std::hint::black_box(torch_forward(&layers[i], &xt));
                    }));
                }
            }
            let torch_s = if with_torch { median(torch) } else { f64::NAN };
            Timing {
                ours_s: median(ours),
                torch_s,
                bytes: bytes as f64,
            }
        })
        .collect()
}

/// Median time per call of a (k in, n out) weight in a ggml block type, for each row
/// count; the weight's values are random, quantized once and copied.
fn bench_blocks(k: usize, n: usize, ty: GgmlType, rows: &[usize], o: &Opts) -> Vec<Timing> {
    let w: Vec<f32> =
        Vec::<f32>::try_from(Tensor::randn([(k * n) as i64], (Kind::Float, Device::Cpu))).unwrap();
    let bytes = blocks::quantize(ty, &w, k, None).unwrap();
    let size = bytes.len();
    let copies = MIN_SET_BYTES.div_ceil(size);
    let layers: Vec<BlockLinear> = (0..copies)
        .map(|_| {
            BlockLinear::new(ty, k, n, bytes.clone(), None)
                .unwrap()
                .unwrap()
        })
        .collect();
    let (calls, time) = if o.quick {
        (5, Duration::from_millis(40))
    } else {
        (15, Duration::from_millis(150))
    };
    rows.iter()
        .map(|&r| {
            let x =
                Vec::<f32>::try_from(Tensor::randn([(r * k) as i64], (Kind::Float, Device::Cpu)))
                    .unwrap();
            let mut y = vec![0.0f32; r * n];
            let mut ours = Vec::new();
            for _ in 0..ROUNDS {
                ours.extend(sample_calls(copies, calls, time, |i| {
                    layers[i].forward_rows(&x, r, &mut y)
                }));
            }
            Timing {
                ours_s: median(ours),
                torch_s: f64::NAN,
                bytes: size as f64,
            }
        })
        .collect()
}

/// All of GPT-2 124M's linear layers for one decode step, distinct weights per layer.
/// The 48 block linears of gpt2-124M, plus the head when `head` (a decode step; a
/// prompt's pass runs the head on its last row only), for each row count.
fn bench_model(format: WeightFormat, rows: &[i64], head: bool, o: &Opts) -> Vec<Timing> {
    let mut layers = Vec::new();
    for _ in 0..12 {
        for (k, n) in [(768, 2304), (768, 768), (768, 3072), (3072, 768)] {
            layers.push(layer(k, n, true, format, Isa::detect(), &o.pool));
        }
    }
    if head {
        layers.push(layer(768, 50257, false, format, Isa::detect(), &o.pool));
    }
    let bytes: usize = layers
        .iter()
        .map(|l| l.torch_w.numel() * l.torch_w.kind().elt_size_in_bytes())
        .sum();
    let (calls, time) = if o.quick {
        (3, Duration::from_millis(100))
    } else {
        (5, Duration::from_millis(600))
    };
    rows.iter()
        .map(|&r| {
            let x768 = Tensor::randn([r, 768], (Kind::Float, Device::Cpu));
            let x3072 = Tensor::randn([r, 3072], (Kind::Float, Device::Cpu));
            let s768 = Vec::<f32>::try_from(x768.view([-1])).unwrap();
            let s3072 = Vec::<f32>::try_from(x3072.view([-1])).unwrap();
            let (t768, t3072) = (torch_input(&x768, format), torch_input(&x3072, format));
            let mut outs: Vec<Vec<f32>> = layers
                .iter()
                .map(|l| vec![0.0; r as usize * l.ours.out_features()])
                .collect();
            let (mut ours, mut torch) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                ours.extend(sample_calls(1, calls, time, |_| {
                    for (l, y) in layers.iter().zip(outs.iter_mut()) {
                        let x = if l.ours.in_features() == 768 {
                            &s768
                        } else {
                            &s3072
                        };
                        l.ours.forward(x, r as usize, y);
                    }
                }));
                torch.extend(sample_calls(1, calls, time, |_| {
                    for l in &layers {
                        let x = if l.ours.in_features() == 768 {
                            &t768
                        } else {
                            &t3072
                        };
                        let _ = std::hint::black_box(torch_forward(l, x));
                    }
                }));
            }
            Timing {
                ours_s: median(ours),
                torch_s: median(torch),
                bytes: bytes as f64,
            }
        })
        .collect()
}

/// Fixed cost of one parallel call: the pool with its workers awake (back-to-back
/// calls) and asleep (first call after an idle pause), against spawning threads per
/// call with `std::thread::scope`.
fn dispatch_overhead(pool: &ThreadPool) {
    let threads = pool.threads();
    let noop = |t: usize| {
        std::hint::black_box(t);
    };
    let awake = median(sample_calls(1, 5000, Duration::from_millis(100), |_| {
        pool.run(threads, &noop)
    }));
    let mut asleep = Vec::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(2)); // past DEFAULT_SPIN: workers sleep
        let t0 = Instant::now();
        pool.run(threads, &noop);
        asleep.push(t0.elapsed().as_secs_f64());
    }
    let spawn = median(sample_calls(1, 500, Duration::from_millis(100), |_| {
        std::thread::scope(|s| {
            for t in 1..threads {
                s.spawn(move || noop(t));
            }
            noop(0);
        })
    }));
    println!(
        "fixed cost of one call on {threads} threads: pool {:.2} µs with workers awake, {:.1} µs \
         after an idle pause (the caller does not wait for sleeping workers); \
         thread::scope spawn {:.1} µs",
        awake * 1e6,
        median(asleep) * 1e6,
        spawn * 1e6
    );
}

/// The path a layer of `format` forced to `isa` really runs (Int8Dynamic falls back to
/// the scalar kernel without VNNI).
fn runs_on(format: WeightFormat, isa: Isa, o: &Opts) -> Isa {
    layer(8, 16, false, format, isa, &o.pool).ours.kernel_isa()
}

fn print_header(first: &str) {
    println!(
        "{:<15} {:<11} {:>4} | {:>9} {:>6} {:>5} | {:>9} {:>6} {:>5} | {:>7}",
        first, "W", "rows", "ours µs", "GB/s", "%bw", "torch µs", "GB/s", "%bw", "speedup"
    );
}

fn print_line(name: &str, f: WeightFormat, rows: i64, t: &Timing, bw: f64) {
    let (g1, g2) = (t.bytes / t.ours_s / 1e9, t.bytes / t.torch_s / 1e9);
    let torch = if t.torch_s.is_nan() {
        format!("{:>9} {:>6} {:>5} | {:>7}", "-", "-", "-", "-")
    } else {
        format!(
            "{:>9.1} {:>6.1} {:>4.0}% | {:>6.2}x",
            t.torch_s * 1e6,
            g2,
            100.0 * g2 / bw,
            t.torch_s / t.ours_s
        )
    };
    println!(
        "{:<15} {:<11} {:>4} | {:>9.1} {:>6.1} {:>4.0}% | {}",
        name,
        format!("{f:?}").to_lowercase(),
        rows,
        t.ours_s * 1e6,
        g1,
        100.0 * g1 / bw,
        torch
    );
}

type Section = (&'static str, Vec<(String, WeightFormat, i64, Timing)>);

/// The float and int8 sections: each GPT-2 shape, a decode step, a prompt, each path.
fn float_sections(
    o: &Opts,
    supported: &[Isa],
    sections: &mut Vec<Section>,
    probe: &mut dyn FnMut(),
) {
    let mut lines = Vec::new();
    for (k, n) in [
        (768, 2304),
        (768, 768),
        (768, 3072),
        (3072, 768),
        (768, 50257),
    ] {
        for format in [
            WeightFormat::F32,
            WeightFormat::Bf16,
            WeightFormat::Int8,
            WeightFormat::Int8Dynamic,
        ] {
            let with_torch = format != WeightFormat::Int8;
            let ts = bench_shape(k, n, format, Isa::detect(), &[1, 8], with_torch, o);
            for (rows, t) in [1, 8].into_iter().zip(ts) {
                lines.push((format!("{k}x{n}"), format, rows, t));
            }
        }
        probe();
    }
    sections.push(("shape (in,out)", std::mem::take(&mut lines)));
    for format in [
        WeightFormat::F32,
        WeightFormat::Bf16,
        WeightFormat::Int8Dynamic,
    ] {
        let ts = bench_model(format, &[1, 8], true, o);
        for (rows, t) in [1, 8].into_iter().zip(ts) {
            lines.push(("gpt2-124M step".to_string(), format, rows, t));
        }
        probe();
    }
    sections.push(("gpt2 step", std::mem::take(&mut lines)));
    // Prompts: more rows than one pass serves, in passes of 8 rows; where libtorch's
    // GEMM overtakes them sets `linear::kernel_max_rows`.
    let prompt_rows = [11, 64, 128, 256];
    for format in [WeightFormat::F32, WeightFormat::Bf16] {
        let ts = bench_model(format, &prompt_rows, false, o);
        for (rows, t) in prompt_rows.into_iter().zip(ts) {
            lines.push(("gpt2-124M blocks".to_string(), format, rows, t));
        }
        probe();
    }
    sections.push(("gpt2 prompt", std::mem::take(&mut lines)));
    for &isa in supported {
        for format in [
            WeightFormat::F32,
            WeightFormat::Bf16,
            WeightFormat::Int8Dynamic,
        ] {
            let ts = bench_shape(768, 2304, format, isa, &[1, 8], false, o);
            let name = format!("{:?}", runs_on(format, isa, o));
            for (rows, t) in [1, 8].into_iter().zip(ts) {
                lines.push((name.clone(), format, rows, t));
            }
        }
    }
    sections.push(("path, 768x2304", lines));
    probe();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let ggml_only = args.iter().any(|a| a == "--ggml");
    let threads = args.iter().position(|a| a == "--threads").map(|i| {
        match args.get(i + 1).and_then(|n| n.parse().ok()) {
            Some(n) if n > 0 => n,
            _ => panic!("--threads takes a positive number"),
        }
    });
    let o = Opts {
        quick,
        pool: ThreadPool::global_with(threads),
    };
    let threads = o.pool.threads();
    tch::set_num_threads(threads as i32);
    let supported: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.is_supported()).collect();
    println!(
        "kernel path: {:?} (supported: {supported:?}); {threads} threads",
        Isa::detect()
    );

    // Bandwidth is probed between the sections too: other jobs come and go, and the
    // best of the probes (the least disturbed) is the yardstick, so %bw errs low.
    let buf: Vec<f32> = (0..(1usize << 28)).map(|i| (i % 7) as f32).collect();
    let reps = if quick { 3 } else { 5 };
    let mut probes: Vec<(f64, f64)> = Vec::new();
    let probe = |probes: &mut Vec<(f64, f64)>| {
        probes.push((
            read_bandwidth(&buf, threads, reps, sum_plain),
            read_bandwidth(&buf, threads, reps, sum_prefetch),
        ))
    };
    probe(&mut probes);
    let mut sections: Vec<Section> = Vec::new();
    if !ggml_only {
        dispatch_overhead(&o.pool);
        float_sections(&o, &supported, &mut sections, &mut || probe(&mut probes));
    }
    let mut block_lines = Vec::new();
    for (k, n) in [(768, 2304), (3072, 768), (768, 50257)] {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let ts = bench_blocks(k, n, ty, &[1, 8], &o);
            for (rows, t) in [1, 8].into_iter().zip(ts) {
                block_lines.push((format!("{k}x{n}"), ty, rows, t));
            }
        }
        probe(&mut probes);
    }

    let fmt = |v: &mut dyn Iterator<Item = f64>| {
        v.map(|b| format!("{b:.1}")).collect::<Vec<_>>().join(" ")
    };
    let bw = probes.iter().map(|p| p.0.max(p.1)).fold(0.0, f64::max);
    println!(
        "read bandwidth, {threads} threads summing 1 GiB, GB/s, {} probes through the run: \
         plain [{}], with software prefetch [{}]; %bw below is of the best, {bw:.1} GB/s",
        probes.len(),
        fmt(&mut probes.iter().map(|p| p.0)),
        fmt(&mut probes.iter().map(|p| p.1)),
    );
    for (header, lines) in &sections {
        let header = *header;
        println!();
        print_header(header);
        for (name, format, rows, t) in lines {
            print_line(name, *format, *rows, t, bw);
        }
        if header == "gpt2 step" {
            println!(
                "(gpt2-124M step: its 49 linear layers for one decode step, 12 x [768x2304, \
                 768x768, 768x3072, 3072x768] + 768x50257; µs per step)"
            );
        }
        if header == "gpt2 prompt" {
            println!(
                "(gpt2-124M blocks: the 48 block linears over a prompt of `rows` tokens, as a \
                 prompt's pass runs them; GB/s counts the weight bytes once)"
            );
        }
    }
    println!();
    print_header("ggml blocks");
    for (name, ty, rows, t) in &block_lines {
        let g = t.bytes / t.ours_s / 1e9;
        println!(
            "{:<15} {:<11} {:>4} | {:>9.1} {:>6.1} {:>4.0}% |",
            name,
            ty.name().to_lowercase(),
            rows,
            t.ours_s * 1e6,
            g,
            100.0 * g / bw
        );
    }
}
