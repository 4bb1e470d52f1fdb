//! UDP autodiscovery (`-a`), compatible with pp clients that list a server
//! as `"*:port"`:
//!
//! - the server listens for datagrams on UDP port = its TCP port (the
//!   discovery port);
//! - it sends the 1-byte datagram `S` to `(broadcast, port)` for each `-b`
//!   address (one per subnet; `255.255.255.255` by default) and to
//!   `(host, port)` for each `--announce` host, at start and every
//!   [`ANNOUNCE_INTERVAL`];
//! - it answers a `C` (a client looking for servers) with an `S` to each
//!   broadcast address and one by unicast to the `C`'s sender at the
//!   discovery port, unless the `C` comes from outside `--allow`; at most
//!   [`ANSWER_BURST`] answers at once and [`ANSWERS_PER_SECOND`] on
//!   average, so a flood of `C` cannot make the server flood the network
//!   (a client sends one `C` and also hears the periodic announcements);
//! - a client connects over TCP to the sender address of each `S` it hears.
//!
//! The unicast answer is what reaches a client behind a multi-homed host's
//! second interface: `255.255.255.255` leaves by the default route's
//! interface only. It goes to the discovery port, not to the port the `C`
//! came from: ppft clients send `C` from a separate unbound socket and
//! listen for `S` only on the socket bound to the discovery port.
//!
//! So the `S` must leave from the address the TCP listener serves: with a
//! specific `-i` address the announcements are sent from a socket bound to
//! it, while the listening socket is bound to the wildcard address, since a
//! socket bound to a unicast address never receives broadcasts on Linux.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::config::allow::AllowList;
use crate::config::Config;
use crate::logging::ratelimit::{warn_limited, LogLimit, PerAddress};

/// How often the server announces itself, as ppft does.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(10);
/// Answers to `C` sent at once after a quiet spell: a few clients
/// starting together are each answered at once.
pub const ANSWER_BURST: u32 = 4;
/// Answers to `C` per second, on average, beyond the burst.
pub const ANSWERS_PER_SECOND: u32 = 2;
/// How often a destination whose announcements keep failing is warned
/// about again; in between, its failures are logged at debug level.
const FAILING_REMINDER: Duration = Duration::from_secs(600);

/// A token bucket: [`ANSWER_BURST`] tokens, refilled at
/// [`ANSWERS_PER_SECOND`]; an answer takes one.
#[derive(Debug)]
struct AnswerBudget {
    /// Tokens left, in thousandths (so refills need no floats).
    milli_tokens: u64,
    /// When the bucket was last refilled.
    refilled: Instant,
}

impl AnswerBudget {
    fn new(now: Instant) -> Self {
        AnswerBudget {
            milli_tokens: u64::from(ANSWER_BURST) * 1000,
            refilled: now,
        }
    }

    /// Takes a token if there is one at `now`.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_millis();
        let earned = elapsed.saturating_mul(u128::from(ANSWERS_PER_SECOND));
        let full = u64::from(ANSWER_BURST) * 1000;
        self.milli_tokens = u64::try_from(earned)
            .unwrap_or(u64::MAX)
            .saturating_add(self.milli_tokens)
            .min(full);
        self.refilled = now;
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// An `--announce` host that does not resolve to an IPv4 address.
#[derive(Debug)]
pub struct Unresolved {
    /// The host as given.
    pub host: String,
    /// What the resolver said, or that it found only IPv6 addresses.
    pub why: String,
}

/// Why autodiscovery (`-a`) cannot start.
#[derive(Debug)]
pub enum DiscoveryError {
    /// An `--announce` host does not resolve to an IPv4 address.
    Announce(Unresolved),
    /// Asked for on a listener that is not IPv4.
    NeedsIpv4 { addr: SocketAddr },
    /// The UDP port cannot be bound.
    Bind { port: u16, source: io::Error },
}

impl std::fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiscoveryError::Announce(Unresolved { host, why }) => {
                write!(f, "cannot resolve {host:?} (--announce): {why}")
            }
            DiscoveryError::NeedsIpv4 { addr } => write!(
                f,
                "autodiscovery (-a) works over IPv4 broadcast, but the server listens on \
                 {addr}; give -i an IPv4 address"
            ),
            DiscoveryError::Bind { port, source } => {
                write!(f, "cannot bind the autodiscovery UDP port {port}: {source}")
            }
        }
    }
}

