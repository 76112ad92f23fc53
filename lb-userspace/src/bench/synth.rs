//! The synthetic cluster every measurement uses: `n` ClusterIP services `bench/svc-<i>`,
//! port `http` 80/TCP, each with `endpoints` ready endpoints on port 8080, none on this node.
//!
//! Addresses: service `i` has ClusterIP 10.96.0.0 + 1 + i (inside 10.96.0.0/12); endpoint `j`
//! of service `i` is 10.244.0.1 + ((i * endpoints + j) mod 32 000), inside 10.244.0.0/17.
//! Clients of the per-packet measurements live in 10.244.200.0/21 and never collide with a
//! backend (a backend that is its own client would be hairpin traffic, which is masqueraded).
use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use lb_common::{Backend, DatapathConfig, ServiceKey, CFG_F_READY, IPPROTO_TCP};

use crate::model::{ClusterState, DesiredState, Frontend, FrontendKind, Ipv4Cidr, NodeContext};

pub const NAMESPACE: &str = "bench";
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const NODE_NAME: &str = "bench-node";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
pub const CLUSTER_CIDR: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(10, 244, 0, 0),
    prefix: 16,
};
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Distinct backend addresses before they repeat (10.244.0.0/17 minus a little).
const BACKEND_ADDRESSES: u32 = 32_000;
/// Addresses of replacement endpoints in the endpoint-change measurement: 10.244.128.0/18.
const REPLACEMENT_BASE: u32 = u32::from_be_bytes([10, 244, 128, 1]);
const REPLACEMENT_ADDRESSES: u32 = 16_000;

pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes([10, 96, 0, 1]) + i as u32)
}

pub fn endpoint_ip(i: usize, j: usize, endpoints: usize) -> Ipv4Addr {
    let k = ((i * endpoints + j) as u64 % u64::from(BACKEND_ADDRESSES)) as u32;
    Ipv4Addr::from(u32::from_be_bytes([10, 244, 0, 1]) + k)
}

/// The `c`-th replacement address of the endpoint-change measurement.
pub fn replacement_ip(c: usize) -> Ipv4Addr {
    Ipv4Addr::from(REPLACEMENT_BASE + (c as u32 % REPLACEMENT_ADDRESSES))
}

/// The backend-set name the model gives service `i`'s port.
pub fn set_name(i: usize) -> String {
    format!("{NAMESPACE}/{}:http/TCP", service_name(i))
}

/// This node as the agent sees it: no endpoint of the synthetic services runs here.
pub fn node() -> NodeContext {
    NodeContext {
        node_name: NODE_NAME.into(),
        node_ips: vec![NODE_IP],
        cluster_cidr: Some(CLUSTER_CIDR),
    }
}

/// The datapath settings `xlb run --cluster-cidr 10.244.0.0/16 --node-ip 172.18.0.11` writes.
pub fn datapath_config() -> DatapathConfig {
    DatapathConfig {
        cluster_cidr_addr: u32::from(CLUSTER_CIDR.addr).to_be(),
        cluster_cidr_mask: CLUSTER_CIDR.mask().to_be(),
        snat_addr: u32::from(NODE_IP).to_be(),
        snat_port_min: 61000,
        snat_port_max: 65535,
        flags: CFG_F_READY,
        _reserved: 0,
        netns_cookie: 0,
    }
}

/// What `model::desired_state` computes for [`cluster`]`(n, endpoints)`, built directly (the
/// large per-packet and programming runs need no Kubernetes objects). A test checks the two
/// agree.
pub fn desired(n: usize, endpoints: usize) -> DesiredState {
    let mut state = DesiredState::default();
    for i in 0..n {
        let mut backends: Vec<Backend> = (0..endpoints)
            .map(|j| Backend::new(endpoint_ip(i, j, endpoints), TARGET_PORT, 0))
            .collect();
        backends.sort();
        state.backend_sets.insert(set_name(i), backends);
        state.frontends.insert(
            ServiceKey::new(cluster_ip(i), SERVICE_PORT, IPPROTO_TCP),
            Frontend::new(set_name(i), FrontendKind::ClusterIp, 0),
        );
        // The ClusterIP's other ports are refused (S04): port 0, protocol 0, empty set.
        let other_ports = format!("{NAMESPACE}/{}:*", service_name(i));
        state.frontends.insert(
            ServiceKey::new(cluster_ip(i), 0, 0),
            Frontend::new(other_ports.clone(), FrontendKind::ClusterIp, 0),
        );
        state.backend_sets.insert(other_ports, Vec::new());
    }
    state
}

/// Adds a frontend `addr:port/TCP` whose one backend is `backend`, as its own set `name`.
pub fn add_service(
    state: &mut DesiredState,
    name: &str,
    (addr, port): (Ipv4Addr, u16),
    backend: (Ipv4Addr, u16),
) {
    state
        .backend_sets
        .insert(name.into(), vec![Backend::new(backend.0, backend.1, 0)]);
    state.frontends.insert(
        ServiceKey::new(addr, port, IPPROTO_TCP),
        Frontend::new(name, FrontendKind::ClusterIp, 0),
    );
}

/// The same services as Kubernetes objects: one Service and one EndpointSlice each.
pub fn cluster(n: usize, endpoints: usize) -> ClusterState {
    ClusterState {
        services: (0..n).map(service).collect(),
        endpoint_slices: (0..n).map(|i| endpoint_slice(i, endpoints)).collect(),
        ..Default::default()
    }
}

fn service(i: usize) -> Service {
    let ip = cluster_ip(i).to_string();
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(i)),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(SERVICE_PORT),
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(i32::from(TARGET_PORT))),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn endpoint_slice(i: usize, endpoints: usize) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-bench", service_name(i))),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service_name(i),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            (0..endpoints)
                .map(|j| Endpoint {
                    addresses: vec![endpoint_ip(i, j, endpoints).to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(format!("worker-{}", j % 8)),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(TARGET_PORT)),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::desired_state;

    #[test]
    fn direct_desired_state_is_what_the_model_computes() {
        let (computed, problems) = desired_state(&cluster(25, 10), &node());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(computed, desired(25, 10));
    }

    #[test]
    fn addresses_stay_in_their_ranges() {
        assert_eq!(cluster_ip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(cluster_ip(99_999), Ipv4Addr::new(10, 97, 134, 160));
        for (i, j) in [(0, 0), (99_999, 9), (3_199, 9)] {
            let ip = endpoint_ip(i, j, 10);
            assert!(
                ip.octets()[..2] == [10, 244] && ip.octets()[2] < 128,
                "{ip}"
            );
        }
        assert!(replacement_ip(15_999).octets()[2] >= 128);
        assert!(replacement_ip(15_999).octets()[2] < 200);
    }
}
