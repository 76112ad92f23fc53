//! Conntrack lifecycle through BPF_PROG_TEST_RUN: TCP state per direction (embryonic until
//! the handshake completes, then established, closing, closed), the agent's garbage collector
//! run on the real maps with its own clock, SYN and ACK floods that must not evict
//! established flows, and port reuse by a direct connection. Real programs in the real kernel, maps seeded by the agent's own writer.
mod common;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use aya::maps::{HashMap, Map, MapData};
use common::Fixture;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_common::{
    ct_state, map_name, stat, Backend, FlowKey, FlowNat, ServiceKey, FLOW_F_REPLY, FLOW_F_SNAT,
    IPPROTO_TCP, IPPROTO_UDP,
};
use xlb::{
    bench::packets::tcp_frame,
    datapath::{
        conntrack_gc::{Collector, Timeouts},
        reader::{self, monotonic_ns},
    },
    model::{DesiredState, Frontend, FrontendKind},
};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The one backend, on another node; clients inside the cluster CIDR are not masqueraded.
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

/// ClusterIP VIP:80/TCP -> BACKEND:8080 and VIP:53/UDP -> BACKEND:5353.
fn fixture(test: &str) -> Option<Fixture> {
    let mut fx = Fixture::load(test)?;
    let mut desired = DesiredState::default();
    for (set, port) in [
        ("default/web:http/TCP", 8080),
        ("default/web:dns/UDP", 5353),
    ] {
        desired
            .backend_sets
            .insert(set.into(), vec![Backend::new(BACKEND, port, 0)]);
    }
    desired.frontends.insert(
        ServiceKey::new(VIP, 80, IPPROTO_TCP),
        Frontend::new("default/web:http/TCP", FrontendKind::ClusterIp, 0),
    );
    desired.frontends.insert(
        ServiceKey::new(VIP, 53, IPPROTO_UDP),
        Frontend::new("default/web:dns/UDP", FrontendKind::ClusterIp, 0),
    );
    fx.apply(&desired);
    Some(fx)
}

/// The client's segment to the service / the backend's segment back to the client.
fn to_service(port: u16, flags: u8) -> Vec<u8> {
    tcp_frame((CLIENT_POD, port), (VIP, 80), flags, b"")
}
fn from_backend(port: u16, flags: u8) -> Vec<u8> {
    tcp_frame((BACKEND, 8080), (CLIENT_POD, port), flags, b"")
}

/// (source, destination) of an output frame.
fn endpoints(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
    match p.transport.expect("transport") {
        TransportSlice::Tcp(t) => ((src, t.source_port()), (dst, t.destination_port())),
        TransportSlice::Udp(u) => ((src, u.source_port()), (dst, u.destination_port())),
        other => panic!("unexpected transport {other:?}"),
    }
}

/// Runs the client's segment and checks it went to the backend.
fn send(fx: &Fixture, port: u16, flags: u8) {
    let (verdict, out) = fx.run_xdp(&to_service(port, flags));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(endpoints(&out).1, (BACKEND, 8080), "client port {port}");
}

/// Runs the backend's segment and checks it was reverse-translated to the VIP.
fn answer(fx: &Fixture, port: u16, flags: u8) {
    let (verdict, out) = fx.run_xdp(&from_backend(port, flags));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(endpoints(&out).0, (VIP, 80), "reply to client port {port}");
}

/// A completed handshake on client port `port`.
fn handshake(fx: &Fixture, port: u16) {
    send(fx, port, SYN);
    answer(fx, port, SYN | ACK);
    send(fx, port, ACK);
}

/// The TCP state of each direction of the flow from CLIENT_POD:`port`: (original, reply).
fn states(fx: &Fixture, port: u16) -> Option<(&'static str, &'static str)> {
    let rows = fx.conntrack();
    let client = format!("{CLIENT_POD}:{port}");
    let original = rows
        .iter()
        .find(|r| r.direction == "original" && r.from == client)?;
    let reply = rows
        .iter()
        .find(|r| r.direction == "reply" && r.to == client)?;
    Some((original.state, reply.state))
}

