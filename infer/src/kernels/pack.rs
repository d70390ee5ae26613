//! Packing weights into the kernels' panels (`PackedLinear`), once per tensor at load.
//!
//! The packers read the weight where it lies (a tensor over the checkpoint's memory map,
//! any strides: `wte.tr()` for the tied head is read in place, not copied first) and write
//! the panels on the kernels' pool, a few panels per task, into a buffer allocated zeroed
//! (fresh pages, faulted in by the thread that fills them, in huge pages where the kernel
//! allows). A float weight in one dtype can be packed in the other (fp32 on disk, bf16
//! run): each value is rounded as libtorch's `to(bfloat16)` rounds (to nearest even), so
//! the panels are those of the converted tensor without the converted tensor ever existing.
use std::alloc::{alloc_zeroed, handle_alloc_error, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use super::{check_len, Isa, Line, Lines, PackedLinear, ThreadPool, WeightFormat, PANEL};
use crate::error::{Error, Result};

/// bfloat16 bits of `v`, rounded to nearest even as c10's `round_to_nearest_even`
/// (NaN to the canonical quiet NaN).
pub fn round_bf16(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7fc0;
    }
    let u = v.to_bits();
    (u.wrapping_add(((u >> 16) & 1) + 0x7fff) >> 16) as u16
}

/// A stored float: fp32, or bf16 as its bits.
trait Elem: Copy + Sync {
    fn f32_bits(self) -> u32;
    fn bf16_bits(self) -> u16;
}

impl Elem for f32 {
    fn f32_bits(self) -> u32 {
        self.to_bits()
    }
    fn bf16_bits(self) -> u16 {
        round_bf16(self)
    }
}

impl Elem for u16 {
    fn f32_bits(self) -> u32 {
        (self as u32) << 16
    }
    fn bf16_bits(self) -> u16 {
        self
    }
}

/// W (in, out) as the packer reads it: element (i, c) at `data[i * si + c * sc]`.
#[derive(Clone, Copy)]
struct Strided<'a, T> {
    data: &'a [T],
    si: usize,
    sc: usize,
}

impl<T: Copy> Strided<'_, T> {
    #[inline]
    fn at(&self, i: usize, c: usize) -> T {
        self.data[i * self.si + c * self.sc]
    }
}

/// The int8-dynamic corrections, shared as the lines are (`int8_dynamic`).
#[derive(Clone, Copy)]
struct CorrPtr(*mut i32);
// SAFETY: as `LinesPtr`: each task writes its own panels' entries only.
unsafe impl Send for CorrPtr {}
unsafe impl Sync for CorrPtr {}

impl CorrPtr {
    /// # Safety
    /// As `pointer::add`; the caller alone writes entry `i`.
    unsafe fn set(&self, i: usize, v: i32) {
        unsafe { *self.0.add(i) = v };
    }
}

/// The lines buffer, shared by the tasks of one packing call.
#[derive(Clone, Copy)]
struct LinesPtr(*mut Line);
// SAFETY: each task writes the lines of its own panels only (`fill`), and `ThreadPool::run`
// returns after every task, while the buffer is still borrowed mutably by `fill`.
unsafe impl Send for LinesPtr {}
unsafe impl Sync for LinesPtr {}

/// A CPU int8 tensor (out, in) of any strides as the packers read it (in, out), with
/// its k (in) and n (out).
fn int8_view(q: &Tensor) -> Result<(Strided<'_, i8>, usize, usize)> {
    let size = q.size();
    if size.len() != 2 || q.device() != Device::Cpu || q.kind() != Kind::Int8 {
        return Err(Error::Input(format!(
            "an int8 weight packs from a 2-D CPU Int8 tensor, got {:?} {size:?} on {:?}",
            q.kind(),
            q.device()
        )));
    }
    let (n, k) = (size[0] as usize, size[1] as usize);
    let (sc, si) = (q.stride()[0] as usize, q.stride()[1] as usize);
    let data: &[i8] = match k * n {
        0 => &[],
        // SAFETY: a CPU Int8 tensor of these sizes and (non-negative) strides reaches this
        // many elements from its data pointer, alive (borrowed) as long as `q` and not
        // written while the packers read it.
        _ => unsafe {
            std::slice::from_raw_parts(q.data_ptr() as *const i8, (k - 1) * si + (n - 1) * sc + 1)
        },
    };
    Ok((Strided { data, si, sc }, k, n))
}

