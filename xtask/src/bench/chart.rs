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
/// Distinguishable on white, in row order.
const COLORS: [&str; 6] = [
    "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#a6761d",
];

/// An SVG chart titled `title` with the y axis labelled `unit`; x is log2(msg_size).
pub fn svg(title: &str, unit: &str, series: &[Series]) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let xmax = all().map(|p| log2(p.0)).fold(1.0, f64::max);
    let ymax = nice_max(all().map(|p| p.1).fold(0.0, f64::max));
    let x = |size: u64| LEFT + log2(size) / xmax * (W - LEFT - RIGHT);
    let y = |v: f64| H - BOTTOM - v / ymax * (H - TOP - BOTTOM);

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
    // Axes and grid.
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            trim(v),
            y = y(v),
        );
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
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (H - BOTTOM + TOP) / 2.0,
        escape(unit)
    );
    // Lines and legend.
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(m, v)| format!("{:.1},{:.1}", x(m), y(v)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = W - RIGHT + 12.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    out += "</svg>\n";
    out
}

fn log2(v: u64) -> f64 {
    (v.max(1) as f64).log2()
}

/// A round upper bound for the y axis: 1, 2 or 5 times a power of ten.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

/// A tick value without needless decimals.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_helpers() {
        assert_eq!(nice_max(13.2), 20.0);
        assert_eq!(nice_max(0.7), 1.0);
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(250.0), 500.0);
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
        assert!(svg.contains("kernel-vxlan &lt;ref&gt;"));
        assert!(svg.contains(">64K<"));
    }
}
