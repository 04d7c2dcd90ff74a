//! The CPU kernels of `nn::cpu_conv` against candle's own conv2d and the flipped-kernel
//! transposed convolution (slow but independent), over kernel sizes, strides, paddings, tilings.

mod common;

use candle_core::DType;
use common::{max_abs, max_abs_diff, randn};
use reneg::nn::cpu_conv;

/// (c_in, c_out, k, stride, padding, h, w)
const GEOMETRIES: [(usize, usize, usize, usize, usize, usize, usize); 8] = [
    (3, 4, 3, 1, 1, 5, 6),
    (3, 5, 1, 1, 0, 4, 3),
    (2, 3, 1, 2, 0, 7, 5),
    (3, 4, 3, 2, 1, 7, 6),
    (4, 2, 3, 2, 0, 8, 9),
    (3, 4, 3, 1, 0, 6, 5),
    (2, 3, 5, 3, 2, 11, 10),
    (5, 6, 3, 1, 1, 1, 1),
];

#[test]
fn conv_forward_and_input_gradient_match_candle_for_every_tiling() {
    for (i, &(ci, co, k, s, p, h, w)) in GEOMETRIES.iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let x = randn(seed, &[2, ci, h, w]);
        let kernel = randn(seed + 1, &[co, ci, k, k]);
        let bias = randn(seed + 2, &[co]);
        let reference = x
            .conv2d(&kernel, p, s, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
            .unwrap();
        let (oh, ow) = (reference.dim(2).unwrap(), reference.dim(3).unwrap());
        let dy = randn(seed + 3, &[2, co, oh, ow]);
        // The transposed convolution as a convolution of the dilated, padded gradient with
        // the flipped kernel (candle's conv2d; candle's own conv2d backward returns a wrong
        // shape for strided 1x1 kernels on odd sizes).
        let dx_ref = reneg::nn::conv::conv2d_input_grad(&dy, &kernel, p, s, h, w).unwrap();
        // Budgets from one output pixel per tile to the whole image in one tile.
        for budget in [1, ci * k * k * 3, usize::MAX / 2] {
            let name = format!("k{k} s{s} p{p} {h}x{w} budget {budget}");
            let out = cpu_conv::forward_tiled(&x, &kernel, Some(&bias), p, s, budget).unwrap();
            assert_eq!(out.dims(), reference.dims(), "{name}");
            let e = max_abs_diff(&out, &reference) / max_abs(&reference);
            assert!(e < 1e-12, "forward {name}: relative error {e:e}");
            let dx = cpu_conv::input_grad_tiled(&dy, &kernel, p, s, (h, w), budget).unwrap();
            assert_eq!(dx.dims(), x.dims(), "{name}");
            let e = max_abs_diff(&dx, &dx_ref) / max_abs(&dx_ref);
            assert!(e < 1e-12, "input gradient {name}: relative error {e:e}");
        }
        // No bias, f32.
        let x32 = x.to_dtype(DType::F32).unwrap();
        let k32 = kernel.to_dtype(DType::F32).unwrap();
        let out = cpu_conv::forward(&x32, &k32, None, p, s).unwrap();
        let r32 = x32.conv2d(&k32, p, s, 1, 1).unwrap();
        let e = max_abs_diff(&out, &r32) / max_abs(&r32);
        assert!(e < 1e-5, "f32 forward k{k} s{s} p{p}: relative error {e:e}");
    }
}

/// (c_in, c_out, padding, h, w): odd sizes, sizes not a multiple of the 4x4 output block,
/// one pixel, every padding Winograd takes.
const WINOGRAD_GEOMETRIES: [(usize, usize, usize, usize, usize); 6] = [
    (3, 4, 1, 5, 6),
    (5, 3, 0, 9, 7),
    (4, 6, 2, 6, 6),
    (2, 3, 1, 13, 11),
    (3, 2, 1, 1, 1),
    (6, 5, 0, 3, 4),
];

