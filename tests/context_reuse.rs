//! A sampling run's steps reuse the keys and values of its text (`nn::context`): the numbers
//! are those of projecting them again, bit for bit, on an SD, an SDXL and a PixArt pipeline;
//! and a negative rewritten in place (a `Var` the optimiser steps, seen through one detached
//! view) is projected again, not taken from the last step.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::bits;
use reneg::conditioning::Conditioning;
use reneg::nn::context::{counts, forget_all};
use std::path::Path;

/// The tests of this file one at a time: `forget_all` is process-wide.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn case(name: &str) -> (reneg::Pipeline, Tensor) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name);
    let sd = common::load_case_pipeline(&dir, DType::F32, &Device::Cpu);
    let x = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("init_latents")
        .unwrap();
    (sd, x)
}

#[test]
fn a_runs_steps_reuse_the_texts_keys_and_values_with_the_same_numbers() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["sd15-tiny", "sdxl-tiny", "pixart-tiny"] {
        let (sd, x) = case(name);
        let cond = sd.encode("a red fox in the snow").unwrap();
        let neg = sd.encode("blurry, low quality").unwrap();
        forget_all();
        sd.guided_eps(&x, 801.0, &cond, &neg, 5.0).unwrap();
        let (lookups, reuses) = counts();
        let kept = sd.guided_eps(&x, 401.0, &cond, &neg, 5.0).unwrap();
        let (lookups, reuses) = (counts().0 - lookups, counts().1 - reuses);
        // Every cross-attention of both branches asks, and each gets its kept keys.
        assert!(lookups >= 4, "{name}: {lookups} lookups");
        assert_eq!(
            reuses, lookups,
            "{name}: layers that projected the text again"
        );
        forget_all();
        let fresh = sd.guided_eps(&x, 401.0, &cond, &neg, 5.0).unwrap();
        assert!(
            bits(&kept) == bits(&fresh),
            "{name}: reuse changed the numbers"
        );
        // Another negative at the next step: its own keys and values.
        let other = sd.encode("oversaturated").unwrap();
        let switched = sd.guided_eps(&x, 401.0, &cond, &other, 5.0).unwrap();
        forget_all();
        let want = sd.guided_eps(&x, 401.0, &cond, &other, 5.0).unwrap();
        assert!(bits(&switched) == bits(&want), "{name}: a stale negative");
        assert!(
            bits(&switched) != bits(&kept),
            "{name}: the negative changes nothing"
        );
    }
}

#[test]
fn a_negative_rewritten_in_place_is_projected_again() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (sd, x) = case("sd15-tiny");
    let cond = sd.encode("a red fox in the snow").unwrap();
    let neg = sd.encode("blurry, low quality").unwrap();
    let var = Var::from_tensor(&neg.embeds).unwrap();
    // One view for every step, as a loop holding it across optimiser steps would.
    let view = Conditioning {
        embeds: var.as_detached_tensor(),
        ..neg.clone()
    };
    let first = sd.guided_eps(&x, 401.0, &cond, &view, 5.0).unwrap();
    let moved = (&neg.embeds * 1.5).unwrap();
    var.set(&moved).unwrap();
    let second = sd.guided_eps(&x, 401.0, &cond, &view, 5.0).unwrap();
    forget_all();
    let want = sd
        .guided_eps(
            &x,
            401.0,
            &cond,
            &Conditioning {
                embeds: moved,
                ..neg
            },
            5.0,
        )
        .unwrap();
    assert!(
        bits(&second) == bits(&want),
        "the old negative's keys were reused"
    );
    assert!(bits(&second) != bits(&first));
}

/// A model whose weights are being trained (the miniature world's UNet, a `Var` per tensor)
/// never keeps keys and values: the optimiser changes `to_k` between calls with the same text.
#[test]
fn trainable_weights_are_never_kept_across_calls() {
    use reneg::models::unet::UNet2DConditionModel;
    use reneg::weights::{Vb, Weights};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let weights = Weights::trainable(7, DType::F32, &Device::Cpu);
    let vb = Vb::new(weights);
    let unet = UNet2DConditionModel::new(common::tiny_unet_config(false), &vb).unwrap();
    let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let (x, ctx) = (
        f32(common::randn(1, &[1, 4, 8, 8])),
        f32(common::randn(2, &[1, 5, 12])),
    );
    let first = unet.forward(&x, 500.0, &ctx).unwrap();
    let vars = vb.vars();
    let (name, to_k) = vars
        .iter()
        .find(|(n, _)| n.contains("attn2.to_k"))
        .expect("a cross-attention's key projection");
    to_k.set(&(to_k.as_tensor() * 2.0).unwrap()).unwrap();
    let second = unet.forward(&x, 500.0, &ctx).unwrap();
    forget_all();
    let want = unet.forward(&x, 500.0, &ctx).unwrap();
    assert!(bits(&second) == bits(&want), "{name}: old keys reused");
    assert!(bits(&second) != bits(&first), "{name} changes nothing");
}
