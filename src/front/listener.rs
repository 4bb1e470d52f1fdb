//! The listening socket: bound first, made to listen last; or passed in
//! already listening.
//!
//! The start binds the port early (so it is ours, and a client that
//! comes early is refused rather than queued) and calls [`Bound::listen`]
//! only once the startup line and the pid file are out: launchers and
//! tests wait for the port, then read both.
//!
//! A socket can also be passed in ([`Passed`]), by the protocol systemd
//! uses for socket activation: descriptors from 3 on, `LISTEN_FDS` of
//! them, for the process `LISTEN_PID`, named by `LISTEN_FDNAMES`. One
//! code path reads both ways they come:
//! - **socket activation**: systemd (a `.socket` unit) or
//!   `systemd-socket-activate` made the socket, which outlives the
//!   server, so a restart refuses no connection. The first listening TCP
//!   socket under a name not of ours is used whatever `-i` and `-p` say
//!   (the socket unit decides the address);
//! - **reload** (SIGUSR2, [`crate::server`]): the old process passes its
//!   listening socket (named [`BOUND_NAME`], or [`ACTIVATED_NAME`] if it
//!   came from socket activation) and its `--metrics` socket
//!   ([`METRICS_NAME`]) to the new one it starts, with `LISTEN_PID` its
//!   own pid, since it cannot know its child's before the exec: that is
//!   accepted only from the parent and only with a reload's channel
//!   among the descriptors. A bound socket is used if `-i` and `-p` still
//!   name its address (port 0 names any), so both processes accept from
//!   one queue and no connection is refused; else the new address is
//!   bound and the old one closes with the old process.
//!
//! The variables are removed once read, so workers never see them, and
//! the descriptors are made close-on-exec at once: a worker holding the
//! listening socket would keep the port open after the server stopped.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::net::{TcpListener, TcpSocket};

/// Listen backlog; ppft's 5 drops connections when many clients start at
/// once.
const BACKLOG: u32 = 1024;

/// The name a reload gives the listening socket the old process bound
/// from `-i` and `-p`.
pub const BOUND_NAME: &str = "ppserver-bound";
/// The name a reload gives a listening socket that came from socket
/// activation: it stays in use whatever `-i` and `-p` say.
pub const ACTIVATED_NAME: &str = "ppserver-activated";
/// The name a reload gives the `--metrics` socket.
pub const METRICS_NAME: &str = "ppserver-metrics";
/// The name of the channel between the old and the new process of a
/// reload: its presence makes a `LISTEN_PID` of the parent acceptable.
pub const RELOAD_CHANNEL_NAME: &str = "ppserver-reload";

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const FIRST_PASSED_FD: RawFd = 3;
/// More passed descriptors than this are surely a mistake.
const MOST_PASSED_FDS: usize = 64;

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
    /// A passed socket cannot be used.
    Passed(std::io::Error),
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenError::Resolve { interface } => {
                write!(f, "cannot resolve interface {interface:?} (-i)")
            }
            ListenError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            ListenError::Passed(source) => {
                write!(
                    f,
                    "cannot use the listening socket passed in (LISTEN_FDS): {source}"
                )
            }
        }
    }
}

impl std::error::Error for ListenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ListenError::Bind { source, .. } | ListenError::Passed(source) => Some(source),
            ListenError::Resolve { .. } => None,
        }
    }
}

/// The descriptors passed in at startup (`LISTEN_FDS`), by name; taken
/// one by one by the steps of the start that use them. Those left over
/// are closed when this is dropped.
#[derive(Debug, Default)]
pub struct Passed {
    fds: Vec<(OwnedFd, String)>,
    /// What was wrong with the variables, for the log once it is up.
    pub notes: Vec<String>,
}

