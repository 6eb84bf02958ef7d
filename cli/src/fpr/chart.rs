//! Charts of measured against predicted rates, drawn as SVG by `plotters`.
//!
//! Text is written as SVG `<text>` elements that the viewer renders with its
//! own fonts (plotters' built-in size estimate lays them out), so drawing
//! needs no system font library.

use std::path::Path;

use plotters::coord::combinators::{BindKeyPoints, LogCoord, WithKeyPoints};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mark {
    /// A line through the points (a prediction).
    Line,
    /// A dashed line (a reference).
    Dashed,
    /// Filled circles (a measurement).
    Dots,
    /// Crosses (published or estimated values).
    Crosses,
}

/// One named series of `(x, y)` points.
#[derive(Clone, Debug)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) mark: Mark,
    pub(crate) points: Vec<(f64, f64)>,
}

/// A chart: axes, labels and series. Rates on the y axis are shown as
/// percentages.
#[derive(Clone, Debug)]
pub(crate) struct Chart {
    pub(crate) title: String,
    pub(crate) x_label: String,
    pub(crate) y_label: String,
    pub(crate) x_log: bool,
    pub(crate) y_log: bool,
    /// The x axis holds rates too (labelled as percentages).
    pub(crate) x_is_rate: bool,
    /// Where to label a log x axis (default: round values).
    pub(crate) x_ticks: Option<Vec<f64>>,
    /// Where the legend goes (where it hides no point).
    pub(crate) legend: SeriesLabelPosition,
    pub(crate) series: Vec<Series>,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

impl Chart {
    /// Writes the chart as an SVG file of 960 × 600 pixels.
    pub(crate) fn write_svg(&self, path: &Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
        let (x, y) = self.ranges();
        let result = match (self.x_log, self.y_log, &self.x_ticks) {
            (false, false, _) => self.draw(&root, lin(x), lin(y)),
            (false, true, _) => self.draw(&root, lin(x), log(y)),
            (true, false, None) => self.draw(&root, log(x), lin(y)),
            (true, false, Some(ticks)) => self.draw(&root, log_at(x, ticks), lin(y)),
            (true, true, None) => self.draw(&root, log(x), log(y)),
            (true, true, Some(ticks)) => self.draw(&root, log_at(x, ticks), log(y)),
        };
        result
            .and_then(|()| root.present().map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Axis ranges covering every point, with a margin (multiplicative on a
    /// log axis, whose points must be positive).
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let points = || self.series.iter().flat_map(|s| s.points.iter().copied());
        let span = |values: Vec<f64>, log: bool, from_zero: bool| {
            let values: Vec<f64> = values
                .into_iter()
                .filter(|v| v.is_finite() && (!log || *v > 0.0))
                .collect();
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() {
                return if log { (0.1, 1.0) } else { (0.0, 1.0) };
            }
            if log {
                (lo / 1.5, hi * 1.5)
            } else {
                let pad = ((hi - lo) * 0.05).max(hi.abs() * 0.05).max(1e-9);
                let lo = if from_zero && lo >= 0.0 {
                    0.0
                } else {
                    lo - pad
                };
                (lo, hi + pad)
            }
        };
        (
            span(points().map(|p| p.0).collect(), self.x_log, false),
            span(points().map(|p| p.1).collect(), self.y_log, true),
        )
    }

    fn draw<X, Y>(
        &self,
        root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
        x: X,
        y: Y,
    ) -> Result<(), String>
    where
        X: Ranged<ValueType = f64> + ValueFormatter<f64>,
        Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let err = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(96)
            .build_cartesian_2d(x, y)
            .map_err(err)?;
        let percent = |v: &f64| format_percent(*v);
        let number = |v: &f64| format_number(*v);
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 15))
            .x_label_formatter(if self.x_is_rate { &percent } else { &number })
            .y_label_formatter(&percent)
            .draw()
            .map_err(err)?;
        for (i, series) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(|&(px, py)| (!self.x_log || px > 0.0) && (!self.y_log || py > 0.0))
                .collect();
            let name = series.name.as_str();
            match series.mark {
                Mark::Line => {
                    chart
                        .draw_series(LineSeries::new(points, color.stroke_width(2)))
                        .map_err(err)?
                        .label(name)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                }
                Mark::Dashed => {
                    chart
                        .draw_series(
                            dashed(&points, self.x_log, self.y_log)
                                .into_iter()
                                .map(|d| PathElement::new(d, color.stroke_width(2))),
                        )
                        .map_err(err)?
                        .label(name)
                        .legend(move |(x, y)| {
                            EmptyElement::at((x, y))
                                + PathElement::new(vec![(0, 0), (8, 0)], color.stroke_width(2))
                                + PathElement::new(vec![(12, 0), (20, 0)], color.stroke_width(2))
                        });
                }
                Mark::Dots => {
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                        .map_err(err)?
                        .label(name)
                        .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
                }
                Mark::Crosses => {
                    chart
                        .draw_series(
                            points
                                .iter()
                                .map(|&p| Cross::new(p, 6, color.stroke_width(2))),
                        )
                        .map_err(err)?
                        .label(name)
                        .legend(move |(x, y)| Cross::new((x + 10, y), 6, color.stroke_width(2)));
                }
            }
        }
        chart
            .configure_series_labels()
            .position(self.legend.clone())
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)
    }
}

