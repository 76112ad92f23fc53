//! IP fragments of service flows (S06, UDP half) through BPF_PROG_TEST_RUN: a 2000-byte UDP
//! datagram crosses a 1500-byte MTU as two fragments; the first (with the UDP header) is
//! balanced and translated, the second gets the same address rewrite. Real programs in the
//! real kernel, maps seeded by the agent's own writer; the output fragments are reassembled
//! here and the UDP checksum of the whole datagram is verified with etherparse, as is each
//! fragment's IPv4 header checksum.
mod common;

use std::net::Ipv4Addr;

use common::{Fixture, NODE_IP};
use etherparse::{Ipv4HeaderSlice, PacketBuilder, UdpHeaderSlice};
use lb_common::{stat, Backend, ServiceKey, IPPROTO_UDP, SVC_F_EXTERNAL};
use xlb::model::{DesiredState, Frontend, FrontendKind};

const XDP_PASS: u32 = 2;
/// What bpf_redirect_neigh() returns (TC sends translated packets on by a FIB redirect);
/// TC_ACT_OK when the test kernel's FIB has no route for the destination.
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_OK: u32 = 0;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// The one backend, on another node (so NodePort traffic is masqueraded).
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const NODE_PORT: u16 = 30053;
/// UDP payload: with the 8-byte UDP header, 2008 bytes of IP payload = 1480 + 528.
const PAYLOAD_LEN: usize = 2000;
const FIRST_FRAGMENT_LEN: usize = 1480;

/// ClusterIP VIP:53/UDP and NodePort NODE_IP:30053/UDP -> BACKEND:5353.
fn fixture(test: &str) -> Option<Fixture> {
    let mut fx = Fixture::load(test)?;
    let mut desired = DesiredState::default();
    desired.backend_sets.insert(
        "default/dns:dns/UDP".into(),
        vec![Backend::new(BACKEND, 5353, 0)],
    );
    desired.frontends.insert(
        ServiceKey::new(VIP, 53, IPPROTO_UDP),
        Frontend::new("default/dns:dns/UDP", FrontendKind::ClusterIp, 0),
    );
    desired.frontends.insert(
        ServiceKey::new(NODE_IP, NODE_PORT, IPPROTO_UDP),
        Frontend::new(
            "default/dns:dns/UDP",
            FrontendKind::NodePort,
            SVC_F_EXTERNAL,
        ),
    );
    fx.apply(&desired);
    Some(fx)
}

/// A UDP datagram of PAYLOAD_LEN bytes (a varying pattern, so a misplaced byte would break
/// the checksum) split into two IPv4 fragments with identification `id`, as Linux sends it
/// through a 1500-byte MTU.
fn fragments(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, id: u16) -> [Vec<u8>; 2] {
    let payload: Vec<u8> = (0..PAYLOAD_LEN).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut whole = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut whole, &payload)
        .unwrap();
    let (eth_ip, ip_payload) = whole.split_at(14 + 20);
    assert_eq!(ip_payload.len(), 8 + PAYLOAD_LEN);
    let fragment = |data: &[u8], offset_bytes: usize, more: bool| -> Vec<u8> {
        let mut packet = eth_ip.to_vec();
        packet.extend_from_slice(data);
        let ip = &mut packet[14..34];
        ip[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = if more { 0x2000 } else { 0 } | (offset_bytes / 8) as u16;
        ip[6..8].copy_from_slice(&flags.to_be_bytes());
        set_ip_checksum(&mut packet);
        packet
    };
    let (first, rest) = ip_payload.split_at(FIRST_FRAGMENT_LEN);
    [
        fragment(first, 0, true),
        fragment(rest, FIRST_FRAGMENT_LEN, false),
    ]
}

fn set_ip_checksum(packet: &mut [u8]) {
    packet[24..26].copy_from_slice(&[0, 0]);
    let header = Ipv4HeaderSlice::from_slice(&packet[14..34])
        .unwrap()
        .to_header();
    packet[24..26].copy_from_slice(&header.calc_header_checksum().to_be_bytes());
}

/// One output fragment: addresses, IP id, fragment offset in bytes, and its IP payload,
/// after checking the IPv4 header checksum.
struct Fragment {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    offset: usize,
    payload: Vec<u8>,
}

fn fragment_checked(packet: &[u8]) -> Fragment {
    let ip = Ipv4HeaderSlice::from_slice(&packet[14..]).expect("IPv4 header");
    let header = ip.to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 header checksum"
    );
    Fragment {
        src: ip.source_addr(),
        dst: ip.destination_addr(),
        id: ip.identification(),
        offset: usize::from(ip.fragments_offset().value()) * 8,
        payload: packet[14 + 20..14 + usize::from(ip.total_len())].to_vec(),
    }
}

/// The datagram the receiver reassembles from two output fragments: both must carry the
/// same addresses and id; the UDP checksum is verified over the whole datagram. Returns
/// (source, source port, destination, destination port).
fn reassembled(first: &[u8], second: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let (a, b) = (fragment_checked(first), fragment_checked(second));
    assert_eq!((a.src, a.dst, a.id), (b.src, b.dst, b.id), "same datagram");
    assert_eq!((a.offset, b.offset), (0, FIRST_FRAGMENT_LEN));
    let mut datagram = a.payload;
    datagram.extend_from_slice(&b.payload);
    let udp = UdpHeaderSlice::from_slice(&datagram).unwrap().to_header();
    assert_eq!(usize::from(udp.length), datagram.len());
    let expected = udp
        .calc_checksum_ipv4_raw(a.src.octets(), a.dst.octets(), &datagram[8..])
        .unwrap();
    assert_eq!(udp.checksum, expected, "UDP checksum of the whole datagram");
    (a.src, udp.source_port, a.dst, udp.destination_port)
}

