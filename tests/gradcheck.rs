//! Finite-difference gradient checks (f64) for every differentiable module on the path from
//! the negative embedding to the reward: building blocks, attention, transformer and resnet
//! blocks, the UNet's down/mid/up blocks and whole UNet, the VAE, DDIM's x0 prediction, and
//! the full guided ReNeg step. The last tests show that the check rejects wrong gradients.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use reneg::models::resnet::{ResnetBlock2D, ResnetConfig};
use reneg::models::transformer::{
    BasicTransformerBlock, CrossAttention, Transformer2DModel, TransformerConfig,
};
use reneg::nn::{self, Activation, GroupNorm, LayerNorm};
use reneg::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use serde_json::json;
use std::path::Path;

#[test]
fn softmax_and_upsample() {
    assert_gradient(
        "softmax_last_dim",
        |x| nn::softmax_last_dim(x).unwrap(),
        &randn(1, &[3, 7]),
    );
    assert_gradient(
        "upsample_nearest_2x",
        |x| nn::upsample_nearest_2x(x).unwrap(),
        &randn(2, &[1, 2, 3, 4]),
    );
}

#[test]
fn activations() {
    for (i, act) in [
        Activation::Gelu,
        Activation::QuickGelu,
        Activation::GeluNew,
        Activation::Silu,
    ]
    .into_iter()
    .enumerate()
    {
        assert_gradient(
            &format!("{act:?}"),
            |x| act.forward(x).unwrap(),
            &randn(10 + i as u64, &[4, 5]),
        );
    }
}

#[test]
fn layer_norm_and_group_norm() {
    let ln = LayerNorm::new(6, 1e-5, &random_vb(3)).unwrap();
    assert_gradient(
        "layer_norm",
        |x| ln.forward(x).unwrap(),
        &randn(4, &[2, 3, 6]),
    );
    let gn = GroupNorm::new(2, 4, 1e-6, &random_vb(5)).unwrap();
    assert_gradient(
        "group_norm",
        |x| gn.forward(x).unwrap(),
        &randn(6, &[2, 4, 3, 3]),
    );
    // The fused CPU kernel with SiLU, 4-D and 3-D; and the composed ops it replaces.
    assert_gradient(
        "group_norm + silu (fused)",
        |x| gn.forward_silu(x).unwrap(),
        &randn(61, &[2, 4, 3, 3]),
    );
    assert_gradient(
        "group_norm + silu (fused, 3-D)",
        |x| gn.forward_silu(x).unwrap(),
        &randn(62, &[1, 4, 5]),
    );
    assert_gradient(
        "group_norm (composed)",
        |x| gn.composed(x).unwrap(),
        &randn(63, &[2, 4, 3, 3]),
    );
}

#[test]
fn fused_softmax() {
    assert_gradient(
        "softmax(0.7 x), fused",
        |x| {
            nn::cpu_softmax::softmax_scaled(x, 0.7)
                .unwrap()
                .expect("CPU f64 takes the fused path")
        },
        &randn(64, &[2, 3, 5]),
    );
}

#[test]
fn fused_gelu_and_geglu() {
    // Scaled so that both tails of Φ are exercised, not only its middle.
    let x = (randn(65, &[2, 3, 8]) * 2.5).unwrap();
    assert_gradient("gelu, fused", |x| nn::cpu_gelu::gelu(x).unwrap(), &x);
    assert_gradient("geglu, fused", |h| nn::cpu_gelu::geglu(h).unwrap(), &x);
    assert_gradient(
        "gelu tanh, fused",
        |x| nn::cpu_gelu::gelu_tanh(x).unwrap(),
        &x,
    );
}

/// Trainable weights (issue 8 trains models): the gradient with respect to the weights
/// themselves, which the frozen fast paths must not drop.
#[test]
fn weight_gradients_of_trainable_layers() {
    let x = randn(68, &[2, 3, 4]);
    let (w, b) = (randn(69, &[5, 4]), randn(70, &[5]));
    assert_gradient(
        "linear wrt its weight",
        |w| {
            nn::Linear::from_tensors(w.clone(), Some(b.clone()))
                .forward(&x)
                .unwrap()
        },
        &w,
    );
    let (gamma, beta) = (randn(71, &[4]), randn(72, &[4]));
    assert_gradient(
        "layer norm wrt its weight",
        |g| {
            LayerNorm::from_tensors(g.clone(), beta.clone(), 1e-5)
                .forward(&x)
                .unwrap()
        },
        &gamma,
    );
    // With the input on the graph too (the frozen path's trigger).
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    assert_gradient(
        "layer norm wrt its bias, input on the graph",
        |b| {
            LayerNorm::from_tensors(gamma.clone(), b.clone(), 1e-5)
                .forward(xv.as_tensor())
                .unwrap()
        },
        &beta,
    );
}

