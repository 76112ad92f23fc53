//! The testbed cluster the traffic and restart benchmarks run in, with one system loaded:
//! node1 runs the client pod, node2 the server pod; a Service `bench/traffic` (ClusterIP
//! [`TRAFFIC_VIP`], port 80 TCP and UDP, target 8080) has the server pod as its one endpoint,
//! so direct and VIP traffic reach the same server; the same service is a NodePort
//! ([`NODE_PORT`], externalTrafficPolicy Cluster), which the external host reaches on node2,
//! where the endpoint is local. `services - 1` synthetic services (10 endpoints each,
//! `synth`) are loaded beside it as background.
//!
//! The systems: nothing (the limit), xlb (agents on both nodes, uplinks in XDP or TC mode),
//! kube-proxy's iptables layout and its nftables layout (the exact rules of `kube_proxy`,
//! loaded with the real iptables-restore and nft into both nodes' namespaces, as kube-proxy
//! would on each node).
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::{
    kube_proxy::{self, ServicePort},
    loadgen::{self, Server},
    say, synth,
};
use crate::testbed::{NodeSpec, Testbed, TestbedSpec};

/// ClusterIP of the traffic service (inside 10.96.0.0/12, clear of the synthetic services).
pub const TRAFFIC_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
pub const TRAFFIC_PORT: u16 = 80;
/// The server's port (TCP and UDP), the service's target port.
pub const SERVER_PORT: u16 = 8080;
/// A second server port, for traffic that is not to a service. Not 8080: a client port
/// reused (TIME_WAIT reuse) for a direct connection to pod:8080 after a VIP connection
/// would meet xlb's conntrack entry of the earlier VIP flow, whose reply side has the same
/// tuple (see the report's part 2).
pub const DIRECT_PORT: u16 = 8081;
/// The traffic service's node port (TCP and UDP).
pub const NODE_PORT: u16 = 30080;
const CLIENT_POD: &str = "client";
const SERVER_POD: &str = "server";
const CLIENT_NODE: &str = "node1";
const SERVER_NODE: &str = "node2";
const NODES: [&str; 2] = [CLIENT_NODE, SERVER_NODE];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proxy {
    /// Nothing loaded: traffic goes straight to the pod IP.
    Limit,
    XlbXdp,
    XlbTc,
    Iptables,
    Nftables,
}

impl Proxy {
    pub const ALL: [Proxy; 5] = [
        Proxy::Limit,
        Proxy::XlbXdp,
        Proxy::XlbTc,
        Proxy::Iptables,
        Proxy::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Proxy::Limit => "limit (pod IP, nothing loaded)",
            Proxy::XlbXdp => "xlb, uplinks XDP",
            Proxy::XlbTc => "xlb, uplinks TC",
            Proxy::Iptables => "kube-proxy iptables",
            Proxy::Nftables => "kube-proxy nftables",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Proxy::Limit => "limit",
            Proxy::XlbXdp => "xlb XDP",
            Proxy::XlbTc => "xlb TC",
            Proxy::Iptables => "iptables",
            Proxy::Nftables => "nftables",
        }
    }

    pub fn is_xlb(self) -> bool {
        matches!(self, Proxy::XlbXdp | Proxy::XlbTc)
    }
}

/// A running cluster with one system loaded; dropping it stops the server and tears the
/// testbed down.
pub struct BenchCluster {
    pub proxy: Proxy,
    pub services: usize,
    /// Endpoints of each background service.
    pub background_endpoints: usize,
    // Field order: the server stops before the testbed's namespaces go.
    _server: Server,
    _direct_server: Server,
    pub tb: Testbed,
    manifests: PathBuf,
    xlb: Option<PathBuf>,
}

