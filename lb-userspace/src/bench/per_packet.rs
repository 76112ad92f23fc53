//! Part 1: what the datapath costs per packet, through BPF_PROG_TEST_RUN on the real
//! programs, with 1 to 100 000 services of 10 backends programmed by the agent's own writer.
//!
//! Packet kinds:
//! - `floor`: the parse-only XDP program `xlb_floor` on the established packet;
//! - `established` / `reply`: a tracked flow's next packet, each direction. BPF_PROG_TEST_RUN
//!   rewrites the packet in place between repetitions, so a tracked packet would turn into
//!   its translation after one run. Two bench frontends point at each other (A:80 -> B:8080,
//!   B:8080 -> A:80): the datapath itself tracks both flows on a warm-up (ACK segments:
//!   resumed connections, promoted once their replies passed too), and from then on every
//!   repetition is a conntrack hit with a full rewrite (address, port, checksums),
//!   alternating between the two entries;
//! - `miss`: a TCP data segment to an address that is no frontend and no tracked reply
//!   (passed untouched): pod-to-pod and node traffic;
//! - `miss, SYN`: the same with a SYN, which also looks for a stale reply entry (port reuse
//!   by a direct connection, docs/datapath.md);
//! - `new flow (chain)`: a chain of 64 bench frontends, each one's backend the next one's
//!   frontend, so that the 64 repetitions of one call are 64 new flows in a row (a fresh
//!   client port each call): the cost of a new flow with warm caches;
//! - `new flow, 1 run/call`: first packets of distinct flows to services drawn at random
//!   among all `n`, one run per BPF_PROG_TEST_RUN call: the lookups land anywhere in the big
//!   maps and the syscall between runs leaves the caches cold. `floor, 1 run/call` is
//!   measured the same way and is its reference (both include the kernel's clock reads).
//!
//! Repeated kinds report the calling thread's CPU time per run, from two calls (1 run and
//! `repeat` runs) so that the per-call setup cancels out; the kernel's own average (whole ns)
//! is kept in the JSON. One-run kinds report the median of the kernel's per-call durations
//! (the mean is in the JSON). Every call's verdict and the datapath's per-reason counters are
//! checked: a measurement of the wrong code path is an error, not a number.
//!
//! Everything runs on one thread that first moves into a fresh network namespace
//! (unshare(CLONE_NEWNET)): there the TC program's FIB lookup finds no route and the packet
//! falls back to the stack (TC_ACT_OK) instead of being redirected, deterministically. The
//! TC figures therefore exclude bpf_redirect_neigh.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_common::stat;
use serde::Serialize;

use super::{
    control::{map_memory, MapMemory},
    packets::{tcp_frame, TCP_ACK, TCP_PSH, TCP_SYN},
    say,
    stats::Summary,
    synth,
    sys::{check_interrupt, thread_cpu_ns, PinDir},
};
use crate::datapath::{reader, Datapath, MapWriter, UplinkMode};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// The two bench frontends that translate into each other (see the module docs).
const PAIR_A: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 111, 255, 1), 80);
const PAIR_B: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 111, 255, 2), 8080);
const CYCLE_CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 255, 254), 40000);
const MISS_CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 255, 254), 40001);
/// A pod address: no frontend, no tracked flow.
const MISS_DEST: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 100, 100), 80);
/// The chain's frontends, 10.111.254.1 ... ; the last one's backend is this pod.
const CHAIN_BASE: [u8; 4] = [10, 111, 254, 1];
const CHAIN_LEN: u32 = 64;
const CHAIN_END: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 100, 101), 8080);
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
/// Calls per round of each repeated kind; the round's value is their median.
const CALLS: u32 = 3;

#[derive(Clone, Debug, Serialize)]
pub struct PerPacketConfig {
    /// Numbers of synthetic services (each datapath also holds the bench frontends: 2 for
    /// the established/reply cycle, 64 for the new-flow chain).
    pub sizes: Vec<usize>,
    pub endpoints: usize,
    pub rounds: usize,
    /// BPF_PROG_TEST_RUN repetitions per call for the repeated kinds.
    pub repeat: u32,
    /// Calls (distinct packets) per round for the one-run kinds.
    pub distinct: u32,
    /// Calls per round through the 64-frontend chain.
    pub chain_calls: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    Xdp,
    Tc,
}

