//! flannel's udp backend, and the vxlan backend on the TUN dataplane.
//!
//! Both have the same kernel shape, flannel's udp one (`pkg/backend/udp`):
//! - one layer-3 overlay device: `flannel0` for udp, `flannel.<VNI>` for vxlan on TUN
//!   (the name a kernel vxlan node uses, so a node switching dataplanes replaces the
//!   old device, which would otherwise hold the VXLAN port);
//! - its address is our subnet's `.0/32`, its MTU the underlay's minus the
//!   encapsulation (28 for udp, 50 for vxlan);
//! - one route for the whole Network via the device (no per-peer kernel state: the
//!   dataplane picks the peer by longest match).
//!
//! They differ on the wire ([`Wire`]) and in the lease: udp leases carry no
//! BackendType; vxlan on TUN publishes a normal vxlan lease with our VtepMAC (from the
//! same state file as `flannel.<VNI>`'s), so kernel and eBPF peers send to us as to any
//! vxlan node, and we accept only vxlan peers, as flannel does.
//!
//! The peer set goes to a [`UdpPath`]: today the userspace TUN dataplane; the eBPF udp
//! programs are the second variant, fed the same calls (see [`UdpPath`]).
//!
//! The device lives as long as flanneld (a TUN goes away with its last fd), so there is
//! nothing to adopt at start; a device deleted under us, or a worker that died, is
//! noticed by the periodic check, which starts the dataplane again.

use std::{collections::BTreeMap, net::SocketAddrV4, path::Path};

use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::{BackendError, DataplaneStatus};
use crate::{
    config::{UdpConfig, VxlanConfig},
    dataplane::{
        EbpfError, UdpFastPath, UdpFastPathConfig, UdpPeerEntry,
        tun::{TunConfig, TunDataplane, TunPeer, Wire},
    },
    host::status::{PeerStatus, VerdictCount},
    iface::ExternalInterface,
    netlink::{IfIndex, Netlink, Route, RouteKind},
    state,
    subnet::{BackendAttrs, Lease, PeerEvent, VxlanAttrs},
};

/// What the overlay device and its dataplane are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSpec {
    pub device: String,
    pub wire: Wire,
    /// Our sockets: the external interface address and `Port`.
    pub bind: SocketAddrV4,
    pub mtu: u32,
    pub network: Ipv4Net,
    /// TUN offloads and GRO (on unless benchmarking the plain path).
    pub offload: bool,
}

/// A consumer of the peer set. Each variant is fed the same calls: the device exists
/// ([`UdpPath::start`]), the whole peer set changed ([`UdpPath::set_peers`]), how is
/// it doing ([`UdpPath::healthy`], [`UdpPath::report`]).
///
/// The seam for the eBPF udp programs: add `Ebpf(Box<…>)` here, created in
/// [`super::Backend::new`] when the probe passes. It keeps the same device and route
/// (so it can hand packets to the kernel path and fall back), attaches once
/// [`UdpPath::start`] has the device index, and turns each [`TunPeer`] into a map entry
/// (subnet → PublicIP:Port) in `set_peers`.
#[derive(Debug)]
pub enum UdpPath {
    /// The userspace TUN dataplane; `None` until started.
    Tun(Option<TunDataplane>),
}

impl UdpPath {
    /// Creates the overlay device (if this path owns it) and starts forwarding.
    fn start(&mut self, spec: &UdpSpec) -> Result<(), BackendError> {
        match self {
            Self::Tun(slot) => {
                // The old dataplane (and with it the device) goes first, so the new
                // one gets the name and the port.
                *slot = None;
                *slot = Some(TunDataplane::start(TunConfig {
                    name: spec.device.clone(),
                    wire: spec.wire,
                    bind: spec.bind,
                    port: spec.bind.port(),
                    mtu: spec.mtu,
                    queues: 0,
                    offload: spec.offload,
                })?);
                Ok(())
            }
        }
    }

