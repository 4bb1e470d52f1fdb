//! Processes that jobs leave behind. The server is a child subreaper, so a
//! job's descendant that loses its parent (a double fork, a `setsid`
//! daemon) is reparented to the server rather than to init; this module
//! reaps them as they die and kills whatever is left when the server stops.
//!
//! tokio reaps the server's own children (the workers) itself, and taking
//! their exit status would break its `wait`. So every child the server
//! starts goes through [`spawn`], which records its pid in a registry while
//! holding the lock that every scan holds too (no child can exist
//! unregistered while a scan runs), and only children missing from the
//! registry are waited for here, each by its own pid: never `waitpid(-1)`.
//!
//! Workers forked by the fork-server are handed to the server by the exit
//! of the process between them ([`crate::workers::process`]), so one can
//! be the server's child, and dead, before it is registered ([`register`]).
//! Such a fork is announced ([`Adopting`]) before it is asked for, with
//! the time since boot, and registered before the announcement ends; a
//! scan leaves alone a dead unregistered child that started at or after
//! the oldest fork still under way (its start time, `/proc/PID/stat`, can
//! be read while it is a zombie), and reaps the rest; what it left is
//! looked at again a scan later, without waiting for another SIGCHLD. A
//! worker's exit status is so always its owner's, and the orphans of jobs
//! are reaped even when, as with `-r`, some worker is nearly always on its
//! way.
//!
//! The subreaper setting is not inherited across `fork` (prctl(2)), so
//! workers and their children are plain processes.
//!
//! A reload's new server is the old one's child until the old one exits;
//! it is [`spare`]d: [`sweep`] leaves it and everything below it alone.
//!
//! [`group_members`] finds the processes of a worker's process group, whose
//! memory `--worker-memory-limit` counts when it polls.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The children the scans must leave alone.
struct Registry {
    /// Pids of the children that have an owner (spawned through [`spawn`]
    /// or [`register`]ed, and not yet dropped): never waited for here.
    own: BTreeSet<u32>,
    /// For each fork by the fork-server under way ([`Adopting`]), the
    /// earliest start time its worker can have, in clock ticks since boot.
    adopting: Vec<u64>,
    /// Children that [`sweep`] leaves alone, with their descendants: a
    /// reload's new server.
    spared: BTreeSet<u32>,
}

impl Registry {
    /// The earliest start time an unregistered worker can have, if any
    /// is on its way.
    fn adopting_since(&self) -> Option<u64> {
        self.adopting.iter().copied().min()
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    own: BTreeSet::new(),
    adopting: Vec::new(),
    spared: BTreeSet::new(),
});

/// Taken for writing by the tests that scan (they reap every unregistered
/// dead child of the process) and for reading by the tests that start
/// children they do not register or hold an [`Adopting`] (which makes
/// scans leave every child started after it): cargo runs tests as threads
/// of one process.
#[cfg(test)]
pub(crate) static SCANNING_TESTS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Least time between two scans for dead orphans: each reads all of
/// `/proc`, and with `-r` a worker exits after every job.
const REAP_SPACING: Duration = Duration::from_secs(1);
/// How long [`sweep`] keeps killing before it gives up (a process stuck in
/// the kernel cannot be killed; a fork bomb could outrun one round).
const SWEEP_LIMIT: Duration = Duration::from_secs(5);
/// Pause between rounds of [`sweep`], for the killed to die.
const SWEEP_PAUSE: Duration = Duration::from_millis(20);
/// Most processes [`group_members`] looks at: a fork bomb's group is over
/// any memory limit long before, and must not make each look take longer.
const MAX_GROUP_WALK: usize = 4096;

fn registry() -> MutexGuard<'static, Registry> {
    // Inserts and removes cannot leave it half-changed.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes the server the reaper of its orphaned descendants
/// (`PR_SET_CHILD_SUBREAPER`). Called once at startup, before any child
/// exists.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Keeps a spawned child's pid in the registry until dropped, which the
/// owner does only once tokio has reaped it (or handed it to tokio's own
/// queue of dropped children, which tolerates a status taken by us).
#[derive(Debug)]
pub(crate) struct Registration(u32);

impl Drop for Registration {
    fn drop(&mut self) {
        registry().own.remove(&self.0);
    }
}

/// Spawns `cmd` and registers the child, with scans locked out meanwhile.
pub(crate) fn spawn(cmd: &mut Command) -> io::Result<(Child, Registration)> {
    let mut registry = registry();
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("spawned child has no pid"))?;
    registry.own.insert(pid);
    Ok((child, Registration(pid)))
}

