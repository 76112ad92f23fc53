//! Benchmarks behind `cargo xtask bench` and the `xlb-bench` binary; the report is
//! docs/benchmarks.md.
//!
//! Part 1 (`per_packet`): the datapath's cost per packet through BPF_PROG_TEST_RUN, against
//! the parse-only floor program, with 1 to 100 000 services. Part 3 (`control`): programming
//! from cold (xlb against kube-proxy's iptables and nftables layouts loaded by the real tools),
//! the latency of an endpoint change with 50 000 services loaded, and memory. Part 2
//! (`traffic`): netperf-style tests through the VIP in the netns cluster (`cluster`) with the
//! built-in load generator (`loadgen`), xlb against kube-proxy's layouts and the no-proxy
//! limit. Part 4 (`restart`): the agent SIGKILLed and restarted under load.
//!
//! Owns: the measurements, their raw results (`BenchResults`, serialisable for `-o json`) and
//! the report (`report`, with SVG plots from `svg`).
//! Must not: write BPF maps except through `datapath::MapWriter`, or touch anything it did
//! not create (see `sys`: everything it creates is named after its pid and removed on drop).
pub mod cluster;
pub mod control;
pub mod kube_proxy;
pub mod loadgen;
pub mod packets;
pub mod per_packet;
pub mod report;
mod report_traffic;
pub mod restart;
pub mod stats;
mod svg;
pub mod synth;
pub mod sys;
pub mod traffic;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
    time::Instant,
};

use anyhow::{bail, Result};
use serde::Serialize;

use control::{
    AgentConfig, AgentResults, ColdConfig, ColdPlan, ColdResults, LatencyConfig, LatencyResults,
    System,
};
use per_packet::{PerPacketConfig, PerPacketResults};
use restart::{RestartConfig, RestartResults};
use traffic::{TrafficConfig, TrafficResults};

/// Endpoints per synthetic service throughout.
pub const ENDPOINTS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every size, 5 or more interleaved rounds; takes an hour or more.
    Full,
    /// Fewer rounds and smaller baselines; under 10 minutes.
    Quick,
    /// Tiny sizes and one round: only proves the bench still works (tests/bench.rs).
    Tiny,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Quick => "quick",
            Mode::Tiny => "tiny",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchConfig {
    pub mode: Mode,
    pub per_packet: Option<PerPacketConfig>,
    pub cold: Option<ColdConfig>,
    pub latency: Option<LatencyConfig>,
    /// Part 2; needs the `xlb` binary (filled in from `xlb` by `run`).
    pub traffic: Option<TrafficConfig>,
    /// Part 4; likewise.
    pub restart: Option<RestartConfig>,
    /// Services the real agent is started with for the memory figures.
    pub agent_services: usize,
    pub agent_timeout_s: f64,
    /// The `xlb` binary for the agent measurement; skipped (and said so) without one.
    pub xlb: Option<PathBuf>,
}

fn plan(entries: &[(System, usize, usize)]) -> Vec<ColdPlan> {
    entries
        .iter()
        .map(|&(system, services, rounds)| ColdPlan {
            system,
            services,
            rounds,
        })
        .collect()
}

fn traffic_config(
    sizes: Vec<usize>,
    background_endpoints: usize,
    rounds: usize,
    rr_s: f64,
    stream_s: f64,
) -> TrafficConfig {
    TrafficConfig {
        sizes,
        background_endpoints,
        rounds,
        rr_s,
        stream_s,
        no_service_crr: true,
        // The goals' two tests; the NodePort rows run at the largest size only, to keep
        // the quick run under its 10 minutes.
        nodeport_tests: vec![loadgen::Test::TcpRr, loadgen::Test::TcpCrr],
        tests: loadgen::Test::ALL.to_vec(),
        systems: cluster::Proxy::ALL[1..].to_vec(),
        xlb: None,
    }
}

fn restart_config(services: usize, settle_s: f64) -> RestartConfig {
    RestartConfig {
        services,
        cycles: 3,
        connections: 4,
        down_s: settle_s,
        settle_s,
        xlb: None,
    }
}

