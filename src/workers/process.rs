//! The processes the server starts for its workers, whichever way they
//! were started: what every one of them gets before it runs Python
//! ([`prepare`]), and the handle the server keeps on one ([`Process`]).
//!
//! A worker is either spawned by tokio (`python -u -c <bootstrap> -m
//! MODULE`) or forked by the fork-server ([`crate::workers::forkserver`]),
//! which runs from the same command with the same preparation, so its
//! forks inherit it: a higher `oom_score_adj` than the server's (under
//! memory pressure the kernel takes a worker, not the server), the
//! open-file soft limit the server started with ([`crate::ops::openfiles`]),
//! and `PR_SET_PDEATHSIG`, so that it dies with the server even if the
//! server is killed. A forked worker sets its own death signal: a fork
//! does not inherit it. A worker of a user with a `uid` of their own
//! drops to it before its death signal is set, since the change of
//! credentials clears it: a spawned one in [`prepare`], a forked one in
//! the fork-server's fork ([`crate::workers::identity`]); the fork-server
//! stays the server's uid.
//!
//! A forked worker is the server's child too: the fork-server forks twice
//! and the middle process exits, so the worker is handed to the server,
//! which is a child subreaper ([`crate::workers::reaper`]). The server
//! learns of its exit at once from a pidfd, and reaps it by its pid then,
//! as tokio does with the spawned ones (tokio opens a pidfd for each child
//! it spawns, and falls back to SIGCHLD where the kernel has none). Either
//! way a wait on a worker that runs on makes no system call: a job's wait
//! on its worker, begun afresh for every job, costs only the pidfd's
//! registration, made once.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use crate::ops::openfiles;
use crate::workers::identity::Identity;
use crate::workers::reaper::Registration;

/// How much higher a worker's `oom_score_adj` is than the server's, and
/// the least it is: ahead of ordinary processes when memory runs out.
const WORKER_OOM_SCORE_ADJ: i32 = 500;

/// Makes `cmd`'s child a worker's process, or the fork-server whose forks
/// are workers: `oom_score_adj` raised, the original open-file soft limit
/// (`nofile`: soft and hard; `None`: the server's own), run as `identity`
/// if given (its user's uid: [`crate::workers::identity`]), and killed
/// when the server dies.
pub(crate) fn prepare(cmd: &mut Command, nofile: Option<(u64, u64)>, identity: Option<Identity>) {
    let parent = nix::unistd::getpid();
    let oom = OomScoreAdj::for_worker();
    if let Some(identity) = &identity {
        identity.set_env(cmd);
    }
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe calls (open, write, close, setrlimit,
    // setgroups, setresgid, setresuid, prctl, getppid); it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Written while still root: the kernel then keeps the job
            // from lowering it again.
            if let Some(oom) = &oom {
                oom.write_own();
            }
            if let Some((soft, hard)) = nofile {
                // Lowering a soft limit cannot fail in practice, and a
                // worker with the server's higher limit still works: no
                // reason to fail the spawn.
                let _ = openfiles::restore_in_child(soft, hard);
            }
            if let Some(identity) = &identity {
                identity.take()?;
            }
            // After the uid change, which clears the death signal.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            // The server may have died between fork and prctl.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// A worker's process, as the server holds it.
pub(crate) enum Process {
    /// Spawned by tokio, which reaps it; killed when dropped.
    Spawned {
        child: Child,
        /// Keeps the scans for orphans off it.
        _registered: Registration,
    },
    /// Forked by the fork-server and handed to the server.
    Forked(Forked),
}

impl Process {
    /// Its pid.
    pub(crate) fn id(&self) -> u32 {
        match self {
            Process::Spawned { child, .. } => child.id().unwrap_or(0),
            Process::Forked(f) => f.pid.as_raw() as u32,
        }
    }

    /// Waits for it to exit and reaps it; at once if it already was.
    /// Cancel-safe.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Process::Spawned { child, .. } => child.wait().await,
            Process::Forked(f) => f.wait().await,
        }
    }

    /// Sends it SIGKILL, unless it was reaped already.
    pub(crate) fn start_kill(&mut self) -> io::Result<()> {
        match self {
            Process::Spawned { child, .. } => child.start_kill(),
            Process::Forked(f) => f.start_kill(),
        }
    }
}

