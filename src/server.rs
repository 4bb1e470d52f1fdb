//! Startup, the accept loop and shutdown.
//!
//! [`start`] checks the worker interpreter, binds the listener and starts
//! the worker pool (and discovery with `-a`); [`Server::run`] accepts
//! clients until the shutdown future completes or, with `-t`, until no
//! client has been connected for that long; then it stops every worker and
//! reaps it before returning. SIGUSR1 prints the job statistics table.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::cache::{PackageCache, PACKAGE_CACHE_BUDGET};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::pool::{self, PoolContext, WorkerSpec};
use crate::scheduler::Scheduler;
use crate::session::{self, SessionContext};
use crate::stats::Stats;

/// Listen backlog; ppft's 5 drops connections when many clients start at
/// once.
const BACKLOG: u32 = 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long shutdown waits for workers to be stopped and reaped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The worker interpreter cannot run the worker package.
    Python(String),
    /// The listening address is unusable.
    Bind(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Python(m) | StartError::Bind(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StartError {}

/// A started server: listening, with its worker pool running.
pub struct Server {
    /// Accepts clients.
    listener: TcpListener,
    /// Shared by every session.
    ctx: Arc<SessionContext>,
    /// Pool slot supervisors.
    workers: JoinSet<()>,
    /// Tells the supervisors to stop.
    stop: watch::Sender<bool>,
    /// Caps simultaneous client connections.
    connections: Arc<Semaphore>,
    /// `-t`: exit after this long without clients.
    idle_exit: Option<Duration>,
    /// Worker count, for the statistics table.
    workers_count: usize,
    /// The autodiscovery service, if `-a`.
    discovery: Option<Discovery>,
}

/// Checks the interpreter, binds, and starts the workers.
pub async fn start(cfg: &Config) -> Result<Server, StartError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let pythonpath = pool::worker_pythonpath(std::env::var_os("PYTHONPATH").as_deref(), &cwd);
    let candidates: Vec<&str> = match &cfg.worker_module {
        Some(m) => vec![m.as_str()],
        None => pool::WORKER_MODULES.to_vec(),
    };
    let (module, found) = pool::probe_worker(&cfg.python, &candidates, &pythonpath)
        .await
        .map_err(StartError::Python)?;
    let version = cfg.pp_version.clone().unwrap_or(found.clone());

    let listener = bind(&cfg.interface, cfg.port).await?;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Bind(format!("cannot read the listening address: {e}")))?;
    let discovery = if cfg.autodiscovery {
        let IpAddr::V4(ip) = local.ip() else {
            return Err(StartError::Bind(
                "autodiscovery (-a) works over IPv4 broadcast; give -i an IPv4 address".into(),
            ));
        };
        let d = Discovery::bind(ip, local.port(), cfg.broadcast).map_err(|e| {
            StartError::Bind(format!(
                "cannot bind the autodiscovery UDP port {}: {e}",
                local.port()
            ))
        })?;
        Some(d)
    } else {
        None
    };

    let scheduler = Arc::new(Scheduler::default());
    let stats = Arc::new(Stats::default());
    let (stop, stopped) = watch::channel(false);
    let spec = Arc::new(WorkerSpec {
        python: cfg.python.clone(),
        module: module.clone(),
        proto: cfg.proto,
        pythonpath,
        max_frame: cfg.max_frame_size,
        restart: cfg.restart,
    });
    let mut workers = JoinSet::new();
    for slot in 0..cfg.workers {
        let pctx = PoolContext {
            spec: spec.clone(),
            scheduler: scheduler.clone(),
            stats: stats.clone(),
            shutdown: stopped.clone(),
        };
        workers.spawn(pool::supervise(slot, pctx));
    }

    if cfg.secret_is_default {
        log::warn!(
            "no secret given (-s): using pp's public default secret; anyone who can reach \
             this port can run code here"
        );
    }
    log::info!(
        "ppserver listening on {local} with {} workers ({} -u -m {module}), advertising pp version {version}{}{}",
        cfg.workers,
        cfg.python.display(),
        if cfg.pp_version.is_some() {
            format!(" (--pp-version; the worker package is {found})")
        } else {
            String::new()
        },
        if cfg.autodiscovery {
            format!(", autodiscovery on (broadcast {})", cfg.broadcast)
        } else {
            String::new()
        }
    );

    let ctx = Arc::new(SessionContext {
        version,
        secret: cfg.secret.clone(),
        workers: cfg.workers,
        max_frame: cfg.max_frame_size,
        socket_timeout: cfg.socket_timeout,
        scheduler,
        stats,
        packages: PackageCache::new(PACKAGE_CACHE_BUDGET),
        next_job_id: AtomicU64::new(0),
        clients: Default::default(),
    });
    Ok(Server {
        listener,
        ctx,
        workers,
        stop,
        connections: Arc::new(Semaphore::new(cfg.max_connections)),
        idle_exit: cfg.idle_exit,
        workers_count: cfg.workers,
        discovery,
    })
}