impl Program {
    pub fn label(self) -> &'static str {
        match self {
            Program::Xdp => "XDP (xlb_xdp)",
            Program::Tc => "TC (xlb_tc)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Floor,
    Established,
    Reply,
    Miss,
    MissSyn,
    NewChain,
    FloorOneRun,
    New,
}

impl Kind {
    /// In report order.
    pub const ALL: [Kind; 8] = [
        Kind::Floor,
        Kind::Established,
        Kind::Reply,
        Kind::Miss,
        Kind::MissSyn,
        Kind::NewChain,
        Kind::FloorOneRun,
        Kind::New,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Floor => "floor (parse only)",
            Kind::Established => "established flow",
            Kind::Reply => "reply (reverse NAT)",
            Kind::Miss => "miss (no service)",
            Kind::MissSyn => "miss, SYN (no service)",
            Kind::NewChain => "new flow (warm, chain)",
            Kind::FloorOneRun => "floor, 1 run/call",
            Kind::New => "new flow, 1 run/call (cold, random service)",
        }
    }

    /// The floors are XDP programs; the TC tables show them for reference.
    pub fn is_floor(self) -> bool {
        matches!(self, Kind::Floor | Kind::FloorOneRun)
    }

    /// The floor this kind is compared with.
    pub fn floor(self) -> Kind {
        if matches!(self, Kind::FloorOneRun | Kind::New) {
            Kind::FloorOneRun
        } else {
            Kind::Floor
        }
    }
}

