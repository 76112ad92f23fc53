//! A Kubernetes-like cluster made of network namespaces, shared by the end-to-end tests,
//! `xlb demo` and the benchmarks. Needs root, iproute2, util-linux (nsenter), ethtool,
//! python3 (servers) and curl (`http_get`).
//!
//! ```text
//!                     switch netns: bridge br0 (ports sw-n1, sw-n2, ..., sw-ext)
//!          ┌──────────────────────┬──────────────────────┬──────────────────┐
//!   node1 eth0 172.18.0.11   node2 eth0 172.18.0.12   ...   ext eth0 172.18.0.100
//!   pods 10.244.1.0/24       pods 10.244.2.0/24               routes 10.96.0.0/12 and
//!    ├ xvpoda ── pod-a eth0 10.244.1.2                         10.244.0.0/16 via node1
//!    └ xvpodb ── pod-b eth0 10.244.1.3
//!                            └ xvpodc ── pod-c eth0 10.244.2.2
//! ```
//!
//! Addressing is deterministic (node i: 172.18.0.(10+i), pod CIDR 10.244.i.0/24, its k-th
//! pod 10.244.i.(1+k), gateway 10.244.i.1 on every host-side pod veth) so that manifests
//! can name pod IPs. Namespace names are unique per testbed (`xlb-{pid}-{seq}-{name}`),
//! so testbeds in parallel tests never collide; interface names inside them are fixed
//! (uplink `eth0`, pod veths `xv` + pod name without dashes, matching `--pod-interface
//! 'xv*'`). Dropping a [`Testbed`] (also when a test panics) stops every process it
//! started, deletes its namespaces and pin directories; creating one first removes what
//! dead earlier runs left behind.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::Ipv4Cidr;

mod cleanup;
mod netns;
mod process;
mod traffic;

pub use cleanup::PIN_ROOT;
pub use traffic::{PersistentClient, CLIENT_TIMEOUT, HTTP_PORT, UDP_PORT};

use netns::{in_netns, ip_batch, ns_command, run_checked, sysctls};
use process::{Proc, POLL};

/// Every node's uplink (XDP) interface.
pub const UPLINK: &str = "eth0";
/// Glob matching the host-side pod veths (`--pod-interface`).
pub const POD_INTERFACE_GLOB: &str = "xv*";
/// The cluster's pod CIDR (`--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// ClusterIP range the external client routes via node 1.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The external client's address.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// How long `start_agent` waits for the ready file.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `start_servers` waits for the servers to listen.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Where `xlb demo --keep` records a kept testbed.
pub const DEFAULT_STATE_FILE: &str = "/run/xlb-demo/state.json";

/// Address of node `index` (1-based) on the node network.
pub fn node_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, 10 + index)
}

/// Address of the `k`-th (1-based) pod of node `index` (1-based).
pub fn pod_ip(index: u8, k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index, 1 + k)
}

/// Which nodes, with which pods (by name; node i gets the i-th entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestbedSpec {
    pub nodes: Vec<NodeSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Also the Kubernetes node name (EndpointSlice `nodeName`, `--node-name`).
    pub name: String,
    /// Pod names; the k-th gets 10.244.i.(1+k).
    pub pods: Vec<String>,
}

impl NodeSpec {
    pub fn new(name: &str, pods: &[&str]) -> Self {
        Self {
            name: name.into(),
            pods: pods.iter().map(|p| p.to_string()).collect(),
        }
    }
}

