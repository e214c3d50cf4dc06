//! Randomness from the operating system's CSPRNG (through aws-lc-rs). A failure is an error for
//! the caller to handle: a serial number, token or nonce is never made from unfilled bytes.

/// The system random number generator failed to produce bytes.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RngError;

/// Fills `buf` with random bytes.
pub fn fill(buf: &mut [u8]) -> Result<(), RngError> {
    aws_lc_rs::rand::fill(buf).map_err(|_| RngError)
}

/// `N` random bytes.
pub fn array<const N: usize>() -> Result<[u8; N], RngError> {
    let mut b = [0u8; N];
    fill(&mut b)?;
    Ok(b)
}

/// A fraction in [0, 1) for spreading periodic work (jitter). Not for secrets: it comes from
/// the standard library's randomly keyed hasher, which cannot fail.
pub fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_differ_and_jitter_is_a_fraction() {
        let (a, b) = (array::<16>().unwrap(), array::<16>().unwrap());
        assert_ne!(a, b);
        assert_ne!(a, [0; 16]);
        for _ in 0..1000 {
            let j = jitter_fraction();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
