//! flanneld with the eBPF dataplane, end to end: against a Go-flannel-shaped kernel peer
//! (wire compatibility, with the per-peer counters proving the eBPF path carried the
//! traffic), a three-node cluster with a peer leaving and coming back with a new MAC,
//! SIGKILL and restart under an iperf3 transfer, and spoofed VXLAN from a non-peer.

use std::{net::Ipv4Addr, time::Duration};

use flannel_tests::{
    Child, Container, NetNs, OverlayCluster, OverlayHost, lease_key,
    packet::{Ip, icmp, vxlan_payload},
    require_binary, require_ebpf, vtep_mac_in_lease, wait_until,
};

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY: Duration = Duration::from_secs(30);
const EBPF: &[&str] = &["--dataplane=ebpf"];

fn start(host: &OverlayHost, c: &OverlayCluster) -> (Child, String) {
    let mut f = host.flanneld(
        &c.etcd,
        &[EBPF[0], "--healthz-ip=127.0.0.1", "--healthz-port=8471"],
    );
    f.expect_log("flanneld is ready", READY);
    assert!(
        f.log().contains("dataplane chosen") && f.log().contains("dataplane=ebpf"),
        "not on the eBPF dataplane:\n{}",
        f.log()
    );
    let subnet = host.leased_subnet(READY);
    (f, subnet)
}

fn lists_peer(host: &OverlayHost, subnet: &str) -> bool {
    host.status()["peers"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["subnet"] == subnet))
}

#[test]
fn ebpf_node_interoperates_with_a_go_flannel_kernel_peer() {
    let test = "ebpf_node_interoperates_with_a_go_flannel_kernel_peer";
    if !require_ebpf(test) || !require_binary("iperf3", test) {
        return;
    }
    let Some(c) = OverlayCluster::new(test, 2, CONFIG) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);

    // B is Go flanneld's kernel state, configured by hand, with its lease in Go's JSON.
    let b_subnet = "10.5.200.0/24";
    let b_mac = "0e:6b:1a:2c:3d:4e";
    c.go_flannel_node(b, b_subnet, b_mac);
    let (_fa, a_subnet) = start(a, &c);
    let a_mac = vtep_mac_in_lease(&c.etcd, &a_subnet);
    b.go_flannel_peer(&a_subnet, &a_mac, &a.ip.to_string());

    let ca = Container::new(a, &a_subnet);
    let cb = Container::new(b, b_subnet);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(15)), "A→B ping");
    assert!(cb.can_ping(ca.ip, Duration::from_secs(15)), "B→A ping");
    // Counters are published every 2 s.
    let (tx0, rx0) = wait_until(Duration::from_secs(10), || {
        a.peer_packets(b_subnet)
            .filter(|&(tx, rx)| tx > 0 && rx > 0)
    })
    .unwrap_or_else(|| panic!("the eBPF path carried no ping: {}", a.status()));

    let _sb = cb.iperf3_server();
    ca.tcp_transfer(&cb, false);
    ca.tcp_transfer(&cb, true);
    let _sa = ca.iperf3_server();
    cb.tcp_transfer(&ca, false);
    // 2 MB each way is hundreds of packets even when GSO-sized.
    let moved = wait_until(Duration::from_secs(10), || {
        a.peer_packets(b_subnet)
            .filter(|&(tx, rx)| tx > tx0 + 100 && rx > rx0)
    });
    assert!(
        moved.is_some(),
        "TCP did not take the eBPF path (before: tx {tx0} rx {rx0}): {}",
        a.status()
    );

    // The same counters on the Prometheus endpoint.
    let metrics = a.http_get(8471, "/metrics");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("flannel_peer_tx_packets_total{")
                && l.contains(&format!("subnet=\"{b_subnet}\""))
        })
        .unwrap_or_else(|| panic!("no tx counter for B in /metrics:\n{metrics}"));
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value > tx0 + 100, "{line}");
    assert!(metrics.contains("flannel_info{"), "{metrics}");
    assert!(metrics.contains("dataplane=\"ebpf\""), "{metrics}");
}

