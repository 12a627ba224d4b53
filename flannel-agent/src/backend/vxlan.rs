//! flannel's vxlan backend, on the kernel's vxlan device.
//!
//! Kernel state, exactly as Go flanneld programs it (flannel `pkg/backend/vxlan`):
//! - the device `flannel.<VNI>`: vxlan id VNI, dstport `Port`, nolearning, local =
//!   PublicIP, dev = the external interface, MTU = underlay MTU − 50, address = our
//!   subnet's `.0/32`. Its MAC comes from the state file and is set at creation, so the
//!   device never comes up with another one;
//! - per peer: `neigh <subnet .0> lladdr <VtepMAC> nud permanent`, then
//!   `fdb <VtepMAC> dst <PublicIP> self permanent`, then
//!   `route <subnet> via <subnet .0> onlink`, the route last so the kernel never ARPs;
//! - with `DirectRouting`, a peer whose PublicIP is on-link gets only
//!   `route <subnet> via <PublicIP>`.
//!
//! Structure: [`VxlanBackend`] keeps the desired peer set ([`PeerTable`], one
//! [`VxlanPeer`] per subnet, with the DirectRouting decision already made) and applies
//! every change to each of its [`PeerPath`]s: add/change ([`PeerPath::upsert`]), remove
//! ([`PeerPath::remove`]) and full sync ([`PeerPath::sync`], at every snapshot, periodic
//! check and device recreation). The kernel ([`KernelPeers`]) is always one of them, as
//! the interop reference and the fallback; a fast path is another variant fed the very
//! same calls.
//!
//! Device deletion is noticed through link notifications (`RTNLGRP_LINK`, see
//! [`crate::netlink::LinkMonitor`]): the device is recreated and every peer replayed at
//! once. The periodic check ([`super::CHECK_PERIOD`]) covers dropped notifications.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use super::fastpath::{EbpfPeers, FastPathSpec};

use super::{
    BackendError, Cause, apply,
    reconcile::{self, Scope, State},
};
use crate::{
    config::VxlanConfig,
    iface::ExternalInterface,
    mac::MacAddr,
    netlink::{
        FdbEntry, IfIndex, LinkEvent, LinkKind, Neigh, Netlink, NetlinkError, Route, VxlanSpec,
    },
    state,
    subnet::{BackendAttrs, Lease, PeerEvent, VxlanAttrs},
};

/// One peer as this host forwards to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanPeer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    pub path: PeerRoute,
}

/// How traffic for a peer leaves this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRoute {
    /// Encapsulated through the vxlan device.
    Overlay,
    /// DirectRouting: the peer is on-link, plain routing via its PublicIP out of `dev`.
    Direct { dev: IfIndex },
}

/// The desired peer set, keyed by subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    peers: BTreeMap<Ipv4Net, VxlanPeer>,
}

impl PeerTable {
    pub fn get(&self, subnet: &Ipv4Net) -> Option<&VxlanPeer> {
        self.peers.get(subnet)
    }

    /// Inserts or replaces; returns the previous entry.
    pub fn insert(&mut self, peer: VxlanPeer) -> Option<VxlanPeer> {
        self.peers.insert(peer.subnet, peer)
    }

    pub fn remove(&mut self, subnet: &Ipv4Net) -> Option<VxlanPeer> {
        self.peers.remove(subnet)
    }