#[test]
fn winograd_forward_and_input_gradient_match_candle_for_every_chunking() {
    for (i, &(ci, co, p, h, w)) in WINOGRAD_GEOMETRIES.iter().enumerate() {
        let seed = 300 + 10 * i as u64;
        let x = randn(seed, &[2, ci, h, w]);
        let kernel = randn(seed + 1, &[co, ci, 3, 3]);
        let bias = randn(seed + 2, &[co]);
        let reference = x
            .conv2d(&kernel, p, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
            .unwrap();
        let (oh, ow) = (reference.dim(2).unwrap(), reference.dim(3).unwrap());
        let dy = randn(seed + 3, &[2, co, oh, ow]);
        let dx_ref = reneg::nn::conv::conv2d_input_grad(&dy, &kernel, p, 1, h, w).unwrap();
        // From one 4x4 block per chunk to the whole image in one chunk.
        for budget in [1, 36 * (ci + co) * 2, usize::MAX / 2] {
            let name = format!("p{p} {ci}->{co} {h}x{w} budget {budget}");
            let algo = cpu_conv::Algo::Winograd;
            let out = cpu_conv::forward_algo(&x, &kernel, Some(&bias), p, 1, budget, algo).unwrap();
            assert_eq!(out.dims(), reference.dims(), "{name}");
            let e = max_abs_diff(&out, &reference) / max_abs(&reference);
            assert!(e < 1e-12, "winograd forward {name}: relative error {e:e}");
            let dx = cpu_conv::input_grad_algo(&dy, &kernel, p, 1, (h, w), budget, algo).unwrap();
            assert_eq!(dx.dims(), x.dims(), "{name}");
            let e = max_abs_diff(&dx, &dx_ref) / max_abs(&dx_ref);
            assert!(
                e < 1e-12,
                "winograd input gradient {name}: relative error {e:e}"
            );
        }
    }
}

/// Winograd's transforms (coefficients up to 8 and 1/24) cost precision; in f32, at the
/// channel counts and image sizes where `Auto` picks it, its error against an f64 reference
/// stays within a small factor of im2col's.
#[test]
fn winograd_f32_rounding_is_close_to_im2col() {
    let (ci, co, h, w) = (128, 64, 36, 34);
    assert!(cpu_conv::auto_picks_winograd(
        (1, ci, h, w),
        (co, ci, 3, 3),
        1,
        1
    ));
    let x = randn(400, &[1, ci, h, w]);
    let kernel = (randn(401, &[co, ci, 3, 3]) * (1.0 / (9.0 * ci as f64)).sqrt()).unwrap();
    let reference = x.conv2d(&kernel, 1, 1, 1, 1).unwrap();
    let (x32, k32) = (
        x.to_dtype(DType::F32).unwrap(),
        kernel.to_dtype(DType::F32).unwrap(),
    );
    let err = |algo| {
        let out = cpu_conv::forward_algo(&x32, &k32, None, 1, 1, 1 << 22, algo).unwrap();
        let out = out.to_dtype(DType::F64).unwrap();
        max_abs_diff(&out, &reference) / max_abs(&reference)
    };
    let (wino, direct) = (err(cpu_conv::Algo::Winograd), err(cpu_conv::Algo::Im2col));
    println!("f32 max rel err: winograd {wino:.2e}, im2col {direct:.2e}");
    assert!(wino < 1e-5, "winograd f32 error {wino:e}");
    assert!(
        wino < 20.0 * direct,
        "winograd {wino:e} vs im2col {direct:e}"
    );
}

#[test]
fn winograd_refuses_what_it_cannot_compute() {
    let x = randn(410, &[1, 2, 8, 8]);
    let algo = cpu_conv::Algo::Winograd;
    for (k, s, p) in [(3, 2, 1), (1, 1, 0), (5, 1, 2), (3, 1, 3)] {
        let kernel = randn(411, &[2, 2, k, k]);
        assert!(
            cpu_conv::forward_algo(&x, &kernel, None, p, s, 1 << 20, algo).is_err(),
            "k{k} s{s} p{p}"
        );
    }
}

/// dW[o, c, i, j] = sum over images and output pixels of dy[b, o, y, x] * x[b, c, y*s+i-p, x*s+j-p],
/// written out as loops: an independent reference for the kernel gradient.
fn naive_weight_grad(
    x: &candle_core::Tensor,
    dy: &candle_core::Tensor,
    k: usize,
    s: usize,
    p: usize,
) -> Vec<f64> {
    let (b, ci, h, w) = x.dims4().unwrap();
    let (_, co, oh, ow) = dy.dims4().unwrap();
    let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let gs: Vec<f64> = dy.flatten_all().unwrap().to_vec1().unwrap();
    let mut dw = vec![0f64; co * ci * k * k];
    for bi in 0..b {
        for o in 0..co {
            for c in 0..ci {
                for i in 0..k {
                    for j in 0..k {
                        let mut acc = 0.0;
                        for y in 0..oh {
                            for xx in 0..ow {
                                let (iy, ix) = (
                                    (y * s + i) as isize - p as isize,
                                    (xx * s + j) as isize - p as isize,
                                );
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                acc += gs[((bi * co + o) * oh + y) * ow + xx]
                                    * xs[((bi * ci + c) * h + iy as usize) * w + ix as usize];
                            }
                        }
                        dw[((o * ci + c) * k + i) * k + j] += acc;
                    }
                }
            }
        }
    }
    dw
}

#[test]
fn conv_weight_gradient_matches_the_written_out_sum_for_every_tiling() {
    for (i, &(ci, co, k, s, p, h, w)) in GEOMETRIES.iter().enumerate() {
        let seed = 300 + 10 * i as u64;
        let x = randn(seed, &[2, ci, h, w]);
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let dy = randn(seed + 3, &[2, co, oh, ow]);
        let want = naive_weight_grad(&x, &dy, k, s, p);
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for budget in [1, ci * k * k * 3, usize::MAX / 2] {
            let got = cpu_conv::weight_grad_tiled(&x, &dy, (co, ci, k, k), p, s, budget).unwrap();
            assert_eq!(got.dims(), &[co, ci, k, k]);
            let got: Vec<f64> = got.flatten_all().unwrap().to_vec1().unwrap();
            let e = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(
                e < 1e-12,
                "weight gradient k{k} s{s} p{p} {h}x{w} budget {budget}: {e:e}"
            );
        }
    }
    // A gradient of the wrong shape is an error, not a panic.
    let x = randn(1, &[1, 2, 4, 4]);
    assert!(cpu_conv::weight_grad(&x, &randn(2, &[1, 3, 3, 3]), (3, 2, 3, 3), 1, 1).is_err());
}

#[test]
fn conv_rejects_kernels_that_do_not_fit() {
    let x = randn(1, &[1, 3, 2, 2]);
    let kernel = randn(2, &[4, 3, 5, 5]);
    assert!(cpu_conv::forward(&x, &kernel, None, 0, 1).is_err());
    let wrong_channels = randn(3, &[4, 2, 3, 3]);
    assert!(cpu_conv::forward(&x, &wrong_channels, None, 1, 1).is_err());
}

#[test]
fn fused_group_norm_matches_the_composed_ops() {
    use reneg::nn::GroupNorm;
    for (i, dims) in [vec![2, 6, 5, 4], vec![1, 8, 7], vec![3, 4, 1, 1]]
        .iter()
        .enumerate()
    {
        let c = dims[1];
        let gn = GroupNorm::new(2, c, 1e-5, &common::random_vb(200 + i as u64)).unwrap();
        // Non-zero mean and a large scale: the statistics must not lose digits.
        let x = ((randn(210 + i as u64, dims) * 30.0).unwrap() + 7.0).unwrap();
        let reference = gn.composed(&x).unwrap();
        let e = max_abs_diff(&gn.forward(&x).unwrap(), &reference) / max_abs(&reference);
        assert!(e < 1e-12, "{dims:?}: relative error {e:e}");
        let silu_ref = (&reference * reneg::nn::activation::sigmoid(&reference).unwrap()).unwrap();
        let e = max_abs_diff(&gn.forward_silu(&x).unwrap(), &silu_ref) / max_abs(&silu_ref);
        assert!(e < 1e-12, "{dims:?} + silu: relative error {e:e}");
        // f32 against the f64 reference.
        let x32 = x.to_dtype(DType::F32).unwrap();
        let gn32 = GroupNorm::new(
            2,
            c,
            1e-5,
            &common::random_vb_dtype(200 + i as u64, DType::F32),
        )
        .unwrap();
        let e = max_abs_diff(&gn32.forward_silu(&x32).unwrap(), &silu_ref) / max_abs(&silu_ref);
        assert!(e < 1e-5, "{dims:?} f32: relative error {e:e}");
    }
}

/// The one-pass layer norm (`nn::cpu_layer_norm`) of `LayerNorm` and of PixArt's modulated
/// norm (an affine per batch element) against candle's composed ops (`RENEG_KERNELS=generic`).
#[test]
fn fused_layer_norm_matches_the_composed_ops() {
    use reneg::nn::dispatch::{with_kernels, Kernels};
    use reneg::nn::norm::{layer_norm_modulated, LayerNorm};
    for (i, dims) in [vec![2, 5, 7], vec![3, 1, 16], vec![1, 4, 33]]
        .iter()
        .enumerate()
    {
        let (b, d, seed) = (dims[0], dims[2], 300 + 10 * i as u64);
        // Non-zero mean and a large scale: the statistics must not lose digits.
        let x = ((randn(seed, dims) * 30.0).unwrap() + 7.0).unwrap();
        let (shift, scale) = (randn(seed + 1, &[b, 1, d]), randn(seed + 2, &[b, 1, d]));
        let (w, bias) = (randn(seed + 3, &[d]), randn(seed + 4, &[d]));
        let ln = |w: &candle_core::Tensor, bias: &candle_core::Tensor| {
            LayerNorm::from_tensors(w.clone(), bias.clone(), 1e-5)
        };
        let modulated = |x: &candle_core::Tensor, sh: &candle_core::Tensor, sc| {
            layer_norm_modulated(x, sh, sc, 1e-6).unwrap()
        };
        let generic = |f: &dyn Fn() -> candle_core::Tensor| with_kernels(Kernels::Generic, f);
        let pairs = [
            (
                modulated(&x, &shift, &scale),
                generic(&|| modulated(&x, &shift, &scale)),
            ),
            (
                ln(&w, &bias).forward(&x).unwrap(),
                generic(&|| ln(&w, &bias).forward(&x).unwrap()),
            ),
        ];
        for (fused, composed) in &pairs {
            let e = max_abs_diff(fused, composed) / max_abs(composed);
            assert!(e < 1e-12, "{dims:?}: relative error {e:e}");
        }
        // f32 against the f64 reference.
        let f32 = |t: &candle_core::Tensor| t.to_dtype(DType::F32).unwrap();
        let got = modulated(&f32(&x), &f32(&shift), &f32(&scale));
        let e =
            max_abs_diff(&got.to_dtype(DType::F64).unwrap(), &pairs[0].1) / max_abs(&pairs[0].1);
        // Measured at most 1.2e-7 on these shapes.
        assert!(e < 1e-6, "{dims:?} f32: relative error {e:e}");
    }
}

#[test]
fn fused_softmax_matches_the_composed_ops() {
    for (i, dims) in [vec![2, 3, 7], vec![5, 1], vec![4, 6, 33]]
        .iter()
        .enumerate()
    {
        // Large logits: the row maximum must be subtracted.
        let x = (randn(300 + i as u64, dims) * 40.0).unwrap();
        let scale = 0.37;
        let reference = reneg::nn::softmax_last_dim(&(&x * scale).unwrap()).unwrap();
        let fused = reneg::nn::cpu_softmax::softmax_scaled(&x, scale)
            .unwrap()
            .unwrap();
        let e = max_abs_diff(&fused, &reference);
        assert!(e < 1e-14, "{dims:?}: max error {e:e}");
    }
}

#[test]
fn attention_in_query_blocks_equals_the_whole() {
    let (q, k, v) = (
        randn(400, &[2, 9, 8]),
        randn(401, &[2, 5, 8]),
        randn(402, &[2, 5, 8]),
    );
    let whole = reneg::nn::attention_blocked(&q, &k, &v, 2, None, usize::MAX).unwrap();
    for block in [1, 2 * 2 * 5 * 2, 2 * 2 * 5 * 4 + 3] {
        let blocked = reneg::nn::attention_blocked(&q, &k, &v, 2, None, block).unwrap();
        assert_eq!(blocked.dims(), whole.dims());
        let e = max_abs_diff(&blocked, &whole);
        assert!(e < 1e-14, "block {block}: {e:e}");
    }
}

/// The vectorisable f32 exp of the softmax and SiLU kernels against f64's exp: within 4 ulp
/// wherever the result is a normal f32, and the documented edges.
#[test]
fn fast_exp_is_within_a_few_ulp_of_exp() {
    use reneg::nn::exp_f32;
    let mut worst = 0f64;
    let steps = 2_000_000;
    for i in 0..=steps {
        let x = -86.6f32 + (88.7f32 + 86.6) * i as f32 / steps as f32;
        let want = (x as f64).exp();
        let got = exp_f32(x) as f64;
        worst = worst.max((got - want).abs() / want);
    }
    println!(
        "fast exp: max rel err {worst:.2e} ({:.2} ulp)",
        worst / f32::EPSILON as f64
    );
    assert!(worst < 4.0 * f32::EPSILON as f64, "max rel err {worst:e}");
    assert_eq!(exp_f32(0.0), 1.0);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-1000.0), 0.0);
    assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
    assert_eq!(exp_f32(89.0), f32::INFINITY);
    // The last finite results are computed, not cut off below ln(f32::MAX) = 88.7228.
    let near_max = exp_f32(88.722);
    assert!(((near_max as f64) / 88.722f64.exp() - 1.0).abs() < 4.0 * f32::EPSILON as f64);
    assert_eq!(exp_f32(88.7229), f32::INFINITY);
    assert!(exp_f32(f32::NAN).is_nan());
    // Flushed below 2.5e-38 only.
    assert!(exp_f32(-86.5) > 0.0);
}

