//! The only rtnetlink importer: every link, address and route query or change goes through
//! [`Netlink`], which speaks in domain types ([`Link`], [`Addr`], [`RouteGet`]) and returns
//! [`NetlinkError`] with the kernel's errno already classified.
//!
//! Conventions for the verbs (links, addresses, the vxlan device, routes, neighbours and
//! FDB entries):
//! - queries return `Option` for "absent" (ENODEV/ENOENT) instead of an error;
//! - changes use replace semantics (`NLM_F_REPLACE`), so a restart converges on the state
//!   it finds instead of failing with EEXIST;
//! - deletes succeed when the object is already gone;
//! - no policy: which entries should exist is decided by `backend`, this module only
//!   translates between domain types ([`Route`], [`Neigh`], [`FdbEntry`], [`VxlanSpec`])
//!   and netlink messages.
//!
//! A netlink socket belongs to the network namespace of the thread that creates it, so
//! [`Netlink::new`] binds to the caller's namespace for its whole life.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr},
};

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan,
    packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope},
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{
            RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
            RouteScope, RouteType,
        },
    },
    sys::{AsyncSocket as _, SocketAddr},
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

/// How a vxlan device should be created (`ip link add NAME type vxlan ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// UDP destination port (`dstport`).
    pub port: u16,
    /// Outer source address (`local`).
    pub local: Ipv4Addr,
    /// The underlay device (`dev`).
    pub dev: IfIndex,
    pub learning: bool,
    pub gbp: bool,
    pub mtu: u32,
    /// Set at creation, so the device never comes up with a kernel-chosen MAC.
    pub mac: MacAddr,
}

/// The kind-specific attributes of an existing link, for compatibility checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Vxlan(VxlanInfo),
    /// Any other kind, by its `IFLA_INFO_KIND` name ("veth", "bridge", ...).
    Other(String),
    /// No `IFLA_LINKINFO` (physical devices, loopback).
    Unknown,
}

/// What the kernel reports about a vxlan link (`ip -d link show`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: Option<u32>,
    pub dev: Option<IfIndex>,
    pub local: Option<Ipv4Addr>,
    pub group: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub learning: bool,
    pub gbp: bool,
    pub l2miss: bool,
}

/// An IPv4 route in the main table, as flanneld installs and reconciles them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Net,
    pub kind: RouteKind,
    /// `metric`; flanneld's own routes use 0.
    pub metric: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// `<dst> via <gateway> dev <dev> [onlink]`; `gateway` is `None` for a connected
    /// route (`<dst> dev <dev>`).
    Unicast {
        gateway: Option<Ipv4Addr>,
        dev: IfIndex,
        onlink: bool,
    },
    /// `blackhole <dst>`.
    Blackhole,
    /// Any other type (unreachable, prohibit, local, ...): never installed by flanneld.
    Other,
}

impl Route {
    /// `<dst> via <gateway> dev <dev>`, with `onlink` when asked.
    pub fn via(dst: Ipv4Net, gateway: Ipv4Addr, dev: IfIndex, onlink: bool) -> Self {
        Self {
            dst,
            kind: RouteKind::Unicast {
                gateway: Some(gateway),
                dev,
                onlink,
            },
            metric: 0,
        }
    }

    pub fn blackhole(dst: Ipv4Net) -> Self {
        Self {
            dst,
            kind: RouteKind::Blackhole,
            metric: 0,
        }
    }

    /// The output device, for unicast routes.
    pub fn dev(&self) -> Option<IfIndex> {
        match self.kind {
            RouteKind::Unicast { dev, .. } => Some(dev),
            _ => None,
        }
    }

    pub fn gateway(&self) -> Option<Ipv4Addr> {
        match self.kind {
            RouteKind::Unicast { gateway, .. } => gateway,
            _ => None,
        }
    }

