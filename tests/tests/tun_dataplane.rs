//! The TUN dataplane end to end: flannel's udp backend between two TUN nodes (flannel's
//! wire format checked on the underlay), a vxlan cluster of a TUN node, an eBPF node
//! and a Go-flannel-shaped kernel node, the automatic fallback to TUN when BPF is
//! denied, and hostile datagrams that must be dropped, counted, and never delivered.

use std::{net::Ipv4Addr, time::Duration};

use flannel_tests::{
    Child, Container, NetNs, OverlayCluster, OverlayHost, host_addr, lease_key,
    packet::{Ip, hex, parse_mac, udp, vxlan_payload},
    require_binary, require_ebpf, vtep_mac_in_lease, wait_until,
};

const UDP: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;
const VXLAN: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY: Duration = Duration::from_secs(30);

fn has_ebpf() -> bool {
    flannel_agent::dataplane::ebpf_object().is_ok()
}

/// Starts flanneld with `flags`, waits for READY, checks the dataplane it logged, and
/// returns it with the leased subnet.
fn start(
    host: &OverlayHost,
    c: &OverlayCluster,
    flags: &[&str],
    dataplane: &str,
) -> (Child, String) {
    let mut f = host.flanneld(&c.etcd, flags);
    f.expect_log("flanneld is ready", READY);
    assert!(
        f.log().contains(&format!("dataplane={dataplane}")),
        "not on the {dataplane} dataplane:\n{}",
        f.log()
    );
    (f, host.leased_subnet(READY))
}

/// Ping both ways and a 2 MB TCP transfer each way between `a` and `b`.
fn ping_and_tcp(a: &Container, b: &Container, what: &str) {
    assert!(a.can_ping(b.ip, Duration::from_secs(15)), "{what}: ping →");
    assert!(b.can_ping(a.ip, Duration::from_secs(15)), "{what}: ping ←");
    let _s = b.iperf3_server();
    a.tcp_transfer(b, false);
    a.tcp_transfer(b, true);
}

#[test]
fn udp_backend_between_two_tun_nodes() {
    let test = "udp_backend_between_two_tun_nodes";
    if !require_binary("iperf3", test) || !require_binary("tcpdump", test) {
        return;
    }
    let Some(c) = OverlayCluster::new(test, 2, UDP) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let (_fa, sa) = start(a, &c, &["--dataplane=tun"], "tun");
    let (_fb, sb) = start(b, &c, &["--dataplane=tun"], "tun");

    // flannel's udp shape: flannel0, .0/32, MTU − 28, the Network via it, no BackendType.
    let link = a.ns.ip(&["-d", "link", "show", "flannel0"]);
    assert!(link.contains("mtu 1472") && link.contains("tun"), "{link}");
    let addr = a.ns.ip(&["-4", "addr", "show", "flannel0"]);
    assert!(
        addr.contains(&format!("{}/32", host_addr(&sa, 0))),
        "{addr}"
    );
    let routes = a.ns.ip(&["-4", "route", "show"]);
    assert!(routes.contains("10.5.0.0/16 dev flannel0"), "{routes}");
    let lease = c.etcd.get(&lease_key(&sa)).unwrap();
    assert!(!lease.contains("BackendType"), "{lease}");

    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    // The wire: raw IPv4 (0x45...) right after the outer UDP header, to port 8285.
    let mut cap = a.ns.command("timeout");
    cap.args([
        "10",
        "tcpdump",
        "-i",
        "eth0",
        "-n",
        "-c",
        "1",
        "-x",
        "udp dst port 8285",
    ]);
    let cap = Child::spawn("tcpdump", cap);
    std::thread::sleep(Duration::from_millis(500));
    ping_and_tcp(&ca, &cb, "udp A↔B");
    let _sa = ca.iperf3_server();
    cb.tcp_transfer(&ca, false);
    let dump = wait_until(Duration::from_secs(10), || {
        let l = cap.log();
        l.contains("0x0010").then_some(l)
    })
    .unwrap_or_else(|| panic!("no udp datagram captured:\n{}", cap.log()));
    // Outer IPv4 (20) + UDP (8): the payload starts at byte 28, line 0x0010, column 7.
    let line = dump.lines().find(|l| l.contains("0x0010:")).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(
        words.get(7).is_some_and(|w| w.starts_with("45")),
        "payload is not raw IPv4:\n{dump}"
    );

    let (tx, rx) = wait_until(Duration::from_secs(10), || {
        a.peer_packets(&sb).filter(|&(tx, rx)| tx > 100 && rx > 100)
    })
    .unwrap_or_else(|| panic!("TUN counters did not move: {}", a.status()));
    assert!(tx > 0 && rx > 0);
    let st = a.status();
    assert_eq!(st["dataplane"], "tun", "{st}");
}

