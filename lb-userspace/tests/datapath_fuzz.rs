//! Hostile input (issue 5): a deterministic generator sends 1 000 000 random and mutated
//! packets through the real programs with BPF_PROG_TEST_RUN — most through xlb_xdp, one in
//! eight through xlb_tc, sharing one set of maps — and checks every verdict, every output
//! byte and every counter against the reference model in `fuzz/model.rs`. Any divergence
//! fails the test with the seed, the packet's index, the packet (hex) and both expectations.
//!
//! Reproduce a run with `XLB_FUZZ_SEED=<hex seed>`; `XLB_FUZZ_PACKETS=<n>` changes the count.
mod common;
#[path = "fuzz/model.rs"]
mod model;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    net::Ipv4Addr,
    time::Instant,
};

use aya::maps::{Map, MapData, PerCpuArray};
use common::{Fixture, NODE_IP};
use lb_common::{
    map_name, stat, Backend, FlowKey, FlowNat, FragmentKey, FragmentNat, ServiceKey,
    BACKEND_F_LOCAL, FLOW_F_REPLY, IPPROTO_TCP, IPPROTO_UDP, SVC_F_AFFINITY, SVC_F_EXTERNAL,
    SVC_F_LOCAL, SVC_F_SOURCE_RANGES,
};
use model::{
    be16, checksum, put16, put32, word_sum, BackendDesc, Config, Expect, Key, Model, Service,
    Verdict, IPPROTO_ICMP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use xlb::model::{DesiredState, Frontend, FrontendKind, Ipv4Cidr};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const DEFAULT_SEED: u64 = 0x05ee_df00_2a11_c0de;
const DEFAULT_PACKETS: u64 = 1_000_000;
/// All counters are compared with the model's tally this often (and at the end); the
/// verdict's own counter after every packet.
const FULL_STATS_EVERY: u64 = 4096;
/// The kernel's conntrack tables and fragment records are compared with the model's, entry
/// by entry, this often (and at the end).
const COMPARE_TABLES_EVERY: u64 = 1 << 17;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const LB_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 200);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 3),
    Ipv4Addr::new(10, 244, 2, 2),
    Ipv4Addr::new(10, 244, 2, 3),
];
const BACKEND_PORTS: [u16; 2] = [8080, 5353];
/// Pods (one of them a backend: hairpin), a pod on another node, external clients.
const CLIENTS: [Ipv4Addr; 5] = [
    Ipv4Addr::new(10, 244, 1, 2),
    Ipv4Addr::new(10, 244, 1, 3),
    Ipv4Addr::new(10, 244, 3, 7),
    Ipv4Addr::new(172, 18, 0, 100),
    Ipv4Addr::new(172, 18, 0, 101),
];
const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 254);
/// (address, port, proto) the generator aims at: every frontend, ports a ClusterIP does
/// not have (S04), and destinations that are no frontend.
const TARGETS: [(Ipv4Addr, u16, u8); 16] = [
    (STICKY_VIP, 80, IPPROTO_TCP),
    (STICKY_VIP, 53, IPPROTO_UDP),
    (STICKY_VIP, 22, IPPROTO_TCP),
    (NODE_IP, 30090, IPPROTO_TCP),
    (NODE_IP, 30091, IPPROTO_UDP),
    (LB_IP, 80, IPPROTO_TCP),
    (VIP, 80, IPPROTO_TCP),
    (VIP, 53, IPPROTO_UDP),
    (NODE_IP, 30080, IPPROTO_TCP),
    (NODE_IP, 30053, IPPROTO_UDP),
    (EMPTY_VIP, 81, IPPROTO_TCP),
    (EMPTY_VIP, 54, IPPROTO_UDP),
    (VIP, 443, IPPROTO_TCP),
    (VIP, 123, IPPROTO_UDP),
    (Ipv4Addr::new(10, 244, 2, 2), 8080, IPPROTO_TCP),
    (Ipv4Addr::new(8, 8, 8, 8), 53, IPPROTO_UDP),
];
/// Client ports: a small pool, so that flows repeat and the tables stay far from full.
const CLIENT_PORTS: u16 = 200;
/// IP ids: a small pool, so that later fragments find their first fragment's record.
const IP_IDS: u16 = 32;

/// xorshift64*: deterministic, seedable, no crate.
struct Rng(u64);

