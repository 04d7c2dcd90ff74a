//! Original single-file Stable Diffusion 1.x / 2.x checkpoints (the CompVis / Stability
//! `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` layout): every
//! original key name is converted to the diffusers / transformers name here, in one place,
//! and the architecture is inferred from the tensors' shapes. What shapes cannot tell (head
//! counts of non-standard models, group counts, v-prediction) comes from the standard SD
//! values, or from a diffusers-style config folder given as an override.

use crate::error::{read_json, Error, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const SD1_TEXT: &str = "cond_stage_model.transformer.";
const SD2_TEXT: &str = "cond_stage_model.model.";

/// Which text encoder family the checkpoint carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// CLIP ViT-L/14 in transformers' layout (SD 1.x).
    Sd1,
    /// OpenCLIP ViT-H/14, penultimate layer (SD 2.x).
    Sd2,
}

/// Settings the tensors cannot reveal.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// A diffusers-style folder whose `unet/`, `vae/`, `text_encoder/` `config.json`,
    /// `scheduler/scheduler_config.json` and `tokenizer/` replace the inferred ones.
    pub config_dir: Option<PathBuf>,
    /// "epsilon" or "v_prediction" (default: epsilon for SD1 and SD2-base widths, v for
    /// SD2 768-v, as diffusers guesses).
    pub prediction_type: Option<String>,
}

/// The converted checkpoint: per-component tensors under diffusers names, and configs.
pub struct Converted {
    pub base: Base,
    pub unet: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
    pub unet_config: Value,
    pub vae_config: Value,
    pub text_config: Value,
    pub scheduler_config: Value,
}

pub(crate) fn strip(all: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    all.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
        .collect()
}

/// Indices `i` for which some key starts with `{prefix}{i}.`.
pub(crate) fn indices(keys: &HashMap<String, Tensor>, prefix: &str) -> Vec<usize> {
    let mut v: Vec<usize> = keys
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

pub(crate) fn has_prefix(keys: &HashMap<String, Tensor>, prefix: &str) -> bool {
    keys.keys().any(|k| k.starts_with(prefix))
}

/// Moves every key under `from` to `to` (with a renaming of the remainder).
pub(crate) fn move_prefix(
    src: &HashMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    from: &str,
    to: &str,
    rename: impl Fn(&str) -> String,
) {
    for (k, v) in src {
        if let Some(rest) = k.strip_prefix(from) {
            out.insert(format!("{to}{}", rename(rest)), v.clone());
        }
    }
}

pub(crate) fn resnet_name(rest: &str) -> String {
    // LDM ResBlock -> diffusers ResnetBlock2D.
    for (a, b) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
        ("nin_shortcut.", "conv_shortcut."),
    ] {
        if let Some(r) = rest.strip_prefix(a) {
            return format!("{b}{r}");
        }
    }
    rest.to_string()
}

pub(crate) fn same(rest: &str) -> String {
    rest.to_string()
}

fn dim(t: &HashMap<String, Tensor>, key: &str, d: usize, file: &Path) -> Result<usize> {
    let tensor = t.get(key).ok_or_else(|| Error::Weight {
        file: file.to_path_buf(),
        name: key.to_string(),
        problem: "is missing: not a complete Stable Diffusion checkpoint".into(),
    })?;
    Ok(tensor.dims().get(d).copied().unwrap_or(0))
}

