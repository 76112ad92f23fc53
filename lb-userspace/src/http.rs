//! The agent's HTTP endpoints: `/metrics`, `/healthz` and `/readyz` on the metrics address
//! (kube-proxy's 10249), the node-wide `/healthz` on 10256, and one listener per
//! `healthCheckNodePort` of the Services with `externalTrafficPolicy: Local` (S23).
//!
//! Owns: `HealthState`, which the agent updates and these servers read, and a minimal
//! HTTP/1.1 server: GET and HEAD only, one request per connection (`Connection: close`),
//! request heads of at most [`MAX_REQUEST_HEAD`] bytes, read within [`READ_TIMEOUT`]. Each
//! connection runs in its own task, so a slow client never holds up another.
//! Must not: write BPF maps (it only reads the verdict counters at scrape time), or block
//! the agent: every update is a short lock or a watch-channel send.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use lb_common::{capacity, stat};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::datapath::{
    conntrack_gc::{self, Sweep},
    reader,
};

/// Default address of `/metrics`, `/healthz` and `/readyz` (kube-proxy's metrics port).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:10249";
/// Default address of the node-wide health check (kube-proxy's healthz port).
pub const DEFAULT_HEALTHZ_ADDR: &str = "0.0.0.0:10256";
/// The node health check fails when applies have been failing for longer than this, with
/// no successful sync in between: the maps are that much out of date (kube-proxy's
/// `--healthz` timeout semantics: a quiet cluster is not an unhealthy proxy).
pub const SYNC_HEALTH_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest request head (request line and headers) accepted; longer ones get 400.
pub const MAX_REQUEST_HEAD: usize = 8192;
/// Time a client has to send its whole request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the whole response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the response, unread request bytes are drained for at most this long (and at most
/// [`DRAIN_LIMIT`] bytes): closing a socket with unread data sends a RST, which can make
/// the client lose the response.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
const DRAIN_LIMIT: usize = 64 * 1024;
/// Connections served at once by one listener; further ones wait in the accept queue.
const MAX_CONNECTIONS: usize = 256;
/// How often health-check ports that could not be bound are retried.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// The health-check node port of one Service with `externalTrafficPolicy: Local`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheck {
    /// `namespace/name`.
    pub service: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// What the agent reports about itself; read by the HTTP servers. Cheap to update from
/// the agent's loop: each setter takes a short lock or sends on a watch channel.
#[derive(Debug)]
pub struct HealthState {
    inner: RwLock<Inner>,
    /// healthCheckNodePort -> service; `serve_health_check_ports` follows its changes.
    health_checks: watch::Sender<BTreeMap<u16, HealthCheck>>,
}

