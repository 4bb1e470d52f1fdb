//! Supervision of the worker pool: one task per slot keeps a live worker
//! in it, feeds it jobs from the scheduler, and decides what happens when
//! a worker fails. The worker process itself is [`crate::workers::worker`].
//!
//! A worker that dies is noticed at once (its process exits, or its stdout
//! ends, also while idle), reaped, and replaced. The job it was running is
//! answered with `(None, "...worker died...")` and not retried, since it
//! may crash again; a job handed to a worker that was already dead is put
//! back in the queue, a few times at most. A worker that cannot start is
//! retried with growing pauses; if none is running after a few tries,
//! queued jobs are answered with an error instead of waiting forever.
//!
//! A worker is also replaced between jobs after `-r` (every job) or
//! `--max-jobs-per-worker`, and at once when the only client waiting for
//! its running job has left (unless `--keep-abandoned`): the slot then
//! serves the next client instead of a result nobody reads.
//!
//! With `--isolate user`, a slot's workers serve one user each: the slot
//! keeps the user its worker served ([`Seat`]) across replacements (`-r`,
//! `--max-jobs-per-worker`, a death: the next worker is started for the
//! same user), and when the scheduler hands its idle worker a job of
//! another user, the slot replaces the worker with a fresh one started for
//! that user, which runs the job (counted as a `user_switch` restart). A
//! fresh worker of the pool's start serves nobody until its first job,
//! and is replaced too if that job's user has a uid of its own.
//!
//! With `--job-timeout` (or the user's `job_timeout`, which overrides it),
//! a job that runs longer has its worker (and the
//! worker's process group) stopped and replaced, and its client gets
//! `(None, "job exceeded --job-timeout of N s on HOST")`; the job is not
//! retried. With `--worker-memory-limit`, a worker that goes over it while
//! running a job is dealt with the same way ([`crate::workers::memlimit`]
//! watches it), and its client gets `(None, "job exceeded
//! --worker-memory-limit of SIZE on HOST")`; so is one that left its
//! memory cgroup or had its limit changed, with a text that says so. One
//! found so between two jobs is replaced before the next.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::config::users::{Credentials, User};
use crate::jobs::cache::WorkerCache;
use crate::jobs::scheduler::{Job, Scheduler, Seat};
use crate::ops::metrics::metrics;
use crate::ops::stats::Stats;
use crate::workers::forkserver::ForkServer;
use crate::workers::memlimit::{self, Breach, MemoryLimit, Watch};
use crate::workers::worker::{Outcome, Worker, WorkerSpec};

/// First and largest pause between attempts to start a worker that fails.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Failed starts in a row after which queued jobs are answered with an
/// error if no worker at all is running (instead of waiting forever).
const FAILED_STARTS_BEFORE_GIVING_UP: u32 = 3;
/// How often a job whose worker was found dead before it started is retried
/// on a fresh worker before the client is told.
const MAX_START_ATTEMPTS: u8 = 3;
/// How long a running job whose client left may still finish before its
/// worker is stopped: a fresh worker costs a Python start-up, more than a
/// job about to end.
const ABANDON_GRACE: Duration = Duration::from_secs(1);

/// Everything a slot's supervisor shares with the rest of the server.
#[derive(Debug, Clone)]
pub(crate) struct PoolContext {
    /// How to start workers.
    pub(crate) spec: Arc<WorkerSpec>,
    /// Where workers are forked from; `None`: they are spawned.
    pub(crate) forkserver: Option<Arc<ForkServer>>,
    /// Where jobs come from.
    pub(crate) scheduler: Arc<Scheduler>,
    /// Where job times go.
    pub(crate) stats: Arc<Stats>,
    /// Becomes true when the server stops.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// `--worker-memory-limit`, if set.
    pub(crate) memory_limit: Option<Arc<MemoryLimit>>,
    /// The uid a worker started for nobody runs as: the one every user
    /// shares, if they do ([`crate::workers::access::check`]); `None`: the
    /// server's own. A worker started for a user runs as that user's.
    pub(crate) run_as: Option<Arc<Credentials>>,
}

