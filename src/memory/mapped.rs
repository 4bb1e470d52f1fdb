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
//! and that happens only when no pipe can still hold its pages. Each
//! splice counts the frame as in one more pipe and hands back a
//! [`Spliced`] token; only that token uncounts it, once its pipe is known
//! to have been read empty ([`Spliced::drained`]). A token dropped instead
//! (the pipe's state is unknown: its reader died, the send was cut short)
//! leaves the frame counted, and dropping the frame then unmaps it: the
//! kernel keeps the pages a pipe still refers to, unchanged, until the
//! pipe lets go. [`is_mapped`] tells such frames apart from heap memory,
//! which is reused at any time.
//!
//! A frame's mapping comes from its connection's [`Spares`] if one is
//! kept there, and goes back there once the frame is dropped (unless a
//! pipe may still hold its pages): a client's large frames are counted in
//! the memory budget from their header to the end of their spare's grace.
//! Frames read with no spares (a worker's results) get fresh mappings,
//! unmapped with them.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use nix::libc;
use tokio::net::unix::pipe;

use crate::memory::mapping::{Mapping, HUGE_PAGE};
use crate::memory::spares::Spares;

/// Frames at least this large are read into a mapping of their own: below
/// it, the page faults and the `mmap`/`munmap` pair cost more than the
/// copy they save.
pub(crate) const MAPPED_MIN: usize = 1 << 20;

/// The first step of a fresh frame's mapping: a peer that announces a huge
/// frame and sends little gets little more than this, in address space
/// too.
const FIRST_STEP: usize = 4 << 20;

/// The frozen frames of the process, whichever budget they are counted
/// in: a frame may be dropped on any thread, and a worker checks the
/// arguments it sends ([`is_mapped`]) without knowing where they came
/// from.
#[derive(Debug)]
struct Registry {
    /// A handful at most (one per large frame in flight), so a list.
    frozen: Vec<Frozen>,
    /// The number the next frozen frame gets.
    next_id: u64,
}

/// One frozen frame, as the [`Registry`] knows it.
#[derive(Debug)]
struct Frozen {
    /// Its number, which [`Spliced`] tokens name it by: an address may be
    /// taken by a later frame once this one is gone, a number is not.
    id: u64,
    /// Start of its mapping.
    start: usize,
    /// End of the frame's bytes.
    end: usize,
    /// Splices of it into pipes not known to have been read empty since:
    /// the [`Spliced`] tokens not yet drained.
    in_pipes: usize,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    frozen: Vec::new(),
    next_id: 0,
});

fn registry() -> MutexGuard<'static, Registry> {
    // Every step under the lock is a counter, a push or a removal.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// The frozen frame `bytes` starts in.
    fn containing(&mut self, bytes: &[u8]) -> Option<&mut Frozen> {
        let start = bytes.as_ptr() as usize;
        self.frozen
            .iter_mut()
            .find(|f| f.start <= start && start < f.end)
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
    /// Where the mapping goes back once the frame is dropped or cut off;
    /// `None`: it is unmapped then.
    spares: Option<Arc<Spares>>,
}