impl BenchConfig {
    pub fn full() -> Self {
        use System::*;
        Self {
            mode: Mode::Full,
            per_packet: Some(PerPacketConfig {
                sizes: vec![1, 1_000, 10_000, 100_000],
                endpoints: ENDPOINTS,
                rounds: 7,
                repeat: 1_000_000,
                distinct: 5_000,
                chain_calls: 60,
            }),
            cold: Some(ColdConfig {
                plan: plan(&[
                    (Xlb, 1_000, 7),
                    (Xlb, 2_000, 7),
                    (Xlb, 10_000, 7),
                    (Xlb, 50_000, 7),
                    (Xlb, 100_000, 7),
                    (Iptables, 1_000, 5),
                    (Iptables, 2_000, 3),
                    (Iptables, 10_000, 1),
                    (Nftables, 1_000, 5),
                    (Nftables, 10_000, 3),
                    (Nftables, 50_000, 1),
                ]),
                endpoints: ENDPOINTS,
                // kube-proxy's loaders grow faster than linearly here (nft: 1.0 s at 1 000,
                // 6.9 s at 2 000, about 4 min at 10 000): a run past 10 minutes is reported
                // as stopped, which says enough, instead of holding the run for half an hour.
                timeout_s: 600.0,
            }),
            latency: Some(LatencyConfig {
                services: 50_000,
                endpoints: ENDPOINTS,
                changes: 500,
            }),
            traffic: Some(traffic_config(vec![1, 10_000], ENDPOINTS, 5, 10.0, 5.0)),
            restart: Some(restart_config(10_000, 1.0)),
            agent_services: 50_000,
            agent_timeout_s: 600.0,
            xlb: None,
        }
    }

    pub fn quick() -> Self {
        use System::*;
        Self {
            mode: Mode::Quick,
            per_packet: Some(PerPacketConfig {
                sizes: vec![1, 1_000, 10_000, 100_000],
                endpoints: ENDPOINTS,
                rounds: 5,
                repeat: 200_000,
                distinct: 2_000,
                chain_calls: 30,
            }),
            cold: Some(ColdConfig {
                plan: plan(&[
                    (Xlb, 1_000, 3),
                    (Xlb, 2_000, 3),
                    (Xlb, 10_000, 3),
                    (Xlb, 50_000, 3),
                    (Iptables, 1_000, 3),
                    (Iptables, 2_000, 1),
                    (Nftables, 1_000, 3),
                    // nft at 10 000 services (about 4 minutes here) is left to the full
                    // run: it alone would take the quick run past its 10 minutes.
                    (Nftables, 2_000, 1),
                ]),
                endpoints: ENDPOINTS,
                timeout_s: 240.0,
            }),
            latency: Some(LatencyConfig {
                services: 50_000,
                endpoints: ENDPOINTS,
                changes: 200,
            }),
            traffic: Some(traffic_config(vec![1, 10_000], 1, 5, 0.8, 0.5)),
            restart: Some(restart_config(10_000, 0.3)),
            agent_services: 50_000,
            agent_timeout_s: 300.0,
            xlb: None,
        }
    }

    /// 1 round, 10 services, baselines at 10 services: seconds, for the test that keeps the
    /// bench from rotting.
    pub fn tiny() -> Self {
        use System::*;
        Self {
            mode: Mode::Tiny,
            per_packet: Some(PerPacketConfig {
                sizes: vec![1, 10],
                endpoints: ENDPOINTS,
                rounds: 1,
                repeat: 100_000,
                distinct: 100,
                chain_calls: 3,
            }),
            cold: Some(ColdConfig {
                plan: plan(&[(Xlb, 10, 1), (Iptables, 10, 1), (Nftables, 10, 1)]),
                endpoints: ENDPOINTS,
                timeout_s: 60.0,
            }),
            latency: Some(LatencyConfig {
                services: 10,
                endpoints: ENDPOINTS,
                changes: 20,
            }),
            traffic: Some(traffic_config(vec![1, 10], ENDPOINTS, 1, 0.3, 0.2)),
            restart: Some(RestartConfig {
                cycles: 1,
                ..restart_config(10, 0.2)
            }),
            agent_services: 10,
            agent_timeout_s: 60.0,
            xlb: None,
        }
    }
}