/// Whether any byte of `lines` is 0x80 (an int8 -128), a word at a time: x = w ^ 0x80..
/// has a zero byte exactly where w has 0x80, and (x - 0x01..) & !x & 0x80.. marks one.
fn holds_byte_min(lines: &[Line]) -> bool {
    lines.iter().flat_map(|l| l.0).fold(false, |any, w| {
        let x = w ^ 0x8080_8080;
        any | (x.wrapping_sub(0x0101_0101) & !x & 0x8080_8080 != 0)
    })
}

/// Buffers from this many bytes on get a mapping of their own.
const OWN_MAPPING_BYTES: usize = 1 << 20;

/// `n` zeroed lines, in pages that nothing has touched yet (and huge ones where allowed),
/// which the threads that fill them fault in. A large buffer is an anonymous mapping of
/// its own: from the heap (glibc serves requests below its dynamic mmap threshold, up to
/// 32 MB, from freed memory) `calloc` would zero it on this thread first.
fn zeroed_lines(n: usize) -> Result<Lines> {
    if n == 0 {
        return Ok(Lines::Owned(Vec::new()));
    }
    let layout = Layout::array::<Line>(n)
        .map_err(|_| Error::Input(format!("PackedLinear of {n} lines is too large")))?;
    #[cfg(target_os = "linux")]
    if layout.size() >= OWN_MAPPING_BYTES {
        // SAFETY: a fresh private anonymous mapping (zero-filled, page aligned, so aligned
        // for `Line`); failure is handled.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            handle_alloc_error(layout);
        }
        // SAFETY: the advice changes no contents of this mapping.
        unsafe { libc::madvise(ptr, layout.size(), libc::MADV_HUGEPAGE) };
        return Ok(Lines::Anonymous {
            ptr: ptr as *mut Line,
            len: n,
        });
    }
    // SAFETY: the layout is non-zero in size; a null result is handled.
    let ptr = unsafe { alloc_zeroed(layout) } as *mut Line;
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    // SAFETY: allocated by the global allocator with `Layout::array::<Line>(n)`, all zero
    // bytes, which is a valid `Line`; length and capacity `n`.
    Ok(Lines::Owned(unsafe { Vec::from_raw_parts(ptr, n, n) }))
}

impl PackedLinear {
    /// Packs an fp32 weight, row-major (in, out), as `Conv1D` stores it.
    pub fn from_f32(w: &[f32], k: usize, n: usize, bias: Option<&[f32]>) -> Result<Self> {
        Self::from_row_major(w, k, n, bias, WeightFormat::F32)
    }

    /// Packs a bf16 weight given as its raw bits, row-major (in, out).
    pub fn from_bf16_bits(w: &[u16], k: usize, n: usize, bias: Option<&[f32]>) -> Result<Self> {
        Self::from_row_major(w, k, n, bias, WeightFormat::Bf16)
    }

    fn from_row_major<T: Elem>(
        w: &[T],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
        format: WeightFormat,
    ) -> Result<Self> {
        check_len("weight", w.len(), k * n)?;
        let mut me = Self::empty(format, k, n, bias)?;
        me.fill_float(Strided {
            data: w,
            si: n,
            sc: 1,
        });
        Ok(me)
    }

    /// Packs a CPU tensor of shape (in, out), Float or BFloat16 (which sets the format),
    /// plus an optional bias (out) of any float kind. Any strides (`wte.tr()` for the
    /// tied head is read in place).
    pub fn from_tensor(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let format = match w.kind() {
            Kind::BFloat16 => WeightFormat::Bf16,
            _ => WeightFormat::F32,
        };
        Self::from_tensor_as(w, bias, format)
    }

