//! The measurements: iperf3 and qperf between the two containers, and their parsers.
//!
//! Servers run in c2, clients in c1, so every figure crosses c1 → h1 → underlay → h2 → c2
//! (and back for the acknowledgements and latency replies).

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::topo::{Ns, Proc, run_bounded, wait_listening};

const IPERF3_PORT: u16 = 5201;
/// qperf's control port; data ports are negotiated on top of it.
const QPERF_PORT: u16 = 19765;

/// How long each tool runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Durations {
    /// iperf3 `-t`, seconds.
    pub iperf3: u32,
    /// iperf3 `-O`: seconds of slow start left out of the figure.
    pub iperf3_omit: u32,
    /// qperf `-t` per test, seconds.
    pub qperf: u32,
}

/// A qperf message-size sweep, `-oo msg_size:1:64K:*STEP`, of tcp_bw and tcp_lat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sweep {
    /// 2 as the issue asks (17 sizes); a larger power of two for fewer sizes.
    pub step: u32,
    /// qperf `-t` per size and test, seconds. qperf takes whole seconds only, and a
    /// sweep runs 2 tests per size, so this is what a sweep costs per size.
    pub secs: u32,
}

impl Sweep {
    /// What qperf is given after `-oo`.
    pub fn spec(self) -> String {
        format!("msg_size:1:64K:*{}", self.step)
    }

    /// The message sizes qperf goes through: 1, STEP, STEP², ... up to 64 KiB.
    pub fn sizes(self) -> Vec<u64> {
        let step = u64::from(self.step.max(2));
        std::iter::successors(Some(1u64), |s| Some(s * step))
            .take_while(|&s| s <= 65536)
            .collect()
    }
}

/// One repetition's figures. `None` where that tool failed (its error is in `errors`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub iperf3_gbps: Option<f64>,
    pub iperf3_retransmits: Option<u64>,
    pub qperf_bw_gbps: Option<f64>,
    pub qperf_lat_us: Option<f64>,
    /// Only in the samples the sweep ran for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sweep: Vec<SweepPoint>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// qperf at one message size.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SweepPoint {
    pub msg_size: u64,
    pub bw_gbps: Option<f64>,
    pub lat_us: Option<f64>,
}

/// The servers in c2, for the whole of a row.
pub struct Servers {
    _iperf3: Proc,
    _qperf: Proc,
}

impl Servers {
    /// iperf3 and qperf servers in `c2`, on `cpu` if given.
    pub fn start(c2: &Ns, cpu: Option<usize>, dir: &Path) -> Result<Servers> {
        let mut iperf3 = tool(c2, "iperf3", cpu);
        iperf3.args(["-s", "-p", &IPERF3_PORT.to_string()]);
        let iperf3 = Proc::spawn(iperf3, dir.join("iperf3-server.log"))?;
        let qperf = Proc::spawn(tool(c2, "qperf", cpu), dir.join("qperf-server.log"))?;
        for port in [IPERF3_PORT, QPERF_PORT] {
            if !wait_listening(c2, port)? {
                bail!("no server is listening on port {port} in c2");
            }
        }
        Ok(Servers {
            _iperf3: iperf3,
            _qperf: qperf,
        })
    }
}

/// `program` in `ns`, pinned to `cpu` with taskset when given. Pinning client and server
/// to CPUs of their own keeps each repetition from landing on a different placement,
/// which on a 2-CPU VM moves tcp_lat between about 12 and 30 µs from one run to the next.
fn tool(ns: &Ns, program: &str, cpu: Option<usize>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut cmd = ns.command("taskset");
            cmd.args(["-c", &cpu.to_string(), program]);
            cmd
        }
        None => ns.command(program),
    }
}

/// How the clients run.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub durations: Durations,
    /// Also a message-size sweep.
    pub sweep: Option<Sweep>,
    /// The CPU the client is pinned to.
    pub cpu: Option<usize>,
}

