//! Toolchain bootstrap: makes this machine able to build and run xlb.
//!
//! Owns: what xlb needs from the machine (see docs/build.md and
//! ../shared/reference/toolchain.md) — apt packages, a Rust toolchain that can build for
//! `bpfel-unknown-none`, bpf-linker, bpffs — how to check for each cheaply, and how to
//! install it. Checks mirror `lb-userspace/build.rs`, which picks the eBPF toolchain.
//! Must not: install anything when not root; download rustup components.
use std::{
    env,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, probe, probe_stdout, say};

/// Debian's rustc with a prebuilt `core` for bpfel-unknown-none (not needed when rustup
/// nightly with rust-src, or `XLB_EBPF_RUSTC`, provides the eBPF toolchain).
const DEBIAN_RUSTC_PACKAGES: &[&str] = &["rustc-web", "libstd-rust-web-dev-bpf"];
/// LLVM 22 for bpf-linker: its headers to build it, its shared library to run it. Must
/// match the LLVM of the rustc that emits the bitcode (Debian's rustc 1.96 uses LLVM 22).
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// What the tests, the demo and the agent run: (Debian package, a command it provides).
const RUNTIME_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("iperf3", "iperf3"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("iptables", "iptables"),
    ("nftables", "nft"),
    ("conntrack", "conntrack"),
    ("bpftool", "bpftool"),
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";
const BPF_TARGET: &str = "bpfel-unknown-none";

/// What the caller is about to do, and so what must be present when nothing can be
/// installed (not root). As root, everything missing is installed either way.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Need {
    /// Compile the workspace (the eBPF toolchain).
    Build,
    /// Also run xlb and its tests (tools, bpffs).
    Run,
}

/// Checks the machine, installs what is missing (as root), and reports. Fails when
/// something that `need` requires is still missing.
pub fn ensure(need: Need) -> Result<()> {
    let state = State::probe();
    let missing = state.missing();
    if missing.is_empty() {
        say(format!("setup: all present ({})", state.summary()));
        return Ok(());
    }
    if !is_root() {
        return report_unprivileged(&missing, need);
    }
    install(&state, &missing)?;
    let after = State::probe();
    let still = after.missing();
    if still.iter().any(|m| m.needed_for(need)) {
        let list: Vec<String> = still.iter().map(|m| m.describe()).collect();
        bail!("setup: still missing after installing: {}", list.join("; "));
    }
    for m in &still {
        say(format!("setup: warning: still missing {}", m.describe()));
    }
    say(format!("setup: done ({})", after.summary()));
    Ok(())
}

