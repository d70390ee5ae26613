//! Attention of each row's new token over its cached slots, reading the KV cache
//! tensors' storage in place (through `KvCache::slot_rows` after beam reorders): one
//! (row, head) per task, portable code inlined into AVX-512 / AVX2 entry points, and
//! AVX-512 intrinsics that compute the same values.
use super::math::{dot, exp, round, tree_sum, Elem};
use super::{bf16_bits, Simd};
/// Raw access to one layer's key and value cache: (B, nh, cap, hs), f32 or bf16.
pub(super) struct CacheView<'a> {
    pub(super) k: *mut std::ffi::c_void,
    pub(super) v: *mut std::ffi::c_void,
    /// `KvCache::slot_rows`: which stored row holds each row's slot (None: its own).
    pub(super) slot_rows: Option<&'a [u32]>,
    /// The cache row of each of the step's rows (`Span::rows`).
    pub(super) rows: &'a [usize],
    pub(super) bf16: bool,
    pub(super) nh: usize,
    pub(super) cap: usize,
    pub(super) hs: usize,
}
// SAFETY: the pointers address the cache tensors of a `&KvCache` that outlives every use
// (`Plan::step` borrows it for the whole step); tasks read them only after `write`
// returned, and nothing writes them while tasks run.
unsafe impl Sync for CacheView<'_> {}
impl CacheView<'_> {
    /// Element offset of (row, head, slot, 0).
    fn at(&self, row: usize, head: usize, slot: usize) -> usize {
        ((row * self.nh + head) * self.cap + slot) * self.hs
    }

    /// Stores each step row's new keys and values (from qkv rows: q | k | v) at its
    /// slot `slots[r]`, in its own cache row.
    #[inline(always)]
    pub(super) fn write(&self, qkv: &[f32], slots: &[usize]) {
        let e = self.nh * self.hs;
        for (r, (&row, &slot)) in self.rows.iter().zip(slots).enumerate() {
            for h in 0..self.nh {
                let at = self.at(row, h, slot);
                let k = &qkv[r * 3 * e + e + h * self.hs..][..self.hs];
                let v = &qkv[r * 3 * e + 2 * e + h * self.hs..][..self.hs];
                // SAFETY: `Plan::step` checked each cache tensor is contiguous with shape
                // (B ≥ rows, nh, cap > slot, hs) and this dtype, so [at, at + hs) lies
                // inside it; no other reference to the storage is live during the step.
                unsafe {
                    if self.bf16 {
                        let (kp, vp) = (self.k as *mut u16, self.v as *mut u16);
                        for i in 0..self.hs {
                            *kp.add(at + i) = bf16_bits(k[i]);
                            *vp.add(at + i) = bf16_bits(v[i]);
                        }
                    } else {
                        let (kp, vp) = (self.k as *mut f32, self.v as *mut f32);
                        std::ptr::copy_nonoverlapping(k.as_ptr(), kp.add(at), self.hs);
                        std::ptr::copy_nonoverlapping(v.as_ptr(), vp.add(at), self.hs);
                    }
                }
            }
        }
    }

    /// Step row `row`'s key or value of `head` at slot `s` (hs values), in the cache's
    /// storage: in the stored row `slot_rows` names for its cache row (that row itself
    /// when there is no table).
    ///
    /// # Safety
    /// `T` is the cache's element type (f32, or u16 for bf16 bits), `row` < B, `head` <
    /// nh, `s` < cap, and nothing writes the cache while the slice lives.
    #[inline(always)]
    unsafe fn slot<T>(
        &self,
        which: *mut std::ffi::c_void,
        row: usize,
        head: usize,
        s: usize,
    ) -> &[T] {
        let row = self.rows[row];
        let stored = self
            .slot_rows
            .map_or(row, |m| m[row * self.cap + s] as usize);
        // SAFETY: `Plan::step` checked each cache tensor is contiguous with shape
        // (B, nh, cap, hs); `KvCache` keeps every table entry < B; so hs elements from
        // (stored, head, s) lie inside it. The caller vouches for the rest.
        unsafe {
            std::slice::from_raw_parts((which as *const T).add(self.at(stored, head, s)), self.hs)
        }
    }
}
/// Turns scores into unnormalised attention weights in place: exp(score − max), 0 for
/// masked (−∞) slots, rounded to bf16 when `round_p`; returns the sum of the unrounded
/// weights (the divisor, as libtorch's flash attention keeps it).
#[inline(always)]
fn softmax_weights(scores: &mut [f32], max: f32, round_p: bool) -> f32 {
    // The exponentials first, a loop that vectorises; then the sum in slot order, the
    // same value as one fused loop gives (whose serial sum kept `exp` scalar: perf).
    for p in scores.iter_mut() {
        *p = exp(*p - max) * (*p != f32::NEG_INFINITY) as u8 as f32;
    }
    let mut total = 0.0;
    for p in scores.iter_mut() {
        total += *p;
        *p = round(*p, round_p);
    }
    total
}

