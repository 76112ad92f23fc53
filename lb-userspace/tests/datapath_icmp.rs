//! ICMP errors about translated flows (issue 5) through BPF_PROG_TEST_RUN: real programs in
//! the real kernel, maps seeded by the agent's own writer, flows set up by running their real
//! first packet (and reply) through the program. Each error is built the way the host that
//! raises it would (quoting the packet as seen on its wire), and the output is checked
//! independently: every checksum by its own one's-complement sum here (outer IPv4, ICMP over
//! the whole message, quoted IPv4, quoted TCP/UDP over its pseudo-header), the quote against
//! the exact bytes its sender sent, the ICMP type, code and MTU field unchanged. One
//! behaviour per test.
mod common;

use std::net::Ipv4Addr;

use common::{Fixture, NODE_IP};
use etherparse::{Ipv4HeaderSlice, PacketBuilder};
use lb_common::{stat, Backend, ServiceKey, IPPROTO_TCP, IPPROTO_UDP, SVC_F_EXTERNAL};
use xlb::model::{DesiredState, Frontend, FrontendKind};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// A router between the node and the client or the backend.
const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
/// The only backend, on another node (so NodePort traffic from outside is masqueraded).
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const TCP_NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_ECHO: u8 = 8;
/// The next-hop MTU of the fragmentation-needed errors, in bytes 6..8 of the ICMP header.
const MTU: u16 = 1400;

/// ClusterIP VIP:80/TCP and VIP:53/UDP, NodePort 30080/TCP and 30053/UDP, each to the one
/// backend (8080/TCP, 5353/UDP).
fn fixture(test: &str) -> Option<Fixture> {
    let mut fx = Fixture::load(test)?;
    let mut desired = DesiredState::default();
    desired.backend_sets.insert(
        "default/web:http/TCP".into(),
        vec![Backend::new(BACKEND, 8080, 0)],
    );
    desired.backend_sets.insert(
        "default/web:dns/UDP".into(),
        vec![Backend::new(BACKEND, 5353, 0)],
    );
    for (addr, port, proto, set, kind, flags) in [
        (
            VIP,
            80,
            IPPROTO_TCP,
            "default/web:http/TCP",
            FrontendKind::ClusterIp,
            0,
        ),
        (
            VIP,
            53,
            IPPROTO_UDP,
            "default/web:dns/UDP",
            FrontendKind::ClusterIp,
            0,
        ),
        (
            NODE_IP,
            TCP_NODE_PORT,
            IPPROTO_TCP,
            "default/web:http/TCP",
            FrontendKind::NodePort,
            SVC_F_EXTERNAL,
        ),
        (
            NODE_IP,
            UDP_NODE_PORT,
            IPPROTO_UDP,
            "default/web:dns/UDP",
            FrontendKind::NodePort,
            SVC_F_EXTERNAL,
        ),
    ] {
        desired.frontends.insert(
            ServiceKey::new(addr, port, proto),
            Frontend::new(set, kind, flags),
        );
    }
    fx.apply(&desired);
    Some(fx)
}

/// A TCP segment (ACK with data) or UDP datagram, as a frame.
fn packet(proto: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(
        src.octets(),
        dst.octets(),
        64,
    );
    let payload = b"large enough to matter";
    let mut v = Vec::new();
    if proto == IPPROTO_TCP {
        b.tcp(sport, dport, 1000, 64240)
            .ack(1)
            .write(&mut v, payload)
            .unwrap();
    } else {
        b.udp(sport, dport).write(&mut v, payload).unwrap();
    }
    v
}

/// An ICMP error from `src` to `dst` quoting the first `quote_len` bytes of `about`'s IPv4
/// packet (all of it with `usize::MAX`), as a frame.
fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (icmp_type, code, rest): (u8, u8, [u8; 4]),
    about: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let ip = &about[14..];
    let quote = &ip[..quote_len.min(ip.len())];
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 3], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_raw(icmp_type, code, rest)
        .write(&mut v, quote)
        .unwrap();
    v
}

fn frag_needed() -> (u8, u8, [u8; 4]) {
    let [hi, lo] = MTU.to_be_bytes();
    (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, [0, 0, hi, lo])
}

fn port_unreachable() -> (u8, u8, [u8; 4]) {
    (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, [0; 4])
}

fn time_exceeded() -> (u8, u8, [u8; 4]) {
    (ICMP_TIME_EXCEEDED, 0, [0; 4])
}