impl Passed {
    /// Reads and removes `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`
    /// and takes the descriptors they pass, each made close-on-exec.
    /// Called first thing in `main`, before any other thread or child
    /// exists: the variables are removed from a process with one thread,
    /// and no child inherits a descriptor meanwhile.
    pub fn from_env() -> Passed {
        let count = std::env::var("LISTEN_FDS").ok();
        let pid = std::env::var("LISTEN_PID").ok();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        let Some(count) = count else {
            return Passed::default();
        };
        let names: Vec<&str> = names
            .as_deref()
            .map_or(Vec::new(), |n| n.split(':').collect());
        let mut passed = Passed::default();
        let count = match count.trim().parse::<usize>() {
            Ok(n) if n <= MOST_PASSED_FDS => n,
            _ => {
                passed.notes.push(format!(
                    "LISTEN_FDS={count:?} is not a count of descriptors: ignored"
                ));
                return passed;
            }
        };
        let ours = std::process::id().to_string();
        let parent = std::os::unix::process::parent_id().to_string();
        let for_us = match pid.as_deref().map(str::trim) {
            Some(p) if p == ours => true,
            // A reload's child: its parent could not know its pid.
            Some(p) if p == parent => names.contains(&RELOAD_CHANNEL_NAME),
            _ => false,
        };
        if !for_us {
            passed.notes.push(format!(
                "LISTEN_FDS is set for process {} (LISTEN_PID), not this one ({ours}): \
                 its descriptors are not used",
                pid.as_deref().unwrap_or("none"),
            ));
            return passed;
        }
        for i in 0..count {
            let fd = FIRST_PASSED_FD + i as RawFd;
            // SAFETY: F_GETFD only reads the descriptor's flags; a closed
            // descriptor makes it fail.
            let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) };
            if flags < 0 {
                passed.notes.push(format!(
                    "LISTEN_FDS names descriptor {fd}, which is not open"
                ));
                continue;
            }
            // SAFETY: as above; the descriptor stays open.
            unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, flags | nix::libc::FD_CLOEXEC) };
            // SAFETY: the protocol hands descriptors 3 to 3+LISTEN_FDS-1
            // to this process, and nothing else in it owns them.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = names.get(i).copied().unwrap_or("unknown").to_string();
            passed.fds.push((owned, name));
        }
        passed
    }

    /// The descriptor passed under `name`, if any.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(_, n)| n == name)?;
        Some(self.fds.remove(i).0)
    }

    /// The listening TCP socket passed under `name` if it listens on
    /// `want` (port 0: any port); one on another address is closed.
    pub fn take_listening(
        &mut self,
        name: &str,
        want: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let fd = self.take(name)?;
        match listening_tcp(fd) {
            Ok((listener, local)) if same_place(local, want) => Some(listener),
            Ok((_, local)) => {
                log::info!(
                    "not using the socket passed on {local} ({name}): now {want} is asked for"
                );
                None
            }
            Err(e) => {
                log::warn!("the socket passed as {name} cannot be used: {e}");
                None
            }
        }
    }

    /// [`Passed::take_listening`] made ready for the runtime.
    pub fn take_listener(&mut self, name: &str, want: SocketAddr) -> Option<TcpListener> {
        let listener = self.take_listening(name, want)?;
        match listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
        {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("the socket passed as {name} cannot be used: {e}");
                None
            }
        }
    }

    /// The first listening TCP socket under a name not of ours: one that
    /// socket activation passed (systemd names it after its socket unit,
    /// `systemd-socket-activate` by `--fdname`), or that a reload passed
    /// on as such. Other descriptors under such names are closed, with a
    /// warning; when there are some but none is a listening TCP socket,
    /// the start fails, since the service manager holds the port.
    fn take_activated(
        &mut self,
    ) -> Result<Option<(std::net::TcpListener, SocketAddr)>, ListenError> {
        let ours = [BOUND_NAME, METRICS_NAME, RELOAD_CHANNEL_NAME];
        let (theirs, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fds)
            .into_iter()
            .partition(|(_, name)| !ours.contains(&name.as_str()));
        self.fds = kept;
        let mut found = None;
        let mut unusable = Vec::new();
        for (fd, name) in theirs {
            let raw = fd.as_raw_fd();
            match listening_tcp(fd) {
                Ok(l) if found.is_none() => found = Some(l),
                Ok((_, local)) => log::warn!(
                    "descriptor {raw} ({name}), another listening socket on {local}, is not \
                     used: the server listens on one socket"
                ),
                Err(e) => unusable.push(format!("descriptor {raw} ({name}): {e}")),
            }
        }
        match (&found, unusable.is_empty()) {
            (None, false) => Err(ListenError::Passed(std::io::Error::other(format!(
                "no listening TCP socket among them: {}",
                unusable.join("; ")
            )))),
            (Some(_), false) => {
                for why in unusable {
                    log::warn!("{why}: not used");
                }
                Ok(found)
            }
            (_, true) => Ok(found),
        }
    }
}

/// Whether a socket on `local` serves for one asked for on `want`.
fn same_place(local: SocketAddr, want: SocketAddr) -> bool {
    local.ip() == want.ip() && (want.port() == 0 || want.port() == local.port())
}

/// `fd` as a listener, if it is a listening TCP socket: checked, so that
/// a wrong descriptor is a clear error at startup and not a failing
/// `accept` later.
fn listening_tcp(fd: OwnedFd) -> std::io::Result<(std::net::TcpListener, SocketAddr)> {
    use socket2::{Domain, SockRef, Type};
    let sock = SockRef::from(&fd);
    let kind = sock.r#type()?;
    let domain = sock.domain()?;
    if kind != Type::STREAM || !(domain == Domain::IPV4 || domain == Domain::IPV6) {
        return Err(std::io::Error::other("not a TCP socket"));
    }
    if !sock.is_listener()? {
        return Err(std::io::Error::other("a TCP socket that does not listen"));
    }
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("no IP address"))?;
    Ok((std::net::TcpListener::from(fd), local))
}

/// A socket for the server's address: bound and not yet listening, or
/// passed in listening.
pub struct Bound {
    socket: Socket,
    /// Where it is bound (`-p 0` resolved to the port the system gave).
    pub local: SocketAddr,
}