impl std::error::Error for DiscoveryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DiscoveryError::Bind { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Startup step, first of all: with `-a`, the `--announce` hosts
/// resolved, so a name that does not resolve fails the start at once, not
/// after the worker probe. Empty without `-a`.
pub async fn resolve_for(cfg: &Config) -> Result<Vec<(String, Ipv4Addr)>, DiscoveryError> {
    if !cfg.autodiscovery {
        return Ok(Vec::new());
    }
    resolve_announce(&cfg.announce)
        .await
        .map_err(DiscoveryError::Announce)
}

/// Startup step, once the listener is bound at `local`: with `-a`, the
/// discovery sockets on the same port number, announcing to `-b` and the
/// resolved `announce` hosts.
pub fn for_config(
    cfg: &Config,
    local: SocketAddr,
    announce: Vec<(String, Ipv4Addr)>,
) -> Result<Option<Discovery>, DiscoveryError> {
    if !cfg.autodiscovery {
        return Ok(None);
    }
    let IpAddr::V4(ip) = local.ip() else {
        return Err(DiscoveryError::NeedsIpv4 { addr: local });
    };
    let to = Destinations {
        broadcasts: cfg.broadcasts(),
        announce,
        allow: cfg.allow.clone(),
    };
    Discovery::bind(ip, local.port(), to)
        .map(Some)
        .map_err(|source| DiscoveryError::Bind {
            port: local.port(),
            source,
        })
}

/// The startup line's part about `-a`: where announcements go; empty
/// without it.
pub fn summary(cfg: &Config) -> String {
    if !cfg.autodiscovery {
        return String::new();
    }
    let join = |items: Vec<String>| items.join(", ");
    let broadcasts = join(cfg.broadcasts().iter().map(|b| b.to_string()).collect());
    if cfg.announce.is_empty() {
        format!(", autodiscovery on (broadcast {broadcasts})")
    } else {
        format!(
            ", autodiscovery on (broadcast {broadcasts}; announce to {})",
            join(cfg.announce.clone())
        )
    }
}

/// Resolves the `--announce` hosts, once, at startup: each to all its
/// IPv4 addresses (discovery is IPv4), in the order given, without
/// repeats. Returns `(host as given, address)` pairs.
pub async fn resolve_announce(hosts: &[String]) -> Result<Vec<(String, Ipv4Addr)>, Unresolved> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for host in hosts {
        let addrs = tokio::net::lookup_host((host.as_str(), 0))
            .await
            .map_err(|e| Unresolved {
                host: host.clone(),
                why: e.to_string(),
            })?;
        let v4: Vec<Ipv4Addr> = addrs
            .filter_map(|a| match a.ip() {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })
            .collect();
        if v4.is_empty() {
            return Err(Unresolved {
                host: host.clone(),
                why: "no IPv4 address (autodiscovery is IPv4 only)".into(),
            });
        }
        for ip in v4 {
            if seen.insert(ip) {
                out.push((host.clone(), ip));
            }
        }
    }
    Ok(out)
}

/// One destination of the periodic `S`.
#[derive(Debug)]
struct Target {
    /// `(address, discovery port)`.
    addr: SocketAddrV4,
    /// How log lines name it: the address, or `host (address)`.
    label: String,
    /// The last send to it failed: the next success is logged.
    failing: bool,
}

impl Target {
    fn new(addr: Ipv4Addr, port: u16, host: Option<&str>) -> Target {
        let label = match host {
            Some(h) if h != addr.to_string() => format!("{h} ({addr})"),
            _ => addr.to_string(),
        };
        Target {
            addr: SocketAddrV4::new(addr, port),
            label,
            failing: false,
        }
    }
}

/// A UDP socket with SO_REUSEADDR (several pp processes on one host share
/// the port) and SO_BROADCAST.
fn udp_socket(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(addr).into())?;
    UdpSocket::from_std(s.into())
}

