//! What every fast path (vxlan, udp, host-gw) shares: its pins and how they are kept.
//!
//! Design note. A fast path is a few TC programs of the one BPF object plus its maps,
//! pinned in a root-only directory on bpffs: `<root>/v<LAYOUT_VERSION>/<MAP>` for the maps
//! and `<root>/links/<name>` for the TCX links, where `<root>` is the pin directory (vxlan)
//! or a subdirectory of it (`udp`, `hostgw`), so two fast paths never share state. Pins
//! outlive the agent: SIGKILL leaves forwarding running. [`open_pinned`] adopts what a
//! previous agent left (maps of our layout as they are, no flush), migrates an older
//! layout's maps (`super::migrate`) and refuses pinned maps of our version with other
//! sizes; [`attach_program`] replaces the program on a live pinned link atomically
//! (`bpf_link_update`). [`Attached`] is an attached fast path: its maps, its node
//! configuration, and the peer maps ([`PeerTable`]) written in an order that never leaves
//! a peer half there.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapError, MapInfo, PerCpuArray, PerCpuValues, lpm_trie::Key},
    pin::PinError,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    util::nr_cpus,
};
use flannel_common::{
    LAYOUT_VERSION, MAP_PEER_COUNTERS, MAP_PEERS, MAP_REASONS, MAP_SOURCES, MAPS,
    maps::{FLAG_PEERS_SYNCED, MAX_PEERS, Peer, PeerCounters, PeerSource, reason},
};
use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use super::{
    ebpf::{EbpfError, ebpf_object},
    migrate::{Migration, migrate},
    sys,
};

/// Where bpffs is mounted (if it is not) when a pin directory below it is used.
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Subdirectory of a fast path's pin root holding its pinned links.
pub(super) const LINKS_DIR: &str = "links";

pub(super) fn to_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

fn map_err(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |e| EbpfError::Map {
        op,
        name,
        source: Box::new(e),
    }
}

pub(super) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|e| EbpfError::Program {
            op: "use as a tc classifier",
            name,
            source: Box::new(e),
        })
}

/// Creates `path` (and missing parents) with mode 0700, and forces 0700 on it.
fn make_private_dir(path: &Path) -> Result<(), EbpfError> {
    let dir_err = |op| {
        move |source| EbpfError::PinDir {
            op,
            path: path.to_owned(),
            source,
        }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(dir_err("create"))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(dir_err("chmod"))
}

/// Makes sure `pin_dir` can hold pins: mounts bpffs at /sys/fs/bpf for a directory
/// below it if needed; any other directory must already be on bpffs.
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), EbpfError> {
    if pin_dir.starts_with(BPFFS_ROOT) {
        let root = Path::new(BPFFS_ROOT);
        let mounted = sys::is_bpffs(root).map_err(|source| EbpfError::PinDir {
            op: "stat",
            path: root.to_owned(),
            source,
        })?;
        if !mounted {
            info!(path = BPFFS_ROOT, "mounting bpffs");
            sys::mount_bpffs(root).map_err(|source| EbpfError::Mount {
                path: root.to_owned(),
                source,
            })?;
        }
    } else {
        // The nearest existing ancestor must be on bpffs (pins cannot live elsewhere).
        let existing = pin_dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let on_bpffs = sys::is_bpffs(existing).map_err(|source| EbpfError::PinDir {
            op: "stat",
            path: existing.to_owned(),
            source,
        })?;
        if !on_bpffs {
            return Err(EbpfError::NotBpffs {
                path: pin_dir.to_owned(),
            });
        }
    }
    make_private_dir(pin_dir)
}

/// Refuses pinned maps (of those named in `pinned`) in `layout_dir` whose sizes differ
/// from this build's.
fn check_pinned_layout(layout_dir: &Path, pinned: &[&str]) -> Result<(), EbpfError> {
    for &(name, key, value) in MAPS {
        if !pinned.contains(&name) {
            continue;
        }
        let path = layout_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(map_err("open pinned", name))?;
        let found = (info.key_size(), info.value_size());
        if found != (key, value) {
            return Err(EbpfError::LayoutMismatch {
                path,
                expected: (key, value),
                found,
            });
        }
    }
    Ok(())
}

