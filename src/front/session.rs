//! One client connection, from handshake to close.
//!
//! After the handshake (see [`crate::protocol::auth`]) the client names the
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
//! whole handshake at [`HANDSHAKE_TIMEOUT`] ([`TIGHT_HANDSHAKE_TIMEOUT`]
//! while the handshake budget is tight), so unauthenticated peers cost
//! little; a wrong answer waits out its address's delay
//! ([`crate::front::login::LoginThrottle`]) before `FAILED`. Log lines name the peer and
//! job; never the secret or payloads.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::config::allow::host_key;
use crate::config::Config;
use crate::front::connections::{Connections, Place, Refused};
use crate::front::login::{LoginThrottle, Penalty};
use crate::jobs::cache::{
    Package, PackageCache, PackageHash, UnknownPackage, PACKAGE_CACHE_BUDGET,
};
use crate::jobs::scheduler::{Job, Scheduler};
use crate::logging::ratelimit::{warn_limited, PerAddress};
use crate::memory::budget::{Budget, Reservation, Use};
use crate::ops::metrics::{metrics, ConnKind, ConnectionGuard, Counted};
use crate::ops::shutdown::{DrainSwitch, Draining};
use crate::ops::stats::{format_seconds, Stats};
use crate::protocol::auth;
use crate::protocol::wire::{Connection, FrameError, QuickAck};

/// Largest frame accepted before the client has authenticated: the answer
/// is 40 bytes and the connection type 4.
pub const PREAUTH_MAX_FRAME: usize = 4096;
/// Time a peer gets to complete the handshake, connection type included.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The same while the handshake budget is tight (see
/// [`Connections::tight`]): ample for a client on a slow link, which
/// answers at once, and it frees the places of silent sockets five times
/// sooner.
pub const TIGHT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `FAILED` may take to write, once a wrong answer's delay is
/// served.
const FAILED_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often one client host is warned about for a version mismatch.
const MISMATCH_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// What [`SessionError::Closed`] names when a peer leaves without
/// answering the nonce: how a pp client of another version behaves.
const BEFORE_ANSWER: &str = "answering the nonce";

/// What every session shares.
#[derive(Debug)]
pub struct SessionContext {
    /// The version string sent first.
    pub(crate) version: String,
    /// The shared secret.
    secret: String,
    /// Workers in the pool, as told to STAT connections.
    pub(crate) workers: usize,
    /// Limit on frames after authentication.
    max_frame: usize,
    /// How long a connection may wait for the client's next frame.
    socket_timeout: Duration,
    /// Where jobs go.
    pub(crate) scheduler: Arc<Scheduler>,
    /// Job counters for STAT.
    pub(crate) stats: Arc<Stats>,
    /// Function packages clients have sent.
    pub(crate) packages: PackageCache,
    /// Source of job numbers for log lines.
    next_job_id: AtomicU64,
    /// The connection budgets and the clients `-t` watches.
    pub(crate) connections: Connections,
    /// Delays the answers to wrong logins, per source address.
    logins: LoginThrottle,
    /// Limits the version-mismatch warning to one per client host.
    mismatch_warnings: PerAddress,
    /// Tells sessions the server is draining: they close once idle.
    pub(crate) drain: DrainSwitch,
    /// The memory budget client frames are admitted against.
    pub(crate) budget: Arc<Budget>,
}

impl SessionContext {
    /// The shared state for sessions of a server configured by `cfg` that
    /// advertises `version` and hands jobs to `scheduler`.
    pub fn new(
        cfg: &Config,
        version: String,
        scheduler: Arc<Scheduler>,
        stats: Arc<Stats>,
    ) -> Self {
        SessionContext {
            version,
            secret: cfg.secret.clone(),
            workers: cfg.workers,
            max_frame: cfg.max_frame_size,
            socket_timeout: cfg.socket_timeout,
            scheduler,
            stats,
            packages: PackageCache::new(PACKAGE_CACHE_BUDGET),
            next_job_id: AtomicU64::new(0),
            connections: Connections::new(cfg),
            logins: LoginThrottle::new(cfg.login_delay),
            mismatch_warnings: PerAddress::new(MISMATCH_WARNING_INTERVAL),
            drain: DrainSwitch::new(),
            budget: Budget::new(cfg.memory_limit),
        }
    }
}

