//! flannel's iptables and nftables rules, applied by the real tools inside a network
//! namespace of the test's own, then compared with flannel's golden copies (`e2e/rules.go`).
//!
//! How the host stays untouched: firewall state is per network namespace, and a process
//! inherits the namespace of the thread that starts it. Each test creates a namespace with
//! the `NetNs` fixture (deleted on drop, even after a panic), runs the `TrafficManager` on a
//! current-thread tokio runtime in a thread that has `setns`'d into it and checked that it
//! did, and inspects the result with `ip netns exec`. The main test thread never changes
//! namespace.

use std::{
    fs::{self, File},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use flannel_agent::host::trafficmngr::TrafficManager;
use flannel_tests::{NetNs, require_binary, require_root};

const NETWORK: &str = "10.5.0.0/16";
const LEASE: &str = "10.5.72.0/24";
const OTHER_LEASE: &str = "10.5.9.0/24";

/// Runs `f` in a new thread inside `ns`, with a current-thread tokio runtime, and returns
/// its result; a panic in `f` fails the test with its own message.
fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send) -> T {
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let before = fs::read_link("/proc/thread-self/ns/net").unwrap();
            let file = File::open(format!("/run/netns/{}", ns.name())).unwrap();
            // SAFETY: `file` is an open network namespace file for the whole call; setns
            // changes the namespace of this thread only, which ends with the scope.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let after = fs::read_link("/proc/thread-self/ns/net").unwrap();
            // Never go on in the host's namespace: that would change the host's firewall.
            assert_ne!(before, after, "setns did not change the network namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            f(&rt)
        });
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn ready(test: &str, tools: &[&str]) -> bool {
    require_root(test) && tools.iter().all(|t| require_binary(t, test))
}

/// `iptables -S` of the nat rules flannel owns, as flannel's e2e check collects them.
fn nat_rules(ns: &NetNs) -> Vec<String> {
    let post = ns.exec_ok(&["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"]);
    let chain = ns.exec_ok(&["iptables", "-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"]);
    post.lines()
        .filter(|l| l.contains("FLANNEL"))
        .chain(chain.lines())
        .map(str::to_owned)
        .collect()
}

fn forward_rules(ns: &NetNs) -> Vec<String> {
    let fwd = ns.exec_ok(&["iptables", "-w", "-t", "filter", "-S", "FORWARD"]);
    let chain = ns.exec_ok(&["iptables", "-w", "-t", "filter", "-S", "FLANNEL-FWD"]);
    fwd.lines()
        .chain(chain.lines())
        .map(str::to_owned)
        .collect()
}

