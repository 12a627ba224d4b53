//! The control-plane bench runs with a small M (issue 5): `cargo xtask bench
//! --control-plane --agents 50 --check`, as a subprocess, so the test exercises exactly
//! the bench's code. `--check` makes it exit non-zero unless every agent acquired a
//! distinct subnet, each new lease reached every agent, RPCs per agent stay under a
//! small constant (not proportional to M), and, as root, every start of the real
//! `flanneld` binary (in a network namespace the bench makes) reported READY=1. Needs
//! etcd and etcdctl; the flanneld part needs root and skips without it.

use std::process::Command;

use flannel_tests::{flanneld_bin, require_binary, skip};

#[test]
fn control_plane_bench_small_m() {
    const NAME: &str = "control_plane_bench_small_m";
    if !require_binary("etcd", NAME) || !require_binary("etcdctl", NAME) {
        return;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests is inside the workspace")
        .to_owned();
    let out = tempfile::tempdir().expect("temp dir");
    // The feature directly (debug build, shared with the test build) rather than
    // `cargo xtask`, which would re-run itself in release.
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&workspace).args([
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
    ]);
    cmd.arg(out.path());
    if root {
        // The debug flanneld `cargo xtask test` builds, not a release build of its own.
        cmd.arg("--flanneld").arg(flanneld_bin());
    }
    let status = cmd.status().expect("run cargo");
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
        "### The flanneld binary",
    ] {
        assert!(report.contains(want), "report lacks {want:?}:\n{report}");
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("control-plane.json"))
            .expect("control-plane.json written"),
    )
    .expect("control-plane.json is JSON");
    let ready = &json["ready"];
    assert_eq!(ready["leases"], 200, "{json}");

    if !root {
        assert!(
            ready["flanneld"].is_null() && ready["flanneld_not_measured"].is_string(),
            "{json}"
        );
        skip(NAME, "the READY of the flanneld binary needs root");
        return;
    }
    let starts = ready["flanneld"]["starts"].as_u64().expect("starts");
    let times: Vec<f64> = ready["flanneld"]["ready_ms"]
        .as_array()
        .expect("ready_ms")
        .iter()
        .map(|t| t.as_f64().expect("a number"))
        .collect();
    assert_eq!(
        times.len() as u64,
        starts,
        "every start of flanneld reaches READY: {json}"
    );
    // Measured, and plausible: more than nothing, less than the bench's own timeout.
    for t in &times {
        assert!(*t > 0.0 && *t < 60_000.0, "READY after {t} ms: {json}");
    }
    assert!(
        report.contains(&format!("| {starts}/{starts} |")),
        "the report's READY table:\n{report}"
    );
}