/// A child the server did not spawn itself but was handed (a worker
/// forked by the fork-server), known by its pid and a pidfd that becomes
/// readable when it exits. Killed when dropped, like tokio's children.
pub(crate) struct Forked {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    /// Its exit status, once reaped: its pid may then be reused, so it is
    /// never signalled or waited for again.
    status: Option<ExitStatus>,
    /// Keeps the scans for orphans off it until it is reaped here.
    _registered: Registration,
}

/// Whether this kernel has `pidfd_open`, by opening one on this process.
pub(crate) fn pidfd_works() -> io::Result<()> {
    pidfd_open(std::process::id() as i32).map(drop)
}

/// A pidfd for `pid`.
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor or -1; nothing of ours is touched.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Forked {
    /// Takes charge of `pid`, a child of the server, whose registration
    /// with the reaper `registered` is.
    pub(crate) fn adopt(pid: u32, registered: Registration) -> io::Result<Forked> {
        let raw = i32::try_from(pid)
            .ok()
            .filter(|&p| p > 1)
            .ok_or_else(|| io::Error::other(format!("no such worker pid {pid}")))?;
        let fd = pidfd_open(raw)?;
        // SAFETY: the descriptor is owned by the `AsyncFd` from here on,
        // and stays open and the same until it is dropped.
        let pidfd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Forked {
            pid: Pid::from_raw(raw),
            pidfd,
            status: None,
            _registered: registered,
        })
    }

    /// Waits for it to exit, and reaps it. Cancel-safe.
    ///
    /// `waitpid` comes only once the pidfd says it exited: each job's
    /// wait on its worker is a fresh call, and a `waitpid` first would be
    /// a system call per job for a worker that runs on. The readiness is
    /// kept (an exit is for good), so a wait cut short after it resumes at
    /// the `waitpid`.
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            let mut ready = self.pidfd.readable().await?;
            // Readable means exited; a wake-up without an exit (none is
            // known) waits again.
            if try_reap(self.pid, &mut self.status)?.is_none() {
                ready.clear_ready();
            }
        }
    }

    fn start_kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        kill(self.pid, Signal::SIGKILL).map_err(io::Error::from)
    }
}

/// The status of `pid` if it has exited (reaping it and keeping the status
/// in `status`), `None` if it runs.
fn try_reap(pid: Pid, status: &mut Option<ExitStatus>) -> io::Result<Option<ExitStatus>> {
    if let Some(status) = *status {
        return Ok(Some(status));
    }
    let mut raw: nix::libc::c_int = 0;
    // SAFETY: waitpid writes one int through the pointer we pass. The
    // pid is our unreaped child (registered, so no scan reaps it), so
    // it is this process, never another that took its pid.
    let rc = unsafe {
        nix::libc::waitpid(
            pid.as_raw(),
            &mut raw,
            nix::libc::WNOHANG | nix::libc::__WALL,
        )
    };
    match rc {
        0 => Ok(None),
        rc if rc > 0 => {
            let exited = ExitStatus::from_raw(raw);
            *status = Some(exited);
            Ok(Some(exited))
        }
        _ => Err(io::Error::last_os_error()),
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.start_kill();
            // Reaped now if it is gone already; if not, its registration
            // goes with it, and the next scan for orphans reaps it.
            let _ = try_reap(self.pid, &mut self.status);
        }
    }
}

/// The `oom_score_adj` a worker gives itself before exec, as the text
/// written to `/proc/self/oom_score_adj`; formatted in the parent, so the
/// forked child only has to write it.
#[derive(Debug, Clone, Copy)]
struct OomScoreAdj {
    text: [u8; 8],
    len: usize,
}

