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
        Array, HashMap, IterableMap, MapData,
    },
    Ebpf,
};
use lb_common::{
    map_name, Backend, BackendSet, BackendSlot, DatapathConfig, MaglevChunk, MaglevKey, MemberKey,
    ServiceKey, ServiceValue, SetName, SourceRange, CFG_F_NO_POD_FRONTENDS, CFG_F_READY,
    MAGLEV_CHUNK, SOURCE_RANGE_FRONTEND_BITS,
};
use tracing::warn;

use super::batch;
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

/// A set being written: a new one (`old` None) or a new generation of an installed one.
struct PendingSet {
    name: BackendSetName,
    id: u32,
    generation: u32,
    backends: Vec<Backend>,
    /// Maglev table size; 0 for none (also when the table could not be written).
    table_size: u32,
    old: Option<InstalledSet>,
}

/// Membership entries a pending set adds.
fn joining_members(p: &PendingSet) -> Vec<MemberKey> {
    let old: BTreeSet<MemberKey> = p
        .old
        .iter()
        .flat_map(|o| o.backends.iter().map(|b| member(o.id, b)))
        .collect();
    let new: BTreeSet<MemberKey> = p.backends.iter().map(|b| member(p.id, b)).collect();
    new.difference(&old).copied().collect()
}

