//! `--reward` values: the core library's reward kinds and the miniature world's judge, as
//! flags; `reneg_mini::rewards` loads them by name.

use candle_core::{DType, Device};
use reneg::error::Result;
use reneg::reward::load::RewardKind;
use reneg::reward::Reward;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RewardArg {
    /// HPSv2 / HPSv2.1 (OpenCLIP ViT-H-14 state dict).
    Hps,
    /// PickScore (transformers CLIPModel folder).
    Pickscore,
    /// LAION aesthetic v2 (CLIPVisionModelWithProjection folder + MLP head).
    Aesthetic,
    /// CLIP score (any transformers CLIPModel folder).
    Clip,
    /// The miniature world's judge, P(no degradation) x 100 (evaluation only).
    JudgeQuality,
    /// The miniature world's judge, P(shapes and colours as captioned) x 100 (evaluation only).
    JudgeMatch,
}

impl RewardArg {
    /// The core reward kind, or `None` for the judge's evaluation-only scores.
    pub fn core(self) -> Option<RewardKind> {
        match self {
            RewardArg::Hps => Some(RewardKind::Hps),
            RewardArg::Pickscore => Some(RewardKind::Pickscore),
            RewardArg::Aesthetic => Some(RewardKind::Aesthetic),
            RewardArg::Clip => Some(RewardKind::Clip),
            RewardArg::JudgeQuality | RewardArg::JudgeMatch => None,
        }
    }

    /// The name on the command line ("judge-quality").
    pub fn flag(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    pub fn load(self, path: &Path, dtype: DType, device: &Device) -> Result<Box<dyn Reward>> {
        reneg_mini::rewards::load(&self.flag(), path, dtype, device)
    }
}
