//! The only code that writes the load-balancer maps: applies the difference between the
//! desired state and what the maps hold, touching only what changed.
//!
//! Update order (docs/datapath.md): backend sets are created or switched before any
//! frontend points at them, frontends are removed before their sets, and a set's new
//! backends are written into its inactive generation before one atomic update of the set
//! switches readers over. A packet never sees a half-written service. A set's Maglev table
//! (model/maglev.rs) is computed here and written into the same inactive generation, so
//! the switch moves readers to new slots and their table at once.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData,
    },
    Ebpf,
};
use lb_common::{
    map_name, Backend, BackendSet, BackendSlot, DatapathConfig, MaglevChunk, MaglevKey, MemberKey,
    ServiceKey, ServiceValue, SetName, SourceRange, MAGLEV_CHUNK, SOURCE_RANGE_FRONTEND_BITS,
};
use tracing::warn;

use crate::model::{maglev, BackendSetName, DesiredState, Ipv4Cidr, StateDelta};

/// A backend set as installed in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct InstalledSet {
    id: u32,
    generation: u32,
    backends: Vec<Backend>,
    /// Maglev table size of the current generation; 0 for none.
    table_size: u32,
}

/// What one `apply` changed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub sets_created: usize,
    pub sets_updated: usize,
    pub sets_deleted: usize,
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    /// Map update/delete syscalls issued.
    pub map_ops: usize,
    /// Maglev table chunks written (included in `map_ops`).
    pub maglev_chunks_written: usize,
}

impl ApplyStats {
    pub fn changed(&self) -> bool {
        self.map_ops > 0
    }
}

pub struct MapWriter {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backend_sets: HashMap<MapData, u32, BackendSet>,
    backends: HashMap<MapData, BackendSlot, Backend>,
    set_names: HashMap<MapData, u32, SetName>,
    members: HashMap<MapData, MemberKey, u32>,
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    /// M of sets whose service did not choose one (`--maglev-table-size`).
    default_table_size: u32,
    /// Table chunks found at adoption that belong to no current table.
    stray_chunks: Vec<MaglevKey>,
    source_ranges: LpmTrie<MapData, SourceRange, u32>,
    config: Array<MapData, DatapathConfig>,
    /// Mirror of `source_ranges`.
    ranges: BTreeSet<(ServiceKey, Ipv4Cidr)>,
    /// Membership entries found at adoption that do not match the adopted sets.
    stray_members: Vec<MemberKey>,
    missing_members: Vec<MemberKey>,
    /// Mirror of the maps' content, by set name and by frontend.
    sets: BTreeMap<BackendSetName, InstalledSet>,
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    /// Entries found at adoption that belong to nothing known; removed by the next apply.
    stray_slots: Vec<BackendSlot>,
    stray_sets: Vec<u32>,
    next_id: u32,
    free_ids: Vec<u32>,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing or already taken"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type or layout"))
}

