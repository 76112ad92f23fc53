//! Checks the manifests under deploy/: every YAML document parses into its Kubernetes type
//! without losing a field (a misspelt field fails instead of being ignored), and the xlb
//! DaemonSet and its RBAC say what deploy/README.md says they do. No cluster, no root.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Container, Namespace, Pod, PodSpec, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const METRICS_PORT: i32 = 10249;
const CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Debug)]
enum Object {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    Pod(Box<Pod>),
    EndpointSlice(Box<EndpointSlice>),
    /// kind's cluster configuration (kind.x-k8s.io), checked structurally.
    KindCluster(serde_yaml::Value),
}

#[derive(Debug)]
struct Doc {
    /// `file#index`, for messages.
    origin: String,
    object: Object,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// Every document of every YAML file under deploy/, typed.
fn load() -> Vec<Doc> {
    let root = deploy_dir();
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no YAML under {}", root.display());
    let mut docs = Vec::new();
    for file in files {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let origin = format!("deploy/{name}#{index}");
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{origin}: not YAML: {e}"));
            if value.is_null() {
                continue; // an empty document (comments only)
            }
            let object = typed_object(&origin, value);
            docs.push(Doc { origin, object });
        }
    }
    docs
}

fn typed_object(origin: &str, value: serde_yaml::Value) -> Object {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{origin}: no {name}"))
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(typed(origin, value)),
        ("v1", "ServiceAccount") => Object::ServiceAccount(typed(origin, value)),
        ("v1", "Service") => Object::Service(typed(origin, value)),
        ("v1", "Pod") => Object::Pod(typed(origin, value)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            Object::ClusterRole(typed(origin, value))
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(typed(origin, value))
        }
        ("apps/v1", "DaemonSet") => Object::DaemonSet(typed(origin, value)),
        ("apps/v1", "Deployment") => Object::Deployment(typed(origin, value)),
        ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(typed(origin, value)),
        ("kind.x-k8s.io/v1alpha4", "Cluster") => Object::KindCluster(value),
        _ => panic!(
            "{origin}: kind {kind} ({api_version}) is not one these tests know; \
             add it to typed_object() in lb-userspace/tests/deploy_manifests.rs"
        ),
    }
}

/// Parses into `T`, then checks that serializing `T` gives the document back: k8s-openapi
/// ignores unknown fields, so this is what catches a misspelt or misplaced one.
fn typed<T: DeserializeOwned + Serialize>(origin: &str, value: serde_yaml::Value) -> Box<T> {
    let object: T = serde_yaml::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{origin}: {}: {e}", std::any::type_name::<T>()));
    let original = serde_json::to_value(&value).unwrap();
    let round_trip = serde_json::to_value(&object).unwrap();
    let mut differences = Vec::new();
    diff("", &original, &round_trip, &mut differences);
    assert!(
        differences.is_empty(),
        "{origin}: fields {} did not survive parsing as {} (misspelt, misplaced or of the \
         wrong type?)",
        differences.join(", "),
        std::any::type_name::<T>()
    );
    Box::new(object)
}

fn diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value::{Array, Object};
    match (a, b) {
        (Object(a), Object(b)) => {
            for key in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
                let sub = format!("{path}.{key}");
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff(&sub, x, y, out),
                    _ => out.push(sub),
                }
            }
        }
        (Array(a), Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path} ({a} != {b})")),
    }
}

/// The one object of a kind named `name`.
fn one<'a, T: Debug>(
    docs: &'a [Doc],
    what: &str,
    pick: impl Fn(&'a Object) -> Option<&'a T>,
    name: impl Fn(&T) -> Option<&str>,
    wanted: &str,
) -> &'a T {
    let found: Vec<&T> = docs
        .iter()
        .filter_map(|d| pick(&d.object))
        .filter(|o| name(o) == Some(wanted))
        .collect();
    assert_eq!(found.len(), 1, "expected one {what} {wanted}: {found:#?}");
    found[0]
}

fn daemonset(docs: &[Doc]) -> &DaemonSet {
    one(
        docs,
        "DaemonSet",
        |o| match o {
            Object::DaemonSet(d) => Some(d.as_ref()),
            _ => None,
        },
        |d| d.metadata.name.as_deref(),
        "xlb",
    )
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .expect("DaemonSet has a pod spec")
}

fn agent(ds: &DaemonSet) -> &Container {
    pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == "xlb")
        .expect("a container named xlb")
}

