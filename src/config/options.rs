//! Every option, defined once: its names, value, config-file key and
//! section, default, bounds, and the texts `-h`, `--help` and the man pages
//! show. The parser ([`crate::config::flags`]) finds a flag here and
//! nowhere else, the config file ([`crate::config::file`]) its keys, and
//! [`crate::config::help`] and [`crate::config::docs`] render the texts, so
//! an option cannot be accepted without being documented.
//!
//! The order is `-h`'s: ppft's flags in ppft's order first (its users and
//! launchers know that layout), then ours.

use crate::config::settings::Setting;

/// A config-file section, as ppft's `parse_config` reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    General,
    Network,
}

impl Section {
    /// The name between the brackets.
    pub fn name(self) -> &'static str {
        match self {
            Section::General => "general",
            Section::Network => "network",
        }
    }
}

/// What an option's documented default is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultIs {
    /// Nothing worth saying (a switch that is off, `-h`).
    Unsaid,
    /// A value the option itself accepts, and which gives the built-in
    /// setting (a unit test holds the two together).
    Value(&'static str),
    /// Words: what happens when the option is not given.
    Text(&'static str),
}

/// What the parser does with an option.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action {
    /// `-h`: the short usage text.
    Help,
    /// `--help`: the long one.
    LongHelp,
    /// `--version`.
    Version,
    /// `-c`: read the config file here.
    ConfigFile,
    /// A switch: sets its [`Setting`] to true (as its key's `yes` does).
    Switch(Setting),
    /// An option with a value, checked by [`Setting`]'s rules.
    Value(Setting),
}

/// One option.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// The short flag as typed (`-p`), if there is one.
    pub short: Option<&'static str>,
    /// The long flag as typed (`--max-frame-size`), if there is one.
    pub long: Option<&'static str>,
    /// The value's name in the synopsis (`port`, `SECONDS`); `None`: a
    /// switch.
    pub value: Option<&'static str>,
    /// Whether the flag may be given again to add to a list.
    pub repeatable: bool,
    /// The config-file key and its section, if there is one.
    pub key: Option<(Section, &'static str)>,
    /// The default.
    pub default: DefaultIs,
    /// What values are accepted, as the parser checks them ("" when any).
    pub bounds: &'static str,
    /// For `-h`: a line or two.
    pub brief: &'static str,
    /// For `--help` and the man page, after `brief` ("" when there is no
    /// more to say).
    pub more: &'static str,
    pub(crate) action: Action,
}

impl Opt {
    /// The name an error message uses: the short flag, else the long one,
    /// else the key.
    pub fn name(&self) -> &'static str {
        self.short
            .or(self.long)
            .unwrap_or_else(|| self.key.map_or("", |k| k.1))
    }

    /// Every flag name, short then long.
    pub fn flags(&self) -> impl Iterator<Item = &'static str> {
        self.short.into_iter().chain(self.long)
    }

    /// `-p port`, `-v, --verbose`, `--allow CIDR`.
    pub fn synopsis(&self) -> String {
        let names: Vec<&str> = self.flags().collect();
        let mut s = names.join(", ");
        if let Some(v) = self.value {
            s.push(' ');
            s.push_str(v);
        }
        s
    }

    /// The long text: `brief` as a sentence, then `more`.
    pub fn long_text(&self) -> String {
        let mut chars = self.brief.chars();
        let first = chars.next().map(|c| c.to_uppercase().collect::<String>());
        let mut text = format!("{}{}.", first.unwrap_or_default(), chars.as_str());
        if !self.more.is_empty() {
            text.push(' ');
            text.push_str(self.more);
        }
        text
    }

    /// The default, as a phrase (`60000`, `none`), if one is said.
    pub fn default_text(&self) -> Option<&'static str> {
        match self.default {
            DefaultIs::Unsaid => None,
            DefaultIs::Value(v) | DefaultIs::Text(v) => Some(v),
        }
    }
}

