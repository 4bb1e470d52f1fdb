//! The command line: ppft's flags, getopt-style, and ours, parsed by a
//! pure function of the argument list and the environment
//! ([`parse_args_with`]) so it can be tested without a process.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::config::file::apply_file;
use crate::config::options::{self, Action};
use crate::config::settings::{apply, invalid, secret_from_file, Setting};
use crate::config::{Command, Config, ConfigError, Origin};

/// One flag's value: paths as given (they need not be UTF-8), the rest
/// as text through the setting's checks.
fn apply_value(
    cfg: &mut Config,
    setting: Setting,
    flag: &'static str,
    value: OsString,
) -> Result<(), ConfigError> {
    match setting {
        Setting::Python => cfg.python = Some(PathBuf::from(value)),
        Setting::SecretFile => {
            cfg.secret = secret_from_file(Path::new(&value))?;
            cfg.secret_is_default = false;
        }
        Setting::ReadyFile if !value.is_empty() => cfg.ready_file = Some(PathBuf::from(value)),
        Setting::Users if !value.is_empty() => {
            cfg.users = Some(std::sync::Arc::new(
                crate::config::users::load(Path::new(&value)).map_err(ConfigError::Users)?,
            ));
        }
        _ => {
            let value = text(flag, value)?;
            apply(cfg, setting, &Origin::Flag(flag), &value)?;
        }
    }
    Ok(())
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
        // Every flag is looked up in the one table, so the parser accepts
        // nothing that `-h`, `--help` and the man page do not describe.
        let typed = match arg {
            Short(c) => format!("-{c}"),
            Long(l) => format!("--{l}"),
            Value(v) => return Err(lexopt::Error::UnexpectedArgument(v).into()),
        };
        let Some(opt) = options::by_flag(&typed) else {
            return Err(arg.unexpected().into());
        };
        let flag = if typed.starts_with("--") {
            opt.long
        } else {
            opt.short
        }
        .unwrap_or(opt.name());
        match opt.action {
            Action::Help => return Ok(Command::Help),
            Action::LongHelp => return Ok(Command::LongHelp),
            Action::Version => return Ok(Command::Version),
            Action::ConfigFile => apply_file(&mut cfg, Path::new(&parser.value()?))?,
            Action::Switch(setting) => apply(&mut cfg, setting, &Origin::Flag(flag), "true")?,
            Action::Value(setting) => {
                let value = parser.value()?;
                apply_value(&mut cfg, setting, flag, value)?;
            }
        }
    }
    if cfg.secret_is_default {
        if let Some(secret) = env.ppserver_secret.clone() {
            cfg.secret = secret;
            cfg.secret_is_default = false;
        }
    }
    cfg.pp_secret = env.pp_secret.clone();
    if !cfg.autodiscovery && !cfg.announce.is_empty() {
        cfg.notes.push(
            "--announce has no effect without autodiscovery (-a, or autodiscovery in the \
             config file)"
                .into(),
        );
    }
    Ok(Command::Run(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::config::{DEFAULT_LOGIN_DELAY, DEFAULT_MAX_HANDSHAKES, MAX_MAX_FRAME, PP170_WORKER};
    use crate::protocol::auth::DEFAULT_SECRET;

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
    fn given_budgets_remember_their_flag() {
        let c = run(&[]);
        assert_eq!(c.budget_origins, crate::config::BudgetOrigins::default());
        let c = run(&["--max-connections", "10", "--max-handshakes=6"]);
        assert_eq!((c.max_connections, c.max_handshakes), (10, 6));
        assert_eq!(
            c.budget_origins.max_connections,
            Some(Origin::Flag("--max-connections"))
        );
        assert_eq!(
            c.budget_origins.max_handshakes,
            Some(Origin::Flag("--max-handshakes"))
        );
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
            Ok(Command::LongHelp)
        ));
        assert!(matches!(
            parse_args_with(["-p", "1", "--version", "-p", "x"], &Env::default()),
            Ok(Command::Version)
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
        assert_eq!(c.broadcast, [Ipv4Addr::new(192, 0, 2, 255)]);
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
    fn proxy_protocol_flag_and_key() {
        assert!(run(&[]).proxy_protocol.is_empty(), "default: no proxy");
        let c = run(&[
            "--proxy-protocol",
            "127.0.0.1",
            "--proxy-protocol=10.0.0.0/8,2001:db8::/32",
        ]);
        assert_eq!(
            c.proxy_protocol.to_string(),
            "127.0.0.1/32, 10.0.0.0/8, 2001:db8::/32"
        );
        assert!(c.allow.is_everyone(), "a proxy list is no allow list");
        for bad in ["", "haproxy.example", "10.0.0.0/33"] {
            assert!(
                err(&["--proxy-protocol", bad]).contains("--proxy-protocol"),
                "{bad:?}"
            );
        }
        let path = temp_file("pp.conf", "[network]\nproxy_protocol = 192.0.2.1, ::1\n");
        let p = path.to_str().unwrap();
        let c = run(&[
            "--proxy-protocol",
            "10.0.0.1",
            "-c",
            p,
            "--proxy-protocol",
            "127.0.0.1",
        ]);
        assert_eq!(
            c.proxy_protocol.to_string(),
            "192.0.2.1/32, ::1/128, 127.0.0.1/32",
            "the file replaces earlier flags; later flags add"
        );
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        let path = temp_file("bad-pp.conf", "[network]\nproxy_protocol = proxy\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(e.contains("[network] proxy_protocol"), "{e}");
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
    fn worker_start_preload_and_worker_memory_limit_flags_and_keys() {
        use crate::config::{WorkerMemoryLimit, WorkerStart};
        let c = run(&[]);
        assert_eq!(c.worker_start, WorkerStart::Fork, "default: fork");
        assert!(c.preload.is_empty(), "default: nothing preloaded");
        assert_eq!(c.worker_memory_limit, None, "default: no limit");
        assert_eq!(
            run(&["--worker-start", "spawn"]).worker_start,
            WorkerStart::Spawn
        );
        assert!(err(&["--worker-start", "exec"]).contains("--worker-start"));
        let c = run(&[
            "--preload",
            "numpy.random,json",
            "--preload",
            "json",
            "--preload=csv",
        ]);
        assert_eq!(
            c.preload,
            ["numpy.random", "json", "csv"],
            "repeatable, once each"
        );
        assert!(err(&["--preload", "os;rm"]).contains("--preload"));
        assert!(err(&["--preload", "a..b"]).contains("--preload"));
        assert!(err(&["--preload", ""]).contains("--preload"));
        assert_eq!(
            run(&["--worker-memory-limit", "200M"]).worker_memory_limit,
            Some(WorkerMemoryLimit {
                bytes: 200 << 20,
                text: "200M".into()
            })
        );
        assert_eq!(run(&["--worker-memory-limit=0"]).worker_memory_limit, None);
        assert!(err(&["--worker-memory-limit", "1M"]).contains("at least 16M"));
        assert!(err(&["--worker-memory-limit", "lots"]).contains("--worker-memory-limit"));
        let path = temp_file(
            "fork.conf",
            "[general]\nworker_start = spawn\npreload = numpy, json\nworker_memory_limit = 1G\n",
        );
        let c = run(&[
            "--preload",
            "csv",
            "-c",
            path.to_str().unwrap(),
            "--preload",
            "os",
        ]);
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        assert_eq!(c.worker_start, WorkerStart::Spawn);
        assert_eq!(
            c.preload,
            ["numpy", "json", "os"],
            "the file replaces, flags add"
        );
        assert_eq!(c.worker_memory_limit.map(|l| l.bytes), Some(1 << 30));
        let path = temp_file("fork2.conf", "[general]\nworker_start = vfork\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(e.contains("[general] worker_start"), "{e}");
    }

    #[test]
    fn advertise_ncpus_flag_and_key() {
        let c = run(&["-w", "2"]);
        assert_eq!(c.advertise_ncpus, None, "default: the workers");
        assert_eq!(c.advertised_ncpus(), 2);
        let c = run(&["-w", "2", "--advertise-ncpus", "6"]);
        assert_eq!(c.advertise_ncpus, Some(6));
        assert_eq!(c.advertised_ncpus(), 6);
        assert_eq!(run(&["--advertise-ncpus=1"]).advertised_ncpus(), 1);
        for bad in ["0", "-1", "1.5", "six", "", "18446744073709551616"] {
            let e = err(&["--advertise-ncpus", bad]);
            assert!(e.contains("--advertise-ncpus"), "{bad}: {e}");
        }
        assert!(err(&["--advertise-ncpus"]).contains("--advertise-ncpus"));
        let path = temp_file("lb.conf", "[general]\nadvertise_ncpus = 24\n");
        let c = run(&["-w", "8", "-c", path.to_str().unwrap()]);
        assert_eq!(c.advertised_ncpus(), 24);
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        let path = temp_file("lb0.conf", "[general]\nadvertise_ncpus = 0\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(
            e.contains("[general] advertise_ncpus") && e.contains("at least 1"),
            "{e}"
        );
    }

    #[test]
    fn several_broadcast_addresses() {
        let c = run(&[]);
        assert!(c.broadcast.is_empty());
        assert_eq!(c.broadcasts(), [Ipv4Addr::BROADCAST], "ppft's default");
        let c = run(&["-b", "192.0.2.255", "-b", "198.51.100.255,203.0.113.255"]);
        let want: [Ipv4Addr; 3] = [
            "192.0.2.255".parse().unwrap(),
            "198.51.100.255".parse().unwrap(),
            "203.0.113.255".parse().unwrap(),
        ];
        assert_eq!(c.broadcasts(), want, "the first -b replaces the default");
        for bad in [
            "",
            ",",
            "192.0.2",
            "0.0.0.0",
            "host.example",
            "192.0.2.255,x",
        ] {
            assert!(err(&["-b", bad]).contains("-b"), "{bad:?}");
        }
        // The file's list replaces earlier flags; later flags add.
        let path = temp_file(
            "b.conf",
            "[network]\nbroadcast = 198.51.100.255, 203.0.113.255\n",
        );
        let p = path.to_str().unwrap();
        let c = run(&["-b", "192.0.2.255", "-c", p, "-b", "192.0.2.255"]);
        assert_eq!(c.broadcasts(), [want[1], want[2], want[0]]);
        let path = temp_file("b2.conf", "[network]\nbroadcast = 192.0.2.256\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(
            e.contains("[network] broadcast") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn announce_hosts_flag_and_key() {
        let c = run(&["-a"]);
        assert!(c.announce.is_empty(), "default: none");
        let c = run(&[
            "-a",
            "--announce",
            "203.0.113.7",
            "--announce=client-1.example.org,lab_pc",
        ]);
        assert_eq!(
            c.announce,
            ["203.0.113.7", "client-1.example.org", "lab_pc"]
        );
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        for bad in [
            "",
            "203.0.113.7:60000",
            "2001:db8::1",
            "0.0.0.0",
            "two words",
            "a..b",
            "-",
            "host/24",
        ] {
            let e = err(&["--announce", bad]);
            assert!(e.contains("--announce"), "{bad:?}: {e}");
        }
        assert!(err(&["--announce"]).contains("--announce"));
        // Without -a it does nothing: said at startup.
        let c = run(&["--announce", "203.0.113.7"]);
        assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
        assert!(c.notes[0].contains("--announce"), "{:?}", c.notes);
        let path = temp_file(
            "a.conf",
            "[network]\nautodiscovery = yes\nannounce = 203.0.113.7, 198.51.100.9\n",
        );
        let p = path.to_str().unwrap();
        let c = run(&["--announce", "192.0.2.1", "-c", p, "--announce", "lab"]);
        assert_eq!(c.announce, ["203.0.113.7", "198.51.100.9", "lab"]);
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        let path = temp_file("a2.conf", "[network]\nannounce = host:1\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(
            e.contains("[network] announce") && e.contains("port"),
            "{e}"
        );
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

    #[test]
    fn log_format_key_like_the_flag() {
        let path = temp_file(
            "f.conf",
            "[general]\nlog_format = '%(levelname)s %(message)s'\n",
        );
        let p = path.to_str().unwrap();
        let c = run(&["-c", p]);
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        assert_eq!(
            c.log_format,
            run(&["-f", "%(levelname)s %(message)s"]).log_format
        );
        assert_ne!(c.log_format, run(&[]).log_format);
        let c = run(&["-c", p, "-f", "%(message)s"]);
        assert_eq!(
            c.log_format,
            run(&["-f", "%(message)s"]).log_format,
            "a later -f wins"
        );
        let path = temp_file("f2.conf", "[general]\nlog_format = %(bogus)s\n");
        let e = err(&["-c", path.to_str().unwrap()]);
        assert!(
            e.contains("[general] log_format") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn a_key_in_the_wrong_section_is_ignored_and_the_warning_names_its_section() {
        let path = temp_file(
            "w.conf",
            "[network]\nworkers = 3\n[general]\nport = 61000\n",
        );
        let c = run(&["-w", "2", "-c", path.to_str().unwrap()]);
        assert_eq!(
            (c.workers, c.port),
            (2, crate::config::DEFAULT_PORT),
            "ignored"
        );
        assert_eq!(c.notes.len(), 2, "{:?}", c.notes);
        assert!(
            c.notes[0].contains("line 4") && c.notes[0].contains("port belongs in [network]"),
            "{:?}",
            c.notes
        );
        assert!(
            c.notes[1].contains("line 2") && c.notes[1].contains("workers belongs in [general]"),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn switches_from_the_table_set_what_their_keys_set() {
        let c = run(&["-a", "-r", "-d", "-v", "--keep-abandoned"]);
        assert!(c.autodiscovery && c.restart && c.debug && c.verbose && c.keep_abandoned);
        assert!(!c.quiet);
        assert!(err(&["--quiet=yes"]).contains("--quiet"));
    }

    /// Every flag of the table is one the parser takes: with a value the
    /// setting refuses, it is refused for the value, never as unknown.
    #[test]
    fn the_parser_takes_every_flag_in_the_table() {
        for o in options::OPTIONS {
            for flag in o.flags() {
                let args: Vec<&str> = match o.value {
                    Some(_) => vec![flag, "\u{1}bad\u{1}"],
                    None => vec![flag],
                };
                match parse_args_with(args.iter().copied(), &Env::default()) {
                    Err(ConfigError::Usage(e)) => panic!("{flag}: {e}"),
                    Err(e) => assert!(e.to_string().contains(flag), "{flag}: {e}"),
                    Ok(_) => {}
                }
            }
        }
        // And what is not in the table is not taken.
        for flag in ["-x", "-H", "--bogus", "--verbos", "--h", "--p"] {
            assert!(
                matches!(
                    parse_args_with([flag, "1"], &Env::default()),
                    Err(ConfigError::Usage(_))
                ),
                "{flag}"
            );
        }
    }

    #[test]
    fn every_key_is_read_from_its_section() {
        for o in options::OPTIONS {
            let Some((section, key)) = o.key else {
                continue;
            };
            let value = match o.default {
                options::DefaultIs::Value(v) => v.to_string(),
                _ if o.value.is_none() => "no".into(),
                _ => continue,
            };
            let dir = std::env::temp_dir().join(format!("ppserver-options-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{key}.conf"));
            std::fs::write(
                &path,
                format!("[{}]\n{key} = \"{value}\"\n", section.name()),
            )
            .unwrap();
            match parse_args_with(["-c", path.to_str().unwrap()], &Env::default()) {
                Ok(Command::Run(c)) => assert!(c.notes.is_empty(), "{key}: {:?}", c.notes),
                other => panic!("{key}: {other:?}"),
            }
        }
    }
}
