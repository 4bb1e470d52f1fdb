//! Large frames in mappings of their own: read in with few page faults,
//! handed to a worker's pipe by `vmsplice` instead of being copied into
//! it, and given back to the system the moment they are dropped.
//!
//! A frame of [`MAPPED_MIN`] bytes or more is read straight into an
//! anonymous mapping of its announced length. Nothing is touched up front:
//! the pages come as the bytes arrive, so a peer that announces much and
//! sends little costs little, as with the growing read buffer. Large
//! mappings ask for transparent huge pages (one fault per 2 MiB instead of
//! per 4 KiB) and are left out of forks (a worker being spawned does not
//! copy the server's page tables).
//!
//! `vmsplice` puts references to the frame's pages into the pipe instead of
//! copies of its bytes, which is only sound if those pages never change
//! while the pipe may still hold them. Frames here are never written once
//! read, and their memory is never reused: dropping one unmaps it, and the
//! kernel keeps pages a pipe refers to, unchanged, until the pipe lets go.
//! [`is_mapped`] tells such frames apart from heap memory, which is reused.

use std::io;
use std::ptr::NonNull;
use std::sync::Mutex;

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

/// The first step of a frame's mapping: a peer that announces a huge frame
/// and sends little gets little more than this, in address space too.
const FIRST_STEP: usize = 4 << 20;

/// Address ranges `[start, end)` of the live mappings, for [`is_mapped`].
/// A handful at most (one per frame being read or relayed), so a list.
static LIVE: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<(usize, usize)>> {
    // Every step under the lock is one push, update or removal.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// An anonymous private mapping holding one frame, unmapped when dropped.
#[derive(Debug)]
struct Mapping {
    /// Start of the mapping.
    ptr: NonNull<u8>,
    /// Bytes mapped.
    cap: usize,
    /// Bytes of it that are the frame: what [`AsRef`] shows.
    len: usize,
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
        let ptr = NonNull::new(addr.cast::<u8>())?;
        let map = Mapping { ptr, cap, len: 0 };
        map.advise();
        live().push(map.range());
        Some(map)
    }

    fn range(&self) -> (usize, usize) {
        let start = self.ptr.as_ptr() as usize;
        (start, start + self.cap)
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
        let old = self.range();
        // SAFETY: remaps the range this value owns; nothing else points
        // into it while `self` is borrowed mutably.
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
        let new = self.range();
        let mut live = live();
        match live.iter_mut().find(|r| **r == old) {
            Some(r) => *r = new,
            None => live.push(new),
        }
        Ok(())
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `cap` bytes mapped read-write, zero-filled by the kernel
        // (so initialized), and borrowed mutably through `self` only.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len <= cap` bytes mapped; shared borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let range = self.range();
        live().retain(|r| *r != range);
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
    /// Where the payload goes.
    map: Mapping,
    /// The payload's announced length.
    len: usize,
    /// Bytes of it received so far.
    filled: usize,
}

impl Filling {
    /// Room for the start of a payload of `len` bytes; `None` if no
    /// mapping can be had.
    pub(crate) fn new(len: usize) -> Option<Filling> {
        let map = Mapping::new(len.min(FIRST_STEP))?;
        Some(Filling {
            map,
            len,
            filled: 0,
        })
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
        if self.filled == self.map.cap && self.map.cap < self.len {
            let doubled = self.map.cap.saturating_mul(2).next_multiple_of(HUGE_PAGE);
            self.map.grow(doubled.min(self.len))?;
        }
        let filled = self.filled;
        Ok(&mut self.map.as_mut_slice()[filled..])
    }

    /// Counts `n` more bytes as received into [`Filling::unfilled`].
    pub(crate) fn advance(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.map.cap);
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

    /// The whole payload, read-only from now on: the mapping goes with the
    /// last clone of it.
    pub(crate) fn freeze(mut self) -> Bytes {
        debug_assert!(self.is_full());
        self.map.len = self.filled;
        Bytes::from_owner(self.map)
    }
}

/// Whether `bytes` lies within one live mapping made here: memory that is
/// never written again nor reused, which [`vmsplice_all`] may hand out.
pub(crate) fn is_mapped(bytes: &[u8]) -> bool {
    let start = bytes.as_ptr() as usize;
    let end = start.saturating_add(bytes.len());
    live().iter().any(|&(s, e)| s <= start && end <= e)
}

/// Puts `data` into the pipe by reference (`vmsplice`), waiting for room
/// as needed; `written` counts the bytes that went in, also when it fails
/// half-way. `data` must satisfy [`is_mapped`] and stay alive (unchanged)
/// at least until the reader has read it; dropping it afterwards is fine.
pub(crate) async fn vmsplice_all(
    pipe: &pipe::Sender,
    data: &[u8],
    written: &mut usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    debug_assert!(is_mapped(data));
    let mut rest = data;
    while !rest.is_empty() {
        let spliced = pipe.try_io(|| {
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: one iovec over `rest`, alive for the call; the pages
            // it names are not written again (see the module doc).
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
        let range = (frame.as_ptr() as usize, frame.len());
        drop(frame);
        // SAFETY: only the address is looked at, never the memory.
        let gone = unsafe { std::slice::from_raw_parts(range.0 as *const u8, range.1) };
        assert!(!is_mapped(gone));
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
