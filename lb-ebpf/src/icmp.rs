//! ICMP errors about translated flows (issue 5): parse the quote -> look up -> rewrite.
//!
//! An ICMP error (destination unreachable, including fragmentation needed; time exceeded;
//! parameter problem) quotes the IPv4 header and at least 8 bytes of the packet it is about,
//! as that packet was seen where the error was raised. The error travels the opposite way,
//! so the quoted packet reversed is a packet of the error's own direction: if conntrack
//! translates that tuple, the error belongs to the flow and gets the same translation,
//! applied the way a reply's would be:
//!
//! - the quoted packet becomes the one its sender actually sent (its tuple is the reverse of
//!   the translation), with the inner IPv4 checksum, and the inner TCP/UDP checksum when the
//!   quote holds it, updated — as Linux nf_nat does, a TCP checksum only when the whole
//!   20-byte header is quoted, a UDP checksum of 0 stays 0;
//! - the outer source is translated only if it is the quoted packet's destination (the
//!   backend, or the client, raised the error itself); a router on the way keeps its own
//!   address, so the sender sees which hop complained;
//! - the outer destination, the quoted packet's sender, is translated (back to the client,
//!   or to the backend);
//! - the outer IPv4 checksum and the ICMP checksum (which covers the quote) follow every
//!   changed word. The rest of the ICMP header (the MTU of fragmentation needed) is not
//!   touched.
//!
//! One rule serves both directions: an error about a client's packet to a backend finds the
//! flow's reply entry and goes back to the client as if the frontend had sent it
//! (`ICMP_ERROR_TO_CLIENT`); an error about a translated reply, addressed to the frontend or
//! the masquerade address, finds the original entry and goes to the backend
//! (`ICMP_ERROR_TO_BACKEND`).
use aya_ebpf::programs::TcContext;
use lb_common::{stat, FlowKey, FlowNat, FLOW_F_REPLY, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    checksum, conntrack,
    context::{ptr_at, read_at, Packet, Tc, Xdp},
    parse::{ETH_HLEN, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
    pipeline::Outcome,
    stats::count,
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
const ICMP_HLEN: usize = 8;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const TCP_HLEN: usize = 20;
/// Bytes of the transport header every error must quote (RFC 792): both ports, and for UDP
/// the checksum.
const MIN_L4_QUOTE: usize = 8;
/// The most the stage reads: Ethernet, outer IPv4, ICMP, quoted IPv4, quoted TCP header.
const MAX_ERROR_HEADERS: usize = INNER_L4_OFF + TCP_HLEN;

/// Writes of single fields at packet offsets: direct for XDP, through bpf_skb_store_bytes
/// for TC so that the kernel sees the change. The values are written exactly as given
/// (network byte order).
pub trait Patch: Packet {
    fn put16(&self, offset: usize, value: u16) -> Result<(), ()>;
    fn put32(&self, offset: usize, value: u32) -> Result<(), ()>;
}

impl Patch for Xdp<'_> {
    #[inline(always)]
    fn put16(&self, offset: usize, value: u16) -> Result<(), ()> {
        let p = ptr_at::<Self, u16>(self, offset).ok_or(())?;
        // SAFETY: ptr_at checked the two bytes lie inside the packet.
        unsafe { core::ptr::write_unaligned(p, value) };
        Ok(())
    }
    #[inline(always)]
    fn put32(&self, offset: usize, value: u32) -> Result<(), ()> {
        let p = ptr_at::<Self, u32>(self, offset).ok_or(())?;
        // SAFETY: ptr_at checked the four bytes lie inside the packet.
        unsafe { core::ptr::write_unaligned(p, value) };
        Ok(())
    }
}

impl Patch for Tc<'_> {
    // Every change is balanced by a checksum change inside the same header or ICMP message,
    // so a CHECKSUM_COMPLETE skb's sum stays right without BPF_F_RECOMPUTE_CSUM. ICMP errors
    // are checksummed in full by their sender (never CHECKSUM_PARTIAL).
    #[inline(always)]
    fn put16(&self, offset: usize, value: u16) -> Result<(), ()> {
        store(self.0, offset, &value)
    }
    #[inline(always)]
    fn put32(&self, offset: usize, value: u32) -> Result<(), ()> {
        store(self.0, offset, &value)
    }
}

