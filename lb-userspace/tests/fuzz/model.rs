//! The reference model of the datapath for the fuzz test: given the programmed services and
//! the flows it has seen, what xlb_xdp / xlb_tc must do with a packet — verdict, output
//! bytes, counters. Written from docs/datapath.md, independently of lb-ebpf: it parses
//! the raw bytes itself, builds rejects and translations from scratch, and computes every
//! checksum over the whole header or message (never with the datapath's RFC 1624 updates).
//!
//! Checksums of translated packets: the datapath updates them incrementally, which keeps
//! whatever error an input checksum had (a fuzzed packet may carry any value). So the model
//! requires the one's-complement sum of the covered bytes to be conserved: the expected
//! field is the value that makes the new header's sum equal the old one's (mod 0xffff). For
//! an input with a correct checksum this is exactly the checksum computed from scratch.
//!
//! Backend and masquerade-port choice: hashing is the datapath's business; the model takes
//! the backend (and port) it sees in the output as an observation, checks that it is a member
//! of the service's set (and a free port in the range), and from then on predicts every
//! packet of the flow exactly.
use std::collections::{HashMap, HashSet};

use lb_common::{ct_state, snat_try, stat, IPPROTO_TCP, IPPROTO_UDP};

pub const IPPROTO_ICMP: u8 = 1;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// 5-tuple in host order: (saddr, daddr, sport, dport, proto).
pub type Key = (u32, u32, u16, u16, u8);
/// What a tracked packet's tuple becomes: (saddr, daddr, sport, dport).
pub type Tuple = (u32, u32, u16, u16);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Handed on untouched (XDP_PASS / TC_ACT_OK).
    Pass,
    /// XDP_DROP / TC_ACT_SHOT.
    Drop,
    /// Rewritten and sent on (XDP_PASS; TC: FIB redirect or TC_ACT_OK).
    Translated,
    /// Turned into an answer to its sender (XDP_TX; TC: redirect to the ingress device).
    Bounce,
}

#[derive(Debug)]
pub struct Expect {
    pub verdict: Verdict,
    pub output: Vec<u8>,
    /// The verdict's counter.
    pub reason: u32,
    /// Event counters incremented beside it (promotion, reopen, resumed flow).
    pub events: Vec<u32>,
}

#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub to: Tuple,
    pub reply: bool,
    pub state: u8,
}

impl Entry {
    /// The key of the flow's other direction.
    fn other(&self, proto: u8) -> Key {
        (self.to.1, self.to.0, self.to.3, self.to.2, proto)
    }
}

#[derive(Clone, Debug)]
pub struct BackendDesc {
    pub addr: u32,
    pub port: u16,
    pub local: bool,
}

#[derive(Clone, Debug)]
pub struct Service {
    /// The frontend's backend set: its name and backends.
    pub set: String,
    pub backends: Vec<BackendDesc>,
    /// The set is node-local (SVC_F_LOCAL): an empty one drops, the client's source stays.
    pub local: bool,
    /// externalTrafficPolicy Local: the cluster-wide set sources inside the cluster use.
    pub cluster: Option<(String, Vec<BackendDesc>)>,
    /// NodePort / external frontend (SVC_F_EXTERNAL): remote backends are masqueraded.
    pub external: bool,
    /// sessionAffinity ClientIP (timeout far longer than the run).
    pub affinity: bool,
    /// loadBalancerSourceRanges as (address, mask).
    pub source_ranges: Option<Vec<(u32, u32)>>,
}

pub struct Config {
    pub cluster_addr: u32,
    pub cluster_mask: u32,
    pub snat_addr: u32,
    pub snat_ports: (u16, u16),
}