impl Rng {
    /// Any seed, 0 included, gives a distinct non-zero state (splitmix64).
    fn seeded(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn ip(a: Ipv4Addr) -> u32 {
    u32::from(a)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i % 32 == 0 {
            s.push('\n');
        } else if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The services, programmed through the agent's own writer, and the model's view of them:
/// ClusterIP VIP:80/TCP and VIP:53/UDP with three backends (the first on this node),
/// NodePorts 30080/TCP and 30053/UDP to the same sets, EMPTY_VIP:81/TCP and :54/UDP without
/// endpoints, STICKY_VIP:80/TCP and :53/UDP with session affinity, NodePorts 30090/TCP
/// and 30091/UDP with externalTrafficPolicy Local (the local set holds the local backend,
/// resp. nothing), LB_IP:80/TCP with loadBalancerSourceRanges, and the ClusterIPs' port-0
/// frontends (other ports are refused, S04).
fn program(fx: &mut Fixture) -> Model {
    let backends = |port: u16| -> Vec<Backend> {
        BACKENDS
            .iter()
            .enumerate()
            .map(|(i, a)| Backend::new(*a, port, if i == 0 { BACKEND_F_LOCAL } else { 0 }))
            .collect()
    };
    let mut desired = DesiredState::default();
    desired
        .backend_sets
        .insert("default/web:http/TCP".into(), backends(BACKEND_PORTS[0]));
    desired
        .backend_sets
        .insert("default/web:dns/UDP".into(), backends(BACKEND_PORTS[1]));
    desired
        .backend_sets
        .insert("default/sticky:http/TCP".into(), backends(BACKEND_PORTS[0]));
    desired
        .backend_sets
        .insert("default/sticky:dns/UDP".into(), backends(BACKEND_PORTS[1]));
    desired.backend_sets.insert(
        "default/web:http/TCP/local".into(),
        backends(BACKEND_PORTS[0])[..1].to_vec(),
    );
    for set in [
        "default/web:dns/UDP/local",
        "default/sticky:*",
        "default/web:*",
        "default/empty:81/TCP",
        "default/empty:54/UDP",
        "default/empty:*",
    ] {
        desired.backend_sets.insert(set.into(), vec![]);
    }
    let web_tcp = "default/web:http/TCP";
    let web_udp = "default/web:dns/UDP";
    let cluster_ip = FrontendKind::ClusterIp;
    let node_port = FrontendKind::NodePort;
    let local = SVC_F_EXTERNAL | SVC_F_LOCAL;
    let lb = FrontendKind::LoadBalancer;
    let frontends = [
        (
            STICKY_VIP,
            80,
            IPPROTO_TCP,
            "default/sticky:http/TCP",
            cluster_ip,
            SVC_F_AFFINITY,
        ),
        (
            STICKY_VIP,
            53,
            IPPROTO_UDP,
            "default/sticky:dns/UDP",
            cluster_ip,
            SVC_F_AFFINITY,
        ),
        (STICKY_VIP, 0, 0, "default/sticky:*", cluster_ip, 0),
        (
            NODE_IP,
            30090,
            IPPROTO_TCP,
            "default/web:http/TCP/local",
            node_port,
            local,
        ),
        (
            NODE_IP,
            30091,
            IPPROTO_UDP,
            "default/web:dns/UDP/local",
            node_port,
            local,
        ),
        (
            LB_IP,
            80,
            IPPROTO_TCP,
            web_tcp,
            lb,
            SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES,
        ),
        (VIP, 80, IPPROTO_TCP, web_tcp, cluster_ip, 0),
        (VIP, 53, IPPROTO_UDP, web_udp, cluster_ip, 0),
        (VIP, 0, 0, "default/web:*", cluster_ip, 0),
        (
            NODE_IP,
            30080,
            IPPROTO_TCP,
            web_tcp,
            node_port,
            SVC_F_EXTERNAL,
        ),
        (
            NODE_IP,
            30053,
            IPPROTO_UDP,
            web_udp,
            node_port,
            SVC_F_EXTERNAL,
        ),
        (
            EMPTY_VIP,
            81,
            IPPROTO_TCP,
            "default/empty:81/TCP",
            cluster_ip,
            0,
        ),
        (
            EMPTY_VIP,
            54,
            IPPROTO_UDP,
            "default/empty:54/UDP",
            cluster_ip,
            0,
        ),
        (EMPTY_VIP, 0, 0, "default/empty:*", cluster_ip, 0),
    ];
    let mut services = HashMap::new();
    let mut other_ports = HashSet::new();
    for (addr, port, proto, set, kind, flags) in frontends {
        let mut frontend = Frontend::new(set, kind, flags);
        // Local policy: pods keep the cluster-wide set (S22).
        let cluster = set
            .strip_suffix("/local")
            .filter(|_| flags & SVC_F_LOCAL != 0);
        frontend.cluster_set = cluster.map(Into::into);
        if flags & SVC_F_AFFINITY != 0 {
            frontend.affinity_timeout = 10_800;
        }
        let ranges = [
            Ipv4Cidr {
                addr: CLIENTS[3],
                prefix: 32,
            },
            Ipv4Cidr {
                addr: Ipv4Addr::new(10, 244, 1, 0),
                prefix: 24,
            },
        ];
        if flags & SVC_F_SOURCE_RANGES != 0 {
            frontend.source_ranges = ranges.to_vec();
        }
        desired
            .frontends
            .insert(ServiceKey::new(addr, port, proto), frontend);
        if port == 0 {
            other_ports.insert(ip(addr));
            continue;
        }
        let describe = |set: &str| -> Vec<BackendDesc> {
            desired.backend_sets[set]
                .iter()
                .map(|b| BackendDesc {
                    addr: ip(b.ip()),
                    port: u16::from_be(b.port),
                    local: b.flags & BACKEND_F_LOCAL != 0,
                })
                .collect()
        };
        services.insert(
            (ip(addr), port, proto),
            Service {
                set: set.into(),
                backends: describe(set),
                local: flags & SVC_F_LOCAL != 0,
                cluster: cluster.map(|c| (c.to_string(), describe(c))),
                external: flags & SVC_F_EXTERNAL != 0,
                affinity: flags & SVC_F_AFFINITY != 0,
                source_ranges: (flags & SVC_F_SOURCE_RANGES != 0).then(|| {
                    ranges
                        .iter()
                        .map(|r| (ip(r.addr) & r.mask(), r.mask()))
                        .collect()
                }),
            },
        );
    }
    fx.apply(&desired);
    Model {
        cfg: Config {
            cluster_addr: ip(Ipv4Addr::new(10, 244, 0, 0)),
            cluster_mask: u32::MAX << 16,
            snat_addr: ip(NODE_IP),
            snat_ports: (61000, 65535),
        },
        services,
        other_ports,
        ct: HashMap::new(),
        ct_new: HashMap::new(),
        frags: HashMap::new(),
        affinity: HashMap::new(),
    }
}

// Packet construction: raw bytes, so that any field can hold any value.

/// Ethernet + IPv4 (with `options`, a multiple of 4 bytes) around `l4`; checksum right.
fn ipv4_packet(
    (src, dst): (u32, u32),
    proto: u8,
    (id, frag): (u16, u16),
    options: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    let ihl = 20 + options.len();
    let mut p = vec![0u8; 14 + ihl];
    p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    put16(&mut p, 12, 0x0800);
    p[14] = 0x40 | (ihl / 4) as u8;
    put16(&mut p, 16, (ihl + l4.len()) as u16);
    put16(&mut p, 18, id);
    put16(&mut p, 20, frag);
    p[22] = 64;
    p[23] = proto;
    put32(&mut p, 26, src);
    put32(&mut p, 30, dst);
    p[34..34 + options.len()].copy_from_slice(options);
    let c = checksum(word_sum(&p[14..14 + ihl]));
    put16(&mut p, 24, c);
    p.extend_from_slice(l4);
    p
}

/// A TCP header (+ options, + payload) with its checksum right for `key`'s addresses.
fn tcp_segment(
    key: Key,
    (seq, ack): (u32, u32),
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst, sport, dport, _) = key;
    let hlen = 20 + options.len();
    let mut t = vec![0u8; hlen];
    put16(&mut t, 0, sport);
    put16(&mut t, 2, dport);
    put32(&mut t, 4, seq);
    put32(&mut t, 8, ack);
    t[12] = ((hlen / 4) as u8) << 4;
    t[13] = flags;
    put16(&mut t, 14, 64240);
    t[20..].copy_from_slice(options);
    t.extend_from_slice(payload);
    let c = checksum(l4_pseudo(src, dst, IPPROTO_TCP, t.len()) + word_sum(&t));
    put16(&mut t, 16, c);
    t
}

/// A UDP header + payload; checksum right, or 0 ("none") when `no_checksum`.
fn udp_datagram(key: Key, payload: &[u8], no_checksum: bool) -> Vec<u8> {
    let (src, dst, sport, dport, _) = key;
    let mut u = vec![0u8; 8];
    put16(&mut u, 0, sport);
    put16(&mut u, 2, dport);
    put16(&mut u, 4, (8 + payload.len()) as u16);
    u.extend_from_slice(payload);
    if !no_checksum {
        let mut c = checksum(l4_pseudo(src, dst, IPPROTO_UDP, u.len()) + word_sum(&u));
        if c == 0 {
            c = 0xffff;
        }
        put16(&mut u, 6, c);
    }
    u
}

fn l4_pseudo(src: u32, dst: u32, proto: u8, len: usize) -> u64 {
    word_sum(&src.to_be_bytes()) + word_sum(&dst.to_be_bytes()) + u64::from(proto) + len as u64
}

/// IPv4 options: NOPs and an end-of-list, or random bytes (the datapath must not care).
fn ip_options(rng: &mut Rng) -> Vec<u8> {
    let words = 1 + rng.below(10) as usize;
    if rng.chance(50) {
        let mut o = vec![1u8; words * 4];
        o[words * 4 - 1] = 0;
        o
    } else {
        rng.bytes(words * 4)
    }
}

struct Generator {
    rng: Rng,
    /// Keys of flows the model has tracked (either direction), for packets that continue
    /// them; stale ones are fine, the model knows.
    known: Vec<Key>,
}

impl Generator {
    fn tcp_flags(&mut self, reply: bool) -> u8 {
        let r = self.rng.below(100);
        if reply {
            match r {
                0..=29 => TCP_SYN | TCP_ACK,
                30..=59 => TCP_ACK,
                60..=71 => TCP_ACK | 0x08,
                72..=79 => TCP_FIN | TCP_ACK,
                80..=86 => TCP_RST,
                87..=89 => TCP_RST | TCP_ACK,
                _ => self.rng.byte(),
            }
        } else {
            match r {
                0..=24 => TCP_SYN,
                25..=49 => TCP_ACK,
                50..=61 => TCP_ACK | 0x08,
                62..=69 => TCP_FIN | TCP_ACK,
                70..=73 => TCP_RST,
                74..=76 => TCP_RST | TCP_ACK,
                77..=79 => 0,
                80..=82 => TCP_SYN | TCP_FIN,
                83..=85 => TCP_SYN | TCP_ACK,
                _ => self.rng.byte(),
            }
        }
    }

    fn random_known(&mut self) -> Option<Key> {
        if self.known.is_empty() {
            return None;
        }
        Some(self.known[self.rng.below(self.known.len() as u64) as usize])
    }

    /// A TCP or UDP packet of `key`, with plausible or odd contents.
    fn l4_packet(&mut self, key: Key) -> Vec<u8> {
        // Replies come from backends.
        let reply = BACKEND_PORTS.contains(&key.2);
        let rng = &mut self.rng;
        let options = if rng.chance(5) {
            ip_options(rng)
        } else {
            vec![]
        };
        let id = rng.below(u64::from(IP_IDS)) as u16;
        // Now and then a first fragment (MF, offset 0).
        let frag = match rng.below(20) {
            0 => 0x2000,
            1..=10 => 0x4000,
            _ => 0,
        };
        let payload_len = match rng.below(4) {
            0 => 0,
            1 => rng.below(16) as usize,
            _ => rng.below(200) as usize,
        };
        let payload = rng.bytes(payload_len);
        let l4 = if key.4 == IPPROTO_TCP {
            let flags = self.tcp_flags(reply);
            let rng = &mut self.rng;
            let tcp_opts: &[u8] = if rng.chance(20) {
                &[2, 4, 5, 0xb4, 4, 2, 1, 1, 1, 3, 3, 7]
            } else {
                &[]
            };
            let numbers = (rng.next() as u32, rng.next() as u32);
            tcp_segment(key, numbers, flags, tcp_opts, &payload)
        } else {
            let no_csum = rng.chance(10);
            udp_datagram(key, &payload, no_csum)
        };
        ipv4_packet((key.0, key.1), key.4, (id, frag), &options, &l4)
    }

    /// A client's packet to one of the targets.
    fn client_packet(&mut self) -> Vec<u8> {
        let (addr, port, proto) = self.rng.pick(&TARGETS);
        let client = self.rng.pick(&CLIENTS);
        let sport = 40000 + self.rng.below(u64::from(CLIENT_PORTS)) as u16;
        self.l4_packet((ip(client), ip(addr), sport, port, proto))
    }

    /// A later fragment (offset != 0) of some datagram: of a known flow's addresses (its
    /// first fragment may have been translated) or of anything.
    fn later_fragment(&mut self) -> Vec<u8> {
        let known = if self.rng.chance(20) {
            None
        } else {
            self.random_known()
        };
        let rng = &mut self.rng;
        let (src, dst, proto) = match known {
            Some(k) => (k.0, k.1, k.4),
            None => (
                ip(rng.pick(&CLIENTS)),
                ip(rng.pick(&TARGETS).0),
                rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]),
            ),
        };
        let id = rng.below(u64::from(IP_IDS)) as u16;
        let offset = 1 + rng.below(200) as u16;
        let mf = if rng.chance(50) { 0x2000 } else { 0 };
        let n = rng.below(100) as usize;
        let data = rng.bytes(n);
        ipv4_packet((src, dst), proto, (id, mf | offset), &[], &data)
    }