#[test]
fn tcp_flow_is_embryonic_until_its_handshake_completes_then_closes_and_can_reopen() {
    let Some(fx) = fixture("ct_tcp_states") else {
        return;
    };
    send(&fx, 40000, SYN);
    assert_eq!(states(&fx, 40000), Some(("syn_sent", "syn_sent")));
    answer(&fx, 40000, SYN | ACK);
    assert_eq!(states(&fx, 40000), Some(("syn_sent", "syn_recv")));
    // A retransmitted SYN does not complete anything.
    send(&fx, 40000, SYN);
    assert_eq!(fx.stat(stat::CT_PROMOTED), 0);
    send(&fx, 40000, ACK);
    assert_eq!(states(&fx, 40000), Some(("established", "established")));
    assert_eq!(fx.stat(stat::CT_PROMOTED), 1);
    // Promotion moved the entries: one pair in total, and `xlb conntrack` says so.
    assert_eq!(fx.conntrack().len(), 2);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["conntrack", "--pin-path"])
        .arg(&fx.pin)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains("STATE") && table.contains("established"),
        "{table}"
    );
    assert!(
        table.contains("conntrack: 2 of 524288 established entries, 0 of 131072 embryonic"),
        "{table}"
    );
    send(&fx, 40000, FIN | ACK);
    assert_eq!(states(&fx, 40000), Some(("closing", "established")));
    answer(&fx, 40000, RST);
    assert_eq!(states(&fx, 40000), Some(("closing", "closed")));
    // S31: late segments of the closed flow are still translated, both ways, during the
    // closed grace (never sent on with the backend's address).
    answer(&fx, 40000, ACK);
    send(&fx, 40000, ACK);
    // A new SYN on the same 5-tuple starts a new connection, balanced afresh.
    send(&fx, 40000, SYN);
    assert_eq!(fx.stat(stat::CT_REOPENED), 1);
    assert_eq!(fx.stat(stat::FORWARD_NEW), 2);
    assert_eq!(states(&fx, 40000), Some(("syn_sent", "syn_sent")));
    assert_eq!(fx.conntrack().len(), 2);
}

/// Entries in (XLB_CT_V2, XLB_CT_NEW_V1), as the collector counts them (it expires nothing
/// this fresh).
fn table_sizes(fx: &Fixture) -> (u64, u64) {
    let mut gc = Collector::open(&fx.pin, Timeouts::default()).expect("collector");
    let s = gc.sweep(monotonic_ns()).unwrap();
    assert_eq!(s.expired_flows, 0);
    (s.established_entries, s.embryonic_entries)
}

#[test]
fn a_first_packet_without_syn_resumes_a_lost_flow_embryonic_until_the_backend_answers() {
    let Some(fx) = fixture("ct_mid_stream") else {
        return;
    };
    // A connection whose entries were lost (evicted, expired, older than the datapath)
    // resumes on its hash-chosen backend. It starts embryonic, like a SYN's flow, so that a
    // flood of lone ACKs cannot reach the established table.
    send(&fx, 40100, ACK);
    assert_eq!(states(&fx, 40100), Some(("syn_sent", "syn_sent")));
    assert_eq!(table_sizes(&fx), (0, 2));
    // The backend's plain ACK (no SYN-ACK: it has no handshake left) is found in the
    // embryonic table and reverse-translated; the client's next segment promotes the flow.
    answer(&fx, 40100, ACK);
    assert_eq!(states(&fx, 40100), Some(("syn_sent", "syn_recv")));
    send(&fx, 40100, ACK);
    assert_eq!(states(&fx, 40100), Some(("established", "established")));
    assert_eq!(table_sizes(&fx), (2, 0));
    assert_eq!(fx.stat(stat::CT_PROMOTED), 1);
    // Established: both directions translated from XLB_CT_V2 from now on.
    answer(&fx, 40100, ACK);
    send(&fx, 40100, ACK);
    assert_eq!(fx.stat(stat::FORWARD_NEW), 1);
    assert_eq!(fx.stat(stat::FORWARD_ESTABLISHED), 2);
    assert_eq!(fx.stat(stat::REVERSE_NAT), 2);
    // The trace such a lost flow leaves (how LRU evictions show).
    assert_eq!(fx.stat(stat::CT_NEW_WITHOUT_SYN), 1);

    // A backend that does not know the connection answers with a RST: translated (the
    // client learns), but the flow never becomes established and goes with the closed grace.
    send(&fx, 40101, ACK);
    answer(&fx, 40101, RST);
    send(&fx, 40101, ACK);
    assert_eq!(states(&fx, 40101), Some(("syn_sent", "closed")));
    assert_eq!(fx.stat(stat::CT_PROMOTED), 1);
    assert_eq!(table_sizes(&fx), (2, 2));
}