#[inline(always)]
fn store<T>(ctx: &TcContext, offset: usize, value: &T) -> Result<(), ()> {
    ctx.store(offset, value, 0).map(|_| ()).map_err(|_| ())
}

// Fixed offsets in a frame whose outer and quoted IPv4 headers have no options. Constant
// offsets keep every packet access provably in bounds for the verifier: with two variable
// header lengths, LLVM's bounds checks were not tied to the accesses ("invalid access to
// packet ... R5 offset is outside of the packet"). IPv4 options are rare in practice; such
// errors pass untouched, counted.
const IP_HLEN: usize = 20;
const ICMP_OFF: usize = ETH_HLEN + IP_HLEN;
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
const INNER_OFF: usize = ICMP_OFF + ICMP_HLEN;
const INNER_IP_CSUM_OFF: usize = INNER_OFF + 10;
const INNER_SADDR_OFF: usize = INNER_OFF + 12;
const INNER_DADDR_OFF: usize = INNER_OFF + 16;
const INNER_L4_OFF: usize = INNER_OFF + IP_HLEN;
const INNER_UDP_CSUM_OFF: usize = INNER_L4_OFF + 6;
const INNER_TCP_CSUM_OFF: usize = INNER_L4_OFF + 16;

/// What the fields of an ICMP error hold (network byte order).
struct Quote {
    outer_saddr: u32,
    outer_daddr: u32,
    outer_ip_csum: u16,
    icmp_csum: u16,
    inner_ip_csum: u16,
    /// The quoted packet's 5-tuple, as quoted.
    inner: FlowKey,
    /// The quoted TCP/UDP checksum is to be updated: the quote holds it (a TCP header may be
    /// quoted in part) and it is in use (UDP: not 0).
    inner_l4_csum_present: bool,
    inner_l4_csum: u16,
}

/// The stage, for a packet that parse() found to be IPv4 but not TCP/UDP. Counts exactly
/// one reason.
#[inline(always)]
pub fn process<C: Patch>(ctx: &C) -> Outcome {
    let quote = match parse_error(ctx) {
        Ok(q) => q,
        Err(reason) => {
            count(reason);
            return Outcome::Pass;
        }
    };
    let inner = &quote.inner;
    // The quoted packet reversed: a packet of the error's direction.
    let reversed = FlowKey {
        saddr: inner.daddr,
        daddr: inner.saddr,
        sport: inner.dport,
        dport: inner.sport,
        proto: inner.proto,
        _pad: [0; 3],
    };
    let Some(nat) = conntrack::find(&reversed) else {
        count(stat::PASS_ICMP_UNKNOWN_FLOW);
        return Outcome::Pass;
    };
    if rewrite(ctx, &quote, &nat).is_err() {
        count(stat::DROP_REWRITE_FAILED);
        return Outcome::Drop;
    }
    count(if nat.flags & FLOW_F_REPLY != 0 {
        stat::ICMP_ERROR_TO_CLIENT
    } else {
        stat::ICMP_ERROR_TO_BACKEND
    });
    Outcome::Translated
}

/// Checks an IPv4 header at `off`: returns its IHL (in 32-bit words), fragment field and
/// protocol.
#[inline(always)]
fn ipv4_at<C: Packet>(ctx: &C, off: usize) -> Result<(u8, u16, u8), u32> {
    let version_ihl: u8 = read_at(ctx, off).ok_or(stat::PASS_MALFORMED)?;
    let ihl = version_ihl & 0x0f;
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Err(stat::PASS_MALFORMED);
    }
    let frag = u16::from_be(read_at::<C, u16>(ctx, off + 6).ok_or(stat::PASS_MALFORMED)?);
    let proto: u8 = read_at(ctx, off + 9).ok_or(stat::PASS_MALFORMED)?;
    Ok((ihl, frag, proto))
}

