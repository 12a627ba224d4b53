//! Numbers both sides agree on.

/// Default VXLAN UDP port on Linux (the kernel's, not IANA's 4789), as flannel uses.
pub const VXLAN_DEFAULT_PORT: u16 = 8472;
/// Default UDP port of flannel's udp backend.
pub const UDP_DEFAULT_PORT: u16 = 8285;
/// Outer Ethernet + IPv4 + UDP + VXLAN header bytes.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Outer IPv4 + UDP header bytes of the udp backend.
pub const UDP_OVERHEAD: u32 = 28;
