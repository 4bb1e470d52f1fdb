//! Connection budgets, decided when a connection is accepted and before
//! the server sends it anything:
//!
//! - `--allow`: peers outside the list are closed at once;
//! - `--max-handshakes`: connections not yet authenticated, at once; and
//!   `--max-handshakes-per-address` of them from one address (default:
//!   half the budget), so one host flooding with silent sockets can never
//!   take more than its share, and clients from other addresses get in;
//! - `--max-connections`: authenticated connections, at once. Peers
//!   without the secret cannot use any of it.
//!
//! A connection from a `--proxy-protocol` address is admitted first under
//! the proxy's address, without `--allow` (which is about clients, not the
//! proxy in front of them): its place in the handshake budget is the
//! proxy's while the PROXY header is read, then
//! [re-admitted](Place::readmit) under the client's address the header
//! names, `--allow` and that address's share checked then, as if the
//! client had connected itself. See [`crate::front::proxy`].
//!
//! While the handshake budget is [tight](Connections::tight) (half used or
//! more) sessions cut their handshake timeout short, so places held by
//! silent sockets come back quickly. Also counts the authenticated clients
//! whose absence `-t` waits for. Kept apart from the accept loop and the
//! sessions, which both use it, so neither has to reach into the other.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::allow::{host_key, AllowList, Networks};
use crate::config::Config;
use crate::logging::ratelimit::warn_limited;

/// Open connections and connected clients.
#[derive(Debug)]
pub struct Connections {
    /// Shared with every [`Place`], which gives its place back when dropped.
    shared: Arc<Shared>,
}

/// What the budgets and the places share.
#[derive(Debug)]
struct Shared {
    /// `--allow`: who may connect at all.
    allow: AllowList,
    /// `--proxy-protocol`: whose connections begin with a PROXY header.
    proxies: Networks,
    /// `--max-connections`: authenticated connections at once.
    max_clients: usize,
    /// `--max-handshakes`: unauthenticated connections at once.
    max_handshakes: usize,
    /// `--max-handshakes-per-address`: of those, from one address.
    max_per_address: usize,
    /// The counts; one lock, taken briefly and never across an await.
    counts: Mutex<Counts>,
    /// Whether the handshake budget is tight; sessions in their handshake
    /// watch it to shorten their timeout.
    tight: watch::Sender<bool>,
}

/// The counts behind the budgets.
#[derive(Debug)]
struct Counts {
    /// Authenticated connections open now.
    clients: usize,
    /// When `clients` last changed (or the server started), for `-t`.
    changed: Instant,
    /// Unauthenticated connections open now.
    handshakes: usize,
    /// The same by source address ([`host_key`]); an address leaves the
    /// map with its last connection, so the map is never larger than the
    /// handshake budget.
    per_address: HashMap<IpAddr, usize>,
}

/// Why a connection was closed without a word, or (for
/// [`Refused::Clients`]) without `OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The peer's address is not in `--allow`.
    NotAllowed,
    /// `--max-connections` authenticated connections are open.
    Clients,
    /// `--max-handshakes` connections are in their handshake.
    Handshakes,
    /// The peer's address has `--max-handshakes-per-address` connections
    /// in their handshake.
    PerAddress,
    /// A `--proxy-protocol` peer sent no valid PROXY header in time.
    ProxyHeader,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::NotAllowed => "address not allowed (--allow)",
            Refused::Clients => "too many connections (--max-connections)",
            Refused::Handshakes => "too many connections in their handshake (--max-handshakes)",
            Refused::PerAddress => {
                "too many connections in their handshake from this address \
                 (--max-handshakes-per-address)"
            }
            Refused::ProxyHeader => "no valid PROXY protocol header (--proxy-protocol)",
        })
    }
}

impl Refused {
    /// Logs the refusal of `peer`, rate-limited: a flood of refused
    /// connections must not flood the log; and counts it in the metrics.
    pub(crate) fn log(self, peer: SocketAddr) {
        crate::ops::metrics::metrics().refused(self.label());
        warn_limited(format_args!("{peer}: {self}; closed"));
    }

    /// The reason, as labelled in the metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::NotAllowed => "not_allowed",
            Refused::Clients => "max_connections",
            Refused::Handshakes => "max_handshakes",
            Refused::PerAddress => "max_handshakes_per_address",
            Refused::ProxyHeader => "proxy_header",
        }
    }
}