impl Filling {
    /// Room for the start of a payload of `len` bytes: one of `spares` if
    /// there is one, else a fresh mapping; `None` if no mapping can be
    /// had. The mapping goes back to `spares` once the frame is dropped.
    pub(crate) fn new(len: usize, spares: Option<&Arc<Spares>>) -> Option<Filling> {
        let map = match spares.and_then(|s| s.take(len)) {
            Some(map) => map,
            None => Mapping::new(len.min(FIRST_STEP))?,
        };
        Some(Filling {
            map: Some(map),
            len,
            filled: 0,
            spares: spares.cloned(),
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
        if filled == map.cap() && map.cap() < len {
            let doubled = map.cap().saturating_mul(2).next_multiple_of(HUGE_PAGE);
            map.grow(doubled.min(len))?;
        }
        let end = len.min(map.cap());
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
        let start = map.start();
        let id = {
            let mut reg = registry();
            let id = reg.next_id;
            reg.next_id += 1;
            reg.frozen.push(Frozen {
                id,
                start,
                end: start + self.filled,
                in_pipes: 0,
            });
            id
        };
        Bytes::from_owner(Frame {
            len: self.filled,
            map: Some(map),
            id,
            spares: self.spares.take(),
        })
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            // Cut off: the mapping never reached a pipe.
            give_back(self.spares.as_ref(), map, true);
        }
    }
}

/// A mapping whose frame is gone goes back to `spares` if any (kept if
/// `reusable`), else it is unmapped.
fn give_back(spares: Option<&Arc<Spares>>, map: Mapping, reusable: bool) {
    match spares {
        Some(spares) => spares.give_back(map, reusable),
        None => drop(map),
    }
}

/// A frozen frame: the owner behind its [`Bytes`].
#[derive(Debug)]
struct Frame {
    /// Bytes of the mapping that are the frame.
    len: usize,
    /// The memory; `None` only while being dropped.
    map: Option<Mapping>,
    /// Its number in the [`Registry`].
    id: u64,
    /// Where the mapping goes back; `None`: it is unmapped.
    spares: Option<Arc<Spares>>,
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
        let in_pipes = {
            let mut reg = registry();
            let pos = reg.frozen.iter().position(|f| f.id == self.id);
            pos.map_or(0, |i| reg.frozen.swap_remove(i).in_pipes)
        };
        // A pipe may still hold its pages: never written again.
        give_back(self.spares.as_ref(), map, in_pipes == 0);
    }
}

/// Whether `bytes` lies within one frozen frame made here: memory that is
/// not written again while a pipe may refer to it, which [`vmsplice_all`]
/// may hand out.
pub(crate) fn is_mapped(bytes: &[u8]) -> bool {
    let start = bytes.as_ptr() as usize;
    let end = start.saturating_add(bytes.len());
    registry()
        .frozen
        .iter()
        .any(|f| f.start <= start && end <= f.end)
}

/// How many pipes may still hold the pages of the frame `bytes` lies in;
/// `None` if it lies in none.
#[cfg(test)]
pub(crate) fn pipes_holding(bytes: &[u8]) -> Option<usize> {
    registry().containing(bytes).map(|f| f.in_pipes)
}

/// One [`vmsplice_all`] of a frame into one pipe: while it lives, the
/// frame counts as in that pipe, and its mapping is never written again.
/// Only this token uncounts it ([`Spliced::drained`]), once the pipe is
/// known to have been read empty. Dropped instead (the pipe's state is
/// unknown: its reader died, the send was cut short), it leaves the frame
/// counted for good, and the frame's mapping is unmapped, never reused.
#[derive(Debug)]
#[must_use = "dropping the token keeps the frame counted as in a pipe for good"]
pub(crate) struct Spliced {
    /// The frame's number in the [`Registry`]: a token that outlives its
    /// frame finds nothing, where an address could name a later frame.
    frame: u64,
}

impl Spliced {
    /// Counts the frame `data` lies in as in one more pipe.
    fn count(data: &[u8]) -> io::Result<Spliced> {
        let mut reg = registry();
        match reg.containing(data) {
            Some(f) => {
                f.in_pipes += 1;
                Ok(Spliced { frame: f.id })
            }
            None => Err(io::Error::other("vmsplice of memory not made here")),
        }
    }

    /// Says that the pipe the frame went into has since been read empty:
    /// it no longer refers to the frame's pages.
    pub(crate) fn drained(self) {
        let mut reg = registry();
        if let Some(f) = reg.frozen.iter_mut().find(|f| f.id == self.frame) {
            f.in_pipes = f.in_pipes.saturating_sub(1);
        }
    }
}

