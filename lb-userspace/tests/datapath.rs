//! Datapath behaviour through BPF_PROG_TEST_RUN: real programs in the real kernel, maps
//! seeded by the agent's own writer, output parsed by an independent packet library
//! (etherparse) with checksums verified. One behaviour per test.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use common::{Fixture, NODE_IP};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{
    stat, Backend, ServiceKey, BACKEND_F_LOCAL, IPPROTO_TCP, IPPROTO_UDP, SVC_F_EXTERNAL,
};
use xlb::{
    datapath::reader,
    model::{DesiredState, Frontend, FrontendKind},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
/// What bpf_redirect() returns (a reject bounced to the ingress device).
const TC_ACT_REDIRECT: u32 = 7;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 3),
    Ipv4Addr::new(10, 244, 2, 2),
    Ipv4Addr::new(10, 244, 2, 3),
];
const NODE_PORT: u16 = 30080;

impl Fixture {
    /// Service web: ClusterIP VIP:80/TCP and NodePort 30080/TCP -> three backends on 8080
    /// (the first local), UDP VIP:53 -> 5353 on the same pods, and VIP:81 with none.
    fn with_web_service(self) -> Self {
        let backends = |port: u16| -> Vec<Backend> {
            BACKENDS
                .iter()
                .enumerate()
                .map(|(i, ip)| Backend::new(*ip, port, if i == 0 { BACKEND_F_LOCAL } else { 0 }))
                .collect()
        };
        let mut desired = DesiredState::default();
        desired
            .backend_sets
            .insert("default/web:http/TCP".into(), backends(8080));
        desired
            .backend_sets
            .insert("default/web:dns/UDP".into(), backends(5353));
        desired
            .backend_sets
            .insert("default/empty:81/TCP".into(), vec![]);
        let fe = |set: &str, kind, flags| Frontend::new(set, kind, flags);
        desired.frontends.insert(
            ServiceKey::new(VIP, 80, IPPROTO_TCP),
            fe("default/web:http/TCP", FrontendKind::ClusterIp, 0),
        );
        desired.frontends.insert(
            ServiceKey::new(NODE_IP, NODE_PORT, IPPROTO_TCP),
            fe(
                "default/web:http/TCP",
                FrontendKind::NodePort,
                SVC_F_EXTERNAL,
            ),
        );
        desired.frontends.insert(
            ServiceKey::new(VIP, 53, IPPROTO_UDP),
            fe("default/web:dns/UDP", FrontendKind::ClusterIp, 0),
        );
        desired.frontends.insert(
            ServiceKey::new(VIP, 81, IPPROTO_TCP),
            fe("default/empty:81/TCP", FrontendKind::ClusterIp, 0),
        );
        let mut this = self;
        this.apply(&desired);
        this
    }
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let payload = b"GET / HTTP/1.1\r\n\r\n";
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// A backend's answer to a SYN.
fn syn_ack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 5000, 64240)
        .syn()
        .ack(1001)
        .write(&mut v, &[])
        .unwrap();
    v
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut v, b"query")
        .unwrap();
    v
}

/// The parsed 4-tuple of an output packet, after checking both checksums.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Tuple {
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
}

