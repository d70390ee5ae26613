//! Tensor parallelism, Megatron-LM style (Shoeybi et al. 2019, arXiv 1909.08053): each
//! block's attention is split by heads (`c_attn`'s q, k and v columns and the KV cache
//! with them, `attn.c_proj` by input rows) and its MLP by the inner dimension (`c_fc`
//! by columns, `mlp.c_proj` by rows). Each shard computes a partial output; one sum
//! over the shards (an all-reduce) per sublayer, then the bias once. Embeddings, layer
//! norms and the head stay whole on the first device. int8 artifacts split the same way
//! (`quant::Int8Layers`): rows of the int8 weight with their scales for a column split,
//! its input columns with the whole scale vector for a row split.
//!
//! The sum goes through `Communicator`, so a NCCL backend can replace the copy-based one
//! without touching the model. Shards run on the threads of a persistent pool: spawning
//! a thread per sublayer cost ~0.36 ms per call on CUDA (each new thread sets up its
//! device and library handles; measured on an H100), a persistent worker ~0.07 ms.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::ThreadPool;

/// Sums the shards' partial outputs onto one device.
pub trait Communicator: Send + Sync {
    fn all_reduce(&self, partials: Vec<Tensor>, to: Device) -> Tensor;

    /// The logits every process decides on. One process: its own. A model split across
    /// processes (`ProcessSplit`): rank 0's, so that every rank takes the same decoding
    /// decisions even where its own rounding of the unsplit parts would differ.
    fn agree(&self, logits: Tensor) -> Tensor {
        logits
    }

    /// Split across processes: (this rank, ranks). The head then runs vocab-parallel:
    /// each rank computes its slice of the vocabulary's logits, and `all_gather` gives
    /// every rank the same whole logits.
    fn vocab_shard(&self) -> Option<(usize, usize)> {
        None
    }

    /// Every rank's `t` (the same shape on each), stacked in rank order: (ranks, ...).
    fn all_gather(&self, t: Tensor) -> Tensor {
        t.unsqueeze(0)
    }
}

/// A model split across processes (tensor parallelism over a process group): this
/// process holds shard `rank` of `world`, on its one device, and `comm` sums the
/// shards' partial outputs over the processes. Every process runs the same calls in the
/// same order (each collective is matched by the others').
#[derive(Clone)]
pub struct ProcessSplit {
    pub rank: usize,
    pub world: usize,
    pub comm: Arc<dyn Communicator>,
}

/// The shards a process builds: `local` (global shard index, device) of `n` in all.
pub(crate) struct Shards {
    pub(crate) n: i64,
    pub(crate) local: Vec<(i64, Device)>,
}

impl Shards {
    /// Every shard here, shard r on `devices[r]`; or, split across processes, only this
    /// process's shard, on its one device.
    pub(crate) fn of(devices: &[Device], split: Option<&ProcessSplit>) -> Self {
        match split {
            Some(s) => Shards {
                n: s.world as i64,
                local: vec![(s.rank as i64, devices[0])],
            },
            None => Shards {
                n: devices.len() as i64,
                local: devices
                    .iter()
                    .enumerate()
                    .map(|(r, &d)| (r as i64, d))
                    .collect(),
            },
        }
    }
}

/// Copies every partial to the target device and adds them in rank order (so the
/// result does not depend on which shard finished first).
pub struct CopyCommunicator;

impl Communicator for CopyCommunicator {
    fn all_reduce(&self, partials: Vec<Tensor>, to: Device) -> Tensor {
        sum_in_order(partials, to)
    }
}

/// The tensors moved to `to` and added one after another, in the order given: the
/// shards' (and the processes') summation order, on which a split's exactness rests.
pub fn sum_in_order(parts: impl IntoIterator<Item = Tensor>, to: Device) -> Tensor {
    let mut it = parts.into_iter().map(|p| p.to_device(to));
    let first = it.next().expect("at least one part");
    it.fold(first, |acc, p| acc + p)
}

/// A reference that may cross into the shard threads.
struct Shared<'a, F: ?Sized>(&'a F);

// SAFETY: `per_shard` hands each thread the same closure, which only reads model
// weights (never written after loading) and writes its own rank's KV-cache slots; libtorch
// ops on tensors that no other thread writes are safe to run concurrently. tch marks
// `Tensor` Send but not Sync only because it cannot know that a tensor is not mutated.
unsafe impl<F: ?Sized> Sync for Shared<'_, F> {}
unsafe impl<F: ?Sized> Send for Shared<'_, F> {}

impl<T> Shared<'_, dyn Fn(usize) -> T + '_> {
    /// A method, so that closures capture the whole wrapper (not its field).
    fn call(&self, r: usize) -> T {
        (self.0)(r)
    }
}