    fn started(&self) -> bool {
        match self {
            Self::Tun(slot) => slot.is_some(),
        }
    }

    fn healthy(&self) -> bool {
        match self {
            Self::Tun(slot) => slot.as_ref().is_some_and(TunDataplane::healthy),
        }
    }

    fn set_peers(&mut self, own: Option<Ipv4Net>, peers: &[TunPeer]) {
        match self {
            Self::Tun(Some(dp)) => dp.set_peers(own, peers),
            Self::Tun(None) => {}
        }
    }

    fn report(&self, peers: &BTreeMap<Ipv4Net, TunPeer>, st: &mut DataplaneStatus) {
        match self {
            Self::Tun(dp) => {
                st.dataplane = "tun".into();
                let counts: BTreeMap<Ipv4Net, _> = dp
                    .iter()
                    .flat_map(TunDataplane::peer_counts)
                    .map(|(p, c)| (p.subnet, c))
                    .collect();
                st.peers = peers
                    .values()
                    .map(|p| {
                        let c = counts.get(&p.subnet).copied().unwrap_or_default();
                        PeerStatus {
                            subnet: p.subnet.to_string(),
                            public_ip: p.public_ip.to_string(),
                            vtep_mac: p.vtep_mac.map(|m| m.to_string()).unwrap_or_default(),
                            tx_packets: c.tx_packets,
                            tx_bytes: c.tx_bytes,
                            rx_packets: c.rx_packets,
                            rx_bytes: c.rx_bytes,
                        }
                    })
                    .collect();
                st.verdicts = dp
                    .iter()
                    .flat_map(TunDataplane::drops)
                    .map(|(v, packets)| VerdictCount {
                        action: "drop".into(),
                        reason: v.name().into(),
                        packets,
                    })
                    .collect();
            }
        }
    }
}

/// The eBPF udp programs on top of the TUN path: flannel0's TC egress encapsulates,
/// the underlay's TC ingress decapsulates; whatever they pass on (no peer, GSO
/// aggregates, TTL 1, ...) still reaches the TUN dataplane, which stays the fallback.
pub struct UdpEbpf {
    cfg: UdpFastPathConfig,
    /// `--dataplane ebpf`: failures are errors, not a fallback to the TUN alone.
    required: bool,
    fast: Option<UdpFastPath>,
    /// The first full peer set arrived: `sync_peers` may prune (before, only add).
    synced: bool,
    refused: Option<String>,
}

impl std::fmt::Debug for UdpEbpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpEbpf")
            .field("active", &self.fast.is_some())
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl UdpEbpf {
    pub fn new(ext: &ExternalInterface, port: u16, pin_dir: &Path, required: bool) -> Self {
        Self {
            cfg: UdpFastPathConfig {
                tun_ifindex: 0,
                underlay_ifindex: ext.ifindex,
                underlay_mtu: ext.mtu,
                public_ip: ext.public_ip,
                port,
                subnet: Ipv4Net::default(),
                pin_dir: pin_dir.to_owned(),
            },
            required,
            fast: None,
            synced: false,
            refused: None,
        }
    }

    fn fail(&mut self, what: &str, e: EbpfError) -> Result<(), BackendError> {
        self.fast = None;
        if self.required {
            return Err(BackendError::Ebpf(e));
        }
        warn!(error = %e, "{what} failed: the udp backend stays on the TUN dataplane");
        self.refused = Some(e.to_string());
        Ok(())
    }

    /// (Re-)attaches for the device `dev` and our subnet.
    fn attach(&mut self, dev: IfIndex, own: Ipv4Net) -> Result<(), BackendError> {
        if self.refused.is_some() && !self.required {
            return Ok(());
        }
        if self.fast.is_some() && self.cfg.tun_ifindex == dev && self.cfg.subnet == own {
            return Ok(());
        }
        self.fast = None;
        self.cfg.tun_ifindex = dev;
        self.cfg.subnet = own;
        match UdpFastPath::attach(self.cfg.clone()) {
            Ok(f) => {
                info!(tun_ifindex = dev, underlay_ifindex = self.cfg.underlay_ifindex, subnet = %own, "eBPF udp fast path attached");
                self.fast = Some(f);
                Ok(())
            }
            Err(e) => self.fail("attaching the eBPF udp fast path", e),
        }
    }

    fn set_peers(&mut self, peers: &[TunPeer]) -> Result<(), BackendError> {
        let Some(fast) = &mut self.fast else {
            return Ok(());
        };
        let entries: Vec<UdpPeerEntry> = peers
            .iter()
            .map(|p| UdpPeerEntry {
                subnet: p.subnet,
                public_ip: p.public_ip,
            })
            .collect();
        // Before the first full peer set, adopted entries of peers not heard of yet
        // must survive: add only.
        let r = if self.synced {
            fast.sync_peers(&entries)
        } else {
            entries.iter().try_for_each(|e| fast.upsert_peer(e))
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.fail("updating the eBPF udp peers", e),
        }
    }
}

