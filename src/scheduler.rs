//! Hands jobs from every client connection to the worker pool.
//!
//! First come, first served: a job goes to an idle worker at once if there
//! is one (preferring a worker that already holds the job's package, so it
//! is sent the 33-byte `H` frame and skips unpickling the sources again),
//! otherwise it waits in one queue shared by all connections and is taken
//! by the next worker that becomes free. A job never waits while a worker
//! is idle.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::budget::Reservation;
use crate::cache::{Package, WorkerCache};

/// One job: a function package, its pickled arguments, and where its result
/// goes.
#[derive(Debug)]
pub(crate) struct Job {
    /// Number for log lines.
    pub id: u64,
    /// The function package (shared with the connection's cache).
    pub package: Arc<Package>,
    /// The pickled argument tuple, relayed as received.
    pub args: Bytes,
    /// The session waiting for the result frame. Closed when the client
    /// went away, which lets queued jobs of vanished clients be dropped.
    pub reply: oneshot::Sender<Bytes>,
    /// How many workers were found dead before they could start this job.
    pub attempts: u8,
    /// When the session submitted it, for the queue-wait metric.
    pub submitted: std::time::Instant,
    /// The arguments' bytes in the memory budget, given back when the job
    /// is done (answered, or dropped because its client left).
    pub _held: Reservation,
}

impl Job {
    /// Whether anyone still waits for this job's result.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    /// Answers the job with `(None, text)`, which a pp client shows as a
    /// failed job with `text` as its output. A client that went away needs
    /// no answer, so a closed reply channel is not an error.
    pub(crate) fn fail(self, text: &str) {
        let _ = self.reply.send(crate::pickle::none_with_text(text));
    }
}

/// A worker waiting for a job. It lends its cache to the scheduler so the
/// scheduler can pick by package, and gets it back with the job.
#[derive(Debug)]
struct IdleWorker {
    /// The worker's pool slot, for log lines.
    slot: usize,
    /// Packages the worker process holds.
    cache: WorkerCache,
    /// Where the job (and the cache) go.
    tx: oneshot::Sender<(Job, WorkerCache)>,
}

#[derive(Debug, Default)]
struct State {
    /// Jobs no worker was free for, oldest first.
    queue: VecDeque<Job>,
    /// Workers with nothing to do; most recently idle last.
    idle: Vec<IdleWorker>,
}

/// The shared job queue and the list of idle workers.
#[derive(Debug, Default)]
pub struct Scheduler {
    /// Guarded by a plain mutex: it is held for a few pointer moves, never
    /// across an await.
    state: Mutex<State>,
    /// Worker processes up and running, for telling whether queued jobs
    /// can still be run by anyone.
    live_workers: AtomicUsize,
    /// Woken when a worker comes up, for [`Scheduler::wait_for_worker`].
    worker_started: tokio::sync::Notify,
}

/// Counts a worker as live while it exists; see [`Scheduler::worker_up`].
#[derive(Debug)]
pub(crate) struct LiveWorker<'a>(&'a AtomicUsize);

impl Drop for LiveWorker<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a worker waiting for a job holds: the receiving end, plus a way to
/// get a job back if the worker has to give up before starting it.
#[derive(Debug)]
pub(crate) struct Waiting {
    rx: oneshot::Receiver<(Job, WorkerCache)>,
}

impl Waiting {
    /// Waits for a job. `None` means the scheduler dropped the entry, which
    /// only happens when the server shuts down.
    pub(crate) async fn job(&mut self) -> Option<(Job, WorkerCache)> {
        (&mut self.rx).await.ok()
    }

    /// Withdraws from the idle list (e.g. because the worker died) and
    /// returns a job that was handed over in the meantime, so it is not lost.
    pub(crate) fn withdraw(mut self) -> Option<Job> {
        self.rx.close();
        self.rx.try_recv().ok().map(|(job, _)| job)
    }
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed
        // in a way that matters (each step is a single push or pop).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits a job: to an idle worker if there is one, else to the queue.
    pub(crate) fn submit(&self, job: Job) {
        let mut st = self.lock();
        if let Some(job) = hand_to_idle(&mut st, job) {
            st.queue.push_back(job);
        }
    }

