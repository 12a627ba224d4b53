//! READY of the real `flanneld` binary with N existing leases.
//!
//! flanneld needs an interface with an IPv4 address and builds its dataplane in the
//! network namespace it runs in, so as root the whole control-plane bench runs inside a
//! namespace of its own, `flcpbench-ns-PID`, whose `eth0` is one end of a veth pair
//! with both ends inside: [`in_namespace`] creates it, runs this bench again inside it,
//! and removes it (with everything that runs in it) afterwards, on error and on Ctrl-C.
//! Inside, etcd listens on that namespace's loopback, so the simulated agents, the
//! in-process READY and the binary all use the same etcd. The host's own interfaces and
//! routes are never touched: every `ip` command below names the namespace.
//!
//! Each start is a new node joining the cluster: a new address on `eth0`, a fresh state
//! dir and subnet file, so it acquires a new lease among the N. The time is from the
//! spawn of the process to the `READY=1` it sends to `$NOTIFY_SOCKET` (after its lease,
//! its `flannel.1`, its host rules and subnet.env, as flanneld tells systemd).

use std::{
    fs,
    os::unix::{fs::MetadataExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::Opts;
use crate::{
    netns::{Ns, Proc, interrupted, kill_and_delete, owner, run_alive},
    util::{cargo, output, target_dir},
};

/// Set for the bench run inside the namespace: the namespace's name.
const NS_ENV: &str = "FLCPBENCH_NETNS";
const PREFIX: &str = "flcpbench-";
/// Starts of the binary; the report gives min, median and max.
pub const STARTS: usize = 5;
/// The namespace's `eth0` is `172.31.250.<10 + start>/24`: outside the bench's network
/// (10.0.0.0/8) and the simulated agents' PublicIPs (100.64.0.0/10).
const IFACE_NET: &str = "172.31.250";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Inside the bench's namespace: its name and the flanneld to start.
pub struct Inside {
    pub ns: String,
    pub flanneld: PathBuf,
    /// Where the starts keep their files (the temp dir of the run).
    pub dir: PathBuf,
}

/// True when this run should move into a namespace of its own: as root, and not
/// already inside it. Without root the binary is not measured, and says why.
pub fn wants_namespace() -> bool {
    crate::util::is_root() && std::env::var_os(NS_ENV).is_none()
}

/// Whether this process is the bench run inside its namespace, checked: the
/// environment names the namespace and this process is in it (same nsfs inode), so
/// flanneld can never be started in the host's namespace by a stray variable.
pub fn inside(opts: &Opts) -> Result<Option<Inside>> {
    let Some(ns) = std::env::var_os(NS_ENV) else {
        return Ok(None);
    };
    let ns = ns.to_string_lossy().into_owned();
    let ours = fs::metadata("/proc/self/ns/net").context("stat /proc/self/ns/net")?;
    let named =
        fs::metadata(format!("/run/netns/{ns}")).with_context(|| format!("namespace {ns}"))?;
    if (ours.dev(), ours.ino()) != (named.dev(), named.ino()) {
        bail!("{NS_ENV} names namespace {ns}, but this process does not run in it");
    }
    let flanneld = opts
        .flanneld
        .clone()
        .context("inside the bench's namespace without --flanneld")?;
    Ok(Some(Inside {
        ns,
        flanneld,
        dir: std::env::temp_dir(),
    }))
}

/// As root: runs the control-plane bench again inside a namespace of its own (see the
/// module's comment) and removes the namespace afterwards.
pub fn in_namespace(opts: &Opts) -> Result<()> {
    crate::netns::on_ctrl_c()?;
    clean_leftovers();
    let flanneld = match &opts.flanneld {
        Some(f) => f.clone(),
        None => build_flanneld()?,
    };
    if !flanneld.is_file() {
        bail!("no flanneld at {}", flanneld.display());
    }
    let pid = std::process::id();
    // `flcpbench-PID-*`: the child's temp dirs (etcd's data, the starts' files) go below
    // it, so they are removed with it even if the child is killed.
    let dir = tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{pid}-"))
        .tempdir()?;
    // A private copy: `ip netns exec` runs a path, and a rebuild may replace ours.
    let me = dir.path().join("xtask");
    fs::copy("/proc/self/exe", &me).context("copy the running xtask binary")?;
    let ns = Ns::new(PREFIX, "ns")?;
    // A veth pair with both ends inside: an interface that is up and can hold the
    // address flanneld needs (this kernel may have no dummy driver).
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
    ])?;
    for dev in ["eth0", "eth0peer"] {
        ns.ip(&["link", "set", dev, "up"])?;
    }

    let mut cmd = ns.command(&me);
    cmd.args(["bench", "--control-plane"])
        .arg(format!("--agents={}", opts.agents))
        .arg(format!("--leases-for-ready={}", opts.leases_for_ready))
        .arg("--flanneld")
        .arg(&flanneld)
        .arg("--out")
        .arg(out_dir(opts))
        .env(NS_ENV, &ns.name)
        .env("TMPDIR", dir.path());
    if opts.check {
        cmd.arg("--check");
    }
    eprintln!(
        "control-plane bench: running in namespace {} (flanneld {})",
        ns.name,
        flanneld.display()
    );
    let mut child = cmd.spawn().context("start the bench in its namespace")?;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Declared after `dir`, dropped before it: whatever still runs in the namespace is
    // killed before its files go.
    drop(ns);
    if !status.success() {
        bail!("the control-plane bench failed ({status})");
    }
    Ok(())
}

