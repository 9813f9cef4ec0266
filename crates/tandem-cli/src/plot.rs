//! Small PNG charts: bus bandwidth against message size (`tandem bench --plot`) and scatter charts
//! (`tandem tune`'s objective per trial and parameters against the objective).
//!
//! Drawn by hand on an RGB canvas with the 8×8 bitmap font of the `font8x8` crate (capitals,
//! small letters and punctuation as written, drawn at twice their size) and encoded with the
//! `png` crate, so the command needs no font files or plotting stack.
//!
//! Colours: blue points for trials that finished, orange for those stopped early, red crosses
//! for failed ones, a green line for the best so far; the bandwidth chart draws one line of busbw
//! against size on a logarithmic x axis.

use std::io::BufWriter;

use tandem::{Error, Result};

/// Width of a chart in pixels.
const W: usize = 1000;
/// Height of a chart in pixels.
const H: usize = 600;
/// Margin left of the plot, for the y axis's labels.
const LEFT: usize = 110;
/// Margin right of the plot.
const RIGHT: usize = 24;
/// Margin above the plot, for the title and the legend.
const TOP: usize = 100;
/// Margin below the plot, for the x axis's labels.
const BOTTOM: usize = 64;
/// Pixels per character at the scale text is drawn (8×8 glyphs, twice their size).
const CHAR: i64 = 16;

/// An RGB image drawn pixel by pixel (charts need lines, squares and text only: no drawing
/// crate).
struct Canvas {
    /// Pixels, RGB, row after row.
    px: Vec<u8>,
}

impl Canvas {
    /// A white canvas of [`W`] x [`H`].
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    /// Colours one pixel; outside the canvas, nothing.
    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&rgb);
        }
    }

    /// A line `thick` pixels wide (Bresenham's, each point a square).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), rgb: [u8; 3], thick: i64) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=steps {
            let x = x0 + (x1 - x0) * i / steps;
            let y = y0 + (y1 - y0) * i / steps;
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x + dx, y + dy, rgb);
                }
            }
        }
    }

    /// Draws text with its top-left corner at (x, y), each 8×8 glyph at twice its size.
    fn text(&mut self, x: i64, y: i64, s: &str) {
        self.text_in(x, y, s, [0, 0, 0]);
    }

    /// Like [`Canvas::text`], in `rgb`.
    fn text_in(&mut self, x: i64, y: i64, s: &str, rgb: [u8; 3]) {
        use font8x8::UnicodeFonts;
        for (i, c) in s.chars().enumerate() {
            let Some(rows) = font8x8::BASIC_FONTS.get(c) else {
                continue;
            };
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        for d in 0..4 {
                            self.set(
                                x + i as i64 * CHAR + col * 2 + d % 2,
                                y + row as i64 * 2 + d / 2,
                                rgb,
                            );
                        }
                    }
                }
            }
        }
    }

    /// Width of `s` in pixels.
    fn width(s: &str) -> i64 {
        s.chars().count() as i64 * CHAR
    }
}

/// A byte count as the size axis labels it (`4K`, `64M`, `1G`).
fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{}G", b >> 30),
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// Writes the canvas as an 8-bit RGB PNG.
fn save(c: &Canvas, path: &str) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(format!("creating {path}"), e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc
        .write_header()
        .map_err(|e| Error::transport(format!("writing {path}"), e.to_string()))?;
    writer
        .write_image_data(&c.px)
        .map_err(|e| Error::transport(format!("writing {path}"), e.to_string()))
}