/// Where the socket of a [`Bound`] came from.
enum Socket {
    /// Bound here from `-i` and `-p`.
    Fresh(TcpSocket),
    /// Passed in already listening; `activated` if by socket activation.
    Passed {
        listener: std::net::TcpListener,
        activated: bool,
    },
}

/// Binds the socket the server will listen on (`-i`, `-p`): SO_REUSEADDR
/// like ppft, so a restarted server gets its port back at once. A socket
/// passed in is used instead (see the module's text).
pub async fn bind(interface: &str, port: u16, passed: &mut Passed) -> Result<Bound, ListenError> {
    if let Some((listener, local)) = passed.take_activated()? {
        log::info!(
            "listening on {local}, the socket passed by socket activation (LISTEN_FDS); -i and \
             -p are not used"
        );
        return Ok(Bound {
            socket: Socket::Passed {
                listener,
                activated: true,
            },
            local,
        });
    }
    let addr: SocketAddr = match tokio::net::lookup_host((interface, port)).await {
        Ok(mut addrs) => addrs.next(),
        Err(_) => None,
    }
    .ok_or_else(|| ListenError::Resolve {
        interface: interface.to_string(),
    })?;
    if let Some(listener) = passed.take_listening(BOUND_NAME, addr) {
        let local = listener
            .local_addr()
            .map_err(|source| ListenError::Bind { addr, source })?;
        return Ok(Bound {
            socket: Socket::Passed {
                listener,
                activated: false,
            },
            local,
        });
    }
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
    Ok(Bound {
        socket: Socket::Fresh(socket),
        local,
    })
}

impl Bound {
    /// Starts listening, with a generous backlog: from here on clients
    /// are accepted. A passed socket listens already (with the backlog
    /// its maker chose).
    pub fn listen(self) -> Result<Listening, ListenError> {
        let addr = self.local;
        match self.socket {
            Socket::Fresh(socket) => Ok(Listening {
                listener: socket
                    .listen(BACKLOG)
                    .map_err(|source| ListenError::Bind { addr, source })?,
                activated: false,
            }),
            Socket::Passed {
                listener,
                activated,
            } => {
                let fail = |source| ListenError::Bind { addr, source };
                listener.set_nonblocking(true).map_err(fail)?;
                Ok(Listening {
                    listener: TcpListener::from_std(listener).map_err(fail)?,
                    activated,
                })
            }
        }
    }
}

/// The listening socket the server accepts from.
pub struct Listening {
    pub listener: TcpListener,
    /// It came from socket activation: a reload passes it on as such.
    pub activated: bool,
}

impl Listening {
    /// The name a reload passes the socket on under.
    pub fn pass_name(&self) -> &'static str {
        if self.activated {
            ACTIVATED_NAME
        } else {
            BOUND_NAME
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(fds: Vec<(OwnedFd, &str)>) -> Passed {
        Passed {
            fds: fds.into_iter().map(|(f, n)| (f, n.to_string())).collect(),
            notes: Vec::new(),
        }
    }

    fn listener() -> (OwnedFd, SocketAddr) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = l.local_addr().unwrap();
        (l.into(), local)
    }

    fn udp() -> OwnedFd {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into()
    }

    #[test]
    fn activation_takes_the_first_listening_tcp_socket_under_a_name_not_ours() {
        let (ours, _) = listener();
        let (theirs, local) = listener();
        let mut p = passed(vec![
            (ours, BOUND_NAME),
            (udp(), "ppserver.socket"),
            (theirs, "ppserver.socket"),
        ]);
        let (_, found) = p.take_activated().unwrap().unwrap();
        assert_eq!(found, local);
        assert_eq!(p.fds.len(), 1, "ours is left for its own step");
        assert!(p.take(BOUND_NAME).is_some());
    }

    #[test]
    fn activation_with_no_listening_tcp_socket_fails_the_start() {
        let mut p = passed(vec![(udp(), "unknown")]);
        assert!(matches!(p.take_activated(), Err(ListenError::Passed(_))));
        let mut none = passed(Vec::new());
        assert!(none.take_activated().unwrap().is_none());
    }

    #[test]
    fn a_passed_socket_is_used_only_where_it_listens() {
        let (fd, local) = listener();
        let elsewhere = SocketAddr::new(local.ip(), local.port().wrapping_add(1).max(1));
        let mut p = passed(vec![(fd, METRICS_NAME)]);
        assert!(p.take_listening(METRICS_NAME, elsewhere).is_none());
        assert!(p.take(METRICS_NAME).is_none(), "closed, not kept");
        let (fd, local) = listener();
        assert!(passed(vec![(fd, BOUND_NAME)])
            .take_listening(BOUND_NAME, local)
            .is_some());
        // -p 0 asks for any port.
        let (fd, local) = listener();
        let any_port = SocketAddr::new(local.ip(), 0);
        assert!(passed(vec![(fd, BOUND_NAME)])
            .take_listening(BOUND_NAME, any_port)
            .is_some());
        let mut p = passed(vec![(udp(), METRICS_NAME)]);
        assert!(p.take_listening(METRICS_NAME, local).is_none());
    }
}
