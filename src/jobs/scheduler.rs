//! Hands jobs from every client connection to the worker pool, in fair
//! shares between client hosts.
//!
//! A job goes to an idle worker at once if there is one (preferring a
//! worker that already holds the job's package, so it is sent the 33-byte
//! `H` frame and skips unpickling the sources again); a job never waits
//! while a worker is idle. Otherwise it waits in its client host's queue:
//! hosts are told apart by IP address (an IPv6 host by its /64, as the
//! connection budgets count it), so all connections of one host share a
//! queue. A worker that becomes free serves the hosts with queued
//! jobs in turn (round robin): one job of the host whose turn it is, which
//! then goes to the back of the line. A host with 200 connections thus
//! gets one worker in two while one other host has jobs waiting, not all
//! of them.
//!
//! Within a host, jobs start oldest first, with one exception for package
//! affinity: a worker takes a job whose package it already holds from
//! among the first [`AFFINITY_WINDOW`] queued jobs of that host, ahead of
//! older ones, and no job is overtaken more than once. A single client
//! running one function sees plain first come, first served. A job put
//! back because its worker was found dead before starting it goes back to
//! the head of its host's queue, and its host gets its turn back.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::config::allow::host_key;
use crate::config::users::User;
use crate::jobs::cache::{Package, WorkerCache};
use crate::memory::budget::Reservation;

/// How many of its host's queued jobs, counted from the oldest, a free
/// worker looks through for one whose package it already holds. Small, so
/// package affinity reorders a host's jobs only a little: a pp client
/// keeps about as many jobs queued on a server as it has workers.
pub(crate) const AFFINITY_WINDOW: usize = 4;

/// One job: a function package, its pickled arguments, and where its result
/// goes.
#[derive(Debug)]
pub(crate) struct Job {
    /// Number for log lines.
    pub id: u64,
    /// The client's host: jobs queue per host, and hosts take turns.
    pub client: IpAddr,
    /// Whose job it is: the user the client logged in as.
    pub user: Arc<User>,
    /// The function package (shared with the connection's cache).
    pub package: Arc<Package>,
    /// The arguments' bytes in the memory budget, given back when the job
    /// is done (answered, or dropped because its client left). Declared
    /// before `args`, so it is given back first: a large frame's mapping,
    /// dropped right after, may then be kept for reuse in the room it
    /// leaves instead of being counted twice for a moment and unmapped.
    pub _held: Reservation,
    /// The pickled argument tuple, relayed as received.
    pub args: Bytes,
    /// The session waiting for the result frame. Closed when the client
    /// went away, which lets queued jobs of vanished clients be dropped.
    pub reply: oneshot::Sender<Bytes>,
    /// How many workers were found dead before they could start this job.
    pub attempts: u8,
    /// When the session submitted it, for the queue-wait metric.
    pub submitted: std::time::Instant,
}

impl Job {
    /// Where the job came from, for log lines: the client's address, after
    /// the user's name where users are named (`alice@192.0.2.7`).
    pub(crate) fn origin(&self) -> String {
        match self.user.shown() {
            Some(name) => format!("{name}@{}", self.client),
            None => self.client.to_string(),
        }
    }

    /// Whether anyone still waits for this job's result.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    /// Answers the job with `(None, text)`, which a pp client shows as a
    /// failed job with `text` as its output. A client that went away needs
    /// no answer, so a closed reply channel is not an error.
    pub(crate) fn fail(self, text: &str) {
        let _ = self
            .reply
            .send(crate::protocol::pickle::none_with_text(text));
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

/// A job waiting for a worker.
#[derive(Debug)]
struct QueuedJob {
    /// The job itself.
    job: Job,
    /// A later job of the same host went ahead of this one (package
    /// affinity); it may not happen again, so this job bounds the search
    /// for the next one.
    overtaken: bool,
}

/// What the scheduler's mutex guards.
#[derive(Debug, Default)]
struct State {
    /// Jobs no worker was free for, by client host, each queue oldest
    /// first. A host without queued jobs has no entry, so hosts that come
    /// and go leave nothing behind.
    queues: HashMap<IpAddr, VecDeque<QueuedJob>>,
    /// The hosts that have queued jobs, each once, in the order they get
    /// the next free workers.
    turns: VecDeque<IpAddr>,
    /// Workers with nothing to do; most recently idle last.
    idle: Vec<IdleWorker>,
}

/// Where a queued job goes in its host's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Behind the host's other jobs: a new job.
    Back,
    /// Ahead of them, with the host's turn given back: a job that was
    /// taken but never started.
    Front,
}

impl State {
    /// Queues `job` in its host's queue; a host whose queue was empty
    /// joins the line of turns (at its end for a new job).
    fn enqueue(&mut self, job: Job, place: Place) {
        let host = host_of(&job);
        let queue = self.queues.entry(host).or_default();
        let waiting = !queue.is_empty();
        match place {
            Place::Back => queue.push_back(QueuedJob {
                job,
                overtaken: false,
            }),
            // It keeps its place: nothing overtakes it any more.
            Place::Front => queue.push_front(QueuedJob {
                job,
                overtaken: true,
            }),
        }
        match (place, waiting) {
            (Place::Back, true) => {}
            (Place::Back, false) => self.turns.push_back(host),
            (Place::Front, _) => {
                // Its host's turn went to this job, which never ran: the
                // host is next again. (Rare: a few hosts to look through.)
                if waiting {
                    self.turns.retain(|h| *h != host);
                }
                self.turns.push_front(host);
            }
        }
    }

