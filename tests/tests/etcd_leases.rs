//! The lease manager against a real etcd (Debian's etcd-server 3.4): acquire, renew,
//! watch, compaction recovery, reservations, losing our key, malformed leases, Go
//! flanneld's JSON, and a 32-node allocation race.
//!
//! etcd runs on loopback; no root needed. A small TCP proxy between the manager and
//! etcd lets a test cut the connection, change etcd behind the manager's back, and
//! restore it, so reconnect-and-resume and compaction recovery are exercised for real.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use flannel_agent::{
    config::{Ipv4Range, parse_config},
    mac::MacAddr,
    subnet::{
        BackendAttrs, Lease, LeaseAttrs, PeerEvent, VxlanAttrs,
        alloc::AllocError,
        etcd::{EtcdOptions, Registry},
        manager::{LeaseSpec, Manager, ManagerError, ManagerEvent, acquire},
    },
};
use flannel_tests::{Etcd, require_binary};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
    task::JoinHandle,
};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn range(cfg: &str) -> Ipv4Range {
    parse_config(cfg.as_bytes()).unwrap().ipv4.unwrap()
}

fn vxlan_attrs(ip: [u8; 4], mac_last: u8) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: Ipv4Addr::from(ip),
        public_ipv6: None,
        backend: BackendAttrs::Vxlan(VxlanAttrs {
            vni: 1,
            vtep_mac: MacAddr([0x02, 0, 0, 0, 0, mac_last]),
        }),
    }
}

fn spec(cfg: &str, attrs: LeaseAttrs) -> LeaseSpec {
    LeaseSpec {
        range: range(cfg),
        attrs,
        previous: None,
        ttl: Duration::from_secs(24 * 3600),
        renew_margin: Duration::from_secs(3600),
    }
}

async fn registry(endpoint: &str) -> Registry {
    Registry::connect(&EtcdOptions {
        endpoints: vec![endpoint.to_owned()],
        prefix: PREFIX.to_owned(),
        ..EtcdOptions::default()
    })
    .await
    .unwrap()
}

fn start_etcd(test: &str) -> Option<Etcd> {
    // The manager's logs, shown for failing tests (RUST_LOG=debug for more).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
    if !require_binary("etcd", test) {
        return None;
    }
    let etcd = Etcd::start();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    Some(etcd)
}

