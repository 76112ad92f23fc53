//! Part 4: restart cost. Under load through the ClusterIP — established connections each
//! running a TCP_RR loop, a loop of new connections (TCP_CRR) and a UDP request stream —
//! both nodes' agents are killed with SIGKILL and restarted, several times. Counted:
//! established connections broken, failed new connections, UDP requests unanswered, and
//! each restarted agent's time to ready.
use std::{
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context, Result};
use serde::Serialize;

use super::{
    cluster::{BenchCluster, Proxy},
    loadgen::{self, spawn_in_netns, TCP_TIMEOUT, UDP_TIMEOUT},
    say,
    stats::Summary,
    ENDPOINTS,
};

#[derive(Clone, Debug, Serialize)]
pub struct RestartConfig {
    pub services: usize,
    pub cycles: usize,
    /// Established connections, each in its own request loop.
    pub connections: usize,
    /// How long both agents stay dead per cycle, s.
    pub down_s: f64,
    /// Load before the first kill and after each restart, s.
    pub settle_s: f64,
    pub xlb: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestartResults {
    pub config: RestartConfig,
    pub connections_broken: usize,
    /// Request/response transactions on the established connections (all succeeded unless
    /// counted in `connections_broken`).
    pub established_transactions: u64,
    pub new_connections_ok: u64,
    pub new_connections_failed: u64,
    pub udp_sent: u64,
    pub udp_lost: u64,
    /// Each restarted agent: start to ready file, s.
    pub ready_s: Vec<f64>,
    pub ready: Option<Summary>,
    pub seconds: f64,
    /// What broke, one line each (empty when nothing did).
    pub failures: Vec<String>,
}

/// Pause between requests of each loop: about 1 000 requests/s per loop shows a gap of a
/// millisecond without keeping the (shared) cores busy.
const PACE: Duration = Duration::from_millis(1);

/// Transactions on one established connection, and why it broke (if it did).
type ConnectionLoop = JoinHandle<Result<(u64, Option<String>)>>;

struct Load {
    stop: Arc<AtomicBool>,
    rr: Vec<ConnectionLoop>,
    crr: JoinHandle<Result<(u64, u64, Option<String>)>>,
    udp: JoinHandle<Result<(u64, u64)>>,
}

fn start_load(netns: &str, vip: SocketAddrV4, connections: usize) -> Result<Load> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut rr = Vec::new();
    for _ in 0..connections {
        let stop = stop.clone();
        rr.push(spawn_in_netns(netns, move || {
            let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(vip), TCP_TIMEOUT)?;
            conn.set_nodelay(true)?;
            conn.set_read_timeout(Some(TCP_TIMEOUT))?;
            conn.set_write_timeout(Some(TCP_TIMEOUT))?;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = loadgen::transact(&mut conn) {
                    return Ok((n, Some(format!("established connection broke: {e}"))));
                }
                n += 1;
                std::thread::sleep(PACE);
            }
            Ok((n, None))
        })?);
    }
    let crr = {
        let stop = stop.clone();
        spawn_in_netns(netns, move || {
            let (mut ok, mut failed, mut last) = (0, 0, None);
            while !stop.load(Ordering::Relaxed) {
                let r = TcpStream::connect_timeout(&SocketAddr::V4(vip), TCP_TIMEOUT).and_then(
                    |mut c| {
                        c.set_read_timeout(Some(TCP_TIMEOUT))?;
                        loadgen::transact(&mut c)
                    },
                );
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        last = Some(format!("new connection failed: {e}"));
                    }
                }
                std::thread::sleep(PACE);
            }
            Ok((ok, failed, last))
        })?
    };
    let udp = {
        let stop = stop.clone();
        spawn_in_netns(netns, move || {
            let sock = UdpSocket::bind(("0.0.0.0", 0))?;
            sock.connect(vip)?;
            sock.set_read_timeout(Some(UDP_TIMEOUT))?;
            let (mut sent, mut lost) = (0, 0);
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                sock.send(b"u")?;
                sent += 1;
                if sock.recv(&mut buf).is_err() {
                    lost += 1;
                }
                std::thread::sleep(PACE);
            }
            Ok((sent, lost))
        })?
    };
    Ok(Load { stop, rr, crr, udp })
}

pub fn run(cfg: &RestartConfig) -> Result<RestartResults> {
    ensure!(
        cfg.xlb.is_some(),
        "the restart measurement needs the xlb binary"
    );
    let mut c = BenchCluster::start(Proxy::XlbXdp, cfg.services, ENDPOINTS, cfg.xlb.as_deref())?;
    let vip = c.service_target();
    let started = Instant::now();
    let load = start_load(&c.client_netns(), vip, cfg.connections)?;
    let settle = Duration::from_secs_f64(cfg.settle_s);
    std::thread::sleep(settle);
    let mut ready_s = Vec::new();
    let mut outcome = Ok(());
    for cycle in 1..=cfg.cycles {
        let step = (|| -> Result<()> {
            for node in BenchCluster::nodes() {
                c.kill_agent(node)?;
            }
            // The datapath serves from the pinned maps and links meanwhile.
            std::thread::sleep(Duration::from_secs_f64(cfg.down_s));
            for node in BenchCluster::nodes() {
                let took = c
                    .start_agent(node)
                    .with_context(|| format!("restart {cycle} on {node}"))?;
                ready_s.push(took.as_secs_f64());
            }
            std::thread::sleep(settle);
            Ok(())
        })();
        if step.is_err() {
            outcome = step;
            break;
        }
        say(format!("part 4: restart cycle {cycle}/{} done", cfg.cycles));
    }
    load.stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let (mut established_transactions, mut connections_broken) = (0, 0);
    for h in load.rr {
        let (n, broke) = h.join().map_err(|_| anyhow!("request loop panicked"))??;
        established_transactions += n;
        if let Some(why) = broke {
            connections_broken += 1;
            failures.push(why);
        }
    }
    let (new_connections_ok, new_connections_failed, last) = load
        .crr
        .join()
        .map_err(|_| anyhow!("connection loop panicked"))??;
    failures.extend(last);
    let (udp_sent, udp_lost) = load
        .udp
        .join()
        .map_err(|_| anyhow!("UDP loop panicked"))??;
    outcome?;
    let seconds = started.elapsed().as_secs_f64();
    say(format!(
        "part 4: {connections_broken} of {} connections broken, {new_connections_failed} of {} \
         new connections failed, {udp_lost} of {udp_sent} UDP requests lost",
        cfg.connections,
        new_connections_ok + new_connections_failed
    ));
    Ok(RestartResults {
        config: cfg.clone(),
        connections_broken,
        established_transactions,
        new_connections_ok,
        new_connections_failed,
        udp_sent,
        udp_lost,
        ready: Summary::of(&ready_s),
        ready_s,
        seconds,
        failures,
    })
}
