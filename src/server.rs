//! Startup, the accept loop and shutdown.
//!
//! [`start`] checks the worker interpreter, binds the listener and starts
//! the worker pool; [`Server::run`] accepts clients until the shutdown
//! future completes, then stops every worker and reaps it before returning.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::Config;
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
}

/// Checks the interpreter, binds, and starts the workers.
pub async fn start(cfg: &Config) -> Result<Server, StartError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let pythonpath = pool::worker_pythonpath(std::env::var_os("PYTHONPATH").as_deref(), &cwd);
    let found = pool::probe_version(&cfg.python, &cfg.worker_module, &pythonpath)
        .await
        .map_err(StartError::Python)?;
    let version = cfg.pp_version.clone().unwrap_or(found.clone());

    let listener = bind(&cfg.interface, cfg.port).await?;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Bind(format!("cannot read the listening address: {e}")))?;

    let scheduler = Arc::new(Scheduler::default());
    let stats = Arc::new(Stats::default());
    let (stop, stopped) = watch::channel(false);
    let spec = Arc::new(WorkerSpec {
        python: cfg.python.clone(),
        module: cfg.worker_module.clone(),
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
        "ppserver listening on {local} with {} workers ({} -u -m {}), advertising pp version {version}{}",
        cfg.workers,
        cfg.python.display(),
        cfg.worker_module,
        if cfg.pp_version.is_some() {
            format!(" (--pp-version; the worker package is {found})")
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
        next_job_id: AtomicU64::new(0),
    });
    Ok(Server {
        listener,
        ctx,
        workers,
        stop,
        connections: Arc::new(Semaphore::new(cfg.max_connections)),
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
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = &mut shutdown => break,
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
