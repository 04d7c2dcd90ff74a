//! GELU and GEGLU on the CPU in one pass each, with a fused backward. The composed forms
//! (`activation::gelu_erf`, the GEGLU of the transformer blocks) make five or six passes over
//! the feed-forward's widest activation, two of them strided copies of the gate and value
//! halves, and call libm's scalar `erff` per element; here each output element is computed once
//! from the input row, with the vectorisable Φ of [`normal_cdf_f32`](super::cpu_kernel).
//!
//! gelu(x) = x Φ(x), gelu'(x) = Φ(x) + x φ(x), φ the standard normal density.
//! The tanh approximation (transformers' `gelu_new`, diffusers' `gelu-approximate`, PixArt's
//! and T5's): x (1 + tanh u) / 2 with u = √(2/π) (x + 0.044715 x³), tanh from the vectorised
//! exp (libm's scalar `tanhf` took a sixth of PixArt's sampling step).
//! geglu([a | b]) = a gelu(b) over the last dimension, halves a and b.
//!
//! f32 and f64 on the CPU; `nn::dispatch` decides when they run.

use super::cpu_kernel::{apply1, contiguous, simd_fn, Float, Kernel1};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// φ(x) = exp(-x² / 2) / √(2π).
#[inline(always)]
fn normal_pdf<T: Float>(x: T) -> T {
    let half = T::from_f64(0.5);
    let inv_sqrt_2pi =
        T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    (-(half * x * x)).exp_fast() * inv_sqrt_2pi
}

simd_fn! {
    /// `out = x Φ(x)`.
    fn gelu_row<T: Float>(out: &mut [T], x: &[T]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = x * x.normal_cdf();
        }
    }
}

simd_fn! {
    /// `dx = g (Φ(x) + x φ(x))`.
    fn gelu_grad_row<T: Float>(dx: &mut [T], g: &[T], x: &[T]) {
        for ((d, &g), &x) in dx.iter_mut().zip(g).zip(x) {
            *d = g * (x.normal_cdf() + x * normal_pdf(x));
        }
    }
}

/// tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|): no overflow for any u.
#[inline(always)]
fn tanh_fast<T: Float>(u: T) -> T {
    let e = (-(u.abs() + u.abs())).exp_fast();
    let t = (T::one() - e) / (T::one() + e);
    if u < T::zero() {
        -t
    } else {
        t
    }
}

/// (u, tanh u) of GELU(tanh)'s inner argument at x.
#[inline(always)]
fn tanh_inner<T: Float>(x: T) -> (T, T) {
    let k = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
    let u = k * (x + T::from_f64(0.044715) * x * x * x);
    (u, tanh_fast(u))
}

simd_fn! {
    /// `out = x (1 + tanh u) / 2`.
    fn gelu_tanh_row<T: Float>(out: &mut [T], x: &[T]) {
        let half = T::from_f64(0.5);
        for (o, &x) in out.iter_mut().zip(x) {
            let (_, t) = tanh_inner(x);
            *o = half * x * (T::one() + t);
        }
    }
}

simd_fn! {
    /// `dx = g ((1 + t) / 2 + x (1 - t²) u'(x) / 2)`, u' = √(2/π) (1 + 3 · 0.044715 x²).
    fn gelu_tanh_grad_row<T: Float>(dx: &mut [T], g: &[T], x: &[T]) {
        let half = T::from_f64(0.5);
        let k = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
        let c = T::from_f64(3.0 * 0.044715);
        for ((d, &g), &x) in dx.iter_mut().zip(g).zip(x) {
            let (_, t) = tanh_inner(x);
            let du = k * (T::one() + c * x * x);
            *d = g * (half * (T::one() + t) + half * x * (T::one() - t * t) * du);
        }
    }
}

simd_fn! {
    /// `out = a gelu(b)` for the row `h = [a | b]` (out has the length of a half).
    fn geglu_row<T: Float>(out: &mut [T], h: &[T]) {
        let (a, b) = h.split_at(out.len());
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = a * (b * b.normal_cdf());
        }
    }
}

simd_fn! {
    /// `dh = [g gelu(b) | g a gelu'(b)]` for the row `h = [a | b]` and output gradient `g`.
    fn geglu_grad_row<T: Float>(dh: &mut [T], g: &[T], h: &[T]) {
        let (a, b) = h.split_at(g.len());
        let (da, db) = dh.split_at_mut(g.len());
        for ((((da, db), &g), &a), &b) in da.iter_mut().zip(db.iter_mut()).zip(g).zip(a).zip(b) {
            let cdf = b.normal_cdf();
            *da = g * (b * cdf);
            *db = g * a * (cdf + b * normal_pdf(b));
        }
    }
}

