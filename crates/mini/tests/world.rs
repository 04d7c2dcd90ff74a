//! The miniature world's data (issue 8 groundwork): determinism, captions that name what is
//! drawn, renderings that show it, and degradations that do what their names say.

/// A path under the repository root (the tests run in this crate's folder).
macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

use reneg::rng::SplitMix64;
use reneg_mini::degrade::{self, Degradation, Family, KINDS};
use reneg_mini::scene::{BACKGROUNDS, COLOURS, POSITIONS, SHAPES};
use reneg_mini::{example, preference_pair, DataConfig};
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
fn degraded_captions_carry_quality_words_in_three_forms() {
    use reneg_mini::scene::Scene;
    let cfg = DataConfig::default();
    let (mut suffix, mut alone, mut mostly, mut unworded, mut clean) = (0, 0, 0, 0, 0);
    for i in 0..2000 {
        let e = example(11, i, &cfg);
        match &e.degradation {
            Some(d) => {
                let word = degrade::QUALITY_WORDS[d.kind()];
                let first = &e.scene.shapes[0];
                let named = format!("a {} {}", COLOURS[first.colour].0, first.kind.name());
                if e.caption == word {
                    alone += 1;
                } else if e.caption == format!("a {word} image of {named}") {
                    mostly += 1;
                } else if e.caption == format!("{}, {word}", e.scene.caption()) {
                    suffix += 1;
                } else {
                    // No quality word at all: the whole scene, as a clean image is captioned.
                    assert_eq!(e.caption, e.scene.caption());
                    unworded += 1;
                }
            }
            None => {
                assert!(!degrade::QUALITY_WORDS.iter().any(|w| e.caption.contains(w)));
                assert_eq!(Scene::parse(&e.caption).as_ref(), Some(&e.scene));
                clean += 1
            }
        }
    }
    // DataConfig::default(): 40% degraded, half of those worded; of the worded, a quarter the
    // word alone, a quarter mostly the word, half the scene with the word appended. Expected
    // counts of 2000: 1200 clean, 400 unworded, 200 suffix, 100 alone, 100 mostly.
    println!("{clean} clean, {unworded} unworded, {suffix} suffix, {alone} alone, {mostly} mostly");
    for (n, want) in [
        (clean, 1200.0f64),
        (unworded, 400.0),
        (suffix, 200.0),
        (alone, 100.0),
        (mostly, 100.0),
    ] {
        // Binomial: within 4 standard deviations of the expected count.
        let sd = (want * (1.0 - want / 2000.0)).sqrt();
        assert!((n as f64 - want).abs() < 4.0 * sd, "{n} vs {want}");
    }
}

#[test]
fn quality_word_forms_leave_the_images_and_the_first_versions_captions_alone() {
    // The caption form is drawn after the image: the same example with and without the new
    // forms has the same scene, degradation and pixels, and the first version's caption.
    let v2 = DataConfig::default();
    let v1 = DataConfig {
        quality_only_share: 0.0,
        quality_mostly_share: 0.0,
        ..DataConfig::default()
    };
    let mut differ = 0;
    for i in 0..500 {
        let (a, b) = (example(5, i, &v2), example(5, i, &v1));
        assert_eq!(
            (&a.scene, &a.image, &a.degradation),
            (&b.scene, &b.image, &b.degradation)
        );
        differ += (a.caption != b.caption) as usize;
        if a.caption != b.caption {
            assert!(b.caption.starts_with(&a.scene.caption()), "{}", b.caption);
        }
    }
    assert!(differ > 10, "{differ}");
}

