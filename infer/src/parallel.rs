//! Tensor parallelism, Megatron-LM style (Shoeybi et al. 2019, arXiv 1909.08053): each
//! block's attention is split by heads (`c_attn`'s q, k and v columns and the KV cache
//! with them, `attn.c_proj` by input rows) and its MLP by the inner dimension (`c_fc`
//! by columns, `mlp.c_proj` by rows). Each shard computes a partial output; one sum
//! over the shards (an all-reduce) per sublayer, then the bias once. Embeddings, layer
//! norms and the head stay whole on the first device.
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
}

/// Copies every partial to the target device and adds them in rank order (so the
/// result does not depend on which shard finished first).
pub struct CopyCommunicator;

impl Communicator for CopyCommunicator {
    fn all_reduce(&self, partials: Vec<Tensor>, to: Device) -> Tensor {
        let mut it = partials.into_iter().map(|p| p.to_device(to));
        let first = it.next().expect("at least one shard");
        it.fold(first, |acc, p| acc + p)
    }
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
    let n = devices.len() as i64;
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

/// Rank r's part of a `c_attn` weight (E, 3E) or bias (3E): heads [r·H/N, (r+1)·H/N) of
/// each of q, k and v, concatenated in that order along the last dimension.
pub(crate) fn qkv_columns(t: &Tensor, rank: i64, n: i64) -> Tensor {
    let cols = *t.size().last().unwrap() / 3;
    let part = cols / n;
    let dim = t.dim() as i64 - 1;
    let pieces: Vec<Tensor> = (0..3)
        .map(|j| t.narrow(dim, j * cols + rank * part, part))
        .collect();
    Tensor::cat(&pieces, dim).contiguous()
}

/// Rank r's slice of `t` along `dim`, of size `size / n`.
pub(crate) fn slice(t: &Tensor, dim: i64, rank: i64, n: i64) -> Tensor {
    let part = t.size()[dim as usize] / n;
    t.narrow(dim, rank * part, part).contiguous()
}
