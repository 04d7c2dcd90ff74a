//! What the CPU kernels (`cpu_conv`, `cpu_norm`, `cpu_softmax`) share: the element types they
//! run on and the dispatch from a candle storage to a typed, contiguous slice.

use candle_core::{CpuStorage, Layout, Result, Shape};

/// f32 or f64. Elementwise math runs in the tensor's own precision; sums that need it are
/// accumulated in f64 by the kernels.
pub(crate) trait Float: candle_core::WithDType + num_traits::Float {}
impl Float for f32 {}
impl Float for f64 {}

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