#[test]
fn a_million_acks_from_random_sources_leave_established_flows_in_place() {
    let Some(fx) = fixture("ct_ack_flood") else {
        return;
    };
    const ESTABLISHED: u16 = 1000;
    for i in 0..ESTABLISHED {
        handshake(&fx, 20000 + i);
    }
    // The flood: lone ACKs from random sources and ports, each of which resumes a flow.
    let mut ack = tcp_frame((Ipv4Addr::new(10, 244, 0, 1), 1), (VIP, 80), ACK, b"");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..1_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // 10.244.128.0/17: never CLIENT_POD.
        ack[26..30].copy_from_slice(&(0x0af4_8000u32 | (x as u32 & 0x7fff)).to_be_bytes());
        ack[34..36].copy_from_slice(&((x >> 32) as u16 | 1024).to_be_bytes());
        assert_eq!(fx.run_xdp(&ack).0, XDP_PASS);
    }
    assert!(fx.stat(stat::CT_NEW_WITHOUT_SYN) > 900_000);
    // The established table holds exactly the 1 000 flows; the flood stayed embryonic.
    let (established, embryonic) = table_sizes(&fx);
    assert_eq!(established, 2 * u64::from(ESTABLISHED));
    assert!(
        embryonic <= u64::from(lb_common::capacity::CONNTRACK_NEW),
        "{embryonic}"
    );
    let (clients, _) = tracked(&fx);
    for i in 0..ESTABLISHED {
        let client = format!("{CLIENT_POD}:{}", 20000 + i);
        assert_eq!(clients.get(&client), Some(&2), "{client}");
    }
    let before = fx.stat(stat::FORWARD_ESTABLISHED);
    let new_before = fx.stat(stat::FORWARD_NEW);
    for i in 0..ESTABLISHED {
        send(&fx, 20000 + i, ACK);
        answer(&fx, 20000 + i, ACK);
    }
    assert_eq!(
        fx.stat(stat::FORWARD_ESTABLISHED) - before,
        u64::from(ESTABLISHED)
    );
    assert_eq!(
        fx.stat(stat::FORWARD_NEW),
        new_before,
        "none was re-created"
    );
    assert_eq!(fx.stat(stat::DROP_CONNTRACK_FULL), 0);
}

/// A frame of CLIENT_POD:`port` straight to the backend (no frontend).
fn direct(port: u16, flags: u8) -> Vec<u8> {
    tcp_frame((CLIENT_POD, port), (BACKEND, 8080), flags, b"")
}

