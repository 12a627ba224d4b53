//! The peer table the workers forward with, and the counters they bump.
//!
//! The backend builds a whole new [`Table`] per change and swaps it in; workers take
//! an `Arc` of the current one per batch, so a lookup never waits on a writer. Per-peer
//! counters are `Arc`s carried over from table to table while the subnet stays.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use ipnet::Ipv4Net;

use super::packet::Verdict;
use crate::mac::MacAddr;

/// One peer, as the TUN dataplane needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunPeer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// The peer's VtepMAC (VXLAN wire only).
    pub vtep_mac: Option<MacAddr>,
}

/// Packets and bytes (inner IPv4) each way.
#[derive(Debug, Default)]
pub struct Counters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
}

impl Counters {
    pub fn tx(&self, packets: u64, bytes: u64) {
        self.tx_packets.fetch_add(packets, Relaxed);
        self.tx_bytes.fetch_add(bytes, Relaxed);
    }

    pub fn rx(&self, packets: u64, bytes: u64) {
        self.rx_packets.fetch_add(packets, Relaxed);
        self.rx_bytes.fetch_add(bytes, Relaxed);
    }
}

/// A copy of a peer's [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounts {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[derive(Debug)]
pub struct Entry {
    pub peer: TunPeer,
    /// Where its datagrams go: PublicIP and the configured port.
    pub dst: SocketAddrV4,
    pub counters: Arc<Counters>,
}

/// Peers by subnet (longest match) and by PublicIP, and our own subnet.
#[derive(Debug, Default)]
pub struct Table {
    pub own: Option<Ipv4Net>,
    entries: Vec<Entry>,
    /// Prefix lengths present, longest first.
    lens: Vec<u8>,
    by_subnet: HashMap<(u8, u32), usize>,
    by_ip: HashMap<Ipv4Addr, Vec<usize>>,
}

fn mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

impl Table {
    pub fn new(own: Option<Ipv4Net>, peers: &[TunPeer], port: u16, old: &Table) -> Self {
        let mut t = Table {
            own,
            ..Table::default()
        };
        for p in peers {
            let counters = old
                .find_subnet(p.subnet)
                .filter(|e| e.peer.public_ip == p.public_ip)
                .map_or_else(Arc::default, |e| e.counters.clone());
            let i = t.entries.len();
            t.entries.push(Entry {
                peer: *p,
                dst: SocketAddrV4::new(p.public_ip, port),
                counters,
            });
            let len = p.subnet.prefix_len();
            t.by_subnet.insert((len, u32::from(p.subnet.network())), i);
            t.by_ip.entry(p.public_ip).or_default().push(i);
            if !t.lens.contains(&len) {
                t.lens.push(len);
            }
        }
        t.lens.sort_unstable_by(|a, b| b.cmp(a));
        t
    }

    fn find_subnet(&self, s: Ipv4Net) -> Option<&Entry> {
        let i = self
            .by_subnet
            .get(&(s.prefix_len(), u32::from(s.network())))?;
        self.entries.get(*i)
    }

    /// The peer whose subnet holds `dst` (longest match).
    pub fn route(&self, dst: Ipv4Addr) -> Option<&Entry> {
        let d = u32::from(dst);
        self.lens.iter().find_map(|&len| {
            let i = self.by_subnet.get(&(len, d & mask(len)))?;
            self.entries.get(*i)
        })
    }

    /// The peer that may send `inner_src` from `outer_src`: the outer source must be a
    /// peer's PublicIP and the inner source inside that peer's subnet.
    pub fn source(&self, outer_src: Ipv4Addr, inner_src: Ipv4Addr) -> Result<&Entry, Verdict> {
        let idx = self.by_ip.get(&outer_src).ok_or(Verdict::UnknownSource)?;
        idx.iter()
            .filter_map(|&i| self.entries.get(i))
            .find(|e| e.peer.subnet.contains(&inner_src))
            .ok_or(Verdict::InnerSource)
    }

    /// Whether `outer_src` is some peer's PublicIP.
    pub fn knows(&self, outer_src: Ipv4Addr) -> bool {
        self.by_ip.contains_key(&outer_src)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

/// The current table, swapped whole.
#[derive(Debug, Default)]
pub struct SharedTable(RwLock<Arc<Table>>);

impl SharedTable {
    pub fn load(&self) -> Arc<Table> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn store(&self, t: Table) {
        let t = Arc::new(t);
        match self.0.write() {
            Ok(mut g) => *g = t,
            Err(poisoned) => *poisoned.into_inner() = t,
        }
    }
}

/// Drops by [`Verdict`].
#[derive(Debug, Default)]
pub struct Drops([AtomicU64; Verdict::ALL.len()]);

impl Drops {
    pub fn add(&self, v: Verdict, n: u64) {
        self.0[v.index()].fetch_add(n, Relaxed);
    }

    pub fn get(&self, v: Verdict) -> u64 {
        self.0[v.index()].load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str, ip: [u8; 4]) -> TunPeer {
        TunPeer {
            subnet: s.parse().unwrap(),
            public_ip: Ipv4Addr::from(ip),
            vtep_mac: None,
        }
    }

    #[test]
    fn longest_match_and_sources() {
        let peers = [
            peer("10.5.0.0/16", [192, 168, 0, 9]),
            peer("10.5.3.0/24", [192, 168, 0, 3]),
            peer("10.5.4.0/24", [192, 168, 0, 4]),
        ];
        let t = Table::new(None, &peers, 8285, &Table::default());
        let r = |ip: [u8; 4]| t.route(Ipv4Addr::from(ip)).map(|e| e.dst);
        assert_eq!(r([10, 5, 3, 7]), Some("192.168.0.3:8285".parse().unwrap()));
        assert_eq!(r([10, 5, 9, 7]), Some("192.168.0.9:8285".parse().unwrap()));
        assert_eq!(r([10, 6, 0, 1]), None);
        let src = |o: [u8; 4], i: [u8; 4]| {
            t.source(Ipv4Addr::from(o), Ipv4Addr::from(i))
                .map(|e| e.peer.subnet.to_string())
        };
        assert_eq!(
            src([192, 168, 0, 3], [10, 5, 3, 2]),
            Ok("10.5.3.0/24".into())
        );
        assert_eq!(
            src([192, 168, 0, 3], [10, 5, 4, 2]),
            Err(Verdict::InnerSource)
        );
        assert_eq!(
            src([192, 168, 0, 7], [10, 5, 3, 2]),
            Err(Verdict::UnknownSource)
        );
    }

    #[test]
    fn counters_survive_a_rebuild_of_the_same_peer() {
        let a = [peer("10.5.3.0/24", [192, 168, 0, 3])];
        let t1 = Table::new(None, &a, 8285, &Table::default());
        t1.entries()[0].counters.tx(2, 200);
        let t2 = Table::new(None, &a, 8285, &t1);
        assert_eq!(t2.entries()[0].counters.tx_packets.load(Relaxed), 2);
        // A new PublicIP is a new peer: counting restarts.
        let b = [peer("10.5.3.0/24", [192, 168, 0, 4])];
        let t3 = Table::new(None, &b, 8285, &t2);
        assert_eq!(t3.entries()[0].counters.tx_packets.load(Relaxed), 0);
    }
}
