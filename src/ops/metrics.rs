//! What the server is doing, for its operator: Prometheus metrics at
//! `/metrics` and a plain-text summary at `/status`, served on
//! `--metrics ADDR:PORT` (off by default).
//!
//! Counters and histograms live in one process-wide [`Metrics`], updated
//! where things happen (sessions, the pool, the accept loop) with atomic
//! operations only; levels that are cheaper to read than to track (queue
//! length, cache size, memory held) are read from their owners when a page
//! is asked for. The pages are rendered on the server's own runtime: a
//! scrape costs microseconds, so it answers while every worker is busy and
//! never holds up job traffic.
//!
//! `/status` rather than a `--status-file`: it is always current, costs
//! nothing when nobody looks, writes nothing to disk, and is reachable
//! exactly where the metrics are.
//!
//! The HTTP side is a minimal HTTP/1.0-style responder for two GET paths:
//! one request per connection, a bounded request head read within a
//! timeout, and a bounded number of connections
//! ([`crate::ops::scrapes`]), so a stray or slow peer costs one small task
//! and a flood of idle sockets cannot use up the server's descriptors.
//! (A full HTTP stack would bring many crates for two fixed pages.)

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::ops::scrapes::{Admitted, Scrapes};

/// Labels of a family: one `(name, value)` pair.
type Label = Vec<(&'static str, &'static str)>;
/// Labels of a per-job family: the user, and a reason where there is one.
/// A user label exists only for a configured user (at most the users
/// file's), so the series stay bounded.
type UserLabel = Vec<(&'static str, String)>;
/// A per-user histogram family.
type UserHistogram = Family<UserLabel, Histogram, fn() -> Histogram>;

/// Why connections are refused, as labelled.
const REFUSALS: &[&str] = &[
    "not_allowed",
    "max_connections",
    "max_handshakes",
    "max_handshakes_per_address",
    "proxy_header",
];

/// How long a metrics client may take to send its request head, from when
/// it is accepted; until then it may also be closed to make room for a new
/// connection ([`crate::ops::scrapes`]).
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing the page to a metrics client may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; the two pages need only the first line.
const MAX_REQUEST: usize = 8 * 1024;

/// Every counter, histogram and tracked level, process-wide.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// Jobs whose two frames were received from a client, by user.
    jobs_received: Family<UserLabel, Counter>,
    /// Jobs answered with the worker's own result (an exception inside a
    /// job is such a result), by user.
    jobs_answered: Family<UserLabel, Counter>,
    /// The two above summed over users, for `/status`.
    received_total: Counter,
    answered_total: Counter,
    /// Jobs the server answered itself, `(None, reason)`, by reason and
    /// user.
    jobs_server_answered: Family<UserLabel, Counter>,
    /// Jobs dropped with no answer, by reason and user.
    jobs_dropped: Family<UserLabel, Counter>,
    /// Seconds a job ran on its worker, by user.
    job_run_seconds: UserHistogram,
    /// Seconds a job waited for a worker, by user.
    job_queue_wait_seconds: UserHistogram,
    /// Jobs on a worker now.
    pub jobs_running: Gauge,
    /// Jobs waiting for a worker (read when a page is asked for).
    jobs_queued: Gauge,
    /// Workers busy and idle (read when a page is asked for).
    workers: Family<Label, Gauge>,
    /// Workers replaced, by cause.
    pub worker_restarts: Family<Label, Counter>,
    /// Seconds from a slot's worker ending (or its first being asked for)
    /// to the next one's handshake done.
    pub worker_start_seconds: Histogram,
    /// Connections open now, by kind: pre-auth, STAT, EXEC.
    pub connections: Family<Label, Gauge>,
    /// Connections refused, by reason.
    pub connections_refused: Family<Label, Counter>,
    /// Wrong answers to the handshake's nonce.
    pub failed_logins: Counter,
    /// Bytes received from clients, frame headers included.
    pub received_bytes: Counter,
    /// Bytes sent to clients, frame headers included.
    pub sent_bytes: Counter,
    /// Function packages cached, and their bytes (read when asked).
    package_cache_entries: Gauge,
    package_cache_bytes: Gauge,
    /// Bytes held in the memory budget, and its limit (read when asked).
    memory_held_bytes: Gauge,
    memory_limit_bytes: Gauge,
    /// Each user's per-job series, by name: the handles of the families'
    /// entries, so counting a job costs a lookup by name, not a label
    /// built and hashed for each series.
    per_user: Mutex<HashMap<String, UserSeries>>,
    /// Open client connections per source address, for `/status`.
    clients: Mutex<HashMap<IpAddr, [usize; 3]>>,
    /// Jobs on a worker now, for `/status`.
    running: Mutex<HashMap<u64, RunningJob>>,
    /// When the server started.
    started: Instant,
}