fn command(c: &Container) -> Vec<&str> {
    c.command
        .iter()
        .chain(c.args.iter())
        .flatten()
        .map(String::as_str)
        .collect()
}

/// Values of a repeatable `--flag VALUE` (or `--flag=VALUE`).
fn flag_values<'a>(argv: &[&'a str], flag: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    for (i, arg) in argv.iter().enumerate() {
        if *arg == flag {
            out.push(
                *argv
                    .get(i + 1)
                    .unwrap_or_else(|| panic!("{flag} without value")),
            );
        } else if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            out.push(v);
        }
    }
    out
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[test]
fn every_document_parses_into_its_kubernetes_type() {
    let docs = load();
    let kinds: BTreeSet<&str> = docs
        .iter()
        .map(|d| match &d.object {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::DaemonSet(_) => "DaemonSet",
            Object::Deployment(_) => "Deployment",
            Object::Service(_) => "Service",
            Object::Pod(_) => "Pod",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::KindCluster(_) => "Cluster",
        })
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Cluster",
    ] {
        assert!(kinds.contains(kind), "no {kind} under deploy/: {kinds:?}");
    }
}

#[test]
fn cluster_role_only_lists_and_watches_services_nodes_and_endpointslices() {
    let docs = load();
    let role = one(
        &docs,
        "ClusterRole",
        |o| match o {
            Object::ClusterRole(r) => Some(r.as_ref()),
            _ => None,
        },
        |r| r.metadata.name.as_deref(),
        "xlb",
    );
    assert!(role.aggregation_rule.is_none());
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        assert!(rule.resource_names.is_none(), "{rule:?}");
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert!(
            !verbs.is_empty() && verbs.is_subset(&BTreeSet::from(["list", "watch"])),
            "verbs beyond list/watch: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.insert((group.as_str(), resource.as_str()));
            }
        }
    }
    assert_eq!(
        granted,
        BTreeSet::from([
            ("", "nodes"),
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
        ])
    );
}

#[test]
fn service_account_binding_and_daemonset_line_up() {
    let docs = load();
    let ds = daemonset(&docs);
    let namespace = ds
        .metadata
        .namespace
        .as_deref()
        .expect("DaemonSet namespace");
    assert_eq!(namespace, "xlb-system");
    one(
        &docs,
        "Namespace",
        |o| match o {
            Object::Namespace(n) => Some(n.as_ref()),
            _ => None,
        },
        |n| n.metadata.name.as_deref(),
        namespace,
    );
    let account = pod_spec(ds)
        .service_account_name
        .as_deref()
        .expect("DaemonSet names its service account");
    let sa = one(
        &docs,
        "ServiceAccount",
        |o| match o {
            Object::ServiceAccount(s) => Some(s.as_ref()),
            _ => None,
        },
        |s| s.metadata.name.as_deref(),
        account,
    );
    assert_eq!(sa.metadata.namespace.as_deref(), Some(namespace));
    let binding = one(
        &docs,
        "ClusterRoleBinding",
        |o| match o {
            Object::ClusterRoleBinding(b) => Some(b.as_ref()),
            _ => None,
        },
        |b| b.metadata.name.as_deref(),
        "xlb",
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(binding.role_ref.name, "xlb");
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert!(
        subjects.iter().any(|s| s.kind == "ServiceAccount"
            && s.name == account
            && s.namespace.as_deref() == Some(namespace)),
        "binding does not name {namespace}/{account}: {subjects:?}"
    );
}

#[test]
fn daemonset_is_host_network_with_four_capabilities_bpffs_and_the_host_cgroup_root() {
    let docs = load();
    let ds = daemonset(&docs);
    let spec = pod_spec(ds);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint"
    );
    let strategy = ds.spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::Int(1))
    );

    let xlb = agent(ds);
    let security = xlb.security_context.as_ref().expect("securityContext");
    assert_ne!(
        security.privileged,
        Some(true),
        "the agent is not privileged"
    );
    let caps = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps
        .add
        .iter()
        .flatten()
        .map(|c| c.strip_prefix("CAP_").unwrap_or(c))
        .collect();
    assert_eq!(added, BTreeSet::from(CAPABILITIES));

    // /sys/fs/bpf of the host, so pinned maps outlive the pod.
    let mount = xlb
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("the agent mounts /sys/fs/bpf");
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the bpffs volume");
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf")
    );

    // S18 in a container: the connect() hook attaches to the host's cgroup v2 root, mounted
    // from the host; the container's own /sys/fs/cgroup is only its own cgroup.
    let argv = command(xlb);
    let cgroup_path = match flag_values(&argv, "--cgroup-path")[..] {
        [path] => path,
        ref other => panic!("one --cgroup-path expected, got {other:?} in {argv:?}"),
    };
    assert_ne!(
        cgroup_path, "/sys/fs/cgroup",
        "that is the container's own cgroup, not the host's"
    );
    let mount = xlb
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path.trim_end_matches('/') == cgroup_path.trim_end_matches('/'))
        .unwrap_or_else(|| panic!("nothing is mounted at --cgroup-path {cgroup_path}"));
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the cgroup volume");
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/cgroup"),
        "--cgroup-path must be the host's cgroup2 root"
    );

    let node_name = xlb
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
}

