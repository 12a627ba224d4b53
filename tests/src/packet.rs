//! Frame builders and checksums for crafted packets, written independently of the
//! programs and daemons under test.

use std::net::Ipv4Addr;

/// An IPv4 address as the `u32` whose in-memory bytes are the address in network order
/// (the `*_be` fields of the BPF maps).
pub fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The netmask of a `/len` prefix, in the same representation as [`be`].
pub fn mask(len: u8) -> u32 {
    be(Ipv4Addr::from(u32::MAX << (32 - u32::from(len))))
}

/// The Internet checksum (RFC 1071) of `bytes`, an odd trailing byte padded with zero.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet header: `dst`, `src`, EtherType `proto`.
pub fn eth(dst: [u8; 6], src: [u8; 6], proto: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&dst);
    v.extend_from_slice(&src);
    v.extend_from_slice(&proto.to_be_bytes());
    v
}

/// An IPv4 header builder; [`Ip::new`] gives the defaults, struct update syntax the rest.
#[derive(Clone, Copy)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset (default `0x4000`: DF).
    pub frag: u16,
    pub ttl: u8,
    /// Header length in 32-bit words (options, if any, are zero bytes).
    pub ihl: u8,
}

impl Ip {
    /// `src` → `dst` with protocol `proto`: id 0x1234, DF, TTL 64, no options.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Ip {
        Ip {
            src,
            dst,
            proto,
            tos: 0,
            id: 0x1234,
            frag: 0x4000,
            ttl: 64,
            ihl: 5,
        }
    }

    /// The header, with its checksum, followed by `payload`.
    pub fn bytes(&self, payload: &[u8]) -> Vec<u8> {
        let hl = usize::from(self.ihl) * 4;
        let mut h = vec![0u8; hl];
        h[0] = 0x40 | self.ihl;
        h[1] = self.tos;
        h[2..4].copy_from_slice(&((hl + payload.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// An ICMP echo request (id 0x1234, sequence 1) with `n` payload bytes 0, 1, 2, ...
pub fn icmp(n: usize) -> Vec<u8> {
    let mut v = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    v.extend((0..n).map(|i| i as u8));
    let c = checksum(&v);
    v[2..4].copy_from_slice(&c.to_be_bytes());
    v
}

/// A UDP header (checksum 0: none) from `sport` to `dport`, followed by `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(payload);
    v
}

/// A VXLAN header (I flag) for `vni`.
pub fn vxlan_hdr(vni: u32) -> [u8; 8] {
    let v = vni.to_be_bytes();
    [0x08, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// A VXLAN UDP payload: the header for `vni`, then an Ethernet frame `src_mac` →
/// `dst_mac` carrying the IPv4 packet `inner`.
pub fn vxlan_payload(vni: u32, dst_mac: [u8; 6], src_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let mut v = vxlan_hdr(vni).to_vec();
    v.extend(eth(dst_mac, src_mac, 0x0800));
    v.extend_from_slice(inner);
    v
}

/// A MAC address in `aa:bb:cc:dd:ee:ff` form as bytes.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next().expect("six octets"), 16).expect("hex");
    }
    mac
}

/// Lower-case hex of `b`, no separators.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
