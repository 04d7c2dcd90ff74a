//! Attention without a graph on the CPU, one head at a time: the scores of a block of queries
//! are written by gemm into one buffer reused for every block (no fresh, zeroed allocation per
//! block), softmax runs on them in place, and their product with V is written straight into
//! the output (no per-block tensors to concatenate). At 64x64 latents the scores of one head
//! are 4096 x 4096.
//!
//! f32 and f64 on the CPU; [`attention`] returns `None` otherwise.

use super::cpu_conv::matmul;
use super::cpu_kernel::{contiguous as slice, Float};
use super::cpu_softmax::softmax_row_in_place;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Attention {
    scale: f64,
    /// Queries per block of scores.
    rows: usize,
}

impl Attention {
    /// `q`: `[bh, n, d]`, `k`, `v`: `[bh, m, d]`, all contiguous.
    fn run<T: Float>(&self, q: &[T], k: &[T], v: &[T], (bh, n, m, d): Dims) -> Vec<T> {
        let mut out = vec![T::zero(); bh * n * d];
        let rows = self.rows.clamp(1, n.max(1));
        let mut scores = vec![T::zero(); rows * m];
        let scale = T::from_f64(self.scale);
        for h in 0..bh {
            let (qh, kh, vh) = (&q[h * n * d..], &k[h * m * d..], &v[h * m * d..]);
            for r0 in (0..n).step_by(rows) {
                let len = rows.min(n - r0);
                // SAFETY: scores holds len x m; the query block is len x d inside q[h]; kᵀ is
                // a stride view (d x m) of k[h] (m x d).
                unsafe {
                    matmul(
                        (len, m, d),
                        (scores.as_mut_ptr(), m, 1),
                        false,
                        (qh[r0 * d..].as_ptr(), d, 1),
                        (kh.as_ptr(), 1, d),
                    )
                };
                scores[..len * m]
                    .par_chunks_mut(m.max(1))
                    .with_min_len(super::min_rows(m))
                    .for_each(|row| softmax_row_in_place(row, scale));
                let dst = &mut out[(h * n + r0) * d..(h * n + r0 + len) * d];
                // SAFETY: dst is len x d; the probabilities len x m; v[h] m x d.
                unsafe {
                    matmul(
                        (len, d, m),
                        (dst.as_mut_ptr(), d, 1),
                        false,
                        (scores.as_ptr(), m, 1),
                        (vh.as_ptr(), d, 1),
                    )
                };
            }
        }
        out
    }
}

type Dims = (usize, usize, usize, usize);

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bh, n, d) = ql.shape().dims3()?;
        let m = kl.shape().dims3()?.1;
        let dims = (bh, n, m, d);
        let out = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(slice(q, ql)?, slice(k, kl)?, slice(v, vl)?, dims))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                CpuStorage::F64(self.run(slice(q, ql)?, slice(k, kl)?, slice(v, vl)?, dims))
            }
            _ => candle_core::bail!("cpu_attention: f32 or f64 only"),
        };
        Ok((out, Shape::from((bh, n, d))))
    }
}

/// `softmax(scale q kᵀ) v` for `q`: `[bh, n, d]`, `k`, `v`: `[bh, m, d]`, without a graph,
/// `rows` queries of one head at a time; `None` off the CPU, for other dtypes, shapes that do
/// not fit, or inputs on a graph (the op has no backward; `nn::attention` gives those one).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<Option<Tensor>> {
    let cpu = [q, k, v].iter().all(|t| t.device().is_cpu());
    if [q, k, v].iter().any(|t| t.is_variable() || t.track_op()) {
        return Ok(None);
    }
    let dtype = q.dtype();
    let same = k.dtype() == dtype && v.dtype() == dtype;
    if !cpu || !same || !matches!(dtype, DType::F32 | DType::F64) {
        return Ok(None);
    }
    let ((bh, _, d), (bk, m, dk), (bv, mv, dv)) = (q.dims3()?, k.dims3()?, v.dims3()?);
    if bk != bh || bv != bh || dk != d || dv != d || mv != m {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(Some(q.apply_op3_no_bwd(
        &k,
        &v,
        &Attention { scale, rows },
    )?))
}