#[test]
fn attention_recomputing_backward_in_blocks() {
    // Blocks of 2 query rows (of 7): the backward recomputes each block's probabilities.
    let (q, k, v) = (
        randn(65, &[2, 7, 6]),
        randn(66, &[2, 5, 6]),
        randn(67, &[2, 5, 6]),
    );
    let block = 2 * 2 * 5 * 2;
    let att = |q: &Tensor, k: &Tensor, v: &Tensor| {
        nn::attention_blocked(q, k, v, 2, None, block).unwrap()
    };
    assert_gradient("attention blocks wrt q", |x| att(x, &k, &v), &q);
    assert_gradient("attention blocks wrt k", |x| att(&q, x, &v), &k);
    assert_gradient("attention blocks wrt v", |x| att(&q, &k, x), &v);
}

#[test]
fn attention_self_and_cross() {
    let attn = CrossAttention::new(8, 12, 2, 4, &random_vb(7)).unwrap();
    let ctx = randn(8, &[2, 5, 12]);
    let x = randn(9, &[2, 6, 8]);
    assert_gradient(
        "cross-attention wrt context",
        |c| attn.forward(&x, Some(c)).unwrap(),
        &ctx,
    );
    assert_gradient(
        "cross-attention wrt query input",
        |q| attn.forward(q, Some(&ctx)).unwrap(),
        &x,
    );
    let self_attn = CrossAttention::new(8, 8, 2, 4, &random_vb(10)).unwrap();
    assert_gradient(
        "self-attention",
        |q| self_attn.forward(q, None).unwrap(),
        &x,
    );
}

fn transformer_cfg(linear: bool) -> TransformerConfig {
    TransformerConfig {
        channels: 8,
        heads: 2,
        head_dim: 4,
        layers: 1,
        cross_attention_dim: 12,
        groups: 4,
        use_linear_projection: linear,
    }
}

#[test]
fn transformer_block() {
    let block = BasicTransformerBlock::new(&transformer_cfg(false), &random_vb(11)).unwrap();
    let ctx = randn(12, &[1, 5, 12]);
    let x = randn(13, &[1, 6, 8]);
    assert_gradient(
        "transformer block wrt context",
        |c| block.forward(&x, c).unwrap(),
        &ctx,
    );
    assert_gradient(
        "transformer block wrt hidden",
        |h| block.forward(h, &ctx).unwrap(),
        &x,
    );
}

#[test]
fn transformer_2d_conv_and_linear_projection() {
    let ctx = randn(14, &[1, 5, 12]);
    let x = randn(15, &[1, 8, 3, 3]);
    for linear in [false, true] {
        let t = Transformer2DModel::new(&transformer_cfg(linear), &random_vb(16)).unwrap();
        assert_gradient(
            &format!("transformer2d (linear={linear}) wrt context"),
            |c| t.forward(&x, c).unwrap(),
            &ctx,
        );
        assert_gradient(
            &format!("transformer2d (linear={linear}) wrt hidden"),
            |h| t.forward(h, &ctx).unwrap(),
            &x,
        );
    }
}

#[test]
fn resnet_block() {
    let cfg = ResnetConfig {
        in_channels: 4,
        out_channels: 8,
        temb_channels: Some(6),
        groups: 2,
        eps: 1e-5,
        output_scale_factor: 1.0,
    };
    let r = ResnetBlock2D::new(&cfg, &random_vb(17)).unwrap();
    let temb = randn(18, &[2, 6]);
    let x = randn(19, &[2, 4, 4, 4]);
    assert_gradient(
        "resnet block wrt input",
        |h| r.forward(h, Some(&temb)).unwrap(),
        &x,
    );
    assert_gradient(
        "resnet block wrt temb",
        |t| r.forward(&x, Some(t)).unwrap(),
        &temb,
    );
}

