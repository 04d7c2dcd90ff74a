//! Frozen layers with an input-only backward. candle's backward computes a gradient for every
//! operand, frozen weights included, and takes conv2d's input gradient through a slow
//! `conv_transpose2d` loop. ReNeg needs only gradients with respect to activations, so these
//! ops run the usual forward on a detached input and attach a backward that computes the input
//! gradient alone: for a convolution, a convolution of the gradient with the flipped,
//! transposed kernel (the fast forward kernels again); for a linear layer, one matmul.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

/// The input-gradient function of a frozen layer.
/// Called with the output gradient and the op's own output.
type InputGrad = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Returns a precomputed value as its output; its backward is a given function of the
/// output gradient. The value is handed over once (not kept alive by the graph).
struct Attach {
    value: Mutex<Option<Tensor>>,
    backward: InputGrad,
}

impl CustomOp1 for Attach {
    fn name(&self) -> &'static str {
        "frozen-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        take_value(&self.value)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(grad, res)?))
    }
}

/// The precomputed value of an attach op as the op's output storage (taken once).
fn take_value(value: &Mutex<Option<Tensor>>) -> Result<(CpuStorage, Shape)> {
    let value = value
        .lock()
        .map_err(|_| candle_core::Error::Msg("frozen layer lock".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("frozen layer evaluated twice".into()))?;
    let value = value.contiguous()?;
    let (storage, layout) = value.storage_and_layout();
    match &*storage {
        Storage::Cpu(s)
            if layout.start_offset() == 0 && s_len(s) == layout.shape().elem_count() =>
        {
            Ok((s.clone(), layout.shape().clone()))
        }
        Storage::Cpu(_) => {
            drop(storage);
            let owned = value.copy()?;
            let (storage, layout) = owned.storage_and_layout();
            match &*storage {
                Storage::Cpu(s) => Ok((s.clone(), layout.shape().clone())),
                _ => candle_core::bail!("frozen layer: unexpected storage"),
            }
        }
        _ => candle_core::bail!("frozen layers run on the CPU only (use the plain path elsewhere)"),
    }
}

/// The gradient function of a three-input op: output gradient -> the inputs' gradients.
type Grad3 = Box<dyn Fn(&Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync>;

/// [`Attach`] for three inputs (attention's q, k, v).
struct Attach3 {
    value: Mutex<Option<Tensor>>,
    backward: Grad3,
}

impl CustomOp3 for Attach3 {
    fn name(&self) -> &'static str {
        "attach3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_value(&self.value)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b, c) = (self.backward)(grad)?;
        Ok((Some(a), Some(b), Some(c)))
    }
}

/// Attaches `value` (computed from the detached inputs) to the graphs of `a`, `b`, `c`, with
/// `backward` giving the three input gradients from the output gradient.
pub fn attach3(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    value: Tensor,
    backward: impl Fn(&Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    a.apply_op3(
        b,
        c,
        Attach3 {
            value: Mutex::new(Some(value)),
            backward: Box::new(backward),
        },
    )
}

fn s_len(s: &CpuStorage) -> usize {
    match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        _ => usize::MAX,
    }
}

/// `x` carries a graph and lives on the CPU: the frozen path applies.
pub fn wants_frozen_path(x: &Tensor) -> bool {
    x.device().is_cpu() && (x.is_variable() || x.track_op())
}

/// Attaches `value` (computed from `x.detach()`) to `x`'s graph with `backward`.
pub fn attach(
    x: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    x.apply_op1(Attach {
        value: Mutex::new(Some(value)),
        backward: Box::new(backward),
    })
}

/// Inserts `s - 1` zeros between the rows and columns of `[b, c, h, w]`.
fn dilate(g: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(g.clone());
    }
    let (b, c, h, w) = g.dims4()?;
    g.reshape((b, c, h, 1, w, 1))?
        .pad_with_zeros(3, 0, s - 1)?
        .pad_with_zeros(5, 0, s - 1)?
        .reshape((b, c, h * s, w * s))?
        .narrow(2, 0, (h - 1) * s + 1)?
        .narrow(3, 0, (w - 1) * s + 1)
}

/// The input gradient of `conv2d(x, kernel, padding, stride)` for an input of `in_h x in_w`.
pub fn conv2d_input_grad(
    grad: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    in_h: usize,
    in_w: usize,
) -> Result<Tensor> {
    let k = kernel.dim(2)?;
    // W'[in, out, i, j] = W[out, in, k-1-i, k-1-j]
    let flipped = kernel.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    let d = dilate(grad, stride)?;
    let (dh, dw) = (d.dim(2)?, d.dim(3)?);
    let lead = k - 1 - padding;
    // Pad so a valid convolution yields exactly in_h x in_w.
    let tail_h = (in_h + k - 1).saturating_sub(dh + lead);
    let tail_w = (in_w + k - 1).saturating_sub(dw + lead);
    let d = d
        .pad_with_zeros(2, lead, tail_h)?
        .pad_with_zeros(3, lead, tail_w)?;
    d.conv2d(&flipped, 0, 1, 1, 1)
}
