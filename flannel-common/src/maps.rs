//! Map key and value types: the byte layout both the BPF programs and the agent use.
//!
//! Rules for every type here: `#[repr(C)]`, integer fields only, padding written out as
//! `_pad*` fields, a compile-time size check, and `aya::Pod` under the `user` feature.
//! `tests/tests/ebpf_object.rs` checks the built object's maps against these sizes,
//! because aya's `#[map(name = ...)]` cannot refer to the consts in [`crate`].

/// Packet and byte counters, one per CPU in [`crate::MAP_STATS`] (a per-CPU array, so the
/// programs never need atomics; the agent sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen: the skb length, link-layer header included.
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counters>() == 16);
const _: () = assert!(core::mem::align_of::<Counters>() == 8);

impl Counters {
    /// The sum of two counters, wrapping like the kernel-side increments do.
    #[must_use]
    pub const fn add(self, other: Counters) -> Counters {
        Counters {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// SAFETY: `Counters` is `#[repr(C)]`, has only `u64` fields and no padding (checked by the
// size assertion above), so every bit pattern is a valid value and it can be copied to and
// from the kernel as plain bytes.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}

/// Key of [`crate::MAP_STATS`]: the array index. Index [`STATS_INDEX_ALL`] counts every
/// packet the classifier sees.
pub type StatsKey = u32;

/// The only [`crate::MAP_STATS`] slot in use so far: all packets.
pub const STATS_INDEX_ALL: StatsKey = 0;

/// Number of slots in [`crate::MAP_STATS`].
pub const STATS_ENTRIES: u32 = 1;

/// Most peers the fast path knows of: max entries of [`crate::MAP_PEERS`] and
/// [`crate::MAP_SOURCES`], and the number of [`crate::MAP_PEER_COUNTERS`] slots
/// ([`Peer::index`] is below it).
pub const MAX_PEERS: u32 = 4096;

/// [`Config::flags`] bit: the agent has written the full peer set at least once. Until
/// then decap hands VXLAN from unknown sources to the kernel instead of dropping it, so a
/// fresh start (or a layout migration) does not cut traffic before the peers are known.
pub const FLAG_PEERS_SYNCED: u32 = 1;

/// This node as the fast path sees it; the only entry (key 0) of [`crate::MAP_CONFIG`].
///
/// Addresses are network-order values held in a `u32` (`*_be`): their in-memory bytes
/// are the address octets, so `u32::from_ne_bytes(addr.octets())` on the agent side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Our PublicIP: the outer source of encap, the outer destination decap accepts.
    pub public_ip_be: u32,
    /// Our lease subnet's network address (decap delivers only inner destinations in it).
    pub subnet_be: u32,
    /// Our lease subnet's netmask.
    pub subnet_mask_be: u32,
    /// The VXLAN network identifier, host order (24 bits).
    pub vni: u32,
    /// The underlay (external) interface: where encap sends, where decap runs.
    pub underlay_ifindex: u32,
    /// `flannel.<VNI>`: where encap runs, where decap delivers.
    pub vxlan_ifindex: u32,
    /// MTU of the underlay interface; bigger non-GSO packets after encap go to the kernel.
    pub underlay_mtu: u32,
    /// [`FLAG_PEERS_SYNCED`] and future bits.
    pub flags: u32,
    /// The VXLAN UDP destination port, network order.
    pub port_be: u16,
    /// Our VtepMAC (the MAC of `flannel.<VNI>`).
    pub vtep_mac: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<Config>() == 40);
const _: () = assert!(core::mem::align_of::<Config>() == 4);

// SAFETY: `Config` is `#[repr(C)]`, has only integer fields and no implicit padding
// (the size assertion above equals the sum of the field sizes), so every bit pattern is a
// valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Config {}

/// This node as the udp fast path sees it; the only entry (key 0) of
/// [`crate::MAP_UDP_CONFIG`]. Same conventions as [`Config`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpConfig {
    /// Our PublicIP: the outer source of encap, the outer destination decap accepts.
    pub public_ip_be: u32,
    /// Our lease subnet's network address (decap delivers only inner destinations in it).
    pub subnet_be: u32,
    /// Our lease subnet's netmask.
    pub subnet_mask_be: u32,
    /// The underlay (external) interface: where encap sends, where decap runs.
    pub underlay_ifindex: u32,
    /// The TUN device (`flannel0`): where encap runs, where decap delivers.
    pub tun_ifindex: u32,
    /// MTU of the underlay interface; bigger non-GSO packets after encap go to the TUN.
    pub underlay_mtu: u32,
    /// [`FLAG_PEERS_SYNCED`] and future bits.
    pub flags: u32,
    /// flannel's `Port` (default 8285), network order: the outer UDP destination.
    pub port_be: u16,
    /// Padding to the 4-byte alignment; always zero.
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<UdpConfig>() == 32);
const _: () = assert!(core::mem::align_of::<UdpConfig>() == 4);

// SAFETY: `#[repr(C)]`, integer fields only, the padding written out (size check above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for UdpConfig {}

/// This node as the host-gw fast path sees it; the only entry (key 0) of
/// [`crate::MAP_HOSTGW_CONFIG`]. Same conventions as [`Config`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostGwConfig {
    /// Our PublicIP, the address of the underlay interface peers route our subnet to.
    pub public_ip_be: u32,
    /// Our lease subnet's network address: only destinations in it are delivered from
    /// peers, only sources in it are forwarded to peers.
    pub subnet_be: u32,
    /// Our lease subnet's netmask.
    pub subnet_mask_be: u32,
    /// The underlay (external) interface: where traffic to peers leaves, where
    /// traffic from peers arrives.
    pub underlay_ifindex: u32,
    /// [`FLAG_PEERS_SYNCED`] and future bits.
    pub flags: u32,
    /// Padding; always zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<HostGwConfig>() == 24);
const _: () = assert!(core::mem::align_of::<HostGwConfig>() == 4);

// SAFETY: `#[repr(C)]`, six `u32` fields, no padding (size check above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for HostGwConfig {}

/// Key of [`crate::MAP_PEERS`], an LPM trie: the layout of aya's `lpm_trie::Key<u32>`
/// (prefix length in bits, then the network-order address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    /// Prefix length in bits, host order (what the kernel's LPM trie expects).
    pub prefix_len: u32,
    /// The subnet's network address, network order.
    pub addr_be: u32,
}

