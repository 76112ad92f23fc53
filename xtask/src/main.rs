//! `cargo xtask`: build, load, demo and test xlb from a bare machine.
//!
//! Owns: the developer and CI entry points (`setup`, `build`, `build-and-load`, `test`,
//! `demo`, `bench`). The toolchain bootstrap is in `setup`, command running in `cmd`.
//! Must not: depend on lb-userspace or anything beyond anyhow and clap — it has to compile
//! before the eBPF toolchain it installs exists.
mod cmd;
mod setup;

use std::{
    env,
    io::IsTerminal,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::{
    cmd::say,
    setup::{is_root, Need},
};

/// What a test prints when it skips itself for lack of privileges. Under CI=true that is a
/// failure: CI runs as root and must run every test.
const SKIP_MARKER: &str = "SKIPPED (needs root)";

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Development tasks for xlb: set up the machine, build, load, demo, test."
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and running xlb needs (apt packages, bpf-linker, bpffs);
    /// quick when all is present; without root, only lists what is missing.
    Setup,
    /// Build the agent, `xlb`, with its eBPF datapath embedded.
    Build(BuildArgs),
    /// Build, then run `xlb run <XLB_RUN_ARGS>` in this terminal (root).
    #[command(after_help = "Example:\n  cargo xtask build-and-load -- \
        --manifests deploy/examples --node-name node1 --interface eth0 --pod-interface 'veth*'")]
    BuildAndLoad {
        #[command(flatten)]
        build: BuildArgs,
        /// Arguments for `xlb run`, passed through verbatim (see `xlb run --help`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "XLB_RUN_ARGS"
        )]
        args: Vec<String>,
    },
    /// Everything CI runs: setup, rustfmt, clippy, every test. Extra arguments after `--`
    /// go to `cargo test` (e.g. a test name filter).
    Test {
        /// Arguments for `cargo test --workspace`.
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        args: Vec<String>,
    },
    /// Build a 2-node network-namespace cluster, run xlb on it, show traffic spreading (root).
    Demo {
        /// Leave the cluster running for exploration.
        #[arg(long, conflicts_with = "down")]
        keep: bool,
        /// Tear down a cluster left by `--keep`.
        #[arg(long)]
        down: bool,
    },
    /// Benchmarks (root): datapath cost per packet, programming from cold against
    /// kube-proxy's iptables and nftables rules, endpoint-change latency, memory. Builds in
    /// release, runs xlb-bench, writes the report (and its SVG plots beside it).
    Bench {
        /// Fewer rounds and smaller kube-proxy baselines: under 10 minutes.
        #[arg(long)]
        quick: bool,
        /// The report [default: docs/benchmarks.md in the workspace].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Arguments for xlb-bench (e.g. `-o json` for the raw results on stdout).
        #[arg(last = true, value_name = "XLB_BENCH_ARGS")]
        args: Vec<String>,
    },
}

#[derive(Args, Clone, Copy)]
struct BuildArgs {
    /// Build with the release profile (the eBPF object is always optimised).
    #[arg(long)]
    release: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::ensure(Need::Run),
        Task::Build(b) => build(b).map(|_| ()),
        Task::BuildAndLoad { build: b, args } => build_and_load(b, &args),
        Task::Test { args } => test(&args),
        Task::Demo { keep, down } => demo(keep, down),
        Task::Bench { quick, out, args } => bench(quick, out, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
}

/// Where cargo puts build output, honouring the environment's overrides.
fn target_dir() -> PathBuf {
    let root = workspace_root();
    env::var_os("CARGO_TARGET_DIR")
        .or_else(|| env::var_os("CARGO_BUILD_TARGET_DIR"))
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"))
}

/// `cargo <args>`, run from the workspace root.
fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root()).args(args);
    c
}

fn build(args: BuildArgs) -> Result<PathBuf> {
    setup::ensure(Need::Build)?;
    build_only(args)
}