/// The etcd lease id attached to a key (0 for none), read with etcdctl.
fn key_lease(etcd: &Etcd, key: &str) -> Option<i64> {
    let out = etcd.etcdctl(&["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kv = v["kvs"].get(0)?;
    Some(kv["lease"].as_i64().unwrap_or(0))
}

fn lease_ttl(etcd: &Etcd, id: i64) -> i64 {
    let out = etcd.etcdctl(&["lease", "timetolive", &format!("{id:x}"), "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["ttl"].as_i64().unwrap()
}

/// Spawns the manager; returns its event receiver and task.
fn run_manager(
    reg: Registry,
    spec: LeaseSpec,
    own: Lease,
) -> (
    mpsc::Receiver<ManagerEvent>,
    JoinHandle<Result<(), ManagerError>>,
) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(Manager::new(reg, spec, own, tx).run());
    (rx, task)
}

/// Waits for a peer event matching `f`, failing after `secs`.
async fn expect_peer(
    rx: &mut mpsc::Receiver<ManagerEvent>,
    secs: u64,
    what: &str,
    f: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("manager stopped");
        if let ManagerEvent::Peers(evs) = ev
            && let Some(e) = evs.into_iter().find(|e| f(e))
        {
            return e;
        }
    }
}

fn is_added(subnet: &'static str) -> impl Fn(&PeerEvent) -> bool {
    move |e| matches!(e, PeerEvent::Added(l) if l.subnet().to_string() == subnet)
}

fn is_removed(subnet: &'static str) -> impl Fn(&PeerEvent) -> bool {
    move |e| matches!(e, PeerEvent::Removed(l) if l.subnet().to_string() == subnet)
}

const GO_PEER: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

#[tokio::test]
async fn acquire_writes_flannel_json_with_a_24h_ttl() {
    let Some(etcd) = start_etcd("acquire_writes_flannel_json_with_a_24h_ttl") else {
        return;
    };
    let reg = registry(&etcd.endpoint()).await;
    let attrs = vxlan_attrs([192, 168, 0, 1], 1);
    let lease = acquire(&reg, &spec(CONFIG, attrs.clone())).await.unwrap();
    let key = format!("{PREFIX}/subnets/{}", lease.key);
    assert_eq!(etcd.get(&key).as_deref(), Some(attrs.to_json().as_str()));
    assert_eq!(
        etcd.get(&key).unwrap(),
        r#"{"PublicIP":"192.168.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#
    );
    let id = key_lease(&etcd, &key).unwrap();
    assert_ne!(id, 0, "the key must carry an etcd lease");
    let ttl = lease_ttl(&etcd, id);
    assert!((86000..=86400).contains(&ttl), "ttl {ttl}");
    // Subnets are /24 inside 10.5.0.0/16, never the first one.
    assert_eq!(lease.subnet().prefix_len(), 24);
    assert_ne!(lease.subnet().to_string(), "10.5.0.0/24");
}

#[tokio::test]
async fn renewal_swaps_our_key_before_expiry_and_watch_sees_peers() {
    let Some(etcd) = start_etcd("renewal_swaps_our_key_before_expiry_and_watch_sees_peers") else {
        return;
    };
    let reg = registry(&etcd.endpoint()).await;
    let mut s = spec(CONFIG, vxlan_attrs([192, 168, 0, 1], 1));
    s.ttl = Duration::from_secs(4);
    s.renew_margin = Duration::from_secs(2);
    let own = acquire(&reg, &s).await.unwrap();
    let key = format!("{PREFIX}/subnets/{}", own.key);
    let first_lease = key_lease(&etcd, &key).unwrap();

    let (mut rx, _task) = run_manager(reg, s, own);
    etcd.put(&format!("{PREFIX}/subnets/10.5.200.0-24"), GO_PEER);
    let ev = expect_peer(&mut rx, 10, "the Go peer", is_added("10.5.200.0/24")).await;
    let PeerEvent::Added(peer) = ev else {
        unreachable!()
    };
    assert_eq!(peer.attrs.public_ip, Ipv4Addr::new(192, 168, 64, 3));

    // Past the original 4 s TTL the key must still exist, on a new etcd lease.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let now_lease = key_lease(&etcd, &key).expect("our key expired: no renewal");
    assert_ne!(
        now_lease, first_lease,
        "renewal must attach a fresh etcd lease"
    );
    assert!(lease_ttl(&etcd, now_lease) > 0);
}

#[tokio::test]
async fn renewal_never_overwrites_a_node_that_took_our_subnet() {
    let Some(etcd) = start_etcd("renewal_never_overwrites_a_node_that_took_our_subnet") else {
        return;
    };
    let reg = registry(&etcd.endpoint()).await;
    let s = spec(CONFIG, vxlan_attrs([192, 168, 0, 1], 1));
    let own = acquire(&reg, &s).await.unwrap();
    let key = format!("{PREFIX}/subnets/{}", own.key);
    let (mut rx, _task) = run_manager(reg, s, own.clone());
    // Let the watch start, then another node writes our key.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let intruder = r#"{"PublicIP":"192.168.0.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:63"}}"#;
    etcd.put(&key, intruder);
    let moved = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(ManagerEvent::OwnLease(l))) => break l,
            Ok(Some(_)) => continue,
            other => panic!("no re-acquire: {other:?}"),
        }
    };
    assert_ne!(moved.subnet(), own.subnet());
    assert_eq!(
        etcd.get(&key).as_deref(),
        Some(intruder),
        "other node's key overwritten"
    );
    let new_key = format!("{PREFIX}/subnets/{}", moved.key);
    assert!(etcd.get(&new_key).unwrap().contains("192.168.0.1"));
}

#[tokio::test]
async fn a_deleted_own_key_is_reacquired_with_the_same_subnet() {
    let Some(etcd) = start_etcd("a_deleted_own_key_is_reacquired_with_the_same_subnet") else {
        return;
    };
    let reg = registry(&etcd.endpoint()).await;
    let s = spec(CONFIG, vxlan_attrs([192, 168, 0, 1], 1));
    let own = acquire(&reg, &s).await.unwrap();
    let key = format!("{PREFIX}/subnets/{}", own.key);
    let (mut rx, _task) = run_manager(reg, s.clone(), own.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.etcdctl(&["del", &key]);
    let back = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(ManagerEvent::OwnLease(l))) => break l,
            Ok(Some(_)) => continue,
            other => panic!("no re-acquire: {other:?}"),
        }
    };
    assert_eq!(back.subnet(), own.subnet());
    assert_eq!(etcd.get(&key).as_deref(), Some(s.attrs.to_json().as_str()));
    assert_ne!(key_lease(&etcd, &key), Some(0));
}

