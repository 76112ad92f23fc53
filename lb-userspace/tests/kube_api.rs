//! The Kubernetes API source against a fake API server at the HTTP level: the real kube
//! client, watcher and reflectors talk plain HTTP/1.1 to a small server in this file that
//! serves lists and chunked watch streams for Services, EndpointSlices and Nodes.
//!
//! The fake models what matters of a real API server: one resourceVersion counter, an
//! event history per kind that a watch from an older resourceVersion replays, compaction
//! (a watch from a resourceVersion older than the compacted one gets a 410 Gone ERROR
//! event, as the watch cache sends it), label selectors, and a hook to drop connections.
//! "Silent" changes are changes whose events were compacted away: an open watch never
//! sees them, only a re-list does.
//!
//! Every wait is bounded (`WAIT`), so a hang fails loudly with the fake's request log.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use xlb::{
    model::ClusterState,
    source::{kubernetes, SourceUpdate},
};

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The fake API server.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn of_object(object: &Value) -> Kind {
        match object["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Node") => Kind::Node,
            other => panic!("test bug: object of kind {other:?}"),
        }
    }
}

/// What an open watch stream is told to do next.
enum Frame {
    /// One watch event (a JSON line).
    Line(String),
    /// End the response properly (terminating chunk); the connection stays usable.
    End,
    /// Close the connection in the middle of the response, as a dying server or a
    /// broken network would.
    Drop,
}

struct Watcher {
    selector: Option<String>,
    frames: mpsc::UnboundedSender<Frame>,
}

