//! flannel's iptables rules (`pkg/trafficmngr/iptables/iptables.go`).
//!
//! How a rule set is applied, and why:
//! - The flannel chain (`FLANNEL-POSTRTG` in nat, `FLANNEL-FWD` in filter) is declared in
//!   the restore input (`:CHAIN - [0:0]`) when it is missing, which creates it, or when
//!   flannel would `ClearChain` it (initial masquerade and forward setup), which with
//!   `--noflush` empties it. Chain and rules then change in one transaction instead of
//!   flannel's separate `iptables -N`/`-F` calls.
//! - Every rule that already exists (`iptables -C`) is deleted and appended again, in set
//!   order, as flannel does: the set ends up complete and in order, the jump goes to the
//!   end of POSTROUTING/FORWARD, and applying twice leaves one copy of each rule.
//! - One lock serialises check-and-apply, so the resync loop and a setup cannot
//!   interleave and restore a rule the other just removed.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use tokio::sync::Mutex;

use super::{RuleSet, TrafficError, exec};

pub const POSTRTG_CHAIN: &str = "FLANNEL-POSTRTG";
pub const FWD_CHAIN: &str = "FLANNEL-FWD";
/// kube-proxy's masquerade mark; such packets are left to kube-proxy (no double NAT).
pub const KUBE_PROXY_MARK: &str = "0x4000/0x4000";
const MASQ_COMMENT: &str = "flanneld masq";
const FWD_COMMENT: &str = "flanneld forward";
const MULTICAST: &str = "224.0.0.0/4";

const IPTABLES: &str = "iptables";
const IPTABLES_RESTORE: &str = "iptables-restore";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Filter => "filter",
        }
    }
}

/// One iptables rule: table, chain, and the arguments after `-A CHAIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: Table,
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(table: Table, chain: &'static str, spec: &[&str]) -> Self {
        Self {
            table,
            chain,
            spec: spec.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// The rule as `iptables -S`/`iptables-save` print it, e.g.
    /// `-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT`.
    pub fn save_line(&self) -> String {
        self.restore_line("-A")
    }

    /// `op` (`-A` or `-D`) with chain and spec, quoted for iptables-restore's input.
    fn restore_line(&self, op: &str) -> String {
        let mut line = format!("{op} {}", self.chain);
        for arg in &self.spec {
            line.push(' ');
            if arg.contains(char::is_whitespace) {
                line.push('"');
                line.push_str(arg);
                line.push('"');
            } else {
                line.push_str(arg);
            }
        }
        line
    }

    /// The flannel chain this rule lives in or jumps to.
    fn flannel_chain(&self) -> Option<&'static str> {
        let target = self.spec.last().map(String::as_str);
        [POSTRTG_CHAIN, FWD_CHAIN]
            .into_iter()
            .find(|c| self.chain == *c || target == Some(*c))
    }
}

/// flannel's masquerade rules for `network` (the config's Network) and `lease`, in order.
pub fn masq_rules(network: Ipv4Net, lease: Ipv4Net, random_fully: bool) -> Vec<Rule> {
    let net = network.trunc().to_string();
    let pod = lease.trunc().to_string();
    let comment = ["-m", "comment", "--comment", MASQ_COMMENT];
    let masq: &[&str] = if random_fully {
        &["-j", "MASQUERADE", "--random-fully"]
    } else {
        &["-j", "MASQUERADE"]
    };
    let rule = |chain, matches: &[&str], target: &[&str]| {
        let spec: Vec<&str> = matches
            .iter()
            .chain(&comment)
            .chain(target)
            .copied()
            .collect();
        Rule::new(Table::Nat, chain, &spec)
    };
    vec![
        rule("POSTROUTING", &[], &["-j", POSTRTG_CHAIN]),
        rule(
            POSTRTG_CHAIN,
            &["-m", "mark", "--mark", KUBE_PROXY_MARK],
            &["-j", "RETURN"],
        ),
        rule(POSTRTG_CHAIN, &["-s", &pod, "-d", &net], &["-j", "RETURN"]),
        rule(POSTRTG_CHAIN, &["-s", &net, "-d", &pod], &["-j", "RETURN"]),
        rule(
            POSTRTG_CHAIN,
            &["!", "-s", &net, "-d", &pod],
            &["-j", "RETURN"],
        ),
        rule(POSTRTG_CHAIN, &["-s", &net, "!", "-d", MULTICAST], masq),
        rule(POSTRTG_CHAIN, &["!", "-s", &net, "-d", &net], masq),
    ]
}

