//! The eBPF fast path of flannel's host-gw backend: forwarding in TC, next to the routes.
//!
//! Design note. The host-gw backend keeps flannel's kernel state (a route per peer via its
//! PublicIP) and this module puts two TC programs next to it: `flannel_hostgw_from_peer`
//! at the ingress of the underlay, and `flannel_hostgw_to_peer` at the ingress of every
//! pod-facing device (the bridge holding the lease subnet's gateway address, which
//! Docker or the CNI bridge plugin creates, so the backend finds them and calls
//! [`HostGwFastPath::set_pod_devices`]). They forward what the kernel would forward, to
//! the next hop the FIB names, without the kernel's forwarding path; whatever they pass
//! on still finds the routes. The cost is that netfilter on this node does not see the
//! packets they forward (see `flannel-ebpf/src/hostgw.rs`), which is why it only runs
//! with `--dataplane ebpf`.
//!
//! It shares the object, the peer and counter maps, the reasons and the pinning rules
//! with the tunnel fast paths ([`super::ebpf`]). Its pins live under `<pin_dir>/hostgw/`
//! (`v<LAYOUT_VERSION>/<MAP>`, `links/from_peer`, `links/to_peer_<ifindex>`), so a
//! restart adopts them (no flush) and SIGKILL leaves forwarding running.

use std::{collections::BTreeSet, fs, net::Ipv4Addr, path::PathBuf};

use aya::programs::TcAttachType;
use flannel_common::{
    HOSTGW_PINNED_MAPS, MAP_HOSTGW_CONFIG, PROG_HOSTGW_FROM_PEER, PROG_HOSTGW_TO_PEER,
    maps::{FLAG_PEERS_SYNCED, HostGwConfig},
};
use ipnet::Ipv4Net;
use tracing::debug;

use super::{
    ebpf::{EbpfError, probe_programs},
    pinned::{
        Attached, LINKS_DIR, MaclessPeer, node_config, open_pinned, peer_api, to_be, unpin_link,
    },
    sys,
};

node_config!(HostGwConfig, MAP_HOSTGW_CONFIG);

/// Subdirectory of the pin directory that holds the host-gw fast path's pins.
pub const HOSTGW_PIN_SUBDIR: &str = "hostgw";
/// The link of `flannel_hostgw_from_peer` on the underlay.
const LINK_FROM_PEER: &str = "from_peer";
/// Prefix of the links of `flannel_hostgw_to_peer`, one per pod device: `to_peer_<ifindex>`
/// (bpffs refuses names with a dot).
const LINK_TO_PEER: &str = "to_peer_";

/// What the host-gw fast path needs to know about this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostGwFastPathConfig {
    /// The external interface: traffic to peers leaves there, from peers arrives there.
    pub underlay_ifindex: u32,
    /// Our PublicIP (the external interface's address).
    pub public_ip: Ipv4Addr,
    /// Our lease subnet: only sources in it go to peers, only destinations in it are
    /// delivered from peers.
    pub subnet: Ipv4Net,
    /// The pin directory, shared with the other fast paths ([`super::DEFAULT_PIN_DIR`];
    /// tests use a private bpffs); the pins go into its [`HOSTGW_PIN_SUBDIR`].
    pub pin_dir: PathBuf,
}

/// One peer lease, as the host-gw fast path needs it.
pub type HostGwPeerEntry = MaclessPeer;

/// The attached host-gw fast path. Dropping it leaves the programs attached (pinned
/// links) and the maps pinned: forwarding goes on without the agent.
#[derive(Debug)]
pub struct HostGwFastPath {
    fp: Attached<HostGwConfig>,
    /// The devices `flannel_hostgw_to_peer` is attached to.
    pod_devices: BTreeSet<u32>,
}

impl HostGwFastPath {
    /// Checks that this flanneld and kernel can run the host-gw fast path, without
    /// attaching anything: the object is built in, the kernel has TCX (6.6+), maps can be
    /// created and the verifier accepts both programs.
    pub fn probe() -> Result<(), EbpfError> {
        probe_programs(
            &[PROG_HOSTGW_TO_PEER, PROG_HOSTGW_FROM_PEER],
            "loading the host-gw tc programs (verifier or helpers)",
        )
    }

