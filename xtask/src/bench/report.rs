//! Results, and their rendering: text tables on stdout, `report.md`, `results.json`.
//!
//! Every figure is shown with its ratio to `kernel-vxlan` measured in the same run and
//! with the same offload setting, because absolute numbers on a shared 2-core VM move by
//! ±25 % from run to run while ratios within one run are far steadier.

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    chart::{self, Series},
    measure::{Durations, Sample, Sweep},
    rows::Row,
};

/// Whether the veths of the path keep TSO, GSO and GRO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Offloads {
    On,
    Off,
}

impl Offloads {
    pub fn name(self) -> &'static str {
        match self {
            Offloads::On => "on",
            Offloads::Off => "off",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Status {
    Measured,
    Unavailable { reason: String },
}

/// One row under one offload setting.
#[derive(Clone, Debug, Serialize)]
pub struct RowResult {
    pub row: Row,
    pub offloads: Offloads,
    #[serde(flatten)]
    pub status: Status,
    pub samples: Vec<Sample>,
    /// What h1's flanneld counted by the end of this setting (cumulative), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Where and how the figures were taken.
#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    /// The workspace's commit, `+dirty` when flanneld was built from uncommitted changes.
    pub commit: String,
    /// /proc/loadavg before and after: a busy machine makes every figure noisy.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub quick: bool,
    pub repeat: u32,
    /// The message-size sweep (first round only), and the offload settings it ran under.
    pub sweep: Option<Sweep>,
    pub sweep_modes: Vec<Offloads>,
    pub durations: Durations,
    /// The CPUs the clients (c1) and the servers (c2) were pinned to.
    pub pinned: Option<[usize; 2]>,
}

#[cfg(test)]
impl Meta {
    /// A quick, one-round run's metadata with placeholder machine facts, for the tests.
    pub fn for_test(sweep: Option<Sweep>, sweep_modes: Vec<Offloads>) -> Meta {
        Meta {
            date: "d".into(),
            kernel: "k".into(),
            cpus: 2,
            cpu_model: "c".into(),
            commit: "abc".into(),
            loadavg_start: "0".into(),
            loadavg_end: "0".into(),
            quick: true,
            repeat: 1,
            sweep,
            sweep_modes,
            durations: Durations {
                iperf3: 2,
                iperf3_omit: 0,
                qperf: 1,
            },
            pinned: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub meta: Meta,
    pub results: Vec<RowResult>,
}

/// The figures of a sample, each a table.
#[derive(Clone, Copy, Debug)]
pub enum Figure {
    Iperf3,
    QperfBw,
    QperfLat,
}

impl Figure {
    pub const ALL: [Figure; 3] = [Figure::Iperf3, Figure::QperfBw, Figure::QperfLat];

    pub fn title(self) -> &'static str {
        match self {
            Figure::Iperf3 => "iperf3 single-stream TCP, Gbit/s (higher is better)",
            Figure::QperfBw => "qperf tcp_bw, Gbit/s (higher is better)",
            Figure::QperfLat => "qperf tcp_lat, µs (lower is better)",
        }
    }

    pub fn value(self, s: &Sample) -> Option<f64> {
        match self {
            Figure::Iperf3 => s.iperf3_gbps,
            Figure::QperfBw => s.qperf_bw_gbps,
            Figure::QperfLat => s.qperf_lat_us,
        }
    }

    fn format(self, v: f64) -> String {
        match self {
            Figure::QperfLat => format!("{v:.1}"),
            _ => format!("{v:.2}"),
        }
    }
}

/// Whether a measured ratio meets a target.
type Judge = dyn Fn(f64) -> bool;

/// Median, minimum and maximum of the values present.
pub fn stats(values: impl IntoIterator<Item = Option<f64>>) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.into_iter().flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    Some((median, v[0], v[n - 1]))
}

impl Report {
    fn find(&self, row: Row, off: Offloads) -> Option<&RowResult> {
        self.results
            .iter()
            .find(|r| r.row == row && r.offloads == off)
    }

    /// The median of `fig` for `row` under `off`, when it was measured.
    pub fn median(&self, row: Row, off: Offloads, fig: Figure) -> Option<f64> {
        let r = self.find(row, off)?;
        stats(r.samples.iter().map(|s| fig.value(s))).map(|(m, _, _)| m)
    }

    /// `row`'s median over `base`'s, same figure and offload setting.
    pub fn ratio(&self, row: Row, base: Row, off: Offloads, fig: Figure) -> Option<f64> {
        let b = self.median(base, off, fig).filter(|b| *b > 0.0)?;
        Some(self.median(row, off, fig)? / b)
    }

    fn rows(&self) -> Vec<Row> {
        Row::ALL
            .into_iter()
            .filter(|row| self.results.iter().any(|r| r.row == *row))
            .collect()
    }

    fn modes(&self) -> Vec<Offloads> {
        [Offloads::On, Offloads::Off]
            .into_iter()
            .filter(|m| self.results.iter().any(|r| r.offloads == *m))
            .collect()
    }

    /// One figure as a table: a row per dataplane; per offload setting the median (with
    /// min–max when repeated) and the ratio to kernel-vxlan.
    pub fn table(&self, fig: Figure) -> Vec<Vec<String>> {
        let mut header = vec!["dataplane".to_owned()];
        for m in self.modes() {
            header.push(format!("offloads {}", m.name()));
            header.push("× kernel-vxlan".to_owned());
        }
        let mut table = vec![header];
        for row in self.rows() {
            let mut line = vec![row.name().to_owned()];
            for m in self.modes() {
                line.push(self.cell(row, m, fig));
                line.push(
                    self.ratio(row, Row::KernelVxlan, m, fig)
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
                );
            }
            table.push(line);
        }
        table
    }

    fn cell(&self, row: Row, m: Offloads, fig: Figure) -> String {
        let Some(r) = self.find(row, m) else {
            return "-".to_owned();
        };
        if let Status::Unavailable { .. } = r.status {
            return "unavailable".to_owned();
        }
        match stats(r.samples.iter().map(|s| fig.value(s))) {
            None => "failed".to_owned(),
            Some((med, lo, hi)) if r.samples.len() > 1 => {
                format!(
                    "{} ({}–{})",
                    fig.format(med),
                    fig.format(lo),
                    fig.format(hi)
                )
            }
            Some((med, _, _)) => fig.format(med),
        }
    }

    /// Why rows were unavailable or failed, one line per row and reason.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.results {
            let line = match &r.status {
                Status::Unavailable { reason } => {
                    format!("{}: unavailable: {reason}", r.row.name())
                }
                Status::Measured => {
                    let errors: Vec<&str> = r
                        .samples
                        .iter()
                        .flat_map(|s| s.errors.iter().map(String::as_str))
                        .collect();
                    if errors.is_empty() {
                        continue;
                    }
                    format!(
                        "{} (offloads {}): measurement errors: {}",
                        r.row.name(),
                        r.offloads.name(),
                        errors.join("; ")
                    )
                }
            };
            // The same reason under both offload settings is said once.
            if !out.contains(&line) {
                out.push(line);
            }
        }
        out
    }

