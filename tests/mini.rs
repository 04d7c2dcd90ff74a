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
