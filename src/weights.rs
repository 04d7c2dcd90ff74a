//! Checkpoint loading: safetensors files in f32, f16 or bf16, converted to the compute dtype,
//! looked up with the owners' key names (`vb.pp("down_blocks").pp(0)...`), shape-checked.
//!
//! A file is memory-mapped and only its header is parsed at load. Each tensor is read from the
//! map when a model asks for it, converted to the compute dtype there, and its pages are then
//! released: a checkpoint is never held whole in its stored dtype beside the converted model
//! (f16 and bf16 weights stay in the file until needed), so loading peaks near the model's own
//! size (BENCHMARKS.md, "Loading weights").

use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use candle_core::Var;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A generator seeded by `seed` and a tensor's name, so each tensor's values depend on nothing
/// else (not on the order in which a model asks for its tensors).
fn name_rng(seed: u64, name: &str) -> SplitMix64 {
    let mut state = seed;
    for b in name.bytes() {
        state = (state ^ b as u64).wrapping_mul(0x1000_0000_01B3);
    }
    SplitMix64(state)
}

/// Trainable tensors under their full names, in creation order.
type NamedVars = Vec<(String, Var)>;

/// Where a safetensors file's bytes live: mapped (model files) or owned (fuzzing, small files).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }

    /// Lets the OS drop the pages of `range` (read once, now converted): a private read-only
    /// file map re-reads them from the file if they are ever touched again.
    fn release(&self, range: &std::ops::Range<usize>) {
        if let Bytes::Mapped(m) = self {
            // SAFETY: no slice into this range outlives the conversion that preceded the call,
            // and DONTNEED on a read-only private file mapping only drops clean pages, which
            // the kernel refills from the file on the next access.
            let _ = unsafe {
                m.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
        }
    }
}

/// One tensor of a safetensors file: its stored dtype, shape and bytes.
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// A validated safetensors file whose tensors are read on demand.
struct Lazy {
    bytes: Bytes,
    entries: HashMap<String, Entry>,
}

impl Lazy {
    fn parse(bytes: Bytes, path: &Path) -> Result<Self> {
        let buf = bytes.as_slice();
        let st = safetensors::SafeTensors::deserialize(buf).map_err(|e| {
            Error::file(
                path,
                format!("not a valid safetensors file ({e}); re-download or re-export it"),
            )
        })?;
        let base = buf.as_ptr() as usize;
        let mut entries = HashMap::new();
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F64 => DType::F64,
                safetensors::Dtype::U8 => DType::U8,
                safetensors::Dtype::U32 => DType::U32,
                safetensors::Dtype::I64 => DType::I64,
                other => {
                    return Err(Error::Weight {
                        file: path.to_path_buf(),
                        name,
                        problem: format!("is stored as {other:?}, which reneg does not read"),
                    })
                }
            };
            let start = view.data().as_ptr() as usize - base;
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape: view.shape().to_vec(),
                    range: start..start + view.data().len(),
                },
            );
        }
        drop(st);
        Ok(Self { bytes, entries })
    }

    /// The tensor as stored (its own dtype), copied out of the map on the CPU.
    fn read(&self, e: &Entry) -> Result<Tensor> {
        let data = &self.bytes.as_slice()[e.range.clone()];
        Ok(Tensor::from_raw_buffer(
            data,
            e.dtype,
            &e.shape,
            &Device::Cpu,
        )?)
    }
}

/// All tensors of one safetensors file, or of a state dict in memory.
pub struct Weights {
    /// Tensors in memory: a converted checkpoint's, or ones changed after load (LoRA merges).
    tensors: HashMap<String, Tensor>,
    /// The mapped file(s), when loaded from them (the shards of a sharded checkpoint);
    /// `tensors` overrides them by name.
    lazy: Vec<Lazy>,
    file: PathBuf,
    dtype: DType,
    device: Device,
    /// When set, missing tensors are generated from this seed (tests and benchmarks).
    random_seed: Option<u64>,
    /// Training from scratch: every tensor asked for becomes a `Var`, initialised from this
    /// seed, and is recorded here under its full name so it can be optimised and saved.
    trainable: Option<(Init, Mutex<NamedVars>)>,
}

/// Where trainable weights start.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Fresh, from this seed ([`Weights::trainable`]).
    Seed(u64),
    /// From the stored tensors ([`Weights::into_trainable`]).
    Stored,
}