/// Pinned layout directories (`v<N>`) other than ours, by version.
fn other_layouts(pin_dir: &Path) -> Result<Vec<(u32, PathBuf)>, EbpfError> {
    let entries = fs::read_dir(pin_dir).map_err(|source| EbpfError::PinDir {
        op: "list",
        path: pin_dir.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(version) = name
            .to_str()
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        if version != LAYOUT_VERSION {
            out.push((version, entry.path()));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Removes every pin in `dir`, then `dir` itself.
fn remove_pins(dir: &Path) -> Result<(), EbpfError> {
    let rm_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| EbpfError::PinDir { op, path, source }
    };
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).map_err(rm_err("list", dir))?.flatten() {
        let path = entry.path();
        fs::remove_file(&path).map_err(rm_err("unpin", &path))?;
    }
    fs::remove_dir(dir).map_err(rm_err("remove", dir))
}

/// Opens the link pinned at `path` if it still attaches a program to `ifname` in
/// `attach_type`; removes the pin of a stale link (device deleted, interface changed).
fn live_pinned_link(
    path: &Path,
    ifname: &str,
    attach_type: TcAttachType,
) -> Result<Option<SchedClassifierLink>, EbpfError> {
    let link_err = |op: &'static str| {
        let path = path.to_owned();
        move |e: LinkError| EbpfError::Link {
            op,
            path,
            source: Box::new(e),
        }
    };
    if !path.exists() {
        return Ok(None);
    }
    let pinned = PinnedLink::from_pin(path).map_err(link_err("open pinned"))?;
    let fd: FdLink = pinned.into();
    let prog_id = fd.info().map_err(link_err("query"))?.program_id();
    let attached = SchedClassifier::query_tcx(ifname, attach_type)
        .map(|(_, progs)| progs.iter().any(|p| p.id() == prog_id))
        .unwrap_or(false);
    if !attached {
        warn!(path = %path.display(), ifname, "pinned link is stale; replacing it");
        fs::remove_file(path).map_err(|source| EbpfError::PinDir {
            op: "unpin",
            path: path.to_owned(),
            source,
        })?;
        return Ok(None);
    }
    SchedClassifierLink::try_from(fd)
        .map(Some)
        .map_err(link_err("adopt"))
}

/// Loads (verifies) program `name`, before [`attach_program`].
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), EbpfError> {
    classifier(ebpf, name)?
        .load()
        .map_err(|e| EbpfError::Program {
            op: "load",
            name,
            source: Box::new(e),
        })
}

/// Attaches the loaded ([`load_program`]) program `name` to `ifindex`, replacing the
/// program of the link pinned at `link_path` in place when that link is live, else with
/// a new pinned link.
fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    ifindex: u32,
    attach_type: TcAttachType,
    link_path: &Path,
) -> Result<(), EbpfError> {
    let ifname = sys::ifname(ifindex).map_err(|source| EbpfError::Interface { ifindex, source })?;
    let prog = classifier(ebpf, name)?;
    let prog_err = |op| {
        move |e| EbpfError::Program {
            op,
            name,
            source: Box::new(e),
        }
    };
    let existing = live_pinned_link(link_path, &ifname, attach_type)?;
    let adopted = existing.is_some();
    let link_id = match existing {
        Some(link) => prog.attach_to_link(link).map_err(prog_err("replace"))?,
        None => prog
            .attach_with_options(
                &ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(prog_err("attach"))?,
    };
    let link = prog.take_link(link_id).map_err(prog_err("take link of"))?;
    let fd: FdLink = link.try_into().map_err(|e: LinkError| EbpfError::Link {
        op: "convert",
        path: link_path.to_owned(),
        source: Box::new(e),
    })?;
    if adopted {
        // The pin keeps the link; our descriptor closes on drop without detaching.
        drop(fd);
    } else {
        fd.pin(link_path).map_err(|e: PinError| EbpfError::Link {
            op: "pin",
            path: link_path.to_owned(),
            source: Box::new(e),
        })?;
    }
    info!(program = name, ifname, adopted, "tc program attached");
    Ok(())
}

/// Detaches the program of the link pinned at `path` (if any) and removes the pin.
pub(super) fn unpin_link(path: &Path) -> Result<(), EbpfError> {
    if !path.exists() {
        return Ok(());
    }
    let pinned = PinnedLink::from_pin(path).map_err(|e| EbpfError::Link {
        op: "open pinned",
        path: path.to_owned(),
        source: Box::new(e),
    })?;
    // Unpinning drops the last reference but ours; dropping ours detaches.
    let fd = pinned.unpin().map_err(|source| EbpfError::PinDir {
        op: "unpin",
        path: path.to_owned(),
        source,
    })?;
    drop(fd);
    Ok(())
}

/// Detaches the programs of every link pinned in `links` and removes the pins and the
/// directory.
fn unpin_links(links: &Path) -> Result<(), EbpfError> {
    if !links.exists() {
        return Ok(());
    }
    let entries = fs::read_dir(links).map_err(|source| EbpfError::PinDir {
        op: "list",
        path: links.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        unpin_link(&entry.path())?;
    }
    remove_pins(links)
}

pub(super) fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, EbpfError> {
    ebpf.map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })
}