#[test]
fn unet_down_mid_up_blocks() {
    let unet = tiny_unet(20, false);
    let temb = unet
        .time_embedding(500.0, 1, DType::F64, &Device::Cpu)
        .unwrap();
    let ctx = randn(21, &[1, 5, 12]);
    // Down block 0 (cross-attention, with downsampler): [1, 8, 4, 4] -> [1, 8, 2, 2].
    let down = &unet.down_blocks()[0];
    let x = randn(22, &[1, 8, 4, 4]);
    let down_out = |c: &Tensor| {
        let (out, skips) = down.forward_down(&x, &temb, c, 1).unwrap();
        let flat: Vec<Tensor> = std::iter::once(out)
            .chain(skips)
            .map(|t| t.flatten_all().unwrap())
            .collect();
        Tensor::cat(&flat, 0).unwrap()
    };
    assert_gradient("down block (cross-attn) wrt context", down_out, &ctx);
    assert_gradient(
        "down block (cross-attn) wrt hidden",
        |h| down.forward_down(h, &temb, &ctx, 1).unwrap().0,
        &x,
    );
    // Mid block at the bottleneck width 16.
    let xm = randn(23, &[1, 16, 2, 2]);
    assert_gradient(
        "mid block wrt context",
        |c| unet.mid_block().forward(&xm, &temb, c, 1).unwrap(),
        &ctx,
    );
    assert_gradient(
        "mid block wrt hidden",
        |h| unet.mid_block().forward(h, &temb, &ctx, 1).unwrap(),
        &xm,
    );
    // Up block 1 (cross-attention, last level): hidden [1, 16, 4, 4], skips of 8 channels.
    let up = &unet.up_blocks()[1];
    let xu = randn(24, &[1, 16, 4, 4]);
    let skips = vec![randn(25, &[1, 8, 4, 4]), randn(26, &[1, 8, 4, 4])];
    assert_gradient(
        "up block (cross-attn) wrt context",
        |c| up.forward_up(&xu, &mut skips.clone(), &temb, c, 1).unwrap(),
        &ctx,
    );
    assert_gradient(
        "up block (cross-attn) wrt skip",
        |s| {
            let mut sk = vec![s.clone(), skips[1].clone()];
            up.forward_up(&xu, &mut sk, &temb, &ctx, 1).unwrap()
        },
        &skips[0],
    );
    // Up block 0 (plain, with upsampler).
    let up0 = &unet.up_blocks()[0];
    let x0 = randn(27, &[1, 16, 2, 2]);
    let skips0 = vec![randn(28, &[1, 8, 2, 2]), randn(29, &[1, 16, 2, 2])];
    assert_gradient(
        "up block (plain, upsampler) wrt hidden",
        |h| {
            up0.forward_up(h, &mut skips0.clone(), &temb, &ctx, 1)
                .unwrap()
        },
        &x0,
    );
}

/// The temporal layers of a video UNet, on two videos of three frames each.
#[test]
fn temporal_layers() {
    use reneg::models::temporal::{TemporalConvLayer, TransformerTemporalModel};
    let conv = TemporalConvLayer::new(4, 2, &random_vb(90)).unwrap();
    assert_gradient(
        "temporal conv layer wrt input",
        |x| conv.forward(x, 3).unwrap(),
        &randn(91, &[6, 4, 2, 3]),
    );
    let attn = TransformerTemporalModel::new(4, 2, 3, 2, &random_vb(92)).unwrap();
    assert_gradient(
        "transformer temporal model wrt input",
        |x| attn.forward(x, 3).unwrap(),
        &randn(93, &[6, 4, 2, 3]),
    );
}

/// The whole video UNet (`UNet3DConditionModel`), latents `[b, c, frames, h, w]`.
#[test]
fn whole_video_unet() {
    let unet =
        reneg::models::unet::UNet2DConditionModel::new(tiny_video_unet_config(), &random_vb(94))
            .unwrap();
    let ctx = randn(95, &[2, 5, 12]);
    let x = randn(96, &[2, 4, 3, 4, 4]);
    assert_gradient(
        "video unet wrt encoder_hidden_states",
        |c| unet.forward(&x, 321.0, c).unwrap(),
        &ctx,
    );
    assert_gradient(
        "video unet wrt sample",
        |s| unet.forward(s, 321.0, &ctx).unwrap(),
        &x,
    );
}

#[test]
fn whole_unet() {
    for linear in [false, true] {
        let unet = tiny_unet(30, linear);
        let ctx = randn(31, &[1, 5, 12]);
        let x = randn(32, &[1, 4, 4, 4]);
        assert_gradient(
            &format!("unet (linear={linear}) wrt encoder_hidden_states"),
            |c| unet.forward(&x, 321.0, c).unwrap(),
            &ctx,
        );
        assert_gradient(
            &format!("unet (linear={linear}) wrt sample"),
            |s| unet.forward(s, 321.0, &ctx).unwrap(),
            &x,
        );
    }
}

