//! Active reject (S10) through BPF_PROG_TEST_RUN: a service without endpoints answers TCP
//! with a RST and UDP with an ICMP port unreachable, sent back where the packet came from
//! (XDP_TX; for TC a redirect to the ingress device). Real programs in the real kernel, maps
//! seeded by the agent's own writer, answers parsed by etherparse with every checksum
//! verified. One behaviour per test.
mod common;

use std::net::Ipv4Addr;

use common::{Fixture, NODE_IP};
use etherparse::{
    icmpv4::DestUnreachableHeader, Icmpv4Type, IpNumber, Ipv4Header, Ipv4HeaderSlice, LinkSlice,
    NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice, UdpHeaderSlice,
};
use lb_common::{stat, ServiceKey, IPPROTO_TCP, IPPROTO_UDP, SVC_F_EXTERNAL};
use xlb::model::{DesiredState, Frontend, FrontendKind};

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
/// What bpf_redirect() returns, and so the TC program.
const TC_ACT_REDIRECT: u32 = 7;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// ClusterIP VIP:81/TCP, NodePort NODE_IP:30081/TCP and ClusterIP VIP:54/UDP: all without
/// endpoints.
const TCP_PORT: u16 = 81;
const NODE_PORT: u16 = 30081;
const UDP_PORT: u16 = 54;

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// A loaded datapath (tests/common) with the services without endpoints programmed.
fn fixture(test: &str) -> Option<Fixture> {
    let mut fx = Fixture::load(test)?;
    let mut desired = DesiredState::default();
    for set in ["default/empty:81/TCP", "default/empty:54/UDP"] {
        desired.backend_sets.insert(set.into(), vec![]);
    }
    desired.frontends.insert(
        ServiceKey::new(VIP, TCP_PORT, IPPROTO_TCP),
        Frontend::new("default/empty:81/TCP", FrontendKind::ClusterIp, 0),
    );
    desired.frontends.insert(
        ServiceKey::new(NODE_IP, NODE_PORT, IPPROTO_TCP),
        Frontend::new(
            "default/empty:81/TCP",
            FrontendKind::NodePort,
            SVC_F_EXTERNAL,
        ),
    );
    desired.frontends.insert(
        ServiceKey::new(VIP, UDP_PORT, IPPROTO_UDP),
        Frontend::new("default/empty:54/UDP", FrontendKind::ClusterIp, 0),
    );
    fx.apply(&desired);
    Some(fx)
}

/// What a test sends: a TCP segment.
struct Segment {
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    seq: u32,
    /// Some(ack number) sets ACK.
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    /// MSS, window scale, SACK permitted: what a real client's SYN carries.
    options: bool,
    payload: &'static [u8],
}

impl Segment {
    fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            src,
            sport,
            dst,
            dport,
            seq: 1_000_000,
            ack: None,
            syn: true,
            fin: false,
            rst: false,
            options: true,
            payload: b"",
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(CLIENT_MAC, OUR_MAC)
            .ipv4(self.src.octets(), self.dst.octets(), 64)
            .tcp(self.sport, self.dport, self.seq, 64240);
        if self.syn {
            b = b.syn();
        }
        if self.fin {
            b = b.fin();
        }
        if self.rst {
            b = b.rst();
        }
        if let Some(ack) = self.ack {
            b = b.ack(ack);
        }
        if self.options {
            b = b
                .options(&[
                    TcpOptionElement::MaximumSegmentSize(1460),
                    TcpOptionElement::SelectiveAcknowledgementPermitted,
                    TcpOptionElement::WindowScale(7),
                ])
                .unwrap();
        }
        let mut v = Vec::new();
        b.write(&mut v, self.payload).unwrap();
        v
    }
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, OUR_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    v
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

