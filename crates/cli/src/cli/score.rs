//! `reneg score`: score images with a reward model; prints a table and writes JSON.

use super::rewards::RewardArg;
use super::{lib, user};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[arg(long, value_enum)]
    pub reward: RewardArg,
    /// The reward model: a folder in its owner's layout, or (HPS) a weights file.
    #[arg(long)]
    pub reward_model: PathBuf,
    /// The prompt: once for all images, or once per image in order.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A JSONL file of {"image": PATH, "prompt": TEXT} lines (paths relative to the file).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Where to write the scores as JSON.
    #[arg(long, default_value = "scores.json")]
    pub out: PathBuf,
    /// PNG images.
    pub images: Vec<PathBuf>,
}

/// A PNG as `[1, 3, h, w]` in [0, 1] (grey and alpha dropped to RGB).
pub fn read_png(path: &Path) -> Result<Tensor> {
    let img = reneg::io::read_png(path).map_err(lib)?;
    let (w, h) = (img.width, img.height);
    Ok(Tensor::from_vec(img.to_chw(), (1, 3, h, w), &Device::Cpu)?)
}

/// The (image, prompt) pairs of a `--pairs` JSON-lines file (image paths relative to it).
fn read_pairs(file: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut pairs = vec![];
    let text = std::fs::read_to_string(file)
        .map_err(|e| user(format!("{}: cannot read: {e}", file.display())))?;
    let base = file.parent().unwrap_or(Path::new("."));
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| user(format!("{}:{}: invalid JSON: {e}", file.display(), i + 1)))?;
        let (Some(img), prompt) = (v["image"].as_str(), v["prompt"].as_str().unwrap_or("")) else {
            return Err(user(format!(
                "{}:{}: needs an \"image\" field",
                file.display(),
                i + 1
            )));
        };
        pairs.push((base.join(img), prompt.to_string()));
    }
    Ok(pairs)
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let mut pairs: Vec<(PathBuf, String)> = match &args.pairs {
        Some(file) => read_pairs(file)?,
        None => vec![],
    };
    let prompts: Vec<String> = match args.prompt.len() {
        0 => vec![String::new(); args.images.len()],
        1 => vec![args.prompt[0].clone(); args.images.len()],
        n if n == args.images.len() => args.prompt.clone(),
        n => {
            return Err(user(format!(
                "{n} prompts for {} images: give one prompt for all, or one per image",
                args.images.len()
            )))
        }
    };
    pairs.extend(args.images.iter().cloned().zip(prompts));
    if pairs.is_empty() {
        return Err(user("no images: pass PNG files or --pairs FILE"));
    }
    let reward = args
        .reward
        .load(&args.reward_model, DType::F32, &Device::Cpu)
        .map_err(lib)?;
    let mut rows = vec![];
    println!("{:>10}  {:<40}  prompt", reward.name(), "image");
    for (path, prompt) in &pairs {
        let image = read_png(path)?;
        let s = reward
            .score(&image, std::slice::from_ref(prompt))
            .map_err(lib)?
            .to_vec1::<f32>()?[0];
        println!("{s:>10.4}  {:<40}  {prompt}", path.display());
        rows.push(
            serde_json::json!({"image": path.display().to_string(), "prompt": prompt, "score": s}),
        );
    }
    let json = serde_json::json!({
        "reward": reward.name(),
        "reward_model": args.reward_model.display().to_string(),
        "scores": rows,
    });
    reneg::io::write_atomic(&args.out, serde_json::to_string_pretty(&json)?.as_bytes())
        .map_err(lib)?;
    Ok(())
}
