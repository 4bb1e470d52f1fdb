//! The `ppserver` binary: flags -> config, logging, then the server on a
//! single-threaded runtime until SIGINT, SIGTERM or SIGHUP, or until a
//! reload (SIGUSR2) has handed over to a new process.
//!
//! One thread is plenty for relaying frames, and it matters for workers:
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked a worker exits,
//! so workers must be forked by a thread that lives as long as the server.
//!
//! The server is a child subreaper: processes that jobs start and that
//! lose their parent come to it, not to init, so they are reaped while it
//! runs and killed when it stops ([`ppserver::workers::reaper`]).

use std::process::ExitCode;
use std::time::Duration;

use ppserver::config::{self, Command};
use ppserver::logging::format::LogFormat;
use ppserver::logging::{panics, sink};
use ppserver::ops::shutdown::StopRequests;
use ppserver::workers::reaper;

/// How long exit waits for queued log lines (and a statistics table) to be
/// written: plenty for an output someone reads, and a pipe nobody reads
/// cannot hold the exit up for longer.
const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// `pub(crate)`: `src/bin/ppserver-rs.rs` runs this same `main` under the
/// wheel's second name.
pub(crate) fn main() -> ExitCode {
    // First: the descriptors and variables passed in, before any thread
    // or child exists.
    let inherited = ppserver::server::reload::Inherited::take();
    fixed_mmap_threshold();
    let cfg = match config::flags::parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Help) => {
            println!("{}", config::help::usage());
            return ExitCode::SUCCESS;
        }
        Ok(Command::LongHelp) => {
            println!("{}", config::help::long_usage());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("{}", config::help::version());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ppserver: {e}\nRun 'ppserver -h' for the list of flags.");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log_level(stderr_is_pipe()), cfg.log_format.clone());
    // A panic message written straight to a stderr nobody reads would
    // block the runtime's only thread.
    panics::install();
    for note in &cfg.notes {
        log::warn!("{note}");
    }
    inherited.log_notes();
    // Before any child exists, so every orphaned descendant comes here.
    if let Err(e) = reaper::become_subreaper() {
        log::warn!("cannot become a child subreaper ({e}): processes that jobs detach may outlive the server");
    }

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ppserver: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Before the (slow) startup, so an early SIGTERM still stops cleanly.
        let stops = StopRequests::from_signals();
        let server = match ppserver::server::start(&cfg, inherited).await {
            Ok(s) => s,
            Err(e) => {
                log::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let reaping = tokio::spawn(reaper::reap_orphans_forever());
        // Held until what jobs left running is gone too.
        let _pid_file = server.run(stops).await;
        reaping.abort();
        // The workers are stopped: what their jobs left running goes now.
        reaper::sweep().await;
        ExitCode::SUCCESS
    });
    sink::flush_outputs(EXIT_FLUSH);
    code
}

/// Whether stderr is a pipe or a socket: a launcher (pathos, ssh) reading
/// it, rather than a terminal or a log file.
fn stderr_is_pipe() -> bool {
    use nix::sys::stat::{fstat, SFlag};
    match fstat(nix::libc::STDERR_FILENO) {
        Ok(st) => {
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            kind == SFlag::S_IFIFO || kind == SFlag::S_IFSOCK
        }
        // No stderr at all: nothing to keep quiet for.
        Err(_) => false,
    }
}

/// Log lines to stderr in a Python logging format (`-f`, default ppft's),
/// at the level [`config::Config::log_level`] chose, through [`logsink`]'s
/// writer thread, so a stderr nobody reads drops lines instead of stopping
/// the server.
fn init_logging(level: log::LevelFilter, format: LogFormat) {
    if let Err(e) = sink::Logger::install(level, format) {
        eprintln!("ppserver: cannot set up logging: {e}");
    }
}

/// Large job frames (megabytes) are allocated and freed all the time. glibc
/// raises its mmap threshold each time such a block is freed, so later ones
/// come from the heap and their memory stays with the process after the
/// job; fixing the threshold keeps every large frame in its own mapping,
/// returned to the system when the frame is dropped. `mallopt` is glibc's;
/// other C libraries (musl) have no such knob and keep their default.
#[cfg(target_env = "gnu")]
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning; called before any
    // other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

#[cfg(not(target_env = "gnu"))]
fn fixed_mmap_threshold() {}
