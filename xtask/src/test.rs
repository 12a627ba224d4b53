//! `cargo xtask test`: build everything, then run every test.
//!
//! Order matters: the BPF object first (flanneld embeds it at compile time), then
//! `cargo build --bins` (integration tests run the `flanneld` binary, which `cargo test`
//! does not build for another crate's tests), then `cargo test`. Under `CI=true` anything
//! that would make tests skip is an error here already. Then `lab --once` brings up the
//! 3-host lab, and nothing of it may remain afterwards; last, `bench --quick` must report
//! every row, and sweep and chart every row it measured.

use anyhow::{Context, Result, bail};

use crate::{
    ebpf, setup,
    util::{cargo, is_root, run, show, under_ci},
};

pub fn test(cargo_args: &[String]) -> Result<()> {
    let ci = under_ci();
    // On a fresh machine the README's test command installs what it needs, as the lab
    // does; without root it can only say what is missing.
    if is_root() && !setup::check().is_empty() {
        setup::setup()?;
    }
    let problems = setup::check();
    for p in &problems {
        eprintln!("warning: {p}; run `cargo xtask setup` as root");
    }
    if ci && !problems.is_empty() {
        bail!("CI=true: prerequisites missing ({})", problems.join("; "));
    }
    if !is_root() {
        if ci {
            bail!("CI=true: the privileged tests need root; run cargo xtask test as root");
        }
        eprintln!(
            "warning: not root: the privileged tests (network namespaces, etcd, BPF) will skip"
        );
    }

    match ebpf::toolchain() {
        Ok(tc) => {
            let obj = ebpf::build(&tc)?;
            eprintln!("BPF object: {}", obj.display());
        }
        Err(e) if ci => return Err(e.context("CI=true: the BPF object must be built")),
        Err(e) => eprintln!("warning: {e:#}; the BPF object tests will skip"),
    }

    run(cargo().args(["build", "--bins"]))?;
    // flannel-ebpf only builds for the BPF target; everything else is tested. No fail-fast:
    // one failing test binary must not hide the results of the others.
    run(cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "flannel-ebpf",
            "--no-fail-fast",
        ])
        .args(cargo_args))?;
    lab_once()?;
    bench_quick()?;
    Ok(())
}

/// `cargo xtask bench --quick`: its report must have every row, measured or with the
/// reason it is unavailable, and every measured row its message-size sweep, in the
/// tables and as a line in both charts. Nothing asserts speed.
fn bench_quick() -> Result<()> {
    if !is_root() {
        eprintln!("warning: not root: cargo xtask bench --quick is skipped");
        return Ok(());
    }
    let dir = tempfile::Builder::new().prefix("flbench-ci-").tempdir()?;
    run(std::process::Command::new("/proc/self/exe")
        .args(["bench", "--quick", "--offloads", "on", "--out"])
        .arg(dir.path()))?;
    let problems = crate::bench::check_outputs(dir.path())?;
    if !problems.is_empty() {
        bail!(
            "the bench outputs in {} are incomplete:\n  {}",
            dir.keep().display(),
            problems.join("\n  ")
        );
    }
    eprintln!("bench --quick: every row reported, every measured row swept and charted");
    Ok(())
}

/// The lab once, 3 hosts x 2 containers: full connectivity, then nothing of this run
/// left behind (another run's lab, going on meanwhile, is not ours to judge).
fn lab_once() -> Result<()> {
    if !is_root() {
        eprintln!("warning: not root: the lab run (cargo xtask lab --once) is skipped");
        return Ok(());
    }
    // Not current_exe(): a concurrent rebuild may have replaced the file we started from.
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.args(["lab", "--once", "--hosts", "3", "--containers", "2"]);
    eprintln!("+ {}", show(&cmd));
    let mut child = cmd.spawn().context("start the lab")?;
    // Its pid is in the name of everything it makes.
    let pid = child.id();
    let status = child.wait()?;
    if !status.success() {
        bail!("lab --once failed ({status})");
    }
    let left = crate::lab::leftovers(pid);
    if !left.is_empty() {
        bail!(
            "the lab left behind: {}; run `cargo xtask lab down`",
            left.join("; ")
        );
    }
    eprintln!("lab: full connectivity, nothing left behind");
    Ok(())
}