fn map_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, EbpfError> {
    ebpf.map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })
}

/// Packets that left the fast path of `ebpf`, per reason, summed over CPUs.
fn drop_counters(ebpf: &Ebpf) -> Result<Vec<(&'static str, u64)>, EbpfError> {
    let map = map_ref(ebpf, MAP_REASONS)?;
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(map_err("open", MAP_REASONS))?;
    (0..reason::COUNT)
        .map(|i| {
            let per_cpu = counters.get(&i, 0).map_err(map_err("read", MAP_REASONS))?;
            Ok((
                reason::NAMES[i as usize],
                per_cpu.iter().fold(0u64, |a, c| a.wrapping_add(*c)),
            ))
        })
        .collect()
}

/// The peer maps (`FLANNEL_PEERS`, `FLANNEL_SOURCES`, `FLANNEL_PEER_COUNTERS`) as the
/// agent wrote them, and the writes that keep them consistent. The vxlan and the udp
/// fast path share it: their programs use the same maps (each in its own pin directory).
#[derive(Debug, Default)]
pub(super) struct PeerTable {
    /// The peer map's content, keyed by subnet.
    peers: BTreeMap<Ipv4Net, Peer>,
    /// Counter slots in use.
    used_slots: BTreeSet<u32>,
    /// Peers whose source entry is missing (its map was not migrated, or the agent was
    /// killed between the two writes): the next upsert writes it, even if unchanged.
    unsourced: BTreeSet<Ipv4Net>,
}

/// The source entry of the peer with `subnet` (truncated) in counter slot `index`.
fn source_entry(subnet: Ipv4Net, index: u32) -> PeerSource {
    PeerSource {
        subnet_be: to_be(subnet.addr()),
        mask_be: to_be(subnet.netmask()),
        index,
        _pad: 0,
    }
}

