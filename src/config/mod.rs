//! Command line and config file -> [`Config`].
//!
//! The flags are ppft's `ppserver` flags with ppft's meanings (parsed
//! getopt-style: `-dr`, `-p60000` and `-p 60000` all work), plus long
//! options for what ppft does not have. This module holds the result,
//! [`Config`], with its defaults and errors; the parts that fill it in:
//! - [`options`]: every option, defined once: names, key, default,
//!   bounds and texts, which the rest read;
//! - [`flags`]: the command line, a pure function of the arguments
//!   ([`flags::parse_args_with`]) so it can be tested without a process;
//! - [`file`]: the config file (`-c`), in the syntax of [`inifile`];
//! - [`settings`]: what each flag and key sets, and the checks its value
//!   passes;
//! - [`help`]: the `-h` and `--help` texts;
//! - [`docs`]: the man pages and the sample config file, generated;
//! - [`allow`]: the `--allow` networks and what counts as one address;
//! - [`budgets`]: the connection budgets fitted into the open-file limit
//!   at startup;
//! - [`users`]: the users file (`--users`): a secret, limits and a uid for
//!   each user;
//! - [`summary`]: what a config says without its secret, and what changed
//!   between two, for a reload's log.

pub mod allow;
pub mod budgets;
pub mod docs;
pub(crate) mod file;
pub mod flags;
pub mod help;
pub(crate) mod inifile;
pub mod options;
pub(crate) mod settings;
pub mod summary;
pub mod users;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::allow::{AllowList, Networks};
use crate::logging::format::{LogFormat, DEFAULT_FORMAT};
use crate::protocol::auth::DEFAULT_SECRET;

/// The default longest delay (`--login-delay`). After the free failures
/// the delay doubles from an eighth of the longest up to it, so one
/// address gets about one verdict per longest delay, however many
/// connections it opens at once: 4 guesses a second by default (see
/// [`crate::front::login`]).
pub const DEFAULT_LOGIN_DELAY: Duration = Duration::from_millis(250);
/// Longest `--login-delay` accepted: a minute per guess is plenty, and
/// more would only hold a locked-out address's places for longer.
pub const MAX_LOGIN_DELAY: Duration = Duration::from_secs(60);

/// Default TCP port; ppft picks a random one, which leaves users guessing.
pub const DEFAULT_PORT: u16 = 60000;
/// Default per-frame payload limit once a client has authenticated. Large
/// enough for big numpy arguments, small enough that a bogus length is
/// refused instead of exhausting memory.
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;
/// Bounds of `--max-frame-size`. Below 1 KiB no job fits; above 1 TiB no
/// machine holds the frame, and a limit near `usize::MAX` would make
/// length arithmetic overflow.
pub const MIN_MAX_FRAME: usize = 1 << 10;
pub const MAX_MAX_FRAME: usize = 1 << 40;
/// `--memory-limit` when the machine's memory cannot be read.
pub const FALLBACK_MEMORY_LIMIT: usize = 4 << 30;
/// Smallest `--memory-limit`: room for the small frames every job has.
pub const MIN_MEMORY_LIMIT: usize = 1 << 20;
/// Least `--worker-memory-limit`: an interpreter with ppft imported holds
/// about 10 MiB, so less would stop every worker before its first job.
pub const MIN_WORKER_MEMORY_LIMIT: usize = 16 << 20;
/// Default cap on simultaneous authenticated client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on connections in their handshake at once. Half of it, the
/// default share of one address, still takes in hundreds of connections
/// at once from one address: a client opens 2 per server CPU plus one,
/// and users behind one NAT or ssh tunnel share an address.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;

