//! The wiring: startup, the accept loop and shutdown.
//!
//! [`start`] reads as the startup sequence, each step in the module of
//! its concern: `--announce` resolved ([`crate::front::discovery`]), the
//! open-file limit raised ([`crate::ops::openfiles`]), the workers'
//! interpreter probed ([`crate::workers::install`]), the users' uids
//! checked against it ([`crate::workers::access`]), the fork-server
//! started ([`crate::workers::forkserver`]), the port bound
//! ([`crate::front::listener`]; or the socket passed in is taken),
//! discovery and metrics sockets bound, the connection budgets fitted
//! ([`crate::config::budgets`]), the memory limit set up
//! ([`crate::workers::memlimit`]), the pool started
//! ([`crate::workers::pool`]), the startup line ([`startline`]) and the
//! pid file written, and last the port made to listen. Its errors are
//! [`StartError`].
//!
//! [`Server::run`] accepts clients until a stop request or, with `-t`,
//! until no client has been connected for that long; then it drains (see
//! [`crate::ops::shutdown`]), stops every worker and reaps it before
//! returning. SIGUSR1 prints the job statistics table. SIGUSR2 reloads
//! ([`reload`]): a new process takes over, and this one drains as at a
//! stop; a process a reload started takes over once a worker is up.

mod error;
pub mod reload;
mod startline;

pub use error::StartError;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;

use crate::config::summary::Entry;
use crate::config::Config;
use crate::front::discovery::{self, Discovery};
use crate::front::listener::{self, METRICS_NAME};
use crate::front::session::{self, SessionContext};
use crate::jobs::scheduler::Scheduler;
use crate::logging::ratelimit::LogLimit;
use crate::logging::sink;
use crate::ops::metrics::{self, LevelSource, Levels};
use crate::ops::notify::notify;
use crate::ops::openfiles;
use crate::ops::runfiles::RunFile;
use crate::ops::shutdown::StopRequests;
use crate::ops::stats::Stats;
use crate::workers::access;
use crate::workers::forkserver::{self, ForkServer, ForkSpec};
use crate::workers::install;
use crate::workers::memlimit::{self, MemoryLimit};
use crate::workers::pool::Pool;
use crate::workers::reaper;
use crate::workers::worker::WorkerSpec;
use reload::{Inherited, Invocation, Pending, Predecessor, Previous, Successor};
use startline::StartupFacts;

/// How long the start waits for the log lines so far to be written before
/// the port listens: a stderr nobody reads gives up after this.
const STARTUP_FLUSH: Duration = Duration::from_secs(2);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long shutdown waits for workers to be stopped and reaped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A started server: listening, with its worker pool running.
pub struct Server {
    /// `-P`: written before the port listens (by a reload's new process,
    /// once it takes over), removed when the server stops (returned by
    /// [`Server::run`]), left in place when a reload's new process has
    /// written its own.
    pid_file: Option<RunFile>,
    /// `-P`, for a reload's new process to write when it takes over.
    pid_path: Option<PathBuf>,
    /// Accepts clients.
    listener: TcpListener,
    /// The name a reload passes the listening socket on under.
    listener_name: &'static str,
    /// Shared by every session.
    ctx: Arc<SessionContext>,
    /// The worker slots' supervisors.
    pool: Pool,
    /// Where workers are forked from, if they are.
    forkserver: Option<Arc<ForkServer>>,
    /// `-t`: exit after this long without clients.
    idle_exit: Option<Duration>,
    /// Worker count, for the statistics table.
    workers_count: usize,
    /// The autodiscovery service, if `-a`.
    discovery: Option<Discovery>,
    /// The `--metrics` listener, if any.
    metrics: Option<TcpListener>,
    /// `--ready-file`: written once a worker is up.
    ready_file: Option<PathBuf>,
    /// The client connections' tasks, for the drain.
    sessions: JoinSet<()>,
    /// How long the drain may take (`--drain-timeout`).
    drain_timeout: Duration,
    /// The default secret is in use and the warning about it is still
    /// owed: it is held back until the first client connects when stderr
    /// is a launcher's pipe, since the server prints nothing at startup
    /// there.
    warn_default_secret: bool,
    /// `--worker-memory-limit`, whose cgroups go once the workers are
    /// stopped.
    memory_limit: Option<Arc<MemoryLimit>>,
    /// SIGUSR2, the reload requests; `None` if it cannot be handled.
    reloads: Option<Signal>,
    /// How to start this binary again for a reload.
    invocation: Invocation,
    /// The process this one takes over from, if a reload started it.
    predecessor: Option<Predecessor>,
    /// This config's summary, which a reload passes on.
    summary: Vec<Entry>,
    /// The open-file limits the process started with, if it raised them:
    /// a reload's new process starts with them.
    nofile_at_start: Option<(u64, u64)>,
}

