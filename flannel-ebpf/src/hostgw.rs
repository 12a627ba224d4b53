//! flannel's host-gw backend in the kernel: forwarding between local pods and peers.
//!
//! Design note. flannel's host-gw backend is one route per peer (`<peer subnet> via
//! <PublicIP> dev <ext>`); the kernel's forwarding path does the rest: the route lookup,
//! netfilter's PREROUTING, FORWARD and POSTROUTING hooks with conntrack, the neighbour
//! lookup, the TTL. These programs forward the same packets to the same next hops
//! without that path:
//!
//! - **to_peer** runs at TC ingress of the pod-facing devices (the bridge that holds our
//!   subnet's gateway address). An IPv4 packet sent to the bridge's MAC from our subnet
//!   to a peer's subnet is looked up in the FIB (`bpf_fib_lookup`, which also checks the
//!   outgoing device's MTU, GSO-aware), its TTL decremented, its MACs set to the next
//!   hop's, and redirected out of the underlay; but only when the FIB's answer is the
//!   peer's route (via its PublicIP, out of the underlay), so any other route an admin
//!   set still wins.
//! - **from_peer** runs at TC ingress of the underlay: an IPv4 packet from a peer's
//!   subnet to ours goes the same way to the local device the FIB names.
//! - Everything else goes, unchanged, to the kernel (`TC_ACT_OK`), counted by reason
//!   when it is traffic between our subnet and a peer's: next hop not resolved (the
//!   kernel resolves it), TTL 1 (ICMP time exceeded), too big for the next device
//!   (fragmentation, ICMP), fragments, IP options, routes that disagree with the lease.
//!   Other traffic (to the host, to the Internet, between local pods) is none of our
//!   business and not counted.
//!
//! What this skips is also what it costs: netfilter on this node does not see these
//! packets, so no iptables rule, conntrack entry, NAT or NetworkPolicy applies to
//! pod-to-pod traffic between flannel subnets. That is why the agent runs it only when
//! asked (`--dataplane ebpf`), never for `auto`.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::TcContext,
};
use flannel_common::maps::{HostGwConfig, reason};

use crate::{
    csum,
    maps::{FLANNEL_HOSTGW_CONFIG, configured, peer_for},
    parse::{ETH_LEN, Eth, IPV4_LEN, IPV4_TTL_AT, Ipv4, ensure_linear, read, write},
    tunnel::{ETH_P_IP, NOT_OURS, count_peer, is_fragment},
};

const AF_INET: u8 = 2;
/// `skb->pkt_type` of a frame addressed to this host's MAC.
const PACKET_HOST: u32 = 0;
/// What one store rewrites: the Ethernet header and the IPv4 header up to and
/// including its checksum (the TTL and checksum change, the bytes before them do not).
const REWRITE_LEN: usize = ETH_LEN + IPV4_TTL_AT + 4;

/// The host-gw configuration, or `None` before the agent wrote it.
#[inline(always)]
fn config() -> Option<HostGwConfig> {
    configured(&FLANNEL_HOSTGW_CONFIG, |c| c.public_ip_be)
}

#[inline(always)]
fn in_subnet(cfg: &HostGwConfig, addr: [u8; 4]) -> bool {
    u32::from_ne_bytes(addr) & cfg.subnet_mask_be == cfg.subnet_be
}

/// The IPv4 header of a frame this host was sent (its MAC was the destination), or
/// `Err(NOT_OURS)` for anything else: other hosts' frames, ARP, IPv6.
#[inline(always)]
fn ipv4_for_this_host(ctx: &TcContext) -> Result<Ipv4, u32> {
    // SAFETY: `ctx.skb.skb` is the program's context pointer, valid for the whole run;
    // `pkt_type` is a plain context field read the verifier allows.
    let pkt_type = unsafe { (*ctx.skb.skb).pkt_type };
    if pkt_type != PACKET_HOST {
        return Err(NOT_OURS);
    }
    ensure_linear(ctx, ETH_LEN + IPV4_LEN);
    let eth: Eth = read(ctx, 0).ok_or(NOT_OURS)?;
    if eth.proto != ETH_P_IP {
        return Err(NOT_OURS);
    }
    let ip: Ipv4 = read(ctx, ETH_LEN).ok_or(NOT_OURS)?;
    if ip.vihl >> 4 != 4 {
        return Err(NOT_OURS);
    }
    Ok(ip)
}

/// What the kernel's `ip_forward` would refuse or treat specially before routing: the
/// packet goes to the kernel for it.
#[inline(always)]
fn check_forwardable(ctx: &TcContext, ip: &Ipv4) -> Result<(), u32> {
    if ip.vihl != 0x45 {
        return Err(reason::PASS_BAD_HEADER);
    }
    let tot_len = u32::from(u16::from_be_bytes(ip.tot_len));
    // Shorter than its header, or longer than the frame (Ethernet padding after the
    // packet is fine: it travels along, and the receiver's `ip_rcv` trims it).
    if tot_len < IPV4_LEN as u32 || tot_len + ETH_LEN as u32 > ctx.len() {
        return Err(reason::PASS_BAD_HEADER);
    }
    if is_fragment(ip) {
        return Err(reason::PASS_FRAGMENT);
    }
    if ip.ttl <= 1 {
        return Err(reason::PASS_TTL_EXPIRED);
    }
    Ok(())
}

