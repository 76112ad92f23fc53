//! Loads the embedded object with its maps pinned under the agent's pin path (adopting maps
//! a previous agent left there), and attaches the programs to interfaces.
use std::{
    collections::BTreeMap,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc, CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::map_name;
use tracing::{info, warn};

use super::{writer::MapWriter, UplinkMode, EBPF_OBJECT};

pub const PROG_XDP: &str = "xlb_xdp";
const HOOK_XDP: &str = "xdp";
const HOOK_TC: &str = "tc";
pub const PROG_TC: &str = "xlb_tc";
/// Egress of pod veths and uplinks: replies of endpoints on the node's address (S07).
pub const PROG_TC_EGRESS: &str = "xlb_tc_egress";
const HOOK_TC_EGRESS: &str = "tcegress";
/// Parse-only XDP program: the floor the benchmark compares the datapath with.
pub const PROG_FLOOR: &str = "xlb_floor";
/// cgroup/connect4: connect-time balancing for the node's own processes (S18).
pub const PROG_CONNECT4: &str = "xlb_connect4";
const HOOK_CONNECT4: &str = "connect4";
/// The cgroup socket programs (S18) and their hooks: connect4 and sendmsg4 (unconnected UDP)
/// balance; getpeername4 and recvmsg4 show the service address instead of the backend.
const SOCK_PROGRAMS: [(&str, &str); 4] = [
    (PROG_CONNECT4, HOOK_CONNECT4),
    ("xlb_sendmsg4", "sendmsg4"),
    ("xlb_getpeername4", "getpeername4"),
    ("xlb_recvmsg4", "recvmsg4"),
];

/// The loaded datapath: programs, where they are attached, and the pin path of its maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_path: PathBuf,
    /// Interface name -> hook, for everything attached by this agent.
    attached: BTreeMap<String, &'static str>,
    /// Whether the kernel accepted the connect4 program.
    connect4_loaded: bool,
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
        let egress: &mut SchedClassifier = ebpf
            .program_mut(PROG_TC_EGRESS)
            .context("no TC egress program in object")?
            .try_into()?;
        egress.load().context("verifying the TC egress program")?;
        let floor: &mut Xdp = ebpf
            .program_mut(PROG_FLOOR)
            .context("no floor program in object")?
            .try_into()?;
        floor.load().context("verifying the floor program")?;
        // Optional (S18): a kernel that rejects them (bpf_set_retval needs >= 5.18) still
        // gets the packet datapath.
        let mut connect4_loaded = true;
        for (name, _) in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("no {name} program in object"))?
                .try_into()?;
            if let Err(e) = prog.load() {
                warn!(program = name, error = %e, "cgroup socket program not loaded: node processes will not reach services (S18)");
                connect4_loaded = false;
            }
        }
        Ok(Self {
            connect4_loaded,
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
        // An uplink runs one hook: switching modes between restarts removes the other one.
        let other = match mode {
            UplinkMode::Tc => "xdp",
            UplinkMode::Xdp => "tc",
        };
        self.remove_link_pins(other, iface, None);
        match mode {
            UplinkMode::Tc => self.attach_tc(iface),
            UplinkMode::Xdp => {
                let pin = self.link_pin(HOOK_XDP, iface)?;
                let prog: &mut Xdp = self
                    .ebpf
                    .program_mut(PROG_XDP)
                    .context("no XDP program")?
                    .try_into()?;
                if let Some(old) = open_pinned_link(&pin) {
                    let link = FdLink::from(old).try_into().context("pinned XDP link")?;
                    prog.attach_to_link(link)
                        .with_context(|| format!("replacing the XDP program on {iface}"))?;
                    info!(
                        interface = iface,
                        "replaced the program of the pinned XDP link (no gap)"
                    );
                    self.attached.insert(iface.to_string(), "xdp");
                    return Ok(());
                }
                let id = match prog.attach(iface, XdpMode::Driver) {
                    Ok(id) => {
                        info!(interface = iface, "attached XDP (driver mode)");
                        self.attached.insert(iface.to_string(), "xdp");
                        id
                    }
                    Err(e) => {
                        warn!(interface = iface, error = %e, "driver-mode XDP failed; using generic XDP");
                        let id = prog
                            .attach(iface, XdpMode::Skb)
                            .with_context(|| format!("attaching XDP to {iface}"))?;
                        self.attached.insert(iface.to_string(), "xdp-generic");
                        id
                    }
                };
                let link = prog.take_link(id)?;
                pin_link(FdLink::try_from(link), &pin, iface);
                Ok(())
            }
        }
    }

    /// Attaches the TC program at ingress (tcx on kernels >= 6.6, clsact before). A link
    /// pinned by an earlier agent for this interface gets the new program instead.
    pub fn attach_tc(&mut self, iface: &str) -> Result<()> {
        self.attach_classifier(iface, PROG_TC, HOOK_TC, TcAttachType::Ingress)?;
        self.attached.insert(iface.to_string(), "tc");
        Ok(())
    }

    /// Attaches the egress program (replies of endpoints on the node's own address, S07) to
    /// a pod veth or an uplink, pinned and replaced like the ingress link.
    pub fn attach_tc_egress(&mut self, iface: &str) -> Result<()> {
        self.attach_classifier(iface, PROG_TC_EGRESS, HOOK_TC_EGRESS, TcAttachType::Egress)
    }

    fn attach_classifier(
        &mut self,
        iface: &str,
        program: &str,
        hook: &str,
        direction: TcAttachType,
    ) -> Result<()> {
        let pin = self.link_pin(hook, iface)?;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .with_context(|| format!("no {program} program"))?
            .try_into()?;
        if let Some(old) = open_pinned_link(&pin) {
            let link = FdLink::from(old).try_into().context("pinned TC link")?;
            prog.attach_to_link(link)
                .with_context(|| format!("replacing the {hook} program on {iface}"))?;
            info!(
                interface = iface,
                hook, "replaced the program of the pinned TC link (no gap)"
            );
            return Ok(());
        }
        // Needed only for the netlink path; an existing clsact qdisc is fine.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            tracing::debug!(interface = iface, error = %e, "clsact not added (exists, or tcx in use)");
        }
        let id = prog
            .attach(iface, direction)
            .with_context(|| format!("attaching {hook} to {iface}"))?;
        info!(interface = iface, hook, "attached TC");
        let link = prog.take_link(id)?;
        pin_link(FdLink::try_from(link), &pin, iface);
        Ok(())
    }

    /// Attaches the socket programs (connect4, getpeername4, recvmsg4) to the cgroup v2
    /// directory `cgroup` (S18), each as a link pinned at
    /// `<pin>/links/<hook>-cgroup-<cgroup inode>`. A link an earlier agent pinned for the same
    /// cgroup gets the new program (bpf_link_update, no gap); pins for other cgroups are
    /// removed (detached).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        if !self.connect4_loaded {
            bail!("the cgroup socket programs were not loaded");
        }
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let ino = dir
            .metadata()
            .with_context(|| format!("stat {}", cgroup.display()))?
            .ino();
        let links = self.pin_path.join("links");
        std::fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
        let label = cgroup.display().to_string();
        for (name, hook) in SOCK_PROGRAMS {
            self.remove_link_pins(hook, "cgroup", Some(ino));
            let pin = links.join(format!("{hook}-cgroup-{ino}"));
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("no {name} program"))?
                .try_into()?;
            if pin.exists() {
                match replace_link_program(&pin, prog.fd()?.as_fd()) {
                    Ok(()) => {
                        info!(
                            cgroup = label.as_str(),
                            hook, "replaced the program of the pinned cgroup link (no gap)"
                        );
                        continue;
                    }
                    Err(e) => {
                        warn!(cgroup = label.as_str(), hook, error = %e, "unusable pinned cgroup link; attaching afresh");
                        let _ = std::fs::remove_file(&pin);
                    }
                }
            }
            // bpf_link_create takes no flags for cgroups (EINVAL otherwise): cgroup links
            // always coexist with other programs there, as BPF_F_ALLOW_MULTI attachments do.
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching cgroup/{hook} to {}", cgroup.display()))?;
            info!(cgroup = label.as_str(), hook, "attached a cgroup program");
            let link = prog.take_link(id)?;
            pin_link(FdLink::try_from(link), &pin, &label);
        }
        self.attached.insert(label, HOOK_CONNECT4);
        Ok(())
    }

    /// Detaches the socket programs of an earlier agent (`--cgroup-path off`).
    pub fn detach_cgroup(&self) {
        for (_, hook) in SOCK_PROGRAMS {
            self.remove_link_pins(hook, "cgroup", None);
        }
    }

    /// Where the link of `hook` on `iface` is pinned: `<pin>/links/<hook>-<iface>-<ifindex>`.
    /// The ifindex tells a recreated interface (same name, new index) from the one a pinned
    /// link was made for; pins for other indexes of this name are stale and removed.
    fn link_pin(&self, hook: &str, iface: &str) -> Result<PathBuf> {
        let c_name = std::ffi::CString::new(iface).context("interface name")?;
        // SAFETY: valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        self.remove_link_pins(hook, iface, Some(u64::from(ifindex)));
        let dir = self.pin_path.join("links");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir.join(format!("{hook}-{iface}-{ifindex}")))
    }

    /// Unpins (and so detaches) links of `hook` on `iface`, except the one for `keep`.
    fn remove_link_pins(&self, hook: &str, iface: &str, keep: Option<u64>) {
        let prefix = format!("{hook}-{iface}-");
        let Ok(entries) = std::fs::read_dir(self.pin_path.join("links")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(index) = name.strip_prefix(&prefix) else {
                continue;
            };
            if keep.is_some_and(|k| index == k.to_string()) {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => info!(link = name.as_str(), "removed a stale pinned link"),
                Err(e) => {
                    warn!(link = name.as_str(), error = %e, "could not remove a stale pinned link")
                }
            }
        }
    }

    /// Forgets an interface that disappeared (its attachment went with it) and its pins.
    pub fn forget(&mut self, iface: &str) {
        self.attached.remove(iface);
        for hook in [HOOK_XDP, HOOK_TC, HOOK_TC_EGRESS] {
            self.remove_link_pins(hook, iface, None);
        }
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
    pub fn connect4_program(&self) -> Result<&CgroupSockAddr> {
        Ok(self
            .ebpf
            .program(PROG_CONNECT4)
            .context("no connect4 program")?
            .try_into()?)
    }
    pub fn tc_program(&self) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(PROG_TC)
            .context("no TC program")?
            .try_into()?)
    }
    pub fn tc_egress_program(&self) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(PROG_TC_EGRESS)
            .context("no TC egress program")?
            .try_into()?)
    }
}

