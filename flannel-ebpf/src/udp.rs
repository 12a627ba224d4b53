//! flannel's udp backend in the kernel: raw IPv4 in UDP, wire-compatible with flanneld.
//!
//! Design note. flanneld's udp backend reads packets from the TUN `flannel0`, finds the
//! peer by longest prefix over the peer subnets, decrements the inner TTL (patching the
//! IPv4 checksum) and sends the packet, with no header of any kind, as the payload of a
//! UDP datagram to the peer's PublicIP and `Port` (8285); the receiver decrements the TTL
//! again and writes the packet into its `flannel0`. These programs do the same without
//! the two copies through userspace, on the machinery of the vxlan programs (peer LPM
//! trie, source map, per-peer and per-reason counters):
//!
//! - **encap** runs at TC egress of `flannel0`, an L3 device: the skb starts at the IPv4
//!   header. It grows the skb by 28 bytes with `bpf_skb_adjust_room(BPF_ADJ_ROOM_MAC,
//!   ENCAP_L3_IPV4 | ENCAP_L4_UDP | FIXED_GSO)` (GSO packets stay segmentable as
//!   `SKB_GSO_UDP_TUNNEL`), pushes an Ethernet header with `bpf_skb_change_head` (meant
//!   for exactly this: an L3 skb going to an L2 device), writes the outer IPv4 (TTL 64,
//!   DF clear, random id, checksum) and UDP header (source port from the kernel's
//!   `udp_flow_src_port` formula, for receive-side hashing; flanneld's receivers do not
//!   look at it; checksum 0), decrements the inner TTL and sends the frame out of the
//!   underlay like the vxlan encap does (FIB lookup, `bpf_redirect` or
//!   `bpf_redirect_neigh`).
//! - **decap** runs at TC ingress of the underlay and takes only what it can strip
//!   exactly: IPv4 without options, not a fragment, UDP to our PublicIP and `Port`, no
//!   GSO aggregate, an inner IPv4 packet filling the datagram. It removes the 28 bytes
//!   after the outer MAC header, decrements the inner TTL and redirects to the ingress
//!   of `flannel0`; for an L3 device the kernel drops the MAC header itself
//!   (`__bpf_redirect_no_mac`). The stack sees the packet as received on `flannel0`, as
//!   with flanneld, so rp_filter, iptables and conntrack behave as before.
//! - **anti-spoofing** (decap), as in the vxlan programs: the outer source must be a
//!   known peer's PublicIP and the inner source inside that peer's subnet, else the
//!   packet is dropped and counted, before any decision to hand it on. flanneld itself
//!   accepts any datagram on its port, so this is strictly stronger.
//! - Everything else goes, unchanged, to the kernel (`TC_ACT_OK`), counted by reason: at
//!   encap into `flannel0`, whose reader (the userspace udp backend) sends it as
//!   flanneld would; at decap to the UDP socket on `Port`. A packet whose inner TTL would
//!   reach zero goes the same way (flanneld discards it).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_INGRESS, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect, bpf_skb_change_head},
    programs::TcContext,
};
use flannel_common::maps::{FLAG_PEERS_SYNCED, UdpConfig, reason};

use crate::{
    csum,
    maps::{FLANNEL_SOURCES, FLANNEL_UDP_CONFIG, configured, peer_for},
    parse::{
        ETH_LEN, Eth, IPV4_LEN, IPV4_TTL_AT, Ipv4, UDP_DECAP_HEADERS_LEN, UDP_ENCAP_LEN,
        ensure_linear, read, write,
    },
    tunnel::{
        ETH_P_IP, Flow, IPPROTO_UDP, NOT_OURS, OUTER_TTL, Route, count_peer, outer_udp_for_us,
        src_port,
    },
};

/// The udp configuration, or `None` before the agent wrote it.
#[inline(always)]
fn config() -> Option<UdpConfig> {
    configured(&FLANNEL_UDP_CONFIG, |c| c.public_ip_be)
}

