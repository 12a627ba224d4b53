//! Dataplanes: how peer leases become forwarding state in the kernel.
//!
//! [`ebpf`], [`udp`], [`hostgw`] and `migrate` are the only modules that import aya: the
//! VXLAN fast path (TC programs on `flannel.<VNI>` and the underlay, pinned maps and
//! links), the udp and host-gw backends' fast paths, which share its maps and pinning
//! rules, and the copy of pinned maps from an older map layout that they do on start.
//! [`sys`] holds their few libc calls (bpffs, interface names).
//!
//! How the vxlan backend uses the fast path (`--dataplane ebpf`, or `auto` when
//! [`probe`] succeeds):
//! 1. Create `flannel.<VNI>` and all per-peer kernel state exactly as without eBPF: the
//!    kernel path stays the fallback for everything the programs pass on.
//! 2. Once `flannel.<VNI>` exists and is up, [`VxlanFastPath::attach`] from a thread in
//!    the node's network namespace, with `vxlan_ifindex` = `flannel.<VNI>`,
//!    `underlay_ifindex`/`underlay_mtu` = the external interface, our PublicIP, VNI,
//!    `Port`, VtepMAC and lease subnet. It adopts what a previous run pinned.
//! 3. Right after, [`VxlanFastPath::sync_peers`] with the full peer set (this also turns
//!    on dropping VXLAN from unknown sources), then [`VxlanFastPath::upsert_peer`] /
//!    [`VxlanFastPath::remove_peer`] per lease event, after the kernel entries are in
//!    place (added) or before they are removed (removed). Resyncs call `sync_peers`.
//! 4. If `flannel.<VNI>` or the external interface is recreated (new ifindex), attach
//!    again: stale pinned links are detected and replaced.
//! 5. On exit, just drop it: the programs keep forwarding with the pinned maps.

pub mod ebpf;
pub mod hostgw;
mod migrate;
mod pinned;
mod sys;
pub mod tun;
pub mod udp;

pub use ebpf::{
    DEFAULT_PIN_DIR, EbpfError, FastPathConfig, PeerEntry, VxlanFastPath, ebpf_object, probe,
};
pub use flannel_common::maps::PeerCounters;
pub use hostgw::{HostGwFastPath, HostGwFastPathConfig, HostGwPeerEntry};
/// The subnet type of the fast path API ([`PeerEntry::subnet`], [`FastPathConfig::subnet`]).
pub use ipnet::Ipv4Net;
pub use pinned::MaclessPeer;
pub use udp::{UdpFastPath, UdpFastPathConfig, UdpPeerEntry};
