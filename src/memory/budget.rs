//! The memory budget (`--memory-limit`): bytes held for client frames
//! being received, queued and running jobs, cached function packages and
//! results not yet written.
//!
//! A client frame's length is reserved when its header arrives; while the
//! budget cannot hold it, the session stops reading from that client (the
//! kernel's flow control makes the client wait) and waits its turn, first
//! come first served, with no `-k` clock running. Handshakes, STAT and
//! worker results are not held back: a result is counted ([`Budget::force`])
//! but never waits, so jobs always finish and give their memory back.
//!
//! No deadlock: reservations are all-or-nothing, so a waiting frame holds
//! nothing of its own; and memory is either *in flight* (a frame being
//! received, a job, a result: each is released without any waiter moving,
//! as clients send, workers answer and clients read or hit `-k`) or
//! *parked* (function packages that open connections may still refer to).
//! When nothing is in flight and the first waiter still does not fit, no
//! release can ever come, so it is let through beyond the limit; the
//! budget is overdrawn by at most one frame at a time, and only by
//! packages that open connections keep.
//!
//! **Shares between users.** With more than one user, each frame is
//! reserved for its user ([`Claim`]), and a user may hold in flight at
//! most its share of the limit: `limit * weight / (W + 1)`, where `W` is
//! the sum of the weights of the users holding memory in flight or
//! waiting for it (itself included), and the `+ 1` keeps room for one
//! more user of weight 1, who may come at any time. A user alone thus
//! takes at most half the budget (with weight 1), two users a third each,
//! and a user arriving when the budget is full of another's queued jobs
//! still finds room for its frames. A user holding nothing in flight may
//! always take one frame, however large (up to the whole budget), so a
//! share smaller than a frame slows a user down but never stops it. A
//! waiting frame of a user over its share does not hold up the frames of
//! other users behind it: the queue is first come, first served among
//! the frames whose users are within their shares. No deadlock: a user
//! over its share holds memory in flight, which its own jobs and frames
//! give back as they go on; among the rest, the rule above holds.
//!
//! Memory kept only in case it is useful again (spare mappings of large
//! frames, [`crate::memory::spares::Spares`]) is counted too, but never
//! makes anyone wait: it is kept only while the budget has room for it
//! and nobody waits ([`Budget::try_reserve`]), and whoever comes first in
//! the queue without room has it given back ([`Reclaim`]) before waiting,
//! and before being let through beyond the limit.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;

/// What a reservation is for, which decides whether releasing it depends
/// on anyone waiting for the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// Frames, jobs and results: released as the work goes on.
    InFlight,
    /// Memory not given back as work goes on: function packages kept for
    /// connections that may send `H` for them, and spare mappings (which
    /// are given back on demand, see [`Reclaim`]).
    Parked,
}

/// Holds memory in the budget only in case it is useful again, and gives
/// it back when asked: what a waiting frame makes room with first.
pub(crate) trait Reclaim: Send + Sync {
    /// Gives back everything held; returns how many bytes.
    fn reclaim(&self) -> usize;
}

/// The budget shared by every connection.
#[derive(Debug)]
pub(crate) struct Budget {
    /// `--memory-limit`, in bytes.
    limit: usize,
    /// Counters and the queue of waiters.
    state: Mutex<State>,
    /// Woken whenever memory is released, for the waiters.
    released: Notify,
    /// What gives memory back when a frame waits for room (the spare
    /// mappings); weak, since it holds reservations in this budget.
    reclaimer: Mutex<Option<Weak<dyn Reclaim>>>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes reserved, in flight and parked.
    used: usize,
    /// Bytes reserved for [`Use::InFlight`].
    in_flight: usize,
    /// The waiting reservations, first come first.
    queue: VecDeque<Waiter>,
    /// The next ticket number.
    next_ticket: u64,
    /// Each user's use, by index, once it has claimed memory.
    users: Vec<UserUse>,
    /// The sum of the weights of the users holding memory in flight or
    /// waiting for it.
    active_weight: u64,
}

/// Who a frame's memory is for, where the budget is shared between users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    /// The user's index.
    pub(crate) user: usize,
    /// The user's weight.
    pub(crate) weight: u32,
}

/// One user's use of the budget.
#[derive(Debug, Default, Clone)]
struct UserUse {
    /// Bytes it holds in flight.
    in_flight: usize,
    /// Its reservations waiting.
    waiting: usize,
}