    /// An ICMP error quoting a packet of a known flow (reversed: the error travels against
    /// it), or of nothing known, with a full, short, truncated or option-bearing quote.
    fn icmp_error(&mut self) -> Vec<u8> {
        let known = if self.rng.chance(15) {
            None
        } else {
            self.random_known()
        };
        let rng = &mut self.rng;
        let key = known.unwrap_or_else(|| {
            let (a, p, pr) = rng.pick(&TARGETS);
            (ip(a), ip(rng.pick(&CLIENTS)), p, 40000, pr)
        });
        // The quoted packet is the reverse of the key: what went the other way.
        let quoted: Key = (key.1, key.0, key.3, key.2, key.4);
        let inner_opts = if rng.chance(5) {
            ip_options(rng)
        } else {
            vec![]
        };
        let inner_frag = match rng.below(20) {
            0 => 0x2000,
            1 => 0x0010,
            _ => 0x4000,
        };
        let l4 = if quoted.4 == IPPROTO_TCP {
            let numbers = (rng.next() as u32, rng.next() as u32);
            tcp_segment(quoted, numbers, TCP_ACK, &[], &[])
        } else {
            let no_csum = rng.chance(20);
            udp_datagram(quoted, b"abcd", no_csum)
        };
        let inner = ipv4_packet(
            (quoted.0, quoted.1),
            quoted.4,
            (7, inner_frag),
            &inner_opts,
            &l4,
        );
        let mut quote = inner[14..].to_vec();
        // Quote lengths: everything, RFC 792's 8 bytes, less, more, a bare IP header.
        let ihl = 20 + inner_opts.len();
        let cut = match rng.below(6) {
            0 | 1 => quote.len(),
            2 => ihl + 8,
            3 => ihl + rng.below(8) as usize,
            4 => ihl + 8 + rng.below(12) as usize,
            _ => rng.below(24) as usize,
        };
        quote.truncate(cut.min(quote.len()));
        let icmp_type = rng.pick(&[3u8, 3, 3, 11, 12, 0, 8, 5]);
        let code = rng.pick(&[0u8, 1, 3, 4]);
        let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0xdc];
        icmp.extend_from_slice(&quote);
        let c = checksum(word_sum(&icmp));
        put16(&mut icmp, 2, c);
        // From a router on the way, or from the quoted packet's destination itself.
        let outer_src = if rng.chance(50) { ip(ROUTER) } else { quoted.1 };
        let options = if rng.chance(3) {
            ip_options(rng)
        } else {
            vec![]
        };
        ipv4_packet((outer_src, quoted.0), IPPROTO_ICMP, (9, 0), &options, &icmp)
    }

    /// Not TCP/UDP over IPv4: ARP, IPv6, VLAN-tagged IPv4, other IP protocols, garbage.
    fn other_packet(&mut self) -> Vec<u8> {
        match self.rng.below(5) {
            0 => {
                let mut p = self.client_packet();
                let ethertype = self.rng.pick(&[0x0806u16, 0x86dd, 0x88a8, 0x0000, 0xffff]);
                put16(&mut p, 12, ethertype);
                p
            }
            1 => {
                // A VLAN tag in front of an IPv4 service packet.
                let p = self.client_packet();
                let mut v = p[..12].to_vec();
                v.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
                v.extend_from_slice(&p[12..]);
                v
            }
            2 => {
                let rng = &mut self.rng;
                let proto = rng.pick(&[IPPROTO_ICMP, 47, 50, 132, 0, 255]);
                let n = rng.below(64) as usize;
                let data = rng.bytes(n);
                let src = ip(rng.pick(&CLIENTS));
                ipv4_packet((src, ip(VIP)), proto, (1, 0), &[], &data)
            }
            3 => {
                // Garbage behind an IPv4 ethertype.
                let rng = &mut self.rng;
                let n = rng.below(120) as usize;
                let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
                p.extend(rng.bytes(n));
                if rng.chance(70) && p.len() > 14 {
                    p[14] = 0x45;
                }
                p
            }
            _ => {
                let n = 14 + self.rng.below(100) as usize;
                self.rng.bytes(n)
            }
        }
    }

    /// Damage: truncation at any layer, bad IHL, total lengths, fragment fields, TCP data
    /// offsets and flags, UDP lengths, protocols, trailing bytes, single bytes.
    fn mutate(&mut self, p: &mut Vec<u8>) {
        let rng = &mut self.rng;
        let ihl = if p.len() > 14 {
            usize::from(p[14] & 0x0f) * 4
        } else {
            20
        };
        let l4 = 14 + ihl;
        match rng.below(10) {
            0 => {
                let keep = 14 + rng.below(p.len().saturating_sub(14) as u64 + 1) as usize;
                p.truncate(keep);
            }
            1 if p.len() > 14 => p[14] = (p[14] & 0xf0) | rng.below(16) as u8,
            2 if p.len() > 17 => {
                let tot = be16(p, 16);
                let v = match rng.below(3) {
                    0 => rng.next() as u16,
                    1 => tot.wrapping_add(1 + rng.below(8) as u16),
                    _ => tot.wrapping_sub(1 + rng.below(8) as u16),
                };
                put16(p, 16, v);
            }
            3 if p.len() > 21 => {
                let any = rng.next() as u16 & 0xe000;
                let v = rng.pick(&[0x2000u16, 0x0001, 0x3fff, 0x1fff, 0x4000, any]);
                put16(p, 20, v);
            }
            4 if p.len() > l4 + 13 => {
                p[l4 + 12] = (rng.below(16) as u8) << 4 | (p[l4 + 12] & 0x0f);
            }
            5 if p.len() > l4 + 5 => {
                let any = rng.next() as u16;
                let v = rng.pick(&[0u16, 1, 7, 8, 9, 0xffff, any]);
                put16(p, l4 + 4, v);
            }
            6 if p.len() > 23 => {
                let any = rng.byte();
                p[23] = rng.pick(&[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, any]);
            }
            7 if p.len() > l4 + 13 => p[l4 + 13] = rng.byte(),
            8 => {
                let n = 1 + rng.below(40) as usize;
                p.extend(rng.bytes(n));
            }
            _ => {
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(p.len() as u64) as usize;
                    p[at] = rng.byte();
                }
            }
        }
    }

    fn packet(&mut self) -> Vec<u8> {
        let mut p = match self.rng.below(100) {
            0..=29 => self.client_packet(),
            30..=59 => match self.random_known() {
                Some(key) => self.l4_packet(key),
                None => self.client_packet(),
            },
            60..=69 => self.later_fragment(),
            70..=84 => self.icmp_error(),
            _ => self.other_packet(),
        };
        if self.rng.chance(25) {
            self.mutate(&mut p);
            if self.rng.chance(20) {
                self.mutate(&mut p);
            }
        }
        p
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Prog {
    Xdp,
    Tc,
}

/// BPF_PROG_TEST_RUN refuses (EINVAL) an skb whose Ethernet type announces an IPv4 or
/// IPv6 header that is not all there; such frames go through XDP only.
fn tc_test_run_accepts(p: &[u8]) -> bool {
    match be16(p, 12) {
        0x0800 => p.len() >= 14 + 20,
        0x86dd => p.len() >= 14 + 40,
        _ => true,
    }
}

/// Whether `code` is what `prog` returns for `verdict`. A TC translation goes to a FIB
/// redirect when the test's network namespace has a route to its destination, else on to
/// the stack (TC_ACT_OK).
fn verdict_matches(prog: Prog, verdict: Verdict, code: u32) -> bool {
    match (prog, verdict) {
        (Prog::Xdp, Verdict::Pass | Verdict::Translated) => code == XDP_PASS,
        (Prog::Xdp, Verdict::Drop) => code == XDP_DROP,
        (Prog::Xdp, Verdict::Bounce) => code == XDP_TX,
        (Prog::Tc, Verdict::Pass) => code == TC_ACT_OK,
        (Prog::Tc, Verdict::Drop) => code == TC_ACT_SHOT,
        (Prog::Tc, Verdict::Translated) => code == TC_ACT_OK || code == TC_ACT_REDIRECT,
        (Prog::Tc, Verdict::Bounce) => code == TC_ACT_REDIRECT,
    }
}

/// The per-CPU verdict counters, opened once (reading one costs one lookup).
struct Stats(PerCpuArray<MapData, u64>);

impl Stats {
    fn open(fx: &Fixture) -> Self {
        let data = MapData::from_pin(fx.pin.join(map_name::STATS)).expect("pinned stats map");
        Self(PerCpuArray::try_from(Map::PerCpuArray(data)).expect("per-CPU array"))
    }
    fn get(&self, reason: u32) -> u64 {
        self.0.get(&reason, 0).expect("stats lookup").iter().sum()
    }
}

/// One packet's run, for the failure message.
struct Run<'a> {
    seed: u64,
    index: u64,
    prog: Prog,
    input: &'a [u8],
    code: u32,
    output: &'a [u8],
    stats: &'a Stats,
}

