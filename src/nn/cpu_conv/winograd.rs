//! 3x3, stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! Each 4x4 block of output pixels is computed from the 6x6 block of input under it with 36
//! multiplications per (input, output) channel pair instead of 144: the input block and the
//! kernel are taken to a 6x6 transformed domain (`Bᵀ d B`, `G g Gᵀ`), multiplied elementwise,
//! which over channels is 36 independent matrix products, and taken back (`Aᵀ m A`). The
//! SD decoder's convolutions at 128-512 px are compute-bound, and this is 4x fewer
//! multiply-adds there; the transforms cost a few percent. Rounding grows by a small constant
//! factor over the direct sum; tests bound it.
//!
//! The input gradient of a stride-1 3x3 convolution with padding `p` is the convolution of the
//! output gradient with the flipped, channel-transposed kernel and padding `2 - p`, so it runs
//! through the same code.

use super::{simd_fn, Float, Geom};
use rayon::prelude::*;

/// Output block side (m of F(m x m, 3 x 3)) and transformed block side (m + 2).
const M: usize = 4;
const A: usize = M + 2;
const E: usize = A * A;

/// Whether `g` is a convolution this module computes.
pub(super) fn applies(g: &Geom) -> bool {
    g.k == 3 && g.stride == 1 && g.padding <= 2
}

/// Whether Winograd is expected to beat im2col + gemm for `g`, from `cargo bench --bench
/// train_step -- conv` on the project's 2-core machine (BENCHMARKS.md): it wins from 32x32
/// output pixels up (1.1-1.8x there, 2-3.4x from 64x64 on), except where a large kernel meets
/// a small image: the transformed kernel is 4x the kernel and is rebuilt on every call, which
/// loses at 16x16 from 512x512 channels on (0.5x) and at 8x8-16x16 with 1280x1280 (0.1-0.35x).
pub(super) fn pays_off(g: &Geom) -> bool {
    let pixels = g.oh() * g.ow();
    applies(g) && pixels >= 32 * 32 && (pixels >= 64 * 64 || g.c_in * g.c_out <= 640 * 640)
}

/// The interpolation points are 0, ±1, ±1/2 (and infinity) rather than Lavin's 0, ±1, ±2:
/// the input and output transforms' coefficients are then powers of two (exact in binary)
/// and the f32 error halves (measured against f64; Barabasz et al., 2020, study the choice).
/// Each transform below is written for one column of the block; the block's transform applies
/// it to the columns, then to the rows of the result.
///
/// `Bᵀ d` for one column of six values: the input transform.
#[inline(always)]
fn bt<T: Float>(d: [T; A], c4: T, c5: T, c2: T) -> [T; A] {
    [
        c4 * d[0] - c5 * d[2] + d[4],
        -c4 * (d[1] + d[2]) + d[3] + d[4],
        c4 * (d[1] - d[2]) - d[3] + d[4],
        c2 * (d[3] - d[1]) - d[2] + d[4],
        c2 * (d[1] - d[3]) - d[2] + d[4],
        c4 * d[1] - c5 * d[3] + d[5],
    ]
}

/// `Aᵀ m` for one column of six values: the output transform.
#[inline(always)]
fn at<T: Float>(m: [T; A], c2: T, c4: T, c8: T) -> [T; M] {
    let (s12, d12) = (m[1] + m[2], m[1] - m[2]);
    let (s34, d34) = (m[3] + m[4], m[3] - m[4]);
    [
        m[0] + s12 + s34,
        d12 + c2 * d34,
        s12 + c4 * s34,
        d12 + c8 * d34 + m[5],
    ]
}

/// `G g` for one column of three kernel values: the kernel transform (in f64, rounded once).
#[inline(always)]
fn gk(g: [f64; 3]) -> [f64; A] {
    let (sum, alt) = (g[0] + g[2], g[1]);
    [
        4.0 * g[0],
        (sum + alt) * (2.0 / 3.0),
        (sum - alt) * (2.0 / 3.0),
        (8.0 * g[0] + 4.0 * g[1] + 2.0 * g[2]) * (-1.0 / 3.0),
        (8.0 * g[0] - 4.0 * g[1] + 2.0 * g[2]) * (-1.0 / 3.0),
        g[2],
    ]
}

