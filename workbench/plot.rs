//! Charts for reports and the design doc, drawn with `plotters`.
//!
//! Two kinds of chart:
//!
//! * [`roofline_chart`]: a log-log roofline of every measured point: x is
//!   arithmetic intensity (flop/byte), y is attained TFLOP/s, under the
//!   measured bandwidth roof `min(I * BW, peak)` and the flat compute roof.
//!   Colour tells implementations apart, marker shape tells kernels apart.
//! * [`bandwidth_chart`]: for one kernel, attained GB/s against bytes moved
//!   (log x), one line per implementation, under a dashed line at the
//!   measured bandwidth ceiling.
//!
//! Every chart is written twice, as `<stem>.svg` and `<stem>.png`, both
//! [`WIDTH`] x [`HEIGHT`] px; the parent directory of `stem` is created when
//! missing. The legend sits in a panel to the right of the plot, so it never
//! covers data.
//!
//! Fonts: the PNG rasteriser needs glyph outlines, and the machines that make
//! the reports have no system fonts. DejaVu Sans (`workbench/assets/
//! DejaVuSans.ttf`, licence beside it) is compiled into the binary with
//! `include_bytes!` and registered with plotters' `ab_glyph` support under
//! the generic family name `sans-serif`, the only family the charts use. The
//! SVG files name that same generic family, so any SVG viewer draws the text
//! with its own sans-serif font.
//!
//! plotters 0.3.7's `ab_glyph` text drawing places every glyph's ink at the
//! pen position, dropping the glyph's left side bearing, which spaces
//! letters unevenly ("ceil ing"). So on the PNG, text is drawn one glyph at a
//! time at positions computed from the font's own metrics (read here from the
//! embedded file's `cmap`, `hmtx`, `kern` and `glyf` tables); the SVG keeps
//! each string whole.
//!
//! Colours are fixed per implementation name: `"ours"` is always
//! [`OURS_COLOR`], variants such as `"ours v2"` take darker or lighter reds,
//! well-known peers have reserved colours and other names take a colour from
//! a hash of the name, so charts can be compared side by side. Ours (and its
//! variants) are drawn on top, with bigger markers and thicker lines.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One measured point: a kernel case timed for one implementation.
#[derive(Clone, Debug)]
pub struct Point {
    /// Kernel name, e.g. `"rmsnorm"`.
    pub kernel: String,
    /// `"ours"` or a peer name, e.g. `"flashinfer"`, `"torch_eager"`.
    pub implementation: String,
    /// Case string, e.g. `"tokens=4096,hidden=896,residual=1"`.
    pub case: String,
    /// Bytes moved, from the kernel's traffic model.
    pub bytes: f64,
    /// Floating-point operations, from the kernel's model (0 for pure data movement).
    pub flops: f64,
    /// Median time in seconds.
    pub seconds: f64,
}

/// Ceilings measured on the card.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// Attainable memory bandwidth, GB/s (10^9 bytes per second).
    pub gb_per_s: f64,
    /// Attainable compute throughput, TFLOP/s (10^12 flop per second).
    pub tflop_per_s: f64,
}

/// Width of every chart, in pixels (PNG) or user units (SVG).
pub const WIDTH: u32 = 1000;
/// Height of every chart, in pixels (PNG) or user units (SVG).
pub const HEIGHT: u32 = 650;

/// Arithmetic intensity (flop/byte) at which points with zero flops are
/// drawn on the roofline. Their flops are taken as `ZERO_FLOP_INTENSITY *
/// bytes`, so their height against the sloped roof still shows the fraction
/// of bandwidth attained.
pub const ZERO_FLOP_INTENSITY: f64 = 1e-3;

/// Colour of `"ours"` on every chart.
pub const OURS_COLOR: RGBColor = RGBColor(214, 39, 40);

/// Colours for variants of ours (`"ours v2"`, ...): shades of ours' red.
const OURS_VARIANT_COLORS: [RGBColor; 3] = [
    RGBColor(140, 10, 30),  // dark red
    RGBColor(250, 110, 90), // salmon
    RGBColor(90, 0, 20),    // maroon
];

/// Colours for peers (the Tableau 10 palette less its red, which is ours).
const PEER_COLORS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),  // blue
    RGBColor(255, 127, 14),  // orange
    RGBColor(44, 160, 44),   // green
    RGBColor(148, 103, 189), // purple
    RGBColor(140, 86, 75),   // brown
    RGBColor(227, 119, 194), // pink
    RGBColor(127, 127, 127), // grey
    RGBColor(188, 189, 34),  // olive
    RGBColor(23, 190, 207),  // cyan
];

/// Peers with a reserved slot in [`PEER_COLORS`]; other names are hashed.
const KNOWN_PEERS: [(&str, usize); 10] = [
    ("torch_eager", 0),
    ("torch_compile", 1),
    ("flashinfer", 2),
    ("cublas", 3),
    ("cublaslt", 3),
    ("triton", 4),
    ("liger", 5),
    ("cudnn", 6),
    ("cutlass", 7),
    ("vllm", 8),
];

/// The embedded font, DejaVu Sans 2.37 (see `assets/DejaVuSans-LICENSE.txt`).
static FONT_BYTES: &[u8] = include_bytes!("assets/DejaVuSans.ttf");

/// The one font family the charts use; the embedded font is registered under it.
const FAMILY: &str = "sans-serif";

const TITLE_SIZE: f64 = 24.0;
const AXIS_DESC_SIZE: f64 = 18.0;
const TICK_SIZE: f64 = 15.0;
const LEGEND_SIZE: f64 = 15.0;
const NOTE_SIZE: f64 = 14.0;
const HEADER_H: u32 = 46;
const FOOTER_H: u32 = 28;
const LEGEND_W: u32 = 230;
const LEGEND_ROW_H: i32 = 23;

const INK: RGBColor = RGBColor(40, 40, 40);
const ROOF: RGBColor = RGBColor(70, 70, 70);
const MUTED: RGBColor = RGBColor(90, 90, 90);
const GRID_BOLD: RGBColor = RGBColor(210, 210, 210);
const GRID_LIGHT: RGBColor = RGBColor(238, 238, 238);

/// Draws the log-log roofline of `points` under `ceilings` and writes
/// `<stem>.svg` and `<stem>.png`.
///
/// x is arithmetic intensity (flop/byte), y attained TFLOP/s. The sloped
/// bandwidth roof `min(I * BW, peak)` and the flat compute roof are drawn and
/// labelled with their values. Each (kernel, implementation) pair has its own
/// marker: colour by implementation, shape by kernel, listed in a legend to
/// the right of the plot (with more than 22 pairs the legend lists colours
/// and shapes separately). Points with 0 flops are drawn at intensity
/// [`ZERO_FLOP_INTENSITY`] (with flops taken as that times bytes) and a note
/// under the chart says so.
///
/// Errors when `points` is empty, a point has non-positive or non-finite
/// bytes or seconds (or negative flops), the ceilings are not positive, or
/// a file cannot be written.
pub fn roofline_chart(
    points: &[Point],
    ceilings: Ceilings,
    title: &str,
    stem: &Path,
) -> Result<()> {
    let chart = Roofline::new(points, ceilings, title)
        .with_context(|| format!("roofline chart {}", stem.display()))?;
    write_both(&chart, stem)
}

/// Draws, for `kernel`, attained bandwidth against bytes moved and writes
/// `<stem>.svg` and `<stem>.png`.
///
/// Only the points whose `kernel` matches are used. x is bytes moved in MB
/// (10^6 bytes, log scale), y attained GB/s (linear, from 0). One line with
/// markers per implementation, sorted by bytes (several cases with the same
/// bytes are all drawn); ours (and variants such as `"ours v2"`) are drawn
/// on top with thicker lines and bigger markers. A
/// dashed horizontal line marks the bandwidth ceiling, labelled
/// "measured ceiling N GB/s". The legend sits to the right of the plot.
///
/// Errors when no point belongs to `kernel`, a point has non-positive or
/// non-finite bytes or seconds, the ceilings are not positive, or a file
/// cannot be written.
pub fn bandwidth_chart(
    kernel: &str,
    points: &[Point],
    ceilings: Ceilings,
    title: &str,
    stem: &Path,
) -> Result<()> {
    let chart = Bandwidth::new(kernel, points, ceilings, title)
        .with_context(|| format!("bandwidth chart for {kernel:?}, {}", stem.display()))?;
    write_both(&chart, stem)
}