/// flannel's `expectedIptablesPostrouting`.
fn golden_nat(pod: &str, random_fully: bool) -> Vec<String> {
    let n = NETWORK;
    let rf = if random_fully { " --random-fully" } else { "" };
    vec![
        r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#.to_owned(),
        "-N FLANNEL-POSTRTG".to_owned(),
        r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#.to_owned(),
        format!(r#"-A FLANNEL-POSTRTG -s {pod} -d {n} -m comment --comment "flanneld masq" -j RETURN"#),
        format!(r#"-A FLANNEL-POSTRTG -s {n} -d {pod} -m comment --comment "flanneld masq" -j RETURN"#),
        format!(r#"-A FLANNEL-POSTRTG ! -s {n} -d {pod} -m comment --comment "flanneld masq" -j RETURN"#),
        format!(r#"-A FLANNEL-POSTRTG -s {n} ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE{rf}"#),
        format!(r#"-A FLANNEL-POSTRTG ! -s {n} -d {n} -m comment --comment "flanneld masq" -j MASQUERADE{rf}"#),
    ]
}

/// flannel's `expectedIptablesForward`, without kube-proxy's rules.
fn golden_forward() -> Vec<String> {
    let n = NETWORK;
    vec![
        "-P FORWARD ACCEPT".to_owned(),
        r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#.to_owned(),
        "-N FLANNEL-FWD".to_owned(),
        format!(r#"-A FLANNEL-FWD -s {n} -m comment --comment "flanneld forward" -j ACCEPT"#),
        format!(r#"-A FLANNEL-FWD -d {n} -m comment --comment "flanneld forward" -j ACCEPT"#),
    ]
}

/// flannel's `expectedNftPostrouting`.
fn golden_nft_postrtg(pod: &str) -> String {
    let n = NETWORK;
    [
        "table ip flannel-ipv4 {".to_owned(),
        "\tchain postrtg {".to_owned(),
        "\t\tcomment \"chain to manage traffic masquerading by flannel\"".to_owned(),
        "\t\ttype nat hook postrouting priority srcnat; policy accept;".to_owned(),
        "\t\tmeta mark 0x00004000 return".to_owned(),
        format!("\t\tip saddr {pod} ip daddr {n} return"),
        format!("\t\tip saddr {n} ip daddr {pod} return"),
        format!("\t\tip saddr != {pod} ip daddr {n} return"),
        format!("\t\tip saddr {n} ip daddr != 224.0.0.0/4 masquerade fully-random"),
        format!("\t\tip saddr != {n} ip daddr {n} masquerade fully-random"),
        "\t}".to_owned(),
        "}".to_owned(),
    ]
    .join("\n")
}

/// flannel's `expectedNftForward`.
fn golden_nft_forward() -> String {
    let n = NETWORK;
    [
        "table ip flannel-ipv4 {".to_owned(),
        "\tchain forward {".to_owned(),
        "\t\tcomment \"chain to accept flannel traffic\"".to_owned(),
        "\t\ttype filter hook forward priority filter; policy accept;".to_owned(),
        format!("\t\tip saddr {n} accept"),
        format!("\t\tip daddr {n} accept"),
        "\t}".to_owned(),
        "}".to_owned(),
    ]
    .join("\n")
}

fn nft_chain(ns: &NetNs, chain: &str) -> String {
    ns.exec_ok(&["nft", "list", "chain", "ip", "flannel-ipv4", chain])
        .trim_end()
        .to_owned()
}

fn random_fully(tm: &TrafficManager) -> bool {
    match tm {
        TrafficManager::Iptables(m) => m.supports_random_fully(),
        TrafficManager::Nftables(_) => true,
    }
}

#[test]
fn iptables_rules_apply_resync_and_stay_unique() {
    let test = "iptables_rules_apply_resync_and_stay_unique";
    if !ready(test, &["ip", "iptables", "iptables-restore", "nft"]) {
        return;
    }
    let ns = NetNs::new("ipt");
    let net = NETWORK.parse().unwrap();
    let lease = LEASE.parse().unwrap();
    in_netns(&ns, |rt| {
        // Left over from nftables mode: removed when iptables mode starts.
        ns.exec_ok(&["nft", "add", "table", "ip", "flannel-ipv4"]);
        let tm = rt.block_on(TrafficManager::new(false)).unwrap();
        rt.block_on(tm.cleanup_other()).unwrap();
        assert!(
            !ns.exec_ok(&["nft", "list", "tables"])
                .contains("flannel-ipv4"),
            "the nftables table is gone"
        );
        // Nothing to clean the second time is fine too.
        rt.block_on(tm.cleanup_other()).unwrap();

        let rf = random_fully(&tm);
        rt.block_on(tm.setup_masq(net, lease, None, false)).unwrap();
        rt.block_on(tm.setup_forward(net)).unwrap();
        assert_eq!(nat_rules(&ns), golden_nat(LEASE, rf));
        assert_eq!(forward_rules(&ns), golden_forward());

        // Applying again, and resyncing a complete set, changes nothing.
        rt.block_on(tm.setup_masq(net, lease, Some((net, lease)), false))
            .unwrap();
        rt.block_on(tm.setup_forward(net)).unwrap();
        assert!(!rt.block_on(tm.resync()).unwrap());
        assert_eq!(nat_rules(&ns), golden_nat(LEASE, rf));
        assert_eq!(forward_rules(&ns), golden_forward());

        // A rule deleted from the middle comes back in place, and only once.
        ns.exec_ok(&["iptables", "-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"]);
        ns.exec_ok(&[
            "iptables",
            "-w",
            "-t",
            "filter",
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "flanneld forward",
            "-j",
            "FLANNEL-FWD",
        ]);
        assert_ne!(nat_rules(&ns), golden_nat(LEASE, rf));
        assert!(rt.block_on(tm.resync()).unwrap());
        assert_eq!(nat_rules(&ns), golden_nat(LEASE, rf));
        assert_eq!(forward_rules(&ns), golden_forward());

        // A chain deleted altogether comes back too.
        ns.exec_ok(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ]);
        ns.exec_ok(&["iptables", "-w", "-t", "nat", "-F", "FLANNEL-POSTRTG"]);
        ns.exec_ok(&["iptables", "-w", "-t", "nat", "-X", "FLANNEL-POSTRTG"]);
        assert!(rt.block_on(tm.resync()).unwrap());
        assert_eq!(nat_rules(&ns), golden_nat(LEASE, rf));

        // A new lease replaces the old rules; with the flag, no --random-fully.
        let other = OTHER_LEASE.parse().unwrap();
        rt.block_on(tm.setup_masq(net, other, Some((net, lease)), true))
            .unwrap();
        assert_eq!(nat_rules(&ns), golden_nat(OTHER_LEASE, false));
        assert!(!rt.block_on(tm.resync()).unwrap());

        // The resync loop restores a deleted rule on its own, and stops on shutdown.
        let tm = Arc::new(tm);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        rt.block_on(async {
            let task = tm.spawn_resync(Duration::from_millis(200), async move {
                while !stop_flag.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            ns.exec_ok(&["iptables", "-w", "-t", "filter", "-D", "FLANNEL-FWD", "1"]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while forward_rules(&ns) != golden_forward() {
                assert!(
                    Instant::now() < deadline,
                    "resync loop did not restore the rule"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.store(true, Ordering::Relaxed);
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("resync loop stops on shutdown")
                .unwrap();
        });
    });
}

#[test]
fn nftables_rules_apply_resync_and_replace_iptables() {
    let test = "nftables_rules_apply_resync_and_replace_iptables";
    if !ready(test, &["ip", "iptables", "iptables-restore", "nft"]) {
        return;
    }
    let ns = NetNs::new("nft");
    let net = NETWORK.parse().unwrap();
    let lease = LEASE.parse().unwrap();
    in_netns(&ns, |rt| {
        // Left over from iptables mode: removed when nftables mode starts.
        let ipt = rt.block_on(TrafficManager::new(false)).unwrap();
        rt.block_on(ipt.setup_masq(net, lease, None, false))
            .unwrap();
        rt.block_on(ipt.setup_forward(net)).unwrap();
        let tm = rt.block_on(TrafficManager::new(true)).unwrap();
        assert!(tm.is_nftables());
        rt.block_on(tm.cleanup_other()).unwrap();
        let nat = ns.exec_ok(&["iptables", "-w", "-t", "nat", "-S"]);
        let filter = ns.exec_ok(&["iptables", "-w", "-t", "filter", "-S"]);
        assert!(
            !nat.contains("FLANNEL"),
            "nat still has flannel rules:\n{nat}"
        );
        assert!(
            !filter.contains("FLANNEL"),
            "filter still has flannel rules:\n{filter}"
        );
        rt.block_on(tm.cleanup_other()).unwrap();

        rt.block_on(tm.setup_masq(net, lease, None, false)).unwrap();
        rt.block_on(tm.setup_forward(net)).unwrap();
        assert_eq!(nft_chain(&ns, "postrtg"), golden_nft_postrtg(LEASE));
        assert_eq!(nft_chain(&ns, "forward"), golden_nft_forward());

        // Twice: still one copy of each rule.
        rt.block_on(tm.setup_masq(net, lease, None, false)).unwrap();
        rt.block_on(tm.setup_forward(net)).unwrap();
        assert!(!rt.block_on(tm.resync()).unwrap());
        assert_eq!(nft_chain(&ns, "postrtg"), golden_nft_postrtg(LEASE));
        assert_eq!(nft_chain(&ns, "forward"), golden_nft_forward());

        // A new lease replaces the old rules (the chain is flushed in the transaction).
        let other = OTHER_LEASE.parse().unwrap();
        rt.block_on(tm.setup_masq(net, other, Some((net, lease)), false))
            .unwrap();
        assert_eq!(nft_chain(&ns, "postrtg"), golden_nft_postrtg(OTHER_LEASE));

        // An emptied chain, a deleted chain and a deleted table all come back.
        ns.exec_ok(&["nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg"]);
        assert!(rt.block_on(tm.resync()).unwrap());
        assert_eq!(nft_chain(&ns, "postrtg"), golden_nft_postrtg(OTHER_LEASE));
        ns.exec_ok(&["nft", "delete", "chain", "ip", "flannel-ipv4", "forward"]);
        assert!(rt.block_on(tm.resync()).unwrap());
        assert_eq!(nft_chain(&ns, "forward"), golden_nft_forward());
        ns.exec_ok(&["nft", "delete", "table", "ip", "flannel-ipv4"]);
        assert!(rt.block_on(tm.resync()).unwrap());
        assert_eq!(nft_chain(&ns, "postrtg"), golden_nft_postrtg(OTHER_LEASE));
        assert_eq!(nft_chain(&ns, "forward"), golden_nft_forward());
        assert!(!rt.block_on(tm.resync()).unwrap());

        // The way back: iptables mode deletes the table.
        rt.block_on(ipt.cleanup_other()).unwrap();
        assert!(!ns.exec_ok(&["nft", "list", "tables"]).contains("flannel"));
    });
}

#[test]
fn nftables_without_fully_random_when_disabled() {
    let test = "nftables_without_fully_random_when_disabled";
    if !ready(test, &["ip", "nft"]) {
        return;
    }
    let ns = NetNs::new("nftrf");
    in_netns(&ns, |rt| {
        let tm = rt.block_on(TrafficManager::new(true)).unwrap();
        rt.block_on(tm.setup_masq(NETWORK.parse().unwrap(), LEASE.parse().unwrap(), None, true))
            .unwrap();
        let expected = golden_nft_postrtg(LEASE).replace(" masquerade fully-random", " masquerade");
        assert_eq!(nft_chain(&ns, "postrtg"), expected);
    });
}
