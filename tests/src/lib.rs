//! Test fixtures: a real etcd, network namespaces, child processes; all cleaned up on drop.
//!
//! Every fixture is an RAII guard: whatever it creates (processes, namespaces, links inside
//! them, temporary directories) is removed in `Drop`, so a panicking test leaves nothing
//! behind. Nothing here touches the host's own interfaces, routes or firewall: links are
//! created inside namespaces the fixtures own, and etcd on the host listens on loopback only.
//!
//! Privileged tests start with [`require_root`] (and [`require_binary`] for tools such as
//! `etcd`): outside CI a missing privilege is a skip with a reason, under `CI=true` it is a
//! failure, so CI can never go green without running them.

use std::{
    fs,
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use tempfile::TempDir;

pub mod bpf;
pub mod packet;

/// True when running under CI (`CI=true`), where a skipped privileged test is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Skips `test_name` with `reason` (returns false), or panics under CI.
///
/// The message goes straight to the process's stderr rather than through `eprintln!`,
/// which the test harness captures and hides for passing tests: a skip must be visible.
pub fn skip(test_name: &str, reason: &str) -> bool {
    use std::io::Write as _;
    assert!(
        !under_ci(),
        "{test_name}: {reason}; under CI=true a skipped test is a failure"
    );
    let _ = writeln!(std::io::stderr(), "skipping {test_name}: {reason}");
    false
}

/// True when running as root; otherwise skips (or fails under CI) with a clear reason.
pub fn require_root(test_name: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(
        test_name,
        "requires root (run as root, e.g. via cargo xtask test)",
    )
}

/// True when `name` is an executable on `PATH`; otherwise skips (or fails under CI).
pub fn require_binary(name: &str, test_name: &str) -> bool {
    if find_binary(name).is_some() {
        return true;
    }
    skip(
        test_name,
        &format!("requires the `{name}` binary on PATH (install it with cargo xtask setup)"),
    )
}

/// Looks `name` up on `PATH` (plus the sbin directories, which a non-login root shell may lack).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The built `flanneld` binary.
///
/// `CARGO_BIN_EXE_flanneld` only exists inside the crate that defines the binary, so this
/// finds it next to the test executable (`target/<profile>/deps/<test>` →
/// `target/<profile>/flanneld`), or takes it from `FLANNELD_BIN`. It never builds it:
/// `cargo xtask test` runs `cargo build --bins` before the tests. Panics with that advice
/// when the binary is missing.
pub fn flanneld_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLANNELD_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join("flanneld"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    candidates.push(target.join("debug/flanneld"));
    candidates.push(target.join("release/flanneld"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "flanneld binary not found (looked at {candidates:?}): run `cargo build --bins` \
                 first, or use `cargo xtask test`, which does"
            )
        })
}

/// A free TCP port on 127.0.0.1: bound to port 0, then released for the caller to use.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Runs a command to completion, capturing its output. Panics if it cannot be spawned.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its stderr unless it succeeds; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// A spawned process whose stdout and stderr go to a log file; killed and reaped on drop.
///
/// The log survives in a temporary directory for assertions while the guard lives; if the
/// test is panicking when the guard drops, the log's tail is printed to help diagnose it.
pub struct Child {
    name: String,
    child: std::process::Child,
    log_path: PathBuf,
    // Keeps the log directory alive when the guard owns it.
    _dir: Option<TempDir>,
}

impl Child {
    /// Spawns `cmd` with output to a log file in a fresh temporary directory.
    pub fn spawn(name: &str, cmd: Command) -> Child {
        let dir = tempfile::Builder::new()
            .prefix("fltest-log-")
            .tempdir()
            .expect("create log dir");
        let log_path = dir.path().join(format!("{name}.log"));
        let mut child = Self::spawn_logged(name, cmd, &log_path);
        child._dir = Some(dir);
        child
    }

