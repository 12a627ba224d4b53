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

use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader, maps::Array, programs::TcAttachType};
use flannel_common::{
    HOSTGW_PINNED_MAPS, LAYOUT_VERSION, MAP_HOSTGW_CONFIG, PROG_HOSTGW_FROM_PEER,
    PROG_HOSTGW_TO_PEER,
    maps::{FLAG_PEERS_SYNCED, HostGwConfig, PeerCounters},
};
use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use super::ebpf::{
    EbpfError, LINKS_DIR, PeerTable, attach_program, check_pinned_layout, drop_counters,
    ebpf_object, from_be, make_private_dir, map_err, map_mut, other_layouts, prepare_pin_dir,
    probe_programs, remove_pins, to_be, unpin_link, unpin_links,
};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostGwPeerEntry {
    /// The peer's lease subnet.
    pub subnet: Ipv4Net,
    /// The peer's PublicIP: the gateway of its route.
    pub public_ip: Ipv4Addr,
}

/// The attached host-gw fast path. Dropping it leaves the programs attached (pinned
/// links) and the maps pinned: forwarding goes on without the agent.
pub struct HostGwFastPath {
    ebpf: Ebpf,
    /// `<pin_dir>/hostgw`.
    root: PathBuf,
    layout_dir: PathBuf,
    config: HostGwConfig,
    table: PeerTable,
    /// The devices `flannel_hostgw_to_peer` is attached to.
    pod_devices: BTreeSet<u32>,
}

