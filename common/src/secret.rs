//! Key bytes in memory: wiped when the last holder lets go, never printed.
//!
//! [`SecretBytes`] is what the agent keeps SVID private keys in. It shares one allocation
//! between every holder (cloning is a reference count, so a key served to many workloads is
//! not copied) and overwrites that allocation with zeros when the last clone is dropped. Its
//! `Debug` shows only the length. Copies that leave it — a gRPC message being encoded, a file
//! being written — are outside its reach; keep them short-lived.

use std::fmt;

use bytes::Bytes;

/// Owned secrets (a String, a Vec) that are overwritten with zeros when dropped.
pub use zeroize::{Zeroize, Zeroizing};

/// Shared, immutable secret bytes, zeroized on the last drop and redacted in `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Bytes);

impl SecretBytes {
    /// Takes ownership of `bytes` (no copy); they are wiped when the last clone is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Bytes::from_owner(Zeroizing::new(bytes)))
    }

    /// Copies `bytes` into a new secret (the caller wipes its own copy).
    pub fn copy_from(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The same allocation as a [`Bytes`] (a reference count, no copy), for a message about
    /// to be encoded. It is still wiped when the last holder, these included, drops it; but
    /// `Bytes` shows its contents in `Debug`, so do not keep or log it.
    pub fn share(&self) -> Bytes {
        self.0.clone()
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<redacted, {} bytes>)", self.0.len())
    }
}

/// A secret string (a PIN, a join token) that is wiped on drop and redacted in `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Takes ownership of `s`.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = SecretBytes::new(b"-----BEGIN PRIVATE KEY-----".to_vec());
        let d = format!("{s:?}");
        assert!(!d.contains("PRIVATE"), "{d}");
        assert!(d.contains("27 bytes"), "{d}");
        let p = SecretString::new("1234".into());
        assert!(!format!("{p:?}").contains("1234"));
        assert_eq!(p.expose(), "1234");
    }

    #[test]
    fn clones_share_one_allocation() {
        let s = SecretBytes::new(vec![7; 64]);
        let c = s.clone();
        assert_eq!(s.expose().as_ptr(), c.expose().as_ptr());
        assert_eq!(c.expose(), &[7; 64][..]);
        assert_eq!(s.share().as_ptr(), s.expose().as_ptr());
    }

    #[test]
    fn the_owner_is_dropped_with_the_last_clone() {
        // SecretBytes wipes through its owner's Drop (Zeroizing); check that Bytes runs it
        // exactly when the last clone goes.
        struct Owner(std::sync::Arc<std::sync::atomic::AtomicBool>, Vec<u8>);
        impl AsRef<[u8]> for Owner {
            fn as_ref(&self) -> &[u8] {
                &self.1
            }
        }
        impl Drop for Owner {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let b = Bytes::from_owner(Owner(dropped.clone(), vec![9; 16]));
        let c = b.clone();
        drop(b);
        assert!(
            !dropped.load(std::sync::atomic::Ordering::SeqCst),
            "a clone still holds it"
        );
        drop(c);
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }
}
