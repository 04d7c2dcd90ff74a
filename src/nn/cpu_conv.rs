//! CPU conv2d forward and input gradient as tiled im2col / col2im around one `gemm` call per
//! tile, reading the kernel in place. candle 0.11's CPU conv2d reorders the whole kernel on
//! every call (single-threaded) and writes NHWC before transposing; at SD sizes that was about
//! half of a UNet evaluation. The input gradient multiplies by the transposed kernel (a stride
//! view, nothing copied) and scatters back with col2im, so no flipped kernel is built either.
//!
//! f32 and f64 on the CPU only; callers fall back to candle's conv2d otherwise
//! ([`supported`]). The ops carry no backward: they run on inputs without a graph, and
//! `nn::conv` attaches the input gradient through `nn::frozen`.

use super::cpu_kernel::{apply1, simd_fn, Float, Kernel1};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

mod winograd;

/// Elements of the im2col buffer per tile (16 MB in f32): bounds memory at large images and
/// keeps a tile near the caches (measured best among 1M, 4M and 16M elements).
const COLS_BUDGET: usize = 4 << 20;

/// Geometry of one square-kernel convolution, dilation 1, groups 1.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    /// Elements of the im2col buffer per tile (of Winograd's buffers per chunk).
    budget: usize,
    algo: Algo,
}

/// How a convolution is computed. `Auto` picks Winograd F(4x4, 3x3) where it measured faster
/// (large images, 3x3, stride 1; see `winograd::pays_off`) and im2col + gemm elsewhere; the
/// others force one (tests and benches compare them).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    Auto,
    Im2col,
    Winograd,
}

impl Geom {
    fn oh(&self) -> usize {
        (self.h + 2 * self.padding - self.k) / self.stride + 1
    }
    fn ow(&self) -> usize {
        (self.w + 2 * self.padding - self.k) / self.stride + 1
    }
    /// Rows of the im2col matrix: the kernel's own `[c_in, k, k]` order.
    fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }
    /// A 1x1, stride-1, unpadded conv is a plain matmul on the input.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }
    fn winograd(&self) -> bool {
        match self.algo {
            Algo::Auto => match auto_override() {
                Some(forced) => forced && winograd::applies(self),
                None => winograd::pays_off(self),
            },
            Algo::Im2col => false,
            Algo::Winograd => true,
        }
    }
    fn tile(&self) -> usize {
        let m = self.oh() * self.ow();
        // Equal tiles: a short last tile runs gemm's slow edge kernels.
        let tiles = (self.rows() * m)
            .div_ceil(self.budget.max(1))
            .clamp(1, m.max(1));
        m.div_ceil(tiles)
    }
}

/// `RENEG_CONV_ALGO=im2col` or `winograd` overrides `Algo::Auto`'s choice (Winograd still
/// only where it applies), for side-by-side benchmarks; unset or `auto`, the choice stands.
fn auto_override() -> Option<bool> {
    static OVERRIDE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| match std::env::var("RENEG_CONV_ALGO").as_deref() {
        Ok("im2col") => Some(false),
        Ok("winograd") => Some(true),
        _ => None,
    })
}

/// Whether the fast path handles tensors like `x` and `kernel`.
pub fn supported(x: &Tensor, kernel: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && kernel.dtype() == x.dtype()
        && kernel.dim(2).ok() == kernel.dim(3).ok()
}

/// gemm's parallelism: candle's thread count, as for its own matmuls.
pub(crate) fn threads() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, each given as (pointer, row stride, col stride).
///
/// # Safety
/// The pointers and strides must describe valid, non-overlapping (for `dst`) memory.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Float>(
    mnk: (usize, usize, usize),
    dst: (*mut T, usize, usize),
    accumulate: bool,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
) {
    matmul_with(mnk, dst, accumulate, lhs, rhs, threads())
}

/// [`matmul`] on the given threads.
///
/// # Safety
/// As for [`matmul`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_with<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    accumulate: bool,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        T::from_f64(1.0),
        T::from_f64(1.0),
        false,
        false,
        false,
        parallelism,
    );
}

