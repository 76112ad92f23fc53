//! Every map of the datapath. Names and layouts come from lb-common; the `name` literals
//! must equal `lb_common::map_name::*` (the agent refuses an object that lacks one).
//! All maps are pinned by name under the agent's `--pin-path`, so a restarted agent adopts
//! them and the conntrack table survives.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    capacity, stat, AffinityKey, AffinityValue, Backend, BackendSet, BackendSlot, DatapathConfig,
    FlowKey, FlowNat, FragmentKey, FragmentNat, MaglevChunk, MaglevKey, MemberKey, ServiceKey,
    ServiceValue, SetName, SockFrontend, SockPeer, SourceRange,
};

/// Control-plane maps are written by the agent only: allocate entries as they are written
/// instead of reserving memory for the full capacity up front (2M backend slots preallocated
/// would cost hundreds of MB per node). Lookups cost the same either way.
const ON_DEMAND: u32 = BPF_F_NO_PREALLOC;

#[map(name = "XLB_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, ON_DEMAND);

#[map(name = "XLB_BSET_V2")]
pub static BACKEND_SETS: HashMap<u32, BackendSet> =
    HashMap::pinned(capacity::BACKEND_SETS, ON_DEMAND);

#[map(name = "XLB_BACKEND_V1")]
pub static BACKENDS: HashMap<BackendSlot, Backend> = HashMap::pinned(capacity::BACKENDS, ON_DEMAND);

/// Maglev tables, one per backend set and generation, in chunks (see `BackendSet::table_size`).
#[map(name = "XLB_MAGLEV_V1")]
pub static MAGLEV: HashMap<MaglevKey, MaglevChunk> = HashMap::pinned(capacity::MAGLEV, ON_DEMAND);

/// LRU: under pressure the least recently used flows go first, never a new insert failing.
/// Established TCP flows and UDP flows; the agent's collector deletes expired ones.
#[map(name = "XLB_CT_V2")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowNat> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// Embryonic TCP flows, in their own LRU so that a SYN flood evicts only its own kind.
#[map(name = "XLB_CT_NEW_V1")]
pub static CONNTRACK_NEW: LruHashMap<FlowKey, FlowNat> =
    LruHashMap::pinned(capacity::CONNTRACK_NEW, 0);

#[map(name = "XLB_STATS_V2")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::CAPACITY, 0);

#[map(name = "XLB_CONFIG_V2")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

/// Written by the agent for `xlb services`; the programs never read it.
#[map(name = "XLB_NAMES_V1")]
pub static SET_NAMES: HashMap<u32, SetName> = HashMap::pinned(capacity::SET_NAMES, ON_DEMAND);

#[map(name = "XLB_MEMBER_V1")]
pub static MEMBERS: HashMap<MemberKey, u32> = HashMap::pinned(capacity::MEMBERS, ON_DEMAND);

/// LRU: clients that stop coming back age out.
#[map(name = "XLB_AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(capacity::AFFINITY, 0);

#[map(name = "XLB_SRCRANGE_V1")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

/// Node-process sockets sent to a backend at connect() or sendmsg() (S18), by socket cookie
/// and backend. LRU: closed sockets are never deleted explicitly, they age out.
#[map(name = "XLB_SOCK_V2")]
pub static SOCKETS: LruHashMap<SockPeer, SockFrontend> = LruHashMap::pinned(capacity::SOCKETS, 0);

/// LRU: a datagram's record is needed only until its last fragment has passed; older ones
/// are overwritten by newer datagrams, never a new insert failing.
#[map(name = "XLB_FRAG_V1")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentNat> =
    LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Node-side ends of pod veths (ifindex -> 0), written by the agent as it attaches to them:
/// a translated packet the FIB sends to one of these goes straight into its pod.
#[map(name = "XLB_PODDEV_V1")]
pub static POD_DEVICES: HashMap<u32, u32> = HashMap::pinned(capacity::POD_DEVICES, 0);

/// The agent's settings (an all-zero config until it has written one).
#[inline(always)]
pub fn config() -> DatapathConfig {
    // SAFETY: slot 0 of a one-slot array always exists; copied out.
    CONFIG
        .get_ptr(0)
        .map(|c| unsafe { *c })
        .unwrap_or(DatapathConfig {
            cluster_cidr_addr: 0,
            cluster_cidr_mask: 0,
            snat_addr: 0,
            snat_port_min: 0,
            snat_port_max: 0,
            flags: 0,
            _reserved: 0,
            netns_cookie: 0,
        })
}
