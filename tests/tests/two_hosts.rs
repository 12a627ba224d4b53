//! Two `flanneld` processes, each in its own network namespace "host", against one real
//! etcd on an underlay bridge: distinct subnets, flannel's subnet.env, READY (sd_notify
//! and /readyz), each logs the other as a peer; SIGTERM exits 0 and keeps the lease; a
//! restart keeps subnet and VTEP MAC.

use std::{os::unix::net::UnixDatagram, path::Path, process::Command, time::Duration};

use flannel_tests::{ETCD_PREFIX as PREFIX, OverlayCluster, OverlayHost, lease_key, subnet_of};

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HEALTHZ: &[&str] = &["--healthz-ip=127.0.0.1", "--healthz-port=8471"];

fn subnet_env(host: &OverlayHost) -> Option<String> {
    std::fs::read_to_string(host.subnet_file()).ok()
}

fn env_var(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing from:\n{text}"))
        .to_owned()
}

fn wait_file(path: &Path, secs: u64) -> String {
    flannel_tests::wait_until(Duration::from_secs(secs), || {
        std::fs::read_to_string(path).ok()
    })
    .unwrap_or_else(|| panic!("{} not written within {secs}s", path.display()))
}

#[test]
fn two_hosts_get_distinct_subnets_write_subnet_env_report_ready_and_see_each_other() {
    let Some(c) = OverlayCluster::new(
        "two_hosts_get_distinct_subnets_write_subnet_env_report_ready_and_see_each_other",
        2,
        CONFIG,
    ) else {
        return;
    };
    let (etcd, hosts) = (&c.etcd, &c.hosts);

    let sock_path = c.hosts[0].dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let mut a = hosts[0].flanneld_with_env(
        etcd,
        &["--ip-masq", HEALTHZ[0], HEALTHZ[1]],
        &[("NOTIFY_SOCKET", &sock_path)],
    );
    let mut b = hosts[1].flanneld(etcd, &[]);

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
    let la = etcd.get(&lease_key(&subnet_of(&sa))).expect("lease A");
    assert!(la.starts_with(&format!(r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":""#, hosts[0].ip)), "{la}");

    // Each logs the other as a peer.
    let subnet_a = subnet_of(&sa);
    let subnet_b = subnet_of(&sb);
    a.expect_log(&format!("subnet={subnet_b}"), Duration::from_secs(20));
    b.expect_log(&format!("subnet={subnet_a}"), Duration::from_secs(20));
    assert!(a.log().contains("peer added"));
    assert!(b.log().contains("peer added"));

    let health = hosts[0].http_get(8471, "/healthz");
    assert!(
        health.starts_with("HTTP/1.")
            && health.contains(" 200 ")
            && health.contains("flanneld is running"),
        "{health}"
    );
    let ready = hosts[0].http_get(8471, "/readyz");
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
        etcd.get(&lease_key(&subnet_of(&sa))).is_some(),
        "lease removed on exit"
    );

    // Restart: same subnet, same VTEP MAC.
    let mut a2 = hosts[0].flanneld(etcd, &["--ip-masq", HEALTHZ[0], HEALTHZ[1]]);
    a2.expect_log("flanneld is ready", Duration::from_secs(30));
    let env_a2 = subnet_env(&hosts[0]).unwrap();
    assert_eq!(env_var(&env_a2, "FLANNEL_SUBNET"), sa);
    let la2 = etcd.get(&lease_key(&subnet_of(&sa))).unwrap();
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
    let Some(c) = OverlayCluster::new("flanneld_waits_for_a_missing_or_invalid_config", 1, CONFIG)
    else {
        return;
    };
    let (etcd, hosts) = (&c.etcd, &c.hosts);
    etcd.delete(&format!("{PREFIX}/config"));
    let mut a = hosts[0].flanneld(etcd, &[]);
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
    let Some(c) = OverlayCluster::new("flanneld_refuses_ipv6_and_kube_mode_clearly", 1, CONFIG)
    else {
        return;
    };
    let (etcd, hosts) = (&c.etcd, &c.hosts);
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#,
    );
    let mut a = hosts[0].flanneld(etcd, &[]);
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