fn parse_checked(bytes: &[u8]) -> Tuple {
    let p = SlicedPacket::from_ethernet(bytes).expect("output parses");
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        panic!("output is not IPv4")
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let payload = ip.payload().payload;
    match p.transport.expect("transport") {
        TransportSlice::Tcp(t) => {
            let expected = t
                .to_header()
                .calc_checksum_ipv4(&header, t.payload())
                .unwrap();
            assert_eq!(t.checksum(), expected, "TCP checksum");
            Tuple {
                src: header.source.into(),
                sport: t.source_port(),
                dst: header.destination.into(),
                dport: t.destination_port(),
            }
        }
        TransportSlice::Udp(u) => {
            let expected = u
                .to_header()
                .calc_checksum_ipv4(&header, &payload[8..])
                .unwrap();
            assert_eq!(u.checksum(), expected, "UDP checksum");
            Tuple {
                src: header.source.into(),
                sport: u.source_port(),
                dst: header.destination.into(),
                dport: u.destination_port(),
            }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

#[test]
fn xdp_dnat_new_flow_to_a_backend() {
    let Some(fx) = Fixture::load("xdp_dnat_new_flow_to_a_backend") else {
        return;
    };
    let fx = fx.with_web_service();
    let (verdict, out) = fx.run_xdp(&tcp(CLIENT_POD, 40000, VIP, 80, true));
    assert_eq!(verdict, XDP_PASS);
    let t = parse_checked(&out);
    assert!(
        BACKENDS.contains(&t.dst),
        "destination {} is not a backend",
        t.dst
    );
    assert_eq!(t.dport, 8080);
    // Pod -> ClusterIP keeps the pod's source (S16).
    assert_eq!((t.src, t.sport), (CLIENT_POD, 40000));
    assert_eq!(fx.stat(stat::FORWARD_NEW), 1);
    let ct = fx.conntrack();
    assert_eq!(ct.len(), 2, "one entry per direction: {ct:?}");
    let original = ct.iter().find(|r| r.direction == "original").unwrap();
    assert_eq!(original.to, format!("{VIP}:80"));
    assert_eq!(original.nat_to, format!("{}:8080", t.dst));
    let reply = ct.iter().find(|r| r.direction == "reply").unwrap();
    assert_eq!(reply.from, format!("{}:8080", t.dst));
    assert_eq!(reply.nat_from, format!("{VIP}:80"));
}

#[test]
fn xdp_same_flow_stays_on_its_backend() {
    let Some(fx) = Fixture::load("xdp_same_flow_stays_on_its_backend") else {
        return;
    };
    let fx = fx.with_web_service();
    let first = parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 40001, VIP, 80, true)).1);
    for _ in 0..5 {
        let (verdict, out) = fx.run_xdp(&tcp(CLIENT_POD, 40001, VIP, 80, false));
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(parse_checked(&out).dst, first.dst);
    }
    assert_eq!(fx.stat(stat::FORWARD_NEW), 1);
    assert_eq!(fx.stat(stat::FORWARD_ESTABLISHED), 5);
    // Many flows spread over all three backends.
    let chosen: BTreeSet<Ipv4Addr> = (0..60)
        .map(|i| parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 20000 + i, VIP, 80, true)).1).dst)
        .collect();
    assert_eq!(chosen.len(), 3, "flows reached {chosen:?}");
}

#[test]
fn xdp_reverse_nat_of_reply() {
    let Some(fx) = Fixture::load("xdp_reverse_nat_of_reply") else {
        return;
    };
    let fx = fx.with_web_service();
    let fwd = parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 40002, VIP, 80, true)).1);
    let (verdict, out) = fx.run_xdp(&syn_ack(fwd.dst, 8080, CLIENT_POD, 40002));
    assert_eq!(verdict, XDP_PASS);
    let back = parse_checked(&out);
    assert_eq!(
        back,
        Tuple {
            src: VIP,
            sport: 80,
            dst: CLIENT_POD,
            dport: 40002
        }
    );
    assert_eq!(fx.stat(stat::REVERSE_NAT), 1);
}

#[test]
fn xdp_nodeport_to_remote_backend_is_masqueraded() {
    let Some(fx) = Fixture::load("xdp_nodeport_to_remote_backend_is_masqueraded") else {
        return;
    };
    let fx = fx.with_web_service();
    // Find a client port whose flow lands on a remote backend (BACKENDS[1..]).
    let (port, fwd) = (41000..41100)
        .map(|p| {
            (
                p,
                parse_checked(&fx.run_xdp(&tcp(EXTERNAL, p, NODE_IP, NODE_PORT, true)).1),
            )
        })
        .find(|(_, t)| t.dst != BACKENDS[0])
        .expect("some flow goes to a remote backend");
    assert_eq!(fwd.src, NODE_IP, "masqueraded to the node address");
    assert!(
        (61000..=65535).contains(&fwd.sport),
        "source port {} outside the SNAT range",
        fwd.sport
    );
    assert_eq!(fwd.dport, 8080);
    let (verdict, out) = fx.run_xdp(&syn_ack(fwd.dst, 8080, NODE_IP, fwd.sport));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        parse_checked(&out),
        Tuple {
            src: NODE_IP,
            sport: NODE_PORT,
            dst: EXTERNAL,
            dport: port
        }
    );
    let masqueraded = fx.conntrack().iter().filter(|r| r.masquerade).count();
    assert!(
        masqueraded >= 2,
        "both directions of the masqueraded flow are tracked"
    );
}

