//! Upgrades across map layouts (docs/datapath.md, "Map layouts and upgrades").
//!
//! Every map name carries its layout version (`XLB_CT_V2`). An agent whose layout differs
//! from the pinned maps' finds the older names beside its own after loading: the new object
//! pinned fresh maps under the new names while the old programs, still attached through the
//! pinned links, keep using the old ones. What the old maps held is then carried over or
//! let go, by a rule per retired name:
//!
//! - state that live connections depend on (conntrack) is **copied**, converted to the new
//!   layout, before the new programs are swapped in, and once more afterwards for the entries
//!   the old programs created meanwhile (never overwriting what the new programs wrote);
//! - state the new programs read before the agent's first apply (backend sets) is **copied
//!   once**, converted, before the new programs are swapped in: the agent adopts it and its
//!   first apply brings it up to date;
//! - state the agent rewrites anyway (config, services, sets) or that only costs a little
//!   when lost (counters, node-process socket translations) is **dropped**.
//!
//! The retired pins are removed last, after the links carry the new programs: the old maps
//! then go away with the last program that used them. The datapath's break is at most the
//! one link update per hook, as for any restart.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::{ct_state, map_name, BackendSet, FlowKey, FlowNat, IPPROTO_TCP};
use tracing::{info, warn};

/// bpf(2) update flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// `XLB_CT_V1`'s value: `FlowNat` before the TCP state took 8 bits of its padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowNatV1 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub flags: u32,
    pub backend_set: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}

// SAFETY: plain `repr(C)` data with no padding holes (checked below), like the lb-common types.
unsafe impl aya::Pod for FlowNatV1 {}
const _: () = assert!(std::mem::size_of::<FlowNatV1>() == 32);

impl FlowNatV1 {
    /// The V2 entry: same translation; a TCP flow that lived through the upgrade is taken as
    /// established (it had entries, so it had traffic; the collector then gives it the
    /// established timeout rather than the embryonic one).
    pub fn upgrade(&self, proto: u8) -> FlowNat {
        FlowNat {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            flags: self.flags,
            backend_set: self.backend_set,
            state: if proto == IPPROTO_TCP {
                ct_state::ESTABLISHED
            } else {
                ct_state::NONE
            },
            _pad: [0; 3],
            last_seen_ns: self.last_seen_ns,
        }
    }
}

/// `XLB_BSET_V1`'s value: `BackendSet` before the Maglev table size took half of the
/// generation field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSetV1 {
    pub count: u32,
    pub generation: u32,
}

// SAFETY: plain `repr(C)` data with no padding holes, like the lb-common types.
unsafe impl aya::Pod for BackendSetV1 {}
const _: () = assert!(std::mem::size_of::<BackendSetV1>() == 8);

impl BackendSetV1 {
    /// The V2 set: same backends and generation, no Maglev table yet (the V1 programs chose
    /// `hash % count`, and so do the V2 programs for a set without a table). The agent's first
    /// apply writes the table into the other generation and switches to it.
    pub fn upgrade(&self) -> BackendSet {
        BackendSet {
            count: self.count,
            generation: self.generation as u16,
            table_size: 0,
        }
    }
}

/// What becomes of a retired map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Conntrack V1 -> the established table of V2.
    CopyConntrackV1,
    /// Backend sets V1 -> V2, once, before the agent adopts the maps.
    CopyBackendSetsV1,
    Drop,
}

/// Every name an earlier layout pinned that this one no longer uses.
const RETIRED: [(&str, Fate); 5] = [
    ("XLB_CT_V1", Fate::CopyConntrackV1),
    ("XLB_BSET_V1", Fate::CopyBackendSetsV1),
    ("XLB_STATS_V1", Fate::Drop),
    ("XLB_SOCK_V1", Fate::Drop),
    ("XLB_CONFIG_V1", Fate::Drop),
];