impl PeerTable {
    /// Reads the peer maps of `ebpf` (adopted as they were, or just migrated) and makes
    /// them consistent. A peer is its entry in the peer map, which keeps its slot (and so
    /// its counters); when its source entry is missing or disagrees (a source map that
    /// could not be migrated, an agent killed between the two writes), the next upsert of
    /// that peer writes the source entry. Entries the table cannot stand for are removed:
    /// peer entries with an invalid prefix (or host bits), an invalid slot or one already
    /// taken, and source entries of no peer (they cannot be completed: the VtepMAC is in
    /// the peer entry).
    pub(super) fn load(ebpf: &mut Ebpf) -> Result<PeerTable, EbpfError> {
        let routes: Vec<(Key<u32>, Peer)> = {
            let map = map_ref(ebpf, MAP_PEERS)?;
            let trie: LpmTrie<_, u32, Peer> =
                LpmTrie::try_from(map).map_err(map_err("open", MAP_PEERS))?;
            trie.iter()
                .collect::<Result<_, _>>()
                .map_err(map_err("iterate", MAP_PEERS))?
        };
        let sources: BTreeMap<u32, PeerSource> = {
            let map = map_ref(ebpf, MAP_SOURCES)?;
            let hash: HashMap<_, u32, PeerSource> =
                HashMap::try_from(map).map_err(map_err("open", MAP_SOURCES))?;
            hash.iter()
                .collect::<Result<_, _>>()
                .map_err(map_err("iterate", MAP_SOURCES))?
        };
        let mut table = PeerTable::default();
        let mut bad_routes = Vec::new();
        for (key, peer) in routes {
            let net = Ipv4Net::new(from_be(key.data()), key.prefix_len() as u8)
                .ok()
                .filter(|net| {
                    net.trunc() == *net
                        && peer.index < MAX_PEERS
                        && !table.used_slots.contains(&peer.index)
                });
            let Some(net) = net else {
                bad_routes.push(key);
                continue;
            };
            if sources.get(&peer.public_ip_be) != Some(&source_entry(net, peer.index)) {
                table.unsourced.insert(net);
            }
            table.used_slots.insert(peer.index);
            table.peers.insert(net, peer);
        }
        let orphans: Vec<u32> = sources
            .iter()
            .filter(|(ip, source)| {
                !table
                    .peers
                    .values()
                    .any(|p| p.public_ip_be == **ip && p.index == source.index)
            })
            .map(|(ip, _)| *ip)
            .collect();
        if !(bad_routes.is_empty() && orphans.is_empty() && table.unsourced.is_empty()) {
            warn!(
                removed_peers = bad_routes.len(),
                removed_sources = orphans.len(),
                peers_without_source = table.unsourced.len(),
                "peer maps were inconsistent; the next sync completes them"
            );
        }
        {
            let mut trie: LpmTrie<_, u32, Peer> =
                LpmTrie::try_from(map_mut(ebpf, MAP_PEERS)?).map_err(map_err("open", MAP_PEERS))?;
            for key in &bad_routes {
                match trie.remove(key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err("delete from", MAP_PEERS)(e)),
                }
            }
        }
        for ip in orphans {
            // Removes the entry only if no peer of the table owns it, as checked above.
            let Some(source) = sources.get(&ip) else {
                continue;
            };
            remove_source(ebpf, ip, source.index)?;
        }
        Ok(table)
    }

    pub(super) fn len(&self) -> usize {
        self.peers.len()
    }

    /// The peers in the map, by subnet.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&Ipv4Net, &Peer)> {
        self.peers.iter()
    }

    /// Adds or updates one peer; `Ok(false)` when the maps already said the same.
    pub(super) fn upsert(
        &mut self,
        ebpf: &mut Ebpf,
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        vtep_mac: [u8; 6],
    ) -> Result<bool, EbpfError> {
        let subnet = subnet.trunc();
        let old = self.peers.get(&subnet).copied();
        let index = match old {
            Some(p) => p.index,
            None => self.allocate_slot()?,
        };
        let peer = Peer {
            public_ip_be: to_be(public_ip),
            index,
            vtep_mac,
            _pad: [0; 2],
        };
        if old == Some(peer) && !self.unsourced.contains(&subnet) {
            return Ok(false);
        }
        if old.is_none() {
            reset_counters(ebpf, index)?;
        }
        let source = source_entry(subnet, index);
        {
            let map = map_mut(ebpf, MAP_SOURCES)?;
            let mut sources: HashMap<_, u32, PeerSource> =
                HashMap::try_from(map).map_err(map_err("open", MAP_SOURCES))?;
            sources
                .insert(peer.public_ip_be, source, 0)
                .map_err(map_err("update", MAP_SOURCES))?;
        }
        {
            let map = map_mut(ebpf, MAP_PEERS)?;
            let mut trie: LpmTrie<_, u32, Peer> =
                LpmTrie::try_from(map).map_err(map_err("open", MAP_PEERS))?;
            trie.insert(
                &Key::new(u32::from(subnet.prefix_len()), to_be(subnet.addr())),
                peer,
                0,
            )
            .map_err(map_err("update", MAP_PEERS))?;
        }
        self.peers.insert(subnet, peer);
        self.used_slots.insert(index);
        self.unsourced.remove(&subnet);
        // The peer moved to another PublicIP: its old source entry goes, after the new one
        // is in place.
        if let Some(old) = old
            && old.public_ip_be != peer.public_ip_be
        {
            remove_source(ebpf, old.public_ip_be, index)?;
        }
        Ok(true)
    }

    /// Removes a peer (no-op when it is not there).
    pub(super) fn remove(&mut self, ebpf: &mut Ebpf, subnet: Ipv4Net) -> Result<(), EbpfError> {
        let subnet = subnet.trunc();
        let Some(peer) = self.peers.get(&subnet).copied() else {
            return Ok(());
        };
        {
            let map = map_mut(ebpf, MAP_PEERS)?;
            let mut trie: LpmTrie<_, u32, Peer> =
                LpmTrie::try_from(map).map_err(map_err("open", MAP_PEERS))?;
            match trie.remove(&Key::new(
                u32::from(subnet.prefix_len()),
                to_be(subnet.addr()),
            )) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("delete from", MAP_PEERS)(e)),
            }
        }
        remove_source(ebpf, peer.public_ip_be, peer.index)?;
        self.peers.remove(&subnet);
        self.used_slots.remove(&peer.index);
        self.unsourced.remove(&subnet);
        debug!(%subnet, "fast path peer removed");
        Ok(())
    }

    /// Removes every peer whose subnet is not in `wanted`.
    pub(super) fn retain(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &BTreeSet<Ipv4Net>,
    ) -> Result<(), EbpfError> {
        let gone: Vec<Ipv4Net> = self
            .peers
            .keys()
            .filter(|net| !wanted.contains(net))
            .copied()
            .collect();
        for net in gone {
            self.remove(ebpf, net)?;
        }
        Ok(())
    }

    fn allocate_slot(&self) -> Result<u32, EbpfError> {
        (0..MAX_PEERS)
            .find(|i| !self.used_slots.contains(i))
            .ok_or(EbpfError::PeerTableFull)
    }

    /// Traffic the fast path carried per peer, summed over CPUs.
    pub(super) fn counters(&self, ebpf: &Ebpf) -> Result<Vec<(Ipv4Net, PeerCounters)>, EbpfError> {
        let map = map_ref(ebpf, MAP_PEER_COUNTERS)?;
        let counters: PerCpuArray<_, PeerCounters> =
            PerCpuArray::try_from(map).map_err(map_err("open", MAP_PEER_COUNTERS))?;
        self.peers
            .iter()
            .map(|(net, peer)| {
                let per_cpu = counters
                    .get(&peer.index, 0)
                    .map_err(map_err("read", MAP_PEER_COUNTERS))?;
                let sum = per_cpu
                    .iter()
                    .fold(PeerCounters::default(), |acc, c| acc.add(*c));
                Ok((*net, sum))
            })
            .collect()
    }
}