impl Run<'_> {
    /// Fails the test. `tally` is the model's count of every counter before this packet
    /// (plus its prediction, when the verdict's counter is what diverged): the counters
    /// that differ say what the datapath did.
    fn diverged(&self, expect: Option<&Expect>, tally: &[u64], what: &str) -> ! {
        let moved: Vec<String> = (0..stat::COUNT)
            .filter_map(|r| {
                let counted = self.stats.get(r);
                (counted != tally[r as usize]).then(|| {
                    format!(
                        "{} {counted} (model {})",
                        stat::NAMES[r as usize],
                        tally[r as usize]
                    )
                })
            })
            .collect();
        let names = |rs: &[u32]| {
            rs.iter()
                .map(|r| stat::NAMES[*r as usize])
                .collect::<Vec<_>>()
        };
        let expected = match expect {
            Some(e) => format!(
                "{:?}, counter {} (+ events {:?}), output ({} bytes):\n{}",
                e.verdict,
                stat::NAMES[e.reason as usize],
                names(&e.events),
                e.output.len(),
                hex(&e.output)
            ),
            None => "(no prediction)".into(),
        };
        panic!(
            "fuzz divergence: {what}\nseed {:#x} (XLB_FUZZ_SEED), packet #{}, {:?}\n\
             input ({} bytes):\n{}\nmodel expects: {expected}\n\
             datapath returned {}, counted {moved:?}, output ({} bytes):\n{}",
            self.seed,
            self.index,
            self.prog,
            self.input.len(),
            hex(self.input),
            self.code,
            self.output.len(),
            hex(self.output)
        );
    }
}

