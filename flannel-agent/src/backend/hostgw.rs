//! flannel's host-gw backend: `route <peer subnet> via <peer PublicIP> dev <ext>`.
//!
//! Requires L2 adjacency and no NAT (PublicIP must be the interface address; checked in
//! [`HostGwBackend::new`] with flannel's message). Routes into the Network through a
//! gateway on the external interface are ours: a full sync removes those no peer wants,
//! and the periodic check ([`super::CHECK_PERIOD`], flannel's `routeCheck`) re-adds
//! deleted ones, logging "route recovered".
//!
//! With `--dataplane ebpf` ([`HostGwBackend::with_ebpf`]) the eBPF forwarder
//! (`dataplane::hostgw`) runs next to the routes: attached to the underlay at setup, and
//! to every pod-facing device (one holding an address inside our lease subnet, such as
//! Docker's or the CNI plugin's bridge) as such devices come and go, found from address
//! notifications and the periodic check. Its peer map follows the routes: written after
//! a route is added, cleared before a route is removed, so what it passes to the kernel
//! always finds the route.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use tracing::info;

use super::{
    BackendError, Cause, apply,
    fastpath::verdict_counts,
    reconcile::{self, Scope, State},
};
use crate::{
    dataplane::{HostGwFastPath, HostGwFastPathConfig, HostGwPeerEntry},
    host::status::{PeerStatus, VerdictCount},
    iface::ExternalInterface,
    netlink::{IfIndex, LinkEvent, Netlink, Route},
    subnet::{BackendAttrs, Lease, PeerEvent},
};

pub struct HostGwBackend {
    ext_dev: IfIndex,
    public_ip: Ipv4Addr,
    mtu: u32,
    network: Ipv4Net,
    /// Desired routes: peer subnet → PublicIP.
    peers: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// A snapshot has arrived. Until then the peer set is partial, and a full sync
    /// would delete routes of peers not yet heard of.
    synced: bool,
    /// Our lease subnet, once set up.
    own: Option<Ipv4Net>,
    /// `--dataplane ebpf`.
    ebpf: Option<Forwarder>,
}

/// The eBPF forwarder asked for with `--dataplane ebpf`.
struct Forwarder {
    /// Where it pins its maps and links.
    pin_dir: PathBuf,
    /// The fast path, once attached (at setup).
    attached: Option<HostGwFastPath>,
}

impl HostGwBackend {
    /// The peers routed to, for `flanneld status`, with the fast path's counters and
    /// verdicts when it runs (kernel routes carry no counters).
    pub fn status(&self) -> (Vec<PeerStatus>, Vec<VerdictCount>) {
        let fast = self.fast();
        let counts: BTreeMap<Ipv4Net, _> = fast
            .and_then(|f| f.peer_counters().ok())
            .map(|v| v.into_iter().collect())
            .unwrap_or_default();
        let peers = self
            .peers
            .iter()
            .map(|(subnet, ip)| {
                let c = counts.get(subnet).copied().unwrap_or_default();
                PeerStatus {
                    subnet: subnet.to_string(),
                    public_ip: ip.to_string(),
                    tx_packets: c.tx_packets,
                    tx_bytes: c.tx_bytes,
                    rx_packets: c.rx_packets,
                    rx_bytes: c.rx_bytes,
                    ..Default::default()
                }
            })
            .collect();
        let verdicts = fast
            .and_then(|f| f.drop_counters().ok())
            .map(verdict_counts)
            .unwrap_or_default();
        (peers, verdicts)
    }

    pub fn new(ext: &ExternalInterface, network: Ipv4Net) -> Result<Self, BackendError> {
        if ext.public_ip != ext.iface_addr {
            return Err(BackendError::HostGwNat);
        }
        Ok(Self {
            ext_dev: ext.ifindex,
            public_ip: ext.public_ip,
            mtu: ext.mtu,
            network,
            peers: BTreeMap::new(),
            synced: false,
            own: None,
            ebpf: None,
        })
    }

    /// Runs the eBPF forwarder next to the routes, pinned under `pin_dir`.
    pub fn with_ebpf(mut self, pin_dir: &Path) -> Self {
        self.ebpf = Some(Forwarder {
            pin_dir: pin_dir.to_owned(),
            attached: None,
        });
        self
    }

    /// The attached eBPF forwarder, if any.
    pub fn fast(&self) -> Option<&HostGwFastPath> {
        self.ebpf.as_ref().and_then(|f| f.attached.as_ref())
    }

