//! The host-gw forwarder under BPF_PROG_TEST_RUN, against a real FIB: a namespace with
//! the underlay `eth0` (a peer's PublicIP a permanent neighbour on it, the peer's
//! subnet routed via it as flannel's host-gw does) and a pod device `cni0` holding our
//! subnet's gateway address (a pod a permanent neighbour on it). Each crafted frame gets
//! its documented verdict and reason, forwarded frames are checked byte for byte, and
//! frames the programs do not forward come out unchanged.

use std::net::Ipv4Addr;

use flannel_common::{
    MAP_HOSTGW_CONFIG, PROG_HOSTGW_FROM_PEER, PROG_HOSTGW_TO_PEER,
    maps::{FLAG_PEERS_SYNCED, HostGwConfig, reason},
};
use flannel_tests::{
    bpf::{NEXT_HOP_MAC, ProgLab, TC_ACT_OK, TC_ACT_REDIRECT, ifindex, mac_of, skb_ctx_on},
    packet::{Ip, be, checksum, eth, icmp, mask, udp},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
/// A peer whose PublicIP has no neighbour entry (never resolved).
const PEER_UNRESOLVED_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 4);
const OUR_GW: Ipv4Addr = Ipv4Addr::new(10, 5, 1, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 5, 1, 2);
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 5, 2, 2);
const UNRESOLVED_POD: Ipv4Addr = Ipv4Addr::new(10, 5, 3, 2);
/// In the peer map, but the kernel routes it elsewhere (an admin's route wins).
const REROUTED_POD: Ipv4Addr = Ipv4Addr::new(10, 5, 4, 2);
/// Where the kernel routes [`REROUTED_POD`]'s subnet instead (resolved).
const OTHER_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 9);
const SLOT: u32 = 5;
const SLOT_UNRESOLVED: u32 = 6;
const SLOT_REROUTED: u32 = 7;
const ETH_P_IP: u16 = 0x0800;

struct Lab {
    lab: ProgLab,
    cni0: u32,
    cni0_mac: [u8; 6],
}

impl Lab {
    fn new(test: &str) -> Option<Lab> {
        let mut lab = ProgLab::load(
            test,
            "hgwbpf",
            NODE_IP,
            PEER_IP,
            &[PROG_HOSTGW_TO_PEER, PROG_HOSTGW_FROM_PEER],
        )?;
        // The pod side: a veth (so it has carrier and ARP) with our subnet's gateway.
        let ns = &lab.ns;
        ns.ip(&[
            "link", "add", "cni0", "type", "veth", "peer", "name", "cni0p",
        ]);
        ns.ip(&["addr", "add", &format!("{OUR_GW}/24"), "dev", "cni0"]);
        ns.ip(&["link", "set", "cni0", "up"]);
        ns.ip(&["link", "set", "cni0p", "up"]);
        let neigh = |ip: Ipv4Addr, mac: [u8; 6], dev: &str| {
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            ns.ip(&[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &mac,
                "nud",
                "permanent",
                "dev",
                dev,
            ]);
        };
        neigh(POD, POD_MAC, "cni0");
        neigh(OTHER_ROUTER_IP, [0x02, 0, 0, 0, 0, 0x99], "eth0");
        // flannel's host-gw routes, and one an admin changed.
        for (subnet, via) in [
            ("10.5.2.0/24", PEER_IP),
            ("10.5.3.0/24", PEER_UNRESOLVED_IP),
            ("10.5.4.0/24", OTHER_ROUTER_IP),
        ] {
            ns.ip(&[
                "route",
                "add",
                subnet,
                "via",
                &via.to_string(),
                "dev",
                "eth0",
            ]);
        }
        let cni0 = ifindex("cni0");
        let cni0_mac = mac_of(ns, "cni0");
        lab.set_peer(Ipv4Addr::new(10, 5, 2, 0), 24, PEER_IP, [0; 6], SLOT);
        lab.set_peer(
            Ipv4Addr::new(10, 5, 3, 0),
            24,
            PEER_UNRESOLVED_IP,
            [0; 6],
            SLOT_UNRESOLVED,
        );
        // The lease says 10.5.4.0/24 is behind PEER_IP; the kernel's route disagrees.
        lab.set_peer(
            Ipv4Addr::new(10, 5, 4, 0),
            24,
            PEER_IP,
            [0; 6],
            SLOT_REROUTED,
        );
        let cfg = HostGwConfig {
            public_ip_be: be(NODE_IP),
            subnet_be: be(Ipv4Addr::new(10, 5, 1, 0)),
            subnet_mask_be: mask(24),
            underlay_ifindex: lab.underlay_ifindex,
            flags: FLAG_PEERS_SYNCED,
            _pad: 0,
        };
        lab.set_config(MAP_HOSTGW_CONFIG, cfg);
        Some(Lab {
            lab,
            cni0,
            cni0_mac,
        })
    }

