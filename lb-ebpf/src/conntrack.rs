//! Connection tracking: one LRU entry per direction of a flow, each saying how to rewrite
//! the packets that match it. Created on the first packet of a flow, refreshed by later ones.
//!
//! TCP flows start embryonic, in `CONNTRACK_NEW`, and move to `CONNTRACK` when the handshake
//! completes (the backend answered, then the client sent a non-SYN packet): a flood of SYNs
//! (or of lone ACKs, which create resumed flows) from random sources then evicts only other
//! embryonic flows, never an established one. Each
//! entry records the TCP state its direction has seen (`ct_state`); the agent's garbage
//! collector expires flows by state (docs/datapath.md, "Conntrack lifecycle").
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
    maps::LruHashMap,
};
use lb_common::{
    ct_state, snat_try, stat, DatapathConfig, FlowKey, FlowNat, MemberKey, ServiceValue,
    BACKEND_F_LOCAL, FLOW_F_ORIGINAL, FLOW_F_REPLY, FLOW_F_SNAT, IPPROTO_TCP, IPPROTO_UDP,
    SVC_F_EXTERNAL,
};

use crate::{
    lookup::Choice,
    maps::{CONNTRACK, CONNTRACK_NEW, MEMBERS},
    parse::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

/// Refresh `last_seen_ns` at most this often: a write per packet would bounce the entry's
/// cache line between CPUs.
const REFRESH_NS: u64 = 1_000_000_000;
/// Masquerade ports tried per new flow before giving up.
const SNAT_TRIES: u32 = 8;

/// CLOCK_MONOTONIC at the last timer tick (1–10 ms resolution): every use is in seconds
/// (idle timeouts, the 1 s refresh, affinity timeouts), and it costs a load where the
/// precise clock reads the TSC and scales it (tens of ns in a VM), on every tracked packet.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments, always safe to call from any program type.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The translation of an already tracked flow (either direction), if any, after recording
/// what the packet says about the flow's state. `None` also for a SYN that reopens the
/// 5-tuple of a closed flow: that flow is forgotten and the SYN balanced afresh.
///
/// Embryonic flows are looked up here only for SYN-ACKs and RSTs (replies that may come from
/// a backend that is also a frontend's address). Packets to a frontend find their embryonic
/// flow through `embryonic` after the frontend look-up, other TCP packets through `unclaimed`.
#[inline(always)]
pub fn lookup(packet: &Parsed) -> Option<FlowNat> {
    let flow = &packet.flow;
    let flags = packet.tcp_flags;
    if let Some(entry) = CONNTRACK.get_ptr_mut(flow) {
        let now = now();
        // SAFETY: the entry stays valid for this program run (RCU); racing updates from other
        // CPUs write the same kind of value and are harmless.
        let entry = unsafe { &mut *entry };
        if flow.proto == IPPROTO_TCP {
            if reopens(&CONNTRACK, flow, entry, flags) {
                return None;
            }
            advance(entry, flags, now);
        } else if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
            entry.last_seen_ns = now;
        }
        return Some(*entry);
    }
    let reply_like = flags & TCP_RST != 0 || flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    if flow.proto != IPPROTO_TCP || !reply_like {
        return None;
    }
    embryonic(packet)
}

/// The translation of a tracked flow, established or embryonic, without recording anything
/// about its state (for ICMP errors about the flow, which say nothing about TCP state).
#[inline(always)]
pub fn find(flow: &FlowKey) -> Option<FlowNat> {
    // SAFETY: read-only copies of values the kernel keeps alive for this RCU section.
    if let Some(entry) = CONNTRACK.get_ptr(flow) {
        return Some(unsafe { *entry });
    }
    if flow.proto != IPPROTO_TCP {
        return None;
    }
    CONNTRACK_NEW.get_ptr(flow).map(|entry| unsafe { *entry })
}

