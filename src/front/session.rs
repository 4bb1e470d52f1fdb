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
//!   server answers with the worker's result frame, byte for byte (the
//!   loop is [`crate::front::exec`]'s).
//!
//! Frames before authentication are capped at [`PREAUTH_MAX_FRAME`] and the
//! whole handshake at [`HANDSHAKE_TIMEOUT`] ([`TIGHT_HANDSHAKE_TIMEOUT`]
//! while the handshake budget is tight), so unauthenticated peers cost
//! little; a wrong answer waits out its address's delay
//! ([`crate::front::login::LoginThrottle`]) before `FAILED`. Log lines
//! name the peer and job; never the secret or payloads.
//!
//! A connection from a `--proxy-protocol` address first has its PROXY
//! header read ([`crate::front::proxy`]), within the handshake's timeout,
//! which runs from the accept; from then on the peer is the client the
//! header names.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::allow::host_key;
use crate::config::users::{User, Users};
use crate::config::Config;
use crate::front::connections::{Connections, Place, Refused};
use crate::front::login::{LoginThrottle, Penalty};
use crate::front::proxy::{self, HeaderError};
use crate::jobs::cache::{PackageCache, PACKAGE_CACHE_BUDGET};
use crate::jobs::scheduler::Scheduler;
use crate::logging::ratelimit::{warn_limited, PerAddress};
use crate::memory::budget::Budget;
use crate::memory::spares::Spares;
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
    /// Who may log in, each with a secret of their own ([`Users::login`]).
    pub(crate) users: Arc<Users>,
    /// Workers in the pool.
    pub(crate) workers: usize,
    /// The CPU count told to STAT connections: the workers, or
    /// `--advertise-ncpus` (the workers of every server behind a load
    /// balancer).
    pub(super) advertised_ncpus: usize,
    /// Limit on frames after authentication.
    pub(super) max_frame: usize,
    /// How long a connection may wait for the client's next frame.
    pub(super) socket_timeout: Duration,
    /// Where jobs go.
    pub(crate) scheduler: Arc<Scheduler>,
    /// Job counters for STAT.
    pub(crate) stats: Arc<Stats>,
    /// Function packages clients have sent.
    pub(crate) packages: PackageCache,
    /// Source of job numbers for log lines.
    pub(super) next_job_id: AtomicU64,
    /// The connection budgets and the clients `-t` watches.
    pub(crate) connections: Connections,
    /// Delays the answers to wrong logins, per source address.
    pub(super) logins: LoginThrottle,
    /// Limits the version-mismatch warning to one per client host.
    pub(super) mismatch_warnings: PerAddress,
    /// Tells sessions the server is draining: they close once idle.
    pub(crate) drain: DrainSwitch,
    /// The memory budget client frames are admitted against.
    pub(crate) budget: Arc<Budget>,
    /// Mappings of large frames kept for the next ones, counted in
    /// `budget`.
    pub(crate) spares: Arc<Spares>,
}

impl SessionContext {
    /// The shared state for sessions of a server configured by `cfg` that
    /// advertises `version` and hands jobs to `scheduler`, with the `-s`
    /// secret's user alone (as the tests and tools that serve streams
    /// want; the server passes its users to [`SessionContext::with_users`]).
    pub fn new(
        cfg: &Config,
        version: String,
        scheduler: Arc<Scheduler>,
        stats: Arc<Stats>,
    ) -> Self {
        let users = Arc::new(Users::single(&cfg.secret));
        Self::with_users(cfg, version, scheduler, stats, users)
    }

    /// [`SessionContext::new`] for `users`.
    pub fn with_users(
        cfg: &Config,
        version: String,
        scheduler: Arc<Scheduler>,
        stats: Arc<Stats>,
        users: Arc<Users>,
    ) -> Self {
        let budget = Budget::new(cfg.memory_limit);
        SessionContext {
            version,
            users,
            workers: cfg.workers,
            advertised_ncpus: cfg.advertised_ncpus(),
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
            spares: Spares::new(&budget),
            budget,
        }
    }
}

