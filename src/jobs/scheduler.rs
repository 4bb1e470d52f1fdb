//! Hands jobs from every client connection to the worker pool, in fair
//! shares between users, and between each user's client hosts.
//!
//! A job goes to an idle worker at once if there is one that may run it
//! (preferring a worker that already holds the job's package, so it is
//! sent the 33-byte `H` frame and skips unpickling the sources again).
//! Otherwise it waits in its user's queue for its client host: hosts are
//! told apart by IP address (an IPv6 host by its /64, as the connection
//! budgets count it), so all connections of one host share a queue.
//!
//! **Between users** ([`crate::jobs::shares`]): a worker that becomes free
//! serves the user with queued jobs that has used the least worker time
//! for its weight, skipping users at their `max_workers`; so users get
//! worker time in proportion to their weights. With one user (no users
//! file) this is skipped altogether, and the scheduler is what it always
//! was: no clock read, no count per job.
//!
//! **Within a user**, its client hosts take turns (round robin): one job
//! of the host whose turn it is, which then goes to the back of the line.
//! A host with 200 connections thus gets one worker in two while one
//! other host of that user has jobs waiting, not all of them.
//!
//! Within a host, jobs start oldest first, with one exception for package
//! affinity: a worker takes a job whose package it already holds from
//! among the first [`AFFINITY_WINDOW`] queued jobs of that host, ahead of
//! older ones, and no job is overtaken more than once. A single client
//! running one function sees plain first come, first served. A job put
//! back because its worker was found dead before starting it goes back to
//! the head of its host's queue, and its host and user get their turn
//! back.
//!
//! **Workers kept to one user** (`--isolate user`, the default with a
//! users file): a pool slot's worker serves one user (its [`Seat`]) from
//! its first job until it is replaced, and a slot goes to another user
//! only by replacing its worker with a fresh one: the scheduler hands the
//! other user's job to the idle worker, which sees the job is not its
//! user's and has its slot replace it; the fresh worker, started for that
//! user, takes the job. A job goes, in this order, to an idle worker
//! serving its user (one holding its package first), a fresh worker that
//! has served nobody, or else an idle worker of another user, which is
//! replaced. Switches are kept rare: a slot serves its user for at least
//! [`MIN_TURN`] (an idle worker waits out that turn for its user's next
//! job before it goes to another user), then while the user has jobs
//! queued and stays within [`crate::jobs::shares::SLACK`] of its fair
//! share; and an idle worker waits [`GRACE`] for its user's next job
//! whatever the age of the turn: a pp client sends a connection's next
//! job only once the last is answered, so a user with as many jobs
//! running as it has connections has none queued for a moment after each
//! job, and a switch then would send the worker back and forth. A job may
//! thus wait up to [`MIN_TURN`] while a worker kept for another user is
//! idle; without isolation a job never waits while a worker is idle.
//!
//! A switch costs the fresh worker's start (about 7 ms by fork) and its
//! package cache: the fresh worker holds no package, so the user's next
//! job of each function is sent the package's `N` frame (kept by the
//! server, so its client sends nothing again) and the worker unpickles
//! the sources once more.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::config::allow::host_key;
use crate::config::users::{User, Users};
use crate::jobs::cache::{Package, WorkerCache};
use crate::jobs::shares::{Charge, Ledger, QueuePlace, Shares, GRACE, MIN_TURN};
use crate::memory::budget::Reservation;

/// How many of its host's queued jobs, counted from the oldest, a free
/// worker looks through for one whose package it already holds. Small, so
/// package affinity reorders a host's jobs only a little: a pp client
/// keeps about as many jobs queued on a server as it has workers.
pub(crate) const AFFINITY_WINDOW: usize = 4;

/// [`MIN_TURN`] in the ledger's µs.
const MIN_TURN_US: u64 = MIN_TURN.as_micros() as u64;
/// [`GRACE`] in the ledger's µs.
const GRACE_US: u64 = GRACE.as_micros() as u64;

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
    /// The job's place among its user's `max_queued` waiting jobs: given
    /// back when it leaves the queue.
    pub place: Option<QueuePlace>,
    /// Counts the job as running for its user's share and `max_workers`,
    /// from being handed to a worker until the job is dropped; `None`
    /// while queued, and with one user.
    pub charge: Option<Charge>,
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

/// The user a pool slot's workers serve under `--isolate user`, and since
/// when (the ledger's µs): kept by the slot's supervisor across the
/// replacements of its worker.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seat {
    /// `None`: a fresh worker, which has served nobody yet.
    pub(crate) owner: Option<Arc<User>>,
    /// When the slot began serving `owner`.
    pub(crate) since: u64,
}

