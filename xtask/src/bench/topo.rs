//! The bench topology: namespaces, processes, the underlay with etcd, hosts and containers.
//!
//! Everything is created inside namespaces named `flbench-<role>-<pid>` and removed on
//! drop, so an error, a panic or Ctrl-C (which makes every wait fail and unwinds) leaves
//! nothing behind. The host's own interfaces, routes and firewall are never touched.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{interrupted, wait_for};
pub use crate::netns::{Ns, Proc};
use crate::netns::{kill_and_delete, run_alive};
use crate::util::{output, show};

/// Every namespace of a bench run starts with this.
pub const PREFIX: &str = "flbench-";
/// The underlay /24; the bridge in the underlay namespace is `.1`, host `i` is `.(i+1)`.
pub const UNDERLAY: &str = "10.98.0";
pub const ETCD_PREFIX: &str = "/coreos.com/network";

/// Machine-wide: one bench measures at a time. Held for the whole run.
pub struct BenchLock {
    _file: fs::File,
}

/// Where the lock lives: `/run/lock` (a tmpfs, so a reboot clears it), else the temp dir.
fn lock_path() -> std::path::PathBuf {
    let run_lock = Path::new("/run/lock");
    let dir = if run_lock.is_dir() {
        run_lock.to_owned()
    } else {
        std::env::temp_dir()
    };
    dir.join("flannel-rs-bench.lock")
}

/// Waits until no other bench runs, then removes the `flbench-` namespaces a killed run
/// left. Two benches at once would measure each other, and two `cargo xtask test` runs
/// each run one: the second waits for the first instead of failing. The lock (an
/// advisory `flock`, released when the process ends, even killed) is the turn; a live
/// run's namespaces (e.g. of an xtask that predates the lock) are waited for as well, and
/// only those of dead runs are removed.
pub fn take_turn() -> Result<BenchLock> {
    let path = lock_path();
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open the bench lock {}", path.display()))?;
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("lock {}", path.display()));
            }
        }
        if !said {
            eprintln!(
                "bench: another bench holds {}; waiting for it to finish",
                path.display()
            );
            said = true;
        }
        if interrupted() {
            bail!("interrupted while waiting for another bench to finish");
        }
        thread::sleep(Duration::from_millis(500));
    }
    let live = || {
        namespaces()
            .into_iter()
            .filter_map(|n| {
                crate::netns::owner(&n)
                    .filter(|&p| run_alive(p))
                    .map(|p| (n, p))
            })
            .next()
    };
    // An hour is longer than any run; a stuck one should not block forever.
    let waited = wait_for(
        "another bench to finish",
        Duration::from_secs(3600),
        || match live() {
            None => Some(()),
            Some((name, pid)) => {
                if !said {
                    eprintln!(
                        "bench: namespace {name} belongs to a running bench (pid {pid}); \
                         waiting for it to finish"
                    );
                    said = true;
                }
                None
            }
        },
    )?;
    if waited.is_none() {
        bail!("another bench (namespaces flbench-*) is still running after an hour");
    }
    for name in namespaces() {
        if crate::netns::owner(&name).is_some_and(run_alive) {
            continue;
        }
        eprintln!("bench: removing the leftover namespace {name}");
        kill_and_delete(&name);
    }
    Ok(BenchLock { _file: file })
}