/// Why a session ended early.
#[derive(Debug)]
pub(super) enum SessionError {
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
    mut stream: S,
    peer: SocketAddr,
    ctx: &SessionContext,
    mut place: Place,
) {
    let accepted = tokio::time::Instant::now();
    let peer = if place.awaits_header() {
        let read = async { Ok(proxy::read_header(&mut stream).await) };
        let header = within_handshake_timeout(&ctx.connections, accepted, read)
            .await
            .unwrap_or(Err(HeaderError::Late));
        match proxy::admit_client(header, peer, &mut place) {
            Some(client) => client,
            None => return,
        }
    } else {
        peer
    };
    let mut session = Session {
        conn: Connection::new(stream, PREAUTH_MAX_FRAME),
        peer,
        user: None,
        ctx,
        draining: ctx.drain.watch(),
        shown: metrics().connection(peer.ip(), ConnKind::PreAuth),
        place,
        accepted,
    };
    let ended = session.run().await;
    let who = session.who();
    match ended {
        Ok(()) => log::debug!("{who}: connection closed"),
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
            format_args!("{who}: stopped reading its answers for -k seconds; connection closed"),
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
        ) => warn_limited(format_args!("{who}: {e}; connection closed")),
        Err(e) => log::debug!("{who}: {e}; connection closed"),
    }
}

/// One client connection and what it shares with the others.
pub(super) struct Session<'a, S> {
    /// The client's socket and its read buffer.
    pub(super) conn: Connection<S>,
    /// Where the client is.
    pub(super) peer: SocketAddr,
    /// Who logged in: the user whose secret answered the nonce.
    pub(super) user: Option<Arc<User>>,
    /// The server's shared state.
    pub(super) ctx: &'a SessionContext,
    /// Whether the server is draining: then the session ends as soon as
    /// it has no job pending.
    pub(super) draining: Draining,
    /// This connection in the metrics, by kind.
    pub(super) shown: ConnectionGuard,
    /// The connection's place under the budgets: in the handshake budget,
    /// then among the clients.
    pub(super) place: Place,
    /// When the connection was accepted: the handshake's timeout runs from
    /// then, a PROXY header's read included.
    pub(super) accepted: tokio::time::Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// The handshake, then the connection's type until the client leaves.
    pub(super) async fn run(&mut self) -> Result<(), SessionError> {
        let ctx = self.ctx;
        let kind = match within_handshake_timeout(&ctx.connections, self.accepted, self.handshake())
            .await
        {
            // Outside the timeout: the delay may be longer.
            Err(SessionError::WrongAnswer) => return Err(self.refuse_login().await),
            other => other?,
        };
        self.conn.set_max(ctx.max_frame);
        // Large frames' mappings come from the spares counted in the
        // memory budget, and go back there.
        self.conn.set_spares(ctx.spares.clone());
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
        let answer = self
            .conn
            .read_frame()
            .await?
            .ok_or(SessionError::Closed(BEFORE_ANSWER))?;
        let user = self
            .ctx
            .users
            .login(&nonce, &answer)
            .ok_or(SessionError::WrongAnswer)?;
        self.user = Some(user);
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
    pub(super) async fn next_frame(
        &mut self,
        what: &'static str,
    ) -> Result<Option<Bytes>, SessionError> {
        let mut draining = self.draining.clone();
        tokio::select! {
            biased;
            () = draining.begun() => {
                log::debug!("{}: closed for the drain", self.who());
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
        log::debug!("{}: STAT connection", self.who());
        // ppft's server zeroes its job time when a STAT connection opens, so
        // a client sees the time spent since it connected. Keeping a
        // baseline per connection gives each client that answer without
        // resetting it under the other clients.
        let baseline = self.ctx.stats.job_seconds();
        self.conn
            .write_frame(self.ctx.advertised_ncpus.to_string().as_bytes())
            .await?;
        while self.next_frame("a STAT request").await?.is_some() {
            let secs = format_seconds(self.ctx.stats.job_seconds() - baseline);
            self.conn.write_frame(secs.as_bytes()).await?;
        }
        Ok(())
    }
}

impl<S> Session<'_, S> {
    /// Who this connection is, for log lines.
    pub(super) fn who(&self) -> Who {
        Who {
            peer: self.peer,
            user: self.user.clone(),
        }
    }
}

/// Who a connection is, for log lines: the peer's address, after the
/// user's name where users are named (`alice@192.0.2.7:51234`).
#[derive(Debug, Clone)]
pub(super) struct Who {
    peer: SocketAddr,
    user: Option<Arc<User>>,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.user.as_deref().and_then(User::shown) {
            Some(name) => write!(f, "{name}@{}", self.peer),
            None => write!(f, "{}", self.peer),
        }
    }
}