/// Converts the UNet and infers its config.
fn convert_unet(
    all: &HashMap<String, Tensor>,
    base: Base,
    file: &Path,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let u = strip(all, UNET);
    let mut out = HashMap::new();
    let model_channels = dim(&u, "input_blocks.0.0.weight", 0, file)?;
    let in_channels = dim(&u, "input_blocks.0.0.weight", 1, file)?;
    // A ControlNet has no output head; its config keeps the input's channel count.
    let out_channels = if u.contains_key("out.2.weight") {
        dim(&u, "out.2.weight", 0, file)?
    } else {
        in_channels
    };
    let time_dim = dim(&u, "time_embed.0.weight", 0, file)?;
    move_prefix(
        &u,
        &mut out,
        "time_embed.0.",
        "time_embedding.linear_1.",
        same,
    );
    move_prefix(
        &u,
        &mut out,
        "time_embed.2.",
        "time_embedding.linear_2.",
        same,
    );
    move_prefix(&u, &mut out, "input_blocks.0.0.", "conv_in.", same);
    move_prefix(&u, &mut out, "out.0.", "conv_norm_out.", same);
    move_prefix(&u, &mut out, "out.2.", "conv_out.", same);

    // Input blocks: per level, `layers` resnet(+attention) entries, then a downsampler.
    let inputs = indices(&u, "input_blocks.");
    let downsamplers: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|i| u.contains_key(&format!("input_blocks.{i}.0.op.weight")))
        .collect();
    let levels = downsamplers.len() + 1;
    let entries = inputs.len().saturating_sub(1); // without conv_in
    if entries < levels || !(entries - downsamplers.len()).is_multiple_of(levels) {
        return Err(Error::file(
            file,
            "UNet input blocks do not form a regular level structure",
        ));
    }
    let layers = (entries - downsamplers.len()) / levels;
    let mut channels = vec![];
    let mut attention = vec![];
    // Per level (SDXL's differ: 1, 2, 10); 1 where a level has no transformers.
    let mut transformer_depth = vec![];
    let mut context_dim = 0;
    let mut linear_proj = false;
    let mut idx = 1;
    for level in 0..levels {
        let mut level_attn = false;
        transformer_depth.push(1);
        for j in 0..layers {
            let p = format!("input_blocks.{idx}.");
            move_prefix(
                &u,
                &mut out,
                &format!("{p}0."),
                &format!("down_blocks.{level}.resnets.{j}."),
                resnet_name,
            );
            if j == 0 {
                channels.push(dim(&u, &format!("{p}0.out_layers.3.weight"), 0, file)?);
            }
            if has_prefix(&u, &format!("{p}1.")) {
                level_attn = true;
                move_prefix(
                    &u,
                    &mut out,
                    &format!("{p}1."),
                    &format!("down_blocks.{level}.attentions.{j}."),
                    same,
                );
                transformer_depth[level] = indices(&u, &format!("{p}1.transformer_blocks.")).len();
                context_dim = dim(
                    &u,
                    &format!("{p}1.transformer_blocks.0.attn2.to_k.weight"),
                    1,
                    file,
                )?;
                linear_proj = u
                    .get(&format!("{p}1.proj_in.weight"))
                    .map(|t| t.rank() == 2)
                    .unwrap_or(false);
            }
            idx += 1;
        }
        attention.push(level_attn);
        if level + 1 < levels {
            move_prefix(
                &u,
                &mut out,
                &format!("input_blocks.{idx}.0.op."),
                &format!("down_blocks.{level}.downsamplers.0.conv."),
                same,
            );
            idx += 1;
        }
    }
    if context_dim == 0 {
        return Err(Error::file(
            file,
            "UNet has no cross-attention: not a text-to-image Stable Diffusion model",
        ));
    }
    move_prefix(
        &u,
        &mut out,
        "middle_block.0.",
        "mid_block.resnets.0.",
        resnet_name,
    );
    move_prefix(
        &u,
        &mut out,
        "middle_block.1.",
        "mid_block.attentions.0.",
        same,
    );
    move_prefix(
        &u,
        &mut out,
        "middle_block.2.",
        "mid_block.resnets.1.",
        resnet_name,
    );

    // Output blocks: per level (deepest first), layers + 1 entries; resnet, attention, upsampler.
    for (i, o) in indices(&u, "output_blocks.").into_iter().enumerate() {
        let (level, j) = (i / (layers + 1), i % (layers + 1));
        let p = format!("output_blocks.{o}.");
        move_prefix(
            &u,
            &mut out,
            &format!("{p}0."),
            &format!("up_blocks.{level}.resnets.{j}."),
            resnet_name,
        );
        for sub in [1, 2] {
            let sp = format!("{p}{sub}.");
            if u.contains_key(&format!("{sp}conv.weight")) && !has_prefix(&u, &format!("{sp}norm."))
            {
                move_prefix(
                    &u,
                    &mut out,
                    &format!("{sp}conv."),
                    &format!("up_blocks.{level}.upsamplers.0.conv."),
                    same,
                );
            } else if has_prefix(&u, &sp) {
                move_prefix(
                    &u,
                    &mut out,
                    &sp,
                    &format!("up_blocks.{level}.attentions.{j}."),
                    same,
                );
            }
        }
    }

    // Head counts: SD1 uses 8 heads everywhere; SD2 heads of width 64.
    let heads: Vec<usize> = channels
        .iter()
        .map(|&c| match base {
            Base::Sd1 => 8,
            Base::Sd2 => (c / 64).max(1),
        })
        .collect();
    let down: Vec<&str> = attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    debug_assert_eq!(time_dim, 4 * model_channels);
    // SDXL's added conditioning (`label_emb`: pooled text and size ids).
    move_prefix(
        &u,
        &mut out,
        "label_emb.0.0.",
        "add_embedding.linear_1.",
        same,
    );
    move_prefix(
        &u,
        &mut out,
        "label_emb.0.2.",
        "add_embedding.linear_2.",
        same,
    );
    let mut cfg = json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": layers,
        "transformer_layers_per_block": if transformer_depth.iter().all(|&d| d == transformer_depth[0]) {
            json!(transformer_depth[0])
        } else {
            json!(transformer_depth)
        },
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear_proj,
        "upcast_attention": base == Base::Sd2,
        "norm_num_groups": 32,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
    });
    if u.contains_key("label_emb.0.0.weight") {
        // SDXL: six size ids of 256 sinusoid channels each after the pooled embedding.
        cfg["addition_embed_type"] = json!("text_time");
        cfg["addition_time_embed_dim"] = json!(256);
        cfg["projection_class_embeddings_input_dim"] =
            json!(dim(&u, "label_emb.0.0.weight", 1, file)?);
    }
    Ok((out, cfg))
}

