//! LoRAs merged into the weights at load (`--lora FILE[:SCALE]`): the weight W becomes
//! W + scale x (alpha / rank) x (up @ down), for linear layers and convolutions. Two layouts are read: kohya's
//! (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_` for the
//! text encoder), which AUTOMATIC1111 and ComfyUI load, and diffusers/PEFT's
//! (`unet.<module>.lora_A.weight` / `lora_B.weight`, or `.lora.down/.lora.up`;
//! `text_encoder.` for the text encoder), whose alpha is the rank unless the file says.
//! SDXL's LoRAs name its two text encoders `lora_te1_`/`lora_te2_` (diffusers:
//! `text_encoder.`/`text_encoder_2.`), and kohya's name its UNet's modules as the original
//! (sgm) UNet does (`input_blocks_4_1_...`), which [`sgm_module`] maps to diffusers' names.
//! A module the model does not have is an error naming the file and the module: a LoRA for
//! another architecture is refused, never half applied.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which model a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    fn label(self) -> &'static str {
        match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder (SDXL's text_encoder_2)",
        }
    }
}

#[derive(Debug, Clone)]
struct Module {
    component: Component,
    /// The key prefix the file names the module with (`lora_te_`, `unet.`, ...).
    prefix: &'static str,
    /// kohya's underscored path, or the dotted module path.
    name: String,
    dotted: bool,
    down: Tensor,
    up: Tensor,
    alpha: Option<f64>,
}

/// One LoRA file with its scale.
#[derive(Debug, Clone)]
pub struct Lora {
    pub file: PathBuf,
    pub scale: f64,
    modules: Vec<Module>,
}

/// The key prefixes of the layouts read: (prefix, component, whether the module path is
/// dotted). Longer prefixes first (`text_encoder_2.` before `text_encoder.`).
const PREFIXES: [(&str, Component, bool); 7] = [
    ("lora_unet_", Component::Unet, false),
    ("lora_te_", Component::TextEncoder, false),
    ("lora_te1_", Component::TextEncoder, false),
    ("lora_te2_", Component::TextEncoder2, false),
    ("unet.", Component::Unet, true),
    ("text_encoder_2.", Component::TextEncoder2, true),
    ("text_encoder.", Component::TextEncoder, true),
];

/// `FILE` or `FILE:SCALE` (scale 1 by default).
pub fn parse_spec(spec: &str) -> std::result::Result<(PathBuf, f64), String> {
    if let Some((f, s)) = spec.rsplit_once(':') {
        if let Ok(v) = s.parse::<f64>() {
            if !v.is_finite() {
                return Err(format!("--lora {spec}: the scale must be a finite number"));
            }
            return Ok((f.into(), v));
        }
    }
    Ok((spec.into(), 1.0))
}