/// The worker slots' supervisors, and the signal that stops them.
#[derive(Debug)]
pub(crate) struct Pool {
    /// One task per slot.
    supervisors: JoinSet<()>,
    /// Tells the supervisors to stop.
    stop: watch::Sender<bool>,
    /// Closed at stop, so no job waits for a worker that will not come.
    scheduler: Arc<Scheduler>,
}

impl Pool {
    /// Startup step: a supervisor for each of `slots` slots, each starting
    /// its worker at once.
    pub(crate) fn start(
        slots: usize,
        spec: Arc<WorkerSpec>,
        forkserver: Option<Arc<ForkServer>>,
        scheduler: Arc<Scheduler>,
        stats: Arc<Stats>,
        memory_limit: Option<Arc<MemoryLimit>>,
        run_as: Option<Arc<Credentials>>,
    ) -> Pool {
        let (stop, shutdown) = watch::channel(false);
        let mut supervisors = JoinSet::new();
        for slot in 0..slots {
            let ctx = PoolContext {
                spec: spec.clone(),
                forkserver: forkserver.clone(),
                scheduler: scheduler.clone(),
                stats: stats.clone(),
                shutdown: shutdown.clone(),
                memory_limit: memory_limit.clone(),
                run_as: run_as.clone(),
            };
            supervisors.spawn(keep_supervised(slot, ctx));
        }
        Pool {
            supervisors,
            stop,
            scheduler,
        }
    }

    /// Stops every worker and waits, at most `timeout`, for each slot's
    /// supervisor to have stopped and reaped it.
    pub(crate) async fn stop(&mut self, timeout: Duration) {
        let _ = self.stop.send(true);
        self.scheduler.close();
        let all_stopped = async { while self.supervisors.join_next().await.is_some() {} };
        if tokio::time::timeout(timeout, all_stopped).await.is_err() {
            log::error!("workers did not stop within {timeout:?}");
        }
    }
}

/// [`supervise`]s pool slot `slot` until shutdown, starting its supervisor
/// again if it panics: a bug there must cost one job's answer (its client
/// gets one from its session), not a worker slot for the rest of the
/// server's life.
pub(crate) async fn keep_supervised(slot: usize, ctx: PoolContext) {
    restart_on_panic(slot, || supervise(slot, ctx.clone())).await;
}

/// Runs the futures `start` makes, one after another, until one ends
/// without panicking. A panic is logged and counted; the next start waits
/// [`BACKOFF_START`], so a supervisor that panics at once every time
/// cannot spin.
async fn restart_on_panic<F, Fut>(slot: usize, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        match CatchPanic(Box::pin(start())).await {
            Ok(()) => return,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_string());
                log::error!(
                    "slot {slot}: the worker supervisor failed ({what}); its worker is stopped \
                     and the slot starts again"
                );
                metrics().worker_restart("supervisor_panic");
                tokio::time::sleep(BACKOFF_START).await;
            }
        }
    }
}

/// A future that turns a panic while it is polled into an `Err` with the
/// panic's payload, without a task of its own, so that cancelling the
/// caller (the server's stop) still cancels it.
struct CatchPanic<Fut>(Pin<Box<Fut>>);

