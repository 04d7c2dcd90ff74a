//! The miniature world's scenes (issue 8): one or two flat shapes of a named colour, size and
//! position on a plain background, rendered anti-aliased, with a caption that names them.
//! Everything is drawn from a seed, so a dataset is a pure function of its seed.

use reneg::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
}

pub const SHAPES: [ShapeKind; 3] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];

impl ShapeKind {
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }

    /// The kind a caption names (`"circle"` -> `Circle`).
    pub fn from_name(name: &str) -> Option<ShapeKind> {
        SHAPES.into_iter().find(|k| k.name() == name)
    }
}

/// Named colours, far enough apart that a small classifier can tell them.
pub const COLOURS: [(&str, [f32; 3]); 7] = [
    ("red", [0.85, 0.12, 0.10]),
    ("green", [0.15, 0.65, 0.20]),
    ("blue", [0.12, 0.25, 0.85]),
    ("yellow", [0.95, 0.85, 0.15]),
    ("purple", [0.55, 0.20, 0.70]),
    ("orange", [0.95, 0.50, 0.10]),
    ("white", [0.95, 0.95, 0.95]),
];

/// Background colours (muted, so every shape colour stands out on every background).
pub const BACKGROUNDS: [(&str, [f32; 3]); 4] = [
    ("grey", [0.50, 0.50, 0.50]),
    ("black", [0.08, 0.08, 0.08]),
    ("beige", [0.80, 0.74, 0.60]),
    ("teal", [0.15, 0.45, 0.45]),
];

/// Positions as the caption names them, with their centre in [0, 1]^2 (x right, y down).
pub const POSITIONS: [(&str, [f32; 2]); 5] = [
    ("in the centre", [0.5, 0.5]),
    ("on the left", [0.27, 0.5]),
    ("on the right", [0.73, 0.5]),
    ("at the top", [0.5, 0.27]),
    ("at the bottom", [0.5, 0.73]),
];

pub const SIZES: [(&str, f32); 2] = [("small", 0.14), ("large", 0.24)];

/// One canonical scene in this many is held out (see [`Scene::is_heldout`]).
pub const HELDOUT_ONE_IN: u64 = 8;

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    pub kind: ShapeKind,
    /// Indices into [`COLOURS`], [`POSITIONS`], [`SIZES`].
    pub colour: usize,
    pub position: usize,
    pub size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Scene {
    pub shapes: Vec<Shape>,
    /// Index into [`BACKGROUNDS`].
    pub background: usize,
}