/// A connection's place under the budgets, held until it closes: first in
/// the handshake budget, then, once [authenticated](Place::authenticate),
/// among the clients.
#[derive(Debug)]
pub struct Place {
    /// Where the place is given back.
    shared: Arc<Shared>,
    /// The peer's [`host_key`], for the per-address count.
    host: IpAddr,
    /// Whether the place has moved to the clients' budget.
    authenticated: bool,
    /// Whether the peer is a proxy whose PROXY header is still to be read:
    /// `host` is then the proxy's.
    awaits_header: bool,
}

/// The per-address cap when none is given: half the handshake budget (at
/// least 1), so a single address can never hold it all.
pub fn default_per_address(max_handshakes: usize) -> usize {
    max_handshakes.div_ceil(2).max(1)
}

impl Connections {
    /// The budgets `cfg` asks for.
    pub fn new(cfg: &Config) -> Self {
        let max_handshakes = cfg.max_handshakes.max(1);
        Connections {
            shared: Arc::new(Shared {
                allow: cfg.allow.clone(),
                proxies: cfg.proxy_protocol.clone(),
                max_clients: cfg.max_connections.max(1),
                max_handshakes,
                max_per_address: cfg
                    .max_handshakes_per_address
                    .unwrap_or_else(|| default_per_address(max_handshakes))
                    .max(1),
                counts: Mutex::new(Counts {
                    clients: 0,
                    changed: Instant::now(),
                    handshakes: 0,
                    per_address: HashMap::new(),
                }),
                tight: watch::Sender::new(false),
            }),
        }
    }

    /// A place for a new connection from `peer`, or why there is none.
    /// A `--proxy-protocol` peer is let in whatever `--allow` says; its
    /// place [awaits the header](Place::awaits_header).
    pub fn admit(&self, peer: SocketAddr) -> Result<Place, Refused> {
        let s = &self.shared;
        let proxy = s.proxies.contains(peer.ip());
        if !proxy && !s.allow.permits(peer.ip()) {
            return Err(Refused::NotAllowed);
        }
        let host = host_key(peer.ip());
        let mut counts = s.lock();
        if counts.per_address.get(&host).copied().unwrap_or(0) >= s.max_per_address {
            return Err(Refused::PerAddress);
        }
        if counts.handshakes >= s.max_handshakes {
            return Err(Refused::Handshakes);
        }
        if counts.clients >= s.max_clients {
            // It could not be served after its handshake either.
            return Err(Refused::Clients);
        }
        counts.handshakes += 1;
        *counts.per_address.entry(host).or_insert(0) += 1;
        s.update_tight(&counts);
        Ok(Place {
            shared: s.clone(),
            host,
            authenticated: false,
            awaits_header: proxy,
        })
    }

    /// Whether the handshake budget is tight: set once half of it is in
    /// use, cleared once less than a quarter is (the gap keeps a budget
    /// hovering at the mark from waking every handshake on each change).
    pub fn tight(&self) -> watch::Receiver<bool> {
        self.shared.tight.subscribe()
    }

    /// How long no client has been connected; `None` while one is.
    pub fn idle_for(&self) -> Option<Duration> {
        let counts = self.shared.lock();
        (counts.clients == 0).then(|| counts.changed.elapsed())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Plain counters: a panic cannot leave them half-updated.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_tight(&self, counts: &Counts) {
        let in_use = counts.handshakes;
        self.tight.send_if_modified(|tight| {
            let now = if *tight {
                in_use * 4 >= self.max_handshakes
            } else {
                in_use * 2 >= self.max_handshakes
            };
            std::mem::replace(tight, now) != now
        });
    }

    /// Gives back a place in the handshake budget.
    fn end_handshake(&self, counts: &mut Counts, host: IpAddr) {
        counts.handshakes -= 1;
        if let Some(n) = counts.per_address.get_mut(&host) {
            *n -= 1;
            if *n == 0 {
                counts.per_address.remove(&host);
            }
        }
        self.update_tight(counts);
    }
}

impl Place {
    /// Whether the connection is a proxy's that must begin with a PROXY
    /// header, to be [re-admitted](Place::readmit) under the address in it.
    pub fn awaits_header(&self) -> bool {
        self.awaits_header
    }