// ---------------------------------------------------------------------------
// Colours and markers

/// Whether `implementation` is ours: `"ours"` itself or a variant of it
/// such as `"ours v2"` or `"ours_fused"` (compared case-insensitively).
/// All of ours are drawn thicker, bigger and on top.
fn is_ours(implementation: &str) -> bool {
    let lower = implementation.to_ascii_lowercase();
    lower == "ours"
        || lower
            .strip_prefix("ours")
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| !c.is_ascii_alphanumeric())
}

/// Which palette an implementation draws from, and the slot it would like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Plain `"ours"`: always [`OURS_COLOR`].
    Ours,
    /// A variant of ours: a slot in [`OURS_VARIANT_COLORS`].
    Variant(usize),
    /// A peer: a slot in [`PEER_COLORS`].
    Peer(usize),
}

/// FNV-1a: stable across runs and platforms, unlike std's hasher.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The palette slot an implementation would like: fixed for "ours" and
/// well-known peers, otherwise from a hash of the lower-cased name.
fn preferred_slot(implementation: &str) -> Slot {
    let lower = implementation.to_ascii_lowercase();
    if lower == "ours" {
        return Slot::Ours;
    }
    if is_ours(&lower) {
        return Slot::Variant((fnv1a(&lower) % OURS_VARIANT_COLORS.len() as u64) as usize);
    }
    if let Some(&(_, slot)) = KNOWN_PEERS.iter().find(|(name, _)| *name == lower) {
        return Slot::Peer(slot);
    }
    Slot::Peer((fnv1a(&lower) % PEER_COLORS.len() as u64) as usize)
}

/// Colours for the implementations of one chart: "ours" gets [`OURS_COLOR`];
/// every other name its fixed slot, unless a name earlier in name order
/// already took it, in which case it moves to the next free slot of its
/// palette.
fn assign_colors<'a>(
    implementations: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, RGBColor> {
    fn take(palette: &[RGBColor], taken: &mut [bool], slot: usize) -> RGBColor {
        let free = (0..palette.len())
            .map(|i| (slot + i) % palette.len())
            .find(|&s| !taken[s])
            .unwrap_or(slot);
        taken[free] = true;
        palette[free]
    }
    let mut peers_taken = [false; PEER_COLORS.len()];
    let mut variants_taken = [false; OURS_VARIANT_COLORS.len()];
    let names: BTreeSet<&str> = implementations.into_iter().collect();
    names
        .into_iter()
        .map(|name| {
            let color = match preferred_slot(name) {
                Slot::Ours => OURS_COLOR,
                Slot::Variant(s) => take(&OURS_VARIANT_COLORS, &mut variants_taken, s),
                Slot::Peer(s) => take(&PEER_COLORS, &mut peers_taken, s),
            };
            (name.to_string(), color)
        })
        .collect()
}

/// Ours (plain `"ours"` first) before peers, each group in name order.
fn implementation_order(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| (!is_ours(s), !s.eq_ignore_ascii_case("ours"));
    key(a).cmp(&key(b)).then_with(|| a.cmp(b))
}

/// Marker shapes; kernels on the roofline and implementations on the
/// bandwidth chart take them in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Circle,
    Square,
    TriangleUp,
    Diamond,
    TriangleDown,
    Star,
    Cross,
    Plus,
    Hexagon,
}

const SHAPES: [Shape; 9] = [
    Shape::Circle,
    Shape::Square,
    Shape::TriangleUp,
    Shape::Diamond,
    Shape::TriangleDown,
    Shape::Star,
    Shape::Cross,
    Shape::Plus,
    Shape::Hexagon,
];

impl Shape {
    /// Vertices, in pixels around the marker's centre, for a marker of
    /// nominal radius `r`.
    fn outline(self, r: f64) -> Vec<(i32, i32)> {
        let polar = |n: usize, radius: &dyn Fn(usize) -> f64, phase: f64| -> Vec<(f64, f64)> {
            (0..n)
                .map(|i| {
                    let a = phase + std::f64::consts::TAU * i as f64 / n as f64;
                    (radius(i) * a.cos(), radius(i) * a.sin())
                })
                .collect()
        };
        let up = -std::f64::consts::FRAC_PI_2;
        let pts: Vec<(f64, f64)> = match self {
            Shape::Circle => polar(16, &|_| r, 0.0),
            Shape::Square => {
                let s = 0.88 * r;
                vec![(-s, -s), (s, -s), (s, s), (-s, s)]
            }
            Shape::TriangleUp => polar(3, &|_| 1.25 * r, up)
                .into_iter()
                .map(|(x, y)| (x, y + 0.2 * r))
                .collect(),
            Shape::TriangleDown => polar(3, &|_| 1.25 * r, -up)
                .into_iter()
                .map(|(x, y)| (x, y - 0.2 * r))
                .collect(),
            Shape::Diamond => vec![(0.0, -1.3 * r), (r, 0.0), (0.0, 1.3 * r), (-r, 0.0)],
            Shape::Star => polar(10, &|i| if i % 2 == 0 { 1.4 * r } else { 0.62 * r }, up),
            Shape::Hexagon => polar(6, &|_| 1.05 * r, 0.0),
            Shape::Plus | Shape::Cross => {
                let (w, l) = (0.4 * r, 1.2 * r);
                #[rustfmt::skip]
                let plus = vec![
                    (-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w),
                    (w, l), (-w, l), (-w, w), (-l, w), (-l, -w), (-w, -w),
                ];
                if self == Shape::Plus {
                    plus
                } else {
                    let c = std::f64::consts::FRAC_1_SQRT_2;
                    plus.into_iter()
                        .map(|(x, y)| (c * (x - y), c * (x + y)))
                        .collect()
                }
            }
        };
        pts.into_iter()
            .map(|(x, y)| (x.round() as i32, y.round() as i32))
            .collect()
    }
}

/// Draws markers at data coordinates `pts` of `chart`, onto `root`.
fn draw_markers<DB: DrawingBackend, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &ChartContext<'_, DB, Cartesian2d<X, Y>>,
    root: &DrawingArea<DB, Shift>,
    pts: &[(f64, f64)],
    shape: Shape,
    r: f64,
    color: RGBColor,
) -> Result<()> {
    for p in pts {
        draw_marker_px(root, chart.backend_coord(p), shape, r, color)?;
    }
    Ok(())
}

/// Draws a marker centred on pixel `at` of `area`: a translucent fill under
/// a solid outline. Circles use plotters' circle, which is anti-aliased on
/// the PNG; other shapes are polygons.
fn draw_marker_px<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    shape: Shape,
    r: f64,
    color: RGBColor,
) -> Result<()> {
    let fill = color.mix(0.78).filled();
    if shape == Shape::Circle {
        let r = r.round() as i32;
        return area
            .draw(
                &(EmptyElement::at(at)
                    + Circle::new((0, 0), r, fill)
                    + Circle::new((0, 0), r, color.stroke_width(1))),
            )
            .or_plot_err();
    }
    let outline = shape.outline(r);
    let mut closed = outline.clone();
    closed.push(outline[0]);
    area.draw(
        &(EmptyElement::at(at)
            + Polygon::new(outline, fill)
            + PathElement::new(closed, color.stroke_width(1))),
    )
    .or_plot_err()
}

// ---------------------------------------------------------------------------
// Fonts and text

/// Reads the few tables of a TrueType font needed to place glyphs the way
/// the `ab_glyph` rasteriser inside plotters scales them.
struct FontMetrics {
    data: &'static [u8],
    /// Offset of the format 4 (BMP) `cmap` subtable.
    cmap4: usize,
    hmtx: usize,
    n_hmetrics: u16,
    n_glyphs: u16,
    loca: usize,
    long_loca: bool,
    glyf: usize,
    /// Offset of the first pair of a format 0 horizontal `kern` subtable, and the pair count.
    kern: Option<(usize, usize)>,
    /// hhea ascender - descender: `ab_glyph` scales a font of size `s` px by `s / height`.
    height: f32,
}

