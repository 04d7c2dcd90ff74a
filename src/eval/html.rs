//! `report.html`: the comparison as a page to look at. One self-contained file that opens from
//! disk with no server and no network: the run's settings, the table of means, intervals,
//! paired differences and win rates, the chart, then one row per (prompt, seed) with each
//! negative's image or clip (APNG plays inline) and its scores, the prompt's text and category.
//! Rows sort by any reward's difference between two negatives, filter by category and text,
//! and page through large runs (only the page's images are in the document at a time).
//!
//! The page's state lives in its address's fragment (`#reward=hps&a=0&b=1&sort=desc&cat=
//! animals&q=cat&page=2`), so a view can be linked, and a headless browser can be shown one
//! without a click (the browser test does). Every text of the run (prompts, categories,
//! labels, paths) enters the document as text: the static part escaped here, the rows through
//! the DOM's `textContent` and attributes, never as markup.

use super::report::{Report, Row};
use super::{Manifest, Record};
use crate::error::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON that is safe inside a `<script type="application/json">`: no `<` can close the element
/// (inside JSON, `<` only occurs in strings, where `\u003c` reads back the same).
fn script_json(v: &serde_json::Value) -> String {
    v.to_string().replace('<', "\\u003c")
}

fn fmt(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "NaN".into()
    }
}

/// An image file of the run as the page references it: its path relative to the report, or
/// with `embed` its bytes as a data URI (a missing file stays a path: the page shows it as
/// missing, as the grids show a grey cell).
fn image_ref(dir: &Path, rel: &str, embed: bool) -> String {
    if embed {
        if let Ok(bytes) = std::fs::read(dir.join(rel)) {
            use base64::Engine;
            return format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            );
        }
    }
    rel.to_string()
}

/// The rows' data: per unit the prompt, its category, each negative's image and its score
/// under each reward (null where the unit is not scored yet).
fn rows_json(m: &Manifest, records: &[Record], dir: &Path, embed: bool) -> serde_json::Value {
    let by_key = super::dedup(records.to_vec());
    let n = m.negatives.len();
    let rows: Vec<serde_json::Value> = m
        .units()
        .into_iter()
        .map(|(p, seed)| {
            let prompt = &m.prompts[p];
            let images: Vec<serde_json::Value> = (0..n)
                .map(|j| {
                    let rel = super::Manifest::image_path(j, p, seed);
                    let rel = rel.to_string_lossy().replace('\\', "/");
                    image_ref(dir, &rel, embed).into()
                })
                .collect();
            let scores: BTreeMap<&String, Vec<Option<f64>>> = m
                .rewards
                .iter()
                .map(|r| {
                    let v = (0..n)
                        .map(|j| {
                            by_key
                                .get(&(p, seed, j, r.clone()))
                                .map(|rec| rec.score)
                                .filter(|s| s.is_finite())
                        })
                        .collect();
                    (r, v)
                })
                .collect();
            serde_json::json!({
                "p": p, "seed": seed, "prompt": prompt.text, "category": prompt.category,
                "images": images, "scores": scores,
            })
        })
        .collect();
    serde_json::json!({
        "negatives": m.negatives,
        "adapted": m.negatives.iter().map(|n| n.starts_with("per-sample:")).collect::<Vec<_>>(),
        "rewards": m.rewards,
        "rows": rows,
    })
}

