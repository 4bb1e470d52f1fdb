//! `--worker-memory-limit`: how a worker's memory is held to the limit, and
//! the answer a job gets when its worker went over it.
//!
//! A job that eats all the memory of a shared machine takes every other
//! job (and the server) down with it, and the kernel's OOM killer picks
//! its victim without regard to whose fault it was. Here the job's own
//! worker is stopped with its process group, its client is told why, and
//! a fresh worker takes the slot ([`crate::workers::pool`] does that, as
//! for `--job-timeout`).
//!
//! [`MemoryLimit::new`] picks the method once, at startup, and never fails:
//! 1. a memory cgroup v2 per slot, where the server can make child
//!    cgroups (a delegated subtree, as under systemd's `Delegate=yes`, or
//!    as root): the kernel holds the worker and every process its jobs
//!    start to the limit, exactly, and OOM-kills the whole cgroup;
//! 2. a cgroup v1 memory controller cgroup per slot, the same on hosts
//!    that still mount v1 (the kernel kills one process in it, we stop the
//!    rest);
//! 3. else polling every [`POLL`] the PSS of each busy worker's process
//!    group (the worker and what its jobs started without leaving the
//!    group, found by [`reaper::group_members`]): a peak shorter than the
//!    period can pass, and so can a process that left the group (`setsid`),
//!    but it needs nothing from the host.
//!
//! `PPSERVER_WORKER_MEMORY_CGROUP=0` skips the cgroups: a way out where
//! the cgroup setup misbehaves, and how tests reach the polling on hosts
//! where cgroups work.
//!
//! The cgroups go at the server's stop ([`MemoryLimit::cleanup`]), or when
//! the [`MemoryLimit`] is dropped without it, as a panic that unwinds out
//! of the runtime does. Those of a server killed by SIGKILL are removed by
//! the next server's setup in the same cgroup, once their pid is no
//! running ppserver.
//!
//! A worker's [`Watch`] completes [`Watch::breached`] while a job runs once
//! the limit was hit (its cgroup's `oom_kill` count rose, or its group's
//! PSS is over), and says after a worker died whether the cgroup's OOM
//! killer did it ([`Watch::killed_by_limit`]), so that death is answered
//! as the limit and not as a crash.
//!
//! Jobs run with the server's uid, which owns the slots' cgroup files: a
//! job can lift its cgroup's limit, or move its worker out of the cgroup.
//! So the limit is written again whenever a worker joins its slot's
//! cgroup ([`watch`]), and every check while a job runs, and one after
//! each job ([`Watch::escaped`]), reads where the worker is
//! (`/proc/PID/cgroup`) and what the limit files say: a worker out of
//! bounds ([`Breach::Left`], [`Breach::Changed`]) is stopped and replaced
//! as one over the limit is. That guards against runaway jobs, not against
//! jobs that set out to get around the limit: one that acts between two
//! checks has its way for that moment, and a process a job moves out of
//! the cgroup is not watched. Workers run as their user's uid (`uid` in
//! the users file, [`crate::workers::identity`]) are held for good: the
//! cgroup files stay root's, so their jobs can neither write the limits
//! nor move a process out; and root still moves them in, reads their
//! `/proc` and kills them. Separate uids per user are what make it a
//! boundary.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::WorkerMemoryLimit;
use crate::jobs::scheduler::Job;
use crate::ops::metrics::metrics;
use crate::workers::reaper;

/// How often a running job's worker is checked: often enough that a
/// runaway allocation is caught within a fraction of a second, rarely
/// enough that reading `smaps_rollup` (a walk of the page tables) costs
/// nothing noticeable.
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// Set to `0`, the server does without cgroups (polling).
pub(crate) const CGROUP_ENV: &str = "PPSERVER_WORKER_MEMORY_CGROUP";

/// How long [`MemoryLimit::cleanup`] keeps trying to remove a cgroup whose
/// last processes are still exiting.
const CLEANUP_TRIES: u32 = 40;
const CLEANUP_PAUSE: Duration = Duration::from_millis(50);

/// The limit and how it is held; built once by the server, shared by the
/// slots' supervisors.
#[derive(Debug)]
pub(crate) struct MemoryLimit {
    /// The limit in bytes.
    bytes: u64,
    /// As the user wrote it (`200M`), repeated in the answer.
    text: String,
    method: Method,
    /// Set once the cgroups were removed: at the server's stop, else when
    /// this is dropped, as it is when a panic unwinds out of the runtime.
    cleaned: AtomicBool,
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[derive(Debug)]
enum Method {
    /// One cgroup v2 per slot, beside the leaf the server moved into.
    V2(V2Groups),
    /// One cgroup per slot under `ppserver-<pid>` in the v1 memory
    /// hierarchy.
    V1 {
        /// `ppserver-<pid>`, removed at exit.
        parent: PathBuf,
        /// The slots' cgroups, by slot.
        slots: Vec<PathBuf>,
    },
    /// No cgroup; `why` says why not, for the startup line.
    Polling { why: String },
}

/// Which cgroup version a slot's cgroup is of: their files differ.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2,
}