#[test]
fn a_direct_connection_reusing_the_port_of_a_closed_flow_is_not_captured_by_its_reply_entry() {
    let Some(fx) = fixture("ct_port_reuse_direct") else {
        return;
    };
    // CLIENT_POD:44000 -> VIP:80, balanced to BACKEND:8080, then reset. Its entries stay
    // for the closed grace.
    handshake(&fx, 44000);
    send(&fx, 44000, FIN | ACK);
    answer(&fx, 44000, RST);
    assert_eq!(states(&fx, 44000), Some(("closing", "closed")));
    // The client reuses port 44000 for a direct connection to BACKEND:8080. Its SYN (from
    // the client's veth: TC) passes untouched and forgets the old flow; the backend's
    // SYN-ACK (from the uplink: XDP) then reaches the client as the backend, not as the VIP.
    let syn = direct(44000, SYN);
    assert_eq!(fx.run_tc(&syn), (TC_ACT_OK, syn.clone()));
    assert_eq!(states(&fx, 44000), None);
    assert_eq!(fx.stat(stat::CT_REOPENED), 1);
    let syn_ack = from_backend(44000, SYN | ACK);
    assert_eq!(fx.run_xdp(&syn_ack), (XDP_PASS, syn_ack.clone()));
    let ack = direct(44000, ACK);
    assert_eq!(fx.run_tc(&ack), (TC_ACT_OK, ack.clone()));
    assert!(fx.conntrack().is_empty());

    // The same for an embryonic flow the backend refused (entries in XLB_CT_NEW_V1), and
    // the backend's RST to the direct SYN: the client must see its connection refused.
    send(&fx, 44001, SYN);
    answer(&fx, 44001, RST);
    assert_eq!(states(&fx, 44001), Some(("syn_sent", "closed")));
    let syn = direct(44001, SYN);
    assert_eq!(fx.run_xdp(&syn), (XDP_PASS, syn.clone()));
    let rst = from_backend(44001, RST | ACK);
    assert_eq!(fx.run_xdp(&rst), (XDP_PASS, rst.clone()));
    assert_eq!(fx.stat(stat::CT_REOPENED), 2);
    assert!(fx.conntrack().is_empty());

    // A live flow is left alone (docs/datapath.md, "Port reuse": a known limit), and a SYN
    // whose reverse is no reply entry forgets nothing.
    handshake(&fx, 44002);
    let syn = direct(44002, SYN);
    assert_eq!(fx.run_tc(&syn), (TC_ACT_OK, syn.clone()));
    let syn = direct(44003, SYN);
    assert_eq!(fx.run_tc(&syn), (TC_ACT_OK, syn.clone()));
    assert_eq!(states(&fx, 44002), Some(("established", "established")));
    assert_eq!(fx.stat(stat::CT_REOPENED), 2);
}

#[test]
fn the_nodes_own_syn_from_a_masquerade_port_forgets_the_closed_flow_that_held_it() {
    let Some(fx) = fixture("ct_port_reuse_masquerade") else {
        return;
    };
    // An external client, masqueraded to NODE_IP:port towards the backend.
    let external = (Ipv4Addr::new(172, 18, 0, 100), 45000);
    let (verdict, out) = fx.run_xdp(&tcp_frame(external, (VIP, 80), SYN, b""));
    assert_eq!(verdict, XDP_PASS);
    let (masq, to) = endpoints(&out);
    assert_eq!((masq.0, to), (common::NODE_IP, (BACKEND, 8080)));
    let reply = |flags| tcp_frame((BACKEND, 8080), masq, flags, b"");
    let (_, out) = fx.run_xdp(&reply(RST));
    assert_eq!(endpoints(&out), ((VIP, 80), external));
    assert_eq!(fx.conntrack().len(), 2);
    // A process on the node binds that port and connects to the backend: its SYN leaves
    // through the egress program, which forgets the closed flow, so the SYN-ACK is the
    // process's and not translated for the external client.
    let syn = tcp_frame(masq, (BACKEND, 8080), SYN, b"");
    assert_eq!(fx.run_tc_egress(&syn), (TC_ACT_OK, syn.clone()));
    assert_eq!(fx.stat(stat::CT_REOPENED), 1);
    assert!(fx.conntrack().is_empty());
    let syn_ack = reply(SYN | ACK);
    assert_eq!(fx.run_xdp(&syn_ack), (XDP_PASS, syn_ack.clone()));
}

