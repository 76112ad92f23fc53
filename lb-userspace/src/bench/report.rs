//! docs/benchmarks.md: the goals with a verdict each, every table, and SVG plots written
//! beside the markdown file.
use std::{
    fmt::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    control::{ColdRow, System},
    per_packet::{Kind, PerPacketResults, Program},
    report_traffic,
    stats::Summary,
    svg::{self, Chart, Point, Series},
    BenchResults, Mode,
};

/// Headings every report has (the test checks them).
pub const SECTIONS: [&str; 10] = [
    "## Goals",
    "## 1. Datapath cost per packet",
    "### XDP",
    "### TC",
    "## 2. Traffic through a service VIP",
    "## 3. Control plane",
    "### Programming from cold",
    "### Endpoint change to datapath",
    "### Memory",
    "## 4. Restart cost",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Pass,
    FallShort,
    NotMeasured,
    Todo,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::FallShort => "FALL-SHORT",
            Verdict::NotMeasured => "not measured in this run",
            Verdict::Todo => "TODO",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

const PACKET_GOAL: f64 = 1.1;
const COLD_GOAL_SERVICES: usize = 10_000;
const COLD_GOAL_S: f64 = 0.5;
const LATENCY_GOAL_SERVICES: usize = 50_000;
const LATENCY_GOAL_MS: f64 = 10.0;
const MEASURED_KINDS: [Kind; 6] = [
    Kind::Established,
    Kind::Reply,
    Kind::Miss,
    Kind::MissSyn,
    Kind::NewChain,
    Kind::New,
];

/// The goals, each with what this run measured.
pub fn goals(r: &BenchResults) -> Vec<Goal> {
    let mut goals = Vec::new();
    for program in [Program::Xdp, Program::Tc] {
        let goal = format!(
            "{} cost per packet at 100 000 services vs 1 service",
            program.label()
        );
        let target = format!("≤ {PACKET_GOAL}× for every packet kind");
        goals.push(match &r.per_packet {
            Some(p) => {
                let (small, large) = size_range(p);
                let mut ratios: Vec<(Kind, f64)> = MEASURED_KINDS
                    .iter()
                    .filter_map(|k| Some((*k, p.scaling(program, *k, small, large)?.median)))
                    .collect();
                ratios.sort_by(|a, b| b.1.total_cmp(&a.1));
                let list: Vec<String> = ratios
                    .iter()
                    .map(|(k, v)| format!("{} {v:.2}×", kind_short(*k)))
                    .collect();
                let worst = ratios.first().map_or(f64::NAN, |w| w.1);
                let at_goal_sizes = small == 1 && large == 100_000;
                Goal {
                    goal,
                    target,
                    measured: if at_goal_sizes {
                        list.join(", ")
                    } else {
                        format!("{} ({large} vs {small} services)", list.join(", "))
                    },
                    verdict: if !at_goal_sizes || ratios.is_empty() {
                        Verdict::NotMeasured
                    } else if worst <= PACKET_GOAL {
                        Verdict::Pass
                    } else {
                        Verdict::FallShort
                    },
                }
            }
            None => not_measured(goal, target),
        });
    }
    let goal = "xlb programs 10 000 services (10 endpoints each) from cold".to_string();
    let target = format!("< {COLD_GOAL_S} s");
    goals.push(
        match r
            .cold
            .as_ref()
            .and_then(|c| c.row(System::Xlb, COLD_GOAL_SERVICES))
            .and_then(|row| row.summary)
        {
            Some(s) => Goal {
                goal,
                target,
                measured: format!("{} (median of {})", secs(s.median), s.n),
                verdict: if s.median < COLD_GOAL_S {
                    Verdict::Pass
                } else {
                    Verdict::FallShort
                },
            },
            None => not_measured(goal, target),
        },
    );
    let goal = "an EndpointSlice change is served (compute + apply) with 50 000 services loaded"
        .to_string();
    let target = format!("p99 < {LATENCY_GOAL_MS} ms");
    goals.push(match &r.latency {
        Some(l) => match l.total {
            Some(p) => Goal {
                goal,
                target,
                measured: format!(
                    "p99 {} (p50 {}) over {} changes{}",
                    ms(p.p99),
                    ms(p.p50),
                    p.n,
                    if l.config.services == LATENCY_GOAL_SERVICES {
                        String::new()
                    } else {
                        format!(", {} services", count(l.config.services))
                    }
                ),
                verdict: if l.config.services != LATENCY_GOAL_SERVICES {
                    Verdict::NotMeasured
                } else if p.p99 < LATENCY_GOAL_MS {
                    Verdict::Pass
                } else {
                    Verdict::FallShort
                },
            },
            None => not_measured(goal, target),
        },
        None => not_measured(goal, target),
    });
    goals.extend(report_traffic::goals(r));
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

fn size_range(p: &PerPacketResults) -> (usize, usize) {
    let min = p.config.sizes.iter().copied().min().unwrap_or(0);
    let max = p.config.sizes.iter().copied().max().unwrap_or(0);
    (min, max)
}

fn kind_legend(kind: Kind) -> &'static str {
    match kind {
        Kind::Floor => "floor (parse only)",
        Kind::Established => "established",
        Kind::Reply => "reply",
        Kind::Miss => "miss",
        Kind::MissSyn => "miss, SYN",
        Kind::NewChain => "new flow, warm (chain)",
        Kind::FloorOneRun => "floor, 1 run/call",
        Kind::New => "new flow, cold (1 run/call)",
    }
}

fn kind_short(kind: Kind) -> &'static str {
    match kind {
        Kind::Floor => "floor",
        Kind::FloorOneRun => "floor (1 run/call)",
        Kind::Established => "established",
        Kind::Reply => "reply",
        Kind::Miss => "miss",
        Kind::MissSyn => "miss (SYN)",
        Kind::NewChain => "new flow (warm)",
        Kind::New => "new flow (cold)",
    }
}

