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

    /// A float layer (F32 or Bf16, in → out) whose panels are bytes [at, at + its weight
    /// bytes) of `map`, used in place: no copy, the pages counted only once read. The
    /// bias is padded as `from_tensor_as` pads it. An error when the range does not lie
    /// in the map or is not aligned for the kernels.
    pub fn from_mapped(
        format: WeightFormat,
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
        map: &Arc<MappedFile>,
        at: usize,
    ) -> Result<Self> {
        if !matches!(format, WeightFormat::F32 | WeightFormat::Bf16) {
            return Err(Error::Input(format!(
                "a packed file holds F32 or Bf16 panels, not {format:?}"
            )));
        }
        Self::with_lines(format, k, n, bias, |len| {
            let bytes = len * std::mem::size_of::<Line>();
            let all = map.bytes();
            let fits = at.checked_add(bytes).is_some_and(|end| end <= all.len());
            if !fits || (all.as_ptr() as usize + at) % ALIGN != 0 {
                return Err(Error::ModelFolder {
                    path: map.path().into(),
                    reason: format!(
                        "a layer's panels ({bytes} bytes at {at}) lie outside the file or \
                         off {ALIGN}-byte alignment"
                    ),
                });
            }
            Ok(Lines::Mapped {
                // In bounds and aligned (checked above); read only.
                ptr: all[at..].as_ptr() as *const Line,
                len,
                _map: Arc::clone(map),
            })
        })
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
