//! Backends: what a peer lease means on this host.
//!
//! One [`Backend`] enum, built by one `match` over the network config ([`Backend::new`]),
//! no registry. Each backend is validated before anything touches the kernel
//! (netavark's validate-then-apply): `new` checks the config, the interface and the
//! `--dataplane` choice and loads the persistent VTEP MAC; only [`Backend::setup`]
//! changes the kernel.
//!
//! After setup the daemon feeds it:
//! - [`Backend::peers`]: incremental watch events, applied entry by entry;
//! - [`Backend::snapshot`]: the full peer set after every full listing, reconciled
//!   against a kernel dump ([`reconcile`]), which also removes peers that left while
//!   flanneld was down;
//! - [`Backend::own_lease`]: our subnet after a lost lease was re-acquired;
//! - [`Backend::link_event`] and [`Backend::check`]: link notifications and a periodic
//!   re-check (flannel's 10 s `routeCheck`), which recreate a deleted device and restore
//!   deleted entries.
//!
//! Every kernel change goes through [`Netlink`]; this module never builds a netlink
//! message.

pub mod fastpath;
pub mod hostgw;
pub mod reconcile;
pub mod udp;
pub mod vxlan;

use std::{path::Path, time::Duration};

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use crate::{
    cli::Dataplane,
    config::BackendConfig,
    host::status::{PeerStatus, Refusal, VerdictCount},
    iface::ExternalInterface,
    netlink::{LinkEvent, Netlink, NetlinkError, Route},
    state::StateError,
    subnet::{BackendAttrs, Lease, PeerEvent},
};
use reconcile::Op;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend"
    )]
    HostGwNat,
    #[error("{name} was created but the kernel does not list it")]
    DeviceVanished { name: String },
    #[error("--dataplane=ebpf: {0}")]
    Ebpf(#[from] crate::dataplane::EbpfError),
    #[error("--dataplane=tun: {0}")]
    TunUnavailable(#[source] crate::dataplane::tun::TunError),
    #[error(transparent)]
    Tun(#[from] crate::dataplane::tun::TunError),
    #[error(
        "--dataplane=tun: the host-gw backend only routes, it has no TUN dataplane; use --dataplane=kernel or auto"
    )]
    NoTunForHostGw,
    #[error(
        "--dataplane=kernel: the udp backend has no kernel dataplane (flannel's udp is a userspace proxy); use --dataplane=tun or auto"
    )]
    NoKernelForUdp,
    #[error("{failed} of {total} kernel changes failed; they are retried at the next check")]
    Partial { failed: usize, total: usize },
}

/// What [`Backend::status`] reports.
#[derive(Debug, Default)]
pub struct DataplaneStatus {
    pub dataplane: String,
    pub refused: Vec<Refusal>,
    pub peers: Vec<PeerStatus>,
    pub verdicts: Vec<VerdictCount>,
}

/// How often kernel state is re-checked against the desired state (flannel's host-gw
/// `routeCheck` period, used for every backend).
pub const CHECK_PERIOD: Duration = Duration::from_secs(10);

/// The backend in use.
pub enum Backend {
    /// flannel's vxlan backend on the kernel's vxlan device.
    Vxlan(vxlan::VxlanBackend),
    /// flannel's host-gw backend: a route per peer via its PublicIP.
    HostGw(hostgw::HostGwBackend),
    /// flannel's udp backend, and the vxlan backend on the TUN dataplane: one layer-3
    /// device with a route for the Network, served by the userspace TUN dataplane.
    Udp(udp::UdpBackend),
    /// flannel's alloc backend: a lease and no dataplane, by design.
    Inert(Inert),
}

/// A backend that leases a subnet and programs nothing.
pub struct Inert {
    mtu: u32,
}

/// Why the kernel's vxlan driver cannot be used, or `None` when it can: built in,
/// loaded, or a module on disk the kernel will load on demand.
fn kernel_vxlan_missing() -> Option<String> {
    if Path::new("/sys/module/vxlan").exists() {
        return None;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let dir = Path::new("/lib/modules").join(release.trim());
    let listed = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .is_ok_and(|t| t.lines().any(|l| l.contains("/vxlan.ko")))
    };
    if listed("modules.builtin") || listed("modules.dep") || !dir.exists() {
        // No module tree to look at (a container, say): let the kernel decide.
        return None;
    }
    Some(format!(
        "the kernel has no vxlan driver (not loaded, not in {})",
        dir.display()
    ))
}

/// Why the TUN dataplane cannot be used, or `None`.
fn tun_missing() -> Option<String> {
    crate::dataplane::tun::probe().err().map(|e| e.to_string())
}

