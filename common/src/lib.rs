//! Code shared by the Continuity agent and server.
//!
//! - [`spiffe_id`]: parsed, validated SPIFFE IDs and trust domains.
//! - [`duration`]: "1h"/"5m" durations as config and CLI accept them.
//! - [`der`]: the few DER encodings the key code needs (ECDSA signature forms, RSA public keys).
//! - [`jwk`]: JWKs from SubjectPublicKeyInfo, and the SPIFFE bundle document.
//! - [`endorsement`]: continuity proofs (endorsements of Engine key versions, chain walk).
//! - [`engine_limits`]: EngineAPI payload caps, checked by agent and server alike.
//! - [`tls`]: rustls verifiers that authenticate peers by SPIFFE ID against a trust bundle.
//! - [`clock`]: time as a parameter, so rotation and expiry are testable without sleeping.
//! - [`logging`]: `log_level` / `log_format` set-up.
//! - [`secret`]: key bytes and PINs that are wiped on drop and redacted in `Debug`.
//! - [`rand`]: OS randomness whose failure is an error.
//! - [`selector`]: the selector-set match shared by agent and server.
//! - [`ratelimit`]: per-key token buckets in a bounded table.
//! - [`spire_flags`]: SPIRE's single-dash CLI spellings accepted as aliases.
//! - [`fsperm`]: socket, state and key directories opened without following symlinks and
//!   refused when another user could have made or changed them.
//! - `testing` (hidden): test fixtures such as a throwaway PostgreSQL cluster.
#![forbid(unsafe_code)]
// A unit test reads as one scenario, however long; functions outside tests stay under
// clippy.toml's line limit.
#![cfg_attr(test, allow(clippy::too_many_lines))]

pub mod checksum;
pub mod clock;
pub mod config;
pub mod der;
pub mod duration;
pub mod endorsement;
pub mod engine_limits;
pub mod fsperm;
pub mod grpc;
pub mod http;
pub mod https;
pub mod https_stream;
pub mod jwk;
pub mod jwt;
pub mod logging;
pub mod lru;
pub mod metrics;
pub mod output;
pub mod rand;
pub mod ratelimit;
pub mod secret;
pub mod selector;
pub mod spiffe_id;
pub mod spire_flags;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod x509;

pub use clock::{Clock, ManualClock, SystemClock};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