#[tokio::test]
async fn a_restart_keeps_the_subnet() {
    let Some(etcd) = start_etcd("a_restart_keeps_the_subnet") else {
        return;
    };
    let reg = registry(&etcd.endpoint()).await;
    let first = acquire(&reg, &spec(CONFIG, vxlan_attrs([192, 168, 0, 1], 1)))
        .await
        .unwrap();
    // Another node in between, to make a random re-pick unlikely to match by chance.
    acquire(&reg, &spec(CONFIG, vxlan_attrs([192, 168, 0, 2], 2)))
        .await
        .unwrap();
    // Restart: by PublicIP, even with a new VtepMAC, which is written.
    let again = acquire(&reg, &spec(CONFIG, vxlan_attrs([192, 168, 0, 1], 9)))
        .await
        .unwrap();
    assert_eq!(again.subnet(), first.subnet());
    let key = format!("{PREFIX}/subnets/{}", first.key);
    assert!(etcd.get(&key).unwrap().contains("02:00:00:00:00:09"));

    // Restart with a new PublicIP but the previous subnet from subnet.env, once its
    // key is gone: the previous subnet is reused.
    etcd.etcdctl(&["del", &key]);
    let mut s = spec(CONFIG, vxlan_attrs([192, 168, 0, 3], 3));
    s.previous = Some(first.subnet());
    assert_eq!(acquire(&reg, &s).await.unwrap().subnet(), first.subnet());
}

#[tokio::test]
async fn a_reservation_is_honoured_and_keeps_no_ttl() {
    let Some(etcd) = start_etcd("a_reservation_is_honoured_and_keeps_no_ttl") else {
        return;
    };
    let reg = registry(&etcd.endpoint()).await;
    let key = format!("{PREFIX}/subnets/10.5.77.0-24");
    // The documented way to reserve: a key without an etcd lease.
    etcd.put(
        &key,
        r#"{"PublicIP":"192.168.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:aa"}}"#,
    );
    let mut s = spec(CONFIG, vxlan_attrs([192, 168, 0, 1], 1));
    s.ttl = Duration::from_secs(3);
    s.renew_margin = Duration::from_secs(1);
    let own = acquire(&reg, &s).await.unwrap();
    assert_eq!(own.subnet().to_string(), "10.5.77.0/24");
    assert!(own.is_reservation());
    assert_eq!(key_lease(&etcd, &key), Some(0), "a reservation got a TTL");
    assert!(etcd.get(&key).unwrap().contains("02:00:00:00:00:01"));

    // Another node never takes a reserved subnet.
    let other = acquire(&reg, &spec(CONFIG, vxlan_attrs([192, 168, 0, 2], 2)))
        .await
        .unwrap();
    assert_ne!(other.subnet(), own.subnet());

    // Past several would-be renewal periods it still has no TTL.
    let (_rx, _task) = run_manager(reg, s, own);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(key_lease(&etcd, &key), Some(0), "a reservation got a TTL");
}

