//! Differentiable building blocks shared by every model.
//!
//! Every op asks [`dispatch`] once how to run (our fused CPU kernels, or device-generic candle
//! ops) and which gradients to give; ops on frozen weights attach an input-only backward
//! ([`attach`]). candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` return a
//! silently wrong gradient, so they are never used; each block is proven by a
//! finite-difference check in `tests/gradcheck.rs`, with both kernel choices.

pub mod activation;
pub mod attach;
pub mod context;
pub mod conv;
pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_gelu;
mod cpu_kernel;
pub mod cpu_layer_norm;
pub mod cpu_linear;
pub mod cpu_norm;
pub mod cpu_packed;
pub mod cpu_softmax;
pub mod dispatch;
pub mod linear;
pub mod norm;

pub use activation::Activation;
pub use conv::{Conv2d, Downsample2D};
#[doc(hidden)]
pub use cpu_kernel::{exp_f32, force_simd_level, normal_cdf_f32};
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm};

use candle_core::{Result, Tensor, D};
use dispatch::Grad;

/// Rows of `row_len` elements per parallel task in the CPU kernels: at least 32K elements, so
/// small tensors (the tiny models' whole activations) run on one thread without wake-ups.
pub(crate) fn min_rows(row_len: usize) -> usize {
    ((1usize << 15) / row_len.max(1)).max(1)
}

/// Softmax over the last dimension, built from basic ops. The row maximum is subtracted for
/// stability; it is detached because softmax is invariant to that shift (its gradient is zero).
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Nearest-neighbour 2x upsampling of `[b, c, h, w]`, as a broadcast + reshape so that its
/// backward is the sum over each 2x2 cell (candle's own op overwrites accumulated gradients).
pub fn upsample_nearest_2x(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    xs.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

/// Nearest-neighbour resize of `[b, c, h, w]` to `[b, c, oh, ow]` as torch's
/// `interpolate(mode="nearest")` picks rows (`floor(i * h / oh)` in f32): diffusers' UNet
/// upsamples this way to its skip connection's size when the latents are not a multiple of
/// its downsampling. A gather, so its gradient is the scatter-add of the output's.
pub fn upsample_nearest_to(xs: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let index = |n: usize, out: usize| -> Result<Tensor> {
        let scale = n as f32 / out as f32;
        let idx: Vec<u32> = (0..out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(n - 1) as u32)
            .collect();
        Tensor::from_vec(idx, out, xs.device())
    };
    xs.index_select(&index(h, oh)?, 2)?
        .index_select(&index(w, ow)?, 3)
}

/// Multi-head scaled dot-product attention.
///
/// # Shapes
/// `q`: `[b, n, heads * d]`, `k`, `v`: `[b, m, heads * d]` -> `[b, n, heads * d]`.
/// Scores of half-precision inputs are always computed and normalised in f32 (what diffusers'
/// `upcast_attention` / `upcast_softmax` ask for, so those config values need no flag here).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    attention_blocked(q, k, v, heads, mask, SCORES_BLOCK)
}

/// [`attention`] with at most `block` score elements at a time where the mask allows it (tests
/// exercise the blocking with small values).
#[doc(hidden)]
pub fn attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    block: usize,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, len, d))
    };
    let dtype = q.dtype();
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let half = matches!(dtype, candle_core::DType::F16 | candle_core::DType::BF16);
    // Half-precision scores are computed and normalised in f32 (as PyTorch's fused attention
    // kernels accumulate them under autocast); the probabilities meet V in V's dtype.
    let (q, k) = if half {
        (
            q.to_dtype(candle_core::DType::F32)?,
            k.to_dtype(candle_core::DType::F32)?,
        )
    } else {
        (q, k)
    };
    let scale = 1.0 / (d as f64).sqrt();
    let plan = dispatch::plan(&[&q, &k, &v], &[]);
    // The queries go in row blocks so the scores never exceed `block` elements (at 64x64
    // latents the full matrix is 2 x 8 x 4096 x 4096).
    let rows = (block / (b * heads * m).max(1)).clamp(1, n);
    let out = match (mask, plan.grad) {
        (None, Grad::None) => in_query_blocks(&q, &k, &v, scale, block, plan.fused)?,
        (None, _) => attention_recomputing(&q, &k, &v, scale, (rows, block), plan.fused)?,
        // Masked attention (the text encoder's causal mask) is never on ReNeg's gradient path.
        (Some(_), _) => scores_times_v(&q, &k, &v, scale, mask, dtype, plan.fused)?,
    };
    out.reshape((b, heads, n, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, inner))
}