/// The maps' contents in the model's terms, to compare with the model's own tables: a
/// conntrack table as key -> (translation, reply direction, TCP state); the fragment
/// records as (saddr, daddr, id, proto) -> (saddr, daddr).
type Table = BTreeMap<Key, (model::Tuple, bool, u8)>;

fn kernel_conntrack(fx: &Fixture, name: &str) -> Table {
    let data = MapData::from_pin(fx.pin.join(name)).expect("pinned conntrack map");
    let map: aya::maps::HashMap<MapData, FlowKey, FlowNat> =
        aya::maps::HashMap::try_from(Map::LruHashMap(data)).expect("conntrack map");
    map.iter()
        .map(|e| {
            let (k, v) = e.expect("conntrack entry");
            let key = (
                u32::from_be(k.saddr),
                u32::from_be(k.daddr),
                u16::from_be(k.sport),
                u16::from_be(k.dport),
                k.proto,
            );
            let to = (
                u32::from_be(v.saddr),
                u32::from_be(v.daddr),
                u16::from_be(v.sport),
                u16::from_be(v.dport),
            );
            (key, (to, v.flags & FLOW_F_REPLY != 0, v.state))
        })
        .collect()
}

fn model_conntrack(table: &HashMap<Key, model::Entry>) -> Table {
    table
        .iter()
        .map(|(k, e)| (*k, (e.to, e.reply, e.state)))
        .collect()
}