/// The option a flag as typed (`-p`, `--allow`) names.
pub fn by_flag(flag: &str) -> Option<&'static Opt> {
    OPTIONS.iter().find(|o| o.flags().any(|f| f == flag))
}

/// The option a config-file key names, in any section.
pub fn by_key(key: &str) -> Option<&'static Opt> {
    OPTIONS
        .iter()
        .find(|o| o.key.is_some_and(|(_, k)| k == key))
}

const NONE: DefaultIs = DefaultIs::Text("none");

/// A row with its names and action; the rest of its fields are filled in
/// below.
const fn row(short: Option<&'static str>, long: Option<&'static str>, action: Action) -> Opt {
    Opt {
        short,
        long,
        value: None,
        repeatable: false,
        key: None,
        default: DefaultIs::Unsaid,
        bounds: "",
        brief: "",
        more: "",
        action,
    }
}

/// A switch's row.
const fn switch(short: Option<&'static str>, long: Option<&'static str>, s: Setting) -> Opt {
    row(short, long, Action::Switch(s))
}

/// An option with a value; the rest of its fields are filled in below.
const fn valued(
    short: Option<&'static str>,
    long: Option<&'static str>,
    value: &'static str,
    s: Setting,
) -> Opt {
    Opt {
        value: Some(value),
        ..row(short, long, Action::Value(s))
    }
}

const fn general(key: &'static str) -> Option<(Section, &'static str)> {
    Some((Section::General, key))
}

const fn network(key: &'static str) -> Option<(Section, &'static str)> {
    Some((Section::Network, key))
}

