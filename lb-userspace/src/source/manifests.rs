//! Standalone mode: cluster state from a directory of ordinary Kubernetes manifests, as
//! `kubectl get -o yaml` (or `-o json`) prints them.
//!
//! Files `*.yaml`, `*.yml` and `*.json` directly in the directory (not hidden, not in
//! subdirectories) hold Services, discovery.k8s.io/v1 EndpointSlices and Nodes, alone, in
//! multi-document YAML, or in `List`s. Other kinds are ignored. A file that fails to parse
//! is reported and its last good content stays in force, so a half-written edit never
//! takes services away.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, warn};

use super::{SourceUpdate, UpdateSender};
use crate::model::ClusterState;

/// A manifest file (or the directory) that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct ManifestError {
    pub file: PathBuf,
    pub reason: String,
}

/// The objects in one manifest file. Any document that fails to parse fails the whole file.
pub fn load_file(path: &Path) -> Result<ClusterState, ManifestError> {
    let bytes = fs::read(path).map_err(|err| ManifestError {
        file: path.to_owned(),
        reason: err.to_string(),
    })?;
    parse_manifests(path, &bytes).map_err(|reason| ManifestError {
        file: path.to_owned(),
        reason,
    })
}

/// A file's length and a 128-bit digest of its bytes (two SipHash-1-3 passes with
/// different keys): equal digests stand for equal content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digest {
    len: usize,
    hash: [u64; 2],
}

impl Digest {
    fn of(bytes: &[u8]) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let pass = |key: u64| {
            // Fixed keys: digests are compared within one process only.
            let mut hasher = std::hash::BuildHasherDefault::<
                std::collections::hash_map::DefaultHasher,
            >::default()
            .build_hasher();
            hasher.write_u64(key);
            hasher.write(bytes);
            hasher.finish()
        };
        Self {
            len: bytes.len(),
            hash: [pass(0x9e37_79b9_7f4a_7c15), pass(0xc2b2_ae3d_27d4_eb4f)],
        }
    }
}

/// A manifest directory, remembering the last good content of each file.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// Why the directory could not be listed last round, so it is reported once.
    dir_error: Option<String>,
    /// Files that could not be read last round, and why, so each is reported once.
    read_errors: BTreeMap<PathBuf, String>,
}

struct CachedFile {
    /// Digest of the bytes read last round, to notice any change (even within one mtime
    /// tick) without keeping a copy of every file (80 MiB at 50 000 services).
    digest: Digest,
    /// The last content that parsed, and its objects; in force while the file is broken.
    good: Option<GoodContent>,
}

