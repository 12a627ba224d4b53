//! Two `flanneld` processes, each in its own network namespace "host", against one real
//! etcd on an underlay bridge: distinct subnets, flannel's subnet.env, READY (sd_notify
//! and /readyz), each logs the other as a peer; SIGTERM exits 0 and keeps the lease; a
//! restart keeps subnet and VTEP MAC.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use flannel_tests::{Child, Etcd, NetNs, Underlay, require_binary, require_root};

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const PREFIX: &str = "/coreos.com/network";
const HEALTHZ_PORT: &str = "8471";

struct Host {
    ns: NetNs,
    ip: std::net::Ipv4Addr,
    dir: PathBuf,
}

impl Host {
    fn subnet_file(&self) -> PathBuf {
        self.dir.join("run/subnet.env")
    }

    fn flanneld(&self, etcd: &Etcd, extra: &[&str], notify: Option<&Path>) -> Child {
        let mut cmd = self.ns.command(flannel_tests::flanneld_bin());
        cmd.arg(format!("--etcd-endpoints={}", etcd.endpoint()))
            .arg("--iface=eth0")
            .arg(format!("--subnet-file={}", self.subnet_file().display()))
            .arg(format!("--state-dir={}", self.dir.join("state").display()))
            .arg("--healthz-ip=127.0.0.1")
            .arg(format!("--healthz-port={HEALTHZ_PORT}"))
            .args(extra)
            .env("RUST_LOG", "info");
        match notify {
            Some(p) => cmd.env("NOTIFY_SOCKET", p),
            None => cmd.env_remove("NOTIFY_SOCKET"),
        };
        let log = self.dir.join(format!("flanneld-{}.log", rand_suffix()));
        Child::spawn_logged("flanneld", cmd, &log)
    }

