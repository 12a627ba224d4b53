//! Logging: `tracing` with structured fields, configured from flanneld's klog-style flags.
//!
//! Flannel logs through klog to stderr. Unit files written for it carry `-v=N`,
//! `--logtostderr` and `--log_dir`; they keep their meaning here:
//! - `-v` sets the level of our own crates: 0–3 info, 4–5 debug, 6 and up trace. Other crates
//!   stay at info so that `-v=6` shows flanneld's detail, not every HTTP/2 frame.
//! - `--logtostderr=false` with `--log_dir` writes `<log_dir>/flanneld.log` (appending); with
//!   `--alsologtostderr` also to stderr. Without a log dir, logs stay on stderr, where
//!   systemd's journal picks them up (klog would write to /tmp instead).
//! - `RUST_LOG`, when set, replaces the level derived from `-v` entirely.
//!
//! Records emitted through the `log` crate (aya, rtnetlink, netlink-proto) are bridged in by
//! tracing-subscriber's `tracing-log` feature.

use std::{
    fs::{self, OpenOptions},
    io::{self, IsTerminal},
    path::{Path, PathBuf},
    sync::Mutex,
};

use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::cli::LogFlags;

/// The file name inside `--log_dir`.
pub const LOG_FILE_NAME: &str = "flanneld.log";

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("cannot open log file {}", path.display())]
    OpenLogFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid RUST_LOG filter")]
    Filter(#[source] tracing_subscriber::filter::ParseError),
    #[error("a global logger is already installed")]
    AlreadyInstalled(#[source] tracing_subscriber::util::TryInitError),
}

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destinations {
    pub stderr: bool,
    pub file: Option<PathBuf>,
}

/// klog's rules for `--logtostderr`, `--alsologtostderr` and `--log_dir`, minus klog's
/// fallback to a temporary directory: no file without an explicit `--log_dir`.
pub fn destinations(flags: &LogFlags) -> Destinations {
    let file = match (&flags.log_dir, flags.logtostderr) {
        (Some(dir), false) if !dir.as_os_str().is_empty() => Some(dir.join(LOG_FILE_NAME)),
        _ => None,
    };
    Destinations {
        stderr: file.is_none() || flags.alsologtostderr,
        file,
    }
}

/// The `EnvFilter` directives that stand for klog verbosity `v`.
pub fn directives_for_verbosity(v: u32) -> String {
    let level = match v {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    };
    format!("info,flanneld={level},flannel_agent={level},flannel_common={level}")
}

/// Installs the global subscriber. Call once, early in `main`.
///
/// `RUST_LOG` is read from the process environment (the only environment variable that is
/// not a flag); when it is set and non-empty it overrides `-v`.
pub fn init(flags: &LogFlags) -> Result<(), LoggingError> {
    let rust_log = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    // EnvFilter is not Clone, and each output layer needs its own.
    let make_filter = || match &rust_log {
        Some(spec) => EnvFilter::try_new(spec).map_err(LoggingError::Filter),
        None => Ok(EnvFilter::new(directives_for_verbosity(flags.v))),
    };

    let dest = destinations(flags);
    let stderr_layer = dest.stderr.then(|| {
        fmt::layer()
            .with_writer(io::stderr)
            .with_ansi(io::stderr().is_terminal())
            .with_target(true)
    });
    let file_layer = match &dest.file {
        Some(path) => Some(
            fmt::layer()
                .with_writer(Mutex::new(open_log_file(path)?))
                .with_ansi(false)
                .with_target(true),
        ),
        None => None,
    };

    tracing_subscriber::registry()
        .with(stderr_layer.with_filter(make_filter()?))
        .with(file_layer.with_filter(make_filter()?))
        .try_init()
        .map_err(LoggingError::AlreadyInstalled)?;

    for (flag, set) in [
        ("--vmodule", flags.vmodule.is_some()),
        ("--log_backtrace_at", flags.log_backtrace_at.is_some()),
        ("--stderrthreshold", flags.stderrthreshold.is_some()),
    ] {
        if set {
            tracing::warn!(flag, "flag accepted for compatibility and ignored");
        }
    }
    Ok(())
}

fn open_log_file(path: &Path) -> Result<fs::File, LoggingError> {
    let open = || -> io::Result<fs::File> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        OpenOptions::new().create(true).append(true).open(path)
    };
    open().map_err(|source| LoggingError::OpenLogFile {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_maps_to_levels() {
        assert!(directives_for_verbosity(0).contains("flannel_agent=info"));
        assert!(directives_for_verbosity(3).contains("flannel_agent=info"));
        assert!(directives_for_verbosity(4).contains("flannel_agent=debug"));
        assert!(directives_for_verbosity(5).contains("flanneld=debug"));
        assert!(directives_for_verbosity(6).contains("flannel_agent=trace"));
        assert!(directives_for_verbosity(10).starts_with("info,"));
        for v in [0, 4, 6] {
            EnvFilter::try_new(directives_for_verbosity(v)).unwrap();
        }
    }

    #[test]
    fn destinations_follow_klog() {
        let mut f = LogFlags::default();
        assert_eq!(
            destinations(&f),
            Destinations {
                stderr: true,
                file: None
            }
        );
        f.log_dir = Some("/var/log/flannel".into());
        assert_eq!(destinations(&f).file, None, "logtostderr wins");
        f.logtostderr = false;
        assert_eq!(
            destinations(&f),
            Destinations {
                stderr: false,
                file: Some("/var/log/flannel/flanneld.log".into())
            }
        );
        f.alsologtostderr = true;
        assert!(destinations(&f).stderr);
        f.log_dir = None;
        assert_eq!(
            destinations(&f),
            Destinations {
                stderr: true,
                file: None
            }
        );
    }

    #[test]
    fn log_file_is_created_and_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(LOG_FILE_NAME);
        std::fs::write(dir.path().join("x"), "").unwrap();
        {
            use std::io::Write;
            let mut f = open_log_file(&path).unwrap();
            writeln!(f, "one").unwrap();
            let mut f = open_log_file(&path).unwrap();
            writeln!(f, "two").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        let err = open_log_file(&dir.path().join("x").join("flanneld.log")).unwrap_err();
        assert!(err.to_string().starts_with("cannot open log file "));
    }
}
