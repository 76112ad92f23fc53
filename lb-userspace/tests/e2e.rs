//! End to end on the network-namespace cluster (xlb::testbed): two nodes each running a real
//! `xlb run`, three pods with real HTTP and UDP servers answering with their names, an
//! external client, real clients (curl, sockets). Each test builds its own cluster and tears
//! it down, also on failure.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xlb::testbed::{require_privileges, Testbed, TestbedSpec};

const EXAMPLE: &str = include_str!("../../deploy/examples/demo-service.yaml");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const ALL_PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];

struct Cluster {
    tb: Testbed,
    manifests: PathBuf,
}

fn xlb_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_xlb"))
}

/// Runs `xlb ARGS --pin-path PIN` (services, conntrack, stats) and returns its output,
/// which must be a success.
fn xlb(args: &[&str], pin: &Path) -> String {
    let out = std::process::Command::new(xlb_bin())
        .args(args)
        .arg("--pin-path")
        .arg(pin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xlb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The same, with `-o json`, parsed.
fn xlb_json(args: &[&str], pin: &Path) -> serde_json::Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    serde_json::from_str(&xlb(&args, pin)).unwrap()
}

impl Cluster {
    /// The default testbed with servers in every pod, the example Service applied, and an
    /// agent on each node.
    fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &[])
    }

    /// As `start`, with extra `xlb run` arguments for every agent.
    fn start_with(test: &str, extra: &[&str]) -> Option<Self> {
        if !require_privileges(test) {
            return None;
        }
        let mut tb = Testbed::create(&TestbedSpec::default()).expect("create testbed");
        tb.start_all_servers().expect("start servers");
        let manifests = tb.work_dir().join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        std::fs::write(manifests.join("web.yaml"), EXAMPLE).unwrap();
        for node in ["node1", "node2"] {
            tb.start_agent(xlb_bin(), node, &manifests, extra)
                .unwrap_or_else(|e| panic!("agent on {node}: {e:#}"));
        }
        Some(Self { tb, manifests })
    }

    fn netns(&self, pod: &str) -> String {
        self.tb.pod(pod).netns.clone()
    }

    /// Replaces the example manifest with `text`, atomically (write aside, rename): the agent
    /// never reads a half-written file.
    fn write_manifest(&self, text: &str) {
        let tmp = self.manifests.join(".web.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests.join("web.yaml")).unwrap();
    }

    /// Rewrites the example with only `pods` as endpoints.
    fn set_endpoints(&self, pods: &[&str]) {
        self.edit_manifest(|docs| {
            let endpoints = docs[1]["endpoints"].as_sequence_mut().unwrap();
            endpoints.retain(|e| pods.contains(&e["targetRef"]["name"].as_str().unwrap()));
        });
    }

    /// A kept-alive connection from `netns` to the ClusterIP, and the pod that answered its
    /// first request.
    fn established(&self, netns: &str) -> (xlb::testbed::PersistentClient, String) {
        let mut connection = self
            .tb
            .open_persistent_http(netns, VIP, 80)
            .expect("connect");
        let first = connection
            .request()
            .expect("first request")
            .trim()
            .to_string();
        (connection, first)
    }

    fn logs(&self) -> String {
        format!(
            "--- node1 agent ---\n{}\n--- node2 agent ---\n{}",
            self.tb.agent_log("node1"),
            self.tb.agent_log("node2")
        )
    }
}

/// Sends requests until every expected answer was seen (at most `max` requests) and returns
/// what answered. Any failed request fails the test.
fn answers(
    max: usize,
    expected: &[&str],
    mut request: impl FnMut() -> anyhow::Result<String>,
) -> BTreeSet<String> {
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    let mut seen = BTreeSet::new();
    for _ in 0..max {
        let answer = request().unwrap_or_else(|e| panic!("request failed: {e:#}"));
        seen.insert(answer.trim().to_string());
        if seen.is_superset(&expected) {
            break;
        }
    }
    seen
}

fn all() -> BTreeSet<String> {
    ALL_PODS.iter().map(|s| s.to_string()).collect()
}

#[test]
fn clusterip_from_pods_on_both_nodes_reaches_all_three_backends() {
    let Some(c) = Cluster::start("clusterip_from_pods_on_both_nodes_reaches_all_three_backends")
    else {
        return;
    };
    // pod-a is on node1 (and is itself a backend: hairpin), pod-c on node2.
    for client in ["pod-a", "pod-c"] {
        let ns = c.netns(client);
        let seen = answers(120, &ALL_PODS, || c.tb.http_get(&ns, VIP, 80));
        assert_eq!(seen, all(), "from {client}\n{}", c.logs());
    }
}

#[test]
fn nodeport_from_external_client_reaches_all_three_backends_via_both_nodes() {
    let Some(c) =
        Cluster::start("nodeport_from_external_client_reaches_all_three_backends_via_both_nodes")
    else {
        return;
    };
    let ext = c.tb.external().netns.clone();
    for node in ["node1", "node2"] {
        let ip = c.tb.node(node).ip;
        let seen = answers(120, &ALL_PODS, || c.tb.http_get(&ext, ip, 30080));
        assert_eq!(seen, all(), "via {node}\n{}", c.logs());
    }
}

#[test]
fn udp_through_clusterip_and_nodeport_reaches_all_backends() {
    let Some(c) = Cluster::start("udp_through_clusterip_and_nodeport_reaches_all_backends") else {
        return;
    };
    let ns = c.netns("pod-b");
    let seen = answers(120, &ALL_PODS, || c.tb.udp_request(&ns, VIP, 53));
    assert_eq!(seen, all(), "UDP ClusterIP\n{}", c.logs());
    let ext = c.tb.external().netns.clone();
    let ip = c.tb.node("node2").ip;
    let seen = answers(120, &ALL_PODS, || c.tb.udp_request(&ext, ip, 30053));
    assert_eq!(seen, all(), "UDP NodePort\n{}", c.logs());
}

#[test]
fn removed_endpoint_gets_no_new_connections_within_2s_and_established_ones_continue() {
    let Some(c) = Cluster::start(
        "removed_endpoint_gets_no_new_connections_within_2s_and_established_ones_continue",
    ) else {
        return;
    };
    let client = c.netns("pod-c");
    let (mut established, kept) = c.established(&client);
    let removed = ALL_PODS.iter().find(|p| **p != kept).unwrap().to_string();
    let remaining: Vec<&str> = ALL_PODS.iter().copied().filter(|p| *p != removed).collect();

    c.set_endpoints(&remaining);
    let changed = Instant::now();
    // Poll until a window of new connections avoids the removed pod; it must open within 2 s.
    let mut clean_since = None;
    loop {
        let answer =
            c.tb.http_get(&client, VIP, 80)
                .expect("new connection")
                .trim()
                .to_string();
        if answer == removed {
            clean_since = None;
        } else if clean_since.is_none() {
            clean_since = Some(Instant::now());
        }
        if let Some(t) = clean_since {
            if t.elapsed() > Duration::from_millis(1500) {
                break;
            }
        }
        assert!(
            changed.elapsed() < Duration::from_secs(10),
            "{removed} still receives new connections 10 s after removal\n{}",
            c.logs()
        );
    }
    let took = clean_since.unwrap().duration_since(changed);
    assert!(
        took <= Duration::from_secs(2),
        "removal took {took:?} to apply\n{}",
        c.logs()
    );
    // After the window: 30 more new connections, none to the removed pod, both others seen.
    let seen = answers(30, &[], || c.tb.http_get(&client, VIP, 80));
    assert!(
        !seen.contains(&removed),
        "{removed} answered after removal: {seen:?}"
    );
    // The established connection still answers, from the same pod.
    for _ in 0..5 {
        assert_eq!(
            established
                .request()
                .expect("established connection")
                .trim(),
            kept
        );
    }
}

#[test]
fn services_and_conntrack_commands_show_the_programmed_datapath() {
    let Some(c) = Cluster::start("services_and_conntrack_commands_show_the_programmed_datapath")
    else {
        return;
    };
    let pin = c.tb.node("node1").pin_path.clone();
    let rows = xlb_json(&["services"], &pin);
    let frontends: BTreeSet<String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["frontend"].as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = [
        "10.96.0.10:80/TCP",
        "10.96.0.10:53/UDP",
        "10.96.0.10:*/*",
        "172.18.0.11:30080/TCP",
        "172.18.0.11:30053/UDP",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(frontends, expected);
    for row in rows.as_array().unwrap() {
        // The ClusterIP's other ports (S04) are refused: no backends.
        let expected = if row["port"] == 0 { 0 } else { 3 };
        assert_eq!(row["backends"].as_array().unwrap().len(), expected, "{row}");
    }
    // One request through node1 leaves a tracked flow that `xlb conntrack` shows.
    let ns = c.netns("pod-b");
    c.tb.http_get(&ns, VIP, 80).expect("request");
    let flows = xlb_json(&["conntrack"], &pin);
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["to"] == "10.96.0.10:80" && f["direction"] == "original"),
        "{flows}"
    );
    // The maps stay pinned when the agent stops: the commands still read them.
    let mut c = c;
    c.tb.stop_agent("node1").expect("stop agent");
    let table = xlb(&["services"], &pin);
    assert!(table.starts_with("FRONTEND"), "{table}");
    assert!(
        table.contains("10.96.0.10:80/TCP") && table.contains("default/web:http/TCP"),
        "{table}"
    );
}

/// Names of the programs attached by tcx at ingress of `iface` in `netns`.
fn tcx_programs(c: &Cluster, netns: &str, iface: &str) -> Vec<String> {
    c.tb.in_netns(netns, || {
        let (_, programs) =
            aya::programs::SchedClassifier::query_tcx(iface, aya::programs::TcAttachType::Ingress)?;
        Ok(programs
            .iter()
            .filter_map(|p| p.name_as_str().map(str::to_string))
            .collect::<Vec<_>>())
    })
    .unwrap_or_else(|e| panic!("query tcx on {iface}: {e:#}"))
}

#[test]
fn uplinks_in_tc_mode_serve_nodeport_and_clusterip() {
    let Some(c) = Cluster::start_with(
        "uplinks_in_tc_mode_serve_nodeport_and_clusterip",
        &["--uplink-mode", "tc"],
    ) else {
        return;
    };
    let ext = c.tb.external().netns.clone();
    for node in ["node1", "node2"] {
        let ip = c.tb.node(node).ip;
        let seen = answers(120, &ALL_PODS, || c.tb.http_get(&ext, ip, 30080));
        assert_eq!(
            seen,
            all(),
            "NodePort via {node} with TC uplinks\n{}",
            c.logs()
        );
    }
    let ns = c.netns("pod-c");
    let seen = answers(120, &ALL_PODS, || c.tb.http_get(&ns, VIP, 80));
    assert_eq!(seen, all(), "ClusterIP with TC uplinks\n{}", c.logs());
    // The uplink really runs the TC program (tcx), not XDP.
    let node1 = c.tb.node("node1").netns.clone();
    assert_eq!(tcx_programs(&c, &node1, "eth0"), vec!["xlb_tc".to_string()]);
    // Translated packets for local pods went straight into them: NodePort requests to
    // each node's own pods, and on node1 the replies to pod-c's ClusterIP requests.
    for node in ["node1", "node2"] {
        let stats = xlb_json(&["stats"], &c.tb.node(node).pin_path);
        assert!(
            stats["redirect_peer"].as_u64().unwrap() > 0,
            "no packet delivered by bpf_redirect_peer on {node}: {stats}"
        );
    }
}

