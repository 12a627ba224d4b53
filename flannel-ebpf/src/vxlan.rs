//! VXLAN encapsulation and decapsulation, wire-compatible with a kernel `flannel.<VNI>`.
//!
//! Design note. The kernel keeps all of flannel's state (the vxlan device, neighbour,
//! FDB and onlink route per peer); these programs only take the fast lane through it:
//!
//! - **encap** runs at TC egress of `flannel.<VNI>`, where the kernel has already routed
//!   the packet to the device and built the inner Ethernet header from the neighbour
//!   entry. It looks the inner destination up in the peer LPM trie, grows the skb by 50
//!   bytes with `bpf_skb_adjust_room(BPF_ADJ_ROOM_MAC, ENCAP_L3_IPV4 | ENCAP_L4_UDP |
//!   ENCAP_L2(14) | ENCAP_L2_ETH | FIXED_GSO)` (so GSO packets stay segmentable as
//!   `SKB_GSO_UDP_TUNNEL`), writes what the kernel driver would write (outer IPv4 with
//!   TTL 64, DF clear, random id, ECN copied per RFC 6040; UDP from the kernel's
//!   `udp_flow_src_port` formula to `Port`, checksum 0; VXLAN I flag and VNI; inner MACs
//!   our VtepMAC → the peer's) and sends it out of the underlay itself, which skips the
//!   vxlan transmit path and the outer netfilter pass. The next hop comes from
//!   `bpf_fib_lookup` on the outer destination: MACs written and `bpf_redirect` when the
//!   neighbour is known, `bpf_redirect_neigh` (the kernel resolves it) when not.
//! - **decap** runs at TC ingress of the underlay. It takes only what it can strip
//!   exactly: IPv4 without options, not a fragment, UDP to our PublicIP and `Port`, VXLAN
//!   flags exactly "I", our VNI, no GSO aggregate. It removes the 50 bytes after the outer
//!   MAC header, puts the inner MACs in the remaining Ethernet header and redirects to
//!   the ingress of `flannel.<VNI>`: the stack sees the inner packet as received on that
//!   device, as with kernel VXLAN, so rp_filter, iptables, conntrack and kube-proxy behave
//!   as before.
//! - **anti-spoofing** (decap): the outer source must be a known peer's PublicIP and the
//!   inner source inside that peer's subnet, else the packet is dropped and counted. These
//!   checks run before every other decision to hand a packet to the kernel, so a packet
//!   the kernel would decapsulate (a GSO aggregate, CE-marked) is checked too.
//! - Everything else goes, unchanged, to the kernel (`TC_ACT_OK`) and is counted by reason.

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect},
    programs::TcContext,
};
use flannel_common::maps::{Config, FLAG_PEERS_SYNCED, Peer, reason};

use crate::{
    csum,
    maps::{FLANNEL_CONFIG, FLANNEL_SOURCES, configured, peer_for},
    parse::{
        DECAP_HEADERS_LEN, ENCAP_LEN, ETH_LEN, Eth, IPV4_LEN, Ipv4, UDP_LEN, Vxlan, ensure_linear,
        read, write,
    },
    tunnel::{
        ETH_P_IP, Flow, IPPROTO_UDP, NOT_OURS, OUTER_TTL, Route, count_peer, is_fragment,
        outer_udp_for_us, src_port,
    },
};

/// VXLAN flags word with only the I (valid VNI) bit.
const VXLAN_FLAGS_I: [u8; 4] = [0x08, 0, 0, 0];
/// ECN field values.
const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;
const ECN_ECT0: u8 = 0x02;

/// The node configuration, or `None` before the agent wrote it.
#[inline(always)]
fn config() -> Option<Config> {
    configured(&FLANNEL_CONFIG, |c| c.public_ip_be)
}

/// RFC 6040 / the kernel's `INET_ECN_encapsulate(0, inner)`.
#[inline(always)]
fn outer_tos(inner_tos: u8) -> u8 {
    let ecn = inner_tos & ECN_MASK;
    if ecn == ECN_CE { ECN_ECT0 } else { ecn }
}

