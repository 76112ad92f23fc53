//! Active reject for services without endpoints (S10): the packet is turned into the answer
//! its sender should get — a TCP RST, or an ICMP port unreachable for UDP — and bounced back
//! out of the interface it came in on. Never a silent timeout.
//!
//! Both answers are rebuilt from the incoming headers by one pair of fixed-offset builders,
//! with every checksum computed from scratch over the new headers: XDP runs them in place on
//! the packet and then trims it (and for ICMP first grows its head); TC runs them on a copy
//! in a stack buffer and writes that over the resized skb with bpf_skb_store_bytes. Only
//! IPv4 headers without options are answered; anything else is dropped and counted
//! (`DROP_REJECT_FAILED`), as is any helper failure. An incoming RST is never answered
//! (dropped and counted as `DROP_NO_BACKEND`).
//!
//! TC only: a packet from a local pod is usually CHECKSUM_PARTIAL (the stack left the L4
//! checksum for the device to finish from `csum_start`), and no helper clears that state
//! (bpf_csum_level only touches CHECKSUM_UNNECESSARY). So the checksum that `csum_start`
//! covers is written in the form a CHECKSUM_PARTIAL skb needs, and turned into the final
//! form with bpf_l4_csum_replace, which changes the field only when the skb is *not*
//! CHECKSUM_PARTIAL (without BPF_F_PSEUDO_HDR). Either way the packet on the wire is right:
//! a partial skb is completed by the device (or skb_checksum_help) or trusted as is by a
//! local receiver (veth peer), a full one already is complete.
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_RECOMPUTE_CSUM},
    helpers::generated::{
        bpf_csum_update, bpf_skb_change_tail, bpf_skb_store_bytes, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
};
use lb_common::{stat, IPPROTO_TCP};

use crate::{
    checksum,
    context::{ptr_at, Packet, Tc, Xdp},
    parse::{Parsed, ETH_HLEN},
    pipeline::Outcome,
    stats::count,
};

pub trait Reject: Packet {
    fn reject(&self, packet: &Parsed) -> Outcome;
}

const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
/// Where TCP/UDP/ICMP starts, with an IPv4 header without options.
const L4_OFF: usize = ETH_HLEN + IP_HLEN;

/// A reset: Ethernet + IPv4 + TCP, no options, no payload (54 bytes). Also how much of an
/// incoming TCP packet the answer is built from.
const RST_LEN: usize = L4_OFF + TCP_HLEN;
/// How much of an incoming UDP packet the answer is built from (42 bytes).
const UDP_IN_LEN: usize = L4_OFF + UDP_HLEN;
/// What an ICMP error quotes: the original IPv4 header and the first 8 bytes of its
/// payload, here the whole UDP header.
const QUOTE_LEN: usize = IP_HLEN + UDP_HLEN;
/// A port unreachable: Ethernet + IPv4 + ICMP + quote (70 bytes).
const UNREACH_LEN: usize = L4_OFF + ICMP_HLEN + QUOTE_LEN;
/// The port unreachable's new IPv4 + ICMP headers, pushed in front of the original IPv4
/// header, which (with the UDP header) stays in place as the quote.
const UNREACH_GROW: usize = IP_HLEN + ICMP_HLEN;

// Field offsets in a frame (IPv4 header without options).
const ETH_ALEN: usize = 6;
const IP_TOT_LEN: usize = ETH_HLEN + 2;
const IP_FRAG: usize = ETH_HLEN + 6;
const IP_TTL: usize = ETH_HLEN + 8;
const IP_PROTO: usize = ETH_HLEN + 9;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
const TCP_SEQ: usize = L4_OFF + 4;
const TCP_ACK_SEQ: usize = L4_OFF + 8;
const TCP_DOFF: usize = L4_OFF + 12;
const TCP_FLAGS: usize = L4_OFF + 13;
const TCP_CSUM: usize = L4_OFF + 16;
const ICMP_CSUM: usize = L4_OFF + 2;
/// The quoted UDP header inside a port unreachable.
const QUOTED_UDP: usize = L4_OFF + ICMP_HLEN + IP_HLEN;
const QUOTED_UDP_CSUM: usize = QUOTED_UDP + 6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const TTL: u8 = 64;
/// Don't Fragment, as the high byte of the IPv4 flags/fragment-offset field.
const IP_DF_HI: u8 = 0x40;