/// Measures once from `c1` to `target` (c2's address).
pub fn sample(c1: &Ns, target: &str, c: Client, dir: &Path) -> Sample {
    let mut s = Sample::default();
    match iperf3(c1, target, c, dir) {
        Ok((gbps, retr)) => {
            s.iperf3_gbps = Some(gbps);
            s.iperf3_retransmits = retr;
        }
        Err(e) => s.errors.push(format!("iperf3: {e:#}")),
    }
    // qperf's defaults are 64 KiB messages for tcp_bw and 1 B for tcp_lat: a sweep as
    // long per size as the plain run measures those two as well, so the plain run is
    // left out (it would repeat them).
    let from_sweep = c.sweep.filter(|sw| sw.secs == c.durations.qperf);
    if from_sweep.is_none() {
        match qperf(c1, target, c.durations.qperf, c.cpu, None, dir) {
            Ok(blocks) => {
                s.qperf_bw_gbps = blocks.iter().find_map(|b| b.bw_gbps);
                s.qperf_lat_us = blocks.iter().find_map(|b| b.lat_us);
            }
            Err(e) => s.errors.push(format!("qperf: {e:#}")),
        }
    }
    if let Some(sweep) = c.sweep {
        match qperf(c1, target, sweep.secs, c.cpu, Some(sweep), dir) {
            Ok(blocks) => {
                s.sweep = merge_sweep(&blocks);
                let missing: Vec<String> = sweep
                    .sizes()
                    .into_iter()
                    .filter(|&size| {
                        !s.sweep.iter().any(|p| {
                            p.msg_size == size && p.bw_gbps.is_some() && p.lat_us.is_some()
                        })
                    })
                    .map(|size| size.to_string())
                    .collect();
                if !missing.is_empty() {
                    s.errors.push(format!(
                        "qperf sweep: no tcp_bw or tcp_lat at msg_size {}",
                        missing.join(", ")
                    ));
                }
            }
            Err(e) => s.errors.push(format!("qperf sweep: {e:#}")),
        }
    }
    if from_sweep.is_some() {
        let at = |size: u64| s.sweep.iter().find(|p| p.msg_size == size);
        s.qperf_bw_gbps = at(QPERF_BW_DEFAULT_SIZE).and_then(|p| p.bw_gbps);
        s.qperf_lat_us = at(QPERF_LAT_DEFAULT_SIZE).and_then(|p| p.lat_us);
    }
    s
}

/// qperf's default `msg_size` for tcp_bw and for tcp_lat.
const QPERF_BW_DEFAULT_SIZE: u64 = 65536;
const QPERF_LAT_DEFAULT_SIZE: u64 = 1;

/// Single-stream TCP: Gbit/s received, and the sender's retransmits.
fn iperf3(c1: &Ns, target: &str, c: Client, dir: &Path) -> Result<(f64, Option<u64>)> {
    let d = c.durations;
    let mut cmd = tool(c1, "iperf3", c.cpu);
    cmd.args(["-c", target, "-p", &IPERF3_PORT.to_string(), "-J"])
        .args([
            "-t",
            &d.iperf3.to_string(),
            "-O",
            &d.iperf3_omit.to_string(),
        ]);
    // Generous: connect, omit, run and the JSON summary, on a loaded 2-core machine.
    let timeout = Duration::from_secs(u64::from(d.iperf3 + d.iperf3_omit) * 2 + 20);
    let out = run_bounded(cmd, &dir.join("iperf3.json"), timeout);
    // iperf3 -J reports its own errors in the JSON and exits non-zero; prefer those.
    let json = match out {
        Ok(json) => json,
        Err(e) => {
            let json = std::fs::read_to_string(dir.join("iperf3.json")).unwrap_or_default();
            return Err(parse_iperf3(&json).err().unwrap_or(e));
        }
    };
    parse_iperf3(&json)
}

/// `end.sum_received.bits_per_second` (what arrived, not what was sent) in Gbit/s.
pub fn parse_iperf3(json: &str) -> Result<(f64, Option<u64>)> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{err}");
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("no end.sum_received.bits_per_second in iperf3's JSON")?;
    let retr = v
        .pointer("/end/sum_sent/retransmits")
        .and_then(serde_json::Value::as_u64);
    Ok((bps / 1e9, retr))
}