/// Everything the server needs to run, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address or host name to listen on (`-i`).
    pub interface: String,
    /// TCP port (`-p`); 0 picks a free one.
    pub port: u16,
    /// Shared secret clients prove they know (`-s`, `--secret-file`,
    /// `PPSERVER_SECRET`, or `secret` in the config file).
    pub secret: String,
    /// True when no secret was given and pp's well-known default is used.
    pub secret_is_default: bool,
    /// Number of worker processes (`-w`).
    pub workers: usize,
    /// Replace each worker after every job (`-r`).
    pub restart: bool,
    /// Pickle protocol the workers use for results (`-n`); `None` until
    /// the worker package is known: ppft's server defaults to 2, pp
    /// 1.7.0's to 4 (see [`Config::settle_for_worker`]).
    pub proto: Option<i32>,
    /// How long a client connection may sit idle between jobs (`-k`).
    pub socket_timeout: Duration,
    /// Exit after this long without any client connection (`-t`).
    pub idle_exit: Option<Duration>,
    /// Debug logging (`-d`).
    pub debug: bool,
    /// Info logging (the startup line) even when stderr is a pipe (`-v`).
    pub verbose: bool,
    /// Errors only (`-q`, pp 1.7.0's flag); wins over `-v` and `-d`.
    pub quiet: bool,
    /// Python logging format for log lines (`-f`).
    pub log_format: LogFormat,
    /// Answer UDP autodiscovery and announce the server (`-a`).
    pub autodiscovery: bool,
    /// Where discovery announcements go (`-b`, repeatable: one broadcast
    /// address per subnet); empty: `255.255.255.255` (see
    /// [`Config::broadcasts`]).
    pub broadcast: Vec<Ipv4Addr>,
    /// Hosts on routed subnets that also get each periodic announcement,
    /// by unicast (`--announce`), as given: names are resolved at startup.
    pub announce: Vec<String>,
    /// The CPU count told to `STAT` connections (`--advertise-ncpus`);
    /// `None`: the number of workers. Behind a load balancer, the workers
    /// of every server behind it.
    pub advertise_ncpus: Option<usize>,
    /// File the server's pid is written to while it runs (`-P`).
    pub pid_file: Option<PathBuf>,
    /// File holding `host:port`, written once the server listens and a
    /// worker is up, removed when it stops (`--ready-file`).
    pub ready_file: Option<PathBuf>,
    /// `PP_SECRET` from the environment: pp 1.7.0's server and clients read
    /// it, so it is the secret when the workers are pp 1.7.0's and nothing
    /// else gave one. ppft and pathos clients never read it.
    pub pp_secret: Option<String>,
    /// Interpreter that runs the workers (`--python`); `None`: the one
    /// beside the binary if it can, else `python3` ([`crate::workers::install`]).
    pub python: Option<PathBuf>,
    /// Python module run as the worker (`python -u -m MODULE`); `None`
    /// finds it: ppft if installed, else pp 1.7's `pp._worker`.
    pub worker_module: Option<String>,
    /// Version to advertise instead of the worker package's (`--pp-version`).
    pub pp_version: Option<String>,
    /// Largest frame accepted after authentication (`--max-frame-size`).
    pub max_frame_size: usize,
    /// Most authenticated client connections at once (`--max-connections`);
    /// the default is lowered at startup when the open-file limit cannot
    /// hold it ([`crate::ops::openfiles`]).
    pub max_connections: usize,
    /// How long a stop waits for jobs already received (`--drain-timeout`).
    pub drain_timeout: Duration,
    /// Bytes the server may hold for client frames, jobs, packages and
    /// results (`--memory-limit`); see [`crate::memory::budget`].
    pub memory_limit: usize,
    /// Where `/metrics` and `/status` are served (`--metrics`); off if
    /// `None`.
    pub metrics: Option<std::net::SocketAddr>,
    /// Replace a worker after it has run this many jobs, between jobs
    /// (`--max-jobs-per-worker`); 0: never.
    pub max_jobs_per_worker: u64,
    /// Let a running job whose client left finish, as ppft does, instead
    /// of stopping its worker (`--keep-abandoned`).
    pub keep_abandoned: bool,
    /// Most connections in their handshake at once (`--max-handshakes`);
    /// the default is lowered as `max_connections`'s is.
    pub max_handshakes: usize,
    /// Of those, most from one address (`--max-handshakes-per-address`);
    /// `None`: half of `max_handshakes`.
    pub max_handshakes_per_address: Option<usize>,
    /// Networks clients may connect from (`--allow`); empty: everyone.
    pub allow: AllowList,
    /// Proxies whose connections begin with a PROXY protocol header naming
    /// the client (`--proxy-protocol`); empty: none.
    pub proxy_protocol: Networks,
    /// Longest delay before a wrong answer to the nonce is told `FAILED`
    /// (`--login-delay`); zero: no delays.
    pub login_delay: Duration,
    /// Stop a job's worker and answer the job with `None` once it has run
    /// this long (`--job-timeout`); `None`: no limit.
    pub job_timeout: Option<Duration>,
    /// How workers are started (`--worker-start`): forked from a
    /// fork-server that has the worker module and `preload` imported, or
    /// each a fresh interpreter.
    pub worker_start: WorkerStart,
    /// Modules the fork-server imports once for every worker
    /// (`--preload`); empty: none.
    pub preload: Vec<String>,
    /// A worker whose memory goes past this is stopped with its process
    /// group, and its job answered (`--worker-memory-limit`); `None`: no
    /// limit. The size as given is kept for the answer's text.
    pub worker_memory_limit: Option<WorkerMemoryLimit>,
    /// The users file (`--users`), read and checked; `None`: the one
    /// secret of `-s` ([`users::Users::new`] makes the users of both).
    pub users: Option<std::sync::Arc<users::UsersFile>>,
    /// Whether workers are kept to one user each (`--isolate`); `None`:
    /// by user when there is a users file, else not.
    pub isolate: Option<Isolate>,
    /// Where `max_connections` and `max_handshakes` were given, if they
    /// were: only defaults are lowered to fit the open-file limit, and a
    /// given budget that cannot fit is an error naming its flag or key.
    pub budget_origins: BudgetOrigins,
    /// Things worth a warning found while reading the config file (unknown
    /// keys), logged once logging is up.
    pub notes: Vec<String>,
}

