//! The metrics port's connections ("scrapes"), capped so idle sockets
//! there cannot use up the server's descriptors (see
//! [`crate::ops::openfiles`], which keeps [`MAX_SCRAPES`] of them aside).
//!
//! A new connection always gets in while an older one is idle to make
//! room for it: a cap that only refused new connections when full would
//! let anyone holding [`MAX_SCRAPES`] silent sockets keep Prometheus out.
//! So:
//! - one address (an IPv6 /64 counting as one, as the caller keys them)
//!   holds at most [`MAX_SCRAPES_PER_ADDRESS`]; past that, its own oldest
//!   idle connection is closed for the new one;
//! - all addresses together hold at most [`MAX_SCRAPES`]; past that, the
//!   oldest idle connection of any address is closed.
//!
//! "Idle" means its request head has not all arrived; a connection being
//! answered is not closed, and when every one in the way is being answered
//! the new connection is refused instead (each answer is short, and
//! bounded by a timeout). A flood from one address thus only ever evicts
//! its own sockets, and a scraper elsewhere gets in. Kept apart from the
//! HTTP side ([`crate::ops::metrics`]) so it is plain bookkeeping, tested
//! without sockets.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::task::AbortHandle;

/// Most connections on the metrics port at once.
pub const MAX_SCRAPES: usize = 64;
/// Most of those from one address: a scraper and a few people with curl.
pub const MAX_SCRAPES_PER_ADDRESS: usize = 8;

/// The open connections of the metrics port.
#[derive(Debug, Clone)]
pub(crate) struct Scrapes {
    /// Shared with every [`Scrape`], which leaves the table when dropped.
    table: Arc<Mutex<Table>>,
}

/// What [`Scrapes`] and its [`Scrape`]s share.
#[derive(Debug)]
struct Table {
    /// Cap on all connections.
    max: usize,
    /// Cap per address.
    max_per_address: usize,
    /// Id of the next connection; ids grow, so the map is oldest first.
    next: u64,
    /// Open connections, by id.
    open: BTreeMap<u64, Entry>,
    /// Open connections by address (its /64 for IPv6); an address leaves
    /// with its last connection.
    per_address: HashMap<IpAddr, usize>,
}

/// One open connection.
#[derive(Debug)]
struct Entry {
    /// Its address, as counted.
    host: IpAddr,
    /// Still waiting for its request head: may be closed to make room.
    idle: bool,
    /// Ends its task (and so closes it); set once the task is spawned.
    closer: Option<AbortHandle>,
}

/// A connection's place in the table, held by its task; dropping it
/// gives the place back.
#[derive(Debug)]
pub(crate) struct Scrape {
    /// Where the place is.
    table: Arc<Mutex<Table>>,
    /// Its id there.
    id: u64,
}

/// What admitting a connection did: its place, and the connection closed
/// to make room, if any.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The new connection's place.
    pub(crate) scrape: Scrape,
    /// The id of the connection evicted for it, and its closer (none if
    /// its task was not spawned yet).
    pub(crate) evicted: Option<(u64, Option<AbortHandle>)>,
}

impl Scrapes {
    /// A table with the caps [`MAX_SCRAPES`] and
    /// [`MAX_SCRAPES_PER_ADDRESS`].
    pub(crate) fn new() -> Scrapes {
        Scrapes::with_caps(MAX_SCRAPES, MAX_SCRAPES_PER_ADDRESS)
    }

    /// A table with the given caps (at least 1 each).
    pub(crate) fn with_caps(max: usize, max_per_address: usize) -> Scrapes {
        Scrapes {
            table: Arc::new(Mutex::new(Table {
                max: max.max(1),
                max_per_address: max_per_address.max(1),
                next: 0,
                open: BTreeMap::new(),
                per_address: HashMap::new(),
            })),
        }
    }