#[test]
fn xdp_nodeport_to_local_backend_keeps_client_source() {
    let Some(fx) = Fixture::load("xdp_nodeport_to_local_backend_keeps_client_source") else {
        return;
    };
    let fx = fx.with_web_service();
    let fwd = (42000..42100)
        .map(|p| parse_checked(&fx.run_xdp(&tcp(EXTERNAL, p, NODE_IP, NODE_PORT, true)).1))
        .find(|t| t.dst == BACKENDS[0])
        .expect("some flow goes to the local backend");
    assert_eq!(
        fwd.src, EXTERNAL,
        "the local backend's reply passes this node anyway"
    );
}

/// A TCP segment with `payload` bytes of payload (a GSO packet, as a veth hands a
/// frags-capable XDP program one).
fn tcp_large(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: usize) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 5000, 64240)
        .ack(1001)
        .write(&mut v, &vec![0x5a; payload])
        .unwrap();
    v
}

#[test]
fn xdp_multi_buffer_packets_are_translated_whole() {
    let Some(fx) = Fixture::load("xdp_multi_buffer_packets_are_translated_whole") else {
        return;
    };
    let fx = fx.with_web_service();
    // BPF_PROG_TEST_RUN puts what does not fit in one page into fragments when the program
    // is frags-capable, as a veth does with a GSO packet: 30 000 bytes span several.
    let fwd = parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 40010, VIP, 80, true)).1);
    // The handshake's other two packets make the flow established.
    fx.run_xdp(&syn_ack(fwd.dst, 8080, CLIENT_POD, 40010));
    fx.run_xdp(&tcp(CLIENT_POD, 40010, VIP, 80, false));
    let (verdict, out) = fx.run_xdp(&tcp_large(fwd.dst, 8080, CLIENT_POD, 40010, 30_000));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out.len(),
        14 + 20 + 20 + 30_000,
        "the whole packet comes back"
    );
    assert_eq!(fx.stat(stat::REVERSE_NAT), 2, "{:?}", fx.nonzero_stats());
    assert_eq!(
        parse_checked(&out),
        Tuple {
            src: VIP,
            sport: 80,
            dst: CLIENT_POD,
            dport: 40010
        }
    );
    assert!(out[54..].iter().all(|&b| b == 0x5a), "payload untouched");
    let (verdict, out) = fx.run_xdp(&tcp_large(CLIENT_POD, 40010, VIP, 80, 30_000));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(parse_checked(&out).dst, fwd.dst);
    assert_eq!(fx.stat(stat::FORWARD_ESTABLISHED), 2);
    assert_eq!(fx.stat(stat::PASS_MALFORMED), 0);
}

#[test]
fn xdp_udp_dnat_and_reply() {
    let Some(fx) = Fixture::load("xdp_udp_dnat_and_reply") else {
        return;
    };
    let fx = fx.with_web_service();
    let (verdict, out) = fx.run_xdp(&udp(CLIENT_POD, 5000, VIP, 53));
    assert_eq!(verdict, XDP_PASS);
    let fwd = parse_checked(&out);
    assert!(BACKENDS.contains(&fwd.dst));
    assert_eq!(fwd.dport, 5353);
    let back = parse_checked(&fx.run_xdp(&udp(fwd.dst, 5353, CLIENT_POD, 5000)).1);
    assert_eq!(
        back,
        Tuple {
            src: VIP,
            sport: 53,
            dst: CLIENT_POD,
            dport: 5000
        }
    );
}

#[test]
fn xdp_unknown_destination_passes_untouched() {
    let Some(fx) = Fixture::load("xdp_unknown_destination_passes_untouched") else {
        return;
    };
    let fx = fx.with_web_service();
    for packet in [
        tcp(CLIENT_POD, 40003, BACKENDS[1], 8080, true),
        tcp(CLIENT_POD, 40003, VIP, 8443, true),
    ] {
        let (verdict, out) = fx.run_xdp(&packet);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, packet, "untouched");
    }
    assert_eq!(fx.stat(stat::PASS_NO_SERVICE), 2);
    assert!(fx.conntrack().is_empty());
}

