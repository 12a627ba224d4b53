//! Routing without encapsulation: the host-gw backend (a route per peer via its PublicIP,
//! re-added within flannel's 10 s check when deleted) and vxlan DirectRouting (on-link
//! peers get the same plain route, with no neighbour or FDB entry on flannel.1).

use std::time::Duration;

use flannel_tests::{Container, NetNs, OverlayCluster, lease_key, wait_until};

const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(15);

fn routes(ns: &NetNs) -> String {
    ns.ip(&["-4", "route", "show"])
}

fn wait_route(ns: &NetNs, line: &str, timeout: Duration) {
    if wait_until(timeout, || routes(ns).contains(line).then_some(())).is_none() {
        panic!("no route {line:?} within {timeout:?}:\n{}", routes(ns));
    }
}

/// Two hosts, etcd and the host-gw network config; `None` is a skip.
fn host_gw_cluster(test: &str) -> Option<OverlayCluster> {
    OverlayCluster::new(
        test,
        2,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#,
    )
}

#[test]
fn host_gw_routes_via_public_ip_carry_traffic_and_are_restored() {
    let test = "host_gw_routes_via_public_ip_carry_traffic_and_are_restored";
    let Some(c) = host_gw_cluster(test) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let ((mut fa, sa), (_fb, sb)) = c.start_two(&["--dataplane=kernel"], &[]);
    let env = std::fs::read_to_string(a.subnet_file()).unwrap();
    assert!(env.contains("FLANNEL_MTU=1500"), "{env}");
    let lease = c.etcd.get(&lease_key(&sa)).unwrap();
    assert_eq!(
        lease,
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
            a.ip
        )
    );

    let route_a = format!("{sb} via {} dev eth0", b.ip);
    let route_b = format!("{sa} via {} dev eth0", a.ip);
    wait_route(&a.ns, &route_a, CONVERGE);
    wait_route(&b.ns, &route_b, CONVERGE);
    assert!(
        a.ns.exec(&["ip", "link", "show", "flannel.1"])
            .status
            .code()
            != Some(0),
        "host-gw created a vxlan device"
    );

    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "A→B ping");
    assert!(cb.can_ping(ca.ip, Duration::from_secs(10)), "B→A ping");

    // Deleted by someone: back within flannel's 10 s check (plus slack for a loaded box).
    a.ns.ip(&["route", "del", &sb]);
    assert!(!routes(&a.ns).contains(&route_a));
    wait_route(&a.ns, &route_a, Duration::from_secs(15));
    fa.expect_log("route recovered", Duration::from_secs(5));
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "ping after");

    // A stale route of ours (a gateway route into the network on eth0) that no peer wants
    // is removed at the next check; routes outside the network are never touched.
    a.ns.ip(&[
        "route",
        "add",
        "10.5.250.0/24",
        "via",
        "10.99.0.77",
        "dev",
        "eth0",
    ]);
    a.ns.ip(&[
        "route",
        "add",
        "10.77.0.0/24",
        "via",
        "10.99.0.77",
        "dev",
        "eth0",
    ]);
    if wait_until(Duration::from_secs(15), || {
        (!routes(&a.ns).contains("10.5.250.0/24")).then_some(())
    })
    .is_none()
    {
        panic!("stale route kept:\n{}", routes(&a.ns));
    }
    assert!(routes(&a.ns).contains("10.77.0.0/24 via 10.99.0.77"));
    assert!(routes(&a.ns).contains(&route_a));
}

#[test]
fn host_gw_refuses_a_nat_public_ip() {
    let test = "host_gw_refuses_a_nat_public_ip";
    let Some(c) = OverlayCluster::new(
        test,
        1,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#,
    ) else {
        return;
    };
    let mut f = c.hosts[0].flanneld(&c.etcd, &["--public-ip=203.0.113.9"]);
    let status = wait_until(READY, || f.try_wait()).expect("flanneld kept running");
    assert!(!status.success());
    assert!(
        f.log().contains("your PublicIP differs from interface IP"),
        "{}",
        f.log()
    );
}

#[test]
fn direct_routing_uses_plain_routes_for_on_link_peers() {
    let test = "direct_routing_uses_plain_routes_for_on_link_peers";
    let Some(c) = OverlayCluster::new(
        test,
        2,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
    ) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let ((_fa, sa), (_fb, sb)) = c.start_two(&["--dataplane=kernel"], &["--dataplane=kernel"]);

    wait_route(&a.ns, &format!("{sb} via {} dev eth0", b.ip), CONVERGE);
    wait_route(&b.ns, &format!("{sa} via {} dev eth0", a.ip), CONVERGE);
    // flannel.1 exists (for peers that are not on-link) but holds nothing for B.
    let neigh = a.ns.ip(&["-4", "neigh", "show", "dev", "flannel.1"]);
    assert!(neigh.trim().is_empty(), "{neigh}");
    let fdb = a.ns.exec_ok(&["bridge", "fdb", "show", "dev", "flannel.1"]);
    assert!(fdb.trim().is_empty(), "{fdb}");
    assert!(
        !routes(&a.ns).contains("dev flannel.1"),
        "{}",
        routes(&a.ns)
    );

    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "A→B ping");
    assert!(cb.can_ping(ca.ip, Duration::from_secs(10)), "B→A ping");
}

