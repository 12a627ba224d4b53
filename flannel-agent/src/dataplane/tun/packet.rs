//! Pure packet work for the TUN dataplane: IPv4 header checks, flannel's TTL decrement
//! (RFC 1624), VXLAN headers, ICMP net-unreachable, and the two offloads done in
//! userspace: TCP segmentation of the 64 KB super-packets the TUN hands us (TSO) and
//! coalescing of received TCP segments into one super-packet for the TUN (GRO).
//!
//! Nothing here does I/O or panics on input: every length is checked before it is
//! used, and a packet that does not parse is a [`Verdict`], not an error.

use std::net::Ipv4Addr;

use crate::mac::MacAddr;

/// `struct virtio_net_hdr` (legacy layout, host byte order): what `IFF_VNET_HDR` puts
/// before every packet read from or written to the TUN.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum holds only the pseudo-header sum.
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const VNET_GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`, or-ed into the GSO type.
pub const VNET_GSO_ECN: u8 = 0x80;

/// VXLAN header (8) + inner Ethernet header (14).
pub const VXLAN_PREFIX: usize = 22;
const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Why a packet was not forwarded. Counted per reason; shown by `flanneld status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Outer source is not a known peer's PublicIP.
    UnknownSource,
    /// Inner source outside the sending peer's subnet.
    InnerSource,
    /// Inner destination outside our subnet.
    NotLocal,
    /// Shorter than its headers say.
    Truncated,
    /// Header fields that cannot be right (IHL, lengths, VXLAN flags).
    BadHeader,
    /// IPv4 header checksum wrong.
    BadChecksum,
    /// Not IPv4 (inner ethertype, IP version).
    NotIpv4,
    /// VXLAN with another VNI.
    OtherVni,
    /// Inner destination MAC is not our VtepMAC.
    OtherMac,
    /// No peer subnet holds the destination (answered with ICMP net unreachable).
    NoRoute,
    /// TTL reached zero (flannel's udp decrement).
    TtlExpired,
    /// An offload request this dataplane did not enable.
    BadGso,
    /// The socket or the TUN refused the packet.
    IoFailed,
}

impl Verdict {
    pub const ALL: [Verdict; 13] = [
        Self::UnknownSource,
        Self::InnerSource,
        Self::NotLocal,
        Self::Truncated,
        Self::BadHeader,
        Self::BadChecksum,
        Self::NotIpv4,
        Self::OtherVni,
        Self::OtherMac,
        Self::NoRoute,
        Self::TtlExpired,
        Self::BadGso,
        Self::IoFailed,
    ];

    /// The reason as `flanneld status` and `/metrics` show it (the eBPF path's names
    /// where they mean the same).
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownSource => "unknown source",
            Self::InnerSource => "inner source",
            Self::NotLocal => "not local",
            Self::Truncated => "truncated",
            Self::BadHeader => "bad header",
            Self::BadChecksum => "bad checksum",
            Self::NotIpv4 => "not ipv4",
            Self::OtherVni => "other vni",
            Self::OtherMac => "other mac",
            Self::NoRoute => "no route",
            Self::TtlExpired => "ttl expired",
            Self::BadGso => "bad gso",
            Self::IoFailed => "io failed",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The header of a `IFF_VNET_HDR` TUN packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// The fields of a checked IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Hdr {
    pub ihl: usize,
    pub total_len: usize,
    pub proto: u8,
    pub ttl: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Fragment offset non-zero or more-fragments set.
    pub fragment: bool,
}

/// Checks an IPv4 packet's header: version, IHL, total length against the buffer
/// (a longer buffer is allowed; the caller trims to `total_len`).
pub fn parse_ipv4(p: &[u8]) -> Result<Ipv4Hdr, Verdict> {
    let first = *p.first().ok_or(Verdict::Truncated)?;
    if first >> 4 != 4 {
        return Err(Verdict::NotIpv4);
    }
    if p.len() < 20 {
        return Err(Verdict::Truncated);
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < 20 || total_len < ihl {
        return Err(Verdict::BadHeader);
    }
    if p.len() < total_len {
        return Err(Verdict::Truncated);
    }
    let frag = u16::from_be_bytes([p[6], p[7]]);
    Ok(Ipv4Hdr {
        ihl,
        total_len,
        proto: p[9],
        ttl: p[8],
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        fragment: frag & 0x3fff != 0,
    })
}

/// One's-complement sum of `data` (big-endian 16-bit words, odd tail padded) added to
/// `acc`, unfolded. Words are summed four bytes at a time into 64 bits; the carries are
/// folded at the end.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let mut rest = chunks.remainder();
    if rest.len() >= 2 {
        acc += u64::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let Some(&b) = rest.first() {
        acc += u64::from(b) << 8;
    }
    acc
}

/// Folds a [`sum`] to 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16 // <= 0xffff after folding
}