/// The kernels are compiled once per instruction set (AVX-512, AVX2 + FMA, baseline) and
/// chosen at run time; every copy must give the same bits (no implicit contraction into FMAs, fixed
/// reduction order). Copies the CPU lacks are skipped (the level is capped).
#[test]
fn every_instruction_set_copy_gives_the_same_bits() {
    use reneg::nn::{cpu_norm, cpu_softmax, force_simd_level};
    let x = randn(500, &[2, 64, 36, 33]).to_dtype(DType::F32).unwrap();
    let kernel = (randn(501, &[32, 64, 3, 3]) * 0.05)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let w = randn(502, &[64]).to_dtype(DType::F32).unwrap();
    let b = randn(503, &[64]).to_dtype(DType::F32).unwrap();
    let dy = randn(504, &[2, 32, 36, 33]).to_dtype(DType::F32).unwrap();
    let run = || {
        let sm = cpu_softmax::softmax_scaled(&(&x * 3.0).unwrap(), 0.7)
            .unwrap()
            .unwrap();
        let gn = cpu_norm::group_norm(&x, 8, 1e-5, &w, &b, true).unwrap();
        let algo = cpu_conv::Algo::Winograd;
        let conv = cpu_conv::forward_algo(&x, &kernel, None, 1, 1, 1 << 20, algo).unwrap();
        let dx = cpu_conv::input_grad_algo(&dy, &kernel, 1, 1, (36, 33), 1 << 20, algo).unwrap();
        let im2col_dx = cpu_conv::input_grad_algo(
            &dy,
            &kernel,
            1,
            1,
            (36, 33),
            1 << 16,
            cpu_conv::Algo::Im2col,
        )
        .unwrap();
        [sm, gn, conv, dx, im2col_dx]
            .iter()
            .map(common::bits)
            .collect::<Vec<_>>()
    };
    force_simd_level(1);
    let baseline = run();
    for level in [3, 4] {
        force_simd_level(level);
        let got = run();
        for (k, (a, b)) in baseline.iter().zip(&got).enumerate() {
            assert!(
                a == b,
                "kernel {k}: level {level} differs from the baseline copy"
            );
        }
    }
    force_simd_level(4);
}