/// The kernel's conntrack tables and fragment records equal the model's, entry by entry.
fn compare_tables(fx: &Fixture, model: &Model, seed: u64, after: u64) {
    for (name, mine) in [
        (map_name::CONNTRACK, &model.ct),
        (map_name::CONNTRACK_NEW, &model.ct_new),
    ] {
        let kernel = kernel_conntrack(fx, name);
        let mine = model_conntrack(mine);
        if kernel != mine {
            let only_kernel: Vec<_> = kernel
                .iter()
                .filter(|(k, v)| mine.get(k) != Some(v))
                .take(5)
                .collect();
            let only_model: Vec<_> = mine
                .iter()
                .filter(|(k, v)| kernel.get(k) != Some(v))
                .take(5)
                .collect();
            panic!(
                "seed {seed:#x}: {name} differs from the model after packet #{after} \
                 ({} entries, model {}): kernel has {only_kernel:?}, model has {only_model:?}",
                kernel.len(),
                mine.len()
            );
        }
    }
    let data = MapData::from_pin(fx.pin.join(map_name::FRAGMENTS)).expect("pinned fragments");
    let map: aya::maps::HashMap<MapData, FragmentKey, FragmentNat> =
        aya::maps::HashMap::try_from(Map::LruHashMap(data)).expect("fragment map");
    let kernel: BTreeMap<_, _> = map
        .iter()
        .map(|e| {
            let (k, v) = e.expect("fragment record");
            let key = (
                u32::from_be(k.saddr),
                u32::from_be(k.daddr),
                u16::from_be(k.id),
                k.proto,
            );
            (key, (u32::from_be(v.saddr), u32::from_be(v.daddr)))
        })
        .collect();
    let mine: BTreeMap<_, _> = model.frags.iter().map(|(k, v)| (*k, *v)).collect();
    assert!(
        kernel == mine,
        "seed {seed:#x}: fragment records differ from the model after packet #{after} ({} vs {})",
        kernel.len(),
        mine.len()
    );
}

