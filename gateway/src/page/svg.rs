//! Plots drawn on the gateway as SVG: one `<polyline>` per series, a few grid lines and
//! labels. A page that shows them loads no script for it, and a plot of a day of one-minute
//! rollups (1,440 windows, three lines) is 50 KB, half its points as JSON, drawn in about a
//! millisecond (BENCHMARKS.md, "The status page").
//!
//! Why not a plotting crate: plotters' SVG backend writes one element per segment and pulls
//! in font handling for its labels; these plots need a line per series and a handful of
//! labels, which is this file.

use std::fmt::Write as _;

use crate::rules::Millis;

/// Width and height of the drawing, in SVG units (the page scales it).
pub const WIDTH: f64 = 640.0;
/// See [`WIDTH`].
pub const HEIGHT: f64 = 200.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 24.0;

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its name in the legend.
    pub name: String,
    /// A CSS class, for its colour (`a`, `b`, `c`).
    pub class: &'static str,
    /// (time in ms since the epoch, value), oldest first.
    pub points: Vec<(Millis, f64)>,
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A short number for an axis: 3 significant digits, with k/M/G for large ones.
pub fn short(v: f64) -> String {
    let a = v.abs();
    let (v, unit) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{text}{unit}")
}

/// The round step (1, 2 or 5 times a power of ten) at or above `rough`.
fn nice_step(rough: f64) -> f64 {
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= rough * 0.999)
        .unwrap_or(10.0 * power)
}