/// The IPv4 header checksum of `hdr` (whose checksum field is included as is).
pub fn ipv4_header_ok(hdr: &[u8]) -> bool {
    fold(sum(hdr, 0)) == 0xffff
}

/// Recomputes the IPv4 header checksum in place.
fn set_ipv4_checksum(hdr: &mut [u8]) {
    hdr[10] = 0;
    hdr[11] = 0;
    let c = !fold(sum(hdr, 0));
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The pseudo-header sum for `proto` with `len` bytes of L4 data.
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    sum(src, sum(dst, u64::from(proto) + len as u64))
}

/// flannel's `decrement_ttl`: TTL − 1 with the header checksum patched incrementally
/// (RFC 1624, HC' = ~(~HC + ~m + m')). False (leave the packet) when it reaches zero.
pub fn decrement_ttl(p: &mut [u8]) -> bool {
    if p.len() < 20 || p[8] <= 1 {
        return false;
    }
    let old = u16::from_be_bytes([p[8], p[9]]);
    p[8] -= 1;
    let new = u16::from_be_bytes([p[8], p[9]]);
    let hc = u16::from_be_bytes([p[10], p[11]]);
    let acc = u64::from(!hc) + u64::from(!old) + u64::from(new);
    p[10..12].copy_from_slice(&(!fold(acc)).to_be_bytes());
    true
}

/// Completes a partial L4 checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the field at
/// `start + offset` holds the pseudo-header sum; the sum over `start..` is stored.
pub fn finish_checksum(p: &mut [u8], start: usize, offset: usize) -> Result<(), Verdict> {
    let at = start.checked_add(offset).ok_or(Verdict::BadGso)?;
    if at + 2 > p.len() {
        return Err(Verdict::BadGso);
    }
    let mut c = !fold(sum(&p[start..], 0));
    // A computed zero UDP checksum is sent as all ones (zero means "none").
    if c == 0 && offset == 6 {
        c = 0xffff;
    }
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Writes the VXLAN header and inner Ethernet header into `out[..22]`.
pub fn vxlan_prefix(out: &mut [u8], vni: u32, dst: MacAddr, src: MacAddr) {
    out[..4].copy_from_slice(&[0x08, 0, 0, 0]);
    out[4..8].copy_from_slice(&(vni << 8).to_be_bytes());
    out[8..14].copy_from_slice(&dst.0);
    out[14..20].copy_from_slice(&src.0);
    out[20..22].copy_from_slice(&ETH_P_IPV4);
}

/// Checks a VXLAN datagram as a kernel `flannel.<VNI>` would (I flag only, reserved
/// bits zero, our VNI, inner destination = our VtepMAC, IPv4) and returns the offset of
/// the inner IPv4 packet.
pub fn vxlan_inner(d: &[u8], vni: u32, mac: MacAddr) -> Result<usize, Verdict> {
    if d.len() < VXLAN_PREFIX {
        return Err(Verdict::Truncated);
    }
    if d[..4] != [0x08, 0, 0, 0] || d[7] != 0 {
        return Err(Verdict::BadHeader);
    }
    if u32::from_be_bytes([0, d[4], d[5], d[6]]) != vni {
        return Err(Verdict::OtherVni);
    }
    if d[8..14] != mac.0 {
        return Err(Verdict::OtherMac);
    }
    if d[20..22] != ETH_P_IPV4 {
        return Err(Verdict::NotIpv4);
    }
    Ok(VXLAN_PREFIX)
}

/// ICMP "destination net unreachable" from `from` for `orig`, as flanneld's proxy
/// writes back into the TUN for a destination no peer holds. `None` when no error may
/// be sent (RFC 1122: not for ICMP errors, fragments, or odd sources).
pub fn icmp_net_unreachable(orig: &[u8], from: Ipv4Addr) -> Option<Vec<u8>> {
    let h = parse_ipv4(orig).ok()?;
    if h.fragment || h.src.is_unspecified() || h.src.is_broadcast() || h.src.is_multicast() {
        return None;
    }
    if h.proto == IPPROTO_ICMP {
        let ty = *orig.get(h.ihl)?;
        if matches!(ty, 3 | 4 | 5 | 11 | 12) {
            return None;
        }
    }
    let quoted = &orig[..(h.ihl + 8).min(h.total_len)];
    let total = 20 + 8 + quoted.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes()); // <= 20 + 8 + 68
    p[8] = 64;
    p[9] = IPPROTO_ICMP;
    p[12..16].copy_from_slice(&from.octets());
    p[16..20].copy_from_slice(&h.src.octets());
    set_ipv4_checksum(&mut p[..20]);
    p[20] = 3; // destination unreachable
    p[21] = 0; // net unreachable
    p[28..].copy_from_slice(quoted);
    let c = !fold(sum(&p[20..], 0));
    p[22..24].copy_from_slice(&c.to_be_bytes());
    Some(p)
}

