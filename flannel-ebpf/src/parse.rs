//! The only code that touches packet bytes.
//!
//! Reads go through [`read`], which makes a pointer into the skb's linear data only after
//! checking, in plain sight of the verifier, that `data + offset + size_of::<T>()` does not
//! pass `data_end`. Headers that are not in the linear part are pulled in first
//! ([`ensure_linear`]). Writes go through [`write`] (`bpf_skb_store_bytes`, bounds-checked
//! by the kernel), so no packet pointer survives a call that can move the data
//! (`adjust_room`, `pull_data`): every pointer is made, read and dropped inside [`read`].

use aya_ebpf::programs::TcContext;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options (IHL 5).
pub const IPV4_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// VXLAN header length.
pub const VXLAN_LEN: usize = 8;
/// Bytes VXLAN adds in front of the inner Ethernet frame, outer Ethernet excluded.
pub const ENCAP_LEN: usize = IPV4_LEN + UDP_LEN + VXLAN_LEN + ETH_LEN;
/// Everything up to and including the inner IPv4 header of a VXLAN frame.
pub const DECAP_HEADERS_LEN: usize = ETH_LEN + ENCAP_LEN + IPV4_LEN;
/// Bytes flannel's udp backend adds in front of the inner IPv4 packet.
pub const UDP_ENCAP_LEN: usize = IPV4_LEN + UDP_LEN;
/// Everything up to and including the inner IPv4 header of a flannel-udp frame.
pub const UDP_DECAP_HEADERS_LEN: usize = ETH_LEN + UDP_ENCAP_LEN + IPV4_LEN;
/// Offset of the TTL (followed by the protocol and the checksum) in an IPv4 header.
pub const IPV4_TTL_AT: usize = 8;

/// An Ethernet header, as bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Eth {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

/// An IPv4 header without options, as bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// A UDP header, as bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Udp {
    pub src: [u8; 2],
    pub dst: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// A VXLAN header, as bytes: flags, 3 reserved, VNI (3), 1 reserved.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Vxlan {
    pub flags: [u8; 4],
    pub vni: [u8; 4],
}

const _: () = assert!(size_of::<Eth>() == ETH_LEN);
const _: () = assert!(size_of::<Ipv4>() == IPV4_LEN);
const _: () = assert!(size_of::<Udp>() == UDP_LEN);
const _: () = assert!(size_of::<Vxlan>() == VXLAN_LEN);

/// Reads a `T` (a byte-array header, alignment 1) at `offset`, or `None` when the linear
/// data is shorter than `offset + size_of::<T>()`.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    let size = size_of::<T>();
    if start + offset + size > end {
        return None;
    }
    let ptr = (start + offset) as *const T;
    // SAFETY: the check above proves `[start + offset, start + offset + size)` lies inside
    // the skb's linear data `[data, data_end)`, which stays valid and unmoved until the
    // next helper call that can change the packet; the read happens before any. `T` is a
    // plain byte array struct, valid for every bit pattern, and read unaligned.
    Some(unsafe { ptr.read_unaligned() })
}

/// Tries to make the first `len` bytes (or the whole skb, if shorter) linear, so that
/// [`read`] can see them. Cheap when they already are, which is the common case; whether
/// it worked shows in the following [`read`]s.
#[inline(always)]
pub fn ensure_linear(ctx: &TcContext, len: usize) {
    if ctx.data() + len <= ctx.data_end() {
        return;
    }
    let want = if (ctx.len() as usize) < len {
        ctx.len()
    } else {
        len as u32
    };
    // A failed pull leaves the skb as it was; the reads then fail and the packet passes.
    let _ = ctx.pull_data(want);
}

/// Writes `value` at `offset` (`bpf_skb_store_bytes`; the kernel checks the bounds).
#[inline(always)]
pub fn write<T>(ctx: &TcContext, offset: usize, value: &T) -> Result<(), ()> {
    ctx.store(offset, value, 0).map_err(|_| ())
}