/// Every option the server accepts, in `-h`'s order.
pub static OPTIONS: &[Opt] = &[
    Opt {
        brief: "this help message",
        more: "The short one: --help gives every option's long text.",
        ..row(Some("-h"), None, Action::Help)
    },
    Opt {
        key: general("debug"),
        brief: "set log level to debug",
        ..switch(Some("-d"), None, Setting::Debug)
    },
    Opt {
        key: general("quiet"),
        brief: "quiet: log errors only (wins over -d and -v)",
        ..switch(Some("-q"), Some("--quiet"), Setting::Quiet)
    },
    Opt {
        key: general("verbose"),
        brief: "log the startup line and other info even when stderr is a pipe",
        more: "Without it the level is info on a terminal or a file, and only warnings \
               and errors when stderr is a pipe or socket, so launchers such as pathos, \
               which wait on that pipe, see nothing at startup.",
        ..switch(Some("-v"), Some("--verbose"), Setting::Verbose)
    },
    Opt {
        key: general("log_format"),
        default: DefaultIs::Value("%(asctime)s - %(name)s - %(levelname)s - %(message)s"),
        brief: "log format (Python logging style)",
        more: "The fields it may name: asctime, created, msecs, name, levelname, \
               levelno, message and process; another is an error.",
        ..valued(Some("-f"), None, "format", Setting::LogFormat)
    },
    Opt {
        key: network("autodiscovery"),
        brief: "enable auto-discovery service",
        more: "The server answers a client's C by broadcast and by unicast to the \
               client's address, and announces itself every 10 s to each -b address \
               and --announce host.",
        ..switch(Some("-a"), None, Setting::Autodiscovery)
    },
    Opt {
        key: general("restart"),
        brief: "restart worker process after each task completion",
        ..switch(Some("-r"), None, Setting::Restart)
    },
    Opt {
        key: general("proto"),
        default: DefaultIs::Text("2; 4 with pp 1.7.0 workers, as pp 1.7.0's server"),
        bounds: "0 to 5, or -1 for the highest",
        brief: "protocol number for pickle module",
        ..valued(Some("-n"), None, "proto", Setting::Proto)
    },
    Opt {
        brief: "path to config file ([general] and [network] sections; flags after -c \
                override it)",
        more: "Its keys are those of ppserver.conf(5). A list the file gives (allow, \
               broadcast, announce, preload) replaces what flags before -c gave; flags \
               after it add to the list. A key the server does not know, or in the \
               wrong section, is a warning and is ignored.",
        value: Some("config_path"),
        ..row(Some("-c"), None, Action::ConfigFile)
    },
    Opt {
        key: network("interface"),
        default: DefaultIs::Value("0.0.0.0"),
        brief: "interface to listen",
        more: "An address or a host name.",
        ..valued(Some("-i"), None, "interface", Setting::Interface)
    },
    Opt {
        key: network("broadcast"),
        repeatable: true,
        default: DefaultIs::Text("255.255.255.255"),
        bounds: "IPv4 addresses other than 0.0.0.0, comma-separated",
        brief: "broadcast address for auto-discovery service; repeatable or \
                comma-separated: one per subnet",
        more: "Give each interface's directed broadcast (e.g. 192.0.2.255), since \
               255.255.255.255 leaves by the default route's interface only; \
               announcements and answers go to each.",
        ..valued(Some("-b"), None, "broadcast", Setting::Broadcast)
    },
    Opt {
        key: network("port"),
        default: DefaultIs::Value("60000"),
        bounds: "0 to 65535; 0 picks a free port",
        brief: "port to listen",
        ..valued(Some("-p"), None, "port", Setting::Port)
    },
    Opt {
        key: general("workers"),
        default: DefaultIs::Text("the number of CPUs"),
        bounds: "at least 1",
        brief: "number of workers to start",
        ..valued(Some("-w"), None, "nworkers", Setting::Workers)
    },
    Opt {
        key: general("secret"),
        default: DefaultIs::Text("PPSERVER_SECRET, else pp's well-known default"),
        brief: "secret for authentication (visible to every user in ps: prefer \
                --secret-file or PPSERVER_SECRET)",
        more: "Clients must use the same secret. Always use a non-trivial one.",
        ..valued(Some("-s"), None, "secret", Setting::Secret)
    },
    Opt {
        key: network("timeout"),
        default: DefaultIs::Text("never"),
        bounds: "whole seconds, at least 1",
        brief: "timeout to exit if no connections with clients exist",
        more: "The server exits with status 0 once no client has been connected \
               for that long.",
        ..valued(Some("-t"), None, "seconds", Setting::IdleExit)
    },
    Opt {
        key: network("socket_timeout"),
        default: DefaultIs::Value("3600"),
        bounds: "whole seconds, at least 1",
        brief: "socket timeout in seconds",
        more: "How long a client connection may sit idle between jobs, or leave its \
               answer unread, before it is closed; the client reconnects when it next \
               needs it. It never limits a running job (see --job-timeout).",
        ..valued(Some("-k"), None, "seconds", Setting::SocketTimeout)
    },
    Opt {
        key: general("pid_file"),
        default: NONE,
        brief: "file to write PID to",
        more: "Removed when the server stops.",
        ..valued(Some("-P"), None, "pid_file", Setting::PidFile)
    },
    Opt {
        brief: "this list with every option's long text, default and bounds",
        ..row(None, Some("--help"), Action::LongHelp)
    },
    Opt {
        brief: "print the version (ppserver X.Y.Z) and exit",
        ..row(None, Some("--version"), Action::Version)
    },
    Opt {
        key: general("secret_file"),
        default: NONE,
        brief: "read the secret from the first line of PATH",
        more: "Unlike -s, the secret does not show in ps.",
        ..valued(None, Some("--secret-file"), "PATH", Setting::SecretFile)
    },
    Opt {
        key: general("python"),
        default: DefaultIs::Text(
            "the python beside this binary, as in a venv's bin/, if it has ppft or pp; \
             else python3",
        ),
        brief: "Python interpreter that runs the workers",
        ..valued(None, Some("--python"), "PATH", Setting::Python)
    },
    Opt {
        key: general("worker_module"),
        default: DefaultIs::Text("ppft if installed, else pp._worker"),
        bounds: "a Python module name",
        brief: "worker module: ppft (python -u -m ppft) or pp._worker (pp 1.7)",
        ..valued(
            None,
            Some("--worker-module"),
            "MODULE",
            Setting::WorkerModule,
        )
    },
    Opt {
        key: general("pp_version"),
        default: DefaultIs::Text("the __version__ of the worker package"),
        bounds: "non-empty ASCII",
        brief: "version string to advertise to clients",
        more: "Clients must run the pp version the server advertises.",
        ..valued(None, Some("--pp-version"), "X", Setting::PpVersion)
    },
    Opt {
        key: general("max_frame_size"),
        default: DefaultIs::Value("1G"),
        bounds: "1K to 1T",
        brief: "largest message accepted from an authenticated client, in bytes, \
                K/M/G/T suffixes allowed",
        more: "Before authentication the limit is a few kilobytes.",
        ..valued(
            None,
            Some("--max-frame-size"),
            "BYTES",
            Setting::MaxFrameSize,
        )
    },
    Opt {
        key: network("max_connections"),
        default: DefaultIs::Value("4096"),
        bounds: "at least 1",
        brief: "most authenticated client connections at once",
        more: "If the hard open-file limit cannot hold the two budgets (this and \
               --max-handshakes), their defaults are lowered to fit and the startup \
               line says so; a value given that cannot fit is an error.",
        ..valued(
            None,
            Some("--max-connections"),
            "N",
            Setting::MaxConnections,
        )
    },
    Opt {
        key: general("ready_file"),
        default: NONE,
        bounds: "a non-empty path",
        brief: "once listening with a worker up, write host:port to PATH (atomically)",
        more: "Removed when the server stops, and at once when a stop request comes.",
        ..valued(None, Some("--ready-file"), "PATH", Setting::ReadyFile)
    },
    Opt {
        key: general("drain_timeout"),
        default: DefaultIs::Value("20"),
        bounds: "whole seconds, 0 or more",
        brief: "on SIGTERM/SIGINT/SIGHUP, or once a reload's new process took over, answer \
                the jobs already received for at most SECONDS",
        more: "The server stops accepting at once, runs and answers every job already \
               received, closes each connection once it has no job pending, and after \
               SECONDS closes what is left (pp clients send those jobs again \
               elsewhere). A second signal, 1 s or more after the first, stops at \
               once.",
        ..valued(
            None,
            Some("--drain-timeout"),
            "SECONDS",
            Setting::DrainTimeout,
        )
    },
    Opt {
        key: general("memory_limit"),
        default: DefaultIs::Text(
            "half of the smaller of the machine's memory and the cgroup limit",
        ),
        bounds: "at least 1M",
        brief: "memory for client frames, queued jobs, cached packages and unwritten \
                results, K/M/G/T suffixes",
        more: "Past it the server stops reading new frames until memory is freed. With \
               several users (--users), a user's frames may hold at most its share: \
               SIZE * weight / (the weights of the users holding or waiting for memory, \
               plus 1), so another user's job is still read.",
        ..valued(None, Some("--memory-limit"), "SIZE", Setting::MemoryLimit)
    },
    Opt {
        key: general("max_jobs_per_worker"),
        default: DefaultIs::Value("0"),
        bounds: "0 (never) or more",
        brief: "replace each worker after N jobs, between jobs",
        more: "For leaky extensions.",
        ..valued(
            None,
            Some("--max-jobs-per-worker"),
            "N",
            Setting::MaxJobsPerWorker,
        )
    },
    Opt {
        key: general("keep_abandoned"),
        brief: "let a running job whose client left finish, as ppft does",
        more: "Without it, the job's worker is stopped and a fresh one started.",
        ..switch(None, Some("--keep-abandoned"), Setting::KeepAbandoned)
    },
    Opt {
        key: network("metrics"),
        default: DefaultIs::Text("off"),
        bounds: "ADDRESS:PORT",
        brief: "serve Prometheus metrics at http://ADDR:PORT/metrics and a summary at \
                /status",
        more: "At most 64 connections, 8 per address, the oldest idle one closed to \
               make room.",
        ..valued(None, Some("--metrics"), "ADDR:PORT", Setting::Metrics)
    },
    Opt {
        key: network("max_handshakes"),
        default: DefaultIs::Value("1024"),
        bounds: "at least 1",
        brief: "most connections not yet authenticated, at once",
        more: "Lowered to fit the open-file limit as --max-connections is. While half \
               are in use, the handshake timeout drops from 10 s to 2 s.",
        ..valued(None, Some("--max-handshakes"), "N", Setting::MaxHandshakes)
    },
    Opt {
        key: network("max_handshakes_per_address"),
        default: DefaultIs::Text("half of --max-handshakes"),
        bounds: "at least 1",
        brief: "of those, most from one address; an IPv6 /64 counts as one",
        ..valued(
            None,
            Some("--max-handshakes-per-address"),
            "N",
            Setting::MaxHandshakesPerAddress,
        )
    },
    Opt {
        key: network("allow"),
        repeatable: true,
        default: DefaultIs::Text("everyone"),
        bounds: "IPv4 or IPv6 addresses or networks, comma-separated",
        brief: "serve only clients from this network (10.0.0.0/8, 2001:db8::/32) or \
                address; repeatable or comma-separated",
        more: "Others are closed before a byte is sent and get no autodiscovery \
               answer.",
        ..valued(None, Some("--allow"), "CIDR", Setting::Allow)
    },
    Opt {
        key: network("proxy_protocol"),
        repeatable: true,
        default: NONE,
        bounds: "IPv4 or IPv6 addresses or networks, comma-separated",
        brief: "connections from this proxy's network or address (HAProxy with send-proxy \
                or send-proxy-v2) begin with a PROXY protocol header naming the client; \
                repeatable or comma-separated",
        more: "The header (v1 or v2) must come whole within 3 s, before the server \
               sends its version. From then on the client's address in it is the \
               connection's: --allow, the handshake budgets per address, the login \
               delay, fair share, the log and the metrics see it. A v2 LOCAL header \
               (a health check) or a v1 UNKNOWN one is served as the proxy's own \
               address. A missing, malformed or late header closes the connection \
               (counted as proxy_header among the refused connections). Connections \
               from other addresses are never read for a header, so list only \
               proxies you trust.",
        ..valued(
            None,
            Some("--proxy-protocol"),
            "CIDR",
            Setting::ProxyProtocol,
        )
    },
    Opt {
        key: general("login_delay"),
        default: DefaultIs::Value("0.25"),
        bounds: "0 (no delays) to 60 seconds, decimals allowed",
        brief: "longest delay before a wrong answer to the nonce is told FAILED",
        more: "The first 4 wrong answers from one address are told at once, then \
               after a delay doubling up to SECONDS, one after another, so an address \
               gets about one guess per SECONDS; right answers never wait.",
        ..valued(None, Some("--login-delay"), "SECONDS", Setting::LoginDelay)
    },
    Opt {
        key: general("job_timeout"),
        default: DefaultIs::Value("0"),
        bounds: "whole seconds, 0 (no limit) or more",
        brief: "stop the worker of a job that has run SECONDS, answer the job with None \
                and a message, and start a fresh worker",
        ..valued(None, Some("--job-timeout"), "SECONDS", Setting::JobTimeout)
    },
    Opt {
        key: general("users"),
        default: NONE,
        bounds: "a readable INI file, one [section] per user",
        brief: "the users file: several users, each with a secret of their own, and \
                their own limits and uid",
        more: "Each section is a user: secret (required, unique), and optionally uid, \
               gid, max_workers, max_queued, weight and job_timeout (see \
               ppserver.conf(5)). A login is matched to the user whose secret gives its \
               answer. The -s or --secret-file secret, if given, is one more user named \
               default; without it only the listed users can log in. A mistake in the \
               file is a startup error naming its line and user.",
        ..valued(None, Some("--users"), "PATH", Setting::Users)
    },
    Opt {
        key: general("isolate"),
        default: DefaultIs::Text("user with --users, else none"),
        bounds: "user or none",
        brief: "user: a worker that ran a job of one user runs only that user's jobs until \
                it is replaced; none: workers are shared",
        more: "A worker goes to another user only by being replaced with a fresh one, so \
               what one user's job leaves in a worker (a global, a patched module) is \
               never seen by another user's job. A worker serves its user for at least \
               100 ms, and waits 10 ms for its user's next job, before it goes to \
               another user with jobs waiting.",
        ..valued(None, Some("--isolate"), "user|none", Setting::Isolate)
    },
    Opt {
        key: general("advertise_ncpus"),
        default: DefaultIs::Text("-w, this server's workers"),
        bounds: "at least 1",
        brief: "the CPU count clients are told (STAT), which sizes their connections",
        more: "Behind a load balancer, give the workers of all the servers behind it.",
        ..valued(
            None,
            Some("--advertise-ncpus"),
            "N",
            Setting::AdvertiseNcpus,
        )
    },
    Opt {
        key: network("announce"),
        repeatable: true,
        default: NONE,
        bounds: "IPv4 addresses or host names without a port, comma-separated",
        brief: "with -a, also send each announcement (every 10 s) by unicast to HOST; \
                repeatable or comma-separated",
        more: "For clients on routed subnets no broadcast reaches. Names are resolved \
               at startup.",
        ..valued(None, Some("--announce"), "HOST", Setting::Announce)
    },
    Opt {
        key: general("worker_start"),
        default: DefaultIs::Value("fork"),
        bounds: "fork or spawn",
        brief: "fork: workers are forked from a fork-server that has the worker module \
                (and --preload) imported; spawn: each is a fresh python -u -m MODULE, as \
                ppft's server does",
        more: "A forked worker starts in milliseconds. When the fork-server cannot \
               run, spawn is used and the log says why.",
        ..valued(
            None,
            Some("--worker-start"),
            "fork|spawn",
            Setting::WorkerStart,
        )
    },
    Opt {
        key: general("preload"),
        repeatable: true,
        default: NONE,
        bounds: "Python module names, comma-separated",
        brief: "with fork, import MOD once in the fork-server, so every worker has it at \
                no cost (numpy, numpy.random); repeatable or comma-separated",
        more: "A module that fails to import is a startup error. Sets \
               OPENBLAS_NUM_THREADS and the like to 1 unless they are set.",
        ..valued(None, Some("--preload"), "MOD", Setting::Preload)
    },
    Opt {
        key: general("worker_memory_limit"),
        default: DefaultIs::Value("0"),
        bounds: "0 (no limit) or at least 16M",
        brief: "stop a worker whose memory goes past SIZE (K/M/G/T suffixes) with its \
                process group, answer its job with None and a message, and start a \
                fresh worker",
        more: "Enforced by a memory cgroup per worker where the server can make them \
               (a worker that leaves it or has its limit changed is stopped too), \
               else by polling the PSS of each worker's process group every 100 ms. \
               A guard against runaway jobs, not against jobs that set out to get \
               around it.",
        ..valued(
            None,
            Some("--worker-memory-limit"),
            "SIZE",
            Setting::WorkerMemoryLimit,
        )
    },
];