    /// Spawns `cmd` with output to `log_path` (whose directory the caller keeps alive).
    pub fn spawn_logged(name: &str, mut cmd: Command, log_path: &Path) -> Child {
        let log = fs::File::create(log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("clone log file handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        Child {
            name: name.to_owned(),
            child,
            log_path: log_path.to_owned(),
            _dir: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where stdout and stderr are written.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            // Lossy on purpose: a log is for humans and substring checks.
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            s = String::from_utf8_lossy(&bytes).into_owned();
        }
        s
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits until a log line contains `needle` and returns that line. Returns `Err` with
    /// the whole log when `timeout` passes or the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = self.try_wait() {
                // One last read: the line may have been written just before exiting.
                let log = self.log();
                if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                    return Ok(line.to_owned());
                }
                return Err(format!(
                    "{} exited ({status}) before logging {needle:?}; log:\n{log}",
                    self.name
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not log {needle:?} within {timeout:?}; log:\n{log}",
                    self.name
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Like [`Child::wait_for_log`], panicking with the log on failure.
    pub fn expect_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log(needle, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) only sends a signal; `pid` is our own child, not yet reaped
        // (we hold the `std::process::Child`), so the pid cannot have been reused.
        unsafe { libc::kill(pid, signal) };
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; `None` if it did not exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        wait_until(timeout, || self.try_wait())
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    #[expect(
        clippy::print_stderr,
        reason = "the log of a failed test's process is its evidence"
    )]
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "---- last lines of {} ({}) ----",
                self.name,
                self.log_path.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("---- end of {} ----", self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// A uniquely named network namespace (`fltest-<prefix>-<pid>-<n>`) with `lo` up.
///
/// On drop every process inside it is killed and the namespace is deleted, which also
/// removes every link inside it (a veth pair dies with either end).
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace. Needs root.
    pub fn new(prefix: &str) -> NetNs {
        let n = NETNS_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("fltest-{prefix}-{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        // Constructed before the next command so a failure still deletes the namespace.
        let ns = NetNs { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec NAME program`).
    /// `ip netns exec` execs the program, so the spawned pid is the program's own.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` (program first) inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("exec needs a program");
        run(self.command(program).args(rest))
    }

    /// Like [`NetNs::exec`], panicking with stderr on failure; returns stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let (program, rest) = args.split_first().expect("exec_ok needs a program");
        run_ok(self.command(program).args(rest))
    }

    /// Runs `ip -n NAME <args>` (no process inside the namespace needed).
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = run(Command::new("ip").args(["netns", "pids", &self.name]));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Kill what still runs inside, then delete. A namespace lives on while a process
        // holds it, so the kill comes first; the wait bounds a slow exit.
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) only sends a signal. The pid was listed as inside our own
                // test namespace a moment ago; at worst it has exited and the call fails.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Connects two namespaces with a veth pair and gives each end an address (CIDR form,
/// e.g. `10.0.0.1/24`) and brings both up. The pair is created inside `a`, so the host's
/// own namespace never sees it; it disappears when either namespace is deleted.
pub fn veth_pair(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A "physical network": a namespace holding a bridge (`br0`, address `<prefix>.1/24`) to
/// which host namespaces attach over veth pairs with addresses `<prefix>.2`, `.3`, ...
///
/// Each test's underlay is its own namespace, so several tests may use the same prefix in
/// parallel. Typical use: etcd runs in the underlay on `<prefix>.1`, a flanneld per host.
pub struct Underlay {
    ns: NetNs,
    prefix: String,
    next_host: u8,
}

/// The name of the underlay bridge inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

impl Underlay {
    /// Creates the underlay namespace and its bridge. `prefix` is three octets, e.g. `10.99.0`.
    pub fn new(prefix: &str) -> Underlay {
        let ns = NetNs::new("ul");
        ns.ip(&["link", "add", UNDERLAY_BRIDGE, "type", "bridge"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{prefix}.1/24"),
            "dev",
            UNDERLAY_BRIDGE,
        ]);
        ns.ip(&["link", "set", UNDERLAY_BRIDGE, "up"]);
        Underlay {
            ns,
            prefix: prefix.to_owned(),
            next_host: 2,
        }
    }

    /// The underlay namespace (where the bridge, and typically etcd, live).
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The bridge's own address, `<prefix>.1`.
    pub fn gateway(&self) -> Ipv4Addr {
        format!("{}.1", self.prefix).parse().expect("valid prefix")
    }

    /// Attaches `host` through a veth pair: `ifname` inside `host` with the next free
    /// address (returned), the other end enslaved to the bridge. A default route via the
    /// bridge address is added in `host`, so flanneld's default interface choice finds
    /// `ifname`.
    pub fn attach(&mut self, host: &NetNs, ifname: &str) -> Ipv4Addr {
        let n = self.next_host;
        assert!(n < 255, "underlay {} is full", self.prefix);
        self.next_host += 1;
        let addr: Ipv4Addr = format!("{}.{n}", self.prefix)
            .parse()
            .expect("valid prefix");
        let port = format!("ulp{n}");
        host.ip(&[
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.ns.name(),
        ]);
        host.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname]);
        host.ip(&["link", "set", ifname, "up"]);
        self.ns
            .ip(&["link", "set", &port, "master", UNDERLAY_BRIDGE]);
        self.ns.ip(&["link", "set", &port, "up"]);
        host.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ]);
        addr
    }
}

