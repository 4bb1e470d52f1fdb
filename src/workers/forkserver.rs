//! The fork-server (`--worker-start fork`, the default): one Python
//! process per server that imports the worker module and the `--preload`
//! modules once, and forks a worker whenever a slot needs one, in a
//! millisecond or two instead of an interpreter's start-up.
//!
//! It is `forkserver.py` ([`crate::workers::bootstrap`]),
//! started from the same command as a spawned worker, prepared the same
//! way ([`crate::workers::process::prepare`]), with a Unix socket to the
//! server as its stdin. The server sends it the new worker's three pipes
//! (`SCM_RIGHTS`), and for a user with a uid of their own the uid, groups
//! and environment the worker drops to before it reads a job
//! ([`crate::workers::identity`]; the fork-server stays the server's
//! uid); it forks twice so that the worker is handed to the server, and
//! answers with the worker's pid (`P <pid>`). From there the
//! worker is the server's like a spawned one: its pidfd, its pipes, its
//! handshake. It answers `E <why>` when it cannot fork this once (out of
//! processes or memory): that worker is spawned. It answers `B <why>`
//! when only a new fork-server helps (the descriptors did not all
//! arrive, or it is out of them): it is taken for dead. It keeps none of
//! a request's descriptors, whatever the answer: a leak would fill its
//! table, and from then on every worker would be spawned.
//!
//! If the fork-server dies, the next worker start finds out and starts
//! it again; meanwhile the workers it forked go on, and jobs wait in the
//! queue as they do for any worker start. If it hangs (no answer within
//! [`FORK_TIMEOUT`]), it is killed, that worker is spawned, and the next
//! start starts a new one; a fork-server that SIGKILL does not end (stuck
//! in the kernel, or frozen) is waited for no longer than [`KILL_WAIT`],
//! then left to the task that reaps it whenever it ends, at the server's
//! stop too. No wait of a worker start on the fork-server is unbounded
//! ([`ForkServer::fork`]). If it cannot run at all (an
//! interpreter without `socket.recv_fds` or `ctypes`, a server that is
//! not a child subreaper), workers are spawned, and the log says why,
//! once. A `--preload` module that cannot be imported is a startup error
//! instead: the operator asked for it.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch, Mutex};

use crate::config::WorkerStart;
use crate::workers::bootstrap::{self, STARTUP_TIMEOUT};
use crate::workers::identity::Identity;
use crate::workers::process::{self, Forked};
use crate::workers::reaper::{self, Adopting, Registration};

/// How long one fork may take before the fork-server is taken for hung,
/// killed and started again: a fork takes milliseconds, even of a process
/// with large modules imported.
const FORK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a failed start of the fork-server the next is tried.
const RESTART_PAUSE: Duration = Duration::from_secs(30);
/// How long a fork-server that closed its socket at startup may take to
/// exit, for its exit status to be told.
const EXIT_WAIT: Duration = Duration::from_secs(2);
/// How long a killed fork-server may take to end before it is left to
/// its watcher.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// Longest line read from the fork-server: an error message at most.
const MAX_LINE: usize = 64 * 1024;
/// How to start the fork-server: as a worker is spawned.
#[derive(Debug, Clone)]
pub(crate) struct ForkSpec {
    /// The interpreter.
    pub(crate) python: PathBuf,
    /// The worker module, run in each fork as `-m` would.
    pub(crate) module: String,
    /// Imported once for every worker (`--preload`).
    pub(crate) preload: Vec<String>,
    /// `PYTHONPATH`, as for spawned workers.
    pub(crate) pythonpath: OsString,
    /// The open-file limits workers get; see [`crate::workers::process`].
    pub(crate) nofile: Option<(u64, u64)>,
}