impl Default for TestbedSpec {
    /// node1 with pod-a (10.244.1.2) and pod-b (10.244.1.3); node2 with pod-c (10.244.2.2).
    fn default() -> Self {
        Self {
            nodes: vec![
                NodeSpec::new("node1", &["pod-a", "pod-b"]),
                NodeSpec::new("node2", &["pod-c"]),
            ],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// 1-based position in the spec.
    pub index: u8,
    pub netns: String,
    pub ip: Ipv4Addr,
    #[serde(with = "cidr_text")]
    pub pod_cidr: Ipv4Cidr,
    /// 10.244.i.1, on every host-side pod veth.
    pub gateway: Ipv4Addr,
    /// bpffs directory for this node's agent (`--pin-path`).
    pub pin_path: PathBuf,
    /// `eth0`.
    pub uplink: String,
    /// The uplink's peer in the switch namespace (a bridge port).
    pub switch_port: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Node name.
    pub node: String,
    /// The pod's veth in the node's namespace (`xv…`); the pod's own side is `eth0`.
    pub host_veth: String,
}

/// A namespace with one address on the node network (the external client).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

mod cidr_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::model::Ipv4Cidr;

    pub fn serialize<S: Serializer>(c: &Ipv4Cidr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(c)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Cidr, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Returns true when this process can build testbeds (euid 0 and network namespaces can
/// be created). Otherwise: panics when `CI=true` (CI must never silently skip a
/// privileged test), else prints `SKIPPED (needs root): {test}` and returns false.
pub fn require_privileges(test: &str) -> bool {
    match netns::privilege_probe() {
        Ok(()) => true,
        Err(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "\n\n*** {test}: this privileged test cannot run ({why}) and CI=true: \
                     CI must run privileged tests as root, never skip them. ***\n\n"
                );
            }
            // Straight to the process's stderr: libtest captures eprintln! of passing tests,
            // and `cargo xtask test` must see this marker to fail a skipped run under CI.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED (needs root): {test} ({why})");
            false
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running testbed; dropping it tears everything down.
pub struct Testbed {
    id: String,
    switch_netns: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    external: Host,
    /// Every namespace, in creation order (teardown deletes those that exist).
    namespaces: Vec<String>,
    pin_dir: PathBuf,
    work_dir: PathBuf,
    procs: Vec<Proc>,
    /// node name -> agent pid
    agents: BTreeMap<String, u32>,
    /// pod name -> server pid
    servers: BTreeMap<String, u32>,
    /// false once kept: Drop leaves everything running.
    armed: bool,
}

fn validate(spec: &TestbedSpec) -> Result<()> {
    let n = spec.nodes.len();
    ensure!(
        (1..=89).contains(&n),
        "a testbed has 1 to 89 nodes, not {n}"
    );
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 40
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let mut names = std::collections::BTreeSet::from(["switch", "ext"]);
    let mut veths = std::collections::BTreeSet::new();
    for node in &spec.nodes {
        ensure!(
            node.pods.len() <= 253,
            "node {}: at most 253 pods",
            node.name
        );
        for name in std::iter::once(&node.name).chain(&node.pods) {
            ensure!(
                valid(name),
                "{name:?}: names are 1-40 characters of a-z, 0-9 and inner '-'"
            );
            ensure!(
                names.insert(name.as_str()),
                "{name:?}: duplicate or reserved name"
            );
        }
        for pod in &node.pods {
            let veth = host_veth(pod);
            ensure!(
                veth.len() <= 15,
                "pod {pod:?}: without dashes, at most 13 characters (veth {veth})"
            );
            ensure!(
                veths.insert(veth.clone()),
                "pods {pod:?}: veth name {veth} taken"
            );
        }
    }
    Ok(())
}

/// Frames a node sends back with XDP_TX (rejects) reach the switch-side veth of its uplink,
/// which delivers them promptly only when it runs an XDP program itself; a real switch port
/// has no such quirk. So each node port gets the datapath's parse-only program
/// (`xlb_floor`, it passes everything), attached by pinned links under `pin_dir`, which
/// teardown removes.
fn attach_switch_xdp(switch_netns: &str, ports: &[String], pin_dir: &Path) -> Result<()> {
    use aya::programs::{links::FdLink, Xdp, XdpMode};
    std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    let pin_dir = pin_dir.to_path_buf();
    let ports = ports.to_vec();
    netns::in_netns(switch_netns, move || {
        let mut loader = aya::EbpfLoader::new();
        loader.default_map_pin_directory(&pin_dir);
        // Only the parse-only program is used: keep its (unused) maps tiny.
        for name in lb_common::map_name::ALL {
            loader.map_max_entries(
                name,
                if name == lb_common::map_name::STATS {
                    lb_common::stat::COUNT
                } else {
                    1
                },
            );
        }
        let mut ebpf = loader
            .load(crate::datapath::EBPF_OBJECT)
            .context("loading the switch-port program")?;
        let prog: &mut Xdp = ebpf
            .program_mut(crate::datapath::PROG_FLOOR)
            .context("no floor program")?
            .try_into()?;
        prog.load()?;
        for port in &ports {
            let id = prog
                .attach(port, XdpMode::Driver)
                .with_context(|| format!("XDP on {port}"))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            link.pin(pin_dir.join(format!("xdp-{port}")))
                .with_context(|| format!("pinning the link of {port}"))?;
        }
        Ok(())
    })
}

fn host_veth(pod: &str) -> String {
    format!("xv{}", pod.replace('-', ""))
}

impl Testbed {
    /// Builds the namespaces, links, addresses and routes of `spec`.
    pub fn create(spec: &TestbedSpec) -> Result<Testbed> {
        validate(spec)?;
        netns::ensure_bpffs()?;
        cleanup::remove_stale();
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let prefix = format!("xlb-{id}");
        let pin_dir = cleanup::pin_dir(&id);
        let work_dir = cleanup::work_dir(&id);
        let mut nodes = Vec::new();
        let mut pods = Vec::new();
        for (i, ns) in spec.nodes.iter().enumerate() {
            let index = u8::try_from(i + 1)?;
            nodes.push(Node {
                name: ns.name.clone(),
                index,
                netns: format!("{prefix}-{}", ns.name),
                ip: node_ip(index),
                pod_cidr: Ipv4Cidr {
                    addr: Ipv4Addr::new(10, 244, index, 0),
                    prefix: 24,
                },
                gateway: Ipv4Addr::new(10, 244, index, 1),
                pin_path: pin_dir.join(&ns.name),
                uplink: UPLINK.into(),
                switch_port: format!("sw-n{index}"),
            });
            for (k, p) in ns.pods.iter().enumerate() {
                pods.push(Pod {
                    name: p.clone(),
                    netns: format!("{prefix}-{p}"),
                    ip: pod_ip(index, u8::try_from(k + 1)?),
                    node: ns.name.clone(),
                    host_veth: host_veth(p),
                });
            }
        }
        let mut tb = Testbed {
            switch_netns: format!("{prefix}-switch"),
            external: Host {
                name: "ext".into(),
                netns: format!("{prefix}-ext"),
                ip: EXTERNAL_IP,
            },
            id,
            nodes,
            pods,
            namespaces: Vec::new(),
            pin_dir,
            work_dir,
            procs: Vec::new(),
            agents: BTreeMap::new(),
            servers: BTreeMap::new(),
            armed: true,
        };
        // On error, dropping `tb` removes whatever was built so far.
        tb.build()
            .with_context(|| format!("building testbed {}", tb.id))?;
        Ok(tb)
    }

    fn build(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.work_dir)
            .with_context(|| format!("creating {}", self.work_dir.display()))?;
        self.namespaces = std::iter::once(self.switch_netns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .chain(self.pods.iter().map(|p| p.netns.clone()))
            .chain(std::iter::once(self.external.netns.clone()))
            .collect();
        let adds: Vec<String> = self
            .namespaces
            .iter()
            .map(|ns| format!("netns add {ns}"))
            .collect();
        ip_batch(None, &adds, false)?;

        // Namespace-wide settings first: interfaces created afterwards inherit `default`
        // (IPv4 `default` itself is inherited from the host's, which may say rp_filter=2).
        let base = |key: &str, v| (format!("net/ipv4/conf/{key}"), v);
        for ns in &self.namespaces {
            sysctls(
                ns,
                &[base("all/rp_filter", "0"), base("default/rp_filter", "0")],
                false,
            )?;
            // No IPv6: keeps router solicitations, MLD and DAD off the wire (and out of
            // XDP counters and benchmarks).
            sysctls(
                ns,
                &[
                    ("net/ipv6/conf/all/disable_ipv6".into(), "1"),
                    ("net/ipv6/conf/default/disable_ipv6".into(), "1"),
                ],
                true,
            )?;
        }
        for node in &self.nodes {
            // send_redirects is effectively all || dev: both off. Traffic from the
            // external client to a pod on another node enters and leaves node 1 on eth0.
            sysctls(
                &node.netns,
                &[
                    ("net/ipv4/ip_forward".into(), "1"),
                    base("all/send_redirects", "0"),
                    base("default/send_redirects", "0"),
                ],
                false,
            )?;
        }

        // All veth pairs, created directly inside their namespaces.
        let mut links = Vec::new();
        for n in &self.nodes {
            links.push(format!(
                "link add name {UPLINK} netns {} type veth peer name {} netns {}",
                n.netns, n.switch_port, self.switch_netns
            ));
        }
        links.push(format!(
            "link add name {UPLINK} netns {} type veth peer name sw-ext netns {}",
            self.external.netns, self.switch_netns
        ));
        for p in &self.pods {
            let node = self.node(&p.node);
            links.push(format!(
                "link add name {} netns {} type veth peer name eth0 netns {}",
                p.host_veth, node.netns, p.netns
            ));
        }
        ip_batch(None, &links, false)?;

        // Switch.
        let mut sw = vec![
            "link set lo up".to_string(),
            "link add name br0 type bridge".into(),
            "link set br0 up".into(),
        ];
        for port in self
            .nodes
            .iter()
            .map(|n| n.switch_port.as_str())
            .chain(["sw-ext"])
        {
            sw.push(format!("link set {port} master br0"));
            sw.push(format!("link set {port} up"));
        }
        ip_batch(Some(&self.switch_netns), &sw, false)?;

        // Nodes.
        for node in &self.nodes {
            let mut cmds = vec![
                "link set lo up".to_string(),
                format!("link set {UPLINK} up"),
                format!("addr add {}/24 dev {UPLINK}", node.ip),
            ];
            for p in self.pods.iter().filter(|p| p.node == node.name) {
                cmds.push(format!("link set {} up", p.host_veth));
                cmds.push(format!("addr add {}/32 dev {}", node.gateway, p.host_veth));
                cmds.push(format!("route add {}/32 dev {}", p.ip, p.host_veth));
            }
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                cmds.push(format!(
                    "route add {} via {} dev {UPLINK}",
                    other.pod_cidr, other.ip
                ));
            }
            ip_batch(Some(&node.netns), &cmds, false)?;
            sysctls(
                &node.netns,
                &[
                    base(&format!("{UPLINK}/rp_filter"), "0"),
                    base(&format!("{UPLINK}/accept_local"), "1"),
                    base(&format!("{UPLINK}/send_redirects"), "0"),
                ],
                false,
            )?;
        }

        // Pods.
        for p in &self.pods {
            let gw = self.node(&p.node).gateway;
            let cmds = vec![
                "link set lo up".to_string(),
                "link set eth0 up".into(),
                format!("addr add {}/32 dev eth0", p.ip),
                format!("route add {gw} dev eth0"),
                format!("route add default via {gw} dev eth0"),
            ];
            ip_batch(Some(&p.netns), &cmds, false)?;
        }

        // External client.
        let via = self.nodes[0].ip;
        let cmds = vec![
            "link set lo up".to_string(),
            format!("link set {UPLINK} up"),
            format!("addr add {}/24 dev {UPLINK}", self.external.ip),
            format!("route add {SERVICE_CIDR} via {via} dev {UPLINK}"),
            format!("route add {CLUSTER_CIDR} via {via} dev {UPLINK}"),
        ];
        ip_batch(Some(&self.external.netns), &cmds, false)?;

        // Offloads. Packets leaving a node or the client must carry full checksums: the
        // next hop's XDP cannot see CHECKSUM_PARTIAL. XDP_TX from a node uplink needs
        // NAPI on the receiving peer, which GRO turns on for veth; and the peer only polls
        // promptly when it runs an XDP program itself (see `attach_switch_xdp`).
        for ns in self
            .nodes
            .iter()
            .map(|n| n.netns.as_str())
            .chain([self.external.netns.as_str()])
        {
            ethtool(ns, &["-K", UPLINK, "tx", "off"])?;
        }
        // The switch is part of the wire, so what it delivers to a node carries full
        // checksums too. Its ports run XDP and GRO, so a burst from one node is merged
        // into one super-packet, and the port towards another node (no GSO: its peer runs
        // XDP) segments it again; with tx checksumming on, those segments would be
        // CHECKSUM_PARTIAL (TCP checksum field = pseudo-header seed), which the node's XDP
        // would rewrite as if it were a full checksum: corrupt segments after any NAT
        // (issue 5's large replies stalled on them). tx off makes the segmentation finish
        // the checksums.
        for n in &self.nodes {
            ethtool(&self.switch_netns, &["-K", &n.switch_port, "gro", "on"])?;
            ethtool(&self.switch_netns, &["-K", &n.switch_port, "tx", "off"])?;
        }
        let ports: Vec<String> = self.nodes.iter().map(|n| n.switch_port.clone()).collect();
        attach_switch_xdp(&self.switch_netns, &ports, &self.pin_dir.join("switch"))?;

        for n in &self.nodes {
            std::fs::create_dir_all(&n.pin_path)
                .with_context(|| format!("creating {}", n.pin_path.display()))?;
        }
        Ok(())
    }

    /// `{pid}-{seq}`: part of every name this testbed uses.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Prefix of all this testbed's namespace names (`xlb-{id}`; names are `{prefix}-…`).
    pub fn netns_prefix(&self) -> String {
        format!("xlb-{}", self.id)
    }

    /// All namespaces (switch, nodes, pods, external client).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    pub fn switch_netns(&self) -> &str {
        &self.switch_netns
    }

    /// Parent of the nodes' pin paths.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Logs, ready files and the list of started processes.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Panics if there is no such node.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("testbed has no node {name:?}"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Panics if there is no such pod.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("testbed has no pod {name:?}"))
    }

    pub fn external(&self) -> &Host {
        &self.external
    }

    /// Starts `argv` in `netns` (stdout and stderr to a log file in the work dir); it is
    /// stopped at teardown. Returns its pid.
    pub fn spawn_in(&mut self, netns: &str, argv: &[&str]) -> Result<u32> {
        let n = self.procs.len();
        let label = format!("proc{n}");
        self.spawn_labeled(netns, argv, &label, &format!("{label}.log"))
    }

    fn spawn_labeled(
        &mut self,
        netns: &str,
        argv: &[impl AsRef<std::ffi::OsStr>],
        label: &str,
        log: &str,
    ) -> Result<u32> {
        let p = process::spawn(
            netns,
            argv,
            label,
            &self.work_dir.join(log),
            &self.work_dir.join("pids"),
        )?;
        let pid = p.pid;
        self.procs.push(p);
        Ok(pid)
    }

    /// Stops a process started by this testbed: SIGTERM, up to 2 s, then SIGKILL.
    pub fn stop_process(&mut self, pid: u32) -> Result<ExitStatus> {
        let i = self
            .procs
            .iter()
            .position(|p| p.pid == pid)
            .with_context(|| format!("pid {pid} is not a running testbed process"))?;
        let mut p = self.procs.remove(i);
        self.agents.retain(|_, v| *v != pid);
        self.servers.retain(|_, v| *v != pid);
        process::stop_child(&mut p).with_context(|| format!("stopping {} ({pid})", p.label))
    }

    /// Everything a process started by this testbed wrote (stdout and stderr).
    pub fn process_log(&self, pid: u32) -> String {
        self.procs
            .iter()
            .find(|p| p.pid == pid)
            .map(|p| process::read_lossy(&p.log))
            .unwrap_or_default()
    }

    /// Polls until `ready` exists (Ok) or the process exits or `timeout` passes (Err, with
    /// the tail of its log; a process still running is stopped).
    fn wait_ready(&mut self, pid: u32, ready: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready.exists() {
                return Ok(());
            }
            let i = self
                .procs
                .iter()
                .position(|p| p.pid == pid)
                .context("process vanished")?;
            let exited = self.procs[i].child.try_wait()?;
            if exited.is_some() || Instant::now() >= deadline {
                let mut p = self.procs.remove(i);
                self.agents.retain(|_, v| *v != pid);
                self.servers.retain(|_, v| *v != pid);
                let status = match exited {
                    Some(s) => format!("exited ({s})"),
                    None => {
                        let _ = process::stop_child(&mut p);
                        format!("not ready after {timeout:?}")
                    }
                };
                bail!(
                    "{} (pid {pid}) {status}; last log lines ({}):\n{}",
                    p.label,
                    p.log.display(),
                    process::tail(&p.log, 40)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts `xlb run` on `node` (in its namespace via `nsenter --net`, so the bpffs
    /// pins stay visible) with this testbed's interfaces, addresses and pin path, plus
    /// `extra` arguments; waits until it writes its ready file (the datapath is attached
    /// and programmed). Returns its pid. Its output is in [`agent_log`](Self::agent_log).
    pub fn start_agent(
        &mut self,
        xlb_bin: &Path,
        node: &str,
        manifests: &Path,
        extra: &[&str],
    ) -> Result<u32> {
        ensure!(
            !self.agents.contains_key(node),
            "an agent already runs on {node}"
        );
        let n = self.node(node).clone();
        let ready = self.work_dir.join(format!("agent-{node}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut argv: Vec<OsString> = vec![xlb_bin.into(), "run".into()];
        let args: [(&str, OsString); 8] = [
            ("--manifests", manifests.into()),
            ("--node-name", node.into()),
            ("--interface", n.uplink.clone().into()),
            ("--pod-interface", POD_INTERFACE_GLOB.into()),
            ("--node-ip", n.ip.to_string().into()),
            ("--cluster-cidr", CLUSTER_CIDR.into()),
            ("--pin-path", n.pin_path.clone().into()),
            ("--ready-file", ready.clone().into()),
        ];
        for (flag, value) in args {
            argv.push(flag.into());
            argv.push(value);
        }
        argv.extend(extra.iter().map(OsString::from));
        let log = format!("agent-{node}.log");
        // One log across restarts; mark where each run starts.
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work_dir.join(&log))
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(f, "=== testbed: {argv:?}")
            });
        let pid = self.spawn_labeled(&n.netns, &argv, &format!("agent-{node}"), &log)?;
        self.agents.insert(node.to_string(), pid);
        self.wait_ready(pid, &ready, AGENT_READY_TIMEOUT)
            .with_context(|| format!("starting xlb on {node}"))?;
        Ok(pid)
    }

    /// Stops the agent on `node` (SIGTERM; SIGKILL after 2 s); its exit status.
    pub fn stop_agent(&mut self, node: &str) -> Result<ExitStatus> {
        let pid = *self
            .agents
            .get(node)
            .with_context(|| format!("no agent runs on {node}"))?;
        self.stop_process(pid)
    }

    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents.get(node).copied()
    }

    /// Everything the agents started on `node` wrote so far (all runs, each preceded by
    /// a `=== testbed:` line with its command line).
    pub fn agent_log(&self, node: &str) -> String {
        process::read_lossy(&self.work_dir.join(format!("agent-{node}.log")))
    }

    /// Starts the pod's servers: HTTP/1.1 keep-alive on [`HTTP_PORT`] and UDP on
    /// [`UDP_PORT`], both answering with the pod name; waits until both listen. Returns
    /// the pid (one process serves both).
    pub fn start_servers(&mut self, pod: &str) -> Result<u32> {
        ensure!(
            !self.servers.contains_key(pod),
            "servers already run in {pod}"
        );
        let netns = self.pod(pod).netns.clone();
        let label = format!("servers-{pod}");
        let pid = self.spawn_servers(&netns, pod, HTTP_PORT, UDP_PORT, &label)?;
        self.servers.insert(pod.to_string(), pid);
        Ok(pid)
    }

    /// Starts further servers in any of this testbed's namespaces (a pod's for a second
    /// target port, a node's for a hostNetwork endpoint): HTTP on `http_port` and UDP on
    /// `udp_port`, answering with `answer`; waits until both listen. Returns the pid, for
    /// [`stop_process`](Self::stop_process); teardown stops it too.
    pub fn start_servers_as(
        &mut self,
        netns: &str,
        answer: &str,
        http_port: u16,
        udp_port: u16,
    ) -> Result<u32> {
        ensure!(
            self.namespaces.iter().any(|n| n == netns),
            "{netns} is not a namespace of this testbed"
        );
        // Unique per call: the same answer may be served on several ports.
        let label = format!("servers-{answer}-{http_port}-{udp_port}").replace('/', "_");
        self.spawn_servers(netns, answer, http_port, udp_port, &label)
    }

    fn spawn_servers(
        &mut self,
        netns: &str,
        answer: &str,
        http_port: u16,
        udp_port: u16,
        label: &str,
    ) -> Result<u32> {
        let ready = self.work_dir.join(format!("{label}.ready"));
        let _ = std::fs::remove_file(&ready);
        let ready_arg = ready.to_string_lossy().into_owned();
        let (http, udp) = (http_port.to_string(), udp_port.to_string());
        let python = traffic::python();
        let argv = [
            python.as_str(),
            "-c",
            traffic::SERVER_PY,
            answer,
            &ready_arg,
            &http,
            &udp,
        ];
        let pid = self.spawn_labeled(netns, &argv, label, &format!("{label}.log"))?;
        self.wait_ready(pid, &ready, SERVER_READY_TIMEOUT)
            .with_context(|| format!("starting servers {answer} in {netns}"))?;
        Ok(pid)
    }

    /// [`start_servers`](Self::start_servers) in every pod.
    pub fn start_all_servers(&mut self) -> Result<()> {
        let names: Vec<String> = self.pods.iter().map(|p| p.name.clone()).collect();
        for name in names {
            self.start_servers(&name)?;
        }
        Ok(())
    }

    /// Stops the pod's servers.
    pub fn stop_servers(&mut self, pod: &str) -> Result<ExitStatus> {
        let pid = *self
            .servers
            .get(pod)
            .with_context(|| format!("no servers run in {pod}"))?;
        self.stop_process(pid)
    }

    /// Runs `cmd` to completion in `netns` (`nsenter --net`); whatever its exit status.
    pub fn run_in(&self, netns: &str, cmd: &[&str]) -> Result<Output> {
        let (program, args) = cmd.split_first().context("empty command")?;
        let mut c = ns_command(netns, program);
        c.args(args).stdin(Stdio::null());
        c.output()
            .with_context(|| format!("cannot run {cmd:?} in {netns}"))
    }

    /// `GET http://ip:port/` with curl from `from_netns` (2 s limit); the body.
    pub fn http_get(&self, from_netns: &str, ip: Ipv4Addr, port: u16) -> Result<String> {
        let url = format!("http://{ip}:{port}/");
        let timeout = CLIENT_TIMEOUT.as_secs().to_string();
        let out = self.run_in(from_netns, &["curl", "-sS", "--max-time", &timeout, &url])?;
        if !out.status.success() {
            bail!(
                "curl {url} from {from_netns}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One UDP datagram to `ip:port` from `from_netns`; the reply (2 s limit). The socket
    /// is connected: a reply from another address than `ip:port` does not count.
    pub fn udp_request(&self, from_netns: &str, ip: Ipv4Addr, port: u16) -> Result<String> {
        traffic::udp_request(from_netns, ip, port)
    }

    /// A TCP connection from `from_netns` to `ip:port` for HTTP/1.1 keep-alive requests,
    /// to check that established connections keep working. Closed on drop.
    pub fn open_persistent_http(
        &self,
        from_netns: &str,
        ip: Ipv4Addr,
        port: u16,
    ) -> Result<PersistentClient> {
        PersistentClient::connect(from_netns, ip, port)
    }

    /// Runs `f` on a thread inside `netns` (e.g. to open sockets there; they stay in that
    /// namespace).
    pub fn in_netns<T: Send>(
        &self,
        netns: &str,
        f: impl FnOnce() -> Result<T> + Send,
    ) -> Result<T> {
        in_netns(netns, f)
    }

    /// Leaves everything running (for `xlb demo --keep`) and records it in `state_file`
    /// for [`teardown_kept`]. Fails, and tears down, if `state_file` already exists.
    pub fn keep(mut self, state_file: &Path) -> Result<KeptTestbed> {
        ensure!(
            !state_file.exists(),
            "{} exists: a kept testbed is still up (tear it down first)",
            state_file.display()
        );
        let kept = KeptTestbed {
            id: self.id.clone(),
            state_file: state_file.to_path_buf(),
            namespaces: self.namespaces.clone(),
            switch_netns: self.switch_netns.clone(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
            external: self.external.clone(),
            processes: self
                .procs
                .iter()
                .map(|p| KeptProcess {
                    pid: p.pid,
                    start_time: p.start_time,
                    label: p.label.clone(),
                    log: p.log.clone(),
                })
                .collect(),
            pin_dir: self.pin_dir.clone(),
            work_dir: self.work_dir.clone(),
        };
        let json = serde_json::to_string_pretty(&kept)?;
        let marker = cleanup::kept_marker(&self.id);
        for path in [state_file, &marker] {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        std::fs::write(&marker, state_file.as_os_str().as_encoded_bytes())
            .with_context(|| format!("writing {}", marker.display()))?;
        if let Err(e) = std::fs::write(state_file, json) {
            let _ = std::fs::remove_file(&marker);
            return Err(e).with_context(|| format!("writing {}", state_file.display()));
        }
        // Child handles are dropped without killing; the processes outlive us.
        self.armed = false;
        Ok(kept)
    }

    fn teardown(&mut self) -> Vec<anyhow::Error> {
        let mut errors = Vec::new();
        let results = process::stop_children(&mut self.procs);
        for (p, r) in self.procs.iter().zip(results) {
            if let Err(e) = r {
                errors.push(anyhow::Error::new(e).context(format!("stopping {}", p.label)));
            }
        }
        self.procs.clear();
        self.agents.clear();
        self.servers.clear();
        if let Err(e) = cleanup::delete_namespaces(&self.namespaces) {
            errors.push(e);
        }
        if let Err(e) = cleanup::remove_dir(&self.pin_dir) {
            errors.push(e);
        }
        // The shared parent goes with the last testbed (fails harmlessly while others live).
        let _ = std::fs::remove_dir(cleanup::PIN_ROOT);
        if std::thread::panicking() {
            eprintln!(
                "testbed {}: logs kept in {}",
                self.id,
                self.work_dir.display()
            );
        } else if let Err(e) = cleanup::remove_dir(&self.work_dir) {
            errors.push(e);
        }
        errors
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.armed {
            for e in self.teardown() {
                eprintln!("testbed {}: teardown: {e:#}", self.id);
            }
        }
    }
}

fn ethtool(netns: &str, args: &[&str]) -> Result<()> {
    run_checked(ns_command(netns, "ethtool").args(args))
        .context("ethtool (is it installed? apt-get install ethtool)")?;
    Ok(())
}

/// A process left running by [`Testbed::keep`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeptProcess {
    pub pid: u32,
    /// From /proc/PID/stat: guards against killing a reused pid.
    pub start_time: u64,
    pub label: String,
    pub log: PathBuf,
}

/// What [`Testbed::keep`] left running, as recorded in its state file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeptTestbed {
    pub id: String,
    pub state_file: PathBuf,
    pub namespaces: Vec<String>,
    pub switch_netns: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub external: Host,
    pub processes: Vec<KeptProcess>,
    pub pin_dir: PathBuf,
    pub work_dir: PathBuf,
}

impl KeptTestbed {
    pub fn load(state_file: &Path) -> Result<KeptTestbed> {
        let text = std::fs::read_to_string(state_file)
            .with_context(|| format!("no kept testbed: cannot read {}", state_file.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", state_file.display()))
    }
}

/// Tears down a testbed left by [`Testbed::keep`]: stops its processes (only if pid and
/// start time still match), deletes its namespaces, pin and work directories, and the
/// state file.
pub fn teardown_kept(state_file: &Path) -> Result<()> {
    let kept = KeptTestbed::load(state_file)?;
    for p in &kept.processes {
        process::stop_foreign(p.pid, p.start_time);
    }
    cleanup::delete_namespaces(&kept.namespaces)?;
    cleanup::remove_dir(&kept.pin_dir)?;
    cleanup::remove_dir(&kept.work_dir)?;
    let marker = cleanup::kept_marker(&kept.id);
    if marker.exists() {
        std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    }
    std::fs::remove_file(state_file)
        .with_context(|| format!("removing {}", state_file.display()))?;
    Ok(())
}
