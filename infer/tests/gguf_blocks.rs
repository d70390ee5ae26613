//! ggml's block codecs against ggml itself and gguf-py (tests/reference/gguf_blocks.py).
//!
//! What is compared, for every supported type and input:
//! - our bytes == ggml's bytes from `ggml_quantize_chunk` (llama-cpp-python's libggml-base),
//!   with and without an importance vector;
//! - our bytes == gguf-py's `gguf.quants.quantize` bytes where gguf-py can quantize the type;
//! - our `dequantize` of our bytes == gguf-py's `dequantize` of them, and == ggml's
//!   `dequantize_row_*` of them.
//!
//! The tolerance is exact equality, bit for bit (NaN matching any NaN): a GGUF file we write
//! must be the file llama.cpp writes, and every step of these codecs is a deterministic
//! sequence of IEEE f32 operations (no fused multiply-add in ggml-base's build, no reduction
//! reordering without -ffast-math), so any difference is a bug in ours, not rounding noise.
//! A single flipped level changes a byte, which this catches where a tolerance would not.
use std::path::{Path, PathBuf};
use std::process::Command;

use infer::gguf::blocks::{dequantize, quantize};
use infer::gguf::GgmlType;
use serde_json::{json, Value};

const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// splitmix64 with Box–Muller: a fixed normal sequence, no dependency.
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn next(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

/// GPT-2-like weights: N(0, σ) rows, σ varying by row, with every 97th weight a 30σ outlier.
fn weights(rows: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut g = Normal(seed);
    (0..rows * n)
        .map(|i| {
            let sigma = 0.02 * (1.0 + (i / n) as f32 * 0.37);
            let v = g.next() * sigma;
            if i % 97 == 13 {
                v * 30.0
            } else {
                v
            }
        })
        .collect()
}

/// Rows of 512 built from 32-weight blocks that stress the searches: all zero, constant,
/// one non-zero, tiny (x² subnormal), huge (fp16 scale overflowing), integer grids whose
/// scaled values fall on rounding ties, a lone outlier, and plain normals between them.
fn special(seed: u64) -> Vec<f32> {
    let mut g = Normal(seed);
    let mut out = Vec::new();
    for k in 0..32 {
        let block: Vec<f32> = match k % 16 {
            0 => vec![0.0; 32],
            1 => vec![0.75; 32],
            2 => vec![-3.5; 32],
            3 => (0..32).map(|j| if j == 5 { -0.3 } else { 0.0 }).collect(),
            4 => (0..32).map(|_| g.next() * 1e-21).collect(),
            5 => (0..32).map(|_| g.next() * 1e-6).collect(),
            6 => (0..32).map(|_| g.next() * 3e4).collect(),
            7 => (0..32).map(|_| g.next() * 2e7).collect(),
            8 => (0..32).map(|j| (j as f32 - 16.0) * 0.25).collect(),
            9 => (0..32).map(|j| ((j % 9) as f32 - 4.0) / 8.0).collect(),
            10 => (0..32)
                .map(|j| if j == 31 { 50.0 } else { g.next() })
                .collect(),
            11 => (0..32).map(|_| g.next().abs() + 2.0).collect(),
            12 => (0..32).map(|_| -g.next().abs() - 2.0).collect(),
            _ => (0..32).map(|_| g.next()).collect(),
        };
        out.extend(block);
    }
    out
}

/// Values the float types must carry exactly as ggml does: ±0, ±inf, NaN, fp16's overflow
/// boundary, fp16 subnormals, round-to-even ties of fp16 and bf16.
fn float_edges() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e-7,
        6e-8,
        2.9e-8,
        1e-30,
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        f32::MAX,
        f32::MIN_POSITIVE,
        3.0e38,
    ];
    let mut g = Normal(99);
    while v.len() < 64 {
        v.push(g.next() * 1000.0);
    }
    v
}

