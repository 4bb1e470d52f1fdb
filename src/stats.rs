//! Job counters: how many jobs the workers ran and how long they took.
//! STAT connections report the time; the totals are kept as integers so
//! they can be updated from any task without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Totals since the server started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs that got an answer from a worker (or a worker-died answer).
    jobs: AtomicU64,
    /// Sum of job wall times, in nanoseconds.
    job_nanos: AtomicU64,
}

impl Stats {
    /// Counts one finished job that took `took`.
    pub fn record_job(&self, took: Duration) {
        self.jobs.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.job_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Number of finished jobs.
    pub fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Total job time so far, in seconds.
    pub fn job_seconds(&self) -> f64 {
        self.job_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// Formats seconds the way Python's `str(float)` does for the values that
/// occur here, always with a decimal point (`0.0`, `12.5`), since clients
/// parse it with `float()` and people read it in logs.
pub fn format_seconds(secs: f64) -> String {
    format!("{:?}", secs.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_look_like_python_floats() {
        assert_eq!(format_seconds(0.0), "0.0");
        assert_eq!(format_seconds(12.5), "12.5");
        assert_eq!(format_seconds(-1.0), "0.0");
    }

    #[test]
    fn jobs_accumulate() {
        let s = Stats::default();
        s.record_job(Duration::from_millis(1500));
        s.record_job(Duration::from_millis(500));
        assert_eq!(s.jobs(), 2);
        assert!((s.job_seconds() - 2.0).abs() < 1e-9);
    }
}
