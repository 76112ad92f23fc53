//! Cluster state from the Kubernetes API (being written).
