//! One place decides how each op runs.
//!
//! Every op of `nn` asks [`plan`] with its activation inputs and its weights, and gets a
//! [`Plan`]: whether our fused CPU kernels compute it ([`Plan::fused`]) and which gradients
//! its backward must give ([`Grad`]). The decision depends only on the device, the dtype,
//! whether the weights are frozen or trainable, whether the inputs carry a graph, and the
//! process-wide kernel choice ([`Kernels`]):
//!
//! | device, dtype            | kernels  | forward                    | backward (inputs on a graph)        |
//! |--------------------------|----------|----------------------------|-------------------------------------|
//! | CPU, f32/f64             | auto     | fused CPU kernel           | fused, input-only if weights frozen |
//! | CPU f16/bf16, CUDA, Metal| any      | candle ops (device-generic)| candle ops, input-only if frozen    |
//! | CPU, f32/f64             | generic  | candle ops (device-generic)| candle ops, input-only if frozen    |
//!
//! On the CPU the fused linear keeps a frozen f32 weight in the gemm micro-kernel's panels,
//! packed once when the layer is built ([`super::cpu_packed`]; where the CPU has AVX-512).
//!
//! "Input-only" means the op attaches its own backward ([`super::attach`]) that computes the
//! gradient with respect to its activation input alone: candle's autograd would also compute
//! the gradients of frozen weights and keep every intermediate of a composed op.
//!
//! The generic path is what runs on a GPU. `RENEG_KERNELS=generic` (or [`force_kernels`], or
//! [`with_kernels`] on one thread) takes it on the CPU too, so the finite-difference checks and
//! the parity cases exercise the GPU's code on machines without one.

use candle_core::{DType, Tensor};
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which kernels the ops may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Fused CPU kernels where they apply, device-generic candle ops elsewhere.
    Auto,
    /// Device-generic candle ops everywhere (what CUDA runs), also on the CPU.
    Generic,
}

impl Kernels {
    /// Parses `RENEG_KERNELS`' values.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(Kernels::Auto),
            "generic" => Some(Kernels::Generic),
            _ => None,
        }
    }
}

const UNSET: u8 = 0;
const AUTO: u8 = 1;
const GENERIC: u8 = 2;

static PROCESS: AtomicU8 = AtomicU8::new(UNSET);

thread_local! {
    static THREAD: Cell<Option<Kernels>> = const { Cell::new(None) };
}

fn encode(k: Kernels) -> u8 {
    match k {
        Kernels::Auto => AUTO,
        Kernels::Generic => GENERIC,
    }
}

/// The process-wide choice: [`force_kernels`]'s, else `RENEG_KERNELS` (read once; an unknown
/// value is refused by [`check_env`] at start-up and taken as `auto` by library users).
fn process_kernels() -> Kernels {
    match PROCESS.load(Ordering::Relaxed) {
        AUTO => Kernels::Auto,
        GENERIC => Kernels::Generic,
        _ => {
            let k = std::env::var("RENEG_KERNELS")
                .ok()
                .and_then(|v| Kernels::parse(&v))
                .unwrap_or(Kernels::Auto);
            PROCESS.store(encode(k), Ordering::Relaxed);
            k
        }
    }
}

/// The kernel choice in force on this thread.
pub fn kernels() -> Kernels {
    THREAD.with(|t| t.get()).unwrap_or_else(process_kernels)
}

/// Sets the process-wide choice (overrides `RENEG_KERNELS`).
pub fn force_kernels(k: Kernels) {
    PROCESS.store(encode(k), Ordering::Relaxed);
}

/// Runs `f` with `k` in force on this thread (ops decide on the calling thread, and their
/// backward closures keep what was decided), then restores the previous choice.
pub fn with_kernels<R>(k: Kernels, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(THREAD.with(|t| t.replace(Some(k))));
    f()
}

/// `RENEG_KERNELS` checked: an error message naming the variable for an unknown value.
pub fn check_env() -> std::result::Result<(), String> {
    match std::env::var("RENEG_KERNELS") {
        Ok(v) if Kernels::parse(&v).is_none() => Err(format!(
            "RENEG_KERNELS={v:?} is not a kernel choice; use auto or generic"
        )),
        _ => Ok(()),
    }
}

/// Which gradients an op's backward must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    /// No input carries a graph: no backward at all.
    None,
    /// The activation inputs carry a graph, the weights are frozen: gradients with respect
    /// to the inputs only.
    InputOnly,
    /// Some weight is trainable (a `Var`, or computed from one): every gradient.
    All,
}

/// How one call of an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Our fused CPU kernels compute it (else candle ops, on any device).
    pub fused: bool,
    pub grad: Grad,
}

/// Whether `t` carries a graph (a variable, or computed from one).
pub fn tracked(t: &Tensor) -> bool {
    t.is_variable() || t.track_op()
}

/// The decision for an op with activation inputs `inputs` and weights `weights`.
/// Fused kernels need every operand on the CPU in one dtype, f32 or f64; ops add their own
/// shape conditions on top (e.g. square kernels).
pub fn plan(inputs: &[&Tensor], weights: &[&Tensor]) -> Plan {
    let all = || inputs.iter().chain(weights.iter());
    let dtype = inputs.first().map(|t| t.dtype());
    let fused = kernels() == Kernels::Auto
        && matches!(dtype, Some(DType::F32 | DType::F64))
        && all().all(|t| t.device().is_cpu() && Some(t.dtype()) == dtype);
    let grad = if weights.iter().any(|w| tracked(w)) {
        Grad::All
    } else if inputs.iter().any(|x| tracked(x)) {
        Grad::InputOnly
    } else {
        Grad::None
    };
    Plan { fused, grad }
}