/// The embryonic TCP flow this packet belongs to, if any, after recording its state: the
/// backend's answer marks the reply entry, and the client's next packet without SYN or RST
/// then completes the handshake (`promote`).
#[inline(always)]
pub fn embryonic(packet: &Parsed) -> Option<FlowNat> {
    let flow = &packet.flow;
    let flags = packet.tcp_flags;
    if flow.proto != IPPROTO_TCP {
        return None;
    }
    let entry = CONNTRACK_NEW.get_ptr_mut(flow)?;
    let now = now();
    // SAFETY: as in `lookup`; copied out before a promotion deletes it.
    let entry = unsafe { &mut *entry };
    if reopens(&CONNTRACK_NEW, flow, entry, flags) {
        return None;
    }
    advance(entry, flags, now);
    let nat = *entry;
    if nat.flags & FLOW_F_REPLY != 0 {
        if nat.state < ct_state::SYN_RECV {
            entry.state = ct_state::SYN_RECV;
        }
    } else if flags & (TCP_SYN | TCP_RST) == 0 && nat.state < ct_state::CLOSING {
        promote(flow, &nat, now);
    }
    Some(nat)
}

/// A TCP packet that no tracked established flow and no frontend claims: the reply of an
/// embryonic or resumed flow (a backend's plain ACK or data to a resumed flow), looked up in
/// `CONNTRACK_NEW`; or, for a client's SYN, the start of a direct connection whose 5-tuple is
/// the reverse of a stale reply entry (`forget_stale_reply`). SYN-ACKs and RSTs were looked up
/// by `lookup` already.
#[inline(always)]
pub fn unclaimed(packet: &Parsed) -> Option<FlowNat> {
    let flags = packet.tcp_flags;
    if packet.flow.proto != IPPROTO_TCP
        || flags & TCP_RST != 0
        || flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    {
        return None;
    }
    if flags & TCP_SYN != 0 {
        forget_stale_reply(&packet.flow);
        return None;
    }
    embryonic(packet)
}

/// A client's SYN (no ACK) to an address and port that is no frontend, whose reverse is the
/// key of a reply entry: the client reuses the local port of a flow it had through a frontend
/// for a direct connection to that flow's backend (Linux reuses a local port for another
/// destination). Left in place, the entry would reverse-translate the backend's SYN-ACK (or
/// RST) to the frontend's address, and the direct connection would never open. When the old
/// flow is closing or closed, both its entries are forgotten (`ct_reopened`), in either
/// table. A live old flow is left alone: a collision the datapath cannot resolve without
/// translating direct traffic (docs/datapath.md, "Port reuse").
#[inline(always)]
pub fn forget_stale_reply(flow: &FlowKey) {
    let reply_key = FlowKey {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    forget_if_stale_reply(&CONNTRACK, &reply_key);
    forget_if_stale_reply(&CONNTRACK_NEW, &reply_key);
}

#[inline(always)]
fn forget_if_stale_reply(table: &LruHashMap<FlowKey, FlowNat>, reply_key: &FlowKey) {
    // SAFETY: copied out at once.
    let Some(reply) = table.get_ptr(reply_key).map(|e| unsafe { *e }) else {
        return;
    };
    if reply.flags & FLOW_F_REPLY == 0 {
        return;
    }
    forget_if_closing(table, reply_key, &reply);
}

/// Forgets the flow of `entry` (at `key` in `table`), both directions, when either direction
/// is closing or closed (`ct_reopened`). Returns whether it did.
#[inline(always)]
fn forget_if_closing(table: &LruHashMap<FlowKey, FlowNat>, key: &FlowKey, entry: &FlowNat) -> bool {
    let other = entry.other_direction(key.proto);
    // SAFETY: copied out at once.
    let other_state = table
        .get_ptr(other)
        .map(|e| unsafe { (*e).state })
        .unwrap_or(0);
    if entry.state < ct_state::CLOSING && other_state < ct_state::CLOSING {
        return false;
    }
    let _ = table.remove(other);
    let _ = table.remove(key);
    count(stat::CT_REOPENED);
    true
}

/// Moves the state forward for a TCP flag (never back): RST closes, FIN starts closing.
/// A state change refreshes `last_seen_ns` at once, so the collector's clock for the new
/// state starts now.
#[inline(always)]
fn advance(entry: &mut FlowNat, flags: u8, now: u64) {
    let next = if flags & TCP_RST != 0 {
        ct_state::CLOSED
    } else if flags & TCP_FIN != 0 {
        ct_state::CLOSING
    } else {
        entry.state
    };
    if next > entry.state {
        entry.state = next;
        entry.last_seen_ns = now;
    } else if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
    }
}

/// A client's SYN on the 5-tuple of a flow that is closing or closed (either direction)
/// starts a new connection (port reuse, e.g. after TIME_WAIT): both entries are removed.
#[inline(always)]
fn reopens(
    table: &LruHashMap<FlowKey, FlowNat>,
    flow: &FlowKey,
    entry: &FlowNat,
    flags: u8,
) -> bool {
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN || entry.flags & FLOW_F_ORIGINAL == 0 {
        return false;
    }
    forget_if_closing(table, flow, entry)
}