/// What the pod-device map of `node` holds (interface indexes).
fn pod_devices(c: &Cluster, node: &str) -> BTreeSet<u32> {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(
        c.tb.node(node)
            .pin_path
            .join(lb_common::map_name::POD_DEVICES),
    )
    .expect("pod-device map pinned");
    let map: HashMap<MapData, u32, u32> = HashMap::try_from(Map::HashMap(data)).unwrap();
    map.keys().map(Result::unwrap).collect()
}

/// The index of interface `iface` in `netns`.
fn ifindex(c: &Cluster, netns: &str, iface: &str) -> u32 {
    c.tb.in_netns(netns, || {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: a NUL-terminated name.
        Ok(unsafe { libc::if_nametoindex(name.as_ptr()) })
    })
    .unwrap()
}

#[test]
fn pod_interface_created_after_start_is_attached() {
    let Some(c) = Cluster::start("pod_interface_created_after_start_is_attached") else {
        return;
    };
    let node1 = c.tb.node("node1").netns.clone();
    // Lives in the node's namespace, so the testbed's teardown removes it.
    let out =
        c.tb.run_in(
            &node1,
            &[
                "ip", "link", "add", "name", "xvlate", "type", "veth", "peer", "name", "late0",
            ],
        )
        .expect("ip link add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent rescans interfaces every second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcx_programs(&c, &node1, "xvlate").is_empty() {
        assert!(
            Instant::now() < deadline,
            "xvlate not attached within 5 s\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        tcx_programs(&c, &node1, "xvlate"),
        vec!["xlb_tc".to_string()]
    );
    assert!(
        tcx_programs(&c, &node1, "late0").is_empty(),
        "late0 does not match xv* and must stay untouched"
    );
    // Its veth is registered for direct delivery beside the pods' own, and forgotten
    // when it goes.
    let pods: BTreeSet<u32> = ["xvpoda", "xvpodb"]
        .iter()
        .map(|veth| ifindex(&c, &node1, veth))
        .collect();
    let late = ifindex(&c, &node1, "xvlate");
    let mut with_late = pods.clone();
    with_late.insert(late);
    c.eventually("xvlate registered as a pod device", || {
        pod_devices(&c, "node1") == with_late
    });
    let out =
        c.tb.run_in(&node1, &["ip", "link", "del", "xvlate"])
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.eventually("xvlate forgotten as a pod device", || {
        pod_devices(&c, "node1") == pods
    });
}

#[test]
fn malformed_manifest_keeps_the_last_good_state() {
    let Some(c) = Cluster::start("malformed_manifest_keeps_the_last_good_state") else {
        return;
    };
    c.write_manifest("apiVersion: v1\nkind: Service\nmetadata: {name: web\n  spec: [unclosed\n");
    // The agent reports the file and the reason...
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = c.tb.agent_log("node1");
        if log.contains("web.yaml") && log.contains("manifest not applied") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "malformed file not reported\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...and keeps serving the last good state: every backend still answers.
    let ns = c.netns("pod-c");
    let seen = answers(120, &ALL_PODS, || c.tb.http_get(&ns, VIP, 80));
    assert_eq!(seen, all(), "{}", c.logs());
    // A good file again is applied.
    c.set_endpoints(&["pod-b"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answers: BTreeSet<String> = (0..10)
            .map(|_| {
                c.tb.http_get(&ns, VIP, 80)
                    .expect("request")
                    .trim()
                    .to_string()
            })
            .collect();
        if answers == BTreeSet::from(["pod-b".to_string()]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fixed manifest not applied: {answers:?}\n{}",
            c.logs()
        );
    }
}

#[test]
fn external_ip_and_load_balancer_ip_work_from_outside_and_from_pods() {
    let Some(c) =
        Cluster::start("external_ip_and_load_balancer_ip_work_from_outside_and_from_pods")
    else {
        return;
    };
    let external_ip = Ipv4Addr::new(203, 0, 113, 10);
    let lb_ip = Ipv4Addr::new(203, 0, 113, 20);
    c.edit_manifest(|docs| {
        docs[0]["spec"]["externalIPs"] = serde_yaml::from_str(&format!("[{external_ip}]")).unwrap();
        docs[0]["spec"]["type"] = "LoadBalancer".into();
        docs[0]["status"] =
            serde_yaml::from_str(&format!("{{loadBalancer: {{ingress: [{{ip: {lb_ip}}}]}}}}"))
                .unwrap();
    });
    // The network routes these addresses to node2 (neither is assigned to any node).
    let ext = c.tb.external().netns.clone();
    let node2 = c.tb.node("node2").ip.to_string();
    for ip in [external_ip, lb_ip] {
        let out =
            c.tb.run_in(
                &ext,
                &["ip", "route", "add", &format!("{ip}/32"), "via", &node2],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pod = c.netns("pod-a");
    for ip in [external_ip, lb_ip] {
        // Applied within the agent's poll interval; the first requests may still be refused.
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.tb.http_get(&ext, ip, 80).is_err() {
            assert!(Instant::now() < deadline, "{ip} not served\n{}", c.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        let seen = answers(120, &ALL_PODS, || c.tb.http_get(&ext, ip, 80));
        assert_eq!(seen, all(), "external client -> {ip}\n{}", c.logs());
        let seen = answers(120, &ALL_PODS, || c.tb.http_get(&pod, ip, 80));
        assert_eq!(seen, all(), "pod-a -> {ip}\n{}", c.logs());
    }
}

#[test]
fn s32_agents_killed_and_restarted_three_times_break_no_connection() {
    let Some(mut c) =
        Cluster::start("s32_agents_killed_and_restarted_three_times_break_no_connection")
    else {
        return;
    };
    let client = c.netns("pod-c");
    let (mut established, kept) = c.established(&client);

    // New connections through the VIP, back to back, for the whole test, from another pod.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looper = {
        let (stop, ns) = (stop.clone(), c.netns("pod-b"));
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new("nsenter")
                    .args([
                        &format!("--net=/run/netns/{ns}"),
                        "curl",
                        "-sS",
                        "--max-time",
                        "2",
                        "http://10.96.0.10/",
                    ])
                    .output()
                    .expect("run curl");
                if out.status.success() && !out.stdout.is_empty() {
                    ok += 1;
                } else {
                    failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            (ok, failed)
        })
    };

    for cycle in 1..=3 {
        for node in ["node1", "node2"] {
            let pid = c.tb.agent_pid(node).expect("agent running");
            // SIGKILL: no clean-up code runs, as in a crash or an OOM kill.
            // SAFETY: plain syscall on a pid this test's testbed started.
            assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
            let _ = c.tb.stop_agent(node); // reaps it
        }
        // No agent anywhere: the datapath keeps serving from the pinned maps and links.
        assert_eq!(
            established
                .request()
                .expect("request while agents are down")
                .trim(),
            kept,
            "cycle {cycle}"
        );
        for node in ["node1", "node2"] {
            c.tb.start_agent(xlb_bin(), node, &c.manifests, &[])
                .unwrap_or_else(|e| panic!("restart {cycle} on {node}: {e:#}"));
        }
        assert_eq!(
            established.request().expect("request after restart").trim(),
            kept,
            "cycle {cycle}"
        );
        assert!(
            c.tb.agent_log("node1").contains("no gap"),
            "the restarted agent took over the pinned links"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = looper.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed across restarts: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed
    );
    assert!(ok >= 10, "the request loop ran ({ok} requests)");
    // Everything still balances after the restarts.
    let seen = answers(120, &ALL_PODS, || c.tb.http_get(&client, VIP, 80));
    assert_eq!(seen, all(), "{}", c.logs());
}

impl Cluster {
    /// Rewrites the example with `edit` applied to its documents (0: Service, 1: slice).
    fn edit_manifest(&self, edit: impl FnOnce(&mut Vec<serde_yaml::Value>)) {
        let mut docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(EXAMPLE)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        edit(&mut docs);
        let text: Vec<String> = docs
            .iter()
            .map(|d| serde_yaml::to_string(d).unwrap())
            .collect();
        self.write_manifest(&text.join("---\n"));
    }

    /// curl from `netns`; the body, or the curl error.
    fn curl(&self, netns: &str, url: &str, extra: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["curl", "-sS", "--max-time", "2"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.tb.run_in(netns, &args)?;
        anyhow::ensure!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Polls `condition` (bounded: the agent applies manifest changes within a second).
    fn eventually(&self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within 5 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).unwrap()
}

#[test]
fn s16_s12_backends_see_pod_sources_and_masqueraded_remote_nodeport_traffic() {
    let Some(c) =
        Cluster::start("s16_s12_backends_see_pod_sources_and_masqueraded_remote_nodeport_traffic")
    else {
        return;
    };
    // S16: pod -> ClusterIP, every backend sees the pod's own address.
    let pod_b = c.netns("pod-b");
    for _ in 0..20 {
        let answer = c.curl(&pod_b, "http://10.96.0.10/client", &[]).unwrap();
        let (pod, client) = answer.split_once(' ').unwrap();
        if pod == "pod-b" {
            continue; // hairpin: masqueraded by design (S17)
        }
        assert_eq!(client, "10.244.1.3", "{pod} saw {client}");
    }
    // S12: external -> node1's NodePort; a backend on node2 sees node1's address, a backend
    // on node1 sees the external client (its reply passes node1 anyway).
    let ext = c.tb.external().netns.clone();
    let (mut remote, mut local) = (false, false);
    for _ in 0..60 {
        let answer = c
            .curl(&ext, "http://172.18.0.11:30080/client", &[])
            .unwrap();
        let (pod, client) = answer.split_once(' ').unwrap();
        if pod == "pod-c" {
            assert_eq!(client, "172.18.0.11");
            remote = true;
        } else {
            assert_eq!(client, "172.18.0.100");
            local = true;
        }
    }
    assert!(remote && local, "both kinds of backend were reached");
}

#[test]
fn s06_a_2000_byte_request_body_passes_the_service() {
    let Some(c) = Cluster::start("s06_a_2000_byte_request_body_passes_the_service") else {
        return;
    };
    let body = "x".repeat(2000);
    for netns in [c.netns("pod-c"), c.tb.external().netns.clone()] {
        let url = if netns.ends_with("ext") {
            "http://172.18.0.12:30080/"
        } else {
            "http://10.96.0.10/"
        };
        for _ in 0..6 {
            let answer = c.curl(&netns, url, &["--data-binary", &body]).unwrap();
            assert!(answer.ends_with(" 2000"), "{answer}");
        }
    }
}

#[test]
fn s15_changing_the_node_port_stops_the_old_port_at_once() {
    let Some(c) = Cluster::start("s15_changing_the_node_port_stops_the_old_port_at_once") else {
        return;
    };
    let ext = c.tb.external().netns.clone();
    c.curl(&ext, "http://172.18.0.11:30080/", &[])
        .expect("old port serves first");
    c.edit_manifest(|docs| docs[0]["spec"]["ports"][0]["nodePort"] = 30081.into());
    c.eventually("new nodePort serves", || {
        c.curl(&ext, "http://172.18.0.11:30081/", &[]).is_ok()
    });
    let err = c
        .curl(&ext, "http://172.18.0.11:30080/", &[])
        .expect_err("old port must stop");
    assert!(
        err.to_string().contains("refused") || err.to_string().contains("Couldn't connect"),
        "{err}"
    );
    // Deleting the service stops the ClusterIP as well.
    let pod = c.netns("pod-c");
    c.edit_manifest(|docs| {
        docs.remove(0);
    });
    c.eventually("ClusterIP gone", || {
        c.curl(&pod, "http://10.96.0.10/", &["--connect-timeout", "1"])
            .is_err()
    });
}

#[test]
fn s19_s20_session_affinity_pins_a_client_and_can_be_switched_off() {
    let Some(c) = Cluster::start("s19_s20_session_affinity_pins_a_client_and_can_be_switched_off")
    else {
        return;
    };
    c.edit_manifest(|docs| docs[0]["spec"]["sessionAffinity"] = "ClientIP".into());
    let pod = c.netns("pod-c");
    let ext = c.tb.external().netns.clone();
    // Wait for the switch: 15 consecutive requests answered by one backend (S19).
    let one_backend = |netns: &str, url: &str| -> bool {
        let answers: BTreeSet<String> = (0..15).map(|_| c.curl(netns, url, &[]).unwrap()).collect();
        answers.len() == 1
    };
    c.eventually("ClusterIP affinity", || {
        one_backend(&pod, "http://10.96.0.10/")
    });
    assert!(
        one_backend(&ext, "http://172.18.0.11:30080/"),
        "NodePort affinity"
    );
    // S20: back to None, new connections spread again.
    c.edit_manifest(|docs| docs[0]["spec"]["sessionAffinity"] = "None".into());
    c.eventually("affinity off", || !one_backend(&pod, "http://10.96.0.10/"));
}

#[test]
fn s22_s23_external_traffic_policy_local_keeps_sources_and_reports_health() {
    let Some(c) =
        Cluster::start("s22_s23_external_traffic_policy_local_keeps_sources_and_reports_health")
    else {
        return;
    };
    let local_policy = |docs: &mut Vec<serde_yaml::Value>| {
        docs[0]["spec"]["type"] = "LoadBalancer".into();
        docs[0]["spec"]["externalTrafficPolicy"] = "Local".into();
        docs[0]["spec"]["healthCheckNodePort"] = 32000.into();
    };
    c.edit_manifest(local_policy);
    let ext = c.tb.external().netns.clone();
    // Through node2, only node2's pod answers, and it sees the external client's address.
    c.eventually("node2 serves only pod-c", || {
        (0..10).all(|_| {
            c.curl(&ext, "http://172.18.0.12:30080/client", &[])
                .unwrap()
                == "pod-c 172.18.0.100"
        })
    });
    // Through node1, only node1's pods.
    for _ in 0..10 {
        let answer = c
            .curl(&ext, "http://172.18.0.11:30080/client", &[])
            .unwrap();
        assert!(
            answer == "pod-a 172.18.0.100" || answer == "pod-b 172.18.0.100",
            "{answer}"
        );
    }
    // Pods keep reaching every endpoint through the NodePort.
    let pod = c.netns("pod-c");
    let seen = answers(120, &ALL_PODS, || {
        c.tb.http_get(&pod, c.tb.node("node1").ip, 30080)
    });
    assert_eq!(seen, all());
    // S23: the health-check node port: 200 with local endpoints, 503 without.
    let status = |node_ip: &str| {
        c.curl(
            &ext,
            &format!("http://{node_ip}:32000/"),
            &["-o", "/dev/null", "-w", "%{http_code}"],
        )
        .unwrap_or_else(|e| e.to_string())
    };
    c.eventually("node2's health check reports 200", || {
        status("172.18.0.12") == "200"
    });
    c.edit_manifest(|docs| {
        local_policy(docs);
        docs[1]["endpoints"]
            .as_sequence_mut()
            .unwrap()
            .retain(|e| e["nodeName"] == "node1");
    });
    c.eventually("node2 reports 503 without local endpoints", || {
        status("172.18.0.12") == "503"
    });
    assert_eq!(status("172.18.0.11"), "200");
    // And node2 drops (no RST) external NodePort traffic: curl times out instead of being refused.
    let err = c
        .curl(&ext, "http://172.18.0.12:30080/", &["--max-time", "1"])
        .expect_err("dropped");
    assert!(
        err.to_string().contains("timed out") || err.to_string().contains("Timeout"),
        "{err}"
    );
    // The node-wide health endpoint answers too.
    assert_eq!(
        c.curl(
            &ext,
            "http://172.18.0.12:10256/healthz",
            &["-o", "/dev/null", "-w", "%{http_code}"]
        )
        .unwrap(),
        "200"
    );
}

#[test]
fn s24_internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let Some(c) =
        Cluster::start("s24_internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node")
    else {
        return;
    };
    c.edit_manifest(|docs| docs[0]["spec"]["internalTrafficPolicy"] = "Local".into());
    let pod_c = c.netns("pod-c");
    c.eventually("pod-c only reaches itself", || {
        (0..10).all(|_| c.curl(&pod_c, "http://10.96.0.10/", &[]).unwrap() == "pod-c")
    });
    let pod_a = c.netns("pod-a");
    let seen = answers(60, &["pod-a", "pod-b"], || c.tb.http_get(&pod_a, VIP, 80));
    assert_eq!(
        seen,
        BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()])
    );
}

#[test]
fn s27_established_connection_to_a_terminating_endpoint_keeps_working() {
    let Some(c) =
        Cluster::start("s27_established_connection_to_a_terminating_endpoint_keeps_working")
    else {
        return;
    };
    let client = c.netns("pod-c");
    let (mut established, kept) = c.established(&client);
    c.edit_manifest(|docs| {
        for e in docs[1]["endpoints"].as_sequence_mut().unwrap() {
            if e["targetRef"]["name"] == kept.as_str() {
                e["conditions"] = yaml("{ready: false, serving: true, terminating: true}");
            }
        }
    });
    c.eventually("new connections avoid the terminating pod", || {
        (0..15).all(|_| c.tb.http_get(&client, VIP, 80).unwrap().trim() != kept)
    });
    for _ in 0..5 {
        assert_eq!(established.request().expect("established").trim(), kept);
    }
}

#[test]
fn s10_service_without_endpoints_is_refused_never_a_timeout() {
    let Some(c) = Cluster::start("s10_service_without_endpoints_is_refused_never_a_timeout") else {
        return;
    };
    let empty = r#"
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30090}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30091}
"#;
    std::fs::write(c.manifests.join("empty.yaml"), empty).unwrap();
    let pod = c.netns("pod-c");
    let ext = c.tb.external().netns.clone();
    // Both agents have programmed the new service before anything is sent.
    for node in ["node1", "node2"] {
        let pin = c.tb.node(node).pin_path.clone();
        c.eventually("the empty service is programmed", || {
            xlb::datapath::reader::services(&pin).is_ok_and(|rows| {
                rows.iter()
                    .filter(|r| r.service.starts_with("default/empty"))
                    .count()
                    == 5 // two ports, two node ports, the other ports (S04)
            })
        });
    }
    // Exactly "connection refused": a RST for TCP, ICMP port unreachable for UDP (a missing
    // route or a drop would show up as another error or a timeout).
    let refused = |result: anyhow::Result<String>| {
        let text = format!("{:#}", result.expect_err("must be refused"));
        assert!(text.contains("refused"), "expected a refusal, got: {text}");
    };
    // TC on the pod's veth answers the pod.
    assert_eq!(
        c.tcp_connect(&pod, Ipv4Addr::new(10, 96, 0, 11), 80),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    refused(c.tb.udp_request(&pod, Ipv4Addr::new(10, 96, 0, 11), 53));
    // XDP on node1's uplink answers the external client the same way.
    assert_eq!(
        c.tcp_connect(&ext, Ipv4Addr::new(172, 18, 0, 11), 30090),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    refused(c.tb.udp_request(&ext, Ipv4Addr::new(172, 18, 0, 11), 30091));
    let stats = |node: &str| xlb_json(&["stats"], &c.tb.node(node).pin_path);
    assert!(stats("node2")["reject_tcp_reset"].as_u64().unwrap() >= 1);
    assert!(stats("node2")["reject_icmp_unreachable"].as_u64().unwrap() >= 1);
    assert!(stats("node1")["reject_tcp_reset"].as_u64().unwrap() >= 1);
    assert!(stats("node1")["reject_icmp_unreachable"].as_u64().unwrap() >= 1);
}

#[test]
fn s18_node_processes_reach_cluster_ip_node_port_and_external_ip() {
    let Some(c) = Cluster::start("s18_node_processes_reach_cluster_ip_node_port_and_external_ip")
    else {
        return;
    };
    let external_ip = Ipv4Addr::new(203, 0, 113, 10);
    c.edit_manifest(|docs| {
        docs[0]["spec"]["externalIPs"] = yaml(&format!("[{external_ip}]"));
    });
    let node1 = c.tb.node("node1").netns.clone();
    let (ip1, ip2) = (c.tb.node("node1").ip, c.tb.node("node2").ip);
    // Nothing routes the external IP from node1: only the connect4 rewrite reaches it.
    c.eventually("external IP balanced for node processes", || {
        c.tb.http_get(&node1, external_ip, 80).is_ok()
    });
    for (ip, port) in [(VIP, 80), (ip1, 30080), (ip2, 30080), (external_ip, 80)] {
        let seen = answers(120, &ALL_PODS, || c.tb.http_get(&node1, ip, port));
        assert_eq!(seen, all(), "node1 -> {ip}:{port}\n{}", c.logs());
    }
    let seen = answers(120, &ALL_PODS, || c.tb.udp_request(&node1, VIP, 53));
    assert_eq!(seen, all(), "node1 -> {VIP}:53/UDP\n{}", c.logs());

    // Isolation: the programs see every namespace of the machine but rewrite only sockets
    // of their agent's. A connected UDP socket (nothing is sent) shows both views: its peer
    // as getpeername() reports it, and its destination as the kernel holds it
    // (/proc/net/udp of the namespace).
    type Peers = Result<(SocketAddr, SocketAddr), std::io::ErrorKind>;
    let peers = |netns: &str| -> Peers {
        c.tb.in_netns(netns, || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            if let Err(e) = s.connect((VIP, 53)) {
                return Ok(Err(e.kind()));
            }
            let shown = s.peer_addr()?;
            let port = s.local_addr()?.port();
            let table = std::fs::read_to_string("/proc/thread-self/net/udp")?;
            let kernel = table
                .lines()
                .skip(1)
                .find_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let (_, local_port) = fields.get(1)?.split_once(':')?;
                    if u16::from_str_radix(local_port, 16).ok()? != port {
                        return None;
                    }
                    let (ip, port) = fields.get(2)?.split_once(':')?;
                    let ip = u32::from_str_radix(ip, 16).ok()?;
                    Some(SocketAddr::from((
                        Ipv4Addr::from(ip.to_ne_bytes()),
                        u16::from_str_radix(port, 16).ok()?,
                    )))
                })
                .expect("the socket in /proc/net/udp");
            Ok(Ok((shown, kernel)))
        })
        .unwrap()
    };
    let service = SocketAddr::from((VIP, 53));
    let (shown, kernel) = peers(&node1).expect("connect in node1");
    assert_eq!(shown, service, "getpeername4 shows the service");
    assert_ne!(
        kernel.ip(),
        std::net::IpAddr::V4(VIP),
        "node1 not rewritten"
    );
    assert_eq!(kernel.port(), 5353, "node1: {kernel}");
    let pod = c.netns("pod-a");
    assert_eq!(
        peers(&pod).expect("connect in pod-a"),
        (service, service),
        "a pod's connect() must be left to the packet path"
    );
    let ext = c.tb.external().netns.clone();
    match peers(&ext) {
        Ok(both) => assert_eq!(both, (service, service), "external"),
        // No route to the ClusterIP outside the cluster: not rewritten either.
        Err(kind) => assert_eq!(kind, std::io::ErrorKind::NetworkUnreachable),
    }

    // A service without endpoints: connect() fails at once with ECONNREFUSED.
    c.set_endpoints(&[]);
    c.eventually("connect refused without endpoints", || {
        c.tb.in_netns(&node1, || {
            let addr = std::net::SocketAddr::from((VIP, 80));
            Ok(
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .map(|_| ())
                    .map_err(|e| e.kind()),
            )
        })
        .unwrap()
            == Err(std::io::ErrorKind::ConnectionRefused)
    });
}

#[test]
fn s18_unconnected_udp_from_node_processes_is_balanced_and_answered_from_the_service() {
    let Some(c) = Cluster::start(
        "s18_unconnected_udp_from_node_processes_is_balanced_and_answered_from_the_service",
    ) else {
        return;
    };
    let node1 = c.tb.node("node1").netns.clone();
    let ip1 = c.tb.node("node1").ip;
    // sendto() without connect(): the sendmsg4 hook picks a backend per datagram (the same
    // one for one socket), recvmsg4 shows the reply as coming from the address sent to.
    // One socket talks to two frontends, so both translations must be kept side by side.
    let exchange = |targets: &[SocketAddr]| -> anyhow::Result<Vec<(String, SocketAddr)>> {
        let targets = targets.to_vec();
        c.tb.in_netns(&node1, move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut replies = Vec::new();
            for target in targets {
                sock.send_to(b"ping", target)?;
                let mut buf = [0u8; 2048];
                let (n, from) = sock.recv_from(&mut buf)?;
                replies.push((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from));
            }
            Ok(replies)
        })
    };
    let service = SocketAddr::from((VIP, 53));
    let node_port = SocketAddr::from((ip1, 30053));
    c.eventually("unconnected UDP answered", || {
        exchange(&[service]).is_ok_and(|r| r[0].1 == service)
    });
    let mut seen = BTreeSet::new();
    for _ in 0..120 {
        let replies = exchange(&[service, node_port, service]).expect("exchange");
        for (answer, _) in &replies {
            assert!(ALL_PODS.contains(&answer.as_str()), "answer {answer:?}");
            seen.insert(answer.clone());
        }
        assert_eq!(replies[0].1, service, "reply shown from the ClusterIP");
        assert_eq!(replies[1].1, node_port, "reply shown from the NodePort");
        assert_eq!(replies[2].1, service);
        assert_eq!(
            replies[0].0, replies[2].0,
            "one socket stays on one backend of a service"
        );
        if seen == all() {
            break;
        }
    }
    assert_eq!(
        seen,
        all(),
        "sockets spread over every backend\n{}",
        c.logs()
    );
}

