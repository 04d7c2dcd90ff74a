//! Attention without a graph on the CPU, head by head: the scores of a block of queries are
//! written by gemm into one buffer reused for every block (no fresh, zeroed allocation per
//! block), exponentiated in place, and their product with V is written straight into the
//! output (no per-block tensors to concatenate), whose rows then take the softmax's 1 / sum.
//! At 64x64 latents the scores of one head are 4096 x 4096.
//!
//! f32 and f64 on the CPU; [`attention`] returns `None` otherwise.

use super::cpu_conv::matmul_with;
use super::cpu_kernel::{contiguous as slice, Float};
use super::cpu_softmax::softmax_row_unnormalised;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Attention {
    scale: f64,
    /// Queries per block of scores.
    rows: usize,
}

impl Attention {
    /// `q`: `[bh, n, d]`, `k`, `v`: `[bh, m, d]`, all contiguous.
    ///
    /// With at least as many heads as threads, the heads run in parallel, each on one thread
    /// from start to end (its own scores buffer, serial gemm): one parallel section per call.
    /// Parallel gemms and softmax rows inside each head would be three per head and block,
    /// and on small heads (the tiny pipeline's 256 x 256 scores) the wake-ups between them
    /// cost more than the work. Fewer heads than threads keep the parallelism inside a head.
    fn run<T: Float>(&self, q: &[T], k: &[T], v: &[T], (bh, n, m, d): Dims) -> Vec<T> {
        let mut out = vec![T::zero(); bh * n * d];
        if out.is_empty() || m == 0 {
            return out;
        }
        let threads = rayon::current_num_threads().max(1);
        let heads = |h: usize| (&q[h * n * d..], &k[h * m * d..], &v[h * m * d..]);
        if threads > 1 && bh >= threads {
            // The scores of all threads together stay within the one block of `rows`.
            let rows = (self.rows / threads).clamp(1, n);
            // Tiny heads are grouped so that a task holds some 32K scores.
            let per_task = ((1usize << 15) / (n * m)).max(1);
            out.par_chunks_mut(n * d)
                .enumerate()
                .with_min_len(per_task)
                .for_each_init(
                    || (vec![T::zero(); rows * m], vec![T::zero(); rows]),
                    |(scores, sums), (h, out_h)| {
                        let scratch = (&mut scores[..], &mut sums[..]);
                        self.head(heads(h), out_h, scratch, rows, (n, m, d), false)
                    },
                );
        } else {
            let rows = self.rows.clamp(1, n);
            let (mut scores, mut sums) = (vec![T::zero(); rows * m], vec![T::zero(); rows]);
            for (h, out_h) in out.chunks_mut(n * d).enumerate() {
                let scratch = (&mut scores[..], &mut sums[..]);
                self.head(heads(h), out_h, scratch, rows, (n, m, d), true);
            }
        }
        out
    }

    /// One head: `out_h` (n x d) from its q (n x d), k and v (m x d), `rows` queries at a
    /// time through `scores` (at least rows x m) and `inv_sums` (at least rows): the
    /// probabilities stay unnormalised and each output row is scaled by its 1 / sum instead,
    /// which saves a pass over the scores. With `parallel`, the gemms and the softmax rows use every
    /// thread; else the calling one.
    fn head<T: Float>(
        &self,
        (qh, kh, vh): (&[T], &[T], &[T]),
        out_h: &mut [T],
        (scores, inv_sums): (&mut [T], &mut [T]),
        rows: usize,
        (n, m, d): (usize, usize, usize),
        parallel: bool,
    ) {
        let scale = T::from_f64(self.scale);
        let threads = if parallel {
            super::cpu_conv::threads()
        } else {
            gemm::Parallelism::None
        };
        for r0 in (0..n).step_by(rows) {
            let len = rows.min(n - r0);
            // SAFETY: scores holds len x m; the query block is len x d inside q[h]; kᵀ is
            // a stride view (d x m) of k[h] (m x d).
            unsafe {
                matmul_with(
                    (len, m, d),
                    (scores.as_mut_ptr(), m, 1),
                    false,
                    (qh[r0 * d..].as_ptr(), d, 1),
                    (kh.as_ptr(), 1, d),
                    threads,
                )
            };
            let (block, sums) = (&mut scores[..len * m], &mut inv_sums[..len]);
            let softmax = |(row, inv): (&mut [T], &mut T)| {
                *inv = softmax_row_unnormalised(row, scale);
            };
            if parallel {
                let rows = block.par_chunks_mut(m).zip(sums.par_iter_mut());
                rows.with_min_len(super::min_rows(m)).for_each(softmax);
            } else {
                block.chunks_mut(m).zip(sums.iter_mut()).for_each(softmax);
            }
            let dst = &mut out_h[r0 * d..(r0 + len) * d];
            // SAFETY: dst is len x d; the probabilities len x m; v[h] m x d.
            unsafe {
                matmul_with(
                    (len, d, m),
                    (dst.as_mut_ptr(), d, 1),
                    false,
                    (scores.as_ptr(), m, 1),
                    (vh.as_ptr(), d, 1),
                    threads,
                )
            };
            // The softmax's normalisation, on the output rows.
            for (row, &inv) in dst.chunks_mut(d).zip(&inv_sums[..len]) {
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
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
/// `rows` queries of one head at a time; `None` for shapes that do not fit. The caller's plan
/// ([`super::dispatch`]) has checked device and dtypes; inputs on a graph are refused (the op
/// has no backward; `nn::attention` gives those one).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<Option<Tensor>> {
    if [q, k, v].iter().any(|t| super::dispatch::tracked(t)) {
        candle_core::bail!("cpu_attention: inputs on a graph (use nn::attention)");
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
