//! Fuzz targets for every parser that reads a user's file, shared by `examples/fuzz.rs` (the
//! long run) and `tests/fuzz.rs` (a CI-sized run). Inputs are real files mutated by a seeded
//! mutator (bit flips, interesting bytes, inserted, deleted, duplicated and spliced ranges,
//! truncation, numbers in text replaced by extreme ones) or random bytes. A target fails only
//! by panicking: errors are the expected answer to bad input.

#![allow(dead_code)]

use candle_core::{DType, Device};
use reneg::rng::SplitMix64;
use std::path::{Path, PathBuf};

/// Reads one input (the bytes, and a scratch folder of its own for parsers that take paths).
pub type Parse = Box<dyn Fn(&[u8], &Path)>;

/// One parser: its name, the real files it starts from, and how it reads bytes.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
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
                read("tests/fixtures/embedding/not_a_tensor.pt"),
                read("tests/fixtures/embedding/malicious.pt"),
            ],
            text: false,
            run: Box::new(|b, _| {
                let _ = reneg::torch_file::read(b, Path::new("x.pt"));
            }),
        },
        Target {
            name: "torch-file state dict",
            seeds: vec![read(
                "tests/fixtures/parity/reward-openclip-quickgelu/reward/open_clip_model.pt",
            )],
            text: false,
            run: Box::new(|b, _| {
                let _ = reneg::torch_file::read_state_dict(b, Path::new("x.pt"));
            }),
        },
        Target {
            name: "pickle (data.pkl)",
            seeds: vec![pickle_of("tests/fixtures/embedding/torch_saved.pt")],
            text: false,
            run: Box::new(|b, _| {
                let _ = reneg::torch_file::pickle::read_tensor(b);
                let _ = reneg::torch_file::pickle::read_state_dict(b);
            }),
        },
        Target {
            name: "embedding file (safetensors or torch)",
            seeds: vec![
                read("tests/fixtures/embedding/torch_saved.safetensors"),
                read("assets/mini/negatives/reneg-global.safetensors"),
            ],
            text: false,
            run: Box::new(|b, s| {
                if let Ok(e) =
                    reneg::embedding::NegativeEmbedding::load(&put(s, "e.safetensors", b))
                {
                    let _ = e.stats();
                }
            }),
        },
        Target {
            name: "textual-inversion embedding (A1111 .pt, emb_params, learned_embeds)",
            seeds: vec![
                read("tests/fixtures/ti/tinyneg.pt"),
                read("tests/fixtures/ti/tinyneg.safetensors"),
                read("tests/fixtures/ti/learned_embeds.bin"),
            ],
            text: false,
            run: Box::new(|b, s| {
                use reneg::embedding::textual_inversion::{split, TextualInversion};
                if let Ok(t) = TextualInversion::load(&put(s, "ti.pt", b), "ti") {
                    let _ = (t.len(), t.width());
                }
                // The prompt splitter on the same bytes as text.
                let _ = split(&String::from_utf8_lossy(b), &["ti", "<tok>"]);
            }),
        },
        Target {
            name: "model weights (safetensors header as the loaders use it)",
            seeds: vec![read(&format!("{SD15}/text_encoder/model.safetensors"))],
            text: false,
            run: Box::new(|b, _| {
                if let Ok(w) = reneg::weights::Weights::from_bytes(
                    b,
                    Path::new("m.safetensors"),
                    DType::F32,
                    &Device::Cpu,
                ) {
                    let names: Vec<String> = w.names().cloned().collect();
                    for n in names.iter().take(4) {
                        let _ = w.get(n, &[1]);
                    }
                }
            }),
        },
        Target {
            name: "unet config.json",
            seeds: vec![read(&format!("{SD15}/unet/config.json"))],
            text: true,
            run: Box::new(move |b, _| {
                if let Some(v) = json(b) {
                    if let Ok(c) = reneg::models::unet::UNetConfig::from_value(v, cfg_path) {
                        let _ = c.context_dim();
                    }
                }
            }),
        },
        Target {
            name: "vae config.json",
            seeds: vec![read(&format!("{SD15}/vae/config.json"))],
            text: true,
            run: Box::new(move |b, _| {
                if let Some(v) = json(b) {
                    if let Ok(c) = reneg::models::vae::VaeConfig::from_value(v, cfg_path) {
                        let _ = c.downscale();
                    }
                }
            }),
        },
        Target {
            name: "text encoder config.json",
            seeds: vec![read(&format!("{SD15}/text_encoder/config.json"))],
            text: true,
            run: Box::new(move |b, _| {
                if let Some(v) = json(b) {
                    let _ = reneg::models::clip_text::ClipTextConfig::from_value(v, cfg_path);
                }
            }),
        },
        Target {
            name: "scheduler_config.json",
            seeds: vec![read(&format!("{SD15}/scheduler/scheduler_config.json"))],
            text: true,
            run: Box::new(move |b, _| {
                if let Some(v) = json(b) {
                    if let Ok(c) = reneg::scheduler::SchedulerConfig::from_value(v, cfg_path) {
                        for kind in reneg::scheduler::SchedulerKind::ALL {
                            if let Ok(mut s) = reneg::scheduler::Scheduler::new(kind, c.clone()) {
                                let _ = s.set_timesteps(7);
                                let _ = s.set_timesteps(1);
                            }
                        }
                    }
                }
            }),
        },
        Target {
            name: "open_clip_config.json",
            seeds: vec![read(
                "tests/fixtures/parity/reward-openclip-gelu/reward/open_clip_config.json",
            )],
            text: true,
            run: Box::new(move |b, _| {
                if let Some(v) = json(b) {
                    let _ = reneg::models::open_clip::OpenClipConfig::from_value(v, cfg_path);
                }
            }),
        },
        Target {
            name: "CLIP (transformers) config.json",
            seeds: vec![read(
                "tests/fixtures/parity/reward-hfclip/reward/config.json",
            )],
            text: true,
            run: Box::new(move |b, _| {
                if let Some(v) = json(b) {
                    let vision = v.get("vision_config").cloned().unwrap_or(v.clone());
                    let _ =
                        reneg::models::clip_vision::ClipVisionConfig::from_value(vision, cfg_path);
                    let text = v.get("text_config").cloned().unwrap_or(v);
                    let _ = reneg::models::clip_text::ClipTextConfig::from_value(text, cfg_path);
                }
            }),
        },
        Target {
            name: "tokenizer vocab.json",
            seeds: vec![read(&format!("{MINI_TOK}/vocab.json"))],
            text: true,
            run: Box::new(|b, s| tokenizer_with(s, "vocab.json", b)),
        },
        Target {
            name: "tokenizer merges.txt",
            seeds: vec![read(&format!("{MINI_TOK}/merges.txt"))],
            text: true,
            run: Box::new(|b, s| tokenizer_with(s, "merges.txt", b)),
        },
        Target {
            name: "tokenizer_config.json",
            seeds: vec![read(&format!("{MINI_TOK}/tokenizer_config.json"))],
            text: true,
            run: Box::new(|b, s| tokenizer_with(s, "tokenizer_config.json", b)),
        },
        Target {
            name: "prompt text (tokenizer input, A1111 emphasis syntax)",
            seeds: vec![
                b"a large red circle on the left &amp; a small <|endoftext|> square!!".to_vec(),
                b"a (red:1.3) cat, [[blurry]], \\(x\\) BREAK (unclosed :0.5) ]".to_vec(),
            ],
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
                let _ = tok.encode(&String::from_utf8_lossy(b));
                let _ = oc.encode(&String::from_utf8_lossy(b));
                let _ = reneg::prompt_syntax::parse(&String::from_utf8_lossy(b));
            }),
        },
        Target {
            name: "prompt file .txt",
            seeds: vec![read("tests/fixtures/train/train_prompts.txt")],
            text: true,
            run: Box::new(|b, s| {
                let _ = reneg::prompts::load(&put(s, "p.txt", b));
            }),
        },
        Target {
            name: "prompt file .tsv",
            seeds: vec![partiprompts_head()],
            text: true,
            run: Box::new(|b, s| {
                let _ = reneg::prompts::load(&put(s, "p.tsv", b));
            }),
        },
        Target {
            name: "prompt file .json",
            seeds: vec![
                br#"{"anime": ["a cat", "a dog"], "photo": ["a car"]}"#.to_vec(),
                br#"["a cat", "a dog"]"#.to_vec(),
            ],
            text: true,
            run: Box::new(|b, s| {
                let _ = reneg::prompts::load(&put(s, "p.json", b));
            }),
        },
        Target {
            name: "PNG image",
            seeds: vec![
                read("assets/mini/experiment/grids/grid_00.png"),
                read("assets/mini/experiment/chart.png"),
            ],
            text: false,
            run: Box::new(|b, s| {
                let _ = reneg::io::read_png(&put(s, "i.png", b));
            }),
        },
        Target {
            name: "training checkpoint (resume)",
            seeds: vec![checkpoint_seed()],
            text: false,
            run: Box::new(|b, s| {
                let _ = reneg::train::checkpoint::Checkpoint::load(&put(s, "c.safetensors", b));
            }),
        },
        Target {
            name: "metrics.jsonl (reward curve)",
            seeds: vec![read("assets/mini/experiment/train/metrics.jsonl")
                .into_iter()
                .take(4000)
                .collect()],
            text: true,
            run: Box::new(|b, s| {
                let m = put(s, "metrics.jsonl", b);
                let _ = reneg::train::plot::reward_curve(&m, &s.join("curve.png"));
            }),
        },
        Target {
            name: "eval results.jsonl (resume, merge)",
            seeds: vec![read("assets/mini/experiment/results.jsonl")
                .into_iter()
                .take(6000)
                .collect()],
            text: true,
            run: Box::new(|b, s| {
                put(s, "results.jsonl", b);
                let _ = reneg::eval::load_records(s);
            }),
        },
        Target {
            name: "eval.json (manifest)",
            seeds: vec![read("assets/mini/experiment/eval.json")],
            text: true,
            run: Box::new(|b, s| {
                put(s, "eval.json", b);
                let _ = reneg::eval::Manifest::load(s);
            }),
        },
        Target {
            name: "train config.toml",
            seeds: vec![read("assets/mini/experiment/train/config.toml")],
            text: true,
            run: Box::new(|b, _| {
                let text = String::from_utf8_lossy(b);
                if let Ok(t) =
                    reneg::train::config::TrainConfig::from_toml(&text, Path::new("c.toml"))
                {
                    let _ = reneg::train::config::TrainConfig::resolve(
                        t,
                        Default::default(),
                        Path::new("c.toml"),
                    );
                }
            }),
        },
    ]
}

/// A tokenizer folder (the miniature world's) with one file replaced, loaded and used.
fn tokenizer_with(scratch: &Path, name: &str, bytes: &[u8]) {
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
    if let Ok(t) = reneg::tokenizer::ClipTokenizer::from_dir(&scratch.join("tok")) {
        let _ = t.encode("a large red circle on the left, blurry");
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
    let dir = std::env::temp_dir().join(format!("reneg-fuzz-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let emb = candle_core::Tensor::ones((1, 4, 3), DType::F32, &Device::Cpu).unwrap();
    let ck = reneg::train::checkpoint::Checkpoint {
        embedding: emb.clone(),
        optimizer: reneg::train::optim::AdamW::new(Default::default(), &emb).unwrap(),
        step: 3,
        bad_in_row: 0,
        loss_scaler: reneg::precision::LossScaler::new(),
        config: "steps = 3".into(),
    };
    let p = dir.join("c.safetensors");
    ck.save(&p).unwrap();
    std::fs::read(p).unwrap()
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
            let input = m.input(&t.seeds, t.text);
            let dir = scratch.join(format!("t{k}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(&input, &dir)));
            executions += 1;
            if let Err(p) = outcome {
                let message = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
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
