//! What the CPU kernels (`cpu_conv`, `cpu_norm`, `cpu_softmax`) share: the element types they
//! run on and the dispatch from a candle storage to a typed, contiguous slice.

use candle_core::{CpuStorage, Layout, Result, Shape};

/// f32 or f64. Elementwise math runs in the tensor's own precision; sums that need it are
/// accumulated in f64 by the kernels.
pub(crate) trait Float: candle_core::WithDType + num_traits::Float {
    /// `exp`, in a form the compiler vectorises for f32 (libm's `expf` is a scalar call, and
    /// attention's softmax at 64x64 latents takes hundreds of millions of them); f64 keeps
    /// libm's, so the f64 gradient checks see the exact function.
    fn exp_fast(self) -> Self;

    /// The standard normal distribution function Φ(x) = erfc(-x / √2) / 2 (GELU's gate):
    /// vectorisable for f32 ([`normal_cdf_f32`]), libm's `erfc` for f64.
    fn normal_cdf(self) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }

    #[inline(always)]
    fn normal_cdf(self) -> f32 {
        normal_cdf_f32(self)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }

    #[inline(always)]
    fn normal_cdf(self) -> f64 {
        0.5 * libm::erfc(-self * std::f64::consts::FRAC_1_SQRT_2)
    }
}

/// Φ(x) for f32, branch-free so that loops vectorise (libm's `erff` is a scalar call: GELU's
/// erf was a few percent of a sampling evaluation). It takes erfc(z), z = |x| / √2 >= 0, from
/// the Chebyshev fit of Numerical Recipes (Press et al., `erfcc`: t = 1 / (1 + z / 2),
/// erfc(z) = t exp(-z² + P(t)), P of degree 9, fractional error below 1.2e-7 for every
/// z >= 0), then Φ(x) = erfc(z) / 2 for x < 0 and 1 - erfc(z) / 2 otherwise. Computing the
/// small tail directly, rather than as 1 + erf(x), keeps Φ's relative error small for negative
/// x too. In f32 the result is within 5e-7 relative of the exact Φ for x >= -3 and within
/// 4e-6 down to x = -12, where -x²/2's own rounding dominates (tested).
#[inline(always)]
pub fn normal_cdf_f32(x: f32) -> f32 {
    // P(t)'s coefficients, highest degree first, for Horner's scheme; as published (f32
    // rounds the last digits away).
    #[allow(clippy::excessive_precision)]
    const P: [f32; 9] = [
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_68,
        -1.265_512_23,
    ];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / z.mul_add(0.5, 1.0);
    let mut p: f32 = 0.170_872_77;
    for c in P {
        p = p.mul_add(t, c);
    }
    // t exp(-z² + P(t)) / 2 with -z² = -x² / 2 taken from x itself (z's own rounding, doubled
    // by the square, would be the largest error in the tail) and added in one rounding.
    let half_erfc = 0.5 * t * exp_f32((-0.5 * x).mul_add(x, p));
    if x < 0.0 {
        half_erfc
    } else {
        1.0 - half_erfc
    }
}

