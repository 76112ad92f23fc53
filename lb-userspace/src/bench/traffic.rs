//! Part 2: traffic through the VIP. netperf-style TCP_RR, TCP_CRR, TCP_STREAM and UDP_RR
//! from a client pod on node1 to the ClusterIP of a service whose one endpoint is a pod on
//! node2, for every system of `cluster::Proxy`, against the same tests sent straight to the
//! pod IP with nothing loaded (the limit). At each size all five clusters run side by side
//! and every round runs each test on each system in turn (A B C D E, A B C D E, ...), so a
//! ratio to the limit is computed within a round. At the largest size, also TCP_CRR straight
//! to the pod IP on every loaded system (the new-connection cost for traffic that is not to
//! a service), and NodePort traffic: the external host to node2's address and node port,
//! whose one endpoint is local to node2, against the external host straight to the pod with
//! nothing loaded.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    cluster::{BenchCluster, ProgramStats, Proxy},
    loadgen::{self, Test},
    say,
    stats::Summary,
    sys::check_interrupt,
};

#[derive(Clone, Debug, Serialize)]
pub struct TrafficConfig {
    /// Services loaded (the traffic service plus synthetic background ones).
    pub sizes: Vec<usize>,
    pub rounds: usize,
    /// Endpoints of each background service: 10 in full runs; fewer in quick runs, where
    /// nft would otherwise take minutes to load 10 000 services on each node. No packet of
    /// the tests meets them: on every system a background service costs a new flow the same
    /// (a rule to walk past, a map entry) whatever its endpoints.
    pub background_endpoints: usize,
    /// Seconds per TCP_RR and TCP_CRR run.
    pub rr_s: f64,
    /// Seconds per TCP_STREAM and UDP_RR run.
    pub stream_s: f64,
    /// TCP_CRR to the pod IP on every loaded system at the largest size.
    pub no_service_crr: bool,
    /// Tests run from the external host to the NodePort at the largest size.
    pub nodeport_tests: Vec<Test>,
    /// Tests run from the client pod to the ClusterIP (all of them unless narrowed while
    /// iterating, `xlb-bench --traffic-test`).
    pub tests: Vec<Test>,
    /// Systems measured besides the limit (all unless narrowed, `xlb-bench --system`).
    pub systems: Vec<Proxy>,
    pub xlb: Option<PathBuf>,
}

/// Where the client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The ClusterIP (the pod IP for the limit).
    Service,
    /// The pod IP, with the system loaded: traffic that is not to a service.
    PodIp,
    /// From the external host: node2's address and the node port (the pod IP, routed via
    /// node2, for the limit).
    NodePort,
}

impl Target {
    /// Whether the limit runs this target too (its rate is the ratios' denominator);
    /// traffic to the pod IP compares with the limit's `Service` run instead.
    fn limit_runs(self) -> bool {
        self != Target::PodIp
    }

