//! xlb kernel programs: the datapath of the load balancer.
//!
//! Owns: per-packet work only — parse, conntrack lookup, service lookup, backend choice,
//! NAT rewrite, verdict counters. Two entry points share one code path:
//! `xlb_xdp` (XDP, ingress of uplinks) and `xlb_tc` (TC, ingress of pod veths, or of uplinks
//! with `--uplink-mode tc`). `xlb_connect4` (cgroup/connect4) balances connections of the
//! node's own processes at connect() time, with the same look-up; `xlb_getpeername4` and
//! `xlb_recvmsg4` show those sockets the service address instead of the backend;
//! `xlb_sendmsg4` does for unconnected UDP datagrams what `xlb_connect4` does for connect().
//! Must not: make policy decisions the agent can make ahead of time (which backends are
//! usable, which frontends exist, whether a service is local): those arrive in maps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Host builds (clippy --workspace) compile this crate as a plain binary with an empty main.
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

mod checksum;
mod conntrack;
mod context;
mod forward;
mod fragment;
mod icmp;
mod lookup;
mod maps;
mod nat;
mod parse;
mod pipeline;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use pipeline::Outcome;

/// Uplink ingress. Translated packets go to the host stack (XDP_PASS), which routes them;
/// the agent sets `accept_local` on uplinks so masqueraded packets are not taken for martians.
/// Frags-capable (multi-buffer packets: headers in the linear part, the rest in fragments):
/// it attaches in driver mode where the MTU exceeds a page (jumbo frames) and translates
/// GSO packets whole where the driver hands them over. (A veth still segments its peer's
/// sends for any XDP program in kernel 6.18: measured, docs/benchmarks.md.)
#[xdp(frags)]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    match pipeline::process(&context::Xdp(&ctx)) {
        Outcome::Pass | Outcome::Translated => xdp_action::XDP_PASS,
        Outcome::Drop => xdp_action::XDP_DROP,
        Outcome::Bounce => xdp_action::XDP_TX,
    }
}

/// The benchmark floor: parses like the pipeline, counts nothing, passes everything. Its
/// cost per packet is what any XDP program that reads these headers pays. Frags-capable like
/// `xlb_xdp`, so both parse the same way.
#[xdp(frags)]
pub fn xlb_floor(ctx: XdpContext) -> u32 {
    let _ = core::hint::black_box(parse::parse(&context::Xdp(&ctx)).is_ok());
    xdp_action::XDP_PASS
}

/// Pod-veth ingress (and uplink ingress in TC mode). Translated packets are sent straight to
/// the egress device found by a FIB lookup: this skips a second pass through the stack and
/// keeps packets whose new source is a node address from being dropped as martians.
#[classifier]
pub fn xlb_tc(ctx: TcContext) -> i32 {
    match pipeline::process(&context::Tc(&ctx)) {
        Outcome::Pass => TC_ACT_OK,
        Outcome::Drop => TC_ACT_SHOT,
        Outcome::Translated => forward::redirect_by_fib(&ctx),
        Outcome::Bounce => forward::bounce(&ctx),
    }
}

/// Pod-veth and uplink egress: replies of endpoints on the node's own address (hostNetwork
/// endpoints, S07) are reverse-translated as they leave; everything else goes on untouched.
#[classifier]
pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
    match pipeline::local_reply(&context::Tc(&ctx)) {
        Outcome::Drop => TC_ACT_SHOT,
        Outcome::Pass | Outcome::Translated | Outcome::Bounce => TC_ACT_OK,
    }
}

/// connect() of TCP and UDP sockets in the agent's network namespace (S18): a frontend is
/// replaced by a backend before the socket connects (connect-time load balancing).
#[cgroup_sock_addr(connect4)]
pub fn xlb_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

/// sendto()/sendmsg() with an address on unconnected UDP sockets (S18): each datagram to a
/// frontend goes to a backend (the same one for one socket, as long as it lives).
#[cgroup_sock_addr(sendmsg4)]
pub fn xlb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

/// getpeername() of those sockets: the service address, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn xlb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// recvfrom()/recvmsg() on those UDP sockets: replies appear to come from the service address.
#[cgroup_sock_addr(recvmsg4)]
pub fn xlb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could panic.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
