//! `xlb`: the agent (`xlb run`) and the operator's view of the datapath
//! (`xlb services`, `xlb conntrack`, `xlb stats`).
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
mod demo;

use xlb::{
    agent::{self, parse_port_range, AgentConfig},
    datapath::{self, reader, UplinkMode},
    model::Ipv4Cidr,
    output::{self, OutputFormat},
};

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "eBPF/XDP service load balancer for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath and keep it in sync with the cluster.
    Run(Box<RunArgs>),
    /// Print the frontends and backends the datapath holds (from the pinned maps).
    Services(ReadArgs),
    /// Print the connection-tracking table (from the pinned maps).
    Conntrack(ReadArgs),
    /// Print the datapath's verdict counters (from the pinned maps).
    Stats(ReadArgs),
    /// Build a network-namespace cluster, run xlb on it, show traffic spreading, tear down.
    Demo(DemoArgs),
    /// Detach the programs and remove every pinned map and link under --pin-path
    /// (a stopped agent otherwise leaves the datapath running, by design).
    Cleanup(CleanupArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Standalone mode: a directory of Service and EndpointSlice manifests (YAML or JSON).
    /// Without it, xlb watches the Kubernetes API.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// kubeconfig for the API (default: in-cluster config, KUBECONFIG, ~/.kube/config).
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, default_value = "0.0.0.0:10249", value_parser = parse_listen)]
    metrics_addr: Listen,
    /// Node health for load balancers, like kube-proxy's ("off" to disable).
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_listen)]
    healthz_addr: Listen,
    /// Address the health-check node ports of externalTrafficPolicy Local services listen on.
    #[arg(long, default_value = "0.0.0.0")]
    health_check_ip: std::net::IpAddr,
    /// This node's name (matches EndpointSlice endpoints' nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Uplink interface: XDP (or TC with --uplink-mode tc) at ingress. Repeatable.
    #[arg(long = "interface", value_name = "IF")]
    interfaces: Vec<String>,
    /// Pod-facing interfaces, by name or glob (`veth*`): TC at ingress. Repeatable;
    /// interfaces that appear later and match are attached too.
    #[arg(long = "pod-interface", value_name = "GLOB")]
    pod_interfaces: Vec<String>,
    /// Node addresses that accept NodePorts; default: the uplinks' IPv4 addresses.
    #[arg(long = "node-ip", value_name = "IP")]
    node_ips: Vec<Ipv4Addr>,
    /// Cluster pod CIDR: sources outside it are masqueraded when the reply would otherwise
    /// bypass this node.
    #[arg(long)]
    cluster_cidr: Option<Ipv4Cidr>,
    /// bpffs directory for this agent's maps (one per agent on a machine).
    #[arg(long, default_value = datapath::DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Program type on uplinks.
    #[arg(long, value_enum, default_value_t = UplinkMode::Xdp)]
    uplink_mode: UplinkMode,
    /// Masquerade source ports, MIN-MAX (outside the ephemeral and NodePort ranges).
    #[arg(long, default_value = "61000-65535")]
    snat_ports: String,
    /// Written once the datapath is attached and the first state is programmed.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// cgroup v2 directory for the connect4 program that balances the node's own processes
    /// at connect() (S18); default: the first cgroup2 mount. `off` disables it.
    #[arg(long, value_name = "DIR|off")]
    cgroup_path: Option<PathBuf>,
    /// Conntrack: seconds an established TCP flow may stay idle (kube-proxy's default, 24 h).
    #[arg(long, value_name = "SECONDS", default_value_t = 86_400)]
    ct_tcp_established_timeout: u64,
    /// Conntrack: seconds a TCP flow may stay idle after a FIN.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    ct_tcp_closing_timeout: u64,
    /// Conntrack: seconds a TCP flow is kept after a RST (late retransmissions are still
    /// translated meanwhile).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    ct_tcp_closed_timeout: u64,
    /// Conntrack: seconds an embryonic TCP flow (handshake not completed) may stay idle.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    ct_syn_timeout: u64,
    /// Conntrack: seconds a UDP flow may stay idle.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    ct_udp_timeout: u64,
    /// Conntrack: seconds between two sweeps of the garbage collector.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    ct_gc_interval: u64,
    /// Maglev table size M of services without the `xlb.io/maglev-table-size` annotation: a
    /// prime from 251 to 65521. M > 100 x backends keeps backend shares within 1%.
    #[arg(long, value_name = "PRIME", default_value_t = xlb::model::maglev::DEFAULT_TABLE_SIZE,
          value_parser = parse_table_size)]
    maglev_table_size: u32,
}

fn parse_table_size(s: &str) -> Result<u32, String> {
    let m: u32 = s.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    xlb::model::maglev::check_table_size(m).map(|()| m)
}