    /// As `from_tensor`, packed in `format` (F32 or Bf16) whichever float kind `w` is:
    /// fp32 values are rounded to bf16 as libtorch's conversion rounds them.
    pub fn from_tensor_as(w: &Tensor, bias: Option<&Tensor>, format: WeightFormat) -> Result<Self> {
        let size = w.size();
        if size.len() != 2 || w.device() != Device::Cpu {
            return Err(Error::Input(format!(
                "PackedLinear needs a 2-D CPU weight (in, out), got {size:?} on {:?}",
                w.device()
            )));
        }
        if !matches!(format, WeightFormat::F32 | WeightFormat::Bf16) {
            return Err(Error::Input(format!(
                "a float weight packs as F32 or Bf16, not {format:?}"
            )));
        }
        let (k, n) = (size[0] as usize, size[1] as usize);
        let bias = match bias {
            Some(b) => {
                if b.size() != [n as i64] || b.device() != Device::Cpu {
                    return Err(Error::Input(format!(
                        "PackedLinear bias must be a CPU tensor of shape [{n}], got {:?}",
                        b.size()
                    )));
                }
                Some(Vec::<f32>::try_from(b.to_kind(Kind::Float).contiguous())?)
            }
            None => None,
        };
        let mut me = Self::empty(format, k, n, bias.as_deref())?;
        if k == 0 || n == 0 {
            return Ok(me);
        }
        let (si, sc) = (w.stride()[0] as usize, w.stride()[1] as usize);
        let len = (k - 1) * si + (n - 1) * sc + 1;
        let ptr = w.data_ptr();
        match w.kind() {
            Kind::Float => {
                // SAFETY: a CPU Float tensor of these sizes and (non-negative) strides
                // reaches `len` elements from its data pointer, aligned for f32, alive
                // (borrowed) for this call and not written during it.
                let data = unsafe { std::slice::from_raw_parts(ptr as *const f32, len) };
                me.fill_float(Strided { data, si, sc });
            }
            Kind::BFloat16 => {
                // SAFETY: as above, for 2-byte bf16 values read as their bits.
                let data = unsafe { std::slice::from_raw_parts(ptr as *const u16, len) };
                me.fill_float(Strided { data, si, sc });
            }
            other => {
                return Err(Error::Input(format!(
                    "PackedLinear packs Float or BFloat16 weights, got {other:?}"
                )))
            }
        }
        Ok(me)
    }

    /// Fills every panel of an F32 or Bf16 layout from `w`, on the pool. A line of F32
    /// holds one input row's 16 columns; a line of Bf16 two rows', row 2l in the low half
    /// of each u32 and 2l + 1 in the high half (a shift and a mask then widen both).
    fn fill_float<T: Elem>(&mut self, w: Strided<T>) {
        let (k, n, bf16) = (
            self.in_features,
            self.out_features,
            self.format == WeightFormat::Bf16,
        );
        // NaN or ±inf among the stored values (all exponent bits set), noted as they are
        // read: the loader's finite check, which packing spares a scan of its own. In
        // bf16, also a finite f32 beyond bf16's range, which rounds to ±inf.
        let non_finite = AtomicBool::new(false);
        let bad = |v: T| {
            v.f32_bits() & 0x7f80_0000 == 0x7f80_0000 || bf16 && v.bf16_bits() & 0x7f80 == 0x7f80
        };
        self.fill(&|p, lines: &mut [Line]| {
            let (c0, cols) = (p * PANEL, (n - p * PANEL).min(PANEL));
            if w.sc != 1 {
                // Columns stored contiguously (the head, read from wte's rows): each
                // column's k values are read in order, written one lane per line.
                let mut any = false;
                for c in 0..cols {
                    for i in 0..k {
                        let v = w.at(i, c0 + c);
                        any |= bad(v);
                        match bf16 {
                            false => lines[i].0[c] = v.f32_bits(),
                            true => lines[i / 2].0[c] |= (v.bf16_bits() as u32) << (16 * (i % 2)),
                        }
                    }
                }
                if any {
                    non_finite.store(true, Ordering::Relaxed);
                }
                return;
            }
            // Rows stored contiguously (Conv1D's (in, out)): a line reads 16 consecutive
            // values of one row (two rows in bf16), which vectorises.
            let row = |i: usize| &w.data[i * w.si + c0..i * w.si + c0 + cols];
            let mut any = false;
            for (l, line) in lines.iter_mut().enumerate() {
                if !bf16 {
                    for (d, &v) in line.0.iter_mut().zip(row(l)) {
                        any |= bad(v);
                        *d = v.f32_bits();
                    }
                } else if 2 * l + 1 < k {
                    for ((d, &a), &b) in line.0.iter_mut().zip(row(2 * l)).zip(row(2 * l + 1)) {
                        any |= bad(a) | bad(b);
                        *d = a.bf16_bits() as u32 | (b.bf16_bits() as u32) << 16;
                    }
                } else {
                    for (d, &a) in line.0.iter_mut().zip(row(2 * l)) {
                        any |= bad(a);
                        *d = a.bf16_bits() as u32;
                    }
                }
            }
            if any {
                non_finite.store(true, Ordering::Relaxed);
            }
        });
        self.held_non_finite = non_finite.into_inner();
    }