/// Why the fork-server is not used.
#[derive(Debug)]
pub(crate) enum Unusable {
    /// A `--preload` module failed to import: a startup error.
    Preload {
        /// The module, as given.
        module: String,
        /// The exception.
        why: String,
    },
    /// Anything else: workers are spawned instead.
    Other(String),
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::Preload { module, why } => {
                write!(f, "cannot import {module} (--preload): {why}")
            }
            Unusable::Other(why) => write!(f, "{why}"),
        }
    }
}

/// A new worker process from the fork-server: the server's ends of its
/// pipes, and the process.
pub(crate) struct ForkedWorker {
    pub(crate) process: Forked,
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
}

/// The fork-server, started again when it is found dead.
#[derive(Debug)]
pub(crate) struct ForkServer {
    spec: ForkSpec,
    /// Held for one fork at a time, as it forks one worker at a time.
    state: Mutex<State>,
    /// Set once the log said that workers are spawned instead.
    fell_back: AtomicBool,
}

/// The fork-server as the worker starts find it.
#[derive(Debug, Default)]
struct State {
    /// The running fork-server, if any.
    running: Option<Running>,
    /// When it last failed to start again, or hung again before a new one
    /// forked anything: until [`RESTART_PAUSE`] later, workers are
    /// spawned without another try, which would cost each of them an
    /// interpreter's start-up or a [`FORK_TIMEOUT`] more.
    paused: Option<Instant>,
    /// The last fork-server hung, and none has forked since.
    hung: bool,
}

/// One run of the fork-server. Dropped without [`Running::stop`], it is
/// killed all the same.
#[derive(Debug)]
struct Running {
    /// Says how it ended, as soon as it has ([`watch_exit`]): it is reaped at
    /// once, not when the next worker is asked for.
    exited: watch::Receiver<Option<String>>,
    /// Tells [`watch_exit`] to kill it.
    kill: Option<oneshot::Sender<()>>,
    ctl: UnixStream,
    /// A request is out and its answer not read: a worker start was
    /// cancelled midway (at the server's stop), and the next answer read
    /// would be that request's.
    asked: bool,
    /// Its pid, for the log.
    pid: u32,
}

/// Startup step, before the port listens (whoever waits for it finds the
/// fork-server ready and named, and the workers on their way): the
/// fork-server, unless workers are to be spawned (`--worker-start
/// spawn`). If it cannot run, workers are spawned and the log says why;
/// a `--preload` module that cannot be imported is the one error.
pub(crate) async fn start_unless_spawned(
    start: WorkerStart,
    spec: ForkSpec,
) -> Result<Option<Arc<ForkServer>>, Unusable> {
    if start == WorkerStart::Spawn {
        if !spec.preload.is_empty() {
            log::warn!(
                "--preload {} has no effect with --worker-start spawn",
                spec.preload.join(",")
            );
        }
        return Ok(None);
    }
    match ForkServer::start(spec).await {
        Ok(forkserver) => Ok(Some(Arc::new(forkserver))),
        Err(e @ Unusable::Preload { .. }) => Err(e),
        Err(e) => {
            log::warn!("workers are spawned, not forked: {e}");
            Ok(None)
        }
    }
}

impl ForkServer {
    /// Starts the fork-server and waits until it has imported everything.
    pub(crate) async fn start(spec: ForkSpec) -> Result<ForkServer, Unusable> {
        let running = Running::start(&spec).await?;
        log::debug!(
            "fork-server pid {} ready ({} -u -m {}, preloaded: {})",
            running.pid,
            spec.python.display(),
            spec.module,
            if spec.preload.is_empty() {
                "nothing".to_string()
            } else {
                spec.preload.join(", ")
            }
        );
        Ok(ForkServer {
            spec,
            state: Mutex::new(State {
                running: Some(running),
                ..State::default()
            }),
            fell_back: AtomicBool::new(false),
        })
    }

