//! What `cargo xtask test` requires of a bench run's outputs: every row in the report,
//! and for every measured row its sweep in the tables and a line in each chart.
//!
//! It reads the files as written (report.md, results.json, the SVGs), not the in-memory
//! report, so a chart that was never written or a table that lost a row fails it.

use std::{fs, path::Path};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{
    measure::Sweep,
    report::{Offloads, chart_file, sweep_title},
    rows::Row,
};

/// The problems with the outputs in `dir`; empty when they are complete.
pub fn check_outputs(dir: &Path) -> Result<Vec<String>> {
    let read = |name: &str| {
        fs::read_to_string(dir.join(name)).with_context(|| format!("read {name} of the bench"))
    };
    let report = read("report.md")?;
    let results: Value = serde_json::from_str(&read("results.json")?)
        .context("results.json of the bench is not JSON")?;
    let mut problems = Vec::new();

    let missing: Vec<&str> = Row::ALL
        .iter()
        .map(|r| r.name())
        .filter(|name| !report.contains(&format!("| {name} |")))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("the report lacks rows: {}", missing.join(", ")));
    }

    let Some(sweep) = results["meta"]["sweep"].as_object() else {
        problems.push("results.json says no sweep ran".to_owned());
        return Ok(problems);
    };
    let sweep = Sweep {
        step: sweep.get("step").and_then(Value::as_u64).unwrap_or(0) as u32,
        secs: sweep.get("secs").and_then(Value::as_u64).unwrap_or(0) as u32,
    };
    let sizes = sweep.sizes();
    let modes: Vec<Offloads> = results["meta"]["sweep_modes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m.as_str() {
            Some("on") => Some(Offloads::On),
            Some("off") => Some(Offloads::Off),
            _ => None,
        })
        .collect();
    if modes.is_empty() {
        problems.push("results.json names no offload setting for the sweep".to_owned());
    }
    for m in modes {
        let measured: Vec<&str> = results["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["offloads"] == m.name() && r["status"] == "measured")
            .filter_map(|r| r["row"].as_str())
            .collect();
        if measured.is_empty() {
            problems.push(format!("no row was measured with offloads {}", m.name()));
            continue;
        }
        for bw in [true, false] {
            let title = sweep_title(m, bw);
            problems.extend(check_table(&report, &title, &measured, &sizes));
            let file = chart_file(m, bw);
            if !report.contains(&format!("]({file})")) {
                problems.push(format!("the report does not link {file}"));
            }
            match fs::read_to_string(dir.join(&file)) {
                Ok(svg) => problems.extend(check_chart(&file, &svg, &measured, sizes.len())),
                Err(e) => problems.push(format!("chart {file}: {e}")),
            }
        }
    }
    Ok(problems)
}