#[test]
fn vxlan_tun_node_with_ebpf_and_go_flannel_kernel_peers() {
    let test = "vxlan_tun_node_with_ebpf_and_go_flannel_kernel_peers";
    if !require_binary("iperf3", test) {
        return;
    }
    if !require_ebpf(test) {
        return;
    }
    let Some(c) = OverlayCluster::new(test, 3, VXLAN) else {
        return;
    };
    let (t, e, k) = (&c.hosts[0], &c.hosts[1], &c.hosts[2]);

    // K is Go flanneld's kernel state by hand, its lease in Go's JSON.
    let k_subnet = "10.5.200.0/24";
    let k_mac = "0e:6b:1a:2c:3d:4e";
    c.go_flannel_node(k, k_subnet, k_mac);
    let (_ft, ts) = start(t, &c, &["--dataplane=tun"], "tun");
    let (_fe, es) = start(e, &c, &["--dataplane=ebpf"], "ebpf");
    for (h, s) in [(t, &ts), (e, &es)] {
        let mac = vtep_mac_in_lease(&c.etcd, s);
        k.go_flannel_peer(s, &mac, &h.ip.to_string());
    }
    // The TUN node publishes a plain vxlan lease and has no kernel vxlan device.
    let lease = c.etcd.get(&lease_key(&ts)).unwrap();
    assert!(lease.contains(r#""BackendType":"vxlan""#), "{lease}");
    let link = t.ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(link.contains("tun") && !link.contains("vxlan id"), "{link}");

    let ct = Container::new(t, &ts);
    let ce = Container::new(e, &es);
    let ck = Container::new(k, k_subnet);
    ping_and_tcp(&ct, &ce, "TUN↔eBPF");
    ping_and_tcp(&ct, &ck, "TUN↔kernel");
    ping_and_tcp(&ce, &ck, "eBPF↔kernel");

    for peer in [&es, &k_subnet.to_owned()] {
        let moved = wait_until(Duration::from_secs(10), || {
            t.peer_packets(peer)
                .filter(|&(tx, rx)| tx > 100 && rx > 100)
        });
        assert!(moved.is_some(), "TUN counters for {peer}: {}", t.status());
    }
    assert_eq!(
        t.verdict_packets("drop", "other mac") + t.verdict_packets("drop", "other vni"),
        0,
        "{}",
        t.status()
    );
}

#[test]
fn auto_falls_back_to_tun_when_bpf_is_denied() {
    let test = "auto_falls_back_to_tun_when_bpf_is_denied";
    if !require_binary("setpriv", test) {
        return;
    }
    let Some(c) = OverlayCluster::new(test, 2, UDP) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    // No CAP_BPF and no CAP_SYS_ADMIN for flanneld or anything it runs.
    let mut fa = a.flanneld_wrapped(
        &c.etcd,
        &[
            "setpriv",
            "--inh-caps=-bpf,-sys_admin",
            "--bounding-set=-bpf,-sys_admin",
            "--",
        ],
        &["--dataplane=auto"],
    );
    fa.expect_log("flanneld is ready", READY);
    let log = fa.log();
    let chosen = log
        .lines()
        .find(|l| l.contains("dataplane chosen"))
        .unwrap_or_else(|| panic!("no dataplane line:\n{log}"));
    assert!(chosen.contains("dataplane=tun"), "{chosen}");
    assert!(chosen.contains("ebpf:"), "no eBPF refusal: {chosen}");
    if has_ebpf() {
        assert!(
            chosen.contains("CAP_BPF"),
            "refusal does not name the capability: {chosen}"
        );
    }

    let (_fb, sb) = start(b, &c, &["--dataplane=tun"], "tun");
    let sa = a.leased_subnet(READY);
    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(15)), "A→B");
    assert!(cb.can_ping(ca.ip, Duration::from_secs(15)), "B→A");
    let st = a.status();
    assert_eq!(st["dataplane"], "tun", "{st}");
    assert!(
        st["refused"].to_string().contains("ebpf"),
        "status does not say why not eBPF: {st}"
    );
}

