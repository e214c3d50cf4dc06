//! Protocol definitions for Continuity, generated at build time by protox + tonic-prost-build.
//!
//! - [`workload`]: the SPIFFE Workload API, byte-compatible with every SPIFFE client.
//! - [`types`], [`agent`], [`admin`]: Continuity's own `continuity.*.v1` APIs.
//! - [`envoy`], [`google`]: the subset of Envoy's xDS protos (and `google.rpc.Status`) that the
//!   agent's Secret Discovery Service (SDS v3) needs, with Envoy's package names and field numbers.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::all)]

/// The encoded `FileDescriptorSet` of every .proto here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/continuity_descriptor.bin"));

// Every module below is generated code (prost/tonic): it is exempt from the size limits the
// hand-written crates keep, so `too_many_lines` (pedantic, outside `clippy::all`) is allowed.

/// The SPIFFE Workload API (the proto has no package, so prost names the file `_`).
#[allow(clippy::too_many_lines)]
pub mod workload {
    tonic::include_proto!("_");
}

/// Continuity's own packages, nested as their proto package names are.
#[allow(clippy::too_many_lines)]
pub mod continuity {
    /// `continuity.types.v1`
    pub mod types {
        pub mod v1 {
            tonic::include_proto!("continuity.types.v1");
        }
    }
    /// `continuity.agent.v1`
    pub mod agent {
        pub mod v1 {
            tonic::include_proto!("continuity.agent.v1");
        }
    }
    /// `continuity.engine.v1`
    pub mod engine {
        pub mod v1 {
            tonic::include_proto!("continuity.engine.v1");
        }
    }
    /// `continuity.admin.v1`
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("continuity.admin.v1");
        }
    }
}

/// The subset of Envoy's protos SDS v3 uses, nested as their proto package names are.
#[allow(clippy::too_many_lines)]
pub mod envoy {
    /// `envoy.config.*`
    pub mod config {
        /// `envoy.config.core`
        pub mod core {
            /// `envoy.config.core.v3`
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.type.*`
    pub mod r#type {
        /// `envoy.type.v3`
        pub mod v3 {
            include!(concat!(env!("OUT_DIR"), "/envoy.r#type.v3.rs"));
        }
    }
    /// `envoy.extensions.*`
    pub mod extensions {
        /// `envoy.extensions.transport_sockets`
        pub mod transport_sockets {
            /// `envoy.extensions.transport_sockets.tls`
            pub mod tls {
                /// `envoy.extensions.transport_sockets.tls.v3`
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
    /// `envoy.service.*`
    pub mod service {
        /// `envoy.service.discovery`
        pub mod discovery {
            /// `envoy.service.discovery.v3`
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        /// `envoy.service.secret`
        pub mod secret {
            /// `envoy.service.secret.v3`
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
}

/// `google.rpc` (only `Status`, for xDS NACKs).
pub mod google {
    /// `google.rpc`
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// The admin API on the server's Unix socket.
pub use continuity::admin::v1 as admin;
/// The agent ↔ server API.
pub use continuity::agent::v1 as agent;
/// Engines: the workload-facing EngineAPI and the agent ↔ server EngineBroker.
pub use continuity::engine::v1 as engine;
/// Types shared by the agent and admin APIs.
pub use continuity::types::v1 as types;
