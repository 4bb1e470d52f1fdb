//! The listening socket: bound first, made to listen last.
//!
//! The start binds the port early (so it is ours, and a client that
//! comes early is refused rather than queued) and calls [`listen`] only
//! once the startup line and the pid file are out: launchers and tests
//! wait for the port, then read both.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Listen backlog; ppft's 5 drops connections when many clients start at
/// once.
const BACKLOG: u32 = 1024;

/// Why the listening socket cannot be set up.
#[derive(Debug)]
pub enum ListenError {
    /// `-i` names no address.
    Resolve { interface: String },
    /// The socket cannot be bound, or made to listen, on `addr`.
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenError::Resolve { interface } => {
                write!(f, "cannot resolve interface {interface:?} (-i)")
            }
            ListenError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
        }
    }
}

impl std::error::Error for ListenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ListenError::Bind { source, .. } => Some(source),
            ListenError::Resolve { .. } => None,
        }
    }
}

/// A socket bound to the server's address, not yet listening.
pub struct Bound {
    socket: TcpSocket,
    /// Where it is bound (`-p 0` resolved to the port the system gave).
    pub local: SocketAddr,
}

/// Binds the socket the server will listen on (`-i`, `-p`): SO_REUSEADDR
/// like ppft, so a restarted server gets its port back at once.
pub async fn bind(interface: &str, port: u16) -> Result<Bound, ListenError> {
    let addr: SocketAddr = match tokio::net::lookup_host((interface, port)).await {
        Ok(mut addrs) => addrs.next(),
        Err(_) => None,
    }
    .ok_or_else(|| ListenError::Resolve {
        interface: interface.to_string(),
    })?;
    let fail = |source| ListenError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    let local = socket.local_addr().map_err(fail)?;
    Ok(Bound { socket, local })
}

impl Bound {
    /// Starts listening, with a generous backlog: from here on clients
    /// are accepted.
    pub fn listen(self) -> Result<TcpListener, ListenError> {
        let addr = self.local;
        self.socket
            .listen(BACKLOG)
            .map_err(|source| ListenError::Bind { addr, source })
    }
}
