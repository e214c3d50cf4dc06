//! CRC32C (Castagnoli) checksums of request and response payloads, as Cloud KMS has them:
//! a client sends the checksum of what it sends and checks the one of what it gets back.

/// The CRC32C (Castagnoli, iSCSI polynomial) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    CASTAGNOLI.checksum(data)
}

/// Checks an optional client checksum of `field`: `Ok(true)` if given and matching,
/// `Ok(false)` if not given, and the refusal (naming the field) if it does not match.
pub fn verify(field: &str, data: &[u8], given: Option<u32>) -> Result<bool, String> {
    match given {
        None => Ok(false),
        Some(c) if c == crc32c(data) => Ok(true),
        Some(_) => Err(format!(
            "{field}_crc32c checksum mismatch: the {field} was corrupted in transit or the checksum is wrong"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // RFC 3720 B.4 check value and the standard "123456789" check.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn a_checksum_is_verified_only_when_given() {
        assert_eq!(verify("plaintext", b"abc", None), Ok(false));
        assert_eq!(verify("plaintext", b"abc", Some(crc32c(b"abc"))), Ok(true));
        let e = verify("plaintext", b"abc", Some(crc32c(b"abd"))).unwrap_err();
        assert!(e.contains("plaintext_crc32c checksum mismatch"), "{e}");
    }
}