/// The state of a received packet's TCP or UDP checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Checksum {
    /// Checked and right (maybe after completing a partial one).
    Valid,
    /// Wrong.
    Invalid,
    /// Not TCP or UDP, a fragment, or UDP without a checksum.
    Unchecked,
}

/// Checks the TCP/UDP checksum of a received inner packet (trimmed to its total
/// length), completing it in place when it is a partial one.
///
/// A sender on the same host (over veth) leaves the inner checksum of an
/// encapsulated `CHECKSUM_PARTIAL` packet unfinished: the field holds only the
/// pseudo-header sum, to be completed by a NIC that never comes, and the kernel's own
/// receivers trust the skb's flag. Userspace sees just the bytes, so a field equal to
/// exactly that pseudo-header sum is completed here; anything else must add up.
pub fn l4_checksum(p: &mut [u8], ip: &Ipv4Hdr) -> L4Checksum {
    let off = match ip.proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => return L4Checksum::Unchecked,
    };
    let at = ip.ihl + off;
    if ip.fragment || p.len() < at + 2 || (ip.proto == IPPROTO_UDP && p.len() < ip.ihl + 8) {
        return L4Checksum::Unchecked;
    }
    let field = u16::from_be_bytes([p[at], p[at + 1]]);
    if ip.proto == IPPROTO_UDP && field == 0 {
        return L4Checksum::Unchecked;
    }
    let ps = pseudo(&p[12..16], &p[16..20], ip.proto, p.len() - ip.ihl);
    let total = sum(&p[ip.ihl..], ps);
    if fold(total) == 0xffff {
        return L4Checksum::Valid;
    }
    if field == fold(ps) {
        let mut c = !fold(total - u64::from(field));
        if c == 0 && ip.proto == IPPROTO_UDP {
            c = 0xffff;
        }
        p[at..at + 2].copy_from_slice(&c.to_be_bytes());
        return L4Checksum::Valid;
    }
    L4Checksum::Invalid
}

/// A TCP super-packet from the TUN (`VIRTIO_NET_HDR_GSO_TCPV4`) to cut into segments.
#[derive(Debug, Clone, Copy)]
pub struct Tso<'a> {
    pub pkt: &'a [u8],
    pub ip: Ipv4Hdr,
    /// IP + TCP header bytes.
    pub hdrs: usize,
    pub mss: usize,
}

impl<'a> Tso<'a> {
    /// Checks that `pkt` is an IPv4/TCP packet the kernel may hand us with TSO.
    pub fn new(pkt: &'a [u8], hdr: &VnetHdr) -> Result<Self, Verdict> {
        let ip = parse_ipv4(pkt)?;
        let pkt = &pkt[..ip.total_len];
        if ip.proto != IPPROTO_TCP || usize::from(hdr.csum_start) != ip.ihl {
            return Err(Verdict::BadGso);
        }
        let doff = usize::from(*pkt.get(ip.ihl + 12).ok_or(Verdict::Truncated)? >> 4) * 4;
        let hdrs = ip.ihl + doff;
        if doff < 20 || hdrs > pkt.len() || hdr.gso_size == 0 {
            return Err(Verdict::BadGso);
        }
        Ok(Self {
            pkt,
            ip,
            hdrs,
            mss: usize::from(hdr.gso_size),
        })
    }

    /// How many segments.
    pub fn count(&self) -> usize {
        (self.pkt.len() - self.hdrs).div_ceil(self.mss).max(1)
    }

    /// The size of a full segment (IP + TCP + mss).
    pub fn full_len(&self) -> usize {
        self.hdrs + self.mss
    }

