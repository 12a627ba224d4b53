//! flanneld's command line, compatible with Go flanneld's `main.go` flag set.
//!
//! Go's `flag` package differs from clap in three ways that existing unit files rely on, so
//! [`parse`] bridges them before and after clap:
//! - long flags may be written with one dash (`-etcd-endpoints=…`, `-iface eth0`);
//! - boolean flags take their value only after `=` (`--ip-masq`, `--ip-masq=false`,
//!   `-ip-masq=1`) and accept every form of Go's `strconv.ParseBool`;
//! - every flag not given on the command line may come from `FLANNELD_<FLAG>`
//!   (flannel's `flagutil.SetFlagsFromEnv`), where empty values count as unset.
//!
//! The `mk-docker-opts` and `status` subcommands are ours; they are recognised only as the
//! first argument so they never collide with flag values.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
};

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, ValueEnum, parser::ValueSource};

/// The version printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The prefix of the environment variables that set flags (`FLANNELD_IP_MASQ=true`).
pub const ENV_PREFIX: &str = "FLANNELD_";

const DEFAULT_ETCD_ENDPOINTS: &str = "http://127.0.0.1:4001,http://127.0.0.1:2379";
const DEFAULT_KUBE_ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com";
const DEFAULT_NET_CONFIG_PATH: &str = "/etc/kube-flannel/net-conf.json";

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the daemon.
    Run(Box<Flags>),
    /// `flanneld mk-docker-opts …`: the arguments after the subcommand name.
    MkDockerOpts(Vec<String>),
    /// `flanneld status …`: the arguments after the subcommand name.
    Status(Vec<String>),
    /// `--version`: print [`VERSION`] to stderr (as flannel does) and exit 0.
    Version,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A usage error, or `--help`. The message is clap's, ready to print as is;
    /// [`CliError::exit_code`] tells help (0) from errors (2).
    #[error("{0}")]
    Usage(#[source] clap::Error),
    /// The text is flannel's, byte for byte.
    #[error("Invalid subnet-lease-renew-margin option, out of acceptable range")]
    RenewMarginOutOfRange(u32),
    #[error("--kube-subnet-mgr is not supported: this flanneld uses etcd only")]
    KubeSubnetMgr,
    #[error("--{flag} is not supported: this flanneld uses etcd only")]
    KubeOnlyFlag { flag: &'static str },
    #[error("invalid --iface-regex {pattern:?}")]
    IfaceRegex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

impl CliError {
    /// The process exit status for this error: 0 for `--help`, 2 for other usage errors
    /// (as Go's flag package and clap do), 1 for invalid settings.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// Which dataplane carries the overlay (ours; flannel has only the kernel's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Dataplane {
    /// eBPF when the object is built in and the kernel can load it, else the kernel's.
    #[default]
    Auto,
    /// eBPF programs on the external interface (refused when not built in)
    Ebpf,
    /// the kernel's own devices (vxlan, routes)
    Kernel,
    /// a TUN device served from userspace
    Tun,
}

/// A value that must not reach logs: its `Debug` prints `<redacted>` and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Go's `strconv.ParseBool`, which the flag package uses for boolean flags.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!(
            "parse error: {s:?} is not a boolean (use true or false)"
        )),
    }
}

/// The glog/klog flags old unit files still carry. Only the ones that change where logs go
/// and how verbose they are have an effect; see [`crate::logging`].
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LogFlags {
    /// Log to standard error instead of files
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub logtostderr: bool,

    /// Log to standard error as well as files
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub alsologtostderr: bool,

    /// If non-empty and --logtostderr=false, write log files (flanneld.log) in this directory
    #[arg(long = "log_dir")]
    pub log_dir: Option<PathBuf>,

    /// Log level for V logs: 0 is info, 4 and up debug, 6 and up trace
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub v: u32,

    /// Accepted for compatibility; ignored (use RUST_LOG for per-module levels)
    #[arg(long)]
    pub vmodule: Option<String>,

    /// Accepted for compatibility; ignored
    #[arg(long = "log_backtrace_at")]
    pub log_backtrace_at: Option<String>,

    /// Accepted for compatibility; ignored
    #[arg(long)]
    pub stderrthreshold: Option<String>,
}