#[derive(Debug, Default, Clone)]
struct Inner {
    ready: bool,
    apply_ok: u64,
    apply_error: u64,
    last_apply_duration: Duration,
    map_operations: u64,
    last_sync: Option<SystemTime>,
    /// The first failed apply since the last successful one.
    failing_since: Option<SystemTime>,
    frontends: usize,
    backend_sets: usize,
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthState {
    pub fn new() -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            health_checks: watch::Sender::new(BTreeMap::new()),
        }
    }

    fn read(&self) -> Inner {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Ready: the datapath is attached and the first state has been applied (`/readyz`).
    pub fn set_ready(&self, ready: bool) {
        self.update(|i| i.ready = ready);
    }

    pub fn is_ready(&self) -> bool {
        self.read().ready
    }

    /// One attempt to apply a desired state to the maps: its outcome, how long it took and
    /// how many map operations (inserts, updates, deletes) it made.
    pub fn record_apply(&self, ok: bool, duration: Duration, map_ops: usize) {
        self.record_apply_at(ok, duration, map_ops, SystemTime::now());
    }

    fn record_apply_at(&self, ok: bool, duration: Duration, map_ops: usize, now: SystemTime) {
        self.update(|i| {
            if ok {
                i.apply_ok += 1;
                i.failing_since = None;
            } else {
                i.apply_error += 1;
                i.failing_since.get_or_insert(now);
            }
            i.last_apply_duration = duration;
            i.map_operations += map_ops as u64;
        });
    }

    /// The maps were written with the source's current state at `now` (after a successful
    /// apply). Shown as `lastUpdated` by `:10256/healthz` and as
    /// `xlb_last_sync_timestamp_seconds`. The node stays healthy while nothing changes;
    /// it turns unhealthy when applies keep failing and this is older than
    /// [`SYNC_HEALTH_TIMEOUT`].
    pub fn set_last_sync(&self, now: SystemTime) {
        self.update(|i| i.last_sync = Some(now));
    }

    /// Sizes of the applied state.
    pub fn set_services(&self, frontends: usize, backend_sets: usize) {
        self.update(|i| {
            i.frontends = frontends;
            i.backend_sets = backend_sets;
        });
    }

    /// Every health-check node port this node should answer on, with its Service and the
    /// number of ready local endpoints. Listeners for new ports are opened and listeners
    /// of ports no longer listed are closed by [`serve_health_check_ports`]. Port 0 (no
    /// health-check node port) is ignored.
    pub fn set_health_check_ports(&self, ports: BTreeMap<u16, HealthCheck>) {
        self.health_checks.send_if_modified(|current| {
            if *current == ports {
                false
            } else {
                *current = ports;
                true
            }
        });
    }

    pub fn health_check_ports(&self) -> BTreeMap<u16, HealthCheck> {
        self.health_checks.borrow().clone()
    }

    /// Node health as kube-proxy defines it: ready, synced at least once, and not behind
    /// the cluster for longer than [`SYNC_HEALTH_TIMEOUT`] (no apply has been failing,
    /// without a success since, for that long).
    fn node_healthy(&self, now: SystemTime) -> bool {
        let i = self.read();
        if i.last_sync.is_none() {
            return false;
        }
        let behind_too_long = i
            .failing_since
            .is_some_and(|since| sync_age(since, now) >= SYNC_HEALTH_TIMEOUT);
        i.ready && !behind_too_long
    }
}