    /// Writes segment `i` (< [`Tso::count`]) at the start of `out` (at least
    /// [`Tso::full_len`] bytes) with full IP and TCP checksums; `ttl_dec` applies
    /// flannel's udp TTL decrement. Returns its length.
    pub fn segment(&self, i: usize, out: &mut [u8], ttl_dec: bool) -> usize {
        let payload = &self.pkt[self.hdrs..];
        let start = (i * self.mss).min(payload.len());
        let end = (start + self.mss).min(payload.len());
        let last = end == payload.len();
        let len = self.hdrs + (end - start);
        let ihl = self.ip.ihl;
        out[..self.hdrs].copy_from_slice(&self.pkt[..self.hdrs]);
        out[self.hdrs..len].copy_from_slice(&payload[start..end]);
        // IP: length, id + i, TTL, checksum.
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes()); // <= 65535: a piece of the original
        let id = u16::from_be_bytes([out[4], out[5]]).wrapping_add(i as u16); // wraps like the kernel's
        out[4..6].copy_from_slice(&id.to_be_bytes());
        if ttl_dec {
            out[8] = out[8].saturating_sub(1);
        }
        set_ipv4_checksum(&mut out[..ihl]);
        // TCP: sequence, flags (FIN/PSH on the last only, CWR on the first), checksum.
        let t = ihl;
        let seq = u32::from_be_bytes([out[t + 4], out[t + 5], out[t + 6], out[t + 7]])
            .wrapping_add(start as u32); // < 64 KiB
        out[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        if !last {
            out[t + 13] &= !0x09; // FIN | PSH
        }
        if i != 0 {
            out[t + 13] &= !0x80; // CWR
        }
        out[t + 16] = 0;
        out[t + 17] = 0;
        let c = !fold(sum(
            &out[t..len],
            pseudo(&out[12..16], &out[16..20], IPPROTO_TCP, len - t),
        ));
        out[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        len
    }
}

/// The TCP/IPv4 checksum of a whole packet is right.
#[cfg(test)]
fn tcp_checksum_ok(p: &[u8], ihl: usize) -> bool {
    fold(sum(
        &p[ihl..],
        pseudo(&p[12..16], &p[16..20], IPPROTO_TCP, p.len() - ihl),
    )) == 0xffff
}

/// Userspace GRO for packets written into the TUN: consecutive in-order segments of
/// one TCP flow become one super-packet, written with `VIRTIO_NET_HDR_GSO_TCPV4`, so the
/// kernel forwards one 64 KB packet instead of forty. Anything else passes unchanged.
///
/// A segment joins the packet being built when it has the same addresses, ports,
/// IP header (bar length, id and checksum), TCP options, ACK and window, carries only
/// ACK (and PSH, which ends the packet), has a valid TCP checksum, continues the
/// sequence, and is not longer than the first segment (the gso_size).
#[derive(Debug)]
pub struct Gro {
    /// `[vnet hdr][packet]`, the packet being built.
    buf: Vec<u8>,
    /// Segments in `buf` (0: empty).
    segs: usize,
    mss: usize,
    hdrs: usize,
    next_seq: u32,
    closed: bool,
    /// The packet in `buf` may not be extended (its checksum was not checked).
    single: bool,
    /// The overlay MTU: a TCP packet longer than this (a peer's unsegmented GSO
    /// packet, seen whole through the socket) goes to the TUN as a GSO packet cut to
    /// it.
    mtu: usize,
    /// The packet in `buf` is such an oversized one.
    oversized: bool,
}

/// What [`Gro::push`] did with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum GroPush {
    /// Appended to (or started) the packet being built.
    Merged,
    /// Not mergeable: flush the packet being built, then push it again.
    FlushFirst,
}

/// Most bytes one super-packet may hold (the IPv4 total length field).
const GRO_MAX: usize = 65_535;