fn build_only(args: BuildArgs) -> Result<PathBuf> {
    let mut c = cargo(&["build", "--package", "lb-userspace"]);
    if args.release {
        c.arg("--release");
    }
    cmd::run(&mut c)?;
    let profile = if args.release { "release" } else { "debug" };
    let binary = target_dir().join(profile).join("xlb");
    if !binary.is_file() {
        bail!("cargo build succeeded but {} is missing", binary.display());
    }
    say(format!(
        "built {} (eBPF datapath embedded)",
        binary.display()
    ));
    Ok(binary)
}

fn require_root(task: &str, what: &str) -> Result<()> {
    if is_root() {
        return Ok(());
    }
    bail!(
        "`cargo xtask {task}` needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) to {what}.\n\
         Build as yourself with `cargo xtask build`, then run the binary with sudo \
         (e.g. `sudo target/debug/xlb …`), or run this task as root."
    )
}

fn build_and_load(args: BuildArgs, run_args: &[String]) -> Result<()> {
    require_root("build-and-load", "load and attach the eBPF programs")?;
    setup::ensure(Need::Run)?;
    let xlb = build_only(args)?;
    // Paths in the arguments stay relative to the caller's directory.
    Err(cmd::exec(Command::new(xlb).arg("run").args(run_args)))
}

fn demo(keep: bool, down: bool) -> Result<()> {
    require_root(
        "demo",
        "create network namespaces and attach the eBPF programs",
    )?;
    setup::ensure(Need::Run)?;
    let xlb = build_only(BuildArgs { release: false })?;
    let mut c = Command::new(xlb);
    c.arg("demo");
    if keep {
        c.arg("--keep");
    }
    if down {
        c.arg("--down");
    }
    Err(cmd::exec(&mut c))
}

fn bench(quick: bool, out: Option<PathBuf>, args: &[String]) -> Result<()> {
    require_root("bench", "load BPF programs and create network namespaces")?;
    setup::ensure(Need::Run)?;
    // Both binaries: the bench also measures the agent itself (target/release/xlb).
    cmd::run(&mut cargo(&[
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--bins",
    ]))?;
    // A path given by the caller stays relative to the caller's directory.
    let out = match out {
        Some(path) => env::current_dir()?.join(path),
        None => workspace_root().join("docs/benchmarks.md"),
    };
    let mut c = cargo(&[
        "run",
        "--release",
        "--package",
        "lb-userspace",
        "--bin",
        "xlb-bench",
        "--",
    ]);
    if quick {
        c.arg("--quick");
    }
    c.arg("--out").arg(&out).args(args);
    cmd::run(&mut c)
}

/// The steps of `cargo xtask test`, run in order, each announced and timed.
struct Steps {
    names: &'static [&'static str],
    done: Vec<Duration>,
}

impl Steps {
    fn run(&mut self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let n = self.done.len();
        let name = self.names[n];
        say(format!("test: step {}/{}: {name}", n + 1, self.names.len()));
        let start = Instant::now();
        f().map_err(|e| {
            anyhow!(
                "test FAILED at step {}/{} ({name}): {e:#}",
                n + 1,
                self.names.len()
            )
        })?;
        self.done.push(start.elapsed());
        Ok(())
    }

