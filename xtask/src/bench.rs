//! `cargo xtask bench`: throughput and latency between two containers, per dataplane.
//!
//! The topology is the smoke run's, plus a container behind each host:
//!
//! ```text
//!   flbench-ul-PID   bridge br0 10.98.0.1/24, etcd on http://10.98.0.1:2379
//!     ├── veth ── flbench-h1-PID  eth0 10.98.0.2/24, cni0 <subnet1>.1/24
//!     │             └── veth ── flbench-c1-PID  eth0 <subnet1>.2, iperf3/qperf clients
//!     └── veth ── flbench-h2-PID  eth0 10.98.0.3/24, cni0 <subnet2>.1/24
//!                   └── veth ── flbench-c2-PID  eth0 <subnet2>.2, iperf3/qperf servers
//! ```
//!
//! The underlay and etcd live for the whole run; hosts and containers are built afresh
//! for every row, so no row inherits another's devices, routes, rules or sysctls. A row
//! is measured only after a ping from c1 to c2 crosses and the row's own dataplane is
//! seen carrying it; otherwise it is reported "unavailable" with the reason. Nothing
//! asserts speed: this is a benchmark, not a test.

mod chart;
mod check;
mod control_plane;
mod measure;
mod report;
pub(crate) mod rows;
mod topo;

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
pub use check::check_outputs;

use crate::{
    ebpf, setup,
    util::{cargo, is_root, output, run, target_dir},
};
use measure::{Durations, Sample, Servers, Sweep};
use report::{Meta, Offloads, Report, RowResult, Status};
use rows::Row;
use topo::{Host, Underlay};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Short runs for checking the harness (about two minutes): one repetition, offloads
    /// on only, iperf3 2 s, qperf 1 s per test, the sweep in steps of ×16 (5 sizes).
    #[arg(long)]
    quick: bool,
    /// Rows to run, comma-separated (default: all), e.g. --rows native,kernel-vxlan.
    #[arg(long, value_enum, value_delimiter = ',')]
    rows: Vec<Row>,
    /// Veth offloads (TSO, GSO, GRO) on the path: on, off, or each in turn
    /// [default: both, or on with --quick].
    #[arg(long, value_enum)]
    offloads: Option<OffloadsArg>,
    /// Skip the qperf sweep over message sizes 1 B to 64 KiB (-oo msg_size:1:64K:*2)
    /// and its charts.
    #[arg(long)]
    no_sweep: bool,
    /// Repetitions per row and offload setting; the tables show the median
    /// [default: 3, or 1 with --quick].
    #[arg(long)]
    repeat: Option<u32>,
    /// Do not pin the clients to CPU 0 and the servers to CPU 1.
    #[arg(long)]
    no_pin: bool,
    /// Where to write report.md and results.json [default: target/bench].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Instead: the control-plane bench (simulated agents against one etcd; no root);
    /// writes control-plane.md.
    #[arg(long)]
    control_plane: bool,
    /// --control-plane: simulated agents (also run with a quarter of them).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// --control-plane: existing leases for the READY measurement.
    #[arg(long, default_value_t = 5000)]
    leases_for_ready: usize,
    /// --control-plane: exit non-zero unless subnets are distinct, new leases reach every
    /// agent, RPCs per agent stay bounded and (as root) every flanneld start got READY.
    #[arg(long)]
    check: bool,
    /// --control-plane: the flanneld binary whose READY is measured [default: a release
    /// build, as the dataplane rows use].
    #[arg(long)]
    flanneld: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OffloadsArg {
    On,
    Off,
    Both,
}

impl OffloadsArg {
    fn modes(self) -> Vec<Offloads> {
        match self {
            OffloadsArg::On => vec![Offloads::On],
            OffloadsArg::Off => vec![Offloads::Off],
            OffloadsArg::Both => vec![Offloads::On, Offloads::Off],
        }
    }
}

pub(crate) use crate::netns::{interrupted, wait_for};

