//! Every map of the datapath. Names and layouts come from lb-common; the `name` literals
//! must equal `lb_common::map_name::*` (the agent refuses an object that lacks one).
//! All maps are pinned by name under the agent's `--pin-path`, so a restarted agent adopts
//! them and the conntrack table survives.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    capacity, stat, Backend, BackendSet, BackendSlot, DatapathConfig, FlowKey, FlowNat, ServiceKey,
    ServiceValue, SetName,
};

#[map(name = "XLB_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

#[map(name = "XLB_BSET_V1")]
pub static BACKEND_SETS: HashMap<u32, BackendSet> = HashMap::pinned(capacity::BACKEND_SETS, 0);

#[map(name = "XLB_BACKEND_V1")]
pub static BACKENDS: HashMap<BackendSlot, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

/// LRU: under pressure the least recently used flows go first, never a new insert failing.
#[map(name = "XLB_CT_V1")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowNat> = LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map(name = "XLB_STATS_V1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

#[map(name = "XLB_CONFIG_V1")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

/// Written by the agent for `xlb services`; the programs never read it.
#[map(name = "XLB_NAMES_V1")]
pub static SET_NAMES: HashMap<u32, SetName> = HashMap::pinned(capacity::SET_NAMES, 0);