/// Issue 5: path MTU discovery through a ClusterIP. pod-a sends a large request to the
/// ClusterIP, served by pod-c on node2 only; node2's link to pod-c has a smaller MTU, so
/// node2 drops the full-size segments and answers with fragmentation needed, quoting the
/// *translated* segment (pod-a -> pod-c:8080). node1's datapath translates the quote back to
/// pod-a -> VIP:80, which is what pod-a's socket knows: pod-a learns the path MTU towards the
/// ClusterIP and the transfer completes. Untranslated, pod-a would ignore the error and the
/// DF segments would be dropped until curl gives up.
#[test]
fn issue5_path_mtu_discovery_through_a_cluster_ip() {
    let Some(c) = Cluster::start("issue5_path_mtu_discovery_through_a_cluster_ip") else {
        return;
    };
    const MTU: &str = "1200";
    c.set_endpoints(&["pod-c"]);
    let node1_pin = c.tb.node("node1").pin_path.clone();
    c.eventually("node1 serves the ClusterIP from pod-c only", || {
        xlb_json(&["services"], &node1_pin)
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["frontend"] == "10.96.0.10:80/TCP")
            .is_some_and(|r| r["backends"].as_array().unwrap().len() == 1)
    });
    let node2 = c.tb.node("node2").netns.clone();
    let pod_c_veth = c.tb.pod("pod-c").host_veth.clone();
    let out =
        c.tb.run_in(&node2, &["ip", "link", "set", &pod_c_veth, "mtu", MTU])
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pod_a = c.netns("pod-a");
    let body = "x".repeat(20_000);
    let answer = c
        .curl(&pod_a, "http://10.96.0.10/", &["--data-binary", &body])
        .unwrap_or_else(|e| panic!("large request through the ClusterIP: {e:#}\n{}", c.logs()));
    assert_eq!(answer, "pod-c 20000", "whole body received by pod-c");
    assert_eq!(
        tcp_in_csum_errors(&c, &c.netns("pod-c")),
        0,
        "segments with a bad TCP checksum reached pod-c"
    );

    // pod-a learned the path MTU for the ClusterIP (a route exception), which it can only
    // have from an error quoting its own socket's tuple.
    assert_path_mtu_learned(
        &c,
        &pod_a,
        "10.96.0.10",
        MTU,
        &node1_pin,
        "icmp_error_to_client",
    );
}