// ---------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------

/// TLS material for [`EtcdOptions::tls`]; paths to PEM files.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// Server certificate (`--cert-file`).
    pub cert_file: PathBuf,
    /// Server key (`--key-file`).
    pub key_file: PathBuf,
    /// CA that signed the server and client certificates (`--trusted-ca-file`, etcdctl `--cacert`).
    pub trusted_ca_file: PathBuf,
    /// Require client certificates (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// Client certificate and key the fixture's etcdctl uses (health check and helpers);
    /// needed when `client_cert_auth` is set.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// How to start etcd; `EtcdOptions::default()` is plain HTTP on free loopback ports.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// Serve HTTPS with these files; client URLs become `https://`.
    pub tls: Option<EtcdTls>,
    /// Run inside this namespace (`ip netns exec NAME etcd ...`), listening on `listen_ip`
    /// (default 127.0.0.1). Ports default to 2379/2380 there, since the namespace is ours.
    pub netns: Option<String>,
    /// Address to listen on; default 127.0.0.1.
    pub listen_ip: Option<IpAddr>,
    /// Client port; default: a free one (host) or 2379 (namespace).
    pub client_port: Option<u16>,
    /// Extra etcd arguments, appended last.
    pub extra_args: Vec<String>,
}

/// A real etcd (Debian's etcd-server 3.4) in a temporary data directory; killed on drop.
pub struct Etcd {
    child: Child,
    endpoint: String,
    opts: EtcdOptions,
    // Holds the data dir and the log until the fixture is dropped.
    dir: TempDir,
}

impl Etcd {
    /// Starts a plain-HTTP etcd on free loopback ports and waits until it answers.
    pub fn start() -> Etcd {
        Self::start_with(EtcdOptions::default())
    }

    /// Starts etcd in `ns`, listening on `ip` (ports 2379/2380).
    pub fn start_in(ns: &NetNs, ip: IpAddr) -> Etcd {
        Self::start_with(EtcdOptions {
            netns: Some(ns.name().to_owned()),
            listen_ip: Some(ip),
            ..EtcdOptions::default()
        })
    }

    /// Starts etcd with `opts` and waits until `etcdctl endpoint health` succeeds.
    ///
    /// Free ports are picked by binding port 0 and releasing it, which another process can
    /// grab in between; a start that fails is therefore retried with fresh ports.
    pub fn start_with(opts: EtcdOptions) -> Etcd {
        let mut last_err = String::new();
        for _ in 0..3 {
            match Self::try_start(&opts) {
                Ok(etcd) => return etcd,
                Err(e) => last_err = e,
            }
        }
        panic!("etcd did not start: {last_err}");
    }