/// How long ago `then` was; zero when the clock went backwards.
fn sync_age(then: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The three servers.

/// `/metrics` (Prometheus text format 0.0.4), `/healthz` and `/readyz` on `addr`.
/// `pin_path` is where the verdict counters are read at each scrape.
pub async fn serve_metrics(
    addr: SocketAddr,
    state: Arc<HealthState>,
    pin_path: PathBuf,
) -> Result<()> {
    let listener = bind(addr, "metrics").await?;
    serve_metrics_on(listener, state, pin_path).await
}

/// [`serve_metrics`] on a listener that is already bound (tests bind port 0).
pub async fn serve_metrics_on(
    listener: TcpListener,
    state: Arc<HealthState>,
    pin_path: PathBuf,
) -> Result<()> {
    let pin_path = Arc::new(pin_path);
    serve(listener, move |path: String| {
        let state = state.clone();
        let pin_path = pin_path.clone();
        async move {
            match path.as_str() {
                "/metrics" => {
                    // bpf() syscalls: quick, but not async.
                    let stats = tokio::task::spawn_blocking(move || reader::stats(&pin_path))
                        .await
                        .ok()
                        .and_then(|r| r.ok());
                    Response::new(
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        render_metrics(&state, stats.as_ref(), conntrack_gc::last_sweep()),
                    )
                }
                "/healthz" => Response::text(200, "ok\n"),
                "/readyz" if state.is_ready() => Response::text(200, "ok\n"),
                "/readyz" => Response::text(503, "not ready\n"),
                _ => Response::text(404, "not found\n"),
            }
        }
    })
    .await
}

/// The node-wide health check kube-proxy serves on 10256: `GET /healthz` (and `/livez`)
/// answer 200 while the agent is ready and has synced, unless applies have been failing
/// for longer than [`SYNC_HEALTH_TIMEOUT`]; else 503.
/// Load balancers use it to pick nodes for `externalTrafficPolicy: Cluster` services.
pub async fn serve_node_health(addr: SocketAddr, state: Arc<HealthState>) -> Result<()> {
    let listener = bind(addr, "node health").await?;
    serve_node_health_on(listener, state).await
}

/// [`serve_node_health`] on a listener that is already bound.
pub async fn serve_node_health_on(listener: TcpListener, state: Arc<HealthState>) -> Result<()> {
    serve(listener, move |path: String| {
        let state = state.clone();
        async move {
            match path.as_str() {
                "/healthz" | "/livez" => node_health_response(&state, SystemTime::now()),
                _ => Response::text(404, "not found\n"),
            }
        }
    })
    .await
}

fn node_health_response(state: &HealthState, now: SystemTime) -> Response {
    let last_sync = state.read().last_sync;
    let body = format!(
        "{{\"lastUpdated\": {}, \"currentTime\": \"{}\"}}\n",
        last_sync.map_or_else(|| "null".to_string(), |t| format!("\"{}\"", rfc3339(t))),
        rfc3339(now)
    );
    let status = if state.node_healthy(now) { 200 } else { 503 };
    Response::json(status, body)
}

/// One listener on `bind_ip` per health-check node port in `state`, following
/// [`HealthState::set_health_check_ports`]: new ports are bound, removed ports closed. Any
/// path answers 200 when the Service has a ready endpoint on this node, 503 otherwise,
/// with kube-proxy's JSON body. Ports that cannot be bound (in use) are logged and retried.
/// Runs until dropped; dropping it closes every listener.
pub async fn serve_health_check_ports(bind_ip: IpAddr, state: Arc<HealthState>) -> Result<()> {
    let mut changes = state.health_checks.subscribe();
    let mut listeners = Listeners::default();
    let mut warned: BTreeSet<u16> = BTreeSet::new();
    loop {
        let wanted: BTreeSet<u16> = changes
            .borrow_and_update()
            .keys()
            .copied()
            .filter(|port| *port != 0)
            .collect();
        listeners.0.retain(|port, task| {
            let keep = wanted.contains(port) && !task.is_finished();
            if !keep {
                task.abort();
                info!(port, "health-check node port closed");
            }
            keep
        });
        warned.retain(|port| wanted.contains(port));
        let mut unbound = false;
        for port in wanted {
            if listeners.0.contains_key(&port) {
                continue;
            }
            match TcpListener::bind(SocketAddr::new(bind_ip, port)).await {
                Ok(listener) => {
                    info!(port, "health-check node port listening");
                    warned.remove(&port);
                    let state = state.clone();
                    listeners.0.insert(
                        port,
                        tokio::spawn(async move {
                            let _ = serve(listener, move |_path: String| {
                                let response = health_check_response(&state, port);
                                async move { response }
                            })
                            .await;
                        }),
                    );
                }
                Err(e) => {
                    unbound = true;
                    if warned.insert(port) {
                        warn!(port, address = %bind_ip, error = %e, "cannot listen on health-check node port; retrying");
                    }
                }
            }
        }
        let changed = if unbound {
            tokio::select! {
                changed = changes.changed() => changed,
                _ = tokio::time::sleep(BIND_RETRY) => Ok(()),
            }
        } else {
            changes.changed().await
        };
        if changed.is_err() {
            // The sender lives in `state`, which we hold: cannot happen.
            return Ok(());
        }
    }
}

/// Listener tasks by port, aborted when dropped (so are the sockets they own).
#[derive(Default)]
struct Listeners(BTreeMap<u16, JoinHandle<()>>);

impl Drop for Listeners {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

fn health_check_response(state: &HealthState, port: u16) -> Response {
    let check = state
        .health_checks
        .borrow()
        .get(&port)
        .cloned()
        .unwrap_or_default();
    let (namespace, name) = check
        .service
        .split_once('/')
        .unwrap_or(("", check.service.as_str()));
    let body = serde_json::json!({
        "service": { "namespace": namespace, "name": name },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": state.node_healthy(SystemTime::now()),
    });
    let status = if check.local_endpoints > 0 { 200 } else { 503 };
    Response::json(status, format!("{body}\n"))
}

// ---------------------------------------------------------------------------------------
// Metrics.

/// The Prometheus text exposition (format 0.0.4). `stats` is `None` when the pinned maps
/// could not be read: the per-verdict counters are left out and `xlb_datapath_maps_readable`
/// is 0.
/// `conntrack` is the collector's last sweep (table occupancy), when one has completed.
pub fn render_metrics(
    state: &HealthState,
    stats: Option<&BTreeMap<&'static str, u64>>,
    conntrack: Option<Sweep>,
) -> String {
    let i = state.read();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    if let Some(stats) = stats {
        let samples: Vec<(String, String)> = stat::NAMES
            .iter()
            .map(|verdict| {
                (
                    format!("{{verdict=\"{verdict}\"}}"),
                    stats.get(verdict).copied().unwrap_or(0).to_string(),
                )
            })
            .collect();
        let samples: Vec<(&str, String)> = samples
            .iter()
            .map(|(l, v)| (l.as_str(), v.clone()))
            .collect();
        family(
            "xlb_datapath_packets_total",
            "counter",
            "Packets the eBPF programs handled, by verdict, summed over CPUs.",
            &samples,
        );
    }
    if let Some(sweep) = conntrack {
        // Table pressure (issue 5): how full each conntrack table is. LRU evictions have no
        // counter of their own in the kernel; their trace is the `ct_new_without_syn`
        // verdict above (a connection whose entries were lost).
        family(
            "xlb_conntrack_entries",
            "gauge",
            "Entries in each conntrack table at the collector's last sweep.",
            &[
                (
                    "{table=\"established\"}",
                    sweep.established_entries.to_string(),
                ),
                ("{table=\"embryonic\"}", sweep.embryonic_entries.to_string()),
            ],
        );
        family(
            "xlb_conntrack_capacity",
            "gauge",
            "Maximum entries of each conntrack table (LRU: the least recently used go first).",
            &[
                ("{table=\"established\"}", capacity::CONNTRACK.to_string()),
                ("{table=\"embryonic\"}", capacity::CONNTRACK_NEW.to_string()),
            ],
        );
        family(
            "xlb_conntrack_expired_flows",
            "gauge",
            "Flows the collector's last sweep found expired and deleted.",
            &[("", sweep.expired_flows.to_string())],
        );
    }
    family(
        "xlb_datapath_maps_readable",
        "gauge",
        "1 if the pinned datapath maps could be read for this scrape, else 0.",
        &[("", u8::from(stats.is_some()).to_string())],
    );
    family(
        "xlb_frontends",
        "gauge",
        "Frontends (address, port, protocol) in the applied state.",
        &[("", i.frontends.to_string())],
    );
    family(
        "xlb_backend_sets",
        "gauge",
        "Backend sets in the applied state.",
        &[("", i.backend_sets.to_string())],
    );
    family(
        "xlb_apply_total",
        "counter",
        "Attempts to apply a desired state to the maps, by result.",
        &[
            ("{result=\"ok\"}", i.apply_ok.to_string()),
            ("{result=\"error\"}", i.apply_error.to_string()),
        ],
    );
    family(
        "xlb_apply_duration_seconds",
        "gauge",
        "Duration of the last apply.",
        &[("", i.last_apply_duration.as_secs_f64().to_string())],
    );
    family(
        "xlb_map_operations_total",
        "counter",
        "Map inserts, updates and deletes made by applies.",
        &[("", i.map_operations.to_string())],
    );
    if let Some(t) = i.last_sync {
        family(
            "xlb_last_sync_timestamp_seconds",
            "gauge",
            "Unix time the maps were last confirmed in sync with the cluster.",
            &[(
                "",
                t.duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64()
                    .to_string(),
            )],
        );
    }
    family(
        "xlb_ready",
        "gauge",
        "1 once the datapath is attached and the first state applied.",
        &[("", u8::from(i.ready).to_string())],
    );
    out
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 server.

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body,
            allow: false,
        }
    }

    fn text(status: u16, body: &str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body.to_string())
    }

    fn json(status: u16, body: String) -> Self {
        Self::new(status, "application/json", body)
    }

    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             X-Content-Type-Options: nosniff\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        if !head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        503 => "Service Unavailable",
        _ => "",
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} ({what})"))?;
    info!(%addr, "{what} endpoint listening");
    Ok(listener)
}

