//! The dataplane rows: what each one sets up in the two hosts before the measurements.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use serde::Serialize;

use crate::util::BpffsMount;

use super::{
    topo::{Host, Proc, Subnet, Underlay},
    wait_for,
};

/// A dataplane the bench measures, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Row {
    /// No overlay: a route per peer subnet via the peer's underlay IP, set by hand.
    Native,
    /// A kernel flannel.1 set up by hand exactly as Go flannel does (the reference).
    KernelVxlan,
    /// Our flanneld, vxlan backend, `--dataplane kernel`.
    FlanneldKernelVxlan,
    /// Our flanneld, vxlan backend, `--dataplane ebpf`.
    EbpfVxlan,
    /// Our flanneld, host-gw backend, `--dataplane kernel`.
    KernelHostgw,
    /// Our flanneld, host-gw backend, `--dataplane ebpf`.
    EbpfHostgw,
    /// Our flanneld, udp backend, `--dataplane ebpf` (TUN underneath as the fallback).
    EbpfUdp,
    /// Our flanneld, udp backend, `--dataplane tun`.
    TunUdp,
    /// Our flanneld, vxlan backend, `--dataplane tun`.
    TunVxlan,
    /// The flannel-udp-shaped reference: a single-threaded `poll()` proxy over one TUN
    /// and one UDP socket, like flanneld's udp backend (the measuring stick).
    UdpReference,
}

impl Row {
    pub const ALL: [Row; 10] = [
        Row::Native,
        Row::KernelVxlan,
        Row::FlanneldKernelVxlan,
        Row::EbpfVxlan,
        Row::KernelHostgw,
        Row::EbpfHostgw,
        Row::EbpfUdp,
        Row::TunUdp,
        Row::TunVxlan,
        Row::UdpReference,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Row::Native => "native",
            Row::KernelVxlan => "kernel-vxlan",
            Row::FlanneldKernelVxlan => "flanneld-kernel-vxlan",
            Row::EbpfVxlan => "ebpf-vxlan",
            Row::KernelHostgw => "kernel-hostgw",
            Row::EbpfHostgw => "ebpf-hostgw",
            Row::EbpfUdp => "ebpf-udp",
            Row::TunUdp => "tun-udp",
            Row::TunVxlan => "tun-vxlan",
            Row::UdpReference => "udp-reference",
        }
    }

    /// The flanneld backend type and `--dataplane` value, for the rows flanneld sets up.
    pub fn flanneld(self) -> Option<(&'static str, &'static str)> {
        match self {
            Row::Native | Row::KernelVxlan | Row::UdpReference => None,
            Row::FlanneldKernelVxlan => Some(("vxlan", "kernel")),
            Row::EbpfVxlan => Some(("vxlan", "ebpf")),
            Row::KernelHostgw => Some(("host-gw", "kernel")),
            Row::EbpfHostgw => Some(("host-gw", "ebpf")),
            Row::EbpfUdp => Some(("udp", "ebpf")),
            Row::TunUdp => Some(("udp", "tun")),
            Row::TunVxlan => Some(("vxlan", "tun")),
        }
    }
}

/// The flannel network the bench uses; by-hand rows take two of its /24s.
pub const NETWORK: &str = "10.6.0.0/16";
const UNDERLAY_MTU: u32 = 1500;
/// flannel's vxlan overhead: MTU = underlay MTU − 50.
const VXLAN_MTU: u32 = UNDERLAY_MTU - 50;
const VNI: &str = "1";
const VXLAN_PORT: &str = "8472";
const HEALTHZ_PORT: u16 = 8471;

/// What a row needs while it is measured: its flanneld processes, and the container
/// subnets (c1's first).
pub struct Active {
    // Dropped first: flanneld stops before its bpffs and the namespaces go.
    pub _agents: Vec<Proc>,
    /// The private bpffs the flanneld of this row pin into (never /sys/fs/bpf).
    pub _bpffs: Option<BpffsMount>,
    pub subnets: [Subnet; 2],
    /// How long a first ping may take to cross (a control plane needs a moment).
    pub ping_timeout: Duration,
    /// h1's flanneld and its subnet file, for `flanneld status`.
    pub status_of_h1: Option<(PathBuf, PathBuf)>,
}

/// What the flanneld rows need from the run.
pub struct Ctx<'a> {
    pub ul: &'a Underlay,
    /// The flanneld binary, or why there is none.
    pub flanneld: &'a Result<PathBuf, String>,
    /// This xtask, for `http-get` inside a namespace.
    pub xtask: &'a Path,
    pub dir: &'a Path,
    /// The flannel-udp-shaped reference proxy, when built.
    pub udp_reference: Option<&'a Path>,
}