/// Runs `argv` in `netns`; it must succeed.
fn run_ok(c: &Cluster, netns: &str, argv: &[&str]) {
    let out = c.tb.run_in(netns, argv).unwrap();
    assert!(
        out.status.success(),
        "{argv:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// TCP segments `netns` dropped for a bad checksum (`InCsumErrors` of /proc/net/snmp, which
/// shows the reading process's namespace).
fn tcp_in_csum_errors(c: &Cluster, netns: &str) -> u64 {
    let out = c.tb.run_in(netns, &["cat", "/proc/net/snmp"]).unwrap();
    let snmp = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let column = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .unwrap_or_else(|| panic!("no InCsumErrors in {names}"));
    values
        .split_whitespace()
        .nth(column)
        .unwrap()
        .parse()
        .unwrap()
}

/// A network namespace a test made beside its testbed (named with the testbed's prefix, so
/// a dead run's is cleaned up with its testbed); deleted on drop, also on panic.
struct ExtraNetns(String);

impl Drop for ExtraNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// `python3 -c` server for pod-c: every GET on 8080 answers 20 000 bytes, so that the
/// backend's replies are full-size segments. (`server_bind` skips `getfqdn()`, as the
/// testbed's server does.)
const LARGE_REPLY_SERVER: &str = r#"
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"y" * 20000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class S(http.server.HTTPServer):
    allow_reuse_address = True
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "pod", 8080
S(("0.0.0.0", 8080), H).serve_forever()
"#;

/// Issue 5, the other direction: the backend's large replies. A client ("far",
/// 192.168.77.2) sits behind a router (the external host) whose link to it has MTU 1200.
/// Its request to the ClusterIP is masqueraded by node1 to pod-c on node2; pod-c's
/// full-size reply segments, reverse-translated by node1 (from VIP:80), are too large for
/// the router's link, so the router answers fragmentation needed *to the ClusterIP*,
/// quoting VIP:80 -> far. node1 translates the error to pod-c, quoting pod-c's own reply
/// (pod-c:8080 -> node1:masquerade port): pod-c learns the path MTU and the transfer
/// completes.
#[test]
fn issue5_path_mtu_discovery_for_large_replies_through_a_cluster_ip() {
    let Some(mut c) =
        Cluster::start("issue5_path_mtu_discovery_for_large_replies_through_a_cluster_ip")
    else {
        return;
    };
    const MTU: &str = "1200";
    c.set_endpoints(&["pod-c"]);
    let node1_pin = c.tb.node("node1").pin_path.clone();
    c.eventually("node1 serves the ClusterIP from pod-c only", || {
        xlb_json(&["services"], &node1_pin)
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["frontend"] == "10.96.0.10:80/TCP")
            .is_some_and(|r| r["backends"].as_array().unwrap().len() == 1)
    });
    // pod-c: the large-reply server instead of the testbed's.
    let pod_c = c.netns("pod-c");
    c.tb.stop_servers("pod-c").expect("stop pod-c's servers");
    c.tb.spawn_in(&pod_c, &["python3", "-c", LARGE_REPLY_SERVER])
        .expect("start the large-reply server");
    c.eventually("the large-reply server listens", || {
        c.curl(&pod_c, "http://127.0.0.1:8080/", &["-o", "/dev/null"])
            .is_ok()
    });

    // far -- (MTU 1200) -- router (the external host) -- node network.
    let far = ExtraNetns(format!("{}-far", c.tb.netns_prefix()));
    let router = c.tb.external().netns.clone();
    let node1 = c.tb.node("node1").netns.clone();
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &far.0])
        .status()
        .unwrap();
    assert!(status.success(), "ip netns add {}", far.0);
    for argv in [
        &[
            "ip", "link", "add", "xfar", "mtu", MTU, "type", "veth", "peer", "name", "eth0",
            "netns", &far.0,
        ][..],
        &["ip", "addr", "add", "192.168.77.1/24", "dev", "xfar"],
        &["ip", "link", "set", "xfar", "up"],
        &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
    ] {
        run_ok(&c, &router, argv);
    }
    for argv in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "addr", "add", "192.168.77.2/24", "dev", "eth0"],
        &["ip", "link", "set", "eth0", "up"],
        &["ip", "route", "add", "default", "via", "192.168.77.1"],
    ] {
        run_ok(&c, &far.0, argv);
    }
    run_ok(
        &c,
        &node1,
        &[
            "ip",
            "route",
            "add",
            "192.168.77.0/24",
            "via",
            "172.18.0.100",
        ],
    );

    let size = c
        .curl(
            &far.0,
            "http://10.96.0.10/",
            &["-o", "/dev/null", "-w", "%{size_download}"],
        )
        .unwrap_or_else(|e| {
            panic!(
                "large reply through the ClusterIP: {e:#}\n\
                 far's TCP checksum errors: {}\n{}",
                tcp_in_csum_errors(&c, &far.0),
                c.logs()
            )
        });
    assert_eq!(size, "20000", "whole reply received");
    // Every segment arrived intact: one that does not (a checksum rewritten wrongly on the
    // way) is only repaired by a retransmission timeout, and the transfer may still finish.
    assert_eq!(
        tcp_in_csum_errors(&c, &far.0),
        0,
        "segments with a bad TCP checksum reached far"
    );

    // pod-c learned the path MTU towards the masquerade address, which it can only have
    // from an error quoting its own reply.
    assert_path_mtu_learned(
        &c,
        &pod_c,
        "172.18.0.11",
        MTU,
        &node1_pin,
        "icmp_error_to_backend",
    );
}