/// The answer's Ethernet and IPv4 headers, checked against what every answer must be: back
/// to the sender's MAC from ours, from the address the sender targeted to the sender, no
/// IP options, TTL 64, ID 0, header checksum right.
fn check_reply_headers(answer: &SlicedPacket, sent: &SlicedPacket) -> Ipv4Header {
    let Some(LinkSlice::Ethernet2(eth)) = &answer.link else {
        panic!("answer is not Ethernet II")
    };
    assert_eq!(
        (eth.destination(), eth.source()),
        (CLIENT_MAC, OUR_MAC),
        "MAC addresses swapped"
    );
    let Some(NetSlice::Ipv4(ip)) = &answer.net else {
        panic!("answer is not IPv4")
    };
    let Some(NetSlice::Ipv4(sent_ip)) = &sent.net else {
        panic!("sent packet is not IPv4")
    };
    let h = ip.header().to_header();
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "IPv4 header checksum"
    );
    assert_eq!(
        (h.source, h.destination),
        (sent_ip.header().destination(), sent_ip.header().source()),
        "IP addresses swapped"
    );
    assert_eq!(ip.header().ihl(), 5, "no IP options");
    assert_eq!(h.time_to_live, 64);
    assert_eq!(h.identification, 0);
    h
}

/// A checked RST: everything but the sequence numbers and flags, which tests assert.
struct Reset {
    seq: u32,
    ack_seq: u32,
    ack: bool,
}

fn check_reset(sent: &[u8], answer: &[u8]) -> Reset {
    assert_eq!(answer.len(), 54, "Ethernet + IPv4 + TCP, nothing more");
    let sent = SlicedPacket::from_ethernet(sent).unwrap();
    let p = SlicedPacket::from_ethernet(answer).expect("answer parses");
    let ip = check_reply_headers(&p, &sent);
    assert_eq!(ip.protocol, IpNumber::TCP);
    assert_eq!(ip.total_len, 40);
    assert!(ip.dont_fragment, "DF");
    let Some(TransportSlice::Tcp(sent_tcp)) = &sent.transport else {
        panic!("sent packet is not TCP")
    };
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!("answer is not TCP")
    };
    let expected = t.to_header().calc_checksum_ipv4(&ip, t.payload()).unwrap();
    assert_eq!(t.checksum(), expected, "TCP checksum");
    assert_eq!(
        (t.source_port(), t.destination_port()),
        (sent_tcp.destination_port(), sent_tcp.source_port()),
        "ports swapped"
    );
    assert!(t.rst(), "RST");
    assert!(
        !t.syn() && !t.fin() && !t.psh() && !t.urg(),
        "only RST (and ACK)"
    );
    assert_eq!(t.data_offset(), 5, "no TCP options");
    assert_eq!((t.window_size(), t.urgent_pointer()), (0, 0));
    assert!(t.payload().is_empty());
    Reset {
        seq: t.sequence_number(),
        ack_seq: t.acknowledgment_number(),
        ack: t.ack(),
    }
}

/// Checks a port unreachable for `sent` in full.
fn check_port_unreachable(sent: &[u8], answer: &[u8]) {
    assert_eq!(
        answer.len(),
        14 + 20 + 8 + 28,
        "Ethernet + IPv4 + ICMP + original IPv4 header + 8 bytes"
    );
    let sent_p = SlicedPacket::from_ethernet(sent).unwrap();
    let p = SlicedPacket::from_ethernet(answer).expect("answer parses");
    let ip = check_reply_headers(&p, &sent_p);
    assert_eq!(ip.protocol, IpNumber::ICMP);
    assert_eq!(ip.total_len, 56);
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!("answer is not ICMP")
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        "type 3 code 3"
    );
    assert_eq!(&icmp.slice()[4..8], &[0, 0, 0, 0], "unused word");
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload()),
        "ICMP checksum"
    );
    assert_eq!(
        ones_complement_sum(icmp.slice()),
        0xffff,
        "ICMP checksum (RFC 1071)"
    );
    // The quote: the original IPv4 header and UDP header, byte for byte.
    let quote = icmp.payload();
    assert_eq!(quote, &sent[14..42], "quoted original headers");
    let quoted_ip = Ipv4HeaderSlice::from_slice(quote).expect("quoted IPv4 header");
    let quoted_udp = UdpHeaderSlice::from_slice(&quote[20..]).expect("quoted UDP header");
    let Some(NetSlice::Ipv4(sent_ip)) = &sent_p.net else {
        unreachable!()
    };
    let Some(TransportSlice::Udp(sent_udp)) = &sent_p.transport else {
        panic!("sent packet is not UDP")
    };
    assert_eq!(
        (quoted_ip.source_addr(), quoted_ip.destination_addr()),
        (
            sent_ip.header().source_addr(),
            sent_ip.header().destination_addr()
        )
    );
    assert_eq!(
        (quoted_udp.source_port(), quoted_udp.destination_port()),
        (sent_udp.source_port(), sent_udp.destination_port())
    );
}

