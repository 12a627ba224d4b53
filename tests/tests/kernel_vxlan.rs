//! The kernel vxlan backend against the real kernel: flannel.1 exactly as Go flanneld
//! makes it, interop with a Go-flannel-shaped peer configured by hand with iproute2,
//! reconciliation after a restart, device recreation, and peers leaving and coming back
//! with a new VTEP MAC. Each test builds its own namespaces (an underlay with etcd, host
//! namespaces, container namespaces) and tears them down on drop.

use std::time::Duration;

use flannel_tests::{
    Container, NetNs, OverlayCluster, OverlayHost, host_addr, lease_key, require_binary,
    vtep_mac_in_lease, wait_until,
};

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(15);

fn state_mac(host: &OverlayHost) -> String {
    std::fs::read_to_string(host.state_dir().join("flannel.1.mac"))
        .expect("state file")
        .trim()
        .to_owned()
}

fn routes(ns: &NetNs) -> String {
    ns.ip(&["-4", "route", "show"])
}

fn neighs(ns: &NetNs) -> String {
    ns.ip(&["-4", "neigh", "show", "dev", "flannel.1"])
}

fn fdb(ns: &NetNs) -> String {
    ns.exec_ok(&["bridge", "fdb", "show", "dev", "flannel.1"])
}

/// True when `ns` has flannel's three entries for the peer (`subnet`, `mac`, `public`).
fn has_peer(ns: &NetNs, subnet: &str, mac: &str, public: &str) -> bool {
    let gw = host_addr(subnet, 0);
    routes(ns).contains(&format!("{subnet} via {gw} dev flannel.1 onlink"))
        && neighs(ns).contains(&format!("{gw} lladdr {mac} PERMANENT"))
        && fdb(ns).contains(&format!("{mac} dst {public} self permanent"))
}

/// True when `ns` has no route, neighbour or FDB entry for the peer.
fn lacks_peer(ns: &NetNs, subnet: &str, mac: &str) -> bool {
    let gw = host_addr(subnet, 0).to_string();
    !routes(ns).contains(subnet)
        && !neighs(ns).contains(&format!("{gw} "))
        && !fdb(ns).contains(mac)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool, ns: &NetNs) {
    if wait_until(timeout, || f().then_some(())).is_none() {
        panic!(
            "{what} not reached within {timeout:?}\nroutes:\n{}\nneigh:\n{}\nfdb:\n{}",
            routes(ns),
            neighs(ns),
            fdb(ns)
        );
    }
}

fn link_index(ns: &NetNs, dev: &str) -> String {
    let out = ns.ip(&["-o", "link", "show", dev]);
    out.split(':').next().unwrap().trim().to_owned()
}

#[test]
fn flannel_1_matches_go_flannel_and_survives_restart() {
    let test = "flannel_1_matches_go_flannel_and_survives_restart";
    let Some(c) = OverlayCluster::new(test, 1, CONFIG) else {
        return;
    };
    let h = &c.hosts[0];
    let mut f = h.flanneld(&c.etcd, &["--dataplane=kernel"]);
    f.expect_log("flanneld is ready", READY);
    let subnet = h.leased_subnet(READY);

    let link = h.ns.ip(&["-d", "link", "show", "flannel.1"]);
    for want in [
        "mtu 1450",
        "vxlan id 1 ",
        &format!("local {} ", h.ip),
        "dev eth0 ",
        "dstport 8472 ",
        "nolearning",
        ",UP,",
    ] {
        assert!(link.contains(want), "missing {want:?} in:\n{link}");
    }
    let mac = state_mac(h);
    assert!(link.contains(&format!("link/ether {mac} ")), "{link}");
    assert_eq!(vtep_mac_in_lease(&c.etcd, &subnet), mac);
    let addrs = h.ns.ip(&["-4", "-o", "addr", "show", "dev", "flannel.1"]);
    assert_eq!(addrs.lines().count(), 1, "{addrs}");
    assert!(
        addrs.contains(&format!("inet {}/32 ", host_addr(&subnet, 0))),
        "{addrs}"
    );
    let env = std::fs::read_to_string(h.subnet_file()).unwrap();
    assert!(env.contains("FLANNEL_MTU=1450"), "{env}");

    // A restart keeps the device (same index), its MAC and address.
    let index = link_index(&h.ns, "flannel.1");
    f.terminate(Duration::from_secs(10)).expect("SIGTERM exit");
    // Meanwhile someone breaks the compatible device's MTU and adds an address.
    h.ns.ip(&["link", "set", "flannel.1", "mtu", "1400"]);
    h.ns.ip(&["addr", "add", "10.5.250.7/24", "dev", "flannel.1"]);
    let mut f = h.flanneld(&c.etcd, &["--dataplane=kernel"]);
    f.expect_log("flanneld is ready", READY);
    assert_eq!(h.leased_subnet(READY), subnet);
    assert_eq!(
        link_index(&h.ns, "flannel.1"),
        index,
        "device was recreated"
    );
    let link2 = h.ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(link2.contains("mtu 1450"), "{link2}");
    assert!(link2.contains(&format!("link/ether {mac} ")), "{link2}");
    let addrs = h.ns.ip(&["-4", "-o", "addr", "show", "dev", "flannel.1"]);
    assert_eq!(addrs.lines().count(), 1, "stale address kept:\n{addrs}");
    assert_eq!(state_mac(h), mac);
    assert_eq!(vtep_mac_in_lease(&c.etcd, &subnet), mac);

    // An incompatible device of our name (another dstport) is replaced.
    f.terminate(Duration::from_secs(10)).expect("SIGTERM exit");
    h.ns.ip(&["link", "del", "flannel.1"]);
    h.ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "4789",
        "dev",
        "eth0",
    ]);
    let mut f = h.flanneld(&c.etcd, &["--dataplane=kernel"]);
    f.expect_log("flanneld is ready", READY);
    let link3 = h.ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(
        link3.contains("dstport 8472") && link3.contains(&format!("link/ether {mac} ")),
        "{link3}"
    );
    assert!(f.log().contains("incompatible"), "{}", f.log());
}

