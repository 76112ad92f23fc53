//! The contract between the xlb datapath (`lb-ebpf`) and the agent (`lb-userspace`):
//! map names, capacities and the `#[repr(C)]` key/value layouts stored in them.
//!
//! Owns: every byte layout that crosses the kernel/userspace boundary, and the flow hash
//! (the datapath balances with it; userspace reproduces it to predict and measure choices).
//! Must not: contain other logic beyond constructors and accessors, allocate, or depend on
//! `std`.
//!
//! Conventions: addresses and ports are stored in network byte order, exactly as they
//! appear in packets, so the datapath compares them without swapping. Flags are `u32`/`u16`
//! bit sets (never `bool`/enums) so that every type is plain old data with no hidden padding.
//! A map's name carries a layout version (`_V1`); a layout change bumps it so an upgraded
//! agent can tell old pinned maps from new ones (see docs/datapath.md).
#![no_std]

use core::net::Ipv4Addr;

/// Map names as they appear in the object file and under the pin path.
/// The kernel keeps 15 characters of a map name, so keep these short.
pub mod map_name {
    pub const SERVICES: &str = "XLB_SVC_V1";
    /// V2: `BackendSet.generation` shrank to `u16` to make room for the Maglev `table_size`.
    pub const BACKEND_SETS: &str = "XLB_BSET_V2";
    pub const BACKENDS: &str = "XLB_BACKEND_V1";
    /// Tracked flows. V2: `FlowNat` carries a TCP state; TCP flows enter only once their
    /// handshake completed (embryonic ones live in `CONNTRACK_NEW`).
    pub const CONNTRACK: &str = "XLB_CT_V2";
    /// Embryonic TCP flows (SYN seen, handshake not completed), so a SYN flood evicts only
    /// its own kind and never an established flow.
    pub const CONNTRACK_NEW: &str = "XLB_CT_NEW_V1";
    /// V2: room for `stat::CAPACITY` counters (V1 had exactly `COUNT`), so that new counters
    /// no longer change the map.
    pub const STATS: &str = "XLB_STATS_V2";
    /// V2: `DatapathConfig` grew `netns_cookie` (24 -> 32 bytes).
    pub const CONFIG: &str = "XLB_CONFIG_V2";
    /// Backend-set id -> service name, for `xlb services` (never read by the datapath).
    pub const SET_NAMES: &str = "XLB_NAMES_V1";
    /// (set, backend) -> present: lets session affinity check a remembered backend is still live.
    pub const MEMBERS: &str = "XLB_MEMBER_V1";
    /// Session affinity: (client, set) -> backend last chosen.
    pub const AFFINITY: &str = "XLB_AFFINITY_V1";
    /// loadBalancerSourceRanges: LPM trie of (frontend, source prefix).
    pub const SOURCE_RANGES: &str = "XLB_SRCRANGE_V1";
    /// Sockets of node processes balanced at connect() (S18): cookie -> frontend, backend.
    pub const SOCKETS: &str = "XLB_SOCK_V2";
    /// IP fragments: (source, destination, protocol, IP id) of a translated first fragment ->
    /// the addresses its later fragments are rewritten to.
    pub const FRAGMENTS: &str = "XLB_FRAG_V1";
    /// Maglev lookup tables: (set, generation, chunk) -> 64 backend indexes.
    pub const MAGLEV: &str = "XLB_MAGLEV_V1";
    /// Interface index -> present: the node-side ends of pod veths, whose pods the TC
    /// program may deliver to directly (`bpf_redirect_peer`).
    pub const POD_DEVICES: &str = "XLB_PODDEV_V1";
    /// Every map, for pinning, adoption and clean-up.
    pub const ALL: [&str; 15] = [
        SERVICES,
        BACKEND_SETS,
        BACKENDS,
        CONNTRACK,
        CONNTRACK_NEW,
        STATS,
        CONFIG,
        SET_NAMES,
        MEMBERS,
        AFFINITY,
        SOURCE_RANGES,
        SOCKETS,
        FRAGMENTS,
        MAGLEV,
        POD_DEVICES,
    ];
}