/// The transformed kernel `U[e][o][i]` (36 matrices of `c_out x c_in`) of `kernel[o][i][3][3]`,
/// or with `flip` of the kernel with its taps reversed and its channel roles swapped
/// (`U[e][i][o]`, the input gradient's convolution).
fn transform_kernel<T: Float>(kernel: &[T], (c_out, c_in): (usize, usize), flip: bool) -> Vec<T> {
    let mut u = vec![T::zero(); E * c_out * c_in];
    let dst = SendPtr(u.as_mut_ptr());
    (0..c_out).into_par_iter().for_each_init(
        || vec![0f64; (9 + 3 * A + A) * c_in],
        |buf, o| kernel_channel(kernel, (c_out, c_in, flip), o, buf, &dst),
    );
    u
}

simd_fn! {
    /// Row `o` of every matrix of [`transform_kernel`]. The 9 taps are first gathered over the
    /// input channels, so that both passes of `G g Gᵀ` run along contiguous rows (in f64,
    /// rounded once).
    fn kernel_channel<T: Float>(
        kernel: &[T],
        dims: (usize, usize, bool),
        o: usize,
        buf: &mut [f64],
        dst: &SendPtr<T>,
    ) {
        let (c_out, c_in, flip) = dims;
        let plane = c_out * c_in;
        let (taps, rest) = buf.split_at_mut(9 * c_in);
        let (gg, row) = rest.split_at_mut(3 * A * c_in);
        // The stored kernel is [o][i] with the transformed one's (c_out, c_in), or with
        // (c_in, c_out) when flipped.
        for i in 0..c_in {
            let src = if flip {
                &kernel[(i * c_out + o) * 9..][..9]
            } else {
                &kernel[(o * c_in + i) * 9..][..9]
            };
            for k in 0..9 {
                let tap = if flip { src[8 - k] } else { src[k] };
                taps[k * c_in + i] = tap.to_f64();
            }
        }
        // gg[r][b] = (G g)[r][b], over i: G applied down each kernel column b.
        for b in 0..3 {
            let tap = |a: usize| &taps[(a * 3 + b) * c_in..][..c_in];
            let (g0, g1, g2) = (tap(0), tap(1), tap(2));
            for i in 0..c_in {
                let t = gk([g0[i], g1[i], g2[i]]);
                for (r, val) in t.into_iter().enumerate() {
                    gg[(r * 3 + b) * c_in + i] = val;
                }
            }
        }
        // U[r][c] = ((G g) Gᵀ)[r][c]: G applied along each row r of G g.
        for r in 0..A {
            let col = |b: usize| &gg[(r * 3 + b) * c_in..][..c_in];
            let (g0, g1, g2) = (col(0), col(1), col(2));
            for i in 0..c_in {
                let t = gk([g0[i], g1[i], g2[i]]);
                for (c, val) in t.into_iter().enumerate() {
                    row[c * c_in + i] = val;
                }
            }
            for c in 0..A {
                // SAFETY: row o of matrix r A + c (c_in elements) lies inside U, and only the
                // call for `o` writes it.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(dst.0.add((r * A + c) * plane + o * c_in), c_in)
                };
                for (d, &val) in out.iter_mut().zip(&row[c * c_in..(c + 1) * c_in]) {
                    *d = T::from_f64(val);
                }
            }
        }
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to write disjoint elements from parallel tasks, as each site documents.
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}

/// Block geometry of one image: `ty x tx` blocks of 4x4 output pixels.
struct Blocks {
    ty: usize,
    tx: usize,
}

impl Blocks {
    fn of(g: &Geom) -> Self {
        Self {
            ty: g.oh().div_ceil(M),
            tx: g.ow().div_ceil(M),
        }
    }
}

