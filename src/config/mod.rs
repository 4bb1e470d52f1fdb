//! Command line -> [`Config`].
//!
//! The flags are ppft's `ppserver` flags with ppft's meanings (parsed
//! getopt-style: `-dr`, `-p60000` and `-p 60000` all work), plus long
//! options for what ppft does not have. Parsing is a pure function of the
//! argument list ([`parse_args`]) so it can be tested without a process.

pub mod allow;
pub(crate) mod inifile;

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::allow::AllowList;
use crate::logging::format::{LogFormat, DEFAULT_FORMAT};
use crate::protocol::auth::DEFAULT_SECRET;

/// The default longest delay (`--login-delay`). After the free failures
/// the delay doubles from an eighth of the longest up to it, so one address gets about one verdict per longest delay, however
/// many connections it opens at once: 4 guesses a second by default.
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
/// Default cap on simultaneous client connections.
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
    /// Where discovery announcements go (`-b`).
    pub broadcast: Ipv4Addr,
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
    /// Most authenticated client connections at once (`--max-connections`).
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
    /// Most connections in their handshake at once (`--max-handshakes`).
    pub max_handshakes: usize,
    /// Of those, most from one address (`--max-handshakes-per-address`);
    /// `None`: half of `max_handshakes`.
    pub max_handshakes_per_address: Option<usize>,
    /// Networks clients may connect from (`--allow`); empty: everyone.
    pub allow: AllowList,
    /// Longest delay before a wrong answer to the nonce is told `FAILED`
    /// (`--login-delay`); zero: no delays.
    pub login_delay: Duration,
    /// Stop a job's worker and answer the job with `None` once it has run
    /// this long (`--job-timeout`); `None`: no limit.
    pub job_timeout: Option<Duration>,
    /// Things worth a warning found while reading the config file (unknown
    /// keys), logged once logging is up.
    pub notes: Vec<String>,
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
            broadcast: Ipv4Addr::BROADCAST,
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
            login_delay: DEFAULT_LOGIN_DELAY,
            job_timeout: None,
            notes: Vec::new(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the server.
    Run(Box<Config>),
    /// Print the usage text and exit successfully.
    Help,
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
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            ConfigError::Syntax { source, .. } => Some(source),
            ConfigError::Usage(e) => Some(e),
            _ => None,
        }
    }
}

impl From<lexopt::Error> for ConfigError {
    fn from(e: lexopt::Error) -> Self {
        ConfigError::Usage(e)
    }
}

