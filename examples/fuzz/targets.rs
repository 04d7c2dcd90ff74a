//! Fuzz targets for every parser that reads a user's file, shared by `examples/fuzz.rs` (the
//! long run) and `tests/fuzz.rs` (a CI-sized run). Inputs are real files mutated by a seeded
//! mutator (bit flips, interesting bytes, inserted, deleted, duplicated and spliced ranges,
//! truncation, numbers in text replaced by extreme ones) or random bytes. A target fails by
//! panicking: errors are the expected answer to bad input, and a target panics when what it
//! accepted breaks a property (what is written reads back equal; timesteps in range and in
//! order). Each target says whether it accepted an input, so that a parser refusing every
//! valid file fails too: its real seeds must be accepted, its `refused` seeds refused.

#![allow(dead_code)]

use candle_core::{DType, Device};
use reneg::rng::SplitMix64;
use std::path::{Path, PathBuf};

/// Reads one input (the bytes, and a scratch folder of its own for parsers that take paths);
/// true when the parser accepted it.
pub type Parse = Box<dyn Fn(&[u8], &Path) -> bool>;

/// One parser: its name, the real files it starts from, and how it reads bytes.
pub struct Target {
    pub name: &'static str,
    /// Real, valid files: each must be accepted.
    pub seeds: Vec<Vec<u8>>,
    /// Real files the parser must refuse (code in a pickle, a non-tensor); mutated too.
    pub refused: Vec<Vec<u8>>,
    /// Whether the seeds are text (numbers in them are also mutated as numbers).
    pub text: bool,
    pub run: Parse,
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("fuzz seed {p}: {e}"))
}

/// Writes `bytes` as `name` in `scratch` (fresh for each input) and returns the path.
fn put(scratch: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, bytes).unwrap();
    p
}

fn json(bytes: &[u8]) -> Option<serde_json::Value> {
    serde_json::from_slice(bytes).ok()
}

/// The values of two tensors bit for bit (NaN payloads included).
fn same_bits(a: &candle_core::Tensor, b: &candle_core::Tensor) -> bool {
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map(|v| v.into_iter().map(f32::to_bits).collect())
            .unwrap_or_default()
    };
    a.dims() == b.dims() && bits(a) == bits(b)
}

/// A scheduler whose `set_timesteps` succeeded: every timestep in [0, num_train_timesteps)
/// and none after a larger one (PLMS repeats one).
fn check_timesteps(s: &reneg::scheduler::Scheduler, train: usize, what: &str) {
    let ts = s.timesteps();
    assert!(!ts.is_empty(), "{what}: set_timesteps gave no timesteps");
    for w in ts.windows(2) {
        assert!(w[0] >= w[1], "{what}: timesteps out of order: {ts:?}");
    }
    for t in ts {
        assert!(
            t.is_finite() && *t >= 0.0 && *t < train as f64,
            "{what}: timestep {t} outside [0, {train}): {ts:?}"
        );
    }
}

const MINI_TOK: &str = "assets/mini/pipeline/tokenizer";
const SD15: &str = "tests/fixtures/parity/sd15-tiny/pipeline";