/// Runs `qperf TARGET -t SECS [-vu -oo SWEEP] tcp_bw tcp_lat` and parses its blocks.
fn qperf(
    c1: &Ns,
    target: &str,
    secs: u32,
    cpu: Option<usize>,
    sweep: Option<Sweep>,
    dir: &Path,
) -> Result<Vec<QperfBlock>> {
    let mut cmd = tool(c1, "qperf", cpu);
    cmd.args([target, "-t", &secs.to_string()]);
    let mut runs = 2;
    if let Some(sw) = sweep {
        // -vu prints msg_size with each result, which pairs them up.
        cmd.args(["-vu", "-oo", &sw.spec()]);
        runs *= sw.sizes().len() as u64;
    }
    cmd.args(["tcp_bw", "tcp_lat"]);
    let timeout = Duration::from_secs(runs * (u64::from(secs) + 3) + 20);
    let file = if sweep.is_some() {
        "qperf-sweep.out"
    } else {
        "qperf.out"
    };
    let out = run_bounded(cmd, &dir.join(file), timeout)?;
    let blocks = parse_qperf(&out);
    if blocks.is_empty() {
        bail!("no results in qperf's output: {out:?}");
    }
    Ok(blocks)
}

/// One `test:` block of qperf's output.
#[derive(Debug, Default, PartialEq)]
pub struct QperfBlock {
    pub test: String,
    pub bw_gbps: Option<f64>,
    pub lat_us: Option<f64>,
    pub msg_size: Option<u64>,
}

/// Parses qperf's human output:
///
/// ```text
/// tcp_bw:
///     bw        =  1.71 MB/sec
///     msg_size  =     2 KiB (2,048)
/// tcp_lat:
///     latency   =  32.8 us
/// ```
pub fn parse_qperf(out: &str) -> Vec<QperfBlock> {
    let mut blocks: Vec<QperfBlock> = Vec::new();
    for line in out.lines() {
        if !line.starts_with(' ') {
            if let Some(test) = line.trim().strip_suffix(':') {
                blocks.push(QperfBlock {
                    test: test.to_owned(),
                    ..QperfBlock::default()
                });
            }
            continue;
        }
        let (Some(block), Some((key, value))) = (blocks.last_mut(), line.split_once('=')) else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "bw" => block.bw_gbps = parse_bw_gbps(value),
            "latency" => block.lat_us = parse_latency_us(value),
            "msg_size" => block.msg_size = parse_size(value),
            _ => {}
        }
    }
    blocks
}

/// `1.71 MB/sec` → Gbit/s. qperf's units are decimal (KB = 1000 bytes); with `-ub` it
/// prints bits (`Gb/sec`).
fn parse_bw_gbps(v: &str) -> Option<f64> {
    let (num, unit) = v.split_once(' ')?;
    let num: f64 = num.trim().parse().ok()?;
    let (prefix, bits) = match unit.trim().strip_suffix("/sec")? {
        u if u.ends_with("bytes") => (u.trim_end_matches("bytes"), false),
        u if u.ends_with('B') => (u.trim_end_matches('B'), false),
        u if u.ends_with("bits") => (u.trim_end_matches("bits"), true),
        u => (u.strip_suffix('b')?, true),
    };
    let mult = match prefix {
        "" => 1.0,
        "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => return None,
    };
    Some(num * mult * if bits { 1.0 } else { 8.0 } / 1e9)
}

/// `32.8 us` → µs.
fn parse_latency_us(v: &str) -> Option<f64> {
    let (num, unit) = v.split_once(' ')?;
    let num: f64 = num.trim().parse().ok()?;
    let mult = match unit.trim() {
        "ns" => 1e-3,
        "us" => 1.0,
        "ms" => 1e3,
        "sec" | "s" => 1e6,
        _ => return None,
    };
    Some(num * mult)
}

/// `512 bytes` → 512; `2 KiB (2,048)` → 2048 (the exact figure in parentheses wins).
fn parse_size(v: &str) -> Option<u64> {
    if let Some((_, exact)) = v.split_once('(') {
        return exact
            .trim_end_matches(')')
            .replace(',', "")
            .trim()
            .parse()
            .ok();
    }
    let (num, unit) = v.split_once(' ')?;
    let num: u64 = num.trim().parse().ok()?;
    let mult = match unit.trim() {
        "bytes" | "byte" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        _ => return None,
    };
    Some(num * mult)
}

