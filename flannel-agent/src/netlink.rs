//! The only rtnetlink importer: every link, address and route query or change goes through
//! [`Netlink`], which speaks in domain types ([`Link`], [`Addr`], [`RouteGet`]) and returns
//! [`NetlinkError`] with the kernel's errno already classified.
//!
//! Conventions for the verbs (the vxlan device, routes, neighbours and FDB entries join
//! them later):
//! - queries return `Option` for "absent" (ENODEV/ENOENT) instead of an error;
//! - changes use replace semantics (`NLM_F_REPLACE`), so a restart converges on the state
//!   it finds instead of failing with EEXIST;
//! - deletes succeed when the object is already gone.
//!
//! A netlink socket belongs to the network namespace of the thread that creates it, so
//! [`Netlink::new`] binds to the caller's namespace for its whole life.

use std::{io, net::Ipv4Addr};

use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle,
    packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope},
        link::{LinkAttribute, LinkFlags, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
    },
};
use tokio::task::JoinHandle;

use crate::mac::MacAddr;

/// A kernel interface index.
pub type IfIndex = u32;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    /// ENODEV: the interface does not exist.
    #[error("{op}: no such device")]
    NoDevice { op: &'static str },
    /// ENOENT or ESRCH: the route, address or neighbour does not exist.
    #[error("{op}: not found")]
    NotFound { op: &'static str },
    /// EEXIST.
    #[error("{op}: already exists")]
    Exists { op: &'static str },
    /// EPERM or EACCES.
    #[error("{op}: operation not permitted (needs CAP_NET_ADMIN)")]
    PermissionDenied { op: &'static str },
    /// ENETUNREACH or EHOSTUNREACH, from a route lookup.
    #[error("{op}: network unreachable")]
    Unreachable { op: &'static str },
    /// Any other errno from the kernel.
    #[error("{op} failed")]
    Kernel {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The connection is gone, or the kernel answered with something unexpected.
    #[error("{op}: netlink protocol error: {detail}")]
    Protocol { op: &'static str, detail: String },
}

impl NetlinkError {
    /// Classifies a kernel errno (positive, as in `errno(3)`).
    pub fn from_errno(op: &'static str, errno: i32) -> Self {
        match errno {
            libc::ENODEV => Self::NoDevice { op },
            libc::ENOENT | libc::ESRCH => Self::NotFound { op },
            libc::EEXIST => Self::Exists { op },
            libc::EPERM | libc::EACCES => Self::PermissionDenied { op },
            libc::ENETUNREACH | libc::EHOSTUNREACH => Self::Unreachable { op },
            _ => Self::Kernel {
                op,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    fn from_rtnetlink(op: &'static str, e: rtnetlink::Error) -> Self {
        match e {
            rtnetlink::Error::NetlinkError(msg) => Self::from_errno(op, msg.raw_code().abs()),
            other => Self::Protocol {
                op,
                detail: other.to_string(),
            },
        }
    }

    /// The object is absent: ENODEV, ENOENT or ESRCH.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NoDevice { .. } | Self::NotFound { .. })
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: IfIndex,
    pub name: String,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// The hardware address, for Ethernet-like links.
    pub mac: Option<MacAddr>,
}

/// The scope of an address, as in `ip addr` (`RT_SCOPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrScope {
    Universe,
    Site,
    Link,
    Host,
    Nowhere,
    Other(u8),
}

/// The address flags interface selection cares about (`IFA_F_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AddrFlags {
    /// Configured statically, with no lifetime (`IFA_F_PERMANENT`). `ip addr` calls
    /// addresses without it "dynamic".
    pub permanent: bool,
    /// Past its preferred lifetime (`IFA_F_DEPRECATED`).
    pub deprecated: bool,
    /// `IFA_F_SECONDARY`: for IPv4 a secondary address of its subnet; the same bit is
    /// IPv6's `IFA_F_TEMPORARY` (a privacy address). Either way, a second choice.
    pub secondary: bool,
    /// Duplicate address detection has not finished (`IFA_F_TENTATIVE`).
    pub tentative: bool,
}

impl AddrFlags {
    /// Not permanent: has a lifetime (DHCP, SLAAC).
    pub fn dynamic(&self) -> bool {
        !self.permanent
    }
}

/// An IPv4 address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub ifindex: IfIndex,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub scope: AddrScope,
    pub flags: AddrFlags,
}

/// The answer to `ip route get <dst>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteGet {
    pub ifindex: IfIndex,
    /// The source address the kernel would use.
    pub prefsrc: Option<Ipv4Addr>,
    pub gateway: Option<Ipv4Addr>,
}

/// An rtnetlink connection, bound to the network namespace of the thread that made it.
#[derive(Debug)]
pub struct Netlink {
    handle: Handle,
    connection: JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    /// Opens the socket and spawns its connection task on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        Ok(Self {
            handle,
            connection: tokio::spawn(connection),
        })
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        const OP: &str = "list links";
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))?;
        Ok(messages.iter().filter_map(link_from_message).collect())
    }

    /// The link called `name`, or `None` when there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        const OP: &str = "get link by name";
        let request = self.handle.link().get().match_name(name.to_owned());
        absent_as_none(first_link(OP, request).await)
    }

    /// The link with index `index`, or `None` when there is none.
    pub async fn link_by_index(&self, index: IfIndex) -> Result<Option<Link>, NetlinkError> {
        const OP: &str = "get link by index";
        let request = self.handle.link().get().match_index(index);
        absent_as_none(first_link(OP, request).await)
    }

    /// Every IPv4 address on every link, in the kernel's order (primary before secondary).
    pub async fn addresses_v4(&self) -> Result<Vec<Addr>, NetlinkError> {
        const OP: &str = "list addresses";
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))?;
        Ok(messages.iter().filter_map(addr_from_message).collect())
    }

    /// The interface of the IPv4 default route in the main table; with several, the one
    /// with the lowest metric.
    pub async fn default_route_v4_iface(&self) -> Result<Option<IfIndex>, NetlinkError> {
        const OP: &str = "list routes";
        let filter = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))?;
        Ok(routes
            .iter()
            .filter_map(default_route_from_message)
            .min_by_key(|(metric, _)| *metric)
            .map(|(_, ifindex)| ifindex))
    }

    /// Asks the kernel which route it would take to `dst`, like `ip route get <dst>`.
    /// `None` when the destination is unreachable.
    pub async fn route_get_v4(&self, dst: Ipv4Addr) -> Result<Option<RouteGet>, NetlinkError> {
        const OP: &str = "route get";
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.destination_prefix_length = 32;
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        // Not a dump: without NLM_F_DUMP the kernel resolves this one destination
        // (inet_rtm_getroute) instead of listing the tables.
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(message));
        request.header.flags = NLM_F_REQUEST;

        // `Handle::request` needs `&mut`; handles are cheap clones of one channel.
        let mut handle = self.handle.clone();
        let mut replies = handle
            .request(request)
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))?;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    return Ok(route_get_from_message(&route));
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return match NetlinkError::from_errno(OP, e.raw_code().abs()) {
                        NetlinkError::Unreachable { .. } => Ok(None),
                        other => Err(other),
                    };
                }
                _ => {}
            }
        }
        Err(NetlinkError::Protocol {
            op: OP,
            detail: "no reply".to_owned(),
        })
    }
}

