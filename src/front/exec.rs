//! The EXEC loop of a client connection: one job at a time, forever. The
//! client sends the function package through the `N`/`H` cache layer,
//! then the pickled args; each frame is admitted against the memory
//! budget as its header arrives; the job goes to the scheduler, and the
//! server answers with the worker's result frame, byte for byte. While a
//! job runs, the session watches the socket: a client that leaves frees
//! its worker. A job that cannot run (an unknown `H`, a frame larger than
//! the whole budget) is answered `(None, text)` and the session goes on.

use crate::config::users::User;
use crate::front::session::{Session, SessionError};
use crate::jobs::cache::{Package, PackageHash, UnknownPackage};
use crate::jobs::scheduler::Job;
use crate::jobs::shares::QueuePlace;
use crate::logging::ratelimit::warn_limited;
use crate::memory::budget::{Claim, Reservation, Use};
use crate::ops::metrics::metrics;
use crate::protocol::wire::FrameError;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    pub(super) async fn exec(&mut self) -> Result<(), SessionError> {
        log::debug!("{}: EXEC connection", self.who());
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
        let who = self.who();
        let Some(user) = self.user.clone() else {
            // Only a session that logged in gets here.
            return Ok(());
        };
        loop {
            let Some((package, place)) = self.next_job_frame("a job", Some(&user)).await? else {
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
            let Some((args, _)) = self.next_job_frame("a job's arguments", None).await? else {
                log::debug!("{who}: closed between a job's package and its arguments");
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
            metrics().received(&user.name);
            let (reply, result) = oneshot::channel();
            self.ctx.scheduler.submit(Job {
                id,
                client: peer.ip(),
                user: user.clone(),
                package,
                args,
                reply,
                attempts: 0,
                submitted: std::time::Instant::now(),
                _held: held,
                place,
                charge: None,
            });
            log::trace!("{who}: job {id} submitted");
            // However this session ends while the job waits (the client
            // leaves, an error, the server stops), a job still queued
            // leaves the queue with it, and its memory goes at once.
            let queued = QueuedJob {
                scheduler: &self.ctx.scheduler,
                user: user.index,
                client: peer.ip(),
                id,
            };
            let result = tokio::select! {
                // A result that is ready is written even if the client's
                // EOF arrived with it: the client may only have closed its
                // sending side, and the answer is owed.
                biased;
                r = result => r,
                closed = self.conn.closed() => {
                    closed?;
                    // A queued job is withdrawn (`queued` drops); a
                    // running one sees its reply dropped and has its
                    // result discarded.
                    log::debug!("{who}: client left while job {id} was pending");
                    return Ok(());
                }
            };
            queued.answered();
            match result {
                Ok(frame) => {
                    // Counted until written, never waited for: a result
                    // that waited would hold its job's worker.
                    let _held = self.ctx.budget.force(frame.len(), Use::InFlight);
                    self.conn.write_frame(&frame).await?;
                }
                // The pool dropped the job: the server is shutting down,
                // and the client will send it elsewhere or again.
                Err(_) if self.draining.has_begun() => {
                    metrics().dropped("shutdown", &user.name);
                    return Ok(());
                }
                // Dropped otherwise (its slot's supervisor failed): the
                // job is owed an answer all the same.
                Err(_) => {
                    metrics().server_answered("lost", &user.name);
                    log::error!("{who}: job {id} was lost by the worker pool; answered");
                    let text = "ppserver: the server lost this job (an internal error in \
                                its worker pool); the job may or may not have run\n";
                    self.conn
                        .write_frame(&crate::protocol::pickle::none_with_text(text))
                        .await?;
                }
            }
        }
    }

    /// Answers a job that cannot be run with `(None, reason)`, as pp
    /// clients expect of a failed job. Closing the connection instead
    /// would make the client resend the same job forever.
    async fn refuse_job(&mut self, why: Unrunnable) -> Result<(), SessionError> {
        let user = self.user.as_ref().map_or("", |u| u.name.as_str());
        metrics().received(user);
        metrics().server_answered(
            match &why {
                Unrunnable::UnknownPackage(_) => "unknown_package",
                Unrunnable::TooLarge(..) => "oversize",
            },
            user,
        );
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
            self.who(),
            text.trim_start_matches("ppserver: ").trim_end()
        ));
        self.conn
            .write_frame(&crate::protocol::pickle::none_with_text(&text))
            .await?;
        Ok(())
    }

    /// The client's next job frame, admitted against the memory budget:
    /// once its header is in, the session waits (reading nothing more from
    /// this client, and with no `-k` clock running) first, for a job's
    /// first frame (`queue_for` its user), for a place among the user's
    /// waiting jobs (`max_queued`), then until the budget has room for the
    /// whole frame within the user's share; a frame larger than the whole
    /// budget is read and thrown away. `None` when the client closed, or
    /// the server drains.
    async fn next_job_frame(
        &mut self,
        what: &'static str,
        queue_for: Option<&User>,
    ) -> Result<Option<(Incoming, Option<QueuePlace>)>, SessionError> {
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
        let place = match queue_for {
            Some(user) if self.ctx.scheduler.limits_queues() => tokio::select! {
                biased;
                () = draining.begun() => return Ok(None),
                p = self.ctx.scheduler.queue_place(user) => p,
            },
            _ => None,
        };
        let budget = self.ctx.budget.clone();
        let frame_timeout = |_| SessionError::Timeout(what);
        if len > budget.limit() {
            let read = tokio::time::timeout(self.ctx.socket_timeout, self.conn.discard_frame());
            let len = read.await.map_err(frame_timeout)??;
            return Ok(Some((Incoming::TooLarge(len), place)));
        }
        if !budget.fits(len) {
            // Spare mappings make room first (kept only in case they are
            // useful), then cached packages nobody uses.
            budget.reclaim();
            if !budget.fits(len) {
                self.ctx.packages.shed(len);
            }
        }
        let claim = self.claim();
        let memory = tokio::select! {
            biased;
            () = draining.begun() => return Ok(None),
            m = budget.reserve_for(len, Use::InFlight, claim) => m,
        };
        let read = tokio::time::timeout(self.ctx.socket_timeout, self.conn.read_frame());
        match read.await.map_err(frame_timeout)?? {
            Some(frame) => Ok(Some((Incoming::Frame(frame, memory), place))),
            // The header was there: an end of stream now cuts the frame.
            None => Err(FrameError::Truncated.into()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// Whose share of the memory budget this session's frames count in:
    /// its user's, when the budget is shared between several users.
    fn claim(&self) -> Option<Claim> {
        let user = self.user.as_ref()?;
        (self.ctx.users.all().len() > 1).then(|| Claim {
            user: user.index,
            weight: user.weight,
        })
    }
}

/// A submitted job that may still be in the scheduler's queue; dropping
/// this withdraws it from there. Only its session knows when its client
/// has left, so the session removes it rather than leaving it for a
/// worker to find abandoned.
struct QueuedJob<'a> {
    /// The queue it may be in.
    scheduler: &'a crate::jobs::scheduler::Scheduler,
    /// Its user, by index: the queues are per user...
    user: usize,
    /// ...and per client host.
    client: std::net::IpAddr,
    /// The job's number.
    id: u64,
}

impl QueuedJob<'_> {
    /// The job was answered, so it is in no queue: no need to look.
    fn answered(self) {
        // Holds only references: forgetting it leaks nothing.
        std::mem::forget(self);
    }
}