/// Sets `row` up on the two hosts. `Ok(Err(why))`: the row is unavailable.
pub fn setup(row: Row, hosts: &[Host; 2], ctx: &Ctx) -> Result<Result<Active, String>> {
    match row.flanneld() {
        None if row == Row::UdpReference => udp_reference(hosts, ctx),
        None => by_hand(row, hosts).map(Ok),
        Some((backend, dataplane)) => flanneld(backend, dataplane, hosts, ctx),
    }
}

/// The two subnets of the by-hand rows: 10.6.1.0/24 behind h1, 10.6.2.0/24 behind h2.
fn fixed_subnets() -> [Subnet; 2] {
    [1, 2].map(|i| Subnet {
        prefix: format!("10.6.{i}"),
    })
}

fn by_hand(row: Row, hosts: &[Host; 2]) -> Result<Active> {
    let subnets = fixed_subnets();
    let mtu = if row == Row::Native {
        native(hosts, &subnets)?;
        UNDERLAY_MTU
    } else {
        kernel_vxlan(hosts, &subnets)?;
        VXLAN_MTU
    };
    for (h, s) in hosts.iter().zip(&subnets) {
        h.attach_container(s, mtu)?;
    }
    Ok(Active {
        _agents: Vec::new(),
        _bpffs: None,
        subnets,
        ping_timeout: Duration::from_secs(3),
        status_of_h1: None,
    })
}

/// flannel's udp MTU: underlay − 28.
const UDP_MTU: u32 = UNDERLAY_MTU - 28;

/// The reference proxy on each host; it creates `flannel0`, its address and the route.
fn udp_reference(hosts: &[Host; 2], ctx: &Ctx) -> Result<Result<Active, String>> {
    let Some(bin) = ctx.udp_reference else {
        return Ok(Err("the reference proxy did not build".to_owned()));
    };
    let subnets = fixed_subnets();
    let mut agents = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let j = 1 - i;
        let mut cmd = h.ns.command(bin);
        cmd.args([
            "--bind".to_owned(),
            format!("{}:8285", h.ip),
            "--subnet".to_owned(),
            subnets[i].cidr(),
            "--network".to_owned(),
            NETWORK.to_owned(),
            "--mtu".to_owned(),
            UDP_MTU.to_string(),
            "--peer".to_owned(),
            format!("{}={}:8285", subnets[j].cidr(), hosts[j].ip),
        ]);
        agents.push(Proc::spawn(
            cmd,
            ctx.dir.join(format!("reference-h{}.log", i + 1)),
        )?);
    }
    for (h, s) in hosts.iter().zip(&subnets) {
        h.attach_container(s, UDP_MTU)?;
    }
    Ok(Ok(Active {
        _agents: agents,
        _bpffs: None,
        subnets,
        ping_timeout: Duration::from_secs(10),
        status_of_h1: None,
    }))
}

/// host-gw by hand: `ip route replace <peer subnet> via <peer IP> dev eth0`.
fn native(hosts: &[Host; 2], subnets: &[Subnet; 2]) -> Result<()> {
    for (i, h) in hosts.iter().enumerate() {
        let j = 1 - i;
        h.ns.ip(&[
            "route",
            "replace",
            &subnets[j].cidr(),
            "via",
            &hosts[j].ip,
            "dev",
            "eth0",
        ])?;
    }
    Ok(())
}

/// A fixed, locally administered VTEP MAC per host (flannel's are random; fixed ones make
/// captures of different runs comparable).
fn vtep_mac(i: usize) -> String {
    format!("02:fb:00:00:00:{:02x}", i + 1)
}

