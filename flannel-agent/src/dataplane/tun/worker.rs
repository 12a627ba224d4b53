//! The forwarding loops. Each queue of the multiqueue TUN has one socket and two
//! threads:
//! - tx: read packets from the TUN (64 KB TCP super-packets with TSO), find the peer,
//!   cut them into MTU-sized segments with the wire prefix in front, and send the
//!   whole batch with one `sendmmsg`, each super-packet as one `UDP_SEGMENT` message;
//! - rx: `recvmmsg` datagrams (several per slot with `UDP_GRO`), check them, and write
//!   the inner packets into the TUN, merging TCP segments into super-packets first.
//!
//! Threads sleep in poll(2) only when their source is empty; under load every call
//! moves a batch. A stop eventfd wakes all of them.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use tracing::{debug, warn};

use super::{
    Wire,
    packet::{
        self, Gro, GroPush, L4Checksum, Tso, VNET_F_NEEDS_CSUM, VNET_GSO_ECN, VNET_GSO_TCPV4,
        VNET_HDR_LEN, VXLAN_PREFIX, Verdict, VnetHdr,
    },
    sys::{self, Outgoing, RecvBatch},
    table::{Drops, SharedTable, Table},
};
use crate::mac::MacAddr;

/// What every worker shares.
#[derive(Debug)]
pub struct Shared {
    pub wire: Wire,
    pub table: SharedTable,
    pub drops: Drops,
    /// The TUN carries a virtio-net header (offloads on).
    pub vnet: bool,
    /// The overlay MTU.
    pub mtu: usize,
    /// `UDP_SEGMENT` works on this socket/route; cleared at the first refusal.
    pub udp_gso: AtomicBool,
    /// A worker stopped on an error (e.g. the device was deleted).
    pub failed: AtomicBool,
    pub stop: OwnedFd,
}

/// Largest UDP payload one `UDP_SEGMENT` send may carry (64 KiB minus IP and UDP
/// headers).
const GSO_MAX_BYTES: usize = 65_507;
/// Most segments per `UDP_SEGMENT` send (the kernel's UDP_MAX_SEGMENTS on older
/// kernels).
const GSO_MAX_SEGS: usize = 64;
/// Packets read from the TUN before the batch is sent.
const TX_BATCH: usize = 64;
/// Bytes of datagrams gathered before the batch is sent.
const TX_BYTES: usize = 1 << 20;

/// What goes in front of each inner packet on the wire.
fn prefix_len(wire: &Wire) -> usize {
    match wire {
        Wire::Udp => 0,
        Wire::Vxlan { .. } => VXLAN_PREFIX,
    }
}

/// The datagrams of one batch, in one buffer.
struct TxBatch {
    buf: Vec<u8>,
    msgs: Vec<Outgoing>,
}

impl TxBatch {
    fn reserve(&mut self, n: usize) -> usize {
        let off = self.buf.len();
        self.buf.resize(off + n, 0);
        off
    }
}

pub fn tx_loop(sh: &Shared, tun: &OwnedFd, sock: &OwnedFd, our_mac: Option<MacAddr>) {
    let mut rbuf = vec![0u8; VNET_HDR_LEN + 65_536];
    let mut batch = TxBatch {
        buf: Vec::with_capacity(TX_BYTES + 128 * 1024),
        msgs: Vec::with_capacity(1024),
    };
    let (tun_fd, stop) = (tun.as_raw_fd(), sh.stop.as_raw_fd());
    loop {
        let table = sh.table.load();
        let mut got = 0;
        while got < TX_BATCH && batch.buf.len() < TX_BYTES {
            match sys::read(tun_fd, &mut rbuf) {
                Ok(Some(n)) => {
                    got += 1;
                    from_tun(sh, &table, &mut rbuf[..n], &mut batch, tun_fd, our_mac);
                }
                Ok(None) => break,
                Err(e) => return fail(sh, "reading the TUN", &e),
            }
        }
        flush(sh, sock.as_raw_fd(), &mut batch);
        if got == 0 {
            match sys::wait_readable(tun_fd, stop) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => return fail(sh, "waiting on the TUN", &e),
            }
        }
    }
}

fn fail(sh: &Shared, what: &str, e: &io::Error) {
    warn!(error = %e, "TUN dataplane worker stopped: {what} failed");
    sh.failed.store(true, Relaxed);
}