    fn try_start(opts: &EtcdOptions) -> Result<Etcd, String> {
        let in_ns = opts.netns.is_some();
        let ip = opts.listen_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let client_port = opts
            .client_port
            .unwrap_or_else(|| if in_ns { 2379 } else { free_port() });
        let peer_port = if in_ns { client_port + 1 } else { free_port() };
        let scheme = if opts.tls.is_some() { "https" } else { "http" };
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        let client_url = format!("{scheme}://{host}:{client_port}");
        let peer_url = format!("http://{host}:{peer_port}");

        let dir = tempfile::Builder::new()
            .prefix("fltest-etcd-")
            .tempdir()
            .map_err(|e| format!("create etcd dir: {e}"))?;
        let data_dir = dir.path().join("data");
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        cmd.arg("--name=fltest")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=fltest={peer_url}"))
            .arg("--initial-cluster-state=new")
            // Tests run many etcds on a small machine: no fsync stalls needed for
            // correctness of throwaway data.
            .arg("--unsafe-no-fsync");
        if let Some(tls) = &opts.tls {
            cmd.arg(format!("--cert-file={}", tls.cert_file.display()))
                .arg(format!("--key-file={}", tls.key_file.display()));
            // etcd 3.4 demands client certificates whenever it has a trusted CA, so a
            // server-only TLS etcd gets none (etcdctl still verifies with `--cacert`).
            if tls.client_cert_auth {
                cmd.arg(format!(
                    "--trusted-ca-file={}",
                    tls.trusted_ca_file.display()
                ))
                .arg("--client-cert-auth");
            }
        }
        cmd.args(&opts.extra_args);
        let child = Child::spawn_logged("etcd", cmd, &dir.path().join("etcd.log"));
        let mut etcd = Etcd {
            child,
            endpoint: client_url,
            opts: opts.clone(),
            dir,
        };
        etcd.wait_ready(Duration::from_secs(20))?;
        Ok(etcd)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        // Without a namespace a TCP connect is a cheap first gate before running etcdctl.
        let addr: Option<SocketAddr> = if self.opts.netns.is_none() {
            self.endpoint
                .split("://")
                .nth(1)
                .and_then(|hp| {
                    hp.replace(['[', ']'], "")
                        .rsplit_once(':')
                        .map(|(h, p)| (h.to_owned(), p.to_owned()))
                })
                .and_then(|(h, p)| Some(SocketAddr::new(h.parse().ok()?, p.parse().ok()?)))
        } else {
            None
        };
        loop {
            if let Some(status) = self.child.try_wait() {
                return Err(format!("etcd exited ({status}); log:\n{}", self.log()));
            }
            let reachable = addr
                .is_none_or(|a| TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok());
            if reachable
                && self
                    .etcdctl(&["endpoint", "health", "--command-timeout=2s"])
                    .status
                    .success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd not healthy within {timeout:?}; log:\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// etcd's own log so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// The temporary directory holding the data dir and log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The etcd process's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// A `Command` for etcdctl (v3 API) against this etcd, in its namespace, with its TLS
    /// flags; add the subcommand's arguments.
    pub fn etcdctl_command(&self) -> Command {
        let mut cmd = match &self.opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint));
        if let Some(tls) = &self.opts.tls {
            cmd.arg(format!("--cacert={}", tls.trusted_ca_file.display()));
            if let Some((cert, key)) = &tls.client_cert {
                cmd.arg(format!("--cert={}", cert.display()))
                    .arg(format!("--key={}", key.display()));
            }
        }
        cmd
    }

    /// Runs etcdctl with `args` and returns its output (success or not).
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        run(self.etcdctl_command().args(args))
    }

    /// Runs etcdctl with `args`, panicking with stderr on failure; returns stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        run_ok(self.etcdctl_command().args(args))
    }

    /// Puts `value` at `key`.
    pub fn put(&self, key: &str, value: &str) {
        // `--` so values starting with '-' are not taken for flags.
        self.etcdctl_ok(&["put", "--", key, value]);
    }

    /// The value at `key`, or `None` when it does not exist.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl_ok(&["get", "--print-value-only", "--", key]);
        // etcdctl prints the value followed by a newline; nothing at all for a missing key.
        if out.is_empty() {
            return None;
        }
        Some(out.strip_suffix('\n').unwrap_or(&out).to_owned())
    }

    /// Deletes `key`; returns how many keys were deleted.
    pub fn delete(&self, key: &str) -> u64 {
        self.etcdctl_ok(&["del", "--", key])
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Kills etcd (SIGKILL) without removing its data, e.g. to test a lost datastore.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // The Child guard kills and reaps the process (printing its log if panicking);
        // the TempDir then removes the data dir.
        self.child.kill();
    }
}

// ---------------------------------------------------------------------------------------
// Overlay hosts and containers (backend tests)
// ---------------------------------------------------------------------------------------

/// A flanneld "host": a namespace attached to an underlay as `eth0`, with a directory for
/// its subnet.env, state and logs, and IPv4 forwarding on (as a node routing for its
/// containers needs).
pub struct OverlayHost {
    pub ns: NetNs,
    /// The underlay address (flanneld's PublicIP).
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
}