fn be_u16(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(d.get(at..at + 2)?.try_into().ok()?))
}

fn be_i16(d: &[u8], at: usize) -> Option<i16> {
    be_u16(d, at).map(|v| v as i16)
}

fn be_u32(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

impl FontMetrics {
    fn parse(data: &'static [u8]) -> Option<Self> {
        let n_tables = be_u16(data, 4)? as usize;
        let table = |tag: &[u8; 4]| -> Option<usize> {
            (0..n_tables)
                .map(|i| 12 + 16 * i)
                .find(|&rec| data.get(rec..rec + 4) == Some(&tag[..]))
                .and_then(|rec| be_u32(data, rec + 8))
                .map(|off| off as usize)
        };
        let head = table(b"head")?;
        let hhea = table(b"hhea")?;
        let maxp = table(b"maxp")?;
        let cmap = table(b"cmap")?;
        let ascender = f32::from(be_i16(data, hhea + 4)?);
        let descender = f32::from(be_i16(data, hhea + 6)?);
        let cmap4 = (0..be_u16(data, cmap + 2)? as usize)
            .map(|i| cmap + 4 + 8 * i)
            .filter_map(|rec| {
                let (platform, encoding) = (be_u16(data, rec)?, be_u16(data, rec + 2)?);
                let sub = cmap + be_u32(data, rec + 4)? as usize;
                let unicode = platform == 0 || (platform == 3 && encoding == 1);
                (unicode && be_u16(data, sub)? == 4).then_some(sub)
            })
            .next()?;
        let kern = table(b"kern").and_then(|kern| {
            // Version 0 table; its first subtable, if format 0 and horizontal.
            let sub = kern + 4;
            let coverage = be_u16(data, kern + 4 + 4)?;
            let ok = be_u16(data, kern)? == 0
                && be_u16(data, kern + 2)? >= 1
                && coverage & 0xff00 == 0
                && coverage & 0x1 != 0
                && coverage & 0x4 == 0;
            ok.then_some((sub + 14, be_u16(data, sub + 6)? as usize))
        });
        Some(Self {
            data,
            cmap4,
            hmtx: table(b"hmtx")?,
            n_hmetrics: be_u16(data, hhea + 34)?,
            n_glyphs: be_u16(data, maxp + 4)?,
            loca: table(b"loca")?,
            long_loca: be_i16(data, head + 50)? != 0,
            glyf: table(b"glyf")?,
            kern,
            height: ascender - descender,
        })
        .filter(|m| m.height > 0.0 && m.n_hmetrics > 0)
    }

    /// Glyph id of `c` (0, the missing glyph, when unmapped).
    fn glyph(&self, c: char) -> u16 {
        self.glyph_opt(c).unwrap_or(0)
    }

    fn glyph_opt(&self, c: char) -> Option<u16> {
        let c = u16::try_from(u32::from(c)).ok()?;
        let (d, t) = (self.data, self.cmap4);
        let seg_x2 = be_u16(d, t + 6)? as usize;
        let ends = t + 14;
        let starts = ends + seg_x2 + 2;
        let deltas = starts + seg_x2;
        let range_offsets = deltas + seg_x2;
        for i in (0..seg_x2).step_by(2) {
            if c > be_u16(d, ends + i)? {
                continue;
            }
            let start = be_u16(d, starts + i)?;
            if c < start {
                return None;
            }
            let delta = be_u16(d, deltas + i)?;
            let ro = be_u16(d, range_offsets + i)? as usize;
            if ro == 0 {
                return Some(c.wrapping_add(delta));
            }
            let g = be_u16(d, range_offsets + i + ro + 2 * usize::from(c - start))?;
            return (g != 0).then(|| g.wrapping_add(delta));
        }
        None
    }

    /// Advance width, font units.
    fn advance(&self, g: u16) -> f32 {
        let i = usize::from(g.min(self.n_hmetrics - 1));
        f32::from(be_u16(self.data, self.hmtx + 4 * i).unwrap_or(0))
    }

    /// Horizontal kerning between two glyphs, font units.
    fn kern(&self, left: u16, right: u16) -> f32 {
        let Some((pairs, n)) = self.kern else {
            return 0.0;
        };
        let key = (u32::from(left) << 16) | u32::from(right);
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let at = pairs + 6 * mid;
            let Some(k) = be_u32(self.data, at) else {
                return 0.0;
            };
            match k.cmp(&key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    return f32::from(be_i16(self.data, at + 4).unwrap_or(0));
                }
            }
        }
        0.0
    }

    /// The glyph's bounding box (x_min, y_max) in font units; `None` for
    /// glyphs without an outline (spaces).
    fn bbox_min_x_max_y(&self, g: u16) -> Option<(f32, f32)> {
        if g >= self.n_glyphs {
            return None;
        }
        let g = usize::from(g);
        let (start, end) = if self.long_loca {
            (
                be_u32(self.data, self.loca + 4 * g)? as usize,
                be_u32(self.data, self.loca + 4 * g + 4)? as usize,
            )
        } else {
            (
                2 * be_u16(self.data, self.loca + 2 * g)? as usize,
                2 * be_u16(self.data, self.loca + 2 * g + 2)? as usize,
            )
        };
        if end <= start {
            return None;
        }
        let at = self.glyf + start;
        Some((
            f32::from(be_i16(self.data, at + 2)?),
            f32::from(be_i16(self.data, at + 8)?),
        ))
    }

    /// Width in pixels of `text` at `size`, as the rasteriser lays it out
    /// (advances plus kerning).
    fn width(&self, text: &str, size: f64) -> f64 {
        let s = size as f32 / self.height;
        let mut prev = None;
        let mut w = 0.0_f32;
        for c in text.chars() {
            let g = self.glyph(c);
            if let Some(p) = prev {
                w += self.kern(p, g) * s;
            }
            w += self.advance(g) * s;
            prev = Some(g);
        }
        f64::from(w)
    }
}

/// The embedded font's metrics, parsed once.
fn metrics() -> Result<&'static FontMetrics> {
    static METRICS: OnceLock<Option<FontMetrics>> = OnceLock::new();
    METRICS
        .get_or_init(|| FontMetrics::parse(FONT_BYTES))
        .as_ref()
        .ok_or_else(|| anyhow!("the embedded font (DejaVuSans.ttf) could not be parsed"))
}

/// Registers the embedded font with plotters, once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    ensure!(
        ok,
        "the embedded font (DejaVuSans.ttf) could not be registered"
    );
    metrics().map(|_| ())
}

/// How strings reach the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextMode {
    /// One text element per string (SVG).
    Whole,
    /// One glyph at a time at positions from [`FontMetrics`] (PNG), working
    /// around plotters dropping each glyph's side bearing.
    PerGlyph,
}

/// How a piece of text is drawn.
#[derive(Clone, Copy)]
struct TextSpec {
    size: f64,
    color: RGBColor,
    h: HPos,
    v: VPos,
    /// Rotated a quarter turn anticlockwise (reads bottom to top).
    up: bool,
}

impl TextSpec {
    fn new(size: f64) -> Self {
        Self {
            size,
            color: INK,
            h: HPos::Left,
            v: VPos::Top,
            up: false,
        }
    }
    fn color(self, color: RGBColor) -> Self {
        Self { color, ..self }
    }
    fn at(self, h: HPos, v: VPos) -> Self {
        Self { h, v, ..self }
    }
    fn up(self) -> Self {
        Self { up: true, ..self }
    }
    fn style(&self, h: HPos, v: VPos) -> TextStyle<'static> {
        let style = (FAMILY, self.size)
            .into_font()
            .color(&self.color)
            .pos(Pos::new(h, v));
        if self.up {
            style.transform(FontTransform::Rotate270)
        } else {
            style
        }
    }
}

/// Draws text in either [`TextMode`], and measures it.
#[derive(Clone, Copy)]
struct Pen {
    mode: TextMode,
    metrics: &'static FontMetrics,
}