#[test]
fn xdp_tcp_syn_to_service_without_endpoints_gets_rst() {
    let Some(fx) = fixture("xdp_tcp_syn_to_service_without_endpoints_gets_rst") else {
        return;
    };
    // ClusterIP from a pod, and NodePort from outside with data on the SYN (TCP Fast Open):
    // SEG.LEN counts the SYN and the data.
    let cases = [
        (Segment::syn(CLIENT_POD, 40000, VIP, TCP_PORT), 1),
        (
            Segment {
                payload: b"hello",
                ..Segment::syn(EXTERNAL, 40001, NODE_IP, NODE_PORT)
            },
            1 + 5,
        ),
    ];
    for (segment, seg_len) in cases {
        let sent = segment.bytes();
        let (verdict, out) = fx.run_xdp(&sent);
        assert_eq!(verdict, XDP_TX, "sent back out of the uplink");
        let rst = check_reset(&sent, &out);
        assert!(rst.ack, "RST|ACK");
        assert_eq!(rst.seq, 0);
        assert_eq!(rst.ack_seq, segment.seq + seg_len);
    }
    assert_eq!(
        fx.nonzero_stats(),
        vec![("reject_tcp_reset", 2)],
        "counted as resets, nothing else"
    );
}

#[test]
fn xdp_tcp_ack_segment_without_endpoints_gets_rst_with_its_ack_as_seq() {
    let Some(fx) = fixture("xdp_tcp_ack_segment_without_endpoints_gets_rst_with_its_ack_as_seq")
    else {
        return;
    };
    // A data segment of a connection whose endpoints went away.
    let segment = Segment {
        seq: 4_000_000_000,
        ack: Some(77_777),
        syn: false,
        options: false,
        payload: b"GET / HTTP/1.1\r\n\r\n",
        ..Segment::syn(CLIENT_POD, 40002, VIP, TCP_PORT)
    };
    let sent = segment.bytes();
    let (verdict, out) = fx.run_xdp(&sent);
    assert_eq!(verdict, XDP_TX);
    let rst = check_reset(&sent, &out);
    assert!(!rst.ack, "RST alone");
    assert_eq!(rst.seq, 77_777, "seq = the segment's ack");
    assert_eq!(rst.ack_seq, 0);
    assert_eq!(fx.stat(stat::REJECT_TCP_RESET), 1);
}

#[test]
fn xdp_udp_to_service_without_endpoints_gets_icmp_port_unreachable() {
    let Some(fx) = fixture("xdp_udp_to_service_without_endpoints_gets_icmp_port_unreachable")
    else {
        return;
    };
    for payload in [&b"query"[..], &[0x5a; 1200][..]] {
        let sent = udp(CLIENT_POD, 5000, VIP, UDP_PORT, payload);
        let (verdict, out) = fx.run_xdp(&sent);
        assert_eq!(verdict, XDP_TX, "sent back out of the uplink");
        check_port_unreachable(&sent, &out);
    }
    assert_eq!(fx.nonzero_stats(), vec![("reject_icmp_unreachable", 2)]);
}

#[test]
fn xdp_rst_is_never_answered() {
    let Some(fx) = fixture("xdp_rst_is_never_answered") else {
        return;
    };
    let rst = Segment {
        syn: false,
        rst: true,
        options: false,
        ..Segment::syn(CLIENT_POD, 40003, VIP, TCP_PORT)
    };
    let rst_ack = Segment {
        ack: Some(5),
        syn: false,
        rst: true,
        options: false,
        ..Segment::syn(CLIENT_POD, 40004, VIP, TCP_PORT)
    };
    for segment in [rst, rst_ack] {
        assert_eq!(fx.run_xdp(&segment.bytes()).0, XDP_DROP);
    }
    assert_eq!(fx.nonzero_stats(), vec![("drop_no_backend", 2)]);
}

