//! Maglev consistent hashing in the real datapath (BPF_PROG_TEST_RUN): the programs pick
//! `table[hash % M]` from the table the agent's writer computed, a backend leaving moves
//! (almost) only its own flows, a service's annotation sets M, and an endpoint change of a
//! service with 300 ports costs 300 set updates, nothing more. Services come from real
//! Service and EndpointSlice objects through the agent's model (desired_state / ClusterView).
mod common;

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, Map, MapData};
use common::{Fixture, NODE_IP};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{map_name, stat, Backend, BackendSet, FlowKey, FlowNat, IPPROTO_TCP};
use serde_json::json;
use xlb::model::{
    desired_state, maglev, ClusterState, ClusterView, DesiredState, Ipv4Cidr, NodeContext,
    ObjectChange,
};

/// A translated packet is handed to the host stack.
const XDP_PASS: u32 = 2;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const TARGET_PORT: u16 = 8080;

fn node() -> NodeContext {
    NodeContext {
        node_name: "node-a".into(),
        node_ips: vec![NODE_IP],
        cluster_cidr: Some(Ipv4Cidr {
            addr: Ipv4Addr::new(10, 244, 0, 0),
            prefix: 16,
        }),
    }
}

fn backend_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 100, 10 + k as u8)
}

/// ClusterIP service `default/<name>` on `ip` with `ports` ports (`p<i>`: 80+i -> 8080+i),
/// optionally annotated with a Maglev table size.
fn service(name: &str, ip: Ipv4Addr, ports: u16, table_size: Option<&str>) -> Service {
    let ports: Vec<_> = (0..ports)
        .map(|i| json!({"name": format!("p{i}"), "port": 80 + i, "targetPort": TARGET_PORT + i, "protocol": "TCP"}))
        .collect();
    let mut svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()], "ports": ports},
    }))
    .unwrap();
    if let Some(m) = table_size {
        svc.metadata.annotations = Some(
            [(maglev::ANNOTATION_TABLE_SIZE.to_string(), m.to_string())]
                .into_iter()
                .collect(),
        );
    }
    svc
}

/// The EndpointSlice of `default/<service>`: `endpoints` ready pods on every port.
fn slice(service: &str, ports: u16, endpoints: &[Ipv4Addr]) -> EndpointSlice {
    slice_of_ports(service, 1, 0..ports, endpoints)
}

/// The slices of a service with many ports: at most 100 ports each, as the API allows
/// (the EndpointSlice controller splits them the same way).
fn slices(service: &str, ports: u16, endpoints: &[Ipv4Addr]) -> Vec<EndpointSlice> {
    (0..ports)
        .step_by(100)
        .enumerate()
        .map(|(k, first)| {
            slice_of_ports(service, k + 1, first..(first + 100).min(ports), endpoints)
        })
        .collect()
}

