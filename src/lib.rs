//! A drop-in replacement for the Parallel Python (pp/ppft) network server.
//!
//! Map of the crate, in the order a job travels:
//! - [`config`]: command line -> [`config::Config`];
//! - [`server`]: startup checks, the listener, the accept loop, shutdown;
//! - [`session`]: one client connection: handshake ([`auth`]), then STAT or EXEC;
//! - [`wire`]: the 8-byte-length frame, on sockets and worker pipes alike;
//! - [`cache`]: the `N`/`H` function-package cache layer;
//! - [`scheduler`]: jobs from every connection -> free workers;
//! - [`pool`]: worker processes: spawn, handshake, run jobs, replace the dead;
//! - [`stats`]: job counts and times; [`pickle`]: the failure result we write;
//! - [`discovery`]: UDP autodiscovery (`-a`);
//! - [`logsink`]: stderr and stdout, written by threads: a full pipe never stalls the server;
//! - [`inifile`], [`logfmt`]: the config file (`-c`) and log format (`-f`).

pub mod auth;
pub mod cache;
pub mod config;
pub mod discovery;
mod hex;
pub mod inifile;
pub mod logfmt;
pub mod logsink;
pub mod pickle;
pub mod pool;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod stats;
pub mod wire;