/// A migration in progress: the retired maps found, after the first copy.
#[derive(Debug, Default)]
pub struct Migration {
    pin_path: PathBuf,
    found: Vec<(&'static str, Fate)>,
    /// Entries carried over so far.
    pub copied: usize,
    /// Whether the first copy ran (what is copied once is copied by it).
    first_copy_done: bool,
}

impl Migration {
    /// Looks for retired maps under `pin_path` and copies what must survive into the new
    /// maps (which the freshly loaded object has pinned there). Call before attaching, and
    /// before the map writer adopts the maps (it must see the carried-over sets).
    pub fn start(pin_path: &Path) -> Result<Self> {
        let mut migration = Migration {
            pin_path: pin_path.to_path_buf(),
            ..Migration::default()
        };
        for (name, fate) in RETIRED {
            if pin_path.join(name).exists() {
                migration.found.push((name, fate));
            }
        }
        if migration.found.is_empty() {
            return Ok(migration);
        }
        let names: Vec<&str> = migration.found.iter().map(|(n, _)| *n).collect();
        info!(retired = ?names, "pinned maps of an earlier layout found; migrating");
        migration.copy()?;
        Ok(migration)
    }

    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Copies once more (what the old programs created since), then unpins the retired
    /// maps. Call after the links carry the new programs.
    pub fn finish(mut self) -> Result<usize> {
        if self.found.is_empty() {
            return Ok(0);
        }
        self.copy()?;
        for (name, _) in &self.found {
            let path = self.pin_path.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(map = name, error = %e, "could not unpin a retired map"),
            }
        }
        info!(
            copied = self.copied,
            "migration done: retired maps unpinned"
        );
        Ok(self.copied)
    }

    fn copy(&mut self) -> Result<()> {
        for (name, fate) in self.found.clone() {
            match fate {
                Fate::Drop => {}
                // Only before the agent adopted the maps: later, the agent owns the sets.
                Fate::CopyBackendSetsV1 if self.first_copy_done => {}
                Fate::CopyBackendSetsV1 => {
                    self.copied += copy_backend_sets_v1(
                        &self.pin_path.join(name),
                        &self.pin_path.join(map_name::BACKEND_SETS),
                    )?
                }
                Fate::CopyConntrackV1 => {
                    self.copied += copy_conntrack_v1(
                        &self.pin_path.join(name),
                        &self.pin_path.join(map_name::CONNTRACK),
                    )?
                }
            }
        }
        self.first_copy_done = true;
        Ok(())
    }
}

/// Copies V1 backend sets that the V2 map does not have yet. Returns how many.
fn copy_backend_sets_v1(old: &Path, new: &Path) -> Result<usize> {
    let old: HashMap<MapData, u32, BackendSetV1> = open(old)?;
    let mut new: HashMap<MapData, u32, BackendSet> = open(new)?;
    let mut copied = 0;
    for entry in old.iter() {
        let (id, set) = entry.context("reading the retired backend-set map")?;
        match new.insert(id, set.upgrade(), BPF_NOEXIST) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).context("writing the backend-set map"),
        }
    }
    Ok(copied)
}

/// Copies V1 conntrack entries that the V2 table does not have yet. Returns how many.
fn copy_conntrack_v1(old: &Path, new: &Path) -> Result<usize> {
    let old: HashMap<MapData, FlowKey, FlowNatV1> = open(old)?;
    let mut new: HashMap<MapData, FlowKey, FlowNat> = open(new)?;
    let mut copied = 0;
    for entry in old.iter() {
        let (key, value) = match entry {
            Ok(entry) => entry,
            // An LRU entry evicted between two reads of the walk: skip it.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e).context("reading the retired conntrack map"),
        };
        // BPF_NOEXIST: what the new programs already wrote is newer.
        match new.insert(key, value.upgrade(key.proto), BPF_NOEXIST) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).context("writing the conntrack map"),
        }
    }
    Ok(copied)
}

fn open<K: aya::Pod, V: aya::Pod>(path: &Path) -> Result<HashMap<MapData, K, V>> {
    let data = MapData::from_pin(path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data)
        .with_context(|| format!("map {}", path.display()))?
        .try_into()
        .with_context(|| format!("map {} has an unexpected layout", path.display()))
}