impl Drop for QueuedJob<'_> {
    fn drop(&mut self) {
        self.scheduler.withdraw(self.user, self.client, self.id);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::front::session::tests::{
        context, context_from, job_frames, log_in, session, test_config,
    };
    use crate::front::session::SessionContext;
    use crate::jobs::cache::WorkerCache;
    use crate::protocol::wire::{encode_frame, FrameReader};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    async fn a_job_the_pool_loses_is_answered_unless_the_server_drains() {
        // Regression: a job dropped by a failing supervisor was taken for
        // the server's shutdown, and its client got no answer.
        let ctx = context();
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            client
                .get_mut()
                .write_all(&job_frames(b"args"))
                .await
                .unwrap();
            while ctx.scheduler.queued() == 0 {
                tokio::task::yield_now().await;
            }
            let (job, _) = ctx.scheduler.next_job(0, WorkerCache::default()).unwrap();
            drop(job);
            let answer = client.read_frame().await.unwrap().unwrap();
            client.get_mut().shutdown().await.unwrap();
            answer
        };
        let (ended, answer) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(text.contains("the server lost this job"), "{text}");
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
        // Regression: the job stayed queued, holding its arguments and
        // memory, until a worker reached it.
        assert_eq!(ctx.scheduler.queued(), 0, "withdrawn when its client left");
        assert_eq!(
            ctx.budget.used(),
            b"Npackage".len(),
            "its arguments' memory went with it; only the cached package is held"
        );
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
    async fn bytes_sent_while_waiting_are_thrown_away_after_the_answer_is_written() {
        let ctx = context();
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            // A job, and the next one before the first is answered.
            let mut jobs = job_frames(b"args");
            jobs.extend(job_frames(b"more"));
            client.get_mut().write_all(&jobs).await.unwrap();
            while ctx.scheduler.queued() == 0 {
                tokio::task::yield_now().await;
            }
            let (job, _) = ctx.scheduler.next_job(0, WorkerCache::default()).unwrap();
            job.reply.send(Bytes::from_static(b"result")).unwrap();
            let mut rest = Vec::new();
            client.get_mut().read_to_end(&mut rest).await.unwrap();
            rest
        };
        let (ended, rest) = tokio::join!(served, client_side);
        assert_eq!(rest, encode_frame(b"result"), "answered, then closed");
        assert!(
            matches!(
                ended,
                Err(SessionError::Frame(FrameError::Unsolicited {
                    received: 28
                }))
            ),
            "{ended:?}"
        );
        assert_eq!(ctx.scheduler.queued(), 0, "the second job was not run");
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

    #[tokio::test]
    async fn a_mapping_kept_for_reuse_is_in_the_budget() {
        let ctx = context();
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let len = 2 * crate::memory::mapped::MAPPED_MIN;
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            let job = job_frames(&vec![5u8; len]);
            client.get_mut().write_all(&job).await.unwrap();
            while ctx.scheduler.queued() == 0 {
                tokio::task::yield_now().await;
            }
            let (job, _) = ctx.scheduler.next_job(0, WorkerCache::default()).unwrap();
            assert!(crate::memory::mapped::is_mapped(&job.args));
            let Job {
                reply, args, _held, ..
            } = job;
            reply.send(Bytes::from_static(b"result")).unwrap();
            assert_eq!(client.read_frame().await.unwrap().unwrap(), &b"result"[..]);
            // The job goes, its arguments' mapping is kept for the next
            // large frame: still memory held for clients.
            drop((args, _held));
            let used = ctx.budget.used();
            assert!(used >= len, "{used} bytes counted");
            client.get_mut().shutdown().await.unwrap();
        };
        let (ended, ()) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
    }

    #[tokio::test]
    async fn a_done_jobs_mapping_is_kept_in_the_room_its_job_leaves() {
        // Room for the frame once, not twice: the job's reservation goes
        // before its arguments, whose mapping then takes its place.
        let len = 3 * crate::memory::mapped::MAPPED_MIN;
        let ctx = small_budget_context(len + len / 2);
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            let job = job_frames(&vec![5u8; len]);
            client.get_mut().write_all(&job).await.unwrap();
            while ctx.scheduler.queued() == 0 {
                tokio::task::yield_now().await;
            }
            let (job, _) = ctx.scheduler.next_job(0, WorkerCache::default()).unwrap();
            let package = ctx.budget.used() - len;
            drop(job);
            assert_eq!(ctx.spares.held(), len, "kept for the next frame");
            assert_eq!(ctx.budget.used(), package + len);
            client.get_mut().shutdown().await.unwrap();
        };
        let (ended, ()) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
    }

    #[tokio::test]
    async fn a_dropped_packages_mapping_is_kept_in_the_room_it_leaves() {
        let len = 3 * crate::memory::mapped::MAPPED_MIN;
        let ctx = small_budget_context(len + len / 2);
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut client = FrameReader::new(client, 1 << 20);
        let served = async { session(server, &ctx).run().await };
        let client_side = async {
            log_in(&mut client, b"EXEC").await;
            let mut package = vec![b'N'];
            package.resize(len, b'p');
            let mut job = encode_frame(&package);
            job.extend(encode_frame(b"args"));
            client.get_mut().write_all(&job).await.unwrap();
            while ctx.scheduler.queued() == 0 {
                tokio::task::yield_now().await;
            }
            drop(ctx.scheduler.next_job(0, WorkerCache::default()).unwrap());
            client.get_mut().shutdown().await.unwrap();
        };
        let (ended, ()) = tokio::join!(served, client_side);
        assert!(ended.is_ok(), "{ended:?}");
        // The connection closed: its large package left the cache.
        assert_eq!(ctx.packages.usage().0, 0);
        assert_eq!(ctx.spares.held(), len, "kept for the next frame");
        assert_eq!(ctx.budget.used(), len);
    }
}
