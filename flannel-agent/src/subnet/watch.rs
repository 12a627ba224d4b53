//! The set of peer leases, kept from an initial list plus watch events (flannel's
//! `LeaseWatcher`), as a pure state machine that emits [`PeerEvent`]s.
//!
//! Every value is validated before it can become a peer: the key parses, the subnet is
//! inside the Network with the configured length and overlaps no other peer, and the
//! value is a valid `LeaseAttrs`. A bad value is reported and skipped; it never disturbs
//! other peers, and a peer already known keeps its last valid state.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use super::{Lease, LeaseAttrs, PeerEvent, SubnetKey, key::SubnetKeyError, lease::LeaseError};
use crate::config::Ipv4Range;

/// One key/value as read from etcd, below `<prefix>/subnets/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLease {
    /// The key with the `<prefix>/subnets/` part removed.
    pub name: String,
    pub value: Vec<u8>,
    pub etcd_lease: i64,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidLease {
    #[error(transparent)]
    Key(#[from] SubnetKeyError),
    #[error("lease {key}: {source}")]
    Value {
        key: String,
        #[source]
        source: LeaseError,
    },
    #[error("lease {key}: subnet is not inside the network {network}")]
    OutsideNetwork { key: String, network: Ipv4Net },
    #[error("lease {key}: prefix length is not the configured SubnetLen /{len}")]
    WrongLength { key: String, len: u8 },
    #[error("lease {key}: subnet overlaps the lease {other}")]
    Overlap { key: String, other: String },
}

/// Decodes and validates one raw lease against the network range.
pub fn decode(range: &Ipv4Range, raw: &RawLease) -> Result<Lease, InvalidLease> {
    let key = SubnetKey::parse(&raw.name)?;
    let name = || key.to_string();
    if !range.network.contains(&key.ipv4) {
        return Err(InvalidLease::OutsideNetwork {
            key: name(),
            network: range.network,
        });
    }
    if key.ipv4.prefix_len() != range.subnet_len {
        return Err(InvalidLease::WrongLength {
            key: name(),
            len: range.subnet_len,
        });
    }
    let attrs = LeaseAttrs::parse(&raw.value).map_err(|source| InvalidLease::Value {
        key: name(),
        source,
    })?;
    Ok(Lease {
        key,
        attrs,
        etcd_lease: raw.etcd_lease,
        mod_revision: raw.mod_revision,
    })
}

/// What a batch of input did: peer events for the backends, and rejected values to log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub events: Vec<PeerEvent>,
    pub rejected: Vec<InvalidLease>,
}

#[derive(Debug)]
pub struct PeerSet {
    range: Ipv4Range,
    own: Option<Ipv4Net>,
    peers: BTreeMap<Ipv4Net, Lease>,
}

impl PeerSet {
    pub fn new(range: Ipv4Range, own: Option<Ipv4Net>) -> Self {
        Self {
            range,
            own,
            peers: BTreeMap::new(),
        }
    }