#[inline(always)]
fn parse_error<C: Packet>(ctx: &C) -> Result<Quote, u32> {
    ctx.pull(MAX_ERROR_HEADERS);
    // parse() has checked the Ethernet type and that the outer header's lengths fit the
    // packet; only what it did not look at is checked again here.
    let (outer_ihl, outer_frag, outer_proto) = ipv4_at(ctx, ETH_HLEN)?;
    if outer_proto != IPPROTO_ICMP {
        return Err(stat::PASS_OTHER_PROTOCOL);
    }
    if outer_frag & (IP_MF | IP_OFFSET) != 0 {
        return Err(stat::PASS_FRAGMENT);
    }
    if outer_ihl != 5 {
        return Err(stat::PASS_ICMP_IP_OPTIONS);
    }
    let tot_len =
        u16::from_be(read_at::<C, u16>(ctx, ETH_HLEN + 2).ok_or(stat::PASS_MALFORMED)?) as usize;
    let icmp_type: u8 = read_at(ctx, ICMP_OFF).ok_or(stat::PASS_MALFORMED)?;
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROB
    {
        // Echo and the other queries carry no quote: nothing of ours to translate.
        return Err(stat::PASS_OTHER_PROTOCOL);
    }
    if tot_len < IP_HLEN + ICMP_HLEN {
        return Err(stat::PASS_MALFORMED);
    }
    // Bytes of quote, by the outer header (parse() checked they are in the packet).
    let quoted = tot_len - IP_HLEN - ICMP_HLEN;
    if quoted < IP_HLEN {
        return Err(stat::PASS_ICMP_SHORT_QUOTE);
    }
    let (inner_ihl, inner_frag, inner_proto) = ipv4_at(ctx, INNER_OFF)?;
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP {
        return Err(stat::PASS_OTHER_PROTOCOL);
    }
    // A later fragment carries no ports (the first one does, and is translated).
    if inner_frag & IP_OFFSET != 0 {
        return Err(stat::PASS_FRAGMENT);
    }
    if inner_ihl != 5 {
        return Err(stat::PASS_ICMP_IP_OPTIONS);
    }
    if quoted < IP_HLEN + MIN_L4_QUOTE {
        return Err(stat::PASS_ICMP_SHORT_QUOTE);
    }
    let sport: u16 = read_at(ctx, INNER_L4_OFF).ok_or(stat::PASS_MALFORMED)?;
    let dport: u16 = read_at(ctx, INNER_L4_OFF + 2).ok_or(stat::PASS_MALFORMED)?;
    let mut inner_l4_csum_present = false;
    let mut inner_l4_csum = 0;
    if inner_proto == IPPROTO_UDP {
        inner_l4_csum = read_at(ctx, INNER_UDP_CSUM_OFF).ok_or(stat::PASS_MALFORMED)?;
        // 0: the sender did not checksum; it stays so.
        inner_l4_csum_present = inner_l4_csum != 0;
    } else if quoted >= IP_HLEN + TCP_HLEN {
        // Like nf_nat: a TCP checksum is updated only when the whole header is quoted.
        inner_l4_csum = read_at(ctx, INNER_TCP_CSUM_OFF).ok_or(stat::PASS_MALFORMED)?;
        inner_l4_csum_present = true;
    }
    Ok(Quote {
        outer_saddr: read_at(ctx, IP_SADDR_OFF).ok_or(stat::PASS_MALFORMED)?,
        outer_daddr: read_at(ctx, IP_DADDR_OFF).ok_or(stat::PASS_MALFORMED)?,
        outer_ip_csum: read_at(ctx, IP_CSUM_OFF).ok_or(stat::PASS_MALFORMED)?,
        icmp_csum: read_at(ctx, ICMP_CSUM_OFF).ok_or(stat::PASS_MALFORMED)?,
        inner_ip_csum: read_at(ctx, INNER_IP_CSUM_OFF).ok_or(stat::PASS_MALFORMED)?,
        inner: FlowKey {
            saddr: read_at(ctx, INNER_SADDR_OFF).ok_or(stat::PASS_MALFORMED)?,
            daddr: read_at(ctx, INNER_DADDR_OFF).ok_or(stat::PASS_MALFORMED)?,
            sport,
            dport,
            proto: inner_proto,
            _pad: [0; 3],
        },
        inner_l4_csum_present,
        inner_l4_csum,
    })
}

