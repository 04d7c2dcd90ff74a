//! The reward models' image preprocessing, differentiable: resize the shorter side to the
//! model's input size with antialiased bicubic interpolation (the filter of PIL's BICUBIC,
//! a = -0.5, which torchvision's tensor `resize(..., antialias=True)` also uses), centre crop,
//! CLIP mean/std normalisation. The resize is a pair of fixed matrices applied on both sides
//! of each image, so its gradient is exact.
//!
//! The references (open_clip's transform, transformers' `CLIPImageProcessor`) resize a
//! uint8 PIL image; the differences that quantisation makes are measured in
//! `tests/reward.rs` against `tests/fixtures/reward/preprocess.safetensors`.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The `[out, in]` matrix of antialiased bicubic resampling (PIL's `ImagingResample`, and
/// torch's `_upsample_bicubic2d_aa`), align_corners = False.
pub fn resize_matrix(in_size: usize, out_size: usize) -> Vec<f64> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let mut m = vec![0.0; out_size * in_size];
    for i in 0..out_size {
        let center = (i as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
        let xmax = ((center + support + 0.5).floor() as usize).min(in_size);
        let weights: Vec<f64> = (xmin..xmax)
            .map(|x| bicubic((x as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = weights.iter().sum();
        for (k, w) in weights.iter().enumerate() {
            m[i * in_size + xmin + k] = if total != 0.0 { w / total } else { 0.0 };
        }
    }
    m
}

/// Python's round(): half to even.
fn round_half_even(v: f64) -> usize {
    let r = v.round();
    let r = if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    };
    r.max(0.0) as usize
}

#[derive(Debug, Clone)]
pub struct Preprocess {
    pub size: usize,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Preprocess {
    pub fn clip(size: usize) -> Self {
        Self {
            size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// The resize + centre-crop matrices for an `h x w` image: `[S, h]` and `[S, w]`.
    fn matrices(
        &self,
        h: usize,
        w: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let s = self.size;
        // torchvision: the shorter side becomes S, the longer int(S * long / short).
        let (nh, nw) = if h <= w {
            (s, s * w / h)
        } else {
            (s * h / w, s)
        };
        let top = round_half_even((nh - s) as f64 / 2.0);
        let left = round_half_even((nw - s) as f64 / 2.0);
        let rows = |in_size: usize, out_size: usize, start: usize| -> Result<Tensor> {
            let m = resize_matrix(in_size, out_size);
            let cropped: Vec<f64> = m[start * in_size..(start + s) * in_size].to_vec();
            Ok(Tensor::from_vec(cropped, (s, in_size), device)?.to_dtype(dtype)?)
        };
        Ok((rows(h, nh, top)?, rows(w, nw, left)?))
    }

    /// Resize only (shorter side to S) and crop, without normalising, values as given.
    ///
    /// # Shapes
    /// `[n, 3, h, w]` -> `[n, 3, S, S]`
    pub fn resize_crop(&self, images: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = images.dims4()?;
        if c != 3 {
            return Err(Error::Invalid(format!(
                "reward models take RGB images (3 channels), got {c} channels"
            )));
        }
        if h == 0 || w == 0 {
            return Err(Error::Invalid("empty image".into()));
        }
        let (mh, mw) = self.matrices(h, w, images.dtype(), images.device())?;
        // out[n, c] = Mh @ X[n, c] @ Mw^T
        let rows = mh.broadcast_matmul(images)?;
        Ok(rows.broadcast_matmul(&mw.t()?)?)
    }

    /// The full preprocessing: images in [0, 1] to normalised model input.
    ///
    /// # Shapes
    /// `[n, 3, h, w]` -> `[n, 3, S, S]`
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let x = self.resize_crop(images)?;
        let dev = x.device();
        let mean = Tensor::from_vec(self.mean.to_vec(), (1, 3, 1, 1), dev)?.to_dtype(x.dtype())?;
        let std = Tensor::from_vec(self.std.to_vec(), (1, 3, 1, 1), dev)?.to_dtype(x.dtype())?;
        Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }
}
