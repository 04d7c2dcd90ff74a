//! A small seedable PRNG (SplitMix64, Steele et al. 2014) with normal draws by Box-Muller:
//! reproducible noise and random weights on every machine, independent of candle's RNG.

use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1), never exactly 0 or 1.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Standard-normal noise of `shape` from `seed`, the same on every machine.
pub fn randn(
    seed: u64,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut rng = SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// The fresh noise a stochastic sampler (Euler ancestral, DDIM with eta > 0) adds at `step`
/// to the image whose starting noise came from `seed`: its own stream per image and step, so
/// an image is the same whatever batch it is drawn in.
pub fn step_noise(
    seed: u64,
    step: usize,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut mix = SplitMix64::new(seed ^ 0x5EED_57E9_0000_0000);
    let stream = mix
        .next_u64()
        .wrapping_add((step as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    randn(SplitMix64::new(stream).next_u64(), shape, dtype, device)
}

/// Per-image step noise for a batch of `seeds`: `[n, ...]` from the shape of one batch.
pub fn batch_step_noise(
    seeds: &[u64],
    step: usize,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut one = shape.to_vec();
    one[0] = 1;
    let parts = seeds
        .iter()
        .map(|&s| step_noise(s, step, &one, dtype, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}