/// Binds the listening socket: SO_REUSEADDR like ppft (a restarted server
/// gets its port back at once) and a generous backlog.
async fn bind(interface: &str, port: u16) -> Result<TcpListener, StartError> {
    let addr: SocketAddr = match tokio::net::lookup_host((interface, port)).await {
        Ok(mut addrs) => addrs.next(),
        Err(_) => None,
    }
    .ok_or_else(|| StartError::Bind(format!("cannot resolve interface {interface:?} (-i)")))?;
    let fail = |e: std::io::Error| StartError::Bind(format!("cannot listen on {addr}: {e}"));
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(BACKLOG).map_err(fail)
}

impl Server {
    /// The address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves clients until `shutdown` completes, then stops and reaps
    /// every worker.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let discovery = self.discovery.take().map(|d| tokio::spawn(d.run()));
        let idle_exit = idle_exit(self.idle_exit, self.ctx.clone());
        tokio::pin!(idle_exit);
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .map_err(|e| log::warn!("cannot handle SIGUSR1: {e}"))
                .ok();
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = &mut shutdown => break,
                _ = &mut idle_exit => break,
                Some(()) = async { usr1.as_mut()?.recv().await } => {
                    print_stats(&self.ctx, self.workers_count);
                    continue;
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                        log::warn!("{peer}: too many connections (--max-connections); closed");
                        continue;
                    };
                    let ctx = self.ctx.clone();
                    tokio::spawn(async move {
                        session::run(stream, peer, ctx).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    log::error!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        log::info!("shutting down: stopping workers");
        if let Some(d) = discovery {
            d.abort();
        }
        drop(self.listener);
        let _ = self.stop.send(true);
        self.ctx.scheduler.close();
        let all_stopped = async { while self.workers.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_TIMEOUT, all_stopped)
            .await
            .is_err()
        {
            log::error!("workers did not stop within {STOP_TIMEOUT:?}");
        }
    }
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
        if ctx.clients.count.load(Ordering::Relaxed) == 0 {
            let idle = ctx.clients.idle_since();
            if idle.elapsed() >= limit {
                log::info!("no client connections for {limit:?} (-t): exiting");
                return;
            }
        }
    }
}

/// SIGUSR1: ppft's statistics table on stdout.
fn print_stats(ctx: &SessionContext, workers: usize) {
    crate::logsink::stdout().send(ctx.stats.table(workers));
}

/// Connected clients, for `-t`.
#[derive(Debug)]
pub struct Clients {
    /// Authenticated connections open now.
    pub count: std::sync::atomic::AtomicUsize,
    /// When the count last changed (or the server started).
    changed: std::sync::Mutex<Instant>,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            count: Default::default(),
            changed: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl Clients {
    /// Counts a client connected until the guard drops.
    pub fn connected(&self) -> ClientGuard<'_> {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ClientGuard(self)
    }

    fn touch(&self) {
        *self.changed.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_since(&self) -> Instant {
        *self.changed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// See [`Clients::connected`].
#[derive(Debug)]
pub struct ClientGuard<'a>(&'a Clients);

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.count.fetch_sub(1, Ordering::Relaxed);
    }
}
