//! The VXLAN programs under BPF_PROG_TEST_RUN (aya `test_run`), with crafted frames.
//!
//! Each test runs in a private network namespace that the test thread enters (test_run
//! and the programs' `bpf_fib_lookup` use the calling thread's namespace). The namespace
//! has an underlay `eth0` (a veth) with 192.168.50.1/24 and a permanent neighbour for the
//! peer's PublicIP 192.168.50.2, so the encap program's FIB lookup resolves the outer
//! MACs deterministically.
//!
//! Documented verdicts (see `flannel_common::maps::reason`): anything the programs cannot
//! handle exactly is `TC_ACT_OK` (the kernel's vxlan path takes it), counted by reason;
//! spoofed VXLAN is `TC_ACT_SHOT`, counted; forwarded packets are `TC_ACT_REDIRECT`.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr as _,
};

use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType},
};
use flannel_agent::{
    dataplane::{FastPathConfig, Ipv4Net, PeerEntry, VxlanFastPath},
    mac::MacAddr,
};
use flannel_common::{
    LAYOUT_VERSION, MAP_CONFIG, MAP_PEER_COUNTERS, MAP_PEERS, MAP_REASONS, MAP_SOURCES, PROG_DECAP,
    PROG_ENCAP,
    maps::{Config, FLAG_PEERS_SYNCED, MAX_PEERS, Peer, PeerCounters, PeerSource, reason},
};
use flannel_tests::{
    NetNs,
    bpf::{
        InNetns, LayoutDir, LogCapture, NEXT_HOP_MAC, PrivateBpffs, ProgLab, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT, add_flannel_vxlan, add_vxlan_peer, counters_for,
        expect_decap_inner_checks, in_netns, kernel_vxlan_host, nonzero_reasons, open_pinned,
        peer_map_entries, per_cpu, ping, reason_count, require_root_and_bpf, tcp_both_ways,
        vxlan_fast_path_config,
    },
    packet::{Ip, be, checksum, eth, icmp, mask, udp, vxlan_hdr},
};

const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const VTEP_A: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
const VTEP_B: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x02];
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const VNI: u32 = 1;
const PORT: u16 = 8472;
const VXLAN_IFINDEX: u32 = 4242;
const SLOT_A: u32 = 1;
const SLOT_B: u32 = 3;

/// A namespace with the underlay, the loaded vxlan programs and their maps.
type Lab = ProgLab;

/// The vxlan programs' setup on a [`ProgLab`].
trait VxlanLab: Sized {
    /// The lab as node A, with both nodes' subnets as peers.
    fn new(test_name: &str) -> Option<Self>;
    fn config(&mut self, cfg: Config);
    /// Node A: 192.168.50.1, subnet 10.244.1.0/24, VtepMAC VTEP_A.
    fn be_node_a(&mut self, flags: u32);
    /// Node B: 192.168.50.2, subnet 10.244.2.0/24, VtepMAC VTEP_B (to decap what A sent).
    fn be_node_b(&mut self);
    /// The node at `ip` with subnet 10.244.`third`.0/24 and VtepMAC `vtep`.
    fn be_node(&mut self, ip: Ipv4Addr, third: u8, vtep: [u8; 6], flags: u32);
}

impl VxlanLab for ProgLab {
    fn new(test_name: &str) -> Option<Lab> {
        let mut lab = ProgLab::load(
            test_name,
            "bpf",
            NODE_A_IP,
            NODE_B_IP,
            &[PROG_ENCAP, PROG_DECAP],
        )?;
        lab.set_peer(Ipv4Addr::new(10, 244, 2, 0), 24, NODE_B_IP, VTEP_B, SLOT_B);
        lab.set_peer(Ipv4Addr::new(10, 244, 1, 0), 24, NODE_A_IP, VTEP_A, SLOT_A);
        lab.be_node_a(FLAG_PEERS_SYNCED);
        Some(lab)
    }

    fn config(&mut self, cfg: Config) {
        self.set_config(MAP_CONFIG, cfg);
    }

    fn be_node_a(&mut self, flags: u32) {
        self.be_node(NODE_A_IP, 1, VTEP_A, flags);
    }

    fn be_node_b(&mut self) {
        self.be_node(NODE_B_IP, 2, VTEP_B, FLAG_PEERS_SYNCED);
    }

    fn be_node(&mut self, ip: Ipv4Addr, third: u8, vtep: [u8; 6], flags: u32) {
        let cfg = Config {
            public_ip_be: be(ip),
            subnet_be: be(Ipv4Addr::new(10, 244, third, 0)),
            subnet_mask_be: mask(24),
            vni: VNI,
            underlay_ifindex: self.underlay_ifindex,
            vxlan_ifindex: VXLAN_IFINDEX,
            underlay_mtu: 1500,
            flags,
            port_be: PORT.to_be(),
            vtep_mac: vtep,
        };
        self.config(cfg);
    }
}

/// The frame the kernel hands to flannel.1's TC egress for pod A → pod B.
fn inner_frame(ip: Ip, payload_len: usize) -> Vec<u8> {
    let mut f = eth(VTEP_B, VTEP_A, 0x0800);
    f.extend(ip.bytes(&icmp(payload_len)));
    f
}

/// A VXLAN frame on the underlay: `outer` carries UDP to `dport` with `vxlan` + `inner`.
fn vxlan_frame(outer: Ip, sport: u16, dport: u16, vxlan: [u8; 8], inner: &[u8]) -> Vec<u8> {
    let mut f = eth([0x02, 0, 0, 0, 0, 0xa1], NEXT_HOP_MAC, 0x0800);
    f.extend(outer.bytes(&udp(sport, dport, &[&vxlan[..], inner].concat())));
    f
}