#[derive(Default)]
struct KindState {
    /// By namespace/name; each with metadata.resourceVersion set.
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object) since the last compaction.
    history: Vec<(u64, &'static str, Value)>,
    /// A watch from a resourceVersion older than this gets 410 Gone.
    compacted: u64,
    watchers: Vec<Watcher>,
    /// While true, list requests wait (to observe the state between lists).
    hold_list: Option<watch::Sender<bool>>,
    lists_served: usize,
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
struct Seen {
    kind: Kind,
    watch: bool,
    query: BTreeMap<String, String>,
}

#[derive(Default)]
struct ServerState {
    resource_version: u64,
    kinds: BTreeMap<Kind, KindState>,
    seen: Vec<Seen>,
    /// Requests the fake did not expect, with why: each test asserts there are none.
    unexpected: Vec<String>,
    /// Watches answered with 410 Gone because they started from a compacted version.
    gone_answers: usize,
}

impl ServerState {
    fn kind(&mut self, kind: Kind) -> &mut KindState {
        self.kinds.entry(kind).or_default()
    }

    fn unexpected(&mut self, what: String) {
        eprintln!("FAKE APISERVER: UNEXPECTED: {what}");
        self.unexpected.push(what);
    }
}

struct Fake {
    url: String,
    state: Arc<Mutex<ServerState>>,
    server: JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn key(object: &Value) -> String {
    let metadata = &object["metadata"];
    format!(
        "{}/{}",
        metadata["namespace"].as_str().unwrap_or(""),
        metadata["name"].as_str().expect("object without a name")
    )
}

fn labels(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Equality-based label selectors (`k`, `!k`, `k=v`, `k==v`, `k!=v`, comma-separated).
fn selector_matches(selector: Option<&str>, object: &Value) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels = labels(object);
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .all(|term| {
            if let Some(key) = term.strip_prefix('!') {
                !labels.contains_key(key)
            } else if let Some((key, value)) = term.split_once("!=") {
                labels.get(key).map(String::as_str) != Some(value)
            } else if let Some((key, value)) = term.split_once("==").or(term.split_once('=')) {
                labels.get(key).map(String::as_str) == Some(value)
            } else {
                labels.contains_key(term)
            }
        })
}

fn event_line(event_type: &str, object: &Value) -> String {
    json!({ "type": event_type, "object": object }).to_string()
}

fn gone_line(requested: &str, current: u64) -> String {
    json!({
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {requested} ({current})"),
            "reason": "Expired",
            "code": 410
        }
    })
    .to_string()
}

impl Fake {
    async fn start(objects: Vec<Value>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ServerState::default()));
        {
            let mut state = state.lock().unwrap();
            for kind in Kind::ALL {
                state.kind(kind);
            }
        }
        let shared = state.clone();
        let server = tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.expect("accept");
                tokio::spawn(serve_connection(socket, shared.clone()));
            }
        });
        let fake = Fake { url, state, server };
        for object in objects {
            fake.put(object);
        }
        fake
    }

    /// The real kube client, plain HTTP. kube's rustls TLS stack is set up even for
    /// `http://` URLs, so this panics ("Could not automatically determine the
    /// process-level CryptoProvider") unless kube has its `ring` or `aws-lc-rs` feature,
    /// exactly as the agent's own client would.
    fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().expect("fake URL"));
        kube::Client::try_from(config).expect("client for the fake API server")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ServerState> {
        self.state.lock().unwrap()
    }

    /// Creates or replaces an object; open watches see ADDED/MODIFIED.
    fn put(&self, object: Value) {
        self.change(object, false);
    }

    /// Deletes an object; open watches see DELETED.
    fn delete(&self, kind: Kind, namespaced_name: &str) {
        self.remove(kind, namespaced_name, false);
    }

    /// Creates or replaces an object; the event is lost to compaction.
    fn put_silently(&self, object: Value) {
        self.change(object, true);
    }

    /// Deletes an object; the event is lost to compaction.
    fn delete_silently(&self, kind: Kind, namespaced_name: &str) {
        self.remove(kind, namespaced_name, true);
    }

    fn change(&self, mut object: Value, silent: bool) {
        let kind = Kind::of_object(&object);
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind_state = state.kind(kind);
        let event_type = match kind_state.objects.insert(key(&object), object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        record(kind_state, rv, event_type, object, silent);
    }

    fn remove(&self, kind: Kind, namespaced_name: &str, silent: bool) {
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        let kind_state = state.kind(kind);
        let mut object = kind_state
            .objects
            .remove(namespaced_name)
            .unwrap_or_else(|| panic!("test bug: no {kind:?} {namespaced_name}"));
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        record(kind_state, rv, "DELETED", object, silent);
    }

    /// Sends a BOOKMARK at the current resourceVersion to open watches of `kind`.
    fn bookmark(&self, kind: Kind) {
        let mut state = self.lock();
        let rv = state.resource_version;
        let line = json!({
            "type": "BOOKMARK",
            "object": {
                "kind": kind.name(),
                "apiVersion": kind.api_version(),
                "metadata": { "resourceVersion": rv.to_string() }
            }
        })
        .to_string();
        for watcher in &state.kind(kind).watchers {
            let _ = watcher.frames.send(Frame::Line(line.clone()));
        }
    }

    /// Open watches of `kind` get a 410 Gone ERROR event and end; the history is compacted.
    fn expire_watches(&self, kind: Kind) {
        let mut state = self.lock();
        let rv = state.resource_version;
        let kind_state = state.kind(kind);
        kind_state.compacted = rv;
        kind_state.history.clear();
        for watcher in kind_state.watchers.drain(..) {
            let _ = watcher.frames.send(Frame::Line(gone_line("0", rv)));
            let _ = watcher.frames.send(Frame::End);
        }
    }

    /// Open watches of `kind` lose their connection mid-stream.
    fn drop_watches(&self, kind: Kind) {
        for watcher in self.lock().kind(kind).watchers.drain(..) {
            let _ = watcher.frames.send(Frame::Drop);
        }
    }

    /// While held, list requests for `kind` wait.
    fn hold_lists(&self, kind: Kind) {
        self.lock().kind(kind).hold_list = Some(watch::channel(true).0);
    }

    fn release_lists(&self, kind: Kind) {
        if let Some(hold) = self.lock().kind(kind).hold_list.take() {
            let _ = hold.send(false);
        }
    }

    fn open_watches(&self, kind: Kind) -> usize {
        let mut state = self.lock();
        let kind_state = state.kind(kind);
        kind_state
            .watchers
            .retain(|watcher| !watcher.frames.is_closed());
        kind_state.watchers.len()
    }

    fn lists_served(&self, kind: Kind) -> usize {
        self.lock().kind(kind).lists_served
    }

    fn gone_answers(&self) -> usize {
        self.lock().gone_answers
    }

    fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    fn request_log(&self) -> String {
        self.seen()
            .iter()
            .map(|seen| {
                format!(
                    "  {} {:?} {:?}\n",
                    if seen.watch { "WATCH" } else { "LIST " },
                    seen.kind,
                    seen.query
                )
            })
            .collect()
    }

    fn assert_no_unexpected_requests(&self) {
        let unexpected = self.lock().unexpected.clone();
        assert!(
            unexpected.is_empty(),
            "the fake API server got unexpected requests:\n{unexpected:#?}\nall requests:\n{}",
            self.request_log()
        );
    }

    /// Polls (bounded) until `condition` holds on the fake.
    async fn wait_for(&self, what: &str, condition: impl Fn(&Fake) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !condition(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; requests so far:\n{}",
                self.request_log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn record(
    kind_state: &mut KindState,
    rv: u64,
    event_type: &'static str,
    object: Value,
    silent: bool,
) {
    if silent {
        kind_state.history.clear();
        kind_state.compacted = rv;
        return;
    }
    let line = event_line(event_type, &object);
    kind_state.watchers.retain(|watcher| {
        !selector_matches(watcher.selector.as_deref(), &object)
            || watcher.frames.send(Frame::Line(line.clone())).is_ok()
    });
    kind_state.history.push((rv, event_type, object));
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(byte) => {
                    out.push(byte);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

async fn write_response(socket: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await
}

async fn write_chunk(socket: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    let chunk = format!("{:x}\r\n{data}\r\n", data.len());
    socket.write_all(chunk.as_bytes()).await?;
    socket.flush().await
}

fn status_body(code: u16, reason: &str, message: &str) -> String {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
    .to_string()
}

/// One HTTP/1.1 connection: requests one after the other (keep-alive).
async fn serve_connection(socket: TcpStream, state: Arc<Mutex<ServerState>>) {
    let mut reader = BufReader::new(socket);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // Headers: nothing in them matters here, and GETs have no body.
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header).await {
                Ok(0) | Err(_) => return,
                Ok(_) if header.trim().is_empty() => break,
                Ok(_) => {}
            }
        }
        let keep_going = serve_request(request_line.trim(), reader.get_mut(), &state).await;
        if !keep_going {
            return;
        }
    }
}

/// Serves one request. Returns whether the connection stays open.
async fn serve_request(
    request_line: &str,
    socket: &mut TcpStream,
    state: &Arc<Mutex<ServerState>>,
) -> bool {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = parse_query(query);
    let kind = Kind::ALL.into_iter().find(|kind| kind.path() == path);
    let Some(kind) = kind.filter(|_| method == "GET") else {
        state
            .lock()
            .unwrap()
            .unexpected(format!("request {request_line:?}"));
        let body = status_body(404, "NotFound", "the fake serves only lists and watches");
        return write_response(socket, "404 Not Found", &body).await.is_ok();
    };
    let is_watch = query.get("watch").map(String::as_str) == Some("true");
    let known: &[&str] = if is_watch {
        &[
            "watch",
            "timeoutSeconds",
            "labelSelector",
            "allowWatchBookmarks",
            "resourceVersion",
        ]
    } else {
        &[
            "limit",
            "labelSelector",
            "resourceVersion",
            "resourceVersionMatch",
        ]
    };
    {
        let mut state = state.lock().unwrap();
        state.seen.push(Seen {
            kind,
            watch: is_watch,
            query: query.clone(),
        });
        for name in query.keys().filter(|name| !known.contains(&name.as_str())) {
            state.unexpected(format!(
                "{} {kind:?} with query parameter {name}={:?} (full request {request_line:?})",
                if is_watch { "watch" } else { "list" },
                query[name]
            ));
        }
    }
    let selector = query.get("labelSelector").cloned();
    if is_watch {
        serve_watch(kind, &query, selector, socket, state).await
    } else {
        serve_list(kind, selector, socket, state).await
    }
}

async fn serve_list(
    kind: Kind,
    selector: Option<String>,
    socket: &mut TcpStream,
    state: &Arc<Mutex<ServerState>>,
) -> bool {
    let hold = state
        .lock()
        .unwrap()
        .kind(kind)
        .hold_list
        .as_ref()
        .map(watch::Sender::subscribe);
    if let Some(mut hold) = hold {
        // Released (false) or dropped: either way, go on.
        let _ = hold.wait_for(|held| !*held).await;
    }
    let body = {
        let mut state = state.lock().unwrap();
        let rv = state.resource_version;
        let kind_state = state.kind(kind);
        kind_state.lists_served += 1;
        let items: Vec<&Value> = kind_state
            .objects
            .values()
            .filter(|object| selector_matches(selector.as_deref(), object))
            .collect();
        json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": { "resourceVersion": rv.to_string() },
            "items": items,
        })
        .to_string()
    };
    write_response(socket, "200 OK", &body).await.is_ok()
}