/// Map capacities.
pub mod capacity {
    /// Frontends: (address, port, protocol) triples. 100 000 services with a few
    /// frontends each (ClusterIP, NodePort on each node address, external IPs).
    pub const SERVICES: u32 = 524_288;
    /// Backend-set names (same count as backend sets).
    pub const SET_NAMES: u32 = BACKEND_SETS;
    /// One membership entry per backend slot of the current generation.
    pub const MEMBERS: u32 = BACKENDS / 2;
    /// Remembered (client, set) pairs for session affinity; LRU.
    pub const AFFINITY: u32 = 262_144;
    /// (frontend, CIDR) entries of loadBalancerSourceRanges.
    pub const SOURCE_RANGES: u32 = 65_536;
    /// Backend sets: one per service port and traffic scope.
    pub const BACKEND_SETS: u32 = 262_144;
    /// Backend slots, both generations: 100 000 services x 10 backends, twice.
    pub const BACKENDS: u32 = 2_097_152;
    /// Node-process sockets balanced at connect(); LRU (closed sockets age out).
    pub const SOCKETS: u32 = 65_536;
    /// Connection-tracking entries (two per flow: original and reply direction).
    pub const CONNTRACK: u32 = 524_288;
    /// Embryonic TCP flows (two entries each); LRU. Sized for the flows a node opens within
    /// a handshake time, not for every flow it tracks.
    pub const CONNTRACK_NEW: u32 = 131_072;
    /// Fragmented datagrams in flight; LRU. An entry is needed only between a datagram's first
    /// and last fragment (microseconds), so a small table covers many concurrent datagrams.
    pub const FRAGMENTS: u32 = 16_384;
    /// Maglev table chunks of the current generations (plus the sets being switched):
    /// 131 072 sets at the default table size of 1021 (16 chunks each). Allocated on demand.
    pub const MAGLEV: u32 = 2_097_152;
    /// Pod veths on one node (kubelet's default is 110 pods).
    pub const POD_DEVICES: u32 = 4_096;
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A frontend the datapath answers for: destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub fn new(addr: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            addr: u32::from(addr).to_be(),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.addr))
    }
    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Frontend flag: NodePort, external IP or load-balancer IP. New flows from outside the
/// cluster CIDR, or to a backend on another node, are masqueraded to the node address so
/// that the reply comes back through this node.
pub const SVC_F_EXTERNAL: u32 = 1 << 0;
/// Frontend flag: `backend_set` is node-local (externalTrafficPolicy or
/// internalTrafficPolicy Local): when it is empty, traffic is dropped, not rejected.
pub const SVC_F_LOCAL: u32 = 1 << 1;
/// Frontend flag: sessionAffinity ClientIP, for `affinity_timeout` seconds.
pub const SVC_F_AFFINITY: u32 = 1 << 2;
/// Frontend flag: only sources in `SOURCE_RANGES` for this frontend may connect.
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 3;

/// What a frontend resolves to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Key into `BACKEND_SETS`: the backends for this frontend's traffic policy.
    pub backend_set: u32,
    /// For external frontends under externalTrafficPolicy Local: the cluster-wide set, used
    /// by sources inside the cluster CIDR (pods keep reaching every endpoint, S22). 0: none.
    pub cluster_set: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// Session affinity timeout in seconds (with `SVC_F_AFFINITY`).
    pub affinity_timeout: u32,
}

/// The current backends of one service port in one traffic scope.
///
/// Backends live in `BACKENDS` under `(set, generation << 31 | index)`. The agent writes a
/// new generation beside the old one, then replaces this value (one atomic hash-map
/// update), then deletes the old generation: a reader sees either the whole old set or the
/// whole new one, never a mix.
///
/// `table_size` was the high half of a `u32` generation (always 0) before Maglev: a pinned
/// value of the older layout reads as "no table", so the map kept its name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendSet {
    /// Backends in the current generation; 0 means "service with no usable endpoint".
    pub count: u32,
    /// 0 or 1.
    pub generation: u16,
    /// Maglev table size M (a prime): new flows pick the backend index at
    /// `MAGLEV[(set, generation, hash % M / MAGLEV_CHUNK)]`. 0: no table, `hash % count`.
    pub table_size: u16,
}

/// Key of one backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlot {
    pub set: u32,
    /// `generation << 31 | index`.
    pub slot: u32,
}

impl BackendSlot {
    pub const fn new(set: u32, generation: u32, index: u32) -> Self {
        Self {
            set,
            slot: (generation << 31) | index,
        }
    }
    pub const fn generation(&self) -> u32 {
        self.slot >> 31
    }
    pub const fn index(&self) -> u32 {
        self.slot & 0x7fff_ffff
    }
}

