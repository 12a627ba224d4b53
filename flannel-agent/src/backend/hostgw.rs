//! flannel's host-gw backend: `route <peer subnet> via <peer PublicIP> dev <ext>`.
//!
//! Requires L2 adjacency and no NAT (PublicIP must be the interface address; checked in
//! [`HostGwBackend::new`] with flannel's message). Routes into the Network through a
//! gateway on the external interface are ours: a full sync removes those no peer wants,
//! and the periodic check ([`super::CHECK_PERIOD`], flannel's `routeCheck`) re-adds
//! deleted ones, logging "route recovered".

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use tracing::info;

use super::{
    BackendError, Cause, apply,
    reconcile::{self, Scope, State},
};
use crate::{
    iface::ExternalInterface,
    netlink::{IfIndex, Netlink, Route},
    subnet::{BackendAttrs, Lease, PeerEvent},
};

pub struct HostGwBackend {
    ext_dev: IfIndex,
    mtu: u32,
    network: Ipv4Net,
    /// Desired routes: peer subnet → PublicIP.
    peers: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// A snapshot has arrived. Until then the peer set is partial, and a full sync
    /// would delete routes of peers not yet heard of.
    synced: bool,
}

impl HostGwBackend {
    /// The peers routed to, for `flanneld status` (kernel routes carry no counters).
    pub fn peer_status(&self) -> Vec<crate::host::status::PeerStatus> {
        self.peers
            .iter()
            .map(|(subnet, ip)| crate::host::status::PeerStatus {
                subnet: subnet.to_string(),
                public_ip: ip.to_string(),
                ..Default::default()
            })
            .collect()
    }

    pub fn new(ext: &ExternalInterface, network: Ipv4Net) -> Result<Self, BackendError> {
        if ext.public_ip != ext.iface_addr {
            return Err(BackendError::HostGwNat);
        }
        Ok(Self {
            ext_dev: ext.ifindex,
            mtu: ext.mtu,
            network,
            peers: BTreeMap::new(),
            synced: false,
        })
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    fn scope(&self) -> Scope {
        Scope {
            network: self.network,
            vxlan_dev: None,
            ext_dev: Some(self.ext_dev),
        }
    }

    fn route(&self, subnet: Ipv4Net, gw: Ipv4Addr) -> Route {
        Route::via(subnet, gw, self.ext_dev, false)
    }

    fn entries<'a>(&self, peers: impl IntoIterator<Item = (&'a Ipv4Net, &'a Ipv4Addr)>) -> State {
        State {
            routes: peers
                .into_iter()
                .map(|(s, gw)| self.route(*s, *gw))
                .collect(),
            ..State::default()
        }
    }

    fn gateway_of(l: &Lease) -> Option<Ipv4Addr> {
        if l.attrs.backend == BackendAttrs::HostGw {
            Some(l.attrs.public_ip)
        } else {
            info!(subnet = %l.subnet(), backend = l.attrs.backend.type_name().unwrap_or("udp"), "ignoring a peer with another backend type");
            None
        }
    }

    pub async fn peers(&mut self, nl: &Netlink, events: &[PeerEvent]) -> Result<(), BackendError> {
        let mut ops = Vec::new();
        for ev in events {
            let (subnet, new) = match ev {
                PeerEvent::Added(l) | PeerEvent::Changed { new: l, .. } => {
                    (l.subnet(), Self::gateway_of(l))
                }
                PeerEvent::Removed(l) => (l.subnet(), None),
            };
            let old = match new {
                Some(gw) => self.peers.insert(subnet, gw),
                None => self.peers.remove(&subnet),
            };
            let desired = self.entries(new.as_ref().map(|gw| (&subnet, gw)));
            let before = self.entries(old.as_ref().map(|gw| (&subnet, gw)));
            ops.extend(reconcile::diff(&desired, &before, &self.scope()));
        }
        apply(nl, &ops, Cause::Event).await
    }

    pub async fn snapshot(&mut self, nl: &Netlink, leases: &[Lease]) -> Result<(), BackendError> {
        self.peers = leases
            .iter()
            .filter_map(|l| Some((l.subnet(), Self::gateway_of(l)?)))
            .collect();
        self.synced = true;
        info!(
            peers = self.peers.len(),
            "reconciling host-gw routes with the lease snapshot"
        );
        self.sync(nl, Cause::Sync).await
    }

    pub async fn check(&mut self, nl: &Netlink) -> Result<(), BackendError> {
        if !self.synced {
            return Ok(());
        }
        self.sync(nl, Cause::Check).await
    }

    async fn sync(&self, nl: &Netlink, cause: Cause) -> Result<(), BackendError> {
        let desired = self.entries(&self.peers);
        let observed = State {
            routes: nl.routes_v4_within(self.network).await?,
            ..State::default()
        };
        let ops = reconcile::diff(&desired, &observed, &self.scope());
        apply(nl, &ops, cause).await
    }
}
