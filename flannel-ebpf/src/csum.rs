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
