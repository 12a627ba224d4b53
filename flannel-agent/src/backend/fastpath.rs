//! The eBPF fast path as a [`super::vxlan::PeerPath`]: fed the same peer calls as the
//! kernel entries, after them on add and before them on remove (so a packet the
//! programs hand back to the kernel always finds the kernel state in place).
//!
//! Attach happens once `flannel.<VNI>` exists; a new device index or a new own subnet
//! re-attaches, which adopts the pinned maps. With `--dataplane auto` a failed attach
//! falls back to the kernel path and records why; with `--dataplane ebpf` it is an error.

use std::path::PathBuf;

use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::{
    BackendError,
    vxlan::{PeerRoute, PeerTable, VxlanPeer},
};
use crate::{
    dataplane::{self, EbpfError, FastPathConfig, PeerEntry, VxlanFastPath},
    host::status::{PeerStatus, VerdictCount},
    iface::ExternalInterface,
    mac::MacAddr,
};

/// What the fast path needs besides the device index and our subnet.
#[derive(Debug, Clone)]
pub struct FastPathSpec {
    pub underlay_ifindex: u32,
    pub underlay_mtu: u32,
    pub public_ip: std::net::Ipv4Addr,
    pub vni: u32,
    pub port: u16,
    pub vtep_mac: MacAddr,
    pub pin_dir: PathBuf,
}

impl FastPathSpec {
    pub fn new(ext: &ExternalInterface, vni: u32, port: u16, vtep_mac: MacAddr) -> Self {
        Self {
            underlay_ifindex: ext.ifindex,
            underlay_mtu: ext.mtu,
            public_ip: ext.public_ip,
            vni,
            port,
            vtep_mac,
            pin_dir: PathBuf::from(dataplane::DEFAULT_PIN_DIR),
        }
    }
}

pub struct EbpfPeers {
    spec: FastPathSpec,
    /// `--dataplane ebpf`: failures are errors instead of a fallback.
    required: bool,
    /// The device index and own subnet the programs are attached for.
    attached_for: Option<(u32, Ipv4Net)>,
    fast: Option<VxlanFastPath>,
    /// Why the fast path is not in use, when it fell back.
    refused: Option<String>,
}

impl std::fmt::Debug for EbpfPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfPeers")
            .field("attached_for", &self.attached_for)
            .field("active", &self.fast.is_some())
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

fn entry(p: &VxlanPeer) -> Option<PeerEntry> {
    // DirectRouting peers do not go through the overlay at all.
    matches!(p.path, PeerRoute::Overlay).then_some(PeerEntry {
        subnet: p.subnet,
        public_ip: p.public_ip,
        vtep_mac: p.vtep_mac,
    })
}

impl EbpfPeers {
    pub fn new(spec: FastPathSpec, required: bool) -> Self {
        Self {
            spec,
            required,
            attached_for: None,
            fast: None,
            refused: None,
        }
    }

    /// Whether the programs are attached and fed.
    pub fn active(&self) -> bool {
        self.fast.is_some()
    }

    /// Why the fast path fell back to the kernel, if it did.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// An eBPF failure: fatal when eBPF was asked for, else a logged fallback.
    fn fail(&mut self, what: &str, e: EbpfError) -> Result<(), BackendError> {
        self.fast = None;
        self.attached_for = None;
        if self.required {
            return Err(BackendError::Ebpf(e));
        }
        warn!(error = %e, "{what} failed: falling back to the kernel vxlan dataplane");
        self.refused = Some(e.to_string());
        Ok(())
    }