    /// What h1's flanneld counted, per row and offload setting.
    pub fn notes(&self) -> Vec<String> {
        self.results
            .iter()
            .filter_map(|r| {
                let n = r.note.as_ref()?;
                Some(format!(
                    "{} (after offloads {}): {n}",
                    r.row.name(),
                    r.offloads.name()
                ))
            })
            .collect()
    }

    /// Issue 3's targets for eBPF vxlan, each with what this run measured.
    pub fn targets(&self) -> Vec<[String; 3]> {
        let check = |v: Option<f64>, ok: &dyn Fn(f64) -> bool| match v {
            None => ("not measured".to_owned(), "-".to_owned()),
            Some(v) => (
                format!("{v:.2}×"),
                if ok(v) { "met" } else { "not met" }.to_owned(),
            ),
        };
        let e = Row::EbpfVxlan;
        let k = Row::KernelVxlan;
        let items: [(&str, Option<f64>, &Judge); 6] = [
            (
                "iperf3 ≥ 1.0× kernel-vxlan, offloads on",
                self.ratio(e, k, Offloads::On, Figure::Iperf3),
                &|v| v >= 1.0,
            ),
            (
                "iperf3 ≥ 1.3× kernel-vxlan, offloads off",
                self.ratio(e, k, Offloads::Off, Figure::Iperf3),
                &|v| v >= 1.3,
            ),
            (
                "tcp_lat ≤ 0.9× kernel-vxlan, offloads on",
                self.ratio(e, k, Offloads::On, Figure::QperfLat),
                &|v| v <= 0.9,
            ),
            (
                "tcp_lat ≤ 0.9× kernel-vxlan, offloads off",
                self.ratio(e, k, Offloads::Off, Figure::QperfLat),
                &|v| v <= 0.9,
            ),
            (
                "iperf3 within 10% of native, offloads on",
                self.ratio(e, Row::Native, Offloads::On, Figure::Iperf3),
                &|v| v >= 0.9,
            ),
            (
                "iperf3 within 10% of native, offloads off",
                self.ratio(e, Row::Native, Offloads::Off, Figure::Iperf3),
                &|v| v >= 0.9,
            ),
        ];
        items
            .into_iter()
            .map(|(what, v, ok)| {
                let (measured, verdict) = check(v, ok);
                [what.to_owned(), measured, verdict]
            })
            .collect()
    }