/// 16 cache elements as f32.
///
/// # Safety
/// avx512f; `p` points at 16 readable elements of type `T`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<T: Elem>(p: *const T) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: this function's contract.
    unsafe {
        if T::BF16 {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }
}
/// acc[..16·C] += Σ_s p_s · v_s over the slots with p_s ≠ 0, in slot order (the same sums
/// as the portable loop), with the C accumulators in registers.
///
/// # Safety
/// avx512f; `values(s)` points at 16·C readable elements of type `T` for every slot s
/// of `scores`; 16·C ≤ acc.len().
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn weigh<T: Elem, const C: usize>(
    scores: &[f32],
    values: impl Fn(usize) -> *const T,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut regs = [_mm512_setzero_ps(); C];
    for (s, &p) in scores.iter().enumerate() {
        if p != 0.0 {
            let v = values(s);
            let pv = _mm512_set1_ps(p);
            for (j, r) in regs.iter_mut().enumerate() {
                // SAFETY: this function's contract: 16·C elements at v.
                *r = _mm512_add_ps(*r, _mm512_mul_ps(pv, unsafe { load16(v.add(16 * j)) }));
            }
        }
    }
    for (j, r) in regs.iter().enumerate() {
        // SAFETY: 16·C ≤ acc.len().
        unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(16 * j), *r) };
    }
}
#[derive(Clone, Copy)]
pub(super) struct SyncPtr(pub(super) *mut f32);
// SAFETY: each attention task writes only its own (row, head) slice through it.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}
/// Attention of the new token of every row over its cached slots, one (row, head) per task.
pub(super) struct Attend<'a> {
    pub(super) cache: &'a CacheView<'a>,
    pub(super) qkv: &'a [f32],
    pub(super) out: SyncPtr,
    /// A left-padded batch's mask: (rows × (slot + 1)), all rows at one slot.
    pub(super) valid: Option<&'a [u8]>,
    /// Each step row's new slot (its position).
    pub(super) slots: &'a [usize],
    pub(super) scale: f32,
    pub(super) round_p: bool,
    pub(super) bf16: bool,
    pub(super) simd: Simd,
}
impl Attend<'_> {
    pub(super) fn run(&self, task: usize) {
        match self.simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` saw avx512f on this CPU.
            Simd::Avx512 => unsafe { self.run_avx512(task) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` saw avx2 and fma on this CPU.
            Simd::Avx2 => unsafe { self.run_avx2(task) },
            _ => self.run_any(task),
        }
    }

    /// # Safety
    /// The CPU has avx512f.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, task: usize) {
        // Head sizes with a register-resident variant of `weigh` (gpt2's is 64).
        if matches!(self.cache.hs, 16 | 32 | 64 | 128) {
            // SAFETY: avx512f (this function's contract); the cache's element type as
            // in `run_any`.
            unsafe {
                if self.bf16 {
                    self.run_on_avx512::<u16>(task)
                } else {
                    self.run_on_avx512::<f32>(task)
                }
            }
        } else {
            self.run_any(task)
        }
    }

    /// `run_on` with AVX-512 intrinsics for heads of a multiple of 16 values: the same
    /// products, sums and order (mul then add, no FMA; lanes summed by `tree_sum`), so
    /// the same values; the compiler had left q·k as 2-wide loads (perf annotate).
    ///
    /// # Safety
    /// The CPU has avx512f; hs is 16, 32, 64 or 128; as `CacheView::slot` for `T`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_on_avx512<T: Elem>(&self, task: usize) {
        use std::arch::x86_64::*;
        let c = self.cache;
        let hs = c.hs;
        let Task { row, head, n, q } = self.task(task);
        // SAFETY (all loads below): `p` points at 16 elements of type `T` inside a slot
        // (hs values, hs % 16 == 0).
        let load = |p: *const T| unsafe { load16(p) };
        let mut scores = Vec::with_capacity(n);
        let mut max = f32::NEG_INFINITY;
        for s in 0..n {
            let v = if self.seen(row, s) {
                // SAFETY: row < B, head < nh, s < n ≤ cap (the caller's contract).
                let k = unsafe { c.slot::<T>(c.k, row, head, s) };
                let mut acc = _mm512_setzero_ps();
                for i in (0..hs).step_by(16) {
                    // SAFETY: i + 16 ≤ hs = q.len() = k.len().
                    let (qv, kv) =
                        unsafe { (_mm512_loadu_ps(q.as_ptr().add(i)), load(k.as_ptr().add(i))) };
                    acc = _mm512_add_ps(acc, _mm512_mul_ps(qv, kv));
                }
                let mut lanes = [0f32; 16];
                // SAFETY: 16 f32 into a 16-element array.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
                tree_sum(lanes) * self.scale
            } else {
                f32::NEG_INFINITY
            };
            max = max.max(v);
            scores.push(v);
        }
        let total = softmax_weights(&mut scores, max, self.round_p);
        let mut acc = [0f32; 256];
        // The weighted sum of values, its accumulators in registers for the common head
        // sizes (a round trip through memory per slot was the loop's bottleneck).
        // SAFETY: avx512f (this function's contract); `values` as `slot` above.
        unsafe {
            let values = |s: usize| c.slot::<T>(c.v, row, head, s).as_ptr();
            match hs / 16 {
                1 => weigh::<T, 1>(&scores, values, &mut acc),
                2 => weigh::<T, 2>(&scores, values, &mut acc),
                4 => weigh::<T, 4>(&scores, values, &mut acc),
                _ => weigh::<T, 8>(&scores, values, &mut acc),
            }
        }
        self.write_out(row, head, &acc[..hs], total);
    }

    /// # Safety
    /// The CPU has avx2 and fma.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, task: usize) {
        self.run_any(task)
    }

    #[inline(always)]
    fn run_any(&self, task: usize) {
        // SAFETY: the cache holds bf16 bits when `bf16`, f32 otherwise (checked by
        // `Plan::step`), and nothing writes it while attention runs.
        if self.bf16 {
            unsafe { self.run_on::<u16>(task) }
        } else {
            unsafe { self.run_on::<f32>(task) }
        }
    }

    /// # Safety
    /// As `CacheView::slot`.
    #[inline(always)]
    unsafe fn run_on<T: Elem>(&self, task: usize) {
        let c = self.cache;
        let hs = c.hs;
        let Task { row, head, n, q } = self.task(task);
        // SAFETY: the caller's contract; row < B, head < nh, every s < n ≤ cap.
        let keys = (0..n).map(|s| unsafe { c.slot::<T>(c.k, row, head, s) });
        let values = (0..n).map(|s| unsafe { c.slot::<T>(c.v, row, head, s) });
        {
            // A local buffer, not a thread-local one: `LocalKey::with` would not inline,
            // and its closure would lose the caller's ISA.
            let mut scores = Vec::with_capacity(n);
            let mut max = f32::NEG_INFINITY;
            for (s, k) in keys.enumerate() {
                let v = if self.seen(row, s) {
                    dot(q, k) * self.scale
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(v);
                scores.push(v);
            }
            let total = softmax_weights(&mut scores, max, self.round_p);
            let mut acc = [0f32; 256];
            let acc = &mut acc[..hs];
            for (&p, v) in scores.iter().zip(values) {
                if p != 0.0 {
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a += p * v.f32();
                    }
                }
            }
            self.write_out(row, head, acc, total);
        }
    }

    /// Task `task`'s row, head, number of slots (the new one included) and query.
    #[inline(always)]
    fn task(&self, task: usize) -> Task<'_> {
        let (nh, hs) = (self.cache.nh, self.cache.hs);
        let (row, head) = (task / nh, task % nh);
        Task {
            row,
            head,
            n: self.slots[row] + 1,
            q: &self.qkv[row * 3 * nh * hs + head * hs..][..hs],
        }
    }

    /// Whether `row` attends to slot `s`: its valid slots, and always its own new one.
    #[inline(always)]
    fn seen(&self, row: usize, s: usize) -> bool {
        let slot = self.slots[row];
        s == slot || self.valid.map_or(true, |v| v[row * (slot + 1) + s] != 0)
    }

    /// The (row, head) output: the weighted sum of values `acc` (hs) over `total`.
    #[inline(always)]
    fn write_out(&self, row: usize, head: usize, acc: &[f32], total: f32) {
        let hs = self.cache.hs;
        let e = self.cache.nh * hs;
        // SAFETY: `out` holds rows × e values; [row·e + head·hs, + hs) is this task's
        // alone (one task per (row, head)).
        let out =
            unsafe { std::slice::from_raw_parts_mut(self.out.0.add(row * e + head * hs), hs) };
        for (o, a) in out.iter_mut().zip(acc) {
            *o = round(a / total, self.bf16);
        }
    }
}
/// One attention task: a row's head.
struct Task<'a> {
    row: usize,
    head: usize,
    /// Slots to attend over, the new one included.
    n: usize,
    q: &'a [f32],
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention on every ISA this CPU has gives the same bits as the portable code, in
    /// f32 and bf16, with a padding mask and a reordered slot table.
    #[test]
    fn attention_is_the_same_on_every_isa() {
        let (rows, nh, hs, cap, slot) = (3usize, 2usize, 64usize, 40usize, 33usize);
        let e = nh * hs;
        let mut seed = 7u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        let qkv: Vec<f32> = (0..rows * 3 * e).map(|_| rand()).collect();
        let mut k32: Vec<f32> = (0..rows * nh * cap * hs).map(|_| rand()).collect();
        let mut v32: Vec<f32> = (0..rows * nh * cap * hs).map(|_| rand()).collect();
        let mut k16: Vec<u16> = k32.iter().map(|&x| bf16_bits(x)).collect();
        let mut v16: Vec<u16> = v32.iter().map(|&x| bf16_bits(x)).collect();
        let valid: Vec<u8> = (0..rows * (slot + 1)).map(|i| (i % 7 != 3) as u8).collect();
        let table: Vec<u32> = (0..rows * cap)
            .map(|i| ((i / cap + i % 3) % rows) as u32)
            .collect();
        let mut isas = vec![Simd::Base];
        isas.extend([Simd::Avx2, Simd::Avx512].into_iter().filter(|&s| match s {
            Simd::Avx512 => Simd::detect() == Simd::Avx512,
            _ => Simd::detect() != Simd::Base,
        }));
        // A left-padded batch (all rows at one slot, a mask), and independent rows at
        // their own slots in other cache rows.
        let identity: Vec<usize> = (0..rows).collect();
        let uniform = vec![slot; rows];
        let (permuted, ragged) = (vec![2usize, 0, 1], vec![slot, 5, 20]);
        let layouts = [
            (Some(&valid[..]), &uniform, &identity),
            (None, &ragged, &permuted),
        ];
        for bf16 in [false, true] {
            for (slot_rows, (valid, slots, row_of)) in [None, Some(&table[..])]
                .into_iter()
                .flat_map(|t| layouts.iter().map(move |l| (t, *l)))
            {
                let (k, v) = if bf16 {
                    (
                        k16.as_mut_ptr() as *mut std::ffi::c_void,
                        v16.as_mut_ptr() as *mut std::ffi::c_void,
                    )
                } else {
                    (
                        k32.as_mut_ptr() as *mut std::ffi::c_void,
                        v32.as_mut_ptr() as *mut std::ffi::c_void,
                    )
                };
                let cache = CacheView {
                    k,
                    v,
                    slot_rows,
                    rows: row_of,
                    bf16,
                    nh,
                    cap,
                    hs,
                };
                let outs: Vec<Vec<f32>> = isas
                    .iter()
                    .map(|&simd| {
                        let mut out = vec![f32::NAN; rows * e];
                        let job = Attend {
                            cache: &cache,
                            qkv: &qkv,
                            out: SyncPtr(out.as_mut_ptr()),
                            valid,
                            slots,
                            scale: 0.125,
                            round_p: bf16,
                            bf16,
                            simd,
                        };
                        for t in 0..rows * nh {
                            job.run(t);
                        }
                        out
                    })
                    .collect();
                for (isa, out) in isas.iter().zip(&outs) {
                    assert!(out.iter().all(|x| x.is_finite()), "{isa:?}");
                    let same = out
                        .iter()
                        .zip(&outs[0])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} differs from the portable code (bf16 {bf16})");
                }
            }
        }
    }
}
