//! Loading, attaching and pinning the eBPF programs (`loader`), the only writer of BPF maps
//! (`writer`), read-only views of pinned maps for operators (`reader`), the conntrack
//! garbage collector (`conntrack_gc`), and upgrades across map layouts (`migrate`).
use clap::ValueEnum;

pub mod batch;
pub mod conntrack_gc;
mod loader;
pub mod migrate;
pub mod reader;
pub mod writer;

pub use loader::{Datapath, PROG_CONNECT4, PROG_FLOOR, PROG_TC, PROG_XDP};
pub use writer::MapWriter;

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";

/// Detaches xlb and forgets its state: unpins every link (the programs detach) and map
/// (conntrack is lost) under `pin_path`. What `xlb cleanup` does; an agent restart never does.
pub fn cleanup(pin_path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if !pin_path.exists() {
        return Ok(());
    }
    if !pin_path.join(lb_common::map_name::SERVICES).exists() && !pin_path.join("links").exists() {
        anyhow::bail!(
            "{} does not look like an xlb pin path (no {} map, no links)",
            pin_path.display(),
            lb_common::map_name::SERVICES
        );
    }
    std::fs::remove_dir_all(pin_path).with_context(|| format!("removing {}", pin_path.display()))
}

/// The eBPF object this agent was built with (built and embedded by build.rs).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_EBPF_OBJECT"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UplinkMode {
    /// XDP in driver mode (generic mode where the driver has no XDP support).
    Xdp,
    /// TC ingress (tcx, or clsact where tcx is missing).
    Tc,
}
