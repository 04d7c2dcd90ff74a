//! Every sampler against diffusers 0.42.1, step for step (`tests/fixtures/schedulers/`, made by
//! `tools/gen_scheduler_fixtures.py`): from a model's `scheduler_config.json` as SD1.5 and
//! SD2.1 ship it, the timesteps, sigmas and initial noise scale of a run, then at every step
//! the UNet's input, the next sample and the predicted x0 (every sampler's: see the fixtures'
//! `pred_original_sample_source` for those whose step() returns none), on a
//! fake model whose output depends on its input (`0.5 * input + 0.5 * e_i`), so an error at
//! one step reaches every later one. Stochastic steps get the noise diffusers drew.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff};
use reneg::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

/// A fixture's JSON, read as model configs are (Python's `-Infinity` included).
fn read(path: &Path) -> Value {
    reneg::error::read_json(path).unwrap()
}

/// The sampler a fixture's class and overrides stand for.
fn kind_of(case: &Value) -> SchedulerKind {
    let karras = case["overrides"]["use_karras_sigmas"] == Value::Bool(true);
    match case["class"].as_str().unwrap() {
        "DDIMScheduler" => SchedulerKind::Ddim,
        "EulerDiscreteScheduler" => SchedulerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
        "DPMSolverMultistepScheduler" if karras => SchedulerKind::DpmPp2mKarras,
        "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
        "UniPCMultistepScheduler" => SchedulerKind::UniPc,
        "PNDMScheduler" => SchedulerKind::Pndm,
        c => panic!("no sampler for {c}"),
    }
}

/// The scheduler a user gets from the fixture's model config with `--scheduler` and the
/// fixture's other overrides (e.g. a timestep spacing) written into the config.
fn scheduler_for(case: &Value) -> Scheduler {
    let mut raw = case["source_config"].clone();
    for (k, v) in case["overrides"].as_object().unwrap() {
        if k != "use_karras_sigmas" {
            raw[k] = v.clone();
        }
    }
    let cfg = SchedulerConfig::from_value(raw, Path::new("<fixture config>")).unwrap();
    let mut s = Scheduler::new(kind_of(case), cfg).unwrap();
    if let Some(eta) = case["eta"].as_f64() {
        s.set_eta(eta).unwrap();
    }
    s
}

/// Largest relative error over a run: |ours - theirs| / max(1, |theirs|).
struct Worst(f64, String);

impl Worst {
    fn see(&mut self, what: String, ours: &Tensor, theirs: &Tensor) {
        let e = max_abs_diff(ours, theirs) / max_abs(theirs).max(1.0);
        if e > self.0 {
            *self = Worst(e, what);
        }
    }
}

/// The tolerance of a whole run relative to the values' scale. diffusers computes in float32
/// with torch's scalar arithmetic, reneg in float32 tensors with float64 coefficients: they
/// differ by a few float32 ulps (measured over the 16 cases: at most 5.4e-7, DPM++ 2M Karras
/// at its ninth step), so a wrong coefficient, timestep or history entry (errors of 1e-3 and
/// more, `a_wrong_sampler_fails_the_fixtures`) fails.
const TOL: f64 = 1.5e-6;

fn run_case(name: &str) -> f64 {
    let dir = fixtures();
    let case: Value = read(&dir.join(format!("{name}.json")));
    let t: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
            .unwrap();
    let get = |k: &str| t.get(k).unwrap_or_else(|| panic!("{name}: no {k}")).clone();
    let mut s = scheduler_for(&case);
    let steps = case["steps"].as_u64().unwrap() as usize;
    s.set_timesteps(steps).unwrap();

    let want_ts: Vec<f64> = case["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(s.timesteps().len(), want_ts.len(), "{name}: timestep count");
    for (a, b) in s.timesteps().iter().zip(&want_ts) {
        // Timesteps are float32 in diffusers.
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{name}: timesteps {:?} vs {want_ts:?}",
            s.timesteps()
        );
    }
    let init = case["init_noise_sigma"].as_f64().unwrap();
    assert!(
        (s.init_noise_sigma() - init).abs() <= 1e-6 * init,
        "{name}: init_noise_sigma {} vs {init}",
        s.init_noise_sigma()
    );

    let mut worst = Worst(0.0, String::new());
    let mut x = (get("noise") * s.init_noise_sigma()).unwrap();
    for i in 0..want_ts.len() {
        let input = s.scale_model_input(&x, i).unwrap();
        worst.see(
            format!("model_input.{i}"),
            &input,
            &get(&format!("model_input.{i}")),
        );
        // The fake model, on our own input.
        let out = ((&input * 0.5).unwrap() + (get(&format!("e.{i}")) * 0.5).unwrap()).unwrap();
        let mut noise = |step: usize, shape: &[usize]| -> reneg::error::Result<Tensor> {
            let z = get(&format!("step_noise.{step}"));
            assert_eq!(z.dims(), shape);
            Ok(z)
        };
        let o = s.step(&out, i, &x, &mut noise).unwrap();
        // Every sampler's x0 (what ReNeg decodes for its reward): the step's own where diffusers
        // returns one, else diffusers' own conversion (DPM++, UniPC) or, for PNDM, which keeps
        // none, the training schedule's formula (the case's pred_original_sample_source).
        let want = t
            .get(&format!("pred_original_sample.{i}"))
            .unwrap_or_else(|| panic!("{name}: no pred_original_sample.{i} in the fixture"));
        worst.see(
            format!("pred_original_sample.{i}"),
            &o.pred_original_sample,
            want,
        );
        // The stateless x0 ReNeg differentiates is the step's own.
        let again = s.pred_original_sample(&out, i, &x).unwrap();
        assert_eq!(
            max_abs_diff(&again, &o.pred_original_sample),
            0.0,
            "{name}: x0 at {i}"
        );
        worst.see(
            format!("prev_sample.{i}"),
            &o.prev_sample,
            &get(&format!("prev_sample.{i}")),
        );
        x = o.prev_sample;
    }
    println!(
        "{name}: worst relative error {:.2e} at {}",
        worst.0, worst.1
    );
    assert!(worst.0 <= TOL, "{name}: {} off by {:.3e}", worst.1, worst.0);
    worst.0
}

