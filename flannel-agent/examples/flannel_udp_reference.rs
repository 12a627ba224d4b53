//! flanneld's udp proxy, as a benchmark reference: a single-threaded `poll()` loop over
//! one TUN and one UDP socket, raw IPv4 in UDP on 8285 (see
//! `flannel_agent::dataplane::tun::reference`).
//!
//! Run it in each node's network namespace, as flanneld's udp backend would be set up:
//!
//! ```text
//! flannel_udp_reference --bind 10.99.0.2:8285 --subnet 10.5.1.0/24 \
//!     --network 10.5.0.0/16 --mtu 1472 --peer 10.5.2.0/24=10.99.0.3:8285
//! ```
//!
//! It creates `flannel0`, gives it `<subnet>.0/32`, the MTU and the Network route (with
//! `ip`), then forwards until killed.

use std::{net::SocketAddrV4, process::Command};

use anyhow::{Context as _, bail};
use flannel_agent::dataplane::tun::reference::{self, ReferenceConfig};
use ipnet::Ipv4Net;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    if !st.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut bind = None;
    let mut subnet: Option<Ipv4Net> = None;
    let mut network: Option<Ipv4Net> = None;
    let mut mtu = 1472u32;
    let mut routes = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--bind" => bind = Some(value.parse::<SocketAddrV4>()?),
            "--subnet" => subnet = Some(value.parse()?),
            "--network" => network = Some(value.parse()?),
            "--mtu" => mtu = value.parse()?,
            "--peer" => {
                let (net, to) = value.split_once('=').context("--peer SUBNET=IP:PORT")?;
                routes.push((net.parse::<Ipv4Net>()?, to.parse::<SocketAddrV4>()?));
            }
            other => bail!("unknown flag {other}"),
        }
    }
    let (Some(bind), Some(subnet), Some(network)) = (bind, subnet, network) else {
        bail!(
            "usage: --bind IP:PORT --subnet CIDR --network CIDR [--mtu N] [--peer CIDR=IP:PORT]..."
        );
    };
    let (tun, name) = reference::open("flannel0")?;
    let addr = format!("{}/32", subnet.network());
    ip(&["addr", "replace", &addr, "dev", &name])?;
    ip(&["link", "set", &name, "mtu", &mtu.to_string(), "up"])?;
    ip(&["route", "replace", &network.to_string(), "dev", &name])?;
    let cfg = ReferenceConfig {
        device: name,
        bind,
        tun_addr: subnet.network(),
        routes,
    };
    reference::run(&cfg, tun)?;
    Ok(())
}
