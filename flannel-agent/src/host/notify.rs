//! systemd readiness notification (`sd_notify`), as go-systemd's `daemon.SdNotify` does it.
//!
//! systemd passes a datagram socket in `NOTIFY_SOCKET`: a filesystem path, or an abstract
//! socket written with a leading `@`. We send one datagram per state change. Without
//! `NOTIFY_SOCKET` (not run by systemd, or `Type=simple`) there is nobody to tell, which is
//! not an error.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixDatagram},
    },
};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET is set but empty")]
    EmptySocket,
    #[error("invalid NOTIFY_SOCKET {socket}: {source}")]
    InvalidSocket { socket: String, source: io::Error },
    #[error("cannot send {state:?} to NOTIFY_SOCKET {socket}: {source}")]
    Send {
        socket: String,
        state: String,
        source: io::Error,
    },
}

/// Tells systemd that start-up is complete. `Ok(false)` when `NOTIFY_SOCKET` is unset.
pub fn notify_ready() -> Result<bool, NotifyError> {
    sd_notify("READY=1")
}

/// Sends `state` (e.g. `READY=1`, `STOPPING=1`) to `$NOTIFY_SOCKET`. `Ok(false)` when the
/// variable is unset, `Ok(true)` once the datagram was sent.
pub fn sd_notify(state: &str) -> Result<bool, NotifyError> {
    match std::env::var_os(NOTIFY_SOCKET_ENV) {
        None => Ok(false),
        Some(socket) => sd_notify_to(&socket.to_string_lossy(), state).map(|()| true),
    }
}

/// Sends `state` to the given notify socket (path, or `@name` for an abstract socket).
pub fn sd_notify_to(socket: &str, state: &str) -> Result<(), NotifyError> {
    if socket.is_empty() {
        return Err(NotifyError::EmptySocket);
    }
    let invalid = |source| NotifyError::InvalidSocket {
        socket: socket.to_owned(),
        source,
    };
    let addr = match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).map_err(invalid)?,
        None => SocketAddr::from_pathname(socket).map_err(invalid)?,
    };
    let send_err = |source| NotifyError::Send {
        socket: socket.to_owned(),
        state: state.to_owned(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(send_err)?;
    sock.send_to_addr(state.as_bytes(), &addr)
        .map_err(send_err)?;
    tracing::debug!(socket, state, "sent sd_notify");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(listener: &UnixDatagram) -> String {
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        sd_notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        assert_eq!(recv(&listener), "READY=1");
    }

    #[test]
    fn sends_to_abstract_socket() {
        let name = format!(
            "flannel-notify-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        sd_notify_to(&format!("@{name}"), "READY=1").unwrap();
        assert_eq!(recv(&listener), "READY=1");
    }

    #[test]
    fn missing_listener_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        let err = sd_notify_to(path.to_str().unwrap(), "READY=1").unwrap_err();
        assert!(err.to_string().contains("cannot send \"READY=1\""), "{err}");
        assert!(matches!(
            sd_notify_to("", "READY=1"),
            Err(NotifyError::EmptySocket)
        ));
    }

    #[test]
    fn unset_env_is_not_an_error() {
        // The test runner is not started by systemd with Type=notify; if it were, this
        // would send a harmless extra READY=1.
        if std::env::var_os(NOTIFY_SOCKET_ENV).is_none() {
            assert!(!notify_ready().unwrap());
        }
    }
}