/// The 28 bytes in front of the inner IPv4 packet: outer IPv4 and UDP.
#[inline(always)]
fn encap_header(
    cfg: &UdpConfig,
    peer_ip_be: u32,
    inner_len: u32,
    src_port: u16,
    ip_id: u16,
) -> [u8; UDP_ENCAP_LEN] {
    let mut h = [0u8; UDP_ENCAP_LEN];
    let ip_len = (inner_len + UDP_ENCAP_LEN as u32) as u16;
    let udp_len = ip_len - IPV4_LEN as u16;
    let mut ip = [0u8; IPV4_LEN];
    ip[0] = 0x45;
    // ip[1]: TOS 0, as flanneld's socket sends.
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    // ip[6..8]: flags and offset 0, DF clear like the vxlan path.
    ip[8] = OUTER_TTL;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&cfg.public_ip_be.to_ne_bytes());
    ip[16..20].copy_from_slice(&peer_ip_be.to_ne_bytes());
    let check = csum::ipv4_header(&ip);
    ip[10] = check[0];
    ip[11] = check[1];
    h[..IPV4_LEN].copy_from_slice(&ip);
    let u = IPV4_LEN;
    h[u..u + 2].copy_from_slice(&src_port.to_be_bytes());
    h[u + 2..u + 4].copy_from_slice(&cfg.port_be.to_ne_bytes());
    h[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
    // h[u + 6..u + 8]: UDP checksum 0, which IPv4 receivers (flanneld's socket too) accept.
    h
}

/// Encapsulates a packet leaving `flannel0` for a known peer and sends it out of the
/// underlay. `Err(reason)` leaves the packet to the TUN's reader (or drops it, for the
/// `DROP_*` reasons).
#[inline(always)]
pub fn try_encap(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config().ok_or(reason::PASS_NO_CONFIG)?;
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the program's context pointer, valid for the whole run; these are
    // plain context field reads the verifier allows.
    let (ifindex, gso_size, gso_segs) =
        unsafe { ((*skb).ifindex, (*skb).gso_size, (*skb).gso_segs) };
    // On `flannel0`, an L3 device, the packet starts at the IPv4 header. Anywhere else
    // there is an Ethernet header in front: in BPF_PROG_TEST_RUN, which hands every TC
    // program an Ethernet frame, and so lets the tests exercise everything after it.
    let l2_len = if ifindex == cfg.tun_ifindex {
        0
    } else {
        ETH_LEN
    };
    ensure_linear(ctx, ETH_LEN + IPV4_LEN);
    if l2_len != 0 {
        let eth: Eth = read(ctx, 0).ok_or(reason::PASS_BAD_HEADER)?;
        if eth.proto != ETH_P_IP {
            return Err(reason::PASS_NOT_IPV4);
        }
    }
    let ip: Ipv4 = read(ctx, l2_len).ok_or(reason::PASS_BAD_HEADER)?;
    // A TUN carries IPv6 too; only the version nibble tells.
    if ip.vihl >> 4 != 4 {
        return Err(reason::PASS_NOT_IPV4);
    }
    if ip.vihl & 0x0f < 5 {
        return Err(reason::PASS_BAD_HEADER);
    }
    let inner_len = ctx.len() - l2_len as u32;
    // The datagram carries exactly the packet, so its length must be the packet's.
    if u32::from(u16::from_be_bytes(ip.tot_len)) != inner_len {
        return Err(reason::PASS_BAD_HEADER);
    }
    let peer = peer_for(ip.dst).ok_or(reason::PASS_NO_PEER)?;
    if ip.ttl <= 1 {
        return Err(reason::PASS_TTL_EXPIRED);
    }
    let outer_ip_len = inner_len + UDP_ENCAP_LEN as u32;
    if outer_ip_len > 0xffff || (gso_size == 0 && outer_ip_len > cfg.underlay_mtu) {
        return Err(reason::PASS_OVERSIZE);
    }

    // SAFETY: `skb` is the context pointer; the helper only reads/sets the skb's hash.
    let hash = unsafe { bpf_get_hash_recalc(skb) };
    let sport = src_port(hash);
    // Non-GSO: let the route (and PMTU exceptions) check the outer length. GSO: each
    // segment fits, since flannel0's MTU is the underlay's minus 28.
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
    let header = encap_header(&cfg, peer.public_ip_be, inner_len, sport, ip_id);
    let ttl = csum::ttl_decremented(ip.ttl, ip.proto, ip.check);

    // The only step that can fail for reasons of the packet (an skb already marked as
    // encapsulated, an unsupported GSO type); until it succeeds the packet is unchanged.
    let flags = u64::from(
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_FIXED_GSO,
    );
    ctx.adjust_room(UDP_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| reason::PASS_HELPER_FAILED)?;

    // From here on the packet is no longer the kernel's: a failure can only drop it.
    if l2_len == 0 {
        // SAFETY: `skb` is the context pointer; the helper prepends zeroed bytes as the
        // MAC header (and fails only without memory). No packet pointer is held across it.
        let rc = unsafe { bpf_skb_change_head(skb, ETH_LEN as u32, 0) };
        if rc != 0 {
            return Err(reason::DROP_REWRITE_FAILED);
        }
    }
    write(ctx, ETH_LEN, &header).map_err(|()| reason::DROP_REWRITE_FAILED)?;
    write(ctx, ETH_LEN + UDP_ENCAP_LEN + IPV4_TTL_AT, &ttl)
        .map_err(|()| reason::DROP_REWRITE_FAILED)?;
    // Without a resolved next hop `bpf_redirect_neigh` fills in the MACs; it only needs
    // the EtherType.
    let outer_eth = route.outer_eth().unwrap_or(Eth {
        dst: [0; 6],
        src: [0; 6],
        proto: ETH_P_IP,
    });
    write(ctx, 0, &outer_eth).map_err(|()| reason::DROP_REWRITE_FAILED)?;
    let packets = if gso_segs == 0 { 1 } else { gso_segs };
    count_peer(peer.index, true, u64::from(packets), u64::from(inner_len));
    Ok(route.redirect(cfg.underlay_ifindex) as i32)
}