#[test]
fn tc_tcp_and_udp_rejects() {
    let Some(fx) = fixture("tc_tcp_and_udp_rejects") else {
        return;
    };
    // As in tests/datapath.rs: the TC tests run in a fresh network namespace. bpf_redirect
    // only records the target; BPF_PROG_TEST_RUN reports the verdict and sends nothing.
    // SAFETY: unshare only affects this test's thread.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET)"
    );
    // SYN with options: trimmed to a bare RST|ACK.
    let syn = Segment::syn(CLIENT_POD, 40005, VIP, TCP_PORT);
    let sent = syn.bytes();
    let (verdict, out) = fx.run_tc(&sent);
    assert_eq!(verdict, TC_ACT_REDIRECT, "bounced to the ingress device");
    let rst = check_reset(&sent, &out);
    assert!(rst.ack);
    assert_eq!((rst.seq, rst.ack_seq), (0, syn.seq + 1));
    // Data segment with ACK: its payload is dropped, its ack is the RST's seq.
    let data = Segment {
        ack: Some(123_456),
        syn: false,
        options: false,
        payload: &[0x42; 1000],
        ..Segment::syn(CLIENT_POD, 40006, VIP, TCP_PORT)
    };
    let sent = data.bytes();
    let (verdict, out) = fx.run_tc(&sent);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let rst = check_reset(&sent, &out);
    assert!(!rst.ack);
    assert_eq!(rst.seq, 123_456);
    // FIN without ACK: SEG.LEN counts the payload and the FIN.
    let fin = Segment {
        syn: false,
        fin: true,
        options: false,
        payload: b"bye",
        ..Segment::syn(EXTERNAL, 40007, NODE_IP, NODE_PORT)
    };
    let sent = fin.bytes();
    let (verdict, out) = fx.run_tc(&sent);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let rst = check_reset(&sent, &out);
    assert!(rst.ack);
    assert_eq!((rst.seq, rst.ack_seq), (0, fin.seq + 3 + 1));
    // UDP, short and long.
    for payload in [&b"query"[..], &[0x5a; 1200][..]] {
        let sent = udp(CLIENT_POD, 5001, VIP, UDP_PORT, payload);
        let (verdict, out) = fx.run_tc(&sent);
        assert_eq!(verdict, TC_ACT_REDIRECT, "bounced to the ingress device");
        check_port_unreachable(&sent, &out);
    }
    // A RST is still not answered.
    let rst = Segment {
        syn: false,
        rst: true,
        options: false,
        ..Segment::syn(CLIENT_POD, 40008, VIP, TCP_PORT)
    };
    assert_eq!(fx.run_tc(&rst.bytes()).0, 2, "TC_ACT_SHOT");
    assert_eq!(
        fx.nonzero_stats(),
        vec![
            ("drop_no_backend", 1),
            ("reject_icmp_unreachable", 2),
            ("reject_tcp_reset", 3),
        ]
    );
}

#[test]
fn xdp_ip_options_are_dropped_not_rejected() {
    let Some(fx) = fixture("xdp_ip_options_are_dropped_not_rejected") else {
        return;
    };
    for sent in [
        Segment::syn(CLIENT_POD, 40009, VIP, TCP_PORT).bytes(),
        udp(CLIENT_POD, 5002, VIP, UDP_PORT, b"query"),
    ] {
        let with_options = add_ip_options(&sent, &[1, 1, 1, 0]); // NOP NOP NOP EOL
        assert_eq!(with_options[14], 0x46, "IHL 6");
        assert_eq!(fx.run_xdp(&with_options).0, XDP_DROP);
    }
    assert_eq!(fx.nonzero_stats(), vec![("drop_reject_failed", 2)]);
}

/// `packet` with `options` (a multiple of 4 bytes) appended to its IPv4 header; lengths and
/// the header checksum fixed (the TCP/UDP checksum does not cover IP options).
fn add_ip_options(packet: &[u8], options: &[u8]) -> Vec<u8> {
    let (mut ip, rest) = Ipv4Header::from_slice(&packet[14..]).unwrap();
    let payload_len = ip.total_len - ip.header_len() as u16;
    ip.options = options.try_into().unwrap();
    ip.total_len = ip.header_len() as u16 + payload_len;
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = packet[..14].to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(rest);
    out
}
