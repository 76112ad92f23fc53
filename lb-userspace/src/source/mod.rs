//! Where cluster state comes from: a directory of manifests (standalone mode) or the
//! Kubernetes API. Both publish [`SourceUpdate`]s (whole snapshots, or changes to the
//! last one); they never compute datapath state themselves.
pub mod kubernetes;
pub mod manifests;

use crate::model::{ClusterState, ObjectChange};

/// What a source tells the agent, in order.
#[derive(Clone, Debug)]
pub enum SourceUpdate {
    /// Everything there is: objects not in it are gone (a first list, a re-list, a
    /// manifest directory read again).
    Snapshot(ClusterState),
    /// Watch events since the last update.
    Changes(Vec<ObjectChange>),
}

impl SourceUpdate {
    /// Applies this update to a copy of the cluster (for tools and tests that want the
    /// objects rather than the datapath state).
    pub fn apply_to(self, cluster: &mut ClusterState) {
        match self {
            SourceUpdate::Snapshot(state) => *cluster = state,
            SourceUpdate::Changes(changes) => {
                for change in changes {
                    cluster.apply(change);
                }
            }
        }
    }
}

pub type UpdateSender = tokio::sync::mpsc::UnboundedSender<SourceUpdate>;
pub type UpdateReceiver = tokio::sync::mpsc::UnboundedReceiver<SourceUpdate>;
