//! Data-parallel training: one process per device, launched as `torchrun` launches them
//! (`torchrun --no-python --nproc_per_node N reneg train ...` sets `RANK`, `WORLD_SIZE` and
//! `LOCAL_RANK`; `LOCAL_RANK` picks the CUDA device).
//!
//! Every rank draws the same prompts, seeds and timesteps for every micro-batch of a step (the
//! draws depend only on the seed and the step), computes the micro-batches `i` with
//! `i % world_size == rank`, and the ranks exchange their per-micro-batch gradients
//! ([`Collective::gather`]); each rank then sums all of them in micro-batch order. The summed
//! gradient, and so the embedding, is the same bit for bit at every world size, and every rank
//! holds the same embedding without a broadcast. What is exchanged per step is one `[1, 77, D]`
//! f32 gradient per micro-batch (236 KB for SD1.5), negligible against a step of seconds:
//! the step scales with the number of devices until the micro-batches of a step run out
//! (BENCHMARKS.md, "Scale-out").
//!
//! Backends: [`Single`] (world size 1) and [`FileGroup`], which exchanges through a folder all
//! ranks can read (by default `<out>/.dist`; any shared filesystem across hosts), for CPUs and
//! tests. An NCCL all-gather backend (cudarc's bindings, candle's `nccl` feature) fits the same
//! trait and waits for a device session. Only rank 0 writes the run's files.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// This process's place in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    /// The rank on this host (the CUDA device ordinal).
    pub local_rank: usize,
}

impl World {
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
        }
    }

    /// From `RANK`, `WORLD_SIZE` and `LOCAL_RANK` as torchrun sets them; a single process when
    /// `WORLD_SIZE` is unset.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over any variable lookup (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let Some(ws) = var("WORLD_SIZE") else {
            return Ok(Self::single());
        };
        let num = |k: &str, v: Option<String>| -> Result<usize> {
            let v = v.ok_or_else(|| {
                Error::Invalid(format!(
                    "WORLD_SIZE is set but {k} is not; launch with torchrun or set {k}"
                ))
            })?;
            v.trim()
                .parse()
                .map_err(|_| Error::Invalid(format!("{k}={v:?} is not a whole number")))
        };
        let world_size = num("WORLD_SIZE", Some(ws))?;
        let rank = num("RANK", var("RANK"))?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", Some(v))?,
            None => rank,
        };
        if world_size == 0 || rank >= world_size {
            return Err(Error::Invalid(format!(
                "RANK={rank} must be below WORLD_SIZE={world_size}"
            )));
        }
        Ok(Self {
            rank,
            world_size,
            local_rank,
        })
    }

    /// Whether this rank computes micro-batch `index`.
    pub fn owns(&self, index: usize) -> bool {
        index % self.world_size == self.rank
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// One micro-batch's result.
#[derive(Debug, Clone)]
pub struct Contribution {
    pub index: usize,
    /// d loss / d each learned part of the negative (embeddings first), f32.
    pub grad: Vec<Tensor>,
    pub loss: f64,
    pub rewards: Vec<f64>,
}

/// The exchange between ranks.
pub trait Collective {
    fn world(&self) -> World;

    /// Every rank's contributions to `step`, in micro-batch order (every rank gets all of
    /// them); `mine` are this rank's.
    fn gather(&mut self, step: u64, mine: Vec<Contribution>) -> Result<Vec<Contribution>>;
}

/// World size 1: nothing to exchange.
pub struct Single;

impl Collective for Single {
    fn world(&self) -> World {
        World::single()
    }

    fn gather(&mut self, _step: u64, mut mine: Vec<Contribution>) -> Result<Vec<Contribution>> {
        mine.sort_by_key(|c| c.index);
        Ok(mine)
    }
}

/// Exchange through files in a folder every rank can read: each rank writes its
/// contributions to `step-<s>/mb-<i>.safetensors` (atomically) and reads the others' once
/// all `expected` are there.
pub struct FileGroup {
    dir: PathBuf,
    world: World,
    /// Micro-batches per step (how many files a step has).
    per_step: usize,
    timeout: Duration,
    device: Device,
}

impl FileGroup {
    pub fn new(dir: &Path, world: World, per_step: usize, device: &Device) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("cannot create the exchange folder: {e}")))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            world,
            per_step,
            timeout: Duration::from_secs(1800),
            device: device.clone(),
        })
    }

    /// How long to wait for the other ranks before giving up (default 30 minutes).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step}"))
    }

    fn write(&self, step: u64, c: &Contribution) -> Result<()> {
        let dir = self.step_dir(step);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::file(&dir, format!("cannot create: {e}")))?;
        // f64s by their bits: exact (NaN included), so every rank sums the same numbers.
        let bits = |v: &f64| format!("{:016x}", v.to_bits());
        let meta: HashMap<String, String> = [
            ("loss".to_string(), bits(&c.loss)),
            (
                "rewards".to_string(),
                c.rewards.iter().map(bits).collect::<Vec<_>>().join(","),
            ),
        ]
        .into_iter()
        .collect();
        let names: Vec<String> = (0..c.grad.len()).map(grad_name).collect();
        let tensors: Vec<(&str, &Tensor)> = names.iter().map(String::as_str).zip(&c.grad).collect();
        let bytes = crate::io::safetensors_f32(&tensors, meta, "exchange")?;
        crate::io::write_atomic(&dir.join(format!("mb-{}.safetensors", c.index)), &bytes)
    }

    fn read(&self, path: &Path, index: usize) -> Result<Contribution> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let bad = |m: String| Error::file(path, format!("corrupt exchange file: {m}"));
        let (tensors, meta) = crate::io::read_safetensors_meta(&bytes, bad)?;
        let field = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("no `{k}`")));
        let number = |s: &str| -> Result<f64> {
            u64::from_str_radix(s, 16)
                .map(f64::from_bits)
                .map_err(|_| bad(format!("bad number {s:?}")))
        };
        let loss = number(&field("loss")?)?;
        let rewards = field("rewards")?;
        let rewards = rewards
            .split(',')
            .filter(|s| !s.is_empty())
            .map(number)
            .collect::<Result<Vec<f64>>>()?;
        let mut grad = vec![];
        while let Some(t) = tensors.get(&grad_name(grad.len())) {
            grad.push(t.to_device(&self.device)?);
        }
        if grad.is_empty() {
            return Err(bad("no gradient".into()));
        }
        Ok(Contribution {
            index,
            grad,
            loss,
            rewards,
        })
    }
}

