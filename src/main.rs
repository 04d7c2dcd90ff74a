//! The `reneg` command line: parses arguments, calls the library, prints. Errors are printed
//! on one line; bad input exits with code 2, internal failures with 1.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand, ValueEnum};
use reneg::StableDiffusion;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "reneg",
    version,
    about = "Negative embeddings for Stable Diffusion, learned with reward guidance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text-to-image with classifier-free guidance and a null-text or prompt negative.
    Generate(GenerateArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers pipeline folder (with model_index.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt; repeat for several images.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Negative prompt; empty (null text) when not given.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Seed of the first image; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image height in pixels (default: the UNet's sample_size times the VAE factor).
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Output folder for the PNGs.
    #[arg(long, default_value = "out")]
    out: PathBuf,
}

/// An error caused by the user's input: printed on one line, exit code 2.
#[derive(Debug)]
struct UserError(String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

fn user(msg: impl Into<String>) -> anyhow::Error {
    UserError(msg.into()).into()
}

/// Library errors from bad input become user errors; others stay internal.
fn lib(e: reneg::Error) -> anyhow::Error {
    if e.is_user_error() {
        user(e.to_string())
    } else {
        anyhow::Error::new(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            if e.chain().any(|c| c.downcast_ref::<UserError>().is_some()) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let device = Device::Cpu;
    let dtype: DType = args.dtype.into();
    if dtype == DType::BF16 && device.is_cpu() {
        return Err(user(
            "--dtype bf16 is not supported on the CPU (candle has no bf16 matmul there); use f32 or f16",
        ));
    }
    let mut sd = StableDiffusion::load(&args.model, dtype, &device).map_err(lib)?;
    let f = sd.vae_scale();
    let default_px = sd.unet.config().sample_size.unwrap_or(64) * f;
    let (h, w) = (
        args.height.unwrap_or(default_px),
        args.width.unwrap_or(default_px),
    );
    let factor = f << sd.unet.config().downsamplings();
    if h == 0 || w == 0 || h % factor != 0 || w % factor != 0 {
        return Err(user(format!(
            "--height {h} / --width {w}: both must be positive multiples of {factor} for this model"
        )));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| {
        user(format!(
            "{}: cannot create output folder: {e}",
            args.out.display()
        ))
    })?;

    let uncond = sd.encode_prompt(&args.negative_prompt).map_err(lib)?;
    for (i, prompt) in args.prompt.iter().enumerate() {
        let seed = args.seed + i as u64;
        let cond = sd.encode_prompt(prompt).map_err(lib)?;
        let shape = [1, sd.latent_channels(), h / f, w / f];
        let noise = reneg::rng::randn(seed, &shape, dtype, &device)?;
        let steps = args.steps;
        let latents = sd
            .sample(noise, steps, &cond, &uncond, args.guidance_scale, |k, _| {
                eprint!(
                    "\rimage {}/{}: step {}/{}",
                    i + 1,
                    args.prompt.len(),
                    k + 1,
                    steps
                );
            })
            .map_err(lib)?;
        eprintln!();
        let image = sd.decode(&latents).map_err(lib)?;
        let path = args.out.join(format!("{:04}-seed{seed}.png", i));
        save_png(&image, &path)?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes `[1, 3, H, W]` pixels in [-1, 1] as an 8-bit PNG, atomically (temp file + rename).
fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    let img = ((image.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .to_dtype(DType::U8)?;
    let (h, w, _) = img.dims3()?;
    let data = img.flatten_all()?.to_vec1::<u8>()?;
    let buf = image::RgbImage::from_raw(w as u32, h as u32, data).context("image buffer")?;
    let tmp = path.with_extension("png.tmp");
    buf.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| user(format!("{}: cannot write: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| user(format!("{}: cannot write: {e}", path.display())))?;
    Ok(())
}