const _: () = assert!(core::mem::size_of::<PeerKey>() == 8);

// SAFETY: `#[repr(C)]`, two `u32` fields, no padding (size check above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerKey {}

/// Value of [`crate::MAP_PEERS`]: where to send traffic for a peer's subnet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The peer's PublicIP (outer destination), network order.
    pub public_ip_be: u32,
    /// The peer's slot in [`crate::MAP_PEER_COUNTERS`], below [`MAX_PEERS`].
    pub index: u32,
    /// The peer's VtepMAC: the inner destination MAC its `flannel.<VNI>` accepts. Zero
    /// for the udp backend, whose wire format has no inner Ethernet header.
    pub vtep_mac: [u8; 6],
    /// Padding to the 4-byte alignment; always zero.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<Peer>() == 16);

// SAFETY: `#[repr(C)]`, integer fields only, the padding written out (size check above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Peer {}

/// Key of [`crate::MAP_SOURCES`]: a peer's PublicIP, network order.
pub type SourceKey = u32;

/// Value of [`crate::MAP_SOURCES`]: what a VXLAN (or flannel-udp) sender may put inside.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerSource {
    /// The peer's subnet network address, network order.
    pub subnet_be: u32,
    /// The peer's subnet mask, network order.
    pub mask_be: u32,
    /// The peer's slot in [`crate::MAP_PEER_COUNTERS`].
    pub index: u32,
    /// Padding; always zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PeerSource>() == 16);

// SAFETY: `#[repr(C)]`, four `u32` fields, no padding (size check above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerSource {}

/// Per-peer traffic carried by the fast path, one per CPU in
/// [`crate::MAP_PEER_COUNTERS`]. Bytes are what crosses the overlay device: inner
/// Ethernet frames on `flannel.<VNI>`, inner IPv4 packets on the udp backend's
/// `flannel0`; packets count GSO segments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Packets encapsulated towards the peer.
    pub tx_packets: u64,
    /// Bytes encapsulated towards the peer.
    pub tx_bytes: u64,
    /// Packets decapsulated from the peer.
    pub rx_packets: u64,
    /// Bytes decapsulated from the peer.
    pub rx_bytes: u64,
}

const _: () = assert!(core::mem::size_of::<PeerCounters>() == 32);

impl PeerCounters {
    /// The sum of two counters, wrapping like the kernel-side increments do.
    #[must_use]
    pub const fn add(self, o: PeerCounters) -> PeerCounters {
        PeerCounters {
            tx_packets: self.tx_packets.wrapping_add(o.tx_packets),
            tx_bytes: self.tx_bytes.wrapping_add(o.tx_bytes),
            rx_packets: self.rx_packets.wrapping_add(o.rx_packets),
            rx_bytes: self.rx_bytes.wrapping_add(o.rx_bytes),
        }
    }
}

// SAFETY: `#[repr(C)]`, four `u64` fields, no padding (size check above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerCounters {}

