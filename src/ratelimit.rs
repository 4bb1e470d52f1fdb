//! Rate limits for warnings about peers. A client stuck in a reconnect
//! loop, a flood of bad logins or a scanner must not bury the log, yet a
//! warning must still show that it happened and how often.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Logs a warning about a misbehaving peer, at most about once a second
/// across all peers, saying how many were held back since; those go to
/// debug.
pub(crate) fn warn_limited(message: std::fmt::Arguments<'_>) {
    static START: OnceLock<Instant> = OnceLock::new();
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static HELD_BACK: AtomicU64 = AtomicU64::new(0);
    let now_ms = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1000;
    let last = LAST_MS.load(Ordering::Relaxed);
    if now_ms >= last + 1000
        && LAST_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        match HELD_BACK.swap(0, Ordering::Relaxed) {
            0 => log::warn!("{message}"),
            n => log::warn!("{message} ({n} similar warnings in the last seconds at debug level)"),
        }
    } else {
        HELD_BACK.fetch_add(1, Ordering::Relaxed);
        log::debug!("{message}");
    }
}

/// Allows one event per source address per interval: for warnings that
/// matter once per host (a client of the wrong pp version) but would
/// repeat on every one of its connections.
#[derive(Debug)]
pub(crate) struct PerAddress {
    /// When each address last got through.
    last: Mutex<HashMap<IpAddr, Instant>>,
    /// How long an address waits between two events.
    interval: Duration,
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
        }
    }

    /// Whether an event from `ip` may go through now.
    pub(crate) fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        // A map of instants cannot be left inconsistent by a panic.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&seen) = last.get(&ip) {
            if now.duration_since(seen) < self.interval {
                return false;
            }
        }
        if last.len() >= MAX_ADDRESSES {
            last.clear();
        }
        last.insert(ip, now);
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
    fn memory_is_bounded() {
        let limit = PerAddress::new(Duration::from_secs(3600));
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            limit.allow(IpAddr::from(i.to_be_bytes()));
        }
        assert!(limit.last.lock().unwrap().len() <= MAX_ADDRESSES);
    }
}
