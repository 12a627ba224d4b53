//! Reconciliation as a pure diff: desired kernel entries against observed ones.
//!
//! The same function serves three callers, so there is one code path for "make the kernel
//! look like this":
//! - a full sync (start, every lease snapshot, the periodic check, a recreated device):
//!   `observed` is a dump of the kernel, filtered through [`Scope`] so only entries
//!   flanneld owns are ever removed;
//! - one peer added or changed: `observed` is the entries the peer had before;
//! - one peer removed: `desired` is empty.
//!
//! Ordering follows flannel: installs go neighbour, FDB, route (the route last, so the
//! kernel never ARPs for a peer whose entries are not there yet); removals go route, FDB,
//! neighbour. Installs come before removals, and an entry whose kernel key is about to be
//! overwritten by a replace is not deleted first, so changing a peer never opens a gap.

use std::collections::BTreeSet;

use ipnet::Ipv4Net;

use crate::netlink::{FdbEntry, IfIndex, Neigh, Route, RouteKind};

/// A set of kernel entries: what should be, or what is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub routes: Vec<Route>,
    pub neighs: Vec<Neigh>,
    pub fdb: Vec<FdbEntry>,
}

impl State {
    pub fn extend(&mut self, other: State) {
        self.routes.extend(other.routes);
        self.neighs.extend(other.neighs);
        self.fdb.extend(other.fdb);
    }
}

/// Which observed entries flanneld owns, and may therefore delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// The flannel `Network`: no route outside it is ever touched.
    pub network: Ipv4Net,
    /// `flannel.<VNI>`: every IPv4 route into the network, neighbour and unicast FDB
    /// entry on it is ours.
    pub vxlan_dev: Option<IfIndex>,
    /// The external interface, for host-gw and DirectRouting: routes into the network
    /// through a gateway on it are ours (connected routes are the kernel's).
    pub ext_dev: Option<IfIndex>,
}

impl Scope {
    pub fn owns_route(&self, r: &Route) -> bool {
        if !self.network.contains(&r.dst) {
            return false;
        }
        match r.kind {
            RouteKind::Unicast { gateway, dev, .. } => {
                Some(dev) == self.vxlan_dev || (Some(dev) == self.ext_dev && gateway.is_some())
            }
            RouteKind::Blackhole | RouteKind::Other => false,
        }
    }

    pub fn owns_neigh(&self, n: &Neigh) -> bool {
        Some(n.dev) == self.vxlan_dev
    }

    pub fn owns_fdb(&self, f: &FdbEntry) -> bool {
        Some(f.dev) == self.vxlan_dev && f.mac.is_valid_vtep()
    }
}

/// One kernel change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    ReplaceNeigh(Neigh),
    ReplaceFdb(FdbEntry),
    ReplaceRoute(Route),
    DeleteRoute(Route),
    DeleteFdb(FdbEntry),
    DeleteNeigh(Neigh),
}