fn attn_1x1(rest: &str) -> Option<&'static str> {
    Some(match rest.split('.').next()? {
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        "norm" => "group_norm",
        _ => return None,
    })
}

/// Converts the VAE's mid block (resnets and the 1x1-conv attention) under `from` -> `to`.
fn convert_vae_mid(
    v: &HashMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    from: &str,
    to: &str,
) -> Result<()> {
    move_prefix(
        v,
        out,
        &format!("{from}block_1."),
        &format!("{to}resnets.0."),
        resnet_name,
    );
    move_prefix(
        v,
        out,
        &format!("{from}block_2."),
        &format!("{to}resnets.1."),
        resnet_name,
    );
    for (k, t) in v {
        let Some(rest) = k.strip_prefix(&format!("{from}attn_1.")) else {
            continue;
        };
        let Some(name) = attn_1x1(rest) else { continue };
        let param = rest.rsplit('.').next().unwrap_or("");
        // The original stores q/k/v/proj_out as 1x1 convolutions.
        let t = if t.rank() == 4 {
            t.squeeze(3)?.squeeze(2)?
        } else {
            t.clone()
        };
        out.insert(format!("{to}attentions.0.{name}.{param}"), t);
    }
    Ok(())
}

pub(crate) fn convert_vae(
    all: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let v = strip(all, VAE);
    let mut out = HashMap::new();
    let levels = indices(&v, "encoder.down.").len();
    if levels == 0 {
        return Err(Error::file(
            file,
            "no VAE (first_stage_model.*) in the checkpoint",
        ));
    }
    let layers = indices(&v, "encoder.down.0.block.").len();
    let mut channels = vec![];
    for i in 0..levels {
        channels.push(dim(
            &v,
            &format!("encoder.down.{i}.block.0.conv2.weight"),
            0,
            file,
        )?);
        for j in 0..layers {
            move_prefix(
                &v,
                &mut out,
                &format!("encoder.down.{i}.block.{j}."),
                &format!("encoder.down_blocks.{i}.resnets.{j}."),
                resnet_name,
            );
        }
        move_prefix(
            &v,
            &mut out,
            &format!("encoder.down.{i}.downsample.conv."),
            &format!("encoder.down_blocks.{i}.downsamplers.0.conv."),
            same,
        );
        // The original decoder counts levels from the bottom; diffusers from the top.
        let o = levels - 1 - i;
        for j in 0..=layers {
            move_prefix(
                &v,
                &mut out,
                &format!("decoder.up.{o}.block.{j}."),
                &format!("decoder.up_blocks.{i}.resnets.{j}."),
                resnet_name,
            );
        }
        move_prefix(
            &v,
            &mut out,
            &format!("decoder.up.{o}.upsample.conv."),
            &format!("decoder.up_blocks.{i}.upsamplers.0.conv."),
            same,
        );
    }
    for side in ["encoder", "decoder"] {
        move_prefix(
            &v,
            &mut out,
            &format!("{side}.conv_in."),
            &format!("{side}.conv_in."),
            same,
        );
        move_prefix(
            &v,
            &mut out,
            &format!("{side}.conv_out."),
            &format!("{side}.conv_out."),
            same,
        );
        move_prefix(
            &v,
            &mut out,
            &format!("{side}.norm_out."),
            &format!("{side}.conv_norm_out."),
            same,
        );
        convert_vae_mid(
            &v,
            &mut out,
            &format!("{side}.mid."),
            &format!("{side}.mid_block."),
        )?;
    }
    move_prefix(&v, &mut out, "quant_conv.", "quant_conv.", same);
    move_prefix(&v, &mut out, "post_quant_conv.", "post_quant_conv.", same);
    let latent = dim(&v, "decoder.conv_in.weight", 1, file)?;
    let cfg = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": dim(&v, "encoder.conv_in.weight", 1, file)?,
        "out_channels": dim(&v, "decoder.conv_out.weight", 0, file)?,
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "use_quant_conv": v.contains_key("quant_conv.weight"),
        "use_post_quant_conv": v.contains_key("post_quant_conv.weight"),
        "mid_block_add_attention": has_prefix(&v, "encoder.mid.attn_1."),
    });
    Ok((out, cfg))
}