impl Pen {
    fn new(mode: TextMode) -> Result<Self> {
        Ok(Self {
            mode,
            metrics: metrics()?,
        })
    }

    /// Width of `text` in pixels.
    fn width(&self, text: &str, size: f64) -> f64 {
        self.metrics.width(text, size)
    }

    /// `text` shortened with an ellipsis until it is at most `max_w` px wide.
    fn fit(&self, text: &str, size: f64, max_w: f64) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        let mut out = text.to_string();
        while self.width(&out, size) > max_w && chars.len() > 1 {
            chars.pop();
            out = chars.iter().collect::<String>() + "…";
        }
        out
    }

    /// Draws `text` on `area` at pixel `pos` (relative to `area`), anchored as `spec` says.
    fn text<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        text: &str,
        pos: (i32, i32),
        spec: TextSpec,
    ) -> Result<()> {
        if self.mode == TextMode::Whole {
            return area
                .draw(&Text::new(
                    text.to_string(),
                    pos,
                    spec.style(spec.h, spec.v),
                ))
                .or_plot_err();
        }
        // Lay out as plotters would (same width, same box height, same
        // anchoring), then place each glyph's bounding box where its ink
        // belongs: pen + left bearing across, one baseline for all glyphs.
        let m = self.metrics;
        let size = spec.size as f32;
        let s = size / m.height;
        let width = m.width(text, spec.size);
        let height = (spec.size / 1.24) as i32;
        let dx = match spec.h {
            HPos::Left => 0,
            HPos::Center => -(width / 2.0).round() as i32,
            HPos::Right => -width.round() as i32,
        };
        let dy = match spec.v {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let style = spec.style(HPos::Left, VPos::Top);
        let mut pen = 0.0_f32;
        let mut prev = None;
        let mut buf = [0u8; 4];
        for c in text.chars() {
            let g = m.glyph(c);
            if let Some(p) = prev {
                pen += m.kern(p, g) * s;
            }
            if let Some((x_min, y_max)) = m.bbox_min_x_max_y(g) {
                // plotters puts the box's left edge at the pen and its top at
                // trunc(size / 2 + top), where top = floor(-y_max * s); the
                // baseline we want is ceil(size / 2) for every glyph.
                let top = (-y_max * s).floor();
                let v = size / 2.0 + top;
                let ox = dx + pen.round() as i32 + (x_min * s).floor() as i32;
                let oy = dy + (v.ceil() as i32 - v as i32);
                let (tx, ty) = if spec.up { (oy, -ox) } else { (ox, oy) };
                area.draw(&Text::new(
                    &*c.encode_utf8(&mut buf),
                    (pos.0 + tx, pos.1 + ty),
                    style.clone(),
                ))
                .or_plot_err()?;
            }
            pen += m.advance(g) * s;
            prev = Some(g);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Shared plumbing

/// Something drawable on any backend; [`write_both`] draws it twice.
trait Render {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, pen: Pen) -> Result<()>;
}

/// Turns a plotters error (generic over the backend) into an anyhow error.
trait OrPlotErr<T> {
    fn or_plot_err(self) -> Result<T>;
}

impl<T, E: Display> OrPlotErr<T> for std::result::Result<T, E> {
    fn or_plot_err(self) -> Result<T> {
        self.map_err(|e| anyhow!("drawing failed: {e}"))
    }
}

fn with_suffix(stem: &Path, ext: &str) -> PathBuf {
    let mut s: OsString = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Renders `chart` to `<stem>.svg` and `<stem>.png`.
fn write_both<R: Render>(chart: &R, stem: &Path) -> Result<()> {
    ensure_font()?;
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
    }
    let svg = with_suffix(stem, "svg");
    {
        let root = SVGBackend::new(&svg, (WIDTH, HEIGHT)).into_drawing_area();
        chart.render(&root, Pen::new(TextMode::Whole)?)?;
        root.present()
            .or_plot_err()
            .with_context(|| format!("writing {}", svg.display()))?;
    }
    let png = with_suffix(stem, "png");
    {
        let root = BitMapBackend::new(&png, (WIDTH, HEIGHT)).into_drawing_area();
        chart.render(&root, Pen::new(TextMode::PerGlyph)?)?;
        root.present()
            .or_plot_err()
            .with_context(|| format!("writing {}", png.display()))?;
    }
    Ok(())
}

fn check_ceilings(c: Ceilings) -> Result<()> {
    ensure!(
        c.gb_per_s.is_finite() && c.gb_per_s > 0.0,
        "bandwidth ceiling must be positive, got {} GB/s",
        c.gb_per_s
    );
    ensure!(
        c.tflop_per_s.is_finite() && c.tflop_per_s > 0.0,
        "compute ceiling must be positive, got {} TFLOP/s",
        c.tflop_per_s
    );
    Ok(())
}

fn check_point(p: &Point) -> Result<()> {
    let ok = p.bytes.is_finite()
        && p.bytes > 0.0
        && p.seconds.is_finite()
        && p.seconds > 0.0
        && p.flops.is_finite()
        && p.flops >= 0.0;
    ensure!(
        ok,
        "point {} / {} / {} cannot be plotted: bytes={}, flops={}, seconds={} \
         (bytes and seconds must be positive, flops non-negative)",
        p.kernel,
        p.implementation,
        p.case,
        p.bytes,
        p.flops,
        p.seconds
    );
    Ok(())
}

/// A tick label for a log axis: plain decimals from 0.001 to 99999,
/// otherwise `1e-5`-style.
fn fmt_log_tick(v: f64) -> String {
    if v <= 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let exp = v.log10().floor() as i32;
    if (-3..5).contains(&exp) {
        let decimals = (1 - exp).max(0) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        let mantissa = v / 10f64.powi(exp);
        if (mantissa - 1.0).abs() < 1e-6 {
            format!("1e{exp}")
        } else {
            format!("{}e{exp}", (mantissa * 10.0).round() / 10.0)
        }
    }
}

/// A value with about three significant digits and no exponent, for labels
/// such as "3350 GB/s" or "67.5 TFLOP/s".
fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Major and minor ticks for a log axis over `lo..hi`: decades (thinned to
/// at most ~10 labels), plus 2 and 5 when fewer than three decades are in
/// range, or every 1..9 multiple when even that gives fewer than three;
/// minor ticks at every 1..9 multiple.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (e_lo, e_hi) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let in_range = |v: &f64| *v >= lo * (1.0 - 1e-9) && *v <= hi * (1.0 + 1e-9);
    let multiples = |ms: &[f64]| -> Vec<f64> {
        (e_lo..=e_hi)
            .flat_map(|e| ms.iter().map(move |m| m * 10f64.powi(e)))
            .filter(in_range)
            .collect()
    };
    let decades = multiples(&[1.0]);
    let mut bold = if decades.len() >= 3 {
        let step = decades.len().div_ceil(10);
        decades.iter().copied().step_by(step).collect()
    } else {
        multiples(&[1.0, 2.0, 5.0])
    };
    let all = multiples(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    if bold.len() < 3 {
        bold = all.clone();
    }
    (bold, all)
}

/// Ticks for a linear axis from 0 to `hi`: a 1-2-2.5-5 step giving about
/// eight labels, and minor ticks at half steps.
fn linear_ticks(hi: f64) -> (Vec<f64>, Vec<f64>) {
    let raw = hi / 8.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let ticks = |step: f64| -> Vec<f64> {
        (0..)
            .map(|i| f64::from(i) * step)
            .take_while(|v| *v <= hi * (1.0 + 1e-9))
            .collect()
    };
    (ticks(step), ticks(step / 2.0))
}

/// Lays out the canvas: title band on top, an optional note band at the
/// bottom, the plot on the left and the legend panel on the right. Draws the
/// title (shrunk to fit) and the note (shortened to fit). Returns (plot,
/// legend).
#[allow(clippy::type_complexity)]
fn layout<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    pen: Pen,
    title: &str,
    note: Option<&str>,
) -> Result<(DrawingArea<DB, Shift>, DrawingArea<DB, Shift>)> {
    root.fill(&WHITE).or_plot_err()?;
    let (header, rest) = root.split_vertically(HEADER_H);
    let max_w = f64::from(WIDTH) - 40.0;
    let mut size = TITLE_SIZE;
    while size > 14.0 && pen.width(title, size) > max_w {
        size -= 1.0;
    }
    let title = pen.fit(title, size, max_w);
    let spec = TextSpec::new(size).at(HPos::Center, VPos::Center);
    pen.text(
        &header,
        &title,
        (WIDTH as i32 / 2, HEADER_H as i32 / 2 + 2),
        spec,
    )?;
    let body_h = HEIGHT - HEADER_H - if note.is_some() { FOOTER_H } else { 0 };
    let (body, footer) = rest.split_vertically(body_h);
    if let Some(note) = note {
        let note = pen.fit(note, NOTE_SIZE, f64::from(WIDTH) - 32.0);
        let spec = TextSpec::new(NOTE_SIZE)
            .color(MUTED)
            .at(HPos::Left, VPos::Center);
        pen.text(&footer, &note, (16, FOOTER_H as i32 / 2 - 2), spec)?;
    }
    Ok(body.split_horizontally(WIDTH - LEGEND_W))
}

/// Draws the grid (light lines at `x_light`/`y_light`, darker ones at the
/// labelled ticks), the two axes with tick marks, the tick labels and the
/// axis descriptions. All text goes through `pen`, so the labels get the same
/// glyph placement as every other string.
#[allow(clippy::too_many_arguments)]
fn draw_axes<DB: DrawingBackend, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &ChartContext<'_, DB, Cartesian2d<X, Y>>,
    root: &DrawingArea<DB, Shift>,
    pen: Pen,
    (x_ticks, x_light): (&[f64], &[f64]),
    (y_ticks, y_light): (&[f64], &[f64]),
    (fmt_x, fmt_y): (&dyn Fn(f64) -> String, &dyn Fn(f64) -> String),
    (x_desc, y_desc): (&str, &str),
) -> Result<()> {
    let (x0, x1) = (chart.x_range().start, chart.x_range().end);
    let (y0, y1) = (chart.y_range().start, chart.y_range().end);
    let (left, bottom) = chart.backend_coord(&(x0, y0));
    let (right, top) = chart.backend_coord(&(x1, y1));
    let line = |a: (i32, i32), b: (i32, i32), color: RGBColor| {
        root.draw(&PathElement::new(vec![a, b], color.stroke_width(1)))
            .or_plot_err()
    };
    for (xs, color) in [(x_light, GRID_LIGHT), (x_ticks, GRID_BOLD)] {
        for &x in xs {
            let px = chart.backend_coord(&(x, y0)).0;
            line((px, top), (px, bottom), color)?;
        }
    }
    for (ys, color) in [(y_light, GRID_LIGHT), (y_ticks, GRID_BOLD)] {
        for &y in ys {
            let py = chart.backend_coord(&(x0, y)).1;
            line((left, py), (right, py), color)?;
        }
    }
    line((left, top), (left, bottom), MUTED)?;
    line((left, bottom), (right, bottom), MUTED)?;

    let tick = TextSpec::new(TICK_SIZE);
    for &x in x_ticks {
        let px = chart.backend_coord(&(x, y0)).0;
        line((px, bottom), (px, bottom + 5), MUTED)?;
        let spec = tick.at(HPos::Center, VPos::Top);
        pen.text(root, &fmt_x(x), (px, bottom + 10), spec)?;
    }
    let mut widest = 0.0_f64;
    for &y in y_ticks {
        let py = chart.backend_coord(&(x0, y)).1;
        line((left - 5, py), (left, py), MUTED)?;
        let label = fmt_y(y);
        widest = widest.max(pen.width(&label, TICK_SIZE));
        let spec = tick.at(HPos::Right, VPos::Center);
        pen.text(root, &label, (left - 9, py + 2), spec)?;
    }
    let desc = TextSpec::new(AXIS_DESC_SIZE);
    let spec = desc.at(HPos::Center, VPos::Top);
    pen.text(root, x_desc, ((left + right) / 2, bottom + 36), spec)?;
    let x = left - 9 - widest.ceil() as i32 - 12;
    let spec = desc.at(HPos::Center, VPos::Bottom).up();
    pen.text(root, y_desc, (x, (top + bottom) / 2), spec)?;
    Ok(())
}

/// One legend row.
enum LegendRow {
    /// A section heading, in grey.
    Heading(String),
    /// A marker (and a line through it, for line series) and its label.
    Entry {
        label: String,
        color: RGBColor,
        shape: Shape,
        line: bool,
        emphasis: bool,
    },
}

/// Draws the legend rows into `panel`, top-down; rows that do not fit are
/// summarised as "… N more".
fn draw_legend<DB: DrawingBackend>(
    panel: &DrawingArea<DB, Shift>,
    pen: Pen,
    rows: &[LegendRow],
) -> Result<()> {
    let (w, h) = panel.dim_in_pixel();
    let max_rows = ((h as i32 - 24) / LEGEND_ROW_H).max(1) as usize;
    let x0 = 14;
    let text_x = x0 + 36;
    let mut y = 24;
    let shown = if rows.len() > max_rows {
        max_rows - 1
    } else {
        rows.len()
    };
    let spec = TextSpec::new(LEGEND_SIZE).at(HPos::Left, VPos::Center);
    for row in &rows[..shown] {
        match row {
            LegendRow::Heading(text) => {
                let text = pen.fit(text, LEGEND_SIZE, f64::from(w) - f64::from(x0) - 8.0);
                pen.text(panel, &text, (x0, y), spec.color(MUTED))?;
            }
            LegendRow::Entry {
                label,
                color,
                shape,
                line,
                emphasis,
            } => {
                if *line {
                    let width = if *emphasis { 3 } else { 2 };
                    panel
                        .draw(&PathElement::new(
                            vec![(x0, y), (x0 + 28, y)],
                            color.stroke_width(width),
                        ))
                        .or_plot_err()?;
                }
                let r = if *emphasis { 5.5 } else { 4.5 };
                draw_marker_px(panel, (x0 + 14, y), *shape, r, *color)?;
                let label = pen.fit(label, LEGEND_SIZE, f64::from(w) - f64::from(text_x) - 6.0);
                pen.text(panel, &label, (text_x, y), spec)?;
            }
        }
        y += LEGEND_ROW_H;
    }
    if shown < rows.len() {
        let more = format!("… {} more", rows.len() - shown);
        pen.text(panel, &more, (x0, y), spec.color(MUTED))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Roofline

/// One (kernel, implementation) series on the roofline.
struct RooflineSeries {
    kernel: String,
    implementation: String,
    color: RGBColor,
    shape: Shape,
    /// (intensity flop/B, TFLOP/s)
    pts: Vec<(f64, f64)>,
}

/// Everything the roofline needs, validated and laid out in data space.
struct Roofline {
    title: String,
    ceilings: Ceilings,
    series: Vec<RooflineSeries>,
    legend: Vec<LegendRow>,
    x: (f64, f64),
    y: (f64, f64),
    note: Option<String>,
}

impl Roofline {
    fn new(points: &[Point], ceilings: Ceilings, title: &str) -> Result<Self> {
        ensure!(!points.is_empty(), "no points to plot");
        check_ceilings(ceilings)?;
        for p in points {
            check_point(p)?;
        }
        let kernels: BTreeSet<&str> = points.iter().map(|p| p.kernel.as_str()).collect();
        let shapes: BTreeMap<&str, Shape> = kernels
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, SHAPES[i % SHAPES.len()]))
            .collect();
        let colors = assign_colors(points.iter().map(|p| p.implementation.as_str()));

        let mut groups: BTreeMap<(&str, &str), Vec<(f64, f64)>> = BTreeMap::new();
        let mut zero_flop_kernels = BTreeSet::new();
        for p in points {
            let (intensity, flops) = if p.flops > 0.0 {
                (p.flops / p.bytes, p.flops)
            } else {
                zero_flop_kernels.insert(p.kernel.as_str());
                (ZERO_FLOP_INTENSITY, ZERO_FLOP_INTENSITY * p.bytes)
            };
            groups
                .entry((p.kernel.as_str(), p.implementation.as_str()))
                .or_default()
                .push((intensity, flops / p.seconds / 1e12));
        }
        let mut series: Vec<RooflineSeries> = groups
            .into_iter()
            .map(|((k, i), pts)| RooflineSeries {
                kernel: k.to_string(),
                implementation: i.to_string(),
                color: colors[i],
                shape: shapes[k],
                pts,
            })
            .collect();
        series.sort_by(|a, b| {
            a.kernel
                .cmp(&b.kernel)
                .then_with(|| implementation_order(&a.implementation, &b.implementation))
        });

        // Ranges: all points, the ridge point with room to its right, the
        // roof's value at the left edge, and space above the flat roof for
        // its label.
        let bw = ceilings.gb_per_s / 1e3; // TFLOP/s per (flop/B)
        let peak = ceilings.tflop_per_s;
        let ridge = peak / bw;
        let all = series.iter().flat_map(|s| s.pts.iter().copied());
        let (i_min, i_max, y_min, y_max) = all.fold(
            (f64::INFINITY, 0.0_f64, f64::INFINITY, 0.0_f64),
            |(a, b, c, d), (i, y)| (a.min(i), b.max(i), c.min(y), d.max(y)),
        );
        let x_lo = i_min.min(ridge / 10.0) / 2.5;
        let x_hi = i_max.max(ridge) * 8.0;
        let y_lo = y_min.min(x_lo * bw) / 2.0;
        let y_hi = y_max.max(peak) * 4.0;

        let mut legend = Vec::new();
        if series.len() <= 22 {
            for s in &series {
                legend.push(LegendRow::Entry {
                    label: format!("{} · {}", s.kernel, s.implementation),
                    color: s.color,
                    shape: s.shape,
                    line: false,
                    emphasis: is_ours(&s.implementation),
                });
            }
        } else {
            // Too many pairs for a row each: one key for colour, one for shape.
            legend.push(LegendRow::Heading("implementation (colour)".into()));
            let mut impls: Vec<&str> = colors.keys().map(String::as_str).collect();
            impls.sort_by(|a, b| implementation_order(a, b));
            for i in impls {
                legend.push(LegendRow::Entry {
                    label: i.to_string(),
                    color: colors[i],
                    shape: Shape::Circle,
                    line: false,
                    emphasis: is_ours(i),
                });
            }
            legend.push(LegendRow::Heading("kernel (shape)".into()));
            for k in &kernels {
                legend.push(LegendRow::Entry {
                    label: k.to_string(),
                    color: MUTED,
                    shape: shapes[k],
                    line: false,
                    emphasis: false,
                });
            }
        }

        let note = (!zero_flop_kernels.is_empty()).then(|| {
            let names: Vec<&str> = zero_flop_kernels.into_iter().collect();
            let floor = fmt_log_tick(ZERO_FLOP_INTENSITY);
            format!(
                "0-flop kernels ({}) are drawn at I = {floor} flop/B with flops taken as \
                 {floor} × bytes, so their height shows attained bandwidth.",
                names.join(", "),
            )
        });

        Ok(Self {
            title: title.to_string(),
            ceilings,
            series,
            legend,
            x: (x_lo, x_hi),
            y: (y_lo, y_hi),
            note,
        })
    }
}

impl Render for Roofline {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, pen: Pen) -> Result<()> {
        let (plot, legend) = layout(root, pen, &self.title, self.note.as_deref())?;
        let (x_lo, x_hi) = self.x;
        let (y_lo, y_hi) = self.y;
        let (xb, xl) = log_ticks(x_lo, x_hi);
        let (yb, yl) = log_ticks(y_lo, y_hi);
        let mut chart = ChartBuilder::on(&plot)
            .margin_top(8)
            .margin_right(16)
            .margin_left(8)
            .margin_bottom(4)
            .x_label_area_size(62)
            .y_label_area_size(80)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
            .or_plot_err()?;
        draw_axes(
            &chart,
            root,
            pen,
            (&xb, &xl),
            (&yb, &yl),
            (&fmt_log_tick, &fmt_log_tick),
            (
                "Arithmetic intensity (flop/byte, log scale)",
                "Attained performance (TFLOP/s, log scale)",
            ),
        )?;

        // Roofs.
        let bw = self.ceilings.gb_per_s / 1e3;
        let peak = self.ceilings.tflop_per_s;
        let ridge = peak / bw;
        chart
            .draw_series(LineSeries::new(
                vec![(x_lo, x_lo * bw), (ridge, peak), (x_hi, peak)],
                ROOF.stroke_width(3),
            ))
            .or_plot_err()?;
        let label = TextSpec::new(LEGEND_SIZE)
            .color(ROOF)
            .at(HPos::Right, VPos::Bottom);
        let (px, py) = chart.backend_coord(&(x_hi, peak));
        let text = format!("compute ceiling {} TFLOP/s", fmt_value(peak));
        pen.text(root, &text, (px - 10, py - 8), label)?;
        // The bandwidth label sits above and left of a point on the slope a
        // little below the ridge, moved right if it would leave the plot.
        let text = format!("memory ceiling {} GB/s", fmt_value(self.ceilings.gb_per_s));
        let text_w = pen.width(&text, LEGEND_SIZE).ceil() as i32;
        let left_px = chart.backend_coord(&(x_lo, y_lo)).0;
        let mut at = (ridge / 30.0).max(x_lo);
        while chart.backend_coord(&(at, at * bw)).0 - text_w - 8 < left_px + 6 && at < ridge {
            at *= 1.25;
        }
        let (px, py) = chart.backend_coord(&(at, at * bw));
        pen.text(root, &text, (px - 8, py - 8), label)?;

        // Points: peers first, ours last so ours stays on top.
        let mut order: Vec<&RooflineSeries> = self.series.iter().collect();
        order.sort_by_key(|s| is_ours(&s.implementation));
        for s in order {
            let r = if is_ours(&s.implementation) { 6.5 } else { 5.5 };
            draw_markers(&chart, root, &s.pts, s.shape, r, s.color)?;
        }
        draw_legend(&legend, pen, &self.legend)
    }
}

