//! The kernel ABI shared by the BPF programs (`flannel-ebpf`) and the agent.
//!
//! Everything here is `no_std`, `#[repr(C)]`, integer-only and explicitly padded,
//! so both sides agree on the byte layout of every map key and value.
#![no_std]

pub mod consts;
pub mod maps;

pub use maps::Counters;

/// Version of the map layout as a whole: the types in [`maps`], the map types and their
/// sizes, and what the programs mean by each field. The agent pins maps under a directory
/// named after it (`v<N>`), so pinned maps of another layout are never adopted silently.
/// Bump it on any change to [`maps`] or to the meaning of a map.
///
/// On start the agent migrates the maps of another layout: each map of the same name,
/// kernel map type and key and value sizes is copied entry by entry (arrays up to the
/// smaller size), the others start empty. So a map whose meaning changes while its shape
/// does not must also get a new name, or its old entries would be copied as they are.
///
/// 2: `reason::PASS_TTL_EXPIRED` (one more [`MAP_REASONS`] slot) and the udp backend's
/// [`MAP_UDP_CONFIG`].
/// 3: `reason::PASS_NO_NEIGH` (one more [`MAP_REASONS`] slot) and the host-gw backend's
/// [`MAP_HOSTGW_CONFIG`].
pub const LAYOUT_VERSION: u32 = 3;

/// Per-CPU array of [`Counters`], indexed by [`maps::StatsKey`].
///
/// The BPF side declares its maps with literal names (aya's `#[map(name = ...)]` takes
/// no consts); the object test checks that those literals equal these.
pub const MAP_STATS: &str = "FLANNEL_STATS";

/// Array with one [`maps::Config`]: what the fast path needs to know about this node.
pub const MAP_CONFIG: &str = "FLANNEL_CONFIG";

/// LPM trie from a peer's subnet ([`maps::PeerKey`]) to [`maps::Peer`]: where encap sends.
pub const MAP_PEERS: &str = "FLANNEL_PEERS";

/// Hash from a peer's PublicIP ([`maps::SourceKey`]) to [`maps::PeerSource`]: who decap
/// accepts VXLAN from, and which inner sources that peer may use.
pub const MAP_SOURCES: &str = "FLANNEL_SOURCES";

/// Per-CPU array of [`maps::PeerCounters`], indexed by [`maps::Peer::index`].
pub const MAP_PEER_COUNTERS: &str = "FLANNEL_PEER_COUNTERS";

/// Per-CPU array of `u64` packet counts, indexed by [`maps::reason`].
pub const MAP_REASONS: &str = "FLANNEL_REASONS";

/// Array with one [`maps::UdpConfig`]: this node for the udp backend's fast path. The
/// udp programs share every other map type with the vxlan ones ([`UDP_PINNED_MAPS`]);
/// the agent pins the udp set in a directory of its own, so the two never share state.
pub const MAP_UDP_CONFIG: &str = "FLANNEL_UDP_CONFIG";

/// Array with one [`maps::HostGwConfig`]: this node for the host-gw backend's fast path,
/// which shares the peer and counter map types with the tunnel paths
/// ([`HOSTGW_PINNED_MAPS`]) and, like the udp path, pins its set in a directory of its own.
pub const MAP_HOSTGW_CONFIG: &str = "FLANNEL_HOSTGW_CONFIG";

/// The TC classifier that counts packets into [`MAP_STATS`].
pub const PROG_STATS: &str = "flannel_stats";

/// VXLAN encapsulation, at TC egress of `flannel.<VNI>`.
pub const PROG_ENCAP: &str = "flannel_encap";

/// VXLAN decapsulation, at TC ingress of the underlay (external) interface.
pub const PROG_DECAP: &str = "flannel_decap";

/// flannel-udp encapsulation (raw IPv4 in UDP), at TC egress of the TUN `flannel0`.
pub const PROG_UDP_ENCAP: &str = "flannel_udp_encap";

/// flannel-udp decapsulation, at TC ingress of the underlay (external) interface.
pub const PROG_UDP_DECAP: &str = "flannel_udp_decap";

/// host-gw forwarding from local pods to peers, at TC ingress of the pod-facing devices
/// (the bridge that holds the lease subnet's gateway address, e.g. `cni0` or `docker0`).
pub const PROG_HOSTGW_TO_PEER: &str = "flannel_hostgw_to_peer";

/// host-gw forwarding from peers to local pods, at TC ingress of the underlay.
pub const PROG_HOSTGW_FROM_PEER: &str = "flannel_hostgw_from_peer";

/// Every map the BPF object must contain, with its key and value sizes in bytes.
pub const MAPS: &[(&str, u32, u32)] = &[
    (
        MAP_STATS,
        core::mem::size_of::<maps::StatsKey>() as u32,
        core::mem::size_of::<Counters>() as u32,
    ),
    (
        MAP_CONFIG,
        core::mem::size_of::<u32>() as u32,
        core::mem::size_of::<maps::Config>() as u32,
    ),
    (
        MAP_PEERS,
        core::mem::size_of::<maps::PeerKey>() as u32,
        core::mem::size_of::<maps::Peer>() as u32,
    ),
    (
        MAP_SOURCES,
        core::mem::size_of::<maps::SourceKey>() as u32,
        core::mem::size_of::<maps::PeerSource>() as u32,
    ),
    (
        MAP_PEER_COUNTERS,
        core::mem::size_of::<u32>() as u32,
        core::mem::size_of::<maps::PeerCounters>() as u32,
    ),
    (
        MAP_REASONS,
        core::mem::size_of::<u32>() as u32,
        core::mem::size_of::<u64>() as u32,
    ),
    (
        MAP_UDP_CONFIG,
        core::mem::size_of::<u32>() as u32,
        core::mem::size_of::<maps::UdpConfig>() as u32,
    ),
    (
        MAP_HOSTGW_CONFIG,
        core::mem::size_of::<u32>() as u32,
        core::mem::size_of::<maps::HostGwConfig>() as u32,
    ),
];

/// The maps the vxlan fast path pins and adopts across restarts (all of [`MAPS`] but the
/// debugging counter of `flannel_stats` and the udp backend's configuration).
pub const PINNED_MAPS: &[&str] = &[
    MAP_CONFIG,
    MAP_PEERS,
    MAP_SOURCES,
    MAP_PEER_COUNTERS,
    MAP_REASONS,
];

/// The maps the udp fast path pins and adopts across restarts: its own configuration
/// and the peer, source and counter maps it shares in type with the vxlan path.
pub const UDP_PINNED_MAPS: &[&str] = &[
    MAP_UDP_CONFIG,
    MAP_PEERS,
    MAP_SOURCES,
    MAP_PEER_COUNTERS,
    MAP_REASONS,
];

/// The maps the host-gw fast path pins and adopts across restarts: its own
/// configuration and the peer, source and counter maps it shares in type with the tunnel
/// paths.
pub const HOSTGW_PINNED_MAPS: &[&str] = &[
    MAP_HOSTGW_CONFIG,
    MAP_PEERS,
    MAP_SOURCES,
    MAP_PEER_COUNTERS,
    MAP_REASONS,
];

/// Every program the BPF object must contain.
pub const PROGRAMS: &[&str] = &[
    PROG_STATS,
    PROG_ENCAP,
    PROG_DECAP,
    PROG_UDP_ENCAP,
    PROG_UDP_DECAP,
    PROG_HOSTGW_TO_PEER,
    PROG_HOSTGW_FROM_PEER,
];
