//! External interface selection: which interface and address carry the overlay, and which
//! address goes into the lease as `PublicIP` (flannel's `LookupExtIface` in
//! `pkg/ipmatch/match.go`, and the loop around it in `main.go`).
//!
//! The order is flannel's:
//! 1. no `--iface`, `--iface-regex` or `--iface-can-reach`: the interface holding
//!    `--public-ip` when that is given, otherwise the interface of the IPv4 default route;
//! 2. otherwise each `--iface` in turn (a name, or an IP held by an interface), then each
//!    `--iface-regex` (first over every IPv4 address, then over names), then
//!    `--iface-can-reach` (the interface of the route to that IP, with the route's source
//!    address). The first that resolves wins.
//!
//! The decision is a pure function of a [`HostView`] snapshot ([`select`]); the netlink
//! queries that build the snapshot are in [`find_external_interface`].

use std::net::Ipv4Addr;

use regex::Regex;

use crate::{
    cli::Flags,
    netlink::{Addr, IfIndex, Link, Netlink, NetlinkError, RouteGet},
};

/// The interface and addresses the overlay uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub ifindex: IfIndex,
    pub name: String,
    pub mtu: u32,
    /// The local address on the interface: the VXLAN source, the udp bind address.
    pub iface_addr: Ipv4Addr,
    /// The address peers reach us at, published in the lease: `--public-ip` if given,
    /// otherwise `iface_addr`.
    pub public_ip: Ipv4Addr,
}

/// The flags that choose the interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IfaceOptions {
    pub iface: Vec<String>,
    pub iface_regex: Vec<String>,
    pub iface_can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
}

impl IfaceOptions {
    pub fn from_flags(flags: &Flags) -> Self {
        Self {
            iface: flags.iface.clone(),
            iface_regex: flags.iface_regex.clone(),
            iface_can_reach: flags.iface_can_reach,
            public_ip: flags.public_ip,
        }
    }

    fn has_iface_flags(&self) -> bool {
        !self.iface.is_empty() || !self.iface_regex.is_empty() || self.iface_can_reach.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// Every `--iface`, `--iface-regex` and `--iface-can-reach` was tried; each entry says
    /// what was searched and why it did not resolve.
    #[error("no interface matches {}", .tried.join(", "))]
    NoMatch { tried: Vec<String> },
    #[error("no default route: use --iface")]
    NoDefaultRoute,
    #[error("default route: {0}")]
    DefaultRoute(Miss),
    #[error("no interface holds --public-ip {ip}: use --iface to choose the interface")]
    PublicIpNotLocal { ip: Ipv4Addr },
    #[error("invalid --iface-regex {pattern:?}")]
    Regex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("cannot read interfaces and routes")]
    Netlink(#[from] NetlinkError),
}

/// Why one candidate did not resolve to an interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Miss {
    #[error("no such interface")]
    NoSuchInterface,
    #[error("no interface has this address")]
    AddressNotFound,
    #[error("interface {0} has no usable IPv4 address")]
    NoIpv4Address(String),
    #[error("interface {0} has no MTU")]
    NoMtu(String),
    #[error("no interface name or IPv4 address matches")]
    NoRegexMatch,
    #[error("unreachable")]
    Unreachable,
    #[error("route uses interface index {0}, which does not exist")]
    NoLinkForIndex(IfIndex),
}

/// What selection needs to know about the host.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    pub links: Vec<Link>,
    /// IPv4 addresses, in the kernel's order.
    pub addrs: Vec<Addr>,
    /// The interface of the IPv4 default route.
    pub default_route: Option<IfIndex>,
    /// The kernel's route to `--iface-can-reach`, when that flag is given.
    pub can_reach: Option<RouteGet>,
}