#[derive(clap::Args)]
struct CleanupArgs {
    #[arg(long, default_value = datapath::DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
}

#[derive(clap::Args)]
struct ReadArgs {
    #[arg(long, default_value = datapath::DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Leave the cluster running for exploration (tear down later with `xlb demo --down`).
    #[arg(long)]
    pub keep: bool,
    /// Tear down a cluster left by `--keep`.
    #[arg(long)]
    pub down: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => {
            let config = AgentConfig {
                manifests: args.manifests,
                kubeconfig: args.kubeconfig,
                metrics_addr: args.metrics_addr.0,
                healthz_addr: args.healthz_addr.0,
                health_check_ip: args.health_check_ip,
                node_name: args.node_name,
                interfaces: args.interfaces,
                pod_interfaces: args.pod_interfaces,
                node_ips: args.node_ips,
                cluster_cidr: args.cluster_cidr,
                pin_path: args.pin_path,
                uplink_mode: args.uplink_mode,
                snat_ports: parse_port_range(&args.snat_ports)?,
                ready_file: args.ready_file,
                cgroup_path: match args.cgroup_path.clone() {
                    Some(p) if p.as_os_str() == "off" => None,
                    Some(p) => Some(p),
                    None => agent::cgroup2_mount(),
                },
                conntrack_timeouts: xlb::datapath::conntrack_gc::Timeouts {
                    tcp_syn: Duration::from_secs(args.ct_syn_timeout),
                    tcp_established: Duration::from_secs(args.ct_tcp_established_timeout),
                    tcp_closing: Duration::from_secs(args.ct_tcp_closing_timeout),
                    tcp_closed: Duration::from_secs(args.ct_tcp_closed_timeout),
                    udp: Duration::from_secs(args.ct_udp_timeout),
                },
                conntrack_gc_interval: Duration::from_secs(args.ct_gc_interval),
                maglev_table_size: args.maglev_table_size,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(config))
        }
        Command::Services(a) => {
            let rows = reader::services(&a.pin_path)?;
            print(a.output, &rows, || {
                let table: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        let backends = if r.backends.is_empty() {
                            "(none: rejected)".to_string()
                        } else {
                            r.backends.join(", ")
                        };
                        vec![r.frontend.clone(), r.service.clone(), backends]
                    })
                    .collect();
                output::table(&["FRONTEND", "SERVICE", "BACKENDS"], &table)
            })
        }
        Command::Conntrack(a) => {
            let rows = reader::conntrack(&a.pin_path)?;
            print(a.output, &rows, || {
                let table: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.direction.to_string(),
                            r.protocol.to_string(),
                            format!("{} -> {}", r.from, r.to),
                            format!("{} -> {}", r.nat_from, r.nat_to),
                            if r.masquerade {
                                "yes".into()
                            } else {
                                "".into()
                            },
                            r.state.to_string(),
                            format!("{}s", r.idle_seconds),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "DIRECTION",
                        "PROTO",
                        "PACKET",
                        "REWRITTEN TO",
                        "MASQ",
                        "STATE",
                        "IDLE",
                    ],
                    &table,
                ) + &occupancy_line(&a.pin_path)
            })
        }
        Command::Stats(a) => {
            let counters = reader::stats(&a.pin_path)?;
            print(a.output, &counters, || {
                let table: Vec<Vec<String>> = counters
                    .iter()
                    .map(|(k, v)| vec![k.to_string(), v.to_string()])
                    .collect();
                output::table(&["VERDICT", "PACKETS"], &table)
            })
        }
        Command::Demo(a) => demo::run(&a),
        Command::Cleanup(a) => {
            datapath::cleanup(&a.pin_path)?;
            eprintln!(
                "xlb: removed {} (programs detached, maps unpinned)",
                a.pin_path.display()
            );
            Ok(())
        }
    }
}

/// A listen address, or "off".
#[derive(Clone, Copy, Debug)]
struct Listen(Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (ADDRESS:PORT or off)"))
}

/// `xlb conntrack`'s last line: how full both conntrack tables are (pressure shows here
/// before flows are evicted).
fn occupancy_line(pin_path: &std::path::Path) -> String {
    match reader::conntrack_occupancy(pin_path) {
        Ok(o) => format!(
            "\nconntrack: {} of {} established entries, {} of {} embryonic\n",
            o.established_entries,
            o.established_capacity,
            o.embryonic_entries,
            o.embryonic_capacity
        ),
        Err(e) => format!("\nconntrack occupancy unavailable: {e:#}\n"),
    }
}

fn print<T: serde::Serialize>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce() -> String,
) -> Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value)?),
        OutputFormat::Table => print!("{}", table()),
    }
    Ok(())
}
