//! The udp backend's eBPF fast path: its programs under BPF_PROG_TEST_RUN with crafted
//! frames, then real packets between namespace hosts whose `flannel0` is a TUN set up as
//! flanneld does, with the fast path on both ends or against a userspace flannel-udp peer.
//!
//! Documented verdicts (see `flannel_common::maps::reason`): anything the programs cannot
//! handle exactly is `TC_ACT_OK` (at encap the packet stays in `flannel0` for the
//! userspace proxy, at decap it goes to the UDP socket), counted by reason; spoofed
//! datagrams are `TC_ACT_SHOT`, counted; forwarded packets are `TC_ACT_REDIRECT`.
//!
//! BPF_PROG_TEST_RUN hands every TC program an Ethernet frame, while on `flannel0` (an L3
//! device) encap sees the bare IPv4 packet; the encap program takes the L3 view only on
//! `flannel0`, so these runs test everything after its first step, which the namespace
//! tests cover.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::{
    maps::{Array, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType},
};
use flannel_agent::dataplane::{Ipv4Net, UdpFastPath, UdpFastPathConfig, UdpPeerEntry};
use flannel_common::{
    LAYOUT_VERSION, MAP_PEER_COUNTERS, MAP_PEERS, MAP_REASONS, MAP_SOURCES, MAP_UDP_CONFIG,
    PROG_UDP_DECAP, PROG_UDP_ENCAP,
    maps::{FLAG_PEERS_SYNCED, MAX_PEERS, Peer, PeerCounters, UdpConfig, reason},
};
use flannel_tests::{
    NetNs,
    bpf::{
        LayoutDir, NEXT_HOP_MAC, PrivateBpffs, ProgLab, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        add_container, add_flannel_vxlan, add_vxlan_peer, counters_for, expect_decap_inner_checks,
        ifindex, in_netns, kernel_vxlan_host, nonzero_reasons, open_pinned, peer_map_entries,
        per_cpu, ping, reason_count, require_root_and_bpf, tcp_both_ways, tcp_transfer,
        vxlan_fast_path_config,
    },
    packet::{Ip, be, checksum, eth, icmp, mask, udp},
    require_root,
};

const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 2);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const PORT: u16 = 8285;
/// Not the loopback device test_run runs on: the programs see Ethernet frames.
const TUN_IFINDEX: u32 = 4343;
const SLOT_A: u32 = 1;
const SLOT_B: u32 = 3;
/// flannel0's MTU on a 1500-byte underlay.
const TUN_MTU: usize = 1472;

// ---------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------------------

/// A namespace with the underlay, the loaded udp programs and their maps.
type Lab = ProgLab;

/// The udp programs' setup on a [`ProgLab`].
trait UdpLab: Sized {
    /// The lab as node A, with both nodes' subnets as peers.
    fn new(test_name: &str) -> Option<Self>;
    fn config(&mut self, cfg: UdpConfig);
    /// Node at `ip` with subnet 10.244.`third`.0/24.
    fn be_node(&mut self, ip: Ipv4Addr, third: u8, flags: u32);
    /// A peer (no VTEP MAC: the udp backend has none).
    fn set_udp_peer(&mut self, net: Ipv4Addr, len: u8, ip: Ipv4Addr, slot: u32);
}

impl UdpLab for ProgLab {
    fn new(test_name: &str) -> Option<Lab> {
        let mut lab = ProgLab::load(
            test_name,
            "udpbpf",
            NODE_A_IP,
            NODE_B_IP,
            &[PROG_UDP_ENCAP, PROG_UDP_DECAP],
        )?;
        lab.set_udp_peer(Ipv4Addr::new(10, 244, 2, 0), 24, NODE_B_IP, SLOT_B);
        lab.set_udp_peer(Ipv4Addr::new(10, 244, 1, 0), 24, NODE_A_IP, SLOT_A);
        lab.be_node(NODE_A_IP, 1, FLAG_PEERS_SYNCED);
        Some(lab)
    }

    fn config(&mut self, cfg: UdpConfig) {
        self.set_config(MAP_UDP_CONFIG, cfg);
    }

    fn be_node(&mut self, ip: Ipv4Addr, third: u8, flags: u32) {
        let cfg = UdpConfig {
            public_ip_be: be(ip),
            subnet_be: be(Ipv4Addr::new(10, 244, third, 0)),
            subnet_mask_be: mask(24),
            underlay_ifindex: self.underlay_ifindex,
            tun_ifindex: TUN_IFINDEX,
            underlay_mtu: 1500,
            flags,
            port_be: PORT.to_be(),
            _pad: 0,
        };
        self.config(cfg);
    }

    fn set_udp_peer(&mut self, net: Ipv4Addr, len: u8, ip: Ipv4Addr, slot: u32) {
        self.set_peer(net, len, ip, [0; 6], slot);
    }
}

// Frame builders, written independently of the programs: see `flannel_tests::packet`.

/// What test_run hands encap for pod A → pod B: an Ethernet header (on flannel0 there is
/// none) and the inner packet.
fn tun_frame(ip: Ip, payload_len: usize) -> Vec<u8> {
    let mut f = eth([0; 6], [0; 6], 0x0800);
    f.extend(ip.bytes(&icmp(payload_len)));
    f
}

/// A flannel-udp frame on the underlay: `outer` carries UDP to `dport` with `inner`.
fn udp_frame(outer: Ip, sport: u16, dport: u16, inner: &[u8]) -> Vec<u8> {
    let mut f = eth([0x02, 0, 0, 0, 0, 0xa1], NEXT_HOP_MAC, 0x0800);
    f.extend(outer.bytes(&udp(sport, dport, inner)));
    f
}

/// A valid flannel-udp frame from node B to node A carrying `inner_src` → `inner_dst`
/// (TTL 63, as flanneld on B sends it); also returns the inner packet.
fn from_b(inner_src: Ipv4Addr, inner_dst: Ipv4Addr) -> (Vec<u8>, Vec<u8>) {
    let inner = Ip {
        ttl: 63,
        ..Ip::new(inner_src, inner_dst, 1)
    }
    .bytes(&icmp(40));
    let outer = Ip {
        frag: 0,
        ..Ip::new(NODE_B_IP, NODE_A_IP, 17)
    };
    (udp_frame(outer, 40000, PORT, &inner), inner)
}