/// Which of the two functions an op computes.
#[derive(Clone, Copy)]
enum Kind {
    Gelu,
    GeluTanh,
    Geglu,
}

impl Kind {
    /// Output elements per input row of `n`.
    fn out_len(self, n: usize) -> usize {
        match self {
            Kind::Gelu | Kind::GeluTanh => n,
            Kind::Geglu => n / 2,
        }
    }
}

struct Forward(Kind);

impl Kernel1 for Forward {
    fn run<T: Float>(&self, x: &[T], l: &Layout) -> Result<Vec<T>> {
        let n = (*l.dims().last().unwrap_or(&1)).max(1);
        let m = self.0.out_len(n).max(1);
        let mut out = vec![T::zero(); x.len() / n * m];
        let rows = out.par_chunks_mut(m).zip(x.par_chunks(n));
        let rows = rows.with_min_len(super::min_rows(n));
        match self.0 {
            Kind::Gelu => rows.for_each(|(o, x)| gelu_row(o, x)),
            Kind::GeluTanh => rows.for_each(|(o, x)| gelu_tanh_row(o, x)),
            Kind::Geglu => rows.for_each(|(o, h)| geglu_row(o, h)),
        }
        Ok(out)
    }
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Gelu => "cpu-gelu",
            Kind::GeluTanh => "cpu-gelu-tanh",
            Kind::Geglu => "cpu-geglu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.0.out_len(*last);
        }
        apply1(self, s, l, Shape::from(dims))
    }
}

/// The input gradient from the output gradient `g` and the op's input `x`.
struct Backward(Kind);

impl Backward {
    fn run<T: Float>(&self, g: &[T], x: &[T], n: usize) -> Vec<T> {
        let n = n.max(1);
        let m = self.0.out_len(n).max(1);
        let mut dx = vec![T::zero(); x.len()];
        let rows = dx
            .par_chunks_mut(n)
            .zip(g.par_chunks(m).zip(x.par_chunks(n)));
        let rows = rows.with_min_len(super::min_rows(n));
        match self.0 {
            Kind::Gelu => rows.for_each(|(d, (g, x))| gelu_grad_row(d, g, x)),
            Kind::GeluTanh => rows.for_each(|(d, (g, x))| gelu_tanh_grad_row(d, g, x)),
            Kind::Geglu => rows.for_each(|(d, (g, h))| geglu_grad_row(d, g, h)),
        }
        dx
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Gelu => "cpu-gelu-backward",
            Kind::GeluTanh => "cpu-gelu-tanh-backward",
            Kind::Geglu => "cpu-geglu-backward",
        }
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = *xl.dims().last().unwrap_or(&1);
        let out = match (g, x) {
            (CpuStorage::F32(g), CpuStorage::F32(x)) => {
                CpuStorage::F32(self.run(contiguous(g, gl)?, contiguous(x, xl)?, n))
            }
            (CpuStorage::F64(g), CpuStorage::F64(x)) => {
                CpuStorage::F64(self.run(contiguous(g, gl)?, contiguous(x, xl)?, n))
            }
            _ => candle_core::bail!("cpu_gelu: f32 or f64 only"),
        };
        Ok((out, xl.shape().clone()))
    }
}

/// The fused op, with its fused backward attached when `xs` carries a graph. The caller's plan
/// ([`super::dispatch`]) has checked device and dtype.
fn fused(xs: &Tensor, kind: Kind) -> Result<Tensor> {
    let x = xs.detach().contiguous()?;
    let y = x.apply_op1_no_bwd(&Forward(kind))?;
    if !super::dispatch::tracked(xs) {
        return Ok(y);
    }
    super::attach::attach(xs, y, move |g, _| {
        g.contiguous()?.apply_op2_no_bwd(&x, &Backward(kind))
    })
}

/// Exact GELU, `x Φ(x)`, fused (CPU, f32 or f64, rank 1 or more).
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    fused(xs, Kind::Gelu)
}

/// GELU's tanh approximation, fused (CPU, f32 or f64, rank 1 or more).
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    fused(xs, Kind::GeluTanh)
}

/// GEGLU's product `a gelu(b)` for `h = [a | b]` split in halves over the last dimension (as
/// diffusers' `GEGLU`: the first half is the value, the second its gate), fused (CPU, f32 or
/// f64, an even last dimension).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    fused(h, Kind::Geglu)
}
