//! Interface selection and the netlink queries under it, against real links in network
//! namespaces the tests create (never the host's own).
//!
//! The links are made with iproute2 (`ip -n NS …`), so what `flannel_agent::netlink` reads
//! back is checked against an independent writer.

use std::{fs::File, future::Future, net::Ipv4Addr, os::fd::AsRawFd, thread};

use flannel_agent::{
    iface::{ExternalInterface, IfaceError, IfaceOptions, find_external_interface},
    netlink::{Link, Netlink},
};
use flannel_tests::{NetNs, require_root};

/// Runs `f`'s future on a current-thread runtime in a thread that has entered `ns`.
///
/// A netlink socket belongs to the namespace of the thread that opens it, and setns(2)
/// moves only the calling thread; so the test body gets a fresh thread that never returns
/// to the host namespace and exits when the body is done.
fn in_netns<T, F, Fut>(ns: &NetNs, f: F) -> T
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
{
    let path = format!("/run/netns/{}", ns.name());
    thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: the descriptor is open for the duration of the call; setns only
            // changes the network namespace of this thread, which is ours alone and ends
            // with this closure.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A namespace shaped like a host with several interfaces:
/// - `eth0`: 192.168.50.10/24, carries the default route;
/// - `eth1`: MTU 1400, 10.20.0.5/24 then 10.20.0.6/24 (secondary); 198.51.100.0/24 is
///   routed through it with source 10.20.0.6;
/// - `eth2`: a deprecated 10.30.0.9, a dynamic 10.30.0.10, a link-local 169.254.30.30;
/// - `eth3`: a dynamic 10.40.0.1 added before a permanent 10.40.0.2;
/// - `ens5`: only 169.254.7.7/16.
fn lab(prefix: &str) -> NetNs {
    let ns = NetNs::new(prefix);
    for (name, mtu) in [
        ("eth0", "1500"),
        ("eth1", "1400"),
        ("eth2", "1500"),
        ("eth3", "1500"),
        ("ens5", "1500"),
    ] {
        // veth rather than dummy: the dummy module may be missing where tests run. The
        // peer stays in the namespace, without addresses.
        let peer = format!("p-{name}");
        ns.ip(&[
            "link", "add", "name", name, "mtu", mtu, "type", "veth", "peer", "name", &peer, "mtu",
            mtu,
        ]);
        ns.ip(&["link", "set", &peer, "up"]);
        ns.ip(&["link", "set", name, "up"]);
    }
    for args in [
        &["192.168.50.10/24", "dev", "eth0"][..],
        &["10.20.0.5/24", "dev", "eth1"],
        &["10.20.0.6/24", "dev", "eth1"],
        &["10.30.0.9/24", "dev", "eth2", "preferred_lft", "0"],
        &[
            "10.30.0.10/24",
            "dev",
            "eth2",
            "valid_lft",
            "600",
            "preferred_lft",
            "600",
        ],
        &["169.254.30.30/16", "dev", "eth2"],
        &[
            "10.40.0.1/24",
            "dev",
            "eth3",
            "valid_lft",
            "600",
            "preferred_lft",
            "600",
        ],
        &["10.40.0.2/24", "dev", "eth3"],
        &["169.254.7.7/16", "dev", "ens5"],
    ] {
        ns.ip(&[&["addr", "add"][..], args].concat());
    }
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.168.50.1",
        "dev",
        "eth0",
    ]);
    ns.ip(&[
        "route",
        "add",
        "198.51.100.0/24",
        "dev",
        "eth1",
        "src",
        "10.20.0.6",
    ]);
    ns
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

async fn link(nl: &Netlink, name: &str) -> Link {
    nl.link_by_name(name)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{name} not found"))
}

async fn select(opts: IfaceOptions) -> Result<ExternalInterface, IfaceError> {
    let nl = Netlink::new().unwrap();
    find_external_interface(&nl, &opts).await
}