/// The namespaces named `flbench-*`.
fn namespaces() -> Vec<String> {
    output(Command::new("ip").args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Runs a short-lived command to completion with its stdout in `out_file`, giving up after
/// `timeout` or on Ctrl-C (the command is killed either way). Returns its stdout.
pub fn run_bounded(mut cmd: Command, out_file: &Path, timeout: Duration) -> Result<String> {
    let what = show(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(out_file)?)
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupted() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            if interrupted() {
                bail!("interrupted");
            }
            bail!("{what} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = fs::read_to_string(out_file).unwrap_or_default();
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        bail!(
            "{what} failed ({status}): {} {}",
            stderr.trim(),
            tail(&stdout, 3)
        );
    }
    Ok(stdout)
}

/// The last `n` lines of `s`, joined by " | ".
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// The underlay namespace: bridge `br0` with `.1`, and etcd listening there.
pub struct Underlay {
    // Field order is drop order: etcd stops before its namespace goes.
    etcd: Proc,
    pub ns: Ns,
    pub endpoint: String,
}

impl Underlay {
    pub fn new(dir: &Path) -> Result<Underlay> {
        let ns = Ns::new(PREFIX, "ul")?;
        ns.underlay_switch(&format!("{UNDERLAY}.1/24"))?;
        let endpoint = format!("http://{UNDERLAY}.1:2379");
        let mut cmd = ns.command("etcd");
        cmd.args([
            "--name=bench".to_owned(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
            format!("--listen-peer-urls=http://{UNDERLAY}.1:2380"),
            format!("--initial-advertise-peer-urls=http://{UNDERLAY}.1:2380"),
            format!("--initial-cluster=bench=http://{UNDERLAY}.1:2380"),
        ]);
        let etcd = Proc::spawn(cmd, dir.join("etcd.log"))?;
        let mut ul = Underlay { etcd, ns, endpoint };
        let healthy = wait_for("etcd", Duration::from_secs(20), || {
            ul.etcdctl(&["endpoint", "health"]).ok()
        })?;
        if healthy.is_none() {
            bail!(
                "etcd did not become healthy; exit {:?}; log: {}",
                ul.etcd.exited(),
                tail(&ul.etcd.log(), 10)
            );
        }
        Ok(ul)
    }

    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.ns.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .args(args);
        output(&mut cmd)
    }

    /// A fresh network config with no leases left from an earlier row.
    pub fn set_network_config(&self, config: &str) -> Result<()> {
        self.etcdctl(&["del", "--prefix", &format!("{ETCD_PREFIX}/subnets/")])?;
        self.etcdctl(&["put", &format!("{ETCD_PREFIX}/config"), config])?;
        Ok(())
    }
}

/// One "node": a host namespace on the underlay and a container namespace behind it.
pub struct Host {
    // Drop order: the container first, then the host (whose veth into the underlay goes
    // with it).
    pub container: Ns,
    pub ns: Ns,
    /// The host's underlay address (on its `eth0`).
    pub ip: String,
    /// The host's bridge port in the underlay namespace.
    pub port: String,
}

/// Builds host `i` (1-based) for row number `row`: `eth0` on the underlay bridge, a
/// bridge `cni0` with a veth `veth0` to the container's `eth0`, forwarding on. The
/// addresses behind `cni0` depend on the row's subnet, see [`Host::attach_container`].
pub fn host(ul: &Underlay, i: usize, row: usize) -> Result<Host> {
    let ns = Ns::new(PREFIX, &format!("h{i}"))?;
    let ip = format!("{UNDERLAY}.{}", i + 1);
    // Unique per row: the previous row's port may linger while the kernel destroys its
    // namespace asynchronously.
    let port = format!("r{row}h{i}");
    ns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        &port,
        "netns",
        &ul.ns.name,
    ])?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ul.ns.ip(&["link", "set", &port, "master", "br0"])?;
    ul.ns.ip(&["link", "set", &port, "up"])?;
    ns.sysctl("net.ipv4.ip_forward=1")?;
    ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
    let container = Ns::new(PREFIX, &format!("c{i}"))?;
    ns.ip(&[
        "link",
        "add",
        "veth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &container.name,
    ])?;
    ns.ip(&["link", "set", "veth0", "master", "cni0"])?;
    Ok(Host {
        container,
        ns,
        ip,
        port,
    })
}