/// Traffic the pinned host-gw forwarder of `host` counted, over all peer slots, read
/// from the pin (so it works while that host's flanneld is down): (tx, rx) packets.
fn pinned_forwarded(host: &flannel_tests::OverlayHost) -> (u64, u64) {
    use aya::maps::{MapData, PerCpuArray};
    use flannel_common::{
        LAYOUT_VERSION, MAP_PEER_COUNTERS,
        maps::{MAX_PEERS, PeerCounters},
    };
    let pin = host
        .pin_dir()
        .join(format!("hostgw/v{LAYOUT_VERSION}/{MAP_PEER_COUNTERS}"));
    let data = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let counters: PerCpuArray<_, PeerCounters> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).expect("per-cpu array");
    (0..MAX_PEERS)
        .flat_map(|i| counters.get(&i, 0).expect("read counters").to_vec())
        .fold((0, 0), |(tx, rx), c| (tx + c.tx_packets, rx + c.rx_packets))
}

/// `--dataplane=ebpf` on host-gw: an eBPF node and a kernel node (`auto`, which keeps
/// kernel routing and says why) share a cluster; the forwarder carries pod traffic both
/// ways next to flannel's routes, keeps forwarding while flanneld is killed, is adopted
/// with its counters by the restarted flanneld, and lets go of a peer whose lease goes.
#[test]
fn host_gw_ebpf_forwarder_carries_pod_traffic_and_outlives_flanneld() {
    let test = "host_gw_ebpf_forwarder_carries_pod_traffic_and_outlives_flanneld";
    if !flannel_tests::require_ebpf(test) {
        return;
    }
    let Some(c) = host_gw_cluster(test) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let ((mut fa, sa), (mut fb, sb)) = c.start_two(&["--dataplane=ebpf"], &["--dataplane=auto"]);
    fa.expect_log("eBPF host-gw forwarder attached", Duration::from_secs(5));
    let st = b.status();
    assert_eq!(st["dataplane"], "kernel", "{st}");
    assert!(
        st["refused"].to_string().contains("netfilter"),
        "auto says why it keeps kernel routing: {st}"
    );
    // The routes are flannel's, whatever the dataplane.
    wait_route(&a.ns, &format!("{sb} via {} dev eth0", b.ip), CONVERGE);
    wait_route(&b.ns, &format!("{sa} via {} dev eth0", a.ip), CONVERGE);

    // The pod bridges appear after flanneld, as Docker's would; A attaches to its own.
    let ca = Container::new(a, &sa);
    let cb = Container::new(b, &sb);
    fa.expect_log(
        "eBPF host-gw forwarder: pod devices",
        Duration::from_secs(15),
    );
    assert!(ca.can_ping(cb.ip, Duration::from_secs(10)), "A→B ping");
    assert!(cb.can_ping(ca.ip, Duration::from_secs(10)), "B→A ping");
    let server = cb.iperf3_server();
    ca.tcp_transfer(&cb, false);
    ca.tcp_transfer(&cb, true);
    drop(server);
    let carried = wait_until(Duration::from_secs(10), || {
        a.peer_packets(&sb)
            .filter(|&(tx, rx)| tx > 1000 && rx > 1000)
    });
    assert!(
        carried.is_some(),
        "A's forwarder did not carry the transfer both ways: {:?}, {}",
        a.peer_packets(&sb),
        a.status()
    );
    assert_eq!(a.status()["dataplane"], "ebpf");

    // SIGKILL: the pinned programs go on forwarding.
    fa.kill();
    let before = pinned_forwarded(a);
    assert!(
        ca.can_ping(cb.ip, Duration::from_secs(10)),
        "ping, flanneld dead"
    );
    let after = pinned_forwarded(a);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "no forwarding while flanneld was dead: {before:?} → {after:?}"
    );

    // The restart adopts the pins: same counters, no flush.
    let mut fa = a.flanneld(&c.etcd, &["--dataplane=ebpf"]);
    let line = fa.expect_log("adopted pinned eBPF maps", flannel_tests::FLANNELD_READY);
    assert!(
        line.contains(r#"fast_path="host-gw""#) && line.contains("synced=true"),
        "{line}"
    );
    fa.expect_log("flanneld is ready", flannel_tests::FLANNELD_READY);
    let adopted = wait_until(Duration::from_secs(10), || {
        a.peer_packets(&sb).filter(|&(tx, _)| tx >= after.0)
    });
    assert!(
        adopted.is_some(),
        "counters restarted: {:?} < {after:?}",
        a.peer_packets(&sb)
    );
    assert!(
        ca.can_ping(cb.ip, Duration::from_secs(10)),
        "ping after restart"
    );

    // B leaves for good: its route and its forwarder entry go.
    fb.kill();
    c.etcd.delete(&lease_key(&sb));
    let gone = wait_until(Duration::from_secs(15), || {
        let routed = routes(&a.ns).contains(&sb);
        let listed = a.peer_packets(&sb).is_some();
        (!routed && !listed).then_some(())
    });
    assert!(
        gone.is_some(),
        "peer kept after its lease was deleted:\n{}\n{}",
        routes(&a.ns),
        a.status()
    );
    drop(fa);
}
