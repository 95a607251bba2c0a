//! Line and bar charts of the analyses' tables, each written as PNG and SVG.
//!
//! Each chart is a struct borrowing the table rows it shows; [`save`] renders it on both
//! backends. Charts only place what the table says: no analysis is computed here.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{register_font, write_png, FAMILY};
use crate::analysis::fusion::{CheckpointWeights, Trajectory};
use crate::analysis::spectrum::Curve;
use crate::output::write_atomic;

/// Series colours (matplotlib's tab10), one per checkpoint.
const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn series_color(i: usize) -> RGBColor {
    TAB10[i % TAB10.len()]
}

/// Viridis at `t` in [0, 1]: dark purple (shallow) to yellow (deep).
fn depth_color(t: f64) -> RGBColor {
    ViridisRGB.get_color(t.clamp(0.0, 1.0) as f32)
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// A chart on `area` with a caption and room for axis labels (`y_labels` pixels on the left).
fn framed<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    y_labels: u32,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(area);
    b.caption(caption, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(y_labels);
    b
}

/// Draws the series labels in a framed box at `pos`.
fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// A figure that can be drawn on any plotters backend.
pub trait Chart {
    /// Pixels (PNG) or points (SVG).
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

/// Renders `chart` to `base.png` and `base.svg` (both written atomically); returns the paths.
pub fn save<C: Chart>(chart: &C, base: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let (w, h) = chart.size();
    let png = base.with_extension("png");
    let svg = base.with_extension("svg");
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        chart
            .draw(&root)
            .with_context(|| format!("drawing {}", png.display()))?;
        root.present().map_err(err)?;
    }
    let img = RgbImage::from_raw(w, h, buf).context("assembling the PNG buffer")?;
    write_png(&png, &img)?;
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        chart
            .draw(&root)
            .with_context(|| format!("drawing {}", svg.display()))?;
        root.present().map_err(err)?;
    }
    write_atomic(&svg, text.as_bytes())?;
    Ok(vec![png, svg])
}

/// Lower and upper bounds of `values` with 6% padding (and a unit span when they are equal).
fn padded(values: impl Iterator<Item = f64>, include_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if include_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = 0.06 * (hi - lo);
    (lo - pad, hi + pad)
}

/// Distinct values of `keys` in first-seen order.
fn groups<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for k in keys {
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// The relative log-amplitude curves of every layer, coloured by depth, one panel per
/// checkpoint (how-do-vits-work Fig. 2; MFF paper Fig. 1).
pub struct SpectrumPanels<'a> {
    pub curves: &'a [Curve],
}

impl Chart for SpectrumPanels<'_> {
    fn size(&self) -> (u32, u32) {
        let n = groups(self.curves.iter().map(|c| c.checkpoint.as_str())).len();
        (470 * n.max(1) as u32, 420)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let names = groups(self.curves.iter().map(|c| c.checkpoint.as_str()));
        let (ylo, yhi) = padded(self.curves.iter().flat_map(|c| c.delta.clone()), true);
        let xmax = self
            .curves
            .iter()
            .flat_map(|c| c.freq.clone())
            .fold(0.0f64, f64::max)
            .max(1e-3);
        for (area, name) in root
            .split_evenly((1, names.len().max(1)))
            .iter()
            .zip(&names)
        {
            let mut chart = framed(area, name, 60)
                .build_cartesian_2d(0.0..xmax * 1.02, ylo..yhi)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("frequency (× π)")
                .y_desc("Δ log amplitude")
                .label_style((FAMILY, 13))
                .axis_desc_style((FAMILY, 15))
                .draw()
                .map_err(err)?;
            let mine: Vec<&Curve> = self
                .curves
                .iter()
                .filter(|c| c.checkpoint == *name)
                .collect();
            let last_block = mine
                .iter()
                .filter(|c| c.layer.name.parse::<usize>().is_ok())
                .map(|c| c.layer.name.clone())
                .next_back();
            for c in &mine {
                let fused = c.layer.name == "fused";
                let color = if fused {
                    RGBColor(220, 20, 60)
                } else {
                    depth_color(c.layer.depth)
                };
                let style = color.stroke_width(if fused { 3 } else { 2 });
                let pts: Vec<(f64, f64)> = c.freq.iter().copied().zip(c.delta.clone()).collect();
                let series = chart
                    .draw_series(LineSeries::new(pts, style))
                    .map_err(err)?;
                let named =
                    fused || c.layer.name == "0" || Some(&c.layer.name) == last_block.as_ref();
                if named {
                    let label = match c.layer.name.as_str() {
                        "fused" => "fused (MFF)".to_string(),
                        "0" => "layer 0 (embedding)".to_string(),
                        n => format!("layer {n} (last)"),
                    };
                    series.label(label).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                    });
                }
            }
            legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
        }
        Ok(())
    }
}

