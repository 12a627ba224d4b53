//! A measuring stick, not a dataplane: flanneld's udp proxy (`proxy_amd64.c`) as it
//! is. One thread, one `poll()` over one TUN (`IFF_TUN | IFF_NO_PI`, no offloads) and
//! one UDP socket; per wake-up one `read()` + one `sendto()`, or one `recv()` + one
//! `write()`; raw IPv4 in UDP, TTL decremented each way, longest match over a static
//! route list, ICMP net unreachable for the rest. No anti-spoofing (flanneld has none).
//!
//! The benchmark runs it through `examples/flannel_udp_reference.rs` to show what the
//! TUN dataplane gains over flannel's own udp backend on the same machine.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
};

use ipnet::Ipv4Net;

use super::{packet, sys};

/// What the proxy needs; the device's address, MTU and route are set by the caller.
#[derive(Debug, Clone)]
pub struct ReferenceConfig {
    /// The TUN name (`flannel0`).
    pub device: String,
    /// The socket address: the interface address and port (8285).
    pub bind: SocketAddrV4,
    /// The TUN's own address (ICMP errors come from it).
    pub tun_addr: Ipv4Addr,
    /// Peer subnets and where their datagrams go.
    pub routes: Vec<(Ipv4Net, SocketAddrV4)>,
}

/// Creates the device; returns its name and a handle to [`run`] with.
pub fn open(device: &str) -> io::Result<(File, String)> {
    let (fd, name) = sys::open_tun_single(device)?;
    Ok((File::from(fd), name))
}

/// Runs the proxy loop forever (or until an I/O error).
pub fn run(cfg: &ReferenceConfig, mut tun: File) -> io::Result<()> {
    let sock = UdpSocket::bind(cfg.bind)?;
    let mut buf = vec![0u8; 65_536];
    let fds = [tun.as_raw_fd(), sock.as_raw_fd()];
    loop {
        let [tun_ready, sock_ready] = sys::poll_in(fds)?;
        if tun_ready {
            let n = tun.read(&mut buf)?;
            let p = &mut buf[..n];
            let Ok(ip) = packet::parse_ipv4(p) else {
                continue;
            };
            let route = cfg
                .routes
                .iter()
                .filter(|(net, _)| net.contains(&ip.dst))
                .max_by_key(|(net, _)| net.prefix_len());
            match route {
                None => {
                    if let Some(icmp) = packet::icmp_net_unreachable(p, cfg.tun_addr) {
                        let _ = tun.write(&icmp);
                    }
                }
                Some((_, to)) => {
                    if packet::decrement_ttl(p) {
                        let _ = sock.send_to(p, to);
                    }
                }
            }
        }
        if sock_ready {
            let n = sock.recv(&mut buf)?;
            let p = &mut buf[..n];
            if packet::decrement_ttl(p) {
                let _ = tun.write(p);
            }
        }
    }
}