#[test]
fn xdp_truncated_and_non_ipv4_pass_untouched_and_are_counted() {
    let Some(fx) = Fixture::load("xdp_truncated_and_non_ipv4_pass_untouched_and_are_counted")
    else {
        return;
    };
    let fx = fx.with_web_service();
    let full = tcp(CLIENT_POD, 40004, VIP, 80, true);
    // Cut inside the TCP header: the IPv4 total length now lies.
    let truncated = full[..14 + 20 + 10].to_vec();
    let (verdict, out) = fx.run_xdp(&truncated);
    assert_eq!((verdict, out), (XDP_PASS, truncated));
    assert_eq!(fx.stat(stat::PASS_MALFORMED), 1);
    // Bad IHL (< 5).
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    assert_eq!(fx.run_xdp(&bad_ihl), (XDP_PASS, bad_ihl.clone()));
    assert_eq!(fx.stat(stat::PASS_MALFORMED), 2);
    // An ARP frame and a bare Ethernet header.
    let mut arp = full[..42].to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(fx.run_xdp(&arp), (XDP_PASS, arp.clone()));
    let eth_only = full[..14].to_vec();
    assert_eq!(fx.run_xdp(&eth_only).0, XDP_PASS);
    assert_eq!(fx.stat(stat::PASS_NOT_IPV4), 1);
    // A later fragment (offset 1480) whose first fragment was never seen is passed, never
    // translated (fragments that follow a translated first: tests/datapath_fragments.rs).
    let mut fragment = full.clone();
    fragment[20..22].copy_from_slice(&185u16.to_be_bytes());
    fragment[24..26].copy_from_slice(&[0, 0]); // checksum is irrelevant to the program
    assert_eq!(fx.run_xdp(&fragment), (XDP_PASS, fragment.clone()));
    assert_eq!(fx.stat(stat::PASS_FRAGMENT), 1);
    assert!(fx.conntrack().is_empty(), "nothing malformed was tracked");
}

#[test]
fn xdp_service_without_backends_rejects_and_counts() {
    let Some(fx) = Fixture::load("xdp_service_without_backends_rejects_and_counts") else {
        return;
    };
    let fx = fx.with_web_service();
    // S10; the answer itself is checked in tests/datapath_reject.rs.
    let (verdict, _) = fx.run_xdp(&tcp(CLIENT_POD, 40005, VIP, 81, true));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(fx.stat(stat::REJECT_TCP_RESET), 1);
}

#[test]
fn tc_dnat_and_reverse_nat_match_xdp() {
    let Some(fx) = Fixture::load("tc_dnat_and_reverse_nat_match_xdp") else {
        return;
    };
    let fx = fx.with_web_service();
    // In a fresh network namespace the FIB has no route, so the TC program falls back to
    // the stack (TC_ACT_OK) instead of redirecting: the verdict is deterministic.
    // SAFETY: unshare only affects this test's thread.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET)"
    );
    let (verdict, out) = fx.run_tc(&tcp(CLIENT_POD, 40006, VIP, 80, true));
    assert_eq!(verdict, TC_ACT_OK);
    let fwd = parse_checked(&out);
    assert!(BACKENDS.contains(&fwd.dst));
    let (verdict, out) = fx.run_tc(&syn_ack(fwd.dst, 8080, CLIENT_POD, 40006));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        parse_checked(&out),
        Tuple {
            src: VIP,
            sport: 80,
            dst: CLIENT_POD,
            dport: 40006
        }
    );
    let (verdict, _) = fx.run_tc(&tcp(CLIENT_POD, 40007, VIP, 81, true));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let stats = reader::stats(&fx.pin).unwrap();
    let expected: BTreeMap<&str, u64> = [
        ("forward_new", 1),
        ("reverse_nat", 1),
        ("reject_tcp_reset", 1),
    ]
    .into_iter()
    .collect();
    for (name, value) in expected {
        assert_eq!(stats[name], value, "{name}");
    }
}

