//! Jobs between a session and a worker: [`scheduler`] queues every
//! client's jobs and hands them to free workers, users in fair shares
//! ([`shares`]) and each user's client hosts in turn;
//! [`cache`] keeps function packages so a job's `H` hash can stand for the
//! package a client sent before, on client connections and worker pipes.

pub(crate) mod cache;
pub mod scheduler;
pub(crate) mod shares;
