//! What each user is owed and allowed when several share the server:
//! fair shares of worker time in proportion to the users' weights, the
//! `max_workers` cap, and the `max_queued` places a session takes before
//! it reads a job. The scheduler ([`crate::jobs::scheduler`]) asks this
//! ledger which user comes next; it does the queueing and the workers.
//!
//! **Fair share by worker time.** Each user has an account of the worker
//! time its jobs have used: a job costs the time from being handed to a
//! worker until it is done, plus [`START_CHARGE`] (so that tiny jobs,
//! which cost next to nothing in time, are shared by count, and workers
//! freed at the same moment do not all go to the same user). A running
//! job is charged as it runs, so a user with long jobs is seen using
//! the workers it holds, not only once they end. A user's *virtual time*
//! is its used time divided by its weight; the next free worker serves the
//! user with queued jobs whose virtual time is lowest, so over time each
//! gets worker time in proportion to its weight (3:1 weights, 3:1 worker
//! time), however many workers there are and however long the jobs. Ties
//! go to the user that began waiting first.
//!
//! A user that had nothing queued starts again no lower than the virtual
//! time of the last user served (the *floor*): time it did not use while
//! away is not banked, so coming back it does not take every worker until
//! it has caught up; one that used more than its share keeps that debt.
//!
//! **Limits.** A user at its `max_workers` is skipped by free workers
//! until one of its jobs ends; a release that makes it eligible again
//! wakes idle workers ([`Shares::released`]), so a queued job never waits
//! for a worker that is idle. `max_queued` is a semaphore per user: a
//! session takes a place ([`Shares::queue_place`]) once a job's first
//! frame header is in and before reading the frame, and the place is
//! given back when the job leaves the queue (handed to a worker,
//! withdrawn, or refused), so past the limit the client's frames stay
//! unread, as with the memory budget.
//!
//! With one user and no `max_workers` nothing here is used: the scheduler
//! keeps today's path, with no clock read and no charge per job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::users::{User, Users};

/// What every job costs on top of its time, in µs: about what handing it
/// to a worker and its result back costs. Makes tiny jobs shared by count.
pub(crate) const START_CHARGE: u64 = 1_000;

/// How far, in µs of weight-1 worker time, a worker's user may be ahead
/// of the fairest choice and still keep the worker (with `--isolate user`,
/// where giving a worker to another user means replacing it): switches
/// stay rare, and the shares are off by at most this much per worker.
pub(crate) const SLACK: u64 = 250_000;

/// The shortest turn a worker serves one user for under `--isolate user`
/// before it is handed to another: a fresh worker costs ~7 ms by fork, so
/// turns of this length cost a few percent of the worker at most.
pub(crate) const MIN_TURN: Duration = Duration::from_millis(100);

/// How long an idle worker kept to one user waits for that user's next
/// job before it goes to another user (`--isolate user`): a pp client
/// sends a connection's next job once the last is answered, so a user
/// busy with as many jobs as it has workers has none queued for a moment
/// after each; a switch costs more than waiting this long.
pub(crate) const GRACE: Duration = Duration::from_millis(10);

/// Virtual time units per µs of worker time at weight 1: weights go up to
/// 1000, so a thousandth keeps integer virtual times exact enough.
const SCALE: u128 = 1000;

/// The scheduler's time: µs since it was made. Tests set it by hand.
#[derive(Debug)]
pub(crate) enum Clock {
    /// The machine's monotonic clock.
    Real(Instant),
    /// A clock only a test moves.
    #[cfg(test)]
    Manual(AtomicU64),
}

impl Clock {
    /// µs since the clock began.
    pub(crate) fn now(&self) -> u64 {
        match self {
            Clock::Real(epoch) => epoch.elapsed().as_micros() as u64,
            #[cfg(test)]
            Clock::Manual(us) => us.load(Ordering::Relaxed),
        }
    }
}

/// One user's use of the workers.
#[derive(Debug, Default, Clone)]
struct Account {
    /// Share of the workers against other users (`weight`).
    weight: u64,
    /// `max_workers`.
    max_workers: Option<usize>,
    /// Jobs handed to workers and not done yet.
    running: usize,
    /// Worker time of its jobs done, plus [`START_CHARGE`] for every job
    /// handed out, in µs.
    used: u64,
    /// The sum of the hand-out times of its running jobs, so that their
    /// time so far is `running * now - started`.
    started: u64,
}