impl MapWriter {
    /// Takes the maps from a loaded object and adopts whatever they already hold.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        let mut writer = Self {
            services: take(ebpf, map_name::SERVICES)?,
            backend_sets: take(ebpf, map_name::BACKEND_SETS)?,
            backends: take(ebpf, map_name::BACKENDS)?,
            set_names: take(ebpf, map_name::SET_NAMES)?,
            members: take(ebpf, map_name::MEMBERS)?,
            maglev: take(ebpf, map_name::MAGLEV)?,
            default_table_size: maglev::DEFAULT_TABLE_SIZE,
            stray_chunks: Vec::new(),
            source_ranges: take(ebpf, map_name::SOURCE_RANGES)?,
            config: take(ebpf, map_name::CONFIG)?,
            ranges: BTreeSet::new(),
            stray_members: Vec::new(),
            missing_members: Vec::new(),
            sets: BTreeMap::new(),
            frontends: BTreeMap::new(),
            stray_slots: Vec::new(),
            stray_sets: Vec::new(),
            next_id: 1,
            free_ids: Vec::new(),
        };
        writer.adopt()?;
        Ok(writer)
    }

    /// Rebuilds the mirror from pinned maps left by a previous agent, so that the first
    /// apply after a restart is a diff, not a flush.
    fn adopt(&mut self) -> Result<()> {
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        for entry in self.set_names.iter() {
            let (id, name) = entry.context("reading set names")?;
            names.insert(id, name.as_str().to_string());
        }
        let mut slots: BTreeMap<u32, BTreeMap<u32, (u32, Backend)>> = BTreeMap::new();
        for entry in self.backends.iter() {
            let (slot, backend) = entry.context("reading backends")?;
            slots
                .entry(slot.set)
                .or_default()
                .insert(slot.slot, (slot.generation(), backend));
        }
        let mut seen_names = BTreeSet::new();
        for entry in self.backend_sets.iter() {
            let (id, set) = entry.context("reading backend sets")?;
            self.next_id = self.next_id.max(id + 1);
            match names.get(&id) {
                Some(name) if seen_names.insert(name.clone()) => {
                    let mut backends = Vec::new();
                    for index in 0..set.count {
                        let slot = BackendSlot::new(id, u32::from(set.generation), index);
                        match slots.get(&id).and_then(|s| s.get(&slot.slot)) {
                            Some((_, b)) => backends.push(*b),
                            None => {
                                warn!(set = name.as_str(), index, "pinned backend slot missing")
                            }
                        }
                    }
                    self.sets.insert(
                        name.clone(),
                        InstalledSet {
                            id,
                            generation: u32::from(set.generation),
                            backends,
                            table_size: u32::from(set.table_size),
                        },
                    );
                }
                _ => self.stray_sets.push(id),
            }
        }
        for (id, by_slot) in &slots {
            let current = self.sets.values().find(|s| s.id == *id);
            for (raw, (generation, _)) in by_slot {
                let slot = BackendSlot {
                    set: *id,
                    slot: *raw,
                };
                let live = current.is_some_and(|s| {
                    s.generation == *generation && slot.index() < s.backends.len() as u32
                });
                if !live {
                    self.stray_slots.push(slot);
                }
            }
        }
        for key in self.maglev.keys() {
            let key = key.context("reading Maglev tables")?;
            let live = self.sets.values().any(|s| {
                s.id == key.set
                    && s.generation == key.generation()
                    && key.chunk() < chunk_count(s.table_size)
            });
            if !live {
                self.stray_chunks.push(key);
            }
        }
        for entry in self.services.iter() {
            let (key, value) = entry.context("reading services")?;
            self.frontends.insert(key, value);
        }
        let mut pinned_members = BTreeSet::new();
        for key in self.members.keys() {
            pinned_members.insert(key.context("reading members")?);
        }
        let expected: BTreeSet<MemberKey> = self
            .sets
            .values()
            .flat_map(|s| s.backends.iter().map(|b| member(s.id, b)))
            .collect();
        self.stray_members = pinned_members.difference(&expected).copied().collect();
        self.missing_members = expected.difference(&pinned_members).copied().collect();
        for key in self.source_ranges.keys() {
            let key = key.context("reading source ranges")?;
            let data = key.data();
            let prefix = (key.prefix_len().saturating_sub(SOURCE_RANGE_FRONTEND_BITS)) as u8;
            let cidr = Ipv4Cidr {
                addr: std::net::Ipv4Addr::from(u32::from_be(data.source)),
                prefix,
            };
            self.ranges.insert((data.frontend, cidr));
        }
        let used: BTreeSet<u32> = self.sets.values().map(|s| s.id).collect();
        self.free_ids = (1..self.next_id)
            .filter(|id| !used.contains(id))
            .rev()
            .collect();
        if !self.sets.is_empty() || !self.frontends.is_empty() {
            tracing::info!(
                sets = self.sets.len(),
                frontends = self.frontends.len(),
                "adopted pinned datapath state"
            );
        }
        Ok(())
    }

    pub fn write_config(&mut self, config: &DatapathConfig) -> Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing datapath config")
    }

    pub fn config(&self) -> Result<DatapathConfig> {
        self.config.get(&0, 0).context("reading datapath config")
    }

    /// Sets the Maglev table size of sets whose service chose none. Tables already
    /// installed with another size are rewritten by the next full [`apply`](Self::apply).
    pub fn set_default_table_size(&mut self, m: u32) -> Result<()> {
        maglev::check_table_size(m).map_err(anyhow::Error::msg)?;
        self.default_table_size = m;
        Ok(())
    }

    /// The table size a set should have: none for fewer than two backends (every flow has
    /// one choice; a table would only cost memory) or more than u16 indexes can name.
    fn wanted_table_size(&self, desired: &DesiredState, name: &str, backends: &[Backend]) -> u32 {
        if backends.len() < 2 || backends.len() > usize::from(u16::MAX) + 1 {
            return 0;
        }
        match desired.maglev_table_sizes.get(name) {
            Some(m) if maglev::check_table_size(*m).is_ok() => *m,
            // The model validates annotations; anything else gets the default, not a panic.
            Some(m) => {
                warn!(
                    set = name,
                    size = m,
                    "invalid Maglev table size; using the default"
                );
                self.default_table_size
            }
            None => self.default_table_size,
        }
    }

    fn alloc_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }

    /// Makes the maps hold `desired`, touching only what differs from what they hold now.
    /// Compares every frontend and set: use it for the first apply (after adoption) and
    /// after a failed one; [`apply_delta`](Self::apply_delta) otherwise.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyStats> {
        let sets: BTreeSet<BackendSetName> = desired
            .backend_sets
            .keys()
            .chain(self.sets.keys())
            .cloned()
            .collect();
        let frontends: BTreeSet<ServiceKey> = desired
            .frontends
            .keys()
            .chain(self.frontends.keys())
            .copied()
            .collect();
        self.apply_keys(desired, &sets, &frontends)
    }

    /// Like [`apply`](Self::apply), but looks only at the frontends and sets `delta`
    /// names: the cost of an update is proportional to what changed, not to the number
    /// of services. `desired` must be the state `delta` was computed into.
    pub fn apply_delta(
        &mut self,
        desired: &DesiredState,
        delta: &StateDelta,
    ) -> Result<ApplyStats> {
        self.apply_keys(desired, &delta.backend_sets, &delta.frontends)
    }

    fn apply_keys(
        &mut self,
        desired: &DesiredState,
        set_names: &BTreeSet<BackendSetName>,
        frontend_keys: &BTreeSet<ServiceKey>,
    ) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();

        // 1. Backend sets: new ones, and new generations of changed ones.
        for (name, backends) in set_names
            .iter()
            .filter_map(|name| desired.backend_sets.get_key_value(name))
        {
            let wanted_size = self.wanted_table_size(desired, name, backends);
            match self.sets.get(name).cloned() {
                None => {
                    let id = self.alloc_id();
                    self.write_slots(id, 0, backends, &mut stats)?;
                    let table_size = self.write_table(id, 0, backends, wanted_size, &mut stats);
                    self.backend_sets
                        .insert(
                            id,
                            BackendSet {
                                count: backends.len() as u32,
                                generation: 0,
                                table_size: table_size as u16,
                            },
                            0,
                        )
                        .with_context(|| format!("creating backend set {name}"))?;
                    self.set_names
                        .insert(id, SetName::new(name), 0)
                        .context("writing set name")?;
                    stats.map_ops += 2;
                    for b in backends {
                        self.members
                            .insert(member(id, b), 0, 0)
                            .context("writing set member")?;
                        stats.map_ops += 1;
                    }
                    stats.sets_created += 1;
                    self.sets.insert(
                        name.clone(),
                        InstalledSet {
                            id,
                            generation: 0,
                            backends: backends.clone(),
                            table_size,
                        },
                    );
                }
                Some(installed)
                    if installed.backends != *backends || installed.table_size != wanted_size =>
                {
                    let generation = 1 - installed.generation;
                    self.write_slots(installed.id, generation, backends, &mut stats)?;
                    let table_size = self.write_table(
                        installed.id,
                        generation,
                        backends,
                        wanted_size,
                        &mut stats,
                    );
                    let old: BTreeSet<MemberKey> = installed
                        .backends
                        .iter()
                        .map(|b| member(installed.id, b))
                        .collect();
                    let new: BTreeSet<MemberKey> =
                        backends.iter().map(|b| member(installed.id, b)).collect();
                    for key in new.difference(&old) {
                        self.members
                            .insert(key, 0, 0)
                            .context("writing set member")?;
                        stats.map_ops += 1;
                    }
                    // The switch: one atomic value replacement.
                    self.backend_sets
                        .insert(
                            installed.id,
                            BackendSet {
                                count: backends.len() as u32,
                                generation: generation as u16,
                                table_size: table_size as u16,
                            },
                            0,
                        )
                        .with_context(|| format!("switching backend set {name}"))?;
                    stats.map_ops += 1;
                    // The old table before its slots: a reader that still holds the old
                    // generation and misses its chunk falls back to `hash % count` over slots
                    // that are still there.
                    self.delete_table(
                        installed.id,
                        installed.generation,
                        installed.table_size,
                        &mut stats,
                    );
                    self.delete_slots(
                        installed.id,
                        installed.generation,
                        installed.backends.len(),
                        &mut stats,
                    );
                    for key in old.difference(&new) {
                        remove_quietly(&mut self.members, key);
                        stats.map_ops += 1;
                    }
                    stats.sets_updated += 1;
                    self.sets.insert(
                        name.clone(),
                        InstalledSet {
                            id: installed.id,
                            generation,
                            backends: backends.clone(),
                            table_size,
                        },
                    );
                }
                Some(_) => {}
            }
        }

        for key in std::mem::take(&mut self.missing_members) {
            self.members
                .insert(key, 0, 0)
                .context("writing set member")?;
            stats.map_ops += 1;
        }

        // 2. Source ranges before the frontends that check them, then the frontends.
        let desired_ranges: BTreeSet<(ServiceKey, Ipv4Cidr)> = frontend_keys
            .iter()
            .filter_map(|key| desired.frontends.get_key_value(key))
            .flat_map(|(key, f)| f.source_ranges.iter().map(move |cidr| (*key, *cidr)))
            .collect();
        let installed_ranges: BTreeSet<(ServiceKey, Ipv4Cidr)> = self
            .ranges
            .iter()
            .filter(|(key, _)| frontend_keys.contains(key))
            .copied()
            .collect();
        for (key, cidr) in desired_ranges.difference(&installed_ranges) {
            self.source_ranges
                .insert(&range_key(key, cidr), 0, 0)
                .context("writing source range")?;
            self.ranges.insert((*key, *cidr));
            stats.map_ops += 1;
        }
        for (key, frontend) in frontend_keys
            .iter()
            .filter_map(|key| desired.frontends.get_key_value(key))
        {
            let Some(set) = self.sets.get(&frontend.backend_set) else {
                warn!(
                    set = frontend.backend_set.as_str(),
                    "frontend names an unknown backend set; skipped"
                );
                continue;
            };
            let cluster_set = frontend
                .cluster_set
                .as_ref()
                .and_then(|name| self.sets.get(name))
                .map_or(0, |s| s.id);
            let value = ServiceValue {
                backend_set: set.id,
                cluster_set,
                flags: frontend.flags,
                affinity_timeout: frontend.affinity_timeout,
            };
            if self.frontends.get(key) != Some(&value) {
                self.services
                    .insert(key, value, 0)
                    .context("writing frontend")?;
                self.frontends.insert(*key, value);
                stats.map_ops += 1;
                stats.frontends_written += 1;
            }
        }

        // 3. Frontends that are gone, before the sets they point at.
        let gone: Vec<ServiceKey> = frontend_keys
            .iter()
            .filter(|k| self.frontends.contains_key(k) && !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            remove_quietly(&mut self.services, &key);
            self.frontends.remove(&key);
            stats.map_ops += 1;
            stats.frontends_deleted += 1;
        }

        for (key, cidr) in installed_ranges.difference(&desired_ranges) {
            match self.source_ranges.remove(&range_key(key, cidr)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => warn!(error = %e, "source range delete failed"),
            }
            self.ranges.remove(&(*key, *cidr));
            stats.map_ops += 1;
        }

        // 4. Sets that are gone.
        let gone: Vec<BackendSetName> = set_names
            .iter()
            .filter(|n| self.sets.contains_key(*n) && !desired.backend_sets.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            let installed = self.sets.remove(&name).expect("listed above");
            remove_quietly(&mut self.backend_sets, &installed.id);
            remove_quietly(&mut self.set_names, &installed.id);
            stats.map_ops += 2;
            self.delete_slots(
                installed.id,
                installed.generation,
                installed.backends.len(),
                &mut stats,
            );
            self.delete_table(
                installed.id,
                installed.generation,
                installed.table_size,
                &mut stats,
            );
            for b in &installed.backends {
                remove_quietly(&mut self.members, &member(installed.id, b));
                stats.map_ops += 1;
            }
            self.free_ids.push(installed.id);
            stats.sets_deleted += 1;
        }

        // 5. Leftovers found at adoption.
        for key in std::mem::take(&mut self.stray_members) {
            remove_quietly(&mut self.members, &key);
            stats.map_ops += 1;
        }
        for slot in std::mem::take(&mut self.stray_slots) {
            remove_quietly(&mut self.backends, &slot);
            stats.map_ops += 1;
        }
        for key in std::mem::take(&mut self.stray_chunks) {
            remove_quietly(&mut self.maglev, &key);
            stats.map_ops += 1;
        }
        for id in std::mem::take(&mut self.stray_sets) {
            if !self.frontends.values().any(|v| v.backend_set == id) {
                remove_quietly(&mut self.backend_sets, &id);
                remove_quietly(&mut self.set_names, &id);
                stats.map_ops += 2;
                if !self.sets.values().any(|s| s.id == id) {
                    self.free_ids.push(id);
                }
            }
        }
        Ok(stats)
    }

    fn write_slots(
        &mut self,
        id: u32,
        generation: u32,
        backends: &[Backend],
        stats: &mut ApplyStats,
    ) -> Result<()> {
        for (index, backend) in backends.iter().enumerate() {
            self.backends
                .insert(BackendSlot::new(id, generation, index as u32), backend, 0)
                .context("writing backend slot (is the backends map full?)")?;
            stats.map_ops += 1;
        }
        Ok(())
    }

    /// Writes the Maglev table of `backends` (size `m`, 0 for none) into `generation` of
    /// set `id`, whole: a membership change moves about 2·M/N of the M entries, spread over
    /// the whole table, so nearly every chunk changes anyway (docs/datapath.md). Returns the
    /// size written; 0 when the table could not be written (map full), so that the set falls
    /// back to `hash % count` instead of failing.
    fn write_table(
        &mut self,
        id: u32,
        generation: u32,
        backends: &[Backend],
        m: u32,
        stats: &mut ApplyStats,
    ) -> u32 {
        if m == 0 {
            return 0;
        }
        let table = maglev::backend_table(backends, m);
        for (chunk, entries) in table.chunks(MAGLEV_CHUNK as usize).enumerate() {
            let mut value = MaglevChunk {
                backends: [0; MAGLEV_CHUNK as usize],
            };
            for (to, from) in value.backends.iter_mut().zip(entries) {
                *to = *from as u16;
            }
            let key = MaglevKey::new(id, generation, chunk as u32);
            stats.map_ops += 1;
            if let Err(e) = self.maglev.insert(key, value, 0) {
                warn!(set = id, error = %e, "Maglev table not written (map full?); the set balances by hash % count");
                self.delete_table(id, generation, m, stats);
                return 0;
            }
            stats.maglev_chunks_written += 1;
        }
        m
    }

    fn delete_table(&mut self, id: u32, generation: u32, m: u32, stats: &mut ApplyStats) {
        for chunk in 0..chunk_count(m) {
            remove_quietly(&mut self.maglev, &MaglevKey::new(id, generation, chunk));
            stats.map_ops += 1;
        }
    }

    fn delete_slots(&mut self, id: u32, generation: u32, count: usize, stats: &mut ApplyStats) {
        for index in 0..count as u32 {
            remove_quietly(&mut self.backends, &BackendSlot::new(id, generation, index));
            stats.map_ops += 1;
        }
    }
}

/// Chunks of a table of size `m` (0: none).
fn chunk_count(m: u32) -> u32 {
    m.div_ceil(MAGLEV_CHUNK)
}

fn member(set: u32, backend: &Backend) -> MemberKey {
    MemberKey {
        set,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    }
}

fn range_key(frontend: &ServiceKey, cidr: &Ipv4Cidr) -> Key<SourceRange> {
    let source = (u32::from(cidr.addr) & cidr.mask()).to_be();
    Key::new(
        SOURCE_RANGE_FRONTEND_BITS + u32::from(cidr.prefix),
        SourceRange {
            frontend: *frontend,
            source,
        },
    )
}

/// Removing something already gone is fine; anything else is worth a warning, not a stop.
fn remove_quietly<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
) {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => warn!(?key, error = %e, "map delete failed"),
    }
}