#[test]
fn interop_with_a_go_flannel_shaped_kernel_peer() {
    let test = "interop_with_a_go_flannel_shaped_kernel_peer";
    if !require_binary("iperf3", test) {
        return;
    }
    let Some(c) = OverlayCluster::new(test, 2, CONFIG) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);

    // Host B: a Go flanneld's lease, byte for byte, and its kernel state.
    let b_subnet = "10.5.200.0/24";
    let b_mac = "0e:6b:1a:2c:3d:4e";
    c.go_flannel_node(b, b_subnet, b_mac);

    let mut f = a.flanneld(&c.etcd, &["--dataplane=kernel"]);
    f.expect_log("flanneld is ready", READY);
    let a_subnet = a.leased_subnet(READY);
    let a_mac = vtep_mac_in_lease(&c.etcd, &a_subnet);
    b.go_flannel_peer(&a_subnet, &a_mac, &a.ip.to_string());

    wait_for(
        "A's entries for B",
        CONVERGE,
        || has_peer(&a.ns, b_subnet, b_mac, &b.ip.to_string()),
        &a.ns,
    );

    let ca = Container::new(a, &a_subnet);
    let cb = Container::new(b, b_subnet);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "A→B ping");
    assert!(cb.can_ping(ca.ip, Duration::from_secs(10)), "B→A ping");

    let _server_b = cb.iperf3_server();
    ca.tcp_transfer(&cb, false);
    ca.tcp_transfer(&cb, true);
    let _server_a = ca.iperf3_server();
    cb.tcp_transfer(&ca, false);
}

#[test]
fn restart_removes_peers_that_left_while_down() {
    let test = "restart_removes_peers_that_left_while_down";
    let Some(c) = OverlayCluster::new(test, 3, CONFIG) else {
        return;
    };
    let mut fl: Vec<_> = c
        .hosts
        .iter()
        .map(|h| h.flanneld(&c.etcd, &["--dataplane=kernel"]))
        .collect();
    for f in &mut fl {
        f.expect_log("flanneld is ready", READY);
    }
    let subnets: Vec<String> = c.hosts.iter().map(|h| h.leased_subnet(READY)).collect();
    let macs: Vec<String> = c.hosts.iter().map(state_mac).collect();
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let peer_ok =
        |ns: &NetNs, i: usize| has_peer(ns, &subnets[i], &macs[i], &c.hosts[i].ip.to_string());
    wait_for(
        "A sees B and C",
        CONVERGE,
        || peer_ok(&a.ns, 1) && peer_ok(&a.ns, 2),
        &a.ns,
    );

    fl[0].terminate(Duration::from_secs(10)).expect("A exits");
    fl[2].terminate(Duration::from_secs(10)).expect("C exits");
    assert_eq!(c.etcd.delete(&lease_key(&subnets[2])), 1);
    // A's kernel still holds C's entries: nothing ran while A was down.
    assert!(peer_ok(&a.ns, 2));

    let mut a2 = a.flanneld(&c.etcd, &["--dataplane=kernel"]);
    a2.expect_log("flanneld is ready", READY);
    wait_for(
        "C's entries gone from A",
        CONVERGE,
        || lacks_peer(&a.ns, &subnets[2], &macs[2]),
        &a.ns,
    );
    assert!(peer_ok(&a.ns, 1), "B's entries lost");
    assert!(peer_ok(&b.ns, 0), "B lost A while A restarted");
}