/// RFC 1071 sum over `bytes`: 0xffff for a block whose checksum is right.
fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Tuple {
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
}

/// The 4-tuple of a TCP/UDP frame, after checking its IPv4 and TCP/UDP checksums.
fn tuple(frame: &[u8]) -> Tuple {
    let (ip, l4) = checked_ipv4(&frame[14..], "packet");
    checked_l4(&ip, l4, "packet");
    Tuple {
        src: ip.source_addr(),
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dst: ip.destination_addr(),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
    }
}

/// An IPv4 header with a right checksum, and what follows it (the bytes present).
fn checked_ipv4<'a>(bytes: &'a [u8], what: &str) -> (Ipv4HeaderSlice<'a>, &'a [u8]) {
    let ip = Ipv4HeaderSlice::from_slice(bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
    let hlen = ip.slice().len();
    assert_eq!(
        ones_complement_sum(ip.slice()),
        0xffff,
        "{what}: IPv4 header checksum"
    );
    (ip, &bytes[hlen..])
}

/// Checks a whole TCP/UDP segment's checksum over its pseudo-header (a UDP checksum of 0,
/// "none", is accepted).
fn checked_l4(ip: &Ipv4HeaderSlice, l4: &[u8], what: &str) {
    let proto = ip.protocol().0;
    let len = usize::from(ip.total_len()) - ip.slice().len();
    assert_eq!(l4.len(), len, "{what}: whole segment present");
    if proto == IPPROTO_UDP && l4[6..8] == [0, 0] {
        return;
    }
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip.source());
    pseudo.extend_from_slice(&ip.destination());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    assert_eq!(
        ones_complement_sum(&pseudo),
        0xffff,
        "{what}: TCP/UDP checksum"
    );
}

/// A translated error, checked: outer and ICMP checksums right, ICMP type, code and rest of
/// header (the MTU) as sent, quoted IPv4 checksum right. Returns the outer source and
/// destination and the quote.
fn checked_error(sent: &[u8], out: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    assert_eq!(out.len(), sent.len(), "length unchanged");
    assert_eq!(out[..14], sent[..14], "Ethernet header unchanged");
    let (ip, icmp) = checked_ipv4(&out[14..], "outer");
    assert_eq!(ip.protocol().0, 1, "still ICMP");
    assert_eq!(ones_complement_sum(icmp), 0xffff, "ICMP checksum");
    let sent_icmp = &sent[14 + 20..];
    assert_eq!(icmp[0..2], sent_icmp[0..2], "ICMP type and code unchanged");
    assert_eq!(
        icmp[4..8],
        sent_icmp[4..8],
        "rest of ICMP header (MTU) unchanged"
    );
    let quote = icmp[8..].to_vec();
    checked_ipv4(&quote, "quoted");
    (ip.source_addr(), ip.destination_addr(), quote)
}

/// One flow through the XDP program: the client's packet and the backend's reply as they
/// leave the node (translated), and what the client and backend sent.
struct Flow {
    /// From the client, as sent and as forwarded to the backend.
    request: Vec<u8>,
    forwarded: Vec<u8>,
    /// From the backend, as sent and as delivered to the client.
    reply: Vec<u8>,
    delivered: Vec<u8>,
}

fn flow(
    fx: &Fixture,
    proto: u8,
    (client, sport): (Ipv4Addr, u16),
    (frontend, fport): (Ipv4Addr, u16),
) -> Flow {
    let request = packet(proto, client, sport, frontend, fport);
    let (verdict, forwarded) = fx.run_xdp(&request);
    assert_eq!(verdict, XDP_PASS);
    let fwd = tuple(&forwarded);
    assert_eq!(fwd.dst, BACKEND, "forwarded to the backend");
    let reply = packet(proto, fwd.dst, fwd.dport, fwd.src, fwd.sport);
    let (verdict, delivered) = fx.run_xdp(&reply);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        tuple(&delivered),
        Tuple {
            src: frontend,
            sport: fport,
            dst: client,
            dport: sport
        },
        "reply reverse-translated"
    );
    Flow {
        request,
        forwarded,
        reply,
        delivered,
    }
}