/// A second service: ClusterIP 10.96.0.20:80 with session affinity (timeout `affinity`
/// seconds) over `backends`, a LoadBalancer IP 203.0.113.20:80 restricted to 172.18.0.0/24,
/// and a NodePort 30090 under externalTrafficPolicy Local whose local set is `local`.
fn policy_state(backends: &[Ipv4Addr], local: &[Ipv4Addr], affinity: u32) -> DesiredState {
    use lb_common::{SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_SOURCE_RANGES};
    let set = |ips: &[Ipv4Addr]| {
        ips.iter()
            .map(|ip| Backend::new(*ip, 8080, 0))
            .collect::<Vec<_>>()
    };
    let mut desired = DesiredState::default();
    desired
        .backend_sets
        .insert("default/p:80/TCP".into(), set(backends));
    desired
        .backend_sets
        .insert("default/p:80/TCP/local".into(), set(local));
    let mut sticky = Frontend::new("default/p:80/TCP", FrontendKind::ClusterIp, SVC_F_AFFINITY);
    sticky.affinity_timeout = affinity;
    desired
        .frontends
        .insert(ServiceKey::new(POLICY_VIP, 80, IPPROTO_TCP), sticky);
    let mut lb = Frontend::new(
        "default/p:80/TCP",
        FrontendKind::LoadBalancer,
        SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES,
    );
    lb.source_ranges = vec!["172.18.0.0/24".parse().unwrap()];
    desired
        .frontends
        .insert(ServiceKey::new(LB_IP, 80, IPPROTO_TCP), lb);
    let mut local_only = Frontend::new(
        "default/p:80/TCP/local",
        FrontendKind::NodePort,
        SVC_F_EXTERNAL | SVC_F_LOCAL,
    );
    local_only.cluster_set = Some("default/p:80/TCP".into());
    desired
        .frontends
        .insert(ServiceKey::new(NODE_IP, 30090, IPPROTO_TCP), local_only);
    desired
}

const POLICY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

#[test]
fn xdp_session_affinity_keeps_a_client_on_one_backend_until_it_leaves() {
    let Some(mut fx) =
        Fixture::load("xdp_session_affinity_keeps_a_client_on_one_backend_until_it_leaves")
    else {
        return;
    };
    fx.apply(&policy_state(&BACKENDS, &[], 10_800));
    let first = parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 30000, POLICY_VIP, 80, true)).1).dst;
    // 15 new connections from the same client (S19): all to the same backend.
    for port in 30001..30016 {
        assert_eq!(
            parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, port, POLICY_VIP, 80, true)).1).dst,
            first
        );
    }
    // Another client is balanced on its own.
    let others: BTreeSet<Ipv4Addr> = (0..40u8)
        .map(|i| {
            parse_checked(
                &fx.run_xdp(&tcp(
                    Ipv4Addr::new(10, 244, 3, i),
                    30000,
                    POLICY_VIP,
                    80,
                    true,
                ))
                .1,
            )
            .dst
        })
        .collect();
    assert!(others.len() > 1, "affinity is per client: {others:?}");
    // The remembered backend leaves: the client's next connection goes to a live one.
    let remaining: Vec<Ipv4Addr> = BACKENDS.iter().copied().filter(|b| *b != first).collect();
    fx.apply(&policy_state(&remaining, &[], 10_800));
    let next = parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 30100, POLICY_VIP, 80, true)).1).dst;
    assert!(remaining.contains(&next), "{next} is not live");
    for port in 30101..30106 {
        assert_eq!(
            parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, port, POLICY_VIP, 80, true)).1).dst,
            next
        );
    }
}

/// The datapath's flow hash, to predict its (Maglev) choice.
fn flow_hash(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> u32 {
    lb_common::FlowKey::new(src, sport, dst, dport, IPPROTO_TCP).hash()
}

#[test]
fn xdp_session_affinity_expires_after_its_timeout() {
    let Some(mut fx) = Fixture::load("xdp_session_affinity_expires_after_its_timeout") else {
        return;
    };
    fx.apply(&policy_state(&BACKENDS, &[], 1));
    // The set's Maglev table, as the writer computes it (the agent's default size).
    let m = xlb::model::maglev::DEFAULT_TABLE_SIZE;
    let table = xlb::model::maglev::backend_table(&BACKENDS.map(|ip| Backend::new(ip, 8080, 0)), m);
    let hash_choice = |port: u16| {
        BACKENDS[table[(flow_hash(CLIENT_POD, port, POLICY_VIP, 80) % m) as usize] as usize]
    };
    let first = parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 31000, POLICY_VIP, 80, true)).1).dst;
    assert_eq!(
        first,
        hash_choice(31000),
        "the test's copy of the flow hash matches the datapath"
    );
    // A port whose plain hash picks another backend: within the timeout, affinity wins.
    let other = (31001..32000).find(|p| hash_choice(*p) != first).unwrap();
    assert_eq!(
        parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, other, POLICY_VIP, 80, true)).1).dst,
        first
    );
    // After the timeout without new connections (S21), the hash decides again.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let later = (other + 1..33000)
        .find(|p| hash_choice(*p) != first)
        .unwrap();
    assert_eq!(
        parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, later, POLICY_VIP, 80, true)).1).dst,
        hash_choice(later)
    );
}

