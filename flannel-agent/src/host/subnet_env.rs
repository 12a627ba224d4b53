//! `subnet.env`: the file Docker, the CNI plugin and `mk-docker-opts` read.
//!
//! The format and order are flannel's (`pkg/subnet/subnet.go: WriteSubnetFile`): plain
//! `KEY=value` lines, no quotes. `FLANNEL_SUBNET` is the lease's network address plus one
//! with the lease's prefix, the address meant for the bridge. The file is written
//! atomically (temp file in the same directory, fsync, rename) so a reader never sees half
//! a file, with mode 0644 in a 0755 directory.
//!
//! At start flanneld reads the previous file back (flannel's `ReadCIDRFromSubnetFile`,
//! which uses godotenv) to reclaim the previous subnet and to delete stale masquerade
//! rules. That read is tolerant: anything it cannot make sense of is ignored, and only an
//! unreadable file is an error.

use std::{
    collections::BTreeMap,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Read as _, Write as _},
    net::Ipv4Addr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

/// Largest subnet.env we read; flannel's is about 100 bytes.
pub const MAX_SUBNET_ENV_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot rename {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("subnet file path {0} has no file name")]
    NoFileName(PathBuf),
}

/// What flanneld writes to `--subnet-file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The config's `Network`.
    pub network: Ipv4Net,
    /// Our lease, e.g. 10.5.72.0/24.
    pub subnet: Ipv4Net,
    /// The backend's MTU.
    pub mtu: u32,
    /// The value of `--ip-masq`.
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// The file's contents, byte for byte what flannel writes.
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network.trunc(),
            bridge_address(self.subnet),
            self.mtu,
            self.ipmasq,
        )
    }

    /// Writes the file atomically: a reader sees the old file or the new one, never a mix.
    pub fn write_atomic(&self, path: impl AsRef<Path>) -> Result<(), SubnetEnvError> {
        write_file_atomic(path.as_ref(), self.render().as_bytes())
    }
}

/// `FLANNEL_SUBNET`: the lease's first address after the network address, with the lease's
/// prefix. Wraps like flannel's `IP4.Next` would on a /32 at the top of the space.
fn bridge_address(lease: Ipv4Net) -> String {
    let first = u32::from(lease.network()).wrapping_add(1);
    format!("{}/{}", Ipv4Addr::from(first), lease.prefix_len())
}