/// The FIB's forwarding decision for `ip` arriving on the context's device, as the
/// kernel's `ip_route_input` would make it (`bpf_fib_lookup` without flags also checks
/// that forwarding is enabled on that device). With no length given, the helper checks
/// the skb against the MTU of the outgoing device, GSO aggregates by segment.
#[inline(always)]
fn fib_forward(ctx: &TcContext, ip: &Ipv4) -> Result<bpf_fib_lookup, u32> {
    // SAFETY: `bpf_fib_lookup` is plain old data (integers and unions of integers), for
    // which all-zero is a valid value.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.l4_protocol = ip.proto;
    // SAFETY: the context pointer; a plain field read.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst);
    // SAFETY: `ctx.skb.skb` is the context; `fib` is a live, writable stack struct of the
    // size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &raw mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc {
        r if r == i64::from(BPF_FIB_LKUP_RET_SUCCESS) => Ok(fib),
        r if r == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) => Err(reason::PASS_NO_NEIGH),
        r if r == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) => Err(reason::PASS_OVERSIZE),
        r if r < 0 => Err(reason::PASS_HELPER_FAILED),
        _ => Err(reason::PASS_NO_ROUTE),
    }
}

/// Forwards the packet as the FIB said: next hop's MACs, TTL − 1, out of `fib.ifindex`.
/// Counts it for peer slot `index`, sent (`tx`) or received.
#[inline(always)]
fn forward(
    ctx: &TcContext,
    ip: &Ipv4,
    fib: &bpf_fib_lookup,
    index: u32,
    tx: bool,
) -> Result<i32, u32> {
    let mut head = [0u8; REWRITE_LEN];
    head[..6].copy_from_slice(&fib.dmac);
    head[6..12].copy_from_slice(&fib.smac);
    head[12..14].copy_from_slice(&ETH_P_IP);
    head[14] = ip.vihl;
    head[15] = ip.tos;
    head[16..18].copy_from_slice(&ip.tot_len);
    head[18..20].copy_from_slice(&ip.id);
    head[20..22].copy_from_slice(&ip.frag);
    // The TTL and checksum change together and keep the header's one's-complement sum,
    // so a CHECKSUM_COMPLETE value stays right without recomputing it.
    let ttl = csum::ttl_decremented(ip.ttl, ip.proto, ip.check);
    head[22..26].copy_from_slice(&ttl);
    // One store: it either rewrites all of it or (failing) nothing, so a failure can
    // still hand the unchanged packet to the kernel.
    write(ctx, 0, &head).map_err(|()| reason::PASS_HELPER_FAILED)?;
    // SAFETY: the context pointer; a plain field read.
    let gso_segs = unsafe { (*ctx.skb.skb).gso_segs };
    let packets = if gso_segs == 0 { 1 } else { gso_segs };
    count_peer(
        index,
        tx,
        u64::from(packets),
        u64::from(ctx.len() - ETH_LEN as u32),
    );
    // SAFETY: the helper only records the target device; `fib.ifindex` came from the FIB.
    Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32)
}

/// Forwards a packet from a local pod to a peer's subnet out of the underlay.
/// `Err(NOT_OURS)` for traffic that is not between our subnet and a peer's.
#[inline(always)]
pub fn try_to_peer(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config().ok_or(NOT_OURS)?;
    let ip = ipv4_for_this_host(ctx)?;
    if !in_subnet(&cfg, ip.src) {
        return Err(NOT_OURS);
    }
    let peer = peer_for(ip.dst).ok_or(NOT_OURS)?;
    check_forwardable(ctx, &ip)?;
    let fib = fib_forward(ctx, &ip)?;
    // SAFETY: reading the union member the helper wrote for an AF_INET lookup: the next
    // hop (the gateway of the route, or the destination itself when on-link).
    let next_hop = unsafe { fib.__bindgen_anon_4.ipv4_dst };
    if fib.ifindex != cfg.underlay_ifindex || next_hop != peer.public_ip_be {
        return Err(reason::PASS_NO_ROUTE);
    }
    forward(ctx, &ip, &fib, peer.index, true)
}

/// Forwards a packet from a peer's subnet to a local pod. `Err(NOT_OURS)` for traffic
/// that is not between a peer's subnet and ours.
#[inline(always)]
pub fn try_from_peer(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config().ok_or(NOT_OURS)?;
    let ip = ipv4_for_this_host(ctx)?;
    if !in_subnet(&cfg, ip.dst) {
        return Err(NOT_OURS);
    }
    let peer = peer_for(ip.src).ok_or(NOT_OURS)?;
    check_forwardable(ctx, &ip)?;
    let fib = fib_forward(ctx, &ip)?;
    // Our subnet is behind a local device; the underlay again would be a routing loop
    // (or a route we did not expect), which the kernel handles (ICMP redirect).
    if fib.ifindex == cfg.underlay_ifindex {
        return Err(reason::PASS_NO_ROUTE);
    }
    forward(ctx, &ip, &fib, peer.index, false)
}
