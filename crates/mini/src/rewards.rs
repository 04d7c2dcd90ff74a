//! The rewards by the names `--reward` gives them: the core library's kinds (hps, pickscore,
//! aesthetic, clip) and the judge's two evaluation-only scores (judge-quality, judge-match).
//! The core knows only the `Reward` interface the judge implements, so this crate, which knows
//! both, is the one place that loads a reward by name (the command line's flag values and the
//! experiment's plans alike).

use crate::judge::{self, JudgeScore};
use candle_core::{DType, Device};
use reneg::error::{Error, Result};
use reneg::reward::load::RewardKind;
use reneg::reward::Reward;
use reneg::run::eval::RewardChoice;
use std::path::Path;

pub const JUDGE_QUALITY: &str = "judge-quality";
pub const JUDGE_MATCH: &str = "judge-match";

/// Loads the reward named `kind` from `path`.
pub fn load(kind: &str, path: &Path, dtype: DType, device: &Device) -> Result<Box<dyn Reward>> {
    match kind {
        JUDGE_QUALITY => judge::load_reward(JudgeScore::Quality, path, dtype, device),
        JUDGE_MATCH => judge::load_reward(JudgeScore::Match, path, dtype, device),
        k => {
            let core: RewardKind = serde_json::from_value(serde_json::Value::String(k.into()))
                .map_err(|_| {
                    Error::Invalid(format!(
                        "--reward {k}: not a reward reneg knows (hps, pickscore, aesthetic, clip, {JUDGE_QUALITY}, {JUDGE_MATCH})"
                    ))
                })?;
            reneg::reward::load::load(core, path, dtype, device)
        }
    }
}

/// [`load`] for an evaluation plan's reward (`reneg::run::eval::RewardLoader`).
pub fn load_choice(c: &RewardChoice, dtype: DType, device: &Device) -> Result<Box<dyn Reward>> {
    load(&c.kind, &c.model, dtype, device)
}
