//! A drop-in replacement for the Parallel Python (pp/ppft) network server.
//!
//! Only what the binary and the integration tests use is public: the
//! config, the server, a session over any stream, and the frame codec.
//!
//! Map of the crate, in the order a job travels:
//! - [`config`]: command line -> [`config::Config`];
//! - [`install`]: where the binary is installed: the worker interpreter beside it,
//!   and whether the `ppserver` beside it is this binary;
//! - [`server`]: startup checks, the listener, the accept loop, shutdown;
//! - [`allow`]: `--allow`, and what counts as one source address;
//! - [`connections`]: the budgets a connection is admitted under (before and
//!   after authentication, per address) and the clients `-t` waits for;
//! - [`session`]: one client connection: handshake ([`auth`], with the delay
//!   after wrong answers), then STAT or EXEC;
//! - [`wire`]: the 8-byte-length frame, on sockets and worker pipes alike;
//! - [`mapped`]: large frames in mappings of their own, handed to workers
//!   by `vmsplice` without a copy;
//! - [`budget`]: the memory budget every client frame is admitted against;
//! - [`cache`]: the `N`/`H` function-package cache layer;
//! - [`scheduler`]: jobs from every connection -> free workers, client hosts in turn;
//! - [`pool`]: one supervisor per slot: feeds a worker jobs, replaces the dead;
//! - [`worker`]: one worker process: spawn, handshake, run a job, stop and reap;
//! - [`reaper`]: what jobs leave behind: orphaned descendants reaped, and
//!   all killed when the server stops;
//! - [`stats`]: job counts and times; [`pickle`]: the failure result we write;
//! - [`metrics`]: Prometheus metrics and the status page (`--metrics`);
//! - [`ratelimit`]: warnings about peers, limited so floods cannot bury the log;
//! - [`discovery`]: UDP autodiscovery (`-a`);
//! - [`runfiles`]: the pid file (`-P`) and ready file (`--ready-file`);
//! - [`shutdown`]: stop requests (signals) and the drain they start;
//! - [`logsink`]: stderr and stdout, written by threads: a full pipe never stalls the server;
//! - [`inifile`], [`logfmt`]: the config file (`-c`) and log format (`-f`).

mod allow;
pub mod auth;
mod budget;
mod cache;
pub mod config;
mod connections;
mod discovery;
mod hex;
mod inifile;
mod install;
pub mod logfmt;
pub mod logsink;
mod mapped;
mod metrics;
mod pickle;
mod pool;
mod ratelimit;
pub mod reaper;
pub mod runfiles;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod stats;
pub mod wire;
mod worker;
