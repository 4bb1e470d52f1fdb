//! The server's front door: who may connect and how a connection lives.
//! [`allow`] decides which source addresses may talk to the server and
//! what counts as one address; [`connections`] admits each accepted
//! connection under its budgets; [`session`] runs one client connection
//! from the handshake to its close and hands its jobs to the scheduler;
//! [`discovery`] answers autodiscovery (`-a`) over UDP.

pub(crate) mod connections;
pub(crate) mod discovery;
pub(crate) mod login;
pub mod session;