/// Entries per client (address:port as the client sees it), and the total entry count.
fn tracked(fx: &Fixture) -> (BTreeMap<String, usize>, usize) {
    let rows = fx.conntrack();
    let mut clients = BTreeMap::new();
    for r in &rows {
        let client = if r.direction == "original" {
            &r.from
        } else {
            &r.to
        };
        *clients.entry(client.clone()).or_insert(0) += 1;
    }
    (clients, rows.len())
}

/// Both entries for each of CLIENT_POD's `ports`.
fn pairs(ports: &[u16]) -> BTreeMap<String, usize> {
    ports
        .iter()
        .map(|p| (format!("{CLIENT_POD}:{p}"), 2))
        .collect()
}

#[test]
fn collector_expires_flows_by_state_both_directions_together() {
    let Some(fx) = fixture("ct_collector") else {
        return;
    };
    // 41001 established, 41002 embryonic (SYN only), 41003 closed (RST), 41004 closing
    // (FIN), and a UDP flow from 41005.
    handshake(&fx, 41001);
    send(&fx, 41002, SYN);
    handshake(&fx, 41003);
    answer(&fx, 41003, RST);
    handshake(&fx, 41004);
    send(&fx, 41004, FIN | ACK);
    let udp = {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(CLIENT_POD.octets(), VIP.octets(), 64)
            .udp(41005, 53)
            .write(&mut v, b"query")
            .unwrap();
        v
    };
    assert_eq!(endpoints(&fx.run_xdp(&udp).1).1, (BACKEND, 5353));
    assert_eq!(tracked(&fx).0, pairs(&[41001, 41002, 41003, 41004, 41005]));

    let timeouts = Timeouts::default();
    let mut gc = Collector::open(&fx.pin, timeouts).expect("collector");
    let start = monotonic_ns();
    let at = |d: Duration| start + d.as_nanos() as u64;
    let s = gc.sweep(start).unwrap();
    assert_eq!((s.established_entries, s.embryonic_entries), (8, 2));
    assert_eq!(s.expired_flows, 0, "nothing is idle yet");
    // Just past the closed grace: only the reset flow goes, with both its entries.
    let s = gc
        .sweep(at(timeouts.tcp_closed + Duration::from_secs(1)))
        .unwrap();
    assert_eq!((s.expired_flows, s.deleted_entries), (1, 2));
    assert_eq!(tracked(&fx).0, pairs(&[41001, 41002, 41004, 41005]));
    // Past the UDP timeout.
    let s = gc.sweep(at(timeouts.udp + Duration::from_secs(1))).unwrap();
    assert_eq!((s.expired_flows, s.deleted_entries), (1, 2));
    assert_eq!(tracked(&fx).0, pairs(&[41001, 41002, 41004]));
    // Past the SYN and closing timeouts (both 120 s by default).
    let later = timeouts.tcp_syn.max(timeouts.tcp_closing) + Duration::from_secs(1);
    let s = gc.sweep(at(later)).unwrap();
    assert_eq!((s.expired_flows, s.deleted_entries), (2, 4));
    assert_eq!(tracked(&fx).0, pairs(&[41001]));
    // The established flow stays until its own (long) timeout.
    let s = gc
        .sweep(at(timeouts.tcp_established - Duration::from_secs(1)))
        .unwrap();
    assert_eq!(s.expired_flows, 0);
    let s = gc
        .sweep(at(timeouts.tcp_established + Duration::from_secs(1)))
        .unwrap();
    assert_eq!((s.expired_flows, s.deleted_entries), (1, 2));
    assert!(fx.conntrack().is_empty());
}

