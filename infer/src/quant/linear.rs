//! The W8A8 linear layer of int8-dynamic artifacts: per-token activation quantization
//! at run time and libtorch's int8 GEMM (`_int_mm`), decode steps split across the
//! kernels' thread pool.
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::{quantize_per_token, quantize_row, QuantRows};
use crate::error::{Error, Result};
use crate::kernels::{PackedLinear, ThreadPool, MAX_ROWS, STEP_MAX_ROWS};

/// Below this many weight bytes per task, splitting across the pool costs more than it
/// gains (each task is one `_int_mm` call, with its own fixed cost).
const MIN_TASK_BYTES: i64 = 256 << 10;
/// Tasks per pool thread, so a thread the OS delays leaves its share to the others.
const TASKS_PER_THREAD: i64 = 2;

/// A W8A8 linear layer: int8 weights per output channel, activations quantized per
/// token at run time, int32 accumulation on `_int_mm`.
pub struct Int8Linear {
    pub w: QuantRows,
    pub bias: Option<Tensor>,
    /// Input channels that skip activation quantization, and their weight rows in f32
    /// ((k,), (k, out)); those rows are zero in the int8 weight.
    pub outliers: Option<(Tensor, Tensor)>,
    /// For decode steps on the CPU: scales and bias as host values, and the output
    /// channel ranges the pool's tasks take.
    host: Option<HostSide>,
    /// The weights repacked for the W8A8 decode kernel (`pack`, made by
    /// `Gpt2::pack_for_cpu_decode`): decode steps then run there, bit-identical to the
    /// `_int_mm` path, without libtorch.
    pub(crate) packed: Option<PackedLinear>,
}

struct HostSide {
    scale: Vec<f32>,
    bias: Vec<f32>,
    chunks: Vec<(i64, i64)>,
    pool: Arc<ThreadPool>,
}

/// Tensors only read by the pool's tasks, and the output they write disjoint parts of.
struct Shared<'a> {
    xq: &'a Tensor,
    q: &'a Tensor,
    y: *mut f32,
}
// SAFETY: the tasks only read `xq` and `q` (never written while a call runs; libtorch
// reads of the same tensor from several threads are safe), and each writes the columns
// of its own chunk of `y`, which outlives `ThreadPool::run` (it returns after every task).
unsafe impl Sync for Shared<'_> {}

impl Shared<'_> {
    /// The whole struct, so that closures capture it (and its Sync) rather than fields.
    fn get(&self) -> &Self {
        self
    }
}