fn pick(rng: &mut SplitMix64, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

impl Scene {
    /// One or two shapes (two in a third of the scenes); a pair never uses the centre and
    /// never shares a position.
    pub fn sample(rng: &mut SplitMix64) -> Scene {
        let count = if pick(rng, 3) == 0 { 2 } else { 1 };
        let mut shapes: Vec<Shape> = vec![];
        while shapes.len() < count {
            let position = if count == 1 {
                pick(rng, POSITIONS.len())
            } else {
                1 + pick(rng, POSITIONS.len() - 1)
            };
            let s = Shape {
                kind: SHAPES[pick(rng, SHAPES.len())],
                colour: pick(rng, COLOURS.len()),
                position,
                size: pick(rng, SIZES.len()),
            };
            if shapes.iter().all(|o| o.position != s.position) {
                shapes.push(s);
            }
        }
        Scene {
            shapes,
            background: pick(rng, BACKGROUNDS.len()),
        }
    }

    /// The scene as a composition: its shapes in position order. Two captions that name the
    /// same shapes in the other order describe the same canonical scene.
    pub fn canonical(&self) -> Scene {
        let mut shapes = self.shapes.clone();
        shapes.sort_by_key(|s| s.position);
        Scene {
            shapes,
            background: self.background,
        }
    }

    /// Whether this composition belongs to the held-out partition of the world's scenes: one
    /// in [`HELDOUT_ONE_IN`] canonical scenes, chosen by a hash of the composition, so the
    /// partition is a fixed property of the scene and not of where it was drawn. ReNeg's
    /// training prompts come only from the other scenes, its evaluation prompts only from
    /// these.
    pub fn is_heldout(&self) -> bool {
        let c = self.canonical();
        let mut h = reneg::rng::SplitMix64::new(0x0004_E1D0_u64 ^ (c.background as u64 + 1));
        let mut acc = h.next_u64();
        for s in &c.shapes {
            let code = ((s.kind as u64 * 8 + s.colour as u64) * 8 + s.position as u64) * 4
                + s.size as u64
                + 1;
            acc = reneg::rng::SplitMix64::new(acc ^ code).next_u64();
        }
        acc.is_multiple_of(HELDOUT_ONE_IN)
    }

    /// "a large red circle on the left and a small blue square at the top, on a grey background"
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self
            .shapes
            .iter()
            .map(|s| {
                format!(
                    "a {} {} {} {}",
                    SIZES[s.size].0,
                    COLOURS[s.colour].0,
                    s.kind.name(),
                    POSITIONS[s.position].0
                )
            })
            .collect();
        format!(
            "{}, on a {} background",
            parts.join(" and "),
            BACKGROUNDS[self.background].0
        )
    }

    /// The scene a caption describes (the inverse of [`Scene::caption`]); quality words
    /// appended after the background ("..., on a grey background, blurry") are ignored.
    pub fn parse(caption: &str) -> Option<Scene> {
        let caption = caption.trim();
        let (objects, rest) = caption.split_once(", on a ")?;
        let bg_name = rest.split_once(" background")?.0;
        let background = BACKGROUNDS.iter().position(|b| b.0 == bg_name)?;
        let mut shapes: Vec<Shape> = Vec::new();
        for part in objects.split(" and ") {
            let words: Vec<&str> = part.split_whitespace().collect();
            if words.len() < 5 || words[0] != "a" {
                return None;
            }
            let size = SIZES.iter().position(|s| s.0 == words[1])?;
            let colour = COLOURS.iter().position(|c| c.0 == words[2])?;
            let kind = ShapeKind::from_name(words[3])?;
            let pos_text = words[4..].join(" ");
            let position = POSITIONS.iter().position(|p| p.0 == pos_text)?;
            if shapes.iter().any(|s| s.position == position) {
                return None;
            }
            shapes.push(Shape {
                kind,
                colour,
                position,
                size,
            });
        }
        Some(Scene { shapes, background })
    }

    /// `[3, size, size]` RGB in [0, 1], channel-major; 4x4 supersampling for smooth edges.
    pub fn render(&self, size: usize) -> Vec<f32> {
        let bg = BACKGROUNDS[self.background].1;
        // Later shapes are drawn over earlier ones.
        supersample(size, |x, y| {
            self.shapes
                .iter()
                .rev()
                .find(|s| s.covers(x, y))
                .map_or(bg, |s| COLOURS[s.colour].1)
        })
    }

    /// The scene's shape mask, what the world's ControlNet is conditioned on: `[3, size, size]`
    /// in [0, 1], white where a shape covers the pixel and black elsewhere (supersampled as
    /// [`Scene::render`]). It tells where the shapes are and their outlines, not their colours
    /// or the background.
    pub fn mask(&self, size: usize) -> Vec<f32> {
        supersample(size, |x, y| {
            if self.shapes.iter().any(|s| s.covers(x, y)) {
                [1.0; 3]
            } else {
                [0.0; 3]
            }
        })
    }
}

/// `[3, size, size]` channel-major: each pixel the mean of `colour_at` over a 4x4 grid of
/// points inside it (coordinates in [0, 1]^2, x right, y down).
fn supersample(size: usize, colour_at: impl Fn(f32, f32) -> [f32; 3]) -> Vec<f32> {
    const SS: usize = 4;
    let mut out = vec![0f32; 3 * size * size];
    for py in 0..size {
        for px in 0..size {
            let mut acc = [0f32; 3];
            for sy in 0..SS {
                for sx in 0..SS {
                    let x = (px as f32 + (sx as f32 + 0.5) / SS as f32) / size as f32;
                    let y = (py as f32 + (sy as f32 + 0.5) / SS as f32) / size as f32;
                    let c = colour_at(x, y);
                    for k in 0..3 {
                        acc[k] += c[k];
                    }
                }
            }
            for (k, a) in acc.iter().enumerate() {
                out[k * size * size + py * size + px] = a / (SS * SS) as f32;
            }
        }
    }
    out
}

impl Shape {
    /// Whether the point (x, y) in [0, 1]^2 lies inside the shape.
    pub fn covers(&self, x: f32, y: f32) -> bool {
        let [cx, cy] = POSITIONS[self.position].1;
        let r = SIZES[self.size].1;
        let (dx, dy) = (x - cx, y - cy);
        match self.kind {
            ShapeKind::Circle => dx * dx + dy * dy <= r * r,
            ShapeKind::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
            // Pointing up, base at cy + r/2, apex at cy - r.
            ShapeKind::Triangle => {
                let t = (dy + r) / (1.5 * r);
                (0.0..=1.0).contains(&t) && dx.abs() <= t * r * 0.95
            }
        }
    }
}
