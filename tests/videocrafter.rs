//! VideoCrafter2 (lvdm) pieces on their own: its DDIM (uniform timesteps, the checkpoint's
//! tables, scale_arr), its yaml config, and the safe reader on the checkpoint nestings lvdm
//! loads. tests/parity.rs checks the whole model against lvdm's own code; crates/cli/tests
//! runs it end to end.

mod common;

use candle_core::{DType, Device, Tensor};
use reneg::family::videocrafter::config::LvdmConfig;
use reneg::scheduler::{ProcessTables, Scheduler, SchedulerConfig, SchedulerKind};
use std::path::Path;

fn lvdm_scheduler(cfg: &LvdmConfig) -> Scheduler {
    let tables = ProcessTables {
        alphas_cumprod: cfg.alphas_cumprod(),
        scale: cfg.scale_arr(),
    };
    let sc = SchedulerConfig::from_value(cfg.scheduler_json(), Path::new("<lvdm>"))
        .unwrap()
        .with_tables(tables, Path::new("<lvdm>"))
        .unwrap();
    Scheduler::ddim(sc).unwrap()
}

#[test]
fn uniform_timesteps_visit_every_multiple_and_refuse_past_the_end() {
    let mut s = lvdm_scheduler(&LvdmConfig::videocrafter2());
    let cases: [(usize, Vec<f64>); 3] = [
        (6, vec![997., 831., 665., 499., 333., 167., 1.]),
        (4, vec![751., 501., 251., 1.]),
        (1, vec![1.]),
    ];
    for (steps, want) in cases {
        s.set_timesteps(steps).unwrap();
        assert_eq!(s.timesteps(), want.as_slice(), "{steps} steps");
    }
    s.set_timesteps(50).unwrap();
    assert_eq!((s.len(), s.timestep(0).unwrap()), (50, 981.0));
    s.set_timesteps(30).unwrap();
    assert_eq!((s.len(), s.timestep(0).unwrap()), (31, 991.0));
    // 1000 // 3 = 333 and 1000 // 27 = 37 divide 999: lvdm indexes alphas_cumprod[1000].
    for steps in [3, 27] {
        let err = s.set_timesteps(steps).unwrap_err().to_string();
        assert!(
            err.contains("timestep 1000") && err.contains("step count"),
            "{err}"
        );
    }
}

/// One step at eta 0 and one at eta 1 against lvdm's update written out here from
/// `DDIMSampler.p_sample_ddim` (use_scale), including the last step's a[0] and s[0].
#[test]
fn ddim_step_is_lvdms_update_with_scale_arr() {
    let cfg = LvdmConfig::videocrafter2();
    let (acp, s_arr) = (cfg.alphas_cumprod(), cfg.scale_arr().unwrap());
    let x = common::randn(1, &[1, 4, 2, 3, 3])
        .to_dtype(DType::F32)
        .unwrap();
    let e = common::randn(2, &[1, 4, 2, 3, 3])
        .to_dtype(DType::F32)
        .unwrap();
    let z = common::randn(3, &[1, 4, 2, 3, 3])
        .to_dtype(DType::F32)
        .unwrap();
    for eta in [0.0, 1.0] {
        let mut s = lvdm_scheduler(&cfg);
        s.set_eta(eta).unwrap();
        s.set_timesteps(4).unwrap(); // 751, 501, 251, 1
        let mut x_i = x.clone();
        for i in 0..4 {
            let t = s.timestep(i).unwrap() as usize;
            let prev = t.saturating_sub(250);
            let (a, ap) = (acp[t] as f64, acp[prev] as f64);
            let (st, sp) = (s_arr[t] as f64, s_arr[prev] as f64);
            let sigma = eta * ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).sqrt();
            let x0 = ((((&x_i - (&e * (1.0 - a).sqrt()).unwrap()).unwrap()) / a.sqrt()).unwrap()
                / st)
                .unwrap();
            let want = ((&x0 * (ap.sqrt() * sp)).unwrap()
                + (&e * (1.0 - ap - sigma * sigma).sqrt()).unwrap()
                + (&z * sigma).unwrap())
            .unwrap();
            let zc = z.clone();
            let out = s.step(&e, i, &x_i, &mut |_, _| Ok(zc.clone())).unwrap();
            let err = common::max_abs(&(&out.prev_sample - &want).unwrap());
            assert!(err < 1e-5, "eta {eta} step {i} (t {t}): {err:e}");
            let err0 = common::max_abs(&(&out.pred_original_sample - &x0).unwrap());
            assert!(err0 < 1e-5, "eta {eta} step {i} x0: {err0:e}");
            // The last step goes to a[0] < 1 with s[0] = 1, not to a clean 1.
            if i == 3 {
                assert_eq!((prev, s_arr[0]), (0, 1.0));
                assert!(ap < 0.9992 && ap > 0.999, "a[0] = {ap}");
            }
            x_i = out.prev_sample;
        }
    }
}