/// Usage text, in ppft's layout, with our additions after its flags.
pub fn usage() -> String {
    format!(
        "Parallel Python Network Server (ppserver {version}, Rust)
Usage: ppserver [-hdqvar] [-f format] [-n proto] [-c config_path] [-i interface]
                [-b broadcast] [-p port] [-w nworkers] [-s secret] [-t seconds]
                [-k seconds] [-P pid_file] [--secret-file PATH] [--python PATH]
                [--worker-module MODULE] [--pp-version X]
                [--max-frame-size BYTES] [--max-connections N]
                [--ready-file PATH] [--drain-timeout SECONDS] [--memory-limit SIZE]
                [--max-jobs-per-worker N] [--keep-abandoned]
                [--metrics ADDR:PORT] [--max-handshakes N]
                [--max-handshakes-per-address N] [--allow CIDR]...
                [--login-delay SECONDS] [--job-timeout SECONDS]

Options:
-h                 : this help message
-d                 : set log level to debug
-q                 : quiet: log errors only (wins over -d and -v)
-v, --verbose      : log the startup line and other info even when stderr is
                     a pipe (default: info on a terminal or file; only
                     warnings and errors when stderr is a pipe or socket, so
                     launchers such as pathos see nothing at startup)
-f format          : log format (Python logging style; default
                     \"{default_format}\")
-a                 : enable auto-discovery service
-r                 : restart worker process after each task completion
-n proto           : protocol number for pickle module (default 2; 4 with
                     pp 1.7.0 workers, as pp 1.7.0's server)
-c path            : path to config file ([general] and [network] sections;
                     flags after -c override it)
-i interface       : interface to listen (default 0.0.0.0)
-b broadcast       : broadcast address for auto-discovery service
                     (default 255.255.255.255)
-p port            : port to listen (default {port})
-w nworkers        : number of workers to start (default: number of CPUs)
-s secret          : secret for authentication (visible to every user in ps:
                     prefer --secret-file or PPSERVER_SECRET)
-t seconds         : timeout to exit if no connections with clients exist
-k seconds         : socket timeout in seconds (default 3600)
-P pid_file        : file to write PID to
--secret-file PATH : read the secret from the first line of PATH
--python PATH      : Python interpreter that runs the workers (default: the
                     python beside this binary, as in a venv's bin/, if it
                     has ppft or pp; else python3)
--worker-module M  : worker module: ppft (python -u -m ppft) or pp._worker
                     (pp 1.7); default: ppft if installed, else pp._worker
--pp-version X     : version string to advertise to clients (default: the
                     __version__ of the worker package)
--max-frame-size N : largest message accepted from an authenticated client,
                     in bytes, K/M/G suffixes allowed (default {max_frame})
--memory-limit SIZE: memory for client frames, queued jobs, cached packages
                     and unwritten results; past it the server stops
                     reading new frames until memory is freed; K/M/G/T
                     suffixes (default: half of the smaller of the
                     machine's memory and the cgroup limit; here {memory})
--max-connections N: most authenticated client connections at once (default
                     {max_conn})
--max-handshakes N : most connections not yet authenticated, at once
                     (default {max_handshakes}); while half are in use, the
                     handshake timeout drops from 10 s to 2 s
--max-handshakes-per-address N
                   : of those, most from one address; an IPv6 /64 counts as
                     one (default: half of --max-handshakes)
--allow CIDR       : serve only clients from this network (10.0.0.0/8,
                     2001:db8::/32) or address; repeatable or
                     comma-separated; others are closed before a byte is
                     sent and get no autodiscovery answer (default: everyone)
--login-delay S    : wrong answers to the nonce from one address: the first 4
                     are told FAILED at once, then after a delay doubling up
                     to S seconds, one after another, so an address gets
                     about one guess per S; right answers never wait
                     (default {login_delay}; 0: no delays)
--ready-file PATH  : once listening with a worker up, write host:port to PATH
                     (atomically); removed when the server stops (default:
                     none)
--drain-timeout S  : on SIGTERM/SIGINT/SIGHUP, stop accepting and answer the
                     jobs already received for at most S seconds, then close
                     what is left (default {drain}; a second signal stops at
                     once)
--max-jobs-per-worker N: replace each worker after N jobs, between jobs
                     (for leaky extensions; default 0: never)
--keep-abandoned   : let a running job whose client left finish, as ppft
                     does (default: stop its worker and start a fresh one)
--metrics ADDR:PORT: serve Prometheus metrics at http://ADDR:PORT/metrics and
                     a summary at /status (default: off)
--job-timeout S    : stop the worker of a job that has run S seconds, answer
                     the job with None and a message, and start a fresh
                     worker (default 0: no limit)

Environment: PPSERVER_SECRET is the secret when none is given otherwise;
after it PP_SECRET, only with pp 1.7.0 workers (whose clients read it).
SIGUSR1 prints the job statistics; SIGTERM, SIGINT and SIGHUP stop the server
(SIGHUP stays ignored if it was ignored at start, as under nohup).
Clients must run the pp version the server advertises and use its secret.
Due to the security concerns always use a non-trivial secret key.",
        version = env!("CARGO_PKG_VERSION"),
        default_format = DEFAULT_FORMAT,
        port = DEFAULT_PORT,
        max_frame = DEFAULT_MAX_FRAME,
        max_conn = DEFAULT_MAX_CONNECTIONS,
        drain = crate::ops::shutdown::DEFAULT_DRAIN_TIMEOUT.as_secs(),
        memory = crate::memory::budget::default_limit().unwrap_or(FALLBACK_MEMORY_LIMIT),
        max_handshakes = DEFAULT_MAX_HANDSHAKES,
        login_delay = DEFAULT_LOGIN_DELAY.as_secs_f64(),
    )
}

/// A setting that can come from a flag or from the config file.
#[derive(Debug, Clone, Copy)]
enum Setting {
    Secret,
    Debug,
    Workers,
    Proto,
    Restart,
    PidFile,
    Quiet,
    Python,
    SecretFile,
    WorkerModule,
    PpVersion,
    MaxFrameSize,
    MaxConnections,
    Verbose,
    ReadyFile,
    DrainTimeout,
    MemoryLimit,
    Metrics,
    MaxJobsPerWorker,
    KeepAbandoned,
    JobTimeout,
    Autodiscovery,
    Interface,
    Broadcast,
    Port,
    IdleExit,
    SocketTimeout,
    MaxHandshakes,
    MaxHandshakesPerAddress,
    Allow,
    LoginDelay,
}

/// Config file keys, by section, as ppft's `parse_config` reads them.
const FILE_KEYS: &[(&str, &str, Setting)] = &[
    ("general", "secret", Setting::Secret),
    ("general", "debug", Setting::Debug),
    ("general", "workers", Setting::Workers),
    ("general", "proto", Setting::Proto),
    ("general", "restart", Setting::Restart),
    ("general", "pid_file", Setting::PidFile),
    ("general", "quiet", Setting::Quiet),
    ("general", "python", Setting::Python),
    ("general", "secret_file", Setting::SecretFile),
    ("general", "worker_module", Setting::WorkerModule),
    ("general", "pp_version", Setting::PpVersion),
    ("general", "max_frame_size", Setting::MaxFrameSize),
    ("network", "max_connections", Setting::MaxConnections),
    ("general", "verbose", Setting::Verbose),
    ("general", "ready_file", Setting::ReadyFile),
    ("general", "drain_timeout", Setting::DrainTimeout),
    ("general", "memory_limit", Setting::MemoryLimit),
    ("general", "max_jobs_per_worker", Setting::MaxJobsPerWorker),
    ("general", "keep_abandoned", Setting::KeepAbandoned),
    ("network", "metrics", Setting::Metrics),
    ("general", "login_delay", Setting::LoginDelay),
    ("general", "job_timeout", Setting::JobTimeout),
    ("network", "autodiscovery", Setting::Autodiscovery),
    ("network", "interface", Setting::Interface),
    ("network", "broadcast", Setting::Broadcast),
    ("network", "port", Setting::Port),
    ("network", "timeout", Setting::IdleExit),
    ("network", "socket_timeout", Setting::SocketTimeout),
    ("network", "max_handshakes", Setting::MaxHandshakes),
    (
        "network",
        "max_handshakes_per_address",
        Setting::MaxHandshakesPerAddress,
    ),
    ("network", "allow", Setting::Allow),
];

fn invalid(at: &Origin, value: &str, why: &str) -> ConfigError {
    ConfigError::Invalid {
        at: Box::new(at.clone()),
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn number<T: std::str::FromStr>(name: &Origin, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(name, value, "expected a number in range"))
}

fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(
    name: &Origin,
    value: &str,
) -> Result<T, ConfigError> {
    let n: T = number(name, value)?;
    if n < T::from(1) {
        return Err(invalid(name, value, "must be at least 1"));
    }
    Ok(n)
}

/// A size in bytes: a number with an optional K, M, G or T suffix (powers
/// of 1024; `k`, `KB`, `KiB` alike).
fn size(name: &Origin, value: &str) -> Result<usize, ConfigError> {
    let v = value.trim();
    let digits = v.len() - v.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, unit) = v.split_at(digits);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => {
            return Err(invalid(
                name,
                value,
                "expected bytes, or a number with K, M, G or T",
            ))
        }
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1usize << shift))
        .ok_or_else(|| invalid(name, value, "expected bytes, or a number with K, M, G or T"))
}

fn boolean(name: &Origin, value: &str) -> Result<bool, ConfigError> {
    inifile::as_bool(value)
        .ok_or_else(|| invalid(name, value, "expected true/false, yes/no, on/off or 1/0"))
}

/// Sets one setting from text; `name` is the flag or key, for messages.
fn apply(
    cfg: &mut Config,
    setting: Setting,
    name: &Origin,
    value: &str,
) -> Result<(), ConfigError> {
    match setting {
        Setting::Secret => {
            cfg.secret = value.to_string();
            cfg.secret_is_default = false;
        }
        Setting::Debug => cfg.debug = boolean(name, value)?,
        Setting::Workers => cfg.workers = at_least_one(name, value)?,
        Setting::Proto => {
            let proto: i32 = number(name, value)?;
            if !(-1..=5).contains(&proto) {
                return Err(invalid(
                    name,
                    value,
                    "pickle protocols are 0 to 5 (or -1 for the highest)",
                ));
            }
            cfg.proto = Some(proto);
        }
        Setting::Restart => cfg.restart = boolean(name, value)?,
        Setting::PidFile => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty path"));
            }
            cfg.pid_file = Some(PathBuf::from(value));
        }
        Setting::Quiet => cfg.quiet = boolean(name, value)?,
        Setting::Verbose => cfg.verbose = boolean(name, value)?,
        Setting::ReadyFile => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty path"));
            }
            cfg.ready_file = Some(PathBuf::from(value));
        }
        Setting::DrainTimeout => cfg.drain_timeout = Duration::from_secs(number(name, value)?),
        Setting::MemoryLimit => {
            let bytes = size(name, value)?;
            if bytes < MIN_MEMORY_LIMIT {
                return Err(invalid(name, value, "must be at least 1M"));
            }
            cfg.memory_limit = bytes;
        }
        Setting::MaxJobsPerWorker => cfg.max_jobs_per_worker = number(name, value)?,
        Setting::KeepAbandoned => cfg.keep_abandoned = boolean(name, value)?,
        Setting::Metrics => {
            cfg.metrics =
                Some(value.trim().parse().map_err(|_| {
                    invalid(name, value, "expected ADDRESS:PORT, e.g. 127.0.0.1:9464")
                })?)
        }
        Setting::Python => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty path"));
            }
            cfg.python = Some(PathBuf::from(value));
        }
        Setting::SecretFile => {
            cfg.secret = secret_from_file(Path::new(value))?;
            cfg.secret_is_default = false;
        }
        Setting::WorkerModule => {
            let module_name =
                |p: &str| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_');
            if !value.split('.').all(module_name) {
                return Err(invalid(
                    name,
                    value,
                    "expected a Python module name such as ppft or pp._worker",
                ));
            }
            cfg.worker_module = Some(value.to_string());
        }
        Setting::PpVersion => {
            if value.is_empty() || !value.is_ascii() {
                return Err(invalid(name, value, "must be non-empty ASCII"));
            }
            cfg.pp_version = Some(value.to_string());
        }
        Setting::MaxFrameSize => {
            let bytes = size(name, value)?;
            if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&bytes) {
                return Err(invalid(
                    name,
                    value,
                    &format!("must be from {MIN_MAX_FRAME} to {MAX_MAX_FRAME} bytes"),
                ));
            }
            cfg.max_frame_size = bytes;
        }
        Setting::MaxConnections => cfg.max_connections = at_least_one(name, value)?,
        Setting::JobTimeout => {
            let secs: u64 = number(name, value)?;
            cfg.job_timeout = (secs > 0).then(|| Duration::from_secs(secs));
        }
        Setting::Autodiscovery => cfg.autodiscovery = boolean(name, value)?,
        Setting::Interface => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty address"));
            }
            cfg.interface = value.to_string();
        }
        Setting::Broadcast => {
            cfg.broadcast = value
                .trim()
                .parse()
                .map_err(|_| invalid(name, value, "expected an IPv4 address"))?;
        }
        Setting::Port => cfg.port = number(name, value)?,
        Setting::IdleExit => cfg.idle_exit = Some(Duration::from_secs(at_least_one(name, value)?)),
        Setting::SocketTimeout => {
            cfg.socket_timeout = Duration::from_secs(at_least_one(name, value)?)
        }
        Setting::MaxHandshakes => cfg.max_handshakes = at_least_one(name, value)?,
        Setting::MaxHandshakesPerAddress => {
            cfg.max_handshakes_per_address = Some(at_least_one(name, value)?)
        }
        Setting::LoginDelay => {
            let secs: f64 = number(name, value)?;
            if !(0.0..=MAX_LOGIN_DELAY.as_secs_f64()).contains(&secs) {
                return Err(invalid(
                    name,
                    value,
                    &format!("must be from 0 to {} seconds", MAX_LOGIN_DELAY.as_secs()),
                ));
            }
            cfg.login_delay = Duration::from_secs_f64(secs);
        }
        Setting::Allow => {
            // The file's list replaces one given by flags before -c; each
            // --allow adds to the list.
            if matches!(name, Origin::Key { .. }) {
                cfg.allow.clear();
            }
            cfg.allow
                .extend_from(value)
                .map_err(|why| invalid(name, value, &why))?;
        }
    }
    Ok(())
}

