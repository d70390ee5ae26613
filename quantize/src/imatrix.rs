//! llama.cpp's importance matrix (`tools/imatrix`): for every weight a matrix product
//! reads, the mean over the calibration tokens of each input column's squared
//! activation, keyed by the GGUF tensor name. The GPT-2 forward here runs on the
//! checkpoint tensors (transformers' `GPT2LMHeadModel`, no cache) only to observe the
//! inputs of `attn_qkv`, `attn_output`, `ffn_up`, `ffn_down` and the head (`token_embd`
//! when tied, as llama.cpp's graph multiplies by it, else `output`).
use std::collections::BTreeMap;

use infer::config::Activation;
use infer::{Error, Gpt2Config, Result};
use tch::{Kind, Tensor};

/// Sums of squares and token counts per GGUF tensor name.
#[derive(Default)]
struct Sums(BTreeMap<String, (Tensor, i64)>);

impl Sums {
    /// Adds x (T, in): each column's Σx² over the T rows.
    fn add(&mut self, name: String, x: &Tensor) {
        let sq = x
            .square()
            .sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
        let t = x.size()[0];
        let e = self.0.entry(name).or_insert_with(|| (sq.zeros_like(), 0));
        e.0 += sq;
        e.1 += t;
    }
}

/// The importance matrix of `tensors` (checkpoint names, f32) over `samples`.
pub fn importance(
    config: &Gpt2Config,
    tensors: &BTreeMap<String, Tensor>,
    samples: &[Vec<i64>],
) -> Result<BTreeMap<String, Vec<f32>>> {
    let get = |n: &str| {
        tensors
            .get(n)
            .ok_or_else(|| Error::Input(format!("tensor `{n}` is missing")))
    };
    let (e, nh) = (config.n_embd, config.n_head);
    let hs = e / nh;
    let eps = config.layer_norm_epsilon;
    let ln = |x: &Tensor, n: &str| -> Result<Tensor> {
        let (w, b) = (get(&format!("{n}.weight"))?, get(&format!("{n}.bias"))?);
        Ok(x.layer_norm([e], Some(w), Some(b), eps, false))
    };
    let conv = |x: &Tensor, n: &str| -> Result<Tensor> {
        Ok(x.matmul(get(&format!("{n}.weight"))?) + get(&format!("{n}.bias"))?)
    };
    let act = |x: Tensor| match config.activation() {
        Activation::GeluTanh => x.gelu("tanh"),
        _ => x.gelu("none"),
    };
    let head = if config.tie_word_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    let mut sums = Sums::default();
    let _g = tch::no_grad_guard();
    for ids in samples {
        config.check_ids(ids)?;
        let t = ids.len() as i64;
        let ids = Tensor::from_slice(ids);
        let mut x = get("wte.weight")?.index_select(0, &ids) + get("wpe.weight")?.narrow(0, 0, t); // (T, E)
        for l in 0..config.n_layer {
            let b = |n: &str| format!("h.{l}.{n}");
            let g = |n: &str| format!("blk.{l}.{n}.weight");
            let h = ln(&x, &b("ln_1"))?;
            sums.add(g("attn_qkv"), &h);
            let qkv = conv(&h, &b("attn.c_attn"))?; // (T, 3E)
            let heads = |i: i64| qkv.narrow(1, i * e, e).view([t, nh, hs]).transpose(0, 1);
            let mut scale = 1.0 / (hs as f64).sqrt();
            if config.scale_attn_by_inverse_layer_idx {
                scale /= (l + 1) as f64;
            }
            let y = Tensor::scaled_dot_product_attention(
                &heads(0),
                &heads(1),
                &heads(2),
                None::<Tensor>,
                0.0,
                true,
                Some(scale),
                false,
            ); // (nh, T, hs)
            let y = y.transpose(0, 1).contiguous().view([t, e]);
            sums.add(g("attn_output"), &y);
            x = x + conv(&y, &b("attn.c_proj"))?;
            let h = ln(&x, &b("ln_2"))?;
            sums.add(g("ffn_up"), &h);
            let m = act(conv(&h, &b("mlp.c_fc"))?);
            sums.add(g("ffn_down"), &m);
            x = x + conv(&m, &b("mlp.c_proj"))?;
        }
        sums.add(head.into(), &ln(&x, "ln_f")?);
    }
    let mut out = BTreeMap::new();
    for (name, (sq, n)) in sums.0 {
        let mean = sq / n.max(1) as f64;
        out.insert(name, Vec::<f32>::try_from(mean)?);
    }
    Ok(out)
}
