//! Large frames in mappings of their own: read in with few page faults,
//! handed to a worker's pipe by `vmsplice` instead of being copied into
//! it, and given back to the system once no large frame is left.
//!
//! A frame of [`MAPPED_MIN`] bytes or more is read straight into an
//! anonymous mapping that grows (doubling) with the bytes that arrive, up
//! to the announced length, so a peer that announces much and sends little
//! costs little, as with the growing read buffer. Large mappings ask for
//! transparent huge pages (one fault per 2 MiB instead of per 4 KiB) and
//! are left out of forks (a worker being spawned does not copy the
//! server's page tables).
//!
//! `vmsplice` puts references to the frame's pages into the pipe instead of
//! copies of its bytes, which is only sound if those pages do not change
//! while the pipe may still hold them. A frame is never written once read;
//! its mapping is written again only if it is reused for a later frame,
//! and that happens only when every pipe it went into is known to have
//! been read empty since ([`drained`]); otherwise dropping the frame unmaps
//! it, and the kernel keeps the pages a pipe still refers to, unchanged,
//! until the pipe lets go. [`is_mapped`] tells such frames apart from heap
//! memory, which is reused at any time.
//!
//! Fresh pages cost their zeroing (the largest part of relaying a large
//! frame once it is no longer copied), so a few mappings of dropped frames
//! are kept for the next frames, and all unmapped once none has been taken
//! or given back for [`SPARE_GRACE`]: after a burst of large jobs the
//! memory goes back within a fraction of a second.

use std::io;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use nix::libc;
use tokio::net::unix::pipe;

/// Frames at least this large are read into a mapping of their own: below
/// it, the page faults and the `mmap`/`munmap` pair cost more than the
/// copy they save.
pub(crate) const MAPPED_MIN: usize = 1 << 20;

/// From this size on a mapping asks for transparent huge pages; mappings
/// grow in steps of it, so a mapping that moves as it grows keeps its huge
/// pages.
const HUGE_PAGE: usize = 2 << 20;

/// The first step of a fresh frame's mapping: a peer that announces a huge
/// frame and sends little gets little more than this, in address space
/// too.
const FIRST_STEP: usize = 4 << 20;

/// At most this many mappings of dropped frames are kept for reuse...
const SPARE_COUNT: usize = 4;
/// ...holding at most this many bytes together: memory outside the budget,
/// kept only while large frames keep coming...
const SPARE_BYTES: usize = 64 << 20;
/// ...that is, until none has been taken or given back for this long:
/// longer than a client takes between a result and its next job's first
/// bytes, short enough that the memory goes back by the time anyone
/// looks after a burst of large jobs.
pub(crate) const SPARE_GRACE: Duration = Duration::from_millis(250);

/// What the module keeps track of, process-wide: frames may be dropped on
/// any thread.
#[derive(Debug)]
struct State {
    /// The frozen frames' address ranges, for [`is_mapped`], and how many
    /// pipes may still hold references to their pages. A handful at most
    /// (one per large frame in flight), so a list.
    frozen: Vec<Frozen>,
    /// Mappings of dropped frames that no pipe refers to, for reuse.
    spare: Vec<Mapping>,
    /// When a spare was last taken or given back.
    last_use: Option<Instant>,
    /// A task is waiting to unmap the spares once they go unused for
    /// [`SPARE_GRACE`].
    trim_pending: bool,
}

