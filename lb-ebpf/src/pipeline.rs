//! parse -> look up -> rewrite, shared by every program type. Each return path counts
//! exactly one verdict reason.
use lb_common::{stat, FLOW_F_REPLY};

use crate::{conntrack, lookup, nat::Rewrite, parse::parse, stats::count};

pub enum Outcome {
    /// Not ours (or not parseable): hand on untouched.
    Pass,
    Drop,
    /// Rewritten; the entry point decides how to send it on.
    Translated,
}

#[inline(always)]
pub fn process<C: Rewrite>(ctx: &C) -> Outcome {
    let packet = match parse(ctx) {
        Ok(p) => p,
        Err(reason) => {
            count(reason);
            return Outcome::Pass;
        }
    };
    if let Some(nat) = conntrack::lookup(&packet.flow) {
        if ctx.rewrite(&packet, &nat).is_err() {
            count(stat::DROP_REWRITE_FAILED);
            return Outcome::Drop;
        }
        count(if nat.flags & FLOW_F_REPLY != 0 {
            stat::REVERSE_NAT
        } else {
            stat::FORWARD_ESTABLISHED
        });
        return Outcome::Translated;
    }
    let Some(service) = lookup::service(&packet.flow) else {
        count(stat::PASS_NO_SERVICE);
        return Outcome::Pass;
    };
    let nat = match lookup::backend(&service, &packet.flow)
        .and_then(|backend| conntrack::create(&packet.flow, &service, &backend))
    {
        Ok(nat) => nat,
        Err(reason) => {
            count(reason);
            return Outcome::Drop;
        }
    };
    if ctx.rewrite(&packet, &nat).is_err() {
        count(stat::DROP_REWRITE_FAILED);
        return Outcome::Drop;
    }
    count(stat::FORWARD_NEW);
    Outcome::Translated
}
