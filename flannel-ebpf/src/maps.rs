//! Every map of the BPF object, in one place.
//!
//! aya's `#[map(name = ...)]` takes only literals, so each name below is repeated from
//! `flannel_common`; `tests/tests/ebpf_object.rs` fails if the two drift apart.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use flannel_common::{Counters, maps::STATS_ENTRIES};

/// `flannel_common::MAP_STATS`: per-CPU packet and byte counters.
#[map(name = "FLANNEL_STATS")]
pub static FLANNEL_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);
