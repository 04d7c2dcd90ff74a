//! LoRAs merged into the weights at load (`--lora FILE[:SCALE]`): the weight W becomes
//! W + scale x (alpha / rank) x (up @ down), for linear layers and convolutions. Two layouts are read: kohya's
//! (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_` for the
//! text encoder), which AUTOMATIC1111 and ComfyUI load, and diffusers/PEFT's
//! (`unet.<module>.lora_A.weight` / `lora_B.weight`, or `.lora.down/.lora.up`;
//! `text_encoder.` for the text encoder), whose alpha is the rank unless the file says.
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
}

#[derive(Debug, Clone)]
struct Module {
    component: Component,
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
        let mut parts: HashMap<(Component, String, bool), [Option<Tensor>; 3]> = HashMap::new();
        for (key, t) in tensors {
            let (component, rest, dotted) = if let Some(r) = key.strip_prefix("lora_unet_") {
                (Component::Unet, r, false)
            } else if let Some(r) = key.strip_prefix("lora_te_") {
                (Component::TextEncoder, r, false)
            } else if let Some(r) = key.strip_prefix("unet.") {
                (Component::Unet, r, true)
            } else if let Some(r) = key.strip_prefix("text_encoder.") {
                (Component::TextEncoder, r, true)
            } else if key.starts_with("lora_te1_")
                || key.starts_with("lora_te2_")
                || key.starts_with("text_encoder_2.")
            {
                return Err(Error::file(
                    file,
                    format!("{key}: a LoRA for SDXL's two text encoders; reneg runs SD 1.x/2.x"),
                ));
            } else {
                return Err(Error::file(
                    file,
                    format!("{key}: not a LoRA key of a layout reneg reads (kohya lora_unet_/lora_te_, diffusers/PEFT unet./text_encoder.)"),
                ));
            };
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
                .entry((component, name.to_string(), dotted))
                .or_default()[slot] = Some(t);
        }
        let mut modules = Vec::new();
        for ((component, name, dotted), [down, up, alpha]) in parts {
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
    pub fn merge(&self, component: Component, tensors: &mut impl StateDict) -> Result<usize> {
        // kohya names a module by its path with '.' as '_' (the text encoder's with its
        // "text_model." prefix); index the model's weights both ways.
        let mut by_underscore: HashMap<String, String> = HashMap::new();
        for name in tensors.names() {
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
                [
                    format!("{}.weight", m.name),
                    format!("text_model.{}.weight", m.name),
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
                        match component {
                            Component::Unet => "UNet",
                            Component::TextEncoder => "text encoder",
                        }
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

/// Merges every LoRA's `component` modules into `tensors`.
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

pub fn merge_all(loras: &[Lora], component: Component, tensors: &mut impl StateDict) -> Result<()> {
    for l in loras {
        l.merge(component, tensors)?;
    }
    Ok(())
}
