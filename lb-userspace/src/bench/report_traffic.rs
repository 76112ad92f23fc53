//! The report's parts 2 (traffic through the VIP) and 4 (restart cost): goals, tables and
//! the ratio-to-limit plots.
use std::fmt::Write;

use super::{
    cluster::Proxy,
    loadgen::Test,
    report::{count, range, ratio_range, secs, Goal, Verdict},
    restart::RestartResults,
    stats::Summary,
    svg::{self, Chart, Point, Series},
    traffic::{DatapathProfile, Target, TrafficResults, TrafficRow},
    BenchResults,
};

/// Through the VIP, TCP_RR and TCP_CRR at least this share of the no-proxy limit.
pub const VIP_GOAL: f64 = 0.95;
/// The size the VIP goals are judged at.
pub const VIP_GOAL_SERVICES: usize = 10_000;
const XLB: [Proxy; 2] = [Proxy::XlbXdp, Proxy::XlbTc];
const KUBE_PROXY: [Proxy; 2] = [Proxy::Iptables, Proxy::Nftables];
const GOAL_TESTS: [Test; 2] = [Test::TcpRr, Test::TcpCrr];

fn service_row(t: &TrafficResults, proxy: Proxy, n: usize, test: Test) -> Option<&TrafficRow> {
    t.row(proxy, n, test, Target::Service)
}

/// Median over rounds of `a`'s rate / `b`'s rate in the same round.
pub fn ahead(a: &TrafficRow, b: &TrafficRow) -> Option<Summary> {
    let per_round: Vec<f64> = a.rates.iter().zip(&b.rates).map(|(x, y)| x / y).collect();
    Summary::of(&per_round)
}

pub fn goals(r: &BenchResults) -> Vec<Goal> {
    let mut goals = Vec::new();
    let goal = "through the VIP: TCP_RR and TCP_CRR vs the no-proxy limit, 10 000 services loaded"
        .to_string();
    let target = format!("≥ {VIP_GOAL}× (stretch: > 1.0×)");
    goals.push(match &r.traffic {
        Some(t) => {
            let n = t.largest();
            let mut parts = Vec::new();
            let mut worst = f64::INFINITY;
            for test in GOAL_TESTS {
                for proxy in XLB {
                    if let Some(s) = service_row(t, proxy, n, test).and_then(|r| r.ratio) {
                        worst = worst.min(s.median);
                        parts.push(format!(
                            "{} {} {:.2}×",
                            test.label(),
                            proxy.short(),
                            s.median
                        ));
                    }
                }
            }
            vip_goal(goal, target, n, &parts, worst >= VIP_GOAL)
        }
        None => not_measured(goal, target),
    });
    let goal = "through the VIP: TCP_RR and TCP_CRR ahead of both kube-proxy layouts, 10 000 \
                services loaded"
        .to_string();
    let target = "xlb / kube-proxy > 1.0× (same round)".to_string();
    goals.push(match &r.traffic {
        Some(t) => {
            let n = t.largest();
            let mut parts = Vec::new();
            let mut worst = f64::INFINITY;
            for test in GOAL_TESTS {
                for proxy in XLB {
                    for kp in KUBE_PROXY {
                        let (Some(a), Some(b)) =
                            (service_row(t, proxy, n, test), service_row(t, kp, n, test))
                        else {
                            continue;
                        };
                        if let Some(s) = ahead(a, b) {
                            worst = worst.min(s.median);
                            parts.push(format!(
                                "{} {} / {} {:.2}×",
                                test.label(),
                                proxy.short(),
                                kp.short(),
                                s.median
                            ));
                        }
                    }
                }
            }
            vip_goal(goal, target, n, &parts, worst > 1.0)
        }
        None => not_measured(goal, target),
    });
    let goal =
        "no established connection broken by an agent restart (SIGKILL, under load)".to_string();
    let target = "0 broken".to_string();
    goals.push(match &r.restart {
        Some(s) => Goal {
            goal,
            target,
            measured: format!(
                "{} of {} broken over {} kill/restart cycles of both agents ({} services); \
                 {} of {} new connections failed, {} of {} UDP requests unanswered",
                s.connections_broken,
                s.config.connections,
                s.config.cycles,
                count(s.config.services),
                s.new_connections_failed,
                s.new_connections_ok + s.new_connections_failed,
                s.udp_lost,
                s.udp_sent
            ),
            verdict: if s.connections_broken == 0 {
                Verdict::Pass
            } else {
                Verdict::FallShort
            },
        },
        None => not_measured(goal, target),
    });
    goals
}