impl Lora {
    pub fn load(file: &Path, scale: f64) -> Result<Self> {
        if !file.is_file() {
            return Err(Error::file(file, "LoRA file not found"));
        }
        let bytes = crate::io::map_file(file)?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            Error::file(
                file,
                format!("not a safetensors LoRA ({e}); convert .pt LoRAs to safetensors"),
            )
        })?;
        let mut parts: HashMap<(Component, &'static str, String, bool), [Option<Tensor>; 3]> =
            HashMap::new();
        for (key, t) in tensors {
            let Some(&(prefix, component, dotted)) =
                PREFIXES.iter().find(|(p, _, _)| key.starts_with(p))
            else {
                return Err(Error::file(
                    file,
                    format!("{key}: not a LoRA key of a layout reneg reads (kohya lora_unet_/lora_te_/lora_te1_/lora_te2_, diffusers/PEFT unet./text_encoder./text_encoder_2.)"),
                ));
            };
            let rest = &key[prefix.len()..];
            let (name, slot) = [
                (".lora_down.weight", 0),
                (".lora_up.weight", 1),
                (".alpha", 2),
                (".lora_A.weight", 0),
                (".lora_B.weight", 1),
                (".lora.down.weight", 0),
                (".lora.up.weight", 1),
            ]
            .iter()
            .find_map(|(suffix, slot)| rest.strip_suffix(suffix).map(|n| (n, *slot)))
            .ok_or_else(|| {
                Error::file(file, format!("{key}: not a LoRA down, up or alpha tensor"))
            })?;
            parts
                .entry((component, prefix, name.to_string(), dotted))
                .or_default()[slot] = Some(t);
        }
        let mut modules = Vec::new();
        for ((component, prefix, name, dotted), [down, up, alpha]) in parts {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(Error::file(
                    file,
                    format!("{name}: a LoRA module needs both its down and up tensors"),
                ));
            };
            let alpha = match alpha {
                Some(a) => Some(
                    a.to_dtype(DType::F64)?
                        .flatten_all()?
                        .to_vec1::<f64>()?
                        .first()
                        .copied()
                        .unwrap_or(0.0),
                ),
                None => None,
            };
            modules.push(Module {
                component,
                prefix,
                name,
                dotted,
                down: down.to_dtype(DType::F32)?,
                up: up.to_dtype(DType::F32)?,
                alpha,
            });
        }
        modules.sort_by(|a, b| a.name.cmp(&b.name));
        if modules.is_empty() {
            return Err(Error::file(file, "holds no LoRA modules"));
        }
        Ok(Self {
            file: file.to_path_buf(),
            scale,
            modules,
        })
    }

    /// Adds this LoRA's deltas for `component` to `tensors` (the component's state dict,
    /// diffusers or transformers names); returns how many weights changed.
    pub fn merge(&self, component: Component, tensors: &mut dyn StateDict) -> Result<usize> {
        // kohya names a module by its path with '.' as '_' (the text encoder's with its
        // "text_model." prefix); index the model's weights both ways.
        let mut by_underscore: HashMap<String, String> = HashMap::new();
        let names = tensors.names();
        if component == Component::Unet {
            // kohya's SDXL LoRAs name the UNet's modules as the original UNet does.
            let blocks = UnetBlocks::of(&names);
            for name in &names {
                if let Some(sgm) = name
                    .strip_suffix(".weight")
                    .and_then(|m| blocks.sgm_module(m))
                {
                    by_underscore.insert(sgm.replace('.', "_"), name.clone());
                }
            }
        }
        for name in &names {
            if let Some(module) = name.strip_suffix(".weight") {
                by_underscore.insert(module.replace('.', "_"), name.clone());
                if !module.starts_with("text_model.") {
                    by_underscore.insert(
                        format!("text_model_{}", module.replace('.', "_")),
                        name.clone(),
                    );
                }
            }
        }
        let mut changed = 0;
        for m in self.modules.iter().filter(|m| m.component == component) {
            let target = if m.dotted {
                // transformers 5 writes CLIP text models without `text_model.`, LoRAs saved
                // beside them too; older files and models have it: either meets either.
                let bare = m.name.strip_prefix("text_model.").unwrap_or(&m.name);
                [
                    format!("{bare}.weight"),
                    format!("text_model.{bare}.weight"),
                ]
                .into_iter()
                .find(|k| tensors.has(k))
            } else {
                by_underscore.get(&m.name).cloned()
            };
            let Some(target) = target else {
                return Err(Error::file(
                    &self.file,
                    format!(
                        "module {} is not in this model's {}: a LoRA for another architecture",
                        m.name,
                        component.label()
                    ),
                ));
            };
            let w = &tensors.tensor(&target)?;
            let rank = m.down.dim(0)?;
            let factor = self.scale * m.alpha.unwrap_or(rank as f64) / rank as f64;
            let down = m.down.flatten_from(1)?;
            let up = m.up.flatten_from(1)?;
            let delta = up.matmul(&down)?;
            if delta.elem_count() != w.elem_count() || delta.dim(0)? != w.dim(0)? {
                return Err(Error::file(
                    &self.file,
                    format!(
                        "module {}: its delta is {:?} but the weight {target} is {:?}",
                        m.name,
                        delta.dims(),
                        w.dims()
                    ),
                ));
            }
            let merged = (w.to_dtype(DType::F32)?
                + (delta.reshape(w.dims())? * factor)?.to_device(w.device())?)?;
            tensors.put(target, merged);
            changed += 1;
        }
        Ok(changed)
    }
}

/// A component's weights by name, as a LoRA merge reads and changes them: a state dict in
/// memory, or a mapped checkpoint ([`crate::weights::Weights`]) that reads only what is merged.
pub trait StateDict {
    fn names(&self) -> Vec<String>;
    fn has(&self, name: &str) -> bool;
    /// The tensor as stored.
    fn tensor(&self, name: &str) -> Result<Tensor>;
    fn put(&mut self, name: String, t: Tensor);
}

impl StateDict for HashMap<String, Tensor> {
    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
    fn has(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("no weight {name}")))
    }
    fn put(&mut self, name: String, t: Tensor) {
        self.insert(name, t);
    }
}

impl StateDict for crate::weights::Weights {
    fn names(&self) -> Vec<String> {
        crate::weights::Weights::names(self).cloned().collect()
    }
    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.stored_tensor(name)
    }
    fn put(&mut self, name: String, t: Tensor) {
        self.set_tensor(name, t);
    }
}

/// Merges every LoRA into the components of a model (each with its weights), refusing a
/// LoRA with modules for a component the model does not have (an SDXL LoRA's second text
/// encoder on SD) and, on a model with two text encoders, kohya's one-encoder `lora_te_`
/// keys (an SD 1.x/2.x LoRA, whose text modules would land on SDXL's CLIP-L unnoticed).
pub fn merge_all(loras: &[Lora], model: &mut [(Component, &mut dyn StateDict)]) -> Result<()> {
    let has = |c: Component| model.iter().any(|(m, _)| *m == c);
    for l in loras {
        for m in &l.modules {
            if !has(m.component) {
                return Err(Error::file(
                    &l.file,
                    format!(
                        "{}{}: a module of a {} this model does not have (a LoRA for SDXL)",
                        m.prefix,
                        m.name,
                        m.component.label()
                    ),
                ));
            }
            if m.prefix == "lora_te_" && has(Component::TextEncoder2) {
                return Err(Error::file(
                    &l.file,
                    format!(
                        "lora_te_{}: an SD 1.x/2.x LoRA (one text encoder); SDXL's LoRAs name lora_te1_ and lora_te2_",
                        m.name
                    ),
                ));
            }
        }
    }
    for l in loras {
        for (component, tensors) in model.iter_mut() {
            l.merge(*component, &mut **tensors)?;
        }
    }
    Ok(())
}

