//! `flanneld mk-docker-opts`: flannel's `dist/mk-docker-opts.sh`, same options, same output.
//!
//! The script sources subnet.env and turns it into Docker daemon options:
//! `FLANNEL_SUBNET` → `--bip`, `FLANNEL_MTU` → `--mtu`, and `FLANNEL_IPMASQ` inverted into
//! `--ip-masq` (when flannel masquerades, Docker must not). It writes them as individual
//! `DOCKER_OPT_*` variables, in alphabetical order because the script lists them with
//! `set | grep`, and/or as one combined variable whose value starts with a space (each
//! option is appended as `" $opt"`). If the combined variable already has a value in the
//! env file, the options are appended to it, as when the script's `eval` picks it up.
//!
//! Differences from the script, on purpose:
//! - a missing or unreadable `-f` file is an error (the script silently writes empty
//!   options, which hides a flanneld that has not started);
//! - the script's `ip route` check for an existing `via` route to the subnet is not done:
//!   it needs the routing table of the host Docker runs on, and is unrelated to the output.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use super::subnet_env::parse_env;

pub const DEFAULT_FLANNEL_ENV: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DOCKER_ENV: &str = "/run/docker_opts.env";
pub const DEFAULT_COMBINED_KEY: &str = "DOCKER_OPTS";

/// Largest env file read; subnet.env is about 100 bytes.
const MAX_ENV_BYTES: u64 = 64 * 1024;

const USAGE: &str = "usage: mk-docker-opts [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]";

#[derive(Debug, thiserror::Error)]
pub enum DockerOptsError {
    #[error("{reason}\n{USAGE}")]
    Usage { reason: String },
    #[error("invalid value of FLANNEL_IPMASQ: {0}")]
    InvalidIpMasq(String),
    #[error("invalid combined variable name {0:?}: use letters, digits and underscores")]
    InvalidKey(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The script's options. Build it directly (the CLI maps its flags onto it) or with
/// [`DockerOptsArgs::parse_args`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerOptsArgs {
    /// `-f`: the flannel env file to read.
    pub flannel_env: PathBuf,
    /// `-d`: the Docker env file to write.
    pub docker_env: PathBuf,
    /// `-i`: write the individual `DOCKER_OPT_*` variables.
    pub individual: bool,
    /// `-c`: write the combined variable.
    pub combined: bool,
    /// `-k`: the name of the combined variable.
    pub combined_key: String,
    /// `-m`: leave out `--ip-masq`.
    pub omit_ipmasq: bool,
}

impl Default for DockerOptsArgs {
    fn default() -> Self {
        Self {
            flannel_env: PathBuf::from(DEFAULT_FLANNEL_ENV),
            docker_env: PathBuf::from(DEFAULT_DOCKER_ENV),
            individual: false,
            combined: false,
            combined_key: DEFAULT_COMBINED_KEY.to_owned(),
            omit_ipmasq: false,
        }
    }
}

impl DockerOptsArgs {
    /// Parses the script's arguments (without the program name) the way `getopts
    /// "f:d:icmk:"` does: short flags may be combined (`-ic`), an option's value may be
    /// attached (`-kKEY`) or the next argument (`-k KEY`), and `--` ends the options.
    /// Anything else is a usage error.
    pub fn parse_args(args: &[String]) -> Result<Self, DockerOptsError> {
        let usage = |reason: String| DockerOptsError::Usage { reason };
        let mut out = Self::default();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if arg == "--" {
                if let Some(extra) = iter.next() {
                    return Err(usage(format!("unexpected argument {extra:?}")));
                }
                break;
            }
            let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
                return Err(usage(format!("unexpected argument {arg:?}")));
            };
            for (i, flag) in flags.char_indices() {
                match flag {
                    'i' => out.individual = true,
                    'c' => out.combined = true,
                    'm' => out.omit_ipmasq = true,
                    'f' | 'd' | 'k' => {
                        let attached = &flags[i + flag.len_utf8()..];
                        let value = if attached.is_empty() {
                            iter.next().cloned().ok_or_else(|| {
                                usage(format!("option -{flag} requires an argument"))
                            })?
                        } else {
                            attached.to_owned()
                        };
                        match flag {
                            'f' => out.flannel_env = PathBuf::from(value),
                            'd' => out.docker_env = PathBuf::from(value),
                            _ => out.combined_key = value,
                        }
                        break;
                    }
                    other => return Err(usage(format!("illegal option -{other}"))),
                }
            }
        }
        Ok(out)
    }

    /// Neither `-i` nor `-c` means both.
    fn wants(&self) -> (bool, bool) {
        if self.individual || self.combined {
            (self.individual, self.combined)
        } else {
            (true, true)
        }
    }
}