impl Host {
    /// Addresses the container side as Docker with `--bip=<subnet>.1/24 --mtu=<mtu>`
    /// would: `.1` on `cni0`, `.2` in the container with a default route via `.1`.
    pub fn attach_container(&self, subnet: &Subnet, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        self.ns
            .ip(&["addr", "add", &subnet.host(1, true), "dev", "cni0"])?;
        for dev in ["veth0", "cni0"] {
            self.ns.ip(&["link", "set", dev, "mtu", &mtu, "up"])?;
        }
        let c = &self.container;
        c.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
        c.ip(&["addr", "add", &subnet.host(2, true), "dev", "eth0"])?;
        c.ip(&["route", "add", "default", "via", &subnet.host(1, false)])?;
        Ok(())
    }
}

/// An IPv4 /24 container subnet such as 10.6.34.0/24 (what flannel leases by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    /// The first three octets, `10.6.34`.
    pub prefix: String,
}

impl Subnet {
    /// From `FLANNEL_SUBNET` (`10.6.34.1/24`); only /24 leases are supported here.
    pub fn from_flannel_subnet(s: &str) -> Option<Subnet> {
        let (ip, len) = s.trim().split_once('/')?;
        if len != "24" {
            return None;
        }
        let ip: std::net::Ipv4Addr = ip.parse().ok()?;
        let o = ip.octets();
        Some(Subnet {
            prefix: format!("{}.{}.{}", o[0], o[1], o[2]),
        })
    }

    /// `.n`, with `/24` appended when `with_len`.
    pub fn host(&self, n: u8, with_len: bool) -> String {
        if with_len {
            format!("{}.{n}/24", self.prefix)
        } else {
            format!("{}.{n}", self.prefix)
        }
    }

    /// The network, `10.6.34.0/24`.
    pub fn cidr(&self) -> String {
        self.host(0, true)
    }
}

/// Turns TSO, GSO and GRO off on every veth on the path c1 → h1 → underlay → h2 → c2.
pub fn offloads_off(ul: &Underlay, hosts: &[Host]) -> Result<()> {
    let mut devs: Vec<(&Ns, &str)> = Vec::new();
    for h in hosts {
        devs.extend([
            (&h.container, "eth0"),
            (&h.ns, "veth0"),
            (&h.ns, "eth0"),
            (&ul.ns, h.port.as_str()),
        ]);
    }
    for (ns, dev) in devs {
        ns.exec(
            "ethtool",
            &["-K", dev, "tso", "off", "gso", "off", "gro", "off"],
        )
        .with_context(|| format!("offloads off on {dev} in {}", ns.name))?;
    }
    Ok(())
}

/// Waits until something listens on TCP `port` inside `ns`.
pub fn wait_listening(ns: &Ns, port: u16) -> Result<bool> {
    let filter = format!("sport = :{port}");
    Ok(wait_for("a listening server", Duration::from_secs(10), || {
        ns.exec("ss", &["-Hltn", &filter])
            .ok()
            .filter(|o| !o.trim().is_empty())
    })?
    .is_some())
}

/// One ping from `from` to `to`: true when a reply came back.
pub fn ping_once(from: &Ns, to: &str) -> bool {
    from.command("ping")
        .args(["-c", "1", "-W", "1", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pings until one crosses or `timeout` passes (the control plane may still be
/// programming the peer); then three more must all cross, so a flapping path fails.
pub fn ping_crosses(from: &Ns, to: &str, timeout: Duration) -> Result<bool> {
    if wait_for("a ping across", timeout, || {
        ping_once(from, to).then_some(())
    })?
    .is_none()
    {
        return Ok(false);
    }
    Ok(from
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "1", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_from_flannel_subnet() {
        let s = Subnet::from_flannel_subnet("10.6.34.1/24\n").unwrap();
        assert_eq!(s.cidr(), "10.6.34.0/24");
        assert_eq!(s.host(2, false), "10.6.34.2");
        assert_eq!(Subnet::from_flannel_subnet("10.6.34.1/25"), None);
        assert_eq!(Subnet::from_flannel_subnet("nonsense"), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\n\nc\n", 2), "b | c");
        assert_eq!(tail("", 2), "");
    }
}
