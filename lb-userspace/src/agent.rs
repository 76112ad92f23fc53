//! `xlb run`: wires a source of cluster state to the model and the map writer, attaches
//! the programs, and keeps pod interfaces attached as they come and go.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_common::{DatapathConfig, CFG_F_READY};
use tokio::signal::unix::SignalKind;
use tracing::{error, info, warn};

use crate::{
    datapath::{migrate::Migration, Datapath, MapWriter, UplinkMode},
    http::{self, HealthCheck, HealthState},
    model::{ClusterView, Ipv4Cidr, NodeContext, StateDelta},
    source::{kubernetes, manifests, SourceUpdate},
};

/// Everything `xlb run` needs, already validated by the CLI.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Standalone mode; `None`: the Kubernetes API.
    pub manifests: Option<PathBuf>,
    /// Kubernetes API configuration (default: in-cluster, KUBECONFIG, ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    /// `/metrics`, `/healthz`, `/readyz`; `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// Node health (`/healthz`, kube-proxy's :10256); `None`: off.
    pub healthz_addr: Option<SocketAddr>,
    /// Address the health-check node ports listen on.
    pub health_check_ip: IpAddr,
    pub node_name: String,
    pub interfaces: Vec<String>,
    pub pod_interfaces: Vec<String>,
    pub node_ips: Vec<Ipv4Addr>,
    pub cluster_cidr: Option<Ipv4Cidr>,
    pub pin_path: PathBuf,
    pub uplink_mode: UplinkMode,
    pub snat_ports: (u16, u16),
    pub ready_file: Option<PathBuf>,
    /// cgroup v2 directory the connect4 program (S18) attaches to; `None`: off.
    pub cgroup_path: Option<PathBuf>,
    /// Conntrack expiry by state, and how often the collector sweeps.
    pub conntrack_timeouts: crate::datapath::conntrack_gc::Timeouts,
    pub conntrack_gc_interval: Duration,
    /// Maglev table size of services that do not choose one.
    pub maglev_table_size: u32,
}

/// The first cgroup v2 mount in /proc/self/mounts (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// This process's network-namespace cookie (SO_NETNS_COOKIE, Linux >= 5.14); 0 when the
/// kernel cannot tell (the connect4 program then acts for no socket).
pub fn netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket syscalls with valid pointers; the socket is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return 0;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        libc::close(fd);
        if rc == 0 {
            cookie
        } else {
            0
        }
    }
}