/// The environment variables the server reads, with what each does.
pub static ENVIRONMENT: &[(&str, &str)] = &[
    (
        "PPSERVER_SECRET",
        "The secret when no -s, --secret-file or config key gives one.",
    ),
    (
        "PP_SECRET",
        "After PPSERVER_SECRET, the secret, only with pp 1.7.0 workers (whose clients \
         read it); ppft and pathos clients never read it.",
    ),
    (
        "PPSERVER_WORKER_MEMORY_CGROUP",
        "0 makes --worker-memory-limit poll each worker's memory instead of using \
         cgroups.",
    ),
    (
        "PYTHONPATH",
        "Passed on to the workers, with the server's working directory added.",
    ),
    (
        "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
        "Socket activation, as systemd sets them: when LISTEN_PID is the server's pid, \
         the first listening TCP socket passed (from descriptor 3) is used instead of \
         binding -i and -p. A reload (SIGUSR2) passes its sockets to the new process the \
         same way. Removed before workers start.",
    ),
    (
        "NOTIFY_SOCKET",
        "Under systemd: READY=1 is sent once the server listens with a worker up, and at \
         a reload MAINPID= the new process's pid.",
    ),
];

/// The exit statuses.
pub static EXIT_STATUS: &[(&str, &str)] = &[
    (
        "0",
        "A normal stop: a stop signal, -t's idle time, -h, --help or --version.",
    ),
    (
        "1",
        "A startup failure: the port is taken, no worker interpreter, a --preload \
         module that does not import, and the like; the log says which.",
    ),
    (
        "2",
        "A bad flag or config value: an unknown flag, a missing or invalid value, an \
         unreadable or malformed config file; the message names the flag, or the key \
         and line.",
    ),
];

