//! Low-level helpers: running commands and code inside a named network namespace,
//! `ip -batch`, sysctls, bpffs, privilege probing.
use std::{
    fs::File,
    io::Write,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, OnceLock},
};

use anyhow::{anyhow, bail, Context, Result};

/// Where `ip netns add` bind-mounts namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";
const BPFFS: &str = "/sys/fs/bpf";

pub(crate) fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// `nsenter --net=/run/netns/NS -- program`. Unlike `ip netns exec`, nsenter enters only
/// the network namespace: /sys (and the bpffs pins under it) stays the host's. nsenter
/// execs the program without forking, so the child's pid is the program's pid.
pub(crate) fn ns_command(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(netns).display()))
        .arg("--")
        .arg(program);
    cmd
}

/// Runs `cmd` to completion; an error (with stderr) unless it exits 0.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Feeds `lines` to `ip [-n NETNS] [-force] -batch -`: one process for many commands.
/// Without `force`, the first failing line stops the batch and is reported.
pub(crate) fn ip_batch(netns: Option<&str>, lines: &[String], force: bool) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for l in lines {
            writeln!(stdin, "{l}").context("writing to `ip -batch`")?;
        }
    }
    let out = child
        .wait_with_output()
        .context("waiting for `ip -batch`")?;
    if !out.status.success() && !force {
        bail!(
            "ip {}-batch failed: {}\nbatch was:\n{}",
            netns.map(|n| format!("-n {n} ")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n")
        );
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has joined `netns`. Sockets created there stay in that
/// namespace wherever they are used later; /proc/sys/net seen from there is the
/// namespace's. The thread ends with `f`, so nothing else ever runs in the namespace.
pub(crate) fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = netns_path(netns);
    let ns = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // SAFETY: plain syscall on a valid fd; it switches only this (scoped) thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns({})", path.display()));
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread in netns {netns} panicked"))?
    })
}

/// Writes sysctls (`net/ipv4/ip_forward` style keys, relative to /proc/sys) in `netns`.
/// Keys listed in `optional` may be absent (e.g. IPv6 disabled in the kernel).
pub(crate) fn sysctls(netns: &str, settings: &[(String, &str)], optional: bool) -> Result<()> {
    in_netns(netns, || {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            if optional && !path.exists() {
                continue;
            }
            std::fs::write(&path, value)
                .with_context(|| format!("netns {netns}: {} = {value}", path.display()))?;
        }
        Ok(())
    })
}

/// Mounts bpffs at /sys/fs/bpf unless something already is.
pub(crate) fn ensure_bpffs() -> Result<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_src, dst, fstype) = (f.next(), f.next(), f.next());
        dst == Some(BPFFS) && fstype == Some("bpf")
    });
    if !mounted {
        run_checked(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
            .context("mounting bpffs")?;
    }
    Ok(())
}

/// Root and able to create network namespaces?
pub(crate) fn privilege_probe() -> &'static Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        // SAFETY: no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(format!("euid is {euid}, not 0"));
        }
        // unshare() on a throwaway thread: only that thread changes namespace.
        let created = std::thread::spawn(|| {
            // SAFETY: plain syscall; affects only this thread, which then exits.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error().to_string())
            }
        })
        .join()
        .map_err(|_| "probe thread panicked".to_string())?;
        created.map_err(|e| format!("cannot create a network namespace: {e}"))
    })
}
