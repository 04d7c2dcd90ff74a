//! The miniature world's data (issue 8 groundwork): determinism, captions that name what is
//! drawn, renderings that show it, and degradations that do what their names say.

use reneg::mini::degrade::{self, Degradation, Family, KINDS};
use reneg::mini::scene::{BACKGROUNDS, COLOURS, POSITIONS, SHAPES};
use reneg::mini::{example, preference_pair, DataConfig};
use reneg::rng::SplitMix64;
use std::collections::BTreeSet;

const N: usize = 32;

fn pixel(img: &[f32], x: usize, y: usize) -> [f32; 3] {
    [0, 1, 2].map(|c| img[c * N * N + y * N + x])
}

fn close(a: [f32; 3], b: [f32; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

#[test]
fn examples_are_deterministic_and_independent_of_order() {
    let cfg = DataConfig::default();
    let a: Vec<_> = (0..20).map(|i| example(7, i, &cfg)).collect();
    let b: Vec<_> = (0..20).rev().map(|i| example(7, i, &cfg)).collect();
    assert!(a.iter().eq(b.iter().rev()));
    assert_ne!(example(7, 0, &cfg), example(8, 0, &cfg));
    assert_ne!(a[0], a[1]);
}

#[test]
fn captions_name_what_is_drawn_and_every_value_occurs() {
    let cfg = DataConfig {
        degraded_share: 0.0,
        ..Default::default()
    };
    let (mut shapes, mut colours, mut positions, mut backgrounds) = (
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
    );
    let mut checked = 0;
    for i in 0..400 {
        let e = example(1, i, &cfg);
        assert!(e.image.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(e.degradation.is_none());
        let bg = BACKGROUNDS[e.scene.background];
        assert!(
            e.caption.ends_with(&format!("on a {} background", bg.0)),
            "{}",
            e.caption
        );
        backgrounds.insert(e.scene.background);
        for s in &e.scene.shapes {
            let words = format!("{} {}", COLOURS[s.colour].0, s.kind.name());
            assert!(e.caption.contains(&words), "{}: {words}", e.caption);
            assert!(e.caption.contains(POSITIONS[s.position].0));
            shapes.insert(s.kind.name());
            colours.insert(s.colour);
            positions.insert(s.position);
        }
        // A lone shape: its centre pixel has its colour, the corner the background's.
        if let [s] = e.scene.shapes.as_slice() {
            let [cx, cy] = POSITIONS[s.position].1;
            let centre = pixel(
                &e.image,
                (cx * N as f32) as usize,
                (cy * N as f32 + 1.0) as usize,
            );
            assert!(
                close(centre, COLOURS[s.colour].1),
                "{}: {centre:?}",
                e.caption
            );
            assert!(close(pixel(&e.image, 0, 0), bg.1), "{}", e.caption);
            checked += 1;
        }
    }
    assert!(checked > 100);
    assert_eq!(shapes.len(), SHAPES.len());
    assert_eq!(colours.len(), COLOURS.len());
    assert_eq!(positions.len(), POSITIONS.len());
    assert_eq!(backgrounds.len(), BACKGROUNDS.len());
}

/// Sum of squared differences between horizontal and vertical neighbours.
fn edge_energy(img: &[f32]) -> f32 {
    let mut e = 0.0;
    for c in 0..3 {
        for y in 0..N - 1 {
            for x in 0..N - 1 {
                let v = img[c * N * N + y * N + x];
                e += (v - img[c * N * N + y * N + x + 1]).powi(2)
                    + (v - img[c * N * N + (y + 1) * N + x]).powi(2);
            }
        }
    }
    e
}

fn std(img: &[f32]) -> f32 {
    let m = img.iter().sum::<f32>() / img.len() as f32;
    (img.iter().map(|v| (v - m).powi(2)).sum::<f32>() / img.len() as f32).sqrt()
}

#[test]
fn degradations_do_what_their_names_say_in_both_families() {
    let mut tested = [0usize; 5];
    for i in 0..60 {
        for family in [Family::Reward, Family::Judge] {
            let (_, clean, bad, d) = preference_pair(3, i, N, family);
            assert!(bad.iter().all(|v| (0.0..=1.0).contains(v)));
            assert_ne!(clean, bad, "{d:?} changed nothing");
            match d {
                Degradation::Blur { .. } => assert!(edge_energy(&bad) < 0.8 * edge_energy(&clean)),
                Degradation::Noise { .. } => assert!(edge_energy(&bad) > edge_energy(&clean)),
                Degradation::LowContrast { factor } => {
                    assert!(factor < 1.0 && std(&bad) < 0.8 * std(&clean))
                }
                Degradation::ColourCast { tint, .. } => {
                    // The channel the tint favours most gains on the one it favours least.
                    let mean =
                        |img: &[f32], c: usize| img[c * N * N..(c + 1) * N * N].iter().sum::<f32>();
                    let hi = (0..3).max_by(|&a, &b| tint[a].total_cmp(&tint[b])).unwrap();
                    let lo = (0..3).min_by(|&a, &b| tint[a].total_cmp(&tint[b])).unwrap();
                    assert!(mean(&bad, hi) - mean(&bad, lo) > mean(&clean, hi) - mean(&clean, lo));
                }
                Degradation::Blocking { block } => {
                    for c in 0..3 {
                        for y in 0..N {
                            let row = &bad[c * N * N + y * N..c * N * N + (y + 1) * N];
                            for x in 0..N {
                                assert_eq!(row[x], row[x / block * block]);
                            }
                        }
                    }
                }
            }
            tested[d.kind()] += 1;
        }
    }
    assert!(tested.iter().all(|&t| t > 5), "{tested:?}");
}

#[test]
fn the_judge_family_uses_other_parameters_than_the_reward() {
    let mut rng = SplitMix64::new(5);
    for (kind, name) in KINDS.iter().enumerate() {
        let reward: Vec<_> = (0..50)
            .map(|_| Degradation::sample(kind, Family::Reward, &mut rng))
            .collect();
        let judge: Vec<_> = (0..50)
            .map(|_| Degradation::sample(kind, Family::Judge, &mut rng))
            .collect();
        assert!(reward.iter().all(|r| !judge.contains(r)), "{name}");
    }
    assert_eq!(degrade::QUALITY_WORDS.len(), KINDS.len());
}

#[test]
fn some_degraded_captions_carry_quality_words() {
    let cfg = DataConfig::default();
    let (mut with, mut without, mut clean) = (0, 0, 0);
    for i in 0..300 {
        let e = example(11, i, &cfg);
        match &e.degradation {
            Some(d) if e.caption.ends_with(degrade::QUALITY_WORDS[d.kind()]) => with += 1,
            Some(_) => without += 1,
            None => {
                assert!(!degrade::QUALITY_WORDS.iter().any(|w| e.caption.contains(w)));
                clean += 1
            }
        }
    }
    assert!(
        with > 20 && without > 20 && clean > 100,
        "{with} {without} {clean}"
    );
}

#[test]
fn captions_parse_back_to_their_scenes() {
    use reneg::mini::scene::Scene;
    let cfg = DataConfig::default();
    for i in 0..200 {
        let e = example(11, i, &cfg);
        // Quality words after the background are ignored.
        assert_eq!(
            Scene::parse(&e.caption).as_ref(),
            Some(&e.scene),
            "{}",
            e.caption
        );
    }
    for bad in [
        "",
        "a photo of a cat",
        "a huge red circle in the centre, on a grey background",
        "a small red circle in the middle, on a grey background",
        "a small red circle on the left and a large blue square on the left, on a grey background",
    ] {
        assert!(Scene::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn the_world_vocabulary_covers_its_words_in_few_tokens() {
    use reneg::mini::vocab;
    let dir = std::env::temp_dir().join(format!("reneg-mini-vocab-{}", std::process::id()));
    vocab::write_tokenizer(&dir).unwrap();
    let tok = reneg::tokenizer::ClipTokenizer::from_dir(&dir).unwrap();
    let mut single = 0;
    for w in vocab::words() {
        // Each word comes out in pieces of the vocabulary, never letter by letter throughout.
        let n = tok.tokens(&w).len();
        assert!(n >= 1 && (n < w.len() || w.len() == 1), "{w}: {n} tokens");
        single += (n == 1) as usize;
    }
    // Most words are one token.
    assert!(2 * single > vocab::words().len(), "{single}");
    // Words outside the world still tokenize, letter by letter.
    assert_eq!(tok.tokens("zq").len(), 2);
    let ids = tok.encode("a red circle");
    assert_eq!(ids.len(), 77);
    // The end token has the highest id (open_clip pools there).
    assert_eq!(tok.eos_id() as usize, vocab::vocab_size() - 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn recipe_runs_end_to_end_resumes_and_writes_loadable_models() {
    use std::process::Command;
    let out = std::env::temp_dir().join(format!("reneg-mini-recipe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_reneg"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&[
        "mini",
        "train",
        "--out",
        out.to_str().unwrap(),
        "--scale",
        "0.003",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = String::from_utf8_lossy(&o.stdout).to_string();
    for m in ["clip", "vae", "unet", "reward", "judge"] {
        assert!(report.contains(&format!("{m}: ")), "{report}");
    }
    // Everything is written: a rerun trains nothing.
    let o = run(&[
        "mini",
        "train",
        "--out",
        out.to_str().unwrap(),
        "--scale",
        "0.003",
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("already"));
    // The pipeline generates; the reward and judge score.
    let img_dir = out.join("images");
    let o = run(&[
        "generate",
        "--model",
        out.join("pipeline").to_str().unwrap(),
        "--prompt",
        "a small red circle in the centre, on a grey background",
        "--steps",
        "3",
        "--out",
        img_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = img_dir.join("00000-seed0.png");
    for (kind, dir) in [
        ("hps", "reward"),
        ("judge-match", "judge"),
        ("clip", "clip"),
    ] {
        let o = run(&[
            "score",
            "--reward",
            kind,
            "--reward-model",
            out.join(dir).to_str().unwrap(),
            "--prompt",
            "a small red circle in the centre, on a grey background",
            "--out",
            out.join(format!("scores-{kind}.json")).to_str().unwrap(),
            png.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // A judge is never optimised against.
    let o = run(&[
        "train",
        "--model",
        out.join("pipeline").to_str().unwrap(),
        "--reward",
        "judge-quality",
        "--reward-model",
        out.join("judge").to_str().unwrap(),
        "--prompts",
        out.join("prompts/train.txt").to_str().unwrap(),
        "--out",
        out.join("neg").to_str().unwrap(),
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("evaluation-only"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_world_tokenizer_matches_transformers_clip_tokenizer() {
    use reneg::mini::vocab;
    // ids from transformers' CLIPTokenizer on the folder `vocab::write_tokenizer` writes
    // (tools/gen_mini_tokenizer_fixture.py).
    let fixture: std::collections::BTreeMap<String, Vec<u32>> = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/mini/tokenizer_ids.json").unwrap(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("reneg-mini-tok-{}", std::process::id()));
    vocab::write_tokenizer(&dir).unwrap();
    let tok = reneg::tokenizer::ClipTokenizer::from_dir(&dir).unwrap();
    for (text, ids) in &fixture {
        assert_eq!(&tok.encode(text), ids, "{text:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
