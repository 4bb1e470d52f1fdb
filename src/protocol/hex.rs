//! Lowercase hex, as Python's `hexdigest()` writes it; the handshake answer
//! and package hashes are both hex digests.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes the lowercase hex of `bytes` into `out`, which must be twice as long.
pub fn encode_into(bytes: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), bytes.len() * 2);
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_lowercase() {
        let mut out = [0u8; 6];
        super::encode_into(&[0x00, 0xab, 0xf1], &mut out);
        assert_eq!(&out, b"00abf1");
    }
}