/// Direction (a): the backend (or `router`) raises `kind` about the forwarded packet; the
/// client must get it from the frontend (or the router), quoting its own packet exactly.
fn error_about_request(fx: &Fixture, f: &Flow, router: Option<Ipv4Addr>, kind: (u8, u8, [u8; 4])) {
    let fwd = tuple(&f.forwarded);
    let req = tuple(&f.request);
    let raiser = router.unwrap_or(fwd.dst);
    let error = icmp_error(raiser, fwd.src, kind, &f.forwarded, usize::MAX);
    let before = fx.stat(stat::ICMP_ERROR_TO_CLIENT);
    let (verdict, out) = fx.run_xdp(&error);
    assert_eq!(verdict, XDP_PASS);
    let (src, dst, quote) = checked_error(&error, &out);
    assert_eq!(src, router.unwrap_or(req.dst), "outer source");
    assert_eq!(dst, req.src, "outer destination: the client");
    assert_eq!(quote, f.request[14..], "quote: the client's packet as sent");
    let (ip, l4) = checked_ipv4(&quote, "quoted");
    checked_l4(&ip, l4, "quoted");
    assert_eq!(fx.stat(stat::ICMP_ERROR_TO_CLIENT), before + 1);
}

/// Direction (b): the client (or `router`) raises `kind` about the delivered reply; the
/// backend must get it from the client (or its masquerade address, or the router), quoting
/// its own reply exactly.
fn error_about_reply(fx: &Fixture, f: &Flow, router: Option<Ipv4Addr>, kind: (u8, u8, [u8; 4])) {
    let fwd = tuple(&f.forwarded);
    let del = tuple(&f.delivered);
    let raiser = router.unwrap_or(del.dst);
    let error = icmp_error(raiser, del.src, kind, &f.delivered, usize::MAX);
    let before = fx.stat(stat::ICMP_ERROR_TO_BACKEND);
    let (verdict, out) = fx.run_xdp(&error);
    assert_eq!(verdict, XDP_PASS);
    let (src, dst, quote) = checked_error(&error, &out);
    assert_eq!(src, router.unwrap_or(fwd.src), "outer source");
    assert_eq!(dst, BACKEND, "outer destination: the backend");
    assert_eq!(quote, f.reply[14..], "quote: the backend's reply as sent");
    let (ip, l4) = checked_ipv4(&quote, "quoted");
    checked_l4(&ip, l4, "quoted");
    assert_eq!(fx.stat(stat::ICMP_ERROR_TO_BACKEND), before + 1);
}

#[test]
fn icmp_frag_needed_from_backend_reaches_pod_client_from_cluster_ip_tcp() {
    let Some(fx) = fixture("icmp_frag_needed_from_backend_tcp") else {
        return;
    };
    let f = flow(&fx, IPPROTO_TCP, (CLIENT_POD, 40000), (VIP, 80));
    error_about_request(&fx, &f, None, frag_needed());
}

#[test]
fn icmp_port_unreachable_from_backend_reaches_pod_client_from_cluster_ip_udp() {
    let Some(fx) = fixture("icmp_port_unreach_from_backend_udp") else {
        return;
    };
    let f = flow(&fx, IPPROTO_UDP, (CLIENT_POD, 40001), (VIP, 53));
    error_about_request(&fx, &f, None, port_unreachable());
}

#[test]
fn icmp_frag_needed_from_backend_reaches_external_client_through_masquerade_tcp() {
    let Some(fx) = fixture("icmp_frag_needed_masq_tcp") else {
        return;
    };
    let f = flow(
        &fx,
        IPPROTO_TCP,
        (EXTERNAL, 40002),
        (NODE_IP, TCP_NODE_PORT),
    );
    assert_eq!(tuple(&f.forwarded).src, NODE_IP, "masqueraded");
    error_about_request(&fx, &f, None, frag_needed());
}

#[test]
fn icmp_port_unreachable_from_backend_reaches_external_client_through_masquerade_udp() {
    let Some(fx) = fixture("icmp_port_unreach_masq_udp") else {
        return;
    };
    let f = flow(
        &fx,
        IPPROTO_UDP,
        (EXTERNAL, 40003),
        (NODE_IP, UDP_NODE_PORT),
    );
    assert_eq!(tuple(&f.forwarded).src, NODE_IP, "masqueraded");
    error_about_request(&fx, &f, None, port_unreachable());
}

#[test]
fn icmp_time_exceeded_from_router_keeps_router_source_through_masquerade_tcp() {
    let Some(fx) = fixture("icmp_time_exceeded_router_masq_tcp") else {
        return;
    };
    let f = flow(
        &fx,
        IPPROTO_TCP,
        (EXTERNAL, 40004),
        (NODE_IP, TCP_NODE_PORT),
    );
    error_about_request(&fx, &f, Some(ROUTER), time_exceeded());
}