#[test]
fn collector_keeps_a_flow_whose_reply_direction_is_active() {
    let Some(fx) = fixture("ct_collector_reply_active") else {
        return;
    };
    // Tiny timeouts on the real clock: the client side goes quiet, the backend keeps
    // sending (e.g. a download), so the flow is alive.
    let timeouts = Timeouts {
        udp: Duration::from_millis(1500),
        ..Timeouts::default()
    };
    let udp = |src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src.0.octets(), dst.0.octets(), 64)
            .udp(src.1, dst.1)
            .write(&mut v, b"data")
            .unwrap();
        v
    };
    fx.run_xdp(&udp((CLIENT_POD, 42000), (VIP, 53)));
    let mut gc = Collector::open(&fx.pin, timeouts).expect("collector");
    // The reply entry's last_seen is refreshed at most once a second: run replies for
    // longer than the timeout, then sweep at a time the original side alone would expire.
    let start = monotonic_ns();
    while monotonic_ns() - start < 2_200_000_000 {
        let out = fx.run_xdp(&udp((BACKEND, 5353), (CLIENT_POD, 42000))).1;
        assert_eq!(endpoints(&out).0, (VIP, 53));
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = gc.sweep(monotonic_ns()).unwrap();
    assert_eq!(s.expired_flows, 0, "{s:?}");
    assert_eq!(tracked(&fx).0, pairs(&[42000]));
    // Once both sides are quiet for longer than the timeout, it goes.
    let s = gc.sweep(monotonic_ns() + 3_000_000_000).unwrap();
    assert_eq!((s.expired_flows, s.deleted_entries), (1, 2));
}

#[test]
fn a_million_syns_from_random_sources_leave_established_flows_in_place() {
    let Some(fx) = fixture("ct_syn_flood") else {
        return;
    };
    const ESTABLISHED: u16 = 1000;
    for i in 0..ESTABLISHED {
        handshake(&fx, 20000 + i);
    }
    assert_eq!(fx.stat(stat::CT_PROMOTED), u64::from(ESTABLISHED));
    // The flood: SYNs from random sources and ports (inside the cluster CIDR, so none is
    // refused for want of a masquerade port). Only the source bytes change; the datapath
    // does not verify checksums.
    let mut syn = tcp_frame((Ipv4Addr::new(10, 244, 0, 1), 1), (VIP, 80), SYN, b"");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..1_000_000 {
        // xorshift64: a cheap, reproducible stream of sources.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // 10.244.128.0/17: never CLIENT_POD.
        syn[26..30].copy_from_slice(&(0x0af4_8000u32 | (x as u32 & 0x7fff)).to_be_bytes());
        syn[34..36].copy_from_slice(&((x >> 32) as u16 | 1024).to_be_bytes());
        assert_eq!(fx.run_xdp(&syn).0, XDP_PASS);
    }
    let entries = reader::conntrack_entries(&fx.pin).unwrap();
    let embryonic = entries
        .iter()
        .filter(|(_, v)| v.state < ct_state::ESTABLISHED)
        .count();
    assert!(
        embryonic <= lb_common::capacity::CONNTRACK_NEW as usize,
        "{embryonic}"
    );
    // Every established flow still has both entries, and its next packets are still
    // translated as established (not balanced as new flows).
    let (clients, _) = tracked(&fx);
    for i in 0..ESTABLISHED {
        let client = format!("{CLIENT_POD}:{}", 20000 + i);
        assert_eq!(clients.get(&client), Some(&2), "{client}");
    }
    let before = fx.stat(stat::FORWARD_ESTABLISHED);
    let new_before = fx.stat(stat::FORWARD_NEW);
    for i in 0..ESTABLISHED {
        send(&fx, 20000 + i, ACK);
    }
    assert_eq!(
        fx.stat(stat::FORWARD_ESTABLISHED) - before,
        u64::from(ESTABLISHED)
    );
    assert_eq!(fx.stat(stat::FORWARD_NEW), new_before);
    assert_eq!(fx.stat(stat::CT_NEW_WITHOUT_SYN), 0, "no flow was lost");
    assert_eq!(fx.stat(stat::DROP_CONNTRACK_FULL), 0);
}