impl<Fut: Future<Output = ()>> Future for CatchPanic<Fut> {
    type Output = Result<(), Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        // After a panic the future is only dropped, never polled again, so
        // no state it left half-changed is used.
        match std::panic::catch_unwind(AssertUnwindSafe(move || inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Keeps pool slot `slot` filled with a live worker and feeds it jobs until
/// shutdown, then stops the worker and reaps it.
async fn supervise(slot: usize, mut ctx: PoolContext) {
    let mut backoff = BACKOFF_START;
    // Failed starts in a row.
    let mut failures = 0;
    // When the slot's last worker ended (or its first was asked for): a
    // replacement's time is counted from there.
    let mut vacant = Instant::now();
    // The user the slot serves (with --isolate user), and a job of the
    // user it was handed to, which the next worker runs first.
    let mut seat = Seat::default();
    let mut first: Option<Job> = None;
    loop {
        let spawned = tokio::select! {
            w = start_worker(
                &ctx.spec,
                ctx.forkserver.as_deref(),
                seat.owner.as_ref(),
                ctx.run_as.as_deref(),
            ) => w,
            _ = ctx.shutdown.wait_for(|&s| s) => {
                // Like every job in flight at the stop: its session closes.
                drop(first.take());
                return;
            }
        };
        let mut worker = match spawned {
            Ok(w) => {
                backoff = BACKOFF_START;
                failures = 0;
                let took = vacant.elapsed();
                metrics().worker_start_seconds.observe(took.as_secs_f64());
                log::debug!(
                    "slot {slot}: worker pid {} ready by {} in {:.3} ms",
                    w.pid,
                    w.started.name(),
                    took.as_secs_f64() * 1e3
                );
                w
            }
            Err(e) => {
                log::error!(
                    "slot {slot}: cannot start worker {} -u -m {}: {e}; retrying in {backoff:?}",
                    ctx.spec.python.display(),
                    ctx.spec.module
                );
                // The job it was to run goes to another worker meanwhile.
                if let Some(job) = first.take() {
                    ctx.scheduler.requeue_front(job);
                }
                failures += 1;
                if failures >= FAILED_STARTS_BEFORE_GIVING_UP {
                    let text = format!(
                        "ppserver: no worker process could be started ({} -u -m {}: {e}); \
                         the job was not run\n",
                        ctx.spec.python.display(),
                        ctx.spec.module
                    );
                    let answered = ctx
                        .scheduler
                        .fail_queued_if_no_workers(&crate::protocol::pickle::none_with_text(&text));
                    if answered > 0 {
                        log::error!(
                            "{answered} queued jobs answered with an error: no worker is running"
                        );
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = ctx.shutdown.wait_for(|&s| s) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let mut memory = memlimit::watch(ctx.memory_limit.as_deref(), slot, worker.pid).await;
        let ended = serve(
            slot,
            &mut worker,
            &mut ctx,
            &mut memory,
            &mut seat,
            first.take(),
        )
        .await;
        vacant = Instant::now();
        match ended {
            Ended::Shutdown => {
                worker.stop(false).await;
                return;
            }
            Ended::Replace { cause } => {
                metrics().worker_restart(cause);
                // A worker that said it is exiting gets a moment to do so,
                // for its own exit status. One replaced after its answer
                // (-r, --max-jobs-per-worker) is stopped at once, as at the
                // server's stop: its interpreter's shutdown (ppft's worker
                // formats a traceback for its closed stdin first) would cost
                // more CPU than the fork of its replacement. Either way the
                // replacement need not wait for it.
                let graceful = cause == "worker_exiting";
                tokio::spawn(async move {
                    let pid = worker.pid;
                    let how = worker.stop(graceful).await;
                    log::debug!("slot {slot}: worker pid {pid} replaced ({how})");
                });
            }
            Ended::Switch { job } => {
                metrics().worker_restart("user_switch");
                log::debug!(
                    "slot {slot}: worker pid {} served {}; replaced by a fresh one for {}'s job {}",
                    worker.pid,
                    seat.owner.as_ref().map_or("nobody", |u| u.name.as_str()),
                    job.user.name,
                    job.id
                );
                seat = ctx.scheduler.turn_for(job.user.clone());
                first = Some(job);
                // Stopped at once, as for -r: its replacement need not wait.
                tokio::spawn(async move {
                    let pid = worker.pid;
                    let how = worker.stop(false).await;
                    log::debug!("slot {slot}: worker pid {pid} replaced ({how})");
                });
            }
            Ended::Abandoned { job } => {
                metrics().worker_restart("abandoned");
                metrics().dropped("abandoned", &job.user.name);
                let pid = worker.pid;
                let how = worker.stop(false).await;
                log::debug!(
                    "job {} from {}: its client left while worker pid {pid} ran it; worker \
                     stopped ({how}) and replaced (--keep-abandoned lets such jobs finish)",
                    job.id,
                    job.origin()
                );
            }
            Ended::TimedOut { job, limit } => {
                metrics().worker_restart("job_timeout");
                let pid = worker.pid;
                let how = worker.stop(false).await;
                answer_timed_out(job, limit, pid, &how, &ctx.spec.host);
            }
            Ended::MemoryLimit { job, breach } => {
                metrics().worker_restart(breach.cause());
                let pid = worker.pid;
                let how = worker.stop(false).await;
                memory.answer(job, &breach, pid, &how, &ctx.spec.host);
            }
            Ended::Died { job, refused } => {
                let pid = worker.pid;
                let how = match refused {
                    // The worker is alive but out of step: stop it now.
                    Some(reason) => {
                        worker.stop(false).await;
                        format!("its answer was refused: {reason}")
                    }
                    None => worker.stop(true).await,
                };
                // Killed by its memory cgroup: the limit's answer, not a crash's.
                let by_limit = job.is_some() && memory.killed_by_limit();
                metrics().worker_restart(if by_limit { "memory_limit" } else { "died" });
                match job {
                    Some(job) if by_limit => {
                        memory.answer(job, &Breach::Over, pid, &how, &ctx.spec.host)
                    }
                    Some(job) => answer_died(job, pid, &how),
                    None => log::warn!(
                        "slot {slot}: idle worker pid {pid} died ({how}); starting a new one"
                    ),
                }
            }
            Ended::NotStarted { job } => {
                metrics().worker_restart("died");
                let pid = worker.pid;
                let how = worker.stop(true).await;
                log::warn!(
                    "slot {slot}: worker pid {pid} was gone ({how}) before job {} started",
                    job.id
                );
                if let Some(job) = retry_or_answer(job, pid, &how) {
                    ctx.scheduler.requeue_front(job);
                }
            }
        }
    }
}

/// Why [`serve`] stopped using a worker.
enum Ended {
    /// The server is stopping.
    Shutdown,
    /// `-r`, `--max-jobs-per-worker`, or the worker said it is exiting:
    /// replace it.
    Replace {
        /// Why, as counted in the metrics.
        cause: &'static str,
    },
    /// The worker was handed `job` of another user than the one it
    /// serves (`--isolate user`): replace it with a fresh worker for that
    /// user, which runs the job.
    Switch {
        /// Not started yet; charged to its user meanwhile.
        job: Job,
    },
    /// The client of the running `job` left: stop the worker now.
    Abandoned {
        /// Nobody waits for its answer.
        job: Job,
    },
    /// `job` ran for `limit` (`--job-timeout`): stop the worker now.
    TimedOut {
        /// Still to be answered, once its worker is gone.
        job: Job,
        /// The limit it reached.
        limit: Duration,
    },
    /// `job`'s worker went over `--worker-memory-limit`, or got out of
    /// its memory cgroup: stop it now.
    MemoryLimit {
        /// Still to be answered, once its worker is gone.
        job: Job,
        /// How.
        breach: Breach,
    },
    /// The worker died, while running `job` if there is one.
    Died {
        /// The job it was running, still to be answered.
        job: Option<Job>,
        /// Why its answer was refused, if it was alive but out of step.
        refused: Option<String>,
    },
    /// The worker was dead before it could start `job`.
    NotStarted {
        /// Goes back to the queue, or is answered if it was tried too often.
        job: Job,
    },
}

/// Starts the slot's worker, for `user`: the one the slot serves under
/// `--isolate user`, `None` for a fresh worker that serves whoever comes
/// first, which runs as `run_as` (the uid every user shares, if any:
/// [`serve`] has it replaced for a job of a user with another). The one
/// place a worker is started for a user, where the user's uid and groups
/// go.
async fn start_worker(
    spec: &WorkerSpec,
    forkserver: Option<&ForkServer>,
    user: Option<&Arc<User>>,
    run_as: Option<&Credentials>,
) -> std::io::Result<Worker> {
    let credentials = match user {
        Some(u) => u.credentials.as_ref(),
        None => run_as,
    };
    Worker::start(spec, forkserver, credentials).await
}

/// Feeds jobs to one live worker until it must be replaced: `first` (a
/// job it was started for), then what the scheduler gives the slot
/// serving `seat`'s user.
async fn serve(
    slot: usize,
    worker: &mut Worker,
    ctx: &mut PoolContext,
    memory: &mut Watch,
    seat: &mut Seat,
    mut first: Option<Job>,
) -> Ended {
    // The worker counts as live for exactly as long as it is served.
    let _live = ctx.scheduler.worker_up();
    let mut cache = WorkerCache::default();
    // Jobs this worker answered, for --max-jobs-per-worker.
    let mut answered: u64 = 0;
    loop {
        let next = match first.take() {
            Some(mut job) => {
                // Its user is charged from here: the wait for this fresh
                // worker was the switch's, not the job's.
                if let Some(charge) = &mut job.charge {
                    charge.restart();
                }
                Ok((job, cache))
            }
            None => ctx.scheduler.next_job_for(slot, cache, seat),
        };
        let (mut job, back) = match next {
            Ok(got) => got,
            Err(mut waiting) => {
                // Kept for its user this long while others' jobs wait.
                let mut kept = waiting.kept_for();
                let mut releases = waiting.releases();
                loop {
                    tokio::select! {
                        got = waiting.job() => match got {
                            Some(got) => break got,
                            None => return Ended::Shutdown,
                        },
                        () = until(kept) => kept = ctx.scheduler.turn_over(slot),
                        () = released(&ctx.scheduler, releases) => {
                            releases = Some(ctx.scheduler.releases());
                            kept = ctx.scheduler.turn_over(slot);
                        }
                        wrote = worker.watch_idle() => {
                            // An idle worker has nothing to say: it died, or
                            // broke the protocol; either way it is replaced.
                            if wrote {
                                log::warn!("slot {slot}: worker pid {} wrote while idle; replacing it", worker.pid);
                            }
                            if let Some(job) = waiting.withdraw() {
                                ctx.scheduler.requeue_front(job);
                            }
                            return Ended::Died { job: None, refused: None };
                        }
                        _ = ctx.shutdown.wait_for(|&s| s) => {
                            // A job handed over at this very moment is dropped;
                            // its session closes, as for every in-flight job.
                            drop(waiting.withdraw());
                            return Ended::Shutdown;
                        }
                    }
                }
            }
        };
        cache = back;
        if job.is_abandoned() {
            // Handed straight to this worker, and its client left since.
            metrics().dropped("abandoned", &job.user.name);
            log::debug!(
                "job {} dropped: its client went away before it started",
                job.id
            );
            continue;
        }
        if ctx.scheduler.isolates() {
            match &seat.owner {
                // Another user's: only a fresh worker may run it.
                Some(owner) if owner.index != job.user.index => return Ended::Switch { job },
                Some(_) => {}
                // A worker started for nobody runs as the uid all users
                // share, or the server's: a user with another needs one
                // started for it.
                None if job.user.credentials.as_ref() != ctx.run_as.as_deref() => {
                    return Ended::Switch { job }
                }
                None => *seat = ctx.scheduler.turn_for(job.user.clone()),
            }
        }
        let started = Instant::now();
        let _running = ctx.stats.running();
        metrics().waited(&job.user.name, job.submitted.elapsed().as_secs_f64());
        let _shown = metrics().job_started(job.id, worker.pid, job.user.shown());
        // The user's own job_timeout, else --job-timeout.
        let job_timeout = job.user.job_timeout.or(ctx.spec.job_timeout);
        let Job {
            package,
            args,
            reply,
            ..
        } = &mut job;
        let outcome = tokio::select! {
            // A result that is in wins over a limit or an abandonment that
            // comes at the same moment: the job is done, and its answer owed.
            biased;
            o = worker.run(&mut cache, package, args) => o,
            () = abandoned(reply), if !ctx.spec.keep_abandoned => {
                return Ended::Abandoned { job };
            }
            limit = time_limit(job_timeout) => {
                ctx.stats.record_job(started.elapsed());
                return Ended::TimedOut { job, limit };
            }
            breach = memory.breached() => {
                ctx.stats.record_job(started.elapsed());
                return Ended::MemoryLimit { job, breach };
            }
            _ = ctx.shutdown.wait_for(|&s| s) => return Ended::Shutdown,
        };
        match outcome {
            Outcome::Answered(result) => {
                ctx.stats.record_job(started.elapsed());
                metrics().answered(&job.user.name, started.elapsed().as_secs_f64());
                if job.reply.send(result).is_err() {
                    log::debug!("job {}: client gone, result discarded", job.id);
                }
                answered += 1;
                if ctx.spec.max_jobs > 0 && answered >= ctx.spec.max_jobs {
                    log::debug!(
                        "slot {slot}: worker pid {} ran {answered} jobs (--max-jobs-per-worker)",
                        worker.pid
                    );
                    return Ended::Replace { cause: "max_jobs" };
                }
                if worker.exiting {
                    return Ended::Replace {
                        cause: "worker_exiting",
                    };
                }
                if ctx.spec.restart {
                    return Ended::Replace {
                        cause: "restart_flag",
                    };
                }
                if let Some(breach) = memory.escaped().await {
                    log::warn!(
                        "slot {slot}: after job {} from {}, {}; worker pid {} is replaced",
                        job.id,
                        job.client,
                        memory.what(&breach),
                        worker.pid
                    );
                    return Ended::Replace {
                        cause: breach.cause(),
                    };
                }
            }
            Outcome::Died { refused } => {
                ctx.stats.record_job(started.elapsed());
                return Ended::Died {
                    job: Some(job),
                    refused,
                };
            }
            Outcome::NotStarted => return Ended::NotStarted { job },
        }
    }
}

/// Completes after `wait`; never without one.
async fn until(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Completes once a job of a user at its `max_workers` has ended since
/// the count of such releases was `seen`; never without `max_workers`.
async fn released(scheduler: &Scheduler, seen: Option<u64>) {
    match seen {
        Some(seen) => scheduler.released_since(seen).await,
        None => std::future::pending().await,
    }
}

/// Completes [`ABANDON_GRACE`] after the job's client has gone (its
/// session dropped the receiving end of `reply`).
async fn abandoned(reply: &mut oneshot::Sender<Bytes>) {
    reply.closed().await;
    tokio::time::sleep(ABANDON_GRACE).await;
}

/// Completes once a job has run for `limit` (`--job-timeout`), and
/// returns it; never without a limit.
async fn time_limit(limit: Option<Duration>) -> Duration {
    match limit {
        Some(limit) => {
            tokio::time::sleep(limit).await;
            limit
        }
        None => std::future::pending().await,
    }
}

/// Tells the client its job ran past `--job-timeout`, once the worker
/// that ran it is gone (so nothing of the job runs on when the answer
/// arrives).
fn answer_timed_out(job: Job, limit: Duration, pid: u32, how: &str, host: &str) {
    let secs = limit.as_secs();
    log::warn!(
        "job {} from {}: still running after --job-timeout of {secs} s; its worker pid {pid} \
         was stopped ({how}) and is replaced",
        job.id,
        job.origin()
    );
    metrics().server_answered("job_timeout", &job.user.name);
    job.fail(&timeout_text(secs, host));
}

/// The output a pp client shows for a job stopped by `--job-timeout`.
fn timeout_text(secs: u64, host: &str) -> String {
    format!("job exceeded --job-timeout of {secs} s on {host}\n")
}

/// Tells the client its job's worker died.
fn answer_died(job: Job, pid: u32, how: &str) {
    log::warn!(
        "job {} from {}: worker pid {pid} died while running it ({how}); the job is not \
         retried",
        job.id,
        job.origin()
    );
    let text = format!(
        "ppserver: the worker process (pid {pid}) running this job died ({how}); \
         the job was not retried\n"
    );
    metrics().server_answered("worker_died", &job.user.name);
    job.fail(&text);
}

/// A job that never reached a live worker goes back to the queue, unless
/// that has happened too often (workers that die at once, every time).
fn retry_or_answer(mut job: Job, pid: u32, how: &str) -> Option<Job> {
    job.attempts += 1;
    if job.attempts < MAX_START_ATTEMPTS {
        return Some(job);
    }
    let text = format!(
        "ppserver: the job could not be started: {} workers in a row died before \
         receiving it (last: pid {pid}, {how})\n",
        MAX_START_ATTEMPTS
    );
    metrics().server_answered("not_started", &job.user.name);
    job.fail(&text);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::cache::PackageCache;
    use crate::jobs::scheduler::test_job;

    #[tokio::test(start_paused = true)]
    async fn a_supervisor_that_panics_is_started_again() {
        // Regression: a panicking supervisor silently lost its slot until
        // the server stopped.
        let mut starts = 0;
        restart_on_panic(3, || {
            starts += 1;
            let first = starts == 1;
            async move {
                tokio::task::yield_now().await;
                if first {
                    panic!("a bug");
                }
            }
        })
        .await;
        assert_eq!(
            starts, 2,
            "started again after the panic, and only then done"
        );
    }

    #[tokio::test]
    async fn a_job_past_its_time_limit_is_answered_with_the_limit_and_host() {
        let c = PackageCache::new(1 << 20);
        let (job, rx) = test_job(&c, b"Na", "127.0.0.1");
        answer_timed_out(
            job,
            Duration::from_secs(2),
            42,
            "killed by signal 9",
            "node7",
        );
        assert_eq!(
            rx.await.unwrap(),
            crate::protocol::pickle::none_with_text("job exceeded --job-timeout of 2 s on node7\n")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_limit_completes_after_the_limit_and_never_without_one() {
        let limit = Duration::from_secs(36000);
        let begun = tokio::time::Instant::now();
        assert_eq!(time_limit(Some(limit)).await, limit);
        assert_eq!(begun.elapsed(), limit);
        let none = tokio::time::timeout(Duration::from_secs(1 << 30), time_limit(None));
        assert!(none.await.is_err(), "no limit: never");
    }

    #[tokio::test]
    async fn a_job_that_never_starts_is_retried_then_answered() {
        let c = PackageCache::new(1 << 20);
        let (mut job, mut rx) = test_job(&c, b"Na", "127.0.0.1");
        for _ in 1..MAX_START_ATTEMPTS {
            job = retry_or_answer(job, 42, "exit code 1").expect("retried");
        }
        assert!(rx.try_recv().is_err(), "not answered while retried");
        assert!(retry_or_answer(job, 42, "exit code 1").is_none());
        let text = String::from_utf8_lossy(&rx.await.unwrap()).into_owned();
        assert!(text.contains("3 workers in a row died"), "{text}");
        assert!(text.contains("pid 42, exit code 1"), "{text}");
    }
}
