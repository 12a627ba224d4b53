//! Choosing a subnet (flannel's `tryAcquireLease`), as a pure function of the config,
//! the current leases, our public IP and the subnet from the previous subnet.env.
//!
//! Order: an existing key holding our PublicIP that still fits the config; then the
//! previous subnet if it is free and fits; then a random pick among the first 100 free
//! subnets in [SubnetMin, SubnetMax].

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use super::Lease;
use crate::config::Ipv4Range;

/// flannel collects this many free candidates, then picks one at random.
const CANDIDATES: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("out of subnets")]
    OutOfSubnets,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A key that already holds our PublicIP: keep its subnet, rewrite its value.
    Reuse(Lease),
    /// The subnet recorded in subnet.env, still free.
    Previous(Ipv4Net),
    /// A newly picked free subnet.
    Fresh(Ipv4Net),
}

impl Choice {
    pub fn subnet(&self) -> Ipv4Net {
        match self {
            Self::Reuse(l) => l.subnet(),
            Self::Previous(n) | Self::Fresh(n) => *n,
        }
    }
}

/// Whether a subnet has the configured length and lies in [SubnetMin, SubnetMax].
pub fn fits(range: &Ipv4Range, subnet: Ipv4Net) -> bool {
    subnet.prefix_len() == range.subnet_len
        && subnet.network() == subnet.addr()
        && range.subnet_min <= subnet.network()
        && subnet.network() <= range.subnet_max
}

/// Taken subnets as closed intervals sorted by start, with the running maximum of their
/// ends, so an overlap check is one binary search.
struct Taken {
    starts: Vec<u32>,
    max_end: Vec<u32>,
}

impl Taken {
    fn new(taken: &[Ipv4Net]) -> Self {
        let mut v: Vec<(u32, u32)> = taken
            .iter()
            .map(|n| (u32::from(n.network()), u32::from(n.broadcast())))
            .collect();
        v.sort_unstable();
        let mut max = 0;
        let max_end = v
            .iter()
            .map(|&(_, e)| {
                max = max.max(e);
                max
            })
            .collect();
        Self {
            starts: v.into_iter().map(|(s, _)| s).collect(),
            max_end,
        }
    }

    fn overlaps(&self, net: Ipv4Net) -> bool {
        let (lo, hi) = (u32::from(net.network()), u32::from(net.broadcast()));
        // Intervals starting at or before `hi` overlap iff one of them ends at or after `lo`.
        let idx = self.starts.partition_point(|&s| s <= hi);
        idx > 0 && self.max_end[idx - 1] >= lo
    }
}