const SDXL_TEXT: &str = "conditioner.embedders.0.transformer.";
const SDXL_TEXT_2: &str = "conditioner.embedders.1.model.";

/// Whether a checkpoint is SDXL's original layout (`conditioner.embedders.*`).
pub fn is_sdxl<'a>(mut keys: impl Iterator<Item = &'a String>) -> bool {
    keys.any(|k| k.starts_with("conditioner.embedders."))
}

/// An original SDXL checkpoint (`sd_xl_base_1.0.safetensors`) converted: each component's
/// tensors under diffusers / transformers names, and their configs.
pub struct SdxlConverted {
    pub unet: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
    /// With `text_projection.weight` (open_clip's `[width, proj]` matrix, transposed).
    pub text_encoder_2: HashMap<String, Tensor>,
    pub unet_config: Value,
    pub vae_config: Value,
    pub text_config: Value,
    pub text_config_2: Value,
    pub scheduler_config: Value,
}

/// Converts an original SDXL checkpoint: the UNet as SD's (heads of width 64, per-level
/// transformer depth, `label_emb` as `add_embedding`), the VAE with SDXL's scaling factor,
/// CLIP ViT-L as transformers stores it, OpenCLIP bigG with all its blocks (the pipeline reads
/// the penultimate one and the pooled output) and its projection. `overrides.config_dir` (a
/// diffusers SDXL folder) replaces the inferred configs and the scheduler's.
pub fn convert_sdxl(
    all: &HashMap<String, Tensor>,
    path: &Path,
    overrides: &Overrides,
) -> Result<SdxlConverted> {
    if !has_prefix(all, SDXL_TEXT_2) || !has_prefix(all, SDXL_TEXT) {
        return Err(Error::file(
            path,
            "is a Stable Diffusion XL checkpoint without both text encoders (conditioner.embedders.0.transformer.* and conditioner.embedders.1.model.*): not a complete model",
        ));
    }
    let (unet, mut unet_config) = convert_unet(all, Base::Sd2, path)?;
    let (vae, mut vae_config) = convert_vae(all, path)?;
    vae_config["scaling_factor"] = json!(0.13025);
    let t1 = strip(all, SDXL_TEXT);
    let mut text_config = transformers_text_config(&t1, path)?;
    let t2 = strip(all, SDXL_TEXT_2);
    let width = dim(&t2, "token_embedding.weight", 1, path)?;
    let tower = OpenClipText {
        blocks_used: indices(&t2, "transformer.resblocks.").len(),
        heads: (width / 64).max(1),
        hidden_act: "gelu",
    };
    let (mut text_encoder_2, mut text_config_2) = convert_open_clip_text(&t2, &tower, path)?;
    let proj = t2.get("text_projection").ok_or_else(|| Error::Weight {
        file: path.to_path_buf(),
        name: format!("{SDXL_TEXT_2}text_projection"),
        problem: "is missing".into(),
    })?;
    text_config_2["projection_dim"] = json!(proj.dim(1)?);
    text_encoder_2.insert("text_projection.weight".into(), proj.t()?.contiguous()?);
    let mut scheduler_config = json!({
        "_class_name": "EulerDiscreteScheduler",
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
        "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": false,
    });
    if let Some(dir) = &overrides.config_dir {
        let read = |rel: &str| -> Result<Option<Value>> {
            let p = dir.join(rel);
            if p.is_file() {
                read_json(&p).map(Some)
            } else {
                Ok(None)
            }
        };
        for (rel, cfg) in [
            ("unet/config.json", &mut unet_config),
            ("vae/config.json", &mut vae_config),
            ("text_encoder/config.json", &mut text_config),
            ("text_encoder_2/config.json", &mut text_config_2),
            ("scheduler/scheduler_config.json", &mut scheduler_config),
        ] {
            if let Some(c) = read(rel)? {
                *cfg = c;
            }
        }
    }
    if let Some(p) = &overrides.prediction_type {
        scheduler_config["prediction_type"] = json!(p);
    }
    Ok(SdxlConverted {
        unet,
        vae,
        text_encoder: t1,
        text_encoder_2,
        unet_config,
        vae_config,
        text_config,
        text_config_2,
        scheduler_config,
    })
}

