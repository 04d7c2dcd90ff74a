//! The linear layer's forward on the CPU, `x Wᵀ + b`, in one gemm: the output buffer starts
//! as the bias rows and gemm adds the product onto it, or, without a bias, gemm writes it
//! from scratch. candle's matmul zero-fills its output first and the bias is then a second
//! pass with a second buffer; for the transformer blocks' projections at 64x64 latents those
//! two extra passes move about 2 GB per UNet evaluation.
//!
//! f32 and f64 on the CPU; [`linear`] returns `None` otherwise.

use super::cpu_conv::{matmul_with, threads};
use super::cpu_kernel::{contiguous, Float};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `out[rows x n] = x[rows x k] w[k x n] (+ bias[n])`.
fn forward<T: Float>(x: &[T], w: &[T], bias: Option<&[T]>, (rows, k, n): Dims) -> Vec<T> {
    let len = rows * n;
    let mut out = Vec::with_capacity(len);
    if let Some(b) = bias {
        for _ in 0..rows {
            out.extend_from_slice(b);
        }
    }
    // SAFETY: out has room for rows x n; x is rows x k and w is k x n, both row-major. With a
    // bias every element is initialised and gemm adds onto it; without one gemm is told not
    // to read dst (alpha is then zero and every element of dst is written, the whole of it
    // also when k is 0), so the length is set only after gemm has written all of it.
    unsafe {
        matmul_with(
            (rows, n, k),
            (out.as_mut_ptr(), n, 1),
            bias.is_some(),
            (x.as_ptr(), k, 1),
            (w.as_ptr(), n, 1),
            threads(),
        );
        out.set_len(len);
    }
    out
}

/// (rows, in, out).
type Dims = (usize, usize, usize);

fn dims(xl: &Layout, wl: &Layout) -> Result<Dims> {
    let (rows, k) = xl.shape().dims2()?;
    let (kw, n) = wl.shape().dims2()?;
    if kw != k {
        candle_core::bail!("linear: input has {k} features, the weight takes {kw}")
    }
    Ok((rows, k, n))
}

/// The contiguous part of `s` as `T`s (an error for another dtype).
fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    contiguous(s.as_slice::<T>()?, l)
}

/// [`forward`] on the storages: x, wᵀ and, with a bias, the bias, all of dtype `T`.
fn typed<T: Float>(
    (x, xl): (&CpuStorage, &Layout),
    (w, wl): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
    d: Dims,
) -> Result<Vec<T>> {
    let b = bias.map(|(b, bl)| slice(b, bl)).transpose()?;
    Ok(forward(slice(x, xl)?, slice(w, wl)?, b, d))
}

/// The op's output from its storages: x, wᵀ and, with a bias, the bias, all of x's dtype.
fn run(
    (x, xl): (&CpuStorage, &Layout),
    (w, wl): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let d = dims(xl, wl)?;
    if let Some((_, bl)) = bias {
        if bl.shape().elem_count() != d.2 {
            candle_core::bail!("linear: bias of {:?} for {} outputs", bl.shape(), d.2)
        }
    }
    let out = match x {
        CpuStorage::F32(_) => CpuStorage::F32(typed((x, xl), (w, wl), bias, d)?),
        CpuStorage::F64(_) => CpuStorage::F64(typed((x, xl), (w, wl), bias, d)?),
        _ => candle_core::bail!("cpu_linear: f32 or f64 only"),
    };
    Ok((out, Shape::from((d.0, d.2))))
}

struct NoBias;

impl CustomOp2 for NoBias {
    fn name(&self) -> &'static str {
        "cpu-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        run((x, xl), (w, wl), None)
    }
}

struct WithBias;

impl CustomOp3 for WithBias {
    fn name(&self) -> &'static str {
        "cpu-linear-bias"
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
        run((x, xl), (w, wl), Some((b, bl)))
    }
}

/// `x2 w_t + bias` for `x2`: `[rows, in]`, `w_t`: `[in, out]`, `bias`: `[out]`, without a
/// graph. The caller's plan ([`super::dispatch`]) has checked device and dtypes.
pub fn linear(x2: &Tensor, w_t: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (x2, w_t) = (x2.detach().contiguous()?, w_t.detach().contiguous()?);
    match bias {
        Some(b) => x2.apply_op3_no_bwd(&w_t, &b.detach().contiguous()?, &WithBias),
        None => x2.apply_op2_no_bwd(&w_t, &NoBias),
    }
}