/// Queries the host through `nl` and selects the external interface.
pub async fn find_external_interface(
    nl: &Netlink,
    opts: &IfaceOptions,
) -> Result<ExternalInterface, IfaceError> {
    let mut view = HostView {
        links: nl.links().await?,
        addrs: nl.addresses_v4().await?,
        ..HostView::default()
    };
    if !opts.has_iface_flags() && opts.public_ip.is_none() {
        view.default_route = nl.default_route_v4_iface().await?;
    }
    if let Some(dst) = opts.iface_can_reach {
        view.can_reach = nl.route_get_v4(dst).await?;
    }
    let ext = select(opts, &view)?;
    if view.links.iter().any(|l| l.index == ext.ifindex && !l.up) {
        tracing::warn!(iface = %ext.name, "the chosen interface is down");
    }
    tracing::info!(
        iface = %ext.name,
        ifindex = ext.ifindex,
        mtu = ext.mtu,
        iface_addr = %ext.iface_addr,
        public_ip = %ext.public_ip,
        "using external interface"
    );
    Ok(ext)
}

/// Flannel's selection, on a snapshot of the host.
pub fn select(opts: &IfaceOptions, host: &HostView) -> Result<ExternalInterface, IfaceError> {
    let regexes = opts
        .iface_regex
        .iter()
        .map(|pattern| {
            Regex::new(pattern).map_err(|source| IfaceError::Regex {
                pattern: pattern.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let (link, iface_addr) = if !opts.has_iface_flags() {
        match opts.public_ip {
            Some(ip) => by_address(host, ip).map_err(|_| IfaceError::PublicIpNotLocal { ip })?,
            None => {
                let index = host.default_route.ok_or(IfaceError::NoDefaultRoute)?;
                let link = link_by_index(host, index).map_err(IfaceError::DefaultRoute)?;
                with_chosen_address(host, link).map_err(IfaceError::DefaultRoute)?
            }
        }
    } else {
        let mut tried = Vec::new();
        let mut found = None;
        for spec in &opts.iface {
            match by_iface_spec(host, spec) {
                Ok(hit) => {
                    found = Some(hit);
                    break;
                }
                Err(miss) => tried.push(format!("--iface {spec} ({miss})")),
            }
        }
        if found.is_none() {
            for (re, pattern) in regexes.iter().zip(&opts.iface_regex) {
                match by_regex(host, re) {
                    Ok(hit) => {
                        found = Some(hit);
                        break;
                    }
                    Err(miss) => tried.push(format!("--iface-regex {pattern} ({miss})")),
                }
            }
        }
        if let (None, Some(dst)) = (&found, opts.iface_can_reach) {
            match by_route(host, host.can_reach.as_ref()) {
                Ok(hit) => found = Some(hit),
                Err(miss) => tried.push(format!("--iface-can-reach {dst} ({miss})")),
            }
        }
        for t in &tried {
            tracing::info!(candidate = %t, "interface candidate did not match");
        }
        found.ok_or(IfaceError::NoMatch { tried })?
    };

    Ok(ExternalInterface {
        ifindex: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        iface_addr,
        public_ip: opts.public_ip.unwrap_or(iface_addr),
    })
}

/// The address flannel would use on an interface: global unicast before link-local,
/// permanent before dynamic, primary (non-temporary) before secondary; deprecated
/// addresses never, nor loopback, multicast or unspecified ones. Ties keep the kernel's
/// order.
pub fn choose_address(addrs: &[Addr], ifindex: IfIndex) -> Option<Ipv4Addr> {
    addrs
        .iter()
        .filter(|a| a.ifindex == ifindex && usable(a))
        .min_by_key(|a| {
            (
                a.ip.is_link_local(),
                a.flags.dynamic(),
                a.flags.secondary,
                a.flags.tentative,
            )
        })
        .map(|a| a.ip)
}

fn usable(a: &Addr) -> bool {
    let ip = a.ip;
    let global_unicast = !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_link_local());
    !a.flags.deprecated && (global_unicast || ip.is_link_local())
}

type Hit<'a> = (&'a Link, Ipv4Addr);

fn link_by_index(host: &HostView, index: IfIndex) -> Result<&Link, Miss> {
    host.links
        .iter()
        .find(|l| l.index == index)
        .ok_or(Miss::NoLinkForIndex(index))
}

fn checked(link: &Link, addr: Ipv4Addr) -> Result<Hit<'_>, Miss> {
    // Flannel refuses an interface whose MTU it cannot read: every MTU it derives would
    // be nonsense.
    if link.mtu == 0 {
        return Err(Miss::NoMtu(link.name.clone()));
    }
    Ok((link, addr))
}

fn with_chosen_address<'a>(host: &'a HostView, link: &'a Link) -> Result<Hit<'a>, Miss> {
    let addr =
        choose_address(&host.addrs, link.index).ok_or(Miss::NoIpv4Address(link.name.clone()))?;
    checked(link, addr)
}

/// The interface holding `ip`; the address is `ip` itself, as the user named it.
fn by_address(host: &HostView, ip: Ipv4Addr) -> Result<Hit<'_>, Miss> {
    let addr = host
        .addrs
        .iter()
        .find(|a| a.ip == ip)
        .ok_or(Miss::AddressNotFound)?;
    checked(link_by_index(host, addr.ifindex)?, ip)
}

