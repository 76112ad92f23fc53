//! Desired-state computation (being written).
use super::*;
pub fn desired_state(
    _cluster: &ClusterState,
    _node: &NodeContext,
) -> (DesiredState, Vec<ObjectProblem>) {
    todo!()
}