/// The highest-frequency Delta log amplitude of each layer against its depth, one line per
/// checkpoint (MFF paper Fig. 1 right); MFF's fused output is a triangle at depth 1.
pub struct DepthLines<'a> {
    pub curves: &'a [Curve],
}

impl Chart for DepthLines<'_> {
    fn size(&self) -> (u32, u32) {
        (640, 440)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let names = groups(self.curves.iter().map(|c| c.checkpoint.as_str()));
        let (ylo, yhi) = padded(self.curves.iter().map(Curve::high_freq), true);
        let mut chart = framed(root, "high-frequency amplitude by depth", 60)
            .build_cartesian_2d(-0.03..1.05, ylo..yhi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("normalised depth")
            .y_desc("Δ log amplitude at the highest frequency")
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 15))
            .draw()
            .map_err(err)?;
        for (i, name) in names.iter().enumerate() {
            let color = series_color(i);
            let mut pts: Vec<(f64, f64)> = self
                .curves
                .iter()
                .filter(|c| c.checkpoint == *name && c.layer.name != "fused")
                .map(|c| (c.layer.depth, c.high_freq()))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
            let fused = self
                .curves
                .iter()
                .filter(|c| c.checkpoint == *name && c.layer.name == "fused")
                .map(|c| TriangleMarker::new((c.layer.depth, c.high_freq()), 7, color.filled()));
            chart.draw_series(fused).map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
        Ok(())
    }
}

/// softmax(proj_weights) of every fused layer against the training step (MFF paper Fig. 5).
pub struct FusionTrajectory<'a> {
    pub trajectory: &'a Trajectory,
    pub title: &'a str,
}

impl Chart for FusionTrajectory<'_> {
    fn size(&self) -> (u32, u32) {
        (680, 440)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let t = self.trajectory;
        let xmax = t.steps.iter().copied().max().unwrap_or(1).max(1) as f64;
        // The data's own range, so small moves stay visible (the tick labels give the scale).
        let (ylo, yhi) = padded(t.weights.iter().flatten().copied(), false);
        let mut chart = framed(root, self.title, 75)
            .build_cartesian_2d(0.0..xmax, ylo..yhi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.5}"))
            .x_desc("training step")
            .y_desc("fusion weight (softmax)")
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 15))
            .draw()
            .map_err(err)?;
        let n = t.blocks.len();
        for (k, block) in t.blocks.iter().enumerate() {
            let color = depth_color(if n > 1 {
                k as f64 / (n - 1) as f64
            } else {
                1.0
            });
            let pts: Vec<(f64, f64)> = t
                .steps
                .iter()
                .zip(&t.weights)
                .map(|(&s, w)| (s as f64, w[k]))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
                .label(format!("block {block}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    }
}

/// Grouped bars: one group per checkpoint, one bar per fused block (labelled above it).
pub struct FusionBars<'a> {
    pub rows: &'a [CheckpointWeights],
}

impl Chart for FusionBars<'_> {
    fn size(&self) -> (u32, u32) {
        (260 + 200 * self.rows.len().max(1) as u32, 440)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let (_, yhi) = padded(self.rows.iter().flat_map(|r| r.weights.clone()), true);
        let n = self.rows.len().max(1);
        let labels: Vec<String> = self.rows.iter().map(|r| r.checkpoint.clone()).collect();
        let mut chart = framed(root, "fusion weights (bar label: fused block)", 60)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..yhi * 1.08)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("fusion weight (softmax)")
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 15))
            .draw()
            .map_err(err)?;
        for (g, row) in self.rows.iter().enumerate() {
            let m = row.weights.len().max(1);
            let width = 0.8 / m as f64;
            for (k, (&b, &w)) in row.blocks.iter().zip(&row.weights).enumerate() {
                let x0 = g as f64 - 0.4 + k as f64 * width;
                let color = depth_color(if m > 1 {
                    k as f64 / (m - 1) as f64
                } else {
                    1.0
                });
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0 + 0.1 * width, 0.0), (x0 + 0.9 * width, w)],
                        color.filled(),
                    )))
                    .map_err(err)?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{b}"),
                        (x0 + 0.3 * width, w + yhi * 0.02),
                        (FAMILY, 12),
                    )))
                    .map_err(err)?;
            }
        }
        Ok(())
    }
}

