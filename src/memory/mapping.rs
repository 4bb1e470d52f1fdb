//! One anonymous private mapping of memory, unmapped when dropped: the
//! memory a large frame is read into ([`crate::memory::mapped`]), kept
//! between frames as a spare ([`crate::memory::spares`]).

use std::io;
use std::ptr::NonNull;

use nix::libc;

/// From this size on a mapping asks for transparent huge pages; mappings
/// grow in steps of it, so a mapping that moves as it grows keeps its huge
/// pages.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// An anonymous private mapping, unmapped when dropped.
#[derive(Debug)]
pub(crate) struct Mapping {
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
    pub(crate) fn new(cap: usize) -> Option<Mapping> {
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

    pub(crate) fn start(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Bytes mapped.
    pub(crate) fn cap(&self) -> usize {
        self.cap
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
    pub(crate) fn grow(&mut self, cap: usize) -> io::Result<()> {
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

    /// Unmaps what lies beyond the first `len` bytes (rounded up to a
    /// page): a spare taken for a smaller frame keeps no pages that frame
    /// does not need, and that its budget would not count.
    pub(crate) fn shrink_to(&mut self, len: usize) {
        let keep = len.max(1).next_multiple_of(page_size());
        if keep >= self.cap {
            return;
        }
        // SAFETY: the tail of the range this value owns, page-aligned;
        // nothing refers to it (a spare is in no pipe).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().add(keep).cast(), self.cap - keep) };
        // On failure the tail stays mapped and counted in `cap`.
        if rc == 0 {
            self.cap = keep;
        }
    }

    /// The first `len` bytes.
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: `cap` bytes mapped and initialized (zero-filled by the
        // kernel, or written since); shared borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len.min(self.cap)) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
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

/// The system's page size, 4 KiB if it cannot be told.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf reads a constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}
