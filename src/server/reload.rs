//! Reload and upgrade in one (SIGUSR2): the server starts its own binary
//! again, the file at its path now (so a replaced binary is an upgrade),
//! with the same arguments, and hands it the listening socket; the new
//! process reads its config, secret and everything else afresh, and takes
//! over once a worker of its own is up; the old one then drains and exits.
//! No connection is refused meanwhile: both hold the one listening socket,
//! whose queue the new process accepts from.
//!
//! The old process's side ([`start_successor`], [`Pending`]):
//! - The child gets the listening socket, the `--metrics` socket and one
//!   end of a socket pair (the channel) as descriptors 3 on, named by
//!   `LISTEN_FDS`/`LISTEN_FDNAMES` as systemd passes sockets, so one code
//!   path ([`crate::front::listener::Passed`]) reads socket activation and
//!   a reload. They are duplicated above the target numbers first, then
//!   `dup2`ed into place between fork and exec, in the child only: the old
//!   process's own descriptors stay close-on-exec, so no worker inherits
//!   them. The autodiscovery socket is bound again rather than passed: it
//!   shares its port with `SO_REUSEADDR` by design. The old config's
//!   [summary](crate::config::summary) goes in `PPSERVER_RELOAD_CONFIG`.
//! - The child is the old process's child: it is spawned without
//!   `PR_SET_PDEATHSIG` (fork clears it anyway; only workers ask for it),
//!   stays in the old one's process group and session (what stops the
//!   group stops both), becomes a child subreaper itself at startup like
//!   any server, and is [spared](crate::workers::reaper::spare) by the old
//!   one's last sweep. Where the old server moved itself into a cgroup v2
//!   leaf for `--worker-memory-limit`, the child is moved back to the
//!   cgroup the old one started in before its exec, since the leaf goes
//!   (killing what is in it) when the old one stops; and it gets back the
//!   open-file limit the old one started with before raising it
//!   ([`crate::ops::openfiles`]), which its own workers then get.
//! - Until the child says it is ready, the old process serves as before.
//!   If the child exits first (a bad config, a missing binary, workers
//!   that cannot start: its stderr is the old one's, so its error is in
//!   the log), or is not ready within [`READY_TIMEOUT`] (then it is
//!   stopped), the reload has failed: the old process logs why and goes
//!   on as if nothing happened. A second SIGUSR2 meanwhile is logged and
//!   ignored.
//! - Once the child is ready, the old process tells systemd the new main
//!   pid (`MAINPID=`, [`crate::ops::notify`]), lets go of the pid file
//!   and the ready file the child wrote over its own, stops accepting,
//!   autodiscovery and metrics, and drains as at a stop (answering every
//!   job it has, closing each connection once it has no job in flight, so
//!   clients reconnect to the new process between jobs), reporting its
//!   connection count to the new process ([`Successor::report`]) until it
//!   exits.
//!
//! The new process's side ([`Predecessor`]): it writes its pid file only
//! once a worker is up (a reload that fails before must leave the old
//! one's), accepts and announces nothing before, then sends one byte on
//! the channel, logs what changed in the config, and reads the old one's
//! connection count for `/status` until the channel ends with the old
//! process ([`Previous`]).

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::time::Instant;

use crate::config::summary::{self, Entry};
use crate::front::listener::{Passed, RELOAD_CHANNEL_NAME};
use crate::ops::openfiles;
use crate::workers::reaper::{self, Registration};

/// How long the new process has to get a worker up and say so. The start
/// has bounds of its own (the interpreter probe, the fork-server); a
/// child that is still not ready after this is stopped.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new process given up on has to stop after SIGTERM (it may
/// still be in its start, which it finishes first) before SIGKILL.
const CHILD_STOP: Duration = Duration::from_secs(10);
/// How long the exit of a child that closed the channel is waited for,
/// for its status in the log.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// The byte the new process sends once it is ready.
const READY: u8 = b'R';
/// The old config's summary, for the new process's log of what changed.
const CONFIG_ENV: &str = "PPSERVER_RELOAD_CONFIG";
/// A summary longer than this is not passed (an environment string is
/// limited to 128 KiB); the new process then says it cannot compare.
const MAX_SUMMARY: usize = 64 * 1024;

