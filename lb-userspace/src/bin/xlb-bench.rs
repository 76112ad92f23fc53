//! `xlb-bench`: the benchmarks of docs/benchmarks.md (what `cargo xtask bench` runs).
//!
//! ```text
//! xlb-bench [--quick] [--out docs/benchmarks.md] [-o summary|markdown|json] [--xlb PATH]
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
    about = "xlb benchmarks: datapath cost per packet, programming from cold against \
             kube-proxy's iptables and nftables rules, endpoint-change latency, memory (root)"
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
    /// The `xlb` binary for the agent memory measurement (default: next to xlb-bench).
    #[arg(long, value_name = "PATH")]
    xlb: Option<PathBuf>,
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