impl Version {
    /// The file whose `oom_kill` line counts the cgroup's OOM kills.
    fn events(self) -> &'static str {
        match self {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        }
    }

    /// The files [`set_limits`] writes, read back at every check.
    fn limit_files(self) -> &'static [&'static str] {
        match self {
            Version::V1 => &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
            Version::V2 => &["memory.max", "memory.swap.max", "memory.oom.group"],
        }
    }

    /// The line of `/proc/PID/cgroup` (`text`) that says where the process
    /// is in this version's memory hierarchy.
    fn line(self, text: &str) -> Option<&str> {
        text.lines().find(|l| match self {
            Version::V1 => own_cgroup_v1(l, "memory").is_some(),
            Version::V2 => own_cgroup_v2(l).is_some(),
        })
    }
}

/// What the v2 setup made, to be undone at exit.
#[derive(Debug)]
struct V2Groups {
    /// The cgroup the server started in.
    own: PathBuf,
    /// The leaf it moved into, since a cgroup with processes of its own
    /// cannot hand controllers to its children (the no-internal-processes
    /// rule).
    server: PathBuf,
    /// The slots' cgroups, by slot.
    slots: Vec<PathBuf>,
    /// Whether the server turned the memory controller on for `own`'s
    /// children (and so turns it off again).
    enabled_memory: bool,
    /// The processes moved from `own` into `server`: the server, then its
    /// children of the time (the fork-server). All go back before `server`
    /// is removed, since removing a cgroup kills what is still in it.
    moved: Vec<u32>,
}

impl V2Groups {
    /// Undoes the setup, or what of it was done: the slots' cgroups go,
    /// the memory controller is turned off again if the server turned it
    /// on, every process moved goes back to `own` (a process gone since
    /// is skipped), and the leaf goes.
    fn remove(&self) {
        for dir in &self.slots {
            remove_group(dir);
        }
        // A reload's new server, whose cgroups are beside ours, still
        // needs the controller.
        if self.enabled_memory && !others_beside(&self.own) {
            let _ = std::fs::write(self.own.join("cgroup.subtree_control"), "-memory");
        }
        for &pid in self.moved.iter().rev() {
            let _ = move_into(&self.own, pid);
        }
        remove_group(&self.server);
    }
}

/// Startup step, the last that can fail the start (cgroups made from here
/// on are removed at stop): `--worker-memory-limit` set up for `slots`
/// slots, on a blocking thread: making cgroups, moving processes between
/// them and removing what a failed setup made wait on the kernel (and on
/// processes it kills), never on the runtime's only thread.
pub(crate) async fn set_up(
    limit: Option<&WorkerMemoryLimit>,
    slots: usize,
) -> Option<Arc<MemoryLimit>> {
    let limit = limit?.clone();
    let polled = limit.clone();
    let made = match tokio::task::spawn_blocking(move || MemoryLimit::new(&limit, slots)).await {
        Ok(m) => m,
        Err(e) => MemoryLimit::polling(&polled, format!("the cgroup setup failed: {e}")),
    };
    Some(Arc::new(made))
}

impl MemoryLimit {
    /// Sets the limit up for `slots` worker slots by the first method that
    /// works here; what failed is kept for [`MemoryLimit::describe`]. Waits
    /// on the kernel: called on a blocking thread.
    pub(crate) fn new(limit: &WorkerMemoryLimit, slots: usize) -> MemoryLimit {
        if std::env::var_os(CGROUP_ENV).is_some_and(|v| v == "0") {
            return MemoryLimit::polling(limit, format!("{CGROUP_ENV}=0"));
        }
        MemoryLimit {
            bytes: limit.bytes,
            text: limit.text.clone(),
            method: cgroups(limit.bytes, slots),
            cleaned: AtomicBool::new(false),
        }
    }

    /// The limit held by polling, `why` no cgroup.
    pub(crate) fn polling(limit: &WorkerMemoryLimit, why: String) -> MemoryLimit {
        MemoryLimit {
            bytes: limit.bytes,
            text: limit.text.clone(),
            method: Method::Polling { why },
            cleaned: AtomicBool::new(false),
        }
    }

    /// For the startup line: the limit and how it is held.
    pub(crate) fn describe(&self) -> String {
        let how = match &self.method {
            Method::V2(g) => format!(
                "memory cgroup v2 ({})",
                g.own.join(format!("{}-worker-N", prefix())).display()
            ),
            Method::V1 { parent, .. } => format!(
                "cgroup v1 memory controller ({})",
                parent.join("worker-N").display()
            ),
            Method::Polling { why } => format!(
                "polling the PSS of each worker's process group every {} ms (no cgroup: {why})",
                POLL.as_millis()
            ),
        };
        format!("worker memory limit {} by {how}", self.text)
    }

    /// The cgroup of `slot` and its kind; `None` when polling.
    fn slot_group(&self, slot: usize) -> Option<(PathBuf, Version)> {
        match &self.method {
            Method::V2(g) => Some((g.slots.get(slot)?.clone(), Version::V2)),
            Method::V1 { slots, .. } => Some((slots.get(slot)?.clone(), Version::V1)),
            Method::Polling { .. } => None,
        }
    }

    /// Removes the cgroups [`MemoryLimit::new`] made, once the workers are
    /// stopped: what is still in them (a job's detached child) is killed
    /// first, since a cgroup with processes cannot be removed. Failures are
    /// logged; nothing else depends on them. Only the first call does
    /// anything. Waits for killed processes to go: on a blocking thread.
    pub(crate) fn cleanup(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        match &self.method {
            Method::V2(g) => g.remove(),
            Method::V1 { parent, slots } => remove_v1(parent, slots),
            Method::Polling { .. } => {}
        }
    }
}