pub struct Model {
    pub cfg: Config,
    /// Frontends by (addr, port, proto).
    pub services: HashMap<(u32, u16, u8), Service>,
    /// ClusterIPs with a port-0 frontend (S04: other ports are refused).
    pub other_ports: HashSet<u32>,
    /// XLB_CT_V2 and XLB_CT_NEW_V1 as the model expects them.
    pub ct: HashMap<Key, Entry>,
    pub ct_new: HashMap<Key, Entry>,
    /// XLB_FRAG_V1: (saddr, daddr, id, proto) -> (saddr, daddr).
    pub frags: HashMap<(u32, u32, u16, u8), (u32, u32)>,
    /// XLB_AFFINITY_V1: (client, set) -> backend.
    pub affinity: HashMap<(u32, String), (u32, u16)>,
}

/// A packet as the model's own parser sees it.
enum Parsed {
    Rejected(u32),
    /// IPv4, neither TCP nor UDP: the ICMP stage.
    OtherProtocol,
    /// A later fragment of a TCP/UDP datagram.
    LaterFragment {
        saddr: u32,
        daddr: u32,
        id: u16,
        proto: u8,
    },
    L4(L4),
}

#[derive(Clone, Copy)]
struct L4 {
    key: Key,
    l4_off: usize,
    ihl: usize,
    tot_len: usize,
    first_fragment: bool,
    id: u16,
    flags: u8,
}