fn write_file_atomic(path: &Path, contents: &[u8]) -> Result<(), SubnetEnvError> {
    let file_name = path
        .file_name()
        .ok_or_else(|| SubnetEnvError::NoFileName(path.to_owned()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(|source| SubnetEnvError::CreateDir {
            path: dir.clone(),
            source,
        })?;

    // Same directory as the target, so the rename cannot cross a filesystem. The random
    // suffix keeps two writers (or a crashed earlier run's leftover) from colliding.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", rand::random::<u32>()));
    let tmp = dir.join(tmp_name);

    let result = write_tmp(&tmp, contents).and_then(|()| {
        fs::rename(&tmp, path).map_err(|source| SubnetEnvError::Rename {
            from: tmp.clone(),
            to: path.to_owned(),
            source,
        })
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; a failure here leaves a correct file, so it is only
    // worth a warning.
    if let Err(err) = File::open(&dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %err, "cannot fsync directory after writing subnet file");
    }
    Ok(())
}

fn write_tmp(tmp: &Path, contents: &[u8]) -> Result<(), SubnetEnvError> {
    let err = |source| SubnetEnvError::Write {
        path: tmp.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp)
        .map_err(err)?;
    // The umask may have taken bits away from the mode above; readers need 0644.
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

/// What a previous run left in subnet.env, as far as it can be understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Previous {
    /// `FLANNEL_NETWORK`, masked to its network address.
    pub network: Option<Ipv4Net>,
    /// `FLANNEL_SUBNET`, masked: `10.5.72.1/24` gives 10.5.72.0/24.
    pub subnet: Option<Ipv4Net>,
}

impl Previous {
    /// Both values, as [`TrafficManager::setup_masq`] takes them; flannel's stale-rule
    /// cleanup needs both.
    ///
    /// [`TrafficManager::setup_masq`]: super::trafficmngr::TrafficManager::setup_masq
    pub fn network_and_subnet(&self) -> Option<(Ipv4Net, Ipv4Net)> {
        Some((self.network?, self.subnet?))
    }
}

/// Reads the previous subnet.env. A missing file is `Ok(None)`; a value that is absent,
/// not a CIDR, or a comma list of more than one entry is `None` (flannel's rule). Lines
/// that are not `KEY=value` are skipped with a warning.
pub fn read_previous(path: impl AsRef<Path>) -> Result<Option<Previous>, SubnetEnvError> {
    let path = path.as_ref();
    let read_err = |source| SubnetEnvError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_SUBNET_ENV_BYTES)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let text = String::from_utf8_lossy(&bytes);
    let vars = parse_env(&text, |line_no, line| {
        tracing::warn!(path = %path.display(), line = line_no, content = %line.escape_debug(), "ignoring unparsable line in subnet file");
    });
    Ok(Some(previous_from_vars(&vars)))
}

/// The previous network and subnet from already parsed variables.
pub fn previous_from_vars(vars: &BTreeMap<String, String>) -> Previous {
    let cidr = |key: &str| {
        let value = vars.get(key)?;
        // flannel accepts a comma list, drops the entries that do not parse, and treats
        // anything but exactly one remaining entry as nothing.
        let nets: Vec<Ipv4Net> = value
            .split(',')
            .filter_map(|part| part.trim().parse::<Ipv4Net>().ok())
            .collect();
        match nets.as_slice() {
            [one] => Some(one.trunc()),
            [] => {
                tracing::warn!(key, value = %value, "no IPv4 CIDR in subnet file; ignoring it");
                None
            }
            _ => {
                tracing::warn!(key, value = %value, "more than one entry in subnet file; ignoring it");
                None
            }
        }
    };
    Previous {
        network: cidr("FLANNEL_NETWORK"),
        subnet: cidr("FLANNEL_SUBNET"),
    }
}

/// Parses dotenv text the way godotenv and a POSIX shell agree on: `KEY=value`, an
/// optional `export ` prefix, `#` comments, single or double quotes, and an unquoted
/// value ending at ` #`. Lines that do not fit are passed to `on_bad_line` (1-based line
/// number, raw line) and skipped. The last assignment of a key wins, as when sourcing.
pub fn parse_env(text: &str, mut on_bad_line: impl FnMut(usize, &str)) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some((key, value)) => {
                vars.insert(key.to_owned(), value);
            }
            None => on_bad_line(idx + 1, raw),
        }
    }
    vars
}

