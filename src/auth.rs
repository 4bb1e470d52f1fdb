//! The handshake that opens every client connection, as pp clients expect:
//!
//! 1. server -> client: the pp version string (clients require an exact match);
//! 2. server -> client: a random nonce of ASCII letters;
//! 3. client -> server: `sha1(nonce + secret)` as 40 lowercase hex digits;
//! 4. server -> client: `OK`, or `FAILED` and the connection is closed;
//! 5. client -> server: the connection type, `STAT` or `EXEC`.
//!
//! A wrong answer in step 3 is answered with `FAILED` only after a delay
//! that grows with the recent failures from the peer's address
//! ([`LoginThrottle`]); right answers are never delayed.
//!
//! This module holds the pure parts (nonce, digest, comparison, the delay
//! schedule); the session drives the exchange on the socket and waits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

use crate::allow::host_key;

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
    crate::hex::encode_into(&digest, &mut hex);
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

/// Wrong answers from one address that are answered at once: a user who
/// mistyped the secret, or a client started with the wrong one (each of
/// its connections fails once), is not slowed.
pub(crate) const FREE_FAILURES: u32 = 4;
/// The default longest delay (`--login-delay`). After the free failures
/// the delay doubles from an eighth of the longest up to it, so one address gets about one verdict per longest delay, however
/// many connections it opens at once: 4 guesses a second by default.
pub const DEFAULT_LOGIN_DELAY: Duration = Duration::from_millis(250);
/// Longest `--login-delay` accepted: a minute per guess is plenty, and
/// more would only hold a locked-out address's places for longer.
pub const MAX_LOGIN_DELAY: Duration = Duration::from_secs(60);
/// Failures in the ramp from the first delay to the longest.
const RAMP: u32 = 4;
/// One failure of an address is forgiven per this long.
pub(crate) const FORGIVE_ONE: Duration = Duration::from_secs(10);
/// Failures remembered at most per address: past the ramp, more would
/// only make an address that stopped guessing wait longer to be forgiven
/// (here at most 160 s).
const MAX_FAILURES: u32 = FREE_FAILURES + RAMP + 8;
/// Addresses remembered at most; see [`LoginThrottle::failed`] for which
/// are forgotten first.
const MAX_ADDRESSES: usize = 4096;

/// The delay owed for the `failures`-th recent failure of an address,
/// with `longest` the longest delay.
pub(crate) fn delay_for(failures: u32, longest: Duration) -> Duration {
    match failures.checked_sub(FREE_FAILURES) {
        None | Some(0) => Duration::ZERO,
        Some(over) => longest / (1 << RAMP.saturating_sub(over)),
    }
}

/// Recent failed logins per source address ([`host_key`]), and when each
/// address may next be told it failed.
///
/// Delaying `FAILED` alone would not slow a guesser, who can open many
/// connections at once and take a missing `OK` as the answer. So the
/// delays of one address are served one after another: each failure is
/// told after the one before it, plus its own delay, and its connection
/// keeps its place in the handshake budget (capped per address) until
/// then. One address thus gets at most one verdict per delay, however it
/// spreads its guesses over connections.
#[derive(Debug)]
pub(crate) struct LoginThrottle {
    /// Per address; bounded by [`MAX_ADDRESSES`].
    addresses: Mutex<HashMap<IpAddr, Failures>>,
    /// `--login-delay`: the longest delay; zero turns the delays off.
    longest: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    /// Recent failures, one forgiven per [`FORGIVE_ONE`].
    count: u32,
    /// Since when `count` has been forgiven up to.
    since: Instant,
    /// When the last failure told so far is (or was) told.
    last_told: Instant,
}

impl Failures {
    /// Forgives what the time since `since` has earned.
    fn forgive(&mut self, now: Instant) {
        let periods =
            now.saturating_duration_since(self.since).as_millis() / FORGIVE_ONE.as_millis();
        let periods = u32::try_from(periods).unwrap_or(u32::MAX);
        if periods >= self.count {
            self.count = 0;
            self.since = now;
        } else {
            self.count -= periods;
            self.since += FORGIVE_ONE * periods;
        }
    }

    fn forgotten(&self, now: Instant) -> bool {
        let mut f = *self;
        f.forgive(now);
        f.count == 0 && f.last_told <= now
    }
}

/// What a failed login owes: how long its connection waits before it is
/// told, and the address's recent failures, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Penalty {
    /// How long the connection waits before `FAILED`.
    pub(crate) wait: Duration,
    /// The address's recent failures, this one included.
    pub(crate) failures: u32,
}

impl LoginThrottle {
    /// Delays of up to `longest` each.
    pub(crate) fn new(longest: Duration) -> Self {
        LoginThrottle {
            addresses: Mutex::default(),
            longest,
        }
    }

    /// Records a wrong answer from `ip` at `now`.
    pub(crate) fn failed(&self, ip: IpAddr, now: Instant) -> Penalty {
        let host = host_key(ip);
        // Plain counters and instants: a panic cannot leave them torn.
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if !addresses.contains_key(&host) && addresses.len() >= MAX_ADDRESSES {
            make_room(&mut addresses, now);
        }
        let f = addresses.entry(host).or_insert(Failures {
            count: 0,
            since: now,
            last_told: now,
        });
        f.forgive(now);
        f.count = (f.count + 1).min(MAX_FAILURES);
        let delay = delay_for(f.count, self.longest);
        if delay.is_zero() {
            return Penalty {
                wait: Duration::ZERO,
                failures: f.count,
            };
        }
        f.last_told = f.last_told.max(now) + delay;
        Penalty {
            wait: f.last_told - now,
            failures: f.count,
        }
    }
}