    /// A new worker process. Starts the fork-server again if it is gone,
    /// once; an error means this worker must be spawned.
    ///
    /// Every wait here is bounded, so that a worker start never waits
    /// much longer than the fork timeout and a spawn: for the fork-server
    /// while another start holds it, [`FORK_TIMEOUT`]; for its answer,
    /// [`FORK_TIMEOUT`]; for a killed one to end, [`KILL_WAIT`] (one stuck
    /// in the kernel is left to its watcher); for a new one to start,
    /// [`STARTUP_TIMEOUT`] (what a spawned worker's start-up may take
    /// too). A hung fork-server is not started again by the start that
    /// found it hung, which spawns its worker, but by the next.
    ///
    /// With `identity`, the worker takes it on before it reads anything
    /// ([`crate::workers::identity`]).
    pub(crate) async fn fork(&self, identity: Option<&Identity>) -> io::Result<ForkedWorker> {
        // Held longer than a fork takes only while another start waits for
        // a hung fork-server, or starts a new one.
        let Ok(mut state) = tokio::time::timeout(FORK_TIMEOUT, self.state.lock()).await else {
            return Err(io::Error::other(format!(
                "the fork-server was busy with another worker's start for {FORK_TIMEOUT:?}"
            )));
        };
        let mut restarted = false;
        loop {
            let running = match state.running.as_mut() {
                Some(running) => running,
                None => {
                    if let Some(at) = state.paused.filter(|at| at.elapsed() < RESTART_PAUSE) {
                        return Err(io::Error::other(format!(
                            "the fork-server failed {:.0?} ago; the next try is {RESTART_PAUSE:?} \
                             after that",
                            at.elapsed()
                        )));
                    }
                    match Running::start(&self.spec).await {
                        Ok(r) => {
                            log::warn!("fork-server started again (pid {})", r.pid);
                            restarted = true;
                            state.running.insert(r)
                        }
                        Err(e) => {
                            state.paused = Some(Instant::now());
                            return Err(io::Error::other(format!(
                                "the fork-server cannot start: {e}"
                            )));
                        }
                    }
                }
            };
            let pid = running.pid;
            let (timed_out, e) = match running.fork(identity).await {
                Ok(w) => {
                    state.hung = false;
                    return Ok(w);
                }
                Err(Failure::Once(e)) => return Err(e),
                Err(Failure::Hung(e)) => (true, e),
                Err(Failure::Dead(e)) => (false, e),
            };
            let give_up = if timed_out {
                if std::mem::replace(&mut state.hung, true) {
                    state.paused = Some(Instant::now());
                    log::warn!(
                        "the fork-server (pid {pid}) hung ({e}), as the one before it did: \
                         workers are spawned for {RESTART_PAUSE:?}"
                    );
                } else {
                    log::warn!(
                        "the fork-server (pid {pid}) hung ({e}); this worker is spawned, and \
                         the next start starts it again"
                    );
                }
                Some(e)
            } else if restarted {
                Some(io::Error::other(format!(
                    "the fork-server failed right after it started again: {e}"
                )))
            } else {
                log::warn!("the fork-server (pid {pid}) is gone ({e}); starting it again");
                None
            };
            if let Some(r) = state.running.take() {
                r.stop().await;
            }
            if let Some(e) = give_up {
                return Err(e);
            }
        }
    }

    /// Logs, the first time only, that a worker is spawned because `why`.
    pub(crate) fn fall_back(&self, why: &io::Error) {
        if !self.fell_back.swap(true, Ordering::SeqCst) {
            log::warn!("a worker is spawned instead of forked: {why} (said once)");
        }
    }

    /// Stops the fork-server, at the server's stop. Bounded: the worker
    /// starts that hold it are cancelled by the stop, and one that cannot
    /// be killed is left behind (the sweep of the server's descendants
    /// tries once more).
    pub(crate) async fn stop(&self) {
        match tokio::time::timeout(FORK_TIMEOUT, self.state.lock()).await {
            Ok(mut state) => {
                if let Some(r) = state.running.take() {
                    r.stop().await;
                }
            }
            Err(_) => log::warn!("the fork-server was not free to be stopped"),
        }
    }
}