/// `K` disjoint rows of `len` from `buf`, the first at `first`, `stride` apart.
#[inline(always)]
fn rows_mut<T, const K: usize>(
    buf: &mut [T],
    first: usize,
    stride: usize,
    len: usize,
) -> [&mut [T]; K] {
    let mut rows = buf[first..].chunks_mut(stride);
    std::array::from_fn(|_| &mut rows.next().expect("row inside the buffer")[..len])
}

/// `out[k][t] = Bᵀ (d0[t], .., d5[t])` for every t.
#[inline(always)]
fn bt_rows<T: Float>(d: [&[T]; A], out: [&mut [T]; A]) {
    let f = T::from_f64;
    let (c2, c4, c5) = (f(0.5), f(0.25), f(1.25));
    let [d0, d1, d2, d3, d4, d5] = d;
    let [o0, o1, o2, o3, o4, o5] = out;
    let n = o0.len();
    let (d0, d1, d2, d3, d4, d5) = (&d0[..n], &d1[..n], &d2[..n], &d3[..n], &d4[..n], &d5[..n]);
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for t in 0..n {
        let b = bt([d0[t], d1[t], d2[t], d3[t], d4[t], d5[t]], c4, c5, c2);
        (o0[t], o1[t], o2[t], o3[t], o4[t], o5[t]) = (b[0], b[1], b[2], b[3], b[4], b[5]);
    }
}

/// `out[k][t] = Aᵀ (d0[t], .., d5[t])` for every t.
#[inline(always)]
fn at_rows<T: Float>(d: [&[T]; A], out: [&mut [T]; M]) {
    let f = T::from_f64;
    let (c2, c4, c8) = (f(0.5), f(0.25), f(0.125));
    let [d0, d1, d2, d3, d4, d5] = d;
    let [o0, o1, o2, o3] = out;
    let n = o0.len();
    let (d0, d1, d2, d3, d4, d5) = (&d0[..n], &d1[..n], &d2[..n], &d3[..n], &d4[..n], &d5[..n]);
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for t in 0..n {
        let a = at([d0[t], d1[t], d2[t], d3[t], d4[t], d5[t]], c2, c4, c8);
        (o0[t], o1[t], o2[t], o3[t]) = (a[0], a[1], a[2], a[3]);
    }
}

/// `V[e][i][j]` for the block rows `ty0..ty1` of one image `x` (`c_in` planes of `h x w`;
/// `j` runs over those rows' blocks): the transformed 6x6 input block under each block of
/// output, zero outside the image.
fn transform_input<T: Float>(x: &[T], g: &Geom, bl: &Blocks, ty0: usize, ty1: usize, v: &mut [T]) {
    let tx = bl.tx;
    let n = (ty1 - ty0) * tx;
    // Input rows 4 ty0 - pad .. 4 (ty1 - 1) - pad + 6, each as 6 transformed rows of tx.
    let rows = M * (ty1 - ty0) + 2;
    let dst = SendPtr(v.as_mut_ptr());
    (0..g.c_in)
        .into_par_iter()
        .with_min_len(super::super::min_rows(E * n))
        .for_each_init(
            || {
                (
                    vec![T::zero(); 4 * (tx + 1)],
                    vec![T::zero(); rows * A * tx],
                )
            },
            |bufs, i| {
                let src = &x[i * g.h * g.w..(i + 1) * g.h * g.w];
                input_channel(src, g, (bl.tx, ty0, ty1), bufs, &dst, i)
            },
        );
}

