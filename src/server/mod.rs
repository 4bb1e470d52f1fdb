//! Startup, the accept loop and shutdown.
//!
//! [`start`] checks the worker interpreter, binds the listener and starts
//! the worker pool (and discovery with `-a`); [`Server::run`] accepts
//! clients until the shutdown future completes or, with `-t`, until no
//! client has been connected for that long; then it stops every worker and
//! reaps it before returning. SIGUSR1 prints the job statistics table.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{BudgetOrigins, Config, WorkerMemoryLimit, WorkerStart};
use crate::front::discovery::{self, Destinations, Discovery, Unresolved};
use crate::front::session::{self, SessionContext};
use crate::jobs::scheduler::Scheduler;
use crate::logging::ratelimit::LogLimit;
use crate::logging::sink;
use crate::ops::metrics::{self, LevelSource, Levels};
use crate::ops::openfiles::{self, Budget, OpenFiles, Unfit};
use crate::ops::runfiles::RunFile;
use crate::ops::scrapes::MAX_SCRAPES;
use crate::ops::shutdown::StopRequests;
use crate::ops::stats::Stats;
use crate::workers::forkserver::{ForkServer, ForkSpec, Unusable};
use crate::workers::install;
use crate::workers::install::ProbeError;
use crate::workers::memlimit::MemoryLimit;
use crate::workers::pool::{self, PoolContext};
use crate::workers::worker::{self, WorkerSpec};

