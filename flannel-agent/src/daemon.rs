//! The flanneld daemon: flannel's start-up sequence, without its 685-line main.
//!
//! health server → etcd → network config (retried every second while missing or
//! invalid) → external interface → backend (validated, VTEP MAC loaded) → lease →
//! backend device with our address → traffic rules → subnet.env → READY → peer events
//! into the backend and keep the lease, until SIGTERM/SIGINT.
//!
//! On SIGTERM/SIGINT it exits 0 and leaves everything in place (the lease in etcd,
//! subnet.env, rules, dataplane state), so a restart adopts them.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    backend::{self, Backend, BackendError, Blackhole},
    cli::Flags,
    config::{ConfigError, NetworkConfig, parse_config},
    host::{
        health::{self, Health, HealthError, HealthServer},
        notify,
        status::{self, Status},
        subnet_env::{self, SubnetEnv, SubnetEnvError},
        trafficmngr::{TrafficError, TrafficManager},
    },
    iface::{self, IfaceError},
    netlink::{LinkEvent, LinkMonitor, Netlink, NetlinkError},
    subnet::{
        BackendAttrs, LEASE_TTL_SECS, Lease, LeaseAttrs, PeerEvent, alloc,
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
    Backend(#[from] BackendError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error("the lease manager task failed: {0}")]
    Task(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
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
    // `flanneld status` reads this socket; it works with the health port disabled.
    let socket = status::socket_path(&flags.subnet_file);
    let h = health.clone();
    tokio::spawn(async move {
        if let Err(e) = health::serve_unix(&socket, h, std::future::pending()).await {
            warn!(error = %e, "flanneld status will not be available");
        }
    });
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

    let (mut backend, mut refused) = Backend::new(
        &cfg.backend,
        range.network,
        &ext,
        &flags.state_dir,
        flags.dataplane,
        &flags.bpf_pin_dir,
    )?;
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
            backend: backend.lease_attrs(),
        },
        previous: previous_subnet,
        ttl: Duration::from_secs(LEASE_TTL_SECS as u64),
        renew_margin: Duration::from_secs(u64::from(flags.subnet_lease_renew_margin) * 60),
    };
    let lease = acquire(&reg, &spec).await?;
    info!(subnet = %lease.subnet(), reservation = lease.is_reservation(), "acquired lease");

    // Subscribed before the device exists, so no deletion can slip between the two.
    let mut links = if backend.watches_addresses() {
        Some(LinkMonitor::with_addresses()?)
    } else if backend.watches_links() {
        Some(LinkMonitor::new()?)
    } else {
        None
    };
    backend.setup(&netlink, lease.subnet()).await?;
    let mut blackhole = if flags.ip_blackhole_route {
        let b = Blackhole::new(lease.subnet());
        b.ensure(&netlink).await?;
        info!(subnet = %lease.subnet(), "added the blackhole route for our subnet");
        Some(b)
    } else {
        None
    };

    let traffic = Arc::new(TrafficManager::new(cfg.enable_nftables).await?);
    if let Err(e) = traffic.cleanup_other().await {
        warn!(error = %e, "cannot remove the other firewall mode's flannel rules");
    }
    let mut host = HostSetup {
        flags,
        network: range.network,
        mtu: backend.mtu(),
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

    // One line saying which dataplane carries traffic, and why each better one did not.
    let st = backend.status();
    refused.extend(st.refused.iter().cloned());
    let why: Vec<String> = refused
        .iter()
        .map(|r| format!("{}: {}", r.dataplane, r.reason))
        .collect();
    info!(dataplane = %st.dataplane, backend = cfg.backend.type_name(), refused = ?why, "dataplane chosen");
    let base = Status {
        version: crate::cli::VERSION.to_owned(),
        subnet: own_subnet.to_string(),
        public_ip: ext.public_ip.to_string(),
        network: range.network.to_string(),
        backend: cfg.backend.type_name().to_owned(),
        refused: refused.clone(),
        ..Status::default()
    };
    publish(health, &base, &backend);

    health.set_ready(true);
    match notify::notify_ready() {
        Ok(true) => info!("notified systemd: READY=1"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "sd_notify failed"),
    }
    info!(subnet = %own_subnet, "flanneld is ready");

    let mut check = interval_after(backend::CHECK_PERIOD);
    let mut status_tick = interval_after(STATUS_PERIOD);
    let mut base = base;
    let mut dirty = false;
    let mut blackhole_check = interval_after(Duration::from_secs(flags.iptables_resync.max(1)));
    loop {
        tokio::select! {
            ev = rx.recv() => match ev.inspect(|_| dirty = true) {
                Some(ManagerEvent::Peers(evs)) => {
                    evs.iter().for_each(log_peer);
                    if let Err(e) = backend.peers(&netlink, &evs).await {
                        warn!(error = %e, "applying peer changes failed");
                    }
                }
                Some(ManagerEvent::Snapshot(peers)) => {
                    info!(peers = peers.len(), "peer set resynchronised");
                    if let Err(e) = backend.snapshot(&netlink, &peers).await {
                        warn!(error = %e, "reconciling with the peer set failed");
                    }
                }
                Some(ManagerEvent::OwnLease(l)) => {
                    base.subnet = l.subnet().to_string();
                    if let Err(e) = backend.own_lease(&netlink, l.subnet()).await {
                        error!(error = %e, "updating the backend for our new lease failed");
                    }
                    if let Some(b) = &mut blackhole
                        && let Err(e) = b.move_to(&netlink, l.subnet()).await
                    {
                        warn!(error = %e, "moving the blackhole route failed");
                    }
                    if let Err(e) = host.apply(l.subnet()).await {
                        error!(error = %e, "updating the host for our new lease failed");
                    }
                }
                None => break,
            },
            // Every batch of peer changes is visible in `flanneld status` at once.
            () = std::future::ready(()), if rx.is_empty() && dirty => {
                dirty = false;
                publish(health, &base, &backend);
            }
            ev = next_link_event(&mut links) => {
                if let Err(e) = backend.link_event(&netlink, &ev).await {
                    warn!(error = %e, "handling a link change failed, retrying at the next check");
                }
            }
            _ = status_tick.tick() => publish(health, &base, &backend),
            _ = check.tick() => {
                if let Err(e) = backend.check(&netlink).await {
                    warn!(error = %e, "periodic backend check failed");
                }
            }
            _ = blackhole_check.tick(), if blackhole.is_some() => {
                if let Some(b) = &blackhole
                    && let Err(e) = b.ensure(&netlink).await
                {
                    warn!(error = %e, "re-adding the blackhole route failed");
                }
            }
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

/// How often counters are refreshed for `/metrics` and `flanneld status`.
const STATUS_PERIOD: Duration = Duration::from_secs(2);

/// Publishes the status snapshot: the fixed part plus the backend's live view.
fn publish(health: &Health, base: &Status, backend: &Backend) {
    let st = backend.status();
    let mut refused = base.refused.clone();
    for r in st.refused {
        if !refused.contains(&r) {
            refused.push(r);
        }
    }
    health.set_status(Status {
        dataplane: st.dataplane,
        refused,
        peers: st.peers,
        verdicts: st.verdicts,
        ..base.clone()
    });
}

/// A tokio interval whose first tick is one period from now, and which does not burst
/// after a stall.
fn interval_after(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// The next link notification; pending forever without a monitor. A monitor whose
/// connection ended is dropped (the periodic check still covers the device).
async fn next_link_event(links: &mut Option<LinkMonitor>) -> LinkEvent {
    if let Some(m) = links {
        if let Some(ev) = m.next().await {
            return ev;
        }
        warn!("link notifications ended; relying on the periodic check");
        *links = None;
    }
    std::future::pending().await
}