/// One packet read from the TUN: route it, segment it, queue its datagrams.
fn from_tun(
    sh: &Shared,
    table: &Table,
    raw: &mut [u8],
    out: &mut TxBatch,
    tun: RawFd,
    our_mac: Option<MacAddr>,
) {
    let (hdr, p) = if sh.vnet {
        match (VnetHdr::parse(raw), raw.get_mut(VNET_HDR_LEN..)) {
            (Some(h), Some(p)) => (h, p),
            _ => return sh.drops.add(Verdict::Truncated, 1),
        }
    } else {
        (VnetHdr::default(), raw)
    };
    let ip = match packet::parse_ipv4(p) {
        Ok(ip) => ip,
        Err(v) => return sh.drops.add(v, 1),
    };
    let Some(peer) = table.route(ip.dst) else {
        sh.drops.add(Verdict::NoRoute, 1);
        if let Some(own) = table.own
            && let Some(icmp) = packet::icmp_net_unreachable(p, own.network())
        {
            let _ = write_tun(sh, tun, &icmp);
        }
        return;
    };
    let ttl_dec = matches!(sh.wire, Wire::Udp);
    if ttl_dec && ip.ttl <= 1 {
        return sh.drops.add(Verdict::TtlExpired, 1);
    }
    let pre = prefix_len(&sh.wire);
    let mut vx = [0u8; VXLAN_PREFIX];
    if let Wire::Vxlan { vni, .. } = sh.wire {
        let (Some(dst), Some(src)) = (peer.peer.vtep_mac, our_mac) else {
            return sh.drops.add(Verdict::NoRoute, 1);
        };
        packet::vxlan_prefix(&mut vx, vni, dst, src);
    }
    let gso = hdr.gso_type & !VNET_GSO_ECN;
    if gso == VNET_GSO_TCPV4 && sh.vnet {
        let tso = match Tso::new(p, &hdr) {
            Ok(t) => t,
            Err(v) => return sh.drops.add(v, 1),
        };
        let n = tso.count();
        let stride = pre + tso.full_len();
        let per_send = if sh.udp_gso.load(Relaxed) {
            (GSO_MAX_BYTES / stride).clamp(1, GSO_MAX_SEGS)
        } else {
            1
        };
        let mut i = 0;
        while i < n {
            let k = per_send.min(n - i);
            let off = out.reserve(k * stride);
            let mut len = 0;
            for j in 0..k {
                let at = off + j * stride;
                out.buf[at..at + pre].copy_from_slice(&vx[..pre]);
                len = j * stride + pre + tso.segment(i + j, &mut out.buf[at + pre..], ttl_dec);
            }
            out.buf.truncate(off + len);
            out.msgs.push(Outgoing {
                to: peer.dst,
                off,
                len,
                segment: if k > 1 { stride as u16 } else { 0 }, // < 64 KiB
            });
            i += k;
        }
        peer.counters.tx(n as u64, tso.pkt.len() as u64);
        return;
    }
    if gso != 0 {
        return sh.drops.add(Verdict::BadGso, 1);
    }
    let p = &mut p[..ip.total_len];
    if hdr.flags & VNET_F_NEEDS_CSUM != 0
        && let Err(v) =
            packet::finish_checksum(p, usize::from(hdr.csum_start), usize::from(hdr.csum_offset))
    {
        return sh.drops.add(v, 1);
    }
    if ttl_dec && !packet::decrement_ttl(p) {
        return sh.drops.add(Verdict::TtlExpired, 1);
    }
    let off = out.reserve(pre + p.len());
    out.buf[off..off + pre].copy_from_slice(&vx[..pre]);
    out.buf[off + pre..].copy_from_slice(p);
    out.msgs.push(Outgoing {
        to: peer.dst,
        off,
        len: pre + p.len(),
        segment: 0,
    });
    peer.counters.tx(1, p.len() as u64);
}

/// Sends the batch. A `UDP_SEGMENT` message the kernel refuses (no checksum offload on
/// the route's device, for one) turns GSO off for good and goes out datagram by
/// datagram; other failures are counted and the rest still go.
fn flush(sh: &Shared, sock: RawFd, b: &mut TxBatch) {
    let mut i = 0;
    while i < b.msgs.len() {
        match sys::send_batch(sock, &b.buf, &b.msgs[i..]) {
            Ok(0) => break,
            Ok(n) => i += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let m = b.msgs[i];
                if m.segment != 0 && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) {
                    if sh.udp_gso.swap(false, Relaxed) {
                        warn!(error = %e, "UDP GSO refused: sending datagram by datagram");
                    }
                    let seg = usize::from(m.segment);
                    let singles: Vec<Outgoing> = (0..m.len.div_ceil(seg))
                        .map(|j| Outgoing {
                            to: m.to,
                            off: m.off + j * seg,
                            len: seg.min(m.len - j * seg),
                            segment: 0,
                        })
                        .collect();
                    let mut k = 0;
                    while k < singles.len() {
                        match sys::send_batch(sock, &b.buf, &singles[k..]) {
                            Ok(n) if n > 0 => k += n,
                            _ => {
                                sh.drops.add(Verdict::IoFailed, 1);
                                k += 1;
                            }
                        }
                    }
                } else {
                    debug!(error = %e, to = %m.to, "sending a datagram failed");
                    let n = if m.segment == 0 {
                        1
                    } else {
                        m.len.div_ceil(usize::from(m.segment))
                    };
                    sh.drops.add(Verdict::IoFailed, n as u64);
                }
                i += 1;
            }
        }
    }
    b.msgs.clear();
    b.buf.clear();
}