#[test]
fn xdp_fragments_of_a_clusterip_datagram_and_of_its_reply_are_translated_together() {
    let Some(fx) = fixture("xdp_fragments_clusterip") else {
        return;
    };
    let [first, second] = fragments(CLIENT_POD, 40000, VIP, 53, 0x1234);
    let (v1, out1) = fx.run_xdp(&first);
    let (v2, out2) = fx.run_xdp(&second);
    assert_eq!((v1, v2), (XDP_PASS, XDP_PASS));
    assert_eq!(
        reassembled(&out1, &out2),
        (CLIENT_POD, 40000, BACKEND, 5353)
    );
    assert_eq!(fx.stat(stat::FORWARD_NEW), 1);
    assert_eq!(fx.stat(stat::FORWARD_FRAGMENT), 1);
    // The backend answers with a datagram as large: both fragments come back from the VIP.
    let [first, second] = fragments(BACKEND, 5353, CLIENT_POD, 40000, 0x0777);
    let (out1, out2) = (fx.run_xdp(&first).1, fx.run_xdp(&second).1);
    assert_eq!(reassembled(&out1, &out2), (VIP, 53, CLIENT_POD, 40000));
    assert_eq!(fx.stat(stat::REVERSE_NAT), 1);
    assert_eq!(fx.stat(stat::FORWARD_FRAGMENT), 2);
    assert_eq!(fx.stat(stat::PASS_FRAGMENT), 0);
}

#[test]
fn xdp_fragments_of_a_nodeport_datagram_are_masqueraded_together() {
    let Some(fx) = fixture("xdp_fragments_nodeport") else {
        return;
    };
    let [first, second] = fragments(EXTERNAL, 41000, NODE_IP, NODE_PORT, 0xbeef);
    let (out1, out2) = (fx.run_xdp(&first).1, fx.run_xdp(&second).1);
    let (src, sport, dst, dport) = reassembled(&out1, &out2);
    // Both addresses change, also in the second fragment.
    assert_eq!((src, dst, dport), (NODE_IP, BACKEND, 5353));
    assert!(sport >= 61000, "masquerade port {sport}");
    // The reply, fragmented as well, goes back to the external client from the NodePort.
    let [first, second] = fragments(BACKEND, 5353, NODE_IP, sport, 0x0101);
    let (out1, out2) = (fx.run_xdp(&first).1, fx.run_xdp(&second).1);
    assert_eq!(
        reassembled(&out1, &out2),
        (NODE_IP, NODE_PORT, EXTERNAL, 41000)
    );
    assert_eq!(fx.stat(stat::FORWARD_FRAGMENT), 2);
}

#[test]
fn tc_fragments_of_a_clusterip_datagram_are_translated_together() {
    let Some(fx) = fixture("tc_fragments_clusterip") else {
        return;
    };
    let [first, second] = fragments(CLIENT_POD, 40001, VIP, 53, 0x4321);
    let (v1, out1) = fx.run_tc(&first);
    let (v2, out2) = fx.run_tc(&second);
    for v in [v1, v2] {
        assert!(v == TC_ACT_REDIRECT || v == TC_ACT_OK, "verdict {v}");
    }
    assert_eq!(
        reassembled(&out1, &out2),
        (CLIENT_POD, 40001, BACKEND, 5353)
    );
    assert_eq!(fx.stat(stat::FORWARD_NEW), 1);
    assert_eq!(fx.stat(stat::FORWARD_FRAGMENT), 1);
}

#[test]
fn a_later_fragment_before_its_first_or_of_another_datagram_passes_untouched_and_is_counted() {
    let Some(fx) = fixture("fragments_out_of_order") else {
        return;
    };
    let [first, second] = fragments(CLIENT_POD, 40002, VIP, 53, 0x0042);
    // Overtook its first fragment: nothing to translate it by yet.
    assert_eq!(fx.run_xdp(&second), (XDP_PASS, second.clone()));
    assert_eq!(fx.stat(stat::PASS_FRAGMENT), 1);
    assert!(
        fx.conntrack().is_empty(),
        "a later fragment creates no flow"
    );
    // The first fragment is translated and recorded; a later fragment of another datagram
    // (other IP id) of the same flow still passes untouched, never mistranslated.
    let out1 = fx.run_xdp(&first).1;
    assert_eq!(fragment_checked(&out1).dst, BACKEND);
    let [_, other] = fragments(CLIENT_POD, 40002, VIP, 53, 0x0043);
    assert_eq!(fx.run_xdp(&other), (XDP_PASS, other.clone()));
    assert_eq!(fx.stat(stat::PASS_FRAGMENT), 2);
    // A retransmitted copy of the right later fragment now follows its first.
    let out2 = fx.run_xdp(&second).1;
    assert_eq!(
        reassembled(&out1, &out2),
        (CLIENT_POD, 40002, BACKEND, 5353)
    );
    assert_eq!(fx.stat(stat::FORWARD_FRAGMENT), 1);
}
