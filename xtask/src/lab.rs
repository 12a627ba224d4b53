//! `cargo xtask lab`: a multi-host flannel cluster on one machine, in namespaces.
//!
//! ```text
//!   fllab-ul-PID     bridge br0 10.97.0.1/24, etcd on http://10.97.0.1:2379
//!     ├── veth ── fllab-h1-PID   eth0 10.97.0.2/24, flanneld, cni0 = FLANNEL_SUBNET
//!     │             ├── veth ── fllab-h1c1-PID  eth0 .2, MTU FLANNEL_MTU, default via .1
//!     │             └── veth ── fllab-h1c2-PID  eth0 .3
//!     └── veth ── fllab-h2-PID   ...
//! ```
//!
//! Everything lives in namespaces named `fllab-*-PID`, a private bpffs and a temp dir
//! named `fllab-PID-*`; all of it goes on exit, on error and on Ctrl-C. The pid in every
//! name keeps two runs at once (two `cargo xtask test`) apart. `cargo xtask lab down`
//! removes what a killed run left, and leaves running labs alone. The machine's own
//! network is never touched.

use std::{
    fs,
    io::IsTerminal,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    ebpf,
    netns::{Ns, Proc, interrupted, kill_and_delete, owner, run_alive, wait_for},
    setup,
    util::{BpffsMount, cargo, is_root, output, run, target_dir, which},
};

/// Every namespace, temp dir and bpffs mount of the lab starts with this.
pub const PREFIX: &str = "fllab-";
const UNDERLAY: &str = "10.97.0";
const ETCD_PREFIX: &str = "/coreos.com/network";
const NETWORK: &str = "10.5.0.0/16";
const HEALTHZ_PORT: u16 = 8471;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LabArgs {
    #[command(subcommand)]
    pub action: Option<LabAction>,
    /// Number of host namespaces, one flanneld each.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=200))]
    pub hosts: u16,
    /// Container namespaces behind each host.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub containers: u16,
    /// The flannel backend written to the network config.
    #[arg(long, value_enum, default_value_t = Backend::Vxlan)]
    pub backend: Backend,
    /// VXLAN only: route directly between hosts on the same subnet.
    #[arg(long)]
    pub directrouting: bool,
    /// flanneld's `--dataplane`.
    #[arg(long, value_enum, default_value_t = Dataplane::Auto)]
    pub dataplane: Dataplane,
    /// Print the table and exit: status 0 with full connectivity, 1 otherwise.
    #[arg(long)]
    pub once: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum LabAction {
    /// Remove what a killed lab left: namespaces, processes, bpffs mounts, temp dirs.
    Down,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Vxlan,
    Udp,
    HostGw,
}

impl Backend {
    fn flannel_type(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::Udp => "udp",
            Backend::HostGw => "host-gw",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    Auto,
    Ebpf,
    Kernel,
    Tun,
}

impl Dataplane {
    fn flag(self) -> &'static str {
        match self {
            Dataplane::Auto => "auto",
            Dataplane::Ebpf => "ebpf",
            Dataplane::Kernel => "kernel",
            Dataplane::Tun => "tun",
        }
    }
}

/// The network config the lab writes to etcd.
fn network_config(backend: Backend, directrouting: bool) -> String {
    let dr = if directrouting {
        r#","DirectRouting":true"#
    } else {
        ""
    };
    format!(
        r#"{{"Network":"{NETWORK}","Backend":{{"Type":"{}"{dr}}}}}"#,
        backend.flannel_type()
    )
}

pub fn lab(args: &LabArgs) -> Result<()> {
    if matches!(args.action, Some(LabAction::Down)) {
        return down();
    }
    if !is_root() {
        bail!(
            "the lab creates network namespaces, mounts a bpffs and runs flanneld: it needs \
             root. Run it as root (e.g. sudo -E cargo xtask lab)"
        );
    }
    if args.directrouting && args.backend != Backend::Vxlan {
        bail!("--directrouting applies to the vxlan backend only");
    }
    warn_leftovers();
    setup::setup()?;
    for (tool, package) in [
        ("etcd", "etcd-server"),
        ("etcdctl", "etcd-client"),
        ("ip", "iproute2"),
        ("ping", "iputils-ping"),
        ("mount", "mount"),
    ] {
        if which(tool).is_none() {
            bail!(
                "`{tool}` is missing (Debian package {package}): run `cargo xtask setup` as \
                 root, or apt-get install {package}"
            );
        }
    }
    crate::netns::on_ctrl_c()?;
    match ebpf::toolchain().and_then(|tc| ebpf::build(&tc)) {
        Ok(obj) => eprintln!("lab: BPF object {}", obj.display()),
        Err(e) if args.dataplane == Dataplane::Ebpf => {
            return Err(e.context("--dataplane=ebpf needs the BPF object"));
        }
        Err(e) => eprintln!("lab: warning: the BPF object did not build ({e:#})"),
    }
    // `--bins`, as `cargo xtask test` builds: the same feature set, so no rebuild there.
    run(cargo().args(["build", "--bins"]))?;
    let flanneld = target_dir().join("debug/flanneld");
    // `fllab-<pid>-*`: what is below it is told apart from another run's by the pid.
    let dir = tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{}-", std::process::id()))
        .tempdir()?;
    // A private copy of ourselves (for `http-get` inside the namespaces): a rebuild of
    // xtask during the run would delete the file we were started from.
    let xtask = dir.path().join("xtask");
    fs::copy("/proc/self/exe", &xtask).context("copy the xtask binary")?;
    let ok = run_lab(args, &flanneld, &xtask, dir.path())?;
    if args.once && !ok {
        bail!("lab: connectivity is not complete (see the table above)");
    }
    Ok(())
}

/// Says what killed lab runs left, without touching it: other runs, live or dead, never
/// collide with this one (every name carries its run's pid), and removing things is
/// `lab down`'s job.
fn warn_leftovers() {
    let dead: Vec<String> = resources()
        .into_iter()
        .filter(|r| !r.owner.is_some_and(run_alive))
        .map(|r| r.thing.to_string())
        .collect();
    if !dead.is_empty() {
        eprintln!(
            "lab: warning: a killed lab run left {} thing(s) ({}); `cargo xtask lab down` \
             removes them",
            dead.len(),
            dead.join(", ")
        );
    }
}

/// Something a lab run made.
enum Thing {
    Namespace(String),
    Process(u32, String),
    Mount(String),
    TempDir(PathBuf),
}

impl std::fmt::Display for Thing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Thing::Namespace(n) => write!(f, "namespace {n}"),
            Thing::Process(pid, cmd) => write!(f, "process {pid}: {cmd}"),
            Thing::Mount(m) => write!(f, "mount {m}"),
            Thing::TempDir(d) => write!(f, "temp dir {}", d.display()),
        }
    }
}

