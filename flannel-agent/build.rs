//! Embeds the BPF object that `cargo xtask build-ebpf` builds, or an empty stub.
//!
//! The BPF programs need a different compiler (Debian's rustc-web) and bpf-linker, so they
//! are not built from here: a plain `cargo build` must work without that toolchain. When
//! the object is missing, an empty file is embedded and `flanneld` refuses the eBPF
//! dataplane at run time with a message saying how to build it.
//!
//! Rerun triggers: the object itself once it exists. Watching a missing file would make
//! cargo rerun this script (and rebuild the agent) on every build, so until the object
//! exists its default directory is created and watched instead. Not both: cargo rewrites
//! `flannel-ebpf.d` in that directory on every BPF build, even one with nothing to do, and
//! a watched directory would then rebuild the agent every time.

use std::{env, fs, path::PathBuf};

/// Where the embedded copy goes, relative to OUT_DIR; `dataplane/ebpf.rs` includes it.
const EMBEDDED_NAME: &str = "flannel-ebpf.o";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-env-changed=FLANNEL_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");

    let (object, is_default) = match env::var_os("FLANNEL_EBPF_OBJECT") {
        Some(p) => (PathBuf::from(p), false),
        None => {
            let target_dir = env::var_os("CARGO_TARGET_DIR").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
                PathBuf::from,
            );
            (
                target_dir.join("bpfel-unknown-none/release/flannel-ebpf"),
                true,
            )
        }
    };

    // Only our own output directory is watched: cargo scans a watched directory
    // recursively, so the parent of an arbitrary FLANNEL_EBPF_OBJECT (say `/`) could cost
    // a scan of the whole filesystem on every build. An override is re-read when the
    // variable or the file changes.
    if is_default
        && !object.is_file()
        && let Some(dir) = object.parent()
    {
        fs::create_dir_all(dir)?;
        println!("cargo::rerun-if-changed={}", dir.display());
    }

    let out =
        PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?).join(EMBEDDED_NAME);
    if object.is_file() {
        println!("cargo::rerun-if-changed={}", object.display());
        fs::copy(&object, &out)
            .map_err(|e| format!("copy {} to {}: {e}", object.display(), out.display()))?;
    } else {
        fs::write(&out, [])?;
    }
    Ok(())
}