impl Weights {
    /// Deterministic random weights for any architecture: each tensor drawn from a PRNG seeded
    /// by `seed` and its name, scaled by 1/sqrt(fan-in); 1-D norm weights near 1, biases small.
    /// Used for tests and benchmarks of full-size configs without real checkpoints.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            tensors: HashMap::new(),
            lazy: Vec::new(),
            file: PathBuf::from(format!("<random weights, seed {seed}>")),
            dtype,
            device: device.clone(),
            random_seed: Some(seed),
            trainable: None,
        }
    }

    /// Fresh trainable weights for any architecture (the miniature world's models): each
    /// tensor a `Var`, initialised as PyTorch modules usually are (norm scales 1, biases 0,
    /// matrices and kernels N(0, 1/fan-in), embeddings N(0, 0.02^2), `logit_scale` ln(1/0.07)),
    /// deterministically from `seed` and the tensor's name. [`Weights::vars`] lists them.
    pub fn trainable(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            tensors: HashMap::new(),
            lazy: Vec::new(),
            file: PathBuf::from(format!("<trainable weights, seed {seed}>")),
            dtype,
            device: device.clone(),
            random_seed: None,
            trainable: Some((Init::Seed(seed), Mutex::new(Vec::new()))),
        }
    }

    /// Fine-tuning: these weights become trainable, each tensor a `Var` initialised from the
    /// stored one when a model first asks for it; a tensor the file lacks is an error (a
    /// fine-tune that silently started a layer from random weights would train a different
    /// model). [`Weights::vars`] lists them.
    pub fn into_trainable(mut self) -> Self {
        self.trainable = Some((Init::Stored, Mutex::new(Vec::new())));
        self
    }

    /// The trainable tensors created so far, in creation order (empty unless
    /// [`Weights::trainable`] or [`Weights::into_trainable`]).
    pub fn vars(&self) -> Vec<(String, Var)> {
        match &self.trainable {
            Some((_, v)) => v.lock().map(|v| v.clone()).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    fn init_tensor(&self, seed: u64, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let constant = |v: f64| -> Result<Tensor> {
            Ok(Tensor::full(v, shape, &self.device)?.to_dtype(self.dtype)?)
        };
        if leaf == "logit_scale" {
            return constant((1.0f64 / 0.07).ln());
        }
        if shape.len() <= 1 {
            return constant(if leaf == "weight" { 1.0 } else { 0.0 });
        }
        let embedding = name.contains("embedding") || leaf == "class_embedding";
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let scale = if embedding {
            0.02
        } else {
            1.0 / (fan_in as f64).sqrt()
        };
        let mut rng = name_rng(seed ^ 0xD1B5_4A32_D192_ED03, name);
        let data: Vec<f64> = (0..n).map(|_| scale * rng.normal()).collect();
        Ok(Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    fn random_tensor(&self, seed: u64, name: &str, shape: &[usize]) -> Result<Tensor> {
        let mut rng = name_rng(seed ^ 0x9E37_79B9_7F4A_7C15, name);
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let (scale, offset) = match shape.len() {
            1 if name.ends_with("weight") => (0.1, 1.0),
            1 => (0.1, 0.0),
            _ => (1.0 / (fan_in as f64).sqrt(), 0.0),
        };
        let data: Vec<f64> = (0..n).map(|_| offset + scale * rng.normal()).collect();
        Ok(Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?)
    }
    /// Maps a safetensors file and checks its header; tensors are read when asked for. A
    /// missing or corrupt file is an error naming it.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::file(path, "weights file not found"));
        }
        let map = crate::io::map_file(path)?;
        Self::from_lazy(Lazy::parse(Bytes::Mapped(map), path)?, path, dtype, device)
    }

    /// A sharded checkpoint: its `*.safetensors.index.json` (`weight_map`: tensor name to
    /// shard file beside it), every shard mapped and checked to hold the tensors the index
    /// gives it. Errors name the index and the shard.
    pub fn load_sharded(index: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let v: serde_json::Value = crate::error::read_json(index)?;
        let map = v["weight_map"].as_object().ok_or_else(|| {
            Error::file(index, "has no weight_map: not a sharded safetensors index")
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        if shards.is_empty() || shards.len() > map.len() {
            return Err(Error::file(index, "its weight_map names no shard files"));
        }
        let mut w = Self::from_tensors(HashMap::new(), index, dtype, device);
        for shard in shards {
            if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                return Err(Error::file(
                    index,
                    format!("names the shard {shard:?} outside its folder"),
                ));
            }
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(Error::file(
                    &path,
                    format!("shard named by {} not found", index.display()),
                ));
            }
            w.lazy.push(Lazy::parse(
                Bytes::Mapped(crate::io::map_file(&path)?),
                &path,
            )?);
        }
        for (name, shard) in map {
            let held = w.lazy.iter().any(|l| l.entries.contains_key(name));
            if !held {
                return Err(Error::file(
                    index,
                    format!(
                        "maps {name} to {}, which does not hold it",
                        shard.as_str().unwrap_or("?")
                    ),
                ));
            }
        }
        Ok(w)
    }

    /// A safetensors file already in memory, read the same way as [`Weights::load`].
    pub fn from_bytes(bytes: &[u8], path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_lazy(
            Lazy::parse(Bytes::Owned(bytes.to_vec()), path)?,
            path,
            dtype,
            device,
        )
    }

    fn from_lazy(lazy: Lazy, path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut w = Self::from_tensors(HashMap::new(), path, dtype, device);
        w.lazy = vec![lazy];
        Ok(w)
    }

    /// Wraps tensors already in memory (used for checkpoints converted from other layouts).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            tensors,
            lazy: Vec::new(),
            file: path.to_path_buf(),
            dtype,
            device: device.clone(),
            random_seed: None,
            trainable: None,
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Every stored tensor's name (in no particular order).
    pub fn names(&self) -> impl Iterator<Item = &String> {
        let lazy = self.lazy.iter().flat_map(|l| l.entries.keys());
        self.tensors
            .keys()
            .chain(lazy.filter(|k| !self.tensors.contains_key(*k)))
    }

    fn stored(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.lazy.iter().any(|l| l.entries.contains_key(name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.random_seed.is_some()
            || matches!(self.trainable, Some((Init::Seed(_), _)))
            || self.stored(name)
    }

    /// The stored tensor `name` in its stored dtype, on the CPU for a mapped file (what a LoRA
    /// merge starts from).
    pub fn stored_tensor(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.tensors.get(name) {
            return Ok(t.clone());
        }
        match self
            .lazy
            .iter()
            .find_map(|l| Some((l, l.entries.get(name)?)))
        {
            Some((l, e)) => l.read(e),
            None => Err(Error::Weight {
                file: self.file.clone(),
                name: name.to_string(),
                problem: "is missing".into(),
            }),
        }
    }

    /// Replaces (or adds) the tensor `name` before a model is built (LoRA merging).
    pub fn set_tensor(&mut self, name: String, t: Tensor) {
        self.tensors.insert(name, t);
    }

    /// The tensor `name` with exactly `shape`, converted to the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some((init, vars)) = &self.trainable {
            let mut vars = vars
                .lock()
                .map_err(|_| Error::Invalid("trainable weights: a thread panicked".into()))?;
            if let Some((_, v)) = vars.iter().find(|(n, _)| n == name) {
                if v.dims() != shape {
                    return Err(Error::Weight {
                        file: self.file.clone(),
                        name: name.to_string(),
                        problem: format!(
                            "was created with shape {:?}, asked for as {shape:?}",
                            v.dims()
                        ),
                    });
                }
                return Ok(v.as_tensor().clone());
            }
            let init = match *init {
                Init::Stored => self.get_stored(name, shape)?,
                Init::Seed(seed) => self.init_tensor(seed, name, shape)?,
            };
            let var = Var::from_tensor(&init)?;
            vars.push((name.to_string(), var.clone()));
            return Ok(var.as_tensor().clone());
        }
        if let Some(seed) = self.random_seed {
            if !self.stored(name) {
                return self.random_tensor(seed, name, shape);
            }
        }
        self.get_stored(name, shape)
    }

    /// The stored tensor `name`, checked to have `shape`, in the compute dtype and device.
    fn get_stored(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let missing = || Error::Weight {
            file: self.file.clone(),
            name: name.to_string(),
            problem: format!("is missing (expected shape {shape:?})"),
        };
        let check_shape = |dims: &[usize]| {
            if dims != shape {
                return Err(Error::Weight {
                    file: self.file.clone(),
                    name: name.to_string(),
                    problem: format!(
                        "has shape {dims:?}, expected {shape:?}: the checkpoint does not match its config.json"
                    ),
                });
            }
            Ok(())
        };
        let t = match self.tensors.get(name) {
            Some(t) => t.clone(),
            None => {
                let (lazy, e) = self
                    .lazy
                    .iter()
                    .find_map(|l| Some((l, l.entries.get(name)?)))
                    .ok_or_else(missing)?;
                // Checked before the bytes are read.
                check_shape(&e.shape)?;
                let t = lazy.read(e)?;
                let t = if t.dtype() == self.dtype {
                    t
                } else {
                    t.to_dtype(self.dtype)?
                };
                let t = t.to_device(&self.device)?;
                lazy.bytes.release(&e.range);
                return Ok(t);
            }
        };
        if t.dims() != shape {
            return Err(Error::Weight {
                file: self.file.clone(),
                name: name.to_string(),
                problem: format!(
                    "has shape {:?}, expected {shape:?}: the checkpoint does not match its config.json",
                    t.dims()
                ),
            });
        }
        let t = if t.dtype() == self.dtype {
            t.clone()
        } else {
            t.to_dtype(self.dtype)?
        };
        Ok(t.to_device(&self.device)?)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// A prefixed view into [`Weights`], mirroring PyTorch module paths.
#[derive(Clone)]
pub struct Vb {
    weights: Arc<Weights>,
    prefix: String,
}

impl Vb {
    pub fn new(weights: Weights) -> Self {
        Self {
            weights: Arc::new(weights),
            prefix: String::new(),
        }
    }

    /// A sub-path: `vb.pp("unet").pp(0)` looks up `unet.0.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            weights: self.weights.clone(),
            prefix,
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.weights.get(&self.full(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.full(name))
    }

    pub fn dtype(&self) -> DType {
        self.weights.dtype()
    }

    pub fn device(&self) -> &Device {
        self.weights.device()
    }

    pub fn file(&self) -> &Path {
        self.weights.file()
    }

    /// The trainable tensors behind this view's weights (see [`Weights::trainable`]).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.weights.vars()
    }
}