    /// The next job for a worker holding `cache`: from the host whose
    /// turn it is, which then goes to the back of the line if it has more.
    /// Jobs of clients that left are dropped on the way.
    fn dequeue(&mut self, cache: &WorkerCache) -> Option<Job> {
        while let Some(host) = self.turns.pop_front() {
            let Some(queue) = self.queues.get_mut(&host) else {
                continue;
            };
            let taken = take(queue, cache);
            if queue.is_empty() {
                self.queues.remove(&host);
            } else {
                self.turns.push_back(host);
            }
            if taken.is_some() {
                return taken;
            }
        }
        None
    }
}

/// The key of a job's host, the same as the connection budgets use: an
/// IPv4 client seen on an IPv6 listener is the same host as on an IPv4
/// one, and an IPv6 host is its /64, any address of which it may pick.
fn host_of(job: &Job) -> IpAddr {
    host_key(job.client)
}

/// Takes the job a worker holding `cache` runs next from one host's
/// queue: the oldest, unless one of the first [`AFFINITY_WINDOW`] has a
/// package the worker holds and no job it would pass was passed before.
/// Abandoned jobs at the head are dropped; `None` if no job is left.
fn take(queue: &mut VecDeque<QueuedJob>, cache: &WorkerCache) -> Option<Job> {
    while queue.front()?.job.is_abandoned() {
        if let Some(gone) = queue.pop_front() {
            crate::ops::metrics::metrics().dropped("abandoned", &gone.job.user.name);
            log::debug!(
                "job {} dropped: its client went away before it started",
                gone.job.id
            );
        }
    }
    let mut pick = 0;
    for (i, q) in queue.iter().enumerate().take(AFFINITY_WINDOW) {
        if cache.contains(&q.job.package.hash) && !q.job.is_abandoned() {
            pick = i;
            break;
        }
        if q.overtaken {
            break;
        }
    }
    for passed in queue.iter_mut().take(pick) {
        passed.overtaken = true;
    }
    queue.remove(pick).map(|q| q.job)
}

/// The job queues of the client hosts and the list of idle workers.
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
        // in a way that matters: the steps under it are pushes, pops and
        // moves that do not panic short of running out of memory.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits a job: to an idle worker if there is one, else to the back
    /// of its host's queue.
    pub(crate) fn submit(&self, job: Job) {
        let mut st = self.lock();
        if let Some(job) = hand_to_idle(&mut st, job) {
            st.enqueue(job, Place::Back);
        }
    }

    /// Puts back a job that was taken but never started (its worker turned
    /// out to be dead): to an idle worker, else at the head of its host's
    /// queue, with its host next in turn, so it keeps its place.
    pub(crate) fn requeue_front(&self, job: Job) {
        let mut st = self.lock();
        if let Some(job) = hand_to_idle(&mut st, job) {
            st.enqueue(job, Place::Front);
        }
    }

