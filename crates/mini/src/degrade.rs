//! Degradations people dislike, applied to `[3, n, n]` images in [0, 1]: blur, noise, low
//! contrast, colour cast, blocking. Two parameter families: [`Family::Reward`] (the data the
//! preference reward learns from) and [`Family::Judge`] (other kernels, strengths and casts,
//! for the independent judge), so a judge that agrees with the reward is not just reading
//! back the reward's own training distribution.

use reneg::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Degradation {
    /// Box blur of this radius in pixels, applied `passes` times (passes > 1 is near Gaussian).
    Blur { radius: usize, passes: usize },
    /// Additive Gaussian noise of this standard deviation.
    Noise { sigma: f32 },
    /// Contrast scaled by `factor` < 1 around the image mean.
    LowContrast { factor: f32 },
    /// Each channel scaled and shifted towards a tint.
    ColourCast { tint: [f32; 3], amount: f32 },
    /// Each `block` x `block` cell replaced by its mean (JPEG-like blocking).
    Blocking { block: usize },
}

/// The five kinds, in a fixed order (labels of the judge's degradation classifier).
pub const KINDS: [&str; 5] = ["blur", "noise", "low_contrast", "colour_cast", "blocking"];

/// Words a caption may carry for each kind (the hand-written negative has them to push against).
pub const QUALITY_WORDS: [&str; 5] = ["blurry", "noisy", "washed out", "colour cast", "blocky"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Reward,
    Judge,
}

impl Degradation {
    /// Index into [`KINDS`].
    pub fn kind(&self) -> usize {
        match self {
            Degradation::Blur { .. } => 0,
            Degradation::Noise { .. } => 1,
            Degradation::LowContrast { .. } => 2,
            Degradation::ColourCast { .. } => 3,
            Degradation::Blocking { .. } => 4,
        }
    }

    /// A random degradation of `kind` from `family`'s parameter ranges.
    pub fn sample(kind: usize, family: Family, rng: &mut SplitMix64) -> Degradation {
        let u = rng.uniform() as f32;
        let judge = family == Family::Judge;
        match kind {
            0 if judge => Degradation::Blur {
                radius: 1,
                passes: 2 + (u * 2.0) as usize,
            },
            0 => Degradation::Blur {
                radius: 1 + (u * 2.0) as usize,
                passes: 1,
            },
            1 => Degradation::Noise {
                sigma: if judge {
                    0.06 + 0.08 * u
                } else {
                    0.10 + 0.10 * u
                },
            },
            2 => Degradation::LowContrast {
                factor: if judge {
                    0.45 + 0.15 * u
                } else {
                    0.25 + 0.15 * u
                },
            },
            3 => {
                let tints: [[f32; 3]; 2] = if judge {
                    [[0.2, 1.0, 0.3], [1.0, 0.2, 1.0]]
                } else {
                    [[1.0, 0.6, 0.1], [0.1, 0.5, 1.0]]
                };
                Degradation::ColourCast {
                    tint: tints[(rng.next_u64() % 2) as usize],
                    amount: 0.35 + 0.2 * u,
                }
            }
            _ => Degradation::Blocking {
                block: if judge { 3 } else { 4 },
            },
        }
    }

    /// Applies the degradation to `img` (`[3, n, n]`, channel-major), clamped to [0, 1].
    pub fn apply(&self, img: &[f32], n: usize, rng: &mut SplitMix64) -> Vec<f32> {
        let plane = n * n;
        let mut out = img.to_vec();
        match *self {
            Degradation::Blur { radius, passes } => {
                for _ in 0..passes {
                    for c in 0..3 {
                        let p = &mut out[c * plane..(c + 1) * plane];
                        box_blur(p, n, radius);
                    }
                }
            }
            Degradation::Noise { sigma } => {
                for v in out.iter_mut() {
                    *v += sigma * rng.normal() as f32;
                }
            }
            Degradation::LowContrast { factor } => {
                let mean = img.iter().sum::<f32>() / img.len() as f32;
                for v in out.iter_mut() {
                    *v = mean + (*v - mean) * factor;
                }
            }
            Degradation::ColourCast { tint, amount } => {
                for c in 0..3 {
                    for v in out[c * plane..(c + 1) * plane].iter_mut() {
                        *v = *v * (1.0 - amount) + tint[c] * amount * (0.5 + 0.5 * *v);
                    }
                }
            }
            Degradation::Blocking { block } => {
                for c in 0..3 {
                    let p = &mut out[c * plane..(c + 1) * plane];
                    for by in (0..n).step_by(block) {
                        for bx in (0..n).step_by(block) {
                            let (y1, x1) = ((by + block).min(n), (bx + block).min(n));
                            let cells = ((y1 - by) * (x1 - bx)) as f32;
                            let mean = (by..y1)
                                .flat_map(|y| (bx..x1).map(move |x| (y, x)))
                                .map(|(y, x)| p[y * n + x])
                                .sum::<f32>()
                                / cells;
                            for y in by..y1 {
                                for x in bx..x1 {
                                    p[y * n + x] = mean;
                                }
                            }
                        }
                    }
                }
            }
        }
        for v in out.iter_mut() {
            *v = v.clamp(0.0, 1.0);
        }
        out
    }
}

/// Separable box blur with edge clamping, in place.
fn box_blur(p: &mut [f32], n: usize, r: usize) {
    let mut tmp = vec![0f32; n * n];
    let at = |i: isize| i.clamp(0, n as isize - 1) as usize;
    let w = (2 * r + 1) as f32;
    for y in 0..n {
        for x in 0..n {
            tmp[y * n + x] = (-(r as isize)..=r as isize)
                .map(|d| p[y * n + at(x as isize + d)])
                .sum::<f32>()
                / w;
        }
    }
    for y in 0..n {
        for x in 0..n {
            p[y * n + x] = (-(r as isize)..=r as isize)
                .map(|d| tmp[at(y as isize + d) * n + x])
                .sum::<f32>()
                / w;
        }
    }
}
