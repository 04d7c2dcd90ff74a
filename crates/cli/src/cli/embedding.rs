//! `reneg embedding`: import the official ReNeg files (or any one-tensor file), export to
//! safetensors or a PyTorch-loadable file, inspect, and encode a prompt into an embedding.

use super::{lib, load_model, user, ModelArgs};
use anyhow::Result;
use candle_core::{DType, Device};
use clap::{Subcommand, ValueEnum};
use reneg::embedding::NegativeEmbedding;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum EmbeddingCommand {
    /// Read a PyTorch .bin/.pt (never running code from it) or safetensors file of one tensor
    /// and save it as a reneg safetensors embedding with metadata.
    Import {
        /// The file to import (.bin/.pt or .safetensors).
        file: PathBuf,
        /// The reneg embedding to write (.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// The base model it was learned for, recorded in the metadata.
        #[arg(long)]
        base_model: Option<String>,
    },
    /// Write an embedding as safetensors, or as a .pt/.bin that torch.load reads back.
    Export {
        /// The embedding to export.
        file: PathBuf,
        /// safetensors, or pt (a file torch.load reads back as the tensor).
        #[arg(long, value_enum)]
        format: Format,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Shape, statistics, and which text encoder it fits.
    Inspect {
        /// The embedding file (.safetensors, .bin, .pt).
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Encode a (negative) prompt with a model's text encoder into an embedding file, e.g. the
    /// null-text start for training.
    Encode {
        #[command(flatten)]
        model: ModelArgs,
        /// The text; empty for the null-text embedding.
        #[arg(long, default_value = "")]
        text: String,
        /// The embedding file to write (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Safetensors,
    Pt,
}

fn tool_metadata(emb: &mut NegativeEmbedding) {
    emb.metadata.insert(
        "tool".into(),
        format!("reneg {}", env!("CARGO_PKG_VERSION")),
    );
}

/// `embedding inspect`: the shape, statistics, parts and metadata, as text or JSON.
fn inspect(file: &Path, json: bool) -> Result<()> {
    let emb = NegativeEmbedding::load(file).map_err(lib)?;
    let s = emb.stats().map_err(lib)?;
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["metadata"] = serde_json::to_value(&emb.metadata)?;
        v["parts"] = emb
            .parts()
            .iter()
            .map(|(name, t)| serde_json::json!({"name": name, "shape": t.dims()}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("file      {}", file.display());
        println!("shape     {:?} ({})", s.shape, s.dtype);
        println!("mean      {:.6}", s.mean);
        println!("std       {:.6}", s.std);
        println!(
            "row norms min {:.4}  median {:.4}  max {:.4}  (row 0: {:.4})",
            s.row_norm_min, s.row_norm_median, s.row_norm_max, s.row0_norm
        );
        println!("fits      {}", s.fits);
        let l = s.shape.get(1).copied().unwrap_or(0);
        if emb.mask.is_none() && l > 1 && s.identical_trailing_rows == l - 1 {
            println!(
                "rows      1-{} bitwise equal: the shape of T5's output for \"\" (</s> then padding); PixArt reads it with the mask of \"\" (row 0 only)",
                l - 1
            );
        }
        // The other parts of a negative (SDXL's pooled embedding, PixArt's mask).
        for (name, t) in emb.parts().iter().skip(1) {
            println!("part      {name} {:?}", t.dims());
        }
        for (k, v) in &emb.metadata {
            println!("meta      {k} = {v}");
        }
    }
    Ok(())
}

/// `embedding import`: a negative from another tool's file into safetensors with its
/// provenance; the official PixArt file gets the mask it is read with.
fn import(file: &Path, out: &Path, base_model: Option<String>) -> Result<()> {
    let mut emb = NegativeEmbedding::load(file).map_err(lib)?;
    tool_metadata(&mut emb);
    emb.metadata
        .insert("source".into(), file.display().to_string());
    // A T5-XXL-wide negative without a mask whose rows 1.. are T5's output for "" (the
    // official PixArt file): written with the mask it is read with.
    if emb.width() == 4096 {
        if let Some(mask) = emb.mask_of_empty().map_err(lib)? {
            emb.mask = Some(mask);
            println!(
                "added negative_prompt_attention_mask: the mask of \"\" (rows 1-{} are bitwise equal, T5's output for \"\")",
                emb.tokens() - 1
            );
        }
    }
    if let Some(b) = base_model {
        emb.metadata.insert("base_model".into(), b);
    }
    if out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(user(format!(
            "{}: import writes safetensors; use a .safetensors name (or `embedding export --format pt`)",
            out.display()
        )));
    }
    emb.save_safetensors(out).map_err(lib)?;
    println!(
        "{} {:?} -> {}",
        file.display(),
        emb.tensor.dims(),
        out.display()
    );
    Ok(())
}

pub fn run(cmd: EmbeddingCommand) -> Result<()> {
    match cmd {
        EmbeddingCommand::Import {
            file,
            out,
            base_model,
        } => import(&file, &out, base_model)?,
        EmbeddingCommand::Export { file, format, out } => {
            let mut emb = NegativeEmbedding::load(&file).map_err(lib)?;
            tool_metadata(&mut emb);
            match format {
                Format::Safetensors => emb.save_safetensors(&out),
                Format::Pt => emb.save_torch(&out),
            }
            .map_err(lib)?;
            println!("{}", out.display());
        }
        EmbeddingCommand::Inspect { file, json } => inspect(&file, json)?,
        EmbeddingCommand::Encode { model, text, out } => {
            let sd = load_model(&model, DType::F32, &Device::Cpu)?;
            let c = sd.encode(&text).map_err(lib)?;
            let mut emb = NegativeEmbedding::from_conditioning(&c).map_err(lib)?;
            tool_metadata(&mut emb);
            emb.metadata.insert("base_model".into(), model.name()?);
            emb.metadata.insert("text".into(), text);
            emb.save(&out).map_err(lib)?;
            println!("{} {:?}", out.display(), emb.tensor.dims());
        }
    }
    Ok(())
}
