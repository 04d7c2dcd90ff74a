//! diffusers' `Transformer2DModel` as Stable Diffusion 1.x/2.x use it (continuous input,
//! `BasicTransformerBlock` with self-attention, cross-attention and a GEGLU feed-forward).

use crate::error::Result;
use crate::nn::context::Memo;
use crate::nn::{attention, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::Vb;
use candle_core::Tensor;

/// diffusers' `Attention` with separate to_q/to_k/to_v (no bias) and to_out.0 (bias).
#[derive(Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// The keys and values of the last stable context (`nn::context`).
    kv: Memo<(Tensor, Tensor)>,
}

impl CrossAttention {
    pub fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        vb: &Vb,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new(query_dim, inner, false, &vb.pp("to_q"))?,
            to_k: Linear::new(context_dim, inner, false, &vb.pp("to_k"))?,
            to_v: Linear::new(context_dim, inner, false, &vb.pp("to_v"))?,
            to_out: Linear::new(inner, query_dim, true, &vb.pp("to_out").pp(0))?,
            heads,
            kv: Memo::default(),
        })
    }

    /// # Shapes
    /// `xs`: `[b, n, query_dim]`, `context`: `[b, m, context_dim]` (None: self-attention)
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let project = |ctx: &Tensor| Ok((self.to_k.forward(ctx)?, self.to_v.forward(ctx)?));
        let (k, v) = match context {
            Some(ctx) => self.kv.get_or(ctx, || project(ctx))?,
            None => project(xs)?,
        };
        let out = attention(&self.to_q.forward(xs)?, &k, &v, self.heads, None)?;
        self.to_out.forward(&out)
    }
}

/// Shape parameters of one `Transformer2DModel`.
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

#[derive(Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    pub fn new(cfg: &TransformerConfig, vb: &Vb) -> Result<Self> {
        Self::with_context(cfg.heads, cfg.head_dim, Some(cfg.cross_attention_dim), vb)
    }

    /// A block of `heads` x `head_dim` whose attn2 attends to a context `context_dim` wide, or
    /// with `None` to the block's own tokens again (diffusers' `double_self_attention`, as the
    /// temporal transformers of a video UNet use it).
    pub fn with_context(
        heads: usize,
        head_dim: usize,
        context_dim: Option<usize>,
        vb: &Vb,
    ) -> Result<Self> {
        let dim = heads * head_dim;
        let ff_inner = 4 * dim;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, &vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, head_dim, &vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, &vb.pp("norm2"))?,
            attn2: CrossAttention::new(
                dim,
                context_dim.unwrap_or(dim),
                heads,
                head_dim,
                &vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, 1e-5, &vb.pp("norm3"))?,
            ff_proj: Linear::new(dim, 2 * ff_inner, true, &vb.pp("ff.net.0.proj"))?,
            ff_out: Linear::new(ff_inner, dim, true, &vb.pp("ff.net.2"))?,
        })
    }

    /// # Shapes
    /// `xs`: `[b, n, dim]`, `context`: `[b, m, cross_attention_dim]` -> `[b, n, dim]`
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_opt(xs, Some(context))
    }

    /// A block built with no context (`with_context(.., None, ..)`): attn2 is self-attention.
    pub fn forward_self(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_opt(xs, None)
    }

    fn forward_opt(&self, xs: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, context)? + &xs)?;
        // GEGLU: the projection's first half is the value, the second half its gate.
        let h = self.ff_proj.forward(&self.norm3.forward(&xs)?)?;
        let h = crate::nn::activation::geglu(&h)?;
        self.ff_out.forward(&h)? + xs
    }
}

#[derive(Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(linear: bool, i: usize, o: usize, vb: &Vb) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(i, o, true, vb)?)
        } else {
            Projection::Conv(Conv2d::new(i, o, 1, 1, 0, vb)?)
        })
    }
}

#[derive(Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(cfg: &TransformerConfig, vb: &Vb) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let blocks = (0..cfg.layers)
            .map(|i| BasicTransformerBlock::new(cfg, &vb.pp("transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(cfg.groups, cfg.channels, 1e-6, &vb.pp("norm"))?,
            proj_in: Projection::new(
                cfg.use_linear_projection,
                cfg.channels,
                inner,
                &vb.pp("proj_in"),
            )?,
            blocks,
            proj_out: Projection::new(
                cfg.use_linear_projection,
                inner,
                cfg.channels,
                &vb.pp("proj_out"),
            )?,
        })
    }

    /// # Shapes
    /// `xs`: `[b, c, h, w]`, `context`: `[b, m, cross_attention_dim]` -> `[b, c, h, w]`
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> candle_core::Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| -> candle_core::Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        out + xs
    }
}
