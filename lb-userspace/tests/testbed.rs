//! The network-namespace testbed itself: connectivity without xlb, and that teardown
//! (also of leftovers and kept testbeds) removes everything.
use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use xlb::testbed::{
    require_privileges, teardown_kept, NodeSpec, Testbed, TestbedSpec, HTTP_PORT, PIN_ROOT,
    UDP_PORT,
};

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Running, i.e. exists and is not a zombie.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next();
            !matches!(state, Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

fn wait_for(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Creates a BPF array map and pins it at `path` (raw bpf(2): no object file needed).
fn pin_array_map(path: &Path) {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u32; 28],
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        rest: [u32; 27],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let create = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        rest: [0; 28],
    };
    // SAFETY: bpf(2) with a zero-padded attribute of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &create,
            std::mem::size_of::<MapCreate>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
        path_fd: 0,
        rest: [0; 27],
    };
    // SAFETY: as above; `c_path` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &pin,
            std::mem::size_of::<ObjPin>(),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our fd; the pin keeps the map.
    unsafe { libc::close(fd as libc::c_int) };
}

fn sysctl(tb: &Testbed, netns: &str, key: &str) -> String {
    let out = tb.run_in(netns, &["sysctl", "-n", key]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn default_topology_connects_pods_nodes_and_external_client() {
    if !require_privileges("default_topology_connects_pods_nodes_and_external_client") {
        return;
    }
    let mut tb = Testbed::create(&TestbedSpec::default()).unwrap();
    tb.start_all_servers().unwrap();

    // Deterministic addressing.
    assert_eq!(tb.node("node1").ip, Ipv4Addr::new(172, 18, 0, 11));
    assert_eq!(tb.node("node2").ip, Ipv4Addr::new(172, 18, 0, 12));
    assert_eq!(tb.pod("pod-a").ip, Ipv4Addr::new(10, 244, 1, 2));
    assert_eq!(tb.pod("pod-b").ip, Ipv4Addr::new(10, 244, 1, 3));
    assert_eq!(tb.pod("pod-c").ip, Ipv4Addr::new(10, 244, 2, 2));
    assert_eq!(tb.pod("pod-a").host_veth, "xvpoda");
    assert_eq!(tb.node("node2").pod_cidr.to_string(), "10.244.2.0/24");
    assert!(tb.node("node1").pin_path.is_dir());

    let a = tb.pod("pod-a").clone();
    let b = tb.pod("pod-b").clone();
    let c = tb.pod("pod-c").clone();
    let ext = tb.external().netns.clone();

    // Pod to pod: same node and across nodes, TCP and UDP.
    assert_eq!(tb.http_get(&a.netns, c.ip, HTTP_PORT).unwrap(), "pod-c");
    assert_eq!(tb.http_get(&a.netns, b.ip, HTTP_PORT).unwrap(), "pod-b");
    assert_eq!(tb.http_get(&c.netns, a.ip, HTTP_PORT).unwrap(), "pod-a");
    assert_eq!(tb.udp_request(&a.netns, c.ip, UDP_PORT).unwrap(), "pod-c");
    assert_eq!(tb.udp_request(&c.netns, b.ip, UDP_PORT).unwrap(), "pod-b");

    // External client via node1: to pods on node1 and (forwarded by node1) on node2.
    assert_eq!(tb.http_get(&ext, a.ip, HTTP_PORT).unwrap(), "pod-a");
    assert_eq!(tb.http_get(&ext, c.ip, HTTP_PORT).unwrap(), "pod-c");
    assert_eq!(tb.udp_request(&ext, c.ip, UDP_PORT).unwrap(), "pod-c");

    // Nodes reach each other and the pods of the other node.
    let n1 = tb.node("node1").netns.clone();
    assert_eq!(tb.http_get(&n1, c.ip, HTTP_PORT).unwrap(), "pod-c");

    // Keep-alive: several requests on one connection.
    let mut client = tb.open_persistent_http(&ext, c.ip, HTTP_PORT).unwrap();
    let port = client.local_addr().unwrap().port();
    for _ in 0..3 {
        assert_eq!(client.request().unwrap(), "pod-c");
    }
    assert_eq!(client.local_addr().unwrap().port(), port);
    drop(client);

    // Node settings the datapath relies on.
    for node in ["node1", "node2"] {
        let ns = tb.node(node).netns.clone();
        assert_eq!(sysctl(&tb, &ns, "net.ipv4.ip_forward"), "1");
        assert_eq!(sysctl(&tb, &ns, "net.ipv4.conf.all.rp_filter"), "0");
        assert_eq!(sysctl(&tb, &ns, "net.ipv4.conf.eth0.rp_filter"), "0");
        assert_eq!(sysctl(&tb, &ns, "net.ipv4.conf.eth0.accept_local"), "1");
        assert_eq!(sysctl(&tb, &ns, "net.ipv4.conf.eth0.send_redirects"), "0");
        let out = tb.run_in(&ns, &["ethtool", "-k", "eth0"]).unwrap();
        let features = String::from_utf8_lossy(&out.stdout);
        assert!(
            features.contains("tx-checksumming: off"),
            "{node}: {features}"
        );
    }
    // Switch ports towards nodes: GRO (NAPI for XDP_TX), and full checksums on what they
    // re-segment, since the node's XDP cannot see CHECKSUM_PARTIAL.
    for node in ["node1", "node2"] {
        let port = tb.node(node).switch_port.clone();
        let out = tb
            .run_in(tb.switch_netns(), &["ethtool", "-k", &port])
            .unwrap();
        let features = String::from_utf8_lossy(&out.stdout);
        assert!(
            features.contains("generic-receive-offload: on"),
            "{port}: {features}"
        );
        assert!(
            features.contains("tx-checksumming: off"),
            "{port}: {features}"
        );
    }

    // A stopped server is gone; it can be started again.
    tb.stop_servers("pod-c").unwrap();
    assert!(tb.http_get(&a.netns, c.ip, HTTP_PORT).is_err());
    tb.start_servers("pod-c").unwrap();
    assert_eq!(tb.http_get(&a.netns, c.ip, HTTP_PORT).unwrap(), "pod-c");
}

#[test]
fn drop_removes_namespaces_pins_and_processes() {
    if !require_privileges("drop_removes_namespaces_pins_and_processes") {
        return;
    }
    let mut tb = Testbed::create(&TestbedSpec::default()).unwrap();
    let mut pids = Vec::new();
    for pod in ["pod-a", "pod-b", "pod-c"] {
        pids.push(tb.start_servers(pod).unwrap());
    }
    let node1 = tb.node("node1").netns.clone();
    // A process that ignores SIGTERM: teardown must SIGKILL it after the grace period.
    let trapped = tb.work_dir().join("trapped");
    let script = format!(
        "trap '' TERM; touch {}; while :; do sleep 1; done",
        trapped.display()
    );
    pids.push(tb.spawn_in(&node1, &["sh", "-c", &script]).unwrap());
    wait_for(|| trapped.exists());
    pids.push(tb.spawn_in(&node1, &["sleep", "1000"]).unwrap());
    // A real pinned BPF object in a node's pin path, as an agent leaves them.
    let pinned = tb.node("node2").pin_path.join("some_map");
    pin_array_map(&pinned);
    assert!(pinned.exists());
    let prefix = format!("{}-", tb.netns_prefix());
    let pin_dir = tb.pin_dir().to_path_buf();
    let work_dir = tb.work_dir().to_path_buf();
    assert_eq!(namespaces_with_prefix(&prefix).len(), 7);
    assert!(pin_dir.is_dir());
    for pid in &pids {
        assert!(running(*pid));
    }
    let started = Instant::now();
    drop(tb);
    assert!(started.elapsed() < Duration::from_secs(10));

    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
    assert!(!pin_dir.exists(), "{} left", pin_dir.display());
    assert!(!work_dir.exists(), "{} left", work_dir.display());
    for pid in pids {
        // Reaped, not just killed.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} left"
        );
    }
}

#[test]
fn creation_removes_leftovers_of_dead_runs() {
    if !require_privileges("creation_removes_leftovers_of_dead_runs") {
        return;
    }
    // A pid that no longer exists: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let id = format!("{dead}-7");
    let netns = format!("xlb-{id}-node1");
    let status = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap();
    assert!(status.success());
    let pins = Path::new(PIN_ROOT).join(&id).join("node1");
    std::fs::create_dir_all(&pins).unwrap();
    let work = std::env::temp_dir().join(format!("xlb-testbed-{id}"));
    std::fs::create_dir_all(&work).unwrap();

    let tb = Testbed::create(&TestbedSpec {
        nodes: vec![NodeSpec::new("solo", &["pod-x"])],
    })
    .unwrap();
    assert!(!Path::new("/run/netns").join(&netns).exists());
    assert!(!pins.parent().unwrap().exists());
    assert!(!work.exists());
    // Live testbeds (this process) are left alone by their siblings' creation.
    let other = Testbed::create(&TestbedSpec {
        nodes: vec![NodeSpec::new("solo", &["pod-y"])],
    })
    .unwrap();
    assert!(Path::new("/run/netns")
        .join(&tb.node("solo").netns)
        .exists());
    drop(other);
    drop(tb);
}

#[test]
fn kept_testbed_survives_until_teardown_kept() {
    if !require_privileges("kept_testbed_survives_until_teardown_kept") {
        return;
    }
    let mut tb = Testbed::create(&TestbedSpec {
        nodes: vec![NodeSpec::new("keeper", &["pod-k"])],
    })
    .unwrap();
    let server = tb.start_servers("pod-k").unwrap();
    let state = tb.work_dir().with_extension("state.json");
    let _ = std::fs::remove_file(&state);
    let prefix = format!("{}-", tb.netns_prefix());
    let kept = tb.keep(&state).unwrap();

    assert!(state.exists());
    assert_eq!(namespaces_with_prefix(&prefix).len(), 4);
    assert!(running(server));
    let pod = &kept.pods[0];
    assert_eq!(pod.name, "pod-k");
    // Still serving, from another testbed's point of view too: reachable via nsenter.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", kept.nodes[0].netns))
        .args([
            "curl",
            "-sS",
            "--max-time",
            "2",
            &format!("http://{}:{HTTP_PORT}/", pod.ip),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pod-k");

    teardown_kept(&state).unwrap();
    assert!(!state.exists());
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
    assert!(!kept.pin_dir.exists());
    assert!(!kept.work_dir.exists());
    // Our own (dropped) child: dead, a zombie until this test process exits.
    assert!(!running(server));
    assert!(teardown_kept(&state).is_err());
}

#[test]
fn invalid_specs_are_rejected() {
    // No privileges needed: validation happens before anything is created.
    for spec in [
        TestbedSpec { nodes: vec![] },
        TestbedSpec {
            nodes: vec![NodeSpec::new("n1", &["a"]), NodeSpec::new("n1", &["b"])],
        },
        TestbedSpec {
            nodes: vec![NodeSpec::new("n1", &["switch"])],
        },
        TestbedSpec {
            nodes: vec![NodeSpec::new("n1", &["Pod_A"])],
        },
        TestbedSpec {
            nodes: vec![NodeSpec::new("n1", &["a-b", "ab"])],
        },
        TestbedSpec {
            nodes: vec![NodeSpec::new("n1", &["abcdefghijklmn"])],
        },
    ] {
        assert!(Testbed::create(&spec).is_err(), "{spec:?}");
    }
}

/// A stand-in for `xlb run`: records its arguments and its view of the pin path, then
/// writes the ready file (or fails, if asked to by an extra argument).
const FAKE_AGENT: &str = r#"#!/bin/sh
echo "args: $*"
while [ $# -gt 0 ]; do
  case "$1" in
    --pin-path) pin="$2"; shift ;;
    --ready-file) ready="$2"; shift ;;
    --fail) echo "boom: cannot attach"; exit 3 ;;
  esac
  shift
done
[ -d "$pin" ] && echo "pin path visible"
ip -4 -o addr show dev eth0
touch "$ready"
exec sleep 1000
"#;

#[test]
fn start_agent_passes_the_node_arguments_and_waits_for_ready() {
    if !require_privileges("start_agent_passes_the_node_arguments_and_waits_for_ready") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut tb = Testbed::create(&TestbedSpec::default()).unwrap();
    let fake = tb.work_dir().join("fake-xlb");
    std::fs::write(&fake, FAKE_AGENT).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let manifests = tb.work_dir().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();

    let pid = tb
        .start_agent(&fake, "node2", &manifests, &["--uplink-mode", "tc"])
        .unwrap();
    assert_eq!(tb.agent_pid("node2"), Some(pid));
    let log = tb.agent_log("node2");
    let expected = format!(
        "args: run --manifests {} --node-name node2 --interface eth0 --pod-interface xv* \
         --node-ip 172.18.0.12 --cluster-cidr 10.244.0.0/16 --pin-path {} --ready-file",
        manifests.display(),
        tb.node("node2").pin_path.display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(log.contains("--uplink-mode tc"), "{log}");
    // nsenter --net keeps the host's /sys: the pins are visible; and the netns is node2's.
    assert!(log.contains("pin path visible"), "{log}");
    assert!(log.contains("inet 172.18.0.12/24"), "{log}");
    assert!(tb.start_agent(&fake, "node2", &manifests, &[]).is_err());

    tb.stop_agent("node2").unwrap();
    assert!(!running(pid));
    assert_eq!(tb.agent_pid("node2"), None);
    // Restart: same log, a second run.
    tb.start_agent(&fake, "node2", &manifests, &[]).unwrap();
    assert_eq!(tb.agent_log("node2").matches("=== testbed:").count(), 2);

    // An agent that exits before it is ready: the error carries its output.
    let err = tb
        .start_agent(&fake, "node1", &manifests, &["--fail"])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("boom: cannot attach"), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert_eq!(tb.agent_pid("node1"), None);
}

#[test]
fn panicking_test_still_tears_down() {
    if !require_privileges("panicking_test_still_tears_down") {
        return;
    }
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut tb = Testbed::create(&TestbedSpec {
            nodes: vec![NodeSpec::new("doomed", &["pod-d"])],
        })
        .unwrap();
        let pid = tb.start_servers("pod-d").unwrap();
        seen = Some((
            format!("{}-", tb.netns_prefix()),
            tb.pin_dir().to_path_buf(),
            tb.work_dir().to_path_buf(),
            pid,
        ));
        panic!("deliberate");
    }));
    assert!(result.is_err());
    let (prefix, pin_dir, work_dir, pid) = seen.unwrap();
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
    assert!(!pin_dir.exists());
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    // The logs stay for the failing test's author (removed by a later run's cleanup).
    assert!(work_dir.join("servers-pod-d.log").exists());
    std::fs::remove_dir_all(work_dir).unwrap();
}