async fn first_link(
    op: &'static str,
    request: rtnetlink::LinkGetRequest,
) -> Result<Option<Link>, NetlinkError> {
    let messages: Vec<LinkMessage> = request
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::from_rtnetlink(op, e))?;
    Ok(messages.iter().find_map(link_from_message))
}

fn absent_as_none<T>(r: Result<Option<T>, NetlinkError>) -> Result<Option<T>, NetlinkError> {
    match r {
        Err(e) if e.is_not_found() => Ok(None),
        other => other,
    }
}

fn link_from_message(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut mtu = 0;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Address(bytes) => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr);
            }
            _ => {}
        }
    }
    Some(Link {
        index: msg.header.index,
        name: name?,
        mtu,
        up: msg.header.flags.contains(LinkFlags::Up),
        mac,
    })
}

fn addr_from_message(msg: &AddressMessage) -> Option<Addr> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    let mut local = None;
    let mut address = None;
    // The header holds only the low 8 flag bits; IFA_FLAGS, when present, holds all 32.
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(std::net::IpAddr::V4(ip)) => local = Some(*ip),
            AddressAttribute::Address(std::net::IpAddr::V4(ip)) => address = Some(*ip),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    // On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is always our end.
    let ip = local.or(address)?;
    Some(Addr {
        ifindex: msg.header.index,
        ip,
        prefix_len: msg.header.prefix_len,
        scope: match msg.header.scope {
            AddressScope::Universe => AddrScope::Universe,
            AddressScope::Site => AddrScope::Site,
            AddressScope::Link => AddrScope::Link,
            AddressScope::Host => AddrScope::Host,
            AddressScope::Nowhere => AddrScope::Nowhere,
            AddressScope::Other(s) => AddrScope::Other(s),
            _ => AddrScope::Other(u8::from(msg.header.scope)),
        },
        flags: AddrFlags {
            permanent: flags.contains(AddressFlags::Permanent),
            deprecated: flags.contains(AddressFlags::Deprecated),
            secondary: flags.contains(AddressFlags::Secondary),
            tentative: flags.contains(AddressFlags::Tentative),
        },
    })
}

