//! `torch.nn.Linear`: y = x W^T + b.

use super::attach;
use super::cpu_packed::{self, PackedWeight};
use super::dispatch::{self, Grad};
use crate::error::Result;
use crate::weights::Vb;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// How the layer keeps its weight.
#[derive(Debug, Clone)]
enum Weight {
    /// W^T, `[in, out]`. Frozen weights are stored transposed and contiguous: gemm then reads
    /// them in place, where a `[out, in]` weight would be repacked on every call (at SD's small
    /// activations that packing cost as much as the product). A trainable weight (a `Var`)
    /// stays a transposed view, so the graph and optimiser updates reach it.
    Tensor(Tensor),
    /// A frozen f32 weight on an AVX-512 CPU, in the gemm micro-kernel's panels
    /// ([`cpu_packed`]): packed once here rather than by gemm on every call.
    Packed(Arc<PackedWeight>),
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

/// The weight as the layer keeps it: packed where the CPU kernels would run on it (frozen,
/// f32, on a CPU with AVX-512, `RENEG_KERNELS` not generic when it is built), else `Wᵀ`.
fn stored(weight: &Tensor) -> Weight {
    let packable = weight.rank() == 2
        && weight.dtype() == DType::F32
        && weight.device().is_cpu()
        && !dispatch::tracked(weight)
        && dispatch::kernels() == dispatch::Kernels::Auto
        && cpu_packed::available();
    if packable {
        if let (Ok((n, k)), Ok(values)) = (
            weight.dims2(),
            weight.flatten_all().and_then(|t| t.to_vec1::<f32>()),
        ) {
            return Weight::Packed(Arc::new(PackedWeight::pack(&values, n, k)));
        }
    }
    Weight::Tensor(transposed(weight))
}

impl Weight {
    /// `Wᵀ` as a tensor (for a packed weight, unpacked for this call: the device-generic
    /// path, taken under `RENEG_KERNELS=generic` or by a test).
    fn tensor(&self) -> candle_core::Result<Tensor> {
        match self {
            Weight::Tensor(t) => Ok(t.clone()),
            Weight::Packed(p) => Tensor::from_vec(p.unpacked(), p.dims(), &Device::Cpu),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Weight::Tensor(t) => t.dtype(),
            Weight::Packed(_) => DType::F32,
        }
    }

    /// `(in, out)`; `in` is 0 for a weight that is not 2-D (forward then fails on its shape).
    fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Tensor(t) => (
                t.dims().first().copied().unwrap_or(0),
                t.dims().get(1).copied().unwrap_or(0),
            ),
            Weight::Packed(p) => p.dims(),
        }
    }
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
            weight: stored(&weight),
            bias,
        }
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims().0
    }

    /// Whether the weight is kept in the micro-kernel's panels ([`cpu_packed`]).
    pub fn is_packed(&self) -> bool {
        matches!(self.weight, Weight::Packed(_))
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
        let xs = &xs.to_dtype(self.weight.dtype())?;
        let x2 = xs.reshape((rows, in_dim))?;
        let out = match &self.weight {
            Weight::Packed(p) => self.packed(p, xs, &x2)?,
            Weight::Tensor(w_t) => self.unpacked(w_t, xs, &x2)?,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.weight.dims().1;
        out.reshape(out_dims)
    }

    /// The forward with `Wᵀ` as a tensor.
    fn unpacked(&self, w_t: &Tensor, xs: &Tensor, x2: &Tensor) -> candle_core::Result<Tensor> {
        let weights: Vec<&Tensor> = std::iter::once(w_t).chain(&self.bias).collect();
        let plan = dispatch::plan(&[xs], &weights);
        Ok(match plan.grad {
            // Frozen weights: forward without a graph, backward to the input only (one
            // matmul; candle would also compute the weight's gradient).
            Grad::InputOnly => {
                let value = self.value(w_t, &x2.detach(), plan.fused)?;
                let w = w_t.t()?;
                attach::attach(x2, value, move |g, _| g.matmul(&w))?
            }
            Grad::None => self.value(w_t, x2, plan.fused)?,
            Grad::All => self.value(w_t, x2, false)?,
        })
    }

    /// The forward with the packed weight: [`cpu_packed`]'s kernel where the plan fuses
    /// (frozen bias, or none), else the tensor path on `Wᵀ` unpacked for this call.
    fn packed(
        &self,
        p: &Arc<PackedWeight>,
        xs: &Tensor,
        x2: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let bias: Vec<&Tensor> = self.bias.iter().collect();
        let plan = dispatch::plan(&[xs], &bias);
        if !plan.fused || plan.grad == Grad::All {
            return self.unpacked(&self.weight.tensor()?, xs, x2);
        }
        let value = cpu_packed::linear(x2, p, self.bias.as_ref())?;
        if plan.grad == Grad::None {
            return Ok(value);
        }
        let p = p.clone();
        attach::attach(x2, value, move |g, _| cpu_packed::input_grad(g, &p))
    }

    /// `x2 W^T + b`: the fused CPU op where `fused` (one gemm onto the bias rows, no zero
    /// fill; no graph), else candle ops.
    fn value(&self, w_t: &Tensor, x2: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        if fused {
            return super::cpu_linear::linear(x2, w_t, self.bias.as_ref());
        }
        let out = x2.matmul(w_t)?;
        match &self.bias {
            Some(b) => out.broadcast_add(b),
            None => Ok(out),
        }
    }
}