    /// A frame a local pod sends to its gateway's MAC, for `dst`.
    fn pod_frame(&self, ip: Ip, payload: &[u8]) -> Vec<u8> {
        let mut f = eth(self.cni0_mac, POD_MAC, ETH_P_IP);
        f.extend(ip.bytes(payload));
        f
    }

    /// A frame the peer's host sends to our underlay MAC.
    fn peer_frame(&self, ip: Ip, payload: &[u8]) -> Vec<u8> {
        let mut f = eth(self.lab.underlay_mac, NEXT_HOP_MAC, ETH_P_IP);
        f.extend(ip.bytes(payload));
        f
    }

    fn on_cni0(&self) -> Vec<u8> {
        skb_ctx_on(self.cni0, 0, 0)
    }

    fn on_eth0(&self) -> Vec<u8> {
        skb_ctx_on(self.lab.underlay_ifindex, 0, 0)
    }
}

/// What a router makes of `frame` when forwarding it to `dst_mac` from `src_mac`: new
/// MACs, TTL − 1, the header checksum recomputed from scratch (the programs patch it).
fn forwarded(frame: &[u8], dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    out[14 + 8] -= 1;
    out[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&out[14..34]);
    out[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    out
}

#[test]
fn to_peer_forwards_to_the_peers_next_hop_byte_for_byte() {
    let Some(mut l) = Lab::new("to_peer_forwards_to_the_peers_next_hop_byte_for_byte") else {
        return;
    };
    let frame = l.pod_frame(Ip::new(POD, REMOTE_POD, 1), &icmp(56));
    let ctx = l.on_cni0();
    let (verdict, out) = l.lab.run_ctx(PROG_HOSTGW_TO_PEER, &frame, Some(&ctx));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, forwarded(&frame, NEXT_HOP_MAC, l.lab.underlay_mac));
    assert_eq!(checksum(&out[14..34]), 0, "valid header checksum");
    let c = l.lab.peer_counters(SLOT);
    assert_eq!((c.tx_packets, c.tx_bytes), (1, (frame.len() - 14) as u64));
    assert_eq!((c.rx_packets, c.rx_bytes), (0, 0));
    assert!(l.lab.reasons().iter().all(|&n| n == 0), "no reason counted");

    // UDP, another TOS and TTL: only the MACs, the TTL and the checksum change.
    let frame = l.pod_frame(
        Ip {
            tos: 0xb8,
            ttl: 2,
            frag: 0,
            ..Ip::new(POD, REMOTE_POD, 17)
        },
        &udp(4000, 53, b"query"),
    );
    let (verdict, out) = l.lab.run_ctx(PROG_HOSTGW_TO_PEER, &frame, Some(&ctx));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, forwarded(&frame, NEXT_HOP_MAC, l.lab.underlay_mac));
    assert_eq!(l.lab.peer_counters(SLOT).tx_packets, 2);
}

#[test]
fn from_peer_forwards_to_the_local_pod_byte_for_byte() {
    let Some(mut l) = Lab::new("from_peer_forwards_to_the_local_pod_byte_for_byte") else {
        return;
    };
    let frame = l.peer_frame(Ip::new(REMOTE_POD, POD, 1), &icmp(100));
    let ctx = l.on_eth0();
    let (verdict, out) = l.lab.run_ctx(PROG_HOSTGW_FROM_PEER, &frame, Some(&ctx));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, forwarded(&frame, POD_MAC, l.cni0_mac));
    let c = l.lab.peer_counters(SLOT);
    assert_eq!((c.rx_packets, c.rx_bytes), (1, (frame.len() - 14) as u64));
    assert_eq!(c.tx_packets, 0);

    // A GSO aggregate is forwarded whole (the next device segments it if it must) and
    // counted by segment.
    let big = l.peer_frame(Ip::new(REMOTE_POD, POD, 6), &[0u8; 1400]);
    let gso = skb_ctx_on(l.lab.underlay_ifindex, 1000, 2);
    let (verdict, _) = l.lab.run_ctx(PROG_HOSTGW_FROM_PEER, &big, Some(&gso));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(l.lab.peer_counters(SLOT).rx_packets, 3);
}

