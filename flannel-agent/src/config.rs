//! The network config stored at `<etcd-prefix>/config`.
//!
//! Parsed the way flannel's Go code does it (`pkg/subnet/config.go`): key names are
//! case-insensitive (Go's `encoding/json`; where two keys differ only in case the later
//! one wins), unknown keys are ignored, `EnableIPv4` defaults to true, and
//! `SubnetLen`/`SubnetMin`/`SubnetMax` are defaulted and validated with flannel's rules
//! and error texts. A missing `Backend` means udp, as in flannel's code.
//!
//! Parsing is pure: it never panics on any input, and every error names what was wrong.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use flannel_common::consts::{UDP_DEFAULT_PORT, VXLAN_DEFAULT_PORT};
use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

/// Largest config we accept; flannel configs are a few hundred bytes.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("flannel config not found in etcd store. Did you create your config using etcdv3 API?")]
    NotFound,
    #[error("network config is {0} bytes, more than the {MAX_CONFIG_BYTES} allowed")]
    TooLarge(usize),
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error("network config must be a JSON object")]
    NotAnObject,
    #[error("config key {key}: expected {expected}, got {got}")]
    WrongType {
        key: String,
        expected: &'static str,
        got: String,
    },
    #[error("config key {key}: {reason}")]
    BadValue { key: String, reason: String },
    #[error("please define a correct Network parameter in the flannel config")]
    MissingNetwork,
    #[error("please define a correct IPv6Network parameter in the flannel config")]
    MissingIpv6Network,
    #[error("SubnetLen must be less than /31")]
    SubnetLenTooLong,
    #[error("SubnetLen must be less than /127")]
    Ipv6SubnetLenTooLong,
    #[error("network must be able to accommodate at least four subnets")]
    TooFewSubnets,
    #[error("network is too small. Minimum useful network prefix is /28")]
    NetworkTooSmall,
    #[error("IPv6Network is too small. Minimum useful network prefix is /124")]
    Ipv6NetworkTooSmall,
    #[error("SubnetMin is not in the range of the Network")]
    SubnetMinOutOfRange,
    #[error("SubnetMax is not in the range of the Network")]
    SubnetMaxOutOfRange,
    #[error("IPv6SubnetMin is not in the range of the IPv6Network")]
    Ipv6SubnetMinOutOfRange,
    #[error("IPv6SubnetMax is not in the range of the IPv6Network")]
    Ipv6SubnetMaxOutOfRange,
    #[error("SubnetMin is not on a SubnetLen boundary: {0}")]
    SubnetMinUnaligned(String),
    #[error("SubnetMax is not on a SubnetLen boundary: {0}")]
    SubnetMaxUnaligned(String),
    #[error("IPv6SubnetMin is not on a SubnetLen boundary: {0}")]
    Ipv6SubnetMinUnaligned(String),
    #[error("IPv6SubnetMax is not on a SubnetLen boundary: {0}")]
    Ipv6SubnetMaxUnaligned(String),
    #[error("SubnetMin {min} is greater than SubnetMax {max}")]
    SubnetMinAboveMax { min: String, max: String },
    #[error("none defined stack: EnableIPv4 and EnableIPv6 are both false")]
    NoStack,
    #[error("unknown backend type: {0}")]
    UnknownBackend(String),
    #[error(
        "backend type {0} is not supported by this flanneld (supported: vxlan, host-gw, udp, alloc)"
    )]
    UnsupportedBackend(String),
    #[error("EnableIPv6 is not supported yet: this flanneld has no IPv6 dataplane")]
    Ipv6NotSupported,
}

/// A validated network config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub enable_nftables: bool,
    /// Present when `enable_ipv4`.
    pub ipv4: Option<Ipv4Range>,
    /// Present when `enable_ipv6`.
    pub ipv6: Option<Ipv6Range>,
    pub backend: BackendConfig,
    /// True when the config had no `Backend` object and udp was assumed.
    pub backend_defaulted: bool,
}

/// The IPv4 network and the range subnets are leased from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Range {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    /// Inclusive bounds on the network address of each subnet.
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Range {
    pub network: Ipv6Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Vxlan(VxlanConfig),
    Udp(UdpConfig),
    HostGw,
    /// Lease only, no dataplane.
    Alloc,
}

