//! Internet checksums, pure.

/// The IPv4 header checksum of `hdr` (whose checksum field must be zero), in the byte
/// order it is stored in (network order, as two bytes).
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    // Two folds suffice for ten 16-bit words (at most 0x9_fff6 before folding).
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The TTL, protocol and checksum bytes (offsets 8..12) of an IPv4 header after
/// decrementing its TTL by one, like flanneld's `decrement_ttl` does for every packet of
/// the udp backend. The checksum is updated incrementally (RFC 1624, eqn. 3:
/// `HC' = ~(~HC + ~m + m')` over the 16-bit word holding TTL and protocol), so a header
/// that was valid stays valid, and one that was not stays invalid for the receiver to
/// notice. The caller makes sure `ttl > 1`.
#[inline(always)]
pub fn ttl_decremented(ttl: u8, proto: u8, check: [u8; 2]) -> [u8; 4] {
    let new_ttl = ttl.wrapping_sub(1);
    let old_word = u32::from(u16::from_be_bytes([ttl, proto]));
    let new_word = u32::from(u16::from_be_bytes([new_ttl, proto]));
    let hc = u32::from(u16::from_be_bytes(check));
    let mut sum = (!hc & 0xffff) + (!old_word & 0xffff) + new_word;
    // Three 16-bit values: at most 0x2_fffd before folding; two folds suffice.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let c = (!(sum as u16)).to_be_bytes();
    [new_ttl, proto, c[0], c[1]]
}