/// Puts `data` into the pipe by reference (`vmsplice`), waiting for room
/// as needed; `written` counts the bytes that went in, also when it fails
/// half-way. `data` must satisfy [`is_mapped`]. The returned token keeps
/// its frame's mapping from being reused until it says the pipe was read
/// empty. On failure the frame stays counted for good if any of it went
/// in; if none did, the pipe holds none of it and it is uncounted.
pub(crate) async fn vmsplice_all(
    pipe: &pipe::Sender,
    data: &[u8],
    written: &mut usize,
) -> io::Result<Spliced> {
    use std::os::fd::AsRawFd;
    let spliced = Spliced::count(data)?;
    let mut rest = data;
    // Nothing of it went in: the pipe holds none of its pages.
    let failed = |spliced: Spliced, rest: &[u8], e: io::Error| -> io::Result<Spliced> {
        if rest.len() == data.len() {
            spliced.drained();
        }
        Err(e)
    };
    while !rest.is_empty() {
        let result = pipe.try_io(|| {
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
        match result {
            Ok(0) => return failed(spliced, rest, io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                *written += n;
                rest = &rest[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = pipe.writable().await {
                    return failed(spliced, rest, e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return failed(spliced, rest, e),
        }
    }
    Ok(spliced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::budget::Budget;
    use tokio::io::AsyncReadExt;

    #[test]
    fn a_mapping_is_known_while_it_lives() {
        let len = 3 * MAPPED_MIN;
        let mut f = Filling::new(len, None).unwrap();
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

    /// A frame of `len` bytes whose bytes say where they are, its mapping
    /// taken from and given back to `spares`.
    fn counting_frame(len: usize, spares: Option<&Arc<Spares>>) -> Bytes {
        let mut f = Filling::new(len, spares).unwrap();
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
    async fn a_reused_mapping_shows_only_the_new_frame() {
        // Spares of their own: no other test can take the mapping.
        let budget = Budget::new(1 << 30);
        let spares = Spares::new(&budget);
        let old = counting_frame(3 * MAPPED_MIN, Some(&spares));
        let old_start = old.as_ptr() as usize;
        drop(old);
        assert_eq!(spares.held(), 3 * MAPPED_MIN, "kept for reuse");
        assert_eq!(budget.used(), 3 * MAPPED_MIN, "and counted");
        let mut f = Filling::new(MAPPED_MIN + 5, Some(&spares)).unwrap();
        while !f.is_full() {
            let room = f.unfilled().unwrap();
            room.fill(1);
            let n = room.len();
            f.advance(n);
        }
        let frame = f.freeze();
        assert_eq!(frame.as_ptr() as usize, old_start, "the same mapping");
        assert_eq!(frame.len(), MAPPED_MIN + 5);
        assert!(frame.iter().all(|&b| b == 1), "none of the old frame");
        assert_eq!(
            budget.used(),
            0,
            "the frame's own reservation counts it now"
        );
        drop(frame);
        let kept = (MAPPED_MIN + 5).next_multiple_of(crate::memory::mapping::page_size());
        assert_eq!(spares.held(), kept, "the old frame's tail was given back");
        assert_eq!(budget.used(), kept);
    }

    #[tokio::test]
    async fn vmspliced_bytes_arrive_whole() {
        let (tx, mut rx) = pipe::pipe().unwrap();
        let len = 3 * MAPPED_MIN + 123;
        let frame = counting_frame(len, None);
        let expect = frame.to_vec();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut written = 0;
        // Far more than the pipe holds: the writer waits for the reader.
        let spliced = vmsplice_all(&tx, &frame, &mut written).await.unwrap();
        assert_eq!(written, len);
        drop(tx);
        assert!(reader.await.unwrap() == expect);
        spliced.drained();
    }

    #[tokio::test]
    async fn a_spliced_frame_is_reusable_only_once_drained() {
        let (tx, mut rx) = pipe::pipe().unwrap();
        let frame = counting_frame(MAPPED_MIN, None);
        assert_eq!(pipes_holding(&frame), Some(0));
        let mut written = 0;
        let first = vmsplice_all(&tx, &frame[..4096], &mut written)
            .await
            .unwrap();
        let second = vmsplice_all(&tx, &frame[4096..8192], &mut written)
            .await
            .unwrap();
        assert_eq!(
            pipes_holding(&frame),
            Some(2),
            "two pipes (or sends) may hold it"
        );
        let mut got = [0u8; 8192];
        rx.read_exact(&mut got).await.unwrap();
        first.drained();
        assert_eq!(
            pipes_holding(&frame),
            Some(1),
            "one is still unaccounted for"
        );
        second.drained();
        assert_eq!(pipes_holding(&frame), Some(0));
        assert!(got[..] == frame[..8192]);
    }

    #[tokio::test]
    async fn two_pipes_one_drained_the_mapping_is_not_reused() {
        let budget = Budget::new(1 << 30);
        let spares = Spares::new(&budget);
        let frame = counting_frame(MAPPED_MIN, Some(&spares));
        let (a, mut a_out) = pipe::pipe().unwrap();
        let (b, _b_out) = pipe::pipe().unwrap();
        let mut written = 0;
        let in_a = vmsplice_all(&a, &frame[..4096], &mut written)
            .await
            .unwrap();
        let in_b = vmsplice_all(&b, &frame[..4096], &mut written)
            .await
            .unwrap();
        let mut got = [0u8; 4096];
        a_out.read_exact(&mut got).await.unwrap();
        in_a.drained();
        assert_eq!(pipes_holding(&frame), Some(1), "b still holds its pages");
        // b's reader is never heard of again: its state is unknown.
        drop(in_b);
        drop(frame);
        assert_eq!(spares.held(), 0, "unmapped, not kept for reuse");
    }

    #[tokio::test]
    async fn a_splice_that_put_nothing_in_uncounts_itself() {
        let (tx, rx) = pipe::pipe().unwrap();
        drop(rx);
        let frame = counting_frame(MAPPED_MIN, None);
        let mut written = 0;
        assert!(vmsplice_all(&tx, &frame, &mut written).await.is_err());
        assert_eq!(written, 0);
        assert_eq!(pipes_holding(&frame), Some(0), "no pipe holds any of it");
    }

    #[tokio::test]
    async fn a_token_outliving_its_frame_uncounts_no_later_frame() {
        let (tx, _rx) = pipe::pipe().unwrap();
        let mut written = 0;
        let old = counting_frame(MAPPED_MIN, None);
        let stale = vmsplice_all(&tx, &old[..4096], &mut written).await.unwrap();
        drop(old);
        // A later frame, maybe at the same address, in a pipe of its own.
        let new = counting_frame(MAPPED_MIN, None);
        let (tx2, _rx2) = pipe::pipe().unwrap();
        let _held = vmsplice_all(&tx2, &new[..4096], &mut written)
            .await
            .unwrap();
        stale.drained();
        assert_eq!(pipes_holding(&new), Some(1));
    }

    #[tokio::test]
    async fn vmspliced_bytes_outlive_their_mapping() {
        let (tx, mut rx) = pipe::pipe().unwrap();
        let budget = Budget::new(1 << 30);
        let spares = Spares::new(&budget);
        let frame = counting_frame(MAPPED_MIN, Some(&spares));
        // Within the pipe's default 64 KiB: all of it goes in at once.
        let part = frame.slice(..32 * 1024);
        let expect = part.to_vec();
        let mut written = 0;
        let _in_pipe = vmsplice_all(&tx, &part, &mut written).await.unwrap();
        drop((part, frame));
        assert_eq!(spares.held(), 0, "a pipe holds it: not kept");
        // A new mapping may take the same addresses; the pipe still has
        // the old pages, unchanged.
        let mut other = Filling::new(MAPPED_MIN, Some(&spares)).unwrap();
        other.unfilled().unwrap().fill(0xaa);
        drop(tx);
        let mut got = Vec::new();
        rx.read_to_end(&mut got).await.unwrap();
        assert!(got == expect);
    }
}