    fn fast_mut(&mut self) -> Option<&mut HostGwFastPath> {
        self.ebpf.as_mut().and_then(|f| f.attached.as_mut())
    }

    /// Whether address notifications matter ([`HostGwBackend::link_event`]).
    pub fn watches_addresses(&self) -> bool {
        self.ebpf.is_some()
    }

    /// Our subnet is `own`: (re-)attaches the eBPF forwarder for it, if asked for.
    pub async fn setup(&mut self, nl: &Netlink, own: Ipv4Net) -> Result<(), BackendError> {
        self.own = Some(own);
        let Some(fwd) = &mut self.ebpf else {
            return Ok(());
        };
        // Drop the old handle first: its pinned maps are adopted by the new attach.
        fwd.attached = None;
        let attached = HostGwFastPath::attach(HostGwFastPathConfig {
            underlay_ifindex: self.ext_dev,
            public_ip: self.public_ip,
            subnet: own,
            pin_dir: fwd.pin_dir.clone(),
        })?;
        info!(underlay_ifindex = self.ext_dev, subnet = %own, pins = %fwd.pin_dir.display(), "eBPF host-gw forwarder attached");
        fwd.attached = Some(attached);
        self.sync_fast_peers()?;
        self.find_pod_devices(nl).await
    }

    /// Points the forwarder at the devices holding an address inside our subnet.
    async fn find_pod_devices(&mut self, nl: &Netlink) -> Result<(), BackendError> {
        let (Some(own), true) = (self.own, self.fast().is_some()) else {
            return Ok(());
        };
        let ext = self.ext_dev;
        let devices: BTreeSet<u32> = nl
            .addresses_v4()
            .await?
            .into_iter()
            .filter(|a| a.ifindex != ext && own.contains(&a.ip))
            .map(|a| a.ifindex)
            .collect();
        let Some(fast) = self.fast_mut() else {
            return Ok(());
        };
        if fast.pod_devices() != &devices {
            fast.set_pod_devices(&devices)?;
            info!(devices = ?devices, "eBPF host-gw forwarder: pod devices");
        }
        Ok(())
    }

    /// Makes the forwarder's peer map equal the routes; before the first snapshot it
    /// only adds, since the peer set is partial.
    fn sync_fast_peers(&mut self) -> Result<(), BackendError> {
        let synced = self.synced;
        let desired: Vec<HostGwPeerEntry> = self
            .peers
            .iter()
            .map(|(subnet, ip)| HostGwPeerEntry {
                subnet: *subnet,
                public_ip: *ip,
            })
            .collect();
        let Some(fast) = self.fast_mut() else {
            return Ok(());
        };
        if synced {
            fast.sync_peers(&desired)?;
        } else {
            for p in &desired {
                fast.upsert_peer(p)?;
            }
        }
        Ok(())
    }

    /// An address or link changed: a pod device may have come or gone.
    pub async fn link_event(&mut self, nl: &Netlink, ev: &LinkEvent) -> Result<(), BackendError> {
        match ev {
            LinkEvent::Address { .. } | LinkEvent::Deleted { .. } | LinkEvent::Overrun => {
                self.find_pod_devices(nl).await
            }
            LinkEvent::Changed { .. } => Ok(()),
        }
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
        let mut gone = Vec::new();
        for ev in events {
            let (subnet, new) = match ev {
                PeerEvent::Added(l) | PeerEvent::Changed { new: l, .. } => {
                    (l.subnet(), Self::gateway_of(l))
                }
                PeerEvent::Removed(l) => (l.subnet(), None),
            };
            let old = match new {
                Some(gw) => self.peers.insert(subnet, gw),
                None => {
                    gone.push(subnet);
                    self.peers.remove(&subnet)
                }
            };
            let desired = self.entries(new.as_ref().map(|gw| (&subnet, gw)));
            let before = self.entries(old.as_ref().map(|gw| (&subnet, gw)));
            ops.extend(reconcile::diff(&desired, &before, &self.scope()));
        }
        // The forwarder lets go of a peer before its route goes, and takes a new one only
        // once the route is there.
        if let Some(fast) = self.fast_mut() {
            for subnet in gone {
                fast.remove_peer(subnet)?;
            }
        }
        let routed = apply(nl, &ops, Cause::Event).await;
        self.sync_fast_peers()?;
        routed
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
        let routed = self.sync(nl, Cause::Sync).await;
        self.sync_fast_peers()?;
        routed
    }

    pub async fn check(&mut self, nl: &Netlink) -> Result<(), BackendError> {
        self.find_pod_devices(nl).await?;
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
