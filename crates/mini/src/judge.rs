//! The independent judge of the miniature world: a small convolutional classifier, trained
//! by the project on the judge's own degradation family, that ReNeg never sees. From an
//! image it predicts the degradation (none or one of five kinds) and, at each of the five
//! caption positions, the shape there (or none) and its colour. Two evaluation scores come
//! from it: `judge-quality`, 100 x P(no degradation), and `judge-match`, 100 x the
//! probability that every position holds what the caption says (shape and colour named, or
//! empty when the caption names nothing there).

use crate::degrade::KINDS;
use crate::scene::{Scene, COLOURS, POSITIONS, SHAPES};
use candle_core::{DType, Device, Tensor, D};
use reneg::error::{read_json, Error, Result};
use reneg::nn::{Conv2d, GroupNorm, Linear};
use reneg::reward::{check_batch, Reward};
use reneg::weights::{Vb, Weights};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "judge.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JudgeConfig {
    /// Always "reneg-mini-judge".
    pub model_type: String,
    /// Input side in pixels; other sizes are resized (nearest) first.
    pub image_size: usize,
    /// Channels of the four conv stages (the last three stride 2).
    pub channels: [usize; 4],
    pub hidden: usize,
    pub groups: usize,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            model_type: "reneg-mini-judge".into(),
            image_size: 32,
            channels: [32, 64, 64, 64],
            hidden: 256,
            groups: 8,
        }
    }
}

/// Shape classes per position: 0 = empty, 1.. = [`SHAPES`].
pub const SLOT_CLASSES: usize = SHAPES.len() + 1;
pub const QUALITY_CLASSES: usize = KINDS.len() + 1;

pub struct Judge {
    pub cfg: JudgeConfig,
    /// The weights' dtype; inputs are converted to it.
    dtype: DType,
    convs: Vec<(Conv2d, GroupNorm)>,
    fc: Linear,
    quality: Linear,
    shape: Linear,
    colour: Linear,
}

/// The judge's log-probabilities for a batch.
pub struct JudgeOutput {
    /// `[b, 6]`: none, then [`KINDS`].
    pub quality: Tensor,
    /// `[b, 5, 4]`: per position, empty or a shape.
    pub shape: Tensor,
    /// `[b, 5, 7]`: per position, the colour (meaningful where a shape is).
    pub colour: Tensor,
}

impl Judge {
    pub fn new(cfg: JudgeConfig, vb: &Vb) -> Result<Self> {
        let mut convs = Vec::new();
        let mut in_ch = 3;
        for (i, &ch) in cfg.channels.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            convs.push((
                Conv2d::new(in_ch, ch, 3, stride, 1, &vb.pp(format!("convs.{i}")))?,
                GroupNorm::new(cfg.groups, ch, 1e-5, &vb.pp(format!("norms.{i}")))?,
            ));
            in_ch = ch;
        }
        let side = cfg.image_size >> (cfg.channels.len() - 1);
        let flat = in_ch * side * side;
        let n = POSITIONS.len();
        Ok(Self {
            fc: Linear::new(flat, cfg.hidden, true, &vb.pp("fc"))?,
            quality: Linear::new(cfg.hidden, QUALITY_CLASSES, true, &vb.pp("quality"))?,
            shape: Linear::new(cfg.hidden, n * SLOT_CLASSES, true, &vb.pp("shape"))?,
            colour: Linear::new(cfg.hidden, n * COLOURS.len(), true, &vb.pp("colour"))?,
            convs,
            cfg,
            dtype: vb.dtype(),
        })
    }

    /// Loads `config.json` and `judge.safetensors` from `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.is_file() {
            return Err(Error::file(
                dir,
                "a judge folder needs config.json and judge.safetensors (made by `reneg mini train`)",
            ));
        }
        let cfg: JudgeConfig = read_json(&cfg_path)?;
        if cfg.model_type != "reneg-mini-judge" {
            return Err(Error::file(
                &cfg_path,
                format!("model_type {:?} is not a reneg-mini-judge", cfg.model_type),
            ));
        }
        let weights = Weights::load(&dir.join(WEIGHTS_FILE), dtype, device)?;
        Self::new(cfg, &Vb::new(weights))
    }

    /// Log-probabilities for images in [0, 1], `[b, 3, h, w]`.
    pub fn forward(&self, images: &Tensor) -> Result<JudgeOutput> {
        let (b, c, h, w) = images.dims4()?;
        if c != 3 {
            return Err(Error::Invalid(format!(
                "the judge takes RGB images, got {c} channels"
            )));
        }
        let s = self.cfg.image_size;
        let mut xs = if (h, w) != (s, s) {
            images.interpolate2d(s, s)?
        } else {
            images.clone()
        };
        xs = ((xs.to_dtype(self.dtype)? * 2.0)? - 1.0)?;
        for (conv, norm) in &self.convs {
            xs = norm.forward_silu(&conv.forward(&xs)?)?;
        }
        let hidden = self.fc.forward(&xs.flatten_from(1)?)?.silu()?;
        let n = POSITIONS.len();
        let log_softmax = |t: Tensor| candle_nn::ops::log_softmax(&t, D::Minus1);
        Ok(JudgeOutput {
            quality: log_softmax(self.quality.forward(&hidden)?)?,
            shape: log_softmax(self.shape.forward(&hidden)?.reshape((b, n, SLOT_CLASSES))?)?,
            colour: log_softmax(
                self.colour
                    .forward(&hidden)?
                    .reshape((b, n, COLOURS.len()))?,
            )?,
        })
    }

    /// Log-probability that the image shows `scene`'s shapes and colours at their positions
    /// and nothing elsewhere, `[b]`.
    pub fn match_log_prob(&self, out: &JudgeOutput, scenes: &[Scene]) -> Result<Tensor> {
        let (shape_t, colour_t) = targets(scenes);
        let b = scenes.len();
        let dev = out.shape.device();
        let n = POSITIONS.len();
        let shape_idx = Tensor::from_vec(shape_t.clone(), (b, n, 1), dev)?;
        let lp_shape = out.shape.gather(&shape_idx, 2)?.squeeze(2)?;
        let colour_idx = Tensor::from_vec(colour_t, (b, n, 1), dev)?;
        let lp_colour = out.colour.gather(&colour_idx, 2)?.squeeze(2)?;
        // Colour counts only where a shape is named.
        let mask: Vec<f32> = shape_t.iter().map(|&s| (s > 0) as u8 as f32).collect();
        let mask = Tensor::from_vec(mask, (b, n), dev)?.to_dtype(lp_colour.dtype())?;
        Ok((lp_shape + (lp_colour * mask)?)?.sum(1)?)
    }
}