    /// Puts back a job that was taken but never started (its worker turned
    /// out to be dead): to an idle worker, else at the head of the queue, so
    /// it keeps its turn.
    pub(crate) fn requeue_front(&self, job: Job) {
        let mut st = self.lock();
        if let Some(job) = hand_to_idle(&mut st, job) {
            st.queue.push_front(job);
        }
    }

    /// A worker asks for its next job: the oldest queued job still wanted
    /// by its client, or else it goes on the idle list.
    pub(crate) fn next_job(
        &self,
        slot: usize,
        cache: WorkerCache,
    ) -> Result<(Job, WorkerCache), Waiting> {
        let mut st = self.lock();
        while let Some(job) = st.queue.pop_front() {
            if job.is_abandoned() {
                crate::metrics::metrics().dropped("abandoned");
                log::debug!(
                    "job {} dropped: its client went away before it started",
                    job.id
                );
                continue;
            }
            return Ok((job, cache));
        }
        let (tx, rx) = oneshot::channel();
        st.idle.push(IdleWorker { slot, cache, tx });
        Err(Waiting { rx })
    }

    /// Counts a started worker as live until the guard drops.
    pub(crate) fn worker_up(&self) -> LiveWorker<'_> {
        self.live_workers.fetch_add(1, Ordering::Relaxed);
        self.worker_started.notify_waiters();
        LiveWorker(&self.live_workers)
    }

    /// Worker processes up now.
    pub(crate) fn live_workers(&self) -> usize {
        self.live_workers.load(Ordering::Relaxed)
    }

    /// Completes once at least one worker is up (at once if one is).
    pub(crate) async fn wait_for_worker(&self) {
        loop {
            // Registered before the check, so a worker that comes up in
            // between still wakes us.
            let started = self.worker_started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            if self.live_workers.load(Ordering::Relaxed) > 0 {
                return;
            }
            started.await;
        }
    }

    /// Answers every queued job with `answer` if no worker is running, so
    /// clients of a server whose workers cannot start get an answer instead
    /// of waiting forever. Returns how many jobs were answered.
    pub(crate) fn fail_queued_if_no_workers(&self, answer: &Bytes) -> usize {
        let mut st = self.lock();
        if self.live_workers.load(Ordering::Relaxed) > 0 {
            return 0;
        }
        let mut answered = 0;
        for job in st.queue.drain(..) {
            if job.reply.send(answer.clone()).is_ok() {
                answered += 1;
            }
        }
        answered
    }

    /// Number of jobs waiting for a worker.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Drops every idle entry and queued job: on shutdown, waiting workers
    /// wake up with nothing and sessions see their reply channel close.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.idle.clear();
        st.queue.clear();
    }
}

/// Gives `job` to an idle worker if there is one; gives it back otherwise.
fn hand_to_idle(st: &mut State, mut job: Job) -> Option<Job> {
    // Entries of workers that withdrew (died while idle) are dropped here,
    // so the list only ever holds live workers for long.
    st.idle.retain(|w| !w.tx.is_closed());
    while let Some(pos) = pick(&st.idle, &job) {
        let idle = st.idle.swap_remove(pos);
        match idle.tx.send((job, idle.cache)) {
            Ok(()) => {
                log::trace!("job handed to idle worker slot {}", idle.slot);
                return None;
            }
            // That worker withdrew just now; try another.
            Err((back, _)) => job = back,
        }
    }
    Some(job)
}