impl Account {
    /// Its virtual time at `now`: used time over weight.
    fn vtime(&self, now: u64) -> u128 {
        let live = (self.running as u128 * now as u128).saturating_sub(self.started as u128);
        (self.used as u128 + live) * SCALE / self.weight.max(1) as u128
    }
}

/// Every user's account, and the floor a returning user starts from.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    accounts: Vec<Account>,
    /// The virtual time of the last user picked.
    floor: u128,
}

impl Ledger {
    fn account(&mut self, user: usize) -> &mut Account {
        if user >= self.accounts.len() {
            // Only users the ledger was made for come here; one it does
            // not know runs unlimited, at weight 1, rather than panicking.
            self.accounts.resize(
                user + 1,
                Account {
                    weight: 1,
                    ..Account::default()
                },
            );
        }
        &mut self.accounts[user]
    }

    /// Whether `user` may have one more job running (`max_workers`).
    pub(crate) fn eligible(&self, user: usize) -> bool {
        self.accounts
            .get(user)
            .is_none_or(|a| a.max_workers.is_none_or(|max| a.running < max))
    }

    /// `user`'s virtual time at `now`.
    pub(crate) fn vtime(&self, user: usize, now: u64) -> u128 {
        self.accounts.get(user).map_or(0, |a| a.vtime(now))
    }

    /// Whether `user`, which holds a worker, is still within [`SLACK`] of
    /// `fairest`'s virtual time.
    pub(crate) fn within_slack(&self, user: usize, fairest: usize, now: u64) -> bool {
        self.vtime(user, now) <= self.vtime(fairest, now) + SLACK as u128 * SCALE
    }

    /// `user` has queued jobs again after having none: it starts from no
    /// lower than the floor.
    pub(crate) fn rejoin(&mut self, user: usize, now: u64) {
        let floor = self.floor;
        let account = self.account(user);
        let vtime = account.vtime(now);
        if vtime < floor {
            let lift = (floor - vtime) * account.weight.max(1) as u128 / SCALE + 1;
            account.used = account
                .used
                .saturating_add(u64::try_from(lift).unwrap_or(u64::MAX));
        }
    }

    /// The user among `candidates` (users with queued jobs, in the order
    /// they began waiting) the next free worker serves: an eligible one
    /// with the lowest virtual time, the first on a tie.
    pub(crate) fn pick(&self, candidates: &[usize], now: u64) -> Option<usize> {
        let mut best: Option<(u128, usize)> = None;
        for &user in candidates {
            if !self.eligible(user) {
                continue;
            }
            let vtime = self.vtime(user, now);
            if best.is_none_or(|(b, _)| vtime < b) {
                best = Some((vtime, user));
            }
        }
        best.map(|(_, user)| user)
    }

    /// Counts a job of `user` handed to a worker at `now`.
    fn start(&mut self, user: usize, now: u64) {
        let vtime = self.vtime(user, now);
        self.floor = self.floor.max(vtime);
        let account = self.account(user);
        account.running += 1;
        account.started = account.started.saturating_add(now);
        account.used = account.used.saturating_add(START_CHARGE);
    }

    /// Counts a job of `user` handed out at `start` as done at `now`;
    /// returns whether that made a capped user eligible again.
    fn end(&mut self, user: usize, start: u64, now: u64) -> bool {
        let account = self.account(user);
        let was_capped = account
            .max_workers
            .is_some_and(|max| account.running >= max);
        account.running = account.running.saturating_sub(1);
        account.started = account.started.saturating_sub(start);
        account.used = account.used.saturating_add(now.saturating_sub(start));
        was_capped && account.max_workers.is_some_and(|max| account.running < max)
    }

    /// Undoes [`Ledger::start`]: the job never reached a worker.
    fn unstart(&mut self, user: usize, start: u64) {
        let account = self.account(user);
        account.running = account.running.saturating_sub(1);
        account.started = account.started.saturating_sub(start);
        account.used = account.used.saturating_sub(START_CHARGE);
    }

    /// Jobs of `user` running now.
    #[cfg(test)]
    pub(crate) fn running(&self, user: usize) -> usize {
        self.accounts.get(user).map_or(0, |a| a.running)
    }
}

/// The accounts of every user, the clock they are kept by, and each
/// user's `max_queued` places.
#[derive(Debug)]
pub(crate) struct Shares {
    /// Guarded apart from the scheduler's queues, so that a job ending
    /// ([`Charge`]'s drop) takes this lock alone. Lock order: the
    /// scheduler's state first, then this.
    ledger: Mutex<Ledger>,
    /// The time jobs are charged by.
    clock: Clock,
    /// Per user, by index: the places for its waiting jobs, if it has a
    /// `max_queued`.
    places: Vec<Option<Arc<Semaphore>>>,
    /// Woken when a job of a user at its `max_workers` ends, for the idle
    /// workers: that user's queued jobs may go now.
    released: Notify,
    /// How many such releases there were, so an idle worker that
    /// registers just before one does not miss it.
    releases: AtomicU64,
}

