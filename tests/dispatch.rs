//! The one place that decides how ops run (`nn::dispatch`), the device-generic path it picks
//! off the fused CPU kernels (what CUDA runs), and activation checkpointing (`nn::attach`).
//!
//! The whole gradient-check and parity suites also run with `RENEG_KERNELS=generic` in CI
//! (`.ci/run`); here the two kernel choices are compared op by op in one process.

mod common;

use candle_core::{DType, Tensor, Var};
use common::*;
use reneg::nn::dispatch::{self, plan, with_kernels, Grad, Kernels};
use reneg::nn::{self, Conv2d, GroupNorm, LayerNorm, Linear};

fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

#[test]
fn plan_decides_from_device_dtype_weights_and_graph() {
    let x = randn(1, &[2, 3]);
    let w = randn(2, &[3, 3]);
    let (xv, wv) = (var(&x), var(&w));
    let f32x = x.to_dtype(DType::F32).unwrap();
    let f16x = x.to_dtype(DType::F16).unwrap();
    // The auto cases under `auto` whatever RENEG_KERNELS says (CI runs this file both ways).
    let plan = |i: &[&Tensor], w: &[&Tensor]| with_kernels(Kernels::Auto, || plan(i, w));
    let cases = [
        ("f64, no graph", plan(&[&x], &[&w]), true, Grad::None),
        (
            "input on a graph",
            plan(&[xv.as_tensor()], &[&w]),
            true,
            Grad::InputOnly,
        ),
        (
            "input computed from a var",
            plan(&[&(xv.as_tensor() * 2.0).unwrap()], &[&w]),
            true,
            Grad::InputOnly,
        ),
        (
            "trainable weight",
            plan(&[&x], &[wv.as_tensor()]),
            true,
            Grad::All,
        ),
        (
            "f32 in and weights f64",
            plan(&[&f32x], &[&w]),
            false,
            Grad::None,
        ),
        ("f16", plan(&[&f16x], &[]), false, Grad::None),
        (
            "f32 in and out",
            plan(&[&f32x], &[&w.to_dtype(DType::F32).unwrap()]),
            true,
            Grad::None,
        ),
        (
            "generic forced",
            with_kernels(Kernels::Generic, || {
                dispatch::plan(&[xv.as_tensor()], &[&w])
            }),
            false,
            Grad::InputOnly,
        ),
    ];
    for (name, p, fused, grad) in cases {
        assert_eq!((p.fused, p.grad), (fused, grad), "{name}");
    }
    // with_kernels restores the previous choice, also after a nested one.
    let before = dispatch::kernels();
    with_kernels(Kernels::Generic, || {
        with_kernels(Kernels::Auto, || {
            assert_eq!(dispatch::kernels(), Kernels::Auto)
        });
        assert_eq!(dispatch::kernels(), Kernels::Generic);
    });
    assert_eq!(dispatch::kernels(), before);
    assert_eq!(Kernels::parse("GENERIC"), Some(Kernels::Generic));
    assert_eq!(Kernels::parse("auto"), Some(Kernels::Auto));
    assert_eq!(Kernels::parse("fast"), None);
}

/// Output and input gradient of `f` at `x` under the given kernels (f64).
fn run(k: Kernels, f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor) -> (Tensor, Tensor) {
    with_kernels(k, || {
        let y = f(&x.clone());
        let g = analytic_grad(&|t: &Tensor| f(t), x, 7);
        (y, g)
    })
}

