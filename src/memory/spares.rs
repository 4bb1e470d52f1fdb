//! Mappings of dropped large frames kept for the next ones: fresh pages
//! cost their zeroing, the largest part of relaying a large frame once it
//! is no longer copied ([`crate::memory::mapped`]).
//!
//! A few are kept, and all unmapped once none has been taken or given
//! back for [`SPARE_GRACE`]: after a burst of large jobs the memory goes
//! back within a fraction of a second. They are client memory like any
//! other: each is counted in the memory budget while kept, kept only while
//! the budget has room for it and nobody waits for room, and the first
//! thing given back when a frame does wait ([`Reclaim`]). A spare taken
//! for a smaller frame gives back the tail the frame does not need at
//! once, so no mapping holds more than its frame's reservation counts
//! (rounded up to a page).

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::memory::budget::{Budget, Reclaim, Reservation, Use};
use crate::memory::mapping::Mapping;

/// At most this many mappings of dropped frames are kept for reuse...
const SPARE_COUNT: usize = 4;
/// ...holding at most this many bytes together (and no more than the
/// memory budget has room for), kept only while large frames keep
/// coming...
const SPARE_BYTES: usize = 64 << 20;
/// ...that is, until none has been taken or given back for this long:
/// longer than a client takes between a result and its next job's first
/// bytes, short enough that the memory goes back by the time anyone
/// looks after a burst of large jobs.
pub(crate) const SPARE_GRACE: Duration = Duration::from_millis(250);

/// Mappings of dropped frames kept for the next large frames of one
/// memory budget's clients, each counted in that budget while kept.
#[derive(Debug)]
pub(crate) struct Spares {
    /// Where the kept mappings are counted, and which asks for them back
    /// when a frame waits for room.
    budget: Arc<Budget>,
    /// The mappings, and when they were last used.
    state: Mutex<SpareState>,
}

/// What [`Spares`] keeps track of.
#[derive(Debug, Default)]
struct SpareState {
    /// Mappings of dropped frames that no pipe refers to, for reuse.
    kept: Vec<Spare>,
    /// When a spare was last taken or given back.
    last_use: Option<Instant>,
    /// A task is waiting to unmap the spares once they go unused for
    /// [`SPARE_GRACE`].
    trim_pending: bool,
}

/// One kept mapping.
#[derive(Debug)]
struct Spare {
    /// The memory; declared first, so it is unmapped before the budget
    /// hears that it is free.
    map: Mapping,
    /// Its bytes in the budget.
    _counted: Reservation,
}

impl Spares {
    /// Spares counted in `budget`, which gets them back when a frame waits
    /// for room.
    pub(crate) fn new(budget: &Arc<Budget>) -> Arc<Spares> {
        let spares = Arc::new(Spares {
            budget: budget.clone(),
            state: Mutex::default(),
        });
        let weak: Weak<dyn Reclaim> = Arc::downgrade(&spares) as Weak<Spares>;
        budget.set_reclaimer(weak);
        spares
    }

    fn lock(&self) -> MutexGuard<'_, SpareState> {
        // Every step under the lock is a push, a removal or a timestamp.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes kept now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.lock().kept.iter().map(|s| s.map.cap()).sum()
    }

    /// A spare for a frame of `len` bytes, if one is kept: no longer
    /// counted here (the frame's own reservation counts it), and holding
    /// no more than `len` bytes (rounded up to a page).
    pub(crate) fn take(&self, len: usize) -> Option<Mapping> {
        let Spare { mut map, _counted } = self.lock().take_spare(len, now())?;
        map.shrink_to(len);
        Some(map)
    }

    /// A frame's mapping comes back: kept for reuse when it may be written
    /// again (`reusable`), there is room among the spares and in the
    /// budget and nobody waits for room, and a runtime can unmap it later;
    /// else unmapped now. Makes sure a task unmaps the spares once they go
    /// unused.
    pub(crate) fn give_back(self: &Arc<Self>, map: Mapping, reusable: bool) {
        let now = now();
        let mut st = self.lock();
        // Under the spares' lock, so a frame that starts waiting and has
        // the spares given back meanwhile finds this one too.
        let unused = match now {
            Some(now) if reusable && st.has_room_for(map.cap()) => {
                match self.budget.try_reserve(map.cap(), Use::Parked) {
                    Some(counted) => {
                        st.keep(
                            Spare {
                                map,
                                _counted: counted,
                            },
                            now,
                        );
                        None
                    }
                    None => Some(map),
                }
            }
            _ => Some(map),
        };
        if !st.kept.is_empty() && !st.trim_pending {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                st.trim_pending = true;
                runtime.spawn(trim_spares(self.clone()));
            }
        }
        drop(st);
        drop(unused);
    }
}