pub fn targets() -> Vec<Target> {
    let cfg_path = Path::new("config.json");
    vec![
        Target {
            name: "torch-file tensor (zip + pickle)",
            seeds: vec![
                read("tests/fixtures/embedding/torch_saved.pt"),
                read("tests/fixtures/embedding/torch_saved_f16.pt"),
            ],
            refused: vec![
                read("tests/fixtures/embedding/not_a_tensor.pt"),
                read("tests/fixtures/embedding/malicious.pt"),
            ],
            text: false,
            run: Box::new(|b, _| reneg::torch_file::read(b, Path::new("x.pt")).is_ok()),
        },
        Target {
            name: "torch-file state dict",
            seeds: vec![read(
                "tests/fixtures/parity/reward-openclip-quickgelu/reward/open_clip_model.pt",
            )],
            refused: vec![],
            text: false,
            run: Box::new(|b, _| reneg::torch_file::read_state_dict(b, Path::new("x.pt")).is_ok()),
        },
        Target {
            name: "pickle (data.pkl)",
            seeds: vec![pickle_of("tests/fixtures/embedding/torch_saved.pt")],
            refused: vec![],
            text: false,
            run: Box::new(|b, _| {
                let _ = reneg::torch_file::pickle::read_state_dict(b);
                reneg::torch_file::pickle::read_tensor(b).is_ok()
            }),
        },
        Target {
            name: "embedding file (safetensors or torch)",
            seeds: vec![
                read("tests/fixtures/embedding/torch_saved.safetensors"),
                read("assets/mini/negatives/reneg-global.safetensors"),
                read("tests/fixtures/embedding/parts.safetensors"),
                read("tests/fixtures/embedding/parts.pt"),
            ],
            refused: vec![],
            text: false,
            run: Box::new(|b, s| {
                use reneg::embedding::NegativeEmbedding;
                let Ok(e) = NegativeEmbedding::load(&put(s, "e.safetensors", b)) else {
                    return false;
                };
                let _ = e.stats();
                // What is written reads back equal: the values and every metadata entry.
                let again = s.join("again.safetensors");
                e.save_safetensors(&again)
                    .expect("an accepted embedding saves");
                let back = NegativeEmbedding::load(&again).expect("a saved embedding loads");
                assert_eq!(e.parts().len(), back.parts().len(), "parts changed");
                for ((n, a), (_, b)) in e.parts().iter().zip(back.parts().iter()) {
                    assert!(same_bits(a, b), "{n} changed");
                }
                for (k, v) in &e.metadata {
                    assert_eq!(back.metadata.get(k), Some(v), "metadata {k} changed");
                }
                true
            }),
        },
        Target {
            name: "textual-inversion embedding (A1111 .pt, emb_params, learned_embeds)",
            seeds: vec![
                read("tests/fixtures/ti/tinyneg.pt"),
                read("tests/fixtures/ti/tinyneg.safetensors"),
                read("tests/fixtures/ti/learned_embeds.bin"),
            ],
            refused: vec![],
            text: false,
            run: Box::new(|b, s| {
                use reneg::embedding::textual_inversion::{split, TextualInversion};
                // The prompt splitter on the same bytes as text.
                let _ = split(&String::from_utf8_lossy(b), &["ti", "<tok>"]);
                match TextualInversion::load(&put(s, "ti.pt", b), "ti") {
                    Ok(t) => {
                        let _ = (t.len(), t.width());
                        true
                    }
                    Err(_) => false,
                }
            }),
        },
        Target {
            name: "model weights (safetensors header as the loaders use it)",
            seeds: vec![read(&format!("{SD15}/text_encoder/model.safetensors"))],
            refused: vec![],
            text: false,
            run: Box::new(|b, _| {
                let Ok(w) = reneg::weights::Weights::from_bytes(
                    b,
                    Path::new("m.safetensors"),
                    DType::F32,
                    &Device::Cpu,
                ) else {
                    return false;
                };
                let names: Vec<String> = w.names().cloned().collect();
                for n in names.iter().take(4) {
                    let _ = w.get(n, &[1]);
                }
                true
            }),
        },
        Target {
            name: "unet config.json",
            seeds: vec![read(&format!("{SD15}/unet/config.json"))],
            refused: vec![],
            text: true,
            run: Box::new(move |b, _| {
                json(b)
                    .and_then(|v| reneg::models::unet::UNetConfig::from_value(v, cfg_path).ok())
                    .map(|c| c.context_dim())
                    .is_some()
            }),
        },
        Target {
            name: "vae config.json",
            seeds: vec![read(&format!("{SD15}/vae/config.json"))],
            refused: vec![],
            text: true,
            run: Box::new(move |b, _| {
                json(b)
                    .and_then(|v| reneg::models::vae::VaeConfig::from_value(v, cfg_path).ok())
                    .map(|c| c.downscale())
                    .is_some()
            }),
        },
        Target {
            name: "text encoder config.json",
            seeds: vec![read(&format!("{SD15}/text_encoder/config.json"))],
            refused: vec![],
            text: true,
            run: Box::new(move |b, _| {
                json(b).is_some_and(|v| {
                    reneg::models::clip_text::ClipTextConfig::from_value(v, cfg_path).is_ok()
                })
            }),
        },
        Target {
            name: "scheduler_config.json",
            seeds: vec![read(&format!("{SD15}/scheduler/scheduler_config.json"))],
            refused: vec![],
            text: true,
            run: Box::new(move |b, _| {
                let Some(c) = json(b)
                    .and_then(|v| reneg::scheduler::SchedulerConfig::from_value(v, cfg_path).ok())
                else {
                    return false;
                };
                for kind in reneg::scheduler::SchedulerKind::ALL {
                    if let Ok(mut s) = reneg::scheduler::Scheduler::new(kind, c.clone()) {
                        for steps in [7, 1] {
                            if s.set_timesteps(steps).is_ok() {
                                check_timesteps(
                                    &s,
                                    c.num_train_timesteps,
                                    &format!("{kind} with {steps} steps"),
                                );
                            }
                        }
                    }
                }
                true
            }),
        },
        Target {
            name: "open_clip_config.json",
            seeds: vec![read(
                "tests/fixtures/parity/reward-openclip-gelu/reward/open_clip_config.json",
            )],
            refused: vec![],
            text: true,
            run: Box::new(move |b, _| {
                json(b).is_some_and(|v| {
                    reneg::models::open_clip::OpenClipConfig::from_value(v, cfg_path).is_ok()
                })
            }),
        },
        Target {
            name: "CLIP (transformers) config.json",
            seeds: vec![read(
                "tests/fixtures/parity/reward-hfclip/reward/config.json",
            )],
            refused: vec![],
            text: true,
            run: Box::new(move |b, _| {
                let Some(v) = json(b) else {
                    return false;
                };
                let vision = v.get("vision_config").cloned().unwrap_or(v.clone());
                let vision =
                    reneg::models::clip_vision::ClipVisionConfig::from_value(vision, cfg_path);
                let text = v.get("text_config").cloned().unwrap_or(v);
                let text = reneg::models::clip_text::ClipTextConfig::from_value(text, cfg_path);
                vision.is_ok() && text.is_ok()
            }),
        },
        Target {
            name: "tokenizer vocab.json",
            seeds: vec![read(&format!("{MINI_TOK}/vocab.json"))],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| tokenizer_with(s, "vocab.json", b)),
        },
        Target {
            name: "tokenizer merges.txt",
            seeds: vec![read(&format!("{MINI_TOK}/merges.txt"))],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| tokenizer_with(s, "merges.txt", b)),
        },
        Target {
            name: "tokenizer_config.json",
            seeds: vec![read(&format!("{MINI_TOK}/tokenizer_config.json"))],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| tokenizer_with(s, "tokenizer_config.json", b)),
        },
        Target {
            name: "prompt text (tokenizer input, A1111 emphasis syntax)",
            seeds: vec![
                b"a large red circle on the left &amp; a small <|endoftext|> square!!".to_vec(),
                b"a (red:1.3) cat, [[blurry]], \\(x\\) BREAK (unclosed :0.5) ]".to_vec(),
            ],
            refused: vec![],
            text: true,
            run: Box::new(|b, _| {
                // Built once: the real vocabulary takes milliseconds to parse.
                use reneg::tokenizer::ClipTokenizer;
                use std::sync::OnceLock;
                static TOK: OnceLock<(ClipTokenizer, ClipTokenizer)> = OnceLock::new();
                let (tok, oc) = TOK.get_or_init(|| {
                    (
                        ClipTokenizer::embedded("<|endoftext|>").unwrap(),
                        ClipTokenizer::open_clip().unwrap(),
                    )
                });
                let text = String::from_utf8_lossy(b);
                let ids = tok.encode(&text);
                let _ = oc.encode(&text);
                let _ = reneg::prompt_syntax::parse(&text);
                // Any text encodes (to at least the start and end tokens).
                ids.len() >= 2
            }),
        },
        Target {
            name: "prompt file .txt",
            seeds: vec![read("tests/fixtures/train/train_prompts.txt")],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| {
                reneg::prompts::load(&put(s, "p.txt", b)).is_ok_and(|p| !p.is_empty())
            }),
        },
        Target {
            name: "prompt file .tsv",
            seeds: vec![partiprompts_head()],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| {
                reneg::prompts::load(&put(s, "p.tsv", b)).is_ok_and(|p| !p.is_empty())
            }),
        },
        Target {
            name: "prompt file .json",
            seeds: vec![
                br#"{"anime": ["a cat", "a dog"], "photo": ["a car"]}"#.to_vec(),
                br#"["a cat", "a dog"]"#.to_vec(),
            ],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| {
                reneg::prompts::load(&put(s, "p.json", b)).is_ok_and(|p| !p.is_empty())
            }),
        },
        Target {
            name: "PNG image",
            seeds: vec![
                read("assets/mini/experiment/grids/grid_00.png"),
                read("assets/mini/experiment/chart.png"),
            ],
            refused: vec![],
            text: false,
            run: Box::new(|b, s| {
                let Ok(img) = reneg::io::read_png(&put(s, "i.png", b)) else {
                    return false;
                };
                // What is written reads back equal.
                let again = s.join("again.png");
                reneg::io::write_png(&img, &again, None).expect("an accepted image writes");
                let back = reneg::io::read_png(&again).expect("a written image reads");
                assert!(
                    (back.width, back.height, &back.data) == (img.width, img.height, &img.data),
                    "PNG pixels changed"
                );
                true
            }),
        },
        Target {
            name: "training checkpoint (resume)",
            seeds: vec![checkpoint_seed()],
            refused: vec![],
            text: false,
            run: Box::new(|b, s| {
                use reneg::train::checkpoint::Checkpoint;
                let Ok(c) = Checkpoint::load(&put(s, "c.safetensors", b)) else {
                    return false;
                };
                // What is written reads back equal.
                let again = s.join("again.safetensors");
                c.save(&again).expect("an accepted checkpoint saves");
                let back = Checkpoint::load(&again).expect("a saved checkpoint loads");
                let (ours, theirs) = (c.embedding.parts(), back.embedding.parts());
                assert_eq!(ours.len(), theirs.len(), "parts changed");
                for ((p, t), (q, u)) in ours.iter().zip(&theirs) {
                    assert!(p == q && same_bits(t, u), "{p:?} changed");
                }
                assert_eq!(c.optimizer.len(), back.optimizer.len());
                for (o, p) in c.optimizer.iter().zip(&back.optimizer) {
                    assert!(same_bits(&o.m, &p.m), "adam m changed");
                    assert!(same_bits(&o.v, &p.v), "adam v changed");
                    assert_eq!(o.step, p.step);
                }
                assert_eq!(
                    (c.step, c.bad_in_row, &c.config),
                    (back.step, back.bad_in_row, &back.config)
                );
                true
            }),
        },
        Target {
            name: "metrics.jsonl (reward curve)",
            seeds: vec![read("assets/mini/experiment/train/metrics.jsonl")
                .into_iter()
                .take(4000)
                .collect()],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| {
                let m = put(s, "metrics.jsonl", b);
                reneg::train::plot::reward_curve(&m, &s.join("curve.png")).is_ok()
            }),
        },
        Target {
            name: "eval results.jsonl (resume, merge)",
            seeds: vec![read("assets/mini/experiment/results.jsonl")
                .into_iter()
                .take(6000)
                .collect()],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| {
                put(s, "results.jsonl", b);
                let Ok(records) = reneg::eval::load_records(s) else {
                    return false;
                };
                // What is written reads back equal (NaN scores as null, so compared as JSON).
                let again = s.join("again");
                std::fs::create_dir_all(&again).unwrap();
                reneg::eval::append_records(&again, &records).expect("accepted records write");
                let back = reneg::eval::load_records(&again).expect("written records read");
                let as_json = |r: &[reneg::eval::Record]| serde_json::to_string(r).unwrap();
                assert_eq!(as_json(&records), as_json(&back), "records changed");
                true
            }),
        },
        Target {
            name: "eval.json (manifest)",
            seeds: vec![read("assets/mini/experiment/eval.json")],
            refused: vec![],
            text: true,
            run: Box::new(|b, s| {
                put(s, "eval.json", b);
                let Ok(Some(m)) = reneg::eval::Manifest::load(s) else {
                    return false;
                };
                // What is written reads back equal.
                let again = s.join("again");
                std::fs::create_dir_all(&again).unwrap();
                m.save(&again).expect("an accepted manifest saves");
                let back = reneg::eval::Manifest::load(&again).expect("a saved manifest loads");
                let as_json = |m: &reneg::eval::Manifest| serde_json::to_string(m).unwrap();
                assert_eq!(
                    Some(as_json(&m)),
                    back.as_ref().map(as_json),
                    "manifest changed"
                );
                true
            }),
        },
        Target {
            name: "train config.toml",
            seeds: vec![read("assets/mini/experiment/train/config.toml")],
            refused: vec![],
            text: true,
            run: Box::new(|b, _| {
                use reneg::train::config::TrainConfig;
                let (text, src) = (String::from_utf8_lossy(b), Path::new("c.toml"));
                let Ok(cfg) = TrainConfig::from_toml(&text, src)
                    .and_then(|t| TrainConfig::resolve(t, Default::default(), src))
                else {
                    return false;
                };
                // What is written reads back equal (a resumed run compares this text).
                let written = cfg.to_toml();
                let back = TrainConfig::from_toml(&written, src)
                    .and_then(|t| TrainConfig::resolve(t, Default::default(), src))
                    .expect("a written config reads");
                assert_eq!(back.to_toml(), written, "config changed");
                true
            }),
        },
    ]
}