/// One frozen frame, as [`State`] knows it.
#[derive(Debug)]
struct Frozen {
    /// Start of its mapping.
    start: usize,
    /// End of the frame's bytes.
    end: usize,
    /// Pipes it went into by reference that are not known to have been
    /// read empty since.
    in_pipes: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    frozen: Vec::new(),
    spare: Vec::new(),
    last_use: None,
    trim_pending: false,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    // Every step under the lock is a counter, a push or a removal.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// An anonymous private mapping, unmapped when dropped.
#[derive(Debug)]
struct Mapping {
    /// Start of the mapping.
    ptr: NonNull<u8>,
    /// Bytes mapped.
    cap: usize,
}

// SAFETY: the mapping is plain memory owned by this value alone.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A mapping of `cap` bytes, `None` if the system refuses one.
    fn new(cap: usize) -> Option<Mapping> {
        if cap == 0 {
            return None;
        }
        // SAFETY: a fresh anonymous mapping; no memory of ours is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return None;
        }
        let map = Mapping {
            ptr: NonNull::new(addr.cast::<u8>())?,
            cap,
        };
        map.advise();
        Some(map)
    }

    fn start(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Best effort, both: without them the mapping works the same, with
    /// more page faults and a copied page table per fork.
    fn advise(&self) {
        // SAFETY: advice on the range this value maps.
        unsafe {
            let addr = self.ptr.as_ptr().cast();
            if self.cap >= HUGE_PAGE {
                libc::madvise(addr, self.cap, libc::MADV_HUGEPAGE);
            }
            libc::madvise(addr, self.cap, libc::MADV_DONTFORK);
        }
    }

    /// Grows the mapping to `cap` bytes, keeping its contents; it may move
    /// (page tables move, bytes are not copied).
    fn grow(&mut self, cap: usize) -> io::Result<()> {
        // SAFETY: remaps the range this value owns; nothing else points
        // into it while `self` is borrowed mutably (a frame being filled
        // is not frozen, so no pipe refers to it).
        let addr = unsafe {
            libc::mremap(
                self.ptr.as_ptr().cast(),
                self.cap,
                cap,
                libc::MREMAP_MAYMOVE,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.ptr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| io::Error::other("mremap"))?;
        self.cap = cap;
        self.advise();
        Ok(())
    }

    /// The first `len` bytes.
    fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: `cap` bytes mapped and initialized (zero-filled by the
        // kernel, or written since); shared borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len.min(self.cap)) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably through `self` only.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range this value maps; nothing refers to it any more
        // (pages a pipe still holds stay alive in the kernel, unchanged).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.cap);
        }
    }
}

/// A frame being read into its own mapping, which grows (doubling) with
/// the bytes that arrive, up to the announced length.
#[derive(Debug)]
pub(crate) struct Filling {
    /// Where the payload goes; `None` only once frozen.
    map: Option<Mapping>,
    /// The payload's announced length.
    len: usize,
    /// Bytes of it received so far.
    filled: usize,
}

impl Filling {
    /// Room for the start of a payload of `len` bytes: a spare mapping if
    /// there is one, else a fresh one; `None` if no mapping can be had.
    pub(crate) fn new(len: usize) -> Option<Filling> {
        let spare = state().take_spare(len, now());
        let map = match spare {
            Some(map) => map,
            None => Mapping::new(len.min(FIRST_STEP))?,
        };
        Some(Filling {
            map: Some(map),
            len,
            filled: 0,
        })
    }

    fn map(&mut self) -> &mut Mapping {
        self.map
            .as_mut()
            .expect("a Filling has its mapping until frozen")
    }

    /// The payload's announced length.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes received so far: what the frame costs in memory until now.
    pub(crate) fn filled(&self) -> usize {
        self.filled
    }

    /// Where the next bytes go; empty once the frame is whole. Grows the
    /// mapping when it is full and more is to come.
    pub(crate) fn unfilled(&mut self) -> io::Result<&mut [u8]> {
        let (filled, len) = (self.filled, self.len);
        let map = self.map();
        if filled == map.cap && map.cap < len {
            let doubled = map.cap.saturating_mul(2).next_multiple_of(HUGE_PAGE);
            map.grow(doubled.min(len))?;
        }
        let end = len.min(map.cap);
        Ok(&mut map.as_mut_slice()[filled..end])
    }

    /// Counts `n` more bytes as received into [`Filling::unfilled`].
    pub(crate) fn advance(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.len);
    }

    /// Copies the start of the payload that was read before the mapping
    /// existed; returns how many bytes were taken.
    pub(crate) fn extend_from(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut taken = 0;
        while taken < bytes.len() && !self.is_full() {
            let dst = self.unfilled()?;
            let n = dst.len().min(bytes.len() - taken);
            dst[..n].copy_from_slice(&bytes[taken..taken + n]);
            self.advance(n);
            taken += n;
        }
        Ok(taken)
    }

    pub(crate) fn is_full(&self) -> bool {
        self.filled == self.len
    }

    /// The whole payload, read-only from now on: the mapping is released
    /// with the last clone of it.
    pub(crate) fn freeze(mut self) -> Bytes {
        debug_assert!(self.is_full());
        let map = self.map.take().expect("frozen once");
        let frame = Frame {
            len: self.filled,
            map: Some(map),
        };
        state().frozen.push(Frozen {
            start: frame.start(),
            end: frame.start() + frame.len,
            in_pipes: 0,
        });
        Bytes::from_owner(frame)
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            // Cut off: the mapping never reached a pipe.
            release(map, true);
        }
    }
}

