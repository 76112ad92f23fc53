//! Ethernet + IPv4 + TCP frames for BPF_PROG_TEST_RUN, built by hand (the packet library the
//! tests use is a dev-dependency only). Checksums are complete and correct.
use std::net::Ipv4Addr;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;

/// One TCP segment from `src` to `dst` with `flags` and `payload`.
pub fn tcp_frame(
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let total = IP_LEN + TCP_LEN + payload.len();
    let mut f = Vec::with_capacity(ETH_LEN + total);
    // Ethernet: locally administered addresses, IPv4.
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    // IPv4: no options, DF, TTL 64.
    let ip = ETH_LEN;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let ip_csum = checksum(0, &f[ip..ip + IP_LEN]);
    f[ip + 10..ip + 12].copy_from_slice(&ip_csum.to_be_bytes());
    // TCP: seq 1000, ack 1 when ACK is set, window 64240.
    let tcp = f.len();
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&1000u32.to_be_bytes());
    let ack: u32 = if flags & TCP_ACK != 0 { 1 } else { 0 };
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[(TCP_LEN as u8 / 4) << 4, flags]);
    f.extend_from_slice(&64240u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 6;
    pseudo[10..].copy_from_slice(&((TCP_LEN + payload.len()) as u16).to_be_bytes());
    let tcp_csum = checksum(sum(0, &pseudo), &f[tcp..]);
    f[tcp + 16..tcp + 18].copy_from_slice(&tcp_csum.to_be_bytes());
    f
}

/// One's-complement sum of 16-bit big-endian words (odd tail padded with zero).
fn sum(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// The Internet checksum of `bytes`, starting from a partial sum.
fn checksum(initial: u32, bytes: &[u8]) -> u16 {
    let mut acc = sum(initial, bytes);
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let f = tcp_frame(
            (Ipv4Addr::new(10, 244, 200, 1), 40000),
            (Ipv4Addr::new(10, 96, 0, 1), 80),
            TCP_SYN,
            b"odd",
        );
        assert_eq!(f.len(), 14 + 20 + 20 + 3);
        // A header including its own checksum sums to 0xffff, i.e. checksums to 0.
        assert_eq!(checksum(0, &f[14..34]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&f[26..34]);
        pseudo[9] = 6;
        pseudo[10..].copy_from_slice(&23u16.to_be_bytes());
        assert_eq!(checksum(sum(0, &pseudo), &f[34..]), 0);
    }
}