    /// What the kernel keys a main-table IPv4 route on: a replace with the same key
    /// overwrites, so a differing route with this key needs no delete.
    pub fn key(&self) -> (Ipv4Net, u32) {
        (self.dst, self.metric)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteKind::Unicast {
                gateway,
                dev,
                onlink,
            } => {
                write!(f, "{}", self.dst)?;
                if let Some(gw) = gateway {
                    write!(f, " via {gw}")?;
                }
                write!(f, " dev #{dev}")?;
                if onlink {
                    write!(f, " onlink")?;
                }
            }
            RouteKind::Blackhole => write!(f, "blackhole {}", self.dst)?,
            RouteKind::Other => write!(f, "{} (other type)", self.dst)?,
        }
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        Ok(())
    }
}

/// An IPv4 neighbour (ARP) entry: `ip neigh ... <ip> lladdr <mac> dev <dev>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neigh {
    pub dev: IfIndex,
    pub ip: Ipv4Addr,
    /// `None` for entries without a link-layer address (incomplete, failed).
    pub mac: Option<MacAddr>,
    /// `nud permanent`.
    pub permanent: bool,
}

/// A vxlan forwarding entry: `bridge fdb ... <mac> dev <dev> self dst <dst>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbEntry {
    pub dev: IfIndex,
    pub mac: MacAddr,
    /// The remote VTEP; `None` for entries without one.
    pub dst: Option<Ipv4Addr>,
    pub permanent: bool,
}

/// A change in the set of links, from [`LinkMonitor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// `RTM_NEWLINK`: created or changed.
    Changed {
        index: IfIndex,
        name: Option<String>,
    },
    /// `RTM_DELLINK`.
    Deleted {
        index: IfIndex,
        name: Option<String>,
    },
    /// `RTM_NEWADDR` or `RTM_DELADDR` for IPv4, from a monitor made with
    /// [`LinkMonitor::with_addresses`].
    Address { index: IfIndex },
    /// The kernel dropped notifications (the socket buffer overflowed): the receiver must
    /// re-check whatever it watches.
    Overrun,
}

/// A subscription to link notifications (`RTNLGRP_LINK`, and `RTNLGRP_IPV4_IFADDR` when
/// asked), on its own socket.
#[derive(Debug)]
pub struct LinkMonitor {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    connection: JoinHandle<()>,
}

impl Drop for LinkMonitor {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Multicast group bits (`RTMGRP_*`) of the legacy `bind` interface.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;

impl LinkMonitor {
    /// Subscribes in the caller's network namespace.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new() -> Result<Self, NetlinkError> {
        Self::subscribe(RTMGRP_LINK)
    }

    /// Like [`LinkMonitor::new`], and IPv4 address changes as [`LinkEvent::Address`].
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn with_addresses() -> Result<Self, NetlinkError> {
        Self::subscribe(RTMGRP_LINK | RTMGRP_IPV4_IFADDR)
    }

    fn subscribe(groups: u32) -> Result<Self, NetlinkError> {
        let (mut connection, _, messages) =
            rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, groups))
            .map_err(NetlinkError::Socket)?;
        Ok(Self {
            messages,
            connection: tokio::spawn(connection),
        })
    }

    /// The next link event; `None` when the connection has ended.
    pub async fn next(&mut self) -> Option<LinkEvent> {
        loop {
            let (msg, _) = self.messages.next().await?;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    return Some(LinkEvent::Changed {
                        index: l.header.index,
                        name: link_name(&l),
                    });
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    return Some(LinkEvent::Deleted {
                        index: l.header.index,
                        name: link_name(&l),
                    });
                }
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a),
                ) => {
                    return Some(LinkEvent::Address {
                        index: a.header.index,
                    });
                }
                NetlinkPayload::Overrun(_) => return Some(LinkEvent::Overrun),
                NetlinkPayload::Error(e) if e.raw_code().abs() == libc::ENOBUFS => {
                    return Some(LinkEvent::Overrun);
                }
                _ => {}
            }
        }
    }
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