#[test]
fn in_place_softmax_equals_the_fused_one() {
    use reneg::nn::cpu_softmax;
    for dtype in [DType::F32, DType::F64] {
        let x = (randn(510, &[3, 5, 37]) * 4.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = cpu_softmax::softmax_scaled(&x, 0.3).unwrap().unwrap();
        let scratch = x.copy().unwrap();
        let got = cpu_softmax::softmax_scaled_in_place(scratch, 0.3)
            .unwrap()
            .unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{dtype:?}");
        // Not on a graph: a variable is left alone.
        let var = candle_core::Var::from_tensor(&x).unwrap();
        assert!(
            cpu_softmax::softmax_scaled_in_place(var.as_tensor().clone(), 0.3)
                .unwrap()
                .is_none()
        );
    }
}

/// The CPU attention kernel (scores in a reused buffer) against the composed ops, for every
/// block of queries from one row to the whole head, with the heads in turn or in parallel.
#[test]
fn cpu_attention_matches_the_composed_ops() {
    use reneg::nn::{cpu_attention, softmax_last_dim};
    let (q, k, v) = (
        randn(520, &[3, 11, 8]),
        randn(521, &[3, 7, 8]),
        randn(522, &[3, 7, 8]),
    );
    let scale = 0.35;
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let want = softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
    // 3 heads on 1 thread and on 4 (the parallelism inside each head), and on 2 (the heads
    // in parallel, each block of scores split between the threads).
    for threads in [1, 2, 4] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for rows in [1, 4, 11, 100] {
            let got = pool
                .install(|| cpu_attention::attention(&q, &k, &v, scale, rows))
                .unwrap()
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let e = max_abs_diff(&got, &want) / max_abs(&want);
            assert!(e < 1e-14, "{threads} threads, rows {rows}: {e:e}");
        }
    }
    let f32s = |t: &candle_core::Tensor| t.to_dtype(DType::F32).unwrap();
    let got = cpu_attention::attention(&f32s(&q), &f32s(&k), &f32s(&v), scale, 4)
        .unwrap()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    assert!(max_abs_diff(&got, &want) / max_abs(&want) < 1e-6);
}