/// Per-position targets of `scenes`: shape class (0 empty) and colour index (0 where empty).
pub fn targets(scenes: &[Scene]) -> (Vec<u32>, Vec<u32>) {
    let n = POSITIONS.len();
    let mut shape = vec![0u32; scenes.len() * n];
    let mut colour = vec![0u32; scenes.len() * n];
    for (i, s) in scenes.iter().enumerate() {
        for sh in &s.shapes {
            let k = SHAPES.iter().position(|&k| k == sh.kind).unwrap_or(0);
            shape[i * n + sh.position] = k as u32 + 1;
            colour[i * n + sh.position] = sh.colour as u32;
        }
    }
    (shape, colour)
}

/// Per named shape (image by image, in caption order): whether the judge's most likely shape
/// and most likely colour at its position are the caption's.
pub fn per_shape(out: &JudgeOutput, scenes: &[Scene]) -> Result<Vec<Vec<(bool, bool)>>> {
    let shape = out.shape.argmax(D::Minus1)?.to_vec2::<u32>()?;
    let colour = out.colour.argmax(D::Minus1)?.to_vec2::<u32>()?;
    let (st, ct) = targets(scenes);
    let n = POSITIONS.len();
    Ok(scenes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.shapes
                .iter()
                .map(|sh| {
                    let p = sh.position;
                    (shape[i][p] == st[i * n + p], colour[i][p] == ct[i * n + p])
                })
                .collect()
        })
        .collect())
}

/// Per image, whether the judge's most likely shape and colour at every named position are
/// the caption's (positions the caption leaves empty are not asked).
pub fn recognised(out: &JudgeOutput, scenes: &[Scene]) -> Result<Vec<bool>> {
    Ok(per_shape(out, scenes)?
        .iter()
        .map(|v| v.iter().all(|&(s, c)| s && c))
        .collect())
}

/// The judge in `dir` as the evaluation-only reward giving `score`.
pub fn load_reward(
    score: JudgeScore,
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Reward>> {
    Ok(Box::new(JudgeReward {
        judge: Judge::load(dir, dtype, device)?,
        score,
    }))
}

/// Which of the two judge scores a [`JudgeReward`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JudgeScore {
    Quality,
    Match,
}

/// The judge as an evaluation-only reward (never used for adaptation or training).
pub struct JudgeReward {
    pub judge: Judge,
    pub score: JudgeScore,
}

impl Reward for JudgeReward {
    fn name(&self) -> &'static str {
        match self.score {
            JudgeScore::Quality => "judge-quality",
            JudgeScore::Match => "judge-match",
        }
    }

    fn evaluation_only(&self) -> bool {
        true
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        check_batch(images, prompts, self.score == JudgeScore::Match)?;
        let out = self.judge.forward(images)?;
        let lp = match self.score {
            JudgeScore::Quality => out.quality.narrow(1, 0, 1)?.squeeze(1)?,
            JudgeScore::Match => {
                let scenes = prompts
                    .iter()
                    .map(|p| {
                        Scene::parse(p).ok_or_else(|| {
                            Error::Invalid(format!(
                                "judge-match scores only miniature-world captions (\"a small red circle in the centre, on a grey background\"); got {p:?}"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.judge.match_log_prob(&out, &scenes)?
            }
        };
        Ok((lp.exp()? * 100.0)?)
    }
}