impl UserUse {
    fn active(&self) -> bool {
        self.in_flight > 0 || self.waiting > 0
    }
}

/// A reservation waiting for room.
#[derive(Debug)]
struct Waiter {
    ticket: u64,
    claim: Option<Claim>,
    bytes: usize,
}

/// Bytes held against the budget until dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    /// Where to give the bytes back; `None` for [`Reservation::none`].
    budget: Option<Arc<Budget>>,
    /// How many.
    bytes: usize,
    /// What for.
    usage: Use,
    /// Whose share they count in, while in flight.
    claim: Option<Claim>,
}

impl State {
    /// Changes `claim`'s user's use by `change`, keeping the sum of the
    /// active users' weights.
    fn user_use(&mut self, claim: Claim, change: impl FnOnce(&mut UserUse)) {
        if claim.user >= self.users.len() {
            self.users.resize(claim.user + 1, UserUse::default());
        }
        let user = &mut self.users[claim.user];
        let was = user.active();
        change(user);
        let weight = u64::from(claim.weight);
        match (was, user.active()) {
            (false, true) => self.active_weight += weight,
            (true, false) => self.active_weight = self.active_weight.saturating_sub(weight),
            _ => {}
        }
    }

    /// Whether `claim`'s user may take `bytes` more within its share of
    /// `limit` (see the module documentation).
    fn within_share(&self, claim: Claim, bytes: usize, limit: usize) -> bool {
        let held = self.users.get(claim.user).map_or(0, |u| u.in_flight);
        if held == 0 {
            return true;
        }
        let share = limit as u128 * u128::from(claim.weight) / (u128::from(self.active_weight) + 1);
        (held as u128 + bytes as u128) <= share
    }

    /// The ticket of the first waiter whose user is within its share.
    fn first_eligible(&self, limit: usize) -> Option<u64> {
        self.queue
            .iter()
            .find(|w| w.claim.is_none_or(|c| self.within_share(c, w.bytes, limit)))
            .map(|w| w.ticket)
    }

    /// Takes `ticket` out of the queue.
    fn leave_queue(&mut self, ticket: u64) {
        if let Some(pos) = self.queue.iter().position(|w| w.ticket == ticket) {
            if let Some(w) = self.queue.remove(pos) {
                if let Some(claim) = w.claim {
                    self.user_use(claim, |u| u.waiting = u.waiting.saturating_sub(1));
                }
            }
        }
    }
}

