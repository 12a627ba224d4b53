//! flannel's `LeaseAttrs`: the JSON value stored at each subnet key.
//!
//! Written byte-for-byte as Go flanneld writes it (field order `PublicIP`, `PublicIPv6`
//! (null-able), `BackendType` and `BackendData` omitted when empty). Read like Go's
//! `encoding/json` (case-insensitive keys), but validated strictly: values come from
//! other nodes and anyone with etcd write access, so they are untrusted input.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::Value;

use crate::mac::MacAddr;

/// Largest lease value accepted; a real one is about 130 bytes.
pub const MAX_LEASE_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("lease value is {0} bytes, more than the {MAX_LEASE_BYTES} allowed")]
    TooLarge(usize),
    #[error("lease value is not a JSON object: {0}")]
    Json(String),
    #[error("lease field {field}: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field(field: &'static str, reason: impl Into<String>) -> LeaseError {
    LeaseError::Field {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend: BackendAttrs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAttrs {
    /// udp and alloc leases carry no `BackendType`.
    None,
    HostGw,
    Vxlan(VxlanAttrs),
    /// A backend this flanneld does not run (ipip, wireguard, ...). Its subnet is still
    /// taken, so it is tracked, but no dataplane will use it.
    Other(String),
}

impl BackendAttrs {
    pub fn type_name(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::HostGw => Some("host-gw"),
            Self::Vxlan(_) => Some("vxlan"),
            Self::Other(t) => Some(t),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: u32,
    pub vtep_mac: MacAddr,
}

impl LeaseAttrs {
    /// The exact JSON Go flanneld writes.
    pub fn to_json(&self) -> String {
        let v6 = match self.public_ipv6 {
            Some(ip) => format!("\"{ip}\""),
            None => "null".to_owned(),
        };
        let mut s = format!("{{\"PublicIP\":\"{}\",\"PublicIPv6\":{v6}", self.public_ip);
        match &self.backend {
            BackendAttrs::None => {}
            BackendAttrs::HostGw => s.push_str(",\"BackendType\":\"host-gw\""),
            BackendAttrs::Vxlan(v) => s.push_str(&format!(
                ",\"BackendType\":\"vxlan\",\"BackendData\":{{\"VNI\":{},\"VtepMAC\":\"{}\"}}",
                v.vni, v.vtep_mac
            )),
            BackendAttrs::Other(t) => {
                s.push_str(",\"BackendType\":");
                s.push_str(&Value::String(t.clone()).to_string());
            }
        }
        s.push('}');
        s
    }

    /// Parses and validates a lease value written by any flanneld.
    pub fn parse(bytes: &[u8]) -> Result<Self, LeaseError> {
        if bytes.len() > MAX_LEASE_BYTES {
            return Err(LeaseError::TooLarge(bytes.len()));
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| LeaseError::Json(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(LeaseError::Json("not an object".into()));
        };
        let get = |name: &str| {
            obj.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
                .next_back()
                .filter(|v| !v.is_null())
        };

        let public_ip = match get("PublicIP") {
            Some(Value::String(s)) => s
                .parse::<Ipv4Addr>()
                .map_err(|_| field("PublicIP", format!("not an IPv4 address: {}", clip(s))))?,
            Some(_) => return Err(field("PublicIP", "not a string")),
            None => return Err(field("PublicIP", "missing")),
        };
        if !is_unicast_v4(public_ip) {
            return Err(field(
                "PublicIP",
                format!("{public_ip} is not a unicast address"),
            ));
        }
        let public_ipv6 =
            match get("PublicIPv6") {
                Some(Value::String(s)) => Some(s.parse::<Ipv6Addr>().map_err(|_| {
                    field("PublicIPv6", format!("not an IPv6 address: {}", clip(s)))
                })?),
                Some(_) => return Err(field("PublicIPv6", "not a string")),
                None => None,
            };
        let backend = match get("BackendType") {
            None => BackendAttrs::None,
            Some(Value::String(t)) if t.is_empty() => BackendAttrs::None,
            Some(Value::String(t)) => match t.as_str() {
                "host-gw" => BackendAttrs::HostGw,
                "vxlan" => BackendAttrs::Vxlan(parse_vxlan(get("BackendData"))?),
                other => {
                    if other.len() > 32 || !other.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(field("BackendType", format!("invalid: {}", clip(other))));
                    }
                    BackendAttrs::Other(other.to_owned())
                }
            },
            Some(_) => return Err(field("BackendType", "not a string")),
        };
        Ok(Self {
            public_ip,
            public_ipv6,
            backend,
        })
    }
}

fn parse_vxlan(data: Option<&Value>) -> Result<VxlanAttrs, LeaseError> {
    let Some(Value::Object(obj)) = data else {
        return Err(field(
            "BackendData",
            "vxlan lease without a BackendData object",
        ));
    };
    let get = |name: &str| {
        obj.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .next_back()
    };
    let vni = match get("VNI").and_then(Value::as_u64) {
        Some(v) if v < 1 << 24 => v as u32, // < 2^24
        _ => return Err(field("BackendData.VNI", "missing or not a 24-bit integer")),
    };
    let vtep_mac = match get("VtepMAC") {
        Some(Value::String(s)) => s
            .parse::<MacAddr>()
            .map_err(|e| field("BackendData.VtepMAC", e.to_string()))?,
        _ => return Err(field("BackendData.VtepMAC", "missing or not a string")),
    };
    if !vtep_mac.is_valid_vtep() {
        return Err(field(
            "BackendData.VtepMAC",
            format!("{vtep_mac} is not a unicast MAC"),
        ));
    }
    Ok(VxlanAttrs { vni, vtep_mac })
}

/// An address a peer can be reached at.
pub fn is_unicast_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

fn clip(s: &str) -> String {
    let mut s = format!("{s:?}");
    if s.len() > 48 {
        s.truncate(s.floor_char_boundary(48));
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_VXLAN: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

    #[test]
    fn vxlan_is_byte_compatible() {
        let a = LeaseAttrs::parse(GO_VXLAN.as_bytes()).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(
            a.backend,
            BackendAttrs::Vxlan(VxlanAttrs {
                vni: 1,
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap()
            })
        );
        assert_eq!(a.to_json(), GO_VXLAN);
    }

    #[test]
    fn host_gw_udp_and_others() {
        for s in [
            r#"{"PublicIP":"10.0.0.7","PublicIPv6":null,"BackendType":"host-gw"}"#,
            r#"{"PublicIP":"10.0.0.7","PublicIPv6":null}"#,
            r#"{"PublicIP":"10.0.0.7","PublicIPv6":null,"BackendType":"ipip"}"#,
        ] {
            assert_eq!(LeaseAttrs::parse(s.as_bytes()).unwrap().to_json(), s);
        }
        let wg = r#"{"PublicIP":"10.0.0.7","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"x","Port":51820}}"#;
        assert_eq!(
            LeaseAttrs::parse(wg.as_bytes()).unwrap().backend,
            BackendAttrs::Other("wireguard".into())
        );
        let dual = r#"{"PublicIP":"10.0.0.7","PublicIPv6":"fd00::3"}"#;
        assert_eq!(
            LeaseAttrs::parse(dual.as_bytes()).unwrap().public_ipv6,
            Some("fd00::3".parse().unwrap())
        );
    }

    #[test]
    fn keys_are_case_insensitive() {
        let a = LeaseAttrs::parse(
            br#"{"publicip":"10.0.0.7","backendtype":"vxlan","backenddata":{"vni":5,"vtepmac":"02:00:00:00:00:01"}}"#,
        )
        .unwrap();
        assert!(matches!(
            a.backend,
            BackendAttrs::Vxlan(VxlanAttrs { vni: 5, .. })
        ));
    }

    #[test]
    fn hostile_values_are_rejected_with_reasons() {
        let cases: &[(&str, &str)] = &[
            ("", "not a JSON object"),
            ("[]", "not a JSON object"),
            (r#"{}"#, "PublicIP: missing"),
            (r#"{"PublicIP":"0.0.0.0"}"#, "not a unicast address"),
            (r#"{"PublicIP":"224.0.0.1"}"#, "not a unicast address"),
            (r#"{"PublicIP":"255.255.255.255"}"#, "not a unicast address"),
            (r#"{"PublicIP":"fd00::1"}"#, "not an IPv4 address"),
            (r#"{"PublicIP":7}"#, "not a string"),
            (
                r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan"}"#,
                "without a BackendData",
            ),
            (
                r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
                "VtepMAC",
            ),
            (
                r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}}"#,
                "not a unicast MAC",
            ),
            (
                r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}}"#,
                "not a unicast MAC",
            ),
            (
                r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":16777216,"VtepMAC":"02:00:00:00:00:01"}}"#,
                "24-bit",
            ),
            (
                r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":-1,"VtepMAC":"02:00:00:00:00:01"}}"#,
                "24-bit",
            ),
            (
                r#"{"PublicIP":"10.0.0.1","BackendType":"a\u0000b"}"#,
                "BackendType: invalid",
            ),
        ];
        for (input, want) in cases {
            let e = LeaseAttrs::parse(input.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{input}: {e}");
        }
        let big = format!(r#"{{"PublicIP":"10.0.0.1","X":"{}"}}"#, "a".repeat(5000));
        assert!(matches!(
            LeaseAttrs::parse(big.as_bytes()),
            Err(LeaseError::TooLarge(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = LeaseAttrs::parse(&bytes);
        }

        #[test]
        fn own_leases_round_trip(ip in proptest::num::u32::ANY, vni in 0u32..(1 << 24), mac in proptest::array::uniform6(proptest::num::u8::ANY)) {
            let ip = Ipv4Addr::from(ip);
            let mut mac = mac;
            mac[0] = (mac[0] & 0xfe) | 0x02;
            let a = LeaseAttrs { public_ip: ip, public_ipv6: None,
                backend: BackendAttrs::Vxlan(VxlanAttrs { vni, vtep_mac: MacAddr(mac) }) };
            match LeaseAttrs::parse(a.to_json().as_bytes()) {
                Ok(b) => proptest::prop_assert_eq!(b, a),
                Err(_) => proptest::prop_assert!(!is_unicast_v4(ip)),
            }
        }
    }
}
