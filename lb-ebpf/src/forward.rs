//! After a TC rewrite: send the packet straight to the egress device a FIB lookup names,
//! with the Ethernet header the FIB's neighbour gives (bpf_redirect), or into the pod
//! itself when that device is a local pod's veth (bpf_redirect_peer: the packet enters the
//! pod's namespace without a pass through the veth's backlog queue). Without a known
//! neighbour, the kernel resolves the FIB's next hop (bpf_redirect_neigh). Falls back to
//! the stack.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
    },
    programs::TcContext,
};
use lb_common::stat;

use crate::{
    context::{read_at, Tc},
    maps::POD_DEVICES,
    parse::{IP_DADDR_OFF, IP_SADDR_OFF},
    stats::count,
};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn redirect_by_fib(ctx: &TcContext) -> i32 {
    let tc = Tc(ctx);
    let (Some(saddr), Some(daddr)) = (
        read_at::<_, u32>(&tc, IP_SADDR_OFF),
        read_at::<_, u32>(&tc, IP_DADDR_OFF),
    ) else {
        return TC_ACT_OK;
    };
    // SAFETY: an all-zero bpf_fib_lookup is a valid input; we fill the fields it needs.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // tot_len stays 0: GSO packets are larger than the MTU and must not fail the lookup.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        // The neighbour is known and the FIB filled in both MACs: the packet gets the
        // Ethernet header the stack would give it, and goes out (or, to a pod veth the
        // agent registered, straight into the pod) without the kernel's second route and
        // neighbour look-up that bpf_redirect_neigh would make.
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&params.dmac);
        macs[6..].copy_from_slice(&params.smac);
        // Through bpf_skb_store_bytes, not a direct write: a direct write anywhere in a TC
        // program makes the verifier un-clone every cloned skb (a copy of the head: every
        // TCP segment a local socket sends) before the program runs, also for packets it
        // only passes.
        if ctx.store(0, &macs, 0).is_err() {
            return TC_ACT_OK;
        }
        // Only registered devices: bpf_redirect_peer needs a device with a peer (veth,
        // netkit), which an uplink NIC is not. Only from ingress: xlb_tc runs nowhere else.
        let (action, reason) = if POD_DEVICES.get_ptr(params.ifindex).is_some() {
            // SAFETY: plain helper call with integers.
            let action = unsafe { bpf_redirect_peer(params.ifindex, 0) };
            (action, stat::REDIRECT_PEER)
        } else {
            // SAFETY: plain helper call with integers.
            let action = unsafe { bpf_redirect(params.ifindex, 0) };
            (action, stat::REDIRECT_FIB)
        };
        if action >= 0 {
            count(reason);
            return action as i32;
        }
        return TC_ACT_OK;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The FIB left the next hop in ipv4_dst: the kernel resolves its neighbour (and
        // queues the packet meanwhile) without looking the route up again.
        let mut next_hop = bpf_redir_neigh {
            nh_family: AF_INET as u32,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                // SAFETY: the FIB wrote the IPv4 member (family AF_INET).
                ipv4_nh: unsafe { params.__bindgen_anon_4.ipv4_dst },
            },
        };
        // SAFETY: plain helper call; next_hop outlives it.
        let action = unsafe {
            bpf_redirect_neigh(
                params.ifindex,
                &mut next_hop,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        };
        if action >= 0 {
            count(stat::REDIRECT_FIB);
            return action as i32;
        }
    }
    TC_ACT_OK
}

/// Sends a packet the pipeline turned into an answer back out of the interface it came in
/// on (towards the pod, for a pod veth).
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> i32 {
    // SAFETY: ctx.skb.skb is the program's __sk_buff; bpf_redirect takes plain integers.
    let action = unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) };
    action as i32
}
