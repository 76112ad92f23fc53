//! Loading, attaching and pinning the eBPF programs, and the only writer of BPF maps.
use clap::ValueEnum;

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";

/// The eBPF object this agent was built with.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_EBPF_OBJECT"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UplinkMode {
    /// XDP in driver mode (falls back to generic mode where the driver lacks XDP).
    Xdp,
    /// TC (tcx, or clsact where tcx is missing).
    Tc,
}