impl MemoryLimit {
    /// `cgroup.procs` of the cgroup the server started in, when it moved
    /// itself out of it into a leaf (cgroup v2). A reload's new server is
    /// moved back there before its exec: the leaf goes when the old server
    /// stops, killing what is still in it, and the new one makes its own.
    pub(crate) fn start_cgroup_procs(&self) -> Option<PathBuf> {
        match &self.method {
            Method::V2(g) => Some(g.own.join("cgroup.procs")),
            Method::V1 { .. } | Method::Polling { .. } => None,
        }
    }
}

/// Whether cgroups another server made are in `dir`.
fn others_beside(dir: &Path) -> bool {
    let me = std::process::id();
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .and_then(left_by)
                .is_some_and(|pid| pid != me)
        })
    })
}

/// `ppserver-<pid>`: the start of every cgroup's name, unique to this
/// server among those sharing its cgroup.
fn prefix() -> String {
    format!("ppserver-{}", std::process::id())
}

/// The cgroup methods in order of preference, or polling with both
/// reasons.
fn cgroups(bytes: u64, slots: usize) -> Method {
    let (own, mounts) = match (
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) {
        (Ok(own), Ok(mounts)) => (own, mounts),
        (Err(e), _) => {
            return Method::Polling {
                why: format!("cannot read /proc/self/cgroup: {e}"),
            }
        }
        (_, Err(e)) => {
            return Method::Polling {
                why: format!("cannot read /proc/self/mountinfo: {e}"),
            }
        }
    };
    let v2 = match v2_setup(&own, &mounts, bytes, slots) {
        Ok(groups) => return Method::V2(groups),
        Err(why) => why,
    };
    log::debug!("worker memory limit: no cgroup v2: {v2}");
    match v1_setup(&own, &mounts, bytes, slots) {
        Ok((parent, slots)) => Method::V1 { parent, slots },
        Err(v1) => Method::Polling {
            why: format!("cgroup v2: {v2}; cgroup v1: {v1}"),
        },
    }
}

/// The server's children among the processes of cgroup `dir`.
fn children_in(dir: &std::path::Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return Vec::new();
    };
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter(|&pid| parent_of(pid) == Some(me))
        .collect()
}

/// The parent of `pid`, from `/proc/PID/stat` (fields counted from the
/// last `)`, as the command name may hold anything).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The v2 setup: the server into a leaf of its cgroup, the memory
/// controller on for the cgroup's children, one cgroup per slot. Anything
/// that fails undoes what was done, every process it moved put back, and
/// says why.
fn v2_setup(own: &str, mounts: &str, bytes: u64, slots: usize) -> Result<V2Groups, String> {
    let path = own_cgroup_v2(own).ok_or("the server is in no cgroup v2")?;
    let dir = find_mount(mounts, "cgroup2", None, path)
        .ok_or_else(|| format!("no cgroup2 mount holds {path}"))?;
    v2_setup_in(&dir, bytes, slots)
}

/// [`v2_setup`] in the server's cgroup `dir`.
fn v2_setup_in(dir: &Path, bytes: u64, slots: usize) -> Result<V2Groups, String> {
    let dir = dir.to_path_buf();
    let controllers = read(&dir.join("cgroup.controllers"))?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(format!("no memory controller in {}", dir.display()));
    }
    let subtree = read(&dir.join("cgroup.subtree_control"))?;
    remove_stale(&dir);
    let mut groups = V2Groups {
        own: dir.clone(),
        server: dir.join(format!("{}-server", prefix())),
        slots: Vec::new(),
        enabled_memory: !subtree.split_whitespace().any(|c| c == "memory"),
        moved: Vec::new(),
    };
    let done = (|| {
        make_dir(&groups.server)?;
        let me = std::process::id();
        move_into(&groups.server, me)?;
        groups.moved.push(me);
        // The children started before this (the fork-server) go with the
        // server: none may be left where the controller is turned on.
        for child in children_in(&dir) {
            if move_into(&groups.server, child).is_ok() {
                groups.moved.push(child);
            }
        }
        write(&dir.join("cgroup.subtree_control"), "+memory").map_err(|e| {
            format!("{e} (other processes share the server's cgroup, or it is not delegated)")
        })?;
        for slot in 0..slots {
            let group = dir.join(format!("{}-worker-{slot}", prefix()));
            make_dir(&group)?;
            groups.slots.push(group.clone());
            set_limits(&group, Version::V2, bytes)?;
        }
        Ok::<(), String>(())
    })();
    match done {
        Ok(()) => Ok(groups),
        Err(why) => {
            groups.remove();
            Err(why)
        }
    }
}

/// The v1 setup: `ppserver-<pid>/worker-<slot>` under the server's memory
/// cgroup. Returns the parent and the slots' cgroups.
fn v1_setup(
    own: &str,
    mounts: &str,
    bytes: u64,
    slots: usize,
) -> Result<(PathBuf, Vec<PathBuf>), String> {
    let path = own_cgroup_v1(own, "memory").ok_or("no memory controller mounted")?;
    let dir = find_mount(mounts, "cgroup", Some("memory"), path)
        .ok_or_else(|| format!("no cgroup mount of the memory controller holds {path}"))?;
    remove_stale(&dir);
    let parent = dir.join(prefix());
    let mut made = Vec::new();
    let done = (|| {
        make_dir(&parent)?;
        for slot in 0..slots {
            let group = parent.join(format!("worker-{slot}"));
            make_dir(&group)?;
            made.push(group.clone());
            set_limits(&group, Version::V1, bytes)?;
        }
        Ok::<(), String>(())
    })();
    match done {
        Ok(()) => Ok((parent, made)),
        Err(why) => {
            remove_v1(&parent, &made);
            Err(why)
        }
    }
}

