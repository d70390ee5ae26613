//! The KV cache: one preallocated (B, nh, capacity, hs) key and value tensor per layer,
//! written in place at the next free slot, reordered by index for beams. It also holds
//! the per-row attention mask over slots and the position id of every slot, so that a
//! left-padded batch attends and positions exactly as transformers' `generate` does
//! (`position_ids = attention_mask.cumsum(-1) - 1`).
//!
//! Rows are also independent sequences (the engine's unit, `generate::engine`): each row
//! has its own length, a forward pass feeds any subset of rows (`Span`), each at its own
//! position, and a row is freed or copied without touching the others. Such a cache is
//! never left-padded: a row's slot s holds its token at position s.
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
    /// Per row: how many slots are filled.
    lens: Vec<i64>,
    capacity: i64,
    /// Per row: the LoRA adapter its keys and values were computed with, and so the
    /// adapter its next tokens run with (an index into the model's, `model::lora`);
    /// `None`: the base. A freed row goes back to `adapter_default`.
    adapters: Vec<Option<usize>>,
    adapter_default: Option<usize>,
    /// The fixed-shape decode step's inputs and captured graphs (`model::graphed`),
    /// made at its first step.
    pub(crate) fixed: Option<crate::model::FixedStep>,
}

/// One row's keys and values over its first `len` slots, detached from any cache.
pub struct KvRows {
    /// Per layer, per tensor-parallel shard: (nh / shards, len, hs).
    pub k: Vec<Vec<Tensor>>,
    pub v: Vec<Vec<Tensor>>,
    pub len: i64,
}

impl KvRows {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .flatten()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}

/// The rows one forward pass feeds, in the order of its input rows, and where each
/// row's new tokens go: `t` tokens at slots `[starts[i], starts[i] + t)` of row `rows[i]`.
#[derive(Debug, Clone)]
pub struct Span {
    pub rows: Vec<usize>,
    pub starts: Vec<i64>,
    pub t: i64,
}

impl Span {
    /// Whether every row starts at the same slot.
    pub(crate) fn uniform(&self) -> Option<i64> {
        let first = *self.starts.first()?;
        self.starts.iter().all(|&s| s == first).then_some(first)
    }

    /// The first row, when the rows are consecutive (`rows[i] = first + i`).
    pub(crate) fn consecutive(&self) -> Option<usize> {
        let first = *self.rows.first()?;
        self.rows
            .iter()
            .enumerate()
            .all(|(i, &r)| r == first + i)
            .then_some(first)
    }

    /// Slots attended by the longest row after this pass.
    pub(crate) fn end(&self) -> i64 {
        self.starts.iter().max().map_or(0, |s| s + self.t)
    }
}

