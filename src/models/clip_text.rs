//! CLIP text encoder, mirroring transformers' `CLIPTextModel` (transformers 5.23):
//! token + position embeddings, pre-LN transformer with a causal mask, final layer norm.
//! Returns `last_hidden_state`, the tensor Stable Diffusion conditions on.

use crate::error::{read_json, Result};
use crate::models::clip_layers::ClipEncoderLayer;
use crate::nn::{Activation, LayerNorm};
use crate::weights::Vb;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

/// The keys of transformers' `CLIPTextConfig` that shape the computation.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// 2 (the legacy value) means "pool at the highest token id", as transformers does.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_eos() -> i64 {
    2
}

fn default_vocab() -> usize {
    49408
}
fn default_hidden() -> usize {
    512
}
fn default_intermediate() -> usize {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    8
}
fn default_positions() -> usize {
    77
}
fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_value(read_json(path)?, path)
    }

    /// Parses and validates a config given as JSON; `path` names it in errors.
    pub fn from_value(value: serde_json::Value, path: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_value(value)
            .map_err(|e| crate::Error::file(path, format!("invalid config: {e}")))?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(crate::Error::unsupported(
                path,
                "num_attention_heads",
                cfg.num_attention_heads,
                &format!("must divide hidden_size = {}", cfg.hidden_size),
            ));
        }
        Ok(cfg)
    }
}

/// transformers' `CLIPTextModel`.
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
    /// Last layers left out ([`Self::set_clip_skip`]); 0 runs them all.
    clip_skip: usize,
}

impl ClipTextModel {
    /// `vb` points at the root of the state dict: keys `text_model.*` as transformers 4 wrote
    /// them (every SD checkpoint on the hub), or without that prefix as transformers 5 writes.
    pub fn new(cfg: ClipTextConfig, vb: &Vb) -> Result<Self> {
        let tm = if vb.contains("embeddings.token_embedding.weight")
            && !vb.contains("text_model.embeddings.token_embedding.weight")
        {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let emb = tm.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                ClipEncoderLayer::new(
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    cfg.layer_norm_eps,
                    &tm.pp("encoder").pp("layers").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .get(&[cfg.vocab_size, cfg.hidden_size], "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get(&[cfg.max_position_embeddings, cfg.hidden_size], "weight")?,
            layers,
            final_layer_norm: LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                &tm.pp("final_layer_norm"),
            )?,
            cfg,
            clip_skip: 0,
        })
    }

    /// Leaves out the last `skip` layers: the output is the hidden state `skip` layers before
    /// the last, through the final layer norm, as diffusers' `clip_skip` (its `clip_skip=1` is
    /// AUTOMATIC1111's "Clip skip 2").
    pub fn set_clip_skip(&mut self, skip: usize) -> Result<()> {
        if skip >= self.layers.len() {
            return Err(crate::Error::Invalid(format!(
                "--clip-skip {skip}: this text encoder has {} layers; skip fewer",
                self.layers.len()
            )));
        }
        self.clip_skip = skip;
        Ok(())
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// # Shapes
    /// `input_ids`: `[b, n]` (u32 or i64) -> `last_hidden_state`: `[b, n, hidden]`
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_token_embeddings(input_ids, &[])
    }

    /// [`Self::forward`] with the input token embedding at some positions of the first (or
    /// only) sequence replaced: `(position, [hidden] vector)`. Textual-inversion embeddings
    /// enter the text encoder this way (transformers does it with added tokens whose rows
    /// hold the vectors; the result is the same).
    pub fn forward_with_token_embeddings(
        &self,
        input_ids: &Tensor,
        overrides: &[(usize, Tensor)],
    ) -> Result<Tensor> {
        let xs = self.embed(input_ids, overrides)?;
        let xs = self.layers(xs, self.layers.len() - self.clip_skip)?;
        // Prompt embeddings leave the model in f32 under autocast (`crate::precision`).
        let out = self.final_layer_norm.forward(&xs)?;
        Ok(out.to_dtype(crate::precision::activation_dtype(out.dtype()))?)
    }