/// A tokenizer folder (the miniature world's) with one file replaced, loaded and used.
fn tokenizer_with(scratch: &Path, name: &str, bytes: &[u8]) -> bool {
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let from = Path::new(MINI_TOK).join(f);
        let data = if f == name {
            bytes.to_vec()
        } else {
            std::fs::read(from).unwrap()
        };
        put(scratch, &format!("tok/{f}"), &data);
    }
    match reneg::tokenizer::ClipTokenizer::from_dir(&scratch.join("tok")) {
        Ok(t) => t.encode("a large red circle on the left, blurry").len() >= 2,
        Err(_) => false,
    }
}

/// The pickle inside a torch.save zip.
fn pickle_of(path: &str) -> Vec<u8> {
    use std::io::Read;
    let bytes = read(path);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .unwrap()
        .to_string();
    let mut out = vec![];
    zip.by_name(&name).unwrap().read_to_end(&mut out).unwrap();
    out
}

/// The first lines of PartiPrompts (the real TSV layout), or a small stand-in.
fn partiprompts_head() -> Vec<u8> {
    match std::fs::read_to_string("../shared/data/PartiPrompts.tsv") {
        Ok(t) => t
            .lines()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes(),
        Err(_) => b"Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\tBasic\t\n".to_vec(),
    }
}