/// Why a session ended early.
#[derive(Debug)]
enum SessionError {
    /// A frame could not be read (too large, cut off, or the read failed).
    Frame(FrameError),
    /// A write failed.
    Io(std::io::Error),
    /// The peer sent nothing for too long while `.0` was expected.
    Timeout(&'static str),
    /// The peer closed the connection cleanly where `.0` was expected.
    Closed(&'static str),
    /// The answer to the nonce was wrong; `FAILED` is still owed.
    WrongAnswer,
    /// The peer was told `FAILED` after the delay its address owed.
    AuthFailed(Penalty),
    /// Authenticated, but no place among the clients (`--max-connections`).
    Refused(Refused),
    UnknownType(String),
    Random(getrandom::Error),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Frame(e) => write!(f, "{e}"),
            SessionError::Io(e) => write!(f, "{e}"),
            SessionError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            SessionError::Closed(what) => write!(f, "peer closed the connection before {what}"),
            SessionError::WrongAnswer | SessionError::AuthFailed(_) => {
                write!(f, "authentication failed")
            }
            SessionError::Refused(r) => write!(f, "{r}"),
            SessionError::UnknownType(t) => write!(f, "unknown connection type {t:?}"),
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

/// Serves one accepted TCP connection, which holds `place` under the
/// connection budgets, until it ends.
pub(crate) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<SessionContext>,
    place: Place,
) {
    // Answers go out as single writes; Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_tcp_quickack(true);
    serve(Counted(QuickAck(stream)), peer, &ctx, place).await;
}

/// Serves a connection over any byte stream (in-memory pipes in tests),
/// admitted under the budgets as the accept loop admits a TCP connection;
/// logs how it ended.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    ctx: &SessionContext,
) {
    match ctx.connections.admit(peer) {
        Ok(place) => serve(stream, peer, ctx, place).await,
        Err(refused) => refused.log(peer),
    }
}

/// Serves an admitted connection; logs how it ended.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    ctx: &SessionContext,
    place: Place,
) {
    let mut session = Session {
        conn: Connection::new(stream, PREAUTH_MAX_FRAME),
        peer,
        ctx,
        draining: ctx.drain.watch(),
        shown: metrics().connection(peer.ip(), ConnKind::PreAuth),
        place,
    };
    match session.run().await {
        Ok(()) => log::debug!("{peer}: connection closed"),
        // A pp client compares the version first and, when it differs,
        // logs an error on its side and closes without a word; the server
        // is the only place its operator may look.
        Err(SessionError::Closed(BEFORE_ANSWER)) => ctx.mismatch_warnings.warn(
            host_key(peer.ip()),
            format_args!(
                "{peer}: closed the connection on receiving the version ({:?}) without \
                 answering: most likely a pp client of another version; clients require \
                 exactly {:?} (install the same pp/ppft version on both sides, or set \
                 --pp-version)",
                ctx.version, ctx.version
            ),
        ),
        Err(SessionError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => warn_limited(
            format_args!("{peer}: stopped reading its answers for -k seconds; connection closed"),
        ),
        Err(SessionError::AuthFailed(p)) => warn_limited(format_args!(
            "{peer}: authentication failed, connection closed (failure {} from this \
             address lately; told after {:.2} s)",
            p.failures,
            p.wait.as_secs_f64()
        )),
        Err(SessionError::Refused(r)) => r.log(peer),
        Err(
            e @ SessionError::Frame(FrameError::TooLarge { .. } | FrameError::Unsolicited { .. }),
        ) => warn_limited(format_args!("{peer}: {e}; connection closed")),
        Err(e) => log::debug!("{peer}: {e}; connection closed"),
    }
}

/// One client connection and what it shares with the others.
struct Session<'a, S> {
    /// The client's socket and its read buffer.
    conn: Connection<S>,
    /// Who the client is, for log lines.
    peer: SocketAddr,
    /// The server's shared state.
    ctx: &'a SessionContext,
    /// Whether the server is draining: then the session ends as soon as
    /// it has no job pending.
    draining: Draining,
    /// This connection in the metrics, by kind.
    shown: ConnectionGuard,
    /// The connection's place under the budgets: in the handshake budget,
    /// then among the clients.
    place: Place,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// The handshake, then the connection's type until the client leaves.
    async fn run(&mut self) -> Result<(), SessionError> {
        let ctx = self.ctx;
        let kind = match within_handshake_timeout(&ctx.connections, self.handshake()).await {
            // Outside the timeout: the delay may be longer.
            Err(SessionError::WrongAnswer) => return Err(self.refuse_login().await),
            other => other?,
        };
        self.conn.set_max(ctx.max_frame);
        // ppft's server drops a client that does not take its answers
        // within its socket timeout; so does -k here.
        self.conn.set_write_stall(ctx.socket_timeout);
        match &kind[..] {
            b"STAT" => {
                self.shown.become_kind(ConnKind::Stat);
                self.stat().await
            }
            b"EXEC" => {
                self.shown.become_kind(ConnKind::Exec);
                self.exec().await
            }
            other => Err(SessionError::UnknownType(
                String::from_utf8_lossy(&other[..other.len().min(16)]).into_owned(),
            )),
        }
    }

    /// Version, nonce, answer check, `OK`; returns the connection type.
    async fn handshake(&mut self) -> Result<Bytes, SessionError> {
        self.conn.write_frame(self.ctx.version.as_bytes()).await?;
        let nonce = auth::nonce().map_err(SessionError::Random)?;
        self.conn.write_frame(&nonce).await?;
        let expected = auth::expected_answer(&nonce, self.ctx.secret.as_bytes());
        let answer = self
            .conn
            .read_frame()
            .await?
            .ok_or(SessionError::Closed(BEFORE_ANSWER))?;
        if !auth::answer_matches(&expected, &answer) {
            return Err(SessionError::WrongAnswer);
        }
        // No place among the clients: closed without OK, as if refused at
        // accept, so a client tries again later rather than giving up.
        self.place.authenticate().map_err(SessionError::Refused)?;
        self.conn.write_frame(b"OK").await?;
        self.conn
            .read_frame()
            .await?
            .ok_or(SessionError::Closed("naming the connection type"))
    }

    /// Tells a peer that gave a wrong answer `FAILED`, once the delay its
    /// address owes is served. The connection keeps its place in the
    /// handshake budget meanwhile: that, capped per address, is what keeps
    /// one address from guessing on many connections at once.
    async fn refuse_login(&mut self) -> SessionError {
        metrics().failed_logins.inc();
        let penalty = self.ctx.logins.failed(self.peer.ip(), Instant::now());
        if !penalty.wait.is_zero() {
            tokio::time::sleep(penalty.wait).await;
        }
        // Best effort: the client may already be gone.
        let failed = self.conn.write_frame(b"FAILED");
        let _ = tokio::time::timeout(FAILED_WRITE_TIMEOUT, failed).await;
        SessionError::AuthFailed(penalty)
    }

    /// Reads the client's next frame within the socket timeout; `None`
    /// when the client closed, or when the server drains: a job that is
    /// not wholly received yet is not started here.
    async fn next_frame(&mut self, what: &'static str) -> Result<Option<Bytes>, SessionError> {
        let mut draining = self.draining.clone();
        tokio::select! {
            biased;
            () = draining.begun() => {
                log::debug!("{}: closed for the drain", self.peer);
                Ok(None)
            }
            read = tokio::time::timeout(self.ctx.socket_timeout, self.conn.read_frame()) => {
                match read {
                    Ok(frame) => Ok(frame?),
                    Err(_) => Err(SessionError::Timeout(what)),
                }
            }
        }
    }

    async fn stat(&mut self) -> Result<(), SessionError> {
        log::debug!("{}: STAT connection", self.peer);
        // ppft's server zeroes its job time when a STAT connection opens, so
        // a client sees the time spent since it connected. Keeping a
        // baseline per connection gives each client that answer without
        // resetting it under the other clients.
        let baseline = self.ctx.stats.job_seconds();
        self.conn
            .write_frame(self.ctx.workers.to_string().as_bytes())
            .await?;
        while self.next_frame("a STAT request").await?.is_some() {
            let secs = format_seconds(self.ctx.stats.job_seconds() - baseline);
            self.conn.write_frame(secs.as_bytes()).await?;
        }
        Ok(())
    }

    async fn exec(&mut self) -> Result<(), SessionError> {
        log::debug!("{}: EXEC connection", self.peer);
        // The packages this connection sent stay resolvable while it is
        // open: its client sends `H` for them on later jobs.
        let mut sent = HashMap::new();
        let ended = self.exec_jobs(&mut sent).await;
        drop(sent);
        self.ctx.packages.drop_large_unused();
        ended
    }

    async fn exec_jobs(
        &mut self,
        sent: &mut HashMap<PackageHash, Arc<Package>>,
    ) -> Result<(), SessionError> {
        let peer = self.peer;
        loop {
            let Some(package) = self.next_job_frame("a job").await? else {
                return Ok(());
            };
            let package = match package {
                Incoming::Frame(frame, memory) => self
                    .ctx
                    .packages
                    .admit(frame, memory)
                    .await
                    .map_err(Unrunnable::UnknownPackage),
                Incoming::TooLarge(len) => Err(Unrunnable::TooLarge("function package", len)),
            };
            if let Ok(p) = &package {
                sent.entry(p.hash).or_insert_with(|| p.clone());
            }
            let Some(args) = self.next_job_frame("a job's arguments").await? else {
                log::debug!("{peer}: closed between a job's package and its arguments");
                return Ok(());
            };
            let (package, args, held) = match (package, args) {
                (Ok(package), Incoming::Frame(args, held)) => (package, args, held),
                (Err(why), _) => {
                    self.refuse_job(why).await?;
                    continue;
                }
                (_, Incoming::TooLarge(len)) => {
                    self.refuse_job(Unrunnable::TooLarge("arguments", len))
                        .await?;
                    continue;
                }
            };
            let id = self.ctx.next_job_id.fetch_add(1, Ordering::Relaxed);
            metrics().jobs_received.inc();
            let (reply, result) = oneshot::channel();
            self.ctx.scheduler.submit(Job {
                id,
                client: peer.ip(),
                package,
                args,
                reply,
                attempts: 0,
                submitted: std::time::Instant::now(),
                _held: held,
            });
            log::trace!("{peer}: job {id} submitted");
            let result = tokio::select! {
                // A result that is ready is written even if the client's
                // EOF arrived with it: the client may only have closed its
                // sending side, and the answer is owed.
                biased;
                r = result => r,
                closed = self.conn.closed() => {
                    closed?;
                    // Dropping the receiver marks the job abandoned: a
                    // queued job is skipped, a running one has its result
                    // discarded.
                    log::debug!("{peer}: client left while job {id} was pending");
                    return Ok(());
                }
            };
            match result {
                Ok(frame) => {
                    // Counted until written, never waited for: a result
                    // that waited would hold its job's worker.
                    let _held = self.ctx.budget.force(frame.len(), Use::InFlight);
                    self.conn.write_frame(&frame).await?;
                }
                // The pool dropped the job: the server is shutting down.
                Err(_) => {
                    metrics().dropped("shutdown");
                    return Ok(());
                }
            }
        }
    }

    /// Answers a job that cannot be run with `(None, reason)`, as pp
    /// clients expect of a failed job. Closing the connection instead
    /// would make the client resend the same job forever.
    async fn refuse_job(&mut self, why: Unrunnable) -> Result<(), SessionError> {
        metrics().jobs_received.inc();
        metrics().server_answered(match &why {
            Unrunnable::UnknownPackage(_) => "unknown_package",
            Unrunnable::TooLarge(..) => "oversize",
        });
        let text = match &why {
            Unrunnable::UnknownPackage(e) => format!(
                "ppserver: {e}: the server no longer holds this function package \
                 (dropped from its cache); the job was not run, submit it again\n"
            ),
            Unrunnable::TooLarge(what, len) => format!(
                "ppserver: the job's {what} ({len} bytes) is larger than the server's whole \
                 memory budget (--memory-limit {} bytes); the job was not run\n",
                self.ctx.budget.limit()
            ),
        };
        warn_limited(format_args!(
            "{}: job refused: {}",
            self.peer,
            text.trim_start_matches("ppserver: ").trim_end()
        ));
        self.conn
            .write_frame(&crate::protocol::pickle::none_with_text(&text))
            .await?;
        Ok(())
    }

    /// The client's next job frame, admitted against the memory budget:
    /// once its header is in, the session waits (reading nothing more from
    /// this client, and with no `-k` clock running) until the budget has
    /// room for the whole frame; a frame larger than the whole budget is
    /// read and thrown away. `None` when the client closed, or the server
    /// drains.
    async fn next_job_frame(
        &mut self,
        what: &'static str,
    ) -> Result<Option<Incoming>, SessionError> {
        let mut draining = self.draining.clone();
        let header = tokio::select! {
            biased;
            () = draining.begun() => None,
            read = tokio::time::timeout(self.ctx.socket_timeout, self.conn.read_header()) => {
                read.map_err(|_| SessionError::Timeout(what))??
            }
        };
        let Some(len) = header else {
            return Ok(None);
        };
        let budget = self.ctx.budget.clone();
        let frame_timeout = |_| SessionError::Timeout(what);
        if len > budget.limit() {
            let read = tokio::time::timeout(self.ctx.socket_timeout, self.conn.discard_frame());
            let len = read.await.map_err(frame_timeout)??;
            return Ok(Some(Incoming::TooLarge(len)));
        }
        if !budget.fits(len) {
            // Cached packages nobody uses make room first.
            self.ctx.packages.shed(len);
        }
        let memory = tokio::select! {
            biased;
            () = draining.begun() => return Ok(None),
            m = budget.reserve(len, Use::InFlight) => m,
        };
        let read = tokio::time::timeout(self.ctx.socket_timeout, self.conn.read_frame());
        match read.await.map_err(frame_timeout)?? {
            Some(frame) => Ok(Some(Incoming::Frame(frame, memory))),
            // The header was there: an end of stream now cuts the frame.
            None => Err(FrameError::Truncated.into()),
        }
    }
}

