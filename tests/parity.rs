//! Number-for-number parity with the PyTorch reference stack (torch 2.15.0, diffusers 0.42.1,
//! transformers 5.23.0), on the case folders of `shared/docs/parity-fixtures.md`:
//! every case under `tests/fixtures/parity/` (written by `tools/gen_parity.py`) and under each
//! path in `RENEG_PARITY_DIRS` (colon-separated). Each stage is fed the reference's own inputs,
//! so an error shows where it arises. A case of a kind reneg does not implement yet fails by
//! name (a skipped case would let the suite pass without checking it).
//!
//! By default everything runs on the CPU in f32. `RENEG_TEST_DEVICE=cuda` runs the models on the
//! first CUDA device (a build with `--features cuda`), and `RENEG_TEST_DTYPE=bf16|f16` runs them
//! in that precision's autocast (`reneg::precision`). f32 on any device keeps the usual
//! tolerances. In bf16/fp16, every tensor that a case's `autocast.safetensors` has a PyTorch
//! autocast result for (`tools/gen_autocast.py`, docs/parity-autocast.md) is asserted: reneg's
//! error against the f32 reference at most 1.5x PyTorch autocast's; other tensors are
//! reported. `autocast_fp16_parity` does that for fp16 on the CPU in every run.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use reneg::conditioning::Conditioning;
use reneg::Pipeline;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// The documented tolerances (shared/docs/parity-fixtures.md), for cases given through
/// RENEG_PARITY_DIRS and for f32 on another device.
const FORWARD_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;

/// The committed cases' bound for tensor `name` on the CPU in f32: about 10x the worst error
/// measured on them (CI's output at d286acd, both kernel choices), by kind of tensor. One
/// forward pass (the text encoders, one UNet or ControlNet call, a reward's CLIP towers):
/// worst 8.2e-7. A whole sampling loop, the VAE, a reward's score and the loss: worst 6.8e-6.
/// Gradients: worst 6.6e-6.
fn committed_tol(name: &str) -> f64 {
    const ONE_PASS: [&str; 6] = [
        "prompt_embeds",
        "negative_prompt_embeds",
        "eps_",
        "controlnet_",
        "transformer_in_probe",
        "reward_",
    ];
    if name.starts_with("grad_") {
        7e-5
    } else if name == "reward_score" {
        3e-5
    } else if ONE_PASS.iter().any(|p| name.starts_with(p)) {
        1e-5
    } else {
        7e-5
    }
}

/// The device of `RENEG_TEST_DEVICE` (`cpu`, the default, or `cuda` / `cuda:N`).
fn test_device() -> Device {
    match std::env::var("RENEG_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok(d) if d.starts_with("cuda") => {
            let ordinal = d
                .strip_prefix("cuda:")
                .map(|n| n.parse().expect("RENEG_TEST_DEVICE=cuda:N"))
                .unwrap_or(0);
            Device::new_cuda(ordinal).unwrap_or_else(|e| {
                panic!("RENEG_TEST_DEVICE={d}: {e} (build with --features cuda)")
            })
        }
        Ok(d) => panic!("RENEG_TEST_DEVICE={d}: expected cpu, cuda or cuda:N"),
    }
}

/// The model dtype of `RENEG_TEST_DTYPE` (`f32`, the default, `bf16` or `f16`).
fn test_dtype() -> DType {
    match std::env::var("RENEG_TEST_DTYPE").as_deref() {
        Err(_) | Ok("") | Ok("f32") => DType::F32,
        Ok("bf16") => DType::BF16,
        Ok("f16") => DType::F16,
        Ok(d) => panic!("RENEG_TEST_DTYPE={d}: expected f32, bf16 or f16"),
    }
}

/// A case's `expected.safetensors` and the device and dtype the test runs in.
struct Expected {
    tensors: HashMap<String, Tensor>,
    dir: std::path::PathBuf,
    dev: Device,
    dtype: DType,
}

/// The prefix of a dtype's tensors in `autocast.safetensors`.
fn autocast_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F16 => Some("fp16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// PyTorch autocast's results for `dtype` from a case's `autocast.safetensors` (empty in f32
/// or without the file), keyed by tensor name.
fn autocast_references(dir: &Path, dtype: DType) -> HashMap<String, Tensor> {
    let (Some(prefix), path) = (autocast_name(dtype), dir.join("autocast.safetensors")) else {
        return HashMap::new();
    };
    if !path.is_file() {
        return HashMap::new();
    }
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&format!("{prefix}/"))?.to_string(), v)))
        .collect()
}

impl Expected {
    fn load(dir: &Path, dev: &Device, dtype: DType) -> Self {
        Self {
            tensors: candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
                .unwrap(),
            dir: dir.to_path_buf(),
            dev: dev.clone(),
            dtype,
        }
    }

    fn get(&self, n: &str) -> &Tensor {
        self.tensors
            .get(n)
            .unwrap_or_else(|| panic!("{}: expected.safetensors lacks {n}", self.dir.display()))
    }

    /// The reference's tensor as a model input: on the test device, in the dtype between
    /// models (the test dtype, or f32 under bf16/fp16 autocast).
    fn input(&self, n: &str) -> Tensor {
        self.get(n)
            .to_dtype(reneg::precision::activation_dtype(self.dtype))
            .unwrap()
            .to_device(&self.dev)
            .unwrap()
    }

    /// The reference's tensor as an expected value: f32 on the CPU, whatever the test dtype.
    fn want(&self, n: &str) -> Tensor {
        self.get(n).to_dtype(DType::F32).unwrap()
    }