/// Every op with a fused CPU kernel gives the same output and input gradient through the
/// device-generic path (which has its own closed-form backward for norms, GELU, GEGLU and the
/// recomputing attention, and the input-only conv gradient as a convolution).
#[test]
fn generic_path_matches_the_fused_kernels_op_by_op() {
    let vb = random_vb(30);
    let conv3 = Conv2d::new(4, 6, 3, 1, 1, &vb.pp("c3")).unwrap();
    let conv_s2 = Conv2d::new(4, 5, 3, 2, 0, &vb.pp("c2")).unwrap();
    let lin = Linear::new(8, 5, true, &vb.pp("lin")).unwrap();
    let gn = GroupNorm::new(2, 4, 1e-6, &vb.pp("gn")).unwrap();
    let img = (randn(31, &[2, 4, 7, 6]) * 1.5).unwrap();
    let seq = (randn(32, &[2, 5, 8]) * 2.0).unwrap();
    let qkv = randn(33, &[2, 9, 24]);
    type Op<'a> = (&'a str, Box<dyn Fn(&Tensor) -> Tensor + 'a>, &'a Tensor);
    let ops: Vec<Op> = vec![
        ("conv 3x3", Box::new(|x| conv3.forward(x).unwrap()), &img),
        (
            "conv stride 2",
            Box::new(|x| conv_s2.forward(x).unwrap()),
            &img,
        ),
        ("linear", Box::new(|x| lin.forward(x).unwrap()), &seq),
        ("group norm", Box::new(|x| gn.forward(x).unwrap()), &img),
        (
            "group norm + silu",
            Box::new(|x| gn.forward_silu(x).unwrap()),
            &img,
        ),
        (
            "gelu",
            Box::new(|x| nn::activation::gelu_erf(x).unwrap()),
            &seq,
        ),
        (
            "geglu",
            Box::new(|x| nn::activation::geglu(x).unwrap()),
            &seq,
        ),
        (
            "gelu tanh",
            Box::new(|x| nn::activation::gelu_tanh(x).unwrap()),
            &seq,
        ),
        (
            "attention, 3 heads, blocks of 2 queries",
            Box::new(|x| {
                let (q, k, v) = (
                    x.narrow(2, 0, 6).unwrap(),
                    x.narrow(2, 6, 6).unwrap(),
                    x.narrow(2, 12, 6).unwrap(),
                );
                nn::attention_blocked(&q, &k, &v, 3, None, 2 * 3 * 2 * 9).unwrap()
            }),
            &qkv,
        ),
    ];
    for (name, f, x) in &ops {
        let (y_fused, g_fused) = run(Kernels::Auto, f.as_ref(), x);
        let (y_generic, g_generic) = run(Kernels::Generic, f.as_ref(), x);
        assert_eq!(y_fused.dims(), y_generic.dims(), "{name}");
        let ey = max_abs_diff(&y_fused, &y_generic) / (1.0 + max_abs(&y_fused));
        let eg = max_abs_diff(&g_fused, &g_generic) / (1.0 + max_abs(&g_fused));
        println!("auto vs generic {name:<40} output {ey:.1e} input gradient {eg:.1e}");
        // Measured: at most 4.5e-16 (summation orders differ, nothing else).
        assert!(ey < 1e-14, "{name}: outputs differ by {ey:e}");
        assert!(eg < 1e-14, "{name}: input gradients differ by {eg:e}");
        assert!(
            max_abs(&g_fused) > 1e-3,
            "{name}: a vanishing gradient tests nothing"
        );
    }
}

/// Layer norm has one path on both kernel choices (no fused CPU kernel), so comparing them
/// checks nothing: its closed-form input gradient is checked here against candle's autograd of
/// the textbook formula, (x - mean) / sqrt(var + eps) * w + b, under both choices.
#[test]
fn layer_norm_closed_form_gradient_matches_autograd_of_the_formula() {
    let vb = random_vb(34);
    let ln = LayerNorm::new(8, 1e-5, &vb.pp("ln")).unwrap();
    let (w, b) = (randn(35, &[8]), randn(36, &[8]));
    let ln_wb = LayerNorm::from_tensors(w.clone(), b.clone(), 1e-5);
    let x = (randn(37, &[2, 5, 8]) * 2.0).unwrap();
    let g = randn(38, &[2, 5, 8]);
    let textbook = |x: &Tensor| -> Tensor {
        let mean = x.mean_keepdim(2).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(2).unwrap();
        c.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
    };
    // f(x) and d <f(x), g> / dx.
    let value_and_grad = |f: &dyn Fn(&Tensor) -> Tensor| -> (Tensor, Tensor) {
        let xv = var(&x);
        let y = f(xv.as_tensor());
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(xv.as_tensor()).unwrap().clone();
        (y, dx)
    };
    // By candle's own backward of the formula: no attach op on this path.
    let (want_y, want_g) = value_and_grad(&textbook);
    for k in [Kernels::Auto, Kernels::Generic] {
        with_kernels(k, || {
            let (y, got) = value_and_grad(&|x| ln_wb.forward(x).unwrap());
            let ey = max_abs_diff(&y, &want_y) / max_abs(&want_y);
            let eg = max_abs_diff(&got, &want_g) / max_abs(&want_g);
            println!("{k:?} layer norm vs autograd of the formula: output {ey:.1e}, input gradient {eg:.1e}");
            // Measured: 7.5e-17 and 1.8e-16 (f64 rounding of two summation orders).
            assert!(
                ey < 1e-15 && eg < 2e-15,
                "{k:?}: output {ey:e}, gradient {eg:e}"
            );
        });
    }
    // And the layer with the file's weights: its finite-difference check.
    assert_gradient("layer norm", |x| ln.forward(x).unwrap(), &x);
}