/// The output-row segments of the tile of pixels `p0..p0 + n`: `(oy, ox_from, ox_to, j)` with
/// `j` the segment's first column in the tile.
#[inline(always)]
fn segments(p0: usize, n: usize, ow: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut p = p0;
    std::iter::from_fn(move || {
        if p >= p0 + n {
            return None;
        }
        let (oy, ox) = (p / ow, p % ow);
        let to = ow.min(ox + p0 + n - p);
        let seg = (oy, ox, to, p - p0);
        p += to - ox;
        Some(seg)
    })
}

/// For kernel column `kj`: the output columns whose input column `ox * s + kj - pad` lies
/// inside `0..w`, as a range clamped to `from..to`.
#[inline(always)]
fn valid_cols(g: &Geom, kj: usize, from: usize, to: usize) -> (usize, usize) {
    let (s, pad, w) = (g.stride, g.padding, g.w);
    let lo = if pad > kj { (pad - kj).div_ceil(s) } else { 0 };
    let hi = if w + pad > kj {
        (w + pad - kj).div_ceil(s)
    } else {
        0
    };
    let lo = lo.clamp(from, to);
    (lo, hi.clamp(lo, to))
}

/// Fills `cols[r, j]` (`j` over output pixels `p0..p0 + n`) with the input under kernel
/// position `r = (ci, ki, kj)`, zero where the kernel hangs over the padding. Works on whole
/// row segments (a memcpy at stride 1).
fn im2col<T: Float>(x: &[T], g: &Geom, p0: usize, n: usize, cols: &mut [T]) {
    let (k, s, pad, ow) = (g.k, g.stride, g.padding, g.ow());
    let zero = T::from_f64(0.0);
    let plane = g.h * g.w;
    cols[..g.rows() * n]
        .par_chunks_mut(k * k * n)
        .with_min_len(super::min_rows(k * k * n))
        .enumerate()
        .for_each(|(ci, rows)| {
            let src = &x[ci * plane..(ci + 1) * plane];
            for ki in 0..k {
                for kj in 0..k {
                    let row = &mut rows[(ki * k + kj) * n..(ki * k + kj + 1) * n];
                    for (oy, from, to, j) in segments(p0, n, ow) {
                        let dst = &mut row[j..j + to - from];
                        let iy = (oy * s + ki) as isize - pad as isize;
                        if iy < 0 || iy as usize >= g.h {
                            dst.fill(zero);
                            continue;
                        }
                        let line = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
                        let (lo, hi) = valid_cols(g, kj, from, to);
                        dst[..lo - from].fill(zero);
                        dst[hi - from..].fill(zero);
                        if hi == lo {
                            continue;
                        }
                        let first = lo * s + kj - pad;
                        if s == 1 {
                            dst[lo - from..hi - from]
                                .copy_from_slice(&line[first..first + hi - lo]);
                        } else {
                            for (d, v) in dst[lo - from..hi - from]
                                .iter_mut()
                                .zip(line[first..].iter().step_by(s))
                            {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        });
}

/// The adjoint of [`im2col`]: adds `cols[r, j]` into the input position it was read from.
fn col2im<T: Float>(cols: &[T], g: &Geom, p0: usize, n: usize, dx: &mut [T]) {
    let k = g.k;
    dx.par_chunks_mut(g.h * g.w)
        .with_min_len(super::min_rows(k * k * n))
        .enumerate()
        .for_each(|(ci, dst)| {
            col2im_channel(&cols[ci * k * k * n..(ci + 1) * k * k * n], g, (p0, n), dst)
        });
}

simd_fn! {
    /// [`col2im`] for one input channel: `rows` is its `k * k` rows of the tile.
    fn col2im_channel<T: Float>(rows: &[T], g: &Geom, tile: (usize, usize), dst: &mut [T]) {
        let (p0, n) = tile;
        let (k, s, pad, ow) = (g.k, g.stride, g.padding, g.ow());
        for ki in 0..k {
            for kj in 0..k {
                let row = &rows[(ki * k + kj) * n..(ki * k + kj + 1) * n];
                for (oy, from, to, j) in segments(p0, n, ow) {
                    let iy = (oy * s + ki) as isize - pad as isize;
                    if iy < 0 || iy as usize >= g.h {
                        continue;
                    }
                    let line = &mut dst[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let (lo, hi) = valid_cols(g, kj, from, to);
                    if hi == lo {
                        continue;
                    }
                    let first = lo * s + kj - pad;
                    let seg = &row[j + lo - from..j + hi - from];
                    if s == 1 {
                        for (d, v) in line[first..first + seg.len()].iter_mut().zip(seg) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in line[first..].iter_mut().step_by(s).zip(seg) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    }
}

fn forward_impl<T: Float>(x: &[T], kernel: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    if g.winograd() {
        return winograd::forward(x, kernel, bias, g);
    }
    let (m, rows) = (g.oh() * g.ow(), g.rows());
    let mut out = vec![T::from_f64(0.0); g.b * g.c_out * m];
    if let Some(bias) = bias {
        out.par_chunks_mut(m)
            .with_min_len(super::min_rows(m))
            .enumerate()
            .for_each(|(i, plane)| plane.fill(bias[i % g.c_out]));
    }
    let tile = g.tile();
    let mut cols = if g.pointwise() {
        Vec::new()
    } else {
        vec![T::from_f64(0.0); rows * tile]
    };
    for bi in 0..g.b {
        let xb = &x[bi * g.c_in * g.h * g.w..(bi + 1) * g.c_in * g.h * g.w];
        let ob = &mut out[bi * g.c_out * m..(bi + 1) * g.c_out * m];
        for p0 in (0..m).step_by(tile) {
            let n = tile.min(m - p0);
            let rhs = if g.pointwise() {
                (xb[p0..].as_ptr(), m, 1)
            } else {
                im2col(xb, g, p0, n, &mut cols);
                (cols.as_ptr(), n, 1)
            };
            // SAFETY: out[bi] is c_out x m (row stride m); the kernel is c_out x rows,
            // contiguous; rhs is rows x n inside xb or cols.
            unsafe {
                matmul(
                    (g.c_out, n, rows),
                    (ob[p0..].as_mut_ptr(), m, 1),
                    bias.is_some(),
                    (kernel.as_ptr(), rows, 1),
                    rhs,
                )
            };
        }
    }
    out
}

fn input_grad_impl<T: Float>(dy: &[T], kernel: &[T], g: &Geom) -> Vec<T> {
    if g.winograd() {
        return winograd::input_grad(dy, kernel, g);
    }
    let (m, rows, plane) = (g.oh() * g.ow(), g.rows(), g.h * g.w);
    let mut dx = vec![T::from_f64(0.0); g.b * g.c_in * plane];
    let tile = g.tile();
    let mut cols = if g.pointwise() {
        Vec::new()
    } else {
        vec![T::from_f64(0.0); rows * tile]
    };
    for bi in 0..g.b {
        let gb = &dy[bi * g.c_out * m..(bi + 1) * g.c_out * m];
        let db = &mut dx[bi * g.c_in * plane..(bi + 1) * g.c_in * plane];
        for p0 in (0..m).step_by(tile) {
            let n = tile.min(m - p0);
            // kernel^T: rows x c_out, a stride view of the c_out x rows kernel.
            let lhs = (kernel.as_ptr(), 1, rows);
            let rhs = (gb[p0..].as_ptr(), m, 1);
            // SAFETY: as in forward_impl, with the roles of input and output swapped.
            unsafe {
                if g.pointwise() {
                    matmul(
                        (rows, n, g.c_out),
                        (db[p0..].as_mut_ptr(), m, 1),
                        false,
                        lhs,
                        rhs,
                    );
                } else {
                    matmul(
                        (rows, n, g.c_out),
                        (cols.as_mut_ptr(), n, 1),
                        false,
                        lhs,
                        rhs,
                    );
                }
            }
            if !g.pointwise() {
                col2im(&cols, g, p0, n, db);
            }
        }
    }
    dx
}

/// The kernel gradient, `[c_out, c_in * k * k]`: the sum over images and tiles of
/// `dy_tile · cols_tileᵀ` (cols re-gathered from the input by im2col).
fn weight_grad_impl<T: Float>(x: &[T], dy: &[T], g: &Geom) -> Vec<T> {
    let (m, rows) = (g.oh() * g.ow(), g.rows());
    let mut dw = vec![T::from_f64(0.0); g.c_out * rows];
    let tile = g.tile();
    let mut cols = if g.pointwise() {
        Vec::new()
    } else {
        vec![T::from_f64(0.0); rows * tile]
    };
    let mut first = true;
    for bi in 0..g.b {
        let xb = &x[bi * g.c_in * g.h * g.w..(bi + 1) * g.c_in * g.h * g.w];
        let gb = &dy[bi * g.c_out * m..(bi + 1) * g.c_out * m];
        for p0 in (0..m).step_by(tile) {
            let n = tile.min(m - p0);
            // colsᵀ: n x rows, a stride view of the rows x n tile (or of the input itself).
            let rhs = if g.pointwise() {
                (xb[p0..].as_ptr(), 1, m)
            } else {
                im2col(xb, g, p0, n, &mut cols);
                (cols.as_ptr(), 1, n)
            };
            // SAFETY: dw is c_out x rows, contiguous; dy's tile is c_out x n (row stride m).
            unsafe {
                matmul(
                    (g.c_out, rows, n),
                    (dw.as_mut_ptr(), rows, 1),
                    !first,
                    (gb[p0..].as_ptr(), m, 1),
                    rhs,
                )
            };
            first = false;
        }
    }
    dw
}

/// A contiguous CPU slice of `t` (which must be contiguous and of type `T`).
fn with_slice<T: Float, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("cpu_conv: tensor not on the CPU")
    };
    let all = T::cpu_storage_as_slice(cpu)?;
    match layout.contiguous_offsets() {
        Some((a, b)) => f(&all[a..b]),
        None => candle_core::bail!("cpu_conv: tensor not contiguous"),
    }
}

struct Forward {
    kernel: Tensor,
    bias: Option<Tensor>,
    g: Geom,
}

impl Kernel1 for Forward {
    fn run<T: Float>(&self, x: &[T], _: &Layout) -> Result<Vec<T>> {
        with_slice(&self.kernel, |k: &[T]| match &self.bias {
            Some(b) => with_slice(b, |b: &[T]| Ok(forward_impl(x, k, Some(b), &self.g))),
            None => Ok(forward_impl(x, k, None, &self.g)),
        })
    }
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "cpu-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        apply1(self, s, l, Shape::from((g.b, g.c_out, g.oh(), g.ow())))
    }
}

struct InputGrad {
    kernel: Tensor,
    g: Geom,
}

impl Kernel1 for InputGrad {
    fn run<T: Float>(&self, dy: &[T], _: &Layout) -> Result<Vec<T>> {
        with_slice(&self.kernel, |k| Ok(input_grad_impl(dy, k, &self.g)))
    }
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "cpu-conv2d-input-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        apply1(self, s, l, Shape::from((g.b, g.c_in, g.h, g.w)))
    }
}

struct WeightGrad {
    x: Tensor,
    g: Geom,
}

impl Kernel1 for WeightGrad {
    fn run<T: Float>(&self, dy: &[T], _: &Layout) -> Result<Vec<T>> {
        with_slice(&self.x, |x| Ok(weight_grad_impl(x, dy, &self.g)))
    }
}

impl CustomOp1 for WeightGrad {
    fn name(&self) -> &'static str {
        "cpu-conv2d-weight-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        apply1(self, s, l, Shape::from((g.c_out, g.c_in, g.k, g.k)))
    }
}

fn geom(
    x_dims: (usize, usize, usize, usize),
    (c_out, kc, k, k2): (usize, usize, usize, usize),
    stride: usize,
    padding: usize,
    (budget, algo): (usize, Algo),
) -> Result<Geom> {
    let (b, c_in, h, w) = x_dims;
    if kc != c_in || k != k2 || h + 2 * padding < k || w + 2 * padding < k || stride == 0 {
        candle_core::bail!(
            "conv2d: input [{b}, {c_in}, {h}, {w}] does not fit kernel [{c_out}, {kc}, {k}, {k2}] (padding {padding}, stride {stride})"
        );
    }
    let g = Geom {
        b,
        c_in,
        c_out,
        h,
        w,
        k,
        stride,
        padding,
        budget,
        algo,
    };
    if algo == Algo::Winograd && !winograd::applies(&g) {
        candle_core::bail!("conv2d: Winograd needs a 3x3 kernel, stride 1 and padding <= 2");
    }
    Ok(g)
}

/// Whether [`forward`] and [`input_grad`] take the Winograd path for an input of `x_dims`
/// and a kernel of `kernel_dims` (tests check that they exercise the path they mean to).
#[doc(hidden)]
pub fn auto_picks_winograd(
    x_dims: (usize, usize, usize, usize),
    kernel_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> bool {
    let plan = (COLS_BUDGET, Algo::Auto);
    geom(x_dims, kernel_dims, stride, padding, plan).is_ok_and(|g| g.winograd())
}

/// `conv2d(x, kernel) + bias` (`[b, c_in, h, w]` -> `[b, c_out, h', w']`), without a graph.
/// Requires [`supported`].
pub fn forward(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    forward_tiled(x, kernel, bias, padding, stride, COLS_BUDGET)
}

/// [`forward`] with the im2col buffer bounded to `budget` elements (tests exercise tiling).
#[doc(hidden)]
pub fn forward_tiled(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    budget: usize,
) -> Result<Tensor> {
    forward_algo(x, kernel, bias, padding, stride, budget, Algo::Auto)
}

/// [`forward_tiled`] by the given algorithm (an error where it does not apply).
#[doc(hidden)]
pub fn forward_algo(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    budget: usize,
    algo: Algo,
) -> Result<Tensor> {
    let g = geom(x.dims4()?, kernel.dims4()?, stride, padding, (budget, algo))?;
    x.detach().contiguous()?.apply_op1_no_bwd(&Forward {
        kernel: kernel.contiguous()?,
        bias: bias.map(|b| b.contiguous()).transpose()?,
        g,
    })
}

/// The input gradient of `conv2d(x, kernel, padding, stride)` for `x` of `in_h x in_w`, given
/// the output gradient `dy`. Requires [`supported`].
pub fn input_grad(
    dy: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    in_h: usize,
    in_w: usize,
) -> Result<Tensor> {
    input_grad_tiled(dy, kernel, padding, stride, (in_h, in_w), COLS_BUDGET)
}

/// [`input_grad`] with the im2col buffer bounded to `budget` elements.
#[doc(hidden)]
pub fn input_grad_tiled(
    dy: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    in_hw: (usize, usize),
    budget: usize,
) -> Result<Tensor> {
    input_grad_algo(dy, kernel, padding, stride, in_hw, budget, Algo::Auto)
}

/// [`input_grad_tiled`] by the given algorithm (an error where it does not apply).
#[doc(hidden)]
pub fn input_grad_algo(
    dy: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    (in_h, in_w): (usize, usize),
    budget: usize,
    algo: Algo,
) -> Result<Tensor> {
    let (b, _, _, _) = dy.dims4()?;
    let c_in = kernel.dim(1)?;
    let g = geom(
        (b, c_in, in_h, in_w),
        kernel.dims4()?,
        stride,
        padding,
        (budget, algo),
    )?;
    if (dy.dim(2)?, dy.dim(3)?) != (g.oh(), g.ow()) {
        candle_core::bail!("conv2d input gradient: output gradient has the wrong size");
    }
    dy.detach().contiguous()?.apply_op1_no_bwd(&InputGrad {
        kernel: kernel.contiguous()?,
        g,
    })
}

/// The kernel gradient of `conv2d(x, kernel, padding, stride)` given the output gradient `dy`,
/// shaped like `kernel` (`[c_out, c_in, k, k]`). Requires [`supported`].
pub fn weight_grad(
    x: &Tensor,
    dy: &Tensor,
    kernel_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    weight_grad_tiled(x, dy, kernel_dims, padding, stride, COLS_BUDGET)
}

/// [`weight_grad`] with the im2col buffer bounded to `budget` elements.
#[doc(hidden)]
pub fn weight_grad_tiled(
    x: &Tensor,
    dy: &Tensor,
    kernel_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
    budget: usize,
) -> Result<Tensor> {
    let x = x.detach().contiguous()?;
    // im2col: the kernel gradient has no Winograd form here.
    let g = geom(
        x.dims4()?,
        kernel_dims,
        stride,
        padding,
        (budget, Algo::Im2col),
    )?;
    if dy.dims4()? != (g.b, g.c_out, g.oh(), g.ow()) {
        candle_core::bail!("conv2d weight gradient: output gradient has the wrong shape");
    }
    dy.detach()
        .contiguous()?
        .apply_op1_no_bwd(&WeightGrad { x, g })
}