impl Default for LogFlags {
    fn default() -> Self {
        Self {
            logtostderr: true,
            alsologtostderr: false,
            log_dir: None,
            v: 0,
            vmodule: None,
            log_backtrace_at: None,
            stderrthreshold: None,
        }
    }
}

/// Every flag of Go flanneld, with its name and default, plus ours (`--dataplane`).
///
/// `Debug` is safe to log: the etcd password prints as `<redacted>`.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "flanneld",
    about = "flannel-compatible overlay network agent",
    // The struct's doc comment is for Rust readers, not `--help`.
    long_about = None,
    disable_version_flag = true,
    // Go's flag package lets the last of repeated single-valued flags win.
    args_override_self = true,
    max_term_width = 100
)]
pub struct Flags {
    /// A comma-delimited list of etcd endpoints
    #[arg(long, default_value = DEFAULT_ETCD_ENDPOINTS)]
    pub etcd_endpoints: String,

    /// etcd prefix
    #[arg(long, default_value = "/coreos.com/network")]
    pub etcd_prefix: String,

    /// SSL key file used to secure etcd communication
    #[arg(long)]
    pub etcd_keyfile: Option<PathBuf>,

    /// SSL certification file used to secure etcd communication
    #[arg(long)]
    pub etcd_certfile: Option<PathBuf>,

    /// SSL Certificate Authority file used to secure etcd communication
    #[arg(long)]
    pub etcd_cafile: Option<PathBuf>,

    /// username for BasicAuth to etcd
    #[arg(long)]
    pub etcd_username: Option<String>,

    /// password for BasicAuth to etcd
    #[arg(long)]
    pub etcd_password: Option<Secret>,

    /// interface to use (IP or name) for inter-host communication; can be given several times
    #[arg(long, action = ArgAction::Append)]
    pub iface: Vec<String>,

    /// regex expression to match the first interface to use (IP or name); can be given
    /// several times
    #[arg(long, action = ArgAction::Append)]
    pub iface_regex: Vec<String>,

    /// detect the interface to use for inter-host communication from the route to this IP
    #[arg(long)]
    pub iface_can_reach: Option<Ipv4Addr>,

    /// IP accessible by other nodes for inter-host communication
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 accessible by other nodes for inter-host communication
    #[arg(long)]
    pub public_ipv6: Option<Ipv6Addr>,

    /// filename where env variables (subnet, MTU, ...) will be written to
    #[arg(long, default_value = "/run/flannel/subnet.env")]
    pub subnet_file: PathBuf,

    /// subnet lease renewal margin, in minutes, ranging from 1 to 1439
    #[arg(long, default_value_t = 60)]
    pub subnet_lease_renew_margin: u32,

    /// setup IP masquerade rule for traffic destined outside of overlay network
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub ip_masq: bool,

    /// disable the fully random source port mapping on the masquerade rules
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub ip_masq_fully_random_disable: bool,

    /// contact the Kubernetes API for subnet assignment instead of etcd (not supported)
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub kube_subnet_mgr: bool,

    /// Kubernetes API server URL (kube mode only; not supported)
    #[arg(long)]
    pub kube_api_url: Option<String>,

    /// kubeconfig file location (kube mode only; not supported)
    #[arg(long)]
    pub kubeconfig_file: Option<String>,

    /// Kubernetes annotation prefix (kube mode only; not supported)
    #[arg(long, default_value = DEFAULT_KUBE_ANNOTATION_PREFIX)]
    pub kube_annotation_prefix: String,

    /// path to the network configuration file (kube mode only; not supported)
    #[arg(long, default_value = DEFAULT_NET_CONFIG_PATH)]
    pub net_config_path: PathBuf,

    /// set NetworkUnavailable=false on the node (kube mode only; not supported)
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub set_node_network_unavailable: bool,

    /// the IP address for the healthz server to listen on
    #[arg(long, default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,

    /// the port for the healthz server to listen on (0 to disable)
    #[arg(long, default_value_t = 0)]
    pub healthz_port: u16,

    /// resync period for iptables rules, in seconds
    #[arg(long, default_value_t = 5)]
    pub iptables_resync: u64,

    /// add default accept rules to the FORWARD chain in iptables
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub iptables_forward_rules: bool,

    /// add a blackhole route for the node's own subnet
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub ip_blackhole_route: bool,

    /// print version and exit
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub version: bool,