impl BackendConfig {
    /// The backend's name as flannel spells it in `Backend.Type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Vxlan(_) => "vxlan",
            Self::Udp(_) => "udp",
            Self::HostGw => "host-gw",
            Self::Alloc => "alloc",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// The UDP port; flannel's 0 means the kernel default, 8472.
    pub port: u16,
    /// The underlay MTU; `None` means the external interface's MTU.
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpConfig {
    pub port: u16,
}

impl NetworkConfig {
    /// Refuses what this flanneld cannot run yet, after the config itself is known valid.
    pub fn check_supported(&self) -> Result<(), ConfigError> {
        if self.enable_ipv6 {
            return Err(ConfigError::Ipv6NotSupported);
        }
        Ok(())
    }

    /// The IPv4 range, which every supported config has.
    pub fn ipv4(&self) -> Result<&Ipv4Range, ConfigError> {
        self.ipv4.as_ref().ok_or(ConfigError::MissingNetwork)
    }
}

/// A JSON object whose keys are looked up case-insensitively, later keys winning.
struct Fields<'a> {
    map: BTreeMap<String, (&'a str, &'a Value)>,
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, prefix: &'static str) -> Result<Self, ConfigError> {
        let Value::Object(obj) = value else {
            return Err(ConfigError::NotAnObject);
        };
        let mut map = BTreeMap::new();
        // serde_json's `preserve_order` keeps document order, so the last of two keys
        // that differ only in case wins, as in Go.
        for (k, v) in obj {
            map.insert(k.to_ascii_lowercase(), (k.as_str(), v));
        }
        Ok(Self { map, prefix })
    }

    fn get(&self, key: &str) -> Option<(&'a str, &'a Value)> {
        match self.map.get(&key.to_ascii_lowercase()) {
            // JSON null leaves a Go field at its zero value.
            Some((_, Value::Null)) | None => None,
            Some(&(k, v)) => Some((k, v)),
        }
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some((_, Value::Bool(b))) => Ok(*b),
            Some((_, v)) => Err(self.wrong(key, "a boolean", v)),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some((_, Value::String(s))) => Ok(Some(s.as_str())),
            Some((_, v)) => Err(self.wrong(key, "a string", v)),
        }
    }

    fn uint(&self, key: &str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some((_, v @ Value::Number(n))) => match n.as_u64() {
                Some(x) if x <= max => Ok(Some(x)),
                _ => Err(self.wrong(key, "a non-negative integer in range", v)),
            },
            Some((_, v)) => Err(self.wrong(key, "a number", v)),
        }
    }

    fn wrong(&self, key: &str, expected: &'static str, got: &Value) -> ConfigError {
        let mut got = got.to_string();
        if got.len() > 64 {
            got.truncate(got.floor_char_boundary(64));
            got.push_str("...");
        }
        ConfigError::WrongType {
            key: self.name(key),
            expected,
            got,
        }
    }

    fn bad(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::BadValue {
            key: self.name(key),
            reason: reason.into(),
        }
    }
}

