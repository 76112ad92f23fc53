//! Keeps the benchmarks from rotting: runs the whole bench in its tiny configuration (one
//! round, 10 services, kube-proxy baselines at 10 services, the real agent with 10 services,
//! traffic through the VIP on all five systems at 1 and 10 services, one kill/restart cycle)
//! and checks that it measured what it claims, wrote a complete report, and left nothing
//! behind.
use std::path::{Path, PathBuf};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use xlb::{
    bench::{
        self,
        cluster::Proxy,
        control::System,
        loadgen::Test,
        packets::{tcp_frame, TCP_SYN},
        per_packet::{Kind, Program},
        report,
        traffic::Target,
        BenchConfig,
    },
    testbed::require_privileges,
};

/// A scratch directory for the report, removed on drop (also when an assertion fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("xlb-bench-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the report directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_positive(what: &str, values: &[f64]) {
    assert!(!values.is_empty(), "{what}: no values");
    for v in values {
        assert!(
            v.is_finite() && *v > 0.0,
            "{what}: {v} is not a positive number"
        );
    }
}

/// Namespaces, pin directories and work directories of this process that still exist.
fn leftovers() -> Vec<PathBuf> {
    let pid = std::process::id();
    let tmp = std::env::temp_dir();
    let places = [
        (
            Path::new("/run/netns"),
            format!("{}{pid}-", bench::sys::NETNS_PREFIX),
        ),
        (Path::new(bench::sys::PIN_ROOT), format!("{pid}-")),
        (tmp.as_path(), format!("xlb-bench-{pid}-")),
    ];
    let mut left = Vec::new();
    for (dir, prefix) in places {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                left.push(entry.path());
            }
        }
    }
    left
}

