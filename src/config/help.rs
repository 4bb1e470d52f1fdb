//! The `-h` text: ppft's flags in ppft's layout, then ours, each with its
//! default.

use crate::config::{
    DEFAULT_LOGIN_DELAY, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_FRAME, DEFAULT_MAX_HANDSHAKES,
    DEFAULT_PORT, FALLBACK_MEMORY_LIMIT,
};
use crate::logging::format::DEFAULT_FORMAT;

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
                [--advertise-ncpus N] [--announce HOST]...
                [--worker-start fork|spawn] [--preload MOD[,MOD...]]...
                [--worker-memory-limit SIZE]

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
-a                 : enable auto-discovery service (answers a client's C by
                     broadcast and by unicast to the client's address)
-r                 : restart worker process after each task completion
-n proto           : protocol number for pickle module (default 2; 4 with
                     pp 1.7.0 workers, as pp 1.7.0's server)
-c path            : path to config file ([general] and [network] sections;
                     flags after -c override it)
-i interface       : interface to listen (default 0.0.0.0)
-b broadcast       : broadcast address for auto-discovery service
                     (default 255.255.255.255); repeatable or
                     comma-separated: one per subnet (each interface's
                     directed broadcast, e.g. 192.0.2.255), since
                     255.255.255.255 leaves by the default route's interface
                     only; announcements and answers go to each
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
                     {max_conn}; if the hard open-file limit cannot hold the
                     two budgets, their defaults are lowered to fit and the
                     startup line says so; a value given that cannot fit
                     is an error)
--max-handshakes N : most connections not yet authenticated, at once
                     (default {max_handshakes}, lowered likewise); while half are
                     in use, the handshake timeout drops from 10 s to 2 s
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
                     what is left (default {drain}; a second signal, 1 s or
                     more after the first, stops at once)
--max-jobs-per-worker N: replace each worker after N jobs, between jobs
                     (for leaky extensions; default 0: never)
--keep-abandoned   : let a running job whose client left finish, as ppft
                     does (default: stop its worker and start a fresh one)
--metrics ADDR:PORT: serve Prometheus metrics at http://ADDR:PORT/metrics and
                     a summary at /status (default: off); at most {scrapes}
                     connections, {scrapes_per_address} per address, the oldest
                     idle one closed to make room
--advertise-ncpus N: the CPU count clients are told (STAT), which sizes
                     their connections; behind a load balancer, the workers
                     of all the servers behind it (default: -w, this
                     server's workers)
--announce HOST    : with -a, also send each announcement (every 10 s) by
                     unicast to HOST, an IPv4 address or a name resolved at
                     startup: clients on routed subnets no broadcast
                     reaches; repeatable or comma-separated (default: none)
--job-timeout S    : stop the worker of a job that has run S seconds, answer
                     the job with None and a message, and start a fresh
                     worker (default 0: no limit)
--worker-start fork|spawn
                   : fork: workers are forked from one fork-server that has
                     the worker module (and --preload) imported, a new one
                     in milliseconds; spawn: each worker is a fresh
                     python -u -m MODULE, as ppft's server does (default
                     fork; spawn is used, and the log says why, when the
                     fork-server cannot run)
--preload MOD      : with fork, import MOD once in the fork-server, so every
                     worker has it at no cost (numpy, numpy.random);
                     repeatable or comma-separated; a module that fails to
                     import is a startup error; sets OPENBLAS_NUM_THREADS
                     and the like to 1 unless set (default: none)
--worker-memory-limit SIZE
                   : stop a worker whose memory goes past SIZE (K/M/G
                     suffixes) with its process group, answer its job with
                     None and a message, and start a fresh worker; by a
                     memory cgroup per worker where the server can make
                     them (a worker that leaves it or has its limit changed
                     is stopped too), else by polling the PSS of each
                     worker's process group every 100 ms; a guard against
                     runaway jobs, not against jobs that set out to get
                     around it (default 0: no limit)

Environment: PPSERVER_SECRET is the secret when none is given otherwise;
after it PP_SECRET, only with pp 1.7.0 workers (whose clients read it).
PPSERVER_WORKER_MEMORY_CGROUP=0 makes --worker-memory-limit poll instead of
using cgroups.
The server raises its open-file soft limit to the hard limit; workers get the
soft limit it started with.
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
        scrapes = crate::ops::scrapes::MAX_SCRAPES,
        scrapes_per_address = crate::ops::scrapes::MAX_SCRAPES_PER_ADDRESS,
    )
}
