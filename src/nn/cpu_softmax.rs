//! Fused CPU softmax over the last dimension of `scale * x`, rows in parallel, with the
//! closed-form backward `dx = scale * y * (g - sum(g * y))` as one fused pass. The composed
//! version (scale, max, subtract, exp, sum, divide) makes six passes over attention scores that
//! reach millions of elements at SD resolutions.
//!
//! f32 and f64 on the CPU; [`softmax_scaled`] returns `None` otherwise.

use super::cpu_kernel::{apply1, contiguous, dot, max_scaled, simd_fn, sum, Float, Kernel1};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

simd_fn! {
    /// `x = softmax(scale * x)` for one row, in place.
    pub(crate) fn softmax_row_in_place<T: Float>(x: &mut [T], scale: T) {
        let inv = softmax_row_unnormalised(x, scale);
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

simd_fn! {
    /// `x = exp(scale * x - max)` for one row, in place, not normalised: returns `1 / sum`,
    /// which attention applies to its output row instead (d elements rather than the m here).
    pub(crate) fn softmax_row_unnormalised<T: Float>(x: &mut [T], scale: T) -> T {
        let max = max_scaled(x, scale);
        for v in x.iter_mut() {
            *v = (*v * scale - max).exp_fast();
        }
        T::one() / sum(x)
    }
}

simd_fn! {
    /// `o = scale * y * (g - sum(g * y))` for one row.
    fn softmax_grad_row<T: Float>(o: &mut [T], g: &[T], y: &[T], scale: T) {
        let dot = dot(g, y);
        for ((o, &a), &b) in o.iter_mut().zip(g).zip(y) {
            *o = scale * b * (a - dot);
        }
    }
}

fn forward_impl<T: Float>(x: &[T], n: usize, scale: T) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .with_min_len(super::min_rows(n))
        .for_each(|(o, r)| {
            o.copy_from_slice(r);
            softmax_row_in_place(o, scale);
        });
    y
}

fn backward_impl<T: Float>(g: &[T], y: &[T], n: usize, scale: T) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    dx.par_chunks_mut(n)
        .zip(g.par_chunks(n).zip(y.par_chunks(n)))
        .with_min_len(super::min_rows(n))
        .for_each(|(o, (g, y))| {
            softmax_grad_row(o, g, y, scale);
        });
    dx
}

struct Forward {
    scale: f64,
}

impl Kernel1 for Forward {
    fn run<T: Float>(&self, x: &[T], l: &Layout) -> Result<Vec<T>> {
        let n = *l.dims().last().unwrap_or(&1);
        Ok(forward_impl(x, n, T::from_f64(self.scale)))
    }
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "cpu-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        apply1(self, s, l, l.shape().clone())
    }
}

struct Backward {
    scale: f64,
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "cpu-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = *yl.dims().last().unwrap_or(&1);
        let out = match (g, y) {
            (CpuStorage::F32(g), CpuStorage::F32(y)) => CpuStorage::F32(backward_impl(
                contiguous(g, gl)?,
                contiguous(y, yl)?,
                n,
                self.scale as f32,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(y)) => CpuStorage::F64(backward_impl(
                contiguous(g, gl)?,
                contiguous(y, yl)?,
                n,
                self.scale,
            )),
            _ => candle_core::bail!("cpu_softmax: f32 or f64 only"),
        };
        Ok((out, yl.shape().clone()))
    }
}

/// Softmax in place over the last dimension of a contiguous CPU f32/f64 tensor.
struct InPlace {
    scale: f64,
}

impl InPlace {
    fn rows<T: Float>(&self, v: &mut [T], l: &Layout) -> Result<()> {
        let n = *l.dims().last().unwrap_or(&1);
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cpu_softmax: not contiguous".into()))?;
        let scale = T::from_f64(self.scale);
        v[a..b]
            .par_chunks_mut(n.max(1))
            .with_min_len(super::min_rows(n))
            .for_each(|row| softmax_row_in_place(row, scale));
        Ok(())
    }
}

impl candle_core::InplaceOp1 for InPlace {
    fn name(&self) -> &'static str {
        "cpu-softmax-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        match s {
            CpuStorage::F32(v) => self.rows(v, l),
            CpuStorage::F64(v) => self.rows(v, l),
            _ => candle_core::bail!("cpu_softmax: f32 or f64 only"),
        }
    }
}

/// `softmax(scale * xs)` over the last dimension, written over `xs` itself, which must be a
/// scratch tensor of the caller's (attention's scores: no second buffer to allocate and
/// zero). Returns `xs`, or `None` where the fused kernel does not apply (off the CPU, other
/// dtypes, a tensor on a graph, or not contiguous).
pub fn softmax_scaled_in_place(xs: Tensor, scale: f64) -> Result<Option<Tensor>> {
    let ok = xs.device().is_cpu()
        && matches!(xs.dtype(), DType::F32 | DType::F64)
        && xs.rank() > 0
        && xs.is_contiguous()
        && !xs.track_op()
        && !xs.is_variable();
    if !ok {
        return Ok(None);
    }
    xs.inplace_op1(&InPlace { scale })?;
    Ok(Some(xs))
}

/// The input gradient of `y = softmax(scale * x)` given `g` = d loss / d y: fused, no graph.
pub fn softmax_backward(g: &Tensor, y: &Tensor, scale: f64) -> Result<Tensor> {
    g.contiguous()?
        .apply_op2_no_bwd(&y.contiguous()?, &Backward { scale })
}

/// `softmax(scale * xs)` over the last dimension, fused, with its fused backward attached
/// when `xs` carries a graph; `None` off the CPU or for other dtypes.
pub fn softmax_scaled(xs: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !xs.device().is_cpu() || !matches!(xs.dtype(), DType::F32 | DType::F64) || xs.rank() == 0 {
        return Ok(None);
    }
    let y = xs
        .detach()
        .contiguous()?
        .apply_op1_no_bwd(&Forward { scale })?;
    if !super::dispatch::tracked(xs) {
        return Ok(Some(y));
    }
    Ok(Some(super::attach::attach(xs, y, move |g, y| {
        g.contiguous()?
            .apply_op2_no_bwd(&y.contiguous()?, &Backward { scale })
    })?))
}