fn refusal(dataplane: &str, reason: impl Into<String>) -> Refusal {
    Refusal {
        dataplane: dataplane.into(),
        reason: reason.into(),
    }
}

impl Backend {
    /// Validates the config for this host and builds the backend. Touches no kernel state.
    ///
    /// `--dataplane`: `kernel` is flannel's kernel state only; `ebpf` adds the eBPF fast
    /// path on top (vxlan), failing if it cannot load; `auto` adds it when [`probe`]
    /// succeeds and otherwise records why it was refused.
    ///
    /// [`probe`]: crate::dataplane::probe
    pub fn new(
        cfg: &BackendConfig,
        network: Ipv4Net,
        ext: &ExternalInterface,
        state_dir: &Path,
        dataplane: Dataplane,
        pin_dir: &Path,
    ) -> Result<(Self, Vec<Refusal>), BackendError> {
        let mut refused = Vec::new();
        let backend = match cfg {
            BackendConfig::Vxlan(v) => {
                let fast = match dataplane {
                    Dataplane::Kernel | Dataplane::Tun => None,
                    Dataplane::Ebpf => {
                        crate::dataplane::probe()?;
                        Some(vxlan::FastPathChoice {
                            required: true,
                            pin_dir: Some(pin_dir.to_owned()),
                        })
                    }
                    Dataplane::Auto => match crate::dataplane::probe() {
                        Ok(()) => Some(vxlan::FastPathChoice {
                            required: false,
                            pin_dir: Some(pin_dir.to_owned()),
                        }),
                        Err(e) => {
                            refused.push(refusal("ebpf", e.to_string()));
                            None
                        }
                    },
                };
                // auto: ebpf, then the kernel's vxlan device, then TUN.
                let tun = match dataplane {
                    Dataplane::Tun => {
                        if let Err(e) = crate::dataplane::tun::probe() {
                            return Err(BackendError::TunUnavailable(e));
                        }
                        true
                    }
                    Dataplane::Auto if fast.is_none() => match kernel_vxlan_missing() {
                        Some(why) => {
                            refused.push(refusal("kernel", why));
                            true
                        }
                        None => false,
                    },
                    _ => false,
                };
                if tun {
                    Self::Udp(udp::UdpBackend::vxlan(v, ext, network, state_dir)?)
                } else {
                    Self::Vxlan(vxlan::VxlanBackend::new(v, ext, network, state_dir, fast)?)
                }
            }
            BackendConfig::HostGw => {
                let b = hostgw::HostGwBackend::new(ext, network)?;
                match dataplane {
                    Dataplane::Ebpf => {
                        crate::dataplane::HostGwFastPath::probe()?;
                        Self::HostGw(b.with_ebpf(pin_dir))
                    }
                    Dataplane::Tun => return Err(BackendError::NoTunForHostGw),
                    Dataplane::Auto => {
                        refused.push(refusal(
                            "ebpf",
                            "the eBPF host-gw forwarder bypasses this node's netfilter \
                             (iptables, conntrack, NAT) for pod traffic, so it runs only with \
                             --dataplane=ebpf",
                        ));
                        Self::HostGw(b)
                    }
                    Dataplane::Kernel => Self::HostGw(b),
                }
            }
            BackendConfig::Udp(u) => {
                // The TUN dataplane always runs: it is the udp backend's own path, and
                // the fallback for whatever the eBPF programs hand on.
                let tun_ok = |refused: &mut Vec<Refusal>| match crate::dataplane::tun::probe() {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        refused.push(refusal("tun", e.to_string()));
                        Err(BackendError::TunUnavailable(e))
                    }
                };
                let ebpf_probe = || {
                    crate::dataplane::probe().and_then(|()| crate::dataplane::UdpFastPath::probe())
                };
                let ebpf = match dataplane {
                    Dataplane::Kernel => return Err(BackendError::NoKernelForUdp),
                    Dataplane::Tun => {
                        tun_ok(&mut refused)?;
                        None
                    }
                    Dataplane::Ebpf => {
                        ebpf_probe()?;
                        tun_ok(&mut refused)?;
                        Some(udp::UdpEbpf::new(ext, u.port, pin_dir, true))
                    }
                    Dataplane::Auto => {
                        let ebpf = match ebpf_probe() {
                            Ok(()) => Some(udp::UdpEbpf::new(ext, u.port, pin_dir, false)),
                            Err(e) => {
                                refused.push(refusal("ebpf", e.to_string()));
                                refused.push(refusal(
                                    "kernel",
                                    "the udp backend has no kernel dataplane",
                                ));
                                None
                            }
                        };
                        if let Some(why) = tun_missing() {
                            return Err(BackendError::TunUnavailable(
                                crate::dataplane::tun::TunError::Unavailable(
                                    std::io::Error::other(why),
                                ),
                            ));
                        }
                        ebpf
                    }
                };
                let b = udp::UdpBackend::udp(u, ext, network);
                Self::Udp(match ebpf {
                    Some(e) => b.with_ebpf(e),
                    None => b,
                })
            }
            BackendConfig::Alloc => Self::Inert(Inert { mtu: ext.mtu }),
        };
        Ok((backend, refused))
    }

    /// The dataplane carrying traffic now, why better ones are not used, and counters.
    pub fn status(&self) -> DataplaneStatus {
        let mut st = DataplaneStatus::default();
        match self {
            Self::Vxlan(b) => {
                st.peers = b
                    .peer_table()
                    .iter()
                    .map(|p| PeerStatus {
                        subnet: p.subnet.to_string(),
                        public_ip: p.public_ip.to_string(),
                        vtep_mac: p.vtep_mac.to_string(),
                        ..PeerStatus::default()
                    })
                    .collect();
                st.dataplane = "kernel".into();
                if let Some(fp) = b.fast_path() {
                    if fp.active() {
                        st.dataplane = "ebpf".into();
                        (st.peers, st.verdicts) = fp.counters(b.peer_table());
                    } else if let Some(why) = fp.refused() {
                        st.refused.push(Refusal {
                            dataplane: "ebpf".into(),
                            reason: why.to_owned(),
                        });
                    }
                }
            }
            Self::HostGw(b) => {
                st.dataplane = if b.fast().is_some() { "ebpf" } else { "kernel" }.into();
                (st.peers, st.verdicts) = b.status();
            }
            Self::Udp(b) => st = b.status(),
            Self::Inert(_) => st.dataplane = "none".into(),
        }
        st
    }
    /// What goes into our lease's `BackendType`/`BackendData`.
    pub fn lease_attrs(&self) -> BackendAttrs {
        match self {
            Self::Vxlan(b) => b.lease_attrs(),
            Self::HostGw(_) => BackendAttrs::HostGw,
            Self::Udp(b) => b.lease_attrs(),
            Self::Inert(_) => BackendAttrs::None,
        }
    }

    /// The MTU for containers (`FLANNEL_MTU`): the overlay device's MTU.
    pub fn mtu(&self) -> u32 {
        match self {
            Self::Vxlan(b) => b.mtu(),
            Self::HostGw(b) => b.mtu(),
            Self::Udp(b) => b.mtu(),
            Self::Inert(b) => b.mtu,
        }
    }

    /// Whether link notifications matter ([`Backend::link_event`]).
    pub fn watches_links(&self) -> bool {
        matches!(self, Self::Vxlan(_)) || self.watches_addresses()
    }

    /// Whether IPv4 address notifications matter too ([`Backend::link_event`]).
    pub fn watches_addresses(&self) -> bool {
        matches!(self, Self::HostGw(b) if b.watches_addresses())
    }

    /// Creates the backend's devices for our subnet. Peers come later, by events.
    pub async fn setup(&mut self, nl: &Netlink, own: Ipv4Net) -> Result<(), BackendError> {
        match self {
            Self::Vxlan(b) => b.setup(nl, own).await,
            Self::HostGw(b) => b.setup(nl, own).await,
            Self::Udp(b) => b.setup(nl, own).await,
            Self::Inert(_) => {
                info!("alloc backend: subnet lease only, no dataplane");
                Ok(())
            }
        }
    }

    /// Our lease changed (re-acquired, maybe another subnet).
    pub async fn own_lease(&mut self, nl: &Netlink, own: Ipv4Net) -> Result<(), BackendError> {
        match self {
            Self::Vxlan(b) => b.own_lease(nl, own).await,
            Self::Udp(b) => b.own_lease(nl, own).await,
            Self::HostGw(b) => b.setup(nl, own).await,
            Self::Inert(_) => Ok(()),
        }
    }

    /// Incremental peer changes from the watch.
    pub async fn peers(&mut self, nl: &Netlink, events: &[PeerEvent]) -> Result<(), BackendError> {
        match self {
            Self::Vxlan(b) => b.peers(nl, events).await,
            Self::HostGw(b) => b.peers(nl, events).await,
            Self::Udp(b) => {
                b.peers(events);
                Ok(())
            }
            Self::Inert(_) => Ok(()),
        }
    }

    /// The complete peer set: reconcile the kernel against it.
    pub async fn snapshot(&mut self, nl: &Netlink, peers: &[Lease]) -> Result<(), BackendError> {
        match self {
            Self::Vxlan(b) => b.snapshot(nl, peers).await,
            Self::HostGw(b) => b.snapshot(nl, peers).await,
            Self::Udp(b) => {
                b.snapshot(peers);
                Ok(())
            }
            Self::Inert(_) => Ok(()),
        }
    }

    /// A link notification (only when [`Backend::watches_links`]).
    pub async fn link_event(&mut self, nl: &Netlink, ev: &LinkEvent) -> Result<(), BackendError> {
        match self {
            Self::Vxlan(b) => b.link_event(nl, ev).await,
            Self::HostGw(b) => b.link_event(nl, ev).await,
            Self::Udp(_) | Self::Inert(_) => Ok(()),
        }
    }

    /// The periodic re-check: restore what was deleted, remove what is stale.
    pub async fn check(&mut self, nl: &Netlink) -> Result<(), BackendError> {
        match self {
            Self::Vxlan(b) => b.check(nl).await,
            Self::HostGw(b) => b.check(nl).await,
            Self::Udp(b) => b.check(nl).await,
            Self::Inert(_) => Ok(()),
        }
    }
}

