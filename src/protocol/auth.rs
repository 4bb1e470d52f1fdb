//! The handshake that opens every client connection, as pp clients expect:
//!
//! 1. server -> client: the pp version string (clients require an exact match);
//! 2. server -> client: a random nonce of ASCII letters;
//! 3. client -> server: `sha1(nonce + secret)` as 40 lowercase hex digits;
//! 4. server -> client: `OK`, or `FAILED` and the connection is closed;
//! 5. client -> server: the connection type, `STAT` or `EXEC`.
//!
//! A wrong answer in step 3 is answered with `FAILED` only after a delay
//! that grows with the recent failures from the peer's address (the login
//! throttle, [`crate::front::login`]); right answers are never delayed.
//!
//! This module holds the pure parts (nonce, digest, comparison); the
//! session drives the exchange on the socket and waits.

use sha1::{Digest, Sha1};

/// The secret pp clients use when they are given none (pathos never passes
/// one), so a server started without `-s` must accept it.
pub const DEFAULT_SECRET: &str = "epo20pdosl;dksldkmm";

/// Nonce length. ppft sends 16 letters (about 91 bits); 24 give more than
/// 128 bits and every client accepts any ASCII string.
pub(crate) const NONCE_LEN: usize = 24;

const LETTERS: &[u8; 52] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A fresh nonce of ASCII letters drawn from the OS random source.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN], getrandom::Error> {
    let mut out = [0u8; NONCE_LEN];
    let mut filled = 0;
    let mut pool = [0u8; 64];
    while filled < NONCE_LEN {
        getrandom::getrandom(&mut pool)?;
        // Rejection sampling: 208 = 4 * 52, so every letter is equally likely.
        for &b in pool.iter().filter(|&&b| b < 208) {
            if filled == NONCE_LEN {
                break;
            }
            out[filled] = LETTERS[(b % 52) as usize];
            filled += 1;
        }
    }
    Ok(out)
}

/// The answer a client holding `secret` gives for `nonce`: the lowercase hex
/// sha1 of the two concatenated.
pub fn expected_answer(nonce: &[u8], secret: &[u8]) -> [u8; 40] {
    let digest = Sha1::new()
        .chain_update(nonce)
        .chain_update(secret)
        .finalize();
    let mut hex = [0u8; 40];
    crate::protocol::hex::encode_into(&digest, &mut hex);
    hex
}

/// Compares a client's answer with the expected one in time that does not
/// depend on where they differ, so the answer cannot be guessed byte by byte.
/// (Only the length, always 40 for a real client, ends it early.) Every
/// byte pair is folded into one accumulator, read once at the end; the
/// `black_box` on each byte keeps the optimizer from turning the fold into
/// an early-exit comparison.
pub(crate) fn answer_matches(expected: &[u8; 40], got: &[u8]) -> bool {
    if got.len() != expected.len() {
        return false;
    }
    let diff = expected
        .iter()
        .zip(got)
        .fold(0u8, |acc, (a, b)| acc | std::hint::black_box(a ^ b));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_matches_python_hashlib() {
        // hashlib.sha1(b"abcdefghijklmnop" + b"epo20pdosl;dksldkmm").hexdigest()
        let got = expected_answer(b"abcdefghijklmnop", DEFAULT_SECRET.as_bytes());
        assert_eq!(&got, b"86c7ecaca7629841eab25d3146c9c9392863007b");
    }

    #[test]
    fn answers_compare_exactly() {
        let e = expected_answer(b"nonce", b"s");
        assert!(answer_matches(&e, &e));
        let mut wrong = e;
        wrong[39] ^= 1;
        assert!(!answer_matches(&e, &wrong));
        assert!(!answer_matches(&e, &e[..39]));
        assert!(!answer_matches(&e, b""));
    }

    #[test]
    fn the_comparison_reads_every_byte_whatever_differs() {
        // Not a timing measurement (too noisy to assert): a check that a
        // difference in the first byte and one in the last give the same
        // answer through the same path, and that equal lengths are needed.
        let e = expected_answer(b"n", b"s");
        for i in [0, 20, 39] {
            let mut wrong = e;
            wrong[i] ^= 0x20;
            assert!(!answer_matches(&e, &wrong), "{i}");
        }
        let mut longer = e.to_vec();
        longer.push(b'0');
        assert!(!answer_matches(&e, &longer));
    }

    #[test]
    fn nonce_is_letters_and_varies() {
        let a = nonce().unwrap();
        let b = nonce().unwrap();
        assert!(a.iter().all(|c| c.is_ascii_alphabetic()));
        assert_ne!(a, b);
    }
}
