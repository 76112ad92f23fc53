//! Cluster state -> the datapath state of this node.
//!
//! Services are visited in namespace/name order, so the result and the problem list never
//! depend on the order of the input. Each service that gets datapath state yields one
//! backend set per service port and the frontends (addresses the port answers on) that
//! point at it. Which endpoints become backends is decided in one place,
//! [`select_backends`]: that is where endpoint conditions (S25), traffic-policy scopes
//! (S22/S24) and topology hints (S33) plug in.
use std::{
    borrow::Cow,
    cmp::Ordering,
    collections::{btree_map::Entry, BTreeSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::ServiceSpec,
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::{
    BACKEND_F_LOCAL, IPPROTO_TCP, IPPROTO_UDP, SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_LOCAL,
    SVC_F_SOURCE_RANGES,
};

use super::*;

/// Ties an EndpointSlice to its Service (same namespace).
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The object belongs to another service proxy (S09).
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set on headless services' slices; no proxying wanted (S09).
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// Computes what this node's datapath should hold, plus the objects (or parts of objects)
/// that could not be used. A problem never stops the rest of the state from applying.
pub fn desired_state(
    cluster: &ClusterState,
    node: &NodeContext,
) -> (DesiredState, Vec<ObjectProblem>) {
    let mut problems = Vec::new();
    let mut state = DesiredState::default();
    let slices_by_service = group_slices_by_service(&cluster.endpoint_slices);
    let mut seen_services = BTreeSet::new();
    let zone = node_zone(cluster, node);

    for service in sorted_by_id(&cluster.services, |s| &s.metadata) {
        let id = ObjectId::of(&service.metadata);
        let mut report = Reporter::new(&mut problems, "Service", id);
        if id.name.is_empty() {
            report.problem("metadata.name is missing; service ignored".into());
            continue;
        }
        if !seen_services.insert(id) {
            report.problem("defined more than once; the first definition is used".into());
            continue;
        }
        let slices = slices_by_service
            .get(&id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some(plan) = plan_service(service, id, slices, node, zone, &mut problems) {
            add_plan(&mut state, plan, id, &mut problems);
        }
    }

    // A set whose every frontend was rejected (bad cluster IP, conflicts) serves nobody;
    // keep the invariant "every set has a frontend" for the writer.
    let referenced: BTreeSet<&str> = state
        .frontends
        .values()
        .flat_map(|frontend| {
            std::iter::once(frontend.backend_set.as_str()).chain(frontend.cluster_set.as_deref())
        })
        .collect();
    state
        .backend_sets
        .retain(|name, _| referenced.contains(name.as_str()));
    state
        .maglev_table_sizes
        .retain(|name, _| referenced.contains(name.as_str()));

    (state, problems)
}

/// What one service contributes: its backend sets and the frontends pointing at them.
#[derive(Default)]
pub(super) struct ServicePlan {
    pub(super) backend_sets: Vec<(BackendSetName, Vec<Backend>)>,
    pub(super) frontends: Vec<(ServiceKey, Frontend)>,
    pub(super) health_check: Option<(u16, HealthCheckPort)>,
    /// Maglev table size of every set, from the service's annotation (None: the agent's).
    pub(super) table_size: Option<u32>,
}

/// The zone of this node, from its Node object's `topology.kubernetes.io/zone` label.
fn node_zone<'a>(cluster: &'a ClusterState, node: &NodeContext) -> Option<&'a str> {
    cluster
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node.node_name.as_str()))
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|labels| labels.get(LABEL_ZONE))
        .map(String::as_str)
}

/// The service-wide policies that shape its frontends.
struct Policies {
    /// internalTrafficPolicy Local (S24).
    internal_local: bool,
    /// externalTrafficPolicy Local (S22).
    external_local: bool,
    /// sessionAffinity ClientIP timeout in seconds (S19-S21); 0 for none.
    affinity_timeout: u32,
    /// loadBalancerSourceRanges (S14).
    source_ranges: Vec<Ipv4Cidr>,
}

/// Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// The service's `xlb.io/maglev-table-size`, if it has a valid one. An invalid value is
/// reported and the agent's default used, so the service keeps working.
fn maglev_table_size(meta: &ObjectMeta, report: &mut Reporter<'_, '_>) -> Option<u32> {
    let value = meta
        .annotations
        .as_ref()?
        .get(maglev::ANNOTATION_TABLE_SIZE)?;
    let checked = value
        .trim()
        .parse::<u32>()
        .map_err(|e| format!("{value:?}: {e}"))
        .and_then(|m| maglev::check_table_size(m).map(|()| m));
    match checked {
        Ok(m) => Some(m),
        Err(e) => {
            report.problem(format!(
                "annotation {}: {e}; the agent's default table size is used",
                maglev::ANNOTATION_TABLE_SIZE
            ));
            None
        }
    }
}

fn policies(spec: &ServiceSpec, report: &mut Reporter<'_, '_>) -> Policies {
    let affinity_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let configured = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match configured {
            None => DEFAULT_AFFINITY_TIMEOUT,
            Some(t) if (1..=86_400).contains(&t) => t as u32,
            Some(t) => {
                report.problem(format!(
                    "sessionAffinityConfig.clientIP.timeoutSeconds {t} outside 1-86400; using {DEFAULT_AFFINITY_TIMEOUT}"
                ));
                DEFAULT_AFFINITY_TIMEOUT
            }
        }
    } else {
        0
    };
    let mut source_ranges = Vec::new();
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        // Kubernetes tolerates surrounding whitespace here (S14).
        match range.trim().parse::<Ipv4Cidr>() {
            Ok(cidr) => source_ranges.push(cidr),
            Err(_) if range.contains(':') => {} // IPv6 range: not for this IPv4 datapath
            Err(e) => report.problem(format!("loadBalancerSourceRanges: {e}; range ignored")),
        }
    }
    Policies {
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout,
        source_ranges,
    }
}

