//! Map key and value types: the byte layout both the BPF programs and the agent use.
//!
//! Rules for every type here: `#[repr(C)]`, integer fields only, padding written out as
//! `_pad*` fields, a compile-time size check, and `aya::Pod` under the `user` feature.
//! `tests/tests/ebpf_object.rs` checks the built object's maps against these sizes,
//! because aya's `#[map(name = ...)]` cannot refer to the consts in [`crate`].

/// Packet and byte counters, one per CPU in [`crate::MAP_STATS`] (a per-CPU array, so the
/// programs never need atomics; the agent sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen: the skb length, link-layer header included.
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counters>() == 16);
const _: () = assert!(core::mem::align_of::<Counters>() == 8);

impl Counters {
    /// The sum of two counters, wrapping like the kernel-side increments do.
    #[must_use]
    pub const fn add(self, other: Counters) -> Counters {
        Counters {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// SAFETY: `Counters` is `#[repr(C)]`, has only `u64` fields and no padding (checked by the
// size assertion above), so every bit pattern is a valid value and it can be copied to and
// from the kernel as plain bytes.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}

/// Key of [`crate::MAP_STATS`]: the array index. Index [`STATS_INDEX_ALL`] counts every
/// packet the classifier sees.
pub type StatsKey = u32;

/// The only [`crate::MAP_STATS`] slot in use so far: all packets.
pub const STATS_INDEX_ALL: StatsKey = 0;

/// Number of slots in [`crate::MAP_STATS`].
pub const STATS_ENTRIES: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_wraps() {
        let a = Counters {
            packets: u64::MAX,
            bytes: 10,
        };
        let b = Counters {
            packets: 2,
            bytes: 5,
        };
        assert_eq!(
            a.add(b),
            Counters {
                packets: 1,
                bytes: 15
            }
        );
    }
}
