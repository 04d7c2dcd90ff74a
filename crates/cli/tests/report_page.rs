//! The evaluation as a page (issue 34), in a real browser: a small eval run's `report.html`
//! opened from disk by headless Chromium (the distribution's package, which
//! `tools/test-deps.sh` installs; `RENEG_CHROMIUM` names another). The page's own script
//! renders its rows; the state in the address's fragment drives the sort and the filters
//! (what a click sets), and Chromium's `--dump-dom` gives the document as the script left it.
//! A prompt holding `<script>` and quotes is shown as text, never run. A screenshot must not
//! be blank. Without Chromium the test fails: it does not skip.

macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::ok;

const SD15: &str = repo!("tests/fixtures/parity/sd15-tiny/pipeline");
const AESTHETIC: &str = repo!("tests/fixtures/parity/reward-aesthetic/reward");
const EVIL: &str = "<script>document.title='pwned'</script> a \"quoted\" & 'apostrophe' cat";

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("RENEG_CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser"] {
        if let Ok(o) = Command::new("which").arg(name).output() {
            if o.status.success() {
                return PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            }
        }
    }
    panic!("no Chromium found: run tools/test-deps.sh (or set RENEG_CHROMIUM)");
}

/// Chromium headless on the page `file` with `fragment`, `args` added (`--dump-dom`,
/// `--screenshot=...`); its stdout. Flags as this machine's network needs them: no
/// background connections, a fresh profile.
fn browse(file: &Path, fragment: &str, args: &[&str], profile: &Path) -> String {
    let url = format!("file://{}#{fragment}", file.display());
    let o = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .arg(&url)
        .output()
        .expect("Chromium runs");
    assert!(
        o.status.success(),
        "chromium {args:?} {url}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The rows the script rendered: (prompt index, seed, difference B - A) in document order.
fn rows(dom: &str) -> Vec<(usize, u64, Option<f64>)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let k = tag.find(&format!("{name}=\""))? + name.len() + 2;
        Some(tag[k..k + tag[k..].find('"')?].to_string())
    };
    dom.match_indices("<tr data-p=")
        .map(|(i, _)| {
            let tag = &dom[i..i + dom[i..].find('>').unwrap()];
            (
                attr(tag, "data-p").unwrap().parse().unwrap(),
                attr(tag, "data-seed").unwrap().parse().unwrap(),
                attr(tag, "data-diff").and_then(|d| d.parse().ok()),
            )
        })
        .collect()
}