impl OverlayHost {
    /// Creates host number `i` under `root`.
    pub fn new(underlay: &mut Underlay, i: usize, root: &Path) -> OverlayHost {
        let ns = NetNs::new(&format!("h{i}"));
        let ip = underlay.attach(&ns, "eth0");
        ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let dir = root.join(format!("host{i}"));
        let bpffs = dir.join("bpffs");
        fs::create_dir_all(&bpffs).expect("create host dir");
        let host = OverlayHost { ns, ip, dir };
        run_ok(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs));
        host
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts flanneld in the host against `etcd` (`--iface=eth0`, our subnet file, state
    /// dir and pin dir, no health server), with `extra` flags; its log goes to a new file
    /// in the host directory.
    pub fn flanneld(&self, etcd: &Etcd, extra: &[&str]) -> Child {
        self.flanneld_with_env(etcd, extra, &[])
    }

    /// [`OverlayHost::flanneld`] with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn flanneld_with_env(&self, etcd: &Etcd, extra: &[&str], env: &[(&str, &Path)]) -> Child {
        static RUN: AtomicU32 = AtomicU32::new(0);
        let mut cmd = self.ns.command(flanneld_bin());
        self.flanneld_args(&mut cmd, etcd, extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let n = RUN.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.join(format!("flanneld-{n}.log"));
        Child::spawn_logged("flanneld", cmd, &log)
    }

    /// The flags and environment every flanneld of this host gets, then `extra`.
    fn flanneld_args(&self, cmd: &mut Command, etcd: &Etcd, extra: &[&str]) {
        cmd.arg(format!("--etcd-endpoints={}", etcd.endpoint()))
            .arg("--iface=eth0")
            .arg(format!("--subnet-file={}", self.subnet_file().display()))
            .arg(format!("--state-dir={}", self.state_dir().display()))
            .arg(format!("--bpf-pin-dir={}", self.pin_dir().display()))
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET");
    }

    /// (tx, rx) packets `flanneld status` reports for the peer with `subnet`.
    pub fn peer_packets(&self, subnet: &str) -> Option<(u64, u64)> {
        let st = self.status();
        let peer = st["peers"]
            .as_array()?
            .iter()
            .find(|p| p["subnet"] == subnet)?
            .clone();
        Some((peer["tx_packets"].as_u64()?, peer["rx_packets"].as_u64()?))
    }

    /// The packets `flanneld status` counts for the fast path's verdict `action`
    /// (`drop`, `pass`, ...) with `reason`; 0 when not listed.
    pub fn verdict_packets(&self, action: &str, reason: &str) -> u64 {
        self.status()["verdicts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["action"] == action && v["reason"] == reason)
            .and_then(|v| v["packets"].as_u64())
            .unwrap_or(0)
    }

    /// GETs `path` from flanneld's health server on 127.0.0.1:`port` inside the host.
    pub fn http_get(&self, port: u16, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        );
        String::from_utf8_lossy(&self.ns.exec(&["bash", "-c", &script]).stdout).into_owned()
    }

    /// `flanneld status --json` for this host's flanneld, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = run(Command::new(flanneld_bin())
            .arg("status")
            .arg("--json")
            .arg(format!("--subnet-file={}", self.subnet_file().display())));
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// This host's pin directory, on a private bpffs mounted in the host directory:
    /// pins are machine-wide, not per network namespace, and tests leave /sys/fs/bpf alone.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.join("bpffs/flannel")
    }

    /// Configures the host exactly as Go flanneld would for its own lease `subnet` with
    /// `mac`: the device, its MAC before it comes up, the `.0/32` address.
    pub fn go_flannel_device(&self, subnet: &str, mac: &str) {
        let ip = self.ip.to_string();
        self.ns.ip(&[
            "link",
            "add",
            "flannel.1",
            "address",
            mac,
            "mtu",
            "1450",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &ip,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ]);
        let addr = format!("{}/32", host_addr(subnet, 0));
        self.ns.ip(&["addr", "add", &addr, "dev", "flannel.1"]);
        self.ns.ip(&["link", "set", "flannel.1", "up"]);
    }

    /// Go flanneld's entries for a peer, in its order: neigh, fdb, route.
    pub fn go_flannel_peer(&self, subnet: &str, mac: &str, public: &str) {
        let gw = host_addr(subnet, 0).to_string();
        self.ns.ip(&[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ]);
        self.ns.exec_ok(&[
            "bridge",
            "fdb",
            "replace",
            mac,
            "dev",
            "flannel.1",
            "self",
            "dst",
            public,
            "permanent",
        ]);
        self.ns.ip(&[
            "route",
            "replace",
            subnet,
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ]);
    }

    /// `FLANNEL_SUBNET` from subnet.env as the subnet (`10.5.7.1/24` → `10.5.7.0/24`),
    /// waiting up to `timeout` for the file.
    pub fn leased_subnet(&self, timeout: Duration) -> String {
        let text = wait_until(timeout, || fs::read_to_string(self.subnet_file()).ok())
            .unwrap_or_else(|| panic!("{} not written", self.subnet_file().display()));
        let sub = text
            .lines()
            .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
            .unwrap_or_else(|| panic!("no FLANNEL_SUBNET in {text}"));
        subnet_of(sub)
    }
}