/// Removes the source entry of `public_ip_be` if it still belongs to slot `index`.
fn remove_source(ebpf: &mut Ebpf, public_ip_be: u32, index: u32) -> Result<(), EbpfError> {
    let map = map_mut(ebpf, MAP_SOURCES)?;
    let mut sources: HashMap<_, u32, PeerSource> =
        HashMap::try_from(map).map_err(map_err("open", MAP_SOURCES))?;
    match sources.get(&public_ip_be, 0) {
        Ok(s) if s.index == index => match sources.remove(&public_ip_be) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("delete from", MAP_SOURCES)(e)),
        },
        Ok(_) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(map_err("read", MAP_SOURCES)(e)),
    }
}

fn reset_counters(ebpf: &mut Ebpf, index: u32) -> Result<(), EbpfError> {
    let cpus = nr_cpus().map_err(|(_, e)| EbpfError::Map {
        op: "count cpus for",
        name: MAP_PEER_COUNTERS,
        source: Box::new(MapError::IoError(e)),
    })?;
    let zero = PerCpuValues::try_from(vec![PeerCounters::default(); cpus])
        .map_err(|e| map_err("size", MAP_PEER_COUNTERS)(MapError::IoError(e)))?;
    let map = map_mut(ebpf, MAP_PEER_COUNTERS)?;
    let mut counters: PerCpuArray<_, PeerCounters> =
        PerCpuArray::try_from(map).map_err(map_err("open", MAP_PEER_COUNTERS))?;
    counters
        .set(index, zero, 0)
        .map_err(map_err("reset", MAP_PEER_COUNTERS))
}

/// A fast path's node configuration: the one entry (key 0) of its config map.
pub(super) trait NodeConfig: aya::Pod + Default {
    /// The name of the config map.
    const MAP: &'static str;
    /// Whether an agent wrote it (array maps start zeroed).
    fn written(&self) -> bool;
    /// [`FLAG_PEERS_SYNCED`] and future bits.
    fn flags(&self) -> u32;
    /// Sets [`NodeConfig::flags`].
    fn set_flags(&mut self, flags: u32);
}

/// Reads the node configuration from the config map of `ebpf`.
fn read_config<C: NodeConfig>(ebpf: &Ebpf) -> Result<C, EbpfError> {
    let map = map_ref(ebpf, C::MAP)?;
    let array: Array<_, C> = Array::try_from(map).map_err(map_err("open", C::MAP))?;
    array.get(&0, 0).map_err(map_err("read", C::MAP))
}

/// Writes the node configuration into the config map of `ebpf`.
fn write_config<C: NodeConfig>(ebpf: &mut Ebpf, config: C) -> Result<(), EbpfError> {
    let map = map_mut(ebpf, C::MAP)?;
    let mut array: Array<_, C> = Array::try_from(map).map_err(map_err("open", C::MAP))?;
    array.set(0, config, 0).map_err(map_err("write", C::MAP))
}

/// A fast path's pinned maps, opened for attaching ([`open_pinned`]).
pub(super) struct PinnedState {
    /// The object: its pinned maps adopted, created or migrated; its programs verified.
    pub(super) ebpf: Ebpf,
    /// `<root>/v<LAYOUT_VERSION>`.
    pub(super) layout_dir: PathBuf,
    /// The peer maps as found.
    pub(super) table: PeerTable,
    /// The maps say a previous agent synced its peers (and a migration kept them whole):
    /// decap may go on dropping unknown sources.
    pub(super) synced: bool,
}

