//! `cargo xtask smoke`: two flanneld hosts in network namespaces against one etcd.
//!
//! Everything lives in namespaces this task creates, and is deleted at the end, on
//! failure and on Ctrl-C/SIGTERM too; the host's own network is never touched:
//!
//! ```text
//!   flsmoke-ul-PID   bridge br0 10.99.0.1/24, etcd on http://10.99.0.1:2379
//!     ├── veth ── flsmoke-h1-PID  eth0 10.99.0.2/24, flanneld --iface=eth0
//!     └── veth ── flsmoke-h2-PID  eth0 10.99.0.3/24, flanneld --iface=eth0
//! ```
//!
//! It passes when both flanneld get distinct subnets, write subnet.env, answer /readyz
//! with 200, register a lease carrying their own PublicIP, and each logs the other as a
//! peer (a line containing `peer added` and the other's subnet).

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    netns::{Ns, Proc, wait_for},
    setup,
    util::{cargo, is_root, output, run, target_dir},
};

const UNDERLAY: &str = "10.99.0";
const ETCD_PREFIX: &str = "/coreos.com/network";
const NETWORK_CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HEALTHZ_PORT: u16 = 8471;
const HOSTS: usize = 2;

pub fn smoke() -> Result<()> {
    if !is_root() {
        bail!(
            "the smoke run creates network namespaces and needs root: \
             run it as root (e.g. sudo -E cargo xtask smoke)"
        );
    }
    setup::setup()?;
    crate::netns::on_ctrl_c()?;
    run(cargo().args(["build", "--bin", "flanneld"]))?;
    let flanneld = target_dir().join("debug/flanneld");
    let xtask = std::env::current_exe().context("locate the xtask binary")?;
    let dir = tempfile::Builder::new().prefix("flsmoke-").tempdir()?;
    if run_smoke(&flanneld, &xtask, dir.path())? {
        println!("smoke: PASS");
        Ok(())
    } else {
        bail!("smoke: FAIL")
    }
}

/// What one host reported.
#[derive(Default)]
struct HostReport {
    name: String,
    expected_ip: String,
    public_ip: Option<String>,
    subnet: Option<String>,
    network: Option<String>,
    mtu: Option<String>,
    ready: bool,
    peer_logged: bool,
    overlay_ping: Option<bool>,
    /// The dataplane `flanneld status` reports (ebpf, kernel, ...).
    dataplane: Option<String>,
}

/// `FLANNEL_SUBNET=10.5.34.1/24` → `10.5.34.0/24`: the lease's subnet.
fn subnet_of(flannel_subnet: &str) -> Option<String> {
    let (ip, len) = flannel_subnet.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Some(format!(
        "{}/{len}",
        std::net::Ipv4Addr::from(u32::from(ip) & mask)
    ))
}

fn env_value<'a>(env: &'a str, key: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The lease's `PublicIP` for `subnet` (`10.5.34.0/24`) from the etcd `subnets/` listing.
fn lease_public_ip(listing: &str, subnet: &str) -> Option<String> {
    let key = format!("{ETCD_PREFIX}/subnets/{}", subnet.replace('/', "-"));
    let mut lines = listing.lines();
    while let Some(k) = lines.next() {
        let v = lines.next()?;
        if k == key {
            let rest = v.split_once("\"PublicIP\":\"")?.1;
            return rest.split_once('"').map(|(ip, _)| ip.to_owned());
        }
    }
    None
}