#[test]
fn icmp_frag_needed_from_pod_client_about_reply_reaches_backend_tcp() {
    let Some(fx) = fixture("icmp_frag_needed_about_reply_tcp") else {
        return;
    };
    let f = flow(&fx, IPPROTO_TCP, (CLIENT_POD, 40005), (VIP, 80));
    error_about_reply(&fx, &f, None, frag_needed());
}

#[test]
fn icmp_frag_needed_from_router_about_reply_reaches_backend_through_masquerade_tcp() {
    let Some(fx) = fixture("icmp_frag_needed_router_reply_masq_tcp") else {
        return;
    };
    let f = flow(
        &fx,
        IPPROTO_TCP,
        (EXTERNAL, 40006),
        (NODE_IP, TCP_NODE_PORT),
    );
    error_about_reply(&fx, &f, Some(ROUTER), frag_needed());
}

#[test]
fn icmp_port_unreachable_from_external_client_about_reply_reaches_backend_through_masquerade_udp() {
    let Some(fx) = fixture("icmp_port_unreach_about_reply_masq_udp") else {
        return;
    };
    let f = flow(
        &fx,
        IPPROTO_UDP,
        (EXTERNAL, 40007),
        (NODE_IP, UDP_NODE_PORT),
    );
    error_about_reply(&fx, &f, None, port_unreachable());
}

#[test]
fn icmp_time_exceeded_from_router_about_reply_reaches_backend_udp() {
    let Some(fx) = fixture("icmp_time_exceeded_router_reply_udp") else {
        return;
    };
    let f = flow(&fx, IPPROTO_UDP, (CLIENT_POD, 40008), (VIP, 53));
    error_about_reply(&fx, &f, Some(ROUTER), time_exceeded());
}

/// The minimum quote (IPv4 header + 8 bytes of TCP: ports and sequence number, not the
/// checksum) is translated; the quoted TCP checksum is not there to update (as nf_nat).
#[test]
fn icmp_error_with_minimal_tcp_quote_is_translated() {
    let Some(fx) = fixture("icmp_minimal_tcp_quote") else {
        return;
    };
    let f = flow(&fx, IPPROTO_TCP, (CLIENT_POD, 40009), (VIP, 80));
    let fwd = tuple(&f.forwarded);
    let error = icmp_error(BACKEND, fwd.src, frag_needed(), &f.forwarded, 28);
    let (verdict, out) = fx.run_xdp(&error);
    assert_eq!(verdict, XDP_PASS);
    let (src, dst, quote) = checked_error(&error, &out);
    assert_eq!((src, dst), (VIP, CLIENT_POD));
    assert_eq!(quote.len(), 28);
    // The client's own IPv4 header, ports and sequence number.
    assert_eq!(quote, f.request[14..14 + 28]);
    assert_eq!(fx.stat(stat::ICMP_ERROR_TO_CLIENT), 1);
}

/// The TC program (pod veths) runs the same stage: an error from a local backend pod about
/// a client's packet, and one from a local client pod about a reply.
#[test]
fn icmp_errors_translated_by_tc_both_directions() {
    let Some(fx) = fixture("icmp_errors_tc") else {
        return;
    };
    let f = flow(&fx, IPPROTO_UDP, (CLIENT_POD, 40010), (VIP, 53));
    // In a fresh network namespace the FIB has no route, so the TC program falls back to
    // the stack (TC_ACT_OK) instead of redirecting: the verdict is deterministic.
    // SAFETY: unshare only affects this test's thread.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET)"
    );
    let fwd = tuple(&f.forwarded);
    let error = icmp_error(
        BACKEND,
        fwd.src,
        port_unreachable(),
        &f.forwarded,
        usize::MAX,
    );
    let (verdict, out) = fx.run_tc(&error);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, quote) = checked_error(&error, &out);
    assert_eq!((src, dst), (VIP, CLIENT_POD));
    assert_eq!(quote, f.request[14..]);

    let error = icmp_error(CLIENT_POD, VIP, frag_needed(), &f.delivered, usize::MAX);
    let (verdict, out) = fx.run_tc(&error);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, quote) = checked_error(&error, &out);
    assert_eq!((src, dst), (CLIENT_POD, BACKEND));
    assert_eq!(quote, f.reply[14..]);
    assert_eq!(fx.stat(stat::ICMP_ERROR_TO_CLIENT), 1);
    assert_eq!(fx.stat(stat::ICMP_ERROR_TO_BACKEND), 1);
}