/// Everything measured, as `xlb-bench -o json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResults {
    pub mode: Mode,
    pub environment: sys::Environment,
    pub duration_s: f64,
    pub per_packet: Option<PerPacketResults>,
    pub cold: Option<ColdResults>,
    pub latency: Option<LatencyResults>,
    pub agent: Option<AgentResults>,
    pub traffic: Option<TrafficResults>,
    pub restart: Option<RestartResults>,
    /// Steps skipped, and why.
    pub notes: Vec<String>,
}

static START: OnceLock<Instant> = OnceLock::new();
static QUIET: AtomicBool = AtomicBool::new(false);

/// Progress lines on stderr (long steps say what they are doing).
pub fn say(msg: impl std::fmt::Display) {
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("bench [{t:7.1}s] {msg}");
}

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Runs every configured part. Needs root (BPF, network namespaces).
pub fn run(cfg: &BenchConfig) -> Result<BenchResults> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks need root (BPF programs, maps, network namespaces)");
    }
    START.get_or_init(Instant::now);
    let started = Instant::now();
    let environment = sys::Environment::probe();
    say(format!(
        "{} run on {} ({} CPUs), kernel {}",
        cfg.mode.name(),
        environment.cpu_model,
        environment.cpus,
        environment.kernel
    ));
    let mut notes = Vec::new();

    let per_packet = match &cfg.per_packet {
        Some(c) => {
            say("part 1: datapath cost per packet (BPF_PROG_TEST_RUN)");
            Some(per_packet::run(c)?)
        }
        None => None,
    };
    sys::check_interrupt()?;
    let cold = match &cfg.cold {
        Some(c) => {
            say("part 3: programming from cold (xlb, kube-proxy iptables, kube-proxy nftables)");
            Some(control::cold(c)?)
        }
        None => None,
    };
    sys::check_interrupt()?;
    let latency = match &cfg.latency {
        Some(c) => {
            say("part 3: endpoint-change latency");
            Some(control::latency(c)?)
        }
        None => None,
    };
    sys::check_interrupt()?;
    let agent = match &cfg.xlb {
        Some(xlb) if cfg.agent_services > 0 => {
            say("part 3: memory of the real agent (xlb run)");
            Some(control::agent(&AgentConfig {
                services: cfg.agent_services,
                endpoints: ENDPOINTS,
                xlb: xlb.clone(),
                timeout_s: cfg.agent_timeout_s,
            })?)
        }
        Some(_) => None,
        None => {
            notes.push(
                "agent memory not measured: no `xlb` binary was given or found next to \
                 xlb-bench (`cargo xtask bench` builds both)"
                    .into(),
            );
            None
        }
    };
    sys::check_interrupt()?;
    let traffic = match (&cfg.traffic, &cfg.xlb) {
        (Some(c), Some(xlb)) => {
            say("part 2: traffic through the VIP (limit, xlb XDP, xlb TC, iptables, nftables)");
            Some(traffic::run(&TrafficConfig {
                xlb: Some(xlb.clone()),
                ..c.clone()
            })?)
        }
        (Some(_), None) => {
            notes.push("traffic through the VIP not measured: no `xlb` binary".into());
            None
        }
        (None, _) => None,
    };
    sys::check_interrupt()?;
    let restart = match (&cfg.restart, &cfg.xlb) {
        (Some(c), Some(xlb)) => {
            say("part 4: agents killed (SIGKILL) and restarted under load");
            Some(restart::run(&RestartConfig {
                xlb: Some(xlb.clone()),
                ..c.clone()
            })?)
        }
        (Some(_), None) => {
            notes.push("restart cost not measured: no `xlb` binary".into());
            None
        }
        (None, _) => None,
    };
    let duration_s = started.elapsed().as_secs_f64();
    say(format!("done in {duration_s:.0} s"));
    Ok(BenchResults {
        mode: cfg.mode,
        environment,
        duration_s,
        per_packet,
        cold,
        latency,
        agent,
        traffic,
        restart,
        notes,
    })
}