async fn serve_watch(
    kind: Kind,
    query: &BTreeMap<String, String>,
    selector: Option<String>,
    socket: &mut TcpStream,
    state: &Arc<Mutex<ServerState>>,
) -> bool {
    let requested = query.get("resourceVersion").cloned().unwrap_or_default();
    let (tx, mut frames) = mpsc::unbounded_channel();
    // Decide under the lock, so that no change slips between the replay and the live feed.
    let mut initial = Vec::new();
    {
        let mut state = state.lock().unwrap();
        let current = state.resource_version;
        let from: Option<u64> = requested.parse().ok();
        let compacted = state.kind(kind).compacted;
        match from {
            None => {
                state.unexpected(format!(
                    "watch {kind:?} without a usable resourceVersion ({requested:?})"
                ));
                initial.push(Frame::Line(gone_line(&requested, current)));
                initial.push(Frame::End);
            }
            Some(from) if from < compacted => {
                state.gone_answers += 1;
                initial.push(Frame::Line(gone_line(&requested, current)));
                initial.push(Frame::End);
            }
            Some(from) => {
                let kind_state = state.kind(kind);
                for (rv, event_type, object) in &kind_state.history {
                    if *rv > from && selector_matches(selector.as_deref(), object) {
                        initial.push(Frame::Line(event_line(event_type, object)));
                    }
                }
                kind_state.watchers.push(Watcher {
                    selector,
                    frames: tx,
                });
            }
        }
    }
    let headers = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                   Transfer-Encoding: chunked\r\n\r\n";
    if socket.write_all(headers.as_bytes()).await.is_err() {
        return false;
    }
    let mut initial = initial.into_iter();
    loop {
        let frame = match initial.next() {
            Some(frame) => frame,
            None => match frames.recv().await {
                Some(frame) => frame,
                // Dropped from the watcher list (expired): end the response.
                None => Frame::End,
            },
        };
        match frame {
            Frame::Line(line) => {
                if write_chunk(socket, &line).await.is_err() {
                    return false;
                }
            }
            Frame::End => return socket.write_all(b"0\r\n\r\n").await.is_ok(),
            Frame::Drop => {
                let _ = socket.shutdown().await;
                return false;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Objects and assertions.

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "clusterIP": cluster_ip,
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }]
        }
    })
}