/// A value as an axis tick labels it: plain, or in scientific notation when very small or large.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(0.01..10_000.0).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// A scatter chart: x may be on a log scale; `colours` gives each point's colour (default blue);
/// `line` is drawn through its points in order (e.g. the best so far).
pub struct Scatter<'a> {
    /// Title at the top.
    pub title: &'a str,
    /// Label of the x axis.
    pub x_label: &'a str,
    /// Label of the y axis.
    pub y_label: &'a str,
    /// The points.
    pub points: &'a [(f64, f64)],
    /// One colour per point (or empty).
    pub colours: &'a [[u8; 3]],
    /// A line to draw.
    pub line: &'a [(f64, f64)],
    /// Put x on a log scale (all x must be positive).
    pub log_x: bool,
    /// Names for integer x positions (categorical axes).
    pub x_names: &'a [String],
    /// x is a count (trial numbers): ticks at whole numbers only.
    pub integer_x: bool,
    /// x positions of things without a y (failed trials), marked with a red cross under the data.
    pub failed_x: &'a [f64],
    /// What the colours mean, drawn under the title.
    pub legend: &'a [(&'a str, [u8; 3])],
}

/// Whole-number ticks covering `[lo, hi]`, at most about 12 of them, a step of 1, 2 or 5 times a
/// power of ten apart.
fn integer_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (first, last) = (lo.ceil() + 0.0, hi.floor() + 0.0);
    if last < first {
        return vec![first];
    }
    let raw = ((last - first) / 12.0).max(1.0);
    let mut step = 1.0;
    'find: for exp in 0..16 {
        for m in [1.0, 2.0, 5.0] {
            step = m * 10f64.powi(exp);
            if step >= raw {
                break 'find;
            }
        }
    }
    let first = (first / step).ceil() * step + 0.0;
    let mut out = Vec::new();
    let mut t = first;
    while t <= last && out.len() < 64 {
        out.push(t);
        t += step;
    }
    out
}

/// Where a chart's values land on the canvas.
struct Frame {
    /// The plot's columns, left to right.
    x: (i64, i64),
    /// Its rows, bottom to top.
    y: (i64, i64),
    /// The x range shown (log10 when logarithmic).
    min_x: f64,
    /// See `min_x`.
    max_x: f64,
    /// The y range shown.
    min_y: f64,
    /// See `min_y`.
    max_y: f64,
    /// Whether x is logarithmic.
    log_x: bool,
}

impl Frame {
    /// The padded ranges of `chart`'s finite points (failed trials widen the x range).
    fn of(path: &str, chart: &Scatter<'_>) -> Result<Frame> {
        let mut finite: Vec<(f64, f64)> = chart
            .points
            .iter()
            .chain(chart.line)
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!chart.log_x || *x > 0.0))
            .collect();
        if finite.is_empty() {
            return Err(Error::invalid(path, "no points to plot"));
        }
        // Failed trials are marked at the lowest point's y.
        let low = finite.iter().map(|p| p.1).fold(f64::MAX, f64::min);
        finite.extend(
            chart
                .failed_x
                .iter()
                .filter(|x| x.is_finite())
                .map(|x| (*x, low)),
        );
        let fx = |x: f64| if chart.log_x { x.log10() } else { x };
        let (min_x, max_x) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
            (a.min(fx(p.0)), b.max(fx(p.0)))
        });
        let (min_y, max_y) = finite
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let widen = |lo: f64, hi: f64, pad: f64| {
            let (lo, hi) = if hi - lo < 1e-12 {
                (lo - 0.5, hi + 0.5)
            } else {
                (lo, hi)
            };
            let p = (hi - lo) * pad;
            (lo - p, hi + p)
        };
        let (min_x, max_x) = widen(min_x, max_x, 0.05);
        let (min_y, max_y) = widen(min_y, max_y, 0.08);
        Ok(Frame {
            x: ((LEFT + 30) as i64, (W - RIGHT) as i64),
            y: ((H - BOTTOM) as i64, TOP as i64),
            min_x,
            max_x,
            min_y,
            max_y,
            log_x: chart.log_x,
        })
    }

    /// The canvas column of value `x`.
    fn px(&self, x: f64) -> i64 {
        let x = if self.log_x { x.log10() } else { x };
        self.x.0
            + ((x - self.min_x) / (self.max_x - self.min_x) * (self.x.1 - self.x.0) as f64) as i64
    }

    /// The canvas row of value `y`.
    fn py(&self, y: f64) -> i64 {
        self.y.0
            - ((y - self.min_y) / (self.max_y - self.min_y) * (self.y.0 - self.y.1) as f64) as i64
    }

    /// Whether `x` can be placed (finite, and positive on a log axis).
    fn places(&self, x: f64) -> bool {
        x.is_finite() && (!self.log_x || x > 0.0)
    }
}