impl Budget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            state: Mutex::default(),
            released: Notify::new(),
            reclaimer: Mutex::new(None),
        })
    }

    /// Names what gives memory back when a frame waits for room (one
    /// reclaimer per budget; a later one replaces it).
    pub(crate) fn set_reclaimer(&self, reclaimer: Weak<dyn Reclaim>) {
        *self.reclaimer.lock().unwrap_or_else(|e| e.into_inner()) = Some(reclaimer);
    }

    /// Has the reclaimer give back what it holds; returns how many bytes.
    /// Called without the budget's lock held: the memory given back is
    /// released through it.
    pub(crate) fn reclaim(&self) -> usize {
        let reclaimer = self
            .reclaimer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade);
        reclaimer.map_or(0, |r| r.reclaim())
    }

    /// The limit, in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub(crate) fn used(&self) -> usize {
        self.lock().used
    }

    /// Reservations waiting for room now.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether `bytes` more would fit now, without waiting.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        let st = self.lock();
        st.used.saturating_add(bytes) <= self.limit
    }

    /// Reserves `bytes`, waiting (first come, first served) until they fit;
    /// see the module documentation for when they are let through beyond
    /// the limit. Cancel-safe: a dropped wait leaves the queue.
    #[cfg(test)]
    pub(crate) async fn reserve(self: &Arc<Self>, bytes: usize, usage: Use) -> Reservation {
        self.reserve_for(bytes, usage, None).await
    }

    /// Reserves `bytes` for `claim`'s user (within its share, with more
    /// than one user), waiting (first come, first served among the users
    /// within their shares) until they fit; see the module documentation
    /// for when they are let through beyond the limit. Cancel-safe: a
    /// dropped wait leaves the queue.
    pub(crate) async fn reserve_for(
        self: &Arc<Self>,
        bytes: usize,
        usage: Use,
        claim: Option<Claim>,
    ) -> Reservation {
        let ticket = {
            let mut st = self.lock();
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            st.queue.push_back(Waiter {
                ticket,
                claim,
                bytes,
            });
            if let Some(claim) = claim {
                st.user_use(claim, |u| u.waiting += 1);
            }
            ticket
        };
        let mut queued = Queued {
            budget: self,
            ticket,
            done: false,
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let first = {
                let mut st = self.lock();
                let first = st.first_eligible(self.limit) == Some(ticket);
                if first && st.used.saturating_add(bytes) <= self.limit {
                    st.leave_queue(ticket);
                    queued.done = true;
                    return self.grant(&mut st, bytes, usage, claim);
                }
                first
            };
            if !first {
                released.await;
                continue;
            }
            // First in line and short of room: what is kept only in case
            // it is useful goes before anyone waits for it, and before the
            // budget is overdrawn.
            if self.reclaim() > 0 {
                continue;
            }
            {
                let mut st = self.lock();
                if st.in_flight == 0 {
                    st.leave_queue(ticket);
                    queued.done = true;
                    return self.grant(&mut st, bytes, usage, claim);
                }
            }
            released.await;
        }
    }

    /// Reserves `bytes` only if they fit now and nobody waits: for memory
    /// kept in case it is useful again, which must never hold anyone
    /// back.
    pub(crate) fn try_reserve(self: &Arc<Self>, bytes: usize, usage: Use) -> Option<Reservation> {
        let mut st = self.lock();
        let fits = st.used.saturating_add(bytes) <= self.limit;
        (fits && st.queue.is_empty()).then(|| self.grant(&mut st, bytes, usage, None))
    }

    /// Counts `bytes` without waiting: for worker results, which must never
    /// wait (jobs would stop finishing), and for tests.
    pub(crate) fn force(self: &Arc<Self>, bytes: usize, usage: Use) -> Reservation {
        let mut st = self.lock();
        self.grant(&mut st, bytes, usage, None)
    }

    fn grant(
        self: &Arc<Self>,
        st: &mut State,
        bytes: usize,
        usage: Use,
        claim: Option<Claim>,
    ) -> Reservation {
        st.used = st.used.saturating_add(bytes);
        let claim = claim.filter(|_| usage == Use::InFlight);
        if usage == Use::InFlight {
            st.in_flight = st.in_flight.saturating_add(bytes);
        }
        if let Some(claim) = claim {
            st.user_use(claim, |u| u.in_flight = u.in_flight.saturating_add(bytes));
        }
        // The next waiter may fit too.
        self.released.notify_waiters();
        Reservation {
            budget: Some(self.clone()),
            bytes,
            usage,
            claim,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters stay consistent: every update is one statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A waiter's place in the queue; leaves it if the wait is dropped.
struct Queued<'a> {
    budget: &'a Budget,
    ticket: u64,
    done: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.budget.lock();
            st.leave_queue(self.ticket);
            drop(st);
            self.budget.released.notify_waiters();
        }
    }
}

impl Reservation {
    /// Holds nothing: for jobs and packages built in tests.
    #[cfg(test)]
    pub(crate) fn none() -> Reservation {
        Reservation {
            budget: None,
            bytes: 0,
            usage: Use::InFlight,
            claim: None,
        }
    }

    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The same bytes, now held for `usage`: a package frame that was in
    /// flight is parked once it is cached.
    pub(crate) fn repurpose(mut self, usage: Use) -> Reservation {
        if let Some(budget) = &self.budget {
            if self.usage != usage {
                let mut st = budget.lock();
                match usage {
                    Use::Parked => st.in_flight = st.in_flight.saturating_sub(self.bytes),
                    Use::InFlight => st.in_flight = st.in_flight.saturating_add(self.bytes),
                }
                // Parked memory is nobody's: it leaves its user's share.
                if let Some(claim) = self.claim.take() {
                    let bytes = self.bytes;
                    st.user_use(claim, |u| u.in_flight = u.in_flight.saturating_sub(bytes));
                }
                drop(st);
                budget.released.notify_waiters();
            }
        }
        self.usage = usage;
        self
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(budget) = self.budget.take() else {
            return;
        };
        let mut st = budget.lock();
        st.used = st.used.saturating_sub(self.bytes);
        if self.usage == Use::InFlight {
            st.in_flight = st.in_flight.saturating_sub(self.bytes);
        }
        if let Some(claim) = self.claim.take() {
            let bytes = self.bytes;
            st.user_use(claim, |u| u.in_flight = u.in_flight.saturating_sub(bytes));
        }
        drop(st);
        budget.released.notify_waiters();
    }
}