#[test]
fn deleted_device_is_recreated_with_peers_replayed() {
    let test = "deleted_device_is_recreated_with_peers_replayed";
    let Some(c) = OverlayCluster::new(test, 2, CONFIG) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let ((fa, sa), (_fb, sb)) = c.start_two(&["--dataplane=kernel"], &["--dataplane=kernel"]);
    let (ma, mb) = (state_mac(a), state_mac(b));
    wait_for(
        "A sees B",
        CONVERGE,
        || has_peer(&a.ns, &sb, &mb, &b.ip.to_string()),
        &a.ns,
    );
    wait_for(
        "B sees A",
        CONVERGE,
        || has_peer(&b.ns, &sa, &ma, &a.ip.to_string()),
        &b.ns,
    );
    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "ping before");

    a.ns.ip(&["link", "del", "flannel.1"]);
    wait_for(
        "flannel.1 recreated with B's entries",
        Duration::from_secs(5),
        || has_peer(&a.ns, &sb, &mb, &b.ip.to_string()),
        &a.ns,
    );
    let link = a.ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(link.contains(&format!("link/ether {ma} ")), "{link}");
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "ping after");
    assert!(fa.log().contains("recreating"), "{}", fa.log());
}

#[test]
fn deleted_peer_loses_its_entries_and_comes_back_with_a_new_mac() {
    let test = "deleted_peer_loses_its_entries_and_comes_back_with_a_new_mac";
    let Some(c) = OverlayCluster::new(test, 2, CONFIG) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let ((_fa, sa), (mut fb, sb)) = c.start_two(&["--dataplane=kernel"], &["--dataplane=kernel"]);
    let mb = state_mac(b);
    wait_for(
        "A sees B",
        CONVERGE,
        || has_peer(&a.ns, &sb, &mb, &b.ip.to_string()),
        &a.ns,
    );
    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "ping before");

    fb.terminate(Duration::from_secs(10)).expect("B exits");
    assert_eq!(c.etcd.delete(&lease_key(&sb)), 1);
    wait_for(
        "B's entries gone from A",
        CONVERGE,
        || lacks_peer(&a.ns, &sb, &mb),
        &a.ns,
    );
    assert!(
        !ca.can_ping(cb.ip, Duration::from_secs(1)),
        "B still reachable"
    );

    // B comes back with a fresh state dir: a new VTEP MAC.
    std::fs::remove_dir_all(b.state_dir()).unwrap();
    let mut fb2 = b.flanneld(&c.etcd, &["--dataplane=kernel"]);
    fb2.expect_log("flanneld is ready", READY);
    let sb2 = b.leased_subnet(READY);
    assert_eq!(sb2, sb, "B should take its previous subnet back");
    let mb2 = state_mac(b);
    assert_ne!(mb2, mb);
    let link = b.ns.ip(&["link", "show", "flannel.1"]);
    assert!(link.contains(&format!("link/ether {mb2} ")), "{link}");
    wait_for(
        "A has B's new MAC",
        CONVERGE,
        || has_peer(&a.ns, &sb, &mb2, &b.ip.to_string()) && !fdb(&a.ns).contains(&mb),
        &a.ns,
    );
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "ping after");
    assert!(cb.can_ping(ca.ip, Duration::from_secs(10)), "ping back");
}

#[test]
fn blackhole_route_for_our_subnet_is_kept() {
    let test = "blackhole_route_for_our_subnet_is_kept";
    let Some(c) = OverlayCluster::new(test, 1, CONFIG) else {
        return;
    };
    let h = &c.hosts[0];
    let mut f = h.flanneld(
        &c.etcd,
        &[
            "--dataplane=kernel",
            "--ip-blackhole-route",
            "--iptables-resync=1",
        ],
    );
    f.expect_log("flanneld is ready", READY);
    let subnet = h.leased_subnet(READY);
    let line = format!("blackhole {subnet}");
    assert!(routes(&h.ns).contains(&line), "{}", routes(&h.ns));
    h.ns.ip(&["route", "del", "blackhole", &subnet]);
    wait_for(
        "blackhole route re-added",
        Duration::from_secs(5),
        || routes(&h.ns).contains(&line),
        &h.ns,
    );
}