/// Registers `pid`, a child the server was handed rather than spawned,
/// so that no scan takes its exit status from its owner.
pub(crate) fn register(pid: u32) -> Registration {
    registry().own.insert(pid);
    Registration(pid)
}

/// Leaves `pid` and its descendants out of [`sweep`]: a reload's new
/// server, which must outlive this one.
pub(crate) fn spare(pid: u32) {
    registry().spared.insert(pid);
}

/// Held from before a worker is asked of the fork-server until it is
/// [`register`]ed: meanwhile, scans leave alone every dead unregistered
/// child that started since, so a worker that dies at once is still
/// reaped by its owner, who learns how it ended.
#[derive(Debug)]
pub(crate) struct Adopting(u64);

impl Adopting {
    /// Begins before the fork is asked for, so the worker starts later.
    pub(crate) fn begin() -> Adopting {
        // A tick early, against rounding: a child that started in the
        // tick before is left alone too, and reaped by a later scan.
        // Without a clock, every dead unregistered child is left alone.
        let since = boot_ticks().map_or(0, |now| now.saturating_sub(1));
        // Under the lock: a scan sees the fork under way or not, for the
        // whole time it reaps.
        registry().adopting.push(since);
        Adopting(since)
    }
}

impl Drop for Adopting {
    fn drop(&mut self) {
        let mut registry = registry();
        if let Some(i) = registry.adopting.iter().position(|&t| t == self.0) {
            registry.adopting.swap_remove(i);
        }
    }
}

/// The time since boot in clock ticks, the unit of a process's start time
/// in `/proc/PID/stat` (which counts from boot, suspended time included:
/// `CLOCK_BOOTTIME`).
fn boot_ticks() -> Option<u64> {
    // SAFETY: sysconf takes a name and returns a number.
    let hz = u64::try_from(unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&hz| hz > 0)?;
    let mut now = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer.
    if unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u64::try_from(now.tv_nsec).ok()?;
    // As the kernel rounds a start time: down.
    Some(secs.checked_mul(hz)? + nanos * hz / 1_000_000_000)
}

/// One process of the system, as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Proc {
    pid: i32,
    ppid: i32,
    /// Its process group.
    pgid: i32,
    /// Dead and waiting to be reaped.
    zombie: bool,
    /// When it started, in clock ticks since boot; `None` if not shown.
    start: Option<u64>,
}

/// Every process of the system that can be seen; those that vanish while
/// `/proc` is read are skipped.
fn processes() -> io::Result<Vec<Proc>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(p) = process(pid) {
            found.push(p);
        }
    }
    Ok(found)
}

/// `pid`'s line in `/proc`, if it exists.
fn process(pid: i32) -> Option<Proc> {
    parse_stat(pid, &std::fs::read(format!("/proc/{pid}/stat")).ok()?)
}

/// `pid (comm) S ppid pgid ...`: comm may hold spaces and parentheses, so
/// the fields are counted from its last `)`. The start time is field 22.
fn parse_stat(pid: i32, stat: &[u8]) -> Option<Proc> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    // Fields 6 to 21 come between the group and the start time.
    let start = fields.nth(16).and_then(|f| f.parse().ok());
    Some(Proc {
        pid,
        ppid,
        pgid,
        zombie: state == "Z" || state == "X",
        start,
    })
}

/// The processes of process group `leader` but the leader (a worker leads
/// its own): its descendants still in the group, and those the server
/// adopted when their parent exited (a job's double fork without
/// `setsid`). Watched every 100 ms while a job runs, so it follows
/// `/proc/PID/task/TID/children` from the leader and from the server, a
/// few small reads for a job that starts nothing, rather than reading all
/// of `/proc` (tens of milliseconds on a busy host); only a kernel without
/// those files gets the whole table read. A process that left the group
/// (`setsid`) is not counted, nor anything under it: a worker's stop
/// kills its group, not what left it.
pub(crate) fn group_members(leader: u32) -> Vec<u32> {
    if !has_children_files() {
        return processes()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.pgid as u32 == leader && p.pid as u32 != leader)
            .map(|p| p.pid as u32)
            .collect();
    }
    let mut next = children_of(leader);
    {
        // The server's children but its own (workers, the fork-server,
        // which lead groups of their own): what it adopted.
        let adopted = children_of(std::process::id());
        let registry = registry();
        next.extend(
            adopted
                .into_iter()
                .filter(|pid| !registry.own.contains(pid)),
        );
    }
    let mut seen = BTreeSet::from([leader]);
    let mut found = Vec::new();
    while let Some(pid) = next.pop() {
        if seen.len() >= MAX_GROUP_WALK || !seen.insert(pid) {
            continue;
        }
        let in_group = std::fs::read(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| parse_stat(pid as i32, &stat))
            .is_some_and(|p| p.pgid as u32 == leader);
        if in_group {
            found.push(pid);
            next.extend(children_of(pid));
        }
    }
    found
}