impl Collective for FileGroup {
    fn world(&self) -> World {
        self.world
    }

    fn gather(&mut self, step: u64, mine: Vec<Contribution>) -> Result<Vec<Contribution>> {
        for c in &mine {
            self.write(step, c)?;
        }
        // Rank 0 removes the folder of two steps back: every rank has written `step - 1`'s
        // files only after reading all of `step - 2`'s.
        if self.world.is_main() && step >= 2 {
            let _ = std::fs::remove_dir_all(self.step_dir(step - 2));
        }
        let mut mine: HashMap<usize, Contribution> =
            mine.into_iter().map(|c| (c.index, c)).collect();
        let dir = self.step_dir(step);
        let start = Instant::now();
        let mut out = Vec::with_capacity(self.per_step);
        for index in 0..self.per_step {
            if let Some(c) = mine.remove(&index) {
                out.push(c);
                continue;
            }
            let path = dir.join(format!("mb-{index}.safetensors"));
            while !path.is_file() {
                if start.elapsed() > self.timeout {
                    return Err(Error::file(
                        &path,
                        format!(
                            "rank {} waited {} s for rank {}'s micro-batch {index} of step {step}; is that rank running (same --out, same config)?",
                            self.world.rank,
                            self.timeout.as_secs(),
                            index % self.world.world_size
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            out.push(self.read(&path, index)?);
        }
        Ok(out)
    }
}

/// The name of a contribution's `i`-th gradient in an exchange file (`grad` for the
/// embeddings', as before parts, then `grad.1`, ...).
fn grad_name(i: usize) -> String {
    if i == 0 {
        "grad".into()
    } else {
        format!("grad.{i}")
    }
}

/// The summed gradient (per learned part), loss and rewards of a step's contributions, in
/// micro-batch order (the order a single process adds them in).
pub fn sum_in_order(contributions: &[Contribution]) -> Result<(Vec<Tensor>, f64, Vec<f64>)> {
    let mut grad: Option<Vec<Tensor>> = None;
    let (mut loss, mut rewards) = (0.0, vec![]);
    for c in contributions {
        grad = Some(match grad {
            Some(s) => {
                if s.len() != c.grad.len() {
                    return Err(Error::Invalid(format!(
                        "micro-batch {} has {} gradient parts, the others {}",
                        c.index,
                        c.grad.len(),
                        s.len()
                    )));
                }
                s.iter()
                    .zip(&c.grad)
                    .map(|(a, b)| Ok((a + b)?))
                    .collect::<Result<Vec<_>>>()?
            }
            None => c.grad.clone(),
        });
        loss += c.loss;
        rewards.extend(&c.rewards);
    }
    let grad = grad.ok_or_else(|| Error::Invalid("a step with no micro-batch".into()))?;
    Ok((grad, loss, rewards))
}