pub fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}
pub fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}
pub fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
pub fn put32(p: &mut [u8], at: usize, v: u32) {
    p[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Sum of the big-endian 16-bit words of `bytes` (an odd last byte padded with zero).
pub fn word_sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// The checksum of a block whose other words sum to `sum`, computed from scratch: the
/// value that makes the whole block sum to 0xffff.
pub fn checksum(sum: u64) -> u16 {
    conserve(0, sum)
}

/// The checksum field that makes a block whose other words sum to `new_rest` sum to what
/// the old block (field included) summed to, `old_total` (mod 0xffff; 0 is written 0x0000).
fn conserve(old_total: u64, new_rest: u64) -> u16 {
    let m = 0xffff_u64;
    ((old_total % m + m - new_rest % m) % m) as u16
}

/// The TCP/UDP pseudo-header sum (addresses and protocol; the length cancels out of every
/// conservation, and the model uses the covered bytes' length for completeness).
fn pseudo(saddr: u32, daddr: u32, proto: u8, len: usize) -> u64 {
    word_sum(&saddr.to_be_bytes()) + word_sum(&daddr.to_be_bytes()) + u64::from(proto) + len as u64
}

fn ipv4(v: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(v)
}

impl Model {
    fn in_cluster(&self, addr: u32) -> bool {
        addr & self.cfg.cluster_mask == self.cfg.cluster_addr
    }

    /// parse.rs's contract: the counters of docs/datapath.md "Packets the datapath does not
    /// translate", checked in the order the header's fields are read.
    fn parse(p: &[u8]) -> Parsed {
        let len = p.len();
        if len < 14 {
            return Parsed::Rejected(stat::PASS_MALFORMED);
        }
        if be16(p, 12) != 0x0800 {
            return Parsed::Rejected(stat::PASS_NOT_IPV4);
        }
        if len < 15 || p[14] >> 4 != 4 || p[14] & 0x0f < 5 {
            return Parsed::Rejected(stat::PASS_MALFORMED);
        }
        let ihl = usize::from(p[14] & 0x0f) * 4;
        if len < 18 {
            return Parsed::Rejected(stat::PASS_MALFORMED);
        }
        let tot_len = usize::from(be16(p, 16));
        if tot_len < ihl || len < 14 + tot_len {
            return Parsed::Rejected(stat::PASS_MALFORMED);
        }
        // From here on at least 14 + 20 bytes are present.
        let frag = be16(p, 20);
        let id = be16(p, 18);
        let proto = p[23];
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Parsed::OtherProtocol;
        }
        let (saddr, daddr) = (be32(p, 26), be32(p, 30));
        if frag & 0x1fff != 0 {
            return Parsed::LaterFragment {
                saddr,
                daddr,
                id,
                proto,
            };
        }
        let l4_len = if proto == IPPROTO_TCP { 20 } else { 8 };
        if tot_len < ihl + l4_len {
            return Parsed::Rejected(stat::PASS_MALFORMED);
        }
        let l4_off = 14 + ihl;
        Parsed::L4(L4 {
            key: (saddr, daddr, be16(p, l4_off), be16(p, l4_off + 2), proto),
            l4_off,
            ihl,
            tot_len,
            first_fragment: frag & 0x2000 != 0,
            id,
            flags: if proto == IPPROTO_TCP {
                p[l4_off + 13]
            } else {
                0
            },
        })
    }

    /// The model's prediction for `input`, updating its tables as the datapath must update
    /// its maps. `observed` is the datapath's output: only a new flow's backend and
    /// masquerade port are read from it (checked, then trusted); `Err` when those are not
    /// a valid choice.
    pub fn step(&mut self, input: &[u8], observed: &[u8]) -> Result<Expect, String> {
        match Self::parse(input) {
            Parsed::Rejected(reason) => Ok(untouched(input, Verdict::Pass, reason)),
            Parsed::OtherProtocol => Ok(self.icmp(input)),
            Parsed::LaterFragment {
                saddr,
                daddr,
                id,
                proto,
            } => Ok(match self.frags.get(&(saddr, daddr, id, proto)) {
                None => untouched(input, Verdict::Pass, stat::PASS_FRAGMENT),
                Some(&(s, d)) => {
                    let mut out = input.to_vec();
                    rewrite_ip_addresses(&mut out, input, s, d);
                    Expect {
                        verdict: Verdict::Translated,
                        output: out,
                        reason: stat::FORWARD_FRAGMENT,
                        events: vec![],
                    }
                }
            }),
            Parsed::L4(l4) => self.l4(input, &l4, observed),
        }
    }

    fn l4(&mut self, input: &[u8], p: &L4, observed: &[u8]) -> Result<Expect, String> {
        let mut events = vec![];
        if let Some(e) = self.lookup(p, &mut events) {
            let reason = if e.reply {
                stat::REVERSE_NAT
            } else {
                stat::FORWARD_ESTABLISHED
            };
            return Ok(self.translate(input, p, e.to, reason, events));
        }
        let (_, daddr, _, dport, proto) = p.key;
        let Some(service) = self.services.get(&(daddr, dport, proto)).cloned() else {
            if self.other_ports.contains(&daddr) {
                return Ok(reject(input, p, events));
            }
            if let Some(e) = self.unclaimed(p, &mut events) {
                let reason = if e.reply {
                    stat::REVERSE_NAT
                } else {
                    stat::FORWARD_ESTABLISHED
                };
                return Ok(self.translate(input, p, e.to, reason, events));
            }
            return Ok(with_events(
                untouched(input, Verdict::Pass, stat::PASS_NO_SERVICE),
                events,
            ));
        };
        if let Some(e) = self.embryonic(p, &mut events) {
            let reason = if e.reply {
                stat::REVERSE_NAT
            } else {
                stat::FORWARD_ESTABLISHED
            };
            return Ok(self.translate(input, p, e.to, reason, events));
        }
        let (saddr, _, sport, _, _) = p.key;
        if let Some(ranges) = &service.source_ranges {
            if !ranges.iter().any(|(addr, mask)| saddr & mask == *addr) {
                let drop = untouched(input, Verdict::Drop, stat::DROP_SOURCE_RANGE);
                return Ok(with_events(drop, events));
            }
        }
        let (set, backends, local) = match &service.cluster {
            Some((name, backends)) if self.in_cluster(saddr) => (name, backends, false),
            _ => (&service.set, &service.backends, service.local),
        };
        if backends.is_empty() {
            if local {
                let drop = untouched(input, Verdict::Drop, stat::DROP_NO_LOCAL_BACKEND);
                return Ok(with_events(drop, events));
            }
            return Ok(reject(input, p, events));
        }
        // A new flow: the backend (and masquerade port) chosen is read from the output.
        if observed == input {
            if let Some(e) = self.snat_exhausted(input, p, &service, backends, local, set) {
                return Ok(with_events(e, events));
            }
        }
        if observed.len() < p.l4_off + 4 {
            return Err("new flow: the output is too short to name a backend".into());
        }
        let (b_addr, b_port) = (be32(observed, 30), be16(observed, p.l4_off + 2));
        let Some(backend) = backends
            .iter()
            .find(|b| b.addr == b_addr && b.port == b_port)
        else {
            return Err(format!(
                "new flow: the output's destination {}:{b_port} is not a backend of {}:{dport}",
                ipv4(b_addr),
                ipv4(daddr)
            ));
        };
        if service.affinity {
            let remembered = self
                .affinity
                .entry((saddr, set.clone()))
                .or_insert((b_addr, b_port));
            if *remembered != (b_addr, b_port) {
                return Err(format!(
                    "new flow with session affinity: backend {}:{b_port}, but {} remembers {}:{}",
                    ipv4(b_addr),
                    ipv4(saddr),
                    ipv4(remembered.0),
                    remembered.1
                ));
            }
        }
        let snat = saddr == backend.addr
            || (!(local || backend.local) && (service.external || !self.in_cluster(saddr)));
        let tcp = proto == IPPROTO_TCP;
        // Resumed flows (no SYN) start embryonic too, like a SYN's.
        let resumed = tcp && p.flags & TCP_SYN == 0;
        let state = if tcp {
            ct_state::SYN_SENT
        } else {
            ct_state::NONE
        };
        let (client_addr, client_port) = if snat {
            let port = be16(observed, p.l4_off);
            let (min, max) = self.cfg.snat_ports;
            let reply_key = (b_addr, self.cfg.snat_addr, b_port, port, proto);
            if !(min..=max).contains(&port)
                || self.ct.contains_key(&reply_key)
                || (tcp && self.ct_new.contains_key(&reply_key))
            {
                return Err(format!(
                    "new flow: masquerade port {port} outside {min}-{max} or already in use"
                ));
            }
            (self.cfg.snat_addr, port)
        } else {
            (saddr, sport)
        };
        let original = Entry {
            to: (client_addr, b_addr, client_port, b_port),
            reply: false,
            state,
        };
        let reply = Entry {
            to: (daddr, saddr, dport, sport),
            reply: true,
            state,
        };
        let table = if tcp { &mut self.ct_new } else { &mut self.ct };
        table.insert((b_addr, client_addr, b_port, client_port, proto), reply);
        table.insert(p.key, original);
        if resumed {
            events.push(stat::CT_NEW_WITHOUT_SYN);
        }
        Ok(self.translate(input, p, original.to, stat::FORWARD_NEW, events))
    }

    /// A new flow the datapath left untouched: dropped as `drop_snat_exhausted` is right only
    /// if a backend it may have chosen (the remembered one under affinity) needs masquerading
    /// and all 8 ports the flow tries towards it are in use.
    fn snat_exhausted(
        &self,
        input: &[u8],
        p: &L4,
        service: &Service,
        backends: &[BackendDesc],
        local: bool,
        set: &str,
    ) -> Option<Expect> {
        let (saddr, daddr, sport, dport, proto) = p.key;
        let remembered = self.affinity.get(&(saddr, set.to_string()));
        let hash = lb_common::FlowKey::new(ipv4(saddr), sport, ipv4(daddr), dport, proto).hash();
        let (min, max) = self.cfg.snat_ports;
        let range = u32::from(max) - u32::from(min) + 1;
        let exhausted = backends
            .iter()
            .filter(|b| remembered.is_none_or(|r| *r == (b.addr, b.port)))
            .filter(|b| {
                saddr == b.addr
                    || (!(local || b.local) && (service.external || !self.in_cluster(saddr)))
            })
            .any(|b| {
                (0..8).all(|i| {
                    let port = (u32::from(min) + snat_try(hash, i) % range) as u16;
                    let key = (b.addr, self.cfg.snat_addr, b.port, port, proto);
                    self.ct.contains_key(&key)
                        || (proto == IPPROTO_TCP && self.ct_new.contains_key(&key))
                })
            });
        exhausted.then(|| untouched(input, Verdict::Drop, stat::DROP_SNAT_EXHAUSTED))
    }

    /// conntrack::lookup: the established table, then for replies (SYN-ACK, RST) the
    /// embryonic one.
    fn lookup(&mut self, p: &L4, events: &mut Vec<u32>) -> Option<Entry> {
        let proto = p.key.4;
        if let Some(e) = self.ct.get(&p.key).copied() {
            if proto == IPPROTO_TCP {
                if reopens(&mut self.ct, p.key, &e, p.flags, events) {
                    return None;
                }
                let e = self.ct.get_mut(&p.key).unwrap();
                advance(e, p.flags);
            }
            return Some(e);
        }
        let reply_like =
            p.flags & TCP_RST != 0 || p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
        if proto != IPPROTO_TCP || !reply_like {
            return None;
        }
        self.embryonic(p, events)
    }

    /// conntrack::unclaimed: a TCP packet no established flow and no frontend claims. A SYN
    /// (no ACK) forgets a closing or closed flow whose reply entry is its reverse (a direct
    /// connection reusing the client's port), in each table; other packets but SYN-ACKs and
    /// RSTs (looked up already) look for an embryonic or resumed flow.
    fn unclaimed(&mut self, p: &L4, events: &mut Vec<u32>) -> Option<Entry> {
        let (saddr, daddr, sport, dport, proto) = p.key;
        if proto != IPPROTO_TCP
            || p.flags & TCP_RST != 0
            || p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        {
            return None;
        }
        if p.flags & TCP_SYN != 0 {
            let reply_key = (daddr, saddr, dport, sport, proto);
            forget_stale_reply(&mut self.ct, reply_key, events);
            forget_stale_reply(&mut self.ct_new, reply_key, events);
            return None;
        }
        self.embryonic(p, events)
    }

    /// conntrack::embryonic: a handshake in progress; the backend's answer marks the reply
    /// entry, the client's next packet without SYN or RST then promotes the flow.
    fn embryonic(&mut self, p: &L4, events: &mut Vec<u32>) -> Option<Entry> {
        let proto = p.key.4;
        if proto != IPPROTO_TCP {
            return None;
        }
        let e = self.ct_new.get(&p.key).copied()?;
        if reopens(&mut self.ct_new, p.key, &e, p.flags, events) {
            return None;
        }
        let entry = self.ct_new.get_mut(&p.key).unwrap();
        advance(entry, p.flags);
        let e = *entry;
        if e.reply {
            if e.state < ct_state::SYN_RECV {
                entry.state = ct_state::SYN_RECV;
            }
        } else if p.flags & (TCP_SYN | TCP_RST) == 0 && e.state < ct_state::CLOSING {
            let other = e.other(proto);
            if let Some(r) = self.ct_new.get(&other).copied() {
                if r.state == ct_state::SYN_RECV {
                    self.ct.insert(
                        other,
                        Entry {
                            state: ct_state::ESTABLISHED,
                            ..r
                        },
                    );
                    self.ct.insert(
                        p.key,
                        Entry {
                            state: ct_state::ESTABLISHED,
                            ..e
                        },
                    );
                    self.ct_new.remove(&p.key);
                    self.ct_new.remove(&other);
                    events.push(stat::CT_PROMOTED);
                }
            }
        }
        Some(e)
    }

    /// The packet with its tuple replaced by `to`, checksums conserved; a first fragment's
    /// address rewrite is recorded for its later fragments.
    fn translate(
        &mut self,
        input: &[u8],
        p: &L4,
        to: Tuple,
        reason: u32,
        events: Vec<u32>,
    ) -> Expect {
        let mut out = input.to_vec();
        let (saddr, daddr, _, _, proto) = p.key;
        let l4_end = 14 + p.tot_len;
        let csum_at = p.l4_off + if proto == IPPROTO_TCP { 16 } else { 6 };
        let l4_len = l4_end - p.l4_off;
        let old_l4 = pseudo(saddr, daddr, proto, l4_len) + word_sum(&input[p.l4_off..l4_end]);
        rewrite_ip_addresses(&mut out, input, to.0, to.1);
        put16(&mut out, p.l4_off, to.2);
        put16(&mut out, p.l4_off + 2, to.3);
        let old_csum = be16(input, csum_at);
        // UDP: a checksum of 0 means none and stays 0; a computed 0 is sent as 0xffff.
        if !(proto == IPPROTO_UDP && old_csum == 0) {
            put16(&mut out, csum_at, 0);
            let rest = pseudo(to.0, to.1, proto, l4_len) + word_sum(&out[p.l4_off..l4_end]);
            let mut c = conserve(old_l4, rest);
            if proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            put16(&mut out, csum_at, c);
        }
        debug_assert_eq!(p.ihl, usize::from(input[14] & 0x0f) * 4);
        if p.first_fragment {
            self.frags.insert((saddr, daddr, p.id, proto), (to.0, to.1));
        }
        Expect {
            verdict: Verdict::Translated,
            output: out,
            reason,
            events,
        }
    }

    /// icmp.rs's contract: an ICMP error whose quote names a tracked flow is translated
    /// like the flow's reversed packet; everything else passes, counted by why.
    fn icmp(&self, p: &[u8]) -> Expect {
        let pass = |reason| untouched(p, Verdict::Pass, reason);
        // parse() checked: version 4, IHL >= 5, total length within the packet.
        if p[23] != IPPROTO_ICMP {
            return pass(stat::PASS_OTHER_PROTOCOL);
        }
        if be16(p, 20) & 0x3fff != 0 {
            return pass(stat::PASS_FRAGMENT);
        }
        if p[14] & 0x0f != 5 {
            return pass(stat::PASS_ICMP_IP_OPTIONS);
        }
        if p.len() < 35 {
            return pass(stat::PASS_MALFORMED);
        }
        if ![3, 11, 12].contains(&p[34]) {
            return pass(stat::PASS_OTHER_PROTOCOL);
        }
        let tot_len = usize::from(be16(p, 16));
        if tot_len < 28 {
            return pass(stat::PASS_MALFORMED);
        }
        let quoted = tot_len - 28;
        if quoted < 20 {
            return pass(stat::PASS_ICMP_SHORT_QUOTE);
        }
        let inner = 42;
        if p[inner] >> 4 != 4 || p[inner] & 0x0f < 5 {
            return pass(stat::PASS_MALFORMED);
        }
        let proto = p[inner + 9];
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return pass(stat::PASS_OTHER_PROTOCOL);
        }
        if be16(p, inner + 6) & 0x1fff != 0 {
            return pass(stat::PASS_FRAGMENT);
        }
        if p[inner] & 0x0f != 5 {
            return pass(stat::PASS_ICMP_IP_OPTIONS);
        }
        if quoted < 28 {
            return pass(stat::PASS_ICMP_SHORT_QUOTE);
        }
        let q = (
            be32(p, inner + 12),
            be32(p, inner + 16),
            be16(p, inner + 20),
            be16(p, inner + 22),
        );
        let reversed = (q.1, q.0, q.3, q.2, proto);
        let entry = self.ct.get(&reversed).or(if proto == IPPROTO_TCP {
            self.ct_new.get(&reversed)
        } else {
            None
        });
        let Some(e) = entry else {
            return pass(stat::PASS_ICMP_UNKNOWN_FLOW);
        };
        // The quoted packet as its sender sent it: the translation reversed.
        let (ns, nd, nsp, ndp) = (e.to.1, e.to.0, e.to.3, e.to.2);
        let mut out = p.to_vec();
        let end = 14 + tot_len;
        let old_icmp = word_sum(&p[34..end]);
        let old_inner_ip = word_sum(&p[inner..inner + 20]);
        put32(&mut out, inner + 12, ns);
        put32(&mut out, inner + 16, nd);
        put16(&mut out, inner + 20, nsp);
        put16(&mut out, inner + 22, ndp);
        put16(&mut out, inner + 10, 0);
        let c = conserve(old_inner_ip, word_sum(&out[inner..inner + 20]));
        put16(&mut out, inner + 10, c);
        // The quoted transport checksum: UDP unless 0, TCP when its whole header is quoted.
        let l4 = inner + 20;
        let l4_csum = if proto == IPPROTO_UDP {
            (be16(p, l4 + 6) != 0).then_some((l4 + 6, 8))
        } else {
            (quoted >= 40).then_some((l4 + 16, 20))
        };
        if let Some((at, hlen)) = l4_csum {
            let old = pseudo(q.0, q.1, proto, hlen) + word_sum(&p[l4..l4 + hlen]);
            put16(&mut out, at, 0);
            let rest = pseudo(ns, nd, proto, hlen) + word_sum(&out[l4..l4 + hlen]);
            let mut c = conserve(old, rest);
            if proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            put16(&mut out, at, c);
        }
        put16(&mut out, 36, 0);
        let c = conserve(old_icmp, word_sum(&out[34..end]));
        put16(&mut out, 36, c);
        // Outer: to the quoted packet's sender; from its destination only if that raised it.
        let (os, od) = (be32(p, 26), be32(p, 30));
        let new_d = if od == q.0 { ns } else { od };
        let new_s = if os == q.1 { nd } else { os };
        rewrite_ip_addresses(&mut out, p, new_s, new_d);
        Expect {
            verdict: Verdict::Translated,
            output: out,
            reason: if e.reply {
                stat::ICMP_ERROR_TO_CLIENT
            } else {
                stat::ICMP_ERROR_TO_BACKEND
            },
            events: vec![],
        }
    }

    /// Entries in both conntrack tables and fragment records (to keep the run far from the
    /// LRU maps' capacities, where eviction would make the kernel's tables differ).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.ct.len(), self.ct_new.len(), self.frags.len())
    }
}