#[test]
fn every_sampler_matches_diffusers_step_for_step() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "json").then(|| p.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    names.sort();
    // Every sampler is covered, with epsilon and v prediction.
    assert!(names.len() >= 16, "{names:?}");
    for kind in SchedulerKind::ALL {
        assert!(
            names.iter().any(|n| {
                let c: Value = read(&fixtures().join(format!("{n}.json")));
                kind_of(&c) == kind
            }),
            "no fixture for {kind}"
        );
    }
    for n in &names {
        run_case(n);
    }
}

/// The fixture runs are sensitive: a sampler whose history is dropped (multistep solvers run
/// as first order) or whose input scaling is left out fails them. Checked by running a case
/// with a deliberately wrong sampler.
#[test]
fn a_wrong_sampler_fails_the_fixtures() {
    let dir = fixtures();
    for (name, wrong) in [
        ("dpmpp_2m_sd15", SchedulerKind::UniPc),
        ("unipc_sd15", SchedulerKind::DpmPp2m),
        ("euler_a_sd15", SchedulerKind::Euler),
        ("pndm_sd15", SchedulerKind::Ddim),
    ] {
        let case: Value = read(&dir.join(format!("{name}.json")));
        let t =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap();
        let cfg =
            SchedulerConfig::from_value(case["source_config"].clone(), Path::new("<x>")).unwrap();
        let mut s = Scheduler::new(wrong, cfg).unwrap();
        s.set_timesteps(case["steps"].as_u64().unwrap() as usize)
            .unwrap();
        let mut x = (t["noise"].clone() * s.init_noise_sigma()).unwrap();
        let n = s.len().min(case["timesteps"].as_array().unwrap().len());
        let mut err: f64 = 0.0;
        for i in 0..n {
            let input = s.scale_model_input(&x, i).unwrap();
            let out =
                ((&input * 0.5).unwrap() + (t[&format!("e.{i}")].clone() * 0.5).unwrap()).unwrap();
            let mut noise = |_: usize, shape: &[usize]| -> reneg::error::Result<Tensor> {
                Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?)
            };
            x = s.step(&out, i, &x, &mut noise).unwrap().prev_sample;
            let want = &t[&format!("prev_sample.{i}")];
            err = err.max(max_abs_diff(&x, want) / max_abs(want).max(1.0));
        }
        assert!(
            err > 100.0 * TOL,
            "{name} run as {wrong}: error only {err:.2e}"
        );
    }
}