/// flannel.1 exactly as Go flannel programs it (flannel.md §3.2), with iproute2.
fn kernel_vxlan(hosts: &[Host; 2], subnets: &[Subnet; 2]) -> Result<()> {
    for (i, h) in hosts.iter().enumerate() {
        let mac = vtep_mac(i);
        h.ns.ip(&[
            "link",
            "add",
            "flannel.1",
            "address",
            &mac,
            "type",
            "vxlan",
            "id",
            VNI,
            "dstport",
            VXLAN_PORT,
            "nolearning",
            "local",
            &h.ip,
            "dev",
            "eth0",
        ])?;
        h.ns.ip(&["link", "set", "flannel.1", "mtu", &VXLAN_MTU.to_string()])?;
        let addr = format!("{}/32", subnets[i].host(0, false));
        h.ns.ip(&["addr", "add", &addr, "dev", "flannel.1"])?;
        h.ns.ip(&["link", "set", "flannel.1", "up"])?;
    }
    for (i, h) in hosts.iter().enumerate() {
        let j = 1 - i;
        let (peer_mac, peer_gw) = (vtep_mac(j), subnets[j].host(0, false));
        // flannel's order: neigh, fdb, then the route, so the kernel never has to ARP.
        h.ns.ip(&[
            "neigh",
            "replace",
            &peer_gw,
            "lladdr",
            &peer_mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])?;
        h.ns.exec(
            "bridge",
            &[
                "fdb",
                "replace",
                &peer_mac,
                "dev",
                "flannel.1",
                "self",
                "dst",
                &hosts[j].ip,
                "permanent",
            ],
        )?;
        h.ns.ip(&[
            "route",
            "replace",
            &subnets[j].cidr(),
            "via",
            &peer_gw,
            "dev",
            "flannel.1",
            "onlink",
        ])?;
    }
    Ok(())
}

/// Our flanneld on both hosts with `backend` and `--dataplane`: waits for READY, then
/// addresses the containers from each host's subnet.env.
fn flanneld(
    backend: &str,
    dataplane: &str,
    hosts: &[Host; 2],
    ctx: &Ctx,
) -> Result<Result<Active, String>> {
    let bin = match ctx.flanneld {
        Ok(bin) => bin,
        Err(why) => return Ok(Err(why.clone())),
    };
    let config = format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"{backend}"}}}}"#);
    ctx.ul.set_network_config(&config)?;
    let bpffs_dir = ctx.dir.join(format!("bpffs-{backend}-{dataplane}"));
    let bpffs = BpffsMount::new(bpffs_dir)?;
    let mut agents = Vec::new();
    let mut envs = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let hdir = ctx.dir.join(format!("h{}", i + 1));
        // A fresh state dir per row: a VTEP MAC must not leak from one row to the next.
        let _ = fs::remove_dir_all(&hdir);
        fs::create_dir_all(&hdir)?;
        let env = hdir.join("subnet.env");
        let mut cmd = h.ns.command(bin);
        cmd.args([
            format!("--etcd-endpoints={}", ctx.ul.endpoint),
            "--iface=eth0".to_owned(),
            format!("--subnet-file={}", env.display()),
            format!("--state-dir={}", hdir.join("state").display()),
            "--healthz-ip=127.0.0.1".to_owned(),
            format!("--healthz-port={HEALTHZ_PORT}"),
            format!("--dataplane={dataplane}"),
            format!(
                "--bpf-pin-dir={}",
                bpffs.pin_dir(&format!("h{}", i + 1)).display()
            ),
        ]);
        agents.push(Proc::spawn(cmd, hdir.join("flanneld.log"))?);
        envs.push(env);
    }
    let mut subnets = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        match ready(&mut agents[i], h, &envs[i], ctx.xtask)? {
            Ok(s) => subnets.push(s),
            Err(why) => return Ok(Err(format!("flanneld in h{}: {why}", i + 1))),
        }
    }
    for (h, (s, mtu)) in hosts.iter().zip(&subnets) {
        h.attach_container(s, *mtu)?;
    }
    let [a, b] = [subnets[0].0.clone(), subnets[1].0.clone()];
    Ok(Ok(Active {
        _agents: agents,
        _bpffs: Some(bpffs),
        subnets: [a, b],
        ping_timeout: Duration::from_secs(15),
        status_of_h1: Some((bin.clone(), envs[0].clone())),
    }))
}

