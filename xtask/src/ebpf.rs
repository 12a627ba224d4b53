//! `cargo xtask build-ebpf`: the BPF object, built with Debian's rustc-web.
//!
//! rustup's stable compiler has no `core` for `bpfel-unknown-none` (and rust-src cannot be
//! relied on here), while Debian's rustc-web ships it prebuilt. So the BPF crate is built
//! by `/usr/bin/cargo` with `RUSTC=/usr/bin/rustc`, and `RUSTC_BOOTSTRAP=1` because aya-ebpf
//! uses `asm_experimental_arch`. The build runs from the workspace root with the shared
//! Cargo.lock: `-p flannel-ebpf` resolves features for that package alone, so
//! flannel-common is built without its `user` feature (no aya, no std) even though the
//! agent enables it.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::util::{run, target_dir, which, workspace_root};

/// The BPF target.
pub const TARGET: &str = "bpfel-unknown-none";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// Where libstd-rust-web-dev-bpf puts the prebuilt `core` for the target.
const BPF_SYSROOT_LIB: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

/// The pieces of the BPF toolchain that were found.
pub struct Toolchain {
    linker_dir: PathBuf,
}

/// Finds the BPF toolchain, or says what is missing.
pub fn toolchain() -> Result<Toolchain> {
    let mut missing = Vec::new();
    for (path, what) in [
        (DEBIAN_RUSTC, "rustc-web"),
        (DEBIAN_CARGO, "cargo-web"),
        (BPF_SYSROOT_LIB, "libstd-rust-web-dev-bpf"),
    ] {
        if !std::path::Path::new(path).exists() {
            missing.push(format!("{path} ({what})"));
        }
    }
    let linker = which("bpf-linker");
    if linker.is_none() {
        missing.push("bpf-linker".to_owned());
    }
    if !missing.is_empty() {
        bail!(
            "the BPF toolchain is incomplete, missing: {}; run `cargo xtask setup` as root",
            missing.join(", ")
        );
    }
    let linker_dir = linker
        .and_then(|l| l.parent().map(PathBuf::from))
        .unwrap_or_default();
    Ok(Toolchain { linker_dir })
}

/// The object `build` produces, which flannel-agent's build.rs embeds.
pub fn object_path() -> PathBuf {
    target_dir().join(TARGET).join("release/flannel-ebpf")
}

/// Builds the BPF object and returns its path.
pub fn build(tc: &Toolchain) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = std::process::Command::new(DEBIAN_CARGO);
    cmd.current_dir(workspace_root())
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        // The target's linker is `bpf-linker`, looked up on PATH.
        .env("PATH", format!("{}:{path}", tc.linker_dir.display()))
        // Set by rustup's proxy that started us; meaningless to Debian's cargo.
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "-p",
            "flannel-ebpf",
        ]);
    run(&mut cmd)?;
    let object = object_path();
    if !object.is_file() {
        bail!(
            "the BPF build succeeded but {} is missing",
            object.display()
        );
    }
    Ok(object)
}