impl OverlayHost {
    /// [`OverlayHost::flanneld`] run through `wrapper` (e.g. `setpriv` with dropped
    /// capabilities): `ip netns exec <ns> <wrapper...> flanneld <flags>`.
    pub fn flanneld_wrapped(&self, etcd: &Etcd, wrapper: &[&str], extra: &[&str]) -> Child {
        static RUN: AtomicU32 = AtomicU32::new(0);
        let (program, rest) = wrapper.split_first().expect("a wrapper program");
        let mut cmd = self.ns.command(program);
        cmd.args(rest).arg(flanneld_bin());
        self.flanneld_args(&mut cmd, etcd, extra);
        let n = RUN.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.join(format!("flanneld-wrapped-{n}.log"));
        Child::spawn_logged("flanneld", cmd, &log)
    }
}

/// The etcd prefix flanneld uses by default.
pub const ETCD_PREFIX: &str = "/coreos.com/network";

/// `10.5.7.0/24` → the etcd key of that lease under [`ETCD_PREFIX`].
pub fn lease_key(subnet: &str) -> String {
    format!("{ETCD_PREFIX}/subnets/{}", subnet.replace('/', "-"))
}

/// The `VtepMAC` in the lease of `subnet`.
pub fn vtep_mac_in_lease(etcd: &Etcd, subnet: &str) -> String {
    let lease = etcd.get(&lease_key(subnet)).expect("lease exists");
    let mac = lease
        .split("\"VtepMAC\":\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no VtepMAC in {lease}"));
    mac[..17].to_owned()
}

/// An underlay with etcd on it (config written) and `n` flanneld hosts attached.
pub struct OverlayCluster {
    // Dropped in order of declaration: hosts before the underlay holding etcd.
    pub hosts: Vec<OverlayHost>,
    pub etcd: Etcd,
    pub underlay: Underlay,
    _tmp: TempDir,
}

impl OverlayCluster {
    /// Builds the cluster, or returns `None` after [`require_root`] / [`require_binary`]
    /// skipped the test.
    pub fn new(test: &str, n: usize, config: &str) -> Option<OverlayCluster> {
        if !require_root(test) || !require_binary("etcd", test) {
            return None;
        }
        let mut underlay = Underlay::new("10.99.0");
        let etcd = Etcd::start_in(underlay.ns(), underlay.gateway().into());
        etcd.put(&format!("{ETCD_PREFIX}/config"), config);
        let tmp = tempfile::tempdir().expect("tempdir");
        let hosts = (0..n)
            .map(|i| OverlayHost::new(&mut underlay, i, tmp.path()))
            .collect();
        Some(OverlayCluster {
            hosts,
            etcd,
            underlay,
            _tmp: tmp,
        })
    }
}

impl OverlayCluster {
    /// Makes `host` a Go flanneld node by hand: its lease for `subnet` in Go's JSON,
    /// byte for byte, with VtepMAC `mac`, and its kernel device
    /// ([`OverlayHost::go_flannel_device`]).
    pub fn go_flannel_node(&self, host: &OverlayHost, subnet: &str, mac: &str) {
        self.put_go_vxlan_lease(host.ip, subnet, mac);
        host.go_flannel_device(subnet, mac);
    }

