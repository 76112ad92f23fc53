//! The two program contexts behind one interface, so the pipeline is written once.
//! XDP reads and writes packet memory directly; TC goes through skb helpers where the
//! kernel must know about the change (checksums of CHECKSUM_PARTIAL packets, pulls).
use aya_ebpf::{
    helpers::generated::bpf_xdp_get_buff_len,
    programs::{TcContext, XdpContext},
};

pub struct Xdp<'a>(pub &'a XdpContext);
pub struct Tc<'a>(pub &'a TcContext);

pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet, including non-linear parts (TC skb fragments, XDP
    /// multi-buffer fragments). Direct reads reach only the linear part (`data..data_end`).
    fn len(&self) -> usize;
    /// Makes at least `len` bytes directly readable, where the context allows it.
    fn pull(&self, len: usize);
}

impl Packet for Xdp<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        let linear = self.0.data_end() - self.0.data();
        // SAFETY: plain helper call on this program's context. xlb_xdp is frags-capable: a
        // multi-buffer packet (a GSO packet from a veth peer) is longer than its linear part.
        let whole = unsafe { bpf_xdp_get_buff_len(self.0.ctx) } as usize;
        if whole > linear {
            whole
        } else {
            linear
        }
    }
    #[inline(always)]
    fn pull(&self, _len: usize) {}
}

impl Packet for Tc<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }
    #[inline(always)]
    fn pull(&self, len: usize) {
        let linear = self.0.data_end() - self.0.data();
        if linear < len {
            let total = self.0.len() as usize;
            let want = if len < total { len } else { total };
            // Failure leaves the packet as it was; parsing then reports it as malformed.
            let _ = self.0.pull_data(want as u32);
        }
    }
}

/// A bounds-checked pointer to a `T` at `offset` bytes into the packet: the only way the
/// datapath reads packet memory.
#[inline(always)]
pub fn ptr_at<C: Packet, T>(ctx: &C, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` at `offset` (unaligned: IP headers sit at offset 14).
#[inline(always)]
pub fn read_at<C: Packet, T: Copy>(ctx: &C, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes at offset lie inside the packet.
    ptr_at::<C, T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}
