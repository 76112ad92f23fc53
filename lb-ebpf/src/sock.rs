//! Connect-time load balancing for processes on the node itself (S18).
//!
//! Locally generated connections never pass XDP or TC ingress, so a `cgroup/connect4`
//! program rewrites the destination of `connect()` instead: a TCP or UDP socket connecting to
//! a frontend of `XLB_SVC_V1` is connected straight to a backend chosen by the same look-up
//! as new flows on the packet path (`lookup::backend`). No conntrack entry, no NAT: the
//! kernel socket talks to the backend itself. `cgroup/sendmsg4` does the same per datagram
//! for unconnected UDP sockets (`sendto()` with an address). Each choice is recorded by
//! socket cookie and backend (`XLB_SOCK_V2`) so that `getpeername4` and `recvmsg4` show the
//! service address again, also for one socket that talks to several services.
//!
//! The program is attached to a cgroup (the root of cgroup v2 by default) and so runs for
//! every process of the machine, in every network namespace: it acts only when the socket's
//! namespace cookie equals the agent's (`DatapathConfig::netns_cookie`), and never while
//! that is 0.
use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    stat, FlowKey, ServiceValue, SockFrontend, SockPeer, IPPROTO_TCP, IPPROTO_UDP, SVC_F_LOCAL,
};

use crate::{
    lookup,
    maps::{config, SOCKETS},
};

/// Let `connect()` proceed (with or without a rewritten address).
const PROCEED: i32 = 1;
/// Fail `connect()`; the error is the one set with `bpf_set_retval` (EPERM without one).
const FAIL: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    balance(ctx)
}

#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    // The kernel runs this hook only for datagrams that carry an address (unconnected
    // sends); the choice is the same as connect4's for this socket and frontend.
    balance(ctx)
}

/// Replaces a frontend destination by a backend (connect4, sendmsg4).
#[inline(always)]
fn balance(ctx: &SockAddrContext) -> i32 {
    let cfg = config();
    if !ours(ctx, cfg.netns_cookie) {
        return PROCEED;
    }
    // SAFETY: the context pointer is valid for the whole run; fields are read and written
    // one by one, as the verifier requires for sock_addr contexts.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return PROCEED,
    };
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // There is no packet: the source is usually unbound (0) and the source port unknown.
    // The node address stands in for the source (affinity, source ranges: a node process
    // is seen as the node, as kube-proxy sees it), and the socket cookie, folded into the
    // source-port slot, spreads the sockets of one process over the backends.
    let flow = FlowKey {
        saddr: cfg.snat_addr,
        daddr: sa.user_ip4,
        sport: (cookie ^ (cookie >> 16) ^ (cookie >> 32) ^ (cookie >> 48)) as u16,
        // user_port holds the port in network byte order in its low 16 bits.
        dport: sa.user_port as u16,
        proto,
        _pad: [0; 3],
    };
    let Some(mut service) = lookup::service(&flow) else {
        return PROCEED;
    };
    // Node processes are inside the cluster: an external frontend under
    // externalTrafficPolicy Local serves them from its cluster-wide set (as for pods, S22).
    if service.cluster_set != 0 {
        service = ServiceValue {
            backend_set: service.cluster_set,
            cluster_set: 0,
            flags: service.flags & !SVC_F_LOCAL,
            affinity_timeout: service.affinity_timeout,
        };
    }
    if !lookup::source_allowed(&service, &flow) {
        // The packet path drops these; untouched, the connection takes the network path
        // like one from outside, and is dropped there.
        return PROCEED;
    }
    match lookup::backend(&cfg, &service, &flow) {
        Ok(choice) => {
            // Best effort: without the record the application sees the backend as its peer.
            let _ = SOCKETS.insert(
                SockPeer {
                    cookie,
                    backend_addr: choice.backend.addr,
                    backend_port: choice.backend.port,
                    _pad: 0,
                },
                SockFrontend {
                    frontend_addr: flow.daddr,
                    frontend_port: flow.dport,
                    _pad: 0,
                },
                0,
            );
            sa.user_ip4 = choice.backend.addr;
            sa.user_port = u32::from(choice.backend.port);
            PROCEED
        }
        Err(stat::DROP_NO_BACKEND) => {
            // A service without endpoints rejects (S10): connect() or sendto() fails at once
            // with ECONNREFUSED, as a RST or an ICMP port unreachable would make it fail.
            // SAFETY: plain helper call (cgroup programs, kernel >= 5.18).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            FAIL
        }
        // Node-local set without a local endpoint (dropped on the packet path), or maps
        // mid-update: leave the connection alone.
        Err(_) => PROCEED,
    }
}

/// Whether this socket lives in the agent's network namespace (never while the cookie is 0).
#[inline(always)]
fn ours(ctx: &SockAddrContext, netns_cookie: u64) -> bool {
    // SAFETY: the helper takes the program's context.
    netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == netns_cookie
}

/// getpeername4 and recvmsg4: a socket connect4 sent to a backend reports the frontend it
/// asked for as its peer (getpeername) and as the source of what it receives (recvfrom),
/// as it would through kube-proxy's NAT. These hooks must always return 1.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx, config().netns_cookie) {
        return PROCEED;
    }
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: as in balance.
    let sa = unsafe { &mut *ctx.sock_addr };
    let peer = SockPeer {
        cookie,
        backend_addr: sa.user_ip4,
        backend_port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied out of the map at once.
    if let Some(frontend) = SOCKETS.get_ptr(peer).map(|v| unsafe { *v }) {
        sa.user_ip4 = frontend.frontend_addr;
        sa.user_port = u32::from(frontend.frontend_port);
    }
    PROCEED
}
