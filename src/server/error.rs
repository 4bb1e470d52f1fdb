//! Why the server could not start: each startup step's own error, named
//! by the step that failed. `main` prints it and exits 1.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::budgets::NoRoom;
use crate::config::users::UsersError;
use crate::front::discovery::DiscoveryError;
use crate::front::listener::ListenError;
use crate::workers::access::UidError;
use crate::workers::forkserver::Unusable;
use crate::workers::install::ProbeError;

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The worker interpreter cannot run the worker package.
    Worker(ProbeError),
    /// `-i` names no address, or the port cannot be bound or listened on.
    Listen(ListenError),
    /// Autodiscovery (`-a`, `--announce`) cannot start.
    Discovery(DiscoveryError),
    /// The metrics address (`--metrics`) cannot be bound.
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The connection budgets cannot fit in the open-file limit: one was
    /// given that is too large, or the limit leaves no room for even one
    /// connection.
    OpenFiles(Box<NoRoom>),
    /// A `--preload` module cannot be imported by the fork-server.
    Preload(String),
    /// The users (`--users` with the `-s` secret) cannot all log in.
    Users(UsersError),
    /// A user's `uid` cannot run the workers.
    Uid(UidError),
    /// The `-P` pid file cannot be written.
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<ProbeError> for StartError {
    fn from(e: ProbeError) -> Self {
        StartError::Worker(e)
    }
}

impl From<UsersError> for StartError {
    fn from(e: UsersError) -> Self {
        StartError::Users(e)
    }
}

impl From<UidError> for StartError {
    fn from(e: UidError) -> Self {
        StartError::Uid(e)
    }
}

impl From<ListenError> for StartError {
    fn from(e: ListenError) -> Self {
        StartError::Listen(e)
    }
}

impl From<DiscoveryError> for StartError {
    fn from(e: DiscoveryError) -> Self {
        StartError::Discovery(e)
    }
}

impl From<Box<NoRoom>> for StartError {
    fn from(e: Box<NoRoom>) -> Self {
        StartError::OpenFiles(e)
    }
}

impl From<Unusable> for StartError {
    fn from(e: Unusable) -> Self {
        StartError::Preload(e.to_string())
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Worker(e) => write!(f, "{e}"),
            StartError::Listen(e) => write!(f, "{e}"),
            StartError::Discovery(e) => write!(f, "{e}"),
            StartError::PidFile { path, source } => write!(
                f,
                "cannot write the pid file {} (-P): {source}",
                path.display()
            ),
            StartError::Metrics { addr, source } => {
                write!(f, "cannot serve metrics on {addr} (--metrics): {source}")
            }
            StartError::OpenFiles(no_room) => write!(f, "{no_room}"),
            StartError::Preload(e) => write!(f, "{e}"),
            StartError::Users(e) => write!(f, "{e}"),
            StartError::Uid(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Worker(e) => Some(e),
            StartError::Listen(e) => e.source(),
            StartError::Discovery(e) => e.source(),
            StartError::Metrics { source, .. } | StartError::PidFile { source, .. } => Some(source),
            StartError::Users(e) => Some(e),
            StartError::Uid(e) => e.source(),
            StartError::OpenFiles(_) | StartError::Preload(_) => None,
        }
    }
}