/// Picks our subnet. `taken` holds the subnet of every existing key, whatever its value;
/// `leases` the valid ones. `stale` receives keys holding our PublicIP that no longer
/// fit the config (flannel deletes those).
pub fn choose(
    range: &Ipv4Range,
    taken: &[Ipv4Net],
    leases: &[Lease],
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Net>,
    rng: &mut impl Rng,
    stale: &mut Vec<Lease>,
) -> Result<Choice, AllocError> {
    let mut reuse = None;
    for l in leases.iter().filter(|l| l.attrs.public_ip == public_ip) {
        if fits(range, l.subnet()) {
            reuse.get_or_insert_with(|| l.clone());
        } else {
            stale.push(l.clone());
        }
    }
    if let Some(l) = reuse {
        return Ok(Choice::Reuse(l));
    }

    let taken = Taken::new(taken);
    if let Some(prev) = previous
        && fits(range, prev)
        && !taken.overlaps(prev)
    {
        return Ok(Choice::Previous(prev));
    }

    let step = 1u64 << (32 - u32::from(range.subnet_len));
    let (min, max) = (
        u64::from(u32::from(range.subnet_min)),
        u64::from(u32::from(range.subnet_max)),
    );
    let mut free = Vec::with_capacity(CANDIDATES);
    let mut at = min;
    while at <= max && free.len() < CANDIDATES {
        let net = Ipv4Net::new(Ipv4Addr::from(at as u32), range.subnet_len) // at <= u32::MAX
            .map_err(|_| AllocError::OutOfSubnets)?;
        if !taken.overlaps(net) {
            free.push(net);
        }
        at += step;
    }
    if free.is_empty() {
        return Err(AllocError::OutOfSubnets);
    }
    Ok(Choice::Fresh(free[rng.random_range(0..free.len())]))
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;
    use crate::{
        config::parse_config,
        subnet::{BackendAttrs, LeaseAttrs, SubnetKey},
    };

    fn range(cfg: &str) -> Ipv4Range {
        parse_config(cfg.as_bytes()).unwrap().ipv4.unwrap()
    }

    fn lease(net: &str, ip: [u8; 4]) -> Lease {
        Lease {
            key: SubnetKey::v4(net.parse().unwrap()),
            attrs: LeaseAttrs {
                public_ip: Ipv4Addr::from(ip),
                public_ipv6: None,
                backend: BackendAttrs::None,
            },
            etcd_lease: 7,
            mod_revision: 1,
        }
    }

    /// flannel's `mock_registry.go` seed: 10.3.1/2/4/5.0/24 and 10.3.31.0/24.
    fn flannel_seed() -> Vec<Lease> {
        vec![
            lease("10.3.1.0/24", [1, 1, 1, 1]),
            lease("10.3.2.0/24", [1, 1, 1, 2]),
            lease("10.3.4.0/24", [1, 1, 1, 4]),
            lease("10.3.5.0/24", [1, 1, 1, 5]),
            lease("10.3.31.0/24", [1, 1, 1, 31]),
        ]
    }

    fn pick(
        r: &Ipv4Range,
        leases: &[Lease],
        ip: Ipv4Addr,
        prev: Option<&str>,
        rng: &mut impl Rng,
        stale: &mut Vec<Lease>,
    ) -> Result<Choice, AllocError> {
        let taken: Vec<Ipv4Net> = leases.iter().map(Lease::subnet).collect();
        choose(
            r,
            &taken,
            leases,
            ip,
            prev.map(|p| p.parse().unwrap()),
            rng,
            stale,
        )
    }

    const FLANNEL_CFG: &str =
        r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.5.0"}"#;

    #[test]
    fn the_only_free_subnet_is_picked() {
        let r = range(FLANNEL_CFG);
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let c = pick(
                &r,
                &flannel_seed(),
                Ipv4Addr::new(9, 9, 9, 9),
                None,
                &mut rng,
                &mut vec![],
            )
            .unwrap();
            assert_eq!(c, Choice::Fresh("10.3.3.0/24".parse().unwrap()));
        }
    }

    #[test]
    fn reuse_by_public_ip() {
        let r = range(FLANNEL_CFG);
        let c = pick(
            &r,
            &flannel_seed(),
            Ipv4Addr::new(1, 1, 1, 4),
            None,
            &mut rand::rng(),
            &mut vec![],
        )
        .unwrap();
        assert_eq!(c.subnet().to_string(), "10.3.4.0/24");
        assert!(matches!(c, Choice::Reuse(_)));
    }

    #[test]
    fn own_lease_outside_range_is_stale() {
        let r = range(FLANNEL_CFG);
        let mut stale = vec![];
        let c = pick(
            &r,
            &flannel_seed(),
            Ipv4Addr::new(1, 1, 1, 31),
            None,
            &mut rand::rng(),
            &mut stale,
        )
        .unwrap();
        assert_eq!(c, Choice::Fresh("10.3.3.0/24".parse().unwrap()));
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].subnet().to_string(), "10.3.31.0/24");
    }

    #[test]
    fn previous_subnet_is_reused_when_free_and_in_range() {
        let r =
            range(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.25.0"}"#);
        let c = pick(
            &r,
            &flannel_seed(),
            Ipv4Addr::new(9, 9, 9, 9),
            Some("10.3.6.0/24"),
            &mut rand::rng(),
            &mut vec![],
        )
        .unwrap();
        assert_eq!(c, Choice::Previous("10.3.6.0/24".parse().unwrap()));
    }

    #[test]
    fn previous_subnet_outside_range_or_taken_is_rejected() {
        let r =
            range(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.25.0"}"#);
        for prev in ["10.4.1.0/24", "10.3.2.0/24", "10.3.6.0/25", "10.3.26.0/24"] {
            let c = pick(
                &r,
                &flannel_seed(),
                Ipv4Addr::new(9, 9, 9, 9),
                Some(prev),
                &mut rand::rng(),
                &mut vec![],
            )
            .unwrap();
            assert!(matches!(c, Choice::Fresh(_)), "{prev} reused");
            assert!(fits(&r, c.subnet()));
        }
    }

    #[test]
    fn out_of_subnets() {
        let r = range(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.2.0"}"#);
        let e = pick(
            &r,
            &flannel_seed(),
            Ipv4Addr::new(9, 9, 9, 9),
            None,
            &mut rand::rng(),
            &mut vec![],
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "out of subnets");
    }

    #[test]
    fn a_wider_lease_blocks_what_it_covers() {
        let r = range(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.3.0"}"#);
        let leases = vec![lease("10.3.0.0/22", [5, 5, 5, 5])];
        let e = pick(
            &r,
            &leases,
            Ipv4Addr::new(9, 9, 9, 9),
            None,
            &mut rand::rng(),
            &mut vec![],
        );
        assert_eq!(e, Err(AllocError::OutOfSubnets));
    }

    #[test]
    fn picks_among_the_first_hundred_free() {
        let r = range(r#"{"Network":"10.0.0.0/8"}"#);
        let mut seen = std::collections::HashSet::new();
        for seed in 0..200 {
            let c = pick(
                &r,
                &[],
                Ipv4Addr::new(9, 9, 9, 9),
                None,
                &mut StdRng::seed_from_u64(seed),
                &mut vec![],
            )
            .unwrap();
            let third = c.subnet().network().octets();
            assert!(
                u32::from(c.subnet().network()) < u32::from(Ipv4Addr::new(10, 0, 101, 0)),
                "{third:?}"
            );
            seen.insert(c.subnet());
        }
        assert!(seen.len() > 50, "random pick is not spread: {}", seen.len());
    }
}
