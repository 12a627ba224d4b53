//! Every map of the BPF object, and the lookups the programs share, in one place.
//!
//! aya's `#[map(name = ...)]` takes only literals, so each name below is repeated from
//! `flannel_common`; `tests/tests/ebpf_object.rs` fails if the two drift apart. None is
//! pinned by the object itself: the agent chooses the pin paths (a versioned directory).
//!
//! The vxlan, udp and host-gw programs use the same peer, source and counter maps: each agent
//! attaches one pair and pins that pair's maps in a directory of its own, so a loaded
//! object never carries both kinds of traffic in one map.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use flannel_common::{
    Counters,
    maps::{
        Config, HostGwConfig, MAX_PEERS, Peer, PeerCounters, PeerSource, STATS_ENTRIES, SourceKey,
        UdpConfig, reason,
    },
};

/// `flannel_common::MAP_STATS`: per-CPU packet and byte counters.
#[map(name = "FLANNEL_STATS")]
pub static FLANNEL_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);

/// `flannel_common::MAP_CONFIG`: this node (one entry, key 0).
#[map(name = "FLANNEL_CONFIG")]
pub static FLANNEL_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// `flannel_common::MAP_UDP_CONFIG`: this node for the udp programs (one entry, key 0).
#[map(name = "FLANNEL_UDP_CONFIG")]
pub static FLANNEL_UDP_CONFIG: Array<UdpConfig> = Array::with_max_entries(1, 0);

/// `flannel_common::MAP_HOSTGW_CONFIG`: this node for the host-gw programs (key 0).
#[map(name = "FLANNEL_HOSTGW_CONFIG")]
pub static FLANNEL_HOSTGW_CONFIG: Array<HostGwConfig> = Array::with_max_entries(1, 0);

/// `flannel_common::MAP_PEERS`: peer subnet (LPM, network-order `u32`) → peer.
#[map(name = "FLANNEL_PEERS")]
pub static FLANNEL_PEERS: LpmTrie<u32, Peer> = LpmTrie::with_max_entries(MAX_PEERS, 0);

/// `flannel_common::MAP_SOURCES`: peer PublicIP → the subnet it may send from.
#[map(name = "FLANNEL_SOURCES")]
pub static FLANNEL_SOURCES: HashMap<SourceKey, PeerSource> =
    HashMap::with_max_entries(MAX_PEERS, 0);

/// `flannel_common::MAP_PEER_COUNTERS`: per-CPU traffic per peer slot.
#[map(name = "FLANNEL_PEER_COUNTERS")]
pub static FLANNEL_PEER_COUNTERS: PerCpuArray<PeerCounters> =
    PerCpuArray::with_max_entries(MAX_PEERS, 0);

/// `flannel_common::MAP_REASONS`: per-CPU packet count per `reason`.
#[map(name = "FLANNEL_REASONS")]
pub static FLANNEL_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// The node configuration in `map`, or `None` before the agent wrote it: array maps start
/// zeroed, and a zero PublicIP means "not configured".
#[inline(always)]
pub fn configured<T: Copy>(map: &Array<T>, public_ip_be: impl Fn(&T) -> u32) -> Option<T> {
    let cfg = map.get(0)?;
    if public_ip_be(cfg) == 0 {
        return None;
    }
    Some(*cfg)
}

/// The peer whose subnet holds `addr` (an IPv4 address as it is on the wire).
#[inline(always)]
pub fn peer_for(addr: [u8; 4]) -> Option<Peer> {
    FLANNEL_PEERS
        .get(Key::new(32, u32::from_ne_bytes(addr)))
        .copied()
}