/// What one `apply` changed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub sets_created: usize,
    pub sets_updated: usize,
    pub sets_deleted: usize,
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    /// Map entries written or deleted (written in batches: far fewer syscalls).
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
    /// Node-side pod veths the TC program may deliver into (`XLB_PODDEV_V1`).
    pod_devices: HashMap<MapData, u32, u32>,
    /// The config as the agent gave it; the map holds it with `CFG_F_NO_POD_FRONTENDS`
    /// added while that holds.
    base_config: Option<DatapathConfig>,
    /// Whether the config map holds `CFG_F_NO_POD_FRONTENDS`.
    no_pod_frontends: bool,
    /// Frontends in the mirror whose address lies inside the cluster CIDR.
    pod_cidr_frontends: usize,
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
            pod_devices: take(ebpf, map_name::POD_DEVICES)?,
            base_config: None,
            no_pod_frontends: false,
            pod_cidr_frontends: 0,
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
        // A previous agent's config stays in force until the agent writes its own; its
        // CFG_F_NO_POD_FRONTENDS is re-derived from the adopted frontends meanwhile.
        let adopted = writer.config()?;
        if adopted.flags & CFG_F_READY != 0 {
            writer.write_config(&adopted)?;
        }
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

    /// Writes the datapath config. The writer adds `CFG_F_NO_POD_FRONTENDS` while no
    /// frontend it wrote lies inside `config`'s cluster CIDR, and keeps that true.
    pub fn write_config(&mut self, config: &DatapathConfig) -> Result<()> {
        self.base_config = Some(*config);
        self.pod_cidr_frontends = self
            .frontends
            .keys()
            .filter(|k| self.in_cluster_cidr(k))
            .count();
        let flag = self.pod_frontends_flag_wanted();
        self.write_config_flag(flag)
    }

    fn in_cluster_cidr(&self, key: &ServiceKey) -> bool {
        self.base_config.is_some_and(|c| {
            c.cluster_cidr_mask != 0 && key.addr & c.cluster_cidr_mask == c.cluster_cidr_addr
        })
    }

    fn pod_frontends_flag_wanted(&self) -> bool {
        self.pod_cidr_frontends == 0 && self.base_config.is_some_and(|c| c.cluster_cidr_mask != 0)
    }

    fn write_config_flag(&mut self, no_pod_frontends: bool) -> Result<()> {
        let Some(mut config) = self.base_config else {
            return Ok(());
        };
        if no_pod_frontends {
            config.flags |= CFG_F_NO_POD_FRONTENDS;
        } else {
            config.flags &= !CFG_F_NO_POD_FRONTENDS;
        }
        self.config
            .set(0, config, 0)
            .context("writing datapath config")?;
        self.no_pod_frontends = no_pod_frontends;
        Ok(())
    }

    pub fn config(&self) -> Result<DatapathConfig> {
        self.config.get(&0, 0).context("reading datapath config")
    }

    /// Sets the Maglev table size of sets whose service chose none. Tables already
    /// installed with another size are rewritten by the next full [`apply`](Self::apply).
    /// Makes the pod-device map hold exactly `ifindexes` (the pod veths attached now):
    /// entries of interfaces that are gone, also ones a previous agent left, are removed
    /// first, so a reused interface index never names a device that is not a pod veth.
    /// Returns how many entries changed.
    pub fn set_pod_devices(&mut self, ifindexes: &BTreeSet<u32>) -> Result<usize> {
        let present: BTreeSet<u32> = self
            .pod_devices
            .keys()
            .collect::<Result<_, _>>()
            .context("reading pod devices")?;
        let mut changed = 0;
        for gone in present.difference(ifindexes) {
            remove_quietly(&mut self.pod_devices, gone);
            changed += 1;
        }
        for new in ifindexes.difference(&present) {
            self.pod_devices
                .insert(new, 0, 0)
                .with_context(|| format!("registering pod device {new}"))?;
            changed += 1;
        }
        Ok(changed)
    }

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

        // 1. Backend sets: new ones, and new generations of changed ones, each kind of
        // entry in one batch for all sets: slots, tables and new members first, then the
        // set entries that publish them (a create, or the switch to the new generation).
        let mut pending: Vec<PendingSet> = Vec::new();
        for (name, backends) in set_names
            .iter()
            .filter_map(|name| desired.backend_sets.get_key_value(name))
        {
            let wanted_size = self.wanted_table_size(desired, name, backends);
            let old = match self.sets.get(name) {
                None => None,
                Some(installed)
                    if installed.backends != *backends || installed.table_size != wanted_size =>
                {
                    Some(installed.clone())
                }
                Some(_) => continue,
            };
            let (id, generation) = match &old {
                Some(installed) => (installed.id, 1 - installed.generation),
                None => (self.alloc_id(), 0),
            };
            pending.push(PendingSet {
                name: name.clone(),
                id,
                generation,
                backends: backends.clone(),
                table_size: wanted_size,
                old,
            });
        }
        if !pending.is_empty() {
            self.write_sets(&mut pending, &mut stats)?;
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
        let mut frontend_keys_out = Vec::new();
        let mut frontend_values = Vec::new();
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
                frontend_keys_out.push(*key);
                frontend_values.push(value);
            }
        }
        // A frontend inside the cluster CIDR: the datapath must look pod addresses up
        // before the frontend exists.
        if self.no_pod_frontends && frontend_keys_out.iter().any(|k| self.in_cluster_cidr(k)) {
            self.write_config_flag(false)?;
        }
        let result = batch::update(
            self.services.map(),
            map_name::SERVICES,
            &frontend_keys_out,
            &frontend_values,
        );
        let written = result
            .as_ref()
            .map_or_else(|e| e.written, |()| frontend_keys_out.len());
        // The mirror holds what was written, also when the batch stopped partway.
        for (key, value) in frontend_keys_out.iter().zip(&frontend_values).take(written) {
            if self.frontends.insert(*key, *value).is_none() && self.in_cluster_cidr(key) {
                self.pod_cidr_frontends += 1;
            }
        }
        stats.map_ops += written;
        stats.frontends_written += written;
        result.context("writing frontends")?;

        // 3. Frontends that are gone, before the sets they point at.
        let gone: Vec<ServiceKey> = frontend_keys
            .iter()
            .filter(|k| self.frontends.contains_key(k) && !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            remove_quietly(&mut self.services, &key);
            if self.frontends.remove(&key).is_some() && self.in_cluster_cidr(&key) {
                self.pod_cidr_frontends -= 1;
            }
            stats.map_ops += 1;
            stats.frontends_deleted += 1;
        }

        // The last frontend inside the cluster CIDR is gone (or there never was one).
        if !self.no_pod_frontends && self.pod_frontends_flag_wanted() {
            self.write_config_flag(true)?;
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

    /// Writes `pending` (new sets and new generations of changed ones) so that readers never
    /// see a half-written set: every slot, table chunk and joining member of every set is
    /// in the maps before the set entries that publish them, each kind in one batch. Then
    /// the old generations go, table before slots. Updates the mirror for every set it
    /// published; on an error, removes again what sets it did not publish had written and
    /// frees their ids, so that the maps and the mirror agree.
    fn write_sets(&mut self, pending: &mut [PendingSet], stats: &mut ApplyStats) -> Result<()> {
        // Many tables (a first apply) are computed on another thread while this one waits
        // for the kernel's inserts of slots, members and names: on two cores the Maglev
        // computation, a fifth of a cold apply, is then hidden. A few (an endpoint change)
        // are computed here: a thread would cost more than they do.
        let many = pending.iter().filter(|p| p.table_size != 0).count() >= PARALLEL_TABLES;
        let (written, tables) = std::thread::scope(|scope| {
            let shared: &[PendingSet] = pending;
            let tables = many.then(|| scope.spawn(|| TableChunks::of(shared)));
            let written = self.write_members_of(shared, stats);
            let tables = tables.map(|t| t.join().expect("Maglev table computation panicked"));
            (written, tables)
        });
        written?;
        let tables = tables.unwrap_or_else(|| TableChunks::of(pending));
        self.write_tables(pending, tables, stats);

        // The publication: per set, one atomic value write (a create, or the switch of
        // generation), in order.
        let set_keys: Vec<u32> = pending.iter().map(|p| p.id).collect();
        let set_values: Vec<BackendSet> = pending
            .iter()
            .map(|p| BackendSet {
                count: p.backends.len() as u32,
                generation: p.generation as u16,
                table_size: p.table_size as u16,
            })
            .collect();
        let result = batch::update(
            self.backend_sets.map(),
            map_name::BACKEND_SETS,
            &set_keys,
            &set_values,
        );
        let published = result
            .as_ref()
            .map_or_else(|e| e.written, |()| pending.len());
        stats.map_ops += published;
        let (done, not_done) = pending.split_at_mut(published);
        for p in done {
            self.publish(p, stats);
        }
        if let Err(e) = result {
            self.unwind(not_done, stats);
            return Err(anyhow::Error::new(e).context("writing backend sets"));
        }
        Ok(())
    }

    /// The entries of `pending` other than tables and sets: backend slots, joining members,
    /// names of new sets. On an error, unwinds `pending`.
    fn write_members_of(&mut self, pending: &[PendingSet], stats: &mut ApplyStats) -> Result<()> {
        let (slot_keys, slot_values): (Vec<BackendSlot>, Vec<Backend>) = pending
            .iter()
            .flat_map(|p| {
                p.backends.iter().enumerate().map(|(index, backend)| {
                    (BackendSlot::new(p.id, p.generation, index as u32), *backend)
                })
            })
            .unzip();
        let result = batch::update(
            self.backends.map(),
            map_name::BACKENDS,
            &slot_keys,
            &slot_values,
        );
        self.unwind_on_error(result, slot_keys.len(), pending, stats)
            .context("writing backend slots (map full?)")?;

        let joining: Vec<MemberKey> = pending.iter().flat_map(joining_members).collect();
        let zeros = vec![0u32; joining.len()];
        let result = batch::update(self.members.map(), map_name::MEMBERS, &joining, &zeros);
        self.unwind_on_error(result, joining.len(), pending, stats)
            .context("writing set members")?;

        // Names are for `xlb services` and adoption; the datapath never reads them.
        let (name_keys, name_values): (Vec<u32>, Vec<SetName>) = pending
            .iter()
            .filter(|p| p.old.is_none())
            .map(|p| (p.id, SetName::new(&p.name)))
            .unzip();
        let result = batch::update(
            self.set_names.map(),
            map_name::SET_NAMES,
            &name_keys,
            &name_values,
        );
        self.unwind_on_error(result, name_keys.len(), pending, stats)
            .context("writing set names")
    }

    /// Counts a batch's writes; on its failure, unwinds `pending`.
    fn unwind_on_error(
        &mut self,
        result: Result<(), batch::BatchError>,
        total: usize,
        pending: &[PendingSet],
        stats: &mut ApplyStats,
    ) -> Result<()> {
        match result {
            Ok(()) => {
                stats.map_ops += total;
                Ok(())
            }
            Err(e) => {
                stats.map_ops += e.written;
                self.unwind(pending, stats);
                Err(e.into())
            }
        }
    }

    /// The mirror takes a published set; its old generation, if any, goes: table before
    /// slots, since a reader that still holds the old generation and misses its chunk
    /// falls back to `hash % count` over slots that are still there.
    fn publish(&mut self, p: &mut PendingSet, stats: &mut ApplyStats) {
        if let Some(old) = &p.old {
            self.delete_table(old.id, old.generation, old.table_size, stats);
            self.delete_slots(old.id, old.generation, old.backends.len(), stats);
            let staying: BTreeSet<MemberKey> = p.backends.iter().map(|b| member(p.id, b)).collect();
            for b in &old.backends {
                let key = member(old.id, b);
                if !staying.contains(&key) {
                    remove_quietly(&mut self.members, &key);
                    stats.map_ops += 1;
                }
            }
            stats.sets_updated += 1;
        } else {
            stats.sets_created += 1;
        }
        self.sets.insert(
            p.name.clone(),
            InstalledSet {
                id: p.id,
                generation: p.generation,
                backends: std::mem::take(&mut p.backends),
                table_size: p.table_size,
            },
        );
    }

    /// Removes what sets that were not published wrote (or may have: a key not written is
    /// not found, which is fine), and frees the ids of new ones.
    fn unwind(&mut self, pending: &[PendingSet], stats: &mut ApplyStats) {
        for p in pending {
            self.delete_table(p.id, p.generation, p.table_size, stats);
            self.delete_slots(p.id, p.generation, p.backends.len(), stats);
            for key in joining_members(p) {
                remove_quietly(&mut self.members, &key);
                stats.map_ops += 1;
            }
            if p.old.is_none() {
                remove_quietly(&mut self.set_names, &p.id);
                stats.map_ops += 1;
                self.free_ids.push(p.id);
            }
        }
    }

    /// Writes the Maglev tables of `pending` (computed into `chunks`) into their new
    /// generations, whole: a membership change moves about 2·M/N of the M entries, spread
    /// over the whole table, so nearly every chunk changes anyway (docs/datapath.md). A
    /// table that cannot be written (map full) is removed again and its set's `table_size`
    /// set to 0, so that the set balances by `hash % count` instead of failing.
    fn write_tables(
        &mut self,
        pending: &mut [PendingSet],
        chunks: TableChunks,
        stats: &mut ApplyStats,
    ) {
        let TableChunks {
            keys,
            values,
            tables,
        } = chunks;
        let mut next = 0;
        while let Some((_, range)) = tables.get(next) {
            let first = range.start;
            let Err(e) = batch::update(
                self.maglev.map(),
                map_name::MAGLEV,
                &keys[first..],
                &values[first..],
            ) else {
                stats.map_ops += keys.len() - first;
                stats.maglev_chunks_written += keys.len() - first;
                break;
            };
            let failed_at = first + e.written;
            stats.map_ops += e.written + 1;
            let failed = next
                + tables[next..]
                    .iter()
                    .position(|(_, r)| r.contains(&failed_at))
                    .expect("the batch stopped inside a table");
            let (i, range) = tables[failed].clone();
            stats.maglev_chunks_written += range.start - first;
            let p = &mut pending[i];
            warn!(set = p.id, error = %e, "Maglev table not written (map full?); the set balances by hash % count");
            let (id, generation, m) = (p.id, p.generation, p.table_size);
            p.table_size = 0;
            self.delete_table(id, generation, m, stats);
            next = failed + 1;
        }
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

/// At least this many tables in one apply are computed on a thread of their own.
const PARALLEL_TABLES: usize = 64;

/// The Maglev tables of pending sets as map entries, in the order of the sets.
struct TableChunks {
    keys: Vec<MaglevKey>,
    values: Vec<MaglevChunk>,
    /// (index in `pending`, its chunks in `keys`), for the sets that have a table.
    tables: Vec<(usize, std::ops::Range<usize>)>,
}

impl TableChunks {
    fn of(pending: &[PendingSet]) -> Self {
        let mut chunks = TableChunks {
            keys: Vec::new(),
            values: Vec::new(),
            tables: Vec::new(),
        };
        for (i, p) in pending.iter().enumerate() {
            if p.table_size == 0 {
                continue;
            }
            let start = chunks.keys.len();
            let table = maglev::backend_table(&p.backends, p.table_size);
            for (chunk, entries) in table.chunks(MAGLEV_CHUNK as usize).enumerate() {
                let mut value = MaglevChunk {
                    backends: [0; MAGLEV_CHUNK as usize],
                };
                for (to, from) in value.backends.iter_mut().zip(entries) {
                    *to = *from as u16;
                }
                chunks
                    .keys
                    .push(MaglevKey::new(p.id, p.generation, chunk as u32));
                chunks.values.push(value);
            }
            chunks.tables.push((i, start..chunks.keys.len()));
        }
        chunks
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
