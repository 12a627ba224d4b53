//! flannel's nftables rules (`pkg/trafficmngr/nftables`), for `EnableNFTables`.
//!
//! Table `flannel-ipv4` (family `ip`) holds chain `postrtg` (nat, postrouting, srcnat)
//! and chain `forward` (filter, forward, priority filter, policy accept). Each chain is
//! created if needed, flushed and refilled in one `nft -f -` transaction, so it is always
//! whole. The names and comments are flannel's, so `nft list` output matches flannel's
//! golden copy and a Go flanneld finds its own table.
//!
//! The masquerade rules differ from the iptables ones in two ways, both flannel's: the
//! kube-proxy mark is matched exactly (`meta mark 0x4000`, not masked), and the third
//! RETURN is `saddr != <pod> daddr <net>` where iptables has `! -s <net> -d <pod>`.
//! `fully-random` is used when the kernel accepts it (checked with `nft -c`, as flannel
//! does) and `--ip-masq-fully-random-disable` is not set (flannel's nftables code ignores
//! that flag; we honour it).

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use tokio::sync::Mutex;

use super::{RuleSet, TrafficError, exec};

pub const TABLE: &str = "flannel-ipv4";
/// flannel's IPv6 table; only deleted here, when switching to iptables mode.
pub const TABLE_V6: &str = "flannel-ipv6";
pub const POSTRTG_CHAIN: &str = "postrtg";
pub const FORWARD_CHAIN: &str = "forward";
const NFT: &str = "nft";
const MULTICAST: &str = "224.0.0.0/4";

/// The masquerade rules of chain `postrtg`, in order, as `nft` takes them.
pub fn masq_rules(network: Ipv4Net, lease: Ipv4Net, fully_random: bool) -> Vec<String> {
    let net = network.trunc();
    let pod = lease.trunc();
    let masq = if fully_random {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    vec![
        "meta mark 0x4000 return".to_owned(),
        format!("ip saddr {pod} ip daddr {net} return"),
        format!("ip saddr {net} ip daddr {pod} return"),
        format!("ip saddr != {pod} ip daddr {net} return"),
        format!("ip saddr {net} ip daddr != {MULTICAST} {masq}"),
        format!("ip saddr != {net} ip daddr {net} {masq}"),
    ]
}

/// The accept rules of chain `forward`, in order.
pub fn forward_rules(network: Ipv4Net) -> Vec<String> {
    let net = network.trunc();
    vec![
        format!("ip saddr {net} accept"),
        format!("ip daddr {net} accept"),
    ]
}

/// A chain's definition: name, hook line and flannel's comment.
struct ChainDef {
    name: &'static str,
    hook: &'static str,
    comment: &'static str,
}

const POSTRTG: ChainDef = ChainDef {
    name: POSTRTG_CHAIN,
    hook: "type nat hook postrouting priority srcnat ;",
    comment: "chain to manage traffic masquerading by flannel",
};

const FORWARD: ChainDef = ChainDef {
    name: FORWARD_CHAIN,
    // Never a drop policy here: it would cut the node off (flannel's warning too).
    hook: "type filter hook forward priority filter ; policy accept ;",
    comment: "chain to accept flannel traffic",
};

/// One transaction that creates the table and chain if needed, empties the chain and
/// adds `rules`.
fn chain_payload(chain: &ChainDef, rules: &[String]) -> String {
    let mut out = format!(
        "add table ip {TABLE} {{ comment \"rules for {TABLE}\" ; }}\n\
         add chain ip {TABLE} {name} {{ {hook} comment \"{comment}\" ; }}\n\
         flush chain ip {TABLE} {name}\n",
        name = chain.name,
        hook = chain.hook,
        comment = chain.comment,
    );
    for rule in rules {
        out.push_str(&format!("add rule ip {TABLE} {} {rule}\n", chain.name));
    }
    out
}

pub fn masq_payload(network: Ipv4Net, lease: Ipv4Net, fully_random: bool) -> String {
    chain_payload(&POSTRTG, &masq_rules(network, lease, fully_random))
}

pub fn forward_payload(network: Ipv4Net) -> String {
    chain_payload(&FORWARD, &forward_rules(network))
}

/// Deletes a table whether or not it exists: `add` makes sure it does. (`destroy` would
/// say this directly but needs nft 1.0.8; Debian 12 has 1.0.6.)
fn delete_table_payload(family: &str, table: &str) -> String {
    format!("add table {family} {table}\ndelete table {family} {table}\n")
}

/// The number of rules in an `nft list chain` listing.
pub fn count_rules(listing: &str) -> usize {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && *l != "}"
                && !["table ", "chain ", "comment ", "type ", "policy "]
                    .iter()
                    .any(|p| l.starts_with(p))
        })
        .count()
}

#[derive(Debug)]
struct Installed {
    chain: &'static str,
    payload: String,
    rules: usize,
}

#[derive(Debug, Default)]
pub struct NftablesManager {
    /// The chains installed so far, re-checked by resync; the lock also serialises applies.
    installed: Mutex<BTreeMap<RuleSet, Installed>>,
}