/// How a fork failed.
enum Failure {
    /// The fork-server is dead or out of step: start it again.
    Dead(io::Error),
    /// It did not answer within [`FORK_TIMEOUT`]: start it again, but not
    /// for this worker, which has waited long enough.
    Hung(io::Error),
    /// This fork failed, the fork-server is fine (e.g. out of processes).
    Once(io::Error),
}

impl Running {
    async fn start(spec: &ForkSpec) -> Result<Running, Unusable> {
        let other = |what: &str, e: &dyn fmt::Display| Unusable::Other(format!("{what}: {e}"));
        if !nix::sys::prctl::get_child_subreaper().unwrap_or(false) {
            return Err(Unusable::Other(
                "the server is not a child subreaper, so forked workers could not be handed \
                 to it"
                    .into(),
            ));
        }
        if let Err(e) = process::pidfd_works() {
            return Err(other(
                "this kernel cannot watch a forked worker (pidfd_open, Linux 5.3)",
                &e,
            ));
        }
        let (ours, theirs) =
            StdUnixStream::pair().map_err(|e| other("cannot make the fork-server's socket", &e))?;
        let mut cmd = Command::new(&spec.python);
        cmd.arg("-u")
            .arg("-c")
            .arg(bootstrap::forkserver_code())
            .arg("-m")
            .arg(&spec.module)
            .args(&spec.preload)
            .env("PYTHONPATH", &spec.pythonpath)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own group, as a worker's: a Ctrl-C in the server's
            // terminal is the server's to handle.
            .process_group(0);
        // Its forks drop to their user's uid themselves: it stays ours.
        process::prepare(&mut cmd, spec.nofile, None);
        let (mut child, registered) =
            reaper::spawn(&mut cmd).map_err(|e| other("cannot start the fork-server", &e))?;
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(log_stderr(pid, stderr));
        }
        let (exited_tx, exited) = watch::channel(None);
        let (kill, killed) = oneshot::channel();
        tokio::spawn(watch_exit(child, registered, killed, exited_tx));
        ours.set_nonblocking(true)
            .map_err(|e| other("cannot set up the fork-server's socket", &e))?;
        let ctl = UnixStream::from_std(ours)
            .map_err(|e| other("cannot set up the fork-server's socket", &e))?;
        let mut running = Running {
            exited,
            kill: Some(kill),
            ctl,
            asked: false,
            pid,
        };
        let hello = tokio::select! {
            line = tokio::time::timeout(STARTUP_TIMEOUT, read_line(&mut running.ctl)) => line,
            how = ended(&mut running.exited) => {
                return Err(Unusable::Other(format!("the fork-server exited at startup ({how})")));
            }
        };
        let hello = match hello {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => {
                // Its socket closes as it exits: its status says more.
                let how = tokio::time::timeout(EXIT_WAIT, ended(&mut running.exited)).await;
                running.stop().await;
                return Err(match how {
                    Ok(how) => {
                        Unusable::Other(format!("the fork-server exited at startup ({how})"))
                    }
                    Err(_) => other("the fork-server did not start", &e),
                });
            }
            Err(_) => {
                running.stop().await;
                return Err(Unusable::Other(format!(
                    "the fork-server was not ready within {STARTUP_TIMEOUT:?}"
                )));
            }
        };
        match hello.split_once(' ').unwrap_or((hello.as_str(), "")) {
            ("R", _) => Ok(running),
            ("I", rest) => {
                running.stop().await;
                let (module, why) = rest.split_once('\t').unwrap_or((rest, ""));
                Err(Unusable::Preload {
                    module: module.to_string(),
                    why: why.to_string(),
                })
            }
            ("E", why) => {
                running.stop().await;
                Err(Unusable::Other(format!(
                    "the fork-server cannot run: {why}"
                )))
            }
            _ => {
                running.stop().await;
                Err(Unusable::Other(format!(
                    "the fork-server said {hello:?} at startup"
                )))
            }
        }
    }

    /// Asks for one worker, as `identity` if given.
    async fn fork(&mut self, identity: Option<&Identity>) -> Result<ForkedWorker, Failure> {
        if self.asked {
            return Err(Failure::Dead(io::Error::other(
                "an earlier request was left unanswered",
            )));
        }
        let pipes = Pipes::new().map_err(Failure::Once)?;
        // From the request until the worker is registered, no scan for
        // orphans takes its exit status.
        let adopting = Adopting::begin();
        self.asked = true;
        let request = match identity {
            Some(identity) => [&b"U"[..], &identity.fork_request()].concat(),
            None => b"F".to_vec(),
        };
        let asked = async {
            send_fds(&self.ctl, &request, &pipes.theirs()).await?;
            read_line(&mut self.ctl).await
        };
        let answer = tokio::select! {
            answer = tokio::time::timeout(FORK_TIMEOUT, asked) => answer,
            how = ended(&mut self.exited) => {
                return Err(Failure::Dead(io::Error::other(format!("it exited ({how})"))));
            }
        };
        let line = match answer {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(Failure::Dead(e)),
            Err(_) => {
                return Err(Failure::Hung(io::Error::other(format!(
                    "no answer within {FORK_TIMEOUT:?}"
                ))))
            }
        };
        self.asked = false;
        match line.split_once(' ').unwrap_or((line.as_str(), "")) {
            ("P", pid) => {
                let pid: u32 = pid.trim().parse().map_err(|_| {
                    Failure::Dead(io::Error::other(format!("it answered {line:?}")))
                })?;
                let registered = reaper::register(pid);
                drop(adopting);
                let process = Forked::adopt(pid, registered).map_err(Failure::Once)?;
                let Pipes { ours, .. } = pipes;
                let [stdin, stdout, stderr] = ours;
                Ok(ForkedWorker {
                    process,
                    stdin,
                    stdout,
                    stderr,
                })
            }
            ("E", why) => Err(Failure::Once(io::Error::other(format!(
                "the fork-server could not fork: {why}"
            )))),
            ("B", why) => Err(Failure::Dead(io::Error::other(format!(
                "it cannot serve any more: {why}"
            )))),
            _ => Err(Failure::Dead(io::Error::other(format!(
                "it answered {line:?}"
            )))),
        }
    }

    /// Kills it (its forks live on: they are the server's now) and waits
    /// until it is reaped, for [`KILL_WAIT`] at most: one stuck in the
    /// kernel (a hung NFS mount) or frozen does not die of SIGKILL until
    /// it comes back, and worker starts wait for this. Its watcher reaps it
    /// whenever it ends.
    async fn stop(mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if tokio::time::timeout(KILL_WAIT, ended(&mut self.exited))
            .await
            .is_err()
        {
            log::warn!(
                "the fork-server (pid {}) did not end within {KILL_WAIT:?} of SIGKILL (stuck \
                 in the kernel?); it is reaped whenever it ends",
                self.pid
            );
        }
    }
}