    fn timings(&self) -> String {
        self.names
            .iter()
            .zip(&self.done)
            .map(|(name, d)| format!("{name} {}", human(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn test(cargo_test_args: &[String]) -> Result<()> {
    let start = Instant::now();
    let ci = env::var("CI").is_ok_and(|v| v == "true");
    let root = is_root();
    if ci && !root {
        bail!(
            "CI=true but not running as root: the privileged tests would be skipped. \
             CI must run `cargo xtask test` (or .ci/run) as root."
        );
    }
    if !root {
        say("test: not root: tests that need root will skip themselves (run as root to run everything)");
    }
    let mut steps = Steps {
        names: &["setup", "rustfmt", "clippy", "cargo test"],
        done: Vec::new(),
    };
    // Without root nothing can be installed; only the build toolchain is then required.
    steps.run(|| setup::ensure(if root { Need::Run } else { Need::Build }))?;
    steps.run(|| cmd::run(&mut cargo(&["fmt", "--all", "--check"])))?;
    steps.run(|| {
        cmd::run(&mut cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    let mut results = TestCounts::default();
    steps.run(|| {
        let mut c = cargo(&["test", "--workspace"]);
        c.args(cargo_test_args);
        if env::var_os("CARGO_TERM_COLOR").is_none() && std::io::stderr().is_terminal() {
            c.env("CARGO_TERM_COLOR", "always");
        }
        let (status, output) = cmd::run_tee(&mut c)?;
        results = TestCounts::parse(&output);
        if !status.success() && results.failed > 0 {
            bail!("{} test(s) failed (see above)", results.failed);
        }
        cmd::check(&cmd::display(&c), status)?;
        if results.skipped > 0 {
            if ci {
                bail!(
                    "privileged tests were skipped under CI=true: {} line(s) say \"{SKIP_MARKER}\" \
                     (CI must run every test; is something missing for them?)",
                    results.skipped
                );
            }
            say(format!(
                "test: warning: {} test(s) printed \"{SKIP_MARKER}\"; run as root to run them",
                results.skipped
            ));
        }
        Ok(())
    })?;
    say(format!(
        "test: all {} steps passed in {}: {} tests passed, {} ignored, {} skipped for lack of root ({})",
        steps.names.len(),
        human(start.elapsed()),
        results.passed,
        results.ignored,
        results.skipped,
        steps.timings()
    ));
    Ok(())
}

/// Totals of libtest's `test result:` lines, plus the skip markers tests printed.
#[derive(Default, Debug, PartialEq, Eq)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
    skipped: usize,
}

impl TestCounts {
    fn parse(output: &str) -> Self {
        let mut counts = TestCounts {
            skipped: output.matches(SKIP_MARKER).count(),
            ..Default::default()
        };
        // test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...
        for line in output.lines() {
            let Some((_, rest)) = line.split_once("test result: ") else {
                continue;
            };
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => counts.passed += n,
                    "failed" => counts.failed += n,
                    "ignored" => counts.ignored += n,
                    _ => {}
                }
            }
        }
        counts
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_over_test_binaries_and_skip_markers() {
        let out = "\
running 2 tests
test a ... ok
SKIPPED (needs root): e2e_nodeport
test b ... ok
test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s
";
        assert_eq!(
            TestCounts::parse(out),
            TestCounts {
                passed: 5,
                failed: 1,
                ignored: 1,
                skipped: 1
            }
        );
    }

    #[test]
    fn build_and_load_passes_xlb_flags_through_with_or_without_separator() {
        for argv in [
            &[
                "cargo xtask",
                "build-and-load",
                "--release",
                "--",
                "--interface",
                "eth0",
            ][..],
            &[
                "cargo xtask",
                "build-and-load",
                "--release",
                "--interface",
                "eth0",
            ][..],
        ] {
            let Task::BuildAndLoad { build, args } = Cli::parse_from(argv).task else {
                panic!("parsed {argv:?} as another task");
            };
            assert!(build.release, "{argv:?}");
            assert_eq!(args, ["--interface", "eth0"], "{argv:?}");
        }
        // From the first xlb argument on, everything is xlb's, even flags xtask knows.
        let argv = [
            "cargo xtask",
            "build-and-load",
            "--node-name",
            "n1",
            "--release",
            "--help",
        ];
        let Task::BuildAndLoad { build, args } = Cli::parse_from(argv).task else {
            panic!("not build-and-load");
        };
        assert!(!build.release);
        assert_eq!(args, ["--node-name", "n1", "--release", "--help"]);
    }

    #[test]
    fn test_passes_everything_after_the_separator_to_cargo_test() {
        let Task::Test { args } = Cli::parse_from([
            "cargo xtask",
            "test",
            "--",
            "conntrack",
            "--",
            "--nocapture",
        ])
        .task
        else {
            panic!("not the test task");
        };
        assert_eq!(args, ["conntrack", "--", "--nocapture"]);
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
