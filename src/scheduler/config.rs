//! A model's `scheduler_config.json`, read as diffusers' `from_config` reads it for a chosen
//! sampler class: the keys that class takes, its own defaults for the others, and a refusal
//! (naming the file, key and value) for settings reneg does not implement.

use crate::error::{read_json, Error, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
    /// lvdm's (VideoCrafter's) `uniform` discretisation: `range(0, T, T // steps)` plus
    /// `steps_offset`, every one of them, so a step count that does not divide T visits more
    /// timesteps than asked (50 -> 50, 30 -> 31, 6 -> 7).
    Uniform,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// The samplers reneg implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
    UniPc,
    Pndm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 7] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
        Self::UniPc,
        Self::Pndm,
    ];

    /// The name `--scheduler` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpm++2m",
            Self::DpmPp2mKarras => "dpm++2m-karras",
            Self::UniPc => "unipc",
            Self::Pndm => "pndm",
        }
    }

    /// The name A1111 and ComfyUI users know it by (A1111 calls PNDM's PLMS mode "PLMS").
    pub fn label(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::DpmPp2m => "DPM++ 2M",
            Self::DpmPp2mKarras => "DPM++ 2M Karras",
            Self::UniPc => "UniPC",
            Self::Pndm => "PLMS",
        }
    }

    /// The diffusers class that implements it.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmPp2m | Self::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Pndm => "PNDMScheduler",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for SchedulerKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for SchedulerKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown scheduler `{s}`; choose one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Scheduler classes whose config describes a Stable Diffusion noise process; those reneg does
/// not implement are sampled with DDIM by default (and `--scheduler` picks another).
const COMPATIBLE: &[&str] = &[
    "DDIMScheduler",
    "PNDMScheduler",
    "DDPMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
];

/// `final_sigmas_type`: the sigma after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigma {
    Zero,
    SigmaMin,
}

/// A scheduler config resolved for one sampler; it keeps the file as read, so another sampler
/// can be resolved from it ([`SchedulerConfig::for_kind`]).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    raw: Map<String, Value>,
    path: PathBuf,
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    /// DDIM: clamp x0 to +-clip_sample_range.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// DDIM and PNDM: alpha-bar after the last step is 1 (else alpha-bar at t = 0).
    pub set_alpha_to_one: bool,
    /// PNDM: PLMS only (the Runge-Kutta warm-up is skipped), as Stable Diffusion ships it.
    pub skip_prk_steps: bool,
    /// Euler, DPM++, UniPC: Karras et al.'s sigmas (rho 7).
    pub use_karras_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: FinalSigma,
    /// DPM++ and UniPC: first order at the last step (and second at the one before).
    pub lower_order_final: bool,
    /// DPM++: Euler at the last step.
    pub euler_at_final: bool,
    /// UniPC: steps whose corrector is skipped.
    pub disable_corrector: Vec<usize>,
    /// UniPC: `bh1` or `bh2`.
    pub unipc_bh2: bool,
    /// A process given by tables instead of the beta formulas (None: the formulas).
    pub tables: Option<std::sync::Arc<ProcessTables>>,
}

/// A noise process given by tables, as lvdm (VideoCrafter2) samples with the buffers of its
/// checkpoint: alpha-bar, and with `use_scale` the `scale_arr` s(t) by which its forward
/// process scales the clean latents, x_t = sqrt(alpha-bar_t) s(t) x0 + sqrt(1 - alpha-bar_t) e.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessTables {
    pub alphas_cumprod: Vec<f32>,
    pub scale: Option<Vec<f32>>,
}

