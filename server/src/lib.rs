//! The Continuity server: the trust domain's authority.
//!
//! It attests agents, signs short-lived SVIDs with a CA whose keys live in a key manager
//! (memory, disk or PKCS#11), keeps registration entries, and serves two gRPC APIs: the
//! agent API over TLS 1.3 and the admin API on a private Unix socket.
//!
//! Modules, top-down: [`config`] → [`server`] (wiring) → [`api`] (edges) → [`registry`]
//! (in-memory index) / [`ca`] (authority) → [`datastore`] / [`keys`] (persistence); [`entry`]
//! holds the registration entry and its rules, below all of them.
#![forbid(unsafe_code)]
// A unit test reads as one scenario, however long; functions outside tests stay under
// clippy.toml's line limit.
#![cfg_attr(test, allow(clippy::too_many_lines))]

pub mod api;
pub mod audit;
pub mod backup;
pub mod ca;
pub mod cli;
pub mod config;
pub mod controller;
pub mod datastore;
pub mod engines;
pub mod entry;
pub mod federation;
pub mod feed;
pub mod integrity;
pub mod k8s_bundle;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod serving;
pub mod trust_bundle;

pub use config::Config;
pub use server::run;