impl std::fmt::Debug for HostGwFastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostGwFastPath")
            .field("pin_dir", &self.root)
            .field("peers", &self.table.len())
            .field("pod_devices", &self.pod_devices)
            .finish_non_exhaustive()
    }
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

    /// Loads the programs, adopts or creates the pinned maps, writes the configuration
    /// and attaches `flannel_hostgw_from_peer` to the underlay (replacing, without a gap,
    /// a program a previous agent left attached). Pod devices come with
    /// [`HostGwFastPath::set_pod_devices`]; the links a previous agent pinned for them
    /// are adopted then. Call from a thread in the node's network namespace.
    pub fn attach(cfg: HostGwFastPathConfig) -> Result<HostGwFastPath, EbpfError> {
        let object = ebpf_object()?;
        if cfg.public_ip.is_unspecified() {
            return Err(EbpfError::Config("the public IP is unspecified"));
        }
        prepare_pin_dir(&cfg.pin_dir)?;
        let root = cfg.pin_dir.join(HOSTGW_PIN_SUBDIR);
        let layout_dir = root.join(format!("v{LAYOUT_VERSION}"));
        make_private_dir(&layout_dir)?;
        make_private_dir(&root.join(LINKS_DIR))?;
        check_pinned_layout(&layout_dir, HOSTGW_PINNED_MAPS)?;
        let old_layouts = other_layouts(&root)?;

        let mut loader = EbpfLoader::new();
        for name in HOSTGW_PINNED_MAPS {
            loader.map_pin_path(name, layout_dir.join(name));
        }
        let ebpf = loader
            .load(object)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;

        let mut fp = HostGwFastPath {
            ebpf,
            root,
            layout_dir,
            config: HostGwConfig::default(),
            table: PeerTable::default(),
            pod_devices: BTreeSet::new(),
        };
        let previous = fp.read_config()?;
        fp.table = PeerTable::load(&fp.ebpf)?;
        for (version, dir) in &old_layouts {
            // Layout 3 is the first with the host-gw fast path: nothing older to convert.
            warn!(
                version,
                current = LAYOUT_VERSION,
                dir = %dir.display(),
                "pinned host-gw maps of another layout are not reused; starting with new maps"
            );
        }
        let synced = previous.public_ip_be != 0 && previous.flags & FLAG_PEERS_SYNCED != 0;
        if previous.public_ip_be != 0 {
            info!(
                peers = fp.table.len(),
                synced, "adopted pinned host-gw eBPF maps (layout v{LAYOUT_VERSION})"
            );
        }
        fp.config = HostGwConfig {
            public_ip_be: to_be(cfg.public_ip),
            subnet_be: to_be(cfg.subnet.trunc().addr()),
            subnet_mask_be: to_be(cfg.subnet.netmask()),
            underlay_ifindex: cfg.underlay_ifindex,
            flags: if synced { FLAG_PEERS_SYNCED } else { 0 },
            _pad: 0,
        };
        fp.write_config()?;

        attach_program(
            &mut fp.ebpf,
            PROG_HOSTGW_FROM_PEER,
            cfg.underlay_ifindex,
            TcAttachType::Ingress,
            &fp.root.join(LINKS_DIR).join(LINK_FROM_PEER),
        )?;
        // The old programs are gone from the links; their maps can go too.
        for (version, dir) in &old_layouts {
            remove_pins(dir)?;
            info!(version, "removed pinned host-gw maps of an old layout");
        }
        Ok(fp)
    }

    fn read_config(&self) -> Result<HostGwConfig, EbpfError> {
        let map = self.ebpf.map(MAP_HOSTGW_CONFIG).ok_or(EbpfError::Missing {
            kind: "map",
            name: MAP_HOSTGW_CONFIG,
        })?;
        let array: Array<_, HostGwConfig> =
            Array::try_from(map).map_err(map_err("open", MAP_HOSTGW_CONFIG))?;
        array.get(&0, 0).map_err(map_err("read", MAP_HOSTGW_CONFIG))
    }

    fn write_config(&mut self) -> Result<(), EbpfError> {
        let config = self.config;
        let map = map_mut(&mut self.ebpf, MAP_HOSTGW_CONFIG)?;
        let mut array: Array<_, HostGwConfig> =
            Array::try_from(map).map_err(map_err("open", MAP_HOSTGW_CONFIG))?;
        array
            .set(0, config, 0)
            .map_err(map_err("write", MAP_HOSTGW_CONFIG))
    }

    fn to_peer_link(&self, ifindex: u32) -> PathBuf {
        self.root
            .join(LINKS_DIR)
            .join(format!("{LINK_TO_PEER}{ifindex}"))
    }

    /// Attaches `flannel_hostgw_to_peer` to exactly `devices` (by ifindex): new ones get
    /// a pinned link (or adopt the one a previous agent pinned), devices no longer listed
    /// lose theirs, as do pins of devices that are gone.
    pub fn set_pod_devices(&mut self, devices: &BTreeSet<u32>) -> Result<(), EbpfError> {
        for &ifindex in devices.difference(&self.pod_devices.clone()) {
            let link = self.to_peer_link(ifindex);
            attach_program(
                &mut self.ebpf,
                PROG_HOSTGW_TO_PEER,
                ifindex,
                TcAttachType::Ingress,
                &link,
            )?;
            self.pod_devices.insert(ifindex);
        }
        let links = self.root.join(LINKS_DIR);
        let pinned = fs::read_dir(&links).map_err(|source| EbpfError::PinDir {
            op: "list",
            path: links.clone(),
            source,
        })?;
        for entry in pinned.flatten() {
            let name = entry.file_name();
            let Some(ifindex) = name
                .to_str()
                .and_then(|n| n.strip_prefix(LINK_TO_PEER))
                .and_then(|i| i.parse::<u32>().ok())
            else {
                continue;
            };
            if !devices.contains(&ifindex) {
                unpin_link(&entry.path())?;
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

    /// The peers in the map now.
    pub fn peers(&self) -> Vec<HostGwPeerEntry> {
        self.table
            .iter()
            .map(|(subnet, p)| HostGwPeerEntry {
                subnet: *subnet,
                public_ip: from_be(p.public_ip_be),
            })
            .collect()
    }

    /// Makes the peer maps equal `desired`: new and changed peers first, then removes the
    /// ones no longer desired (update before delete). Unchanged peers are not touched.
    pub fn sync_peers(&mut self, desired: &[HostGwPeerEntry]) -> Result<(), EbpfError> {
        let wanted: BTreeSet<Ipv4Net> = desired.iter().map(|p| p.subnet.trunc()).collect();
        for entry in desired {
            self.upsert_peer(entry)?;
        }
        self.table.retain(&mut self.ebpf, &wanted)?;
        if self.config.flags & FLAG_PEERS_SYNCED == 0 {
            self.config.flags |= FLAG_PEERS_SYNCED;
            self.write_config()?;
        }
        Ok(())
    }

    /// Adds or updates one peer (no-op when the maps already say the same).
    pub fn upsert_peer(&mut self, entry: &HostGwPeerEntry) -> Result<(), EbpfError> {
        // Routed, not tunnelled: no VtepMAC.
        let changed = self
            .table
            .upsert(&mut self.ebpf, entry.subnet, entry.public_ip, [0; 6])?;
        if changed {
            debug!(subnet = %entry.subnet.trunc(), public_ip = %entry.public_ip, "host-gw fast path peer set");
        }
        Ok(())
    }

    /// Removes a peer (no-op when it is not there).
    pub fn remove_peer(&mut self, subnet: Ipv4Net) -> Result<(), EbpfError> {
        self.table.remove(&mut self.ebpf, subnet)
    }

    /// Traffic the fast path forwarded per peer, summed over CPUs. Bytes are IPv4
    /// packets.
    pub fn peer_counters(&self) -> Result<Vec<(Ipv4Net, PeerCounters)>, EbpfError> {
        self.table.counters(&self.ebpf)
    }

    /// Packets that left the fast path, per reason (`flannel_common::maps::reason`),
    /// summed over CPUs; all of them went to the kernel's forwarding.
    pub fn drop_counters(&self) -> Result<Vec<(&'static str, u64)>, EbpfError> {
        drop_counters(&self.ebpf)
    }

    /// Where this fast path's pins live (`<pin_dir>/hostgw`).
    pub fn pin_dir(&self) -> &Path {
        &self.root
    }

    /// Detaches every program and removes every pin of the host-gw fast path (links,
    /// maps, its directory, and the shared pin directory if that is then empty). For
    /// tests and for switching the dataplane off; a restart should just drop the value.
    pub fn detach_and_unpin(self) -> Result<(), EbpfError> {
        unpin_links(&self.root.join(LINKS_DIR))?;
        remove_pins(&self.layout_dir)?;
        drop(self.ebpf);
        // Only if empty: someone else's pins are never removed.
        let _ = fs::remove_dir(&self.root);
        if let Some(parent) = self.root.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }
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
