//! Every libc call of the TUN dataplane: the multiqueue TUN device and its offloads,
//! the UDP sockets and their options, batched socket I/O with GSO/GRO control
//! messages, and the eventfd/poll pair the workers sleep on.
//!
//! File descriptors are [`OwnedFd`]s (closed on drop); buffers handed to the kernel
//! are borrowed for the duration of the call only.

use std::{
    ffi::CStr,
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

const TUN_PATH: &CStr = c"/dev/net/tun";

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags (the rest is padding
/// up to the union's 24 bytes).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_size(rc: isize) -> io::Result<usize> {
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// Checks that `/dev/net/tun` can be opened (the driver is there and we may use it).
pub fn tun_available() -> io::Result<()> {
    // SAFETY: a NUL-terminated constant path; the returned fd is owned right away.
    let fd = cvt(unsafe { libc::open(TUN_PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Opens TUN device `name` exactly as flanneld's udp backend does
/// (`IFF_TUN | IFF_NO_PI`, one queue, blocking), for the reference proxy.
pub fn open_tun_single(name: &str) -> io::Result<(OwnedFd, String)> {
    open_tun(name, libc::IFF_TUN | libc::IFF_NO_PI, 0)
}

/// Opens one queue of TUN device `name` (a `%d` pattern is expanded by the kernel),
/// non-blocking, `IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE` and `IFF_VNET_HDR` when
/// `vnet_hdr`. Returns the fd and the device's actual name.
pub fn open_tun_queue(name: &str, vnet_hdr: bool) -> io::Result<(OwnedFd, String)> {
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    open_tun(name, flags, libc::O_NONBLOCK)
}

fn open_tun(
    name: &str,
    flags: libc::c_int,
    open_flags: libc::c_int,
) -> io::Result<(OwnedFd, String)> {
    if name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: a NUL-terminated constant path.
    let raw = cvt(unsafe {
        libc::open(
            TUN_PATH.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | open_flags,
        )
    })?;
    // SAFETY: `raw` was just returned by open(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req.flags = flags as libc::c_short; // the IFF_* values fit in 16 bits
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its layout and size
    // and lives across the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut req) })?;
    let end = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(req.name.len());
    let actual = String::from_utf8_lossy(&req.name[..end]).into_owned();
    Ok((fd, actual))
}

/// `TUNSETOFFLOAD`: the TUN may hand us packets with partial checksums (`TUN_F_CSUM`)
/// and TCP/IPv4 super-packets (`TUN_F_TSO4`).
pub fn set_tun_offload(fd: &OwnedFd, tso: bool) -> io::Result<()> {
    let mut flags = libc::TUN_F_CSUM;
    if tso {
        flags |= libc::TUN_F_TSO4;
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    })?;
    Ok(())
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` is a c_int that lives across the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t, // 4
        )
    })?;
    Ok(())
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t, // 2
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// What [`udp_socket`] managed to turn on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketFeatures {
    /// `UDP_GRO`: receives may return several datagrams of one flow at once.
    pub gro: bool,
}

/// A non-blocking UDP socket bound to `bind` with `SO_REUSEPORT` (one per worker; the
/// kernel spreads flows over them), DF off like the kernel's tunnels, large buffers,
/// and `UDP_GRO` when the kernel has it.
pub fn udp_socket(bind: SocketAddrV4, gro: bool) -> io::Result<(OwnedFd, SocketFeatures)> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let raw = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: `raw` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let s = fd.as_raw_fd();
    setsockopt_int(s, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    setsockopt_int(
        s,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    )?;
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        // The FORCE variants need CAP_NET_ADMIN; the plain ones are capped by sysctl.
        if setsockopt_int(s, libc::SOL_SOCKET, force, 4 << 20).is_err() {
            let _ = setsockopt_int(s, libc::SOL_SOCKET, plain, 4 << 20);
        }
    }
    let mut features = SocketFeatures::default();
    if gro {
        features.gro = setsockopt_int(s, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
    }
    let sa = sockaddr(bind);
    // SAFETY: `sa` is a sockaddr_in that lives across the call and its size is passed.
    cvt(unsafe {
        libc::bind(
            s,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t, // 16
        )
    })?;
    Ok((fd, features))
}

/// A non-blocking eventfd: written once to stop every worker.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2) call; the fd is owned right away.
    let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `raw` was just returned by eventfd(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Adds 1 to an eventfd, waking its pollers for good (nobody reads it back).
pub fn signal(fd: &OwnedFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one`, which lives across the call.
    cvt_size(unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) })?;
    Ok(())
}

/// poll(2) for input on `fds`, forever; which of them are readable.
pub fn poll_in<const N: usize>(fds: [RawFd; N]) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `p` is an array of N pollfds that lives across the call.
        let rc = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, -1) };
        if rc >= 0 {
            return Ok(p.map(|x| x.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sleeps until `fd` is readable (true) or `stop` is signalled (false).
pub fn wait_readable(fd: RawFd, stop: RawFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an array of two pollfds that lives across the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("descriptor failed while polling"));
        }
        return Ok(true);
    }
}

/// read(2) into `buf`; `Ok(None)` when nothing is ready.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: reads at most `buf.len()` bytes into `buf`, which is borrowed mutably.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    would_block(cvt_size(n))
}