fn run_smoke(flanneld: &Path, xtask: &Path, dir: &Path) -> Result<bool> {
    // Declaration order is teardown order reversed: flanneld first, then etcd, then the
    // host namespaces, the underlay last.
    let ul = Ns::new("flsmoke-", "ul")?;
    ul.underlay_switch(&format!("{UNDERLAY}.1/24"))?;
    let mut hosts = Vec::new();
    for i in 1..=HOSTS {
        let ns = Ns::new("flsmoke-", &format!("h{i}"))?;
        let ip = format!("{UNDERLAY}.{}", i + 1);
        let port = format!("ulp{i}");
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &ul.name,
        ])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ul.ip(&["link", "set", &port, "master", "br0"])?;
        ul.ip(&["link", "set", &port, "up"])?;
        ns.ip(&["route", "add", "default", "via", &format!("{UNDERLAY}.1")])?;
        hosts.push((ns, ip));
    }

    let endpoint = format!("http://{UNDERLAY}.1:2379");
    let mut etcd_cmd = ul.command("etcd");
    etcd_cmd.args([
        "--name=smoke".to_owned(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={endpoint}"),
        format!("--advertise-client-urls={endpoint}"),
        format!("--listen-peer-urls=http://{UNDERLAY}.1:2380"),
        format!("--initial-advertise-peer-urls=http://{UNDERLAY}.1:2380"),
        format!("--initial-cluster=smoke=http://{UNDERLAY}.1:2380"),
    ]);
    let mut etcd = Proc::spawn(etcd_cmd, dir.join("etcd.log"))?;
    let etcdctl = |args: &[&str]| {
        let mut cmd = ul.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args);
        output(&mut cmd)
    };
    let healthy = wait_for("etcd", Duration::from_secs(20), || {
        etcdctl(&["endpoint", "health"]).ok()
    })?;
    if healthy.is_none() {
        bail!(
            "etcd did not become healthy; exit {:?}; log:\n{}",
            etcd.exited(),
            etcd.log()
        );
    }
    etcdctl(&["put", &format!("{ETCD_PREFIX}/config"), NETWORK_CONFIG])?;
    println!("etcd at {endpoint}: {ETCD_PREFIX}/config = {NETWORK_CONFIG}");

    let bpffs = crate::util::BpffsMount::new(dir.join("bpffs"))?;
    let mut agents = Vec::new();
    for (i, (ns, _)) in hosts.iter().enumerate() {
        let hdir = dir.join(format!("h{}", i + 1));
        fs::create_dir_all(&hdir)?;
        let mut cmd = ns.command(flanneld);
        cmd.args([
            format!("--etcd-endpoints={endpoint}"),
            "--iface=eth0".to_owned(),
            format!("--subnet-file={}", hdir.join("subnet.env").display()),
            // Keep the VTEP MAC state inside the run's temp dir, not in /var/lib.
            format!("--state-dir={}", hdir.join("state").display()),
            format!(
                "--bpf-pin-dir={}",
                bpffs.pin_dir(&format!("h{}", i + 1)).display()
            ),
            "--healthz-ip=127.0.0.1".to_owned(),
            format!("--healthz-port={HEALTHZ_PORT}"),
        ]);
        println!("h{}: {}", i + 1, crate::util::show(&cmd));
        agents.push(Proc::spawn(
            cmd,
            dir.join(format!("h{}-flanneld.log", i + 1)),
        )?);
    }

    let mut reports: Vec<HostReport> = hosts
        .iter()
        .enumerate()
        .map(|(i, (_, ip))| HostReport {
            name: format!("h{}", i + 1),
            expected_ip: ip.clone(),
            ..HostReport::default()
        })
        .collect();

    // subnet.env and READY.
    for (i, (ns, _)) in hosts.iter().enumerate() {
        let env_path = dir.join(format!("h{}/subnet.env", i + 1));
        let agent = &mut agents[i];
        let ready = wait_for("subnet.env and /readyz", Duration::from_secs(60), || {
            if agent.exited().is_some() {
                return Some(false);
            }
            let env_ok = env_path.is_file();
            let ready = env_ok
                && ns
                    .command(xtask)
                    .args(["http-get", &format!("127.0.0.1:{HEALTHZ_PORT}"), "/readyz"])
                    .output()
                    .is_ok_and(|o| {
                        o.status.success()
                            && String::from_utf8_lossy(&o.stdout).contains("flanneld is ready")
                    });
            ready.then_some(true)
        })?;
        let r = &mut reports[i];
        r.ready = ready == Some(true);
        if let Ok(env) = fs::read_to_string(&env_path) {
            r.subnet = env_value(&env, "FLANNEL_SUBNET").map(str::to_owned);
            r.network = env_value(&env, "FLANNEL_NETWORK").map(str::to_owned);
            r.mtu = env_value(&env, "FLANNEL_MTU").map(str::to_owned);
        }
    }

    // Leases in etcd.
    let listing =
        etcdctl(&["get", "--prefix", &format!("{ETCD_PREFIX}/subnets/")]).unwrap_or_default();
    for r in &mut reports {
        if let Some(s) = r.subnet.as_deref().and_then(subnet_of) {
            r.public_ip = lease_public_ip(&listing, &s);
        }
    }

    // Each logs the other as a peer.
    let subnets: Vec<Option<String>> = reports
        .iter()
        .map(|r| r.subnet.as_deref().and_then(subnet_of))
        .collect();
    for i in 0..HOSTS {
        let others: Vec<String> = (0..HOSTS)
            .filter(|&j| j != i)
            .filter_map(|j| subnets[j].clone())
            .collect();
        if others.len() != HOSTS - 1 {
            continue;
        }
        let agent = &agents[i];
        let seen = wait_for("peer log lines", Duration::from_secs(30), || {
            let log = agent.log();
            let all = others.iter().all(|s| {
                let dashed = s.replace('/', "-");
                log.lines().any(|l| {
                    l.to_ascii_lowercase().contains("peer added")
                        && (l.contains(s.as_str()) || l.contains(&dashed))
                })
            });
            all.then_some(())
        })?;
        reports[i].peer_logged = seen.is_some();
    }

    // A ping across the overlay to the other's flannel.1 address (the subnet's .0),
    // which needs the VXLAN dataplane, not only the control plane.
    for i in 0..HOSTS {
        let j = (i + 1) % HOSTS;
        if let Some(target) = subnets[j].as_deref().and_then(|s| s.split('/').next()) {
            let ok = hosts[i]
                .0
                .command("ping")
                .args(["-c", "2", "-W", "1", target])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            reports[i].overlay_ping = Some(ok);
        }
        let status = Command::new(flanneld)
            .arg("status")
            .arg("--json")
            .arg(format!(
                "--subnet-file={}",
                dir.join(format!("h{}/subnet.env", i + 1)).display()
            ))
            .output();
        reports[i].dataplane = status.ok().and_then(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            v["dataplane"].as_str().map(str::to_owned)
        });
    }

    if crate::netns::interrupted() {
        bail!("interrupted");
    }
    println!();
    println!(
        "{:<5} {:<12} {:<16} {:<6} {:<6} {:<10} {:<12} {:<12}",
        "host", "PublicIP", "subnet", "MTU", "READY", "dataplane", "peer logged", "overlay ping"
    );
    let dash = "-".to_owned();
    for r in &reports {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        println!(
            "{:<5} {:<12} {:<16} {:<6} {:<6} {:<10} {:<12} {:<12}",
            r.name,
            r.public_ip.as_ref().unwrap_or(&dash),
            r.subnet.as_ref().unwrap_or(&dash),
            r.mtu.as_ref().unwrap_or(&dash),
            yes(r.ready),
            r.dataplane.as_ref().unwrap_or(&dash),
            yes(r.peer_logged),
            r.overlay_ping.map_or("-", yes),
        );
    }
    println!();

    let mut ok = true;
    let mut fail = |msg: String| {
        println!("FAIL: {msg}");
        ok = false;
    };
    for r in &reports {
        if !r.ready {
            fail(format!(
                "{} did not write subnet.env and report READY",
                r.name
            ));
        }
        if r.public_ip.as_deref() != Some(r.expected_ip.as_str()) {
            fail(format!(
                "{}: lease PublicIP {:?}, expected {}",
                r.name, r.public_ip, r.expected_ip
            ));
        }
        if r.network.as_deref() != Some("10.5.0.0/16") {
            fail(format!("{}: FLANNEL_NETWORK {:?}", r.name, r.network));
        }
        if !r.peer_logged {
            fail(format!("{} did not log the other host as a peer", r.name));
        }
        if r.overlay_ping != Some(true) {
            fail(format!(
                "{} cannot ping the other host across the overlay",
                r.name
            ));
        }
    }
    if subnets.iter().flatten().count() == HOSTS && subnets[0] == subnets[1] {
        fail(format!("both hosts got the same subnet {:?}", subnets[0]));
    }
    for (i, agent) in agents.iter_mut().enumerate() {
        if let Some(status) = agent.exited() {
            fail(format!("h{} flanneld exited early: {status}", i + 1));
        }
    }
    if !ok {
        for (i, agent) in agents.iter().enumerate() {
            let log = agent.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            println!("---- h{} flanneld log (last 40 lines) ----", i + 1);
            for l in tail.iter().rev() {
                println!("{l}");
            }
        }
    }
    drop(agents);
    drop(etcd);
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_of_masks_the_host_part() {
        assert_eq!(subnet_of("10.5.34.1/24").as_deref(), Some("10.5.34.0/24"));
        assert_eq!(
            subnet_of("10.5.34.129/25").as_deref(),
            Some("10.5.34.128/25")
        );
        assert_eq!(subnet_of("nonsense"), None);
    }

    #[test]
    fn lease_public_ip_from_listing() {
        let listing = "/coreos.com/network/subnets/10.5.34.0-24\n\
            {\"PublicIP\":\"10.99.0.2\",\"PublicIPv6\":null,\"BackendType\":\"vxlan\"}\n\
            /coreos.com/network/subnets/10.5.7.0-24\n\
            {\"PublicIP\":\"10.99.0.3\"}\n";
        assert_eq!(
            lease_public_ip(listing, "10.5.7.0/24").as_deref(),
            Some("10.99.0.3")
        );
        assert_eq!(
            lease_public_ip(listing, "10.5.34.0/24").as_deref(),
            Some("10.99.0.2")
        );
        assert_eq!(lease_public_ip(listing, "10.5.8.0/24"), None);
    }

    #[test]
    fn env_value_reads_keys() {
        let env = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\n";
        assert_eq!(env_value(env, "FLANNEL_SUBNET"), Some("10.5.34.1/24"));
        assert_eq!(env_value(env, "FLANNEL_MTU"), Some("1450"));
        assert_eq!(env_value(env, "FLANNEL_IPMASQ"), None);
    }
}