/// Whether this process runs with effective uid 0 (from /proc, to keep xtask free of libc).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            // Uid: real effective saved filesystem
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// One thing the machine lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Missing {
    /// Debian/Ubuntu packages (not installed, or only their configuration files remain).
    AptPackages(Vec<&'static str>),
    /// Elsewhere: commands not found in PATH.
    Tools(Vec<&'static str>),
    /// Elsewhere: no rustc that can build for bpfel-unknown-none.
    EbpfToolchain,
    BpfLinker,
    Bpffs,
}

impl Missing {
    fn needed_for(&self, need: Need) -> bool {
        match self {
            Missing::AptPackages(pkgs) => {
                need == Need::Run
                    || pkgs
                        .iter()
                        .any(|p| *p == LLVM_PACKAGE || DEBIAN_RUSTC_PACKAGES.contains(p))
            }
            Missing::EbpfToolchain | Missing::BpfLinker => true,
            Missing::Tools(_) | Missing::Bpffs => need == Need::Run,
        }
    }

    fn describe(&self) -> String {
        match self {
            Missing::AptPackages(p) => format!("apt packages: {}", p.join(" ")),
            Missing::Tools(t) => format!("commands: {}", t.join(" ")),
            Missing::EbpfToolchain => format!("a Rust toolchain that can build for {BPF_TARGET}"),
            Missing::BpfLinker => format!("bpf-linker {BPF_LINKER_VERSION}"),
            Missing::Bpffs => format!("bpffs mounted at {BPFFS}"),
        }
    }

    /// What a root user would run.
    fn remedy(&self) -> String {
        match self {
            Missing::AptPackages(p) => format!(
                "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
                p.join(" ")
            ),
            Missing::Tools(t) => format!(
                "install {} with your distribution's package manager",
                t.join(" ")
            ),
            Missing::EbpfToolchain => "rustup toolchain install nightly --component rust-src \
                 (or, on Debian/Ubuntu: apt-get install rustc-web libstd-rust-web-dev-bpf)"
                .to_string(),
            Missing::BpfLinker => bpf_linker_command_line(),
            Missing::Bpffs => format!("mount -t bpf bpf {BPFFS}"),
        }
    }
}

/// Where the eBPF crate's compiler comes from (same order as lb-userspace/build.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
enum EbpfToolchain {
    Explicit(String),
    NightlyRustSrc,
    Debian,
    Absent,
}

struct State {
    /// dpkg-query and apt-get are available: packages can be checked and installed.
    apt: bool,
    toolchain: EbpfToolchain,
    /// Apt packages required here that are not installed (apt systems only).
    apt_missing: Vec<&'static str>,
    /// Commands not in PATH (non-apt systems only).
    tools_missing: Vec<&'static str>,
    bpf_linker: Option<PathBuf>,
    bpffs: bool,
}

impl State {
    fn probe() -> Self {
        let path = env::var("PATH").unwrap_or_default();
        let apt = which("dpkg-query", &path).is_some() && which("apt-get", &path).is_some();
        let toolchain = ebpf_toolchain(&path);
        let mut apt_missing = Vec::new();
        let mut tools_missing = Vec::new();
        if apt {
            let mut wanted: Vec<&'static str> = Vec::new();
            if matches!(toolchain, EbpfToolchain::Debian | EbpfToolchain::Absent) {
                wanted.extend(DEBIAN_RUSTC_PACKAGES);
            }
            wanted.push(LLVM_PACKAGE);
            wanted.extend(RUNTIME_PACKAGES.iter().map(|(pkg, _)| *pkg));
            let installed = dpkg_installed(&wanted);
            apt_missing = wanted
                .into_iter()
                .filter(|p| !installed.iter().any(|i| i == p))
                .collect();
        } else {
            tools_missing = RUNTIME_PACKAGES
                .iter()
                .map(|(_, tool)| *tool)
                .filter(|tool| which(tool, &path).is_none())
                .collect();
        }
        Self {
            apt,
            toolchain,
            apt_missing,
            tools_missing,
            bpf_linker: find_bpf_linker(&path),
            bpffs: bpffs_mounted(),
        }
    }

    fn missing(&self) -> Vec<Missing> {
        let mut missing = Vec::new();
        if !self.apt_missing.is_empty() {
            missing.push(Missing::AptPackages(self.apt_missing.clone()));
        }
        if !self.tools_missing.is_empty() {
            missing.push(Missing::Tools(self.tools_missing.clone()));
        }
        // On apt systems a missing toolchain shows up as missing Debian rustc packages.
        if !self.apt && self.toolchain == EbpfToolchain::Absent {
            missing.push(Missing::EbpfToolchain);
        }
        if self.bpf_linker.is_none() {
            missing.push(Missing::BpfLinker);
        }
        if !self.bpffs {
            missing.push(Missing::Bpffs);
        }
        missing
    }

    fn summary(&self) -> String {
        let toolchain = match &self.toolchain {
            EbpfToolchain::Explicit(rustc) => format!("XLB_EBPF_RUSTC={rustc}"),
            EbpfToolchain::NightlyRustSrc => "rustup nightly with rust-src".into(),
            EbpfToolchain::Debian => "Debian rustc-web (/usr/bin/rustc)".into(),
            EbpfToolchain::Absent => "none".into(),
        };
        let linker = match &self.bpf_linker {
            Some(p) => p.display().to_string(),
            None => "none".into(),
        };
        let bpffs = if self.bpffs { "mounted" } else { "not mounted" };
        format!("eBPF toolchain: {toolchain}; bpf-linker: {linker}; bpffs at {BPFFS}: {bpffs}")
    }
}

fn report_unprivileged(missing: &[Missing], need: Need) -> Result<()> {
    let mut msg = String::from("setup: not root, so nothing was installed. Missing:\n");
    for m in missing {
        let _ = writeln!(msg, "  - {}\n      as root: {}", m.describe(), m.remedy());
    }
    msg.push_str("  (or run `cargo xtask setup` as root to do all of this)");
    say(msg);
    let blocking: Vec<String> = missing
        .iter()
        .filter(|m| m.needed_for(need))
        .map(|m| m.describe())
        .collect();
    if blocking.is_empty() {
        say(
            "setup: continuing; what is missing is only needed to run xlb and its privileged tests",
        );
        Ok(())
    } else {
        bail!("setup: missing {}", blocking.join("; "))
    }
}

fn install(state: &State, missing: &[Missing]) -> Result<()> {
    for m in missing {
        match m {
            Missing::AptPackages(pkgs) => install_apt(pkgs)?,
            Missing::Tools(_) | Missing::EbpfToolchain => {
                // Not an apt system: nothing this task can install. Reported after the
                // other steps by the final check.
                say(format!(
                    "setup: cannot install {} here (not Debian/Ubuntu): {}",
                    m.describe(),
                    m.remedy()
                ));
            }
            Missing::BpfLinker => install_bpf_linker(state)?,
            Missing::Bpffs => mount_bpffs()?,
        }
    }
    Ok(())
}

fn install_apt(pkgs: &[&str]) -> Result<()> {
    say(format!("installing apt packages: {}", pkgs.join(" ")));
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        c
    };
    cmd::run(&mut apt(&["update"])).context("apt-get update")?;
    let mut install = apt(&["install", "-y"]);
    install.args(pkgs);
    cmd::run(&mut install).context("installing apt packages")
}