impl Gro {
    pub fn new(mtu: usize) -> Self {
        Self {
            buf: Vec::with_capacity(VNET_HDR_LEN + GRO_MAX),
            segs: 0,
            mss: 0,
            hdrs: 0,
            next_seq: 0,
            closed: false,
            single: false,
            mtu,
            oversized: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segs == 0
    }

    /// Offers a checked IPv4 packet (trimmed to its total length); `csum_ok`: its TCP
    /// checksum is known to be right ([`l4_checksum`]), so it may be merged.
    pub fn push(&mut self, p: &[u8], ip: &Ipv4Hdr, csum_ok: bool) -> GroPush {
        let tcp = tcp_segment(p, ip).filter(|_| csum_ok);
        if self.segs == 0 {
            self.buf.clear();
            self.buf.extend_from_slice(&[0; VNET_HDR_LEN]);
            self.buf.extend_from_slice(p);
            self.segs = 1;
            self.oversized = false;
            match tcp {
                Some((hdrs, _, _)) if p.len() > self.mtu && self.mtu > hdrs => {
                    self.single = false;
                    self.oversized = true;
                    self.closed = true;
                    self.hdrs = hdrs;
                    self.mss = self.mtu - hdrs;
                }
                Some((hdrs, seq, flags)) => {
                    self.single = false;
                    self.hdrs = hdrs;
                    self.mss = p.len() - hdrs;
                    self.next_seq = seq.wrapping_add(self.mss as u32); // < 64 KiB
                    self.closed = flags & 0x08 != 0 || self.mss == 0;
                }
                _ => self.single = true,
            }
            return GroPush::Merged;
        }
        let Some((hdrs, seq, flags)) = tcp else {
            return GroPush::FlushFirst;
        };
        let b = &self.buf[VNET_HDR_LEN..];
        let seg = p.len() - hdrs;
        let ihl = ip.ihl;
        let mergeable = !self.single
            && !self.closed
            && hdrs == self.hdrs
            && seg > 0
            && seg <= self.mss
            && seq == self.next_seq
            && b.len() + seg <= GRO_MAX
            // Same version/IHL/TOS, flags/fragment, TTL, protocol, addresses, options.
            && b[..2] == p[..2]
            && b[6..10] == p[6..10]
            && b[12..ihl] == p[12..ihl]
            // Same ports, ACK number, data offset and flags, window; same options.
            && b[ihl..ihl + 4] == p[ihl..ihl + 4]
            && b[ihl + 8..ihl + 16] == p[ihl + 8..ihl + 16]
            && b[ihl + 20..hdrs] == p[ihl + 20..hdrs];
        // Only the last segment may carry PSH; flags otherwise equal (ACK only).
        let flags_ok = (b[ihl + 13] & !0x08) == (flags & !0x08) && b[ihl + 13] & 0x08 == 0;
        if !(mergeable && flags_ok) {
            return GroPush::FlushFirst;
        }
        self.buf.extend_from_slice(&p[hdrs..]);
        if flags & 0x08 != 0 {
            let at = VNET_HDR_LEN + ihl + 13;
            self.buf[at] |= 0x08;
            self.closed = true;
        }
        self.segs += 1;
        self.next_seq = seq.wrapping_add(seg as u32); // < 64 KiB
        if seg < self.mss {
            // A short segment ends the run: the next one cannot be gso_size-aligned.
            self.closed = true;
        }
        GroPush::Merged
    }

    /// The packet built so far, with its vnet header, ready for the TUN; empties it.
    /// A single packet goes as is; a merged one gets its IP length and checksum and
    /// the TCP pseudo-header sum (`NEEDS_CSUM`, `GSO_TCPV4`, gso_size = first length,
    /// or what fits the MTU for an oversized one).
    pub fn take(&mut self) -> Option<&[u8]> {
        if self.segs == 0 {
            return None;
        }
        let segs = std::mem::take(&mut self.segs);
        if segs > 1 || self.oversized {
            let p = &mut self.buf[VNET_HDR_LEN..];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let len = p.len();
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes()); // <= GRO_MAX
            set_ipv4_checksum(&mut p[..ihl]);
            p[ihl + 16] = 0;
            p[ihl + 17] = 0;
            let ps = fold(pseudo(&p[12..16], &p[16..20], IPPROTO_TCP, len - ihl));
            p[ihl + 16..ihl + 18].copy_from_slice(&ps.to_be_bytes());
            let ecn = if p[ihl + 13] & 0x40 != 0 {
                VNET_GSO_ECN
            } else {
                0
            };
            let hdr = VnetHdr {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: VNET_GSO_TCPV4 | ecn,
                hdr_len: self.hdrs as u16, // <= 120
                gso_size: self.mss as u16, // < 64 KiB
                csum_start: ihl as u16,
                csum_offset: 16,
            };
            self.buf[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
        }
        Some(&self.buf)
    }
}

/// For an unfragmented TCP packet: (IP + TCP header length, sequence, flags). `None`
/// for anything that must not be merged.
fn tcp_segment(p: &[u8], ip: &Ipv4Hdr) -> Option<(usize, u32, u8)> {
    if ip.proto != IPPROTO_TCP || ip.fragment {
        return None;
    }
    let t = p.get(ip.ihl..ip.ihl + 20)?;
    let doff = usize::from(t[12] >> 4) * 4;
    let flags = t[13];
    // Only plain data segments: ACK, maybe PSH; no SYN/FIN/RST/URG/ECE/CWR.
    if doff < 20 || flags & !0x18 != 0 || flags & 0x10 == 0 || p.len() < ip.ihl + doff {
        return None;
    }
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    Some((ip.ihl + doff, seq, flags))
}

/// True for UDP (the checksum-zero convention differs).
pub fn is_udp(ip: &Ipv4Hdr) -> bool {
    ip.proto == IPPROTO_UDP
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/TCP packet with valid checksums.
    fn tcp_packet(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload.len()];
        p[0] = 0x45;
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = IPPROTO_TCP;
        p[12..16].copy_from_slice(&[10, 5, 1, 2]);
        p[16..20].copy_from_slice(&[10, 5, 2, 2]);
        set_ipv4_checksum(&mut p[..20]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..].copy_from_slice(payload);
        let c = !fold(sum(
            &p[20..],
            pseudo(&p[12..16], &p[16..20], 6, p.len() - 20),
        ));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn ipv4_parse_rejects_what_it_must() {
        let p = tcp_packet(1, 0x10, b"hello");
        let h = parse_ipv4(&p).unwrap();
        assert_eq!((h.ihl, h.total_len, h.proto), (20, 45, 6));
        assert!(ipv4_header_ok(&p[..20]));
        assert_eq!(parse_ipv4(&[]), Err(Verdict::Truncated));
        assert_eq!(parse_ipv4(&p[..19]), Err(Verdict::Truncated));
        assert_eq!(parse_ipv4(&p[..44]), Err(Verdict::Truncated));
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), Err(Verdict::NotIpv4));
        let mut ihl = p.clone();
        ihl[0] = 0x44;
        assert_eq!(parse_ipv4(&ihl), Err(Verdict::BadHeader));
        let mut short = p.clone();
        short[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(parse_ipv4(&short), Err(Verdict::BadHeader));
        // Every prefix of a packet parses or is rejected, never panics.
        for n in 0..p.len() {
            let _ = parse_ipv4(&p[..n]);
        }
    }