struct GoodContent {
    digest: Digest,
    objects: ClusterState,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            dir_error: None,
            read_errors: BTreeMap::new(),
        }
    }

    /// Re-reads the directory. Returns the merged objects of all files (sorted by
    /// namespace/name) and the errors that are new this round: a file that stays broken
    /// and unchanged is reported only once.
    pub fn reload(&mut self) -> (ClusterState, Vec<ManifestError>) {
        let (_, errors) = self.refresh();
        (self.merged(), errors)
    }

    /// Re-reads the directory. Returns whether the merged state may have changed, and the
    /// errors that are new this round.
    fn refresh(&mut self) -> (bool, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let paths = match manifest_paths(&self.dir) {
            Ok(paths) => {
                self.dir_error = None;
                paths
            }
            Err(err) => {
                // Keep every file's objects: a vanished or unreadable directory is far more
                // likely a mount hiccup than a request to delete every service.
                let reason =
                    format!("cannot list manifest directory: {err}; keeping the last state");
                if self.dir_error.as_ref() != Some(&reason) {
                    errors.push(ManifestError {
                        file: self.dir.clone(),
                        reason: reason.clone(),
                    });
                    self.dir_error = Some(reason);
                }
                return (false, errors);
            }
        };

        let mut changed = false;
        let mut present = BTreeMap::new();
        let mut read_errors = BTreeMap::new();
        for path in paths {
            let bytes = match read_limited(&path) {
                Ok(bytes) => bytes,
                // Deleted between listing and reading: gone, like an unlisted file.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => {
                    // Unreadable this round (permissions?): keep whatever it had.
                    let reason = err.to_string();
                    if self.read_errors.get(&path) != Some(&reason) {
                        errors.push(ManifestError {
                            file: path.clone(),
                            reason: reason.clone(),
                        });
                    }
                    read_errors.insert(path.clone(), reason);
                    if let Some(cached) = self.files.remove(&path) {
                        present.insert(path, cached);
                    }
                    continue;
                }
            };
            let digest = Digest::of(&bytes);
            let cached = match self.files.remove(&path) {
                Some(cached) if cached.digest == digest => cached,
                previous => {
                    let previous_good = previous.and_then(|cached| cached.good);
                    let good = match parse_manifests(&path, &bytes) {
                        Ok(objects) => {
                            changed |= previous_good
                                .as_ref()
                                .is_none_or(|good| good.digest != digest);
                            Some(GoodContent { digest, objects })
                        }
                        Err(reason) => {
                            errors.push(ManifestError {
                                file: path.clone(),
                                reason,
                            });
                            previous_good
                        }
                    };
                    CachedFile { digest, good }
                }
            };
            present.insert(path, cached);
        }
        // Whatever is left was deleted (or renamed to something that is not a manifest).
        changed |= self.files.values().any(|cached| cached.good.is_some());
        self.files = present;
        self.read_errors = read_errors;
        (changed, errors)
    }

    /// The objects of every file's last good content, sorted by namespace/name. Equal
    /// names keep file-name order, so the result does not depend on directory order.
    fn merged(&self) -> ClusterState {
        let mut merged = ClusterState::default();
        for good in self
            .files
            .values()
            .filter_map(|cached| cached.good.as_ref())
        {
            merged
                .services
                .extend(good.objects.services.iter().cloned());
            merged
                .endpoint_slices
                .extend(good.objects.endpoint_slices.iter().cloned());
            merged.nodes.extend(good.objects.nodes.iter().cloned());
        }
        sort_objects(&mut merged);
        merged
    }
}

/// Polls `dir` every `poll` and publishes the merged state as a snapshot whenever it
/// changes (and once at start); the agent's view finds what changed. Returns when the
/// receiver is gone.
pub async fn watch(dir: PathBuf, poll: Duration, tx: UpdateSender) -> anyhow::Result<()> {
    let metadata = tokio::fs::metadata(&dir)
        .await
        .with_context(|| format!("manifest directory {}", dir.display()))?;
    anyhow::ensure!(
        metadata.is_dir(),
        "manifest directory {} is not a directory",
        dir.display()
    );

    let mut manifests = ManifestDir::new(dir);
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first_round = true;
    loop {
        ticker.tick().await;
        // Reading files blocks; keep it off the async workers.
        let (returned, changed, errors) = tokio::task::spawn_blocking(move || {
            let (changed, errors) = manifests.refresh();
            (manifests, changed, errors)
        })
        .await
        .context("manifest reader task failed")?;
        manifests = returned;

        for error in &errors {
            warn!(file = %error.file.display(), reason = %error.reason, "manifest not applied");
        }
        if changed || first_round {
            first_round = false;
            if tx.send(SourceUpdate::Snapshot(manifests.merged())).is_err() {
                return Ok(());
            }
        } else if tx.is_closed() {
            return Ok(());
        }
    }
}

