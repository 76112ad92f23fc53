//! Per-CPU verdict counters (lb_common::stat): one increment per packet, no atomics.
use crate::maps::STATS;

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(slot) = STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot; only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}
