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
use md5::{Digest, Md5};

/// Bytes of packages the server keeps; function packages are source text,
/// usually kilobytes, so this holds tens of thousands.
pub const PACKAGE_CACHE_BUDGET: usize = 256 << 20;

/// The name pp gives a package: the hex md5 of its bytes.
pub type PackageHash = [u8; 32];

/// One function package, shared by the connection that sent it and the
/// jobs that use it.
#[derive(Debug)]
pub struct Package {
    /// md5 hex of the package bytes (after the one-byte tag).
    pub hash: PackageHash,
    /// The frame as the client sent it: tag byte + package.
    pub new_frame: Bytes,
    /// `b"H"` + hash, for a worker that has seen the package.
    pub hit_frame: Bytes,
}

impl Package {
    /// Builds the package from a frame whose first byte is not `H`. Like
    /// ppft's worker, any such frame counts as new: its first byte is
    /// dropped and the rest is the package.
    fn from_new_frame(frame: Bytes) -> Package {
        let body = frame.get(1..).unwrap_or_default();
        let mut hash = [0u8; 32];
        crate::hex::encode_into(&Md5::digest(body), &mut hash);
        let mut hit = BytesMut::with_capacity(33);
        hit.extend_from_slice(b"H");
        hit.extend_from_slice(&hash);
        Package {
            hash,
            new_frame: frame,
            hit_frame: hit.freeze(),
        }
    }

    /// Size counted against a connection's cache budget.
    fn cost(&self) -> usize {
        self.new_frame.len() + 64
    }
}

/// A client referred to a package the server does not hold (never sent, or
/// evicted); the connection cannot go on, because its job cannot be built.
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
/// never carried (after a `-k` timeout, say). Unlike ppft's, it is bounded
/// in bytes: past the budget the oldest packages are dropped, and a later
/// `H` for one closes that connection, which ppft clients answer by
/// reconnecting and resending the job with `N`.
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

    /// Resolves a package frame from a client into a package.
    pub fn receive(&self, frame: Bytes) -> Result<Arc<Package>, UnknownPackage> {
        if frame.first() == Some(&b'H') {
            let hash: Option<&PackageHash> = frame[1..].try_into().ok();
            let inner = self.lock();
            return hash
                .and_then(|h| inner.packages.get(h))
                .cloned()
                .ok_or(UnknownPackage(frame));
        }
        // Hash outside the lock: it is the only per-byte work here.
        let package = Arc::new(Package::from_new_frame(frame));
        let mut inner = self.lock();
        if let Some(old) = inner.packages.get(&package.hash) {
            // Sent before (by this or another connection): keep one copy.
            return Ok(old.clone());
        }
        inner.bytes += package.cost();
        while inner.bytes > self.budget {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(gone) = inner.packages.remove(&oldest) {
                inner.bytes -= gone.cost();
            }
        }
        inner.order.push_back(package.hash);
        inner.packages.insert(package.hash, package.clone());
        Ok(package)
    }

    fn lock(&self) -> MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
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
    fn over_budget_the_oldest_packages_go() {
        let c = PackageCache::new(400);
        let a = c.receive(Bytes::from(vec![b'N'; 100])).unwrap();
        let b = c.receive(Bytes::from(vec![b'M'; 101])).unwrap();
        assert!(c.receive(a.hit_frame.clone()).is_ok());
        c.receive(Bytes::from(vec![b'X'; 102])).unwrap();
        assert!(c.receive(a.hit_frame.clone()).is_err(), "oldest evicted");
        assert!(c.receive(b.hit_frame.clone()).is_ok(), "newer kept");
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
