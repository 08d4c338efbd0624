//! Charts for the report, drawn with plotters' SVG backend into strings so
//! the HTML can inline them.
//!
//! Every chart has a title, labelled axes and a legend (line charts: a
//! series legend; heat maps: a colour bar). A logarithmic axis plots
//! log10 of the values and labels its ticks with the values themselves;
//! points that cannot be drawn (non-finite, or ≤ 0 on a log axis) are left
//! out and not counted in [`Figure::points`].

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// Chart size in pixels.
const SIZE: (u32, u32) = (720, 440);

/// Line colours, chosen to stay distinguishable (Tableau 10).
const PALETTE: [RGBColor; 10] = [
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

/// Axis scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Values as they are.
    Linear,
    /// log10 of the values; for magnitudes that span decades.
    Log,
}

impl Scale {
    fn map(self, v: f64) -> Option<f64> {
        match self {
            _ if !v.is_finite() => None,
            Scale::Linear => Some(v),
            Scale::Log if v > 0.0 => Some(v.log10()),
            Scale::Log => None,
        }
    }

    fn label(self, v: f64) -> String {
        match self {
            Scale::Linear => format_number(v),
            Scale::Log => format_number(10f64.powf(v)),
        }
    }
}

/// A number in at most three significant digits, in plain or e-notation.
pub fn format_number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let magnitude = v.abs().log10().floor() as i32;
    if (-3..=4).contains(&magnitude) {
        let decimals = (2 - magnitude).clamp(0, 6) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        format!("{v:.2e}")
            .replace(".00e", "e")
            .replace("0e", "e")
            .replace(".e", "e")
    }
}

/// One named line.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// (x, y) points in x order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series from a name and points.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// A line chart with markers.
#[derive(Clone, Debug)]
pub struct LineChart {
    /// Title above the plot.
    pub title: String,
    /// x axis label with its unit.
    pub x_label: String,
    /// y axis label with its unit.
    pub y_label: String,
    /// x axis scale.
    pub x_scale: Scale,
    /// y axis scale.
    pub y_scale: Scale,
    /// The lines.
    pub series: Vec<Series>,
}

/// A drawn chart, ready to inline.
#[derive(Clone, Debug)]
pub struct Figure {
    /// File name in the run directory (`NAME.svg`).
    pub file: String,
    /// One sentence under the figure.
    pub caption: String,
    /// The SVG document.
    pub svg: String,
    /// Data points (line charts) or cells (heat maps) drawn.
    pub points: usize,
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn draw_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

impl LineChart {
    /// Draws the chart as `file` with `caption`.
    ///
    /// # Errors
    /// Drawing errors from plotters.
    pub fn figure(&self, file: &str, caption: &str) -> Result<Figure> {
        let series: Vec<(String, Vec<(f64, f64)>)> = self
            .series
            .iter()
            .map(|s| {
                let pts = s
                    .points
                    .iter()
                    .filter_map(|&(x, y)| Some((self.x_scale.map(x)?, self.y_scale.map(y)?)))
                    .collect();
                (s.name.clone(), pts)
            })
            .collect();
        let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
        let fold = |f: fn(&(f64, f64)) -> f64| {
            all.iter()
                .map(f)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                })
        };
        let (x0, x1) = fold(|p| p.0);
        let (y0, y1) = fold(|p| p.1);
        let (x0, x1) = padded(x0, x1);
        let (y0, y1) = padded(y0, y1);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(draw_error)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(draw_error)?;
            let (xs, ys) = (self.x_scale, self.y_scale);
            chart
                .configure_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .x_label_formatter(&|v| xs.label(*v))
                .y_label_formatter(&|v| ys.label(*v))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(draw_error)?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                    .map_err(draw_error)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                if pts.len() <= 60 {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(draw_error)?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(draw_error)?;
            root.present().map_err(draw_error)?;
        }
        Ok(Figure {
            file: file.to_string(),
            caption: caption.to_string(),
            svg,
            points: all.len(),
        })
    }
}

/// A grid of values coloured on a scale, with a colour bar.
#[derive(Clone, Debug)]
pub struct Heatmap {
    /// Title above the plot.
    pub title: String,
    /// x axis label with its unit.
    pub x_label: String,
    /// y axis label with its unit.
    pub y_label: String,
    /// Column labels, left to right.
    pub columns: Vec<String>,
    /// Row labels, bottom to top.
    pub rows: Vec<String>,
    /// `values[row][column]`; `None` for a cell without a value (drawn grey).
    pub values: Vec<Vec<Option<f64>>>,
    /// What the colour means, with its unit (colour bar label).
    pub value_label: String,
    /// Values mapped to the ends of the colour scale.
    pub range: (f64, f64),
}