/// The markdown table under `## {title}`: a column per measured row, a line per size,
/// a figure in every cell.
fn check_table(report: &str, title: &str, rows: &[&str], sizes: &[u64]) -> Vec<String> {
    let heading = format!("## {title}");
    let Some(at) = report.find(&heading) else {
        return vec![format!("the report has no table {title:?}")];
    };
    let table: Vec<Vec<&str>> = report[at + heading.len()..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    let Some(header) = table.first() else {
        return vec![format!("{title}: no table under the heading")];
    };
    let mut problems = Vec::new();
    for row in rows {
        let Some(col) = header.iter().position(|h| h == row) else {
            problems.push(format!("{title}: no column for {row}"));
            continue;
        };
        for size in sizes {
            let cell = table
                .iter()
                .find(|l| l.first() == Some(&size.to_string().as_str()))
                .and_then(|l| l.get(col));
            let figure = cell.and_then(|c| c.split_whitespace().next()?.parse::<f64>().ok());
            if figure.is_none() {
                problems.push(format!("{title}: {row} has no figure at msg_size {size}"));
            }
        }
    }
    problems
}

/// A chart is an SVG with exactly one line per measured row, each through every size.
fn check_chart(file: &str, svg: &str, rows: &[&str], points: usize) -> Vec<String> {
    let mut problems = Vec::new();
    if !svg.starts_with("<svg") || !svg.trim_end().ends_with("</svg>") {
        problems.push(format!("chart {file} is not an SVG document"));
    }
    let lines = svg.matches("<polyline").count();
    if lines != rows.len() {
        problems.push(format!(
            "chart {file} has {lines} lines for {} measured rows",
            rows.len()
        ));
    }
    for row in rows {
        let tag = format!("<polyline data-name=\"{row}\"");
        let found: Vec<&str> = svg.match_indices(&tag).map(|(i, _)| &svg[i..]).collect();
        let [line] = found[..] else {
            problems.push(format!(
                "chart {file} has {} lines for {row}, not one",
                found.len()
            ));
            continue;
        };
        let n = line
            .split_once("points=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or(0, |(pts, _)| pts.split_whitespace().count());
        if n != points {
            problems.push(format!(
                "chart {file}: the line of {row} has {n} points, not {points}"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        measure::{Sample, SweepPoint},
        report::{Meta, Report, RowResult, Status},
    };

    fn report(sweep: Sweep) -> Report {
        let sample = |scale: f64| Sample {
            iperf3_gbps: Some(scale),
            qperf_bw_gbps: Some(scale),
            qperf_lat_us: Some(30.0 / scale),
            sweep: sweep
                .sizes()
                .into_iter()
                .map(|s| SweepPoint {
                    msg_size: s,
                    bw_gbps: Some(scale * s as f64 / 65536.0),
                    lat_us: Some(30.0 + s as f64 / 1000.0),
                })
                .collect(),
            ..Sample::default()
        };
        let mut results: Vec<RowResult> = Row::ALL
            .iter()
            .map(|&row| RowResult {
                row,
                offloads: Offloads::On,
                status: Status::Unavailable {
                    reason: "not here".into(),
                },
                samples: Vec::new(),
                note: None,
            })
            .collect();
        for (r, scale) in [(0, 12.0), (1, 10.0), (3, 11.0)] {
            results[r].status = Status::Measured;
            results[r].samples = vec![sample(scale)];
        }
        Report {
            meta: Meta::for_test(Some(sweep), vec![Offloads::On]),
            results,
        }
    }

    #[test]
    fn complete_outputs_pass_and_damaged_ones_fail() {
        let sweep = Sweep { step: 16, secs: 1 };
        let dir = tempfile::tempdir().unwrap();
        crate::bench::write_outputs(&report(sweep), Some(dir.path().to_owned())).unwrap();
        assert_eq!(check_outputs(dir.path()).unwrap(), Vec::<String>::new());

        // A chart without ebpf-vxlan's line.
        let file = dir.path().join("sweep-tcp_lat-offloads-on.svg");
        let svg = fs::read_to_string(&file).unwrap();
        let damaged: String = svg
            .lines()
            .filter(|l| !l.contains("data-name=\"ebpf-vxlan\""))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&file, damaged).unwrap();
        let problems = check_outputs(dir.path()).unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("0 lines for ebpf-vxlan")),
            "{problems:?}"
        );

        // No chart at all.
        fs::remove_file(dir.path().join("sweep-tcp_bw-offloads-on.svg")).unwrap();
        let problems = check_outputs(dir.path()).unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("chart sweep-tcp_bw-offloads-on.svg:")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_measured_row_without_its_sweep_fails() {
        let sweep = Sweep { step: 16, secs: 1 };
        let mut r = report(sweep);
        r.results[3].samples[0].sweep.clear();
        let dir = tempfile::tempdir().unwrap();
        crate::bench::write_outputs(&r, Some(dir.path().to_owned())).unwrap();
        let problems = check_outputs(dir.path()).unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("no column for ebpf-vxlan")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("0 lines for ebpf-vxlan")),
            "{problems:?}"
        );
    }

    #[test]
    fn no_sweep_fails() {
        let mut r = report(Sweep { step: 16, secs: 1 });
        r.meta.sweep = None;
        let dir = tempfile::tempdir().unwrap();
        crate::bench::write_outputs(&r, Some(dir.path().to_owned())).unwrap();
        assert_eq!(
            check_outputs(dir.path()).unwrap(),
            ["results.json says no sweep ran"]
        );
    }
}
