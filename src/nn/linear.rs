//! `torch.nn.Linear`: y = x W^T + b.

use super::attach;
use super::dispatch::{self, Grad};
use crate::error::Result;
use crate::weights::Vb;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Linear {
    /// W^T, `[in, out]`. Frozen weights are stored transposed and contiguous: gemm then reads
    /// them in place, where a `[out, in]` weight would be repacked on every call (at SD's small
    /// activations that packing cost as much as the product). A trainable weight (a `Var`)
    /// stays a transposed view, so the graph and optimiser updates reach it.
    weight_t: Tensor,
    bias: Option<Tensor>,
}

fn transposed(weight: &Tensor) -> Tensor {
    // A weight that is not 2-D is kept as it is: `forward` then fails with candle's shape error.
    let Ok(view) = weight.t() else {
        return weight.clone();
    };
    if dispatch::tracked(weight) {
        return view;
    }
    view.contiguous().unwrap_or(view)
}

impl Linear {
    /// Loads `{weight, bias}` of shape `[out, in]`, `[out]` from `vb`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: &Vb) -> Result<Self> {
        let weight = vb.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias {
            Some(vb.get(&[out_dim], "bias")?)
        } else {
            None
        };
        Ok(Self::from_tensors(weight, bias))
    }

    /// From a `[out, in]` weight and an optional `[out]` bias.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight_t: transposed(&weight),
            bias,
        }
    }

    pub fn in_dim(&self) -> usize {
        self.weight_t.dims().first().copied().unwrap_or(0)
    }

    /// # Shapes
    /// `[..., in]` -> `[..., out]`
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let Some(&in_dim) = dims.last() else {
            candle_core::bail!("linear: a scalar input has no features")
        };
        let rows: usize = dims[..dims.len() - 1].iter().product();
        // Autocast: a matmul's input in its weight's dtype (f32 activations meet bf16/fp16
        // weights at model boundaries; see `crate::precision`).
        let xs = &xs.to_dtype(self.weight_t.dtype())?;
        let x2 = xs.reshape((rows, in_dim))?;
        let weights: Vec<&Tensor> = std::iter::once(&self.weight_t).chain(&self.bias).collect();
        let plan = dispatch::plan(&[xs], &weights);
        let out = match plan.grad {
            // Frozen weights: forward without a graph, backward to the input only (one
            // matmul; candle would also compute the weight's gradient).
            Grad::InputOnly => {
                let value = self.value(&x2.detach(), plan.fused)?;
                let w = self.weight_t.t()?;
                attach::attach(&x2, value, move |g, _| g.matmul(&w))?
            }
            Grad::None => self.value(&x2, plan.fused)?,
            Grad::All => self.value(&x2, false)?,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.weight_t.dim(1)?;
        out.reshape(out_dims)
    }

    /// `x2 W^T + b`: the fused CPU op where `fused` (one gemm onto the bias rows, no zero
    /// fill; no graph), else candle ops.
    fn value(&self, x2: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        if fused {
            return super::cpu_linear::linear(x2, &self.weight_t, self.bias.as_ref());
        }
        let out = x2.matmul(&self.weight_t)?;
        match &self.bias {
            Some(b) => out.broadcast_add(b),
            None => Ok(out),
        }
    }
}
