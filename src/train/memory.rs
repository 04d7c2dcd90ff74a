//! Whether the gradient step checkpoints its activations: `off`, `on`, or `auto` (the
//! default), which turns checkpointing on when the estimated graph of one micro-batch would not
//! fit in the device memory that is free.
//!
//! The estimate counts the activations the gradient path keeps alive, from the UNet's and the
//! VAE's configs (each family's denoiser and decoder give theirs) and the latent size: per UNet layer at `c` channels and `n = h w` positions,
//! a resnet keeps about 6 tensors of `c n` (the inputs of two norms, two convolutions, the
//! time-embedding sum and the shortcut) and a transformer about 26 (norms, projections,
//! q, k, v and outputs of two attentions recomputed in blocks, the 8c-wide GEGLU input and the
//! 4c-wide feed-forward input); a decoder resnet 6 at its resolution. The staged backward
//! holds the UNet's graph or the decoder's, never both; one-pass holds both. Checkpointed,
//! about 2 tensors a layer remain (its input and output) plus one layer's internals while it
//! is recomputed. These are counts of what the code keeps, not measurements: the device run
//! checks the estimate against the measured peak (tools/gpu_check.sh).

use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::train::step::Backward;
use crate::Pipeline;
use candle_core::Device;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    Off,
    On,
    /// On when the estimated graph would not fit in the free device memory.
    #[default]
    Auto,
}

/// Tensors of `c n` a resnet layer keeps on the graph.
const RESNET_KEPT: u64 = 6;
/// Tensors of `c n` a transformer layer keeps on the graph.
const TRANSFORMER_KEPT: u64 = 26;
/// Fraction of the free memory the estimate may take (room for workspaces and fragmentation).
const HEADROOM: f64 = 0.8;

/// Estimated bytes of the gradient step's graph for `batch` samples of `height x width`
/// pixels: `(plain, checkpointed)`. A family whose roles give no estimate counts as 0 (never
/// checkpointed by `auto`).
pub fn graph_bytes(
    sd: &Pipeline,
    batch: usize,
    height: usize,
    width: usize,
    backward: Backward,
) -> (u64, u64) {
    let f = sd.vae_scale().max(1);
    let elem = sd.weight_dtype().size_in_bytes() as u64;
    let (lh, lw) = ((height / f) as u64, (width / f) as u64);
    let b = batch as u64;
    let (unet_plain, unet_ckpt) = sd.denoiser.graph_elems(lh, lw).unwrap_or((0, 0));
    let (dec_plain, dec_ckpt) = sd.decoder.graph_elems(lh, lw).unwrap_or((0, 0));
    let combine = |u: u64, d: u64| match backward {
        Backward::Staged => u.max(d),
        Backward::OnePass => u + d,
    };
    (
        b * elem * combine(unet_plain, dec_plain),
        b * elem * combine(unet_ckpt, dec_ckpt),
    )
}

/// A UNet's kept elements for one sample of `lh x lw` latents: `(plain, checkpointed)`.
pub fn unet_graph_elems(cfg: &UNetConfig, lh: u64, lw: u64) -> (u64, u64) {
    // Per level, its layers (down and up) at that level's resolution.
    let mut unet_plain = 0u64;
    let mut unet_largest_layer = 0u64;
    let mut unet_layers = 0u64;
    let levels = cfg.block_out_channels.len();
    let per_level = cfg
        .layers_per_block
        .per_level(levels, "layers_per_block", &cfg.file)
        .unwrap_or_else(|_| vec![2; levels]);
    for (i, &c) in cfg.block_out_channels.iter().enumerate() {
        let n = (lh >> i) * (lw >> i);
        let cross = cfg
            .down_block_types
            .get(i)
            .is_some_and(|t| t.starts_with("CrossAttn"));
        let per = c as u64 * n * (RESNET_KEPT + if cross { TRANSFORMER_KEPT } else { 0 });
        // layers_per_block down, one more up, the mid block at the last level.
        let layers = 2 * per_level[i] as u64 + 1 + u64::from(i + 1 == levels);
        unet_plain += per * layers;
        unet_largest_layer = unet_largest_layer.max(per);
        unet_layers += layers;
    }
    // `c n` of the first level: the largest activation between layers.
    let first = cfg.block_out_channels.first().copied().unwrap_or(0) as u64 * lh * lw;
    (unet_plain, unet_layers * 2 * first + unet_largest_layer)
}

/// A VAE decoder's kept elements for one sample of `lh x lw` latents: `(plain, checkpointed)`.
pub fn vae_graph_elems(vcfg: &VaeConfig, lh: u64, lw: u64) -> (u64, u64) {
    // Resnets per level at the upsampled resolutions.
    let vlevels = vcfg.block_out_channels.len();
    let mut dec_plain = 0u64;
    let mut dec_largest = 0u64;
    let mut dec_layers = 0u64;
    for (i, &c) in vcfg.block_out_channels.iter().rev().enumerate() {
        let up = 1u64 << i.min(vlevels - 1);
        let n = lh * up * lw * up;
        let per = c as u64 * n * RESNET_KEPT;
        let layers = vcfg.layers_per_block as u64 + 1;
        dec_plain += per * layers;
        dec_largest = dec_largest.max(per);
        dec_layers += layers;
    }
    (
        dec_plain,
        dec_layers * 2 * dec_largest / RESNET_KEPT + dec_largest,
    )
}

/// Free memory on `device` in bytes, where it can be asked: `MemAvailable` on Linux for the
/// CPU, the driver's free memory for CUDA.
pub fn free_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let text = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// The decision for `mode`: `auto` checkpoints when the plain graph's estimate exceeds
/// [`HEADROOM`] of `free` bytes (no checkpointing when the free memory is unknown).
pub fn decide(mode: Checkpointing, plain_bytes: u64, free: Option<u64>) -> bool {
    match mode {
        Checkpointing::Off => false,
        Checkpointing::On => true,
        Checkpointing::Auto => free.is_some_and(|f| plain_bytes as f64 > HEADROOM * f as f64),
    }
}