/// Sets the limit of cgroup `dir` to `bytes`: the memory limit must take;
/// the swap limit (there only with swap accounting: without it a worker
/// could swap instead of being stopped, which only makes it slower) and
/// v2's kill of the whole cgroup (the worker is stopped anyway) are best
/// effort. Done at the setup and again before every worker joins, since a
/// job can write these files.
fn set_limits(dir: &Path, version: Version, bytes: u64) -> Result<(), String> {
    let value = bytes.to_string();
    match version {
        Version::V2 => {
            write(&dir.join("memory.max"), &value)?;
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            let _ = std::fs::write(dir.join("memory.oom.group"), "1");
        }
        Version::V1 => {
            let limit = dir.join("memory.limit_in_bytes");
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            // The kernel keeps memsw at or above the memory limit: one
            // lowered below `bytes` has to rise first.
            if write(&limit, &value).is_err() {
                let _ = std::fs::write(&memsw, &value);
                write(&limit, &value)?;
            }
            let _ = std::fs::write(&memsw, &value);
        }
    }
    Ok(())
}

/// Removes the v1 cgroups: the slots', then their parent.
fn remove_v1(parent: &Path, slots: &[PathBuf]) {
    for dir in slots {
        remove_group(dir);
    }
    remove_group(parent);
}

/// Moves process `pid` into cgroup `dir`. Appended, as `echo PID >>`
/// would: a cgroup file takes each write as it comes either way.
fn move_into(dir: &Path, pid: u32) -> Result<(), String> {
    let path = dir.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{pid}\n").as_bytes()))
        .map_err(|e| format!("cannot move pid {pid} into {}: {e}", dir.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

fn make_dir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        // Left by an earlier server that had this pid and was killed.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r.map_err(|e| format!("cannot create {}: {e}", path.display())),
    }
}

/// Removes the cgroups in `dir` that a server no longer running left
/// behind (killed by SIGKILL, or gone some other way without its cleanup):
/// `ppserver-PID` (v1), `ppserver-PID-server` and `ppserver-PID-worker-N`
/// (v2), whose PID is no process or a process that is not a ppserver.
/// What is still in them is killed, as at a server's own cleanup. A live
/// server's cgroups, this one's included, are never touched.
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(left_by) else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) || ppserver_runs(pid) {
            continue;
        }
        let group = entry.path();
        remove_tree(&group);
        if !group.exists() {
            log::info!(
                "removed the cgroup {} that ppserver pid {pid}, no longer running, left behind",
                group.display()
            );
        }
    }
}

/// The server pid in the name of a cgroup a server makes, else `None`.
fn left_by(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ppserver-")?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (pid, tail) = rest.split_at(digits);
    let slot = tail.strip_prefix("-worker-");
    let ours = tail.is_empty()
        || tail == "-server"
        || slot.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    ours.then(|| pid.parse().ok()).flatten()
}

/// Whether `pid` is a running ppserver, this one included: a process whose
/// name starts with `ppserver` (`ppserver`, `ppserver-rs`; the name of a
/// renamed binary is not, so one running this same executable counts
/// too). A process that cannot be looked at counts as one: only the
/// cgroups of a pid that is surely no ppserver are removed.
fn ppserver_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => comm.starts_with("ppserver") || same_executable(pid),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => false,
        Err(_) => true,
    }
}

/// Whether process `pid` runs the executable this server runs.
fn same_executable(pid: u32) -> bool {
    match (
        std::fs::read_link(format!("/proc/{pid}/exe")),
        std::fs::read_link("/proc/self/exe"),
    ) {
        (Ok(theirs), Ok(mine)) => theirs == mine,
        _ => false,
    }
}

/// Removes cgroup `dir` and the cgroups under it, the deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    remove_group(dir);
}

/// Removes a cgroup, killing what is still in it; a process just killed
/// takes a moment to leave, hence the tries.
fn remove_group(dir: &Path) {
    let mut last = None;
    for _ in 0..CLEANUP_TRIES {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                kill_members(dir);
                last = Some(e);
                std::thread::sleep(CLEANUP_PAUSE);
            }
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    if let Some(e) = last {
        log::warn!("cannot remove the cgroup {}: {e}", dir.display());
    }
}

