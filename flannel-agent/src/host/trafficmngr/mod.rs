//! The masquerade and forward rules flannel installs, with iptables or nftables.
//!
//! The rule sets are flannel's exactly (`pkg/trafficmngr/{iptables,nftables}`), built by
//! pure functions in [`iptables`] and [`nftables`] that the unit tests compare with
//! flannel's golden copies (`e2e/rules.go`). Applying them runs the real tools with
//! `tokio::process`:
//!
//! - iptables: every rule set goes in as one `iptables-restore --noflush --wait`
//!   transaction in which each rule that already exists is deleted and appended again, so
//!   the set ends up whole and in order and applying twice changes nothing. A resync loop
//!   checks each rule with `iptables -C` every `--iptables-resync` seconds and re-applies
//!   the whole set when one is missing.
//! - nftables: table `flannel-ipv4` (family `ip`) with chains `postrtg` and `forward`,
//!   each created if needed, flushed and refilled in one `nft -f -` transaction. flannel
//!   never re-checks these; we re-check them on the same period, cheaply (a chain listing).
//!
//! At start the other mode's state is deleted, as flannel does, so switching
//! `EnableNFTables` does not leave two sets of rules fighting. Nothing is removed on exit:
//! a restart adopts the rules.
//!
//! Commands run in the calling thread's network namespace. The privileged tests rely on
//! that: they run the manager on a current-thread runtime in a thread that has unshared
//! its network namespace, so the host's firewall is never touched.

pub mod iptables;
pub mod nftables;

use std::{future::Future, io, process::Stdio, sync::Arc, time::Duration};

use ipnet::Ipv4Net;
use tokio::{io::AsyncWriteExt as _, process::Command, task::JoinHandle};

pub use self::{iptables::IptablesManager, nftables::NftablesManager};

/// How long one iptables/nft invocation may take; `--wait` can block on the xtables lock.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("cannot run {cmd}: {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error("{cmd} did not finish within {secs} s")]
    Timeout { cmd: String, secs: u64 },
    #[error("{cmd} failed: {detail}")]
    Failed { cmd: String, detail: String },
    #[error("cannot find the iptables version in {0:?}")]
    Version(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Multi(Vec<TrafficError>),
}

impl TrafficError {
    /// True when the tool itself is not installed.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Which of flannel's rule sets; each is installed and re-checked on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RuleSet {
    /// `--ip-masq`: `FLANNEL-POSTRTG` / `postrtg`.
    Masquerade,
    /// `--iptables-forward-rules`: `FLANNEL-FWD` / `forward`.
    Forward,
}

/// Installs flannel's rules with the mode the network config asks for.
#[derive(Debug)]
pub enum TrafficManager {
    Iptables(IptablesManager),
    Nftables(NftablesManager),
}

impl TrafficManager {
    /// `use_nft` is the config's `EnableNFTables`. For iptables this probes the installed
    /// version (for `--wait` and `--random-fully`), so a missing iptables fails here.
    pub async fn new(use_nft: bool) -> Result<Self, TrafficError> {
        if use_nft {
            tracing::info!("starting flannel in nftables mode");
            Ok(Self::Nftables(NftablesManager::new()))
        } else {
            tracing::info!("starting flannel in iptables mode");
            Ok(Self::Iptables(IptablesManager::new().await?))
        }
    }

    pub fn is_nftables(&self) -> bool {
        matches!(self, Self::Nftables(_))
    }

    /// Deletes what the other mode may have left: the iptables chains in nftables mode,
    /// the nftables tables in iptables mode. A tool that is not installed has nothing to
    /// clean up.
    pub async fn cleanup_other(&self) -> Result<(), TrafficError> {
        match self {
            Self::Iptables(_) => nftables::delete_tables().await,
            Self::Nftables(_) => iptables::delete_chains().await,
        }
    }

