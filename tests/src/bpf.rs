//! Helpers for the privileged BPF tests: entering namespaces from test threads, a private
//! bpffs, the loaded programs under BPF_PROG_TEST_RUN ([`ProgLab`]), real traffic between
//! namespaces and the fast paths' counters.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    str::FromStr as _,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use aya::{
    Ebpf, Pod, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::SchedClassifier,
    util::nr_cpus,
};
use flannel_agent::{
    dataplane::{FastPathConfig, HostGwFastPath, Ipv4Net, UdpFastPath, VxlanFastPath},
    mac::MacAddr,
};
use flannel_common::{
    MAP_PEER_COUNTERS, MAP_PEERS, MAP_REASONS, MAP_SOURCES,
    maps::{Peer, PeerCounters, PeerSource, reason},
};

use crate::{
    NetNs,
    packet::{be, mask, parse_mac},
    require_root, skip,
};

/// `TC_ACT_OK`: the packet goes on through the kernel.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`: the packet is dropped.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: the program forwarded the packet.
pub const TC_ACT_REDIRECT: u32 = 7;

/// The MAC of the permanent neighbour [`ProgLab`] sets up for the peer's underlay address.
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb2];

/// Makes the calling thread live in a namespace until dropped.
pub struct InNetns {
    orig: File,
}

impl InNetns {
    /// Moves the calling thread into `ns`; dropping the guard moves it back.
    pub fn enter(ns: &NetNs) -> InNetns {
        let orig = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = File::open(format!("/var/run/netns/{}", ns.name())).expect("open netns");
        // SAFETY: setns(2) with a namespace fd we hold open; it only changes this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        InNetns { orig }
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        // SAFETY: as in `enter`, with the fd of the namespace the thread came from.
        unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// Runs `f` on a new thread inside namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let target = File::open(&path).expect("open netns");
        // SAFETY: setns(2) on this new thread only, with a namespace fd we hold open.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// The ifindex of `name` in the calling thread's namespace; panics if there is none.
pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: `c` is a NUL-terminated string alive for the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// The MAC address of `ifname` in `ns`.
pub fn mac_of(ns: &NetNs, ifname: &str) -> [u8; 6] {
    let out = ns.ip(&["-o", "link", "show", ifname]);
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("link/ether in ip link output");
    parse_mac(addr)
}

/// Adds `flannel.1` in `ns` as flannel's vxlan backend makes it (VNI 1, port 8472,
/// `nolearning`, `local` the underlay address `local` on `eth0`), still down.
pub fn add_flannel_vxlan(ns: &NetNs, local: Ipv4Addr) {
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "nolearning",
        "local",
        &local.to_string(),
        "dev",
        "eth0",
    ]);
}

/// Sets a host namespace `ns` (underlay `eth0` at `public_ip`) up as flannel's vxlan
/// backend does for subnet 10.244.`third`.0/24 with VtepMAC `vtep_mac`: `flannel.1`
/// ([`add_flannel_vxlan`]), its MAC before it comes up, MTU 1450, the `.0/32` address,
/// forwarding on; and `container` behind a veth (`vc`, .1 on the host, .2 in the
/// container, MTU 1450, default route via .1).
pub fn kernel_vxlan_host(
    ns: &NetNs,
    public_ip: Ipv4Addr,
    container: &NetNs,
    third: u8,
    vtep_mac: &str,
) {
    add_flannel_vxlan(ns, public_ip);
    ns.ip(&[
        "link",
        "set",
        "flannel.1",
        "address",
        vtep_mac,
        "mtu",
        "1450",
    ]);
    ns.ip(&[
        "addr",
        "add",
        &format!("10.244.{third}.0/32"),
        "dev",
        "flannel.1",
    ]);
    ns.ip(&["link", "set", "flannel.1", "up"]);
    ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    add_container(ns, container, third, 1450);
}

/// Puts `container` behind host `ns` in pod subnet 10.244.`third`.0/24: a veth (`vc`
/// with .1 on the host, `eth0` with .2 in the container) of MTU `mtu` in the container,
/// default route via .1.
pub fn add_container(ns: &NetNs, container: &NetNs, third: u8, mtu: usize) {
    crate::veth_pair(
        ns,
        "vc",
        &format!("10.244.{third}.1/24"),
        container,
        "eth0",
        &format!("10.244.{third}.2/24"),
    );
    container.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()]);
    container.ip(&[
        "route",
        "add",
        "default",
        "via",
        &format!("10.244.{third}.1"),
    ]);
}

