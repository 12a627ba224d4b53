//! The eBPF VXLAN fast path, and the pieces the udp fast path (`udp.rs`) shares with it:
//! with `udp.rs` and `migrate.rs`, the only modules that import aya.
//!
//! Design note. The kernel keeps flannel's vxlan state (device, neighbour, FDB, route per
//! peer; see `backend/`), and this module puts two TC programs on top of it:
//! `flannel_encap` at the egress of `flannel.<VNI>` and `flannel_decap` at the ingress of
//! the underlay. Whatever they cannot handle goes to the kernel path, so the kernel state
//! must stay complete; the maps only say which peers may take the fast lane.
//!
//! Lifetime. Maps are pinned under `<pin_dir>/v<LAYOUT_VERSION>/<MAP>` and the two TCX
//! links under `<pin_dir>/links/{encap,decap}`, in a root-only (0700) directory on bpffs.
//! A dropped [`VxlanFastPath`] (including SIGKILL of the agent) leaves everything
//! attached and forwarding. [`VxlanFastPath::attach`] adopts what is pinned: maps of the
//! same layout are reused as they are (entries and counters kept, no flush), the new
//! programs replace the old ones on the pinned links atomically (`bpf_link_update`), and
//! the caller then applies only the difference with [`VxlanFastPath::sync_peers`]. Pinned
//! maps of another layout version (`v<N>`) are never reused, they are migrated
//! (`migrate.rs`): new maps are created, and every old map whose type and key and value
//! sizes are unchanged is carried over into its new counterpart. The state (peers,
//! sources, config) is copied before the new programs replace the old ones on the links,
//! so they know every peer from their first packet; the counters are added right after
//! the swap, so nothing the old programs counted is lost. Peers keep their slots, and so
//! their counters. A map whose shape changed is not carried over (a warning names both
//! shapes) and starts empty. The old pins are removed once the new programs run. Until the first
//! [`VxlanFastPath::sync_peers`], decap hands VXLAN from unknown sources to the kernel
//! rather than dropping it, so a fresh start cuts no traffic; after a migration, decap
//! keeps dropping them only if the old layout had been synced and both peer maps were
//! copied. A pinned map of our own layout version with other sizes is refused
//! ([`EbpfError::LayoutMismatch`]): that is a build that forgot to bump the version.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::Ipv4Addr,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapError, MapInfo, PerCpuArray, PerCpuValues, lpm_trie::Key},
    pin::PinError,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    util::{KernelVersion, nr_cpus},
};
use flannel_common::{
    LAYOUT_VERSION, MAP_CONFIG, MAP_PEER_COUNTERS, MAP_PEERS, MAP_REASONS, MAP_SOURCES, MAPS,
    PINNED_MAPS, PROG_DECAP, PROG_ENCAP,
    maps::{Config, FLAG_PEERS_SYNCED, MAX_PEERS, Peer, PeerCounters, PeerSource, reason},
};
use ipnet::Ipv4Net;
use thiserror::Error;
use tracing::{debug, info, warn};

use super::{
    migrate::{Migration, migrate},
    sys,
};
use crate::mac::MacAddr;

/// Where the agent pins its maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flannel";
/// Where bpffs is mounted (if it is not) when the default pin directory is used.
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Subdirectory of the pin directory holding the pinned links.
pub(super) const LINKS_DIR: &str = "links";
pub(super) const LINK_ENCAP: &str = "encap";
pub(super) const LINK_DECAP: &str = "decap";