/// The binary and the bench run their work inside a pool of the fixed thread count, with a
/// stack deep enough for autograd's recursive graph walk (rayon's own default is 2 MiB).
#[test]
fn work_runs_on_the_pool_with_a_deep_stack() {
    // Not fix_thread_count: it writes the environment, and other tests run beside this one.
    let threads = candle_core::utils::get_num_threads();
    assert!(threads >= 1);
    let (index, pool_threads, depth) = reneg::runtime::run_on_workers(|| {
        // 8192 frames of over 1 KiB: more than rayon's 2 MiB and the main thread's 8 MiB
        // (with either as the pool's stack, this overflows).
        fn deep(n: usize) -> usize {
            let pad = std::hint::black_box([n as u8; 1024]);
            if n == 0 {
                return 0;
            }
            let below = deep(n - 1);
            // Reading pad after the call keeps the frame (and its 1 KiB) alive across it.
            below + 1 + usize::from(std::hint::black_box(pad)[7] != n as u8)
        }
        (
            rayon::current_thread_index(),
            rayon::current_num_threads(),
            deep(8 * 1024),
        )
    });
    assert!(index.is_some(), "the work did not run on a pool thread");
    assert_eq!(pool_threads, threads);
    assert_eq!(depth, 8 * 1024);
}

