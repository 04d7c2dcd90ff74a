//! `torch.nn.Linear`: y = x W^T + b.

use crate::error::Result;
use crate::weights::Vb;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
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
        Ok(Self { weight, bias })
    }

    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// # Shapes
    /// `[..., in]` -> `[..., out]`
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has at least one dim");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = xs.reshape((rows, in_dim))?;
        let out = if crate::nn::frozen::wants_frozen_path(xs) {
            // Frozen weights: forward without a graph, backward to the input only.
            let value = self.plain(&x2.detach())?;
            let w = self.weight.clone();
            crate::nn::frozen::attach(&x2, value, move |g, _| g.matmul(&w))?
        } else {
            self.plain(&x2)?
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
        out.reshape(out_dims)
    }

    fn plain(&self, x2: &Tensor) -> candle_core::Result<Tensor> {
        let out = x2.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => out.broadcast_add(b),
            None => Ok(out),
        }
    }
}