    /// GET a health path over loopback inside the host namespace.
    fn http_get(&self, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{HEALTHZ_PORT} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        );
        String::from_utf8_lossy(&self.ns.exec(&["bash", "-c", &script]).stdout).into_owned()
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn subnet_env(host: &Host) -> Option<String> {
    std::fs::read_to_string(host.subnet_file()).ok()
}

fn env_var(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing from:\n{text}"))
        .to_owned()
}

/// `10.5.7.1/24` → `10.5.7.0-24`, the etcd key name.
fn key_name(flannel_subnet: &str) -> String {
    let (ip, len) = flannel_subnet.split_once('/').unwrap();
    let mut o: Vec<&str> = ip.split('.').collect();
    o[3] = "0";
    format!("{}-{len}", o.join("."))
}

fn setup(test: &str, hosts: usize) -> Option<(Underlay, Etcd, Vec<Host>, tempfile::TempDir)> {
    if !require_root(test) || !require_binary("etcd", test) {
        return None;
    }
    let mut underlay = Underlay::new("10.99.0");
    let etcd = Etcd::start_in(underlay.ns(), underlay.gateway().into());
    let tmp = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    for i in 0..hosts {
        let ns = NetNs::new(&format!("h{i}"));
        let ip = underlay.attach(&ns, "eth0");
        let dir = tmp.path().join(format!("host{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        out.push(Host { ns, ip, dir });
    }
    Some((underlay, etcd, out, tmp))
}

fn wait_file(path: &Path, secs: u64) -> String {
    flannel_tests::wait_until(Duration::from_secs(secs), || {
        std::fs::read_to_string(path).ok()
    })
    .unwrap_or_else(|| panic!("{} not written within {secs}s", path.display()))
}

#[test]
fn two_hosts_get_distinct_subnets_write_subnet_env_report_ready_and_see_each_other() {
    let Some((_underlay, etcd, hosts, tmp)) = setup(
        "two_hosts_get_distinct_subnets_write_subnet_env_report_ready_and_see_each_other",
        2,
    ) else {
        return;
    };
    etcd.put(&format!("{PREFIX}/config"), CONFIG);

    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let mut a = hosts[0].flanneld(&etcd, &["--ip-masq"], Some(&sock_path));
    let mut b = hosts[1].flanneld(&etcd, &[], None);

    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("no sd_notify from flanneld");
    assert_eq!(&buf[..n], b"READY=1");
    // READY comes after subnet.env is written.
    let env_a = subnet_env(&hosts[0]).expect("READY before subnet.env");
    let env_b = wait_file(&hosts[1].subnet_file(), 30);

    for (env, masq) in [(&env_a, "true"), (&env_b, "false")] {
        let lines: Vec<&str> = env.lines().collect();
        assert_eq!(lines.len(), 4, "{env}");
        assert_eq!(lines[0], "FLANNEL_NETWORK=10.5.0.0/16");
        assert!(
            lines[1].starts_with("FLANNEL_SUBNET=10.5.") && lines[1].ends_with(".1/24"),
            "{env}"
        );
        assert_eq!(lines[2], "FLANNEL_MTU=1450");
        assert_eq!(lines[3], format!("FLANNEL_IPMASQ={masq}"));
    }
    let (sa, sb) = (
        env_var(&env_a, "FLANNEL_SUBNET"),
        env_var(&env_b, "FLANNEL_SUBNET"),
    );
    assert_ne!(sa, sb, "both hosts got the same subnet");

    // The leases are flannel's JSON, naming each host's PublicIP and VTEP MAC.
    let la = etcd
        .get(&format!("{PREFIX}/subnets/{}", key_name(&sa)))
        .expect("lease A");
    assert!(la.starts_with(&format!(r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":""#, hosts[0].ip)), "{la}");

    // Each logs the other as a peer.
    let subnet_a = key_name(&sa).replace('-', "/");
    let subnet_b = key_name(&sb).replace('-', "/");
    a.expect_log(&format!("subnet={subnet_b}"), Duration::from_secs(20));
    b.expect_log(&format!("subnet={subnet_a}"), Duration::from_secs(20));
    assert!(a.log().contains("peer added"));
    assert!(b.log().contains("peer added"));

    let health = hosts[0].http_get("/healthz");
    assert!(
        health.starts_with("HTTP/1.")
            && health.contains(" 200 ")
            && health.contains("flanneld is running"),
        "{health}"
    );
    let ready = hosts[0].http_get("/readyz");
    assert!(
        ready.contains(" 200 ") && ready.contains("flanneld is ready"),
        "{ready}"
    );

    // --ip-masq installed flannel's masquerade chain inside host A (and only there).
    let nat = hosts[0].ns.exec_ok(&["iptables-save", "-t", "nat"]);
    assert!(nat.contains("-A FLANNEL-POSTRTG"), "{nat}");
    assert!(
        nat.contains(&format!("-s {subnet_a} -d 10.5.0.0/16")),
        "{nat}"
    );

    // SIGTERM: exit 0, lease kept, peer B does not see A removed.
    let mac_a = la.split("\"VtepMAC\":\"").nth(1).unwrap()[..17].to_owned();
    a.signal(libc::SIGTERM);
    let status = flannel_tests::wait_until(Duration::from_secs(10), || a.try_wait())
        .expect("flanneld did not exit on SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        etcd.get(&format!("{PREFIX}/subnets/{}", key_name(&sa)))
            .is_some(),
        "lease removed on exit"
    );

    // Restart: same subnet, same VTEP MAC.
    let mut a2 = hosts[0].flanneld(&etcd, &["--ip-masq"], None);
    a2.expect_log("flanneld is ready", Duration::from_secs(30));
    let env_a2 = subnet_env(&hosts[0]).unwrap();
    assert_eq!(env_var(&env_a2, "FLANNEL_SUBNET"), sa);
    let la2 = etcd
        .get(&format!("{PREFIX}/subnets/{}", key_name(&sa)))
        .unwrap();
    assert!(
        la2.contains(&mac_a),
        "VTEP MAC changed across restart: {la} -> {la2}"
    );
    assert!(
        !b.log().contains("peer removed"),
        "B saw A removed:\n{}",
        b.log()
    );
}

#[test]
fn flanneld_waits_for_a_missing_or_invalid_config() {
    let Some((_underlay, etcd, hosts, _tmp)) =
        setup("flanneld_waits_for_a_missing_or_invalid_config", 1)
    else {
        return;
    };
    let mut a = hosts[0].flanneld(&etcd, &[], None);
    a.expect_log(
        "flannel config not found in etcd store",
        Duration::from_secs(20),
    );
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#,
    );
    a.expect_log("SubnetLen must be less than /31", Duration::from_secs(20));
    assert!(subnet_env(&hosts[0]).is_none());
    etcd.put(&format!("{PREFIX}/config"), r#"{"Network":"10.5.0.0/16"}"#);
    a.expect_log("flanneld is ready", Duration::from_secs(20));
    assert!(
        a.log().contains("using udp"),
        "no notice about the missing Backend"
    );
    let env = subnet_env(&hosts[0]).unwrap();
    assert_eq!(env_var(&env, "FLANNEL_MTU"), "1472");
}

#[test]
fn flanneld_refuses_ipv6_and_kube_mode_clearly() {
    let Some((_underlay, etcd, hosts, _tmp)) =
        setup("flanneld_refuses_ipv6_and_kube_mode_clearly", 1)
    else {
        return;
    };
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#,
    );
    let mut a = hosts[0].flanneld(&etcd, &[], None);
    let status = flannel_tests::wait_until(Duration::from_secs(20), || a.try_wait())
        .expect("flanneld kept running with EnableIPv6");
    assert!(!status.success());
    assert!(
        a.log().contains("EnableIPv6 is not supported yet"),
        "{}",
        a.log()
    );

    let out = Command::new(flannel_tests::flanneld_bin())
        .arg("--kube-subnet-mgr")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kube-subnet-mgr is not supported"));
}