impl Reject for Xdp<'_> {
    #[inline(always)]
    fn reject(&self, packet: &Parsed) -> Outcome {
        verdict(if packet.l4_off != L4_OFF {
            Err(stat::DROP_REJECT_FAILED)
        } else if packet.flow.proto == IPPROTO_TCP {
            xdp_reset(self)
        } else {
            xdp_unreachable(self)
        })
    }
}

/// The answer under construction for TC, on the stack: a port unreachable fills it, a
/// reset uses the first RST_LEN bytes. (XDP builds its answer in the packet itself.)
type Frame = [u8; UNREACH_LEN];

impl Reject for Tc<'_> {
    #[inline(always)]
    fn reject(&self, packet: &Parsed) -> Outcome {
        let mut frame: Frame = [0; UNREACH_LEN];
        verdict(if packet.l4_off != L4_OFF {
            Err(stat::DROP_REJECT_FAILED)
        } else if packet.flow.proto == IPPROTO_TCP {
            tc_reset(self, &mut frame)
        } else {
            tc_unreachable(self, &mut frame)
        })
    }
}

/// Counts the reason either way: an answer is bounced, anything else dropped.
#[inline(always)]
fn verdict(result: Result<u32, u32>) -> Outcome {
    match result {
        Ok(reason) => {
            count(reason);
            Outcome::Bounce
        }
        Err(reason) => {
            count(reason);
            Outcome::Drop
        }
    }
}

// XDP: the answer is built in place, in packet memory. (Built on the stack, LLVM split the
// buffer into single bytes and spilled each to its own 8-byte slot, doubling xlb_xdp's
// stack; with more state elsewhere that ends in "Looks like the BPF stack limit is
// exceeded".)

#[inline(always)]
fn xdp_reset(ctx: &Xdp) -> Result<u32, u32> {
    in_place::<RST_LEN, _>(ctx, build_reset)??;
    // Drops options and payload (and Ethernet padding).
    xdp_set_len(ctx, RST_LEN)?;
    Ok(stat::REJECT_TCP_RESET)
}

#[inline(always)]
fn xdp_unreachable(ctx: &Xdp) -> Result<u32, u32> {
    // Room for the new IPv4 + ICMP headers: the original Ethernet, IPv4 and UDP headers
    // now start at UNREACH_GROW, where build_unreachable expects them.
    // SAFETY: plain helper call on this program's context; it checks the headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.0.ctx, -(UNREACH_GROW as i32)) } != 0 {
        return Err(stat::DROP_REJECT_FAILED);
    }
    in_place::<UNREACH_LEN, _>(ctx, build_unreachable)?;
    xdp_set_len(ctx, UNREACH_LEN)?;
    Ok(stat::REJECT_ICMP_UNREACHABLE)
}

/// Runs `f` on the first `N` bytes of the packet, to rewrite them in place. Packet
/// pointers taken before a resize are invalid (the verifier says "R? invalid mem access
/// 'scalar'"): this one is derived afresh from data/data_end, and the borrow ends before
/// the caller can resize again.
#[inline(always)]
fn in_place<const N: usize, R>(ctx: &Xdp, f: impl FnOnce(&mut [u8; N]) -> R) -> Result<R, u32> {
    let frame = ptr_at::<_, [u8; N]>(ctx, 0).ok_or(stat::DROP_REJECT_FAILED)?;
    // SAFETY: ptr_at checked that N bytes at offset 0 lie inside the packet; [u8; N] needs
    // no alignment, and nothing else refers to packet memory while `f` runs.
    Ok(f(unsafe { &mut *frame }))
}

/// Trims the packet to `len` bytes (it is never shorter: parse checked the headers).
#[inline(always)]
fn xdp_set_len(ctx: &Xdp, len: usize) -> Result<(), u32> {
    let current = ctx.len();
    if current != len {
        let delta = len as i32 - current as i32;
        // SAFETY: plain helper call on this program's context; it checks the bounds itself.
        if unsafe { bpf_xdp_adjust_tail(ctx.0.ctx, delta) } != 0 {
            return Err(stat::DROP_REJECT_FAILED);
        }
    }
    Ok(())
}

// TC: the answer is built in a stack buffer and written with bpf_skb_store_bytes, so that
// the kernel sees every change (and the buffer, whose address goes to a helper, stays a
// buffer).