impl Reclaim for Spares {
    fn reclaim(&self) -> usize {
        let kept = std::mem::take(&mut self.lock().kept);
        // Unmapped (and released in the budget) outside the lock.
        kept.iter().map(|s| s.map.cap()).sum()
    }
}

/// Unmaps the spares once none has been taken or given back for
/// [`SPARE_GRACE`].
async fn trim_spares(spares: Arc<Spares>) {
    // Should the runtime drop this task, the next release starts another.
    struct Cancelled<'a>(&'a Spares);
    impl Drop for Cancelled<'_> {
        fn drop(&mut self) {
            self.0.lock().trim_pending = false;
        }
    }
    let cancelled = Cancelled(&spares);
    loop {
        let due = {
            let mut st = spares.lock();
            let due = st.unused_spares(Instant::now());
            // In the same step as taking the spares, so a release that
            // keeps a spare right after starts a new task.
            st.trim_pending = due.is_err();
            due
        };
        match due {
            Ok(unused) => {
                std::mem::forget(cancelled);
                drop(unused);
                return;
            }
            Err(due) => tokio::time::sleep_until(due).await,
        }
    }
}

impl SpareState {
    /// The spare best suited to a frame of `len` bytes: the smallest that
    /// holds it whole, else the largest (it grows as needed).
    fn take_spare(&mut self, len: usize, now: Option<Instant>) -> Option<Spare> {
        let kept = &self.kept;
        let fits = (0..kept.len())
            .filter(|&i| kept[i].map.cap() >= len)
            .min_by_key(|&i| kept[i].map.cap());
        let pick = fits.or_else(|| (0..kept.len()).max_by_key(|&i| kept[i].map.cap()))?;
        self.last_use = now.or(self.last_use);
        Some(self.kept.swap_remove(pick))
    }

    /// Whether a mapping of `cap` bytes more stays within [`SPARE_COUNT`]
    /// and [`SPARE_BYTES`].
    fn has_room_for(&self, cap: usize) -> bool {
        let bytes: usize = self.kept.iter().map(|s| s.map.cap()).sum();
        self.kept.len() < SPARE_COUNT && bytes.saturating_add(cap) <= SPARE_BYTES
    }

    /// Keeps `spare`, given back at `now`.
    fn keep(&mut self, spare: Spare, now: Instant) {
        self.kept.push(spare);
        self.last_use = Some(now);
    }

    /// The spares, if none has been taken or given back for
    /// [`SPARE_GRACE`] at `now`; else when that will be.
    fn unused_spares(&mut self, now: Instant) -> Result<Vec<Spare>, Instant> {
        match self.last_use {
            Some(last) if last + SPARE_GRACE > now => Err(last + SPARE_GRACE),
            _ => Ok(std::mem::take(&mut self.kept)),
        }
    }
}

