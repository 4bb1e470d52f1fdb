//! The `N`/`H` function-package cache layer.
//!
//! pp sends a job's function package (a pickle of name, sources and
//! modules) as `b"N" + package` the first time a connection carries it, and
//! as `b"H" + md5(package).hexdigest()` after that. The same layer runs on
//! worker pipes, where the cache is per worker process.
//!
//! Packages are never unpickled here: a [`Package`] keeps the client's `N`
//! frame as received, ready to be relayed to a worker that lacks it, and the
//! 33-byte `H` frame for a worker that already holds it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};

use crate::memory::budget::{Reservation, Use};
use md5::{Digest, Md5};

/// Bytes of packages the server keeps; function packages are source text,
/// usually kilobytes, so this holds tens of thousands.
pub const PACKAGE_CACHE_BUDGET: usize = 256 << 20;
/// Frames at least this large are hashed off the event loop (md5 runs at
/// about 600 MB/s: a millisecond and more).
const HASH_ON_LOOP_BELOW: usize = 1 << 20;
/// Unused packages at least this large leave the cache when a connection
/// closes.
const LARGE_PACKAGE: usize = 1 << 20;

/// The name pp gives a package: the hex md5 of its bytes.
pub type PackageHash = [u8; 32];

/// One function package, shared by the connection that sent it and the
/// jobs that use it.
#[derive(Debug)]
pub struct Package {
    /// md5 hex of the package bytes (after the one-byte tag).
    pub hash: PackageHash,
    /// The package's bytes in the memory budget, parked while it lives.
    /// Declared before `new_frame`, so it is given back first: a large
    /// frame's mapping, dropped right after, may then be kept for reuse
    /// in the room it leaves.
    _memory: Reservation,
    /// The frame as the client sent it: tag byte + package.
    pub new_frame: Bytes,
    /// `b"H"` + hash, for a worker that has seen the package.
    pub hit_frame: Bytes,
}

impl Package {
    /// Builds the package from a frame whose first byte is not `H`. Like
    /// ppft's worker, any such frame counts as new: its first byte is
    /// dropped and the rest is the package.
    fn from_new_frame(frame: Bytes, hash: PackageHash, memory: Reservation) -> Package {
        let mut hit = BytesMut::with_capacity(33);
        hit.extend_from_slice(b"H");
        hit.extend_from_slice(&hash);
        Package {
            hash,
            new_frame: frame,
            hit_frame: hit.freeze(),
            _memory: memory.repurpose(Use::Parked),
        }
    }

    /// Size counted against a connection's cache budget.
    fn cost(&self) -> usize {
        self.new_frame.len() + 64
    }
}

/// A client referred to a package the server does not hold (never sent, or
/// evicted): its job cannot be built and is answered with the reason.
#[derive(Debug)]
pub struct UnknownPackage(pub Bytes);

impl std::fmt::Display for UnknownPackage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.0[..self.0.len().min(40)];
        write!(
            f,
            "unknown package hash {:?}",
            String::from_utf8_lossy(shown)
        )
    }
}

/// The packages clients have sent, by hash, shared by all connections.
///
/// Shared like ppft's server's receive cache, because one client in the
/// wild depends on it: pp 1.7.0's client keeps its send cache when it
/// reconnects and goes on sending `H` for packages the new connection
/// never carried (after a `-k` timeout, say). Unlike ppft's, it is bounded:
/// a package stays while an open connection that sent it may send `H` for
/// it (or a job uses it), and of the others, the oldest go past
/// [`PACKAGE_CACHE_BUDGET`] bytes, when the memory budget needs room, and,
/// for large ones, as soon as the last connection that sent them closes.
/// An `H` for a package that went is answered with `(None, reason)`.
#[derive(Debug)]
pub struct PackageCache {
    /// Guarded by a plain mutex: held for a map lookup or insert only.
    inner: Mutex<CacheInner>,
    /// Budget for `CacheInner::bytes`.
    budget: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    /// Packages by hash.
    packages: HashMap<PackageHash, Arc<Package>>,
    /// Hashes in insertion order, oldest first, for eviction.
    order: VecDeque<PackageHash>,
    /// Sum of [`Package::cost`] over `packages`.
    bytes: usize,
}

impl PackageCache {
    /// An empty cache holding at most about `budget` bytes of packages.
    pub fn new(budget: usize) -> Self {
        PackageCache {
            inner: Mutex::default(),
            budget,
        }
    }

    /// Resolves a package frame into a package, holding no memory: for
    /// tests.
    #[cfg(test)]
    pub fn receive(&self, frame: Bytes) -> Result<Arc<Package>, UnknownPackage> {
        self.receive_held(frame, Reservation::none())
    }

    fn receive_held(
        &self,
        frame: Bytes,
        memory: Reservation,
    ) -> Result<Arc<Package>, UnknownPackage> {
        if frame.first() == Some(&b'H') {
            return self.lookup(frame);
        }
        let hash = md5_hex(&frame);
        Ok(self.insert(frame, hash, memory))
    }