/// The idle worker to give `job` to: the most recently idle one that holds
/// the job's package, else the most recently idle one.
fn pick(idle: &[IdleWorker], job: &Job) -> Option<usize> {
    idle.iter()
        .rposition(|w| w.cache.contains(&job.package.hash))
        .or_else(|| idle.len().checked_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::PackageCache;

    fn job(cache: &PackageCache, pkg: &'static [u8]) -> (Job, oneshot::Receiver<Bytes>) {
        let (tx, rx) = oneshot::channel();
        let package = cache.receive(Bytes::from_static(pkg)).unwrap();
        (
            Job {
                id: 0,
                package,
                args: Bytes::new(),
                reply: tx,
                attempts: 0,
                submitted: std::time::Instant::now(),
                _held: Reservation::none(),
            },
            rx,
        )
    }

    #[tokio::test]
    async fn queued_jobs_go_out_in_order() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, _ra) = job(&c, b"Na");
        let (b, _rb) = job(&c, b"Nb");
        s.submit(a);
        s.submit(b);
        let (first, cache) = s.next_job(0, WorkerCache::default()).unwrap();
        assert_eq!(&first.package.new_frame[..], b"Na");
        let (second, _) = s.next_job(0, cache).unwrap();
        assert_eq!(&second.package.new_frame[..], b"Nb");
    }

    #[tokio::test]
    async fn idle_worker_gets_the_job_at_once_and_cache_holder_is_preferred() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, _ra) = job(&c, b"Na");
        let mut warm = WorkerCache::default();
        warm.insert(a.package.hash);
        // Slot 1 holds the package but went idle first; it still wins.
        let mut w1 = s.next_job(1, warm).unwrap_err();
        let mut w0 = s.next_job(0, WorkerCache::default()).unwrap_err();
        s.submit(a);
        let (got, cache) = w1.job().await.unwrap();
        assert!(cache.contains(&got.package.hash));
        assert_eq!(s.queued(), 0);
        // The other one is still idle and takes the next job.
        let (b, _rb) = job(&c, b"Nb");
        s.submit(b);
        assert_eq!(&w0.job().await.unwrap().0.package.new_frame[..], b"Nb");
    }

    #[tokio::test]
    async fn waiting_for_a_worker_ends_when_one_comes_up() {
        let s = Arc::new(Scheduler::default());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.wait_for_worker().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let _up = s.worker_up();
        waiter.await.unwrap();
        s.wait_for_worker().await;
    }

    #[tokio::test]
    async fn queued_jobs_are_answered_when_no_worker_can_run_them() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, ra) = job(&c, b"Na");
        s.submit(a);
        let up = s.worker_up();
        let answer = Bytes::from_static(b"no workers");
        assert_eq!(s.fail_queued_if_no_workers(&answer), 0, "a worker is up");
        drop(up);
        assert_eq!(s.fail_queued_if_no_workers(&answer), 1);
        assert_eq!(ra.await.unwrap(), answer);
        assert_eq!(s.queued(), 0);
    }

    #[tokio::test]
    async fn a_failed_job_is_answered_with_none_and_the_text() {
        let c = PackageCache::new(1 << 20);
        let (a, ra) = job(&c, b"Na");
        a.fail("worker died\n");
        assert_eq!(
            ra.await.unwrap(),
            crate::pickle::none_with_text("worker died\n")
        );
        // Nobody is waiting any more: failing it is quietly nothing.
        let (b, rb) = job(&c, b"Nb");
        drop(rb);
        b.fail("too late");
    }

    #[tokio::test]
    async fn abandoned_queued_jobs_are_skipped() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, ra) = job(&c, b"Na");
        let (b, _rb) = job(&c, b"Nb");
        s.submit(a);
        s.submit(b);
        drop(ra);
        let (got, _) = s.next_job(0, WorkerCache::default()).unwrap();
        assert_eq!(&got.package.new_frame[..], b"Nb");
    }

    #[tokio::test]
    async fn a_withdrawn_worker_hands_back_its_job() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let w = s.next_job(0, WorkerCache::default()).unwrap_err();
        let (a, _ra) = job(&c, b"Na");
        s.submit(a);
        let back = w.withdraw().expect("job handed over before withdrawal");
        s.requeue_front(back);
        assert_eq!(s.queued(), 1);
        // A worker that withdrew before any job arrived is skipped.
        let w = s.next_job(0, WorkerCache::default());
        let (got, _) = w.unwrap();
        let w2 = s.next_job(1, WorkerCache::default()).unwrap_err();
        assert!(w2.withdraw().is_none());
        let (b, _rb) = job(&c, b"Nb");
        s.submit(b);
        assert_eq!(s.queued(), 1, "no live idle worker: queued");
        assert!(s.lock().idle.is_empty(), "the withdrawn entry was dropped");
        // A requeued job goes ahead of the queue.
        s.requeue_front(got);
        let (first, _) = s.next_job(0, WorkerCache::default()).unwrap();
        assert_eq!(&first.package.new_frame[..], b"Na");
    }
}