fn not_measured(goal: String, target: String) -> Goal {
    Goal {
        goal,
        target,
        measured: "—".into(),
        verdict: Verdict::NotMeasured,
    }
}

fn rate_text(test: Test, v: f64) -> String {
    match test {
        Test::TcpStream => format!("{v:.2}"),
        _ => count(v.round() as usize),
    }
}

/// One SVG per test: each system's ratio to the limit against the number of services.
pub fn plots(r: &BenchResults, stem: &str) -> Vec<(String, String)> {
    let Some(t) = &r.traffic else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for test in Test::ALL {
        let series = Proxy::ALL[1..]
            .iter()
            .map(|&proxy| Series {
                name: proxy.label().into(),
                points: t
                    .config
                    .sizes
                    .iter()
                    .filter_map(|&n| {
                        let s = service_row(t, proxy, n, test)?.ratio?;
                        Some(Point {
                            x: n as f64,
                            y: s.median,
                            range: Some((s.min, s.max)),
                        })
                    })
                    .collect(),
                lower_bounds: Vec::new(),
            })
            .collect();
        let chart = Chart {
            title: format!(
                "{} through the VIP: ratio to the no-proxy limit",
                test.label()
            ),
            x_label: "services loaded (log)".into(),
            y_label: format!("{} / limit ({})", test.label(), test.unit()),
            log_x: true,
            log_y: false,
            series,
        };
        let name = format!(
            "{stem}-vip-{}.svg",
            test.label().to_lowercase().replace('_', "-")
        );
        out.push((name, svg::render(&chart)));
    }
    out
}

pub fn traffic_section(o: &mut String, r: &BenchResults, plots: &[&str]) {
    let _ = writeln!(o, "## 2. Traffic through a service VIP\n");
    let Some(t) = &r.traffic else {
        let _ = writeln!(o, "Not measured in this run.\n");
        return;
    };
    let c = &t.config;
    let _ = writeln!(
        o,
        "Load generator: **{}**. A client pod on node1 sends to the ClusterIP of a service \
         whose one endpoint is a server pod on node2 (netns testbed: veths, a bridge as the \
         switch), so the VIP and the direct runs reach the same server through the same \
         nodes. *limit*: the same tests to the pod IP with nothing loaded. The other n − 1 \
         services are synthetic background ({} endpoint(s) each in this run: 10 in full \
         runs; quick runs use 1 because nft took 7 minutes to load 10 000 services of 10 \
         endpoints on the two nodes; no test packet meets a background endpoint), loaded on \
         both nodes. The kube-proxy layouts are the rules of part 3 plus the traffic service, \
         loaded by {} and `nft -f`: iptables' legacy backend where installed, because \
         the nf_tables backend's `iptables-restore` did not load 10 000 services in 13 \
         minutes here (its programming times are in part 3); the rules, and their linear \
         walk by every new flow, are the same on either backend. {} round(s), interleaved: each test \
         runs on every system in turn before the next test; TCP_RR and TCP_CRR run {} s, \
         TCP_STREAM and UDP_RR {} s. Before every TCP_CRR run the kube-proxy nodes' \
         conntrack tables are flushed (`conntrack -F`); each system has its own cluster and \
         so its own fresh xlb datapath. Cells: median rate (min–max over rounds) and, below, \
         the ratio to the limit within each round. TCP_RR, TCP_CRR and UDP_RR in \
         transactions/s, TCP_STREAM in Gbit/s.{}\n",
        t.generator,
        c.background_endpoints,
        t.iptables_version,
        c.rounds,
        c.rr_s,
        c.stream_s,
        if has_nodeport(t) {
            ""
        } else {
            " NodePort traffic from the external host was not measured in this run."
        }
    );
    for &n in &c.sizes {
        let _ = writeln!(
            o,
            "### {} service{} loaded\n",
            count(n),
            if n == 1 { "" } else { "s" }
        );
        rate_table(o, t, n, Target::Service);
        if t.rows
            .iter()
            .any(|r| r.services == n && r.target == Target::NodePort)
        {
            let _ = writeln!(
                o,
                "NodePort traffic from outside the cluster with {} services loaded: the \
                 external host to node2's address and the traffic service's node port \
                 ({}, externalTrafficPolicy Cluster; the one endpoint is on node2). *limit*: \
                 the external host straight to the pod, routed via node2, nothing loaded. \
                 kube-proxy's layouts include their NodePort rules (iptables: KUBE-NODEPORTS \
                 → KUBE-EXT-* with the masquerade mark; nftables: the `service-nodeports` \
                 map → `external-*`, on the node's own address); they masquerade this \
                 traffic, xlb keeps the client's address for a local endpoint.\n",
                count(n),
                super::cluster::NODE_PORT
            );
            rate_table(o, t, n, Target::NodePort);
        }
        if t.rows
            .iter()
            .any(|r| r.services == n && r.target == Target::PodIp)
        {
            let _ = writeln!(
                o,
                "New connections that are **not** to a service (TCP_CRR straight to the pod \
                 IP) with {} services loaded, against the limit's TCP_CRR of the same round:\n",
                count(n)
            );
            let _ = writeln!(
                o,
                "| system | TCP_CRR to the pod IP (trans/s) | ratio to the limit |\n|---|---|---|"
            );
            for p in &Proxy::ALL[1..] {
                if let Some(row) = t.row(*p, n, Test::TcpCrr, Target::PodIp) {
                    if let (Some(rate), Some(ratio)) = (row.rate, row.ratio) {
                        let _ = writeln!(
                            o,
                            "| {} | {} | {} |",
                            p.label(),
                            range(&rate, |v| rate_text(Test::TcpCrr, v)),
                            ratio_range(&ratio)
                        );
                    }
                }
            }
            o.push('\n');
        }
    }
    profile_tables(o, t);
    let errors: u64 = t.rows.iter().flat_map(|r| &r.errors).sum();
    if errors > 0 {
        let _ = writeln!(
            o,
            "Errors over all runs (failed connections, unanswered UDP requests): {errors} \
             (per run in the JSON).\n"
        );
    }
    for p in plots.iter().filter(|p| p.contains("-vip-")) {
        let _ = writeln!(o, "![{p}]({p})\n");
    }
}