/// What flanneld programs in `ns` for a vxlan peer (`subnet`, `public_ip`, `vtep_mac`):
/// neighbour, FDB entry, onlink route.
pub fn add_vxlan_peer(ns: &NetNs, subnet: Ipv4Net, public_ip: Ipv4Addr, vtep_mac: &str) {
    let gw = subnet.addr().to_string();
    ns.ip(&[
        "neigh",
        "replace",
        &gw,
        "lladdr",
        vtep_mac,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ]);
    crate::run_ok(std::process::Command::new("bridge").args([
        "-n",
        ns.name(),
        "fdb",
        "append",
        vtep_mac,
        "dev",
        "flannel.1",
        "dst",
        &public_ip.to_string(),
    ]));
    ns.ip(&[
        "route",
        "add",
        &subnet.to_string(),
        "via",
        &gw,
        "dev",
        "flannel.1",
        "onlink",
    ]);
}

/// The vxlan fast path config for a host set up by [`kernel_vxlan_host`]; call inside
/// its namespace (it reads the ifindexes there).
pub fn vxlan_fast_path_config(
    public_ip: Ipv4Addr,
    subnet: Ipv4Net,
    vtep_mac: &str,
    pin_dir: PathBuf,
) -> FastPathConfig {
    FastPathConfig {
        vxlan_ifindex: ifindex("flannel.1"),
        underlay_ifindex: ifindex("eth0"),
        underlay_mtu: 1500,
        public_ip,
        vni: 1,
        port: 8472,
        vtep_mac: MacAddr::from_str(vtep_mac).unwrap(),
        subnet,
        pin_dir,
    }
}

/// A private bpf filesystem on a temporary directory, unmounted on drop (which also
/// releases whatever is still pinned there).
pub struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    /// Mounts a new bpffs on a fresh temporary directory.
    pub fn mount() -> PrivateBpffs {
        let dir = tempfile::Builder::new()
            .prefix("fltest-bpffs-")
            .tempdir()
            .expect("tempdir");
        crate::run_ok(
            std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(dir.path()),
        );
        PrivateBpffs { dir }
    }

    /// `flannel` directly under the mount: the pin directory for a single host.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("flannel")
    }

    /// `<host>/flannel` under the mount: a pin directory per host sharing the mount.
    pub fn host_pin_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(host).join("flannel")
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `count` pings from `from` to `to`, 0.2 s apart; panics unless ping succeeds.
pub fn ping(from: &NetNs, to: Ipv4Addr, count: u32) {
    from.exec_ok(&[
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "2",
        &to.to_string(),
    ]);
}

/// Sends `bytes` over TCP from `client` to a listener in `server` (port 5201); returns
/// what arrived.
pub fn tcp_transfer(server: &NetNs, server_ip: Ipv4Addr, client: &NetNs, bytes: usize) -> usize {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = in_netns(server, move || {
        let listener = std::net::TcpListener::bind((server_ip, 5201)).expect("bind");
        tx.send(()).unwrap();
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break total;
            }
            total += n;
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("listener ready");
    let cli = in_netns(client, move || {
        let mut s =
            std::net::TcpStream::connect_timeout(&(server_ip, 5201).into(), Duration::from_secs(5))
                .expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let chunk = vec![0x5au8; 65536];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            s.write_all(&chunk[..n]).expect("write");
            sent += n;
        }
    });
    cli.join().expect("client");
    srv.join().expect("server")
}

/// Sends `n` bytes over TCP from `a` to `b` (listening on `b_ip`), then from `b` to `a`
/// (listening on `a_ip`), asserting that each arrives whole.
#[track_caller]
pub fn tcp_both_ways(a: &NetNs, a_ip: Ipv4Addr, b: &NetNs, b_ip: Ipv4Addr, n: usize) {
    assert_eq!(tcp_transfer(b, b_ip, a, n), n);
    assert_eq!(tcp_transfer(a, a_ip, b, n), n);
}

/// True when running as root with the BPF object built; otherwise skips (or fails under
/// CI) with one reason for both.
pub fn require_root_and_bpf(test: &str) -> bool {
    if !require_root(test) || flannel_agent::dataplane::ebpf_object().is_err() {
        return skip(test, "requires root and a built BPF object");
    }
    true
}