/// Backend flag: the endpoint runs on this node (its replies pass through this node anyway).
pub const BACKEND_F_LOCAL: u16 = 1 << 0;

/// One endpoint address and target port. Ordered by address, then port, as numbers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Target port, network byte order.
    pub port: u16,
    /// `BACKEND_F_*` bits.
    pub flags: u16,
}

impl Backend {
    pub fn new(addr: Ipv4Addr, port: u16, flags: u16) -> Self {
        Self {
            addr: u32::from(addr).to_be(),
            port: port.to_be(),
            flags,
        }
    }
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.addr))
    }
    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl Ord for Backend {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        (u32::from_be(self.addr), self.port(), self.flags).cmp(&(
            u32::from_be(other.addr),
            other.port(),
            other.flags,
        ))
    }
}

impl PartialOrd for Backend {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Key of `MEMBERS`: a backend of a set's current generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub set: u32,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Key of `AFFINITY`: one client of one backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Client address, network byte order.
    pub client: u32,
    pub set: u32,
}

/// The backend a client was last sent to, and when (bpf_ktime_get_ns of its last new flow).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend: Backend,
    pub last_ns: u64,
}

/// Data of an LPM key of `SOURCE_RANGES`: the frontend, then the source address. The
/// prefix length covers the 64 frontend bits plus the CIDR's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    pub frontend: ServiceKey,
    /// Source address (prefix), network byte order.
    pub source: u32,
}

/// Bits of `SourceRange` before the source address.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 64;

/// A packet's 5-tuple as seen on the wire, key of the connection-tracking table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// murmur3's 32-bit finaliser.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The `i`th masquerade port try of a flow with hash `hash`, before reduction to the port
/// range: each try an independent mix of the hash. (Tries at a fixed stride from one start
/// overlapped between flows as in linear probing: a flow found its 8 ports taken while a
/// fifth of the range was in use, and so did each of its retries — found by the fuzz test.)
/// Shared by the datapath and the fuzz test's reference model.
#[inline(always)]
pub const fn snat_try(hash: u32, i: u32) -> u32 {
    let mut h = hash ^ i.wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

impl FlowKey {
    /// The 32-bit hash new flows are balanced by, mixing one field at a time. (Xor-folding
    /// the fields first let variations of the source address and port cancel each other:
    /// measured 12% vs 7.6% worst-bucket excess over 101 buckets for 100 000 random flows.)
    #[inline(always)]
    pub const fn hash(&self) -> u32 {
        let h = fmix32(self.saddr ^ 0x9e37_79b9);
        let h = fmix32(h ^ self.daddr);
        fmix32(h ^ (((self.sport as u32) << 16) | self.dport as u32) ^ self.proto as u32)
    }

    /// A flow from wire-order values given in host order (for userspace callers).
    pub fn new(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, proto: u8) -> Self {
        Self {
            saddr: u32::from(saddr).to_be(),
            daddr: u32::from(daddr).to_be(),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            _pad: [0; 3],
        }
    }
}

/// Flow flag: this entry translates the client's direction (client -> frontend).
pub const FLOW_F_ORIGINAL: u32 = 1 << 0;
/// Flow flag: this entry translates the reply direction (backend -> client).
pub const FLOW_F_REPLY: u32 = 1 << 1;
/// Flow flag: the flow is masqueraded (source rewritten to the node address).
pub const FLOW_F_SNAT: u32 = 1 << 2;

/// How to rewrite a packet that matches a `FlowKey`: its new 5-tuple (protocol unchanged).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowNat {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    /// Backend set the flow was balanced by (0 for none).
    pub backend_set: u32,
    /// `ct_state::*`: what this direction of a TCP flow has seen (0 for UDP).
    pub state: u8,
    pub _pad: [u8; 3],
    /// `bpf_ktime_get_ns()` of the last packet, refreshed at most about once a second (at
    /// once on a state change).
    pub last_seen_ns: u64,
}

impl FlowNat {
    /// The key of the other direction's entry of the same flow: the rewritten tuple,
    /// reversed (for either direction).
    pub const fn other_direction(&self, proto: u8) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto,
            _pad: [0; 3],
        }
    }
}