/// SD1: transformers' CLIPTextModel under `cond_stage_model.transformer.` already.
fn convert_text_sd1(
    all: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let t = strip(all, SD1_TEXT);
    let cfg = transformers_text_config(&t, file)?;
    Ok((t, cfg))
}

/// The config of a CLIP ViT text model stored in transformers' names (`text_model.*`), read
/// off its shapes: OpenAI's quick GELU and heads of width 64.
fn transformers_text_config(t: &HashMap<String, Tensor>, file: &Path) -> Result<Value> {
    let p = "text_model.";
    let hidden = dim(t, &format!("{p}embeddings.token_embedding.weight"), 1, file)?;
    let cfg = json!({
        "vocab_size": dim(t, &format!("{p}embeddings.token_embedding.weight"), 0, file)?,
        "hidden_size": hidden,
        "intermediate_size": dim(t, &format!("{p}encoder.layers.0.mlp.fc1.weight"), 0, file)?,
        "num_hidden_layers": indices(t, &format!("{p}encoder.layers.")).len(),
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": dim(t, &format!("{p}embeddings.position_embedding.weight"), 0, file)?,
        "hidden_act": "quick_gelu",
    });
    Ok(cfg)
}

/// SD2: OpenCLIP's text tower; SD2 conditions on the penultimate layer, so the last
/// resblock is left out (as diffusers does).
fn convert_text_sd2(
    all: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let t = strip(all, SD2_TEXT);
    let blocks = indices(&t, "transformer.resblocks.");
    let hidden = dim(&t, "token_embedding.weight", 1, file)?;
    let tower = OpenClipText {
        blocks_used: blocks.len().saturating_sub(1),
        heads: (hidden / 64).max(1),
        hidden_act: "gelu",
    };
    convert_open_clip_text(&t, &tower, file)
}

/// Which of an OpenCLIP text tower's blocks a model conditions on, and what the weights do not
/// say about it.
pub(crate) struct OpenClipText {
    /// Resblocks run (the rest are dropped): all but the last for the penultimate layer.
    pub blocks_used: usize,
    pub heads: usize,
    /// transformers' name of its activation: "gelu", or "quick_gelu" for OpenAI's towers.
    pub hidden_act: &'static str,
}

