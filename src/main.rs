//! The `ppserver` binary: flags -> config, logging, then the server on a
//! single-threaded runtime until SIGINT or SIGTERM.
//!
//! One thread is plenty for relaying frames, and it matters for workers:
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked a worker exits,
//! so workers must be forked by a thread that lives as long as the server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ppserver::config::{self, Command};
use ppserver::logfmt::LogFormat;
use ppserver::logsink;

/// How long exit waits for queued log lines (and a statistics table) to be
/// written: plenty for an output someone reads, and a pipe nobody reads
/// cannot hold the exit up for longer.
const EXIT_FLUSH: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    fixed_mmap_threshold();
    let cfg = match config::parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Help) => {
            println!("{}", config::usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ppserver: {e}\nRun 'ppserver -h' for the list of flags.");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.debug, cfg.log_format.clone());
    for note in &cfg.notes {
        log::warn!("{note}");
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
        let server = match ppserver::server::start(&cfg).await {
            Ok(s) => s,
            Err(e) => {
                log::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let _pid_file = match &cfg.pid_file {
            Some(path) => match PidFile::create(path) {
                Ok(p) => Some(p),
                Err(e) => {
                    log::error!("cannot write the pid file {} (-P): {e}", path.display());
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        server.run(stop_signal()).await;
        ExitCode::SUCCESS
    });
    logsink::flush_outputs(EXIT_FLUSH);
    code
}

/// Log lines to stderr in a Python logging format (`-f`, default ppft's),
/// through [`logsink`]'s writer thread, so a stderr nobody reads drops
/// lines instead of stopping the server.
/// Info is on by default so the startup line is seen; `-d` adds debug.
fn init_logging(debug: bool, format: LogFormat) {
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    if let Err(e) = logsink::Logger::install(level, format) {
        eprintln!("ppserver: cannot set up logging: {e}");
    }
}

/// The `-P` pid file: written once the server is up, removed when it stops
/// (this guard's drop), as ppft does.
struct PidFile(PathBuf);

impl PidFile {
    fn create(path: &Path) -> std::io::Result<PidFile> {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            log::warn!("cannot remove the pid file {}: {e}", self.0.display());
        }
    }
}

/// Large job frames (megabytes) are allocated and freed all the time. glibc
/// raises its mmap threshold each time such a block is freed, so later ones
/// come from the heap and their memory stays with the process after the
/// job; fixing the threshold keeps every large frame in its own mapping,
/// returned to the system when the frame is dropped.
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning; called before any
    // other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Completes on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        log::error!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => log::info!("SIGINT received"),
        _ = term.recv() => log::info!("SIGTERM received"),
    }
}
