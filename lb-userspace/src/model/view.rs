//! The desired state kept up to date object by object.
//!
//! [`desired_state`](super::desired_state) recomputes a whole cluster; at 50 000 services
//! that takes hundreds of milliseconds, far too slow to serve one endpoint change.
//! [`ClusterView`] holds the objects and, per service, the plan that
//! [`plan_service`] made for it. A change to an object re-plans only the services it
//! touches (a slice touches the service it belongs to, before and after the change) and
//! reports exactly which frontends and backend sets changed, so that the map writer
//! touches only those. The result is always equal to `desired_state` over the same
//! objects: the tests below hold it to that over random change sequences.
//!
//! What crosses service boundaries is resolved per key, in the same order as
//! `desired_state` resolves it: a frontend (or health-check port) claimed by several
//! services belongs to the first in namespace/name order, and a backend set is in the
//! state only while an owned frontend points at it.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::ServiceKey;

use super::{
    compute::{
        describe_key, kind_name, plan_service, slice_service, sorted_by_id, ObjectId, Reporter,
    },
    Backend, BackendSetName, ClusterState, DesiredState, Frontend, HealthCheckPort, NodeContext,
    ObjectProblem, LABEL_ZONE,
};

/// `namespace/name` of an object (namespace `default` when empty), owned.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn of(meta: &ObjectMeta) -> Self {
        Self::from_id(ObjectId::of(meta))
    }

    fn from_id(id: ObjectId<'_>) -> Self {
        Self {
            namespace: id.namespace.to_string(),
            name: id.name.to_string(),
        }
    }

    fn id(&self) -> ObjectId<'_> {
        ObjectId {
            namespace: &self.namespace,
            name: &self.name,
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One change to the cluster, as a watch reports it.
#[derive(Clone, Debug)]
pub enum ObjectChange {
    Service(Box<Service>),
    ServiceDeleted(ObjectKey),
    EndpointSlice(Box<EndpointSlice>),
    EndpointSliceDeleted(ObjectKey),
    Node(Box<Node>),
    /// By name (nodes have no namespace).
    NodeDeleted(String),
}

/// What one update changed in the desired state: the keys the writer must look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDelta {
    pub frontends: BTreeSet<ServiceKey>,
    pub backend_sets: BTreeSet<BackendSetName>,
    pub health_checks: bool,
    /// Services whose plan was recomputed.
    pub services_planned: usize,
    /// Problems of the objects this update looked at (each re-planned service reports
    /// all of its problems again; callers de-duplicate).
    pub problems: Vec<ObjectProblem>,
}

impl StateDelta {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.backend_sets.is_empty() && !self.health_checks
    }

    /// Adds `later` to this delta (the union of what either touched).
    pub fn merge(&mut self, later: StateDelta) {
        self.frontends.extend(later.frontends);
        self.backend_sets.extend(later.backend_sets);
        self.health_checks |= later.health_checks;
        self.services_planned += later.services_planned;
        self.problems.extend(later.problems);
    }
}

/// One service's contribution, as planned.
#[derive(Default)]
struct CachedPlan {
    sets: SmallMap<BackendSetName, Vec<Backend>>,
    /// First claim per key within the service (as `desired_state` keeps it).
    frontends: SmallMap<ServiceKey, Frontend>,
    health_check: Option<(u16, HealthCheckPort)>,
    /// Maglev table size of all its sets, from the service's annotation.
    table_size: Option<u32>,
}

pub struct ClusterView {
    node: NodeContext,
    services: BTreeMap<ObjectKey, Service>,
    slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Slice -> the service it feeds (only slices that can feed one).
    slice_owner: BTreeMap<ObjectKey, ObjectKey>,
    slices_of: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// This node's zone (S33), from its Node object.
    zone: Option<String>,
    plans: BTreeMap<ObjectKey, CachedPlan>,
    /// Every service's claim on a frontend key; the first one owns it.
    claims: BTreeMap<ServiceKey, Claims<Frontend>>,
    health_claims: BTreeMap<u16, Claims<HealthCheckPort>>,
    /// Owned frontends pointing at each set (backend or cluster set).
    set_refs: BTreeMap<BackendSetName, usize>,
    set_owner: BTreeMap<BackendSetName, ObjectKey>,
    state: DesiredState,
}