fn slice_of_ports(
    service: &str,
    number: usize,
    ports: std::ops::Range<u16>,
    endpoints: &[Ipv4Addr],
) -> EndpointSlice {
    let ports: Vec<_> = ports
        .map(|i| json!({"name": format!("p{i}"), "port": TARGET_PORT + i, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{service}-{number}"),
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// The desired state of one one-port service with `n` endpoints, through the agent's model.
fn one_service(n: usize, table_size: Option<&str>) -> DesiredState {
    let ips: Vec<Ipv4Addr> = (0..n).map(backend_ip).collect();
    let cluster = ClusterState {
        services: vec![service("mg", VIP, 1, table_size)],
        endpoint_slices: vec![slice("mg", 1, &ips)],
        nodes: Vec::new(),
    };
    let (state, problems) = desired_state(&cluster, &node());
    assert!(problems.is_empty(), "{problems:?}");
    state
}

const SET: &str = "default/mg:p0/TCP";

/// Distinct new flows from pods of the cluster to the VIP.
fn flows(count: usize) -> Vec<(Ipv4Addr, u16)> {
    (0..count)
        .map(|i| {
            let client = Ipv4Addr::new(10, 244, 1 + (i % 200) as u8, 2 + (i / 200 % 250) as u8);
            (client, 20_000 + (i % 40_000) as u16)
        })
        .collect()
}

fn syn(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), VIP.octets(), 64)
        .tcp(sport, 80, 1000, 64240)
        .syn()
        .write(&mut v, &[])
        .unwrap();
    v
}

/// The backend the datapath sends each flow's SYN to.
fn datapath_choices(fx: &Fixture, flows: &[(Ipv4Addr, u16)]) -> Vec<Ipv4Addr> {
    flows
        .iter()
        .map(|(src, sport)| {
            let (verdict, out) = fx.run_xdp(&syn(*src, *sport));
            assert_eq!(verdict, XDP_PASS, "flow {src}:{sport} translated");
            let p = SlicedPacket::from_ethernet(&out).unwrap();
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) = (p.net, p.transport)
            else {
                panic!("output is not IPv4/TCP")
            };
            assert_eq!(tcp.destination_port(), TARGET_PORT);
            ip.header().destination_addr()
        })
        .collect()
}

/// What the Rust table lookup predicts: `backends[table[hash % M]]`, the same flow hash.
fn predicted(backends: &[Backend], m: u32, flows: &[(Ipv4Addr, u16)]) -> Vec<Ipv4Addr> {
    let table = maglev::backend_table(backends, m);
    flows
        .iter()
        .map(|(src, sport)| {
            let hash = FlowKey::new(*src, *sport, VIP, 80, IPPROTO_TCP).hash();
            backends[table[(hash % m) as usize] as usize].ip()
        })
        .collect()
}

/// Forgets every tracked flow, so the same 5-tuples are balanced afresh.
fn clear_conntrack(pin: &Path) {
    for name in [map_name::CONNTRACK, map_name::CONNTRACK_NEW] {
        let data = MapData::from_pin(pin.join(name)).unwrap();
        let mut map: HashMap<MapData, FlowKey, FlowNat> =
            HashMap::try_from(Map::LruHashMap(data)).unwrap();
        let keys: Vec<FlowKey> = map.keys().map(Result::unwrap).collect();
        for key in keys {
            map.remove(&key).unwrap();
        }
        assert_eq!(map.keys().count(), 0, "{name} cleared");
    }
}

/// The pinned `BackendSet` of every set, by name (as the datapath reads them).
fn pinned_sets(pin: &Path) -> BTreeMap<String, BackendSet> {
    let open = |name: &str| MapData::from_pin(pin.join(name)).unwrap();
    let sets: HashMap<MapData, u32, BackendSet> =
        HashMap::try_from(Map::HashMap(open(map_name::BACKEND_SETS))).unwrap();
    let names: HashMap<MapData, u32, lb_common::SetName> =
        HashMap::try_from(Map::HashMap(open(map_name::SET_NAMES))).unwrap();
    sets.iter()
        .map(Result::unwrap)
        .map(|(id, set)| (names.get(&id, 0).unwrap().as_str().to_string(), set))
        .collect()
}

fn share(part: usize, whole: usize) -> f64 {
    part as f64 * 100.0 / whole as f64
}

#[test]
fn maglev_a_leaving_backend_moves_its_flows_and_few_others_and_choices_equal_the_table() {
    let Some(mut fx) = Fixture::load("maglev_leave") else {
        return;
    };
    let flows = flows(10_000);
    let m = maglev::DEFAULT_TABLE_SIZE;
    let ten = one_service(10, None);
    fx.apply(&ten);
    assert_eq!(pinned_sets(&fx.pin)[SET].table_size as u32, m);
    let before = datapath_choices(&fx, &flows);
    assert_eq!(
        before,
        predicted(&ten.backend_sets[SET], m, &flows),
        "the datapath picks table[hash % M] of the writer's table"
    );

    // One backend leaves, through the real writer (a new generation, then the switch).
    let leaving = backend_ip(3);
    let nine = one_service(10, None);
    let mut nine = nine;
    nine.backend_sets
        .get_mut(SET)
        .unwrap()
        .retain(|b| b.ip() != leaving);
    let applied = fx.writer().apply(&nine).unwrap();
    assert_eq!(
        (applied.sets_updated, applied.maglev_chunks_written),
        (1, 16)
    );
    clear_conntrack(&fx.pin);
    let after = datapath_choices(&fx, &flows);
    assert_eq!(after, predicted(&nine.backend_sets[SET], m, &flows));

    let of_leaving = before.iter().filter(|b| **b == leaving).count();
    let collateral = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != leaving && b != a)
        .count();
    assert!(after.iter().all(|a| *a != leaving));
    // With hash % count, a leaving backend out of 10 would remap about 90% of all flows.
    let modulo_moved = flows
        .iter()
        .filter(|(src, sport)| {
            let hash = FlowKey::new(*src, *sport, VIP, 80, IPPROTO_TCP).hash();
            hash % 10 != hash % 9
        })
        .count();
    println!(
        "maglev datapath, {} flows, N=10->9, M={m}: leaving backend's flows {:.2}% (all moved), \
         other flows moved {:.3}% (hash % count would move {:.1}%)",
        flows.len(),
        share(of_leaving, flows.len()),
        share(collateral, flows.len()),
        share(modulo_moved, flows.len()),
    );
    assert!(
        of_leaving > flows.len() / 20,
        "the leaving backend had its share"
    );
    assert!(
        share(collateral, flows.len()) < 5.0,
        "flows of staying backends moved: {collateral}"
    );
    assert!(collateral * 10 < modulo_moved);

    // It joins again: the table, a function of members and M only, is the first one again.
    fx.apply(&ten);
    clear_conntrack(&fx.pin);
    assert_eq!(datapath_choices(&fx, &flows), before);
    assert_eq!(fx.stat(stat::MAGLEV_CHUNK_MISSING), 0);
}