/// Listen backlog; ppft's 5 drops connections when many clients start at
/// once.
const BACKLOG: u32 = 1024;
/// How long the start waits for the log lines so far to be written before
/// the port listens: a stderr nobody reads gives up after this.
const STARTUP_FLUSH: Duration = Duration::from_secs(2);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long shutdown waits for workers to be stopped and reaped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The worker interpreter cannot run the worker package.
    Worker(ProbeError),
    /// `-i` names no address.
    Resolve { interface: String },
    /// The listening socket cannot be set up on `addr`.
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Autodiscovery (`-a`) was asked for on a listener that is not IPv4.
    DiscoveryNeedsIpv4 { addr: SocketAddr },
    /// The autodiscovery UDP port cannot be bound.
    Discovery { port: u16, source: std::io::Error },
    /// An `--announce` host does not resolve to an IPv4 address.
    Announce(Unresolved),
    /// The metrics address (`--metrics`) cannot be bound.
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The connection budgets cannot fit in the open-file limit: one was
    /// given that is too large, or the limit leaves no room for even one
    /// connection.
    OpenFiles(Box<NoRoom>),
    /// A `--preload` module cannot be imported by the fork-server.
    Preload(String),
    /// The `-P` pid file cannot be written.
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The numbers of [`StartError::OpenFiles`].
#[derive(Debug)]
pub struct NoRoom {
    /// The arithmetic's verdict, with the limit and the budgets.
    pub unfit: Unfit,
    /// The hard open-file limit.
    pub hard: u64,
    /// What the reserve is made of: descriptors open at startup, workers,
    /// the metrics port's cap (0 without `--metrics`).
    pub open_at_start: usize,
    /// See `open_at_start`.
    pub workers: usize,
    /// See `open_at_start`.
    pub metrics: usize,
    /// Where each budget was given, if it was.
    pub origins: BudgetOrigins,
}

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = &self.unfit;
        let conns = self.origins.max_connections.as_ref();
        let hands = self.origins.max_handshakes.as_ref();
        match (conns, hands) {
            (Some(c), Some(h)) => write!(
                f,
                "{c} {} plus {h} {} need {} open files for client connections",
                u.connections.value,
                u.handshakes.value,
                u.connections.value.saturating_add(u.handshakes.value)
            )?,
            (Some(c), None) => write!(
                f,
                "{c} {} plus at least 1 connection in its handshake need {} open files \
                 for client connections",
                u.connections.value,
                u.connections.value.saturating_add(1)
            )?,
            (None, Some(h)) => write!(
                f,
                "{h} {} plus at least 1 authenticated connection need {} open files for \
                 client connections",
                u.handshakes.value,
                u.handshakes.value.saturating_add(1)
            )?,
            (None, None) => f.write_str(
                "client connections need at least 2 open files (one authenticated, one in \
                 its handshake)",
            )?,
        }
        write!(
            f,
            ", but the open-file limit is {} (hard limit {}) and the server keeps {} for \
             itself ({} open at startup, {} for {} workers, {} for the metrics port, {} to \
             spare), which leaves {}",
            u.limit,
            self.hard,
            u.reserved,
            self.open_at_start,
            self.workers * openfiles::FDS_PER_WORKER,
            self.workers,
            self.metrics,
            openfiles::MARGIN,
            u.room,
        )?;
        match (conns, hands) {
            (Some(c), None) if u.room >= 2 => write!(f, "; lower {c} to at most {}", u.room - 1)?,
            (None, Some(h)) if u.room >= 2 => write!(f, "; lower {h} to at most {}", u.room - 1)?,
            (Some(c), Some(h)) => write!(f, "; lower {c} and {h} to at most {} together", u.room)?,
            _ => {}
        }
        f.write_str(", or raise the hard limit (ulimit -Hn; LimitNOFILE= under systemd)")
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Worker(e) => write!(f, "{e}"),
            StartError::Resolve { interface } => {
                write!(f, "cannot resolve interface {interface:?} (-i)")
            }
            StartError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            StartError::PidFile { path, source } => write!(
                f,
                "cannot write the pid file {} (-P): {source}",
                path.display()
            ),
            StartError::DiscoveryNeedsIpv4 { addr } => write!(
                f,
                "autodiscovery (-a) works over IPv4 broadcast, but the server listens on \
                 {addr}; give -i an IPv4 address"
            ),
            StartError::Metrics { addr, source } => {
                write!(f, "cannot serve metrics on {addr} (--metrics): {source}")
            }
            StartError::Discovery { port, source } => {
                write!(f, "cannot bind the autodiscovery UDP port {port}: {source}")
            }
            StartError::Announce(Unresolved { host, why }) => {
                write!(f, "cannot resolve {host:?} (--announce): {why}")
            }
            StartError::OpenFiles(no_room) => write!(f, "{no_room}"),
            StartError::Preload(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Worker(e) => Some(e),
            StartError::Bind { source, .. }
            | StartError::Discovery { source, .. }
            | StartError::Metrics { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A started server: listening, with its worker pool running.
pub struct Server {
    /// `-P`: written before the port listens, removed when the server
    /// stops ([`Server::take_pid_file`]).
    pid_file: Option<RunFile>,
    /// Accepts clients.
    listener: TcpListener,
    /// Shared by every session.
    ctx: Arc<SessionContext>,
    /// Pool slot supervisors.
    workers: JoinSet<()>,
    /// Where workers are forked from, if they are.
    forkserver: Option<Arc<ForkServer>>,
    /// Tells the supervisors to stop.
    stop: watch::Sender<bool>,
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
}

/// Checks the interpreter, binds, and starts the workers.
pub async fn start(cfg: &Config) -> Result<Server, StartError> {
    let mut cfg = cfg.clone();
    // First: a name that does not resolve fails the start at once, not
    // after the worker probe.
    let announce = if cfg.autodiscovery {
        discovery::resolve_announce(&cfg.announce)
            .await
            .map_err(StartError::Announce)?
    } else {
        Vec::new()
    };
    let files = raise_open_files();
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let pythonpath = worker::worker_pythonpath(std::env::var_os("PYTHONPATH").as_deref(), &cwd);
    let candidates: Vec<&str> = match &cfg.worker_module {
        Some(m) => vec![m.as_str()],
        None => install::WORKER_MODULES.to_vec(),
    };
    let (python, module, found) =
        install::worker_python(cfg.python.as_deref(), &candidates, &pythonpath)
            .await
            .map_err(StartError::Worker)?;
    let version = cfg.pp_version.clone().unwrap_or(found.clone());
    cfg.settle_for_worker(&module);

    let nofile = (files.original_soft < files.soft).then_some((files.original_soft, files.hard));
    // Before the port listens: whoever waits for it finds the fork-server
    // ready (and named) and the workers on their way.
    let forkserver = start_forkserver(
        &cfg,
        ForkSpec {
            python: python.clone(),
            module: module.clone(),
            preload: cfg.preload.clone(),
            pythonpath: pythonpath.clone(),
            nofile,
        },
    )
    .await?;

    // Bound, not yet listening: the port is ours, but a client that tries
    // it is refused until the startup line is out (below).
    let socket = bind(&cfg.interface, cfg.port).await?;
    let local = socket.local_addr().map_err(|source| StartError::Bind {
        addr: SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), cfg.port),
        source,
    })?;
    let discovery = if cfg.autodiscovery {
        let IpAddr::V4(ip) = local.ip() else {
            return Err(StartError::DiscoveryNeedsIpv4 { addr: local });
        };
        let to = Destinations {
            broadcasts: cfg.broadcasts(),
            announce,
            allow: cfg.allow.clone(),
        };
        let d = Discovery::bind(ip, local.port(), to).map_err(|source| StartError::Discovery {
            port: local.port(),
            source,
        })?;
        Some(d)
    } else {
        None
    };

    let metrics = match cfg.metrics {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .map_err(|source| StartError::Metrics { addr, source })?,
        ),
        None => None,
    };

    // Everything the server holds for itself is open by now, but for the
    // workers, which are counted apart.
    let lowered = fit_open_files(&mut cfg, &files)?;

    let scheduler = Arc::new(Scheduler::default());
    let stats = Arc::new(Stats::default());
    let (stop, stopped) = watch::channel(false);
    let spec = Arc::new(WorkerSpec {
        python: python.clone(),
        module: module.clone(),
        proto: cfg.proto.unwrap_or(2),
        pythonpath,
        max_frame: cfg.max_frame_size,
        restart: cfg.restart,
        max_jobs: cfg.max_jobs_per_worker,
        keep_abandoned: cfg.keep_abandoned,
        job_timeout: cfg.job_timeout,
        host: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| local.ip().to_string()),
        nofile,
    });
    // Last of what can fail the start is done: cgroups made from here on
    // are removed at stop.
    let memory_limit = match cfg.worker_memory_limit.clone() {
        Some(limit) => Some(Arc::new(memory_limit_setup(limit, cfg.workers).await)),
        None => None,
    };
    let mut workers = JoinSet::new();
    for slot in 0..cfg.workers {
        let pctx = PoolContext {
            spec: spec.clone(),
            forkserver: forkserver.clone(),
            scheduler: scheduler.clone(),
            stats: stats.clone(),
            shutdown: stopped.clone(),
            memory_limit: memory_limit.clone(),
        };
        workers.spawn(pool::keep_supervised(slot, pctx));
    }

    let warn_default_secret = cfg.secret_is_default && !log::log_enabled!(log::Level::Info);
    if cfg.secret_is_default && !warn_default_secret {
        warn_default_secret_now();
    }
    install::warn_about_foreign_ppserver();
    log::info!(
        "ppserver listening on {local} with {} workers ({} -u -m {module}), advertising pp version {version}{}, {}{}{}, memory limit {}{lowered}{}",
        cfg.workers,
        python.display(),
        if cfg.pp_version.is_some() {
            format!(" (--pp-version; the worker package is {found})")
        } else {
            String::new()
        },
        worker_start_summary(&cfg, forkserver.is_some()),
        match cfg.advertise_ncpus {
            Some(n) => format!(", telling clients {n} CPUs (--advertise-ncpus)"),
            None => String::new(),
        },
        if cfg.autodiscovery {
            discovery_summary(&cfg)
        } else {
            String::new()
        },
        crate::memory::budget::human(cfg.memory_limit),
        match &memory_limit {
            Some(m) => format!(", {}", m.describe()),
            None => String::new(),
        },
    );

    let pid_file = match &cfg.pid_file {
        Some(path) => Some(RunFile::pid(path).map_err(|source| StartError::PidFile {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    // Launchers and tests wait for the port, then read the startup line
    // and the pid file: both must be there by the time it accepts. The log
    // is written by a thread of its own, so its queue is flushed first
    // (bounded: a stderr nobody reads must not keep the port closed).
    let _ = tokio::task::spawn_blocking(|| sink::flush_outputs(STARTUP_FLUSH)).await;
    let listener = socket.listen(BACKLOG).map_err(|source| StartError::Bind {
        addr: local,
        source,
    })?;

    let ctx = Arc::new(SessionContext::new(&cfg, version, scheduler, stats));
    Ok(Server {
        pid_file,
        listener,
        ctx,
        workers,
        forkserver,
        stop,
        idle_exit: cfg.idle_exit,
        workers_count: cfg.workers,
        discovery,
        metrics,
        ready_file: cfg.ready_file.clone(),
        sessions: JoinSet::new(),
        drain_timeout: cfg.drain_timeout,
        warn_default_secret,
        memory_limit,
    })
}

/// The startup line's part about `-a`: where announcements go.
fn discovery_summary(cfg: &Config) -> String {
    let join = |items: Vec<String>| items.join(", ");
    let broadcasts = join(cfg.broadcasts().iter().map(|b| b.to_string()).collect());
    if cfg.announce.is_empty() {
        format!(", autodiscovery on (broadcast {broadcasts})")
    } else {
        format!(
            ", autodiscovery on (broadcast {broadcasts}; announce to {})",
            join(cfg.announce.clone())
        )
    }
}

/// Raises the open-file soft limit to the hard one ([`openfiles::raise`]);
/// a failure is logged, and the budgets then fit the limit as it is.
fn raise_open_files() -> OpenFiles {
    match openfiles::raise() {
        Ok(files) => {
            if files.original_soft < files.soft {
                log::debug!(
                    "open files: soft limit raised from {} to the hard limit {}; workers get {} \
                     back",
                    files.original_soft,
                    files.soft,
                    files.original_soft
                );
            }
            files
        }
        Err((e, files)) => {
            log::warn!(
                "cannot raise the open-file limit from {} to the hard limit {}: {e}",
                files.soft,
                files.hard
            );
            files
        }
    }
}

/// Fits `--max-connections` and `--max-handshakes` into the open-file
/// limit beside what the server keeps for itself ([`openfiles::fit`]),
/// lowering the defaults if need be. Returns what to add to the startup
/// line: empty when nothing was lowered.
fn fit_open_files(cfg: &mut Config, files: &OpenFiles) -> Result<String, StartError> {
    // Unreadable /proc: assume a small process, and let the margin absorb
    // the error.
    let open_at_start = openfiles::open_now().unwrap_or(16);
    let metrics = if cfg.metrics.is_some() {
        MAX_SCRAPES
    } else {
        0
    };
    let reserved = openfiles::reserved(open_at_start, cfg.workers, metrics);
    let budget = |value, origin: &Option<_>| Budget {
        value,
        given: origin.is_some(),
    };
    let fitted = openfiles::fit(
        files.limit(),
        reserved,
        budget(cfg.max_connections, &cfg.budget_origins.max_connections),
        budget(cfg.max_handshakes, &cfg.budget_origins.max_handshakes),
    )
    .map_err(|unfit| {
        StartError::OpenFiles(Box::new(NoRoom {
            unfit,
            hard: files.hard,
            open_at_start,
            workers: cfg.workers,
            metrics,
            origins: cfg.budget_origins.clone(),
        }))
    })?;
    let mut lowered = Vec::new();
    if fitted.connections < cfg.max_connections {
        lowered.push(format!("--max-connections to {}", fitted.connections));
    }
    if fitted.handshakes < cfg.max_handshakes {
        lowered.push(format!("--max-handshakes to {}", fitted.handshakes));
    }
    cfg.max_connections = fitted.connections;
    cfg.max_handshakes = fitted.handshakes;
    log::debug!(
        "open files: limit {}, {reserved} kept for the server ({open_at_start} open at startup, \
         {} workers, metrics port {metrics}, {} to spare), {} + {} for client connections",
        files.limit(),
        cfg.workers,
        openfiles::MARGIN,
        fitted.connections,
        fitted.handshakes,
    );
    Ok(if lowered.is_empty() {
        String::new()
    } else {
        format!(
            ", open-file limit {}: lowered {} to fit",
            files.limit(),
            lowered.join(" and ")
        )
    })
}

fn warn_default_secret_now() {
    log::warn!(
        "no secret given (-s): using pp's public default secret; anyone who can reach \
         this port can run code here"
    );
}

/// Binds the socket the server will listen on: SO_REUSEADDR like ppft (a
/// restarted server gets its port back at once). [`start`] makes it listen,
/// with a generous backlog, once the startup line is out.
async fn bind(interface: &str, port: u16) -> Result<TcpSocket, StartError> {
    let addr: SocketAddr = match tokio::net::lookup_host((interface, port)).await {
        Ok(mut addrs) => addrs.next(),
        Err(_) => None,
    }
    .ok_or_else(|| StartError::Resolve {
        interface: interface.to_string(),
    })?;
    let fail = |source| StartError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    Ok(socket)
}

impl Server {
    /// The `-P` pid file's guard, for the caller to hold until the server
    /// has stopped and cleaned up after its jobs.
    pub fn take_pid_file(&mut self) -> Option<RunFile> {
        self.pid_file.take()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves clients until the first stop request (or `-t`), drains (see
    /// [`crate::ops::shutdown`]), then stops and reaps every worker.
    pub async fn run(mut self, mut stops: StopRequests) {
        let discovery = self.discovery.take().map(|d| tokio::spawn(d.run()));
        let metrics = self.metrics.take().map(|l| {
            tokio::spawn(metrics::serve(
                l,
                levels(self.ctx.clone()),
                crate::config::allow::host_key,
            ))
        });
        let idle_exit = idle_exit(self.idle_exit, self.ctx.clone());
        tokio::pin!(idle_exit);
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .map_err(|e| log::warn!("cannot handle SIGUSR1: {e}"))
                .ok();
        let mut ready_file = None;
        let ready_path = self.ready_file.take();
        let mut ready_pending = ready_path.is_some();
        let scheduler = self.ctx.scheduler.clone();
        let worker_up = scheduler.wait_for_worker();
        tokio::pin!(worker_up);
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                () = &mut worker_up, if ready_pending => {
                    ready_pending = false;
                    ready_file = self.write_ready_file(ready_path.as_deref());
                    continue;
                }
                () = stops.next() => break,
                // Finished sessions are collected as they end.
                Some(_) = self.sessions.join_next() => continue,
                _ = &mut idle_exit => break,
                Some(()) = async { usr1.as_mut()?.recv().await } => {
                    print_stats(&self.ctx, self.workers_count);
                    continue;
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    if std::mem::take(&mut self.warn_default_secret) {
                        warn_default_secret_now();
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
        // No new client from here on; a launcher waiting on the ready file
        // must not see a server that is going away as ready.
        drop(ready_file);
        if let Some(d) = discovery {
            d.abort();
        }
        drop(self.listener);
        drain(
            &self.ctx,
            &mut self.sessions,
            self.drain_timeout,
            &mut stops,
        )
        .await;
        // Metrics stay up through the drain, which they show.
        if let Some(m) = metrics {
            m.abort();
        }
        log::info!("shutting down: stopping workers");
        let _ = self.stop.send(true);
        self.ctx.scheduler.close();
        let all_stopped = async { while self.workers.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_TIMEOUT, all_stopped)
            .await
            .is_err()
        {
            log::error!("workers did not stop within {STOP_TIMEOUT:?}");
        }
        if let Some(forkserver) = &self.forkserver {
            forkserver.stop().await;
        }
        if let Some(m) = self.memory_limit.take() {
            // Removing a cgroup waits for its last processes to go.
            let _ = tokio::task::spawn_blocking(move || m.cleanup()).await;
        }
    }
}

/// [`MemoryLimit::new`] on a blocking thread: making cgroups, moving
/// processes between them and removing what a failed setup made wait on
/// the kernel (and on processes it kills), never on the runtime's only
/// thread.
async fn memory_limit_setup(limit: WorkerMemoryLimit, workers: usize) -> MemoryLimit {
    let polled = limit.clone();
    match tokio::task::spawn_blocking(move || MemoryLimit::new(&limit, workers)).await {
        Ok(m) => m,
        Err(e) => MemoryLimit::polling(&polled, format!("the cgroup setup failed: {e}")),
    }
}

/// Starts the fork-server unless workers are to be spawned
/// (`--worker-start spawn`); if it cannot run, workers are spawned and
/// the log says why. A `--preload` module that cannot be imported is a
/// startup error.
async fn start_forkserver(
    cfg: &Config,
    fork_spec: ForkSpec,
) -> Result<Option<Arc<ForkServer>>, StartError> {
    if cfg.worker_start == WorkerStart::Spawn {
        if !cfg.preload.is_empty() {
            log::warn!(
                "--preload {} has no effect with --worker-start spawn",
                cfg.preload.join(",")
            );
        }
        return Ok(None);
    }
    match ForkServer::start(fork_spec).await {
        Ok(forkserver) => Ok(Some(Arc::new(forkserver))),
        Err(e @ Unusable::Preload { .. }) => Err(StartError::Preload(e.to_string())),
        Err(e) => {
            log::warn!("workers are spawned, not forked: {e}");
            Ok(None)
        }
    }
}

/// How workers start, for the startup line.
fn worker_start_summary(cfg: &Config, forked: bool) -> String {
    if !forked {
        return "workers spawned".to_string();
    }
    if cfg.preload.is_empty() {
        "workers forked from a fork-server".to_string()
    } else {
        format!(
            "workers forked from a fork-server with {} preloaded",
            cfg.preload.join(", ")
        )
    }
}

impl Server {
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
) {
    ctx.drain.begin();
    if sessions.is_empty() {
        return;
    }
    log::info!(
        "draining: answering the jobs already received on {} connections (at most {timeout:?}, \
         --drain-timeout)",
        sessions.len(),
    );
    tokio::select! {
        () = async { while sessions.join_next().await.is_some() {} } => {
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
/// that state keeps, gathered here so the metrics need not know it.
fn levels(ctx: Arc<SessionContext>) -> LevelSource {
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
        }
    })
}