    /// Token plus position embeddings of `input_ids` `[b, n]`, the token embeddings at the
    /// positions of `overrides` replaced (of the first sequence, counting along the batch).
    fn embed(&self, input_ids: &Tensor, overrides: &[(usize, Tensor)]) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        if n > self.cfg.max_position_embeddings {
            return Err(crate::Error::Invalid(format!(
                "text encoder input has {n} tokens, more than max_position_embeddings = {}",
                self.cfg.max_position_embeddings
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let max_id = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(crate::Error::Invalid(format!(
                "token id {max_id} is outside the text encoder's vocab_size = {}: tokenizer and text encoder do not match",
                self.cfg.vocab_size
            )));
        }
        let mut tok = self.token_embedding.index_select(&ids, 0)?;
        if !overrides.is_empty() {
            let dtype = tok.dtype();
            let rows = (0..b * n)
                .map(|i| match overrides.iter().find(|(p, _)| *p == i) {
                    Some((_, v)) => Ok(v
                        .to_dtype(dtype)?
                        .to_device(tok.device())?
                        .reshape((1, self.cfg.hidden_size))?),
                    None => tok.narrow(0, i, 1),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            tok = Tensor::cat(&rows, 0)?;
        }
        let tok = tok.reshape((b, n, self.cfg.hidden_size))?;
        let pos = self.position_embedding.narrow(0, 0, n)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// The first `count` layers on the embedded tokens `xs`, with the causal mask.
    fn layers(&self, mut xs: Tensor, count: usize) -> Result<Tensor> {
        let mask = causal_mask(xs.dim(1)?, xs.dtype(), xs.device())?;
        for layer in &self.layers[..count] {
            xs = layer.forward(
                &xs,
                Some(&mask),
                self.cfg.num_attention_heads,
                self.cfg.hidden_act,
            )?;
        }
        Ok(xs)
    }

    /// SDXL's two readings of one pass: the hidden state entering the last layer
    /// (transformers' `hidden_states[-2]`, no final layer norm; with clip skip s, the one s
    /// layers earlier, diffusers' SDXL `hidden_states[-(s + 2)]`), and the last layer's output
    /// through the final layer norm (whose end-of-text row is the pooled output, whatever the
    /// clip skip). `overrides` replace input token embeddings as in
    /// [`Self::forward_with_token_embeddings`].
    ///
    /// # Shapes
    /// `input_ids`: `[b, n]` -> (`[b, n, hidden]`, `[b, n, hidden]`)
    pub fn penultimate_and_last(
        &self,
        input_ids: &Tensor,
        overrides: &[(usize, Tensor)],
    ) -> Result<(Tensor, Tensor)> {
        if self.layers.len() < 2 {
            return Err(crate::Error::Invalid(
                "an SDXL text encoder needs at least two layers".into(),
            ));
        }
        let xs = self.embed(input_ids, overrides)?;
        let n = xs.dim(1)?;
        let read = self.layers.len() - 1 - self.clip_skip;
        let pen = self.layers(xs, read)?;
        let mask = causal_mask(n, pen.dtype(), pen.device())?;
        let mut last = pen.clone();
        for layer in &self.layers[read..] {
            last = layer.forward(
                &last,
                Some(&mask),
                self.cfg.num_attention_heads,
                self.cfg.hidden_act,
            )?;
        }
        let last = self.final_layer_norm.forward(&last)?;
        let f32 = |t: Tensor| t.to_dtype(crate::precision::activation_dtype(t.dtype()));
        Ok((f32(pen)?, f32(last)?))
    }
}

impl ClipTextModel {
    /// The pooled output (the hidden state at the end-of-text token), as transformers'
    /// `CLIPTextTransformer`: at the highest id when `eos_token_id` is the legacy 2, else at
    /// the first `eos_token_id`.
    ///
    /// # Shapes
    /// `last_hidden`: `[b, n, hidden]`, `input_ids`: `[b, n]` -> `[b, hidden]`
    pub fn pooled(&self, last_hidden: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let rows = ids
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let pos = if self.cfg.eos_token_id == 2 {
                    // argmax, first maximum
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&v| v == max).unwrap_or(0)
                } else {
                    row.iter()
                        .position(|&v| v == self.cfg.eos_token_id)
                        .unwrap_or(0)
                };
                last_hidden.get(b)?.get(pos)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// `[n, n]` additive mask: 0 on and below the diagonal, the dtype's lowest value above.
pub(crate) fn causal_mask(n: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let neg = match dtype {
        DType::F16 => f32::from(half::f16::MIN),
        DType::BF16 => f32::from(half::bf16::MIN),
        _ => f32::MIN,
    };
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { neg } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (n, n), device)?.to_dtype(dtype)
}
