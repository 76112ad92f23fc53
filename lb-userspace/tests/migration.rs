//! Upgrades across map layouts: an agent that finds maps of an earlier layout pinned carries
//! the conntrack entries over before its programs take over, and unpins the retired maps
//! afterwards (`xlb::datapath::migrate`, docs/datapath.md "Map layouts and upgrades").
//! The earlier agent's maps are made here with raw bpf(2) calls, exactly as its object
//! would have created them (names, types, key and value sizes).
mod common;

use std::{net::Ipv4Addr, os::fd::FromRawFd, path::Path};

use aya::maps::{HashMap, Map, MapData};
use common::Fixture;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{ct_state, FlowKey, FLOW_F_REPLY, IPPROTO_TCP};
use xlb::{
    datapath::migrate::{BackendSetV1, FlowNatV1, Migration},
    model::{DesiredState, Frontend, FrontendKind},
};

const XDP_PASS: u32 = 2;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const BACKEND2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);

/// Creates a map with bpf(BPF_MAP_CREATE) and pins it at `path` (BPF_OBJ_PIN).
fn pinned_map(path: &Path, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) {
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u8; 112],
    }
    #[repr(C)]
    struct PinAttr {
        pathname: u64,
        bpf_fd: u32,
        rest: [u8; 116],
    }
    let attr = CreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        rest: [0; 112],
    };
    // SAFETY: bpf(2) with a zero-padded attribute of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            &attr as *const CreateAttr,
            std::mem::size_of::<CreateAttr>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor we own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let pin = PinAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        rest: [0; 116],
    };
    // SAFETY: as above; `name` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6, // BPF_OBJ_PIN
            &pin as *const PinAttr,
            std::mem::size_of::<PinAttr>(),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

fn key(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        saddr: u32::from(saddr).to_be(),
        daddr: u32::from(daddr).to_be(),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

fn v1(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, flags: u32) -> FlowNatV1 {
    FlowNatV1 {
        saddr: u32::from(saddr).to_be(),
        daddr: u32::from(daddr).to_be(),
        sport: sport.to_be(),
        dport: dport.to_be(),
        flags,
        backend_set: 1,
        _pad: 0,
        last_seen_ns: 1,
    }
}

/// What an agent of the V1 layout left pinned: one established connection client -> VIP:80
/// balanced to BACKEND:8080 (both entries), counters and node-process socket records.
fn earlier_agent(pin: &Path) {
    const LRU_HASH: u32 = 9;
    const PERCPU_ARRAY: u32 = 6;
    pinned_map(&pin.join("XLB_CT_V1"), LRU_HASH, 16, 32, 1024);
    pinned_map(&pin.join("XLB_STATS_V1"), PERCPU_ARRAY, 4, 8, 20);
    pinned_map(&pin.join("XLB_SOCK_V1"), LRU_HASH, 8, 12, 1024);
    let data = MapData::from_pin(pin.join("XLB_CT_V1")).unwrap();
    let mut ct: HashMap<MapData, FlowKey, FlowNatV1> =
        Map::from_map_data(data).unwrap().try_into().unwrap();
    ct.insert(
        key(CLIENT, 40000, VIP, 80),
        v1(CLIENT, 40000, BACKEND, 8080, 0),
        0,
    )
    .unwrap();
    ct.insert(
        key(BACKEND, 8080, CLIENT, 40000),
        v1(VIP, 80, CLIENT, 40000, FLOW_F_REPLY),
        0,
    )
    .unwrap();
}

fn tcp_ack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 5000, 64240)
        .ack(1001)
        .write(&mut v, b"HTTP/1.1 200 OK\r\n")
        .unwrap();
    v
}

#[test]
fn conntrack_of_the_v1_layout_is_carried_over_and_retired_maps_are_unpinned() {
    let Some(mut fx) = Fixture::load_over(
        "conntrack_of_the_v1_layout_is_carried_over_and_retired_maps_are_unpinned",
        earlier_agent,
    ) else {
        return;
    };
    // The service still exists in the new agent's state.
    fx.apply(&web_service());

    let migration = Migration::start(&fx.pin).expect("migration");
    assert!(!migration.is_empty());
    assert_eq!(migration.copied, 2, "both entries of the connection");
    let flows = fx.conntrack();
    assert_eq!(flows.len(), 2, "{flows:?}");
    assert!(
        flows
            .iter()
            .all(|f| f.state == ct_state::NAMES[ct_state::ESTABLISHED as usize]),
        "a TCP flow that lived through the upgrade is established: {flows:?}"
    );

    // The backend's next segment (no SYN: mid-connection) is reverse-translated by the new
    // program with the carried-over entry: the client sees the service.
    let (verdict, out) = fx.run_xdp(&tcp_ack(BACKEND, 8080, CLIENT, 40000));
    assert_eq!(verdict, XDP_PASS);
    let sliced = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip.header().source_addr(), VIP);
    assert_eq!(ip.header().destination_addr(), CLIENT);
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("not TCP")
    };
    assert_eq!(tcp.source_port(), 80);
    assert_eq!(
        fx.stat(lb_common::stat::CT_NEW_WITHOUT_SYN),
        0,
        "the flow was found, not re-created"
    );

    assert_eq!(migration.finish().expect("finish"), 2);
    for retired in ["XLB_CT_V1", "XLB_STATS_V1", "XLB_SOCK_V1"] {
        assert!(!fx.pin.join(retired).exists(), "{retired} still pinned");
    }
    assert!(fx.pin.join(lb_common::map_name::CONNTRACK).exists());
}

