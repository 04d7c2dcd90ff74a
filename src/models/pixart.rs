//! diffusers' `PixArtTransformer2DModel` (PixArt-α): latents cut into patches with a 2D
//! sin-cos position table, the caption (T5's output) projected to the inner width, blocks of
//! self-attention, masked cross-attention and a GELU(tanh) feed-forward modulated by
//! adaLN-single (one shared projection of the timestep embedding, plus each block's table),
//! and a modulated output norm and projection unpatchified to `2C` channels (noise and the
//! learned variance). The 1024 model (sample_size 128) adds resolution and aspect-ratio
//! embeddings to the timestep's.

use crate::error::{read_json, Error, Result};
use crate::models::unet::sinusoid;
use crate::nn::context::Memo;
use crate::nn::conv::Conv2d;
use crate::nn::norm::layer_norm_modulated;
use crate::nn::{attention, Linear};
use crate::weights::Vb;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The keys of `PixArtTransformer2DModel`'s config.json reneg reads.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PixArtConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub sample_size: usize,
    pub patch_size: usize,
    pub caption_channels: usize,
    #[serde(default)]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    /// None: used iff sample_size is 128 (the 1024 model), as diffusers decides.
    #[serde(default)]
    pub use_additional_conditions: Option<bool>,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default)]
    pub num_embeds_ada_norm: Option<usize>,
}

fn default_norm_type() -> String {
    "ada_norm_single".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

impl PixArtConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let v: serde_json::Value = read_json(path)?;
        let cfg: Self = serde_json::from_value(v).map_err(|e| {
            Error::file(path, format!("not a PixArtTransformer2DModel config: {e}"))
        })?;
        if cfg.norm_type != "ada_norm_single" {
            return Err(Error::file(
                path,
                format!(
                    "norm_type {:?}: reneg runs PixArt-α's ada_norm_single",
                    cfg.norm_type
                ),
            ));
        }
        if cfg.patch_size == 0 || cfg.num_attention_heads == 0 {
            return Err(Error::file(
                path,
                "patch_size and num_attention_heads must be positive",
            ));
        }
        Ok(cfg)
    }

    /// What the model's construction needs of the widths (diffusers fails on these too).
    pub fn check(&self) -> std::result::Result<(), String> {
        let d = self.inner_dim();
        if !d.is_multiple_of(4) {
            return Err(format!(
                "an inner width of {d}: the 2D sin-cos position table needs a multiple of 4"
            ));
        }
        if self.additional_conditions() && !d.is_multiple_of(3) {
            return Err(format!("an inner width of {d}: the resolution and aspect-ratio embedders need a multiple of 3"));
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn additional_conditions(&self) -> bool {
        self.use_additional_conditions
            .unwrap_or(self.sample_size == 128)
    }
}

/// diffusers' `TimestepEmbedding`: linear, SiLU, linear.
struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp {
    fn new(input: usize, out: usize, vb: &Vb) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(input, out, true, &vb.pp("linear_1"))?,
            linear_2: Linear::new(out, out, true, &vb.pp("linear_2"))?,
        })
    }

    /// 256 sinusoids `[cos, sin]` of `values`, through the MLP: `[values.len(), out]`.
    fn embed(&self, values: &[f64], dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let f = sinusoid(values, 256, true, 0.0, dtype, dev)?;
        self.linear_2.forward(&self.linear_1.forward(&f)?.silu()?)
    }
}

struct Block {
    scale_shift_table: Tensor,
    attn1: [Linear; 4],
    attn2: [Linear; 4],
    ff_in: Linear,
    ff_out: Linear,
    /// attn2's keys and values of the last stable caption (`nn::context`).
    kv: Memo<(Tensor, Tensor)>,
}

/// How many leading keys of a `[b, L]` mask some row attends (one past the last 1 of any
/// row); None when a row attends none, whose softmax spreads evenly over all L keys.
fn attended_prefix(mask: &Tensor) -> candle_core::Result<Option<usize>> {
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut keys = 0;
    for row in &rows {
        match row.iter().rposition(|&m| m != 0.0) {
            Some(last) => keys = keys.max(last + 1),
            None => return Ok(None),
        }
    }
    Ok(Some(keys))
}