#[test]
fn maglev_the_service_annotation_sets_m_and_a_changed_m_rewrites_only_that_table() {
    let Some(mut fx) = Fixture::load("maglev_annotation") else {
        return;
    };
    let flows = flows(3000);
    let small = one_service(5, Some("251"));
    assert_eq!(small.maglev_table_sizes.get(SET), Some(&251));
    fx.apply(&small);
    assert_eq!(pinned_sets(&fx.pin)[SET].table_size, 251);
    let shown = xlb::datapath::reader::services(&fx.pin).unwrap();
    let row = shown.iter().find(|r| r.service == SET).unwrap();
    assert_eq!(
        (row.maglev_table_size, row.backends.len()),
        (251, 5),
        "xlb services -o json"
    );
    let backends = &small.backend_sets[SET];
    let chosen = datapath_choices(&fx, &flows);
    assert_eq!(chosen, predicted(backends, 251, &flows));
    assert_ne!(
        chosen,
        predicted(backends, maglev::DEFAULT_TABLE_SIZE, &flows),
        "M changes choices"
    );

    // The annotation changes: same backends, a new table of 4093 in the other generation.
    let large = one_service(5, Some("4093"));
    let applied = fx.writer().apply(&large).unwrap();
    assert_eq!(applied.sets_updated, 1);
    assert_eq!(applied.maglev_chunks_written, 4093usize.div_ceil(64));
    assert_eq!(pinned_sets(&fx.pin)[SET].table_size, 4093);
    clear_conntrack(&fx.pin);
    assert_eq!(
        datapath_choices(&fx, &flows),
        predicted(backends, 4093, &flows)
    );

    // An invalid annotation is reported and the agent's default applies.
    let cluster = ClusterState {
        services: vec![service("mg", VIP, 1, Some("4096"))],
        endpoint_slices: vec![slice("mg", 1, &(0..5).map(backend_ip).collect::<Vec<_>>())],
        nodes: Vec::new(),
    };
    let (bad, problems) = desired_state(&cluster, &node());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].reason.contains("not a prime"));
    fx.apply(&bad);
    assert_eq!(
        u32::from(pinned_sets(&fx.pin)[SET].table_size),
        maglev::DEFAULT_TABLE_SIZE
    );
    clear_conntrack(&fx.pin);
    assert_eq!(
        datapath_choices(&fx, &flows),
        predicted(backends, maglev::DEFAULT_TABLE_SIZE, &flows)
    );

    // One backend: no table (every flow has one choice), hash % 1.
    fx.apply(&one_service(1, Some("251")));
    assert_eq!(pinned_sets(&fx.pin)[SET].table_size, 0);
    clear_conntrack(&fx.pin);
    assert!(datapath_choices(&fx, &flows[..100])
        .iter()
        .all(|b| *b == backend_ip(0)));
    assert_eq!(fx.stat(stat::MAGLEV_CHUNK_MISSING), 0);
}