fn install_bpf_linker(state: &State) -> Result<()> {
    if !Path::new(LLVM_BIN).join("llvm-config").is_file() {
        bail!(
            "cannot build bpf-linker: LLVM 22 is not installed at {LLVM_BIN} \
             ({} on Debian/Ubuntu)",
            if state.apt {
                "apt-get install llvm-22-dev"
            } else {
                "package llvm-22-dev"
            }
        );
    }
    say(format!(
        "installing bpf-linker {BPF_LINKER_VERSION} (about a minute)…"
    ));
    cmd::run(&mut bpf_linker_command()).context("installing bpf-linker")
}

/// `cargo install bpf-linker` against LLVM 22. The PATH prefix matters: without it llvm-sys
/// finds Debian's default llvm-config (LLVM 14) and the link fails.
fn bpf_linker_command() -> Command {
    let path = env::var("PATH").unwrap_or_default();
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("PATH", format!("{LLVM_BIN}:{path}"))
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--no-default-features", "--features", "llvm-22"])
        .stdin(Stdio::null());
    c
}

fn bpf_linker_command_line() -> String {
    format!(
        "PATH={LLVM_BIN}:$PATH cargo install bpf-linker --version {BPF_LINKER_VERSION} \
         --locked --no-default-features --features llvm-22"
    )
}

fn mount_bpffs() -> Result<()> {
    say(format!("mounting bpffs at {BPFFS}"));
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Same choice as lb-userspace/build.rs: `XLB_EBPF_RUSTC`, then rustup nightly with
/// rust-src, then Debian's rustc with `core` for the BPF target.
fn ebpf_toolchain(path: &str) -> EbpfToolchain {
    if let Ok(rustc) = env::var("XLB_EBPF_RUSTC") {
        return EbpfToolchain::Explicit(rustc);
    }
    if which("rustup", path).is_some() {
        let sysroot = probe(
            Command::new("rustup")
                .args(["run", "nightly", "rustc", "--print", "sysroot"])
                // Never let the probe install a toolchain.
                .env("RUSTUP_AUTO_INSTALL", "0"),
        );
        if let Some(sysroot) = sysroot {
            let core = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
            if core.is_dir() {
                return EbpfToolchain::NightlyRustSrc;
            }
        }
    }
    if Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/lib/rustlib").join(BPF_TARGET).is_dir()
    {
        return EbpfToolchain::Debian;
    }
    EbpfToolchain::Absent
}

/// The subset of `pkgs` that dpkg reports as installed.
fn dpkg_installed(pkgs: &[&str]) -> Vec<String> {
    let out = probe_stdout(
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Package}\t${db:Status-Status}\n"])
            .args(pkgs),
    )
    .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| *status == "installed")
        .map(|(pkg, _)| pkg.to_string())
        .collect()
}

/// bpf-linker in PATH or in `$CARGO_HOME/bin` (where `cargo install` puts it, and where
/// build.rs looks).
fn find_bpf_linker(path: &str) -> Option<PathBuf> {
    let cargo_bin = cargo_home().join("bin");
    which("bpf-linker", path).or_else(|| {
        let p = cargo_bin.join("bpf-linker");
        p.is_file().then_some(p)
    })
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|mounts| {
            mounts.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_dev, dir, fstype) = (f.next(), f.next(), f.next());
                dir == Some(BPFFS) && fstype == Some("bpf")
            })
        })
        .unwrap_or(false)
}

fn which(program: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}