/// Waits for the fork-server to exit (killing it when told to), reaps it,
/// and says how it ended.
async fn watch_exit(
    mut child: Child,
    _registered: Registration,
    killed: oneshot::Receiver<()>,
    exited: watch::Sender<Option<String>>,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        _ = killed => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let how = match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("cannot be reaped: {e}"),
    };
    exited.send_replace(Some(how));
}

/// How the fork-server ended, once it has (at once if it had).
async fn ended(exited: &mut watch::Receiver<Option<String>>) -> String {
    match exited.wait_for(Option::is_some).await {
        Ok(how) => how.clone().unwrap_or_default(),
        // The watcher is gone: it ended with the fork-server.
        Err(_) => "gone".to_string(),
    }
}

/// A new worker's three pipes: `theirs` go to the fork-server (the
/// worker's stdin to read, stdout and stderr to write), `ours` stay.
struct Pipes {
    ours: [OwnedFd; 3],
    theirs: [OwnedFd; 3],
}

impl Pipes {
    fn new() -> io::Result<Pipes> {
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (stdin_r, stdin_w) = nix::unistd::pipe2(cloexec)?;
        let (stdout_r, stdout_w) = nix::unistd::pipe2(cloexec)?;
        let (stderr_r, stderr_w) = nix::unistd::pipe2(cloexec)?;
        Ok(Pipes {
            ours: [stdin_w, stdout_r, stderr_r],
            theirs: [stdin_r, stdout_w, stderr_w],
        })
    }