#[test]
fn nothing_to_migrate_is_a_no_op() {
    let Some(fx) = Fixture::load("nothing_to_migrate_is_a_no_op") else {
        return;
    };
    let migration = Migration::start(&fx.pin).expect("migration");
    assert!(migration.is_empty());
    assert_eq!(migration.finish().unwrap(), 0);
    assert!(fx.pin.join(lb_common::map_name::CONNTRACK).exists());
}

/// What an agent of the `XLB_BSET_V1` layout (before Maglev tables) left pinned: the
/// service VIP:80 -> BACKEND, BACKEND2 :8080 programmed, its set in the V1 layout, no Maglev map.
/// Made by programming the current object, then turning its set map into the V1 one.
fn agent_with_v1_sets(pin: &Path) {
    const HASH: u32 = 1;
    let sets: Vec<(u32, lb_common::BackendSet)> = {
        let mut datapath = xlb::datapath::Datapath::load(pin).expect("load");
        let mut writer = datapath.writer().expect("writer");
        writer.apply(&web_service()).expect("apply");
        let data = MapData::from_pin(pin.join(lb_common::map_name::BACKEND_SETS)).unwrap();
        let sets: HashMap<MapData, u32, lb_common::BackendSet> =
            Map::from_map_data(data).unwrap().try_into().unwrap();
        sets.iter().map(|e| e.unwrap()).collect()
    };
    assert_eq!(sets.len(), 1, "{sets:?}");
    std::fs::remove_file(pin.join(lb_common::map_name::BACKEND_SETS)).unwrap();
    std::fs::remove_file(pin.join(lb_common::map_name::MAGLEV)).unwrap();
    pinned_map(&pin.join("XLB_BSET_V1"), HASH, 4, 8, 1024);
    let data = MapData::from_pin(pin.join("XLB_BSET_V1")).unwrap();
    let mut old: HashMap<MapData, u32, BackendSetV1> =
        Map::from_map_data(data).unwrap().try_into().unwrap();
    for (id, set) in sets {
        let v1 = BackendSetV1 {
            count: set.count,
            generation: u32::from(set.generation),
        };
        old.insert(id, v1, 0).unwrap();
    }
}

fn web_service() -> DesiredState {
    let mut desired = DesiredState::default();
    desired.backend_sets.insert(
        "default/web:http/TCP".into(),
        vec![
            lb_common::Backend::new(BACKEND, 8080, 0),
            lb_common::Backend::new(BACKEND2, 8080, 0),
        ],
    );
    desired.frontends.insert(
        lb_common::ServiceKey::new(VIP, 80, IPPROTO_TCP),
        Frontend::new("default/web:http/TCP", FrontendKind::ClusterIp, 0),
    );
    desired
}

/// What `xlb services` shows for VIP:80.
fn web_row(fx: &Fixture) -> xlb::datapath::reader::ServiceRow {
    xlb::datapath::reader::services(&fx.pin)
        .unwrap()
        .into_iter()
        .find(|r| r.ip == VIP && r.port == 80)
        .expect("VIP:80")
}

fn web_backends() -> Vec<String> {
    vec![format!("{BACKEND}:8080"), format!("{BACKEND2}:8080")]
}

/// A new flow's backend is one of the service's.
fn assert_balanced(out: &[u8]) {
    let to = destination(out);
    assert!(to == (BACKEND, 8080) || to == (BACKEND2, 8080), "{to:?}");
}

fn tcp_syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64240)
        .syn()
        .write(&mut v, &[])
        .unwrap();
    v
}

/// The destination a program sent a packet to (address, port).
fn destination(out: &[u8]) -> (Ipv4Addr, u16) {
    let sliced = SlicedPacket::from_ethernet(out).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("not IPv4")
    };
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("not TCP")
    };
    (ip.header().destination_addr(), tcp.destination_port())
}

#[test]
fn backend_sets_of_the_v1_layout_are_carried_over_before_the_first_apply() {
    let Some((mut fx, migration)) = Fixture::load_migrating(
        "backend_sets_of_the_v1_layout_are_carried_over_before_the_first_apply",
        agent_with_v1_sets,
    ) else {
        return;
    };
    assert_eq!(migration.copied, 1, "the one backend set");

    // Before any apply, the new programs already balance the service with the carried-over
    // set (no Maglev table yet: hash % count), and the writer adopted it.
    let web = web_row(&fx);
    assert_eq!(web.backends, web_backends());
    assert_eq!(web.maglev_table_size, 0);
    let (verdict, out) = fx.run_xdp(&tcp_syn(CLIENT, 40001, VIP, 80));
    assert_eq!(verdict, XDP_PASS);
    assert_balanced(&out);

    // The first apply is a diff against the adopted set: same backends, a Maglev table added.
    let stats = fx.writer().apply(&web_service()).expect("apply");
    let web = web_row(&fx);
    assert_eq!(web.backends, web_backends());
    assert_ne!(web.maglev_table_size, 0, "table written: {stats:?}");
    assert_eq!(stats.sets_created, 0, "the adopted set is kept: {stats:?}");
    let (_, out) = fx.run_xdp(&tcp_syn(CLIENT, 40002, VIP, 80));
    assert_balanced(&out);

    migration.finish().expect("finish");
    assert!(
        !fx.pin.join("XLB_BSET_V1").exists(),
        "XLB_BSET_V1 still pinned"
    );
}
