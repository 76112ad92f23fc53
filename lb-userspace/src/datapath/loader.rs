//! Loads the embedded object with its maps pinned under the agent's pin path (adopting maps
//! a previous agent left there), and attaches the programs to interfaces.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{tc, SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::map_name;
use tracing::{info, warn};

use super::{writer::MapWriter, UplinkMode, EBPF_OBJECT};

pub const PROG_XDP: &str = "xlb_xdp";
pub const PROG_TC: &str = "xlb_tc";
/// Parse-only XDP program: the floor the benchmark compares the datapath with.
pub const PROG_FLOOR: &str = "xlb_floor";

/// The loaded datapath: programs, where they are attached, and the pin path of its maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_path: PathBuf,
    /// Interface name -> hook, for everything attached by this agent.
    attached: BTreeMap<String, &'static str>,
}

impl Datapath {
    /// Loads the programs; maps are created and pinned under `pin_path`, or adopted when a
    /// previous agent pinned them there (so conntrack survives a restart).
    pub fn load(pin_path: &Path) -> Result<Self> {
        ensure_bpffs(pin_path)?;
        std::fs::create_dir_all(pin_path)
            .with_context(|| format!("creating pin directory {}", pin_path.display()))?;
        // Some kernels charge map memory to RLIMIT_MEMLOCK; lift it (ignored where unneeded).
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain syscall with a valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_path)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (is this root with CAP_BPF and CAP_NET_ADMIN?)")?;
        for name in map_name::ALL {
            if ebpf.map(name).is_none() {
                bail!("the embedded eBPF object has no map {name}: build mismatch");
            }
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .context("no XDP program in object")?
            .try_into()?;
        xdp.load().context("verifying the XDP program")?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(PROG_TC)
            .context("no TC program in object")?
            .try_into()?;
        tc.load().context("verifying the TC program")?;
        let floor: &mut Xdp = ebpf
            .program_mut(PROG_FLOOR)
            .context("no floor program in object")?
            .try_into()?;
        floor.load().context("verifying the floor program")?;
        Ok(Self {
            ebpf,
            pin_path: pin_path.to_path_buf(),
            attached: BTreeMap::new(),
        })
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// The map writer. Takes the maps out of the loaded object: call once.
    pub fn writer(&mut self) -> Result<MapWriter> {
        MapWriter::from_ebpf(&mut self.ebpf)
    }

    pub fn attached(&self) -> &BTreeMap<String, &'static str> {
        &self.attached
    }

    /// Attaches to an uplink: XDP (driver mode, generic if the driver lacks XDP) or TC.
    pub fn attach_uplink(&mut self, iface: &str, mode: UplinkMode) -> Result<()> {
        match mode {
            UplinkMode::Tc => self.attach_tc(iface),
            UplinkMode::Xdp => {
                let prog: &mut Xdp = self
                    .ebpf
                    .program_mut(PROG_XDP)
                    .context("no XDP program")?
                    .try_into()?;
                match prog.attach(iface, XdpMode::Driver) {
                    Ok(_) => {
                        info!(interface = iface, "attached XDP (driver mode)");
                        self.attached.insert(iface.to_string(), "xdp");
                    }
                    Err(e) => {
                        warn!(interface = iface, error = %e, "driver-mode XDP failed; using generic XDP");
                        prog.attach(iface, XdpMode::Skb)
                            .with_context(|| format!("attaching XDP to {iface}"))?;
                        self.attached.insert(iface.to_string(), "xdp-generic");
                    }
                }
                Ok(())
            }
        }
    }

    /// Attaches the TC program at ingress (tcx on kernels >= 6.6, clsact before).
    pub fn attach_tc(&mut self, iface: &str) -> Result<()> {
        // Needed only for the netlink path; an existing clsact qdisc is fine.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            tracing::debug!(interface = iface, error = %e, "clsact not added (exists, or tcx in use)");
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_TC)
            .context("no TC program")?
            .try_into()?;
        prog.attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching TC to {iface}"))?;
        info!(interface = iface, "attached TC ingress");
        self.attached.insert(iface.to_string(), "tc");
        Ok(())
    }

    /// Forgets an interface that disappeared (its attachment went with it).
    pub fn forget(&mut self, iface: &str) {
        self.attached.remove(iface);
    }

    /// The loaded programs, for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn xdp_program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(PROG_XDP)
            .context("no XDP program")?
            .try_into()?)
    }
    pub fn floor_program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(PROG_FLOOR)
            .context("no floor program")?
            .try_into()?)
    }
    pub fn tc_program(&self) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(PROG_TC)
            .context("no TC program")?
            .try_into()?)
    }
}

/// The pin path must be on a bpffs; mount one at /sys/fs/bpf when it is missing there.
fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let bpffs: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "bpf").then_some(dir)
        })
        .collect();
    if bpffs.iter().any(|dir| pin_path.starts_with(dir)) {
        return Ok(());
    }
    if pin_path.starts_with("/sys/fs/bpf") {
        info!("mounting bpffs at /sys/fs/bpf");
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount")?;
        if status.success() {
            return Ok(());
        }
        bail!("/sys/fs/bpf is not a bpffs and mounting one failed");
    }
    bail!(
        "pin path {} is not on a bpffs (mounted bpffs: {:?}); mount one with `mount -t bpf bpf DIR`",
        pin_path.display(),
        bpffs
    )
}