/// A [`Thing`] and the pid of the run that made it, when that can be told (a temp dir
/// of an xtask from before the pid was in its name cannot).
struct Resource {
    owner: Option<u32>,
    thing: Thing,
}

/// Where the lab's temp dirs start: `/tmp/fllab-`.
fn temp_prefix() -> String {
    std::env::temp_dir()
        .join(PREFIX)
        .to_string_lossy()
        .into_owned()
}

/// The run whose temp dir `s` names: `.../fllab-1234-Ab3dE9/etcd` → 1234. A run's temp
/// dir is `fllab-<pid>-*`, so its processes (whose command lines name files in it) and
/// mounts (below it) are told apart from another run's.
fn path_owner(s: &str) -> Option<u32> {
    let rest = &s[s.find(&temp_prefix())? + temp_prefix().len()..];
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Everything any lab run made that still exists, with its owner.
fn resources() -> Vec<Resource> {
    let mut found: Vec<Resource> = output(Command::new("ip").args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(|n| Resource {
            owner: owner(n),
            thing: Thing::Namespace(n.to_owned()),
        })
        .collect();
    let prefix = temp_prefix();
    let me = std::process::id();
    for pid in fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
    {
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(&prefix) {
            found.push(Resource {
                owner: path_owner(&cmd),
                thing: Thing::Process(pid, cmd.trim().to_owned()),
            });
        }
    }
    let mut mounts: Vec<String> = fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    // Deepest first, so a mount below another goes before it.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts.dedup();
    found.extend(mounts.into_iter().map(|m| Resource {
        owner: path_owner(&m),
        thing: Thing::Mount(m),
    }));
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(PREFIX)
            && e.file_type().is_ok_and(|t| t.is_dir())
        {
            let path = e.path();
            found.push(Resource {
                owner: path_owner(&path.to_string_lossy()),
                thing: Thing::TempDir(path),
            });
        }
    }
    found
}

/// What the lab run with pid `run` left behind, in words; empty when nothing is left.
/// Only that run's: another run going on meanwhile is none of its business. `cargo
/// xtask test` checks this after `lab --once`.
pub fn leftovers(run: u32) -> Vec<String> {
    resources()
        .into_iter()
        .filter(|r| r.owner == Some(run))
        .map(|r| r.thing.to_string())
        .collect()
}

/// `cargo xtask lab down`: removes what killed runs left. A running lab is left alone
/// (it tears itself down on Ctrl-C); so is everything of it.
fn down() -> Result<()> {
    if !is_root() {
        bail!(
            "removing namespaces and mounts needs root: run it as root (e.g. sudo -E cargo \
             xtask lab down)"
        );
    }
    let mut live: Vec<u32> = resources()
        .iter()
        .filter_map(|r| r.owner.filter(|&p| run_alive(p)))
        .collect();
    live.sort_unstable();
    live.dedup();
    for pid in &live {
        println!(
            "lab down: leaving the running lab (pid {pid}) alone; stop it with Ctrl-C in its \
             terminal, or kill -INT {pid}"
        );
    }
    let dead = || {
        resources()
            .into_iter()
            .filter(|r| !r.owner.is_some_and(run_alive))
    };
    let mut removed = 0usize;
    // Namespaces first (with their processes), then what is left of the processes, the
    // mounts, and last the temp dirs the mounts were in.
    for r in dead() {
        if let Thing::Namespace(n) = &r.thing {
            println!("lab down: removing namespace {n} and its processes");
            kill_and_delete(n);
            removed += 1;
        }
    }
    for r in dead() {
        if let Thing::Process(pid, cmd) = &r.thing {
            println!("lab down: killing process {pid}: {cmd}");
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
            removed += 1;
        }
    }
    for r in dead() {
        if let Thing::Mount(m) = &r.thing {
            println!("lab down: unmounting {m}");
            let _ = Command::new("umount").args(["-l", m]).status();
            removed += 1;
        }
    }
    for r in dead() {
        if let Thing::TempDir(d) = &r.thing {
            println!("lab down: removing {}", d.display());
            if let Err(e) = fs::remove_dir_all(d) {
                eprintln!("lab down: cannot remove {}: {e}", d.display());
            }
            removed += 1;
        }
    }
    let left: Vec<String> = dead().map(|r| r.thing.to_string()).collect();
    if !left.is_empty() {
        bail!("lab down: still left: {}", left.join("; "));
    }
    if removed == 0 {
        println!("lab down: nothing to remove");
    } else {
        println!("lab down: done");
    }
    Ok(())
}

/// A namespace of this lab; a name in use means a killed run's leftovers.
fn lab_ns(role: &str) -> Result<Ns> {
    Ns::new(PREFIX, role).with_context(|| {
        format!(
            "cannot create namespace {PREFIX}{role}-*; if it is in use, run `cargo xtask lab down`"
        )
    })
}

/// One host: its namespace, its containers, its flanneld's files.
struct Host {
    // Field order is drop order: the containers go before their host.
    containers: Vec<Ns>,
    ns: Ns,
    name: String,
    /// Container addresses (filled once subnet.env is there).
    addrs: Vec<Ipv4Addr>,
    subnet_file: PathBuf,
}

fn env_value<'a>(env: &'a str, key: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

/// `10.5.34.1/24` → (10.5.34.1, 24).
fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.trim().split_once('/')?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((ip.parse().ok()?, len))
}