fn has_impl(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

fn importance(n: usize, seed: u64) -> Vec<f32> {
    let mut g = Normal(seed);
    // imatrix entries are mean squared activations: positive, spread over decades, and
    // sometimes exactly zero (a column never seen)
    (0..n)
        .map(|i| {
            if i % 41 == 7 {
                0.0
            } else {
                (2.0 * g.next()).exp()
            }
        })
        .collect()
}

struct Case {
    name: String,
    ty: GgmlType,
    n_per_row: usize,
    x: Vec<f32>,
    imp: Option<Vec<f32>>,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add =
        |name: &str, ty: GgmlType, n_per_row: usize, x: Vec<f32>, imp: Option<Vec<f32>>| {
            let name = format!("{}-{name}", ty.name());
            cases.push(Case {
                name,
                ty,
                n_per_row,
                x,
                imp,
            });
        };
    for ty in TYPES {
        add("gpt2", ty, 768, weights(32, 768, 1), None);
        add("special", ty, 512, special(2), None);
        if ty.block_size() == 32 || ty.block_size() == 1 {
            // rows whose length is no multiple of 256: the K-quants' fallback types
            add("short-rows", ty, 96, weights(5, 96, 3), None);
        }
        if has_impl(ty) {
            add(
                "gpt2-imatrix",
                ty,
                768,
                weights(32, 768, 4),
                Some(importance(768, 5)),
            );
            add(
                "special-imatrix",
                ty,
                512,
                special(6),
                Some(importance(512, 7)),
            );
        } else {
            add("edges", ty, 64, float_edges(), None);
        }
    }
    cases
}

fn f32s(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn write_f32s(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Bit-for-bit equality, any NaN matching any NaN; the first difference is reported.
fn assert_same_floats(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        assert!(
            same,
            "{what}: weight {i}: ours {a:e} ({:#010x}), theirs {b:e} ({:#010x})",
            a.to_bits(),
            b.to_bits()
        );
    }
}

fn assert_same_bytes(ours: &[u8], theirs: &[u8], ty: GgmlType, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        let block = i / ty.type_size();
        let at = block * ty.type_size();
        panic!(
            "{what}: first difference at byte {i} (block {block}, byte {} of it)\n ours  {:02x?}\n theirs {:02x?}",
            i - at,
            &ours[at..at + ty.type_size()],
            &theirs[at..at + ty.type_size()]
        );
    }
}

fn python() -> PathBuf {
    std::env::var_os("GPT2KIT_PYTHON")
        .map(PathBuf::from)
        .expect("set GPT2KIT_PYTHON to the reference venv's python (with gguf and llama-cpp-python; `make test` does)")
}

/// An empty folder for one test's files: kept when a comparison fails, to look at; each test
/// removes it when all pass.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpt2kit-gguf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs tests/reference/gguf_blocks.py on `dir`; its results.json.
fn run_reference(dir: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/gguf_blocks.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap()
}

#[test]
fn codecs_match_ggml_and_gguf_py_bit_for_bit() {
    let dir = fresh_dir("blocks");
    let cases = cases();
    let mut manifest = Vec::new();
    let mut ours = Vec::new();
    for c in &cases {
        let bytes = quantize(c.ty, &c.x, c.n_per_row, c.imp.as_deref())
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        write_f32s(&dir.join(format!("{}.x.f32", c.name)), &c.x);
        if let Some(imp) = &c.imp {
            write_f32s(&dir.join(format!("{}.imp.f32", c.name)), imp);
        }
        std::fs::write(dir.join(format!("{}.ours.bin", c.name)), &bytes).unwrap();
        manifest.push(json!({
            "name": c.name, "type": c.ty as u32, "n_per_row": c.n_per_row,
            "nrows": c.x.len() / c.n_per_row, "importance": c.imp.is_some(),
        }));
        ours.push(bytes);
    }
    std::fs::write(
        dir.join("cases.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let results = run_reference(&dir);

    let mut ggufpy_quantizes = Vec::new();
    for (c, bytes) in cases.iter().zip(&ours) {
        let file = |suffix: &str| dir.join(format!("{}.{suffix}", c.name));
        let ggufpy = results["cases"][&c.name]["ggufpy_quantize"] == json!(true);
        if ggufpy {
            ggufpy_quantizes.push(c.ty);
        }
        for (suffix, whose, present) in [
            ("ggml.bin", "ggml_quantize_chunk", true),
            ("ggufpy.bin", "gguf-py quantize", ggufpy),
        ] {
            if present {
                let theirs = std::fs::read(file(suffix)).unwrap();
                let what = format!("{}: ours vs {whose}", c.name);
                assert_same_bytes(bytes, &theirs, c.ty, &what);
            }
        }
        let deq = dequantize(c.ty, bytes, c.x.len()).unwrap();
        assert_same_floats(
            &deq,
            &f32s(&file("deq_py.f32")),
            &format!("{}: dequantize vs gguf-py", c.name),
        );
        assert_same_floats(
            &deq,
            &f32s(&file("deq_ggml.f32")),
            &format!("{}: dequantize vs ggml", c.name),
        );
    }
    // gguf-py 0.19 quantizes F16, BF16 and the 32-weight types (TYPES[1..8]); if it
    // stopped, the second reference would be lost without a word.
    for ty in &TYPES[1..8] {
        assert!(
            ggufpy_quantizes.contains(ty),
            "gguf-py did not quantize {}",
            ty.name()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_an_error_naming_it() {
    let x = vec![0.5f32; 512];
    let err = |r: infer::Result<Vec<u8>>| r.unwrap_err().to_string();
    assert!(err(quantize(GgmlType::Q4_0, &x[..48], 48, None)).contains("blocks of 32"));
    assert!(err(quantize(GgmlType::Q4_K, &x, 32, None)).contains("blocks of 256"));
    assert!(err(quantize(GgmlType::Q8_0, &x[..96], 64, None)).contains("rows of 64"));
    assert!(err(quantize(GgmlType::Q8_0, &x, 0, None)).contains("rows of 0"));
    assert!(err(quantize(GgmlType::Q2_K, &x, 256, None)).contains("q2_K is not supported"));
    assert!(err(quantize(GgmlType::Q4_K, &x, 256, Some(&x[..255]))).contains("255 entries"));
    let mut nan = x.clone();
    nan[3] = f32::NAN;
    assert!(err(quantize(GgmlType::Q6_K, &nan, 256, None)).contains("NaN"));
    assert!(
        quantize(GgmlType::F16, &nan, 256, None).is_ok(),
        "f16 carries NaN as ggml does"
    );
    assert!(err(quantize(GgmlType::Q5_0, &x, 256, Some(&nan[..256]))).contains("importance"));

    let bytes = quantize(GgmlType::Q4_K, &x, 256, None).unwrap();
    let derr = |r: infer::Result<Vec<f32>>| r.unwrap_err().to_string();
    assert!(derr(dequantize(GgmlType::Q4_K, &bytes, 500)).contains("whole number"));
    assert!(derr(dequantize(GgmlType::Q4_K, &bytes[..200], 512)).contains("288 bytes, got 200"));
    assert!(derr(dequantize(GgmlType::Q8_K, &bytes, 256)).contains("not supported"));

    use infer::gguf::dot::{quantize_activations, vec_dot};
    let acts = quantize_activations(GgmlType::Q4_K, &x).unwrap();
    assert!(err(quantize_activations(GgmlType::Q4_K, &x[..100])).contains("blocks of 256"));
    assert!(err(quantize_activations(GgmlType::F16, &x)).contains("no quantized dot"));
    assert!(err(quantize_activations(GgmlType::Q8_0, &nan)).contains("NaN"));
    let dot_err = |r: infer::Result<f32>| r.unwrap_err().to_string();
    assert!(dot_err(vec_dot(GgmlType::Q4_K, 512, &bytes[..144], &acts)).contains("144 bytes"));
    assert!(dot_err(vec_dot(GgmlType::Q4_K, 512, &bytes, &acts[..10])).contains("activations"));
    assert!(vec_dot(GgmlType::Q4_K, 512, &bytes, &acts).is_ok());
}

// ---- dot products (infer::gguf::dot) ----
//
// What is compared, for each quantized type and row:
// - our activation bytes == ggml-cpu's `quantize_row_q8_0/q8_1/q8_K` bytes, exactly (the
//   same deterministic f32 steps);
// - the AVX2 path == the portable path, bit for bit (both compute exact integer block sums
//   and share one f32 step);
// - the portable result against Σ ŵ·â in f64 over our dequantized weights and the decoded
//   activations, and against ggml-cpu's own `ggml_vec_dot_*`, within `dot_tolerance`;
// - for Q4_K and Q6_K, which follow the lanes of ggml's AVX2 kernels, ggml's result bit for
//   bit where this CPU has AVX2 (llama-cpp-python is built for the machine it runs on).

/// The quantized types, which have dot products: Q8_0 to Q6_K.
const DOT_TYPES: &[GgmlType] = TYPES.split_at(3).1;

/// Activations like GPT-2's hidden states: N(0, 1) with every 191st channel 20× larger;
/// row kind 1 starts with 256 zeros; row kind 3 is a grid of k + ½ under a block maximum of
/// 127, so that scaling by 127/127 lands on rounding ties (ggml's x86 Q8_0/Q8_1 round them
/// to even, Q8_K's nearest_int too).
fn activations(n: usize, seed: u64, kind: usize) -> Vec<f32> {
    let mut g = Normal(seed);
    (0..n)
        .map(|i| match kind {
            1 if i < 256 => 0.0,
            3 if i % 32 == 0 => 127.0,
            3 => (i % 64) as f32 - 32.5,
            _ if i % 191 == 7 => 20.0 * g.next(),
            _ => g.next(),
        })
        .collect()
}

/// The activations' values: d·q per block of ggml's Q8_0 (34 bytes), Q8_1 (36) or Q8_K (292,
/// f32 d) layout.
fn decode_acts(act: GgmlType, bytes: &[u8]) -> Vec<f64> {
    use infer::gguf::blocks::half::f16_to_f32;
    let (offset, block) = match act {
        GgmlType::Q8_0 => (2, 32),
        GgmlType::Q8_1 => (4, 32),
        _ => (4, 256),
    };
    let mut out = Vec::new();
    for b in bytes.chunks_exact(act.type_size()) {
        let d = match act {
            GgmlType::Q8_K => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            _ => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        };
        out.extend(
            b[offset..offset + block]
                .iter()
                .map(|&q| f64::from(d) * f64::from(q as i8)),
        );
    }
    out
}

/// Σ ŵ·â in f64, and the tolerance a kernel must meet that sums the same exact integer block
/// sums in f32: the standard bound for summing nb terms in f32, (nb + 4)·2⁻²⁴ (nb additions
/// and at most four roundings within a term: the integer's conversion, two scale products,
/// the min term), times the terms' magnitudes before the scale and min parts cancel,
/// Σ (|ŵ| + 2·max|ŵ| of its 32-block)·|â|; plus, for Q4_1/Q5_1, the fp16 rounding of Q8_1's
/// s = d·Σq (2⁻¹¹ of |m·d·Σq| per block), which the kernels use in place of the exact sum.
fn dot_reference(ty: GgmlType, n: usize, w: &[u8], acts: &[u8]) -> (f64, f64) {
    let act = infer::gguf::dot::vec_dot_type(ty).unwrap();
    let wd = dequantize(ty, w, n).unwrap();
    let ad = decode_acts(act, acts);
    let mut value = 0f64;
    let mut mass = 0f64;
    for (wb, ab) in wd.chunks_exact(32).zip(ad.chunks_exact(32)) {
        let max = wb.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
        for (&w, &a) in wb.iter().zip(ab) {
            value += f64::from(w) * a;
            mass += (f64::from(w).abs() + 2.0 * max) * a.abs();
        }
    }
    let mut s_term = 0f64;
    if act == GgmlType::Q8_1 {
        use infer::gguf::blocks::half::f16_to_f32;
        for (wb, a) in w.chunks_exact(ty.type_size()).zip(ad.chunks_exact(32)) {
            let m = f16_to_f32(u16::from_le_bytes([wb[2], wb[3]]));
            s_term += f64::from(m).abs() * a.iter().sum::<f64>().abs() * 2f64.powi(-11);
        }
    }
    let nb = (n / ty.block_size()) as f64;
    (value, (nb + 4.0) * 2f64.powi(-24) * mass + s_term)
}

struct DotCase {
    name: String,
    ty: GgmlType,
    n: usize,
    w: Vec<u8>,
    x: Vec<f32>,
}

fn dot_cases() -> Vec<DotCase> {
    let mut cases = Vec::new();
    for &ty in DOT_TYPES {
        for (r, n) in [768, 3072, 768, 512].into_iter().enumerate() {
            let wx = if n == 512 {
                // the stress blocks, less those whose fp16 scale or min overflows to inf
                let tame = |v: f32| if v.abs() > 1e4 { v * 1e-3 } else { v };
                special(8)[..512].iter().map(|&v| tame(v)).collect()
            } else {
                weights(1, n, 10 + r as u64)
            };
            let imp = (r == 2).then(|| importance(n, 11));
            let w = quantize(ty, &wx, n, imp.as_deref()).unwrap();
            let x = activations(n, 20 + r as u64, r);
            let name = format!("dot-{}-{r}", ty.name());
            cases.push(DotCase { name, ty, n, w, x });
        }
        // Activations too small for 127/max in f32 (block maxima ~1e-38): ggml writes
        // -128 levels (Q8_0, Q8_1) or 0 (Q8_K) under a zero scale.
        let n = 768;
        let w = quantize(ty, &weights(1, n, 12), n, None).unwrap();
        let x = activations(n, 24, 0).iter().map(|v| v * 1e-38).collect();
        let name = format!("dot-{}-tiny", ty.name());
        cases.push(DotCase { name, ty, n, w, x });
    }
    cases
}

#[test]
fn dot_products_match_ggml_and_the_f64_dot() {
    use infer::gguf::dot::{quantize_activations, vec_dot_on, DotPath};
    let dir = fresh_dir("dot");
    let cases = dot_cases();
    let mut manifest = Vec::new();
    for c in &cases {
        std::fs::write(dir.join(format!("{}.w.bin", c.name)), &c.w).unwrap();
        write_f32s(&dir.join(format!("{}.a.f32", c.name)), &c.x);
        manifest.push(json!({"name": c.name, "type": c.ty as u32, "n": c.n}));
    }
    std::fs::write(
        dir.join("dots.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    run_reference(&dir);
    assert!(
        DotPath::Avx2.is_supported() || !cfg!(target_arch = "x86_64"),
        "this x86_64 CPU lacks AVX2: the AVX2 path goes untested"
    );
    for c in &cases {
        let file = |suffix: &str| dir.join(format!("{}.{suffix}", c.name));
        let acts = quantize_activations(c.ty, &c.x).unwrap();
        let act_ty = infer::gguf::dot::vec_dot_type(c.ty).unwrap();
        let theirs = std::fs::read(file("acts_ggml.bin")).unwrap();
        assert_same_bytes(
            &acts,
            &theirs,
            act_ty,
            &format!("{}: activations vs ggml", c.name),
        );
        let ours = vec_dot_on(DotPath::Scalar, c.ty, c.n, &c.w, &acts).unwrap();
        if DotPath::Avx2.is_supported() {
            let avx2 = vec_dot_on(DotPath::Avx2, c.ty, c.n, &c.w, &acts).unwrap();
            assert_eq!(
                ours.to_bits(),
                avx2.to_bits(),
                "{}: scalar {ours} vs AVX2 {avx2}",
                c.name
            );
        }
        let (reference, tol) = dot_reference(c.ty, c.n, &c.w, &acts);
        let ggml = f32s(&file("dot_ggml.f32"))[0];
        if matches!(c.ty, GgmlType::Q4_K | GgmlType::Q6_K) && DotPath::Avx2.is_supported() {
            assert_eq!(
                ours.to_bits(),
                ggml.to_bits(),
                "{}: ours {ours} vs ggml_vec_dot {ggml} (ggml's AVX2 order)",
                c.name
            );
        }
        let ggml = f64::from(ggml);
        for (whose, theirs) in [("the f64 dot", reference), ("ggml_vec_dot", ggml)] {
            let err = (f64::from(ours) - theirs).abs();
            assert!(
                err <= tol,
                "{}: ours {ours} vs {whose} {theirs}: |Δ| {err:e} > {tol:e}",
                c.name
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
