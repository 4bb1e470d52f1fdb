//! The operator's side: [`metrics`] (Prometheus metrics and the status
//! page, `--metrics`), [`stats`] (job counts and times, for STAT and
//! SIGUSR1), [`shutdown`] (stop requests and the drain they start) and
//! [`runfiles`] (the pid file and the ready file launchers wait on).

pub(crate) mod metrics;
pub mod runfiles;
pub mod shutdown;
pub mod stats;
