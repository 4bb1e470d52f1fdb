//! UDP autodiscovery (`-a`), compatible with pp clients that list a server
//! as `"*:port"`:
//!
//! - the server listens for datagrams on UDP port = its TCP port;
//! - it sends the 1-byte datagram `S` to `(broadcast, port)` at start and
//!   every [`ANNOUNCE_INTERVAL`];
//! - it answers a `C` (a client looking for servers) with an `S` to
//!   `(broadcast, port)`, unless the `C` comes from outside `--allow`;
//!   at most [`ANSWER_BURST`] at once and [`ANSWERS_PER_SECOND`] on
//!   average, so a flood of `C` cannot make the server flood the
//!   broadcast address (a client sends one `C` and also hears the periodic
//!   announcements);
//! - a client connects over TCP to the sender address of each `S` it hears.
//!
//! So the `S` must leave from the address the TCP listener serves: with a
//! specific `-i` address the announcements are sent from a socket bound to
//! it, while the listening socket is bound to the wildcard address, since a
//! socket bound to a unicast address never receives broadcasts on Linux.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::config::allow::AllowList;
use crate::logging::ratelimit::{warn_limited, LogLimit};

/// How often the server announces itself, as ppft does.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(10);
/// Answers to `C` sent at once after a quiet spell: a few clients
/// starting together are each answered at once.
pub const ANSWER_BURST: u32 = 4;
/// Answers to `C` per second, on average, beyond the burst.
pub const ANSWERS_PER_SECOND: u32 = 2;

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

/// The discovery service's sockets.
pub struct Discovery {
    /// Receives `C` datagrams.
    listen: UdpSocket,
    /// Sends `S`; the same socket as `listen` unless bound to `-i`.
    send: Option<UdpSocket>,
    /// `(broadcast, port)`.
    target: SocketAddrV4,
    /// `--allow`: whose `C` is answered.
    allow: AllowList,
}

impl Discovery {
    /// Binds the discovery sockets for a server on `interface:port` that
    /// answers the clients `allow` lets in.
    pub fn bind(
        interface: Ipv4Addr,
        port: u16,
        broadcast: Ipv4Addr,
        allow: AllowList,
    ) -> io::Result<Discovery> {
        let listen = udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        let send = if interface.is_unspecified() {
            None
        } else {
            Some(udp_socket(SocketAddrV4::new(interface, 0))?)
        };
        Ok(Discovery {
            listen,
            send,
            target: SocketAddrV4::new(broadcast, port),
            allow,
        })
    }

    async fn announce(&self) {
        let sock = self.send.as_ref().unwrap_or(&self.listen);
        match sock.send_to(b"S", self.target).await {
            Ok(_) => log::debug!("discovery: announced to {}", self.target),
            Err(e) => {
                static SEND_FAILED: LogLimit = LogLimit::new();
                SEND_FAILED.log(
                    log::Level::Warn,
                    format_args!("discovery: cannot send to {}: {e}", self.target),
                )
            }
        }
    }

    /// Announces now and periodically, and answers `C` within the answer
    /// budget; runs until dropped.
    pub async fn run(self) {
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
                            self.announce().await;
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

#[cfg(test)]
mod tests {
    use super::*;

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