    /// The sweep under `m`: per measured row, the median of `tcp_bw` (Gbit/s, when `bw`)
    /// or `tcp_lat` (µs) at each message size.
    pub fn sweep_medians(&self, m: Offloads, bw: bool) -> Vec<(Row, Vec<(u64, f64)>)> {
        let mut out = Vec::new();
        for r in self.results.iter().filter(|r| r.offloads == m) {
            let mut sizes: Vec<u64> = r
                .samples
                .iter()
                .flat_map(|s| s.sweep.iter().map(|p| p.msg_size))
                .collect();
            sizes.sort_unstable();
            sizes.dedup();
            let points: Vec<(u64, f64)> = sizes
                .into_iter()
                .filter_map(|size| {
                    let values = r.samples.iter().flat_map(|s| {
                        s.sweep
                            .iter()
                            .filter(|p| p.msg_size == size)
                            .map(|p| if bw { p.bw_gbps } else { p.lat_us })
                    });
                    stats(values).map(|(med, _, _)| (size, med))
                })
                .collect();
            if !points.is_empty() {
                out.push((r.row, points));
            }
        }
        out
    }

    /// qperf over message sizes under `m`: a line per size, a column per dataplane; each
    /// value with its ratio to kernel-vxlan at the same size.
    pub fn sweep_table(&self, m: Offloads, bw: bool) -> Option<Vec<Vec<String>>> {
        let medians = self.sweep_medians(m, bw);
        let mut sizes: Vec<u64> = medians
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.is_empty() {
            return None;
        }
        let reference = medians
            .iter()
            .find(|(row, _)| *row == Row::KernelVxlan)
            .map(|(_, pts)| pts.clone())
            .unwrap_or_default();
        let mut table = vec![
            std::iter::once("msg_size".to_owned())
                .chain(medians.iter().map(|(row, _)| row.name().to_owned()))
                .collect(),
        ];
        for size in sizes {
            let base = reference
                .iter()
                .find(|p| p.0 == size)
                .map(|p| p.1)
                .filter(|b| *b > 0.0);
            let mut line = vec![size.to_string()];
            for (row, pts) in &medians {
                let Some(&(_, v)) = pts.iter().find(|p| p.0 == size) else {
                    line.push("-".to_owned());
                    continue;
                };
                let mut cell = if bw {
                    format!("{v:.3}")
                } else {
                    format!("{v:.1}")
                };
                if let Some(b) = base.filter(|_| *row != Row::KernelVxlan) {
                    let _ = write!(cell, " ({:.2}×)", v / b);
                }
                line.push(cell);
            }
            table.push(line);
        }
        Some(table)
    }