    /// Token ids on the test device.
    fn ids(&self, n: &str) -> Tensor {
        self.get(n)
            .to_dtype(DType::U32)
            .unwrap()
            .to_device(&self.dev)
            .unwrap()
    }
}

#[derive(Deserialize)]
struct PipelineCase {
    prompt: String,
    negative_prompt: String,
    guidance_scale: f64,
    /// diffusers' guidance_rescale (the SDXL case format's key; 0 when absent).
    #[serde(default)]
    guidance_rescale: f64,
    num_inference_steps: usize,
    grad_step_index: usize,
    /// VideoCrafter cases: DDIM's eta (their fps is set by `common::load_case_pipeline`).
    #[serde(default)]
    ddim_eta: f64,
}

/// max |a - b| / max |b|, the fixture format's error measure.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let g = got
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let w = want
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let diff = (g - &w)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = w
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale.max(1e-30)
}

struct Report {
    case: String,
    failures: Vec<String>,
    /// Assert the tolerances (f32); otherwise only report the errors.
    strict: bool,
    /// (tensor, error) of every comparison, for the low-precision summary.
    errors: Vec<(String, f64)>,
    /// PyTorch autocast's results in the test's low precision: the tensors asserted then.
    autocast: HashMap<String, Tensor>,
    /// A committed case on the CPU: the bounds are `committed_tol`'s, near what is measured.
    measured_bounds: bool,
}

impl Report {
    /// A scalar that is a sum of terms of both signs (the loss), its error relative to the sum
    /// of the terms' magnitudes `terms`: where the terms cancel, f32's rounding of the sum is
    /// a fraction of `terms`, not of the small result (PyTorch's own f32 loss of sdxl-tiny-vpred
    /// is 6.4e-5 from its f64 one relative to the loss, 1.4e-4 for ours).
    fn sum(&mut self, name: &str, got: &Tensor, want: &Tensor, terms: f64, tol: f64) {
        let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let (g, w) = (scalar(got), scalar(want));
        let e = (g - w).abs() / terms.max(w.abs()).max(1e-30);
        self.errors.push((name.to_string(), e));
        let ok = e < tol;
        println!(
            "  {name:<30} err {e:.3e} of the sum of |terms| {terms:.3e} (tol {tol:.0e}) {}",
            if ok { "ok" } else { "FAIL" }
        );
        if !ok && self.strict {
            self.failures
                .push(format!("{}: {name} err {e:.3e} >= {tol:.0e}", self.case));
        }
    }

    fn tensor(&mut self, name: &str, got: &Tensor, want: &Tensor, tol: f64) {
        if got.dims() != want.dims() {
            self.failures.push(format!(
                "{name}: shape {:?} != {:?}",
                got.dims(),
                want.dims()
            ));
            println!("  {name:<30} SHAPE {:?} vs {:?}", got.dims(), want.dims());
            return;
        }
        let e = rel_err(got, want);
        self.errors.push((name.to_string(), e));
        if !self.strict {
            if let Some(torch) = self.autocast.get(name) {
                // Issue 15: at most 1.5x PyTorch autocast's error against the same f32 reference.
                // The loss, one sum of terms of both signs, is reported only: its relative
                // error swings several-fold with the order of roundings (0.7e-3 to 8.3e-3 over
                // three equivalent arrangements of our own code on sd15-tiny), while the x0 and
                // the decoded image it is a linear function of are asserted.
                let bound = 1.5 * rel_err(torch, want);
                let ok = e <= bound || name == "loss";
                println!(
                    "  {name:<30} max rel err {e:.3e} (PyTorch autocast {:.3e}, bound {bound:.3e}) {}",
                    bound / 1.5,
                    match (e <= bound, ok) {
                        (true, _) => "ok",
                        (false, true) => "over (reported: a scalar sum)",
                        (false, false) => "FAIL",
                    }
                );
                if !ok {
                    self.failures.push(format!(
                        "{}: {name} rel err {e:.3e} > 1.5 x PyTorch autocast's {:.3e}",
                        self.case,
                        bound / 1.5
                    ));
                }
                return;
            }
        }
        let tol = if self.measured_bounds {
            committed_tol(name)
        } else {
            tol
        };
        let ok = e < tol;
        println!(
            "  {name:<30} max rel err {e:.3e} (tol {tol:.0e}) {}",
            match (ok, self.strict) {
                (true, _) => "ok",
                (false, true) => "FAIL",
                (false, false) => "over f32 tol (reported)",
            }
        );
        if !ok && self.strict {
            self.failures.push(format!(
                "{}: {name} rel err {e:.3e} >= {tol:.0e}",
                self.case
            ));
        }
    }