/// One user's entries in the per-job families every job counts in (they
/// share their values with the families).
#[derive(Debug)]
struct UserSeries {
    received: Counter,
    answered: Counter,
    run: Histogram,
    wait: Histogram,
}

/// A job on a worker, as `/status` shows it.
#[derive(Debug, Clone)]
struct RunningJob {
    /// The worker's pid.
    pid: u32,
    /// Whose job it is, where users are named.
    user: Option<String>,
    /// When it started there.
    since: Instant,
}

/// The kinds of client connection, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnKind {
    PreAuth,
    Stat,
    Exec,
}

impl ConnKind {
    fn label(self) -> &'static str {
        match self {
            ConnKind::PreAuth => "pre-auth",
            ConnKind::Stat => "stat",
            ConnKind::Exec => "exec",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The levels a page shows that other parts of the server keep (queue,
/// workers, caches, memory), read when a page is asked for. The server
/// fills it in ([`LevelSource`]), so this module needs to know none of
/// those parts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Levels {
    /// The version string clients are sent.
    pub(crate) version: String,
    /// Workers the pool is configured for.
    pub(crate) workers: usize,
    /// Workers running now.
    pub(crate) live_workers: usize,
    /// Jobs waiting for a worker.
    pub(crate) queued: usize,
    /// Function packages held for clients, and their bytes.
    pub(crate) package_entries: usize,
    pub(crate) package_bytes: usize,
    /// Bytes held against `--memory-limit`, and the limit.
    pub(crate) memory_held: usize,
    pub(crate) memory_limit: usize,
    /// The process this one took over from at a reload, while it drains:
    /// its pid and its open connections.
    pub(crate) previous: Option<(u32, usize)>,
}

/// Reads the current [`Levels`]; called once per page.
pub(crate) type LevelSource = Arc<dyn Fn() -> Levels + Send + Sync>;

/// The process's metrics.
pub(crate) fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().with_known_labels())
}

fn label(name: &'static str, value: &'static str) -> Label {
    vec![(name, value)]
}

fn user_label(user: &str) -> UserLabel {
    vec![("user", user.to_string())]
}

fn reason_label(key: &'static str, reason: &'static str, user: &str) -> UserLabel {
    vec![(key, reason.to_string()), ("user", user.to_string())]
}

/// 1 ms to about 9 hours: tiny jobs and long ones alike.
fn job_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 13))
}

/// Why the server answers a job itself, as labelled.
const SERVER_ANSWERS: &[&str] = &[
    "worker_died",
    "not_started",
    "no_worker",
    "oversize",
    "unknown_package",
    "job_timeout",
    "memory_limit",
    "memory_cgroup",
    "lost",
];