/// The layout of a diffusers UNet's blocks, read from its weights' names: what the original
/// (sgm) UNet numbers its `input_blocks`/`output_blocks` by.
struct UnetBlocks {
    /// Resnets per down block (`layers_per_block`).
    layers: usize,
    /// Up blocks that have attentions (their upsampler is `.2.` in the original, else `.1.`).
    up_with_attention: Vec<usize>,
}

impl UnetBlocks {
    fn of(names: &[String]) -> Self {
        let index_after = |prefix: &str, n: &str| -> Option<usize> {
            n.strip_prefix(prefix)?.split('.').next()?.parse().ok()
        };
        let layers = names
            .iter()
            .filter_map(|n| index_after("down_blocks.0.resnets.", n))
            .max()
            .map_or(0, |m| m + 1);
        let mut up_with_attention: Vec<usize> = names
            .iter()
            .filter(|n| n.contains(".attentions."))
            .filter_map(|n| index_after("up_blocks.", n))
            .collect();
        up_with_attention.sort_unstable();
        up_with_attention.dedup();
        Self {
            layers,
            up_with_attention,
        }
    }

    /// The original UNet's path of the diffusers module `m` (dotted, no `.weight`), as
    /// single-file checkpoints and kohya's SDXL LoRAs name it; None for a path it does not map.
    fn sgm_module(&self, m: &str) -> Option<String> {
        let l = self.layers;
        let p: Vec<&str> = m.split('.').collect();
        let num = |i: usize| -> Option<usize> { p.get(i)?.parse().ok() };
        let rest = |i: usize| p.get(i..).map(|r| r.join(".")).unwrap_or_default();
        let resnet = |r: &str| -> String {
            let (head, tail) = r.split_once('.').unwrap_or((r, ""));
            let head = match head {
                "norm1" => "in_layers.0",
                "conv1" => "in_layers.2",
                "time_emb_proj" => "emb_layers.1",
                "norm2" => "out_layers.0",
                "conv2" => "out_layers.3",
                "conv_shortcut" => "skip_connection",
                other => other,
            };
            if tail.is_empty() {
                head.to_string()
            } else {
                format!("{head}.{tail}")
            }
        };
        let joined = |prefix: String, r: String| -> String {
            if r.is_empty() {
                prefix
            } else {
                format!("{prefix}.{r}")
            }
        };
        Some(match p[0] {
            "conv_in" => joined("input_blocks.0.0".into(), rest(1)),
            "conv_norm_out" => joined("out.0".into(), rest(1)),
            "conv_out" => joined("out.2".into(), rest(1)),
            "time_embedding" | "add_embedding" => {
                let base = if p[0] == "time_embedding" {
                    "time_embed"
                } else {
                    "label_emb.0"
                };
                let k = match *p.get(1)? {
                    "linear_1" => 0,
                    "linear_2" => 2,
                    _ => return None,
                };
                joined(format!("{base}.{k}"), rest(2))
            }
            "down_blocks" => {
                let b = num(1)?;
                match *p.get(2)? {
                    "resnets" => joined(
                        format!("input_blocks.{}.0", 1 + b * (l + 1) + num(3)?),
                        resnet(&rest(4)),
                    ),
                    "attentions" => joined(
                        format!("input_blocks.{}.1", 1 + b * (l + 1) + num(3)?),
                        rest(4),
                    ),
                    "downsamplers" => {
                        joined(format!("input_blocks.{}.0.op", (b + 1) * (l + 1)), rest(5))
                    }
                    _ => return None,
                }
            }
            "mid_block" => match *p.get(1)? {
                "resnets" => joined(format!("middle_block.{}", 2 * num(2)?), resnet(&rest(3))),
                "attentions" => joined("middle_block.1".into(), rest(3)),
                _ => return None,
            },
            "up_blocks" => {
                let b = num(1)?;
                match *p.get(2)? {
                    "resnets" => joined(
                        format!("output_blocks.{}.0", b * (l + 1) + num(3)?),
                        resnet(&rest(4)),
                    ),
                    "attentions" => joined(
                        format!("output_blocks.{}.1", b * (l + 1) + num(3)?),
                        rest(4),
                    ),
                    "upsamplers" => {
                        let k = if self.up_with_attention.contains(&b) {
                            2
                        } else {
                            1
                        };
                        joined(format!("output_blocks.{}.{k}", b * (l + 1) + l), rest(4))
                    }
                    _ => return None,
                }
            }
            _ => return None,
        })
    }
}
