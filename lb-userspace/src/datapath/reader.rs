//! Read-only views of the pinned maps: what `xlb services`, `xlb conntrack` and
//! `xlb stats` print, whether or not an agent is running.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    ct_state, map_name, stat, Backend, BackendSet, BackendSlot, DatapathConfig, FlowKey, FlowNat,
    ServiceKey, ServiceValue, SetName, FLOW_F_REPLY, FLOW_F_SNAT, IPPROTO_TCP, IPPROTO_UDP,
    SVC_F_EXTERNAL,
};
use serde::Serialize;

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        // A ClusterIP's other ports and protocols, refused (S04).
        0 => "*",
        _ => "?",
    }
}

fn open(pin_path: &Path, name: &str) -> Result<Map> {
    let path: PathBuf = pin_path.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is xlb running with --pin-path {}?)",
            path.display(),
            pin_path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServiceRow {
    pub frontend: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: &'static str,
    pub service: String,
    pub external: bool,
    pub backends: Vec<String>,
    /// Maglev table size M new flows are balanced by; 0: none (`hash % count`).
    pub maglev_table_size: u32,
}

/// Frontends with their backend sets, sorted by frontend.
pub fn services(pin_path: &Path) -> Result<Vec<ServiceRow>> {
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        open(pin_path, map_name::SERVICES)?.try_into()?;
    let sets: HashMap<MapData, u32, BackendSet> =
        open(pin_path, map_name::BACKEND_SETS)?.try_into()?;
    let backends: HashMap<MapData, BackendSlot, Backend> =
        open(pin_path, map_name::BACKENDS)?.try_into()?;
    let names: HashMap<MapData, u32, SetName> = open(pin_path, map_name::SET_NAMES)?.try_into()?;
    let mut rows = Vec::new();
    for entry in services.iter() {
        let (key, value) = entry?;
        let name = names
            .get(&value.backend_set, 0)
            .map(|n| n.as_str().to_string())
            .unwrap_or_else(|_| "?".into());
        let mut list = Vec::new();
        let mut maglev_table_size = 0;
        if let Ok(set) = sets.get(&value.backend_set, 0) {
            maglev_table_size = u32::from(set.table_size);
            for index in 0..set.count {
                if let Ok(b) = backends.get(
                    &BackendSlot::new(value.backend_set, u32::from(set.generation), index),
                    0,
                ) {
                    list.push(format!("{}:{}", b.ip(), b.port()));
                }
            }
        }
        rows.push(ServiceRow {
            frontend: if key.port() == 0 {
                format!("{}:*/*", key.ip())
            } else {
                format!("{}:{}/{}", key.ip(), key.port(), proto_name(key.proto))
            },
            ip: key.ip(),
            port: key.port(),
            protocol: proto_name(key.proto),
            service: name,
            external: value.flags & SVC_F_EXTERNAL != 0,
            backends: list,
            maglev_table_size,
        });
    }
    rows.sort_by(|a, b| (a.ip, a.port, a.protocol).cmp(&(b.ip, b.port, b.protocol)));
    Ok(rows)
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowRow {
    /// "original" (client -> frontend) or "reply" (backend -> client).
    pub direction: &'static str,
    pub protocol: &'static str,
    /// The tuple as it arrives.
    pub from: String,
    pub to: String,
    /// The tuple it is rewritten to.
    pub nat_from: String,
    pub nat_to: String,
    pub masquerade: bool,
    /// TCP state this direction has seen (`ct_state::NAMES`; "none" for UDP). "syn_sent"
    /// and "syn_recv" entries are embryonic (in `XLB_CT_NEW_V1`).
    pub state: &'static str,
    pub idle_seconds: u64,
}

/// Every conntrack entry, established and embryonic, original direction first.
pub fn conntrack(pin_path: &Path) -> Result<Vec<FlowRow>> {
    let now = monotonic_ns();
    let addr = |a: u32, p: u16| format!("{}:{}", Ipv4Addr::from(u32::from_be(a)), u16::from_be(p));
    let mut rows = Vec::new();
    for (k, v) in conntrack_entries(pin_path)? {
        rows.push(FlowRow {
            direction: if v.flags & FLOW_F_REPLY != 0 {
                "reply"
            } else {
                "original"
            },
            protocol: proto_name(k.proto),
            from: addr(k.saddr, k.sport),
            to: addr(k.daddr, k.dport),
            nat_from: addr(v.saddr, v.sport),
            nat_to: addr(v.daddr, v.dport),
            masquerade: v.flags & FLOW_F_SNAT != 0,
            state: ct_state::NAMES
                .get(usize::from(v.state))
                .copied()
                .unwrap_or("?"),
            idle_seconds: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        });
    }
    rows.sort_by(|a, b| (a.direction, &a.from, &a.to).cmp(&(b.direction, &b.from, &b.to)));
    Ok(rows)
}

/// The raw entries of both conntrack tables (`XLB_CT_V2`, then `XLB_CT_NEW_V1`).
pub fn conntrack_entries(pin_path: &Path) -> Result<Vec<(FlowKey, FlowNat)>> {
    let mut out = Vec::new();
    for name in [map_name::CONNTRACK, map_name::CONNTRACK_NEW] {
        let ct: HashMap<MapData, FlowKey, FlowNat> = open(pin_path, name)?.try_into()?;
        for entry in ct.iter() {
            out.push(entry?);
        }
    }
    Ok(out)
}

/// How full the conntrack tables are.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct ConntrackOccupancy {
    /// Entries in `XLB_CT_V2` (established TCP and UDP, two per flow) and its capacity.
    pub established_entries: u64,
    pub established_capacity: u64,
    /// Entries in `XLB_CT_NEW_V1` (embryonic TCP) and its capacity.
    pub embryonic_entries: u64,
    pub embryonic_capacity: u64,
}

/// Counts the entries of both conntrack tables (a walk of their keys: one syscall each).
pub fn conntrack_occupancy(pin_path: &Path) -> Result<ConntrackOccupancy> {
    let count = |name: &str| -> Result<u64> {
        let ct: HashMap<MapData, FlowKey, FlowNat> = open(pin_path, name)?.try_into()?;
        Ok(ct.keys().filter(|k| k.is_ok()).count() as u64)
    };
    Ok(ConntrackOccupancy {
        established_entries: count(map_name::CONNTRACK)?,
        established_capacity: u64::from(lb_common::capacity::CONNTRACK),
        embryonic_entries: count(map_name::CONNTRACK_NEW)?,
        embryonic_capacity: u64::from(lb_common::capacity::CONNTRACK_NEW),
    })
}

/// Verdict counters summed over CPUs, by reason name.
pub fn stats(pin_path: &Path) -> Result<BTreeMap<&'static str, u64>> {
    let counters: PerCpuArray<MapData, u64> = open(pin_path, map_name::STATS)?.try_into()?;
    let mut out = BTreeMap::new();
    for (i, name) in stat::NAMES.iter().enumerate() {
        let values = counters.get(&(i as u32), 0)?;
        out.insert(*name, values.iter().sum());
    }
    Ok(out)
}

pub fn config(pin_path: &Path) -> Result<DatapathConfig> {
    let config: Array<MapData, DatapathConfig> = open(pin_path, map_name::CONFIG)?.try_into()?;
    Ok(config.get(&0, 0)?)
}

/// CLOCK_MONOTONIC, the clock of the datapath's timestamps (bpf_ktime_get_coarse_ns(): the
/// same clock at tick resolution, at most a tick behind).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