/// Why a job is dropped unanswered, as labelled.
const DROPS: &[&str] = &["abandoned", "shutdown"];

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            jobs_received: Family::default(),
            jobs_answered: Family::default(),
            received_total: Counter::default(),
            answered_total: Counter::default(),
            jobs_server_answered: Family::default(),
            jobs_dropped: Family::default(),
            job_run_seconds: Family::new_with_constructor(job_seconds),
            job_queue_wait_seconds: Family::new_with_constructor(job_seconds),
            jobs_running: Gauge::default(),
            jobs_queued: Gauge::default(),
            workers: Family::default(),
            worker_restarts: Family::default(),
            // 0.5 ms to about 2 minutes: forks and interpreter start-ups.
            worker_start_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            connections: Family::default(),
            connections_refused: Family::default(),
            failed_logins: Counter::default(),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            package_cache_entries: Gauge::default(),
            package_cache_bytes: Gauge::default(),
            memory_held_bytes: Gauge::default(),
            memory_limit_bytes: Gauge::default(),
            per_user: Mutex::default(),
            clients: Mutex::default(),
            running: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// Every label value the server uses, at zero, so a series exists
    /// (and graphs and alerts see 0) before the first event.
    /// The per-job series of each user are added once the users are
    /// known ([`Metrics::add_user`]).
    fn with_known_labels(self) -> Metrics {
        for cause in [
            "died",
            "abandoned",
            "max_jobs",
            "worker_exiting",
            "restart_flag",
            "job_timeout",
            "memory_limit",
            "memory_cgroup",
            "supervisor_panic",
            "user_switch",
        ] {
            drop(self.worker_restarts.get_or_create(&label("cause", cause)));
        }
        for kind in [ConnKind::PreAuth, ConnKind::Stat, ConnKind::Exec] {
            drop(self.connections.get_or_create(&label("kind", kind.label())));
        }
        for reason in REFUSALS {
            drop(
                self.connections_refused
                    .get_or_create(&label("reason", reason)),
            );
        }
        self
    }

    /// Every per-job series of `user` at zero: each configured user's,
    /// once, at startup.
    pub(crate) fn add_user(&self, user: &str) {
        drop(self.jobs_received.get_or_create(&user_label(user)));
        drop(self.jobs_answered.get_or_create(&user_label(user)));
        drop(self.job_run_seconds.get_or_create(&user_label(user)));
        drop(self.job_queue_wait_seconds.get_or_create(&user_label(user)));
        for reason in SERVER_ANSWERS {
            drop(
                self.jobs_server_answered
                    .get_or_create(&reason_label("reason", reason, user)),
            );
        }
        for reason in DROPS {
            drop(
                self.jobs_dropped
                    .get_or_create(&reason_label("reason", reason, user)),
            );
        }
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("ppserver");
        r.register(
            "jobs_received",
            "Jobs received from clients, by user",
            self.jobs_received.clone(),
        );
        r.register(
            "jobs_answered",
            "Jobs answered with their worker's result (an exception in a job is such a result), \
             by user",
            self.jobs_answered.clone(),
        );
        r.register(
            "jobs_server_answered",
            "Jobs the server answered itself with (None, reason), by user and reason: worker_died (the \
             worker died during the job), not_started (workers died before receiving it, several in a row), no_worker (no \
             worker could be started), oversize (a frame larger than the memory budget), \
             unknown_package (an H for a package no longer held), job_timeout \
             (--job-timeout), memory_limit (--worker-memory-limit), memory_cgroup (its worker \
             left its memory cgroup, or the cgroup's limit was changed), lost (a slot's \
             supervisor failed while it held the job)",
            self.jobs_server_answered.clone(),
        );
        r.register(
            "jobs_dropped",
            "Jobs dropped unanswered, by user and reason: abandoned (their client left before they \
             ran), shutdown (their connection was closed at the end of the drain, and their \
             client resends them)",
            self.jobs_dropped.clone(),
        );
        r.register_with_unit(
            "job_run",
            "Time jobs ran on a worker, by user",
            Unit::Seconds,
            self.job_run_seconds.clone(),
        );
        r.register_with_unit(
            "worker_start",
            "Time from a worker slot falling vacant (its worker's end, or the server's start) \
             to its new worker's handshake done: a fork, or an interpreter's start-up",
            Unit::Seconds,
            self.worker_start_seconds.clone(),
        );
        r.register_with_unit(
            "job_queue_wait",
            "Time jobs waited for a worker, by user",
            Unit::Seconds,
            self.job_queue_wait_seconds.clone(),
        );
        r.register(
            "jobs_running",
            "Jobs on a worker now",
            self.jobs_running.clone(),
        );
        r.register(
            "jobs_queued",
            "Jobs waiting for a worker",
            self.jobs_queued.clone(),
        );
        r.register(
            "workers",
            "Worker processes, by state: busy, idle",
            self.workers.clone(),
        );
        r.register(
            "worker_restarts",
            "Workers replaced, by cause: died, abandoned (its client left a running job), \
             max_jobs (--max-jobs-per-worker), worker_exiting (its job hit ppft's fatal error, after \
             which the worker exits), \
             restart_flag (-r), job_timeout, memory_limit, memory_cgroup (the worker left its \
             memory cgroup, or the cgroup's limit was changed, during or after a job), \
             supervisor_panic (a bug: the slot started again), user_switch (--isolate user: \
             a fresh worker for another user's job)",
            self.worker_restarts.clone(),
        );
        r.register(
            "connections",
            "Client connections open now, by kind: pre-auth (in their handshake), stat, exec",
            self.connections.clone(),
        );
        r.register(
            "connections_refused",
            "Client connections refused when accepted, by reason: not_allowed (--allow), \
             max_connections, max_handshakes, max_handshakes_per_address",
            self.connections_refused.clone(),
        );
        r.register(
            "failed_logins",
            "Wrong answers to the handshake's nonce",
            self.failed_logins.clone(),
        );
        r.register_with_unit(
            "received",
            "Bytes received from clients, frame headers included",
            Unit::Bytes,
            self.received_bytes.clone(),
        );
        r.register_with_unit(
            "sent",
            "Bytes sent to clients, frame headers included",
            Unit::Bytes,
            self.sent_bytes.clone(),
        );
        r.register(
            "package_cache_entries",
            "Function packages cached",
            self.package_cache_entries.clone(),
        );
        r.register_with_unit(
            "package_cache",
            "Bytes of function packages cached",
            Unit::Bytes,
            self.package_cache_bytes.clone(),
        );
        r.register_with_unit(
            "memory_held",
            "Bytes held in the memory budget (--memory-limit): client frames, queued jobs, \
             cached packages, unwritten results, spare mappings of large frames",
            Unit::Bytes,
            self.memory_held_bytes.clone(),
        );
        r.register_with_unit(
            "memory_limit",
            "The memory budget (--memory-limit)",
            Unit::Bytes,
            self.memory_limit_bytes.clone(),
        );
        r
    }

    /// Counts a job of `user` received.
    pub(crate) fn received(&self, user: &str) {
        self.received_total.inc();
        self.with_user(user, |s| {
            s.received.inc();
        });
    }

    /// Counts a job of `user` answered by its worker, after `secs` on it.
    pub(crate) fn answered(&self, user: &str, secs: f64) {
        self.answered_total.inc();
        self.with_user(user, |s| {
            s.answered.inc();
            s.run.observe(secs);
        });
    }

    /// Counts a job of `user` taken by a worker after `secs` in the queue.
    pub(crate) fn waited(&self, user: &str, secs: f64) {
        self.with_user(user, |s| s.wait.observe(secs));
    }

    /// Runs `f` on `user`'s per-job series, made (from the families) the
    /// first time.
    fn with_user(&self, user: &str, f: impl FnOnce(&UserSeries)) {
        let mut per_user = lock(&self.per_user);
        if let Some(series) = per_user.get(user) {
            return f(series);
        }
        let label = user_label(user);
        let series = UserSeries {
            received: self.jobs_received.get_or_create(&label).clone(),
            answered: self.jobs_answered.get_or_create(&label).clone(),
            run: self.job_run_seconds.get_or_create(&label).clone(),
            wait: self.job_queue_wait_seconds.get_or_create(&label).clone(),
        };
        f(&series);
        per_user.insert(user.to_string(), series);
    }

    /// Counts a job of `user` answered by the server itself, for `reason`.
    pub(crate) fn server_answered(&self, reason: &'static str, user: &str) {
        self.jobs_server_answered
            .get_or_create(&reason_label("reason", reason, user))
            .inc();
    }

    /// Counts a job of `user` dropped unanswered, for `reason`.
    pub(crate) fn dropped(&self, reason: &'static str, user: &str) {
        self.jobs_dropped
            .get_or_create(&reason_label("reason", reason, user))
            .inc();
    }

    /// Counts a worker replaced, for `cause`.
    pub(crate) fn worker_restart(&self, cause: &'static str) {
        self.worker_restarts
            .get_or_create(&label("cause", cause))
            .inc();
    }

    /// Counts a connection refused, for `reason`.
    pub(crate) fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// Counts a connection from `peer` of `kind` until the guard drops.
    pub(crate) fn connection(&'static self, peer: IpAddr, kind: ConnKind) -> ConnectionGuard {
        self.connections
            .get_or_create(&label("kind", kind.label()))
            .inc();
        self.lock_clients().entry(peer).or_default()[kind.index()] += 1;
        ConnectionGuard {
            metrics: self,
            peer,
            kind,
        }
    }

    /// Notes a job starting on worker `pid`, until the guard drops.
    /// `user` is shown on `/status` where users are named (`--users`).
    pub(crate) fn job_started(
        &'static self,
        id: u64,
        pid: u32,
        user: Option<&str>,
    ) -> RunningGuard {
        self.jobs_running.inc();
        lock(&self.running).insert(
            id,
            RunningJob {
                pid,
                user: user.map(str::to_string),
                since: Instant::now(),
            },
        );
        RunningGuard { metrics: self, id }
    }

    fn lock_clients(&self) -> MutexGuard<'_, HashMap<IpAddr, [usize; 3]>> {
        lock(&self.clients)
    }

    /// Sets the gauges of the levels kept elsewhere from `levels`.
    fn refresh(&self, levels: &Levels) {
        let busy = self.jobs_running.get().max(0) as usize;
        self.jobs_queued.set(levels.queued as i64);
        self.workers
            .get_or_create(&label("state", "busy"))
            .set(busy.min(levels.live_workers) as i64);
        self.workers
            .get_or_create(&label("state", "idle"))
            .set(levels.live_workers.saturating_sub(busy) as i64);
        self.package_cache_entries
            .set(levels.package_entries as i64);
        self.package_cache_bytes.set(levels.package_bytes as i64);
        self.memory_held_bytes.set(levels.memory_held as i64);
        self.memory_limit_bytes.set(levels.memory_limit as i64);
    }

    /// The `/metrics` page: OpenMetrics text, or Prometheus' classic text
    /// format (what `promtool check metrics` and older scrapers read).
    pub(crate) fn render(&self, levels: &Levels, openmetrics: bool) -> String {
        self.refresh(levels);
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry());
        if openmetrics {
            out
        } else {
            classic_text(&out)
        }
    }

    /// The `/status` page: a summary for people.
    pub(crate) fn status(&self, levels: &Levels) -> String {
        self.refresh(levels);
        let mut out = String::new();
        let uptime = self.started.elapsed().as_secs();
        let _ = writeln!(
            out,
            "ppserver {} (pp version {}), up {}h{:02}m{:02}s",
            env!("CARGO_PKG_VERSION"),
            levels.version,
            uptime / 3600,
            uptime / 60 % 60,
            uptime % 60
        );
        let live = levels.live_workers;
        let busy = (self.jobs_running.get().max(0) as usize).min(live);
        let _ = writeln!(
            out,
            "workers: {live} up ({busy} busy, {} idle) of {}",
            live - busy,
            levels.workers
        );
        let _ = writeln!(out, "jobs queued: {}", levels.queued);
        if let Some((pid, connections)) = levels.previous {
            let _ = writeln!(
                out,
                "previous process (reload): pid {pid} draining, connections left: \
                 {connections}; its workers still running"
            );
        }
        let _ = writeln!(
            out,
            "jobs: {} received, {} answered by workers",
            self.received_total.get(),
            self.answered_total.get()
        );
        let _ = writeln!(
            out,
            "memory: {} held of {}",
            crate::memory::budget::human(levels.memory_held),
            crate::memory::budget::human(levels.memory_limit)
        );
        let mut running: Vec<(u64, RunningJob)> = lock(&self.running)
            .iter()
            .map(|(id, job)| (*id, job.clone()))
            .collect();
        running.sort_by_key(|(_, job)| job.since);
        let _ = writeln!(out, "\nrunning jobs ({}):", running.len());
        for (id, job) in running {
            let _ = writeln!(
                out,
                "  job {id}{} on worker pid {}, running for {:.1} s",
                job.user.map(|u| format!(" of {u}")).unwrap_or_default(),
                job.pid,
                job.since.elapsed().as_secs_f64()
            );
        }
        let mut clients: Vec<(IpAddr, [usize; 3])> = self
            .lock_clients()
            .iter()
            .map(|(ip, n)| (*ip, *n))
            .collect();
        clients.sort();
        let _ = writeln!(out, "\nclients ({} addresses):", clients.len());
        for (ip, [pre, stat, exec]) in clients {
            let _ = writeln!(out, "  {ip}: {exec} EXEC, {stat} STAT, {pre} in handshake");
        }
        out
    }
}

