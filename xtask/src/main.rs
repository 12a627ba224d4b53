//! `cargo xtask`: the developer workflow of this workspace.
//!
//! - `setup`: install what a fresh Debian 12 machine lacks (as root);
//! - `build-ebpf`: build the BPF object with Debian's rustc-web and bpf-linker;
//! - `test`: build everything and run every test, the privileged ones included;
//! - `smoke`: two flanneld "hosts" in network namespaces against one etcd;
//! - `bench`: iperf3 and qperf between two containers, per dataplane.
//! - `lab`: N hosts with M containers each against one etcd, a connectivity table, live
//!   per-peer counters until Ctrl-C; `lab down` removes what a killed run left.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "xtask is a command-line tool for developers: printing is its interface"
)]

mod bench;
mod ebpf;
mod lab;
mod netns;
mod setup;
mod smoke;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "flannel-rs developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (Debian packages, bpf-linker); needs root.
    Setup,
    /// Build the BPF object (target bpfel-unknown-none) and print its path.
    BuildEbpf,
    /// Build everything and run all tests, privileged ones included (run as root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Two flanneld hosts in network namespaces against one etcd (run as root).
    Smoke,
    /// iperf3 and qperf between two containers for each dataplane, offloads on and off;
    /// writes target/bench/report.md and results.json (run as root).
    Bench(bench::BenchArgs),
    /// A multi-host cluster in namespaces: etcd, N hosts with flanneld, M containers
    /// each; pings every container pair and shows a table (run as root).
    /// `cargo xtask lab down` removes what a killed run left.
    Lab(lab::LabArgs),
    /// GET http://ADDR/PATH and print the body; exit 0 only on 200. Used by `smoke`
    /// inside a namespace, where no HTTP client may be installed.
    #[command(hide = true)]
    HttpGet { addr: String, path: String },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf => {
            let path = ebpf::build(&ebpf::toolchain()?)?;
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Test { cargo_args } => test::test(&cargo_args),
        Cmd::Smoke => smoke::smoke(),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Lab(args) => lab::lab(&args),
        Cmd::HttpGet { addr, path } => util::http_get_cmd(&addr, &path),
    }
}
