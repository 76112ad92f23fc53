//! Loading, attaching and pinning the eBPF programs (`loader`), the only writer of BPF maps
//! (`writer`), and read-only views of pinned maps for operators (`reader`).
use clap::ValueEnum;

mod loader;
pub mod reader;
pub mod writer;

pub use loader::{Datapath, PROG_FLOOR, PROG_TC, PROG_XDP};
pub use writer::MapWriter;

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";

/// The eBPF object this agent was built with (built and embedded by build.rs).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_EBPF_OBJECT"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UplinkMode {
    /// XDP in driver mode (generic mode where the driver has no XDP support).
    Xdp,
    /// TC ingress (tcx, or clsact where tcx is missing).
    Tc,
}