/// `exp(x)` for f32 within a few ulp (tested against f64 over the whole range), branch-free
/// so that loops over slices vectorise: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7
/// Taylor polynomial for `exp(r)` (truncation error below 1e-8), and `2^n` built in the
/// exponent bits (as `2 * 2^(n-1)`, so that n = 128 near the top of the range fits; the 2 is
/// folded into the polynomial's coefficients, which doubles every term exactly). Results
/// below 2.5e-38 (x < -86.6, next to f32's smallest normal number) are flushed to 0; above
/// f32's largest value (x > 88.7228) the result is infinite; NaN stays NaN.
///
/// The polynomial and the reduction are written as fused multiply-adds (`mul_add`): one
/// rounding each, so every copy of a kernel gives the same bits whether the CPU fuses them in
/// hardware or not, and on AVX2 / AVX-512 about twice as fast as separate multiplies and adds
/// (the loop is bound by the vector ports, not by memory). A copy compiled without FMA (the
/// baseline one, taken only on CPUs without AVX2) calls libm's `fmaf` instead: slower there,
/// still exact.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -86.6;
    // Past ln(f32::MAX) = 88.7228, so that the last finite results are computed, not cut;
    // n stays at most 128 (n - 1 = 127 is the largest normal exponent) and from 88.7229 on
    // the product overflows to infinity by itself.
    const HIGH: f32 = 88.8;
    // 2 / k! for k = 6 down to 0 (k = 7 starts the scheme): Horner's coefficients of 2 exp(r).
    const COEFFS: [f32; 7] = [
        2.0 / 720.0,
        2.0 / 120.0,
        2.0 / 24.0,
        2.0 / 6.0,
        1.0,
        2.0,
        2.0,
    ];
    // clamp keeps NaN, which then runs through the arithmetic and comes out NaN.
    let xc = x.clamp(LOW, HIGH);
    let shifted = xc.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let mut p2: f32 = 2.0 / 5040.0;
    for c in COEFFS {
        p2 = p2.mul_add(r, c);
    }
    // `shifted`'s low mantissa bits hold n (1.5 * 2^23 + n has the bits 0x4B40_0000 + n), so
    // 2^(n-1) is built with integer ops (`n as i32` would be a scalar saturating conversion
    // that stops the loop from vectorising); n - 1 lies in -126..=127: a normal number.
    let half_scale = f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000 - 126) << 23);
    let y = p2 * half_scale;
    if x < LOW {
        0.0
    } else {
        y
    }
}

static LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Makes the kernels take the given copy (1 baseline, 3 AVX2 + FMA, 4 AVX-512), capped at
/// what the CPU has: tests check that every copy gives the same bits.
#[doc(hidden)]
pub fn force_simd_level(level: u8) {
    LEVEL.store(0, std::sync::atomic::Ordering::Relaxed);
    let most = simd_level();
    LEVEL.store(level.min(most), std::sync::atomic::Ordering::Relaxed);
}

/// The vector instructions the CPU has: 4 for AVX-512 (F, BW, DQ, VL), 3 for AVX2 + FMA,
/// 1 for neither (probed once).
#[inline(always)]
pub(crate) fn simd_level() -> u8 {
    use std::sync::atomic::Ordering;
    let level = LEVEL.load(Ordering::Relaxed);
    if level != 0 {
        return level;
    }
    #[cfg(target_arch = "x86_64")]
    let level = if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        4
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        3
    } else {
        1
    };
    #[cfg(not(target_arch = "x86_64"))]
    let level = 1;
    LEVEL.store(level, Ordering::Relaxed);
    level
}

/// Defines `fn name<T: Float>(args) -> ret { body }` compiled three times: for AVX-512, for
/// AVX2 + FMA and for baseline x86-64, called by what the CPU has ([`simd_level`]). The crate
/// targets baseline x86-64 (SSE2), so without this the kernels' loops run 4 floats wide on a
/// machine that does 16. The body is an `#[inline(always)]` function inlined into each
/// `#[target_feature]` copy, and so must be everything it calls in its loops (no parallel
/// iterators inside: one call per row or channel). No fused multiply-adds are formed behind
/// the code's back (Rust does not contract `a * b + c`; the explicit `mul_add`s of
/// [`exp_f32`] round once on every copy) and the reductions have a fixed lane order, so all
/// three copies give the same bits.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<T: Float>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name<T: Float>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<T: Float>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4<T: Float>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3<T: Float>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::nn::cpu_kernel::simd_level() {
                    // SAFETY: the CPU has the features these copies are compiled for.
                    4 => return unsafe { v4($($arg),*) },
                    3 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// Lanes of the reductions below: 16 independent partial results, which the compiler keeps in
/// vector registers (a serial float sum cannot be vectorised, its order being fixed).
const LANES: usize = 16;

/// Combines `L` partial results pairwise (`L` a power of two): a tree of depth log2 L. A
/// left-to-right fold is a chain of L dependent operations, 16 adds of 4 cycles each, which in
/// a softmax row of 77 scores (cross-attention) cost as much as the rest of the row.
#[inline(always)]
fn tree<T: Copy, const L: usize>(mut acc: [T; L], f: impl Fn(T, T) -> T) -> T {
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] = f(acc[i], acc[i + width]);
        }
    }
    acc[0]
}

