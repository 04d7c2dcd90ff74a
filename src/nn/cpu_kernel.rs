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
}

impl Float for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

/// `exp(x)` for f32 within a few ulp (tested against f64 over the whole range), branch-free
/// so that loops over slices vectorise: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7
/// Taylor polynomial for `exp(r)` (truncation error below 1e-8), and `2^n` built in the
/// exponent bits (as `2 * 2^(n-1)`, so that n = 128 near the top of the range fits). Results
/// below 2.5e-38 (x < -86.6, next to f32's smallest normal number) are flushed to 0; from
/// 88.72 on the result is infinite; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -86.6;
    const HIGH: f32 = 88.72;
    let xc = x.clamp(LOW, HIGH);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n - 1 lies in -126..=127: a normal power of two.
    let half_scale = f32::from_bits(((n as i32 + 126) as u32) << 23);
    let y = (p + p) * half_scale;
    if x < LOW {
        0.0
    } else if x >= HIGH {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Lanes of the reductions below: 16 independent partial results, which the compiler keeps in
/// vector registers (a serial float sum cannot be vectorised, its order being fixed).
const LANES: usize = 16;

/// `sum(a[i] * b[i])`, in [`LANES`] interleaved partial sums.
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] = acc[i] + ca[i] * cb[i];
        }
    }
    let tail = n - n % LANES;
    let rest = a[tail..]
        .iter()
        .zip(&b[tail..])
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.iter().fold(rest, |s, &v| s + v)
}

/// `sum(a)`, in [`LANES`] interleaved partial sums.
pub(crate) fn sum<T: Float>(a: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(T::zero(), |s, &v| s + v);
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i] + c[i];
        }
    }
    acc.iter().fold(rest, |s, &v| s + v)
}

/// `max(a[i] * scale)` (minus infinity for an empty slice), in [`LANES`] partial maxima.
pub(crate) fn max_scaled<T: Float>(a: &[T], scale: T) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(T::neg_infinity(), |m, &v| {
        num_traits::Float::max(m, v * scale)
    });
    for c in chunks {
        for i in 0..LANES {
            acc[i] = num_traits::Float::max(acc[i], c[i] * scale);
        }
    }
    acc.iter().fold(rest, |m, &v| num_traits::Float::max(m, v))
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
