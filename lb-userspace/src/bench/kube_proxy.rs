//! The rules kube-proxy would program for the synthetic services, byte for byte as its
//! proxiers write them (kubernetes pkg/proxy/iptables/proxier.go and
//! pkg/proxy/nftables/proxier.go; ../shared/reference/kube-proxy-layouts.md): the baselines
//! of the programming-from-cold comparison are loaded from these texts by the real
//! `iptables-restore` and `nft`.
//!
//! Both describe kube-proxy's first (full) sync on a node with default settings: masquerade
//! bit 14, cluster-CIDR local-traffic detection (10.244.0.0/16), no `--masquerade-all`, no
//! nfacct counters, `--random-fully` available. iptables mode: NodePorts on all addresses
//! with localhost NodePorts (its defaults); comments are dropped from per-endpoint rules
//! above 1 000 endpoints ("large cluster mode"), as kube-proxy does. nftables mode: NodePorts
//! on the primary node IP (its default), one ServiceCIDR (10.96.0.0/12). The services are
//! ClusterIP only and all have endpoints, so no KUBE-EXT/KUBE-FW chains and no reject
//! entries appear.
//!
//! One deliberate difference: base-chain priorities are written as numbers (-110, -90, -100,
//! 100), which is what kube-proxy's `dstnat-10`, `dstnat+10`, `dstnat` and `srcnat` mean;
//! nft 1.0.6 (Debian 12) rejects those mnemonics on filter chains.
use std::{fmt::Write, net::Ipv4Addr};

use super::synth;

/// `fmt.Sprintf("%#08x", 1<<14)`, kube-proxy's default masquerade mark.
const MASQ_MARK: &str = "0x004000";
/// kube-proxy switches to "large cluster mode" above this many endpoints.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// One service port as kube-proxy sees it (a Service port and its ready endpoints).
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub service: String,
    pub port_name: String,
    /// "tcp" or "udp", as kube-proxy writes it in chain names and matches.
    pub protocol: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
    /// The node port, for a NodePort service (externalTrafficPolicy Cluster).
    pub node_port: Option<u16>,
}

impl ServicePort {
    /// Service `i` of the synthetic cluster (`synth`).
    pub fn synthetic(i: usize, endpoints: usize) -> Self {
        Self {
            namespace: synth::NAMESPACE.into(),
            service: synth::service_name(i),
            port_name: "http".into(),
            protocol: "tcp",
            cluster_ip: synth::cluster_ip(i),
            port: synth::SERVICE_PORT,
            target_port: synth::TARGET_PORT,
            endpoints: (0..endpoints)
                .map(|j| synth::endpoint_ip(i, j, endpoints))
                .collect(),
            node_port: None,
        }
    }

    /// svcPortName: `ns/name:port`.
    fn name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.service, self.port_name)
    }
}

fn synthetic(n: usize, endpoints: usize) -> Vec<ServicePort> {
    (0..n)
        .map(|i| ServicePort::synthetic(i, endpoints))
        .collect()
}

fn svc_chain(sp: &ServicePort) -> String {
    format!(
        "KUBE-SVC-{}",
        &base32_sha256(&format!("{}{}", sp.name(), sp.protocol))[..16]
    )
}

fn sep_chain(sp: &ServicePort, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        &base32_sha256(&format!("{}{}{endpoint}", sp.name(), sp.protocol))[..16]
    )
}

