//! Active reject for services without endpoints (S10): the packet is turned in place into
//! the answer its sender should get — a TCP RST, or an ICMP port unreachable for UDP — and
//! bounced back out of the interface it came in on. Never a silent timeout.
//!
//! (Being written: until then the packet is dropped and counted, as before.)
use lb_common::stat;

use crate::{
    context::{Packet, Tc, Xdp},
    parse::Parsed,
    pipeline::Outcome,
    stats::count,
};

pub trait Reject: Packet {
    fn reject(&self, packet: &Parsed) -> Outcome;
}

impl Reject for Xdp<'_> {
    #[inline(always)]
    fn reject(&self, _packet: &Parsed) -> Outcome {
        count(stat::DROP_NO_BACKEND);
        Outcome::Drop
    }
}

impl Reject for Tc<'_> {
    #[inline(always)]
    fn reject(&self, _packet: &Parsed) -> Outcome {
        count(stat::DROP_NO_BACKEND);
        Outcome::Drop
    }
}
