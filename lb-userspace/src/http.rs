//! /metrics, /healthz, /readyz and the health-check node ports (being written).