fn slice(name: &str, service: &str, address: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": { "kubernetes.io/service-name": service }
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": [{ "addresses": [address], "conditions": { "ready": true } }]
    })
}

fn node(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name } })
}

fn with_label(mut object: Value, key: &str, value: &str) -> Value {
    object["metadata"]["labels"][key] = json!(value);
    object
}

/// e.g. `["Service default/web", "EndpointSlice default/web-1", "Node node-a"]`.
fn names(state: &ClusterState) -> Vec<String> {
    fn name(
        kind: &str,
        metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> String {
        match &metadata.namespace {
            Some(namespace) => format!(
                "{kind} {namespace}/{}",
                metadata.name.as_deref().unwrap_or("")
            ),
            None => format!("{kind} {}", metadata.name.as_deref().unwrap_or("")),
        }
    }
    let services = state.services.iter().map(|s| name("Service", &s.metadata));
    let slices = state
        .endpoint_slices
        .iter()
        .map(|s| name("EndpointSlice", &s.metadata));
    let nodes = state.nodes.iter().map(|n| name("Node", &n.metadata));
    services.chain(slices).chain(nodes).collect()
}

fn cluster_ip(state: &ClusterState, name: &str) -> Option<String> {
    state
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
}

/// The source under test, running against `fake`. Its updates are folded into `state`,
/// the cluster as the source has described it so far.
struct Source {
    rx: mpsc::UnboundedReceiver<SourceUpdate>,
    task: JoinHandle<anyhow::Result<()>>,
    state: ClusterState,
    /// Every update received, in order: "snapshot" or "changes".
    kinds: Vec<&'static str>,
}

impl Source {
    fn start(fake: &Fake) -> Source {
        init_logging();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(kubernetes::watch(fake.client(), tx));
        Source {
            rx,
            task,
            state: ClusterState::default(),
            kinds: Vec::new(),
        }
    }

    fn fold(&mut self, update: SourceUpdate) {
        self.kinds.push(match &update {
            SourceUpdate::Snapshot(_) => "snapshot",
            SourceUpdate::Changes(_) => "changes",
        });
        update.apply_to(&mut self.state);
    }

    /// Waits (bounded) for the next update; returns the state after it.
    async fn next(&mut self, fake: &Fake) -> ClusterState {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(update)) => {
                self.fold(update);
                self.state.clone()
            }
            Ok(None) => panic!("the source stopped: {:?}", self.stop_error().await),
            Err(_) => panic!(
                "nothing published within {WAIT:?}; requests so far:\n{}",
                fake.request_log()
            ),
        }
    }

    /// Waits (bounded) until the state satisfies `condition`.
    async fn wait_until(
        &mut self,
        fake: &Fake,
        what: &str,
        condition: impl Fn(&ClusterState) -> bool,
    ) -> ClusterState {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if condition(&self.state) {
                return self.state.clone();
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(update)) => self.fold(update),
                Ok(None) => panic!("the source stopped: {:?}", self.stop_error().await),
                Err(_) => panic!(
                    "timed out waiting for {what}; last state: {:?}\nrequests so far:\n{}",
                    names(&self.state),
                    fake.request_log()
                ),
            }
        }
    }

    async fn stop_error(&mut self) -> String {
        match tokio::time::timeout(WAIT, &mut self.task).await {
            Ok(Ok(result)) => format!("{result:?}"),
            Ok(Err(err)) => format!("task failed: {err}"),
            Err(_) => "channel closed but task still running".into(),
        }
    }

    /// Drops the receiver: the source must return Ok.
    async fn stop(self) {
        drop(self.rx);
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the source did not return after its receiver was dropped")
            .expect("the source panicked");
        result.expect("the source returned an error");
    }
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "xlb=debug,kube=info".into()),
        )
        .with_test_writer()
        .try_init();
}

