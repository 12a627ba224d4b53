//! The flanneld daemon: flannel's start-up sequence, without its 685-line main.
//!
//! health server → etcd → network config (retried every second while missing or
//! invalid) → external interface → backend lease attributes → lease → traffic rules →
//! subnet.env → READY → watch peers and keep the lease, until SIGTERM/SIGINT.
//!
//! On SIGTERM/SIGINT it exits 0 and leaves everything in place (the lease in etcd,
//! subnet.env, rules, dataplane state), so a restart adopts them.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    cli::Flags,
    config::{BackendConfig, ConfigError, NetworkConfig, parse_config},
    host::{
        health::{Health, HealthError, HealthServer},
        notify,
        subnet_env::{self, SubnetEnv, SubnetEnvError},
        trafficmngr::{TrafficError, TrafficManager},
    },
    iface::{self, ExternalInterface, IfaceError},
    netlink::{Netlink, NetlinkError},
    state::{self, StateError},
    subnet::{
        BackendAttrs, LEASE_TTL_SECS, Lease, LeaseAttrs, PeerEvent, VxlanAttrs, alloc,
        etcd::{EtcdError, EtcdOptions, Registry},
        manager::{self, LeaseSpec, Manager, ManagerError, ManagerEvent},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Iface(#[from] IfaceError),
    #[error("failed to acquire lease: {0}")]
    Lease(#[from] ManagerError),
    #[error(transparent)]
    SubnetEnv(#[from] SubnetEnvError),
    #[error(transparent)]
    Traffic(#[from] TrafficError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error(
        "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend"
    )]
    HostGwNat,
    #[error("the lease manager task failed: {0}")]
    Task(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// What the backend contributes before the lease exists.
struct BackendPlan {
    attrs: BackendAttrs,
    mtu: u32,
}

/// Runs flanneld until SIGTERM or SIGINT (exit 0) or a fatal error.
pub async fn run(flags: Flags) -> Result<(), DaemonError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Signals)?;
    let health = Arc::new(Health::new());
    if flags.healthz_port > 0 {
        let addr = SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        let server = HealthServer::bind(addr).await?;
        info!(%addr, "serving /healthz and /readyz");
        tokio::spawn(server.run(health.clone(), std::future::pending()));
    }
    tokio::select! {
        r = start(&flags, &health) => r,
        _ = term.recv() => {
            info!(signal = "SIGTERM", "exiting cleanly, leaving the lease and dataplane in place");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => {
            info!(signal = "SIGINT", "exiting cleanly, leaving the lease and dataplane in place");
            Ok(())
        }
    }
}

fn etcd_options(flags: &Flags) -> EtcdOptions {
    EtcdOptions {
        endpoints: flags.etcd_endpoints(),
        prefix: flags.etcd_prefix.clone(),
        cafile: flags.etcd_cafile.clone(),
        certfile: flags.etcd_certfile.clone(),
        keyfile: flags.etcd_keyfile.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.as_ref().map(|s| s.expose().to_owned()),
    }
}

/// Connects to etcd, retrying every second while it is unreachable. Settings that can
/// never work (bad TLS files) fail at once: there is no fallback to plain HTTP.
async fn connect(flags: &Flags) -> Result<Registry, DaemonError> {
    let opts = etcd_options(flags);
    loop {
        match Registry::connect(&opts).await {
            Ok(r) => return Ok(r),
            Err(e @ (EtcdError::ReadFile { .. } | EtcdError::TlsSettings(_))) => {
                return Err(e.into());
            }
            Err(e) => {
                warn!(error = %e, "cannot reach etcd, retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// flannel's `getConfig`: retry every second while the config is missing or invalid.
async fn fetch_config(reg: &Registry) -> NetworkConfig {
    loop {
        let err = match reg.get_config().await {
            Ok(Some(bytes)) => match parse_config(&bytes) {
                Ok(cfg) => return cfg,
                Err(e) => e.to_string(),
            },
            Ok(None) => ConfigError::NotFound.to_string(),
            Err(e) => e.to_string(),
        };
        warn!(error = %err, key = %format!("{}/config", reg.prefix()), "couldn't fetch network config, retrying in 1s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn backend_plan(
    cfg: &NetworkConfig,
    ext: &ExternalInterface,
    state_dir: &std::path::Path,
) -> Result<BackendPlan, DaemonError> {
    use flannel_common::consts::{UDP_OVERHEAD, VXLAN_OVERHEAD};
    Ok(match &cfg.backend {
        BackendConfig::Vxlan(v) => {
            let device = format!("flannel.{}", v.vni);
            let vtep_mac = state::load_or_create_vtep_mac(state_dir, &device)?;
            let underlay = v.mtu.unwrap_or(ext.mtu);
            BackendPlan {
                attrs: BackendAttrs::Vxlan(VxlanAttrs {
                    vni: v.vni,
                    vtep_mac,
                }),
                mtu: underlay.saturating_sub(VXLAN_OVERHEAD),
            }
        }
        BackendConfig::Udp(_) => BackendPlan {
            attrs: BackendAttrs::None,
            mtu: ext.mtu.saturating_sub(UDP_OVERHEAD),
        },
        BackendConfig::HostGw => {
            if ext.public_ip != ext.iface_addr {
                return Err(DaemonError::HostGwNat);
            }
            BackendPlan {
                attrs: BackendAttrs::HostGw,
                mtu: ext.mtu,
            }
        }
        BackendConfig::Alloc => BackendPlan {
            attrs: BackendAttrs::None,
            mtu: ext.mtu,
        },
    })
}

/// Acquires the lease, retrying transient etcd errors; allocation errors are fatal.
async fn acquire(reg: &Registry, spec: &LeaseSpec) -> Result<Lease, DaemonError> {
    loop {
        match manager::acquire(reg, spec).await {
            Ok(l) => return Ok(l),
            Err(ManagerError::Etcd(e)) => {
                warn!(error = %e, "acquiring a lease failed, retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Host rules and files that depend on the lease.
struct HostSetup<'a> {
    flags: &'a Flags,
    network: Ipv4Net,
    mtu: u32,
    traffic: Arc<TrafficManager>,
    previous: Option<subnet_env::Previous>,
}

impl HostSetup<'_> {
    async fn apply(&mut self, lease: Ipv4Net) -> Result<(), DaemonError> {
        let prev = self
            .previous
            .and_then(|p| Some((p.network?, p.subnet?)))
            .filter(|&p| p != (self.network, lease));
        if self.flags.ip_masq {
            self.traffic
                .setup_masq(
                    self.network,
                    lease,
                    prev,
                    self.flags.ip_masq_fully_random_disable,
                )
                .await?;
        }
        if self.flags.iptables_forward_rules {
            self.traffic.setup_forward(self.network).await?;
        }
        let env = SubnetEnv {
            network: self.network,
            subnet: lease,
            mtu: self.mtu,
            ipmasq: self.flags.ip_masq,
        };
        env.write_atomic(&self.flags.subnet_file)?;
        info!(path = %self.flags.subnet_file.display(), subnet = %lease, mtu = self.mtu, "wrote subnet file");
        self.previous = Some(subnet_env::Previous {
            network: Some(self.network),
            subnet: Some(lease),
        });
        Ok(())
    }
}

fn log_peer(ev: &PeerEvent) {
    let line = |what: &str, l: &Lease| {
        info!(
            subnet = %l.subnet(),
            public_ip = %l.attrs.public_ip,
            backend = l.attrs.backend.type_name().unwrap_or("udp"),
            vtep_mac = %match &l.attrs.backend { BackendAttrs::Vxlan(v) => v.vtep_mac.to_string(), _ => String::new() },
            "{what}"
        );
    };
    match ev {
        PeerEvent::Added(l) => line("peer added", l),
        PeerEvent::Changed { new, .. } => line("peer changed", new),
        PeerEvent::Removed(l) => line("peer removed", l),
    }
}

async fn start(flags: &Flags, health: &Health) -> Result<(), DaemonError> {
    let reg = connect(flags).await?;
    let cfg = fetch_config(&reg).await;
    if cfg.backend_defaulted {
        info!("the network config has no Backend: using udp, as flannel does");
    }
    cfg.check_supported()?;
    let range = *cfg.ipv4()?;
    info!(network = %range.network, subnet_len = range.subnet_len, backend = cfg.backend.type_name(), "network config");

    let netlink = Netlink::new()?;
    let ext =
        iface::find_external_interface(&netlink, &iface::IfaceOptions::from_flags(flags)).await?;
    info!(iface = %ext.name, iface_addr = %ext.iface_addr, public_ip = %ext.public_ip, mtu = ext.mtu, "using interface");

    let plan = backend_plan(&cfg, &ext, &flags.state_dir)?;
    let previous = match subnet_env::read_previous(&flags.subnet_file) {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "ignoring the previous subnet file");
            None
        }
    };
    let previous_subnet = previous.and_then(|p| p.subnet).filter(|s| {
        let fits = alloc::fits(&range, *s);
        if fits {
            info!(subnet = %s, "found previously leased subnet in the subnet file");
        } else {
            info!(subnet = %s, "previously leased subnet is not compatible with the etcd network config, ignoring");
        }
        fits
    });
    let spec = LeaseSpec {
        range,
        attrs: LeaseAttrs {
            public_ip: ext.public_ip,
            public_ipv6: None,
            backend: plan.attrs,
        },
        previous: previous_subnet,
        ttl: Duration::from_secs(LEASE_TTL_SECS as u64),
        renew_margin: Duration::from_secs(u64::from(flags.subnet_lease_renew_margin) * 60),
    };
    let lease = acquire(&reg, &spec).await?;
    info!(subnet = %lease.subnet(), reservation = lease.is_reservation(), "acquired lease");

    let traffic = Arc::new(TrafficManager::new(cfg.enable_nftables).await?);
    if let Err(e) = traffic.cleanup_other().await {
        warn!(error = %e, "cannot remove the other firewall mode's flannel rules");
    }
    let mut host = HostSetup {
        flags,
        network: range.network,
        mtu: plan.mtu,
        traffic,
        previous,
    };
    host.apply(lease.subnet()).await?;
    let resync = host.traffic.spawn_resync(
        Duration::from_secs(flags.iptables_resync.max(1)),
        std::future::pending(),
    );

    let (tx, mut rx) = mpsc::channel(256);
    let own_subnet = lease.subnet();
    let mgr = Manager::new(reg, spec, lease, tx);
    let mut mgr_task = tokio::spawn(mgr.run());

    health.set_ready(true);
    match notify::notify_ready() {
        Ok(true) => info!("notified systemd: READY=1"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "sd_notify failed"),
    }
    info!(subnet = %own_subnet, "flanneld is ready");

    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ManagerEvent::Peers(evs)) => evs.iter().for_each(log_peer),
                Some(ManagerEvent::Snapshot(peers)) => info!(peers = peers.len(), "peer set resynchronised"),
                Some(ManagerEvent::OwnLease(l)) => {
                    if let Err(e) = host.apply(l.subnet()).await {
                        error!(error = %e, "updating the host for our new lease failed");
                    }
                }
                None => break,
            },
            r = &mut mgr_task => {
                resync.abort();
                return match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(DaemonError::Task(e.to_string())),
                };
            }
        }
    }
    Ok(())
}