simd_fn! {
    /// Channel `i` of [`transform_input`]: the row transform over every needed input row,
    /// then the column transform over the results, each along a row of blocks over contiguous
    /// memory (the input rows are first split into their four phases `x mod 4`).
    fn input_channel<T: Float>(
        src: &[T],
        g: &Geom,
        span: (usize, usize, usize),
        bufs: &mut (Vec<T>, Vec<T>),
        dst: &SendPtr<T>,
        i: usize,
    ) {
        let (tx, ty0, ty1) = span;
        let (phases, rt) = bufs;
        let pad = g.padding;
        let n = (ty1 - ty0) * tx;
        let plane = g.c_in * n;
        let rows = M * (ty1 - ty0) + 2;
        for r in 0..rows {
            let y = (M * ty0 + r) as isize - pad as isize;
            // phases[q][t] = input at column 4 t + q - pad (zero outside).
            phases.fill(T::zero());
            if y >= 0 && (y as usize) < g.h {
                let line = &src[y as usize * g.w..(y as usize + 1) * g.w];
                for (xx, &val) in line.iter().enumerate() {
                    let col = xx + pad;
                    if col < 4 * (tx + 1) {
                        phases[(col % 4) * (tx + 1) + col / 4] = val;
                    }
                }
            }
            let ph = |q: usize, shift: usize| &phases[q * (tx + 1) + shift..][..tx];
            let d = [ph(0, 0), ph(1, 0), ph(2, 0), ph(3, 0), ph(0, 1), ph(1, 1)];
            bt_rows(d, rows_mut(rt, r * A * tx, tx, tx));
        }
        for by in 0..ty1 - ty0 {
            for c in 0..A {
                let row = |k: usize| &rt[((M * by + k) * A + c) * tx..][..tx];
                let d = [row(0), row(1), row(2), row(3), row(4), row(5)];
                // SAFETY: the 6 rows (r A + c) of V at columns i n + by tx .. + tx lie
                // inside V (E * plane elements), and only the call for `i` writes them.
                let out: [&mut [T]; A] = std::array::from_fn(|r| unsafe {
                    std::slice::from_raw_parts_mut(dst.0.add((r * A + c) * plane + i * n + by * tx), tx)
                });
                bt_rows(d, out);
            }
        }
    }
}

/// Writes the block rows `ty0..ty1` of one image's output from the products `m[e][o][j]`
/// (`Aᵀ m A`, cropped to the image), adding the bias.
#[allow(clippy::too_many_arguments)]
fn transform_output<T: Float>(
    m: &[T],
    g: &Geom,
    bl: &Blocks,
    ty0: usize,
    ty1: usize,
    bias: Option<&[T]>,
    out: &mut [T],
) {
    let (oh, ow, tx) = (g.oh(), g.ow(), bl.tx);
    let n = (ty1 - ty0) * tx;
    out.par_chunks_mut(oh * ow)
        .with_min_len(super::super::min_rows(E * n))
        .enumerate()
        .for_each_init(
            || (vec![T::zero(); M * A * tx], vec![T::zero(); M * tx]),
            |bufs, (o, dst)| {
                let b = bias.map_or(T::zero(), |b| b[o]);
                output_channel(m, g, (tx, ty0, ty1), b, bufs, dst, o)
            },
        );
}

simd_fn! {
    /// Channel `o` of [`transform_output`]: the column transform, then the row transform,
    /// each along a row of blocks (the output rows are assembled from four phases).
    fn output_channel<T: Float>(
        m: &[T],
        g: &Geom,
        span: (usize, usize, usize),
        bias: T,
        bufs: &mut (Vec<T>, Vec<T>),
        dst: &mut [T],
        o: usize,
    ) {
        let (tx, ty0, ty1) = span;
        let (q, phases) = bufs;
        let (oh, ow) = (g.oh(), g.ow());
        let n = (ty1 - ty0) * tx;
        let plane = g.c_out * n;
        for by in 0..ty1 - ty0 {
            // q[r][c][t]: Aᵀ applied down each column c of the block.
            for c in 0..A {
                let row = |r: usize| &m[(r * A + c) * plane + o * n + by * tx..][..tx];
                let d = [row(0), row(1), row(2), row(3), row(4), row(5)];
                at_rows(d, rows_mut(q, c * tx, A * tx, tx));
            }
            let y0 = M * (ty0 + by);
            for r in 0..M.min(oh - y0) {
                let col = |c: usize| &q[(r * A + c) * tx..][..tx];
                let d = [col(0), col(1), col(2), col(3), col(4), col(5)];
                let (p0, rest) = phases.split_at_mut(tx);
                let (p1, rest) = rest.split_at_mut(tx);
                let (p2, p3) = rest.split_at_mut(tx);
                at_rows(d, [p0, p1, p2, p3]);
                let line = &mut dst[(y0 + r) * ow..(y0 + r + 1) * ow];
                for (xx, d) in line.iter_mut().enumerate() {
                    *d = phases[(xx % M) * tx + xx / M] + bias;
                }
            }
        }
    }
}