fn selector_terms(selector: &str) -> BTreeSet<&str> {
    selector.split(',').map(str::trim).collect()
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn initial_list_is_published_whole() {
    let fake = Fake::start(vec![
        service("web", "10.96.0.10"),
        service("db", "10.96.0.20"),
        slice("web-1", "web", "10.244.1.5"),
        slice("db-1", "db", "10.244.2.7"),
        node("node-a"),
    ])
    .await;
    fake.hold_lists(Kind::Node);
    let mut source = Source::start(&fake);

    // Services and slices are listed and watched; nodes are still being listed.
    fake.wait_for("services and slices watched", |fake| {
        fake.open_watches(Kind::Service) == 1 && fake.open_watches(Kind::EndpointSlice) == 1
    })
    .await;
    assert_eq!(fake.lists_served(Kind::Node), 0);
    if let Ok(update) = tokio::time::timeout(Duration::from_millis(500), source.rx.recv()).await {
        panic!("published before the node list completed: {update:?}");
    }

    fake.release_lists(Kind::Node);
    let state = source.next(&fake).await;
    assert_eq!(
        names(&state),
        [
            "Service default/db",
            "Service default/web",
            "EndpointSlice default/db-1",
            "EndpointSlice default/web-1",
            "Node node-a",
        ]
    );
    assert_eq!(cluster_ip(&state, "web").as_deref(), Some("10.96.0.10"));
    let web_slice = &state.endpoint_slices[1];
    assert_eq!(
        web_slice.endpoints.as_ref().unwrap()[0].addresses,
        ["10.244.1.5"],
        "slice content survives the trip"
    );
    assert_eq!(web_slice.metadata.resource_version.as_deref(), Some("3"));

    fake.assert_no_unexpected_requests();
    source.stop().await;
}

#[tokio::test]
async fn watch_events_update_the_state() {
    let fake = Fake::start(vec![
        service("web", "10.96.0.10"),
        service("db", "10.96.0.20"),
        slice("web-1", "web", "10.244.1.5"),
        node("node-a"),
    ])
    .await;
    let mut source = Source::start(&fake);
    let first = source.next(&fake).await;
    assert_eq!(
        names(&first),
        [
            "Service default/db",
            "Service default/web",
            "EndpointSlice default/web-1",
            "Node node-a"
        ]
    );

    fake.put(slice("db-1", "db", "10.244.2.7"));
    source
        .wait_until(&fake, "ADDED slice", |state| {
            names(state).contains(&"EndpointSlice default/db-1".to_string())
        })
        .await;

    fake.bookmark(Kind::Service);
    fake.put(service("web", "10.96.0.11"));
    source
        .wait_until(&fake, "MODIFIED service", |state| {
            cluster_ip(state, "web").as_deref() == Some("10.96.0.11")
        })
        .await;

    fake.delete(Kind::Service, "default/db");
    fake.put(node("node-b"));
    let state = source
        .wait_until(&fake, "DELETED service and ADDED node", |state| {
            state.services.len() == 1 && state.nodes.len() == 2
        })
        .await;
    assert_eq!(
        names(&state),
        [
            "Service default/web",
            "EndpointSlice default/db-1",
            "EndpointSlice default/web-1",
            "Node node-a",
            "Node node-b",
        ]
    );
    assert_eq!(cluster_ip(&state, "web").as_deref(), Some("10.96.0.11"));

    // All of it came through the watches: no re-list, and after the first snapshot only
    // the changes were published.
    for kind in Kind::ALL {
        assert_eq!(fake.lists_served(kind), 1, "{kind:?} re-listed");
    }
    assert_eq!(source.kinds[0], "snapshot");
    assert!(
        source.kinds[1..].iter().all(|k| *k == "changes"),
        "{:?}",
        source.kinds
    );
    fake.assert_no_unexpected_requests();
    source.stop().await;
}

#[tokio::test]
async fn gone_410_forces_a_relist_that_drops_stale_objects() {
    let fake = Fake::start(vec![
        service("web", "10.96.0.10"),
        slice("web-1", "web", "10.244.1.5"),
        slice("web-2", "web", "10.244.1.6"),
        node("node-a"),
    ])
    .await;
    let mut source = Source::start(&fake);
    let first = source.next(&fake).await;
    assert_eq!(first.endpoint_slices.len(), 2);
    fake.wait_for("slice watch open", |fake| {
        fake.open_watches(Kind::EndpointSlice) == 1
    })
    .await;

    // The server changes behind the watch's back (those events are compacted away)...
    fake.delete_silently(Kind::EndpointSlice, "default/web-1");
    fake.put_silently(slice("web-3", "web", "10.244.1.7"));
    // ...then tells the watch it is too old.
    fake.expire_watches(Kind::EndpointSlice);

    let state = source
        .wait_until(&fake, "re-listed slices", |state| {
            state
                .endpoint_slices
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some("web-3"))
        })
        .await;
    assert_eq!(
        names(&state),
        [
            "Service default/web",
            "EndpointSlice default/web-2",
            "EndpointSlice default/web-3",
            "Node node-a",
        ],
        "the re-list replaces the store: the slice deleted unseen is gone"
    );
    assert_eq!(fake.lists_served(Kind::EndpointSlice), 2);
    assert_eq!(fake.lists_served(Kind::Service), 1);
    assert_eq!(
        source.kinds.last(),
        Some(&"snapshot"),
        "a re-list is published whole, so whatever it lost is deleted downstream"
    );

    // And the new watch works.
    fake.wait_for("slice watch re-opened", |fake| {
        fake.open_watches(Kind::EndpointSlice) == 1
    })
    .await;
    fake.delete(Kind::EndpointSlice, "default/web-2");
    source
        .wait_until(&fake, "DELETED after the re-list", |state| {
            state.endpoint_slices.len() == 1
        })
        .await;

    fake.assert_no_unexpected_requests();
    source.stop().await;
}