fn untouched(input: &[u8], verdict: Verdict, reason: u32) -> Expect {
    Expect {
        verdict,
        output: input.to_vec(),
        reason,
        events: vec![],
    }
}

fn with_events(mut e: Expect, events: Vec<u32>) -> Expect {
    e.events = events;
    e
}

/// A client SYN (without ACK) on a closing or closed flow's 5-tuple forgets both entries.
fn reopens(
    table: &mut HashMap<Key, Entry>,
    key: Key,
    e: &Entry,
    flags: u8,
    events: &mut Vec<u32>,
) -> bool {
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN || e.reply {
        return false;
    }
    let other = e.other(key.4);
    let other_state = table.get(&other).map_or(0, |o| o.state);
    if e.state < ct_state::CLOSING && other_state < ct_state::CLOSING {
        return false;
    }
    table.remove(&other);
    table.remove(&key);
    events.push(stat::CT_REOPENED);
    true
}

/// A reply entry at `reply_key` whose flow is closing or closed (either direction, same
/// table): both entries forgotten.
fn forget_stale_reply(table: &mut HashMap<Key, Entry>, reply_key: Key, events: &mut Vec<u32>) {
    let Some(reply) = table.get(&reply_key).copied() else {
        return;
    };
    if !reply.reply {
        return;
    }
    let original = reply.other(reply_key.4);
    let original_state = table.get(&original).map_or(0, |o| o.state);
    if reply.state < ct_state::CLOSING && original_state < ct_state::CLOSING {
        return;
    }
    table.remove(&original);
    table.remove(&reply_key);
    events.push(stat::CT_REOPENED);
}

