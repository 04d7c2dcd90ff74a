//! The temporal layers of diffusers' `UNet3DConditionModel` (ModelScope / ZeroScope): a
//! convolution along frames (`TemporalConvLayer`) and attention along frames
//! (`TransformerTemporalModel`). Both take the video as a batch of frames, `[b * f, c, h, w]`
//! with each video's frames consecutive (diffusers' layout), and return the same shape.

use crate::error::Result;
use crate::models::transformer::BasicTransformerBlock;
use crate::nn::{GroupNorm, Linear};
use crate::weights::Vb;
use candle_core::Tensor;

/// `[b * f, c, h, w]` -> `[b, c, f, h * w]`: the layout in which a group norm over
/// (channels, frames, pixels) is a plain 4-D group norm.
fn frames_to_channels_first(xs: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
    let (bf, c, h, w) = xs.dims4()?;
    if frames == 0 || bf % frames != 0 {
        candle_core::bail!("{bf} frames in the batch are not whole videos of {frames} frames");
    }
    xs.reshape((bf / frames, frames, c, h * w))?
        .permute((0, 2, 1, 3))?
        .contiguous()
}

/// The inverse of [`frames_to_channels_first`].
fn channels_first_to_frames(xs: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, c, f, _) = xs.dims4()?;
    xs.permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((b * f, c, h, w))
}

/// `torch.nn.Conv3d` with kernel (3, 1, 1) and padding (1, 0, 0): a convolution along frames
/// only. Computed as one matrix product over the three frame-shifted copies stacked along
/// channels, so it runs on the project's linear kernels, forward and backward.
#[derive(Clone)]
struct FrameConv {
    /// `[out, 3 * in]`, the taps in order (previous frame, this frame, next frame).
    linear: Linear,
}

impl FrameConv {
    fn new(in_c: usize, out_c: usize, vb: &Vb) -> Result<Self> {
        let w = vb.get(&[out_c, in_c, 3, 1, 1], "weight")?;
        // W3[o, k * in + i] = W[o, i, k]
        let w = w
            .reshape((out_c, in_c, 3))?
            .permute((0, 2, 1))?
            .contiguous()?
            .reshape((out_c, 3 * in_c))?;
        let b = vb.get(&[out_c], "bias")?;
        Ok(Self {
            linear: Linear::from_tensors(w, Some(b)),
        })
    }

    /// # Shapes
    /// `[b, in, f, s]` -> `[b, out, f, s]`
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, f, s) = xs.dims4()?;
        let zero = Tensor::zeros((b, c, 1, s), xs.dtype(), xs.device())?;
        let padded = Tensor::cat(&[&zero, xs, &zero], 2)?;
        let taps: Vec<Tensor> = (0..3)
            .map(|k| padded.narrow(2, k, f))
            .collect::<candle_core::Result<_>>()?;
        let stacked = Tensor::cat(&taps, 1)?; // [b, 3c, f, s]
        let out = self.linear.forward(&stacked.permute((0, 2, 3, 1))?)?; // [b, f, s, out]
        out.permute((0, 3, 1, 2))?.contiguous()
    }
}

/// diffusers' `TemporalConvLayer`: four (group norm, SiLU, frame convolution) stages added to
/// the input. The group norms (eps 1e-5, torch's default) pool over all frames of a video.
/// Dropout is inactive at inference and in ReNeg's gradient step.
#[derive(Clone)]
pub struct TemporalConvLayer {
    stages: Vec<(GroupNorm, FrameConv)>,
}

impl TemporalConvLayer {
    pub fn new(channels: usize, groups: usize, vb: &Vb) -> Result<Self> {
        let stages = (1..=4)
            .map(|i| {
                let seq = vb.pp(format!("conv{i}"));
                // conv1 is (norm, SiLU, conv); conv2-4 have a dropout before the conv.
                let conv_index = if i == 1 { 2 } else { 3 };
                Ok((
                    GroupNorm::new(groups, channels, 1e-5, &seq.pp(0))?,
                    FrameConv::new(channels, channels, &seq.pp(conv_index))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { stages })
    }

    /// # Shapes
    /// `[b * frames, c, h, w]` -> same
    pub fn forward(&self, xs: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let identity = frames_to_channels_first(xs, frames)?;
        let mut x = identity.clone();
        for (norm, conv) in &self.stages {
            x = conv.forward(&norm.forward_silu(&x)?)?;
        }
        channels_first_to_frames(&(identity + x)?, h, w)
    }
}

/// diffusers' `TransformerTemporalModel`: group norm (eps 1e-6) over the video, each pixel's
/// sequence of frames through transformer blocks whose two attentions both attend over
/// frames (the text is not used), and a residual connection.
#[derive(Clone)]
pub struct TransformerTemporalModel {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl TransformerTemporalModel {
    pub fn new(
        channels: usize,
        heads: usize,
        head_dim: usize,
        groups: usize,
        vb: &Vb,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        // diffusers' UNet3DConditionModel builds every temporal transformer with one block.
        let blocks = vec![BasicTransformerBlock::with_context(
            heads,
            head_dim,
            None,
            &vb.pp("transformer_blocks.0"),
        )?];
        Ok(Self {
            norm: GroupNorm::new(groups, channels, 1e-6, &vb.pp("norm"))?,
            proj_in: Linear::new(channels, inner, true, &vb.pp("proj_in"))?,
            blocks,
            proj_out: Linear::new(inner, channels, true, &vb.pp("proj_out"))?,
        })
    }

    /// # Shapes
    /// `[b * frames, c, h, w]` -> same
    pub fn forward(&self, xs: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
        let (bf, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(&frames_to_channels_first(xs, frames)?)?; // [b, c, f, hw]
        let b = bf / frames;
        // One sequence of `frames` tokens per pixel: [b * hw, f, c].
        let tokens = normed
            .permute((0, 3, 2, 1))?
            .contiguous()?
            .reshape((b * h * w, frames, c))?;
        let mut tokens = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            tokens = block.forward_self(&tokens)?;
        }
        let out = self.proj_out.forward(&tokens)?; // [b * hw, f, c]
        let out = out
            .reshape((b, h * w, frames, c))?
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((bf, c, h, w))?;
        out + xs
    }
}