#[test]
fn the_model_config_chooses_the_sampler_as_diffusers_does() {
    let load = |v: Value| SchedulerConfig::from_value(v, Path::new("s.json")).unwrap();
    let (s, note) = Scheduler::from_config(load(serde_json::json!({
        "_class_name": "PNDMScheduler", "skip_prk_steps": true, "steps_offset": 1})))
    .unwrap();
    assert_eq!((s.kind(), note), (SchedulerKind::Pndm, None));
    let (s, _) = Scheduler::from_config(load(serde_json::json!({
        "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true})))
    .unwrap();
    assert_eq!(s.kind(), SchedulerKind::DpmPp2mKarras);
    let (s, _) = Scheduler::from_config(load(serde_json::json!({}))).unwrap();
    assert_eq!(s.kind(), SchedulerKind::Ddim);
    // A class reneg lacks: DDIM, with a note naming the class and the flag.
    let (s, note) = Scheduler::from_config(load(serde_json::json!({
        "_class_name": "LMSDiscreteScheduler"})))
    .unwrap();
    assert_eq!(s.kind(), SchedulerKind::Ddim);
    let note = note.unwrap();
    assert!(
        note.contains("LMSDiscreteScheduler") && note.contains("--scheduler"),
        "{note}"
    );
    // diffusers' PNDM default runs the Runge-Kutta warm-up reneg lacks: said, PLMS runs.
    let (s, note) =
        Scheduler::from_config(load(serde_json::json!({"_class_name": "PNDMScheduler"}))).unwrap();
    assert_eq!(s.kind(), SchedulerKind::Pndm);
    assert!(note.unwrap().contains("skip_prk_steps"));
    // Class defaults: DPM++ spaces by linspace unless the file says otherwise, DDIM by leading.
    let sd15 = load(
        serde_json::json!({"_class_name": "PNDMScheduler", "steps_offset": 1,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "skip_prk_steps": true}),
    );
    let mut dpm = Scheduler::new(SchedulerKind::DpmPp2m, sd15.clone()).unwrap();
    dpm.set_timesteps(10).unwrap();
    assert_eq!(dpm.timesteps()[0], 999.0);
    let mut ddim = Scheduler::new(SchedulerKind::Ddim, sd15).unwrap();
    ddim.set_timesteps(10).unwrap();
    assert_eq!(ddim.timesteps()[0], 901.0);
}

#[test]
fn settings_a_sampler_cannot_honour_are_refused_with_the_key() {
    let cfg = |v: Value| SchedulerConfig::from_value(v, Path::new("sched.json")).unwrap();
    let cases = [
        (
            SchedulerKind::Euler,
            serde_json::json!({"interpolation_type": "log_linear"}),
            "interpolation_type",
        ),
        (
            SchedulerKind::Euler,
            serde_json::json!({"use_exponential_sigmas": true}),
            "use_exponential_sigmas",
        ),
        (
            SchedulerKind::DpmPp2m,
            serde_json::json!({"solver_type": "heun"}),
            "solver_type",
        ),
        (
            SchedulerKind::UniPc,
            serde_json::json!({"solver_order": 3}),
            "solver_order",
        ),
        (
            SchedulerKind::UniPc,
            serde_json::json!({"predict_x0": false}),
            "predict_x0",
        ),
        (
            SchedulerKind::Pndm,
            serde_json::json!({"prediction_type": "sample"}),
            "prediction_type",
        ),
    ];
    for (kind, v, key) in cases {
        let err = Scheduler::new(kind, cfg(v)).unwrap_err().to_string();
        assert!(
            err.contains("sched.json") && err.contains(key),
            "{kind}: {err}"
        );
    }
    // eta belongs to DDIM.
    let mut euler = Scheduler::new(SchedulerKind::Euler, cfg(serde_json::json!({}))).unwrap();
    assert!(euler.set_eta(0.5).unwrap_err().to_string().contains("DDIM"));
    let mut ddim = Scheduler::ddim(cfg(serde_json::json!({}))).unwrap();
    assert!(ddim.set_eta(1.5).is_err());
    ddim.set_eta(1.0).unwrap();
    assert!(ddim.is_stochastic());
    // Unknown names list the known ones.
    let err = "dpm++3m".parse::<SchedulerKind>().unwrap_err();
    assert!(err.contains("dpm++2m-karras"), "{err}");
    // Steps in order only: a multistep solver's history would be wrong otherwise.
    let mut s = Scheduler::new(SchedulerKind::DpmPp2m, cfg(serde_json::json!({}))).unwrap();
    s.set_timesteps(4).unwrap();
    let x = Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let mut no_noise = |_: usize, _: &[usize]| -> reneg::error::Result<Tensor> { unreachable!() };
    assert!(s.step(&x, 1, &x, &mut no_noise).is_err());
    s.step(&x, 0, &x, &mut no_noise).unwrap();
    s.step(&x, 1, &x, &mut no_noise).unwrap();
}

/// diffusers writes Python's `-Infinity` into DPM-Solver configs (`lambda_min_clipped`); such
/// a file loads, and the same word inside a string is left alone.
#[test]
fn configs_with_pythons_infinity_load() {
    let dir = std::env::temp_dir().join(format!("reneg-sched-inf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(
        &path,
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "variance_type": null, "note": "NaN and -Infinity stay text", "sigma_max": NaN}"#,
    )
    .unwrap();
    let cfg = SchedulerConfig::load(&path).unwrap();
    let (s, note) = Scheduler::from_config(cfg).unwrap();
    assert_eq!((s.kind(), note), (SchedulerKind::DpmPp2m, None));
    let v: Value = reneg::error::read_json(&path).unwrap();
    assert_eq!(v["note"], "NaN and -Infinity stay text");
    assert!(v["lambda_min_clipped"].is_null() && v["sigma_max"].is_null());
    std::fs::remove_dir_all(&dir).unwrap();
}