/// A frozen frame: the owner behind its [`Bytes`].
#[derive(Debug)]
struct Frame {
    /// Bytes of the mapping that are the frame.
    len: usize,
    /// The memory; `None` only while being dropped.
    map: Option<Mapping>,
}

impl Frame {
    fn start(&self) -> usize {
        self.map.as_ref().map_or(0, Mapping::start)
    }
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], |m| m.bytes(self.len))
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else {
            return;
        };
        let unread = {
            let mut st = state();
            let start = map.start();
            let pos = st.frozen.iter().position(|f| f.start == start);
            pos.map(|i| st.frozen.swap_remove(i))
                .is_some_and(|f| f.in_pipes > 0)
        };
        release(map, !unread);
    }
}

/// The time on the runtime's clock; `None` on a thread without a runtime,
/// where no task can unmap spares later, so none are kept.
fn now() -> Option<Instant> {
    tokio::runtime::Handle::try_current()
        .ok()
        .map(|_| Instant::now())
}

/// Gives a dropped frame's mapping back (see [`State::release`]), and
/// makes sure a task unmaps the spares once they go unused. Unmapping
/// happens outside the lock.
fn release(map: Mapping, reusable: bool) {
    let now = now();
    let mut st = state();
    let unmap = st.release(map, reusable, now);
    if !st.spare.is_empty() && !st.trim_pending {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            st.trim_pending = true;
            runtime.spawn(trim_spares());
        }
    }
    drop(st);
    drop(unmap);
}

