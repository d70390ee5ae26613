//! The KV cache: one preallocated (B, nh, capacity, hs) key and value tensor per layer,
//! written in place at the next free slot, reordered by index for beams. It also holds
//! the per-row attention mask over slots and the position id of every slot, so that a
//! left-padded batch attends and positions exactly as transformers' `generate` does
//! (`position_ids = attention_mask.cumsum(-1) - 1`).
use tch::{Device, Kind, Tensor};

use crate::config::Gpt2Config;

pub struct KvCache {
    /// Per layer, per tensor-parallel shard: (B, nh / shards, capacity, hs) on its device.
    pub(crate) k: Vec<Vec<Tensor>>,
    pub(crate) v: Vec<Vec<Tensor>>,
    /// (B, capacity) bool: may this slot be attended to.
    valid: Tensor,
    /// (B, capacity) int64: the position id of each slot.
    positions: Tensor,
    /// Whether some slot is masked out (then attention needs an explicit mask).
    padded: bool,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// An empty cache for `batch` rows of up to `capacity` tokens each.
    /// `devices`: one per tensor-parallel shard (the first holds masks and positions).
    pub fn new(
        config: &Gpt2Config,
        batch: i64,
        capacity: i64,
        kind: Kind,
        devices: &[Device],
    ) -> Self {
        let shape = [
            batch,
            config.n_head / devices.len() as i64,
            capacity,
            config.head_dim(),
        ];
        let layer = || {
            devices
                .iter()
                .map(|&d| Tensor::zeros(shape, (kind, d)))
                .collect::<Vec<_>>()
        };
        let n = config.n_layer as usize;
        let device = devices[0];
        let opts = (Kind::Int64, device);
        Self {
            k: (0..n).map(|_| layer()).collect(),
            v: (0..n).map(|_| layer()).collect(),
            valid: Tensor::ones([batch, capacity], (Kind::Bool, device)),
            positions: Tensor::arange(capacity, opts)
                .unsqueeze(0)
                .repeat([batch, 1]),
            padded: false,
            len: 0,
            capacity,
        }
    }

    /// Marks the first `mask.size()[1]` slots with a (B, T) 0/1 attention mask (0 =
    /// padding) and derives every slot's position id from it. Call before the prefill.
    pub fn set_attention_mask(&mut self, mask: &Tensor) {
        let (_, t) = mask.size2().expect("attention mask is (B, T)");
        let mask = mask.to_device(self.valid.device()).to_kind(Kind::Bool);
        self.valid.narrow(1, 0, t).copy_(&mask);
        // Slots after the prompt are always valid: cumsum over the whole row.
        let pos = self.valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
        self.positions = pos.clamp_min(0);
        self.padded = !bool::try_from(mask.all()).unwrap_or(true);
    }

    /// (B, capacity) bool: may this slot be attended to.
    pub(crate) fn valid(&self) -> &Tensor {
        &self.valid
    }

    /// Whether some slot is masked out.
    pub(crate) fn padded(&self) -> bool {
        self.padded
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub fn batch_size(&self) -> i64 {
        self.valid.size()[0]
    }

    /// Forgets the slots from `len` on (speculative decoding rolls back this way).
    pub fn truncate(&mut self, len: i64) {
        self.len = self.len.min(len.max(0));
    }

    /// Reorders (or selects) rows: row i becomes old row `index[i]`. Beams use this.
    pub fn reorder(&mut self, index: &Tensor) {
        let index = index.to_device(self.valid.device());
        for t in self.k.iter_mut().chain(self.v.iter_mut()).flatten() {
            *t = t.index_select(0, &index.to_device(t.device()));
        }
        self.valid = self.valid.index_select(0, &index);
        self.positions = self.positions.index_select(0, &index);
    }

    /// Position ids of the next `t` slots: (B, t).
    pub(crate) fn next_positions(&self, t: i64) -> Tensor {
        self.positions.narrow(1, self.len, t)
    }

    /// The attention mask for `t` new queries over all slots up to `len + t`:
    /// (B, 1, t, len + t) bool, or `None` when plain causal attention is exact.
    /// Each query may always attend to its own slot, so a padding query never has an
    /// empty row (which would give NaN and leak through later layers' values).
    pub(crate) fn attention_mask(&self, t: i64) -> Option<Tensor> {
        let s = self.len + t;
        if !self.padded && (t == 1 || self.len == 0) {
            return None;
        }
        let device = self.valid.device();
        let q = Tensor::arange_start(self.len, s, (Kind::Int64, device)).unsqueeze(1); // (t, 1)
        let k = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0); // (1, s)
        let causal = k.le_tensor(&q); // (t, s)
        let own = k.eq_tensor(&q); // (t, s)
        let keys = self.valid.narrow(1, 0, s).unsqueeze(1).unsqueeze(1); // (B, 1, 1, s)
        Some(keys.logical_and(&causal).logical_or(&own))
    }

    /// Whether the causal flag alone describes the attention of the next `t` queries.
    pub(crate) fn plain_causal(&self, t: i64) -> bool {
        !self.padded && self.len == 0 && t > 1
    }

    pub(crate) fn advance(&mut self, t: i64) {
        self.len += t;
    }
}
