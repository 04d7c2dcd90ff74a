//! transformers' `T5EncoderModel` (T5 v1.1, as PixArt-α's T5-XXL): RMS norm without mean or
//! bias, unscaled attention scores with bidirectional relative-position buckets (computed once
//! from block 0's table, added in every block, the padding mask added to them), the gated
//! FFN `gelu_new(wi_0 x) * wi_1 x` (or ReLU, v1.0's `DenseReluDense`), and a final norm.
//! Forward only: ReNeg's negative lives in T5's output space, so no gradient goes through it.
//! The weights stay in the dtype they are stored in (T5-XXL is 19 GB in f32); norms and the
//! softmax run in f32.

use crate::error::{read_json, Error, Result};
use crate::weights::Vb;
use candle_core::{DType, Device, Tensor, D};
use std::path::Path;

/// The keys of transformers' `T5Config` an encoder needs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// "gated-gelu" (v1.1) or "relu" (v1.0); transformers' `{gated-}ACT` form.
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

impl T5Config {
    pub fn load(path: &Path) -> Result<Self> {
        let v: serde_json::Value = read_json(path)?;
        serde_json::from_value(v).map_err(|e| Error::file(path, format!("not a T5 config: {e}")))
    }

    /// (gated, activation) of `feed_forward_proj`.
    fn feed_forward(&self) -> std::result::Result<(bool, Activation), String> {
        let (gated, act) = match self.feed_forward_proj.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, self.feed_forward_proj.as_str()),
        };
        let act = match act {
            // transformers maps "gated-gelu" to gelu_new (tanh approximation).
            "gelu" | "gelu_new" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(format!(
                    "feed_forward_proj {other:?} is not one reneg runs (gelu, relu)"
                ))
            }
        };
        Ok((gated, act))
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluTanh,
    Relu,
}

/// T5's layer norm: `x / sqrt(mean(x^2) + eps) * w`, statistics in f32.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(w.dtype())?.broadcast_mul(w)
}

/// A linear layer without bias, as T5's: `x W^T`.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    x.reshape((b * n, d))?
        .matmul(&w.t()?)?
        .reshape((b, n, w.dim(0)?))
}

struct Block {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    norm_attn: Tensor,
    wi_0: Tensor,
    wi_1: Option<Tensor>,
    wo: Tensor,
    norm_ff: Tensor,
}

pub struct T5EncoderModel {
    shared: Tensor,
    blocks: Vec<Block>,
    /// Block 0's `relative_attention_bias` `[buckets, heads]`.
    relative_bias: Tensor,
    final_norm: Tensor,
    cfg: T5Config,
    gated: bool,
    act: Activation,
}

