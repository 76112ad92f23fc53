//! The built-in load generator of the traffic benchmarks (netperf is not installed here):
//! netperf's test semantics with std::net sockets on threads that joined a namespace.
//!
//! - TCP_RR: one connection, 1-byte request, 1-byte response, back to back; transactions/s.
//! - TCP_CRR: connect, 1-byte request, 1-byte response, close (the client closes first, as
//!   netperf's does); transactions/s.
//! - TCP_STREAM: one connection, 64 KiB writes for the whole run; Gbit/s received.
//! - UDP_RR: one connected socket, 1-byte datagram, 1-byte answer; transactions/s (a request
//!   unanswered after [`UDP_TIMEOUT`] counts as lost and the next one is sent).
//!
//! One server process-wide per namespace ([`Server`]) answers all four on one port: a TCP
//! connection whose first byte is `s` is a stream (read and discarded); any other byte is
//! echoed, and so is everything after it; UDP datagrams are echoed.
use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

/// Lost-datagram timeout of UDP_RR.
pub const UDP_TIMEOUT: Duration = Duration::from_millis(200);
/// Connect and read timeout of the TCP tests: a transaction slower than this is an error.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(2);
/// Threads accepting (and then serving, one connection at a time) per server: the clients of
/// the throughput tests are serial, the restart test holds a few connections at once.
const ACCEPTORS: usize = 8;
const STREAM_CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Test {
    TcpRr,
    TcpCrr,
    TcpStream,
    UdpRr,
}

impl Test {
    pub const ALL: [Test; 4] = [Test::TcpRr, Test::TcpCrr, Test::TcpStream, Test::UdpRr];

    pub fn label(self) -> &'static str {
        match self {
            Test::TcpRr => "TCP_RR",
            Test::TcpCrr => "TCP_CRR",
            Test::TcpStream => "TCP_STREAM",
            Test::UdpRr => "UDP_RR",
        }
    }

    /// Unit of [`Outcome::rate`].
    pub fn unit(self) -> &'static str {
        match self {
            Test::TcpStream => "Gbit/s",
            _ => "trans/s",
        }
    }
}

/// What one client run did.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Outcome {
    pub seconds: f64,
    /// Completed transactions (RR, CRR, UDP_RR) or bytes written (STREAM).
    pub count: u64,
    /// Failed connects, reads or writes (TCP), unanswered requests (UDP).
    pub errors: u64,
}

impl Outcome {
    /// Transactions/s, or Gbit/s for a stream.
    pub fn rate(&self, test: Test) -> f64 {
        match test {
            Test::TcpStream => self.count as f64 * 8.0 / self.seconds / 1e9,
            _ => self.count as f64 / self.seconds,
        }
    }
}

/// Runs `f` on a new thread that joined the network namespace `/run/netns/{netns}`: sockets
/// it creates (and threads it spawns) live there.
pub fn spawn_in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let path = Path::new("/run/netns").join(netns);
    let ns = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: plain syscall on a valid fd; it switches only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns({})", path.display()));
        }
        drop(ns);
        f()
    }))
}

/// [`spawn_in_netns`] and wait for it.
pub fn run_in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    spawn_in_netns(netns, f)?
        .join()
        .map_err(|_| anyhow!("thread in {netns} panicked"))?
}

/// The echo/sink server, listening on `0.0.0.0:port` (TCP and UDP) in a namespace. Stopped
/// on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(netns: &str, port: u16) -> Result<Server> {
        let (listener, udp) = run_in_netns(netns, move || {
            let tcp = TcpListener::bind(("0.0.0.0", port)).context("binding the TCP server")?;
            let udp = UdpSocket::bind(("0.0.0.0", port)).context("binding the UDP server")?;
            Ok((tcp, udp))
        })?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..ACCEPTORS {
            let (listener, stop) = (listener.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((conn, _)) = listener.accept() {
                        serve_tcp(conn);
                    }
                }
            }));
        }
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let udp_stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        }));
        Ok(Server {
            stop,
            listener,
            threads,
        })
    }
}