/// The settings block: what made these images and which scores were optimised.
fn settings(r: &Report, m: &Manifest) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("model".into(), r.model.clone()),
        (
            "sampler".into(),
            if m.sampler.is_empty() {
                "the model's own".into()
            } else {
                m.sampler.clone()
            },
        ),
        ("steps".into(), m.steps.to_string()),
        ("guidance".into(), m.guidance_scale.to_string()),
        ("size".into(), format!("{} x {} px", m.width, m.height)),
        (
            "seeds".into(),
            format!(
                "{} per prompt, from {} ({} prompt(s), {} unit(s), {} complete)",
                m.seeds,
                m.base_seed,
                m.prompts.len(),
                r.units_planned,
                r.units_complete
            ),
        ),
        (
            "precision".into(),
            format!("{} on {}", m.precision, m.device),
        ),
    ];
    if let Some(f) = m.frames {
        rows.push(("frames".into(), f.to_string()));
    }
    if let Some((steps, patience, lr)) = m.adapt {
        rows.push((
            "per-sample adaptation".into(),
            format!("{steps} steps, patience {patience}, lr {lr}"),
        ));
    }
    for o in &m.model_options {
        rows.push(("model option".into(), o.clone()));
    }
    for (reward, role) in &m.roles {
        rows.push((format!("reward {reward}"), role.clone()));
    }
    let body: String = rows
        .iter()
        .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>\n", escape(k), escape(v)))
        .collect();
    format!("<table class=\"settings\">\n{body}</table>\n")
}

