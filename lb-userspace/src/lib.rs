//! The xlb agent: turns Kubernetes Services, EndpointSlices and Nodes into the
//! load-balancer maps of the eBPF datapath, and reads those maps back for operators.
//!
//! Owns: the pure computation cluster state -> desired datapath state (`model`), where
//! cluster state comes from (`source`), the only code that loads programs and writes BPF
//! maps (`datapath`), and the network-namespace test cluster shared by the e2e tests, the
//! demo and the benchmarks (`testbed`).
//! Must not: touch packets, or write BPF maps anywhere but `datapath::writer`.
pub mod agent;
pub mod bench;
pub mod datapath;
pub mod http;
pub mod model;
pub mod output;
pub mod source;
pub mod testbed;