/// The generic path on an f32 model (what a GPU runs in f32) against the fused one: same
/// gradient to f32 rounding through a whole tiny UNet with respect to the context.
#[test]
fn generic_unet_gradient_matches_fused_in_f32() {
    let unet = reneg::models::unet::UNet2DConditionModel::new(
        tiny_unet_config(false),
        &random_vb_dtype(40, DType::F32),
    )
    .unwrap();
    let x = randn(41, &[1, 4, 8, 8]).to_dtype(DType::F32).unwrap();
    let ctx = randn(42, &[1, 5, 12]);
    let f = |c: &Tensor| {
        unet.forward(&x, 500.0, &c.to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (y_a, g_a) = run(Kernels::Auto, &f, &ctx);
    let (y_g, g_g) = run(Kernels::Generic, &f, &ctx);
    let ey = max_abs_diff(&y_a, &y_g) / max_abs(&y_a);
    let eg = max_abs_diff(&g_a, &g_g) / max_abs(&g_a);
    println!("f32 UNet auto vs generic: output {ey:.1e}, gradient wrt context {eg:.1e}");
    // Measured: 7.8e-7 and 3.0e-6 (f32 rounding of two summation orders).
    assert!(ey < 5e-6 && eg < 3e-5, "output {ey:e}, gradient {eg:e}");
}

/// Checkpointed UNet layers and VAE decoder blocks give the gradients of the plain graph
/// (the same ops run again in the backward), under both kernel choices.
#[test]
fn checkpointing_keeps_the_gradients() {
    let mut unet = tiny_unet(50, false);
    let mut vae = tiny_vae(51);
    let x = randn(52, &[2, 4, 8, 8]);
    let ctx = randn(53, &[2, 5, 12]);
    let z = randn(54, &[1, 4, 4, 4]);
    for k in [Kernels::Auto, Kernels::Generic] {
        let mut results = vec![];
        for on in [false, true] {
            unet.set_checkpointing(on);
            vae.set_checkpointing(on);
            assert_eq!((unet.checkpointing(), vae.checkpointing()), (on, on));
            let (yu, gu) = run(k, &|c| unet.forward(&x, 300.0, c).unwrap(), &ctx);
            let (yv, gv) = run(k, &|z| vae.decode(z).unwrap(), &z);
            results.push((yu, gu, yv, gv));
        }
        let (plain, ckpt) = (&results[0], &results[1]);
        for (name, a, b) in [
            ("unet output", &plain.0, &ckpt.0),
            ("unet gradient wrt context", &plain.1, &ckpt.1),
            ("decoder output", &plain.2, &ckpt.2),
            ("decoder gradient wrt latents", &plain.3, &ckpt.3),
        ] {
            let e = max_abs_diff(a, b) / max_abs(a);
            // Measured: 0 to 2.0e-15 (the recomputed block adds its gradient in another order).
            assert!(e < 2e-14, "{k:?} {name}: checkpointed differs by {e:e}");
            assert!(max_abs(a) > 1e-6, "{name}: nothing to compare");
        }
    }
    unet.set_checkpointing(true);
    assert_gradient(
        "checkpointed unet wrt context",
        |c| unet.forward(&x, 300.0, c).unwrap(),
        &ctx,
    );
    assert_gradient(
        "checkpointed unet wrt latents",
        |x| unet.forward(x, 300.0, &ctx).unwrap(),
        &x,
    );
}

/// The graph one forward leaves for its backward: (nodes, bytes of their values).
fn graph_held(y: &Tensor) -> (usize, usize) {
    let nodes = y.sorted_nodes();
    let bytes = nodes
        .iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    (nodes.len(), bytes)
}

/// What checkpointing is for (its gradients are those of the plain graph, above): the graph
/// kept between the forward and the backward is smaller, and the backward recomputes every
/// block the forward checkpointed, once. Catches checkpointing that calls the block directly.
#[test]
fn checkpointing_keeps_a_smaller_graph_and_recomputes_each_block() {
    let mut unet = tiny_unet(50, false);
    let mut vae = tiny_vae(51);
    let x = randn(52, &[2, 4, 8, 8]);
    let ctx = var(&randn(53, &[2, 5, 12]));
    let z = var(&randn(54, &[1, 4, 4, 4]));
    for k in [Kernels::Auto, Kernels::Generic] {
        // Per network and setting: (nodes, bytes, blocks checkpointed, blocks recomputed).
        let mut seen: Vec<[(usize, usize, u64, u64); 2]> = vec![];
        for on in [false, true] {
            unet.set_checkpointing(on);
            vae.set_checkpointing(on);
            let forwards: [&dyn Fn() -> Tensor; 2] = [
                &|| unet.forward(&x, 300.0, ctx.as_tensor()).unwrap(),
                &|| vae.decode(z.as_tensor()).unwrap(),
            ];
            for (n, forward) in forwards.iter().enumerate() {
                with_kernels(k, || {
                    let (k0, r0) = nn::attach::checkpoint_counts();
                    let y = forward();
                    let (k1, r1) = nn::attach::checkpoint_counts();
                    let (nodes, bytes) = graph_held(&y);
                    y.sum_all().unwrap().backward().unwrap();
                    let (k2, r2) = nn::attach::checkpoint_counts();
                    assert_eq!((r1, k2), (r0, k1), "recomputed in the forward");
                    if seen.len() <= n {
                        seen.push([(0, 0, 0, 0); 2]);
                    }
                    seen[n][usize::from(on)] = (nodes, bytes, k1 - k0, r2 - r1);
                });
            }
        }
        for (name, [plain, ckpt]) in ["unet", "vae decoder"].iter().zip(&seen) {
            println!(
                "{k:?} {name}: graph held {} nodes / {} bytes plain, {} / {} checkpointed; {} blocks checkpointed, {} recomputed",
                plain.0, plain.1, ckpt.0, ckpt.1, ckpt.2, ckpt.3
            );
            assert_eq!((plain.2, plain.3), (0, 0), "{name}: checkpointing off");
            assert!(ckpt.2 > 0, "{name}: no block checkpointed");
            assert_eq!(
                ckpt.3, ckpt.2,
                "{name}: each checkpointed block recomputed once"
            );
            // Measured: the UNet keeps 19 of 346 nodes (164,800 of 2,631,616 bytes) with the
            // fused kernels, 23 of 415 generic; the decoder 14 of 70 (32,256 of 114,176
            // bytes) and 18 of 125: at least 5x fewer nodes and 3.5x fewer bytes.
            assert!(
                ckpt.0 * 4 < plain.0 && ckpt.1 * 3 < plain.1,
                "{name}: the checkpointed graph is not smaller: {ckpt:?} vs {plain:?}"
            );
        }
    }
}

/// A block with trainable weights is not checkpointed (that would drop the weights'
/// gradients): the weight still gets its gradient.
#[test]
fn checkpoint_keeps_weight_gradients_of_trainable_blocks() {
    let w = var(&randn(60, &[3, 3]));
    let x = var(&randn(61, &[2, 3]));
    let wt = w.as_tensor().clone();
    let y = nn::attach::checkpoint(x.as_tensor(), move |x| x.matmul(&wt)?.tanh()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let gw = grads.get(w.as_tensor()).expect("the weight's gradient");
    let want = {
        let y = x.as_tensor().matmul(w.as_tensor()).unwrap().tanh().unwrap();
        y.sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(w.as_tensor())
            .unwrap()
            .clone()
    };
    assert!(max_abs_diff(gw, &want) < 1e-14);
    assert!(grads.get(x.as_tensor()).is_some());
}

/// Padding wider than the kernel (k = 1, p = 2; k = 3, p = 3, stride 2): the input gradient's
/// shift is a crop, not an underflow, on both paths.
#[test]
fn conv_input_gradient_with_padding_wider_than_the_kernel() {
    let vb = random_vb(70);
    for (k, s, p) in [(1, 1, 2), (3, 2, 3)] {
        let conv = Conv2d::new(2, 3, k, s, p, &vb.pp(format!("k{k}p{p}"))).unwrap();
        let x = randn(71, &[1, 2, 5, 6]);
        for kernels in [Kernels::Auto, Kernels::Generic] {
            with_kernels(kernels, || {
                assert_gradient(
                    &format!("conv k{k} s{s} p{p} {kernels:?}"),
                    |x| conv.forward(x).unwrap(),
                    &x,
                )
            });
        }
    }
}