/// Forgets the addresses that owe nothing any more; if that frees no room,
/// the one with the fewest failures (the least likely guesser), so a flood
/// from many addresses cannot wipe the record of the busiest one.
fn make_room(addresses: &mut HashMap<IpAddr, Failures>, now: Instant) {
    addresses.retain(|_, f| !f.forgotten(now));
    if addresses.len() >= MAX_ADDRESSES {
        let least = addresses
            .iter()
            .min_by_key(|(_, f)| (f.count, f.last_told))
            .map(|(ip, _)| *ip);
        if let Some(ip) = least {
            addresses.remove(&ip);
        }
    }
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_delay_schedule() {
        let ms = |n| delay_for(n, DEFAULT_LOGIN_DELAY).as_secs_f64() * 1000.0;
        assert_eq!((1..=4).map(ms).collect::<Vec<_>>(), [0.0; 4]);
        assert_eq!(ms(5), 31.25);
        assert_eq!(ms(6), 62.5);
        assert_eq!(ms(7), 125.0);
        assert_eq!(ms(8), 250.0);
        assert_eq!(ms(9), 250.0);
        assert_eq!(ms(MAX_FAILURES), 250.0);
        assert_eq!(delay_for(MAX_FAILURES, Duration::ZERO), Duration::ZERO);
        assert_eq!(delay_for(6, Duration::from_secs(4)), Duration::from_secs(1));
    }

    #[test]
    fn failures_one_after_another_wait_their_delay() {
        let t = LoginThrottle::new(DEFAULT_LOGIN_DELAY);
        let now = Instant::now();
        let a = ip("127.0.0.2");
        let waits: Vec<_> = (1..=9u64)
            .map(|i| {
                // Each guess comes once the previous one was told.
                let p = t.failed(a, now + Duration::from_millis(300 * i));
                (p.failures, p.wait)
            })
            .collect();
        assert_eq!(waits[0], (1, Duration::ZERO));
        assert_eq!(waits[3], (4, Duration::ZERO));
        assert_eq!(waits[4], (5, delay_for(5, DEFAULT_LOGIN_DELAY)));
        assert_eq!(waits[8], (9, DEFAULT_LOGIN_DELAY));
    }

    #[test]
    fn guesses_in_parallel_are_told_one_delay_apart() {
        let t = LoginThrottle::new(DEFAULT_LOGIN_DELAY);
        let now = Instant::now();
        let a = ip("127.0.0.2");
        for _ in 0..8 {
            t.failed(a, now);
        }
        // 100 guesses sent at once: the last is told 100 delays later.
        let last = (0..100).map(|_| t.failed(a, now)).last().unwrap();
        assert!(last.wait >= DEFAULT_LOGIN_DELAY * 100, "{last:?}");
        // Another address, and the same one once told, owe nothing of it.
        assert_eq!(t.failed(ip("127.0.0.3"), now).wait, Duration::ZERO);
        let later = now + last.wait + FORGIVE_ONE * (MAX_FAILURES + 1);
        assert_eq!(
            t.failed(a, later),
            Penalty {
                wait: Duration::ZERO,
                failures: 1
            }
        );
    }

    #[test]
    fn no_delay_turns_the_throttle_off() {
        let t = LoginThrottle::new(Duration::ZERO);
        let now = Instant::now();
        let waits: Vec<_> = (0..100)
            .map(|_| t.failed(ip("127.0.0.2"), now).wait)
            .collect();
        assert_eq!(waits, [Duration::ZERO; 100]);
    }

    #[test]
    fn failures_are_forgiven_over_time() {
        let t = LoginThrottle::new(DEFAULT_LOGIN_DELAY);
        let now = Instant::now();
        let a = ip("2001:db8::1");
        for _ in 0..6 {
            t.failed(a, now);
        }
        // Another address in the same /64 is the same host.
        let p = t.failed(ip("2001:db8::2"), now + FORGIVE_ONE * 3);
        assert_eq!(p.failures, 6 - 3 + 1);
    }

    #[test]
    fn memory_is_bounded_and_the_busiest_guesser_remembered() {
        let t = LoginThrottle::new(DEFAULT_LOGIN_DELAY);
        let now = Instant::now();
        let guesser = ip("192.0.2.1");
        for _ in 0..MAX_FAILURES {
            t.failed(guesser, now);
        }
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            t.failed(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), now);
        }
        assert!(t.addresses.lock().unwrap().len() <= MAX_ADDRESSES);
        assert_eq!(t.failed(guesser, now).failures, MAX_FAILURES);
    }

    #[test]
    fn nonce_is_letters_and_varies() {
        let a = nonce().unwrap();
        let b = nonce().unwrap();
        assert!(a.iter().all(|c| c.is_ascii_alphabetic()));
        assert_ne!(a, b);
    }
}
