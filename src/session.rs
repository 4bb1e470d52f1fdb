//! One client connection, from handshake to close.
//!
//! After the handshake (see [`crate::auth`]) the client names the
//! connection's type:
//!
//! - `STAT`: the server sends its worker count as a decimal string, then
//!   answers every frame the client sends (ppft sends `TIME`) with the job
//!   seconds spent since this connection opened, as a float string.
//! - `EXEC`: forever, one job at a time: the client sends the function
//!   package through the `N`/`H` cache layer, then the pickled args; the
//!   server answers with the worker's result frame, byte for byte.
//!
//! Frames before authentication are capped at [`PREAUTH_MAX_FRAME`] and the
//! whole handshake at [`HANDSHAKE_TIMEOUT`], so unauthenticated peers cost
//! little. Log lines name the peer and job; never the secret or payloads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::auth;
use crate::cache::{PackageCache, UnknownPackage};
use crate::scheduler::{Job, Scheduler};
use crate::stats::{format_seconds, Stats};
use crate::wire::{write_frame, FrameError, FrameReader, QuickAck};

/// Largest frame accepted before the client has authenticated: the answer
/// is 40 bytes and the connection type 4.
pub const PREAUTH_MAX_FRAME: usize = 4096;
/// Time a peer gets to complete the handshake, connection type included.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every session shares.
#[derive(Debug)]
pub struct SessionContext {
    /// The version string sent first.
    pub version: String,
    /// The shared secret.
    pub secret: String,
    /// Workers in the pool, as told to STAT connections.
    pub workers: usize,
    /// Limit on frames after authentication.
    pub max_frame: usize,
    /// How long a connection may wait for the client's next frame.
    pub socket_timeout: Duration,
    /// Where jobs go.
    pub scheduler: Arc<Scheduler>,
    /// Job counters for STAT.
    pub stats: Arc<Stats>,
    /// Function packages clients have sent.
    pub packages: PackageCache,
    /// Source of job numbers for log lines.
    pub next_job_id: AtomicU64,
    /// Authenticated connections, for `-t`.
    pub clients: crate::server::Clients,
}

/// Why a session ended early.
#[derive(Debug)]
enum SessionError {
    Frame(FrameError),
    Io(std::io::Error),
    Timeout(&'static str),
    AuthFailed,
    UnknownType(String),
    UnknownPackage(UnknownPackage),
    Random(getrandom::Error),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Frame(e) => write!(f, "{e}"),
            SessionError::Io(e) => write!(f, "{e}"),
            SessionError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            SessionError::AuthFailed => write!(f, "authentication failed"),
            SessionError::UnknownType(t) => write!(f, "unknown connection type {t:?}"),
            SessionError::UnknownPackage(e) => write!(f, "{e}"),
            SessionError::Random(e) => write!(f, "no randomness for the nonce: {e}"),
        }
    }
}

impl From<FrameError> for SessionError {
    fn from(e: FrameError) -> Self {
        SessionError::Frame(e)
    }
}

impl From<std::io::Error> for SessionError {
    fn from(e: std::io::Error) -> Self {
        SessionError::Io(e)
    }
}

/// Serves one accepted TCP connection until it ends.
pub async fn run(stream: TcpStream, peer: SocketAddr, ctx: Arc<SessionContext>) {
    // Answers go out as single writes; Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_tcp_quickack(true);
    serve_stream(QuickAck(stream), peer, &ctx).await;
}

/// Serves a connection over any byte stream (TCP in the server, in-memory
/// pipes in tests); logs how it ended.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    ctx: &SessionContext,
) {
    let mut conn = FrameReader::new(stream, PREAUTH_MAX_FRAME);
    match serve(&mut conn, peer, ctx).await {
        Ok(()) => log::debug!("{peer}: connection closed"),
        Err(SessionError::AuthFailed) => warn_limited(format_args!(
            "{peer}: authentication failed, connection closed"
        )),
        Err(
            e
            @ (SessionError::Frame(FrameError::TooLarge { .. }) | SessionError::UnknownPackage(_)),
        ) => warn_limited(format_args!("{peer}: {e}; connection closed")),
        Err(e) => log::debug!("{peer}: {e}; connection closed"),
    }
}

