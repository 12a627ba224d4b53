//! Leases in etcd: flannel's subnet manager.
//!
//! - [`key`] and [`lease`]: the etcd schema (subnet keys and `LeaseAttrs` JSON);
//! - [`alloc`]: choosing a subnet, pure;
//! - [`watch`]: the peer set, turning snapshots and watch events into peer events, pure;
//! - [`etcd`]: the only etcd-client importer;
//! - [`manager`]: acquire, renew and keep our lease, and feed the peer watch.

pub mod alloc;
pub mod etcd;
pub mod key;
pub mod lease;
pub mod manager;
pub mod watch;

pub use key::SubnetKey;
pub use lease::{BackendAttrs, LeaseAttrs, VxlanAttrs};

/// flannel's lease TTL (`subnetTTL`).
pub const LEASE_TTL_SECS: i64 = 24 * 60 * 60;

/// One subnet key in etcd, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is attached to; 0 means a reservation (no TTL).
    pub etcd_lease: i64,
    /// The key's mod revision, for compare-and-swap.
    pub mod_revision: i64,
}

impl Lease {
    pub fn subnet(&self) -> ipnet::Ipv4Net {
        self.key.ipv4
    }

    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }
}

/// A change in the set of peers, for the backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    Added(Lease),
    Changed { old: Lease, new: Lease },
    Removed(Lease),
}
