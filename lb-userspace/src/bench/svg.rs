//! Minimal SVG line charts for the report: log or linear axes, one line per series with
//! min–max whiskers, hollow markers for lower bounds (runs stopped at a timeout).
use std::fmt::Write;

pub struct Point {
    pub x: f64,
    /// Median.
    pub y: f64,
    /// Min and max, drawn as a whisker.
    pub range: Option<(f64, f64)>,
}

pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
    /// "At least this much": runs that were stopped, drawn hollow with an arrow up.
    pub lower_bounds: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

const W: f64 = 760.0;
const H: f64 = 430.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 58.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    pixels: (f64, f64),
}

impl Axis {
    fn new(values: &[f64], log: bool, pixels: (f64, f64), from_zero: bool) -> Self {
        let values: Vec<f64> = values
            .iter()
            .copied()
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        let (mut lo, mut hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(*v), b.max(*v))
            });
        if !lo.is_finite() {
            (lo, hi) = (1.0, 10.0);
        }
        if log {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
        } else {
            if from_zero {
                lo = 0.0;
            }
            let step = nice_step((hi - lo).max(hi.abs() * 0.1).max(1e-9) / 5.0);
            lo = (lo / step).floor() * step;
            hi = ((hi / step).ceil() * step).max(lo + step);
        }
        Self {
            lo,
            hi,
            log,
            pixels,
        }
    }

    fn map(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.max(1e-300).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        self.pixels.0 + f * (self.pixels.1 - self.pixels.0)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (
                self.lo.log10().round() as i32,
                self.hi.log10().round() as i32,
            );
            (a..=b).map(|e| 10f64.powi(e)).collect()
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let mut ticks = Vec::new();
            let mut v = self.lo;
            while v <= self.hi + step * 1e-6 {
                ticks.push(v);
                v += step;
            }
            ticks
        }
    }
}

fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// 1, 10, 100, 1k, 10k, 100k, 1M; 0.001 s -> "1 ms" style is left to the caller's label.
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 && (v / 1e6).fract() == 0.0 {
        format!("{}M", v / 1e6)
    } else if a >= 1e3 && (v / 1e3).fract() == 0.0 {
        format!("{}k", v / 1e3)
    } else if a >= 1.0 || a == 0.0 {
        format!("{}", (v * 100.0).round() / 100.0)
    } else {
        let s = format!("{v:.6}");
        s.trim_end_matches('0').to_string()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn render(chart: &Chart) -> String {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for s in &chart.series {
        for p in &s.points {
            xs.push(p.x);
            ys.push(p.y);
            if let Some((lo, hi)) = p.range {
                ys.push(lo);
                ys.push(hi);
            }
        }
        for (x, y) in &s.lower_bounds {
            xs.push(*x);
            ys.push(*y);
        }
    }
    let x = Axis::new(&xs, chart.log_x, (LEFT, W - RIGHT), false);
    let y = Axis::new(&ys, chart.log_y, (H - BOTTOM, TOP), true);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        LEFT,
        esc(&chart.title)
    );
    // Grid and ticks.
    for t in y.ticks() {
        let py = y.map(t);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            tick_label(t)
        );
    }
    for t in x.ticks() {
        let px = x.map(t);
        let _ = writeln!(
            o,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0,
            tick_label(t)
        );
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
        W - RIGHT - LEFT,
        H - BOTTOM - TOP
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 14.0,
        esc(&chart.x_label)
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (TOP + H - BOTTOM) / 2.0,
        esc(&chart.y_label)
    );
    for (i, s) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if i >= COLORS.len() {
            r#" stroke-dasharray="5,3""#
        } else {
            ""
        };
        let path: Vec<String> = s
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x.map(p.x), y.map(p.y)))
            .collect();
        if path.len() > 1 {
            let _ = writeln!(
                o,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
        }
        for p in &s.points {
            let (px, py) = (x.map(p.x), y.map(p.y));
            if let Some((lo, hi)) = p.range {
                let _ = writeln!(
                    o,
                    r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{color}"/>"#,
                    y.map(lo),
                    y.map(hi)
                );
            }
            let _ = writeln!(
                o,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{color}"/>"#
            );
        }
        for (bx, by) in &s.lower_bounds {
            let (px, py) = (x.map(*bx), y.map(*by));
            let _ = writeln!(
                o,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="4.5" fill="white" stroke="{color}" stroke-width="2"/><path d="M{px:.1},{:.1} l-4,6 h8 z" fill="{color}"/>"#,
                py - 14.0
            );
        }
        let ly = TOP + 8.0 + 20.0 * i as f64;
        let lx = W - RIGHT + 14.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><circle cx="{:.1}" cy="{ly:.1}" r="3.5" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 22.0,
            lx + 11.0,
            lx + 28.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    if chart.series.iter().any(|s| !s.lower_bounds.is_empty()) {
        let ly = TOP + 8.0 + 20.0 * chart.series.len() as f64 + 6.0;
        let lx = W - RIGHT + 14.0;
        let _ = writeln!(
            o,
            r##"<circle cx="{:.1}" cy="{ly:.1}" r="4.5" fill="white" stroke="#444" stroke-width="2"/><text x="{:.1}" y="{:.1}">stopped at the time limit</text>"##,
            lx + 11.0,
            lx + 28.0,
            ly + 4.0
        );
    }
    let _ = writeln!(
        o,
        r##"<text x="{:.1}" y="{:.1}" fill="#666">dots: median; bars: min–max</text>"##,
        W - RIGHT + 14.0,
        H - BOTTOM
    );
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_well_formed_chart() {
        let chart = Chart {
            title: "t <1>".into(),
            x_label: "services".into(),
            y_label: "ns".into(),
            log_x: true,
            log_y: false,
            series: vec![Series {
                name: "a".into(),
                points: vec![
                    Point {
                        x: 1.0,
                        y: 10.0,
                        range: Some((9.0, 11.0)),
                    },
                    Point {
                        x: 100_000.0,
                        y: 12.0,
                        range: None,
                    },
                ],
                lower_bounds: vec![(1000.0, 20.0)],
            }],
        };
        let svg = render(&chart);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;") && svg.contains(">100k<"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick_label(100_000.0), "100k");
        assert_eq!(tick_label(1.0), "1");
        assert_eq!(tick_label(0.01), "0.01");
        assert_eq!(tick_label(2.5), "2.5");
    }
}