    /// The client's namespace and the address it sends to, in cluster `c`.
    fn endpoints(self, c: &BenchCluster) -> (String, std::net::SocketAddrV4) {
        match self {
            Target::Service => (c.client_netns(), c.service_target()),
            Target::PodIp => (c.client_netns(), c.no_service_target()),
            Target::NodePort => (c.external_netns(), c.nodeport_target()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TrafficRow {
    pub proxy: Proxy,
    pub services: usize,
    pub test: Test,
    pub target: Target,
    /// One per round: trans/s, or Gbit/s for TCP_STREAM.
    pub rates: Vec<f64>,
    /// Failed transactions per round (lost UDP requests, failed connections).
    pub errors: Vec<u64>,
    /// rate / the limit's rate of the same test in the same round.
    pub ratios: Vec<f64>,
    pub rate: Option<Summary>,
    pub ratio: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrafficResults {
    pub config: TrafficConfig,
    /// Which load generator ran the tests.
    pub generator: String,
    /// `iptables-legacy-restore --version` (or `iptables-restore`): the loader and backend
    /// of the iptables layout.
    pub iptables_version: String,
    pub rows: Vec<TrafficRow>,
    /// xlb's programs on real traffic, at the largest size.
    pub profiles: Vec<DatapathProfile>,
}

/// The in-kernel cost of one xlb cluster's programs during one extra run of a test, with
/// the kernel's BPF statistics enabled for that run alone (they add two clock reads to
/// every program run, so the measured rounds run without them).
#[derive(Clone, Debug, Serialize)]
pub struct DatapathProfile {
    pub proxy: Proxy,
    pub services: usize,
    pub test: Test,
    pub target: Target,
    /// Transactions of the run and its length.
    pub transactions: u64,
    pub seconds: f64,
    /// Per node and program: runs and run time during the run (programs that ran).
    pub programs: Vec<ProgramStats>,
}

impl DatapathProfile {
    pub fn runs(&self) -> u64 {
        self.programs.iter().map(|p| p.runs).sum()
    }

    pub fn run_ns(&self) -> u64 {
        self.programs.iter().map(|p| p.run_ns).sum()
    }

    /// Program time per transaction, µs, on both nodes together.
    pub fn us_per_transaction(&self) -> f64 {
        self.run_ns() as f64 / 1e3 / self.transactions.max(1) as f64
    }
}

/// Tests profiled: the ones the goals judge, to the VIP and (TCP_CRR) to the pod IP.
fn profiled(test: Test, target: Target) -> bool {
    matches!(test, Test::TcpRr | Test::TcpCrr) && target != Target::NodePort
}

fn profile(c: &BenchCluster, test: Test, target: Target, seconds: f64) -> Result<DatapathProfile> {
    let (from, to) = target.endpoints(c);
    // Statistics are gathered while this descriptor is open: for this run only.
    let enabled = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling the kernel's BPF statistics (BPF_ENABLE_STATS)")?;
    let before = c.program_stats()?;
    let out = loadgen::run(&from, test, to, Duration::from_secs_f64(seconds))?;
    let after = c.program_stats()?;
    drop(enabled);
    let programs = after
        .into_iter()
        .filter_map(|a| {
            let b = before
                .iter()
                .find(|b| b.node == a.node && b.program == a.program)?;
            let runs = a.runs.checked_sub(b.runs)?;
            (runs > 0).then(|| ProgramStats {
                runs,
                run_ns: a.run_ns.saturating_sub(b.run_ns),
                ..a
            })
        })
        .collect();
    Ok(DatapathProfile {
        proxy: c.proxy,
        services: c.services,
        test,
        target,
        transactions: out.count,
        seconds: out.seconds,
        programs,
    })
}

impl TrafficResults {
    pub fn row(
        &self,
        proxy: Proxy,
        services: usize,
        test: Test,
        target: Target,
    ) -> Option<&TrafficRow> {
        self.rows.iter().find(|r| {
            r.proxy == proxy && r.services == services && r.test == test && r.target == target
        })
    }

    pub fn largest(&self) -> usize {
        self.config.sizes.iter().copied().max().unwrap_or(0)
    }
}

pub const GENERATOR: &str = "built-in (lb-userspace/src/bench/loadgen.rs: netperf's test semantics on std::net sockets; netperf is not installed)";

pub fn run(cfg: &TrafficConfig) -> Result<TrafficResults> {
    let generator = if super::sys::tool_exists("netperf") {
        // netperf's control connection would need the same backend as the data one; the
        // built-in generator has no such connection, and is used either way for one method.
        "built-in (lb-userspace/src/bench/loadgen.rs, netperf's test semantics; netperf is \
         installed but not used, for one method across systems)"
            .to_string()
    } else {
        GENERATOR.to_string()
    };
    let iptables_version = std::process::Command::new(super::cluster::iptables_restore())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let mut rows = Vec::new();
    let mut profiles = Vec::new();
    let largest = cfg.sizes.iter().copied().max().unwrap_or(0);
    for &n in &cfg.sizes {
        check_interrupt()?;
        say(format!("part 2: clusters with {n} services"));
        let mut clusters = Vec::new();
        let systems: Vec<Proxy> = Proxy::ALL
            .into_iter()
            .filter(|p| *p == Proxy::Limit || cfg.systems.contains(p))
            .collect();
        for &proxy in &systems {
            clusters.push(BenchCluster::start(
                proxy,
                n,
                cfg.background_endpoints,
                cfg.xlb.as_deref(),
            )?);
        }
        let mut plan: Vec<(Test, Target)> =
            cfg.tests.iter().map(|t| (*t, Target::Service)).collect();
        // Compared with the limit's TCP_CRR through the "service" (the pod IP) of the round.
        if cfg.no_service_crr && n == largest && cfg.tests.contains(&Test::TcpCrr) {
            plan.push((Test::TcpCrr, Target::PodIp));
        }
        if n == largest {
            plan.extend(cfg.nodeport_tests.iter().map(|t| (*t, Target::NodePort)));
        }
        let start = rows.len();
        for &(test, target) in &plan {
            for &proxy in &systems {
                if !target.limit_runs() && proxy == Proxy::Limit {
                    continue;
                }
                rows.push(TrafficRow {
                    proxy,
                    services: n,
                    test,
                    target,
                    rates: Vec::new(),
                    errors: Vec::new(),
                    ratios: Vec::new(),
                    rate: None,
                    ratio: None,
                });
            }
        }
        for round in 1..=cfg.rounds {
            say(format!(
                "part 2: {n} services, round {round}/{}",
                cfg.rounds
            ));
            for &(test, target) in &plan {
                let seconds = match test {
                    Test::TcpRr | Test::TcpCrr => cfg.rr_s,
                    Test::TcpStream | Test::UdpRr => cfg.stream_s,
                };
                let mut limit = f64::NAN;
                for c in &clusters {
                    if !target.limit_runs() && c.proxy == Proxy::Limit {
                        continue;
                    }
                    check_interrupt()?;
                    if test == Test::TcpCrr {
                        c.flush_conntrack()?;
                    }
                    let (from, to) = target.endpoints(c);
                    let out = loadgen::run(&from, test, to, Duration::from_secs_f64(seconds))
                        .with_context(|| {
                            format!(
                                "{} {} {target:?} with {n} services",
                                c.proxy.short(),
                                test.label()
                            )
                        })?;
                    let rate = out.rate(test);
                    if c.proxy == Proxy::Limit {
                        limit = rate;
                    }
                    let row = rows[start..]
                        .iter_mut()
                        .find(|r| r.proxy == c.proxy && r.test == test && r.target == target)
                        .expect("planned row");
                    row.rates.push(rate);
                    row.errors.push(out.errors);
                    if target.limit_runs() {
                        row.ratios.push(rate / limit);
                    }
                }
                // Traffic not to a service compares with the limit's (direct) run of the
                // same test in this round.
                if target == Target::PodIp {
                    let limit = rows[start..]
                        .iter()
                        .find(|r| {
                            r.proxy == Proxy::Limit && r.test == test && r.target == Target::Service
                        })
                        .and_then(|r| r.rates.last().copied())
                        .unwrap_or(f64::NAN);
                    for row in rows[start..]
                        .iter_mut()
                        .filter(|r| r.test == test && r.target == target)
                    {
                        let rate = *row.rates.last().expect("just measured");
                        row.ratios.push(rate / limit);
                    }
                }
            }
        }
        if n == largest {
            for c in clusters
                .iter()
                .filter(|c| matches!(c.proxy, Proxy::XlbXdp | Proxy::XlbTc))
            {
                for &(test, target) in plan.iter().filter(|(t, g)| profiled(*t, *g)) {
                    check_interrupt()?;
                    let p = profile(c, test, target, cfg.rr_s).with_context(|| {
                        format!("profiling {} {} {target:?}", c.proxy.short(), test.label())
                    })?;
                    say(format!(
                        "  {:<9} {:<10} {target:?} {n}: programs {:.1} µs per transaction \
                         ({:.1} runs of {:.0} ns)",
                        c.proxy.short(),
                        test.label(),
                        p.us_per_transaction(),
                        p.runs() as f64 / p.transactions.max(1) as f64,
                        p.run_ns() as f64 / p.runs().max(1) as f64
                    ));
                    profiles.push(p);
                }
            }
        }
        for row in &mut rows[start..] {
            row.rate = Summary::of(&row.rates);
            row.ratio = Summary::of(&row.ratios);
            if let Some(s) = row.rate {
                say(format!(
                    "  {:<9} {:<10} {:?} {}: {:.0} {} ({:.2}× the limit)",
                    row.proxy.short(),
                    row.test.label(),
                    row.target,
                    n,
                    s.median,
                    row.test.unit(),
                    row.ratio.map_or(f64::NAN, |r| r.median)
                ));
            }
        }
        drop(clusters);
    }
    Ok(TrafficResults {
        config: cfg.clone(),
        generator,
        iptables_version,
        rows,
        profiles,
    })
}
