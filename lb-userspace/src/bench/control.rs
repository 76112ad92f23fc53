//! Part 3: the control plane. Programming from cold (xlb's map writer; kube-proxy's iptables
//! and nftables layouts loaded by the real tools in a namespace of our own), the latency of
//! one EndpointSlice change with many services loaded, and memory.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::MapData;
use lb_common::map_name;
use serde::Serialize;

use super::{
    kube_proxy, say,
    stats::{Percentiles, Summary},
    synth,
    sys::{self, check_interrupt, run_timed, Netns, PinDir, WorkDir},
};
use crate::{
    datapath::{reader, Datapath},
    model::{ClusterState, ClusterView, ObjectChange},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum System {
    Xlb,
    Iptables,
    Nftables,
}

impl System {
    pub const ALL: [System; 3] = [System::Xlb, System::Iptables, System::Nftables];

    pub fn label(self) -> &'static str {
        match self {
            System::Xlb => "xlb (MapWriter::apply)",
            System::Iptables => "kube-proxy iptables (iptables-restore)",
            System::Nftables => "kube-proxy nftables (nft -f)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            System::Xlb => "xlb",
            System::Iptables => "iptables",
            System::Nftables => "nftables",
        }
    }
}

/// Which sizes each system is programmed with, and how many rounds each.
#[derive(Clone, Debug, Serialize)]
pub struct ColdPlan {
    pub system: System,
    pub services: usize,
    pub rounds: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ColdConfig {
    pub plan: Vec<ColdPlan>,
    pub endpoints: usize,
    /// A baseline load running longer than this is killed and reported as "more than".
    pub timeout_s: f64,
}

/// One (system, size): a time per round that finished, and what was checked.
#[derive(Clone, Debug, Serialize)]
pub struct ColdRow {
    pub system: System,
    pub services: usize,
    pub endpoints: usize,
    /// Seconds, one per finished round.
    pub seconds: Vec<f64>,
    /// The round of each of `seconds`.
    pub rounds: Vec<usize>,
    /// Rounds that hit the timeout (their time is at least `timeout_s`).
    pub timed_out: usize,
    /// time / xlb's time at the same size in the same round.
    pub ratio_to_xlb: Vec<f64>,
    pub summary: Option<Summary>,
    pub ratio: Option<Summary>,
    /// Size of the input (rules text) or number of map operations (xlb).
    pub input_lines: usize,
    pub input_bytes: usize,
    /// xlb: map update/delete syscalls per apply.
    pub map_ops: usize,
    /// Peak RSS of the loading tool (iptables-restore, nft; VmHWM sampled every 20 ms), KiB.
    pub loader_peak_rss_kib: Option<u64>,
    /// What the loaded state was checked to contain (first round).
    pub verified: Option<Verified>,
    /// xlb: time to load and verify the programs and create the maps, before the apply.
    pub load_seconds: Vec<f64>,
    /// xlb: CPU time (user + kernel) of the apply, one per finished round: unlike
    /// `seconds`, not inflated when other processes compete for the CPUs.
    pub cpu_seconds: Vec<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Verified {
    /// KUBE-SVC-* chains (iptables), service-* chains (nftables), frontends (xlb).
    pub service_chains: usize,
    /// KUBE-SEP-* chains (iptables), endpoint-* chains (nftables), backend slots (xlb).
    pub endpoint_chains: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ColdResults {
    pub config: ColdConfig,
    pub rows: Vec<ColdRow>,
}

impl ColdResults {
    pub fn row(&self, system: System, services: usize) -> Option<&ColdRow> {
        self.rows
            .iter()
            .find(|r| r.system == system && r.services == services)
    }
}

/// Programs every planned (system, size) from cold, rounds interleaved: in each round every
/// size, and at each size every system (order reversed on odd rounds).
pub fn cold(cfg: &ColdConfig) -> Result<ColdResults> {
    let rounds = cfg.plan.iter().map(|p| p.rounds).max().unwrap_or(0);
    let mut sizes: Vec<usize> = cfg.plan.iter().map(|p| p.services).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut rows: BTreeMap<(System, usize), ColdRow> = BTreeMap::new();
    // Per-round xlb times, for the ratios.
    let mut xlb_by_round: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    let work = WorkDir::new()?;
    let timeout = Duration::from_secs_f64(cfg.timeout_s);
    for round in 0..rounds {
        for &n in &sizes {
            let mut systems: Vec<System> = System::ALL
                .into_iter()
                .filter(|s| {
                    cfg.plan
                        .iter()
                        .any(|p| p.system == *s && p.services == n && round < p.rounds)
                })
                .collect();
            if round % 2 == 1 {
                systems.reverse();
            }
            for system in systems {
                check_interrupt()?;
                let rounds_of = cfg
                    .plan
                    .iter()
                    .find(|p| p.system == system && p.services == n)
                    .map_or(0, |p| p.rounds);
                let row = rows.entry((system, n)).or_insert_with(|| ColdRow {
                    system,
                    services: n,
                    endpoints: cfg.endpoints,
                    seconds: Vec::new(),
                    rounds: Vec::new(),
                    timed_out: 0,
                    ratio_to_xlb: Vec::new(),
                    summary: None,
                    ratio: None,
                    input_lines: 0,
                    input_bytes: 0,
                    map_ops: 0,
                    loader_peak_rss_kib: None,
                    verified: None,
                    load_seconds: Vec::new(),
                    cpu_seconds: Vec::new(),
                });
                let verify = row.verified.is_none();
                let outcome = match system {
                    System::Xlb => cold_xlb(n, cfg.endpoints, row)?,
                    System::Iptables | System::Nftables => {
                        cold_baseline(system, n, cfg.endpoints, &work, timeout, verify, row)?
                    }
                };
                match outcome {
                    Some(seconds) => {
                        row.seconds.push(seconds);
                        row.rounds.push(round);
                        if system == System::Xlb {
                            xlb_by_round.insert((n, round), seconds);
                        }
                        let cpu = match (system, row.cpu_seconds.last()) {
                            (System::Xlb, Some(cpu)) => format!(" ({cpu:.3} s of CPU)"),
                            _ => String::new(),
                        };
                        say(format!(
                            "cold: {} with {n} services, round {}/{rounds_of}: {seconds:.3} s{cpu}",
                            system.short(),
                            round + 1
                        ));
                    }
                    None => {
                        row.timed_out += 1;
                        say(format!(
                            "cold: {} with {n} services, round {}/{rounds_of}: stopped after {:.0} s",
                            system.short(),
                            round + 1,
                            cfg.timeout_s
                        ));
                    }
                }
            }
        }
    }
    let rows = rows
        .into_values()
        .map(|mut row| {
            if row.system != System::Xlb {
                row.ratio_to_xlb = row
                    .rounds
                    .iter()
                    .zip(&row.seconds)
                    .filter_map(|(round, s)| Some(s / xlb_by_round.get(&(row.services, *round))?))
                    .collect();
            }
            row.summary = Summary::of(&row.seconds);
            row.ratio = Summary::of(&row.ratio_to_xlb);
            row
        })
        .collect();
    Ok(ColdResults {
        config: cfg.clone(),
        rows,
    })
}

/// A fresh datapath (fresh pins), then one timed `MapWriter::apply` of `n` services.
fn cold_xlb(n: usize, endpoints: usize, row: &mut ColdRow) -> Result<Option<f64>> {
    let desired = synth::desired(n, endpoints);
    let pin = PinDir::new()?;
    let started = Instant::now();
    let mut datapath = Datapath::load(pin.path())?;
    let mut writer = datapath.writer()?;
    writer.write_config(&synth::datapath_config())?;
    row.load_seconds.push(started.elapsed().as_secs_f64());
    let started = Instant::now();
    let cpu_started = process_cpu_seconds();
    let applied = writer.apply(&desired)?;
    let seconds = started.elapsed().as_secs_f64();
    row.cpu_seconds.push(process_cpu_seconds() - cpu_started);
    ensure!(
        // Each service: its port, and its ClusterIP's other ports (refused, S04).
        applied.sets_created == 2 * n && applied.frontends_written == 2 * n,
        "xlb programmed {} sets and {} frontends, not {} of each",
        applied.sets_created,
        applied.frontends_written,
        2 * n
    );
    row.map_ops = applied.map_ops;
    if row.verified.is_none() {
        // Read back through the operator's view of the pinned maps.
        let mut services = reader::services(pin.path())?;
        // Service ports only: kube-proxy's iptables layout has no rule for other ports.
        services.retain(|s| s.port != 0);
        let v = Verified {
            service_chains: services.len(),
            endpoint_chains: services.iter().map(|s| s.backends.len()).sum(),
        };
        ensure!(
            v.service_chains == n && v.endpoint_chains == n * endpoints,
            "xlb's maps hold {} frontends and {} backends, expected {n} and {}",
            v.service_chains,
            v.endpoint_chains,
            n * endpoints
        );
        row.verified = Some(v);
    }
    drop(writer);
    drop(datapath);
    Ok(Some(seconds))
}

/// CPU time of the process, user and kernel, s: the writer may compute Maglev tables on a
/// second thread while the first waits for the kernel.
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall writing one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// kube-proxy's first sync of `n` services, loaded by the real tool in a fresh namespace.
/// `None` when it ran out of time.
fn cold_baseline(
    system: System,
    n: usize,
    endpoints: usize,
    work: &WorkDir,
    timeout: Duration,
    verify: bool,
    row: &mut ColdRow,
) -> Result<Option<f64>> {
    let (tool, args, text): (&str, &[&str], String) = match system {
        System::Iptables => (
            "iptables-restore",
            &["--noflush", "--counters"],
            kube_proxy::iptables_sync(n, endpoints),
        ),
        System::Nftables => ("nft", &["-f", "-"], kube_proxy::nft_sync(n, endpoints)),
        System::Xlb => unreachable!("xlb is not a baseline"),
    };
    if !sys::tool_exists(tool) {
        bail!("{tool} is not installed (apt-get install -y iptables nftables)");
    }
    row.input_lines = text.lines().count();
    row.input_bytes = text.len();
    let input = work.path().join(format!("{}-{n}.rules", system.short()));
    std::fs::write(&input, &text).with_context(|| format!("writing {}", input.display()))?;
    drop(text);
    let netns = Netns::create()?;
    if system == System::Iptables {
        // kube-proxy's chains and jump rules exist before its first restore.
        let jumps = work.path().join("iptables-jumps.rules");
        std::fs::write(&jumps, kube_proxy::iptables_jumps())?;
        let log = work.path().join("iptables-jumps.log");
        let done = run_timed(
            netns.command("iptables-restore").arg("--noflush"),
            Some(&jumps),
            &log,
            Duration::from_secs(60),
        )?;
        if !done.success() {
            bail!(
                "iptables-restore of kube-proxy's jump rules failed: {}",
                sys::tail(&log, 5)
            );
        }
    }
    let log = work.path().join(format!("{}-{n}.log", system.short()));
    let done = run_timed(netns.command(tool).args(args), Some(&input), &log, timeout)?;
    let _ = std::fs::remove_file(&input);
    if done.timed_out {
        return Ok(None);
    }
    if !done.success() {
        bail!(
            "{tool} failed on kube-proxy's {} rules for {n} services (exit {:?}): {}",
            system.short(),
            done.code,
            sys::tail(&log, 8)
        );
    }
    if let Some(peak) = done.peak_rss_kib {
        row.loader_peak_rss_kib = Some(peak.max(row.loader_peak_rss_kib.unwrap_or(0)));
    }
    if verify {
        row.verified = Some(verify_loaded(system, &netns)?);
        let v = row.verified.as_ref().expect("just set");
        ensure!(
            v.service_chains == n && v.endpoint_chains == n * endpoints,
            "{} loaded {} service and {} endpoint chains, expected {n} and {}",
            system.short(),
            v.service_chains,
            v.endpoint_chains,
            n * endpoints
        );
    }
    Ok(Some(done.elapsed.as_secs_f64()))
}

/// Counts what the kernel now holds, read back with the tools' own listing commands.
fn verify_loaded(system: System, netns: &Netns) -> Result<Verified> {
    Ok(match system {
        System::Iptables => {
            let saved = netns.output("iptables-save", &["-t", "nat"])?;
            Verified {
                service_chains: saved
                    .lines()
                    .filter(|l| l.starts_with(":KUBE-SVC-"))
                    .count(),
                endpoint_chains: saved
                    .lines()
                    .filter(|l| l.starts_with(":KUBE-SEP-"))
                    .count(),
            }
        }
        System::Nftables => {
            let chains = netns.output("nft", &["list", "chains", "ip"])?;
            let named = |prefix: &str| {
                chains
                    .lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with(prefix) && l.contains('/'))
                    .count()
            };
            Verified {
                service_chains: named("chain service-"),
                endpoint_chains: named("chain endpoint-"),
            }
        }
        System::Xlb => bail!("not a baseline"),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencyConfig {
    pub services: usize,
    pub endpoints: usize,
    pub changes: usize,
}

/// The path from a changed EndpointSlice to the datapath serving it, without the source:
/// the agent's `ClusterView` re-plans the one service, then `MapWriter::apply_delta`
/// writes what changed.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyResults {
    pub config: LatencyConfig,
    /// Building the Kubernetes objects (not part of any measurement), s.
    pub build_objects_s: f64,
    /// First compute + apply of all services onto fresh maps, s.
    pub cold_compute_s: f64,
    pub cold_apply_s: f64,
    /// Per change, ms.
    pub total_ms: Vec<f64>,
    pub compute_ms: Vec<f64>,
    pub apply_ms: Vec<f64>,
    pub total: Option<Percentiles>,
    pub compute: Option<Percentiles>,
    pub apply: Option<Percentiles>,
    /// Map operations per change (median).
    pub map_ops_per_change: usize,
    pub memory: ProcessMemory,
    /// Memory the kernel charges for each map of this datapath (fdinfo `memlock`).
    pub maps: Vec<MapMemory>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessMemory {
    /// VmRSS of the bench process before the objects were built, after, and after the
    /// datapath was programmed, KiB.
    pub rss_start_kib: u64,
    pub rss_objects_kib: u64,
    pub rss_programmed_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub name: String,
    pub max_entries: u32,
    /// Created with BPF_F_NO_PREALLOC: entries are allocated as they are inserted, so the
    /// memory grows with them (the bucket array is sized for `max_entries` regardless).
    pub on_demand: bool,
    pub bytes: u64,
}

/// Loads `services` services, then replaces one endpoint of a random slice `changes` times,
/// timing compute + apply each time. Every change must update exactly one backend set.
pub fn latency(cfg: &LatencyConfig) -> Result<LatencyResults> {
    let (rss_start_kib, _) = sys::process_memory(None)?;
    say(format!(
        "latency: building {} Services and EndpointSlices ({} endpoints each)",
        cfg.services, cfg.endpoints
    ));
    let started = Instant::now();
    let mut cluster = synth::cluster(cfg.services, cfg.endpoints);
    let build_objects_s = started.elapsed().as_secs_f64();
    let (rss_objects_kib, _) = sys::process_memory(None)?;
    let node = synth::node();

    let pin = PinDir::new()?;
    let mut datapath = Datapath::load(pin.path())?;
    let mut writer = datapath.writer()?;
    writer.write_config(&synth::datapath_config())?;
    let started = Instant::now();
    let mut view = ClusterView::new(node);
    let cold = view.replace_all(&cluster);
    let cold_compute_s = started.elapsed().as_secs_f64();
    ensure!(
        cold.problems.is_empty(),
        "synthetic cluster has problems: {:?}",
        cold.problems
    );
    let started = Instant::now();
    writer.apply(view.state())?;
    let cold_apply_s = started.elapsed().as_secs_f64();
    let (rss_programmed_kib, _) = sys::process_memory(None)?;
    say(format!(
        "latency: {} services programmed (compute {cold_compute_s:.2} s, apply {cold_apply_s:.2} s); \
         timing {} endpoint changes",
        cfg.services, cfg.changes
    ));

    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let (mut total_ms, mut compute_ms, mut apply_ms, mut ops) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for c in 0..cfg.changes {
        if c % 50 == 0 {
            check_interrupt()?;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let slice = (rng % cfg.services as u64) as usize;
        let endpoint = (rng >> 32) as usize % cfg.endpoints;
        // A pod replaced by a new one: one address of one slice changes.
        let endpoints = cluster.endpoint_slices[slice]
            .endpoints
            .as_mut()
            .context("synthetic slice without endpoints")?;
        endpoints[endpoint].addresses = vec![synth::replacement_ip(c).to_string()];
        // What the watch delivers: the changed slice, already decoded.
        let event = ObjectChange::EndpointSlice(Box::new(cluster.endpoint_slices[slice].clone()));
        let t0 = Instant::now();
        let delta = view.apply([event]);
        let t1 = Instant::now();
        let applied = writer.apply_delta(view.state(), &delta)?;
        let t2 = Instant::now();
        ensure!(
            applied.sets_updated == 1 && applied.sets_created == 0 && applied.sets_deleted == 0,
            "change {c} was not exactly one backend-set update: {applied:?}"
        );
        compute_ms.push((t1 - t0).as_secs_f64() * 1e3);
        apply_ms.push((t2 - t1).as_secs_f64() * 1e3);
        total_ms.push((t2 - t0).as_secs_f64() * 1e3);
        ops.push(applied.map_ops);
    }
    ops.sort_unstable();
    let maps = map_memory(pin.path())?;
    drop(writer);
    drop(datapath);
    Ok(LatencyResults {
        config: cfg.clone(),
        build_objects_s,
        cold_compute_s,
        cold_apply_s,
        total: Percentiles::of(&total_ms),
        compute: Percentiles::of(&compute_ms),
        apply: Percentiles::of(&apply_ms),
        total_ms,
        compute_ms,
        apply_ms,
        map_ops_per_change: ops.get(ops.len() / 2).copied().unwrap_or(0),
        memory: ProcessMemory {
            rss_start_kib,
            rss_objects_kib,
            rss_programmed_kib,
        },
        maps,
    })
}

/// `memlock` of each pinned map of a datapath, from this process's fdinfo.
pub fn map_memory(pin: &Path) -> Result<Vec<MapMemory>> {
    let mut out = Vec::new();
    for name in map_name::ALL {
        let data = MapData::from_pin(pin.join(name))
            .with_context(|| format!("opening pinned map {name}"))?;
        let info = data.info()?;
        let fd = data.fd().as_fd().as_raw_fd();
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        out.push(MapMemory {
            name: name.to_string(),
            max_entries: info.max_entries(),
            on_demand: info.map_flags() & BPF_F_NO_PREALLOC != 0,
            bytes: fdinfo_field(&fdinfo, "memlock:").unwrap_or(0),
        });
    }
    Ok(out)
}

/// The kernel's flag for hash maps whose entries are allocated on insert.
const BPF_F_NO_PREALLOC: u32 = 1;

fn fdinfo_field(fdinfo: &str, name: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentConfig {
    pub services: usize,
    pub endpoints: usize,
    pub xlb: PathBuf,
    pub timeout_s: f64,
}

/// The real agent, `xlb run --manifests`, programming `services` services from cold.
#[derive(Clone, Debug, Serialize)]
pub struct AgentResults {
    pub config: AgentConfig,
    pub manifest_bytes: usize,
    /// From start to the ready file: load the programs, read and parse the manifests,
    /// compute, program, s.
    pub ready_s: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Distinct BPF maps the agent holds, and the memory the kernel charges for them.
    pub maps: usize,
    pub map_bytes: u64,
}

/// Writes the services as JSON Lists, starts `xlb run` in a namespace of our own (no
/// interface matches its `--pod-interface`, so it attaches nothing), waits for its ready file,
/// then reads its memory and its maps' memory from /proc.
pub fn agent(cfg: &AgentConfig) -> Result<AgentResults> {
    let work = WorkDir::new()?;
    let manifests = work.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    say(format!(
        "agent: writing manifests for {} services",
        cfg.services
    ));
    let cluster = synth::cluster(cfg.services, cfg.endpoints);
    let items = manifest_items(&cluster)?;
    drop(cluster);
    // Files of 2 000 objects (about 2 MiB): the agent reads no manifest file over
    // `MAX_MANIFEST_BYTES`, and kubectl-sized files are what an operator would have.
    let mut manifest_bytes = 0;
    for (i, chunk) in items.chunks(2000).enumerate() {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": chunk});
        let text = serde_json::to_vec(&list)?;
        ensure!(
            text.len() as u64 <= crate::source::manifests::MAX_MANIFEST_BYTES,
            "manifest chunk of {} bytes is over the agent's limit",
            text.len()
        );
        manifest_bytes += text.len();
        std::fs::write(manifests.join(format!("services-{i:04}.json")), &text)?;
    }
    drop(items);

    let netns = Netns::create()?;
    let pin = PinDir::new()?;
    let ready = work.path().join("ready");
    let log = work.path().join("xlb.log");
    let mut cmd = netns.command(&cfg.xlb.to_string_lossy());
    cmd.arg("run")
        .arg("--manifests")
        .arg(&manifests)
        .args(["--node-name", synth::NODE_NAME])
        .args(["--pod-interface", "xbench-none"])
        .args(["--node-ip", &synth::NODE_IP.to_string()])
        .args(["--cluster-cidr", &synth::CLUSTER_CIDR.to_string()])
        .arg("--pin-path")
        .arg(pin.path())
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log)?));
    say(format!(
        "agent: starting {} with {} services",
        cfg.xlb.display(),
        cfg.services
    ));
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", cfg.xlb.display()))?;
    let mut agent = AgentProcess(child);
    let deadline = started + Duration::from_secs_f64(cfg.timeout_s);
    loop {
        if ready.exists() {
            break;
        }
        if let Some(status) = agent.0.try_wait()? {
            bail!(
                "xlb run exited before it was ready ({status}): {}",
                sys::tail(&log, 10)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "xlb run was not ready after {:.0} s: {}",
                cfg.timeout_s,
                sys::tail(&log, 10)
            );
        }
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready_s = started.elapsed().as_secs_f64();
    // Ready means the first state is applied: it must be all of it.
    let programmed = reader::services(pin.path())?
        .iter()
        .filter(|row| row.port != 0)
        .count();
    ensure!(
        programmed >= cfg.services,
        "xlb run was ready with {programmed} service frontends, expected {}: {}",
        cfg.services,
        sys::tail(&log, 10)
    );
    let pid = agent.0.id();
    let (rss_kib, hwm_kib) = sys::process_memory(Some(pid))?;
    let (maps, map_bytes) = process_maps(pid)?;
    agent.stop();
    say(format!(
        "agent: ready in {ready_s:.2} s, RSS {:.0} MiB, {maps} maps {:.0} MiB",
        rss_kib as f64 / 1024.0,
        map_bytes as f64 / 1024.0 / 1024.0
    ));
    Ok(AgentResults {
        config: cfg.clone(),
        manifest_bytes,
        ready_s,
        rss_kib,
        hwm_kib,
        maps,
        map_bytes,
    })
}

/// The cluster's Services and EndpointSlices as manifest objects (with kind and apiVersion).
pub(crate) fn manifest_items(cluster: &ClusterState) -> Result<Vec<serde_json::Value>> {
    let mut items = Vec::new();
    for s in &cluster.services {
        items.push(with_kind(serde_json::to_value(s)?, "v1", "Service"));
    }
    for s in &cluster.endpoint_slices {
        items.push(with_kind(
            serde_json::to_value(s)?,
            "discovery.k8s.io/v1",
            "EndpointSlice",
        ));
    }
    Ok(items)
}

fn with_kind(mut value: serde_json::Value, api_version: &str, kind: &str) -> serde_json::Value {
    if let Some(object) = value.as_object_mut() {
        object.insert("apiVersion".into(), api_version.into());
        object.insert("kind".into(), kind.into());
    }
    value
}

/// The BPF maps a process holds (each counted once, by map id) and their `memlock`.
fn process_maps(pid: u32) -> Result<(usize, u64)> {
    let mut by_id: BTreeMap<u64, u64> = BTreeMap::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let (Some(id), Some(bytes)) = (
            fdinfo_field(&text, "map_id:"),
            fdinfo_field(&text, "memlock:"),
        ) {
            by_id.insert(id, bytes);
        }
    }
    Ok((by_id.len(), by_id.values().sum()))
}

/// Stops the agent on drop too (SIGTERM, then SIGKILL), so a failed step leaves no agent.
struct AgentProcess(Child);

impl AgentProcess {
    fn stop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signals our own child, which has not been reaped.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Used by tests: the `xlb` binary next to this executable, if there is one.
pub fn sibling_xlb() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join("xlb");
    candidate.is_file().then_some(candidate)
}