/// Reads a config file over `cfg`, like ppft's `-c`: the file's values
/// replace what flags before `-c` set, and flags after it replace the
/// file's. Unlike ppft, a value that does not parse is an error, not
/// silently ignored.
fn apply_file(cfg: &mut Config, path: &Path) -> Result<(), ConfigError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        flag: "-c",
        path: path.to_path_buf(),
        source,
    })?;
    let sections = inifile::parse(&text).map_err(|source| ConfigError::Syntax {
        path: path.to_path_buf(),
        source,
    })?;
    for (section, keys) in &sections {
        for (key, (value, line)) in keys {
            let known = FILE_KEYS.iter().find(|(s, k, _)| s == section && k == key);
            match known {
                Some(&(_, _, setting)) => {
                    let at = Origin::Key {
                        path: path.to_path_buf(),
                        section: section.clone(),
                        key: key.clone(),
                        line: *line,
                    };
                    apply(cfg, setting, &at, value)?;
                }
                None => cfg.notes.push(format!(
                    "config file {shown}, line {line}: unknown key [{section}] {key}, ignored"
                )),
            }
        }
    }
    Ok(())
}

/// Reads a secret from the first line of a file.
fn secret_from_file(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        flag: "--secret-file",
        path: path.to_path_buf(),
        source,
    })?;
    let secret = text
        .lines()
        .next()
        .unwrap_or("")
        .trim_end_matches('\r')
        .to_string();
    if secret.is_empty() {
        return Err(ConfigError::EmptySecret {
            path: path.to_path_buf(),
        });
    }
    Ok(secret)
}