#[test]
fn three_node_ebpf_cluster_and_a_peer_that_leaves_and_returns() {
    let test = "three_node_ebpf_cluster_and_a_peer_that_leaves_and_returns";
    if !require_ebpf(test) {
        return;
    }
    let Some(c) = OverlayCluster::new(test, 3, CONFIG) else {
        return;
    };
    let mut flanneld = Vec::new();
    let mut subnets = Vec::new();
    for h in &c.hosts {
        let (f, s) = start(h, &c);
        flanneld.push(f);
        subnets.push(s);
    }
    let containers: Vec<Container> = c
        .hosts
        .iter()
        .zip(&subnets)
        .map(|(h, s)| Container::new(h, s))
        .collect();
    for (i, from) in containers.iter().enumerate() {
        for (j, to) in containers.iter().enumerate() {
            if i != j {
                assert!(
                    from.can_ping(to.ip, Duration::from_secs(15)),
                    "container {i} cannot reach container {j}"
                );
            }
        }
    }

    // Host 2 leaves: its key is deleted (and its flanneld stopped, so it does not
    // re-acquire). The others drop its routes, map entries and connectivity.
    flanneld[2].kill();
    assert_eq!(c.etcd.delete(&lease_key(&subnets[2])), 1);
    let gone = wait_until(Duration::from_secs(15), || {
        let routes = c.hosts[0].ns.ip(&["-4", "route", "show"]);
        (!routes.contains(&subnets[2]) && !lists_peer(&c.hosts[0], &subnets[2])).then_some(())
    });
    assert!(gone.is_some(), "host 0 still has host 2's state");
    assert!(
        !containers[0].can_ping(containers[2].ip, Duration::from_secs(2)),
        "traffic to a removed peer still flows"
    );

    // It re-registers with a new VTEP MAC (state file gone) and works again.
    let old_mac = std::fs::read_to_string(c.hosts[2].state_dir().join("flannel.1.mac")).unwrap();
    std::fs::remove_file(c.hosts[2].state_dir().join("flannel.1.mac")).unwrap();
    let (_f2, s2) = start(&c.hosts[2], &c);
    let new_mac = vtep_mac_in_lease(&c.etcd, &s2);
    assert_ne!(new_mac, old_mac.trim());
    // The previous subnet from its subnet.env is free again, so it comes back on it.
    assert_eq!(s2, subnets[2]);
    assert!(
        containers[0].can_ping(containers[2].ip, Duration::from_secs(20)),
        "the returning peer is not reachable"
    );
    assert!(
        wait_until(Duration::from_secs(10), || lists_peer(&c.hosts[0], &s2)
            .then_some(()))
        .is_some(),
        "the returning peer is not in the eBPF peer map"
    );
}

#[test]
fn sigkill_and_restart_under_load_keep_the_transfer_subnet_and_mac() {
    let test = "sigkill_and_restart_under_load_keep_the_transfer_subnet_and_mac";
    if !require_ebpf(test) || !require_binary("iperf3", test) {
        return;
    }
    let Some(c) = OverlayCluster::new(test, 2, CONFIG) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let (mut fa, sa) = start(a, &c);
    let (_fb, sb) = start(b, &c);
    let mac = vtep_mac_in_lease(&c.etcd, &sa);
    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(15)));

    let _server = cb.iperf3_server();
    let listening = wait_until(Duration::from_secs(10), || {
        cb.ns
            .exec_ok(&["ss", "-ltn"])
            .contains(":5201")
            .then_some(())
    });
    assert!(listening.is_some(), "iperf3 server did not start");
    // A 12 s transfer; flanneld on A is killed 3 s in and restarted.
    let mut client = {
        let mut cmd = ca.ns.command("iperf3");
        cmd.args([
            "-c",
            &cb.ip.to_string(),
            "-t",
            "12",
            "--connect-timeout",
            "5000",
        ]);
        Child::spawn("iperf3-client", cmd)
    };
    std::thread::sleep(Duration::from_secs(3));
    fa.kill();
    std::thread::sleep(Duration::from_secs(2));
    let (_fa2, sa2) = start(a, &c);
    let status =
        wait_until(Duration::from_secs(30), || client.try_wait()).expect("iperf3 did not finish");
    assert!(
        status.success(),
        "the transfer failed across the restart:\n{}",
        client.log()
    );
    assert!(
        !client.log().contains("reset"),
        "connection reset:\n{}",
        client.log()
    );
    assert_eq!(sa2, sa, "subnet changed across the restart");
    assert_eq!(
        vtep_mac_in_lease(&c.etcd, &sa),
        mac,
        "VTEP MAC changed across the restart"
    );
}

