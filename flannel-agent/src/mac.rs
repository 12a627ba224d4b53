//! Ethernet MAC addresses, written as Go's `net.HardwareAddr.String()` does.

use std::{fmt, str::FromStr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six colon-separated hex bytes")]
pub struct MacParseError(String);

impl MacAddr {
    /// A random, locally administered, unicast MAC (flannel's `pkg/mac`).
    pub fn random_local() -> Self {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        Self(b)
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Usable as a VTEP address: unicast and not all zeros.
    pub fn is_valid_vtep(&self) -> bool {
        self.is_unicast() && !self.is_zero()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            let mut shown = s.to_owned();
            shown.truncate(shown.floor_char_boundary(40));
            MacParseError(shown)
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_case() {
        let m: MacAddr = "C6:D2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        for bad in [
            "",
            "c6:d2:32:6f:8f",
            "c6:d2:32:6f:8f:44:00",
            "c6-d2-32-6f-8f-44",
            "+6:d2:32:6f:8f:44",
            "c6:d2:32:6f:8f:4",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_is_local_unicast() {
        for _ in 0..64 {
            let m = MacAddr::random_local();
            assert!(m.is_valid_vtep());
            assert_eq!(m.0[0] & 0x02, 0x02);
        }
    }
}