/// Pairs the `tcp_bw` and `tcp_lat` blocks of a sweep by message size.
fn merge_sweep(blocks: &[QperfBlock]) -> Vec<SweepPoint> {
    let mut points: Vec<SweepPoint> = Vec::new();
    for b in blocks {
        let Some(size) = b.msg_size else { continue };
        let idx = match points.iter().position(|p| p.msg_size == size) {
            Some(i) => i,
            None => {
                points.push(SweepPoint {
                    msg_size: size,
                    bw_gbps: None,
                    lat_us: None,
                });
                points.len() - 1
            }
        };
        let p = &mut points[idx];
        p.bw_gbps = p.bw_gbps.or(b.bw_gbps);
        p.lat_us = p.lat_us.or(b.lat_us);
    }
    points.sort_by_key(|p| p.msg_size);
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9 * b.abs().max(1.0))
    }

    #[test]
    fn qperf_plain_output() {
        let out = "tcp_bw:\n    bw  =  3.07 GB/sec\ntcp_lat:\n    latency  =  10.5 us\n";
        let b = parse_qperf(out);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].test, "tcp_bw");
        assert!(close(b[0].bw_gbps, 24.56));
        assert!(close(b[1].lat_us, 10.5));
    }

    #[test]
    fn qperf_units() {
        assert!(close(parse_bw_gbps("1.71 MB/sec"), 0.01368));
        assert!(close(parse_bw_gbps("25.3 Gb/sec"), 25.3));
        assert!(close(parse_bw_gbps("900 bytes/sec"), 7.2e-6));
        assert_eq!(parse_bw_gbps("12 furlongs"), None);
        assert!(close(parse_latency_us("1.5 ms"), 1500.0));
        assert!(close(parse_latency_us("800 ns"), 0.8));
        assert_eq!(parse_size("512 bytes"), Some(512));
        assert_eq!(parse_size("2 KiB (2,048)"), Some(2048));
        assert_eq!(parse_size("64 KiB"), Some(65536));
    }

    #[test]
    fn qperf_sweep_is_paired_by_size() {
        let out = "tcp_bw:\n    bw        =  1.71 MB/sec\n    msg_size  =     1 bytes\n\
                   tcp_bw:\n    bw        =  2 KB/sec\n    msg_size  =     2 KiB (2,048)\n\
                   tcp_lat:\n    latency   =  32.8 us\n    msg_size  =     1 bytes\n\
                   tcp_lat:\n    latency   =  6 us\n    msg_size  =     2 KiB (2,048)\n";
        let points = merge_sweep(&parse_qperf(out));
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].msg_size, 1);
        assert!(close(points[0].lat_us, 32.8));
        assert_eq!(points[1].msg_size, 2048);
        assert!(close(points[1].bw_gbps, 1.6e-5));
        assert!(close(points[1].lat_us, 6.0));
    }

    #[test]
    fn sweep_sizes() {
        let full = Sweep { step: 2, secs: 1 };
        assert_eq!(full.spec(), "msg_size:1:64K:*2");
        let sizes = full.sizes();
        assert_eq!(sizes.len(), 17);
        assert_eq!((sizes[0], sizes[16]), (1, 65536));
        assert_eq!(
            Sweep { step: 16, secs: 1 }.sizes(),
            [1, 16, 256, 4096, 65536]
        );
    }

    #[test]
    fn iperf3_json() {
        let json = r#"{"end":{"sum_sent":{"bits_per_second":2.1e10,"retransmits":3},
                       "sum_received":{"bits_per_second":2.0e10}}}"#;
        let (g, r) = parse_iperf3(json).unwrap();
        assert!((g - 20.0).abs() < 1e-9);
        assert_eq!(r, Some(3));
        let err = parse_iperf3(r#"{"start":{},"error":"unable to connect to server"}"#);
        assert!(format!("{:#}", err.unwrap_err()).contains("unable to connect"));
        assert!(parse_iperf3("").is_err());
    }
}