#[test]
fn xdp_load_balancer_source_ranges_admit_only_listed_sources() {
    let Some(mut fx) = Fixture::load("xdp_load_balancer_source_ranges_admit_only_listed_sources")
    else {
        return;
    };
    fx.apply(&policy_state(&BACKENDS, &[], 0));
    let (verdict, out) = fx.run_xdp(&tcp(EXTERNAL, 32000, LB_IP, 80, true));
    assert_eq!(verdict, XDP_PASS);
    assert!(BACKENDS.contains(&parse_checked(&out).dst));
    let outsider = Ipv4Addr::new(198, 51, 100, 7);
    let (verdict, _) = fx.run_xdp(&tcp(outsider, 32001, LB_IP, 80, true));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fx.stat(stat::DROP_SOURCE_RANGE), 1);
}

#[test]
fn xdp_external_traffic_policy_local_drops_without_local_endpoint_but_pods_reach_all() {
    let Some(mut fx) = Fixture::load(
        "xdp_external_traffic_policy_local_drops_without_local_endpoint_but_pods_reach_all",
    ) else {
        return;
    };
    fx.apply(&policy_state(&BACKENDS, &[], 0));
    // External client, no local endpoint: dropped (not rejected), counted (S22).
    let (verdict, _) = fx.run_xdp(&tcp(EXTERNAL, 33000, NODE_IP, 30090, true));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fx.stat(stat::DROP_NO_LOCAL_BACKEND), 1);
    // A pod (inside the cluster CIDR) uses the cluster-wide set.
    let (verdict, out) = fx.run_xdp(&tcp(CLIENT_POD, 33001, NODE_IP, 30090, true));
    assert_eq!(verdict, XDP_PASS);
    assert!(BACKENDS.contains(&parse_checked(&out).dst));
    // With a local endpoint, external clients reach only it, with their source preserved.
    fx.apply(&policy_state(&BACKENDS, &[BACKENDS[0]], 0));
    for port in 33100..33110 {
        let t = parse_checked(&fx.run_xdp(&tcp(EXTERNAL, port, NODE_IP, 30090, true)).1);
        assert_eq!((t.src, t.dst), (EXTERNAL, BACKENDS[0]));
    }
}

#[test]
fn s30_udp_flow_to_a_removed_backend_moves_on_its_next_packet_tcp_stays() {
    let Some(mut fx) =
        Fixture::load("s30_udp_flow_to_a_removed_backend_moves_on_its_next_packet_tcp_stays")
    else {
        return;
    };
    let desired = |backends: &[Ipv4Addr]| {
        let mut d = DesiredState::default();
        let list = |port| {
            backends
                .iter()
                .map(|ip| Backend::new(*ip, port, 0))
                .collect::<Vec<_>>()
        };
        d.backend_sets.insert("default/u:53/UDP".into(), list(5353));
        d.backend_sets.insert("default/u:80/TCP".into(), list(8080));
        d.frontends.insert(
            ServiceKey::new(VIP, 53, IPPROTO_UDP),
            Frontend::new("default/u:53/UDP", FrontendKind::ClusterIp, 0),
        );
        d.frontends.insert(
            ServiceKey::new(VIP, 80, IPPROTO_TCP),
            Frontend::new("default/u:80/TCP", FrontendKind::ClusterIp, 0),
        );
        d
    };
    fx.apply(&desired(&BACKENDS));
    let udp_backend = parse_checked(&fx.run_xdp(&udp(CLIENT_POD, 5000, VIP, 53)).1).dst;
    let tcp_backend = parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 40000, VIP, 80, true)).1).dst;
    // Both flows' backends leave (at least the UDP one).
    let remaining: Vec<Ipv4Addr> = BACKENDS
        .iter()
        .copied()
        .filter(|b| *b != udp_backend && *b != tcp_backend)
        .collect();
    fx.apply(&desired(&remaining));
    // The UDP flow's next packet goes to a live backend and stays there.
    let moved = parse_checked(&fx.run_xdp(&udp(CLIENT_POD, 5000, VIP, 53)).1).dst;
    assert!(remaining.contains(&moved), "UDP flow still sent to {moved}");
    assert_eq!(fx.stat(stat::UDP_FLOW_MOVED), 1);
    assert_eq!(
        parse_checked(&fx.run_xdp(&udp(CLIENT_POD, 5000, VIP, 53)).1).dst,
        moved
    );
    assert_eq!(
        fx.stat(stat::UDP_FLOW_MOVED),
        1,
        "moved once, then tracked again"
    );
    // Its replies come back from the frontend address.
    let back = parse_checked(&fx.run_xdp(&udp(moved, 5353, CLIENT_POD, 5000)).1);
    assert_eq!((back.src, back.sport), (VIP, 53));
    // The established TCP flow keeps its backend (S29; TCP ends on its own).
    assert_eq!(
        parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 40000, VIP, 80, false)).1).dst,
        tcp_backend
    );
}