/// Logs a warning about a misbehaving peer, at most about once a second,
/// saying how many were held back since; those go to debug. A client stuck
/// in a reconnect loop or a flood of bad logins must not bury the log, but
/// the count still shows how big the flood was.
fn warn_limited(message: std::fmt::Arguments<'_>) {
    static START: OnceLock<Instant> = OnceLock::new();
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static HELD_BACK: AtomicU64 = AtomicU64::new(0);
    let now_ms = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1000;
    let last = LAST_MS.load(Ordering::Relaxed);
    if now_ms >= last + 1000
        && LAST_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        match HELD_BACK.swap(0, Ordering::Relaxed) {
            0 => log::warn!("{message}"),
            n => log::warn!("{message} ({n} similar warnings in the last seconds at debug level)"),
        }
    } else {
        HELD_BACK.fetch_add(1, Ordering::Relaxed);
        log::debug!("{message}");
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut FrameReader<S>,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Result<(), SessionError> {
    let kind = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(conn, ctx))
        .await
        .map_err(|_| SessionError::Timeout("the handshake"))??;
    conn.set_max(ctx.max_frame);
    let _client = ctx.clients.connected();
    match &kind[..] {
        b"STAT" => stat(conn, peer, ctx).await,
        b"EXEC" => exec(conn, peer, ctx).await,
        other => Err(SessionError::UnknownType(
            String::from_utf8_lossy(&other[..other.len().min(16)]).into_owned(),
        )),
    }
}

/// Version, nonce, answer check, `OK`; returns the connection type.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut FrameReader<S>,
    ctx: &SessionContext,
) -> Result<Bytes, SessionError> {
    write_frame(conn.get_mut(), ctx.version.as_bytes()).await?;
    let nonce = auth::nonce().map_err(SessionError::Random)?;
    write_frame(conn.get_mut(), &nonce).await?;
    let expected = auth::expected_answer(&nonce, ctx.secret.as_bytes());
    let answer = conn
        .read_frame()
        .await?
        .ok_or(SessionError::Timeout("the answer"))?;
    if !auth::answer_matches(&expected, &answer) {
        // Best effort: the client may already be gone.
        let _ = write_frame(conn.get_mut(), b"FAILED").await;
        return Err(SessionError::AuthFailed);
    }
    write_frame(conn.get_mut(), b"OK").await?;
    conn.read_frame()
        .await?
        .ok_or(SessionError::Timeout("the connection type"))
}

/// Reads the client's next frame within the socket timeout.
async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut FrameReader<S>,
    ctx: &SessionContext,
    what: &'static str,
) -> Result<Option<Bytes>, SessionError> {
    match tokio::time::timeout(ctx.socket_timeout, conn.read_frame()).await {
        Ok(frame) => Ok(frame?),
        Err(_) => Err(SessionError::Timeout(what)),
    }
}

async fn stat<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut FrameReader<S>,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Result<(), SessionError> {
    log::debug!("{peer}: STAT connection");
    // ppft's server zeroes its job time when a STAT connection opens, so a
    // client sees the time spent since it connected. Keeping a baseline per
    // connection gives each client that answer without resetting it under
    // the other clients.
    let baseline = ctx.stats.job_seconds();
    write_frame(conn.get_mut(), ctx.workers.to_string().as_bytes()).await?;
    while next_frame(conn, ctx, "a STAT request").await?.is_some() {
        let secs = format_seconds(ctx.stats.job_seconds() - baseline);
        write_frame(conn.get_mut(), secs.as_bytes()).await?;
    }
    Ok(())
}

async fn exec<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut FrameReader<S>,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Result<(), SessionError> {
    log::debug!("{peer}: EXEC connection");
    loop {
        let Some(package) = next_frame(conn, ctx, "a job").await? else {
            return Ok(());
        };
        let package = ctx
            .packages
            .receive(package)
            .map_err(SessionError::UnknownPackage)?;
        let Some(args) = next_frame(conn, ctx, "a job's arguments").await? else {
            log::debug!("{peer}: closed between a job's package and its arguments");
            return Ok(());
        };
        let id = ctx.next_job_id.fetch_add(1, Ordering::Relaxed);
        let (reply, result) = oneshot::channel();
        ctx.scheduler.submit(Job {
            id,
            package,
            args,
            reply,
            attempts: 0,
        });
        log::trace!("{peer}: job {id} submitted");
        let result = tokio::select! {
            r = result => r,
            _ = conn.closed() => {
                // Dropping the receiver marks the job abandoned: a queued
                // job is skipped, a running one has its result discarded.
                log::debug!("{peer}: client left while job {id} was pending");
                return Ok(());
            }
        };
        match result {
            Ok(frame) => write_frame(conn.get_mut(), &frame).await?,
            // The pool dropped the job: the server is shutting down.
            Err(_) => return Ok(()),
        }
    }
}