/// SIGKILLs every process in a cgroup: at exit, only what jobs left there.
fn kill_members(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    let me = std::process::id();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // Never the server itself (a v2 leaf it could not leave).
        if pid > 1 && pid as u32 != me {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Watches one worker for the limit; made by [`watch`] once it started.
#[derive(Debug)]
pub(crate) struct Watch {
    /// `None` without `--worker-memory-limit`: never fires.
    limit: Option<Watched>,
}

#[derive(Debug)]
struct Watched {
    pid: u32,
    bytes: u64,
    text: String,
    /// The slot's cgroup as the worker joined it; `None`: polling.
    joined: Option<Arc<Joined>>,
    /// The cgroup's OOM kill count when the running job started (or the
    /// worker joined): kills before it were not this job's doing.
    at_start: u64,
}

/// A worker in its slot's cgroup, as it was when it joined: what every
/// check compares with.
#[derive(Debug)]
struct Joined {
    version: Version,
    /// `memory.events` (v2) or `memory.oom_control` (v1).
    events: PathBuf,
    /// The worker's line of `/proc/PID/cgroup` for the memory hierarchy.
    line: String,
    /// The cgroup's limit files and what each read once set.
    limits: Vec<(PathBuf, String)>,
}

impl Joined {
    /// The cgroup's OOM kills so far. A cgroup file is read straight away:
    /// no page tables to walk, no lock held for long.
    fn oom_kills(&self) -> Option<u64> {
        std::fs::read_to_string(&self.events)
            .ok()
            .and_then(|t| oom_kills(&t))
    }

    /// One check while a job runs: the OOM killer struck since `at_start`,
    /// or the worker got out of the limit.
    fn check(&self, pid: u32, at_start: u64) -> Option<Breach> {
        if self.oom_kills().is_some_and(|n| n > at_start) {
            return Some(Breach::Over);
        }
        self.escaped(pid)
    }

    /// Whether worker `pid` left its cgroup, or a limit file of the cgroup
    /// no longer reads what was set: jobs run with the uid that owns these
    /// files. What cannot be read is not held against the worker (a worker
    /// that is gone is its pipes' to tell).
    fn escaped(&self, pid: u32) -> Option<Breach> {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            // A process that exited may show another cgroup already.
            if self.version.line(&text) != Some(self.line.as_str()) && running(pid) {
                return Some(Breach::Left);
            }
        }
        self.limits.iter().find_map(|(file, set)| {
            let now = std::fs::read_to_string(file).ok()?;
            let name = file.file_name()?.to_string_lossy().into_owned();
            (now != *set).then_some(Breach::Changed(name))
        })
    }
}

/// How a worker got out of its limit while it ran a job, or between jobs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Breach {
    /// Its memory went over the limit.
    Over,
    /// The worker is no longer in its slot's cgroup.
    Left,
    /// This limit file of the slot's cgroup reads other than was set.
    Changed(String),
}

impl Breach {
    /// The worker restart's cause and the answer's reason in the metrics.
    pub(crate) fn cause(&self) -> &'static str {
        match self {
            Breach::Over => "memory_limit",
            Breach::Left | Breach::Changed(_) => "memory_cgroup",
        }
    }

    /// What happened, for the log.
    fn what(&self, limit: &str) -> String {
        match self {
            Breach::Over => format!("went over --worker-memory-limit of {limit}"),
            Breach::Left => format!(
                "its worker left its memory cgroup, escaping --worker-memory-limit of {limit}"
            ),
            Breach::Changed(file) => format!(
                "the limit of its worker's memory cgroup was changed ({file}), escaping \
                 --worker-memory-limit of {limit}"
            ),
        }
    }

    /// The output a pp client shows for a job stopped by the limit.
    fn text(&self, limit: &str, host: &str) -> String {
        match self {
            Breach::Over => format!("job exceeded --worker-memory-limit of {limit} on {host}\n"),
            Breach::Left => format!(
                "job stopped: the worker left its memory cgroup, escaping \
                 --worker-memory-limit of {limit} on {host}\n"
            ),
            Breach::Changed(file) => format!(
                "job stopped: the limit of the worker's memory cgroup was changed ({file}), \
                 escaping --worker-memory-limit of {limit} on {host}\n"
            ),
        }
    }
}

/// Whether process `pid` exists and has not exited.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|close| stat[close + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// A [`Watch`] on a worker (`pid`) that just started in `slot`: with a
/// cgroup, the slot's limit is set afresh (a job of the slot's last worker
/// may have changed it), the worker put in the cgroup (a worker that cannot
/// be is polled instead), and what a check compares with noted.
pub(crate) async fn watch(limit: Option<&MemoryLimit>, slot: usize, pid: u32) -> Watch {
    let Some(limit) = limit else {
        return Watch { limit: None };
    };
    let bytes = limit.bytes;
    let (joined, at_start) = match limit.slot_group(slot) {
        Some((dir, version)) => {
            // Moving a process between cgroups can wait on a kernel lock:
            // off the runtime's only thread.
            let joined = tokio::task::spawn_blocking(move || join(&dir, version, bytes, pid)).await;
            match joined {
                Ok(Ok((joined, at_start))) => (Some(Arc::new(joined)), at_start),
                Ok(Err(e)) => {
                    log::warn!(
                        "slot {slot}: cannot put worker pid {pid} in its memory cgroup ({e}); \
                         its PSS is polled instead"
                    );
                    (None, 0)
                }
                Err(e) => {
                    log::warn!("slot {slot}: worker pid {pid}: {e}; its PSS is polled instead");
                    (None, 0)
                }
            }
        }
        None => (None, 0),
    };
    Watch {
        limit: Some(Watched {
            pid,
            bytes,
            text: limit.text.clone(),
            joined,
            at_start,
        }),
    }
}