/// TCP states of a conntrack entry, in the order a connection goes through them (a flow's
/// state is the later of its two directions'). The agent's garbage collector expires a flow
/// by its state's timeout.
pub mod ct_state {
    /// UDP: no state.
    pub const NONE: u8 = 0;
    /// Embryonic: the client's SYN (or a first non-SYN packet) seen, nothing back yet.
    pub const SYN_SENT: u8 = 1;
    /// Embryonic: the backend answered (reply entry); the client's next packet completes it.
    pub const SYN_RECV: u8 = 2;
    /// Handshake completed: the flow lives in `CONNTRACK`.
    pub const ESTABLISHED: u8 = 3;
    /// A FIN seen: the connection is closing.
    pub const CLOSING: u8 = 4;
    /// A RST seen: kept a short grace so late retransmissions are still translated.
    pub const CLOSED: u8 = 5;
    pub const NAMES: [&str; 6] = [
        "none",
        "syn_sent",
        "syn_recv",
        "established",
        "closing",
        "closed",
    ];
}

/// Key of `FRAGMENTS`: one fragmented datagram as its fragments arrive (RFC 791 identifies
/// a datagram by source, destination, protocol and identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IP identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The addresses a datagram's first fragment was rewritten to; its later fragments (no L4
/// header, so no ports) get the same address rewrite.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentNat {
    pub saddr: u32,
    pub daddr: u32,
}

/// A node-process socket and a backend that connect4 or sendmsg4 sent it to instead of a
/// frontend. One socket has one such peer when connected, several when it sends unconnected
/// UDP datagrams to several services.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockPeer {
    pub cookie: u64,
    /// Network byte order, like everything else.
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: u16,
}

/// The frontend a [`SockPeer`] stands for: what getpeername4 and recvmsg4 translate back to,
/// so the application sees the service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockFrontend {
    pub frontend_addr: u32,
    pub frontend_port: u16,
    pub _pad: u16,
}

/// Human-readable name of a backend set (e.g. `default/web:http/TCP`), UTF-8, `len` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetName {
    pub len: u32,
    pub bytes: [u8; 124],
}

impl SetName {
    /// Truncates (at a character boundary) names longer than 124 bytes.
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(124);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; 124];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self {
            len: end as u32,
            bytes,
        }
    }
    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(self.bytes.len());
        core::str::from_utf8(&self.bytes[..len]).unwrap_or("?")
    }
}

/// Agent-written settings, slot 0 of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DatapathConfig {
    /// Cluster (pod) CIDR, network byte order; sources inside it are never masqueraded for
    /// ClusterIP traffic.
    pub cluster_cidr_addr: u32,
    pub cluster_cidr_mask: u32,
    /// Masquerade address (the node address), network byte order; 0 disables masquerade.
    pub snat_addr: u32,
    /// Masquerade source-port range, host byte order, inclusive. Keep it outside the node's
    /// ephemeral range (net.ipv4.ip_local_port_range) and the NodePort range.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CFG_F_*` bits.
    pub flags: u32,
    pub _reserved: u32,
    /// Cookie of the agent's network namespace (SO_NETNS_COOKIE). The cgroup connect4
    /// program (S18) is attached to a cgroup shared by every namespace of the machine: it acts
    /// only for sockets whose namespace has this cookie. 0: it acts for none.
    pub netns_cookie: u64,
}

/// Config flag: the agent has written this config (an all-zero config means "not yet").
pub const CFG_F_READY: u32 = 1 << 0;
/// Config flag: a cluster CIDR is configured and no frontend address lies inside it, so a
/// packet to a pod address that no tracked flow claims skips the frontend look-ups. Kept by
/// the agent's map writer: cleared before a frontend inside the CIDR is written, set again
/// once the last one is gone.
pub const CFG_F_NO_POD_FRONTENDS: u32 = 1 << 1;