/// The metric list of the operating guide (`docs/operating.md`), made
/// from the registry that serves `/metrics`, so the two cannot drift
/// apart: a Markdown table with each metric's name as scraped, its type,
/// its help text and its labels. A fresh set of metrics, every label the
/// server uses at zero, and the per-job ones of `user`, stands in for
/// the process's own.
pub(crate) fn reference(user: &str) -> String {
    let fresh = Metrics::new().with_known_labels();
    fresh.add_user(user);
    fresh.refresh(&Levels::default());
    let mut text = String::new();
    let _ = encode(&mut text, &fresh.registry());
    // name -> (type, help, label names), in the registry's order.
    let mut rows: Vec<(String, String, String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            rows.push((
                name.to_string(),
                String::new(),
                help.to_string(),
                Vec::new(),
            ));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some(row) = rows.iter_mut().rev().find(|r| r.0 == name) {
                row.1 = kind.to_string();
            }
        } else if let (Some(open), Some(close)) = (line.find('{'), line.find('}')) {
            let Some(row) = rows.last_mut() else { continue };
            for pair in line[open + 1..close].split(',') {
                let name = pair.split('=').next().unwrap_or("").to_string();
                if name != "le" && !name.is_empty() && !row.3.contains(&name) {
                    row.3.push(name);
                }
            }
        }
    }
    let mut out = String::from("| metric | type | what |\n| --- | --- | --- |\n");
    for (name, kind, help, labels) in rows {
        let scraped = if kind == "counter" {
            format!("{name}_total")
        } else {
            name
        };
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.join(","))
        };
        let _ = writeln!(out, "| `{scraped}{labels}` | {kind} | {help} |");
    }
    out
}

