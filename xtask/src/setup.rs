//! `cargo xtask setup`: install what a fresh Debian 12 machine lacks, skip what is there.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{cargo_bin_dir, is_root, run, which};

/// Debian packages the build, the tests and the smoke run need.
pub const PACKAGES: &[&str] = &[
    // A C toolchain: rustc links through `cc`, and ring (rustls, for etcd TLS) compiles C.
    "build-essential",
    // etcd 3.4 (etcd, etcdctl) for the integration tests and the smoke run.
    "etcd-server",
    "etcd-client",
    // etcd-client (the crate) runs protoc in its build script; the well-known types it
    // imports (google/protobuf/descriptor.proto) are only in libprotobuf-dev, which
    // `--no-install-recommends` does not pull in.
    "protobuf-compiler",
    "libprotobuf-dev",
    // Namespaces, links, routes; firewall rules flanneld writes; measurements; debugging.
    "iproute2",
    "iptables",
    "nftables",
    "qperf",
    "iperf3",
    "bpftool",
    "iputils-ping",
    "tcpdump",
    // `cargo xtask bench` turns veth offloads (TSO, GSO, GRO) off with it.
    "ethtool",
    // Certificates for the etcd TLS tests.
    "openssl",
    // The BPF toolchain: Debian's rustc 1.96 with prebuilt core for bpfel-unknown-none,
    // and LLVM 22 for bpf-linker (see docs in the README).
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang-22",
    "lld-22",
];

/// True when dpkg reports `pkg` as installed.
fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
}

/// The packages of [`PACKAGES`] that are not installed.
pub fn missing_packages() -> Vec<&'static str> {
    PACKAGES.iter().copied().filter(|p| !installed(p)).collect()
}

/// What is missing, in words; empty when everything is there.
pub fn check() -> Vec<String> {
    let mut problems = Vec::new();
    let missing = missing_packages();
    if !missing.is_empty() {
        problems.push(format!("missing Debian packages: {}", missing.join(" ")));
    }
    if which("bpf-linker").is_none() {
        problems.push("bpf-linker is not installed".to_owned());
    }
    problems
}

/// The bpf-linker install command: linked against LLVM 22, the LLVM of rustc-web, whose
/// bitcode it links. Its default feature is a newer LLVM, and without LLVM 22's
/// llvm-config first on PATH the build would find no LLVM at all.
fn bpf_linker_install() -> Command {
    let mut cmd = crate::util::cargo();
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("/usr/lib/llvm-22/bin:{path}"))
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
    cmd
}

/// Installs what is missing (apt-get update once, then one install), then bpf-linker.
pub fn setup() -> Result<()> {
    let missing = missing_packages();
    let need_linker = which("bpf-linker").is_none();
    if missing.is_empty() && !need_linker {
        println!("setup: every prerequisite is installed");
        return Ok(());
    }
    if !is_root() {
        let mut msg = String::from("setup needs root to install:\n");
        if !missing.is_empty() {
            msg += &format!(
                "  apt-get update && apt-get install -y {}\n",
                missing.join(" ")
            );
        }
        if need_linker {
            msg += "  PATH=/usr/lib/llvm-22/bin:$PATH LLVM_PREFIX=/usr/lib/llvm-22 \
                    cargo install bpf-linker --locked --no-default-features --features llvm-22\n";
        }
        msg += "run `cargo xtask setup` as root (e.g. sudo -E cargo xtask setup)";
        bail!(msg);
    }
    if !missing.is_empty() {
        println!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if need_linker {
        println!("setup: building bpf-linker against LLVM 22 (a few minutes)");
        run(&mut bpf_linker_install())?;
        if which("bpf-linker").is_none() {
            bail!(
                "bpf-linker was installed but is not found on PATH or in {:?}",
                cargo_bin_dir()
            );
        }
    }
    println!("setup: done");
    Ok(())
}
