//! VideoCrafter2 (AILab-CVC/VideoCrafter's `lvdm`), as its owners ship it: a LatentDiffusion
//! state dict (`model.ckpt`, a Lightning or DeepSpeed pickle read by the safe reader, or a
//! `.safetensors` of the same dict) and its inference yaml. Its roles are SD's with lvdm's
//! models: the OpenCLIP text tower (all blocks but the last, then `ln_final`: the 1024-wide
//! space of SD 2.1, so SD 2.1 negatives apply unchanged), a UNet with temporal convolutions and
//! attention and frame-rate conditioning (diffusers' `UNet3DConditionModel` plus lvdm's
//! `fps_embedding`), and the KL VAE decoding frame by frame. It samples with lvdm's DDIM:
//! uniform timesteps, the checkpoint's alpha-bar, and `use_scale` (see
//! [`crate::scheduler::ProcessTables`]).

pub mod config;
pub mod convert;

use super::roles::Defaults;
use super::sd::{ClipEncoder, FrameRate, UnetDenoiser, VaeDecoder};
use crate::error::{Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::scheduler::{ProcessTables, SchedulerConfig};
use crate::single_file::{convert_open_clip_text, convert_vae, strip, OpenClipText};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{Vb, Weights};
use candle_core::{DType, Device, Tensor};
use config::LvdmConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TEXT: &str = "cond_stage_model.model.";

/// What VideoCrafter2's own script samples with (`scripts/run_text2video.sh`): guidance 12,
/// 50 DDIM steps at eta 1, conditioned on (and saved at) 28 frames per second.
pub const DEFAULTS: Defaults = Defaults {
    guidance_scale: 12.0,
    steps: 50,
    eta: 1.0,
    fps: 28,
};

/// The files of a VideoCrafter model.
#[derive(Debug, Clone)]
pub struct Files {
    /// `model.ckpt` or a `.safetensors` of the same state dict.
    pub checkpoint: PathBuf,
    /// The inference yaml (None: VideoCrafter2's, built in).
    pub config: Option<PathBuf>,
    /// open_clip's config of the text tower the yaml's `arch` names (None: ViT-H-14's).
    pub open_clip_config: Option<PathBuf>,
}

impl Files {
    /// A folder with a checkpoint (`model.safetensors`, else `model.ckpt`) and one yaml config
    /// (`config.yaml`, or the only `*.yaml` there); None when it has neither checkpoint.
    pub fn of_folder(dir: &Path) -> Result<Option<Self>> {
        let Some(checkpoint) = ["model.safetensors", "model.ckpt"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
        else {
            return Ok(None);
        };
        let config = match dir.join("config.yaml") {
            p if p.is_file() => p,
            _ => {
                let yamls: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| Error::file(dir, format!("cannot list: {e}")))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                    .collect();
                match yamls.as_slice() {
                    [one] => one.clone(),
                    [] => return Err(Error::file(dir, "holds a VideoCrafter checkpoint but no inference config: add its .yaml (configs/inference_t2v_512_v2.0.yaml for VideoCrafter2), or pass the checkpoint file alone for the built-in one")),
                    _ => return Err(Error::file(dir, "holds several .yaml files: name the config config.yaml")),
                }
            }
        };
        Ok(Some(Self::of_file(&checkpoint, Some(config))))
    }

    /// A checkpoint file with its yaml (None: the built-in VideoCrafter2 config); an open_clip
    /// config is looked for beside the yaml, then beside the checkpoint.
    pub fn of_file(checkpoint: &Path, config: Option<PathBuf>) -> Self {
        let beside = |p: &Path| p.parent().map(|d| d.join("open_clip_config.json"));
        let open_clip_config = config
            .as_deref()
            .and_then(beside)
            .filter(|p| p.is_file())
            .or_else(|| beside(checkpoint).filter(|p| p.is_file()));
        Self {
            checkpoint: checkpoint.to_path_buf(),
            config,
            open_clip_config,
        }
    }
}

/// Whether a state dict is lvdm's video LatentDiffusion (its UNet has temporal convolutions,
/// a temporal transformer after conv_in, or a frame-rate embedding).
pub fn is_lvdm<'a>(keys: impl IntoIterator<Item = &'a String>) -> bool {
    keys.into_iter().any(|k| {
        k.strip_prefix(convert::UNET).is_some_and(|r| {
            r.starts_with("init_attn.")
                || r.starts_with("fps_embedding.")
                || r.contains(".temopral_conv.")
        })
    })
}

/// open_clip's text tower settings: (heads, layers, activation).
fn open_clip_text(files: &Files, cfg: &LvdmConfig) -> Result<(usize, usize, &'static str)> {
    let Some(path) = &files.open_clip_config else {
        if cfg.text.arch == "ViT-H-14" {
            return Ok((16, 24, "gelu"));
        }
        return Err(Error::file(
            files.config.as_deref().unwrap_or(&files.checkpoint),
            format!(
                "names the open_clip model {}; put its open_clip config beside it as open_clip_config.json",
                cfg.text.arch
            ),
        ));
    };
    let v: serde_json::Value = crate::error::read_json(path)?;
    let text = &v["text_cfg"];
    let field = |k: &str| {
        text[k]
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| Error::file(path, format!("text_cfg.{k} is missing or not a number")))
    };
    let width = field("width")?;
    let heads = match text.get("heads") {
        Some(_) => field("heads")?,
        None => (width / 64).max(1),
    };
    let act = if v["quick_gelu"].as_bool() == Some(true) {
        "quick_gelu"
    } else {
        "gelu"
    };
    Ok((heads, field("layers")?, act))
}

