//! `xlb`: the agent (`xlb run`) and the operator's view of the datapath
//! (`xlb services`, `xlb conntrack`, `xlb stats`).
use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use xlb::{
    datapath::{self, UplinkMode},
    model::Ipv4Cidr,
    output::OutputFormat,
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
    Run(RunArgs),
    /// Print the frontends and backends the datapath holds (from the pinned maps).
    Services(ReadArgs),
    /// Print the connection-tracking table (from the pinned maps).
    Conntrack(ReadArgs),
    /// Print the datapath's verdict counters (from the pinned maps).
    Stats(ReadArgs),
    /// Build a network-namespace cluster, run xlb on it, show traffic spreading, tear down.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Standalone mode: a directory of Service and EndpointSlice manifests (YAML or JSON).
    #[arg(long)]
    manifests: PathBuf,
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
struct DemoArgs {
    /// Leave the cluster running for exploration (tear down later with `xlb demo --down`).
    #[arg(long)]
    keep: bool,
    /// Tear down a cluster left by `--keep`.
    #[arg(long)]
    down: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Unused {}

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
        Command::Run(_args) => todo!(),
        Command::Services(_a) => todo!(),
        Command::Conntrack(_a) => todo!(),
        Command::Stats(_a) => todo!(),
        Command::Demo(_a) => todo!(),
    }
}
