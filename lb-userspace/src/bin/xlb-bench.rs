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
use xlb::bench::{self, report, BenchConfig};

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
    /// Only xlb's programming from cold (part 3's first step, no baselines), for iterating
    /// on the map writer.
    #[arg(long)]
    cold_only: bool,
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