/// Copies the first `N` bytes of the packet to `frame[at..]`.
#[inline(always)]
fn tc_load<const N: usize>(ctx: &Tc, frame: &mut Frame, at: usize) -> Result<(), u32> {
    if at + N > UNREACH_LEN {
        return Err(stat::DROP_REJECT_FAILED);
    }
    let from = ptr_at::<_, [u8; N]>(ctx, 0).ok_or(stat::DROP_REJECT_FAILED)?;
    // SAFETY: ptr_at checked that N bytes at offset 0 lie inside the packet; `frame` has
    // room for N bytes at `at` (checked above), and stack and packet never overlap.
    unsafe { core::ptr::copy_nonoverlapping(from as *const u8, frame.as_mut_ptr().add(at), N) };
    Ok(())
}

#[inline(always)]
fn tc_reset(ctx: &Tc, frame: &mut Frame) -> Result<u32, u32> {
    tc_load::<RST_LEN>(ctx, frame, 0)?;
    let sums = build_reset(frame)?;
    // CHECKSUM_PARTIAL form: the pseudo-header sum, folded, not complemented (what the
    // stack writes before handing the rest to the device). bpf_l4_csum_replace then adds
    // `diff` to a complete skb's field only: ~(diff - seed) = ~(pseudo + header) = the full
    // checksum when diff = 2 * seed + header (one's complement, where -seed = ~seed).
    let full = be16(frame, TCP_CSUM);
    let seed = checksum::fold(sums.pseudo);
    let diff = checksum::fold(2 * u32::from(seed) + u32::from(checksum::fold(sums.header)));
    put16(frame, TCP_CSUM, seed);
    let skb = &ctx.0.skb;
    // Trims the payload and options; also linearizes the skb and resets GSO, which a
    // coalesced (GRO) segment from an uplink would still carry.
    // SAFETY: plain helper call on this program's __sk_buff.
    if unsafe { bpf_skb_change_tail(skb.skb, RST_LEN as u32, 0) } != 0 {
        return Err(stat::DROP_REJECT_FAILED);
    }
    tc_store::<RST_LEN>(ctx, frame)?;
    skb.l4_csum_replace(TCP_CSUM, 0, u64::from(mem16(diff)), 0)
        .map_err(|_| stat::DROP_REJECT_FAILED)?;
    keep_complete_csum(ctx, seed, full);
    Ok(stat::REJECT_TCP_RESET)
}

#[inline(always)]
fn tc_unreachable(ctx: &Tc, frame: &mut Frame) -> Result<u32, u32> {
    tc_load::<UDP_IN_LEN>(ctx, frame, UNREACH_GROW)?;
    build_unreachable(frame);
    // A CHECKSUM_PARTIAL UDP skb keeps csum_start on its UDP header, which becomes the
    // quoted one: completing it will overwrite the quoted UDP checksum with `completed`.
    // The ICMP checksum is written for that outcome, and bpf_l4_csum_replace switches it
    // to the quote as it stands when the skb is not CHECKSUM_PARTIAL.
    let full = be16(frame, ICMP_CSUM);
    let quoted = be16(frame, QUOTED_UDP_CSUM);
    let completed = match checksum::finish(checksum::sum_words(frame, QUOTED_UDP, 4)) {
        0 => 0xffff, // CSUM_MANGLED_0, as skb_checksum_help writes it
        c => c,
    };
    let partial = checksum::replace16(full, quoted, completed);
    put16(frame, ICMP_CSUM, partial);
    let skb = &ctx.0.skb;
    // Trim to Ethernet + IPv4 + UDP headers first: bpf_skb_adjust_room refuses UDP GSO
    // skbs, and bpf_skb_change_tail resets GSO.
    // SAFETY: plain helper call on this program's __sk_buff.
    if unsafe { bpf_skb_change_tail(skb.skb, UDP_IN_LEN as u32, 0) } != 0 {
        return Err(stat::DROP_REJECT_FAILED);
    }
    // Room for the new IPv4 + ICMP headers right after the Ethernet header: the original
    // IPv4 and UDP headers stay where they are (and where csum_start points) as the quote,
    // and the skb's network header moves to the new IPv4 header.
    skb.adjust_room(UNREACH_GROW as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| stat::DROP_REJECT_FAILED)?;
    tc_store::<UNREACH_LEN>(ctx, frame)?;
    skb.l4_csum_replace(
        ICMP_CSUM,
        u64::from(mem16(completed)),
        u64::from(mem16(quoted)),
        2,
    )
    .map_err(|_| stat::DROP_REJECT_FAILED)?;
    keep_complete_csum(ctx, partial, full);
    Ok(stat::REJECT_ICMP_UNREACHABLE)
}

