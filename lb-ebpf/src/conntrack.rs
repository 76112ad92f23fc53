//! Connection tracking: one LRU entry per direction of a flow, each saying how to rewrite
//! the packets that match it. Created on the first packet of a flow, refreshed by later ones.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
use lb_common::{
    stat, DatapathConfig, FlowKey, FlowNat, MemberKey, ServiceValue, BACKEND_F_LOCAL,
    FLOW_F_ORIGINAL, FLOW_F_REPLY, FLOW_F_SNAT, IPPROTO_UDP, SVC_F_EXTERNAL,
};

use crate::{
    lookup::Choice,
    maps::{CONNTRACK, MEMBERS},
};

/// Refresh `last_seen_ns` at most this often: a write per packet would bounce the entry's
/// cache line between CPUs.
const REFRESH_NS: u64 = 1_000_000_000;
/// Masquerade ports tried per new flow before giving up.
const SNAT_TRIES: u32 = 8;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments, always safe to call from any program type.
    unsafe { bpf_ktime_get_ns() }
}

/// The translation of an already tracked flow (either direction), if any.
#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<FlowNat> {
    let entry = CONNTRACK.get_ptr_mut(flow)?;
    let now = now();
    // SAFETY: the entry stays valid for this program run (RCU); racing refreshes from other
    // CPUs write the same kind of value and are harmless.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
        Some(*entry)
    }
}

/// Masquerade when the backend's reply would otherwise not come back through this node:
/// the backend is the client itself (hairpin), or it runs on another node and the client is
/// outside the cluster CIDR or came in through an external frontend (NodePort, external or
/// LB IP), whose reply the backend's node would route straight to the client.
#[inline(always)]
fn needs_masquerade(
    cfg: &DatapathConfig,
    flow: &FlowKey,
    service: &ServiceValue,
    choice: &Choice,
) -> bool {
    let backend = &choice.backend;
    if cfg.snat_addr == 0 {
        return false;
    }
    if flow.saddr == backend.addr {
        return true;
    }
    // A node-local set (traffic policy Local) preserves the client's source by contract.
    let local = choice.local || backend.flags & BACKEND_F_LOCAL != 0;
    !local && (service.flags & SVC_F_EXTERNAL != 0 || !in_cluster(cfg, flow.saddr))
}

/// S30: a UDP flow whose backend left its set would be black-holed for as long as packets
/// keep its entry fresh (kube-proxy clears conntrack for this). Detect it on the next packet
/// of the flow, forget both directions, and let the caller balance the packet afresh. TCP
/// flows keep their backend until they end (S27, S29).
#[inline(always)]
pub fn udp_backend_gone(flow: &FlowKey, nat: &FlowNat) -> bool {
    if flow.proto != IPPROTO_UDP || nat.flags & FLOW_F_ORIGINAL == 0 {
        return false;
    }
    let member = MemberKey {
        set: nat.backend_set,
        addr: nat.daddr,
        port: nat.dport,
        _pad: 0,
    };
    if MEMBERS.get_ptr(member).is_some() {
        return false;
    }
    let reply = FlowKey {
        saddr: nat.daddr,
        daddr: nat.saddr,
        sport: nat.dport,
        dport: nat.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let _ = CONNTRACK.remove(reply);
    let _ = CONNTRACK.remove(flow);
    true
}

/// Whether `addr` is inside the cluster (pod) CIDR. Without a configured CIDR, every source
/// counts as inside.
#[inline(always)]
pub fn in_cluster(cfg: &DatapathConfig, addr: u32) -> bool {
    addr & cfg.cluster_cidr_mask == cfg.cluster_cidr_addr
}

/// Tracks a new flow to `backend` and returns the translation for its first packet.
#[inline(always)]
pub fn create(
    cfg: &DatapathConfig,
    flow: &FlowKey,
    service: &ServiceValue,
    choice: &Choice,
) -> Result<FlowNat, u32> {
    let cfg = *cfg;
    let backend = &choice.backend;
    let backend_set = choice.set;
    let now = now();
    let mut original = FlowNat {
        saddr: flow.saddr,
        daddr: backend.addr,
        sport: flow.sport,
        dport: backend.port,
        flags: FLOW_F_ORIGINAL,
        backend_set,
        _pad: 0,
        last_seen_ns: now,
    };
    let mut reply = FlowNat {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        flags: FLOW_F_REPLY,
        backend_set,
        _pad: 0,
        last_seen_ns: now,
    };
    let mut reply_key = FlowKey {
        saddr: backend.addr,
        daddr: flow.saddr,
        sport: backend.port,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    if needs_masquerade(&cfg, flow, service, choice) {
        original.flags |= FLOW_F_SNAT;
        reply.flags |= FLOW_F_SNAT;
        original.saddr = cfg.snat_addr;
        reply_key.daddr = cfg.snat_addr;
        let min = u32::from(cfg.snat_port_min);
        let range = u32::from(cfg.snat_port_max).saturating_sub(min) + 1;
        let start = flow.hash() % range;
        let mut found = false;
        for i in 0..SNAT_TRIES {
            let port = (min + (start + i * 7919) % range) as u16;
            reply_key.dport = port.to_be();
            // NOEXIST: a port already used towards this backend belongs to another flow.
            if CONNTRACK
                .insert(reply_key, reply, BPF_NOEXIST as u64)
                .is_ok()
            {
                original.sport = port.to_be();
                found = true;
                break;
            }
        }
        if !found {
            return Err(stat::DROP_SNAT_EXHAUSTED);
        }
    } else if CONNTRACK.insert(reply_key, reply, BPF_ANY as u64).is_err() {
        return Err(stat::DROP_CONNTRACK_FULL);
    }
    if CONNTRACK.insert(flow, original, BPF_ANY as u64).is_err() {
        let _ = CONNTRACK.remove(reply_key);
        return Err(stat::DROP_CONNTRACK_FULL);
    }
    Ok(original)
}