/// The signals the server handles.
pub static SIGNALS: &[(&str, &str)] = &[
    (
        "SIGTERM, SIGINT, SIGHUP",
        "Stop with a drain (see --drain-timeout): stop accepting, answer the jobs \
         already received, then stop the workers. A second one, 1 s or more after the \
         first, stops at once. SIGHUP stays ignored if it was ignored at start, as \
         under nohup.",
    ),
    (
        "SIGUSR1",
        "Print the job statistics table (as ppft's print_stats()) to stdout.",
    ),
    (
        "SIGUSR2",
        "Reload and upgrade: start the binary at the server's path again with the same \
         arguments, handing it the listening socket; the new process reads the config and \
         secret afresh and takes over once a worker is up, and this one then drains as on \
         SIGTERM and exits. If the new process fails, this one logs why and serves on. A \
         second SIGUSR2 during a reload is ignored.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::apply;
    use crate::config::{Config, Origin};

    #[test]
    fn names_and_keys_are_unique_and_well_formed() {
        let mut flags: Vec<&str> = OPTIONS.iter().flat_map(|o| o.flags()).collect();
        let mut keys: Vec<&str> = OPTIONS.iter().filter_map(|o| o.key.map(|k| k.1)).collect();
        let (nflags, nkeys) = (flags.len(), keys.len());
        flags.sort_unstable();
        flags.dedup();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(
            (flags.len(), keys.len()),
            (nflags, nkeys),
            "a name is defined twice"
        );
        for o in OPTIONS {
            assert!(o.short.is_some() || o.long.is_some(), "{o:?}");
            assert!(
                o.short.is_none_or(|s| s.len() == 2 && s.starts_with('-')),
                "{o:?}"
            );
            assert!(
                o.long.is_none_or(|l| l.len() > 3 && l.starts_with("--")),
                "{o:?}"
            );
            assert!(!o.brief.is_empty(), "{o:?}");
            assert_eq!(
                o.value.is_some(),
                matches!(o.action, Action::Value(_) | Action::ConfigFile)
            );
        }
    }

    /// A default the table gives as a value is the built-in one: given as
    /// the flag's value, it leaves the config as it was.
    #[test]
    fn documented_defaults_are_the_built_in_ones() {
        let mut checked = 0;
        for o in OPTIONS {
            let (DefaultIs::Value(v), Action::Value(setting)) = (o.default, o.action) else {
                continue;
            };
            let mut cfg = Config::default();
            apply(&mut cfg, setting, &Origin::Flag(o.name()), v).unwrap();
            cfg.budget_origins = Default::default();
            assert_eq!(cfg, Config::default(), "{}: default {v}", o.name());
            checked += 1;
        }
        assert!(checked >= 10, "{checked}");
    }
}
