//! Compiles the .proto files with protox (pure Rust), so no system `protoc` is needed.

/// Workload API messages with `bytes` fields (every one of them is generated as `Bytes`).
const WORKLOAD_BYTES_MESSAGES: [&str; 6] = [
    ".X509SVIDResponse",
    ".X509SVID",
    ".X509BundlesResponse",
    ".JWTBundlesResponse",
    ".WITSVID",
    ".WITBundlesResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/workload.proto",
        "proto/continuity/types/v1/types.proto",
        "proto/continuity/agent/v1/agent.proto",
        "proto/continuity/admin/v1/admin.proto",
        "proto/continuity/admin/v1/federation.proto",
        "proto/continuity/admin/v1/authority.proto",
        "proto/continuity/engine/v1/engine.proto",
        "proto/envoy/service/secret/v3/sds.proto",
        "proto/envoy/extensions/transport_sockets/tls/v3/secret.proto",
        "proto/envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    // The Envoy subset imports these; a change to them must rebuild too.
    println!("cargo:rerun-if-changed=proto/envoy");
    println!("cargo:rerun-if-changed=proto/google");
    let fds = protox::compile(files, ["proto"])?;
    // The descriptor set, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("continuity_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // The Workload API's byte fields are `bytes::Bytes`, so the agent shares each identity's
    // cached chain, key and bundle with every message (a reference count, not a copy). The
    // proto has no package: its messages are named from the root.
    let mut build = tonic_prost_build::configure();
    for m in WORKLOAD_BYTES_MESSAGES {
        build = build.bytes(m);
    }
    build
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
