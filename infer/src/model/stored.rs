//! A loaded model's linears packed once and kept (`crate::packed`): at load, the packed
//! file of its folder and run format is mapped and its panels used in place; without one
//! (or with a stale one), the layers are packed as usual and the file written for the
//! next run (at load, or later by the caller: `EngineOptions::packed_write_later`).
use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::Gpt2;
use crate::error::Result;
use crate::kernels::{PackedLinear, WeightFormat};
use crate::linear::Linear;
use crate::mapped::MappedFile;
use crate::options::EngineOptions;
use crate::packed::{Layer, Store};

/// The name the head has in a packed file.
const HEAD: &str = "lm_head";

impl Gpt2 {
    /// `pack_for_cpu_decode` at load (see `pack_with`), from the packed file kept for
    /// `dir` when `cache` allows one: mapped when valid, else written after packing.
    pub(crate) fn pack_loaded(&mut self, dir: &Path, options: &EngineOptions) -> Result<()> {
        let files = std::mem::take(&mut self.files);
        let store = match self.packed_format() {
            Some(format) => Store::new(dir, format, &options.packed_cache, &files)?,
            None => None,
        };
        let want = self.packed_shapes();
        if let Some((map, layers)) = store.as_ref().and_then(|s| s.open(&want)) {
            let attached = self.attach(&map, &layers);
            self.files = files;
            // Checked with the weight files (`check_files`).
            self.files.push(map);
            return attached;
        }
        let packed = self.pack_with(&files);
        self.files = files;
        packed?;
        match store {
            Some(s) if options.packed_write_later => self.packed_wanted = !s.being_written(),
            Some(s) => s.save(&self.packed_layers()),
            None => {}
        }
        Ok(())
    }

    /// Whether this model was loaded without the packed file that its options asked for,
    /// and left it unwritten (`EngineOptions::packed_write_later`), nor is another
    /// process writing it now.
    pub fn packed_file_wanted(&self) -> bool {
        self.packed_wanted
    }

    /// The kernels' format when every linear is float and unpacked on one CPU device in
    /// f32 or bf16 (int8 artifacts are packed at every start for now).
    fn packed_format(&self) -> Option<WeightFormat> {
        let format = match self.kind {
            Kind::Float => WeightFormat::F32,
            Kind::BFloat16 => WeightFormat::Bf16,
            _ => return None,
        };
        let float = self
            .linears()
            .all(|(_, _, l)| matches!(l, Linear::Float { .. }));
        let head = matches!(self.head, Linear::Rows { packed: None, .. });
        (self.devices == [Device::Cpu] && float && head).then_some(format)
    }

    /// (name, in, out) of every layer a packed file holds, in its order.
    fn packed_shapes(&self) -> Vec<(String, usize, usize)> {
        let mut out: Vec<_> = self
            .linears()
            .filter_map(|(l, name, x)| match x {
                Linear::Float { weight, .. } => {
                    let s = weight.size();
                    Some((format!("h.{l}.{name}"), s[0] as usize, s[1] as usize))
                }
                _ => None,
            })
            .collect();
        if let Linear::Rows { weight, .. } = &self.head {
            let s = weight.size();
            out.push((HEAD.into(), s[1] as usize, s[0] as usize));
        }
        out
    }

    /// The packed layers by name, in `packed_shapes`'s order.
    fn packed_layers(&self) -> Vec<(String, &PackedLinear)> {
        let mut out: Vec<_> = self
            .linears()
            .filter_map(|(l, name, x)| match x {
                Linear::Packed { packed, .. } => Some((format!("h.{l}.{name}"), packed)),
                _ => None,
            })
            .collect();
        if let Linear::Rows {
            packed: Some(p), ..
        } = &self.head
        {
            out.push((HEAD.into(), p));
        }
        out
    }

    /// Every linear and the head over the panels of `map` at `layers`' offsets (the file
    /// was checked to list exactly `packed_shapes`, in order).
    fn attach(&mut self, map: &Arc<MappedFile>, layers: &[Layer]) -> Result<()> {
        let format = self
            .packed_format()
            .expect("checked before the file was opened");
        let mut at = layers.iter();
        for (_, _, l) in self.linears_mut() {
            let Linear::Float { weight, bias } = std::mem::replace(
                l,
                Linear::Float {
                    weight: Tensor::new(),
                    bias: None,
                },
            ) else {
                unreachable!("packed_format checked every linear is float");
            };
            let layer = at.next().expect("one layer per linear");
            let b = match &bias {
                Some(b) => Some(Vec::<f32>::try_from(b.to_kind(Kind::Float).contiguous())?),
                None => None,
            };
            let packed =
                PackedLinear::from_mapped(format, layer.k, layer.n, b.as_deref(), map, layer.at)?;
            *l = Linear::Packed {
                weight,
                bias,
                packed,
            };
        }
        let layer = at.next().expect("the head's layer");
        if let Linear::Rows { packed, .. } = &mut self.head {
            *packed = Some(PackedLinear::from_mapped(
                format, layer.k, layer.n, None, map, layer.at,
            )?);
        }
        self.set_fused_decode(true);
        Ok(())
    }
}