    #[test]
    fn ttl_decrement_patches_the_checksum() {
        let mut p = tcp_packet(1, 0x10, b"x");
        assert!(decrement_ttl(&mut p));
        assert_eq!(p[8], 63);
        assert!(ipv4_header_ok(&p[..20]));
        p[8] = 1;
        set_ipv4_checksum(&mut p[..20]);
        assert!(!decrement_ttl(&mut p));
        // Every TTL and checksum combination stays consistent (RFC 1624's corner: 0xffff).
        for ttl in 2..=255u8 {
            let mut q = tcp_packet(1, 0x10, b"x");
            q[8] = ttl;
            set_ipv4_checksum(&mut q[..20]);
            assert!(decrement_ttl(&mut q));
            assert!(ipv4_header_ok(&q[..20]), "ttl {ttl}");
        }
    }

    #[test]
    fn vxlan_header_round_trip_and_checks() {
        let ours = MacAddr([2, 0, 0, 0, 0, 1]);
        let theirs = MacAddr([2, 0, 0, 0, 0, 2]);
        let mut d = vec![0u8; VXLAN_PREFIX];
        vxlan_prefix(&mut d, 1, ours, theirs);
        assert_eq!(&d[..8], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(vxlan_inner(&d, 1, ours), Ok(VXLAN_PREFIX));
        assert_eq!(vxlan_inner(&d, 2, ours), Err(Verdict::OtherVni));
        assert_eq!(vxlan_inner(&d, 1, theirs), Err(Verdict::OtherMac));
        assert_eq!(vxlan_inner(&d[..21], 1, ours), Err(Verdict::Truncated));
        let mut flags = d.clone();
        flags[0] = 0x0c;
        assert_eq!(vxlan_inner(&flags, 1, ours), Err(Verdict::BadHeader));
        let mut arp = d.clone();
        arp[20..22].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(vxlan_inner(&arp, 1, ours), Err(Verdict::NotIpv4));
        let mut big = d;
        vxlan_prefix(&mut big, 0x00ab_cdef, ours, theirs);
        assert_eq!(&big[4..8], &[0xab, 0xcd, 0xef, 0]);
    }

    #[test]
    fn icmp_unreachable_quotes_the_packet() {
        let p = tcp_packet(1, 0x10, &[7; 100]);
        let from = Ipv4Addr::new(10, 5, 1, 0);
        let r = icmp_net_unreachable(&p, from).unwrap();
        let h = parse_ipv4(&r).unwrap();
        assert_eq!(
            (h.src, h.dst, h.proto),
            (from, Ipv4Addr::new(10, 5, 1, 2), 1)
        );
        assert!(ipv4_header_ok(&r[..20]));
        assert_eq!((r[20], r[21]), (3, 0));
        assert_eq!(fold(sum(&r[20..], 0)), 0xffff);
        assert_eq!(&r[28..], &p[..28]);
        // Never about an ICMP error.
        assert!(icmp_net_unreachable(&r, from).is_none());
    }

    #[test]
    fn received_partial_checksums_are_completed_and_bad_ones_caught() {
        let good = tcp_packet(1, 0x10, b"payload bytes");
        let ip = parse_ipv4(&good).unwrap();
        let mut p = good.clone();
        assert_eq!(l4_checksum(&mut p, &ip), L4Checksum::Valid);
        assert_eq!(p, good);
        // As a same-host sender leaves it: the pseudo-header sum only.
        let ps = fold(pseudo(&p[12..16], &p[16..20], 6, p.len() - 20));
        p[36..38].copy_from_slice(&ps.to_be_bytes());
        assert_eq!(l4_checksum(&mut p, &ip), L4Checksum::Valid);
        assert_eq!(p, good, "completed to the real checksum");
        let mut bad = good.clone();
        bad[45] ^= 0x40;
        assert_eq!(l4_checksum(&mut bad, &ip), L4Checksum::Invalid);
        let mut icmp = good.clone();
        icmp[9] = IPPROTO_ICMP;
        let ip = parse_ipv4(&icmp).unwrap();
        assert_eq!(l4_checksum(&mut icmp, &ip), L4Checksum::Unchecked);
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut p = tcp_packet(1, 0x10, b"some data");
        let want = [p[36], p[37]];
        // What the kernel hands over with NEEDS_CSUM: the pseudo-header sum, not inverted.
        let ps = fold(pseudo(&p[12..16], &p[16..20], 6, p.len() - 20));
        p[36..38].copy_from_slice(&ps.to_be_bytes());
        finish_checksum(&mut p, 20, 16).unwrap();
        assert_eq!([p[36], p[37]], want);
        assert!(finish_checksum(&mut p, 60, 16).is_err());
        assert!(finish_checksum(&mut p, usize::MAX, 16).is_err());
    }

    /// A TSO super-packet as the TUN gives it: partial checksum, GSO header.
    fn super_packet(payload_len: usize, mss: u16) -> (Vec<u8>, VnetHdr) {
        let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7) as u8).collect();
        let mut p = tcp_packet(1000, 0x18 | 0x01, &payload); // ACK PSH FIN
        let ps = fold(pseudo(&p[12..16], &p[16..20], 6, p.len() - 20));
        p[36..38].copy_from_slice(&ps.to_be_bytes());
        let hdr = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        (p, hdr)
    }

    #[test]
    fn tso_segments_are_valid_tcp_and_regrow() {
        let (p, hdr) = super_packet(5000, 1400);
        let tso = Tso::new(&p, &hdr).unwrap();
        assert_eq!(tso.count(), 4);
        let mut out = vec![0u8; tso.full_len()];
        let mut payload = Vec::new();
        let mut gro = Gro::new(1500);
        for i in 0..tso.count() {
            let n = tso.segment(i, &mut out, true);
            let seg = &out[..n];
            let h = parse_ipv4(seg).unwrap();
            assert_eq!(h.total_len, n);
            assert_eq!(h.ttl, 63);
            assert!(ipv4_header_ok(&seg[..20]));
            assert!(tcp_checksum_ok(seg, 20), "segment {i}");
            let seq = u32::from_be_bytes(seg[24..28].try_into().unwrap());
            assert_eq!(seq, 1000 + 1400 * i as u32);
            let last = i == 3;
            assert_eq!(seg[33] & 0x09 != 0, last, "FIN/PSH only on the last");
            payload.extend_from_slice(&seg[40..]);
            // The receiver's GRO takes them back (the FIN one ends it and stays apart).
            if !last {
                assert_eq!(gro.push(seg, &h, tcp_checksum_ok(seg, 20)), GroPush::Merged);
            } else {
                assert_eq!(
                    gro.push(seg, &h, tcp_checksum_ok(seg, 20)),
                    GroPush::FlushFirst
                );
            }
        }
        assert_eq!(payload, &p[40..]);
        let merged = gro.take().unwrap().to_vec();
        let vh = VnetHdr::parse(&merged).unwrap();
        assert_eq!(
            (
                vh.gso_type,
                vh.gso_size,
                vh.csum_start,
                vh.csum_offset,
                vh.flags
            ),
            (VNET_GSO_TCPV4, 1400, 20, 16, VNET_F_NEEDS_CSUM)
        );
        let m = &merged[VNET_HDR_LEN..];
        let h = parse_ipv4(m).unwrap();
        assert_eq!(h.total_len, 40 + 4200);
        assert!(ipv4_header_ok(&m[..20]));
        assert_eq!(&m[40..], &p[40..40 + 4200]);
        // The check field holds the pseudo-header sum the kernel completes.
        let mut full = m.to_vec();
        finish_checksum(&mut full, 20, 16).unwrap();
        assert!(tcp_checksum_ok(&full, 20));
    }

    #[test]
    fn gro_refuses_gaps_other_flows_and_bad_checksums() {
        let a = tcp_packet(0, 0x10, &[1; 100]);
        let gap = tcp_packet(200, 0x10, &[1; 100]);
        let mut bad = tcp_packet(100, 0x10, &[1; 100]);
        bad[50] ^= 1;
        let mut other = tcp_packet(100, 0x10, &[1; 100]);
        other[22] = 9;
        for (q, what) in [
            (&gap, "gap"),
            (&bad, "bad checksum"),
            (&other, "other port"),
        ] {
            let mut g = Gro::new(1500);
            assert_eq!(g.push(&a, &parse_ipv4(&a).unwrap(), true), GroPush::Merged);
            assert_eq!(
                g.push(q, &parse_ipv4(q).unwrap(), tcp_checksum_ok(q, 20)),
                GroPush::FlushFirst,
                "{what}"
            );
            // A single packet goes out untouched, with an empty vnet header.
            let out = g.take().unwrap();
            assert_eq!(&out[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
            assert_eq!(&out[VNET_HDR_LEN..], &a[..]);
            assert!(g.take().is_none());
        }
        // Non-TCP packets pass alone.
        let mut g = Gro::new(1500);
        let mut udp = a.clone();
        udp[9] = IPPROTO_UDP;
        set_ipv4_checksum(&mut udp[..20]);
        assert_eq!(
            g.push(&udp, &parse_ipv4(&udp).unwrap(), true),
            GroPush::Merged
        );
        assert_eq!(
            g.push(&a, &parse_ipv4(&a).unwrap(), true),
            GroPush::FlushFirst
        );
    }

    #[test]
    fn an_oversized_tcp_packet_goes_to_the_tun_as_gso() {
        let big = tcp_packet(5, 0x10, &[3; 7000]);
        let mut g = Gro::new(1450);
        assert_eq!(
            g.push(&big, &parse_ipv4(&big).unwrap(), true),
            GroPush::Merged
        );
        let next = tcp_packet(7005, 0x10, &[3; 100]);
        assert_eq!(
            g.push(&next, &parse_ipv4(&next).unwrap(), true),
            GroPush::FlushFirst
        );
        let out = g.take().unwrap();
        let vh = VnetHdr::parse(out).unwrap();
        assert_eq!((vh.gso_type, vh.gso_size), (VNET_GSO_TCPV4, 1410));
        assert_eq!(&out[VNET_HDR_LEN + 40..], &big[40..]);
    }

    #[test]
    fn tso_rejects_what_it_did_not_ask_for() {
        let (p, hdr) = super_packet(3000, 1400);
        assert!(Tso::new(&p, &VnetHdr { gso_size: 0, ..hdr }).is_err());
        assert!(
            Tso::new(
                &p,
                &VnetHdr {
                    csum_start: 24,
                    ..hdr
                }
            )
            .is_err()
        );
        let mut udp = p.clone();
        udp[9] = IPPROTO_UDP;
        assert!(Tso::new(&udp, &hdr).is_err());
        for n in 0..60 {
            let _ = Tso::new(&p[..n], &hdr);
        }
    }
}