/// Viridis-like ramp from dark blue (0) to yellow (1).
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(f64, (f64, f64, f64)); 5] = [
        (0.0, (68.0, 1.0, 84.0)),
        (0.25, (59.0, 82.0, 139.0)),
        (0.5, (33.0, 145.0, 140.0)),
        (0.75, (94.0, 201.0, 98.0)),
        (1.0, (253.0, 231.0, 37.0)),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let k = STOPS.iter().rposition(|s| s.0 <= t).unwrap_or(0).min(3);
    let (t0, a) = STOPS[k];
    let (t1, b) = STOPS[k + 1];
    let u = (t - t0) / (t1 - t0);
    let mix = |p: f64, q: f64| (p + (q - p) * u).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

impl Heatmap {
    /// Draws the heat map as `file` with `caption`.
    ///
    /// # Errors
    /// Drawing errors from plotters.
    pub fn figure(&self, file: &str, caption: &str) -> Result<Figure> {
        let (nx, ny) = (self.columns.len() as i32, self.rows.len() as i32);
        let (lo, hi) = self.range;
        let scale = |v: f64| (v - lo) / (hi - lo).max(1e-12);
        let mut cells = 0;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(draw_error)?;
            let (main, bar) = root.split_horizontally(SIZE.0 - 150);
            let mut chart = ChartBuilder::on(&main)
                .caption(&self.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(70)
                // A segmented range `0..n` has n + 1 segments: stop one short.
                .build_cartesian_2d(
                    (0..(nx - 1).max(0)).into_segmented(),
                    (0..(ny - 1).max(0)).into_segmented(),
                )
                .map_err(draw_error)?;
            let label = |labels: &[String], v: &SegmentValue<i32>| match v {
                SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            };
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .x_labels(nx as usize)
                .y_labels(ny as usize)
                .x_label_formatter(&|v| label(&self.columns, v))
                .y_label_formatter(&|v| label(&self.rows, v))
                .draw()
                .map_err(draw_error)?;
            for (r, row) in self.values.iter().enumerate() {
                for (c, value) in row.iter().enumerate() {
                    let (c, r) = (c as i32, r as i32);
                    let corners = [
                        (SegmentValue::Exact(c), SegmentValue::Exact(r + 1)),
                        (SegmentValue::Exact(c + 1), SegmentValue::Exact(r)),
                    ];
                    let fill = match value {
                        Some(v) if v.is_finite() => {
                            cells += 1;
                            ramp(scale(*v))
                        }
                        _ => RGBColor(200, 200, 200),
                    };
                    chart
                        .draw_series(std::iter::once(Rectangle::new(corners, fill.filled())))
                        .map_err(draw_error)?;
                    if let Some(v) = value.filter(|v| v.is_finite()) {
                        let ink = if scale(v) > 0.6 { BLACK } else { WHITE };
                        chart
                            .draw_series(std::iter::once(Text::new(
                                format_number(v),
                                (SegmentValue::CenterOf(c), SegmentValue::CenterOf(r)),
                                ("sans-serif", 12).into_font().color(&ink),
                            )))
                            .map_err(draw_error)?;
                    }
                }
            }
            // Colour bar: the legend of the colours.
            let mut legend = ChartBuilder::on(&bar)
                .margin_top(40)
                .margin_bottom(56)
                .margin_left(10)
                .margin_right(60)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..1.0, lo..hi.max(lo + 1e-12))
                .map_err(draw_error)?;
            legend
                .configure_mesh()
                .disable_mesh()
                .disable_x_axis()
                .y_desc(&self.value_label)
                .y_labels(6)
                .y_label_formatter(&|v| format_number(*v))
                .label_style(("sans-serif", 12))
                .axis_desc_style(("sans-serif", 13))
                .draw()
                .map_err(draw_error)?;
            const STEPS: usize = 40;
            let step = (hi - lo) / STEPS as f64;
            legend
                .draw_series((0..STEPS).map(|i| {
                    let v = lo + step * i as f64;
                    Rectangle::new([(0.0, v), (1.0, v + step)], ramp(scale(v)).filled())
                }))
                .map_err(draw_error)?;
            root.present().map_err(draw_error)?;
        }
        Ok(Figure {
            file: file.to_string(),
            caption: caption.to_string(),
            svg,
            points: cells,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short() {
        assert_eq!(format_number(0.001), "0.001");
        assert_eq!(format_number(0.1234), "0.123");
        assert_eq!(format_number(12.0), "12");
        assert_eq!(format_number(1234.6), "1235");
        assert_eq!(format_number(1e-6), "1e-6");
        assert_eq!(format_number(2.5e7), "2.5e7");
    }

    #[test]
    fn a_line_chart_has_title_axes_legend_and_its_points() -> Result<()> {
        let chart = LineChart {
            title: "Activation std by depth".into(),
            x_label: "block".into(),
            y_label: "std (log)".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: vec![
                Series::new("none", vec![(1.0, 1.0), (2.0, 0.1), (3.0, 0.0)]),
                Series::new("batch", vec![(1.0, 1.0), (2.0, 1.1), (3.0, f64::NAN)]),
            ],
        };
        let f = chart.figure("x.svg", "c")?;
        // The 0 and the NaN cannot be drawn on a log axis.
        assert_eq!(f.points, 4);
        for needle in [
            "Activation std by depth",
            "block",
            "std (log)",
            "none",
            "batch",
        ] {
            assert!(f.svg.contains(needle), "{needle}");
        }
        // Each series is drawn in its palette colour (plotters writes upper-case hex).
        for colour in ["#1F77B4", "#FF7F0E"] {
            assert!(f.svg.contains(colour), "{colour}");
        }
        Ok(())
    }

    #[test]
    fn a_heatmap_draws_every_cell_and_a_colour_bar() -> Result<()> {
        let map = Heatmap {
            title: "Accuracy".into(),
            x_label: "learning rate".into(),
            y_label: "init σ".into(),
            columns: vec!["0.01".into(), "0.1".into()],
            rows: vec!["0.1".into(), "1".into()],
            values: vec![vec![Some(90.0), Some(10.0)], vec![None, Some(50.0)]],
            value_label: "held-out accuracy (%)".into(),
            range: (0.0, 100.0),
        };
        let f = map.figure("h.svg", "c")?;
        assert_eq!(f.points, 3);
        assert!(f.svg.contains("held-out accuracy (%)"));
        assert!(f.svg.matches("<rect").count() >= 4 + 40);
        assert_eq!(ramp(0.0), RGBColor(68, 1, 84));
        assert_eq!(ramp(1.0), RGBColor(253, 231, 37));
        Ok(())
    }
}