    /// Loads the programs, adopts, creates or migrates the pinned maps, writes the
    /// configuration and attaches `flannel_hostgw_from_peer` to the underlay, and
    /// `flannel_hostgw_to_peer` to the pod devices whose links a previous agent pinned
    /// (replacing, without a gap, the programs it left attached). Later pod devices come
    /// with [`HostGwFastPath::set_pod_devices`]. Call from a thread in the node's network
    /// namespace.
    pub fn attach(cfg: HostGwFastPathConfig) -> Result<HostGwFastPath, EbpfError> {
        if cfg.public_ip.is_unspecified() {
            return Err(EbpfError::Config("the public IP is unspecified"));
        }
        let root = cfg.pin_dir.join(HOSTGW_PIN_SUBDIR);
        let (state, pending) = open_pinned::<HostGwConfig>(
            &cfg.pin_dir,
            &root,
            HOSTGW_PINNED_MAPS,
            &[PROG_HOSTGW_FROM_PEER, PROG_HOSTGW_TO_PEER],
            "host-gw",
        )?;
        let fp = Attached::new(&cfg.pin_dir, root, state, "host-gw", |synced| {
            HostGwConfig {
                public_ip_be: to_be(cfg.public_ip),
                subnet_be: to_be(cfg.subnet.trunc().addr()),
                subnet_mask_be: to_be(cfg.subnet.netmask()),
                underlay_ifindex: cfg.underlay_ifindex,
                flags: if synced { FLAG_PEERS_SYNCED } else { 0 },
                _pad: 0,
            }
        })?;
        let mut hg = HostGwFastPath {
            fp,
            pod_devices: BTreeSet::new(),
        };
        hg.fp.attach(
            PROG_HOSTGW_FROM_PEER,
            cfg.underlay_ifindex,
            TcAttachType::Ingress,
            LINK_FROM_PEER,
        )?;
        // The pod devices of the previous agent keep their links (and get the new
        // program) now, so that no old program still runs when the migration finishes.
        let pinned: BTreeSet<u32> = hg
            .pinned_pod_links()?
            .into_iter()
            .map(|(ifindex, _)| ifindex)
            .filter(|&ifindex| sys::ifname(ifindex).is_ok())
            .collect();
        hg.set_pod_devices(&pinned)?;
        pending.finish(&mut hg.fp.ebpf)?;
        Ok(hg)
    }

    /// The `to_peer_<ifindex>` links pinned now: (ifindex, pin path).
    fn pinned_pod_links(&self) -> Result<Vec<(u32, PathBuf)>, EbpfError> {
        let links = self.fp.root.join(LINKS_DIR);
        let entries = fs::read_dir(&links).map_err(|source| EbpfError::PinDir {
            op: "list",
            path: links.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .filter_map(|entry| {
                let ifindex = entry
                    .file_name()
                    .to_str()?
                    .strip_prefix(LINK_TO_PEER)?
                    .parse::<u32>()
                    .ok()?;
                Some((ifindex, entry.path()))
            })
            .collect())
    }

    /// Attaches `flannel_hostgw_to_peer` to exactly `devices` (by ifindex): new ones get
    /// a pinned link (or adopt the one a previous agent pinned), devices no longer listed
    /// lose theirs, as do pins of devices that are gone.
    pub fn set_pod_devices(&mut self, devices: &BTreeSet<u32>) -> Result<(), EbpfError> {
        for &ifindex in devices.difference(&self.pod_devices.clone()) {
            self.fp.attach(
                PROG_HOSTGW_TO_PEER,
                ifindex,
                TcAttachType::Ingress,
                &format!("{LINK_TO_PEER}{ifindex}"),
            )?;
            self.pod_devices.insert(ifindex);
        }
        for (ifindex, path) in self.pinned_pod_links()? {
            if !devices.contains(&ifindex) {
                unpin_link(&path)?;
                self.pod_devices.remove(&ifindex);
                debug!(ifindex, "host-gw fast path detached from a pod device");
            }
        }
        Ok(())
    }

    /// The devices `flannel_hostgw_to_peer` is attached to, by ifindex.
    pub fn pod_devices(&self) -> &BTreeSet<u32> {
        &self.pod_devices
    }

    peer_api!(HostGwPeerEntry);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend keeps the fast path in async tasks.
    #[test]
    fn fast_path_is_send() {
        fn send<T: Send>() {}
        send::<HostGwFastPath>();
    }
}