/// Starts the server, one step after the other, each in the module of
/// its concern; the first that fails ends the start with its error. The
/// port listens last: whoever waits for it finds the startup line, the
/// pid file and the fork-server there, and the workers on their way.
pub async fn start(cfg: &Config, inherited: Inherited) -> Result<Server, StartError> {
    let mut cfg = cfg.clone();
    let Inherited {
        mut passed,
        invocation,
        predecessor,
    } = inherited;
    // Handled from the start: SIGUSR2's default action ends the process.
    let reloads = signal(SignalKind::user_defined2())
        .map_err(|e| log::warn!("cannot handle SIGUSR2 (reload): {e}"))
        .ok();
    // A name that does not resolve fails the start at once, not after the
    // worker probe.
    let announce = discovery::resolve_for(&cfg).await?;
    let files = openfiles::raise_logged();
    let interpreter = install::probe(cfg.python.as_deref(), cfg.worker_module.as_deref()).await?;
    cfg.settle_for_worker(&interpreter.module);
    // Once the secret is settled: the -s secret's user may join the
    // users file's.
    let users = Arc::new(cfg.users()?);
    // Every user's uid can run the workers; the one they share, if any,
    // is what the pool's workers run as.
    let users_file = cfg.users.as_ref().map(|f| f.path.as_path());
    let run_as = access::check(&users, users_file, &interpreter, cfg.isolates_users()).await?;
    let forkserver = forkserver::start_unless_spawned(
        cfg.worker_start,
        ForkSpec {
            python: interpreter.python.clone(),
            module: interpreter.module.clone(),
            preload: cfg.preload.clone(),
            pythonpath: interpreter.pythonpath.clone(),
            nofile: files.for_workers(),
        },
    )
    .await?;
    // Bound, not yet listening: the port is ours, but a client that tries
    // it is refused until the startup line is out.
    let bound = listener::bind(&cfg.interface, cfg.port, &mut passed).await?;
    let discovery = discovery::for_config(&cfg, bound.local, announce)?;
    let metrics = match cfg.metrics {
        Some(addr) => Some(match passed.take_listener(METRICS_NAME, addr) {
            Some(passed) => passed,
            None => metrics::bind(addr)
                .await
                .map_err(|source| StartError::Metrics { addr, source })?,
        }),
        None => None,
    };
    // What was passed and not used is closed.
    drop(passed);
    let lowered = cfg.fit_open_files(&files)?;
    let memory_limit = memlimit::set_up(cfg.worker_memory_limit.as_ref(), cfg.workers).await;
    let scheduler = Arc::new(Scheduler::new(&users, cfg.isolates_users()));
    let stats = Arc::new(Stats::default());
    let spec = WorkerSpec::new(&cfg, &interpreter, bound.local.ip(), files.for_workers());
    let pool = Pool::start(
        cfg.workers,
        Arc::new(spec),
        forkserver.clone(),
        scheduler.clone(),
        stats.clone(),
        memory_limit.clone(),
        run_as,
    );
    let warn_default_secret = startline::log(&StartupFacts {
        cfg: &cfg,
        local: bound.local,
        interpreter: &interpreter,
        forked: forkserver.is_some(),
        lowered: &lowered,
        memory_limit: memory_limit.as_deref(),
        users: &users,
        taking_over_from: predecessor.as_ref().map(Predecessor::pid),
    });
    // A reload's new process writes it when it takes over: until then
    // the pid file names the old one, which goes on if this one fails.
    let pid_file = match (&cfg.pid_file, &predecessor) {
        (Some(path), None) => Some(RunFile::pid(path).map_err(|source| StartError::PidFile {
            path: path.clone(),
            source,
        })?),
        _ => None,
    };
    // The log is written by a thread of its own: its queue is flushed
    // before the port listens (bounded: a stderr nobody reads must not
    // keep the port closed).
    let _ = tokio::task::spawn_blocking(|| sink::flush_outputs(STARTUP_FLUSH)).await;
    let listener = bound.listen()?;

    let version = cfg.pp_version.clone().unwrap_or(interpreter.version);
    let ctx = Arc::new(SessionContext::with_users(
        &cfg, version, scheduler, stats, users,
    ));
    Ok(Server {
        pid_file,
        pid_path: cfg.pid_file.clone(),
        listener_name: listener.pass_name(),
        listener: listener.listener,
        ctx,
        pool,
        forkserver,
        idle_exit: cfg.idle_exit,
        workers_count: cfg.workers,
        discovery,
        metrics,
        ready_file: cfg.ready_file.clone(),
        sessions: JoinSet::new(),
        drain_timeout: cfg.drain_timeout,
        warn_default_secret,
        memory_limit,
        reloads,
        invocation,
        predecessor,
        summary: cfg.summary(),
        nofile_at_start: files.for_workers(),
    })
}