/// Grid lines and labels of both axes.
fn grid(c: &mut Canvas, chart: &Scatter<'_>, f: &Frame) {
    let ((x0, x1), (y0, y1)) = (f.x, f.y);
    for i in 0..=5 {
        let v = f.min_y + (f.max_y - f.min_y) * i as f64 / 5.0;
        let y = f.py(v);
        c.line((x0, y), (x1, y), [225, 225, 225], 1);
        c.text(4, y - 8, &tick(v));
    }
    let ticks: Vec<(f64, String)> = if !chart.x_names.is_empty() {
        chart
            .x_names
            .iter()
            .enumerate()
            .map(|(i, n)| (i as f64, n.to_string()))
            .collect()
    } else if chart.integer_x {
        integer_ticks(f.min_x, f.max_x)
            .into_iter()
            .map(|t| (t, format!("{t:.0}")))
            .collect()
    } else {
        (0..=4)
            .map(|i| {
                let t = f.min_x + (f.max_x - f.min_x) * i as f64 / 4.0;
                let v = if chart.log_x { 10f64.powf(t) } else { t };
                (v, tick(v))
            })
            .collect()
    };
    for (v, label) in ticks {
        let x = f.px(v);
        c.line((x, y0), (x, y1), [225, 225, 225], 1);
        let at = (x - Canvas::width(&label) / 2).clamp(0, W as i64 - Canvas::width(&label));
        c.text(at, y0 + 10, &label);
    }
    c.line((x0, y0), (x1, y0), [0, 0, 0], 2);
    c.line((x0, y0), (x0, y1), [0, 0, 0], 2);
}

/// Writes a [`Scatter`] chart as a PNG.
pub fn scatter_png(path: &str, chart: &Scatter<'_>) -> Result<()> {
    let f = Frame::of(path, chart)?;
    let mut c = Canvas::new();
    grid(&mut c, chart, &f);
    let ((x0, x1), (y0, _)) = (f.x, f.y);
    c.text(x0, 8, chart.title);
    let mut at = x0;
    for (label, rgb) in chart.legend {
        c.line((at, 38), (at + 4, 38), *rgb, 9);
        c.text_in(at + 20, 34, label, *rgb);
        at += 20 + Canvas::width(label) + 28;
    }
    c.text(x1 - Canvas::width(chart.x_label), y0 + 36, chart.x_label);
    c.text(4, TOP as i64 - 36, chart.y_label);
    // Failed trials: a red cross at the bottom of the plot.
    for &x in chart.failed_x.iter().filter(|x| f.places(**x)) {
        let (x, y) = (f.px(x), y0 - 8);
        c.line((x - 6, y - 6), (x + 6, y + 6), [200, 40, 40], 3);
        c.line((x - 6, y + 6), (x + 6, y - 6), [200, 40, 40], 3);
    }
    for w in chart.line.windows(2) {
        let (a, b) = ((f.px(w[0].0), f.py(w[0].1)), (f.px(w[1].0), f.py(w[1].1)));
        c.line(a, b, [40, 160, 60], 2);
    }
    for (i, &(x, y)) in chart.points.iter().enumerate() {
        if !(f.places(x) && y.is_finite()) {
            continue;
        }
        let rgb = chart.colours.get(i).copied().unwrap_or([30, 90, 200]);
        let (x, y) = (f.px(x), f.py(y));
        c.line((x - 4, y - 4), (x + 4, y - 4), rgb, 9);
    }
    save(&c, path)
}

