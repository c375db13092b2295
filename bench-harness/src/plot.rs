//! SVG plots written next to the JSON results: throughput over time and latency distribution,
//! one series per broker. Hand-written SVG: no plotting dependency.

use crate::report::{Outcome, Report};
use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else if v >= 1.0 || v == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Axis titles, ticks ((position in [0, 1], label)) and the maps from data to [0, 1].
struct Axes<'a> {
    x_title: &'a str,
    y_title: &'a str,
    x_ticks: Vec<(f64, String)>,
    y_ticks: Vec<(f64, String)>,
    fx: &'a dyn Fn(f64) -> f64,
    fy: &'a dyn Fn(f64) -> f64,
}

/// Renders line series.
fn chart(title: &str, series: &[Series], axes: &Axes<'_>) -> String {
    let Axes {
        x_title,
        y_title,
        x_ticks,
        y_ticks,
        fx,
        fy,
    } = axes;
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + fx(x).clamp(0.0, 1.0) * pw;
    let py = |y: f64| TOP + ph - fy(y).clamp(0.0, 1.0) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + pw / 2.0,
        escape(title)
    );
    for (v, label) in y_ticks {
        let y = TOP + ph - v.clamp(0.0, 1.0) * ph;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            escape(label)
        );
    }
    for (v, label) in x_ticks {
        let x = LEFT + v.clamp(0.0, 1.0) * pw;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            escape(label)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 10.0,
        escape(x_title)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(y_title)
    );
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = ser
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            W - RIGHT + 10.0,
            W - RIGHT + 30.0,
            W - RIGHT + 36.0,
            ly + 4.0,
            escape(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Messages received per second over time, one line per broker.
pub fn throughput_svg(scenario: &str, reports: &[&Report]) -> Option<String> {
    let series: Vec<Series> = reports
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Pubsub(p) => Some(Series {
                name: r.broker.clone(),
                points: p.series.iter().map(|s| (s.t, s.received as f64)).collect(),
            }),
            _ => None,
        })
        .collect();
    if series.is_empty() {
        return None;
    }
    let xmax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let x_ticks: Vec<(f64, String)> = (0..=5)
        .map(|i| (i as f64 / 5.0, format!("{:.0}", xmax * i as f64 / 5.0)))
        .collect();
    let y_ticks: Vec<(f64, String)> = (0..=5)
        .map(|i| (i as f64 / 5.0, fmt_num(ymax * i as f64 / 5.0)))
        .collect();
    Some(chart(
        &format!("{scenario}: messages received per second"),
        &series,
        &Axes {
            x_title: "seconds since publishing started (warm-up included)",
            y_title: "messages/s",
            x_ticks,
            y_ticks,
            fx: &|x| x / xmax,
            fy: &|y| y / ymax,
        },
    ))
}

/// Latency by percentile (x: 0 %, 90 %, 99 %, 99.9 %, 99.99 % on a log scale of 1/(1-p)),
/// one line per broker.
pub fn latency_svg(scenario: &str, reports: &[&Report]) -> Option<String> {
    let series: Vec<Series> = reports
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Pubsub(p) if p.latency.count > 0 => Some(Series {
                name: r.broker.clone(),
                points: p
                    .latency
                    .distribution
                    .iter()
                    .filter(|(pc, _)| *pc < 100.0)
                    .map(|&(pc, us)| (pc, us))
                    .collect(),
            }),
            _ => None,
        })
        .collect();
    if series.is_empty() {
        return None;
    }
    let nines = |p: f64| (1.0 / (1.0 - p / 100.0)).log10() / 4.0; // 0 → 0, 99.99 → 1
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let decades = ymax.log10().ceil().max(1.0);
    let ymin = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(f64::MAX, f64::min)
        .max(0.1);
    let low = ymin.log10().floor().min(decades - 1.0);
    let fy = move |y: f64| (y.max(0.1).log10() - low) / (decades - low);
    let x_ticks: Vec<(f64, String)> = [
        (0.0, "0%"),
        (90.0, "90%"),
        (99.0, "99%"),
        (99.9, "99.9%"),
        (99.99, "99.99%"),
    ]
    .iter()
    .map(|(p, l)| (nines(*p), l.to_string()))
    .collect();
    let y_ticks: Vec<(f64, String)> = (low as i32..=decades as i32)
        .map(|d| (fy(10f64.powi(d)), fmt_num(10f64.powi(d))))
        .collect();
    Some(chart(
        &format!("{scenario}: end-to-end latency by percentile"),
        &series,
        &Axes {
            x_title: "percentile",
            y_title: "latency (µs, log scale)",
            x_ticks,
            y_ticks,
            fx: &nines,
            fy: &fy,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_numbers() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(130_000.0), 200_000.0);
        assert_eq!(fmt_num(200_000.0), "200k");
        assert_eq!(escape("a<b>&"), "a&lt;b&gt;&amp;");
    }

    #[test]
    fn chart_is_svg_with_one_line_per_series() {
        let s = chart(
            "t",
            &[
                Series {
                    name: "a".into(),
                    points: vec![(0.0, 0.0), (1.0, 1.0)],
                },
                Series {
                    name: "b<".into(),
                    points: vec![(0.5, 0.5)],
                },
            ],
            &Axes {
                x_title: "x",
                y_title: "y",
                x_ticks: vec![(0.0, "0".into())],
                y_ticks: vec![(1.0, "1".into())],
                fx: &|x| x,
                fy: &|y| y,
            },
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("b&lt;"));
    }
}