/// The changes that turn `observed` into `desired`, touching only what `scope` owns.
pub fn diff(desired: &State, observed: &State, scope: &Scope) -> Vec<Op> {
    let obs_routes: BTreeSet<Route> = observed
        .routes
        .iter()
        .filter(|r| scope.owns_route(r))
        .copied()
        .collect();
    let obs_neighs: BTreeSet<Neigh> = observed
        .neighs
        .iter()
        .filter(|n| scope.owns_neigh(n))
        .copied()
        .collect();
    let obs_fdb: BTreeSet<FdbEntry> = observed
        .fdb
        .iter()
        .filter(|f| scope.owns_fdb(f))
        .copied()
        .collect();
    let want_routes: BTreeSet<Route> = desired.routes.iter().copied().collect();
    let want_neighs: BTreeSet<Neigh> = desired.neighs.iter().copied().collect();
    let want_fdb: BTreeSet<FdbEntry> = desired.fdb.iter().copied().collect();

    let mut ops = Vec::new();
    ops.extend(
        want_neighs
            .difference(&obs_neighs)
            .map(|n| Op::ReplaceNeigh(*n)),
    );
    ops.extend(want_fdb.difference(&obs_fdb).map(|f| Op::ReplaceFdb(*f)));
    ops.extend(
        want_routes
            .difference(&obs_routes)
            .map(|r| Op::ReplaceRoute(*r)),
    );

    // A replace overwrites whatever holds the same kernel key, so those need no delete.
    let route_keys: BTreeSet<_> = want_routes.iter().map(Route::key).collect();
    let neigh_keys: BTreeSet<_> = want_neighs.iter().map(|n| (n.dev, n.ip)).collect();
    ops.extend(
        obs_routes
            .difference(&want_routes)
            .filter(|r| !route_keys.contains(&r.key()))
            .map(|r| Op::DeleteRoute(*r)),
    );
    // An FDB replace rewrites the entry's first remote in place, so a stale remote of a
    // wanted MAC is usually gone by the time its delete runs; the delete then finds
    // nothing, which is success.
    ops.extend(obs_fdb.difference(&want_fdb).map(|f| Op::DeleteFdb(*f)));
    ops.extend(
        obs_neighs
            .difference(&want_neighs)
            .filter(|n| !neigh_keys.contains(&(n.dev, n.ip)))
            .map(|n| Op::DeleteNeigh(*n)),
    );
    ops
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::mac::MacAddr;

    const VX: IfIndex = 7;
    const EXT: IfIndex = 2;
    const OTHER: IfIndex = 3;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, last])
    }

    fn scope(ext: bool) -> Scope {
        Scope {
            network: net("10.5.0.0/16"),
            vxlan_dev: Some(VX),
            ext_dev: ext.then_some(EXT),
        }
    }

    /// Flannel's three entries for a vxlan peer.
    fn peer(subnet: &str, public: &str, m: u8) -> State {
        let s = net(subnet);
        State {
            neighs: vec![Neigh {
                dev: VX,
                ip: s.network(),
                mac: Some(mac(m)),
                permanent: true,
            }],
            fdb: vec![FdbEntry {
                dev: VX,
                mac: mac(m),
                dst: Some(ip(public)),
                permanent: true,
            }],
            routes: vec![Route::via(s, s.network(), VX, true)],
        }
    }

    #[test]
    fn converged_state_needs_nothing() {
        let mut want = peer("10.5.1.0/24", "192.168.0.2", 1);
        want.extend(peer("10.5.2.0/24", "192.168.0.3", 2));
        assert_eq!(diff(&want, &want, &scope(false)), vec![]);
    }

    #[test]
    fn add_orders_neigh_fdb_route() {
        let want = peer("10.5.1.0/24", "192.168.0.2", 1);
        let ops = diff(&want, &State::default(), &scope(false));
        assert!(matches!(
            ops.as_slice(),
            [Op::ReplaceNeigh(_), Op::ReplaceFdb(_), Op::ReplaceRoute(_)]
        ));
    }

    #[test]
    fn removal_orders_route_fdb_neigh() {
        let old = peer("10.5.1.0/24", "192.168.0.2", 1);
        let ops = diff(&State::default(), &old, &scope(false));
        assert!(matches!(
            ops.as_slice(),
            [Op::DeleteRoute(_), Op::DeleteFdb(_), Op::DeleteNeigh(_)]
        ));
    }

    #[test]
    fn stale_peer_removed_kept_peer_untouched() {
        // Peer C left while we were down (flannel #2554); B is still there.
        let b = peer("10.5.2.0/24", "192.168.0.3", 2);
        let mut observed = b.clone();
        observed.extend(peer("10.5.3.0/24", "192.168.0.4", 3));
        let ops = diff(&b, &observed, &scope(false));
        assert_eq!(
            ops,
            vec![
                Op::DeleteRoute(Route::via(net("10.5.3.0/24"), ip("10.5.3.0"), VX, true)),
                Op::DeleteFdb(FdbEntry {
                    dev: VX,
                    mac: mac(3),
                    dst: Some(ip("192.168.0.4")),
                    permanent: true
                }),
                Op::DeleteNeigh(Neigh {
                    dev: VX,
                    ip: ip("10.5.3.0"),
                    mac: Some(mac(3)),
                    permanent: true
                }),
            ]
        );
    }

    #[test]
    fn changed_mac_replaces_in_place_and_drops_the_old_fdb_entry() {
        let old = peer("10.5.1.0/24", "192.168.0.2", 1);
        let new = peer("10.5.1.0/24", "192.168.0.2", 9);
        let ops = diff(&new, &old, &scope(false));
        // The neighbour is replaced (same key), the route is unchanged, the FDB entry of
        // the old MAC is deleted after the new one exists.
        assert_eq!(
            ops,
            vec![
                Op::ReplaceNeigh(new.neighs[0]),
                Op::ReplaceFdb(new.fdb[0]),
                Op::DeleteFdb(old.fdb[0]),
            ]
        );
    }

    #[test]
    fn changed_public_ip_rewrites_fdb_only() {
        let old = peer("10.5.1.0/24", "192.168.0.2", 1);
        let new = peer("10.5.1.0/24", "192.168.0.9", 1);
        let ops = diff(&new, &old, &scope(false));
        assert_eq!(
            ops,
            vec![Op::ReplaceFdb(new.fdb[0]), Op::DeleteFdb(old.fdb[0])]
        );
    }

    #[test]
    fn switching_to_direct_routing_replaces_the_route_and_drops_neigh_and_fdb() {
        let old = peer("10.5.1.0/24", "192.168.0.2", 1);
        let direct = State {
            routes: vec![Route::via(
                net("10.5.1.0/24"),
                ip("192.168.0.2"),
                EXT,
                false,
            )],
            ..State::default()
        };
        let ops = diff(&direct, &old, &scope(true));
        assert_eq!(
            ops,
            vec![
                Op::ReplaceRoute(direct.routes[0]),
                Op::DeleteFdb(old.fdb[0]),
                Op::DeleteNeigh(old.neighs[0]),
            ],
            "the overlay route has the same key, so it is replaced, not deleted"
        );
    }

    #[test]
    fn never_touches_what_it_does_not_own() {
        let observed = State {
            routes: vec![
                // Outside the network, on our device.
                Route::via(net("192.168.7.0/24"), ip("10.5.9.0"), VX, true),
                // Inside the network, another device.
                Route::via(net("10.5.8.0/24"), ip("192.168.0.9"), OTHER, false),
                // Connected route on ext (the kernel's), and ext not owned in this scope.
                Route {
                    dst: net("10.5.0.0/24"),
                    kind: RouteKind::Unicast {
                        gateway: None,
                        dev: EXT,
                        onlink: false,
                    },
                    metric: 0,
                },
                // Our own blackhole route.
                Route::blackhole(net("10.5.4.0/24")),
            ],
            neighs: vec![Neigh {
                dev: OTHER,
                ip: ip("10.5.3.0"),
                mac: Some(mac(3)),
                permanent: true,
            }],
            fdb: vec![
                FdbEntry {
                    dev: OTHER,
                    mac: mac(3),
                    dst: None,
                    permanent: true,
                },
                // Multicast or all-zero entries on our device: not per-peer state.
                FdbEntry {
                    dev: VX,
                    mac: MacAddr([0x33, 0x33, 0, 0, 0, 1]),
                    dst: None,
                    permanent: true,
                },
                FdbEntry {
                    dev: VX,
                    mac: MacAddr([0; 6]),
                    dst: Some(ip("192.168.0.5")),
                    permanent: true,
                },
            ],
        };
        assert_eq!(diff(&State::default(), &observed, &scope(false)), vec![]);
        // With ext owned (host-gw), a connected route is still not ours, but a gateway
        // route into the network on ext is.
        let mut with_gw = observed.clone();
        let stale = Route::via(net("10.5.6.0/24"), ip("192.168.0.6"), EXT, false);
        with_gw.routes.push(stale);
        assert_eq!(
            diff(&State::default(), &with_gw, &scope(true)),
            vec![Op::DeleteRoute(stale)]
        );
        assert_eq!(
            diff(&State::default(), &with_gw, &scope(false)),
            vec![],
            "ext routes are left alone unless host-gw or DirectRouting owns them"
        );
    }

    #[test]
    fn route_with_other_metric_is_deleted_but_same_key_is_replaced() {
        let want = Route::via(net("10.5.1.0/24"), ip("192.168.0.2"), EXT, false);
        let wrong_gw = Route::via(net("10.5.1.0/24"), ip("192.168.0.7"), EXT, false);
        let other_metric = Route {
            metric: 100,
            ..wrong_gw
        };
        let desired = State {
            routes: vec![want],
            ..State::default()
        };
        let observed = State {
            routes: vec![wrong_gw, other_metric],
            ..State::default()
        };
        assert_eq!(
            diff(&desired, &observed, &scope(true)),
            vec![Op::ReplaceRoute(want), Op::DeleteRoute(other_metric)]
        );
    }

    #[test]
    fn unresolved_neighbours_on_our_device_are_cleared() {
        let failed = Neigh {
            dev: VX,
            ip: ip("10.5.5.0"),
            mac: None,
            permanent: false,
        };
        let observed = State {
            neighs: vec![failed],
            ..State::default()
        };
        assert_eq!(
            diff(&State::default(), &observed, &scope(false)),
            vec![Op::DeleteNeigh(failed)]
        );
    }
}