/// Writes `frame[..N]` over the start of the packet through bpf_skb_store_bytes, which
/// needs no packet pointer (those are invalid after bpf_skb_change_tail/adjust_room) and
/// keeps a CHECKSUM_COMPLETE skb's csum right (BPF_F_RECOMPUTE_CSUM).
#[inline(always)]
fn tc_store<const N: usize>(ctx: &Tc, frame: &Frame) -> Result<(), u32> {
    if N > UNREACH_LEN {
        return Err(stat::DROP_REJECT_FAILED);
    }
    // SAFETY: `frame` holds at least N bytes (checked above); the helper checks the packet.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.0.skb.skb,
            0,
            frame.as_ptr() as *const _,
            N as u32,
            BPF_F_RECOMPUTE_CSUM as u64,
        )
    };
    if rc != 0 {
        return Err(stat::DROP_REJECT_FAILED);
    }
    Ok(())
}

/// bpf_l4_csum_replace without BPF_F_PSEUDO_HDR changed a checksum field from `old` to
/// `new` without telling a CHECKSUM_COMPLETE skb's csum; this does (a no-op, -ENOTSUPP, for
/// any other skb). Both fields sit at an even offset from the network header.
#[inline(always)]
fn keep_complete_csum(ctx: &Tc, old: u16, new: u16) {
    let delta = u32::from(mem16(new)) + u32::from(!mem16(old));
    // SAFETY: plain helper call on this program's __sk_buff.
    let _ = unsafe { bpf_csum_update(ctx.0.skb.skb, delta) };
}

/// The checksum sums a reset was built from.
struct ResetSums {
    /// Unfolded sum of the TCP pseudo header.
    pseudo: u32,
    /// Unfolded sum of the TCP header with a zero checksum.
    header: u32,
}

/// Turns the incoming Ethernet + IPv4 + TCP headers in `frame[..RST_LEN]` (the packet for
/// XDP, a copy for TC) into a reset, TCP checksum complete. RFC 793 reset generation ("If the state is CLOSED"): a segment
/// with ACK gets <SEQ=SEG.ACK><CTL=RST>, any other <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>,
/// where SEG.LEN counts the payload, SYN and FIN.
#[inline(always)]
fn build_reset<const N: usize>(frame: &mut [u8; N]) -> Result<ResetSums, u32> {
    let flags = frame[TCP_FLAGS];
    if flags & TCP_RST != 0 {
        // Never answer a RST with a RST.
        return Err(stat::DROP_NO_BACKEND);
    }
    let tot_len = u32::from(be16(frame, IP_TOT_LEN));
    let tcp_hlen = u32::from(frame[TCP_DOFF] >> 4) * 4;
    if tcp_hlen < TCP_HLEN as u32 || tot_len < IP_HLEN as u32 + tcp_hlen {
        return Err(stat::DROP_REJECT_FAILED);
    }
    let (seq, ack_seq, out_flags) = if flags & TCP_ACK != 0 {
        (be32(frame, TCP_ACK_SEQ), 0, TCP_RST)
    } else {
        let mut len = tot_len - IP_HLEN as u32 - tcp_hlen;
        if flags & TCP_SYN != 0 {
            len += 1;
        }
        if flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, be32(frame, TCP_SEQ).wrapping_add(len), TCP_RST | TCP_ACK)
    };
    swap(frame, 0, ETH_ALEN, ETH_ALEN);
    swap(frame, IP_SADDR, IP_DADDR, 4);
    reply_ip_header(frame, RST_LEN, IPPROTO_TCP, IP_DF_HI);
    swap(frame, L4_OFF, L4_OFF + 2, 2);
    put32(frame, TCP_SEQ, seq);
    put32(frame, TCP_ACK_SEQ, ack_seq);
    frame[TCP_DOFF] = ((TCP_HLEN / 4) as u8) << 4;
    frame[TCP_FLAGS] = out_flags;
    // Window, checksum, urgent pointer.
    put16(frame, TCP_FLAGS + 1, 0);
    put16(frame, TCP_CSUM, 0);
    put16(frame, TCP_CSUM + 2, 0);
    let pseudo = checksum::sum_words(frame, IP_SADDR, 4) + u32::from(IPPROTO_TCP) + TCP_HLEN as u32;
    let header = checksum::sum_words(frame, L4_OFF, TCP_HLEN / 2);
    put16(frame, TCP_CSUM, checksum::finish(pseudo + header));
    Ok(ResetSums { pseudo, header })
}