fn target_text(target: Target) -> &'static str {
    match target {
        Target::Service => "to the ClusterIP",
        Target::PodIp => "to the pod IP",
        Target::NodePort => "to the NodePort",
    }
}

/// Transaction rate of a profiled run, per s.
fn profile_rate(p: &DatapathProfile) -> f64 {
    p.transactions as f64 / p.seconds
}

/// The programs' share of a transaction's wall time in a profiled run.
fn profile_share(p: &DatapathProfile) -> f64 {
    p.us_per_transaction() * profile_rate(p) / 1e6
}

fn profile_tables(o: &mut String, t: &TrafficResults) {
    let Some(first) = t.profiles.first() else {
        return;
    };
    let _ = writeln!(
        o,
        "#### xlb's programs on this traffic\n\n\
         One more run of each test per xlb system with {} services, with the kernel's BPF \
         statistics on for that run alone (`BPF_ENABLE_STATS`: they add two clock reads to \
         every program run, a few tens of ns, so the rounds above ran without them). Counted: \
         every run of the cluster's xlb programs on both nodes (ingress of the pod veths and \
         uplinks, the egress programs) during the run. A transaction's packets pass the \
         programs one after the other, so their time adds to the transaction's.\n",
        count(first.services)
    );
    let _ = writeln!(
        o,
        "| system | test | trans/s in this run | program runs per transaction | ns per run | \
         program time per transaction | share of a transaction |\n|---|---|---|---|---|---|---|"
    );
    for p in &t.profiles {
        let per = p.transactions.max(1) as f64;
        let _ = writeln!(
            o,
            "| {} | {} {} | {:.0} | {:.1} | {:.0} | {:.1} µs | {:.1}% |",
            p.proxy.label(),
            p.test.label(),
            target_text(p.target),
            profile_rate(p),
            p.runs() as f64 / per,
            p.run_ns() as f64 / p.runs().max(1) as f64,
            p.us_per_transaction(),
            100.0 * profile_share(p)
        );
    }
    o.push('\n');
    let crr: Vec<&DatapathProfile> = t
        .profiles
        .iter()
        .filter(|p| p.test == Test::TcpCrr && p.target == Target::Service)
        .collect();
    if crr.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "By program, TCP_CRR to the ClusterIP (node1 has the client pod, node2 the server \
         pod):\n\n| system | node | program | runs per transaction | ns per run | µs per \
         transaction |\n|---|---|---|---|---|---|"
    );
    for p in crr {
        let per = p.transactions.max(1) as f64;
        for program in &p.programs {
            let _ = writeln!(
                o,
                "| {} | {} | `{}` | {:.1} | {:.0} | {:.1} |",
                p.proxy.label(),
                program.node,
                program.program,
                program.runs as f64 / per,
                program.run_ns as f64 / program.runs.max(1) as f64,
                program.run_ns as f64 / 1e3 / per
            );
        }
    }
    o.push('\n');
}