/// Why a batch of kernel changes is applied; decides how loudly installs are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// A peer event: installs are routine.
    Event,
    /// A full listing or a recreated device.
    Sync,
    /// The periodic check: an install means something removed our entry.
    Check,
}

/// Applies `ops` in order. A failed change is logged and the rest still run; the count of
/// failures comes back as [`BackendError::Partial`], and the caller's next check retries.
pub(crate) async fn apply(nl: &Netlink, ops: &[Op], cause: Cause) -> Result<(), BackendError> {
    let mut failed = 0;
    for op in ops {
        let r = match op {
            Op::ReplaceNeigh(n) => match n.mac {
                Some(mac) => nl.replace_neigh(n.dev, n.ip, mac).await,
                None => Ok(()),
            },
            Op::ReplaceFdb(f) => match f.dst {
                Some(dst) => nl.replace_fdb(f.dev, f.mac, dst).await,
                None => Ok(()),
            },
            Op::ReplaceRoute(r) => nl.replace_route(r).await,
            Op::DeleteRoute(r) => nl.delete_route(r).await,
            Op::DeleteFdb(f) => nl.delete_fdb(f.dev, f.mac, f.dst).await,
            Op::DeleteNeigh(n) => nl.delete_neigh(n.dev, n.ip).await,
        };
        match r {
            Ok(()) => log_op(op, cause),
            Err(e) => {
                failed += 1;
                warn!(error = %e, op = ?op, "kernel change failed");
            }
        }
    }
    if failed > 0 {
        return Err(BackendError::Partial {
            failed,
            total: ops.len(),
        });
    }
    Ok(())
}

