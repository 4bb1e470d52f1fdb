//! The `ppserver` binary: flags -> config, logging, then the server on a
//! single-threaded runtime until SIGINT or SIGTERM.
//!
//! One thread is plenty for relaying frames, and it matters for workers:
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked a worker exits,
//! so workers must be forked by a thread that lives as long as the server.

use std::io::Write;
use std::process::ExitCode;

use ppserver::config::{self, Command};

fn main() -> ExitCode {
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
    init_logging(cfg.debug);

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
    runtime.block_on(async {
        let server = match ppserver::server::start(&cfg).await {
            Ok(s) => s,
            Err(e) => {
                log::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        server.run(stop_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Log lines in the shape of ppft's default format
/// (`asctime - name - levelname - message`). Info is on by default so the
/// startup line is seen; `-d` adds debug.
fn init_logging(debug: bool) {
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format(|buf, record| {
            writeln!(
                buf,
                "{} - pp - {} - {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        })
        .init();
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
