//! What the bench creates on the machine and how it gives it back, plus the facts the report
//! is stamped with.
//!
//! Everything is named after this process: pins under `/sys/fs/bpf/xlb-bench/<pid>-<n>/`,
//! network namespaces `xlb-bench-<pid>-<n>`, work directories `$TMPDIR/xlb-bench-<pid>-<n>`.
//! Each is removed when its guard drops, also when a step fails or panics. Nothing else on
//! the machine is touched.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Parent of every pin directory the bench creates.
pub const PIN_ROOT: &str = "/sys/fs/bpf/xlb-bench";
/// Prefix of every network namespace the bench creates.
pub const NETNS_PREFIX: &str = "xlb-bench-";

static SEQ: AtomicU32 = AtomicU32::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// `<pid>-<n>`, unique within this process.
fn next_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh bpffs directory for one datapath's maps; removed (with the maps) on drop.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> Result<Self> {
        loop {
            let path = Path::new(PIN_ROOT).join(next_id());
            // A directory of that name belongs to an earlier process that had our pid: not
            // ours to remove, so take the next number.
            if !path.exists() {
                return Ok(Self { path });
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        // The shared parent goes with the last directory in it (fails harmlessly before).
        let _ = std::fs::remove_dir(PIN_ROOT);
    }
}

/// A scratch directory (rule files, manifests, logs); removed on drop.
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    pub fn new() -> Result<Self> {
        loop {
            let path = std::env::temp_dir().join(format!("xlb-bench-{}", next_id()));
            if path.exists() {
                continue;
            }
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            return Ok(Self { path });
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A network namespace of our own (`ip netns add`), deleted on drop after its nftables
/// ruleset is flushed (so the kernel frees big rulesets now rather than in the background
/// of the next measurement).
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create() -> Result<Self> {
        loop {
            let name = format!("{NETNS_PREFIX}{}", next_id());
            if Path::new("/run/netns").join(&name).exists() {
                continue;
            }
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .context("running `ip netns add` (is iproute2 installed?)")?;
            if !out.status.success() {
                bail!(
                    "ip netns add {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            return Ok(Self { name });
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside the namespace (only the network namespace changes, so pins on
    /// the host's bpffs stay visible).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `program args` in the namespace; its stdout, or an error with its stderr.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{program} {} in {}: {}: {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if tool_exists("nft") {
            let _ = self
                .command("nft")
                .args(["flush", "ruleset"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether `program` is on PATH (or an existing path).
pub fn tool_exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// How a timed child process ended.
#[derive(Clone, Debug)]
pub struct Finished {
    /// From just before spawning to the child's exit (or to the kill, on timeout).
    pub elapsed: Duration,
    pub timed_out: bool,
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Peak resident memory of the program (VmHWM), sampled every 20 ms while it ran; KiB.
    /// (getrusage's ru_maxrss would count the memory of this process at fork time.)
    pub peak_rss_kib: Option<u64>,
}

impl Finished {
    pub fn success(&self) -> bool {
        !self.timed_out && self.code == Some(0)
    }
}

/// Runs `cmd` with stdin from `stdin` and stderr to `stderr`, timing it; kills it after
/// `timeout`.
pub fn run_timed(
    cmd: &mut Command,
    stdin: Option<&Path>,
    stderr: &Path,
    timeout: Duration,
) -> Result<Finished> {
    cmd.stdin(match stdin {
        Some(path) => {
            Stdio::from(File::open(path).with_context(|| format!("opening {}", path.display()))?)
        }
        None => Stdio::null(),
    })
    .stdout(Stdio::null())
    .stderr(Stdio::from(
        File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?,
    ));
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    // The std handle is dropped unwaited: the waiter thread reaps the child, so that this
    // thread can sample its memory meanwhile.
    drop(child);
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: waits for our own child; the pointer is valid for the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        let _ = tx.send((rc, status, Instant::now()));
    });
    let mut peak: Option<u64> = None;
    let mut timed_out = false;
    let (rc, status, end) = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(done) => break done,
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the waiter thread died"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Until the waiter reaps it, the pid is still our child (a zombie at worst).
        if let Ok((_, hwm)) = process_memory(Some(pid as u32)) {
            peak = Some(peak.unwrap_or(0).max(hwm));
        }
        if !timed_out && start.elapsed() >= timeout {
            timed_out = true;
            // SAFETY: plain kill of our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    };
    let _ = waiter.join();
    if rc < 0 {
        bail!("waitpid: {}", std::io::Error::last_os_error());
    }
    Ok(Finished {
        elapsed: if timed_out { timeout } else { end - start },
        timed_out,
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        peak_rss_kib: peak,
    })
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Makes SIGINT and SIGTERM set a flag that [`check_interrupt`] turns into an error between
/// steps, so that an interrupted run still removes its namespaces and pins (children in
/// the same process group get the signal too and end the step they are running).
pub fn install_interrupt_handler() {
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// CPU time consumed by the calling thread, user + system, in ns. BPF_PROG_TEST_RUN runs
/// the program on the calling thread, so this counts the runs and not the time the thread
/// was descheduled.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `VmRSS` and `VmHWM` of a process, KiB (`/proc/<pid>/status`).
pub fn process_memory(pid: Option<u32>) -> Result<(u64, u64)> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Where and when the numbers were taken.
#[derive(Clone, Debug, Serialize)]
pub struct Environment {
    pub date_utc: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub git_commit: Option<String>,
    pub iptables: Option<String>,
    pub nft: Option<String>,
}

impl Environment {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let version = |program: &str| -> Option<String> {
            let out = Command::new(program).arg("--version").output().ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            Some(text.lines().next()?.trim().to_string()).filter(|s| !s.is_empty())
        };
        Self {
            date_utc: utc_now(),
            kernel: kernel_release(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
            git_commit: git_commit(),
            iptables: version("iptables"),
            nft: version("nft"),
        }
    }
}

fn kernel_release() -> String {
    // SAFETY: all-zero is a valid utsname to be filled in.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; the kernel NUL-terminates the fields.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: NUL-terminated by the kernel.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || commit.is_empty() {
        return None;
    }
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .stderr(Stdio::null())
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    Some(if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    })
}

/// `YYYY-MM-DD HH:MM UTC`, from the system clock (civil-from-days, proleptic Gregorian).
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60
    )
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn timed_child_reports_exit_code_and_timeout() {
        let dir = WorkDir::new().unwrap();
        let log = dir.path().join("err");
        let done = run_timed(
            Command::new("sh").args(["-c", "exit 3"]),
            None,
            &log,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!((done.code, done.timed_out), (Some(3), false));
        let done = run_timed(
            Command::new("sleep").arg("5"),
            None,
            &log,
            Duration::from_millis(100),
        )
        .unwrap();
        assert!(done.timed_out && !done.success());
        assert!(done.elapsed < Duration::from_secs(4));
    }
}