#[tokio::test]
async fn dropped_connection_reconnects_and_converges() {
    let fake = Fake::start(vec![
        service("web", "10.96.0.10"),
        service("db", "10.96.0.20"),
        slice("web-1", "web", "10.244.1.5"),
        node("node-a"),
    ])
    .await;
    let mut source = Source::start(&fake);
    source.next(&fake).await;
    fake.wait_for("service watch open", |fake| {
        fake.open_watches(Kind::Service) == 1
    })
    .await;

    // Mid-stream: one event arrives...
    fake.put(service("web", "10.96.0.11"));
    source
        .wait_until(&fake, "MODIFIED service", |state| {
            cluster_ip(state, "web").as_deref() == Some("10.96.0.11")
        })
        .await;
    // ...then the server loses a deletion (compacted) and the connection.
    fake.delete_silently(Kind::Service, "default/db");
    fake.drop_watches(Kind::Service);

    // The watcher resumes from its last resourceVersion, which is compacted: 410, re-list.
    let state = source
        .wait_until(&fake, "db gone after reconnecting", |state| {
            state.services.len() == 1
        })
        .await;
    assert_eq!(
        names(&state),
        [
            "Service default/web",
            "EndpointSlice default/web-1",
            "Node node-a"
        ]
    );
    assert_eq!(cluster_ip(&state, "web").as_deref(), Some("10.96.0.11"));
    assert!(
        fake.gone_answers() >= 1,
        "expected a resumed watch answered with 410"
    );
    assert_eq!(fake.lists_served(Kind::Service), 2);

    // A plain disconnect with nothing lost resumes the watch without a re-list, and
    // events from while it was away are replayed.
    fake.wait_for("service watch re-opened", |fake| {
        fake.open_watches(Kind::Service) == 1
    })
    .await;
    fake.drop_watches(Kind::Service);
    fake.put(service("cache", "10.96.0.30"));
    let state = source
        .wait_until(&fake, "service added around the reconnect", |state| {
            state.services.len() == 2
        })
        .await;
    assert_eq!(
        names(&state)[..2],
        ["Service default/cache", "Service default/web"]
    );
    assert_eq!(
        fake.lists_served(Kind::Service),
        2,
        "resumed without a re-list"
    );

    fake.assert_no_unexpected_requests();
    source.stop().await;
}

