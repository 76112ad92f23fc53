//! Look-up stage for new flows: frontend -> backend set -> one backend.
use aya_ebpf::{bindings::BPF_ANY, maps::lpm_trie::Key};
use lb_common::{
    stat, AffinityKey, AffinityValue, Backend, BackendSet, BackendSlot, DatapathConfig, FlowKey,
    MaglevKey, MemberKey, ServiceKey, ServiceValue, SourceRange, MAGLEV_CHUNK,
    SOURCE_RANGE_FRONTEND_BITS, SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_SOURCE_RANGES,
};

use crate::{
    conntrack::{in_cluster, now},
    maps::{AFFINITY, BACKENDS, BACKEND_SETS, MAGLEV, MEMBERS, SERVICES, SOURCE_RANGES},
    stats::count,
};

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

/// A ClusterIP's other ports (S04): its address with port 0 and protocol 0, registered by
/// the agent with an empty backend set, so that a packet to a port or protocol the service
/// does not have is refused. Looked up only after [`service`] missed.
#[inline(always)]
pub fn other_port(flow: &FlowKey) -> bool {
    let key = ServiceKey {
        addr: flow.daddr,
        port: 0,
        proto: 0,
        _pad: 0,
    };
    SERVICES.get_ptr(key).is_some()
}

/// loadBalancerSourceRanges (S14): a frontend with ranges admits only sources inside one.
#[inline(always)]
pub fn source_allowed(service: &ServiceValue, flow: &FlowKey) -> bool {
    if service.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let data = SourceRange {
        frontend: ServiceKey {
            addr: flow.daddr,
            port: flow.dport,
            proto: flow.proto,
            _pad: 0,
        },
        source: flow.saddr,
    };
    SOURCE_RANGES
        .get(Key::new(SOURCE_RANGE_FRONTEND_BITS + 32, data))
        .is_some()
}

/// Which backend set serves this flow. External frontends under externalTrafficPolicy
/// Local keep a cluster-wide set for sources inside the cluster (S22); everything else uses
/// the frontend's own set. Returns the set and whether it is node-local.
#[inline(always)]
fn scope(cfg: &DatapathConfig, service: &ServiceValue, flow: &FlowKey) -> (u32, bool) {
    if service.cluster_set != 0 && in_cluster(cfg, flow.saddr) {
        (service.cluster_set, false)
    } else {
        (service.backend_set, service.flags & SVC_F_LOCAL != 0)
    }
}

/// The backend chosen for a new flow, the set it came from, and whether that set is
/// node-local (then the client's source is preserved: S22).
pub struct Choice {
    pub set: u32,
    pub local: bool,
    pub backend: Backend,
}

/// The backend slot a new flow's hash selects: the set's Maglev table entry at
/// `hash % M` (consistent hashing: a membership change moves few other flows), or
/// `hash % count` for a set without a table (or, counted, a table chunk that is missing).
#[inline(always)]
fn slot_index(set_id: u32, set: &BackendSet, hash: u32) -> u32 {
    if set.table_size != 0 {
        let position = hash % u32::from(set.table_size);
        let key = MaglevKey::new(set_id, u32::from(set.generation), position / MAGLEV_CHUNK);
        if let Some(chunk) = MAGLEV.get_ptr(key) {
            // The mask keeps the index provably inside the chunk for the verifier.
            let offset = (position % MAGLEV_CHUNK) as usize & (MAGLEV_CHUNK as usize - 1);
            // SAFETY: a valid map value for this RCU section; one u16 copied out.
            return u32::from(unsafe { (*chunk).backends[offset] });
        }
        count(stat::MAGLEV_CHUNK_MISSING);
    }
    hash % set.count
}

/// Picks the backend for a new flow. The same 5-tuple
/// always hashes to the same slot, so a retransmitted first packet whose conntrack insert was
/// lost still lands on one backend.
#[inline(always)]
pub fn backend(
    cfg: &DatapathConfig,
    service: &ServiceValue,
    flow: &FlowKey,
) -> Result<Choice, u32> {
    let (set_id, local) = scope(cfg, service, flow);
    // SAFETY: values are copied out of the map immediately.
    let set = BACKEND_SETS
        .get_ptr(set_id)
        .map(|v| unsafe { *v })
        .ok_or(stat::DROP_BACKEND_MISSING)?;
    if set.count == 0 {
        // Node-local policy without a local endpoint drops (the load balancer's health
        // check steers traffic away); a service without endpoints rejects (S10, S22).
        return Err(if local {
            stat::DROP_NO_LOCAL_BACKEND
        } else {
            stat::DROP_NO_BACKEND
        });
    }
    let affinity = service.flags & SVC_F_AFFINITY != 0;
    let key = AffinityKey {
        client: flow.saddr,
        set: set_id,
    };
    let now = now();
    if affinity {
        if let Some(remembered) = AFFINITY.get_ptr_mut(key) {
            // SAFETY: valid for this program run; a racing update writes a whole value too.
            let remembered = unsafe { &mut *remembered };
            let fresh = now.wrapping_sub(remembered.last_ns)
                < u64::from(service.affinity_timeout) * 1_000_000_000;
            let member = MemberKey {
                set: set_id,
                addr: remembered.backend.addr,
                port: remembered.backend.port,
                _pad: 0,
            };
            if fresh && MEMBERS.get_ptr(member).is_some() {
                remembered.last_ns = now;
                return Ok(Choice {
                    set: set_id,
                    local,
                    backend: remembered.backend,
                });
            }
        }
    }
    let index = slot_index(set_id, &set, flow.hash());
    let slot = BackendSlot::new(set_id, u32::from(set.generation), index);
    let backend = BACKENDS
        .get_ptr(slot)
        .map(|v| unsafe { *v })
        .ok_or(stat::DROP_BACKEND_MISSING)?;
    if affinity {
        // Best effort: a failed insert only means the next flow may pick another backend.
        let _ = AFFINITY.insert(
            key,
            AffinityValue {
                backend,
                last_ns: now,
            },
            BPF_ANY as u64,
        );
    }
    Ok(Choice {
        set: set_id,
        local,
        backend,
    })
}