impl Cluster {
    /// A bare TCP connect from `netns` (2 s limit): how exactly it failed, if it did.
    fn tcp_connect(&self, netns: &str, ip: Ipv4Addr, port: u16) -> Result<(), std::io::ErrorKind> {
        self.tb
            .in_netns(netns, || {
                let addr = SocketAddr::from((ip, port));
                Ok(
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                        .map(|_| ())
                        .map_err(|e| e.kind()),
                )
            })
            .unwrap()
    }

    /// Writes another manifest file next to the example, atomically.
    fn write_file(&self, name: &str, text: &str) {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests.join(name)).unwrap();
    }

    /// Polls until `request` settles on exactly `expected`: every expected answer seen (at
    /// most 60 requests), then 10 more requests, all without an error and nothing else
    /// answering. Until then (the agents apply changes within a poll interval) failed
    /// requests and other answers only restart the round; after 15 s the test fails.
    fn settles_on(
        &self,
        what: &str,
        expected: &[&str],
        mut request: impl FnMut() -> anyhow::Result<String>,
    ) {
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let round = (|| -> Result<(), String> {
                let mut seen = BTreeSet::new();
                let mut extra = 0;
                for _ in 0..70 {
                    let answer = request().map_err(|e| format!("{e:#}"))?;
                    let answer = answer.trim().to_string();
                    if !expected.contains(&answer) {
                        return Err(format!("unexpected answer {answer:?}"));
                    }
                    seen.insert(answer);
                    if seen == expected {
                        extra += 1;
                        if extra > 10 {
                            return Ok(());
                        }
                    }
                }
                Err(format!("only {seen:?} answered"))
            })();
            let Err(last) = round else { return };
            assert!(
                Instant::now() < deadline,
                "{what}: not exactly {expected:?} within 15 s (last: {last})\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sets the conditions of the example's endpoints, by pod name (others unchanged), on
    /// top of `edit`.
    fn set_conditions(
        &self,
        conditions: &[(&str, &str)],
        edit: impl FnOnce(&mut Vec<serde_yaml::Value>),
    ) {
        self.edit_manifest(|docs| {
            edit(docs);
            for e in docs[1]["endpoints"].as_sequence_mut().unwrap() {
                let name = e["targetRef"]["name"].as_str().unwrap().to_string();
                if let Some((_, c)) = conditions.iter().find(|(pod, _)| *pod == name) {
                    e["conditions"] = yaml(c);
                }
            }
        });
    }

    /// The frontends `xlb services -o json` shows for `node`, with their backends (service
    /// ports only: not the ClusterIPs' refused other ports, S04).
    fn frontends(&self, node: &str) -> Vec<(String, Vec<String>)> {
        let rows = xlb_json(&["services"], &self.tb.node(node).pin_path);
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["port"] != 0)
            .map(|r| {
                let backends = r["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_str().unwrap().to_string())
                    .collect();
                (r["frontend"].as_str().unwrap().to_string(), backends)
            })
            .collect()
    }

    /// Polls `xlb services -o json` on both nodes until `check` holds for each.
    fn eventually_frontends(
        &self,
        what: &str,
        mut check: impl FnMut(&str, &[(String, Vec<String>)]) -> bool,
    ) {
        for node in ["node1", "node2"] {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let rows = self.frontends(node);
                if check(node, &rows) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what} on {node}: not within 15 s; `xlb services`: {rows:?}\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Answers of pod servers started with `start_servers_as(.., "{pod}/{suffix}", ..)`.
fn suffixed(suffix: &str) -> Vec<String> {
    ALL_PODS.iter().map(|p| format!("{p}/{suffix}")).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn s03_each_port_of_a_multi_port_service_reaches_its_own_target_port() {
    let Some(mut c) =
        Cluster::start("s03_each_port_of_a_multi_port_service_reaches_its_own_target_port")
    else {
        return;
    };
    // A second HTTP server in every pod, on 8081, that says which port it is.
    for pod in ALL_PODS {
        let ns = c.netns(pod);
        c.tb.start_servers_as(&ns, &format!("{pod}/8081"), 8081, 5354)
            .expect("servers on 8081");
    }
    let with_second_port = |docs: &mut Vec<serde_yaml::Value>| {
        docs[0]["spec"]["ports"]
            .as_sequence_mut()
            .unwrap()
            .push(yaml(
                "{name: alt, port: 81, targetPort: 8081, protocol: TCP, nodePort: 30081}",
            ));
        docs[1]["ports"]
            .as_sequence_mut()
            .unwrap()
            .push(yaml("{name: alt, port: 8081, protocol: TCP}"));
    };
    c.edit_manifest(with_second_port);
    let alt = suffixed("8081");
    let pod = c.netns("pod-c");
    let ext = c.tb.external().netns.clone();
    // Port 81 reaches only the 8081 servers, port 80 only the 8080 ones: from a pod through
    // the ClusterIP and from outside through the NodePorts of both nodes.
    c.settles_on("ClusterIP port 81", &strs(&alt), || {
        c.tb.http_get(&pod, VIP, 81)
    });
    c.settles_on("ClusterIP port 80", &ALL_PODS, || {
        c.tb.http_get(&pod, VIP, 80)
    });
    for node in ["node1", "node2"] {
        let ip = c.tb.node(node).ip;
        c.settles_on(&format!("NodePort 30081 via {node}"), &strs(&alt), || {
            c.tb.http_get(&ext, ip, 30081)
        });
        c.settles_on(&format!("NodePort 30080 via {node}"), &ALL_PODS, || {
            c.tb.http_get(&ext, ip, 30080)
        });
    }
    // Removing the port stops it and only it.
    c.edit_manifest(|_| {});
    c.eventually("port 81 removed", || c.tb.http_get(&pod, VIP, 81).is_err());
    let ip = c.tb.node("node2").ip;
    assert!(
        c.tb.http_get(&ext, ip, 30081).is_err(),
        "NodePort 30081 gone"
    );
    c.settles_on("ClusterIP port 80 unaffected", &ALL_PODS, || {
        c.tb.http_get(&pod, VIP, 80)
    });
}

#[test]
fn s04_tcp_and_udp_on_the_same_port_of_one_cluster_ip_reach_their_own_servers() {
    let Some(mut c) = Cluster::start(
        "s04_tcp_and_udp_on_the_same_port_of_one_cluster_ip_reach_their_own_servers",
    ) else {
        return;
    };
    // UDP servers that say so, on 5354 (their HTTP side, 8082, is not used).
    for pod in ALL_PODS {
        let ns = c.netns(pod);
        c.tb.start_servers_as(&ns, &format!("{pod}/udp"), 8082, 5354)
            .expect("UDP servers");
    }
    let both_on_80 = |docs: &mut Vec<serde_yaml::Value>| {
        docs[0]["spec"]["ports"][1]["port"] = 80.into();
        docs[1]["ports"][1]["port"] = 5354.into();
    };
    c.edit_manifest(both_on_80);
    c.eventually_frontends("80/TCP and 80/UDP on the ClusterIP", |_, rows| {
        ["10.96.0.10:80/TCP", "10.96.0.10:80/UDP"].iter().all(|f| {
            rows.iter()
                .any(|(frontend, b)| frontend == f && b.len() == 3)
        }) && !rows.iter().any(|(f, _)| f == "10.96.0.10:53/UDP")
    });
    let pod = c.netns("pod-c");
    let udp = suffixed("udp");
    c.settles_on("TCP 80", &ALL_PODS, || c.tb.http_get(&pod, VIP, 80));
    c.settles_on("UDP 80", &strs(&udp), || c.tb.udp_request(&pod, VIP, 80));
    // The port the service no longer has is not translated any more.
    assert!(c.tb.udp_request(&pod, VIP, 53).is_err(), "UDP 53 is gone");
    // Removing the TCP port stops TCP only.
    c.edit_manifest(|docs| {
        both_on_80(docs);
        docs[0]["spec"]["ports"]
            .as_sequence_mut()
            .unwrap()
            .remove(0);
    });
    c.eventually("TCP 80 removed", || c.tb.http_get(&pod, VIP, 80).is_err());
    c.settles_on("UDP 80 unaffected", &strs(&udp), || {
        c.tb.udp_request(&pod, VIP, 80)
    });
}

#[test]
fn s05_endpoints_of_several_slices_are_all_used_and_change_independently() {
    let Some(c) =
        Cluster::start("s05_endpoints_of_several_slices_are_all_used_and_change_independently")
    else {
        return;
    };
    // web-1 holds pod-a, web-2 pod-c (pod-b in neither): a state the first slice alone
    // cannot give, so seeing exactly {pod-a, pod-c} shows the merge was applied.
    let two_slices = |first: &'static [&'static str], second: &'static [&'static str]| {
        move |docs: &mut Vec<serde_yaml::Value>| {
            let mut other = docs[1].clone();
            other["metadata"]["name"] = "web-2".into();
            let keep = |slice: &mut serde_yaml::Value, pods: &[&str]| {
                slice["endpoints"]
                    .as_sequence_mut()
                    .unwrap()
                    .retain(|e| pods.contains(&e["targetRef"]["name"].as_str().unwrap()));
            };
            keep(&mut docs[1], first);
            keep(&mut other, second);
            docs.push(other);
        }
    };
    c.edit_manifest(two_slices(&["pod-a"], &["pod-c"]));
    let pod = c.netns("pod-b");
    let ext = c.tb.external().netns.clone();
    let node1 = c.tb.node("node1").ip;
    c.settles_on("both slices", &["pod-a", "pod-c"], || {
        c.tb.http_get(&pod, VIP, 80)
    });
    c.settles_on("both slices, NodePort", &["pod-a", "pod-c"], || {
        c.tb.http_get(&ext, node1, 30080)
    });
    // A change to web-2 alone: web-1's pod-a stays in service.
    c.edit_manifest(two_slices(&["pod-a"], &["pod-b"]));
    c.settles_on("web-2 changed", &["pod-a", "pod-b"], || {
        c.tb.http_get(&pod, VIP, 80)
    });
    c.eventually_frontends("two backends per frontend", |_, rows| {
        rows.len() == 4 && rows.iter().all(|(_, b)| b.len() == 2)
    });
    // Deleting web-2 leaves web-1.
    c.edit_manifest(|docs| {
        docs[1]["endpoints"]
            .as_sequence_mut()
            .unwrap()
            .retain(|e| e["targetRef"]["name"] == "pod-a");
    });
    c.settles_on("web-2 deleted", &["pod-a"], || c.tb.http_get(&pod, VIP, 80));
}

/// The Service turned headless (`clusterIP: None`, no node ports).
fn headless(docs: &mut [serde_yaml::Value]) {
    let spec = &mut docs[0]["spec"];
    spec["type"] = "ClusterIP".into();
    spec["clusterIP"] = "None".into();
    spec["clusterIPs"] = yaml("[None]");
    for port in spec["ports"].as_sequence_mut().unwrap() {
        port.as_mapping_mut().unwrap().remove("nodePort");
    }
}

/// The Service turned into an ExternalName (no cluster IP, no node ports).
fn external_name(docs: &mut [serde_yaml::Value]) {
    headless(docs);
    let spec = docs[0]["spec"].as_mapping_mut().unwrap();
    spec.remove("clusterIP");
    spec.remove("clusterIPs");
    spec.insert("type".into(), "ExternalName".into());
    spec.insert("externalName".into(), "web.example.com".into());
}

#[test]
fn s08_headless_and_external_name_services_get_no_state_and_switching_back_restores_it() {
    let Some(c) = Cluster::start(
        "s08_headless_and_external_name_services_get_no_state_and_switching_back_restores_it",
    ) else {
        return;
    };
    let pod = c.netns("pod-c");
    let ext = c.tb.external().netns.clone();
    let node2 = c.tb.node("node2").ip;
    type Edit = fn(&mut [serde_yaml::Value]);
    for (kind, edit) in [
        ("headless", headless as Edit),
        ("ExternalName", external_name),
    ] {
        c.edit_manifest(|docs| edit(docs));
        c.eventually_frontends(&format!("{kind}: no state"), |_, rows| rows.is_empty());
        // Nothing answers for the old addresses any more.
        assert!(c.tb.http_get(&pod, VIP, 80).is_err(), "{kind}: ClusterIP");
        assert!(c.tb.udp_request(&pod, VIP, 53).is_err(), "{kind}: UDP");
        assert!(
            c.tb.http_get(&ext, node2, 30080).is_err(),
            "{kind}: NodePort"
        );
        // Back to a NodePort service: state and traffic return.
        c.edit_manifest(|_| {});
        c.eventually_frontends(&format!("after {kind}: state back"), |_, rows| {
            rows.len() == 4 && rows.iter().all(|(_, b)| b.len() == 3)
        });
        c.settles_on(&format!("after {kind}: ClusterIP"), &ALL_PODS, || {
            c.tb.http_get(&pod, VIP, 80)
        });
        c.settles_on(&format!("after {kind}: NodePort"), &ALL_PODS, || {
            c.tb.http_get(&ext, node2, 30080)
        });
    }
}

#[test]
fn s09_service_proxy_name_and_headless_labels_make_a_service_or_slice_ignored() {
    let Some(c) = Cluster::start(
        "s09_service_proxy_name_and_headless_labels_make_a_service_or_slice_ignored",
    ) else {
        return;
    };
    let pod = c.netns("pod-c");
    let ext = c.tb.external().netns.clone();
    let node1 = c.tb.node("node1").ip;
    // On the Service: another proxy's service, no state at all.
    c.edit_manifest(|docs| {
        docs[0]["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] =
            "other-proxy".into();
    });
    c.eventually_frontends("proxy-name label: no state", |_, rows| rows.is_empty());
    assert!(c.tb.http_get(&pod, VIP, 80).is_err(), "ClusterIP ignored");
    assert!(
        c.tb.http_get(&ext, node1, 30080).is_err(),
        "NodePort ignored"
    );
    c.edit_manifest(|_| {});
    c.settles_on("label removed: ClusterIP", &ALL_PODS, || {
        c.tb.http_get(&pod, VIP, 80)
    });
    c.settles_on("label removed: NodePort", &ALL_PODS, || {
        c.tb.http_get(&ext, node1, 30080)
    });
    // On the slice: its endpoints are ignored; the service has none and refuses (S10).
    for label in [
        "service.kubernetes.io/headless",
        "service.kubernetes.io/service-proxy-name",
    ] {
        c.edit_manifest(|docs| docs[1]["metadata"]["labels"][label] = "".into());
        c.eventually_frontends(&format!("{label} on the slice"), |_, rows| {
            rows.len() == 4 && rows.iter().all(|(_, b)| b.is_empty())
        });
        assert_eq!(
            c.tcp_connect(&pod, VIP, 80),
            Err(std::io::ErrorKind::ConnectionRefused),
            "{label}: a service without endpoints"
        );
        c.edit_manifest(|_| {});
        c.settles_on(&format!("{label} removed"), &ALL_PODS, || {
            c.tb.http_get(&pod, VIP, 80)
        });
    }
}

#[test]
fn s14_load_balancer_source_ranges_admit_listed_sources_only() {
    let Some(c) = Cluster::start("s14_load_balancer_source_ranges_admit_listed_sources_only")
    else {
        return;
    };
    let ext = c.tb.external().netns.clone();
    let allowed = c.tb.external().ip.to_string();
    // A second address of the external client, outside the range.
    let denied = "172.18.0.101";
    let lb_ip = Ipv4Addr::new(203, 0, 113, 20);
    let node2 = c.tb.node("node2").ip.to_string();
    for cmd in [
        vec!["ip", "addr", "add", "172.18.0.101/24", "dev", "eth0"],
        vec!["ip", "route", "add", "203.0.113.20/32", "via", &node2],
    ] {
        let out = c.tb.run_in(&ext, &cmd).unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ranges = |docs: &mut Vec<serde_yaml::Value>, ranges: &str| {
        docs[0]["spec"]["type"] = "LoadBalancer".into();
        docs[0]["spec"]["loadBalancerSourceRanges"] = yaml(ranges);
        docs[0]["status"] = yaml(&format!("{{loadBalancer: {{ingress: [{{ip: {lb_ip}}}]}}}}"));
    };
    // Surrounding whitespace is tolerated, as Kubernetes does.
    c.edit_manifest(|docs| ranges(docs, "[' 172.18.0.100/32 ']"));
    let from = |source: &str, url: &str| c.curl(&ext, url, &["--interface", source]);
    let lb_url = format!("http://{lb_ip}/");
    c.settles_on("listed source", &ALL_PODS, || from(&allowed, &lb_url));
    let dropped = || {
        xlb_json(&["stats"], &c.tb.node("node2").pin_path)["drop_source_range"]
            .as_u64()
            .unwrap()
    };
    let before = dropped();
    for _ in 0..3 {
        let err = c
            .curl(&ext, &lb_url, &["--interface", denied, "--max-time", "1"])
            .expect_err("a source outside the range must not connect");
        // Dropped, not refused: the client learns nothing.
        assert!(
            err.to_string().contains("timed out") || err.to_string().contains("Timeout"),
            "{err}"
        );
    }
    assert!(dropped() > before, "drops counted as drop_source_range");
    // The NodePort of the same service is not filtered.
    c.settles_on("NodePort from outside the range", &ALL_PODS, || {
        from(denied, &format!("http://{node2}:30080/"))
    });
    // Widening the range lets the other source in.
    c.edit_manifest(|docs| ranges(docs, "[172.18.0.100/32, 172.18.0.101/32]"));
    c.settles_on("range widened", &ALL_PODS, || from(denied, &lb_url));
}

#[test]
fn s21_client_ip_affinity_ends_after_its_timeout() {
    let Some(c) = Cluster::start("s21_client_ip_affinity_ends_after_its_timeout") else {
        return;
    };
    const TIMEOUT: Duration = Duration::from_secs(2);
    c.edit_manifest(|docs| {
        docs[0]["spec"]["sessionAffinity"] = "ClientIP".into();
        docs[0]["spec"]["sessionAffinityConfig"] = yaml("{clientIP: {timeoutSeconds: 2}}");
    });
    let pod = c.netns("pod-c");
    let request = || -> String { c.curl(&pod, "http://10.96.0.10/", &[]).unwrap() };
    // Within the timeout: back-to-back new connections stay on one backend. A request that
    // starts more than half the timeout after the previous one restarts the count, so a
    // stalled machine cannot make the client legitimately move.
    let mut pinned = String::new();
    c.eventually("10 quick connections on one backend", || {
        let mut answers = BTreeSet::new();
        let mut previous = Instant::now();
        for _ in 0..10 {
            answers.insert(request());
            if previous.elapsed() > TIMEOUT / 2 {
                return false;
            }
            previous = Instant::now();
        }
        pinned = answers.first().unwrap().clone();
        answers.len() == 1
    });
    // After the timeout without new connections, the next one may go elsewhere: wait out
    // the timeout before each attempt until another backend answers (with three backends
    // chosen by flow hash, 12 attempts all landing on the same one is a 1 in 500 000 event).
    let mut moved = None;
    for _ in 0..12 {
        std::thread::sleep(TIMEOUT + Duration::from_millis(500));
        let answer = request();
        if answer != pinned {
            moved = Some(answer);
            break;
        }
    }
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "still on {pinned} after 12 idle periods longer than the timeout\n{}",
            c.logs()
        )
    });
    // And the new backend is remembered in turn.
    for _ in 0..5 {
        assert_eq!(request(), moved, "affinity to the new backend");
    }
}

const READY: &str = "{ready: true, serving: true, terminating: false}";
const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";
const NOT_READY: &str = "{ready: false, serving: false, terminating: false}";

#[test]
fn s25_terminating_endpoints_serve_only_when_none_is_ready_and_never_unserving_ones() {
    let Some(c) = Cluster::start(
        "s25_terminating_endpoints_serve_only_when_none_is_ready_and_never_unserving_ones",
    ) else {
        return;
    };
    let pod = c.netns("pod-c");
    let ext = c.tb.external().netns.clone();
    let node1 = c.tb.node("node1").ip;
    let request = || c.tb.http_get(&pod, VIP, 80);
    // One ready endpoint: only it gets new connections.
    c.set_conditions(
        &[
            ("pod-a", READY),
            ("pod-b", TERMINATING),
            ("pod-c", TERMINATING),
        ],
        |_| {},
    );
    c.settles_on("ready first", &["pod-a"], request);
    // None ready: the serving and terminating ones.
    c.set_conditions(
        &[
            ("pod-a", NOT_READY),
            ("pod-b", TERMINATING),
            ("pod-c", TERMINATING),
        ],
        |_| {},
    );
    c.settles_on(
        "fallback to serving+terminating",
        &["pod-b", "pod-c"],
        request,
    );
    c.settles_on("fallback via NodePort", &["pod-b", "pod-c"], || {
        c.tb.http_get(&ext, node1, 30080)
    });
    // Never a terminating endpoint that is not serving.
    c.set_conditions(
        &[
            ("pod-a", NOT_READY),
            ("pod-b", TERMINATING),
            ("pod-c", "{ready: false, serving: false, terminating: true}"),
        ],
        |_| {},
    );
    c.settles_on("never serving=false", &["pod-b"], request);
}

#[test]
fn s26_terminating_fallback_applies_per_policy_scope() {
    let Some(c) = Cluster::start("s26_terminating_fallback_applies_per_policy_scope") else {
        return;
    };
    // internalTrafficPolicy Local: pods use their node's endpoints; node2's only one,
    // pod-c, is terminating. External NodePort traffic keeps the cluster-wide scope.
    c.set_conditions(&[("pod-c", TERMINATING)], |docs| {
        docs[0]["spec"]["internalTrafficPolicy"] = "Local".into();
    });
    let pod_c = c.netns("pod-c");
    let pod_a = c.netns("pod-a");
    let ext = c.tb.external().netns.clone();
    let node2 = c.tb.node("node2").ip;
    // node2's local scope has no ready endpoint: it falls back to its terminating one...
    c.settles_on("node2 local scope", &["pod-c"], || {
        c.tb.http_get(&pod_c, VIP, 80)
    });
    // ...while node1's local scope has ready ones...
    c.settles_on("node1 local scope", &["pod-a", "pod-b"], || {
        c.tb.http_get(&pod_a, VIP, 80)
    });
    // ...and the cluster-wide scope on the very same node2 has ready ones too: no fallback.
    c.settles_on("node2 cluster scope", &["pod-a", "pod-b"], || {
        c.tb.http_get(&ext, node2, 30080)
    });
}

#[test]
fn s28_published_not_ready_endpoints_marked_ready_get_traffic() {
    let Some(c) = Cluster::start("s28_published_not_ready_endpoints_marked_ready_get_traffic")
    else {
        return;
    };
    // With publishNotReadyAddresses the EndpointSlice controller marks every endpoint
    // ready, whatever the pod's readiness (serving keeps the pod's own): they are used. An
    // endpoint the slice marks not ready is not.
    let published = "{ready: true, serving: false, terminating: false}";
    c.set_conditions(
        &[
            ("pod-a", published),
            ("pod-b", published),
            ("pod-c", NOT_READY),
        ],
        |docs| docs[0]["spec"]["publishNotReadyAddresses"] = true.into(),
    );
    let pod = c.netns("pod-c");
    c.settles_on("published endpoints", &["pod-a", "pod-b"], || {
        c.tb.http_get(&pod, VIP, 80)
    });
    let ext = c.tb.external().netns.clone();
    let node2 = c.tb.node("node2").ip;
    c.settles_on(
        "published endpoints via NodePort",
        &["pod-a", "pod-b"],
        || c.tb.http_get(&ext, node2, 30080),
    );
}

#[test]
fn s30_udp_flow_to_a_removed_backend_moves_on_its_next_datagrams() {
    let Some(c) = Cluster::start("s30_udp_flow_to_a_removed_backend_moves_on_its_next_datagrams")
    else {
        return;
    };
    // One socket, so one flow (same source port) for the whole test.
    let socket =
        c.tb.in_netns(&c.netns("pod-c"), || {
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.connect((VIP, 53))?;
            Ok(s)
        })
        .unwrap();
    let exchange = || -> std::io::Result<String> {
        socket.send(b"ping")?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let first = exchange().expect("first datagram answered");
    for _ in 0..5 {
        assert_eq!(
            exchange().unwrap(),
            first,
            "a UDP flow stays on its backend"
        );
    }
    let remaining: Vec<&str> = ALL_PODS.iter().copied().filter(|p| *p != first).collect();
    // The removed pod's server keeps running: a stale flow would keep reaching it.
    c.set_endpoints(&remaining);
    let deadline = Instant::now() + Duration::from_secs(15);
    let moved = loop {
        // A datagram lost while the flow moves is a timeout here, not a failure.
        match exchange() {
            Ok(answer) if answer != first => break answer,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the flow still goes to {first} 15 s after its removal\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(remaining.contains(&moved.as_str()), "{moved}");
    for _ in 0..10 {
        assert_eq!(exchange().unwrap(), moved, "the moved flow stays");
    }
}

#[test]
fn s33_zone_hints_keep_traffic_in_the_nodes_zone() {
    let Some(c) = Cluster::start("s33_zone_hints_keep_traffic_in_the_nodes_zone") else {
        return;
    };
    c.write_file(
        "nodes.yaml",
        r#"apiVersion: v1
kind: Node
metadata:
  name: node1
  labels: {topology.kubernetes.io/zone: zone-a}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  labels: {topology.kubernetes.io/zone: zone-b}
"#,
    );
    let hints = |hinted: &'static [&'static str]| {
        move |docs: &mut Vec<serde_yaml::Value>| {
            docs[0]["spec"]["trafficDistribution"] = "PreferClose".into();
            for e in docs[1]["endpoints"].as_sequence_mut().unwrap() {
                let name = e["targetRef"]["name"].as_str().unwrap().to_string();
                let zone = if e["nodeName"] == "node1" {
                    "zone-a"
                } else {
                    "zone-b"
                };
                if hinted.contains(&name.as_str()) {
                    e["hints"] = yaml(&format!("{{forZones: [{{name: {zone}}}]}}"));
                }
            }
        }
    };
    c.edit_manifest(hints(&ALL_PODS));
    let pod_a = c.netns("pod-a");
    let pod_c = c.netns("pod-c");
    let ext = c.tb.external().netns.clone();
    let node1 = c.tb.node("node1").ip;
    c.settles_on("zone-b from node2", &["pod-c"], || {
        c.tb.http_get(&pod_c, VIP, 80)
    });
    c.settles_on("zone-a from node1", &["pod-a", "pod-b"], || {
        c.tb.http_get(&pod_a, VIP, 80)
    });
    c.settles_on("zone-a via node1's NodePort", &["pod-a", "pod-b"], || {
        c.tb.http_get(&ext, node1, 30080)
    });
    // An endpoint without hints: hints are ignored, every endpoint is used again.
    c.edit_manifest(hints(&["pod-a", "pod-b"]));
    c.settles_on("hints incomplete", &ALL_PODS, || {
        c.tb.http_get(&pod_c, VIP, 80)
    });
}

#[test]
fn s07_host_network_endpoint_is_reached_from_pods_and_node_ports_of_both_nodes() {
    let Some(mut c) = Cluster::start(
        "s07_host_network_endpoint_is_reached_from_pods_and_node_ports_of_both_nodes",
    ) else {
        return;
    };
    // A hostNetwork pod on node2: its servers listen in node2's namespace on the node's
    // address, and its endpoint IP is the node IP.
    let node2_ns = c.tb.node("node2").netns.clone();
    c.tb.start_servers_as(&node2_ns, "node2-host", 8080, 5353)
        .expect("host-network servers");
    c.edit_manifest(|docs| {
        let endpoints = docs[1]["endpoints"].as_sequence_mut().unwrap();
        endpoints.retain(|e| e["targetRef"]["name"] == "pod-a");
        endpoints.push(yaml(
            "{addresses: [172.18.0.12], conditions: {ready: true, serving: true, \
             terminating: false}, nodeName: node2, \
             targetRef: {kind: Pod, name: host-pod, namespace: default}}",
        ));
    });
    let expected = ["pod-a", "node2-host"];
    // From the pods and through the NodePorts of both nodes, TCP and UDP. On node2 the
    // endpoint is local: the translated packet reaches a socket of the node itself, and its
    // replies are reverse-translated by the egress program as they leave (to pod-c's veth,
    // or out of the uplink). The clients' sockets are connected, so an untranslated reply
    // (from 172.18.0.12:8080 instead of the service) would not count.
    let ext = c.tb.external().netns.clone();
    for (pod, node) in [("pod-a", "node1"), ("pod-c", "node2")] {
        let pod_ns = c.netns(pod);
        c.settles_on(&format!("ClusterIP from {pod}"), &expected, || {
            c.tb.http_get(&pod_ns, VIP, 80)
        });
        c.settles_on(&format!("UDP ClusterIP from {pod}"), &expected, || {
            c.tb.udp_request(&pod_ns, VIP, 53)
        });
        let ip = c.tb.node(node).ip;
        c.settles_on(&format!("NodePort via {node}"), &expected, || {
            c.tb.http_get(&ext, ip, 30080)
        });
        c.settles_on(&format!("UDP NodePort via {node}"), &expected, || {
            c.tb.udp_request(&ext, ip, 30053)
        });
    }
}

#[test]
fn s04_a_port_or_protocol_the_service_does_not_have_is_refused() {
    let Some(c) = Cluster::start("s04_a_port_or_protocol_the_service_does_not_have_is_refused")
    else {
        return;
    };
    let pod = c.netns("pod-a");
    // The service has 80/TCP and 53/UDP: 81/TCP and 80/UDP are refused at once, by the
    // node's datapath (RST, ICMP port unreachable), not left to time out or leave the node.
    c.eventually("the service works", || c.tb.http_get(&pod, VIP, 80).is_ok());
    assert_eq!(
        c.tcp_connect(&pod, VIP, 81),
        Err(std::io::ErrorKind::ConnectionRefused),
        "TCP to a port the service does not have\n{}",
        c.logs()
    );
    let udp =
        c.tb.in_netns(&pod, || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            sock.connect((VIP, 80))?;
            sock.send(b"ping")?;
            let mut buf = [0u8; 64];
            Ok(sock.recv(&mut buf).map(|_| ()).map_err(|e| e.kind()))
        })
        .unwrap();
    assert_eq!(
        udp,
        Err(std::io::ErrorKind::ConnectionRefused),
        "UDP to a protocol the service does not have on that port\n{}",
        c.logs()
    );
    // The service's own ports are untouched.
    assert!(c.tb.http_get(&pod, VIP, 80).is_ok());
    assert!(c.tb.udp_request(&pod, VIP, 53).is_ok());
}

/// S06, UDP half: a 2000-byte datagram crosses the 1500-byte MTU of the pod and node links
/// as two IP fragments. The datapath translates the first fragment and gives the second the
/// same rewrite (docs/datapath.md, "IP fragments"), so every backend, local or on the other
/// node, receives the whole datagram and answers. From a pod to the ClusterIP (TC on the pod
/// veth) and from outside to a NodePort (XDP on the uplink, masqueraded).
#[test]
fn s06_a_2000_byte_udp_datagram_passes_the_service() {
    let Some(c) = Cluster::start("s06_a_2000_byte_udp_datagram_passes_the_service") else {
        return;
    };
    // One datagram from a new socket (a new flow, balanced afresh); the answer must come
    // from exactly ip:port (connected socket), else the reverse NAT failed.
    let request = |netns: &str, ip: Ipv4Addr, port: u16| -> anyhow::Result<String> {
        c.tb.in_netns(netns, || {
            let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.set_read_timeout(Some(Duration::from_secs(3)))?;
            sock.connect((ip, port))?;
            let datagram = vec![b'x'; 2000];
            assert_eq!(sock.send(&datagram)?, 2000);
            let mut buf = [0u8; 2048];
            let n = sock.recv(&mut buf).map_err(|e| {
                anyhow::anyhow!("2000-byte datagram to {ip}:{port} from {netns}: {e}")
            })?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
    };
    let pod = c.netns("pod-c");
    let seen = answers(120, &ALL_PODS, || request(&pod, VIP, 53));
    assert_eq!(seen, all(), "pod -> ClusterIP\n{}", c.logs());
    let ext = c.tb.external().netns.clone();
    let node1 = c.tb.node("node1").ip;
    let seen = answers(120, &ALL_PODS, || request(&ext, node1, 30053));
    assert_eq!(seen, all(), "external -> NodePort\n{}", c.logs());
    // Every second fragment was translated by the datapath of the node it entered (not
    // passed untouched): at least 3 + 3 datagrams, the NodePort ones on node1.
    let translated = |node: &str| {
        xlb_json(&["stats"], &c.tb.node(node).pin_path)["forward_fragment"]
            .as_u64()
            .unwrap()
    };
    let (on_node1, on_node2) = (translated("node1"), translated("node2"));
    assert!(on_node1 >= 3, "node1 forward_fragment {on_node1}");
    assert!(
        on_node1 + on_node2 >= 6,
        "forward_fragment {on_node1} + {on_node2}"
    );
}

/// The agents' conntrack collector (docs/datapath.md, "Conntrack lifecycle") with tiny
/// closing/closed timeouts: connections that ended (curl closes with FIN) disappear from both
/// nodes' tables, while an open, idle keep-alive connection stays established and keeps
/// working on its backend. Without the collector the ended flows would stay in the LRU maps.
#[test]
fn conntrack_collector_forgets_ended_connections_and_keeps_open_ones() {
    let Some(c) = Cluster::start_with(
        "conntrack_collector_forgets_ended_connections_and_keeps_open_ones",
        &[
            "--ct-tcp-closing-timeout",
            "1",
            "--ct-tcp-closed-timeout",
            "1",
            "--ct-gc-interval",
            "1",
        ],
    ) else {
        return;
    };
    let pod = c.netns("pod-b");
    let (mut open, first) = c.established(&pod);
    let open_client = open.local_addr().unwrap().to_string();
    for _ in 0..5 {
        c.curl(&pod, "http://10.96.0.10/", &[]).expect("request");
    }
    // Original-direction flows to the ClusterIP on both nodes: client -> state.
    let flows = || -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        for node in ["node1", "node2"] {
            let rows = xlb_json(&["conntrack"], &c.tb.node(node).pin_path);
            for f in rows.as_array().unwrap() {
                if f["direction"] == "original" && f["to"] == "10.96.0.10:80" {
                    out.insert(
                        f["from"].as_str().unwrap().to_string(),
                        f["state"].as_str().unwrap().to_string(),
                    );
                }
            }
        }
        out
    };
    assert!(flows().len() >= 6, "{:?}", flows());
    c.eventually("ended connections forgotten", || {
        flows()
            == std::collections::BTreeMap::from([(open_client.clone(), "established".to_string())])
    });
    // The idle connection still works, on the same backend.
    assert_eq!(open.request().unwrap().trim(), first);
}

/// S06, UDP half, the answer's direction: a backend that answers a 2000-byte datagram with
/// the same 2000 bytes sends two fragments back, and both must be reverse-translated (the
/// second by the record its first fragment left). The testbed's own UDP server answers with
/// its name only, so this test runs an echo server of its own in pod-c (node2) behind a
/// service of its own; clients on node1: pod-a (ClusterIP) and the external host (NodePort,
/// masqueraded).
#[test]
fn s06_a_2000_byte_udp_answer_comes_back_through_the_service() {
    let Some(c) = Cluster::start("s06_a_2000_byte_udp_answer_comes_back_through_the_service")
    else {
        return;
    };
    let big = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  clusterIPs: [10.96.0.12]
  ports:
  - {name: echo, port: 53, targetPort: 5454, protocol: UDP, nodePort: 30054}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: default
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
endpoints:
- addresses: [10.244.2.2]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node2
  targetRef: {kind: Pod, name: pod-c, namespace: default}
ports:
- {name: echo, port: 5454, protocol: UDP}
"#;
    std::fs::write(c.manifests.join("echo.yaml"), big).unwrap();
    // The echo server: a socket made in pod-c's namespace, served by a thread of this test
    // until the test ends.
    let server =
        c.tb.in_netns(&c.netns("pod-c"), || {
            let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5454))?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(sock)
        })
        .expect("echo socket in pod-c");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Stops the server thread (which closes the socket) also when an assertion fails.
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stopper = StopOnDrop(stop.clone());
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        })
    };
    for node in ["node1", "node2"] {
        let pin = c.tb.node(node).pin_path.clone();
        c.eventually("the echo service is programmed", || {
            xlb::datapath::reader::services(&pin).is_ok_and(|rows| {
                rows.iter()
                    .any(|r| r.service.starts_with("default/echo") && r.backends.len() == 1)
            })
        });
    }
    let datagram: Vec<u8> = (0..2000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let echoed = |netns: &str, ip: Ipv4Addr, port: u16| -> anyhow::Result<Vec<u8>> {
        c.tb.in_netns(netns, || {
            let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.set_read_timeout(Some(Duration::from_secs(3)))?;
            // Connected: only an answer from exactly ip:port is received.
            sock.connect((ip, port))?;
            sock.send(&datagram)?;
            let mut buf = [0u8; 4096];
            let n = sock
                .recv(&mut buf)
                .map_err(|e| anyhow::anyhow!("no answer from {ip}:{port} in {netns}: {e}"))?;
            Ok(buf[..n].to_vec())
        })
    };
    let ext = c.tb.external().netns.clone();
    let node1 = c.tb.node("node1").ip;
    for _ in 0..3 {
        let answer = echoed(&c.netns("pod-a"), Ipv4Addr::new(10, 96, 0, 12), 53);
        assert!(
            answer.as_ref().is_ok_and(|a| *a == datagram),
            "pod-a: {answer:?}\n{}",
            c.logs()
        );
        let answer = echoed(&ext, node1, 30054);
        assert!(
            answer.as_ref().is_ok_and(|a| *a == datagram),
            "external: {answer:?}\n{}",
            c.logs()
        );
    }
    drop(stopper);
    echo.join().unwrap();
    // Node1 translated a second fragment for every request and every answer.
    let translated = xlb_json(&["stats"], &c.tb.node("node1").pin_path)["forward_fragment"]
        .as_u64()
        .unwrap();
    assert!(translated >= 12, "node1 forward_fragment {translated}");
}