fn parse_line(line: &str) -> Option<(&str, String)> {
    let line = line.strip_prefix("export ").map_or(line, str::trim_start);
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    let valid_key = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_key {
        return None;
    }
    let value = value.trim();
    let value = match value.chars().next() {
        Some(q @ ('"' | '\'')) => {
            let rest = &value[1..];
            let end = rest.find(q)?;
            rest[..end].to_owned()
        }
        _ => match value.find(" #") {
            Some(i) => value[..i].trim_end().to_owned(),
            None => value.to_owned(),
        },
    };
    Some((key, value))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn sample() -> SubnetEnv {
        SubnetEnv {
            network: net("10.5.0.0/16"),
            subnet: net("10.5.72.0/24"),
            mtu: 1450,
            ipmasq: false,
        }
    }

    #[test]
    fn render_matches_flannel() {
        assert_eq!(
            sample().render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        let udp = SubnetEnv {
            network: net("10.1.0.0/16"),
            subnet: net("10.1.74.0/24"),
            mtu: 1472,
            ipmasq: true,
        };
        assert_eq!(
            udp.render(),
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn render_uses_network_address_of_lease() {
        let env = SubnetEnv {
            subnet: net("10.5.72.9/24"),
            ..sample()
        };
        assert!(env.render().contains("FLANNEL_SUBNET=10.5.72.1/24\n"));
    }

    #[test]
    fn write_atomic_creates_dir_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        sample().write_atomic(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), sample().render());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o755);

        // A second write replaces the file and leaves no temp file behind.
        let second = SubnetEnv {
            mtu: 1400,
            ..sample()
        };
        second.write_atomic(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), second.render());
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
    }

    #[test]
    fn write_atomic_reports_path_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "x").unwrap();
        let err = sample()
            .write_atomic(blocker.join("subnet.env"))
            .unwrap_err();
        assert!(matches!(err, SubnetEnvError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("cannot create directory"), "{err}");
    }

    #[test]
    fn read_previous_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        sample().write_atomic(&path).unwrap();
        let prev = read_previous(&path).unwrap().unwrap();
        assert_eq!(prev.network, Some(net("10.5.0.0/16")));
        assert_eq!(prev.subnet, Some(net("10.5.72.0/24")));
        assert_eq!(
            prev.network_and_subnet(),
            Some((net("10.5.0.0/16"), net("10.5.72.0/24")))
        );
    }

    #[test]
    fn read_previous_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_previous(dir.path().join("nope")).unwrap(), None);
    }

    #[test]
    fn read_previous_unreadable_is_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be read as a file.
        let err = read_previous(dir.path()).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
    }

    #[test]
    fn read_previous_tolerates_garbage_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        fs::write(
            &path,
            "garbage line\n=x\n# comment\nexport FLANNEL_NETWORK=\"10.5.0.0/16\"\n\
             FLANNEL_SUBNET=10.5.72.1/24,10.6.1.1/24\nFLANNEL_MTU=1450 # trailing\n",
        )
        .unwrap();
        let prev = read_previous(&path).unwrap().unwrap();
        assert_eq!(prev.network, Some(net("10.5.0.0/16")));
        assert_eq!(prev.subnet, None, "a list of two entries counts as none");

        // Entries that do not parse are dropped before counting, as in flannel.
        fs::write(
            &path,
            "FLANNEL_NETWORK=10.5.0.0/16,\nFLANNEL_SUBNET=not-a-cidr\n",
        )
        .unwrap();
        let prev = read_previous(&path).unwrap().unwrap();
        assert_eq!(prev.network, Some(net("10.5.0.0/16")));
        assert_eq!(prev.subnet, None);
    }

    #[test]
    fn parse_env_reports_bad_lines() {
        let mut bad = Vec::new();
        let vars = parse_env("A=1\nnot a var\n9X=2\nB='q # x'\nC=\"open\n", |n, l| {
            bad.push((n, l.to_owned()));
        });
        assert_eq!(vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(vars.get("B").map(String::as_str), Some("q # x"));
        assert_eq!(
            bad,
            vec![
                (2, "not a var".to_owned()),
                (3, "9X=2".to_owned()),
                (5, "C=\"open".to_owned())
            ]
        );
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in any::<String>()) {
            let vars = parse_env(&text, |_, _| {});
            let _ = previous_from_vars(&vars);
        }

        #[test]
        fn parsing_never_panics_on_env_like_text(
            lines in proptest::collection::vec("(export )?[A-Z_]{0,16}[=:]?[\"' #,./0-9a-z]{0,24}", 0..8)
        ) {
            let text = lines.join("\n");
            let vars = parse_env(&text, |_, _| {});
            let _ = previous_from_vars(&vars);
        }

        #[test]
        fn render_then_read_round_trips(a in any::<u32>(), len in 8u8..=28, sub in 0u8..=2, mtu in any::<u32>()) {
            // Leases are at most /30 (flannel's SubnetLen limit), so .1 stays inside.
            let network = Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc();
            let subnet = Ipv4Net::new(network.network(), len + sub).unwrap();
            let env = SubnetEnv { network, subnet, mtu, ipmasq: mtu % 2 == 0 };
            let vars = parse_env(&env.render(), |n, l| panic!("bad line {n}: {l}"));
            let prev = previous_from_vars(&vars);
            prop_assert_eq!(prev.network, Some(network));
            prop_assert_eq!(prev.subnet, Some(subnet));
        }
    }
}