/// The settings of one run, resolved from the flags.
struct Plan {
    rows: Vec<Row>,
    modes: Vec<Offloads>,
    repeat: u32,
    durations: Durations,
    /// The message-size sweep, run in the first round under `sweep_modes`.
    sweep: Option<Sweep>,
    sweep_modes: Vec<Offloads>,
    quick: bool,
    /// The CPUs of the client (c1) and the servers (c2).
    pin: Option<[usize; 2]>,
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Plan {
        let mut rows = if args.rows.is_empty() {
            Row::ALL.to_vec()
        } else {
            args.rows.clone()
        };
        // Report order, once each, whatever order the flag gave.
        rows.sort_by_key(|r| Row::ALL.iter().position(|a| a == r));
        rows.dedup();
        let durations = if args.quick {
            Durations {
                iperf3: 2,
                iperf3_omit: 0,
                qperf: 1,
            }
        } else {
            Durations {
                iperf3: 10,
                iperf3_omit: 1,
                qperf: 5,
            }
        };
        let default_offloads = if args.quick {
            OffloadsArg::On
        } else {
            OffloadsArg::Both
        };
        let modes = args.offloads.unwrap_or(default_offloads).modes();
        // A sweep costs 2 qperf runs of `secs` per size (qperf's -t takes whole seconds):
        // 17 sizes make ~35 s per row and setting. So it runs in the first round only,
        // and --quick takes every 16th power of two (1, 16, 256, 4K, 64K) and, with
        // --offloads both, offloads on only, to stay at about two minutes.
        let sweep = (!args.no_sweep).then_some(Sweep {
            step: if args.quick { 16 } else { 2 },
            secs: 1,
        });
        let sweep_modes = if args.quick && modes.contains(&Offloads::On) {
            vec![Offloads::On]
        } else {
            modes.clone()
        };
        Plan {
            rows,
            modes,
            repeat: args.repeat.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
            durations,
            sweep,
            sweep_modes,
            quick: args.quick,
            pin: (!args.no_pin && cpus() >= 2).then_some([0, 1]),
        }
    }
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.control_plane {
        return control_plane::run(&control_plane::Opts {
            agents: args.agents,
            leases_for_ready: args.leases_for_ready,
            check: args.check,
            out: args.out.clone(),
            flanneld: args.flanneld.clone(),
        });
    }
    if !is_root() {
        bail!(
            "the bench creates network namespaces and needs root: \
             run it as root (e.g. sudo -E cargo xtask bench)"
        );
    }
    let plan = Plan::from_args(args);
    setup::setup()?;
    crate::netns::on_ctrl_c()?;
    let _turn = topo::take_turn()?;
    warn_if_busy();
    // Taken before the build: flanneld is built from the tree as it is now.
    let meta_start = (date(), loadavg(), commit());
    let flanneld = build_flanneld(&plan.rows);
    let udp_reference = build_udp_reference(&plan.rows);
    let dir = tempfile::Builder::new().prefix("flbench-").tempdir()?;
    // A private copy: a rebuild of xtask during the run must not pull the binary that
    // the readiness checks run (`xtask http-get`) from under us.
    let xtask = dir.path().join("xtask");
    // /proc/self/exe, not current_exe(): the file we started from may have been
    // replaced by a rebuild (cargo xtask test rebuilds before it runs the bench).
    fs::copy("/proc/self/exe", &xtask).context("copy the running xtask binary")?;

    let results = {
        let ul = Underlay::new(dir.path())?;
        let ctx = rows::Ctx {
            ul: &ul,
            flanneld: &flanneld,
            xtask: &xtask,
            dir: dir.path(),
            udp_reference: udp_reference.as_deref(),
        };
        run_rows(&plan, &ctx)?
    };

    let report = Report {
        meta: meta(&plan, meta_start),
        results,
    };
    print!("{}", report.text());
    write_outputs(&report, args.out.clone())
}

/// Warns when the machine is busy (a load average above half the CPUs): other work
/// shares the CPUs with both ends of every measurement.
fn warn_if_busy() {
    let cpus = cpus();
    let load: f64 = loadavg()
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load > cpus as f64 / 2.0 {
        eprintln!(
            "bench: warning: load average {load:.2} on {cpus} CPUs: other work is running, \
             the figures will be noisy"
        );
    }
}

/// Builds flanneld (with the BPF object when an eBPF row is asked for and the toolchain
/// is there). A failure only makes the flanneld rows unavailable.
fn build_flanneld(rows: &[Row]) -> Result<PathBuf, String> {
    if rows.iter().all(|r| r.flanneld().is_none()) {
        return Err("not needed".to_owned());
    }
    if rows
        .iter()
        .any(|r| matches!(r, Row::EbpfVxlan | Row::EbpfHostgw | Row::EbpfUdp))
    {
        // flanneld embeds the object at compile time, so it must come first.
        if let Err(e) = ebpf::toolchain().and_then(|tc| ebpf::build(&tc)) {
            eprintln!("bench: the BPF object did not build ({e:#}); the eBPF rows will say so");
        }
    }
    // Release: the TUN dataplane forwards in userspace, where a debug build would
    // measure the compiler's optimiser rather than the dataplane.
    match run(cargo().args(["build", "--release", "--bin", "flanneld"])) {
        Ok(()) => Ok(target_dir().join("release/flanneld")),
        Err(e) => Err(format!("flanneld does not build: {e:#}")),
    }
}