/// cilium#32391: one endpoint change of a 100-port service meant minutes of work. Here an
/// endpoint joining a 300-port service updates its 300 sets (slots, table, switch) and
/// nothing else: 300 times what the same change costs a one-port service.
#[test]
fn maglev_an_endpoint_change_of_a_300_port_service_costs_300_set_updates_only() {
    let Some(mut fx) = Fixture::load("maglev_300_ports") else {
        return;
    };
    const PORTS: u16 = 300;
    let ips: Vec<Ipv4Addr> = (0..10).map(backend_ip).collect();
    let mut view = ClusterView::new(node());
    view.replace_all(&ClusterState {
        services: vec![
            service("wide", VIP, PORTS, None),
            service("mg", Ipv4Addr::new(10, 96, 0, 31), 1, None),
        ],
        endpoint_slices: slices("wide", PORTS, &ips)
            .into_iter()
            .chain([slice("mg", 1, &ips)])
            .collect(),
        nodes: Vec::new(),
    });
    let created = fx.writer().apply(view.state()).unwrap();
    // 300 + 1 port sets with tables, 2 other-ports sets without.
    assert_eq!(created.sets_created, 303);
    assert_eq!(created.maglev_chunks_written, 301 * 16);

    // An eleventh endpoint becomes ready on every port of `wide`.
    let mut eleven = ips.clone();
    eleven.push(backend_ip(10));
    let delta = view.apply(
        slices("wide", PORTS, &eleven)
            .into_iter()
            .map(|slice| ObjectChange::EndpointSlice(Box::new(slice))),
    );
    assert_eq!(delta.backend_sets.len(), PORTS as usize);
    let applied = fx.writer().apply_delta(view.state(), &delta).unwrap();
    // Per set: 11 new slots + 16 table chunks into the inactive generation, 1 member,
    // 1 switch, then 10 old slots and 16 old chunks deleted.
    let per_set = 11 + 16 + 1 + 1 + 10 + 16;
    println!(
        "maglev: endpoint joins a {PORTS}-port service: {} sets updated, {} map operations \
         ({} table chunks)",
        applied.sets_updated, applied.map_ops, applied.maglev_chunks_written
    );
    assert_eq!(applied.sets_updated, PORTS as usize);
    assert_eq!(
        (
            applied.sets_created,
            applied.sets_deleted,
            applied.frontends_written
        ),
        (0, 0, 0)
    );
    assert_eq!(applied.maglev_chunks_written, PORTS as usize * 16);
    assert_eq!(applied.map_ops, PORTS as usize * per_set);

    // The same change to the one-port service costs one set's share.
    let delta = view.apply([ObjectChange::EndpointSlice(Box::new(slice(
        "mg", 1, &eleven,
    )))]);
    let applied = fx.writer().apply_delta(view.state(), &delta).unwrap();
    assert_eq!((applied.sets_updated, applied.map_ops), (1, per_set));

    // And the datapath follows: a port of `wide` balances over the new table.
    let sets = pinned_sets(&fx.pin);
    assert!(
        sets.iter()
            .filter(|(name, _)| name.starts_with("default/wide:p"))
            .all(|(_, set)| set.count == 11
                && u32::from(set.table_size) == maglev::DEFAULT_TABLE_SIZE)
    );
    let flows = flows(500);
    let backends = &view.state().backend_sets["default/wide:p0/TCP"];
    assert_eq!(backends.len(), 11);
    assert_eq!(
        datapath_choices(&fx, &flows),
        predicted(backends, maglev::DEFAULT_TABLE_SIZE, &flows)
    );
}

