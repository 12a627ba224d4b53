//! What `flanneld status` prints and `/metrics` exports: our lease, the dataplane in
//! use (and why better ones were refused), and per-peer and drop counters.
//!
//! The daemon publishes a [`Status`] snapshot; the health server renders it as JSON
//! (`/status`, read by `flanneld status` over the local socket) and as Prometheus text
//! (`/metrics`). Rendering is pure, so it is tested here without a daemon.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// Our lease, e.g. `10.5.72.0/24`; empty before we have one.
    pub subnet: String,
    pub public_ip: String,
    pub network: String,
    /// The backend type: vxlan, host-gw, udp, alloc.
    pub backend: String,
    /// The dataplane carrying traffic: ebpf, kernel, tun, none.
    pub dataplane: String,
    /// Why each better dataplane was not used, in order of preference.
    pub refused: Vec<Refusal>,
    pub ready: bool,
    pub peers: Vec<PeerStatus>,
    /// Packets dropped or passed to the kernel by the fast path, by reason.
    pub verdicts: Vec<VerdictCount>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub dataplane: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub subnet: String,
    pub public_ip: String,
    /// Empty for backends without one.
    pub vtep_mac: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCount {
    /// `drop` or `pass` (handed to the kernel path).
    pub action: String,
    pub reason: String,
    pub packets: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the daemon's status is not valid JSON: {0}")]
pub struct StatusParseError(#[from] serde_json::Error);

#[derive(Debug, thiserror::Error)]
pub enum StatusClientError {
    #[error("cannot reach flanneld at {path}: {source} (is it running, and are you root?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the status from {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("flanneld answered {0:?}")]
    BadAnswer(String),
    #[error(transparent)]
    Parse(#[from] StatusParseError),
    #[error(
        "unknown argument {0:?} (usage: flanneld status [--socket=PATH | --subnet-file=PATH] [--json])"
    )]
    Usage(String),
}

/// The status socket beside the subnet file: `/run/flannel/flanneld.sock` by default.
pub fn socket_path(subnet_file: &Path) -> PathBuf {
    subnet_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."))
        .join("flanneld.sock")
}

/// `flanneld status [--socket=PATH | --subnet-file=PATH] [--json]`: prints the running
/// daemon's status.
pub fn run_client(args: &[String]) -> Result<String, StatusClientError> {
    let mut path = socket_path(Path::new("/run/flannel/subnet.env"));
    let mut json = false;
    for a in args {
        let a = a.strip_prefix('-').unwrap_or(a);
        let a = a.strip_prefix('-').unwrap_or(a);
        if let Some(p) = a.strip_prefix("socket=") {
            path = PathBuf::from(p);
        } else if let Some(p) = a.strip_prefix("subnet-file=") {
            path = socket_path(Path::new(p));
        } else if a == "json" {
            json = true;
        } else {
            return Err(StatusClientError::Usage(a.to_owned()));
        }
    }
    let status = fetch(&path)?;
    Ok(if json {
        status.to_json() + "\n"
    } else {
        status.table()
    })
}

/// Reads `/status` from the daemon's socket.
pub fn fetch(path: &Path) -> Result<Status, StatusClientError> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
        StatusClientError::Connect {
            path: path.to_owned(),
            source,
        }
    })?;
    let io = |source| StatusClientError::Io {
        path: path.to_owned(),
        source,
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(io)?;
    s.write_all(b"GET /status HTTP/1.0\r\n\r\n").map_err(io)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(io)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(Status::from_json(body)?),
        _ => Err(StatusClientError::BadAnswer(out.chars().take(80).collect())),
    }
}