/// The checkpoint's schedule buffers (lvdm loads them over the computed ones), or the
/// config's when a pruned file lacks them.
fn tables(all: &HashMap<String, Tensor>, cfg: &LvdmConfig) -> Result<ProcessTables> {
    let read = |k: &str| -> Result<Option<Vec<f32>>> {
        match all.get(k) {
            Some(t) => Ok(Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)),
            None => Ok(None),
        }
    };
    let alphas_cumprod = read("alphas_cumprod")?.unwrap_or_else(|| cfg.alphas_cumprod());
    let scale = match cfg.scale_arr() {
        Some(computed) => Some(read("scale_arr")?.unwrap_or(computed)),
        None => None,
    };
    Ok(ProcessTables {
        alphas_cumprod,
        scale,
    })
}

/// Takes the tensors under `prefix` out of `all` (full names kept): each model's source
/// tensors leave the map as it is built and are freed with it, so a load in another dtype
/// does not hold the whole checkpoint beside the converted model.
fn take(all: &mut HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let keys: Vec<String> = all
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    keys.into_iter()
        .filter_map(|k| all.remove_entry(&k))
        .collect()
}

/// A VideoCrafter pipeline from its files, `all` being the checkpoint's weights (read by the
/// caller, who may have needed their names to tell the family).
pub fn load(
    files: &Files,
    mut all: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
) -> Result<crate::Pipeline> {
    let file = &files.checkpoint;
    if !loras.is_empty() {
        return Err(Error::file(
            file,
            "is a VideoCrafter model: LoRAs are not supported for it (they name SD's UNet layers)",
        ));
    }
    let cfg = match &files.config {
        Some(p) => LvdmConfig::load(p)?,
        None => LvdmConfig::videocrafter2(),
    };
    let label = |what: &str| PathBuf::from(format!("{} ({what})", file.display()));
    let vb = |t: HashMap<String, Tensor>, what: &str| {
        Vb::new(Weights::from_tensors(t, &label(what), dtype, device))
    };

    // Text: the first blocks of the OpenCLIP tower, then ln_final.
    let (heads, layers, act) = open_clip_text(files, &cfg)?;
    let text = strip(&take(&mut all, TEXT), TEXT);
    let blocks = crate::single_file::indices(&text, "transformer.resblocks.").len();
    if blocks != layers {
        return Err(Error::file(
            file,
            format!("has {blocks} text blocks; its open_clip config says {layers}"),
        ));
    }
    let skip = usize::from(cfg.text.layer == "penultimate");
    if layers <= skip {
        return Err(Error::file(
            file,
            format!(
                "has {layers} text blocks: too few for the {} layer",
                cfg.text.layer
            ),
        ));
    }
    let tower = OpenClipText {
        blocks_used: layers - skip,
        heads,
        hidden_act: act,
    };
    let (te, te_cfg) = convert_open_clip_text(&text, &tower, file)?;
    drop(text);
    let text_encoder = ClipTextModel::new(
        ClipTextConfig::from_value(te_cfg, &label("text encoder config"))?,
        &vb(te, "text encoder"),
    )?;

    // UNet, with lvdm's frame-rate embedding.
    let lvdm_unet = strip(&take(&mut all, convert::UNET), convert::UNET);
    if lvdm_unet.is_empty() {
        return Err(Error::file(
            file,
            "no UNet (model.diffusion_model.*) in the checkpoint",
        ));
    }
    let (u, unet_cfg) = convert::unet(&lvdm_unet, &cfg.unet, file)?;
    drop(lvdm_unet);
    let unet_vb = vb(u, "unet");
    let unet = UNet2DConditionModel::new(
        UNetConfig::from_value(unet_cfg, &label("unet config"))?,
        &unet_vb,
    )?;
    let c0 = cfg.unet.model_channels;
    let frame_rate = match cfg.unet.fps_cond {
        true => Some(FrameRate::new(
            c0,
            DEFAULTS.fps as f64,
            &unet_vb.pp("fps_embedding"),
        )?),
        false => None,
    };
    drop(unet_vb);

    // VAE: latents scaled by the config's scale_factor.
    let (v, mut vae_cfg) = convert_vae(&take(&mut all, "first_stage_model."), file)?;
    vae_cfg["scaling_factor"] = cfg.diffusion.scale_factor.into();
    let vae = AutoencoderKL::new(
        VaeConfig::from_value(vae_cfg, &label("vae config"))?,
        &vb(v, "vae"),
    )?;

    let scheduler = SchedulerConfig::from_value(cfg.scheduler_json(), &label("scheduler"))?
        .with_tables(tables(&all, &cfg)?, file)?;
    drop(all);
    // open_clip pads with 0, the id of "!".
    let tokenizer = ClipTokenizer::embedded("!")?;
    let (encoder, mut denoiser, decoder): (ClipEncoder, UnetDenoiser, VaeDecoder) =
        super::sd::roles(tokenizer, text_encoder, unet, vae, file, dtype, device)?;
    denoiser.frame_rate = frame_rate;
    denoiser.defaults = DEFAULTS;
    let mut sd = crate::Pipeline::from_roles(
        (Box::new(encoder), Box::new(denoiser), Box::new(decoder)),
        scheduler,
        file,
        dtype,
        device,
    )?;
    sd.scheduler.set_eta(DEFAULTS.eta)?;
    Ok(sd)
}
