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
use crate::packed::{format_name, Layer, Store};

impl Gpt2 {
    /// `pack_for_cpu_decode` at load (see `pack_with`), from the packed file kept for
    /// `dir` when `cache` allows one: mapped when valid, else written after packing.
    pub(crate) fn pack_loaded(&mut self, dir: &Path, options: &EngineOptions) -> Result<()> {
        let files = std::mem::take(&mut self.files);
        let store = match self.packed_formats() {
            Some(formats) => {
                Store::new(dir, &store_format(formats), &options.packed_cache, &files)?
            }
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
        // Weights that fail the checks made while packing (`Gpt2::check_deferred` reports
        // them) must not leave a file that a later run would map without checking.
        let flawed = self
            .packed_layers()
            .iter()
            .any(|(_, p)| p.held_non_finite() || p.held_int8_min());
        match store.filter(|_| !flawed) {
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

    /// The kernels' format of the linears (one for all) and of the head, when every
    /// layer packs (float, or an int8 artifact's int8 layers without outlier columns)
    /// and none is packed yet, on one CPU device in f32 or bf16.
    fn packed_formats(&self) -> Option<(WeightFormat, WeightFormat)> {
        let float = match self.kind {
            Kind::Float => WeightFormat::F32,
            Kind::BFloat16 => WeightFormat::Bf16,
            _ => return None,
        };
        if self.devices != [Device::Cpu] {
            return None;
        }
        let format = |l: &Linear| match l {
            Linear::Float { .. } | Linear::Rows { packed: None, .. } => Some(float),
            Linear::Int8(q) if q.packs() => Some(WeightFormat::Int8Dynamic),
            Linear::Int8Weight { packed: None, .. } => Some(WeightFormat::Int8),
            _ => None,
        };
        let head = format(&self.head)?;
        let mut formats = self.linears().map(|(_, _, l)| format(l));
        let first = formats.next().flatten()?;
        formats.all(|f| f == Some(first)).then_some((first, head))
    }

    /// (name, format, in, out) of every layer a packed file holds, in its order.
    fn packed_shapes(&self) -> Vec<(String, WeightFormat, usize, usize)> {
        let Some((linear, head)) = self.packed_formats() else {
            return Vec::new();
        };
        let in_out = |x: &Linear| {
            let (k, n) = match x {
                // Conv1D's (in, out)
                Linear::Float { weight, .. } => (weight.size()[0], weight.size()[1]),
                // (out, in): rows, or views of Conv1D's (in, out)
                Linear::Rows { weight, .. } => (weight.size()[1], weight.size()[0]),
                Linear::Int8(q) => (q.w.q.size()[1], q.w.q.size()[0]),
                Linear::Int8Weight { w, .. } => (w.q.size()[1], w.q.size()[0]),
                _ => return None,
            };
            Some((k as usize, n as usize))
        };
        let mut out: Vec<_> = self
            .linears()
            .filter_map(|(l, name, x)| {
                let (k, n) = in_out(x)?;
                Some((format!("h.{l}.{name}"), linear, k, n))
            })
            .collect();
        if let Some((k, n)) = in_out(&self.head) {
            out.push((self.head_name().into(), head, k, n));
        }
        out
    }

    /// Bytes of weight that the model reads at every step in place from the files it
    /// maps (a packed file's panels, a GGUF file's blocks, tensors that are views of a
    /// safetensors mapping): page cache, which the kernel counts as available memory
    /// although the model needs it resident. Panels packed at start are not counted
    /// (anonymous memory, already in use).
    pub fn mapped_weight_bytes(&self) -> usize {
        let maps: Vec<&[u8]> = self.files.iter().map(|f| f.bytes()).collect();
        // `len` bytes from address `at`, when they start inside a mapping.
        let inside = |at: usize, len: usize| {
            let hit = maps.iter().any(|m| {
                let start = m.as_ptr() as usize;
                at >= start && at < start + m.len()
            });
            if hit {
                len
            } else {
                0
            }
        };
        let mapped = |b: &[u8]| inside(b.as_ptr() as usize, b.len());
        let tensor = |t: &Tensor| match t.defined() && t.device() == Device::Cpu {
            true => inside(
                t.data_ptr() as usize,
                t.numel() * t.kind().elt_size_in_bytes(),
            ),
            false => 0,
        };
        let one = |l: &Linear| match (l.packed(), l) {
            (Some(p), _) => mapped(p.panel_bytes()),
            (None, Linear::Int8(q)) => tensor(&q.w.q),
            (None, Linear::Float { weight, .. } | Linear::Rows { weight, .. }) => tensor(weight),
            (None, Linear::Int8Weight { w, .. }) => tensor(&w.q),
            (None, Linear::Blocks(b)) => mapped(b.block_bytes()),
            _ => 0,
        };
        self.linears().map(|(_, _, l)| one(l)).sum::<usize>() + one(&self.head)
    }

    /// The name the head has in a packed file: the tensor it is packed from (`wte` when
    /// tied), so that a config.json switching `tie_word_embeddings` over weights that
    /// hold both makes the file's layers another model's.
    fn head_name(&self) -> &'static str {
        match self.config.tie_word_embeddings {
            true => "wte",
            false => "lm_head",
        }
    }

    /// The packed layers by name, in `packed_shapes`'s order.
    fn packed_layers(&self) -> Vec<(String, &PackedLinear)> {
        let mut out: Vec<_> = self
            .linears()
            .filter_map(|(l, name, x)| Some((format!("h.{l}.{name}"), x.packed()?)))
            .collect();
        out.extend(self.head.packed().map(|p| (self.head_name().into(), p)));
        out
    }

    /// Every linear and the head over the panels of `map` at `layers`' offsets (the file
    /// was checked to list exactly `packed_shapes`, in order).
    fn attach(&mut self, map: &Arc<MappedFile>, layers: &[Layer]) -> Result<()> {
        let (format, head_format) = self
            .packed_formats()
            .expect("checked before the file was opened");
        let mut at = layers.iter();
        for (_, _, l) in self.linears_mut() {
            attach(l, format, at.next().expect("one layer per linear"), map)?;
        }
        let layer = at.next().expect("the head's layer");
        attach(&mut self.head, head_format, layer, map)?;
        self.set_fused_decode(true);
        Ok(())
    }
}

/// `l` (one that `packed_formats` found to pack in `format`) over the panels of `layer`.
fn attach(
    l: &mut Linear,
    format: WeightFormat,
    layer: &Layer,
    map: &Arc<MappedFile>,
) -> Result<()> {
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous())?)
    };
    let mapped = |scale: Option<&[f32]>, bias: Option<&[f32]>| {
        PackedLinear::from_mapped(format, (layer.k, layer.n), scale, bias, map, layer.at)
    };
    match l {
        Linear::Rows { packed, .. } => *packed = Some(mapped(None, None)?),
        Linear::Float { weight, bias } => {
            let b = bias.as_ref().map(host).transpose()?;
            let packed = mapped(None, b.as_deref())?;
            let (weight, bias) = (std::mem::take(weight), bias.take());
            *l = Linear::Packed {
                weight,
                bias,
                packed,
            };
        }
        Linear::Int8(q) => q.pack_from(|scale, bias| mapped(Some(scale), Some(bias)))?,
        Linear::Int8Weight { w, bias, packed } => {
            let b = bias.as_ref().map(host).transpose()?;
            *packed = Some(mapped(Some(&host(&w.scale)?), b.as_deref())?);
        }
        _ => unreachable!("packed_formats checked that every layer packs"),
    }
    Ok(())
}

/// The run format a packed file is named by: the linears' format, then the head's when
/// it differs (an int8 artifact's head runs in f32 or bf16).
fn store_format((linear, head): (WeightFormat, WeightFormat)) -> String {
    match linear == head {
        true => format_name(head).into(),
        false => format!("{}-{}", format_name(linear), format_name(head)),
    }
}