/// Prometheus label values: escape backslash, quote and newline.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Status {
    pub fn to_json(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self, StatusParseError> {
        Ok(serde_json::from_str(s)?)
    }

    /// The human-readable report of `flanneld status`.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "flanneld {}", self.version);
        let _ = writeln!(
            o,
            "lease:     {} (PublicIP {}, network {})",
            or_dash(&self.subnet),
            or_dash(&self.public_ip),
            or_dash(&self.network)
        );
        let _ = writeln!(o, "backend:   {}", or_dash(&self.backend));
        let _ = writeln!(o, "dataplane: {}", or_dash(&self.dataplane));
        for r in &self.refused {
            let _ = writeln!(o, "           not {}: {}", r.dataplane, r.reason);
        }
        let _ = writeln!(o, "ready:     {}", if self.ready { "yes" } else { "no" });
        let _ = writeln!(o, "peers:     {}", self.peers.len());
        if !self.peers.is_empty() {
            let _ = writeln!(
                o,
                "  {:<18} {:<15} {:<17} {:>10} {:>12} {:>10} {:>12}",
                "SUBNET", "PUBLIC IP", "VTEP MAC", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES"
            );
            for p in &self.peers {
                let _ = writeln!(
                    o,
                    "  {:<18} {:<15} {:<17} {:>10} {:>12} {:>10} {:>12}",
                    p.subnet,
                    p.public_ip,
                    or_dash(&p.vtep_mac),
                    p.tx_packets,
                    p.tx_bytes,
                    p.rx_packets,
                    p.rx_bytes
                );
            }
        }
        let counted: Vec<_> = self.verdicts.iter().filter(|v| v.packets > 0).collect();
        if !counted.is_empty() {
            let _ = writeln!(o, "fast path verdicts:");
            for v in counted {
                let _ = writeln!(o, "  {:<5} {:<28} {:>10}", v.action, v.reason, v.packets);
            }
        }
        o
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn prometheus(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP flannel_info The node's lease and dataplane.");
        let _ = writeln!(o, "# TYPE flannel_info gauge");
        let _ = writeln!(
            o,
            "flannel_info{{version=\"{}\",subnet=\"{}\",public_ip=\"{}\",backend=\"{}\",dataplane=\"{}\"}} 1",
            label(&self.version),
            label(&self.subnet),
            label(&self.public_ip),
            label(&self.backend),
            label(&self.dataplane)
        );
        let _ = writeln!(o, "# HELP flannel_ready Whether flanneld is ready.");
        let _ = writeln!(o, "# TYPE flannel_ready gauge");
        let _ = writeln!(o, "flannel_ready {}", u8::from(self.ready));
        let _ = writeln!(o, "# HELP flannel_peers Number of peers.");
        let _ = writeln!(o, "# TYPE flannel_peers gauge");
        let _ = writeln!(o, "flannel_peers {}", self.peers.len());
        for (name, help, get) in [
            (
                "flannel_peer_tx_packets_total",
                "Packets encapsulated to the peer by the fast path.",
                (|p: &PeerStatus| p.tx_packets) as fn(&PeerStatus) -> u64,
            ),
            (
                "flannel_peer_tx_bytes_total",
                "Bytes encapsulated to the peer by the fast path.",
                |p| p.tx_bytes,
            ),
            (
                "flannel_peer_rx_packets_total",
                "Packets from the peer decapsulated by the fast path.",
                |p| p.rx_packets,
            ),
            (
                "flannel_peer_rx_bytes_total",
                "Bytes from the peer decapsulated by the fast path.",
                |p| p.rx_bytes,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            for p in &self.peers {
                let _ = writeln!(
                    o,
                    "{name}{{subnet=\"{}\",public_ip=\"{}\"}} {}",
                    label(&p.subnet),
                    label(&p.public_ip),
                    get(p)
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP flannel_fastpath_packets_total Packets the fast path dropped or passed to the kernel, by reason."
        );
        let _ = writeln!(o, "# TYPE flannel_fastpath_packets_total counter");
        for v in &self.verdicts {
            let _ = writeln!(
                o,
                "flannel_fastpath_packets_total{{action=\"{}\",reason=\"{}\"}} {}",
                label(&v.action),
                label(&v.reason),
                v.packets
            );
        }
        o
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            version: "0.1.0".into(),
            subnet: "10.5.72.0/24".into(),
            public_ip: "192.168.0.2".into(),
            network: "10.5.0.0/16".into(),
            backend: "vxlan".into(),
            dataplane: "kernel".into(),
            refused: vec![Refusal {
                dataplane: "ebpf".into(),
                reason: "cannot create a BPF map: operation not permitted".into(),
            }],
            ready: true,
            peers: vec![PeerStatus {
                subnet: "10.5.9.0/24".into(),
                public_ip: "192.168.0.3".into(),
                vtep_mac: "02:00:00:00:00:01".into(),
                tx_packets: 5,
                tx_bytes: 500,
                rx_packets: 4,
                rx_bytes: 400,
            }],
            verdicts: vec![VerdictCount {
                action: "drop".into(),
                reason: "unknown outer source".into(),
                packets: 3,
            }],
        }
    }

    #[test]
    fn socket_sits_beside_the_subnet_file() {
        assert_eq!(
            socket_path(Path::new("/run/flannel/subnet.env")),
            Path::new("/run/flannel/flanneld.sock")
        );
        assert_eq!(
            socket_path(Path::new("subnet.env")),
            Path::new("./flanneld.sock")
        );
        assert!(matches!(
            run_client(&["--bogus".into()]),
            Err(StatusClientError::Usage(_))
        ));
        let e = run_client(&["--socket=/nonexistent/x.sock".into()]).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot reach flanneld at /nonexistent/x.sock"),
            "{e}"
        );
    }

    #[test]
    fn json_round_trip() {
        let s = sample();
        assert_eq!(Status::from_json(&s.to_json()).unwrap(), s);
        assert!(Status::from_json("{").is_err());
    }

    #[test]
    fn table_shows_lease_dataplane_and_peers() {
        let t = sample().table();
        assert!(
            t.contains("lease:     10.5.72.0/24 (PublicIP 192.168.0.2"),
            "{t}"
        );
        assert!(t.contains("dataplane: kernel"), "{t}");
        assert!(t.contains("not ebpf: cannot create a BPF map"), "{t}");
        assert!(t.contains("10.5.9.0/24"), "{t}");
        assert!(t.contains("drop  unknown outer source"), "{t}");
    }

    #[test]
    fn prometheus_exposition() {
        let m = sample().prometheus();
        assert!(
            m.contains(
                "flannel_peer_tx_packets_total{subnet=\"10.5.9.0/24\",public_ip=\"192.168.0.3\"} 5"
            ),
            "{m}"
        );
        assert!(
            m.contains(
                "flannel_peer_rx_bytes_total{subnet=\"10.5.9.0/24\",public_ip=\"192.168.0.3\"} 400"
            ),
            "{m}"
        );
        assert!(
            m.contains(
                "flannel_fastpath_packets_total{action=\"drop\",reason=\"unknown outer source\"} 3"
            ),
            "{m}"
        );
        assert!(m.contains("flannel_ready 1"));
        // Every sample line belongs to a declared metric family.
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(m.contains(&format!("# TYPE {name} ")), "undeclared {name}");
        }
        let mut s = sample();
        s.peers[0].subnet = "a\"b\\c\nd".into();
        assert!(s.prometheus().contains("subnet=\"a\\\"b\\\\c\\nd\""));
    }
}