/// The container addresses behind a bridge holding `bridge` (.1): .2, .3, ...
fn container_addrs(bridge: Ipv4Addr, len: u8, count: u16) -> Option<Vec<Ipv4Addr>> {
    let size = 1u64 << (32 - u32::from(len));
    // .0 network, .1 bridge, the containers, the broadcast address.
    if u64::from(count) + 3 > size {
        return None;
    }
    Some(
        (1..=u32::from(count))
            .map(|j| Ipv4Addr::from(u32::from(bridge).wrapping_add(j)))
            .collect(),
    )
}

/// `flanneld status --json` for the flanneld writing `subnet_file`.
fn status(flanneld: &Path, subnet_file: &Path) -> Option<serde_json::Value> {
    let out = Command::new(flanneld)
        .args(["status", "--json"])
        .arg(format!("--subnet-file={}", subnet_file.display()))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn readyz(ns: &Ns, xtask: &Path) -> bool {
    ns.command(xtask)
        .args(["http-get", &format!("127.0.0.1:{HEALTHZ_PORT}"), "/readyz"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One ping with two retries.
fn ping(from: &Ns, to: Ipv4Addr) -> bool {
    let to = to.to_string();
    (0..3).any(|attempt| {
        if attempt > 0 {
            thread::sleep(Duration::from_millis(300));
        }
        !interrupted()
            && from
                .command("ping")
                .args(["-c", "1", "-W", "1", &to])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    })
}

fn build_host(ul: &Ns, i: u16, containers: u16, dir: &Path) -> Result<Host> {
    let name = format!("h{i}");
    let ns = lab_ns(&name)?;
    let ip = format!("{UNDERLAY}.{}", i + 1);
    let port = format!("p{i}");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &ul.name,
    ])?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ul.ip(&["link", "set", &port, "master", "br0"])?;
    ul.ip(&["link", "set", &port, "up"])?;
    ns.ip(&["route", "add", "default", "via", &format!("{UNDERLAY}.1")])?;
    output(ns.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
    ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
    let mut cs = Vec::new();
    for j in 1..=containers {
        let c = lab_ns(&format!("h{i}c{j}"))?;
        let veth = format!("vc{j}");
        ns.ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &c.name,
        ])?;
        ns.ip(&["link", "set", &veth, "master", "cni0"])?;
        cs.push(c);
    }
    let hdir = dir.join(&name);
    fs::create_dir_all(&hdir)?;
    Ok(Host {
        containers: cs,
        ns,
        subnet_file: hdir.join("subnet.env"),
        name,
        addrs: Vec::new(),
    })
}

/// Configures the container side from subnet.env, as Docker's `--bip`/`--mtu` would.
fn attach_containers(h: &mut Host, env: &str, count: u16) -> Result<()> {
    let subnet = env_value(env, "FLANNEL_SUBNET").context("subnet.env has no FLANNEL_SUBNET")?;
    let mtu = env_value(env, "FLANNEL_MTU").context("subnet.env has no FLANNEL_MTU")?;
    let (bridge, len) =
        parse_cidr(subnet).with_context(|| format!("bad FLANNEL_SUBNET {subnet}"))?;
    let addrs = container_addrs(bridge, len, count)
        .with_context(|| format!("{count} containers do not fit in {subnet}"))?;
    h.ns.ip(&["addr", "add", subnet, "dev", "cni0"])?;
    h.ns.ip(&["link", "set", "cni0", "mtu", mtu, "up"])?;
    let gw = bridge.to_string();
    for (j, (c, addr)) in h.containers.iter().zip(&addrs).enumerate() {
        h.ns.ip(&["link", "set", &format!("vc{}", j + 1), "mtu", mtu, "up"])?;
        c.ip(&["link", "set", "eth0", "mtu", mtu, "up"])?;
        c.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", "eth0"])?;
        c.ip(&["route", "add", "default", "via", &gw])?;
    }
    h.addrs = addrs;
    Ok(())
}

/// One row of the table.
struct Row {
    host: String,
    public_ip: String,
    subnet: String,
    backend: String,
    dataplane: String,
    peers: String,
    health: String,
    connectivity: String,
}

fn print_table(rows: &[Row]) {
    let header = Row {
        host: "host".into(),
        public_ip: "PublicIP".into(),
        subnet: "subnet".into(),
        backend: "backend".into(),
        dataplane: "dataplane".into(),
        peers: "peers".into(),
        health: "health".into(),
        connectivity: "connectivity".into(),
    };
    for r in std::iter::once(&header).chain(rows) {
        println!(
            "{:<5} {:<12} {:<15} {:<8} {:<9} {:<5} {:<9} {}",
            r.host,
            r.public_ip,
            r.subnet,
            r.backend,
            r.dataplane,
            r.peers,
            r.health,
            r.connectivity
        );
    }
}

fn str_of(v: &serde_json::Value, key: &str) -> String {
    v[key]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("-")
        .to_owned()
}

fn run_lab(args: &LabArgs, flanneld: &Path, xtask: &Path, dir: &Path) -> Result<bool> {
    let n = usize::from(args.hosts);
    let m = args.containers;
    let config = network_config(args.backend, args.directrouting);
    println!(
        "lab: {n} hosts x {m} containers, {config}, --dataplane={}",
        args.dataplane.flag()
    );

    // Declaration order is teardown order reversed: flanneld, etcd, hosts with their
    // containers, the bpffs, the underlay.
    let ul = lab_ns("ul")?;
    ul.underlay_switch(&format!("{UNDERLAY}.1/24"))?;
    let bpffs = BpffsMount::new(dir.join("bpffs"))?;
    let mut hosts = Vec::new();
    for i in 1..=args.hosts {
        hosts.push(build_host(&ul, i, m, dir)?);
    }

    let endpoint = format!("http://{UNDERLAY}.1:2379");
    let mut etcd_cmd = ul.command("etcd");
    etcd_cmd.args([
        "--name=lab".to_owned(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={endpoint}"),
        format!("--advertise-client-urls={endpoint}"),
        format!("--listen-peer-urls=http://{UNDERLAY}.1:2380"),
        format!("--initial-advertise-peer-urls=http://{UNDERLAY}.1:2380"),
        format!("--initial-cluster=lab=http://{UNDERLAY}.1:2380"),
    ]);
    let mut etcd = Proc::spawn(etcd_cmd, dir.join("etcd.log"))?;
    let etcdctl = |a: &[&str]| {
        let mut cmd = ul.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(a);
        output(&mut cmd)
    };
    if wait_for("etcd", Duration::from_secs(20), || {
        etcdctl(&["endpoint", "health"]).ok()
    })?
    .is_none()
    {
        bail!(
            "etcd did not become healthy; exit {:?}; log:\n{}",
            etcd.exited(),
            etcd.log()
        );
    }
    etcdctl(&["put", &format!("{ETCD_PREFIX}/config"), &config])?;
    println!("lab: etcd at {endpoint}");

    let mut agents = Vec::new();
    for h in &hosts {
        let mut cmd = h.ns.command(flanneld);
        cmd.args([
            format!("--etcd-endpoints={endpoint}"),
            "--iface=eth0".to_owned(),
            format!("--subnet-file={}", h.subnet_file.display()),
            format!("--state-dir={}", dir.join(&h.name).join("state").display()),
            format!("--bpf-pin-dir={}", bpffs.pin_dir(&h.name).display()),
            format!("--dataplane={}", args.dataplane.flag()),
            "--healthz-ip=127.0.0.1".to_owned(),
            format!("--healthz-port={HEALTHZ_PORT}"),
        ]);
        agents.push(Proc::spawn(cmd, dir.join(&h.name).join("flanneld.log"))?);
    }

    // READY on every host (or its flanneld exited).
    let mut ready = vec![false; n];
    let mut dead = vec![false; n];
    wait_for("READY on every host", Duration::from_secs(45), || {
        for i in 0..n {
            if ready[i] || dead[i] {
                continue;
            }
            if agents[i].exited().is_some() {
                dead[i] = true;
                continue;
            }
            ready[i] = hosts[i].subnet_file.is_file() && readyz(&hosts[i].ns, xtask);
        }
        (0..n).all(|i| ready[i] || dead[i]).then_some(())
    })?;
    for (i, h) in hosts.iter_mut().enumerate() {
        if !ready[i] {
            println!("lab: {} is not READY", h.name);
            continue;
        }
        let env = fs::read_to_string(&h.subnet_file)?;
        attach_containers(h, &env, m)?;
    }
    println!(
        "lab: {}/{n} hosts READY; waiting for every host to program its peers",
        ready.iter().filter(|r| **r).count()
    );
    let peers_of = |i: usize| {
        status(flanneld, &hosts[i].subnet_file)
            .and_then(|s| s["peers"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    wait_for("peers", Duration::from_secs(20), || {
        (0..n)
            .filter(|&i| ready[i])
            .all(|i| peers_of(i) >= n - 1)
            .then_some(())
    })?;

    // Every container pair, one thread per source container.
    let targets: Vec<Ipv4Addr> = hosts.iter().flat_map(|h| h.addrs.clone()).collect();
    let per_host_total = usize::from(m) * (n * usize::from(m) - 1);
    let started = Instant::now();
    let results: Vec<(usize, bool, Ipv4Addr, Ipv4Addr)> = thread::scope(|s| {
        let mut jobs = Vec::new();
        for (hi, h) in hosts.iter().enumerate() {
            for (ci, c) in h.containers.iter().enumerate() {
                let from = h.addrs.get(ci).copied();
                let targets = &targets;
                jobs.push(s.spawn(move || {
                    let Some(from) = from else {
                        // Not configured: every ping from it fails.
                        return vec![
                            (hi, false, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
                            n * usize::from(m) - 1
                        ];
                    };
                    targets
                        .iter()
                        .filter(|&&t| t != from)
                        .map(|&t| (hi, ping(c, t), from, t))
                        .collect::<Vec<_>>()
                }));
            }
        }
        jobs.into_iter()
            .flat_map(|j| j.join().unwrap_or_default())
            .collect()
    });
    if interrupted() {
        bail!("interrupted");
    }
    let total = results.len();
    let ok_count = results.iter().filter(|r| r.1).count();
    println!(
        "lab: {ok_count}/{total} container pairs ping in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let st = status(flanneld, &h.subnet_file).unwrap_or_default();
        let ok = results.iter().filter(|r| r.0 == i && r.1).count();
        rows.push(Row {
            host: h.name.clone(),
            public_ip: str_of(&st, "public_ip"),
            subnet: str_of(&st, "subnet"),
            backend: str_of(&st, "backend"),
            dataplane: str_of(&st, "dataplane"),
            peers: st["peers"]
                .as_array()
                .map_or_else(|| "-".to_owned(), |p| p.len().to_string()),
            health: if readyz(&h.ns, xtask) {
                "ready".to_owned()
            } else {
                "NOT READY".to_owned()
            },
            connectivity: format!("{ok}/{per_host_total}"),
        });
    }
    println!();
    print_table(&rows);
    println!();
    let full = ok_count == total && total == n * usize::from(m) * (n * usize::from(m) - 1);
    if full {
        println!("lab: full connectivity ({ok_count}/{total})");
    } else {
        println!("lab: connectivity INCOMPLETE ({ok_count}/{total})");
        for (i, h) in hosts.iter().enumerate() {
            if h.addrs.is_empty() {
                println!(
                    "  {}: its containers have no address (the host is not READY)",
                    h.name
                );
            }
            for r in results
                .iter()
                .filter(|r| r.0 == i && !r.1 && !r.2.is_unspecified())
            {
                println!("  no reply: {} -> {}", r.2, r.3);
            }
        }
        for (i, a) in agents.iter_mut().enumerate() {
            if let Some(st) = a.exited() {
                println!("  {} flanneld exited: {st}", hosts[i].name);
            }
            let log = a.log();
            let lines: Vec<&str> = log.lines().collect();
            println!("---- {} flanneld log (last 15 lines) ----", hosts[i].name);
            for l in &lines[lines.len().saturating_sub(15)..] {
                println!("{l}");
            }
        }
    }
    if args.once {
        return Ok(full);
    }

    live(flanneld, &hosts, &rows);
    println!("lab: tearing down");
    drop(agents);
    drop(etcd);
    Ok(full)
}

/// Refreshes the per-peer counters every 2 s until Ctrl-C, with the byte rates since the
/// previous refresh.
fn live(flanneld: &Path, hosts: &[Host], rows: &[Row]) {
    let tty = std::io::stdout().is_terminal();
    let mut hint = vec!["Try it, from another shell:".to_owned()];
    let from = hosts.first().and_then(|a| a.containers.first());
    if let (Some(c), Some(to)) = (from, hosts.last().and_then(|b| b.addrs.last())) {
        hint.push(format!("  ip netns exec {} ping {to}", c.name));
    }
    for h in hosts {
        for (c, addr) in h.containers.iter().zip(&h.addrs) {
            hint.push(format!("  {:<20} {addr}", c.name));
        }
    }
    let mut prev: std::collections::HashMap<(String, String), (u64, u64)> =
        std::collections::HashMap::new();
    if !tty {
        for l in &hint {
            println!("{l}");
        }
        println!();
    }
    let mut last = Instant::now();
    while !interrupted() {
        let secs = last.elapsed().as_secs_f64().max(0.001);
        last = Instant::now();
        if tty {
            print!("\x1b[2J\x1b[H");
            print_table(rows);
            println!();
            for l in &hint {
                println!("{l}");
            }
            println!();
        }
        println!(
            "{:<5} {:<15} {:<12} {:>9} {:>11} {:>10} {:>9} {:>11} {:>10}",
            "host",
            "peer subnet",
            "peer IP",
            "tx pkts",
            "tx bytes",
            "tx B/s",
            "rx pkts",
            "rx bytes",
            "rx B/s"
        );
        for h in hosts {
            let st = status(flanneld, &h.subnet_file).unwrap_or_default();
            for p in st["peers"].as_array().into_iter().flatten() {
                let num = |k: &str| p[k].as_u64().unwrap_or(0);
                let (tx, rx) = (num("tx_bytes"), num("rx_bytes"));
                let key = (h.name.clone(), str_of(p, "subnet"));
                let (ptx, prx) = prev.insert(key, (tx, rx)).unwrap_or((tx, rx));
                let rate = |now: u64, before: u64| {
                    // Whole bytes per second are all a human reads here.
                    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
                    let r = (now.saturating_sub(before) as f64 / secs) as u64;
                    r
                };
                println!(
                    "{:<5} {:<15} {:<12} {:>9} {:>11} {:>10} {:>9} {:>11} {:>10}",
                    h.name,
                    str_of(p, "subnet"),
                    str_of(p, "public_ip"),
                    num("tx_packets"),
                    tx,
                    rate(tx, ptx),
                    num("rx_packets"),
                    rx,
                    rate(rx, prx),
                );
            }
        }
        println!("(refreshing every 2 s; Ctrl-C stops the lab and tears it down)");
        if !tty {
            println!();
        }
        let until = Instant::now() + Duration::from_secs(2);
        while !interrupted() && Instant::now() < until {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_per_backend() {
        assert_eq!(
            network_config(Backend::Vxlan, false),
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#
        );
        assert_eq!(
            network_config(Backend::Vxlan, true),
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#
        );
        assert_eq!(
            network_config(Backend::HostGw, false),
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#
        );
    }

    #[test]
    fn containers_follow_the_bridge() {
        let (ip, len) = parse_cidr("10.5.34.1/24").unwrap();
        assert_eq!(len, 24);
        let a = container_addrs(ip, len, 2).unwrap();
        assert_eq!(
            a,
            [
                "10.5.34.2".parse::<Ipv4Addr>().unwrap(),
                "10.5.34.3".parse().unwrap()
            ]
        );
        assert_eq!(container_addrs(ip, 30, 2), None);
        assert_eq!(parse_cidr("nonsense"), None);
    }

    #[test]
    fn owner_is_the_last_dash_field() {
        assert_eq!(owner("fllab-h1c2-4242"), Some(4242));
        assert_eq!(owner("fllab-ul"), None);
    }

    #[test]
    fn paths_name_their_run() {
        let tmp = temp_prefix();
        assert_eq!(path_owner(&format!("{tmp}4242-Ab3dE9")), Some(4242));
        assert_eq!(
            path_owner(&format!("etcd --data-dir={tmp}77-xYz123/etcd --name=lab")),
            Some(77)
        );
        // A temp dir from before the pid was in the name.
        assert_eq!(path_owner(&format!("{tmp}Ab3dE9")), None);
        assert_eq!(path_owner("/var/lib/other"), None);
    }

    #[test]
    fn env_values() {
        let env = "FLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\n";
        assert_eq!(env_value(env, "FLANNEL_MTU"), Some("1450"));
        assert_eq!(env_value(env, "FLANNEL_IPMASQ"), None);
    }
}