    /// [`PackageCache::receive`] for a frame from a client, holding its
    /// memory: a large package is hashed on a blocking thread, so hashing a
    /// gigabyte never stalls the other clients' jobs.
    pub(crate) async fn admit(
        &self,
        frame: Bytes,
        memory: Reservation,
    ) -> Result<Arc<Package>, UnknownPackage> {
        if frame.first() == Some(&b'H') || frame.len() < HASH_ON_LOOP_BELOW {
            return self.receive_held(frame, memory);
        }
        let shared = frame.clone();
        let hash = match tokio::task::spawn_blocking(move || md5_hex(&shared)).await {
            Ok(hash) => hash,
            // Only if the blocking pool is gone (shutting down).
            Err(_) => md5_hex(&frame),
        };
        Ok(self.insert(frame, hash, memory))
    }

    fn lookup(&self, frame: Bytes) -> Result<Arc<Package>, UnknownPackage> {
        let hash: Option<&PackageHash> = frame[1..].try_into().ok();
        let inner = self.lock();
        hash.and_then(|h| inner.packages.get(h))
            .cloned()
            .ok_or(UnknownPackage(frame))
    }

    fn insert(&self, frame: Bytes, hash: PackageHash, memory: Reservation) -> Arc<Package> {
        let mut inner = self.lock();
        if let Some(old) = inner.packages.get(&hash) {
            // Sent before (by this or another connection): keep one copy;
            // the new frame's memory goes back with `memory`.
            return old.clone();
        }
        let package = Arc::new(Package::from_new_frame(frame, hash, memory));
        inner.bytes += package.cost();
        inner.order.push_back(package.hash);
        inner.packages.insert(package.hash, package.clone());
        let over = inner.bytes.saturating_sub(self.budget);
        if over > 0 {
            inner.evict_unused(over, 0);
        }
        package
    }

    /// Packages held and their bytes.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.packages.len(), inner.bytes)
    }

    /// Drops unused packages (no connection or job holds them), oldest
    /// first, until `bytes` are freed; returns the bytes freed. For the
    /// memory budget when a frame waits for room.
    pub(crate) fn shed(&self, bytes: usize) -> usize {
        self.lock().evict_unused(bytes, 0)
    }

    /// Drops the unused packages of at least `LARGE_PACKAGE` bytes: called
    /// when a connection closes, so a big package leaves with its client
    /// instead of waiting to be pushed out.
    pub(crate) fn drop_large_unused(&self) {
        self.lock().evict_unused(usize::MAX, LARGE_PACKAGE);
    }

    fn lock(&self) -> MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CacheInner {
    /// Removes packages held by nothing but the cache and of at least
    /// `min_cost`, oldest first, until `bytes` are freed; returns the
    /// bytes freed. Packages in use keep their place in the order.
    fn evict_unused(&mut self, bytes: usize, min_cost: usize) -> usize {
        let mut freed = 0;
        let packages = &mut self.packages;
        self.order.retain(|hash| {
            if freed >= bytes {
                return true;
            }
            let unused = packages
                .get(hash)
                .is_some_and(|p| Arc::strong_count(p) == 1 && p.cost() >= min_cost);
            if unused {
                if let Some(gone) = packages.remove(hash) {
                    freed += gone.cost();
                }
            }
            !unused
        });
        self.bytes -= freed;
        freed
    }
}

/// The md5 hex of a new-package frame's body (the bytes after the tag).
fn md5_hex(frame: &[u8]) -> PackageHash {
    let body = frame.get(1..).unwrap_or_default();
    let mut hash = [0u8; 32];
    crate::protocol::hex::encode_into(&Md5::digest(body), &mut hash);
    hash
}

/// The hashes of the packages a worker process has received, so that it is
/// sent `H` for those and `N` for the rest. The worker keeps every package
/// for its lifetime, so this only ever grows until the worker is replaced.
#[derive(Debug, Default)]
pub struct WorkerCache(HashSet<PackageHash>);

impl WorkerCache {
    /// Whether the worker already holds the package.
    pub fn contains(&self, hash: &PackageHash) -> bool {
        self.0.contains(hash)
    }