/// `(metric, ifindex)` when `msg` is an IPv4 unicast default route in the main table.
fn default_route_from_message(msg: &RouteMessage) -> Option<(u32, IfIndex)> {
    if msg.header.address_family != AddressFamily::Inet
        || msg.header.destination_prefix_length != 0
        || msg.header.kind != RouteType::Unicast
    {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut metric = 0;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = Some(*i),
            // A multipath default route: flannel takes its first hop's interface.
            RouteAttribute::MultiPath(hops) if oif.is_none() => {
                oif = hops.first().map(|h| h.interface_index);
            }
            _ => {}
        }
    }
    (table == u32::from(RouteHeader::RT_TABLE_MAIN))
        .then_some(oif)
        .flatten()
        .filter(|&i| i > 0)
        .map(|i| (metric, i))
}

fn route_get_from_message(msg: &RouteMessage) -> Option<RouteGet> {
    let mut ifindex = None;
    let mut prefsrc = None;
    let mut gateway = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => prefsrc = Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            _ => {}
        }
    }
    Some(RouteGet {
        ifindex: ifindex?,
        prefsrc,
        gateway,
    })
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::address::AddressHeaderFlags;

    use super::*;

    #[test]
    fn errno_classification() {
        let c = |e| NetlinkError::from_errno("op", e);
        assert!(matches!(c(libc::ENODEV), NetlinkError::NoDevice { .. }));
        assert!(matches!(c(libc::ENOENT), NetlinkError::NotFound { .. }));
        assert!(matches!(c(libc::ESRCH), NetlinkError::NotFound { .. }));
        assert!(matches!(c(libc::EEXIST), NetlinkError::Exists { .. }));
        assert!(matches!(
            c(libc::EPERM),
            NetlinkError::PermissionDenied { .. }
        ));
        assert!(matches!(
            c(libc::ENETUNREACH),
            NetlinkError::Unreachable { .. }
        ));
        assert!(matches!(c(libc::EINVAL), NetlinkError::Kernel { .. }));
        assert!(c(libc::ENODEV).is_not_found() && !c(libc::EEXIST).is_not_found());
        assert_eq!(c(libc::ENODEV).to_string(), "op: no such device");
    }

    #[test]
    fn address_message_conversion() {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.index = 3;
        msg.header.prefix_len = 24;
        msg.header.scope = AddressScope::Universe;
        msg.header.flags = AddressHeaderFlags::Permanent;
        msg.attributes = vec![
            AddressAttribute::Address([10, 0, 0, 9].into()),
            AddressAttribute::Local([10, 0, 0, 1].into()),
        ];
        let a = addr_from_message(&msg).unwrap();
        assert_eq!(
            a.ip,
            Ipv4Addr::new(10, 0, 0, 1),
            "IFA_LOCAL wins over the peer"
        );
        assert_eq!(
            (a.ifindex, a.prefix_len, a.scope),
            (3, 24, AddrScope::Universe)
        );
        assert!(a.flags.permanent && !a.flags.dynamic() && !a.flags.deprecated);

        msg.attributes.push(AddressAttribute::Flags(
            AddressFlags::Deprecated | AddressFlags::Secondary,
        ));
        let a = addr_from_message(&msg).unwrap();
        assert!(!a.flags.permanent && a.flags.deprecated && a.flags.secondary);

        msg.header.family = AddressFamily::Inet6;
        assert_eq!(addr_from_message(&msg), None);
    }

    #[test]
    fn default_route_detection() {
        let route = |prefix: u8, table: u8, attrs: Vec<RouteAttribute>| {
            let mut m = RouteMessage::default();
            m.header.address_family = AddressFamily::Inet;
            m.header.destination_prefix_length = prefix;
            m.header.table = table;
            m.header.kind = RouteType::Unicast;
            m.attributes = attrs;
            m
        };
        let main = RouteHeader::RT_TABLE_MAIN;
        assert_eq!(
            default_route_from_message(&route(0, main, vec![RouteAttribute::Oif(4)])),
            Some((0, 4))
        );
        assert_eq!(
            default_route_from_message(&route(
                0,
                main,
                vec![RouteAttribute::Oif(4), RouteAttribute::Priority(100)]
            )),
            Some((100, 4))
        );
        assert_eq!(
            default_route_from_message(&route(24, main, vec![RouteAttribute::Oif(4)])),
            None
        );
        assert_eq!(
            default_route_from_message(&route(0, 255, vec![RouteAttribute::Oif(4)])),
            None,
            "local table"
        );
        assert_eq!(default_route_from_message(&route(0, main, vec![])), None);
    }
}
