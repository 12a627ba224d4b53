//! The eBPF fast path of flannel's udp backend: TC programs on `flannel0` and the underlay.
//!
//! Design note. The udp backend keeps flanneld's kernel state (the TUN `flannel0` with
//! `IFF_TUN | IFF_NO_PI`, its `.0/32` address, MTU = underlay − 28, the route for the whole
//! Network via `flannel0`) and its userspace proxy on `Port` (8285). This module puts two
//! TC programs on top: `flannel_udp_encap` at the egress of `flannel0` and
//! `flannel_udp_decap` at the ingress of the underlay. They move flanneld's packets (raw
//! IPv4 in UDP, inner TTL decremented once each way) without the copies through
//! userspace. Whatever they cannot handle stays on flanneld's path: encap leaves it in
//! `flannel0` for the proxy to read, decap leaves it to the UDP socket. So the proxy must
//! keep running; the maps only say which peers may take the fast lane.
//!
//! It shares everything but its configuration with the VXLAN fast path ([`super::ebpf`]):
//! the BPF object, the peer, source and counter map types, the reasons, the pinning,
//! adoption and migration rules. Its pins live under `<pin_dir>/udp/`
//! (`v<LAYOUT_VERSION>/<MAP>`, `links/{encap,decap}`), so the two never share state even
//! with one `pin_dir`.
//!
//! Lifetime. As for the vxlan path: a dropped [`UdpFastPath`] leaves the programs
//! attached and forwarding; [`UdpFastPath::attach`] reuses the maps of its own layout as
//! they are, and migrates those of another layout (`udp/v<N>`): every map whose type and
//! key and value sizes are unchanged is carried over, the state before the new programs
//! replace the old ones on the links, the counters right after (peers keep their slots,
//! counters go on); a changed one starts empty with a warning, and the old pins go once
//! the new programs run. Decap keeps
//! dropping unknown sources after a migration only if the old layout had been synced and
//! both peer maps were copied.
//!
//! How the udp backend uses it (`--dataplane ebpf`, or `auto` when
//! [`UdpFastPath::probe`] succeeds):
//! 1. Set up exactly what flanneld sets up: `flannel0` (`IFF_TUN | IFF_NO_PI`) with the
//!    lease subnet's `.0/32`, MTU = underlay − 28, up, the route for the whole Network via
//!    `flannel0`, and the userspace proxy on `PublicIP:Port`. The proxy stays the fallback
//!    for everything the programs pass on.
//! 2. From a thread in the node's network namespace, [`UdpFastPath::attach`] with
//!    `tun_ifindex` = `flannel0`, `underlay_ifindex`/`underlay_mtu` = the external
//!    interface, our PublicIP, `Port`, the lease subnet and the usual pin directory. It
//!    adopts what a previous run pinned (no flush).
//! 3. Right after, [`UdpFastPath::sync_peers`] with the full peer set (this also turns on
//!    dropping datagrams from unknown sources); then [`UdpFastPath::upsert_peer`] /
//!    [`UdpFastPath::remove_peer`] per lease event, together with the proxy's own route
//!    table. Resyncs call `sync_peers`.
//! 4. If `flannel0` or the external interface is recreated (new ifindex), attach again:
//!    stale pinned links are replaced. A `flannel0` made persistent (`TUNSETPERSIST`)
//!    survives the agent, and the programs keep forwarding while it is away; a
//!    non-persistent one goes with the agent's file descriptor, and the encap with it.
//! 5. On exit, just drop it.
//!
//! Underlays that hand GSO packets to the peer whole (veth and bridge: nodes that are
//! containers on one machine) need `tx-udp_tnl-segmentation` and
//! `tx-udp_tnl-csum-segmentation` off on the external interface, as a NIC's wire would
//! carry segments: no flannel-udp receiver can take a UDP-tunnel aggregate apart (decap
//! passes it on as `pass_gso`).

use std::{net::Ipv4Addr, path::PathBuf};

use aya::programs::TcAttachType;
use flannel_common::{
    MAP_UDP_CONFIG, PROG_UDP_DECAP, PROG_UDP_ENCAP, UDP_PINNED_MAPS,
    maps::{FLAG_PEERS_SYNCED, UdpConfig},
};
use ipnet::Ipv4Net;

use super::{
    ebpf::{EbpfError, LINK_DECAP, LINK_ENCAP, probe_programs},
    pinned::{Attached, MaclessPeer, node_config, open_pinned, peer_api, to_be},
};

node_config!(UdpConfig, MAP_UDP_CONFIG);