/// Parses and validates a network config, as flannel's `ParseConfig` + `CheckNetworkConfig`.
pub fn parse_config(bytes: &[u8]) -> Result<NetworkConfig, ConfigError> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge(bytes.len()));
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
    let f = Fields::new(&value, "")?;

    let enable_ipv4 = f.bool("EnableIPv4", true)?;
    let enable_ipv6 = f.bool("EnableIPv6", false)?;
    let enable_nftables = f.bool("EnableNFTables", false)?;
    if !enable_ipv4 && !enable_ipv6 {
        return Err(ConfigError::NoStack);
    }

    // Parse every key before validating, so a typo anywhere is reported.
    let network = match f.str("Network")? {
        None | Some("") => None,
        Some(s) => Some(parse_v4_cidr(&f, "Network", s)?),
    };
    let subnet_len = f.uint("SubnetLen", 255)?;
    let subnet_min = opt_v4(&f, "SubnetMin")?;
    let subnet_max = opt_v4(&f, "SubnetMax")?;
    let v6_network = match f.str("IPv6Network")? {
        None | Some("") => None,
        Some(s) => Some(parse_v6_cidr(&f, "IPv6Network", s)?),
    };
    let v6_subnet_len = f.uint("IPv6SubnetLen", 255)?;
    let v6_min = opt_v6(&f, "IPv6SubnetMin")?;
    let v6_max = opt_v6(&f, "IPv6SubnetMax")?;
    let (backend, backend_defaulted) = parse_backend(f.get("Backend").map(|(_, v)| v))?;

    let ipv4 = if enable_ipv4 {
        let network = network.ok_or(ConfigError::MissingNetwork)?;
        Some(check_v4(network, subnet_len, subnet_min, subnet_max)?)
    } else {
        None
    };
    let ipv6 = if enable_ipv6 {
        let network = v6_network.ok_or(ConfigError::MissingIpv6Network)?;
        Some(check_v6(network, v6_subnet_len, v6_min, v6_max)?)
    } else {
        None
    };

    Ok(NetworkConfig {
        enable_ipv4,
        enable_ipv6,
        enable_nftables,
        ipv4,
        ipv6,
        backend,
        backend_defaulted,
    })
}

fn parse_v4_cidr(f: &Fields<'_>, key: &str, s: &str) -> Result<Ipv4Net, ConfigError> {
    match s.parse::<Ipv4Net>() {
        // Like Go's net.ParseCIDR, host bits are dropped: 10.1.2.3/16 is 10.1.0.0/16.
        Ok(n) => Ok(n.trunc()),
        Err(_) => Err(f.bad(key, format!("invalid IPv4 CIDR format: {s:?}"))),
    }
}

fn parse_v6_cidr(f: &Fields<'_>, key: &str, s: &str) -> Result<Ipv6Net, ConfigError> {
    match s.parse::<Ipv6Net>() {
        Ok(n) => Ok(n.trunc()),
        Err(_) => Err(f.bad(key, format!("invalid IPv6 CIDR format: {s:?}"))),
    }
}

fn opt_v4(f: &Fields<'_>, key: &str) -> Result<Option<Ipv4Addr>, ConfigError> {
    match f.str(key)? {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse::<Ipv4Addr>()
            .map(|ip| (!ip.is_unspecified()).then_some(ip))
            .map_err(|_| f.bad(key, format!("invalid IPv4 address: {s:?}"))),
    }
}

fn opt_v6(f: &Fields<'_>, key: &str) -> Result<Option<Ipv6Addr>, ConfigError> {
    match f.str(key)? {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse::<Ipv6Addr>()
            .map(|ip| (!ip.is_unspecified()).then_some(ip))
            .map_err(|_| f.bad(key, format!("invalid IPv6 address: {s:?}"))),
    }
}