/// flannel's udp backend, or vxlan on the TUN dataplane.
#[derive(Debug)]
pub struct UdpBackend {
    spec: UdpSpec,
    lease: BackendAttrs,
    own: Option<Ipv4Net>,
    /// The device index the address and route were put on.
    device: Option<IfIndex>,
    /// The desired peer set, by subnet.
    peers: BTreeMap<Ipv4Net, TunPeer>,
    path: UdpPath,
    /// The eBPF udp programs, when chosen (udp wire only).
    ebpf: Option<Box<UdpEbpf>>,
}

impl UdpBackend {
    /// flannel's udp backend: `flannel0`, raw IPv4 in UDP on `Port`, MTU − 28.
    pub fn udp(cfg: &UdpConfig, ext: &ExternalInterface, network: Ipv4Net) -> Self {
        use flannel_common::consts::UDP_OVERHEAD;
        Self::new(
            UdpSpec {
                device: "flannel0".into(),
                wire: Wire::Udp,
                bind: SocketAddrV4::new(ext.iface_addr, cfg.port),
                mtu: ext.mtu.saturating_sub(UDP_OVERHEAD),
                network,
                offload: true,
            },
            BackendAttrs::None,
        )
    }

    /// The vxlan backend on TUN: `flannel.<VNI>` as a TUN, VXLAN on `Port`, the VtepMAC
    /// of the state file, MTU = (`MTU` or the underlay's) − 50.
    pub fn vxlan(
        cfg: &VxlanConfig,
        ext: &ExternalInterface,
        network: Ipv4Net,
        state_dir: &Path,
    ) -> Result<Self, BackendError> {
        use flannel_common::consts::VXLAN_OVERHEAD;
        let device = format!("flannel.{}", cfg.vni);
        let mac = state::load_or_create_vtep_mac(state_dir, &device)?;
        if cfg.direct_routing {
            warn!(
                "DirectRouting is not used on the TUN dataplane: every peer goes through the overlay"
            );
        }
        Ok(Self::new(
            UdpSpec {
                device,
                wire: Wire::Vxlan { vni: cfg.vni, mac },
                bind: SocketAddrV4::new(ext.iface_addr, cfg.port),
                mtu: cfg.mtu.unwrap_or(ext.mtu).saturating_sub(VXLAN_OVERHEAD),
                network,
                offload: true,
            },
            BackendAttrs::Vxlan(VxlanAttrs {
                vni: cfg.vni,
                vtep_mac: mac,
            }),
        ))
    }

    fn new(spec: UdpSpec, lease: BackendAttrs) -> Self {
        Self {
            spec,
            lease,
            own: None,
            device: None,
            peers: BTreeMap::new(),
            path: UdpPath::Tun(None),
            ebpf: None,
        }
    }

    /// Puts the eBPF udp programs on top of the TUN path.
    pub fn with_ebpf(mut self, ebpf: UdpEbpf) -> Self {
        self.ebpf = Some(Box::new(ebpf));
        self
    }