impl Netlink {
    /// A link and its kind-specific attributes, or `None` when there is no such link.
    pub async fn link_details(&self, name: &str) -> Result<Option<(Link, LinkKind)>, NetlinkError> {
        const OP: &str = "get link details";
        let messages: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_collect()
            .await;
        let messages = match messages.map_err(|e| NetlinkError::from_rtnetlink(OP, e)) {
            Ok(m) => m,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(messages
            .iter()
            .find_map(|m| Some((link_from_message(m)?, link_kind_from_message(m)))))
    }

    /// Creates a vxlan device, down, with its MAC and MTU already set. Fails with
    /// [`NetlinkError::Exists`] when a link of that name exists.
    pub async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), NetlinkError> {
        const OP: &str = "create vxlan link";
        let mut builder = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.dev)
            .local(spec.local)
            .port(spec.port)
            .learning(spec.learning)
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec());
        if spec.gbp {
            builder = builder.append_info_data(InfoVxlan::Gbp(true));
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))
    }

    /// Deletes a link; succeeds when it is already gone.
    pub async fn delete_link(&self, index: IfIndex) -> Result<(), NetlinkError> {
        const OP: &str = "delete link";
        ok_if_absent(
            self.handle
                .clone()
                .link()
                .del(index)
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnetlink(OP, e)),
        )
    }

    /// Sets a link's MAC address.
    pub async fn set_link_mac(&self, index: IfIndex, mac: MacAddr) -> Result<(), NetlinkError> {
        const OP: &str = "set link address";
        let msg = LinkUnspec::new_with_index(index)
            .address(mac.0.to_vec())
            .build();
        self.set_link(OP, msg).await
    }

    /// Sets a link's MTU.
    pub async fn set_link_mtu(&self, index: IfIndex, mtu: u32) -> Result<(), NetlinkError> {
        const OP: &str = "set link mtu";
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.set_link(OP, msg).await
    }

    /// Brings a link up or down.
    pub async fn set_link_up(&self, index: IfIndex, up: bool) -> Result<(), NetlinkError> {
        const OP: &str = "set link state";
        let b = LinkUnspec::new_with_index(index);
        let msg = if up { b.up() } else { b.down() }.build();
        self.set_link(OP, msg).await
    }

    async fn set_link(&self, op: &'static str, msg: LinkMessage) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(op, e))
    }

    /// `ip addr replace <ip>/<prefix_len> dev <index>`.
    pub async fn replace_address(
        &self,
        index: IfIndex,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        const OP: &str = "add address";
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))
    }

    /// `ip addr del <ip>/<prefix_len> dev <index>`; succeeds when it is already gone.
    pub async fn delete_address(&self, addr: &Addr) -> Result<(), NetlinkError> {
        const OP: &str = "delete address";
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.index = addr.ifindex;
        msg.header.prefix_len = addr.prefix_len;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(addr.ip)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr.ip)));
        ok_if_absent(
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnetlink(OP, e)),
        )
    }

    /// `ip route replace ...` in the main table.
    pub async fn replace_route(&self, route: &Route) -> Result<(), NetlinkError> {
        const OP: &str = "replace route";
        let msg = route_message(route).ok_or(NetlinkError::Protocol {
            op: OP,
            detail: "cannot install a route of an unknown type".to_owned(),
        })?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))
    }

    /// `ip route del ...` in the main table; succeeds when it is already gone.
    pub async fn delete_route(&self, route: &Route) -> Result<(), NetlinkError> {
        const OP: &str = "delete route";
        let Some(msg) = route_message(route) else {
            return Ok(());
        };
        ok_if_absent(
            self.handle
                .route()
                .del(msg)
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnetlink(OP, e)),
        )
    }

    /// IPv4 routes of the main table whose destination lies inside `within`.
    pub async fn routes_v4_within(&self, within: Ipv4Net) -> Result<Vec<Route>, NetlinkError> {
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
            .filter_map(route_from_message)
            .filter(|r| within.contains(&r.dst))
            .collect())
    }

    /// `ip neigh replace <ip> lladdr <mac> dev <dev> nud permanent`.
    pub async fn replace_neigh(
        &self,
        dev: IfIndex,
        ip: Ipv4Addr,
        mac: MacAddr,
    ) -> Result<(), NetlinkError> {
        const OP: &str = "replace neighbour";
        self.handle
            .neighbours()
            .add(dev, IpAddr::V4(ip))
            .link_local_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))
    }

    /// `ip neigh del <ip> dev <dev>`; succeeds when it is already gone.
    pub async fn delete_neigh(&self, dev: IfIndex, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        const OP: &str = "delete neighbour";
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = dev;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        ok_if_absent(
            self.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnetlink(OP, e)),
        )
    }

    /// IPv4 neighbour entries on `dev`.
    pub async fn neighbours_v4(&self, dev: IfIndex) -> Result<Vec<Neigh>, NetlinkError> {
        const OP: &str = "list neighbours";
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_family(rtnetlink::IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == dev)
            .filter_map(neigh_from_message)
            .collect())
    }

    /// `bridge fdb replace <mac> dev <dev> self dst <dst> permanent`.
    pub async fn replace_fdb(
        &self,
        dev: IfIndex,
        mac: MacAddr,
        dst: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        const OP: &str = "replace fdb entry";
        self.handle
            .neighbours()
            .add_bridge(dev, &mac.0)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(IpAddr::V4(dst))
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))
    }

    /// `bridge fdb del <mac> dev <dev> self [dst <dst>]`: with `dst`, only that remote of
    /// the entry; without, the whole entry. Succeeds when it is already gone.
    pub async fn delete_fdb(
        &self,
        dev: IfIndex,
        mac: MacAddr,
        dst: Option<Ipv4Addr>,
    ) -> Result<(), NetlinkError> {
        const OP: &str = "delete fdb entry";
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = dev;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLocalAddress(mac.0.to_vec()));
        if let Some(ip) = dst {
            msg.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Other(
                    ip.octets().to_vec(),
                )));
        }
        ok_if_absent(
            self.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnetlink(OP, e)),
        )
    }

    /// The FDB entries of `dev` (a vxlan device's own table, `bridge fdb show dev`).
    pub async fn fdb_entries(&self, dev: IfIndex) -> Result<Vec<FdbEntry>, NetlinkError> {
        const OP: &str = "list fdb entries";
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = AddressFamily::Bridge;
        let msgs: Vec<NeighbourMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(OP, e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == dev)
            .filter_map(fdb_from_message)
            .collect())
    }
}