/// A valid VXLAN frame from node B to node A carrying pod B → pod A.
fn from_b(inner_src: Ipv4Addr, inner_dst: Ipv4Addr) -> (Vec<u8>, Vec<u8>) {
    let mut inner = eth(VTEP_A, VTEP_B, 0x0800);
    inner.extend(Ip::new(inner_src, inner_dst, 1).bytes(&icmp(40)));
    let outer = Ip {
        frag: 0,
        ..Ip::new(NODE_B_IP, NODE_A_IP, 17)
    };
    (
        vxlan_frame(outer, 40000, PORT, vxlan_hdr(VNI), &inner),
        inner,
    )
}

// ---------------------------------------------------------------------------------------
// Encap
// ---------------------------------------------------------------------------------------

#[test]
fn encap_output_byte_for_byte() {
    let Some(mut lab) = Lab::new("encap_output_byte_for_byte") else {
        return;
    };
    let inner = inner_frame(Ip::new(POD_A, POD_B, 1), 56);
    let (verdict, out) = lab.run(PROG_ENCAP, &inner);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "encap redirects to the underlay; reasons {:?}",
        lab.reasons()
    );
    assert_eq!(out.len(), inner.len() + 50);

    // Random per packet: the IP id; flow hash dependent: the UDP source port.
    let id = u16::from_be_bytes([out[18], out[19]]);
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert!(
        (32768..61000).contains(&sport),
        "source port {sport} outside the ephemeral range"
    );

    let mut expected = eth(NEXT_HOP_MAC, lab.underlay_mac, 0x0800);
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&PORT.to_be_bytes());
    udp.extend_from_slice(&((8 + 8 + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // UDP checksum 0 (IPv4)
    udp.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]); // I flag, VNI 1
    udp.extend_from_slice(&inner);
    let outer = Ip {
        id,
        frag: 0, // DF clear, like the kernel's flannel.1
        ..Ip::new(NODE_A_IP, NODE_B_IP, 17)
    };
    expected.extend(outer.bytes(&udp));
    assert_eq!(out, expected, "encapsulated frame");
    assert_eq!(checksum(&out[14..34]), 0, "outer IPv4 header checksum");

    let c = lab.peer_counters(SLOT_B);
    assert_eq!(c.tx_packets, 1);
    assert_eq!(c.tx_bytes, inner.len() as u64);
    assert_eq!(c.rx_packets, 0);

    // The same flow gets the same source port; ECN is copied per RFC 6040.
    let ect = inner_frame(
        Ip {
            tos: 0x02,
            ..Ip::new(POD_A, POD_B, 1)
        },
        56,
    );
    let (_, out2) = lab.run(PROG_ENCAP, &inner);
    assert_eq!(u16::from_be_bytes([out2[34], out2[35]]), sport);
    let (_, out3) = lab.run(PROG_ENCAP, &ect);
    assert_eq!(out3[15], 0x02, "outer ECN copies inner ECT(0)");
}

#[test]
fn encap_hands_the_rest_to_the_kernel() {
    let Some(mut lab) = Lab::new("encap_hands_the_rest_to_the_kernel") else {
        return;
    };
    let ok = inner_frame(Ip::new(POD_A, POD_B, 1), 56);

    lab.expect(
        "no peer",
        PROG_ENCAP,
        &inner_frame(Ip::new(POD_A, Ipv4Addr::new(10, 244, 9, 1), 1), 56),
        TC_ACT_OK,
        Some(reason::PASS_NO_PEER),
    );
    lab.expect(
        "fragment",
        PROG_ENCAP,
        &inner_frame(
            Ip {
                frag: 0x2000,
                ..Ip::new(POD_A, POD_B, 1)
            },
            56,
        ),
        TC_ACT_OK,
        Some(reason::PASS_FRAGMENT),
    );
    let mut v6 = ok.clone();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    lab.expect(
        "IPv6",
        PROG_ENCAP,
        &v6,
        TC_ACT_OK,
        Some(reason::PASS_NOT_IPV4),
    );
    let mut arp = ok.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    lab.expect(
        "ARP",
        PROG_ENCAP,
        &arp,
        TC_ACT_OK,
        Some(reason::PASS_NOT_IPV4),
    );
    // 1464 bytes is the largest flannel.1 frame (MTU 1450): it fits; one more does not.
    let max = inner_frame(Ip::new(POD_A, POD_B, 1), 1464 - 14 - 20 - 8);
    assert_eq!(max.len(), 1464);
    assert_eq!(lab.run(PROG_ENCAP, &max).0, TC_ACT_REDIRECT);
    let big = inner_frame(Ip::new(POD_A, POD_B, 1), 1465 - 14 - 20 - 8);
    lab.expect(
        "oversize",
        PROG_ENCAP,
        &big,
        TC_ACT_OK,
        Some(reason::PASS_OVERSIZE),
    );
    // Truncated at every byte from the Ethernet header (test_run needs 14 bytes) to the
    // end of the IPv4 header.
    for len in 14..34 {
        lab.expect_truncated(PROG_ENCAP, &ok[..len]);
    }
    // No peer route for the PublicIP (neighbour gone is fine: redirect_neigh resolves).
    lab.set_peer(
        Ipv4Addr::new(10, 244, 7, 0),
        24,
        Ipv4Addr::new(203, 0, 113, 9),
        VTEP_B,
        7,
    );
    lab.expect(
        "no route to the peer",
        PROG_ENCAP,
        &inner_frame(Ip::new(POD_A, Ipv4Addr::new(10, 244, 7, 1), 1), 56),
        TC_ACT_OK,
        Some(reason::PASS_NO_ROUTE),
    );
    lab.set_peer(
        Ipv4Addr::new(10, 244, 8, 0),
        24,
        Ipv4Addr::new(192, 168, 50, 8),
        VTEP_B,
        8,
    );
    let (verdict, _) = lab.run(
        PROG_ENCAP,
        &inner_frame(Ip::new(POD_A, Ipv4Addr::new(10, 244, 8, 1), 1), 56),
    );
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "unresolved neighbour: redirect_neigh"
    );

    // Forwarding disabled: the FIB helper refuses, the kernel routes in redirect_neigh.
    lab.ns
        .exec_ok(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=0"]);
    let (verdict, _) = lab.run(PROG_ENCAP, &ok);
    assert_eq!(verdict, TC_ACT_REDIRECT, "forwarding off: redirect_neigh");

    // Before the agent writes a configuration, everything passes.
    lab.config(Config::default());
    lab.expect(
        "no config",
        PROG_ENCAP,
        &ok,
        TC_ACT_OK,
        Some(reason::PASS_NO_CONFIG),
    );
}