/// Attention on the gradient path without keeping the attention probabilities: the forward
/// runs in query blocks without a graph, and the backward recomputes each block's
/// probabilities (as memory-efficient attention does). For `[bh, n, d]` q and `[bh, m, d]` k, v:
/// with P = softmax(scale q k^T), dV = P^T dO, dP = dO V^T, dS = scale P (dP - rowsum(dP P)),
/// dQ = dS K, dK = dS^T Q.
fn attention_recomputing(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    (rows, block): (usize, usize),
    fused: bool,
) -> Result<Tensor> {
    let n = q.dim(1)?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let out = in_query_blocks(&qd, &kd, &vd, scale, block, fused)?;
    let probs = move |q: &Tensor, k: &Tensor, r: usize| -> Result<Tensor> {
        let raw = q.narrow(1, r, rows.min(n - r))?.matmul(&k.t()?)?;
        softmax_scores(raw, scale, fused)
    };
    attach::attach3((q, k, v), out, move |dout| {
        let dout = dout.contiguous()?;
        let (mut dk, mut dv) = (kd.zeros_like()?, vd.zeros_like()?);
        let mut dq = Vec::new();
        for r in (0..n).step_by(rows) {
            let len = rows.min(n - r);
            let p = probs(&qd, &kd, r)?;
            let dob = dout.narrow(1, r, len)?;
            dv = (dv + p.to_dtype(vd.dtype())?.t()?.matmul(&dob)?)?;
            let dp = dob.matmul(&vd.t()?)?;
            let ds = softmax_scores_backward(&dp, &p, scale, fused)?.to_dtype(qd.dtype())?;
            dq.push(ds.matmul(&kd)?);
            dk = (dk + ds.t()?.matmul(&qd.narrow(1, r, len)?)?)?;
        }
        Ok((Tensor::cat(&dq, 1)?, dk, dv))
    })
}

/// `softmax(scale * raw)` over the last dimension of scratch scores (no graph): in place by
/// the fused kernel, else from candle ops in f32 (as PyTorch's autocast runs softmax).
fn softmax_scores(raw: Tensor, scale: f64, fused: bool) -> Result<Tensor> {
    if fused {
        if let Some(p) = cpu_softmax::softmax_scaled_in_place(raw.clone(), scale)? {
            return Ok(p);
        }
    }
    softmax_last_dim(&(at_least_f32(&raw)? * scale)?)
}

/// Half-precision tensors in f32 (softmax statistics, as autocast keeps them); f32 and f64 as
/// they are.
pub(crate) fn at_least_f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(crate::precision::activation_dtype(t.dtype()))
}

/// The input gradient of `p = softmax(scale * x)` from `dp`: scale p (dp - rowsum(dp p)),
/// without a graph; in f32 off the fused path.
fn softmax_scores_backward(dp: &Tensor, p: &Tensor, scale: f64, fused: bool) -> Result<Tensor> {
    if fused {
        return cpu_softmax::softmax_backward(dp, p, scale);
    }
    let (dp, p) = (at_least_f32(dp)?, at_least_f32(p)?);
    let dot = (&dp * &p)?.sum_keepdim(D::Minus1)?;
    (dp.broadcast_sub(&dot)? * p)? * scale
}

/// Elements of one block of attention scores (64 MB in f32).
const SCORES_BLOCK: usize = 16 << 20;

/// [`scores_times_v`] without a mask and without a graph, with at most `block` score elements
/// at a time: one head at a time on the CPU ([`cpu_attention`]), else query blocks over all
/// heads.
fn in_query_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    block: usize,
    fused: bool,
) -> Result<Tensor> {
    let (bh, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let dtype = v.dtype();
    if fused {
        let per_head = (block / m.max(1)).clamp(1, n.max(1));
        if let Some(out) = cpu_attention::attention(q, k, v, scale, per_head)? {
            return Ok(out);
        }
    }
    let rows = (block / (bh * m).max(1)).clamp(1, n.max(1));
    let blocks = (0..n)
        .step_by(rows)
        .map(|r| {
            let qb = q.narrow(1, r, rows.min(n - r))?;
            scores_times_v(&qb, k, v, scale, None, dtype, fused)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 1)
}

/// softmax(q k^T scale + mask) v for `[bh, n, d]` queries.
fn scores_times_v(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    dtype: candle_core::DType,
    fused: bool,
) -> Result<Tensor> {
    let raw = q.matmul(&k.t()?)?;
    let probs = match mask {
        // Without a graph the scores are scratch: softmax overwrites them.
        None if !dispatch::tracked(&raw) => softmax_scores(raw, scale, fused)?,
        // Masked (the text encoder's causal mask; `attention_blocked` recomputes the unmasked
        // case on a graph): composed, so its backward is candle's.
        _ => {
            let mut scores = (at_least_f32(&raw)? * scale)?;
            if let Some(mask) = mask {
                scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
            }
            softmax_last_dim(&scores)?
        }
    }
    .to_dtype(dtype)?;
    probs.matmul(v)
}