/// `BPF_MAP_UPDATE_BATCH` on the real maps: a batch larger than one bpf(2) call's worth
/// arrives whole, and one that fails partway says which map and how far it got, with the
/// entries before the failure written.
#[test]
fn batch_update_writes_every_entry_and_reports_where_it_stopped() {
    use aya::maps::{Array, HashMap, Map, MapData};
    use lb_common::map_name;
    use xlb::datapath::batch;

    let Some(mut fx) = Fixture::load("batch_update") else {
        return;
    };
    let n = 40_000u32;
    let keys: Vec<lb_common::MemberKey> = (0..n)
        .map(|i| lb_common::MemberKey {
            set: 7,
            addr: (0x0a00_0000 + i).to_be(),
            port: 80u16.to_be(),
            _pad: 0,
        })
        .collect();
    let values: Vec<u32> = (0..n).collect();
    let data = MapData::from_pin(fx.pin.join(map_name::MEMBERS)).unwrap();
    batch::update(&data, map_name::MEMBERS, &keys, &values).unwrap();
    let members: HashMap<MapData, lb_common::MemberKey, u32> =
        HashMap::try_from(Map::HashMap(data)).unwrap();
    let read: BTreeMap<u32, u32> = members
        .iter()
        .map(Result::unwrap)
        .filter(|(k, _)| k.set == 7)
        .map(|(k, v)| (u32::from_be(k.addr) - 0x0a00_0000, v))
        .collect();
    assert_eq!(read.len(), n as usize, "every entry written");
    assert!(read.iter().all(|(i, v)| i == v), "each key has its value");

    // The config array has one slot: index 0 is written, index 1 does not exist.
    let mut config = fx.writer().config().unwrap();
    config.snat_port_min = 40_000;
    let data = MapData::from_pin(fx.pin.join(map_name::CONFIG)).unwrap();
    let err = batch::update(&data, map_name::CONFIG, &[0u32, 1, 0], &[config; 3]).unwrap_err();
    assert_eq!((err.map, err.written, err.total), (map_name::CONFIG, 1, 3));
    let message = err.to_string();
    assert!(
        message.contains(map_name::CONFIG) && message.contains("after 1 of 3"),
        "{message}"
    );
    let array: Array<MapData, lb_common::DatapathConfig> =
        Array::try_from(Map::Array(data)).unwrap();
    assert_eq!(
        array.get(&0, 0).unwrap().snat_port_min,
        40_000,
        "entry 0 written"
    );
}

