//! A value computed elsewhere, attached to a graph with a backward of our choosing.
//!
//! candle's backward computes a gradient for every operand, frozen weights included, keeps
//! every intermediate of a composed op, and takes conv2d's input gradient through a slow
//! `conv_transpose2d` loop. ReNeg needs only gradients with respect to activations, so the ops
//! of `nn` compute their output without a graph (fused kernels or candle ops on detached
//! inputs) and attach it here with a backward that gives the input gradient alone ([`attach`],
//! [`attach3`]), or that recomputes a whole block ([`checkpoint`]).
//!
//! The attach ops' forward only hands over the precomputed value, on every device candle has a
//! backend for here (the CPU, and CUDA with the `cuda` feature), so the same mechanism serves
//! the fused CPU kernels and the device-generic path that a GPU runs.

#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, Var,
};
use std::cell::Cell;
use std::sync::Mutex;

thread_local! {
    /// (blocks checkpointed, blocks recomputed) by [`checkpoint2`] on this thread: what
    /// checkpointing is for, counted so tests can see that it happens (its gradients are the
    /// same with or without it).
    static CHECKPOINTED: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Blocks this thread has checkpointed (kept without their graph) and recomputed in a
/// backward so far.
pub fn checkpoint_counts() -> (u64, u64) {
    CHECKPOINTED.with(Cell::get)
}

fn count_checkpoint(kept: u64, recomputed: u64) {
    CHECKPOINTED.with(|c| {
        let (k, r) = c.get();
        c.set((k + kept, r + recomputed));
    });
}

/// The input-gradient function of an attached value.
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
        "attach"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        take_value(&self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        take_value_cuda(&self.value)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(grad, res)?))
    }
}

/// The precomputed value of an attach op, taken once (the graph does not keep it alive).
fn take(value: &Mutex<Option<Tensor>>) -> Result<Tensor> {
    value
        .lock()
        .map_err(|_| candle_core::Error::Msg("attach: lock poisoned".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("attach: value evaluated twice".into()))?
        .contiguous()
}

/// The precomputed value as the op's CPU output storage.
fn take_value(value: &Mutex<Option<Tensor>>) -> Result<(CpuStorage, Shape)> {
    let value = take(value)?;
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
                _ => candle_core::bail!("attach: unexpected storage"),
            }
        }
        _ => candle_core::bail!("attach: the value is not on the device of its input"),
    }
}

/// The precomputed value as the op's CUDA output storage (one device-to-device copy, as the
/// CPU's clone: candle's custom ops cannot hand over an existing storage).
#[cfg(feature = "cuda")]
fn take_value_cuda(value: &Mutex<Option<Tensor>>) -> Result<(CudaStorage, Shape)> {
    let value = take(value)?;
    let value = if value.layout().start_offset() == 0 {
        value
    } else {
        value.copy()?
    };
    let (storage, layout) = value.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("attach: the value is not on the device of its input"),
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        take_value_cuda(&self.value)
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

/// The gradient function of a two-input op: output gradient -> the inputs' gradients (`None`
/// for an input that carries no graph).
type Grad2 = Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// [`Attach`] for two inputs (a checkpointed block's activation and context).
struct Attach2 {
    value: Mutex<Option<Tensor>>,
    backward: Grad2,
}

impl CustomOp2 for Attach2 {
    fn name(&self) -> &'static str {
        "attach2"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_value(&self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        take_value_cuda(&self.value)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(grad)
    }
}

/// Activation checkpointing of a block `f(x, ctx)`: the forward keeps no graph inside the
/// block (only its inputs and output), and the backward runs `f` again with a graph from
/// the saved inputs and takes the vector-Jacobian product `<f(x, ctx), g>`. Gradients are
/// those of `f` itself (the same ops, the same kernel choice), for one more forward of the
/// block in the backward. Without a graph on either input it is `f(x, ctx)`.
///
/// `ctx` may be a tensor the block does not differentiate (e.g. a timestep embedding); it then
/// gets no gradient.
pub fn checkpoint2(
    x: &Tensor,
    ctx: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let (tx, tc) = (super::dispatch::tracked(x), super::dispatch::tracked(ctx));
    if !tx && !tc {
        return f(x, ctx);
    }
    let (xd, cd) = (x.detach(), ctx.detach());
    let value = f(&xd, &cd)?;
    if super::dispatch::tracked(&value) {
        // Trainable weights inside the block: their gradients need the block's own graph.
        return f(x, ctx);
    }
    count_checkpoint(1, 0);
    let backward = move |g: &Tensor| -> Result<(Option<Tensor>, Option<Tensor>)> {
        count_checkpoint(0, 1);
        let xv = Var::from_tensor(&xd)?;
        let cv = Var::from_tensor(&cd)?;
        let (xi, ci) = (
            if tx {
                xv.as_tensor().clone()
            } else {
                xd.clone()
            },
            if tc {
                cv.as_tensor().clone()
            } else {
                cd.clone()
            },
        );
        let y = f(&xi, &ci)?;
        let grads = (y * g.detach())?.sum_all()?.backward()?;
        let pick = |on: bool, v: &Var| -> Result<Option<Tensor>> {
            if !on {
                return Ok(None);
            }
            Ok(Some(match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            }))
        };
        Ok((pick(tx, &xv)?, pick(tc, &cv)?))
    };
    x.apply_op2(
        ctx,
        Attach2 {
            value: Mutex::new(Some(value)),
            backward: Box::new(backward),
        },
    )
}

/// [`checkpoint2`] for a block of one input.
pub fn checkpoint(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !super::dispatch::tracked(x) {
        return f(x);
    }
    // A one-element stand-in carries no graph, so it gets no gradient.
    let none = Tensor::zeros(1, x.dtype(), x.device())?;
    checkpoint2(x, &none, move |x, _| f(x))
}