/// The time on the runtime's clock; `None` on a thread without a runtime,
/// where no task can unmap spares later, so none are kept.
fn now() -> Option<Instant> {
    tokio::runtime::Handle::try_current()
        .ok()
        .map(|_| Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// A spare of `cap` bytes counted in no budget.
    fn spare(cap: usize) -> Spare {
        Spare {
            map: Mapping::new(cap).unwrap(),
            _counted: Reservation::none(),
        }
    }

    #[test]
    fn spares_are_few_and_bounded() {
        let now = Instant::now();
        let mut st = SpareState::default();
        for _ in 0..SPARE_COUNT {
            assert!(st.has_room_for(MIB));
            st.keep(spare(MIB), now);
        }
        assert!(!st.has_room_for(MIB), "as many as may be kept");
        let mut st = SpareState::default();
        st.keep(spare(48 * MIB), now);
        assert!(!st.has_room_for(32 * MIB), "as many bytes as may be kept");
        assert!(st.has_room_for(16 * MIB));
    }

    #[test]
    fn the_best_fitting_spare_is_taken() {
        let now = Some(Instant::now());
        let mut st = SpareState::default();
        let (small, big) = (spare(4 * MIB), spare(16 * MIB));
        let (s, b) = (small.map.start(), big.map.start());
        st.keep(small, Instant::now());
        st.keep(big, Instant::now());
        let got = st.take_spare(8 * MIB, now).unwrap();
        assert_eq!(got.map.start(), b, "the smallest that holds it");
        st.keep(got, Instant::now());
        let got = st.take_spare(3 * MIB, now).unwrap();
        assert_eq!(got.map.start(), s);
        st.keep(got, Instant::now());
        let got = st.take_spare(64 * MIB, now).unwrap();
        assert_eq!(got.map.start(), b, "none holds it: the largest, to grow");
    }

    #[test]
    fn spares_go_back_once_unused_for_the_grace() {
        let t0 = Instant::now();
        let mut st = SpareState::default();
        st.keep(spare(MIB), t0);
        let half = t0 + SPARE_GRACE / 2;
        assert_eq!(st.unused_spares(half).unwrap_err(), t0 + SPARE_GRACE);
        // Taking one and giving it back is use: the grace starts again.
        let m = st.take_spare(MIB, Some(half)).unwrap();
        st.keep(m, half);
        let later = t0 + SPARE_GRACE;
        assert_eq!(st.unused_spares(later).unwrap_err(), half + SPARE_GRACE);
        assert_eq!(st.unused_spares(half + SPARE_GRACE).unwrap().len(), 1);
        assert!(st.kept.is_empty());
    }

    #[test]
    fn without_a_runtime_nothing_is_kept() {
        let budget = Budget::new(1 << 30);
        let spares = Spares::new(&budget);
        spares.give_back(Mapping::new(MIB).unwrap(), true);
        assert_eq!(spares.held(), 0, "no task could unmap it later");
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_kept_mapping_is_counted_in_the_budget() {
        let budget = Budget::new(1 << 30);
        let spares = Spares::new(&budget);
        spares.give_back(Mapping::new(3 * MIB).unwrap(), true);
        assert_eq!(spares.held(), 3 * MIB, "kept for the next frame");
        assert_eq!(budget.used(), 3 * MIB, "and counted");
        // Taken, it is counted by the frame's own reservation (which this
        // test does not make) from then on.
        let map = spares.take(3 * MIB).unwrap();
        assert_eq!(spares.held(), 0);
        assert_eq!(budget.used(), 0);
        spares.give_back(map, false);
        assert_eq!(budget.used(), 0, "not reusable: unmapped");
    }

    #[tokio::test]
    async fn a_mapping_is_kept_only_where_the_budget_has_room() {
        let budget = Budget::new(2 * MIB);
        let spares = Spares::new(&budget);
        spares.give_back(Mapping::new(3 * MIB).unwrap(), true);
        assert_eq!(spares.held(), 0, "more than the whole budget");
        assert_eq!(budget.used(), 0);
        // Nor while anyone waits for room, even room enough for both.
        let budget = Budget::new(8 * MIB);
        let spares = Spares::new(&budget);
        let hog = budget.force(6 * MIB, Use::InFlight);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(3 * MIB, Use::InFlight).await.bytes() }
        });
        while budget.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        spares.give_back(Mapping::new(MIB).unwrap(), true);
        assert_eq!(spares.held(), 0, "the waiting frame comes first");
        drop(hog);
        assert_eq!(waiting.await.unwrap(), 3 * MIB);
    }

    #[tokio::test]
    async fn a_frame_waiting_for_room_gets_the_spares_memory() {
        let budget = Budget::new(4 * MIB);
        let spares = Spares::new(&budget);
        spares.give_back(Mapping::new(3 * MIB).unwrap(), true);
        assert_eq!(budget.used(), 3 * MIB);
        // Polled once: the spare is given back then and there, with no
        // waiting for its grace to end.
        let reserve = budget.reserve(2 * MIB, Use::InFlight);
        tokio::pin!(reserve);
        let got = std::future::poll_fn(|cx| {
            use std::future::Future;
            std::task::Poll::Ready(reserve.as_mut().poll(cx))
        })
        .await;
        let std::task::Poll::Ready(got) = got else {
            panic!("the frame waits while a spare holds its room");
        };
        assert_eq!(got.bytes(), 2 * MIB);
        assert_eq!(spares.held(), 0);
        assert_eq!(budget.used(), 2 * MIB);
    }

    #[tokio::test]
    async fn a_larger_spare_keeps_only_what_the_frame_needs() {
        let budget = Budget::new(1 << 30);
        let spares = Spares::new(&budget);
        let big = Mapping::new(8 * MIB).unwrap();
        let start = big.start();
        spares.give_back(big, true);
        let map = spares.take(3 * MIB + 5).unwrap();
        assert_eq!(map.start(), start, "reused");
        let page = crate::memory::mapping::page_size();
        assert_eq!(map.cap(), 3 * MIB + page, "the tail is given back");
        spares.give_back(map, true);
        assert_eq!(budget.used(), 3 * MIB + page, "kept: what it holds");
    }
}
