//! iptables / nftables rules.