    /// Writes a vxlan lease for `subnet` as Go flanneld does, with PublicIP `public`
    /// and VtepMAC `mac`.
    pub fn put_go_vxlan_lease(&self, public: Ipv4Addr, subnet: &str, mac: &str) {
        self.etcd.put(
            &lease_key(subnet),
            &format!(
                r#"{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
            ),
        );
    }

    /// Starts flanneld on hosts 0 and 1 with `extra_a` and `extra_b` (both spawned before
    /// either is waited for), waits for both to be ready, and returns each with its
    /// leased subnet.
    pub fn start_two(
        &self,
        extra_a: &[&str],
        extra_b: &[&str],
    ) -> ((Child, String), (Child, String)) {
        let (a, b) = (&self.hosts[0], &self.hosts[1]);
        let mut fa = a.flanneld(&self.etcd, extra_a);
        let mut fb = b.flanneld(&self.etcd, extra_b);
        fa.expect_log("flanneld is ready", FLANNELD_READY);
        fb.expect_log("flanneld is ready", FLANNELD_READY);
        let (sa, sb) = (
            a.leased_subnet(FLANNELD_READY),
            b.leased_subnet(FLANNELD_READY),
        );
        ((fa, sa), (fb, sb))
    }
}

/// How long flanneld may take to report ready (and to lease a subnet).
pub const FLANNELD_READY: Duration = Duration::from_secs(30);

/// True when the BPF object is built into flanneld; otherwise skips (or fails under CI).
pub fn require_ebpf(test: &str) -> bool {
    if flannel_agent::dataplane::ebpf_object().is_ok() {
        return true;
    }
    skip(test, "the BPF object is not built (cargo xtask build-ebpf)")
}

impl Drop for OverlayHost {
    fn drop(&mut self) {
        // Pinned maps and links outlive flanneld on purpose; a test host's go with its
        // private bpffs.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.join("bpffs"))
            .stderr(Stdio::null())
            .status();
    }
}