/// Whether this kernel lists each thread's children in `/proc`
/// (`CONFIG_PROC_CHILDREN`).
fn has_children_files() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::path::Path::new("/proc/thread-self/children").exists())
}

/// The children of `pid`, from the `children` file of each of its
/// threads (a child belongs to the thread that forked it); none if it is
/// gone.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(
                list.split_ascii_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    found
}

/// The descendants of `root` in `table`, parents before their children,
/// but the `spared` and theirs.
fn descendants(table: &[Proc], root: i32, spared: &BTreeSet<u32>) -> Vec<Proc> {
    let mut children: HashMap<i32, Vec<Proc>> = HashMap::new();
    for p in table {
        children.entry(p.ppid).or_default().push(*p);
    }
    let mut out = Vec::new();
    let mut next = vec![root];
    while let Some(parent) = next.pop() {
        for child in children.get(&parent).into_iter().flatten() {
            // A pid 0 or a loop cannot occur in a consistent table; a torn
            // read of /proc must not make this spin.
            if child.pid > 0
                && child.pid != root
                && out.len() < table.len()
                && !spared.contains(&(child.pid as u32))
            {
                out.push(*child);
                next.push(child.pid);
            }
        }
    }
    out
}

/// Reaps `pid` if it is dead; true if it was.
fn reap(pid: i32) -> bool {
    match waitpid(
        Pid::from_raw(pid),
        Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
    ) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(status) => {
            let how = match status {
                WaitStatus::Exited(_, code) => format!("exit code {code}"),
                WaitStatus::Signaled(_, signal, _) => format!("killed by {signal}"),
                other => format!("{other:?}"),
            };
            log::debug!("reaped pid {pid}, left behind by a job ({how})");
            true
        }
        // Not our child (any more): nothing to reap.
        Err(_) => false,
    }
}

/// Reaps the dead among the server's children that tokio does not manage:
/// orphans reparented to the server. Returns how many were reaped.
///
/// Reading `/proc` takes time on a busy host, so it is done without the
/// registry's lock (and, from [`reap_orphans_forever`], off the event
/// loop); the lock is taken only to check and reap the dead children
/// found. That is still safe: a child that [`spawn`] is starting while
/// `/proc` is read is registered by the time the lock is ours, since
/// `spawn` holds the lock until it has registered the child.
pub fn reap_orphans() -> usize {
    scan().unwrap_or(0)
}

/// [`reap_orphans`], or `None` if it had to leave some of the dead where
/// they are because they could be a worker on its way ([`Adopting`]):
/// the caller scans again later, as no other SIGCHLD may come.
fn scan() -> Option<usize> {
    let dead = dead_children();
    if dead.is_empty() {
        return Some(0);
    }
    let me = std::process::id() as i32;
    // Under the lock that `register` and `Adopting` take: a worker handed
    // over while /proc was read is registered by now, or its fork is
    // still under way (and stays so until this scan is done).
    let registry = registry();
    let since = registry.adopting_since();
    let mut reaped = 0;
    let mut left = false;
    for pid in dead {
        if registry.own.contains(&(pid as u32)) {
            continue;
        }
        if let Some(since) = since {
            // Read again now, under the lock: the pid read from /proc
            // earlier may have been reaped (by tokio, of a child it had
            // dropped) and taken by the worker on its way since. Past this
            // read, that would take the pids going round in the moment
            // before the `waitpid` below.
            match process(pid) {
                Some(p) if p.ppid == me && p.zombie => {
                    if p.start.is_none_or(|start| start >= since) {
                        left = true;
                        continue;
                    }
                }
                // Reaped meanwhile: nothing to do.
                _ => continue,
            }
        }
        if reap(pid) {
            reaped += 1;
        }
    }
    (!left).then_some(reaped)
}

/// The server's children that are dead and not yet reaped, tokio's
/// included, from a read of `/proc` that needs no lock.
fn dead_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(table) = processes() else {
        return Vec::new();
    };
    table
        .iter()
        .filter(|p| p.ppid == me && p.zombie)
        .map(|p| p.pid)
        .collect()
}