/// Waits for subnet.env and `/readyz`; returns the lease's subnet and FLANNEL_MTU, or why
/// flanneld did not get there.
fn ready(
    agent: &mut Proc,
    h: &Host,
    env: &Path,
    xtask: &Path,
) -> Result<Result<(Subnet, u32), String>> {
    let is_ready = || {
        env.is_file()
            && h.ns
                .command(xtask)
                .args(["http-get", &format!("127.0.0.1:{HEALTHZ_PORT}"), "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success())
    };
    let outcome = wait_for("flanneld READY", Duration::from_secs(45), || {
        if let Some(status) = agent.exited() {
            return Some(Err(format!(
                "exited ({status}): {}",
                log_reason(&agent.log())
            )));
        }
        is_ready().then_some(Ok(()))
    })?;
    match outcome {
        None => Ok(Err(format!(
            "not READY within 45 s: {}",
            log_reason(&agent.log())
        ))),
        Some(Err(why)) => Ok(Err(why)),
        Some(Ok(())) => Ok(read_subnet_env(env)),
    }
}

/// The gist of a flanneld log for a one-line reason: the last error's `error="…"`
/// field, else the last error line, else the last line, without its timestamp.
fn log_reason(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let Some(line) = lines
        .iter()
        .rev()
        .find(|l| l.contains("ERROR") || l.contains("error="))
        .or(lines.last())
    else {
        return "(empty log)".to_owned();
    };
    if let Some((_, rest)) = line.split_once("error=\"") {
        return rest.rsplit_once('"').map_or(rest, |(e, _)| e).to_owned();
    }
    // klog/tracing lines start with a timestamp; the rest says what happened.
    match line.split_once(' ') {
        Some((first, rest)) if first.starts_with(|c: char| c.is_ascii_digit()) => {
            rest.trim().to_owned()
        }
        _ => line.trim().to_owned(),
    }
}

/// FLANNEL_SUBNET and FLANNEL_MTU from a subnet.env.
fn read_subnet_env(path: &Path) -> Result<(Subnet, u32), String> {
    let env = fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let value = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    };
    let subnet = value("FLANNEL_SUBNET")
        .and_then(Subnet::from_flannel_subnet)
        .ok_or_else(|| format!("no /24 FLANNEL_SUBNET in subnet.env: {env:?}"))?;
    let mtu = value("FLANNEL_MTU")
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| format!("no FLANNEL_MTU in subnet.env: {env:?}"))?;
    Ok((subnet, mtu))
}

/// After the ping crossed: evidence that the row's dataplane, not something else,
/// carries it. `Err(why)` makes the row unavailable.
pub fn verify(row: Row, hosts: &[Host; 2], active: &Active) -> Result<(), String> {
    let subnets = &active.subnets;
    if let (Some((_, dataplane)), Some(status)) = (row.flanneld(), h1_status(active)) {
        let in_use = status["dataplane"].as_str().unwrap_or("?");
        if in_use != dataplane {
            return Err(format!(
                "flanneld in h1 runs the {in_use} dataplane, not {dataplane} (flanneld status)"
            ));
        }
    }
    let h1 = &hosts[0].ns;
    let route = h1
        .ip(&["route", "show", &subnets[1].cidr()])
        .map_err(|e| format!("{e:#}"))?;
    match row {
        Row::Native | Row::UdpReference => Ok(()),
        Row::KernelVxlan | Row::FlanneldKernelVxlan => {
            if route.contains("dev flannel.1") {
                Ok(())
            } else {
                Err(format!(
                    "h1's route to {} is not via flannel.1: {:?}",
                    subnets[1].cidr(),
                    route.trim()
                ))
            }
        }
        Row::KernelHostgw => {
            if route.contains(&format!("via {}", hosts[1].ip)) {
                Ok(())
            } else {
                Err(format!(
                    "h1 has no host-gw route to {} via {}: {:?}",
                    subnets[1].cidr(),
                    hosts[1].ip,
                    route.trim()
                ))
            }
        }
        // The per-peer counters of flanneld status are the fast path's (eBPF) or the
        // TUN dataplane's: either way, they prove the row's dataplane carries the pings.
        Row::EbpfVxlan | Row::EbpfHostgw | Row::EbpfUdp | Row::TunUdp | Row::TunVxlan => {
            ebpf_carries(hosts, active)
        }
    }
}

/// h1's `flanneld status --json`, for the flanneld rows.
pub fn h1_status(active: &Active) -> Option<serde_json::Value> {
    let (bin, env) = active.status_of_h1.as_ref()?;
    let out = crate::util::output(
        std::process::Command::new(bin)
            .arg("status")
            .arg(format!("--subnet-file={}", env.display()))
            .arg("--json"),
    )
    .ok()?;
    serde_json::from_str(&out).ok()
}

/// Packets h1's fast path counted towards its peers (after the ping, at least the ping).
fn ebpf_tx_packets(status: &serde_json::Value) -> u64 {
    status["peers"].as_array().map_or(0, |peers| {
        peers.iter().filter_map(|p| p["tx_packets"].as_u64()).sum()
    })
}