/// The Docker env file for the given flannel env file contents.
pub fn render(env_file_contents: &str, args: &DockerOptsArgs) -> Result<String, DockerOptsError> {
    let valid_key = !args.combined_key.is_empty()
        && !args.combined_key.starts_with(|c: char| c.is_ascii_digit())
        && args
            .combined_key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_key {
        return Err(DockerOptsError::InvalidKey(args.combined_key.clone()));
    }
    let vars = parse_env(env_file_contents, |line, content| {
        tracing::warn!(line, content = %content.escape_debug(), "ignoring unparsable line in flannel env file");
    });
    let non_empty = |key: &str| vars.get(key).filter(|v| !v.is_empty());

    // Alphabetical by variable name, as `set | grep` lists them.
    let mut opts: Vec<(&str, String)> = Vec::new();
    if let Some(subnet) = non_empty("FLANNEL_SUBNET") {
        opts.push(("DOCKER_OPT_BIP", format!("--bip={subnet}")));
    }
    if !args.omit_ipmasq
        && let Some(masq) = non_empty("FLANNEL_IPMASQ")
    {
        let docker_masq = match masq.as_str() {
            "true" => "false",
            "false" => "true",
            other => return Err(DockerOptsError::InvalidIpMasq(other.to_owned())),
        };
        opts.push(("DOCKER_OPT_IPMASQ", format!("--ip-masq={docker_masq}")));
    }
    if let Some(mtu) = non_empty("FLANNEL_MTU") {
        opts.push(("DOCKER_OPT_MTU", format!("--mtu={mtu}")));
    }

    let (individual, combined) = args.wants();
    let mut combined_value = match non_empty(&args.combined_key) {
        Some(existing) => format!("{existing} "),
        None => String::new(),
    };
    let mut out = String::new();
    for (name, value) in &opts {
        if individual {
            out.push_str(&format!("{name}=\"{value}\"\n"));
        }
        combined_value.push(' ');
        combined_value.push_str(value);
    }
    if combined {
        out.push_str(&format!("{}=\"{combined_value}\"\n", args.combined_key));
    }
    Ok(out)
}

/// Reads `-f`, writes `-d`. Nothing is written when the input is invalid.
pub fn run(args: &DockerOptsArgs) -> Result<(), DockerOptsError> {
    let contents = read_bounded(&args.flannel_env).map_err(|source| DockerOptsError::Read {
        path: args.flannel_env.clone(),
        source,
    })?;
    let rendered = render(&contents, args)?;
    fs::write(&args.docker_env, rendered).map_err(|source| DockerOptsError::Write {
        path: args.docker_env.clone(),
        source,
    })?;
    tracing::info!(from = %args.flannel_env.display(), to = %args.docker_env.display(), "wrote docker options");
    Ok(())
}

