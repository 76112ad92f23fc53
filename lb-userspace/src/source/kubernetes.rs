//! Cluster state from the Kubernetes API: reflectors on Services, EndpointSlices and
//! Nodes, published as one whole snapshot after the initial lists, then as the watch
//! events themselves (so that one endpoint change costs one service's work downstream).
//!
//! Safety rules, because the agent deletes whatever a snapshot does not contain:
//! - nothing is published until the initial lists of all three kinds have completed;
//! - a re-list (after 410 Gone, or a reconnect the server cannot resume) replaces a
//!   kind's store atomically when it completes, so objects deleted while we were not
//!   watching disappear and a half-done re-list is never visible.
//!
//! The stores are kube's reflector stores: `Init` starts buffering, `InitDone` swaps the
//! buffer in. We only read them after an event has been applied.
use std::{path::Path, pin::Pin, time::Duration};

use anyhow::Context;
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Resource, ResourceExt,
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{SourceUpdate, UpdateSender};
use crate::model::{ClusterState, ObjectChange, ObjectKey};

/// Services kube-proxy skips: handled by another proxy, or headless (no cluster IP).
pub const SERVICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// EndpointSlices kube-proxy skips, for the same reasons.
pub const ENDPOINT_SLICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// Changes are coalesced: at most one publication per this interval.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// A client from `kubeconfig` when given, else inferred: `KUBECONFIG` or
/// `~/.kube/config`, then the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API configuration: not in a cluster (no service account / \
             KUBERNETES_SERVICE_HOST) and no usable kubeconfig (KUBECONFIG, ~/.kube/config); \
             give a kubeconfig explicitly",
        )?,
    };
    let url = config.cluster_url.clone();
    kube::Client::try_from(config)
        .with_context(|| format!("creating a Kubernetes client for {url}"))
}

