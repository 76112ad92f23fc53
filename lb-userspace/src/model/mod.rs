//! Pure translation of cluster state into the datapath state this node needs.
//!
//! (Services, EndpointSlices, Nodes, this node) -> `DesiredState`. No IO, no clocks, no
//! BPF: everything here is unit-tested without a kernel or an API server.
use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::{Backend, ServiceKey};

mod compute;
pub mod maglev;
mod view;
pub use compute::desired_state;
pub use view::{ClusterView, ObjectChange, ObjectKey, StateDelta};

/// Everything the agent knows about the cluster at one moment.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

impl ClusterState {
    /// Applies one watch event: an object replaces the one of the same namespace/name
    /// (kept sorted by namespace/name), a deletion removes it.
    pub fn apply(&mut self, change: ObjectChange) {
        fn upsert<T>(objects: &mut Vec<T>, object: T, meta: fn(&T) -> &ObjectMeta) {
            let key = ObjectKey::of(meta(&object));
            match objects.binary_search_by(|o| ObjectKey::of(meta(o)).cmp(&key)) {
                Ok(i) => objects[i] = object,
                Err(i) => objects.insert(i, object),
            }
        }
        fn remove<T>(objects: &mut Vec<T>, key: &ObjectKey, meta: fn(&T) -> &ObjectMeta) {
            objects.retain(|o| &ObjectKey::of(meta(o)) != key);
        }
        match change {
            ObjectChange::Service(s) => upsert(&mut self.services, *s, |s| &s.metadata),
            ObjectChange::ServiceDeleted(key) => remove(&mut self.services, &key, |s| &s.metadata),
            ObjectChange::EndpointSlice(s) => {
                upsert(&mut self.endpoint_slices, *s, |s| &s.metadata)
            }
            ObjectChange::EndpointSliceDeleted(key) => {
                remove(&mut self.endpoint_slices, &key, |s| &s.metadata)
            }
            ObjectChange::Node(n) => upsert(&mut self.nodes, *n, |n| &n.metadata),
            ObjectChange::NodeDeleted(name) => self
                .nodes
                .retain(|n| n.metadata.name.as_deref() != Some(name.as_str())),
        }
    }
}

/// A CIDR block, e.g. 10.244.0.0/16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if prefix > 32 {
            return Err(format!("{s:?}: prefix longer than 32"));
        }
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Who "this node" is.
#[derive(Clone, Debug)]
pub struct NodeContext {
    pub node_name: String,
    /// Addresses that accept NodePorts (from --node-ip, or the uplinks' addresses).
    pub node_ips: Vec<Ipv4Addr>,
    /// Pod CIDR of the whole cluster; sources outside it are masqueraded when needed.
    pub cluster_cidr: Option<Ipv4Cidr>,
}

/// Label of a Node's zone, matched against EndpointSlice hints (S33).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Stable name of a backend set: one service port, one protocol, one traffic scope,
/// e.g. `default/web:http/TCP`. The writer maps names to numeric ids.
pub type BackendSetName = String;

/// The kind of address a frontend answers on (for display and per-kind policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// The backends for this frontend's traffic policy (node-local with `SVC_F_LOCAL`).
    pub backend_set: BackendSetName,
    /// External frontends under externalTrafficPolicy Local: the cluster-wide set that
    /// sources inside the cluster keep using (S22).
    pub cluster_set: Option<BackendSetName>,
    pub kind: FrontendKind,
    /// `lb_common::SVC_F_*` bits.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout, seconds (with `SVC_F_AFFINITY`).
    pub affinity_timeout: u32,
    /// loadBalancerSourceRanges (with `SVC_F_SOURCE_RANGES`).
    pub source_ranges: Vec<Ipv4Cidr>,
}

impl Frontend {
    /// A frontend with no policy beyond its flags.
    pub fn new(backend_set: impl Into<BackendSetName>, kind: FrontendKind, flags: u32) -> Self {
        Self {
            backend_set: backend_set.into(),
            cluster_set: None,
            kind,
            flags,
            affinity_timeout: 0,
            source_ranges: Vec::new(),
        }
    }
}

/// A health-check node port (externalTrafficPolicy Local on a LoadBalancer service, S23).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckPort {
    /// `namespace/name`.
    pub service: String,
    /// Ready endpoints on this node (terminating ones do not count).
    pub local_endpoints: usize,
}

/// What the datapath of this node should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    /// Backends of each set, in a deterministic order (sorted), without duplicates.
    /// An empty list means "the service exists but has no usable endpoint".
    pub backend_sets: BTreeMap<BackendSetName, Vec<Backend>>,
    /// healthCheckNodePort -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheckPort>,
    /// Maglev table size of the sets whose service chose one (`xlb.io/maglev-table-size`);
    /// the others use the agent's `--maglev-table-size`.
    pub maglev_table_sizes: BTreeMap<BackendSetName, u32>,
}

/// A Kubernetes object that could not be used, and why. The rest of the state still applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectProblem {
    /// e.g. `Service default/web`.
    pub object: String,
    pub reason: String,
}

impl std::fmt::Display for ObjectProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}