/// The flannel-udp-shaped reference proxy (an example of flannel-agent), when its row
/// is asked for.
fn build_udp_reference(rows: &[Row]) -> Option<PathBuf> {
    if !rows.contains(&Row::UdpReference) {
        return None;
    }
    let args = ["build", "--release", "--example", "flannel_udp_reference"];
    match run(cargo().args(args)) {
        Ok(()) => Some(target_dir().join("release/examples/flannel_udp_reference")),
        Err(e) => {
            eprintln!("bench: the udp reference did not build ({e:#}); its row will say so");
            None
        }
    }
}

/// Progress on stderr: elapsed time, the step, and the row.
struct Progress {
    start: Instant,
    steps: usize,
    done: usize,
}

impl Progress {
    fn say(&self, msg: &str) {
        let t = self.start.elapsed().as_secs();
        eprintln!(
            "[bench {:02}:{:02} {}/{}] {msg}",
            t / 60,
            t % 60,
            self.done,
            self.steps
        );
        let _ = std::io::stderr().flush();
    }
}

/// Runs the rows in rounds: each round sets every row up, measures it once per offload
/// setting and tears it down. Repetitions of one row are thus spread over the whole run,
/// so a change in the machine's load (other work on a shared VM) hits every row alike
/// instead of skewing the rows that happened to run during it.
fn run_rows(plan: &Plan, ctx: &rows::Ctx) -> Result<Vec<RowResult>> {
    let mut progress = Progress {
        start: Instant::now(),
        steps: plan.rows.len() * plan.modes.len() * plan.repeat as usize,
        done: 0,
    };
    let mut results: Vec<RowResult> = Vec::new();
    // Rows found unavailable in the first round are not probed again.
    let mut unavailable: Vec<Row> = Vec::new();
    let mut setups = 0;
    for round in 1..=plan.repeat {
        for &row in &plan.rows {
            if unavailable.contains(&row) {
                progress.done += plan.modes.len();
                continue;
            }
            let name = format!("{} (round {round}/{})", row.name(), plan.repeat);
            progress.say(&format!("{name}: setting up"));
            setups += 1;
            let before = progress.done;
            let outcome = run_row(plan, ctx, row, (setups, round), &mut progress);
            if interrupted() {
                bail!("interrupted");
            }
            // Any failure inside a row (a command that did not work in this kernel, a
            // tool that crashed) makes that row unavailable, not the run.
            let per_mode = outcome.unwrap_or_else(|e| {
                let status = Status::Unavailable {
                    reason: format!("{e:#}"),
                };
                plan.modes
                    .iter()
                    .map(|_| (status.clone(), Vec::new(), None))
                    .collect()
            });
            if per_mode
                .iter()
                .all(|(s, _, _)| matches!(s, Status::Unavailable { .. }))
                && round == 1
            {
                unavailable.push(row);
            }
            let mut said = Vec::new();
            for (&m, outcome) in plan.modes.iter().zip(per_mode) {
                if let Status::Unavailable { reason } = &outcome.0
                    && !said.contains(reason)
                {
                    progress.say(&format!("{name}: unavailable: {reason}"));
                    said.push(reason.clone());
                }
                merge(&mut results, row, m, round, outcome);
            }
            progress.done = before + plan.modes.len();
        }
    }
    progress.say("done");
    Ok(results)
}

/// Adds one round's outcome for `row` under `m` to the results. A row that was measured
/// before and is unavailable in a later round keeps its samples, and the reason is kept
/// as a sample error.
fn merge(results: &mut Vec<RowResult>, row: Row, m: Offloads, round: u32, outcome: ModeOutcome) {
    let (status, samples, note) = outcome;
    let Some(r) = results.iter_mut().find(|r| r.row == row && r.offloads == m) else {
        results.push(RowResult {
            row,
            offloads: m,
            status,
            samples,
            note,
        });
        return;
    };
    match (&r.status, status) {
        (Status::Measured, Status::Unavailable { reason }) => r.samples.push(Sample {
            errors: vec![format!("round {round}: unavailable: {reason}")],
            ..Sample::default()
        }),
        (Status::Unavailable { .. }, status @ Status::Measured) => r.status = status,
        _ => {}
    }
    r.samples.extend(samples);
    if note.is_some() {
        r.note = note;
    }
}