#[test]
fn the_report_page_sorts_filters_and_shows_text_as_text_in_chromium() {
    let dir = support::tempdir("report-page");
    let prompts = dir.join("prompts.tsv");
    std::fs::write(
        &prompts,
        format!(
            "Prompt\tCategory\na red cube on a table\tObjects\na small dog in the snow\tAnimals\n\
             a blue sphere\tObjects\n{EVIL}\tAnimals\n"
        ),
    )
    .unwrap();
    let out = dir.join("eval");
    ok(&[
        "eval",
        "--model",
        SD15,
        "--prompts",
        prompts.to_str().unwrap(),
        "--seeds",
        "2",
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--negative",
        "null",
        "--negative",
        "prompt:blurry, low quality",
        "--reward",
        "aesthetic",
        "--reward-model",
        AESTHETIC,
        "--out",
        out.to_str().unwrap(),
    ]);
    let page = out.join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    // The static part: settings, the table of means, the chart; the prompt never as markup.
    for want in [
        "<h2>Settings</h2>",
        "class=\"summary\"",
        "win rate",
        "chart.png",
        "prompt:blurry, low quality",
    ] {
        assert!(html.contains(want), "{want} not in report.html");
    }
    assert!(
        !html.contains("<script>document.title"),
        "the prompt's <script> is in the page as markup"
    );
    // Each unit's scores, from results.jsonl, independently of the page.
    let mut score: std::collections::HashMap<(usize, u64, usize), f64> = Default::default();
    for line in std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        score.insert(
            (
                v["prompt_index"].as_u64().unwrap() as usize,
                v["seed"].as_u64().unwrap(),
                v["negative"].as_u64().unwrap() as usize,
            ),
            v["score"].as_f64().unwrap(),
        );
    }
    assert_eq!(score.len(), 16);
    let profile = dir.join("profile");

    // Unsorted: the 8 units in prompt order, each row's difference B - A as the records say.
    let dom = browse(&page, "reward=aesthetic&a=0&b=1", &["--dump-dom"], &profile);
    let plain = rows(&dom);
    assert_eq!(plain.len(), 8, "{dom}");
    for &(p, s, d) in &plain {
        let want = score[&(p, s, 1)] - score[&(p, s, 0)];
        assert!(
            (d.unwrap() - want).abs() < 1e-5,
            "unit ({p}, {s}): {d:?} vs {want}"
        );
    }
    let order: Vec<(usize, u64)> = plain.iter().map(|&(p, s, _)| (p, s)).collect();
    assert_eq!(
        order,
        vec![
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
            (2, 0),
            (2, 1),
            (3, 0),
            (3, 1)
        ]
    );
    // The table of means and the images are in the document the browser built.
    assert!(dom.contains("class=\"summary\"") && dom.matches("<img").count() > 16);

    // Sorted by the largest gain of B over A, then by the largest loss.
    for (sort, descending) in [("desc", true), ("asc", false)] {
        let dom = browse(
            &page,
            &format!("reward=aesthetic&a=0&b=1&sort={sort}"),
            &["--dump-dom"],
            &profile,
        );
        let d: Vec<f64> = rows(&dom).iter().map(|r| r.2.unwrap()).collect();
        assert_eq!(d.len(), 8);
        let mut expected: Vec<f64> = plain.iter().map(|r| r.2.unwrap()).collect();
        expected.sort_by(|x, y| x.partial_cmp(y).unwrap());
        if descending {
            expected.reverse();
        }
        assert_eq!(d, expected, "sort={sort}");
        assert!(
            d.first() != d.last(),
            "the differences are not all equal: the sort is not seen"
        );
    }

    // Filters: by category, and by text (case-insensitive), with the count shown.
    let dom = browse(&page, "cat=Objects", &["--dump-dom"], &profile);
    let got: Vec<usize> = rows(&dom).iter().map(|r| r.0).collect();
    assert_eq!(got, vec![0, 0, 2, 2]);
    assert!(dom.contains("(4 of 8 rows)"), "{dom}");
    let dom = browse(&page, "q=DOG", &["--dump-dom"], &profile);
    assert_eq!(
        rows(&dom).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 1]
    );

    // The evil prompt: its text is in a cell as text, the title is the page's own.
    let dom = browse(&page, "q=apostrophe", &["--dump-dom"], &profile);
    assert_eq!(
        rows(&dom).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![3, 3]
    );
    assert!(dom.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt; a \"quoted\" &amp; 'apostrophe' cat"), "{dom}");
    assert!(dom.contains("<title>Negatives compared:") && !dom.contains("<title>pwned"));

    // A screenshot of the page is not blank: many colours, much of it not white.
    let shot = dir.join("shot.png");
    browse(
        &page,
        "",
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1400",
            "--hide-scrollbars",
        ],
        &profile,
    );
    let img = reneg::io::read_png(&shot).unwrap();
    let px: Vec<&[u8]> = img.data.chunks(3).collect();
    let non_white = px.iter().filter(|p| p.iter().any(|&c| c < 235)).count();
    let colours: std::collections::HashSet<&[u8]> = px.iter().copied().collect();
    assert!(
        non_white * 20 > px.len() && colours.len() > 200,
        "a blank-looking screenshot: {non_white} of {} pixels not white, {} colours",
        px.len(),
        colours.len()
    );
}

/// `--embed-images`: the page carries its images (data URIs), so it shows them moved away
/// from its folder; the grids gain column headers and prompt labels (taller and wider than
/// the bare cells).
#[test]
fn embedded_images_travel_with_the_page_and_grids_are_labelled() {
    let dir = support::tempdir("report-embed");
    let out = dir.join("eval");
    ok(&[
        "eval",
        "--model",
        SD15,
        "--prompt",
        "a red cube on a table",
        "--prompt",
        "a blue sphere",
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--negative",
        "null",
        "--negative",
        "prompt:blurry",
        "--reward",
        "aesthetic",
        "--reward-model",
        AESTHETIC,
        "--embed-images",
        "--out",
        out.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(
        html.matches("data:image/png;base64,").count(),
        4 + 1,
        "4 images and the chart"
    );
    let moved = dir.join("moved.html");
    std::fs::write(&moved, &html).unwrap();
    let missing = "<div class=\"missing\">";
    let dom = browse(&moved, "", &["--dump-dom"], &dir.join("profile"));
    assert_eq!(rows(&dom).len(), 2);
    assert!(!dom.contains(missing), "an embedded image did not load");
    // The check can fail: the same page with its images pointing nowhere shows them missing.
    let broken = dir.join("broken.html");
    std::fs::write(&broken, html.replace("data:image/png;base64,", "nowhere/")).unwrap();
    let dom = browse(&broken, "", &["--dump-dom"], &dir.join("profile"));
    assert_eq!(dom.matches(missing).count(), 4, "{dom}");
    let grid = reneg::io::read_png(&out.join("grids/grid_00.png")).unwrap();
    assert!(grid.width > 2 * (32 + 4) + 100 && grid.height > 2 * (32 + 4) + 20);
    // The label band holds ink (the prompt's text), not only background.
    let band_ink = (0..grid.height)
        .flat_map(|y| (0..100).map(move |x| (x, y)))
        .filter(|&(x, y)| grid.data[3 * (y * grid.width + x)] < 128)
        .count();
    assert!(band_ink > 50, "no text in the grid's label column");
}