// ---------------------------------------------------------------------------------------
// Decap
// ---------------------------------------------------------------------------------------

#[test]
fn encap_decap_round_trip() {
    let Some(mut lab) = Lab::new("encap_decap_round_trip") else {
        return;
    };
    let inner = inner_frame(Ip::new(POD_A, POD_B, 1), 100);
    let (verdict, wire) = lab.run(PROG_ENCAP, &inner);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    lab.be_node_b();
    let (verdict, out) = lab.run(PROG_DECAP, &wire);
    assert_eq!(verdict, TC_ACT_REDIRECT, "decap redirects to flannel.1");
    assert_eq!(out, inner, "decap(encap(frame)) == frame");
    let c = lab.peer_counters(SLOT_A);
    assert_eq!((c.rx_packets, c.rx_bytes), (1, inner.len() as u64));
}

#[test]
fn decap_verdicts() {
    let Some(mut lab) = Lab::new("decap_verdicts") else {
        return;
    };
    let (good, inner) = from_b(POD_B, POD_A);
    let (verdict, out) = lab.run(PROG_DECAP, &good);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, inner);
    let c = lab.peer_counters(SLOT_B);
    assert_eq!((c.rx_packets, c.rx_bytes), (1, inner.len() as u64));

    // Truncated at every byte up to the end of the inner IPv4 header: never forwarded,
    // never a crash. Before the UDP header the frame is not recognisably VXLAN (not
    // counted); from there on it is a bad header.
    for len in 14..good.len() {
        lab.expect_truncated(PROG_DECAP, &good[..len]);
    }
    lab.expect(
        "truncated inside the VXLAN header",
        PROG_DECAP,
        &good[..46],
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );

    let mut inner_ok = eth(VTEP_A, VTEP_B, 0x0800);
    inner_ok.extend(Ip::new(POD_B, POD_A, 1).bytes(&icmp(40)));
    let udp_to_us = Ip {
        frag: 0,
        ..Ip::new(NODE_B_IP, NODE_A_IP, 17)
    };
    let with = |outer: Ip, dport: u16, vx: [u8; 8]| vxlan_frame(outer, 40000, dport, vx, &inner_ok);

    // Outer IHL 6: an options word between IPv4 and UDP.
    let ihl6 = with(
        Ip {
            ihl: 6,
            ..udp_to_us
        },
        PORT,
        vxlan_hdr(VNI),
    );
    lab.expect(
        "IHL 6",
        PROG_DECAP,
        &ihl6,
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );
    lab.expect(
        "outer fragment (MF)",
        PROG_DECAP,
        &with(
            Ip {
                frag: 0x2000,
                ..udp_to_us
            },
            PORT,
            vxlan_hdr(VNI),
        ),
        TC_ACT_OK,
        Some(reason::PASS_FRAGMENT),
    );
    lab.expect(
        "outer fragment (offset)",
        PROG_DECAP,
        &with(
            Ip {
                frag: 0x0010,
                ..udp_to_us
            },
            PORT,
            vxlan_hdr(VNI),
        ),
        TC_ACT_OK,
        Some(reason::PASS_FRAGMENT),
    );
    lab.expect(
        "wrong VNI",
        PROG_DECAP,
        &with(udp_to_us, PORT, vxlan_hdr(2)),
        TC_ACT_OK,
        Some(reason::PASS_OTHER_VNI),
    );
    lab.expect(
        "VXLAN flags other than I",
        PROG_DECAP,
        &with(udp_to_us, PORT, [0x0c, 0, 0, 0, 0, 0, 1, 0]),
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );
    lab.expect(
        "wrong port (not ours, not counted)",
        PROG_DECAP,
        &with(udp_to_us, 4789, vxlan_hdr(VNI)),
        TC_ACT_OK,
        None,
    );
    lab.expect(
        "another destination (not ours)",
        PROG_DECAP,
        &with(
            Ip {
                dst: Ipv4Addr::new(192, 168, 50, 77),
                ..udp_to_us
            },
            PORT,
            vxlan_hdr(VNI),
        ),
        TC_ACT_OK,
        None,
    );
    let mut v6 = good.clone();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    lab.expect("outer IPv6", PROG_DECAP, &v6, TC_ACT_OK, None);
    let mut bad_len = good.clone();
    bad_len[38..40].copy_from_slice(&100u16.to_be_bytes());
    lab.expect(
        "UDP length mismatch",
        PROG_DECAP,
        &bad_len,
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );

    // Anti-spoofing.
    lab.expect(
        "spoofed outer source",
        PROG_DECAP,
        &with(
            Ip {
                src: Ipv4Addr::new(192, 168, 50, 99),
                ..udp_to_us
            },
            PORT,
            vxlan_hdr(VNI),
        ),
        TC_ACT_SHOT,
        Some(reason::DROP_UNKNOWN_SOURCE),
    );
    let (spoofed_inner, _) = from_b(Ipv4Addr::new(10, 244, 3, 4), POD_A);
    // Valid peer, but not for us to deliver.
    let (not_local, _) = from_b(POD_B, Ipv4Addr::new(10, 244, 5, 5));
    expect_decap_inner_checks(&mut lab, PROG_DECAP, &good, &spoofed_inner, &not_local);
    let mut other_mac = good.clone();
    other_mac[50..56].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    lab.expect(
        "inner destination MAC not our VtepMAC",
        PROG_DECAP,
        &other_mac,
        TC_ACT_OK,
        Some(reason::PASS_OTHER_MAC),
    );
    lab.expect(
        "outer ECN CE",
        PROG_DECAP,
        &with(
            Ip {
                tos: 0x03,
                ..udp_to_us
            },
            PORT,
            vxlan_hdr(VNI),
        ),
        TC_ACT_OK,
        Some(reason::PASS_ECN_CE),
    );
    let mut inner_v6 = good.clone();
    inner_v6[62..64].copy_from_slice(&0x86ddu16.to_be_bytes());
    lab.expect(
        "inner IPv6",
        PROG_DECAP,
        &inner_v6,
        TC_ACT_OK,
        Some(reason::PASS_NOT_IPV4),
    );

    // Before the first full peer sync, unknown sources go to the kernel (flannel's
    // behaviour) instead of being dropped.
    lab.be_node_a(0);
    lab.expect(
        "unknown source before the first sync",
        PROG_DECAP,
        &with(
            Ip {
                src: Ipv4Addr::new(192, 168, 50, 99),
                ..udp_to_us
            },
            PORT,
            vxlan_hdr(VNI),
        ),
        TC_ACT_OK,
        Some(reason::PASS_NOT_SYNCED),
    );
}