fn check_v4(
    network: Ipv4Net,
    subnet_len: Option<u64>,
    min: Option<Ipv4Addr>,
    max: Option<Ipv4Addr>,
) -> Result<Ipv4Range, ConfigError> {
    let prefix = network.prefix_len();
    let subnet_len: u8 = match subnet_len {
        Some(len) if len > 0 => {
            if len > 30 {
                return Err(ConfigError::SubnetLenTooLong);
            }
            if len < u64::from(prefix) + 2 {
                return Err(ConfigError::TooFewSubnets);
            }
            len as u8 // <= 30
        }
        _ => {
            if prefix > 28 {
                return Err(ConfigError::NetworkTooSmall);
            }
            if prefix <= 22 { 24 } else { prefix + 2 }
        }
    };
    let size = 1u32 << (32 - subnet_len);
    let net = u32::from(network.network());
    let subnet_min = match min {
        None => Ipv4Addr::from(net + size),
        Some(ip) if !network.contains(&ip) => return Err(ConfigError::SubnetMinOutOfRange),
        Some(ip) => ip,
    };
    let subnet_max = match max {
        // The last subnet: Network.Next().IP - subnetSize, computed without overflow.
        None => Ipv4Addr::from(u32::from(network.broadcast()) - (size - 1)),
        Some(ip) if !network.contains(&ip) => return Err(ConfigError::SubnetMaxOutOfRange),
        Some(ip) => ip,
    };
    let mask = u32::MAX << (32 - subnet_len);
    if u32::from(subnet_min) & mask != u32::from(subnet_min) {
        return Err(ConfigError::SubnetMinUnaligned(subnet_min.to_string()));
    }
    if u32::from(subnet_max) & mask != u32::from(subnet_max) {
        return Err(ConfigError::SubnetMaxUnaligned(subnet_max.to_string()));
    }
    if subnet_min > subnet_max {
        return Err(ConfigError::SubnetMinAboveMax {
            min: subnet_min.to_string(),
            max: subnet_max.to_string(),
        });
    }
    Ok(Ipv4Range {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

fn check_v6(
    network: Ipv6Net,
    subnet_len: Option<u64>,
    min: Option<Ipv6Addr>,
    max: Option<Ipv6Addr>,
) -> Result<Ipv6Range, ConfigError> {
    let prefix = network.prefix_len();
    let subnet_len: u8 = match subnet_len {
        Some(len) if len > 0 => {
            if len > 126 {
                return Err(ConfigError::Ipv6SubnetLenTooLong);
            }
            if len < u64::from(prefix) + 2 {
                return Err(ConfigError::TooFewSubnets);
            }
            len as u8 // <= 126
        }
        _ => {
            if prefix > 124 {
                return Err(ConfigError::Ipv6NetworkTooSmall);
            }
            if prefix <= 62 { 64 } else { prefix + 2 }
        }
    };
    let size = 1u128 << (128 - subnet_len);
    let net = u128::from(network.network());
    let subnet_min = match min {
        None => Ipv6Addr::from(net + size),
        Some(ip) if !network.contains(&ip) => return Err(ConfigError::Ipv6SubnetMinOutOfRange),
        Some(ip) => ip,
    };
    let subnet_max = match max {
        None => Ipv6Addr::from(u128::from(network.broadcast()) - (size - 1)),
        Some(ip) if !network.contains(&ip) => return Err(ConfigError::Ipv6SubnetMaxOutOfRange),
        Some(ip) => ip,
    };
    let mask = u128::MAX << (128 - subnet_len);
    if u128::from(subnet_min) & mask != u128::from(subnet_min) {
        return Err(ConfigError::Ipv6SubnetMinUnaligned(subnet_min.to_string()));
    }
    if u128::from(subnet_max) & mask != u128::from(subnet_max) {
        return Err(ConfigError::Ipv6SubnetMaxUnaligned(subnet_max.to_string()));
    }
    Ok(Ipv6Range {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

fn parse_backend(value: Option<&Value>) -> Result<(BackendConfig, bool), ConfigError> {
    let Some(value) = value else {
        return Ok((
            BackendConfig::Udp(UdpConfig {
                port: UDP_DEFAULT_PORT,
            }),
            true,
        ));
    };
    let f = Fields::new(value, "Backend.").map_err(|_| ConfigError::WrongType {
        key: "Backend".into(),
        expected: "an object",
        got: short(value),
    })?;
    let ty = f.str("Type")?.unwrap_or("").to_ascii_lowercase();
    let backend = match ty.as_str() {
        "vxlan" => {
            let vni = f.uint("VNI", (1 << 24) - 1)?.unwrap_or(1);
            let port = f.uint("Port", u64::from(u16::MAX))?.unwrap_or(0);
            let mtu = f.uint("MTU", 65535)?.filter(|&m| m > 0);
            if let Some(m) = mtu
                && m < 576
            {
                return Err(f.bad("MTU", format!("{m} is below the IPv4 minimum of 576")));
            }
            BackendConfig::Vxlan(VxlanConfig {
                vni: vni as u32, // < 2^24
                port: if port == 0 {
                    VXLAN_DEFAULT_PORT
                } else {
                    port as u16 // <= u16::MAX
                },
                mtu: mtu.map(|m| m as u32), // <= 65535
                gbp: f.bool("GBP", false)?,
                learning: f.bool("Learning", false)?,
                direct_routing: f.bool("DirectRouting", false)?,
            })
        }
        "udp" => {
            let port = f.uint("Port", u64::from(u16::MAX))?.unwrap_or(0);
            BackendConfig::Udp(UdpConfig {
                port: if port == 0 {
                    UDP_DEFAULT_PORT
                } else {
                    port as u16 // <= u16::MAX
                },
            })
        }
        "host-gw" => BackendConfig::HostGw,
        "alloc" => BackendConfig::Alloc,
        "ipip" | "ipsec" | "wireguard" | "extension" | "tencent-vpc" => {
            return Err(ConfigError::UnsupportedBackend(ty));
        }
        _ => {
            let mut shown = ty;
            if shown.len() > 64 {
                shown.truncate(shown.floor_char_boundary(64));
            }
            return Err(ConfigError::UnknownBackend(shown));
        }
    };
    Ok((backend, false))
}

fn short(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 64 {
        s.truncate(s.floor_char_boundary(64));
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Range {
        parse_config(s.as_bytes()).unwrap().ipv4.unwrap()
    }

    fn err(s: &str) -> String {
        parse_config(s.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn flannel_default_vector() {
        let r = v4(r#"{"network":"10.3.0.0/16"}"#);
        assert_eq!(r.network.to_string(), "10.3.0.0/16");
        assert_eq!(r.subnet_len, 24);
        assert_eq!(r.subnet_min, Ipv4Addr::new(10, 3, 1, 0));
        assert_eq!(r.subnet_max, Ipv4Addr::new(10, 3, 255, 0));
    }

    #[test]
    fn flannel_override_vector() {
        let r = v4(
            r#"{"Network":"10.3.0.0/16","SubnetLen":28,"SubnetMin":"10.3.5.0","SubnetMax":"10.3.8.0"}"#,
        );
        assert_eq!(r.subnet_len, 28);
        assert_eq!(r.subnet_min, Ipv4Addr::new(10, 3, 5, 0));
        assert_eq!(r.subnet_max, Ipv4Addr::new(10, 3, 8, 0));
    }

    #[test]
    fn flannel_ipv6_vectors() {
        let c =
            parse_config(br#"{"enableIPv6":true,"ipv6Network":"fc00::/48","enableIPv4":false}"#)
                .unwrap();
        assert!(c.ipv4.is_none());
        let r = c.ipv6.unwrap();
        assert_eq!(r.subnet_len, 64);
        assert_eq!(r.subnet_min, "fc00:0:0:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(r.subnet_max, "fc00:0:0:ffff::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            c.check_supported().unwrap_err().to_string(),
            "EnableIPv6 is not supported yet: this flanneld has no IPv6 dataplane"
        );

        let c = parse_config(
            br#"{"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":124,"IPv6SubnetMin":"fc00:0:0:1::","IPv6SubnetMax":"fc00:0:0:f::","EnableIPv4":false}"#,
        )
        .unwrap();
        let r = c.ipv6.unwrap();
        assert_eq!(r.subnet_len, 124);
        assert_eq!(r.subnet_max, "fc00:0:0:f::".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn subnet_len_defaults_by_prefix() {
        assert_eq!(v4(r#"{"Network":"10.0.0.0/8"}"#).subnet_len, 24);
        assert_eq!(v4(r#"{"Network":"10.0.0.0/22"}"#).subnet_len, 24);
        assert_eq!(v4(r#"{"Network":"10.0.0.0/23"}"#).subnet_len, 25);
        assert_eq!(v4(r#"{"Network":"10.0.0.0/28"}"#).subnet_len, 30);
    }

    #[test]
    fn host_bits_are_dropped() {
        assert_eq!(
            v4(r#"{"Network":"10.1.2.3/16"}"#).network.to_string(),
            "10.1.0.0/16"
        );
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_ignored() {
        let c = parse_config(
            br#"{"NETWORK":"10.5.0.0/16","subnetlen":26,"Whatever":[1,2],"backend":{"type":"VXLAN","vni":7,"port":4789,"directrouting":true}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv4.unwrap().subnet_len, 26);
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan(VxlanConfig {
                vni: 7,
                port: 4789,
                mtu: None,
                gbp: false,
                learning: false,
                direct_routing: true
            })
        );
    }

    #[test]
    fn error_texts_match_flannel() {
        assert_eq!(
            err(r#"{}"#),
            "please define a correct Network parameter in the flannel config"
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#),
            "SubnetLen must be less than /31"
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#),
            "network must be able to accommodate at least four subnets"
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/29"}"#),
            "network is too small. Minimum useful network prefix is /28"
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#),
            "SubnetMin is not in the range of the Network"
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","SubnetMax":"11.0.0.0"}"#),
            "SubnetMax is not in the range of the Network"
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.1"}"#),
            "SubnetMin is not on a SubnetLen boundary: 10.0.1.1"
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.9.128"}"#),
            "SubnetMax is not on a SubnetLen boundary: 10.0.9.128"
        );
        assert_eq!(
            err(r#"{"EnableIPv6":true,"EnableIPv4":false}"#),
            "please define a correct IPv6Network parameter in the flannel config"
        );
        assert_eq!(
            err(
                r#"{"EnableIPv6":true,"EnableIPv4":false,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}"#
            ),
            "SubnetLen must be less than /127"
        );
        assert_eq!(
            err(r#"{"EnableIPv6":true,"EnableIPv4":false,"IPv6Network":"fc00::/125"}"#),
            "IPv6Network is too small. Minimum useful network prefix is /124"
        );
        assert_eq!(
            err(r#"{"EnableIPv4":false}"#),
            "none defined stack: EnableIPv4 and EnableIPv6 are both false"
        );
    }

    #[test]
    fn backend_defaults_and_errors() {
        let c = parse_config(br#"{"Network":"10.0.0.0/16"}"#).unwrap();
        assert_eq!(c.backend, BackendConfig::Udp(UdpConfig { port: 8285 }));
        assert!(c.backend_defaulted);

        let c = parse_config(br#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let BackendConfig::Vxlan(v) = c.backend else {
            panic!("not vxlan")
        };
        assert_eq!((v.vni, v.port, v.mtu), (1, 8472, None));
        assert!(!c.backend_defaulted);

        let c = parse_config(br#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp","Port":7890}}"#)
            .unwrap();
        assert_eq!(c.backend, BackendConfig::Udp(UdpConfig { port: 7890 }));
        assert_eq!(
            parse_config(br#"{"Network":"10.0.0.0/16","Backend":{"Type":"host-gw"}}"#)
                .unwrap()
                .backend,
            BackendConfig::HostGw
        );

        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","Backend":{}}"#),
            "unknown backend type: "
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"bogus"}}"#),
            "unknown backend type: bogus"
        );
        assert!(
            err(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard"}}"#)
                .contains("not supported")
        );
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#),
            "config key Backend.VNI: expected a non-negative integer in range, got 16777216"
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        assert_eq!(
            err(r#"{"Network":"10.0.0.0/16","SubnetLen":"24"}"#),
            "config key SubnetLen: expected a number, got \"24\""
        );
        assert_eq!(
            err(r#"{"Network":42}"#),
            "config key Network: expected a string, got 42"
        );
        assert!(err(r#"{"Network":"fc00::/64"}"#).contains("invalid IPv4 CIDR format"));
        assert!(err("[1]").contains("must be a JSON object"));
        assert!(err("{").contains("not valid JSON"));
    }

    #[test]
    fn null_is_the_zero_value() {
        let r = v4(r#"{"Network":"10.3.0.0/16","SubnetLen":null}"#);
        assert_eq!(r.subnet_len, 24);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_config(&bytes);
        }

        #[test]
        fn never_panics_on_shaped_json(
            net in "[0-9./a-f:]{0,20}", len in proptest::option::of(0u64..300),
            min in "[0-9.]{0,16}", ty in "[a-zA-Z-]{0,10}", vni in proptest::num::i64::ANY,
        ) {
            let mut doc = serde_json::json!({"Network": net, "SubnetMin": min,
                "Backend": {"Type": ty, "VNI": vni}});
            if let Some(len) = len { doc["SubnetLen"] = len.into(); }
            if let Ok(c) = parse_config(doc.to_string().as_bytes())
                && let Some(r) = c.ipv4 {
                proptest::prop_assert!(r.subnet_min <= r.subnet_max);
                proptest::prop_assert!(r.network.contains(&r.subnet_min));
            }
        }
    }
}