/// Watches Services, EndpointSlices and Nodes. Publishes one whole snapshot when the
/// initial lists of all three have completed (and again after any re-list), and the watch
/// events in between as changes, at most one batch every `PUBLISH_INTERVAL`. Watch errors
/// are logged and retried with the watcher's default backoff. Returns when the receiver
/// is gone.
pub async fn watch(client: kube::Client, tx: UpdateSender) -> anyhow::Result<()> {
    let (services, writer) = reflector::store();
    let mut service_events = Box::pin(reflect::<Service>(
        Api::all(client.clone()),
        watcher_config(Some(SERVICE_LABEL_SELECTOR)),
        writer,
    ));
    let (slices, writer) = reflector::store();
    let mut slice_events = Box::pin(reflect::<EndpointSlice>(
        Api::all(client.clone()),
        watcher_config(Some(ENDPOINT_SLICE_LABEL_SELECTOR)),
        writer,
    ));
    let (nodes, writer) = reflector::store();
    let mut node_events = Box::pin(reflect::<Node>(
        Api::all(client),
        watcher_config(None),
        writer,
    ));

    let mut synced = Synced::default();
    // A list completed: the next publication is a whole snapshot.
    let mut listed = false;
    let mut pending: Vec<ObjectChange> = Vec::new();
    let mut published_once = false;
    let mut last_published: Option<Instant> = None;
    loop {
        let ready = synced.all();
        let due = listed || !pending.is_empty();
        let publish_at = last_published.map_or_else(Instant::now, |at| at + PUBLISH_INTERVAL);
        tokio::select! {
            event = next(&mut service_events) => {
                listed |= handle("Service", event, &mut synced.services, &mut pending)?;
            }
            event = next(&mut slice_events) => {
                listed |= handle("EndpointSlice", event, &mut synced.endpoint_slices, &mut pending)?;
            }
            event = next(&mut node_events) => {
                listed |= handle("Node", event, &mut synced.nodes, &mut pending)?;
            }
            _ = tokio::time::sleep_until(publish_at), if due && ready => {
                let update = if listed {
                    // The snapshot holds every pending change too.
                    pending.clear();
                    listed = false;
                    let state = snapshot(&services, &slices, &nodes);
                    if !published_once {
                        info!(
                            services = state.services.len(),
                            endpoint_slices = state.endpoint_slices.len(),
                            nodes = state.nodes.len(),
                            "initial Kubernetes state listed"
                        );
                        published_once = true;
                    }
                    SourceUpdate::Snapshot(state)
                } else {
                    SourceUpdate::Changes(std::mem::take(&mut pending))
                };
                if tx.send(update).is_err() {
                    return Ok(());
                }
                last_published = Some(Instant::now());
            }
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Plain list + watch (no streaming list), with bookmarks, so that any API server works.
fn watcher_config(label_selector: Option<&str>) -> watcher::Config {
    let mut config = watcher::Config {
        initial_list_strategy: watcher::InitialListStrategy::ListWatch,
        ..watcher::Config::default()
    };
    if let Some(selector) = label_selector {
        config = config.labels(selector);
    }
    config
}

/// The watch events of one kind, each applied to `writer`'s store before it is yielded.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
) -> impl WatchStreamExt<Item = watcher::Result<watcher::Event<K>>>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    watcher(api, config)
        .modify(|object: &mut K| {
            // Large and never used: keep the cache small.
            object.managed_fields_mut().clear();
            object
                .annotations_mut()
                .remove("kubectl.kubernetes.io/last-applied-configuration");
        })
        .default_backoff()
        .reflect(writer)
}

/// The next item of a stream (the `futures` crate is not a dependency; kube's
/// `WatchStreamExt` brings `Stream` along as its supertrait).
async fn next<S>(stream: &mut Pin<Box<S>>) -> Option<S::Item>
where
    S: WatchStreamExt + ?Sized,
{
    std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await
}

/// Which kinds have completed their initial list.
#[derive(Default)]
struct Synced {
    services: bool,
    endpoint_slices: bool,
    nodes: bool,
}

impl Synced {
    fn all(&self) -> bool {
        self.services && self.endpoint_slices && self.nodes
    }
}

/// A watched kind, as a change to the cluster.
trait Watched: Resource + Sized {
    fn applied(self) -> ObjectChange;
    fn deleted(&self) -> ObjectChange;
}

impl Watched for Service {
    fn applied(self) -> ObjectChange {
        ObjectChange::Service(Box::new(self))
    }
    fn deleted(&self) -> ObjectChange {
        ObjectChange::ServiceDeleted(ObjectKey::of(&self.metadata))
    }
}

impl Watched for EndpointSlice {
    fn applied(self) -> ObjectChange {
        ObjectChange::EndpointSlice(Box::new(self))
    }
    fn deleted(&self) -> ObjectChange {
        ObjectChange::EndpointSliceDeleted(ObjectKey::of(&self.metadata))
    }
}

impl Watched for Node {
    fn applied(self) -> ObjectChange {
        ObjectChange::Node(Box::new(self))
    }
    fn deleted(&self) -> ObjectChange {
        ObjectChange::NodeDeleted(self.metadata.name.clone().unwrap_or_default())
    }
}

/// Notes one watch event (already applied to its store): watch events of a synced kind
/// become pending changes. Returns whether a list just completed (the next publication
/// must then be a whole snapshot).
fn handle<K: Watched>(
    kind: &str,
    event: Option<watcher::Result<watcher::Event<K>>>,
    synced: &mut bool,
    pending: &mut Vec<ObjectChange>,
) -> anyhow::Result<bool> {
    let Some(event) = event else {
        // The watcher retries forever; it only ends if the backoff gives up.
        anyhow::bail!("{kind} watch ended");
    };
    match event {
        Ok(watcher::Event::Apply(object)) => {
            if *synced {
                pending.push(object.applied());
            }
            Ok(false)
        }
        Ok(watcher::Event::Delete(object)) => {
            if *synced {
                pending.push(object.deleted());
            }
            Ok(false)
        }
        Ok(watcher::Event::Init) => {
            if *synced {
                info!(kind, "re-listing");
            }
            Ok(false)
        }
        Ok(watcher::Event::InitApply(_)) => Ok(false),
        Ok(watcher::Event::InitDone) => {
            debug!(kind, "list complete");
            *synced = true;
            Ok(true)
        }
        Err(err) => {
            warn!(kind, error = %err, "watch failed; retrying");
            Ok(false)
        }
    }
}

/// The stores' contents, sorted by namespace/name.
fn snapshot(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    nodes: &Store<Node>,
) -> ClusterState {
    ClusterState {
        services: sorted(services),
        endpoint_slices: sorted(slices),
        nodes: sorted(nodes),
    }
}

fn sorted<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn id(metadata: &ObjectMeta) -> (Option<&str>, Option<&str>) {
        (metadata.namespace.as_deref(), metadata.name.as_deref())
    }
    let mut objects: Vec<K> = store
        .state()
        .into_iter()
        .map(|object| (*object).clone())
        .collect();
    objects.sort_by(|a, b| id(a.meta()).cmp(&id(b.meta())));
    objects
}
