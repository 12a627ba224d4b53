//! The kernel ABI shared by the BPF programs (`flannel-ebpf`) and the agent.
//!
//! Everything here is `no_std`, `#[repr(C)]`, integer-only and explicitly padded,
//! so both sides agree on the byte layout of every map key and value.
#![no_std]

pub mod consts;
pub mod maps;

pub use maps::Counters;

/// Per-CPU array of [`Counters`], indexed by [`maps::StatsKey`].
///
/// The BPF side declares its maps with literal names (aya's `#[map(name = ...)]` takes
/// no consts); the object test checks that those literals equal these.
pub const MAP_STATS: &str = "FLANNEL_STATS";

/// The TC classifier that counts packets into [`MAP_STATS`].
pub const PROG_STATS: &str = "flannel_stats";

/// Every map the BPF object must contain, with its key and value sizes in bytes.
pub const MAPS: &[(&str, u32, u32)] = &[(
    MAP_STATS,
    core::mem::size_of::<maps::StatsKey>() as u32,
    core::mem::size_of::<Counters>() as u32,
)];

/// Every program the BPF object must contain.
pub const PROGRAMS: &[&str] = &[PROG_STATS];