/// What one offload setting of a row gave: status, samples, a note on the counters.
type ModeOutcome = (Status, Vec<Sample>, Option<String>);

/// Sets one row up, measures it under each offload setting, tears it down. `index` counts
/// the setups of the run (it makes device names unique), `round` is 1-based.
fn run_row(
    plan: &Plan,
    ctx: &rows::Ctx,
    row: Row,
    (index, round): (usize, u32),
    progress: &mut Progress,
) -> Result<Vec<ModeOutcome>> {
    let unavailable = |reason: String| {
        plan.modes
            .iter()
            .map(|_| {
                (
                    Status::Unavailable {
                        reason: reason.clone(),
                    },
                    Vec::new(),
                    None,
                )
            })
            .collect()
    };
    let hosts = [topo::host(ctx.ul, 1, index)?, topo::host(ctx.ul, 2, index)?];
    let active = match rows::setup(row, &hosts, ctx)? {
        Ok(a) => a,
        Err(why) => return Ok(unavailable(why)),
    };
    let target = active.subnets[1].host(2, false);
    if !topo::ping_crosses(&hosts[0].container, &target, active.ping_timeout)? {
        return Ok(unavailable(no_ping_reason(row, &active.subnets)));
    }
    if let Err(why) = rows::verify(row, &hosts, &active) {
        return Ok(unavailable(why));
    }
    let row_dir = ctx.dir.join(row.name());
    fs::create_dir_all(&row_dir)?;
    let _servers = Servers::start(&hosts[1].container, plan.pin.map(|p| p[1]), &row_dir)?;
    let mut out = Vec::new();
    for &m in &plan.modes {
        let sweep = plan
            .sweep
            .filter(|_| round == 1 && plan.sweep_modes.contains(&m));
        let (status, samples) = measure_mode(
            plan,
            ctx,
            (row, m, sweep),
            &hosts,
            &target,
            &row_dir,
            progress,
        )?;
        // Cumulative counters of h1's flanneld: evidence of which path carried the
        // traffic (for eBPF, how much went to the kernel fallback).
        let note = rows::h1_status(&active).and_then(|s| rows::counters_note(&s));
        out.push((status, samples, note));
        progress.done += 1;
    }
    Ok(out)
}

/// Why a row whose setup succeeded carries no traffic.
fn no_ping_reason(row: Row, subnets: &[topo::Subnet; 2]) -> String {
    let path = format!(
        "{} → {}",
        subnets[0].host(2, false),
        subnets[1].host(2, false)
    );
    match row.flanneld() {
        Some((backend, dataplane)) => format!(
            "flanneld ({backend}, --dataplane {dataplane}) reached READY on both hosts, but \
             a ping {path} does not cross: it does not set up forwarding for this yet"
        ),
        None => format!("the by-hand setup does not carry a ping {path}"),
    }
}

/// One offload setting of a row: turn offloads off if asked, check the path again, then
/// measure once (with the sweep, if given).
fn measure_mode(
    plan: &Plan,
    ctx: &rows::Ctx,
    (row, m, sweep): (Row, Offloads, Option<Sweep>),
    hosts: &[Host; 2],
    target: &str,
    dir: &Path,
    progress: &Progress,
) -> Result<(Status, Vec<Sample>)> {
    if m == Offloads::Off
        && let Err(e) = topo::offloads_off(ctx.ul, hosts)
    {
        let reason = format!("{e:#}");
        return Ok((Status::Unavailable { reason }, Vec::new()));
    }
    if !topo::ping_crosses(&hosts[0].container, target, Duration::from_secs(3))? {
        let reason = format!("with offloads {} a ping no longer crosses", m.name());
        return Ok((Status::Unavailable { reason }, Vec::new()));
    }
    progress.say(&format!(
        "{}, offloads {}: iperf3 {} s, {}",
        row.name(),
        m.name(),
        plan.durations.iperf3,
        match sweep {
            Some(sw) if sw.secs == plan.durations.qperf => format!(
                "qperf sweep {} ({} sizes, {} s each; plain tcp_bw/tcp_lat from it)",
                sw.spec(),
                sw.sizes().len(),
                sw.secs
            ),
            Some(sw) => format!(
                "qperf tcp_bw/tcp_lat {} s each, qperf sweep {} ({} sizes, {} s each)",
                plan.durations.qperf,
                sw.spec(),
                sw.sizes().len(),
                sw.secs
            ),
            None => format!("qperf tcp_bw/tcp_lat {} s each", plan.durations.qperf),
        },
    ));
    let client = measure::Client {
        durations: plan.durations,
        sweep,
        cpu: plan.pin.map(|p| p[0]),
    };
    let s = measure::sample(&hosts[0].container, target, client, dir);
    if interrupted() {
        bail!("interrupted");
    }
    progress.say(&format!(
        "{}, offloads {}: {}",
        row.name(),
        m.name(),
        summary(&s)
    ));
    let samples = vec![s];
    Ok((Status::Measured, samples))
}

