//! The operator's side: [`metrics`] (Prometheus metrics and the status
//! page, `--metrics`) with [`scrapes`] (the cap on the metrics port's
//! connections), [`stats`] (job counts and times, for STAT and SIGUSR1),
//! [`shutdown`] (stop requests and the drain they start), [`runfiles`]
//! (the pid file and the ready file launchers wait on), [`openfiles`]
//! (the open-file limit raised, and budgets that fit in it) and [`notify`]
//! (readiness and the main pid told to systemd).

pub(crate) mod metrics;
pub mod notify;
pub mod openfiles;
pub mod runfiles;
pub(crate) mod scrapes;
pub mod shutdown;
pub mod stats;

/// The metric list of `docs/operating.md`, generated from the registry
/// that serves `/metrics` (see `tests/docs.rs`), with the per-job series
/// of `user`.
pub fn metrics_reference(user: &str) -> String {
    metrics::reference(user)
}