// ---------------------------------------------------------------------------------------
// Real packets: the fast path on host A against a plain kernel flannel.1 on host B.
// ---------------------------------------------------------------------------------------

const HOST_MAC_A: &str = "02:fa:00:00:00:0a";
const HOST_MAC_B: &str = "02:fb:00:00:00:0b";

/// One flannel host: a namespace on the underlay with a kernel flannel.1 configured as
/// Go flannel does, and a container namespace behind it.
struct Host {
    ns: NetNs,
    container: NetNs,
    public_ip: Ipv4Addr,
    subnet: Ipv4Net,
    vtep_mac: &'static str,
}

impl Host {
    fn new(
        ul: &mut flannel_tests::Underlay,
        name: &str,
        third: u8,
        vtep_mac: &'static str,
    ) -> Host {
        let ns = NetNs::new(name);
        let public_ip = ul.attach(&ns, "eth0");
        let container = NetNs::new(&format!("{name}c"));
        let subnet: Ipv4Net = format!("10.244.{third}.0/24").parse().unwrap();
        kernel_vxlan_host(&ns, public_ip, &container, third, vtep_mac);
        Host {
            ns,
            container,
            public_ip,
            subnet,
            vtep_mac,
        }
    }

    fn container_ip(&self) -> Ipv4Addr {
        let o = self.subnet.addr().octets();
        Ipv4Addr::new(o[0], o[1], o[2], 2)
    }

    /// What flanneld programs for a peer: neigh, FDB, onlink route.
    fn add_peer(&self, peer: &Host) {
        add_vxlan_peer(&self.ns, peer.subnet, peer.public_ip, peer.vtep_mac);
    }

    fn peer_entry(&self) -> flannel_agent::dataplane::PeerEntry {
        flannel_agent::dataplane::PeerEntry {
            subnet: self.subnet,
            public_ip: self.public_ip,
            vtep_mac: MacAddr::from_str(self.vtep_mac).unwrap(),
        }
    }

    /// The fast path config for this host; call inside its namespace.
    fn fast_path_config(&self, pin_dir: std::path::PathBuf) -> FastPathConfig {
        vxlan_fast_path_config(self.public_ip, self.subnet, self.vtep_mac, pin_dir)
    }
}

