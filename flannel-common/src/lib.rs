//! The kernel ABI shared by the BPF programs (`flannel-ebpf`) and the agent.
//!
//! Everything here is `no_std`, `#[repr(C)]`, integer-only and explicitly padded,
//! so both sides agree on the byte layout of every map key and value.
#![no_std]

pub mod consts;