/// An OpenCLIP text tower (keys without their prefix: `token_embedding.weight`,
/// `positional_embedding`, `transformer.resblocks.N.*`, `ln_final.*`) as transformers'
/// `CLIPTextModel` of `tower.blocks_used` layers, with its config. The output is the last kept
/// block's through `final_layer_norm`, as SD 2.x and lvdm read it.
pub(crate) fn convert_open_clip_text(
    t: &HashMap<String, Tensor>,
    tower: &OpenClipText,
    file: &Path,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let mut out = HashMap::new();
    let used = tower.blocks_used;
    let hidden = dim(t, "token_embedding.weight", 1, file)?;
    move_prefix(
        t,
        &mut out,
        "token_embedding.",
        "embeddings.token_embedding.",
        same,
    );
    if let Some(pos) = t.get("positional_embedding") {
        out.insert("embeddings.position_embedding.weight".into(), pos.clone());
    }
    move_prefix(t, &mut out, "ln_final.", "final_layer_norm.", same);
    for i in 0..used {
        let p = format!("transformer.resblocks.{i}.");
        let to = format!("encoder.layers.{i}.");
        for (a, b) in [
            ("ln_1.", "layer_norm1."),
            ("ln_2.", "layer_norm2."),
            ("mlp.c_fc.", "mlp.fc1."),
            ("mlp.c_proj.", "mlp.fc2."),
            ("attn.out_proj.", "self_attn.out_proj."),
        ] {
            move_prefix(t, &mut out, &format!("{p}{a}"), &format!("{to}{b}"), same);
        }
        for (param, name) in [("in_proj_weight", "weight"), ("in_proj_bias", "bias")] {
            let fused = t
                .get(&format!("{p}attn.{param}"))
                .ok_or_else(|| Error::Weight {
                    file: file.to_path_buf(),
                    name: format!("{SD2_TEXT}{p}attn.{param}"),
                    problem: "is missing".into(),
                })?;
            for (k, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.insert(
                    format!("{to}self_attn.{proj}.{name}"),
                    fused.narrow(0, k * hidden, hidden)?,
                );
            }
        }
    }
    let cfg = json!({
        "vocab_size": dim(t, "token_embedding.weight", 0, file)?,
        "hidden_size": hidden,
        "intermediate_size": dim(t, "transformer.resblocks.0.mlp.c_fc.weight", 0, file)?,
        "num_hidden_layers": used,
        "num_attention_heads": tower.heads,
        "max_position_embeddings": dim(t, "positional_embedding", 0, file)?,
        "hidden_act": tower.hidden_act,
    });
    Ok((out, cfg))
}

/// Reads and converts a single-file checkpoint.
pub fn convert(path: &Path, overrides: &Overrides) -> Result<Converted> {
    convert_tensors(crate::model_file::read(path)?, path, overrides)
}

/// [`convert`] of a checkpoint already read (`path` names it in errors).
pub fn convert_tensors(
    all: HashMap<String, Tensor>,
    path: &Path,
    overrides: &Overrides,
) -> Result<Converted> {
    let base = if all.contains_key(&format!(
        "{SD1_TEXT}text_model.embeddings.token_embedding.weight"
    )) {
        Base::Sd1
    } else if all.contains_key(&format!("{SD2_TEXT}token_embedding.weight")) {
        Base::Sd2
    } else if is_sdxl(all.keys()) {
        return Err(Error::file(
            path,
            "is a Stable Diffusion XL checkpoint (conditioner.embedders.*): convert_sdxl reads it (--model loads it)",
        ));
    } else {
        let what = crate::family::Family::other_single_file(all.keys())
            .map_or(String::new(), |name| {
                format!(": {name}, a model family reneg does not run")
            });
        return Err(Error::file(
            path,
            format!("not an original Stable Diffusion 1.x/2.x checkpoint (no cond_stage_model text encoder){what}"),
        ));
    };
    let (unet, mut unet_config) = convert_unet(&all, base, path)?;
    let (vae, mut vae_config) = convert_vae(&all, path)?;
    let (text_encoder, mut text_config) = match base {
        Base::Sd1 => convert_text_sd1(&all, path)?,
        Base::Sd2 => convert_text_sd2(&all, path)?,
    };
    // diffusers' guess: SD2 with 1024-wide context is the 768-v model.
    let v = base == Base::Sd2 && unet_config["cross_attention_dim"] == 1024;
    let mut scheduler_config = json!({
        "_class_name": "DDIMScheduler",
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "num_train_timesteps": 1000, "clip_sample": false, "set_alpha_to_one": false,
        "steps_offset": 1,
        "prediction_type": if v { "v_prediction" } else { "epsilon" },
        "timestep_spacing": "leading",
    });
    if let Some(dir) = &overrides.config_dir {
        let read = |rel: &str| -> Result<Option<Value>> {
            let p = dir.join(rel);
            if p.is_file() {
                read_json(&p).map(Some)
            } else {
                Ok(None)
            }
        };
        if let Some(c) = read("unet/config.json")? {
            unet_config = c;
        }
        if let Some(c) = read("vae/config.json")? {
            vae_config = c;
        }
        if let Some(c) = read("text_encoder/config.json")? {
            text_config = c;
        }
        if let Some(c) = read("scheduler/scheduler_config.json")? {
            scheduler_config = c;
        }
    }
    if let Some(p) = &overrides.prediction_type {
        scheduler_config["prediction_type"] = json!(p);
    }
    Ok(Converted {
        base,
        unet,
        vae,
        text_encoder,
        unet_config,
        vae_config,
        text_config,
        scheduler_config,
    })
}