#[tokio::test]
async fn malformed_leases_are_ignored_while_other_peers_stay() {
    let Some(etcd) = start_etcd("malformed_leases_are_ignored_while_other_peers_stay") else {
        return;
    };
    let reg = registry(&etcd.endpoint()).await;
    etcd.put(&format!("{PREFIX}/subnets/10.5.200.0-24"), GO_PEER);
    etcd.put(&format!("{PREFIX}/subnets/10.5.201.0-24"), "{garbage");
    let s = spec(CONFIG, vxlan_attrs([192, 168, 0, 1], 1));
    let own = acquire(&reg, &s).await.unwrap();
    // A garbage value still occupies its subnet.
    assert_ne!(own.subnet().to_string(), "10.5.201.0/24");
    let (mut rx, _task) = run_manager(reg, s, own);
    expect_peer(&mut rx, 10, "the valid peer", is_added("10.5.200.0/24")).await;

    for (k, v) in [
        ("10.5.202.0-24", r#"{"PublicIP":"0.0.0.0"}"#),
        (
            "10.5.203.0-24",
            r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#,
        ),
        ("10.6.0.0-24", GO_PEER),
        ("10.5.204.0-26", GO_PEER),
        ("not-a-subnet", GO_PEER),
        ("10.5.200.0-24", "[]"),
    ] {
        etcd.put(&format!("{PREFIX}/subnets/{k}"), v);
    }
    // A valid one after the garbage proves the watch is alive and nothing else changed.
    etcd.put(
        &format!("{PREFIX}/subnets/10.5.205.0-24"),
        &GO_PEER.replace("192.168.64.3", "192.168.64.5"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("no event for the valid peer")
            .unwrap();
        let evs = match ev {
            ManagerEvent::Peers(evs) => evs,
            ManagerEvent::Snapshot(_) => continue,
            other => panic!("unexpected {other:?}"),
        };
        if let Some(other) = evs.iter().find(
            |e| !matches!(e, PeerEvent::Added(l) if l.subnet().to_string() == "10.5.205.0/24"),
        ) {
            panic!("malformed lease changed the peers: {other:?}");
        }
        if !evs.is_empty() {
            return;
        }
    }
}

/// A TCP proxy in front of etcd whose connections can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(Notify::new());
        let (up2, cut2) = (up.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: refused while down
                }
                let cut = cut2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = cut.notified() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            cut,
            task,
        }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn etcd_addr(etcd: &Etcd) -> SocketAddr {
    etcd.endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn watch_resumes_after_a_disconnect_and_recovers_from_compaction() {
    let Some(etcd) = start_etcd("watch_resumes_after_a_disconnect_and_recovers_from_compaction")
    else {
        return;
    };
    let proxy = Proxy::start(etcd_addr(&etcd)).await;
    let reg = registry(&format!("http://{}", proxy.addr)).await;
    let s = spec(CONFIG, vxlan_attrs([192, 168, 0, 1], 1));
    let own = acquire(&reg, &s).await.unwrap();
    etcd.put(&format!("{PREFIX}/subnets/10.5.200.0-24"), GO_PEER);
    let (mut rx, _task) = run_manager(reg, s, own);
    expect_peer(&mut rx, 10, "first peer", is_added("10.5.200.0/24")).await;

    // 1. Disconnect; changes happen meanwhile; the resumed watch delivers them.
    proxy.down();
    etcd.put(
        &format!("{PREFIX}/subnets/10.5.201.0-24"),
        &GO_PEER.replace(".64.3", ".64.4"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    expect_peer(
        &mut rx,
        30,
        "peer added while disconnected",
        is_added("10.5.201.0/24"),
    )
    .await;

    // 2. Disconnect; a peer goes and another comes; etcd compacts past the watch's
    // revision. The manager must re-list and diff.
    proxy.down();
    etcd.etcdctl(&["del", &format!("{PREFIX}/subnets/10.5.200.0-24")]);
    etcd.put(
        &format!("{PREFIX}/subnets/10.5.202.0-24"),
        &GO_PEER.replace(".64.3", ".64.5"),
    );
    let out = etcd.etcdctl(&["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rev = v[0]["Status"]["header"]["revision"].as_i64().unwrap();
    let c = etcd.etcdctl(&["compact", &rev.to_string()]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();

    let mut removed = false;
    let mut added = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(removed && added) {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no recovery: removed={removed} added={added}"))
            .unwrap();
        if let ManagerEvent::Peers(evs) = ev {
            removed |= evs.iter().any(is_removed("10.5.200.0/24"));
            added |= evs.iter().any(is_added("10.5.202.0/24"));
        }
    }
}

#[tokio::test]
async fn thirty_two_nodes_race_for_seven_subnets() {
    let Some(etcd) = start_etcd("thirty_two_nodes_race_for_seven_subnets") else {
        return;
    };
    // A /27 cut into /30s is 8 subnets; the first is skipped, as in flannel: 7.
    let cfg = r#"{"Network":"10.9.0.0/27","SubnetLen":30,"Backend":{"Type":"vxlan"}}"#;
    let endpoint = etcd.endpoint();
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let reg = registry(&endpoint).await;
            acquire(&reg, &spec(cfg, vxlan_attrs([192, 168, 1, i + 1], i + 1))).await
        }));
    }
    let mut won = Vec::new();
    let mut out_of_subnets = 0;
    for t in tasks {
        match t.await.expect("an agent panicked") {
            Ok(l) => won.push(l.subnet()),
            Err(ManagerError::Alloc(AllocError::OutOfSubnets)) => out_of_subnets += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let distinct: HashSet<_> = won.iter().collect();
    assert_eq!(won.len(), 7, "winners: {won:?}");
    assert_eq!(distinct.len(), 7, "duplicate subnets: {won:?}");
    assert_eq!(out_of_subnets, 25);
    assert!(!won.iter().any(|n| n.to_string() == "10.9.0.0/30"));
    let keys = etcd.etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        &format!("{PREFIX}/subnets/"),
    ]);
    let n = String::from_utf8_lossy(&keys.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(n, 7);
}