/// Φ for f32 (GELU's gate) against libm's f64 erfc, over both tails: the negative tail is
/// computed directly (not as 1 + erf), so its relative error stays small too.
#[test]
fn fast_normal_cdf_is_close_to_the_exact_one() {
    use reneg::nn::normal_cdf_f32;
    // In the tail the exponent's argument -x²/2 carries f32's rounding (-36 at x = -8.5, off
    // by up to 36 * 6e-8), so the bound there is looser; even so it is far tighter
    // than 1 + erff(x) in f32, whose absolute error of about 6e-8 is a relative error of 2e-3
    // at x = -4.
    for (from, to, bound) in [
        (-3.0f32, 12.0f32, 1e-6),
        (-6.0, -3.0, 4e-6),
        (-12.0, -6.0, 2e-5),
    ] {
        let mut worst = 0f64;
        let steps = 200_000;
        for i in 0..=steps {
            let x = from + (to - from) * i as f32 / steps as f32;
            let want = 0.5 * libm::erfc(-(x as f64) * std::f64::consts::FRAC_1_SQRT_2);
            let got = normal_cdf_f32(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        println!("fast normal cdf on [{from}, {to}]: max rel err {worst:.2e}");
        assert!(worst < bound, "[{from}, {to}]: max rel err {worst:e}");
    }
    assert_eq!(normal_cdf_f32(f32::INFINITY), 1.0);
    assert_eq!(normal_cdf_f32(f32::NEG_INFINITY), 0.0);
    assert!(normal_cdf_f32(f32::NAN).is_nan());
}

/// The fused GELU and GEGLU in f32 against the composed ops in f64, and the f64 kernels
/// (libm's erfc) against the composed ops exactly enough to be the same function.
#[test]
fn fused_gelu_and_geglu_match_the_composed_ops() {
    use reneg::nn::cpu_gelu;
    let h64 = (randn(700, &[2, 5, 2 * 37]) * 3.0).unwrap();
    let composed_gelu = |x: &candle_core::Tensor| {
        let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)
            .unwrap()
            .erf()
            .unwrap()
            + 1.0)
            .unwrap();
        ((x * 0.5).unwrap() * cdf).unwrap()
    };
    let half = 37;
    let (a, b) = (
        h64.narrow(2, 0, half).unwrap(),
        h64.narrow(2, half, half).unwrap(),
    );
    let want_geglu = (a * composed_gelu(&b)).unwrap();
    let want_gelu = composed_gelu(&h64);
    // The tanh approximation written out (transformers' gelu_new).
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let u = (((h64.powf(3.0).unwrap() * 0.044715).unwrap() + &h64).unwrap() * k).unwrap();
    let want_tanh = ((&h64 * 0.5).unwrap() * (u.tanh().unwrap() + 1.0).unwrap()).unwrap();
    let h32 = h64.to_dtype(DType::F32).unwrap();
    for (name, got, want) in [
        ("gelu f64", cpu_gelu::gelu(&h64).unwrap(), &want_gelu),
        ("geglu f64", cpu_gelu::geglu(&h64).unwrap(), &want_geglu),
        ("gelu f32", cpu_gelu::gelu(&h32).unwrap(), &want_gelu),
        ("geglu f32", cpu_gelu::geglu(&h32).unwrap(), &want_geglu),
        (
            "gelu tanh f64",
            cpu_gelu::gelu_tanh(&h64).unwrap(),
            &want_tanh,
        ),
        (
            "gelu tanh f32",
            cpu_gelu::gelu_tanh(&h32).unwrap(),
            &want_tanh,
        ),
    ] {
        assert_eq!(got.dims(), want.dims(), "{name}");
        // Relative to the largest output (|geglu| reaches about 100 here).
        let size = 1.0 + max_abs(want);
        let err = max_abs_diff(&got.to_dtype(DType::F64).unwrap(), want) / size;
        let tol = if name.ends_with("f64") { 1e-14 } else { 1e-6 };
        assert!(
            err < tol,
            "{name}: max err {err:e} (relative to the largest output)"
        );
    }
    // An odd last dimension has no halves: an error, not a truncated product.
    let err = reneg::nn::activation::geglu(&randn(701, &[2, 5])).unwrap_err();
    assert!(err.to_string().contains("must be even"), "{err}");
}

