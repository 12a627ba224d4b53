//! Dataplanes: how peer leases become forwarding state in the kernel.
//!
//! [`ebpf`] is the only module that imports aya: the VXLAN fast path (TC programs on
//! `flannel.<VNI>` and the underlay, pinned maps and links). [`sys`] holds its few libc
//! calls (bpffs, interface names).

pub mod ebpf;
mod sys;

pub use ebpf::{
    DEFAULT_PIN_DIR, EbpfError, FastPathConfig, PeerEntry, VxlanFastPath, ebpf_object, probe,
};
pub use flannel_common::maps::PeerCounters;
/// The subnet type of the fast path API ([`PeerEntry::subnet`], [`FastPathConfig::subnet`]).
pub use ipnet::Ipv4Net;
