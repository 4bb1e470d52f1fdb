//! Rate limits for log lines that a peer can cause at will: warnings about
//! refused or misbehaving peers, and errors that come in bursts (`accept`
//! out of file descriptors). A client stuck in a reconnect loop, a flood
//! of bad logins or a scanner must not bury the log, yet a line must still
//! show that it happened and how often.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lets one log line through about once a second; the lines held back in
/// between go to debug level and are counted in the next one let through.
/// One per kind of event (a `static`), so that a flood of one kind cannot
/// hide another.
#[derive(Debug)]
pub(crate) struct LogLimit {
    /// When the last line went through, in ms since [`epoch_ms`]'s start
    /// (plus a second, so that the very first line goes through).
    last_ms: AtomicU64,
    /// Lines held back since.
    held_back: AtomicU64,
}

/// Milliseconds since the first call, plus 1000.
fn epoch_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1000
}

impl LogLimit {
    pub(crate) const fn new() -> Self {
        LogLimit {
            last_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// Logs `message` at `level` if a second has passed since the last
    /// line this limit let through, else at debug level.
    pub(crate) fn log(&self, level: log::Level, message: std::fmt::Arguments<'_>) {
        let now_ms = epoch_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now_ms >= last + 1000
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            match self.held_back.swap(0, Ordering::Relaxed) {
                0 => log::log!(level, "{message}"),
                n => log::log!(
                    level,
                    "{message} ({n} similar messages in the last seconds at debug level)"
                ),
            }
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            log::debug!("{message}");
        }
    }
}

/// Logs a warning about a misbehaving or refused peer, at most about once
/// a second across all peers, saying how many were held back since; those
/// go to debug.
pub(crate) fn warn_limited(message: std::fmt::Arguments<'_>) {
    static PEERS: LogLimit = LogLimit::new();
    PEERS.log(log::Level::Warn, message);
}

/// Allows one event per source address per interval: for
/// warnings that matter once per host (a client of the wrong pp version)
/// but would repeat on every one of its connections.
#[derive(Debug)]
pub(crate) struct PerAddress {
    /// When each address last got through.
    last: Mutex<HashMap<IpAddr, Instant>>,
    /// How long an address waits between two events.
    interval: Duration,
    /// Bounds the lines of many addresses together.
    overall: LogLimit,
}

/// Addresses remembered at most; past that the memory is cleared, so a
/// flood from many addresses costs a bounded amount (and a few repeated
/// warnings at worst).
const MAX_ADDRESSES: usize = 4096;

impl PerAddress {
    /// One event per address per `interval`.
    pub(crate) fn new(interval: Duration) -> Self {
        PerAddress {
            last: Mutex::default(),
            interval,
            overall: LogLimit::new(),
        }
    }

    /// Logs a warning about `host` if it has had none for the interval
    /// (and the warnings of all addresses together stay at about one a
    /// second); else logs it at debug level. `host` is the address under
    /// which the caller counts one peer (the front's
    /// [`crate::config::allow::host_key`]), so the log needs no notion of
    /// its own.
    pub(crate) fn warn(&self, host: IpAddr, message: std::fmt::Arguments<'_>) {
        if self.allow(host) {
            self.overall.log(log::Level::Warn, message);
        } else {
            log::debug!("{message}");
        }
    }

    /// Whether an event from `host` may go through now.
    pub(crate) fn allow(&self, host: IpAddr) -> bool {
        let now = Instant::now();
        // A map of instants cannot be left inconsistent by a panic.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&seen) = last.get(&host) {
            if now.duration_since(seen) < self.interval {
                return false;
            }
        }
        if last.len() >= MAX_ADDRESSES {
            last.clear();
        }
        last.insert(host, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_address_per_interval() {
        let limit = PerAddress::new(Duration::from_secs(3600));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        assert!(limit.allow(a));
        assert!(!limit.allow(a));
        assert!(limit.allow(b));
        let never = PerAddress::new(Duration::ZERO);
        assert!(never.allow(a) && never.allow(a));
    }

    #[test]
    fn one_line_a_second_and_the_rest_counted() {
        let limit = LogLimit::new();
        for i in 0..3 {
            limit.log(log::Level::Warn, format_args!("line {i}"));
        }
        assert_eq!(limit.held_back.load(Ordering::Relaxed), 2);
        // Another limit is not held back by this one.
        let other = LogLimit::new();
        other.log(log::Level::Error, format_args!("other"));
        assert_eq!(other.held_back.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn memory_is_bounded() {
        let limit = PerAddress::new(Duration::from_secs(3600));
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            limit.allow(IpAddr::from(i.to_be_bytes()));
        }
        assert!(limit.last.lock().unwrap().len() <= MAX_ADDRESSES);
    }
}