/// A worker waiting for a job. It lends its cache to the scheduler so the
/// scheduler can pick by package, and gets it back with the job.
#[derive(Debug)]
struct IdleWorker {
    /// The worker's pool slot, for log lines and [`Scheduler::turn_over`].
    slot: usize,
    /// Packages the worker process holds.
    cache: WorkerCache,
    /// Where the job (and the cache) go.
    tx: oneshot::Sender<(Job, WorkerCache)>,
    /// The user the worker serves (by index), under `--isolate user`.
    owner: Option<usize>,
    /// When its slot began serving `owner`.
    since: u64,
    /// When it went idle.
    idle_since: u64,
    /// Kept for `owner` until then, though another user has jobs queued
    /// (0: not kept).
    kept_until: u64,
}

impl IdleWorker {
    /// Whether the worker is still kept for its user at `now`.
    fn kept_at(&self, now: u64) -> bool {
        now < self.kept_until
    }
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

/// One user's queued jobs, by client host.
#[derive(Debug, Default)]
struct UserQueue {
    /// Jobs no worker was free for, by client host, each queue oldest
    /// first. A host without queued jobs has no entry, so hosts that come
    /// and go leave nothing behind.
    queues: HashMap<IpAddr, VecDeque<QueuedJob>>,
    /// The hosts that have queued jobs, each once, in the order they get
    /// the next free workers.
    turns: VecDeque<IpAddr>,
}

/// What the scheduler's mutex guards.
#[derive(Debug, Default)]
struct State {
    /// Queued jobs by user index.
    users: Vec<UserQueue>,
    /// The users that have queued jobs, each once, in the order they began
    /// waiting: ties between users go to the first.
    waiting: Vec<usize>,
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

impl UserQueue {
    /// Whether no job of this user waits.
    fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

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

    /// Jobs waiting.
    fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }
}

impl State {
    /// `user`'s queue, made if the user is new here.
    fn user(&mut self, user: usize) -> &mut UserQueue {
        if user >= self.users.len() {
            self.users.resize_with(user + 1, UserQueue::default);
        }
        &mut self.users[user]
    }

    /// Whether `user` has jobs waiting.
    fn has_queued(&self, user: usize) -> bool {
        self.users.get(user).is_some_and(|q| !q.is_empty())
    }

    /// Queues `job` in its user's queue; a user that had nothing queued
    /// joins the waiting users (first for a job put back), starting again
    /// from the ledger's floor.
    fn enqueue(&mut self, job: Job, place: Place, ledger: Option<&mut Ledger>, now: u64) {
        let user = job.user.index;
        let queue = self.user(user);
        let was_empty = queue.is_empty();
        queue.enqueue(job, place);
        if was_empty {
            if let Some(ledger) = ledger {
                ledger.rejoin(user, now);
            }
        } else if place == Place::Back {
            return;
        } else {
            self.waiting.retain(|u| *u != user);
        }
        match place {
            Place::Back => self.waiting.push(user),
            Place::Front => self.waiting.insert(0, user),
        }
    }

    /// Whether nothing at all is queued, nor any host or user waiting.
    #[cfg(test)]
    fn is_drained(&self) -> bool {
        self.waiting.is_empty()
            && self
                .users
                .iter()
                .all(|q| q.queues.is_empty() && q.turns.is_empty())
    }