/// What is left to do once the new programs run on the links ([`Pending::finish`]).
#[must_use = "the old layout's counters and pins wait for finish()"]
pub(super) struct Pending {
    migration: Option<Migration>,
    old_layouts: Vec<(u32, PathBuf)>,
    what: &'static str,
}

impl Pending {
    /// Adds the old layout's counters (the old programs no longer count) and removes its
    /// pins. Call right after the new programs replaced the old ones on the links.
    pub(super) fn finish(self, ebpf: &mut Ebpf) -> Result<(), EbpfError> {
        if let Some(m) = self.migration {
            m.finish(ebpf);
        }
        for (version, dir) in &self.old_layouts {
            remove_pins(dir)?;
            info!(
                version,
                fast_path = self.what,
                "removed pinned maps of an old layout"
            );
        }
        Ok(())
    }
}

/// What every fast path does before it writes its configuration and attaches: makes
/// `root` (`pin_dir` itself, or a subdirectory of it) hold `v<LAYOUT_VERSION>/` and
/// `links/`, mounting bpffs if needed; refuses pinned maps of our version with other
/// sizes; loads the object with the maps in `pinned` pinned there (adopting what a
/// previous agent left); verifies `programs` first, so that the old programs run on
/// until the maps are complete and the swap follows right after; migrates the newest
/// older layout's maps; reads the peer maps. `what` names the fast path in the logs.
pub(super) fn open_pinned<C: NodeConfig>(
    pin_dir: &Path,
    root: &Path,
    pinned: &[&'static str],
    programs: &[&'static str],
    what: &'static str,
) -> Result<(PinnedState, Pending), EbpfError> {
    let object = ebpf_object()?;
    prepare_pin_dir(pin_dir)?;
    let layout_dir = root.join(format!("v{LAYOUT_VERSION}"));
    make_private_dir(&layout_dir)?;
    make_private_dir(&root.join(LINKS_DIR))?;
    check_pinned_layout(&layout_dir, pinned)?;
    let old_layouts = other_layouts(root)?;

    let mut loader = EbpfLoader::new();
    for name in pinned {
        loader.map_pin_path(name, layout_dir.join(name));
    }
    let mut ebpf = loader
        .load(object)
        .map_err(|e| EbpfError::Load(Box::new(e)))?;
    for &name in programs {
        load_program(&mut ebpf, name)?;
    }
    let migration = migrate(&mut ebpf, &layout_dir, pinned, &old_layouts)?;
    let previous: C = read_config(&ebpf)?;
    let table = PeerTable::load(&mut ebpf)?;
    let synced = previous.written()
        && previous.flags() & FLAG_PEERS_SYNCED != 0
        && Migration::peers_intact(migration.as_ref());
    if let Some(m) = &migration {
        info!(
            from = m.version,
            to = LAYOUT_VERSION,
            maps = ?m.copied,
            peers = table.len(),
            synced,
            fast_path = what,
            "migrated pinned eBPF maps of an old layout"
        );
    } else if previous.written() {
        info!(
            peers = table.len(),
            synced,
            fast_path = what,
            "adopted pinned eBPF maps (layout v{LAYOUT_VERSION})"
        );
    }
    let state = PinnedState {
        ebpf,
        layout_dir,
        table,
        synced,
    };
    Ok((
        state,
        Pending {
            migration,
            old_layouts,
            what,
        },
    ))
}

/// One peer as the peer maps hold it, whatever the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PeerSpec {
    /// The peer's lease subnet.
    pub(super) subnet: Ipv4Net,
    /// The peer's PublicIP.
    pub(super) public_ip: Ipv4Addr,
    /// The peer's VtepMAC; zero where the wire format has no inner Ethernet header.
    pub(super) vtep_mac: [u8; 6],
}

/// One peer lease as a fast path without an inner Ethernet header needs it (udp,
/// host-gw): its subnet and PublicIP, no VtepMAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaclessPeer {
    /// The peer's lease subnet.
    pub subnet: Ipv4Net,
    /// The peer's PublicIP: where its fast path listens (udp), the gateway of its route
    /// (host-gw).
    pub public_ip: Ipv4Addr,
}

impl MaclessPeer {
    pub(super) fn spec(&self) -> PeerSpec {
        PeerSpec {
            subnet: self.subnet,
            public_ip: self.public_ip,
            vtep_mac: [0; 6],
        }
    }