/// A manifest file larger than this is not read (the API server itself refuses requests over
/// 3 MiB): an accident (a log, a dump) must not take the agent's memory.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// The file's bytes, or an error for a file over [`MAX_MANIFEST_BYTES`] (checked before
/// reading; the read itself is bounded too, in case the file grows meanwhile).
fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let too_large = |len: u64| {
        io::Error::other(format!(
            "{len} bytes, more than the {} MiB a manifest file may have; the file's last good \
             content stays applied",
            MAX_MANIFEST_BYTES >> 20
        ))
    };
    let file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_MANIFEST_BYTES {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Manifest files directly in `dir`, in name order.
fn manifest_paths(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let is_manifest_name = !name.starts_with('.')
            && path
                .extension()
                .and_then(|ext| ext.to_str())
                .is_some_and(|ext| {
                    ["yaml", "yml", "json"]
                        .iter()
                        .any(|known| ext.eq_ignore_ascii_case(known))
                });
        // `fs::metadata` follows symlinks, as in a mounted ConfigMap.
        if is_manifest_name && fs::metadata(&path).is_ok_and(|meta| meta.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The objects of one file's content. Errors name the document (counted from 1).
fn parse_manifests(path: &Path, bytes: &[u8]) -> Result<ClusterState, String> {
    let is_json = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
    // Both document iterators keep yielding the same error after a syntax error, so
    // stop at the first one.
    let documents: Box<dyn Iterator<Item = Result<Value, String>>> = if is_json {
        Box::new(
            serde_json::Deserializer::from_slice(bytes)
                .into_iter::<Value>()
                .map(|document| document.map_err(|err| err.to_string())),
        )
    } else {
        Box::new(
            serde_yaml::Deserializer::from_slice(bytes)
                .map(|document| Value::deserialize(document).map_err(|err| err.to_string())),
        )
    };

    let mut objects = ClusterState::default();
    for (index, document) in documents.enumerate() {
        let number = index + 1;
        let document = document.map_err(|err| format!("document {number}: {err}"))?;
        // An empty YAML document (a stray `---`) holds nothing.
        if document.is_null() {
            continue;
        }
        add_object(&mut objects, document, None)
            .map_err(|err| format!("document {number}: {err}"))?;
    }
    sort_objects(&mut objects);
    Ok(objects)
}

/// Adds one object (or the items of a list) to `objects`. `item_of` is the item kind of
/// the enclosing typed list (`ServiceList` items may omit apiVersion and kind).
fn add_object(
    objects: &mut ClusterState,
    object: Value,
    item_of: Option<(&str, &str)>,
) -> Result<(), String> {
    let Value::Object(fields) = &object else {
        return Err("not a Kubernetes object (expected a mapping)".into());
    };
    let text = |field: &str| fields.get(field).and_then(Value::as_str);
    let (api_version, kind) = match (text("apiVersion"), text("kind"), item_of) {
        (Some(api_version), Some(kind), _) => (api_version.to_owned(), kind.to_owned()),
        (None, None, Some((api_version, kind))) => (api_version.to_owned(), kind.to_owned()),
        (_, None, _) => return Err("no kind".into()),
        (None, Some(_), _) => return Err("no apiVersion".into()),
    };
    let (api_version, kind) = (api_version.as_str(), kind.as_str());

    let list_item = match (api_version, kind) {
        ("v1", "List") => Some(None),
        ("v1", "ServiceList") => Some(Some(("v1", "Service"))),
        ("discovery.k8s.io/v1", "EndpointSliceList") => {
            Some(Some(("discovery.k8s.io/v1", "EndpointSlice")))
        }
        ("v1", "NodeList") => Some(Some(("v1", "Node"))),
        _ => None,
    };
    if let Some(item_of) = list_item {
        let items = match object {
            Value::Object(mut fields) => fields.remove("items"),
            _ => None,
        };
        let items = match items {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(format!("{kind}: items is not a list")),
        };
        for (index, item) in items.into_iter().enumerate() {
            add_object(objects, item, item_of)
                .map_err(|err| format!("{kind} item {}: {err}", index + 1))?;
        }
        return Ok(());
    }

    let what = format!("{kind} {}", describe_name(fields));
    match (api_version, kind) {
        ("v1", "Service") => {
            let mut service: Service = from_value(object, &what)?;
            default_namespace(&mut service.metadata);
            objects.services.push(service);
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let mut slice: EndpointSlice = from_value(object, &what)?;
            default_namespace(&mut slice.metadata);
            objects.endpoint_slices.push(slice);
        }
        ("v1", "Node") => objects.nodes.push(from_value(object, &what)?),
        _ => debug!(
            api_version,
            kind, "ignoring manifest of a kind xlb does not use"
        ),
    }
    Ok(())
}

fn from_value<T: serde::de::DeserializeOwned>(object: Value, what: &str) -> Result<T, String> {
    serde_json::from_value(object).map_err(|err| format!("{what}: {err}"))
}

/// `namespace/name` (or what of it is there) for error messages.
fn describe_name(fields: &serde_json::Map<String, Value>) -> String {
    let metadata = fields.get("metadata");
    let field = |name: &str| {
        metadata
            .and_then(|metadata| metadata.get(name))
            .and_then(Value::as_str)
    };
    match (field("namespace"), field("name")) {
        (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
        (None, Some(name)) => name.to_string(),
        (_, None) => "(unnamed)".to_string(),
    }
}

/// Namespaced objects without a namespace go to `default`, as `kubectl apply` would put them.
fn default_namespace(metadata: &mut ObjectMeta) {
    if metadata.namespace.as_deref().is_none_or(str::is_empty) {
        metadata.namespace = Some("default".into());
    }
}

/// Sorts by namespace/name (nodes by name); a stable sort, so equal names keep their order.
fn sort_objects(objects: &mut ClusterState) {
    fn id(metadata: &ObjectMeta) -> (Option<&str>, Option<&str>) {
        (metadata.namespace.as_deref(), metadata.name.as_deref())
    }
    objects
        .services
        .sort_by(|a, b| id(&a.metadata).cmp(&id(&b.metadata)));
    objects
        .endpoint_slices
        .sort_by(|a, b| id(&a.metadata).cmp(&id(&b.metadata)));
    objects
        .nodes
        .sort_by(|a, b| id(&a.metadata).cmp(&id(&b.metadata)));
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "xlb-manifests-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        fn write(&self, name: &str, content: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, content).expect("write manifest");
            path
        }

        fn remove(&self, name: &str) {
            fs::remove_file(self.0.join(name)).expect("remove manifest");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const WEB_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: http
";

    const WEB_SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
  nodeName: node-a
";

    fn service_yaml(name: &str, cluster_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {cluster_ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    fn names(state: &ClusterState) -> Vec<String> {
        let services = state
            .services
            .iter()
            .map(|s| format!("Service {}", s.metadata.name.as_deref().unwrap_or("")));
        let slices = state
            .endpoint_slices
            .iter()
            .map(|s| format!("EndpointSlice {}", s.metadata.name.as_deref().unwrap_or("")));
        let nodes = state
            .nodes
            .iter()
            .map(|n| format!("Node {}", n.metadata.name.as_deref().unwrap_or("")));
        services.chain(slices).chain(nodes).collect()
    }

    #[test]
    fn multi_document_yaml_file_yields_every_object() {
        let dir = TempDir::new();
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n";
        let path = dir.write(
            "web.yaml",
            &format!("---\n{WEB_SERVICE}---\n{WEB_SLICE}---\n{node}---\n"),
        );
        let state = load_file(&path).expect("valid file");
        assert_eq!(
            names(&state),
            ["Service web", "EndpointSlice web-abc12", "Node node-a"]
        );
        let slice = &state.endpoint_slices[0];
        assert_eq!(
            slice.endpoints.as_ref().unwrap()[0].addresses,
            ["10.244.1.5"]
        );
    }

    #[test]
    fn json_list_and_typed_lists_are_unpacked() {
        let dir = TempDir::new();
        let list = serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.2"}},
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.1"}},
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ignored"}},
            ],
        });
        let path = dir.write("all.json", &list.to_string());
        assert_eq!(
            names(&load_file(&path).unwrap()),
            ["Service a", "Service b"]
        );

        // As the API returns typed lists: items without apiVersion/kind.
        let typed = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSliceList\nitems:\n\
                     - metadata: {name: web-1, namespace: default}\n  addressType: IPv4\n  endpoints: []\n";
        let path = dir.write("slices.yml", typed);
        assert_eq!(names(&load_file(&path).unwrap()), ["EndpointSlice web-1"]);
    }

    #[test]
    fn missing_namespace_defaults_to_default() {
        let dir = TempDir::new();
        let path = dir.write(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n",
        );
        let state = load_file(&path).unwrap();
        assert_eq!(
            state.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn other_kinds_and_non_manifest_files_are_ignored() {
        let dir = TempDir::new();
        dir.write(
            "mixed.yaml",
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n{WEB_SERVICE}---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {{name: old}}\n"),
        );
        dir.write("README.md", "not a manifest");
        dir.write(".hidden.yaml", &service_yaml("hidden", "10.96.0.9"));
        dir.write("backup.yaml~", &service_yaml("backup", "10.96.0.8"));
        fs::create_dir(dir.0.join("sub.yaml")).unwrap();
        fs::write(
            dir.0.join("sub.yaml").join("nested.yaml"),
            service_yaml("nested", "10.96.0.7"),
        )
        .unwrap();

        let (state, errors) = ManifestDir::new(&dir.0).reload();
        assert_eq!(errors, vec![]);
        assert_eq!(names(&state), ["Service web"]);
    }

    #[test]
    fn malformed_file_keeps_last_good_state_and_reports_file_and_reason_once() {
        let dir = TempDir::new();
        dir.write("web.yaml", WEB_SERVICE);
        dir.write("other.yaml", &service_yaml("other", "10.96.0.20"));
        let mut manifests = ManifestDir::new(&dir.0);
        let (before, errors) = manifests.reload();
        assert!(errors.is_empty());
        assert_eq!(names(&before), ["Service other", "Service web"]);

        // Second document is broken: the whole file keeps its previous objects.
        let path = dir.write(
            "web.yaml",
            &format!(
                "{}---\nkind: Service\napiVersion: v1\nspec: [unclosed\n",
                service_yaml("web", "10.96.0.99")
            ),
        );
        let (during, errors) = manifests.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].file, path);
        assert!(
            errors[0].reason.starts_with("document 2: "),
            "{}",
            errors[0].reason
        );
        assert!(errors[0]
            .to_string()
            .starts_with(&format!("{}: document 2: ", path.display())));
        assert_eq!(names(&during), names(&before));
        assert_eq!(
            during.services[1]
                .spec
                .as_ref()
                .unwrap()
                .cluster_ip
                .as_deref(),
            Some("10.96.0.10")
        );

        // Unchanged and still broken: not reported again.
        let (_, errors) = manifests.reload();
        assert!(errors.is_empty(), "{errors:?}");

        // Fixed: the new content replaces the old.
        dir.write("web.yaml", &service_yaml("web", "10.96.0.99"));
        let (after, errors) = manifests.reload();
        assert!(errors.is_empty());
        assert_eq!(
            after.services[1]
                .spec
                .as_ref()
                .unwrap()
                .cluster_ip
                .as_deref(),
            Some("10.96.0.99")
        );
    }

    #[test]
    fn object_that_does_not_fit_its_type_fails_the_file() {
        let dir = TempDir::new();
        let path = dir.write("bad.yaml", &format!("{WEB_SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: x}}\nspec: {{ports: [{{port: eighty}}]}}\n"));
        let error = load_file(&path).unwrap_err();
        assert!(
            error.reason.starts_with("document 2: Service x: "),
            "{}",
            error.reason
        );
    }

    #[test]
    fn deleted_file_removes_its_objects() {
        let dir = TempDir::new();
        dir.write("web.yaml", WEB_SERVICE);
        dir.write("slice.yaml", WEB_SLICE);
        let mut manifests = ManifestDir::new(&dir.0);
        assert_eq!(
            names(&manifests.reload().0),
            ["Service web", "EndpointSlice web-abc12"]
        );
        dir.remove("slice.yaml");
        let (state, errors) = manifests.reload();
        assert!(errors.is_empty());
        assert_eq!(names(&state), ["Service web"]);
    }

    #[test]
    fn same_size_edit_is_noticed() {
        let dir = TempDir::new();
        dir.write("web.yaml", &service_yaml("web", "10.96.0.10"));
        let mut manifests = ManifestDir::new(&dir.0);
        manifests.reload();
        // Same length, likely the same mtime tick.
        dir.write("web.yaml", &service_yaml("web", "10.96.0.11"));
        let (changed, _) = manifests.refresh();
        assert!(changed);
        let state = manifests.merged();
        assert_eq!(
            state.services[0]
                .spec
                .as_ref()
                .unwrap()
                .cluster_ip
                .as_deref(),
            Some("10.96.0.11")
        );
        assert!(!manifests.refresh().0, "nothing changed since");
    }

    #[test]
    fn merged_state_is_sorted_and_independent_of_file_names() {
        let first = TempDir::new();
        first.write(
            "1.yaml",
            &format!(
                "{}---\n{}",
                service_yaml("zeta", "10.96.0.3"),
                service_yaml("alpha", "10.96.0.1")
            ),
        );
        first.write("2.yaml", &service_yaml("mid", "10.96.0.2"));
        let second = TempDir::new();
        second.write("a.yaml", &service_yaml("mid", "10.96.0.2"));
        second.write(
            "b.yaml",
            &format!(
                "{}---\n{}",
                service_yaml("alpha", "10.96.0.1"),
                service_yaml("zeta", "10.96.0.3")
            ),
        );

        let (from_first, _) = ManifestDir::new(&first.0).reload();
        let (from_second, _) = ManifestDir::new(&second.0).reload();
        assert_eq!(
            names(&from_first),
            ["Service alpha", "Service mid", "Service zeta"]
        );
        assert_eq!(
            serde_json::to_string(&from_first.services).unwrap(),
            serde_json::to_string(&from_second.services).unwrap()
        );
    }

    #[test]
    fn vanished_directory_keeps_last_state_and_is_reported_once() {
        let dir = TempDir::new();
        dir.write("web.yaml", WEB_SERVICE);
        let mut manifests = ManifestDir::new(&dir.0);
        manifests.reload();
        fs::remove_dir_all(&dir.0).unwrap();
        let (state, errors) = manifests.reload();
        assert_eq!(names(&state), ["Service web"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, dir.0);
        assert!(manifests.reload().1.is_empty());
    }

    #[test]
    fn oversized_file_is_reported_and_keeps_its_last_good_content() {
        let dir = TempDir::new();
        let path = dir.write("web.yaml", WEB_SERVICE);
        let mut manifests = ManifestDir::new(&dir.0);
        assert_eq!(names(&manifests.reload().0), ["Service web"]);
        // Grown past the limit (sparse: no disk used).
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
        let (state, errors) = manifests.reload();
        assert_eq!(names(&state), ["Service web"], "last good content kept");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].file, path);
        assert!(
            errors[0].reason.contains("more than the 16 MiB"),
            "{}",
            errors[0].reason
        );
    }

    #[tokio::test]
    async fn watch_publishes_at_start_and_on_change_only() {
        let dir = TempDir::new();
        dir.write("web.yaml", WEB_SERVICE);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(watch(dir.0.clone(), Duration::from_millis(10), tx));

        let wait = Duration::from_secs(5);
        let mut next = async || match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(SourceUpdate::Snapshot(state))) => state,
            other => panic!("expected a snapshot, got {other:?}"),
        };
        assert_eq!(names(&next().await), ["Service web"]);

        dir.write("slice.yaml", WEB_SLICE);
        // Unchanged files publish nothing: the next update is the one for the new file.
        assert_eq!(
            names(&next().await),
            ["Service web", "EndpointSlice web-abc12"]
        );

        drop(rx);
        tokio::time::timeout(wait, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn watch_fails_on_missing_directory() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let missing = std::env::temp_dir().join("xlb-manifests-test-does-not-exist");
        assert!(watch(missing, Duration::from_millis(10), tx).await.is_err());
    }
}