/// Writes a PNG of busbw (GB/s) against size (bytes, log scale) to `path`.
pub fn busbw_png(path: &str, title: &str, points: &[(usize, f64)]) -> Result<()> {
    if points.is_empty() {
        return Err(Error::invalid("--plot", "no measurements to plot"));
    }
    let mut c = Canvas::new();
    let (x0, x1) = (LEFT as i64, (W - RIGHT) as i64);
    let (y0, y1) = ((H - BOTTOM) as i64, TOP as i64);
    let lx = |b: usize| (b.max(1) as f64).log2();
    let (min_x, max_x) = (
        lx(points[0].0),
        lx(points[points.len() - 1].0).max(lx(points[0].0) + 1.0),
    );
    let max_y = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(0.001) * 1.1;
    let px = |b: usize| x0 + ((lx(b) - min_x) / (max_x - min_x) * (x1 - x0) as f64) as i64;
    let py = |v: f64| y0 - (v / max_y * (y0 - y1) as f64) as i64;
    // Grid and y labels.
    for i in 0..=5 {
        let v = max_y * i as f64 / 5.0;
        let y = py(v);
        c.line((x0, y), (x1, y), [225, 225, 225], 1);
        c.text(4, y - 8, &format!("{v:.2}"));
    }
    // x ticks at powers of 4.
    let mut b = 1usize << (min_x.ceil() as u32);
    while lx(b) <= max_x + 1e-9 {
        if b.trailing_zeros().is_multiple_of(2) {
            let x = px(b);
            c.line((x, y0), (x, y1), [225, 225, 225], 1);
            let label = size_label(b);
            let at = (x - Canvas::width(&label) / 2).clamp(0, W as i64 - Canvas::width(&label));
            c.text(at, y0 + 10, &label);
        }
        b = match b.checked_mul(2) {
            Some(n) => n,
            None => break,
        };
    }
    c.line((x0, y0), (x1, y0), [0, 0, 0], 2);
    c.line((x0, y0), (x0, y1), [0, 0, 0], 2);
    c.text(x0, 8, title);
    c.text(
        x1 - Canvas::width("message size (bytes)"),
        y0 + 36,
        "message size (bytes)",
    );
    c.text(4, TOP as i64 - 36, "busbw (GB/s)");
    for w in points.windows(2) {
        c.line(
            (px(w[0].0), py(w[0].1)),
            (px(w[1].0), py(w[1].1)),
            [30, 90, 200],
            3,
        );
    }
    for p in points {
        let (x, y) = (px(p.0), py(p.1));
        c.line((x - 3, y - 3), (x + 3, y - 3), [200, 40, 40], 7);
    }
    save(&c, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_and_refuses_no_data() {
        let dir = std::env::temp_dir().join(format!("tandem-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.png");
        let pts: Vec<(usize, f64)> = (12..=26).map(|k| (1usize << k, k as f64 / 10.0)).collect();
        busbw_png(path.to_str().unwrap(), "allreduce 2 ranks", &pts).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(busbw_png(path.to_str().unwrap(), "x", &[]).is_err());
        let scatter = Scatter {
            title: "demo: Validation-accuracy per trial",
            x_label: "trial",
            y_label: "Validation-accuracy",
            points: &[(0.0, 0.5), (1.0, 0.7), (3.0, 0.6)],
            colours: &[],
            line: &[(0.0, 0.5), (1.0, 0.7), (3.0, 0.7)],
            log_x: false,
            x_names: &[],
            integer_x: true,
            failed_x: &[2.0],
            legend: &[("succeeded", [30, 90, 200]), ("failed", [200, 40, 40])],
        };
        scatter_png(path.to_str().unwrap(), &scatter).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn trial_ticks_are_whole_numbers() {
        assert_eq!(
            integer_ticks(-0.55, 11.55),
            (0..=11).map(f64::from).collect::<Vec<_>>()
        );
        assert_eq!(
            integer_ticks(-0.5, 40.5),
            (0..=8).map(|i| f64::from(i * 5)).collect::<Vec<_>>()
        );
        assert!(integer_ticks(-0.55, 11.55)[0].is_sign_positive(), "no -0");
        assert_eq!(integer_ticks(0.2, 0.8), vec![1.0]);
        assert!(integer_ticks(-0.5, 1e9).len() <= 64);
    }
}