/// Bytes for people: `512 MiB`, `11.7 GiB`.
pub(crate) fn human(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Default `--memory-limit`: half of the smaller of the machine's memory
/// and this process's cgroup limit; `None` if neither can be read.
pub(crate) fn default_limit() -> Option<usize> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_total(&m));
    let cgroup = cgroup_limit();
    let smaller = match (machine, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    smaller.map(|bytes| bytes / 2)
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`), if there is one.
fn cgroup_limit() -> Option<usize> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        if let Some(limit) = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
        {
            return Some(limit);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn stays_pending<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(20), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn waits_until_memory_is_released() {
        let b = Budget::new(100);
        let held = b.reserve(80, Use::InFlight).await;
        assert_eq!(b.used(), 80);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(30, Use::InFlight).await.bytes() }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "80 + 30 > 100: it waits");
        drop(held);
        assert_eq!(waiter.await.unwrap(), 30);
        assert_eq!(
            b.used(),
            0,
            "the waiter's reservation was dropped with its task"
        );
    }

    #[tokio::test]
    async fn first_come_first_served() {
        let b = Budget::new(100);
        let held = b.reserve(90, Use::InFlight).await;
        let big = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(60, Use::InFlight).await }
        });
        tokio::task::yield_now().await;
        // A small frame behind the big one waits too, so big frames are
        // never starved by a stream of small ones.
        assert!(stays_pending(b.reserve(5, Use::InFlight)).await);
        drop(held);
        let big = big.await.unwrap();
        assert_eq!(big.bytes(), 60);
        assert_eq!(b.reserve(5, Use::InFlight).await.bytes(), 5);
    }

    #[tokio::test]
    async fn only_parked_memory_lets_the_first_waiter_through() {
        // Packages of open connections fill the budget and nothing is in
        // flight: nothing will be released, so waiting would be forever.
        let b = Budget::new(100);
        let parked = b.reserve(100, Use::InFlight).await.repurpose(Use::Parked);
        let through = b.reserve(50, Use::InFlight).await;
        assert_eq!(b.used(), 150);
        // With that frame in flight, the next one waits for it.
        assert!(stays_pending(b.reserve(10, Use::InFlight)).await);
        drop(through);
        drop(parked);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_the_queue() {
        let b = Budget::new(10);
        let held = b.reserve(10, Use::InFlight).await;
        assert!(stays_pending(b.reserve(5, Use::InFlight)).await);
        drop(held);
        // The abandoned ticket must not block the next waiter.
        assert_eq!(b.reserve(5, Use::InFlight).await.bytes(), 5);
    }

    /// Memory kept in case it is useful: given back when asked.
    struct Kept(Mutex<Option<Reservation>>);

    impl Kept {
        fn holding(b: &Arc<Budget>, bytes: usize) -> Arc<Kept> {
            let kept = Arc::new(Kept(Mutex::new(b.try_reserve(bytes, Use::Parked))));
            let weak: Weak<dyn Reclaim> = Arc::downgrade(&kept) as Weak<Kept>;
            b.set_reclaimer(weak);
            kept
        }

        fn bytes(&self) -> usize {
            self.0.lock().unwrap().as_ref().map_or(0, |r| r.bytes)
        }
    }

    impl Reclaim for Kept {
        fn reclaim(&self) -> usize {
            let taken = self.0.lock().unwrap().take();
            taken.map_or(0, |r| r.bytes)
        }
    }

    #[tokio::test]
    async fn kept_memory_never_cuts_in() {
        let b = Budget::new(100);
        assert!(
            b.try_reserve(101, Use::Parked).is_none(),
            "beyond the limit"
        );
        let held = b.reserve(60, Use::InFlight).await;
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(50, Use::InFlight).await.bytes() }
        });
        while b.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(
            b.try_reserve(10, Use::Parked).is_none(),
            "room for it, but a frame waits"
        );
        drop(held);
        assert_eq!(waiter.await.unwrap(), 50);
        assert_eq!(b.try_reserve(10, Use::Parked).map(|r| r.bytes()), Some(10));
    }

    #[tokio::test]
    async fn a_waiting_frame_has_kept_memory_given_back_at_once() {
        let b = Budget::new(100);
        let kept = Kept::holding(&b, 80);
        let _job = b.reserve(10, Use::InFlight).await;
        assert_eq!(b.used(), 90);
        // Polled once: no waiting for a release that only asking brings.
        let reserve = b.reserve(50, Use::InFlight);
        tokio::pin!(reserve);
        let polled = std::future::poll_fn(|cx| {
            use std::future::Future;
            std::task::Poll::Ready(reserve.as_mut().poll(cx))
        })
        .await;
        assert!(matches!(polled, std::task::Poll::Ready(ref r) if r.bytes() == 50));
        assert_eq!(kept.bytes(), 0);
        assert_eq!(b.used(), 60);
    }

    #[tokio::test]
    async fn kept_memory_goes_before_the_budget_is_overdrawn() {
        // Nothing in flight: the waiter is let through beyond the limit,
        // but only once what is merely kept is gone.
        let b = Budget::new(100);
        let _packages = b.reserve(60, Use::InFlight).await.repurpose(Use::Parked);
        let kept = Kept::holding(&b, 40);
        let through = b.reserve(50, Use::InFlight).await;
        assert_eq!(kept.bytes(), 0);
        assert_eq!(b.used(), 110, "overdrawn by the frame alone");
        drop(through);
    }

    const A: Option<Claim> = Some(Claim { user: 0, weight: 1 });
    const B: Option<Claim> = Some(Claim { user: 1, weight: 1 });

    #[tokio::test]
    async fn a_user_alone_keeps_room_for_one_more() {
        let b = Budget::new(120);
        let _a1 = b.reserve_for(30, Use::InFlight, A).await;
        let _a2 = b.reserve_for(30, Use::InFlight, A).await;
        // Half the budget with one user of weight 1: 30 more would fit,
        // but not in a's share.
        assert!(stays_pending(b.reserve_for(30, Use::InFlight, A)).await);
        assert_eq!(b.used(), 60);
        // A user holding nothing may always take a frame.
        let big = b.reserve_for(60, Use::InFlight, B).await;
        assert_eq!(b.used(), 120);
        drop(big);
    }

    #[tokio::test]
    async fn a_user_over_its_share_does_not_hold_up_another_users_frame() {
        let b = Budget::new(120);
        let a1 = b.reserve_for(30, Use::InFlight, A).await;
        let _a2 = b.reserve_for(30, Use::InFlight, A).await;
        let a3 = tokio::spawn({
            let b = b.clone();
            async move { b.reserve_for(30, Use::InFlight, A).await }
        });
        while b.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // b's frame goes past a's waiting one.
        let b1 = b.reserve_for(30, Use::InFlight, B).await;
        // Three users' worth now (a, b, and room for one more): a holds
        // 60, over its share of 40, and waits though 30 would fit.
        drop(a1);
        assert!(
            stays_pending(async {
                while b.waiting() > 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await
        );
        // b leaves: a's share is half again, and it fits in it.
        drop(b1);
        let a3 = a3.await.unwrap();
        assert_eq!(a3.bytes(), 30);
        assert_eq!(b.used(), 60);
    }

    #[tokio::test]
    async fn a_package_parked_leaves_its_users_share() {
        let b = Budget::new(100);
        let package = b.reserve_for(50, Use::InFlight, A).await;
        assert!(stays_pending(b.reserve_for(10, Use::InFlight, A)).await);
        let _parked = package.repurpose(Use::Parked);
        assert_eq!(b.reserve_for(10, Use::InFlight, A).await.bytes(), 10);
    }

    #[test]
    fn forced_reservations_count_without_waiting() {
        let b = Budget::new(10);
        let r = b.force(25, Use::InFlight);
        assert_eq!(b.used(), 25);
        assert!(!b.fits(1));
        drop(r);
        assert!(b.fits(10));
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(512 << 20), "512 MiB");
        assert_eq!(human(12_566_528 * 1024 / 2 * 2), "12.0 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn meminfo_and_cgroup() {
        assert_eq!(
            mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24576000 * 1024)
        );
        assert_eq!(mem_total("nothing"), None);
        assert!(
            default_limit().is_some_and(|l| l > 0),
            "this machine has memory"
        );
    }
}