/// The 50 bytes between the outer Ethernet header and the inner IPv4 header: outer
/// IPv4, UDP, VXLAN and the inner Ethernet header.
#[inline(always)]
fn encap_header(
    cfg: &Config,
    peer: &Peer,
    inner_tos: u8,
    inner_frame_len: u32,
    src_port: u16,
    ip_id: u16,
) -> [u8; ENCAP_LEN] {
    let mut h = [0u8; ENCAP_LEN];
    let ip_len = (inner_frame_len + (IPV4_LEN + UDP_LEN + 8) as u32) as u16;
    let udp_len = ip_len - IPV4_LEN as u16;
    let src = cfg.public_ip_be.to_ne_bytes();
    let dst = peer.public_ip_be.to_ne_bytes();
    let mut ip = [0u8; IPV4_LEN];
    ip[0] = 0x45;
    ip[1] = outer_tos(inner_tos);
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    // ip[6..8]: flags and offset 0, DF clear like the kernel's flannel.1.
    ip[8] = OUTER_TTL;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let check = csum::ipv4_header(&ip);
    ip[10] = check[0];
    ip[11] = check[1];
    h[..IPV4_LEN].copy_from_slice(&ip);
    let u = IPV4_LEN;
    h[u..u + 2].copy_from_slice(&src_port.to_be_bytes());
    h[u + 2..u + 4].copy_from_slice(&cfg.port_be.to_ne_bytes());
    h[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
    // h[u + 6..u + 8]: UDP checksum 0, which IPv4 receivers accept.
    let v = u + UDP_LEN;
    h[v..v + 4].copy_from_slice(&VXLAN_FLAGS_I);
    let vni = cfg.vni.to_be_bytes();
    h[v + 4] = vni[1];
    h[v + 5] = vni[2];
    h[v + 6] = vni[3];
    let e = v + 8;
    h[e..e + 6].copy_from_slice(&peer.vtep_mac);
    h[e + 6..e + 12].copy_from_slice(&cfg.vtep_mac);
    h[e + 12..e + 14].copy_from_slice(&ETH_P_IP);
    h
}

/// Encapsulates a frame leaving `flannel.<VNI>` for a known peer and sends it out of the
/// underlay. `Err(reason)` leaves the packet to the kernel (or drops it, for the
/// `DROP_*` reasons).
#[inline(always)]
pub fn try_encap(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config().ok_or(reason::PASS_NO_CONFIG)?;
    ensure_linear(ctx, ETH_LEN + IPV4_LEN);
    let eth: Eth = read(ctx, 0).ok_or(reason::PASS_BAD_HEADER)?;
    if eth.proto != ETH_P_IP {
        return Err(reason::PASS_NOT_IPV4);
    }
    let ip: Ipv4 = read(ctx, ETH_LEN).ok_or(reason::PASS_BAD_HEADER)?;
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Err(reason::PASS_BAD_HEADER);
    }
    if is_fragment(&ip) {
        return Err(reason::PASS_FRAGMENT);
    }
    let peer = peer_for(ip.dst).ok_or(reason::PASS_NO_PEER)?;

    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the program's context pointer, valid for the whole run; reading
    // `gso_size`/`gso_segs` is a plain context field access the verifier allows.
    let (gso_size, gso_segs) = unsafe { ((*skb).gso_size, (*skb).gso_segs) };
    let frame_len = ctx.len();
    let outer_ip_len = frame_len + (IPV4_LEN + UDP_LEN + 8) as u32;
    if outer_ip_len > 0xffff || (gso_size == 0 && outer_ip_len > cfg.underlay_mtu) {
        return Err(reason::PASS_OVERSIZE);
    }

    // SAFETY: `skb` is the context pointer; the helper only reads/sets the skb's hash.
    let hash = unsafe { bpf_get_hash_recalc(skb) };
    let sport = src_port(hash);

    // Non-GSO: let the route (and PMTU exceptions) check the outer length. GSO: each
    // segment fits, since flannel.<VNI>'s MTU is the underlay's minus 50.
    let flow = Flow {
        src_be: cfg.public_ip_be,
        dst_be: peer.public_ip_be,
        sport,
        dport_be: cfg.port_be,
        tot_len: if gso_size == 0 {
            outer_ip_len as u16
        } else {
            0
        },
    };
    let mut route = Route::lookup(ctx, cfg.underlay_ifindex, &flow)?;

    // SAFETY: the helper has no preconditions.
    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;
    let header = encap_header(&cfg, &peer, ip.tos, frame_len, sport, ip_id);

    let flags = u64::from(
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
            | BPF_F_ADJ_ROOM_FIXED_GSO,
    ) | ((ETH_LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| reason::PASS_HELPER_FAILED)?;

    // From here on the packet is no longer the kernel's: a failure can only drop it.
    write(ctx, ETH_LEN, &header).map_err(|()| reason::DROP_REWRITE_FAILED)?;
    if let Some(outer_eth) = route.outer_eth() {
        write(ctx, 0, &outer_eth).map_err(|()| reason::DROP_REWRITE_FAILED)?;
    }
    let packets = if gso_segs == 0 { 1 } else { gso_segs };
    count_peer(peer.index, true, u64::from(packets), u64::from(frame_len));
    Ok(route.redirect(cfg.underlay_ifindex) as i32)
}

/// Decapsulates VXLAN for us from a known peer and delivers the inner frame to the
/// ingress of `flannel.<VNI>`. `Err(NOT_OURS)` for traffic that is not VXLAN for us.
#[inline(always)]
pub fn try_decap(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config().ok_or(NOT_OURS)?;
    let (ip, udp) = outer_udp_for_us(ctx, cfg.public_ip_be, cfg.port_be, DECAP_HEADERS_LEN)?;
    let udp_at = ETH_LEN + IPV4_LEN;
    let vxlan: Vxlan = read(ctx, udp_at + UDP_LEN).ok_or(reason::PASS_BAD_HEADER)?;
    if vxlan.flags != VXLAN_FLAGS_I || vxlan.vni[3] != 0 {
        return Err(reason::PASS_BAD_HEADER);
    }
    let vni = u32::from_be_bytes([0, vxlan.vni[0], vxlan.vni[1], vxlan.vni[2]]);
    if vni != cfg.vni {
        return Err(reason::PASS_OTHER_VNI);
    }
    let outer_len = ctx.len() - ETH_LEN as u32;
    let ip_len = u32::from(u16::from_be_bytes(ip.tot_len));
    let udp_len = u32::from(u16::from_be_bytes(udp.len));
    if ip_len != outer_len || udp_len + IPV4_LEN as u32 != ip_len {
        return Err(reason::PASS_BAD_HEADER);
    }

    // SAFETY: the value is copied out at once; the agent replaces entries (the kernel
    // frees an old value only after an RCU grace period), so the copy is consistent.
    let source = unsafe { FLANNEL_SOURCES.get(u32::from_ne_bytes(ip.src)) }.copied();
    let Some(source) = source else {
        return Err(if cfg.flags & FLAG_PEERS_SYNCED != 0 {
            reason::DROP_UNKNOWN_SOURCE
        } else {
            reason::PASS_NOT_SYNCED
        });
    };
    let inner_eth_at = ETH_LEN + ENCAP_LEN - ETH_LEN;
    let inner_eth: Eth = read(ctx, inner_eth_at).ok_or(reason::PASS_BAD_HEADER)?;
    if inner_eth.proto != ETH_P_IP {
        return Err(reason::PASS_NOT_IPV4);
    }
    let inner: Ipv4 = read(ctx, ETH_LEN + ENCAP_LEN).ok_or(reason::PASS_BAD_HEADER)?;
    if inner.vihl >> 4 != 4 {
        return Err(reason::PASS_BAD_HEADER);
    }
    if u32::from_ne_bytes(inner.src) & source.mask_be != source.subnet_be {
        return Err(reason::DROP_INNER_SOURCE);
    }

    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the program's context pointer, valid for the whole run.
    let gso_size = unsafe { (*skb).gso_size };
    if gso_size != 0 {
        return Err(reason::PASS_GSO);
    }
    if ip.tos & ECN_MASK == ECN_CE {
        return Err(reason::PASS_ECN_CE);
    }
    if inner_eth.dst != cfg.vtep_mac || inner_eth.src == cfg.vtep_mac {
        return Err(reason::PASS_OTHER_MAC);
    }
    if u32::from_ne_bytes(inner.dst) & cfg.subnet_mask_be != cfg.subnet_be {
        return Err(reason::PASS_NOT_LOCAL);
    }

    ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| reason::PASS_HELPER_FAILED)?;
    write(ctx, 0, &inner_eth).map_err(|()| reason::DROP_REWRITE_FAILED)?;
    count_peer(source.index, false, 1, u64::from(ctx.len()));
    // SAFETY: the helper only records the target device and flag.
    Ok(unsafe { bpf_redirect(cfg.vxlan_ifindex, u64::from(BPF_F_INGRESS)) } as i32)
}