/// A `struct __sk_buff` for `ctx_in` with only `gso_size` and `gso_segs` set.
pub fn skb_ctx_with_gso(gso_size: u32, gso_segs: u32) -> Vec<u8> {
    // uapi/linux/bpf.h: sizeof(struct __sk_buff) == 192, gso_segs at 164, gso_size at 176.
    let mut ctx = vec![0u8; 192];
    ctx[164..168].copy_from_slice(&gso_segs.to_ne_bytes());
    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    ctx
}

/// A `struct __sk_buff` for `ctx_in` that makes test_run receive the frame on device
/// `ifindex` (`eth_type_trans` against that device's MAC, `skb->ifindex`), with
/// `gso_size` and `gso_segs` as given.
pub fn skb_ctx_on(ifindex: u32, gso_size: u32, gso_segs: u32) -> Vec<u8> {
    // uapi/linux/bpf.h: ifindex at 40.
    let mut ctx = skb_ctx_with_gso(gso_size, gso_segs);
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// A fast path whose counters the tests read (the vxlan and the udp one).
pub trait FastPathCounters {
    /// The per-peer counters by subnet.
    fn peer_list(&self) -> Vec<(Ipv4Net, PeerCounters)>;
    /// The reason counters by name.
    fn reason_list(&self) -> Vec<(&'static str, u64)>;
}

impl FastPathCounters for VxlanFastPath {
    fn peer_list(&self) -> Vec<(Ipv4Net, PeerCounters)> {
        self.peer_counters().expect("read counters")
    }
    fn reason_list(&self) -> Vec<(&'static str, u64)> {
        self.drop_counters().expect("read reasons")
    }
}

impl FastPathCounters for HostGwFastPath {
    fn peer_list(&self) -> Vec<(Ipv4Net, PeerCounters)> {
        self.peer_counters().expect("read counters")
    }
    fn reason_list(&self) -> Vec<(&'static str, u64)> {
        self.drop_counters().expect("read reasons")
    }
}

impl FastPathCounters for UdpFastPath {
    fn peer_list(&self) -> Vec<(Ipv4Net, PeerCounters)> {
        self.peer_counters().expect("read counters")
    }
    fn reason_list(&self) -> Vec<(&'static str, u64)> {
        self.drop_counters().expect("read reasons")
    }
}

/// The counters of the peer for `subnet`; panics if there is no such peer.
pub fn counters_for(fp: &impl FastPathCounters, subnet: Ipv4Net) -> PeerCounters {
    fp.peer_list()
        .into_iter()
        .find(|(n, _)| *n == subnet)
        .map(|(_, c)| c)
        .expect("peer present")
}

/// The count of reason `name`; panics if there is no such reason.
pub fn reason_count(fp: &impl FastPathCounters, name: &str) -> u64 {
    fp.reason_list()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| c)
        .expect("reason present")
}

/// The reasons whose count is not zero.
pub fn nonzero_reasons(fp: &impl FastPathCounters) -> Vec<(&'static str, u64)> {
    fp.reason_list()
        .into_iter()
        .filter(|(_, c)| *c != 0)
        .collect()
}

/// A private namespace with an underlay `eth0` (a veth), the BPF object's programs
/// loaded and their maps, the test thread inside the namespace (test_run and the
/// programs' `bpf_fib_lookup` use the calling thread's namespace).
pub struct ProgLab {
    /// The loaded object.
    pub ebpf: Ebpf,
    /// `eth0`'s MAC.
    pub underlay_mac: [u8; 6],
    /// `eth0`'s ifindex.
    pub underlay_ifindex: u32,
    // Fields drop in order: this one before the namespace it refers to.
    _inside: InNetns,
    /// The namespace.
    pub ns: NetNs,
}

impl ProgLab {
    /// A namespace named after `ns_prefix` where `eth0` has `local`/24, forwarding is on
    /// and `peer` is a permanent neighbour at [`NEXT_HOP_MAC`] (so FIB lookups resolve
    /// deterministically), with `progs` loaded as classifiers. `None` (a skip) without
    /// root or without the BPF object.
    pub fn load(
        test_name: &str,
        ns_prefix: &str,
        local: Ipv4Addr,
        peer: Ipv4Addr,
        progs: &[&str],
    ) -> Option<ProgLab> {
        if !require_root(test_name) {
            return None;
        }
        let bytes = match flannel_agent::dataplane::ebpf_object() {
            Ok(b) => b,
            Err(e) => {
                skip(test_name, &e.to_string());
                return None;
            }
        };
        let ns = NetNs::new(ns_prefix);
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ]);
        ns.ip(&["addr", "add", &format!("{local}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["link", "set", "eth0p", "up"]);
        let next_hop_mac = NEXT_HOP_MAC.map(|b| format!("{b:02x}")).join(":");
        ns.ip(&[
            "neigh",
            "replace",
            &peer.to_string(),
            "lladdr",
            &next_hop_mac,
            "nud",
            "permanent",
            "dev",
            "eth0",
        ]);
        // Nodes forward (flannel needs it); the FIB helper insists on it.
        ns.exec_ok(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
        let underlay_mac = mac_of(&ns, "eth0");
        let inside = InNetns::enter(&ns);
        let underlay_ifindex = ifindex("eth0");
        let mut ebpf = Ebpf::load(bytes).expect("load the BPF object");
        for name in progs {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("program present")
                .try_into()
                .expect("classifier");
            prog.load()
                .unwrap_or_else(|e| panic!("verifier rejects {name}: {e:?}"));
        }
        Some(ProgLab {
            ebpf,
            underlay_mac,
            underlay_ifindex,
            _inside: inside,
            ns,
        })
    }

    /// Writes `cfg` as entry 0 of the array map `map`.
    pub fn set_config<T: Pod>(&mut self, map: &str, cfg: T) {
        let mut array: Array<_, T> = Array::try_from(self.ebpf.map_mut(map).unwrap()).unwrap();
        array.set(0, cfg, 0).unwrap();
    }

    /// Makes `net/len` a peer at underlay address `ip` with VTEP MAC `mac` and counter
    /// slot `slot`, in both the route trie and the sources map.
    pub fn set_peer(&mut self, net: Ipv4Addr, len: u8, ip: Ipv4Addr, mac: [u8; 6], slot: u32) {
        let mut trie: LpmTrie<_, u32, Peer> =
            LpmTrie::try_from(self.ebpf.map_mut(MAP_PEERS).unwrap()).unwrap();
        trie.insert(
            &Key::new(u32::from(len), be(net)),
            Peer {
                public_ip_be: be(ip),
                index: slot,
                vtep_mac: mac,
                _pad: [0; 2],
            },
            0,
        )
        .unwrap();
        let mut sources: HashMap<_, u32, PeerSource> =
            HashMap::try_from(self.ebpf.map_mut(MAP_SOURCES).unwrap()).unwrap();
        sources
            .insert(
                be(ip),
                PeerSource {
                    subnet_be: be(net),
                    mask_be: mask(len),
                    index: slot,
                    _pad: 0,
                },
                0,
            )
            .unwrap();
    }

    /// Runs `prog` on `frame`; returns the verdict and the output frame.
    pub fn run_ctx(&mut self, prog: &str, frame: &[u8], ctx: Option<&[u8]>) -> (u32, Vec<u8>) {
        self.try_run_ctx(prog, frame, ctx)
            .unwrap_or_else(|e| panic!("test_run of a {}-byte frame: {e}", frame.len()))
    }

    /// Like [`ProgLab::run_ctx`], but returns test_run's refusal (the kernel rejects, for
    /// example, IPv4 frames shorter than an IPv4 header before running anything).
    pub fn try_run_ctx(
        &mut self,
        prog: &str,
        frame: &[u8],
        ctx: Option<&[u8]>,
    ) -> Result<(u32, Vec<u8>), String> {
        let prog: &mut SchedClassifier = self.ebpf.program_mut(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ctx,
                ..TestRunOptions::default()
            })
            .map_err(|e| format!("{e:?}"))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// [`ProgLab::run_ctx`] without a context.
    pub fn run(&mut self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_ctx(prog, frame, None)
    }

    /// Runs a truncated frame: the program must pass it unchanged, or test_run refuses
    /// it up front (only allowed below the end of the outer IPv4 header).
    #[track_caller]
    pub fn expect_truncated(&mut self, prog: &str, frame: &[u8]) {
        match self.try_run_ctx(prog, frame, None) {
            Ok((verdict, out)) => {
                assert_eq!(verdict, TC_ACT_OK, "truncated to {}", frame.len());
                assert_eq!(out, frame, "truncated to {}: changed", frame.len());
            }
            Err(e) => assert!(
                frame.len() < 34,
                "test_run refused a {}-byte frame: {e}",
                frame.len()
            ),
        }
    }

    /// The reason counters, summed over CPUs, indexed by reason.
    pub fn reasons(&self) -> Vec<u64> {
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_REASONS).unwrap()).unwrap();
        (0..reason::COUNT)
            .map(|i| counters.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    /// The counters of peer slot `slot`, summed over CPUs.
    pub fn peer_counters(&self, slot: u32) -> PeerCounters {
        let counters: PerCpuArray<_, PeerCounters> =
            PerCpuArray::try_from(self.ebpf.map(MAP_PEER_COUNTERS).unwrap()).unwrap();
        counters
            .get(&slot, 0)
            .unwrap()
            .iter()
            .fold(PeerCounters::default(), |a, c| a.add(*c))
    }

    /// Runs `prog` on `frame` and asserts the verdict and which reason counter moved.
    #[track_caller]
    pub fn expect(&mut self, what: &str, prog: &str, frame: &[u8], verdict: u32, why: Option<u32>) {
        self.expect_ctx(what, prog, frame, None, verdict, why);
    }

    /// [`ProgLab::expect`] with a `ctx_in`; a packet not forwarded must come out
    /// unchanged.
    #[track_caller]
    pub fn expect_ctx(
        &mut self,
        what: &str,
        prog: &str,
        frame: &[u8],
        ctx: Option<&[u8]>,
        verdict: u32,
        why: Option<u32>,
    ) {
        let before = self.reasons();
        let (got, out) = self
            .try_run_ctx(prog, frame, ctx)
            .unwrap_or_else(|e| panic!("{what}: test_run: {e}"));
        assert_eq!(got, verdict, "{what}: verdict");
        let after = self.reasons();
        let moved: Vec<u32> = (0..reason::COUNT)
            .filter(|&i| after[i as usize] != before[i as usize])
            .collect();
        let expected: Vec<u32> = why.into_iter().collect();
        assert_eq!(
            moved,
            expected,
            "{what}: reason counters moved: {:?}",
            moved
                .iter()
                .map(|i| reason::NAMES[*i as usize])
                .collect::<Vec<_>>()
        );
        if verdict != TC_ACT_REDIRECT {
            assert_eq!(
                out, frame,
                "{what}: a packet not forwarded must be unchanged"
            );
        }
    }
}

/// The decap checks the vxlan and the udp fast path share, on frames from a known peer:
/// a spoofed inner source is dropped, also inside a GSO aggregate (anti-spoofing runs
/// before the GSO hand-off); a valid GSO aggregate goes to the kernel; an inner
/// destination outside our subnet is not ours to deliver.
#[track_caller]
pub fn expect_decap_inner_checks(
    lab: &mut ProgLab,
    prog: &str,
    good: &[u8],
    spoofed_inner: &[u8],
    not_local: &[u8],
) {
    lab.expect(
        "spoofed inner source",
        prog,
        spoofed_inner,
        TC_ACT_SHOT,
        Some(reason::DROP_INNER_SOURCE),
    );
    let gso = skb_ctx_with_gso(1400, 2);
    lab.expect_ctx(
        "GSO aggregate",
        prog,
        good,
        Some(&gso),
        TC_ACT_OK,
        Some(reason::PASS_GSO),
    );
    lab.expect_ctx(
        "spoofed inner source in a GSO aggregate",
        prog,
        spoofed_inner,
        Some(&gso),
        TC_ACT_SHOT,
        Some(reason::DROP_INNER_SOURCE),
    );
    lab.expect(
        "inner destination outside our subnet",
        prog,
        not_local,
        TC_ACT_OK,
        Some(reason::PASS_NOT_LOCAL),
    );
}

/// `BPF_F_NO_PREALLOC`, which the kernel requires of LPM tries.
const BPF_F_NO_PREALLOC: u32 = 1;

/// A layout directory (`v<N>`) of maps pinned by hand, as a flanneld of another layout
/// version would have left them: made with aya and filled before the agent looks. The
/// private bpffs it lives on releases the maps when it is unmounted.
pub struct LayoutDir {
    dir: PathBuf,
}

impl LayoutDir {
    /// Creates `dir` (and its parents).
    pub fn create(dir: PathBuf) -> LayoutDir {
        std::fs::create_dir_all(&dir).expect("create the layout directory");
        LayoutDir { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Pins array `name` with `max_entries` slots and `entries` set.
    pub fn array<V: Pod>(&self, name: &str, max_entries: u32, entries: &[(u32, V)]) {
        let mut map = Array::<MapData, V>::create(max_entries, 0).expect("create array");
        for (i, v) in entries {
            map.set(*i, v, 0).expect("set array entry");
        }
        map.pin(self.dir.join(name)).expect("pin array");
    }

    /// Pins per-CPU array `name` with `max_entries` slots and `entries` set, one value
    /// per CPU (see [`per_cpu`]).
    pub fn per_cpu_array<V: Pod>(&self, name: &str, max_entries: u32, entries: &[(u32, Vec<V>)]) {
        let mut map =
            PerCpuArray::<MapData, V>::create(max_entries, 0).expect("create per-CPU array");
        for (i, values) in entries {
            let values = PerCpuValues::try_from(values.clone()).expect("one value per CPU");
            map.set(*i, values, 0).expect("set per-CPU entry");
        }
        map.pin(self.dir.join(name)).expect("pin per-CPU array");
    }

    /// Pins hash map `name` of `max_entries` with `entries`.
    pub fn hash<K: Pod, V: Pod>(&self, name: &str, max_entries: u32, entries: &[(K, V)]) {
        let mut map = HashMap::<MapData, K, V>::create(max_entries, 0).expect("create hash");
        for (k, v) in entries {
            map.insert(k, v, 0).expect("insert hash entry");
        }
        map.pin(self.dir.join(name)).expect("pin hash");
    }

    /// Pins LPM trie `name` of `max_entries` with `entries`.
    pub fn lpm_trie<K: Pod, V: Pod>(&self, name: &str, max_entries: u32, entries: &[(Key<K>, V)]) {
        let mut map = LpmTrie::<MapData, K, V>::create(max_entries, BPF_F_NO_PREALLOC)
            .expect("create LPM trie");
        for (k, v) in entries {
            map.insert(k, v, 0).expect("insert LPM entry");
        }
        map.pin(self.dir.join(name)).expect("pin LPM trie");
    }
}

/// One value per possible CPU, `f(cpu)` each: distinct values show that a per-CPU copy
/// kept every CPU's own.
pub fn per_cpu<V>(f: impl Fn(u64) -> V) -> Vec<V> {
    let cpus = nr_cpus().expect("number of CPUs");
    (0..cpus as u64).map(f).collect()
}

/// The map pinned at `path` as aya's typed map `T` (for example
/// `Array<MapData, Config>`); panics when it is not there or has other sizes.
pub fn open_pinned<T>(path: &Path) -> T
where
    T: TryFrom<Map>,
    T::Error: std::fmt::Debug,
{
    let data = MapData::from_pin(path)
        .unwrap_or_else(|e| panic!("open pinned map {}: {e}", path.display()));
    let map = Map::from_map_data(data).expect("a known map type");
    T::try_from(map).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
}

/// The entries of the peer map and the source map for peer `subnet` at `public_ip` with
/// VtepMAC `vtep_mac` in counter slot `slot`, as the agent writes them.
pub fn peer_map_entries(
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
    vtep_mac: [u8; 6],
    slot: u32,
) -> ((Key<u32>, Peer), (u32, PeerSource)) {
    (
        (
            Key::new(u32::from(subnet.prefix_len()), be(subnet.addr())),
            Peer {
                public_ip_be: be(public_ip),
                index: slot,
                vtep_mac,
                _pad: [0; 2],
            },
        ),
        (
            be(public_ip),
            PeerSource {
                subnet_be: be(subnet.addr()),
                mask_be: mask(subnet.prefix_len()),
                index: slot,
                _pad: 0,
            },
        ),
    )
}

/// What the calling thread logs through `tracing` while this lives (other threads are
/// not affected).
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

/// A writer into a [`LogCapture`]'s buffer.
struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Starts capturing the calling thread's events of level INFO and above.
    pub fn start() -> LogCapture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || CaptureWriter(Arc::clone(&writer)))
            .finish();
        LogCapture {
            buf,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().expect("log buffer")).into_owned()
    }

    /// The captured lines at WARN level.
    pub fn warnings(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(" WARN "))
            .map(str::to_owned)
            .collect()
    }
}
