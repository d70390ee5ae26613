//! The fixed-shape decode step: one token for every row of the cache, its inputs in
//! device buffers the host overwrites before each step (the tokens, each row's slot),
//! the keys and values written by device indices, and the queries attending over a
//! fixed width of slots (a power-of-two bucket of the capacity) with a mask. No shape,
//! address or host value changes between steps of one bucket, so on CUDA the step is
//! captured once as a CUDA graph and replayed (`crate::cuda_graph`): one launch a step
//! instead of hundreds. The same computation runs uncaptured on any other device.
//!
//! Tokens equal the libtorch decode path's: the masked slots get exactly zero weight
//! (softmax of −∞), and slot s of a row holds what the other path holds there.
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::backend::Tensors;
use super::Gpt2;
use crate::attention::{FixedWrite, Pass};
use crate::cache::{KvCache, Span};
use crate::cuda_graph::CudaGraph;

/// Narrowest width a step attends over: short sequences share one graph.
const MIN_WIDTH: i64 = 64;

/// A cache's fixed-shape step: its input buffers and, on CUDA, one captured step per
/// width.
pub struct FixedStep {
    /// (B, 1) int64: each row's token.
    ids: Tensor,
    /// (B,) int64: the slot each row writes (its length).
    slots: Tensor,
    /// (B,) int64: 0..B.
    rows: Tensor,
    /// Per width: the captured step and its output (B, E).
    graphs: HashMap<i64, (CudaGraph, Tensor)>,
    /// What the graphs were captured over (`KvCache::fingerprint`).
    fingerprint: Vec<usize>,
    /// Capture failed once: run uncaptured from then on.
    no_graphs: bool,
}

impl FixedStep {
    fn new(batch: i64, device: Device) -> Self {
        let opts = (Kind::Int64, device);
        Self {
            ids: Tensor::zeros([batch, 1], opts),
            slots: Tensor::zeros([batch], opts),
            rows: Tensor::arange(batch, opts),
            graphs: HashMap::new(),
            fingerprint: Vec::new(),
            no_graphs: false,
        }
    }
}

/// The width a step whose rows have up to `need` filled slots attends over.
fn width(need: i64, capacity: i64) -> i64 {
    let mut w = MIN_WIDTH;
    while w < need {
        w *= 2;
    }
    w.min(capacity)
}