/// What this process brought along when it started: the descriptors
/// passed in, its own command line (to start again on SIGUSR2) and, when
/// a reload started it, the process before it.
pub struct Inherited {
    /// Sockets passed in (socket activation, or the previous process's).
    pub(crate) passed: Passed,
    /// How to start this binary again.
    pub(crate) invocation: Invocation,
    /// The process this one takes over from.
    pub(crate) predecessor: Option<Predecessor>,
}

impl Inherited {
    /// Takes what was passed in and removes the variables that passed it,
    /// so workers never see them. Called first thing in `main`, while the
    /// process has one thread and no child.
    pub fn take() -> Inherited {
        let invocation = Invocation::record();
        let mut passed = Passed::from_env();
        let summary = std::env::var(CONFIG_ENV).ok();
        std::env::remove_var(CONFIG_ENV);
        let predecessor = passed.take(RELOAD_CHANNEL_NAME).map(|fd| Predecessor {
            pid: std::os::unix::process::parent_id(),
            channel: StdUnixStream::from(fd),
            summary: summary.map(|s| summary::decode(&s)),
        });
        Inherited {
            passed,
            invocation,
            predecessor,
        }
    }

    /// Logs what was wrong with what was passed in, once logging is up.
    pub fn log_notes(&self) {
        for note in &self.passed.notes {
            log::warn!("{note}");
        }
    }
}

/// This binary's path and arguments, as it was started.
#[derive(Debug)]
pub(crate) struct Invocation {
    /// The executable to run again, or why it is not known.
    exe: Result<PathBuf, String>,
    /// `argv[0]`, kept so that `ps` shows the new process as the old one.
    argv0: OsString,
    /// The arguments after it.
    args: Vec<OsString>,
}

impl Invocation {
    /// The command line, and the binary's absolute path: the path it was
    /// started by (`argv[0]`, found on `PATH` if it holds no slash, made
    /// absolute), if that names the file that runs, so that a symlink there
    /// repointed to a new version is followed; else `/proc/self/exe`'s
    /// target. Read at startup, before the working directory could change
    /// or the binary be replaced.
    fn record() -> Invocation {
        let mut all = std::env::args_os();
        let argv0 = all.next().unwrap_or_default();
        let args = all.collect();
        Invocation {
            exe: executable(&argv0),
            argv0,
            args,
        }
    }
}

/// See [`Invocation::record`].
fn executable(argv0: &std::ffi::OsStr) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let running = std::fs::metadata("/proc/self/exe").ok();
    let cwd = std::env::current_dir().ok();
    if let (Some(running), Some(cwd)) = (&running, &cwd) {
        let candidates: Vec<PathBuf> = if argv0.as_bytes().contains(&b'/') {
            vec![cwd.join(argv0)]
        } else {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| cwd.join(d).join(argv0))
                        .collect()
                })
                .unwrap_or_default()
        };
        let same = |m: &std::fs::Metadata| m.dev() == running.dev() && m.ino() == running.ino();
        if let Some(path) = candidates
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| same(&m)))
        {
            return Ok(path);
        }
    }
    std::env::current_exe().map_err(|e| format!("cannot find this binary's path: {e}"))
}

/// A new process started by SIGUSR2 that has not said yet that it is
/// ready.
#[derive(Debug)]
pub(crate) struct Pending {
    pid: u32,
    child: Child,
    registration: Registration,
    /// The old process's end of the channel.
    channel: UnixStream,
    /// When it is given up on.
    deadline: Instant,
}