/// S31: a backend's segment far outside the TCP window, on an established connection through
/// the ClusterIP, reaches the client as the service (10.96.0.10:80), never with the backend's
/// address: the datapath does not judge sequence numbers (docs/datapath.md, "Out-of-window and
/// invalid TCP"). The segment is forged with a raw socket in the backend's namespace; a raw
/// socket in the client's namespace sees what arrives.
#[test]
fn s31_an_out_of_window_segment_from_the_backend_reaches_the_client_as_the_service() {
    let Some(c) = Cluster::start(
        "s31_an_out_of_window_segment_from_the_backend_reaches_the_client_as_the_service",
    ) else {
        return;
    };
    let client_pod = c.tb.pod("pod-a").clone();
    // A connection whose backend is another pod (not a hairpin).
    let (connection, backend) = (0..20)
        .map(|_| c.established(&client_pod.netns))
        .find(|(_, backend)| backend != "pod-a")
        .expect("a connection to another pod");
    let client_port = connection.local_addr().unwrap().port();
    let backend = c.tb.pod(&backend).clone();
    const SEQ: u32 = 0x5eed_0bad;
    let raw = |protocol: i32| -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    };
    // Listen first: every TCP packet that arrives in the client's namespace.
    let listener =
        c.tb.in_netns(&client_pod.netns, || Ok(raw(libc::IPPROTO_TCP)?))
            .unwrap();
    let mut segment = Vec::new();
    etherparse::PacketBuilder::ipv4(backend.ip.octets(), client_pod.ip.octets(), 64)
        .tcp(8080, client_port, SEQ, 502)
        .ack(0x1234_5678)
        .write(&mut segment, b"out of window")
        .unwrap();
    c.tb.in_netns(&backend.netns, || {
        // IPPROTO_RAW: the segment goes out exactly as built (IP header included).
        let sender = raw(libc::IPPROTO_RAW)?;
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(client_pod.ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        use std::os::fd::AsRawFd;
        // SAFETY: valid buffer and address for the call's duration.
        let sent = unsafe {
            libc::sendto(
                sender.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        anyhow::ensure!(sent >= 0, "{}", std::io::Error::last_os_error());
        Ok(())
    })
    .unwrap();
    // Read what arrives (bounded): the forged segment, recognised by its sequence number.
    let deadline = Instant::now() + Duration::from_secs(3);
    let arrived = loop {
        assert!(
            Instant::now() < deadline,
            "the segment never arrived\n{}",
            c.logs()
        );
        let mut buf = [0u8; 2048];
        use std::os::fd::AsRawFd;
        // SAFETY: valid buffer; MSG_DONTWAIT keeps the loop bounded by the deadline.
        let n = unsafe {
            libc::recv(
                listener.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let Ok((ip, rest)) = etherparse::Ipv4Header::from_slice(&buf[..n as usize]) else {
            continue;
        };
        let Ok((tcp, _)) = etherparse::TcpHeader::from_slice(rest) else {
            continue;
        };
        if tcp.sequence_number == SEQ && tcp.destination_port == client_port {
            break (Ipv4Addr::from(ip.source), tcp.source_port);
        }
    };
    assert_eq!(
        arrived,
        (VIP, 80),
        "the segment reached the client un-NATed"
    );
    drop(connection);
}

/// `netns` has a route exception with `mtu` towards `towards` (learned from a translated
/// fragmentation-needed error), and the agent pinned at `pin` counted `counter`.
fn assert_path_mtu_learned(
    c: &Cluster,
    netns: &str,
    towards: &str,
    mtu: &str,
    pin: &std::path::Path,
    counter: &str,
) {
    let route =
        c.tb.run_in(netns, &["ip", "route", "get", towards])
            .unwrap();
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    assert!(
        route.contains(&format!("mtu {mtu}")),
        "{netns}'s route towards {towards}: {route}"
    );
    let stats = xlb_json(&["stats"], pin);
    assert!(
        stats[counter].as_u64().unwrap() >= 1,
        "the error was translated ({counter}): {stats}"
    );
}