/// Swaps `prog` into the link pinned at `pin` (BPF_OBJ_GET, then BPF_LINK_UPDATE): aya has
/// no `attach_to_link` for cgroup programs.
fn replace_link_program(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let mut attr = [0u64; 4];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: attr outlives the call and is large enough for the command.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // union bpf_attr for BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [0u32; 4];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog.as_raw_fd() as u32;
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A link pinned earlier, if there is one.
fn open_pinned_link(path: &Path) -> Option<PinnedLink> {
    if !path.exists() {
        return None;
    }
    match PinnedLink::from_pin(path) {
        Ok(link) => Some(link),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "unusable pinned link; attaching afresh");
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// Pins a new link so the program stays attached when the agent stops or crashes, and the
/// next agent can swap its program in. Netlink-attached programs (kernels without bpf_link
/// for this hook) cannot be pinned: they detach with the agent, and that is logged.
fn pin_link(link: Result<FdLink, LinkError>, path: &Path, iface: &str) {
    match link {
        Ok(fd_link) => match fd_link.pin(path) {
            // Dropping the PinnedLink closes our fd; the pin keeps the link alive.
            Ok(_) => {}
            Err(e) => {
                warn!(interface = iface, error = %e, "could not pin the link: it detaches when xlb exits")
            }
        },
        Err(e) => {
            warn!(interface = iface, error = %e, "not a bpf_link (netlink attach): it detaches when xlb exits")
        }
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
