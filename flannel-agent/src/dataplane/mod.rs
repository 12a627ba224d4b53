//! Dataplanes: how peer leases become forwarding state in the kernel.
//!
//! [`ebpf`] is the only module that imports aya. So far it exposes the BPF object that was
//! embedded at build time; loading and attaching the programs come with the eBPF VXLAN
//! dataplane.

pub mod ebpf;

pub use ebpf::{EbpfError, ebpf_object};
