//! Processes the testbed starts: spawning into a namespace with logs to a file, and
//! stopping them (SIGTERM, up to 2 s, then SIGKILL). Every pid is also recorded with its
//! start time in `<work dir>/pids`, so a later run can stop exactly these processes if
//! this one died without tearing down — and never a reused pid.
use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::netns::ns_command;

pub(crate) const TERM_GRACE: Duration = Duration::from_secs(2);
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// A process the testbed started and still owns.
pub(crate) struct Proc {
    pub pid: u32,
    pub start_time: u64,
    pub label: String,
    pub log: PathBuf,
    pub child: Child,
}

/// Starts `argv` in `netns`, stdout and stderr appended to `log`, and records it in
/// `pids_file`.
pub(crate) fn spawn(
    netns: &str,
    argv: &[impl AsRef<OsStr>],
    label: &str,
    log: &Path,
    pids_file: &Path,
) -> Result<Proc> {
    let (program, args) = argv.split_first().context("empty command")?;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = ns_command(netns, program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {label}: {cmd:?}"))?;
    let pid = child.id();
    // Set at fork, unchanged by exec: readable right away.
    let start_time = start_time(pid).unwrap_or(0);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(pids_file)
        .with_context(|| format!("opening {}", pids_file.display()))?;
    writeln!(f, "{pid} {start_time} {label}")?;
    Ok(Proc {
        pid,
        start_time,
        label: label.to_string(),
        log: log.to_path_buf(),
        child,
    })
}

/// SIGTERM, wait up to [`TERM_GRACE`], then SIGKILL; always reaps.
pub(crate) fn stop_child(p: &mut Proc) -> std::io::Result<ExitStatus> {
    stop_children(std::slice::from_mut(p)).remove(0)
}

/// [`stop_child`] for many at once: all get SIGTERM first, then share one grace period.
pub(crate) fn stop_children(procs: &mut [Proc]) -> Vec<std::io::Result<ExitStatus>> {
    let mut done: Vec<Option<std::io::Result<ExitStatus>>> = procs
        .iter_mut()
        .map(|p| p.child.try_wait().transpose())
        .collect();
    for (p, d) in procs.iter().zip(&done) {
        if d.is_none() {
            signal(p.pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + TERM_GRACE;
    while done.iter().any(Option::is_none) && Instant::now() < deadline {
        std::thread::sleep(POLL);
        for (p, d) in procs.iter_mut().zip(done.iter_mut()) {
            if d.is_none() {
                *d = p.child.try_wait().transpose();
            }
        }
    }
    procs
        .iter_mut()
        .zip(done)
        .map(|(p, d)| {
            d.unwrap_or_else(|| {
                let _ = p.child.kill();
                p.child.wait()
            })
        })
        .collect()
}

/// Stops a process that is not (or no longer) our child, identified by pid *and* start
/// time: SIGTERM, wait up to [`TERM_GRACE`], then SIGKILL. Does nothing if the pid now
/// belongs to another process.
pub(crate) fn stop_foreign(pid: u32, expected_start: u64) {
    let same = || start_time(pid) == Some(expected_start) && !is_zombie(pid);
    if !same() {
        return;
    }
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if !same() {
            return;
        }
        std::thread::sleep(POLL);
    }
    if same() {
        signal(pid, libc::SIGKILL);
    }
    // Orphans are reaped by init; our own dropped children stay zombies until we exit.
    let deadline = Instant::now() + TERM_GRACE;
    while same() && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall; a stale pid yields ESRCH, which we ignore.
        unsafe { libc::kill(pid, sig) };
    }
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..." — comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    // Fields after ")" start at field 3 (state), so field 22 is index 19.
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s == "Z" || s == "X"))
}

/// Whether a process with this pid exists (a zombie counts).
pub(crate) fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `(pid, start_time)` pairs recorded in a pids file.
pub(crate) fn read_pids_file(path: &Path) -> Vec<(u32, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// The last `lines` lines of a log file (lossy UTF-8); empty if unreadable.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = read_lossy(path);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = std::io::Read::read_to_end(&mut f, &mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}