#[test]
fn bench_runs_in_its_tiny_configuration() {
    if !require_privileges("bench_runs_in_its_tiny_configuration") {
        return;
    }
    let mut config = BenchConfig::tiny();
    config.xlb = Some(PathBuf::from(env!("CARGO_BIN_EXE_xlb")));
    let results = bench::run(&config).expect("the tiny bench run");
    assert!(
        leftovers().is_empty(),
        "the bench left namespaces or pins behind: {:?}",
        leftovers()
    );

    // Part 1: every (program, kind, size) measured, with positive, finite values.
    let p = results.per_packet.as_ref().expect("per-packet results");
    for &n in &p.config.sizes {
        for program in [Program::Xdp, Program::Tc] {
            for kind in Kind::ALL {
                let row = p
                    .row(program, kind, n)
                    .unwrap_or_else(|| panic!("no {program:?} {kind:?} row at {n} services"));
                let what = format!("{program:?} {kind:?} at {n} services");
                assert_eq!(row.ns.len(), p.config.rounds, "{what}");
                assert_positive(&what, &row.ns);
                assert_positive(&what, &row.kernel_ns);
                assert_positive(&what, &row.ratio_to_floor);
            }
        }
    }

    // Part 3: every system programmed 10 services, and the kernel held them afterwards:
    // 10 KUBE-SVC and 100 KUBE-SEP chains in the bench's namespace (iptables-save), 10
    // service and 100 endpoint chains (nft list chains), 10 frontends and 100 backends in
    // xlb's maps.
    let cold = results
        .cold
        .as_ref()
        .expect("programming-from-cold results");
    for system in System::ALL {
        let row = cold
            .row(system, 10)
            .unwrap_or_else(|| panic!("{system:?} was not programmed"));
        assert_eq!(row.timed_out, 0, "{system:?} timed out");
        assert_positive(&format!("{system:?} seconds"), &row.seconds);
        let verified = row
            .verified
            .as_ref()
            .unwrap_or_else(|| panic!("{system:?}: loaded state not checked"));
        assert_eq!(
            (verified.service_chains, verified.endpoint_chains),
            (10, 100),
            "{system:?}"
        );
        if system != System::Xlb {
            assert_positive(&format!("{system:?} ratio to xlb"), &row.ratio_to_xlb);
            assert!(row.input_lines > 10 * 10, "{system:?} input too small");
        }
    }

    let latency = results.latency.as_ref().expect("latency results");
    assert_eq!(
        latency.total_ms.len(),
        config.latency.as_ref().unwrap().changes
    );
    assert_positive("change latency", &latency.total_ms);
    assert_positive("compute time", &latency.compute_ms);
    assert_positive("apply time", &latency.apply_ms);
    assert!(latency.map_ops_per_change > 0);
    assert!(
        latency.maps.iter().any(|m| m.bytes > 0),
        "no map memory read"
    );

    let agent = results.agent.as_ref().expect("agent results");
    assert_positive(
        "agent",
        &[agent.ready_s, agent.rss_kib as f64, agent.map_bytes as f64],
    );
    assert!(agent.maps >= 5, "the agent holds {} maps", agent.maps);

    // Part 2: every test on every system at every size, one rate per round, ratios to the
    // limit measured in the same round; TCP_CRR to the pod IP on each loaded system at the
    // largest size. (A VIP path that does not work fails the run before it is measured.)
    let traffic = results.traffic.as_ref().expect("traffic results");
    let tc = config.traffic.as_ref().unwrap();
    for &n in &tc.sizes {
        for proxy in Proxy::ALL {
            for test in Test::ALL {
                let what = format!("{proxy:?} {test:?} at {n} services");
                let row = traffic
                    .row(proxy, n, test, Target::Service)
                    .unwrap_or_else(|| panic!("no row for {what}"));
                assert_eq!(row.rates.len(), tc.rounds, "{what}");
                assert_positive(&what, &row.rates);
                assert_positive(&format!("{what} ratio"), &row.ratios);
                if proxy == Proxy::Limit {
                    assert!(row.ratios.iter().all(|r| *r == 1.0), "{what}");
                }
            }
        }
    }
    for proxy in &Proxy::ALL[1..] {
        let row = traffic
            .row(*proxy, traffic.largest(), Test::TcpCrr, Target::PodIp)
            .unwrap_or_else(|| panic!("{proxy:?}: no TCP_CRR to the pod IP"));
        assert_positive(&format!("{proxy:?} TCP_CRR to the pod IP"), &row.rates);
    }
    // NodePort traffic from the external host at the largest size, on every system, with
    // ratios to the limit (the external host straight to the pod) of the same round.
    assert!(!tc.nodeport_tests.is_empty());
    for proxy in Proxy::ALL {
        for &test in &tc.nodeport_tests {
            let what = format!("{proxy:?} {test:?} to the NodePort");
            let row = traffic
                .row(proxy, traffic.largest(), test, Target::NodePort)
                .unwrap_or_else(|| panic!("no row for {what}"));
            assert_eq!(row.rates.len(), tc.rounds, "{what}");
            assert_positive(&what, &row.rates);
            assert_positive(&format!("{what} ratio"), &row.ratios);
        }
    }
    assert!(traffic.generator.starts_with("built-in"));
    // xlb's programs profiled on real traffic: both nodes' ingress programs ran for every
    // profiled test, and TCP_CRR runs them more often per transaction than TCP_RR.
    for proxy in [Proxy::XlbXdp, Proxy::XlbTc] {
        let profile = |test, target| {
            traffic
                .profiles
                .iter()
                .find(|p| p.proxy == proxy && p.test == test && p.target == target)
                .unwrap_or_else(|| panic!("no profile of {proxy:?} {test:?} {target:?}"))
        };
        for (test, target) in [
            (Test::TcpRr, Target::Service),
            (Test::TcpCrr, Target::Service),
            (Test::TcpCrr, Target::PodIp),
        ] {
            let p = profile(test, target);
            assert!(p.transactions > 0, "{proxy:?} {test:?} {target:?}");
            for node in ["node1", "node2"] {
                assert!(
                    p.programs
                        .iter()
                        .any(|s| s.node == node && s.runs > 0 && s.run_ns > 0),
                    "{proxy:?} {test:?} {target:?}: no program ran on {node}: {:?}",
                    p.programs
                );
            }
        }
        let per =
            |p: &xlb::bench::traffic::DatapathProfile| p.runs() as f64 / p.transactions as f64;
        assert!(
            per(profile(Test::TcpCrr, Target::Service))
                > per(profile(Test::TcpRr, Target::Service)),
            "{proxy:?}: a connection per transaction runs the programs more often"
        );
    }

    // Part 4: the load ran across a SIGKILL and restart of both agents, and no established
    // connection broke (the goal; the datapath keeps serving from pinned maps and links).
    let restart = results.restart.as_ref().expect("restart results");
    assert_eq!(
        restart.connections_broken, 0,
        "connections broken by the restart: {:?}",
        restart.failures
    );
    assert!(restart.established_transactions > 0);
    assert!(restart.new_connections_ok > 0 && restart.udp_sent > 0);
    assert_eq!(
        restart.ready_s.len(),
        2 * config.restart.as_ref().unwrap().cycles
    );
    assert_positive("restart ready", &restart.ready_s);

    // The report: every section, the goals, the plots beside it; and the JSON.
    let dir = TempDir::new();
    let markdown = dir.0.join("benchmarks.md");
    let written = report::write(&results, &markdown).expect("writing the report");
    let text = std::fs::read_to_string(&markdown).expect("reading the report");
    for section in report::SECTIONS {
        assert!(text.contains(section), "the report lacks {section:?}");
    }
    // Tiny sizes are not the goals' sizes: those goals say so instead of a verdict.
    assert!(text.contains("not measured in this run"));
    assert!(!text.contains("TODO"), "the report still has TODOs");
    assert!(
        text.contains("NodePort traffic from outside the cluster"),
        "the report lacks the NodePort table"
    );
    assert!(
        text.contains("built-in"),
        "the report does not name the load generator"
    );
    assert!(text.contains(&results.environment.kernel));
    let svgs: Vec<&Path> = written
        .iter()
        .map(PathBuf::as_path)
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    assert_eq!(svgs.len(), 7, "plots written: {written:?}");
    for svg in svgs {
        let name = svg.file_name().unwrap().to_string_lossy().into_owned();
        assert!(text.contains(&name), "the report does not show {name}");
        let body = std::fs::read_to_string(svg).unwrap();
        assert!(body.starts_with("<svg") && body.trim_end().ends_with("</svg>"));
        assert!(!body.contains("NaN"), "{name} has NaN coordinates");
    }
    let json = serde_json::to_value(&results).expect("results serialise");
    for key in [
        "environment",
        "per_packet",
        "cold",
        "latency",
        "agent",
        "traffic",
        "restart",
    ] {
        assert!(!json[key].is_null(), "JSON lacks {key}");
    }
}

/// The bench builds its packets by hand; an independent parser agrees they are valid.
#[test]
fn bench_packets_have_valid_checksums() {
    let frame = tcp_frame(
        ("10.244.200.1".parse().unwrap(), 40000),
        ("10.96.0.1".parse().unwrap(), 80),
        TCP_SYN,
        b"hello",
    );
    let p = SlicedPacket::from_ethernet(&frame).expect("parses");
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let header = ip.header().to_header();
    assert_eq!(header.header_checksum, header.calc_header_checksum());
    let Some(TransportSlice::Tcp(tcp)) = p.transport else {
        panic!("not TCP")
    };
    assert!(tcp.syn() && !tcp.ack());
    assert_eq!((tcp.source_port(), tcp.destination_port()), (40000, 80));
    let expected = tcp
        .to_header()
        .calc_checksum_ipv4(&header, tcp.payload())
        .unwrap();
    assert_eq!(tcp.checksum(), expected);
}