/// What kube-proxy sets up with `iptables` calls before its first iptables-restore: its
/// chains and the jump rules into them (EnsureChain + EnsureRule(Prepend)), written here as
/// one restore input with the same end state. Not part of the timed load.
pub fn iptables_jumps() -> String {
    let new = "-m conntrack --ctstate NEW ";
    let filter = [
        (
            "INPUT",
            "KUBE-EXTERNAL-SERVICES",
            new,
            "kubernetes externally-visible service portals",
        ),
        (
            "FORWARD",
            "KUBE-EXTERNAL-SERVICES",
            new,
            "kubernetes externally-visible service portals",
        ),
        (
            "INPUT",
            "KUBE-NODEPORTS",
            "",
            "kubernetes health check service ports",
        ),
        (
            "FORWARD",
            "KUBE-SERVICES",
            new,
            "kubernetes service portals",
        ),
        ("OUTPUT", "KUBE-SERVICES", new, "kubernetes service portals"),
        ("FORWARD", "KUBE-FORWARD", "", "kubernetes forwarding rules"),
        (
            "INPUT",
            "KUBE-PROXY-FIREWALL",
            new,
            "kubernetes load balancer firewall",
        ),
        (
            "OUTPUT",
            "KUBE-PROXY-FIREWALL",
            new,
            "kubernetes load balancer firewall",
        ),
        (
            "FORWARD",
            "KUBE-PROXY-FIREWALL",
            new,
            "kubernetes load balancer firewall",
        ),
    ];
    let nat = [
        ("OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
        ("PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
        (
            "POSTROUTING",
            "KUBE-POSTROUTING",
            "kubernetes postrouting rules",
        ),
    ];
    let mut s = String::from("*filter\n");
    for chain in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for (from, to, extra, comment) in filter {
        let _ = writeln!(
            s,
            "-I {from} {extra}-m comment --comment \"{comment}\" -j {to}"
        );
    }
    // kubelet's own firewall chain, which kube-proxy also ensures.
    s.push_str("-I INPUT -j KUBE-FIREWALL\n-I OUTPUT -j KUBE-FIREWALL\nCOMMIT\n*nat\n");
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING"] {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for (from, to, comment) in nat {
        let _ = writeln!(s, "-I {from} -m comment --comment \"{comment}\" -j {to}");
    }
    s.push_str("COMMIT\n");
    s
}

/// The input of kube-proxy's first `iptables-restore --noflush --counters` for `n` services
/// of `endpoints` endpoints.
pub fn iptables_sync(n: usize, endpoints: usize) -> String {
    iptables_rules(&synthetic(n, endpoints))
}

/// The same for any service ports.
pub fn iptables_rules(ports: &[ServicePort]) -> String {
    let large = ports.iter().map(|p| p.endpoints.len()).sum::<usize>() > LARGE_CLUSTER_ENDPOINTS;
    let cidr = synth::CLUSTER_CIDR;
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
    for sp in ports {
        let name = sp.name();
        let (ip, port, proto) = (sp.cluster_ip, sp.port, sp.protocol);
        let svc = svc_chain(sp);
        let match_ip = format!(
            "-m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} --dport {port}"
        );
        let _ = writeln!(nat_rules, "-A KUBE-SERVICES {match_ip} -j {svc}");
        let _ = writeln!(
            nat_rules,
            "-A {svc} {match_ip} ! -s {cidr} -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(nat_chains, ":{svc} - [0:0]");
        if let Some(node_port) = sp.node_port {
            // externalTrafficPolicy Cluster: every NodePort packet is marked for masquerade.
            let ext = svc.replacen("KUBE-SVC-", "KUBE-EXT-", 1);
            let _ = writeln!(nat_chains, ":{ext} - [0:0]");
            let _ = writeln!(
                nat_rules,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} -j {ext}\n\
                 -A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
                 -A {ext} -j {svc}"
            );
        }
        let endpoints = sp.endpoints.len();
        let eps: Vec<String> = sp
            .endpoints
            .iter()
            .map(|ip| format!("{ip}:{}", sp.target_port))
            .collect();
        for (j, ep) in eps.iter().enumerate() {
            let _ = write!(nat_rules, "-A {svc} ");
            if !large {
                let _ = write!(nat_rules, "-m comment --comment \"{name} -> {ep}\" ");
            }
            if j + 1 < endpoints {
                let _ = write!(
                    nat_rules,
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / (endpoints - j) as f64
                );
            }
            let _ = writeln!(nat_rules, "-j {}", sep_chain(sp, ep));
        }
        for (ep, ep_ip) in eps.iter().zip(&sp.endpoints) {
            let sep = sep_chain(sp, ep);
            let _ = writeln!(nat_chains, ":{sep} - [0:0]");
            let comment = if large {
                String::new()
            } else {
                format!("-m comment --comment {name} ")
            };
            let _ = writeln!(
                nat_rules,
                "-A {sep} {comment}-s {ep_ip} -j KUBE-MARK-MASQ\n\
                 -A {sep} {comment}-m {proto} -p {proto} -j DNAT --to-destination {ep}"
            );
        }
    }
    nat_rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    let mut s = String::with_capacity(nat_chains.len() + nat_rules.len() + 1024);
    s.push_str("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        s,
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n*nat"
    );
    s.push_str(&nat_chains);
    s.push_str(&nat_rules);
    s.push_str("COMMIT\n");
    s
}

const T: &str = "ip kube-proxy";

fn nft_chain_base(sp: &ServicePort) -> String {
    format!(
        "{}/{}/{}/{}",
        sp.namespace, sp.service, sp.protocol, sp.port_name
    )
}

/// kube-proxy's hashAndTruncate: the first 8 base32 characters of the name's SHA-256, a
/// dash, the name.
fn hash_and_truncate(name: &str) -> String {
    format!("{}-{name}", &base32_sha256(name)[..8])
}

/// The transaction kube-proxy's first nftables sync feeds to `nft -f -`.
pub fn nft_sync(n: usize, endpoints: usize) -> String {
    nft_rules(&synthetic(n, endpoints), synth::NODE_IP)
}

/// The same for any service ports, on the node whose primary address is `node_ip` (the
/// one address kube-proxy's nftables mode accepts NodePort traffic on by default).
pub fn nft_rules(ports: &[ServicePort], node_ip: Ipv4Addr) -> String {
    let mut s = String::new();
    let mut add = |line: &str| {
        s.push_str(line);
        s.push('\n');
    };
    add(&format!(
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}"
    ));
    let base = [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("filter-output-post-dnat", "filter", "output", "-90"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ];
    // First sync: add+delete every base chain so it is recreated with current properties.
    for (name, ..) in base {
        add(&format!("add chain {T} {name}"));
        add(&format!("delete chain {T} {name}"));
    }
    for (name, kind, hook, priority) in base {
        add(&format!(
            "add chain {T} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        ));
        add(&format!("flush chain {T} {name}"));
    }
    let mut created = std::collections::BTreeSet::new();
    let mut ensure = |add: &mut dyn FnMut(&str), chain: &str| {
        if created.insert(chain.to_string()) {
            add(&format!("add chain {T} {chain}"));
            add(&format!("flush chain {T} {chain}"));
        }
    };
    let jumps = [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        (
            "cluster-ips-check",
            "filter-output-post-dnat",
            "ct state new ",
        ),
    ];
    for (to, from, extra) in jumps {
        ensure(&mut add, to);
        add(&format!("add rule {T} {from} {extra}jump {to}"));
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        ensure(&mut add, chain);
    }
    let service_cidr = synth::SERVICE_CIDR;
    let fixed = format!(
        "add rule {T} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
add rule {T} masquerading mark and {MASQ_MARK} == 0 return\n\
add rule {T} masquerading mark set mark xor {MASQ_MARK}\n\
add rule {T} masquerading masquerade fully-random\n\
add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
add rule {T} cluster-ips-check ip daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\"\n\
add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
flush set {T} nodeport-ips\n\
add element {T} nodeport-ips {{ {node_ip} }}\n\
add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}\n\
flush chain {T} reject-chain\n\
add rule {T} reject-chain reject\n\
add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
add rule {T} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
flush set {T} cluster-ips\n\
flush map {T} service-ips\n\
flush map {T} firewall-ips\n\
flush map {T} no-endpoint-services\n\
flush map {T} no-endpoint-nodeports\n\
flush map {T} service-nodeports"
    );
    add(&fixed);
    let cidr = synth::CLUSTER_CIDR;
    for sp in ports {
        let base = nft_chain_base(sp);
        let (ip, port, proto) = (sp.cluster_ip, sp.port, sp.protocol);
        let endpoints = sp.endpoints.len();
        let eps: Vec<(String, String)> = sp
            .endpoints
            .iter()
            .map(|ep_ip| {
                let chain = format!(
                    "endpoint-{}",
                    hash_and_truncate(&format!("{base}__{ep_ip}/{}", sp.target_port))
                );
                (ep_ip.to_string(), chain)
            })
            .collect();
        for (_, chain) in &eps {
            ensure(&mut add, chain);
        }
        let svc = format!("service-{}", hash_and_truncate(&base));
        ensure(&mut add, &svc);
        add(&format!("add element {T} cluster-ips {{ {ip} }}"));
        add(&format!(
            "add element {T} service-ips {{ {ip} . {proto} . {port} : goto {svc} }}"
        ));
        add(&format!(
            "add rule {T} {svc} ip daddr {ip} {proto} dport {port} ip saddr != {cidr} jump mark-for-masquerade"
        ));
        let vmap: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(j, (_, chain))| format!("{j} : goto {chain}"))
            .collect();
        add(&format!(
            "add rule {T} {svc} numgen random mod {endpoints} vmap {{ {} }}",
            vmap.join(" , ")
        ));
        for (ep_ip, chain) in &eps {
            add(&format!(
                "add rule {T} {chain} ip saddr {ep_ip} jump mark-for-masquerade"
            ));
            add(&format!(
                "add rule {T} {chain} meta l4proto {proto} dnat to {ep_ip}:{}",
                sp.target_port
            ));
        }
        if let Some(node_port) = sp.node_port {
            // externalTrafficPolicy Cluster: masquerade, then the service chain.
            let ext = format!("external-{}", hash_and_truncate(&base));
            ensure(&mut add, &ext);
            add(&format!("add rule {T} {ext} jump mark-for-masquerade"));
            add(&format!("add rule {T} {ext} goto {svc}"));
            add(&format!(
                "add element {T} service-nodeports {{ {proto} . {node_port} : goto {ext} }}"
            ));
        }
    }
    s
}

/// Standard base32 (RFC 4648, with padding, as Go's base32.StdEncoding) of SHA-256(`s`).
fn base32_sha256(s: &str) -> String {
    base32(&sha256(s.as_bytes()))
}

fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in bytes.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let v = buf.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        let chars = (chunk.len() * 8).div_ceil(5);
        for k in 0..8 {
            if k < chars {
                out.push(ALPHABET[(v >> (35 - 5 * k) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// SHA-256 (FIPS 180-4). Names are short; speed does not matter.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (t, word) in block.chunks_exact(4).enumerate() {
            w[t] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for t in 16..64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16]
                .wrapping_add(s0)
                .wrapping_add(w[t - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for t in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[t])
                .wrapping_add(w[t]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_and_base32_match_known_values() {
        let hex: String = sha256(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // The examples in ../shared/reference/kube-proxy-layouts.md (from kube-proxy's tests).
        assert_eq!(
            &base32_sha256("default/web:httptcp")[..16],
            "CDGGSHYLG3RE2FKL"
        );
        assert_eq!(
            &base32_sha256("default/web:httptcp10.244.1.10:8080")[..16],
            "GWQABTP5GBYXHJY5"
        );
        assert_eq!(
            hash_and_truncate("default/web/tcp/http"),
            "SUSTUHLJ-default/web/tcp/http"
        );
        assert_eq!(
            &hash_and_truncate("default/web/tcp/http__10.244.1.10/8080")[..8],
            "FLXOMXXM"
        );
    }

    #[test]
    fn iptables_layout_has_one_ladder_per_service() {
        let text = iptables_sync(3, 4);
        let svc = svc_chain(&ServicePort::synthetic(1, 4));
        assert_eq!(text.matches(&format!(":{svc} - [0:0]")).count(), 1);
        let ladder: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc} ")) && l.contains("KUBE-SEP-"))
            .collect();
        assert_eq!(ladder.len(), 4);
        assert!(
            ladder[0].contains("--probability 0.2500000000"),
            "{}",
            ladder[0]
        );
        assert!(ladder[2].contains("--probability 0.5000000000"));
        assert!(!ladder[3].contains("statistic"));
        assert_eq!(text.matches(":KUBE-SEP-").count(), 12);
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 12);
        assert!(text.lines().last() == Some("COMMIT"));
        // Large cluster mode drops the per-endpoint comments.
        assert!(!iptables_sync(200, 10).contains("-> 10.244."));
        assert!(iptables_sync(100, 10).contains("-> 10.244."));
    }

    #[test]
    fn nft_layout_has_service_and_endpoint_chains() {
        let text = nft_sync(2, 3);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("add chain ip kube-proxy service-") && l.contains('/'))
                .count(),
            2
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("add chain ip kube-proxy endpoint-"))
                .count(),
            6
        );
        assert!(text.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(text.contains(
            "add element ip kube-proxy service-ips { 10.96.0.2 . tcp . 80 : goto service-"
        ));
    }
}