/// One (program, kind, number of services): a value per round.
#[derive(Clone, Debug, Serialize)]
pub struct PacketRow {
    pub program: Program,
    pub kind: Kind,
    pub services: usize,
    /// ns per packet, one per round (see the module docs for how each kind is timed).
    pub ns: Vec<f64>,
    /// The kernel's figure, one per round: its average over the `repeat` runs of a call
    /// (whole ns) for repeated kinds, the mean of the per-call durations for the others.
    pub kernel_ns: Vec<f64>,
    /// ns / the floor's ns of the same round and datapath.
    pub ratio_to_floor: Vec<f64>,
    pub summary: Option<Summary>,
    pub ratio: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DatapathSetup {
    pub services: usize,
    pub load_s: f64,
    pub apply_s: f64,
    pub map_ops: usize,
    /// The maps' memory once programmed.
    pub maps: Vec<MapMemory>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PerPacketResults {
    pub config: PerPacketConfig,
    pub setups: Vec<DatapathSetup>,
    pub rows: Vec<PacketRow>,
}

impl PerPacketResults {
    /// The row of `kind` as shown for `program` (floors come from the XDP floor program).
    pub fn row(&self, program: Program, kind: Kind, services: usize) -> Option<&PacketRow> {
        let program = if kind.is_floor() {
            Program::Xdp
        } else {
            program
        };
        self.rows
            .iter()
            .find(|r| r.program == program && r.kind == kind && r.services == services)
    }

    /// Per-round ratio of the cost at `large` services to the cost at `small`.
    pub fn scaling(
        &self,
        program: Program,
        kind: Kind,
        small: usize,
        large: usize,
    ) -> Option<Summary> {
        let a = self.row(program, kind, small)?;
        let b = self.row(program, kind, large)?;
        let ratios: Vec<f64> = a.ns.iter().zip(&b.ns).map(|(a, b)| b / a).collect();
        Summary::of(&ratios)
    }
}

/// Runs part 1 on a thread of its own in a fresh network namespace.
pub fn run(cfg: &PerPacketConfig) -> Result<PerPacketResults> {
    let cfg = cfg.clone();
    let thread = std::thread::Builder::new()
        .name("bench-per-packet".into())
        .spawn(move || -> Result<PerPacketResults> {
            // SAFETY: unshare only affects the calling thread, which is ours alone.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            }
            measure(&cfg)
        })
        .context("starting the per-packet thread")?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Creates a veth pair `name` / `name`p in the calling thread's network namespace.
fn veth_here(name: &str) -> Result<()> {
    // SAFETY: plain syscall.
    let tid = unsafe { libc::gettid() };
    let out = std::process::Command::new("nsenter")
        .arg(format!(
            "--net=/proc/{}/task/{tid}/ns/net",
            std::process::id()
        ))
        .args([
            "--", "ip", "link", "add", name, "type", "veth", "peer", "name",
        ])
        .arg(format!("{name}p"))
        .output()
        .context("running nsenter ip link add")?;
    ensure!(
        out.status.success(),
        "ip link add {name}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn chain_frontend(k: u32) -> (Ipv4Addr, u16) {
    let addr = Ipv4Addr::from(u32::from_be_bytes(CHAIN_BASE) + k);
    // Alternate the port too, so that every hop rewrites address and port like a DNAT.
    (addr, if k.is_multiple_of(2) { 80 } else { 8080 })
}

/// One datapath with `services` synthetic services and the bench frontends, warmed up.
struct Loaded {
    services: usize,
    // Field order is drop order: programs and map fds go before the pins are removed.
    datapath: Datapath,
    _writer: MapWriter,
    pin: PinDir,
}

impl Loaded {
    fn new(services: usize, endpoints: usize) -> Result<(Self, DatapathSetup)> {
        let pin = PinDir::new()?;
        let started = Instant::now();
        let mut datapath = Datapath::load(pin.path())?;
        let mut writer = datapath.writer()?;
        let load_s = started.elapsed().as_secs_f64();
        writer.write_config(&synth::datapath_config())?;
        let mut desired = synth::desired(services, endpoints);
        synth::add_service(&mut desired, "bench/pair-a:80/TCP", PAIR_A, PAIR_B);
        synth::add_service(&mut desired, "bench/pair-b:8080/TCP", PAIR_B, PAIR_A);
        for k in 0..CHAIN_LEN {
            let next = if k + 1 < CHAIN_LEN {
                chain_frontend(k + 1)
            } else {
                CHAIN_END
            };
            synth::add_service(
                &mut desired,
                &format!("bench/chain-{k}:http/TCP"),
                chain_frontend(k),
                next,
            );
        }
        let started = Instant::now();
        let applied = writer.apply(&desired)?;
        let apply_s = started.elapsed().as_secs_f64();
        let loaded = Self {
            services,
            datapath,
            _writer: writer,
            pin,
        };
        // Warm-up: the first run tracks client -> A (to B), the second client -> B (to A).
        // The bench packets carry no SYN: the flows are tracked as resumed connections
        // (and counted as such), embryonic until the backend answered and the client sent
        // again. So the reply packet runs twice (B -> client becomes A -> client, the other
        // flow's reply), then the client's packet twice more: both flows established.
        let before = counters(loaded.pin.path())?;
        loaded.call(Prog::Xdp, &established_packet(), 2)?;
        loaded.call(Prog::Xdp, &reply_packet(), 2)?;
        loaded.call(Prog::Xdp, &established_packet(), 2)?;
        let tracked = moved(&before, &counters(loaded.pin.path())?);
        let expected = [
            (stat::NAMES[stat::CT_NEW_WITHOUT_SYN as usize], 2),
            (stat::NAMES[stat::CT_PROMOTED as usize], 2),
            (stat::NAMES[stat::FORWARD_ESTABLISHED as usize], 2),
            (stat::NAMES[stat::FORWARD_NEW as usize], 2),
            (stat::NAMES[stat::REVERSE_NAT as usize], 2),
        ];
        ensure!(
            tracked == expected,
            "warming up the established/reply cycle: counters moved: {}",
            describe(&tracked)
        );
        let maps = map_memory(loaded.pin.path())?;
        Ok((
            loaded,
            DatapathSetup {
                services,
                load_s,
                apply_s,
                map_ops: applied.map_ops,
                maps,
            },
        ))
    }

    fn pin_path(&self) -> &Path {
        self.pin.path()
    }

    fn call(&self, program: Prog, data: &[u8], repeat: u32) -> Result<Call> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(data);
        opts.repeat = repeat;
        let cpu_before = thread_cpu_ns();
        let result = match program {
            Prog::Floor => self.datapath.floor_program()?.test_run(opts),
            Prog::Xdp => self.datapath.xdp_program()?.test_run(opts),
            Prog::Tc => self.datapath.tc_program()?.test_run(opts),
        }
        .context("BPF_PROG_TEST_RUN")?;
        let cpu_ns = thread_cpu_ns() - cpu_before;
        let expected = match program {
            Prog::Floor | Prog::Xdp => XDP_PASS,
            Prog::Tc => TC_ACT_OK,
        };
        ensure!(
            result.return_value == expected,
            "{program:?} returned {} (expected {expected}) with {} services",
            result.return_value,
            self.services
        );
        Ok(Call {
            kernel_ns: result.duration.as_nanos() as f64,
            cpu_ns: cpu_ns as f64,
        })
    }

    /// CPU ns per run of `data`: the median over `calls` calls of `repeat` runs, each net of
    /// the per-call cost (one 1-run call, subtracted). Checks that every run was counted
    /// under `reason` (the floor counts nothing).
    fn repeated(
        &self,
        program: Prog,
        data: &[u8],
        repeat: u32,
        calls: u32,
        reason: Option<u32>,
    ) -> Result<Repeated> {
        let before = counters(self.pin_path())?;
        let one = self.call(program, data, 1)?;
        let mut per_run = Vec::new();
        let mut kernel = Vec::new();
        for _ in 0..calls {
            let many = self.call(program, data, repeat)?;
            per_run.push((many.cpu_ns - one.cpu_ns) / f64::from(repeat - 1));
            kernel.push(many.kernel_ns);
        }
        let after = counters(self.pin_path())?;
        let runs = 1 + u64::from(calls) * u64::from(repeat);
        match reason {
            Some(reason) => check_counted(&before, &after, reason, runs),
            None => check_counted_nothing(&before, &after),
        }
        .with_context(|| format!("{program:?} with {} services", self.services))?;
        let median = |v: &[f64]| Summary::of(v).map_or(f64::NAN, |s| s.median);
        Ok(Repeated {
            ns: median(&per_run),
            kernel_ns: median(&kernel),
        })
    }

    /// Median and mean of the kernel's durations of single runs, one call per packet;
    /// checks that `count` runs were counted under `reason`.
    fn one_run_each<'a>(
        &self,
        program: Prog,
        packets: impl Iterator<Item = &'a [u8]>,
        repeat: u32,
        reason: Option<u32>,
    ) -> Result<Repeated> {
        let before = counters(self.pin_path())?;
        let mut durations = Vec::new();
        for p in packets {
            durations.push(self.call(program, p, repeat)?.kernel_ns);
        }
        let after = counters(self.pin_path())?;
        let runs = durations.len() as u64 * u64::from(repeat);
        match reason {
            Some(reason) => check_counted(&before, &after, reason, runs),
            None => check_counted_nothing(&before, &after),
        }
        .with_context(|| format!("{program:?} with {} services", self.services))?;
        let mean = durations.iter().sum::<f64>() / durations.len().max(1) as f64;
        let median = Summary::of(&durations).map_or(f64::NAN, |s| s.median);
        Ok(Repeated {
            ns: median,
            kernel_ns: mean,
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Prog {
    Floor,
    Xdp,
    Tc,
}

fn prog(program: Program) -> Prog {
    match program {
        Program::Xdp => Prog::Xdp,
        Program::Tc => Prog::Tc,
    }
}

struct Call {
    kernel_ns: f64,
    cpu_ns: f64,
}

struct Repeated {
    ns: f64,
    kernel_ns: f64,
}

fn counters(pin: &Path) -> Result<BTreeMap<&'static str, u64>> {
    reader::stats(pin).context("reading the verdict counters")
}

fn moved(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> Vec<(&'static str, u64)> {
    after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d != 0)
        .collect()
}

fn describe(moved: &[(&str, u64)]) -> String {
    if moved.is_empty() {
        return "none".into();
    }
    moved
        .iter()
        .map(|(k, d)| format!("{k} +{d}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Exactly `count` packets were counted, all under `reason`.
fn check_counted(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
    reason: u32,
    count: u64,
) -> Result<()> {
    let name = stat::NAMES[reason as usize];
    let moved = moved(before, after);
    if moved != [(name, count)] {
        bail!(
            "expected {count} packets counted as {name}; counters moved: {}",
            describe(&moved)
        );
    }
    Ok(())
}

fn check_counted_nothing(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> Result<()> {
    let moved = moved(before, after);
    if !moved.is_empty() {
        bail!("the floor moved counters: {}", describe(&moved));
    }
    Ok(())
}

fn established_packet() -> Vec<u8> {
    tcp_frame(CYCLE_CLIENT, PAIR_A, TCP_ACK | TCP_PSH, PAYLOAD)
}

fn reply_packet() -> Vec<u8> {
    tcp_frame(PAIR_B, CYCLE_CLIENT, TCP_ACK | TCP_PSH, PAYLOAD)
}

fn miss_packet() -> Vec<u8> {
    tcp_frame(MISS_CLIENT, MISS_DEST, TCP_ACK | TCP_PSH, PAYLOAD)
}

fn miss_syn_packet() -> Vec<u8> {
    tcp_frame(MISS_CLIENT, MISS_DEST, TCP_SYN, &[])
}

/// Distinct clients: client `c` is 10.244.200.0 + c / 60 000, port 1024 + c mod 60 000, so
/// no flow is ever new twice. Services are drawn from a fixed-seed generator.
struct Clients {
    next: u32,
    rng: u64,
}

impl Clients {
    fn next(&mut self) -> (Ipv4Addr, u16) {
        let c = self.next;
        self.next += 1;
        (
            Ipv4Addr::from(u32::from_be_bytes([10, 244, 200, 0]) + c / 60_000),
            1024 + (c % 60_000) as u16,
        )
    }

    /// A first packet to a random one of `services` synthetic services.
    fn new_flow(&mut self, services: usize) -> Vec<u8> {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let service = (r % services as u64) as usize;
        let client = self.next();
        tcp_frame(
            client,
            (synth::cluster_ip(service), synth::SERVICE_PORT),
            TCP_SYN,
            &[],
        )
    }

    /// A first packet into the chain.
    fn chain(&mut self) -> Vec<u8> {
        let client = self.next();
        tcp_frame(client, chain_frontend(0), TCP_SYN, &[])
    }
}

type Key = (Program, Kind, usize);

#[derive(Default)]
struct Samples {
    ns: Vec<f64>,
    kernel_ns: Vec<f64>,
}

fn measure(cfg: &PerPacketConfig) -> Result<PerPacketResults> {
    ensure!(
        !cfg.sizes.is_empty()
            && cfg.rounds > 0
            && cfg.repeat > 1
            && cfg.distinct > 0
            && cfg.chain_calls > 0,
        "empty per-packet configuration"
    );
    let mut loaded = Vec::new();
    let mut setups = Vec::new();
    for (i, &n) in cfg.sizes.iter().enumerate() {
        check_interrupt()?;
        say(format!(
            "per-packet: loading a datapath with {n} services x {} backends",
            cfg.endpoints
        ));
        let (mut l, setup) = Loaded::new(n, cfg.endpoints)?;
        // BPF_PROG_TEST_RUN puts an XDP program into the kernel's XDP dispatcher for the
        // duration of each call, unless it is there already. That re-patches kernel text
        // on every call, and the TLB flush that comes with it made the map accesses of the
        // next runs several times slower (a new flow: about 3 µs instead of 1 µs). Attached
        // to an interface of this private namespace, as on a node, the program stays in
        // the dispatcher and each call runs like production XDP.
        let iface = format!("xbench{i}");
        veth_here(&iface)?;
        l.datapath
            .attach_uplink(&iface, UplinkMode::Xdp)
            .with_context(|| format!("attaching XDP to {iface}"))?;
        say(format!(
            "per-packet:   loaded in {:.2} s, programmed in {:.2} s ({} map operations)",
            setup.load_s, setup.apply_s, setup.map_ops
        ));
        loaded.push(l);
        setups.push(setup);
    }

    let established = established_packet();
    let reply = reply_packet();
    let miss = miss_packet();
    let miss_syn = miss_syn_packet();
    let mut clients = Clients {
        next: 0,
        rng: 0x9e37_79b9_7f4a_7c15,
    };
    let mut samples: BTreeMap<Key, Samples> = BTreeMap::new();
    let mut push = |key: Key, m: Repeated| {
        let s = samples.entry(key).or_default();
        s.ns.push(m.ns);
        s.kernel_ns.push(m.kernel_ns);
    };
    for round in 0..cfg.rounds {
        let started = Instant::now();
        // Alternate the order of the datapaths, so drift during a round favours none.
        let mut order: Vec<&Loaded> = loaded.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for l in order {
            check_interrupt()?;
            let n = l.services;
            push(
                (Program::Xdp, Kind::Floor, n),
                l.repeated(Prog::Floor, &established, cfg.repeat, CALLS, None)?,
            );
            push(
                (Program::Xdp, Kind::FloorOneRun, n),
                l.one_run_each(
                    Prog::Floor,
                    (0..cfg.distinct).map(|_| established.as_slice()),
                    1,
                    None,
                )?,
            );
            for program in [Program::Xdp, Program::Tc] {
                let p = prog(program);
                for (kind, data, reason) in [
                    (Kind::Established, &established, stat::FORWARD_ESTABLISHED),
                    (Kind::Reply, &reply, stat::REVERSE_NAT),
                    (Kind::Miss, &miss, stat::PASS_NO_SERVICE),
                    (Kind::MissSyn, &miss_syn, stat::PASS_NO_SERVICE),
                ] {
                    push(
                        (program, kind, n),
                        l.repeated(p, data, cfg.repeat, CALLS, Some(reason))?,
                    );
                }
                let chain: Vec<Vec<u8>> = (0..cfg.chain_calls).map(|_| clients.chain()).collect();
                let m = l.one_run_each(
                    p,
                    chain.iter().map(Vec::as_slice),
                    CHAIN_LEN,
                    Some(stat::FORWARD_NEW),
                )?;
                push((program, Kind::NewChain, n), m);
                let fresh: Vec<Vec<u8>> = (0..cfg.distinct).map(|_| clients.new_flow(n)).collect();
                let m = l.one_run_each(
                    p,
                    fresh.iter().map(Vec::as_slice),
                    1,
                    Some(stat::FORWARD_NEW),
                )?;
                push((program, Kind::New, n), m);
            }
        }
        say(format!(
            "per-packet: round {}/{} done in {:.1} s",
            round + 1,
            cfg.rounds,
            started.elapsed().as_secs_f64()
        ));
    }

    let mut rows = Vec::new();
    for ((program, kind, n), s) in &samples {
        let floor = samples
            .get(&(Program::Xdp, kind.floor(), *n))
            .ok_or_else(|| anyhow!("no floor measured for {n} services"))?;
        let ratio: Vec<f64> = s.ns.iter().zip(&floor.ns).map(|(v, f)| v / f).collect();
        rows.push(PacketRow {
            program: *program,
            kind: *kind,
            services: *n,
            summary: Summary::of(&s.ns),
            ratio: Summary::of(&ratio),
            ns: s.ns.clone(),
            kernel_ns: s.kernel_ns.clone(),
            ratio_to_floor: ratio,
        });
    }
    let pins: Vec<PathBuf> = loaded.iter().map(|l| l.pin_path().to_path_buf()).collect();
    drop(loaded);
    for pin in pins {
        ensure!(!pin.exists(), "pin directory {} left behind", pin.display());
    }
    Ok(PerPacketResults {
        config: cfg.clone(),
        setups,
        rows,
    })
}