/// Where the connection budgets were given; `None`: left at the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BudgetOrigins {
    /// `--max-connections` or its key.
    pub max_connections: Option<Origin>,
    /// `--max-handshakes` or its key.
    pub max_handshakes: Option<Origin>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interface: "0.0.0.0".into(),
            port: DEFAULT_PORT,
            secret: DEFAULT_SECRET.into(),
            secret_is_default: true,
            workers: num_cpus::get().max(1),
            restart: false,
            proto: None,
            socket_timeout: Duration::from_secs(3600),
            idle_exit: None,
            debug: false,
            verbose: false,
            quiet: false,
            log_format: LogFormat::parse(DEFAULT_FORMAT).expect("default format parses"),
            autodiscovery: false,
            broadcast: Vec::new(),
            announce: Vec::new(),
            advertise_ncpus: None,
            pid_file: None,
            ready_file: None,
            pp_secret: None,
            python: None,
            worker_module: None,
            pp_version: None,
            max_frame_size: DEFAULT_MAX_FRAME,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            drain_timeout: crate::ops::shutdown::DEFAULT_DRAIN_TIMEOUT,
            memory_limit: crate::memory::budget::default_limit().unwrap_or(FALLBACK_MEMORY_LIMIT),
            metrics: None,
            max_jobs_per_worker: 0,
            keep_abandoned: false,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_address: None,
            allow: AllowList::default(),
            proxy_protocol: Networks::default(),
            login_delay: DEFAULT_LOGIN_DELAY,
            job_timeout: None,
            worker_start: WorkerStart::Fork,
            preload: Vec::new(),
            worker_memory_limit: None,
            budget_origins: BudgetOrigins::default(),
            users: None,
            isolate: None,
            notes: Vec::new(),
        }
    }
}

/// Whether a worker serves one user only (`--isolate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolate {
    /// A worker that ran a job of one user runs only that user's jobs
    /// until it is replaced.
    User,
    /// Workers run anyone's jobs, as ppft's do.
    None,
}

/// How workers are started (`--worker-start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStart {
    /// Forked from the fork-server ([`crate::workers::forkserver`]), the
    /// default; spawning is the fallback when it cannot run.
    Fork,
    /// Each worker a fresh `python -u -m MODULE`, as ppft's server does.
    Spawn,
}

impl WorkerStart {
    /// The flag's value for this choice.
    pub fn name(self) -> &'static str {
        match self {
            WorkerStart::Fork => "fork",
            WorkerStart::Spawn => "spawn",
        }
    }
}

/// `--worker-memory-limit`: the bytes, and the size as the user wrote it,
/// which the answer to a stopped job repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerMemoryLimit {
    /// The limit in bytes.
    pub bytes: u64,
    /// As given, e.g. `200M`.
    pub text: String,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the server.
    Run(Box<Config>),
    /// Print the short usage text (`-h`) and exit successfully.
    Help,
    /// Print the long usage text (`--help`) and exit successfully.
    LongHelp,
    /// Print `ppserver X.Y.Z` and exit successfully.
    Version,
}

/// Where a setting came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag, as typed (`-p`, `--max-frame-size`).
    Flag(&'static str),
    /// A key of the config file (`-c`).
    Key {
        path: PathBuf,
        section: String,
        key: String,
        line: usize,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag(flag) => f.write_str(flag),
            Origin::Key {
                path,
                section,
                key,
                line,
            } => write!(
                f,
                "[{section}] {key} (config file {}, line {line})",
                path.display()
            ),
        }
    }
}