/// Accepts connections for ever, each answered by `handler(path)` in its own task.
async fn serve<H, F>(listener: TcpListener, handler: H) -> Result<()>
where
    H: Fn(String) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .context("connection limit")?;
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin or give up.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            handle_connection(stream, handler).await;
            drop(permit);
        });
    }
}

/// What a request head asked for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// GET or HEAD of this path (query string removed).
    Get {
        path: String,
        head_only: bool,
    },
    /// A well-formed request with another method.
    OtherMethod,
    Malformed,
}

async fn handle_connection<H, F>(mut stream: TcpStream, handler: H)
where
    H: Fn(String) -> F,
    F: Future<Output = Response>,
{
    let (response, head_only) =
        match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
            Err(_) => (Response::text(408, "request timeout\n"), false),
            Ok(Err(e)) => {
                debug!(error = %e, "reading request failed");
                return;
            }
            Ok(Ok(None)) => return, // closed without a request
            Ok(Ok(Some(head))) => match parse_request(&head) {
                Request::Get { path, head_only } => (handler(path).await, head_only),
                Request::OtherMethod => {
                    let mut r = Response::text(405, "method not allowed\n");
                    r.allow = true;
                    (r, false)
                }
                Request::Malformed => (Response::text(400, "bad request\n"), false),
            },
        };
    let bytes = response.bytes(head_only);
    if !matches!(
        tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let _ = stream.shutdown().await;
    // Lingering close: take what the client still sends (or until it closes) so the kernel
    // does not answer unread data with a RST that could destroy the response in flight.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < DRAIN_LIMIT {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Reads up to the end of the request head (the empty line). `Ok(None)`: the client
/// closed without sending anything. A head longer than [`MAX_REQUEST_HEAD`], or cut short
/// by the client, is returned as it is and fails to parse.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok((!head.is_empty()).then_some(head));
        }
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_head_end(&head[searched_from..]) {
            head.truncate(searched_from + end);
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(Some(head));
        }
    }
}