/// Per-CPU verdict counters, one slot per reason. Every return path of the datapath
/// increments exactly one of these.
pub mod stat {
    /// New flow translated to a backend.
    pub const FORWARD_NEW: u32 = 0;
    /// Packet of a tracked flow translated to its backend.
    pub const FORWARD_ESTABLISHED: u32 = 1;
    /// Reply translated back to the frontend.
    pub const REVERSE_NAT: u32 = 2;
    /// Not addressed to a service and not a tracked reply: passed untouched.
    pub const PASS_NO_SERVICE: u32 = 3;
    /// Not IPv4: passed untouched.
    pub const PASS_NOT_IPV4: u32 = 4;
    /// IPv4 but neither TCP nor UDP: passed untouched.
    pub const PASS_OTHER_PROTOCOL: u32 = 5;
    /// A non-first IP fragment with no translated first fragment on record: passed
    /// untouched (not a service flow, or it overtook its first fragment; see docs/datapath.md).
    pub const PASS_FRAGMENT: u32 = 6;
    /// Headers shorter than they claim, or a bad IHL: passed untouched.
    pub const PASS_MALFORMED: u32 = 7;
    /// Service with no usable endpoint: dropped.
    pub const DROP_NO_BACKEND: u32 = 8;
    /// Backend slot missing (agent mid-update or inconsistent maps): dropped.
    pub const DROP_BACKEND_MISSING: u32 = 9;
    /// No free masquerade port for this backend: dropped.
    pub const DROP_SNAT_EXHAUSTED: u32 = 10;
    /// Connection-tracking insert failed: dropped.
    pub const DROP_CONNTRACK_FULL: u32 = 11;
    /// Translated packet sent on by a FIB redirect (TC) instead of the host stack.
    pub const REDIRECT_FIB: u32 = 12;
    /// Rewriting the packet failed (helper error): dropped.
    pub const DROP_REWRITE_FAILED: u32 = 13;
    /// TCP to a service without endpoints: answered with a RST (S10).
    pub const REJECT_TCP_RESET: u32 = 14;
    /// UDP to a service without endpoints: answered with ICMP port unreachable (S10).
    pub const REJECT_ICMP_UNREACHABLE: u32 = 15;
    /// A reject could not be built (e.g. IP options, helper error): dropped instead.
    pub const DROP_REJECT_FAILED: u32 = 16;
    /// Node-local policy (externalTrafficPolicy/internalTrafficPolicy: Local) and no local
    /// endpoint: dropped, not rejected, so a load balancer's health check moves traffic away.
    pub const DROP_NO_LOCAL_BACKEND: u32 = 17;
    /// Source outside the load balancer's loadBalancerSourceRanges: dropped.
    pub const DROP_SOURCE_RANGE: u32 = 18;
    /// Event, counted besides the packet's verdict: a UDP flow's backend left its set, so
    /// the flow was forgotten and this packet balanced afresh (S30).
    pub const UDP_FLOW_MOVED: u32 = 19;
    /// A non-first IP fragment rewritten like its datagram's first fragment.
    pub const FORWARD_FRAGMENT: u32 = 20;
    /// Event, counted besides the packet's verdict: a translated first fragment whose
    /// translation could not be recorded (its later fragments will pass untranslated).
    pub const FRAGMENT_NOT_RECORDED: u32 = 21;
    /// Event: an embryonic TCP flow completed its handshake and moved to `CONNTRACK`.
    pub const CT_PROMOTED: u32 = 22;
    /// Event: an embryonic flow could not be moved to `CONNTRACK` (it stays embryonic and
    /// is retried on its next packet).
    pub const CT_PROMOTE_FAILED: u32 = 23;
    /// Event: a SYN reused the 5-tuple of a closed or closing flow, which was forgotten so
    /// the new connection is balanced afresh; or a SYN to no frontend was the reverse of such
    /// a flow's reply entry (the client reusing its port for a direct connection to the
    /// backend), which was forgotten so the backend's answer is not translated.
    pub const CT_REOPENED: u32 = 24;
    /// Event: a TCP flow created by a packet without SYN, i.e. a connection whose entries
    /// were lost (evicted under pressure, expired, or older than the datapath). The visible
    /// trace of LRU evictions.
    pub const CT_NEW_WITHOUT_SYN: u32 = 25;
    /// ICMP error about a client's packet to a backend (raised by the backend or a router on
    /// the way): quote and addresses translated back, sent on to the client (issue 5).
    pub const ICMP_ERROR_TO_CLIENT: u32 = 26;
    /// ICMP error about a translated reply (raised on the client's side, addressed to the
    /// frontend or the masquerade address): translated and sent on to the backend (issue 5).
    pub const ICMP_ERROR_TO_BACKEND: u32 = 27;
    /// ICMP error whose quote is shorter than an IPv4 header and 8 bytes of TCP/UDP: passed
    /// untouched (no ports to find the flow by).
    pub const PASS_ICMP_SHORT_QUOTE: u32 = 28;
    /// ICMP error quoting a TCP/UDP packet of no tracked flow: passed untouched.
    pub const PASS_ICMP_UNKNOWN_FLOW: u32 = 29;
    /// ICMP error whose outer or quoted IPv4 header has options: passed untouched (not
    /// translated; such errors are rare).
    pub const PASS_ICMP_IP_OPTIONS: u32 = 30;
    /// Event, counted besides the packet's verdict: a set's Maglev table chunk was missing
    /// (inconsistent maps), so the new flow was balanced by `hash % count` instead.
    pub const MAGLEV_CHUNK_MISSING: u32 = 31;
    /// Translated packet delivered straight into a local pod (TC ingress, the FIB names a
    /// pod veth: `bpf_redirect_peer`), skipping the veth's backlog queue. Counted instead of
    /// `REDIRECT_FIB`.
    pub const REDIRECT_PEER: u32 = 32;
    pub const COUNT: u32 = 33;
    /// Entries of the stats map: new counters fit without a new map layout.
    pub const CAPACITY: u32 = 64;
    const _: () = assert!(COUNT <= CAPACITY);