fn ok_if_absent(r: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

fn link_kind_from_message(msg: &LinkMessage) -> LinkKind {
    let Some(infos) = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    }) else {
        return LinkKind::Unknown;
    };
    let mut kind = None;
    let mut vxlan = VxlanInfo::default();
    for info in infos {
        match info {
            LinkInfo::Kind(k) => kind = Some(k.clone()),
            LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                for a in attrs {
                    match a {
                        InfoVxlan::Id(v) => vxlan.vni = Some(*v),
                        InfoVxlan::Link(i) => vxlan.dev = Some(*i),
                        InfoVxlan::Local(ip) => vxlan.local = Some(*ip),
                        InfoVxlan::Group(ip) => vxlan.group = Some(*ip),
                        InfoVxlan::Port(p) => vxlan.port = Some(*p),
                        InfoVxlan::Learning(b) => vxlan.learning = *b,
                        InfoVxlan::Gbp(b) => vxlan.gbp = *b,
                        InfoVxlan::L2Miss(b) => vxlan.l2miss = *b,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    match kind {
        Some(InfoKind::Vxlan) => LinkKind::Vxlan(vxlan),
        Some(k) => LinkKind::Other(k.to_string()),
        None => LinkKind::Unknown,
    }
}

fn route_message(route: &Route) -> Option<RouteMessage> {
    let b = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.addr(), route.dst.prefix_len())
        .protocol(RouteProtocol::Boot);
    let b = if route.metric != 0 {
        b.priority(route.metric)
    } else {
        b
    };
    Some(match route.kind {
        RouteKind::Unicast {
            gateway,
            dev,
            onlink,
        } => {
            let b = b.output_interface(dev);
            let b = match gateway {
                Some(gw) => b.gateway(gw),
                None => b.scope(RouteScope::Link),
            };
            if onlink { b.onlink() } else { b }.build()
        }
        RouteKind::Blackhole => b.kind(RouteType::BlackHole).build(),
        RouteKind::Other => return None,
    })
}

/// A main-table IPv4 route; `None` for other tables and families.
fn route_from_message(msg: &RouteMessage) -> Option<Route> {
    if msg.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    let mut metric = 0;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let dst = Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?;
    let kind = match (msg.header.kind, oif) {
        (RouteType::Unicast, Some(dev)) => RouteKind::Unicast {
            gateway,
            dev,
            onlink: msg.header.flags.contains(RouteFlags::Onlink),
        },
        (RouteType::BlackHole, _) => RouteKind::Blackhole,
        _ => RouteKind::Other,
    };
    Some(Route { dst, kind, metric })
}

fn neigh_from_message(msg: &NeighbourMessage) -> Option<Neigh> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
            NeighbourAttribute::LinkLocalAddress(b) => {
                mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(MacAddr);
            }
            _ => {}
        }
    }
    Some(Neigh {
        dev: msg.header.ifindex,
        ip: ip?,
        mac,
        permanent: msg.header.state == NeighbourState::Permanent,
    })
}