    /// A worker asks for its next job: one still wanted by its client, from
    /// the host whose turn it is (see the module doc), or else it goes on
    /// the idle list.
    pub(crate) fn next_job(
        &self,
        slot: usize,
        cache: WorkerCache,
    ) -> Result<(Job, WorkerCache), Waiting> {
        let mut st = self.lock();
        if let Some(job) = st.dequeue(&cache) {
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
        st.turns.clear();
        for (_, queue) in st.queues.drain() {
            for q in queue {
                let user = q.job.user.clone();
                if q.job.reply.send(answer.clone()).is_ok() {
                    crate::ops::metrics::metrics().server_answered("no_worker", &user.name);
                    answered += 1;
                }
            }
        }
        answered
    }

    /// Removes the job numbered `id` of host `client` from the queue, if it
    /// is still there: its client left, and its arguments and memory
    /// reservation go at once instead of when a worker reaches it. Returns
    /// whether it was queued.
    pub(crate) fn withdraw(&self, client: IpAddr, id: u64) -> bool {
        let mut st = self.lock();
        let host = host_key(client);
        let Some(queue) = st.queues.get_mut(&host) else {
            return false;
        };
        let Some(pos) = queue.iter().position(|q| q.job.id == id) else {
            return false;
        };
        let gone = queue.remove(pos);
        if queue.is_empty() {
            st.queues.remove(&host);
            st.turns.retain(|h| *h != host);
        }
        drop(st);
        if let Some(gone) = &gone {
            crate::ops::metrics::metrics().dropped("abandoned", &gone.job.user.name);
        }
        // Dropped outside the lock: a large frame's mapping is unmapped here.
        drop(gone);
        log::debug!("job {id} dropped: its client went away before it started");
        true
    }

    /// Number of jobs waiting for a worker.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queues.values().map(VecDeque::len).sum()
    }

    /// Drops every idle entry and queued job: on shutdown, waiting workers
    /// wake up with nothing and sessions see their reply channel close.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.idle.clear();
        st.queues.clear();
        st.turns.clear();
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

/// A job with package `pkg` from client host `host`, holding no memory,
/// and the receiving end of its answer: for the scheduler's and the pool's
/// tests.
#[cfg(test)]
pub(crate) fn test_job(
    cache: &crate::jobs::cache::PackageCache,
    pkg: &'static [u8],
    host: &str,
) -> (Job, oneshot::Receiver<Bytes>) {
    let (tx, rx) = oneshot::channel();
    let package = cache.receive(Bytes::from_static(pkg)).unwrap();
    (
        Job {
            id: 0,
            client: host.parse().unwrap(),
            user: crate::config::users::Users::single("s").all()[0].clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::cache::PackageCache;

    fn job(cache: &PackageCache, pkg: &'static [u8]) -> (Job, oneshot::Receiver<Bytes>) {
        test_job(cache, pkg, "127.0.0.1")
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
            crate::protocol::pickle::none_with_text("worker died\n")
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

    /// The packages (without the `N`) of the jobs that workers holding no
    /// package take one after another, until none is queued.
    fn drain(s: &Scheduler) -> Vec<String> {
        let mut order = Vec::new();
        while let Ok((job, _)) = s.next_job(0, WorkerCache::default()) {
            order.push(String::from_utf8_lossy(&job.package.new_frame[1..]).into_owned());
        }
        order
    }

    #[tokio::test]
    async fn hosts_take_turns_and_each_host_keeps_its_order() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let mut replies = Vec::new();
        for (pkg, host) in [
            (&b"Na1"[..], "192.0.2.1"),
            (b"Na2", "192.0.2.1"),
            (b"Na3", "192.0.2.1"),
            (b"Nb1", "192.0.2.2"),
            (b"Na4", "192.0.2.1"),
            (b"Nb2", "192.0.2.2"),
            (b"Nc1", "192.0.2.3"),
        ] {
            let (j, r) = test_job(&c, pkg, host);
            replies.push(r);
            s.submit(j);
        }
        assert_eq!(
            drain(&s),
            ["a1", "b1", "c1", "a2", "b2", "a3", "a4"],
            "one job per host in turn, in the order hosts first queued"
        );
        let st = s.lock();
        assert!(st.queues.is_empty() && st.turns.is_empty(), "nothing left");
    }

    #[tokio::test]
    async fn a_single_job_of_another_host_waits_behind_one_job_of_a_busy_host() {
        // The issue: one host's 40 connections held every worker while
        // another host's single job waited behind all of them.
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let mut replies = Vec::new();
        for _ in 0..40 {
            let (j, r) = test_job(&c, b"Nbusy", "127.0.0.2");
            replies.push(r);
            s.submit(j);
        }
        let (single, _r) = test_job(&c, b"Nsingle", "127.0.0.3");
        s.submit(single);
        let order = drain(&s);
        assert_eq!(
            order.iter().position(|p| p == "single"),
            Some(1),
            "{order:?}"
        );
        assert_eq!(order.len(), 41);
    }

    #[tokio::test]
    async fn ports_of_one_address_are_one_host_and_ipv4_mapped_is_ipv4() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a1, _r1) = test_job(&c, b"Na1", "192.0.2.1");
        let (a2, _r2) = test_job(&c, b"Na2", "::ffff:192.0.2.1");
        let (b1, _r3) = test_job(&c, b"Nb1", "192.0.2.2");
        s.submit(a1);
        s.submit(a2);
        s.submit(b1);
        assert_eq!(drain(&s), ["a1", "b1", "a2"]);
    }

    #[tokio::test]
    async fn an_ipv6_host_is_its_64_as_for_the_connection_budgets() {
        // Regression: one IPv6 host took a fair share per address of its
        // /64, which it may pick at will.
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a1, _r1) = test_job(&c, b"Na1", "2001:db8::1");
        let (a2, _r2) = test_job(&c, b"Na2", "2001:db8::2");
        let (b1, _r3) = test_job(&c, b"Nb1", "2001:db8:0:1::1");
        s.submit(a1);
        s.submit(a2);
        s.submit(b1);
        assert_eq!(drain(&s), ["a1", "b1", "a2"]);
    }