/// A first apply (many sets: their Maglev tables are computed on a second thread) that fills
/// a map partway publishes nothing and leaves nothing behind: every slot, table chunk,
/// member and name it wrote is removed again. Once there is room, the same apply succeeds.
#[test]
fn a_cold_apply_that_fills_a_map_leaves_nothing_half_written() {
    use aya::{
        maps::{HashMap, Map, MapData},
        Pod,
    };
    use lb_common::{
        map_name, BackendSet, BackendSlot, MaglevChunk, MaglevKey, MemberKey, ServiceValue, SetName,
    };
    use xlb::{bench::synth, datapath::batch};

    fn entries<K: Pod, V: Pod>(pin: &std::path::Path, name: &str) -> usize {
        let data = MapData::from_pin(pin.join(name)).unwrap();
        let map: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(data)).unwrap();
        map.keys().count()
    }

    let Some(mut fx) = Fixture::load("apply_map_full") else {
        return;
    };
    // Room for 150 of the 200 set names the apply writes (100 services: one set with a
    // Maglev table each, one empty set for the other ports).
    let names_capacity = MapData::from_pin(fx.pin.join(map_name::SET_NAMES))
        .unwrap()
        .info()
        .unwrap()
        .max_entries() as usize;
    let junk_ids: Vec<u32> = (0..(names_capacity - 150) as u32)
        .map(|i| 0x8000_0000 | i)
        .collect();
    let junk_names = vec![SetName::new("junk"); junk_ids.len()];
    let names = MapData::from_pin(fx.pin.join(map_name::SET_NAMES)).unwrap();
    batch::update(&names, map_name::SET_NAMES, &junk_ids, &junk_names).unwrap();

    let desired = synth::desired(100, 10);
    let err = fx.writer().apply(&desired).unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("writing set names") && message.contains(map_name::SET_NAMES),
        "{message}"
    );
    let pin = fx.pin.clone();
    let left = [
        entries::<ServiceKey, ServiceValue>(&pin, map_name::SERVICES),
        entries::<u32, BackendSet>(&pin, map_name::BACKEND_SETS),
        entries::<BackendSlot, Backend>(&pin, map_name::BACKENDS),
        entries::<MemberKey, u32>(&pin, map_name::MEMBERS),
        entries::<MaglevKey, MaglevChunk>(&pin, map_name::MAGLEV),
    ];
    assert_eq!(
        left, [0; 5],
        "frontends, sets, slots, members, chunks left behind"
    );
    assert_eq!(
        entries::<u32, SetName>(&pin, map_name::SET_NAMES),
        junk_ids.len(),
        "only the junk names stay"
    );

    let mut junk: HashMap<MapData, u32, SetName> = HashMap::try_from(Map::HashMap(names)).unwrap();
    for id in &junk_ids {
        junk.remove(id).unwrap();
    }
    let applied = fx.writer().apply(&desired).unwrap();
    assert_eq!(
        (applied.sets_created, applied.frontends_written),
        (200, 200)
    );
    let services = xlb::datapath::reader::services(&fx.pin).unwrap();
    let served: Vec<_> = services.iter().filter(|s| s.port != 0).collect();
    assert_eq!(served.len(), 100);
    assert!(served.iter().all(|s| s.backends.len() == 10));
    assert_eq!(
        entries::<MaglevKey, MaglevChunk>(&pin, map_name::MAGLEV),
        100 * 16,
        "16 chunks per table of 1021"
    );
}

/// Packets to pod addresses skip the frontend look-ups only while no frontend lies inside
/// the cluster CIDR (10.244.0.0/16 here): a frontend there (an external IP in the pod
/// range) is served from its first packet, and the skip returns when it is gone.
#[test]
fn a_frontend_inside_the_cluster_cidr_is_served_and_otherwise_pod_traffic_skips_frontends() {
    use lb_common::CFG_F_NO_POD_FRONTENDS;

    let Some(fx) = Fixture::load("pod_cidr_frontends") else {
        return;
    };
    let mut fx = fx.with_web_service();
    let skips =
        |fx: &mut Fixture| fx.writer().config().unwrap().flags & CFG_F_NO_POD_FRONTENDS != 0;
    assert!(skips(&mut fx), "no frontend in the cluster CIDR yet");
    // Pod-to-pod traffic passes as before.
    let (code, _) = fx.run_tc(&tcp(CLIENT_POD, 40000, BACKENDS[1], 8080, true));
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(fx.stat(stat::PASS_NO_SERVICE), 1);

    let inside = Ipv4Addr::new(10, 244, 200, 1);
    let mut desired = DesiredState::default();
    desired.backend_sets.insert(
        "default/odd:http/TCP".into(),
        vec![Backend::new(BACKENDS[2], 8080, 0)],
    );
    desired.frontends.insert(
        ServiceKey::new(inside, 80, IPPROTO_TCP),
        Frontend::new(
            "default/odd:http/TCP",
            FrontendKind::ExternalIp,
            SVC_F_EXTERNAL,
        ),
    );
    fx.writer().apply(&desired).unwrap();
    assert!(
        !skips(&mut fx),
        "a frontend inside the CIDR turns the skip off"
    );
    let out = parse_checked(&fx.run_xdp(&tcp(CLIENT_POD, 40001, inside, 80, true)).1);
    assert_eq!((out.dst, out.dport), (BACKENDS[2], 8080));
    assert_eq!(fx.stat(stat::FORWARD_NEW), 1);

    fx.writer().apply(&DesiredState::default()).unwrap();
    assert!(skips(&mut fx), "the last one gone, the skip is back");
    let (code, _) = fx.run_xdp(&tcp(CLIENT_POD, 40002, inside, 80, true));
    assert_eq!(code, XDP_PASS);
    assert_eq!(fx.stat(stat::PASS_NO_SERVICE), 2);
}