    pub fn peers(&self) -> impl Iterator<Item = &Lease> {
        self.peers.values()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Our subnet changed (re-acquired elsewhere): it is no longer a peer of ours, and
    /// the old one may now be a peer.
    pub fn set_own(&mut self, own: Option<Ipv4Net>) -> Outcome {
        self.own = own;
        let mut out = Outcome::default();
        if let Some(own) = own
            && let Some(l) = self.peers.remove(&own)
        {
            out.events.push(PeerEvent::Removed(l));
        }
        out
    }

    fn overlapping(&self, net: Ipv4Net) -> Option<&Lease> {
        // Peers all have SubnetLen, so only an equal key could overlap; the range query
        // keeps this correct even if that ever changes.
        self.peers
            .range(..=Ipv4Net::new(net.broadcast(), 32).unwrap_or(net))
            .rev()
            .take_while(|(n, _)| n.broadcast() >= net.network() || n.contains(&net))
            .map(|(_, l)| l)
            .find(|l| l.subnet() != net && (l.subnet().contains(&net) || net.contains(&l.subnet())))
    }

    fn admit(&self, raw: &RawLease) -> Result<Option<Lease>, InvalidLease> {
        let lease = decode(&self.range, raw)?;
        if Some(lease.subnet()) == self.own {
            return Ok(None);
        }
        if let Some(other) = self.overlapping(lease.subnet()) {
            return Err(InvalidLease::Overlap {
                key: lease.key.to_string(),
                other: other.key.to_string(),
            });
        }
        Ok(Some(lease))
    }

    /// A PUT from the watch.
    pub fn put(&mut self, raw: &RawLease) -> Outcome {
        let mut out = Outcome::default();
        match self.admit(raw) {
            Ok(Some(lease)) => out.events.extend(self.upsert(lease)),
            Ok(None) => {}
            Err(e) => out.rejected.push(e),
        }
        out
    }

    /// A DELETE from the watch (only the key is known).
    pub fn delete(&mut self, name: &str) -> Outcome {
        let mut out = Outcome::default();
        match SubnetKey::parse(name) {
            Ok(key) => {
                if let Some(l) = self.peers.remove(&key.ipv4) {
                    out.events.push(PeerEvent::Removed(l));
                }
            }
            Err(e) => out.rejected.push(e.into()),
        }
        out
    }

    /// A full listing (start, compaction, periodic resync): diff against what is known.
    pub fn reset(&mut self, snapshot: &[RawLease]) -> Outcome {
        let mut out = Outcome::default();
        let mut seen = BTreeMap::new();
        for raw in snapshot {
            // A key that exists but holds garbage keeps the peer's last valid state, so
            // mark it seen before validating.
            if let Ok(k) = SubnetKey::parse(&raw.name) {
                seen.insert(k.ipv4, ());
            }
            match self.admit(raw) {
                Ok(Some(lease)) => out.events.extend(self.upsert(lease)),
                Ok(None) => {}
                Err(e) => out.rejected.push(e),
            }
        }
        let gone: Vec<Ipv4Net> = self
            .peers
            .keys()
            .filter(|n| !seen.contains_key(n))
            .copied()
            .collect();
        for n in gone {
            if let Some(l) = self.peers.remove(&n) {
                out.events.push(PeerEvent::Removed(l));
            }
        }
        out
    }

    fn upsert(&mut self, lease: Lease) -> Option<PeerEvent> {
        match self.peers.insert(lease.subnet(), lease.clone()) {
            None => Some(PeerEvent::Added(lease)),
            // A TTL renewal changes only the revision: not an event for the dataplane.
            Some(old) if old.attrs == lease.attrs => None,
            Some(old) => Some(PeerEvent::Changed { old, new: lease }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    fn range() -> Ipv4Range {
        parse_config(br#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .unwrap()
            .ipv4
            .unwrap()
    }

    fn raw(name: &str, ip: &str, mac: &str, rev: i64) -> RawLease {
        RawLease {
            name: name.into(),
            value: format!(
                r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
            )
            .into_bytes(),
            etcd_lease: 1,
            mod_revision: rev,
        }
    }

    const M1: &str = "02:00:00:00:00:01";
    const M2: &str = "02:00:00:00:00:02";

    #[test]
    fn add_change_remove() {
        let mut s = PeerSet::new(range(), Some("10.5.1.0/24".parse().unwrap()));
        let o = s.reset(&[
            raw("10.5.1.0-24", "192.168.0.1", M1, 1),
            raw("10.5.2.0-24", "192.168.0.2", M1, 2),
        ]);
        assert_eq!(o.events.len(), 1, "own lease must be filtered");
        assert!(
            matches!(&o.events[0], PeerEvent::Added(l) if l.subnet().to_string() == "10.5.2.0/24")
        );

        // Renewal: same attrs, new revision: no event.
        assert!(
            s.put(&raw("10.5.2.0-24", "192.168.0.2", M1, 5))
                .events
                .is_empty()
        );
        // New MAC: a change.
        let o = s.put(&raw("10.5.2.0-24", "192.168.0.2", M2, 6));
        assert!(
            matches!(&o.events[0], PeerEvent::Changed { new, .. } if new.attrs.public_ip.to_string() == "192.168.0.2")
        );
        let o = s.delete("10.5.2.0-24");
        assert!(matches!(&o.events[0], PeerEvent::Removed(l) if l.mod_revision == 6));
        assert!(s.is_empty());
    }

    #[test]
    fn malformed_values_are_skipped_and_never_disturb_others() {
        let mut s = PeerSet::new(range(), None);
        s.reset(&[
            raw("10.5.2.0-24", "192.168.0.2", M1, 1),
            raw("10.5.3.0-24", "192.168.0.3", M1, 1),
        ]);
        let bad = [
            RawLease {
                name: "10.5.4.0-24".into(),
                value: b"{not json".to_vec(),
                etcd_lease: 1,
                mod_revision: 2,
            },
            RawLease {
                name: "garbage".into(),
                value: b"{}".to_vec(),
                etcd_lease: 1,
                mod_revision: 2,
            },
            raw("10.6.0.0-24", "192.168.0.9", M1, 2),
            raw("10.5.4.0-25", "192.168.0.9", M1, 2),
            raw("10.5.4.0-24", "0.0.0.0", M1, 2),
            // A corrupted write to a known peer keeps its last valid state.
            RawLease {
                name: "10.5.2.0-24".into(),
                value: b"[]".to_vec(),
                etcd_lease: 1,
                mod_revision: 3,
            },
        ];
        for b in &bad {
            let o = s.put(b);
            assert!(o.events.is_empty(), "{b:?}");
            assert_eq!(o.rejected.len(), 1, "{b:?}");
        }
        assert_eq!(s.len(), 2);
        // A resync that still holds the corrupt value does not remove the peer either.
        let mut snap = vec![raw("10.5.3.0-24", "192.168.0.3", M1, 1)];
        snap.extend(bad.iter().cloned());
        let o = s.reset(&snap);
        assert!(o.events.is_empty(), "{:?}", o.events);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn reset_diffs_against_known() {
        let mut s = PeerSet::new(range(), None);
        s.reset(&[
            raw("10.5.2.0-24", "192.168.0.2", M1, 1),
            raw("10.5.3.0-24", "192.168.0.3", M1, 1),
        ]);
        let o = s.reset(&[
            raw("10.5.3.0-24", "192.168.0.3", M2, 9),
            raw("10.5.4.0-24", "192.168.0.4", M1, 9),
        ]);
        let kinds: Vec<_> = o
            .events
            .iter()
            .map(|e| match e {
                PeerEvent::Added(l) => format!("+{}", l.key),
                PeerEvent::Changed { new, .. } => format!("~{}", new.key),
                PeerEvent::Removed(l) => format!("-{}", l.key),
            })
            .collect();
        assert_eq!(kinds, ["~10.5.3.0-24", "+10.5.4.0-24", "-10.5.2.0-24"]);
    }

    #[test]
    fn own_subnet_change() {
        let mut s = PeerSet::new(range(), None);
        s.reset(&[raw("10.5.2.0-24", "192.168.0.2", M1, 1)]);
        let o = s.set_own(Some("10.5.2.0/24".parse().unwrap()));
        assert_eq!(o.events.len(), 1);
        assert!(s.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(name in "\\PC{0,40}", value in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut s = PeerSet::new(range(), None);
            let _ = s.put(&RawLease { name: name.clone(), value, etcd_lease: 0, mod_revision: 0 });
            let _ = s.delete(&name);
        }
    }
}
