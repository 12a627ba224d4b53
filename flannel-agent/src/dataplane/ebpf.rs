//! The eBPF VXLAN fast path, the dataplane's errors and the embedded BPF object.
//!
//! Design note. The kernel keeps flannel's vxlan state (device, neighbour, FDB, route per
//! peer; see `backend/`), and this module puts two TC programs on top of it:
//! `flannel_encap` at the egress of `flannel.<VNI>` and `flannel_decap` at the ingress of
//! the underlay. Whatever they cannot handle goes to the kernel path, so the kernel state
//! must stay complete; the maps only say which peers may take the fast lane.
//!
//! Lifetime (the rules of `pinned.rs`, which the udp and host-gw fast paths share). Maps
//! are pinned under `<pin_dir>/v<LAYOUT_VERSION>/<MAP>` and the two TCX links under
//! `<pin_dir>/links/{encap,decap}`, in a root-only (0700) directory on bpffs. A dropped
//! [`VxlanFastPath`] (including SIGKILL of the agent) leaves everything attached and
//! forwarding. [`VxlanFastPath::attach`] adopts what is pinned: maps of the same layout
//! are reused as they are (entries and counters kept, no flush), the new programs replace
//! the old ones on the pinned links atomically (`bpf_link_update`), and the caller then
//! applies only the difference with [`VxlanFastPath::sync_peers`]. Pinned maps of another
//! layout version (`v<N>`) are never reused, they are migrated (`migrate.rs`): new maps
//! are created, and every old map whose type and key and value sizes are unchanged is
//! carried over into its new counterpart. The state (peers, sources, config) is copied
//! before the new programs replace the old ones on the links, so they know every peer
//! from their first packet; the counters are added right after the swap, so nothing the
//! old programs counted is lost. Peers keep their slots, and so their counters. A map
//! whose shape changed is not carried over (a warning names both shapes) and starts
//! empty. The old pins are removed once the new programs run. Until the first
//! [`VxlanFastPath::sync_peers`], decap hands VXLAN from unknown sources to the kernel
//! rather than dropping it, so a fresh start cuts no traffic; after a migration, decap
//! keeps dropping them only if the old layout had been synced and both peer maps were
//! copied. A pinned map of our own layout version with other sizes is refused
//! ([`EbpfError::LayoutMismatch`]): that is a build that forgot to bump the version.

use std::{io, net::Ipv4Addr, path::PathBuf};

use aya::{
    EbpfLoader,
    maps::MapError,
    programs::{ProgramError, TcAttachType},
    util::KernelVersion,
};
use flannel_common::{
    LAYOUT_VERSION, MAP_CONFIG, PINNED_MAPS, PROG_DECAP, PROG_ENCAP,
    maps::{Config, FLAG_PEERS_SYNCED, MAX_PEERS},
};
use ipnet::Ipv4Net;
use thiserror::Error;

use super::pinned::{Attached, PeerSpec, classifier, node_config, open_pinned, peer_api, to_be};
use crate::mac::MacAddr;

/// Where the agent pins its maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flannel";
/// The pinned links of the tunnel fast paths' two programs.
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
#[derive(Debug)]
pub struct VxlanFastPath {
    fp: Attached<Config>,
}

node_config!(Config, MAP_CONFIG);

impl PeerEntry {
    fn spec(&self) -> PeerSpec {
        PeerSpec {
            subnet: self.subnet,
            public_ip: self.public_ip,
            vtep_mac: self.vtep_mac.0,
        }
    }

    fn from_spec(p: PeerSpec) -> PeerEntry {
        PeerEntry {
            subnet: p.subnet,
            public_ip: p.public_ip,
            vtep_mac: MacAddr(p.vtep_mac),
        }
    }
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
        let mut fp = Attached::new(
            &cfg.pin_dir,
            cfg.pin_dir.clone(),
            state,
            "vxlan",
            |synced| Config {
                public_ip_be: to_be(cfg.public_ip),
                subnet_be: to_be(cfg.subnet.trunc().addr()),
                subnet_mask_be: to_be(cfg.subnet.netmask()),
                vni: cfg.vni,
                underlay_ifindex: cfg.underlay_ifindex,
                vxlan_ifindex: cfg.vxlan_ifindex,
                underlay_mtu: cfg.underlay_mtu,
                flags: if synced { FLAG_PEERS_SYNCED } else { 0 },
                port_be: cfg.port.to_be(),
                vtep_mac: cfg.vtep_mac.0,
            },
        )?;
        fp.attach(
            PROG_DECAP,
            cfg.underlay_ifindex,
            TcAttachType::Ingress,
            LINK_DECAP,
        )?;
        fp.attach(
            PROG_ENCAP,
            cfg.vxlan_ifindex,
            TcAttachType::Egress,
            LINK_ENCAP,
        )?;
        pending.finish(&mut fp.ebpf)?;
        Ok(VxlanFastPath { fp })
    }

    peer_api!(PeerEntry);
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
}
