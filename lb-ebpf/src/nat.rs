//! Rewrite stage: replace a packet's 5-tuple with the one conntrack chose, fixing the IPv4
//! and TCP/UDP checksums. One implementation per context (see context.rs for why).
use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use lb_common::{FlowNat, IPPROTO_UDP};

use crate::{
    checksum,
    context::{ptr_at, Packet, Tc, Xdp},
    parse::{Parsed, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
};

pub trait Rewrite: Packet {
    fn rewrite(&self, packet: &Parsed, to: &FlowNat) -> Result<(), ()>;
    /// Replaces only the IPv4 addresses (`from` and `to` are (source, destination)), fixing
    /// the header checksum: for later fragments, whose L4 checksum sits in the first fragment.
    fn rewrite_addresses(&self, from: (u32, u32), to: (u32, u32)) -> Result<(), ()>;
}

impl Rewrite for Xdp<'_> {
    #[inline(always)]
    fn rewrite_addresses(&self, from: (u32, u32), to: (u32, u32)) -> Result<(), ()> {
        let ip_csum = ptr_at::<_, u16>(self, IP_CSUM_OFF).ok_or(())?;
        let saddr = ptr_at::<_, u32>(self, IP_SADDR_OFF).ok_or(())?;
        let daddr = ptr_at::<_, u32>(self, IP_DADDR_OFF).ok_or(())?;
        // SAFETY: every pointer was bounds-checked against data_end just above.
        unsafe {
            let mut ip = core::ptr::read_unaligned(ip_csum);
            ip = checksum::replace32(ip, from.0, to.0);
            ip = checksum::replace32(ip, from.1, to.1);
            core::ptr::write_unaligned(ip_csum, ip);
            core::ptr::write_unaligned(saddr, to.0);
            core::ptr::write_unaligned(daddr, to.1);
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite(&self, packet: &Parsed, to: &FlowNat) -> Result<(), ()> {
        let from = &packet.flow;
        let ip_csum = ptr_at::<_, u16>(self, IP_CSUM_OFF).ok_or(())?;
        let saddr = ptr_at::<_, u32>(self, IP_SADDR_OFF).ok_or(())?;
        let daddr = ptr_at::<_, u32>(self, IP_DADDR_OFF).ok_or(())?;
        let sport = ptr_at::<_, u16>(self, packet.l4_off).ok_or(())?;
        let dport = ptr_at::<_, u16>(self, packet.l4_off + 2).ok_or(())?;
        let l4_csum = ptr_at::<_, u16>(self, packet.l4_csum_off).ok_or(())?;
        // SAFETY: every pointer was bounds-checked against data_end just above.
        unsafe {
            let mut ip = core::ptr::read_unaligned(ip_csum);
            ip = checksum::replace32(ip, from.saddr, to.saddr);
            ip = checksum::replace32(ip, from.daddr, to.daddr);
            core::ptr::write_unaligned(ip_csum, ip);

            let mut l4 = core::ptr::read_unaligned(l4_csum);
            // A UDP checksum of 0 means "none": leave it so.
            if !(from.proto == IPPROTO_UDP && l4 == 0) {
                l4 = checksum::replace32(l4, from.saddr, to.saddr);
                l4 = checksum::replace32(l4, from.daddr, to.daddr);
                l4 = checksum::replace16(l4, from.sport, to.sport);
                l4 = checksum::replace16(l4, from.dport, to.dport);
                if from.proto == IPPROTO_UDP && l4 == 0 {
                    l4 = 0xffff;
                }
                core::ptr::write_unaligned(l4_csum, l4);
            }
            core::ptr::write_unaligned(saddr, to.saddr);
            core::ptr::write_unaligned(daddr, to.daddr);
            core::ptr::write_unaligned(sport, to.sport);
            core::ptr::write_unaligned(dport, to.dport);
        }
        Ok(())
    }
}

impl Rewrite for Tc<'_> {
    #[inline(always)]
    fn rewrite_addresses(&self, from: (u32, u32), to: (u32, u32)) -> Result<(), ()> {
        let ctx = self.0;
        if from.0 != to.0 {
            ctx.l3_csum_replace(IP_CSUM_OFF, from.0 as u64, to.0 as u64, 4)
                .map_err(|_| ())?;
            ctx.store(IP_SADDR_OFF, &to.0, 0).map_err(|_| ())?;
        }
        if from.1 != to.1 {
            ctx.l3_csum_replace(IP_CSUM_OFF, from.1 as u64, to.1 as u64, 4)
                .map_err(|_| ())?;
            ctx.store(IP_DADDR_OFF, &to.1, 0).map_err(|_| ())?;
        }
        Ok(())
    }

    /// The skb helpers know whether the L4 checksum is complete or CHECKSUM_PARTIAL
    /// (packets from local pods), and update it the right way for each.
    #[inline(always)]
    fn rewrite(&self, packet: &Parsed, to: &FlowNat) -> Result<(), ()> {
        let ctx = self.0;
        let from = &packet.flow;
        let mangled0 = if from.proto == IPPROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        let csum = packet.l4_csum_off;
        if from.saddr != to.saddr {
            ctx.l4_csum_replace(
                csum,
                from.saddr as u64,
                to.saddr as u64,
                BPF_F_PSEUDO_HDR as u64 | 4 | mangled0,
            )
            .map_err(|_| ())?;
            ctx.l3_csum_replace(IP_CSUM_OFF, from.saddr as u64, to.saddr as u64, 4)
                .map_err(|_| ())?;
            ctx.store(IP_SADDR_OFF, &to.saddr, 0).map_err(|_| ())?;
        }
        if from.daddr != to.daddr {
            ctx.l4_csum_replace(
                csum,
                from.daddr as u64,
                to.daddr as u64,
                BPF_F_PSEUDO_HDR as u64 | 4 | mangled0,
            )
            .map_err(|_| ())?;
            ctx.l3_csum_replace(IP_CSUM_OFF, from.daddr as u64, to.daddr as u64, 4)
                .map_err(|_| ())?;
            ctx.store(IP_DADDR_OFF, &to.daddr, 0).map_err(|_| ())?;
        }
        if from.sport != to.sport {
            ctx.l4_csum_replace(csum, from.sport as u64, to.sport as u64, 2 | mangled0)
                .map_err(|_| ())?;
            ctx.store(packet.l4_off, &to.sport, 0).map_err(|_| ())?;
        }
        if from.dport != to.dport {
            ctx.l4_csum_replace(csum, from.dport as u64, to.dport as u64, 2 | mangled0)
                .map_err(|_| ())?;
            ctx.store(packet.l4_off + 2, &to.dport, 0).map_err(|_| ())?;
        }
        Ok(())
    }
}