/// A bad command line or config file; every message names the flag, or
/// the config file's key and line.
#[derive(Debug)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    Invalid {
        /// Boxed: a config file key's origin is large, and errors are rare.
        at: Box<Origin>,
        value: String,
        why: String,
    },
    /// A file named by `flag` (`-c`, `--secret-file`) cannot be read.
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not in configobj's INI syntax.
    Syntax {
        path: PathBuf,
        source: inifile::SyntaxError,
    },
    /// The first line of `--secret-file` is empty.
    EmptySecret { path: PathBuf },
    /// An unknown flag, a flag without its value, or a stray argument.
    Usage(lexopt::Error),
    /// The users file (`--users`) cannot be read or has a mistake.
    Users(users::UsersError),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Invalid { at, value, why } => {
                write!(f, "invalid value {value:?} for {at}: {why}")
            }
            ConfigError::Read { flag, path, source } => {
                write!(f, "cannot read {} ({flag}): {source}", path.display())
            }
            ConfigError::Syntax { path, source } => {
                write!(f, "config file {} (-c): {source}", path.display())
            }
            ConfigError::EmptySecret { path } => write!(
                f,
                "--secret-file {}: the first line is empty",
                path.display()
            ),
            ConfigError::Usage(e) => write!(f, "{e}"),
            ConfigError::Users(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            ConfigError::Syntax { source, .. } => Some(source),
            ConfigError::Usage(e) => Some(e),
            ConfigError::Users(e) => Some(e),
            _ => None,
        }
    }
}

impl From<lexopt::Error> for ConfigError {
    fn from(e: lexopt::Error) -> Self {
        ConfigError::Usage(e)
    }
}

/// The worker module of pp 1.7.0, whose server defaults differ from ppft's.
pub const PP170_WORKER: &str = "pp._worker";

impl Config {
    /// Fills in the defaults that depend on the worker package, once the
    /// probe has found it: pp 1.7.0's server pickles with protocol 4 and
    /// reads `PP_SECRET` (after `PPSERVER_SECRET`); ppft's uses 2 and
    /// ignores `PP_SECRET`, since ppft and pathos clients never read it.
    pub fn settle_for_worker(&mut self, module: &str) {
        let pp170 = module == PP170_WORKER;
        if self.proto.is_none() {
            self.proto = Some(if pp170 { 4 } else { 2 });
        }
        if pp170 && self.secret_is_default {
            if let Some(secret) = self.pp_secret.clone() {
                self.secret = secret;
                self.secret_is_default = false;
            }
        }
    }

    /// Where the periodic `S` is broadcast: the `-b` addresses, else
    /// `255.255.255.255`, as ppft.
    pub fn broadcasts(&self) -> Vec<Ipv4Addr> {
        if self.broadcast.is_empty() {
            vec![Ipv4Addr::BROADCAST]
        } else {
            self.broadcast.clone()
        }
    }

    /// Everyone who may log in: the users file's users, and the `-s`
    /// secret's user `default` (see [`users::Users::new`]). Called once the
    /// secret is settled ([`Config::settle_for_worker`]).
    pub fn users(&self) -> Result<users::Users, users::UsersError> {
        users::Users::new(self.users.as_deref(), &self.secret, !self.secret_is_default)
    }

    /// Whether workers are kept to one user each: `--isolate`, else by
    /// user exactly when there is a users file.
    pub fn isolates_users(&self) -> bool {
        match self.isolate {
            Some(i) => i == Isolate::User,
            None => self.users.is_some(),
        }
    }

    /// The CPU count a `STAT` connection is told: `--advertise-ncpus`, else
    /// the number of workers.
    pub fn advertised_ncpus(&self) -> usize {
        self.advertise_ncpus.unwrap_or(self.workers)
    }

    /// The log level: `-q` errors only; `-d` debug; `-v` info. Otherwise
    /// info on a terminal or a file, and only warnings when stderr is a
    /// pipe or socket: launchers such as pathos read that pipe and wait
    /// for it to close if anything appears at startup, as ppft's server
    /// prints nothing there.
    pub fn log_level(&self, stderr_is_pipe: bool) -> log::LevelFilter {
        if self.quiet {
            log::LevelFilter::Error
        } else if self.debug {
            log::LevelFilter::Debug
        } else if self.verbose || !stderr_is_pipe {
            log::LevelFilter::Info
        } else {
            log::LevelFilter::Warn
        }
    }
}