fn has_nodeport(t: &TrafficResults) -> bool {
    t.rows.iter().any(|r| r.target == Target::NodePort)
}

/// One table of `target` rows at `n` services: a line per test measured, a column per system.
fn rate_table(o: &mut String, t: &TrafficResults, n: usize, target: Target) {
    let _ = write!(o, "| test |");
    for p in Proxy::ALL {
        let _ = write!(o, " {} |", p.label());
    }
    let _ = writeln!(o, "\n|---|---|---|---|---|---|");
    for test in Test::ALL {
        if !t
            .rows
            .iter()
            .any(|r| r.services == n && r.test == test && r.target == target)
        {
            continue;
        }
        let _ = write!(o, "| {} ({}) |", test.label(), test.unit());
        for p in Proxy::ALL {
            let cell = match t.row(p, n, test, target) {
                Some(row) => match (row.rate, row.ratio) {
                    (Some(rate), Some(ratio)) if p != Proxy::Limit => format!(
                        "{}<br>{}",
                        range(&rate, |v| rate_text(test, v)),
                        ratio_range(&ratio)
                    ),
                    (Some(rate), _) => range(&rate, |v| rate_text(test, v)),
                    _ => "—".into(),
                },
                None => "—".into(),
            };
            let _ = write!(o, " {cell} |");
        }
        o.push('\n');
    }
    o.push('\n');
}

/// Whether part 2 measured NodePort traffic (the report's "not measured" line).
pub fn measured_nodeport(r: &BenchResults) -> bool {
    r.traffic.as_ref().is_some_and(has_nodeport)
}

pub fn restart_section(o: &mut String, r: &BenchResults) {
    let _ = writeln!(o, "## 4. Restart cost\n");
    let Some(s) = &r.restart else {
        let _ = writeln!(o, "Not measured in this run.\n");
        return;
    };
    restart_table(o, s);
}