impl OomScoreAdj {
    /// [`WORKER_OOM_SCORE_ADJ`] above the server's own value; `None` if
    /// that cannot be read (no /proc): a worker never goes below it.
    fn for_worker() -> Option<OomScoreAdj> {
        let server = std::fs::read_to_string("/proc/self/oom_score_adj").ok()?;
        let server: i32 = server.trim().parse().ok()?;
        Some(OomScoreAdj::new(worker_oom_score_adj(server)))
    }

    fn new(value: i32) -> OomScoreAdj {
        let shown = value.to_string();
        let mut text = [0u8; 8];
        let len = shown.len().min(text.len());
        text[..len].copy_from_slice(&shown.as_bytes()[..len]);
        OomScoreAdj { text, len }
    }

    /// Writes the value for the calling process. Raising it needs no
    /// privilege; a failure is ignored (the worker runs all the same).
    /// Async-signal-safe: open, write and close, nothing allocated.
    fn write_own(&self) {
        // SAFETY: a NUL-terminated path and a buffer of `len` bytes that
        // outlive the calls; the fd is ours and closed once.
        unsafe {
            let fd = nix::libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                nix::libc::O_WRONLY | nix::libc::O_CLOEXEC,
            );
            if fd >= 0 {
                nix::libc::write(fd, self.text.as_ptr().cast(), self.len);
                nix::libc::close(fd);
            }
        }
    }
}

/// A worker's `oom_score_adj` given the server's: [`WORKER_OOM_SCORE_ADJ`]
/// higher, and at least that, within the kernel's range (at 1000 the
/// server is already first in line and they are equal).
fn worker_oom_score_adj(server: i32) -> i32 {
    server
        .saturating_add(WORKER_OOM_SCORE_ADJ)
        .clamp(WORKER_OOM_SCORE_ADJ, 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child of this process that exits with `code` once its stdin
    /// closes (so it cannot die, and be reaped by another test's scan,
    /// before it is registered), and its stdin.
    // Waited for through its pidfd, not through std's handle.
    #[allow(clippy::zombie_processes)]
    fn child_exiting_with(code: i32) -> (u32, std::process::ChildStdin) {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("read x; exit {code}")])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        (child.id(), child.stdin.take().unwrap())
    }

    #[tokio::test]
    async fn a_handed_over_child_is_waited_for_by_its_pidfd_and_reaped() {
        pidfd_works().expect("pidfd_open on this kernel");
        let (pid, stdin) = child_exiting_with(7);
        let registered = crate::workers::reaper::register(pid);
        let mut process = Process::Forked(Forked::adopt(pid, registered).unwrap());
        assert_eq!(process.id(), pid);
        drop(stdin);
        let status = process.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        // Reaped once: waiting again says the same, and a kill is no-op.
        assert_eq!(process.wait().await.unwrap().code(), Some(7));
        process.start_kill().unwrap();

        let (pid, _stdin) = child_exiting_with(0);
        let registered = crate::workers::reaper::register(pid);
        let mut process = Process::Forked(Forked::adopt(pid, registered).unwrap());
        process.start_kill().unwrap();
        assert_eq!(process.wait().await.unwrap().signal(), Some(9));
    }

    #[test]
    fn workers_rank_above_the_server_for_the_oom_killer() {
        assert_eq!(worker_oom_score_adj(0), 500);
        assert_eq!(worker_oom_score_adj(-1000), 500, "never below 500");
        assert_eq!(worker_oom_score_adj(300), 800);
        assert_eq!(worker_oom_score_adj(700), 1000);
        assert_eq!(worker_oom_score_adj(1000), 1000);
        let text = OomScoreAdj::new(-1000);
        assert_eq!(&text.text[..text.len], b"-1000");
    }
}
