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
pub const LAYOUT_VERSION: u32 = 1;

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

/// The TC classifier that counts packets into [`MAP_STATS`].
pub const PROG_STATS: &str = "flannel_stats";

/// VXLAN encapsulation, at TC egress of `flannel.<VNI>`.
pub const PROG_ENCAP: &str = "flannel_encap";

/// VXLAN decapsulation, at TC ingress of the underlay (external) interface.
pub const PROG_DECAP: &str = "flannel_decap";

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
];

/// The maps the agent pins and adopts across restarts (all of [`MAPS`] but the
/// debugging counter of `flannel_stats`).
pub const PINNED_MAPS: &[&str] = &[
    MAP_CONFIG,
    MAP_PEERS,
    MAP_SOURCES,
    MAP_PEER_COUNTERS,
    MAP_REASONS,
];

/// Every program the BPF object must contain.
pub const PROGRAMS: &[&str] = &[PROG_STATS, PROG_ENCAP, PROG_DECAP];
