//! A drop-in replacement for the Parallel Python (pp/ppft) network server.
//!
//! Only what the binary and the integration tests use is public: the
//! config, the server, a session over any stream, and the frame codec.
//!
//! Map of the crate, one folder per concern, in the order a job travels:
//! - [`config`]: command line and config file -> [`config::Config`],
//!   every option defined once ([`config::options`]) with the texts and
//!   man pages made from it, and `--allow` ([`config::allow`]);
//! - [`server`]: the wiring: the startup sequence (each step in the
//!   module of its concern), the accept loop, shutdown, and reload and
//!   upgrade on SIGUSR2 ([`server::reload`]);
//! - [`front`]: the front door: the budgets a connection is admitted under
//!   ([`front::connections`]), the PROXY header a listed proxy's
//!   connection begins with ([`front::proxy`]), one client connection from
//!   handshake to close ([`front::session`]) with the login throttle
//!   ([`front::login`]) and the EXEC loop ([`front::exec`]), UDP
//!   autodiscovery ([`front::discovery`]), and the listening socket, bound
//!   or passed in by socket activation or a reload ([`front::listener`]);
//! - [`protocol`]: the 8-byte-length frame on sockets and worker pipes
//!   ([`protocol::wire`]), the secret handshake ([`protocol::auth`]), the
//!   failure pickle we write ([`protocol::pickle`]);
//! - [`memory`]: the `--memory-limit` budget every client frame is admitted
//!   against ([`memory::budget`]), and large frames in mappings of their
//!   own ([`memory::mapping`]), handed to workers by `vmsplice`
//!   ([`memory::mapped`]), a few kept for the next ones inside the budget
//!   ([`memory::spares`]);
//! - [`jobs`]: the `N`/`H` function-package cache ([`jobs::cache`]) and the
//!   scheduler: jobs from every connection -> free workers, users in fair
//!   shares and client hosts in turn, workers kept to one user
//!   ([`jobs::scheduler`]), with each user's account and limits
//!   (`jobs::shares`);
//! - [`workers`]: the worker interpreter and its probe
//!   ([`workers::install`]), one supervisor per slot ([`workers::pool`]),
//!   one worker process ([`workers::worker`]), forked by the fork-server
//!   ([`workers::forkserver`]) or spawned, as its user's uid
//!   ([`workers::identity`], checked at startup by [`workers::access`]),
//!   `--worker-memory-limit` ([`workers::memlimit`]), and what jobs leave
//!   behind ([`workers::reaper`]);
//! - [`ops`]: metrics and the status page (its port capped), job stats,
//!   stop requests and the drain, the pid and ready files, the open-file
//!   limit ([`ops::openfiles`]), readiness told to systemd
//!   ([`ops::notify`]);
//! - [`logging`]: stderr and stdout written by threads, the `-f` format,
//!   rate-limited warnings about peers, panic messages.

pub mod config;
pub mod front;
pub mod jobs;
pub mod logging;
pub(crate) mod memory;
pub mod ops;
pub mod protocol;
pub mod server;
pub mod workers;
