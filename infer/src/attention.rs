//! Scaled dot-product attention with the backend chosen for decoding.
//!
//! On CUDA in f16/bf16, libtorch 2.11 dispatches `scaled_dot_product_attention` to
//! cuDNN's attention, which builds an execution graph for every new key length: measured
//! on an H100, 50–64 ms the first time a length is seen (so on every decode step, as
//! the cache grows) against 0.02–0.04 ms for the memory-efficient and flash kernels.
//! That made bf16 decoding 14× slower than fp32 there. tch does not expose
//! `torch.backends.cuda.enable_cudnn_sdp`, so half-precision attention on CUDA calls the
//! memory-efficient kernel directly when no gradient is wanted; training (fixed shapes,
//! and a backward that needs the kernel's log-sum-exp) and everything else take
//! libtorch's own choice.
use tch::{Kind, Tensor};

use crate::cache::{KvCache, Span};

/// softmax(q·kᵀ·scale + mask)·v for q (B, H, T, D) and k, v (B, H, S, D). `mask`
/// (B, 1, T, S) bool says which keys each query may see (every row has at least one);
/// `causal` is plain causal attention from the first key (then `mask` is `None`).
pub(crate) fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
) -> Tensor {
    let half = matches!(q.kind(), Kind::Half | Kind::BFloat16);
    let grad = q.requires_grad() || k.requires_grad() || v.requires_grad();
    if half && q.device().is_cuda() && !grad {
        let bias = mask.map(|m| additive_bias(m, q));
        let (y, _, _, _) = Tensor::internal_scaled_dot_product_efficient_attention(
            q,
            k,
            v,
            bias.as_ref(),
            false,
            0.0,
            causal,
            scale,
        );
        return y;
    }
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, false)
}

/// The boolean mask as the additive bias the memory-efficient kernel takes: 0 where a
/// key may be seen, −∞ elsewhere, broadcast over heads. The kernel needs the bias rows
/// 16-element aligned, which libtorch's own dispatcher arranges by padding (its
/// `preprocess_mask`); calling the kernel directly, we pad the storage and view the
/// first S columns.
fn additive_bias(mask: &Tensor, q: &Tensor) -> Tensor {
    let (b, _, t, s) = mask.size4().expect("mask is (B, 1, T, S)");
    let h = q.size()[1];
    let padded = (s + 15) / 16 * 16;
    let bias = Tensor::full([b, 1, t, padded], f64::NEG_INFINITY, (q.kind(), q.device()));
    let mut view = bias.narrow(3, 0, s);
    let _ = view.masked_fill_(&mask.to_device(q.device()), 0.0);
    view.expand([b, h, t, s], false)
}

/// What one cached forward pass attends with: the cache, the rows it feeds and where
/// (`Span`), and the mask of their queries.
pub(crate) struct Pass<'a> {
    pub(crate) cache: &'a KvCache,
    pub(crate) span: &'a Span,
    pub(crate) mask: Option<Tensor>,
    pub(crate) causal: bool,
    /// A fixed-shape decode step (`model::graphed`): where every row writes, from device
    /// tensors; `span` is then not read.
    pub(crate) fixed: Option<FixedWrite<'a>>,
}

/// Where a fixed-shape step writes: one token for each of the cache's B rows, row b at
/// slot `slots[b]`, and what its queries attend: slots `[0, width)` of every row.
pub(crate) struct FixedWrite<'a> {
    /// (B,) int64: 0..B.
    pub(crate) rows: &'a Tensor,
    /// (B,) int64.
    pub(crate) slots: &'a Tensor,
    pub(crate) width: i64,
}

impl Pass<'_> {
    /// Writes the new keys or values `new` (R, nh, t, hs) of shard `r` into `which`
    /// (`k` or `v`), and returns the rows' slots `[0, end)`: (R, nh, S, hs).
    pub(crate) fn write_read(&self, cache: &Tensor, new: &Tensor) -> Tensor {
        if let Some(f) = &self.fixed {
            // (B, nh, 1, hs) into cache[b, :, slots[b], :], by device indices only.
            let mut c = cache.shallow_clone();
            let _ = c.index_put_(
                &[Some(f.rows), None, Some(f.slots)],
                &new.select(2, 0),
                false,
            );
            return cache.narrow(2, 0, f.width);
        }
        let span = self.span;
        let (t, s) = (span.t, span.end());
        let first = span.consecutive();
        match (first, span.uniform()) {
            (Some(first), Some(start)) => {
                let rows = cache.narrow(0, first as i64, span.rows.len() as i64);
                rows.narrow(2, start, t).copy_(new);
                rows.narrow(2, 0, s)
            }
            _ => {
                // One indexed write for every row: cache[rows[i], :, starts[i] + j, :].
                let device = cache.device();
                let (r, nh, hs) = (span.rows.len() as i64, new.size()[1], new.size()[3]);
                let rows: Vec<i64> = span.rows.iter().map(|&x| x as i64).collect();
                let rows = Tensor::from_slice(&rows).to_device(device);
                let slots = Tensor::from_slice(&span.starts)
                    .to_device(device)
                    .view([r, 1])
                    + Tensor::arange(t, (Kind::Int64, device)).view([1, t]); // (R, t)
                let row_of = rows.view([r, 1]).expand([r, t], false).reshape([-1]);
                let values = new.permute([0, 2, 1, 3]).reshape([r * t, nh, hs]); // (R·t, nh, hs)
                let mut c = cache.shallow_clone();
                let _ = c.index_put_(
                    &[Some(row_of), None, Some(slots.reshape([-1]))],
                    &values,
                    false,
                );
                match first {
                    Some(first) => cache.narrow(0, first as i64, r).narrow(2, 0, s),
                    None => cache.index_select(0, &rows).narrow(2, 0, s),
                }
            }
        }
    }
}
