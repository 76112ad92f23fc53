//! Look-up stage for new flows: frontend -> backend set -> one backend.
use lb_common::{stat, Backend, BackendSlot, FlowKey, ServiceKey, ServiceValue};

use crate::maps::{BACKENDS, BACKEND_SETS, SERVICES};

#[inline(always)]
pub fn service(flow: &FlowKey) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };
    // SAFETY: read-only copy of a value the kernel keeps alive for this RCU section.
    SERVICES.get_ptr(key).map(|v| unsafe { *v })
}

/// Picks the backend for a new flow. The same 5-tuple always hashes to the same slot, so a
/// retransmitted first packet whose conntrack insert was lost still lands on one backend.
#[inline(always)]
pub fn backend(service: &ServiceValue, flow: &FlowKey) -> Result<Backend, u32> {
    // SAFETY: as above, values are copied out immediately.
    let set = BACKEND_SETS
        .get_ptr(service.backend_set)
        .map(|v| unsafe { *v })
        .ok_or(stat::DROP_BACKEND_MISSING)?;
    if set.count == 0 {
        return Err(stat::DROP_NO_BACKEND);
    }
    let index = flow_hash(flow) % set.count;
    let slot = BackendSlot::new(service.backend_set, set.generation, index);
    BACKENDS
        .get_ptr(slot)
        .map(|v| unsafe { *v })
        .ok_or(stat::DROP_BACKEND_MISSING)
}

/// A 32-bit mix of the 5-tuple (murmur3 finaliser over a xor-fold).
#[inline(always)]
pub fn flow_hash(flow: &FlowKey) -> u32 {
    let mut h = flow.saddr
        ^ flow.daddr.rotate_left(16)
        ^ ((u32::from(flow.sport) << 16) | u32::from(flow.dport))
        ^ u32::from(flow.proto).wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}