/// The keys whose defaults depend on the class, per diffusers 0.42.1.
fn class_default(kind: Option<SchedulerKind>, key: &str) -> Value {
    use SchedulerKind::*;
    match (key, kind) {
        ("timestep_spacing", Some(Ddim | Pndm) | None) => "leading".into(),
        ("timestep_spacing", _) => "linspace".into(),
        ("set_alpha_to_one", Some(Pndm)) => false.into(),
        ("set_alpha_to_one", _) => true.into(),
        ("clip_sample", _) => true.into(),
        ("skip_prk_steps", _) => false.into(),
        _ => Value::Null,
    }
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_value(read_json(path)?, path)
    }

    /// Parses and validates a config given as JSON; `path` names it in errors. Resolved with
    /// the defaults of the class the file names (DDIM's when it names none).
    pub fn from_value(raw: Value, path: &Path) -> Result<Self> {
        let Value::Object(raw) = raw else {
            return Err(Error::file(
                path,
                "invalid scheduler config: not a JSON object",
            ));
        };
        let class_name = match raw.get("_class_name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                return Err(Error::file(
                    path,
                    format!("invalid scheduler config: _class_name {v} is not a string"),
                ))
            }
        };
        if let Some(name) = &class_name {
            if !COMPATIBLE.contains(&name.as_str()) {
                return Err(Error::unsupported(
                    path,
                    "_class_name",
                    name,
                    "not a Stable Diffusion noise scheduler; use DDIMScheduler",
                ));
            }
        }
        let kind = class_name.as_deref().and_then(kind_of_class);
        Self::resolve(raw, path.to_path_buf(), class_name, kind, &Map::new())
    }

    /// The config `kind` samples with: the file's keys, `kind`'s class defaults, and the
    /// settings its name fixes (DPM++ 2M is second order, its Karras variant Karras).
    pub fn for_kind(&self, kind: SchedulerKind) -> Result<Self> {
        if self.tables.as_ref().is_some_and(|t| t.scale.is_some()) && kind != SchedulerKind::Ddim {
            return Err(Error::Invalid(format!(
                "{}: this model's noise process scales the clean latents by timestep (lvdm's use_scale, VideoCrafter2), which only lvdm's DDIM sampler implements; drop --scheduler {} (or choose ddim)",
                self.path.display(),
                kind.name()
            )));
        }
        let mut fixed = Map::new();
        match kind {
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
                fixed.insert("algorithm_type".into(), "dpmsolver++".into());
                fixed.insert("solver_order".into(), 2.into());
                fixed.insert(
                    "use_karras_sigmas".into(),
                    (kind == SchedulerKind::DpmPp2mKarras).into(),
                );
            }
            SchedulerKind::Pndm => {
                // A1111's and diffusers' SD pipelines run PNDM as PLMS.
                fixed.insert("skip_prk_steps".into(), true.into());
            }
            _ => {}
        }
        let mut cfg = Self::resolve(
            self.raw.clone(),
            self.path.clone(),
            self.class_name.clone(),
            Some(kind),
            &fixed,
        )?;
        cfg.tables.clone_from(&self.tables);
        Ok(cfg)
    }

    /// This config with its process given by `tables` (one entry per training timestep at
    /// least), naming `source` when they do not fit.
    pub fn with_tables(mut self, tables: ProcessTables, source: &Path) -> Result<Self> {
        let n = self.num_train_timesteps;
        let short = |what: &str, len: usize| {
            Error::file(
                source,
                format!("{what} has {len} entries; the schedule needs {n}"),
            )
        };
        if tables.alphas_cumprod.len() != n {
            return Err(short("alphas_cumprod", tables.alphas_cumprod.len()));
        }
        if let Some(s) = &tables.scale {
            if s.len() < n {
                return Err(short("scale_arr", s.len()));
            }
        }
        let bad = |v: &f32| !(v.is_finite() && *v > 0.0 && *v <= 1.0);
        if tables.alphas_cumprod.iter().any(bad) {
            return Err(Error::file(
                source,
                "alphas_cumprod holds values outside (0, 1]: not a diffusion schedule",
            ));
        }
        if tables
            .scale
            .iter()
            .flatten()
            .any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(Error::file(
                source,
                "scale_arr holds values that are not positive",
            ));
        }
        self.tables = Some(std::sync::Arc::new(tables));
        Ok(self)
    }

    /// The sampler the file's class names, and a note when reneg stands DDIM in for it.
    pub fn default_kind(&self) -> (SchedulerKind, Option<String>) {
        match self.class_name.as_deref() {
            None => (SchedulerKind::Ddim, None),
            Some(name) => match kind_of_class(name) {
                Some(k) => {
                    let k = if k == SchedulerKind::DpmPp2m && self.use_karras_sigmas {
                        SchedulerKind::DpmPp2mKarras
                    } else {
                        k
                    };
                    // Settings of the file that the sampler's name fixes otherwise.
                    let differs = |key: &str, want: Value| {
                        self.raw.get(key).is_some_and(|v| !v.is_null() && *v != want)
                    };
                    let note = match k {
                        SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras
                            if differs("algorithm_type", "dpmsolver++".into())
                                || differs("solver_order", 2.into()) =>
                        {
                            Some("its algorithm_type or solver_order is not DPM++ 2M's")
                        }
                        SchedulerKind::Pndm if !self.skip_prk_steps => {
                            Some("skip_prk_steps is false, but only PLMS is implemented")
                        }
                        _ => None,
                    };
                    let note = note.map(|why| {
                        format!(
                            "{}: {why}; sampling with {} (choose another with --scheduler)",
                            self.path.display(),
                            k.label()
                        )
                    });
                    (k, note)
                }
                None => (
                    SchedulerKind::Ddim,
                    Some(format!(
                        "{}: {name} is not implemented; sampling with DDIM (choose another with --scheduler)",
                        self.path.display()
                    )),
                ),
            },
        }
    }

    fn resolve(
        raw: Map<String, Value>,
        path: PathBuf,
        class_name: Option<String>,
        kind: Option<SchedulerKind>,
        fixed: &Map<String, Value>,
    ) -> Result<Self> {
        let get = |key: &str| -> Option<&Value> {
            fixed
                .get(key)
                .or_else(|| raw.get(key))
                .filter(|v| !v.is_null())
        };
        let read = |key: &str, default: Value| -> Result<Value> {
            Ok(get(key).cloned().unwrap_or(default))
        };
        fn typed<T: DeserializeOwned>(path: &Path, key: &str, v: Value) -> Result<T> {
            serde_json::from_value(v.clone())
                .map_err(|e| Error::file(path, format!("invalid scheduler config: {key} {v}: {e}")))
        }
        let p = path.as_path();
        let cd = |key: &str| class_default(kind, key);
        let cfg = Self {
            num_train_timesteps: typed(
                p,
                "num_train_timesteps",
                read("num_train_timesteps", 1000.into())?,
            )?,
            beta_start: typed(p, "beta_start", read("beta_start", 0.0001.into())?)?,
            beta_end: typed(p, "beta_end", read("beta_end", 0.02.into())?)?,
            beta_schedule: typed(p, "beta_schedule", read("beta_schedule", "linear".into())?)?,
            trained_betas: typed(p, "trained_betas", read("trained_betas", Value::Null)?)?,
            prediction_type: typed(
                p,
                "prediction_type",
                read("prediction_type", "epsilon".into())?,
            )?,
            timestep_spacing: typed(
                p,
                "timestep_spacing",
                read("timestep_spacing", cd("timestep_spacing"))?,
            )?,
            steps_offset: typed(p, "steps_offset", read("steps_offset", 0.into())?)?,
            rescale_betas_zero_snr: typed(
                p,
                "rescale_betas_zero_snr",
                read("rescale_betas_zero_snr", false.into())?,
            )?,
            clip_sample: typed(p, "clip_sample", read("clip_sample", cd("clip_sample"))?)?,
            clip_sample_range: typed(
                p,
                "clip_sample_range",
                read("clip_sample_range", 1.0.into())?,
            )?,
            set_alpha_to_one: typed(
                p,
                "set_alpha_to_one",
                read("set_alpha_to_one", cd("set_alpha_to_one"))?,
            )?,
            skip_prk_steps: typed(
                p,
                "skip_prk_steps",
                read("skip_prk_steps", cd("skip_prk_steps"))?,
            )?,
            use_karras_sigmas: typed(
                p,
                "use_karras_sigmas",
                read("use_karras_sigmas", false.into())?,
            )?,
            sigma_min: typed(p, "sigma_min", read("sigma_min", Value::Null)?)?,
            sigma_max: typed(p, "sigma_max", read("sigma_max", Value::Null)?)?,
            final_sigmas_type: typed(
                p,
                "final_sigmas_type",
                read("final_sigmas_type", "zero".into())?,
            )?,
            lower_order_final: typed(
                p,
                "lower_order_final",
                read("lower_order_final", true.into())?,
            )?,
            euler_at_final: typed(p, "euler_at_final", read("euler_at_final", false.into())?)?,
            disable_corrector: typed(
                p,
                "disable_corrector",
                read("disable_corrector", Value::Array(vec![]))?,
            )?,
            unipc_bh2: {
                let s: String = typed(p, "solver_type", read("solver_type", "bh2".into())?)?;
                s == "bh2"
            },
            raw: Map::new(),
            path: path.clone(),
            class_name,
            tables: None,
        };
        let refuse = |key: &str, value: &dyn std::fmt::Display, why: &str| {
            Err(Error::unsupported(p, key, value, why))
        };
        if cfg.num_train_timesteps == 0 {
            // Found by the fuzzer (tests/fuzz.rs): no training timesteps indexed an empty table.
            return refuse("num_train_timesteps", &0, "must be at least 1");
        }
        if get("thresholding") == Some(&Value::Bool(true)) {
            return refuse("thresholding", &true, "only false is supported");
        }
        if let Some(b) = &cfg.trained_betas {
            if b.len() != cfg.num_train_timesteps {
                return refuse(
                    "trained_betas",
                    &format!("{} values", b.len()),
                    "needs num_train_timesteps values",
                );
            }
        }
        if cfg.timestep_spacing == TimestepSpacing::Uniform
            && !matches!(kind, None | Some(SchedulerKind::Ddim))
        {
            return refuse(
                "timestep_spacing",
                &"uniform",
                "lvdm's uniform spacing is its DDIM sampler's; choose --scheduler ddim",
            );
        }
        // Settings of the samplers' own keys that reneg does not implement.
        let flag = |key: &str| get(key) == Some(&Value::Bool(true));
        let uses_sigmas = matches!(
            kind,
            Some(
                SchedulerKind::Euler
                    | SchedulerKind::DpmPp2m
                    | SchedulerKind::DpmPp2mKarras
                    | SchedulerKind::UniPc
            )
        );
        if uses_sigmas {
            for key in [
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
            ] {
                if flag(key) {
                    return refuse(key, &true, "not implemented; choose another --scheduler");
                }
            }
        }
        if kind == Some(SchedulerKind::Euler) {
            let interp = read("interpolation_type", "linear".into())?;
            if interp != "linear" {
                return refuse(
                    "interpolation_type",
                    &interp,
                    "only \"linear\" is implemented",
                );
            }
            let tt = read("timestep_type", "discrete".into())?;
            if tt != "discrete" {
                return refuse("timestep_type", &tt, "only \"discrete\" is implemented");
            }
        }
        if matches!(
            kind,
            Some(SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras)
        ) {
            let solver = read("solver_type", "midpoint".into())?;
            if solver != "midpoint" {
                return refuse("solver_type", &solver, "DPM++ 2M here uses \"midpoint\"");
            }
            if let Some(v) = get("variance_type") {
                return refuse("variance_type", v, "only null is implemented");
            }
            if let Some(v) = get("lambda_min_clipped").and_then(Value::as_f64) {
                if v.is_finite() {
                    return refuse("lambda_min_clipped", &v, "only -inf is implemented");
                }
            }
        }
        if kind == Some(SchedulerKind::Pndm) && cfg.prediction_type == PredictionType::Sample {
            return refuse(
                "prediction_type",
                &"sample",
                "PNDM takes epsilon or v_prediction; choose another --scheduler",
            );
        }
        if kind == Some(SchedulerKind::UniPc) {
            let order = read("solver_order", 2.into())?;
            if order != 2 {
                return refuse("solver_order", &order, "UniPC here is second order (2)");
            }
            if get("predict_x0") == Some(&Value::Bool(false)) {
                return refuse("predict_x0", &false, "UniPC here predicts x0 (true)");
            }
            let solver = read("solver_type", "bh2".into())?;
            if solver != "bh2" && solver != "bh1" {
                return refuse("solver_type", &solver, "UniPC takes \"bh1\" or \"bh2\"");
            }
        }
        Ok(Self { raw, ..cfg })
    }
}

/// The sampler a diffusers class name stands for (None: not one reneg implements).
fn kind_of_class(name: &str) -> Option<SchedulerKind> {
    SchedulerKind::ALL
        .into_iter()
        .find(|k| k.class_name() == name && *k != SchedulerKind::DpmPp2mKarras)
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::from_value(
            Value::Object(Map::new()),
            Path::new("<default scheduler config>"),
        )
        .expect("defaults resolve")
    }
}
