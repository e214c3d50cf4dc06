//! Payload sizes the EngineAPI accepts (Cloud KMS's caps, so every custody takes what any
//! does), checked by the agent for a clear answer to its workloads and again by the server,
//! which takes no agent's word for them.

/// Largest Encrypt plaintext.
pub const MAX_PLAINTEXT: usize = 64 * 1024;

/// Largest Decrypt or Rewrap ciphertext: a [`MAX_PLAINTEXT`] plaintext's, with its magic,
/// version, nonce and tag.
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 4 + 4 + 12 + 16;

/// Largest additional authenticated data.
pub const MAX_AAD: usize = 64 * 1024;