/// Sends each `(name, hex)` datagram from `ns` (source `src`) to `dst:port`.
fn send_datagrams(
    ns: &NetNs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    datagrams: &[(&str, String)],
) {
    let mut script = format!(
        "import socket,binascii\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{src}',0))\n"
    );
    for (_, hex) in datagrams {
        script += &format!("s.sendto(binascii.unhexlify('{hex}'),('{dst}',{port}))\n");
    }
    let out = ns.exec(&["python3", "-c", &script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An IPv4/UDP packet to port 9999 carrying `marker`.
fn inner_udp(src: Ipv4Addr, dst: Ipv4Addr, marker: &str) -> Vec<u8> {
    let ip = Ip {
        id: 1,
        frag: 0,
        ..Ip::new(src, dst, 17)
    };
    ip.bytes(&udp(40000, 9999, marker.as_bytes()))
}

/// A VXLAN payload for `vni` to `dst_mac` from a fixed source MAC, carrying `inner`.
fn vxlan(vni: u32, dst_mac: &str, inner: &[u8]) -> Vec<u8> {
    vxlan_payload(vni, parse_mac(dst_mac), [0x0e, 0, 0, 0, 0, 9], inner)
}

#[test]
fn bad_datagrams_are_dropped_counted_and_never_delivered() {
    let test = "bad_datagrams_are_dropped_counted_and_never_delivered";
    if !require_binary("tcpdump", test) || !require_binary("python3", test) {
        return;
    }
    let Some(mut c) = OverlayCluster::new(test, 2, VXLAN) else {
        return;
    };
    // Host 1 is a peer by lease only: datagrams from its address are "from a peer".
    let peer_subnet = "10.5.77.0/24";
    let peer_ip = c.hosts[1].ip;
    c.put_go_vxlan_lease(peer_ip, peer_subnet, "0e:00:00:00:00:09");
    // A stranger on the same underlay.
    let stranger = NetNs::new("st");
    let stranger_ip = c.underlay.attach(&stranger, "eth0");
    let (a, p) = (&c.hosts[0], &c.hosts[1]);
    let (mut fa, sa) = start(a, &c, &["--dataplane=tun"], "tun");
    let ca = Container::new(a, &sa);
    let mac = vtep_mac_in_lease(&c.etcd, &sa);
    wait_until(Duration::from_secs(10), || {
        a.status()["peers"]
            .as_array()
            .is_some_and(|ps| !ps.is_empty())
            .then_some(())
    })
    .expect("the peer lease was not picked up");

    let mut dump = ca.ns.command("tcpdump");
    dump.args(["-i", "eth0", "-n", "-l", "-A", "udp port 9999"]);
    let dump = Child::spawn("tcpdump", dump);
    std::thread::sleep(Duration::from_secs(1));

    let from_peer = host_addr(peer_subnet, 5);
    let good = inner_udp(from_peer, ca.ip, "case-good");
    let mut bad_csum = inner_udp(from_peer, ca.ip, "case-csum");
    bad_csum[10] ^= 0xff;
    let mut bad_ihl = inner_udp(from_peer, ca.ip, "case-ihl");
    bad_ihl[0] = 0x43;
    let truncated = inner_udp(from_peer, ca.ip, "case-truncated-and-more-bytes")[..30].to_vec();
    let spoofed_inner = inner_udp(host_addr(&sa, 9), ca.ip, "case-inner");
    let elsewhere = inner_udp(from_peer, Ipv4Addr::new(10, 5, 200, 2), "case-elsewhere");
    let from_peer_cases = vec![
        ("good", hex(&vxlan(1, &mac, &good))),
        (
            "wrong vni",
            hex(&vxlan(2, &mac, &inner_udp(from_peer, ca.ip, "case-vni"))),
        ),
        (
            "other mac",
            hex(&vxlan(
                1,
                "0e:11:11:11:11:11",
                &inner_udp(from_peer, ca.ip, "case-mac"),
            )),
        ),
        ("bad checksum", hex(&vxlan(1, &mac, &bad_csum))),
        ("malformed ihl", hex(&vxlan(1, &mac, &bad_ihl))),
        ("truncated inner", hex(&vxlan(1, &mac, &truncated))),
        ("truncated vxlan", hex(&vxlan(1, &mac, &good)[..12])),
        ("garbage", hex(b"case-garbage-not-vxlan-at-all")),
        ("empty", String::new()),
        ("spoofed inner", hex(&vxlan(1, &mac, &spoofed_inner))),
        ("not local", hex(&vxlan(1, &mac, &elsewhere))),
    ];
    send_datagrams(&p.ns, peer_ip, a.ip, 8472, &from_peer_cases);
    let spoofed_outer = vec![(
        "spoofed outer",
        hex(&vxlan(1, &mac, &inner_udp(from_peer, ca.ip, "case-outer"))),
    )];
    send_datagrams(&stranger, stranger_ip, a.ip, 8472, &spoofed_outer);

    // The positive control arrives; nothing else does.
    let seen = wait_until(Duration::from_secs(10), || {
        let l = dump.log();
        l.contains("case-good").then_some(l)
    });
    assert!(
        seen.is_some(),
        "the valid datagram was not delivered:\n{}",
        dump.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    let log = dump.log();
    for bad in [
        "case-vni",
        "case-mac",
        "case-csum",
        "case-ihl",
        "case-truncated",
        "case-inner",
        "case-outer",
        "case-elsewhere",
        "case-garbage",
    ] {
        assert!(!log.contains(bad), "{bad} reached the container:\n{log}");
    }

    // Counted by reason (counters are published every 2 s).
    let want = [
        ("other vni", 1),
        ("other mac", 1),
        ("bad checksum", 1),
        ("bad header", 2), // IHL, and the garbage datagram's VXLAN flags
        ("truncated", 3),  // inner, VXLAN, empty
        ("inner source", 1),
        ("not local", 1),
        ("unknown source", 1),
    ];
    let counted = wait_until(Duration::from_secs(10), || {
        want.iter()
            .all(|&(reason, n)| a.verdict_packets("drop", reason) >= n)
            .then_some(())
    });
    assert!(
        counted.is_some(),
        "drops not counted as expected {want:?}: {}",
        a.status()
    );
    let rx = a.peer_packets(peer_subnet).map(|(_, rx)| rx);
    assert_eq!(
        rx,
        Some(1),
        "only the good datagram counts as received: {}",
        a.status()
    );
    assert!(fa.try_wait().is_none(), "flanneld died:\n{}", fa.log());
}

#[test]
fn deleted_tun_device_is_recreated_by_the_periodic_check() {
    let test = "deleted_tun_device_is_recreated_by_the_periodic_check";
    let Some(c) = OverlayCluster::new(test, 2, UDP) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let (mut fa, sa) = start(a, &c, &["--dataplane=tun"], "tun");
    let (_fb, sb) = start(b, &c, &["--dataplane=tun"], "tun");
    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(15)), "before");
    a.ns.ip(&["link", "del", "flannel0"]);
    assert!(
        !ca.can_ping(cb.ip, Duration::from_secs(1)),
        "no device, yet traffic"
    );
    // The check runs every 10 s.
    assert!(
        ca.can_ping(cb.ip, Duration::from_secs(25)),
        "not recovered:\n{}",
        fa.log()
    );
    let routes = a.ns.ip(&["-4", "route", "show"]);
    assert!(routes.contains("10.5.0.0/16 dev flannel0"), "{routes}");
    assert!(fa.try_wait().is_none(), "flanneld exited:\n{}", fa.log());
}