    pub(super) fn from_spec(p: PeerSpec) -> MaclessPeer {
        MaclessPeer {
            subnet: p.subnet,
            public_ip: p.public_ip,
        }
    }
}

/// An attached fast path: what the vxlan, udp and host-gw ones are once their programs
/// run. Dropping it leaves the programs attached (pinned links) and the maps pinned:
/// forwarding goes on without the agent.
pub(super) struct Attached<C: NodeConfig> {
    pub(super) ebpf: Ebpf,
    /// The pin directory the agent was given (`--bpf-pin-dir`).
    given_dir: PathBuf,
    /// Holds `v<LAYOUT_VERSION>/` and `links/`: `given_dir` or a subdirectory of it.
    pub(super) root: PathBuf,
    layout_dir: PathBuf,
    pub(super) config: C,
    pub(super) table: PeerTable,
    /// Names the fast path in the logs.
    what: &'static str,
}

impl<C: NodeConfig> std::fmt::Debug for Attached<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("fast_path", &self.what)
            .field("pin_dir", &self.root)
            .field("peers", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl<C: NodeConfig> Attached<C> {
    /// Writes `config(synced)` (whether the pinned state may keep dropping unknown
    /// sources, see [`PinnedState::synced`]) into what [`open_pinned`] opened at `root`.
    pub(super) fn new(
        pin_dir: &Path,
        root: PathBuf,
        state: PinnedState,
        what: &'static str,
        config: impl FnOnce(bool) -> C,
    ) -> Result<Self, EbpfError> {
        let mut fp = Attached {
            ebpf: state.ebpf,
            given_dir: pin_dir.to_owned(),
            root,
            layout_dir: state.layout_dir,
            config: config(state.synced),
            table: state.table,
            what,
        };
        write_config(&mut fp.ebpf, fp.config)?;
        Ok(fp)
    }

    /// The pinned link `<root>/links/<link>`.
    fn link_path(&self, link: &str) -> PathBuf {
        self.root.join(LINKS_DIR).join(link)
    }

    /// [`attach_program`] with the link pinned as `<root>/links/<link>`.
    pub(super) fn attach(
        &mut self,
        program: &'static str,
        ifindex: u32,
        attach_type: TcAttachType,
        link: &str,
    ) -> Result<(), EbpfError> {
        let path = self.link_path(link);
        attach_program(&mut self.ebpf, program, ifindex, attach_type, &path)
    }

    /// The peers in the maps now.
    pub(super) fn peers(&self) -> impl Iterator<Item = PeerSpec> + '_ {
        self.table.iter().map(|(subnet, p)| PeerSpec {
            subnet: *subnet,
            public_ip: from_be(p.public_ip_be),
            vtep_mac: p.vtep_mac,
        })
    }

    /// Makes the peer maps equal `desired`: writes new and changed peers first, then
    /// removes the ones no longer desired (update before delete, so a peer that moved
    /// never disappears in between). Unchanged peers are not touched. Also marks the
    /// peers synced: decap may now drop traffic from unknown sources.
    pub(super) fn sync_peers(
        &mut self,
        desired: impl IntoIterator<Item = PeerSpec>,
    ) -> Result<(), EbpfError> {
        let mut wanted = BTreeSet::new();
        for peer in desired {
            wanted.insert(peer.subnet.trunc());
            self.upsert_peer(peer)?;
        }
        self.table.retain(&mut self.ebpf, &wanted)?;
        if self.config.flags() & FLAG_PEERS_SYNCED == 0 {
            self.config
                .set_flags(self.config.flags() | FLAG_PEERS_SYNCED);
            write_config(&mut self.ebpf, self.config)?;
        }
        Ok(())
    }

    /// Adds or updates one peer (no-op when the maps already say the same).
    pub(super) fn upsert_peer(&mut self, peer: PeerSpec) -> Result<(), EbpfError> {
        let changed =
            self.table
                .upsert(&mut self.ebpf, peer.subnet, peer.public_ip, peer.vtep_mac)?;
        if changed {
            debug!(subnet = %peer.subnet.trunc(), public_ip = %peer.public_ip, vtep_mac = ?peer.vtep_mac, fast_path = self.what, "fast path peer set");
        }
        Ok(())
    }

    /// Removes a peer (no-op when it is not there).
    pub(super) fn remove_peer(&mut self, subnet: Ipv4Net) -> Result<(), EbpfError> {
        self.table.remove(&mut self.ebpf, subnet)
    }

    /// Traffic the fast path carried per peer, summed over CPUs.
    pub(super) fn peer_counters(&self) -> Result<Vec<(Ipv4Net, PeerCounters)>, EbpfError> {
        self.table.counters(&self.ebpf)
    }

    /// Packets that left the fast path, per reason, summed over CPUs.
    pub(super) fn drop_counters(&self) -> Result<Vec<(&'static str, u64)>, EbpfError> {
        drop_counters(&self.ebpf)
    }

    /// Detaches every program and removes every pin of this fast path (links, maps, its
    /// directories, and the pin directory if that is then empty).
    pub(super) fn detach_and_unpin(self) -> Result<(), EbpfError> {
        unpin_links(&self.root.join(LINKS_DIR))?;
        remove_pins(&self.layout_dir)?;
        drop(self.ebpf);
        // Only if empty: someone else's pins are never removed.
        let _ = fs::remove_dir(&self.root);
        let _ = fs::remove_dir(&self.given_dir);
        Ok(())
    }
}

