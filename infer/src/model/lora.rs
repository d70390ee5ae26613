//! LoRA adapters kept apart from the base weights, several on one model, chosen per
//! sequence (vLLM's multi-LoRA serving; S-LoRA, Sheng et al. 2023; punica): the base is
//! loaded and packed once, each KV-cache row names the adapter it runs with
//! (`KvCache::set_adapter`), and a step's rows with different adapters run together.
//! Each targeted linear computes the base output for every row, then adds to each
//! adapted row `(x·Aᵀ)·Bᵀ · alpha/r` (peft's `LoraLayer.forward`, unmerged), in f32
//! from the f32 A and B kept here. Both backends (libtorch tensors and the fused CPU
//! step) add it with the same per-row routine (`Site::add_row`), so a row's values do
//! not depend on what runs beside it.
//!
//! Against the merged weights (`adapter::Lora::merge_into`, x·(W + ΔW)) the result
//! differs by rounding only: x·W + (x·Aᵀ)·Bᵀ·s sums in another order.
use tch::{Kind, Tensor};

use super::{Gpt2, Site};
use crate::adapter::{Lora, MODULES};
use crate::error::{Error, Result};

/// One targeted layer's adapter: A (r, in) and Bᵀ (r, out) as f32 rows, row-major (B
/// transposed so that adding its term runs along the output, in SIMD lanes).
struct Pair {
    a: Vec<f32>,
    bt: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

/// One adapter held beside the base: its scaling and, per linear (`Site::index`), its
/// pair or `None` where it does not target the layer.
pub(crate) struct Served {
    scaling: f32,
    sites: Vec<Option<Pair>>,
}

impl Served {
    fn pair(&self, site: Site) -> Option<&Pair> {
        self.sites.get(site.index())?.as_ref()
    }
}

impl Site {
    /// Adds row `x` (in)'s adapter term to `out` (out): u = x·Aᵀ·s (r values), then
    /// out += Σ_j u_j · Bᵀ_j. An untargeted layer: nothing. A fixed order of sums for
    /// every row, whatever runs beside it, and the same values on every ISA (inlined into
    /// the fused step's AVX-512 and AVX2 entry points: lanes, not FMAs).
    #[inline(always)]
    pub(crate) fn add_row(self, adapter: &Served, x: &[f32], out: &mut [f32]) {
        let Some(p) = adapter.pair(self) else {
            return;
        };
        let out = &mut out[..p.n_out];
        for (a, bt) in p.a.chunks_exact(p.n_in).zip(p.bt.chunks_exact(p.n_out)) {
            let u = dot(a, x) * adapter.scaling;
            for (o, b) in out.iter_mut().zip(bt) {
                *o += u * b;
            }
        }
    }

    /// The adapter terms of the rows of `x` (R, T, in) added to the linear's output `y`
    /// (R, T, out): input row i's T tokens with `rows[i]`'s adapter (the libtorch path).
    pub(crate) fn add_tensor(
        self,
        adapters: &[Served],
        rows: &[Option<usize>],
        x: &Tensor,
        y: Tensor,
    ) -> Tensor {
        let adapted = |a: &Option<usize>| a.is_some_and(|a| adapters[a].pair(self).is_some());
        if !rows.iter().any(adapted) {
            return y;
        }
        let shape = y.size();
        let (n_in, n_out) = (x.size()[x.dim() - 1], shape[shape.len() - 1]);
        let per_row = (x.numel() as i64 / n_in) / rows.len() as i64; // T
        let flat = x.to_kind(Kind::Float).reshape([-1]).contiguous();
        let xs = Vec::<f32>::try_from(&flat).expect("an f32 tensor's values");
        let (n_in, n_out) = (n_in as usize, n_out as usize);
        let mut index = Vec::new();
        let mut delta = Vec::new();
        for (i, a) in rows.iter().enumerate() {
            let Some(a) = a.filter(|_| adapted(a)) else {
                continue;
            };
            for tok in i as i64 * per_row..(i as i64 + 1) * per_row {
                let at = delta.len();
                delta.resize(at + n_out, 0.0);
                let x = &xs[tok as usize * n_in..(tok as usize + 1) * n_in];
                self.add_row(&adapters[a], x, &mut delta[at..]);
                index.push(tok);
            }
        }
        let d = Tensor::from_slice(&delta)
            .view([index.len() as i64, n_out as i64])
            .to_kind(y.kind())
            .to_device(y.device());
        let index = Tensor::from_slice(&index).to_device(y.device());
        y.reshape([-1, n_out as i64])
            .index_add(0, &index, &d)
            .view(shape.as_slice())
    }
}

/// Σ a_i·x_i over 16 lanes (each summing every 16th product in order), then the lanes
/// in order: a fixed order that the compiler keeps in SIMD registers.
#[inline(always)]
fn dot(a: &[f32], x: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (a16, x16) = (a.chunks_exact(L), x.chunks_exact(L));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(x16.remainder())
        .map(|(a, x)| a * x)
        .sum();
    for (a, x) in a16.zip(x16) {
        for i in 0..L {
            acc[i] += a[i] * x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl Gpt2 {
    /// Holds `lora` beside the base weights (which stay as they are), for the rows that
    /// name it; returns its index (`KvCache::set_adapter`). An unsharded model only.
    pub fn add_adapter(&mut self, lora: &Lora) -> Result<usize> {
        if self.devices.len() != 1 {
            return Err(Error::Input(
                "LoRA adapters run on an unsharded model (no --tp)".into(),
            ));
        }
        let mut sites: Vec<Option<Pair>> =
            (0..self.h.len() * MODULES.len()).map(|_| None).collect();
        for (&(layer, module), ab) in lora.layers.iter().zip(lora.tensors.chunks(2)) {
            let module = MODULES.iter().position(|m| *m == module).unwrap_or(0);
            let host = |t: &Tensor| -> Result<Vec<f32>> {
                let t = t.to_kind(Kind::Float).to_device(tch::Device::Cpu);
                Ok(Vec::<f32>::try_from(t.contiguous().reshape([-1]))?)
            };
            let (n_in, n_out) = (ab[0].1.size()[1] as usize, ab[1].1.size()[0] as usize);
            let site = Site { layer, module };
            sites[site.index()] = Some(Pair {
                a: host(&ab[0].1)?,
                bt: host(&ab[1].1.tr())?,
                n_in,
                n_out,
            });
        }
        self.adapters.push(Served {
            scaling: lora.options.scaling() as f32,
            sites,
        });
        Ok(self.adapters.len() - 1)
    }

    /// How many adapters the model holds (`add_adapter`).
    pub fn adapter_count(&self) -> usize {
        self.adapters.len()
    }

    /// Every KV cache made from now on (`new_cache`) runs its rows with `adapter` unless
    /// a row is set otherwise: `infer --adapter`.
    pub fn set_default_adapter(&mut self, adapter: Option<usize>) -> Result<()> {
        if adapter.is_some_and(|a| a >= self.adapters.len()) {
            return Err(Error::Input(format!(
                "adapter {adapter:?} of {} held",
                self.adapters.len()
            )));
        }
        self.default_adapter = adapter;
        Ok(())
    }
}
