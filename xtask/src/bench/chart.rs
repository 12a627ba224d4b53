//! SVG line charts of a qperf sweep: a figure against message size, a line per dataplane.
//!
//! Written by hand (a few dozen elements) rather than with a plotting crate: xtask must
//! stay small enough to build on a fresh machine before anything else is installed.

use std::fmt::Write as _;

/// One line of a chart: a dataplane's (msg_size, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// Distinguishable on white, in row order: one per row the bench has, so no two lines
/// share a colour (past ten, dashes tell them apart).
const COLORS: [&str; 10] = [
    "#4e79a7", "#000000", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
    "#9c755f", "#ff9da7",
];

/// An SVG chart titled `title` with the y axis labelled `unit`; x is log2(msg_size),
/// y is log10: bandwidth spans four decades from 1 B to 64 KiB messages, and one slow
/// dataplane's latency would flatten every other line on a linear axis.
pub fn svg(title: &str, unit: &str, series: &[Series]) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let xmax = all().map(|p| log2(p.0)).fold(1.0, f64::max);
    let (lo, hi) = bounds(all().map(|p| p.1));
    let x = |size: u64| LEFT + log2(size) / xmax * (W - LEFT - RIGHT);
    // Values at or below the axis' floor (a zero) sit on it.
    let y = |v: f64| {
        let f = (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
        H - BOTTOM - f * (H - TOP - BOTTOM)
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        escape(title)
    );
    // Grid: 1, 2 and 5 of every decade; the decades darker.
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade < hi * 1.001 {
        for (m, stroke) in [(1.0, "#bbb"), (2.0, "#eee"), (5.0, "#eee")] {
            let v = decade * m;
            if v < lo * 0.999 || v > hi * 1.001 {
                continue;
            }
            let _ = writeln!(
                out,
                "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{stroke}\"/>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                W - RIGHT,
                LEFT - 6.0,
                y(v) + 4.0,
                trim(v),
                y = y(v),
            );
        }
        decade *= 10.0;
    }
    let mut size = 1u64;
    while log2(size) <= xmax {
        let _ = writeln!(
            out,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1}\" y2=\"{2}\" stroke=\"#ddd\"/>\
             <text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>",
            x(size),
            TOP,
            H - BOTTOM,
            H - BOTTOM + 16.0,
            size_label(size)
        );
        size *= 4;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">message size, bytes</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        H - 12.0
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}, log scale</text>"#,
        (H - BOTTOM + TOP) / 2.0,
        escape(unit)
    );
    // Lines and legend.
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if i >= COLORS.len() {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(m, v)| format!("{:.1},{:.1}", x(m), y(v)))
            .collect();
        // data-name says which series a line is, for readers and for `xtask test`.
        let name = escape(&s.name);
        let _ = writeln!(
            out,
            r#"<polyline data-name="{name}" fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"><title>{name}</title></polyline>"#,
            pts.join(" ")
        );
        for &(m, v) in &s.points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#,
                x(m),
                y(v)
            );
        }
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = W - RIGHT + 12.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/><text x="{}" y="{}">{name}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
        );
    }
    out += "</svg>\n";
    out
}

fn log2(v: u64) -> f64 {
    (v.max(1) as f64).log2()
}

/// The y axis' bounds: 1, 2 or 5 times a power of ten, the largest at or below the
/// smallest positive value and the smallest at or above the largest; (1, 10) when there
/// are no positive values.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (min, max) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if max <= 0.0 {
        return (1.0, 10.0);
    }
    let steps = |v: f64| {
        let d = 10f64.powf(v.log10().floor());
        [d, 2.0 * d, 5.0 * d, 10.0 * d]
    };
    // A hair of slack, so that 0.001 computed as 10^-3 counts as 0.001.
    let lo = steps(min)
        .into_iter()
        .rev()
        .find(|&c| c <= min * 1.000_001)
        .unwrap_or(min);
    let hi = steps(max)
        .into_iter()
        .find(|&c| c >= max / 1.000_001)
        .unwrap_or(max);
    (lo, if hi > lo { hi } else { lo * 2.0 })
}

/// A tick value without needless decimals (down to 0.0001).
fn trim(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// 1024 → `1K`, 65536 → `64K`.
fn size_label(v: u64) -> String {
    if v >= 1024 && v.is_multiple_of(1024) {
        format!("{}K", v / 1024)
    } else {
        v.to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_helpers() {
        let b = |v: &[f64]| {
            let (lo, hi) = bounds(v.iter().copied());
            (trim(lo), trim(hi))
        };
        let s = |lo: &str, hi: &str| (lo.to_owned(), hi.to_owned());
        assert_eq!(b(&[0.004, 12.0]), s("0.002", "20"));
        assert_eq!(b(&[58.0, 1880.0]), s("50", "2000"));
        assert_eq!(b(&[0.001, 10.0]), s("0.001", "10"));
        assert_eq!(b(&[1.0]), s("1", "2"));
        assert_eq!(b(&[0.0, f64::NAN]), s("1", "10"));
        assert_eq!(trim(0.002), "0.002");
        assert_eq!(trim(2.5), "2.5");
        assert_eq!(trim(4.0), "4");
        assert_eq!(size_label(65536), "64K");
        assert_eq!(size_label(16), "16");
    }

    #[test]
    fn chart_has_a_line_per_series() {
        let s = [
            Series {
                name: "native".into(),
                points: vec![(1, 0.1), (2, 0.2), (65536, 12.0)],
            },
            Series {
                name: "kernel-vxlan <ref>".into(),
                points: vec![(1, 0.1), (65536, 10.0)],
            },
        ];
        let svg = svg("tcp_bw", "Gbit/s", &s);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(r#"<polyline data-name="native""#));
        assert!(svg.contains("kernel-vxlan &lt;ref&gt;"));
        assert!(svg.contains(">64K<"));
    }
}
