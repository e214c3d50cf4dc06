//! The Continuity node agent: attests the workloads on its node and serves them the SPIFFE
//! Workload API over a Unix socket, from a cache it keeps in step with the server — and keeps
//! serving from when the server is down.
//!
//! Modules, top-down: [`config`] → [`agent`] (wiring) → [`endpoints`] (Workload API) /
//! [`manager`] (sync, cache, rotation) → [`client`] (server API) / [`storage`] (data_dir) /
//! [`attestor`] (workload attestation); [`limits`] bounds what a workload can make it hold.
//! Leaves shared by several of those: [`state`] (what is persisted), [`svid`] (building SVIDs),
//! [`peer`] (who is on the other end of a Workload API connection).
#![forbid(unsafe_code)]
// A unit test reads as one scenario, however long; functions outside tests stay under
// clippy.toml's line limit.
#![cfg_attr(test, allow(clippy::too_many_lines))]

pub mod agent;
pub mod attestor;
pub mod cli;
pub mod client;
pub mod config;
pub mod endpoints;
pub mod journal;
pub mod limits;
pub mod manager;
pub mod metrics;
pub mod peer;
pub mod state;
pub mod storage;
pub mod svid;

pub use agent::run;
pub use config::Config;