    /// The next job of `user` for a worker holding `cache`; a user left
    /// with nothing queued leaves the waiting users.
    fn take_from(&mut self, user: usize, cache: &WorkerCache) -> Option<Job> {
        let queue = self.users.get_mut(user)?;
        let job = queue.dequeue(cache);
        if queue.is_empty() {
            self.waiting.retain(|u| *u != user);
        }
        job
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

/// What a free worker does next.
enum Choice {
    /// Runs this job (of another user than its own: it is replaced first).
    Run(Job),
    /// Waits; until the time given, kept for its own user (whose turn is
    /// young, or whose next job may come any moment) though another user
    /// may have jobs queued.
    Wait(Option<u64>),
}

/// The users' job queues and the list of idle workers.
#[derive(Debug)]
pub struct Scheduler {
    /// Guarded by a plain mutex: it is held for a few pointer moves, never
    /// across an await.
    state: Mutex<State>,
    /// The users' accounts and limits.
    shares: Arc<Shares>,
    /// Whether jobs are counted against their users' shares: with more
    /// than one user, or a `max_workers`. Without, no clock is read.
    accounting: bool,
    /// Whether a `max_workers` may leave a job queued while a worker is
    /// idle, for [`Scheduler::released_since`].
    caps: bool,
    /// Whether workers are kept to one user each (`--isolate user`, with
    /// more than one user).
    isolate: bool,
    /// Worker processes up and running, for telling whether queued jobs
    /// can still be run by anyone.
    live_workers: AtomicUsize,
    /// Woken when a worker comes up, for [`Scheduler::wait_for_worker`].
    worker_started: tokio::sync::Notify,
}

impl Default for Scheduler {
    /// One user without limits, and workers shared: as a server without a
    /// users file.
    fn default() -> Scheduler {
        Scheduler::new(&Users::single(""), false)
    }
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
    /// Kept for its own user for this long: then it asks again
    /// ([`Scheduler::turn_over`]).
    kept_for: Option<Duration>,
    /// With `max_workers`, the count of releases when it began waiting.
    releases: Option<u64>,
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

    /// How long the worker is kept for its own user while other users'
    /// jobs wait; it asks again then ([`Scheduler::turn_over`]).
    pub(crate) fn kept_for(&self) -> Option<Duration> {
        self.kept_for
    }

    /// The count of releases of capped users when it began waiting
    /// ([`Scheduler::released_since`]); `None` without `max_workers`.
    pub(crate) fn releases(&self) -> Option<u64> {
        self.releases
    }
}

impl Scheduler {
    /// The scheduler for `users`; `isolate`: workers are kept to one user
    /// each (which matters only with more than one user).
    pub(crate) fn new(users: &Users, isolate: bool) -> Scheduler {
        Self::with_shares(users, isolate, Shares::new(users))
    }

    /// [`Scheduler::new`] with the ledger `shares`.
    fn with_shares(users: &Users, isolate: bool, shares: Arc<Shares>) -> Scheduler {
        let several = users.all().len() > 1;
        let caps = users.all().iter().any(|u| u.max_workers.is_some());
        Scheduler {
            state: Mutex::default(),
            shares,
            accounting: several || caps,
            caps,
            isolate: isolate && several,
            live_workers: AtomicUsize::new(0),
            worker_started: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed
        // in a way that matters: the steps under it are pushes, pops and
        // moves that do not panic short of running out of memory.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ledger, locked, and the time by it; `None` and 0 without
    /// accounting. Taken after the state's lock.
    fn ledger(&self) -> (Option<MutexGuard<'_, Ledger>>, u64) {
        if self.accounting {
            (Some(self.shares.lock()), self.shares.now())
        } else {
            (None, 0)
        }
    }

    /// Whether workers are kept to one user each.
    pub(crate) fn isolates(&self) -> bool {
        self.isolate
    }

    /// A slot's turn serving `user`, from now.
    pub(crate) fn turn_for(&self, user: Arc<User>) -> Seat {
        Seat {
            owner: Some(user),
            since: self.shares.now(),
        }
    }

    /// A place among `user`'s waiting jobs (`max_queued`), waiting for
    /// one if need be; `None` at once for a user without the limit.
    pub(crate) async fn queue_place(&self, user: &User) -> Option<QueuePlace> {
        self.shares.queue_place(user).await
    }

    /// Whether any user has a `max_queued`.
    pub(crate) fn limits_queues(&self) -> bool {
        self.shares.limits_queues()
    }

    /// Submits a job: to an idle worker if there is one, else to the back
    /// of its host's queue.
    pub(crate) fn submit(&self, job: Job) {
        let mut st = self.lock();
        let (mut ledger, now) = self.ledger();
        if let Some(job) = self.hand_to_idle(&mut st, ledger.as_deref_mut(), job, now) {
            st.enqueue(job, Place::Back, ledger.as_deref_mut(), now);
        }
    }

    /// Puts back a job that was taken but never started (its worker turned
    /// out to be dead): to an idle worker, else at the head of its host's
    /// queue, with its host next in turn, so it keeps its place.
    pub(crate) fn requeue_front(&self, mut job: Job) {
        // Given back before the lock: a charge takes the ledger's lock.
        drop(job.charge.take());
        let mut st = self.lock();
        let (mut ledger, now) = self.ledger();
        if let Some(job) = self.hand_to_idle(&mut st, ledger.as_deref_mut(), job, now) {
            st.enqueue(job, Place::Front, ledger.as_deref_mut(), now);
        }
    }

    /// A worker serving nobody yet asks for its next job ([`Scheduler::next_job_for`]).
    #[cfg(test)]
    pub(crate) fn next_job(
        &self,
        slot: usize,
        cache: WorkerCache,
    ) -> Result<(Job, WorkerCache), Waiting> {
        self.next_job_for(slot, cache, &Seat::default())
    }

    /// A worker of the slot serving `seat` asks for its next job: one
    /// still wanted by its client, of the user whose turn it is (see the
    /// module doc), or else it goes on the idle list. A job of another
    /// user than the seat's means: replace the worker first.
    pub(crate) fn next_job_for(
        &self,
        slot: usize,
        cache: WorkerCache,
        seat: &Seat,
    ) -> Result<(Job, WorkerCache), Waiting> {
        let mut st = self.lock();
        let (mut ledger, now) = self.ledger();
        let owner = seat.owner.as_ref().map(|u| u.index);
        match self.choose(
            &mut st,
            ledger.as_deref_mut(),
            (owner, seat.since, now),
            &cache,
            now,
        ) {
            Choice::Run(job) => Ok((job, cache)),
            Choice::Wait(kept) => {
                let (tx, rx) = oneshot::channel();
                st.idle.push(IdleWorker {
                    slot,
                    cache,
                    tx,
                    owner,
                    since: seat.since,
                    idle_since: now,
                    kept_until: kept.unwrap_or(0),
                });
                Err(Waiting {
                    rx,
                    kept_for: kept.map(|until| until_from(until, now)),
                    releases: self.caps.then(|| self.shares.releases()),
                })
            }
        }
    }

    /// An idle worker of `slot` asks again: its time kept for its own user
    /// is up, or a capped user's job ended. It may get a job (through its
    /// [`Waiting`]); returns how much longer it is kept for its user, if
    /// it still is.
    pub(crate) fn turn_over(&self, slot: usize) -> Option<Duration> {
        let mut st = self.lock();
        let pos = st
            .idle
            .iter()
            .position(|w| w.slot == slot && !w.tx.is_closed())?;
        let (mut ledger, now) = self.ledger();
        let mut idle = st.idle.swap_remove(pos);
        match self.choose(
            &mut st,
            ledger.as_deref_mut(),
            (idle.owner, idle.since, idle.idle_since),
            &idle.cache,
            now,
        ) {
            Choice::Run(mut job) => {
                let place = job.place.take();
                if let Err((mut back, _)) = idle.tx.send((job, idle.cache)) {
                    // It withdrew just now: the job goes back where it was.
                    back.place = place;
                    if let (Some(charge), Some(ledger)) =
                        (back.charge.take(), ledger.as_deref_mut())
                    {
                        charge.cancel(ledger);
                    }
                    st.enqueue(back, Place::Front, ledger.as_deref_mut(), now);
                }
                None
            }
            Choice::Wait(kept) => {
                idle.kept_until = kept.unwrap_or(0);
                st.idle.push(idle);
                kept.map(|until| until_from(until, now))
            }
        }
    }

    /// The count of releases of users at their `max_workers` so far.
    pub(crate) fn releases(&self) -> u64 {
        self.shares.releases()
    }

    /// Completes once a job of a user at its `max_workers` has ended since
    /// the count was `seen`: an idle worker then asks again
    /// ([`Scheduler::turn_over`]), since that user's queued jobs may go.
    pub(crate) async fn released_since(&self, seen: u64) {
        self.shares.released_since(seen).await
    }

    /// What a free worker serving `owner` since `since`, idle since
    /// `idle_since` and holding `cache`, does next (see the module doc). A
    /// job it gets is counted as running.
    fn choose(
        &self,
        st: &mut State,
        mut ledger: Option<&mut Ledger>,
        (owner, since, idle_since): (Option<usize>, u64, u64),
        cache: &WorkerCache,
        now: u64,
    ) -> Choice {
        loop {
            let Some(l) = ledger.as_deref_mut() else {
                // One user without limits: its queue, as it always was.
                // (Users in turn, should a job of another come.)
                let Some(&user) = st.waiting.first() else {
                    return Choice::Wait(None);
                };
                let job = st.take_from(user, cache);
                if st.waiting.first() == Some(&user) {
                    st.waiting.rotate_left(1);
                }
                match job {
                    Some(job) => return Choice::Run(handed(job, None, &self.shares, now)),
                    None => continue,
                }
            };
            let owned = self.isolate && owner.is_some();
            let young = owned && now < since.saturating_add(MIN_TURN_US);
            // Kept for its user while the turn is young, or while that
            // user's next job may be on its way.
            let keep = since
                .saturating_add(MIN_TURN_US)
                .max(idle_since.saturating_add(GRACE_US));
            let kept = (owned && now < keep).then_some(keep);
            let Some(fairest) = l.pick(&st.waiting, now) else {
                return Choice::Wait(kept);
            };
            let user = match owner {
                Some(own) if self.isolate && own != fairest => {
                    let own_waits = st.has_queued(own);
                    if own_waits && l.eligible(own) && (young || l.within_slack(own, fairest, now))
                    {
                        own
                    } else if !own_waits && kept.is_some() {
                        return Choice::Wait(kept);
                    } else {
                        fairest
                    }
                }
                _ => fairest,
            };
            if let Some(job) = st.take_from(user, cache) {
                return Choice::Run(handed(job, Some(l), &self.shares, now));
            }
            // Only jobs of clients that left were queued: look again.
        }
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
        st.waiting.clear();
        for user in &mut st.users {
            user.turns.clear();
            for (_, queue) in user.queues.drain() {
                for q in queue {
                    let user = q.job.user.clone();
                    if q.job.reply.send(answer.clone()).is_ok() {
                        crate::ops::metrics::metrics().server_answered("no_worker", &user.name);
                        answered += 1;
                    }
                }
            }
        }
        answered
    }

    /// Removes the job numbered `id` of `user` (by index) from host
    /// `client` from the queue, if it is still there: its client left, and
    /// its arguments and memory reservation go at once instead of when a
    /// worker reaches it. Returns whether it was queued.
    pub(crate) fn withdraw(&self, user: usize, client: IpAddr, id: u64) -> bool {
        let mut st = self.lock();
        let host = host_key(client);
        let Some(queues) = st.users.get_mut(user) else {
            return false;
        };
        let Some(queue) = queues.queues.get_mut(&host) else {
            return false;
        };
        let Some(pos) = queue.iter().position(|q| q.job.id == id) else {
            return false;
        };
        let gone = queue.remove(pos);
        if queue.is_empty() {
            queues.queues.remove(&host);
            queues.turns.retain(|h| *h != host);
            if queues.is_empty() {
                st.waiting.retain(|u| *u != user);
            }
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
        self.lock().users.iter().map(UserQueue::len).sum()
    }

    /// Drops every idle entry and queued job: on shutdown, waiting workers
    /// wake up with nothing and sessions see their reply channel close.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.idle.clear();
        st.users.clear();
        st.waiting.clear();
    }

    /// Gives `job` to an idle worker that may run it, if there is one;
    /// gives it back otherwise.
    fn hand_to_idle(
        &self,
        st: &mut State,
        mut ledger: Option<&mut Ledger>,
        mut job: Job,
        now: u64,
    ) -> Option<Job> {
        // Entries of workers that withdrew (died while idle) are dropped here,
        // so the list only ever holds live workers for long.
        st.idle.retain(|w| !w.tx.is_closed());
        if ledger
            .as_deref()
            .is_some_and(|l| !l.eligible(job.user.index))
        {
            return Some(job);
        }
        loop {
            let pos = if self.isolate {
                pick_isolated(&st.idle, &job, now)
            } else {
                pick(&st.idle, &job)
            };
            let Some(pos) = pos else {
                return Some(job);
            };
            let idle = st.idle.swap_remove(pos);
            let place = job.place.take();
            let handed = handed(job, ledger.as_deref_mut(), &self.shares, now);
            match idle.tx.send((handed, idle.cache)) {
                Ok(()) => {
                    log::trace!("job handed to idle worker slot {}", idle.slot);
                    return None;
                }
                // That worker withdrew just now; try another.
                Err((mut back, _)) => {
                    back.place = place;
                    if let (Some(charge), Some(ledger)) =
                        (back.charge.take(), ledger.as_deref_mut())
                    {
                        charge.cancel(ledger);
                    }
                    job = back;
                }
            }
        }
    }
}

/// `job`, leaving the queue for a worker: its queue place is given back
/// and, with a ledger, it is counted as running.
fn handed(mut job: Job, ledger: Option<&mut Ledger>, shares: &Arc<Shares>, now: u64) -> Job {
    job.place = None;
    if let Some(ledger) = ledger {
        job.charge = Some(shares.charge(ledger, job.user.index, now));
    }
    job
}

/// How long from `now` until `until` (the ledger's µs).
fn until_from(until: u64, now: u64) -> Duration {
    Duration::from_micros(until.saturating_sub(now))
}

/// The idle worker to give `job` to: the most recently idle one that holds
/// the job's package, else the most recently idle one.
fn pick(idle: &[IdleWorker], job: &Job) -> Option<usize> {
    idle.iter()
        .rposition(|w| w.cache.contains(&job.package.hash))
        .or_else(|| idle.len().checked_sub(1))
}

/// The idle worker to give `job` to with workers kept to one user: one
/// serving the job's user (holding its package first), else a fresh one,
/// else one of another user not kept for it, which is then replaced.
fn pick_isolated(idle: &[IdleWorker], job: &Job, now: u64) -> Option<usize> {
    let user = Some(job.user.index);
    idle.iter()
        .rposition(|w| w.owner == user && w.cache.contains(&job.package.hash))
        .or_else(|| idle.iter().rposition(|w| w.owner == user))
        .or_else(|| idle.iter().rposition(|w| w.owner.is_none()))
        .or_else(|| idle.iter().rposition(|w| !w.kept_at(now)))
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
            place: None,
            charge: None,
        },
        rx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::cache::PackageCache;
    use crate::jobs::shares::Shares;

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
        assert!(st.is_drained(), "nothing left");
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
            !s.withdraw(0, "192.0.2.1".parse().unwrap(), 8),
            "not its host's"
        );
        assert!(s.withdraw(0, "192.0.2.1".parse().unwrap(), 7));
        assert_eq!(budget.used(), 0, "its reservation went with it");
        assert_eq!(s.queued(), 1);
        assert!(
            !s.withdraw(0, "192.0.2.1".parse().unwrap(), 7),
            "gone already"
        );
        assert_eq!(drain(&s), ["b1"]);
        let st = s.lock();
        assert!(st.is_drained(), "nothing left");
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
        assert!(st.is_drained());
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
        assert!(s.lock().is_drained());
    }

    /// The users of a users file's text, and a scheduler for them on a
    /// clock the test moves.
    fn shared(text: &str, isolate: bool) -> (Users, Arc<Shares>, Scheduler) {
        let file = crate::config::users::parse(std::path::Path::new("users"), text).unwrap();
        let users = Users::new(Some(&file), "", false).unwrap();
        let shares = Arc::new(Shares::with_clock(
            &users,
            crate::jobs::shares::Clock::Manual(Default::default()),
        ));
        let s = Scheduler::with_shares(&users, isolate, shares.clone());
        (users, shares, s)
    }

    /// A job of `user` with package `pkg` from `host`.
    fn job_of(
        c: &PackageCache,
        pkg: &'static [u8],
        user: &Arc<User>,
        host: &str,
    ) -> (Job, oneshot::Receiver<Bytes>) {
        let (mut j, r) = test_job(c, pkg, host);
        j.user = user.clone();
        (j, r)
    }

    /// `user`'s seat since `since`.
    fn seat(user: &Arc<User>, since: u64) -> Seat {
        Seat {
            owner: Some(user.clone()),
            since,
        }
    }

    #[tokio::test]
    async fn with_one_user_no_job_is_charged() {
        let s = Scheduler::default();
        let c = PackageCache::new(1 << 20);
        let (a, _ra) = job(&c, b"Na");
        s.submit(a);
        let (got, _) = s.next_job(0, WorkerCache::default()).unwrap();
        assert!(got.charge.is_none());
        assert!(!s.isolates(), "nothing to isolate with one user");
    }

    #[tokio::test]
    async fn users_share_the_workers_in_proportion_to_their_weights() {
        let (users, shares, s) = shared("[a]\nsecret = a\nweight = 3\n[b]\nsecret = b\n", false);
        let c = PackageCache::new(1 << 20);
        let mut replies = Vec::new();
        for _ in 0..60 {
            for (user, pkg) in [(0, &b"Na"[..]), (1, b"Nb")] {
                let (j, r) = job_of(&c, pkg, &users.all()[user], "192.0.2.1");
                replies.push(r);
                s.submit(j);
            }
        }
        // One worker; jobs of 10 ms; both users always have jobs queued.
        let mut ran = [0; 2];
        for _ in 0..40 {
            let (j, _) = s.next_job(0, WorkerCache::default()).unwrap();
            ran[j.user.index] += 1;
            shares.advance(10_000);
            drop(j);
        }
        assert_eq!(ran, [30, 10], "3:1");
    }

    #[tokio::test]
    async fn a_users_hosts_take_turns_within_its_share() {
        let (users, _, s) = shared("[a]\nsecret = a\n[b]\nsecret = b\n", false);
        let c = PackageCache::new(1 << 20);
        let (a, b) = (&users.all()[0], &users.all()[1]);
        let mut replies = Vec::new();
        for (pkg, user, host) in [
            (&b"Na1"[..], a, "192.0.2.1"),
            (b"Na2", a, "192.0.2.1"),
            (b"Na3", a, "192.0.2.1"),
            (b"Nx1", a, "192.0.2.2"),
            (b"Nb1", b, "192.0.2.1"),
        ] {
            let (j, r) = job_of(&c, pkg, user, host);
            replies.push(r);
            s.submit(j);
        }
        let mut order = Vec::new();
        let mut running = Vec::new();
        while let Ok((j, _)) = s.next_job(0, WorkerCache::default()) {
            order.push(String::from_utf8_lossy(&j.package.new_frame[1..]).into_owned());
            // Still running: each costs its user the start charge alone.
            running.push(j);
        }
        assert_eq!(order, ["a1", "b1", "x1", "a2", "a3"]);
    }

    #[tokio::test]
    async fn a_user_at_max_workers_waits_and_an_idle_worker_takes_its_job_once_one_ends() {
        let (users, _, s) = shared("[a]\nsecret = a\nmax_workers = 1\n[b]\nsecret = b\n", false);
        let c = PackageCache::new(1 << 20);
        let (a, b) = (&users.all()[0], &users.all()[1]);
        let (a1, _r1) = job_of(&c, b"Na1", a, "192.0.2.1");
        let (a2, _r2) = job_of(&c, b"Na2", a, "192.0.2.1");
        let (b1, _r3) = job_of(&c, b"Nb1", b, "192.0.2.1");
        s.submit(a1);
        s.submit(a2);
        s.submit(b1);
        let (first, _) = s.next_job(0, WorkerCache::default()).unwrap();
        assert_eq!(&first.package.new_frame[..], b"Na1");
        let (second, _) = s.next_job(1, WorkerCache::default()).unwrap();
        assert_eq!(&second.package.new_frame[..], b"Nb1", "a is at its cap");
        let mut idle = s.next_job(2, WorkerCache::default()).unwrap_err();
        let seen = idle.releases().expect("caps are watched");
        assert_eq!(s.queued(), 1);
        drop(first);
        // The release wakes the idle worker, which asks again.
        s.released_since(seen).await;
        assert_eq!(s.turn_over(2), None);
        let (running, _) = idle.job().await.unwrap();
        assert_eq!(&running.package.new_frame[..], b"Na2");
        // A job of a capped user is not handed to an idle worker either.
        let _w = s.next_job(3, WorkerCache::default()).unwrap_err();
        let (a3, _r4) = job_of(&c, b"Na3", a, "192.0.2.1");
        s.submit(a3);
        assert_eq!(s.queued(), 1);
    }

    #[tokio::test]
    async fn a_job_goes_to_its_users_worker_then_a_fresh_one_then_another_users() {
        let (users, shares, s) =
            shared("[a]\nsecret = a\n[b]\nsecret = b\n[c]\nsecret = c\n", true);
        let cc = PackageCache::new(1 << 20);
        let (a, b, c) = (&users.all()[0], &users.all()[1], &users.all()[2]);
        shares.advance(MIN_TURN_US);
        let mut of_a = s
            .next_job_for(0, WorkerCache::default(), &seat(a, 0))
            .unwrap_err();
        let mut fresh = s
            .next_job_for(1, WorkerCache::default(), &Seat::default())
            .unwrap_err();
        let mut of_b = s
            .next_job_for(2, WorkerCache::default(), &seat(b, 0))
            .unwrap_err();
        assert_eq!(
            of_a.kept_for(),
            Some(GRACE),
            "a's turn is long enough, but its next job may be on its way"
        );
        let (jb, _r1) = job_of(&cc, b"Nb", b, "192.0.2.1");
        let (ja, _r2) = job_of(&cc, b"Na", a, "192.0.2.1");
        let (jc, _r3) = job_of(&cc, b"Nc", c, "192.0.2.1");
        let (jc2, _r4) = job_of(&cc, b"Nc2", c, "192.0.2.1");
        s.submit(jb);
        s.submit(ja);
        s.submit(jc);
        assert_eq!(of_b.job().await.unwrap().0.user.name, "b");
        assert_eq!(of_a.job().await.unwrap().0.user.name, "a");
        assert_eq!(fresh.job().await.unwrap().0.user.name, "c", "the fresh one");
        // No worker left: queued.
        s.submit(jc2);
        assert_eq!(s.queued(), 1);
        // A worker of a, whose turn is long enough, with nothing of a
        // queued: once a's next job is not in within the grace, it goes to
        // c (its slot then replaces it).
        let mut w = s
            .next_job_for(0, WorkerCache::default(), &seat(a, 0))
            .unwrap_err();
        assert_eq!(w.kept_for(), Some(GRACE));
        assert_eq!(s.queued(), 1);
        shares.advance(GRACE_US);
        assert_eq!(s.turn_over(0), None);
        assert_eq!(w.job().await.unwrap().0.user.name, "c");
    }

    #[tokio::test]
    async fn a_worker_is_kept_for_its_user_for_a_turn_before_it_goes_to_another() {
        let (users, shares, s) = shared("[a]\nsecret = a\n[b]\nsecret = b\n", true);
        let c = PackageCache::new(1 << 20);
        let (a, b) = (&users.all()[0], &users.all()[1]);
        let since = shares.now();
        let mut w = s
            .next_job_for(0, WorkerCache::default(), &seat(a, since))
            .unwrap_err();
        assert_eq!(w.kept_for(), Some(MIN_TURN), "a's turn has just begun");
        let (jb, _rb) = job_of(&c, b"Nb", b, "192.0.2.1");
        s.submit(jb);
        assert_eq!(
            s.queued(),
            1,
            "not handed over yet: a may send its next job"
        );
        shares.advance(MIN_TURN_US / 2);
        assert_eq!(s.turn_over(0), Some(MIN_TURN / 2), "still kept");
        assert_eq!(s.queued(), 1);
        // a's next job comes in time: its worker takes it.
        let (ja, _ra) = job_of(&c, b"Na", a, "192.0.2.1");
        s.submit(ja);
        let (got, cache) = w.job().await.unwrap();
        assert_eq!(got.user.name, "a");
        // Done; nothing more of a: past its turn and the grace for a's
        // next job, b's job goes to it.
        shares.advance(MIN_TURN_US);
        drop(got);
        let mut w = s.next_job_for(0, cache, &seat(a, since)).unwrap_err();
        assert_eq!(w.kept_for(), Some(GRACE));
        shares.advance(GRACE_US);
        assert_eq!(s.turn_over(0), None);
        assert_eq!(w.job().await.unwrap().0.user.name, "b");
    }

    #[tokio::test]
    async fn a_worker_keeps_its_user_within_the_slack_and_is_handed_over_past_it() {
        let (users, shares, s) = shared("[a]\nsecret = a\n[b]\nsecret = b\n", true);
        let c = PackageCache::new(1 << 20);
        let (a, b) = (&users.all()[0], &users.all()[1]);
        let mut replies = Vec::new();
        for _ in 0..3 {
            for user in [a, b] {
                let (j, r) = job_of(&c, b"Nf", user, "192.0.2.1");
                replies.push(r);
                s.submit(j);
            }
        }
        // a runs a job for a little less than the slack: it keeps its
        // worker, though b is now the fairest.
        let (j, cache) = s
            .next_job_for(0, WorkerCache::default(), &seat(a, 0))
            .unwrap();
        assert_eq!(j.user.name, "a");
        shares.advance(crate::jobs::shares::SLACK / 2);
        drop(j);
        let (j, cache) = s.next_job_for(0, cache, &seat(a, 0)).unwrap();
        assert_eq!(j.user.name, "a", "within the slack, past its turn");
        // Then a job long past it: the worker goes to b.
        shares.advance(2 * crate::jobs::shares::SLACK);
        drop(j);
        let (j, _) = s.next_job_for(0, cache, &seat(a, 0)).unwrap();
        assert_eq!(j.user.name, "b");
    }

    #[tokio::test]
    async fn workers_kept_to_users_still_share_by_weight() {
        let (users, shares, s) = shared("[a]\nsecret = a\nweight = 3\n[b]\nsecret = b\n", true);
        let c = PackageCache::new(1 << 20);
        let mut replies = Vec::new();
        for _ in 0..200 {
            for user in 0..2 {
                let (j, r) = job_of(&c, b"Nf", &users.all()[user], "192.0.2.1");
                replies.push(r);
                s.submit(j);
            }
        }
        // Two slots, jobs of 200 ms, each slot's job ending in turn.
        let mut seats = [Seat::default(), Seat::default()];
        let mut running: [Option<Job>; 2] = [None, None];
        let (mut ran, mut switches) = ([0; 2], 0);
        for step in 0..80 {
            let slot = step % 2;
            drop(running[slot].take());
            let (j, _) = s
                .next_job_for(slot, WorkerCache::default(), &seats[slot])
                .unwrap();
            match &seats[slot].owner {
                Some(o) if o.index != j.user.index => switches += 1,
                _ => {}
            }
            if seats[slot].owner.as_ref().map(|o| o.index) != Some(j.user.index) {
                seats[slot] = s.turn_for(j.user.clone());
            }
            ran[j.user.index] += 1;
            running[slot] = Some(j);
            shares.advance(100_000);
        }
        assert_eq!(ran, [60, 20], "3:1");
        // b's share is half a worker: a slot goes to it and back, at most
        // one switch for each of b's jobs.
        assert!(switches <= ran[1], "{switches} switches");
    }
}