#[test]
fn encap_output_byte_for_byte() {
    let Some(mut lab) = Lab::new("udp_encap_output_byte_for_byte") else {
        return;
    };
    let sent = Ip::new(POD_A, POD_B, 1);
    let frame = tun_frame(sent, 56);
    let inner_len = frame.len() - 14;
    let (verdict, out) = lab.run(PROG_UDP_ENCAP, &frame);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "encap redirects to the underlay; reasons {:?}",
        lab.reasons()
    );
    assert_eq!(out.len(), frame.len() + 28);

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
    udp.extend_from_slice(&((8 + inner_len) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // UDP checksum 0 (IPv4)
    // The raw inner packet, TTL decremented once, checksum recomputed from scratch.
    udp.extend(Ip { ttl: 63, ..sent }.bytes(&icmp(56)));
    let outer = Ip {
        id,
        frag: 0, // DF clear
        tos: 0,
        ..Ip::new(NODE_A_IP, NODE_B_IP, 17)
    };
    expected.extend(outer.bytes(&udp));
    assert_eq!(out, expected, "encapsulated frame");
    assert_eq!(checksum(&out[14..34]), 0, "outer IPv4 header checksum");
    assert_eq!(checksum(&out[42..62]), 0, "inner IPv4 header checksum");
    assert_eq!(out[22], 64, "outer TTL");

    let c = lab.peer_counters(SLOT_B);
    assert_eq!((c.tx_packets, c.tx_bytes), (1, inner_len as u64));
    assert_eq!(c.rx_packets, 0);

    // The same flow gets the same source port.
    let (_, out2) = lab.run(PROG_UDP_ENCAP, &frame);
    assert_eq!(u16::from_be_bytes([out2[34], out2[35]]), sport);
    // The incremental checksum update agrees with a recomputation for any checksum
    // value, including the carry cases near 0xffff (the id field moves the checksum).
    for id in (0..=0xffffu16).step_by(251).chain([0xfeff, 0xff00, 0x0000]) {
        let p = Ip { id, ..sent };
        let (v, o) = lab.run(PROG_UDP_ENCAP, &tun_frame(p, 8));
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(
            &o[42..62],
            &Ip { ttl: 63, ..p }.bytes(&icmp(8))[..20],
            "inner header for id {id:#x}"
        );
    }
}

#[test]
fn encap_hands_the_rest_to_the_tun() {
    let Some(mut lab) = Lab::new("udp_encap_hands_the_rest_to_the_tun") else {
        return;
    };
    let ok = tun_frame(Ip::new(POD_A, POD_B, 1), 56);
    lab.expect(
        "no peer",
        PROG_UDP_ENCAP,
        &tun_frame(Ip::new(POD_A, Ipv4Addr::new(10, 244, 9, 1), 1), 56),
        TC_ACT_OK,
        Some(reason::PASS_NO_PEER),
    );
    // Inner fragments are fine for raw IP in UDP (flanneld sends them as they are).
    let frag = tun_frame(
        Ip {
            frag: 0x2000,
            ..Ip::new(POD_A, POD_B, 1)
        },
        56,
    );
    assert_eq!(lab.run(PROG_UDP_ENCAP, &frag).0, TC_ACT_REDIRECT);
    // A TUN carries IPv6 as well: the version nibble, not an EtherType, tells.
    let mut v6 = ok.clone();
    v6[14] = 0x60;
    lab.expect(
        "IPv6",
        PROG_UDP_ENCAP,
        &v6,
        TC_ACT_OK,
        Some(reason::PASS_NOT_IPV4),
    );
    lab.expect(
        "TTL 1 (flanneld would discard it)",
        PROG_UDP_ENCAP,
        &tun_frame(
            Ip {
                ttl: 1,
                ..Ip::new(POD_A, POD_B, 1)
            },
            56,
        ),
        TC_ACT_OK,
        Some(reason::PASS_TTL_EXPIRED),
    );
    let mut ihl4 = ok.clone();
    ihl4[14] = 0x44;
    lab.expect(
        "IHL 4",
        PROG_UDP_ENCAP,
        &ihl4,
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );
    let mut bad_len = ok.clone();
    bad_len[16..18].copy_from_slice(&60u16.to_be_bytes());
    lab.expect(
        "IPv4 length is not the packet's",
        PROG_UDP_ENCAP,
        &bad_len,
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );
    // 1472 bytes is the largest flannel0 packet (MTU 1472): it fits; one more does not.
    let max = tun_frame(Ip::new(POD_A, POD_B, 1), TUN_MTU - 20 - 8);
    assert_eq!(max.len() - 14, TUN_MTU);
    assert_eq!(lab.run(PROG_UDP_ENCAP, &max).0, TC_ACT_REDIRECT);
    let big = tun_frame(Ip::new(POD_A, POD_B, 1), TUN_MTU + 1 - 20 - 8);
    lab.expect(
        "oversize",
        PROG_UDP_ENCAP,
        &big,
        TC_ACT_OK,
        Some(reason::PASS_OVERSIZE),
    );
    for len in 14..34 {
        lab.expect_truncated(PROG_UDP_ENCAP, &ok[..len]);
    }
    // No route for the peer's PublicIP.
    lab.set_udp_peer(
        Ipv4Addr::new(10, 244, 7, 0),
        24,
        Ipv4Addr::new(203, 0, 113, 9),
        7,
    );
    lab.expect(
        "no route to the peer",
        PROG_UDP_ENCAP,
        &tun_frame(Ip::new(POD_A, Ipv4Addr::new(10, 244, 7, 1), 1), 56),
        TC_ACT_OK,
        Some(reason::PASS_NO_ROUTE),
    );
    // On-link peer without a neighbour entry: bpf_redirect_neigh resolves it.
    lab.set_udp_peer(
        Ipv4Addr::new(10, 244, 8, 0),
        24,
        Ipv4Addr::new(192, 168, 60, 8),
        8,
    );
    let (verdict, _) = lab.run(
        PROG_UDP_ENCAP,
        &tun_frame(Ip::new(POD_A, Ipv4Addr::new(10, 244, 8, 1), 1), 56),
    );
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "unresolved neighbour: redirect_neigh"
    );
    lab.ns
        .exec_ok(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=0"]);
    assert_eq!(
        lab.run(PROG_UDP_ENCAP, &ok).0,
        TC_ACT_REDIRECT,
        "forwarding off: redirect_neigh"
    );
    lab.config(UdpConfig::default());
    lab.expect(
        "no config",
        PROG_UDP_ENCAP,
        &ok,
        TC_ACT_OK,
        Some(reason::PASS_NO_CONFIG),
    );
}

#[test]
fn encap_decap_round_trip() {
    let Some(mut lab) = Lab::new("udp_encap_decap_round_trip") else {
        return;
    };
    let sent = Ip::new(POD_A, POD_B, 6);
    let payload: Vec<u8> = (0..200u8).collect();
    let mut frame = eth([0; 6], [0; 6], 0x0800);
    frame.extend(sent.bytes(&payload));
    let (verdict, wire) = lab.run(PROG_UDP_ENCAP, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    lab.be_node(NODE_B_IP, 2, FLAG_PEERS_SYNCED);
    let (verdict, out) = lab.run(PROG_UDP_DECAP, &wire);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "decap redirects to flannel0; reasons {:?}",
        lab.reasons()
    );
    // The outer Ethernet header stays in front (the kernel drops it on the way into the
    // L3 device); then the packet, TTL decremented twice, checksum valid.
    let mut expected = wire[..14].to_vec();
    expected.extend(Ip { ttl: 62, ..sent }.bytes(&payload));
    assert_eq!(out, expected, "decap(encap(packet))");
    assert_eq!(checksum(&out[14..34]), 0, "inner IPv4 header checksum");
    let c = lab.peer_counters(SLOT_A);
    assert_eq!((c.rx_packets, c.rx_bytes), (1, (frame.len() - 14) as u64));
}

#[test]
fn decap_verdicts() {
    let Some(mut lab) = Lab::new("udp_decap_verdicts") else {
        return;
    };
    let (good, inner) = from_b(POD_B, POD_A);
    let (verdict, out) = lab.run(PROG_UDP_DECAP, &good);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut expected = good[..14].to_vec();
    expected.extend(
        Ip {
            ttl: 62,
            ..Ip::new(POD_B, POD_A, 1)
        }
        .bytes(&icmp(40)),
    );
    assert_eq!(out, expected);
    let c = lab.peer_counters(SLOT_B);
    assert_eq!((c.rx_packets, c.rx_bytes), (1, inner.len() as u64));

    // Truncated at every byte: never forwarded, never a crash. Before the UDP port is
    // readable the frame is not recognisably ours (not counted); after it, a bad header.
    for len in 14..good.len() {
        lab.expect_truncated(PROG_UDP_DECAP, &good[..len]);
    }
    lab.expect(
        "truncated inside the inner IPv4 header",
        PROG_UDP_DECAP,
        &good[..50],
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );

    let udp_to_us = Ip {
        frag: 0,
        ..Ip::new(NODE_B_IP, NODE_A_IP, 17)
    };
    let inner_ok = Ip {
        ttl: 63,
        ..Ip::new(POD_B, POD_A, 1)
    };
    let with =
        |outer: Ip, dport: u16, inner: Ip| udp_frame(outer, 40000, dport, &inner.bytes(&icmp(40)));

    lab.expect(
        "IHL 6",
        PROG_UDP_DECAP,
        &with(
            Ip {
                ihl: 6,
                ..udp_to_us
            },
            PORT,
            inner_ok,
        ),
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );
    for (what, frag) in [
        ("outer fragment (MF)", 0x2000),
        ("outer fragment (offset)", 0x0010),
    ] {
        lab.expect(
            what,
            PROG_UDP_DECAP,
            &with(Ip { frag, ..udp_to_us }, PORT, inner_ok),
            TC_ACT_OK,
            Some(reason::PASS_FRAGMENT),
        );
    }
    lab.expect(
        "wrong port (not ours, not counted)",
        PROG_UDP_DECAP,
        &with(udp_to_us, 8472, inner_ok),
        TC_ACT_OK,
        None,
    );
    lab.expect(
        "another destination (not ours)",
        PROG_UDP_DECAP,
        &with(
            Ip {
                dst: Ipv4Addr::new(192, 168, 60, 77),
                ..udp_to_us
            },
            PORT,
            inner_ok,
        ),
        TC_ACT_OK,
        None,
    );
    lab.expect(
        "TCP to our address (not ours)",
        PROG_UDP_DECAP,
        &with(
            Ip {
                proto: 6,
                ..udp_to_us
            },
            PORT,
            inner_ok,
        ),
        TC_ACT_OK,
        None,
    );
    let mut v6 = good.clone();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    lab.expect("outer IPv6", PROG_UDP_DECAP, &v6, TC_ACT_OK, None);
    let mut bad_len = good.clone();
    bad_len[38..40].copy_from_slice(&100u16.to_be_bytes());
    lab.expect(
        "UDP length mismatch",
        PROG_UDP_DECAP,
        &bad_len,
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );
    let mut inner_len = good.clone();
    inner_len[44..46].copy_from_slice(&40u16.to_be_bytes());
    lab.expect(
        "inner length is not the datagram's",
        PROG_UDP_DECAP,
        &inner_len,
        TC_ACT_OK,
        Some(reason::PASS_BAD_HEADER),
    );

    // Anti-spoofing.
    lab.expect(
        "spoofed outer source",
        PROG_UDP_DECAP,
        &with(
            Ip {
                src: Ipv4Addr::new(192, 168, 60, 99),
                ..udp_to_us
            },
            PORT,
            inner_ok,
        ),
        TC_ACT_SHOT,
        Some(reason::DROP_UNKNOWN_SOURCE),
    );
    let (spoofed_inner, _) = from_b(Ipv4Addr::new(10, 244, 3, 4), POD_A);
    // Valid peer, but not for us to deliver.
    let (not_local, _) = from_b(POD_B, Ipv4Addr::new(10, 244, 5, 5));
    expect_decap_inner_checks(&mut lab, PROG_UDP_DECAP, &good, &spoofed_inner, &not_local);
    let mut inner_v6 = good.clone();
    inner_v6[42] = 0x60;
    lab.expect(
        "inner IPv6",
        PROG_UDP_DECAP,
        &inner_v6,
        TC_ACT_OK,
        Some(reason::PASS_NOT_IPV4),
    );
    lab.expect(
        "inner TTL 1 (flanneld would discard it)",
        PROG_UDP_DECAP,
        &with(udp_to_us, PORT, Ip { ttl: 1, ..inner_ok }),
        TC_ACT_OK,
        Some(reason::PASS_TTL_EXPIRED),
    );

    // Before the first full peer sync, unknown sources go to the userspace proxy
    // (flanneld's behaviour) instead of being dropped.
    lab.be_node(NODE_A_IP, 1, 0);
    lab.expect(
        "unknown source before the first sync",
        PROG_UDP_DECAP,
        &with(
            Ip {
                src: Ipv4Addr::new(192, 168, 60, 99),
                ..udp_to_us
            },
            PORT,
            inner_ok,
        ),
        TC_ACT_OK,
        Some(reason::PASS_NOT_SYNCED),
    );
    lab.config(UdpConfig::default());
    lab.expect(
        "no config (not ours)",
        PROG_UDP_DECAP,
        &good,
        TC_ACT_OK,
        None,
    );
}

// ---------------------------------------------------------------------------------------
// Real packets: hosts in namespaces over a bridged veth underlay, `flannel0` as flanneld
// configures it, a container behind each host.
// ---------------------------------------------------------------------------------------

/// `TUNSETIFF` from `linux/if_tun.h`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates (or attaches to) TUN `name` in the calling thread's namespace, as flanneld
/// opens `flannel0`: `IFF_TUN | IFF_NO_PI`. The device lives while the file is open.
fn open_tun(name: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // struct ifreq: the name (IFNAMSIZ bytes), then a union whose first member is the
    // short ifr_flags; 40 bytes in all on 64-bit.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `ifr` is large enough for;
    // the fd is ours and open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    file
}

/// `TUNSETPERSIST` from `linux/if_tun.h`: `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// Makes the TUN behind `file` outlive its file descriptors (or not).
fn set_persist(file: &File, persist: bool) {
    // SAFETY: TUNSETPERSIST takes an integer argument by value; the fd is ours and open.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    };
    assert_eq!(rc, 0, "TUNSETPERSIST: {}", std::io::Error::last_os_error());
}

/// One flannel udp host: a namespace on the underlay with `flannel0` configured as
/// flanneld's udp backend does, and a container namespace behind it.
struct Host {
    ns: NetNs,
    container: NetNs,
    public_ip: Ipv4Addr,
    subnet: Ipv4Net,
    /// Keeps `flannel0` attached (and up), like flanneld's open TUN.
    tun: Option<File>,
}

impl Host {
    fn new(ul: &mut flannel_tests::Underlay, name: &str, third: u8) -> Host {
        let ns = NetNs::new(name);
        let public_ip = ul.attach(&ns, "eth0");
        let container = NetNs::new(&format!("{name}c"));
        let subnet: Ipv4Net = format!("10.244.{third}.0/24").parse().unwrap();
        let tun = in_netns(&ns, || open_tun("flannel0")).join().unwrap();
        // flannel's udp backend: .0/32, MTU = underlay - 28, the Network via flannel0.
        ns.ip(&[
            "addr",
            "add",
            &format!("10.244.{third}.0/32"),
            "dev",
            "flannel0",
        ]);
        ns.ip(&["link", "set", "flannel0", "mtu", &TUN_MTU.to_string(), "up"]);
        ns.ip(&["route", "add", "10.244.0.0/16", "dev", "flannel0"]);
        ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // A NIC puts GSO packets on the wire as segments; a veth hands them to the peer
        // whole, and a UDP-tunnel aggregate is nothing the receiver's decap (or flanneld's
        // socket) can take apart. Without UDP-tunnel segmentation offload the underlay
        // veth segments in software, as the wire would.
        ns.exec_ok(&[
            "ethtool",
            "-K",
            "eth0",
            "tx-udp_tnl-segmentation",
            "off",
            "tx-udp_tnl-csum-segmentation",
            "off",
        ]);
        add_container(&ns, &container, third, TUN_MTU);
        Host {
            ns,
            container,
            public_ip,
            subnet,
            tun: Some(tun),
        }
    }

    fn container_ip(&self) -> Ipv4Addr {
        let o = self.subnet.addr().octets();
        Ipv4Addr::new(o[0], o[1], o[2], 2)
    }

    fn peer_entry(&self) -> UdpPeerEntry {
        UdpPeerEntry {
            subnet: self.subnet,
            public_ip: self.public_ip,
        }
    }

    /// Makes the underlay compute checksums before frames leave, as a NIC does. A veth
    /// passes a packet's pending (CHECKSUM_PARTIAL) inner checksum to the peer as such:
    /// fine for a kernel or eBPF receiver, which keeps the skb's checksum state, but a
    /// userspace receiver reads the bytes, with the TCP checksum not yet filled in.
    fn checksum_on_the_wire(&self) {
        self.ns.exec_ok(&["ethtool", "-K", "eth0", "tx", "off"]);
    }

    /// Attaches the udp fast path from a thread inside this host's namespace.
    fn attach(&self, pin_dir: std::path::PathBuf) -> UdpFastPath {
        let (public_ip, subnet) = (self.public_ip, self.subnet);
        in_netns(&self.ns, move || {
            UdpFastPath::attach(UdpFastPathConfig {
                tun_ifindex: ifindex("flannel0"),
                underlay_ifindex: ifindex("eth0"),
                underlay_mtu: 1500,
                public_ip,
                port: PORT,
                subnet,
                pin_dir,
            })
        })
        .join()
        .unwrap()
        .expect("attach the udp fast path")
    }
}

/// Kernel program names are cut to 15 bytes (`BPF_OBJ_NAME_LEN` with the NUL).
fn kernel_name(prog: &str) -> &str {
    &prog[..prog.len().min(15)]
}

fn names_of_tcx(ns: &NetNs, ifname: &'static str, attach_type: TcAttachType) -> Vec<String> {
    in_netns(ns, move || {
        SchedClassifier::query_tcx(ifname, attach_type)
            .map(|(_, progs)| {
                progs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    })
    .join()
    .unwrap()
}

#[test]
fn udp_fast_path_on_both_hosts() {
    const TEST: &str = "udp_fast_path_on_both_hosts";
    if !require_root_and_bpf(TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.94.0");
    let mut a = Host::new(&mut ul, "ua", 1);
    let mut b = Host::new(&mut ul, "ub", 2);

    let mut fa = a.attach(bpffs.host_pin_dir("a"));
    let mut fb = b.attach(bpffs.host_pin_dir("b"));
    fa.sync_peers(&[b.peer_entry()]).expect("sync A");
    fb.sync_peers(&[a.peer_entry()]).expect("sync B");
    assert_eq!(
        names_of_tcx(&a.ns, "flannel0", TcAttachType::Egress),
        vec![kernel_name(PROG_UDP_ENCAP)]
    );
    assert_eq!(
        names_of_tcx(&a.ns, "eth0", TcAttachType::Ingress),
        vec![kernel_name(PROG_UDP_DECAP)]
    );

    // No userspace proxy runs: whatever crosses, the fast path carried. The first packet
    // leaves before the underlay neighbour is resolved, and must arrive all the same.
    ping(&a.container, b.container_ip(), 1);
    ping(&a.container, b.container_ip(), 5);
    ping(&b.container, a.container_ip(), 5);
    let c = counters_for(&fa, b.subnet);
    assert_eq!(
        (c.tx_packets, c.rx_packets),
        (11, 11),
        "every ping packet took A's eBPF path: {c:?}; reasons {:?}; B {:?} {:?}",
        nonzero_reasons(&fa),
        counters_for(&fb, a.subnet),
        nonzero_reasons(&fb)
    );
    assert_eq!(c.tx_bytes, 11 * 84, "inner IPv4 bytes of 11 default pings");
    let cb = counters_for(&fb, a.subnet);
    assert_eq!((cb.tx_packets, cb.rx_packets), (11, 11), "{cb:?}");
    // The host itself, from flannel0's .0 address.
    ping(&a.ns, b.container_ip(), 1);

    let n = 16 << 20;
    tcp_both_ways(
        &a.container,
        a.container_ip(),
        &b.container,
        b.container_ip(),
        n,
    );
    let c2 = counters_for(&fa, b.subnet);
    assert!(
        c2.tx_bytes > c.tx_bytes + n as u64 && c2.rx_bytes > c.rx_bytes + n as u64,
        "TCP both ways went through the fast path: {c2:?}; reasons A {:?} B {:?}",
        nonzero_reasons(&fa),
        nonzero_reasons(&fb)
    );
    for fp in [&fa, &fb] {
        assert_eq!(reason_count(fp, "drop_unknown_source"), 0);
        assert_eq!(reason_count(fp, "drop_inner_source"), 0);
        assert_eq!(reason_count(fp, "drop_rewrite_failed"), 0);
    }

    // "SIGKILL" of A's agent: forwarding goes on; a new agent adopts without a flush.
    drop(fa);
    ping(&a.container, b.container_ip(), 2);
    let fa = a.attach(bpffs.host_pin_dir("a"));
    assert_eq!(fa.peers(), vec![b.peer_entry()], "peer map adopted");
    let c3 = counters_for(&fa, b.subnet);
    assert_eq!(
        c3.tx_packets,
        c2.tx_packets + 2,
        "old programs kept forwarding"
    );
    ping(&b.container, a.container_ip(), 2);
    assert_eq!(counters_for(&fa, b.subnet).rx_packets, c3.rx_packets + 2);

    // A persistent flannel0 outlives the agent that opened it: with no reader on either
    // TUN, traffic still flows, all of it through the fast path.
    let (ta, tb) = (a.tun.take().unwrap(), b.tun.take().unwrap());
    set_persist(&ta, true);
    set_persist(&tb, true);
    drop((ta, tb));
    let c4 = counters_for(&fa, b.subnet);
    ping(&a.container, b.container_ip(), 2);
    assert_eq!(counters_for(&fa, b.subnet).tx_packets, c4.tx_packets + 2);
    assert_eq!(
        tcp_transfer(&b.container, b.container_ip(), &a.container, 1 << 20),
        1 << 20
    );

    fa.detach_and_unpin().expect("detach A");
    fb.detach_and_unpin().expect("detach B");
    assert!(
        !bpffs.host_pin_dir("a").exists() && !bpffs.host_pin_dir("b").exists(),
        "pins removed"
    );
    assert!(names_of_tcx(&a.ns, "flannel0", TcAttachType::Egress).is_empty());
    assert!(names_of_tcx(&b.ns, "eth0", TcAttachType::Ingress).is_empty());
    // The namespaces' deletion would remove them too; say it.
    for h in [&a, &b] {
        h.ns.exec_ok(&["ip", "tuntap", "del", "dev", "flannel0", "mode", "tun"]);
    }
}

/// flanneld's per-packet TTL handling, written independently of the programs: TTL − 1
/// and the header checksum recomputed; `None` when the packet is not IPv4 or the TTL
/// would reach zero (flanneld discards those).
fn flanneld_decrement_ttl(packet: &mut [u8]) -> Option<()> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[8] <= 1 {
        return None;
    }
    let hl = usize::from(packet[0] & 0x0f) * 4;
    packet[8] -= 1;
    packet[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&packet[..hl]);
    packet[10..12].copy_from_slice(&c.to_be_bytes());
    Some(())
}

/// A minimal userspace flannel-udp peer, shaped like flanneld's udp proxy: one TUN, one
/// UDP socket bound to PublicIP:8285, a poll loop; raw IPv4 in UDP, TTL decremented each
/// way. Its one peer gets everything. Stops (and returns what it moved) on drop.
struct UserspacePeer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Datagrams sent and received.
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

impl UserspacePeer {
    fn start(host: &mut Host, peer_ip: Ipv4Addr) -> UserspacePeer {
        let tun = host.tun.take().expect("the host's TUN");
        let local = host.public_ip;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop2, sent2, received2) = (stop.clone(), sent.clone(), received.clone());
        let thread = in_netns(&host.ns, move || {
            let sock = UdpSocket::bind((local, PORT)).expect("bind the flannel-udp port");
            ready_tx.send(()).unwrap();
            let mut tun = tun;
            let peer = SocketAddr::from((peer_ip, PORT));
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let mut fds = [
                    libc::pollfd {
                        fd: tun.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: sock.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: `fds` is a live array of two pollfd structs, its length passed.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                if n <= 0 {
                    continue;
                }
                if fds[0].revents & libc::POLLIN != 0
                    && let Ok(n) = tun.read(&mut buf)
                    && flanneld_decrement_ttl(&mut buf[..n]).is_some()
                    && sock.send_to(&buf[..n], peer).is_ok()
                {
                    sent2.fetch_add(1, Ordering::Relaxed);
                }
                if fds[1].revents & libc::POLLIN != 0
                    && let Ok((n, _)) = sock.recv_from(&mut buf)
                    && flanneld_decrement_ttl(&mut buf[..n]).is_some()
                    && tun.write_all(&buf[..n]).is_ok()
                {
                    received2.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("userspace peer ready");
        UserspacePeer {
            stop,
            thread: Some(thread),
            sent,
            received,
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

impl Drop for UserspacePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A crafted flannel-udp payload: UDP 4444 → 9999 "hello" from `src` to `dst`.
fn crafted_udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&4444u16.to_be_bytes());
    udp.extend_from_slice(&9999u16.to_be_bytes());
    udp.extend_from_slice(&(8u16 + 5).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(b"hello");
    Ip::new(src, dst, 17).bytes(&udp)
}

#[test]
fn udp_fast_path_against_a_userspace_flannel_peer() {
    const TEST: &str = "udp_fast_path_against_a_userspace_flannel_peer";
    if !require_root_and_bpf(TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.93.0");
    let a = Host::new(&mut ul, "ma", 1);
    let mut b = Host::new(&mut ul, "mb", 2);
    let evil = NetNs::new("uevil");
    let evil_ip = ul.attach(&evil, "eth0");

    a.checksum_on_the_wire();
    let mut fa = a.attach(bpffs.host_pin_dir("a"));
    fa.sync_peers(&[b.peer_entry()]).expect("sync A");
    let userspace = UserspacePeer::start(&mut b, a.public_ip);

    ping(&a.container, b.container_ip(), 3);
    ping(&b.container, a.container_ip(), 3);
    let c = counters_for(&fa, b.subnet);
    assert_eq!(
        (c.tx_packets, c.rx_packets),
        (6, 6),
        "A's eBPF path carried every ping packet: {c:?}; reasons {:?}; userspace {:?}",
        nonzero_reasons(&fa),
        userspace.counts()
    );
    assert_eq!(
        userspace.counts(),
        (6, 6),
        "the userspace peer moved them on B"
    );

    let n = 4 << 20;
    tcp_both_ways(
        &a.container,
        a.container_ip(),
        &b.container,
        b.container_ip(),
        n,
    );
    let c2 = counters_for(&fa, b.subnet);
    assert!(
        c2.tx_bytes > c.tx_bytes + n as u64 && c2.rx_bytes > c.rx_bytes + n as u64,
        "TCP both ways through A's fast path: {c2:?}; reasons {:?}",
        nonzero_reasons(&fa)
    );

    // Spoofing against A's decap, with real datagrams: only the legitimate one reaches
    // the container.
    let cip = a.container_ip();
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = in_netns(&a.container, move || {
        let sock = UdpSocket::bind((cip, 9999)).expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
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
            let s = UdpSocket::bind((src, 0)).expect("bind sender");
            s.send_to(&payload, (dst, PORT)).expect("send");
        })
        .join()
        .unwrap();
    };
    let before_unknown = reason_count(&fa, "drop_unknown_source");
    let before_inner = reason_count(&fa, "drop_inner_source");
    // 1. A non-peer claims to be B's container.
    send_from(
        &evil,
        evil_ip,
        crafted_udp(Ipv4Addr::new(10, 244, 2, 2), cip),
    );
    // 2. Peer B's address, an inner source outside B's subnet.
    send_from(
        &b.ns,
        b.public_ip,
        crafted_udp(Ipv4Addr::new(10, 244, 7, 7), cip),
    );
    // 3. The same crafting, legitimate.
    send_from(
        &b.ns,
        b.public_ip,
        crafted_udp(Ipv4Addr::new(10, 244, 2, 2), cip),
    );
    let got = listener.join().unwrap();
    assert_eq!(
        got,
        vec![(
            SocketAddr::from((Ipv4Addr::new(10, 244, 2, 2), 4444)),
            b"hello".to_vec()
        )],
        "only the legitimate datagram reaches the container"
    );
    assert_eq!(reason_count(&fa, "drop_unknown_source"), before_unknown + 1);
    assert_eq!(reason_count(&fa, "drop_inner_source"), before_inner + 1);

    drop(userspace);
    fa.detach_and_unpin().expect("detach A");
}

// ---------------------------------------------------------------------------------------
// Measurement (not a pass/fail test): `cargo test -p flannel-tests --test ebpf_udp --
// --ignored --nocapture measure`.
// ---------------------------------------------------------------------------------------

/// iperf3 from `client` to a server in `server` for `secs`; received Gbit/s.
fn iperf3(server: &NetNs, server_ip: Ipv4Addr, client: &NetNs, secs: u32) -> f64 {
    let mut srv = flannel_tests::Child::spawn("iperf3-server", {
        let mut c = server.command("iperf3");
        c.args(["-s", "-1", "-B", &server_ip.to_string()]);
        c
    });
    std::thread::sleep(Duration::from_millis(300));
    let out = client.exec_ok(&[
        "iperf3",
        "-J",
        "-c",
        &server_ip.to_string(),
        "-t",
        &secs.to_string(),
    ]);
    srv.kill();
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

/// A host with a kernel `flannel.1` as flanneld's vxlan backend configures it.
fn vxlan_host(ul: &mut flannel_tests::Underlay, name: &str, third: u8, mac: &str) -> Host {
    let ns = NetNs::new(name);
    let public_ip = ul.attach(&ns, "eth0");
    let container = NetNs::new(&format!("{name}c"));
    kernel_vxlan_host(&ns, public_ip, &container, third, mac);
    Host {
        ns,
        container,
        public_ip,
        subnet: format!("10.244.{third}.0/24").parse().unwrap(),
        tun: None,
    }
}

fn vxlan_peer(h: &Host, peer: &Host, peer_mac: &str) {
    add_vxlan_peer(&h.ns, peer.subnet, peer.public_ip, peer_mac);
}

fn attach_vxlan(
    h: &Host,
    mac: &'static str,
    pin_dir: std::path::PathBuf,
) -> flannel_agent::dataplane::VxlanFastPath {
    let (public_ip, subnet) = (h.public_ip, h.subnet);
    in_netns(&h.ns, move || {
        flannel_agent::dataplane::VxlanFastPath::attach(vxlan_fast_path_config(
            public_ip, subnet, mac, pin_dir,
        ))
    })
    .join()
    .unwrap()
    .expect("attach the vxlan fast path")
}

#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn measure_udp_vs_vxlan_throughput() {
    const TEST: &str = "measure_udp_vs_vxlan_throughput";
    if !require_root(TEST)
        || flannel_agent::dataplane::ebpf_object().is_err()
        || !flannel_tests::require_binary("iperf3", TEST)
    {
        return;
    }
    const SECS: u32 = 5;
    let report = |what: &str, gbits: f64| {
        let _ = writeln!(std::io::stderr(), "{what}: {gbits:.2} Gbit/s");
    };
    let bpffs = PrivateBpffs::mount();

    // eBPF udp on both hosts.
    {
        let mut ul = flannel_tests::Underlay::new("10.92.0");
        let a = Host::new(&mut ul, "pa", 1);
        let b = Host::new(&mut ul, "pb", 2);
        let mut fa = a.attach(bpffs.host_pin_dir("ua"));
        let mut fb = b.attach(bpffs.host_pin_dir("ub"));
        fa.sync_peers(&[b.peer_entry()]).unwrap();
        fb.sync_peers(&[a.peer_entry()]).unwrap();
        report(
            "eBPF udp, A -> B",
            iperf3(&b.container, b.container_ip(), &a.container, SECS),
        );
        report(
            "eBPF udp, B -> A",
            iperf3(&a.container, a.container_ip(), &b.container, SECS),
        );
        let _ = writeln!(
            std::io::stderr(),
            "  A reasons {:?}, B reasons {:?}",
            nonzero_reasons(&fa),
            nonzero_reasons(&fb)
        );
        fa.detach_and_unpin().unwrap();
        fb.detach_and_unpin().unwrap();
    }

    // eBPF vxlan on both hosts, with the underlay's offloads as they are and with
    // UDP-tunnel segmentation off (as the udp rows need it).
    for segmentation in ["on", "off"] {
        const MAC_A: &str = "02:fa:00:00:00:0a";
        const MAC_B: &str = "02:fb:00:00:00:0b";
        let mut ul = flannel_tests::Underlay::new("10.91.0");
        let a = vxlan_host(&mut ul, "va", 1, MAC_A);
        let b = vxlan_host(&mut ul, "vb", 2, MAC_B);
        for h in [&a, &b] {
            h.ns.exec_ok(&[
                "ethtool",
                "-K",
                "eth0",
                "tx-udp_tnl-segmentation",
                segmentation,
                "tx-udp_tnl-csum-segmentation",
                segmentation,
            ]);
        }
        vxlan_peer(&a, &b, MAC_B);
        vxlan_peer(&b, &a, MAC_A);
        let mut fa = attach_vxlan(&a, MAC_A, bpffs.host_pin_dir("va"));
        let mut fb = attach_vxlan(&b, MAC_B, bpffs.host_pin_dir("vb"));
        let entry = |h: &Host, mac: &str| {
            use std::str::FromStr as _;
            flannel_agent::dataplane::PeerEntry {
                subnet: h.subnet,
                public_ip: h.public_ip,
                vtep_mac: flannel_agent::mac::MacAddr::from_str(mac).unwrap(),
            }
        };
        fa.sync_peers(&[entry(&b, MAC_B)]).unwrap();
        fb.sync_peers(&[entry(&a, MAC_A)]).unwrap();
        report(
            &format!("eBPF vxlan (tunnel segmentation {segmentation}), A -> B"),
            iperf3(&b.container, b.container_ip(), &a.container, SECS),
        );
        report(
            &format!("eBPF vxlan (tunnel segmentation {segmentation}), B -> A"),
            iperf3(&a.container, a.container_ip(), &b.container, SECS),
        );
        fa.detach_and_unpin().unwrap();
        fb.detach_and_unpin().unwrap();
    }
}

/// Names of the TCX programs on `ifname` in the calling thread's namespace.
fn tcx_here(ifname: &str, attach_type: TcAttachType) -> Vec<String> {
    SchedClassifier::query_tcx(ifname, attach_type)
        .map(|(_, progs)| {
            progs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn udp_pins_layouts_and_a_recreated_tun() {
    const TEST: &str = "udp_pins_layouts_and_a_recreated_tun";
    if !require_root_and_bpf(TEST) {
        return;
    }
    UdpFastPath::probe().expect("this kernel runs the udp fast path");
    if !flannel_tests::require_binary("bpftool", TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.90.0");
    let mut a = Host::new(&mut ul, "la", 1);
    let b = Host::new(&mut ul, "lb", 2);
    // One pin directory for both fast paths (vxlan's on B, udp's on A): they must not
    // touch each other's pins.
    let pin_dir = bpffs.host_pin_dir("shared");
    let udp_layout = pin_dir
        .join("udp")
        .join(format!("v{}", flannel_common::LAYOUT_VERSION));
    std::fs::create_dir_all(&udp_layout).unwrap();
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
    bpftool_create(&udp_layout.join(MAP_UDP_CONFIG), "8");
    let (public_ip, subnet, dir) = (a.public_ip, a.subnet, pin_dir.clone());
    let err = in_netns(&a.ns, move || {
        UdpFastPath::attach(UdpFastPathConfig {
            tun_ifindex: ifindex("flannel0"),
            underlay_ifindex: ifindex("eth0"),
            underlay_mtu: 1500,
            public_ip,
            port: PORT,
            subnet,
            pin_dir: dir,
        })
        .map(|_| ())
    })
    .join()
    .unwrap()
    .expect_err("a changed layout must not be adopted");
    assert!(
        matches!(
            err,
            flannel_agent::dataplane::EbpfError::LayoutMismatch { .. }
        ),
        "{err}"
    );
    std::fs::remove_file(udp_layout.join(MAP_UDP_CONFIG)).unwrap();

    // Maps of another layout version are migrated where their shape allows (this config
    // map's does not), their pins removed after attach.
    let old = pin_dir.join("udp").join("v1");
    std::fs::create_dir_all(&old).unwrap();
    bpftool_create(&old.join(MAP_UDP_CONFIG), "8");
    let mut fa = a.attach(pin_dir.clone());
    assert!(!old.exists(), "old udp layout unpinned");
    assert!(udp_layout.join(MAP_PEERS).exists(), "new layout pinned");
    assert_eq!(fa.pin_dir(), pin_dir.join("udp"));
    fa.sync_peers(&[b.peer_entry()]).unwrap();

    // The vxlan fast path in the same pin directory (on another host).
    const MAC_B: &str = "02:fb:00:00:00:0b";
    add_flannel_vxlan(&b.ns, b.public_ip);
    b.ns.ip(&["link", "set", "flannel.1", "address", MAC_B, "up"]);
    let fv = attach_vxlan(&b, MAC_B, pin_dir.clone());
    assert!(pin_dir.join("links").join("encap").exists());
    assert!(pin_dir.join("udp").join("links").join("encap").exists());

    // flannel0 goes with the agent (closing a non-persistent TUN deletes it) and a
    // restarted agent creates it anew: the pinned encap link is stale; a new attach
    // replaces it.
    drop(fa);
    drop(a.tun.take());
    assert!(
        flannel_tests::wait_until(Duration::from_secs(5), || {
            (!a.ns
                .exec(&["ip", "link", "show", "flannel0"])
                .status
                .success())
            .then_some(())
        })
        .is_some(),
        "flannel0 disappears with its last fd"
    );
    let tun = in_netns(&a.ns, || open_tun("flannel0")).join().unwrap();
    a.tun = Some(tun);
    a.ns.ip(&["addr", "add", "10.244.1.0/32", "dev", "flannel0"]);
    a.ns.ip(&["link", "set", "flannel0", "mtu", &TUN_MTU.to_string(), "up"]);
    a.ns.ip(&["route", "add", "10.244.0.0/16", "dev", "flannel0"]);
    let fa = a.attach(pin_dir.clone());
    assert_eq!(fa.peers(), vec![b.peer_entry()], "peers adopted");
    let (egress, ingress) = in_netns(&a.ns, || {
        (
            tcx_here("flannel0", TcAttachType::Egress),
            tcx_here("eth0", TcAttachType::Ingress),
        )
    })
    .join()
    .unwrap();
    assert_eq!(egress, vec![kernel_name(PROG_UDP_ENCAP)]);
    assert_eq!(ingress, vec![kernel_name(PROG_UDP_DECAP)]);

    // Detaching the udp path leaves the vxlan path's pins alone, and the other way round.
    fa.detach_and_unpin().expect("detach udp");
    assert!(!pin_dir.join("udp").exists(), "udp pins removed");
    assert!(
        pin_dir.join("links").join("encap").exists(),
        "vxlan pins kept"
    );
    assert!(
        names_of_tcx(&a.ns, "flannel0", TcAttachType::Egress).is_empty()
            && names_of_tcx(&a.ns, "eth0", TcAttachType::Ingress).is_empty()
    );
    fv.detach_and_unpin().expect("detach vxlan");
    assert!(!pin_dir.exists(), "nothing left");
}

#[test]
fn udp_migrates_an_old_layout() {
    const TEST: &str = "udp_migrates_an_old_layout";
    if !require_root_and_bpf(TEST) {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let mut ul = flannel_tests::Underlay::new("10.87.0");
    let a = Host::new(&mut ul, "ma", 1);
    let b = Host::new(&mut ul, "mb", 2);
    // No IPv6 on A: flannel0's router solicitations would move the reason counts.
    a.ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    let mut fb = b.attach(bpffs.host_pin_dir("b"));
    fb.sync_peers(&[a.peer_entry()]).expect("sync B");

    // What a synced udp fast path of the previous layout left on A: peer B in slot 5
    // with its counters, and a reasons array one reason shorter than ours.
    const SLOT_B: u32 = 5;
    let pin_dir = bpffs.host_pin_dir("a");
    let udp_dir = pin_dir.join("udp");
    let layout = udp_dir.join(format!("v{LAYOUT_VERSION}"));
    let old = LayoutDir::create(udp_dir.join(format!("v{}", LAYOUT_VERSION - 1)));
    let (b_route, b_source) = peer_map_entries(b.subnet, b.public_ip, [0; 6], SLOT_B);
    let b_counters = per_cpu(|cpu| PeerCounters {
        tx_packets: 400 + cpu,
        tx_bytes: 40_000 + cpu,
        rx_packets: 500 + cpu,
        rx_bytes: 50_000 + cpu,
    });
    let old_reasons: Vec<(u32, Vec<u64>)> = (0..reason::COUNT - 1)
        .map(|i| (i, per_cpu(|cpu| u64::from(i) * 10 + cpu + 1)))
        .collect();
    old.array(
        MAP_UDP_CONFIG,
        1,
        &[(
            0,
            UdpConfig {
                public_ip_be: be(a.public_ip),
                subnet_be: be(a.subnet.addr()),
                subnet_mask_be: mask(24),
                underlay_ifindex: 9001,
                tun_ifindex: 9002,
                underlay_mtu: 1500,
                flags: FLAG_PEERS_SYNCED,
                port_be: PORT.to_be(),
                _pad: 0,
            },
        )],
    );
    old.lpm_trie(MAP_PEERS, MAX_PEERS, &[b_route]);
    old.hash(MAP_SOURCES, MAX_PEERS, &[b_source]);
    old.per_cpu_array(
        MAP_PEER_COUNTERS,
        MAX_PEERS,
        &[(SLOT_B, b_counters.clone())],
    );
    old.per_cpu_array(MAP_REASONS, reason::COUNT - 1, &old_reasons);

    let fa = a.attach(pin_dir.clone());
    assert!(!old.path().exists(), "the old layout's pins are removed");
    assert_eq!(fa.peers(), vec![b.peer_entry()], "peer migrated");
    let trie: LpmTrie<MapData, u32, Peer> = open_pinned(&layout.join(MAP_PEERS));
    let slot = trie
        .get(&Key::new(24, be(b.subnet.addr())), 0)
        .expect("peer pinned")
        .index;
    assert_eq!(slot, SLOT_B, "same slot");
    let counters: PerCpuArray<MapData, PeerCounters> = open_pinned(&layout.join(MAP_PEER_COUNTERS));
    assert_eq!(counters.get(&SLOT_B, 0).unwrap().to_vec(), b_counters);
    let reasons = fa.drop_counters().unwrap();
    for (i, (name, count)) in reasons.iter().enumerate() {
        let expected = old_reasons
            .get(i)
            .map_or(0, |(_, per_cpu)| per_cpu.iter().sum());
        assert_eq!(*count, expected, "reason {name}");
    }
    let cfg: Array<MapData, UdpConfig> = open_pinned(&layout.join(MAP_UDP_CONFIG));
    assert_ne!(
        cfg.get(&0, 0).unwrap().flags & FLAG_PEERS_SYNCED,
        0,
        "still synced"
    );

    // Before any sync, with no userspace proxy on either side: whatever crosses, A's
    // migrated fast path carried, both ways, on B's slot.
    let before = b_counters
        .iter()
        .fold(PeerCounters::default(), |acc, c| acc.add(*c));
    ping(&a.container, b.container_ip(), 3);
    ping(&b.container, a.container_ip(), 3);
    let after = counters_for(&fa, b.subnet);
    assert_eq!(
        (after.tx_packets, after.rx_packets),
        (before.tx_packets + 6, before.rx_packets + 6),
        "{after:?}; reasons {:?}",
        nonzero_reasons(&fa)
    );

    fa.detach_and_unpin().expect("detach A");
    fb.detach_and_unpin().expect("detach B");
}
