//! Fused CPU group norm (+ optional SiLU): one parallel pass for the statistics and one for
//! the output, where the composed version makes a dozen single-threaded passes, each with a
//! fresh buffer. On the gradient path the backward is one fused kernel too: the closed form of
//! the normalisation's input gradient after the affine map and SiLU, with frozen weight and
//! bias. Statistics are accumulated in f64.
//!
//! f32 and f64 on the CPU with frozen weights only; [`group_norm`] returns `None` otherwise and
//! the caller uses the composed ops.

use super::cpu_kernel::{apply1, dot_centered, mean_var_f64, simd_fn, sum, Float, Kernel1};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Per-group mean and 1/sigma, `[b * groups]` each.
type Stats = Arc<Vec<(f64, f64)>>;

#[derive(Clone, Copy)]
struct Geom {
    rows: usize,
    channels_per_group: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl Geom {
    fn row_len(&self) -> usize {
        self.channels_per_group * self.spatial
    }
    /// The first channel of row `r`.
    fn first_channel(&self, r: usize) -> usize {
        (r % self.groups) * self.channels_per_group
    }
}

/// The value as f64 (`WithDType`'s, not num_traits' fallible one).
#[inline(always)]
fn f64_of<T: Float>(v: T) -> f64 {
    candle_core::WithDType::to_f64(v)
}

#[inline(always)]
fn sigmoid<T: Float>(z: T) -> T {
    T::one() / (T::one() + (-z).exp_fast())
}

fn slice<T: Float>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

simd_fn! {
    /// One row (one group of one image) of the forward: its output and (mean, 1 / sigma).
    fn forward_row<T: Float>(
        out: &mut [T],
        row: &[T],
        w: &[T],
        b: &[T],
        g: &Geom,
        r: usize,
    ) -> (f64, f64) {
        let (mean, var) = mean_var_f64(row);
        let rstd = 1.0 / (var + g.eps).sqrt();
        let c0 = g.first_channel(r);
        for (cc, (o, v)) in out
            .chunks_mut(g.spatial)
            .zip(row.chunks(g.spatial))
            .enumerate()
        {
            // z = (x - mean) * rstd * w + b = x * scale + shift
            let scale = rstd * f64_of(w[c0 + cc]);
            let shift = f64_of(b[c0 + cc]) - mean * scale;
            let (scale, shift) = (T::from_f64(scale), T::from_f64(shift));
            if g.silu {
                for (o, &v) in o.iter_mut().zip(v) {
                    let z = v * scale + shift;
                    *o = z * sigmoid(z);
                }
            } else {
                for (o, &v) in o.iter_mut().zip(v) {
                    *o = v * scale + shift;
                }
            }
        }
        (mean, rstd)
    }
}

simd_fn! {
    /// One row of the backward: `out` = d loss / d x given `dy`, for the row `(x, dy)`.
    fn backward_row<T: Float>(
        out: &mut [T],
        rows: (&[T], &[T]),
        stats: (f64, f64),
        affine: (&[T], &[T]),
        g: &Geom,
        r: usize,
    ) {
        let ((xr, dr), (mean, rstd), (w, b)) = (rows, stats, affine);
        let n = xr.len();
        let c0 = g.first_channel(r);
        let (tm, tr) = (T::from_f64(mean), T::from_f64(rstd));
        // Pass 1: d loss / d xhat into `out`, and its sums against 1 and xhat.
        let (mut s1, mut s2) = (0.0, 0.0);
        for (cc, ((o, xs), ds)) in out
            .chunks_mut(g.spatial)
            .zip(xr.chunks(g.spatial))
            .zip(dr.chunks(g.spatial))
            .enumerate()
        {
            let (wc, bc) = (w[c0 + cc], b[c0 + cc]);
            for ((o, &xv), &d) in o.iter_mut().zip(xs).zip(ds) {
                let xhat = (xv - tm) * tr;
                *o = if g.silu {
                    let z = xhat * wc + bc;
                    let s = sigmoid(z);
                    d * s * (T::one() + z * (T::one() - s))
                } else {
                    d
                } * wc;
            }
            s1 += f64_of(sum(o));
            s2 += f64_of(dot_centered(o, xs, tm, tr));
        }
        let (m1, m2) = (T::from_f64(s1 / n as f64), T::from_f64(s2 / n as f64));
        // Pass 2: dx = (d - mean(d) - xhat mean(d xhat)) / sigma.
        for (o, &xv) in out.iter_mut().zip(xr) {
            let xhat = (xv - tm) * tr;
            *o = tr * (*o - m1 - xhat * m2);
        }
    }
}

fn forward_impl<T: Float>(x: &[T], w: &[T], b: &[T], g: &Geom) -> (Vec<T>, Vec<(f64, f64)>) {
    let n = g.row_len();
    let mut y = vec![T::zero(); x.len()];
    let mut stats = vec![(0.0, 0.0); g.rows];
    y.par_chunks_mut(n)
        .zip(stats.par_iter_mut())
        .with_min_len(super::min_rows(n))
        .enumerate()
        .for_each(|(r, (out, st))| {
            *st = forward_row(out, &x[r * n..(r + 1) * n], w, b, g, r);
        });
    (y, stats)
}

fn backward_impl<T: Float>(
    dy: &[T],
    x: &[T],
    stats: &[(f64, f64)],
    w: &[T],
    b: &[T],
    g: &Geom,
) -> Vec<T> {
    let n = g.row_len();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(n)
        .with_min_len(super::min_rows(n))
        .enumerate()
        .for_each(|(r, out)| {
            let rows = (&x[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
            backward_row(out, rows, stats[r], (w, b), g, r);
        });
    dx
}

struct Forward {
    weight: Tensor,
    bias: Tensor,
    g: Geom,
    stats: Mutex<Option<Vec<(f64, f64)>>>,
}

impl Kernel1 for Forward {
    fn run<T: Float>(&self, x: &[T], _: &Layout) -> Result<Vec<T>> {
        let (y, stats) = forward_impl(
            x,
            &slice::<T>(&self.weight)?,
            &slice::<T>(&self.bias)?,
            &self.g,
        );
        *self.stats.lock().expect("stats lock") = Some(stats);
        Ok(y)
    }
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "cpu-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        apply1(self, s, l, l.shape().clone())
    }
}

struct Backward {
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    stats: Stats,
    g: Geom,
}

impl Kernel1 for Backward {
    fn run<T: Float>(&self, dy: &[T], _: &Layout) -> Result<Vec<T>> {
        let x = slice::<T>(&self.x)?;
        Ok(backward_impl(
            dy,
            &x,
            &self.stats,
            &slice::<T>(&self.weight)?,
            &slice::<T>(&self.bias)?,
            &self.g,
        ))
    }
}

impl CustomOp1 for Backward {
    fn name(&self) -> &'static str {
        "cpu-group-norm-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        apply1(self, s, l, l.shape().clone())
    }
}

/// `silu?(group_norm(x) * weight + bias)` for `x` of `[b, c, ...]` (rank 2 or more), fused,
/// with an input-only backward when `x` carries a graph. The caller's plan
/// ([`super::dispatch`]) has checked device and dtypes and that the weights are frozen.
pub fn group_norm(
    xs: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    let dims = xs.dims();
    let (b, c) = (dims[0], dims[1]);
    let g = Geom {
        rows: b * groups,
        channels_per_group: c / groups,
        spatial: dims[2..].iter().product(),
        groups,
        eps,
        silu,
    };
    let x = xs.detach().contiguous()?;
    let op = Forward {
        weight: weight.clone(),
        bias: bias.clone(),
        g,
        stats: Mutex::new(None),
    };
    let y = x.apply_op1_no_bwd(&op)?;
    if !super::dispatch::tracked(xs) {
        return Ok(y);
    }
    let stats: Stats = Arc::new(
        op.stats
            .lock()
            .expect("stats lock")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("cpu_norm: no statistics".into()))?,
    );
    let backward = Backward {
        x,
        weight: weight.clone(),
        bias: bias.clone(),
        stats,
        g,
    };
    let backward = Arc::new(backward);
    super::attach::attach(xs, y, move |dy, _| {
        dy.contiguous()?.apply_op1_no_bwd(backward.as_ref())
    })
}