    #[tokio::test]
    async fn a_withdrawn_job_leaves_the_queue_and_frees_its_memory_at_once() {
        // Regression: a client's queued jobs held their arguments and
        // memory until a worker reached them.
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let budget = crate::memory::budget::Budget::new(1 << 20);
        let (mut a1, _r1) = test_job(&c, b"Na1", "192.0.2.1");
        a1.id = 7;
        a1._held = budget.force(1000, crate::memory::budget::Use::InFlight);
        let (mut b1, _r2) = test_job(&c, b"Nb1", "192.0.2.2");
        b1.id = 8;
        s.submit(a1);
        s.submit(b1);
        assert_eq!(budget.used(), 1000);
        assert!(
            !s.withdraw("192.0.2.1".parse().unwrap(), 8),
            "not its host's"
        );
        assert!(s.withdraw("192.0.2.1".parse().unwrap(), 7));
        assert_eq!(budget.used(), 0, "its reservation went with it");
        assert_eq!(s.queued(), 1);
        assert!(!s.withdraw("192.0.2.1".parse().unwrap(), 7), "gone already");
        assert_eq!(drain(&s), ["b1"]);
        let st = s.lock();
        assert!(st.queues.is_empty() && st.turns.is_empty(), "nothing left");
    }

    #[tokio::test]
    async fn one_host_running_one_function_is_served_first_come_first_served() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let mut replies = Vec::new();
        for id in 0..10 {
            let (mut j, r) = job(&c, b"Nf");
            j.id = id;
            replies.push(r);
            s.submit(j);
        }
        let (first, mut warm) = s.next_job(0, WorkerCache::default()).unwrap();
        warm.insert(first.package.hash);
        let mut ids = vec![first.id];
        while let Ok((j, back)) = s.next_job(0, warm) {
            ids.push(j.id);
            warm = back;
        }
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_free_worker_prefers_a_job_whose_package_it_holds_within_its_host() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, _ra) = job(&c, b"Na");
        let (b, _rb) = job(&c, b"Nb");
        let (b2, _rb2) = job(&c, b"Nb");
        let mut warm = WorkerCache::default();
        warm.insert(b.package.hash);
        s.submit(a);
        s.submit(b);
        s.submit(b2);
        // Holding b, the worker takes b ahead of the older a...
        let (got, warm) = s.next_job(0, warm).unwrap();
        assert_eq!(&got.package.new_frame[..], b"Nb");
        // ...but a may be overtaken only once: next comes a, though the
        // worker holds b and another b waits.
        let (got, warm) = s.next_job(0, warm).unwrap();
        assert_eq!(&got.package.new_frame[..], b"Na");
        let (got, _) = s.next_job(0, warm).unwrap();
        assert_eq!(&got.package.new_frame[..], b"Nb");
    }

    #[tokio::test]
    async fn package_affinity_looks_only_a_few_jobs_ahead_and_never_across_hosts() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let mut replies = Vec::new();
        for pkg in [&b"N1"[..], b"N2", b"N3", b"N4", b"Nheld"] {
            let (j, r) = test_job(&c, pkg, "192.0.2.1");
            replies.push(r);
            s.submit(j);
        }
        let (other, _ro) = test_job(&c, b"Nheld", "192.0.2.2");
        let mut warm = WorkerCache::default();
        warm.insert(other.package.hash);
        s.submit(other);
        // The held package is fifth in the first host's queue: past the
        // window. The worker takes that host's oldest job, not the other
        // host's job it holds the package of, nor its fifth.
        assert_eq!(AFFINITY_WINDOW, 4);
        let (got, warm) = s.next_job(0, warm).unwrap();
        assert_eq!(&got.package.new_frame[..], b"N1");
        // The other host's turn: its job.
        let (got, warm) = s.next_job(0, warm).unwrap();
        assert_eq!(got.client, "192.0.2.2".parse::<IpAddr>().unwrap());
        // Now the held package is within reach.
        let (got, _) = s.next_job(0, warm).unwrap();
        assert_eq!(&got.package.new_frame[..], b"Nheld");
        assert_eq!(drain(&s), ["2", "3", "4"], "the passed jobs in order");
    }

    #[tokio::test]
    async fn an_idle_worker_holding_the_package_is_preferred_whatever_the_host() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, _ra) = test_job(&c, b"Na", "192.0.2.1");
        let (b, _rb) = test_job(&c, b"Nb", "192.0.2.2");
        let mut warm_a = WorkerCache::default();
        warm_a.insert(a.package.hash);
        let mut warm_b = WorkerCache::default();
        warm_b.insert(b.package.hash);
        let mut wa = s.next_job(0, warm_a).unwrap_err();
        let mut wb = s.next_job(1, warm_b).unwrap_err();
        s.submit(b);
        s.submit(a);
        assert_eq!(&wa.job().await.unwrap().0.package.new_frame[..], b"Na");
        assert_eq!(&wb.job().await.unwrap().0.package.new_frame[..], b"Nb");
    }

    #[tokio::test]
    async fn a_requeued_job_goes_first_and_its_host_gets_its_turn_back() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let mut replies = Vec::new();
        for (pkg, host) in [
            (&b"Na1"[..], "192.0.2.1"),
            (b"Na2", "192.0.2.1"),
            (b"Nb1", "192.0.2.2"),
        ] {
            let (j, r) = test_job(&c, pkg, host);
            replies.push(r);
            s.submit(j);
        }
        // a1 is taken; its worker turns out dead before starting it.
        let (a1, _) = s.next_job(0, WorkerCache::default()).unwrap();
        s.requeue_front(a1);
        assert_eq!(drain(&s), ["a1", "b1", "a2"]);
        // A host whose queue had emptied gets its turn back too.
        let (b2, _rb2) = test_job(&c, b"Nb2", "192.0.2.2");
        let (a3, _ra3) = test_job(&c, b"Na3", "192.0.2.1");
        s.submit(b2);
        s.submit(a3);
        let (b2, _) = s.next_job(0, WorkerCache::default()).unwrap();
        s.requeue_front(b2);
        assert_eq!(drain(&s), ["b2", "a3"]);
    }

    #[tokio::test]
    async fn a_requeued_job_is_never_overtaken() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, _ra) = job(&c, b"Na");
        let (b, _rb) = job(&c, b"Nb");
        let mut warm = WorkerCache::default();
        warm.insert(b.package.hash);
        s.submit(a);
        s.submit(b);
        let (a, _) = s.next_job(0, WorkerCache::default()).unwrap();
        s.requeue_front(a);
        let (got, _) = s.next_job(0, warm).unwrap();
        assert_eq!(&got.package.new_frame[..], b"Na");
    }

    #[tokio::test]
    async fn abandoned_jobs_are_skipped_across_hosts_and_empty_hosts_forgotten() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, ra) = test_job(&c, b"Na", "192.0.2.1");
        let (b, _rb) = test_job(&c, b"Nb", "192.0.2.2");
        s.submit(a);
        s.submit(b);
        drop(ra);
        let (got, _) = s.next_job(0, WorkerCache::default()).unwrap();
        assert_eq!(&got.package.new_frame[..], b"Nb");
        let st = s.lock();
        assert!(st.queues.is_empty() && st.turns.is_empty());
    }

    #[tokio::test]
    async fn queued_jobs_of_every_host_are_answered_when_no_worker_can_run_them() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, ra) = test_job(&c, b"Na", "192.0.2.1");
        let (b, rb) = test_job(&c, b"Nb", "192.0.2.2");
        s.submit(a);
        s.submit(b);
        let answer = Bytes::from_static(b"no workers");
        assert_eq!(s.fail_queued_if_no_workers(&answer), 2);
        assert_eq!(ra.await.unwrap(), answer);
        assert_eq!(rb.await.unwrap(), answer);
        assert_eq!(s.queued(), 0);
        assert!(s.lock().turns.is_empty());
    }
}
