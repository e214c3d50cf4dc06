//! The Continuity node agent (attests workloads, serves the SPIFFE Workload API).
//!
//! Not built yet: the agent arrives with its own issue. This crate exists so the workspace
//! layout of DESIGN.md §1 is in place from the start.
#![forbid(unsafe_code)]