/// Decapsulates flannel-udp for us from a known peer and delivers the inner packet to the
/// ingress of `flannel0`. `Err(NOT_OURS)` for traffic that is not flannel-udp for us.
#[inline(always)]
pub fn try_decap(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config().ok_or(NOT_OURS)?;
    let (ip, udp) = outer_udp_for_us(ctx, cfg.public_ip_be, cfg.port_be, UDP_DECAP_HEADERS_LEN)?;
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
    let inner_at = ETH_LEN + UDP_ENCAP_LEN;
    let inner: Ipv4 = read(ctx, inner_at).ok_or(reason::PASS_BAD_HEADER)?;
    if inner.vihl >> 4 != 4 {
        return Err(reason::PASS_NOT_IPV4);
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
    if inner.vihl & 0x0f < 5 || u32::from(u16::from_be_bytes(inner.tot_len)) + 8 != udp_len {
        return Err(reason::PASS_BAD_HEADER);
    }
    if u32::from_ne_bytes(inner.dst) & cfg.subnet_mask_be != cfg.subnet_be {
        return Err(reason::PASS_NOT_LOCAL);
    }
    if inner.ttl <= 1 {
        return Err(reason::PASS_TTL_EXPIRED);
    }
    let ttl = csum::ttl_decremented(inner.ttl, inner.proto, inner.check);

    ctx.adjust_room(-(UDP_ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| reason::PASS_HELPER_FAILED)?;
    // The TTL and checksum change together and keep the header's one's-complement sum,
    // so a CHECKSUM_COMPLETE value stays right without recomputing it.
    write(ctx, ETH_LEN + IPV4_TTL_AT, &ttl).map_err(|()| reason::DROP_REWRITE_FAILED)?;
    count_peer(
        source.index,
        false,
        1,
        u64::from(ctx.len() - ETH_LEN as u32),
    );
    // SAFETY: the helper only records the target device and flag.
    Ok(unsafe { bpf_redirect(cfg.tun_ifindex, u64::from(BPF_F_INGRESS)) } as i32)
}