fn serve_tcp(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    // A client that vanished (the restart test's, when a connection breaks) must not hold
    // an acceptor forever.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
    let mut buf = vec![0u8; STREAM_CHUNK];
    let Ok(n) = conn.read(&mut buf) else { return };
    if n == 0 {
        return;
    }
    if buf[0] == b's' {
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        return;
    }
    let mut pending = n;
    loop {
        if conn.write_all(&buf[..pending]).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(n) if n > 0 => pending = n,
            _ => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes every thread blocked in accept() (Linux returns EINVAL to them).
        // SAFETY: shutdown(2) on a socket we own; it stays open until the Arc drops.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sets what the CRR client needs in its namespace: the whole port range and reuse of
/// TIME_WAIT ports for new connections (netperf's CRR runs would otherwise exhaust ports).
pub fn prepare_client_netns(netns: &str) -> Result<()> {
    run_in_netns(netns, || {
        for (key, value) in [
            ("net/ipv4/ip_local_port_range", "1024 60999"),
            ("net/ipv4/tcp_tw_reuse", "1"),
        ] {
            std::fs::write(Path::new("/proc/sys").join(key), value)
                .with_context(|| format!("setting {key}"))?;
        }
        Ok(())
    })
}

/// Runs `test` against `target` from `netns` for `duration`.
pub fn run(netns: &str, test: Test, target: SocketAddrV4, duration: Duration) -> Result<Outcome> {
    run_in_netns(netns, move || match test {
        Test::TcpRr => tcp_rr(target, duration),
        Test::TcpCrr => tcp_crr(target, duration),
        Test::TcpStream => tcp_stream(target, duration),
        Test::UdpRr => udp_rr(target, duration),
    })
}

fn connect(target: SocketAddrV4) -> std::io::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&SocketAddr::V4(target), TCP_TIMEOUT)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(TCP_TIMEOUT))?;
    conn.set_write_timeout(Some(TCP_TIMEOUT))?;
    Ok(conn)
}

/// One 1-byte request and its 1-byte response.
pub fn transact(conn: &mut TcpStream) -> std::io::Result<()> {
    conn.write_all(b"r")?;
    let mut b = [0u8; 1];
    conn.read_exact(&mut b)
}

fn tcp_rr(target: SocketAddrV4, duration: Duration) -> Result<Outcome> {
    let mut conn = connect(target).with_context(|| format!("TCP_RR: connecting to {target}"))?;
    let started = Instant::now();
    let mut count = 0;
    while started.elapsed() < duration {
        transact(&mut conn).with_context(|| format!("TCP_RR to {target}"))?;
        count += 1;
    }
    Ok(Outcome {
        seconds: started.elapsed().as_secs_f64(),
        count,
        errors: 0,
    })
}

/// Gives up after this many failed connections in one run: the path is broken.
const CRR_MAX_ERRORS: u64 = 50;

fn tcp_crr(target: SocketAddrV4, duration: Duration) -> Result<Outcome> {
    let started = Instant::now();
    let (mut count, mut errors) = (0, 0);
    while started.elapsed() < duration {
        let ok = connect(target).and_then(|mut c| {
            transact(&mut c)?;
            c.shutdown(Shutdown::Write)
        });
        match ok {
            Ok(()) => count += 1,
            Err(e) => {
                errors += 1;
                if errors >= CRR_MAX_ERRORS {
                    bail!("TCP_CRR to {target}: {errors} failed connections, last: {e}");
                }
            }
        }
    }
    Ok(Outcome {
        seconds: started.elapsed().as_secs_f64(),
        count,
        errors,
    })
}

fn tcp_stream(target: SocketAddrV4, duration: Duration) -> Result<Outcome> {
    let mut conn =
        connect(target).with_context(|| format!("TCP_STREAM: connecting to {target}"))?;
    conn.write_all(b"s")?;
    let chunk = vec![0x5au8; STREAM_CHUNK];
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < duration {
        conn.write_all(&chunk)
            .with_context(|| format!("TCP_STREAM to {target}"))?;
        count += STREAM_CHUNK as u64;
    }
    // What was written but is still queued is counted; at 64 KiB writes over seconds the
    // socket buffer is a fraction of a percent.
    conn.shutdown(Shutdown::Write)?;
    Ok(Outcome {
        seconds: started.elapsed().as_secs_f64(),
        count,
        errors: 0,
    })
}

/// Gives up when more than this share of requests went unanswered.
const UDP_MAX_LOSS: f64 = 0.5;

fn udp_rr(target: SocketAddrV4, duration: Duration) -> Result<Outcome> {
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    sock.connect(target)?;
    sock.set_read_timeout(Some(UDP_TIMEOUT))?;
    let started = Instant::now();
    let (mut count, mut errors) = (0u64, 0u64);
    let mut buf = [0u8; 16];
    while started.elapsed() < duration {
        sock.send(b"u")?;
        match sock.recv(&mut buf) {
            Ok(_) => count += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                errors += 1
            }
            Err(e) => return Err(e).with_context(|| format!("UDP_RR to {target}")),
        }
    }
    if errors as f64 > UDP_MAX_LOSS * (count + errors) as f64 {
        bail!(
            "UDP_RR to {target}: {errors} of {} requests unanswered",
            count + errors
        );
    }
    Ok(Outcome {
        seconds: started.elapsed().as_secs_f64(),
        count,
        errors,
    })
}