#[test]
fn vae_decoder_and_encoder() {
    let vae = tiny_vae(33);
    assert_gradient(
        "vae decoder",
        |z| vae.decode(z).unwrap(),
        &randn(34, &[1, 4, 3, 3]),
    );
    assert_gradient(
        "vae encoder (mean)",
        |x| vae.encode(x).unwrap().0,
        &randn(35, &[1, 3, 6, 6]),
    );
}

/// Every sampler's x0 prediction (what ReNeg decodes) and, composed with it, the UNet input
/// scaling, for every prediction type it takes, at a middle step of a 10-step run.
#[test]
fn every_samplers_x0_prediction() {
    for kind in SchedulerKind::ALL {
        for pt in ["epsilon", "v_prediction", "sample"] {
            if kind == SchedulerKind::Pndm && pt == "sample" {
                continue; // PNDM refuses sample prediction (tests/schedulers.rs)
            }
            let cfg = SchedulerConfig::from_value(
                json!({"prediction_type": pt, "clip_sample": false,
                       "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "beta_end": 0.012}),
                Path::new("<test>"),
            )
            .unwrap();
            let mut s = Scheduler::new(kind, cfg).unwrap();
            s.set_timesteps(10).unwrap();
            let i = 4;
            let sample = (randn(36, &[1, 4, 2, 2]) * s.init_noise_sigma().max(1.0)).unwrap();
            let out = randn(37, &[1, 4, 2, 2]);
            assert_gradient(
                &format!("{kind} x0 ({pt}) wrt model output"),
                |m| s.pred_original_sample(m, i, &sample).unwrap(),
                &out,
            );
            if pt == "sample" {
                continue; // x0 is the model output itself: no dependence on the sample
            }
            // The model output itself depends on the scaled input, as in ReNeg's step.
            assert_gradient(
                &format!("{kind} x0 ({pt}) of a model on the scaled input, wrt sample"),
                |x| {
                    let input = s.scale_model_input(x, i).unwrap();
                    let m = ((input.sin().unwrap() * 0.7).unwrap() + &out).unwrap();
                    s.pred_original_sample(&m, i, x).unwrap()
                },
                &sample,
            );
        }
    }
}

#[test]
fn guided_renege_step_wrt_negative_embedding() {
    for pt in ["epsilon", "v_prediction"] {
        let mut sd = tiny_pipeline(40, pt);
        sd.scheduler.set_timesteps(5).unwrap();
        assert_eq!(sd.scheduler.timestep(2).unwrap(), 401.0);
        let cond = randn(41, &[1, 77, 12]);
        let latents = randn(42, &[1, 4, 4, 4]);
        assert_gradient(
            &format!("guided step + x0 + decode ({pt}) wrt negative"),
            |u| {
                let x0 = sd
                    .predict_x0(&latents, 2, &cond.clone().into(), &u.clone().into(), 7.5)
                    .unwrap();
                sd.decode(&x0).unwrap()
            },
            &randn(43, &[1, 77, 12]),
        );
    }
}

/// A tiny ControlNet matching `tiny_unet`'s contracting half, its conditioning embedding
/// halving the image once (as the tiny VAE does).
fn tiny_controlnet(seed: u64) -> reneg::models::controlnet::ControlNetModel {
    use reneg::models::controlnet::{ControlNetConfig, ControlNetModel};
    let cfg = ControlNetConfig::from_value(
        json!({
            "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": [2, 4],
            "norm_num_groups": 4,
            "cross_attention_dim": 12,
            "conditioning_embedding_out_channels": [4, 8],
        }),
        Path::new("<test controlnet config>"),
    )
    .unwrap();
    ControlNetModel::new(cfg, &random_vb(seed)).unwrap()
}

/// All of a ControlNet's residuals as one tensor.
fn flat(r: &reneg::models::unet::Residuals) -> Tensor {
    let parts: Vec<Tensor> = r
        .down
        .iter()
        .chain(std::iter::once(&r.mid))
        .map(|t| t.flatten_all().unwrap())
        .collect();
    Tensor::cat(&parts, 0).unwrap()
}

#[test]
fn controlnet_wrt_context_sample_and_image() {
    let cn = tiny_controlnet(60);
    let ctx = randn(61, &[1, 5, 12]);
    let x = randn(62, &[1, 4, 4, 4]);
    let image = (randn(63, &[1, 3, 8, 8]).abs().unwrap() * 0.5).unwrap();
    for guess in [false, true] {
        assert_gradient(
            &format!("controlnet (guess={guess}) wrt encoder_hidden_states"),
            |c| flat(&cn.forward(&x, 321.0, c, &image, 0.7, guess).unwrap()),
            &ctx,
        );
        assert_gradient(
            &format!("controlnet (guess={guess}) wrt sample"),
            |s| flat(&cn.forward(s, 321.0, &ctx, &image, 0.7, guess).unwrap()),
            &x,
        );
        assert_gradient(
            &format!("controlnet (guess={guess}) wrt control image"),
            |i| flat(&cn.forward(&x, 321.0, &ctx, i, 0.7, guess).unwrap()),
            &image,
        );
    }
}

#[test]
fn guided_step_through_a_controlnet_wrt_negative_embedding() {
    for guess in [false, true] {
        let mut sd = tiny_pipeline(64, "epsilon");
        sd.scheduler.set_timesteps(5).unwrap();
        let image = (randn(65, &[1, 3, 8, 8]).abs().unwrap() * 0.5).unwrap();
        sd.add_controlnet(
            tiny_controlnet(66),
            image,
            1.3,
            Path::new("<tiny controlnet>"),
        )
        .unwrap();
        sd.set_guess_mode(guess).unwrap();
        let cond = randn(67, &[1, 77, 12]);
        let latents = randn(68, &[1, 4, 4, 4]);
        assert_gradient(
            &format!("guided step through a ControlNet (guess={guess}) + x0 + decode wrt negative"),
            |u| {
                let x0 = sd
                    .predict_x0(&latents, 2, &cond.clone().into(), &u.clone().into(), 7.5)
                    .unwrap();
                sd.decode(&x0).unwrap()
            },
            &randn(69, &[1, 77, 12]),
        );
    }
}

// The check itself must reject wrong gradients, or it proves nothing.

#[test]
fn check_rejects_a_gradient_off_by_a_tenth_of_a_percent() {
    let ln = LayerNorm::new(6, 1e-5, &random_vb(50)).unwrap();
    let f = |x: &Tensor| ln.forward(x).unwrap();
    let x = randn(51, &[2, 6]);
    let g = analytic_grad(&f, &x, 1);
    assert!(fd_error(&f, &x, &g, 1) < FD_TOL);
    let wrong = (&g * 1.001).unwrap();
    let err = fd_error(&f, &x, &wrong, 1);
    assert!(
        err > FD_TOL,
        "a 0.1% error must fail the check, got {err:.3e}"
    );
}

#[test]
fn check_rejects_candles_fused_layer_norm_gradient() {
    // candle_nn's fused layer norm has no backward and silently returns a wrong gradient:
    // the reason this project writes its own. The check must catch it.
    // The fused op runs in f32 only; its gradient is checked against finite differences of
    // the same function (our layer norm, whose forward it matches) in f64.
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (w, b, x) = (randn(52, &[6]), randn(53, &[6]), randn(54, &[2, 6]));
    let fused = |x: &Tensor| candle_nn::ops::layer_norm(x, &f32(&w), &f32(&b), 1e-5).unwrap();
    let ours = LayerNorm::from_tensors(w.clone(), b.clone(), 1e-5);
    let f = |x: &Tensor| ours.forward(x).unwrap();
    let forward_diff = max_abs_diff(&fused(&f32(&x)).to_dtype(DType::F64).unwrap(), &f(&x));
    assert!(forward_diff < 1e-5, "same forward: {forward_diff}");
    let fused_grad = analytic_grad(&fused, &f32(&x), 2)
        .to_dtype(DType::F64)
        .unwrap();
    let err = fd_error(&f, &x, &fused_grad, 2);
    assert!(
        err > FD_TOL,
        "fused layer norm's gradient passed the check: {err:.3e}"
    );
    // Our gradient of the same function passes.
    assert!(fd_error(&f, &x, &analytic_grad(&f, &x, 2), 2) < FD_TOL);
}

#[test]
fn frozen_conv_input_gradient_all_strides_paddings_and_odd_sizes() {
    use reneg::nn::{Conv2d, Downsample2D, Linear};
    for (k, s, p, h, w) in [
        (3, 1, 1, 5, 6),
        (1, 1, 0, 4, 3),
        (3, 2, 1, 7, 6),
        (3, 2, 1, 8, 8),
        (3, 2, 0, 7, 9),
        (3, 1, 0, 6, 5),
    ] {
        let conv = Conv2d::new(3, 4, k, s, p, &random_vb(70 + k as u64)).unwrap();
        assert_gradient(
            &format!("frozen conv k{k} s{s} p{p} {h}x{w}"),
            |x| conv.forward(x).unwrap(),
            &randn(71, &[2, 3, h, w]),
        );
    }
    // Large enough for the Winograd path (the UNet's and decoder's big convolutions).
    for (p, h, w) in [(1, 34, 33), (0, 36, 35)] {
        let conv = Conv2d::new(64, 64, 3, 1, p, &random_vb(76)).unwrap();
        assert!(reneg::nn::cpu_conv::auto_picks_winograd(
            (1, 64, h, w),
            (64, 64, 3, 3),
            p,
            1
        ));
        assert_gradient(
            &format!("frozen conv, Winograd path, p{p} {h}x{w}"),
            |x| conv.forward(x).unwrap(),
            &randn(77, &[1, 64, h, w]),
        );
    }
    let ds = Downsample2D::new(3, 0, &random_vb(72)).unwrap();
    assert_gradient(
        "downsample pad-0 (right/bottom pad)",
        |x| ds.forward(x).unwrap(),
        &randn(73, &[1, 3, 7, 8]),
    );
    let lin = Linear::new(5, 3, true, &random_vb(74)).unwrap();
    assert_gradient(
        "frozen linear, 3-D input",
        |x| lin.forward(x).unwrap(),
        &randn(75, &[2, 4, 5]),
    );
}

#[test]
fn trainable_conv_gradients_wrt_kernel_bias_and_input() {
    use candle_core::Var;
    use reneg::nn::Conv2d;
    for (k, s, p, h, w) in [
        (3, 1, 1, 5, 6),
        (1, 1, 0, 4, 3),
        (3, 2, 1, 7, 6),
        (3, 2, 0, 8, 9),
    ] {
        let x = randn(80 + k as u64, &[2, 3, h, w]);
        let kernel = randn(81, &[4, 3, k, k]);
        let bias = randn(82, &[4]);
        let name = format!("k{k} s{s} p{p} {h}x{w}");
        assert_gradient(
            &format!("trainable conv wrt kernel {name}"),
            |kv| {
                Conv2d::from_tensors(kv.clone(), Some(bias.clone()), s, p)
                    .forward(&x)
                    .unwrap()
            },
            &kernel,
        );
        let kvar = Var::from_tensor(&kernel).unwrap();
        assert_gradient(
            &format!("trainable conv wrt bias {name}"),
            |b| {
                Conv2d::from_tensors(kvar.as_tensor().clone(), Some(b.clone()), s, p)
                    .forward(&x)
                    .unwrap()
            },
            &bias,
        );
        assert_gradient(
            &format!("trainable conv wrt input {name}"),
            |xv| {
                Conv2d::from_tensors(kvar.as_tensor().clone(), Some(bias.clone()), s, p)
                    .forward(xv)
                    .unwrap()
            },
            &x,
        );
    }
}

/// Classifier-free guidance with diffusers' guidance_rescale (both stds carry the gradient),
/// with respect to each branch, at no, partial and full rescale.
#[test]
fn guidance_with_rescale() {
    let u = randn(90, &[2, 3, 4, 5]);
    let c = (randn(91, &[2, 3, 4, 5]) * 1.7).unwrap();
    for r in [0.0, 0.7, 1.0] {
        assert_gradient(
            &format!("guidance, rescale {r}, wrt the negative's branch"),
            |u| reneg::guidance::guide(u, &c, 7.5, r).unwrap(),
            &u,
        );
        assert_gradient(
            &format!("guidance, rescale {r}, wrt the prompt's branch"),
            |c| reneg::guidance::guide(&u, c, 7.5, r).unwrap(),
            &c,
        );
    }
}

/// VideoCrafter2's denoiser: the video UNet with lvdm's frame-rate embedding added to the time
/// embedding (`UnetDenoiser::frame_rate`), wrt the text and the latents; and the rate changes
/// the output (a rate that did not reach the UNet would pass the gradient checks).
#[test]
fn video_unet_conditioned_on_frame_rate() {
    use reneg::conditioning::Conditioning;
    use reneg::family::roles::{Branch, Defaults, Denoiser};
    use reneg::family::sd::{FrameRate, UnetDenoiser};
    let vb = random_vb(140);
    let unet =
        reneg::models::unet::UNet2DConditionModel::new(tiny_video_unet_config(), &vb).unwrap();
    let frame_rate = FrameRate::new(8, 28.0, &vb.pp("fps_embedding")).unwrap();
    let mut d = UnetDenoiser {
        unet,
        controls: vec![],
        guess_mode: false,
        frame_rate: Some(frame_rate),
        defaults: Defaults::default(),
    };
    let ctx = randn(141, &[2, 5, 12]);
    let x = randn(142, &[2, 4, 3, 4, 4]);
    let run = |d: &UnetDenoiser, x: &Tensor, c: &Tensor| {
        let cond: Conditioning = c.clone().into();
        d.forward(x, 321.0, &cond, Branch::Both).unwrap()
    };
    assert_gradient("frame-rate denoiser wrt text", |c| run(&d, &x, c), &ctx);
    assert_gradient("frame-rate denoiser wrt sample", |s| run(&d, s, &ctx), &x);
    let at28 = run(&d, &x, &ctx);
    d.set_frame_rate(8.0).unwrap();
    let at8 = run(&d, &x, &ctx);
    let diff = max_abs(&(at28 - at8).unwrap());
    assert!(
        diff > 1e-3,
        "the frame rate does not change the output ({diff:e})"
    );
}

/// lvdm's DDIM (VideoCrafter2): x0 divided by scale_arr[t], from a schedule given as tables, at
/// a step below the t = 400 knee and one above it.
#[test]
fn lvdm_ddim_x0_with_scale_arr() {
    let base = SchedulerConfig::from_value(
        json!({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "uniform",
               "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false}),
        Path::new("<test>"),
    )
    .unwrap();
    let acp: Vec<f32> = Scheduler::ddim(base.clone())
        .unwrap()
        .alphas_cumprod()
        .to_vec();
    let scale: Vec<f32> = (0..1400)
        .map(|t| {
            if t < 400 {
                1.0 - 0.3 * t as f32 / 399.0
            } else {
                0.7
            }
        })
        .collect();
    let tables = reneg::scheduler::ProcessTables {
        alphas_cumprod: acp,
        scale: Some(scale),
    };
    let mut s = Scheduler::ddim(base.with_tables(tables, Path::new("<test>")).unwrap()).unwrap();
    s.set_timesteps(6).unwrap();
    for i in [1, 5] {
        let sample = randn(150, &[1, 4, 2, 2, 2]);
        let out = randn(151, &[1, 4, 2, 2, 2]);
        assert_gradient(
            &format!("lvdm ddim x0 at step {i} wrt model output"),
            |m| s.pred_original_sample(m, i, &sample).unwrap(),
            &out,
        );
        assert_gradient(
            &format!("lvdm ddim x0 at step {i} of a model on the sample, wrt sample"),
            |x| {
                let m = ((x.sin().unwrap() * 0.7).unwrap() + &out).unwrap();
                s.pred_original_sample(&m, i, x).unwrap()
            },
            &sample,
        );
    }
}

/// A tiny SDXL-style UNet: the first level without attention, two transformer layers in the
/// second (and the mid block), `text_time` added conditioning of a pooled embedding of 6.
fn tiny_sdxl_unet(seed: u64) -> reneg::models::unet::UNet2DConditionModel {
    let cfg = reneg::models::unet::UNetConfig::from_value(
        json!({
            "block_out_channels": [8, 16, 16],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "transformer_layers_per_block": [1, 1, 2],
            "attention_head_dim": [2, 2, 4],
            "norm_num_groups": 4,
            "cross_attention_dim": 12,
            "use_linear_projection": true,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 30,
            "in_channels": 4,
            "out_channels": 4
        }),
        Path::new("<test sdxl unet config>"),
    )
    .unwrap();
    reneg::models::unet::UNet2DConditionModel::new(cfg, &random_vb(seed)).unwrap()
}

/// The nearest resize to a skip's size (diffusers' `forward_upsample_size`): odd sizes, up
/// and by non-integer factors.
#[test]
fn nearest_resize_to_any_size() {
    for (i, (h, w, oh, ow)) in [(3, 4, 5, 7), (2, 3, 4, 6), (4, 4, 7, 9)]
        .into_iter()
        .enumerate()
    {
        assert_gradient(
            &format!("upsample_nearest_to {h}x{w} -> {oh}x{ow}"),
            |x| nn::upsample_nearest_to(x, oh, ow).unwrap(),
            &randn(160 + i as u64, &[1, 2, h, w]),
        );
    }
}

/// SDXL's added conditioning (pooled text and size ids through `add_embedding`), and the
/// whole SDXL denoiser at an odd latent size wrt both parts of the conditioning and the
/// latents; the size ids change the output.
#[test]
fn sdxl_text_time_embedding_and_denoiser() {
    use reneg::conditioning::Conditioning;
    use reneg::family::roles::{Branch, Denoiser, SizeConditioning};
    use reneg::family::sdxl::SdxlDenoiser;
    let unet = tiny_sdxl_unet(170);
    let ids = [
        [40.0, 56.0, 0.0, 0.0, 40.0, 56.0],
        [96.0, 80.0, 8.0, 4.0, 40.0, 56.0],
    ];
    assert_gradient(
        "sdxl text_time embedding wrt pooled",
        |p| unet.text_time_embedding(p, &ids).unwrap(),
        &randn(171, &[2, 6]),
    );
    let mut d = SdxlDenoiser {
        unet,
        sizes: SizeConditioning::default(),
        vae_scale: 8,
    };
    let (ctx, pooled) = (randn(172, &[2, 5, 12]), randn(173, &[2, 6]));
    let x = randn(174, &[2, 4, 5, 7]);
    let run = |d: &SdxlDenoiser, x: &Tensor, c: &Tensor, p: &Tensor| {
        let cond = Conditioning {
            embeds: c.clone(),
            pooled: Some(p.clone()),
            mask: None,
        };
        d.forward(x, 321.0, &cond, Branch::Both).unwrap()
    };
    assert_gradient(
        "sdxl denoiser (5x7) wrt text",
        |c| run(&d, &x, c, &pooled),
        &ctx,
    );
    assert_gradient(
        "sdxl denoiser (5x7) wrt pooled",
        |p| run(&d, &x, &ctx, p),
        &pooled,
    );
    assert_gradient(
        "sdxl denoiser (5x7) wrt sample",
        |s| run(&d, s, &ctx, &pooled),
        &x,
    );
    let plain = run(&d, &x, &ctx, &pooled);
    d.sizes = SizeConditioning {
        original: Some((96, 80)),
        target: None,
        crops_top_left: (8, 4),
    };
    let sized = run(&d, &x, &ctx, &pooled);
    let diff = max_abs(&(plain - sized).unwrap());
    assert!(
        diff > 1e-3,
        "the size ids do not change the output ({diff:e})"
    );
}

/// A tiny PixArt-α transformer (`sample_size` 8, or 128 for the 1024 model's resolution and
/// aspect-ratio conditions; 3 heads of 4: the size embedders take a third of 12, the sin-cos
/// table a quarter).
fn tiny_pixart(seed: u64, sample_size: usize) -> reneg::models::pixart::PixArtTransformer2DModel {
    use reneg::models::pixart::{PixArtConfig, PixArtTransformer2DModel};
    let cfg: PixArtConfig = serde_json::from_value(json!({
        "num_attention_heads": 3,
        "attention_head_dim": 4,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 2,
        "sample_size": sample_size,
        "patch_size": 2,
        "caption_channels": 5,
        "cross_attention_dim": 12
    }))
    .unwrap();
    PixArtTransformer2DModel::new(cfg, &random_vb(seed)).unwrap()
}

/// PixArt's denoiser (patch embedding and position table, adaLN-single, the caption
/// projection, self-attention, the masked cross-attention, the modulated output and
/// unpatchify, the learned variance left out) wrt the caption and the latents, with and
/// without the 1024 model's conditions; rows the mask leaves out get no gradient.
#[test]
fn pixart_denoiser_wrt_caption_and_latents() {
    use reneg::conditioning::Conditioning;
    use reneg::family::pixart::PixArtDenoiser;
    use reneg::family::roles::{Branch, Denoiser};
    let mask = Tensor::from_vec(
        vec![1.0f64, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        (2, 5),
        &Device::Cpu,
    )
    .unwrap();
    for (seed, size) in [(180u64, 8usize), (190, 128)] {
        let d = PixArtDenoiser {
            transformer: tiny_pixart(seed, size),
            vae_scale: 8,
        };
        let run = |x: &Tensor, c: &Tensor| {
            let cond = Conditioning {
                embeds: c.clone(),
                pooled: None,
                mask: Some(mask.clone()),
            };
            d.forward(x, 421.0, &cond, Branch::Both).unwrap()
        };
        let (x, c) = (randn(seed + 1, &[2, 4, 4, 6]), randn(seed + 2, &[2, 5, 5]));
        assert_eq!(
            run(&x, &c).dims(),
            &[2, 4, 4, 6],
            "the variance half is left out"
        );
        assert_gradient(
            &format!("pixart denoiser (sample_size {size}) wrt caption"),
            |c| run(&x, c),
            &c,
        );
        assert_gradient(
            &format!("pixart denoiser (sample_size {size}) wrt latents"),
            |x| run(x, &c),
            &x,
        );
        // Masked rows: nothing flows back to them.
        let cv = candle_core::Var::from_tensor(&c).unwrap();
        let g = run(&x, cv.as_tensor())
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(cv.as_tensor()).unwrap();
        let outside = g
            .broadcast_mul(&(1.0 - &mask).unwrap().unsqueeze(2).unwrap())
            .unwrap();
        assert_eq!(
            common::max_abs(&outside),
            0.0,
            "gradient on masked caption rows"
        );
    }
}