pub struct PixArtTransformer2DModel {
    patch: Conv2d,
    timestep: Mlp,
    /// The 1024 model's resolution and aspect-ratio embedders.
    sizes: Option<(Mlp, Mlp)>,
    adaln: Linear,
    caption_1: Linear,
    caption_2: Linear,
    blocks: Vec<Block>,
    scale_shift_table: Tensor,
    proj_out: Linear,
    cfg: PixArtConfig,
    /// The caption projection of the last stable caption.
    caption_memo: Memo<Tensor>,
}

/// A model's additional conditions: the image's (height, width) in pixels.
pub type Resolution = (usize, usize);

impl PixArtTransformer2DModel {
    pub fn new(cfg: PixArtConfig, vb: &Vb) -> Result<Self> {
        cfg.check()
            .map_err(|e| Error::file(vb.file(), format!("its transformer config: {e}")))?;
        let d = cfg.inner_dim();
        let p = cfg.patch_size;
        let ctx = cfg.cross_attention_dim.unwrap_or(d);
        let emb = vb.pp("adaln_single").pp("emb");
        let sizes = if cfg.additional_conditions() {
            Some((
                Mlp::new(256, d / 3, &emb.pp("resolution_embedder"))?,
                Mlp::new(256, d / 3, &emb.pp("aspect_ratio_embedder"))?,
            ))
        } else {
            None
        };
        let attn = |vb: Vb, kv_in: usize| -> Result<[Linear; 4]> {
            let b = cfg.attention_bias;
            Ok([
                Linear::new(d, d, b, &vb.pp("to_q"))?,
                Linear::new(kv_in, d, b, &vb.pp("to_k"))?,
                Linear::new(kv_in, d, b, &vb.pp("to_v"))?,
                Linear::new(d, d, true, &vb.pp("to_out").pp(0))?,
            ])
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let b = vb.pp("transformer_blocks").pp(i);
                Ok(Block {
                    scale_shift_table: b.get(&[6, d], "scale_shift_table")?,
                    attn1: attn(b.pp("attn1"), d)?,
                    attn2: attn(b.pp("attn2"), ctx)?,
                    ff_in: Linear::new(d, 4 * d, true, &b.pp("ff").pp("net").pp(0).pp("proj"))?,
                    ff_out: Linear::new(4 * d, d, true, &b.pp("ff").pp("net").pp(2))?,
                    kv: Memo::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch: Conv2d::new(cfg.in_channels, d, p, p, 0, &vb.pp("pos_embed").pp("proj"))?,
            timestep: Mlp::new(256, d, &emb.pp("timestep_embedder"))?,
            sizes,
            adaln: Linear::new(d, 6 * d, true, &vb.pp("adaln_single").pp("linear"))?,
            caption_1: Linear::new(
                cfg.caption_channels,
                d,
                true,
                &vb.pp("caption_projection").pp("linear_1"),
            )?,
            caption_2: Linear::new(d, d, true, &vb.pp("caption_projection").pp("linear_2"))?,
            blocks,
            scale_shift_table: vb.get(&[2, d], "scale_shift_table")?,
            proj_out: Linear::new(d, p * p * cfg.out_channels(), true, &vb.pp("proj_out"))?,
            cfg,
            caption_memo: Memo::default(),
        })
    }

    pub fn config(&self) -> &PixArtConfig {
        &self.cfg
    }

    /// diffusers' `get_2d_sincos_pos_embed` for a `gh x gw` grid: `[gh * gw, D]`, tokens row
    /// major; the first half of the channels from the column, the second from the row, each
    /// `[sin, cos]` of `pos * base / grid / scale` over frequencies `1 / 10000^(k / (D/4))`.
    pub fn position_table(
        &self,
        gh: usize,
        gw: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let d = self.cfg.inner_dim();
        let base = (self.cfg.sample_size / self.cfg.patch_size) as f64;
        let scale = self
            .cfg
            .interpolation_scale
            .unwrap_or_else(|| ((self.cfg.sample_size / 64).max(1)) as f64);
        let quarter = d / 4;
        // diffusers computes the positions and frequencies in float64 (numpy) or the
        // default float dtype (torch, f32 in recent versions); the table is f32 either way.
        let omega: Vec<f64> = (0..quarter)
            .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
            .collect();
        let mut data = Vec::with_capacity(gh * gw * d);
        for r in 0..gh {
            for c in 0..gw {
                let pos_c = c as f64 / (gw as f64 / base) / scale;
                let pos_r = r as f64 / (gh as f64 / base) / scale;
                for pos in [pos_c, pos_r] {
                    data.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                    data.extend(omega.iter().map(|w| (pos * w).cos() as f32));
                }
            }
        }
        Ok(Tensor::from_vec(data, (gh * gw, d), dev)?.to_dtype(dtype)?)
    }

    /// The timestep embedding `e` `[b, D]` (with the 1024 model's size conditions).
    fn embedded_timestep(
        &self,
        t: &[f64],
        resolution: Option<Resolution>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let b = t.len();
        let e = self.timestep.embed(t, dtype, dev)?;
        let Some((res, ar)) = &self.sizes else {
            return Ok(e);
        };
        let (h, w) = resolution.ok_or_else(|| {
            Error::Invalid(
                "the PixArt 1024 model conditions on the image's resolution; none was given".into(),
            )
        })?;
        let hw: Vec<f64> = (0..b).flat_map(|_| [h as f64, w as f64]).collect();
        let r = res.embed(&hw, dtype, dev)?.reshape((b, ()))?;
        let a = ar.embed(&vec![h as f64 / w as f64; b], dtype, dev)?;
        Ok(e.add(&Tensor::cat(&[&r, &a], 1)?)?)
    }

    /// The model output `[b, out_channels, h, w]` for latents `x` `[b, C, h, w]` at timestep
    /// `t`, caption `[b, L, caption_channels]` with its mask `[b, L]` (1 attended, 0 not; the
    /// masked keys get a -10000 bias, as diffusers), and for the 1024 model the image's
    /// resolution in pixels.
    pub fn forward(
        &self,
        x: &Tensor,
        t: f64,
        caption: &Tensor,
        mask: Option<&Tensor>,
        resolution: Option<Resolution>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        if h % p != 0 || w % p != 0 {
            return Err(Error::Invalid(format!(
                "latents of {h}x{w} are not a multiple of the patch size {p}"
            )));
        }
        let (gh, gw) = (h / p, w / p);
        let (d, heads) = (self.cfg.inner_dim(), self.cfg.num_attention_heads);
        let dtype = x.dtype();
        let dev = x.device();
        let tokens = self
            .patch
            .forward(x)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .broadcast_add(&self.position_table(gh, gw, dtype, dev)?)?;
        let e = self.embedded_timestep(&vec![t; b], resolution, dtype, dev)?;
        let t6 = self.adaln.forward(&e.silu()?)?.reshape((b, 6, d))?;
        // The same caption at every step: projected once, as are each block's keys and values
        // (nn::context).
        let caption = crate::nn::context::stable(&caption.to_dtype(dtype)?)?;
        let ctx = self.caption_memo.get_or(&caption, || {
            self.caption_2.forward(&crate::nn::activation::gelu_tanh(
                &self.caption_1.forward(&caption)?,
            )?)
        })?;
        let l = ctx.dim(1)?;
        // Keys past the last one any row attends carry exp(-10000) = 0 in every row, so they
        // are left out (T5's padding: 119 of the 120 rows for the negative of "").
        let keys = match mask {
            Some(m) => attended_prefix(m)?.unwrap_or(l),
            None => l,
        };
        // [b * heads, 1, keys] additive bias on the keys of the cross-attention.
        let bias = match mask {
            Some(m) => Some(
                ((1.0 - m.to_dtype(DType::F32)?.to_device(dev)?.narrow(1, 0, keys)?)? * -10000.0)?
                    .reshape((b, 1, 1, keys))?
                    .broadcast_as((b, heads, 1, keys))?
                    .reshape((b * heads, 1, keys))?,
            ),
            None => None,
        };
        let mut xs = tokens;
        let eps = self.cfg.norm_eps;
        for blk in &self.blocks {
            let m = blk.scale_shift_table.unsqueeze(0)?.broadcast_add(&t6)?;
            let part = |i: usize| m.narrow(1, i, 1);
            let (shift_msa, scale_msa, gate_msa) = (part(0)?, part(1)?, part(2)?);
            let (shift_mlp, scale_mlp, gate_mlp) = (part(3)?, part(4)?, part(5)?);
            let y = layer_norm_modulated(&xs, &shift_msa, &scale_msa, eps)?;
            let [q, k, v, o] = &blk.attn1;
            let a = o.forward(&attention(
                &q.forward(&y)?,
                &k.forward(&y)?,
                &v.forward(&y)?,
                heads,
                None,
            )?)?;
            xs = (xs + a.broadcast_mul(&gate_msa)?)?;
            // PixArt's cross-attention has no norm before it.
            let [q, k, v, o] = &blk.attn2;
            let (k, v) = blk
                .kv
                .get_or(&caption, || Ok((k.forward(&ctx)?, v.forward(&ctx)?)))?;
            let (k, v) = (k.narrow(1, 0, keys)?, v.narrow(1, 0, keys)?);
            let a = attention(&q.forward(&xs)?, &k, &v, heads, bias.as_ref())?;
            xs = (&xs + o.forward(&a)?)?;
            let y = layer_norm_modulated(&xs, &shift_mlp, &scale_mlp, eps)?;
            let f = blk
                .ff_out
                .forward(&crate::nn::activation::gelu_tanh(&blk.ff_in.forward(&y)?)?)?;
            xs = (xs + f.broadcast_mul(&gate_mlp)?)?;
        }
        // The output's shift and scale come from e itself, not the 6D projection.
        let m = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&e.unsqueeze(1)?)?;
        let (shift, scale) = (m.narrow(1, 0, 1)?, m.narrow(1, 1, 1)?);
        let y = self
            .proj_out
            .forward(&layer_norm_modulated(&xs, &shift, &scale, eps)?)?;
        let c = self.cfg.out_channels();
        // nhwpqc -> nchpwq
        Ok(y.reshape((b, gh, gw, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .contiguous()?
            .reshape((b, c, h, w))?)
    }
}

#[cfg(test)]
mod tests {
    use super::attended_prefix;
    use candle_core::{Device, Tensor};

    #[test]
    fn keys_past_every_rows_last_attended_one_are_left_out_unless_a_row_attends_none() {
        let mask = |rows: &[[f32; 5]]| {
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            Tensor::from_vec(flat, (rows.len(), 5), &Device::Cpu).unwrap()
        };
        let t5 = mask(&[[1., 0., 0., 0., 0.], [1., 1., 1., 0., 0.]]);
        assert_eq!(attended_prefix(&t5).unwrap(), Some(3));
        // Not a prefix: the last attended key counts.
        let holes = mask(&[[0., 1., 0., 1., 0.], [1., 0., 0., 0., 0.]]);
        assert_eq!(attended_prefix(&holes).unwrap(), Some(4));
        assert_eq!(attended_prefix(&mask(&[[1.; 5]])).unwrap(), Some(5));
        // A row attending no key spreads over all of them: nothing is left out.
        let none = mask(&[[1., 1., 0., 0., 0.], [0.; 5]]);
        assert_eq!(attended_prefix(&none).unwrap(), None);
    }
}

#[cfg(test)]
mod published_config {
    use super::PixArtConfig;

    /// PixArt-XL-2-1024-MS's transformer/config.json as its repo publishes it: written by an
    /// older diffusers under the class name `Transformer2DModel`, with that class's every key
    /// (most of which PixArt does not use). reneg reads the keys, not the class name.
    const PUBLISHED_1024: &str = r#"{
      "_class_name": "Transformer2DModel", "_diffusers_version": "0.22.0.dev0",
      "activation_fn": "gelu-approximate", "attention_bias": true, "attention_head_dim": 72,
      "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
      "double_self_attention": false, "dropout": 0.0, "in_channels": 4,
      "norm_elementwise_affine": false, "norm_eps": 1e-06, "norm_num_groups": 32,
      "norm_type": "ada_norm_single", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
      "num_layers": 28, "num_vector_embeds": null, "only_cross_attention": false,
      "out_channels": 8, "patch_size": 2, "sample_size": 128, "upcast_attention": false,
      "use_linear_projection": false}"#;

    #[test]
    fn the_published_transformer2dmodel_config_reads_as_pixart() {
        let dir = std::env::temp_dir().join(format!("reneg-pixart-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, PUBLISHED_1024).unwrap();
        let cfg = PixArtConfig::load(&path).unwrap();
        assert_eq!(cfg.inner_dim(), 1152);
        assert_eq!(
            (cfg.num_layers, cfg.patch_size, cfg.out_channels()),
            (28, 2, 8)
        );
        assert!(
            cfg.additional_conditions(),
            "the 1024 model's size conditions"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