/// Subdirectory of the pin directory that holds the udp fast path's pins.
pub const UDP_PIN_SUBDIR: &str = "udp";

/// What the udp fast path needs to know about this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpFastPathConfig {
    /// `flannel0`'s ifindex: encap runs at its TC egress, decap delivers to its ingress.
    pub tun_ifindex: u32,
    /// The external interface's ifindex: decap runs at its TC ingress, encap sends there.
    pub underlay_ifindex: u32,
    /// The external interface's MTU (non-GSO packets that would exceed it after encap
    /// stay on the userspace path).
    pub underlay_mtu: u32,
    /// Our PublicIP (outer source; the outer destination decap accepts).
    pub public_ip: Ipv4Addr,
    /// flannel's `Port` (default 8285): the outer UDP destination, and what decap takes.
    pub port: u16,
    /// Our lease subnet; decap delivers only inner destinations inside it.
    pub subnet: Ipv4Net,
    /// The pin directory, shared with the vxlan path ([`super::DEFAULT_PIN_DIR`]; tests use
    /// a private bpffs); the pins go into its [`UDP_PIN_SUBDIR`].
    pub pin_dir: PathBuf,
}

/// One peer lease, as the udp fast path needs it.
pub type UdpPeerEntry = MaclessPeer;

/// The attached udp fast path. Dropping it leaves the programs attached (pinned links)
/// and the maps pinned: forwarding goes on without the agent.
#[derive(Debug)]
pub struct UdpFastPath {
    fp: Attached<UdpConfig>,
}

impl UdpFastPath {
    /// Checks that this flanneld and kernel can run the udp fast path, without attaching
    /// anything: the object is built in, the kernel has TCX (6.6+), maps can be created
    /// and the verifier accepts both udp programs. For `--dataplane auto`.
    pub fn probe() -> Result<(), EbpfError> {
        probe_programs(
            &[PROG_UDP_ENCAP, PROG_UDP_DECAP],
            "loading the udp tc programs (verifier or helpers)",
        )
    }

    /// Loads the programs, adopts or creates the pinned maps (migrating the entries of an
    /// older layout's maps into new ones), writes the configuration and attaches both
    /// programs (replacing, without a gap, programs a previous agent left attached). Call
    /// from a thread in the network namespace of the interfaces, once `flannel0` exists
    /// and is up.
    ///
    /// Until the first [`UdpFastPath::sync_peers`], flannel-udp from unknown sources is
    /// left to the userspace proxy (unless adopted or migrated maps say the peers were
    /// synced); call it right after attaching with the full peer set.
    pub fn attach(cfg: UdpFastPathConfig) -> Result<UdpFastPath, EbpfError> {
        if cfg.public_ip.is_unspecified() {
            return Err(EbpfError::Config("the public IP is unspecified"));
        }
        if cfg.port == 0 {
            return Err(EbpfError::Config("the udp port is 0"));
        }
        let root = cfg.pin_dir.join(UDP_PIN_SUBDIR);
        let (state, pending) = open_pinned::<UdpConfig>(
            &cfg.pin_dir,
            &root,
            UDP_PINNED_MAPS,
            &[PROG_UDP_DECAP, PROG_UDP_ENCAP],
            "udp",
        )?;
        let mut fp = Attached::new(&cfg.pin_dir, root, state, "udp", |synced| UdpConfig {
            public_ip_be: to_be(cfg.public_ip),
            subnet_be: to_be(cfg.subnet.trunc().addr()),
            subnet_mask_be: to_be(cfg.subnet.netmask()),
            underlay_ifindex: cfg.underlay_ifindex,
            tun_ifindex: cfg.tun_ifindex,
            underlay_mtu: cfg.underlay_mtu,
            flags: if synced { FLAG_PEERS_SYNCED } else { 0 },
            port_be: cfg.port.to_be(),
            _pad: 0,
        })?;
        fp.attach(
            PROG_UDP_DECAP,
            cfg.underlay_ifindex,
            TcAttachType::Ingress,
            LINK_DECAP,
        )?;
        fp.attach(
            PROG_UDP_ENCAP,
            cfg.tun_ifindex,
            TcAttachType::Egress,
            LINK_ENCAP,
        )?;
        pending.finish(&mut fp.ebpf)?;
        Ok(UdpFastPath { fp })
    }

    peer_api!(UdpPeerEntry);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend keeps the fast path in async tasks.
    #[test]
    fn fast_path_is_send() {
        fn send<T: Send>() {}
        send::<UdpFastPath>();
    }
}