/// The datapath state of one service, or `None` when the service gets none (ExternalName,
/// headless, IPv6-only, or handled by another proxy).
pub(super) fn plan_service(
    service: &Service,
    id: ObjectId<'_>,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    zone: Option<&str>,
    problems: &mut Vec<ObjectProblem>,
) -> Option<ServicePlan> {
    if is_for_another_proxy(&service.metadata) {
        return None;
    }
    let spec = service.spec.as_ref()?;
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return None;
    }

    let mut report = Reporter::new(problems, "Service", id);
    let cluster_ips = cluster_ipv4s(spec, &mut report)?;
    let exposes_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    let ports = service_ports(spec, exposes_node_ports, &mut report);
    let external_ips = ipv4_addresses(
        spec.external_ips.iter().flatten().map(String::as_str),
        "externalIPs",
        &mut report,
    );
    let load_balancer_ips = ipv4_addresses(
        service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            // ipMode Proxy: the load balancer sends traffic to the node port, not to this
            // IP, so the IP must not be captured here (kube-proxy does the same).
            .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ingress| ingress.ip.as_deref()),
        "status.loadBalancer.ingress ip",
        &mut report,
    );

    let policies = policies(spec, &mut report);
    let table_size = maglev_table_size(&service.metadata, &mut report);
    let slice_views: Vec<SliceView<'_>> = slices
        .iter()
        .map(|slice| slice_view(slice, problems))
        .collect();

    let has_external = !external_ips.is_empty()
        || !load_balancer_ips.is_empty()
        || ports.iter().any(|p| p.node_port.is_some());
    let affinity = if policies.affinity_timeout > 0 {
        SVC_F_AFFINITY
    } else {
        0
    };

    let mut plan = ServicePlan {
        table_size,
        ..ServicePlan::default()
    };
    for port in &ports {
        let cluster_set = port.backend_set_name(id);
        let local_set = format!("{cluster_set}/local");
        let candidates = candidates_for_port(port, &slice_views);
        let uses_local = policies.internal_local || (policies.external_local && has_external);
        if uses_local {
            plan.backend_sets.push((
                local_set.clone(),
                select_backends(&candidates, node, Scope::Local, None),
            ));
        }
        plan.backend_sets.push((
            cluster_set.clone(),
            select_backends(&candidates, node, Scope::Cluster, zone),
        ));

        let proto = port.protocol.ipproto();
        let mut add_frontend = |addr: Ipv4Addr, frontend_port: u16, kind: FrontendKind| {
            let external = kind != FrontendKind::ClusterIp;
            let local = if external {
                policies.external_local
            } else {
                policies.internal_local
            };
            let mut frontend = Frontend::new(
                if local {
                    local_set.clone()
                } else {
                    cluster_set.clone()
                },
                kind,
                frontend_flags(kind) | affinity | if local { SVC_F_LOCAL } else { 0 },
            );
            frontend.affinity_timeout = policies.affinity_timeout;
            // Pods and nodes keep reaching every endpoint through external addresses (S22).
            if external && local {
                frontend.cluster_set = Some(cluster_set.clone());
            }
            // Only the load balancer's own addresses are filtered, not the NodePort (S14).
            if kind == FrontendKind::LoadBalancer && !policies.source_ranges.is_empty() {
                frontend.flags |= SVC_F_SOURCE_RANGES;
                frontend.source_ranges = policies.source_ranges.clone();
            }
            plan.frontends
                .push((ServiceKey::new(addr, frontend_port, proto), frontend));
        };
        for &ip in &cluster_ips {
            add_frontend(ip, port.port, FrontendKind::ClusterIp);
        }
        if let Some(node_port) = port.node_port {
            for &ip in &node.node_ips {
                add_frontend(ip, node_port, FrontendKind::NodePort);
            }
        }
        for &ip in &external_ips {
            add_frontend(ip, port.port, FrontendKind::ExternalIp);
        }
        for &ip in &load_balancer_ips {
            add_frontend(ip, port.port, FrontendKind::LoadBalancer);
        }
    }
    // S04: a ClusterIP refuses the ports and protocols its service does not have, as
    // kube-proxy does, instead of letting them leave the node. The datapath looks these
    // up (port 0, protocol 0) only when no frontend matched, and an empty set rejects.
    if !cluster_ips.is_empty() {
        let set = other_ports_set_name(id);
        plan.backend_sets.push((set.clone(), Vec::new()));
        for &ip in &cluster_ips {
            plan.frontends.push((
                ServiceKey::new(ip, 0, 0),
                Frontend::new(set.clone(), FrontendKind::ClusterIp, 0),
            ));
        }
    }
    // S23: the health-check node port of an externalTrafficPolicy Local load balancer
    // reports how many ready endpoints this node has.
    if policies.external_local && service_type == "LoadBalancer" {
        match spec.health_check_node_port.map(port_number) {
            Some(Some(hc_port)) => {
                let local_ready: BTreeSet<Ipv4Addr> = slice_views
                    .iter()
                    .flat_map(|slice| slice.endpoints.iter())
                    .filter(|e| e.endpoint.node_name.as_deref() == Some(node.node_name.as_str()))
                    .filter(|e| is_ready(e.endpoint))
                    .map(|e| e.addr)
                    .collect();
                plan.health_check = Some((
                    hc_port,
                    HealthCheckPort {
                        service: id.to_string(),
                        local_endpoints: local_ready.len(),
                    },
                ));
            }
            Some(None) => Reporter::new(problems, "Service", id)
                .problem("healthCheckNodePort out of range 1-65535; no health check".into()),
            None => {}
        }
    }
    Some(plan)
}

/// The empty set behind a service's other-ports frontends (S04). Port set names always
/// hold a `/`, so this one cannot collide with them.
fn other_ports_set_name(service: ObjectId<'_>) -> BackendSetName {
    format!("{service}:*")
}

/// Adds one service's plan to the state. A frontend already claimed by an earlier service
/// stays with it; the later claim is reported and dropped.
fn add_plan(
    state: &mut DesiredState,
    plan: ServicePlan,
    id: ObjectId<'_>,
    problems: &mut Vec<ObjectProblem>,
) {
    let mut report = Reporter::new(problems, "Service", id);
    for (key, frontend) in plan.frontends {
        match state.frontends.entry(key) {
            Entry::Vacant(vacant) => {
                vacant.insert(frontend);
            }
            // The same port reached twice the same way (an address listed twice, an
            // external IP that is also the load-balancer IP): nothing to report.
            Entry::Occupied(existing) if existing.get().backend_set == frontend.backend_set => {}
            Entry::Occupied(existing) => report.problem(format!(
                "{} frontend {} is already used by {}; ignored",
                kind_name(frontend.kind),
                describe_key(&key),
                existing.get().backend_set,
            )),
        }
    }
    // Set names start with the service's namespace/name, and a service's ports have
    // distinct names (checked in `service_ports`), so these never collide.
    if let Some(m) = plan.table_size {
        for (name, _) in &plan.backend_sets {
            state.maglev_table_sizes.insert(name.clone(), m);
        }
    }
    state.backend_sets.extend(plan.backend_sets);
    if let Some((port, check)) = plan.health_check {
        match state.health_checks.entry(port) {
            Entry::Vacant(vacant) => {
                vacant.insert(check);
            }
            Entry::Occupied(existing) => report.problem(format!(
                "healthCheckNodePort {port} is already used by {}; ignored",
                existing.get().service
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backend selection

/// One (endpoint address, target port) pair that may become a backend.
struct Candidate<'a> {
    addr: Ipv4Addr,
    /// The target port as the slice gives it (named targetPorts resolve here, S02).
    port: u16,
    /// Conditions, node name, zone and hints, for selection.
    endpoint: &'a Endpoint,
}

/// Which endpoints a backend set may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Every node's endpoints (traffic policy Cluster).
    Cluster,
    /// This node's endpoints only (traffic policy Local).
    Local,
}

/// Chooses the backends of one backend set from its candidates: sorted, one per
/// address:port. Within the scope: ready endpoints; if none is ready, the serving and
/// terminating ones (S25, applied per scope S26); never serving=false ones. In the cluster
/// scope, topology hints narrow the set to this node's zone when every chosen endpoint has
/// hints and some are for this zone (S33, as kube-proxy does).
fn select_backends(
    candidates: &[Candidate<'_>],
    node: &NodeContext,
    scope: Scope,
    zone: Option<&str>,
) -> Vec<Backend> {
    let in_scope: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|c| {
            scope == Scope::Cluster
                || c.endpoint.node_name.as_deref() == Some(node.node_name.as_str())
        })
        .collect();
    let mut chosen: Vec<&Candidate<'_>> = in_scope
        .iter()
        .copied()
        .filter(|c| is_ready(c.endpoint))
        .collect();
    if chosen.is_empty() {
        chosen = in_scope
            .iter()
            .copied()
            .filter(|c| is_serving_and_terminating(c.endpoint))
            .collect();
    }
    if let (Scope::Cluster, Some(zone)) = (scope, zone) {
        let hinted_zones = |c: &Candidate<'_>| -> Option<Vec<String>> {
            let zones: Vec<String> = c
                .endpoint
                .hints
                .as_ref()?
                .for_zones
                .as_ref()?
                .iter()
                .map(|z| z.name.clone())
                .collect();
            (!zones.is_empty()).then_some(zones)
        };
        let all_hinted = !chosen.is_empty() && chosen.iter().all(|c| hinted_zones(c).is_some());
        if all_hinted {
            let for_zone: Vec<&Candidate<'_>> = chosen
                .iter()
                .copied()
                .filter(|c| hinted_zones(c).is_some_and(|zones| zones.iter().any(|z| z == zone)))
                .collect();
            if !for_zone.is_empty() {
                chosen = for_zone;
            }
        }
    }
    let mut backends: Vec<Backend> = chosen
        .iter()
        .map(|candidate| {
            Backend::new(
                candidate.addr,
                candidate.port,
                backend_flags(candidate.endpoint, node),
            )
        })
        .collect();
    backends.sort();
    // The same address:port from two slices is one backend, whatever its flags say.
    backends.dedup_by(|later, earlier| later.addr == earlier.addr && later.port == earlier.port);
    backends
}

/// Serving and terminating: usable only when nothing in the scope is ready. A missing
/// serving condition means the same as ready (API documentation).
fn is_serving_and_terminating(endpoint: &Endpoint) -> bool {
    let conditions = endpoint.conditions.as_ref();
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    let serving = conditions
        .and_then(|c| c.serving)
        .unwrap_or_else(|| is_ready(endpoint));
    terminating && serving
}

/// Whether the endpoint may receive new connections. A missing condition counts as
/// ready, as the Kubernetes API documents.
fn is_ready(endpoint: &Endpoint) -> bool {
    endpoint
        .conditions
        .as_ref()
        .and_then(|conditions| conditions.ready)
        .unwrap_or(true)
}

fn backend_flags(endpoint: &Endpoint, node: &NodeContext) -> u16 {
    if endpoint.node_name.as_deref() == Some(node.node_name.as_str()) {
        BACKEND_F_LOCAL
    } else {
        0
    }
}

/// The candidates of one service port: every endpoint of every slice port with the same
/// name and protocol, at that slice port's number.
fn candidates_for_port<'a>(port: &PortSpec<'_>, slices: &[SliceView<'a>]) -> Vec<Candidate<'a>> {
    let mut candidates = Vec::new();
    for slice in slices {
        let matching_ports = slice.ports.iter().filter(|slice_port| {
            slice_port.name == port.name && slice_port.protocol == port.protocol.name()
        });
        for slice_port in matching_ports {
            candidates.extend(slice.endpoints.iter().map(|endpoint| Candidate {
                addr: endpoint.addr,
                port: slice_port.port,
                endpoint: endpoint.endpoint,
            }));
        }
    }
    candidates
}

// ---------------------------------------------------------------------------------------
// EndpointSlices

/// The usable parts of one EndpointSlice, validated once per slice.
struct SliceView<'a> {
    ports: Vec<SlicePort<'a>>,
    endpoints: Vec<EndpointView<'a>>,
}

struct SlicePort<'a> {
    /// Empty for an unnamed port (matches an unnamed service port).
    name: &'a str,
    /// As Kubernetes spells it (`TCP`, `UDP`, ...).
    protocol: &'a str,
    port: u16,
}

struct EndpointView<'a> {
    addr: Ipv4Addr,
    endpoint: &'a Endpoint,
}

