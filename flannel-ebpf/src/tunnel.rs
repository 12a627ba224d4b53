//! What both wire formats (VXLAN and flannel-udp) share: the outer UDP source port, the
//! route to a peer's PublicIP and the redirect out of the underlay, per-peer counters.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use flannel_common::maps::reason;

use crate::{
    maps::FLANNEL_PEER_COUNTERS,
    parse::{ETH_LEN, Eth, IPV4_LEN, Ipv4, Udp, ensure_linear, read},
};

/// Error value of the `try_*` functions for packets that are none of our business
/// (not a tunnel packet for us): passed to the kernel and not counted.
pub const NOT_OURS: u32 = u32::MAX;

pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
pub const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
/// The kernel's default `ip_local_port_range`, which `udp_flow_src_port` uses when the
/// vxlan device has no `srcport` range (flannel sets none).
const SRC_PORT_MIN: u32 = 32768;
const SRC_PORT_MAX: u32 = 60999;
/// TTL of outer IPv4 headers, as the kernel's vxlan driver and flanneld's socket use.
pub const OUTER_TTL: u8 = 64;

/// The checks both decap programs start with: an unfragmented IPv4 (IHL 5) UDP packet
/// to `public_ip_be`:`port_be`, with `headers_len` bytes made linear. Returns its outer
/// IPv4 and UDP headers; `Err(NOT_OURS)` for anything else addressed elsewhere.
#[inline(always)]
pub fn outer_udp_for_us(
    ctx: &TcContext,
    public_ip_be: u32,
    port_be: u16,
    headers_len: usize,
) -> Result<(Ipv4, Udp), u32> {
    ensure_linear(ctx, ETH_LEN + IPV4_LEN);
    let eth: Eth = read(ctx, 0).ok_or(NOT_OURS)?;
    if eth.proto != ETH_P_IP {
        return Err(NOT_OURS);
    }
    let ip: Ipv4 = read(ctx, ETH_LEN).ok_or(NOT_OURS)?;
    if ip.proto != IPPROTO_UDP || u32::from_ne_bytes(ip.dst) != public_ip_be {
        return Err(NOT_OURS);
    }
    if ip.vihl != 0x45 {
        return Err(reason::PASS_BAD_HEADER);
    }
    if is_fragment(&ip) {
        return Err(reason::PASS_FRAGMENT);
    }
    ensure_linear(ctx, headers_len);
    let udp: Udp = read(ctx, ETH_LEN + IPV4_LEN).ok_or(reason::PASS_BAD_HEADER)?;
    if u16::from_ne_bytes(udp.dst) != port_be {
        return Err(NOT_OURS);
    }
    Ok((ip, udp))
}

#[inline(always)]
pub fn is_fragment(ip: &Ipv4) -> bool {
    // MF set or a non-zero offset; DF (0x40) and the reserved bit do not matter.
    (ip.frag[0] & 0x3f) != 0 || ip.frag[1] != 0
}

/// The kernel's `udp_flow_src_port`: the flow hash scaled into the local port range.
#[inline(always)]
pub fn src_port(hash: u32) -> u16 {
    let hash = hash ^ (hash << 16);
    let port = ((u64::from(hash) * u64::from(SRC_PORT_MAX - SRC_PORT_MIN)) >> 32) as u32;
    (port + SRC_PORT_MIN) as u16
}

#[inline(always)]
pub fn count_peer(index: u32, tx: bool, packets: u64, bytes: u64) {
    let Some(slot) = FLANNEL_PEER_COUNTERS.get_ptr_mut(index) else {
        return;
    };
    // SAFETY: `slot` comes from a successful lookup in a per-CPU array, so it points to
    // this CPU's value for the whole run of the program; no other CPU writes it.
    unsafe {
        if tx {
            (*slot).tx_packets = (*slot).tx_packets.wrapping_add(packets);
            (*slot).tx_bytes = (*slot).tx_bytes.wrapping_add(bytes);
        } else {
            (*slot).rx_packets = (*slot).rx_packets.wrapping_add(packets);
            (*slot).rx_bytes = (*slot).rx_bytes.wrapping_add(bytes);
        }
    }
}

/// How encap reaches the peer's PublicIP.
pub enum NextHop {
    /// The FIB gave the next hop's MAC: write the outer Ethernet header, `bpf_redirect`.
    Resolved,
    /// The FIB knows the next hop but not its MAC: `bpf_redirect_neigh` resolves it.
    Unresolved,
    /// The FIB helper declined (forwarding disabled): `bpf_redirect_neigh` routes itself.
    KernelRoute,
}