/// Distributions of top Hessian eigenvalues over batches, one per checkpoint, on a log axis
/// (how-do-vits-work's "Hessian max eigenvalue spectra"): log-spaced histogram bars, a tick
/// per batch, and the median as a vertical line.
pub struct EigenDistribution<'a> {
    /// (checkpoint, top eigenvalue of each batch).
    pub series: &'a [(String, Vec<f64>)],
}

/// Bars of the eigenvalue histogram.
const BINS: usize = 12;

/// [`BINS`] log-spaced bins from `lo` to `hi` (every positive eigenvalue with a margin) and
/// each series' count per bin.
struct LogBins {
    lo: f64,
    hi: f64,
    counts: Vec<Vec<usize>>,
}

impl EigenDistribution<'_> {
    fn bins(&self) -> LogBins {
        let positive: Vec<f64> = self
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| *v > 0.0 && v.is_finite())
            .collect();
        let lo = positive.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = positive.iter().copied().fold(0.0, f64::max);
        let (lo, hi) = if positive.is_empty() {
            (0.1, 10.0)
        } else {
            (lo / 1.5, hi * 1.5)
        };
        let counts = self
            .series
            .iter()
            .map(|(_, v)| {
                let mut c = vec![0; BINS];
                for &x in v.iter().filter(|x| **x > 0.0) {
                    let i = ((x / lo).ln() / (hi / lo).ln() * BINS as f64) as usize;
                    c[i.min(BINS - 1)] += 1;
                }
                c
            })
            .collect();
        LogBins { lo, hi, counts }
    }
}

impl Chart for EigenDistribution<'_> {
    fn size(&self) -> (u32, u32) {
        (680, 440)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let LogBins { lo, hi, counts } = self.bins();
        let edge = |i: usize| lo * (hi / lo).powf(i as f64 / BINS as f64);
        let ymax = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64 * 1.15;
        let mut chart = framed(root, "top Hessian eigenvalue over batches", 50)
            // Log axis drawn in log10 coordinates, so that even a range under one decade gets
            // a dozen labelled ticks (plotters' log axis labels powers of ten only).
            .build_cartesian_2d(lo.log10()..hi.log10(), 0.0..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(10)
            .x_label_formatter(&|x| significant(10f64.powf(*x)))
            .y_label_formatter(&|y| {
                if (y - y.round()).abs() < 1e-9 {
                    format!("{y:.0}")
                } else {
                    String::new()
                }
            })
            .x_desc("top eigenvalue λ₁ (log scale)")
            .y_desc("batches")
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 15))
            .draw()
            .map_err(err)?;
        for (i, ((name, vals), c)) in self.series.iter().zip(&counts).enumerate() {
            let color = series_color(i);
            let bars = c
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(b, &n)| {
                    Rectangle::new(
                        [(edge(b).log10(), 0.0), (edge(b + 1).log10(), n as f64)],
                        color.mix(0.35).filled(),
                    )
                });
            chart.draw_series(bars).map_err(err)?;
            let ticks = vals.iter().filter(|v| **v > 0.0).map(|&v| {
                PathElement::new(
                    vec![(v.log10(), 0.0), (v.log10(), ymax * 0.06)],
                    color.stroke_width(2),
                )
            });
            chart.draw_series(ticks).map_err(err)?;
            let med = median(vals);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(med.max(lo).log10(), 0.0), (med.max(lo).log10(), ymax)],
                    color.stroke_width(2),
                )))
                .map_err(err)?
                .label(match vals.iter().filter(|v| **v <= 0.0).count() {
                    0 => format!("{name} (median {med:.4})"),
                    neg => format!("{name} (median {med:.4}; {neg} negative not drawn)"),
                })
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    }
}

/// `v` with three significant digits, without exponent notation for usual magnitudes.
fn significant(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

/// The median (mean of the middle two for even counts); 0 for no values.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}
