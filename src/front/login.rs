//! The login throttle: wrong answers to the handshake's nonce (step 3 of
//! [`crate::protocol::auth`]) are told `FAILED` ever more slowly, per
//! source address, so a peer without the secret cannot guess it at the
//! speed of the network, nor lock real clients out by trying.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::allow::host_key;

/// Wrong answers from one address that are answered at once: a user who
/// mistyped the secret, or a client started with the wrong one (each of
/// its connections fails once), is not slowed.
pub(crate) const FREE_FAILURES: u32 = 4;
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
    use crate::config::DEFAULT_LOGIN_DELAY;

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
}