/// Applies `nat` (the translation of the quoted packet reversed) to the error. All new
/// values are computed from the ones parsed, then written field by field.
#[inline(always)]
fn rewrite<C: Patch>(ctx: &C, q: &Quote, nat: &FlowNat) -> Result<(), ()> {
    let from = &q.inner;
    // The quoted packet as its sender sent it: the reverse of the translated tuple.
    let (saddr, daddr, sport, dport) = (nat.daddr, nat.saddr, nat.dport, nat.sport);

    // Quoted transport header: ports, and the checksum over them and the pseudo-header.
    let mut icmp = q.icmp_csum;
    if q.inner_l4_csum_present {
        let mut l4 = q.inner_l4_csum;
        l4 = checksum::replace32(l4, from.saddr, saddr);
        l4 = checksum::replace32(l4, from.daddr, daddr);
        l4 = checksum::replace16(l4, from.sport, sport);
        l4 = checksum::replace16(l4, from.dport, dport);
        if from.proto == IPPROTO_UDP && l4 == 0 {
            l4 = 0xffff;
        }
        icmp = checksum::replace16(icmp, q.inner_l4_csum, l4);
        // Two writes at constant offsets rather than one at a chosen offset (verifier).
        if from.proto == IPPROTO_UDP {
            ctx.put16(INNER_UDP_CSUM_OFF, l4)?;
        } else {
            ctx.put16(INNER_TCP_CSUM_OFF, l4)?;
        }
    }
    icmp = checksum::replace16(icmp, from.sport, sport);
    icmp = checksum::replace16(icmp, from.dport, dport);
    ctx.put16(INNER_L4_OFF, sport)?;
    ctx.put16(INNER_L4_OFF + 2, dport)?;

    // Quoted IPv4 header: addresses and its checksum.
    let mut ip = q.inner_ip_csum;
    ip = checksum::replace32(ip, from.saddr, saddr);
    ip = checksum::replace32(ip, from.daddr, daddr);
    icmp = checksum::replace16(icmp, q.inner_ip_csum, ip);
    icmp = checksum::replace32(icmp, from.saddr, saddr);
    icmp = checksum::replace32(icmp, from.daddr, daddr);
    ctx.put16(INNER_IP_CSUM_OFF, ip)?;
    ctx.put32(INNER_SADDR_OFF, saddr)?;
    ctx.put32(INNER_DADDR_OFF, daddr)?;
    ctx.put16(ICMP_CSUM_OFF, icmp)?;

    // Outer header: the destination is the quoted packet's sender; the source is translated
    // only when it is the quoted packet's destination (not a router on the way).
    let new_daddr = if q.outer_daddr == from.saddr {
        saddr
    } else {
        q.outer_daddr
    };
    let new_saddr = if q.outer_saddr == from.daddr {
        daddr
    } else {
        q.outer_saddr
    };
    let mut outer = q.outer_ip_csum;
    outer = checksum::replace32(outer, q.outer_saddr, new_saddr);
    outer = checksum::replace32(outer, q.outer_daddr, new_daddr);
    ctx.put16(IP_CSUM_OFF, outer)?;
    ctx.put32(IP_SADDR_OFF, new_saddr)?;
    ctx.put32(IP_DADDR_OFF, new_daddr)?;
    Ok(())
}
