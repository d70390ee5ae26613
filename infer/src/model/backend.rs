//! The seam under the block: `Block::forward` says what a GPT-2 block computes once, a
//! `Backend` how each op runs, as ggml builds one graph for every backend. Two backends:
//! `Tensors` here (libtorch on any device, tensor-parallel shards, the KV cache or
//! training's autograd) and `fused::Slices` (f32 slices on the CPU decode kernels).
use tch::{Device, Kind, Tensor};

use super::lora::Served;
use super::{Attention, Gpt2, LayerNorm, Linear, Site};
use crate::attention::{sdpa, Pass};
use crate::config::Activation;
use crate::parallel::{per_shard, Communicator};

/// The ops of a block. `X` holds a sublayer's activations for every row and token:
/// (R, T, features).
pub(crate) trait Backend {
    type X;

    fn layer_norm(&self, ln: &LayerNorm, x: &Self::X) -> Self::X;

    /// One shard's linear layer at `site`, with its bias when it holds one (and the
    /// adapter terms of rows that run one, `lora`).
    fn linear(&self, site: Site, w: &Linear, x: &Self::X) -> Self::X;

    /// Attention of tensor-parallel shard `shard`'s heads in block `layer`: `qkv` is its
    /// `c_attn` output (R, T, 3·nh·hs); the new keys and values go into the cache, and the
    /// queries attend over the rows' cached slots (without a cache, over the whole
    /// causal sequence): (R, T, nh·hs).
    fn attend(&self, attn: &Attention, layer: usize, shard: usize, qkv: Self::X) -> Self::X;

    fn activate(&self, act: Activation, x: Self::X) -> Self::X;

    /// The residual stream after a sublayer: x + y.
    fn residual(&self, x: Self::X, y: Self::X) -> Self::X;

    /// Σ over the `n` shards of `f(r, x on shard r's device)`, in rank order, plus `bias`
    /// (a row-split `c_proj`'s, kept out of the shards).
    fn shard_sum<F>(&self, n: usize, x: &Self::X, bias: Option<&Tensor>, f: F) -> Self::X
    where
        F: Fn(usize, &Self::X) -> Self::X;
}

/// libtorch's ops on the model's devices, with the KV cache of `pass`, or none
/// (training: each row a whole causal sequence, autograd through every op).
pub(crate) struct Tensors<'a> {
    devices: &'a [Device],
    comm: &'a dyn Communicator,
    pass: Option<&'a Pass<'a>>,
    adapters: &'a [Served],
    /// Per input row, the adapter it runs with (empty when none does).
    rows: Vec<Option<usize>>,
}

impl<'a> Tensors<'a> {
    pub(crate) fn new(model: &'a Gpt2, pass: Option<&'a Pass<'a>>) -> Self {
        let rows = match pass {
            Some(p) if !model.adapters.is_empty() => {
                p.span.rows.iter().map(|&r| p.cache.adapter(r)).collect()
            }
            _ => Vec::new(),
        };
        Self {
            devices: &model.devices,
            comm: model.comm.as_ref(),
            pass,
            adapters: &model.adapters,
            rows,
        }
    }
}

impl Backend for Tensors<'_> {
    type X = Tensor;

    fn layer_norm(&self, ln: &LayerNorm, x: &Tensor) -> Tensor {
        ln.forward(x)
    }

    fn linear(&self, site: Site, w: &Linear, x: &Tensor) -> Tensor {
        let y = w.forward(x);
        match self.rows.is_empty() {
            true => y,
            false => site.add_tensor(self.adapters, &self.rows, x, y),
        }
    }

    fn attend(&self, attn: &Attention, layer: usize, shard: usize, qkv: Tensor) -> Tensor {
        let (b, t, c) = qkv.size3().expect("(B, T, 3·nh·hs)");
        let nh = attn.shards[shard].n_head;
        let hs = c / (3 * nh);
        let device = self.devices[shard];
        let mask = self.pass.and_then(|p| p.mask.as_ref());
        let mask = mask.map(|m| m.to_device(device));
        let causal = self.pass.is_none_or(|p| p.causal);
        let heads = |z: Tensor| z.view([b, t, nh, hs]).transpose(1, 2); // (B, nh, T, hs)
        let qkv = qkv.split(nh * hs, 2); // 3 × (B, T, nh·hs)
        let [q, k, v] = <[Tensor; 3]>::try_from(qkv).expect("c_attn gives q, k, v");
        let (q, k, v) = (heads(q), heads(k), heads(v));
        let (k_all, v_all) = match self.pass {
            // (B, nh, S, hs)
            Some(p) => (
                p.write_read(&p.cache.k[layer][shard], &k),
                p.write_read(&p.cache.v[layer][shard], &v),
            ),
            None => (k, v),
        };
        let (mask, scale) = (mask.as_ref(), attn.scale);
        let y = if attn.upcast && q.kind() != Kind::Float {
            // reorder_and_upcast_attn: scores and softmax in fp32.
            let f = |z: &Tensor| z.to_kind(Kind::Float);
            sdpa(&f(&q), &f(&k_all), &f(&v_all), mask, causal, scale).to_kind(q.kind())
        } else {
            sdpa(&q, &k_all, &v_all, mask, causal, scale)
        }; // (B, nh, T, hs)
        y.transpose(1, 2).reshape([b, t, nh * hs]) // (B, T, nh·hs)
    }

    fn activate(&self, act: Activation, x: Tensor) -> Tensor {
        match act {
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Gelu => x.gelu("none"),
            Activation::QuickGelu => &x * (&x * 1.702).sigmoid(),
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0.0, 6.0),
            Activation::Silu => x.silu(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Mish => x.mish(),
            Activation::LeakyRelu => x.leaky_relu(),
            Activation::Linear => x,
        }
    }

    fn residual(&self, x: Tensor, y: Tensor) -> Tensor {
        x + y
    }

    /// The shards on the threads of a persistent pool (`per_shard`), summed by the
    /// model's `Communicator` on the first device.
    fn shard_sum<F>(&self, n: usize, x: &Tensor, bias: Option<&Tensor>, f: F) -> Tensor
    where
        F: Fn(usize, &Tensor) -> Tensor,
    {
        let partial = |r: usize| f(r, &x.to_device(self.devices[r]));
        let y = self
            .comm
            .all_reduce(per_shard(n, &partial), self.devices[0]);
        match bias {
            Some(b) => y + b,
            None => y,
        }
    }
}