    /// dataplane for the overlay: auto, ebpf, kernel or tun
    #[arg(long, value_enum, default_value_t = Dataplane::Auto)]
    pub dataplane: Dataplane,

    /// directory for state kept across restarts and reboots (the VTEP MAC)
    #[arg(long, default_value = "/var/lib/flannel")]
    pub state_dir: PathBuf,

    /// bpffs directory where the eBPF dataplane pins its maps and links (one per
    /// flanneld on a machine)
    #[arg(long, default_value = "/sys/fs/bpf/flannel")]
    pub bpf_pin_dir: PathBuf,

    #[command(flatten)]
    pub log: LogFlags,
}

impl Flags {
    /// The etcd endpoints, split on commas as flannel does.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Checks what clap cannot: flannel's range for the renewal margin, the kube-only
    /// flags we refuse, and the `--iface-regex` patterns.
    pub fn validate(&self) -> Result<(), CliError> {
        if self.kube_subnet_mgr {
            return Err(CliError::KubeSubnetMgr);
        }
        // Without --kube-subnet-mgr flannel ignores these; a unit file that sets them expects
        // kube mode, so saying so beats silently running against etcd.
        let kube_only = [
            ("kube-api-url", self.kube_api_url.is_some()),
            ("kubeconfig-file", self.kubeconfig_file.is_some()),
            (
                "kube-annotation-prefix",
                self.kube_annotation_prefix != DEFAULT_KUBE_ANNOTATION_PREFIX,
            ),
            (
                "net-config-path",
                self.net_config_path.as_os_str() != DEFAULT_NET_CONFIG_PATH,
            ),
            (
                "set-node-network-unavailable",
                !self.set_node_network_unavailable,
            ),
        ];
        if let Some((flag, _)) = kube_only.into_iter().find(|(_, set)| *set) {
            return Err(CliError::KubeOnlyFlag { flag });
        }
        if !(1..=1439).contains(&self.subnet_lease_renew_margin) {
            return Err(CliError::RenewMarginOutOfRange(
                self.subnet_lease_renew_margin,
            ));
        }
        for pattern in &self.iface_regex {
            regex::Regex::new(pattern).map_err(|source| CliError::IfaceRegex {
                pattern: pattern.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Parses a full argv (`args[0]` is the program name) with `env` standing in for the
/// process environment, and validates the flags.
///
/// `main` calls it as `cli::parse(std::env::args(), |k| std::env::var(k).ok())`.
pub fn parse(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, CliError> {
    let mut args: Vec<String> = args.into_iter().collect();
    if args.is_empty() {
        args.push("flanneld".to_owned());
    }
    match args.get(1).map(String::as_str) {
        Some("mk-docker-opts") => return Ok(Command::MkDockerOpts(args.split_off(2))),
        Some("status") => return Ok(Command::Status(args.split_off(2))),
        _ => {}
    }

    let cmd = Flags::command();
    let mut argv = normalise_go_args(&cmd, args);

    // First pass: which flags did the command line give? Only the others come from the
    // environment, as in Go's SetFlagsFromEnv.
    let matches = cmd
        .clone()
        .try_get_matches_from(&argv)
        .map_err(CliError::Usage)?;
    let flags = Flags::from_arg_matches(&matches).map_err(CliError::Usage)?;
    // flannel checks --version before it reads the environment.
    if flags.version {
        return Ok(Command::Version);
    }
    for arg in cmd.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if matches!(id, "help" | "version")
            || matches.value_source(id) == Some(ValueSource::CommandLine)
        {
            continue;
        }
        let var = format!("{ENV_PREFIX}{}", long.to_uppercase().replace('-', "_"));
        if let Some(value) = env(&var).filter(|v| !v.is_empty()) {
            argv.push(format!("--{long}={value}"));
        }
    }

    let flags = Flags::try_parse_from(&argv).map_err(CliError::Usage)?;
    flags.validate()?;
    Ok(Command::Run(Box::new(flags)))
}

/// Rewrites Go-style arguments into the form clap accepts:
/// `-name[=v]` → `--name[=v]` for known long names, `--name value` → `--name=value` for
/// flags that take a value (so a value starting with `-` stays a value, as in Go), and an
/// empty `--name=` is dropped (Go leaves such a string flag at "", which for us is unset).
fn normalise_go_args(cmd: &clap::Command, args: Vec<String>) -> Vec<String> {
    let takes_value = |name: &str| -> Option<bool> {
        if name == "help" {
            return Some(false);
        }
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(name))
            .map(|a| a.get_action().takes_values() && !a.is_require_equals_set())
    };

    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    out.extend(iter.next());
    while let Some(arg) = iter.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(iter);
            break;
        }
        let Some(body) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|b| !b.is_empty())
        else {
            out.push(arg);
            continue;
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let Some(needs_value) = takes_value(name) else {
            // Unknown to us (or a short cluster such as `-h`): clap reports it.
            out.push(arg);
            continue;
        };
        match value {
            Some("") if needs_value => {}
            Some(v) => out.push(format!("--{name}={v}")),
            None if needs_value => match iter.next() {
                Some(v) if v.is_empty() => {}
                Some(v) => out.push(format!("--{name}={v}")),
                // Let clap say the value is missing.
                None => out.push(format!("--{name}")),
            },
            None => out.push(format!("--{name}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        std::iter::once("flanneld")
            .chain(args.iter().copied())
            .map(str::to_owned)
            .collect()
    }

    fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Flags, CliError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        match parse(argv(args), |k| env.get(k).cloned())? {
            Command::Run(flags) => Ok(*flags),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn run(args: &[&str]) -> Flags {
        run_with_env(args, &[]).unwrap()
    }

    #[test]
    fn defaults_match_flanneld() {
        let f = run(&[]);
        assert_eq!(
            f.etcd_endpoints,
            "http://127.0.0.1:4001,http://127.0.0.1:2379"
        );
        assert_eq!(
            f.etcd_endpoints(),
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.etcd_keyfile, None);
        assert_eq!(f.etcd_password, None);
        assert!(f.iface.is_empty() && f.iface_regex.is_empty());
        assert_eq!(f.iface_can_reach, None);
        assert_eq!(f.public_ip, None);
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert!(!f.ip_masq);
        assert!(!f.ip_masq_fully_random_disable);
        assert!(!f.kube_subnet_mgr);
        assert_eq!(f.kube_annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(
            f.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert!(f.set_node_network_unavailable);
        assert_eq!(f.healthz_ip, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(f.healthz_port, 0);
        assert_eq!(f.iptables_resync, 5);
        assert!(f.iptables_forward_rules);
        assert!(!f.ip_blackhole_route);
        assert_eq!(f.dataplane, Dataplane::Auto);
        assert_eq!(f.log, LogFlags::default());
    }

    #[test]
    fn double_and_single_dash_forms_are_equivalent() {
        let double = run(&[
            "--etcd-endpoints=http://10.0.0.1:2379",
            "--iface",
            "eth0",
            "--ip-masq",
            "--public-ip=192.0.2.7",
            "--healthz-port",
            "8081",
        ]);
        let single = run(&[
            "-etcd-endpoints=http://10.0.0.1:2379",
            "-iface",
            "eth0",
            "-ip-masq",
            "-public-ip=192.0.2.7",
            "-healthz-port",
            "8081",
        ]);
        assert_eq!(double, single);
        assert_eq!(single.etcd_endpoints(), ["http://10.0.0.1:2379"]);
        assert_eq!(single.iface, ["eth0"]);
        assert!(single.ip_masq);
        assert_eq!(single.public_ip, Some(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(single.healthz_port, 8081);
    }

    #[test]
    fn separated_value_starting_with_dash_stays_a_value() {
        let f = run(&["-etcd-password", "-secret-", "-etcd-prefix", "-x"]);
        assert_eq!(f.etcd_password.unwrap().expose(), "-secret-");
        assert_eq!(f.etcd_prefix, "-x");
    }

    #[test]
    fn go_bool_forms() {
        for (arg, want) in [
            ("--ip-masq", true),
            ("-ip-masq", true),
            ("--ip-masq=true", true),
            ("--ip-masq=false", false),
            ("-ip-masq=1", true),
            ("-ip-masq=0", false),
            ("--ip-masq=t", true),
            ("--ip-masq=T", true),
            ("--ip-masq=TRUE", true),
            ("--ip-masq=True", true),
            ("--ip-masq=f", false),
            ("--ip-masq=F", false),
            ("--ip-masq=FALSE", false),
            ("--ip-masq=False", false),
        ] {
            assert_eq!(run(&[arg]).ip_masq, want, "{arg}");
        }
        assert!(!run(&["--iptables-forward-rules=false"]).iptables_forward_rules);
        for bad in ["--ip-masq=yes", "--ip-masq=2", "--ip-masq=tRuE"] {
            let err = run_with_env(&[bad], &[]).unwrap_err();
            assert!(matches!(err, CliError::Usage(_)), "{bad}: {err:?}");
        }
        // As in Go, a bool flag never takes the next argument as its value.
        assert!(run_with_env(&["--ip-masq", "false"], &[]).is_err());
    }

    #[test]
    fn repeated_flags() {
        let f = run(&[
            "--iface=eth0",
            "-iface",
            "10.0.0.5",
            "--iface-regex=^ens",
            "-iface-regex=^10\\.",
            "--etcd-prefix=/a",
            "--etcd-prefix=/b",
        ]);
        assert_eq!(f.iface, ["eth0", "10.0.0.5"]);
        assert_eq!(f.iface_regex, ["^ens", "^10\\."]);
        // Go's flag package lets the last value of a single-valued flag win.
        assert_eq!(f.etcd_prefix, "/b");
    }

    #[test]
    fn env_sets_only_flags_absent_from_the_command_line() {
        let f = run_with_env(
            &["--etcd-prefix=/cli", "--iface=eth1"],
            &[
                ("FLANNELD_ETCD_PREFIX", "/env"),
                ("FLANNELD_IFACE", "eth9"),
                ("FLANNELD_ETCD_ENDPOINTS", "https://etcd:2379"),
                ("FLANNELD_IP_MASQ", "True"),
                ("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "30"),
                ("FLANNELD_IFACE_REGEX", "^eth"),
                ("FLANNELD_PUBLIC_IP", ""),
                ("FLANNELD_V", "4"),
                ("FLANNELD_LOG_DIR", "/var/log/flannel"),
                ("FLANNELD_DATAPLANE", "kernel"),
            ],
        )
        .unwrap();
        assert_eq!(f.etcd_prefix, "/cli");
        assert_eq!(f.iface, ["eth1"]);
        assert_eq!(f.etcd_endpoints, "https://etcd:2379");
        assert!(f.ip_masq);
        assert_eq!(f.subnet_lease_renew_margin, 30);
        assert_eq!(f.iface_regex, ["^eth"]);
        assert_eq!(f.public_ip, None, "empty env values are ignored");
        assert_eq!(f.log.v, 4);
        assert_eq!(f.log.log_dir, Some(PathBuf::from("/var/log/flannel")));
        assert_eq!(f.dataplane, Dataplane::Kernel);

        // A bool given on the command line as false is not overridden by the env.
        let f = run_with_env(&["--ip-masq=false"], &[("FLANNELD_IP_MASQ", "true")]).unwrap();
        assert!(!f.ip_masq);
        let f = run_with_env(&[], &[("FLANNELD_IPTABLES_FORWARD_RULES", "0")]).unwrap();
        assert!(!f.iptables_forward_rules);
        assert!(run_with_env(&[], &[("FLANNELD_IP_MASQ", "maybe")]).is_err());
    }

    #[test]
    fn renew_margin_range() {
        for ok in ["1", "60", "1439"] {
            let f = run(&[&format!("--subnet-lease-renew-margin={ok}")]);
            assert_eq!(f.subnet_lease_renew_margin.to_string(), ok);
        }
        for bad in ["0", "1440", "100000"] {
            let err = run_with_env(&["--subnet-lease-renew-margin", bad], &[]).unwrap_err();
            assert!(matches!(err, CliError::RenewMarginOutOfRange(_)), "{bad}");
            assert_eq!(
                err.to_string(),
                "Invalid subnet-lease-renew-margin option, out of acceptable range"
            );
            assert_eq!(err.exit_code(), 1);
        }
    }

    #[test]
    fn kube_flags_parse_but_are_refused() {
        let err = run_with_env(&["--kube-subnet-mgr"], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--kube-subnet-mgr is not supported: this flanneld uses etcd only"
        );
        let err = run_with_env(&[], &[("FLANNELD_KUBE_SUBNET_MGR", "true")]).unwrap_err();
        assert!(matches!(err, CliError::KubeSubnetMgr));
        let err = run_with_env(&["-kube-api-url=https://k8s:6443"], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--kube-api-url is not supported: this flanneld uses etcd only"
        );
        let err = run_with_env(&["--set-node-network-unavailable=false"], &[]).unwrap_err();
        assert!(matches!(
            err,
            CliError::KubeOnlyFlag {
                flag: "set-node-network-unavailable"
            }
        ));
        // Explicitly off, or at their defaults, they are harmless.
        run(&[
            "--kube-subnet-mgr=false",
            "--kube-annotation-prefix=flannel.alpha.coreos.com",
        ]);
    }

    #[test]
    fn password_never_shows_in_debug() {
        let f = run(&[
            "--etcd-username=flannel",
            "--etcd-password=hunter2-very-secret",
        ]);
        assert_eq!(
            f.etcd_password.as_ref().unwrap().expose(),
            "hunter2-very-secret"
        );
        for rendered in [format!("{f:?}"), format!("{f:#?}")] {
            assert!(!rendered.contains("hunter2"), "{rendered}");
            assert!(rendered.contains("<redacted>"), "{rendered}");
            assert!(rendered.contains("flannel"), "{rendered}");
        }
        let f = run_with_env(&[], &[("FLANNELD_ETCD_PASSWORD", "from-env-secret")]).unwrap();
        assert!(!format!("{f:?}").contains("from-env-secret"));
    }

    #[test]
    fn glog_flags_are_accepted() {
        let f = run(&[
            "--logtostderr=false",
            "--log_dir=/var/log/flanneld",
            "-alsologtostderr",
            "-v=6",
            "--vmodule=foo=2",
            "--log_backtrace_at=main.go:1",
            "-stderrthreshold=INFO",
        ]);
        assert!(!f.log.logtostderr);
        assert!(f.log.alsologtostderr);
        assert_eq!(f.log.log_dir, Some(PathBuf::from("/var/log/flanneld")));
        assert_eq!(f.log.v, 6);
        assert_eq!(f.log.vmodule.as_deref(), Some("foo=2"));
        assert_eq!(run(&["-v", "2"]).log.v, 2);
        assert_eq!(run(&["--v=3"]).log.v, 3);
        assert!(
            run(&["--logtostderr=false", "-logtostderr"])
                .log
                .logtostderr
        );
    }

    #[test]
    fn version_help_and_subcommands() {
        for args in [&["--version"][..], &["-version"], &["--version=true"]] {
            assert!(matches!(
                parse(argv(args), |_| None).unwrap(),
                Command::Version
            ));
        }
        // flannel checks --version before reading the environment.
        assert!(matches!(
            parse(argv(&[]), |k| (k == "FLANNELD_VERSION")
                .then(|| "true".into()))
            .unwrap(),
            Command::Run(_)
        ));
        for help in ["--help", "-h", "-help"] {
            let err = parse(argv(&[help]), |_| None).unwrap_err();
            assert_eq!(err.exit_code(), 0, "{help}");
            assert!(err.to_string().contains("--etcd-endpoints"));
        }
        let err = parse(argv(&["--no-such-flag"]), |_| None).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        match parse(
            argv(&["mk-docker-opts", "-d", "/run/docker_opts.env", "-c"]),
            |_| None,
        )
        .unwrap()
        {
            Command::MkDockerOpts(rest) => assert_eq!(rest, ["-d", "/run/docker_opts.env", "-c"]),
            other => panic!("{other:?}"),
        }
        match parse(argv(&["status", "--healthz-port=8081"]), |_| None).unwrap() {
            Command::Status(rest) => assert_eq!(rest, ["--healthz-port=8081"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn typed_values_are_checked() {
        assert!(run_with_env(&["--public-ip=not-an-ip"], &[]).is_err());
        assert!(run_with_env(&["--healthz-port=70000"], &[]).is_err());
        assert!(run_with_env(&["--dataplane=xdp"], &[]).is_err());
        assert!(matches!(
            run_with_env(&["--iface-regex=("], &[]).unwrap_err(),
            CliError::IfaceRegex { .. }
        ));
        // An empty `--public-ip=` (an unset variable in a unit file) means unset, as in Go.
        assert_eq!(run(&["--public-ip="]).public_ip, None);
        assert_eq!(
            run(&["--iface-can-reach", "192.0.2.1"]).iface_can_reach,
            Some(Ipv4Addr::new(192, 0, 2, 1))
        );
    }
}