#[test]
fn interop_with_kernel_flannel_and_restart() {
    const TEST: &str = "interop_with_kernel_flannel_and_restart";
    if !require_root_and_bpf(TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.97.0");
    let a = Host::new(&mut ul, "ha", 1, HOST_MAC_A);
    let b = Host::new(&mut ul, "hb", 2, HOST_MAC_B);
    a.add_peer(&b);
    b.add_peer(&a);
    // Kernel-only first: the topology works as flannel's.
    ping(&a.container, b.container_ip(), 1);

    let _inside = InNetns::enter(&a.ns);
    let mut fp = VxlanFastPath::attach(a.fast_path_config(bpffs.pin_dir())).expect("attach");
    fp.sync_peers(&[b.peer_entry()]).expect("sync peers");

    // Ping both ways: 5 requests and 5 replies cross A's fast path in each direction.
    ping(&a.container, b.container_ip(), 5);
    ping(&b.container, a.container_ip(), 5);
    let c = counters_for(&fp, b.subnet);
    assert_eq!(
        (c.tx_packets, c.rx_packets),
        (10, 10),
        "every ping packet took the eBPF path: {c:?}; reasons {:?}",
        fp.drop_counters()
    );
    assert!(c.tx_bytes >= 10 * 98 && c.rx_bytes >= 10 * 98, "{c:?}");

    // TCP both ways (B's kernel sends GSO aggregates that A's decap leaves to the kernel;
    // A's encap carries its GSO packets itself).
    let n = 8 << 20;
    tcp_both_ways(
        &a.container,
        a.container_ip(),
        &b.container,
        b.container_ip(),
        n,
    );
    let c2 = counters_for(&fp, b.subnet);
    assert!(
        c2.tx_bytes > c.tx_bytes + n as u64 && c2.rx_packets > c.rx_packets,
        "TCP went through the fast path: {c2:?}; reasons {:?}",
        fp.drop_counters()
    );
    assert_eq!(reason_count(&fp, "drop_unknown_source"), 0);
    assert_eq!(reason_count(&fp, "drop_inner_source"), 0);

    // "SIGKILL": the agent goes away without detaching. Forwarding goes on.
    drop(fp);
    ping(&a.container, b.container_ip(), 3);
    // A new agent adopts the pinned maps: peers and counters intact, no flush.
    let fp = VxlanFastPath::attach(a.fast_path_config(bpffs.pin_dir())).expect("re-attach");
    assert_eq!(fp.peers(), vec![b.peer_entry()], "peer map adopted");
    let c3 = counters_for(&fp, b.subnet);
    assert_eq!(
        c3.tx_packets,
        c2.tx_packets + 3,
        "old programs kept forwarding"
    );
    // The new programs replaced the old ones on the same links.
    ping(&b.container, a.container_ip(), 2);
    let c4 = counters_for(&fp, b.subnet);
    assert_eq!(c4.rx_packets, c3.rx_packets + 2);
    assert_eq!(c4.tx_packets, c3.tx_packets + 2);

    fp.detach_and_unpin().expect("detach");
    assert!(!bpffs.pin_dir().exists(), "pins removed");
    // The kernel path alone still works.
    ping(&a.container, b.container_ip(), 1);
}

/// Crafted VXLAN for A's port 8472: (inner source, inner destination) inside a valid
/// VXLAN frame from `VTEP_B`-style MACs, UDP to port 9999.
fn crafted_vxlan(
    src_mac: &str,
    dst_mac: &str,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
) -> Vec<u8> {
    let m = |s: &str| MacAddr::from_str(s).unwrap().0;
    let mut inner = eth(m(dst_mac), m(src_mac), 0x0800);
    let mut udp = Vec::new();
    udp.extend_from_slice(&4444u16.to_be_bytes());
    udp.extend_from_slice(&9999u16.to_be_bytes());
    udp.extend_from_slice(&(8u16 + 5).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(b"hello");
    inner.extend(
        Ip {
            ttl: 63,
            ..Ip::new(inner_src, inner_dst, 17)
        }
        .bytes(&udp),
    );
    let mut payload = vxlan_hdr(1).to_vec();
    payload.extend(inner);
    payload
}

#[test]
fn spoofed_vxlan_is_dropped() {
    const TEST: &str = "spoofed_vxlan_is_dropped";
    if !require_root_and_bpf(TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.96.0");
    let a = Host::new(&mut ul, "sa", 1, HOST_MAC_A);
    let b = Host::new(&mut ul, "sb", 2, HOST_MAC_B);
    let evil = NetNs::new("evil");
    let evil_ip = ul.attach(&evil, "eth0");
    a.add_peer(&b);
    b.add_peer(&a);

    let _inside = InNetns::enter(&a.ns);
    let mut fp = VxlanFastPath::attach(a.fast_path_config(bpffs.pin_dir())).expect("attach");
    fp.sync_peers(&[b.peer_entry()]).expect("sync peers");

    // The container listens on UDP 9999.
    let cip = a.container_ip();
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = in_netns(&a.container, move || {
        let sock = std::net::UdpSocket::bind((cip, 9999)).expect("bind");
        sock.set_read_timeout(Some(std::time::Duration::from_millis(1500)))
            .unwrap();
        tx.send(()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 100];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            got.push((from, buf[..n].to_vec()));
        }
        got
    });
    rx.recv().unwrap();
    let send_from = |ns: &NetNs, src: Ipv4Addr, payload: Vec<u8>| {
        let dst = a.public_ip;
        in_netns(ns, move || {
            let s = std::net::UdpSocket::bind((src, 0)).expect("bind sender");
            s.send_to(&payload, (dst, 8472)).expect("send");
        })
        .join()
        .unwrap();
    };
    let before_unknown = reason_count(&fp, "drop_unknown_source");
    let before_inner = reason_count(&fp, "drop_inner_source");
    // 1. A non-peer claims to be B's container.
    send_from(
        &evil,
        evil_ip,
        crafted_vxlan(HOST_MAC_B, HOST_MAC_A, Ipv4Addr::new(10, 244, 2, 2), cip),
    );
    // 2. Peer B's address, but an inner source outside B's subnet.
    send_from(
        &b.ns,
        b.public_ip,
        crafted_vxlan(HOST_MAC_B, HOST_MAC_A, Ipv4Addr::new(10, 244, 7, 7), cip),
    );
    // 3. The same crafting, legitimate: proves the frames are well-formed.
    send_from(
        &b.ns,
        b.public_ip,
        crafted_vxlan(HOST_MAC_B, HOST_MAC_A, Ipv4Addr::new(10, 244, 2, 2), cip),
    );
    let got = listener.join().unwrap();
    assert_eq!(
        got,
        vec![(
            std::net::SocketAddr::from((Ipv4Addr::new(10, 244, 2, 2), 4444)),
            b"hello".to_vec()
        )],
        "only the legitimate datagram reaches the container"
    );
    assert_eq!(reason_count(&fp, "drop_unknown_source"), before_unknown + 1);
    assert_eq!(reason_count(&fp, "drop_inner_source"), before_inner + 1);
    let c = counters_for(&fp, b.subnet);
    assert_eq!(
        c.rx_packets, 1,
        "the legitimate datagram was decapsulated by eBPF"
    );
    fp.detach_and_unpin().expect("detach");
}

#[test]
fn probe_and_pinned_layouts() {
    const TEST: &str = "probe_and_pinned_layouts";
    if !require_root_and_bpf(TEST) {
        return;
    }
    flannel_agent::dataplane::probe().expect("this kernel runs the fast path");
    if !flannel_tests::require_binary("bpftool", TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.95.0");
    let a = Host::new(&mut ul, "la", 1, HOST_MAC_A);
    let _inside = InNetns::enter(&a.ns);
    let pin_dir = bpffs.pin_dir();
    let layout = pin_dir.join(format!("v{}", flannel_common::LAYOUT_VERSION));
    std::fs::create_dir_all(&layout).unwrap();
    let bpftool_create = |path: &std::path::Path, value_size: &str| {
        flannel_tests::run_ok(
            std::process::Command::new("bpftool")
                .args(["map", "create"])
                .arg(path)
                .args([
                    "type", "array", "key", "4", "value", value_size, "entries", "1", "name",
                    "fltest",
                ]),
        );
    };

    // A pinned map of our layout version with other sizes is refused, not reused.
    bpftool_create(&layout.join(MAP_CONFIG), "8");
    let err = VxlanFastPath::attach(a.fast_path_config(pin_dir.clone()))
        .expect_err("a changed layout must not be adopted");
    assert!(
        matches!(
            err,
            flannel_agent::dataplane::EbpfError::LayoutMismatch { .. }
        ),
        "{err}"
    );
    std::fs::remove_file(layout.join(MAP_CONFIG)).unwrap();

    // Maps of another layout version are migrated where their shape allows (this config
    // map's does not), and their pins removed after attach.
    let old = pin_dir.join("v0");
    std::fs::create_dir_all(&old).unwrap();
    bpftool_create(&old.join(MAP_CONFIG), "8");
    let fp = VxlanFastPath::attach(a.fast_path_config(pin_dir.clone())).expect("attach");
    assert!(!old.exists(), "old layout unpinned");
    assert!(layout.join(MAP_PEERS).exists(), "new layout pinned");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&pin_dir).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "pin directory is root-only");

    // flannel.1 deleted and recreated while the agent is down: the pinned encap link is
    // stale (its device is gone); a new attach replaces it on the new device.
    drop(fp);
    a.ns.ip(&["link", "del", "flannel.1"]);
    add_flannel_vxlan(&a.ns, a.public_ip);
    a.ns.ip(&["link", "set", "flannel.1", "up"]);
    let fp = VxlanFastPath::attach(a.fast_path_config(pin_dir.clone())).expect("re-attach");
    assert_eq!(
        tcx_programs("flannel.1", TcAttachType::Egress),
        vec![PROG_ENCAP]
    );
    assert_eq!(
        tcx_programs("eth0", TcAttachType::Ingress),
        vec![PROG_DECAP]
    );
    fp.detach_and_unpin().expect("detach");
    assert!(tcx_programs("flannel.1", TcAttachType::Egress).is_empty());
    assert!(tcx_programs("eth0", TcAttachType::Ingress).is_empty());
}

// ---------------------------------------------------------------------------------------
// Layout migration
// ---------------------------------------------------------------------------------------

/// Where a flanneld of the previous layout version pinned its maps.
fn previous_layout(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{}", LAYOUT_VERSION - 1))
}

/// The config an older flanneld on `host` left: its node, peers synced or not, ifindexes
/// of devices long gone (the new agent writes its own).
fn old_config(host: &Host, flags: u32) -> Config {
    Config {
        public_ip_be: be(host.public_ip),
        subnet_be: be(host.subnet.addr()),
        subnet_mask_be: mask(host.subnet.prefix_len()),
        vni: 1,
        underlay_ifindex: 9001,
        vxlan_ifindex: 9002,
        underlay_mtu: 1500,
        flags,
        port_be: 8472u16.to_be(),
        vtep_mac: MacAddr::from_str(host.vtep_mac).unwrap().0,
    }
}

/// Counters an older flanneld counted for a peer, different on every CPU.
fn old_peer_counters(seed: u64) -> Vec<PeerCounters> {
    per_cpu(|cpu| PeerCounters {
        tx_packets: seed + cpu,
        tx_bytes: seed * 100 + cpu,
        rx_packets: seed * 2 + cpu,
        rx_bytes: seed * 200 + cpu,
    })
}

fn sum(counters: &[PeerCounters]) -> PeerCounters {
    counters
        .iter()
        .fold(PeerCounters::default(), |a, c| a.add(*c))
}

/// The slot of `subnet` in the peer map pinned in `layout`.
fn pinned_slot(layout: &Path, subnet: Ipv4Net) -> u32 {
    let trie: LpmTrie<MapData, u32, Peer> = open_pinned(&layout.join(MAP_PEERS));
    trie.get(
        &Key::new(u32::from(subnet.prefix_len()), be(subnet.addr())),
        0,
    )
    .expect("peer pinned")
    .index
}

/// The source map pinned in `layout`, by PublicIP.
fn pinned_sources(layout: &Path) -> Vec<(u32, PeerSource)> {
    let hash: HashMap<MapData, u32, PeerSource> = open_pinned(&layout.join(MAP_SOURCES));
    let mut out: Vec<_> = hash.iter().map(Result::unwrap).collect();
    out.sort_unstable_by_key(|(ip, _)| *ip);
    out
}

/// The configuration pinned in `layout`.
fn pinned_config(layout: &Path) -> Config {
    let array: Array<MapData, Config> = open_pinned(&layout.join(MAP_CONFIG));
    array.get(&0, 0).unwrap()
}

/// Two vxlan hosts A and B on an underlay, each with the other as a kernel peer, and no
/// IPv6 in A's namespace (router solicitations on flannel.1 would count as
/// `pass_not_ipv4` and move the reason counts the tests compare).
fn migration_hosts(ul: &mut flannel_tests::Underlay, prefix: &str) -> (Host, Host) {
    let a = Host::new(ul, &format!("{prefix}a"), 1, HOST_MAC_A);
    let b = Host::new(ul, &format!("{prefix}b"), 2, HOST_MAC_B);
    a.add_peer(&b);
    b.add_peer(&a);
    a.ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    (a, b)
}

#[test]
fn migrates_an_old_layout_without_a_gap() {
    const TEST: &str = "migrates_an_old_layout_without_a_gap";
    if !require_root_and_bpf(TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.89.0");
    let (a, b) = migration_hosts(&mut ul, "m");
    let _inside = InNetns::enter(&a.ns);
    let pin_dir = bpffs.pin_dir();
    let layout = pin_dir.join(format!("v{LAYOUT_VERSION}"));

    // What a synced flanneld of the previous layout left: peers B and C (a node that is
    // down, so no traffic), each in its own slot with its own counters, and a reasons
    // array one reason shorter than ours.
    const SLOT_B: u32 = 7;
    const SLOT_C: u32 = 2;
    let c = PeerEntry {
        subnet: "10.244.3.0/24".parse().unwrap(),
        public_ip: Ipv4Addr::new(10, 89, 0, 200),
        vtep_mac: MacAddr::from_str("02:fc:00:00:00:0c").unwrap(),
    };
    let (b_route, b_source) = peer_map_entries(
        b.subnet,
        b.public_ip,
        MacAddr::from_str(b.vtep_mac).unwrap().0,
        SLOT_B,
    );
    let (c_route, c_source) = peer_map_entries(c.subnet, c.public_ip, c.vtep_mac.0, SLOT_C);
    let (b_counters, c_counters) = (old_peer_counters(1000), old_peer_counters(50));
    let old_reasons: Vec<(u32, Vec<u64>)> = (0..reason::COUNT - 1)
        .map(|i| (i, per_cpu(|cpu| u64::from(i + 1) * 1000 + cpu)))
        .collect();
    let old = LayoutDir::create(previous_layout(&pin_dir));
    old.array(MAP_CONFIG, 1, &[(0, old_config(&a, FLAG_PEERS_SYNCED))]);
    old.lpm_trie(MAP_PEERS, MAX_PEERS, &[b_route, c_route]);
    old.hash(MAP_SOURCES, MAX_PEERS, &[b_source, c_source]);
    old.per_cpu_array(
        MAP_PEER_COUNTERS,
        MAX_PEERS,
        &[(SLOT_B, b_counters.clone()), (SLOT_C, c_counters.clone())],
    );
    old.per_cpu_array(MAP_REASONS, reason::COUNT - 1, &old_reasons);

    let logs = LogCapture::start();
    let mut fp = VxlanFastPath::attach(a.fast_path_config(pin_dir.clone())).expect("attach");
    assert!(
        logs.warnings().is_empty(),
        "every map had our shape: {:?}",
        logs.warnings()
    );
    for name in [
        MAP_CONFIG,
        MAP_PEERS,
        MAP_SOURCES,
        MAP_PEER_COUNTERS,
        MAP_REASONS,
    ] {
        assert!(
            logs.text()
                .lines()
                .any(|l| l.contains("migrated map") && l.contains(name)),
            "{name} migrated: {}",
            logs.text()
        );
    }
    assert!(!old.path().exists(), "the old layout's pins are removed");

    // Peers and sources as they were, in the same slots.
    assert_eq!(fp.peers(), vec![b.peer_entry(), c], "peers migrated");
    assert_eq!(pinned_slot(&layout, b.subnet), SLOT_B);
    assert_eq!(pinned_slot(&layout, c.subnet), SLOT_C);
    let mut sources = vec![b_source, c_source];
    sources.sort_unstable_by_key(|(ip, _)| *ip);
    assert_eq!(pinned_sources(&layout), sources, "sources migrated");
    // Counters, CPU by CPU, in the peers' slots.
    let counters: PerCpuArray<MapData, PeerCounters> = open_pinned(&layout.join(MAP_PEER_COUNTERS));
    assert_eq!(counters.get(&SLOT_B, 0).unwrap().to_vec(), b_counters);
    assert_eq!(counters.get(&SLOT_C, 0).unwrap().to_vec(), c_counters);
    assert_eq!(counters_for(&fp, b.subnet), sum(&b_counters));
    // The reasons both layouts have kept their counts; the new one starts at zero.
    let reasons = fp.drop_counters().unwrap();
    assert_eq!(reasons.len(), reason::COUNT as usize);
    for (i, (name, count)) in reasons.iter().enumerate() {
        let expected = old_reasons
            .get(i)
            .map_or(0, |(_, per_cpu)| per_cpu.iter().sum());
        assert_eq!(*count, expected, "reason {name}");
    }
    // The old layout was synced and both peer maps came along: decap goes on dropping
    // unknown sources. The node's own part of the config is this agent's.
    let cfg = pinned_config(&layout);
    assert_ne!(cfg.flags & FLAG_PEERS_SYNCED, 0, "still synced");
    assert_eq!(cfg.vxlan_ifindex, flannel_tests::bpf::ifindex("flannel.1"));

    // Before any sync: traffic with B takes the fast path both ways, counted on B's slot.
    let unknown_before = reason_count(&fp, "drop_unknown_source");
    ping(&a.container, b.container_ip(), 5);
    ping(&b.container, a.container_ip(), 5);
    let after = counters_for(&fp, b.subnet);
    let before = sum(&b_counters);
    assert_eq!(
        (after.tx_packets, after.rx_packets),
        (before.tx_packets + 10, before.rx_packets + 10),
        "pings took the migrated fast path: {after:?}; reasons {:?}",
        fp.drop_counters()
    );
    assert_eq!(reason_count(&fp, "drop_unknown_source"), unknown_before);

    // The agent's first sync (C has left) changes nothing for B: same slot, counters on.
    fp.sync_peers(&[b.peer_entry()]).expect("sync");
    assert_eq!(fp.peers(), vec![b.peer_entry()]);
    assert_eq!(pinned_slot(&layout, b.subnet), SLOT_B);
    assert_eq!(counters_for(&fp, b.subnet), after);

    fp.detach_and_unpin().expect("detach");
    assert!(!pin_dir.exists(), "pins removed");
}

#[test]
fn migration_leaves_a_changed_map_empty() {
    const TEST: &str = "migration_leaves_a_changed_map_empty";
    if !require_root_and_bpf(TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.88.0");
    let (a, b) = migration_hosts(&mut ul, "n");
    let _inside = InNetns::enter(&a.ns);
    let pin_dir = bpffs.pin_dir();
    let layout = pin_dir.join(format!("v{LAYOUT_VERSION}"));

    // A synced old layout whose source map has another value size (8 bytes, ours has
    // 16), and no reasons map at all.
    const SLOT_B: u32 = 5;
    let (b_route, b_source) = peer_map_entries(
        b.subnet,
        b.public_ip,
        MacAddr::from_str(b.vtep_mac).unwrap().0,
        SLOT_B,
    );
    let b_counters = old_peer_counters(300);
    let old = LayoutDir::create(previous_layout(&pin_dir));
    old.array(MAP_CONFIG, 1, &[(0, old_config(&a, FLAG_PEERS_SYNCED))]);
    old.lpm_trie(MAP_PEERS, MAX_PEERS, &[b_route]);
    old.hash::<u32, [u32; 2]>(
        MAP_SOURCES,
        MAX_PEERS,
        &[(b_source.0, [b_source.1.subnet_be, b_source.1.mask_be])],
    );
    old.per_cpu_array(
        MAP_PEER_COUNTERS,
        MAX_PEERS,
        &[(SLOT_B, b_counters.clone())],
    );

    let logs = LogCapture::start();
    let mut fp = VxlanFastPath::attach(a.fast_path_config(pin_dir.clone())).expect("attach");
    let changed: Vec<String> = logs
        .warnings()
        .into_iter()
        .filter(|l| l.contains("map layout changed"))
        .collect();
    assert_eq!(changed.len(), 1, "one map changed: {}", logs.text());
    for part in [MAP_SOURCES, "value 8 B", "value 16 B"] {
        assert!(changed[0].contains(part), "{part} in {}", changed[0]);
    }
    assert!(!old.path().exists(), "the old layout's pins are removed");

    // The other maps came along: B keeps its slot and counters.
    assert_eq!(fp.peers(), vec![b.peer_entry()]);
    assert_eq!(pinned_slot(&layout, b.subnet), SLOT_B);
    assert_eq!(counters_for(&fp, b.subnet), sum(&b_counters));
    // The source map starts empty, so decap must not drop unknown sources yet.
    assert!(pinned_sources(&layout).is_empty(), "no sources copied");
    assert_eq!(
        pinned_config(&layout).flags & FLAG_PEERS_SYNCED,
        0,
        "not synced"
    );
    assert!(fp.drop_counters().unwrap().iter().all(|(_, n)| *n == 0));

    // Encap carries A -> B; B's VXLAN is no known source yet and goes to the kernel,
    // which delivers it: the pings get their replies.
    ping(&a.container, b.container_ip(), 3);
    let c1 = counters_for(&fp, b.subnet);
    let before = sum(&b_counters);
    assert_eq!(
        (c1.tx_packets, c1.rx_packets),
        (before.tx_packets + 3, before.rx_packets)
    );
    assert_eq!(reason_count(&fp, "pass_not_synced"), 3);
    assert_eq!(reason_count(&fp, "drop_unknown_source"), 0);

    // The sync writes B's source entry, for B's slot, and turns on dropping.
    fp.sync_peers(&[b.peer_entry()]).expect("sync");
    assert_eq!(
        pinned_sources(&layout),
        vec![b_source],
        "source from the sync"
    );
    assert_ne!(pinned_config(&layout).flags & FLAG_PEERS_SYNCED, 0);
    ping(&b.container, a.container_ip(), 2);
    let c2 = counters_for(&fp, b.subnet);
    assert_eq!(
        (c2.tx_packets, c2.rx_packets),
        (c1.tx_packets + 2, c1.rx_packets + 2)
    );

    fp.detach_and_unpin().expect("detach");
}

/// A live upgrade: the old programs forward with the old maps while the new agent
/// migrates them, under a steady ping. The old layout is made by renaming a running
/// fast path's layout directory to the previous version: its programs stay attached and
/// keep using those maps, as a running flanneld of the previous layout would.
#[test]
fn live_migration_keeps_the_fast_path() {
    const TEST: &str = "live_migration_keeps_the_fast_path";
    if !require_root_and_bpf(TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.86.0");
    let (a, b) = migration_hosts(&mut ul, "l");
    let _inside = InNetns::enter(&a.ns);
    let pin_dir = bpffs.pin_dir();
    let layout = pin_dir.join(format!("v{LAYOUT_VERSION}"));
    let mut fp = VxlanFastPath::attach(a.fast_path_config(pin_dir.clone())).expect("attach");
    fp.sync_peers(&[b.peer_entry()]).expect("sync");
    ping(&a.container, b.container_ip(), 2);
    drop(fp);
    std::fs::rename(&layout, previous_layout(&pin_dir)).expect("rename on bpffs");

    // 300 pings, 10 ms apart; the new agent starts in the middle.
    const PINGS: u64 = 300;
    let mut cmd = a.container.command("ping");
    cmd.args(["-c", &PINGS.to_string(), "-i", "0.01", "-W", "1"])
        .arg(b.container_ip().to_string());
    let pinger = std::thread::spawn(move || flannel_tests::run(&mut cmd));
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let fp = VxlanFastPath::attach(a.fast_path_config(pin_dir.clone())).expect("attach");
    let out = pinger.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" 0% packet loss"), "no loss: {stdout}");
    assert!(!previous_layout(&pin_dir).exists(), "old layout unpinned");

    // Every packet took the fast path, through the old programs and then the new ones:
    // nothing fell back to the kernel (no reason moved, none of the old layout's
    // reasons was anything but zero), and the counters went on from the old ones.
    assert_eq!(nonzero_reasons(&fp), vec![], "no packet left the fast path");
    let c = counters_for(&fp, b.subnet);
    assert_eq!(
        (c.tx_packets, c.rx_packets),
        (2 + PINGS, 2 + PINGS),
        "every packet counted once, before or after the swap"
    );
    fp.detach_and_unpin().expect("detach");
}

/// Names of the TCX programs on `ifname` (in the calling thread's namespace).
fn tcx_programs(ifname: &str, attach_type: TcAttachType) -> Vec<String> {
    let (_, progs) = SchedClassifier::query_tcx(ifname, attach_type).expect("query tcx");
    progs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
        .collect()
}