/// `Ok` when h1's eBPF per-peer counters see pings: the fast path, not the kernel's
/// fallback, carries them. (Its TCX links are invisible to Debian 12's bpftool 7.1.)
/// flanneld refreshes its status every 2 s, so this pings and polls for a while.
fn ebpf_carries(hosts: &[Host; 2], active: &Active) -> Result<(), String> {
    let target = active.subnets[1].host(2, false);
    let seen = wait_for("eBPF counters", Duration::from_secs(8), || {
        super::topo::ping_once(&hosts[0].container, &target);
        h1_status(active)
            .map(|s| ebpf_tx_packets(&s))
            .filter(|&n| n > 0)
    })
    .map_err(|e| format!("{e:#}"))?;
    match seen {
        Some(_) => Ok(()),
        None => Err(
            "pings cross, but h1's eBPF per-peer counters stay at 0 for 8 s \
                     (flanneld status): the kernel path carries them, not the eBPF dataplane"
                .to_owned(),
        ),
    }
}

/// A line for the report on what the flanneld of h1 counted: per-peer packets of the fast
/// path, and what it dropped or handed to the kernel.
pub fn counters_note(status: &serde_json::Value) -> Option<String> {
    let peers = status["peers"].as_array()?;
    let mut parts: Vec<String> = peers
        .iter()
        .filter(|p| {
            p["tx_packets"].as_u64().unwrap_or(0) + p["rx_packets"].as_u64().unwrap_or(0) > 0
        })
        .map(|p| {
            format!(
                "peer {}: tx {} rx {} packets",
                p["subnet"].as_str().unwrap_or("?"),
                p["tx_packets"].as_u64().unwrap_or(0),
                p["rx_packets"].as_u64().unwrap_or(0)
            )
        })
        .collect();
    for v in status["verdicts"].as_array().into_iter().flatten() {
        let n = v["packets"].as_u64().unwrap_or(0);
        if n > 0 {
            parts.push(format!(
                "{} {}: {n}",
                v["action"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("?")
            ));
        }
    }
    (!parts.is_empty()).then(|| {
        format!(
            "h1 dataplane {}: {}",
            status["dataplane"].as_str().unwrap_or("?"),
            parts.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_clap_values() {
        use clap::ValueEnum;
        for row in Row::ALL {
            let pv = row.to_possible_value().unwrap();
            assert_eq!(pv.get_name(), row.name());
        }
    }

    #[test]
    fn vtep_macs_are_locally_administered_unicast() {
        for i in 0..2 {
            let first = u8::from_str_radix(&vtep_mac(i)[..2], 16).unwrap();
            assert_eq!(first & 0b11, 0b10);
        }
    }

    #[test]
    fn log_reasons() {
        let log = "2026-11-28T20:25:58Z  INFO flannel_agent::daemon: using interface\n\
                   2026-11-28T20:25:58Z ERROR flanneld: flanneld failed error=\"--dataplane=ebpf: \
                   not wired\"\n";
        assert_eq!(log_reason(log), "--dataplane=ebpf: not wired");
        assert_eq!(
            log_reason("2026-11-28T20:25:58Z  INFO waiting for etcd\n"),
            "INFO waiting for etcd"
        );
        assert_eq!(log_reason(""), "(empty log)");
    }

    #[test]
    fn ebpf_counters_from_status() {
        let status: serde_json::Value = serde_json::from_str(
            r#"{"dataplane":"ebpf","peers":[{"subnet":"10.6.7.0/24","tx_packets":5,
                "rx_packets":4},{"subnet":"10.6.8.0/24","tx_packets":0,"rx_packets":0}],
                "verdicts":[{"action":"pass","reason":"fragment","packets":2},
                {"action":"drop","reason":"spoofed","packets":0}]}"#,
        )
        .unwrap();
        assert_eq!(ebpf_tx_packets(&status), 5);
        assert_eq!(
            counters_note(&status).unwrap(),
            "h1 dataplane ebpf: peer 10.6.7.0/24: tx 5 rx 4 packets, pass fragment: 2"
        );
        let idle: serde_json::Value = serde_json::from_str(r#"{"peers":[]}"#).unwrap();
        assert_eq!(ebpf_tx_packets(&idle), 0);
        assert_eq!(counters_note(&idle), None);
    }

    #[test]
    fn subnet_env_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("subnet.env");
        fs::write(
            &p,
            "FLANNEL_NETWORK=10.6.0.0/16\nFLANNEL_SUBNET=10.6.34.1/24\nFLANNEL_MTU=1450\n",
        )
        .unwrap();
        let (s, mtu) = read_subnet_env(&p).unwrap();
        assert_eq!(s.cidr(), "10.6.34.0/24");
        assert_eq!(mtu, 1450);
        fs::write(&p, "FLANNEL_SUBNET=10.6.34.1/24\n").unwrap();
        assert!(read_subnet_env(&p).is_err());
    }
}