// ---------------------------------------------------------------------------
// Bandwidth

/// One implementation's line on the bandwidth chart.
struct BandwidthSeries {
    implementation: String,
    color: RGBColor,
    shape: Shape,
    /// (MB, GB/s), sorted by MB.
    pts: Vec<(f64, f64)>,
}

/// Everything the bandwidth chart needs, validated and laid out in data space.
struct Bandwidth {
    title: String,
    ceilings: Ceilings,
    series: Vec<BandwidthSeries>,
    x: (f64, f64),
    y_hi: f64,
}

impl Bandwidth {
    fn new(kernel: &str, points: &[Point], ceilings: Ceilings, title: &str) -> Result<Self> {
        let mine: Vec<&Point> = points.iter().filter(|p| p.kernel == kernel).collect();
        if mine.is_empty() {
            if points.is_empty() {
                bail!("no points to plot");
            }
            let kernels: BTreeSet<&str> = points.iter().map(|p| p.kernel.as_str()).collect();
            bail!(
                "no points for kernel {kernel:?} (points are for: {})",
                kernels.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        check_ceilings(ceilings)?;
        for p in &mine {
            check_point(p)?;
        }
        let colors = assign_colors(mine.iter().map(|p| p.implementation.as_str()));
        let mut groups: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for p in &mine {
            groups
                .entry(p.implementation.as_str())
                .or_default()
                .push((p.bytes / 1e6, p.bytes / p.seconds / 1e9));
        }
        let mut names: Vec<&str> = groups.keys().copied().collect();
        names.sort_by(|a, b| implementation_order(a, b));
        let series: Vec<BandwidthSeries> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut pts = groups[name].clone();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
                BandwidthSeries {
                    implementation: name.to_string(),
                    color: colors[*name],
                    shape: SHAPES[i % SHAPES.len()],
                    pts,
                }
            })
            .collect();
        let all = series.iter().flat_map(|s| s.pts.iter().copied());
        let (mb_min, mb_max, gbs_max) = all
            .fold((f64::INFINITY, 0.0_f64, 0.0_f64), |(a, b, c), (mb, gbs)| {
                (a.min(mb), b.max(mb), c.max(gbs))
            });
        // At least a factor of 4 across, centred on the data (geometrically).
        let (mut x_lo, mut x_hi) = (mb_min / 1.5, mb_max * 1.5);
        if x_hi / x_lo < 4.0 {
            let centre = (x_lo * x_hi).sqrt();
            (x_lo, x_hi) = (centre / 2.0, centre * 2.0);
        }
        let y_hi = gbs_max.max(ceilings.gb_per_s) * 1.12;
        Ok(Self {
            title: title.to_string(),
            ceilings,
            series,
            x: (x_lo, x_hi),
            y_hi,
        })
    }
}

