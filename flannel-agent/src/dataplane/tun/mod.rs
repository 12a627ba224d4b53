//! The TUN dataplane: the overlay served from userspace, for nodes where BPF is not
//! available. It speaks both of flannel's encapsulations:
//! - [`Wire::Udp`], flannel's udp backend: the UDP payload is the inner IPv4 packet,
//!   with no header, and its TTL is decremented on send and on receive (checksum
//!   patched per RFC 1624), as flanneld's `proxy_amd64.c` does;
//! - [`Wire::Vxlan`]: an 8-byte VXLAN header (I flag, VNI) and an inner Ethernet header
//!   from our VtepMAC to the peer's, exactly what a kernel `flannel.<VNI>` sends and
//!   accepts, so this node sits in a cluster of kernel and eBPF vxlan peers.
//!
//! Why it is not flanneld's 10%-of-vxlan proxy:
//! - a multiqueue TUN (`IFF_MULTI_QUEUE`) with one queue, one `SO_REUSEPORT` socket and
//!   a tx and an rx thread per CPU ([`worker`]);
//! - `IFF_VNET_HDR` with `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4)`: TCP arrives as 64 KB
//!   super-packets, segmented here straight into the send buffer, then sent as one
//!   `UDP_SEGMENT` message (the kernel, or the veth's GSO, cuts the datagrams);
//! - `UDP_GRO` on the sockets and `recvmmsg`/`sendmmsg` batching; received TCP segments
//!   are merged back into super-packets before they are written to the TUN.
//!
//! Checks on every datagram, as the eBPF path makes them: the outer source must be a
//! peer's PublicIP, the inner source inside that peer's subnet, the inner destination
//! inside our subnet; VXLAN must carry our VNI and our VtepMAC. Anything else is
//! dropped and counted by reason ([`Verdict`]), as are packets for destinations no peer
//! holds (answered with ICMP net unreachable, like flanneld).
//!
//! Lifetime: [`TunDataplane::start`] creates the device (non-persistent: it goes away
//! with the last queue fd, i.e. with flanneld) and the workers; the backend gives it
//! an address and routes over rtnetlink, and feeds [`TunDataplane::set_peers`].
//! Dropping it stops the workers.

pub mod packet;
pub mod reference;
mod sys;
pub mod table;
mod worker;

use std::{
    io,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread::JoinHandle,
};

use ipnet::Ipv4Net;
use tracing::{info, warn};

pub use packet::Verdict;
pub use table::{PeerCounts, TunPeer};

use crate::mac::MacAddr;

/// The encapsulation on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// flannel's udp backend: raw IPv4 in UDP.
    Udp,
    /// VXLAN as a kernel `flannel.<VNI>`: our VNI and VtepMAC.
    Vxlan { vni: u32, mac: MacAddr },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// The device name (`flannel0`, `flannel.1`; a `%d` pattern is expanded).
    pub name: String,
    pub wire: Wire,
    /// Where the sockets listen: the external interface address and `Port`.
    pub bind: SocketAddrV4,
    /// The port peers listen on (flannel requires every node to use the same).
    pub port: u16,
    /// The device MTU (the backend sets it): received TCP packets longer than this are
    /// handed to the kernel as GSO packets cut to it.
    pub mtu: u32,
    /// Queues (and tx/rx thread pairs); 0 means one per CPU.
    pub queues: usize,
    /// `IFF_VNET_HDR` with TSO/checksum offload and GRO; false gives the plain path,
    /// one packet per read and write.
    pub offload: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("cannot open /dev/net/tun: {0} (needs the tun driver and CAP_NET_ADMIN)")]
    Unavailable(#[source] io::Error),
    #[error("cannot create TUN device {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the UDP socket to {addr}: {source}")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the TUN workers: {0}")]
    Workers(#[source] io::Error),
}

/// What the running dataplane managed to turn on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub queues: usize,
    /// `IFF_VNET_HDR` (GRO into the TUN).
    pub vnet_hdr: bool,
    /// TSO and checksum offload from the TUN.
    pub tso: bool,
    /// `UDP_GRO` on the sockets.
    pub udp_gro: bool,
    /// `UDP_SEGMENT` on send (cleared if the kernel refuses it).
    pub udp_gso: bool,
}

/// Checks that a TUN device can be made here, without making one.
pub fn probe() -> Result<(), TunError> {
    sys::tun_available().map_err(TunError::Unavailable)
}

