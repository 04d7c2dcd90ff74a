//! lvdm's key names to the ones reneg's models load: the UNet to diffusers'
//! `UNet3DConditionModel` names (with lvdm's frame-rate embedding beside its time embedding),
//! driven by the config the way lvdm's `UNetModel.__init__` lays out its blocks. Every UNet key
//! of the checkpoint must find a place (lvdm loads strictly): one left over is refused by name.

use super::config::UnetParams;
use crate::error::{Error, Result};
use crate::single_file::{resnet_name, same};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The prefix of the UNet's keys in a LatentDiffusion state dict.
pub const UNET: &str = "model.diffusion_model.";

/// One renaming: keys under `from` go under `to`, the rest of the name through `rename`.
type Rule = (String, String, fn(&str) -> String);

/// The rules of one lvdm ResBlock at `from` as the `j`th layer of diffusers block `to`: its
/// temporal convolution (`temopral_conv`, sic) to `temp_convs.j` (the same names inside, and
/// listed first so that it is not taken for a resnet weight), the rest to `resnets.j`.
fn resblock(rules: &mut Vec<Rule>, from: &str, to: &str, j: usize) {
    rules.push((
        format!("{from}temopral_conv."),
        format!("{to}temp_convs.{j}."),
        same,
    ));
    rules.push((from.to_string(), format!("{to}resnets.{j}."), resnet_name));
}

/// A spatial transformer at `from` and the temporal one after it, as layer `j` of `to`.
fn transformers(rules: &mut Vec<Rule>, from: &str, to: &str, j: usize) {
    rules.push((format!("{from}1."), format!("{to}attentions.{j}."), same));
    rules.push((
        format!("{from}2."),
        format!("{to}temp_attentions.{j}."),
        same,
    ));
}

/// Where lvdm's UNet of `params` keeps each layer, in diffusers' names, as lvdm's
/// `UNetModel.__init__` lays the blocks out.
fn rules(params: &UnetParams) -> Vec<Rule> {
    let levels = params.channel_mult.len();
    let nrb = params.num_res_blocks;
    let attention = params.attention_levels();
    let mut rules: Vec<Rule> = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("fps_embedding.0.", "fps_embedding.linear_1."),
        ("fps_embedding.2.", "fps_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("init_attn.0.", "transformer_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string(), same as fn(&str) -> String))
    .collect();
    let mut idx = 1;
    for (level, &attends) in attention.iter().enumerate() {
        let to = format!("down_blocks.{level}.");
        for j in 0..nrb {
            let from = format!("input_blocks.{idx}.");
            resblock(&mut rules, &format!("{from}0."), &to, j);
            if attends {
                transformers(&mut rules, &from, &to, j);
            }
            idx += 1;
        }
        if level + 1 < levels {
            rules.push((
                format!("input_blocks.{idx}.0.op."),
                format!("{to}downsamplers.0.conv."),
                same,
            ));
            idx += 1;
        }
    }
    resblock(&mut rules, "middle_block.0.", "mid_block.", 0);
    transformers(&mut rules, "middle_block.", "mid_block.", 0);
    resblock(&mut rules, "middle_block.3.", "mid_block.", 1);
    let mut idx = 0;
    for up in 0..levels {
        let level = levels - 1 - up;
        let to = format!("up_blocks.{up}.");
        for j in 0..=nrb {
            let from = format!("output_blocks.{idx}.");
            resblock(&mut rules, &format!("{from}0."), &to, j);
            if attention[level] {
                transformers(&mut rules, &from, &to, j);
            }
            if j == nrb && level > 0 {
                let k = if attention[level] { 3 } else { 1 };
                rules.push((
                    format!("{from}{k}.conv."),
                    format!("{to}upsamplers.0.conv."),
                    same,
                ));
            }
            idx += 1;
        }
    }
    rules
}

/// The UNet of `params` from lvdm's names (the prefix already dropped) to diffusers', and the
/// `UNet3DConditionModel` config that builds it. The frame-rate embedding goes to
/// `fps_embedding.linear_{1,2}`.
pub fn unet(
    u: &HashMap<String, Tensor>,
    params: &UnetParams,
    file: &Path,
) -> Result<(HashMap<String, Tensor>, Value)> {
    let rules = rules(params);
    let mut out = HashMap::new();
    let mut left = vec![];
    for (k, v) in u {
        let target = rules.iter().find_map(|(from, to, rename)| {
            k.strip_prefix(from.as_str())
                .map(|rest| format!("{to}{}", rename(rest)))
        });
        match target {
            Some(t) => {
                out.insert(t, v.clone());
            }
            None => left.push(k.as_str()),
        }
    }
    if !left.is_empty() {
        left.sort_unstable();
        return Err(Error::file(
            file,
            format!(
                "{} UNet weights have no place in the model its config describes (first: {UNET}{}); the checkpoint and the config disagree",
                left.len(),
                left[0]
            ),
        ));
    }
    // init_attn projects with Conv1d (kernel 1) where diffusers' transformer_in has Linear.
    for p in [
        "transformer_in.proj_in.weight",
        "transformer_in.proj_out.weight",
    ] {
        if let Some(w) = out.get(p).filter(|w| w.rank() == 3) {
            let w = w.squeeze(2)?;
            out.insert(p.to_string(), w);
        }
    }
    let attention = params.attention_levels();
    let channels: Vec<usize> = params
        .channel_mult
        .iter()
        .map(|m| m * params.model_channels)
        .collect();
    let down: Vec<&str> = attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock3D"
            } else {
                "DownBlock3D"
            }
        })
        .collect();
    let up: Vec<&str> = attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock3D" } else { "UpBlock3D" })
        .collect();
    let cfg = json!({
        "_class_name": "UNet3DConditionModel",
        "in_channels": params.in_channels,
        "out_channels": params.out_channels,
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": params.num_res_blocks,
        "cross_attention_dim": params.context_dim,
        "attention_head_dim": params.num_head_channels,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
    });
    Ok((out, cfg))
}