    /// Runs `panel(p, lines of panel p)` for every panel, a few panels per task.
    fn fill(&mut self, panel: &(dyn Fn(usize, &mut [Line]) + Sync)) {
        let (n_panels, lpp) = (self.n_panels, self.lines_per_panel);
        if n_panels == 0 || lpp == 0 {
            return;
        }
        let per_task = n_panels.div_ceil(4 * self.pool.threads()).max(1);
        let lines = LinesPtr(self.lines.owned_mut().as_mut_ptr());
        let task = |t: usize| {
            let lines = &lines;
            for p in t * per_task..((t + 1) * per_task).min(n_panels) {
                // SAFETY: panel p's lines [p * lpp, (p + 1) * lpp) lie in the buffer
                // (n_panels * lpp lines) and belong to this task alone.
                let mine = unsafe { std::slice::from_raw_parts_mut(lines.0.add(p * lpp), lpp) };
                panel(p, mine);
            }
        };
        self.pool.run(n_panels.div_ceil(per_task), &task);
    }

    /// Packs an int8 weight given as rows per output column, (out, in) row-major, with
    /// one scale per output column: y = (x·qᵀ)·scale + bias.
    pub fn from_int8_rows(
        q: &[i8],
        scale: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        check_len("weight", q.len(), k * n)?;
        Self::int8(
            Strided {
                data: q,
                si: 1,
                sc: k,
            },
            scale,
            k,
            n,
            bias,
        )
    }

    /// `from_int8_rows` for a CPU int8 tensor (out, in) of any strides, read where it
    /// lies (`from_int8_tensor_dynamic`).
    pub fn from_int8_tensor(q: &Tensor, scale: &[f32], bias: Option<&[f32]>) -> Result<Self> {
        let (w, k, n) = int8_view(q)?;
        Self::int8(w, scale, k, n, bias)
    }