/// Slices that may carry backends, by the service they belong to, each list in
/// namespace/name order.
fn group_slices_by_service(
    slices: &[EndpointSlice],
) -> BTreeMap<ObjectId<'_>, Vec<&EndpointSlice>> {
    let mut by_service: BTreeMap<ObjectId<'_>, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in sorted_by_id(slices, |s| &s.metadata) {
        if let Some(service) = slice_service(slice) {
            by_service.entry(service).or_default().push(slice);
        }
    }
    by_service
}

/// The service a slice may give backends to, or `None` when it has nothing for this
/// datapath (IPv6 or FQDN addresses, another proxy's, no service label).
pub(super) fn slice_service(slice: &EndpointSlice) -> Option<ObjectId<'_>> {
    if slice.address_type != "IPv4" || is_for_another_proxy(&slice.metadata) {
        return None;
    }
    let name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(LABEL_SERVICE_NAME))?;
    Some(ObjectId {
        namespace: ObjectId::of(&slice.metadata).namespace,
        name,
    })
}

/// The API server's own limits on an EndpointSlice: a larger one cannot come from it, and
/// is ignored whole rather than guessed at.
const MAX_SLICE_ENDPOINTS: usize = 1000;
const MAX_SLICE_PORTS: usize = 100;

fn slice_view<'a>(slice: &'a EndpointSlice, problems: &mut Vec<ObjectProblem>) -> SliceView<'a> {
    let mut report = Reporter::new(problems, "EndpointSlice", ObjectId::of(&slice.metadata));
    let (endpoint_count, port_count) = (
        slice.endpoints.as_ref().map_or(0, Vec::len),
        slice.ports.as_ref().map_or(0, Vec::len),
    );
    if endpoint_count > MAX_SLICE_ENDPOINTS || port_count > MAX_SLICE_PORTS {
        report.problem(format!(
            "{endpoint_count} endpoints and {port_count} ports, more than the API allows \
             ({MAX_SLICE_ENDPOINTS} and {MAX_SLICE_PORTS}); slice ignored"
        ));
        return SliceView {
            ports: Vec::new(),
            endpoints: Vec::new(),
        };
    }
    let mut ports = Vec::new();
    for slice_port in slice.ports.iter().flatten() {
        let name = slice_port.name.as_deref().unwrap_or("");
        let protocol = slice_port.protocol.as_deref().unwrap_or("TCP");
        match slice_port.port.and_then(port_number) {
            Some(port) => ports.push(SlicePort {
                name,
                protocol,
                port,
            }),
            None => report.problem(format!(
                "port {name:?}/{protocol}: port number {} is missing or out of range 1-65535; port ignored",
                slice_port.port.map_or_else(|| "(none)".to_string(), |p| p.to_string()),
            )),
        }
    }

    let mut endpoints = Vec::new();
    for endpoint in slice.endpoints.iter().flatten() {
        // The addresses of one endpoint are fungible (the API says consumers may use only
        // the first, and kube-proxy does); using them all would over-weight the endpoint.
        let Some(address) = endpoint.addresses.first() else {
            report.problem("an endpoint has no address; endpoint ignored".into());
            continue;
        };
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(addr)) => endpoints.push(EndpointView { addr, endpoint }),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => report.problem(format!(
                "endpoint address {address:?} is not an IP address; endpoint ignored"
            )),
        }
    }
    SliceView { ports, endpoints }
}

// ---------------------------------------------------------------------------------------
// Services

/// A service port that passed validation.
struct PortSpec<'a> {
    /// Empty for an unnamed port.
    name: &'a str,
    port: u16,
    protocol: Protocol,
    /// Only for NodePort and LoadBalancer services that have one.
    node_port: Option<u16>,
}

impl PortSpec<'_> {
    /// The port's name, or its number when unnamed.
    fn label(&self) -> Cow<'_, str> {
        if self.name.is_empty() {
            Cow::Owned(self.port.to_string())
        } else {
            Cow::Borrowed(self.name)
        }
    }

    /// e.g. `default/web:http/TCP`.
    fn backend_set_name(&self, service: ObjectId<'_>) -> BackendSetName {
        format!("{service}:{}/{}", self.label(), self.protocol.name())
    }
}

