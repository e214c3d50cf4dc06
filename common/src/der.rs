//! The few DER encodings Continuity needs by hand: ECDSA signatures in both forms
//! (X.509 wants ASN.1 DER, JWS and PKCS#11 use fixed-width r‖s), and RSA public keys.

/// A DER structure that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed DER: {0}")]
pub struct DerError(pub &'static str);

/// Appends a DER length.
fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Encodes one TLV.
pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    out.push(tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// Encodes an unsigned big-endian integer as a DER INTEGER.
pub fn uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed = {
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        &bytes[skip.min(bytes.len().saturating_sub(1))..]
    };
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    if content.is_empty() {
        content.push(0);
    }
    tlv(0x02, &content)
}

/// Reads one TLV, returning (tag, content, rest).
pub fn read_tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), DerError> {
    let (&tag, rest) = input.split_first().ok_or(DerError("truncated tag"))?;
    let (&first, rest) = rest.split_first().ok_or(DerError("truncated length"))?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(DerError("bad length"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(DerError("content shorter than its length"));
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// Converts a fixed-width ECDSA signature (r‖s) to ASN.1 DER `SEQUENCE { r, s }`.
pub fn ecdsa_fixed_to_der(sig: &[u8]) -> Result<Vec<u8>, DerError> {
    if sig.is_empty() || !sig.len().is_multiple_of(2) {
        return Err(DerError("ECDSA r||s must have even, non-zero length"));
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    let mut body = uint(r);
    body.extend(uint(s));
    Ok(tlv(0x30, &body))
}

/// Converts an ASN.1 DER ECDSA signature to fixed-width r‖s with `width` bytes per half.
pub fn ecdsa_der_to_fixed(sig: &[u8], width: usize) -> Result<Vec<u8>, DerError> {
    let (tag, seq, _) = read_tlv(sig)?;
    if tag != 0x30 {
        return Err(DerError("ECDSA signature is not a SEQUENCE"));
    }
    let mut out = vec![0u8; width * 2];
    let mut rest = seq;
    for half in 0..2 {
        let (tag, int, r) = read_tlv(rest)?;
        if tag != 0x02 {
            return Err(DerError("ECDSA component is not an INTEGER"));
        }
        let skip = int.iter().take_while(|b| **b == 0).count();
        let int = &int[skip..];
        if int.len() > width {
            return Err(DerError("ECDSA component wider than the curve"));
        }
        let end = (half + 1) * width;
        out[end - int.len()..end].copy_from_slice(int);
        rest = r;
    }
    Ok(out)
}

/// Encodes a PKCS#1 `RSAPublicKey { modulus, publicExponent }`.
pub fn rsa_public_key(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let mut body = uint(modulus);
    body.extend(uint(exponent));
    tlv(0x30, &body)
}

/// The modulus and public exponent of a PKCS#1 `RSAPublicKey` (leading zero bytes dropped).
pub fn rsa_parts(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), DerError> {
    let bad = DerError("not a PKCS#1 RSAPublicKey");
    let (0x30, body, []) = read_tlv(der)? else {
        return Err(bad);
    };
    let (0x02, n, rest) = read_tlv(body)? else {
        return Err(bad);
    };
    let (0x02, e, []) = read_tlv(rest)? else {
        return Err(bad);
    };
    let strip = |v: &[u8]| {
        let first = v.iter().position(|b| *b != 0).unwrap_or(v.len());
        v[first..].to_vec()
    };
    Ok((strip(n), strip(e)))
}

/// Unwraps a PKCS#11 CKA_EC_POINT (a DER OCTET STRING around the point) if it is wrapped.
pub fn unwrap_ec_point(value: &[u8]) -> Result<Vec<u8>, DerError> {
    match read_tlv(value) {
        Ok((0x04, point, rest)) if rest.is_empty() && point.first() == Some(&0x04) => {
            Ok(point.to_vec())
        }
        _ if value.first() == Some(&0x04) => Ok(value.to_vec()),
        _ => Err(DerError("EC point is neither raw nor an OCTET STRING")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_round_trip() {
        let mut fixed = vec![0u8; 64];
        fixed[0] = 0x80;
        fixed[31] = 1;
        fixed[63] = 7;
        let der = ecdsa_fixed_to_der(&fixed).unwrap();
        assert_eq!(ecdsa_der_to_fixed(&der, 32).unwrap(), fixed);
    }

    #[test]
    fn long_lengths() {
        let content = vec![1u8; 300];
        let enc = tlv(0x04, &content);
        let (tag, c, rest) = read_tlv(&enc).unwrap();
        assert_eq!((tag, c.len(), rest.len()), (0x04, 300, 0));
    }
}