fn read_bounded(path: &Path) -> io::Result<String> {
    use io::Read as _;
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(MAX_ENV_BYTES)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flannel's `dist/sample_subnet.env`.
    const SAMPLE: &str = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";

    fn args(list: &[&str]) -> DockerOptsArgs {
        let list: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
        DockerOptsArgs::parse_args(&list).unwrap()
    }

    #[test]
    fn golden_default_output() {
        assert_eq!(
            render(SAMPLE, &DockerOptsArgs::default()).unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
             DOCKER_OPT_MTU=\"--mtu=1472\"\n\
             DOCKER_OPTS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
        );
    }

    #[test]
    fn individual_only() {
        assert_eq!(
            render(SAMPLE, &args(&["-i"])).unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
             DOCKER_OPT_MTU=\"--mtu=1472\"\n"
        );
    }

    #[test]
    fn combined_only_with_key() {
        let expected = "DOCKER_NETWORK_OPTIONS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n";
        assert_eq!(
            render(SAMPLE, &args(&["-c", "-k", "DOCKER_NETWORK_OPTIONS"])).unwrap(),
            expected
        );
        assert_eq!(
            render(SAMPLE, &args(&["-ckDOCKER_NETWORK_OPTIONS"])).unwrap(),
            expected
        );
        assert_eq!(
            render(SAMPLE, &args(&["-c", "-kDOCKER_NETWORK_OPTIONS"])).unwrap(),
            expected
        );
    }

    #[test]
    fn both_flags_equal_default() {
        assert_eq!(
            render(SAMPLE, &args(&["-ic"])).unwrap(),
            render(SAMPLE, &args(&[])).unwrap()
        );
        assert_eq!(
            render(SAMPLE, &args(&["-i", "-c"])).unwrap(),
            render(SAMPLE, &args(&[])).unwrap()
        );
    }

    #[test]
    fn omit_ipmasq() {
        assert_eq!(
            render(SAMPLE, &args(&["-m"])).unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\n\
             DOCKER_OPT_MTU=\"--mtu=1472\"\n\
             DOCKER_OPTS=\" --bip=10.1.74.1/24 --mtu=1472\"\n"
        );
        // -m skips the check too, as in the script.
        let bad = SAMPLE.replace("IPMASQ=false", "IPMASQ=yes");
        assert!(render(&bad, &args(&["-m"])).is_ok());
    }

    #[test]
    fn ipmasq_is_inverted_and_validated() {
        let on = SAMPLE.replace("IPMASQ=false", "IPMASQ=true");
        assert!(
            render(&on, &args(&["-i"]))
                .unwrap()
                .contains("DOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n")
        );
        let bad = SAMPLE.replace("IPMASQ=false", "IPMASQ=TRUE");
        let err = render(&bad, &args(&[])).unwrap_err();
        assert_eq!(err.to_string(), "invalid value of FLANNEL_IPMASQ: TRUE");
    }

    #[test]
    fn missing_and_existing_values() {
        assert_eq!(render("", &args(&[])).unwrap(), "DOCKER_OPTS=\"\"\n");
        assert_eq!(
            render("FLANNEL_MTU=1450\nDOCKER_OPTS=\"--debug\"\n", &args(&[])).unwrap(),
            "DOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\"--debug  --mtu=1450\"\n"
        );
    }

    #[test]
    fn parse_args_variants() {
        let a = args(&["-f", "/tmp/in.env", "-d/tmp/out.env", "-mi", "-k", "X"]);
        assert_eq!(
            a,
            DockerOptsArgs {
                flannel_env: "/tmp/in.env".into(),
                docker_env: "/tmp/out.env".into(),
                individual: true,
                combined: false,
                combined_key: "X".into(),
                omit_ipmasq: true,
            }
        );
        assert_eq!(args(&["--"]), DockerOptsArgs::default());
        // -k takes the next argument even when it looks like an option, as getopts does.
        assert_eq!(args(&["-k", "-c"]).combined_key, "-c");
    }

    #[test]
    fn parse_args_errors() {
        for bad in [
            &["-x"][..],
            &["-k"],
            &["-f"],
            &["file"],
            &["-"],
            &["--", "x"],
            &["-iz"],
        ] {
            let list: Vec<String> = bad.iter().map(|s| (*s).to_owned()).collect();
            let err = DockerOptsArgs::parse_args(&list).unwrap_err();
            assert!(
                matches!(err, DockerOptsError::Usage { .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("usage: mk-docker-opts"), "{err}");
        }
        let err = render(SAMPLE, &args(&["-k", "BAD-KEY"])).unwrap_err();
        assert!(matches!(err, DockerOptsError::InvalidKey(_)), "{err}");
    }

    #[test]
    fn run_reads_and_writes_files() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("subnet.env");
        let output = dir.path().join("docker_opts.env");
        fs::write(&input, SAMPLE).unwrap();
        let a = DockerOptsArgs {
            flannel_env: input.clone(),
            docker_env: output.clone(),
            ..DockerOptsArgs::default()
        };
        run(&a).unwrap();
        assert_eq!(
            fs::read_to_string(&output).unwrap(),
            render(SAMPLE, &a).unwrap()
        );

        // Invalid input leaves the old output alone.
        fs::write(&input, SAMPLE.replace("IPMASQ=false", "IPMASQ=maybe")).unwrap();
        assert!(matches!(run(&a), Err(DockerOptsError::InvalidIpMasq(v)) if v == "maybe"));
        assert_eq!(
            fs::read_to_string(&output).unwrap(),
            render(SAMPLE, &a).unwrap()
        );

        let missing = DockerOptsArgs {
            flannel_env: dir.path().join("nope.env"),
            ..a
        };
        let err = run(&missing).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
    }
}
