//! IP fragments of service flows (S06: a 2000-byte UDP datagram crosses a 1500-byte MTU as
//! two fragments). Only the first fragment carries the ports, so it is balanced and
//! translated like any packet; its address rewrite is then recorded under the datagram's
//! identity (source, destination, protocol, IP id) and applied to the later fragments.
//!
//! Checksums: the L4 checksum sits in the first fragment but covers the whole datagram
//! (pseudo-header + full payload). An incremental update (RFC 1624) only needs the old and
//! new values of the changed fields, so the rewrite stage updates it in the first fragment
//! exactly as for a whole packet. Later fragments carry only the IPv4 header checksum.
//!
//! A later fragment that arrives before its first fragment finds no record and passes
//! untranslated (`pass_fragment`): holding it back would mean buffering packets in the
//! datapath, which XDP/TC cannot do. Linux senders emit fragments in order, so this needs
//! reordering on the path; the receiver then times the datagram out as it would a loss.
use aya_ebpf::bindings::BPF_ANY;
use lb_common::{stat, FlowNat, FragmentKey, FragmentNat};

use crate::{
    context::read_at,
    maps::FRAGMENTS,
    nat::Rewrite,
    parse::{Parsed, ETH_HLEN},
    pipeline::Outcome,
    stats::count,
};

/// The IPv4 header without options, as it lies in the packet (network byte order).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Fixed {
    version_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// After a first fragment was translated to `to`: remember it for the later fragments.
/// A failed insert is counted as an event; the packet's own verdict stands.
#[inline(always)]
pub fn remember(packet: &Parsed, to: &FlowNat) {
    if !packet.first_fragment {
        return;
    }
    let key = FragmentKey {
        saddr: packet.flow.saddr,
        daddr: packet.flow.daddr,
        id: packet.ip_id,
        proto: packet.flow.proto,
        _pad: 0,
    };
    let nat = FragmentNat {
        saddr: to.saddr,
        daddr: to.daddr,
    };
    // BPF_ANY: a reused IP id belongs to a newer datagram, whose record replaces the old.
    if FRAGMENTS.insert(key, nat, BPF_ANY as u64).is_err() {
        count(stat::FRAGMENT_NOT_RECORDED);
    }
}

/// A later fragment (parse reported `PASS_FRAGMENT`, so the IPv4 header is known to be
/// well-formed and the protocol TCP or UDP): rewritten like its first fragment, or passed.
///
/// Not inlined, and the header read in one piece: inlined with four separate reads, LLVM
/// reused header fields parse had loaded on some paths only and merged the bounds checks in
/// ways the verifier cannot follow ("R9 !read_ok", "invalid size of register spill") once
/// the ICMP stage joined the pipeline. A BPF-to-BPF call with one bounds check reads its own.
#[inline(never)]
pub fn follow<C: Rewrite>(ctx: &C) -> Outcome {
    // One read of the fixed header: one bounds check for every field the key needs.
    let Some(ip) = read_at::<C, Ipv4Fixed>(ctx, ETH_HLEN) else {
        count(stat::PASS_MALFORMED);
        return Outcome::Pass;
    };
    let (saddr, daddr) = (ip.saddr, ip.daddr);
    let key = FragmentKey {
        saddr,
        daddr,
        id: ip.id,
        proto: ip.proto,
        _pad: 0,
    };
    // SAFETY: copied out of the map at once.
    let Some(nat) = FRAGMENTS.get_ptr(key).map(|v| unsafe { *v }) else {
        count(stat::PASS_FRAGMENT);
        return Outcome::Pass;
    };
    if ctx
        .rewrite_addresses((saddr, daddr), (nat.saddr, nat.daddr))
        .is_err()
    {
        count(stat::DROP_REWRITE_FAILED);
        return Outcome::Drop;
    }
    count(stat::FORWARD_FRAGMENT);
    Outcome::Translated
}
