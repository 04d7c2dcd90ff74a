//! Layer norm over the last dimension with an affine, in one pass over each row, for calls
//! without a graph (sampling). Composed of candle's ops it is seven passes over the activation
//! (mean, centring, squares, their sum, the division, then the affine's product and sum), each
//! with a buffer of its own; the transformers of SD, SDXL and PixArt run it two or three times
//! per block. Here each row's mean and variance are taken in f64 and the row is written once.
//!
//! The affine may differ per group of consecutive rows: `w`, `b` are `[groups, d]`, row `r` of
//! `rows` uses group `r / (rows / groups)`. One group is `nn.LayerNorm`'s weight and bias;
//! PixArt's modulation `norm(x) (1 + scale) + shift` is a group per batch element.
//!
//! f32 and f64 on the CPU, forward only; `nn::norm` decides when it runs.

use super::cpu_kernel::{contiguous, mean_var_f64, simd_fn, Float};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

simd_fn! {
    /// `out = (x - mean) rstd w + b`.
    fn row<T: Float>(out: &mut [T], x: &[T], w: &[T], b: &[T], mean: T, rstd: T) {
        for (((o, &x), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
            *o = (x - mean) * rstd * w + b;
        }
    }
}

fn run<T: Float>(x: &[T], w: &[T], b: &[T], d: usize, eps: f64) -> Vec<T> {
    let groups = (w.len() / d).max(1);
    let per_group = (x.len() / d / groups).max(1);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(r, (o, xr))| {
            let g = (r / per_group).min(groups - 1);
            let (mean, var) = mean_var_f64(xr);
            let rstd = 1.0 / (var + eps).sqrt();
            let (wg, bg) = (&w[g * d..(g + 1) * d], &b[g * d..(g + 1) * d]);
            row(o, xr, wg, bg, T::from_f64(mean), T::from_f64(rstd));
        });
    out
}

struct LayerNormRows {
    eps: f64,
}

impl CustomOp3 for LayerNormRows {
    fn name(&self) -> &'static str {
        "layer-norm-rows"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = xl.shape().dims().last().copied().unwrap_or(0);
        let out = match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(run(
                contiguous(x, xl)?,
                contiguous(w, wl)?,
                contiguous(b, bl)?,
                d,
                self.eps,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(run(
                contiguous(x, xl)?,
                contiguous(w, wl)?,
                contiguous(b, bl)?,
                d,
                self.eps,
            )),
            _ => candle_core::bail!("layer-norm-rows: f32 or f64 inputs of one dtype"),
        };
        Ok((out, xl.shape().clone()))
    }
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension `d` of `x`, with `w` and
/// `b` of `[groups, d]` (or `[d]`) applying to consecutive equal groups of rows. No graph:
/// the caller checks that none of the inputs carries one.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let groups = w.elem_count() / d.max(1);
    if d == 0
        || w.elem_count() != groups * d
        || b.elem_count() != w.elem_count()
        || groups == 0
        || !rows.is_multiple_of(groups)
    {
        candle_core::bail!(
            "layer-norm-rows: x {:?} with an affine of {:?} and {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        )
    }
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &LayerNormRows { eps })
}
