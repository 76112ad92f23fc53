//! Shared by the BPF_PROG_TEST_RUN test files: the real programs loaded with their maps
//! pinned under a per-test directory (removed on drop, also on panic), the datapath config of
//! a node at 172.18.0.11 in cluster CIDR 10.244.0.0/16, and helpers to run packets and read
//! the map side effects. Each test file seeds its own services through `apply`, which uses
//! the agent's own map writer.
#![allow(dead_code)] // each test file uses a different subset

use std::{net::Ipv4Addr, path::PathBuf};

use aya::programs::{ProgramError, TestRun, TestRunOptions, TestRunResult};
use lb_common::stat;
use xlb::{
    datapath::{migrate::Migration, reader, Datapath, MapWriter},
    model::DesiredState,
    testbed::require_privileges,
};

/// The node address the fixture's datapath masquerades to.
pub const NODE_IP: Ipv4Addr = xlb::bench::synth::NODE_IP;

pub struct Fixture {
    datapath: Option<Datapath>,
    writer: Option<MapWriter>,
    pub pin: PathBuf,
}

impl Fixture {
    /// `None` when the test may not run (no root, outside CI: it says so; under CI=true
    /// `require_privileges` panics instead).
    pub fn load(test: &str) -> Option<Self> {
        Self::load_over(test, |_| {})
    }

    /// Like [`load`](Self::load), with `before` run on the (empty, existing) pin directory
    /// first: to leave maps there as an earlier agent would have.
    pub fn load_over(test: &str, before: impl FnOnce(&std::path::Path)) -> Option<Self> {
        Self::load_with(test, before, false).map(|(fixture, _)| fixture)
    }

    /// Like [`load_over`](Self::load_over), with a layout migration started between loading
    /// the object and the writer adopting the maps, in the agent's order (`agent::run`).
    pub fn load_migrating(
        test: &str,
        before: impl FnOnce(&std::path::Path),
    ) -> Option<(Self, Migration)> {
        Self::load_with(test, before, true)
            .map(|(fixture, migration)| (fixture, migration.expect("migration started")))
    }

    fn load_with(
        test: &str,
        before: impl FnOnce(&std::path::Path),
        migrate: bool,
    ) -> Option<(Self, Option<Migration>)> {
        if !require_privileges(test) {
            return None;
        }
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/xlb-test/{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin);
        std::fs::create_dir_all(&pin).expect("pin directory");
        before(&pin);
        // A failed load (e.g. the verifier rejects a program) has pinned maps already and
        // no Fixture exists yet to remove them on drop: remove them here.
        let mut datapath = Datapath::load(&pin).unwrap_or_else(|e| {
            let _ = std::fs::remove_dir_all(&pin);
            panic!("load datapath: {e:?}")
        });
        let migration = migrate.then(|| {
            Migration::start(&pin).unwrap_or_else(|e| {
                let _ = std::fs::remove_dir_all(&pin);
                panic!("start migration: {e:?}")
            })
        });
        let mut writer = datapath.writer().expect("map writer");
        writer
            // The node the benchmarks model: 172.18.0.11 in cluster CIDR 10.244.0.0/16.
            .write_config(&xlb::bench::synth::datapath_config())
            .expect("config");
        Some((
            Self {
                datapath: Some(datapath),
                writer: Some(writer),
                pin,
            },
            migration,
        ))
    }

    pub fn apply(&mut self, desired: &DesiredState) {
        self.writer.as_mut().unwrap().apply(desired).expect("apply");
    }

    /// The agent's map writer, for tests that check what an apply did (`ApplyStats`).
    pub fn writer(&mut self) -> &mut MapWriter {
        self.writer.as_mut().unwrap()
    }

    pub fn run_xdp(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.datapath.as_ref().unwrap().xdp_program().unwrap();
        run(|opts| prog.test_run(opts), packet)
    }

    pub fn run_tc(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.datapath.as_ref().unwrap().tc_program().unwrap();
        run(|opts| prog.test_run(opts), packet)
    }

    /// The egress program (`xlb_tc_egress`).
    pub fn run_tc_egress(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.datapath.as_ref().unwrap().tc_egress_program().unwrap();
        run(|opts| prog.test_run(opts), packet)
    }

    /// As `run_tc`, but a refused test run is returned rather than a panic (the fuzz test
    /// prints the packet the kernel refused).
    pub fn try_run_tc(&self, packet: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let prog = self.datapath.as_ref().unwrap().tc_program().unwrap();
        try_run(|opts| prog.test_run(opts), packet)
    }

    pub fn try_run_xdp(&self, packet: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let prog = self.datapath.as_ref().unwrap().xdp_program().unwrap();
        try_run(|opts| prog.test_run(opts), packet)
    }

    pub fn stat(&self, reason: u32) -> u64 {
        reader::stats(&self.pin).unwrap()[stat::NAMES[reason as usize]]
    }

    /// Every counter that is not zero, by name.
    pub fn nonzero_stats(&self) -> Vec<(&'static str, u64)> {
        reader::stats(&self.pin)
            .unwrap()
            .into_iter()
            .filter(|(_, v)| *v != 0)
            .collect()
    }

    pub fn conntrack(&self) -> Vec<reader::FlowRow> {
        reader::conntrack(&self.pin).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.writer.take();
        self.datapath.take();
        let _ = std::fs::remove_dir_all(&self.pin);
        // The shared parent goes when the last test leaves it (fails harmlessly before).
        let _ = std::fs::remove_dir("/sys/fs/bpf/xlb-test");
    }
}

/// One BPF_PROG_TEST_RUN: the verdict and the output packet.
fn run(
    f: impl FnOnce(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
    packet: &[u8],
) -> (u32, Vec<u8>) {
    try_run(f, packet).expect("BPF_PROG_TEST_RUN")
}

fn try_run(
    f: impl FnOnce(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
    packet: &[u8],
) -> Result<(u32, Vec<u8>), ProgramError> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    let result = f(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}