/// Turns the incoming Ethernet + IPv4 + UDP headers in `frame[UNREACH_GROW..]` into an ICMP
/// destination unreachable, port unreachable (RFC 792), from the frontend address the
/// client targeted. The original IPv4 and UDP headers are already where the quote goes;
/// the new headers overwrite the original Ethernet header, read first.
#[inline(always)]
fn build_unreachable<const N: usize>(frame: &mut [u8; N]) {
    const ORIG: usize = UNREACH_GROW;
    const QUOTE: usize = L4_OFF + ICMP_HLEN;
    copy(frame, 0, ORIG + ETH_ALEN, ETH_ALEN);
    copy(frame, ETH_ALEN, ORIG, ETH_ALEN);
    copy(frame, 2 * ETH_ALEN, ORIG + 2 * ETH_ALEN, 2);
    copy(frame, IP_SADDR, QUOTE + (IP_DADDR - ETH_HLEN), 4);
    copy(frame, IP_DADDR, QUOTE + (IP_SADDR - ETH_HLEN), 4);
    reply_ip_header(frame, UNREACH_LEN, IPPROTO_ICMP, 0);
    frame[L4_OFF] = ICMP_DEST_UNREACH;
    frame[L4_OFF + 1] = ICMP_PORT_UNREACH;
    // Checksum and the unused word.
    put16(frame, ICMP_CSUM, 0);
    put32(frame, ICMP_CSUM + 2, 0);
    let sum = checksum::sum_words(frame, L4_OFF, (ICMP_HLEN + QUOTE_LEN) / 2);
    put16(frame, ICMP_CSUM, checksum::finish(sum));
}

/// The IPv4 header of an answer `len` bytes long (Ethernet included), addresses already in
/// place: no options, TOS 0, ID 0, TTL 64, checksum computed.
#[inline(always)]
fn reply_ip_header<const N: usize>(frame: &mut [u8; N], len: usize, proto: u8, frag_hi: u8) {
    frame[ETH_HLEN] = 0x45;
    frame[ETH_HLEN + 1] = 0;
    put16(frame, IP_TOT_LEN, (len - ETH_HLEN) as u16);
    put16(frame, IP_TOT_LEN + 2, 0);
    frame[IP_FRAG] = frag_hi;
    frame[IP_FRAG + 1] = 0;
    frame[IP_TTL] = TTL;
    frame[IP_PROTO] = proto;
    put16(frame, IP_CSUM, 0);
    let sum = checksum::sum_words(frame, ETH_HLEN, IP_HLEN / 2);
    put16(frame, IP_CSUM, checksum::finish(sum));
}

// Fixed-offset accessors for the frames (packet or stack). Offsets are constants after
// inlining, so the bounds checks fold away; the guards keep a panic path from being emitted
// if they did not (the panic handler is `loop {}`: "infinite loop detected").

/// `frame[to..to + len] = frame[from..from + len]` (ranges must not overlap).
#[inline(always)]
fn copy<const N: usize>(frame: &mut [u8; N], to: usize, from: usize, len: usize) {
    let mut i = 0;
    while i < len {
        if to + i < N && from + i < N {
            frame[to + i] = frame[from + i];
        }
        i += 1;
    }
}

/// Exchanges `frame[a..a + len]` and `frame[b..b + len]`.
#[inline(always)]
fn swap<const N: usize>(frame: &mut [u8; N], a: usize, b: usize, len: usize) {
    let mut i = 0;
    while i < len {
        if a + i < N && b + i < N {
            frame.swap(a + i, b + i);
        }
        i += 1;
    }
}

#[inline(always)]
fn be16<const N: usize>(bytes: &[u8; N], at: usize) -> u16 {
    if at + 2 > N {
        return 0;
    }
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[inline(always)]
fn be32<const N: usize>(bytes: &[u8; N], at: usize) -> u32 {
    if at + 4 > N {
        return 0;
    }
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[inline(always)]
fn put16<const N: usize>(bytes: &mut [u8; N], at: usize, value: u16) {
    if at + 2 <= N {
        bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }
}

#[inline(always)]
fn put32<const N: usize>(bytes: &mut [u8; N], at: usize, value: u32) {
    if at + 4 <= N {
        bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }
}

/// A host-order 16-bit value as the kernel's checksum helpers take it: the number a native
/// load of its big-endian bytes gives.
#[inline(always)]
fn mem16(value: u16) -> u16 {
    u16::from_ne_bytes(value.to_be_bytes())
}