fn by_iface_spec<'a>(host: &'a HostView, spec: &str) -> Result<Hit<'a>, Miss> {
    if let Ok(ip) = spec.parse::<Ipv4Addr>() {
        return by_address(host, ip);
    }
    let link = host
        .links
        .iter()
        .find(|l| l.name == spec)
        .ok_or(Miss::NoSuchInterface)?;
    with_chosen_address(host, link)
}

fn by_regex<'a>(host: &'a HostView, re: &Regex) -> Result<Hit<'a>, Miss> {
    let mut links: Vec<&Link> = host.links.iter().collect();
    links.sort_by_key(|l| l.index);
    for link in &links {
        let hit = host
            .addrs
            .iter()
            .filter(|a| a.ifindex == link.index && !a.flags.deprecated)
            .find(|a| re.is_match(&a.ip.to_string()));
        if let Some(a) = hit {
            return checked(link, a.ip);
        }
    }
    let link = links
        .into_iter()
        .find(|l| re.is_match(&l.name))
        .ok_or(Miss::NoRegexMatch)?;
    with_chosen_address(host, link)
}

fn by_route<'a>(host: &'a HostView, route: Option<&RouteGet>) -> Result<Hit<'a>, Miss> {
    let route = route.ok_or(Miss::Unreachable)?;
    let link = link_by_index(host, route.ifindex)?;
    match route.prefsrc {
        Some(src) => checked(link, src),
        None => with_chosen_address(host, link),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{AddrFlags, AddrScope};

    fn link(index: IfIndex, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            mtu: 1500,
            up: true,
            mac: None,
        }
    }

    fn addr(ifindex: IfIndex, ip: [u8; 4]) -> Addr {
        Addr {
            ifindex,
            ip: ip.into(),
            prefix_len: 24,
            scope: AddrScope::Universe,
            flags: AddrFlags {
                permanent: true,
                ..AddrFlags::default()
            },
        }
    }

    /// lo (1), eth0 (2, default route), eth1 (3), ens5 (4, only link-local).
    fn host() -> HostView {
        HostView {
            links: vec![
                link(1, "lo"),
                link(2, "eth0"),
                link(3, "eth1"),
                link(4, "ens5"),
            ],
            addrs: vec![
                addr(1, [127, 0, 0, 1]),
                addr(2, [192, 168, 1, 10]),
                addr(3, [10, 0, 0, 5]),
                addr(3, [10, 0, 0, 6]),
                addr(4, [169, 254, 3, 3]),
            ],
            default_route: Some(2),
            can_reach: None,
        }
    }

    fn opts() -> IfaceOptions {
        IfaceOptions::default()
    }

    fn pick(opts: &IfaceOptions, host: &HostView) -> (String, Ipv4Addr, Ipv4Addr) {
        let e = select(opts, host).unwrap();
        (e.name, e.iface_addr, e.public_ip)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn default_route_interface() {
        let e = select(&opts(), &host()).unwrap();
        assert_eq!(
            e,
            ExternalInterface {
                ifindex: 2,
                name: "eth0".into(),
                mtu: 1500,
                iface_addr: ip("192.168.1.10"),
                public_ip: ip("192.168.1.10"),
            }
        );
        let mut h = host();
        h.default_route = None;
        let err = select(&opts(), &h).unwrap_err();
        assert_eq!(err.to_string(), "no default route: use --iface");
        h.default_route = Some(1);
        let err = select(&opts(), &h).unwrap_err();
        assert_eq!(
            err.to_string(),
            "default route: interface lo has no usable IPv4 address"
        );
        h.default_route = Some(42);
        assert!(matches!(
            select(&opts(), &h).unwrap_err(),
            IfaceError::DefaultRoute(Miss::NoLinkForIndex(42))
        ));
    }

    #[test]
    fn public_ip_overrides_and_locates() {
        // With an interface flag, --public-ip only changes what is published.
        let o = IfaceOptions {
            iface: vec!["eth1".into()],
            public_ip: Some(ip("203.0.113.9")),
            ..opts()
        };
        assert_eq!(
            pick(&o, &host()),
            ("eth1".into(), ip("10.0.0.5"), ip("203.0.113.9"))
        );
        // Alone, it names the interface that holds it.
        let o = IfaceOptions {
            public_ip: Some(ip("10.0.0.6")),
            ..opts()
        };
        assert_eq!(
            pick(&o, &host()),
            ("eth1".into(), ip("10.0.0.6"), ip("10.0.0.6"))
        );
        // A NAT address that no interface holds: flannel fails here too.
        let o = IfaceOptions {
            public_ip: Some(ip("203.0.113.9")),
            ..opts()
        };
        assert_eq!(
            select(&o, &host()).unwrap_err().to_string(),
            "no interface holds --public-ip 203.0.113.9: use --iface to choose the interface"
        );
    }

    #[test]
    fn iface_by_name_and_ip_in_order() {
        let by = |specs: &[&str]| IfaceOptions {
            iface: specs.iter().map(|s| (*s).to_owned()).collect(),
            ..opts()
        };
        assert_eq!(pick(&by(&["eth1"]), &host()).1, ip("10.0.0.5"));
        assert_eq!(
            pick(&by(&["10.0.0.6"]), &host()),
            ("eth1".into(), ip("10.0.0.6"), ip("10.0.0.6"))
        );
        // The first that resolves wins; earlier misses are skipped.
        assert_eq!(
            pick(&by(&["eth9", "lo", "eth0", "eth1"]), &host()).0,
            "eth0"
        );
        // Link-local is a last resort, but acceptable.
        assert_eq!(pick(&by(&["ens5"]), &host()).1, ip("169.254.3.3"));

        let err = select(&by(&["eth9"]), &host()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no interface matches --iface eth9 (no such interface)"
        );
        let err = select(&by(&["eth9", "10.9.9.9", "lo"]), &host()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no interface matches --iface eth9 (no such interface), \
             --iface 10.9.9.9 (no interface has this address), \
             --iface lo (interface lo has no usable IPv4 address)"
        );
    }

    #[test]
    fn iface_regex_ips_before_names() {
        let re = |p: &[&str]| IfaceOptions {
            iface_regex: p.iter().map(|s| (*s).to_owned()).collect(),
            ..opts()
        };
        // "^10\\." matches an address of eth1; "eth" would match eth0 by name first.
        assert_eq!(
            pick(&re(&["^10\\.0\\.0\\.6$"]), &host()),
            ("eth1".into(), ip("10.0.0.6"), ip("10.0.0.6"))
        );
        assert_eq!(pick(&re(&["^eth"]), &host()).0, "eth0");
        // Addresses are matched before names: "1" would match the name eth1, but lo's
        // 127.0.0.1 comes first.
        assert_eq!(pick(&re(&["1"]), &host()).0, "lo");
        assert_eq!(pick(&re(&["^ens"]), &host()).1, ip("169.254.3.3"));
        // Patterns are tried in order; --iface comes before any regex.
        assert_eq!(pick(&re(&["^wlan", "^eth1$"]), &host()).0, "eth1");
        let o = IfaceOptions {
            iface: vec!["eth0".into()],
            iface_regex: vec!["^eth1$".into()],
            ..opts()
        };
        assert_eq!(pick(&o, &host()).0, "eth0");

        let err = select(&re(&["^wlan"]), &host()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no interface matches --iface-regex ^wlan (no interface name or IPv4 address matches)"
        );
        assert!(matches!(
            select(&re(&["("]), &host()).unwrap_err(),
            IfaceError::Regex { .. }
        ));
    }

    #[test]
    fn iface_can_reach_uses_route_source() {
        let mut h = host();
        h.can_reach = Some(RouteGet {
            ifindex: 3,
            prefsrc: Some(ip("10.0.0.6")),
            gateway: Some(ip("10.0.0.1")),
        });
        let o = IfaceOptions {
            iface_can_reach: Some(ip("198.51.100.1")),
            ..opts()
        };
        assert_eq!(
            pick(&o, &h),
            ("eth1".into(), ip("10.0.0.6"), ip("10.0.0.6"))
        );
        // Without a preferred source, the interface's own choice.
        h.can_reach = Some(RouteGet {
            ifindex: 3,
            prefsrc: None,
            gateway: None,
        });
        assert_eq!(pick(&o, &h).1, ip("10.0.0.5"));
        // --iface wins over --iface-can-reach; a failed --iface falls through to it.
        let o2 = IfaceOptions {
            iface: vec!["eth9".into()],
            ..o.clone()
        };
        assert_eq!(pick(&o2, &h).0, "eth1");
        h.can_reach = None;
        assert_eq!(
            select(&o, &h).unwrap_err().to_string(),
            "no interface matches --iface-can-reach 198.51.100.1 (unreachable)"
        );
    }

    #[test]
    fn address_preference() {
        let flags = |permanent, secondary, deprecated| AddrFlags {
            permanent,
            secondary,
            deprecated,
            tentative: false,
        };
        let a = |ip: [u8; 4], f: AddrFlags| Addr {
            flags: f,
            ..addr(7, ip)
        };
        // Link-local loses to a dynamic global address.
        let addrs = [
            a([169, 254, 1, 1], flags(true, false, false)),
            a([192, 0, 2, 1], flags(false, false, false)),
        ];
        assert_eq!(choose_address(&addrs, 7), Some(ip("192.0.2.1")));
        // Permanent before dynamic.
        let addrs = [
            a([192, 0, 2, 1], flags(false, false, false)),
            a([192, 0, 2, 2], flags(true, false, false)),
        ];
        assert_eq!(choose_address(&addrs, 7), Some(ip("192.0.2.2")));
        // Primary before secondary (the bit IPv6 calls temporary).
        let addrs = [
            a([192, 0, 2, 3], flags(true, true, false)),
            a([192, 0, 2, 4], flags(true, false, false)),
        ];
        assert_eq!(choose_address(&addrs, 7), Some(ip("192.0.2.4")));
        // Deprecated never, even when it is the only global one.
        let addrs = [
            a([192, 0, 2, 5], flags(true, false, true)),
            a([169, 254, 9, 9], flags(false, false, false)),
        ];
        assert_eq!(choose_address(&addrs, 7), Some(ip("169.254.9.9")));
        // Ties keep the kernel's order; other interfaces and loopback are ignored.
        let addrs = [
            a([127, 0, 0, 1], flags(true, false, false)),
            Addr {
                ifindex: 8,
                ..a([192, 0, 2, 9], flags(true, false, false))
            },
            a([192, 0, 2, 7], flags(true, false, false)),
            a([192, 0, 2, 6], flags(true, false, false)),
        ];
        assert_eq!(choose_address(&addrs, 7), Some(ip("192.0.2.7")));
        assert_eq!(choose_address(&addrs[..2], 7), None);
    }

    #[test]
    fn zero_mtu_is_refused() {
        let mut h = host();
        h.links[2].mtu = 0;
        let o = IfaceOptions {
            iface: vec!["eth1".into(), "eth0".into()],
            ..opts()
        };
        assert_eq!(pick(&o, &h).0, "eth0");
        let o = IfaceOptions {
            iface: vec!["eth1".into()],
            ..opts()
        };
        assert_eq!(
            select(&o, &h).unwrap_err().to_string(),
            "no interface matches --iface eth1 (interface eth1 has no MTU)"
        );
    }
}