#[test]
fn s31_an_out_of_window_reply_is_still_translated_never_sent_on_with_the_backend_address() {
    let Some(fx) = fixture("ct_out_of_window") else {
        return;
    };
    handshake(&fx, 43000);
    // The datapath does not judge sequence numbers (docs/datapath.md, S31): a reply far
    // outside any window is reverse-translated like any other, and the client's TCP stack
    // decides. What must never happen is that it leaves with the backend's address.
    for (seq, flags) in [(0xdead_beef_u32, ACK), (7, ACK | FIN), (0x8000_0000, RST)] {
        let mut frame = Vec::new();
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(BACKEND.octets(), CLIENT_POD.octets(), 64)
            .tcp(8080, 43000, seq, 1)
            .ack(0x1234_5678);
        let b = if flags & FIN != 0 { b.fin() } else { b };
        let b = if flags & RST != 0 { b.rst() } else { b };
        b.write(&mut frame, b"late").unwrap();
        let (verdict, out) = fx.run_xdp(&frame);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(
            endpoints(&out),
            ((VIP, 80), (CLIENT_POD, 43000)),
            "seq {seq:#x}"
        );
    }
    assert_eq!(states(&fx, 43000), Some(("established", "closed")));
    assert_eq!(fx.stat(stat::REVERSE_NAT), 4);
}

/// Found by the fuzz test (`datapath_fuzz`): masquerade ports were tried at a fixed stride
/// from the flow's hash, so the tries of different flows overlapped as in linear
/// probing (primary clustering) and a new flow found its 8 ports taken while a fifth of the
/// backend's port range was in use — and since its tries depend only on its 5-tuple, so did
/// each of its retries. Here the ports that stride would try are all taken: the flow must
/// still get one of the free ports.
#[test]
fn a_masquerade_port_is_found_when_the_ports_of_a_fixed_stride_are_taken() {
    let Some(fx) = fixture("snat_probe") else {
        return;
    };
    let external = Ipv4Addr::new(172, 18, 0, 100);
    let flow = FlowKey::new(external, 40000, VIP, 53, IPPROTO_UDP);
    let range = 65535 - 61000 + 1;
    let start = flow.hash() % range;
    let stride: Vec<u16> = (0..8)
        .map(|i| (61000 + (start + i * 7919) % range) as u16)
        .collect();
    // Other flows' reply entries hold those ports towards the backend.
    let data = MapData::from_pin(fx.pin.join(map_name::CONNTRACK)).expect("pinned conntrack");
    let mut ct: HashMap<MapData, FlowKey, FlowNat> =
        HashMap::try_from(Map::LruHashMap(data)).expect("conntrack map");
    for (i, port) in stride.iter().enumerate() {
        let other = FlowKey::new(BACKEND, 5353, common::NODE_IP, *port, IPPROTO_UDP);
        let nat = FlowNat {
            saddr: u32::from(VIP).to_be(),
            daddr: u32::from(Ipv4Addr::new(172, 18, 1, i as u8)).to_be(),
            sport: 53u16.to_be(),
            dport: 40000u16.to_be(),
            flags: FLOW_F_REPLY | FLOW_F_SNAT,
            backend_set: 0,
            state: ct_state::NONE,
            _pad: [0; 3],
            last_seen_ns: monotonic_ns(),
        };
        ct.insert(other, nat, 0).expect("insert a reply entry");
    }
    let (verdict, out) = fx.run_xdp(&udp_frame((external, 40000), (VIP, 53)));
    assert_eq!(
        fx.stat(stat::DROP_SNAT_EXHAUSTED),
        0,
        "8 busy ports out of 4536 refused a flow"
    );
    assert_eq!(verdict, XDP_PASS);
    let (src, dst) = endpoints(&out);
    assert_eq!(dst, (BACKEND, 5353));
    assert_eq!(src.0, common::NODE_IP, "masqueraded");
    assert!(
        (61000..=65535).contains(&src.1) && !stride.contains(&src.1),
        "port {} is free and in the range",
        src.1
    );
}

/// A UDP datagram from `src` to `dst` with a right checksum.
fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut v, b"query")
        .unwrap();
    v
}