/// Loads a single-file checkpoint as a pipeline.
pub fn load(
    path: &Path,
    overrides: &Overrides,
    dtype: DType,
    device: &Device,
) -> Result<crate::Pipeline> {
    load_with_loras(path, overrides, dtype, device, &[])
}

/// [`load`] with LoRAs merged into the converted UNet and text encoder weights.
pub fn load_with_loras(
    path: &Path,
    overrides: &Overrides,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
) -> Result<crate::Pipeline> {
    load_tensors(
        crate::model_file::read(path)?,
        path,
        overrides,
        dtype,
        device,
        loras,
    )
}

/// [`load_with_loras`] of a checkpoint already read (`path` names it in errors).
pub fn load_tensors(
    all: HashMap<String, Tensor>,
    path: &Path,
    overrides: &Overrides,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
) -> Result<crate::Pipeline> {
    use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
    use crate::models::unet::{UNet2DConditionModel, UNetConfig};
    use crate::models::vae::{AutoencoderKL, VaeConfig};
    use crate::scheduler::SchedulerConfig;
    use crate::tokenizer::ClipTokenizer;
    use crate::weights::{Vb, Weights};

    if is_sdxl(all.keys()) {
        return crate::family::sdxl::load_single_file(all, path, overrides, dtype, device, loras);
    }
    // VideoCrafter's LatentDiffusion shares SD's prefixes; its temporal layers tell it apart.
    if crate::family::videocrafter::is_lvdm(all.keys()) {
        use crate::family::videocrafter::{load, Files};
        let config = match &overrides.config_dir {
            Some(p) if p.is_file() => Some(p.clone()),
            Some(p) => {
                return Err(Error::file(
                    p,
                    "is a folder; a VideoCrafter checkpoint takes its inference .yaml as --model-config",
                ))
            }
            None => None,
        };
        return load(&Files::of_file(path, config), all, dtype, device, loras);
    }
    let mut c = convert_tensors(all, path, overrides)?;
    {
        use crate::lora::{merge_all, Component};
        merge_all(
            loras,
            &mut [
                (Component::Unet, &mut c.unet),
                (Component::TextEncoder, &mut c.text_encoder),
            ],
        )?;
    }
    let label = |what: &str| PathBuf::from(format!("{} ({what})", path.display()));
    let vb = |t: HashMap<String, Tensor>, what: &str| {
        Vb::new(Weights::from_tensors(t, &label(what), dtype, device))
    };
    let unet = UNet2DConditionModel::new(
        UNetConfig::from_value(c.unet_config, &label("unet config"))?,
        &vb(c.unet, "unet"),
    )?;
    let vae = AutoencoderKL::new(
        VaeConfig::from_value(c.vae_config, &label("vae config"))?,
        &vb(c.vae, "vae"),
    )?;
    let text_encoder = ClipTextModel::new(
        ClipTextConfig::from_value(c.text_config, &label("text encoder config"))?,
        &vb(c.text_encoder, "text encoder"),
    )?;
    let scheduler = SchedulerConfig::from_value(c.scheduler_config, &label("scheduler config"))?;
    let tok_dir = overrides
        .config_dir
        .as_ref()
        .map(|d| d.join("tokenizer"))
        .filter(|d| d.is_dir());
    let tokenizer = match tok_dir {
        Some(d) => ClipTokenizer::from_dir(&d)?,
        None => ClipTokenizer::embedded(match c.base {
            Base::Sd1 => "<|endoftext|>",
            Base::Sd2 => "!",
        })?,
    };
    crate::Pipeline::from_parts(
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler,
        path,
        dtype,
        device,
    )
}