/// Unmaps the spares once none has been taken or given back for
/// [`SPARE_GRACE`].
async fn trim_spares() {
    // Should the runtime drop this task, the next release starts another.
    struct Cancelled;
    impl Drop for Cancelled {
        fn drop(&mut self) {
            state().trim_pending = false;
        }
    }
    let cancelled = Cancelled;
    loop {
        let due = {
            let mut st = state();
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

impl State {
    /// The spare best suited to a frame of `len` bytes: the smallest that
    /// holds it whole, else the largest (it grows as needed).
    fn take_spare(&mut self, len: usize, now: Option<Instant>) -> Option<Mapping> {
        let spare = &self.spare;
        let fits = (0..spare.len())
            .filter(|&i| spare[i].cap >= len)
            .min_by_key(|&i| spare[i].cap);
        let pick = fits.or_else(|| (0..spare.len()).max_by_key(|&i| spare[i].cap))?;
        self.last_use = now.or(self.last_use);
        Some(self.spare.swap_remove(pick))
    }

    /// The spares, if none has been taken or given back for
    /// [`SPARE_GRACE`] at `now`; else when that will be.
    fn unused_spares(&mut self, now: Instant) -> Result<Vec<Mapping>, Instant> {
        match self.last_use {
            Some(last) if last + SPARE_GRACE > now => Err(last + SPARE_GRACE),
            _ => Ok(std::mem::take(&mut self.spare)),
        }
    }

    /// A frame's mapping comes back: kept as a spare when it may be
    /// written again (`reusable`), there is room among the spares, and a
    /// runtime (`now`) can unmap it later. Returns the mappings to unmap.
    fn release(&mut self, map: Mapping, reusable: bool, now: Option<Instant>) -> Vec<Mapping> {
        let spare_bytes: usize = self.spare.iter().map(|m| m.cap).sum();
        match now {
            Some(now)
                if reusable
                    && self.spare.len() < SPARE_COUNT
                    && spare_bytes + map.cap <= SPARE_BYTES =>
            {
                self.spare.push(map);
                self.last_use = Some(now);
                Vec::new()
            }
            _ => vec![map],
        }
    }
}

/// Whether `bytes` lies within one frozen frame made here: memory that is
/// not written again while a pipe may refer to it, which [`vmsplice_all`]
/// may hand out.
pub(crate) fn is_mapped(bytes: &[u8]) -> bool {
    let start = bytes.as_ptr() as usize;
    let end = start.saturating_add(bytes.len());
    state()
        .frozen
        .iter()
        .any(|f| f.start <= start && end <= f.end)
}

/// Says that a pipe `bytes` went into by [`vmsplice_all`] has since been
/// read empty: it no longer refers to their pages. Only then may the
/// frame's mapping be reused once the frame is dropped.
pub(crate) fn drained(bytes: &[u8]) {
    let start = bytes.as_ptr() as usize;
    if let Some(f) = state()
        .frozen
        .iter_mut()
        .find(|f| f.start <= start && start < f.end)
    {
        f.in_pipes = f.in_pipes.saturating_sub(1);
    }
}

/// Puts `data` into the pipe by reference (`vmsplice`), waiting for room
/// as needed; `written` counts the bytes that went in, also when it fails
/// half-way. `data` must satisfy [`is_mapped`]; its frame's mapping is not
/// reused until [`drained`] says this pipe was read empty.
pub(crate) async fn vmsplice_all(
    pipe: &pipe::Sender,
    data: &[u8],
    written: &mut usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    {
        let start = data.as_ptr() as usize;
        let mut st = state();
        match st
            .frozen
            .iter_mut()
            .find(|f| f.start <= start && start < f.end)
        {
            Some(f) => f.in_pipes += 1,
            None => return Err(io::Error::other("vmsplice of memory not made here")),
        }
    }
    let mut rest = data;
    while !rest.is_empty() {
        let spliced = pipe.try_io(|| {
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: one iovec over `rest`, alive for the call; the pages
            // it names are not written again while the pipe may hold them
            // (see the module doc).
            let n = unsafe { libc::vmsplice(pipe.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match spliced {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                *written += n;
                rest = &rest[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => pipe.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn a_mapping_is_known_while_it_lives() {
        let len = 3 * MAPPED_MIN;
        let mut f = Filling::new(len).unwrap();
        assert_eq!(f.extend_from(&[7u8; 100]).unwrap(), 100);
        while !f.is_full() {
            let room = f.unfilled().unwrap();
            room.fill(9);
            let n = room.len();
            f.advance(n);
        }
        assert_eq!(f.filled(), len);
        let frame = f.freeze();
        assert_eq!(&frame[..101], &[&[7u8; 100][..], &[9]].concat()[..]);
        assert!(is_mapped(&frame));
        assert!(is_mapped(&frame[10..20]));
        let heap = vec![0u8; 10];
        assert!(!is_mapped(&heap));
    }

    const MIB: usize = 1 << 20;

    fn state() -> State {
        State {
            frozen: Vec::new(),
            spare: Vec::new(),
            last_use: None,
            trim_pending: false,
        }
    }

    #[test]
    fn a_reusable_mapping_is_kept_and_taken_again() {
        let now = Some(Instant::now());
        let mut st = state();
        let a = Mapping::new(4 * MIB).unwrap();
        let a_start = a.start();
        assert!(st.release(a, true, now).is_empty(), "kept");
        let again = st.take_spare(3 * MIB, now).expect("reused");
        assert_eq!(again.start(), a_start);
        assert_eq!(
            st.release(again, false, now).len(),
            1,
            "not reusable: unmapped"
        );
        assert!(st.spare.is_empty());
        let b = Mapping::new(MIB).unwrap();
        assert_eq!(
            st.release(b, true, None).len(),
            1,
            "no runtime to unmap it later"
        );
    }

    #[test]
    fn spares_are_few_and_bounded() {
        let now = Some(Instant::now());
        let mut st = state();
        for _ in 0..SPARE_COUNT {
            assert!(st.release(Mapping::new(MIB).unwrap(), true, now).is_empty());
        }
        assert_eq!(st.release(Mapping::new(MIB).unwrap(), true, now).len(), 1);
        let mut st = state();
        assert!(st
            .release(Mapping::new(48 * MIB).unwrap(), true, now)
            .is_empty());
        assert_eq!(
            st.release(Mapping::new(32 * MIB).unwrap(), true, now).len(),
            1
        );
    }

    #[test]
    fn the_best_fitting_spare_is_taken() {
        let now = Some(Instant::now());
        let mut st = state();
        let small = Mapping::new(4 * MIB).unwrap();
        let big = Mapping::new(16 * MIB).unwrap();
        let (s, b) = (small.start(), big.start());
        st.release(small, true, now);
        st.release(big, true, now);
        let got = st.take_spare(8 * MIB, now).unwrap();
        assert_eq!(got.start(), b, "the smallest that holds it");
        st.release(got, true, now);
        let got = st.take_spare(3 * MIB, now).unwrap();
        assert_eq!(got.start(), s);
        st.release(got, true, now);
        let got = st.take_spare(64 * MIB, now).unwrap();
        assert_eq!(got.start(), b, "none holds it: the largest, to grow");
    }

    #[test]
    fn spares_go_back_once_unused_for_the_grace() {
        let t0 = Instant::now();
        let mut st = state();
        st.release(Mapping::new(MIB).unwrap(), true, Some(t0));
        let half = t0 + SPARE_GRACE / 2;
        assert_eq!(st.unused_spares(half).unwrap_err(), t0 + SPARE_GRACE);
        // Taking one and giving it back is use: the grace starts again.
        let m = st.take_spare(MIB, Some(half)).unwrap();
        st.release(m, true, Some(half));
        let later = t0 + SPARE_GRACE;
        assert_eq!(st.unused_spares(later).unwrap_err(), half + SPARE_GRACE);
        assert_eq!(st.unused_spares(half + SPARE_GRACE).unwrap().len(), 1);
        assert!(st.spare.is_empty());
    }

    #[test]
    fn a_reused_mapping_shows_only_the_new_frame() {
        // Through the process-wide state: the first frame's mapping is
        // kept (other tests may take it; then this one just gets a fresh
        // mapping, which must look the same).
        let old = counting_frame(3 * MAPPED_MIN);
        drop(old);
        let mut f = Filling::new(MAPPED_MIN + 5).unwrap();
        while !f.is_full() {
            let room = f.unfilled().unwrap();
            room.fill(1);
            let n = room.len();
            f.advance(n);
        }
        let frame = f.freeze();
        assert_eq!(frame.len(), MAPPED_MIN + 5);
        assert!(frame.iter().all(|&b| b == 1));
        drop(frame);
    }

    fn counting_frame(len: usize) -> Bytes {
        let mut f = Filling::new(len).unwrap();
        while !f.is_full() {
            let at = f.filled();
            let room = f.unfilled().unwrap();
            for (i, b) in room.iter_mut().enumerate() {
                *b = ((at + i) % 251) as u8;
            }
            let n = room.len();
            f.advance(n);
        }
        f.freeze()
    }

    #[tokio::test]
    async fn vmspliced_bytes_arrive_whole() {
        let (tx, mut rx) = pipe::pipe().unwrap();
        let len = 3 * MAPPED_MIN + 123;
        let frame = counting_frame(len);
        let expect = frame.to_vec();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut written = 0;
        // Far more than the pipe holds: the writer waits for the reader.
        vmsplice_all(&tx, &frame, &mut written).await.unwrap();
        assert_eq!(written, len);
        drop(tx);
        assert!(reader.await.unwrap() == expect);
    }

    fn in_pipes(frame: &[u8]) -> Option<usize> {
        let start = frame.as_ptr() as usize;
        let st = super::state();
        let found = st.frozen.iter().find(|f| f.start == start);
        found.map(|f| f.in_pipes)
    }

    #[tokio::test]
    async fn a_spliced_frame_is_reusable_only_once_drained() {
        let (tx, mut rx) = pipe::pipe().unwrap();
        let frame = counting_frame(MAPPED_MIN);
        assert_eq!(in_pipes(&frame), Some(0));
        let mut written = 0;
        vmsplice_all(&tx, &frame[..4096], &mut written)
            .await
            .unwrap();
        vmsplice_all(&tx, &frame[4096..8192], &mut written)
            .await
            .unwrap();
        assert_eq!(
            in_pipes(&frame),
            Some(2),
            "two pipes (or sends) may hold it"
        );
        let mut got = [0u8; 8192];
        rx.read_exact(&mut got).await.unwrap();
        drained(&frame);
        assert_eq!(in_pipes(&frame), Some(1), "one is still unaccounted for");
        drained(&frame);
        assert_eq!(in_pipes(&frame), Some(0));
        assert!(got[..] == frame[..8192]);
    }

    #[tokio::test]
    async fn vmspliced_bytes_outlive_their_mapping() {
        let (tx, mut rx) = pipe::pipe().unwrap();
        let frame = counting_frame(MAPPED_MIN);
        // Within the pipe's default 64 KiB: all of it goes in at once.
        let part = frame.slice(..32 * 1024);
        let expect = part.to_vec();
        let mut written = 0;
        vmsplice_all(&tx, &part, &mut written).await.unwrap();
        drop((part, frame));
        // A new mapping may take the same addresses; the pipe still has
        // the old pages, unchanged.
        let mut other = Filling::new(MAPPED_MIN).unwrap();
        other.unfilled().unwrap().fill(0xaa);
        drop(tx);
        let mut got = Vec::new();
        rx.read_to_end(&mut got).await.unwrap();
        assert!(got == expect);
    }
}