/// The way out to a peer's PublicIP: the FIB's answer and what to do with it.
pub struct Route {
    fib: bpf_fib_lookup,
    pub next_hop: NextHop,
}

/// The outer flow a [`Route::lookup`] is for.
pub struct Flow {
    /// Our PublicIP, network order.
    pub src_be: u32,
    /// The peer's PublicIP, network order.
    pub dst_be: u32,
    /// The outer UDP source port, host order.
    pub sport: u16,
    /// The outer UDP destination port, network order.
    pub dport_be: u16,
    /// The outer IPv4 length for the route's MTU check, or 0 for GSO packets (each
    /// segment fits, since the overlay device's MTU leaves room for the overhead).
    pub tot_len: u16,
}

impl Route {
    /// Asks the FIB for the way to `flow.dst_be` out of `underlay_ifindex`, before the
    /// packet is changed: `Err(reason)` leaves it to the kernel.
    #[inline(always)]
    pub fn lookup(ctx: &TcContext, underlay_ifindex: u32, flow: &Flow) -> Result<Route, u32> {
        // SAFETY: `bpf_fib_lookup` is plain old data (integers and unions of integers),
        // for which all-zero is a valid value.
        let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
        fib.family = AF_INET;
        fib.l4_protocol = IPPROTO_UDP;
        fib.sport = flow.sport.to_be();
        fib.dport = flow.dport_be;
        fib.__bindgen_anon_1.tot_len = flow.tot_len;
        fib.ifindex = underlay_ifindex;
        fib.__bindgen_anon_3.ipv4_src = flow.src_be;
        fib.__bindgen_anon_4.ipv4_dst = flow.dst_be;
        // SAFETY: `ctx.skb.skb` is the context; `fib` is a live, writable stack struct of
        // the size passed.
        let rc = unsafe {
            fib_lookup(
                ctx.skb.skb.cast(),
                &raw mut fib,
                size_of::<bpf_fib_lookup>() as i32,
                u32::from(BPF_FIB_LOOKUP_OUTPUT),
            )
        };
        let next_hop = match rc {
            r if r == i64::from(BPF_FIB_LKUP_RET_SUCCESS) => NextHop::Resolved,
            r if r == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) => NextHop::Unresolved,
            // The FIB helper insists on forwarding being enabled on the underlay, even for
            // output lookups; the kernel's own route lookup in `bpf_redirect_neigh` does
            // not.
            r if r == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED) => NextHop::KernelRoute,
            r if r == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) => {
                return Err(reason::PASS_OVERSIZE);
            }
            r if r < 0 => return Err(reason::PASS_HELPER_FAILED),
            _ => return Err(reason::PASS_NO_ROUTE),
        };
        Ok(Route { fib, next_hop })
    }

    /// The outer Ethernet header to write, when the FIB resolved the next hop's MAC.
    #[inline(always)]
    pub fn outer_eth(&self) -> Option<Eth> {
        match self.next_hop {
            NextHop::Resolved => Some(Eth {
                dst: self.fib.dmac,
                src: self.fib.smac,
                proto: ETH_P_IP,
            }),
            NextHop::Unresolved | NextHop::KernelRoute => None,
        }
    }

    /// Sends the (encapsulated, Ethernet-framed) packet on its way: the TC action.
    #[inline(always)]
    pub fn redirect(&mut self, underlay_ifindex: u32) -> i64 {
        match self.next_hop {
            // SAFETY: the helper only records the target; `fib.ifindex` came from the FIB.
            NextHop::Resolved => unsafe { bpf_redirect(self.fib.ifindex, 0) },
            // Not `bpf_redirect_neigh` with the FIB's next hop as parameter: that keeps the
            // skb's route, which still points at the overlay device, and when the neighbour
            // resolves, the kernel re-resolves queued packets through that route (on the
            // overlay device) and the first packets are lost. Without parameters the kernel
            // routes the packet itself and attaches the underlay route first.
            // SAFETY: a null `params` with length 0 asks the kernel to route the packet
            // itself; `fib.ifindex` came from the FIB.
            NextHop::Unresolved => unsafe {
                bpf_redirect_neigh(self.fib.ifindex, core::ptr::null_mut(), 0, 0)
            },
            // SAFETY: a null `params` with length 0 asks the kernel to route the packet
            // itself.
            NextHop::KernelRoute => unsafe {
                bpf_redirect_neigh(underlay_ifindex, core::ptr::null_mut(), 0, 0)
            },
        }
    }
}