/// writev(2) of `parts` as one packet.
pub fn writev(fd: RawFd, parts: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: every iovec points into a slice borrowed for the call; writev only reads.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) }; // few parts
    cvt_size(n)
}

fn would_block(r: io::Result<usize>) -> io::Result<Option<usize>> {
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Room for one `cmsghdr` carrying an int (`UDP_GRO`) or a u16 (`UDP_SEGMENT`).
const CMSG_SPACE: usize = 24;

/// Buffers for `recvmmsg`: `n` slots of `size` bytes, each with a source address and
/// a control buffer for the `UDP_GRO` segment size.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_in>,
    ctrl: Vec<[u64; CMSG_SPACE / 8]>,
    lens: Vec<usize>,
    ctrl_lens: Vec<usize>,
}

/// One received slot.
pub struct Received<'a> {
    pub data: &'a mut [u8],
    pub from: SocketAddrV4,
    /// With `UDP_GRO`: the size of each coalesced datagram (the last may be shorter).
    pub segment: Option<usize>,
}

impl RecvBatch {
    pub fn new(n: usize, size: usize) -> Self {
        // SAFETY: an all-zero sockaddr_in is a valid value of this plain C struct.
        let zero_addr: libc::sockaddr_in = unsafe { zeroed() };
        Self {
            bufs: (0..n).map(|_| vec![0; size]).collect(),
            addrs: vec![zero_addr; n],
            ctrl: vec![[0; CMSG_SPACE / 8]; n],
            lens: vec![0; n],
            ctrl_lens: vec![0; n],
        }
    }

    /// One recvmmsg(2); `Ok(0)` when nothing is ready.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.bufs.len();
        let mut iov: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: an all-zero mmsghdr is a valid value of this plain C struct.
        let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { zeroed() }).collect();
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t; // 16
            h.msg_hdr.msg_iov = &raw mut iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CMSG_SPACE;
        }
        // SAFETY: every pointer in `hdrs` refers to `iov`, `self.addrs`, `self.ctrl` or
        // `self.bufs`, all alive and not otherwise borrowed during the call; the lengths
        // passed are theirs.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                n as libc::c_uint, // small
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let got = match would_block(cvt_size(rc as isize)) {
            Ok(Some(got)) => got,
            Ok(None) => return Ok(0),
            Err(e) => return Err(e),
        };
        for (i, h) in hdrs.iter().enumerate().take(got) {
            self.lens[i] = (h.msg_len as usize).min(self.bufs[i].len());
            self.ctrl_lens[i] = h.msg_hdr.msg_controllen;
        }
        Ok(got)
    }

    /// Slot `i` of the last [`RecvBatch::recv`].
    pub fn get(&mut self, i: usize) -> Received<'_> {
        let a = &self.addrs[i];
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        );
        let segment = gro_size(&self.ctrl[i], self.ctrl_lens[i]);
        Received {
            data: &mut self.bufs[i][..self.lens[i]],
            from,
            segment,
        }
    }
}

