//! UDP autodiscovery (`-a`), compatible with pp clients that list a server
//! as `"*:port"`:
//!
//! - the server listens for datagrams on UDP port = its TCP port;
//! - it sends the 1-byte datagram `S` to `(broadcast, port)` at start and
//!   every [`ANNOUNCE_INTERVAL`];
//! - it answers every `C` (a client looking for servers) with an `S` to
//!   `(broadcast, port)`;
//! - a client connects over TCP to the sender address of each `S` it hears.
//!
//! So the `S` must leave from the address the TCP listener serves: with a
//! specific `-i` address the announcements are sent from a socket bound to
//! it, while the listening socket is bound to the wildcard address, since a
//! socket bound to a unicast address never receives broadcasts on Linux.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// How often the server announces itself, as ppft does.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(10);

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
}

impl Discovery {
    /// Binds the discovery sockets for a server on `interface:port`.
    pub fn bind(interface: Ipv4Addr, port: u16, broadcast: Ipv4Addr) -> io::Result<Discovery> {
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
        })
    }

    async fn announce(&self) {
        let sock = self.send.as_ref().unwrap_or(&self.listen);
        match sock.send_to(b"S", self.target).await {
            Ok(_) => log::debug!("discovery: announced to {}", self.target),
            Err(e) => log::warn!("discovery: cannot send to {}: {e}", self.target),
        }
    }

    /// Announces now and periodically, and answers every `C`; runs until
    /// dropped.
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(ANNOUNCE_INTERVAL);
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                _ = ticker.tick() => self.announce().await,
                got = self.listen.recv_from(&mut buf) => match got {
                    Ok((n, from)) if n > 0 && buf[0] == b'C' => {
                        log::debug!("discovery: {from} is looking for servers");
                        self.announce().await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        log::warn!("discovery: receive failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}