/// Runs for as long as the server: after every `SIGCHLD` (at most one
/// scan per [`REAP_SPACING`]), reaps the orphans that died, so their
/// zombies never pile up.
pub async fn reap_orphans_forever() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot watch SIGCHLD ({e}); processes left by jobs are reaped at exit");
            return;
        }
    };
    // A scan that had to skip the dead: the next one comes without a
    // SIGCHLD.
    let mut again = false;
    loop {
        if !again && sigchld.recv().await.is_none() {
            return;
        }
        // On a blocking thread: the scan reads all of /proc, which would
        // stall every client on the runtime's only thread (with `-r` a
        // worker exits after every job).
        match tokio::task::spawn_blocking(scan).await {
            Ok(scanned) => again = scanned.is_none(),
            Err(e) => log::error!("the scan for orphaned processes failed: {e}"),
        }
        // Signals that arrive meanwhile are folded into one wake-up.
        tokio::time::sleep(REAP_SPACING).await;
    }
}

/// Kills every descendant of the server and reaps those that are not
/// tokio's: at exit, after the workers were stopped, so that nothing a
/// job started (in the worker's process group or out of it) outlives the
/// server. Killing a process reparents its children to the server, so this
/// goes round until no descendant is left, for at most [`SWEEP_LIMIT`].
/// Returns how many processes it killed.
pub async fn sweep() -> usize {
    let me = std::process::id() as i32;
    let started = Instant::now();
    let mut killed = BTreeSet::new();
    loop {
        let left = {
            let registry = registry();
            let own = &registry.own;
            let Ok(table) = processes() else {
                log::error!("cannot read /proc: processes left by jobs may outlive the server");
                return killed.len();
            };
            let left: Vec<Proc> = descendants(&table, me, &registry.spared)
                .into_iter()
                // tokio reaps its own; a dead one of those is not left over.
                .filter(|p| !(p.zombie && own.contains(&(p.pid as u32))))
                .collect();
            for p in &left {
                if !p.zombie && kill(Pid::from_raw(p.pid), Signal::SIGKILL).is_ok() {
                    killed.insert(p.pid);
                }
                if p.ppid == me && !own.contains(&(p.pid as u32)) {
                    reap(p.pid);
                }
            }
            left
        };
        if left.is_empty() {
            break;
        }
        if started.elapsed() >= SWEEP_LIMIT {
            let pids: Vec<i32> = left.iter().map(|p| p.pid).collect();
            log::error!("processes left by jobs did not die within {SWEEP_LIMIT:?}: {pids:?}");
            break;
        }
        tokio::time::sleep(SWEEP_PAUSE).await;
    }
    if !killed.is_empty() {
        log::info!(
            "killed {} processes left running by jobs: {:?}",
            killed.len(),
            killed
        );
    }
    killed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32) -> Proc {
        Proc {
            pid,
            ppid,
            pgid: pid,
            zombie: false,
            start: None,
        }
    }

    #[test]
    fn stat_lines_are_read_past_a_tricky_comm() {
        let line = b"4242 (a) b (c)) Z 17 4240 4240 0 -1 4194560";
        assert_eq!(
            parse_stat(4242, line),
            Some(Proc {
                pid: 4242,
                ppid: 17,
                pgid: 4240,
                zombie: true,
                start: None,
            })
        );
        let whole = b"7 (x y) Z 1 7 7 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 221070 0 0";
        assert_eq!(parse_stat(7, whole).unwrap().start, Some(221070));
        assert_eq!(parse_stat(1, b"1 (init) S 0 1 1"), Some(p(1, 0)));
        assert_eq!(parse_stat(1, b"1 (init) S 0"), None);
        assert_eq!(parse_stat(1, b"garbage"), None);
        assert_eq!(parse_stat(1, b"1 (x)"), None);
    }

    #[test]
    fn descendants_are_found_at_any_depth_and_only_below_the_root() {
        let table = [
            p(1, 0),
            p(10, 1),
            p(11, 10),
            p(12, 11),
            p(13, 10),
            p(20, 1),
            p(21, 20),
        ];
        let none = BTreeSet::new();
        let mut found: Vec<i32> = descendants(&table, 10, &none)
            .iter()
            .map(|p| p.pid)
            .collect();
        found.sort();
        assert_eq!(found, [11, 12, 13]);
        assert!(descendants(&table, 12, &none).is_empty());
        // A spared child is left out with what is below it.
        let spared = BTreeSet::from([11]);
        let found: Vec<i32> = descendants(&table, 10, &spared)
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(found, [13]);
        // A torn read that shows a cycle ends all the same.
        let cycle = [p(5, 6), p(6, 5)];
        assert!(descendants(&cycle, 5, &none).len() <= cycle.len());
    }

    fn wait_zombie(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !process(pid as i32).is_some_and(|p| p.zombie) {
            assert!(Instant::now() < deadline, "pid {pid} never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn exists(pid: u32) -> bool {
        process(pid as i32).is_some()
    }

    /// The pid of an unregistered child of this process, dead and not
    /// reaped.
    // Reaped by the scans under test, not through std's handle.
    #[allow(clippy::zombie_processes)]
    fn dead_foreign_child(code: i32) -> u32 {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("exit {code}")])
            .spawn()
            .unwrap();
        wait_zombie(child.id());
        child.id()
    }

    // Every test that scans holds SCANNING_TESTS for writing: another
    // test's scan would reap its children, and its scans those of others.
    #[tokio::test]
    async fn orphans_are_reaped_and_tokios_children_are_left_to_tokio() {
        let scanning = SCANNING_TESTS.write().unwrap_or_else(|e| e.into_inner());
        let (mut ours, registered) = spawn(Command::new("/bin/sh").args(["-c", "exit 7"])).unwrap();
        let foreign = dead_foreign_child(3);
        wait_zombie(ours.id().unwrap());
        assert_eq!(reap_orphans(), 1, "only the unregistered child");
        assert!(!exists(foreign));
        assert!(
            waitpid(Pid::from_raw(foreign as i32), Some(WaitPidFlag::WNOHANG)).is_err(),
            "its status was taken here"
        );
        drop(scanning);
        assert_eq!(ours.wait().await.unwrap().code(), Some(7));
        drop(registered);
        assert!(!registry().own.contains(&foreign));
    }

    #[test]
    fn while_a_worker_is_on_its_way_only_what_could_be_it_is_left() {
        let _scanning = SCANNING_TESTS.write().unwrap_or_else(|e| e.into_inner());
        let before = dead_foreign_child(3);
        let started = process(before as i32).unwrap().start.unwrap();
        // It must have started ticks before the fork below asks for the
        // worker, or it could be that worker.
        let deadline = Instant::now() + Duration::from_secs(30);
        while boot_ticks().unwrap() < started + 3 {
            assert!(Instant::now() < deadline, "the clock does not move");
            std::thread::sleep(Duration::from_millis(5));
        }
        let adopting = Adopting::begin();
        // Started after the fork was asked for: it could be the worker.
        let after = dead_foreign_child(4);
        assert_eq!(scan(), None, "one left: a scan must come again");
        assert!(!exists(before), "what died before is reaped");
        assert!(process(after as i32).is_some_and(|p| p.zombie));
        drop(adopting);
        assert_eq!(scan(), Some(1), "once the fork is over, it is reaped too");
        assert!(!exists(after));
    }

    #[test]
    fn the_proc_scan_does_not_hold_the_registry() {
        // Regression: the scan held the registry's lock while it read all
        // of /proc, so spawning a worker waited for it. With the lock held
        // elsewhere, the scan still completes.
        // (The reaping of what it finds takes the lock, briefly.)
        let held = registry();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(dead_children());
        });
        let done = rx.recv_timeout(Duration::from_secs(60));
        drop(held);
        assert!(done.is_ok(), "the scan waited for the registry");
    }

    #[test]
    fn a_groups_members_are_found_below_its_leader_but_not_what_left_it() {
        use std::os::unix::process::CommandExt;
        let mut leader = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 60 & setsid sleep 60 & sleep 60 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        // Never taken by the reaping test running beside this one.
        let _registered = register(leader.id());
        let pid = leader.id();
        let comm = |c: u32| std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        let children = loop {
            // Each has run `sleep` once its comm says so, `setsid` done.
            let children = children_of(pid);
            if children.len() == 3 && children.iter().all(|&c| comm(c).trim() == "sleep") {
                break children;
            }
            assert!(Instant::now() < deadline, "the children never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut found = group_members(pid);
        for c in &children {
            let _ = kill(Pid::from_raw(*c as i32), Signal::SIGKILL);
        }
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = leader.wait();
        found.sort();
        assert_eq!(found.len(), 2, "{found:?} of {children:?}");
        assert!(found.iter().all(|f| children.contains(f)));
        assert!(!found.contains(&pid), "not the leader itself");
        assert!(group_members(u32::MAX).is_empty());
    }

    #[test]
    fn this_process_is_in_the_table() {
        let me = std::process::id() as i32;
        let table = processes().unwrap();
        let mine = table.iter().find(|p| p.pid == me).expect("self in /proc");
        assert_eq!(mine.ppid, nix::unistd::getppid().as_raw());
        assert!(!mine.zombie);
    }
}