/// Sets the limit of cgroup `dir`, puts `pid` in it, and notes where the
/// worker is, what the limit files read and the OOM kill count.
fn join(dir: &Path, version: Version, bytes: u64, pid: u32) -> Result<(Joined, u64), String> {
    set_limits(dir, version, bytes)?;
    move_into(dir, pid)?;
    let cgroup = read(Path::new(&format!("/proc/{pid}/cgroup")))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let line = version
        .line(&cgroup)
        .filter(|l| name.is_some_and(|n| l.ends_with(&format!("/{n}"))))
        .ok_or_else(|| format!("pid {pid} is not in {} after all", dir.display()))?
        .to_string();
    let limits = version
        .limit_files()
        .iter()
        .map(|f| dir.join(f))
        .filter_map(|file| Some((file.clone(), std::fs::read_to_string(&file).ok()?)))
        .collect();
    let events = dir.join(version.events());
    // A kernel too old to count OOM kills: the kill is still noticed as a
    // death, only not told apart from a crash.
    let at_start = oom_kills(&read(&events)?).unwrap_or(0);
    Ok((
        Joined {
            version,
            events,
            line,
            limits,
        },
        at_start,
    ))
}

impl Watch {
    /// Completes once the worker's job (the one running when it is first
    /// polled) broke the limit: its cgroup's OOM killer struck (maybe at a
    /// child of the job rather than the worker, which must then be stopped
    /// all the same), or, polling, its process group's PSS is over; or,
    /// with a cgroup, the worker left it or its limit was changed. Checked
    /// every [`POLL`]; never without a limit. Safe to cancel in a
    /// `select!`.
    pub(crate) async fn breached(&mut self) -> Breach {
        let Some(w) = &mut self.limit else {
            return std::future::pending().await;
        };
        if let Some(joined) = &w.joined {
            // A job whose child was killed may have answered before this
            // noticed; the next job is not to blame for that kill.
            w.at_start = joined.oom_kills().unwrap_or(w.at_start);
        }
        loop {
            tokio::time::sleep(POLL).await;
            let (pid, bytes, at_start) = (w.pid, w.bytes, w.at_start);
            let joined = w.joined.clone();
            // Reading /proc/PID/cgroup can wait on the kernel's cgroup
            // lock, and smaps_rollup walks page tables: on a blocking
            // thread, not the runtime's.
            let found = tokio::task::spawn_blocking(move || match joined {
                Some(joined) => joined.check(pid, at_start),
                // Unreadable: the worker is gone, which its pipes say.
                None => group_memory(pid)
                    .filter(|&used| used > bytes)
                    .map(|_| Breach::Over),
            })
            .await;
            if let Ok(Some(breach)) = found {
                return breach;
            }
        }
    }

    /// Whether the worker, between two jobs, left its cgroup or had its
    /// limit changed: a job that did so and answered before a check saw it
    /// must not leave the next job on a worker out of bounds. Always `None`
    /// when polling.
    pub(crate) async fn escaped(&self) -> Option<Breach> {
        let w = self.limit.as_ref()?;
        let (joined, pid) = (w.joined.clone()?, w.pid);
        tokio::task::spawn_blocking(move || joined.escaped(pid))
            .await
            .ok()
            .flatten()
    }

    /// Whether the worker, now dead, was killed by its cgroup's OOM killer
    /// (its count rose since it joined). Always false when polling.
    pub(crate) fn killed_by_limit(&self) -> bool {
        self.limit.as_ref().is_some_and(|w| {
            w.joined
                .as_ref()
                .and_then(|j| j.oom_kills())
                .is_some_and(|n| n > w.at_start)
        })
    }

    /// What `breach` means, with the limit, for a log line.
    pub(crate) fn what(&self, breach: &Breach) -> String {
        breach.what(self.limit.as_ref().map_or("?", |w| w.text.as_str()))
    }

    /// Tells the client why its job was stopped, once the worker that ran
    /// it is gone.
    pub(crate) fn answer(&self, job: Job, breach: &Breach, pid: u32, how: &str, host: &str) {
        let limit = self.limit.as_ref().map_or("?", |w| w.text.as_str());
        log::warn!(
            "job {} from {}: {}; its worker pid {pid} was stopped ({how}) and is replaced",
            job.id,
            job.origin(),
            breach.what(limit)
        );
        metrics().server_answered(breach.cause(), &job.user.name);
        job.fail(&breach.text(limit, host));
    }
}

/// The memory of worker `pid`'s process group: the worker's own, and that
/// of every process its jobs started that is still in its group, wherever
/// it was reparented; `None` once the worker is gone.
fn group_memory(pid: u32) -> Option<u64> {
    let own = memory_of(pid)?;
    Some(
        reaper::group_members(pid)
            .into_iter()
            .filter_map(memory_of)
            .fold(own, u64::saturating_add),
    )
}

/// A process's memory in bytes: its PSS (shared pages counted in part, so
/// what a worker shares with its fork-server or siblings is not counted in
/// full to each), else its RSS on kernels without `smaps_rollup`.
fn memory_of(pid: u32) -> Option<u64> {
    if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        if let Some(pss) = kib_field(&rollup, "Pss:") {
            return Some(pss);
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, "VmRSS:")
}

/// The value in bytes of a `Key:   123 kB` line.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The `oom_kill N` line of `memory.events` (v2) or `memory.oom_control`
/// (v1).
fn oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next()? == "oom_kill").then(|| words.next()?.parse().ok())?
    })
}