/// A VXLAN payload carrying an ICMP echo from `inner_src` to `inner_dst` to `dst_mac`.
fn crafted_vxlan(inner_src: Ipv4Addr, inner_dst: Ipv4Addr, dst_mac: [u8; 6]) -> Vec<u8> {
    let ip = Ip {
        id: 1,
        frag: 0,
        ..Ip::new(inner_src, inner_dst, 1)
    };
    vxlan_payload(1, dst_mac, [0x02, 0, 0, 0, 0x66, 0x66], &ip.bytes(&icmp(0)))
}

#[test]
fn spoofed_vxlan_from_a_non_peer_is_dropped_and_counted() {
    let test = "spoofed_vxlan_from_a_non_peer_is_dropped_and_counted";
    if !require_ebpf(test) || !require_binary("tcpdump", test) {
        return;
    }
    let Some(mut c) = OverlayCluster::new(test, 2, CONFIG) else {
        return;
    };
    let (_fa, sa) = start(&c.hosts[0], &c);
    let (_fb, _sb) = start(&c.hosts[1], &c);
    let a = &c.hosts[0];
    let ca = Container::new(a, &sa);
    let mac: Vec<u8> = vtep_mac_in_lease(&c.etcd, &sa)
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    // Wait for the peer sync, after which unknown sources are dropped, not passed.
    assert!(
        wait_until(Duration::from_secs(15), || {
            (a.status()["peers"].as_array().map_or(0, Vec::len) == 1).then_some(())
        })
        .is_some()
    );

    // An attacker on the underlay that is not a peer.
    let attacker = NetNs::new("atk");
    let atk_ip = c.underlay.attach(&attacker, "eth0");
    let mut capture = {
        let mut cmd = ca.ns.command("tcpdump");
        cmd.args(["-n", "-l", "-i", "eth0", "icmp"]);
        Child::spawn("tcpdump", cmd)
    };
    capture.expect_log("listening on", Duration::from_secs(10));
    let before = a.verdict_packets("drop", "unknown source");
    let frame = crafted_vxlan(Ipv4Addr::new(10, 5, 250, 9), ca.ip, mac.try_into().unwrap());
    let hex: String = frame.iter().map(|b| format!("\\x{b:02x}")).collect();
    for _ in 0..5 {
        attacker.exec_ok(&[
            "bash",
            "-c",
            &format!("printf '{hex}' > /dev/udp/{}/8472", a.ip),
        ]);
    }
    let counted = wait_until(Duration::from_secs(10), || {
        (a.verdict_packets("drop", "unknown source") >= before + 5).then_some(())
    });
    assert!(
        counted.is_some(),
        "the drop counter did not count the spoofed frames from {atk_ip}: {}",
        a.status()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !capture.log().contains("ICMP echo request"),
        "spoofed traffic reached the container:\n{}",
        capture.log()
    );
}

#[test]
fn udp_backend_ebpf_node_and_tun_node_exchange_traffic() {
    let test = "udp_backend_ebpf_node_and_tun_node_exchange_traffic";
    if !require_ebpf(test) || !require_binary("iperf3", test) {
        return;
    }
    let udp = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;
    let Some(c) = OverlayCluster::new(test, 2, udp) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let ((fa, sa), (fb, sb)) = c.start_two(&["--dataplane=auto"], &["--dataplane=tun"]);
    assert!(
        fa.log().contains("dataplane=ebpf"),
        "auto did not pick eBPF for udp:\n{}",
        fa.log()
    );
    assert!(fb.log().contains("dataplane=tun"), "{}", fb.log());
    let env = std::fs::read_to_string(a.subnet_file()).unwrap();
    assert!(env.contains("FLANNEL_MTU=1472"), "{env}");

    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(15)), "eBPF→TUN ping");
    assert!(cb.can_ping(ca.ip, Duration::from_secs(15)), "TUN→eBPF ping");
    let _sb = cb.iperf3_server();
    ca.tcp_transfer(&cb, false);
    ca.tcp_transfer(&cb, true);
    let moved = wait_until(Duration::from_secs(10), || {
        a.peer_packets(&sb).filter(|&(tx, rx)| tx > 100 && rx > 100)
    });
    assert!(
        moved.is_some(),
        "the eBPF udp path carried no traffic: {}",
        a.status()
    );
}