    /// The sweep charts: (file name, SVG) per offload setting and figure.
    pub fn charts(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for m in self.modes() {
            for bw in [true, false] {
                let series: Vec<Series> = self
                    .sweep_medians(m, bw)
                    .into_iter()
                    .map(|(row, points)| Series {
                        name: row.name().to_owned(),
                        points,
                    })
                    .collect();
                if series.is_empty() {
                    continue;
                }
                let unit = if bw { "Gbit/s" } else { "µs" };
                out.push((
                    chart_file(m, bw),
                    chart::svg(&sweep_title(m, bw), unit, &series),
                ));
            }
        }
        out
    }

    /// Everything, for the terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for fig in Figure::ALL {
            let _ = writeln!(out, "\n{}", fig.title());
            out += &text_table(&self.table(fig));
        }
        let _ = writeln!(out, "\nissue 3 targets for ebpf-vxlan");
        let mut targets = vec![["target".to_owned(), "measured".to_owned(), "".to_owned()]];
        targets.extend(self.targets());
        out += &text_table(&targets.iter().map(|t| t.to_vec()).collect::<Vec<_>>());
        for m in self.modes() {
            for bw in [true, false] {
                if let Some(t) = self.sweep_table(m, bw) {
                    let _ = writeln!(out, "\n{}", sweep_title(m, bw));
                    out += &text_table(&t);
                }
            }
        }
        let problems: Vec<String> = self.notes().into_iter().chain(self.problems()).collect();
        if !problems.is_empty() {
            let _ = writeln!(out);
            for p in problems {
                let _ = writeln!(out, "{p}");
            }
        }
        out
    }

    /// Everything, as `report.md`.
    pub fn markdown(&self) -> String {
        let m = &self.meta;
        let mut out = String::from("# flanneld dataplane benchmark\n\n");
        let _ = writeln!(
            out,
            "{}; commit {}; kernel {}; {} CPUs ({}); load average at start {}, at end {}.",
            m.date, m.commit, m.kernel, m.cpus, m.cpu_model, m.loadavg_start, m.loadavg_end
        );
        let _ = writeln!(
            out,
            "iperf3 -t {} -O {}, qperf -t {}; {} round(s), each setting every row up afresh \
             (median of the rounds, and min–max when repeated); {}{}.",
            m.durations.iperf3,
            m.durations.iperf3_omit,
            m.durations.qperf,
            m.repeat,
            m.pinned.map_or_else(
                || "not pinned".to_owned(),
                |[c, s]| format!("clients on CPU {c}, servers on CPU {s}")
            ),
            if m.quick { "; --quick" } else { "" }
        );
        match m.sweep {
            Some(sw) => {
                let modes: Vec<&str> = m.sweep_modes.iter().map(|o| o.name()).collect();
                let _ = writeln!(
                    out,
                    "Sweep: qperf -t {} -oo {} tcp_bw tcp_lat ({} sizes), in the first round, \
                     offloads {}.\n",
                    sw.secs,
                    sw.spec(),
                    sw.sizes().len(),
                    modes.join(" and ")
                );
            }
            None => out += "No message-size sweep (--no-sweep).\n\n",
        }
        for fig in Figure::ALL {
            let _ = writeln!(out, "## {}\n", fig.title());
            out += &markdown_table(&self.table(fig));
            out += "\n";
        }
        out += "## Issue 3 targets for ebpf-vxlan\n\n";
        let mut targets = vec![[
            "target".to_owned(),
            "measured".to_owned(),
            "verdict".to_owned(),
        ]];
        targets.extend(self.targets());
        out += &markdown_table(&targets.iter().map(|t| t.to_vec()).collect::<Vec<_>>());
        for mode in self.modes() {
            for bw in [true, false] {
                if let Some(t) = self.sweep_table(mode, bw) {
                    let title = sweep_title(mode, bw);
                    let _ = writeln!(out, "\n## {title}\n");
                    let _ = writeln!(out, "![{title}]({})\n", chart_file(mode, bw));
                    out += &markdown_table(&t);
                }
            }
        }
        let notes = self.notes();
        if !notes.is_empty() {
            out += "\n## Counters\n\n";
            for n in notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        let problems = self.problems();
        if !problems.is_empty() {
            out += "\n## Unavailable rows and errors\n\n";
            for p in problems {
                let _ = writeln!(out, "- {p}");
            }
        }
        out
    }
}

