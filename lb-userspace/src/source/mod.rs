//! Where cluster state comes from: a directory of manifests (standalone mode) or the
//! Kubernetes API. Both publish whole `ClusterState` snapshots; they never compute
//! datapath state themselves.
pub mod kubernetes;
pub mod manifests;
