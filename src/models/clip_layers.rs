//! The pre-LN transformer layer shared by every CLIP tower: transformers' `CLIPEncoderLayer`
//! (separate q/k/v projections) and OpenCLIP's `ResidualAttentionBlock` (a fused `in_proj`,
//! split at load time), which compute the same function.

use crate::error::Result;
use crate::nn::{attention, Activation, LayerNorm, Linear};
use crate::weights::Vb;
use candle_core::Tensor;

pub struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl ClipEncoderLayer {
    /// transformers' key names: `layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`,
    /// `mlp.fc1`, `mlp.fc2`.
    pub fn new(hidden: usize, intermediate: usize, eps: f64, vb: &Vb) -> Result<Self> {
        let (h, i) = (hidden, intermediate);
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(h, eps, &vb.pp("layer_norm1"))?,
            q_proj: Linear::new(h, h, true, &attn.pp("q_proj"))?,
            k_proj: Linear::new(h, h, true, &attn.pp("k_proj"))?,
            v_proj: Linear::new(h, h, true, &attn.pp("v_proj"))?,
            out_proj: Linear::new(h, h, true, &attn.pp("out_proj"))?,
            layer_norm2: LayerNorm::new(h, eps, &vb.pp("layer_norm2"))?,
            fc1: Linear::new(h, i, true, &vb.pp("mlp.fc1"))?,
            fc2: Linear::new(i, h, true, &vb.pp("mlp.fc2"))?,
        })
    }

    /// OpenCLIP's key names: `ln_1`, `attn.in_proj_{weight,bias}` (q, k, v stacked),
    /// `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`.
    pub fn from_open_clip(width: usize, mlp_width: usize, vb: &Vb) -> Result<Self> {
        let w = width;
        let attn = vb.pp("attn");
        let in_w = attn.get(&[3 * w, w], "in_proj_weight")?;
        let in_b = attn.get(&[3 * w], "in_proj_bias")?;
        let part = |k: usize| -> Result<Linear> {
            Ok(Linear::from_tensors(
                in_w.narrow(0, k * w, w)?.contiguous()?,
                Some(in_b.narrow(0, k * w, w)?.contiguous()?),
            ))
        };
        Ok(Self {
            layer_norm1: LayerNorm::new(w, 1e-5, &vb.pp("ln_1"))?,
            q_proj: part(0)?,
            k_proj: part(1)?,
            v_proj: part(2)?,
            out_proj: Linear::new(w, w, true, &attn.pp("out_proj"))?,
            layer_norm2: LayerNorm::new(w, 1e-5, &vb.pp("ln_2"))?,
            fc1: Linear::new(w, mlp_width, true, &vb.pp("mlp.c_fc"))?,
            fc2: Linear::new(mlp_width, w, true, &vb.pp("mlp.c_proj"))?,
        })
    }

    /// # Shapes
    /// `xs`: `[b, n, hidden]`, `mask`: additive `[n, n]` -> `[b, n, hidden]`
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        heads: usize,
        act: Activation,
    ) -> candle_core::Result<Tensor> {
        let h = self.layer_norm1.forward(xs)?;
        let a = attention(
            &self.q_proj.forward(&h)?,
            &self.k_proj.forward(&h)?,
            &self.v_proj.forward(&h)?,
            heads,
            mask,
        )?;
        let xs = (xs + self.out_proj.forward(&a)?)?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self.fc2.forward(&act.forward(&self.fc1.forward(&h)?)?)?;
        xs + h
    }
}