#[test]
fn netlink_reads_links_addresses_and_routes() {
    if !require_root("netlink_reads_links_addresses_and_routes") {
        return;
    }
    let ns = lab("nlread");
    in_netns(&ns, || async {
        let nl = Netlink::new().unwrap();
        let links = nl.links().await.unwrap();
        let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
        for want in ["lo", "eth0", "eth1", "eth2", "eth3", "ens5"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let eth1 = link(&nl, "eth1").await;
        assert_eq!(eth1.mtu, 1400);
        assert!(eth1.up);
        assert!(eth1.mac.is_some());
        assert_eq!(
            nl.link_by_index(eth1.index).await.unwrap(),
            Some(eth1.clone())
        );
        assert_eq!(nl.link_by_name("eth9").await.unwrap(), None);
        assert_eq!(nl.link_by_index(999_999).await.unwrap(), None);

        let addrs = nl.addresses_v4().await.unwrap();
        let find = |s: &str| {
            *addrs
                .iter()
                .find(|a| a.ip == ip(s))
                .unwrap_or_else(|| panic!("{s} not in {addrs:?}"))
        };
        let primary = find("10.20.0.5");
        assert_eq!((primary.ifindex, primary.prefix_len), (eth1.index, 24));
        assert!(primary.flags.permanent && !primary.flags.secondary);
        assert!(find("10.20.0.6").flags.secondary);
        assert!(find("10.30.0.9").flags.deprecated);
        let dynamic = find("10.30.0.10");
        assert!(dynamic.flags.dynamic() && !dynamic.flags.deprecated);

        let eth0 = link(&nl, "eth0").await;
        assert_eq!(nl.default_route_v4_iface().await.unwrap(), Some(eth0.index));

        let route = nl.route_get_v4(ip("198.51.100.7")).await.unwrap().unwrap();
        assert_eq!(route.ifindex, eth1.index);
        assert_eq!(route.prefsrc, Some(ip("10.20.0.6")));
        assert_eq!(route.gateway, None);
        let route = nl.route_get_v4(ip("203.0.113.1")).await.unwrap().unwrap();
        assert_eq!(route.ifindex, eth0.index);
        assert_eq!(route.gateway, Some(ip("192.168.50.1")));
        assert_eq!(route.prefsrc, Some(ip("192.168.50.10")));
    });
}

#[test]
fn netlink_in_an_empty_namespace() {
    if !require_root("netlink_in_an_empty_namespace") {
        return;
    }
    let ns = NetNs::new("nlempty");
    in_netns(&ns, || async {
        let nl = Netlink::new().unwrap();
        assert_eq!(nl.default_route_v4_iface().await.unwrap(), None);
        assert_eq!(nl.route_get_v4(ip("203.0.113.1")).await.unwrap(), None);
        let names: Vec<String> = nl
            .links()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, ["lo"]);
    });
}

#[test]
fn default_route_interface_is_the_default() {
    if !require_root("default_route_interface_is_the_default") {
        return;
    }
    let ns = lab("ifdefault");
    let ext = in_netns(&ns, || select(IfaceOptions::default())).unwrap();
    assert_eq!(ext.name, "eth0");
    assert_eq!(ext.mtu, 1500);
    assert_eq!(ext.iface_addr, ip("192.168.50.10"));
    assert_eq!(ext.public_ip, ip("192.168.50.10"));

    // Move the default route: the choice follows it.
    ns.ip(&["route", "replace", "default", "dev", "eth1"]);
    let ext = in_netns(&ns, || select(IfaceOptions::default())).unwrap();
    assert_eq!((ext.name.as_str(), ext.mtu), ("eth1", 1400));
    assert_eq!(ext.iface_addr, ip("10.20.0.5"), "the primary address");
}

#[test]
fn iface_by_name_and_by_ip() {
    if !require_root("iface_by_name_and_by_ip") {
        return;
    }
    let ns = lab("ifname");
    let by = |specs: &[&str]| IfaceOptions {
        iface: specs.iter().map(|s| (*s).to_owned()).collect(),
        ..IfaceOptions::default()
    };
    let ext = in_netns(&ns, || select(by(&["eth1"]))).unwrap();
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr),
        ("eth1", ip("10.20.0.5"))
    );
    let ext = in_netns(&ns, || select(by(&["10.20.0.6"]))).unwrap();
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr),
        ("eth1", ip("10.20.0.6"))
    );
    // Tried in order: a missing name and an address nobody holds are skipped.
    let ext = in_netns(&ns, || select(by(&["eth9", "10.99.0.1", "eth3"]))).unwrap();
    assert_eq!(ext.name, "eth3");
    // Permanent before dynamic, although the dynamic one was added first.
    assert_eq!(ext.iface_addr, ip("10.40.0.2"));
    // Deprecated never; dynamic global before permanent link-local.
    let ext = in_netns(&ns, || select(by(&["eth2"]))).unwrap();
    assert_eq!(ext.iface_addr, ip("10.30.0.10"));
    let ext = in_netns(&ns, || select(by(&["ens5"]))).unwrap();
    assert_eq!(ext.iface_addr, ip("169.254.7.7"));
}

