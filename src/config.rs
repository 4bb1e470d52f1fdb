//! Command line -> [`Config`].
//!
//! The flags are ppft's `ppserver` flags with ppft's meanings (parsed
//! getopt-style: `-dr`, `-p60000` and `-p 60000` all work), plus long
//! options for what ppft does not have. Parsing is a pure function of the
//! argument list ([`parse_args`]) so it can be tested without a process.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::DEFAULT_SECRET;

/// Default TCP port; ppft picks a random one, which leaves users guessing.
pub const DEFAULT_PORT: u16 = 60000;
/// Default per-frame payload limit once a client has authenticated. Large
/// enough for big numpy arguments, small enough that a bogus length is
/// refused instead of exhausting memory.
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;
/// Default cap on simultaneous client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Everything the server needs to run, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address or host name to listen on (`-i`).
    pub interface: String,
    /// TCP port (`-p`); 0 picks a free one.
    pub port: u16,
    /// Shared secret clients prove they know (`-s`).
    pub secret: String,
    /// True when no secret was given and pp's well-known default is used.
    pub secret_is_default: bool,
    /// Number of worker processes (`-w`).
    pub workers: usize,
    /// Replace each worker after every job (`-r`).
    pub restart: bool,
    /// Pickle protocol the workers use for results (`-n`).
    pub proto: i32,
    /// How long a client connection may sit idle between jobs (`-k`).
    pub socket_timeout: Duration,
    /// Debug logging (`-d`).
    pub debug: bool,
    /// Interpreter that runs the workers (`--python`).
    pub python: PathBuf,
    /// Python module run as the worker (`python -u -m MODULE`).
    pub worker_module: String,
    /// Version to advertise instead of the worker package's (`--pp-version`).
    pub pp_version: Option<String>,
    /// Largest frame accepted after authentication (`--max-frame-size`).
    pub max_frame_size: usize,
    /// Most client connections served at once (`--max-connections`).
    pub max_connections: usize,
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
            proto: 2,
            socket_timeout: Duration::from_secs(3600),
            debug: false,
            python: PathBuf::from("python3"),
            worker_module: "ppft".into(),
            pp_version: None,
            max_frame_size: DEFAULT_MAX_FRAME,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Run the server.
    Run(Box<Config>),
    /// Print the usage text and exit successfully.
    Help,
}

/// A bad command line, with a message that names the flag.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl From<lexopt::Error> for ConfigError {
    fn from(e: lexopt::Error) -> Self {
        ConfigError(e.to_string())
    }
}

