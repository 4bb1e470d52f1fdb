//! Counting client connections: the `--max-connections` cap on sockets
//! open at once, and the authenticated clients whose absence `-t` waits
//! for. Kept apart from the accept loop and the sessions, which both use
//! it, so neither has to reach into the other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Open connections and connected clients.
#[derive(Debug)]
pub struct Connections {
    /// One permit per connection that may be open at once; a connection
    /// holds its permit from accept to close.
    permits: Arc<Semaphore>,
    /// Authenticated connections open now.
    clients: AtomicUsize,
    /// When `clients` last changed (or the server started), for `-t`.
    changed: Mutex<Instant>,
}

/// A connection's place under the cap, held until the connection closes.
#[derive(Debug)]
pub struct Admitted {
    /// Returned to the semaphore when dropped.
    _permit: OwnedSemaphorePermit,
}

impl Connections {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Self {
        Connections {
            permits: Arc::new(Semaphore::new(max)),
            clients: AtomicUsize::new(0),
            changed: Mutex::new(Instant::now()),
        }
    }

    /// A place for a new connection, or `None` when the cap is reached.
    pub fn admit(&self) -> Option<Admitted> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(Admitted { _permit: permit })
    }

    /// Counts an authenticated client until the guard drops.
    pub fn client(&self) -> ClientGuard<'_> {
        self.clients.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ClientGuard(self)
    }

    /// How long no client has been connected; `None` while one is.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.clients.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.lock_changed().elapsed())
    }

    fn touch(&self) {
        *self.lock_changed() = Instant::now();
    }

    fn lock_changed(&self) -> std::sync::MutexGuard<'_, Instant> {
        // An Instant cannot be left half-written by a panic.
        self.changed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// See [`Connections::client`].
#[derive(Debug)]
pub struct ClientGuard<'a>(&'a Connections);

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_until_a_place_is_given_back() {
        let c = Connections::new(2);
        let a = c.admit().unwrap();
        let _b = c.admit().unwrap();
        assert!(c.admit().is_none());
        drop(a);
        assert!(c.admit().is_some());
    }

    #[test]
    fn idle_only_without_clients() {
        let c = Connections::new(1);
        assert!(c.idle_for().is_some());
        let g = c.client();
        assert_eq!(c.idle_for(), None);
        drop(g);
        assert!(c.idle_for().unwrap() < Duration::from_secs(3600));
    }
}