/// A real checkpoint, written by the training code.
fn checkpoint_seed() -> Vec<u8> {
    // A folder per call: the tests build the targets on several threads at once.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("reneg-fuzz-ckpt-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A negative of two learned parts and a mask, as SDXL's and PixArt's are.
    let ones =
        |shape: &[usize]| candle_core::Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
    let emb = reneg::conditioning::Conditioning {
        embeds: ones(&[1, 4, 3]),
        pooled: Some(ones(&[1, 2])),
        mask: Some(ones(&[1, 4])),
    };
    let ck = reneg::train::checkpoint::Checkpoint {
        optimizer: reneg::train::optim::for_learned(&Default::default(), &emb).unwrap(),
        embedding: emb,
        step: 3,
        bad_in_row: 0,
        loss_scaler: reneg::precision::LossScaler::new(),
        config: "steps = 3".into(),
    };
    let p = dir.join("c.safetensors");
    ck.save(&p).unwrap();
    let bytes = std::fs::read(p).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// The seeded mutator.
pub struct Mutator {
    rng: SplitMix64,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
        }
    }

    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n.max(1) as u64) as usize
    }

    /// A new input from `seeds`: one to four mutations of one seed, or (rarely) random bytes.
    pub fn input(&mut self, seeds: &[Vec<u8>], text: bool) -> Vec<u8> {
        if self.below(50) == 0 {
            let n = self.below(256);
            return (0..n).map(|_| self.rng.next_u64() as u8).collect();
        }
        let mut b = seeds[self.below(seeds.len())].clone();
        for _ in 0..1 + self.below(4) {
            self.mutate(&mut b, seeds, text);
        }
        b
    }

    fn mutate(&mut self, b: &mut Vec<u8>, seeds: &[Vec<u8>], text: bool) {
        const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'9'];
        let len = b.len();
        match self.below(if text { 9 } else { 8 }) {
            0 if len > 0 => {
                let i = self.below(len);
                b[i] ^= 1 << self.below(8);
            }
            1 if len > 0 => {
                let i = self.below(len);
                b[i] = INTERESTING[self.below(INTERESTING.len())];
            }
            2 => {
                let i = self.below(len + 1);
                let n = 1 + self.below(8);
                for _ in 0..n {
                    b.insert(i, self.rng.next_u64() as u8);
                }
            }
            3 if len > 0 => {
                let i = self.below(len);
                let n = (1 + self.below(64)).min(len - i);
                b.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = self.below(len);
                let n = (1 + self.below(256)).min(len - i);
                let chunk: Vec<u8> = b[i..i + n].to_vec();
                let at = self.below(len + 1);
                b.splice(at..at, chunk);
            }
            5 if len > 0 => {
                b.truncate(self.below(len));
            }
            6 => {
                // Splice in a range of another seed.
                let other = &seeds[self.below(seeds.len())];
                if !other.is_empty() {
                    let i = self.below(other.len());
                    let n = (1 + self.below(128)).min(other.len() - i);
                    let at = self.below(len + 1);
                    b.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            7 if len >= 8 => {
                // An 8-byte little-endian field overwritten with an extreme value (lengths
                // and offsets in headers).
                let i = self.below(len - 7);
                let v: u64 = [0, 1, u64::MAX, u64::MAX / 2, 1 << 32, 1 << 40][self.below(6)];
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            8 => {
                // A number in text replaced by an extreme one.
                let digits: Vec<usize> = (0..len).filter(|&i| b[i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let i = digits[self.below(digits.len())];
                    let mut j = i;
                    while j < len && (b[j].is_ascii_digit() || b[j] == b'.') {
                        j += 1;
                    }
                    let with = [
                        "0",
                        "-1",
                        "1e308",
                        "99999999999999999999",
                        "-0",
                        "3.5",
                        "1e-300",
                        "NaN",
                    ][self.below(8)];
                    b.splice(i..j, with.bytes());
                }
            }
            _ => {}
        }
    }
}

impl Target {
    /// The files mutated: the valid seeds and the refused ones.
    pub fn pool(&self) -> Vec<Vec<u8>> {
        self.seeds.iter().chain(&self.refused).cloned().collect()
    }

    /// Runs one input in a fresh `dir`: Ok(accepted), or Err(the panic's message).
    pub fn try_run(&self, input: &[u8], dir: &Path) -> Result<bool, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.run)(input, dir))).map_err(
            |p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            },
        )
    }
}

/// A crash: which target, which input (saved under `crashes/` by the caller).
pub struct Crash {
    pub target: &'static str,
    pub input: Vec<u8>,
    pub message: String,
}

/// Runs `iterations` inputs of each target; returns the number of executions and the crashes.
pub fn run_all(
    targets: &[Target],
    iterations: usize,
    seed: u64,
    scratch: &Path,
) -> (usize, Vec<Crash>) {
    let mut crashes = vec![];
    let mut executions = 0;
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (k, t) in targets.iter().enumerate() {
        let mut m = Mutator::new(seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for _ in 0..iterations {
            let input = m.input(&t.pool(), t.text);
            let outcome = t.try_run(&input, &scratch.join(format!("t{k}")));
            executions += 1;
            if let Err(message) = outcome {
                crashes.push(Crash {
                    target: t.name,
                    input,
                    message,
                });
            }
        }
    }
    std::panic::set_hook(quiet);
    (executions, crashes)
}