impl Shares {
    /// The accounts of `users`, by the real clock.
    pub(crate) fn new(users: &Users) -> Arc<Shares> {
        Arc::new(Self::with_clock(users, Clock::Real(Instant::now())))
    }

    /// The accounts of `users`, by `clock`.
    pub(crate) fn with_clock(users: &Users, clock: Clock) -> Shares {
        let accounts = users
            .all()
            .iter()
            .map(|u| Account {
                weight: u64::from(u.weight.max(1)),
                max_workers: u.max_workers,
                ..Account::default()
            })
            .collect();
        Shares {
            ledger: Mutex::new(Ledger { accounts, floor: 0 }),
            clock,
            places: users
                .all()
                .iter()
                .map(|u| u.max_queued.map(|n| Arc::new(Semaphore::new(n))))
                .collect(),
            released: Notify::new(),
            releases: AtomicU64::new(0),
        }
    }

    /// The ledger, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Ledger> {
        // Every update is a few counter moves that do not panic.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// µs by the ledger's clock.
    pub(crate) fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Moves a test's clock on by `us`.
    #[cfg(test)]
    pub(crate) fn advance(&self, us: u64) {
        if let Clock::Manual(now) = &self.clock {
            now.fetch_add(us, Ordering::Relaxed);
        }
    }

    /// Counts a job of `user` as handed to a worker now, in `ledger` (this
    /// ledger's, locked); the charge ends the count when dropped.
    pub(crate) fn charge(self: &Arc<Self>, ledger: &mut Ledger, user: usize, now: u64) -> Charge {
        ledger.start(user, now);
        Charge {
            shares: Some(self.clone()),
            user,
            start: now,
        }
    }

    /// A place among `user`'s waiting jobs, waiting for one if it has
    /// `max_queued` of them waiting already; at once (`None`) without a
    /// limit.
    pub(crate) async fn queue_place(&self, user: &User) -> Option<QueuePlace> {
        let places = self.places.get(user.index)?.as_ref()?.clone();
        // The semaphore is never closed.
        places.acquire_owned().await.ok().map(QueuePlace)
    }

    /// Whether any user has a `max_queued`.
    pub(crate) fn limits_queues(&self) -> bool {
        self.places.iter().any(Option::is_some)
    }

    /// The count of releases so far, for [`Shares::released_since`].
    pub(crate) fn releases(&self) -> u64 {
        self.releases.load(Ordering::Acquire)
    }

    /// Completes once a job of a capped user has ended after the count
    /// `seen` was taken ([`Shares::releases`]).
    pub(crate) async fn released_since(&self, seen: u64) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.releases() != seen {
                return;
            }
            released.await;
        }
    }
}

/// A job of one user counted as running, from being handed to a worker
/// until dropped (with the job, once it is done).
#[derive(Debug)]
pub(crate) struct Charge {
    /// `None` once given back by [`Charge::cancel`].
    shares: Option<Arc<Shares>>,
    /// Whose job.
    user: usize,
    /// When it was handed out.
    start: u64,
}

impl Charge {
    /// Counts the job's time from now on: it waited for a fresh worker
    /// (a switch to its user), which is not the user's worker time.
    pub(crate) fn restart(&mut self) {
        let Some(shares) = &self.shares else {
            return;
        };
        let now = shares.now();
        let mut ledger = shares.lock();
        let account = ledger.account(self.user);
        account.started = account
            .started
            .saturating_sub(self.start)
            .saturating_add(now);
        self.start = now;
    }