#[tokio::test]
async fn label_selectors_skip_proxy_name_and_headless() {
    let fake = Fake::start(vec![
        service("web", "10.96.0.10"),
        with_label(
            service("other", "10.96.0.40"),
            "service.kubernetes.io/service-proxy-name",
            "someone-else",
        ),
        with_label(
            service("headless", "None"),
            "service.kubernetes.io/headless",
            "",
        ),
        slice("web-1", "web", "10.244.1.5"),
        with_label(
            slice("other-1", "other", "10.244.1.9"),
            "service.kubernetes.io/service-proxy-name",
            "someone-else",
        ),
        with_label(
            slice("headless-1", "headless", "10.244.1.8"),
            "service.kubernetes.io/headless",
            "",
        ),
        node("node-a"),
    ])
    .await;
    let mut source = Source::start(&fake);
    let state = source.next(&fake).await;
    assert_eq!(
        names(&state),
        [
            "Service default/web",
            "EndpointSlice default/web-1",
            "Node node-a"
        ]
    );
    fake.wait_for("all three watches open", |fake| {
        Kind::ALL
            .into_iter()
            .all(|kind| fake.open_watches(kind) == 1)
    })
    .await;

    let seen = fake.seen();
    for request in &seen {
        eprintln!(
            "{} {:?}: {:?}",
            if request.watch { "watch" } else { "list" },
            request.kind,
            request.query
        );
    }
    let expected = BTreeSet::from([
        "!service.kubernetes.io/service-proxy-name",
        "!service.kubernetes.io/headless",
    ]);
    for kind in Kind::ALL {
        for watch in [false, true] {
            let requests: Vec<&Seen> = seen
                .iter()
                .filter(|seen| seen.kind == kind && seen.watch == watch)
                .collect();
            assert!(!requests.is_empty(), "no {kind:?} request (watch={watch})");
            for request in requests {
                let selector = request.query.get("labelSelector").map(String::as_str);
                match kind {
                    Kind::Service | Kind::EndpointSlice => assert_eq!(
                        selector.map(selector_terms),
                        Some(expected.clone()),
                        "{kind:?} watch={watch}: {:?}",
                        request.query
                    ),
                    Kind::Node => assert_eq!(selector, None, "nodes: {:?}", request.query),
                }
                assert!(
                    !request.query.contains_key("sendInitialEvents"),
                    "plain list+watch expected: {:?}",
                    request.query
                );
            }
        }
    }

    // Excluded objects created later are not delivered either.
    fake.put(with_label(
        slice("late-1", "web", "10.244.1.10"),
        "service.kubernetes.io/headless",
        "",
    ));
    fake.put(slice("web-2", "web", "10.244.1.11"));
    let state = source
        .wait_until(&fake, "web-2 added", |state| {
            state.endpoint_slices.len() >= 2
        })
        .await;
    assert_eq!(
        names(&state),
        [
            "Service default/web",
            "EndpointSlice default/web-1",
            "EndpointSlice default/web-2",
            "Node node-a"
        ]
    );

    fake.assert_no_unexpected_requests();
    source.stop().await;
}

#[tokio::test]
async fn client_from_a_kubeconfig_file() {
    let dir = std::env::temp_dir().join(format!("xlb-kubeconfig-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {server: 'http://127.0.0.1:1'}\n\
         users:\n- name: nobody\n  user: {}\ncontexts:\n- name: fake\n  context: {cluster: fake, user: nobody}\n\
         current-context: fake\n",
    )
    .unwrap();
    let client = kubernetes::client(Some(&path)).await;
    assert!(client.is_ok(), "{:#}", client.err().unwrap());

    let missing = dir.join("missing");
    let err = kubernetes::client(Some(&missing))
        .await
        .err()
        .expect("missing file");
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
    let _ = std::fs::remove_dir_all(&dir);
}