impl Gpt2 {
    /// `forward_span` for a decode step through the fixed-shape step, or `None` where
    /// it does not apply (several tokens a row, a split model, LoRA rows, embeddings
    /// read on the host, or a row outside the span with no free slot to take its
    /// write); then nothing was written.
    pub(super) fn fixed_step(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        span: &Span,
    ) -> Option<Tensor> {
        let b = cache.batch_size();
        let cap = cache.capacity();
        if !self.fixed_decode || span.t != 1 {
            return None;
        }
        let unfit = if self.devices.len() != 1 || self.comm.vocab_shard().is_some() {
            Some("a tensor-parallel model")
        } else if !self.adapters.is_empty() {
            Some("a model with LoRA adapters")
        } else if self.wte_blocks.is_some() {
            Some("GGUF embeddings read on the host")
        } else {
            None
        };
        if let Some(what) = unfit {
            crate::cuda_graph::note_unused(what);
            return None;
        }
        // Rows outside the span write too (at their first free slot, which their next
        // token overwrites): each needs one.
        let mut in_span = vec![false; b as usize];
        for &r in &span.rows {
            in_span[r] = true;
        }
        let lens: Vec<i64> = (0..b as usize).map(|r| cache.row_len(r)).collect();
        if lens.iter().zip(&in_span).any(|(&l, &fed)| !fed && l >= cap) {
            return None;
        }
        cache.materialize();
        let device = self.device();
        // A cache whose batch size changed (a reorder that selects rows) starts afresh.
        let mut fixed = match cache.fixed.take() {
            Some(f) if f.rows.size()[0] == b => f,
            _ => FixedStep::new(b, device),
        };
        let rows = Tensor::from_slice(&span.rows.iter().map(|&r| r as i64).collect::<Vec<_>>())
            .to_device(device);
        let _ = fixed.ids.index_copy_(0, &rows, &ids.reshape([-1, 1]));
        fixed.slots.copy_(&Tensor::from_slice(&lens));
        let w = width(lens.iter().max().map_or(1, |l| l + 1), cap);
        let fingerprint = cache.fingerprint();
        if fixed.fingerprint != fingerprint {
            fixed.graphs.clear();
            fixed.fingerprint = fingerprint;
        }
        let hidden = match fixed.graphs.get(&w) {
            Some((graph, out)) => match graph.replay() {
                Ok(()) => out.shallow_clone(),
                Err(e) => {
                    // Not expected after a capture that worked: say so, run uncaptured.
                    crate::cuda_graph::note_failure(&e);
                    fixed.graphs.clear();
                    fixed.no_graphs = true;
                    self.fixed_compute(cache, &fixed, w)
                }
            },
            None => {
                // Uncaptured: every step off CUDA, and on CUDA the step before capture
                // (which also warms up the libraries a capture must not initialise).
                let out = self.fixed_compute(cache, &fixed, w);
                if device.is_cuda() && !fixed.no_graphs {
                    match CudaGraph::capture(device, || self.fixed_compute(cache, &fixed, w)) {
                        Ok((graph, captured)) => {
                            fixed.graphs.insert(w, (graph, captured));
                        }
                        Err(e) => {
                            crate::cuda_graph::note_failure(&e);
                            fixed.no_graphs = true;
                        }
                    }
                }
                out
            }
        };
        let hidden = hidden.index_select(0, &rows).unsqueeze(1); // (R, 1, E)
        cache.fixed = Some(fixed);
        cache.advance(span);
        Some(hidden)
    }

    /// The step over every row of `cache`: hidden states (B, E) after `ln_f`, the new
    /// keys and values written. Device ops only, on tensors whose addresses stay put.
    fn fixed_compute(&self, cache: &KvCache, fixed: &FixedStep, width: i64) -> Tensor {
        let b = fixed.rows.size()[0];
        let device = self.device();
        let slot = fixed.slots.view([b, 1]);
        let pos = match cache.padded() {
            true => cache.slot_positions().gather(1, &slot, false),
            false => slot.shallow_clone(),
        };
        let embed = |w: &Tensor, i: &Tensor| Tensor::embedding(w, i, -1, false, false);
        let x = self.embed_tokens(&fixed.ids) + embed(&self.wpe, &pos); // (B, 1, E)
        let k = Tensor::arange(width, (Kind::Int64, device)).view([1, 1, 1, width]);
        let q = fixed.slots.view([b, 1, 1, 1]);
        let causal = k.le_tensor(&q); // (B, 1, 1, width)
        let mask = match cache.padded() {
            true => {
                let keys = cache.valid().narrow(1, 0, width).unsqueeze(1).unsqueeze(1);
                keys.logical_and(&causal).logical_or(&k.eq_tensor(&q))
            }
            false => causal,
        };
        let span = Span {
            rows: Vec::new(),
            starts: Vec::new(),
            t: 1,
        };
        let pass = Pass {
            cache,
            span: &span,
            mask: Some(mask),
            causal: false,
            fixed: Some(FixedWrite {
                rows: &fixed.rows,
                slots: &fixed.slots,
                width,
            }),
        };
        self.trunk(&Tensors::new(self, Some(&pass)), x).select(1, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::width;

    #[test]
    fn widths_are_powers_of_two_up_to_the_capacity() {
        assert_eq!(width(1, 1024), 64);
        assert_eq!(width(64, 1024), 64);
        assert_eq!(width(65, 1024), 128);
        assert_eq!(width(700, 1024), 1024);
        assert_eq!(width(30, 40), 40);
        assert_eq!(width(1000, 1000), 1000);
    }
}
