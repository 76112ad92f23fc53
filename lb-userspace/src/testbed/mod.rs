//! Network-namespace test cluster (being written).