/// `10.5.7.1/24` → `10.5.7.0/24` (IPv4, any prefix length).
pub fn subnet_of(cidr: &str) -> String {
    let (ip, len) = cidr.split_once('/').expect("CIDR");
    let ip: Ipv4Addr = ip.parse().expect("IPv4");
    let len: u32 = len.parse().expect("prefix length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    format!("{}/{len}", Ipv4Addr::from(u32::from(ip) & mask))
}

/// Address `n` of a subnet in CIDR form: `host_addr("10.5.7.0/24", 2)` → `10.5.7.2`.
pub fn host_addr(subnet: &str, n: u32) -> Ipv4Addr {
    let ip: Ipv4Addr = subnet
        .split('/')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("subnet");
    Ipv4Addr::from(u32::from(ip) + n)
}

/// A "container" behind a host, wired as a CNI bridge plugin would: bridge `cni0` in the
/// host with the subnet's `.1`, a veth into the container, which gets `.2` and a default
/// route via `.1`.
pub struct Container {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
}

impl Container {
    pub fn new(host: &OverlayHost, subnet: &str) -> Container {
        let len = subnet.split('/').nth(1).expect("prefix length");
        let gw = host_addr(subnet, 1);
        let ip = host_addr(subnet, 2);
        let ns = NetNs::new("ct");
        host.ns.ip(&["link", "add", "cni0", "type", "bridge"]);
        host.ns
            .ip(&["addr", "add", &format!("{gw}/{len}"), "dev", "cni0"]);
        host.ns.ip(&["link", "set", "cni0", "up"]);
        host.ns.ip(&[
            "link",
            "add",
            "vethct",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        host.ns.ip(&["link", "set", "vethct", "master", "cni0"]);
        host.ns.ip(&["link", "set", "vethct", "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/{len}"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &gw.to_string()]);
        Container { ns, ip }
    }

    /// Pings `to` until one reply comes back or `timeout` passes.
    pub fn can_ping(&self, to: Ipv4Addr, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.ns
                .exec(&["ping", "-c1", "-W1", &to.to_string()])
                .status
                .success()
                .then_some(())
        })
        .is_some()
    }

    /// Runs a 2 MB iperf3 TCP transfer to `server` (which must be running
    /// [`Container::iperf3_server`]), retrying while the server starts. `reverse` sends from
    /// the server to us. Panics with iperf3's output on failure.
    pub fn tcp_transfer(&self, server: &Container, reverse: bool) {
        let target = server.ip.to_string();
        let mut args = vec![
            "timeout",
            "20",
            "iperf3",
            "-c",
            &target,
            "-n",
            "2M",
            "--connect-timeout",
            "2000",
        ];
        if reverse {
            args.push("-R");
        }
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(20), || {
            let out = self.ns.exec(&args);
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out.status.success().then_some(())
        });
        assert!(
            ok.is_some(),
            "iperf3 to {target} (reverse={reverse}) failed:\n{last}"
        );
    }

    /// Starts an iperf3 server in the container; stopped when the guard drops.
    pub fn iperf3_server(&self) -> Child {
        let mut cmd = self.ns.command("iperf3");
        cmd.args(["-s", "--bind", &self.ip.to_string()]);
        Child::spawn("iperf3", cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port just released is bindable");
    }

    #[test]
    fn child_log_and_exit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello-out; echo hello-err >&2; exit 3"]);
        let mut child = Child::spawn("sh", cmd);
        assert_eq!(
            child.expect_log("hello-err", Duration::from_secs(10)),
            "hello-err"
        );
        let status = wait_until(Duration::from_secs(10), || child.try_wait()).expect("exits");
        assert_eq!(status.code(), Some(3));
        assert!(child.log().contains("hello-out"));
        let err = child
            .wait_for_log("never-printed", Duration::from_secs(5))
            .expect_err("exited process cannot log more");
        assert!(err.contains("exited"), "{err}");
    }

    #[test]
    fn child_is_killed_on_drop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let child = Child::spawn("sleep", cmd);
        let pid = child.pid();
        drop(child);
        // Reaped by the guard, so /proc/<pid> is gone (pid reuse within this window is
        // practically impossible).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn etcd_put_get() {
        if !require_root("etcd_put_get") || !require_binary("etcd", "etcd_put_get") {
            return;
        }
        let etcd = Etcd::start();
        assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
        assert_eq!(etcd.get("/fltest/missing"), None);
        etcd.put("/fltest/k", "{\"a\":1}");
        assert_eq!(etcd.get("/fltest/k").as_deref(), Some("{\"a\":1}"));
        assert_eq!(etcd.delete("/fltest/k"), 1);
        assert_eq!(etcd.get("/fltest/k"), None);
    }

    #[test]
    fn netns_veth_and_underlay() {
        if !require_root("netns_veth_and_underlay") {
            return;
        }
        let a = NetNs::new("a");
        let b = NetNs::new("b");
        let a_name = a.name().to_owned();
        veth_pair(&a, "va", "10.77.0.1/24", &b, "vb", "10.77.0.2/24");
        a.exec_ok(&["ping", "-c1", "-W2", "10.77.0.2"]);

        let mut ul = Underlay::new("10.99.0");
        let h1 = NetNs::new("h1");
        let h2 = NetNs::new("h2");
        let ip1 = ul.attach(&h1, "eth0");
        let ip2 = ul.attach(&h2, "eth0");
        assert_eq!(ip1, Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(ip2, Ipv4Addr::new(10, 99, 0, 3));
        h1.exec_ok(&["ping", "-c1", "-W2", &ip2.to_string()]);
        h2.exec_ok(&["ping", "-c1", "-W2", &ul.gateway().to_string()]);

        drop(a);
        let list = run_ok(Command::new("ip").args(["netns", "list"]));
        assert!(!list.contains(&a_name), "{a_name} still listed: {list}");
    }

    #[test]
    fn etcd_in_namespace() {
        if !require_root("etcd_in_namespace") || !require_binary("etcd", "etcd_in_namespace") {
            return;
        }
        let ul = Underlay::new("10.98.0");
        let etcd = Etcd::start_in(ul.ns(), IpAddr::V4(ul.gateway()));
        assert_eq!(etcd.endpoint(), "http://10.98.0.1:2379");
        etcd.put("/k", "v");
        assert_eq!(etcd.get("/k").as_deref(), Some("v"));
    }
}