/// The server's cgroup v2 path: the `0::/path` line of /proc/self/cgroup.
fn own_cgroup_v2(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The server's path in the v1 hierarchy of `controller`: the
/// `N:a,b:/path` line whose list has it.
fn own_cgroup_v1<'a>(text: &'a str, controller: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let mut fields = l.splitn(3, ':');
        let _id = fields.next()?;
        let controllers = fields.next()?;
        let path = fields.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })
}

/// One line of /proc/self/mountinfo, the fields used here.
#[derive(Debug, PartialEq)]
struct Mount {
    /// The directory of the file system the mount shows.
    root: String,
    /// Where it is mounted.
    point: PathBuf,
    fstype: String,
    /// The per-filesystem options, where a v1 mount lists its controllers.
    options: String,
}

/// `id parent major:minor root point options [optional...] - fstype
/// source super-options`.
fn parse_mount(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    Some(Mount {
        root: unescape(left.get(3)?),
        point: PathBuf::from(unescape(left.get(4)?)),
        fstype: right.next()?.to_string(),
        options: right.nth(1).unwrap_or("").to_string(),
    })
}

/// mountinfo writes space, tab, newline and backslash as `\NNN` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match code {
            Some(d) if bytes[i] == b'\\' => {
                let n = d.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0'));
                out.push(n as u8);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of the cgroup `path` in the first mount of `fstype` (with
/// `option`, for a v1 controller) that shows it.
fn find_mount(mountinfo: &str, fstype: &str, option: Option<&str>, path: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(parse_mount)
        .filter(|m| m.fstype == fstype)
        .filter(|m| option.is_none_or(|o| m.options.split(',').any(|x| x == o)))
        .find_map(|m| cgroup_dir(&m, path))
}

/// Where cgroup `path` is under mount `m`, if the mount shows it: a mount
/// of a subtree (a container's) shows only the paths under its root.
fn cgroup_dir(m: &Mount, path: &str) -> Option<PathBuf> {
    let rest = if m.root == "/" {
        path
    } else if path == m.root {
        ""
    } else {
        path.strip_prefix(m.root.as_str())?.strip_prefix('/')?
    };
    let rest = rest.trim_start_matches('/');
    Some(if rest.is_empty() {
        m.point.clone()
    } else {
        m.point.join(rest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_of_a_process_is_read_from_its_stat() {
        let me = std::process::id();
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw() as u32));
        assert_eq!(parent_of(u32::MAX), None);
    }

    #[test]
    fn a_failed_v2_setup_moves_every_process_it_moved_back() {
        // A plain directory laid out as a cgroup v2 with the memory
        // controller, where turning it on for the children fails (here:
        // cgroup.subtree_control cannot be written, even by root), as when
        // other processes share the server's cgroup. A process in it that
        // is a child of this one stands for the fork-server.
        let root = std::env::temp_dir().join(format!("{}-v2-test", prefix()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        std::os::unix::fs::symlink("/proc/version", root.join("cgroup.subtree_control")).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let _registered = crate::workers::reaper::register(child.id());
        std::fs::write(root.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
        // The server's leaf as the kernel makes it, with its cgroup.procs.
        let leaf = root.join(format!("{}-server", prefix()));
        std::fs::create_dir(&leaf).unwrap();
        std::fs::write(leaf.join("cgroup.procs"), "").unwrap();

        let failed = v2_setup_in(&root, 100 << 20, 2);
        let pids = |dir: &Path| -> Vec<u32> {
            std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap()
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect()
        };
        let (moved_in, back) = (pids(&leaf), pids(&root));
        let _ = child.kill();
        let _ = child.wait();
        std::fs::remove_dir_all(&root).unwrap();
        assert!(failed.is_err());
        assert!(
            moved_in.contains(&child.id()),
            "the setup moved it: {moved_in:?}"
        );
        // Its line as written above, and the one that moves it back.
        let child_lines = back.iter().filter(|&&p| p == child.id()).count();
        assert_eq!(child_lines, 2, "the child was not moved back: {back:?}");
        assert!(back.contains(&std::process::id()), "{back:?}");
    }

    #[test]
    fn the_cgroups_a_server_makes_are_told_by_name() {
        assert_eq!(left_by("ppserver-123"), Some(123));
        assert_eq!(left_by("ppserver-123-server"), Some(123));
        assert_eq!(left_by("ppserver-123-worker-0"), Some(123));
        assert_eq!(left_by("ppserver-123-worker-17"), Some(123));
        for other in [
            "ppserver-",
            "ppserver-x",
            "ppserver-123-worker-",
            "ppserver-123-worker-1x",
            "ppserver-123-other",
            "ppserver-123x",
            "ppserver-99999999999999999999",
            "worker-0",
            "memory.max",
            "xppserver-123",
        ] {
            assert_eq!(left_by(other), None, "{other}");
        }
    }

    #[test]
    fn only_a_pid_that_is_no_running_ppserver_lets_its_cgroups_go() {
        assert!(ppserver_runs(std::process::id()), "this server's own");
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let _registered = crate::workers::reaper::register(other.id());
        assert!(!ppserver_runs(other.id()), "a process of another program");
        let _ = other.kill();
        let _ = other.wait();
        assert!(!ppserver_runs(other.id()), "no such process");
        assert!(!ppserver_runs(u32::MAX));
    }

    #[test]
    fn the_cgroups_go_when_the_limit_is_dropped_by_a_panic() {
        // Plain directories stand for the v1 cgroups: a panic that unwinds
        // out of the runtime drops the limit without the cleanup at stop.
        let parent = std::env::temp_dir().join(format!("{}-drop-test", prefix()));
        let slot = parent.join("worker-0");
        std::fs::create_dir_all(&slot).unwrap();
        let limit = MemoryLimit {
            bytes: 1 << 20,
            text: "1M".into(),
            method: Method::V1 {
                parent: parent.clone(),
                slots: vec![slot.clone()],
            },
            cleaned: AtomicBool::new(false),
        };
        let unwound = std::panic::catch_unwind(move || {
            let _held = limit;
            panic!("a bug");
        });
        assert!(unwound.is_err());
        assert!(!parent.exists(), "the cgroups were left behind");
    }

    #[test]
    fn the_own_cgroup_is_found_in_v1_and_v2_lines() {
        let hybrid = "9:name=systemd:/\n5:cpu,cpuacct:/\n4:memory:/process_api/e278\n0::/\n";
        assert_eq!(own_cgroup_v1(hybrid, "memory"), Some("/process_api/e278"));
        assert_eq!(own_cgroup_v1(hybrid, "cpu"), Some("/"));
        assert_eq!(own_cgroup_v1(hybrid, "pids"), None);
        assert_eq!(own_cgroup_v2(hybrid), Some("/"));
        let v2 = "0::/system.slice/ppserver.service\n";
        assert_eq!(own_cgroup_v2(v2), Some("/system.slice/ppserver.service"));
        assert_eq!(own_cgroup_v1(v2, "memory"), None);
    }

    #[test]
    fn mountinfo_lines_give_the_cgroup_directories() {
        let info = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(info, "cgroup", Some("memory"), "/process_api/e278"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/e278"))
        );
        assert_eq!(
            find_mount(info, "cgroup2", None, "/").unwrap().as_os_str(),
            "/sys/fs/cgroup/unified",
            "no trailing slash"
        );
        assert_eq!(find_mount(info, "cgroup", Some("pids"), "/"), None);
        // A container's mount of its own subtree, with a space escaped.
        let sub = "50 40 0:30 /docker/abc /sys/fs/cg\\040two rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let m = parse_mount(sub.trim_end()).unwrap();
        assert_eq!(m.root, "/docker/abc");
        assert_eq!(m.point, PathBuf::from("/sys/fs/cg two"));
        assert_eq!(m.options, "rw,nsdelegate");
        assert_eq!(
            find_mount(sub, "cgroup2", None, "/docker/abc/inner"),
            Some(PathBuf::from("/sys/fs/cg two/inner"))
        );
        assert_eq!(
            find_mount(sub, "cgroup2", None, "/docker/abc"),
            Some(PathBuf::from("/sys/fs/cg two"))
        );
        assert_eq!(find_mount(sub, "cgroup2", None, "/docker/abcd"), None);
        assert_eq!(find_mount(sub, "cgroup2", None, "/other"), None);
    }

    #[test]
    fn pss_and_rss_lines_are_read_in_bytes() {
        let rollup = "55eae7a05000-7ffe52ea4000 ---p 00000000 00:00 0  [rollup]\n\
                      Rss:                1772 kB\nPss:                 306 kB\n\
                      Pss_Dirty:           116 kB\n";
        assert_eq!(kib_field(rollup, "Pss:"), Some(306 * 1024));
        assert_eq!(kib_field(rollup, "Rss:"), Some(1772 * 1024));
        assert_eq!(
            kib_field("Name:\tpython\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2 << 20)
        );
        assert_eq!(kib_field("Pss_Anon: 3 kB\n", "Pss:"), None);
    }

    #[test]
    fn oom_kill_counts_are_read_from_v2_and_v1_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 1\n";
        assert_eq!(oom_kills(events), Some(1));
        let control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(oom_kills(control), Some(3));
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
    }

    #[tokio::test]
    async fn a_job_over_the_limit_is_answered_with_the_limit_as_given_and_host() {
        use crate::jobs::cache::PackageCache;
        use crate::jobs::scheduler::test_job;
        let c = PackageCache::new(1 << 20);
        let (job, rx) = test_job(&c, b"Na", "127.0.0.1");
        let limit = MemoryLimit {
            bytes: 200 << 20,
            text: "200M".into(),
            method: Method::Polling { why: "test".into() },
            cleaned: AtomicBool::new(false),
        };
        let watch = watch(Some(&limit), 0, 42).await;
        assert!(!watch.killed_by_limit(), "polling never says so");
        assert_eq!(watch.escaped().await, None, "nor that");
        watch.answer(job, &Breach::Over, 42, "killed by signal 9", "node7");
        assert_eq!(
            rx.await.unwrap(),
            crate::protocol::pickle::none_with_text(
                "job exceeded --worker-memory-limit of 200M on node7\n"
            )
        );
        assert_eq!(
            limit.describe(),
            "worker memory limit 200M by polling the PSS of each worker's process group every 100 ms (no cgroup: test)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_the_watch_never_fires() {
        let mut none = watch(None, 0, 42).await;
        let fired = tokio::time::timeout(Duration::from_secs(1 << 30), none.breached());
        assert!(fired.await.is_err());
        assert!(!none.killed_by_limit());
    }
}
