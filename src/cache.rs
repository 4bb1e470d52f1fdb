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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};

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

/// A client referred to a package this connection never sent (or that was
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

/// The packages one client connection has sent, by hash.
///
/// ppft's client keeps its send cache per connection, so a per-connection
/// receive cache is always enough. It is bounded by bytes: past the budget
/// it is cleared, and a later `H` for a dropped package closes the
/// connection, which the client answers by reconnecting and resending the
/// job with `N` (its built-in fault tolerance) rather than losing it.
#[derive(Debug)]
pub struct ConnCache {
    /// Packages by hash.
    packages: HashMap<PackageHash, Arc<Package>>,
    /// Sum of [`Package::cost`] over `packages`.
    bytes: usize,
    /// Budget for `bytes`.
    budget: usize,
}

impl ConnCache {
    /// An empty cache holding at most about `budget` bytes of packages.
    pub fn new(budget: usize) -> Self {
        ConnCache {
            packages: HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    /// Resolves a package frame from the client into a package.
    pub fn receive(&mut self, frame: Bytes) -> Result<Arc<Package>, UnknownPackage> {
        if frame.first() == Some(&b'H') {
            let hash: Option<&PackageHash> = frame[1..].try_into().ok();
            return hash
                .and_then(|h| self.packages.get(h))
                .cloned()
                .ok_or(UnknownPackage(frame));
        }
        let package = Arc::new(Package::from_new_frame(frame));
        if let Some(old) = self.packages.get(&package.hash) {
            // A client resending a package it already sent: keep one copy.
            return Ok(old.clone());
        }
        if self.bytes + package.cost() > self.budget {
            self.packages.clear();
            self.bytes = 0;
        }
        self.bytes += package.cost();
        self.packages.insert(package.hash, package.clone());
        Ok(package)
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
        let mut c = ConnCache::new(1 << 20);
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
        let mut c = ConnCache::new(1 << 20);
        assert!(c
            .receive(Bytes::from_static(b"H5d41402abc4b2a76b9719d911017c592"))
            .is_err());
        assert!(c.receive(Bytes::from_static(b"H")).is_err());
        assert!(c.receive(Bytes::from_static(b"Hshort")).is_err());
    }

    #[test]
    fn empty_or_odd_tag_counts_as_new_like_ppft() {
        let mut c = ConnCache::new(1 << 20);
        let p = c.receive(Bytes::new()).unwrap();
        // md5(b"")
        assert_eq!(&p.hash, b"d41d8cd98f00b204e9800998ecf8427e");
        let q = c.receive(Bytes::from_static(b"Xhello")).unwrap();
        assert_eq!(&q.hash, b"5d41402abc4b2a76b9719d911017c592");
    }

    #[test]
    fn over_budget_the_cache_starts_afresh() {
        let mut c = ConnCache::new(200);
        let a = c.receive(Bytes::from(vec![b'N'; 100])).unwrap();
        let hit = a.hit_frame.clone();
        assert!(c.receive(hit.clone()).is_ok());
        c.receive(Bytes::from(vec![b'X'; 100])).unwrap();
        assert!(c.receive(hit).is_err(), "evicted package is unknown");
    }

    #[test]
    fn worker_cache_picks_the_frame() {
        let mut c = ConnCache::new(1 << 20);
        let p = c.receive(Bytes::from_static(b"Nhello")).unwrap();
        let mut w = WorkerCache::default();
        assert_eq!(w.frame_for(&p), &p.new_frame);
        w.insert(p.hash);
        assert_eq!(w.frame_for(&p), &p.hit_frame);
    }
}