/// Where the head ends (after "\r\n\r\n", or "\n\n" from lenient clients).
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn parse_request(head: &[u8]) -> Request {
    if head.len() > MAX_REQUEST_HEAD || find_head_end(head) != Some(head.len()) {
        return Request::Malformed;
    }
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Malformed;
    };
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Request::Malformed;
    };
    let method_ok = !method.is_empty()
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !method_ok
        || !target.starts_with('/')
        || target.bytes().any(|b| b.is_ascii_control())
        || !matches!(version, "HTTP/1.0" | "HTTP/1.1")
    {
        return Request::Malformed;
    }
    // Header fields: `name: value`, no whitespace before the colon; the head ends with
    // one empty line.
    for line in lines.filter(|l| !l.is_empty()) {
        match line.split_once(':') {
            Some((name, _)) if !name.is_empty() && !name.contains([' ', '\t']) => {}
            _ => return Request::Malformed,
        }
    }
    match method {
        "GET" | "HEAD" => Request::Get {
            path: target
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .to_string(),
            head_only: method == "HEAD",
        },
        _ => Request::OtherMethod,
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T12:00:00.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// Binds 127.0.0.1:0 and runs `server` on it; returns the address.
    async fn start<F>(server: impl FnOnce(TcpListener) -> F) -> SocketAddr
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(server(listener));
        addr
    }

    /// Sends `raw`, reads the whole response: (status, headers, body).
    async fn send(addr: SocketAddr, raw: &[u8]) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("response within 10 s")
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, head.to_string(), body.to_string())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let (status, _, body) = send(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: t\r\n\r\n").as_bytes(),
        )
        .await;
        (status, body)
    }

    /// A metrics server whose pin path holds no maps: scrapes must still work.
    async fn start_metrics(state: &Arc<HealthState>) -> SocketAddr {
        let state = state.clone();
        start(move |l| serve_metrics_on(l, state, PathBuf::from("/nonexistent/xlb-http-test")))
            .await
    }

    /// Every sample line is `name{labels} value`, every family has HELP and TYPE before
    /// its samples. Returns the samples as ("name{labels}", value).
    fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
        let mut typed = BTreeSet::new();
        let mut helped = BTreeSet::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut f = rest.split(' ');
                let name = f.next().unwrap();
                let kind = f.next().unwrap();
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                typed.insert(name.to_string());
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                !name.is_empty()
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            let labels = &series[name_end..];
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                for pair in inner.split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line:?}"
                    );
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "{line:?}"
                    );
                }
            }
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            assert!(typed.contains(name), "sample before TYPE: {line:?}");
            assert!(helped.contains(name), "sample before HELP: {line:?}");
            assert!(
                samples.insert(series.to_string(), value).is_none(),
                "duplicate {series}"
            );
        }
        samples
    }

    #[test]
    fn metrics_cover_every_verdict_and_parse() {
        let state = HealthState::new();
        state.set_ready(true);
        state.record_apply(true, Duration::from_micros(1500), 7);
        state.record_apply(false, Duration::from_micros(250), 2);
        state.set_services(3, 2);
        state.set_last_sync(SystemTime::now());
        let stats: BTreeMap<&'static str, u64> = stat::NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, i as u64 * 10))
            .collect();
        let sweep = Sweep {
            established_entries: 40,
            embryonic_entries: 3,
            expired_flows: 2,
            deleted_entries: 4,
        };
        let samples = parse_exposition(&render_metrics(&state, Some(&stats), Some(sweep)));
        assert_eq!(
            samples["xlb_conntrack_entries{table=\"established\"}"],
            40.0
        );
        assert_eq!(samples["xlb_conntrack_entries{table=\"embryonic\"}"], 3.0);
        assert_eq!(
            samples["xlb_conntrack_capacity{table=\"established\"}"],
            f64::from(capacity::CONNTRACK)
        );
        assert_eq!(samples["xlb_conntrack_expired_flows"], 2.0);
        for (i, verdict) in stat::NAMES.iter().enumerate() {
            assert_eq!(
                samples[&format!("xlb_datapath_packets_total{{verdict=\"{verdict}\"}}")],
                i as f64 * 10.0
            );
        }
        assert_eq!(samples["xlb_datapath_maps_readable"], 1.0);
        assert_eq!(samples["xlb_frontends"], 3.0);
        assert_eq!(samples["xlb_backend_sets"], 2.0);
        assert_eq!(samples["xlb_apply_total{result=\"ok\"}"], 1.0);
        assert_eq!(samples["xlb_apply_total{result=\"error\"}"], 1.0);
        assert_eq!(samples["xlb_apply_duration_seconds"], 0.00025);
        assert_eq!(samples["xlb_map_operations_total"], 9.0);
        assert_eq!(samples["xlb_ready"], 1.0);
        assert!(samples["xlb_last_sync_timestamp_seconds"] > 1.7e9);
    }

    #[tokio::test]
    async fn metrics_endpoint_without_maps_says_so() {
        let state = Arc::new(HealthState::new());
        let addr = start_metrics(&state).await;
        let (status, head, body) = send(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let samples = parse_exposition(&body);
        assert_eq!(samples["xlb_datapath_maps_readable"], 0.0);
        assert_eq!(samples["xlb_ready"], 0.0);
        assert!(!body.contains("xlb_datapath_packets_total"), "{body}");
        // A query string does not change the route.
        assert_eq!(get(addr, "/metrics?x=1").await.0, 200);
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_string()));
        assert_eq!(get(addr, "/nope").await.0, 404);
    }

    /// With real pinned maps (root): every verdict counter is scraped.
    #[tokio::test]
    async fn metrics_endpoint_reads_the_pinned_counters() {
        let test = "metrics_endpoint_reads_the_pinned_counters";
        if !crate::testbed::require_privileges(test) {
            return;
        }
        let pin = PathBuf::from(format!("/sys/fs/bpf/xlb-test/{}-http", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin);
        /// Removes the pins on drop, also when the test panics (e.g. a load the verifier
        /// rejects has pinned maps already).
        struct Pins(PathBuf);
        impl Drop for Pins {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _pins = Pins(pin.clone());
        let datapath = crate::datapath::Datapath::load(&pin).expect("load datapath");
        let state = Arc::new(HealthState::new());
        let addr = start({
            let (state, pin) = (state.clone(), pin.clone());
            move |l| serve_metrics_on(l, state, pin)
        })
        .await;
        let (status, body) = get(addr, "/metrics").await;
        drop(datapath);
        assert_eq!(status, 200);
        let samples = parse_exposition(&body);
        assert_eq!(samples["xlb_datapath_maps_readable"], 1.0, "{body}");
        for verdict in stat::NAMES {
            let series = format!("xlb_datapath_packets_total{{verdict=\"{verdict}\"}}");
            assert!(samples.contains_key(&series), "{series} missing:\n{body}");
        }
    }

    #[tokio::test]
    async fn readyz_flips_from_503_to_200() {
        let state = Arc::new(HealthState::new());
        let addr = start_metrics(&state).await;
        assert_eq!(get(addr, "/readyz").await.0, 503);
        assert_eq!(get(addr, "/healthz").await.0, 200);
        state.set_ready(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        state.set_ready(false);
        assert_eq!(get(addr, "/readyz").await.0, 503);
    }

    #[tokio::test]
    async fn bad_requests_get_4xx_and_the_server_keeps_serving() {
        let state = Arc::new(HealthState::new());
        let addr = start_metrics(&state).await;
        let long_header = format!(
            "GET /metrics HTTP/1.1\r\nX-Long: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST_HEAD * 2)
        );
        let bad: [&[u8]; 8] = [
            b"garbage\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n", // cut short
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
            long_header.as_bytes(),
        ];
        for raw in bad {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(raw).await.unwrap();
            stream.shutdown().await.unwrap(); // the cut-short one ends here
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.starts_with("HTTP/1.1 400 "),
                "{:?} -> {text:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(40)])
            );
        }
        let (status, head, _) = send(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 405);
        assert!(head.contains("Allow: GET, HEAD"), "{head}");
        // HEAD: headers only.
        let (status, head, body) = send(addr, b"HEAD /healthz HTTP/1.0\r\n\r\n").await;
        assert_eq!((status, body.as_str()), (200, ""));
        assert!(head.contains("Content-Length: 3"), "{head}");
        // Connecting and closing without a word is fine too.
        drop(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(addr, "/healthz").await.0, 200);
    }

    #[tokio::test]
    async fn a_slow_client_does_not_block_others() {
        let state = Arc::new(HealthState::new());
        let addr = start_metrics(&state).await;
        // Half a request line, then silence (until READ_TIMEOUT).
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metr").await.unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        for _ in 0..5 {
            assert_eq!(get(addr, "/healthz").await.0, 200);
        }
        assert!(
            started.elapsed() < READ_TIMEOUT / 2,
            "took {:?}",
            started.elapsed()
        );
        // The slow one is answered 408 once its time is up, the silent one too.
        let mut out = Vec::new();
        tokio::time::timeout(READ_TIMEOUT * 2, slow.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with(b"HTTP/1.1 408 "), "{out:?}");
        out.clear();
        tokio::time::timeout(READ_TIMEOUT * 2, silent.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with(b"HTTP/1.1 408 "), "{out:?}");
    }

    #[tokio::test]
    async fn node_health_needs_ready_a_sync_and_no_long_failure() {
        let state = Arc::new(HealthState::new());
        let addr = start({
            let state = state.clone();
            move |l| serve_node_health_on(l, state)
        })
        .await;
        let (status, body) = get(addr, "/healthz").await;
        assert_eq!(status, 503);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(json["lastUpdated"].is_null(), "{body}");
        assert!(
            json["currentTime"].as_str().unwrap().ends_with('Z'),
            "{body}"
        );

        state.set_ready(true);
        assert_eq!(get(addr, "/healthz").await.0, 503, "never synced");
        state.set_last_sync(SystemTime::now());
        let (status, body) = get(addr, "/healthz").await;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            json["lastUpdated"].as_str().unwrap().ends_with('Z'),
            "{body}"
        );
        assert_eq!(get(addr, "/livez").await.0, 200);

        // A quiet cluster: the last sync is old, nothing failed since. Healthy.
        let long_ago = SystemTime::now() - SYNC_HEALTH_TIMEOUT - Duration::from_secs(1);
        state.set_last_sync(long_ago);
        assert_eq!(get(addr, "/healthz").await.0, 200, "quiet, not stale");
        // Applies failing for a moment: still healthy.
        state.record_apply(false, Duration::ZERO, 0);
        assert_eq!(get(addr, "/healthz").await.0, 200, "failing briefly");
        // A success clears it; failing for longer than the timeout: unhealthy.
        state.record_apply(true, Duration::ZERO, 0);
        state.record_apply_at(false, Duration::ZERO, 0, long_ago);
        state.record_apply(false, Duration::ZERO, 0); // still failing: since long_ago
        assert_eq!(get(addr, "/healthz").await.0, 503, "behind for too long");
        // A successful apply: healthy again.
        state.record_apply(true, Duration::ZERO, 0);
        state.set_last_sync(SystemTime::now());
        assert_eq!(get(addr, "/healthz").await.0, 200, "recovered");
        state.set_ready(false);
        assert_eq!(get(addr, "/healthz").await.0, 503, "not ready");
        assert_eq!(get(addr, "/metrics").await.0, 404);
    }

    /// A port that was free a moment ago.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn wait_until_get(addr: SocketAddr, path: &str, want: u16) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                let (status, body) = get(addr, path).await;
                if status == want {
                    return body;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{addr}{path} never answered {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn checks(entries: &[(u16, &str, usize)]) -> BTreeMap<u16, HealthCheck> {
        entries
            .iter()
            .map(|(port, service, n)| {
                (
                    *port,
                    HealthCheck {
                        service: service.to_string(),
                        local_endpoints: *n,
                    },
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn health_check_ports_follow_local_endpoints_and_close_when_removed() {
        let state = Arc::new(HealthState::new());
        state.set_ready(true);
        state.set_last_sync(SystemTime::now());
        let manager = tokio::spawn(serve_health_check_ports(
            IpAddr::from([127, 0, 0, 1]),
            state.clone(),
        ));
        let (p1, p2) = (free_port(), free_port());
        let a1 = SocketAddr::from(([127, 0, 0, 1], p1));
        let a2 = SocketAddr::from(([127, 0, 0, 1], p2));
        state.set_health_check_ports(checks(&[(p1, "default/web", 2), (p2, "prod/api", 0)]));

        let body = wait_until_get(a1, "/", 200).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
        let body = wait_until_get(a2, "/any/path", 503).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["localEndpoints"], 0);
        assert_eq!(json["service"]["name"], "api");

        // Endpoints come and go: same listeners, new answers.
        state.set_health_check_ports(checks(&[(p1, "default/web", 0), (p2, "prod/api", 1)]));
        wait_until_get(a1, "/", 503).await;
        wait_until_get(a2, "/", 200).await;

        // p1 removed: its listener closes; p2 keeps answering.
        state.set_health_check_ports(checks(&[(p2, "prod/api", 1)]));
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(a1).await.is_ok() {
            assert!(Instant::now() < deadline, "{a1} still listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get(a2, "/").await.0, 200);

        // Added back: listens again.
        state.set_health_check_ports(checks(&[(p1, "default/web", 1), (p2, "prod/api", 1)]));
        wait_until_get(a1, "/", 200).await;

        // Dropping the server closes every listener.
        manager.abort();
        let _ = manager.await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(a2).await.is_ok() || TcpStream::connect(a1).await.is_ok() {
            assert!(Instant::now() < deadline, "still listening after drop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(b"GET /metrics?a=b HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Get {
                path: "/metrics".into(),
                head_only: false
            }
        );
        assert_eq!(
            parse_request(b"HEAD / HTTP/1.0\n\n"),
            Request::Get {
                path: "/".into(),
                head_only: true
            }
        );
        assert_eq!(
            parse_request(b"DELETE / HTTP/1.1\r\n\r\n"),
            Request::OtherMethod
        );
        assert_eq!(
            parse_request(b"GET  / HTTP/1.1\r\n\r\n"),
            Request::Malformed
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"),
            Request::Malformed
        );
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123); // leap year, Feb 29
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }
}