#[test]
fn daemonset_probes_the_metrics_port() {
    let docs = load();
    let xlb = agent(daemonset(&docs));
    let port_number = |port: &IntOrString| match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            xlb.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    };
    for (probe, path) in [
        (&xlb.liveness_probe, "/healthz"),
        (&xlb.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(port_number(&get.port), METRICS_PORT, "{path}");
    }
}

#[test]
fn daemonset_runs_api_mode_with_consistent_settings() {
    let docs = load();
    let ds = daemonset(&docs);
    let xlb = agent(ds);
    let argv = command(xlb);
    assert!(
        argv.first().is_some_and(|c| c.ends_with("xlb")) && argv.get(1) == Some(&"run"),
        "{argv:?}"
    );
    for absent in ["--manifests", "--kubeconfig"] {
        assert!(
            !argv.iter().any(|a| a.starts_with(absent)),
            "{absent} in {argv:?}"
        );
    }
    // Every $(VAR) is defined in the container's env, or Kubernetes passes it literally.
    let defined: BTreeSet<&str> = xlb.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for arg in &argv {
        let mut rest = *arg;
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').expect("closed $(") + start;
            let var = &rest[start + 2..end];
            assert!(defined.contains(var), "$({var}) is not in env");
            rest = &rest[end..];
        }
    }
    assert_eq!(flag_values(&argv, "--cluster-cidr"), ["$(CLUSTER_CIDR)"]);
    let uplinks = flag_values(&argv, "--interface");
    assert!(!uplinks.is_empty(), "no --interface in {argv:?}");
    let pod_interfaces = flag_values(&argv, "--pod-interface");
    assert!(pod_interfaces.contains(&"veth*"), "{argv:?}");

    // The image's entry point is where the command says.
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("ENTRYPOINT [\"{}\"]", argv[0])),
        "deploy/Dockerfile does not install {}",
        argv[0]
    );

    // The init container prepares the same uplinks the agent attaches to.
    let spec = pod_spec(ds);
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| env_value(c, "UPLINKS").is_some())
        .expect("an init container with UPLINKS");
    let prepared: Vec<&str> = env_value(init, "UPLINKS")
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(prepared, uplinks, "UPLINKS vs --interface");

    // kind: same pod CIDR, no kube-proxy, API server = its control-plane node.
    let cluster = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::KindCluster(c) => Some(c),
            _ => None,
        })
        .expect("deploy/kind/cluster.yaml");
    let networking = &cluster["networking"];
    assert_eq!(networking["kubeProxyMode"].as_str(), Some("none"));
    assert_eq!(
        networking["podSubnet"].as_str(),
        env_value(xlb, "CLUSTER_CIDR"),
        "kind podSubnet vs CLUSTER_CIDR"
    );
    let roles: Vec<&str> = cluster["nodes"]
        .as_sequence()
        .expect("nodes")
        .iter()
        .map(|n| n["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
    if let Some(name) = cluster["name"].as_str() {
        assert_eq!(
            env_value(xlb, "KUBERNETES_SERVICE_HOST"),
            Some(format!("{name}-control-plane").as_str())
        );
    }
}

/// Kubernetes rejects these; catch them here.
#[test]
fn workloads_are_valid_as_far_as_kubernetes_checks_go() {
    let docs = load();
    /// A pod template (or pod) and where it lives.
    struct Template<'a> {
        namespace: Option<&'a str>,
        labels: BTreeMap<String, String>,
        spec: &'a PodSpec,
    }
    let mut templates: Vec<Template> = Vec::new();
    for doc in &docs {
        let (namespace, selector, labels, spec) = match &doc.object {
            Object::DaemonSet(d) => {
                let s = &d.spec;
                (
                    d.metadata.namespace.as_deref(),
                    Some(&s.selector),
                    s.template.metadata.as_ref().and_then(|m| m.labels.clone()),
                    s.template.spec.as_ref().unwrap(),
                )
            }
            Object::Deployment(d) => {
                let s = &d.spec;
                (
                    d.metadata.namespace.as_deref(),
                    Some(&s.selector),
                    s.template.metadata.as_ref().and_then(|m| m.labels.clone()),
                    s.template.spec.as_ref().unwrap(),
                )
            }
            Object::Pod(p) => (
                p.metadata.namespace.as_deref(),
                None,
                p.metadata.labels.clone(),
                p.spec.as_ref().unwrap(),
            ),
            _ => continue,
        };
        let labels = labels.unwrap_or_default();
        if let Some(selector) = selector {
            for (k, v) in selector.match_labels.iter().flatten() {
                assert_eq!(
                    labels.get(k),
                    Some(v),
                    "{}: selector does not match the template",
                    doc.origin
                );
            }
        }
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            assert!(c.image.is_some(), "{}: {} has no image", doc.origin, c.name);
            let privileged = c
                .security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false);
            for m in c.volume_mounts.iter().flatten() {
                assert!(
                    spec.volumes.iter().flatten().any(|v| v.name == m.name),
                    "{}: {} mounts unknown volume {}",
                    doc.origin,
                    c.name,
                    m.name
                );
                if m.mount_propagation.as_deref() == Some("Bidirectional") {
                    assert!(
                        privileged,
                        "{}: {}: Bidirectional propagation needs a privileged container",
                        doc.origin, c.name
                    );
                }
            }
        }
        templates.push(Template {
            namespace,
            labels,
            spec,
        });
    }

    // Services with a selector select some workload here, on ports it declares.
    for doc in &docs {
        let Object::Service(svc) = &doc.object else {
            continue;
        };
        let spec = svc.spec.as_ref().unwrap();
        let Some(selector) = spec.selector.as_ref() else {
            continue;
        };
        let namespace = svc.metadata.namespace.as_deref();
        let selected: Vec<&PodSpec> = templates
            .iter()
            .filter(|t| {
                t.namespace == namespace && selector.iter().all(|(k, v)| t.labels.get(k) == Some(v))
            })
            .map(|t| t.spec)
            .collect();
        if selected.is_empty() {
            continue; // e.g. the example Service, whose pods live elsewhere
        }
        for port in spec.ports.iter().flatten() {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            let target = port
                .target_port
                .clone()
                .unwrap_or(IntOrString::Int(port.port));
            for pod in &selected {
                let declared = pod
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .any(|p| {
                        p.protocol.as_deref().unwrap_or("TCP") == protocol
                            && match &target {
                                IntOrString::Int(n) => p.container_port == *n,
                                IntOrString::String(name) => p.name.as_deref() == Some(name),
                            }
                    });
                assert!(
                    declared,
                    "{}: port {} ({protocol}) targets {target:?}, which the selected pods \
                     do not declare",
                    doc.origin, port.port
                );
            }
        }
    }

    // Namespaced objects live in a namespace declared here (or default).
    let declared: BTreeSet<&str> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::Namespace(n) => n.metadata.name.as_deref(),
            _ => None,
        })
        .chain(["default"])
        .collect();
    for doc in &docs {
        let namespace = match &doc.object {
            Object::ServiceAccount(o) => o.metadata.namespace.as_deref(),
            Object::DaemonSet(o) => o.metadata.namespace.as_deref(),
            Object::Deployment(o) => o.metadata.namespace.as_deref(),
            Object::Service(o) => o.metadata.namespace.as_deref(),
            Object::Pod(o) => o.metadata.namespace.as_deref(),
            Object::EndpointSlice(o) => o.metadata.namespace.as_deref(),
            _ => continue,
        };
        let namespace = namespace.unwrap_or("default");
        assert!(
            declared.contains(namespace),
            "{}: namespace {namespace} is not declared under deploy/",
            doc.origin
        );
    }
}

#[test]
fn netperf_service_exposes_control_and_data_ports() {
    let docs = load();
    let svc = one(
        &docs,
        "Service",
        |o| match o {
            Object::Service(s) => Some(s.as_ref()),
            _ => None,
        },
        |s| s.metadata.name.as_deref(),
        "netperf",
    );
    let ports: BTreeSet<(i32, &str)> = svc
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| (p.port, p.protocol.as_deref().unwrap_or("TCP")))
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([(12865, "TCP"), (12866, "TCP"), (12866, "UDP")])
    );
}
