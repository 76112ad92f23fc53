//! Manifest directory source (being written).
