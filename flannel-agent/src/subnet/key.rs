//! Subnet keys under `<prefix>/subnets/`: `10.5.34.0-24`, or `10.5.34.0-24&fd00:12:13::-56`
//! for dual stack (flannel's `MakeSubnetKey` / `ParseSubnetKey`).
//!
//! flannel's regex is unanchored and loose; this parser is exact: the whole key must be
//! a canonical subnet (network address, no host bits), or it is rejected.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Longest key we will look at; a real one is at most ~60 bytes.
const MAX_KEY_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subnet key {key:?}: {reason}")]
pub struct SubnetKeyError {
    pub key: String,
    pub reason: &'static str,
}

/// The subnets a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    pub ipv4: Ipv4Net,
    pub ipv6: Option<Ipv6Net>,
}

impl SubnetKey {
    pub fn v4(ipv4: Ipv4Net) -> Self {
        Self { ipv4, ipv6: None }
    }

    pub fn parse(key: &str) -> Result<Self, SubnetKeyError> {
        let fail = |reason| SubnetKeyError {
            key: truncate(key),
            reason,
        };
        if key.len() > MAX_KEY_LEN {
            return Err(fail("too long"));
        }
        let (v4, v6) = match key.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (key, None),
        };
        let (ip, len) = split_prefix(v4).ok_or_else(|| fail("expected <ipv4>-<prefix>"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| fail("bad IPv4 address"))?;
        let ipv4 = Ipv4Net::new(ip, len).map_err(|_| fail("IPv4 prefix longer than 32"))?;
        if ipv4.network() != ip {
            return Err(fail("IPv4 address has host bits set"));
        }
        let ipv6 = match v6 {
            None => None,
            Some(v6) => {
                let (ip, len) =
                    split_prefix(v6).ok_or_else(|| fail("expected <ipv6>-<prefix> after &"))?;
                if !ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                    return Err(fail("bad IPv6 address"));
                }
                let ip: Ipv6Addr = ip.parse().map_err(|_| fail("bad IPv6 address"))?;
                let net = Ipv6Net::new(ip, len).map_err(|_| fail("IPv6 prefix longer than 128"))?;
                if net.network() != ip {
                    return Err(fail("IPv6 address has host bits set"));
                }
                Some(net)
            }
        };
        Ok(Self { ipv4, ipv6 })
    }
}

impl std::fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ipv4.network(), self.ipv4.prefix_len())?;
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.network(), v6.prefix_len())?;
        }
        Ok(())
    }
}

/// Splits `addr-len` where `len` is 1..=3 decimal digits.
fn split_prefix(s: &str) -> Option<(&str, u8)> {
    let (ip, len) = s.rsplit_once('-')?;
    let digits = !len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit());
    // A leading zero ("-024") would not round-trip to the same key.
    if ip.is_empty() || !digits || (len.len() > 1 && len.starts_with('0')) {
        return None;
    }
    Some((ip, len.parse().ok()?))
}

fn truncate(s: &str) -> String {
    let mut s = s.to_owned();
    if s.len() > 80 {
        s.truncate(s.floor_char_boundary(80));
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_round_trips() {
        for k in [
            "10.12.13.0-24",
            "10.12.13.0-24&fd00:12:13::-56",
            "10.5.52.0-24",
            "0.0.0.0-0",
        ] {
            assert_eq!(SubnetKey::parse(k).unwrap().to_string(), k);
        }
        let k = SubnetKey::parse("10.12.13.0-24&fd00:12:13::-56").unwrap();
        assert_eq!(k.ipv4.to_string(), "10.12.13.0/24");
        assert_eq!(k.ipv6.unwrap().to_string(), "fd00:12:13::/56");
    }

    #[test]
    fn flannel_invalid_keys() {
        for k in [
            "10.12.13.300-24",
            "10.12.13.0-24hi",
            "&2001::-56",
            "10.12.13.0-24&2001::",
            "10.12.13.0-24&2001::-",
            "10.12.13.0-24&2001::-56hi",
            "10.12.13.0-24&",
            "10.12.13.0",
            "10.12.13.0-",
            "-24",
            "10.12.13.0/24",
            "10.12.13.0-33",
            "10.12.13.0-24&2001::-129",
            "10.12.13.1-24",
            "x10.12.13.0-24",
            "10.12.13.0-+24",
            "10.12.13.0-0024",
            "10.12.13.0-024",
            "10.12.13.0-24&::ffff:1.2.3.0-120",
            "",
        ] {
            assert!(SubnetKey::parse(k).is_err(), "{k} should be invalid");
        }
    }

    #[test]
    fn error_names_the_key() {
        let e = SubnetKey::parse("10.12.13.300-24").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid subnet key \"10.12.13.300-24\": bad IPv4 address"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = SubnetKey::parse(&s);
        }

        #[test]
        fn canonical_keys_round_trip(a in proptest::num::u32::ANY, len in 0u8..=32) {
            let net = Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc();
            let key = SubnetKey::v4(net);
            proptest::prop_assert_eq!(SubnetKey::parse(&key.to_string()).unwrap(), key);
        }
    }
}