    fn theirs(&self) -> [i32; 3] {
        self.theirs.each_ref().map(|fd| fd.as_fd().as_raw_fd())
    }
}

/// Sends one request, `fds` attached to its first byte. The request is a
/// few hundred bytes at most, which an empty socket buffer (the
/// fork-server has answered every request before) takes whole; a part
/// left over is sent after it.
async fn send_fds(ctl: &UnixStream, request: &[u8], fds: &[i32; 3]) -> io::Result<()> {
    let mut sent = 0;
    while sent < request.len() {
        ctl.writable().await?;
        let attached: &[ControlMessage] = if sent == 0 {
            &[ControlMessage::ScmRights(fds)]
        } else {
            &[]
        };
        let wrote = ctl.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                ctl.as_raw_fd(),
                &[IoSlice::new(&request[sent..])],
                attached,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match wrote {
            Ok(0) => return Err(io::Error::other("the request was not sent")),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One line from the fork-server, without its newline. It says one line
/// per request (and one at startup), so a line arrives in one read as a
/// rule, and anything after its newline is out of step.
async fn read_line(ctl: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = ctl.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the fork-server closed its socket",
            ));
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            if end + 1 != line.len() {
                return Err(io::Error::other(
                    "the fork-server said more than it was asked",
                ));
            }
            line.truncate(end);
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_LINE {
            return Err(io::Error::other("the fork-server's answer is too long"));
        }
    }
}

/// Logs what the fork-server writes to stderr (tracebacks of imports), at
/// debug level as for workers; reading it keeps it from blocking.
async fn log_stderr(pid: u32, mut stderr: tokio::process::ChildStderr) {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        log::debug!(
            "fork-server pid {pid} stderr: {}",
            String::from_utf8_lossy(&buf[..n]).trim_end()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Running` whose fork-server is the other end of a socket pair,
    /// played by the test, and the sender that would say it exited.
    fn fake() -> (Running, StdUnixStream, watch::Sender<Option<String>>) {
        let (ours, theirs) = StdUnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (alive, exited) = watch::channel(None);
        let running = Running {
            exited,
            kill: None,
            ctl: UnixStream::from_std(ours).unwrap(),
            asked: false,
            pid: 0,
        };
        (running, theirs, alive)
    }

    // The guard is a std lock held across awaits on purpose: the test's
    // runtime has one thread, and the lock only keeps other tests out.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn an_answer_to_an_abandoned_request_is_not_taken_for_the_next_one() {
        // A fork holds an `Adopting`, which would stop the reaper's tests
        // from reaping what they count.
        let _alone = reaper::SCANNING_TESTS
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let (mut running, mut peer, _alive) = fake();
        // A worker start cancelled while it waits for the answer.
        let cancelled = tokio::time::timeout(Duration::from_millis(50), running.fork(None)).await;
        assert!(cancelled.is_err());
        // The answer to it comes late (a pid no process can have).
        std::io::Write::write_all(&mut peer, b"P 1073741823\n").unwrap();
        match running.fork(None).await {
            Err(Failure::Dead(e)) => assert!(e.to_string().contains("unanswered"), "{e}"),
            Err(Failure::Once(e) | Failure::Hung(e)) => panic!("not taken for out of step: {e}"),
            Ok(_) => panic!("the late answer was taken for this request's"),
        }
    }
}