impl BenchCluster {
    /// Builds the testbed, starts the server and loads `proxy` with `services` services.
    pub fn start(
        proxy: Proxy,
        services: usize,
        background_endpoints: usize,
        xlb: Option<&Path>,
    ) -> Result<BenchCluster> {
        ensure!(services >= 1, "at least the traffic service");
        let spec = TestbedSpec {
            nodes: vec![
                NodeSpec::new(CLIENT_NODE, &[CLIENT_POD]),
                NodeSpec::new(SERVER_NODE, &[SERVER_POD]),
            ],
        };
        let tb = Testbed::create(&spec)?;
        let server = Server::start(&tb.pod(SERVER_POD).netns, SERVER_PORT)?;
        let direct_server = Server::start(&tb.pod(SERVER_POD).netns, DIRECT_PORT)?;
        loadgen::prepare_client_netns(&tb.pod(CLIENT_POD).netns)?;
        // The external host: a NodePort client. Straight to the pod (the limit of NodePort
        // traffic) it goes via the pod's node, as NodePort traffic to node2 does, not via
        // node1 (the testbed's route for the pod CIDR).
        loadgen::prepare_client_netns(&tb.external().netns)?;
        let (pod_ip, node_ip) = (tb.pod(SERVER_POD).ip, tb.node(SERVER_NODE).ip);
        let out = tb.run_in(
            &tb.external().netns,
            &[
                "ip",
                "route",
                "add",
                &format!("{pod_ip}/32"),
                "via",
                &node_ip.to_string(),
            ],
        )?;
        ensure!(
            out.status.success(),
            "route to the server pod via {node_ip}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let manifests = tb.work_dir().join("manifests");
        let mut c = BenchCluster {
            proxy,
            services,
            background_endpoints,
            _server: server,
            _direct_server: direct_server,
            tb,
            manifests,
            xlb: xlb.map(Path::to_path_buf),
        };
        let started = Instant::now();
        c.load()
            .with_context(|| format!("loading {} with {services} services", proxy.short()))?;
        say(format!(
            "  {} with {} services ready in {:.1} s",
            proxy.short(),
            services,
            started.elapsed().as_secs_f64()
        ));
        c.check_paths()?;
        Ok(c)
    }

    pub fn client_netns(&self) -> String {
        self.tb.pod(CLIENT_POD).netns.clone()
    }

    pub fn server_ip(&self) -> Ipv4Addr {
        self.tb.pod(SERVER_POD).ip
    }

    /// The VIP, or the pod IP for the limit (nothing would translate the VIP).
    pub fn service_target(&self) -> SocketAddrV4 {
        match self.proxy {
            Proxy::Limit => self.direct_target(),
            _ => SocketAddrV4::new(TRAFFIC_VIP, TRAFFIC_PORT),
        }
    }

    pub fn direct_target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.server_ip(), SERVER_PORT)
    }

    pub fn external_netns(&self) -> String {
        self.tb.external().netns.clone()
    }

    /// node2's address and the node port, or the pod IP for the limit.
    pub fn nodeport_target(&self) -> SocketAddrV4 {
        match self.proxy {
            Proxy::Limit => self.direct_target(),
            _ => SocketAddrV4::new(self.tb.node(SERVER_NODE).ip, NODE_PORT),
        }
    }

    /// The pod IP on a port no service points at: traffic that is not to a service.
    pub fn no_service_target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.server_ip(), DIRECT_PORT)
    }

    /// The traffic service's two ports (TCP and UDP) as kube-proxy sees them.
    fn traffic_ports(&self) -> Vec<ServicePort> {
        ["tcp", "udp"]
            .into_iter()
            .map(|protocol| ServicePort {
                namespace: synth::NAMESPACE.into(),
                service: "traffic".into(),
                port_name: protocol.into(),
                protocol,
                cluster_ip: TRAFFIC_VIP,
                port: TRAFFIC_PORT,
                target_port: SERVER_PORT,
                endpoints: vec![self.server_ip()],
                node_port: Some(NODE_PORT),
            })
            .collect()
    }

    fn load(&mut self) -> Result<()> {
        let background = self.services - 1;
        match self.proxy {
            Proxy::Limit => Ok(()),
            Proxy::XlbXdp | Proxy::XlbTc => {
                self.write_manifests(background)?;
                for node in NODES {
                    self.start_agent(node)?;
                }
                Ok(())
            }
            Proxy::Iptables | Proxy::Nftables => {
                let mut ports = self.traffic_ports();
                ports.extend(
                    (0..background).map(|i| ServicePort::synthetic(i, self.background_endpoints)),
                );
                let work = self.tb.work_dir().to_path_buf();
                // One input per node: nftables mode takes NodePorts on the node's own
                // address only.
                let mut files = Vec::new();
                let argv: Vec<&str> = if self.proxy == Proxy::Iptables {
                    let restore = iptables_restore();
                    let jumps = work.join("iptables-jumps.rules");
                    std::fs::write(&jumps, kube_proxy::iptables_jumps())?;
                    let file = work.join("kube-proxy.rules");
                    std::fs::write(&file, kube_proxy::iptables_rules(&ports))?;
                    for node in NODES {
                        self.run_ok(node, &[restore, "--noflush", &path_str(&jumps)])?;
                        files.push(path_str(&file));
                    }
                    vec![restore, "--noflush", "--counters"]
                } else {
                    for node in NODES {
                        let file = work.join(format!("kube-proxy-{node}.rules"));
                        std::fs::write(
                            &file,
                            kube_proxy::nft_rules(&ports, self.tb.node(node).ip),
                        )?;
                        files.push(path_str(&file));
                    }
                    vec!["nft", "-f"]
                };
                // Both nodes at once (one core each): large nft loads take minutes.
                let this = &*self;
                std::thread::scope(|scope| {
                    let loads: Vec<_> = NODES
                        .iter()
                        .zip(&files)
                        .map(|(node, file)| {
                            let mut cmd = argv.clone();
                            cmd.push(file);
                            scope.spawn(move || this.run_ok(node, &cmd))
                        })
                        .collect();
                    loads
                        .into_iter()
                        .try_for_each(|l| l.join().expect("load thread panicked"))
                })
            }
        }
    }

    fn run_ok(&self, node: &str, cmd: &[&str]) -> Result<()> {
        let out = self.tb.run_in(&self.tb.node(node).netns, cmd)?;
        if !out.status.success() {
            bail!(
                "{cmd:?} on {node}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The traffic service and `background` synthetic ones as one JSON List.
    fn write_manifests(&self, background: usize) -> Result<()> {
        std::fs::create_dir_all(&self.manifests)?;
        let ports: Vec<serde_json::Value> = ["tcp", "udp"]
            .iter()
            .map(|p| {
                serde_json::json!({"name": p, "port": TRAFFIC_PORT, "protocol": p.to_uppercase(),
                                   "targetPort": SERVER_PORT, "nodePort": NODE_PORT})
            })
            .collect();
        let slice_ports: Vec<serde_json::Value> = ["tcp", "udp"]
            .iter()
            .map(|p| serde_json::json!({"name": p, "port": SERVER_PORT, "protocol": p.to_uppercase()}))
            .collect();
        let mut items = vec![
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "traffic", "namespace": synth::NAMESPACE},
                "spec": {"type": "NodePort", "clusterIP": TRAFFIC_VIP.to_string(),
                         "clusterIPs": [TRAFFIC_VIP.to_string()], "ports": ports},
            }),
            serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "traffic-1", "namespace": synth::NAMESPACE,
                             "labels": {"kubernetes.io/service-name": "traffic"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [self.server_ip().to_string()],
                               "conditions": {"ready": true, "serving": true, "terminating": false},
                               "nodeName": SERVER_NODE}],
                "ports": slice_ports,
            }),
        ];
        items.extend(super::control::manifest_items(&synth::cluster(
            background,
            self.background_endpoints,
        ))?);
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        std::fs::write(
            self.manifests.join("services.json"),
            serde_json::to_vec(&list)?,
        )?;
        Ok(())
    }

    /// Starts xlb on `node` (uplink mode per system); the time to its ready file.
    pub fn start_agent(&mut self, node: &str) -> Result<Duration> {
        let xlb = self.xlb.clone().context("no xlb binary to run the agent")?;
        let mode = if self.proxy == Proxy::XlbTc {
            "tc"
        } else {
            "xdp"
        };
        let started = Instant::now();
        // No metrics or health listeners, and no cgroup connect4 hook: pod traffic does
        // not use it, and on the machine's root cgroup it would run on every connect() of
        // the other systems' clients too.
        self.tb.start_agent(
            &xlb,
            node,
            &self.manifests,
            &[
                "--uplink-mode",
                mode,
                "--cgroup-path",
                "off",
                "--metrics-addr",
                "off",
                "--healthz-addr",
                "off",
            ],
        )?;
        Ok(started.elapsed())
    }

    /// SIGKILLs the agent on `node` (as a crash or an OOM kill would end it) and reaps it.
    pub fn kill_agent(&mut self, node: &str) -> Result<()> {
        let pid = self
            .tb
            .agent_pid(node)
            .with_context(|| format!("no agent on {node}"))?;
        // SAFETY: plain syscall on a pid our testbed started and has not reaped.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
            bail!("kill -9 {pid}: {}", std::io::Error::last_os_error());
        }
        let _ = self.tb.stop_agent(node);
        Ok(())
    }

    /// Run time and run count (kernel BPF statistics, while enabled) of every program of
    /// this cluster's xlb datapaths, by node and program name: the programs that use the
    /// node's pinned stats map.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        let mut nodes = Vec::new();
        for node in NODES {
            let stats = self.tb.node(node).pin_path.join(lb_common::map_name::STATS);
            let id = aya::maps::MapData::from_pin(&stats)
                .with_context(|| format!("{}", stats.display()))?
                .info()?
                .id();
            nodes.push((node, id));
        }
        let mut out = Vec::new();
        for program in aya::programs::loaded_programs() {
            // Programs unloaded meanwhile (other clusters' agents) are no concern.
            let Ok(program) = program else { continue };
            let Ok(Some(maps)) = program.map_ids() else {
                continue;
            };
            for (node, id) in &nodes {
                if maps.contains(id) {
                    out.push(ProgramStats {
                        node,
                        program: program.name_as_str().unwrap_or("?").to_string(),
                        run_ns: program.run_time().as_nanos() as u64,
                        runs: program.run_count(),
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.node, &a.program).cmp(&(b.node, &b.program)));
        Ok(out)
    }

    pub fn nodes() -> [&'static str; 2] {
        NODES
    }

    /// Forgets the node's connection tracking (kube-proxy layouts) so that each TCP_CRR
    /// run starts from an empty table. xlb's conntrack is its own map (fresh per cluster).
    pub fn flush_conntrack(&self) -> Result<()> {
        if matches!(self.proxy, Proxy::Iptables | Proxy::Nftables) {
            for node in NODES {
                // Exit status 0 also when the table was empty; stderr says how many went.
                self.run_ok(node, &["conntrack", "-F"])?;
            }
        }
        Ok(())
    }

    /// One TCP transaction and one UDP transaction, through the service and directly, so a
    /// broken path fails here, loudly, instead of as a low number.
    fn check_paths(&self) -> Result<()> {
        let client = self.client_netns();
        let external = self.external_netns();
        for (ns, target) in [
            (&client, self.service_target()),
            (&client, self.direct_target()),
            (&client, self.no_service_target()),
            (&external, self.nodeport_target()),
        ] {
            for test in [loadgen::Test::TcpRr, loadgen::Test::UdpRr] {
                let out = loadgen::run(ns, test, target, Duration::from_millis(50)).with_context(
                    || {
                        format!(
                            "{} with {} services: {} to {target} does not work",
                            self.proxy.short(),
                            self.services,
                            test.label()
                        )
                    },
                )?;
                ensure!(
                    out.count > 0,
                    "{}: no {} transaction to {target} completed",
                    self.proxy.short(),
                    test.label()
                );
            }
        }
        Ok(())
    }
}

/// The iptables layout's loader: the legacy (x_tables) backend when installed. The nf_tables
/// backend's `iptables-restore` (1.8.9) looks chains up by name for every rule and did not
/// load 10 000 services in 13 minutes here (part 3 has its programming times); the rules,
/// and their linear evaluation per new flow, are the same on either backend.
pub fn iptables_restore() -> &'static str {
    if super::sys::tool_exists("iptables-legacy-restore") {
        "iptables-legacy-restore"
    } else {
        "iptables-restore"
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// One program's kernel statistics (`BPF_ENABLE_STATS`): cumulative while enabled.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramStats {
    pub node: &'static str,
    pub program: String,
    pub run_ns: u64,
    pub runs: u64,
}