/// `impl NodeConfig` for a config struct with `public_ip_be` and `flags` fields, kept in
/// the array map `$map`.
macro_rules! node_config {
    ($ty:ty, $map:expr) => {
        impl $crate::dataplane::pinned::NodeConfig for $ty {
            const MAP: &'static str = $map;
            fn written(&self) -> bool {
                self.public_ip_be != 0
            }
            fn flags(&self) -> u32 {
                self.flags
            }
            fn set_flags(&mut self, flags: u32) {
                self.flags = flags;
            }
        }
    };
}
pub(super) use node_config;

/// The public peer API of a fast path type with an `fp: Attached<_>` field: `$entry` is
/// its peer type, with `spec(&self) -> PeerSpec` and `from_spec(PeerSpec) -> Self`.
macro_rules! peer_api {
    ($entry:ty) => {
        /// The peers in the maps now.
        pub fn peers(&self) -> Vec<$entry> {
            self.fp.peers().map(<$entry>::from_spec).collect()
        }

        /// Makes the peer maps equal `desired`: writes new and changed peers first, then
        /// removes the ones no longer desired (update before delete, so a peer that moved
        /// never disappears in between). Unchanged peers are not touched. Also enables
        /// dropping traffic from unknown sources, now that every peer is known.
        pub fn sync_peers(
            &mut self,
            desired: &[$entry],
        ) -> Result<(), $crate::dataplane::EbpfError> {
            self.fp.sync_peers(desired.iter().map(<$entry>::spec))
        }

        /// Adds or updates one peer (no-op when the maps already say the same).
        pub fn upsert_peer(&mut self, entry: &$entry) -> Result<(), $crate::dataplane::EbpfError> {
            self.fp.upsert_peer(entry.spec())
        }

        /// Removes a peer (no-op when it is not there).
        pub fn remove_peer(
            &mut self,
            subnet: $crate::dataplane::Ipv4Net,
        ) -> Result<(), $crate::dataplane::EbpfError> {
            self.fp.remove_peer(subnet)
        }

        /// Traffic the fast path carried per peer, summed over CPUs.
        pub fn peer_counters(
            &self,
        ) -> Result<
            Vec<($crate::dataplane::Ipv4Net, $crate::dataplane::PeerCounters)>,
            $crate::dataplane::EbpfError,
        > {
            self.fp.peer_counters()
        }

        /// Packets that left the fast path, per reason (`flannel_common::maps::reason`),
        /// summed over CPUs. Names starting with `drop_` were dropped, the rest went to
        /// the kernel's (or flanneld's userspace) path.
        pub fn drop_counters(
            &self,
        ) -> Result<Vec<(&'static str, u64)>, $crate::dataplane::EbpfError> {
            self.fp.drop_counters()
        }

        /// Where this fast path's pins live: the pin directory, or its subdirectory.
        pub fn pin_dir(&self) -> &std::path::Path {
            &self.fp.root
        }

        /// Detaches its programs and removes every pin of this fast path (links, maps, its
        /// directories, and the pin directory if that is then empty). For tests and for
        /// switching the dataplane off; a restart should just drop the value.
        pub fn detach_and_unpin(self) -> Result<(), $crate::dataplane::EbpfError> {
            self.fp.detach_and_unpin()
        }
    };
}
pub(super) use peer_api;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_order_round_trip() {
        let ip = Ipv4Addr::new(10, 244, 1, 0);
        assert_eq!(to_be(ip).to_ne_bytes(), [10, 244, 1, 0]);
        assert_eq!(from_be(to_be(ip)), ip);
    }
}