/// Parses `MIN-MAX`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16)> {
    let (min, max) = s
        .split_once('-')
        .with_context(|| format!("{s:?}: expected MIN-MAX"))?;
    let min: u16 = min
        .trim()
        .parse()
        .with_context(|| format!("{s:?}: bad MIN"))?;
    let max: u16 = max
        .trim()
        .parse()
        .with_context(|| format!("{s:?}: bad MAX"))?;
    if min == 0 || min > max {
        bail!("{s:?}: need 0 < MIN <= MAX");
    }
    Ok((min, max))
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    if cfg.interfaces.is_empty() && cfg.pod_interfaces.is_empty() {
        bail!("nothing to attach to: give --interface and/or --pod-interface");
    }
    let mut datapath = Datapath::load(&cfg.pin_path)?;
    // Maps of an earlier layout: carry conntrack and backend sets over before the new
    // programs take over, and before the writer adopts what is pinned.
    let migration = Migration::start(&cfg.pin_path)?;
    let mut writer = datapath.writer()?;
    writer.set_default_table_size(cfg.maglev_table_size)?;
    let node_ips = if cfg.node_ips.is_empty() {
        interface_addresses(&cfg.interfaces)?
    } else {
        cfg.node_ips.clone()
    };
    if node_ips.is_empty() {
        warn!("no node address known (no --node-ip, uplinks have no IPv4): NodePorts and masquerade are off");
    }
    let snat_addr = node_ips.first().copied();
    let netns_cookie = match &cfg.cgroup_path {
        Some(_) => netns_cookie(),
        None => 0,
    };
    if cfg.cgroup_path.is_some() && netns_cookie == 0 {
        warn!("no network-namespace cookie (SO_NETNS_COOKIE needs Linux >= 5.14): node processes will not reach services (S18)");
    }
    writer.write_config(&DatapathConfig {
        cluster_cidr_addr: cfg
            .cluster_cidr
            .map_or(0, |c| (u32::from(c.addr) & c.mask()).to_be()),
        cluster_cidr_mask: cfg.cluster_cidr.map_or(0, |c| c.mask().to_be()),
        snat_addr: snat_addr.map_or(0, |a| u32::from(a).to_be()),
        snat_port_min: cfg.snat_ports.0,
        snat_port_max: cfg.snat_ports.1,
        flags: CFG_F_READY,
        _reserved: 0,
        netns_cookie,
    })?;
    // After the config (the programs read it on every packet).
    for iface in &cfg.interfaces {
        // Translated packets are handed to the stack with a node address as source
        // (masquerade, NodePort replies): without accept_local it drops them as martians.
        set_sysctl(iface, "accept_local", "1");
        set_sysctl(iface, "send_redirects", "0");
        datapath.attach_uplink(iface, cfg.uplink_mode)?;
        // Replies of endpoints on the node's own address leave here (S07).
        datapath.attach_tc_egress(iface)?;
    }
    // After the config: the program acts only once it knows this namespace's cookie.
    // Not fatal: the packet datapath matters more than node processes reaching services.
    match &cfg.cgroup_path {
        Some(path) => {
            if let Err(e) = datapath.attach_cgroup(path) {
                warn!(cgroup = %path.display(), error = format!("{e:#}"), "node processes will not reach services (S18)");
            }
        }
        None => datapath.detach_cgroup(),
    }
    let node = NodeContext {
        node_name: cfg.node_name.clone(),
        node_ips,
        cluster_cidr: cfg.cluster_cidr,
    };
    info!(node = node.node_name.as_str(), node_ips = ?node.node_ips, pin_path = %cfg.pin_path.display(), "datapath loaded");

    // Conntrack garbage collector: LRU maps have no expiry of their own.
    {
        let (pin, timeouts, interval) = (
            cfg.pin_path.clone(),
            cfg.conntrack_timeouts,
            cfg.conntrack_gc_interval,
        );
        std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || crate::datapath::conntrack_gc::run(&pin, timeouts, interval))?;
    }

    let mut pods = PodInterfaces::new(cfg.pod_interfaces.clone());
    pods.sync(&mut datapath, &mut writer);
    // Every hook now runs the new programs: the retired maps can go.
    if !migration.is_empty() {
        migration.finish()?;
    }

    let health = Arc::new(HealthState::new());
    serve_http(&cfg, &health);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let source = match &cfg.manifests {
        Some(dir) => {
            info!(dir = %dir.display(), "standalone mode: watching manifests");
            tokio::spawn(manifests::watch(
                dir.clone(),
                Duration::from_millis(250),
                tx,
            ))
        }
        None => {
            let client = kubernetes::client(cfg.kubeconfig.as_deref()).await?;
            info!("watching Services, EndpointSlices and Nodes through the Kubernetes API");
            tokio::spawn(kubernetes::watch(client, tx))
        }
    };

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut rescan = tokio::time::interval(Duration::from_secs(1));
    let mut reported = BTreeSet::new();
    let mut ready = false;
    let mut view = ClusterView::new(node.clone());
    // The first apply compares everything (the adopted maps may hold anything), and so
    // does the one after a failure; the others look only at what changed.
    let mut full_apply = true;
    loop {
        tokio::select! {
            update = rx.recv() => {
                let Some(update) = update else {
                    // The source ended: surface its error.
                    match source.await {
                        Ok(Ok(())) => bail!("state source stopped"),
                        Ok(Err(e)) => return Err(e.context("state source failed")),
                        Err(e) => bail!("state source panicked: {e}"),
                    }
                };
                let started = Instant::now();
                let mut delta = update_view(&mut view, update);
                // Whatever else is queued goes into the same apply.
                while let Ok(update) = rx.try_recv() {
                    delta.merge(update_view(&mut view, update));
                }
                let applied = apply(&view, &delta, full_apply, &mut writer, &mut reported, &health, started);
                full_apply = !applied;
                if applied && !ready {
                    ready = true;
                    health.set_ready(true);
                    if let Some(path) = &cfg.ready_file {
                        std::fs::write(path, b"ready\n").with_context(|| format!("writing {}", path.display()))?;
                    }
                    info!("ready");
                }
            }
            _ = rescan.tick() => pods.sync(&mut datapath, &mut writer),
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!(
        "stopping: the programs stay attached and the maps pinned at {} (the next agent takes \
         over without a gap; `xlb cleanup --pin-path {}` removes them)",
        cfg.pin_path.display(),
        cfg.pin_path.display()
    );
    if let Some(path) = &cfg.ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn update_view(view: &mut ClusterView, update: SourceUpdate) -> StateDelta {
    match update {
        SourceUpdate::Snapshot(cluster) => view.replace_all(&cluster),
        SourceUpdate::Changes(changes) => view.apply(changes),
    }
}

/// Applies the view's state to the maps: everything when `full`, else what `delta`
/// names. Returns whether the maps now hold the state.
fn apply(
    view: &ClusterView,
    delta: &StateDelta,
    full: bool,
    writer: &mut MapWriter,
    reported: &mut BTreeSet<String>,
    health: &HealthState,
    started: Instant,
) -> bool {
    let desired = view.state();
    for problem in &delta.problems {
        // Report each problem once, not on every change elsewhere.
        if reported.insert(problem.to_string()) {
            warn!(
                object = problem.object.as_str(),
                reason = problem.reason.as_str(),
                "object ignored"
            );
        }
    }
    if full || delta.health_checks {
        health.set_health_check_ports(
            desired
                .health_checks
                .iter()
                .map(|(port, hc)| {
                    (
                        *port,
                        HealthCheck {
                            service: hc.service.clone(),
                            local_endpoints: hc.local_endpoints,
                        },
                    )
                })
                .collect(),
        );
    }
    let result = if full {
        writer.apply(desired)
    } else {
        writer.apply_delta(desired, delta)
    };
    health.record_apply(
        result.is_ok(),
        started.elapsed(),
        result.as_ref().map_or(0, |s| s.map_ops),
    );
    match result {
        Ok(stats) => {
            health.set_services(desired.frontends.len(), desired.backend_sets.len());
            health.set_last_sync(std::time::SystemTime::now());
            if stats.changed() {
                info!(
                    frontends = desired.frontends.len(),
                    backend_sets = desired.backend_sets.len(),
                    services_planned = delta.services_planned,
                    ?stats,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "datapath updated"
                );
            }
            if stats.map_ops >= LARGE_APPLY_MAP_OPS {
                release_free_memory();
            }
            true
        }
        Err(e) => {
            error!(
                error = format!("{e:#}"),
                "applying state failed; will retry on the next change"
            );
            false
        }
    }
}

/// Starts the HTTP endpoints. A port that cannot be bound is logged, not fatal: the
/// datapath matters more than its metrics.
fn serve_http(cfg: &AgentConfig, health: &Arc<HealthState>) {
    if let Some(addr) = cfg.metrics_addr {
        let (health, pin) = (health.clone(), cfg.pin_path.clone());
        tokio::spawn(async move {
            if let Err(e) = http::serve_metrics(addr, health, pin).await {
                warn!(%addr, error = format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    if let Some(addr) = cfg.healthz_addr {
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve_node_health(addr, health).await {
                warn!(%addr, error = format!("{e:#}"), "node health endpoint stopped");
            }
        });
    }
    let (health, ip) = (health.clone(), cfg.health_check_ip);
    tokio::spawn(async move {
        if let Err(e) = http::serve_health_check_ports(ip, health).await {
            warn!(error = format!("{e:#}"), "health-check node ports stopped");
        }
    });
}

/// Sets a per-interface IPv4 sysctl when it differs (so an unprivileged container whose
/// init step already set it does not warn on every start).
fn set_sysctl(iface: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/{key}");
    if std::fs::read_to_string(&path).is_ok_and(|current| current.trim() == value) {
        return;
    }
    if let Err(e) = std::fs::write(&path, value) {
        warn!(path, error = %e, "could not set sysctl");
    }
}

/// IPv4 addresses of the given interfaces, in the current network namespace.
fn interface_addresses(interfaces: &[String]) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur walks the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET {
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
            if interfaces.iter().any(|i| *i == name) {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Interface names in the current network namespace (if_nameindex is per netns, unlike
/// /sys/class/net, which shows the namespace sysfs was mounted in).
pub fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut cur = list;
        while (*cur).if_index != 0 {
            names.push(
                CStr::from_ptr((*cur).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            cur = cur.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

/// An apply this large (a first apply, a re-list) leaves transient buffers behind: Maglev
/// tables and batches, ~100 MiB at 50 000 services, and the parsed manifests of a snapshot.
const LARGE_APPLY_MAP_OPS: usize = 10_000;

/// Hands memory freed inside the heap back to the system. glibc keeps it otherwise (it
/// returns only the top of each arena, and the Maglev tables are built on another thread,
/// in another arena), so the agent's resident size would stay at its peak for good.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no arguments besides the padding to keep; walks malloc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `*` and `?` globbing, as in `--pod-interface 'veth*'`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn m(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], n) || (!n.is_empty() && m(p, &n[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &n[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), name.as_bytes())
}

/// Pod-facing interfaces: attach TC to every interface matching a pattern, including ones
/// created after start, and forget ones that disappeared. The veths among them are
/// registered in the pod-device map, so that translated packets for their pods go straight
/// into them (`bpf_redirect_peer`, docs/datapath.md).
struct PodInterfaces {
    patterns: Vec<String>,
    attached: BTreeSet<String>,
    failed: BTreeSet<String>,
    /// Interface index of each attached veth.
    veths: BTreeMap<String, u32>,
    /// The pod-device map may not hold `veths` (first sync, or a failed write).
    devices_stale: bool,
    /// Why the last write of the pod-device map failed, so it is reported once.
    devices_error: Option<String>,
}

impl PodInterfaces {
    fn new(patterns: Vec<String>) -> Self {
        Self {
            patterns,
            attached: BTreeSet::new(),
            failed: BTreeSet::new(),
            veths: BTreeMap::new(),
            devices_stale: true,
            devices_error: None,
        }
    }

    fn sync(&mut self, datapath: &mut Datapath, writer: &mut MapWriter) {
        let present: BTreeSet<String> = if self.patterns.is_empty() {
            BTreeSet::new()
        } else {
            interface_names()
                .into_iter()
                .filter(|n| self.patterns.iter().any(|p| glob_match(p, n)))
                .collect()
        };
        for name in present.difference(&self.attached.clone()) {
            match datapath
                .attach_tc(name)
                .and_then(|()| datapath.attach_tc_egress(name))
            {
                Ok(()) => {
                    self.attached.insert(name.clone());
                    self.failed.remove(name);
                    if let Some(ifindex) = veth_index(name) {
                        self.veths.insert(name.clone(), ifindex);
                        self.devices_stale = true;
                    }
                }
                Err(e) => {
                    if self.failed.insert(name.clone()) {
                        warn!(
                            interface = name.as_str(),
                            error = format!("{e:#}"),
                            "attaching TC failed; will retry"
                        );
                    }
                }
            }
        }
        for name in self.attached.clone().difference(&present) {
            info!(interface = name.as_str(), "pod interface gone");
            self.attached.remove(name);
            self.devices_stale |= self.veths.remove(name).is_some();
            datapath.forget(name);
        }
        if self.devices_stale {
            let ifindexes: BTreeSet<u32> = self.veths.values().copied().collect();
            match writer.set_pod_devices(&ifindexes) {
                Ok(_) => {
                    self.devices_stale = false;
                    self.devices_error = None;
                }
                // Packets for these pods go out of their veth meanwhile (one queue more).
                Err(e) => {
                    let error = format!("{e:#}");
                    if self.devices_error.as_ref() != Some(&error) {
                        warn!(
                            error = error.as_str(),
                            "registering pod veths failed; will retry"
                        );
                        self.devices_error = Some(error);
                    }
                }
            }
        }
    }
}

/// The interface index of `iface` if it is a veth or netkit device (its driver as
/// `ethtool -i` names it): only a device with a peer can take `bpf_redirect_peer`.
fn veth_index(iface: &str) -> Option<u32> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DriverInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    let name = std::ffi::CString::new(iface).ok()?;
    if name.as_bytes().len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain syscall; the descriptor is owned (closed on drop) from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let _fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid value of both plain C structs.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *to = *from as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut DriverInfo).cast();
    // SAFETY: SIOCETHTOOL with a request naming the interface and pointing at `info`,
    // which outlives the call.
    if unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut request) } != 0 {
        return None;
    }
    let driver = CStr::from_bytes_until_nul(&info.driver).ok()?.to_bytes();
    if driver != b"veth" && driver != b"netkit" {
        return None;
    }
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (ifindex != 0).then_some(ifindex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_a_shell() {
        assert!(glob_match("veth*", "veth1234"));
        assert!(glob_match("xv*", "xv"));
        assert!(glob_match("eth?", "eth0"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(!glob_match("eth?", "eth10"));
        assert!(glob_match("*", "anything"));
    }

    #[test]
    fn port_range_parses_and_rejects_nonsense() {
        assert_eq!(parse_port_range("61000-65535").unwrap(), (61000, 65535));
        assert!(parse_port_range("65535-61000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("abc").is_err());
    }
}