/// The ports of a service that can be served; the others are reported.
fn service_ports<'a>(
    spec: &'a ServiceSpec,
    exposes_node_ports: bool,
    report: &mut Reporter<'_, '_>,
) -> Vec<PortSpec<'a>> {
    let mut ports: Vec<PortSpec<'a>> = Vec::new();
    for service_port in spec.ports.iter().flatten() {
        let name = service_port.name.as_deref().unwrap_or("");
        let what = describe_service_port(
            name,
            service_port.port,
            service_port.protocol.as_deref().unwrap_or("TCP"),
        );
        let protocol = match Protocol::from_k8s(service_port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(reason) => {
                report.problem(format!("{what}: {reason}; port ignored"));
                continue;
            }
        };
        let Some(port) = port_number(service_port.port) else {
            report.problem(format!("{what}: port out of range 1-65535; port ignored"));
            continue;
        };
        let node_port = match service_port.node_port {
            Some(node_port) if exposes_node_ports => {
                let valid = port_number(node_port);
                if valid.is_none() {
                    report.problem(format!(
                        "{what}: nodePort {node_port} out of range 1-65535; no NodePort for this port"
                    ));
                }
                valid
            }
            // A ClusterIP service has no node ports, whatever the manifest says.
            _ => None,
        };
        let candidate = PortSpec {
            name,
            port,
            protocol,
            node_port,
        };
        if ports
            .iter()
            .any(|p| p.port == port && p.protocol == protocol)
        {
            report.problem(format!("{what}: duplicate port and protocol; port ignored"));
            continue;
        }
        // Same name and protocol would mean the same backend set name.
        if ports
            .iter()
            .any(|p| p.protocol == protocol && p.label() == candidate.label())
        {
            report.problem(format!("{what}: duplicate port name; port ignored"));
            continue;
        }
        ports.push(candidate);
    }
    ports
}

/// The IPv4 cluster IPs of a service, or `None` when it gets no datapath state here:
/// headless (no cluster IP, or `None`) or IPv6-only. An unparseable cluster IP is reported
/// and the service keeps its other frontends.
fn cluster_ipv4s(spec: &ServiceSpec, report: &mut Reporter<'_, '_>) -> Option<Vec<Ipv4Addr>> {
    // clusterIPs (dual stack) supersedes clusterIP when present; its first entry equals
    // clusterIP.
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.iter().map(String::as_str).collect(),
    };
    let listed: Vec<&str> = listed.into_iter().filter(|ip| !ip.is_empty()).collect();
    if listed.is_empty() || listed.contains(&"None") {
        return None;
    }
    let mut ipv4s = Vec::new();
    let mut unparseable = false;
    for ip in listed {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ipv4s.push(ip),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                report.problem(format!("clusterIP {ip:?} is not an IP address"));
                unparseable = true;
            }
        }
    }
    if ipv4s.is_empty() && !unparseable {
        return None;
    }
    Some(ipv4s)
}

/// The IPv4 addresses among `listed`; IPv6 ones are skipped, unparseable ones reported.
fn ipv4_addresses<'s>(
    listed: impl IntoIterator<Item = &'s str>,
    field: &str,
    report: &mut Reporter<'_, '_>,
) -> Vec<Ipv4Addr> {
    let mut ipv4s = Vec::new();
    for ip in listed {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ipv4s.push(ip),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => report.problem(format!("{field}: {ip:?} is not an IP address; ignored")),
        }
    }
    ipv4s
}

fn frontend_flags(kind: FrontendKind) -> u32 {
    match kind {
        FrontendKind::ClusterIp => 0,
        FrontendKind::NodePort | FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {
            SVC_F_EXTERNAL
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// Protocols the datapath balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// A Kubernetes protocol name; `None` is the API default, TCP.
    fn from_k8s(name: Option<&str>) -> Result<Self, String> {
        match name.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Err("protocol SCTP is not supported".into()),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }

    /// As Kubernetes spells it.
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }

    fn ipproto(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }
}

/// `namespace/name` of an object. Objects without a namespace are in `default`, where
/// kubectl would have put them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ObjectId<'a> {
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
}

impl<'a> ObjectId<'a> {
    pub(super) fn of(meta: &'a ObjectMeta) -> Self {
        Self {
            namespace: meta
                .namespace
                .as_deref()
                .filter(|namespace| !namespace.is_empty())
                .unwrap_or("default"),
            name: meta.name.as_deref().unwrap_or(""),
        }
    }
}

impl fmt::Display for ObjectId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Collects problems about one object.
pub(super) struct Reporter<'p, 'id> {
    problems: &'p mut Vec<ObjectProblem>,
    kind: &'static str,
    id: ObjectId<'id>,
}

impl<'p, 'id> Reporter<'p, 'id> {
    pub(super) fn new(
        problems: &'p mut Vec<ObjectProblem>,
        kind: &'static str,
        id: ObjectId<'id>,
    ) -> Self {
        Self { problems, kind, id }
    }

    pub(super) fn problem(&mut self, reason: String) {
        self.problems.push(ObjectProblem {
            object: format!("{} {}", self.kind, self.id),
            reason,
        });
    }
}

/// `objects` in namespace/name order. Two objects with the same name (e.g. the same
/// manifest in two files) are ordered by content, so no order of the input leaks out.
pub(super) fn sorted_by_id<T: serde::Serialize>(
    objects: &[T],
    meta: fn(&T) -> &ObjectMeta,
) -> Vec<&T> {
    let mut sorted: Vec<&T> = objects.iter().collect();
    sorted.sort_by(|a, b| {
        ObjectId::of(meta(a))
            .cmp(&ObjectId::of(meta(b)))
            .then_with(|| content_order(*a, *b))
    });
    sorted
}

fn content_order<T: serde::Serialize>(a: &T, b: &T) -> Ordering {
    serde_json::to_vec(a).ok().cmp(&serde_json::to_vec(b).ok())
}

pub(super) fn is_for_another_proxy(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_some_and(|labels| {
        labels.contains_key(LABEL_SERVICE_PROXY_NAME) || labels.contains_key(LABEL_HEADLESS)
    })
}

/// A Kubernetes port number (`i32` in the API) if it is a valid port.
fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&port| port != 0)
}

fn describe_service_port(name: &str, port: i32, protocol: &str) -> String {
    if name.is_empty() {
        format!("port {port}/{protocol}")
    } else {
        format!("port {name:?} ({port}/{protocol})")
    }
}

pub(super) fn describe_key(key: &ServiceKey) -> String {
    let protocol = match key.proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    };
    format!("{}:{}/{protocol}", key.ip(), key.port())
}