/// The discovery service's sockets and destinations.
pub struct Discovery {
    /// Receives `C` datagrams.
    listen: UdpSocket,
    /// Sends `S`; the same socket as `listen` unless bound to `-i`.
    send: Option<UdpSocket>,
    /// The discovery port: the server's TCP port.
    port: u16,
    /// `(broadcast, port)` for each `-b` address.
    broadcasts: Vec<Target>,
    /// `(host, port)` for each `--announce` address.
    announce: Vec<Target>,
    /// `--allow`: whose `C` is answered.
    allow: AllowList,
    /// Bounds the warnings about destinations that keep failing.
    reminders: PerAddress,
}

/// Where the periodic `S` goes and whose `C` is answered.
#[derive(Debug, Clone, Default)]
pub struct Destinations {
    /// The `-b` addresses.
    pub broadcasts: Vec<Ipv4Addr>,
    /// The `--announce` hosts, resolved: `(host as given, address)`.
    pub announce: Vec<(String, Ipv4Addr)>,
    /// `--allow`.
    pub allow: AllowList,
}

impl Discovery {
    /// Binds the discovery sockets for a server on `interface:port` that
    /// announces itself to `to`.
    pub fn bind(interface: Ipv4Addr, port: u16, to: Destinations) -> io::Result<Discovery> {
        let listen = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        let send = if interface.is_unspecified() {
            None
        } else {
            Some(udp_socket(SocketAddrV4::new(interface, 0))?)
        };
        let mut seen = HashSet::new();
        let broadcasts = to
            .broadcasts
            .iter()
            .filter(|ip| seen.insert(**ip))
            .map(|&ip| Target::new(ip, port, None))
            .collect();
        let announce = to
            .announce
            .iter()
            .filter(|(_, ip)| seen.insert(*ip))
            .map(|(host, ip)| Target::new(*ip, port, Some(host)))
            .collect();
        Ok(Discovery {
            listen,
            send,
            port,
            broadcasts,
            announce,
            allow: to.allow,
            reminders: PerAddress::new(FAILING_REMINDER),
        })
    }

    /// Sends `S` to each target; a failure is logged (once when it starts,
    /// then every [`FAILING_REMINDER`]; debug in between) and the target is
    /// tried again next time, and a recovery is logged.
    async fn announce_to(
        sock: &UdpSocket,
        targets: &mut [Target],
        reminders: &PerAddress,
        why: &str,
    ) {
        for t in targets {
            match sock.send_to(b"S", t.addr).await {
                Ok(_) => {
                    log::debug!("discovery: {why}: sent S to {}", t.addr);
                    if std::mem::take(&mut t.failing) {
                        log::info!("discovery: sending to {} works again", t.label);
                    }
                }
                Err(e) => {
                    let first = !std::mem::replace(&mut t.failing, true);
                    let message = format!(
                        "discovery: cannot send to {} (port {}): {e}; trying again every {} s",
                        t.label,
                        t.addr.port(),
                        ANNOUNCE_INTERVAL.as_secs()
                    );
                    // The reminder limit is also taken on the first
                    // failure, so that the next warning is a period away.
                    let remind = reminders.allow(IpAddr::V4(*t.addr.ip()));
                    if first || remind {
                        log::warn!("{message}");
                    } else {
                        log::debug!("{message}");
                    }
                }
            }
        }
    }

    /// The periodic announcement: every broadcast address and every
    /// `--announce` host.
    async fn announce(&mut self) {
        let sock = self.send.as_ref().unwrap_or(&self.listen);
        Self::announce_to(sock, &mut self.broadcasts, &self.reminders, "announce").await;
        Self::announce_to(sock, &mut self.announce, &self.reminders, "announce").await;
    }