/// Where report and JSON go, made absolute for the run in the namespace.
pub fn out_dir(opts: &Opts) -> PathBuf {
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench"));
    std::path::absolute(&out).unwrap_or(out)
}

/// The namespaces of killed runs (a live run's are left alone).
fn clean_leftovers() {
    let list = output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
    {
        if !owner(name).is_some_and(run_alive) {
            eprintln!("control-plane bench: removing the leftover namespace {name}");
            kill_and_delete(name);
        }
    }
}

/// flanneld as the dataplane bench's rows run it: a release build.
fn build_flanneld() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--bin", "flanneld"]);
    crate::util::run(&mut cmd).context("build flanneld for the READY measurement")?;
    Ok(target_dir().join("release/flanneld"))
}

/// What the starts of the binary gave.
pub struct BinaryReady {
    pub flanneld: PathBuf,
    /// Spawn → READY=1, per start that reached it.
    pub times: Vec<Duration>,
    /// Why the other starts did not.
    pub failures: Vec<String>,
}

/// [`STARTS`] starts of flanneld against `endpoint`, each a new node.
pub fn measure(inside: &Inside, endpoint: &str) -> BinaryReady {
    let mut out = BinaryReady {
        flanneld: inside.flanneld.clone(),
        times: Vec::new(),
        failures: Vec::new(),
    };
    for k in 0..STARTS {
        match start(inside, endpoint, k) {
            Ok(t) => {
                eprintln!(
                    "  flanneld start {}: READY=1 after {:.1} ms",
                    k + 1,
                    t.as_secs_f64() * 1e3
                );
                out.times.push(t);
            }
            Err(e) => {
                eprintln!("  flanneld start {}: {e:#}", k + 1);
                out.failures.push(format!("start {}: {e:#}", k + 1));
            }
        }
        // Each start is a new node: its device, routes and neighbours go with it.
        let _ = output(Command::new("ip").args(["-n", &inside.ns, "link", "del", "flannel.1"]));
        if interrupted() {
            break;
        }
    }
    out
}

/// One start: spawn, wait for READY=1 on the notify socket, stop.
fn start(inside: &Inside, endpoint: &str, k: usize) -> Result<Duration> {
    let ns = inside.ns.as_str();
    let addr = format!("{IFACE_NET}.{}/24", 10 + k);
    output(Command::new("ip").args(["-n", ns, "addr", "flush", "dev", "eth0"]))?;
    output(Command::new("ip").args(["-n", ns, "addr", "add", &addr, "dev", "eth0"]))?;
    let dir = inside.dir.join(format!("flanneld-{}", k + 1));
    fs::create_dir_all(&dir)?;
    let sock_path = dir.join("notify.sock");
    let sock =
        UnixDatagram::bind(&sock_path).with_context(|| format!("bind {}", sock_path.display()))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;

    let mut cmd = Command::new(&inside.flanneld);
    cmd.arg(format!("--etcd-endpoints={endpoint}"))
        .arg("--iface=eth0")
        .arg(format!(
            "--subnet-file={}",
            dir.join("subnet.env").display()
        ))
        .arg(format!("--state-dir={}", dir.join("state").display()))
        .arg(format!("--bpf-pin-dir={}", dir.join("bpf").display()))
        .arg("--dataplane=kernel")
        .env("NOTIFY_SOCKET", &sock_path);
    let t0 = Instant::now();
    let mut proc = Proc::spawn(cmd, dir.join("flanneld.log"))?;
    let mut buf = [0u8; 512];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) if ready_message(&buf[..n]) => return Ok(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("read the notify socket"),
        }
        if let Some(st) = proc.exited() {
            bail!(
                "flanneld exited ({st}) before READY=1: {}",
                last_lines(&proc.log())
            );
        }
        if interrupted() {
            bail!("interrupted");
        }
        if t0.elapsed() > READY_TIMEOUT {
            bail!(
                "no READY=1 within {READY_TIMEOUT:?}: {}",
                last_lines(&proc.log())
            );
        }
    }
}

/// sd_notify datagrams are newline-separated `KEY=VALUE` lines.
fn ready_message(msg: &[u8]) -> bool {
    String::from_utf8_lossy(msg)
        .lines()
        .any(|l| l.trim() == "READY=1")
}

fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// The binary, for the report: its path and profile.
pub fn describe(b: &BinaryReady) -> String {
    let kind = if b.flanneld.components().any(|c| c.as_os_str() == "release") {
        "release build"
    } else if b.flanneld.components().any(|c| c.as_os_str() == "debug") {
        "debug build"
    } else {
        "build"
    };
    format!("`{}` ({kind})", display_path(&b.flanneld))
}

fn display_path(p: &Path) -> String {
    let root = crate::util::workspace_root();
    p.strip_prefix(&root)
        .map_or_else(|_| p.display().to_string(), |r| r.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_a_line_of_its_own() {
        assert!(ready_message(b"READY=1"));
        assert!(ready_message(b"STATUS=up\nREADY=1\n"));
        assert!(!ready_message(b"READY=0"));
        assert!(!ready_message(b"NOTREADY=1"));
    }
}