/// Writes one plain packet (no offload) into the TUN.
fn write_tun(sh: &Shared, tun: RawFd, p: &[u8]) -> io::Result<usize> {
    if sh.vnet {
        sys::writev(tun, &[&[0u8; VNET_HDR_LEN], p])
    } else {
        sys::writev(tun, &[p])
    }
}

pub fn rx_loop(sh: &Shared, tun: &OwnedFd, sock: &OwnedFd, gro_socket: bool) {
    // With UDP_GRO a slot holds up to 64 KB of datagrams; without, one datagram.
    let mut batch = if gro_socket {
        RecvBatch::new(16, 65_536)
    } else {
        RecvBatch::new(64, 9_216)
    };
    let mut gro = Gro::new(sh.mtu);
    let (tun_fd, sock_fd, stop) = (tun.as_raw_fd(), sock.as_raw_fd(), sh.stop.as_raw_fd());
    loop {
        let n = match batch.recv(sock_fd) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // ICMP errors for earlier sends surface here (ECONNREFUSED etc.): not ours.
            Err(e) if e.raw_os_error().is_some_and(|c| c != libc::EBADF) => {
                debug!(error = %e, "receive error");
                continue;
            }
            Err(e) => return fail(sh, "receiving from the socket", &e),
        };
        if n == 0 {
            match sys::wait_readable(sock_fd, stop) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => return fail(sh, "waiting on the socket", &e),
            }
        }
        let table = sh.table.load();
        for i in 0..n {
            let r = batch.get(i);
            let from = *r.from.ip();
            if r.data.is_empty() {
                to_tun(sh, &table, from, &mut [], &mut gro, tun_fd);
                continue;
            }
            let seg = r.segment.unwrap_or(r.data.len()).max(1);
            for d in r.data.chunks_mut(seg) {
                to_tun(sh, &table, from, d, &mut gro, tun_fd);
            }
        }
        flush_gro(sh, &mut gro, tun_fd);
    }
}

/// One datagram from the wire: check it, count it, hand its packet to the TUN.
fn to_tun(
    sh: &Shared,
    table: &Table,
    from: std::net::Ipv4Addr,
    d: &mut [u8],
    gro: &mut Gro,
    tun: RawFd,
) {
    if !table.knows(from) {
        return sh.drops.add(Verdict::UnknownSource, 1);
    }
    let inner = match sh.wire {
        Wire::Udp => d,
        Wire::Vxlan { vni, mac } => match packet::vxlan_inner(d, vni, mac) {
            Ok(off) => &mut d[off..],
            Err(v) => return sh.drops.add(v, 1),
        },
    };
    let ip = match packet::parse_ipv4(inner) {
        Ok(ip) => ip,
        Err(v) => return sh.drops.add(v, 1),
    };
    let p = &mut inner[..ip.total_len];
    if !packet::ipv4_header_ok(&p[..ip.ihl]) {
        return sh.drops.add(Verdict::BadChecksum, 1);
    }
    let peer = match table.source(from, ip.src) {
        Ok(e) => e,
        Err(v) => return sh.drops.add(v, 1),
    };
    if !table.own.is_some_and(|own| own.contains(&ip.dst)) {
        return sh.drops.add(Verdict::NotLocal, 1);
    }
    if matches!(sh.wire, Wire::Udp) && !packet::decrement_ttl(p) {
        return sh.drops.add(Verdict::TtlExpired, 1);
    }
    let csum = packet::l4_checksum(p, &ip);
    if csum == L4Checksum::Invalid {
        return sh.drops.add(Verdict::BadChecksum, 1);
    }
    peer.counters.rx(1, p.len() as u64);
    if !sh.vnet {
        if write_tun(sh, tun, p).is_err() {
            sh.drops.add(Verdict::IoFailed, 1);
        }
        return;
    }
    let ok = csum == L4Checksum::Valid;
    if gro.push(p, &ip, ok) == GroPush::FlushFirst {
        flush_gro(sh, gro, tun);
        let _ = gro.push(p, &ip, ok);
    }
}

fn flush_gro(sh: &Shared, gro: &mut Gro, tun: RawFd) {
    if let Some(buf) = gro.take()
        && sys::writev(tun, &[buf]).is_err()
    {
        sh.drops.add(Verdict::IoFailed, 1);
    }
}

/// Spawns the two threads of one queue.
pub fn spawn(
    sh: &Arc<Shared>,
    q: usize,
    tun: Arc<OwnedFd>,
    sock: Arc<OwnedFd>,
    gro_socket: bool,
    our_mac: Option<MacAddr>,
) -> io::Result<[std::thread::JoinHandle<()>; 2]> {
    let (s1, t1, k1) = (sh.clone(), tun.clone(), sock.clone());
    let tx = std::thread::Builder::new()
        .name(format!("tun-tx-{q}"))
        .spawn(move || tx_loop(&s1, &t1, &k1, our_mac))?;
    let s2 = sh.clone();
    let rx = std::thread::Builder::new()
        .name(format!("tun-rx-{q}"))
        .spawn(move || rx_loop(&s2, &tun, &sock, gro_socket))?;
    Ok([tx, rx])
}