impl NftablesManager {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) async fn setup_masq(
        &self,
        network: Ipv4Net,
        lease: Ipv4Net,
        fully_random_disable: bool,
    ) -> Result<(), TrafficError> {
        let mut installed = self.installed.lock().await;
        // The flush in the transaction removes the rules of any previous network or
        // subnet, so nothing needs deleting first.
        let mut payload = masq_payload(network, lease, !fully_random_disable);
        if !fully_random_disable {
            let check = exec(NFT, &["-c", "-f", "-"], Some(&payload)).await?;
            if let Err(err) = check.success() {
                tracing::warn!(error = %err, "nftables: masquerade fully-random is not supported; using plain masquerade");
                payload = masq_payload(network, lease, false);
            }
        }
        tracing::info!(%network, %lease, "nftables: setting up masquerade rules");
        apply(&payload).await?;
        installed.insert(
            RuleSet::Masquerade,
            Installed {
                chain: POSTRTG_CHAIN,
                payload,
                rules: masq_rules(network, lease, false).len(),
            },
        );
        Ok(())
    }

    pub(crate) async fn setup_forward(&self, network: Ipv4Net) -> Result<(), TrafficError> {
        let mut installed = self.installed.lock().await;
        let payload = forward_payload(network);
        tracing::info!(%network, "nftables: setting up forward rules");
        apply(&payload).await?;
        installed.insert(
            RuleSet::Forward,
            Installed {
                chain: FORWARD_CHAIN,
                payload,
                rules: forward_rules(network).len(),
            },
        );
        Ok(())
    }

    /// Re-applies a chain that is gone or does not hold the number of rules we put in.
    /// A rule edited in place is not noticed; flannel checks nothing at all here.
    pub(crate) async fn resync(&self) -> Result<bool, TrafficError> {
        let installed = self.installed.lock().await;
        let mut reapplied = false;
        for (set, inst) in installed.iter() {
            let listing = exec(NFT, &["list", "chain", "ip", TABLE, inst.chain], None).await?;
            let whole = listing.code == Some(0) && count_rules(&listing.stdout) == inst.rules;
            if !whole {
                tracing::info!(rule_set = ?set, chain = inst.chain, "nftables: chain is missing or incomplete; re-applying it");
                apply(&inst.payload).await?;
                reapplied = true;
            }
        }
        Ok(reapplied)
    }
}

async fn apply(payload: &str) -> Result<(), TrafficError> {
    tracing::debug!(payload, "running nft");
    exec(NFT, &["-f", "-"], Some(payload))
        .await?
        .success()
        .map(drop)
}

/// Removes flannel's nftables tables, for iptables mode. No nft, nothing to do.
pub async fn delete_tables() -> Result<(), TrafficError> {
    let mut errors = Vec::new();
    for (family, table) in [("ip", TABLE), ("ip6", TABLE_V6)] {
        let payload = delete_table_payload(family, table);
        match exec(NFT, &["-f", "-"], Some(&payload)).await {
            Err(e) if e.is_not_found() => {
                tracing::debug!("nft is not installed; no nftables rules to clean up");
                return Ok(());
            }
            Err(e) => errors.push(e),
            Ok(out) => match out.success() {
                Ok(_) => tracing::debug!(family, table, "deleted nftables table"),
                Err(e) => errors.push(e),
            },
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(TrafficError::Multi(errors)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn masq_rules_match_flannel() {
        assert_eq!(
            masq_rules(net("10.5.0.0/16"), net("10.5.72.0/24"), true),
            [
                "meta mark 0x4000 return",
                "ip saddr 10.5.72.0/24 ip daddr 10.5.0.0/16 return",
                "ip saddr 10.5.0.0/16 ip daddr 10.5.72.0/24 return",
                "ip saddr != 10.5.72.0/24 ip daddr 10.5.0.0/16 return",
                "ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
                "ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random",
            ]
        );
        let plain = masq_rules(net("10.5.0.0/16"), net("10.5.72.0/24"), false);
        assert!(plain[4].ends_with(" masquerade") && plain[5].ends_with(" masquerade"));
    }

    #[test]
    fn forward_rules_match_flannel() {
        assert_eq!(
            forward_rules(net("10.5.0.0/16")),
            ["ip saddr 10.5.0.0/16 accept", "ip daddr 10.5.0.0/16 accept"]
        );
    }

    #[test]
    fn payloads() {
        assert_eq!(
            forward_payload(net("10.5.0.0/16")),
            "add table ip flannel-ipv4 { comment \"rules for flannel-ipv4\" ; }\n\
             add chain ip flannel-ipv4 forward { type filter hook forward priority filter ; policy accept ; comment \"chain to accept flannel traffic\" ; }\n\
             flush chain ip flannel-ipv4 forward\n\
             add rule ip flannel-ipv4 forward ip saddr 10.5.0.0/16 accept\n\
             add rule ip flannel-ipv4 forward ip daddr 10.5.0.0/16 accept\n"
        );
        let masq = masq_payload(net("10.5.0.0/16"), net("10.5.72.0/24"), true);
        assert!(masq.contains(
            "add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat ; comment \"chain to manage traffic masquerading by flannel\" ; }\n\
             flush chain ip flannel-ipv4 postrtg\n\
             add rule ip flannel-ipv4 postrtg meta mark 0x4000 return\n"
        ));
        assert_eq!(masq.lines().count(), 3 + 6);
        assert_eq!(
            delete_table_payload("ip", TABLE),
            "add table ip flannel-ipv4\ndelete table ip flannel-ipv4\n"
        );
    }

    #[test]
    fn count_rules_of_golden_listing() {
        // flannel's expectedNftPostrouting (e2e/rules.go) for pod 10.5.72.0/24.
        let listing = "table ip flannel-ipv4 {\n\
            \tchain postrtg {\n\
            \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
            \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
            \t\tmeta mark 0x00004000 return\n\
            \t\tip saddr 10.5.72.0/24 ip daddr 10.5.0.0/16 return\n\
            \t\tip saddr 10.5.0.0/16 ip daddr 10.5.72.0/24 return\n\
            \t\tip saddr != 10.5.72.0/24 ip daddr 10.5.0.0/16 return\n\
            \t\tip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random\n\
            \t\tip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random\n\
            \t}\n\
            }\n";
        assert_eq!(count_rules(listing), 6);
        assert_eq!(count_rules(""), 0);
    }
}