/// The client's first packet after the backend answered completes the handshake: both
/// entries move from `CONNTRACK_NEW` to `CONNTRACK`, established.
#[inline(always)]
fn promote(flow: &FlowKey, original: &FlowNat, now: u64) {
    let reply_key = original.other_direction(flow.proto);
    // SAFETY: copied out at once.
    let Some(mut reply) = CONNTRACK_NEW.get_ptr(reply_key).map(|e| unsafe { *e }) else {
        return;
    };
    if reply.state != ct_state::SYN_RECV {
        return;
    }
    let mut original = *original;
    original.state = ct_state::ESTABLISHED;
    original.last_seen_ns = now;
    reply.state = ct_state::ESTABLISHED;
    reply.last_seen_ns = now;
    if CONNTRACK.insert(reply_key, reply, BPF_ANY as u64).is_err() {
        count(stat::CT_PROMOTE_FAILED);
        return;
    }
    if CONNTRACK.insert(flow, original, BPF_ANY as u64).is_err() {
        let _ = CONNTRACK.remove(reply_key);
        count(stat::CT_PROMOTE_FAILED);
        return;
    }
    let _ = CONNTRACK_NEW.remove(flow);
    let _ = CONNTRACK_NEW.remove(reply_key);
    count(stat::CT_PROMOTED);
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
    let reply = nat.other_direction(flow.proto);
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

/// Tracks a new flow to `backend` and returns the translation for its first packet. TCP
/// flows start embryonic (`CONNTRACK_NEW`), also resumed ones; UDP flows go straight to
/// `CONNTRACK`.
#[inline(always)]
pub fn create(
    cfg: &DatapathConfig,
    flow: &FlowKey,
    service: &ServiceValue,
    choice: &Choice,
    tcp_flags: u8,
) -> Result<FlowNat, u32> {
    let cfg = *cfg;
    let backend = &choice.backend;
    let backend_set = choice.set;
    let now = now();
    let tcp = flow.proto == IPPROTO_TCP;
    // A TCP flow whose first packet has no SYN is a connection that lost its entries (see
    // `CT_NEW_WITHOUT_SYN`), or a forged packet of a flood of lone ACKs. It is embryonic like
    // a SYN's flow and promoted the same way: once the backend answered with anything but a
    // RST (its plain ACKs and data are found by `unclaimed`), the client's next packet.
    let resumed = tcp && tcp_flags & TCP_SYN == 0;
    let (table, state) = if tcp {
        (&CONNTRACK_NEW, ct_state::SYN_SENT)
    } else {
        (&CONNTRACK, ct_state::NONE)
    };
    let mut original = FlowNat {
        saddr: flow.saddr,
        daddr: backend.addr,
        sport: flow.sport,
        dport: backend.port,
        flags: FLOW_F_ORIGINAL,
        backend_set,
        state,
        _pad: [0; 3],
        last_seen_ns: now,
    };
    let mut reply = FlowNat {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        flags: FLOW_F_REPLY,
        backend_set,
        state,
        _pad: [0; 3],
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
        let hash = flow.hash();
        let mut found = false;
        for i in 0..SNAT_TRIES {
            let port = (min + snat_try(hash, i) % range) as u16;
            reply_key.dport = port.to_be();
            // A port already used towards this backend belongs to another flow, in the
            // established table or (NOEXIST) in the table we insert into.
            if tcp && CONNTRACK.get_ptr(reply_key).is_some() {
                continue;
            }
            if table.insert(reply_key, reply, BPF_NOEXIST as u64).is_ok() {
                original.sport = port.to_be();
                found = true;
                break;
            }
        }
        if !found {
            return Err(stat::DROP_SNAT_EXHAUSTED);
        }
    } else if table.insert(reply_key, reply, BPF_ANY as u64).is_err() {
        return Err(stat::DROP_CONNTRACK_FULL);
    }
    if table.insert(flow, original, BPF_ANY as u64).is_err() {
        let _ = table.remove(reply_key);
        return Err(stat::DROP_CONNTRACK_FULL);
    }
    if resumed {
        count(stat::CT_NEW_WITHOUT_SYN);
    }
    Ok(original)
}