fn restart_table(o: &mut String, s: &RestartResults) {
    let c = &s.config;
    let _ = writeln!(
        o,
        "xlb (uplinks XDP) on both nodes with {} services, client pod on node1, server pod on \
         node2 behind the ClusterIP. Load through the VIP for the whole run ({}): {} \
         established TCP connections each in a request/response loop, a loop of new \
         connections (connect, request, response, close) and a UDP request stream, each \
         paced at about one request per millisecond. {} cycle(s): both agents SIGKILLed, \
         {} s with no agent, both restarted (timed to their ready file), {} s of load.\n",
        count(c.services),
        secs(s.seconds),
        c.connections,
        c.cycles,
        c.down_s,
        c.settle_s
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(
        o,
        "| established connections broken | **{} of {}** ({} transactions on them) |",
        s.connections_broken,
        c.connections,
        count(s.established_transactions as usize)
    );
    let _ = writeln!(
        o,
        "| new connections failed | {} of {} |",
        s.new_connections_failed,
        count((s.new_connections_ok + s.new_connections_failed) as usize)
    );
    let _ = writeln!(
        o,
        "| UDP requests unanswered (200 ms) | {} of {} |",
        s.udp_lost,
        count(s.udp_sent as usize)
    );
    if let Some(ready) = &s.ready {
        let _ = writeln!(
            o,
            "| restarted agent: start to ready | {} over {} restarts |",
            range(ready, secs),
            ready.n
        );
    }
    o.push('\n');
    for f in &s.failures {
        let _ = writeln!(o, "- {f}");
    }
    if !s.failures.is_empty() {
        o.push('\n');
    }
}

/// Where the traffic goals are missed, with the figures that say where the time goes.
pub fn falls_short(o: &mut String, r: &BenchResults) -> bool {
    let Some(t) = &r.traffic else {
        return false;
    };
    let n = t.largest();
    let mut any = false;
    for test in GOAL_TESTS {
        for proxy in XLB {
            let Some(row) = service_row(t, proxy, n, test) else {
                continue;
            };
            let Some(ratio) = row.ratio else { continue };
            let behind: Vec<String> = KUBE_PROXY
                .iter()
                .filter_map(|kp| {
                    let s = ahead(row, service_row(t, *kp, n, test)?)?;
                    (s.median <= 1.0).then(|| format!("{} ({:.2}×)", kp.short(), s.median))
                })
                .collect();
            if ratio.median >= VIP_GOAL && behind.is_empty() {
                continue;
            }
            any = true;
            let _ = writeln!(
                o,
                "- **{} through the VIP, {}, {} services**: {} of the limit{}. ",
                test.label(),
                proxy.short(),
                count(n),
                ratio_range(&ratio),
                if behind.is_empty() {
                    String::new()
                } else {
                    format!("; not ahead of {}", behind.join(", "))
                }
            );
            let profile = t
                .profiles
                .iter()
                .find(|p| p.proxy == proxy && p.test == test && p.target == Target::Service);
            if let Some(p) = profile {
                let _ = writeln!(
                    o,
                    "  Profile (kernel BPF statistics, one extra run, both nodes): the programs \
                     ran {:.1} times per transaction at {:.0} ns each, {:.1} µs per \
                     transaction, {:.0}% of a transaction's time, the size of the gap. Part 1 \
                     measured the same work at a fraction of that with warm caches: on a busy \
                     node each conntrack and frontend look-up misses the CPU caches and the TLB \
                     in hash tables of 10⁵–10⁶ entries (the reason the skip of frontend \
                     look-ups for pod addresses and the direct forwarding exist), and a new \
                     connection adds two conntrack inserts, then their move to the established \
                     table (two more, two deletes) when the handshake completes.",
                    p.runs() as f64 / p.transactions.max(1) as f64,
                    p.run_ns() as f64 / p.runs().max(1) as f64,
                    p.us_per_transaction(),
                    100.0 * profile_share(p)
                );
            }
            if ratio.min < VIP_GOAL && ratio.max >= VIP_GOAL {
                let _ = writeln!(
                    o,
                    "  The rounds straddle the goal: on this shared 2-core machine the spread \
                     between rounds is as large as the gap."
                );
            }
            let pod = t
                .row(proxy, n, Test::TcpCrr, Target::PodIp)
                .and_then(|r| r.ratio);
            if let (Test::TcpCrr, Some(pod)) = (test, pod) {
                let why = if pod.median >= ratio.median + 0.1 {
                    "so most of the gap is the work on new flows to the VIP (the lookups, two \
                     conntrack inserts per flow and the NAT rewrites; part 1 has their \
                     per-packet cost), not the programs merely being on the path"
                } else {
                    "so the gap is mostly the programs on the path (TC on both pod veths, XDP \
                     or TC on both uplinks: several program runs per packet), not the \
                     translation of the VIP"
                };
                let _ = writeln!(
                    o,
                    "  The same system's TCP_CRR straight to the pod IP, where xlb translates \
                     nothing, reached {:.2}× of the limit, {why}; the spread between rounds on \
                     this shared machine is wide.",
                    pod.median
                );
            }
        }
    }
    for proxy in XLB {
        let Some(ratio) = service_row(t, proxy, n, Test::TcpStream).and_then(|r| r.ratio) else {
            continue;
        };
        if ratio.median >= VIP_GOAL {
            continue;
        }
        any = true;
        let _ = writeln!(
            o,
            "- **TCP_STREAM through the VIP, {}, {} services**: {} of the limit (no goal is \
             set for streams). {}",
            proxy.short(),
            count(n),
            ratio_range(&ratio),
            if proxy == Proxy::XlbXdp {
                "Most likely the veth XDP rule, not the datapath's work: a veth whose peer \
                 runs an XDP program clears its own software GSO (kernel 6.18 does so for \
                 frags-capable programs too; `xlb_xdp` is one, `#[xdp(frags)]`), so the \
                 switch port segments every 64 KiB send into MTU-sized packets that each \
                 run the program; with TC on the uplinks the same stream is not segmented. \
                 A physical NIC has no such coupling. Not profiled in this run."
            } else {
                "Not profiled in this run."
            }
        );
    }
    any
}

/// A through-the-VIP goal from its measured parts at the largest size `n`: judged only at
/// `VIP_GOAL_SERVICES`, passed when `met` (the worst part reached the target).
fn vip_goal(goal: String, target: String, n: usize, parts: &[String], met: bool) -> Goal {
    Goal {
        goal,
        target,
        measured: if n == VIP_GOAL_SERVICES {
            parts.join(", ")
        } else {
            format!("{} ({} services)", parts.join(", "), count(n))
        },
        verdict: if n != VIP_GOAL_SERVICES || parts.is_empty() {
            Verdict::NotMeasured
        } else if met {
            Verdict::Pass
        } else {
            Verdict::FallShort
        },
    }
}