/// Runs `handshake` within [`HANDSHAKE_TIMEOUT`] of `start`, cut to
/// [`TIGHT_HANDSHAKE_TIMEOUT`] of `start` if the handshake budget is or
/// becomes tight meanwhile.
async fn within_handshake_timeout<T>(
    connections: &Connections,
    start: tokio::time::Instant,
    handshake: impl Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
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
pub(super) mod tests {
    use super::*;

    use crate::front::proxy::tests as proxy_tests;
    use crate::protocol::wire::{encode_frame, write_frame, FrameReader};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// What every session test runs with: secret `s`, 2 workers, and a
    /// scheduler no worker serves (jobs stay queued).
    pub(in crate::front) fn test_config() -> Config {
        Config {
            secret: "s".into(),
            workers: 2,
            ..Config::default()
        }
    }

    pub(in crate::front) fn context() -> SessionContext {
        context_from(&test_config())
    }

    pub(in crate::front) fn context_from(cfg: &Config) -> SessionContext {
        SessionContext::new(
            cfg,
            "1.7.8".into(),
            Arc::new(Scheduler::default()),
            Arc::new(Stats::default()),
        )
    }

    pub(in crate::front) fn session(
        stream: DuplexStream,
        ctx: &SessionContext,
    ) -> Session<'_, DuplexStream> {
        let peer = "127.0.0.1:9".parse().unwrap();
        Session {
            conn: Connection::new(stream, PREAUTH_MAX_FRAME),
            peer,
            user: None,
            ctx,
            draining: ctx.drain.watch(),
            shown: metrics().connection(peer.ip(), ConnKind::PreAuth),
            place: ctx.connections.admit(peer).unwrap(),
            accepted: tokio::time::Instant::now(),
        }
    }

    /// One job's two frames: a new package, then `args`.
    pub(in crate::front) fn job_frames(args: &[u8]) -> Vec<u8> {
        let mut frames = encode_frame(b"Npackage");
        frames.extend(encode_frame(args));
        frames
    }

    /// Plays the client's side of the handshake with secret `s`.
    pub(in crate::front) async fn log_in(client: &mut FrameReader<DuplexStream>, kind: &[u8]) {
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

    /// What a STAT connection is told first, with `cfg`.
    async fn stat_ncpus(cfg: &Config) -> Bytes {
        let ctx = context_from(cfg);
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"STAT").await;
            let ncpus = client.read_frame().await.unwrap().unwrap();
            client.get_mut().shutdown().await.unwrap();
            ncpus
        };
        tokio::join!(served, client_side).1
    }

    #[tokio::test]
    async fn stat_tells_the_workers_or_the_advertised_count() {
        assert_eq!(stat_ncpus(&test_config()).await, &b"2"[..]);
        let cfg = Config {
            advertise_ncpus: Some(6),
            ..test_config()
        };
        assert_eq!(stat_ncpus(&cfg).await, &b"6"[..]);
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

    // --- a proxy's connection (--proxy-protocol) ---

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    /// The shared state of a server with `--proxy-protocol 127.0.0.1`,
    /// `--allow` as given, secret `s`.
    fn behind_proxy(allow: &str) -> SessionContext {
        let mut cfg = test_config();
        cfg.proxy_protocol.extend_from("127.0.0.1").unwrap();
        if !allow.is_empty() {
            cfg.allow.extend_from(allow).unwrap();
        }
        context_from(&cfg)
    }

    /// Serves one connection from `peer` whose client side sends `first`,
    /// then answers the nonce with `secret` if the server sends one;
    /// returns the server's frames (empty: closed without a byte).
    async fn serve_from(
        ctx: &SessionContext,
        peer: &str,
        first: &[u8],
        secret: &[u8],
    ) -> Vec<Bytes> {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = serve_stream(server, addr(peer), ctx);
        // Owns the client end: closed once the answer is in.
        let client_side = async move {
            client.get_mut().write_all(first).await.unwrap();
            let mut frames = Vec::new();
            while let Ok(Some(frame)) = client.read_frame().await {
                let ok = frame == b"OK"[..];
                frames.push(frame);
                if ok {
                    break;
                }
                if frames.len() == 2 {
                    let answer = auth::expected_answer(&frames[1], secret);
                    write_frame(client.get_mut(), &answer).await.unwrap();
                }
            }
            frames
        };
        tokio::join!(served, client_side).1
    }

    #[tokio::test]
    async fn the_client_in_the_header_is_the_peer() {
        let ctx = behind_proxy("192.0.2.0/24");
        let header = b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 60000\r\n";
        let frames = serve_from(&ctx, "127.0.0.1:9", header, b"wrong").await;
        assert_eq!(frames.len(), 3, "version, nonce, FAILED: {frames:?}");
        assert_eq!(frames[2], &b"FAILED"[..]);
        // The failure is the client's, not the proxy's.
        let now = std::time::Instant::now();
        assert_eq!(ctx.logins.failed(ip("192.0.2.7"), now).failures, 2);
        assert_eq!(ctx.logins.failed(ip("127.0.0.1"), now).failures, 1);

        let two = proxy_tests::v2(
            1,
            0x11,
            &proxy_tests::v2_inet([192, 0, 2, 8], [127, 0, 0, 1], 1, 2),
        );
        let frames = serve_from(&ctx, "127.0.0.1:9", &two, b"s").await;
        assert_eq!(
            frames.last().map(|f| &f[..]),
            Some(&b"OK"[..]),
            "{frames:?}"
        );
    }

    #[tokio::test]
    async fn allow_is_the_clients_and_a_health_check_the_proxys() {
        let ctx = behind_proxy("192.0.2.7");
        let outsider = b"PROXY TCP4 192.0.2.9 127.0.0.1 56324 60000\r\n";
        assert!(serve_from(&ctx, "127.0.0.1:9", outsider, b"s")
            .await
            .is_empty());
        let local = proxy_tests::v2(0, 0, &[]);
        assert!(
            serve_from(&ctx, "127.0.0.1:9", &local, b"s")
                .await
                .is_empty(),
            "the proxy itself is not in --allow"
        );
        let ctx = behind_proxy("");
        let frames = serve_from(&ctx, "127.0.0.1:9", &local, b"s").await;
        assert_eq!(
            frames.last().map(|f| &f[..]),
            Some(&b"OK"[..]),
            "{frames:?}"
        );
    }

    #[tokio::test]
    async fn only_listed_peers_are_read_for_a_header() {
        let ctx = behind_proxy("");
        // From a listed peer, the pp handshake without a header: closed
        // before a byte.
        let answer = crate::protocol::wire::encode_frame(&[b'0'; 40]);
        assert!(serve_from(&ctx, "127.0.0.1:9", &answer, b"s")
            .await
            .is_empty());
        // From another, a header is not one: it is read as the answer.
        let spoof = b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 60000\r\n";
        let frames = serve_from(&ctx, "127.0.0.2:9", spoof, b"s").await;
        assert_eq!(
            frames.len(),
            2,
            "version and nonce, then closed: {frames:?}"
        );
        let now = std::time::Instant::now();
        assert_eq!(ctx.logins.failed(ip("192.0.2.7"), now).failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_header_counts_in_the_handshake_timeout() {
        let ctx = behind_proxy("");
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let started = tokio::time::Instant::now();
        let client_side = async {
            // A header that takes most of its 3 s, then silence.
            client.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
            tokio::time::sleep(proxy::HEADER_TIMEOUT - Duration::from_millis(100)).await;
            client.write_all(b" 127.0.0.1 1 2\r\n").await.unwrap();
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        };
        let (_, sent) = tokio::join!(serve_stream(server, addr("127.0.0.1:9"), &ctx), client_side);
        assert!(!sent.is_empty(), "the version and nonce were sent");
        assert_eq!(started.elapsed(), HANDSHAKE_TIMEOUT, "from the accept");
        // Silence from the start: closed at the header's limit.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let started = tokio::time::Instant::now();
        let client_side = async {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        };
        let (_, sent) = tokio::join!(serve_stream(server, addr("127.0.0.1:9"), &ctx), client_side);
        assert!(sent.is_empty());
        assert_eq!(started.elapsed(), proxy::HEADER_TIMEOUT);
    }
}