impl Render for Bandwidth {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, pen: Pen) -> Result<()> {
        let (plot, legend) = layout(root, pen, &self.title, None)?;
        let (x_lo, x_hi) = self.x;
        let (xb, xl) = log_ticks(x_lo, x_hi);
        let (yb, yl) = linear_ticks(self.y_hi);
        let mut chart = ChartBuilder::on(&plot)
            .margin_top(8)
            .margin_right(16)
            .margin_left(8)
            .margin_bottom(8)
            .x_label_area_size(62)
            .y_label_area_size(80)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..self.y_hi)
            .or_plot_err()?;
        draw_axes(
            &chart,
            root,
            pen,
            (&xb, &xl),
            (&yb, &yl),
            (&fmt_log_tick, &|v| format!("{v:.0}")),
            ("Bytes moved (MB, log scale)", "Attained bandwidth (GB/s)"),
        )?;

        let bw = self.ceilings.gb_per_s;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x_lo, bw), (x_hi, bw)],
                10,
                6,
                ROOF.stroke_width(2),
            ))
            .or_plot_err()?;
        let (px, py) = chart.backend_coord(&(x_lo, bw));
        let text = format!("measured ceiling {} GB/s", fmt_value(bw));
        let spec = TextSpec::new(LEGEND_SIZE)
            .color(ROOF)
            .at(HPos::Left, VPos::Bottom);
        pen.text(root, &text, (px + 10, py - 7), spec)?;

        // Peers first, ours last so ours stays on top.
        let mut order: Vec<&BandwidthSeries> = self.series.iter().collect();
        order.sort_by_key(|s| is_ours(&s.implementation));
        for s in order {
            let (width, r) = if is_ours(&s.implementation) {
                (3, 5.5)
            } else {
                (2, 4.5)
            };
            chart
                .draw_series(LineSeries::new(
                    s.pts.iter().copied(),
                    s.color.stroke_width(width),
                ))
                .or_plot_err()?;
            draw_markers(&chart, root, &s.pts, s.shape, r, s.color)?;
        }

        let rows: Vec<LegendRow> = self
            .series
            .iter()
            .map(|s| LegendRow::Entry {
                label: s.implementation.clone(),
                color: s.color,
                shape: s.shape,
                line: true,
                emphasis: is_ours(&s.implementation),
            })
            .collect();
        draw_legend(&legend, pen, &rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir.
    fn temp_dir(name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "workbench_plot_{name}_{}_{nanos}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const H100: Ceilings = Ceilings {
        gb_per_s: 3021.0,
        tflop_per_s: 667.0,
    };

    fn point(
        kernel: &str,
        implementation: &str,
        case: String,
        bytes: f64,
        flops: f64,
        seconds: f64,
    ) -> Point {
        Point {
            kernel: kernel.into(),
            implementation: implementation.into(),
            case,
            bytes,
            flops,
            seconds,
        }
    }

    /// Synthetic measurements shaped like real ones: memory-bound kernels
    /// approaching the bandwidth roof as they grow, a 0-flop copy, and a
    /// compute-bound GEMM; several rmsnorm cases share a byte count.
    fn synthetic() -> Vec<Point> {
        let peers = [
            ("ours", 0.92, 2.5e-6),
            ("ours v2", 0.95, 2.2e-6),
            ("flashinfer", 0.85, 4e-6),
            ("torch_eager", 0.45, 9e-6),
        ];
        let mut pts = Vec::new();
        for (imp, eff, launch) in peers {
            for tokens in [1.0, 16.0, 128.0, 1024.0, 4096.0, 16384.0] {
                for hidden in [896.0, 4096.0, 7168.0] {
                    let elems: f64 = tokens * hidden;
                    let bytes = elems * 2.0 * 3.0;
                    let secs = launch + bytes / (eff * H100.gb_per_s * 1e9);
                    let case = format!("tokens={tokens},hidden={hidden},residual=1");
                    pts.push(point("rmsnorm", imp, case, bytes, 4.0 * elems, secs));
                }
                // Same bytes as tokens x 4096, transposed shape.
                let bytes = tokens * 4096.0 * 6.0;
                let secs = launch + bytes / (0.97 * eff * H100.gb_per_s * 1e9);
                let case = format!("tokens={},hidden={tokens},residual=1", 4096.0);
                pts.push(point(
                    "rmsnorm",
                    imp,
                    case,
                    bytes,
                    4.0 * tokens * 4096.0,
                    secs,
                ));
            }
            if imp == "ours v2" {
                continue;
            }
            if imp != "flashinfer" {
                for tokens in [16.0, 512.0, 4096.0, 16384.0] {
                    let elems: f64 = tokens * 14336.0;
                    let bytes = elems * 2.0 * 3.0;
                    let secs = launch + bytes / (eff * 0.95 * H100.gb_per_s * 1e9);
                    let case = format!("tokens={tokens},inter=14336");
                    pts.push(point("silu_mul", imp, case, bytes, 4.0 * elems, secs));
                }
            }
            for mb in [1.0, 16.0, 256.0] {
                let bytes = mb * 1e6;
                let secs = launch + bytes / (eff * H100.gb_per_s * 1e9);
                pts.push(point("copy", imp, format!("mb={mb}"), bytes, 0.0, secs));
            }
        }
        for (imp, eff) in [("ours", 0.62), ("cublas", 0.74)] {
            for n in [1024.0, 4096.0, 8192.0] {
                let n: f64 = n;
                let flops = 2.0 * n * n * n;
                let bytes = 3.0 * n * n * 2.0;
                let secs = 5e-6 + flops / (eff * H100.tflop_per_s * 1e12);
                pts.push(point("gemm", imp, format!("m=n=k={n}"), bytes, flops, secs));
            }
        }
        pts
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffff_u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Checks a PNG's structure: signature, IHDR with the chart's size, every
    /// chunk's CRC, at least one IDAT, and IEND last.
    fn assert_valid_png(path: &Path) {
        let data = std::fs::read(path).unwrap();
        assert!(
            data.len() > 20_000,
            "{} is only {} bytes",
            path.display(),
            data.len()
        );
        assert_eq!(&data[..8], b"\x89PNG\r\n\x1a\n", "bad PNG signature");
        let mut at = 8;
        let mut kinds = Vec::new();
        while at + 12 <= data.len() {
            let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            let kind = &data[at + 4..at + 8];
            let body = &data[at + 8..at + 8 + len];
            let crc = u32::from_be_bytes(data[at + 8 + len..at + 12 + len].try_into().unwrap());
            assert_eq!(
                crc,
                crc32(&data[at + 4..at + 8 + len]),
                "bad CRC in {}",
                String::from_utf8_lossy(kind)
            );
            if kind == b"IHDR" {
                let w = u32::from_be_bytes(body[0..4].try_into().unwrap());
                let h = u32::from_be_bytes(body[4..8].try_into().unwrap());
                assert_eq!((w, h), (WIDTH, HEIGHT));
            }
            kinds.push(String::from_utf8_lossy(kind).into_owned());
            at += 12 + len;
        }
        assert_eq!(at, data.len(), "trailing bytes after the last chunk");
        assert_eq!(kinds.first().map(String::as_str), Some("IHDR"));
        assert_eq!(kinds.last().map(String::as_str), Some("IEND"));
        assert!(kinds.iter().any(|k| k == "IDAT"));
    }

    /// Renders `chart` into an in-memory RGB buffer.
    fn raster<R: Render>(chart: &R) -> Vec<u8> {
        ensure_font().unwrap();
        let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
            chart
                .render(&root, Pen::new(TextMode::PerGlyph).unwrap())
                .unwrap();
            root.present().unwrap();
        }
        buf
    }

    /// Whether some SVG text element holds exactly `text`.
    fn svg_has_text(svg: &str, text: &str) -> bool {
        svg.lines().any(|line| line.trim() == text)
    }

    #[test]
    fn roofline_writes_svg_and_png() {
        let dir = temp_dir("roofline");
        let stem = dir.join("nested").join("roofline");
        let title = "Roofline — H100 SXM, 2025-01-01";
        roofline_chart(&synthetic(), H100, title, &stem).unwrap();
        assert_valid_png(&with_suffix(&stem, "png"));
        let svg = std::fs::read_to_string(with_suffix(&stem, "svg")).unwrap();
        assert!(svg_has_text(&svg, title), "title missing from SVG");
        assert!(svg_has_text(&svg, "rmsnorm · ours"), "legend label missing");
        assert!(svg_has_text(&svg, "rmsnorm · ours v2"));
        assert!(svg_has_text(&svg, "gemm · cublas"));
        assert!(svg.contains("memory ceiling 3021 GB/s"));
        assert!(svg.contains("compute ceiling 667 TFLOP/s"));
        assert!(
            svg.contains("0-flop kernels (copy)"),
            "zero-flop note missing"
        );
        assert!(svg.contains("font-family=\"sans-serif\""));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn bandwidth_writes_svg_and_png() {
        let dir = temp_dir("bandwidth");
        let stem = dir.join("bandwidth_rmsnorm");
        let title = "rmsnorm bandwidth — H100 SXM, 2025-01-01";
        bandwidth_chart("rmsnorm", &synthetic(), H100, title, &stem).unwrap();
        assert_valid_png(&with_suffix(&stem, "png"));
        let svg = std::fs::read_to_string(with_suffix(&stem, "svg")).unwrap();
        assert!(svg_has_text(&svg, title), "title missing from SVG");
        assert!(svg_has_text(&svg, "flashinfer"), "legend label missing");
        assert!(svg_has_text(&svg, "ours"));
        assert!(svg_has_text(&svg, "ours v2"));
        assert!(svg.contains("measured ceiling 3021 GB/s"));
        assert!(!svg.contains("silu_mul"));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn bandwidth_series_are_sorted_by_bytes() {
        let chart = Bandwidth::new("rmsnorm", &synthetic(), H100, "t").unwrap();
        assert_eq!(chart.series[0].implementation, "ours");
        for s in &chart.series {
            assert!(s.pts.windows(2).all(|w| w[0].0 <= w[1].0));
            assert_eq!(s.pts.len(), 24);
        }
    }

    #[test]
    fn text_is_rasterised_with_the_embedded_font() {
        let pts = synthetic();
        let chart = Roofline::new(&pts, H100, "Roofline title").unwrap();
        let buf = raster(&chart);
        // The title band holds nothing but the title: it must have dark pixels.
        let dark = buf[..(WIDTH * HEADER_H * 3) as usize]
            .chunks(3)
            .filter(|px| px.iter().all(|&c| c < 128))
            .count();
        assert!(dark > 100, "title band has only {dark} dark pixels");
    }

    #[test]
    fn empty_points_are_an_error() {
        let dir = temp_dir("empty");
        let err = roofline_chart(&[], H100, "t", &dir.join("r")).unwrap_err();
        assert!(format!("{err:#}").contains("no points"), "{err:#}");
        let err = bandwidth_chart("rmsnorm", &[], H100, "t", &dir.join("b")).unwrap_err();
        assert!(format!("{err:#}").contains("no points"), "{err:#}");
        let err = bandwidth_chart("softmax", &synthetic(), H100, "t", &dir.join("b")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("\"softmax\"") && msg.contains("rmsnorm"),
            "{msg}"
        );
        assert!(!with_suffix(&dir.join("r"), "png").exists());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn bad_points_and_ceilings_are_errors() {
        let dir = temp_dir("bad");
        let mut pts = synthetic();
        pts[3].seconds = 0.0;
        let err = roofline_chart(&pts, H100, "t", &dir.join("r")).unwrap_err();
        assert!(format!("{err:#}").contains("seconds=0"), "{err:#}");
        let bad = Ceilings {
            gb_per_s: 0.0,
            tflop_per_s: 1.0,
        };
        assert!(roofline_chart(&synthetic(), bad, "t", &dir.join("r")).is_err());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn colours_are_fixed_per_implementation() {
        let a = assign_colors(["ours", "flashinfer", "torch_eager"]);
        let b = assign_colors(["torch_eager", "ours"]);
        assert_eq!(a["ours"], OURS_COLOR);
        assert_eq!(b["ours"], OURS_COLOR);
        assert_eq!(a["torch_eager"], b["torch_eager"]);
        let many = assign_colors(["ours", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]);
        let distinct: BTreeSet<(u8, u8, u8)> = many.values().map(|c| (c.0, c.1, c.2)).collect();
        assert_eq!(distinct.len(), many.len());
        // Variants of ours are ours (highlighted), in reds of their own.
        assert!(is_ours("ours") && is_ours("OURS v2") && is_ours("ours_fused"));
        assert!(!is_ours("oursin") && !is_ours("flashinfer"));
        let v = assign_colors(["ours", "ours v2", "ours v3", "torch_eager"]);
        assert_eq!(v["ours"], OURS_COLOR);
        assert_ne!(v["ours v2"], v["ours v3"]);
        assert!(OURS_VARIANT_COLORS.contains(&v["ours v2"]));
        let order = |mut names: Vec<&'static str>| {
            names.sort_by(|a, b| implementation_order(a, b));
            names
        };
        assert_eq!(
            order(vec!["cublas", "ours v2", "ours", "aaa"]),
            ["ours", "ours v2", "aaa", "cublas"]
        );
    }

    /// Our layout of a string must match the width plotters' own rasteriser
    /// gives it (which truncates to whole pixels), so that glyph-by-glyph
    /// text lands where plotters would put it, only better spaced.
    #[test]
    fn font_metrics_match_the_rasteriser() {
        ensure_font().unwrap();
        let m = metrics().unwrap();
        assert_eq!(m.glyph('A'), 36);
        for size in [14.0, 15.0, 18.0, 24.0] {
            for text in [
                "AVATAR Tj",
                "memory ceiling 3021 GB/s",
                "rmsnorm · flashinfer",
                "0.001 × bytes",
            ] {
                let style = (FAMILY, size).into_font();
                let (w, _) = style.box_size(text).unwrap();
                let ours = m.width(text, size);
                assert!(
                    (ours.floor() - f64::from(w)).abs() <= 1.0,
                    "{text:?} at {size}: {ours} vs {w}"
                );
            }
        }
    }

    #[test]
    fn log_tick_labels() {
        assert_eq!(fmt_log_tick(0.001), "0.001");
        assert_eq!(fmt_log_tick(1.0), "1");
        assert_eq!(fmt_log_tick(2000.0), "2000");
        assert_eq!(fmt_log_tick(0.05), "0.05");
        assert_eq!(fmt_log_tick(1e-4), "1e-4");
        assert_eq!(fmt_log_tick(1e6), "1e6");
    }

    /// Renders preview charts for eyeballing:
    /// `cargo test -p workbench --lib plot::tests::preview -- --ignored`
    /// writes /tmp/plot_preview_roofline.{svg,png} and
    /// /tmp/plot_preview_bw.{svg,png} (or under $PLOT_PREVIEW_DIR).
    #[test]
    #[ignore]
    fn preview() {
        let dir = std::env::var_os("PLOT_PREVIEW_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let pts = synthetic();
        let title = "Roofline — NVIDIA H100 80GB HBM3, 2025-01-01";
        roofline_chart(&pts, H100, title, &dir.join("plot_preview_roofline")).unwrap();
        let title = "rmsnorm: attained bandwidth — NVIDIA H100 80GB HBM3, 2025-01-01";
        bandwidth_chart("rmsnorm", &pts, H100, title, &dir.join("plot_preview_bw")).unwrap();
    }
}
