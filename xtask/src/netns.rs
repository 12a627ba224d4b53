//! What the lab, the smoke run and the bench share: network namespaces and processes
//! that clean up on drop, a Ctrl-C flag every wait checks, and the wait itself.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util::{output, show};

/// Set by the Ctrl-C/SIGTERM handler; every wait checks it, so the guards unwind.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Installs the handler that sets [`STOP`].
pub fn on_ctrl_c() -> Result<()> {
    ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst)).context("install the Ctrl-C handler")
}

/// Polls `f` every 200 ms until it yields, `timeout` passes, or we are interrupted.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        if interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        if let Some(v) = f() {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The pid of the run that made namespace `name` (`fllab-h1-1234` → 1234): the last
/// dash-separated field, as [`Ns::new`] names them.
pub fn owner(name: &str) -> Option<u32> {
    name.rsplit('-').next().and_then(|p| p.parse().ok())
}

/// True when `pid` is a live xtask other than us: its resources are in use.
///
/// By `/proc/PID/exe`, not `comm`: `cargo xtask test` starts the lab and the bench as
/// `/proc/self/exe`, whose `comm` is `exe`, and a run judged dead by its `comm` had its
/// namespaces deleted by the next run. A recycled pid is another program, so it does
/// not count.
pub fn run_alive(pid: u32) -> bool {
    pid != std::process::id()
        && fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
            exe.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("xtask"))
        })
}

/// A network namespace `<prefix><role>-<pid>`; processes inside are killed and the
/// namespace deleted on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(prefix: &str, role: &str) -> Result<Ns> {
        let name = format!("{prefix}{role}-{}", std::process::id());
        output(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        output(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `PROGRAM` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `PROGRAM ARGS` inside and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        output(self.command(program).args(args))
    }

    pub fn sysctl(&self, key_value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", key_value]).map(drop)
    }

    /// Makes this namespace the underlay's switch: bridge `br0` holding `addr` (CIDR).
    ///
    /// It stands for a physical switch, which runs no netfilter: with `br_netfilter`
    /// loaded, every bridged frame would also pass this namespace's iptables hooks, a
    /// cost (about 12 % of iperf3 with offloads off) no real underlay has. Per
    /// namespace, so the machine's own setting is left alone.
    pub fn underlay_switch(&self, addr: &str) -> Result<()> {
        self.ip(&["link", "add", "br0", "type", "bridge"])?;
        self.ip(&["addr", "add", addr, "dev", "br0"])?;
        self.ip(&["link", "set", "br0", "up"])?;
        // The module is global; its sysctls exist in every namespace once it is loaded.
        if Path::new("/proc/sys/net/bridge").exists() {
            for family in ["iptables", "ip6tables", "arptables"] {
                self.sysctl(&format!("net.bridge.bridge-nf-call-{family}=0"))?;
            }
        }
        Ok(())
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        kill_and_delete(&self.name);
    }
}

/// Kills whatever runs in namespace `name`, then deletes it.
pub fn kill_and_delete(name: &str) {
    for _ in 0..50 {
        let pids = output(Command::new("ip").args(["netns", "pids", name])).unwrap_or_default();
        if pids.trim().is_empty() {
            break;
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(pids.split_whitespace())
            .stderr(Stdio::null())
            .status();
        thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// A process logging to a file; SIGTERM, then SIGKILL after 5 s, on drop.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let file = fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            // Its own process group: the terminal's Ctrl-C reaches only us, and we stop
            // the children in order.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", show(&cmd)))?;
        Ok(Proc { child, log })
    }

    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.exited().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