impl Int8Linear {
    pub fn new(w: QuantRows, bias: Option<Tensor>, outliers: Option<Tensor>) -> Self {
        let outliers = outliers.filter(|i| i.numel() > 0).map(|idx| {
            let rows = w
                .dequantize(Kind::Float)
                .index_select(1, &idx)
                .tr()
                .contiguous(); // (k, out)
            (idx, rows)
        });
        let w = match &outliers {
            Some((idx, _)) => QuantRows {
                q: w.q.index_fill(1, idx, 0),
                scale: w.scale,
            },
            None => w,
        };
        let host = (w.q.device() == Device::Cpu && outliers.is_none()).then(|| {
            let (n_out, n_in) = (w.q.size()[0], w.q.size()[1]);
            let pool = ThreadPool::global();
            let by_size = (n_out * n_in / MIN_TASK_BYTES).max(1);
            let n = (pool.threads() as i64 * TASKS_PER_THREAD)
                .min(by_size)
                .min(n_out.max(1));
            let step = (n_out + n - 1) / n.max(1);
            let chunks = (0..n_out)
                .step_by(step.max(1) as usize)
                .map(|c0| (c0, step.min(n_out - c0)))
                .collect();
            // Any tensor converts to f32 and flattens to one dimension: infallible.
            let host = |t: &Tensor| {
                Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1])).expect("f32, 1-D")
            };
            HostSide {
                scale: host(&w.scale),
                bias: bias.as_ref().map_or(vec![0.0; n_out as usize], host),
                chunks,
                pool,
            }
        });
        Self {
            w,
            bias,
            outliers,
            host,
            packed: None,
        }
    }

    /// Packs the weights for the W8A8 decode kernel, where decode steps can run pooled
    /// (a CPU layer without outlier columns); a no-op elsewhere or when already packed.
    pub(crate) fn pack(&mut self) -> Result<()> {
        let Some(host) = &self.host else {
            return Ok(());
        };
        if self.packed.is_some() {
            return Ok(());
        }
        // read in place: the (out, in) view of a stored (in, out) weight is not copied
        let packed =
            PackedLinear::from_int8_tensor_dynamic(&self.w.q, &host.scale, Some(&host.bias))?;
        self.packed = Some(packed.with_pool(host.pool.clone()));
        Ok(())
    }

    /// Whether `pack` would pack this layer: on the CPU, without outlier columns, and
    /// not packed yet.
    pub(crate) fn packs(&self) -> bool {
        self.host.is_some() && self.packed.is_none()
    }

    /// Packs it from panels made elsewhere (a packed file): `make(scale, bias)`, with the
    /// scales and bias (zero without one) that `pack` would pack with.
    pub(crate) fn pack_from(
        &mut self,
        make: impl FnOnce(&[f32], &[f32]) -> Result<PackedLinear>,
    ) -> Result<()> {
        let Some(host) = &self.host else {
            return Err(Error::Input(
                "an int8 layer with outlier columns (or off the CPU) has no packed panels".into(),
            ));
        };
        self.packed = Some(make(&host.scale, &host.bias)?.with_pool(host.pool.clone()));
        Ok(())
    }

    /// Whether a call with `rows` input rows takes the pooled decode path.
    pub fn decodes_on_pool(&self, rows: usize) -> bool {
        // The packed kernels take a whole decode step's rows (the head of a 16-stream
        // batch had gone to libtorch's `_int_mm`, whose fresh (rows, vocab) outputs
        // cost page faults every step); the integer sums and the rescale are the same
        // on every path, so the row count never changes a row's values.
        self.host.is_some()
            && (rows <= MAX_ROWS || (self.packed.is_some() && rows <= STEP_MAX_ROWS))
    }

    /// A decode step: activations quantized on the host, the int8 GEMM split by output
    /// channels across the decode kernels' pool (libtorch held to one thread there), the
    /// rescale and bias written straight into the output. None: not this path.
    fn forward_pooled(&self, x2: &Tensor, rows: usize) -> Option<Tensor> {
        let host = self.host.as_ref()?;
        let (n_out, n_in) = (self.w.q.size()[0] as usize, self.w.q.size()[1] as usize);
        let xs = Vec::<f32>::try_from(x2.to_kind(Kind::Float).contiguous().reshape([-1]))
            .expect("f32, 1-D");
        let mut xq = vec![0i8; rows * n_in];
        let mut sx = vec![0f32; rows];
        for (r, s) in sx.iter_mut().enumerate() {
            let span = r * n_in..(r + 1) * n_in;
            *s = quantize_row(&xs[span.clone()], &mut xq[span]);
        }
        let xq = Tensor::from_slice(&xq).view([rows as i64, n_in as i64]);
        let mut y = vec![0f32; rows * n_out];
        let shared = Shared {
            xq: &xq,
            q: &self.w.q,
            y: y.as_mut_ptr(),
        };
        let task = |t: usize| {
            let shared = shared.get();
            one_libtorch_thread();
            let (c0, len) = host.chunks[t];
            let w = shared.q.narrow(0, c0, len); // (len, in), contiguous rows
            let acc = shared.xq.internal_int_mm(&w.tr()); // (rows, len) int32
                                                          // _int_mm gives int32 (rows, len): infallible, exactly rows·len values.
            let acc = Vec::<i32>::try_from(acc.reshape([-1])).expect("int32, 1-D");
            let (c0, len) = (c0 as usize, len as usize);
            for (r, &s_r) in sx.iter().enumerate() {
                for j in 0..len {
                    let c = c0 + j;
                    let v = acc[r * len + j] as f32 * s_r * host.scale[c] + host.bias[c];
                    // SAFETY: r < rows, c < n_out: inside y; column c belongs to this chunk only.
                    unsafe { *shared.y.add(r * n_out + c) = v };
                }
            }
        };
        host.pool.run(host.chunks.len(), &task);
        Some(Tensor::from_slice(&y).view([rows as i64, n_out as i64]))
    }

    /// x (…, in) → (…, out), in x's kind.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let n_in = *shape.last().expect("input has a feature dimension");
        *shape.last_mut().unwrap() = self.w.q.size()[0];
        let kind = x.kind();
        let mut x2 = x.reshape([-1, n_in]).to_kind(Kind::Float); // (M, in)
        let rows = x2.size()[0] as usize;
        if self.decodes_on_pool(rows) && !x.requires_grad() {
            if let Some(y) = self
                .packed
                .as_ref()
                .and_then(|p| p.forward_tensor(&x2).ok())
            {
                return y.to_kind(kind).reshape(shape);
            }
            if rows <= MAX_ROWS {
                if let Some(y) = self.forward_pooled(&x2, rows) {
                    return y.to_kind(kind).reshape(shape);
                }
            }
        }
        let mut extra = None;
        if let Some((idx, rows)) = &self.outliers {
            extra = Some(x2.index_select(1, idx).mm(rows)); // (M, out)
            x2 = x2.index_fill(1, idx, 0.0);
        }
        let (xq, sx) = quantize_per_token(&x2);
        let acc = xq.internal_int_mm(&self.w.q.tr()); // (M, out) int32
        let mut y = acc.to_kind(Kind::Float) * sx * &self.w.scale;
        if let Some(e) = extra {
            y += e;
        }
        if let Some(b) = &self.bias {
            y += b.to_kind(Kind::Float);
        }
        y.to_kind(kind).reshape(shape)
    }
}

/// Pool threads run libtorch ops single-threaded (once per thread): the pool is the
/// parallelism, and a nested team would wait on cores the pool already holds.
fn one_libtorch_thread() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    DONE.with(|d| {
        if !d.get() {
            d.set(true);
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("gpt2kit-kernel"))
            {
                tch::set_num_threads(1);
            }
        }
    });
}