/// Prometheus' classic text format (0.0.4) from OpenMetrics text: a
/// counter's HELP and TYPE name its sample (`x_total`) rather than its
/// family (`x`), and there are no UNIT or EOF lines.
fn classic_text(openmetrics: &str) -> String {
    let lines: Vec<&str> = openmetrics.lines().collect();
    let counters: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in lines {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Maps of plain values: a panic cannot leave them half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// See [`Metrics::connection`].
#[derive(Debug)]
pub(crate) struct ConnectionGuard {
    metrics: &'static Metrics,
    peer: IpAddr,
    kind: ConnKind,
}

impl ConnectionGuard {
    /// The connection is now of `kind` (after the handshake).
    pub(crate) fn become_kind(&mut self, kind: ConnKind) {
        let m = self.metrics;
        m.connections
            .get_or_create(&label("kind", self.kind.label()))
            .dec();
        m.connections
            .get_or_create(&label("kind", kind.label()))
            .inc();
        if let Some(n) = m.lock_clients().get_mut(&self.peer) {
            n[self.kind.index()] = n[self.kind.index()].saturating_sub(1);
            n[kind.index()] += 1;
        }
        self.kind = kind;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let m = self.metrics;
        m.connections
            .get_or_create(&label("kind", self.kind.label()))
            .dec();
        let mut clients = m.lock_clients();
        if let Some(n) = clients.get_mut(&self.peer) {
            n[self.kind.index()] = n[self.kind.index()].saturating_sub(1);
            if n.iter().all(|&c| c == 0) {
                clients.remove(&self.peer);
            }
        }
    }
}

/// See [`Metrics::job_started`].
#[derive(Debug)]
pub(crate) struct RunningGuard {
    metrics: &'static Metrics,
    id: u64,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.metrics.jobs_running.dec();
        lock(&self.metrics.running).remove(&self.id);
    }
}

/// A client stream whose bytes are counted in `received` and `sent`.
#[derive(Debug)]
pub(crate) struct Counted<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.0).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            metrics().received_bytes.inc_by(read as u64);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        count_sent(Pin::new(&mut self.0).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        count_sent(Pin::new(&mut self.0).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn count_sent(res: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
    if let Poll::Ready(Ok(n)) = &res {
        metrics().sent_bytes.inc_by(*n as u64);
    }
    res
}

/// Binds the metrics address.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics` and `/status` until dropped. `host_key` is how the
/// server counts addresses (an IPv6 /64 as one), for the per-address cap.
pub(crate) async fn serve(
    listener: TcpListener,
    levels: LevelSource,
    host_key: fn(IpAddr) -> IpAddr,
) {
    let scrapes = Scrapes::new();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // None: every connection in the way is being answered;
                // dropping the stream refuses this one.
                let Some(Admitted { scrape, evicted }) = scrapes.admit(host_key(peer.ip())) else {
                    continue;
                };
                let id = scrape.id();
                let levels = levels.clone();
                let task = tokio::spawn(async move {
                    let mut stream = stream;
                    let head =
                        match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
                            Ok(Ok(head)) => head,
                            // Timed out, closed, or failed: just close.
                            _ => return,
                        };
                    scrape.answering();
                    let _ =
                        tokio::time::timeout(ANSWER_TIMEOUT, answer(head, stream, &*levels)).await;
                });
                scrapes.set_closer(id, task.abort_handle());
                if let Some((_, Some(closer))) = evicted {
                    closer.abort();
                    // The aborted task is dropped, and its socket closed,
                    // before the next accept: the port never holds more
                    // descriptors than its caps.
                    tokio::task::yield_now().await;
                }
            }
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A request head, or as much of it as came before the peer stopped
/// sending (or its limit).
enum Head {
    /// The bytes read.
    Read(Vec<u8>),
    /// Larger than [`MAX_REQUEST`].
    TooLarge,
}

/// Reads one request head: up to its blank line, the peer's end of
/// sending, or [`MAX_REQUEST`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return Ok(Head::TooLarge);
        }
    }
    Ok(Head::Read(head))
}

