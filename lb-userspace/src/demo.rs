//! `xlb demo`: the main job on an embedded default. Builds a two-node network-namespace
//! cluster (xlb::testbed), runs one agent per node, applies the example Service from
//! deploy/examples, sends real requests and shows how they spread and what the maps hold.
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Instant};

use anyhow::{Context, Result};
use xlb::{
    datapath::reader,
    output,
    testbed::{self, Testbed, TestbedSpec},
};

use crate::DemoArgs;

/// The sample Service (ClusterIP 10.96.0.10, NodePorts 30080/TCP and 30053/UDP) and its
/// EndpointSlice, embedded so the demo needs nothing but this binary.
const EXAMPLE: &str = include_str!("../../deploy/examples/demo-service.yaml");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const REQUESTS: usize = 30;

/// One client path: sends a request, returns the answering pod's name.
type Request = Box<dyn Fn(&Testbed) -> Result<String>>;

fn step(msg: &str) {
    eprintln!("demo: {msg}");
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let state_file = Path::new(testbed::DEFAULT_STATE_FILE);
    if args.down {
        step(&format!(
            "tearing down the cluster recorded in {}",
            state_file.display()
        ));
        return testbed::teardown_kept(state_file);
    }
    if state_file.exists() {
        anyhow::bail!(
            "a demo cluster kept earlier is still running ({}); remove it with `xlb demo --down`",
            state_file.display()
        );
    }
    let started = Instant::now();
    step("creating namespaces: switch, node1 (pod-a, pod-b), node2 (pod-c), external client");
    let mut tb = Testbed::create(&TestbedSpec::default())?;
    step(
        "starting HTTP (:8080) and UDP (:5353) servers in each pod; each answers with its pod name",
    );
    tb.start_all_servers()?;
    let manifests = tb.work_dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("demo-service.yaml"), EXAMPLE)?;
    step("applying deploy/examples/demo-service.yaml: Service web, ClusterIP 10.96.0.10, NodePorts 30080/TCP 30053/UDP");
    let xlb = std::env::current_exe().context("locating the xlb binary")?;
    let nodes: Vec<(String, Ipv4Addr)> =
        tb.nodes().iter().map(|n| (n.name.clone(), n.ip)).collect();
    for (node, ip) in &nodes {
        step(&format!(
            "starting xlb on {node} ({ip}): XDP on eth0, TC on pod veths xv*"
        ));
        tb.start_agent(&xlb, node, &manifests, &[])?;
    }

    step(&format!("sending {REQUESTS} new connections per path"));
    let ext = tb.external().netns.clone();
    let pod_a = tb.pod("pod-a").netns.clone();
    let pod_c = tb.pod("pod-c").netns.clone();
    let paths: Vec<(String, Request)> = vec![
        (
            "pod-a (node1) -> 10.96.0.10:80/TCP".into(),
            Box::new(move |tb: &Testbed| tb.http_get(&pod_a, VIP, 80)),
        ),
        ("pod-c (node2) -> 10.96.0.10:53/UDP".into(), {
            let ns = pod_c.clone();
            Box::new(move |tb: &Testbed| tb.udp_request(&ns, VIP, 53))
        }),
        (format!("external -> {}:30080/TCP", nodes[0].1), {
            let (ns, ip) = (ext.clone(), nodes[0].1);
            Box::new(move |tb: &Testbed| tb.http_get(&ns, ip, 30080))
        }),
        (format!("external -> {}:30080/TCP", nodes[1].1), {
            let (ns, ip) = (ext.clone(), nodes[1].1);
            Box::new(move |tb: &Testbed| tb.http_get(&ns, ip, 30080))
        }),
    ];
    let pods: Vec<String> = tb.pods().iter().map(|p| p.name.clone()).collect();
    let mut rows = Vec::new();
    for (label, request) in &paths {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = 0;
        for _ in 0..REQUESTS {
            match request(&tb) {
                Ok(answer) => *counts.entry(answer.trim().to_string()).or_default() += 1,
                Err(_) => failed += 1,
            }
        }
        let mut row = vec![label.clone()];
        row.extend(
            pods.iter()
                .map(|p| counts.get(p).copied().unwrap_or(0).to_string()),
        );
        row.push(failed.to_string());
        rows.push(row);
    }
    let mut header: Vec<&str> = vec!["PATH"];
    header.extend(pods.iter().map(String::as_str));
    header.push("FAILED");
    println!("\nWhich pod answered ({REQUESTS} new connections per path):\n");
    print!("{}", output::table(&header, &rows));

    let node1 = tb.node("node1").clone();
    println!(
        "\n`xlb services --pin-path {}` (node1):\n",
        node1.pin_path.display()
    );
    let services: Vec<Vec<String>> = reader::services(&node1.pin_path)?
        .into_iter()
        .map(|r| vec![r.frontend, r.service, r.backends.join(", ")])
        .collect();
    print!(
        "{}",
        output::table(&["FRONTEND", "SERVICE", "BACKENDS"], &services)
    );
    println!("\n`xlb stats` (node1, non-zero counters):\n");
    let stats: Vec<Vec<String>> = reader::stats(&node1.pin_path)?
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| vec![k.to_string(), v.to_string()])
        .collect();
    print!("{}", output::table(&["VERDICT", "PACKETS"], &stats));
    println!();

    if args.keep {
        let kept = tb.keep(state_file)?;
        step(&format!(
            "kept running (state in {})",
            kept.state_file.display()
        ));
        println!("Explore, e.g.:");
        println!(
            "  nsenter --net=/run/netns/{} curl -s http://10.96.0.10/",
            kept.pods[0].netns
        );
        println!(
            "  nsenter --net=/run/netns/{} curl -s http://{}:30080/",
            kept.external.netns, kept.nodes[0].ip
        );
        println!(
            "  {} conntrack --pin-path {}",
            xlb.display(),
            kept.nodes[0].pin_path.display()
        );
        println!("Agent logs: {}", kept.work_dir.display());
        println!("Tear down:  cargo xtask demo --down   (or: xlb demo --down)");
    } else {
        step("tearing down (use --keep to leave the cluster running)");
        drop(tb);
        step(&format!("done in {:.1}s", started.elapsed().as_secs_f64()));
    }
    Ok(())
}