    /// The device exists with index `dev` and we hold `own`: attach (or re-attach).
    pub fn device_changed(
        &mut self,
        dev: u32,
        own: Option<Ipv4Net>,
        peers: &PeerTable,
        synced: bool,
    ) -> Result<(), BackendError> {
        let Some(own) = own else { return Ok(()) };
        if self.refused.is_some() && !self.required {
            return Ok(());
        }
        if self.attached_for == Some((dev, own)) && self.fast.is_some() {
            return Ok(());
        }
        // Drop the old handle first: its pinned maps are adopted by the new attach.
        self.fast = None;
        let cfg = FastPathConfig {
            vxlan_ifindex: dev,
            underlay_ifindex: self.spec.underlay_ifindex,
            underlay_mtu: self.spec.underlay_mtu,
            public_ip: self.spec.public_ip,
            vni: self.spec.vni,
            port: self.spec.port,
            vtep_mac: self.spec.vtep_mac,
            subnet: own,
            pin_dir: self.spec.pin_dir.clone(),
        };
        match VxlanFastPath::attach(cfg) {
            Ok(fast) => {
                info!(vxlan_ifindex = dev, underlay_ifindex = self.spec.underlay_ifindex, subnet = %own, pins = %self.spec.pin_dir.display(), "eBPF fast path attached");
                self.fast = Some(fast);
                self.attached_for = Some((dev, own));
                // Before the first snapshot the table is partial: add, never prune.
                if synced {
                    self.sync(peers)
                } else {
                    for p in peers.iter() {
                        self.upsert(p)?;
                    }
                    Ok(())
                }
            }
            Err(e) => self.fail("attaching the eBPF fast path", e),
        }
    }

    pub fn upsert(&mut self, new: &VxlanPeer) -> Result<(), BackendError> {
        let Some(fast) = &mut self.fast else {
            return Ok(());
        };
        let r = match entry(new) {
            Some(e) => fast.upsert_peer(&e),
            None => fast.remove_peer(new.subnet),
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.fail("updating an eBPF peer", e),
        }
    }

    pub fn remove(&mut self, old: &VxlanPeer) -> Result<(), BackendError> {
        let Some(fast) = &mut self.fast else {
            return Ok(());
        };
        match fast.remove_peer(old.subnet) {
            Ok(()) => Ok(()),
            Err(e) => self.fail("removing an eBPF peer", e),
        }
    }

    pub fn sync(&mut self, peers: &PeerTable) -> Result<(), BackendError> {
        let Some(fast) = &mut self.fast else {
            return Ok(());
        };
        let desired: Vec<PeerEntry> = peers.iter().filter_map(entry).collect();
        match fast.sync_peers(&desired) {
            Ok(()) => Ok(()),
            Err(e) => self.fail("syncing the eBPF peers", e),
        }
    }

    /// Per-peer counters and verdict counts, for `flanneld status` and `/metrics`.
    pub fn counters(&self, peers: &PeerTable) -> (Vec<PeerStatus>, Vec<VerdictCount>) {
        let Some(fast) = &self.fast else {
            return (Vec::new(), Vec::new());
        };
        let counts: std::collections::HashMap<Ipv4Net, _> = fast
            .peer_counters()
            .map(|v| v.into_iter().collect())
            .unwrap_or_default();
        let peer_rows = peers
            .iter()
            .map(|p| {
                let c = counts.get(&p.subnet).copied().unwrap_or_default();
                PeerStatus {
                    subnet: p.subnet.to_string(),
                    public_ip: p.public_ip.to_string(),
                    vtep_mac: p.vtep_mac.to_string(),
                    tx_packets: c.tx_packets,
                    tx_bytes: c.tx_bytes,
                    rx_packets: c.rx_packets,
                    rx_bytes: c.rx_bytes,
                }
            })
            .collect();
        let verdicts = verdict_counts(fast.drop_counters().unwrap_or_default());
        (peer_rows, verdicts)
    }
}

/// The fast path's `drop_*` / `pass_*` counters as status rows.
pub fn verdict_counts(counters: Vec<(&'static str, u64)>) -> Vec<VerdictCount> {
    counters
        .into_iter()
        .map(|(name, packets)| {
            let (action, reason) = name.split_once('_').unwrap_or(("drop", name));
            VerdictCount {
                action: action.to_owned(),
                reason: reason.replace('_', " "),
                packets,
            }
        })
        .collect()
}