/// Answers one request head.
async fn answer(
    head: Head,
    mut stream: TcpStream,
    levels: &(dyn Fn() -> Levels + Send + Sync),
) -> std::io::Result<()> {
    let head = match head {
        Head::Read(head) => head,
        Head::TooLarge => {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await
        }
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            // Prometheus asks for OpenMetrics in its Accept header.
            let openmetrics = String::from_utf8_lossy(&head)
                .to_ascii_lowercase()
                .contains("application/openmetrics-text");
            let body = metrics().render(&levels(), openmetrics);
            let content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            respond(&mut stream, "200 OK", content_type, &body).await
        }
        ("GET", "/status") => {
            let body = metrics().status(&levels());
            respond(&mut stream, "200 OK", "text/plain; charset=utf-8", &body).await
        }
        ("GET", "/") => {
            let body = "ppserver: see /metrics (Prometheus) and /status\n";
            respond(&mut stream, "200 OK", "text/plain; charset=utf-8", body).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "GET only\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_sample() {
        let om = "# HELP x_jobs Jobs.\n# TYPE x_jobs counter\nx_jobs_total 3\n\
                  # HELP x_mem Memory.\n# TYPE x_mem gauge\n# UNIT x_mem bytes\nx_mem 7\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP x_jobs_total Jobs.\n# TYPE x_jobs_total counter\nx_jobs_total 3\n\
             # HELP x_mem Memory.\n# TYPE x_mem gauge\nx_mem 7\n"
        );
    }

    #[test]
    fn connections_are_shown_by_kind_and_address() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let mut a = m.connection(ip, ConnKind::PreAuth);
        let b = m.connection(ip, ConnKind::PreAuth);
        a.become_kind(ConnKind::Exec);
        assert_eq!(m.lock_clients()[&ip], [1, 0, 1]);
        drop(b);
        drop(a);
        assert!(
            m.lock_clients().get(&ip).is_none(),
            "gone with its last connection"
        );
        assert_eq!(m.connections.get_or_create(&label("kind", "exec")).get(), 0);
    }

    /// A metrics port on a free loopback port, serving until aborted.
    async fn metrics_port() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let levels: LevelSource = Arc::new(Levels::default);
        (addr, tokio::spawn(serve(listener, levels, |ip| ip)))
    }

    /// Whether the server has closed `s` (EOF), without waiting.
    fn closed(s: &TcpStream) -> bool {
        matches!(s.try_read(&mut [0u8; 16]), Ok(0))
    }

    #[tokio::test]
    async fn idle_connections_from_one_address_make_room_for_a_request() {
        use crate::ops::scrapes::MAX_SCRAPES_PER_ADDRESS;
        let (addr, server) = metrics_port().await;
        let mut idle = Vec::new();
        for _ in 0..3 * MAX_SCRAPES_PER_ADDRESS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        // Each connection past the cap closed the address's oldest idle
        // one; the newest idle ones are still open.
        let open = idle.iter().filter(|c| !closed(c)).count();
        assert_eq!(open, MAX_SCRAPES_PER_ADDRESS - 1);
        assert!(idle[..idle.len() - open].iter().all(closed));
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_head_that_never_comes_is_closed() {
        let (addr, server) = metrics_port().await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(silent.read(&mut [0u8; 16]).await.unwrap(), 0);
        assert_eq!(partial.read(&mut [0u8; 16]).await.unwrap(), 0);
        // Paused time: the clock moved only as far as the timeout.
        assert!(started.elapsed() >= HEAD_TIMEOUT);
        server.abort();
    }
}