/// Why a packet left the fast path: the index into [`crate::MAP_REASONS`].
///
/// `DROP_*` reasons end in `TC_ACT_SHOT`; every other reason hands the packet, unchanged,
/// to the kernel (`TC_ACT_OK`), whose vxlan driver (or, for the udp backend, the
/// userspace reader of `flannel0` and of the UDP socket) then does what flannel always
/// did. Traffic on the underlay that is not for the fast path is not counted at all.
pub mod reason {
    /// Decap: VXLAN for us from an outer source that is no known peer's PublicIP.
    pub const DROP_UNKNOWN_SOURCE: u32 = 0;
    /// Decap: the inner IPv4 source is outside the sending peer's subnet.
    pub const DROP_INNER_SOURCE: u32 = 1;
    /// A store failed after the packet was already resized, so it can no longer be handed
    /// to the kernel intact (not seen in practice; counted so it is never silent).
    pub const DROP_REWRITE_FAILED: u32 = 2;
    /// Encap: no peer subnet contains the inner destination.
    pub const PASS_NO_PEER: u32 = 3;
    /// An IPv4 fragment (inner at encap, outer at decap).
    pub const PASS_FRAGMENT: u32 = 4;
    /// Decap: a GSO aggregate (`gso_size != 0`), which cannot be stripped correctly.
    pub const PASS_GSO: u32 = 5;
    /// Encap: a non-GSO packet too big for the underlay once encapsulated, or the route
    /// to the peer says so; the kernel fragments. host-gw: too big for the outgoing
    /// device; the kernel fragments or sends ICMP.
    pub const PASS_OVERSIZE: u32 = 6;
    /// A header is truncated or malformed (outer IHL != 5, VXLAN flags, lengths).
    pub const PASS_BAD_HEADER: u32 = 7;
    /// Not IPv4 (inner at encap, inner at decap).
    pub const PASS_NOT_IPV4: u32 = 8;
    /// Decap: the inner destination is not in our subnet.
    pub const PASS_NOT_LOCAL: u32 = 9;
    /// Decap: the inner destination MAC is not our VtepMAC, or the source MAC is ours.
    pub const PASS_OTHER_MAC: u32 = 10;
    /// Decap: outer ECN is CE; the kernel applies RFC 6040 decapsulation.
    pub const PASS_ECN_CE: u32 = 11;
    /// A helper failed before the packet was changed (`adjust_room`, `fib_lookup`).
    pub const PASS_HELPER_FAILED: u32 = 12;
    /// Decap: VXLAN from an unknown source before the first full peer sync.
    pub const PASS_NOT_SYNCED: u32 = 13;
    /// No configuration written yet.
    pub const PASS_NO_CONFIG: u32 = 14;
    /// Encap: the route to the peer's PublicIP is not a usable unicast route. host-gw:
    /// the FIB does not forward the packet the way the peer's lease says (another route,
    /// a local or broadcast destination, forwarding disabled).
    pub const PASS_NO_ROUTE: u32 = 15;
    /// Decap: VXLAN to our address and port with another VNI.
    pub const PASS_OTHER_VNI: u32 = 16;
    /// The TTL would reach zero with our decrement: the kernel (or, on the udp backend,
    /// flanneld's userspace path) decides, and sends ICMP time exceeded.
    pub const PASS_TTL_EXPIRED: u32 = 17;
    /// host-gw: the next hop's MAC is not resolved yet; the kernel resolves it (and
    /// forwards this packet), so the following ones take the fast path.
    pub const PASS_NO_NEIGH: u32 = 18;

    /// Number of reasons: the size of [`crate::MAP_REASONS`].
    pub const COUNT: u32 = 19;

    /// Each reason's name, indexed by its number.
    pub const NAMES: [&str; COUNT as usize] = [
        "drop_unknown_source",
        "drop_inner_source",
        "drop_rewrite_failed",
        "pass_no_peer",
        "pass_fragment",
        "pass_gso",
        "pass_oversize",
        "pass_bad_header",
        "pass_not_ipv4",
        "pass_not_local",
        "pass_other_mac",
        "pass_ecn_ce",
        "pass_helper_failed",
        "pass_not_synced",
        "pass_no_config",
        "pass_no_route",
        "pass_other_vni",
        "pass_ttl_expired",
        "pass_no_neigh",
    ];

    /// True for the reasons whose packets are dropped.
    #[must_use]
    pub const fn is_drop(reason: u32) -> bool {
        reason <= DROP_REWRITE_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_unique_and_counted() {
        for (i, a) in reason::NAMES.iter().enumerate() {
            for b in &reason::NAMES[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert!(reason::is_drop(reason::DROP_INNER_SOURCE));
        assert!(!reason::is_drop(reason::PASS_NO_PEER));
        assert_eq!(
            reason::NAMES[reason::PASS_NO_ROUTE as usize],
            "pass_no_route"
        );
        assert_eq!(
            reason::NAMES[reason::PASS_OTHER_VNI as usize],
            "pass_other_vni"
        );
        assert_eq!(
            reason::NAMES[reason::PASS_TTL_EXPIRED as usize],
            "pass_ttl_expired"
        );
    }

    #[test]
    fn add_wraps() {
        let a = Counters {
            packets: u64::MAX,
            bytes: 10,
        };
        let b = Counters {
            packets: 2,
            bytes: 5,
        };
        assert_eq!(
            a.add(b),
            Counters {
                packets: 1,
                bytes: 15
            }
        );
    }
}