impl Server {
    /// The address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves clients until the first stop request (or `-t`), or until a
    /// reload's new process has taken over; drains (see
    /// [`crate::ops::shutdown`]), then stops and reaps every worker.
    /// Returns the pid file's guard, for the caller to hold until what
    /// jobs left running is gone too; `None` when a new process took over
    /// the pid file.
    pub async fn run(mut self, mut stops: StopRequests) -> Option<RunFile> {
        // A reload's new process accepts, announces and serves metrics
        // only once it takes over, when a worker is up.
        let mut predecessor = self.predecessor.take();
        let mut side = None;
        if predecessor.is_none() {
            side = Some(self.serve_side_ports(None));
        }
        let idle_exit = idle_exit(self.idle_exit, self.ctx.clone());
        tokio::pin!(idle_exit);
        let mut usr1 = signal(SignalKind::user_defined1())
            .map_err(|e| log::warn!("cannot handle SIGUSR1: {e}"))
            .ok();
        let mut usr2 = self.reloads.take();
        let mut pending: Option<Pending> = None;
        let mut successor: Option<Successor> = None;
        let mut ready_file = None;
        let ready_path = self.ready_file.take();
        let mut ready_pending = true;
        let scheduler = self.ctx.scheduler.clone();
        let worker_up = scheduler.wait_for_worker();
        tokio::pin!(worker_up);
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept(), if predecessor.is_none() => a,
                () = &mut worker_up, if ready_pending => {
                    ready_pending = false;
                    if let Some(p) = predecessor.take() {
                        if !self.write_pid_file() {
                            break;
                        }
                        ready_file = self.write_ready_file(ready_path.as_deref());
                        side = Some(self.serve_side_ports(Some(p.take_over(&self.summary))));
                    } else {
                        ready_file = self.write_ready_file(ready_path.as_deref());
                        notify("READY=1");
                    }
                    continue;
                }
                () = stops.next() => break,
                // Finished sessions are collected as they end.
                Some(_) = self.sessions.join_next() => continue,
                // Not before a reload's new process takes over: it has had
                // no chance of a client yet.
                _ = &mut idle_exit, if predecessor.is_none() => break,
                Some(()) = async { usr1.as_mut()?.recv().await } => {
                    print_stats(&self.ctx, self.workers_count);
                    continue;
                }
                Some(()) = async { usr2.as_mut()?.recv().await } => {
                    match (&pending, &predecessor) {
                        (Some(p), _) => log::warn!(
                            "SIGUSR2 received while a reload is under way (new process pid {}): \
                             ignored",
                            p.pid()
                        ),
                        (None, Some(_)) => log::warn!(
                            "SIGUSR2 received before this process took over: ignored"
                        ),
                        (None, None) => pending = self.start_successor(side.as_ref()),
                    }
                    continue;
                }
                Some(ready) = async { Some(pending.as_mut()?.outcome().await) } => {
                    let Some(p) = pending.take() else { continue };
                    if ready {
                        successor = Some(p.into_successor());
                        break;
                    }
                    p.abandon();
                    continue;
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    if std::mem::take(&mut self.warn_default_secret) {
                        startline::warn_default_secret();
                    }
                    // Refused before a byte is sent: dropping the stream
                    // closes it.
                    match self.ctx.connections.admit(peer) {
                        Ok(place) => {
                            let ctx = self.ctx.clone();
                            self.sessions.spawn(session::run(stream, peer, ctx, place));
                        }
                        Err(refused) => refused.log(peer),
                    }
                }
                Err(e) => {
                    // Out of file descriptors, typically: it repeats on
                    // every try until connections close.
                    static ACCEPT_FAILED: LogLimit = LogLimit::new();
                    ACCEPT_FAILED.log(log::Level::Error, format_args!("accept failed: {e}"));
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        if let Some(p) = pending.take() {
            log::info!(
                "stopping the new process of the reload under way (pid {})",
                p.pid()
            );
            p.stop().await;
        }
        let side = side.unwrap_or_default();
        if let Some(s) = &successor {
            // The new process has written its own pid and ready files,
            // and must outlive this one.
            reaper::spare(s.pid());
            notify(&format!("MAINPID={}", s.pid()));
            if let Some(f) = ready_file.take() {
                f.disown();
            }
            if let Some(f) = self.pid_file.take() {
                f.disown();
            }
            // Scrapes go to the new process from here on.
            side.stop_metrics();
        }
        // No new client from here on; a launcher waiting on the ready file
        // must not see a server that is going away as ready.
        drop(ready_file);
        side.stop_discovery();
        drop(self.listener);
        drain(
            &self.ctx,
            &mut self.sessions,
            self.drain_timeout,
            &mut stops,
            successor.as_ref(),
        )
        .await;
        // Metrics stay up through the drain, which they show.
        side.stop_metrics();
        log::info!("shutting down: stopping workers");
        self.pool.stop(STOP_TIMEOUT).await;
        if let Some(forkserver) = &self.forkserver {
            forkserver.stop().await;
        }
        if let Some(m) = self.memory_limit.take() {
            // Removing a cgroup waits for its last processes to go.
            let _ = tokio::task::spawn_blocking(move || m.cleanup()).await;
        }
        self.pid_file.take()
    }
}

/// The services beside the client port: autodiscovery and the metrics
/// pages, each a task; and the metrics socket, kept to pass on at a
/// reload.
#[derive(Default)]
struct SidePorts {
    discovery: Option<tokio::task::JoinHandle<()>>,
    metrics: Option<(tokio::task::JoinHandle<()>, OwnedFd)>,
}

impl SidePorts {
    fn stop_discovery(&self) {
        if let Some(d) = &self.discovery {
            d.abort();
        }
    }