/// Usage text, in ppft's layout, with our additions after its flags.
pub fn usage() -> String {
    format!(
        "Parallel Python Network Server (ppserver {version}, Rust)
Usage: ppserver [-hdr] [-n proto] [-i interface] [-p port] [-w nworkers]
                [-s secret] [-k seconds] [--python PATH] [--pp-version X]
                [--max-frame-size BYTES] [--max-connections N]

Options:
-h                 : this help message
-d                 : set log level to debug
-r                 : restart worker process after each task completion
-n proto           : protocol number for pickle module (default 2)
-i interface       : interface to listen (default 0.0.0.0)
-p port            : port to listen (default {port})
-w nworkers        : number of workers to start (default: number of CPUs)
-s secret          : secret for authentication (default: pp's public default)
-k seconds         : socket timeout in seconds (default 3600)
--python PATH      : Python interpreter that runs the workers (default python3);
                     it must be able to import ppft
--pp-version X     : version string to advertise to clients (default: the
                     __version__ of the worker interpreter's ppft)
--max-frame-size N : largest message accepted from an authenticated client,
                     in bytes (default {max_frame})
--max-connections N: most client connections at once (default {max_conn})

Clients must run the same pp version as the server advertises, and use the
same secret. Due to the security concerns always use a non-trivial secret.",
        version = env!("CARGO_PKG_VERSION"),
        port = DEFAULT_PORT,
        max_frame = DEFAULT_MAX_FRAME,
        max_conn = DEFAULT_MAX_CONNECTIONS,
    )
}

/// Parses a number for `flag`, with a message naming the flag.
fn number<T: std::str::FromStr>(flag: &str, value: OsString) -> Result<T, ConfigError> {
    let text = value.to_string_lossy();
    text.trim().parse().map_err(|_| {
        ConfigError(format!(
            "invalid value {text:?} for {flag}: expected a number"
        ))
    })
}

fn text(flag: &str, value: OsString) -> Result<String, ConfigError> {
    value
        .into_string()
        .map_err(|v| ConfigError(format!("invalid value {v:?} for {flag}: not valid UTF-8")))
}

/// Parses the arguments after the program name.
pub fn parse_args<I>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let mut cfg = Config::default();
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('d') => cfg.debug = true,
            Short('r') => cfg.restart = true,
            Short('n') => {
                let proto: i32 = number("-n", parser.value()?)?;
                if !(-1..=5).contains(&proto) {
                    return Err(ConfigError(format!(
                        "invalid value {proto} for -n: pickle protocols are 0 to 5 (or -1 for the highest)"
                    )));
                }
                cfg.proto = proto;
            }
            Short('i') => cfg.interface = text("-i", parser.value()?)?,
            Short('p') => cfg.port = number("-p", parser.value()?)?,
            Short('w') => {
                cfg.workers = number("-w", parser.value()?)?;
                if cfg.workers == 0 {
                    return Err(ConfigError(
                        "invalid value 0 for -w: at least one worker is needed".into(),
                    ));
                }
            }
            Short('s') => {
                cfg.secret = text("-s", parser.value()?)?;
                cfg.secret_is_default = false;
            }
            Short('k') => {
                let secs: u64 = number("-k", parser.value()?)?;
                if secs == 0 {
                    return Err(ConfigError(
                        "invalid value 0 for -k: must be at least 1".into(),
                    ));
                }
                cfg.socket_timeout = Duration::from_secs(secs);
            }
            Long("python") => cfg.python = PathBuf::from(parser.value()?),
            Long("pp-version") => {
                let v = text("--pp-version", parser.value()?)?;
                if v.is_empty() || !v.is_ascii() {
                    return Err(ConfigError(
                        "invalid value for --pp-version: must be non-empty ASCII".into(),
                    ));
                }
                cfg.pp_version = Some(v);
            }
            Long("max-frame-size") => {
                cfg.max_frame_size = number("--max-frame-size", parser.value()?)?;
                if cfg.max_frame_size < 1024 {
                    return Err(ConfigError(
                        "invalid value for --max-frame-size: must be at least 1024".into(),
                    ));
                }
            }
            Long("max-connections") => {
                cfg.max_connections = number("--max-connections", parser.value()?)?;
                if cfg.max_connections == 0 {
                    return Err(ConfigError(
                        "invalid value 0 for --max-connections: must be at least 1".into(),
                    ));
                }
            }
            Short(c @ ('a' | 'b' | 'c' | 'f' | 't' | 'P')) => {
                return Err(ConfigError(format!(
                    "-{c} is a ppft flag this ppserver does not support yet"
                )));
            }
            Value(v) => {
                return Err(ConfigError(format!(
                    "unexpected argument {:?}",
                    v.to_string_lossy()
                )))
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(Command::Run(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse_args(args.iter().copied()) {
            Ok(Command::Run(c)) => *c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        match parse_args(args.iter().copied()) {
            Err(e) => e.0,
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
        assert_eq!(c.proto, 2);
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
        assert_eq!(c.proto, 4);
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
        assert_eq!(c.python, PathBuf::from("/opt/py"));
        assert_eq!(c.pp_version.as_deref(), Some("1.6.6.4"));
        assert_eq!(c.max_frame_size, 4096);
    }

    #[test]
    fn help() {
        assert_eq!(parse_args(["-h"]), Ok(Command::Help));
        assert_eq!(parse_args(["--help"]), Ok(Command::Help));
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
    }
}