/// Starts the new process: the binary at its path now, with the same
/// arguments, handed `sockets` (with their names) and the channel.
/// `summary` is this process's config summary; `cgroup_procs`, a
/// cgroup's `cgroup.procs` to move the child into before its exec;
/// `nofile`, the open-file limits this process started with, if it raised
/// them: the child starts with them too, so that its workers get the
/// same limits as this one's.
pub(crate) fn start_successor(
    invocation: &Invocation,
    sockets: &[(BorrowedFd<'_>, &str)],
    summary: &[Entry],
    cgroup_procs: Option<&Path>,
    nofile: Option<(u64, u64)>,
) -> Result<Pending, String> {
    let exe = invocation.exe.as_ref().map_err(Clone::clone)?;
    let (ours, theirs) =
        StdUnixStream::pair().map_err(|e| format!("cannot make the reload's channel: {e}"))?;
    let mut names: Vec<&str> = sockets.iter().map(|(_, name)| *name).collect();
    names.push(RELOAD_CHANNEL_NAME);
    // Above every target number, so that no dup2 into place overwrites a
    // descriptor still to be moved.
    let lowest = 3 + names.len() as RawFd;
    let mut passed = Vec::with_capacity(names.len());
    for fd in sockets
        .iter()
        .map(|(fd, _)| fd.as_raw_fd())
        .chain([theirs.as_raw_fd()])
    {
        passed.push(dup_above(fd, lowest).map_err(|e| format!("cannot pass a socket on: {e}"))?);
    }
    drop(theirs);
    let raw: Vec<RawFd> = passed.iter().map(AsRawFd::as_raw_fd).collect();
    let cgroup = cgroup_procs
        .map(|p| CString::new(p.as_os_str().as_bytes()))
        .transpose()
        .map_err(|_| "a cgroup path holds a NUL byte".to_string())?;
    let mut encoded = summary::encode(summary);
    if encoded.len() > MAX_SUMMARY {
        encoded.clear();
    }
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg0(&invocation.argv0)
        .args(&invocation.args)
        .env("LISTEN_FDS", raw.len().to_string())
        .env("LISTEN_PID", std::process::id().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(CONFIG_ENV, encoded);
    // SAFETY: between fork and exec the closure only makes system calls
    // that are async-signal-safe (dup2, setrlimit, open, write, close) on
    // data made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for (i, &fd) in raw.iter().enumerate() {
                if nix::libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((soft, hard)) = nofile {
                openfiles::restore_in_child(soft, hard)?;
            }
            if let Some(procs) = &cgroup {
                // "0": the writing process. Best effort: a child left in
                // the old leaf still runs, and only dies with the leaf.
                let f = nix::libc::open(procs.as_ptr(), nix::libc::O_WRONLY | nix::libc::O_CLOEXEC);
                if f >= 0 {
                    nix::libc::write(f, b"0".as_ptr().cast(), 1);
                    nix::libc::close(f);
                }
            }
            Ok(())
        });
    }
    let (child, registration) =
        reaper::spawn(&mut cmd).map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    drop(passed);
    let pid = child.id().unwrap_or(0);
    let channel = ours
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(ours))
        .map_err(|e| format!("cannot watch the reload's channel: {e}"))?;
    log::info!(
        "SIGUSR2: reloading: started {} again as pid {pid}; serving on until it is ready (at \
         most {READY_TIMEOUT:?})",
        exe.display()
    );
    Ok(Pending {
        pid,
        child,
        registration,
        channel,
        deadline: Instant::now() + READY_TIMEOUT,
    })
}