    /// Installs the masquerade rules for `network` (the config's Network) and `lease`.
    /// `prev` is the `(network, subnet)` of the previous subnet.env; when it differs, the
    /// old masquerade rules are deleted first. `fully_random_disable` is
    /// `--ip-masq-fully-random-disable`.
    pub async fn setup_masq(
        &self,
        network: Ipv4Net,
        lease: Ipv4Net,
        prev: Option<(Ipv4Net, Ipv4Net)>,
        fully_random_disable: bool,
    ) -> Result<(), TrafficError> {
        match self {
            Self::Iptables(m) => {
                m.setup_masq(network, lease, prev, fully_random_disable)
                    .await
            }
            Self::Nftables(m) => m.setup_masq(network, lease, fully_random_disable).await,
        }
    }

    /// Installs the FORWARD accept rules for `network`.
    pub async fn setup_forward(&self, network: Ipv4Net) -> Result<(), TrafficError> {
        match self {
            Self::Iptables(m) => m.setup_forward(network).await,
            Self::Nftables(m) => m.setup_forward(network).await,
        }
    }

    /// Checks every installed rule set and re-applies each one that is not whole. Returns
    /// whether anything was re-applied.
    pub async fn resync(&self) -> Result<bool, TrafficError> {
        match self {
            Self::Iptables(m) => m.resync().await,
            Self::Nftables(m) => m.resync().await,
        }
    }

    /// Runs [`resync`](Self::resync) every `period` until `shutdown` completes. Failures
    /// are logged and retried on the next tick.
    pub async fn run_resync(&self, period: Duration, shutdown: impl Future<Output = ()>) {
        let mut ticker = tokio::time::interval(period.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the rules were just applied.
        ticker.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {}
            }
            match self.resync().await {
                Ok(true) => tracing::info!("some traffic rules were missing; re-applied them"),
                Ok(false) => {}
                Err(err) => tracing::error!(error = %err, "cannot ensure traffic rules"),
            }
        }
    }

    /// [`run_resync`](Self::run_resync) on its own task.
    pub fn spawn_resync(
        self: &Arc<Self>,
        period: Duration,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.run_resync(period, shutdown).await })
    }
}

/// What one command run produced.
#[derive(Debug)]
pub(crate) struct Output {
    pub cmd: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The stdout of a successful run, else an error naming the command and its stderr.
    pub fn success(self) -> Result<String, TrafficError> {
        if self.code == Some(0) {
            return Ok(self.stdout);
        }
        let stderr = self.stderr.trim();
        let detail = if stderr.is_empty() {
            match self.code {
                Some(code) => format!("exit status {code}"),
                None => "killed by a signal".to_owned(),
            }
        } else {
            stderr.to_owned()
        };
        Err(TrafficError::Failed {
            cmd: self.cmd,
            detail,
        })
    }
}

/// Runs `program args…`, feeding `stdin` if given. Only failing to run at all is an error
/// here; the caller decides what an exit status means.
pub(crate) async fn exec(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, TrafficError> {
    let cmd = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_err = |source| TrafficError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let run = async {
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).await?;
            // Dropping the pipe closes it, so the tool sees end of input.
        }
        child.wait_with_output().await
    };
    let output = match tokio::time::timeout(COMMAND_TIMEOUT, run).await {
        Ok(result) => result.map_err(spawn_err)?,
        Err(_) => {
            return Err(TrafficError::Timeout {
                cmd,
                secs: COMMAND_TIMEOUT.as_secs(),
            });
        }
    };
    Ok(Output {
        cmd,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exec_reports_command_and_stderr() {
        let out = exec("sh", &["-c", "echo oops >&2; exit 3"], None)
            .await
            .unwrap();
        assert_eq!(out.code, Some(3));
        let err = out.success().unwrap_err();
        assert_eq!(err.to_string(), "sh -c echo oops >&2; exit 3 failed: oops");

        let out = exec("sh", &["-c", "exit 4"], None).await.unwrap();
        assert_eq!(
            out.success().unwrap_err().to_string(),
            "sh -c exit 4 failed: exit status 4"
        );
    }

    #[tokio::test]
    async fn exec_feeds_stdin() {
        let out = exec("cat", &[], Some("a\nb\n")).await.unwrap();
        assert_eq!(out.success().unwrap(), "a\nb\n");
    }

    #[tokio::test]
    async fn missing_tool_is_not_found() {
        let err = exec("flannel-no-such-tool", &[], None).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(
            err.to_string()
                .starts_with("cannot run flannel-no-such-tool: "),
            "{err}"
        );
    }
}