pub(super) fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::ExternalIp => "externalIP",
        FrontendKind::LoadBalancer => "LoadBalancer",
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::{json, Value};

    use super::*;

    fn service(value: Value) -> Service {
        serde_json::from_value(value).expect("test Service")
    }

    fn slice(value: Value) -> EndpointSlice {
        serde_json::from_value(value).expect("test EndpointSlice")
    }

    /// A ClusterIP service `default/<name>` with the given ports.
    fn cluster_ip_service(name: &str, cluster_ip: &str, ports: Value) -> Service {
        service(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports},
        }))
    }

    /// An IPv4 slice of `default/<service>`.
    fn endpoint_slice(name: &str, service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
        slice(json!({
            "metadata": {
                "name": name,
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
    }

    fn ready_endpoint(ip: &str, node: &str) -> Value {
        json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true}})
    }

    fn node() -> NodeContext {
        NodeContext {
            node_name: "node-a".into(),
            node_ips: vec![Ipv4Addr::new(192, 168, 1, 10)],
            cluster_cidr: None,
        }
    }

    fn compute(
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
    ) -> (DesiredState, Vec<ObjectProblem>) {
        let cluster = ClusterState {
            services,
            endpoint_slices: slices,
            nodes: Vec::new(),
        };
        desired_state(&cluster, &node())
    }

    /// The frontends of service ports (without the other-ports ones, S04).
    fn port_frontends(state: &DesiredState) -> BTreeMap<ServiceKey, Frontend> {
        state
            .frontends
            .iter()
            .filter(|(key, _)| key.proto != 0)
            .map(|(key, frontend)| (*key, frontend.clone()))
            .collect()
    }

    /// `xlb.io/maglev-table-size` sets M for every set of its service; an invalid value is
    /// one problem for that service, which keeps working with the agent's default.
    #[test]
    fn maglev_annotation_sets_the_table_size_of_its_services_sets_and_bad_values_are_reported() {
        let annotated = |name: &str, ip: &str, value: &str| {
            let mut svc = cluster_ip_service(
                name,
                ip,
                json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]),
            );
            svc.metadata.annotations = Some(
                [(maglev::ANNOTATION_TABLE_SIZE.to_string(), value.to_string())]
                    .into_iter()
                    .collect(),
            );
            svc
        };
        let (state, problems) = compute(
            vec![
                annotated("big", "10.96.0.11", " 4093 "),
                annotated("notprime", "10.96.0.12", "4096"),
                annotated("huge", "10.96.0.13", "131071"),
                annotated("text", "10.96.0.14", "large"),
                web_service_http(),
            ],
            vec![],
        );
        assert_eq!(
            state.maglev_table_sizes,
            [
                ("default/big:*".to_string(), 4093),
                ("default/big:http/TCP".to_string(), 4093)
            ]
            .into_iter()
            .collect(),
            "only the valid annotation, on each of its service's sets"
        );
        let reported: Vec<&str> = problems.iter().map(|p| p.object.as_str()).collect();
        assert_eq!(
            reported,
            [
                "Service default/huge",
                "Service default/notprime",
                "Service default/text"
            ]
        );
        assert!(problems
            .iter()
            .all(|p| p.reason.contains(maglev::ANNOTATION_TABLE_SIZE)
                && p.reason.contains("default table size is used")));
        assert!(problems[1].reason.contains("not a prime"), "{problems:?}");
        // The services with bad values still get their frontends and sets.
        assert!(state.backend_sets.contains_key("default/notprime:http/TCP"));
    }

    #[test]
    fn a_slice_larger_than_the_api_allows_is_ignored_and_reported_while_others_work() {
        let huge: Vec<String> = (0..1001)
            .map(|i| format!("10.244.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let huge: Vec<&str> = huge.iter().map(String::as_str).collect();
        let (state, problems) = compute(
            vec![web_service_http()],
            vec![
                web_slice_http("web-huge", 8080, &huge),
                web_slice_http("web-1", 8080, &["10.244.9.1"]),
            ],
        );
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [backend("10.244.9.1", 8080)]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object, "EndpointSlice default/web-huge");
        assert!(
            problems[0].reason.contains("1001 endpoints"),
            "{}",
            problems[0].reason
        );
    }

    #[test]
    fn s04_a_cluster_ip_refuses_the_ports_its_service_does_not_have() {
        let (state, problems) = compute(vec![web_service_http()], vec![]);
        assert_eq!(problems, vec![]);
        let other = &state.frontends[&ServiceKey::new("10.96.0.10".parse().unwrap(), 0, 0)];
        assert_eq!(other.backend_set, "default/web:*");
        assert_eq!(other.kind, FrontendKind::ClusterIp);
        assert_eq!(backends_of(&state, "default/web:*"), [] as [Backend; 0]);
        // Only the cluster IP: external addresses may serve the node's own ports.
        assert_eq!(state.frontends.keys().filter(|k| k.proto == 0).count(), 1);
    }

    fn key(ip: &str, port: u16, proto: u8) -> ServiceKey {
        ServiceKey::new(ip.parse().unwrap(), port, proto)
    }

    fn backend(ip: &str, port: u16) -> Backend {
        Backend::new(ip.parse().unwrap(), port, 0)
    }

    fn backends_of<'a>(state: &'a DesiredState, set: &str) -> &'a [Backend] {
        state
            .backend_sets
            .get(set)
            .unwrap_or_else(|| panic!("no backend set {set}; have {:?}", state.backend_sets.keys()))
    }

    fn web_slice_http(name: &str, port: i32, ips: &[&str]) -> EndpointSlice {
        let endpoints: Vec<Value> = ips.iter().map(|ip| ready_endpoint(ip, "node-b")).collect();
        endpoint_slice(
            name,
            "web",
            json!([{"name": "http", "port": port, "protocol": "TCP"}]),
            json!(endpoints),
        )
    }

    fn web_service_http() -> Service {
        cluster_ip_service(
            "web",
            "10.96.0.10",
            json!([{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]),
        )
    }

    #[test]
    fn s11_s13_frontends_for_cluster_ip_node_port_external_ip_and_load_balancer() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10"],
                "externalIPs": ["203.0.113.5"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}],
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "lb.example"}]}},
        }));
        let (state, problems) = compute(
            vec![svc],
            vec![web_slice_http("web-1", 8080, &["10.244.1.5"])],
        );
        assert_eq!(problems, vec![]);

        let set = "default/web:http/TCP".to_string();
        let expected = [
            (
                key("10.96.0.10", 80, IPPROTO_TCP),
                FrontendKind::ClusterIp,
                0,
            ),
            (
                key("192.168.1.10", 30080, IPPROTO_TCP),
                FrontendKind::NodePort,
                SVC_F_EXTERNAL,
            ),
            (
                key("203.0.113.5", 80, IPPROTO_TCP),
                FrontendKind::ExternalIp,
                SVC_F_EXTERNAL,
            ),
            (
                key("198.51.100.7", 80, IPPROTO_TCP),
                FrontendKind::LoadBalancer,
                SVC_F_EXTERNAL,
            ),
        ];
        let expected: BTreeMap<ServiceKey, Frontend> = expected
            .into_iter()
            .map(|(key, kind, flags)| (key, Frontend::new(set.clone(), kind, flags)))
            .collect();
        assert_eq!(port_frontends(&state), expected);
        assert_eq!(backends_of(&state, &set), [backend("10.244.1.5", 8080)]);
    }

    #[test]
    fn cluster_ip_service_has_no_node_port_frontend() {
        let svc = cluster_ip_service(
            "web",
            "10.96.0.10",
            json!([{"name": "http", "port": 80, "nodePort": 30080}]),
        );
        let (state, problems) = compute(vec![svc], vec![]);
        assert_eq!(problems, vec![]);
        assert_eq!(
            port_frontends(&state).keys().copied().collect::<Vec<_>>(),
            [key("10.96.0.10", 80, IPPROTO_TCP)]
        );
    }

    #[test]
    fn s02_named_target_port_resolved_per_slice_with_different_numbers() {
        let (state, problems) = compute(
            vec![web_service_http()],
            vec![
                web_slice_http("web-1", 8080, &["10.244.1.5"]),
                web_slice_http("web-2", 9090, &["10.244.2.6"]),
            ],
        );
        assert_eq!(problems, vec![]);
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [backend("10.244.1.5", 8080), backend("10.244.2.6", 9090)]
        );
    }

    #[test]
    fn s03_multi_port_service_sends_each_port_to_its_own_target_port() {
        let svc = cluster_ip_service(
            "web",
            "10.96.0.10",
            json!([{"name": "http", "port": 80}, {"name": "metrics", "port": 9100}]),
        );
        let endpoints = endpoint_slice(
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9102}]),
            json!([ready_endpoint("10.244.1.5", "node-b")]),
        );
        let (state, problems) = compute(vec![svc], vec![endpoints]);
        assert_eq!(problems, vec![]);
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [backend("10.244.1.5", 8080)]
        );
        assert_eq!(
            backends_of(&state, "default/web:metrics/TCP"),
            [backend("10.244.1.5", 9102)]
        );
        assert_eq!(
            state.frontends[&key("10.96.0.10", 9100, IPPROTO_TCP)].backend_set,
            "default/web:metrics/TCP"
        );
        assert_eq!(port_frontends(&state).len(), 2);
    }

    #[test]
    fn s04_tcp_and_udp_on_the_same_port_are_separate() {
        let svc = cluster_ip_service(
            "dns",
            "10.96.0.53",
            json!([
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ]),
        );
        let endpoints = endpoint_slice(
            "dns-1",
            "dns",
            json!([{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}]),
            json!([ready_endpoint("10.244.1.5", "node-b")]),
        );
        let (state, problems) = compute(vec![svc], vec![endpoints]);
        assert_eq!(problems, vec![]);
        assert_eq!(
            state.frontends[&key("10.96.0.53", 53, IPPROTO_UDP)].backend_set,
            "default/dns:dns/UDP"
        );
        assert_eq!(
            state.frontends[&key("10.96.0.53", 53, IPPROTO_TCP)].backend_set,
            "default/dns:dns-tcp/TCP"
        );
        assert_eq!(
            backends_of(&state, "default/dns:dns/UDP"),
            [backend("10.244.1.5", 5353)]
        );
        assert_eq!(
            backends_of(&state, "default/dns:dns-tcp/TCP"),
            [backend("10.244.1.5", 5354)]
        );
    }

    #[test]
    fn unnamed_port_set_is_named_by_port_number_and_matches_unnamed_slice_port() {
        let svc = cluster_ip_service(
            "web",
            "10.96.0.10",
            json!([{"port": 80, "protocol": "UDP"}]),
        );
        let endpoints = endpoint_slice(
            "web-1",
            "web",
            json!([{"name": "", "port": 8080, "protocol": "UDP"}]),
            json!([ready_endpoint("10.244.1.5", "node-b")]),
        );
        let (state, _) = compute(vec![svc], vec![endpoints]);
        assert_eq!(
            backends_of(&state, "default/web:80/UDP"),
            [backend("10.244.1.5", 8080)]
        );
    }

    #[test]
    fn s05_endpoints_of_several_slices_are_merged_without_duplicates() {
        let (state, problems) = compute(
            vec![web_service_http()],
            vec![
                web_slice_http("web-2", 8080, &["10.244.2.6", "10.244.1.5"]),
                web_slice_http("web-1", 8080, &["10.244.1.5", "10.244.3.7"]),
            ],
        );
        assert_eq!(problems, vec![]);
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [
                backend("10.244.1.5", 8080),
                backend("10.244.2.6", 8080),
                backend("10.244.3.7", 8080)
            ]
        );
    }

    #[test]
    fn s25_not_ready_endpoints_excluded_and_missing_ready_counts_as_ready() {
        let endpoints = endpoint_slice(
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([
                {"addresses": ["10.244.1.1"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.3"], "conditions": {}},
                {"addresses": ["10.244.1.4"]},
            ]),
        );
        let (state, _) = compute(vec![web_service_http()], vec![endpoints]);
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [
                backend("10.244.1.1", 8080),
                backend("10.244.1.3", 8080),
                backend("10.244.1.4", 8080)
            ]
        );
    }

    #[test]
    fn s08_headless_and_external_name_services_get_no_state() {
        let headless =
            cluster_ip_service("headless", "None", json!([{"name": "http", "port": 80}]));
        let no_cluster_ip = service(json!({
            "metadata": {"name": "empty", "namespace": "default"},
            "spec": {"ports": [{"port": 80}]},
        }));
        let external_name = service(json!({
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]},
        }));
        let ipv6_only = cluster_ip_service("v6", "fd00::10", json!([{"port": 80}]));
        let slices = vec![endpoint_slice(
            "headless-1",
            "headless",
            json!([{"name": "http", "port": 8080}]),
            json!([ready_endpoint("10.244.1.5", "node-b")]),
        )];
        let (state, problems) = compute(
            vec![headless, no_cluster_ip, external_name, ipv6_only],
            slices,
        );
        assert_eq!(state, DesiredState::default());
        assert_eq!(problems, vec![]);
    }

    #[test]
    fn s09_proxy_name_and_headless_labels_are_ignored_on_services_and_slices() {
        let mut labelled =
            cluster_ip_service("other", "10.96.0.20", json!([{"name": "http", "port": 80}]));
        labelled.metadata.labels = Some(
            [(
                "service.kubernetes.io/service-proxy-name".to_string(),
                "other-proxy".to_string(),
            )]
            .into(),
        );
        let mut headless_labelled_slice = web_slice_http("web-2", 8080, &["10.244.9.9"]);
        headless_labelled_slice
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("service.kubernetes.io/headless".into(), "".into());
        let (state, _) = compute(
            vec![labelled, web_service_http()],
            vec![
                web_slice_http("web-1", 8080, &["10.244.1.5"]),
                headless_labelled_slice,
            ],
        );
        assert!(!state
            .frontends
            .contains_key(&key("10.96.0.20", 80, IPPROTO_TCP)));
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [backend("10.244.1.5", 8080)]
        );
    }

    #[test]
    fn endpoint_on_this_node_gets_local_flag() {
        let endpoints = endpoint_slice(
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([
                ready_endpoint("10.244.1.5", "node-a"),
                ready_endpoint("10.244.2.6", "node-b")
            ]),
        );
        let (state, _) = compute(vec![web_service_http()], vec![endpoints]);
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [
                Backend::new(Ipv4Addr::new(10, 244, 1, 5), 8080, BACKEND_F_LOCAL),
                backend("10.244.2.6", 8080)
            ]
        );
    }

    #[test]
    fn s10_service_without_endpoints_gets_an_empty_backend_set() {
        let (state, problems) = compute(vec![web_service_http()], vec![]);
        assert_eq!(problems, vec![]);
        assert_eq!(backends_of(&state, "default/web:http/TCP"), []);
        assert!(state
            .frontends
            .contains_key(&key("10.96.0.10", 80, IPPROTO_TCP)));
    }

    #[test]
    fn slices_of_other_namespace_or_address_type_are_not_used() {
        let mut other_namespace = web_slice_http("web-1", 8080, &["10.244.1.5"]);
        other_namespace.metadata.namespace = Some("prod".into());
        let ipv6 = slice(json!({
            "metadata": {"name": "web-v6", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::5"]}],
        }));
        let (state, problems) = compute(vec![web_service_http()], vec![other_namespace, ipv6]);
        assert_eq!(problems, vec![]);
        assert_eq!(backends_of(&state, "default/web:http/TCP"), []);
    }

    #[test]
    fn bad_ips_are_reported_while_the_rest_works() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": "10.96.0.999",
                "externalIPs": ["not-an-ip", "203.0.113.5"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
            },
        }));
        let endpoints = endpoint_slice(
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([
                ready_endpoint("10.244.1.5", "node-b"),
                ready_endpoint("10.244.1.x", "node-b")
            ]),
        );
        let healthy = cluster_ip_service("api", "10.96.0.11", json!([{"port": 443}]));
        let (state, problems) = compute(vec![svc, healthy], vec![endpoints]);

        let objects: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.object.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(
            objects,
            [
                (
                    "Service default/web",
                    "clusterIP \"10.96.0.999\" is not an IP address"
                ),
                (
                    "Service default/web",
                    "externalIPs: \"not-an-ip\" is not an IP address; ignored"
                ),
                (
                    "EndpointSlice default/web-1",
                    "endpoint address \"10.244.1.x\" is not an IP address; endpoint ignored"
                ),
            ]
        );
        assert!(state
            .frontends
            .contains_key(&key("10.96.0.11", 443, IPPROTO_TCP)));
        assert!(state
            .frontends
            .contains_key(&key("192.168.1.10", 30080, IPPROTO_TCP)));
        assert!(state
            .frontends
            .contains_key(&key("203.0.113.5", 80, IPPROTO_TCP)));
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [backend("10.244.1.5", 8080)]
        );
    }

    #[test]
    fn invalid_ports_are_reported_and_skipped() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": "10.96.0.10",
                "ports": [
                    {"name": "zero", "port": 0},
                    {"name": "huge", "port": 70000},
                    {"name": "sctp", "port": 9, "protocol": "SCTP"},
                    {"name": "http", "port": 80, "nodePort": 70000},
                    {"name": "again", "port": 80},
                    {"name": "http", "port": 81},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                ],
            },
        }));
        let (state, problems) = compute(vec![svc], vec![]);
        let reasons: Vec<&str> = problems.iter().map(|p| p.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "port \"zero\" (0/TCP): port out of range 1-65535; port ignored",
                "port \"huge\" (70000/TCP): port out of range 1-65535; port ignored",
                "port \"sctp\" (9/SCTP): protocol SCTP is not supported; port ignored",
                "port \"http\" (80/TCP): nodePort 70000 out of range 1-65535; no NodePort for this port",
                "port \"again\" (80/TCP): duplicate port and protocol; port ignored",
                "port \"http\" (81/TCP): duplicate port name; port ignored",
            ]
        );
        assert!(problems.iter().all(|p| p.object == "Service default/web"));
        let keys: Vec<ServiceKey> = port_frontends(&state).keys().copied().collect();
        assert_eq!(
            keys,
            [
                key("10.96.0.10", 53, IPPROTO_UDP),
                key("10.96.0.10", 80, IPPROTO_TCP)
            ]
        );
    }

    #[test]
    fn duplicate_frontend_is_reported_and_the_first_service_keeps_it() {
        let first = cluster_ip_service("a", "10.96.0.10", json!([{"name": "http", "port": 80}]));
        let second = service(json!({
            "metadata": {"name": "b", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.20",
                "externalIPs": ["10.96.0.10"],
                "ports": [{"name": "http", "port": 80}],
            },
        }));
        // Input order must not matter: the second by name loses.
        let (state, problems) = compute(vec![second, first], vec![]);
        assert_eq!(
            problems,
            [ObjectProblem {
                object: "Service default/b".into(),
                reason: "externalIP frontend 10.96.0.10:80/TCP is already used by default/a:http/TCP; ignored"
                    .into(),
            }]
        );
        assert_eq!(
            state.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)].backend_set,
            "default/a:http/TCP"
        );
        assert_eq!(
            state.frontends[&key("10.96.0.20", 80, IPPROTO_TCP)].backend_set,
            "default/b:http/TCP"
        );
    }

    #[test]
    fn load_balancer_ip_in_proxy_mode_is_not_captured() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7", "ipMode": "Proxy"}]}},
        }));
        let (state, _) = compute(vec![svc], vec![]);
        assert!(!state
            .frontends
            .contains_key(&key("198.51.100.7", 80, IPPROTO_TCP)));
        assert!(state
            .frontends
            .contains_key(&key("192.168.1.10", 30080, IPPROTO_TCP)));
    }

    #[test]
    fn deterministic_under_shuffled_input() {
        let services = vec![
            web_service_http(),
            cluster_ip_service("a", "10.96.0.1", json!([{"name": "http", "port": 80}])),
            // Claims a's frontend and has a bad external IP: problems too must not move.
            service(json!({
                "metadata": {"name": "b", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.1", "externalIPs": ["bad"], "ports": [{"name": "http", "port": 80}]},
            })),
            cluster_ip_service("web", "10.96.0.99", json!([{"port": 1}])), // same name twice
            cluster_ip_service(
                "dns",
                "10.96.0.53",
                json!([{"name": "dns", "port": 53, "protocol": "UDP"}]),
            ),
        ];
        let slices = vec![
            web_slice_http("web-1", 8080, &["10.244.1.5", "10.244.1.6"]),
            web_slice_http("web-2", 9090, &["10.244.2.5", "bad"]),
            endpoint_slice(
                "dns-1",
                "dns",
                json!([{"name": "dns", "port": 53, "protocol": "UDP"}]),
                json!([ready_endpoint("10.244.1.5", "node-a")]),
            ),
            endpoint_slice(
                "a-1",
                "a",
                json!([{"name": "http", "port": 80}]),
                json!([ready_endpoint("10.244.3.3", "node-c")]),
            ),
        ];
        let reference = compute(services.clone(), slices.clone());
        assert!(!reference.1.is_empty());

        for rotation in 0..services.len() {
            for reverse in [false, true] {
                let mut shuffled_services = services.clone();
                let mut shuffled_slices = slices.clone();
                shuffled_services.rotate_left(rotation);
                shuffled_slices.rotate_left(rotation % slices.len());
                if reverse {
                    shuffled_services.reverse();
                    shuffled_slices.reverse();
                }
                assert_eq!(compute(shuffled_services, shuffled_slices), reference);
            }
        }
    }

    // --- Traffic policies, endpoint conditions, affinity, source ranges, topology ---

    /// `default/web` (LoadBalancer, 10.96.0.10:80 -> 8080, nodePort 30080, LB 203.0.113.20,
    /// healthCheckNodePort 32000) with `spec` merged in.
    fn lb_service(extra_spec: Value) -> Service {
        let mut value = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "healthCheckNodePort": 32000,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}],
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}]}},
        });
        for (k, v) in extra_spec.as_object().unwrap() {
            value["spec"][k] = v.clone();
        }
        service(value)
    }

    fn slice_with(endpoints: Value) -> EndpointSlice {
        endpoint_slice(
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            endpoints,
        )
    }

    fn two_nodes_ready() -> EndpointSlice {
        slice_with(json!([
            ready_endpoint("10.244.1.2", "node-a"),
            ready_endpoint("10.244.2.2", "node-b")
        ]))
    }

    #[test]
    fn s22_external_traffic_policy_local_uses_local_endpoints_and_keeps_the_cluster_set_for_pods() {
        let (state, problems) = compute(
            vec![lb_service(json!({"externalTrafficPolicy": "Local"}))],
            vec![two_nodes_ready()],
        );
        assert!(problems.is_empty(), "{problems:?}");
        let node_port = &state.frontends[&key("192.168.1.10", 30080, IPPROTO_TCP)];
        assert_eq!(node_port.backend_set, "default/web:http/TCP/local");
        assert_eq!(
            node_port.cluster_set.as_deref(),
            Some("default/web:http/TCP")
        );
        assert_ne!(node_port.flags & SVC_F_LOCAL, 0);
        assert_eq!(backends_of(&state, "default/web:http/TCP/local").len(), 1);
        assert_eq!(backends_of(&state, "default/web:http/TCP").len(), 2);
        // The ClusterIP is not affected by the external policy.
        let cluster_ip = &state.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)];
        assert_eq!(
            (
                cluster_ip.backend_set.as_str(),
                cluster_ip.flags & SVC_F_LOCAL
            ),
            ("default/web:http/TCP", 0)
        );
    }

    #[test]
    fn s24_internal_traffic_policy_local_sends_cluster_ip_traffic_to_local_endpoints_only() {
        let (state, _) = compute(
            vec![lb_service(json!({"internalTrafficPolicy": "Local"}))],
            vec![two_nodes_ready()],
        );
        let cluster_ip = &state.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)];
        assert_eq!(cluster_ip.backend_set, "default/web:http/TCP/local");
        assert_eq!(cluster_ip.cluster_set, None);
        assert_ne!(cluster_ip.flags & SVC_F_LOCAL, 0);
        let node_port = &state.frontends[&key("192.168.1.10", 30080, IPPROTO_TCP)];
        assert_eq!(node_port.backend_set, "default/web:http/TCP");
    }

    #[test]
    fn s25_serving_terminating_endpoints_are_used_only_when_none_is_ready_and_never_unserving_ones()
    {
        let terminating = |ip: &str, serving: bool| {
            json!({"addresses": [ip], "nodeName": "node-b",
                   "conditions": {"ready": false, "serving": serving, "terminating": true}})
        };
        let (state, _) = compute(
            vec![lb_service(json!({}))],
            vec![slice_with(json!([
                terminating("10.244.2.3", true),
                terminating("10.244.2.4", false)
            ]))],
        );
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [backend("10.244.2.3", 8080)]
        );
        let (state, _) = compute(
            vec![lb_service(json!({}))],
            vec![slice_with(json!([
                terminating("10.244.2.3", true),
                ready_endpoint("10.244.2.5", "node-b")
            ]))],
        );
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [backend("10.244.2.5", 8080)]
        );
    }

    #[test]
    fn s26_terminating_fallback_applies_per_scope() {
        // The only local endpoint is terminating; a remote one is ready. The local scope
        // falls back to the local terminating endpoint, the cluster scope uses the ready one.
        let endpoints = json!([
            {"addresses": ["10.244.1.9"], "nodeName": "node-a",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            ready_endpoint("10.244.2.2", "node-b"),
        ]);
        let (state, _) = compute(
            vec![lb_service(json!({"externalTrafficPolicy": "Local"}))],
            vec![slice_with(endpoints)],
        );
        let local: Vec<Ipv4Addr> = backends_of(&state, "default/web:http/TCP/local")
            .iter()
            .map(|b| b.ip())
            .collect();
        assert_eq!(local, [Ipv4Addr::new(10, 244, 1, 9)]);
        assert_eq!(
            backends_of(&state, "default/web:http/TCP"),
            [backend("10.244.2.2", 8080)]
        );
    }

    #[test]
    fn s23_health_check_port_counts_ready_local_endpoints_only() {
        let endpoints = json!([
            ready_endpoint("10.244.1.2", "node-a"),
            {"addresses": ["10.244.1.3"], "nodeName": "node-a",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            ready_endpoint("10.244.2.2", "node-b"),
        ]);
        let (state, _) = compute(
            vec![lb_service(json!({"externalTrafficPolicy": "Local"}))],
            vec![slice_with(endpoints)],
        );
        assert_eq!(
            state.health_checks.get(&32000),
            Some(&HealthCheckPort {
                service: "default/web".into(),
                local_endpoints: 1
            })
        );
        let (state, _) = compute(vec![lb_service(json!({}))], vec![two_nodes_ready()]);
        assert!(
            state.health_checks.is_empty(),
            "only externalTrafficPolicy Local has a health check"
        );
    }

    #[test]
    fn s19_s21_session_affinity_sets_the_flag_and_timeout() {
        let (state, _) = compute(
            vec![lb_service(json!({"sessionAffinity": "ClientIP"}))],
            vec![two_nodes_ready()],
        );
        for frontend in port_frontends(&state).values() {
            assert_ne!(frontend.flags & SVC_F_AFFINITY, 0);
            assert_eq!(frontend.affinity_timeout, 10_800);
        }
        let (state, _) = compute(
            vec![lb_service(json!({"sessionAffinity": "ClientIP",
                                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}))],
            vec![two_nodes_ready()],
        );
        assert!(port_frontends(&state)
            .values()
            .all(|f| f.affinity_timeout == 60));
        let (state, _) = compute(
            vec![lb_service(json!({"sessionAffinity": "None"}))],
            vec![two_nodes_ready()],
        );
        assert!(state
            .frontends
            .values()
            .all(|f| f.flags & SVC_F_AFFINITY == 0));
    }

    #[test]
    fn s14_source_ranges_filter_only_the_load_balancer_ip_and_tolerate_whitespace() {
        let (state, problems) = compute(
            vec![lb_service(
                json!({"loadBalancerSourceRanges": [" 172.18.0.0/24 ", "10.0.0.0/8", "bogus"]}),
            )],
            vec![two_nodes_ready()],
        );
        assert_eq!(
            problems.len(),
            1,
            "the bogus range is reported: {problems:?}"
        );
        let lb = &state.frontends[&key("203.0.113.20", 80, IPPROTO_TCP)];
        assert_ne!(lb.flags & SVC_F_SOURCE_RANGES, 0);
        assert_eq!(
            lb.source_ranges,
            vec![
                "172.18.0.0/24".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]
        );
        let node_port = &state.frontends[&key("192.168.1.10", 30080, IPPROTO_TCP)];
        assert_eq!(node_port.flags & SVC_F_SOURCE_RANGES, 0);
        assert!(node_port.source_ranges.is_empty());
    }

    #[test]
    fn s33_zone_hints_prefer_endpoints_of_this_nodes_zone() {
        let hinted = |ip: &str, node: &str, zone: &str| {
            json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true},
                   "hints": {"forZones": [{"name": zone}]}})
        };
        let endpoints = json!([
            hinted("10.244.1.2", "node-a", "zone-1"),
            hinted("10.244.2.2", "node-b", "zone-2")
        ]);
        let nodes = vec![serde_json::from_value(json!({
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"}}
        }))
        .unwrap()];
        let cluster = ClusterState {
            services: vec![lb_service(json!({}))],
            endpoint_slices: vec![slice_with(endpoints.clone())],
            nodes,
        };
        let (state, _) = desired_state(&cluster, &node());
        let chosen: Vec<Ipv4Addr> = backends_of(&state, "default/web:http/TCP")
            .iter()
            .map(|b| b.ip())
            .collect();
        assert_eq!(chosen, [Ipv4Addr::new(10, 244, 1, 2)]);
        // Without a zone label on the node, hints are ignored.
        let (state, _) = compute(vec![lb_service(json!({}))], vec![slice_with(endpoints)]);
        assert_eq!(backends_of(&state, "default/web:http/TCP").len(), 2);
        // If any endpoint lacks hints, hints are ignored (as kube-proxy does).
        let mixed = json!([
            hinted("10.244.1.2", "node-a", "zone-1"),
            ready_endpoint("10.244.2.2", "node-b")
        ]);
        let cluster = ClusterState {
            services: vec![lb_service(json!({}))],
            endpoint_slices: vec![slice_with(mixed)],
            nodes: cluster.nodes,
        };
        let (state, _) = desired_state(&cluster, &node());
        assert_eq!(backends_of(&state, "default/web:http/TCP").len(), 2);
    }
}
