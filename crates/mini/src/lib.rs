//! The miniature world (issues 8 and 17): deterministic captioned scenes and the degradations
//! people dislike (`scene`, `degrade`), its tokenizer (`vocab`), the recipe that trains its
//! models from scratch (`recipe`) and the independent judge (`judge`).
//!
//! A crate of its own: the core library (`reneg`) does not know the world. The judge reaches
//! the core's reward interface ([`reneg::reward::Reward`]) from outside, as any
//! evaluation-only scorer would.

pub mod degrade;
pub mod experiment;
pub mod judge;
pub mod recipe;
pub mod rewards;
pub mod scene;
pub mod vocab;

pub use degrade::{Degradation, Family};
use reneg::rng::SplitMix64;
pub use scene::Scene;
use std::path::PathBuf;

/// The committed miniature world in this source tree (`assets/mini`): what the tests and the
/// recipe's comparisons read. The binary's default model is its embedded copy
/// (`cli::builtin`), which works wherever the binary is installed.
pub fn default_root() -> PathBuf {
    // The world's files sit at the repository root, beside the crates that use them.
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/mini"));
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// The committed miniature world's diffusers pipeline.
pub fn default_model() -> PathBuf {
    default_root().join("pipeline")
}

/// How examples are drawn.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// Image side in pixels.
    pub size: usize,
    /// Share of examples that are degraded.
    pub degraded_share: f64,
    /// Share of degraded examples whose caption names the degradation.
    pub quality_word_share: f64,
    /// Of those, the share captioned with the quality word alone ("blurry") and the share
    /// captioned mostly by it ("a blurry image of a red circle"), as web captions often are;
    /// the rest keep the whole scene ("..., on a grey background, blurry").
    pub quality_only_share: f64,
    pub quality_mostly_share: f64,
    /// Which degradation parameters (the reward's or the judge's).
    pub family: Family,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            size: 32,
            degraded_share: 0.4,
            quality_word_share: 0.5,
            quality_only_share: 0.25,
            quality_mostly_share: 0.25,
            family: Family::Reward,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub scene: Scene,
    pub caption: String,
    /// `[3, size, size]` RGB in [0, 1], channel-major.
    pub image: Vec<f32>,
    pub degradation: Option<Degradation>,
}

/// The generator of example `index` of dataset `seed`: examples are independent of each other
/// and of how many are drawn.
fn rng_for(seed: u64, index: u64) -> SplitMix64 {
    let mut mix = SplitMix64::new(seed ^ 0xA076_1D64_78BD_642F);
    let base = mix.next_u64();
    SplitMix64::new(base ^ index.wrapping_mul(0xE703_7ED1_A0B4_28DB))
}

/// Example `index` of the dataset `seed`.
pub fn example(seed: u64, index: u64, cfg: &DataConfig) -> Example {
    let mut rng = rng_for(seed, index);
    let scene = Scene::sample(&mut rng);
    let clean = scene.render(cfg.size);
    let mut caption = scene.caption();
    let degradation = (rng.uniform() < cfg.degraded_share).then(|| {
        let kind = (rng.next_u64() % degrade::KINDS.len() as u64) as usize;
        Degradation::sample(kind, cfg.family, &mut rng)
    });
    let image = match &degradation {
        Some(d) => {
            let worded = rng.uniform() < cfg.quality_word_share;
            let image = d.apply(&clean, cfg.size, &mut rng);
            if worded {
                // The form is drawn last, so the images (and the captions of the world's
                // first version, which had only the last form) do not depend on it.
                let word = degrade::QUALITY_WORDS[d.kind()];
                let u = rng.uniform();
                let first = &scene.shapes[0];
                caption = if u < cfg.quality_only_share {
                    word.to_string()
                } else if u < cfg.quality_only_share + cfg.quality_mostly_share {
                    format!(
                        "a {word} image of a {} {}",
                        scene::COLOURS[first.colour].0,
                        first.kind.name()
                    )
                } else {
                    format!("{caption}, {word}")
                };
            }
            image
        }
        None => clean,
    };
    Example {
        scene,
        caption,
        image,
        degradation,
    }
}

/// A preference pair for the reward model: the clean rendering of scene `index` and a degraded
/// copy of it (kind drawn uniformly, `family`'s parameters), with the clean caption.
pub fn preference_pair(
    seed: u64,
    index: u64,
    size: usize,
    family: Family,
) -> (Scene, Vec<f32>, Vec<f32>, Degradation) {
    let mut rng = rng_for(seed ^ 0x5041_4952, index);
    let scene = Scene::sample(&mut rng);
    let clean = scene.render(size);
    let kind = (rng.next_u64() % degrade::KINDS.len() as u64) as usize;
    let d = Degradation::sample(kind, family, &mut rng);
    let bad = d.apply(&clean, size, &mut rng);
    (scene, clean, bad, d)
}