/// The CPU linear forward (gemm onto the bias rows, or into an unfilled buffer without a
/// bias) against candle's matmul and broadcast add, including an empty input dimension (the
/// output is then the bias, or zeros) and no rows at all.
#[test]
fn cpu_linear_matches_matmul_plus_bias() {
    use candle_core::Tensor;
    use reneg::nn::cpu_linear::linear;
    for (i, (rows, k, n)) in [(5, 7, 3), (64, 33, 65), (1, 1, 1), (4, 0, 6), (0, 3, 2)]
        .into_iter()
        .enumerate()
    {
        let seed = 600 + 3 * i as u64;
        let x = randn(seed, &[rows, k]);
        let w = randn(seed + 1, &[k, n]);
        let b = randn(seed + 2, &[n]);
        let product = if k == 0 {
            Tensor::zeros((rows, n), DType::F64, &candle_core::Device::Cpu).unwrap()
        } else {
            x.matmul(&w).unwrap()
        };
        let with_bias = product.broadcast_add(&b).unwrap();
        for dtype in [DType::F64, DType::F32] {
            let (x, w, b) = (
                x.to_dtype(dtype).unwrap(),
                w.to_dtype(dtype).unwrap(),
                b.to_dtype(dtype).unwrap(),
            );
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for (got, want) in [
                (linear(&x, &w, Some(&b)).unwrap(), &with_bias),
                (linear(&x, &w, None).unwrap(), &product),
            ] {
                assert_eq!(got.dims(), want.dims(), "{rows}x{k}x{n}");
                let got = got.to_dtype(DType::F64).unwrap();
                if rows * n > 0 {
                    let e = max_abs_diff(&got, want) / (1.0 + max_abs(want));
                    assert!(e < tol, "{rows}x{k}x{n} {dtype:?}: {e:e}");
                }
            }
        }
    }
}