#[test]
fn scale_arr_is_refused_by_other_samplers() {
    let s = lvdm_scheduler(&LvdmConfig::videocrafter2());
    for kind in SchedulerKind::ALL {
        if kind == SchedulerKind::Ddim {
            continue;
        }
        let err = s.with_kind(kind).unwrap_err().to_string();
        assert!(
            err.contains("use_scale") && err.contains(kind.name()),
            "{kind}: {err}"
        );
    }
}

#[test]
fn the_built_in_config_is_videocrafter2s() {
    let c = LvdmConfig::videocrafter2();
    assert_eq!(
        (
            c.unet.model_channels,
            c.unet.channel_mult.clone(),
            c.unet.context_dim
        ),
        (320, vec![1, 2, 4, 4], 1024)
    );
    assert_eq!(c.unet.attention_levels(), vec![true, true, true, false]);
    assert!(c.unet.fps_cond && c.diffusion.use_scale);
    assert_eq!(c.text.layer, "penultimate");
    let s = c.scale_arr().unwrap();
    assert_eq!(s.len(), 1400, "fix_scale_bug off: 400 + 1000");
    assert_eq!((s[0], s[399], s[400], s[1399]), (1.0, 0.7, 0.7, 0.7));
    assert!((s[1] - (1.0 - 0.3 / 399.0)).abs() < 1e-7);
    let acp = c.alphas_cumprod();
    assert!((acp[0] - (1.0 - 0.00085)).abs() < 1e-7, "{}", acp[0]);
    assert!((acp[999] - 0.004_660_3).abs() < 1e-6, "{}", acp[999]);
}

#[test]
fn configs_reneg_does_not_run_are_refused_by_key() {
    let base = include_str!("fixtures/parity/videocrafter2-tiny/model/config.yaml");
    let cases = [
        (
            "use_relative_position: false",
            "use_relative_position: true",
            "use_relative_position",
        ),
        (
            "temporal_conv: true",
            "temporal_conv: false",
            "temporal_conv",
        ),
        (
            "lvdm.models.ddpm3d.LatentDiffusion",
            "ldm.models.diffusion.ddpm.LatentDiffusion",
            "model.target",
        ),
        ("use_linear: true", "use_linear: false", "use_linear"),
    ];
    assert!(LvdmConfig::parse(base, Path::new("t.yaml")).is_ok());
    for (from, to, key) in cases {
        assert!(base.contains(from), "{from}");
        let text = base.replace(from, to);
        let err = LvdmConfig::parse(&text, Path::new("t.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains("t.yaml"), "{key}: {err}");
    }
    let err = LvdmConfig::parse("model: [1, 2]", Path::new("t.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a VideoCrafter (lvdm) config"), "{err}");
}

/// The weights of a Lightning checkpoint (`state_dict`), a DeepSpeed one (`module`, keys with
/// `_forward_module.`) and a plain state dict, with the metadata beside them (ints, a long,
/// floats, strings, bytes, tuples, sets, lists, an optimizer state) skipped.
#[test]
fn checkpoint_nestings_lvdm_loads() {
    let dir = Path::new("tests/fixtures/videocrafter/pickles");
    let want =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    for name in ["lightning.ckpt", "deepspeed.ckpt", "plain.ckpt"] {
        let got = reneg::model_file::read(&dir.join(name)).unwrap();
        let mut keys: Vec<&String> = got.keys().collect();
        keys.sort();
        let mut want_keys: Vec<&String> = want.keys().collect();
        want_keys.sort();
        assert_eq!(keys, want_keys, "{name}");
        for (k, w) in &want {
            let g: &Tensor = &got[k];
            let err = common::max_abs(&(g.to_dtype(DType::F32).unwrap() - w).unwrap());
            assert_eq!(err, 0.0, "{name}: {k}");
        }
    }
}
