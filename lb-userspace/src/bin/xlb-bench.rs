//! `xlb-bench`: the benchmarks of docs/benchmarks.md (what `cargo xtask bench` runs).
//!
//! ```text
//! xlb-bench [--quick] [--part N]... [--out docs/benchmarks.md] [-o summary|markdown|json] [--xlb PATH]
//! ```
//! Progress goes to stderr; stdout gets the goals (`summary`), the whole report
//! (`markdown`) or the raw results (`json`). Needs root.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use xlb::bench::{self, cluster::Proxy, loadgen::Test, report, BenchConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// The goals, with a verdict each.
    Summary,
    /// The whole report.
    Markdown,
    /// Every raw measurement, for scripts.
    Json,
}

#[derive(Parser)]
#[command(
    name = "xlb-bench",
    about = "xlb benchmarks: datapath cost per packet, traffic through the VIP and programming \
             from cold against kube-proxy's iptables and nftables rules, endpoint-change \
             latency, memory, restart cost (root)"
)]
struct Cli {
    /// Fewer rounds and smaller kube-proxy baselines: under 10 minutes.
    #[arg(long, conflicts_with = "tiny")]
    quick: bool,
    /// One round at 10 services: checks the bench works, in seconds.
    #[arg(long, hide = true)]
    tiny: bool,
    /// Write the report here, with its SVG plots beside it.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// What to print on stdout.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Summary)]
    output: Output,
    /// The `xlb` binary for the agent, traffic and restart measurements (default: next to
    /// xlb-bench).
    #[arg(long, value_name = "PATH")]
    xlb: Option<PathBuf>,
    /// Run only these parts (1 per packet, 2 traffic through the VIP, 3 control plane,
    /// 4 restart); repeatable. Default: all.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=4))]
    part: Vec<u8>,
    /// Part 2 only on these systems besides the limit (xdp, tc, iptables, nftables);
    /// repeatable. For iterating: the report then lacks the others.
    #[arg(long, value_name = "SYSTEM", value_parser = parse_system)]
    system: Vec<Proxy>,
    /// Part 2 only these tests through the ClusterIP (tcp_rr, tcp_crr, tcp_stream, udp_rr);
    /// repeatable.
    #[arg(long, value_name = "TEST", value_parser = parse_test)]
    traffic_test: Vec<Test>,
    /// Part 2 NodePort tests instead of the default (TCP_RR, TCP_CRR); `none` for none.
    #[arg(long, value_name = "TEST", value_parser = parse_test_or_none)]
    nodeport_test: Vec<Option<Test>>,
    /// Part 2 at these sizes only; repeatable.
    #[arg(long, value_name = "SERVICES")]
    traffic_size: Vec<usize>,
    /// Part 2 rounds instead of the mode's.
    #[arg(long, value_name = "N")]
    traffic_rounds: Option<usize>,
    /// Only xlb's programming from cold (part 3's first step, no baselines), for iterating
    /// on the map writer.
    #[arg(long)]
    cold_only: bool,
    /// Only the agent's memory with 50 000 services (part 3's last step), for iterating on
    /// the agent's memory.
    #[arg(long, conflicts_with = "cold_only")]
    agent_only: bool,
}

fn parse_system(s: &str) -> Result<Proxy, String> {
    match s {
        "xdp" => Ok(Proxy::XlbXdp),
        "tc" => Ok(Proxy::XlbTc),
        "iptables" => Ok(Proxy::Iptables),
        "nftables" => Ok(Proxy::Nftables),
        _ => Err("one of xdp, tc, iptables, nftables".into()),
    }
}

fn parse_test(s: &str) -> Result<Test, String> {
    Test::ALL
        .into_iter()
        .find(|t| t.label().eq_ignore_ascii_case(s))
        .ok_or_else(|| "one of tcp_rr, tcp_crr, tcp_stream, udp_rr".into())
}

fn parse_test_or_none(s: &str) -> Result<Option<Test>, String> {
    if s == "none" {
        Ok(None)
    } else {
        parse_test(s).map(Some)
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut config = if cli.tiny {
        BenchConfig::tiny()
    } else if cli.quick {
        BenchConfig::quick()
    } else {
        BenchConfig::full()
    };
    config.xlb = cli.xlb.or_else(bench::control::sibling_xlb);
    if !cli.part.is_empty() {
        let keep = |n: u8| cli.part.contains(&n);
        if !keep(1) {
            config.per_packet = None;
        }
        if !keep(2) {
            config.traffic = None;
        }
        if !keep(3) {
            config.cold = None;
            config.latency = None;
            config.agent_services = 0;
        }
        if !keep(4) {
            config.restart = None;
        }
    }
    if let Some(traffic) = &mut config.traffic {
        if !cli.system.is_empty() {
            traffic.systems = cli.system.clone();
        }
        if !cli.traffic_test.is_empty() {
            traffic.tests = cli.traffic_test.clone();
        }
        if !cli.nodeport_test.is_empty() {
            traffic.nodeport_tests = cli.nodeport_test.iter().flatten().copied().collect();
        }
        if !cli.traffic_size.is_empty() {
            traffic.sizes = cli.traffic_size.clone();
        }
        if let Some(rounds) = cli.traffic_rounds {
            traffic.rounds = rounds;
        }
    }
    if cli.cold_only {
        config.per_packet = None;
        config.traffic = None;
        config.latency = None;
        config.agent_services = 0;
        config.restart = None;
        if let Some(cold) = &mut config.cold {
            cold.plan
                .retain(|p| p.system == bench::control::System::Xlb);
        }
    }
    if cli.agent_only {
        config.per_packet = None;
        config.traffic = None;
        config.cold = None;
        config.latency = None;
        config.restart = None;
    }
    bench::sys::install_interrupt_handler();
    let results = bench::run(&config)?;
    if let Some(out) = &cli.out {
        for path in report::write(&results, out)? {
            bench::say(format!("wrote {}", path.display()));
        }
    }
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&results)?),
        Output::Markdown => print!("{}", report::markdown_report(&results, &[])),
        Output::Summary => {
            for goal in report::goals(&results) {
                println!(
                    "{:<12} {} ({}): {}",
                    goal.verdict.label(),
                    goal.goal,
                    goal.target,
                    goal.measured
                );
            }
        }
    }
    Ok(())
}
