//! Text contexts that come back. A sampling run calls the denoiser at every step with the same
//! prompt and negative embeddings, and every cross-attention projects them to keys and values
//! again (diffusers does, at every step). For SDXL at 32x32 latents those projections are a
//! seventh of the UNet's multiplications; for PixArt (120 caption rows, 28 blocks) a sixteenth.
//!
//! [`stable`] hands every call with the same context, bit for bit, one tensor of its own that
//! nothing can change; [`Memo`] keeps what a layer computes from such a tensor (its keys and
//! values) until another context comes. The identity of a tensor alone would not do: a
//! detached view of a `Var` keeps its id while the optimiser rewrites its storage, so `stable`
//! compares contents and keeps a copy.
//!
//! Contexts on a graph (a negative being learned) are never kept: their keys and values must be
//! on the graph of the call that uses them.

use candle_core::{Result, Tensor, TensorId};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How many times a [`Memo`] was asked for the value of a stable context, and how many of
/// those it gave back a kept one, over the process (tests check that every layer of a run's
/// later steps reuses).
static LOOKUPS: AtomicUsize = AtomicUsize::new(0);
static REUSES: AtomicUsize = AtomicUsize::new(0);

/// (lookups, reuses) so far.
pub fn counts() -> (usize, usize) {
    (
        LOOKUPS.load(Ordering::Relaxed),
        REUSES.load(Ordering::Relaxed),
    )
}

/// The contexts [`stable`] handed out, the most recent last: a few are in use at once (the
/// batched negative and prompt, or each alone when the branches run side by side on two
/// threads, a ControlNet's).
static ISSUED: Mutex<Vec<Tensor>> = Mutex::new(Vec::new());
const KEEP: usize = 8;

fn issued() -> std::sync::MutexGuard<'static, Vec<Tensor>> {
    // The list is valid whatever a panicking holder left (push and remove only).
    ISSUED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `t` carries a graph (see `nn::dispatch::tracked`).
fn tracked(t: &Tensor) -> bool {
    super::dispatch::tracked(t)
}

/// Equal shapes, dtypes, devices and every element (NaN never equals: such a context is
/// simply not reused).
fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() || !a.device().same_device(b.device()) {
        return Ok(false);
    }
    if a.elem_count() == 0 {
        return Ok(true);
    }
    Ok(a.eq(b)?.flatten_all()?.min(0)?.to_scalar::<u8>()? == 1)
}

/// The stable tensor equal to `ctx` (a copy made on first sight), or `ctx` itself when it is
/// on a graph. Models call it on their context before their layers use it.
pub fn stable(ctx: &Tensor) -> Result<Tensor> {
    if tracked(ctx) {
        return Ok(ctx.clone());
    }
    remember(&mut issued(), ctx)
}

fn remember(list: &mut Vec<Tensor>, ctx: &Tensor) -> Result<Tensor> {
    let found = match list.iter().position(|t| t.id() == ctx.id()) {
        Some(i) => Some(i),
        None => {
            let mut hit = None;
            for (i, t) in list.iter().enumerate() {
                if same(t, ctx)? {
                    hit = Some(i);
                    break;
                }
            }
            hit
        }
    };
    let t = match found {
        Some(i) => list.remove(i),
        // A copy: the caller's tensor may share storage with one that changes.
        None => ctx.copy()?,
    };
    list.push(t.clone());
    if list.len() > KEEP {
        list.remove(0);
    }
    Ok(t)
}

/// Whether `t` is one of the tensors [`stable`] handed out and still keeps.
pub fn is_stable(t: &Tensor) -> bool {
    issued().iter().any(|s| s.id() == t.id())
}

/// Forgets every stable context: the next call of each model projects its context again
/// (benchmarks time the step without reuse this way).
pub fn forget_all() {
    issued().clear();
}

/// What a layer computed from the last stable contexts it saw: two, for the guidance
/// branches run side by side (each with its own context, through the same layers). A clone
/// of a layer shares its memo: blocks are cloned into the closures of checkpointing and of
/// each call (`UNetBlock::layer`), and a clone is the same layer, its weights shared.
pub struct Memo<T>(Arc<Mutex<Vec<(TensorId, T)>>>);