/// `fd` duplicated to a close-on-exec descriptor numbered `lowest` or
/// more.
fn dup_above(fd: RawFd, lowest: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor, which we then own.
    let new = unsafe { nix::libc::fcntl(fd, nix::libc::F_DUPFD_CLOEXEC, lowest) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just made and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Pending {
    /// The new process's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the new process to be ready (true), or for the reload to
    /// fail (false, with the reason logged).
    pub(crate) async fn outcome(&mut self) -> bool {
        let pid = self.pid;
        let mut byte = [0u8; 1];
        let failure = tokio::select! {
            read = self.channel.read(&mut byte) => match read {
                Ok(1) if byte[0] == READY => {
                    log::info!(
                        "reload: the new process (pid {pid}) is ready and takes over; this one \
                         stops accepting and drains"
                    );
                    return true;
                }
                // It closed its end: it is exiting.
                _ => match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
                    Ok(Ok(status)) => format!("exited ({status}) before it was ready"),
                    _ => "closed the reload's channel before it was ready".to_string(),
                },
            },
            status = self.child.wait() => match status {
                Ok(status) => format!("exited ({status}) before it was ready"),
                Err(e) => format!("cannot be waited for: {e}"),
            },
            () = tokio::time::sleep_until(self.deadline) => {
                format!("was not ready within {READY_TIMEOUT:?}; stopping it")
            }
        };
        log::error!(
            "reload failed: the new process (pid {pid}) {failure} (its own messages, if any, are \
             above); this process serves on"
        );
        false
    }

    /// Gives up on the new process after a failed reload: [`Pending::stop`]
    /// in the background.
    pub(crate) fn abandon(self) {
        tokio::spawn(self.stop());
    }

    /// Stops the new process: SIGTERM, and SIGKILL if it has not exited
    /// after [`CHILD_STOP`] (it finishes its start first).
    pub(crate) async fn stop(mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(CHILD_STOP, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        drop(self.registration);
    }

    /// The ready process, to be drained for.
    pub(crate) fn into_successor(self) -> Successor {
        Successor {
            pid: self.pid,
            _child: self.child,
            _registration: self.registration,
            channel: self.channel,
        }
    }
}

/// The new process, once it has taken over: this one drains.
#[derive(Debug)]
pub(crate) struct Successor {
    pid: u32,
    /// Kept (not waited for): the new process outlives this one.
    _child: Child,
    _registration: Registration,
    channel: UnixStream,
}

impl Successor {
    /// The new process's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells the new process how many connections this one still has,
    /// for its `/status`. Best effort: a line that does not fit in the
    /// channel's buffer now is left out, the next one replaces it.
    pub(crate) fn report(&self, connections: usize) {
        let _ = self
            .channel
            .try_write(format!("{connections}\n").as_bytes());
    }
}

/// The process this one takes over from, as a reload's new process sees
/// it before it is ready.
#[derive(Debug)]
pub(crate) struct Predecessor {
    pid: u32,
    channel: StdUnixStream,
    /// Its config's summary, if it passed one.
    summary: Option<Vec<Entry>>,
}

impl Predecessor {
    /// Its pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes over: logs what changed against `summary` (this process's
    /// config), tells the old process it is ready, and follows its drain
    /// in the background. Called once a worker is up, with the pid file
    /// and the ready file written.
    pub(crate) fn take_over(self, summary: &[Entry]) -> Arc<Previous> {
        let pid = self.pid;
        match &self.summary {
            Some(old) if !old.is_empty() => {
                let changes = summary::changes(old, summary);
                if changes.is_empty() {
                    log::info!("reload: no setting changed since pid {pid}");
                }
                for change in changes {
                    log::info!("reload: changed since pid {pid}: {change}");
                }
            }
            _ => log::info!("reload: pid {pid} passed no config summary to compare with"),
        }
        let previous = Arc::new(Previous {
            pid,
            connections: AtomicUsize::new(0),
            running: AtomicBool::new(true),
        });
        let told = self
            .channel
            .set_nonblocking(true)
            .and_then(|()| io::Write::write(&mut &self.channel, &[READY]));
        let channel = match told {
            Ok(1) => UnixStream::from_std(self.channel),
            Ok(_) => Err(io::Error::other("nothing written")),
            Err(e) => Err(e),
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                log::warn!("cannot tell pid {pid} that this process took over ({e}): it is gone");
                previous.running.store(false, Ordering::Relaxed);
                return previous;
            }
        };
        log::info!("took over from pid {pid}, which drains its connections and exits");
        tokio::spawn(follow(channel, previous.clone()));
        previous
    }
}

/// Reads the old process's connection counts until its end closes.
async fn follow(channel: UnixStream, previous: Arc<Previous>) {
    let mut lines = tokio::io::BufReader::new(channel).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(n) = line.trim().parse() {
            previous.connections.store(n, Ordering::Relaxed);
        }
    }
    previous.running.store(false, Ordering::Relaxed);
    log::info!(
        "the previous process (pid {}) has finished its drain",
        previous.pid
    );
}

/// The old process of a reload, while it drains: for `/status`.
#[derive(Debug)]
pub(crate) struct Previous {
    pid: u32,
    /// Its open connections, as it last said.
    connections: AtomicUsize,
    /// Until its end of the channel closes.
    running: AtomicBool,
}

impl Previous {
    /// `(pid, connections)` while it drains.
    pub(crate) fn draining(&self) -> Option<(u32, usize)> {
        self.running
            .load(Ordering::Relaxed)
            .then(|| (self.pid, self.connections.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_started_by_is_kept_when_it_names_the_running_file() {
        let exe = std::env::current_exe().unwrap();
        let dir = std::env::temp_dir().join(format!("ppserver-reload-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("ppserver-link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        // A symlink to the running file: kept, to be followed anew.
        assert_eq!(executable(link.as_os_str()).unwrap(), link);
        // A path that names another file: the running file instead.
        let other = dir.join("other");
        std::fs::write(&other, b"").unwrap();
        assert_eq!(executable(other.as_os_str()).unwrap(), exe);
        assert_eq!(
            executable(std::ffi::OsStr::new("no-such-name")).unwrap(),
            exe
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