impl ClusterView {
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_owner: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            zone: None,
            plans: BTreeMap::new(),
            claims: BTreeMap::new(),
            health_claims: BTreeMap::new(),
            set_refs: BTreeMap::new(),
            set_owner: BTreeMap::new(),
            state: DesiredState::default(),
        }
    }

    /// The desired state for everything seen so far.
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Applies watch events in order.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = ObjectChange>) -> StateDelta {
        let mut dirty = BTreeSet::new();
        let mut problems = Vec::new();
        for change in changes {
            match change {
                ObjectChange::Service(service) => {
                    self.upsert_service(&service, &mut dirty, &mut problems)
                }
                ObjectChange::ServiceDeleted(key) => {
                    if self.services.remove(&key).is_some() {
                        dirty.insert(key);
                    }
                }
                ObjectChange::EndpointSlice(slice) => self.upsert_slice(&slice, &mut dirty),
                ObjectChange::EndpointSliceDeleted(key) => self.remove_slice(&key, &mut dirty),
                ObjectChange::Node(node) => self.upsert_node(Some(&node), &mut dirty),
                ObjectChange::NodeDeleted(name) => {
                    if name == self.node.node_name {
                        self.upsert_node(None, &mut dirty)
                    }
                }
            }
        }
        let mut delta = self.replan(dirty);
        problems.append(&mut delta.problems);
        delta.problems = problems;
        delta
    }

    /// Makes the view hold exactly `cluster` (a full list, e.g. after a re-list): objects
    /// that are gone are removed, changed ones re-planned, equal ones left alone.
    pub fn replace_all(&mut self, cluster: &ClusterState) -> StateDelta {
        let mut dirty = BTreeSet::new();
        let mut problems = Vec::new();

        let mut listed = BTreeSet::new();
        for service in sorted_by_id(&cluster.services, |s| &s.metadata) {
            let key = ObjectKey::of(&service.metadata);
            if !key.name.is_empty() && !listed.insert(key.clone()) {
                Reporter::new(&mut problems, "Service", key.id())
                    .problem("defined more than once; the first definition is used".into());
                continue;
            }
            self.upsert_service(service, &mut dirty, &mut problems);
        }
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .filter(|key| !listed.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            self.services.remove(&key);
            dirty.insert(key);
        }

        let mut listed = BTreeSet::new();
        for slice in sorted_by_id(&cluster.endpoint_slices, |s| &s.metadata) {
            if listed.insert(ObjectKey::of(&slice.metadata)) {
                self.upsert_slice(slice, &mut dirty);
            }
        }
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .filter(|key| !listed.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            self.remove_slice(&key, &mut dirty);
        }

        let this_node = cluster
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node.node_name.as_str()));
        self.upsert_node(this_node, &mut dirty);

        let mut delta = self.replan(dirty);
        problems.append(&mut delta.problems);
        delta.problems = problems;
        delta
    }

    fn upsert_service(
        &mut self,
        service: &Service,
        dirty: &mut BTreeSet<ObjectKey>,
        problems: &mut Vec<ObjectProblem>,
    ) {
        let key = ObjectKey::of(&service.metadata);
        if key.name.is_empty() {
            Reporter::new(problems, "Service", key.id())
                .problem("metadata.name is missing; service ignored".into());
            return;
        }
        let mut service = service.clone();
        slim(&mut service.metadata);
        if self.services.get(&key) != Some(&service) {
            self.services.insert(key.clone(), service);
            dirty.insert(key);
        }
    }

    fn upsert_slice(&mut self, slice: &EndpointSlice, dirty: &mut BTreeSet<ObjectKey>) {
        let key = ObjectKey::of(&slice.metadata);
        let mut slice = slice.clone();
        slim(&mut slice.metadata);
        if self.slices.get(&key) == Some(&slice) {
            return;
        }
        self.remove_slice(&key, dirty);
        if let Some(service) = slice_service(&slice).map(ObjectKey::from_id) {
            self.slice_owner.insert(key.clone(), service.clone());
            self.slices_of
                .entry(service.clone())
                .or_default()
                .insert(key.clone());
            dirty.insert(service);
        }
        self.slices.insert(key, slice);
    }

    fn remove_slice(&mut self, key: &ObjectKey, dirty: &mut BTreeSet<ObjectKey>) {
        self.slices.remove(key);
        if let Some(service) = self.slice_owner.remove(key) {
            if let Some(slices) = self.slices_of.get_mut(&service) {
                slices.remove(key);
                if slices.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            dirty.insert(service);
        }
    }

    /// Only this node's zone matters; when it changes every service is re-planned.
    fn upsert_node(&mut self, node: Option<&Node>, dirty: &mut BTreeSet<ObjectKey>) {
        if let Some(node) = node {
            if node.metadata.name.as_deref() != Some(self.node.node_name.as_str()) {
                return;
            }
        }
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|labels| labels.get(LABEL_ZONE))
            .cloned();
        if zone != self.zone {
            self.zone = zone;
            dirty.extend(self.services.keys().cloned());
        }
    }

    fn replan(&mut self, dirty: BTreeSet<ObjectKey>) -> StateDelta {
        let mut delta = StateDelta {
            services_planned: dirty.len(),
            ..StateDelta::default()
        };
        let mut touched_keys = BTreeSet::new();
        let mut touched_ports = BTreeSet::new();
        let mut touched_sets = BTreeSet::new();
        for key in dirty {
            let old = self.plans.remove(&key).unwrap_or_default();
            let new = self.plan(&key, &mut delta.problems);

            for (set, backends) in old.sets.iter() {
                if new.sets.get(set) != Some(backends) {
                    touched_sets.insert(set.clone());
                }
                self.set_owner.remove(set);
            }
            for (set, backends) in new.sets.iter() {
                if old.sets.get(set) != Some(backends) || old.table_size != new.table_size {
                    touched_sets.insert(set.clone());
                }
                self.set_owner.insert(set.clone(), key.clone());
            }
            for (frontend_key, frontend) in &old.frontends {
                if new.frontends.get(frontend_key) != Some(frontend) {
                    if let Some(claims) = self.claims.get_mut(frontend_key) {
                        claims.remove(&key);
                    }
                    touched_keys.insert(*frontend_key);
                }
            }
            for (frontend_key, frontend) in &new.frontends {
                if old.frontends.get(frontend_key) != Some(frontend) {
                    self.claims
                        .entry(*frontend_key)
                        .or_default()
                        .insert(key.clone(), frontend.clone());
                    touched_keys.insert(*frontend_key);
                }
            }
            if old.health_check != new.health_check {
                for (port, _) in old.health_check.iter() {
                    if let Some(claims) = self.health_claims.get_mut(port) {
                        claims.remove(&key);
                    }
                    touched_ports.insert(*port);
                }
                for (port, check) in new.health_check.iter() {
                    self.health_claims
                        .entry(*port)
                        .or_default()
                        .insert(key.clone(), check.clone());
                    touched_ports.insert(*port);
                }
            }
            if self.services.contains_key(&key) {
                self.plans.insert(key, new);
            }
        }

        // Frontends: the first claimant owns each key.
        for frontend_key in touched_keys {
            let owner = self
                .claims
                .get(&frontend_key)
                .and_then(|claims| claims.values().next())
                .cloned();
            if let Some(claims) = self.claims.get(&frontend_key) {
                report_conflicts(frontend_key, claims, &mut delta.problems);
                if claims.is_empty() {
                    self.claims.remove(&frontend_key);
                }
            }
            let previous = self.state.frontends.get(&frontend_key);
            if previous == owner.as_ref() {
                continue;
            }
            if let Some(previous) = previous.cloned() {
                for set in sets_of(&previous) {
                    let refs = self.set_refs.entry(set.clone()).or_default();
                    *refs -= 1;
                    if *refs == 0 {
                        self.set_refs.remove(set);
                    }
                    touched_sets.insert(set.clone());
                }
            }
            match owner {
                Some(owner) => {
                    for set in sets_of(&owner) {
                        *self.set_refs.entry(set.clone()).or_default() += 1;
                        touched_sets.insert(set.clone());
                    }
                    self.state.frontends.insert(frontend_key, owner);
                }
                None => {
                    self.state.frontends.remove(&frontend_key);
                }
            }
            delta.frontends.insert(frontend_key);
        }

        // Backend sets: present while an owned frontend points at them.
        for set in touched_sets {
            let owner_plan = self
                .set_refs
                .contains_key(&set)
                .then(|| {
                    self.set_owner
                        .get(&set)
                        .and_then(|owner| self.plans.get(owner))
                })
                .flatten();
            let wanted = owner_plan.and_then(|plan| plan.sets.get(&set));
            let wanted_size = owner_plan
                .filter(|plan| plan.sets.contains_key(&set))
                .and_then(|plan| plan.table_size);
            if self.state.maglev_table_sizes.get(&set).copied() != wanted_size {
                match wanted_size {
                    Some(m) => self.state.maglev_table_sizes.insert(set.clone(), m),
                    None => self.state.maglev_table_sizes.remove(&set),
                };
                delta.backend_sets.insert(set.clone());
            }
            if self.state.backend_sets.get(&set) == wanted {
                continue;
            }
            match wanted {
                Some(backends) => {
                    self.state
                        .backend_sets
                        .insert(set.clone(), backends.clone());
                }
                None => {
                    self.state.backend_sets.remove(&set);
                }
            }
            delta.backend_sets.insert(set);
        }

        for port in touched_ports {
            let claims = self.health_claims.get(&port);
            let owner = claims.and_then(|c| c.values().next()).cloned();
            if let Some(claims) = claims {
                for check in claims.values().skip(1) {
                    delta.problems.push(ObjectProblem {
                        object: format!("Service {}", check.service),
                        reason: format!(
                            "healthCheckNodePort {port} is already used by {}; ignored",
                            owner.as_ref().map_or("", |o| o.service.as_str())
                        ),
                    });
                }
                if claims.is_empty() {
                    self.health_claims.remove(&port);
                }
            }
            if self.state.health_checks.get(&port) != owner.as_ref() {
                match owner {
                    Some(owner) => self.state.health_checks.insert(port, owner),
                    None => self.state.health_checks.remove(&port),
                };
                delta.health_checks = true;
            }
        }
        delta
    }

    /// The plan of one service from its object and its slices (empty when it has none).
    fn plan(&self, key: &ObjectKey, problems: &mut Vec<ObjectProblem>) -> CachedPlan {
        let Some(service) = self.services.get(key) else {
            return CachedPlan::default();
        };
        let slices: Vec<&EndpointSlice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.get(slice))
            .collect();
        let Some(plan) = plan_service(
            service,
            key.id(),
            &slices,
            &self.node,
            self.zone.as_deref(),
            problems,
        ) else {
            return CachedPlan::default();
        };
        let mut cached = CachedPlan {
            sets: plan.backend_sets.into_iter().collect(),
            frontends: SmallMap::default(),
            health_check: plan.health_check,
            table_size: plan.table_size,
        };
        for (frontend_key, frontend) in plan.frontends {
            match cached.frontends.get(&frontend_key) {
                None => {
                    cached.frontends.insert(frontend_key, frontend);
                }
                Some(first) if first.backend_set == frontend.backend_set => {}
                Some(first) => Reporter::new(problems, "Service", key.id()).problem(format!(
                    "{} frontend {} is already used by {}; ignored",
                    kind_name(frontend.kind),
                    describe_key(&frontend_key),
                    first.backend_set,
                )),
            }
        }
        cached
    }
}