    /// Names for metrics and `xlb stats`, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "forward_new",
        "forward_established",
        "reverse_nat",
        "pass_no_service",
        "pass_not_ipv4",
        "pass_other_protocol",
        "pass_fragment",
        "pass_malformed",
        "drop_no_backend",
        "drop_backend_missing",
        "drop_snat_exhausted",
        "drop_conntrack_full",
        "redirect_fib",
        "drop_rewrite_failed",
        "reject_tcp_reset",
        "reject_icmp_unreachable",
        "drop_reject_failed",
        "drop_no_local_backend",
        "drop_source_range",
        "udp_flow_moved",
        "forward_fragment",
        "fragment_not_recorded",
        "ct_promoted",
        "ct_promote_failed",
        "ct_reopened",
        "ct_new_without_syn",
        "icmp_error_to_client",
        "icmp_error_to_backend",
        "pass_icmp_short_quote",
        "pass_icmp_unknown_flow",
        "pass_icmp_ip_options",
        "maglev_chunk_missing",
        "redirect_peer",
    ];
}

/// Backend indexes per Maglev table chunk: 128 bytes of value, so an update of one table
/// rewrites M/64 map entries and a lookup reads one bounded array element.
pub const MAGLEV_CHUNK: u32 = 64;

/// Key of one chunk of a set's Maglev table (`MAGLEV`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub set: u32,
    /// `generation << 31 | chunk`, chunk = table position / `MAGLEV_CHUNK`.
    pub slot: u32,
}

impl MaglevKey {
    pub const fn new(set: u32, generation: u32, chunk: u32) -> Self {
        Self {
            set,
            slot: (generation << 31) | chunk,
        }
    }
    pub const fn generation(&self) -> u32 {
        self.slot >> 31
    }
    pub const fn chunk(&self) -> u32 {
        self.slot & 0x7fff_ffff
    }
}

/// `MAGLEV_CHUNK` consecutive table positions: indexes into the set's backend slots of the
/// same generation. The last chunk of a table is padded with zeros (never read).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevChunk {
    pub backends: [u16; MAGLEV_CHUNK as usize],
}

// Layout checks: these types are shared with the kernel byte for byte.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<MemberKey>() == 12);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<SourceRange>() == 12);
const _: () = assert!(core::mem::size_of::<BackendSet>() == 8);
const _: () = assert!(core::mem::size_of::<BackendSlot>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowNat>() == 32);
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 32);
const _: () = assert!(core::mem::size_of::<SetName>() == 128);
const _: () = assert!(core::mem::size_of::<SockPeer>() == 16);
const _: () = assert!(core::mem::size_of::<SockFrontend>() == 8);
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragmentNat>() == 8);
const _: () = assert!(core::mem::size_of::<MaglevKey>() == 8);
const _: () = assert!(core::mem::size_of::<MaglevChunk>() == 128);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], contain only integers and have no padding
    // (checked by the size assertions above).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendSet {}
    unsafe impl aya::Pod for BackendSlot {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowNat {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for SetName {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for SockPeer {}
    unsafe impl aya::Pod for SockFrontend {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentNat {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for MaglevChunk {}
}