impl T5EncoderModel {
    /// `vb` at the root of the state dict (`shared.weight`, `encoder.*`); the token embedding
    /// is `shared.weight`, or `encoder.embed_tokens.weight` where only that was saved.
    pub fn new(cfg: T5Config, vb: &Vb) -> Result<Self> {
        let (gated, act) = cfg
            .feed_forward()
            .map_err(|e| Error::file(vb.file(), format!("its T5 config: {e}")))?;
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        let shared = if vb.contains("shared.weight") {
            vb.get(&[cfg.vocab_size, d], "shared.weight")?
        } else {
            vb.get(&[cfg.vocab_size, d], "encoder.embed_tokens.weight")?
        };
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let b = enc.pp("block").pp(i).pp("layer");
                let (a, f) = (b.pp(0).pp("SelfAttention"), b.pp(1).pp("DenseReluDense"));
                let (wi_0, wi_1) = if gated {
                    (
                        f.get(&[cfg.d_ff, d], "wi_0.weight")?,
                        Some(f.get(&[cfg.d_ff, d], "wi_1.weight")?),
                    )
                } else {
                    (f.get(&[cfg.d_ff, d], "wi.weight")?, None)
                };
                Ok(Block {
                    q: a.get(&[inner, d], "q.weight")?,
                    k: a.get(&[inner, d], "k.weight")?,
                    v: a.get(&[inner, d], "v.weight")?,
                    o: a.get(&[d, inner], "o.weight")?,
                    norm_attn: b.pp(0).get(&[d], "layer_norm.weight")?,
                    wi_0,
                    wi_1,
                    wo: f.get(&[d, cfg.d_ff], "wo.weight")?,
                    norm_ff: b.pp(1).get(&[d], "layer_norm.weight")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let relative_bias = enc
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get(
                &[cfg.relative_attention_num_buckets, cfg.num_heads],
                "weight",
            )?;
        Ok(Self {
            shared,
            blocks,
            relative_bias,
            final_norm: enc.get(&[d], "final_layer_norm.weight")?,
            cfg,
            gated,
            act,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// transformers' bidirectional relative-position bucket of `rel` = key - query position.
    pub fn bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
        let half = (num_buckets / 2) as i64;
        let mut ret = if rel > 0 { half } else { 0 };
        let n = rel.abs();
        let max_exact = half / 2;
        if n < max_exact {
            ret += n;
        } else {
            // torch: log of the f32 ratio over a Python float's log, times an integer, in
            // f32, truncated, then added to max_exact.
            let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
            let large =
                ((n as f32 / max_exact as f32).ln() / denom * (half - max_exact) as f32) as i64;
            ret += (max_exact + large).min(half - 1);
        }
        ret as usize
    }

    /// The position bias `[1, heads, n, n]` in f32.
    fn position_bias(&self, n: usize, device: &Device) -> Result<Tensor> {
        let (nb, md) = (
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        );
        let ids: Vec<u32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| Self::bucket(j as i64 - i as i64, nb, md) as u32))
            .collect();
        let ids = Tensor::from_vec(ids, n * n, device)?;
        let table = self.relative_bias.to_dtype(DType::F32)?;
        Ok(table
            .index_select(&ids, 0)?
            .reshape((n, n, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?)
    }

    /// `last_hidden_state` `[b, n, d_model]` (f32) of `input_ids` `[b, n]` with `mask`
    /// `[b, n]` (1 on tokens, 0 on padding; None: all ones), every row returned.
    pub fn forward(&self, input_ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let max_id = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(Error::Invalid(format!(
                "token id {max_id} is outside the T5 encoder's vocab_size = {}: tokenizer and text encoder do not match",
                self.cfg.vocab_size
            )));
        }
        let dev = self.shared.device();
        let mut x = self
            .shared
            .index_select(&ids.to_device(dev)?, 0)?
            .reshape((b, n, self.cfg.d_model))?;
        // The padding mask enters as the dtype's lowest value added to the position bias.
        let mut bias = self.position_bias(n, dev)?;
        if let Some(m) = mask {
            let m = m
                .to_dtype(DType::F32)?
                .to_device(dev)?
                .reshape((b, 1, 1, n))?;
            let additive = ((1.0 - m)? * f32::MIN as f64)?;
            bias = bias.broadcast_add(&additive)?;
        }
        let (h, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        let eps = self.cfg.layer_norm_epsilon;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, h, dk))?.transpose(1, 2)?.contiguous()
        };
        for blk in &self.blocks {
            let y = rms_norm(&x, &blk.norm_attn, eps)?;
            let (q, k, v) = (
                split(linear(&y, &blk.q)?)?,
                split(linear(&y, &blk.k)?)?,
                split(linear(&y, &blk.v)?)?,
            );
            // No 1/sqrt(d_kv): T5 folds it into its initialisation.
            let scores = q
                .to_dtype(DType::F32)?
                .matmul(&k.to_dtype(DType::F32)?.t()?)?
                .broadcast_add(&bias)?;
            let probs = crate::nn::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            let att = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, n, h * dk))?;
            x = (x + linear(&att, &blk.o)?)?;
            let y = rms_norm(&x, &blk.norm_ff, eps)?;
            let a = linear(&y, &blk.wi_0)?;
            let a = match self.act {
                Activation::GeluTanh => crate::nn::activation::gelu_tanh(&a)?,
                Activation::Relu => a.relu()?,
            };
            let a = match (&blk.wi_1, self.gated) {
                (Some(w1), true) => (a * linear(&y, w1)?)?,
                _ => a,
            };
            x = (x + linear(&a, &blk.wo)?)?;
        }
        Ok(rms_norm(&x, &self.final_norm, eps)?.to_dtype(DType::F32)?)
    }
}