/// The sets a frontend keeps in the state.
fn sets_of(frontend: &Frontend) -> impl Iterator<Item = &BackendSetName> {
    std::iter::once(&frontend.backend_set).chain(frontend.cluster_set.as_ref())
}

/// Every claimant of a frontend key but the first is told who owns it.
fn report_conflicts(key: ServiceKey, claims: &Claims<Frontend>, problems: &mut Vec<ObjectProblem>) {
    let mut claims = claims.iter();
    let Some((_, owner)) = claims.next() else {
        return;
    };
    for (service, frontend) in claims {
        Reporter::new(problems, "Service", service.id()).problem(format!(
            "{} frontend {} is already used by {}; ignored",
            kind_name(frontend.kind),
            describe_key(&key),
            owner.backend_set,
        ));
    }
}

/// A map of a few entries as a sorted vector: per service (its plan's sets and frontends)
/// and per frontend key (the services claiming it, nearly always one). A B-tree allocates a
/// node for eleven entries even for one: ~1–1.5 KiB per map, hundreds of MiB at 50 000
/// services.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SmallMap<K, V>(Vec<(K, V)>);

/// The services claiming one frontend key (or health-check port).
type Claims<T> = SmallMap<ObjectKey, T>;

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Ord, V> SmallMap<K, V> {
    fn position(&self, key: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }

    fn insert(&mut self, key: K, value: V) {
        match self.position(&key) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    fn remove(&mut self, key: &K) {
        if let Ok(i) = self.position(key) {
            self.0.remove(i);
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.position(key).ok().map(|i| &self.0[i].1)
    }

    fn contains_key(&self, key: &K) -> bool {
        self.position(key).is_ok()
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SmallMap<K, V> {
    /// Later entries for a key replace earlier ones, as in a map.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let mut map = Self::default();
        for (k, v) in entries {
            map.insert(k, v);
        }
        map
    }
}

impl<'a, K: Ord, V> IntoIterator for &'a SmallMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// kubectl's copy of the whole object as last applied, in an annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no plan reads and what can outweigh the rest of an object many times over:
/// server-side apply's `managedFields` and kubectl's last-applied copy of the object. The
/// view holds every Service and EndpointSlice of the cluster for as long as it runs.
fn slim(metadata: &mut ObjectMeta) {
    metadata.managed_fields = None;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::model::desired_state;

    /// A small deterministic generator (no dependency needed for a test).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    fn node() -> NodeContext {
        NodeContext {
            node_name: "node-a".into(),
            node_ips: vec!["192.168.1.10".parse().unwrap()],
            cluster_cidr: None,
        }
    }

    const NAMES: &[&str] = &["web", "db", "dns", "api", "cache"];
    const NAMESPACES: &[&str] = &["default", "prod"];

    /// Services drawn from small pools, so that cluster IPs, node ports and health-check
    /// ports collide between services.
    fn random_service(rng: &mut Rng) -> Service {
        let name = *rng.pick(NAMES);
        let namespace = *rng.pick(NAMESPACES);
        let kind = *rng.pick(&[
            "ClusterIP",
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
            "Headless",
        ]);
        let mut ports = Vec::new();
        for (port_name, port, protocol, target) in [
            ("http", 80, "TCP", json!("http")),
            ("dns", 53, "UDP", json!(5353)),
            ("alt", 80, "TCP", json!(8081)),
        ] {
            if rng.chance(60) {
                let mut p = json!({"name": port_name, "port": port, "protocol": protocol, "targetPort": target});
                if kind == "NodePort" || kind == "LoadBalancer" {
                    p["nodePort"] = json!(*rng.pick(&[30001, 30002, 30003]));
                }
                ports.push(p);
            }
        }
        let mut spec = json!({
            "type": if kind == "Headless" { "ClusterIP" } else { kind },
            "clusterIP": if kind == "Headless" { "None".to_string() } else {
                format!("10.96.0.{}", rng.below(4) + 1)
            },
            "ports": ports,
        });
        if kind == "ExternalName" {
            spec["externalName"] = json!("example.com");
        }
        if rng.chance(20) {
            spec["externalIPs"] = json!([*rng.pick(&["172.16.0.1", "172.16.0.2"])]);
        }
        if rng.chance(30) {
            spec["externalTrafficPolicy"] = json!("Local");
            if kind == "LoadBalancer" {
                spec["healthCheckNodePort"] = json!(*rng.pick(&[32000, 32001]));
            }
        }
        if rng.chance(20) {
            spec["internalTrafficPolicy"] = json!("Local");
        }
        if rng.chance(20) {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        if rng.chance(20) {
            spec["loadBalancerSourceRanges"] = json!(["10.0.0.0/8"]);
        }
        let mut labels = json!({});
        if rng.chance(10) {
            labels["service.kubernetes.io/service-proxy-name"] = json!("other");
        }
        // Maglev table sizes: valid ones, and one that is reported and ignored.
        let mut annotations = json!({});
        if rng.chance(30) {
            annotations[crate::model::maglev::ANNOTATION_TABLE_SIZE] =
                json!(*rng.pick(&["251", "4093", "4096"]));
        }
        let mut status = json!({});
        if kind == "LoadBalancer" && rng.chance(70) {
            status = json!({"loadBalancer": {"ingress": [{"ip": *rng.pick(&["172.17.0.1", "172.17.0.2"])}]}});
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels,
                         "annotations": annotations},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    fn random_slice(rng: &mut Rng) -> EndpointSlice {
        let service = *rng.pick(NAMES);
        let name = format!("{service}-{}", rng.below(3));
        let namespace = *rng.pick(NAMESPACES);
        let mut endpoints = Vec::new();
        for _ in 0..rng.below(4) {
            let ready = rng.chance(70);
            let mut endpoint = json!({
                "addresses": [format!("10.244.{}.{}", rng.below(2), rng.below(6) + 2)],
                "nodeName": *rng.pick(&["node-a", "node-b"]),
                "zone": *rng.pick(&["zone-1", "zone-2"]),
                "conditions": {"ready": ready, "serving": ready || rng.chance(50), "terminating": !ready && rng.chance(50)},
            });
            if rng.chance(40) {
                endpoint["hints"] =
                    json!({"forZones": [{"name": *rng.pick(&["zone-1", "zone-2"])}]});
            }
            endpoints.push(endpoint);
        }
        let mut labels = json!({"kubernetes.io/service-name": service});
        if rng.chance(10) {
            labels["service.kubernetes.io/headless"] = json!("");
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "addressType": if rng.chance(90) { "IPv4" } else { "IPv6" },
            "ports": [
                {"name": "http", "port": *rng.pick(&[8080, 8090]), "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
                {"name": "alt", "port": 8081, "protocol": "TCP"},
            ],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn random_node(rng: &mut Rng) -> Node {
        let mut labels = json!({});
        if rng.chance(70) {
            labels["topology.kubernetes.io/zone"] = json!(*rng.pick(&["zone-1", "zone-2"]));
        }
        serde_json::from_value(json!({
            "metadata": {"name": *rng.pick(&["node-a", "node-b"]), "labels": labels},
        }))
        .unwrap()
    }

    /// The cluster as the test sees it (the reference `desired_state` input).
    #[derive(Default)]
    struct Truth {
        services: BTreeMap<ObjectKey, Service>,
        slices: BTreeMap<ObjectKey, EndpointSlice>,
        nodes: BTreeMap<String, Node>,
    }

    impl Truth {
        fn cluster(&self) -> ClusterState {
            ClusterState {
                services: self.services.values().cloned().collect(),
                endpoint_slices: self.slices.values().cloned().collect(),
                nodes: self.nodes.values().cloned().collect(),
            }
        }

        fn random_change(&mut self, rng: &mut Rng) -> ObjectChange {
            match rng.below(10) {
                0..=2 => {
                    let service = random_service(rng);
                    self.services
                        .insert(ObjectKey::of(&service.metadata), service.clone());
                    ObjectChange::Service(Box::new(service))
                }
                3 => {
                    let key = ObjectKey {
                        namespace: rng.pick(NAMESPACES).to_string(),
                        name: rng.pick(NAMES).to_string(),
                    };
                    self.services.remove(&key);
                    ObjectChange::ServiceDeleted(key)
                }
                4..=7 => {
                    let slice = random_slice(rng);
                    self.slices
                        .insert(ObjectKey::of(&slice.metadata), slice.clone());
                    ObjectChange::EndpointSlice(Box::new(slice))
                }
                8 => {
                    let key = ObjectKey {
                        namespace: rng.pick(NAMESPACES).to_string(),
                        name: format!("{}-{}", rng.pick(NAMES), rng.below(3)),
                    };
                    self.slices.remove(&key);
                    ObjectChange::EndpointSliceDeleted(key)
                }
                _ if rng.chance(80) => {
                    let node = random_node(rng);
                    self.nodes
                        .insert(node.metadata.name.clone().unwrap(), node.clone());
                    ObjectChange::Node(Box::new(node))
                }
                _ => {
                    let name = rng.pick(&["node-a", "node-b"]).to_string();
                    self.nodes.remove(&name);
                    ObjectChange::NodeDeleted(name)
                }
            }
        }
    }

    /// `delta` names every key whose value differs between `before` and `after`.
    fn assert_delta_covers(before: &DesiredState, after: &DesiredState, delta: &StateDelta) {
        let keys: BTreeSet<&ServiceKey> = before
            .frontends
            .keys()
            .chain(after.frontends.keys())
            .collect();
        for key in keys {
            if before.frontends.get(key) != after.frontends.get(key) {
                assert!(
                    delta.frontends.contains(key),
                    "frontend {key:?} changed but is not in the delta"
                );
            }
        }
        let sets: BTreeSet<&BackendSetName> = before
            .backend_sets
            .keys()
            .chain(after.backend_sets.keys())
            .collect();
        for set in sets {
            if before.backend_sets.get(set) != after.backend_sets.get(set)
                || before.maglev_table_sizes.get(set) != after.maglev_table_sizes.get(set)
            {
                assert!(
                    delta.backend_sets.contains(set),
                    "set {set} changed but is not in the delta"
                );
            }
        }
        if before.health_checks != after.health_checks {
            assert!(
                delta.health_checks,
                "health checks changed but the delta says not"
            );
        }
    }

    #[test]
    fn random_changes_give_the_same_state_as_computing_everything() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut truth = Truth::default();
            let mut view = ClusterView::new(node());
            for step in 0..300 {
                let before = view.state().clone();
                let delta = if rng.chance(5) {
                    // A re-list: the full list replaces what the view holds.
                    for _ in 0..rng.below(4) {
                        truth.random_change(&mut rng);
                    }
                    view.replace_all(&truth.cluster())
                } else {
                    let changes: Vec<ObjectChange> = (0..rng.below(3) + 1)
                        .map(|_| truth.random_change(&mut rng))
                        .collect();
                    view.apply(changes)
                };
                let (expected, _) = desired_state(&truth.cluster(), &node());
                assert_eq!(
                    view.state(),
                    &expected,
                    "seed {seed} step {step}: incremental state differs from the full computation"
                );
                assert_delta_covers(&before, view.state(), &delta);
            }
        }
    }

    #[test]
    fn one_endpoint_change_replans_only_its_service_and_touches_only_its_set() {
        let service = |name: &str, ip: &str| -> Service {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
            }))
            .unwrap()
        };
        let slice = |name: &str, ips: &[&str]| -> EndpointSlice {
            let endpoints: Vec<Value> = ips
                .iter()
                .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
                .collect();
            serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-1"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": endpoints,
            }))
            .unwrap()
        };
        let mut view = ClusterView::new(node());
        let mut cluster = ClusterState::default();
        for i in 0..100 {
            cluster
                .services
                .push(service(&format!("svc-{i}"), &format!("10.96.1.{i}")));
            cluster
                .endpoint_slices
                .push(slice(&format!("svc-{i}"), &[&format!("10.244.0.{i}")]));
        }
        let cold = view.replace_all(&cluster);
        assert_eq!(cold.services_planned, 100);
        assert_eq!(
            cold.frontends.len(),
            200,
            "a port and the other ports (S04) each"
        );

        let delta = view.apply([ObjectChange::EndpointSlice(Box::new(slice(
            "svc-42",
            &["10.244.0.42", "10.244.9.9"],
        )))]);
        assert_eq!(delta.services_planned, 1);
        assert!(
            delta.frontends.is_empty(),
            "no frontend changed: {:?}",
            delta.frontends
        );
        assert_eq!(
            delta.backend_sets,
            BTreeSet::from(["default/svc-42:http/TCP".to_string()])
        );
        assert_eq!(
            view.state().backend_sets["default/svc-42:http/TCP"].len(),
            2
        );

        // The same object again changes nothing.
        let again = view.apply([ObjectChange::EndpointSlice(Box::new(slice(
            "svc-42",
            &["10.244.0.42", "10.244.9.9"],
        )))]);
        assert_eq!(again.services_planned, 0);
        assert!(again.is_empty());

        // A re-list that lost a service removes exactly its state (cilium#48050).
        cluster
            .services
            .retain(|s| s.metadata.name.as_deref() != Some("svc-7"));
        let relist = view.replace_all(&cluster);
        assert_eq!(
            relist.services_planned, 2,
            "svc-7 gone, svc-42's slice back to one endpoint"
        );
        assert!(!view
            .state()
            .backend_sets
            .contains_key("default/svc-7:http/TCP"));
        assert_eq!(view.state().frontends.len(), 198);
        assert_eq!(view.state(), &desired_state(&cluster, &node()).0);
    }

    /// The view keeps no managedFields and no last-applied copy; an object that differs
    /// from the kept one only in those is no change at all; other annotations stay.
    #[test]
    fn the_view_keeps_objects_without_managed_fields_or_last_applied_copies() {
        let service = |generation: u32| -> Service {
            serde_json::from_value(json!({
                "metadata": {
                    "name": "web", "namespace": "default",
                    "annotations": {
                        LAST_APPLIED: format!("{{\"kind\":\"Service\",\"gen\":{generation}}}"),
                        "xlb.io/maglev-table-size": "251",
                    },
                    "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                       "fieldsV1": {"f:spec": {"f:ports": {}}},
                                       "time": format!("2026-11-22T00:00:0{generation}Z")}],
                },
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80, "targetPort": 8080}]},
            }))
            .unwrap()
        };
        let mut view = ClusterView::new(node());
        let first = view.apply([ObjectChange::Service(Box::new(service(1)))]);
        assert_eq!(first.services_planned, 1);
        let kept = &view.services[&ObjectKey::of(&service(1).metadata)];
        assert!(kept.metadata.managed_fields.is_none());
        let annotations = kept.metadata.annotations.as_ref().unwrap();
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(annotations["xlb.io/maglev-table-size"], "251");
        let again = view.apply([ObjectChange::Service(Box::new(service(2)))]);
        assert_eq!(again.services_planned, 0, "only bookkeeping changed");
    }

    #[test]
    fn a_frontend_conflict_moves_to_the_next_claimant_when_the_owner_leaves() {
        let service = |name: &str| -> Service {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80, "targetPort": 8080}]},
            }))
            .unwrap()
        };
        let mut view = ClusterView::new(node());
        let delta = view.apply([
            ObjectChange::Service(Box::new(service("b"))),
            ObjectChange::Service(Box::new(service("a"))),
        ]);
        let key = ServiceKey::new("10.96.0.1".parse().unwrap(), 80, lb_common::IPPROTO_TCP);
        assert_eq!(view.state().frontends[&key].backend_set, "default/a:80/TCP");
        assert!(
            delta
                .problems
                .iter()
                .any(|p| p.object == "Service default/b"
                    && p.reason.contains("already used by default/a:80/TCP")),
            "{:?}",
            delta.problems
        );
        let delta = view.apply([ObjectChange::ServiceDeleted(ObjectKey {
            namespace: "default".into(),
            name: "a".into(),
        })]);
        assert_eq!(view.state().frontends[&key].backend_set, "default/b:80/TCP");
        assert!(delta.backend_sets.contains("default/a:80/TCP"));
        assert!(delta.backend_sets.contains("default/b:80/TCP"));
        assert_eq!(
            view.state().backend_sets.keys().collect::<Vec<_>>(),
            ["default/b:*", "default/b:80/TCP"]
        );
    }
}