    /// A place for a connection from `host` (its address as the caller
    /// counts addresses: the server's own per-address key, an IPv6 /64 as
    /// one), closing the oldest idle one in the way if a cap is reached;
    /// `None` (refuse it) when every one in the way is being answered. The
    /// caller aborts the evicted task.
    pub(crate) fn admit(&self, host: IpAddr) -> Option<Admitted> {
        let mut t = lock(&self.table);
        let evicted = if t.per_address.get(&host).copied().unwrap_or(0) >= t.max_per_address {
            Some(t.evict_oldest_idle(Some(host))?)
        } else if t.open.len() >= t.max {
            Some(t.evict_oldest_idle(None)?)
        } else {
            None
        };
        let id = t.next;
        t.next += 1;
        t.open.insert(
            id,
            Entry {
                host,
                idle: true,
                closer: None,
            },
        );
        *t.per_address.entry(host).or_insert(0) += 1;
        Some(Admitted {
            scrape: Scrape {
                table: self.table.clone(),
                id,
            },
            evicted,
        })
    }

    /// Notes the task that serves connection `id`, so it can be closed to
    /// make room.
    pub(crate) fn set_closer(&self, id: u64, closer: AbortHandle) {
        if let Some(e) = lock(&self.table).open.get_mut(&id) {
            e.closer = Some(closer);
        }
    }

    /// How many connections are open.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.table).open.len()
    }
}

impl Table {
    /// Takes the oldest idle connection (of `host`, if given) out of the
    /// table; returns its id and closer.
    fn evict_oldest_idle(&mut self, host: Option<IpAddr>) -> Option<(u64, Option<AbortHandle>)> {
        let id = self
            .open
            .iter()
            .find(|(_, e)| e.idle && host.is_none_or(|h| e.host == h))
            .map(|(id, _)| *id)?;
        let entry = self.remove(id)?;
        Some((id, entry.closer))
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(n) = self.per_address.get_mut(&entry.host) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&entry.host);
            }
        }
        Some(entry)
    }
}

impl Scrape {
    /// The connection's id, for [`Scrapes::set_closer`].
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The request head has arrived: the connection is being answered and
    /// is no longer closed to make room.
    pub(crate) fn answering(&self) {
        if let Some(e) = lock(&self.table).open.get_mut(&self.id) {
            e.idle = false;
        }
    }
}

impl Drop for Scrape {
    fn drop(&mut self) {
        // Gone already if it was evicted.
        lock(&self.table).remove(self.id);
    }
}

fn lock(t: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // Plain counts and handles: a panic cannot leave them half-updated.
    t.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_at_its_cap_evicts_its_own_oldest_idle_connection() {
        let s = Scrapes::with_caps(10, 2);
        let flood = ip("127.0.0.2");
        let a = s.admit(flood).unwrap();
        let b = s.admit(flood).unwrap();
        let other = s.admit(ip("127.0.0.1")).unwrap();
        assert!(a.evicted.is_none() && b.evicted.is_none() && other.evicted.is_none());
        let c = s.admit(flood).unwrap();
        assert_eq!(c.evicted.as_ref().map(|e| e.0), Some(a.scrape.id));
        assert_eq!(s.len(), 3, "evicted at once; the other address untouched");
        // Dropping the evicted place later changes nothing.
        drop(a);
        assert_eq!(s.len(), 3);
        drop(other);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn connections_being_answered_are_never_evicted() {
        let s = Scrapes::with_caps(10, 2);
        let p = ip("127.0.0.2");
        let a = s.admit(p).unwrap();
        let b = s.admit(p).unwrap();
        a.scrape.answering();
        let c = s.admit(p).unwrap();
        assert_eq!(c.evicted.as_ref().map(|e| e.0), Some(b.scrape.id));
        c.scrape.answering();
        assert!(s.admit(p).is_none(), "both being answered: refused");
        drop(a);
        assert!(s.admit(p).unwrap().evicted.is_none());
    }

    #[test]
    fn the_total_cap_evicts_the_oldest_idle_connection_of_any_address() {
        let s = Scrapes::with_caps(3, 2);
        let a = s.admit(ip("10.0.0.1")).unwrap();
        let b = s.admit(ip("10.0.0.2")).unwrap();
        let c = s.admit(ip("10.0.0.3")).unwrap();
        a.scrape.answering();
        let d = s.admit(ip("10.0.0.4")).unwrap();
        assert_eq!(d.evicted.as_ref().map(|e| e.0), Some(b.scrape.id));
        assert_eq!(s.len(), 3);
        drop((a, c, d));
        assert_eq!(s.len(), 0);
        assert!(lock(&s.table).per_address.is_empty());
    }
}