    pub fn iter(&self) -> impl Iterator<Item = &VxlanPeer> {
        self.peers.values()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// A consumer of the desired peer set. Every variant gets the same calls, in the same
/// order (removals in reverse order, so the fast path lets go of a peer before the
/// kernel entries it falls back to disappear).
#[derive(Debug)]
pub enum PeerPath {
    /// flannel.1's neighbour, FDB and route entries.
    Kernel(KernelPeers),
    /// The eBPF fast path's maps, on top of the kernel entries.
    Ebpf(Box<EbpfPeers>),
}

impl PeerPath {
    /// The vxlan device exists with index `dev` (created, recreated or adopted).
    pub fn device_changed(
        &mut self,
        dev: IfIndex,
        own: Option<Ipv4Net>,
        peers: &PeerTable,
        synced: bool,
    ) -> Result<(), BackendError> {
        match self {
            Self::Kernel(k) => {
                k.vxlan_dev = dev;
                Ok(())
            }
            Self::Ebpf(e) => e.device_changed(dev, own, peers, synced),
        }
    }

    /// A peer was added (`old` is `None`) or changed.
    pub async fn upsert(
        &mut self,
        nl: &Netlink,
        old: Option<&VxlanPeer>,
        new: &VxlanPeer,
    ) -> Result<(), BackendError> {
        match self {
            Self::Kernel(k) => k.upsert(nl, old, new).await,
            Self::Ebpf(e) => e.upsert(new),
        }
    }

    /// A peer is gone.
    pub async fn remove(&mut self, nl: &Netlink, old: &VxlanPeer) -> Result<(), BackendError> {
        match self {
            Self::Kernel(k) => k.remove(nl, old).await,
            Self::Ebpf(e) => e.remove(old),
        }
    }

    /// Converge on exactly `peers`: install what is missing, remove everything else.
    pub(crate) async fn sync(
        &mut self,
        nl: &Netlink,
        peers: &PeerTable,
        cause: Cause,
    ) -> Result<(), BackendError> {
        match self {
            Self::Kernel(k) => k.sync(nl, peers, cause).await,
            Self::Ebpf(e) => e.sync(peers),
        }
    }
}

/// The eBPF fast path requested for the vxlan backend.
#[derive(Debug, Clone, Default)]
pub struct FastPathChoice {
    /// `--dataplane ebpf`: failing to attach is an error, not a fallback.
    pub required: bool,
    /// Where to pin; `None` for the default under /sys/fs/bpf.
    pub pin_dir: Option<std::path::PathBuf>,
}

/// The kernel's per-peer entries on the vxlan device (and DirectRouting routes).
#[derive(Debug)]
pub struct KernelPeers {
    vxlan_dev: IfIndex,
    ext_dev: IfIndex,
    network: Ipv4Net,
    direct_routing: bool,
}

impl KernelPeers {
    /// What flanneld owns in the kernel: entries on the vxlan device, plus gateway
    /// routes on the external interface when DirectRouting may have installed them.
    pub fn scope(&self) -> Scope {
        Scope {
            network: self.network,
            vxlan_dev: Some(self.vxlan_dev),
            ext_dev: self.direct_routing.then_some(self.ext_dev),
        }
    }

    /// The kernel entries for one peer.
    pub fn entries(&self, p: &VxlanPeer) -> State {
        let dev = self.vxlan_dev;
        match p.path {
            PeerRoute::Overlay => State {
                neighs: vec![Neigh {
                    dev,
                    ip: p.subnet.network(),
                    mac: Some(p.vtep_mac),
                    permanent: true,
                }],
                fdb: vec![FdbEntry {
                    dev,
                    mac: p.vtep_mac,
                    dst: Some(p.public_ip),
                    permanent: true,
                }],
                routes: vec![Route::via(p.subnet, p.subnet.network(), dev, true)],
            },
            PeerRoute::Direct { dev } => State {
                routes: vec![Route::via(p.subnet, p.public_ip, dev, false)],
                ..State::default()
            },
        }
    }

    async fn upsert(
        &mut self,
        nl: &Netlink,
        old: Option<&VxlanPeer>,
        new: &VxlanPeer,
    ) -> Result<(), BackendError> {
        let before = old.map(|o| self.entries(o)).unwrap_or_default();
        let ops = reconcile::diff(&self.entries(new), &before, &self.scope());
        apply(nl, &ops, Cause::Event).await
    }

    async fn remove(&mut self, nl: &Netlink, old: &VxlanPeer) -> Result<(), BackendError> {
        let ops = reconcile::diff(&State::default(), &self.entries(old), &self.scope());
        apply(nl, &ops, Cause::Event).await
    }

    async fn sync(
        &mut self,
        nl: &Netlink,
        peers: &PeerTable,
        cause: Cause,
    ) -> Result<(), BackendError> {
        let mut desired = State::default();
        for p in peers.iter() {
            desired.extend(self.entries(p));
        }
        let observed = State {
            routes: nl.routes_v4_within(self.network).await?,
            neighs: nl.neighbours_v4(self.vxlan_dev).await?,
            fdb: nl.fdb_entries(self.vxlan_dev).await?,
        };
        let ops = reconcile::diff(&desired, &observed, &self.scope());
        debug!(
            peers = peers.len(),
            changes = ops.len(),
            "vxlan kernel state reconciled"
        );
        apply(nl, &ops, cause).await
    }
}

/// Why an existing link of our name cannot be kept, like flannel's
/// `vxlanLinksIncompat` (type, VNI, vtep device, local address, group, l2miss, port,
/// gbp; MTU and learning are not compared). `None`: compatible.
pub fn incompatibility(spec: &VxlanSpec, kind: &LinkKind) -> Option<String> {
    let info = match kind {
        LinkKind::Vxlan(info) => info,
        LinkKind::Other(k) => return Some(format!("it is a {k} link, not vxlan")),
        LinkKind::Unknown => return Some("it is not a vxlan link".to_owned()),
    };
    let mut diffs = Vec::new();
    if info.vni != Some(spec.vni) {
        diffs.push(format!("vni {:?} != {}", info.vni, spec.vni));
    }
    if info.dev != Some(spec.dev) {
        diffs.push(format!("dev index {:?} != {}", info.dev, spec.dev));
    }
    if info.local != Some(spec.local) {
        diffs.push(format!("local {:?} != {}", info.local, spec.local));
    }
    if info.group.is_some_and(|g| !g.is_unspecified()) {
        diffs.push(format!("group {:?} is set", info.group));
    }
    if info.l2miss {
        diffs.push("l2miss is set".to_owned());
    }
    if info.port != Some(spec.port) {
        diffs.push(format!("dstport {:?} != {}", info.port, spec.port));
    }
    if info.gbp != spec.gbp {
        diffs.push(format!("gbp {} != {}", info.gbp, spec.gbp));
    }
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

/// flannel's vxlan backend.
pub struct VxlanBackend {
    spec: VxlanSpec,
    direct_routing: bool,
    /// Our subnet, once leased: the device address is its `.0/32`.
    own: Option<Ipv4Net>,
    /// The device's current index, once created.
    device: Option<IfIndex>,
    peers: PeerTable,
    /// A snapshot has arrived. Until then the peer set is partial, and a full sync
    /// would delete entries of peers not yet heard of (a restart must not flush).
    synced: bool,
    paths: Vec<PeerPath>,
}

impl VxlanBackend {
    /// Validates and prepares; loads (or creates) the persistent VTEP MAC.
    pub fn new(
        cfg: &VxlanConfig,
        ext: &ExternalInterface,
        network: Ipv4Net,
        state_dir: &Path,
        fast_path: Option<FastPathChoice>,
    ) -> Result<Self, BackendError> {
        use flannel_common::consts::VXLAN_OVERHEAD;
        let name = format!("flannel.{}", cfg.vni);
        let mac = state::load_or_create_vtep_mac(state_dir, &name)?;
        let underlay = cfg.mtu.unwrap_or(ext.mtu);
        let spec = VxlanSpec {
            name,
            vni: cfg.vni,
            port: cfg.port,
            local: ext.public_ip,
            dev: ext.ifindex,
            learning: cfg.learning,
            gbp: cfg.gbp,
            mtu: underlay.saturating_sub(VXLAN_OVERHEAD),
            mac,
        };
        let kernel = KernelPeers {
            vxlan_dev: 0,
            ext_dev: ext.ifindex,
            network,
            direct_routing: cfg.direct_routing,
        };
        let mut paths = vec![PeerPath::Kernel(kernel)];
        if let Some(choice) = fast_path {
            let mut fp = FastPathSpec::new(ext, cfg.vni, cfg.port, mac);
            if let Some(dir) = choice.pin_dir {
                fp.pin_dir = dir;
            }
            paths.push(PeerPath::Ebpf(Box::new(EbpfPeers::new(
                fp,
                choice.required,
            ))));
        }
        Ok(Self {
            spec,
            direct_routing: cfg.direct_routing,
            own: None,
            device: None,
            peers: PeerTable::default(),
            synced: false,
            paths,
        })
    }

    pub fn lease_attrs(&self) -> BackendAttrs {
        BackendAttrs::Vxlan(VxlanAttrs {
            vni: self.spec.vni,
            vtep_mac: self.spec.mac,
        })
    }

    pub fn mtu(&self) -> u32 {
        self.spec.mtu
    }

    /// The device name, `flannel.<VNI>`.
    pub fn device_name(&self) -> &str {
        &self.spec.name
    }

    /// The desired peer set.
    pub fn peer_table(&self) -> &PeerTable {
        &self.peers
    }

    /// The eBPF path, when one was configured (active or fallen back).
    pub fn fast_path(&self) -> Option<&EbpfPeers> {
        self.paths.iter().find_map(|p| match p {
            PeerPath::Ebpf(e) => Some(&**e),
            PeerPath::Kernel(_) => None,
        })
    }

    /// Creates (or adopts) the device and gives it our subnet's address.
    pub async fn setup(&mut self, nl: &Netlink, own: Ipv4Net) -> Result<(), BackendError> {
        self.own = Some(own);
        self.ensure_device(nl).await?;
        Ok(())
    }

    /// Our subnet changed: move the device address.
    pub async fn own_lease(&mut self, nl: &Netlink, own: Ipv4Net) -> Result<(), BackendError> {
        self.own = Some(own);
        self.ensure_device(nl).await?;
        Ok(())
    }

    /// Makes the device exist, compatible, with our MAC, MTU and address, up. Returns
    /// true when it was (re)created, so the caller replays the peers.
    async fn ensure_device(&mut self, nl: &Netlink) -> Result<bool, BackendError> {
        let spec = &self.spec;
        let mut created = false;
        let existing = match nl.link_details(&spec.name).await? {
            Some((link, kind)) => match incompatibility(spec, &kind) {
                None => Some(link),
                Some(why) => {
                    warn!(device = %spec.name, reason = %why, "existing device is incompatible, recreating it");
                    nl.delete_link(link.index).await?;
                    None
                }
            },
            None => None,
        };
        let link = match existing {
            Some(link) => {
                if link.mac != Some(spec.mac) {
                    info!(device = %spec.name, mac = %spec.mac, "setting the VTEP MAC on the existing device");
                    nl.set_link_mac(link.index, spec.mac).await?;
                }
                if link.mtu != spec.mtu {
                    info!(device = %spec.name, mtu = spec.mtu, "setting the MTU on the existing device");
                    nl.set_link_mtu(link.index, spec.mtu).await?;
                }
                link
            }
            None => {
                match nl.create_vxlan(spec).await {
                    // Someone made it between our look and our create: adopt it next time.
                    Ok(()) | Err(NetlinkError::Exists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                created = true;
                let link = nl.link_by_name(&spec.name).await?.ok_or_else(|| {
                    BackendError::DeviceVanished {
                        name: spec.name.clone(),
                    }
                })?;
                info!(device = %spec.name, index = link.index, vni = spec.vni, port = spec.port, local = %spec.local, mtu = spec.mtu, mac = %spec.mac, "created the vxlan device");
                link
            }
        };
        if let Some(own) = self.own {
            self.ensure_address(nl, link.index, own).await?;
        }
        if !link.up {
            nl.set_link_up(link.index, true).await?;
        }
        // flannel #1795: some systems rewrite the MAC as the link comes up.
        if let Some(now) = nl.link_by_index(link.index).await?
            && now.mac != Some(self.spec.mac)
        {
            warn!(device = %self.spec.name, found = ?now.mac.map(|m| m.to_string()), want = %self.spec.mac, "the device MAC changed under us, setting it back");
            nl.set_link_mac(link.index, self.spec.mac).await?;
        }
        let changed = self.device != Some(link.index);
        self.device = Some(link.index);
        for p in &mut self.paths {
            p.device_changed(link.index, self.own, &self.peers, self.synced)?;
        }
        Ok(created || changed)
    }

    /// Exactly one IPv4 address on the device: our subnet's `.0/32`.
    async fn ensure_address(
        &self,
        nl: &Netlink,
        index: IfIndex,
        own: Ipv4Net,
    ) -> Result<(), BackendError> {
        let want = own.network();
        let addrs: Vec<_> = nl
            .addresses_v4()
            .await?
            .into_iter()
            .filter(|a| a.ifindex == index)
            .collect();
        if !addrs.iter().any(|a| a.ip == want && a.prefix_len == 32) {
            nl.replace_address(index, want, 32).await?;
            info!(device = %self.spec.name, address = %format!("{want}/32"), "set the device address");
        }
        for a in addrs
            .iter()
            .filter(|a| !(a.ip == want && a.prefix_len == 32))
        {
            info!(device = %self.spec.name, address = %format!("{}/{}", a.ip, a.prefix_len), "removing a stale address from the device");
            nl.delete_address(a).await?;
        }
        Ok(())
    }

    /// The desired state for a lease, or `None` when it is not a vxlan peer.
    async fn peer_from_lease(&self, nl: &Netlink, l: &Lease) -> Option<VxlanPeer> {
        let BackendAttrs::Vxlan(v) = &l.attrs.backend else {
            // flannel ignores leases of another backend type.
            info!(subnet = %l.subnet(), backend = l.attrs.backend.type_name().unwrap_or("udp"), "ignoring a peer with another backend type");
            return None;
        };
        let public_ip = l.attrs.public_ip;
        let mut path = PeerRoute::Overlay;
        if self.direct_routing {
            // flannel's ip.DirectRouting: the route to the peer has no gateway.
            match nl.route_get_v4(public_ip).await {
                Ok(Some(r)) if r.gateway.is_none() => path = PeerRoute::Direct { dev: r.ifindex },
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, peer = %public_ip, "route lookup for DirectRouting failed, using the overlay")
                }
            }
        }
        Some(VxlanPeer {
            subnet: l.subnet(),
            public_ip,
            vtep_mac: v.vtep_mac,
            path,
        })
    }

    /// Incremental changes.
    pub async fn peers(&mut self, nl: &Netlink, events: &[PeerEvent]) -> Result<(), BackendError> {
        let mut result = Ok(());
        for ev in events {
            let r = match ev {
                PeerEvent::Added(l) | PeerEvent::Changed { new: l, .. } => {
                    match self.peer_from_lease(nl, l).await {
                        Some(new) => self.upsert(nl, new).await,
                        None => self.remove(nl, l.subnet()).await,
                    }
                }
                PeerEvent::Removed(l) => self.remove(nl, l.subnet()).await,
            };
            keep_first(&mut result, r);
        }
        result
    }

    async fn upsert(&mut self, nl: &Netlink, new: VxlanPeer) -> Result<(), BackendError> {
        let old = self.peers.insert(new);
        if old == Some(new) {
            return Ok(());
        }
        if let Some(o) = &old
            && (o.vtep_mac != new.vtep_mac || o.public_ip != new.public_ip)
        {
            info!(subnet = %new.subnet, old_mac = %o.vtep_mac, new_mac = %new.vtep_mac, old_ip = %o.public_ip, new_ip = %new.public_ip, "peer VTEP changed, updating its entries");
        }
        let mut result = Ok(());
        for p in &mut self.paths {
            keep_first(&mut result, p.upsert(nl, old.as_ref(), &new).await);
        }
        result
    }

    async fn remove(&mut self, nl: &Netlink, subnet: Ipv4Net) -> Result<(), BackendError> {
        let Some(old) = self.peers.remove(&subnet) else {
            return Ok(());
        };
        let mut result = Ok(());
        for p in self.paths.iter_mut().rev() {
            keep_first(&mut result, p.remove(nl, &old).await);
        }
        result
    }

    /// The full peer set: replace the table and reconcile every path against it.
    pub async fn snapshot(&mut self, nl: &Netlink, leases: &[Lease]) -> Result<(), BackendError> {
        let mut table = PeerTable::default();
        for l in leases {
            if let Some(p) = self.peer_from_lease(nl, l).await {
                table.insert(p);
            }
        }
        self.peers = table;
        self.synced = true;
        info!(
            peers = self.peers.len(),
            "reconciling vxlan kernel state with the lease snapshot"
        );
        self.sync(nl, Cause::Sync).await
    }

    async fn sync(&mut self, nl: &Netlink, cause: Cause) -> Result<(), BackendError> {
        let mut result = Ok(());
        for p in &mut self.paths {
            keep_first(&mut result, p.sync(nl, &self.peers, cause).await);
        }
        result
    }

    /// A link notification: our device deleted → recreate it and replay every peer.
    pub async fn link_event(&mut self, nl: &Netlink, ev: &LinkEvent) -> Result<(), BackendError> {
        let ours = match ev {
            LinkEvent::Deleted { index, name } => {
                Some(*index) == self.device || name.as_deref() == Some(self.spec.name.as_str())
            }
            LinkEvent::Overrun => true,
            LinkEvent::Changed { .. } | LinkEvent::Address { .. } => false,
        };
        if !ours {
            return Ok(());
        }
        if matches!(ev, LinkEvent::Deleted { .. }) {
            warn!(device = %self.spec.name, "the vxlan device was deleted, recreating it");
        }
        self.restore(nl, Cause::Sync).await
    }

    /// The periodic check.
    pub async fn check(&mut self, nl: &Netlink) -> Result<(), BackendError> {
        self.restore(nl, Cause::Check).await
    }

    async fn restore(&mut self, nl: &Netlink, cause: Cause) -> Result<(), BackendError> {
        if self.own.is_none() {
            return Ok(());
        }
        let recreated = self.ensure_device(nl).await?;
        if !self.synced {
            // Only the incremental path may write entries before the first snapshot.
            if recreated {
                let peers: Vec<VxlanPeer> = self.peers.iter().copied().collect();
                let mut result = Ok(());
                for p in &peers {
                    for path in &mut self.paths {
                        keep_first(&mut result, path.upsert(nl, None, p).await);
                    }
                }
                return result;
            }
            return Ok(());
        }
        if recreated {
            info!(device = %self.spec.name, peers = self.peers.len(), "vxlan device recreated, replaying peers");
            return self.sync(nl, Cause::Sync).await;
        }
        self.sync(nl, cause).await
    }
}

/// Every path gets every call even when one fails; the first error is reported.
fn keep_first(acc: &mut Result<(), BackendError>, r: Result<(), BackendError>) {
    if let Err(e) = r
        && acc.is_ok()
    {
        *acc = Err(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::VxlanInfo;

    fn spec() -> VxlanSpec {
        VxlanSpec {
            name: "flannel.1".into(),
            vni: 1,
            port: 8472,
            local: Ipv4Addr::new(192, 168, 0, 2),
            dev: 2,
            learning: false,
            gbp: false,
            mtu: 1450,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
        }
    }

    fn info() -> VxlanInfo {
        VxlanInfo {
            vni: Some(1),
            dev: Some(2),
            local: Some(Ipv4Addr::new(192, 168, 0, 2)),
            group: None,
            port: Some(8472),
            learning: false,
            gbp: false,
            l2miss: false,
        }
    }

    #[test]
    fn compatibility_like_flannel() {
        let s = spec();
        assert_eq!(incompatibility(&s, &LinkKind::Vxlan(info())), None);
        // MTU and learning are not compared.
        let learning = VxlanInfo {
            learning: true,
            ..info()
        };
        assert_eq!(incompatibility(&s, &LinkKind::Vxlan(learning)), None);
        for (bad, what) in [
            (
                VxlanInfo {
                    vni: Some(2),
                    ..info()
                },
                "vni",
            ),
            (
                VxlanInfo {
                    dev: Some(3),
                    ..info()
                },
                "dev index",
            ),
            (
                VxlanInfo {
                    local: Some(Ipv4Addr::new(10, 0, 0, 1)),
                    ..info()
                },
                "local",
            ),
            (
                VxlanInfo {
                    port: Some(4789),
                    ..info()
                },
                "dstport",
            ),
            (
                VxlanInfo {
                    gbp: true,
                    ..info()
                },
                "gbp",
            ),
            (
                VxlanInfo {
                    l2miss: true,
                    ..info()
                },
                "l2miss",
            ),
            (
                VxlanInfo {
                    group: Some(Ipv4Addr::new(239, 1, 1, 1)),
                    ..info()
                },
                "group",
            ),
        ] {
            let why = incompatibility(&s, &LinkKind::Vxlan(bad)).expect(what);
            assert!(why.contains(what), "{why}");
        }
        assert!(
            incompatibility(&s, &LinkKind::Other("bridge".into()))
                .unwrap()
                .contains("bridge")
        );
        assert!(incompatibility(&s, &LinkKind::Unknown).is_some());
    }

    #[test]
    fn kernel_entries_per_peer() {
        let k = KernelPeers {
            vxlan_dev: 9,
            ext_dev: 2,
            network: "10.5.0.0/16".parse().unwrap(),
            direct_routing: false,
        };
        let subnet: Ipv4Net = "10.5.3.0/24".parse().unwrap();
        let mut p = VxlanPeer {
            subnet,
            public_ip: Ipv4Addr::new(192, 168, 0, 3),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, 3]),
            path: PeerRoute::Overlay,
        };
        let s = k.entries(&p);
        assert_eq!(
            s.routes,
            vec![Route::via(subnet, Ipv4Addr::new(10, 5, 3, 0), 9, true)]
        );
        assert_eq!(
            (s.neighs[0].ip, s.neighs[0].mac, s.neighs[0].dev),
            (Ipv4Addr::new(10, 5, 3, 0), Some(p.vtep_mac), 9)
        );
        assert_eq!(
            (s.fdb[0].mac, s.fdb[0].dst),
            (p.vtep_mac, Some(p.public_ip))
        );
        p.path = PeerRoute::Direct { dev: 2 };
        let s = k.entries(&p);
        assert_eq!(s.routes, vec![Route::via(subnet, p.public_ip, 2, false)]);
        assert!(s.neighs.is_empty() && s.fdb.is_empty());
        assert_eq!(
            k.scope().ext_dev,
            None,
            "ext routes are not ours without DirectRouting"
        );
    }
}