/// "1 service", "100 000 services".
fn services(n: usize) -> String {
    if n == 1 {
        "1 service".into()
    } else {
        format!("{} services", count(n))
    }
}

/// 100000 -> "100 000".
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn ns(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

pub fn secs(v: f64) -> String {
    if v < 0.01 {
        format!("{:.2} ms", v * 1e3)
    } else if v < 1.0 {
        format!("{v:.3} s")
    } else if v < 10.0 {
        format!("{v:.2} s")
    } else if v < 120.0 {
        format!("{v:.1} s")
    } else {
        let s = v.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    }
}

pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 100.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn mib_bytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

pub(crate) fn range(s: &Summary, f: impl Fn(f64) -> String) -> String {
    if s.n == 1 {
        format!("{} (1 run)", f(s.median))
    } else {
        format!("{} ({}–{})", f(s.median), f(s.min), f(s.max))
    }
}

pub(crate) fn ratio_range(s: &Summary) -> String {
    if s.n == 1 {
        format!("{:.2}×", s.median)
    } else {
        format!("{:.2}× ({:.2}–{:.2})", s.median, s.min, s.max)
    }
}

/// The SVG files written beside `markdown`: (file name, contents).
fn plots(r: &BenchResults, stem: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(p) = &r.per_packet {
        for program in [Program::Xdp, Program::Tc] {
            let kinds: Vec<Kind> = Kind::ALL
                .into_iter()
                .filter(|k| p.row(program, *k, p.config.sizes[0]).is_some())
                .collect();
            let series = kinds
                .iter()
                .map(|kind| Series {
                    name: kind_legend(*kind).into(),
                    points: p
                        .config
                        .sizes
                        .iter()
                        .filter_map(|n| {
                            let s = p.row(program, *kind, *n)?.summary?;
                            Some(Point {
                                x: *n as f64,
                                y: s.median,
                                range: Some((s.min, s.max)),
                            })
                        })
                        .collect(),
                    lower_bounds: Vec::new(),
                })
                .collect();
            let chart = Chart {
                title: format!("{}: ns per packet vs services", program.label()),
                x_label: format!("services ({} backends each)", p.config.endpoints),
                y_label: "ns per packet (BPF_PROG_TEST_RUN, log)".into(),
                log_x: true,
                log_y: true,
                series,
            };
            let name = match program {
                Program::Xdp => format!("{stem}-per-packet-xdp.svg"),
                Program::Tc => format!("{stem}-per-packet-tc.svg"),
            };
            out.push((name, svg::render(&chart)));
        }
    }
    if let Some(c) = &r.cold {
        let series = System::ALL
            .into_iter()
            .filter(|s| c.rows.iter().any(|r| r.system == *s))
            .map(|system| {
                let rows: Vec<&ColdRow> = c.rows.iter().filter(|r| r.system == system).collect();
                Series {
                    name: match system {
                        System::Xlb => "xlb",
                        System::Iptables => "kube-proxy iptables",
                        System::Nftables => "kube-proxy nftables",
                    }
                    .into(),
                    points: rows
                        .iter()
                        .filter_map(|row| {
                            let s = row.summary?;
                            Some(Point {
                                x: row.services as f64,
                                y: s.median,
                                range: Some((s.min, s.max)),
                            })
                        })
                        .collect(),
                    lower_bounds: rows
                        .iter()
                        .filter(|row| row.summary.is_none() && row.timed_out > 0)
                        .map(|row| (row.services as f64, c.config.timeout_s))
                        .collect(),
                }
            })
            .collect();
        let chart = Chart {
            title: "Programming from cold: seconds vs services".into(),
            x_label: format!("services ({} endpoints each)", c.config.endpoints),
            y_label: "seconds (log)".into(),
            log_x: true,
            log_y: true,
            series,
        };
        out.push((format!("{stem}-cold-program.svg"), svg::render(&chart)));
    }
    out.extend(report_traffic::plots(r, stem));
    out
}

/// Writes the report to `markdown` and its plots beside it; returns every file written.
pub fn write(r: &BenchResults, markdown: &Path) -> Result<Vec<PathBuf>> {
    let dir = markdown
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = markdown
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("benchmarks")
        .to_string();
    let mut written = Vec::new();
    let plots = plots(r, &stem);
    for (name, contents) in &plots {
        let path = dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    let names: Vec<&str> = plots.iter().map(|(n, _)| n.as_str()).collect();
    let text = markdown_report(r, &names);
    std::fs::write(markdown, text).with_context(|| format!("writing {}", markdown.display()))?;
    written.insert(0, markdown.to_path_buf());
    Ok(written)
}

/// The report text. `plots` are the SVG file names written beside it (none: no images).
pub fn markdown_report(r: &BenchResults, plots: &[&str]) -> String {
    let mut o = String::new();
    let e = &r.environment;
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Generated by `cargo xtask bench{}` ({} mode, which took {}). Do not edit by hand: \
         run it again.\n",
        match r.mode {
            Mode::Quick => " --quick",
            _ => "",
        },
        r.mode.name(),
        secs(r.duration_s)
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| date | {} |", e.date_utc);
    let _ = writeln!(o, "| mode | {} |", r.mode.name());
    let _ = writeln!(o, "| kernel | {} |", e.kernel);
    let _ = writeln!(
        o,
        "| CPU | {} ({} CPUs, {:.0} GiB memory) |",
        e.cpu_model, e.cpus, e.memory_gib
    );
    if let Some(c) = &e.git_commit {
        let _ = writeln!(o, "| commit | {c} |");
    }
    let _ = writeln!(
        o,
        "| baselines | {}; {} |",
        e.iptables.as_deref().unwrap_or("iptables: not installed"),
        e.nft.as_deref().unwrap_or("nft: not installed")
    );
    let _ = writeln!(
        o,
        "\nThe machine is small and shared (other jobs run beside the bench), so every \
         measurement is repeated in interleaved rounds (A B C, C B A, …): tables give the median \
         and, in parentheses, the min–max over rounds; ratios are taken within a round and \
         then summarised the same way. Raw numbers: `cargo xtask bench{} -- -o json`.\n",
        if r.mode == Mode::Quick {
            " --quick"
        } else {
            ""
        }
    );
    for note in &r.notes {
        let _ = writeln!(o, "> Note: {note}\n");
    }

    let goals = goals(r);
    let _ = writeln!(o, "## Goals\n");
    let _ = writeln!(
        o,
        "| goal | target | measured | verdict |\n|---|---|---|---|"
    );
    for g in &goals {
        let _ = writeln!(
            o,
            "| {} | {} | {} | **{}** |",
            g.goal,
            g.target,
            g.measured,
            g.verdict.label()
        );
    }
    o.push('\n');

    per_packet_section(&mut o, r, plots);
    report_traffic::traffic_section(&mut o, r, plots);
    control_section(&mut o, r, plots);
    report_traffic::restart_section(&mut o, r);
    falls_short_section(&mut o, r, &goals);
    method_section(&mut o, r);
    o
}

fn per_packet_section(o: &mut String, r: &BenchResults, plots: &[&str]) {
    let _ = writeln!(o, "## 1. Datapath cost per packet\n");
    let Some(p) = &r.per_packet else {
        let _ = writeln!(o, "Not run.\n\n### XDP\n\n### TC\n");
        return;
    };
    let c = &p.config;
    let _ = writeln!(
        o,
        "The real programs run through BPF_PROG_TEST_RUN on TCP packets, with {} services of \
         {} backends programmed by the agent's own map writer (ClusterIPs 10.96.x.y:80, \
         backends 10.244.x.y:8080), {} round{}. Repeated kinds: {} runs per call, the median \
         of 3 calls per round, each timed by the thread's CPU time net of the per-call cost. \
         One-run kinds: the median of the kernel's duration over {} single-run calls per round \
         (the chain: {} calls of 64 runs). Ratios are to the parse-only XDP program \
         `xlb_floor`, measured the same way in the same round. [Method](#method) explains how \
         each kind is made and checked.\n",
        c.sizes
            .iter()
            .map(|n| count(*n))
            .collect::<Vec<_>>()
            .join(", "),
        c.endpoints,
        c.rounds,
        if c.rounds == 1 { "" } else { "s" },
        count(c.repeat as usize),
        count(c.distinct as usize),
        c.chain_calls
    );
    let (small, large) = size_range(p);
    for program in [Program::Xdp, Program::Tc] {
        let heading = match program {
            Program::Xdp => "### XDP",
            Program::Tc => "### TC",
        };
        let _ = writeln!(
            o,
            "{heading}\n\n{} ns per packet: median (min–max) over rounds; below it, × the \
             floor. Last column: the cost at {} services over the cost at {}, per round.\n",
            match program {
                Program::Xdp => "`xlb_xdp`, the uplink program.",
                Program::Tc => {
                    "`xlb_tc`, the pod-veth program, run in a network namespace with no \
                     routes: its FIB lookup fails and the packet goes to the stack \
                     (TC_ACT_OK), so these figures exclude the FIB redirect. The floors \
                     are the XDP ones."
                }
            },
            count(large),
            count(small)
        );
        let _ = write!(o, "| packet |");
        for n in &c.sizes {
            let _ = write!(o, " {} |", services(*n));
        }
        let _ = writeln!(o, " {} / {} |", count(large), count(small));
        let _ = writeln!(o, "|---|{}---|", "---|".repeat(c.sizes.len()));
        for kind in Kind::ALL {
            if p.row(program, kind, small).is_none() {
                continue;
            }
            let _ = write!(o, "| {} |", kind.label());
            for n in &c.sizes {
                match p
                    .row(program, kind, *n)
                    .and_then(|row| Some((row.summary?, row.ratio?)))
                {
                    Some((s, ratio)) => {
                        let times = if kind.is_floor() {
                            String::new()
                        } else {
                            format!("<br>{:.1}× floor", ratio.median)
                        };
                        let _ = write!(o, " {}{times} |", range(&s, ns));
                    }
                    None => {
                        let _ = write!(o, " — |");
                    }
                }
            }
            match p.scaling(program, kind, small, large) {
                Some(s) => {
                    let _ = writeln!(o, " {} |", ratio_range(&s));
                }
                None => {
                    let _ = writeln!(o, " — |");
                }
            }
        }
        o.push('\n');
        let plot = match program {
            Program::Xdp => "per-packet-xdp.svg",
            Program::Tc => "per-packet-tc.svg",
        };
        if let Some(name) = plots.iter().find(|n| n.ends_with(plot)) {
            let _ = writeln!(o, "![{} ns per packet]({name})\n", program.label());
        }
    }

    let _ = writeln!(
        o,
        "#### Where the time goes (differences of medians, ns)\n\n\
         Each kind runs a prefix of the same pipeline, so differences isolate stages: \
         *miss − floor* is a conntrack lookup that misses plus a frontend lookup that misses; \
         *established − floor* is a conntrack hit plus the rewrite; *new (warm) − floor* adds \
         to a miss the frontend, backend-set and backend-slot lookups and two conntrack (LRU) \
         inserts; *new (cold) − floor, 1 run* is the same with the lookups spread over every \
         service and the caches cold; *floor, 1 run − floor* is what a single-run call adds \
         (the kernel's clock reads, cold caches).\n"
    );
    let _ = write!(o, "| stage | program |");
    for n in &c.sizes {
        let _ = write!(o, " {} |", count(*n));
    }
    let _ = writeln!(o, "\n|---|---|{}", "---|".repeat(c.sizes.len()));
    let med = |program: Program, kind: Kind, n: usize| {
        p.row(program, kind, n)
            .and_then(|r| r.summary)
            .map(|s| s.median)
    };
    let lines: [(&str, Kind, Kind, bool); 5] = [
        ("miss − floor", Kind::Miss, Kind::Floor, false),
        ("established − floor", Kind::Established, Kind::Floor, false),
        ("new (warm) − floor", Kind::NewChain, Kind::Floor, false),
        (
            "new (cold) − floor, 1 run",
            Kind::New,
            Kind::FloorOneRun,
            false,
        ),
        ("floor, 1 run − floor", Kind::FloorOneRun, Kind::Floor, true),
    ];
    for (label, a, b, xdp_only) in lines {
        for program in [Program::Xdp, Program::Tc] {
            if xdp_only && program == Program::Tc {
                continue;
            }
            let _ = write!(o, "| {label} | {} |", program_short(program));
            for n in &c.sizes {
                match (med(program, a, *n), med(program, b, *n)) {
                    (Some(x), Some(y)) => {
                        let _ = write!(o, " {} |", ns(x - y));
                    }
                    _ => {
                        let _ = write!(o, " — |");
                    }
                }
            }
            o.push('\n');
        }
    }
    o.push('\n');
    if !p.setups.is_empty() {
        let _ = writeln!(
            o,
            "Datapaths used: {}.\n",
            p.setups
                .iter()
                .map(|s| format!(
                    "{} programmed in {} ({} map operations)",
                    services(s.services),
                    secs(s.apply_s),
                    count(s.map_ops)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

fn program_short(p: Program) -> &'static str {
    match p {
        Program::Xdp => "XDP",
        Program::Tc => "TC",
    }
}

fn control_section(o: &mut String, r: &BenchResults, plots: &[&str]) {
    let _ = writeln!(o, "## 3. Control plane\n");
    let _ = writeln!(o, "### Programming from cold\n");
    match &r.cold {
        None => {
            let _ = writeln!(o, "Not run.\n");
        }
        Some(c) => {
            let _ = writeln!(
                o,
                "From nothing to every service programmed, {} endpoints per service. xlb: one \
                 `MapWriter::apply` of the whole desired state onto fresh maps (fresh pin path; \
                 loading the programs and creating the maps is listed apart). kube-proxy: the \
                 exact input of its first sync (see [Method](#method)), loaded by the real \
                 `iptables-restore --noflush --counters` / `nft -f -` into a fresh network \
                 namespace made for the run and deleted after it; its chains and jump rules \
                 are set up first and not timed. Cells: median (min–max) and × xlb in the same \
                 round. Runs longer than {} were stopped.\n",
                c.config.endpoints,
                secs(c.config.timeout_s)
            );
            let mut sizes: Vec<usize> = c.rows.iter().map(|r| r.services).collect();
            sizes.sort_unstable();
            sizes.dedup();
            let _ = write!(o, "| system |");
            for n in &sizes {
                let _ = write!(o, " {} |", services(*n));
            }
            let _ = writeln!(o, "\n|---|{}", "---|".repeat(sizes.len()));
            for system in System::ALL {
                if !c.rows.iter().any(|r| r.system == system) {
                    continue;
                }
                let _ = write!(o, "| {} |", system.label());
                for n in &sizes {
                    let cell = match c.row(system, *n) {
                        None => "—".to_string(),
                        Some(row) => cold_cell(row, c.config.timeout_s),
                    };
                    let _ = write!(o, " {cell} |");
                }
                o.push('\n');
            }
            o.push('\n');
            if let Some(name) = plots.iter().find(|n| n.ends_with("cold-program.svg")) {
                let _ = writeln!(o, "![programming from cold]({name})\n");
            }
            let _ = writeln!(
                o,
                "| system | services | rounds | input | checked after loading | loader peak RSS | xlb: load programs + create maps |\n|---|---|---|---|---|---|---|"
            );
            for row in &c.rows {
                let input = match row.system {
                    System::Xlb => format!("{} map operations", count(row.map_ops)),
                    _ => format!(
                        "{} lines, {:.1} MiB",
                        count(row.input_lines),
                        row.input_bytes as f64 / 1024.0 / 1024.0
                    ),
                };
                let checked = match (&row.verified, row.system) {
                    (Some(v), System::Xlb) => format!(
                        "{} frontends, {} backends (`xlb services` view)",
                        count(v.service_chains),
                        count(v.endpoint_chains)
                    ),
                    (Some(v), System::Iptables) => format!(
                        "{} KUBE-SVC, {} KUBE-SEP chains (iptables-save)",
                        count(v.service_chains),
                        count(v.endpoint_chains)
                    ),
                    (Some(v), System::Nftables) => format!(
                        "{} service-, {} endpoint- chains (nft list chains)",
                        count(v.service_chains),
                        count(v.endpoint_chains)
                    ),
                    (None, _) => "— (did not finish)".into(),
                };
                let load = Summary::of(&row.load_seconds).map_or("".into(), |s| range(&s, secs));
                let _ = writeln!(
                    o,
                    "| {} | {} | {}{} | {input} | {checked} | {} | {load} |",
                    row.system.short(),
                    count(row.services),
                    row.seconds.len(),
                    if row.timed_out > 0 {
                        format!(" + {} stopped", row.timed_out)
                    } else {
                        String::new()
                    },
                    row.loader_peak_rss_kib.map_or("—".into(), mib),
                );
            }
            o.push('\n');
        }
    }

    let _ = writeln!(o, "### Endpoint change to datapath\n");
    match &r.latency {
        None => {
            let _ = writeln!(o, "Not run.\n");
        }
        Some(l) => {
            let _ = writeln!(
                o,
                "{} services of {} endpoints loaded; then {} times: one endpoint address of a \
                 random EndpointSlice changes (a pod replaced), and the time is taken from the \
                 changed objects to the maps holding the new backend set: \
                 the agent's `ClusterView` re-plans the services the changed slice belongs \
                 to, then `MapWriter::apply_delta` writes the frontends and sets it names \
                 (every change checked to update exactly one backend set; median {} map \
                 operations). Not included: how the agent learns of the change (in API mode a \
                 watch event, published at once when none was in the last 100 ms; in manifest \
                 mode a 250 ms poll and a whole-directory snapshot). Percentiles are \
                 nearest-rank (observed values).\n",
                count(l.config.services),
                l.config.endpoints,
                count(l.config.changes),
                l.map_ops_per_change
            );
            let _ = writeln!(o, "| ms | p50 | p90 | p99 | max |\n|---|---|---|---|---|");
            for (label, p) in [
                ("compute + apply", &l.total),
                ("ClusterView::apply", &l.compute),
                ("MapWriter::apply_delta", &l.apply),
            ] {
                if let Some(p) = p {
                    let _ = writeln!(
                        o,
                        "| {label} | {} | {} | {} | {} |",
                        ms(p.p50),
                        ms(p.p90),
                        ms(p.p99),
                        ms(p.max)
                    );
                }
            }
            let _ = writeln!(
                o,
                "\nFor reference, the first compute + apply of all {} services onto empty maps \
                 took {} + {} (building the Kubernetes objects in memory, not timed above: {}).\n",
                count(l.config.services),
                secs(l.cold_compute_s),
                secs(l.cold_apply_s),
                secs(l.build_objects_s)
            );
        }
    }

    let _ = writeln!(o, "### Memory\n");
    let _ = writeln!(o, "| what | memory |\n|---|---|");
    if let Some(a) = &r.agent {
        let _ = writeln!(
            o,
            "| `xlb run` with {} services (manifest mode, {:.1} MiB of JSON), resident after programming (VmRSS) | {} |",
            count(a.config.services),
            a.manifest_bytes as f64 / 1024.0 / 1024.0,
            mib(a.rss_kib)
        );
        let _ = writeln!(o, "| the same, peak (VmHWM) | {} |", mib(a.hwm_kib));
        let _ = writeln!(
            o,
            "| BPF maps it holds ({} maps, kernel `memlock` from fdinfo) | {} |",
            a.maps,
            mib_bytes(a.map_bytes)
        );
        let _ = writeln!(
            o,
            "| its start to ready (load programs, parse manifests, compute, program) | {} |",
            secs(a.ready_s)
        );
    } else {
        let _ = writeln!(o, "| `xlb run` | not measured (see notes) |");
    }
    if let Some(l) = &r.latency {
        let m = &l.memory;
        let _ = writeln!(
            o,
            "| bench process (library, not the agent): before building {} services' objects → after → after programming them | {} → {} → {} |",
            count(l.config.services),
            mib(m.rss_start_kib),
            mib(m.rss_objects_kib),
            mib(m.rss_programmed_kib)
        );
    }
    o.push('\n');
    if let Some(l) = &r.latency {
        let _ = writeln!(
            o,
            "BPF map memory by map with {} programmed (kernel `memlock` from fdinfo). Maps \
             marked *on demand* are hash maps created with BPF_F_NO_PREALLOC: their entries \
             are allocated as they are inserted and their bucket arrays are sized for the \
             capacity; the others are allocated at full capacity when created.\n",
            services(l.config.services)
        );
        let _ = writeln!(
            o,
            "| map | max entries | allocation | memlock |\n|---|---|---|---|"
        );
        let mut total = 0;
        for m in &l.maps {
            total += m.bytes;
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                m.name,
                count(m.max_entries as usize),
                if m.on_demand {
                    "on demand"
                } else {
                    "at creation"
                },
                mib_bytes(m.bytes)
            );
        }
        let _ = writeln!(o, "| total | | | {} |\n", mib_bytes(total));
    }
    let _ = writeln!(
        o,
        "A restarted agent's time to adopt the pinned maps, and what traffic loses meanwhile, \
         are in part 4.\n"
    );
}

fn cold_cell(row: &ColdRow, timeout_s: f64) -> String {
    match (&row.summary, row.timed_out) {
        (Some(s), stopped) => {
            let mut cell = range(s, secs);
            if let Some(ratio) = &row.ratio {
                let _ = write!(cell, "<br>{:.0}× xlb", ratio.median);
            }
            if stopped > 0 {
                let _ = write!(cell, "<br>+{stopped} run(s) stopped at {}", secs(timeout_s));
            }
            cell
        }
        (None, stopped) if stopped > 0 => format!("> {} (stopped)", secs(timeout_s)),
        (None, _) => "—".into(),
    }
}

fn falls_short_section(o: &mut String, r: &BenchResults, goals: &[Goal]) {
    let _ = writeln!(o, "## Where xlb falls short, and why\n");
    let mut any = false;
    if let Some(p) = &r.per_packet {
        let (small, large) = size_range(p);
        for kind in MEASURED_KINDS {
            let over: Vec<(Program, Summary)> = [Program::Xdp, Program::Tc]
                .into_iter()
                .filter_map(|program| Some((program, p.scaling(program, kind, small, large)?)))
                .filter(|(_, s)| s.median > PACKET_GOAL)
                .collect();
            if over.is_empty() {
                continue;
            }
            any = true;
            let figures: Vec<String> = over
                .iter()
                .map(|(program, s)| {
                    let cost = |n| {
                        p.row(*program, kind, n)
                            .and_then(|r| r.summary)
                            .map_or("?".into(), |s| ns(s.median))
                    };
                    format!(
                        "{} {:.2}× ({} → {} ns; rounds {:.2}–{:.2})",
                        program_short(*program),
                        s.median,
                        cost(small),
                        cost(large),
                        s.min,
                        s.max
                    )
                })
                .collect();
            let noise = over.iter().all(|(_, s)| s.min <= PACKET_GOAL);
            let _ = writeln!(
                o,
                "- **{} at {} vs {}: {}.** {}\n",
                kind.label(),
                services(large),
                count(small),
                figures.join("; "),
                why_packet(kind, p, noise)
            );
        }
    }
    if let Some(goal) = goals
        .iter()
        .find(|g| g.goal.starts_with("xlb programs") && g.verdict == Verdict::FallShort)
    {
        any = true;
        let per_service = r
            .cold
            .as_ref()
            .and_then(|c| c.row(System::Xlb, COLD_GOAL_SERVICES))
            .map_or(0, |row| row.map_ops / COLD_GOAL_SERVICES);
        let _ = writeln!(
            o,
            "- **Programming from cold: {}** (goal {}). `MapWriter::apply` writes \
             {per_service} map entries per service (each backend slot and set member, the \
             Maglev table's chunks, the set, its name, the frontend) in batches \
             (`BPF_MAP_UPDATE_BATCH`, a few syscalls per thousand entries). In a `perf` \
             profile about half of the apply is the kernel inserting into its hash tables \
             (`htab_map_update_elem`, allocating each entry: the maps are created with \
             BPF_F_NO_PREALLOC) and a fifth is computing the Maglev tables, which run on a \
             second thread while the first waits for the kernel: on a machine shared with \
             other work the two threads compete for its two cores.\n",
            goal.measured, goal.target
        );
    }
    if let Some(l) = &r.latency {
        if let (Some(t), Some(c), Some(a)) = (l.total, l.compute, l.apply) {
            if t.p99 >= LATENCY_GOAL_MS {
                any = true;
                let _ = writeln!(
                    o,
                    "- **An endpoint change takes {} at p99 with {} services** (p50 {}; goal \
                     {LATENCY_GOAL_MS} ms), although it changes one backend set, {} map \
                     operations. `ClusterView::apply` (re-planning the changed service) is {} \
                     of it at p50 ({} at p99) and `MapWriter::apply_delta` {} at p50 ({} at \
                     p99).\n",
                    ms(t.p99),
                    count(l.config.services),
                    ms(t.p50),
                    l.map_ops_per_change,
                    ms(c.p50),
                    ms(c.p99),
                    ms(a.p50),
                    ms(a.p99),
                );
            }
        }
    }
    if let Some(a) = &r.agent {
        if a.rss_kib > 512 * 1024 {
            any = true;
            let _ = writeln!(
                o,
                "- **Agent memory: `xlb run` with {} services is {} resident ({} at peak)**, \
                 for {} of manifests and {} of BPF maps. Every Service and EndpointSlice is \
                 held twice: by the manifest source (each file's last good objects, kept so \
                 that a broken file keeps its last good state) and by the model's view \
                 (without managedFields or kubectl's last-applied copies); the view's \
                 per-service plans, the desired state and the map writer's mirror sit \
                 beside them. The peak is the first snapshot: every file parsed through a \
                 `serde_json::Value` tree and a merged copy of every object handed to the \
                 view; after a large apply the agent returns freed memory to the system \
                 (`malloc_trim`). Sharing the objects between source and view would save \
                 one of the two copies. No goal was set for memory; kube-proxy's own \
                 footprint was not measured here.\n",
                count(a.config.services),
                mib(a.rss_kib),
                mib(a.hwm_kib),
                mib_bytes(a.manifest_bytes as u64),
                mib_bytes(a.map_bytes)
            );
        }
    }
    if report_traffic::falls_short(o, r) {
        any = true;
        o.push('\n');
    }
    if !any {
        let _ = writeln!(o, "Nothing measured in this run misses its goal.\n");
    }
    if r.traffic.is_some() && !report_traffic::measured_nodeport(r) {
        let _ = writeln!(
            o,
            "Not measured, so not claimed: NodePort traffic from the external host (part 2).\n"
        );
    }
}

fn why_packet(kind: Kind, p: &PerPacketResults, noise: bool) -> String {
    let (small, large) = size_range(p);
    let lookup_maps = [
        lb_common::map_name::SERVICES,
        lb_common::map_name::BACKEND_SETS,
        lb_common::map_name::BACKENDS,
    ];
    let table_mib: Option<f64> = p
        .setups
        .iter()
        .find(|s| s.services == large)
        .map(|s| {
            s.maps
                .iter()
                .filter(|m| lookup_maps.contains(&m.name.as_str()))
                .map(|m| m.bytes as f64)
                .sum::<f64>()
                / 1024.0
                / 1024.0
        })
        .filter(|m| *m > 0.0);
    let chain = [Program::Xdp, Program::Tc]
        .into_iter()
        .filter_map(|program| {
            Some(format!(
                "{} {:.2}×",
                program_short(program),
                p.scaling(program, Kind::NewChain, small, large)?.median
            ))
        })
        .collect::<Vec<_>>()
        .join(", ");
    match kind {
        Kind::New => format!(
            "With one service every new flow looks up the same frontend, backend set and \
             backend slot entries, which stay in the CPU caches; with {} drawn at random, \
             each of those lookups lands somewhere else in three hash tables{}, whose bucket \
             arrays are sized for their full capacity and whose entries are scattered \
             through kernel memory, and misses the caches and the TLB (in a VM a TLB miss \
             is a two-level page walk). The warm kind, which makes the same lookups and inserts through the same \
             64 frontends at every size, grows {}: the extra cost is memory latency, not \
             work that grows with the number of services. Fewer, denser tables (frontend and \
             set in one value; a set's backends contiguous in one array value) would cut the \
             misses per new flow.",
            services(large),
            table_mib.map_or(String::new(), |m| format!(" of {m:.0} MiB together")),
            if chain.is_empty() {
                "little".to_string()
            } else {
                chain
            }
        ),
        Kind::NewChain | Kind::Established | Kind::Reply | Kind::Miss | Kind::MissSyn => {
            let touches = match kind {
                Kind::Miss => {
                    "a lookup in each conntrack table and one frontend lookup of the same key"
                }
                Kind::MissSyn => {
                    "a frontend lookup and three conntrack lookups (its tuple, its reverse in \
                     both tables)"
                }
                Kind::NewChain => "the same 64 frontends and their sets",
                _ => {
                    "the conntrack table only, whose contents do not depend on the number \
                      of services"
                }
            };
            if noise {
                format!(
                    "These packets touch {touches}, and some rounds are within the goal: \
                     this is the noise of this shared machine (each size also has its own \
                     maps at different addresses), not a cost that grows with services."
                )
            } else {
                format!(
                    "These packets touch {touches}; every round shows it, so it is not only \
                     noise, but its cause was not isolated (each size has its own maps, at \
                     different addresses, and the fuller tables have longer bucket chains)."
                )
            }
        }
        Kind::Floor | Kind::FloorOneRun => String::new(),
    }
}

fn method_section(o: &mut String, r: &BenchResults) {
    let _ = writeln!(o, "## Method\n");
    let _ = writeln!(
        o,
        "**Per packet.** Every size has its own datapath (programs loaded, maps pinned under \
         `/sys/fs/bpf/xlb-bench/<pid>-<n>/`), all loaded at once and measured in turn each \
         round, in alternating order. The synthetic services are exactly what \
         `model::desired_state` computes for ClusterIP Services with one EndpointSlice each (a \
         unit test checks this). Packet kinds:\n\n\
         - *established* and *reply*: BPF_PROG_TEST_RUN rewrites the packet in place between \
         repetitions, so a tracked packet would become its own translation after the first \
         run and miss from then on. Two extra frontends translate into each other (A:80 → \
         B:8080 and B:8080 → A:80); a warm-up run lets the datapath itself track both flows, \
         and from then on every repetition is a conntrack hit with a full DNAT (or reverse \
         NAT) rewrite of address, port and checksums, alternating between two entries.\n\
         - *new flow (warm, chain)*: 64 extra frontends form a chain, each one's only \
         backend being the next one's address and port, so the 64 repetitions of one call \
         are 64 new flows in a row, each a full lookup, two conntrack inserts and a DNAT; a \
         fresh client port per call keeps every flow new.\n\
         - *new flow, 1 run/call (cold)*: first packets of distinct flows (client address and \
         port from a counter) to services drawn at random among all of them, one run per \
         call. The kernel's duration of a single run includes its clock reads and the \
         syscall leaves the caches cold, so these are compared with the floor measured the \
         same way (*floor, 1 run/call*).\n\
         - *miss*: TCP to a pod address that is neither a frontend nor a tracked reply.\n\
         - *floor*: `xlb_floor`, which parses the headers like the pipeline and returns \
         XDP_PASS.\n\n\
         So every size holds its services plus these 66 frontends. Every call's return code, \
         and the datapath's per-reason counters after every measurement, are checked (e.g. \
         exactly 1 + 3 × `repeat` × `forward_established` and nothing else): a run that took \
         another path fails the bench instead of producing a number. Repeated kinds are \
         timed by the thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) over a call of `repeat` \
         runs minus a call of 1 run (the kernel's own average, truncated to whole ns, is in \
         the JSON as `kernel_ns`). Everything runs on one thread moved into a fresh network \
         namespace (`unshare(CLONE_NEWNET)`), where the TC program's FIB lookup has no route. \
         There each datapath's `xlb_xdp` is attached to a veth of its own, as on a node: \
         BPF_PROG_TEST_RUN otherwise adds the program to the kernel's XDP dispatcher and \
         removes it again on every call, re-patching kernel text, and the TLB flush that \
         comes with it made the map accesses of the following runs several times slower (a \
         warm new flow measured 3 µs instead of 1 µs).\n"
    );
    let _ = writeln!(
        o,
        "**Programming from cold and the kube-proxy baselines.** The rules are generated from \
         kube-proxy's proxiers (kubernetes `pkg/proxy/iptables/proxier.go`, \
         `pkg/proxy/nftables/proxier.go`) for the same services and endpoints, as its first \
         full sync with default flags writes them: iptables mode with KUBE-SERVICES → \
         KUBE-SVC-* (masquerade rule for off-cluster sources, `statistic` probability ladder) \
         → KUBE-SEP-* (hairpin mark, DNAT), chain names from the same SHA-256/base32 hashes \
         (unit-tested against kube-proxy's examples), per-endpoint comments dropped above \
         1 000 endpoints as kube-proxy does; nftables mode with the `service-ips` verdict \
         map, `service-*` chains with a `numgen random` vmap and `endpoint-*` chains. Only the \
         restore is timed (kube-proxy's Go code builds the text in well under a second). One \
         difference: nft 1.0.6 (Debian 12) rejects the priority names kube-proxy writes on \
         filter chains (`dstnat-10`), so the same values are written as numbers. After each \
         load the kernel's state is read back (`iptables-save`, `nft list chains`; for xlb \
         the operator's view of the pinned maps) and must hold every service and endpoint. \
         IPVS mode cannot be compared: this kernel has no IPVS.\n"
    );
    let _ = writeln!(
        o,
        "**Why the baselines are slow here** (observed while writing this bench). With the \
         nf_tables backend, `iptables-restore` (iptables 1.8.9) spends most of its time in \
         user space: in a `perf` profile of the 1 000-service load, about 80 % was `strcmp` \
         and a list walk inside `xtables-nft-multi`, i.e. chains looked up by name for every \
         rule, so its time grows much faster than linearly with the number of chains. \
         `nft -f` spends almost all of its time in the kernel (`sys` time) committing one \
         transaction of 11 chains per service. The figure in \
         ../shared/reference/kube-proxy-layouts.md (10 000 services × 3 endpoints in 15.8 s) \
         was not reproduced with this layout on this machine: 10 000 × 3 did not finish in 2 \
         minutes.\n"
    );
    if r.mode == Mode::Tiny {
        let _ = writeln!(
            o,
            "**This is a tiny run** (tests/bench.rs): it proves the bench works; its numbers \
             mean nothing.\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(count(100_000), "100 000");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1 000");
        assert_eq!(secs(0.214), "0.214 s");
        assert_eq!(secs(205.8), "3 min 26 s");
        assert_eq!(ms(3.456), "3.46 ms");
    }
}