    /// Admits a proxy's connection again, as the connection of `client`,
    /// the address its PROXY header names (the proxy's own for a health
    /// check): `--allow` is checked, and the place in the handshake budget
    /// moves to `client`'s share, refused when that share is full. On a
    /// refusal the place stays the proxy's until dropped.
    pub fn readmit(&mut self, client: IpAddr) -> Result<(), Refused> {
        let s = &self.shared;
        if !s.allow.permits(client) {
            return Err(Refused::NotAllowed);
        }
        let host = host_key(client);
        self.awaits_header = false;
        if self.authenticated || host == self.host {
            return Ok(());
        }
        let mut counts = s.lock();
        if counts.per_address.get(&host).copied().unwrap_or(0) >= s.max_per_address {
            return Err(Refused::PerAddress);
        }
        // The total stays: one handshake, now counted under another address.
        s.end_handshake(&mut counts, self.host);
        counts.handshakes += 1;
        *counts.per_address.entry(host).or_insert(0) += 1;
        s.update_tight(&counts);
        self.host = host;
        Ok(())
    }

    /// Moves the place from the handshake budget to the clients' budget,
    /// once the peer has proven it knows the secret; refused when
    /// `--max-connections` clients are connected.
    pub fn authenticate(&mut self) -> Result<(), Refused> {
        if self.authenticated {
            return Ok(());
        }
        let s = &self.shared;
        let mut counts = s.lock();
        if counts.clients >= s.max_clients {
            return Err(Refused::Clients);
        }
        s.end_handshake(&mut counts, self.host);
        counts.clients += 1;
        counts.changed = Instant::now();
        self.authenticated = true;
        Ok(())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let s = &self.shared;
        let mut counts = s.lock();
        if self.authenticated {
            counts.clients -= 1;
            counts.changed = Instant::now();
        } else {
            s.end_handshake(&mut counts, self.host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(clients: usize, handshakes: usize, per_address: Option<usize>) -> Connections {
        Connections::new(&Config {
            max_connections: clients,
            max_handshakes: handshakes,
            max_handshakes_per_address: per_address,
            ..Config::default()
        })
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    fn ip(ip: &str) -> IpAddr {
        ip.parse().unwrap()
    }

    #[test]
    fn one_address_gets_at_most_its_share_of_the_handshakes() {
        let c = budgets(10, 4, None);
        let a = peer("127.0.0.2");
        let held: Vec<_> = (0..2).map(|_| c.admit(a).unwrap()).collect();
        assert_eq!(c.admit(a).unwrap_err(), Refused::PerAddress);
        let b = c.admit(peer("127.0.0.3")).unwrap();
        let _b2 = c.admit(peer("127.0.0.3")).unwrap();
        assert_eq!(c.admit(peer("127.0.0.4")).unwrap_err(), Refused::Handshakes);
        drop(b);
        assert!(c.admit(peer("127.0.0.4")).is_ok());
        drop(held);
        assert!(c.admit(a).is_ok());
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64() {
        let c = budgets(10, 100, Some(2));
        let _p1 = c.admit(peer("2001:db8::1")).unwrap();
        let _p2 = c.admit(peer("2001:db8::2")).unwrap();
        assert_eq!(
            c.admit(peer("2001:db8::3")).unwrap_err(),
            Refused::PerAddress
        );
        assert!(c.admit(peer("2001:db8:0:1::1")).is_ok());
    }

    #[test]
    fn authenticated_places_leave_the_handshake_budget() {
        let c = budgets(2, 2, None);
        let mut a = c.admit(peer("127.0.0.1")).unwrap();
        assert_eq!(c.admit(peer("127.0.0.1")).unwrap_err(), Refused::PerAddress);
        a.authenticate().unwrap();
        let mut b = c.admit(peer("127.0.0.1")).unwrap();
        b.authenticate().unwrap();
        assert_eq!(c.admit(peer("127.0.0.2")).unwrap_err(), Refused::Clients);
        drop(b);
        assert!(c.admit(peer("127.0.0.2")).is_ok());
    }

    #[test]
    fn a_handshake_that_finds_the_clients_full_is_refused() {
        let c = budgets(1, 4, None);
        let mut early = c.admit(peer("127.0.0.1")).unwrap();
        let mut late = c.admit(peer("127.0.0.1")).unwrap();
        early.authenticate().unwrap();
        assert_eq!(late.authenticate().unwrap_err(), Refused::Clients);
        drop(late);
        drop(early);
        assert!(c.admit(peer("127.0.0.1")).unwrap().authenticate().is_ok());
    }

    #[test]
    fn allow_list_is_checked_first() {
        let mut cfg = Config::default();
        cfg.allow.extend_from("127.0.0.1/32").unwrap();
        let c = Connections::new(&cfg);
        assert_eq!(c.admit(peer("127.0.0.3")).unwrap_err(), Refused::NotAllowed);
        assert!(c.admit(peer("127.0.0.1")).is_ok());
    }

    fn behind(proxies: &str, allow: &str, per_address: usize) -> Connections {
        let mut cfg = Config {
            max_handshakes: 100,
            max_handshakes_per_address: Some(per_address),
            ..Config::default()
        };
        cfg.proxy_protocol.extend_from(proxies).unwrap();
        cfg.allow.extend_from(allow).unwrap();
        Connections::new(&cfg)
    }

    #[test]
    fn a_proxy_is_admitted_outside_allow_and_its_client_checked_after() {
        let c = behind("127.0.0.1", "127.0.0.5", 4);
        assert_eq!(c.admit(peer("127.0.0.9")).unwrap_err(), Refused::NotAllowed);
        let direct = c.admit(peer("127.0.0.5")).unwrap();
        assert!(
            !direct.awaits_header(),
            "not a proxy: never read for a header"
        );
        let mut allowed = c.admit(peer("127.0.0.1")).unwrap();
        assert!(allowed.awaits_header());
        allowed.readmit(ip("127.0.0.5")).unwrap();
        assert!(!allowed.awaits_header());
        let mut outsider = c.admit(peer("127.0.0.1")).unwrap();
        assert_eq!(
            outsider.readmit(ip("127.0.0.9")).unwrap_err(),
            Refused::NotAllowed
        );
        let mut health_check = c.admit(peer("127.0.0.1")).unwrap();
        assert_eq!(
            health_check.readmit(ip("127.0.0.1")).unwrap_err(),
            Refused::NotAllowed,
            "served as the proxy, which --allow leaves out"
        );
    }

    #[test]
    fn a_readmitted_place_moves_to_the_clients_share() {
        let c = behind("127.0.0.1", "0.0.0.0/0", 2);
        let mut a = c.admit(peer("127.0.0.1")).unwrap();
        let _b = c.admit(peer("127.0.0.1")).unwrap();
        assert_eq!(c.admit(peer("127.0.0.1")).unwrap_err(), Refused::PerAddress);
        a.readmit(ip("192.0.2.7")).unwrap();
        // The proxy's share has room again; the client's holds one.
        let mut c2 = c.admit(peer("127.0.0.1")).unwrap();
        c2.readmit(ip("192.0.2.7")).unwrap();
        let mut c3 = c.admit(peer("127.0.0.1")).unwrap();
        assert_eq!(
            c3.readmit(ip("192.0.2.7")).unwrap_err(),
            Refused::PerAddress
        );
        drop(c3);
        drop(a);
        assert!(
            c.admit(peer("192.0.2.7")).is_ok(),
            "given back under the client"
        );
        // A health check stays under the proxy's own address.
        let mut own = c.admit(peer("127.0.0.1")).unwrap();
        own.readmit(ip("127.0.0.1")).unwrap();
        own.authenticate().unwrap();
        let counts = c.shared.lock();
        assert_eq!(counts.per_address.get(&ip("127.0.0.1")), Some(&1), "_b");
        assert_eq!(counts.per_address.get(&ip("192.0.2.7")), Some(&1), "c2");
        assert_eq!(counts.handshakes, 2);
    }

    #[test]
    fn tight_from_half_until_below_a_quarter() {
        let c = budgets(100, 8, Some(8));
        let tight = c.tight();
        let p = peer("127.0.0.2");
        let mut held: Vec<_> = (0..3).map(|_| c.admit(p).unwrap()).collect();
        assert!(!*tight.borrow());
        held.push(c.admit(p).unwrap());
        assert!(*tight.borrow(), "4 of 8");
        held.truncate(2);
        assert!(*tight.borrow(), "2 of 8: still tight");
        held.truncate(1);
        assert!(!*tight.borrow(), "1 of 8");
        // Authenticating frees the handshake place too.
        let mut more: Vec<_> = (0..3).map(|_| c.admit(p).unwrap()).collect();
        assert!(*tight.borrow());
        for m in &mut more {
            m.authenticate().unwrap();
        }
        assert!(!*tight.borrow());
    }

    #[test]
    fn idle_only_without_clients() {
        let c = budgets(4, 4, None);
        assert!(c.idle_for().is_some());
        let mut p = c.admit(peer("127.0.0.1")).unwrap();
        assert!(c.idle_for().is_some(), "a handshake is not a client");
        p.authenticate().unwrap();
        assert_eq!(c.idle_for(), None);
        drop(p);
        assert!(c.idle_for().unwrap() < Duration::from_secs(3600));
    }

    #[test]
    fn the_default_share_is_half() {
        assert_eq!(default_per_address(1024), 512);
        assert_eq!(default_per_address(7), 4);
        assert_eq!(default_per_address(1), 1);
    }
}