/// Frozen f32 weights packed once into the micro-kernel's panels (`nn::cpu_packed`): the
/// forward and the input gradient against f64 products of the same values, over shapes that
/// hit every edge of the tiling: rows below, at and past a 6-row strip, outputs below, at and
/// past a 64-wide panel, inputs and outputs over one and several 512-deep passes (the forward
/// runs over the inputs, the input gradient over the outputs), with and without a bias, on one
/// thread and on several.
/// Measured worst error (relative to 1 + the largest output): 4.7e-7; the bound is 1e-6.
#[test]
fn packed_linear_matches_f64_products() {
    use candle_core::{Tensor, Var};
    use reneg::nn::{dispatch, Linear};
    let shapes = [
        (1, 1, 1),
        (5, 3, 17),
        (6, 64, 64),
        (7, 513, 130),
        (64, 1030, 192),
        (130, 40, 65),
    ];
    let mut worst = 0f64;
    for (i, (rows, k, n)) in shapes.into_iter().enumerate() {
        let seed = 900 + 5 * i as u64;
        // f32 values, so that the f64 reference multiplies exactly what the kernel does.
        let f32_of = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (x, w, b, dy) = (
            f32_of(randn(seed, &[rows, k])),
            f32_of(randn(seed + 1, &[n, k])),
            f32_of(randn(seed + 2, &[n])),
            f32_of(randn(seed + 3, &[rows, n])),
        );
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let product = f64_of(&x).matmul(&f64_of(&w).t().unwrap()).unwrap();
        let input_grad = f64_of(&dy).matmul(&f64_of(&w)).unwrap();
        for bias in [None, Some(b.clone())] {
            let layer = dispatch::with_kernels(dispatch::Kernels::Auto, || {
                Linear::from_tensors(w.clone(), bias.clone())
            });
            assert_eq!(layer.is_packed(), reneg::nn::cpu_packed::available());
            let want = match &bias {
                Some(b) => product.broadcast_add(&f64_of(b)).unwrap(),
                None => product.clone(),
            };
            let xv = Var::from_tensor(&x).unwrap();
            let y = dispatch::with_kernels(dispatch::Kernels::Auto, || layer.forward(&xv)).unwrap();
            let grads = (y.clone() * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let got_grad = grads.get(xv.as_tensor()).unwrap();
            for (what, got, want) in [
                ("forward", &y, &want),
                ("input gradient", got_grad, &input_grad),
            ] {
                let e = max_abs_diff(got, want) / (1.0 + max_abs(want));
                worst = worst.max(e);
                assert!(
                    e < 1e-6,
                    "{rows}x{k}x{n} bias {}: {what} {e:e}",
                    bias.is_some()
                );
            }
            // The device-generic path on the same layer (the weight unpacked for the call).
            let generic =
                dispatch::with_kernels(dispatch::Kernels::Generic, || layer.forward(&x)).unwrap();
            let e = max_abs_diff(&generic, &want) / (1.0 + max_abs(&want));
            assert!(
                e < 1e-6,
                "{rows}x{k}x{n}: generic path on a packed layer {e:e}"
            );
        }
    }
    eprintln!("packed linear: worst relative error {worst:e}");
}