/// A one-line summary of a sample, for progress.
fn summary(s: &Sample) -> String {
    let f = |v: Option<f64>, unit: &str| {
        v.map_or_else(|| "failed".to_owned(), |v| format!("{v:.2} {unit}"))
    };
    let mut out = format!(
        "iperf3 {}, tcp_bw {}, tcp_lat {}",
        f(s.iperf3_gbps, "Gbit/s"),
        f(s.qperf_bw_gbps, "Gbit/s"),
        f(s.qperf_lat_us, "µs")
    );
    if !s.sweep.is_empty() {
        let _ = write!(out, ", sweep {} sizes", s.sweep.len());
    }
    for e in &s.errors {
        let _ = write!(out, "; {e}");
    }
    out
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn date() -> String {
    output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|d| d.trim().to_owned())
        .unwrap_or_default()
}

/// `git describe`-like: the short commit, `+dirty` with uncommitted changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        output(
            std::process::Command::new("git")
                .current_dir(crate::util::workspace_root())
                .args(args),
        )
        .map(|o| o.trim().to_owned())
    };
    let Ok(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_ok_and(|s| !s.is_empty());
    if dirty { format!("{head}+dirty") } else { head }
}

fn meta(plan: &Plan, (date, loadavg_start, commit): (String, String, String)) -> Meta {
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    Meta {
        date,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_default(),
        cpus: cpus(),
        cpu_model,
        commit,
        loadavg_start,
        loadavg_end: loadavg(),
        quick: plan.quick,
        repeat: plan.repeat,
        sweep: plan.sweep,
        sweep_modes: if plan.sweep.is_some() {
            plan.sweep_modes.clone()
        } else {
            Vec::new()
        },
        durations: plan.durations,
        pinned: plan.pin,
    }
}

fn write_outputs(report: &Report, out: Option<PathBuf>) -> Result<()> {
    let dir = out.unwrap_or_else(|| target_dir().join("bench"));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let md = dir.join("report.md");
    fs::write(&md, report.markdown())?;
    let json = dir.join("results.json");
    fs::write(&json, serde_json::to_string_pretty(report)? + "\n")?;
    for (name, svg) in report.charts() {
        fs::write(dir.join(name), svg)?;
    }
    println!("\nwrote {} and {}", md.display(), json.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(g: f64) -> ModeOutcome {
        let s = Sample {
            iperf3_gbps: Some(g),
            ..Sample::default()
        };
        (Status::Measured, vec![s], None)
    }

    #[test]
    fn rounds_merge_per_row_and_setting() {
        let mut results = Vec::new();
        let gone = || Status::Unavailable {
            reason: "flanneld exited".into(),
        };
        merge(&mut results, Row::Native, Offloads::On, 1, measured(1.0));
        merge(&mut results, Row::Native, Offloads::Off, 1, measured(0.5));
        merge(&mut results, Row::Native, Offloads::On, 2, measured(2.0));
        merge(
            &mut results,
            Row::Native,
            Offloads::On,
            3,
            (gone(), vec![], None),
        );
        assert_eq!(results.len(), 2);
        let on = &results[0];
        assert!(matches!(on.status, Status::Measured));
        assert_eq!(on.samples.len(), 3);
        assert_eq!(
            on.samples[2].errors,
            ["round 3: unavailable: flanneld exited"]
        );

        merge(
            &mut results,
            Row::EbpfVxlan,
            Offloads::On,
            1,
            (gone(), vec![], None),
        );
        merge(&mut results, Row::EbpfVxlan, Offloads::On, 2, measured(3.0));
        assert!(matches!(results[2].status, Status::Measured));
        assert_eq!(results[2].samples.len(), 1);
    }
}