/// `Tensor::zeros`, on the CPU in transparent huge pages where the kernel gives them for
/// the asking (`madvise` mode): decode attention walks every row's and head's keys and
/// values each step, hundreds of MB for a served batch, and with 4 KB pages each page it
/// enters costs a TLB miss. The advice goes before the zeroing, which faults the pages in.
fn zeros_on_huge_pages(shape: &[i64], kind: Kind, device: Device) -> Tensor {
    if device != Device::Cpu {
        return Tensor::zeros(shape, (kind, device));
    }
    let mut t = Tensor::empty(shape, (kind, device));
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = t.data_ptr() as usize;
        let end = start + t.numel() * kind.elt_size_in_bytes();
        // the whole huge pages inside the tensor's storage
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside the tensor's storage, which it owns; the advice
            // changes no contents (and nothing has been written yet).
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    t.zero_()
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
        let heads = config.n_head / devices.len() as i64;
        Self::with_heads(config, heads, batch, capacity, kind, devices)
    }

    /// As `new`, with `heads` attention heads per shard.
    pub fn with_heads(
        config: &Gpt2Config,
        heads: i64,
        batch: i64,
        capacity: i64,
        kind: Kind,
        devices: &[Device],
    ) -> Self {
        let shape = [batch, heads, capacity, config.head_dim()];
        let layer = || {
            devices
                .iter()
                .map(|&d| zeros_on_huge_pages(&shape, kind, d))
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
            lens: vec![0; batch.max(0) as usize],
            capacity,
            adapters: vec![None; batch.max(0) as usize],
            adapter_default: None,
            fixed: None,
        }
    }

    /// What a captured step depends on beyond its inputs: the storage of every tensor
    /// it reads or writes, and whether the rows are left-padded. A step captured under
    /// another fingerprint is stale.
    pub(crate) fn fingerprint(&self) -> Vec<usize> {
        let mut f: Vec<usize> = self
            .k
            .iter()
            .chain(&self.v)
            .flatten()
            .chain([&self.valid, &self.positions])
            .map(|t| t.data_ptr() as usize)
            .collect();
        f.push(usize::from(self.padded));
        f
    }

    /// The position ids of every slot: (B, capacity).
    pub(crate) fn slot_positions(&self) -> &Tensor {
        &self.positions
    }

    /// Every row, and every row freed from now on, runs with `adapter`.
    pub(crate) fn set_adapter_default(&mut self, adapter: Option<usize>) {
        self.adapter_default = adapter;
        self.adapters.fill(adapter);
    }

    /// Row `row`'s next tokens run with `adapter` (set before its first token).
    pub fn set_adapter(&mut self, row: usize, adapter: Option<usize>) {
        self.adapters[row] = adapter;
    }

    /// The adapter row `row` runs with.
    pub fn adapter(&self, row: usize) -> Option<usize> {
        self.adapters.get(row).copied().flatten()
    }

    /// Marks the first `mask.size()[1]` slots with a (B, T) 0/1 attention mask (0 =
    /// padding) and derives every slot's position id from it. Call before the prefill.
    pub fn set_attention_mask(&mut self, mask: &Tensor) {
        let (_, t) = mask.size2().expect("attention mask is (B, T)");
        let mask = mask.to_device(self.valid.device()).to_kind(Kind::Bool);
        self.valid.narrow(1, 0, t).copy_(&mask);
        // Slots after the prompt are always valid: cumsum over the whole row.
        let pos = self.valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
        self.positions.copy_(&pos.clamp_min(0));
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

    /// Filled slots of the longest row (of every row, when they move together).
    pub fn len(&self) -> i64 {
        self.lens.iter().copied().max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Filled slots of `row`.
    pub fn row_len(&self, row: usize) -> i64 {
        self.lens[row]
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub fn batch_size(&self) -> i64 {
        self.valid.size()[0]
    }

    /// Forgets every row's slots from `len` on (speculative decoding rolls back this way).
    pub fn truncate(&mut self, len: i64) {
        for l in &mut self.lens {
            *l = (*l).min(len.max(0));
        }
        self.own_free_slots();
    }

    /// Forgets `row`'s slots from `len` on, the other rows untouched (a speculative
    /// row rolls back its rejected drafts this way).
    pub fn truncate_row(&mut self, row: usize, len: i64) {
        self.lens[row] = self.lens[row].min(len.max(0));
        self.own_free_slots();
    }

    /// Empties `row` (its sequence left); the other rows are untouched.
    pub fn free_row(&mut self, row: usize) {
        self.lens[row] = 0;
        self.adapters[row] = self.adapter_default;
        let cap = self.capacity as usize;
        if let Some(map) = &mut self.slot_rows {
            map[row * cap..(row + 1) * cap].fill(row as u32);
        }
    }

    /// Makes `to` a copy of `from`'s filled slots (a prompt prefilled once, sampled
    /// several times).
    pub fn copy_row(&mut self, from: usize, to: usize) {
        self.materialize();
        let n = self.lens[from];
        if from != to && n > 0 {
            for t in self.k.iter().chain(self.v.iter()).flatten() {
                t.get(to as i64)
                    .narrow(1, 0, n)
                    .copy_(&t.get(from as i64).narrow(1, 0, n));
            }
        }
        self.lens[to] = n;
        self.adapters[to] = self.adapters[from];
        self.own_free_slots();
    }

    /// A copy of `row`'s keys and values at slots `[0, len)`: per layer, per shard,
    /// (nh / shards, len, hs) each (a prompt's prefix, kept by the prefix cache).
    pub fn read_prefix(&mut self, row: usize, len: i64) -> KvRows {
        self.materialize();
        let take = |t: &Tensor| t.get(row as i64).narrow(1, 0, len).copy();
        let layers =
            |ts: &Vec<Vec<Tensor>>| ts.iter().map(|l| l.iter().map(take).collect()).collect();
        KvRows {
            k: layers(&self.k),
            v: layers(&self.v),
            len,
        }
    }

    /// Makes `row` hold the first `n` slots of `prefix` and nothing after (a sequence
    /// joining with a cached prefix prefills only the rest). Errors when the prefix does
    /// not fit this cache's layout.
    pub fn write_prefix(&mut self, row: usize, prefix: &KvRows, n: i64) -> Result<(), String> {
        self.materialize();
        let fits = n <= prefix.len
            && n <= self.capacity
            && prefix.k.len() == self.k.len()
            && prefix
                .k
                .iter()
                .zip(&self.k)
                .all(|(p, c)| p.len() == c.len());
        if !fits || row >= self.lens.len() {
            return Err(format!(
                "a cached prefix of {n} tokens does not fit row {row}"
            ));
        }
        for (ours, theirs) in [(&self.k, &prefix.k), (&self.v, &prefix.v)] {
            for (layer, from) in ours.iter().zip(theirs) {
                for (t, f) in layer.iter().zip(from) {
                    t.get(row as i64).narrow(1, 0, n).copy_(&f.narrow(1, 0, n));
                }
            }
        }
        self.lens[row] = n;
        self.own_free_slots();
        Ok(())
    }

    /// The span of `t` new tokens for each of `rows` (all rows when `None`), each at
    /// its row's next slot. Errors when a row is out of range, or when a row would
    /// run past the capacity.
    pub fn span(&self, rows: Option<&[usize]>, t: i64) -> Result<Span, String> {
        let rows: Vec<usize> = match rows {
            Some(r) => r.to_vec(),
            None => (0..self.lens.len()).collect(),
        };
        let mut starts = Vec::with_capacity(rows.len());
        for &r in &rows {
            let Some(&len) = self.lens.get(r) else {
                return Err(format!("row {r} of a cache of {}", self.lens.len()));
            };
            if len + t > self.capacity {
                return Err(format!(
                    "KV cache holds {} slots, {} needed",
                    self.capacity,
                    len + t
                ));
            }
            starts.push(len);
        }
        Ok(Span { rows, starts, t })
    }

    /// Slots past each row's length are written by their own row: point the table there.
    fn own_free_slots(&mut self) {
        let cap = self.capacity as usize;
        if let Some(map) = &mut self.slot_rows {
            for (b, row) in map.chunks_exact_mut(cap.max(1)).enumerate() {
                row[self.lens[b] as usize..].fill(b as u32);
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
                    self.lens = idx.iter().map(|&i| self.lens[i as usize]).collect();
                    self.adapters = idx.iter().map(|&i| self.adapters[i as usize]).collect();
                    self.own_free_slots();
                    self.valid = self.valid.index_select(0, &index);
                    self.positions = self.positions.index_select(0, &index);
                    return;
                }
            }
        }
        self.move_rows(&index);
    }

    /// `reorder` by moving the keys and values (every device but the CPU's table).
    fn move_rows(&mut self, index: &Tensor) {
        self.materialize();
        let b = self.batch_size();
        // Keeping the batch size, the rows move within the same tensors (a captured
        // decode step reads and writes these storages), keys and values only over the
        // filled slots; otherwise new tensors.
        let same = index.size() == [b];
        let filled = self.len();
        let select = |t: &mut Tensor, slots: Option<i64>| {
            let index = index.to_device(t.device());
            match same {
                true => {
                    let mut part = match slots {
                        Some(n) => t.narrow(2, 0, n),
                        None => t.shallow_clone(),
                    };
                    let moved = part.index_select(0, &index);
                    part.copy_(&moved);
                }
                false => *t = t.index_select(0, &index),
            }
        };
        for t in self.k.iter_mut().chain(self.v.iter_mut()).flatten() {
            select(t, Some(filled));
        }
        select(&mut self.valid, None);
        select(&mut self.positions, None);
        let idx = Vec::<i64>::try_from(&index.to_device(Device::Cpu)).unwrap_or_default();
        self.lens = idx.iter().map(|&i| self.lens[i as usize]).collect();
        self.adapters = idx.iter().map(|&i| self.adapters[i as usize]).collect();
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
        let (b, cap, len) = (self.batch_size(), self.capacity, self.len());
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

    /// Position ids of the span's new tokens: (R, t). A left-padded cache (all rows
    /// together) reads them from its mask; otherwise slot s is position s.
    pub(crate) fn positions(&self, span: &Span) -> Tensor {
        let device = self.valid.device();
        match (span.uniform(), self.padded) {
            (Some(start), true) => self.positions.narrow(1, start, span.t),
            _ => {
                let starts: Vec<i64> = span.starts.clone();
                let r = starts.len() as i64;
                let starts = Tensor::from_slice(&starts).view([r, 1]).to_device(device);
                starts + Tensor::arange(span.t, (Kind::Int64, device)).unsqueeze(0)
            }
        }
    }

    /// The attention mask of the span's queries over slots `[0, span.end())`:
    /// (R, 1, t, end) bool, or `None` when every query sees every slot up to its own
    /// (one token per row at one slot) or plain causal attention is exact (then
    /// `plain_causal`). Each query may always attend to its own slot, so a padding query
    /// never has an empty row (which would give NaN and leak through later layers'
    /// values).
    pub(crate) fn attention_mask(&self, span: &Span) -> Option<Tensor> {
        let (t, s) = (span.t, span.end());
        let uniform = span.uniform();
        if !self.padded && uniform.is_some_and(|start| t == 1 || start == 0) {
            return None;
        }
        let device = self.valid.device();
        let r = span.rows.len() as i64;
        let starts = Tensor::from_slice(&span.starts)
            .view([r, 1, 1, 1])
            .to_device(device);
        let q = starts + Tensor::arange(t, (Kind::Int64, device)).view([1, 1, t, 1]); // (R, 1, t, 1)
        let k = Tensor::arange(s, (Kind::Int64, device)).view([1, 1, 1, s]); // (1, 1, 1, s)
        let causal = k.le_tensor(&q); // (R, 1, t, s)
        if !self.padded {
            return Some(causal);
        }
        let own = k.eq_tensor(&q); // (R, 1, t, s)
        let keys = self.valid.narrow(1, 0, s).unsqueeze(1).unsqueeze(1); // (B, 1, 1, s)
        Some(keys.logical_and(&causal).logical_or(&own))
    }

    /// Whether the causal flag alone describes the attention of the span's queries.
    pub(crate) fn plain_causal(&self, span: &Span) -> bool {
        !self.padded && span.uniform() == Some(0) && span.t > 1
    }

    /// The span's tokens are written: its rows grow by `t`.
    pub(crate) fn advance(&mut self, span: &Span) {
        // The table already points slots past each length at their own row.
        for &r in &span.rows {
            self.lens[r] += span.t;
        }
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
        // What every other device does: rows moved in place over the filled slots.
        let mut moved = KvCache::new(&config, b, cap, Kind::Float, &[Device::Cpu]);
        let storage = moved.k[0][0].data_ptr();
        let orders: [&[i64]; 4] = [&[0, 0, 1], &[2, 1, 1], &[1, 2, 0], &[0, 0, 0]];
        for (step, order) in orders.iter().enumerate() {
            // Each step writes slot `step` of every row (as a decode step does: a fused
            // step writes each row's own stored row, which the table keeps free).
            let new = Tensor::randn([b, 1, 1, 4], (Kind::Float, Device::Cpu));
            for cache in [&mut lazy, &mut eager, &mut moved] {
                for t in cache.k.iter().chain(cache.v.iter()).flatten() {
                    t.narrow(2, step as i64, 1)
                        .copy_(&new.expand([b, 1, 1, 4], false));
                }
                let span = cache.span(None, 1).unwrap();
                cache.advance(&span);
            }
            let index = Tensor::from_slice(order);
            moved.move_rows(&index);
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
        assert_eq!(moved.k[0][0].data_ptr(), storage, "moved in place");
        for (m, e) in moved
            .k
            .iter()
            .chain(&moved.v)
            .flatten()
            .zip(eager.k.iter().chain(&eager.v).flatten())
        {
            let n = orders.len() as i64;
            assert!(m.narrow(2, 0, n).equal(&e.narrow(2, 0, n)));
        }
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
