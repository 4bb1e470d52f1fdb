//! Job counters: how many jobs the workers ran and how long they took.
//! STAT connections report the time; the totals are kept as integers so
//! they can be updated from any task without a lock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Totals since the server started.
#[derive(Debug)]
pub struct Stats {
    /// When the server started, for the SIGUSR1 table.
    started: Instant,
    /// Jobs on a worker right now.
    running: AtomicUsize,
    /// Jobs that got an answer from a worker (or a worker-died answer).
    jobs: AtomicU64,
    /// Sum of job wall times, in nanoseconds.
    job_nanos: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            running: AtomicUsize::new(0),
            jobs: AtomicU64::new(0),
            job_nanos: AtomicU64::new(0),
        }
    }
}

/// Counts a job as running while it lives.
#[derive(Debug)]
pub(crate) struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    /// Marks a job as running until the guard is dropped.
    pub(crate) fn running(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        Running(&self.running)
    }

    /// ppft's statistics table, as `print_stats()` prints it, for SIGUSR1.
    /// The server's own workers are its one "local" node.
    pub(crate) fn table(&self, workers: usize) -> String {
        let jobs = self.jobs();
        let secs = self.job_seconds();
        let mut out = String::from("Job execution statistics:\n");
        out.push_str(" job count | % of all jobs | job time sum | time per job | job server\n");
        if jobs > 0 {
            out.push_str(&format!(
                "    {jobs:6} |        {:6.2} |     {secs:8.4} |  {:11.6} | local\n",
                100.0,
                secs / jobs as f64
            ));
        }
        out.push_str(&format!(
            "Time elapsed since server creation {:?}\n",
            self.started.elapsed().as_secs_f64()
        ));
        out.push_str(&format!(
            "{} active tasks, {workers} cores\n",
            self.running.load(Ordering::Relaxed)
        ));
        out
    }

    /// Counts one finished job that took `took`.
    pub(crate) fn record_job(&self, took: Duration) {
        self.jobs.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.job_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Number of finished jobs.
    pub(crate) fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Total job time so far, in seconds.
    pub(crate) fn job_seconds(&self) -> f64 {
        self.job_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// Formats seconds the way Python's `str(float)` does for the values that
/// occur here, always with a decimal point (`0.0`, `12.5`), since clients
/// parse it with `float()` and people read it in logs.
pub(crate) fn format_seconds(secs: f64) -> String {
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
    fn table_has_ppft_columns() {
        let s = Stats::default();
        assert!(!s.table(2).contains("| local"), "no row before any job");
        s.record_job(Duration::from_millis(250));
        let _r = s.running();
        let t = s.table(2);
        assert!(t.contains(" job count | % of all jobs | job time sum | time per job | job server"));
        assert!(
            t.contains("         1 |        100.00 |       0.2500 |     0.250000 | local"),
            "{t}"
        );
        assert!(t.contains("1 active tasks, 2 cores"), "{t}");
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