/// Values a memo keeps at most.
const MEMO_KEEP: usize = 2;

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<T> Clone for Memo<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> std::fmt::Debug for Memo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
}

/// A value a [`Memo`] may keep: one off every graph. Keys and values computed by trainable
/// weights (a `Var` per tensor, as the miniature world's UNet trains) carry a graph and change
/// with the optimiser between calls with the same text: they are never kept.
pub trait Keepable: Clone {
    fn on_graph(&self) -> bool;
}

impl Keepable for Tensor {
    fn on_graph(&self) -> bool {
        tracked(self)
    }
}

impl Keepable for (Tensor, Tensor) {
    fn on_graph(&self) -> bool {
        tracked(&self.0) || tracked(&self.1)
    }
}

impl<T: Keepable> Memo<T> {
    /// `compute()`'s value for the context `key`: kept from an earlier call when `key` is the
    /// same stable context, computed (and kept, if `key` is stable and the value is off every
    /// graph) otherwise.
    pub fn get_or(&self, key: &Tensor, compute: impl FnOnce() -> Result<T>) -> Result<T> {
        if !is_stable(key) {
            return compute();
        }
        LOOKUPS.fetch_add(1, Ordering::Relaxed);
        {
            let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, v)) = kept.iter().find(|(id, _)| *id == key.id()) {
                REUSES.fetch_add(1, Ordering::Relaxed);
                return Ok(v.clone());
            }
            // Values of contexts no longer stable go before the new one is computed.
            let live: Vec<TensorId> = issued().iter().map(Tensor::id).collect();
            kept.retain(|(id, _)| live.contains(id));
        }
        // Computed without the lock: the other branch may use the layer meanwhile.
        let v = compute()?;
        if v.on_graph() {
            return Ok(v);
        }
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= MEMO_KEEP {
            kept.remove(0);
        }
        kept.push((key.id(), v.clone()));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    impl Keepable for f32 {
        fn on_graph(&self) -> bool {
            false
        }
    }

    #[test]
    fn equal_contexts_share_one_stable_tensor_and_a_changed_var_does_not() {
        let dev = Device::Cpu;
        let var = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        // On a graph: never kept.
        assert_eq!(stable(var.as_tensor()).unwrap().id(), var.as_tensor().id());
        let view = var.as_detached_tensor();
        let a = stable(&view).unwrap();
        assert_ne!(a.id(), view.id(), "a copy of its own");
        assert!(is_stable(&a));
        let other = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        assert_eq!(
            stable(&other).unwrap().id(),
            a.id(),
            "equal contents, one tensor"
        );
        assert_eq!(stable(&a).unwrap().id(), a.id());
        // The optimiser rewrites the Var: the same view (same id) now holds other numbers.
        var.set(&Tensor::new(&[[5f32, 6.0], [7.0, 8.0]], &dev).unwrap())
            .unwrap();
        let b = stable(&view).unwrap();
        assert_ne!(b.id(), a.id());
        assert_eq!(b.to_vec2::<f32>().unwrap(), [[5.0, 6.0], [7.0, 8.0]]);
        assert_eq!(a.to_vec2::<f32>().unwrap(), [[1.0, 2.0], [3.0, 4.0]]);

        let memo = Memo::<f32>::default();
        let calls = std::cell::Cell::new(0);
        let f = |x: f32| {
            calls.set(calls.get() + 1);
            Ok(x)
        };
        assert_eq!(memo.get_or(&a, || f(1.0)).unwrap(), 1.0);
        assert_eq!(memo.get_or(&a, || f(2.0)).unwrap(), 1.0, "kept");
        assert_eq!(memo.get_or(&b, || f(3.0)).unwrap(), 3.0, "another context");
        assert_eq!(memo.get_or(&view, || f(4.0)).unwrap(), 4.0, "not stable");
        assert_eq!(memo.get_or(&view, || f(5.0)).unwrap(), 5.0, "never kept");
        assert_eq!(calls.get(), 4);
        // A clone of a layer is the same layer: it shares what was kept.
        assert_eq!(memo.clone().get_or(&b, || f(7.0)).unwrap(), 3.0, "a clone");
        forget_all();
        assert!(!is_stable(&b));
        assert_eq!(memo.get_or(&b, || f(6.0)).unwrap(), 6.0, "forgotten");
    }
}
