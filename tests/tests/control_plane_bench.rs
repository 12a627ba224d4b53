//! The control-plane bench runs with a small M (issue 5): `cargo xtask bench
//! --control-plane --agents 50 --check`, as a subprocess, so the test exercises exactly
//! the bench's code. `--check` makes it exit non-zero unless every agent acquired a
//! distinct subnet, each new lease reached every agent, and RPCs per agent stay under a
//! small constant (not proportional to M). Needs etcd and etcdctl; no root.

use std::process::Command;

use flannel_tests::require_binary;

#[test]
fn control_plane_bench_small_m() {
    const NAME: &str = "control_plane_bench_small_m";
    if !require_binary("etcd", NAME) || !require_binary("etcdctl", NAME) {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests is inside the workspace")
        .to_owned();
    let out = tempfile::tempdir().expect("temp dir");
    // The feature directly (debug build, shared with the test build) rather than
    // `cargo xtask`, which would re-run itself in release.
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--features",
            "control-plane",
            "--",
            "bench",
            "--control-plane",
            "--agents=50",
            "--leases-for-ready=200",
            "--check",
            "--out",
        ])
        .arg(out.path())
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "control-plane bench --check failed: {status}"
    );
    let report = std::fs::read_to_string(out.path().join("control-plane.md"))
        .expect("control-plane.md written");
    for want in [
        "## Scale",
        "### etcd RPCs with 50 agents",
        "## READY with 200",
    ] {
        assert!(report.contains(want), "report lacks {want:?}:\n{report}");
    }
}