    /// Turns the TUN offloads off (the plain read/write path), e.g. for a benchmark.
    pub fn set_offload(&mut self, on: bool) {
        self.spec.offload = on;
    }

    pub fn spec(&self) -> &UdpSpec {
        &self.spec
    }

    pub fn lease_attrs(&self) -> BackendAttrs {
        self.lease.clone()
    }

    pub fn mtu(&self) -> u32 {
        self.spec.mtu
    }

    /// Creates the device, gives it our address and the Network route, starts the
    /// dataplane.
    pub async fn setup(&mut self, nl: &Netlink, own: Ipv4Net) -> Result<(), BackendError> {
        self.own = Some(own);
        self.start(nl).await
    }

    async fn start(&mut self, nl: &Netlink) -> Result<(), BackendError> {
        let name = &self.spec.device.clone();
        if !self.path.started()
            && let Some(old) = nl.link_by_name(name).await?
        {
            // Not ours: a kernel vxlan device from an earlier run would keep the port.
            warn!(device = %name, index = old.index, "removing a stale device of our name");
            nl.delete_link(old.index).await?;
        }
        self.path.start(&self.spec)?;
        let link = nl
            .link_by_name(name)
            .await?
            .ok_or_else(|| BackendError::DeviceVanished { name: name.clone() })?;
        // A TUN would send IPv6 router solicitations into our reader; flannel's
        // overlay is IPv4 only.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        if link.mtu != self.spec.mtu {
            nl.set_link_mtu(link.index, self.spec.mtu).await?;
        }
        self.device = Some(link.index);
        self.ensure_address(nl, link.index).await?;
        if !link.up {
            nl.set_link_up(link.index, true).await?;
        }
        nl.replace_route(&self.route(link.index)).await?;
        if let (Some(e), Some(own)) = (&mut self.ebpf, self.own) {
            e.attach(link.index, own)?;
        }
        self.push_peers();
        info!(device = %name, index = link.index, mtu = self.spec.mtu, network = %self.spec.network, wire = ?self.spec.wire, "overlay device ready");
        Ok(())
    }

    /// `<Network> dev <device>`, as flannel's udp backend installs it.
    fn route(&self, dev: IfIndex) -> Route {
        Route {
            dst: self.spec.network,
            kind: RouteKind::Unicast {
                gateway: None,
                dev,
                onlink: false,
            },
            metric: 0,
        }
    }

    /// Exactly one IPv4 address on the device: our subnet's `.0/32`.
    async fn ensure_address(&self, nl: &Netlink, index: IfIndex) -> Result<(), BackendError> {
        let Some(own) = self.own else { return Ok(()) };
        let want = own.network();
        let addrs: Vec<_> = nl
            .addresses_v4()
            .await?
            .into_iter()
            .filter(|a| a.ifindex == index)
            .collect();
        if !addrs.iter().any(|a| a.ip == want && a.prefix_len == 32) {
            nl.replace_address(index, want, 32).await?;
        }
        for a in addrs
            .iter()
            .filter(|a| !(a.ip == want && a.prefix_len == 32))
        {
            nl.delete_address(a).await?;
        }
        Ok(())
    }

    fn push_peers(&mut self) {
        let peers: Vec<TunPeer> = self.peers.values().copied().collect();
        self.path.set_peers(self.own, &peers);
        if let Some(e) = &mut self.ebpf
            && let Err(err) = e.set_peers(&peers)
        {
            warn!(error = %err, "updating the eBPF udp peers failed");
        }
    }

    /// Our subnet changed: new address, new own subnet for the checks.
    pub async fn own_lease(&mut self, nl: &Netlink, own: Ipv4Net) -> Result<(), BackendError> {
        self.own = Some(own);
        if let Some(dev) = self.device {
            self.ensure_address(nl, dev).await?;
            if let Some(e) = &mut self.ebpf {
                e.attach(dev, own)?;
            }
        }
        self.push_peers();
        Ok(())
    }

    /// The peer a lease means here, or `None` when this backend does not use it.
    fn peer_from_lease(&self, l: &Lease) -> Option<TunPeer> {
        let vtep_mac = match (&self.spec.wire, &l.attrs.backend) {
            (Wire::Udp, BackendAttrs::None) => None,
            (Wire::Vxlan { .. }, BackendAttrs::Vxlan(v)) => Some(v.vtep_mac),
            (_, other) => {
                info!(subnet = %l.subnet(), backend = other.type_name().unwrap_or("udp"), "ignoring a peer with another backend type");
                return None;
            }
        };
        Some(TunPeer {
            subnet: l.subnet(),
            public_ip: l.attrs.public_ip,
            vtep_mac,
        })
    }

    /// Incremental changes.
    pub fn peers(&mut self, events: &[PeerEvent]) {
        for ev in events {
            match ev {
                PeerEvent::Added(l) | PeerEvent::Changed { new: l, .. } => {
                    match self.peer_from_lease(l) {
                        Some(p) => self.peers.insert(p.subnet, p),
                        None => self.peers.remove(&l.subnet()),
                    };
                }
                PeerEvent::Removed(l) => {
                    self.peers.remove(&l.subnet());
                }
            }
        }
        self.push_peers();
    }

    /// The complete peer set.
    pub fn snapshot(&mut self, leases: &[Lease]) {
        self.peers = leases
            .iter()
            .filter_map(|l| self.peer_from_lease(l))
            .map(|p| (p.subnet, p))
            .collect();
        if let Some(e) = &mut self.ebpf {
            e.synced = true;
        }
        info!(peers = self.peers.len(), "overlay peer set replaced");
        self.push_peers();
    }

    /// The periodic check: a dead worker or a deleted device restarts the dataplane;
    /// a deleted address or route is put back.
    pub async fn check(&mut self, nl: &Netlink) -> Result<(), BackendError> {
        if self.own.is_none() {
            return Ok(());
        }
        let link = nl.link_by_name(&self.spec.device).await?;
        if !self.path.healthy() || link.as_ref().map(|l| l.index) != self.device {
            warn!(device = %self.spec.device, "the overlay device or its dataplane is gone, starting it again");
            return self.start(nl).await;
        }
        let Some(dev) = self.device else {
            return Ok(());
        };
        self.ensure_address(nl, dev).await?;
        let route = self.route(dev);
        if !nl
            .routes_v4_within(self.spec.network)
            .await?
            .iter()
            .any(|r| r.dst == route.dst && r.dev() == Some(dev))
        {
            nl.replace_route(&route).await?;
            info!(route = %route, "route recovered");
        }
        Ok(())
    }

    /// The dataplane, peers with counters, drops by reason.
    pub fn status(&self) -> DataplaneStatus {
        let mut st = DataplaneStatus::default();
        self.path.report(&self.peers, &mut st);
        let Some(e) = &self.ebpf else { return st };
        if let Some(why) = &e.refused {
            st.refused.push(crate::host::status::Refusal {
                dataplane: "ebpf".into(),
                reason: why.clone(),
            });
        }
        let Some(fast) = &e.fast else { return st };
        // The programs carry what they can; the TUN path the rest: report both.
        st.dataplane = "ebpf".into();
        let counts: BTreeMap<Ipv4Net, _> = fast
            .peer_counters()
            .unwrap_or_default()
            .into_iter()
            .collect();
        for p in &mut st.peers {
            if let Some(c) = p.subnet.parse().ok().and_then(|s: Ipv4Net| counts.get(&s)) {
                p.tx_packets += c.tx_packets;
                p.tx_bytes += c.tx_bytes;
                p.rx_packets += c.rx_packets;
                p.rx_bytes += c.rx_bytes;
            }
        }
        st.verdicts.extend(super::fastpath::verdict_counts(
            fast.drop_counters().unwrap_or_default(),
        ));
        st
    }
}