    fn stop_metrics(&self) {
        if let Some((m, _)) = &self.metrics {
            m.abort();
        }
    }
}

impl Server {
    /// Starts autodiscovery and the metrics pages; `previous`, the
    /// process this one took over from, shows on `/status`.
    fn serve_side_ports(&mut self, previous: Option<Arc<Previous>>) -> SidePorts {
        let discovery = self.discovery.take().map(|d| tokio::spawn(d.run()));
        let metrics = self.metrics.take().and_then(|l| {
            // Kept for a reload: the listener itself goes to the task.
            let fd = l
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| log::warn!("a reload will bind --metrics again: {e}"))
                .ok()?;
            let task = tokio::spawn(metrics::serve(
                l,
                levels(self.ctx.clone(), previous),
                crate::config::allow::host_key,
            ));
            Some((task, fd))
        });
        SidePorts { discovery, metrics }
    }

    /// SIGUSR2: starts the new process, handing it the listening socket
    /// and the metrics socket. A failure to start it is logged, and the
    /// server goes on.
    fn start_successor(&self, side: Option<&SidePorts>) -> Option<Pending> {
        let mut sockets = vec![(self.listener.as_fd(), self.listener_name)];
        if let Some((_, fd)) = side.and_then(|s| s.metrics.as_ref()) {
            sockets.push((fd.as_fd(), METRICS_NAME));
        }
        let procs = self
            .memory_limit
            .as_ref()
            .and_then(|m| m.start_cgroup_procs());
        reload::start_successor(
            &self.invocation,
            &sockets,
            &self.summary,
            procs.as_deref(),
            self.nofile_at_start,
        )
        .map_err(|e| log::error!("SIGUSR2: cannot reload: {e}; this process serves on"))
        .ok()
    }

