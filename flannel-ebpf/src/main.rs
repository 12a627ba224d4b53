//! flannel's BPF programs. Entry points only: each is a thin wrapper that calls a `try_*`
//! function and turns its error into one explicit TC action.
//!
//! So far there is one program, `flannel_stats` (`flannel_common::PROG_STATS`), a TC
//! classifier that counts packets and bytes. It starts the build pipeline and the shared
//! ABI check; the VXLAN dataplane programs come later.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use flannel_common::maps::STATS_INDEX_ALL;

/// `TC_ACT_OK` as the `i32` a classifier returns (the binding is a `u32` constant 0).
const ACT_OK: i32 = TC_ACT_OK as i32;

/// Counts every packet; never changes the packet's fate.
#[classifier]
pub fn flannel_stats(ctx: TcContext) -> i32 {
    // Counting is best effort: if the map lookup fails the packet still passes, since a
    // statistics program must never drop traffic.
    try_flannel_stats(&ctx).unwrap_or(ACT_OK)
}

/// The map lookup failed (impossible for an in-range index of an array, but the verifier
/// requires the null check).
struct NoSlot;

fn try_flannel_stats(ctx: &TcContext) -> Result<i32, NoSlot> {
    let slot = maps::FLANNEL_STATS
        .get_ptr_mut(STATS_INDEX_ALL)
        .ok_or(NoSlot)?;
    // SAFETY: `slot` comes from a successful lookup in a per-CPU array, so it points to this
    // CPU's value, valid for the whole run of the program, and no other CPU writes it. A
    // nested run on this CPU could interleave and lose an increment; counters tolerate that.
    unsafe {
        (*slot).packets = (*slot).packets.wrapping_add(1);
        (*slot).bytes = (*slot).bytes.wrapping_add(u64::from(ctx.len()));
    }
    Ok(ACT_OK)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // BPF has no way to unwind or abort; the verifier rejects any path that could reach
    // here, so this loop is never loaded.
    loop {}
}