/// The running dataplane.
pub struct TunDataplane {
    name: String,
    port: u16,
    shared: Arc<worker::Shared>,
    features: Features,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TunDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDataplane")
            .field("name", &self.name)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl TunDataplane {
    /// Creates the device and its sockets, and starts the workers (in the calling
    /// thread's network namespace). The device is down and has no address yet.
    pub fn start(cfg: TunConfig) -> Result<Self, TunError> {
        let queues = if cfg.queues == 0 {
            sys::cpus().min(16)
        } else {
            cfg.queues
        };
        let create = |name: &str, source| TunError::Create {
            name: name.to_owned(),
            source,
        };
        let (first, name) =
            sys::open_tun_queue(&cfg.name, cfg.offload).map_err(|e| create(&cfg.name, e))?;
        let tso = cfg.offload
            && match sys::set_tun_offload(&first, true) {
                Ok(()) => true,
                Err(e) => {
                    warn!(device = %name, error = %e, "TUN offloads refused: reading packet by packet");
                    false
                }
            };
        let mut tuns = vec![first];
        for _ in 1..queues {
            let (fd, _) = sys::open_tun_queue(&name, cfg.offload).map_err(|e| create(&name, e))?;
            tuns.push(fd);
        }
        let stop = sys::eventfd().map_err(TunError::Workers)?;
        let mut socks = Vec::new();
        let mut udp_gro = cfg.offload;
        for _ in 0..queues {
            let (s, f) =
                sys::udp_socket(cfg.bind, cfg.offload).map_err(|source| TunError::Bind {
                    addr: cfg.bind,
                    source,
                })?;
            udp_gro &= f.gro;
            socks.push(s);
        }
        let shared = Arc::new(worker::Shared {
            wire: cfg.wire,
            table: table::SharedTable::default(),
            drops: table::Drops::default(),
            vnet: cfg.offload,
            mtu: cfg.mtu as usize, // u32 fits
            udp_gso: AtomicBool::new(cfg.offload),
            failed: AtomicBool::new(false),
            stop,
        });
        let our_mac = match cfg.wire {
            Wire::Vxlan { mac, .. } => Some(mac),
            Wire::Udp => None,
        };
        let mut dp = Self {
            name,
            port: cfg.port,
            shared: shared.clone(),
            features: Features {
                queues,
                vnet_hdr: cfg.offload,
                tso,
                udp_gro,
                udp_gso: cfg.offload,
            },
            threads: Vec::new(),
        };
        for (q, (tun, sock)) in tuns.into_iter().zip(socks).enumerate() {
            // On failure `dp` drops here, stopping the workers already started.
            let pair = worker::spawn(&shared, q, Arc::new(tun), Arc::new(sock), udp_gro, our_mac)
                .map_err(TunError::Workers)?;
            dp.threads.extend(pair);
        }
        info!(device = %dp.name, queues, tso, udp_gro, bind = %cfg.bind, "TUN dataplane started");
        Ok(dp)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn features(&self) -> Features {
        Features {
            udp_gso: self.shared.udp_gso.load(Relaxed),
            ..self.features
        }
    }

    /// False once a worker stopped on an error (the device was deleted, say): the
    /// backend starts a new dataplane.
    pub fn healthy(&self) -> bool {
        !self.shared.failed.load(Relaxed)
    }

    /// Replaces the peer set and our subnet (datagrams for other inner destinations
    /// are dropped). Counters of peers that stay are kept.
    pub fn set_peers(&self, own: Option<Ipv4Net>, peers: &[TunPeer]) {
        let old = self.shared.table.load();
        let peers: Vec<TunPeer> = peers
            .iter()
            .filter(|p| matches!(self.shared.wire, Wire::Udp) || p.vtep_mac.is_some())
            .copied()
            .collect();
        self.shared
            .table
            .store(table::Table::new(own, &peers, self.port, &old));
    }

    /// Per-peer packet and byte counts.
    pub fn peer_counts(&self) -> Vec<(TunPeer, PeerCounts)> {
        self.shared
            .table
            .load()
            .entries()
            .iter()
            .map(|e| {
                let c = &e.counters;
                (
                    e.peer,
                    PeerCounts {
                        tx_packets: c.tx_packets.load(Relaxed),
                        tx_bytes: c.tx_bytes.load(Relaxed),
                        rx_packets: c.rx_packets.load(Relaxed),
                        rx_bytes: c.rx_bytes.load(Relaxed),
                    },
                )
            })
            .collect()
    }

    /// Dropped packets by reason.
    pub fn drops(&self) -> Vec<(Verdict, u64)> {
        Verdict::ALL
            .iter()
            .map(|&v| (v, self.shared.drops.get(v)))
            .collect()
    }
}

impl Drop for TunDataplane {
    fn drop(&mut self) {
        if let Err(e) = sys::signal(&self.shared.stop) {
            warn!(error = %e, "cannot stop the TUN workers");
            return;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