/// TCP state only moves forward: RST closes, FIN starts closing.
fn advance(e: &mut Entry, flags: u8) {
    let next = if flags & TCP_RST != 0 {
        ct_state::CLOSED
    } else if flags & TCP_FIN != 0 {
        ct_state::CLOSING
    } else {
        e.state
    };
    e.state = e.state.max(next);
}

/// Replaces the IPv4 addresses in `out` (a copy of `input`) and gives the header the
/// checksum that conserves its sum.
fn rewrite_ip_addresses(out: &mut [u8], input: &[u8], saddr: u32, daddr: u32) {
    let ihl = usize::from(input[14] & 0x0f) * 4;
    let old = word_sum(&input[14..14 + ihl]);
    put32(out, 26, saddr);
    put32(out, 30, daddr);
    put16(out, 24, 0);
    let c = conserve(old, word_sum(&out[14..14 + ihl]));
    put16(out, 24, c);
}

/// S10/S04: a TCP RST or an ICMP port unreachable, built from scratch; dropped when it
/// cannot be built (IP options, a bad TCP data offset) or must not be (an incoming RST).
fn reject(input: &[u8], p: &L4, events: Vec<u32>) -> Expect {
    let drop = |reason| with_events(untouched(input, Verdict::Drop, reason), events.clone());
    if p.ihl != 20 {
        return drop(stat::DROP_REJECT_FAILED);
    }
    let (saddr, daddr, sport, dport, proto) = p.key;
    let mut f = vec![0u8; if proto == IPPROTO_TCP { 54 } else { 70 }];
    f[0..6].copy_from_slice(&input[6..12]);
    f[6..12].copy_from_slice(&input[0..6]);
    f[12..14].copy_from_slice(&input[12..14]);
    f[14] = 0x45;
    let ip_len = (f.len() - 14) as u16;
    put16(&mut f, 16, ip_len);
    f[22] = 64;
    put32(&mut f, 26, daddr);
    put32(&mut f, 30, saddr);
    let reason = if proto == IPPROTO_TCP {
        let flags = p.flags;
        if flags & TCP_RST != 0 {
            return drop(stat::DROP_NO_BACKEND);
        }
        let doff = usize::from(input[46] >> 4) * 4;
        if doff < 20 || p.tot_len < 20 + doff {
            return drop(stat::DROP_REJECT_FAILED);
        }
        f[20] = 0x40; // DF
        f[23] = IPPROTO_TCP;
        put16(&mut f, 34, dport);
        put16(&mut f, 36, sport);
        if flags & TCP_ACK != 0 {
            put32(&mut f, 38, be32(input, 42));
            f[47] = TCP_RST;
        } else {
            let seg_len = (p.tot_len - 20 - doff) as u32
                + u32::from(flags & TCP_SYN != 0)
                + u32::from(flags & TCP_FIN != 0);
            put32(&mut f, 42, be32(input, 38).wrapping_add(seg_len));
            f[47] = TCP_RST | TCP_ACK;
        }
        f[46] = 5 << 4;
        let c = checksum(pseudo(daddr, saddr, IPPROTO_TCP, 20) + word_sum(&f[34..54]));
        put16(&mut f, 50, c);
        stat::REJECT_TCP_RESET
    } else {
        f[23] = IPPROTO_ICMP;
        f[34] = 3; // destination unreachable
        f[35] = 3; // port unreachable
        f[42..70].copy_from_slice(&input[14..42]);
        let c = checksum(word_sum(&f[34..70]));
        put16(&mut f, 36, c);
        stat::REJECT_ICMP_UNREACHABLE
    };
    let c = checksum(word_sum(&f[14..34]));
    put16(&mut f, 24, c);
    Expect {
        verdict: Verdict::Bounce,
        output: f,
        reason,
        events,
    }
}

/// The 5-tuple of a TCP/UDP packet the model parses as one (all zero otherwise).
pub fn key_of(p: &[u8]) -> Key {
    match Model::parse(p) {
        Parsed::L4(l4) => l4.key,
        _ => (0, 0, 0, 0, 0),
    }
}