/// `sum(a[i] * b[i])`: [`dot_centered`] with mean 0 and rstd 1, both exact, so the bits
/// are those of a plain dot product in the same lane order.
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    dot_centered(a, b, T::zero(), T::one())
}

/// `sum(a[i] * (x[i] - mean) * rstd)`, in [`LANES`] interleaved partial sums (the remainder
/// goes into the first lanes), combined by [`tree`].
#[inline(always)]
pub(crate) fn dot_centered<T: Float>(a: &[T], x: &[T], mean: T, rstd: T) -> T {
    let n = a.len().min(x.len());
    let (a, x) = (a[..n].chunks_exact(LANES), x[..n].chunks_exact(LANES));
    let (ra, rx) = (a.remainder(), x.remainder());
    let mut acc = [T::zero(); LANES];
    for (ca, cx) in a.zip(x) {
        for i in 0..LANES {
            acc[i] += ca[i] * ((cx[i] - mean) * rstd);
        }
    }
    for ((s, &v), &xv) in acc.iter_mut().zip(ra).zip(rx) {
        *s += v * ((xv - mean) * rstd);
    }
    tree(acc, |x, y| x + y)
}

/// `sum(a)`, as [`dot_centered`].
#[inline(always)]
pub(crate) fn sum<T: Float>(a: &[T]) -> T {
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut acc = [T::zero(); LANES];
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    for (s, &v) in acc.iter_mut().zip(rest) {
        *s += v;
    }
    tree(acc, |x, y| x + y)
}

/// Mean and (biased) variance of `a` in f64 (group norm's statistics): two passes.
#[inline(always)]
pub(crate) fn mean_var_f64<T: Float>(a: &[T]) -> (f64, f64) {
    let n = a.len().max(1) as f64;
    let mean = sum_map_f64(a, |v| v) / n;
    (mean, sum_map_f64(a, |v| (v - mean) * (v - mean)) / n)
}

/// `sum(f(a[i]))` in f64, in 8 interleaved partial sums, as [`dot_centered`].
#[inline(always)]
fn sum_map_f64<T: Float>(a: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let to = |v: T| f(candle_core::WithDType::to_f64(v));
    let chunks = a.chunks_exact(8);
    let rest = chunks.remainder();
    let mut acc = [0f64; 8];
    for c in chunks {
        for i in 0..8 {
            acc[i] += to(c[i]);
        }
    }
    for (s, &v) in acc.iter_mut().zip(rest) {
        *s += to(v);
    }
    tree(acc, |x, y| x + y)
}

/// `max(a[i] * scale)` (minus infinity for an empty slice), in [`LANES`] partial maxima, as
/// [`dot_centered`].
#[inline(always)]
pub(crate) fn max_scaled<T: Float>(a: &[T], scale: T) -> T {
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut acc = [T::neg_infinity(); LANES];
    for c in chunks {
        for i in 0..LANES {
            acc[i] = num_traits::Float::max(acc[i], c[i] * scale);
        }
    }
    for (m, &v) in acc.iter_mut().zip(rest) {
        *m = num_traits::Float::max(*m, v * scale);
    }
    tree(acc, num_traits::Float::max)
}

/// The contiguous part of `v` that `l` describes.
pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("CPU kernel: input not contiguous".into()))?;
    Ok(&v[a..b])
}

/// A kernel of one contiguous f32 or f64 input.
pub(crate) trait Kernel1 {
    fn run<T: Float>(&self, x: &[T], l: &Layout) -> Result<Vec<T>>;
}

/// Runs `k` on the storage `s` (laid out as `l`); the result has `shape`.
pub(crate) fn apply1<K: Kernel1>(
    k: &K,
    s: &CpuStorage,
    l: &Layout,
    shape: Shape,
) -> Result<(CpuStorage, Shape)> {
    let out = match s {
        CpuStorage::F32(v) => CpuStorage::F32(k.run(contiguous(v, l)?, l)?),
        CpuStorage::F64(v) => CpuStorage::F64(k.run(contiguous(v, l)?, l)?),
        _ => candle_core::bail!("CPU kernels run on f32 or f64 only"),
    };
    Ok((out, shape))
}
