//! The KV cache: one preallocated (B, nh, capacity, hs) key and value tensor per layer,
//! written in place at the next free slot, reordered by index for beams. It also holds
//! the per-row attention mask over slots and the position id of every slot, so that a
//! left-padded batch attends and positions exactly as transformers' `generate` does
//! (`position_ids = attention_mask.cumsum(-1) - 1`).
//!
//! Beam search reorders rows every step. Copying every layer's keys and values for that
//! took ~13% of a beam-5 decode step on the CPU, so a reorder that keeps the batch size
//! only permutes a table saying which stored row holds each row's slot (`slot_rows`);
//! the fused CPU decode step (`decode`) reads through it, and everything else calls
//! `materialize` first, which moves the data once. This is exact: slot s of stored row
//! r is written once, by the step that fills slot s of row r, so rows that share a
//! parent share its slots without copying them.
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
    /// (B × capacity), row-major: the stored row of `k`/`v` that holds row b's slot s;
    /// `None` when every row holds its own (the tensors are in order).
    slot_rows: Option<Vec<u32>>,
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
            slot_rows: None,
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
        self.own_free_slots();
    }

    /// Slots from `len` on are written by their own row: point the table there.
    fn own_free_slots(&mut self) {
        let (cap, len) = (self.capacity as usize, self.len as usize);
        if let Some(map) = &mut self.slot_rows {
            for (b, row) in map.chunks_exact_mut(cap.max(1)).enumerate() {
                row[len..].fill(b as u32);
            }
        }
    }

    /// Reorders (or selects) rows: row i becomes old row `index[i]`. Beams use this.
    /// Keeping the batch size on the CPU, it only permutes `slot_rows` (see the module
    /// notes); otherwise it moves the keys and values.
    pub fn reorder(&mut self, index: &Tensor) {
        let index = index.to_device(self.valid.device());
        let b = self.batch_size();
        let on_cpu = self.k.iter().flatten().all(|t| t.device() == Device::Cpu);
        if on_cpu && index.size() == [b] && b > 0 {
            if let Ok(idx) = Vec::<i64>::try_from(&index) {
                if idx.iter().all(|&i| (0..b).contains(&i)) {
                    let cap = self.capacity as usize;
                    let old = self.slot_rows.take().unwrap_or_else(|| {
                        (0..b as u32)
                            .flat_map(|r| std::iter::repeat_n(r, cap))
                            .collect()
                    });
                    let mut map = vec![0u32; old.len()];
                    for (row, &from) in map.chunks_exact_mut(cap.max(1)).zip(&idx) {
                        let from = from as usize;
                        row.copy_from_slice(&old[from * cap..(from + 1) * cap]);
                    }
                    self.slot_rows = Some(map);
                    self.own_free_slots();
                    self.valid = self.valid.index_select(0, &index);
                    self.positions = self.positions.index_select(0, &index);
                    return;
                }
            }
        }
        self.materialize();
        for t in self.k.iter_mut().chain(self.v.iter_mut()).flatten() {
            *t = t.index_select(0, &index.to_device(t.device()));
        }
        self.valid = self.valid.index_select(0, &index);
        self.positions = self.positions.index_select(0, &index);
    }

    /// The row-to-stored-row table of filled and free slots (B × capacity), if rows were
    /// reordered without moving data.
    pub(crate) fn slot_rows(&self) -> Option<&[u32]> {
        self.slot_rows.as_deref()
    }

    /// Moves keys and values so that every row holds its own slots again (a no-op when
    /// they do). Everything that reads `k`/`v` as tensors calls this first.
    pub fn materialize(&mut self) {
        let Some(map) = self.slot_rows.take() else {
            return;
        };
        let (b, cap, len) = (self.batch_size(), self.capacity, self.len);
        if len == 0 {
            return;
        }
        let idx: Vec<i64> = map
            .chunks_exact(cap as usize)
            .flat_map(|row| row[..len as usize].iter().map(|&r| r as i64))
            .collect();
        let idx = Tensor::from_slice(&idx).view([b, 1, len, 1]);
        for t in self.k.iter_mut().chain(self.v.iter_mut()).flatten() {
            let (nh, hs) = (t.size()[1], t.size()[3]);
            let mut used = t.narrow(2, 0, len);
            let moved = used.gather(
                0,
                &idx.to_device(t.device()).expand([b, nh, len, hs], false),
                false,
            );
            used.copy_(&moved);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Reorders through the slot table, with steps writing in between, then materializes:
    /// the tensors equal those of a cache whose every reorder moved the data.
    #[test]
    fn table_reorders_materialize_to_moved_data() {
        let config: Gpt2Config =
            serde_json::from_str(r#"{"n_embd": 8, "n_head": 2, "n_layer": 2}"#).unwrap();
        let (b, cap) = (3i64, 6i64);
        let mut lazy = KvCache::new(&config, b, cap, Kind::Float, &[Device::Cpu]);
        let mut eager = KvCache::new(&config, b, cap, Kind::Float, &[Device::Cpu]);
        let orders: [&[i64]; 4] = [&[0, 0, 1], &[2, 1, 1], &[1, 2, 0], &[0, 0, 0]];
        for (step, order) in orders.iter().enumerate() {
            // Each step writes slot `step` of every row (as a decode step does: a fused
            // step writes each row's own stored row, which the table keeps free).
            let new = Tensor::randn([b, 1, 1, 4], (Kind::Float, Device::Cpu));
            for cache in [&mut lazy, &mut eager] {
                for t in cache.k.iter().chain(cache.v.iter()).flatten() {
                    t.narrow(2, step as i64, 1)
                        .copy_(&new.expand([b, 1, 1, 4], false));
                }
                cache.advance(1);
            }
            let index = Tensor::from_slice(order);
            lazy.reorder(&index);
            assert!(
                lazy.slot_rows().is_some(),
                "same-size CPU reorders use the table"
            );
            eager.materialize();
            for t in eager.k.iter_mut().chain(eager.v.iter_mut()).flatten() {
                *t = t.index_select(0, &index);
            }
        }
        lazy.materialize();
        assert!(lazy.slot_rows().is_none());
        for (a, e) in lazy
            .k
            .iter()
            .chain(&lazy.v)
            .flatten()
            .zip(eager.k.iter().chain(&eager.v).flatten())
        {
            let n = orders.len() as i64;
            assert!(a.narrow(2, 0, n).equal(&e.narrow(2, 0, n)));
        }
        // A reorder that changes the batch size moves the data at once.
        lazy.reorder(&Tensor::from_slice(&[0i64, 1, 2, 2]));
        assert!(lazy.slot_rows().is_none());
        assert_eq!(lazy.batch_size(), 4);
    }
}
