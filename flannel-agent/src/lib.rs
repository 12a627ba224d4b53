//! flanneld: a flannel-compatible overlay agent.
//!
//! The layout follows flannel's domain split:
//! - [`config`]: the network config JSON from etcd, parsed and validated as flannel does;
//! - [`subnet`]: leases in etcd (keys, lease JSON, allocation, renewal, the peer watch);
//! - [`cli`] and [`iface`]: flanneld's command line and external interface choice;
//! - [`netlink`]: the only module that talks rtnetlink;
//! - [`host`]: subnet.env, mk-docker-opts, iptables/nftables rules, health, sd_notify;
//! - [`daemon`]: the wiring that runs all of the above.

pub mod backend;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod host;
pub mod iface;
pub mod logging;
pub mod mac;
pub mod netlink;
pub mod state;
pub mod subnet;