    /// Takes the count back, as if the job had never been handed out,
    /// with the ledger already locked: the hand-over failed.
    pub(crate) fn cancel(mut self, ledger: &mut Ledger) {
        if self.shares.take().is_some() {
            ledger.unstart(self.user, self.start);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let Some(shares) = self.shares.take() else {
            return;
        };
        let now = shares.now();
        let freed = shares.lock().end(self.user, self.start, now);
        if freed {
            shares.releases.fetch_add(1, Ordering::AcqRel);
            shares.released.notify_waiters();
        }
    }
}

/// One of a user's `max_queued` places, held by a job from before its
/// first frame is read until it leaves the queue.
#[derive(Debug)]
pub(crate) struct QueuePlace(#[allow(dead_code)] OwnedSemaphorePermit);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::users::{parse, Users};
    use std::path::Path;

    /// Users from a users file's text, and their ledger on a clock the
    /// test moves.
    pub(crate) fn shares_of(text: &str) -> (Users, Arc<Shares>) {
        let file = parse(Path::new("users"), text).unwrap();
        let users = Users::new(Some(&file), "", false).unwrap();
        let shares = Arc::new(Shares::with_clock(&users, Clock::Manual(AtomicU64::new(0))));
        (users, shares)
    }

    #[test]
    fn the_lowest_virtual_time_goes_first_and_weights_divide_it() {
        let (_, s) = shares_of("[a]\nsecret = a\nweight = 3\n[b]\nsecret = b\n");
        let mut charges = Vec::new();
        let mut counts = [0; 2];
        // One worker, jobs of 10 ms each, both users always waiting.
        for _ in 0..80 {
            let now = s.now();
            let mut l = s.lock();
            let user = l.pick(&[0, 1], now).unwrap();
            counts[user] += 1;
            charges.push(s.charge(&mut l, user, now));
            drop(l);
            s.advance(10_000);
            charges.clear();
        }
        assert_eq!(counts, [60, 20], "3:1");
    }

    #[test]
    fn running_jobs_count_as_they_run() {
        let (_, s) = shares_of("[a]\nsecret = a\n[b]\nsecret = b\n");
        let mut l = s.lock();
        let _long = s.charge(&mut l, 0, 0);
        let _short = s.charge(&mut l, 1, 0);
        drop(l);
        s.advance(5_000_000);
        let l = s.lock();
        assert!(l.vtime(0, s.now()) > 5_000_000 * SCALE);
        // Both ran as long: a tie, which goes to the first waiting.
        assert_eq!(l.pick(&[1, 0], s.now()), Some(1));
    }

    #[test]
    fn a_user_at_max_workers_is_skipped_until_a_job_ends() {
        let (_, s) = shares_of("[a]\nsecret = a\nmax_workers = 1\n[b]\nsecret = b\n");
        let mut l = s.lock();
        let first = s.charge(&mut l, 0, 0);
        assert!(!l.eligible(0));
        assert_eq!(l.pick(&[0, 1], 0), Some(1), "b, though a is lower");
        assert_eq!(l.pick(&[0], 0), None);
        drop(l);
        let seen = s.releases();
        drop(first);
        assert_ne!(s.releases(), seen, "a release wakes idle workers");
        assert!(s.lock().eligible(0));
    }

    #[test]
    fn a_returning_user_starts_from_the_floor_and_keeps_its_debt() {
        let (_, s) = shares_of("[a]\nsecret = a\n[b]\nsecret = b\n");
        // a runs alone for a second.
        let mut l = s.lock();
        let job = s.charge(&mut l, 0, 0);
        drop(l);
        s.advance(1_000_000);
        drop(job);
        let now = s.now();
        let mut l = s.lock();
        // Picked once more: the floor is a's time.
        let again = s.charge(&mut l, 0, now);
        // b comes: it does not get a second of credit.
        l.rejoin(1, now);
        assert!(l.vtime(1, now) >= l.vtime(0, now) - START_CHARGE as u128 * SCALE);
        assert!(l.within_slack(1, 0, now) && l.within_slack(0, 1, now));
        again.cancel(&mut l);
    }

    #[test]
    fn a_cancelled_charge_leaves_no_trace() {
        let (_, s) = shares_of("[a]\nsecret = a\nmax_workers = 1\n");
        let mut l = s.lock();
        let c = s.charge(&mut l, 0, 7);
        c.cancel(&mut l);
        assert_eq!(l.running(0), 0);
        assert_eq!(l.vtime(0, 100), 0);
    }

    #[tokio::test]
    async fn max_queued_places_wait_for_one_to_be_given_back() {
        let (users, s) = shares_of("[a]\nsecret = a\nmax_queued = 2\n[b]\nsecret = b\n");
        let a = &users.all()[0];
        let b = &users.all()[1];
        assert!(s.queue_place(b).await.is_none(), "no limit");
        let p1 = s.queue_place(a).await.unwrap();
        let _p2 = s.queue_place(a).await.unwrap();
        let third = s.queue_place(a);
        tokio::pin!(third);
        assert!(futures_poll_once(third.as_mut()).await.is_none());
        drop(p1);
        assert!(third.await.is_some());
    }

    /// Polls `f` once: `Some` if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