fn lin((lo, hi): (f64, f64)) -> RangedCoordf64 {
    (lo..hi).into()
}

/// A log axis labelled at round values: 1, 2 and 5 times a power of ten
/// over a short range, fewer over a long one (plotters' own choice crowds).
fn log((lo, hi): (f64, f64)) -> WithKeyPoints<LogCoord<f64>> {
    let decades = (hi / lo).log10();
    let mantissas: &[f64] = if decades <= 3.0 {
        &[1.0, 2.0, 5.0]
    } else if decades <= 5.0 {
        &[1.0, 3.0]
    } else {
        &[1.0]
    };
    let powers = || (lo.log10().floor() as i32)..=(hi.log10().ceil() as i32);
    let within = |v: &f64| (lo..=hi).contains(v);
    let keys: Vec<f64> = powers()
        .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
        .filter(within)
        .collect();
    let light: Vec<f64> = powers()
        .flat_map(|e| (1..10).map(move |m| f64::from(m) * 10f64.powi(e)))
        .filter(within)
        .collect();
    let coord: LogCoord<f64> = (lo..hi).log_scale().into();
    coord.with_key_points(keys).with_light_points(light)
}

/// A log axis labelled at the given points.
fn log_at((lo, hi): (f64, f64), ticks: &[f64]) -> WithKeyPoints<LogCoord<f64>> {
    let coord: LogCoord<f64> = (lo..hi).log_scale().into();
    coord.with_key_points(ticks.to_vec())
}

/// Every other piece of a polyline cut into 24 pieces per segment: a dashed
/// line whose dashes follow the curve (pieces of equal length on screen: a
/// log axis is cut geometrically).
fn dashed(points: &[(f64, f64)], x_log: bool, y_log: bool) -> Vec<Vec<(f64, f64)>> {
    let between = |a: f64, b: f64, t: f64, log: bool| {
        if log {
            a * (b / a).powf(t)
        } else {
            a + (b - a) * t
        }
    };
    let mut dashes = Vec::new();
    for pair in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
        for i in (0..24).step_by(2) {
            let at = |t: f64| (between(x0, x1, t, x_log), between(y0, y1, t, y_log));
            dashes.push(vec![at(f64::from(i) / 24.0), at(f64::from(i + 1) / 24.0)]);
        }
    }
    dashes
}

/// A rate as a percentage with enough digits to tell tick labels apart.
pub(crate) fn format_percent(rate: f64) -> String {
    let p = rate * 100.0;
    if p == 0.0 {
        "0%".to_owned()
    } else if p.abs() >= 10.0 {
        format!("{p:.0}%")
    } else if p.abs() >= 1.0 {
        format!("{}%", trim(format!("{p:.1}")))
    } else {
        // Two significant digits below 1%.
        let digits = (-p.abs().log10().floor()) as usize + 1;
        format!("{}%", trim(format!("{p:.digits$}")))
    }
}

/// A plain number, in powers of two or ten when large.
fn format_number(v: f64) -> String {
    let exp = v.abs().log2();
    if v.abs() >= 1024.0 && (exp - exp.round()).abs() < 1e-9 {
        return format!("2^{}", exp.round());
    }
    if v.abs() >= 1e5 {
        return format!("{v:.1e}");
    }
    trim(format!("{v:.2}"))
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_read_well() {
        assert_eq!(format_percent(0.013), "1.3%");
        assert_eq!(format_percent(0.01), "1%");
        assert_eq!(format_percent(0.0007), "0.07%");
        assert_eq!(format_percent(0.000_45), "0.045%");
        assert_eq!(format_percent(0.5), "50%");
        assert_eq!(format_number(4_294_967_296.0), "2^32");
        assert_eq!(format_number(12.5), "12.5");
    }
}
