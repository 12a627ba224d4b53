//! flannel's BPF programs. Entry points only: each is a thin wrapper that calls a `try_*`
//! function and turns its error into one explicit TC action.
//!
//! - `flannel_encap` (`flannel_common::PROG_ENCAP`): TC egress of `flannel.<VNI>`;
//! - `flannel_decap` (`flannel_common::PROG_DECAP`): TC ingress of the underlay;
//! - `flannel_udp_encap` (`flannel_common::PROG_UDP_ENCAP`): TC egress of the udp
//!   backend's TUN `flannel0`;
//! - `flannel_udp_decap` (`flannel_common::PROG_UDP_DECAP`): TC ingress of the underlay,
//!   for the udp backend;
//! - `flannel_hostgw_to_peer` (`flannel_common::PROG_HOSTGW_TO_PEER`): TC ingress of the
//!   pod-facing bridge, for the host-gw backend;
//! - `flannel_hostgw_from_peer` (`flannel_common::PROG_HOSTGW_FROM_PEER`): TC ingress of
//!   the underlay, for the host-gw backend;
//! - `flannel_stats` (`flannel_common::PROG_STATS`): counts packets, for debugging.
//!
//! The policy for errors: a `try_*` returns `Err(reason)`; reasons that are drops
//! (`flannel_common::maps::reason::is_drop`) end in `TC_ACT_SHOT`, every other one hands
//! the packet, unchanged, to the kernel's own path with `TC_ACT_OK` (the vxlan driver,
//! the udp backend's userspace reader of `flannel0` and of its UDP socket, or the
//! kernel's forwarding for host-gw). Both are
//! counted per reason, so nothing is dropped silently.
#![no_std]
#![no_main]

mod csum;
mod hostgw;
mod maps;
mod parse;
mod tunnel;
mod udp;
mod vxlan;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use flannel_common::maps::{STATS_INDEX_ALL, reason};

/// `TC_ACT_OK` as the `i32` a classifier returns (the binding is a `u32` constant 0).
const ACT_OK: i32 = TC_ACT_OK as i32;
const ACT_SHOT: i32 = TC_ACT_SHOT as i32;

/// Encapsulates VXLAN for known peers at TC egress of `flannel.<VNI>`.
#[classifier]
pub fn flannel_encap(ctx: TcContext) -> i32 {
    verdict(vxlan::try_encap(&ctx))
}

/// Decapsulates VXLAN from known peers at TC ingress of the underlay.
#[classifier]
pub fn flannel_decap(ctx: TcContext) -> i32 {
    verdict(vxlan::try_decap(&ctx))
}

/// Encapsulates flannel-udp for known peers at TC egress of `flannel0`.
#[classifier]
pub fn flannel_udp_encap(ctx: TcContext) -> i32 {
    verdict(udp::try_encap(&ctx))
}

/// Decapsulates flannel-udp from known peers at TC ingress of the underlay.
#[classifier]
pub fn flannel_udp_decap(ctx: TcContext) -> i32 {
    verdict(udp::try_decap(&ctx))
}

/// Forwards host-gw traffic from local pods to peers, at TC ingress of the pod bridge.
#[classifier]
pub fn flannel_hostgw_to_peer(ctx: TcContext) -> i32 {
    verdict(hostgw::try_to_peer(&ctx))
}

/// Forwards host-gw traffic from peers to local pods, at TC ingress of the underlay.
#[classifier]
pub fn flannel_hostgw_from_peer(ctx: TcContext) -> i32 {
    verdict(hostgw::try_from_peer(&ctx))
}

/// The action for a `try_*` result, counting the reason of anything not forwarded.
#[inline(always)]
fn verdict(result: Result<i32, u32>) -> i32 {
    match result {
        Ok(action) => action,
        Err(tunnel::NOT_OURS) => ACT_OK,
        Err(why) => {
            if let Some(slot) = maps::FLANNEL_REASONS.get_ptr_mut(why) {
                // SAFETY: a successful per-CPU array lookup: this CPU's slot, valid for
                // the program's run, written by no other CPU.
                unsafe { *slot = (*slot).wrapping_add(1) };
            }
            if reason::is_drop(why) {
                ACT_SHOT
            } else {
                ACT_OK
            }
        }
    }
}

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