fn env_seed() -> u64 {
    std::env::var("XLB_FUZZ_SEED")
        .ok()
        .map(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("XLB_FUZZ_SEED: hex"))
        .unwrap_or(DEFAULT_SEED)
}

#[test]
fn a_million_hostile_packets_match_the_reference_model() {
    let Some(mut fx) = Fixture::load("fuzz") else {
        return;
    };
    let seed = env_seed();
    let packets: u64 = std::env::var("XLB_FUZZ_PACKETS")
        .ok()
        .map(|s| s.parse().expect("XLB_FUZZ_PACKETS: a number"))
        .unwrap_or(DEFAULT_PACKETS);
    println!("fuzz seed {seed:#x} (XLB_FUZZ_SEED), {packets} packets");
    let mut model = program(&mut fx);
    let stats = Stats::open(&fx);
    let mut gen = Generator {
        rng: Rng::seeded(seed),
        known: Vec::new(),
    };
    let mut tally = vec![0u64; stat::COUNT as usize];
    let mut by_reason = vec![[0u64; 2]; stat::COUNT as usize];
    let started = Instant::now();
    for index in 0..packets {
        let to_tc = gen.rng.below(8) == 0;
        let input = gen.packet();
        let prog = if to_tc && tc_test_run_accepts(&input) {
            Prog::Tc
        } else {
            Prog::Xdp
        };
        let (code, output) = match prog {
            Prog::Xdp => fx.try_run_xdp(&input),
            Prog::Tc => fx.try_run_tc(&input),
        }
        .unwrap_or_else(|e| {
            panic!(
                "seed {seed:#x}, packet #{index}: {prog:?} test run refused: {e:?}\ninput ({} bytes):\n{}",
                input.len(),
                hex(&input)
            )
        });
        let run = Run {
            seed,
            index,
            prog,
            input: &input,
            code,
            output: &output,
            stats: &stats,
        };
        let new_before = model.ct.len() + model.ct_new.len();
        let expect = model
            .step(&input, &output)
            .unwrap_or_else(|why| run.diverged(None, &tally, &why));
        if !verdict_matches(prog, expect.verdict, code) {
            run.diverged(Some(&expect), &tally, "verdict");
        }
        if output != expect.output {
            run.diverged(Some(&expect), &tally, "output bytes");
        }
        tally[expect.reason as usize] += 1;
        for e in &expect.events {
            tally[*e as usize] += 1;
        }
        if prog == Prog::Tc && code == TC_ACT_REDIRECT && expect.verdict == Verdict::Translated {
            tally[stat::REDIRECT_FIB as usize] += 1;
        }
        by_reason[expect.reason as usize][usize::from(prog == Prog::Tc)] += 1;
        let counted = stats.get(expect.reason);
        if counted != tally[expect.reason as usize] {
            run.diverged(
                Some(&expect),
                &tally,
                &format!(
                    "counter {} is {counted}, the model's tally {}",
                    stat::NAMES[expect.reason as usize],
                    tally[expect.reason as usize]
                ),
            );
        }
        if (index + 1) % COMPARE_TABLES_EVERY == 0 || index + 1 == packets {
            compare_tables(&fx, &model, seed, index);
        }
        if (index + 1) % FULL_STATS_EVERY == 0 || index + 1 == packets {
            for reason in 0..stat::COUNT {
                let counted = stats.get(reason);
                assert_eq!(
                    counted,
                    tally[reason as usize],
                    "seed {seed:#x}: counter {} after packet #{index}: datapath {counted}, model {}",
                    stat::NAMES[reason as usize],
                    tally[reason as usize]
                );
            }
        }
        // A new flow's two directions become keys the generator continues.
        if expect.reason == stat::FORWARD_NEW && model.ct.len() + model.ct_new.len() > new_before {
            let key = model::key_of(&input);
            let entry = model.ct.get(&key).or(model.ct_new.get(&key)).copied();
            if let Some(e) = entry {
                gen.known.push(key);
                gen.known.push((e.to.1, e.to.0, e.to.3, e.to.2, key.4));
            }
        }
    }
    let elapsed = started.elapsed();
    let (ct, ct_new, frags) = model.sizes();
    println!(
        "{packets} packets in {:.1} s ({:.1} µs/packet); model tables at the end: {ct} \
         established, {ct_new} embryonic, {frags} fragment records",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / packets as f64
    );
    println!("verdicts by counter (XDP, TC):");
    for (reason, [xdp, tc]) in by_reason.iter().enumerate() {
        if xdp + tc > 0 {
            println!("  {:<26} {xdp:>8} {tc:>8}", stat::NAMES[reason]);
        }
    }
    println!("events counted beside the verdicts:");
    for reason in [
        stat::CT_PROMOTED,
        stat::CT_REOPENED,
        stat::CT_NEW_WITHOUT_SYN,
        stat::REDIRECT_FIB,
    ] {
        println!(
            "  {:<26} {:>8}",
            stat::NAMES[reason as usize],
            tally[reason as usize]
        );
    }
    if packets >= DEFAULT_PACKETS {
        // The run exercised every outcome it is meant to.
        for reason in [
            stat::FORWARD_NEW,
            stat::FORWARD_ESTABLISHED,
            stat::REVERSE_NAT,
            stat::PASS_NO_SERVICE,
            stat::PASS_NOT_IPV4,
            stat::PASS_OTHER_PROTOCOL,
            stat::PASS_FRAGMENT,
            stat::PASS_MALFORMED,
            stat::REJECT_TCP_RESET,
            stat::REJECT_ICMP_UNREACHABLE,
            stat::DROP_REJECT_FAILED,
            stat::DROP_NO_BACKEND,
            stat::DROP_NO_LOCAL_BACKEND,
            stat::DROP_SOURCE_RANGE,
            stat::FORWARD_FRAGMENT,
            stat::CT_PROMOTED,
            stat::CT_REOPENED,
            stat::CT_NEW_WITHOUT_SYN,
            stat::ICMP_ERROR_TO_CLIENT,
            stat::ICMP_ERROR_TO_BACKEND,
            stat::PASS_ICMP_SHORT_QUOTE,
            stat::PASS_ICMP_UNKNOWN_FLOW,
            stat::PASS_ICMP_IP_OPTIONS,
        ] {
            assert!(
                tally[reason as usize] > 0,
                "the run never produced {}",
                stat::NAMES[reason as usize]
            );
        }
    }
    // Far from the LRU maps' capacities: no eviction can have made the kernel's tables
    // differ from the model's.
    assert!(
        ct < 100_000 && ct_new < 50_000 && frags < 8_000,
        "tables too full for an exact model: {ct} {ct_new} {frags}"
    );
}