/// A quote with fewer than 8 bytes of TCP has no ports to find the flow by: passed
/// untouched and counted.
#[test]
fn icmp_error_with_short_quote_passes_untouched() {
    let Some(fx) = fixture("icmp_short_quote") else {
        return;
    };
    let f = flow(&fx, IPPROTO_TCP, (CLIENT_POD, 40011), (VIP, 80));
    let fwd = tuple(&f.forwarded);
    for quote_len in [4, 20 + 4] {
        let error = icmp_error(BACKEND, fwd.src, frag_needed(), &f.forwarded, quote_len);
        let (verdict, out) = fx.run_xdp(&error);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, error, "untouched (quote of {quote_len} bytes)");
    }
    assert_eq!(fx.stat(stat::PASS_ICMP_SHORT_QUOTE), 2);
    assert_eq!(fx.stat(stat::ICMP_ERROR_TO_CLIENT), 0);
}

/// An error about a flow conntrack does not know is not ours: passed untouched and counted.
#[test]
fn icmp_error_about_unknown_flow_passes_untouched() {
    let Some(fx) = fixture("icmp_unknown_flow") else {
        return;
    };
    let _ = flow(&fx, IPPROTO_TCP, (CLIENT_POD, 40012), (VIP, 80));
    // Same client and backend, another port: never seen.
    let stranger = packet(IPPROTO_TCP, CLIENT_POD, 40013, BACKEND, 8080);
    let error = icmp_error(BACKEND, CLIENT_POD, frag_needed(), &stranger, usize::MAX);
    let (verdict, out) = fx.run_xdp(&error);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, error, "untouched");
    assert_eq!(fx.stat(stat::PASS_ICMP_UNKNOWN_FLOW), 1);
    assert_eq!(fx.stat(stat::ICMP_ERROR_TO_CLIENT), 0);
}

/// ICMP that is not an error (echo) quotes nothing: passed as before, as another protocol.
#[test]
fn icmp_echo_passes_as_other_protocol() {
    let Some(fx) = fixture("icmp_echo") else {
        return;
    };
    let mut echo = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(CLIENT_POD.octets(), VIP.octets(), 64)
        .icmpv4_raw(ICMP_ECHO, 0, [0, 1, 0, 1])
        .write(&mut echo, b"ping")
        .unwrap();
    let (verdict, out) = fx.run_xdp(&echo);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, echo);
    assert_eq!(fx.stat(stat::PASS_OTHER_PROTOCOL), 1);
}

/// `frame` with 4 bytes of IPv4 options (NOPs) added to its IPv4 header, checksum redone.
fn with_ip_options(frame: &[u8]) -> Vec<u8> {
    let mut v = frame[..14 + 20].to_vec();
    v.extend_from_slice(&[1, 1, 1, 1]);
    v.extend_from_slice(&frame[14 + 20..]);
    v[14] = 0x46;
    let tot_len = u16::from_be_bytes([v[16], v[17]]) + 4;
    v[16..18].copy_from_slice(&tot_len.to_be_bytes());
    v[24..26].copy_from_slice(&[0, 0]);
    let check = !ones_complement_sum(&v[14..14 + 24]);
    v[24..26].copy_from_slice(&check.to_be_bytes());
    v
}

/// The stage reads fixed offsets: an error whose outer or quoted IPv4 header has options is
/// passed untouched and counted, never mistranslated.
#[test]
fn icmp_error_with_ip_options_passes_untouched() {
    let Some(fx) = fixture("icmp_ip_options") else {
        return;
    };
    let f = flow(&fx, IPPROTO_TCP, (CLIENT_POD, 40014), (VIP, 80));
    let fwd = tuple(&f.forwarded);
    let plain = icmp_error(BACKEND, fwd.src, frag_needed(), &f.forwarded, usize::MAX);
    let quoting_options = icmp_error(
        BACKEND,
        fwd.src,
        frag_needed(),
        &with_ip_options(&f.forwarded),
        usize::MAX,
    );
    for error in [with_ip_options(&plain), quoting_options] {
        checked_ipv4(&error[14..], "sent");
        let (verdict, out) = fx.run_xdp(&error);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, error, "untouched");
    }
    assert_eq!(fx.stat(stat::PASS_ICMP_IP_OPTIONS), 2);
    assert_eq!(fx.stat(stat::ICMP_ERROR_TO_CLIENT), 0);
}