/// `HH:MM` (UTC) of a time.
fn clock(ms: Millis) -> String {
    let minutes = (ms / 60_000) % (24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Draws `series` over time, titled `title` (for screen readers), with `unit` on the axis.
/// With no points at all it says so instead of drawing empty axes.
pub fn plot(title: &str, unit: &str, series: &[Series]) -> String {
    let mut out =
        String::with_capacity(1024 + series.iter().map(|s| s.points.len() * 16).sum::<usize>());
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}" class="plot">"#,
        escape(title)
    );
    let _ = write!(out, "<title>{}</title>", escape(title));
    let all = || series.iter().flat_map(|s| s.points.iter());
    let Some(t0) = all().map(|p| p.0).min() else {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" class="empty">no data yet</text></svg>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
        return out;
    };
    let t1 = all().map(|p| p.0).max().unwrap_or(t0).max(t0 + 1);
    let finite = || all().map(|p| p.1).filter(|v| v.is_finite());
    let mut lo = finite().fold(f64::INFINITY, f64::min);
    let mut hi = finite().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if lo > 0.0 && lo < hi * 0.5 {
        // Counts and bytes read better from zero.
        lo = 0.0;
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 1.0, hi + 1.0);
    }
    // Grid lines on round numbers: a step of 1, 2 or 5 times a power of ten.
    let step = nice_step((hi - lo) / 4.0);
    lo = (lo / step).floor() * step;
    hi = (hi / step).ceil() * step;
    let lines = ((hi - lo) / step).round().max(1.0) as u32;
    let x = |t: Millis| LEFT + (t - t0) as f64 / (t1 - t0) as f64 * (WIDTH - LEFT - RIGHT);
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (HEIGHT - TOP - BOTTOM);
    for i in 0..=lines {
        let v = lo + step * f64::from(i);
        let _ = write!(
            out,
            r#"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
            WIDTH - RIGHT,
            LEFT - 4.0,
            y(v) + 4.0,
            escape(&short(v)),
            y = y(v),
        );
    }
    let _ = write!(
        out,
        r#"<text x="{LEFT}" y="{}" class="tick">{}</text><text x="{}" y="{}" class="tick" text-anchor="end">{} UTC</text><text x="4" y="{}" class="unit">{}</text>"#,
        HEIGHT - 6.0,
        clock(t0),
        WIDTH - RIGHT,
        HEIGHT - 6.0,
        clock(t1),
        TOP - 10.0,
        escape(unit)
    );
    for s in series {
        if let [(t, v)] = s.points[..] {
            // One window so far: a dot, since a line of one point is not drawn.
            if v.is_finite() {
                let _ = write!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" class="{} dot"><title>{}</title></circle>"#,
                    x(t),
                    y(v),
                    s.class,
                    escape(&s.name)
                );
            }
            continue;
        }
        out.push_str(r#"<polyline fill="none" class=""#);
        out.push_str(s.class);
        out.push_str(r#"" points=""#);
        for (t, v) in s.points.iter().filter(|p| p.1.is_finite()) {
            let _ = write!(out, "{:.1},{:.1} ", x(*t), y(*v));
        }
        out.push_str(r#""><title>"#);
        out.push_str(&escape(&s.name));
        out.push_str("</title></polyline>");
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(svg: &str, class: &str) -> Vec<(f64, f64)> {
        let start = svg
            .find(&format!(r#"class="{class}" points=""#))
            .expect("the series is drawn")
            + class.len()
            + 17;
        let end = start + svg[start..].find('"').unwrap();
        svg[start..end]
            .split_whitespace()
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn series_are_scaled_into_the_frame_with_time_left_to_right_and_values_upward() {
        let svg = plot(
            "boiler-1 temperature",
            "°C",
            &[Series {
                name: "mean".into(),
                class: "a",
                points: vec![(60_000, 20.0), (120_000, 25.0), (180_000, 22.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        let p = points(&svg, "a");
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].0, LEFT);
        assert_eq!(p[2].0, WIDTH - RIGHT);
        assert!(
            p[1].1 < p[2].1 && p[2].1 < p[0].1,
            "higher values are higher up: {p:?}"
        );
        assert_eq!(p[0].1, HEIGHT - BOTTOM, "the smallest at the bottom (20)");
        assert!(p[1].1 > TOP, "25 under the top grid line, 26 (steps of 2)");
        for tick in [">20<", ">22<", ">26<"] {
            assert!(svg.contains(tick), "{tick} in {svg}");
        }
        assert!(svg.contains(">00:01<") && svg.contains(">00:03 UTC<"));
        assert!(svg.contains("<title>boiler-1 temperature</title>"));
    }

    #[test]
    fn two_series_share_one_scale_and_text_is_escaped() {
        let svg = plot(
            "a <b> & \"c\"",
            "bytes",
            &[
                Series {
                    name: "forward everything".into(),
                    class: "a",
                    points: vec![(0, 0.0), (60_000, 1_000_000.0)],
                },
                Series {
                    name: "upstream".into(),
                    class: "b",
                    points: vec![(0, 0.0), (60_000, 2_000.0)],
                },
            ],
        );
        let (a, b) = (points(&svg, "a"), points(&svg, "b"));
        assert_eq!(a[1].1, TOP);
        assert!(
            b[1].1 > HEIGHT - BOTTOM - 1.0,
            "0.2 % of the other: near the bottom"
        );
        assert!(svg.contains("a &lt;b&gt; &amp; &quot;c&quot;"));
        assert!(svg.contains(">1M<") && svg.contains(">500k<"), "{svg}");
    }

    #[test]
    fn no_data_and_odd_values_draw_without_panicking() {
        assert!(plot("x", "", &[]).contains("no data yet"));
        let flat = plot(
            "x",
            "",
            &[Series {
                name: "s".into(),
                class: "a",
                points: vec![(5, 1.0), (5, f64::NAN), (5, 1.0)],
            }],
        );
        assert_eq!(points(&flat, "a").len(), 2, "NaN is left out");
        let one = plot(
            "x",
            "",
            &[Series {
                name: "s".into(),
                class: "a",
                points: vec![(5, 1.0)],
            }],
        );
        assert!(one.contains("<circle"), "a single window is a dot: {one}");
        assert_eq!(
            (nice_step(0.8), nice_step(2665.0), nice_step(0.13)),
            (1.0, 5000.0, 0.2)
        );
        assert!(!flat.contains("NaN") && !flat.contains("inf"));
        assert_eq!(short(1_234_567.0), "1.23M");
        assert_eq!(short(12_345.0), "12.3k");
        assert_eq!(short(0.5), "0.50");
        assert_eq!(short(-40.0), "-40");
    }
}