/// A job frame as the session took it from the client.
enum Incoming {
    /// The frame, and its bytes in the memory budget.
    Frame(Bytes, Reservation),
    /// A frame larger than the whole budget, read and thrown away; its
    /// length.
    TooLarge(usize),
}

/// Why a job was answered without being run.
#[derive(Debug)]
enum Unrunnable {
    /// Its `H` names a package the server does not hold.
    UnknownPackage(UnknownPackage),
    /// One of its frames (named) is larger than the whole memory budget.
    TooLarge(&'static str, usize),
}

/// Runs `handshake` within [`HANDSHAKE_TIMEOUT`] of now, cut to
/// [`TIGHT_HANDSHAKE_TIMEOUT`] of now if the handshake budget is or becomes
/// tight meanwhile.
async fn within_handshake_timeout<T>(
    connections: &Connections,
    handshake: impl Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    let start = tokio::time::Instant::now();
    let mut tight = connections.tight();
    let mut limit = HANDSHAKE_TIMEOUT;
    tokio::pin!(handshake);
    loop {
        if *tight.borrow_and_update() {
            limit = TIGHT_HANDSHAKE_TIMEOUT;
        }
        tokio::select! {
            done = &mut handshake => return done,
            () = tokio::time::sleep_until(start + limit) => {
                return Err(SessionError::Timeout("the handshake"));
            }
            // Once cut short, the timeout stays short: no more wake-ups.
            Ok(()) = tight.changed(), if limit == HANDSHAKE_TIMEOUT => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::cache::WorkerCache;
    use crate::protocol::wire::{encode_frame, FrameReader};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// What every session test runs with: secret `s`, 2 workers, and a
    /// scheduler no worker serves (jobs stay queued).
    fn test_config() -> Config {
        Config {
            secret: "s".into(),
            workers: 2,
            ..Config::default()
        }
    }

    fn context() -> SessionContext {
        context_from(&test_config())
    }

    fn context_from(cfg: &Config) -> SessionContext {
        SessionContext::new(
            cfg,
            "1.7.8".into(),
            Arc::new(Scheduler::default()),
            Arc::new(Stats::default()),
        )
    }

    fn session(stream: DuplexStream, ctx: &SessionContext) -> Session<'_, DuplexStream> {
        let peer = "127.0.0.1:9".parse().unwrap();
        Session {
            conn: Connection::new(stream, PREAUTH_MAX_FRAME),
            peer,
            ctx,
            draining: ctx.drain.watch(),
            shown: metrics().connection(peer.ip(), ConnKind::PreAuth),
            place: ctx.connections.admit(peer).unwrap(),
        }
    }

    /// One job's two frames: a new package, then `args`.
    fn job_frames(args: &[u8]) -> Vec<u8> {
        let mut frames = encode_frame(b"Npackage");
        frames.extend(encode_frame(args));
        frames
    }

    /// Plays the client's side of the handshake with secret `s`.
    async fn log_in(client: &mut FrameReader<DuplexStream>, kind: &[u8]) {
        assert_eq!(client.read_frame().await.unwrap().unwrap(), &b"1.7.8"[..]);
        let nonce = client.read_frame().await.unwrap().unwrap();
        let answer = auth::expected_answer(&nonce, b"s");
        crate::protocol::wire::write_frame(client.get_mut(), &answer)
            .await
            .unwrap();
        assert_eq!(client.read_frame().await.unwrap().unwrap(), &b"OK"[..]);
        crate::protocol::wire::write_frame(client.get_mut(), kind)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_closes_is_not_reported_as_a_timeout() {
        // Regression: EOF during the handshake was logged as "timed out
        // waiting for the answer".
        let ctx = context();
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            client.read_frame().await.unwrap();
            client.read_frame().await.unwrap();
            client.get_mut().shutdown().await.unwrap();
        };
        let (err, ()) = tokio::join!(served, client_side);
        let err = err.unwrap_err();
        assert!(matches!(err, SessionError::Closed(_)), "{err:?}");
        assert!(!err.to_string().contains("timed out"), "{err}");
    }

    /// Answers the nonce with `secret`; returns the server's reply, or
    /// `None` if it closed the connection instead.
    async fn answer_with(client: &mut FrameReader<DuplexStream>, secret: &[u8]) -> Option<Bytes> {
        client.read_frame().await.unwrap().unwrap();
        let nonce = client.read_frame().await.unwrap().unwrap();
        let answer = auth::expected_answer(&nonce, secret);
        crate::protocol::wire::write_frame(client.get_mut(), &answer)
            .await
            .unwrap();
        client.read_frame().await.ok().flatten()
    }

    #[tokio::test]
    async fn a_wrong_answer_is_told_after_its_delay_and_a_right_one_at_once() {
        let ctx = context();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // The address has guessed a lot: its next failure waits for the
        // eight before it to be told, then its own delay.
        for _ in 0..(crate::front::login::FREE_FAILURES + 8) {
            ctx.logins.failed(peer.ip(), Instant::now());
        }
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let started = Instant::now();
        let (ended, reply) = tokio::join!(served, answer_with(&mut client, b"wrong"));
        assert_eq!(reply.as_deref(), Some(&b"FAILED"[..]));
        let Err(SessionError::AuthFailed(penalty)) = ended else {
            panic!("{ended:?}");
        };
        assert!(
            penalty.wait >= crate::config::DEFAULT_LOGIN_DELAY * 2,
            "{penalty:?}"
        );
        assert!(started.elapsed() >= penalty.wait);

        // The right secret from the same address, with that address owing
        // ever more: OK without waiting (the bound is only against a hang).
        for _ in 0..1000 {
            ctx.logins.failed(peer.ip(), Instant::now());
        }
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            let reply = answer_with(&mut client, b"s").await;
            client.get_mut().shutdown().await.unwrap();
            reply
        };
        let both = async { tokio::join!(served, client_side) };
        let (_, reply) = tokio::time::timeout(Duration::from_secs(30), both)
            .await
            .expect("a right answer is not held back");
        assert_eq!(reply.as_deref(), Some(&b"OK"[..]));
    }

    #[tokio::test]
    async fn an_authenticated_peer_without_a_client_place_gets_no_ok() {
        let cfg = Config {
            secret: "s".into(),
            max_connections: 1,
            ..Config::default()
        };
        let ctx = SessionContext::new(
            &cfg,
            "1.7.8".into(),
            Arc::new(Scheduler::default()),
            Arc::new(Stats::default()),
        );
        // Admitted while the one client place was free...
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let mut late = session(server, &ctx);
        // ...then another client took it.
        let mut first = ctx
            .connections
            .admit("127.0.0.2:9".parse().unwrap())
            .unwrap();
        first.authenticate().unwrap();
        let served = async move {
            let ended = late.run().await;
            drop(late);
            ended
        };
        let (ended, reply) = tokio::join!(served, answer_with(&mut client, b"s"));
        assert_eq!(reply, None, "closed without OK");
        assert!(
            matches!(ended, Err(SessionError::Refused(Refused::Clients))),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn a_tight_handshake_budget_cuts_the_timeout_short() {
        let cfg = Config {
            max_handshakes: 4,
            max_handshakes_per_address: Some(4),
            ..Config::default()
        };
        let ctx = SessionContext::new(
            &cfg,
            "1.7.8".into(),
            Arc::new(Scheduler::default()),
            Arc::new(Stats::default()),
        );
        // A silent peer, then a second connection makes the budget tight
        // (2 of 4).
        let (_client, server) = tokio::io::duplex(1 << 16);
        let mut silent = session(server, &ctx);
        assert!(!*ctx.connections.tight().borrow());
        let started = tokio::time::Instant::now();
        let run = silent.run();
        tokio::pin!(run);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut run)
                .await
                .is_err(),
            "still in its handshake"
        );
        let _other = ctx
            .connections
            .admit("127.0.0.3:9".parse().unwrap())
            .unwrap();
        let ended = run.await;
        assert!(matches!(ended, Err(SessionError::Timeout(_))), "{ended:?}");
        let took = started.elapsed();
        assert!(
            took >= TIGHT_HANDSHAKE_TIMEOUT && took < HANDSHAKE_TIMEOUT,
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_ready_result_wins_over_the_eof_that_came_with_it() {
        // Regression: the result and the client's EOF raced in an unbiased
        // select!, so a result ready together with the EOF was dropped
        // about half the time. Twenty rounds make a lost result certain
        // enough to be caught.
        for round in 0..20 {
            let ctx = context();
            let (client, server) = tokio::io::duplex(1 << 16);
            let mut client = FrameReader::new(client, 1 << 20);
            let served = async { session(server, &ctx).run().await };
            let client_side = async {
                log_in(&mut client, b"EXEC").await;
                let job = job_frames(b"args");
                client.get_mut().write_all(&job).await.unwrap();
                // No worker serves this scheduler: the job stays queued
                // while the session waits for its result.
                while ctx.scheduler.queued() == 0 {
                    tokio::task::yield_now().await;
                }
                let (job, _) = ctx.scheduler.next_job(0, WorkerCache::default()).unwrap();
                // Both become ready before the session runs again.
                job.reply.send(Bytes::from_static(b"result")).unwrap();
                client.get_mut().shutdown().await.unwrap();
                let mut rest = Vec::new();
                client.get_mut().read_to_end(&mut rest).await.unwrap();
                rest
            };
            let (ended, rest) = tokio::join!(served, client_side);
            assert!(ended.is_ok(), "round {round}: {ended:?}");
            assert_eq!(rest, encode_frame(b"result"), "round {round}");
        }
    }

    #[tokio::test]
    async fn eof_before_the_result_means_the_client_left() {
        let ctx = context();
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            let job = job_frames(b"args");
            client.get_mut().write_all(&job).await.unwrap();
            client.get_mut().shutdown().await.unwrap();
        };
        let (ended, ()) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(ctx.scheduler.queued(), 1);
        assert!(
            ctx.scheduler.next_job(0, WorkerCache::default()).is_err(),
            "the abandoned job is dropped, not run"
        );
    }

    #[tokio::test]
    async fn sending_while_waiting_is_reported_as_such() {
        // Regression: an over-long send while waiting for a result was
        // logged as "client left".
        let ctx = SessionContext {
            max_frame: 1024,
            ..context()
        };
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            let mut job = job_frames(b"args");
            job.extend([0u8; 4096]);
            client.get_mut().write_all(&job).await.unwrap();
        };
        let (ended, ()) = tokio::join!(served, client_side);
        assert!(
            matches!(
                ended,
                Err(SessionError::Frame(FrameError::Unsolicited { .. }))
            ),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn a_drain_answers_the_pending_job_then_closes() {
        let ctx = context();
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            let job = job_frames(b"args");
            client.get_mut().write_all(&job).await.unwrap();
            while ctx.scheduler.queued() == 0 {
                tokio::task::yield_now().await;
            }
            ctx.drain.begin();
            // A job sent after the drain began is never started.
            client.get_mut().write_all(&job).await.unwrap();
            let (job, _) = ctx.scheduler.next_job(0, WorkerCache::default()).unwrap();
            job.reply.send(Bytes::from_static(b"result")).unwrap();
            let mut rest = Vec::new();
            client.get_mut().read_to_end(&mut rest).await.unwrap();
            rest
        };
        let (ended, rest) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(rest, encode_frame(b"result"), "answered, then closed");
        assert_eq!(ctx.scheduler.queued(), 0, "the later job was not queued");
    }

    #[tokio::test]
    async fn a_drain_closes_idle_connections() {
        let ctx = context();
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"STAT").await;
            assert_eq!(client.read_frame().await.unwrap().unwrap(), &b"2"[..]);
            ctx.drain.begin();
            client.read_frame().await.unwrap()
        };
        let (ended, after) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(after, None, "closed cleanly");
    }