    /// Answers a `C` from `from`: `S` to every broadcast address, and by
    /// unicast to the sender's address at the discovery port.
    async fn answer(&mut self, from: SocketAddr) {
        let sock = self.send.as_ref().unwrap_or(&self.listen);
        Self::announce_to(sock, &mut self.broadcasts, &self.reminders, "answer").await;
        let Some(to) = unicast_answer(from, self.port, &self.broadcasts) else {
            return;
        };
        match sock.send_to(b"S", to).await {
            Ok(_) => log::debug!("discovery: answer: sent S to {to}"),
            // Once per client host per reminder period: with -i on an
            // address those clients cannot reach (127.0.0.1), every C on
            // the network fails this way.
            Err(e) if self.reminders.allow(from.ip()) => {
                log::warn!("discovery: cannot answer {from} at {to}: {e}")
            }
            Err(e) => log::debug!("discovery: cannot answer {from} at {to}: {e}"),
        }
    }

    /// Announces now and periodically, and answers `C` within the answer
    /// budget; runs until dropped.
    pub async fn run(mut self) {
        let mut ticker = tokio::time::interval(ANNOUNCE_INTERVAL);
        let mut budget = AnswerBudget::new(Instant::now());
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                _ = ticker.tick() => self.announce().await,
                got = self.listen.recv_from(&mut buf) => match got {
                    Ok((n, from)) if n > 0 && buf[0] == b'C' => {
                        if !self.allow.permits(from.ip()) {
                            // Other people's clients on the network: no
                            // cause for a warning.
                            log::debug!("discovery: {from}: not allowed (--allow); not answered");
                        } else if budget.take(Instant::now()) {
                            log::debug!("discovery: {from} is looking for servers");
                            self.answer(from).await;
                        } else {
                            warn_limited(format_args!(
                                "discovery: {from}: more requests than {ANSWERS_PER_SECOND} \
                                 a second; not answered"
                            ));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        static RECEIVE_FAILED: LogLimit = LogLimit::new();
                        RECEIVE_FAILED.log(
                            log::Level::Warn,
                            format_args!("discovery: receive failed: {e}"),
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// Where the unicast answer to a `C` from `from` goes: its address at the
/// discovery `port`. None for a sender no answer can go to (a source of
/// 0.0.0.0, a broadcast or multicast address: forged, or nothing a client
/// listens on) and for one of the broadcast addresses, which was just
/// answered.
fn unicast_answer(from: SocketAddr, port: u16, broadcasts: &[Target]) -> Option<SocketAddrV4> {
    let IpAddr::V4(ip) = from.ip() else {
        return None;
    };
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return None;
    }
    if broadcasts.iter().any(|t| *t.addr.ip() == ip) {
        return None;
    }
    Some(SocketAddrV4::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP socket on `ip:port` beside the server's wildcard socket on
    /// the same port: the more specific match gets what is sent to `ip`.
    fn listener(ip: [u8; 4], port: u16) -> UdpSocket {
        udp_socket(SocketAddrV4::new(ip.into(), port)).unwrap()
    }

    /// A free UDP port (free now; the test binds it at once).
    fn free_port() -> u16 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    }

    async fn receive(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_secs(30), sock.recv_from(&mut buf))
            .await
            .expect("a datagram")
            .unwrap();
        (buf[..n].to_vec(), from)
    }

    #[tokio::test]
    async fn announces_to_every_destination_and_answers_c_by_unicast_at_the_port() {
        let port = free_port();
        let announced = listener([127, 0, 0, 4], port);
        let client = listener([127, 0, 0, 2], port);
        let discovery = Discovery::bind(
            Ipv4Addr::UNSPECIFIED,
            port,
            Destinations {
                // Stands for a broadcast address: 127.0.0.3 reaches only
                // the server's own socket.
                broadcasts: vec![[127, 0, 0, 3].into()],
                announce: vec![("announced".into(), [127, 0, 0, 4].into())],
                allow: AllowList::default(),
            },
        )
        .unwrap();
        let running = tokio::spawn(discovery.run());
        // At start: the --announce host gets its S.
        assert_eq!(receive(&announced).await.0, b"S");
        // A client's C from an unbound socket (another port): the answer
        // comes to its discovery port.
        let asker = udp_socket(SocketAddrV4::new([127, 0, 0, 2].into(), 0)).unwrap();
        asker.send_to(b"C", ("127.0.0.3", port)).await.unwrap();
        let (data, from) = receive(&client).await;
        assert_eq!(data, b"S");
        assert_eq!(from.port(), port, "sent from the discovery socket");
        running.abort();
    }

    #[test]
    fn unicast_answers_go_to_the_sender_at_the_discovery_port() {
        let targets = [Target::new([192, 0, 2, 255].into(), 60000, None)];
        let from = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            unicast_answer(from("198.51.100.7:41234"), 60000, &targets),
            Some("198.51.100.7:60000".parse().unwrap())
        );
        for nowhere in [
            "0.0.0.0:1",
            "255.255.255.255:1",
            "224.0.0.1:1",
            "192.0.2.255:1",
        ] {
            assert_eq!(
                unicast_answer(from(nowhere), 60000, &targets),
                None,
                "{nowhere}"
            );
        }
    }

    #[tokio::test]
    async fn destinations_are_sent_to_once_each() {
        let d = Discovery::bind(
            Ipv4Addr::LOCALHOST,
            0,
            Destinations {
                broadcasts: vec![[192, 0, 2, 255].into(), [192, 0, 2, 255].into()],
                announce: vec![
                    ("a".into(), [192, 0, 2, 255].into()),
                    ("b".into(), [203, 0, 113, 2].into()),
                    ("203.0.113.2".into(), [203, 0, 113, 2].into()),
                ],
                allow: AllowList::default(),
            },
        )
        .unwrap();
        let labels = |ts: &[Target]| ts.iter().map(|t| t.label.clone()).collect::<Vec<_>>();
        assert_eq!(labels(&d.broadcasts), ["192.0.2.255"]);
        assert_eq!(labels(&d.announce), ["b (203.0.113.2)"]);
    }

    #[tokio::test]
    async fn a_failing_destination_is_tried_again_and_its_recovery_noticed() {
        let sock = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let reminders = PerAddress::new(FAILING_REMINDER);
        // Port 0 is no destination: every send fails.
        let mut targets = [Target::new(Ipv4Addr::LOCALHOST, 0, Some("here"))];
        Discovery::announce_to(&sock, &mut targets, &reminders, "test").await;
        assert!(targets[0].failing);
        Discovery::announce_to(&sock, &mut targets, &reminders, "test").await;
        assert!(targets[0].failing, "still failing, still tried");
        let port = free_port();
        let back = listener([127, 0, 0, 1], port);
        targets[0].addr.set_port(port);
        Discovery::announce_to(&sock, &mut targets, &reminders, "test").await;
        assert!(!targets[0].failing);
        assert_eq!(receive(&back).await.0, b"S");
    }

    #[tokio::test]
    async fn announce_hosts_resolve_to_their_ipv4_addresses_once_each() {
        let hosts = ["127.0.0.1", "localhost", "192.0.2.9"].map(String::from);
        let got = resolve_announce(&hosts).await.unwrap();
        let ips: Vec<Ipv4Addr> = got.iter().map(|(_, ip)| *ip).collect();
        assert_eq!(ips[0], Ipv4Addr::LOCALHOST);
        assert_eq!(*ips.last().unwrap(), Ipv4Addr::new(192, 0, 2, 9));
        assert_eq!(
            ips.iter().filter(|ip| **ip == Ipv4Addr::LOCALHOST).count(),
            1,
            "{got:?}"
        );
        let e = resolve_announce(&["::1".to_string()]).await.unwrap_err();
        assert_eq!(e.host, "::1");
        assert!(e.why.contains("IPv4"), "{e:?}");
    }

    #[test]
    fn answers_come_in_a_burst_then_at_the_rate() {
        let t0 = Instant::now();
        let mut b = AnswerBudget::new(t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        let burst = (0..100).filter(|_| b.take(t0)).count();
        assert_eq!(burst, ANSWER_BURST as usize);
        // Ten seconds of a request every millisecond: the rate, no more.
        let later = (1..=10_000).filter(|&ms| b.take(at(ms))).count();
        assert_eq!(later, 10 * ANSWERS_PER_SECOND as usize);
        // A quiet spell refills the burst, and no more than it.
        let refilled = (0..100).filter(|_| b.take(at(3_600_000))).count();
        assert_eq!(refilled, ANSWER_BURST as usize);
    }
}