fn fdb_from_message(msg: &NeighbourMessage) -> Option<FdbEntry> {
    if msg.header.family != AddressFamily::Bridge {
        return None;
    }
    let mut mac = None;
    let mut dst = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::LinkLocalAddress(b) => {
                mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(MacAddr);
            }
            // AF_BRIDGE messages carry NDA_DST unparsed; an IPv4 remote is 4 bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(*a),
            _ => {}
        }
    }
    Some(FdbEntry {
        dev: msg.header.ifindex,
        mac: mac?,
        dst,
        permanent: msg.header.state == NeighbourState::Permanent,
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
    fn route_message_round_trip() {
        let dst: Ipv4Net = "10.5.3.0/24".parse().unwrap();
        for r in [
            Route::via(dst, Ipv4Addr::new(10, 5, 3, 0), 7, true),
            Route::via(dst, Ipv4Addr::new(192, 168, 0, 3), 2, false),
            Route::blackhole(dst),
            Route {
                metric: 100,
                ..Route::via(dst, Ipv4Addr::new(192, 168, 0, 3), 2, false)
            },
        ] {
            let msg = route_message(&r).unwrap();
            assert_eq!(route_from_message(&msg), Some(r), "{r}");
        }
        assert_eq!(
            route_message(&Route {
                dst,
                kind: RouteKind::Other,
                metric: 0
            }),
            None
        );
    }

    #[test]
    fn fdb_destination_is_read_from_the_bridge_family() {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = 9;
        m.header.state = NeighbourState::Permanent;
        m.attributes = vec![
            NeighbourAttribute::LinkLocalAddress(vec![2, 0, 0, 0, 0, 1]),
            NeighbourAttribute::Destination(NeighbourAddress::Other(vec![192, 168, 0, 3])),
        ];
        assert_eq!(
            fdb_from_message(&m),
            Some(FdbEntry {
                dev: 9,
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                dst: Some(Ipv4Addr::new(192, 168, 0, 3)),
                permanent: true,
            })
        );
        m.header.family = AddressFamily::Inet;
        assert_eq!(fdb_from_message(&m), None);
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