/// Errors of the eBPF dataplane.
#[derive(Debug, Error)]
pub enum EbpfError {
    /// `build.rs` found no BPF object, so an empty stub was embedded.
    #[error(
        "the eBPF dataplane is not built into this flanneld: run cargo xtask build-ebpf, then rebuild"
    )]
    NotBuilt,
    /// The kernel lacks something the fast path needs ([`probe`]).
    #[error("the kernel does not support {capability}")]
    Unsupported {
        /// What is missing, e.g. "tcx links (linux 6.6 or later)".
        capability: &'static str,
        /// The kernel's answer, when there was one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Mounting bpffs failed.
    #[error("cannot mount bpffs at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The pin directory is not on a bpf filesystem.
    #[error("pin directory {path} is not on a bpf filesystem")]
    NotBpffs { path: PathBuf },
    /// A filesystem operation on the pin directory failed.
    #[error("cannot {op} {path}")]
    PinDir {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A pinned map of our layout version has other sizes than this build's.
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this build expects {expected:?} \
         for layout v{LAYOUT_VERSION}; refusing to reuse it"
    )]
    LayoutMismatch {
        path: PathBuf,
        expected: (u32, u32),
        found: (u32, u32),
    },
    /// Copying a map of an older layout into this build's failed.
    #[error("cannot {op} map {name} ({path}) to migrate it to layout v{LAYOUT_VERSION}")]
    Migrate {
        op: &'static str,
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    /// Loading the object (creating or opening its maps) failed.
    #[error("cannot load the bpf object")]
    Load(#[source] Box<aya::EbpfError>),
    /// The object lacks a map or program this module needs.
    #[error("the bpf object has no {kind} {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// Loading (verifying) or attaching a program failed.
    #[error("cannot {op} program {name}")]
    Program {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// A link operation (pin, open, update) failed.
    #[error("cannot {op} link {path}")]
    Link {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("cannot {op} map {name}")]
    Map {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    /// No interface has this index in the calling thread's network namespace.
    #[error("no interface with index {ifindex}")]
    Interface {
        ifindex: u32,
        #[source]
        source: io::Error,
    },
    /// All [`MAX_PEERS`] peer slots are in use.
    #[error("too many peers for the eBPF fast path (at most {MAX_PEERS})")]
    PeerTableFull,
    /// The configuration cannot be expressed in the maps.
    #[error("invalid fast path configuration: {0}")]
    Config(&'static str),
}

/// The object as embedded; aligned because aya parses ELF structures in place.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flannel-ebpf.o"));

/// The embedded BPF object, or [`EbpfError::NotBuilt`] when this build has none.
pub fn ebpf_object() -> Result<&'static [u8], EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    Ok(OBJECT)
}

/// Checks that this flanneld and kernel can run the fast path, without attaching
/// anything: the object is built in, the kernel has TCX (6.6+), maps can be created and
/// the verifier accepts both programs. For `--dataplane auto`.
pub fn probe() -> Result<(), EbpfError> {
    probe_programs(
        &[PROG_ENCAP, PROG_DECAP],
        "loading the vxlan tc programs (verifier or helpers)",
    )
}

/// [`probe`] for any set of the object's programs; `capability` names them in the
/// error when the verifier or a helper refuses one.
pub(super) fn probe_programs(
    programs: &[&'static str],
    capability: &'static str,
) -> Result<(), EbpfError> {
    let object = ebpf_object()?;
    let version = KernelVersion::current().map_err(|e| EbpfError::Unsupported {
        capability: "reading the kernel version",
        source: Some(e.to_string().into()),
    })?;
    if version < KernelVersion::new(6, 6, 0) {
        return Err(EbpfError::Unsupported {
            capability: "tcx links (linux 6.6 or later)",
            source: None,
        });
    }
    let mut ebpf = EbpfLoader::new()
        .load(object)
        .map_err(|e| EbpfError::Unsupported {
            capability: "creating bpf maps (needs CAP_BPF or root)",
            source: Some(Box::new(e)),
        })?;
    for &name in programs {
        classifier(&mut ebpf, name)?
            .load()
            .map_err(|e| EbpfError::Unsupported {
                capability,
                source: Some(Box::new(e)),
            })?;
    }
    Ok(())
}

/// What the fast path needs to know about this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPathConfig {
    /// `flannel.<VNI>`'s ifindex: encap runs at its TC egress, decap delivers to it.
    pub vxlan_ifindex: u32,
    /// The external interface's ifindex: decap runs at its TC ingress, encap sends there.
    pub underlay_ifindex: u32,
    /// The external interface's MTU (non-GSO packets that would exceed it after encap go
    /// to the kernel).
    pub underlay_mtu: u32,
    /// Our PublicIP (outer source; the outer destination decap accepts).
    pub public_ip: Ipv4Addr,
    /// The VNI.
    pub vni: u32,
    /// The VXLAN UDP port (flannel's `Port`, default 8472).
    pub port: u16,
    /// Our VtepMAC (the MAC of `flannel.<VNI>`).
    pub vtep_mac: MacAddr,
    /// Our lease subnet; decap delivers only inner destinations inside it.
    pub subnet: Ipv4Net,
    /// Where maps and links are pinned ([`DEFAULT_PIN_DIR`]; tests use a private bpffs).
    pub pin_dir: PathBuf,
}

/// One peer lease, as the fast path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerEntry {
    /// The peer's lease subnet.
    pub subnet: Ipv4Net,
    /// The peer's PublicIP (its VTEP address).
    pub public_ip: Ipv4Addr,
    /// The peer's VtepMAC.
    pub vtep_mac: MacAddr,
}

/// The attached fast path. Dropping it leaves the programs attached (pinned links) and
/// the maps pinned: forwarding goes on without the agent.
pub struct VxlanFastPath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    layout_dir: PathBuf,
    config: Config,
    table: PeerTable,
}

impl std::fmt::Debug for VxlanFastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VxlanFastPath")
            .field("pin_dir", &self.pin_dir)
            .field("peers", &self.table.len())
            .finish_non_exhaustive()
    }
}