/// Block rows per chunk: the chunk's transformed input and products (`36 (c_in + c_out)`
/// elements a block) fit `g.budget`, or one block row if a row alone is over it; chunks are
/// equal so that no product is a narrow leftover.
fn chunk_rows(g: &Geom, bl: &Blocks) -> usize {
    let per_row = E * (g.c_in + g.c_out) * bl.tx;
    let chunks = (per_row * bl.ty)
        .div_ceil(g.budget.max(1))
        .clamp(1, bl.ty.max(1));
    bl.ty.div_ceil(chunks)
}

/// `conv2d(x, kernel) + bias` for a geometry that [`applies`]; `x` is `[b, c_in, h, w]`.
pub(super) fn forward<T: Float>(x: &[T], kernel: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    debug_assert!(applies(g));
    run(
        x,
        &transform_kernel(kernel, (g.c_out, g.c_in), false),
        bias,
        g,
    )
}

/// The convolution of `x` given the transformed kernel `u`.
fn run<T: Float>(x: &[T], u: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    let (oh, ow) = (g.oh(), g.ow());
    let mut out = vec![T::zero(); g.b * g.c_out * oh * ow];
    let bl = Blocks::of(g);
    let rows_max = chunk_rows(g, &bl);
    let n_max = rows_max * bl.tx;
    let mut v = vec![T::zero(); E * g.c_in * n_max];
    let mut m = vec![T::zero(); E * g.c_out * n_max];
    let (in_img, out_img) = (g.c_in * g.h * g.w, g.c_out * oh * ow);
    for bi in 0..g.b {
        let xb = &x[bi * in_img..(bi + 1) * in_img];
        let ob = &mut out[bi * out_img..(bi + 1) * out_img];
        for ty0 in (0..bl.ty).step_by(rows_max) {
            let ty1 = bl.ty.min(ty0 + rows_max);
            let n = (ty1 - ty0) * bl.tx;
            transform_input(xb, g, &bl, ty0, ty1, &mut v);
            // 36 independent products U[e] (c_out x c_in) . V[e] (c_in x n), one per task.
            let (vs, ms) = (g.c_in * n, g.c_out * n);
            m[..E * ms]
                .par_chunks_mut(ms)
                .zip(v[..E * vs].par_chunks(vs))
                .enumerate()
                .for_each(|(e, (me, ve))| {
                    let ue = &u[e * g.c_out * g.c_in..(e + 1) * g.c_out * g.c_in];
                    // SAFETY: ue is c_out x c_in, ve is c_in x n, me is c_out x n, all
                    // contiguous and row-major.
                    unsafe {
                        super::matmul_with(
                            (g.c_out, n, g.c_in),
                            (me.as_mut_ptr(), n, 1),
                            false,
                            (ue.as_ptr(), g.c_in, 1),
                            (ve.as_ptr(), n, 1),
                            gemm::Parallelism::None,
                        )
                    }
                });
            transform_output(&m, g, &bl, ty0, ty1, bias, ob);
        }
    }
    out
}

/// The input gradient `[b, c_in, h, w]` of a convolution that [`applies`], given the output
/// gradient `dy` (`[b, c_out, h', w']`): a convolution of `dy` with the flipped,
/// channel-transposed kernel and padding `2 - p`.
pub(super) fn input_grad<T: Float>(dy: &[T], kernel: &[T], g: &Geom) -> Vec<T> {
    debug_assert!(applies(g));
    let back = Geom {
        c_in: g.c_out,
        c_out: g.c_in,
        h: g.oh(),
        w: g.ow(),
        padding: 2 - g.padding,
        ..*g
    };
    run(
        dy,
        &transform_kernel(kernel, (g.c_in, g.c_out), true),
        None,
        &back,
    )
}
