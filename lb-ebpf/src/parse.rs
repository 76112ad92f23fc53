//! Parse stage: Ethernet + IPv4 + TCP/UDP into a small description of the packet.
//! Anything that is not a well-formed IPv4 TCP/UDP packet carrying its L4 header (whole, or
//! the first fragment of a datagram) is reported with the counter that explains why it is
//! passed untouched. Later fragments are reported as `PASS_FRAGMENT`: the fragment stage
//! (fragment.rs) gives them their first fragment's translation when there is one.
use lb_common::{stat, FlowKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::context::{read_at, Packet};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Ethernet + the longest IPv4 header + a TCP header without options.
pub const MAX_HEADERS: usize = ETH_HLEN + 60 + 20;

/// Offsets of fields the rewrite stage touches, relative to the packet start.
pub const IP_ID_OFF: usize = ETH_HLEN + 4;
pub const IP_FRAG_OFF: usize = ETH_HLEN + 6;
pub const IP_PROTO_OFF: usize = ETH_HLEN + 9;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

pub struct Parsed {
    /// The packet's 5-tuple (addresses and ports in network byte order).
    pub flow: FlowKey,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
    /// Offset of the TCP/UDP checksum field.
    pub l4_csum_off: usize,
    /// The first fragment of a fragmented datagram (MF set, offset 0): its translation is
    /// recorded for the later fragments.
    pub first_fragment: bool,
    /// IP identification, network byte order (meaningful for fragments).
    pub ip_id: u16,
    /// TCP flags byte (`TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
}

#[inline(always)]
pub fn parse<C: Packet>(ctx: &C) -> Result<Parsed, u32> {
    ctx.pull(MAX_HEADERS);
    let ethertype = u16::from_be(read_at::<C, u16>(ctx, 12).ok_or(stat::PASS_MALFORMED)?);
    if ethertype != ETH_P_IP {
        return Err(stat::PASS_NOT_IPV4);
    }
    let version_ihl: u8 = read_at(ctx, ETH_HLEN).ok_or(stat::PASS_MALFORMED)?;
    if version_ihl >> 4 != 4 {
        return Err(stat::PASS_MALFORMED);
    }
    let ihl = (version_ihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(stat::PASS_MALFORMED);
    }
    let ip_len = ihl * 4;
    let tot_len =
        u16::from_be(read_at::<C, u16>(ctx, ETH_HLEN + 2).ok_or(stat::PASS_MALFORMED)?) as usize;
    // The whole length is asked for only when the linear part is shorter than the datagram
    // (an XDP helper call; multi-buffer packets only).
    let linear = ctx.data_end() - ctx.data();
    if tot_len < ip_len || (linear < ETH_HLEN + tot_len && ctx.len() < ETH_HLEN + tot_len) {
        return Err(stat::PASS_MALFORMED);
    }
    let frag = u16::from_be(read_at::<C, u16>(ctx, IP_FRAG_OFF).ok_or(stat::PASS_MALFORMED)?);
    let ip_id: u16 = read_at(ctx, IP_ID_OFF).ok_or(stat::PASS_MALFORMED)?;
    let proto: u8 = read_at(ctx, IP_PROTO_OFF).ok_or(stat::PASS_MALFORMED)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(stat::PASS_OTHER_PROTOCOL);
    }
    // Only a datagram's first fragment carries the L4 header.
    if frag & IP_OFFSET != 0 {
        return Err(stat::PASS_FRAGMENT);
    }
    let first_fragment = frag & IP_MF != 0;
    let saddr: u32 = read_at(ctx, IP_SADDR_OFF).ok_or(stat::PASS_MALFORMED)?;
    let daddr: u32 = read_at(ctx, IP_DADDR_OFF).ok_or(stat::PASS_MALFORMED)?;
    let l4_off = ETH_HLEN + ip_len;
    let (l4_len, l4_csum_off) = if proto == IPPROTO_TCP {
        (20, l4_off + 16)
    } else {
        (8, l4_off + 6)
    };
    if tot_len < ip_len + l4_len {
        return Err(stat::PASS_MALFORMED);
    }
    // Both ports and the checksum must be readable (and so writable) in the linear area.
    let sport: u16 = read_at(ctx, l4_off).ok_or(stat::PASS_MALFORMED)?;
    let dport: u16 = read_at(ctx, l4_off + 2).ok_or(stat::PASS_MALFORMED)?;
    read_at::<C, u16>(ctx, l4_csum_off).ok_or(stat::PASS_MALFORMED)?;
    let tcp_flags: u8 = if proto == IPPROTO_TCP {
        read_at(ctx, l4_off + 13).ok_or(stat::PASS_MALFORMED)?
    } else {
        0
    };
    Ok(Parsed {
        flow: FlowKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        },
        l4_off,
        l4_csum_off,
        first_fragment,
        ip_id,
        tcp_flags,
    })
}