    /// The Int8 panels of `w` (in, out): line l of a panel holds input rows 4l..4l+3, 16
    /// bytes each (one per column), on the pool.
    fn int8(
        w: Strided<i8>,
        scale: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        check_len("scale", scale.len(), n)?;
        if let Some(b) = bias {
            check_len("bias", b.len(), n)?;
        }
        let mut me = Self::empty(WeightFormat::Int8, k, n, None)?;
        let min = AtomicBool::new(false);
        me.fill(&|p, panel: &mut [Line]| {
            let c0 = p * PANEL;
            let cols = (n - c0).min(PANEL);
            for (l, line) in panel.iter_mut().enumerate() {
                let mut bytes = [0u8; 64];
                for i in 0..4.min(k - 4 * l) {
                    let row = 4 * l + i;
                    let out = &mut bytes[16 * i..16 * i + cols];
                    if w.sc == 1 {
                        // (in, out) rows: the line's 16 bytes of row `row` as they lie
                        let src = &w.data[row * w.si + c0..row * w.si + c0 + cols];
                        out.iter_mut().zip(src).for_each(|(d, &v)| *d = v as u8);
                    } else {
                        for (c, d) in out.iter_mut().enumerate() {
                            *d = w.at(row, c0 + c) as u8;
                        }
                    }
                }
                for (j, v) in line.0.iter_mut().enumerate() {
                    let b = &bytes[4 * j..4 * j + 4];
                    *v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            if holds_byte_min(panel) {
                min.store(true, Ordering::Relaxed);
            }
        });
        me.held_min = min.into_inner();
        me.has_bias = bias.is_some();
        me.int8_post = Some((
            scale.to_vec(),
            bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec),
        ));
        Ok(me)
    }

    /// Packs an int8 weight, (out, in) row-major (gpt2kit's artifacts hold [-127, 127];
    /// any i8 is exact), and one scale per output column, for W8A8: each call quantizes
    /// x per row and computes y = (xq·qᵀ)·s_x·scale + bias exactly as
    /// `quant::Int8Linear` does (see `WeightFormat::Int8Dynamic`).
    pub fn from_int8_rows_dynamic(
        q: &[i8],
        scale: &[f32],
        in_features: usize,
        out_features: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        check_len("weight", q.len(), in_features * out_features)?;
        let w = Strided {
            data: q,
            si: 1,
            sc: in_features,
        };
        Self::int8_dynamic(w, scale, in_features, out_features, bias)
    }

    /// `from_int8_rows_dynamic` for a CPU int8 tensor (out, in) of any strides, read where
    /// it lies: an artifact's Conv1D weight is stored (in, out), and its transposed view
    /// over the mapped file is packed without a transposed copy.
    pub fn from_int8_tensor_dynamic(
        q: &Tensor,
        scale: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let (w, k, n) = int8_view(q)?;
        Self::int8_dynamic(w, scale, k, n, bias)
    }

    /// The W8A8 panels (`vnni`) of `w` (in, out), filled on the pool: line l of a panel
    /// holds, in column c's lane, the bytes q[c][4l..4l+3]; and corr[c] = 128·Σ_k q[c][k].
    fn int8_dynamic(
        w: Strided<i8>,
        scale: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        check_len("scale", scale.len(), n)?;
        let mut me = Self::empty(WeightFormat::Int8Dynamic, k, n, bias)?;
        let mut corr = vec![0i32; me.n_panels * PANEL];
        let sums = CorrPtr(corr.as_mut_ptr());
        let min = AtomicBool::new(false);
        me.fill(&|p, lines: &mut [Line]| {
            let (c0, cols) = (p * PANEL, (n - p * PANEL).min(PANEL));
            let mut sum = [0i32; PANEL];
            for (l, line) in lines.iter_mut().enumerate() {
                // each line is written once, whole (a fresh page is then faulted once)
                let mut acc = [0u32; PANEL];
                for j in 0..4.min(k - 4 * l) {
                    let i = 4 * l + j;
                    let put = |(d, s): (&mut u32, &mut i32), v: i8| {
                        *d |= u32::from(v as u8) << (8 * j);
                        *s += i32::from(v);
                    };
                    if w.sc == 1 {
                        // (in, out) rows: 16 consecutive bytes of row i, which vectorises
                        let row = &w.data[i * w.si + c0..i * w.si + c0 + cols];
                        acc.iter_mut()
                            .zip(&mut sum)
                            .zip(row)
                            .for_each(|(ds, &v)| put(ds, v));
                    } else {
                        for (c, ds) in acc.iter_mut().zip(&mut sum).take(cols).enumerate() {
                            put(ds, w.at(i, c0 + c));
                        }
                    }
                }
                line.0 = acc;
            }
            for (c, s) in sum.iter().take(cols).enumerate() {
                // SAFETY: panel p's entries [c0, c0 + cols) of corr (n_panels · PANEL
                // values) belong to this task alone; `corr` outlives `fill`.
                unsafe { sums.set(c0 + c, s.wrapping_mul(128)) };
            }
            if holds_byte_min(lines) {
                min.store(true, Ordering::Relaxed);
            }
        });
        me.held_min = min.into_inner();
        let mut padded = vec![0.0f32; me.n_panels * PANEL];
        padded[..n].copy_from_slice(scale);
        me.dynamic = Some((corr, padded));
        Ok(me)
    }

    pub(super) fn empty(
        format: WeightFormat,
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        Self::with_lines(format, k, n, bias, |len| zeroed_lines(len))
    }

    /// A layer of this shape whose panels are `lines(n_panels * lines_per_panel)`.
    pub(super) fn with_lines(
        format: WeightFormat,
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
        lines: impl FnOnce(usize) -> Result<Lines>,
    ) -> Result<Self> {
        let n_panels = n.div_ceil(PANEL);
        let lines_per_panel = match format {
            WeightFormat::F32 => k,
            WeightFormat::Bf16 => k.div_ceil(2),
            WeightFormat::Int8 | WeightFormat::Int8Dynamic => k.div_ceil(4),
        };
        let mut padded = vec![0.0f32; n_panels * PANEL];
        if let Some(b) = bias {
            check_len("bias", b.len(), n)?;
            padded[..n].copy_from_slice(b);
        }
        Ok(PackedLinear {
            in_features: k,
            out_features: n,
            format,
            n_panels,
            lines_per_panel,
            lines: lines(n_panels * lines_per_panel)?,
            bias: padded,
            has_bias: bias.is_some(),
            int8_post: None,
            dynamic: None,
            held_min: false,
            held_non_finite: false,
            isa: Isa::detect(),
            pool: ThreadPool::global(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_libtorchs() {
        // Ties to even both ways, carries into the exponent, the largest finite values,
        // infinities, subnormals and zeros, against libtorch's own conversion.
        let mut v: Vec<f32> = [
            0x3f80_8000u32,
            0x3f81_8000,
            0x3f80_7fff,
            0x3f80_8001,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x0000_0001,
            0x8000_8000,
            0x0001_8000,
            0x0000_0000,
            0x8000_0000,
            0x3fff_ffff,
        ]
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect();
        let mut x = 0x1234_5678u32;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if !f32::from_bits(x).is_nan() {
                v.push(f32::from_bits(x));
            }
        }
        let want = Tensor::from_slice(&v)
            .to_kind(Kind::BFloat16)
            .view_dtype(Kind::Int16);
        let want = Vec::<i16>::try_from(want).unwrap();
        for (x, w) in v.iter().zip(want) {
            assert_eq!(round_bf16(*x), w as u16, "{x:e} ({:#x})", x.to_bits());
        }
    }
}