#[test]
fn iface_regex_matches_addresses_then_names() {
    if !require_root("iface_regex_matches_addresses_then_names") {
        return;
    }
    let ns = lab("ifregex");
    let re = |p: &[&str]| IfaceOptions {
        iface_regex: p.iter().map(|s| (*s).to_owned()).collect(),
        ..IfaceOptions::default()
    };
    let ext = in_netns(&ns, || select(re(&[r"^10\.20\.0\.6$"]))).unwrap();
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr),
        ("eth1", ip("10.20.0.6"))
    );
    let ext = in_netns(&ns, || select(re(&["^wlan", "^ens"]))).unwrap();
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr),
        ("ens5", ip("169.254.7.7"))
    );
    // An --iface that resolves wins over any regex.
    let opts = IfaceOptions {
        iface: vec!["eth3".into()],
        iface_regex: vec!["^eth1$".into()],
        ..IfaceOptions::default()
    };
    assert_eq!(in_netns(&ns, || select(opts)).unwrap().name, "eth3");
}

#[test]
fn iface_can_reach_takes_the_route_and_its_source() {
    if !require_root("iface_can_reach_takes_the_route_and_its_source") {
        return;
    }
    let ns = lab("ifreach");
    let reach = |dst: &str| IfaceOptions {
        iface_can_reach: Some(ip(dst)),
        ..IfaceOptions::default()
    };
    let ext = in_netns(&ns, || select(reach("198.51.100.7"))).unwrap();
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr),
        ("eth1", ip("10.20.0.6"))
    );
    let ext = in_netns(&ns, || select(reach("203.0.113.1"))).unwrap();
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr),
        ("eth0", ip("192.168.50.10"))
    );
}

#[test]
fn public_ip_overrides_or_locates_the_interface() {
    if !require_root("public_ip_overrides_or_locates_the_interface") {
        return;
    }
    let ns = lab("ifpublic");
    // With an interface flag, --public-ip is only what peers are told.
    let opts = IfaceOptions {
        iface: vec!["eth1".into()],
        public_ip: Some(ip("203.0.113.50")),
        ..IfaceOptions::default()
    };
    let ext = in_netns(&ns, || select(opts)).unwrap();
    assert_eq!(ext.name, "eth1");
    assert_eq!(ext.iface_addr, ip("10.20.0.5"));
    assert_eq!(ext.public_ip, ip("203.0.113.50"));
    // Alone, it picks the interface that holds it (not the default route's).
    let opts = IfaceOptions {
        public_ip: Some(ip("10.40.0.1")),
        ..IfaceOptions::default()
    };
    let ext = in_netns(&ns, || select(opts)).unwrap();
    assert_eq!(ext.name, "eth3");
    assert_eq!(
        (ext.iface_addr, ext.public_ip),
        (ip("10.40.0.1"), ip("10.40.0.1"))
    );
}

#[test]
fn selection_errors_name_what_was_searched() {
    if !require_root("selection_errors_name_what_was_searched") {
        return;
    }
    let ns = lab("iferr");
    let err = in_netns(&ns, || {
        select(IfaceOptions {
            iface: vec!["eth9".into()],
            iface_regex: vec!["^wlan".into()],
            iface_can_reach: Some(ip("10.77.0.1")),
            ..IfaceOptions::default()
        })
    });
    // 10.77.0.1 is reachable through the default route, so can-reach succeeds: the
    // misses before it are not errors.
    assert_eq!(err.unwrap().name, "eth0");

    let err = in_netns(&ns, || {
        select(IfaceOptions {
            iface: vec!["eth9".into(), "lo".into()],
            iface_regex: vec!["^wlan".into()],
            ..IfaceOptions::default()
        })
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no interface matches --iface eth9 (no such interface), \
         --iface lo (interface lo has no usable IPv4 address), \
         --iface-regex ^wlan (no interface name or IPv4 address matches)"
    );

    let opts = IfaceOptions {
        public_ip: Some(ip("203.0.113.50")),
        ..IfaceOptions::default()
    };
    let err = in_netns(&ns, || select(opts)).unwrap_err();
    assert!(matches!(err, IfaceError::PublicIpNotLocal { .. }), "{err}");

    // Without a default route, the default choice fails and says what to do.
    ns.ip(&["route", "del", "default"]);
    let err = in_netns(&ns, || select(IfaceOptions::default())).unwrap_err();
    assert_eq!(err.to_string(), "no default route: use --iface");
    let opts = IfaceOptions {
        iface_can_reach: Some(ip("10.77.0.1")),
        ..IfaceOptions::default()
    };
    let err = in_netns(&ns, || select(opts)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no interface matches --iface-can-reach 10.77.0.1 (unreachable)"
    );
}
