//! Internet checksums (RFC 1071). Incremental updates (RFC 1624) for the XDP path, where
//! packets arrive fully checksummed, and sums from scratch over fixed-size stack buffers for
//! the packets the datapath builds itself (rejects). The incremental helpers take values
//! exactly as they sit in memory: one's-complement sums do not depend on byte order as long
//! as every operand uses the same one. The from-scratch helpers read big-endian words and
//! return host-order values (store them with `to_be_bytes`).

/// Folds a 32-bit one's-complement sum to 16 bits (not complemented). Two rounds fold any
/// 32-bit value: the first leaves at most 0x1fffe.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field for a sum: folded and complemented.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// New checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check) + (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// New checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(sum)
}

/// Unfolded one's-complement sum of the big-endian 16-bit words of `bytes[start..start +
/// 2 * words]`, in host order. Call it with constant `start` and `words`: after inlining the
/// loop has a constant trip count and unrolls. Words past the end of the buffer are skipped
/// rather than indexed, so no bounds-check panic path is left for the verifier to reject
/// ("infinite loop detected" in the panic handler).
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N], start: usize, words: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < words {
        let at = start + 2 * i;
        if at + 1 < N {
            sum += u32::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
        }
        i += 1;
    }
    sum
}