    /// A reload's new process writes its pid file when it takes over; if
    /// it cannot, it stops, and the old process goes on.
    fn write_pid_file(&mut self) -> bool {
        let Some(path) = &self.pid_path else {
            return true;
        };
        match RunFile::pid(path) {
            Ok(f) => {
                self.pid_file = Some(f);
                true
            }
            Err(e) => {
                log::error!(
                    "cannot write the pid file {} (-P): {e}; stopping, the previous process \
                     serves on",
                    path.display()
                );
                false
            }
        }
    }

    /// Writes the ready file; a failure is logged and the server goes on,
    /// since it serves clients all the same.
    fn write_ready_file(&self, path: Option<&std::path::Path>) -> Option<RunFile> {
        let path = path?;
        let local = self.listener.local_addr().ok()?;
        match RunFile::ready(path, local) {
            Ok(f) => {
                log::debug!("ready: wrote {}", path.display());
                Some(f)
            }
            Err(e) => {
                log::error!(
                    "cannot write the ready file {} (--ready-file): {e}",
                    path.display()
                );
                None
            }
        }
    }
}

/// Lets the open connections finish the jobs they have sent, closing each
/// as it goes idle, for at most `timeout` or until a second stop request;
/// then closes whatever is left.
async fn drain(
    ctx: &SessionContext,
    sessions: &mut JoinSet<()>,
    timeout: Duration,
    stops: &mut StopRequests,
    successor: Option<&Successor>,
) {
    ctx.drain.begin();
    // A reload's new process shows the count on its /status.
    let report = |n| {
        if let Some(s) = successor {
            s.report(n);
        }
    };
    report(sessions.len());
    if sessions.is_empty() {
        return;
    }
    log::info!(
        "draining: answering the jobs already received on {} connections (at most {timeout:?}, \
         --drain-timeout)",
        sessions.len(),
    );
    tokio::select! {
        () = async {
            while sessions.join_next().await.is_some() {
                report(sessions.len());
            }
        } => {
            log::info!("drained: every connection closed");
        }
        () = tokio::time::sleep(timeout) => log::warn!(
            "drain timeout: closing {} connections with jobs still pending; their clients \
             will resubmit them",
            sessions.len()
        ),
        () = stops.next() => log::warn!(
            "second stop request: closing {} connections at once",
            sessions.len()
        ),
    }
    sessions.shutdown().await;
}

/// Completes when no client has been connected for `limit` (`-t`); never
/// without a limit.
async fn idle_exit(limit: Option<Duration>, ctx: Arc<SessionContext>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let check = limit.min(Duration::from_secs(1));
    loop {
        tokio::time::sleep(check).await;
        if ctx.connections.idle_for().is_some_and(|idle| idle >= limit) {
            log::info!("no client connections for {limit:?} (-t): exiting");
            return;
        }
    }
}

/// SIGUSR1: ppft's statistics table on stdout.
fn print_stats(ctx: &SessionContext, workers: usize) {
    crate::logging::sink::stdout().send(ctx.stats.table(workers));
}

/// What the metrics pages read of the sessions' shared state: the levels
/// that state keeps, gathered here so the metrics need not know it; and
/// the drain of the process this one took over from.
fn levels(ctx: Arc<SessionContext>, previous: Option<Arc<Previous>>) -> LevelSource {
    Arc::new(move || {
        let (package_entries, package_bytes) = ctx.packages.usage();
        Levels {
            version: ctx.version.clone(),
            workers: ctx.workers,
            live_workers: ctx.scheduler.live_workers(),
            queued: ctx.scheduler.queued(),
            package_entries,
            package_bytes,
            memory_held: ctx.budget.used(),
            memory_limit: ctx.budget.limit(),
            previous: previous.as_ref().and_then(|p| p.draining()),
        }
    })
}