fn text(flag: &'static str, value: OsString) -> Result<String, ConfigError> {
    value
        .into_string()
        .map_err(|v| invalid(&Origin::Flag(flag), &v.to_string_lossy(), "not valid UTF-8"))
}

/// The environment variables the server reads.
#[derive(Debug, Default, Clone)]
pub struct Env {
    /// `PPSERVER_SECRET`: the secret when no flag or config key gives one.
    pub ppserver_secret: Option<String>,
    /// `PP_SECRET`: pp 1.7.0's variable; see [`Config::pp_secret`].
    pub pp_secret: Option<String>,
}

impl Env {
    /// The process's environment.
    pub fn from_process() -> Env {
        let var = |name| std::env::var(name).ok().filter(|s: &String| !s.is_empty());
        Env {
            ppserver_secret: var("PPSERVER_SECRET"),
            pp_secret: var("PP_SECRET"),
        }
    }
}

/// Parses the arguments after the program name, with the process's
/// environment.
pub fn parse_args<I>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    parse_args_with(args, &Env::from_process())
}

/// [`parse_args`] with the environment passed in, for tests.
pub fn parse_args_with<I>(args: I, env: &Env) -> Result<Command, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let mut cfg = Config::default();
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next()? {
        let setting = match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('d') => {
                cfg.debug = true;
                continue;
            }
            Short('v') | Long("verbose") => {
                cfg.verbose = true;
                continue;
            }
            Short('q') | Long("quiet") => {
                cfg.quiet = true;
                continue;
            }
            Long("ready-file") => {
                let path = PathBuf::from(parser.value()?);
                if path.as_os_str().is_empty() {
                    return Err(invalid(&Origin::Flag("--ready-file"), "", "empty path"));
                }
                cfg.ready_file = Some(path);
                continue;
            }
            Short('r') => {
                cfg.restart = true;
                continue;
            }
            Short('a') => {
                cfg.autodiscovery = true;
                continue;
            }
            Short('c') => {
                let path = PathBuf::from(parser.value()?);
                apply_file(&mut cfg, &path)?;
                continue;
            }
            Short('f') => {
                let fmt = text("-f", parser.value()?)?;
                cfg.log_format =
                    LogFormat::parse(&fmt).map_err(|e| invalid(&Origin::Flag("-f"), &fmt, &e))?;
                continue;
            }
            Long("secret-file") => {
                cfg.secret = secret_from_file(Path::new(&parser.value()?))?;
                cfg.secret_is_default = false;
                continue;
            }
            Long("python") => {
                cfg.python = Some(PathBuf::from(parser.value()?));
                continue;
            }
            Long("worker-module") => ("--worker-module", Setting::WorkerModule),
            Long("pp-version") => ("--pp-version", Setting::PpVersion),
            Long("max-frame-size") => ("--max-frame-size", Setting::MaxFrameSize),
            Long("max-connections") => ("--max-connections", Setting::MaxConnections),
            Long("max-jobs-per-worker") => ("--max-jobs-per-worker", Setting::MaxJobsPerWorker),
            Long("job-timeout") => ("--job-timeout", Setting::JobTimeout),
            Long("keep-abandoned") => {
                cfg.keep_abandoned = true;
                continue;
            }
            Short('s') => ("-s", Setting::Secret),
            Short('n') => ("-n", Setting::Proto),
            Short('i') => ("-i", Setting::Interface),
            Short('b') => ("-b", Setting::Broadcast),
            Short('p') => ("-p", Setting::Port),
            Short('w') => ("-w", Setting::Workers),
            Short('t') => ("-t", Setting::IdleExit),
            Short('k') => ("-k", Setting::SocketTimeout),
            Short('P') => ("-P", Setting::PidFile),
            Long("drain-timeout") => ("--drain-timeout", Setting::DrainTimeout),
            Long("memory-limit") => ("--memory-limit", Setting::MemoryLimit),
            Long("metrics") => ("--metrics", Setting::Metrics),
            Long("max-handshakes") => ("--max-handshakes", Setting::MaxHandshakes),
            Long("max-handshakes-per-address") => (
                "--max-handshakes-per-address",
                Setting::MaxHandshakesPerAddress,
            ),
            Long("allow") => ("--allow", Setting::Allow),
            Long("login-delay") => ("--login-delay", Setting::LoginDelay),
            Value(v) => return Err(lexopt::Error::UnexpectedArgument(v).into()),
            _ => return Err(arg.unexpected().into()),
        };
        let (flag, setting) = setting;
        let value = text(flag, parser.value()?)?;
        apply(&mut cfg, setting, &Origin::Flag(flag), &value)?;
    }
    if cfg.secret_is_default {
        if let Some(secret) = env.ppserver_secret.clone() {
            cfg.secret = secret;
            cfg.secret_is_default = false;
        }
    }
    cfg.pp_secret = env.pp_secret.clone();
    Ok(Command::Run(Box::new(cfg)))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse_args_with(args.iter().copied(), &Env::default()) {
            Ok(Command::Run(c)) => *c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        match parse_args_with(args.iter().copied(), &Env::default()) {
            Err(e) => e.to_string(),
            other => panic!("{args:?} should fail: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[]);
        assert_eq!(c.port, 60000);
        assert_eq!(c.interface, "0.0.0.0");
        assert_eq!(c.secret, DEFAULT_SECRET);
        assert!(c.secret_is_default);
        assert_eq!(c.proto, None, "settled by the worker package");
        assert_eq!(c.socket_timeout, Duration::from_secs(3600));
        assert!(c.workers >= 1);
    }

    #[test]
    fn getopt_style_flags() {
        let c = run(&[
            "-dr",
            "-p61000",
            "-w",
            "3",
            "-s",
            "x y",
            "-i127.0.0.1",
            "-n",
            "4",
            "-k",
            "5",
        ]);
        assert!(c.debug && c.restart);
        assert_eq!(c.port, 61000);
        assert_eq!(c.workers, 3);
        assert_eq!(c.secret, "x y");
        assert!(!c.secret_is_default);
        assert_eq!(c.interface, "127.0.0.1");
        assert_eq!(c.proto, Some(4));
        assert_eq!(c.socket_timeout, Duration::from_secs(5));
    }

    #[test]
    fn long_options() {
        let c = run(&[
            "--python",
            "/opt/py",
            "--pp-version=1.6.6.4",
            "--max-frame-size",
            "4096",
        ]);
        assert_eq!(c.python, Some(PathBuf::from("/opt/py")));
        assert_eq!(c.pp_version.as_deref(), Some("1.6.6.4"));
        assert_eq!(c.max_frame_size, 4096);
    }

    #[test]
    fn help() {
        assert!(matches!(
            parse_args_with(["-h"], &Env::default()),
            Ok(Command::Help)
        ));
        assert!(matches!(
            parse_args_with(["--help"], &Env::default()),
            Ok(Command::Help)
        ));
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(err(&["-p", "x"]).contains("-p"));
        assert!(err(&["-p", "70000"]).contains("-p"));
        assert!(err(&["-w", "0"]).contains("-w"));
        assert!(err(&["-w", "-3"]).contains("-w"));
        assert!(err(&["-n", "9"]).contains("-n"));
        assert!(err(&["-k", "0"]).contains("-k"));
        assert!(err(&["-p"]).contains("-p"), "missing value");
        assert!(err(&["-x"]).contains("-x"));
        assert!(err(&["--bogus"]).contains("--bogus"));
        assert!(err(&["stray"]).contains("stray"));
        assert!(err(&["--max-frame-size", "10"]).contains("--max-frame-size"));
        // Regression: accepted, then frame arithmetic overflowed.
        assert!(err(&["--max-frame-size", "18446744073709551615"]).contains("--max-frame-size"));
        assert!(err(&["--max-frame-size", "1099511627777"]).contains("--max-frame-size"));
        assert_eq!(
            run(&["--max-frame-size", "1099511627776"]).max_frame_size,
            MAX_MAX_FRAME
        );
        assert!(err(&["-t", "0"]).contains("-t"));
        assert!(err(&["-b", "nowhere"]).contains("-b"));
        assert!(err(&["-f", "%(bogus)s"]).contains("-f"));
        assert!(err(&["--worker-module", "a b"]).contains("--worker-module"));
        assert!(err(&["-c", "/nonexistent/ppserver.conf"]).contains("-c"));
        assert!(err(&["--secret-file", "/nonexistent/secret"]).contains("--secret-file"));
    }

    fn temp_file(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ppserver-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn ppft_flags() {
        let c = run(&[
            "-a",
            "-b",
            "192.0.2.255",
            "-t",
            "30",
            "-P",
            "/run/pp.pid",
            "-f",
            "%(message)s",
        ]);
        assert!(c.autodiscovery);
        assert_eq!(c.broadcast, Ipv4Addr::new(192, 0, 2, 255));
        assert_eq!(c.idle_exit, Some(Duration::from_secs(30)));
        assert_eq!(c.pid_file, Some(PathBuf::from("/run/pp.pid")));
    }

    #[test]
    fn config_file_then_later_flags_override_it() {
        let path = temp_file(
            "a.conf",
            "[general]\nsecret = filesecret\nworkers = 3\ndebug = true\nrestart = yes\nproto = 4\npid_file = /tmp/x.pid\n\
             [network]\nautodiscovery = on\ninterface = 127.0.0.1\nbroadcast = 192.0.2.255\nport = 61001\ntimeout = 9\nsocket_timeout = 8\nextra = 1\n",
        );
        let p = path.to_str().unwrap();
        let c = run(&["-w", "7", "-c", p, "-p", "62000"]);
        assert_eq!(c.secret, "filesecret");
        assert_eq!(c.workers, 3, "file overrides flags before -c");
        assert_eq!(c.port, 62000, "flags after -c override the file");
        assert!(c.debug && c.restart && c.autodiscovery);
        assert_eq!(c.proto, Some(4));
        assert_eq!(c.interface, "127.0.0.1");
        assert_eq!(c.idle_exit, Some(Duration::from_secs(9)));
        assert_eq!(c.socket_timeout, Duration::from_secs(8));
        assert_eq!(c.pid_file, Some(PathBuf::from("/tmp/x.pid")));
        assert_eq!(c.notes.len(), 1, "unknown key noted: {:?}", c.notes);
    }

    #[test]
    fn config_file_bad_value_names_key_and_line() {
        let path = temp_file("b.conf", "[general]\nworkers = many\n");
        match parse_args_with(["-c", path.to_str().unwrap()], &Env::default()) {
            Err(ConfigError::Invalid { at, .. }) => assert!(
                matches!(*at, Origin::Key { ref key, line: 2, .. } if key == "workers"),
                "{at:?}"
            ),
            other => panic!("{other:?}"),
        }
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(
            e.contains("[general] workers") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn secret_sources() {
        let path = temp_file("secret", "s3cret\nignored\n");
        let p = path.to_str().unwrap();
        let c = run(&["--secret-file", p]);
        assert_eq!(c.secret, "s3cret");
        assert!(!c.secret_is_default);
        let from_env = |args: &[&str]| match parse_args_with(
            args.iter().copied(),
            &Env {
                ppserver_secret: Some("envsecret".into()),
                pp_secret: None,
            },
        ) {
            Ok(Command::Run(c)) => c.secret,
            other => panic!("{other:?}"),
        };
        assert_eq!(from_env(&[]), "envsecret");
        assert_eq!(
            from_env(&["-s", "flag"]),
            "flag",
            "a flag beats the environment"
        );
    }

    #[test]
    fn quiet_verbose_and_the_log_level() {
        use log::LevelFilter::*;
        let level = |args: &[&str], pipe| run(args).log_level(pipe);
        assert_eq!(level(&[], false), Info, "terminal or file: startup line");
        assert_eq!(level(&[], true), Warn, "launcher's pipe: silent start");
        assert_eq!(level(&["-v"], true), Info);
        assert_eq!(level(&["--verbose"], true), Info);
        assert_eq!(level(&["-d"], true), Debug);
        assert_eq!(level(&["-q"], false), Error);
        assert_eq!(level(&["-q", "-v", "-d"], false), Error, "-q wins");
        assert_eq!(level(&["--quiet"], false), Error);
        let path = temp_file("q.conf", "[general]\nquiet = yes\nverbose = no\n");
        assert_eq!(level(&["-c", path.to_str().unwrap()], false), Error);
        let path = temp_file("v.conf", "[general]\nverbose = true\n");
        assert_eq!(level(&["-c", path.to_str().unwrap()], true), Info);
    }

    #[test]
    fn ready_file_flag_and_key() {
        assert_eq!(
            run(&["--ready-file", "/run/pp.ready"]).ready_file,
            Some(PathBuf::from("/run/pp.ready"))
        );
        let path = temp_file("r.conf", "[general]\nready_file = /tmp/r\n");
        assert_eq!(
            run(&["-c", path.to_str().unwrap()]).ready_file,
            Some(PathBuf::from("/tmp/r"))
        );
        assert!(err(&["--ready-file", ""]).contains("--ready-file"));
    }

    #[test]
    fn worker_recycling_and_abandoned_jobs_flags_and_keys() {
        let c = run(&[]);
        assert_eq!(c.max_jobs_per_worker, 0, "default: never recycled");
        assert!(!c.keep_abandoned, "default: abandoned jobs are stopped");
        let c = run(&["--max-jobs-per-worker", "3", "--keep-abandoned"]);
        assert_eq!(c.max_jobs_per_worker, 3);
        assert!(c.keep_abandoned);
        assert_eq!(run(&["--max-jobs-per-worker=0"]).max_jobs_per_worker, 0);
        assert!(err(&["--max-jobs-per-worker", "-1"]).contains("--max-jobs-per-worker"));
        assert!(err(&["--max-jobs-per-worker", "x"]).contains("--max-jobs-per-worker"));
        assert!(err(&["--keep-abandoned=yes"]).contains("--keep-abandoned"));
        let path = temp_file(
            "m.conf",
            "[general]\nmax_jobs_per_worker = 100\nkeep_abandoned = yes\n",
        );
        let c = run(&["-c", path.to_str().unwrap()]);
        assert_eq!(c.max_jobs_per_worker, 100);
        assert!(c.keep_abandoned);
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        let path = temp_file("m2.conf", "[general]\nmax_jobs_per_worker = lots\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(e.contains("[general] max_jobs_per_worker"), "{e}");
    }

    #[test]
    fn connection_budgets_and_the_allow_list() {
        let c = run(&[]);
        assert_eq!(c.max_handshakes, DEFAULT_MAX_HANDSHAKES);
        assert_eq!(c.max_handshakes_per_address, None);
        assert!(c.allow.is_everyone());
        let c = run(&[
            "--max-handshakes",
            "8",
            "--max-handshakes-per-address=3",
            "--allow",
            "127.0.0.1/32",
            "--allow",
            "10.0.0.0/8,2001:db8::/32",
        ]);
        assert_eq!(c.max_handshakes, 8);
        assert_eq!(c.max_handshakes_per_address, Some(3));
        assert_eq!(
            c.allow.to_string(),
            "127.0.0.1/32, 10.0.0.0/8, 2001:db8::/32"
        );
        assert!(err(&["--max-handshakes", "0"]).contains("--max-handshakes"));
        assert!(
            err(&["--max-handshakes-per-address", "x"]).contains("--max-handshakes-per-address")
        );
        assert!(err(&["--allow", "10.0.0.0/40"]).contains("--allow"));
        assert!(err(&["--allow", "somehost"]).contains("--allow"));
        assert!(err(&["--allow", ""]).contains("--allow"));
        assert_eq!(c.login_delay, DEFAULT_LOGIN_DELAY);
        assert_eq!(run(&["--login-delay", "0"]).login_delay, Duration::ZERO);
        assert_eq!(
            run(&["--login-delay", "2.5"]).login_delay,
            Duration::from_millis(2500)
        );
        for bad in ["-1", "61", "NaN", "x"] {
            assert!(
                err(&["--login-delay", bad]).contains("--login-delay"),
                "{bad}"
            );
        }

        let path = temp_file(
            "n.conf",
            "[general]\nlogin_delay = 1\n[network]\nmax_handshakes = 16\nmax_handshakes_per_address = 2\nallow = 192.0.2.0/24, ::1\n",
        );
        let p = path.to_str().unwrap();
        let c = run(&["--allow", "10.0.0.1", "-c", p, "--allow", "127.0.0.1"]);
        assert_eq!(
            (c.max_handshakes, c.max_handshakes_per_address),
            (16, Some(2))
        );
        assert_eq!(c.login_delay, Duration::from_secs(1));
        assert_eq!(
            c.allow.to_string(),
            "192.0.2.0/24, ::1/128, 127.0.0.1/32",
            "the file replaces earlier flags; later flags add"
        );
        let path = temp_file("bad-allow.conf", "[network]\nallow = 300.0.0.0/8\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(e.contains("[network] allow") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn job_timeout_flag_and_key() {
        assert_eq!(run(&[]).job_timeout, None, "default: no limit");
        assert_eq!(
            run(&["--job-timeout", "30"]).job_timeout,
            Some(Duration::from_secs(30))
        );
        assert_eq!(run(&["--job-timeout=0"]).job_timeout, None, "0: no limit");
        assert!(err(&["--job-timeout", "-1"]).contains("--job-timeout"));
        assert!(err(&["--job-timeout", "1.5"]).contains("--job-timeout"));
        assert!(err(&["--job-timeout"]).contains("--job-timeout"));
        let path = temp_file("j.conf", "[general]\njob_timeout = 600\n");
        let c = run(&["-c", path.to_str().unwrap()]);
        assert_eq!(c.job_timeout, Some(Duration::from_secs(600)));
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        assert_eq!(
            run(&["-c", path.to_str().unwrap(), "--job-timeout", "0"]).job_timeout,
            None,
            "a later flag turns the file's limit off"
        );
        let path = temp_file("j2.conf", "[general]\njob_timeout = soon\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(e.contains("[general] job_timeout"), "{e}");
    }

    #[test]
    fn pp170_workers_read_pp_secret_and_pickle_with_protocol_4() {
        let parse = |args: &[&str], env: Env| match parse_args_with(args.iter().copied(), &env) {
            Ok(Command::Run(c)) => *c,
            other => panic!("{other:?}"),
        };
        let pp = |secret: &str| Env {
            ppserver_secret: None,
            pp_secret: Some(secret.into()),
        };
        // ppft workers: PP_SECRET is not ours to read; protocol 2.
        let mut c = parse(&[], pp("shared"));
        c.settle_for_worker("ppft");
        assert_eq!(c.secret, DEFAULT_SECRET);
        assert!(c.secret_is_default);
        assert_eq!(c.proto, Some(2));
        // pp 1.7.0 workers: PP_SECRET, protocol 4.
        let mut c = parse(&[], pp("shared"));
        c.settle_for_worker(PP170_WORKER);
        assert_eq!(c.secret, "shared");
        assert!(!c.secret_is_default);
        assert_eq!(c.proto, Some(4));
        // PPSERVER_SECRET and flags come first; -n is kept.
        let both = Env {
            ppserver_secret: Some("ours".into()),
            pp_secret: Some("shared".into()),
        };
        let mut c = parse(&["-n", "3"], both);
        c.settle_for_worker(PP170_WORKER);
        assert_eq!(c.secret, "ours");
        assert_eq!(c.proto, Some(3));
        let mut c = parse(&["-s", "flag"], pp("shared"));
        c.settle_for_worker(PP170_WORKER);
        assert_eq!(c.secret, "flag");
    }

    #[test]
    fn every_long_flag_that_makes_sense_has_a_key() {
        let secret = temp_file("keysecret", "from a file\n");
        let path = temp_file(
            "keys.conf",
            &format!(
                "[general]\npython = /opt/py/bin/python\nworker_module = pp._worker\n\
                 pp_version = 1.7.0\nmax_frame_size = 64M\nsecret_file = {}\n\
                 [network]\nmax_connections = 99\n",
                secret.display()
            ),
        );
        let c = run(&["-c", path.to_str().unwrap()]);
        assert_eq!(c.python, Some(PathBuf::from("/opt/py/bin/python")));
        assert_eq!(c.worker_module.as_deref(), Some("pp._worker"));
        assert_eq!(c.pp_version.as_deref(), Some("1.7.0"));
        assert_eq!(c.max_frame_size, 64 << 20);
        assert_eq!(c.max_connections, 99);
        assert_eq!(c.secret, "from a file");
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        let bad = temp_file("badkey.conf", "[general]\nworker_module = a b\n");
        assert!(err(&["-c", bad.to_str().unwrap()]).contains("[general] worker_module"));
    }
}