#[test]
fn what_the_kernel_must_handle_goes_to_it_unchanged() {
    let Some(mut l) = Lab::new("what_the_kernel_must_handle_goes_to_it_unchanged") else {
        return;
    };
    let (pod_ctx, peer_ctx) = (l.on_cni0(), l.on_eth0());
    let to_peer = |l: &Lab, ip: Ip| l.pod_frame(ip, &icmp(32));
    let cases: Vec<(&str, Vec<u8>, Option<u32>)> = vec![
        (
            "TTL 1 (ICMP time exceeded)",
            to_peer(
                &l,
                Ip {
                    ttl: 1,
                    ..Ip::new(POD, REMOTE_POD, 1)
                },
            ),
            Some(reason::PASS_TTL_EXPIRED),
        ),
        (
            "a fragment",
            to_peer(
                &l,
                Ip {
                    frag: 0x2000,
                    ..Ip::new(POD, REMOTE_POD, 1)
                },
            ),
            Some(reason::PASS_FRAGMENT),
        ),
        (
            "IP options (IHL 6)",
            to_peer(
                &l,
                Ip {
                    ihl: 6,
                    ..Ip::new(POD, REMOTE_POD, 1)
                },
            ),
            Some(reason::PASS_BAD_HEADER),
        ),
        (
            "next hop not resolved",
            to_peer(&l, Ip::new(POD, UNRESOLVED_POD, 1)),
            Some(reason::PASS_NO_NEIGH),
        ),
        (
            "the kernel routes the peer's subnet elsewhere",
            to_peer(&l, Ip::new(POD, REROUTED_POD, 1)),
            Some(reason::PASS_NO_ROUTE),
        ),
        (
            "not to a peer (the Internet)",
            to_peer(&l, Ip::new(POD, Ipv4Addr::new(192, 0, 2, 1), 1)),
            None,
        ),
        (
            "not from our subnet",
            to_peer(&l, Ip::new(Ipv4Addr::new(10, 5, 9, 9), REMOTE_POD, 1)),
            None,
        ),
        (
            "to the host itself",
            to_peer(&l, Ip::new(POD, OUR_GW, 1)),
            None,
        ),
    ];
    for (what, frame, why) in &cases {
        l.lab.expect_ctx(
            what,
            PROG_HOSTGW_TO_PEER,
            frame,
            Some(&pod_ctx),
            TC_ACT_OK,
            *why,
        );
    }

    // A frame for another host's MAC (the bridge floods it up), ARP, IPv6: not ours.
    let mut other_mac = to_peer(&l, Ip::new(POD, REMOTE_POD, 1));
    other_mac[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    let mut arp = eth([0xff; 6], POD_MAC, 0x0806);
    arp.extend([0u8; 28]);
    let mut ipv6 = eth(l.cni0_mac, POD_MAC, 0x86dd);
    ipv6.extend([0x60u8; 40]);
    for (what, frame) in [("another MAC", other_mac), ("ARP", arp), ("IPv6", ipv6)] {
        l.lab.expect_ctx(
            what,
            PROG_HOSTGW_TO_PEER,
            &frame,
            Some(&pod_ctx),
            TC_ACT_OK,
            None,
        );
    }

    // Too big for eth0 once its MTU is lowered: the kernel fragments or sends ICMP.
    l.lab.ns.ip(&["link", "set", "eth0", "mtu", "1000"]);
    let big = l.pod_frame(Ip::new(POD, REMOTE_POD, 1), &icmp(1200));
    l.lab.expect_ctx(
        "bigger than the next device's MTU",
        PROG_HOSTGW_TO_PEER,
        &big,
        Some(&pod_ctx),
        TC_ACT_OK,
        Some(reason::PASS_OVERSIZE),
    );
    l.lab.ns.ip(&["link", "set", "eth0", "mtu", "1500"]);

    // From a peer: to our subnet's broadcast address, from a source no peer has, to a
    // destination outside our subnet.
    let from_peer = |l: &Lab, ip: Ip| l.peer_frame(ip, &icmp(32));
    let cases: Vec<(&str, Vec<u8>, Option<u32>)> = vec![
        (
            "to our subnet's broadcast address",
            from_peer(&l, Ip::new(REMOTE_POD, Ipv4Addr::new(10, 5, 1, 255), 1)),
            Some(reason::PASS_NO_ROUTE),
        ),
        (
            "TTL 1",
            from_peer(
                &l,
                Ip {
                    ttl: 1,
                    ..Ip::new(REMOTE_POD, POD, 1)
                },
            ),
            Some(reason::PASS_TTL_EXPIRED),
        ),
        (
            "from no peer's subnet",
            from_peer(&l, Ip::new(Ipv4Addr::new(192, 0, 2, 7), POD, 1)),
            None,
        ),
        (
            "not to our subnet",
            from_peer(&l, Ip::new(REMOTE_POD, Ipv4Addr::new(10, 5, 7, 7), 1)),
            None,
        ),
    ];
    for (what, frame, why) in &cases {
        l.lab.expect_ctx(
            what,
            PROG_HOSTGW_FROM_PEER,
            frame,
            Some(&peer_ctx),
            TC_ACT_OK,
            *why,
        );
    }
    for slot in [SLOT, SLOT_UNRESOLVED, SLOT_REROUTED] {
        let c = l.lab.peer_counters(slot);
        assert_eq!(
            c.tx_packets + c.rx_packets,
            0,
            "slot {slot} counted traffic"
        );
    }
}

#[test]
fn truncated_and_lying_frames_are_never_forwarded() {
    let Some(mut l) = Lab::new("truncated_and_lying_frames_are_never_forwarded") else {
        return;
    };
    // Without a context test_run receives on `lo`, whose MAC is all zeros: frames to
    // it are for this host, so every cut below is eligible once whole (checked first).
    let lo_mac = [0u8; 6];
    let mut to_peer = eth(lo_mac, POD_MAC, ETH_P_IP);
    to_peer.extend(Ip::new(POD, REMOTE_POD, 1).bytes(&icmp(32)));
    let mut from_peer = eth(lo_mac, NEXT_HOP_MAC, ETH_P_IP);
    from_peer.extend(Ip::new(REMOTE_POD, POD, 1).bytes(&icmp(32)));
    for (prog, good) in [
        (PROG_HOSTGW_TO_PEER, &to_peer),
        (PROG_HOSTGW_FROM_PEER, &from_peer),
    ] {
        assert_eq!(l.lab.run(prog, good).0, TC_ACT_REDIRECT, "{prog}: whole");
        let before = l.lab.peer_counters(SLOT);
        for len in 0..good.len() {
            l.lab.expect_truncated(prog, &good[..len]);
        }
        assert_eq!(
            l.lab.peer_counters(SLOT),
            before,
            "{prog}: a cut was counted"
        );
    }
    // A total length past the end of the frame, and one shorter than the header.
    let ctx = l.on_cni0();
    for tot_len in [0xffffu16, 19] {
        let mut frame = l.pod_frame(Ip::new(POD, REMOTE_POD, 1), &icmp(32));
        frame[16..18].copy_from_slice(&tot_len.to_be_bytes());
        l.lab.expect_ctx(
            &format!("total length {tot_len}"),
            PROG_HOSTGW_TO_PEER,
            &frame,
            Some(&ctx),
            TC_ACT_OK,
            Some(reason::PASS_BAD_HEADER),
        );
    }
}

#[test]
fn nothing_is_forwarded_before_the_agent_configures_it() {
    let Some(mut l) = Lab::new("nothing_is_forwarded_before_the_agent_configures_it") else {
        return;
    };
    l.lab.set_config(MAP_HOSTGW_CONFIG, HostGwConfig::default());
    let ctx = l.on_cni0();
    let frame = l.pod_frame(Ip::new(POD, REMOTE_POD, 1), &icmp(8));
    l.lab.expect_ctx(
        "unconfigured",
        PROG_HOSTGW_TO_PEER,
        &frame,
        Some(&ctx),
        TC_ACT_OK,
        None,
    );
}