/// The SVG next to report.md for a sweep figure.
pub fn chart_file(m: Offloads, bw: bool) -> String {
    format!(
        "sweep-{}-offloads-{}.svg",
        if bw { "tcp_bw" } else { "tcp_lat" },
        m.name()
    )
}

pub fn sweep_title(m: Offloads, bw: bool) -> String {
    format!(
        "qperf {} by msg_size, offloads {}, {}",
        if bw { "tcp_bw" } else { "tcp_lat" },
        m.name(),
        if bw { "Gbit/s" } else { "µs" }
    )
}

/// Left-aligned columns separated by two spaces.
pub fn text_table(t: &[Vec<String>]) -> String {
    let cols = t.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            t.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in t {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

/// A GitHub-flavoured markdown table; the first line is the header.
pub fn markdown_table(t: &[Vec<String>]) -> String {
    let mut out = String::new();
    for (i, r) in t.iter().enumerate() {
        let _ = writeln!(out, "| {} |", r.join(" | "));
        if i == 0 {
            let _ = writeln!(out, "|{}", "---|".repeat(r.len()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(g: f64, lat: f64) -> Sample {
        Sample {
            iperf3_gbps: Some(g),
            qperf_bw_gbps: Some(g),
            qperf_lat_us: Some(lat),
            ..Sample::default()
        }
    }

    fn report() -> Report {
        let measured = |row, off, samples| RowResult {
            row,
            offloads: off,
            status: Status::Measured,
            samples,
            note: None,
        };
        Report {
            meta: Meta::for_test(None, Vec::new()),
            results: vec![
                measured(Row::KernelVxlan, Offloads::On, vec![sample(10.0, 20.0)]),
                measured(
                    Row::EbpfVxlan,
                    Offloads::On,
                    vec![sample(12.0, 17.0), sample(11.0, 19.0), sample(13.0, 18.0)],
                ),
                RowResult {
                    row: Row::EbpfHostgw,
                    offloads: Offloads::On,
                    status: Status::Unavailable {
                        reason: "not wired".into(),
                    },
                    samples: vec![],
                    note: None,
                },
            ],
        }
    }

    #[test]
    fn stats_median_min_max() {
        assert_eq!(
            stats([Some(3.0), None, Some(1.0), Some(2.0)]),
            Some((2.0, 1.0, 3.0))
        );
        assert_eq!(stats([Some(4.0), Some(1.0)]), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats([None]), None);
    }

    #[test]
    fn ratios_and_cells() {
        let r = report();
        let ratio = r.ratio(
            Row::EbpfVxlan,
            Row::KernelVxlan,
            Offloads::On,
            Figure::Iperf3,
        );
        assert!((ratio.unwrap() - 1.2).abs() < 1e-9);
        let t = r.table(Figure::QperfLat);
        assert_eq!(t[0], ["dataplane", "offloads on", "× kernel-vxlan"]);
        assert_eq!(t[1], ["kernel-vxlan", "20.0", "1.00"]);
        assert_eq!(t[2], ["ebpf-vxlan", "18.0 (17.0–19.0)", "0.90"]);
        assert_eq!(t[3], ["ebpf-hostgw", "unavailable", "-"]);
        assert_eq!(r.problems(), ["ebpf-hostgw: unavailable: not wired"]);
    }

    #[test]
    fn targets_are_judged() {
        let t = report().targets();
        assert_eq!(t[0][1..], ["1.20×".to_owned(), "met".to_owned()]);
        assert_eq!(t[1][1..], ["not measured".to_owned(), "-".to_owned()]);
        assert_eq!(t[2][1..], ["0.90×".to_owned(), "met".to_owned()]);
    }

    #[test]
    fn tables_render() {
        let t = vec![
            vec!["a".to_owned(), "bb".to_owned()],
            vec!["ccc".to_owned(), "d".to_owned()],
        ];
        assert_eq!(text_table(&t), "  a    bb\n  ccc  d\n");
        assert_eq!(markdown_table(&t), "| a | bb |\n|---|---|\n| ccc | d |\n");
    }
}