/// flannel's FORWARD accept rules for `network`, in order.
pub fn forward_rules(network: Ipv4Net) -> Vec<Rule> {
    let net = network.trunc().to_string();
    let comment = ["-m", "comment", "--comment", FWD_COMMENT];
    let rule = |chain, matches: &[&str], target: &str| {
        let spec: Vec<&str> = matches
            .iter()
            .chain(&comment)
            .chain(&["-j", target])
            .copied()
            .collect();
        Rule::new(Table::Filter, chain, &spec)
    };
    vec![
        rule("FORWARD", &[], FWD_CHAIN),
        rule(FWD_CHAIN, &["-s", &net], "ACCEPT"),
        rule(FWD_CHAIN, &["-d", &net], "ACCEPT"),
    ]
}

/// What to do with each rule of a set, decided from the live state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Delete the existing copy first.
    pub delete: bool,
    /// Append it (false only when tearing down).
    pub append: bool,
}

/// The iptables-restore input: per table, in first-seen order, the chain declarations and
/// then each rule's `-D`/`-A`, ending with `COMMIT`.
pub fn restore_payload(rules: &[Rule], steps: &[Step], declare: &[(Table, &str)]) -> String {
    let mut tables: Vec<Table> = Vec::new();
    for t in rules
        .iter()
        .map(|r| r.table)
        .chain(declare.iter().map(|d| d.0))
    {
        if !tables.contains(&t) {
            tables.push(t);
        }
    }
    let mut out = String::new();
    for table in tables {
        let mut body = String::new();
        for (_, chain) in declare.iter().filter(|d| d.0 == table) {
            body.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for (rule, step) in rules.iter().zip(steps).filter(|(r, _)| r.table == table) {
            if step.delete {
                body.push_str(&rule.restore_line("-D"));
                body.push('\n');
            }
            if step.append {
                body.push_str(&rule.restore_line("-A"));
                body.push('\n');
            }
        }
        if !body.is_empty() {
            out.push_str(&format!("*{}\n{body}COMMIT\n", table.as_str()));
        }
    }
    out
}

/// `(major, minor, patch)` from `iptables --version` output (`iptables v1.8.9 (nf_tables)`).
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let start = text.find(" v")? + 2;
    let mut parts = text[start..]
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

/// `--wait` for iptables-restore and `--random-fully` both arrived in iptables 1.6.2.
fn at_least_1_6_2(v: (u32, u32, u32)) -> bool {
    v >= (1, 6, 2)
}

#[derive(Debug)]
pub struct IptablesManager {
    random_fully: bool,
    wait: bool,
    /// The sets installed so far, re-checked by resync; the lock also serialises applies.
    installed: Mutex<BTreeMap<RuleSet, Vec<Rule>>>,
}

impl IptablesManager {
    pub async fn new() -> Result<Self, TrafficError> {
        let out = exec(IPTABLES, &["--version"], None).await?.success()?;
        let version = parse_version(&out).ok_or_else(|| TrafficError::Version(out.clone()))?;
        let modern = at_least_1_6_2(version);
        tracing::info!(version = %out.trim(), random_fully = modern, "found iptables");
        Ok(Self {
            random_fully: modern,
            wait: modern,
            installed: Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether MASQUERADE rules get `--random-fully` (unless disabled by the flag).
    pub fn supports_random_fully(&self) -> bool {
        self.random_fully
    }

    pub(crate) async fn setup_masq(
        &self,
        network: Ipv4Net,
        lease: Ipv4Net,
        prev: Option<(Ipv4Net, Ipv4Net)>,
        fully_random_disable: bool,
    ) -> Result<(), TrafficError> {
        let random_fully = self.random_fully && !fully_random_disable;
        let mut installed = self.installed.lock().await;
        if let Some((prev_network, prev_subnet)) = prev
            && (prev_network != network || prev_subnet != lease)
        {
            tracing::info!(%network, %lease, %prev_network, %prev_subnet,
                "network or subnet changed since the last run; deleting the old masquerade rules");
            self.teardown(&masq_rules(prev_network, prev_subnet, random_fully))
                .await?;
        }
        tracing::info!(%network, %lease, random_fully, "setting up masquerade rules");
        let rules = masq_rules(network, lease, random_fully);
        self.apply(&rules, true).await?;
        installed.insert(RuleSet::Masquerade, rules);
        Ok(())
    }

    pub(crate) async fn setup_forward(&self, network: Ipv4Net) -> Result<(), TrafficError> {
        let mut installed = self.installed.lock().await;
        tracing::info!(%network, "setting up forward rules");
        let rules = forward_rules(network);
        self.apply(&rules, true).await?;
        installed.insert(RuleSet::Forward, rules);
        Ok(())
    }

    pub(crate) async fn resync(&self) -> Result<bool, TrafficError> {
        let installed = self.installed.lock().await;
        let mut reapplied = false;
        let mut errors = Vec::new();
        for (set, rules) in installed.iter() {
            let result = async {
                if self.all_present(rules).await? {
                    return Ok(false);
                }
                tracing::info!(rule_set = ?set, "some iptables rules are missing; deleting and recreating them");
                self.apply(rules, false).await.map(|()| true)
            };
            match result.await {
                Ok(r) => reapplied |= r,
                Err(e) => errors.push(e),
            }
        }
        match errors.len() {
            0 => Ok(reapplied),
            1 => Err(errors.remove(0)),
            _ => Err(TrafficError::Multi(errors)),
        }
    }

    /// Installs `rules`, emptying their flannel chain first when `flush` is set.
    async fn apply(&self, rules: &[Rule], flush: bool) -> Result<(), TrafficError> {
        let mut missing: Vec<(Table, &str)> = Vec::new();
        let mut declare: Vec<(Table, &str)> = Vec::new();
        for (table, chain) in flannel_chains(rules) {
            if !self.chain_exists(table, chain).await? {
                missing.push((table, chain));
                declare.push((table, chain));
            } else if flush {
                declare.push((table, chain));
            }
        }
        let mut steps = Vec::with_capacity(rules.len());
        for rule in rules {
            let touches_missing = rule
                .flannel_chain()
                .is_some_and(|c| missing.contains(&(rule.table, c)));
            let flushed = declare.contains(&(rule.table, rule.chain));
            // A rule in or jumping to a chain that does not exist yet cannot exist, and
            // `-C` on it would fail; a rule in a chain being emptied must not be deleted.
            let exists = !touches_missing && !flushed && self.rule_exists(rule).await?;
            steps.push(Step {
                delete: exists,
                append: true,
            });
        }
        self.restore(&restore_payload(rules, &steps, &declare))
            .await
    }

    /// Deletes each rule of `rules` that exists; the chains stay.
    async fn teardown(&self, rules: &[Rule]) -> Result<(), TrafficError> {
        let mut present = Vec::new();
        for (table, chain) in flannel_chains(rules) {
            if self.chain_exists(table, chain).await? {
                present.push((table, chain));
            }
        }
        let mut steps = Vec::with_capacity(rules.len());
        for rule in rules {
            let chain_ok = rule
                .flannel_chain()
                .is_none_or(|c| present.contains(&(rule.table, c)));
            let exists = chain_ok && self.rule_exists(rule).await?;
            steps.push(Step {
                delete: exists,
                append: false,
            });
        }
        self.restore(&restore_payload(rules, &steps, &[])).await
    }

    async fn all_present(&self, rules: &[Rule]) -> Result<bool, TrafficError> {
        for (table, chain) in flannel_chains(rules) {
            if !self.chain_exists(table, chain).await? {
                return Ok(false);
            }
        }
        for rule in rules {
            if !self.rule_exists(rule).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn restore(&self, payload: &str) -> Result<(), TrafficError> {
        if payload.is_empty() {
            return Ok(());
        }
        tracing::debug!(payload, "running iptables-restore");
        let args: &[&str] = if self.wait {
            &["--noflush", "--wait"]
        } else {
            &["--noflush"]
        };
        exec(IPTABLES_RESTORE, args, Some(payload))
            .await?
            .success()
            .map(drop)
    }

    fn base_args(&self, table: Table) -> Vec<&'static str> {
        let mut args = Vec::with_capacity(4);
        if self.wait {
            args.push("-w");
        }
        args.extend(["-t", table.as_str()]);
        args
    }

    async fn chain_exists(&self, table: Table, chain: &str) -> Result<bool, TrafficError> {
        let mut args = self.base_args(table);
        args.extend(["-S", chain]);
        let out = exec(IPTABLES, &args, None).await?;
        match out.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => out.success().map(|_| false),
        }
    }

    async fn rule_exists(&self, rule: &Rule) -> Result<bool, TrafficError> {
        let mut args = self.base_args(rule.table);
        args.extend(["-C", rule.chain]);
        args.extend(rule.spec.iter().map(String::as_str));
        let out = exec(IPTABLES, &args, None).await?;
        match out.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => out.success().map(|_| false),
        }
    }
}

/// The flannel chains `rules` use, once each, in order.
fn flannel_chains(rules: &[Rule]) -> Vec<(Table, &'static str)> {
    let mut out = Vec::new();
    for rule in rules {
        if let Some(chain) = rule.flannel_chain()
            && !out.contains(&(rule.table, chain))
        {
            out.push((rule.table, chain));
        }
    }
    out
}

/// Removes flannel's iptables state, for nftables mode: the jumps from POSTROUTING and
/// FORWARD, then the chains themselves. (flannel deletes `FLANNEL-FWD` from the nat table,
/// where it never is; we delete it from filter, where it is.) No iptables, nothing to do.
pub async fn delete_chains() -> Result<(), TrafficError> {
    let mut errors = Vec::new();
    for (table, parent, chain) in [
        (Table::Nat, "POSTROUTING", POSTRTG_CHAIN),
        (Table::Filter, "FORWARD", FWD_CHAIN),
    ] {
        match delete_chain(table, parent, chain).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                tracing::debug!("iptables is not installed; no iptables rules to clean up");
                return Ok(());
            }
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(TrafficError::Multi(errors)),
    }
}

async fn delete_chain(table: Table, parent: &str, chain: &str) -> Result<(), TrafficError> {
    let t = table.as_str();
    let listed = exec(IPTABLES, &["-w", "-t", t, "-S", chain], None).await?;
    if listed.code == Some(1) {
        return Ok(());
    }
    listed.success()?;
    let parent_rules = exec(IPTABLES, &["-w", "-t", t, "-S", parent], None)
        .await?
        .success()?;
    let payload = delete_chain_payload(table, &parent_rules, chain);
    tracing::info!(
        table = t,
        chain,
        "deleting iptables chain left from iptables mode"
    );
    tracing::debug!(payload, "running iptables-restore");
    exec(IPTABLES_RESTORE, &["--noflush", "--wait"], Some(&payload))
        .await?
        .success()
        .map(drop)
}

/// Deletes every rule in `parent_listing` (`iptables -S <parent>` output) that jumps to
/// `chain`, then empties and deletes `chain`.
fn delete_chain_payload(table: Table, parent_listing: &str, chain: &str) -> String {
    let mut out = format!("*{}\n", table.as_str());
    for line in parent_listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"-A") && words.ends_with(&["-j", chain]) {
            out.push_str("-D");
            out.push_str(&line.trim_start()[2..]);
            out.push('\n');
        }
    }
    out.push_str(&format!("-F {chain}\n-X {chain}\nCOMMIT\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// flannel's `expectedIptablesPostrouting` (e2e/rules.go) for network 10.5.0.0/16.
    fn golden_postrouting(pod: &str) -> Vec<String> {
        let n = "10.5.0.0/16";
        vec![
            r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#.to_owned(),
            r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#.to_owned(),
            format!(r#"-A FLANNEL-POSTRTG -s {pod} -d {n} -m comment --comment "flanneld masq" -j RETURN"#),
            format!(r#"-A FLANNEL-POSTRTG -s {n} -d {pod} -m comment --comment "flanneld masq" -j RETURN"#),
            format!(r#"-A FLANNEL-POSTRTG ! -s {n} -d {pod} -m comment --comment "flanneld masq" -j RETURN"#),
            format!(r#"-A FLANNEL-POSTRTG -s {n} ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#),
            format!(r#"-A FLANNEL-POSTRTG ! -s {n} -d {n} -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#),
        ]
    }

    #[test]
    fn masq_rules_match_flannel_golden() {
        let lines: Vec<String> = masq_rules(net("10.5.0.0/16"), net("10.5.72.0/24"), true)
            .iter()
            .map(Rule::save_line)
            .collect();
        assert_eq!(lines, golden_postrouting("10.5.72.0/24"));
    }

    #[test]
    fn masq_rules_without_random_fully() {
        let lines: Vec<String> = masq_rules(net("10.5.0.0/16"), net("10.5.72.0/24"), false)
            .iter()
            .map(Rule::save_line)
            .collect();
        let expected: Vec<String> = golden_postrouting("10.5.72.0/24")
            .into_iter()
            .map(|l| l.replace(" --random-fully", ""))
            .collect();
        assert_eq!(lines, expected);
    }

    #[test]
    fn forward_rules_match_flannel_golden() {
        let lines: Vec<String> = forward_rules(net("10.5.0.0/16"))
            .iter()
            .map(Rule::save_line)
            .collect();
        assert_eq!(
            lines,
            [
                r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#,
                r#"-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
                r#"-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
            ]
        );
    }

    #[test]
    fn rules_use_network_addresses() {
        let rules = forward_rules(net("10.5.1.2/16"));
        assert_eq!(rules[1].spec[1], "10.5.0.0/16");
    }

    #[test]
    fn payload_declares_deletes_and_appends_in_order() {
        let rules = forward_rules(net("10.5.0.0/16"));
        let steps = [
            Step {
                delete: true,
                append: true,
            },
            Step {
                delete: false,
                append: true,
            },
            Step {
                delete: false,
                append: true,
            },
        ];
        assert_eq!(
            restore_payload(&rules, &steps, &[(Table::Filter, FWD_CHAIN)]),
            "*filter\n\
             :FLANNEL-FWD - [0:0]\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
        let teardown = [Step {
            delete: false,
            append: false,
        }; 3];
        assert_eq!(restore_payload(&rules, &teardown, &[]), "");
    }

    #[test]
    fn flannel_chain_of_rules() {
        let masq = masq_rules(net("10.5.0.0/16"), net("10.5.72.0/24"), true);
        assert!(
            masq.iter()
                .all(|r| r.flannel_chain() == Some(POSTRTG_CHAIN))
        );
        assert_eq!(flannel_chains(&masq), vec![(Table::Nat, POSTRTG_CHAIN)]);
        let fwd = forward_rules(net("10.5.0.0/16"));
        assert_eq!(flannel_chains(&fwd), vec![(Table::Filter, FWD_CHAIN)]);
    }

    #[test]
    fn version_parsing() {
        assert_eq!(
            parse_version("iptables v1.8.9 (nf_tables)\n"),
            Some((1, 8, 9))
        );
        assert_eq!(parse_version("iptables v1.6.1"), Some((1, 6, 1)));
        assert_eq!(parse_version("iptables-restore v1.4.21"), Some((1, 4, 21)));
        assert_eq!(parse_version("nonsense"), None);
        assert_eq!(parse_version("iptables v1.x"), None);
        assert!(at_least_1_6_2((1, 6, 2)));
        assert!(at_least_1_6_2((1, 8, 0)));
        assert!(!at_least_1_6_2((1, 6, 1)));
        assert!(!at_least_1_6_2((1, 4, 21)));
    }

    #[test]
    fn delete_chain_payload_removes_only_jumps_to_chain() {
        let listing = "-P POSTROUTING ACCEPT\n\
            -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
            -A POSTROUTING -j KUBE-POSTROUTING\n\
            -A POSTROUTING -j FLANNEL-POSTRTG\n\
            -A POSTROUTING -j FLANNEL-POSTRTG-X\n";
        assert_eq!(
            delete_chain_payload(Table::Nat, listing, POSTRTG_CHAIN),
            "*nat\n\
             -D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -D POSTROUTING -j FLANNEL-POSTRTG\n\
             -F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n"
        );
    }
}