fn log_op(op: &Op, cause: Cause) {
    match (op, cause) {
        (Op::ReplaceRoute(r), Cause::Check) => info!(route = %r, "route recovered"),
        (Op::ReplaceNeigh(n), Cause::Check) => {
            info!(ip = %n.ip, dev = n.dev, "neighbour entry recovered");
        }
        (Op::ReplaceFdb(f), Cause::Check) => {
            info!(mac = %f.mac, dev = f.dev, "fdb entry recovered");
        }
        (Op::DeleteRoute(r), Cause::Sync | Cause::Check) => {
            info!(route = %r, "removed a route no peer wants");
        }
        (Op::DeleteFdb(f), Cause::Sync | Cause::Check) => {
            info!(mac = %f.mac, dst = ?f.dst, dev = f.dev, "removed an fdb entry no peer wants");
        }
        (Op::DeleteNeigh(n), Cause::Sync | Cause::Check) => {
            info!(ip = %n.ip, dev = n.dev, "removed a neighbour entry no peer wants");
        }
        _ => debug!(op = ?op, "applied"),
    }
}

/// `--ip-blackhole-route`: `blackhole <own subnet>`, so traffic for our subnet's unused
/// addresses is dropped here instead of following the default route. Re-added every
/// `--iptables-resync` seconds, as flannel does.
#[derive(Debug)]
pub struct Blackhole {
    subnet: Ipv4Net,
}

impl Blackhole {
    pub fn new(subnet: Ipv4Net) -> Self {
        Self { subnet }
    }

    /// Installs (or re-installs) the route; replace semantics.
    pub async fn ensure(&self, nl: &Netlink) -> Result<(), NetlinkError> {
        nl.replace_route(&Route::blackhole(self.subnet)).await
    }

    /// Moves the route to a new subnet.
    pub async fn move_to(&mut self, nl: &Netlink, subnet: Ipv4Net) -> Result<(), NetlinkError> {
        if subnet != self.subnet {
            nl.delete_route(&Route::blackhole(self.subnet)).await?;
            self.subnet = subnet;
        }
        self.ensure(nl).await
    }
}