    /// The frame to send this worker for `package`.
    pub fn frame_for<'p>(&self, package: &'p Package) -> &'p Bytes {
        if self.contains(&package.hash) {
            &package.hit_frame
        } else {
            &package.new_frame
        }
    }

    /// Records that the worker has now received the package.
    pub fn insert(&mut self, hash: PackageHash) {
        self.0.insert(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_then_hit_resolve_to_the_same_package() {
        let c = PackageCache::new(1 << 20);
        let p = c.receive(Bytes::from_static(b"Nhello")).unwrap();
        // md5(b"hello"), as Python's hashlib gives it.
        assert_eq!(&p.hash, b"5d41402abc4b2a76b9719d911017c592");
        assert_eq!(&p.hit_frame[..], b"H5d41402abc4b2a76b9719d911017c592");
        assert_eq!(&p.new_frame[..], b"Nhello");
        let q = c
            .receive(Bytes::from_static(b"H5d41402abc4b2a76b9719d911017c592"))
            .unwrap();
        assert!(Arc::ptr_eq(&p, &q));
    }

    #[test]
    fn unknown_or_malformed_hash_is_an_error() {
        let c = PackageCache::new(1 << 20);
        assert!(c
            .receive(Bytes::from_static(b"H5d41402abc4b2a76b9719d911017c592"))
            .is_err());
        assert!(c.receive(Bytes::from_static(b"H")).is_err());
        assert!(c.receive(Bytes::from_static(b"Hshort")).is_err());
    }

    #[test]
    fn empty_or_odd_tag_counts_as_new_like_ppft() {
        let c = PackageCache::new(1 << 20);
        let p = c.receive(Bytes::new()).unwrap();
        // md5(b"")
        assert_eq!(&p.hash, b"d41d8cd98f00b204e9800998ecf8427e");
        let q = c.receive(Bytes::from_static(b"Xhello")).unwrap();
        assert_eq!(&q.hash, b"5d41402abc4b2a76b9719d911017c592");
    }

    #[test]
    fn over_budget_the_oldest_unused_packages_go() {
        let c = PackageCache::new(400);
        let a = c.receive(Bytes::from(vec![b'N'; 100])).unwrap();
        let b = c.receive(Bytes::from(vec![b'M'; 101])).unwrap();
        assert!(c.receive(a.hit_frame.clone()).is_ok());
        let a_hit = a.hit_frame.clone();
        drop(a);
        let b_hit = b.hit_frame.clone();
        c.receive(Bytes::from(vec![b'X'; 102])).unwrap();
        assert!(c.receive(a_hit).is_err(), "oldest unused evicted");
        assert!(c.receive(b_hit).is_ok(), "in use (b is held): kept");
    }

    #[test]
    fn packages_in_use_are_never_shed() {
        let c = PackageCache::new(1 << 20);
        let held = c.receive(Bytes::from(vec![b'N'; 100])).unwrap();
        let unused = c
            .receive(Bytes::from(vec![b'M'; 100]))
            .unwrap()
            .hit_frame
            .clone();
        assert_eq!(c.shed(usize::MAX), 100 + 64);
        assert!(c.receive(unused).is_err());
        assert!(c.receive(held.hit_frame.clone()).is_ok());
    }

    #[test]
    fn large_unused_packages_leave_when_asked() {
        let c = PackageCache::new(usize::MAX);
        let large = c
            .receive(Bytes::from(vec![b'N'; LARGE_PACKAGE]))
            .unwrap()
            .hit_frame
            .clone();
        let small = c
            .receive(Bytes::from(vec![b'M'; 100]))
            .unwrap()
            .hit_frame
            .clone();
        c.drop_large_unused();
        assert!(c.receive(large).is_err());
        assert!(
            c.receive(small).is_ok(),
            "small packages stay for reconnecting clients"
        );
    }

    #[tokio::test]
    async fn a_large_package_is_hashed_off_the_loop_with_the_same_result() {
        let c = PackageCache::new(usize::MAX);
        let mut frame = vec![b'N'];
        frame.extend(vec![7u8; 3 << 20]);
        let frame = Bytes::from(frame);
        let inline = md5_hex(&frame);
        let p = c.admit(frame, Reservation::none()).await.unwrap();
        assert_eq!(p.hash, inline);
    }

    #[tokio::test]
    async fn admitted_packages_hold_their_memory_parked() {
        use crate::memory::budget::Budget;
        let budget = Budget::new(1000);
        let c = PackageCache::new(usize::MAX);
        let memory = budget.force(6, Use::InFlight);
        let p = c
            .admit(Bytes::from_static(b"Nhello"), memory)
            .await
            .unwrap();
        assert_eq!(budget.used(), 6);
        // A second copy of the same package gives its memory back.
        let again = budget.force(6, Use::InFlight);
        let q = c.admit(Bytes::from_static(b"Nhello"), again).await.unwrap();
        assert!(Arc::ptr_eq(&p, &q));
        assert_eq!(budget.used(), 6);
        drop((p, q));
        c.shed(usize::MAX);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_package_from_one_connection_serves_another() {
        // pp 1.7.0's client sends H on a fresh connection after reconnecting.
        let c = std::sync::Arc::new(PackageCache::new(1 << 20));
        let p = c.receive(Bytes::from_static(b"Nhello")).unwrap();
        let other = c.clone();
        let q = other.receive(p.hit_frame.clone()).unwrap();
        assert!(Arc::ptr_eq(&p, &q));
    }

    #[test]
    fn worker_cache_picks_the_frame() {
        let c = PackageCache::new(1 << 20);
        let p = c.receive(Bytes::from_static(b"Nhello")).unwrap();
        let mut w = WorkerCache::default();
        assert_eq!(w.frame_for(&p), &p.new_frame);
        w.insert(p.hash);
        assert_eq!(w.frame_for(&p), &p.hit_frame);
    }
}
