//! A packed layer's panels as bytes, to be written to a packed file, and a layer whose
//! panels are used in place from such a file's memory map (`crate::packed`). The panels
//! are the same bytes on every kernel path (`avx512`, `avx2`, `scalar` read one layout),
//! so a file written on one CPU runs on another; `LAYOUT` names the layout.
use std::sync::Arc;

use super::{Line, Lines, PackedLinear, WeightFormat, PANEL};
use crate::error::{Error, Result};
use crate::mapped::MappedFile;

/// The panel layout's version: bump it whenever `pack` writes other bytes for a weight.
pub const LAYOUT: u32 = 1;
/// Alignment of a layer's panels in a packed file: one line, as the kernels load them.
pub const ALIGN: usize = std::mem::align_of::<Line>();

impl PackedLinear {
    /// The packed panels' bytes (`weight_bytes()` of them).
    pub fn panel_bytes(&self) -> &[u8] {
        let lines: &[Line] = &self.lines;
        // SAFETY: `Line` is plain `[u32; 16]` (repr(C), no padding): its bytes are
        // initialised, and the slice covers exactly the lines' memory.
        unsafe {
            std::slice::from_raw_parts(lines.as_ptr() as *const u8, std::mem::size_of_val(lines))
        }
    }

    /// What a packed file keeps of this layer beside its panels: Int8Dynamic's per-column
    /// corrections 128·Σ_k q (`side_len` bytes, little-endian i32), nothing otherwise.
    /// (Scales and biases come from the weight file, as for a layer packed at start.)
    pub fn side_bytes(&self) -> Vec<u8> {
        match &self.dynamic {
            Some((corr, _)) => corr.iter().flat_map(|c| c.to_le_bytes()).collect(),
            None => Vec::new(),
        }
    }

    /// A layer (in → out) whose panels are bytes [at, at + `panel_len`) of `map`, used in
    /// place: no copy, the pages counted only once read; for Int8Dynamic its corrections
    /// (`side_bytes`) follow them. `scale` (one per output column) is required by the
    /// int8 formats and refused by the float ones; the bias is applied as the packers
    /// apply it. An error when the range does not lie in the map or is not aligned.
    pub fn from_mapped(
        format: WeightFormat,
        (k, n): (usize, usize),
        scale: Option<&[f32]>,
        bias: Option<&[f32]>,
        map: &Arc<MappedFile>,
        at: usize,
    ) -> Result<Self> {
        let int8 = matches!(format, WeightFormat::Int8 | WeightFormat::Int8Dynamic);
        let scale = match (int8, scale) {
            (true, Some(s)) => {
                super::check_len("scale", s.len(), n)?;
                s
            }
            (false, None) => &[],
            _ => {
                return Err(Error::Input(format!(
                    "a {format:?} layer from a packed file takes {} scale",
                    if int8 { "a" } else { "no" }
                )))
            }
        };
        let all = map.bytes();
        let (panels, side) = (panel_len(format, k, n), side_len(format, n));
        let fits = at
            .checked_add(panels + side)
            .is_some_and(|end| end <= all.len());
        if !fits || (all.as_ptr() as usize + at) % ALIGN != 0 {
            return Err(Error::ModelFolder {
                path: map.path().into(),
                reason: format!(
                    "a layer's panels ({} bytes at {at}) lie outside the file or off \
                     {ALIGN}-byte alignment",
                    panels + side
                ),
            });
        }
        let lines = |len: usize| {
            Ok(Lines::Mapped {
                // In bounds and aligned (checked above); read only.
                ptr: all[at..].as_ptr() as *const Line,
                len,
                _map: Arc::clone(map),
            })
        };
        let mut me = match format {
            // Int8's bias is added after the scale (`int8_post`), not in the sums.
            WeightFormat::Int8 => Self::with_lines(format, k, n, None, lines)?,
            _ => Self::with_lines(format, k, n, bias, lines)?,
        };
        let padded = |v: &[f32]| {
            let mut p = vec![0.0f32; me.n_panels * PANEL];
            p[..v.len()].copy_from_slice(v);
            p
        };
        match format {
            WeightFormat::Int8 => {
                if let Some(b) = bias {
                    super::check_len("bias", b.len(), n)?;
                }
                me.has_bias = bias.is_some();
                me.int8_post = Some((
                    scale.to_vec(),
                    bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec),
                ));
            }
            WeightFormat::Int8Dynamic => {
                let corr = all[at + panels..at + panels + side]
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                me.dynamic = Some((corr, padded(scale)));
            }
            WeightFormat::F32 | WeightFormat::Bf16 => {}
        }
        Ok(me)
    }
}

/// Bytes the panels of a `format` layer (in → out) take.
pub fn panel_len(format: WeightFormat, k: usize, n: usize) -> usize {
    let per_line = match format {
        WeightFormat::F32 => 1,
        WeightFormat::Bf16 => 2,
        WeightFormat::Int8 | WeightFormat::Int8Dynamic => 4,
    };
    n.div_ceil(PANEL) * k.div_ceil(per_line) * std::mem::size_of::<Line>()
}

/// Bytes a packed file keeps beside a `format` layer's panels (`side_bytes`), for `n`
/// output columns.
pub fn side_len(format: WeightFormat, n: usize) -> usize {
    match format {
        WeightFormat::Int8Dynamic => n.div_ceil(PANEL) * PANEL * std::mem::size_of::<i32>(),
        _ => 0,
    }
}