    fn ids(&mut self, name: &str, got: &[u32], want: &Tensor) {
        let want: Vec<u32> = want
            .to_dtype(DType::I64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let ok = got == want.as_slice();
        println!("  {name:<30} {}", if ok { "exact" } else { "MISMATCH" });
        if !ok {
            self.failures
                .push(format!("{}: {name} {got:?} != {want:?}", self.case));
        }
    }
}

fn run_pipeline_case(dir: &Path, dev: &Device, dtype: DType, report: &mut Report) {
    let case: PipelineCase =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let expected = Expected::load(dir, dev, dtype);
    let (exp, dev, dtype) = (&expected.tensors, expected.dev.clone(), expected.dtype);
    let e = |n: &str| expected.input(n);
    let want = |n: &str| expected.want(n);
    let ids_of = |n: &str| expected.ids(n);
    let mut sd = common::load_case_pipeline(dir, dtype, &dev);
    // A ControlNet case: the pipeline's ControlNet with control.png, as
    // StableDiffusionControlNetPipeline runs it.
    let control_image = common::add_case_controlnet(&mut sd, dir);
    sd.guidance_rescale = case.guidance_rescale;
    let controlnet = control_image.is_some();
    if let Some(image) = &control_image {
        report.tensor("control_image", image, &want("control_image"), FORWARD_TOL);
    }

    // Tokenizer and text encoder.
    report.ids(
        "prompt_input_ids",
        &sd.clip().unwrap().tokenizer.encode(&case.prompt),
        &exp["prompt_input_ids"],
    );
    report.ids(
        "negative_input_ids",
        &sd.clip().unwrap().tokenizer.encode(&case.negative_prompt),
        &exp["negative_input_ids"],
    );
    let ids = ids_of("prompt_input_ids");
    report.tensor(
        "prompt_embeds",
        &sd.clip().unwrap().text_encoder.forward(&ids).unwrap(),
        &want("prompt_embeds"),
        FORWARD_TOL,
    );
    let nids = ids_of("negative_input_ids");
    report.tensor(
        "negative_prompt_embeds",
        &sd.clip().unwrap().text_encoder.forward(&nids).unwrap(),
        &want("negative_prompt_embeds"),
        FORWARD_TOL,
    );

    // Scheduler timesteps. The case format samples with DDIM (eta 0) whatever class the
    // folder's scheduler config names.
    sd.scheduler = sd
        .scheduler
        .with_kind(reneg::scheduler::SchedulerKind::Ddim)
        .unwrap();
    sd.scheduler.set_eta(case.ddim_eta).unwrap();
    sd.scheduler
        .set_timesteps(case.num_inference_steps)
        .unwrap();
    let ts: Vec<u32> = sd.scheduler.timesteps().iter().map(|&t| t as u32).collect();
    report.ids("timesteps", &ts, &exp["timesteps"]);

    // Guided sampling from the reference's noise and embeddings.
    let (pe, ne) = (e("prompt_embeds"), e("negative_prompt_embeds"));
    let (pc, nc): (Conditioning, Conditioning) = (pe.clone().into(), ne.clone().into());
    let mut x = e("init_latents");
    let mut latents_at_grad_step = None;
    for i in 0..sd.scheduler.len() {
        if i == case.grad_step_index {
            latents_at_grad_step = Some(x.clone());
        }
        x = sd
            .sample_step(&x, i, &pc, &nc, case.guidance_scale, &[0])
            .unwrap();
    }
    report.tensor("final_latents", &x, &want("final_latents"), FORWARD_TOL);
    if let Some(l) = latents_at_grad_step {
        report.tensor("grad_latents_in", &l, &want("grad_latents_in"), FORWARD_TOL);
    }
    // A text-to-video case decodes each frame: `video` [1, 3, F, H, W] replaces `image`.
    let decoded = if exp.contains_key("video") {
        "video"
    } else {
        "image"
    };
    report.tensor(
        decoded,
        &sd.decode(&e("final_latents")).unwrap(),
        &want(decoded),
        FORWARD_TOL,
    );
    // This project's text-to-video generator also writes each branch's UNet output at the
    // gradient step, and conv_in + transformer_in on their own.
    if exp.contains_key("eps_negative") {
        let i = case.grad_step_index;
        let t = sd.scheduler.timestep(i).unwrap();
        let x = sd
            .scheduler
            .scale_model_input(&e("grad_latents_in"), i)
            .unwrap();
        use reneg::family::roles::Branch;
        for (name, ctx, branch) in [
            ("eps_negative", &nc, Branch::Negative),
            ("eps_prompt", &pc, Branch::Prompt),
        ] {
            let eps = sd.denoiser.forward(&x, t, ctx, branch).unwrap();
            report.tensor(name, &eps, &want(name), FORWARD_TOL);
        }
    }
    if exp.contains_key("transformer_in_probe_input") {
        let frames = e("init_latents").dim(2).unwrap();
        let out = sd
            .unet()
            .unwrap()
            .encoder()
            .forward_in(&e("transformer_in_probe_input"), frames)
            .unwrap();
        report.tensor(
            "transformer_in_probe_output",
            &out,
            &want("transformer_in_probe_output"),
            FORWARD_TOL,
        );
    }

    // The ReNeg gradient step: x0 from the reference's latents, linear stand-in reward.
    if controlnet {
        // The ControlNets' mid residual at the gradient step, batch [negative, prompt].
        let x = e("grad_latents_in");
        let t = sd.scheduler.timestep(case.grad_step_index).unwrap();
        let x2 = Tensor::cat(&[&x, &x], 0).unwrap();
        let ctx = Tensor::cat(&[&ne, &pe], 0).unwrap();
        let c = &sd.controls()[0];
        let guess_mode = sd
            .denoiser
            .as_any()
            .downcast_ref::<reneg::family::sd::UnetDenoiser>()
            .unwrap()
            .guess_mode;
        let (_, ch, h, w) = c.image.dims4().unwrap();
        let image = c.image.broadcast_as((2, ch, h, w)).unwrap();
        let r = c
            .model
            .forward(&x2, t, &ctx, &image, c.scale, guess_mode)
            .unwrap();
        report.tensor(
            "controlnet_mid_residual",
            &r.mid,
            &want("controlnet_mid_residual"),
            FORWARD_TOL,
        );
        // This project's generator also writes each down residual.
        for (i, d) in r.down.iter().enumerate() {
            let name = format!("controlnet_down_residual_{i}");
            if exp.contains_key(&name) {
                report.tensor(&name, d, &want(&name), FORWARD_TOL);
            }
        }
    }
    let neg = Var::from_tensor(&ne).unwrap();
    let x0 = sd
        .predict_x0(
            &e("grad_latents_in"),
            case.grad_step_index,
            &pc,
            &neg.as_tensor().clone().into(),
            case.guidance_scale,
        )
        .unwrap();
    report.tensor("x0_pred", &x0, &want("x0_pred"), FORWARD_TOL);
    let image = sd.decode(&x0).unwrap();
    let loss = (image * e("reward_weight"))
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    report.tensor("loss", &loss, &want("loss"), FORWARD_TOL);
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(neg.as_tensor())
        .expect("gradient reaches the negative embedding");
    report.tensor(
        "grad_negative_prompt_embeds",
        grad,
        &want("grad_negative_prompt_embeds"),
        GRAD_TOL,
    );

    // Extra tensors of this project's generator: the VAE encoder.
    let mut known: Vec<&str> = vec![
        "prompt_input_ids",
        "negative_input_ids",
        "prompt_embeds",
        "negative_prompt_embeds",
        "init_latents",
        "timesteps",
        "final_latents",
        "image",
        "video",
        "eps_negative",
        "eps_prompt",
        "transformer_in_probe_input",
        "transformer_in_probe_output",
        // conv_in's output inside the probe: checked through transformer_in_probe_output.
        "transformer_in_probe_conv_in",
        "grad_latents_in",
        "x0_pred",
        "reward_weight",
        "loss",
        "grad_negative_prompt_embeds",
        "control_image",
        "controlnet_mid_residual",
    ];
    if exp.contains_key("vae_encoder_input") {
        let (mean, logvar) = sd.vae().unwrap().encode(&e("vae_encoder_input")).unwrap();
        report.tensor(
            "vae_encoder_mean",
            &mean,
            &want("vae_encoder_mean"),
            FORWARD_TOL,
        );
        report.tensor(
            "vae_encoder_logvar",
            &logvar,
            &want("vae_encoder_logvar"),
            FORWARD_TOL,
        );
        known.extend([
            "vae_encoder_input",
            "vae_encoder_mean",
            "vae_encoder_logvar",
        ]);
    }
    let mut unknown: Vec<&String> = exp
        .keys()
        .filter(|k| !known.contains(&k.as_str()) && !k.starts_with("controlnet_down_residual_"))
        .collect();
    unknown.sort();
    for name in unknown {
        println!("  {name:<30} not checked (a tensor this test does not know)");
    }
}

#[derive(Deserialize)]
struct SdxlCase {
    prompt: String,
    negative_prompt: Option<String>,
    guidance_scale: f64,
    #[serde(default)]
    guidance_rescale: f64,
    num_inference_steps: usize,
    grad_step_index: usize,
    original_size: Option<[usize; 2]>,
    target_size: Option<[usize; 2]>,
    crops_coords_top_left: Option<[usize; 2]>,
}

/// Sets the sampler's `steps` and checks its timesteps against the case's, exactly.
fn set_case_timesteps(sd: &mut Pipeline, steps: usize, exp: &HashMap<String, Tensor>, dir: &Path) {
    sd.scheduler.set_timesteps(steps).unwrap();
    let ts: Vec<f32> = sd.scheduler.timesteps().iter().map(|&t| t as f32).collect();
    let want_ts: Vec<f32> = exp["timesteps"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(ts, want_ts, "{}: timesteps", dir.display());
    println!("  {:<30} exact", "timesteps");
}

/// The whole sampling loop from the case's `init_latents` under (prompt, negative)
/// conditionings: the final latents, the latents entering `grad_step`, and the decoded image
/// of the reference's final latents.
fn sampling_loop(
    sd: &mut Pipeline,
    (pc, nc): (&Conditioning, &Conditioning),
    g: f64,
    grad_step: usize,
    expected: &Expected,
    report: &mut Report,
) {
    let (e, want) = (|n: &str| expected.input(n), |n: &str| expected.want(n));
    let mut x = sd.start_latents(e("init_latents")).unwrap();
    let mut at_grad = None;
    for i in 0..sd.scheduler.len() {
        if i == grad_step {
            at_grad = Some(x.clone());
        }
        x = sd.sample_step(&x, i, pc, nc, g, &[0]).unwrap();
    }
    report.tensor("final_latents", &x, &want("final_latents"), FORWARD_TOL);
    report.tensor(
        "grad_latents_in",
        &at_grad.unwrap(),
        &want("grad_latents_in"),
        FORWARD_TOL,
    );
    report.tensor(
        "image",
        &sd.decode(&e("final_latents")).unwrap(),
        &want("image"),
        FORWARD_TOL,
    );
}

#[derive(serde::Deserialize)]
struct PixArtCase {
    prompt: String,
    negative_prompt: String,
    guidance_scale: f64,
    num_inference_steps: usize,
    grad_step_index: usize,
    max_sequence_length: usize,
}

/// PixArt-α cases: T5's tokenizer (ids and masks exact) and encoder, the sampler (DPM-Solver++
/// or DDIM, as the folder ships) over the whole loop, the transformer's raw output (noise and
/// variance) at the gradient step on [negative, prompt], x0, the decoded image, and the
/// gradient with respect to the negative's embeddings with its mask fixed (zero on its
/// padding rows).
fn run_pixart_case(dir: &Path, dev: &Device, dtype: DType, report: &mut Report) {
    use reneg::family::pixart::{PixArtDenoiser, T5Encoder};
    let case: PixArtCase =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let expected = Expected::load(dir, dev, dtype);
    let (exp, dev, dtype) = (&expected.tensors, expected.dev.clone(), expected.dtype);
    let e = |n: &str| expected.input(n);
    let want = |n: &str| expected.want(n);
    let mut sd = common::load_case_pipeline(dir, dtype, &dev);
    // The case's prompt length, as the CLI's --max-sequence-length sets it.
    sd.set_max_length(case.max_sequence_length).unwrap();
    let enc = sd.encoder.as_any().downcast_ref::<T5Encoder>().unwrap();
    for (name, text, mask_name, tag) in [
        ("prompt", &case.prompt, "prompt_attention_mask", ""),
        (
            "negative",
            &case.negative_prompt,
            "negative_prompt_attention_mask",
            "negative_",
        ),
    ] {
        let (ids, mask) = enc.tokenize(text, &Device::Cpu).unwrap();
        report.ids(
            &format!("{name}_input_ids"),
            &ids.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            &exp[&format!("{name}_input_ids")],
        );
        let mask_ids: Vec<u32> = mask
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&m| m as u32)
            .collect();
        report.ids(mask_name, &mask_ids, &exp[mask_name]);
        let c = sd.encode(text).unwrap();
        report.tensor(
            &format!("{tag}prompt_embeds"),
            &c.embeds,
            &want(&format!("{tag}prompt_embeds")),
            FORWARD_TOL,
        );
    }
    set_case_timesteps(&mut sd, case.num_inference_steps, exp, dir);
    let mask = |n: &str| Some(expected.input(n).to_dtype(DType::F32).unwrap());
    let pc = Conditioning {
        embeds: e("prompt_embeds"),
        pooled: None,
        mask: mask("prompt_attention_mask"),
    };
    let nc = Conditioning {
        embeds: e("negative_prompt_embeds"),
        pooled: None,
        mask: mask("negative_prompt_attention_mask"),
    };
    sampling_loop(
        &mut sd,
        (&pc, &nc),
        case.guidance_scale,
        case.grad_step_index,
        &expected,
        report,
    );
    // The transformer's raw output, both halves, at the gradient step.
    let i = case.grad_step_index;
    let t = sd.scheduler.timestep(i).unwrap();
    let xin = sd
        .scheduler
        .scale_model_input(&e("grad_latents_in"), i)
        .unwrap();
    let (_, _, h, w) = xin.dims4().unwrap();
    let den = sd
        .denoiser
        .as_any()
        .downcast_ref::<PixArtDenoiser>()
        .unwrap();
    let both = Conditioning::cat(&[&nc, &pc]).unwrap();
    let x2 = Tensor::cat(&[&xin, &xin], 0).unwrap();
    let res = Some((h * den.vae_scale, w * den.vae_scale));
    let out = den
        .transformer
        .forward(&x2, t, &both.embeds, both.mask.as_ref(), res)
        .unwrap();
    report.tensor(
        "model_output_at_grad_step",
        &out,
        &want("model_output_at_grad_step"),
        FORWARD_TOL,
    );
    // ReNeg's step: the gradient reaches the negative's embeddings, its mask fixed.
    let ne = Var::from_tensor(&nc.embeds).unwrap();
    let neg = Conditioning {
        embeds: ne.as_tensor().clone(),
        pooled: None,
        mask: nc.mask.clone(),
    };
    let x0 = sd
        .predict_x0(&e("grad_latents_in"), i, &pc, &neg, case.guidance_scale)
        .unwrap();
    report.tensor("x0_pred", &x0, &want("x0_pred"), FORWARD_TOL);
    let terms = (sd.decode(&x0).unwrap() * e("reward_weight")).unwrap();
    let loss = terms.sum_all().unwrap().neg().unwrap();
    let scale = terms
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    report.sum("loss", &loss, &want("loss"), scale, FORWARD_TOL);
    let grads = loss.backward().unwrap();
    let grad = grads.get(ne.as_tensor()).unwrap();
    report.tensor(
        "grad_negative_prompt_embeds",
        grad,
        &want("grad_negative_prompt_embeds"),
        GRAD_TOL,
    );
    // Rows the mask leaves out receive nothing, exactly.
    let m = nc.mask.as_ref().unwrap().to_dtype(grad.dtype()).unwrap();
    let outside = grad
        .broadcast_mul(&(1.0 - m).unwrap().unsqueeze(2).unwrap())
        .unwrap();
    assert_eq!(
        common::max_abs(&outside),
        0.0,
        "{}: gradient on masked rows",
        dir.display()
    );
    let known = [
        "prompt_input_ids",
        "negative_input_ids",
        "prompt_attention_mask",
        "negative_prompt_attention_mask",
        "prompt_embeds",
        "negative_prompt_embeds",
        "init_latents",
        "timesteps",
        "sigmas",
        "final_latents",
        "image",
        "grad_latents_in",
        "model_output_at_grad_step",
        "eps_at_grad_step",
        "x0_pred",
        "added_cond_resolution",
        "added_cond_aspect_ratio",
        "adaln_embedded_timestep",
        "caption_projection_output",
        "reward_weight",
        "loss",
        "grad_negative_prompt_embeds",
    ];
    for name in exp.keys().filter(|k| !known.contains(&k.as_str())) {
        println!("  {name:<30} not checked (a tensor this test does not know)");
    }
}

/// SDXL cases: both tokenizers and encoders, the pooled embedding, the size ids and their
/// embedding, the sampler (Euler or DDIM, as the folder ships), the UNet's output at the
/// gradient step on [negative, prompt], x0, the decoded image, and the gradient with respect to
/// both learned parts of the negative.
fn run_sdxl_case(dir: &Path, dev: &Device, dtype: DType, report: &mut Report) {
    use reneg::family::roles::{Branch, SizeConditioning};
    use reneg::family::sdxl::{SdxlDenoiser, SdxlEncoder};
    let case: SdxlCase =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let expected = Expected::load(dir, dev, dtype);
    let (exp, dev, dtype) = (&expected.tensors, expected.dev.clone(), expected.dtype);
    let e = |n: &str| expected.input(n);
    let want = |n: &str| expected.want(n);
    let mut sd = common::load_case_pipeline(dir, dtype, &dev);
    sd.guidance_rescale = case.guidance_rescale;
    let pair = |p: Option<[usize; 2]>| p.map(|[a, b]| (a, b));
    sd.set_size_conditioning(SizeConditioning {
        original: pair(case.original_size),
        target: pair(case.target_size),
        crops_top_left: pair(case.crops_coords_top_left).unwrap_or((0, 0)),
    })
    .unwrap();
    let enc = sd.encoder.as_any().downcast_ref::<SdxlEncoder>().unwrap();

    // Tokenizers and encoders, each fed the reference's ids.
    let mut texts = vec![("prompt", case.prompt.as_str())];
    if let Some(n) = &case.negative_prompt {
        texts.push(("negative", n.as_str()));
    }
    for (name, text) in &texts {
        report.ids(
            &format!("{name}_input_ids"),
            &enc.tokenizer.encode(text),
            &exp[&format!("{name}_input_ids")],
        );
        report.ids(
            &format!("{name}_input_ids_2"),
            &enc.tokenizer_2.encode(text),
            &exp[&format!("{name}_input_ids_2")],
        );
        let ids = |k: &str| expected.ids(&format!("{name}_input_ids{k}"));
        let c = enc.encode_ids(&ids(""), &ids("_2")).unwrap();
        let tag = if *name == "prompt" { "" } else { "negative_" };
        report.tensor(
            &format!("{tag}prompt_embeds"),
            &c.embeds,
            &want(&format!("{tag}prompt_embeds")),
            FORWARD_TOL,
        );
        report.tensor(
            &format!("{tag}pooled_prompt_embeds"),
            c.pooled.as_ref().unwrap(),
            &want(&format!("{tag}pooled_prompt_embeds")),
            FORWARD_TOL,
        );
    }
    if case.negative_prompt.is_none() {
        // No negative: what the pipeline uses instead (zeros under force_zeros_for_empty_prompt).
        let c = sd.no_negative().unwrap();
        report.tensor(
            "negative_prompt_embeds",
            &c.embeds,
            &want("negative_prompt_embeds"),
            FORWARD_TOL,
        );
        report.tensor(
            "negative_pooled_prompt_embeds",
            c.pooled.as_ref().unwrap(),
            &want("negative_pooled_prompt_embeds"),
            FORWARD_TOL,
        );
    }

    // Size ids, from the latents' size and the case's size conditioning.
    fn den(sd: &Pipeline) -> &SdxlDenoiser {
        sd.denoiser.as_any().downcast_ref::<SdxlDenoiser>().unwrap()
    }
    let (_, _, h, w) = exp["init_latents"].dims4().unwrap();
    let ids = den(&sd).time_ids(h, w);
    let ids_t = Tensor::from_vec(ids.map(|v| v as f32).to_vec(), (1, 6), &Device::Cpu).unwrap();
    report.tensor("add_time_ids", &ids_t, &want("add_time_ids"), FORWARD_TOL);
    report.tensor(
        "negative_add_time_ids",
        &ids_t,
        &want("negative_add_time_ids"),
        FORWARD_TOL,
    );

    // The sampler's timesteps (and Euler's sigmas through the step), from the folder's class.
    set_case_timesteps(&mut sd, case.num_inference_steps, exp, dir);

    let cond = |k: &str| Conditioning {
        embeds: e(&format!("{k}prompt_embeds")),
        pooled: Some(e(&format!("{k}pooled_prompt_embeds"))),
        mask: None,
    };
    let (pc, nc) = (cond(""), cond("negative_"));
    sampling_loop(
        &mut sd,
        (&pc, &nc),
        case.guidance_scale,
        case.grad_step_index,
        &expected,
        report,
    );

    // The UNet at the gradient step on [negative, prompt], and its added embedding.
    let i = case.grad_step_index;
    let t = sd.scheduler.timestep(i).unwrap();
    let xin = sd
        .scheduler
        .scale_model_input(&e("grad_latents_in"), i)
        .unwrap();
    let x2 = Tensor::cat(&[&xin, &xin], 0).unwrap();
    let both = Conditioning::cat(&[&nc, &pc]).unwrap();
    let out = sd.denoiser.forward(&x2, t, &both, Branch::Both).unwrap();
    report.tensor("unet_output", &out, &want("unet_output"), FORWARD_TOL);
    if exp.contains_key("add_embedding_output") {
        let added = den(&sd)
            .unet
            .text_time_embedding(both.pooled.as_ref().unwrap(), &[ids, ids])
            .unwrap();
        report.tensor(
            "add_embedding_output",
            &added,
            &want("add_embedding_output"),
            FORWARD_TOL,
        );
    }

    // ReNeg's step: the gradient reaches both learned parts of the negative.
    let (ne, np) = (
        Var::from_tensor(&nc.embeds).unwrap(),
        Var::from_tensor(nc.pooled.as_ref().unwrap()).unwrap(),
    );
    let neg = Conditioning {
        embeds: ne.as_tensor().clone(),
        pooled: Some(np.as_tensor().clone()),
        mask: None,
    };
    let x0 = sd
        .predict_x0(&e("grad_latents_in"), i, &pc, &neg, case.guidance_scale)
        .unwrap();
    report.tensor("x0_pred", &x0, &want("x0_pred"), FORWARD_TOL);
    let terms = (sd.decode(&x0).unwrap() * e("reward_weight")).unwrap();
    let loss = terms.sum_all().unwrap().neg().unwrap();
    let scale = terms.abs().unwrap().sum_all().unwrap();
    let scale = scale
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    // Measured: at most 1.6e-7 of the terms' sum on the committed SDXL cases; a case given
    // through RENEG_PARITY_DIRS keeps the forward tolerance.
    let tol = if report.measured_bounds {
        2e-6
    } else {
        FORWARD_TOL
    };
    report.sum("loss", &loss, &want("loss"), scale, tol);
    let grads = loss.backward().unwrap();
    report.tensor(
        "grad_negative_prompt_embeds",
        grads.get(ne.as_tensor()).unwrap(),
        &want("grad_negative_prompt_embeds"),
        GRAD_TOL,
    );
    report.tensor(
        "grad_negative_pooled_prompt_embeds",
        grads.get(np.as_tensor()).unwrap(),
        &want("grad_negative_pooled_prompt_embeds"),
        GRAD_TOL,
    );
    // Euler's sigmas are checked through every step above.
    let known = [
        "prompt_input_ids",
        "prompt_input_ids_2",
        "negative_input_ids",
        "negative_input_ids_2",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "add_time_ids",
        "negative_add_time_ids",
        "init_latents",
        "timesteps",
        "sigmas",
        "final_latents",
        "image",
        "grad_latents_in",
        "unet_output",
        "add_embedding_output",
        "x0_pred",
        "reward_weight",
        "loss",
        "grad_negative_prompt_embeds",
        "grad_negative_pooled_prompt_embeds",
    ];
    for name in exp.keys().filter(|k| !known.contains(&k.as_str())) {
        println!("  {name:<30} not checked (a tensor this test does not know)");
    }
}

/// Reward cases: features, score and d score / d pixels from the already preprocessed pixels.
fn run_reward_case(dir: &Path, kind: &str, dev: &Device, dtype: DType, report: &mut Report) {
    use reneg::reward::{l2_normalize, load, rowwise_dot};
    let expected = Expected::load(dir, dev, dtype);
    let (exp, dev, dtype) = (&expected.tensors, expected.dev.clone(), expected.dtype);
    let e = |n: &str| expected.input(n);
    let want = |n: &str| expected.want(n);
    let ids_of = |n: &str| expected.ids(n);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let prompt = meta["prompt"].as_str().unwrap_or("").to_string();
    let reward_dir = dir.join("reward");
    let pixels = Var::from_tensor(&e("reward_pixel_values")).unwrap();
    let (image_embeds, text_embeds, score) = match kind {
        "openclip" => {
            let r = load::load_hps(&reward_dir, dtype, &dev).unwrap_or_else(|e| panic!("{e}"));
            let ids = r.tokenizer.encode(&prompt);
            report.ids("reward_text_ids", &ids, &exp["reward_text_ids"]);
            let img = l2_normalize(&r.model.visual.forward(pixels.as_tensor()).unwrap()).unwrap();
            let txt =
                l2_normalize(&r.model.text.forward(&ids_of("reward_text_ids")).unwrap()).unwrap();
            let score = rowwise_dot(&img, &txt).unwrap();
            (img, Some(txt), score)
        }
        "hf-clip" => {
            let r = load::load_hf_clip(
                &reward_dir,
                reneg::reward::hf_clip::ClipScoring::PickScore,
                dtype,
                &dev,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            report.ids(
                "reward_text_ids",
                &r.tokenizer.encode(&prompt),
                &exp["reward_text_ids"],
            );
            let img = r.model.image_embeds(pixels.as_tensor()).unwrap();
            let txt = r.model.text_embeds(&ids_of("reward_text_ids")).unwrap();
            let score = (rowwise_dot(&img, &txt).unwrap() * r.model.logit_scale.exp()).unwrap();
            (img, Some(txt), score)
        }
        _ => {
            let r =
                load::load_aesthetic(&reward_dir, dtype, &dev).unwrap_or_else(|e| panic!("{e}"));
            let img = r.image_embeds(pixels.as_tensor()).unwrap();
            let score = r.head.forward(&img).unwrap().squeeze(1).unwrap();
            (img, None, score)
        }
    };
    report.tensor(
        "reward_image_embeds",
        &image_embeds,
        &want("reward_image_embeds"),
        FORWARD_TOL,
    );
    if let Some(t) = text_embeds {
        report.tensor(
            "reward_text_embeds",
            &t,
            &want("reward_text_embeds"),
            FORWARD_TOL,
        );
    }
    report.tensor(
        "reward_score",
        &score,
        &want("reward_score").reshape(score.dims()).unwrap(),
        FORWARD_TOL,
    );
    let grads = score.sum_all().unwrap().backward().unwrap();
    let g = grads
        .get(pixels.as_tensor())
        .expect("gradient reaches the pixels");
    report.tensor(
        "grad_reward_pixel_values",
        g,
        &want("grad_reward_pixel_values"),
        GRAD_TOL,
    );
}

#[test]
fn parity_cases() {
    run_cases(&test_device(), test_dtype(), false);
}

/// fp16 autocast on the CPU, asserted against PyTorch's autocast on every pipeline case that has
/// its `autocast.safetensors` (the committed ones all do); the others are named.
#[test]
fn autocast_fp16_parity() {
    run_cases(&Device::Cpu, DType::F16, true);
}

fn run_cases(dev: &Device, dtype: DType, pipelines_only: bool) {
    let cases = common::parity_case_dirs();
    assert!(!cases.is_empty(), "no parity cases found");
    let strict = dtype == DType::F32;
    println!(
        "parity on {dev:?} in {dtype:?}{}",
        if strict {
            ""
        } else {
            ": tensors with a PyTorch autocast result asserted within 1.5x its error, others reported"
        }
    );
    let mut failures = vec![];
    let mut errors: Vec<(String, f64)> = vec![];
    let mut ran: Vec<std::path::PathBuf> = vec![];
    let mut without_autocast: Vec<String> = vec![];
    for dir in cases {
        let name = dir.display().to_string();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        // A case names its kind; a pipeline case may leave it out.
        let kind = match meta.get("kind").and_then(|k| k.as_str()) {
            Some(k) => k.to_string(),
            None if dir.join("pipeline").is_dir() => "pipeline".to_string(),
            None => "unknown".to_string(),
        };
        if pipelines_only && kind != "pipeline" {
            continue;
        }
        const KINDS: [&str; 9] = [
            "sdxl",
            "pixart",
            "pipeline",
            "controlnet",
            "text2video",
            "videocrafter",
            "openclip",
            "hf-clip",
            "aesthetic",
        ];
        if !KINDS.contains(&kind.as_str()) {
            println!("case {name}: FAILED (kind `{kind}` is not implemented)");
            failures.push(format!("{name}: case kind `{kind}` is not implemented"));
            continue;
        }
        println!("case {name} ({kind})");
        // A case in the shared format carries no autocast references (they are this project's
        // own extension, docs/parity-autocast.md): parity_cases checks it in f32; here it is
        // named, not failed. The committed cases have them (each must run, below).
        if !strict && kind == "pipeline" && autocast_references(&dir, dtype).is_empty() {
            println!("  no {dtype:?} autocast references: checked in f32 only (parity_cases)");
            without_autocast.push(name);
            continue;
        }
        // A case that cannot even load (an unsupported config, say) fails by name; the
        // remaining cases still run.
        let outcome = std::panic::catch_unwind(|| {
            let autocast = autocast_references(&dir, dtype);
            let mut report = Report {
                case: name.clone(),
                failures: vec![],
                strict,
                measured_bounds: common::is_committed_case(&dir) && dev.is_cpu(),
                errors: vec![],
                autocast,
            };
            if ["pipeline", "controlnet", "text2video", "videocrafter"].contains(&kind.as_str()) {
                run_pipeline_case(&dir, dev, dtype, &mut report);
            } else if kind == "sdxl" {
                run_sdxl_case(&dir, dev, dtype, &mut report);
            } else if kind == "pixart" {
                run_pixart_case(&dir, dev, dtype, &mut report);
            } else {
                run_reward_case(&dir, &kind, dev, dtype, &mut report);
            }
            (report.failures, report.errors)
        });
        match outcome {
            Ok((f, errs)) => {
                failures.extend(f);
                errors.extend(errs);
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("  FAILED to run: {msg}");
                failures.push(format!("{name}: {msg}"));
            }
        }
        ran.push(dir.clone());
    }
    println!("parity: {} case(s) run", ran.len());
    if !strict {
        println!(
            "cases without {dtype:?} autocast references (tools/gen_autocast.py writes them): {}",
            if without_autocast.is_empty() {
                "none".to_string()
            } else {
                without_autocast.join(", ")
            }
        );
    }
    if !strict {
        // The largest error of each tensor over all cases, for the record.
        let mut worst: Vec<(String, f64)> = vec![];
        for (name, e) in errors {
            match worst.iter_mut().find(|(n, _)| *n == name) {
                Some(w) => w.1 = w.1.max(e),
                None => worst.push((name, e)),
            }
        }
        println!("parity {dtype:?} on {dev:?}, largest max rel err per tensor over all cases:");
        for (name, e) in &worst {
            println!("  {name:<30} {e:.3e}");
        }
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
    // The autocast run takes the plain pipeline cases (those with autocast references).
    let committed: Vec<&str> = if pipelines_only {
        vec!["sd-rescale-tiny", "sd-variant", "sd15-tiny", "sd2-tiny"]
    } else {
        [
            &common::COMMITTED_PIPELINE_CASES[..],
            &common::COMMITTED_SDXL_CASES[..],
            &common::COMMITTED_PIXART_CASES[..],
            &common::COMMITTED_REWARD_CASES[..],
        ]
        .concat()
    };
    let missing = common::missing_cases(&committed, &ran);
    assert!(
        missing.is_empty(),
        "committed cases that did not run: {missing:?}"
    );
}