/// The keys of an original-layout ControlNet, with or without the `control_model.` prefix
/// community safetensors files carry.
const CONTROL: &str = "control_model.";

/// A single-file ControlNet in the original layout (lllyasviel's ControlNet 1.0/1.1 `.pth`,
/// or safetensors with `control_model.` keys) as a diffusers `ControlNetModel` state dict and
/// config: the contracting half converts as an SD UNet's does; `input_hint_block`'s
/// convolutions become `controlnet_cond_embedding`, `zero_convs.N.0` become
/// `controlnet_down_blocks.N` and `middle_block_out.0` becomes `controlnet_mid_block`.
pub fn convert_controlnet(
    all: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let prefixed = has_prefix(all, CONTROL);
    let c: HashMap<String, Tensor> = if prefixed {
        strip(all, CONTROL)
    } else {
        all.clone()
    };
    if !has_prefix(&c, "input_hint_block.") || !has_prefix(&c, "zero_convs.") {
        return Err(Error::file(
            file,
            "not an original-layout ControlNet (no input_hint_block / zero_convs); give a diffusers ControlNetModel folder or an original ControlNet file",
        ));
    }
    // The contracting half, under the UNet's original prefix, converts as a UNet's.
    let as_unet: HashMap<String, Tensor> = c
        .iter()
        .filter(|(k, _)| {
            ["time_embed.", "input_blocks.", "middle_block."]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (format!("{UNET}{k}"), v.clone()))
        .collect();
    // SD2's 1024-wide context means SD2's head widths.
    let context = c
        .iter()
        .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
        .map(|(_, v)| v.dim(1))
        .transpose()?
        .unwrap_or(768);
    let base = if context == 1024 {
        Base::Sd2
    } else {
        Base::Sd1
    };
    let (mut out, mut cfg) = convert_unet(&as_unet, base, file)?;
    // input_hint_block: convolutions at even indices (SiLUs between them): conv_in, the
    // blocks in order, conv_out last.
    let hint = indices(&c, "input_hint_block.");
    if hint.len() < 2 {
        return Err(Error::file(
            file,
            "input_hint_block has fewer than two convolutions",
        ));
    }
    let mut embedding_channels = vec![dim(&c, "input_hint_block.0.weight", 0, file)?];
    for (n, &i) in hint.iter().enumerate() {
        let to = if n == 0 {
            "controlnet_cond_embedding.conv_in.".to_string()
        } else if n + 1 == hint.len() {
            "controlnet_cond_embedding.conv_out.".to_string()
        } else {
            // Pairs: a same-size convolution, then a stride-2 one to the next width.
            if n % 2 == 0 {
                embedding_channels.push(dim(&c, &format!("input_hint_block.{i}.weight"), 0, file)?);
            }
            format!("controlnet_cond_embedding.blocks.{}.", n - 1)
        };
        move_prefix(&c, &mut out, &format!("input_hint_block.{i}."), &to, same);
    }
    for n in indices(&c, "zero_convs.") {
        move_prefix(
            &c,
            &mut out,
            &format!("zero_convs.{n}.0."),
            &format!("controlnet_down_blocks.{n}."),
            same,
        );
    }
    move_prefix(
        &c,
        &mut out,
        "middle_block_out.0.",
        "controlnet_mid_block.",
        same,
    );
    let conditioning_channels = dim(&c, "input_hint_block.0.weight", 1, file)?;
    if let Value::Object(m) = &mut cfg {
        m.insert("_class_name".into(), json!("ControlNetModel"));
        m.remove("up_block_types");
        m.remove("out_channels");
        m.insert("conditioning_channels".into(), json!(conditioning_channels));
        m.insert(
            "conditioning_embedding_out_channels".into(),
            json!(embedding_channels),
        );
    }
    Ok((out, cfg))
}