/// The `UDP_GRO` segment size in a received control buffer, if any.
fn gro_size(ctrl: &[u64; CMSG_SPACE / 8], len: usize) -> Option<usize> {
    // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
    let mut m: libc::msghdr = unsafe { zeroed() };
    m.msg_control = ctrl.as_ptr().cast_mut().cast();
    m.msg_controllen = len.min(CMSG_SPACE);
    // SAFETY: `m` describes `ctrl` (at most its size); CMSG_FIRSTHDR/NXTHDR stay inside
    // msg_controllen and return null past the end.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&raw const m) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a cmsghdr inside `ctrl`.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_UDP && h.cmsg_type == libc::UDP_GRO {
            let mut v: libc::c_int = 0;
            // SAFETY: the kernel wrote an int after this header; read it unaligned.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(c),
                    (&raw mut v).cast::<u8>(),
                    size_of::<libc::c_int>(),
                );
            }
            return usize::try_from(v).ok().filter(|&s| s > 0);
        }
        // SAFETY: as above; returns null after the last header.
        c = unsafe { libc::CMSG_NXTHDR(&raw const m, c) };
    }
    None
}

/// One datagram (or, with `segment`, a run of equal-sized datagrams sent with
/// `UDP_SEGMENT`) of a [`send_batch`].
#[derive(Debug, Clone, Copy)]
pub struct Outgoing {
    pub to: SocketAddrV4,
    pub off: usize,
    pub len: usize,
    /// `UDP_SEGMENT` size, or 0 for a single datagram.
    pub segment: u16,
}

/// sendmmsg(2) of `msgs` (slices of `buf`), starting with `msgs[0]`. Returns how many
/// were sent; an error is about `msgs[0]`.
pub fn send_batch(fd: RawFd, buf: &[u8], msgs: &[Outgoing]) -> io::Result<usize> {
    let n = msgs.len().min(1024);
    let mut addrs: Vec<libc::sockaddr_in> = msgs[..n].iter().map(|m| sockaddr(m.to)).collect();
    let mut iov: Vec<libc::iovec> = msgs[..n]
        .iter()
        .map(|m| libc::iovec {
            iov_base: buf[m.off..m.off + m.len].as_ptr().cast_mut().cast(),
            iov_len: m.len,
        })
        .collect();
    let mut ctrl: Vec<[u64; CMSG_SPACE / 8]> = vec![[0; CMSG_SPACE / 8]; n];
    // SAFETY: an all-zero mmsghdr is a valid value of this plain C struct.
    let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { zeroed() }).collect();
    for (i, m) in msgs[..n].iter().enumerate() {
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&raw mut addrs[i]).cast();
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t; // 16
        h.msg_iov = &raw mut iov[i];
        h.msg_iovlen = 1;
        if m.segment != 0 {
            h.msg_control = ctrl[i].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure size computation.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
            // SAFETY: `h` describes `ctrl[i]`, which has room for one cmsghdr and a u16
            // (CMSG_SPACE(2) <= 24); CMSG_FIRSTHDR returns a pointer into it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    (&raw const m.segment).cast::<u8>(),
                    libc::CMSG_DATA(c),
                    size_of::<u16>(),
                );
            }
        }
    }
    // SAFETY: every pointer in `hdrs` refers to `addrs`, `iov`, `ctrl` or `buf`, all
    // alive across the call; sendmmsg only reads them.
    let rc = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0) }; // <= 1024
    cvt_size(rc as isize)
}

/// The number of online CPUs, for the worker count.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