/// A restarted agent adopts the pinned tables: the same desired state writes nothing, a
/// chunk that belongs to no current table is removed, and another `--maglev-table-size`
/// rewrites the tables of the sets that use the default (not the annotated one).
#[test]
fn maglev_a_restarted_agent_adopts_the_pinned_tables() {
    let Some(mut fx) = Fixture::load("maglev_adopt") else {
        return;
    };
    let ips: Vec<Ipv4Addr> = (0..4).map(backend_ip).collect();
    let cluster = ClusterState {
        services: vec![
            service("mg", VIP, 1, None),
            service("an", Ipv4Addr::new(10, 96, 0, 31), 1, Some("509")),
        ],
        endpoint_slices: vec![slice("mg", 1, &ips), slice("an", 1, &ips)],
        nodes: Vec::new(),
    };
    let (desired, problems) = desired_state(&cluster, &node());
    assert!(problems.is_empty(), "{problems:?}");
    fx.apply(&desired);
    let id = |name: &str| {
        let names: HashMap<MapData, u32, lb_common::SetName> = HashMap::try_from(Map::HashMap(
            MapData::from_pin(fx.pin.join(map_name::SET_NAMES)).unwrap(),
        ))
        .unwrap();
        names
            .iter()
            .map(Result::unwrap)
            .find(|(_, n)| n.as_str() == name)
            .unwrap()
            .0
    };
    // A leftover of an interrupted update: a chunk in the inactive generation.
    let stray = lb_common::MaglevKey::new(id(SET), 1, 0);
    let mut chunks: HashMap<MapData, lb_common::MaglevKey, lb_common::MaglevChunk> =
        HashMap::try_from(Map::HashMap(
            MapData::from_pin(fx.pin.join(map_name::MAGLEV)).unwrap(),
        ))
        .unwrap();
    chunks
        .insert(stray, lb_common::MaglevChunk { backends: [0; 64] }, 0)
        .unwrap();

    // The restarted agent: the same programs and pins, a new writer that adopts them.
    let mut restarted = xlb::datapath::Datapath::load(&fx.pin).unwrap();
    let mut writer = restarted.writer().unwrap();
    let applied = writer.apply(&desired).unwrap();
    assert_eq!(
        (applied.sets_updated, applied.map_ops),
        (0, 1),
        "only the stray chunk is removed"
    );
    assert!(chunks.get(&stray, 0).is_err());
    assert_eq!(
        chunks.keys().count(),
        1021usize.div_ceil(64) + 509usize.div_ceil(64)
    );

    writer.set_default_table_size(251).unwrap();
    assert!(writer.set_default_table_size(1000).is_err(), "not a prime");
    let applied = writer.apply(&desired).unwrap();
    assert_eq!(
        (applied.sets_updated, applied.maglev_chunks_written),
        (1, 4)
    );
    let sets = pinned_sets(&fx.pin);
    assert_eq!(sets[SET].table_size, 251);
    assert_eq!(sets["default/an:p0/TCP"].table_size, 509);
    let flows = flows(500);
    assert_eq!(
        datapath_choices(&fx, &flows),
        predicted(&desired.backend_sets[SET], 251, &flows)
    );
}

/// Readers are not disturbed by table updates: while another writer (a second agent
/// instance adopting the same pins) switches the set between 10 and 9 backends 1000 times,
/// every new flow sent meanwhile is translated to one of the backends, none is dropped.
#[test]
fn maglev_new_flows_during_table_switches_all_reach_a_backend() {
    let Some(mut fx) = Fixture::load("maglev_concurrent") else {
        return;
    };
    let ten = one_service(10, None);
    let mut nine = ten.clone();
    nine.backend_sets
        .get_mut(SET)
        .unwrap()
        .retain(|b| b.ip() != backend_ip(3));
    fx.apply(&ten);
    let all: Vec<Ipv4Addr> = (0..10).map(backend_ip).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let pin = fx.pin.clone();
    let sent = std::thread::scope(|scope| {
        let updater = scope.spawn(|| {
            let mut datapath = xlb::datapath::Datapath::load(&pin).unwrap();
            let mut writer = datapath.writer().unwrap();
            let mut switches = 0;
            for round in 0..1000 {
                let state = if round % 2 == 0 { &nine } else { &ten };
                switches += writer.apply(state).unwrap().sets_updated;
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            switches
        });
        let mut sent = 0usize;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let i = sent;
            let client = Ipv4Addr::new(10, 244, 1 + (i % 200) as u8, 2 + (i / 200 % 250) as u8);
            let sport = 1024 + (i / 50_000 % 60_000) as u16;
            let chosen = datapath_choices(&fx, &[(client, sport)])[0];
            assert!(all.contains(&chosen), "flow {i} went to {chosen}");
            sent += 1;
        }
        assert_eq!(
            updater.join().unwrap(),
            1000,
            "every round switched the set"
        );
        sent
    });
    println!(
        "maglev: {sent} new flows during 1000 table switches, {} fell back on a missing chunk",
        fx.stat(stat::MAGLEV_CHUNK_MISSING)
    );
    assert!(sent > 100, "flows were sent during the switches");
    assert_eq!(fx.stat(stat::DROP_BACKEND_MISSING), 0);
    assert_eq!(fx.stat(stat::FORWARD_NEW), sent as u64);
}