/// One table per reward: mean, interval, difference to the first negative, win rate.
fn summary(r: &Report) -> String {
    let pct = |w: Option<f64>| w.map_or("-".into(), |w| format!("{:.1}%", 100.0 * w));
    let mut s = String::new();
    for reward in &r.rewards {
        s.push_str(&format!(
            "<h3>{}</h3>\n<table class=\"summary\" data-reward=\"{}\">\n<tr><th>negative</th><th>mean</th><th>95% CI</th><th>vs first</th><th>95% CI of difference</th><th>win rate</th></tr>\n",
            escape(reward),
            escape(reward)
        ));
        let rows: Vec<&Row> = r.results.iter().filter(|x| &x.reward == reward).collect();
        for row in rows {
            let u = &row.summary;
            s.push_str(&format!(
                "<tr><td class=\"neg\">{}</td><td>{}</td><td>[{}, {}]</td><td>{:+.4}</td><td>[{:+.4}, {:+.4}]</td><td>{}</td></tr>\n",
                escape(&row.negative),
                fmt(u.mean),
                fmt(u.ci95[0]),
                fmt(u.ci95[1]),
                u.delta_vs_first,
                u.delta_ci95[0],
                u.delta_ci95[1],
                pct(u.win_rate_vs_first)
            ));
        }
        s.push_str("</table>\n");
    }
    s
}

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
table.settings th { background: #f4f4f4; }
#controls { position: sticky; top: 0; background: #fff; padding: 0.5em 0; border-bottom: 1px solid #ddd; }
#controls label { margin-right: 1em; }
#rows td.prompt { max-width: 22em; }
#rows .category { color: #666; font-size: 0.85em; }
#rows img { display: block; width: 192px; height: auto; image-rendering: pixelated; }
#rows .scores { font-size: 0.85em; font-family: monospace; }
#rows td.adapted { background: #fff7e0; }
#rows .badge { font-size: 0.75em; background: #e6a000; color: #fff; padding: 0 0.3em; border-radius: 3px; }
#rows .missing { color: #a00; }
"#;

/// The page's script: reads the data block, renders the current page of rows from the state
/// in the fragment, and writes the state back there on every change.
const SCRIPT: &str = r#"
(function () {
  var data = JSON.parse(document.getElementById('data').textContent);
  var PAGE = 50;
  var el = function (tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  };
  function readState() {
    var s = { reward: data.rewards[0] || '', a: 0, b: Math.min(1, data.negatives.length - 1),
              sort: 'unit', cat: '', q: '', page: 1 };
    var h = window.location.hash.replace(/^#/, '');
    h.split('&').forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf('=');
      var k = decodeURIComponent(i < 0 ? kv : kv.slice(0, i));
      var v = decodeURIComponent(i < 0 ? '' : kv.slice(i + 1).replace(/\+/g, ' '));
      if (k === 'a' || k === 'b' || k === 'page') s[k] = parseInt(v, 10) || 0; else if (k in s) s[k] = v;
    });
    if (data.rewards.indexOf(s.reward) < 0) s.reward = data.rewards[0] || '';
    s.a = Math.max(0, Math.min(s.a, data.negatives.length - 1));
    s.b = Math.max(0, Math.min(s.b, data.negatives.length - 1));
    if (['unit', 'desc', 'asc'].indexOf(s.sort) < 0) s.sort = 'unit';
    s.page = Math.max(1, s.page);
    return s;
  }
  function writeState(s) {
    var parts = ['reward', 'a', 'b', 'sort', 'cat', 'q', 'page'].map(function (k) {
      return encodeURIComponent(k) + '=' + encodeURIComponent(s[k]);
    });
    history.replaceState(null, '', '#' + parts.join('&'));
  }
  function diff(row, s) {
    var v = row.scores[s.reward] || [];
    var x = v[s.a], y = v[s.b];
    return (x === null || x === undefined || y === null || y === undefined) ? null : y - x;
  }
  function fill(select, options, value) {
    select.textContent = '';
    options.forEach(function (o) {
      var opt = el('option', o[1]);
      opt.value = String(o[0]);
      if (String(o[0]) === String(value)) opt.selected = true;
      select.appendChild(opt);
    });
  }
  var state = readState();
  var negs = data.negatives.map(function (n, i) { return [i, n]; });
  var cats = [['', 'all categories']];
  data.rows.forEach(function (r) {
    if (r.category && !cats.some(function (c) { return c[0] === r.category; })) cats.push([r.category, r.category]);
  });
  function controls() {
    fill(document.getElementById('reward'), data.rewards.map(function (r) { return [r, r]; }), state.reward);
    fill(document.getElementById('neg-a'), negs, state.a);
    fill(document.getElementById('neg-b'), negs, state.b);
    fill(document.getElementById('sort'), [['unit', 'prompt order'], ['desc', 'largest gain of B over A first'],
                                           ['asc', 'largest loss of B to A first']], state.sort);
    fill(document.getElementById('category'), cats, state.cat);
    document.getElementById('q').value = state.q;
  }
  function render() {
    var q = state.q.toLowerCase();
    var rows = data.rows.filter(function (r) {
      return (!state.cat || r.category === state.cat) && (!q || r.prompt.toLowerCase().indexOf(q) >= 0);
    });
    if (state.sort !== 'unit') {
      var sign = state.sort === 'desc' ? -1 : 1;
      rows = rows.slice().sort(function (r1, r2) {
        var d1 = diff(r1, state), d2 = diff(r2, state);
        if (d1 === null && d2 === null) return 0;
        if (d1 === null) return 1;
        if (d2 === null) return -1;
        return sign * (d1 - d2);
      });
    }
    var pages = Math.max(1, Math.ceil(rows.length / PAGE));
    state.page = Math.min(state.page, pages);
    var shown = rows.slice((state.page - 1) * PAGE, state.page * PAGE);
    var table = document.getElementById('rows');
    var head = table.tHead.rows[0];
    while (head.cells.length > 2) head.deleteCell(2);
    data.negatives.forEach(function (n, j) {
      var th = el('th', n);
      if (data.adapted[j]) { th.appendChild(document.createTextNode(' ')); th.appendChild(el('span', 'adapted', 'badge')); }
      head.appendChild(th);
    });
    var body = table.tBodies[0];
    body.textContent = '';
    shown.forEach(function (r) {
      var tr = el('tr');
      tr.setAttribute('data-p', r.p);
      tr.setAttribute('data-seed', r.seed);
      var d = diff(r, state);
      tr.setAttribute('data-diff', d === null ? '' : d.toFixed(6));
      var tdp = el('td', null, 'prompt');
      tdp.appendChild(el('div', r.prompt, 'text'));
      if (r.category) tdp.appendChild(el('div', r.category, 'category'));
      tdp.appendChild(el('div', 'seed ' + r.seed, 'category'));
      tr.appendChild(tdp);
      tr.appendChild(el('td', d === null ? '-' : (d >= 0 ? '+' : '') + d.toFixed(4), 'diff'));
      r.images.forEach(function (src, j) {
        var td = el('td', null, data.adapted[j] ? 'adapted' : '');
        var img = el('img');
        img.setAttribute('loading', 'lazy');
        img.setAttribute('alt', data.negatives[j]);
        img.setAttribute('src', src);
        img.onerror = function () { td.insertBefore(el('div', 'missing image', 'missing'), img); img.remove(); };
        td.appendChild(img);
        var sc = el('div', null, 'scores');
        data.rewards.forEach(function (rw) {
          var v = (r.scores[rw] || [])[j];
          sc.appendChild(el('div', rw + ': ' + (v === null || v === undefined ? '-' : v.toFixed(4))));
        });
        td.appendChild(sc);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    document.getElementById('page-info').textContent =
      'page ' + state.page + ' of ' + pages + ' (' + rows.length + ' of ' + data.rows.length + ' rows)';
    document.getElementById('diff-head').textContent =
      state.reward + ': ' + data.negatives[state.b] + ' minus ' + data.negatives[state.a];
    writeState(state);
  }
  function on(id, ev, f) { document.getElementById(id).addEventListener(ev, f); }
  on('reward', 'change', function (e) { state.reward = e.target.value; state.page = 1; render(); });
  on('neg-a', 'change', function (e) { state.a = parseInt(e.target.value, 10); render(); });
  on('neg-b', 'change', function (e) { state.b = parseInt(e.target.value, 10); render(); });
  on('sort', 'change', function (e) { state.sort = e.target.value; state.page = 1; render(); });
  on('category', 'change', function (e) { state.cat = e.target.value; state.page = 1; render(); });
  on('q', 'input', function (e) { state.q = e.target.value; state.page = 1; render(); });
  on('prev', 'click', function () { state.page = Math.max(1, state.page - 1); render(); });
  on('next', 'click', function () { state.page += 1; render(); });
  window.addEventListener('hashchange', function () { state = readState(); controls(); render(); });
  controls();
  render();
})();
"#;

/// The page of an evaluation folder `dir` (image references relative to it; `embed`: the
/// images inside the page as data URIs).
pub fn page(
    r: &Report,
    m: &Manifest,
    records: &[Record],
    dir: &Path,
    embed: bool,
) -> Result<String> {
    let data = rows_json(m, records, dir, embed);
    let chart = match &r.bar_chart {
        Some(c) => format!(
            "<h2>Chart</h2>\n<img class=\"chart\" alt=\"mean reward per negative\" src=\"{}\">\n",
            escape(&image_ref(dir, c, embed))
        ),
        None => String::new(),
    };
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Negatives compared: {model}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
<h1>Negatives compared</h1>\n<h2>Settings</h2>\n{settings}<h2>Results</h2>\n\
<p>Every negative starts from the same noise per unit, so comparisons are paired; intervals are 95% percentile bootstrap over units; win rate: share of units scoring above the first negative (ties half).</p>\n\
{summary}{chart}<h2>Images</h2>\n\
<div id=\"controls\">\n<label>reward <select id=\"reward\"></select></label>\n<label>A <select id=\"neg-a\"></select></label>\n\
<label>B <select id=\"neg-b\"></select></label>\n<label>sort <select id=\"sort\"></select></label>\n\
<label>category <select id=\"category\"></select></label>\n<label>text <input id=\"q\" type=\"search\" placeholder=\"filter prompts\"></label>\n\
<button id=\"prev\" type=\"button\">previous</button> <button id=\"next\" type=\"button\">next</button> <span id=\"page-info\"></span>\n</div>\n\
<table id=\"rows\">\n<thead><tr><th>prompt</th><th id=\"diff-head\">difference</th></tr></thead>\n<tbody></tbody>\n</table>\n\
<script id=\"data\" type=\"application/json\">{data}</script>\n<script>{SCRIPT}</script>\n</body>\n</html>\n",
        model = escape(&r.model),
        settings = settings(r, m),
        summary = summary(r),
        chart = chart,
        data = script_json(&data),
    ))
}
