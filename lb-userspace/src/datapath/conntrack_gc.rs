//! The conntrack garbage collector. The conntrack maps are LRU hashes: the kernel has no
//! per-entry expiry and evicts only under pressure, so closed flows would linger and a
//! reused 5-tuple could meet a stale translation. The agent walks both tables periodically
//! and deletes flows idle for longer than their state allows, both directions together.
//!
//! A flow's state is the later of its two entries' states (`ct_state` is ordered) and its
//! last activity the later of their `last_seen_ns`: a busy reply direction keeps the flow.
use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{ct_state, map_name, FlowKey, FlowNat, IPPROTO_TCP};
use serde::Serialize;
use tracing::{debug, warn};

use super::reader::monotonic_ns;

/// Idle time after which a flow is forgotten, by state. Defaults follow kube-proxy and
/// nf_conntrack (see docs/datapath.md, "Conntrack lifecycle").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Embryonic TCP (SYN seen, handshake not completed): nf_conntrack's SYN_SENT, 120 s.
    pub tcp_syn: Duration,
    /// Established TCP: kube-proxy's `conntrack.tcpEstablishedTimeout`, 24 h.
    pub tcp_established: Duration,
    /// After a FIN: nf_conntrack's FIN_WAIT/TIME_WAIT, 120 s.
    pub tcp_closing: Duration,
    /// After a RST: the grace during which late retransmissions are still translated
    /// (nf_conntrack's CLOSE, 10 s).
    pub tcp_closed: Duration,
    /// UDP: nf_conntrack's `udp_timeout`, 30 s.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn: Duration::from_secs(120),
            tcp_established: Duration::from_secs(86_400),
            tcp_closing: Duration::from_secs(120),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// The idle timeout of a flow of protocol `proto` in state `state`.
    pub fn of(&self, proto: u8, state: u8) -> Duration {
        if proto != IPPROTO_TCP {
            return self.udp;
        }
        match state {
            ct_state::ESTABLISHED => self.tcp_established,
            ct_state::CLOSING => self.tcp_closing,
            ct_state::CLOSED => self.tcp_closed,
            // SYN_SENT, SYN_RECV (and anything unknown: the short side is the safe one).
            _ => self.tcp_syn,
        }
    }
}

/// What one sweep saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sweep {
    /// Entries in `XLB_CT_V2` (established TCP, UDP) before the sweep.
    pub established_entries: u64,
    /// Entries in `XLB_CT_NEW_V1` (embryonic TCP) before the sweep.
    pub embryonic_entries: u64,
    /// Flows found expired (a pair, or a lone entry whose partner is gone).
    pub expired_flows: u64,
    /// Entries deleted.
    pub deleted_entries: u64,
}

/// The agent's last completed sweep (for /metrics: table occupancy without another walk).
static LAST_SWEEP: Mutex<Option<Sweep>> = Mutex::new(None);

/// The last sweep `run` completed in this process, if any.
pub fn last_sweep() -> Option<Sweep> {
    *LAST_SWEEP.lock().unwrap_or_else(|e| e.into_inner())
}

/// Both conntrack tables of one pinned datapath.
pub struct Collector {
    established: HashMap<MapData, FlowKey, FlowNat>,
    embryonic: HashMap<MapData, FlowKey, FlowNat>,
    pub timeouts: Timeouts,
}

fn open(pin_path: &Path, name: &str) -> Result<HashMap<MapData, FlowKey, FlowNat>> {
    let path: PathBuf = pin_path.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?.try_into()?)
}

impl Collector {
    pub fn open(pin_path: &Path, timeouts: Timeouts) -> Result<Self> {
        Ok(Self {
            established: open(pin_path, map_name::CONNTRACK)?,
            embryonic: open(pin_path, map_name::CONNTRACK_NEW)?,
            timeouts,
        })
    }

    /// Deletes every flow idle for longer than its timeout at `now_ns` (CLOCK_MONOTONIC,
    /// the datapath's clock; tests pass a clock of their own).
    pub fn sweep(&mut self, now_ns: u64) -> Result<Sweep> {
        let mut sweep = Sweep::default();
        let timeouts = self.timeouts;
        for (table, seen) in [
            (&mut self.established, &mut sweep.established_entries),
            (&mut self.embryonic, &mut sweep.embryonic_entries),
        ] {
            let entries: StdHashMap<FlowKey, FlowNat> =
                table.iter().filter_map(|e| e.ok()).collect();
            *seen = entries.len() as u64;
            for (key, nat) in &entries {
                let partner_key = nat.other_direction(key.proto);
                let partner = entries.get(&partner_key);
                // Each pair once: from its smaller key (a lone entry from itself).
                if partner.is_some() && partner_key < *key {
                    continue;
                }
                let state = partner.map_or(nat.state, |p| p.state.max(nat.state));
                let last =
                    partner.map_or(nat.last_seen_ns, |p| p.last_seen_ns.max(nat.last_seen_ns));
                let idle = Duration::from_nanos(now_ns.saturating_sub(last));
                if idle <= timeouts.of(key.proto, state) {
                    continue;
                }
                // The datapath may have refreshed the flow since the walk read it: re-read
                // just before deleting, and keep a flow that moved.
                let moved = |k: &FlowKey, then: &FlowNat| {
                    table.get(k, 0).is_ok_and(|now| {
                        now.last_seen_ns != then.last_seen_ns || now.state != then.state
                    })
                };
                if moved(key, nat) || partner.is_some_and(|p| moved(&partner_key, p)) {
                    continue;
                }
                sweep.expired_flows += 1;
                for k in std::iter::once(key).chain(partner.map(|_| &partner_key)) {
                    // Gone already (evicted, or removed by the datapath): nothing to do.
                    if table.remove(k).is_ok() {
                        sweep.deleted_entries += 1;
                    }
                }
            }
        }
        Ok(sweep)
    }
}

/// Sweeps every `interval`, forever: run it on a thread of its own (a sweep of a full table
/// is a million map syscalls). Failures are logged and retried on the next round: the
/// datapath keeps working without the collector, only fuller.
pub fn run(pin_path: &Path, timeouts: Timeouts, interval: Duration) {
    let mut collector = match Collector::open(pin_path, timeouts) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = format!("{e:#}"), "conntrack collector not started");
            return;
        }
    };
    loop {
        std::thread::sleep(interval);
        match collector.sweep(monotonic_ns()) {
            Ok(s) => {
                *LAST_SWEEP.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                debug!(
                    established = s.established_entries,
                    embryonic = s.embryonic_entries,
                    expired_flows = s.expired_flows,
                    deleted = s.deleted_entries,
                    "conntrack sweep"
                )
            }
            Err(e) => warn!(error = format!("{e:#}"), "conntrack sweep failed"),
        }
    }
}