    fn small_budget_context(limit: usize) -> SessionContext {
        context_from(&Config {
            memory_limit: limit,
            ..test_config()
        })
    }

    /// The `(None, text)` answer's text, from the pickle the server wrote.
    fn refusal_text(frame: &[u8]) -> String {
        assert_eq!(&frame[..4], b"\x80\x02NX", "a (None, text) pickle");
        let len = u32::from_le_bytes(frame[4..8].try_into().unwrap()) as usize;
        String::from_utf8(frame[8..8 + len].to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_budget_is_answered_and_the_session_goes_on() {
        let ctx = small_budget_context(1 << 20);
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 24);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            let job = job_frames(&vec![1u8; 2 << 20]);
            client.get_mut().write_all(&job).await.unwrap();
            let answer = client.read_frame().await.unwrap().unwrap();
            assert!(
                refusal_text(&answer).contains("--memory-limit"),
                "{answer:?}"
            );
            // The connection is still good, and nothing is held.
            assert_eq!(ctx.scheduler.queued(), 0);
            client
                .get_mut()
                .write_all(&encode_frame(b"H0123"))
                .await
                .unwrap();
            client
                .get_mut()
                .write_all(&encode_frame(b"args"))
                .await
                .unwrap();
            let answer = client.read_frame().await.unwrap().unwrap();
            assert!(
                refusal_text(&answer).contains("unknown package"),
                "{answer:?}"
            );
            client.get_mut().shutdown().await.unwrap();
        };
        let (ended, ()) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
        // Only the small package stays, cached for a reconnecting client.
        ctx.packages.shed(usize::MAX);
        assert_eq!(ctx.budget.used(), 0, "nothing else held");
    }

    #[tokio::test]
    async fn a_frame_waits_for_the_budget_then_goes_through() {
        let ctx = small_budget_context(1 << 20);
        let hog = ctx.budget.force(1 << 20, Use::InFlight);
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 24);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            let job = job_frames(&[9u8; 1000]);
            client.get_mut().write_all(&job).await.unwrap();
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                ctx.scheduler.queued(),
                0,
                "held back while the budget is full"
            );
            drop(hog);
            while ctx.scheduler.queued() == 0 {
                tokio::task::yield_now().await;
            }
            assert!(ctx.budget.used() >= 1000, "the queued job holds its memory");
            client.get_mut().shutdown().await.unwrap();
        };
        let (ended, ()) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
    }
}