/// `f(rank)` for every rank, on the threads of a persistent pool (the caller is one of
/// them) when there are several.
pub(crate) fn per_shard<T: Send>(n: usize, f: &dyn Fn(usize) -> T) -> Vec<T> {
    if n == 1 {
        return vec![f(0)];
    }
    let results: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let shared = Shared(f);
    let task = |r: usize| {
        let y = shared.call(r);
        *results[r].lock().unwrap_or_else(|p| p.into_inner()) = Some(y);
    };
    shard_pool(n).run(n, &task);
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every shard ran")
        })
        .collect()
}

/// One pool of `n` threads per shard count in use, kept for the process.
fn shard_pool(n: usize) -> Arc<ThreadPool> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    Arc::clone(
        pools
            .entry(n)
            .or_insert_with(|| Arc::new(ThreadPool::new(n))),
    )
}

/// Checks a tensor-parallel layout before any weight is read.
pub fn check_layout(n_head: i64, n_inner: i64, devices: &[Device]) -> Result<()> {
    check_split(n_head, n_inner, devices.len())
}

/// As `check_layout`, for `n` shards.
pub fn check_split(n_head: i64, n_inner: i64, n: usize) -> Result<()> {
    let n = n as i64;
    if n == 0 {
        return Err(Error::Input("--tp must be at least 1".into()));
    }
    if n_head % n != 0 {
        return Err(Error::Input(format!(
            "--tp {n}: the model's {n_head} attention heads cannot be split evenly over {n} shards"
        )));
    }
    if n_inner % n != 0 {
        return Err(Error::Input(format!(
            "--tp {n}: the MLP width n_inner {n_inner} cannot be split evenly over {n} shards"
        )));
    }
    Ok(())
}

/// How the Megatron split divides one linear layer among `n` shards.
pub(crate) enum Split<'a> {
    /// By output channels: `part(t, dim, rank)` is rank's part of `t` along `dim`, the
    /// dimension holding the output channels (`qkv_columns` for `attn.c_attn`, `slice`
    /// for `mlp.c_fc`). Each shard keeps its bias entries.
    Columns(&'a dyn Fn(&Tensor, i64, i64) -> Tensor),
    /// By input channels, evenly (`attn.c_proj`, `mlp.c_proj`): each shard's output is a
    /// partial sum, and the bias is added once after the shards' sum.
    Rows,
}

/// Rank r's part of a `c_attn` weight or bias along `dim`, which holds the 3E output
/// channels (1 for the Conv1D weight (E, 3E), 0 for the bias or for int8 rows (3E, E)):
/// heads [r·H/N, (r+1)·H/N) of each of q, k and v, concatenated in that order.
pub(crate) fn qkv_columns(t: &Tensor, dim: i64, rank: i64, n: i64) -> Tensor {
    let cols = t.size()[dim as usize] / 3;
    let part = cols / n;
    let pieces: Vec<Tensor> = (0..3)
        .map(|j| t.narrow(dim, j * cols + rank * part, part))
        .collect();
    Tensor::cat(&pieces, dim).contiguous()
}

/// Rank r's slice of `t` along `dim`, of size `size / n`: a tensor of its own (a
/// contiguous view would keep the whole tensor's storage alive, which in a process that
/// holds one shard is the memory the split was to save).
pub(crate) fn slice(t: &Tensor, dim: i64, rank: i64, n: i64) -> Tensor {
    let part = t.size()[dim as usize] / n;
    t.narrow(dim, rank * part, part).copy()
}

/// Rank r's share of the input-channel indices `idx` (k,) of a row-split layer with
/// `n_in` inputs: those inside its slice, renumbered from the slice's start.
pub(crate) fn local_indices(idx: &Tensor, n_in: i64, rank: i64, n: i64) -> Tensor {
    let part = n_in / n;
    let start = rank * part;
    let mine = idx.ge(start).logical_and(&idx.lt(start + part));
    idx.masked_select(&mine) - start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_split_indices_stay_with_their_rows_renumbered() {
        let idx = Tensor::from_slice(&[63i64, 1, 33, 16, 47]);
        let shard = |r| Vec::<i64>::try_from(local_indices(&idx, 64, r, 4)).unwrap();
        assert_eq!(shard(0), [1]);
        assert_eq!(shard(1), [0]);
        assert_eq!(shard(2), [1, 15]);
        assert_eq!(shard(3), [15]);
    }

    #[test]
    fn qkv_columns_take_the_same_heads_along_either_dimension() {
        let w = Tensor::arange(4 * 12, (tch::Kind::Int64, Device::Cpu)).view([4, 12]); // (E, 3E)
        for r in 0..2 {
            let cols = qkv_columns(&w, 1, r, 2); // (E, 3E/2)
            assert_eq!(cols, qkv_columns(&w.tr(), 0, r, 2).tr());
            // q, k and v each give their heads' 2 columns: [0..4), [4..8), [8..12) halves.
            let first_row = Vec::<i64>::try_from(cols.get(0)).unwrap();
            let want: Vec<i64> = [0, 4, 8]
                .iter()
                .flat_map(|q| [q + 2 * r, q + 2 * r + 1])
                .collect();
            assert_eq!(first_row, want);
        }
    }
}
