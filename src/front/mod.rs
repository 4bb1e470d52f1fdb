//! The server's front door: how a connection is let in and how it lives.
//! [`connections`] admits each accepted connection under its budgets
//! (with `--allow`, [`crate::config::allow`]), a proxy's connection under
//! the client its PROXY header names ([`proxy`]); [`session`] runs one client
//! connection from the handshake to its close, with wrong answers slowed
//! by [`login`]; [`exec`] is its EXEC loop, which hands jobs to the
//! scheduler and answers them; [`discovery`] answers autodiscovery (`-a`)
//! over UDP; [`listener`] is the listening socket, bound early and made
//! to listen last, or passed in already listening (socket activation, a
//! reload).

pub(crate) mod connections;
pub(crate) mod discovery;
pub(crate) mod exec;
pub(crate) mod listener;
pub(crate) mod login;
pub(crate) mod proxy;
pub mod session;