pub(super) fn to_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub(super) fn from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

pub(super) fn map_err(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
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
pub(super) fn make_private_dir(path: &Path) -> Result<(), EbpfError> {
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
pub(super) fn prepare_pin_dir(pin_dir: &Path) -> Result<(), EbpfError> {
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
pub(super) fn check_pinned_layout(layout_dir: &Path, pinned: &[&str]) -> Result<(), EbpfError> {
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
pub(super) fn other_layouts(pin_dir: &Path) -> Result<Vec<(u32, PathBuf)>, EbpfError> {
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
pub(super) fn remove_pins(dir: &Path) -> Result<(), EbpfError> {
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
pub(super) fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), EbpfError> {
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
pub(super) fn attach_program(
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
pub(super) fn unpin_links(links: &Path) -> Result<(), EbpfError> {
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

/// Packets that left the fast path of `ebpf`, per reason, summed over CPUs.
pub(super) fn drop_counters(ebpf: &Ebpf) -> Result<Vec<(&'static str, u64)>, EbpfError> {
    let map = ebpf.map(MAP_REASONS).ok_or(EbpfError::Missing {
        kind: "map",
        name: MAP_REASONS,
    })?;
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
            let map = ebpf.map(MAP_PEERS).ok_or(EbpfError::Missing {
                kind: "map",
                name: MAP_PEERS,
            })?;
            let trie: LpmTrie<_, u32, Peer> =
                LpmTrie::try_from(map).map_err(map_err("open", MAP_PEERS))?;
            trie.iter()
                .collect::<Result<_, _>>()
                .map_err(map_err("iterate", MAP_PEERS))?
        };
        let sources: BTreeMap<u32, PeerSource> = {
            let map = ebpf.map(MAP_SOURCES).ok_or(EbpfError::Missing {
                kind: "map",
                name: MAP_SOURCES,
            })?;
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
        let map = ebpf.map(MAP_PEER_COUNTERS).ok_or(EbpfError::Missing {
            kind: "map",
            name: MAP_PEER_COUNTERS,
        })?;
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
}

impl NodeConfig for Config {
    const MAP: &'static str = MAP_CONFIG;
    fn written(&self) -> bool {
        self.public_ip_be != 0
    }
    fn flags(&self) -> u32 {
        self.flags
    }
}

/// Reads the node configuration from the config map of `ebpf`.
pub(super) fn read_config<C: NodeConfig>(ebpf: &Ebpf) -> Result<C, EbpfError> {
    let map = ebpf.map(C::MAP).ok_or(EbpfError::Missing {
        kind: "map",
        name: C::MAP,
    })?;
    let array: Array<_, C> = Array::try_from(map).map_err(map_err("open", C::MAP))?;
    array.get(&0, 0).map_err(map_err("read", C::MAP))
}

/// Writes the node configuration into the config map of `ebpf`.
pub(super) fn write_config<C: NodeConfig>(ebpf: &mut Ebpf, config: C) -> Result<(), EbpfError> {
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

impl VxlanFastPath {
    /// Loads the programs, adopts or creates the pinned maps (migrating the entries of an
    /// older layout's maps into new ones), writes the configuration and attaches both
    /// programs (replacing, without a gap, programs a previous agent left attached). Call
    /// from a thread in the network namespace of the interfaces.
    ///
    /// Until the first [`VxlanFastPath::sync_peers`], VXLAN from unknown sources is left
    /// to the kernel (unless adopted or migrated maps say the peers were synced); call it
    /// right after attaching with the full peer set.
    pub fn attach(cfg: FastPathConfig) -> Result<VxlanFastPath, EbpfError> {
        if cfg.vni > 0x00ff_ffff {
            return Err(EbpfError::Config("the VNI has more than 24 bits"));
        }
        if cfg.public_ip.is_unspecified() {
            return Err(EbpfError::Config("the public IP is unspecified"));
        }
        let (state, pending) = open_pinned::<Config>(
            &cfg.pin_dir,
            &cfg.pin_dir,
            PINNED_MAPS,
            &[PROG_DECAP, PROG_ENCAP],
            "vxlan",
        )?;
        let mut fp = VxlanFastPath {
            ebpf: state.ebpf,
            pin_dir: cfg.pin_dir.clone(),
            layout_dir: state.layout_dir,
            config: Config {
                public_ip_be: to_be(cfg.public_ip),
                subnet_be: to_be(cfg.subnet.trunc().addr()),
                subnet_mask_be: to_be(cfg.subnet.netmask()),
                vni: cfg.vni,
                underlay_ifindex: cfg.underlay_ifindex,
                vxlan_ifindex: cfg.vxlan_ifindex,
                underlay_mtu: cfg.underlay_mtu,
                flags: if state.synced { FLAG_PEERS_SYNCED } else { 0 },
                port_be: cfg.port.to_be(),
                vtep_mac: cfg.vtep_mac.0,
            },
            table: state.table,
        };
        fp.write_config()?;

        let links = cfg.pin_dir.join(LINKS_DIR);
        attach_program(
            &mut fp.ebpf,
            PROG_DECAP,
            cfg.underlay_ifindex,
            TcAttachType::Ingress,
            &links.join(LINK_DECAP),
        )?;
        attach_program(
            &mut fp.ebpf,
            PROG_ENCAP,
            cfg.vxlan_ifindex,
            TcAttachType::Egress,
            &links.join(LINK_ENCAP),
        )?;
        pending.finish(&mut fp.ebpf)?;
        Ok(fp)
    }

    fn write_config(&mut self) -> Result<(), EbpfError> {
        write_config(&mut self.ebpf, self.config)
    }

    /// The peers in the map now.
    pub fn peers(&self) -> Vec<PeerEntry> {
        self.table
            .iter()
            .map(|(subnet, p)| PeerEntry {
                subnet: *subnet,
                public_ip: from_be(p.public_ip_be),
                vtep_mac: MacAddr(p.vtep_mac),
            })
            .collect()
    }

    /// Makes the peer maps equal `desired`: writes new and changed peers first, then
    /// removes the ones no longer desired (update before delete, so a peer that moved
    /// never disappears in between). Unchanged peers are not touched. Also enables
    /// dropping VXLAN from unknown sources, now that every peer is known.
    pub fn sync_peers(&mut self, desired: &[PeerEntry]) -> Result<(), EbpfError> {
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
    pub fn upsert_peer(&mut self, entry: &PeerEntry) -> Result<(), EbpfError> {
        let changed = self.table.upsert(
            &mut self.ebpf,
            entry.subnet,
            entry.public_ip,
            entry.vtep_mac.0,
        )?;
        if changed {
            debug!(subnet = %entry.subnet.trunc(), public_ip = %entry.public_ip, vtep_mac = %entry.vtep_mac, "fast path peer set");
        }
        Ok(())
    }

    /// Removes a peer (no-op when it is not there).
    pub fn remove_peer(&mut self, subnet: Ipv4Net) -> Result<(), EbpfError> {
        self.table.remove(&mut self.ebpf, subnet)
    }

    /// Traffic the fast path carried per peer, summed over CPUs.
    pub fn peer_counters(&self) -> Result<Vec<(Ipv4Net, PeerCounters)>, EbpfError> {
        self.table.counters(&self.ebpf)
    }

    /// Packets that left the fast path, per reason (`flannel_common::maps::reason`),
    /// summed over CPUs. Names starting with `drop_` were dropped, the rest went to the
    /// kernel.
    pub fn drop_counters(&self) -> Result<Vec<(&'static str, u64)>, EbpfError> {
        drop_counters(&self.ebpf)
    }

    /// The pin directory in use.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Detaches both programs and removes every pin (links, maps, directories). For
    /// tests and for switching the dataplane off; a restart should just drop the value.
    pub fn detach_and_unpin(self) -> Result<(), EbpfError> {
        unpin_links(&self.pin_dir.join(LINKS_DIR))?;
        remove_pins(&self.layout_dir)?;
        drop(self.ebpf);
        // Only if empty: someone else's pins are never removed.
        let _ = fs::remove_dir(&self.pin_dir);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Either outcome is legitimate (the object is optional at build time), but each has
    /// to be well-formed: an aligned ELF object, or the error with the build advice.
    #[test]
    fn embedded_object_or_advice() {
        match ebpf_object() {
            Ok(bytes) => {
                assert!(bytes.starts_with(b"\x7fELF"), "embedded object is not ELF");
                assert_eq!(bytes.as_ptr().align_offset(8), 0, "object is not aligned");
            }
            Err(e) => assert_eq!(
                e.to_string(),
                "the eBPF dataplane is not built into this flanneld: run cargo xtask \
                 build-ebpf, then rebuild"
            ),
        }
    }

    /// The backend keeps the fast path in async tasks.
    #[test]
    fn fast_path_is_send() {
        fn send<T: Send>() {}
        send::<VxlanFastPath>();
    }

    #[test]
    fn network_order_round_trip() {
        let ip = Ipv4Addr::new(10, 244, 1, 0);
        assert_eq!(to_be(ip).to_ne_bytes(), [10, 244, 1, 0]);
        assert_eq!(from_be(to_be(ip)), ip);
    }
}