#[test]
fn captions_parse_back_to_their_scenes() {
    use reneg_mini::scene::Scene;
    let cfg = DataConfig {
        quality_only_share: 0.0,
        quality_mostly_share: 0.0,
        ..DataConfig::default()
    };
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
        "blurry",
        "a blurry image of a red circle",
        "a huge red circle in the centre, on a grey background",
        "a small red circle in the middle, on a grey background",
        "a small red circle on the left and a large blue square on the left, on a grey background",
    ] {
        assert!(Scene::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn canonical_scenes_ignore_the_order_shapes_are_named_in() {
    use reneg_mini::scene::Scene;
    let a = Scene::parse(
        "a large red circle on the left and a small blue square at the top, on a grey background",
    )
    .unwrap();
    let b = Scene::parse(
        "a small blue square at the top and a large red circle on the left, on a grey background",
    )
    .unwrap();
    assert_ne!(a, b);
    assert_eq!(a.canonical(), b.canonical());
    assert_eq!(a.is_heldout(), b.is_heldout());
    let c = Scene::parse(
        "a large red circle on the left and a small blue square at the top, on a teal background",
    )
    .unwrap();
    assert_ne!(a.canonical(), c.canonical());
}

#[test]
fn the_held_out_partition_is_about_one_scene_in_eight_and_spread() {
    use reneg_mini::scene::HELDOUT_ONE_IN;
    let cfg = DataConfig::default();
    let mut seen = std::collections::HashSet::new();
    let (mut held, mut backgrounds) = (0usize, BTreeSet::new());
    for i in 0..4000 {
        let s = example(13, i, &cfg).scene.canonical();
        if seen.insert(s.clone()) && s.is_heldout() {
            held += 1;
            backgrounds.insert(s.background);
        }
    }
    let n = seen.len() as f64;
    let want = n / HELDOUT_ONE_IN as f64;
    let sd = (want * (1.0 - 1.0 / HELDOUT_ONE_IN as f64)).sqrt();
    println!("{held} of {} distinct scenes held out", seen.len());
    assert!((held as f64 - want).abs() < 4.0 * sd, "{held} vs {want}");
    assert_eq!(backgrounds.len(), BACKGROUNDS.len());
}

#[test]
fn renegs_prompt_files_hold_distinct_scenes_and_share_none() {
    use reneg_mini::recipe::{prompt_sets, HELDOUT_PROMPTS, TRAIN_PROMPTS};
    use reneg_mini::scene::Scene;
    let (train, heldout) = prompt_sets();
    assert_eq!(
        (train.len(), heldout.len()),
        (TRAIN_PROMPTS, HELDOUT_PROMPTS)
    );
    let scenes = |v: &[String]| -> Vec<Scene> {
        v.iter()
            .map(|c| Scene::parse(c).expect("a whole-scene caption").canonical())
            .collect()
    };
    let (tr, ho) = (scenes(&train), scenes(&heldout));
    let tr_set: std::collections::HashSet<_> = tr.iter().cloned().collect();
    let ho_set: std::collections::HashSet<_> = ho.iter().cloned().collect();
    // No repeated scene within a file, none shared at the level of the scene.
    assert_eq!(tr_set.len(), tr.len());
    assert_eq!(ho_set.len(), ho.len());
    assert!(tr_set.is_disjoint(&ho_set));
    assert!(tr.iter().all(|s| !s.is_heldout()));
    assert!(ho.iter().all(|s| s.is_heldout()));
    // The committed files are these lists.
    let dir = reneg_mini::default_root().join("prompts");
    let read = |f: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(read("train.txt"), train);
    assert_eq!(read("heldout.txt"), heldout);
}

#[test]
fn the_world_vocabulary_covers_its_words_in_few_tokens() {
    use reneg_mini::vocab;
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
fn the_world_tokenizer_matches_transformers_clip_tokenizer() {
    use reneg_mini::vocab;
    // ids from transformers' CLIPTokenizer on the folder `vocab::write_tokenizer` writes
    // (tools/gen_mini_tokenizer_fixture.py).
    let fixture: std::collections::BTreeMap<String, Vec<u32>> = serde_json::from_str(
        &std::fs::read_to_string(repo!("tests/fixtures/mini/tokenizer_ids.json")).unwrap(),
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

/// The ControlNet's condition: white exactly where the rendering shows a shape, black where it
/// shows the background, whatever the colours.
#[test]
fn masks_cover_the_shapes_and_nothing_else() {
    let cfg = DataConfig {
        degraded_share: 0.0,
        ..Default::default()
    };
    let mut edges = 0;
    for i in 0..50 {
        let e = example(5, i, &cfg);
        let mask = e.scene.mask(N);
        let bg = BACKGROUNDS[e.scene.background].1;
        for y in 0..N {
            for x in 0..N {
                let m = pixel(&mask, x, y);
                assert!(m[0] == m[1] && m[1] == m[2], "a grey mask");
                let on_background = close(pixel(&e.image, x, y), bg);
                if on_background {
                    assert_eq!(m[0], 0.0, "example {i} ({x}, {y}): background in the mask");
                } else if m[0] == 1.0 {
                    // Fully covered: the rendering shows shape colours only (a mix of them
                    // where two shapes meet), in no channel beyond their range.
                    let c = pixel(&e.image, x, y);
                    for k in 0..3 {
                        let v = e.scene.shapes.iter().map(|s| COLOURS[s.colour].1[k]);
                        let (lo, hi) = v.fold((1f32, 0f32), |(l, h), v| (l.min(v), h.max(v)));
                        assert!(c[k] >= lo - 1e-5 && c[k] <= hi + 1e-5, "example {i}: {c:?}");
                    }
                    assert!(!close(c, bg));
                } else {
                    // A boundary pixel, partly covered.
                    assert!(m[0] > 0.0 && m[0] < 1.0, "example {i} ({x}, {y}): {m:?}");
                    edges += 1;
                }
            }
        }
    }
    assert!(edges > 0, "anti-aliased boundaries");
}
