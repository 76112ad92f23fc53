//! parse -> look up -> rewrite, shared by every program type. Each return path counts
//! exactly one verdict reason.
use lb_common::{stat, FlowNat, FLOW_F_REPLY};

use crate::{
    conntrack, fragment, icmp, lookup,
    maps::config,
    nat::Rewrite,
    parse::{parse, Parsed},
    reject::Reject,
    stats::count,
};

pub enum Outcome {
    /// Not ours (or not parseable): hand on untouched.
    Pass,
    Drop,
    /// Rewritten; the entry point decides how to send it on.
    Translated,
    /// Turned into an answer to its sender (TCP RST, ICMP port unreachable): send it back
    /// out of the interface it came in on.
    Bounce,
}

#[inline(always)]
pub fn process<C: Rewrite + Reject + icmp::Patch>(ctx: &C) -> Outcome {
    let packet = match parse(ctx) {
        Ok(p) => p,
        // ICMP errors about translated flows are translated too (icmp.rs).
        Err(stat::PASS_OTHER_PROTOCOL) => return icmp::process(ctx),
        Err(stat::PASS_FRAGMENT) => return fragment::follow(ctx),
        Err(reason) => {
            count(reason);
            return Outcome::Pass;
        }
    };
    let tracked = conntrack::lookup(&packet);
    if let Some(nat) = tracked.filter(|nat| {
        let gone = conntrack::udp_backend_gone(&packet.flow, nat);
        if gone {
            count(stat::UDP_FLOW_MOVED);
        }
        !gone
    }) {
        return translate_tracked(ctx, &packet, &nat);
    }
    let Some(service) = lookup::service(&packet.flow) else {
        // S04: a ClusterIP refuses the ports and protocols its service does not have.
        if lookup::other_port(&packet.flow) {
            return ctx.reject(&packet);
        }
        count(stat::PASS_NO_SERVICE);
        return Outcome::Pass;
    };
    if let Some(nat) = conntrack::embryonic(&packet) {
        return translate_tracked(ctx, &packet, &nat);
    }
    if !lookup::source_allowed(&service, &packet.flow) {
        count(stat::DROP_SOURCE_RANGE);
        return Outcome::Drop;
    }
    let cfg = config();
    let nat = match lookup::backend(&cfg, &service, &packet.flow).and_then(|choice| {
        conntrack::create(&cfg, &packet.flow, &service, &choice, packet.tcp_flags)
    }) {
        Ok(nat) => nat,
        // S10: a service without endpoints answers at once instead of timing out.
        Err(stat::DROP_NO_BACKEND) => return ctx.reject(&packet),
        Err(reason) => {
            count(reason);
            return Outcome::Drop;
        }
    };
    if ctx.rewrite(&packet, &nat).is_err() {
        count(stat::DROP_REWRITE_FAILED);
        return Outcome::Drop;
    }
    fragment::remember(&packet, &nat);
    count(stat::FORWARD_NEW);
    Outcome::Translated
}

/// A packet of a tracked flow (either direction): rewritten as its entry says.
#[inline(always)]
fn translate_tracked<C: Rewrite>(ctx: &C, packet: &Parsed, nat: &FlowNat) -> Outcome {
    if ctx.rewrite(packet, nat).is_err() {
        count(stat::DROP_REWRITE_FAILED);
        return Outcome::Drop;
    }
    fragment::remember(packet, nat);
    count(if nat.flags & FLOW_F_REPLY != 0 {
        stat::REVERSE_NAT
    } else {
        stat::FORWARD_ESTABLISHED
    });
    Outcome::Translated
}
