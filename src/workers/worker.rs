//! One worker process: spawned, handshaken, given jobs one at a time, and
//! stopped and reaped.
//!
//! A worker is `<python> -u -m ppft` speaking the worker side of the
//! protocol over its stdin/stdout, with the same framing as the sockets.
//! It is started as `<python> -u -c <bootstrap> -m ppft`: the bootstrap
//! (`worker_bootstrap.py`) ignores SIGTERM, SIGINT and SIGHUP in Python,
//! then runs the module as `-m` does. A stop signal sent to every process
//! of a tree (Slurm's scancel, systemd's control-group kill) then reaches
//! the server, whose drain still gets the running jobs' answers from the
//! workers. The protocol:
//!
//! 1. worker -> server: its pid, as a decimal string;
//! 2. server -> worker: the pickle protocol number, as a decimal string;
//! 3. per job: the package through the per-worker `N`/`H` cache, then the
//!    pickled args; the worker answers with the pickled `(result, stdout)`.
//!
//! Workers get `PR_SET_PDEATHSIG` so they die with the server even if the
//! server is killed, and their own process group so a Ctrl-C in the
//! server's terminal reaches only the server, which then stops them itself;
//! stopping a worker kills that whole group, so children its jobs started
//! go with it. A worker is known dead when its process exits, even while a
//! child it left holds its pipes open. Workers get a higher
//! `oom_score_adj` than the server: under memory pressure the kernel takes
//! a worker, not the server. And they get back the open-file soft limit
//! the server started with, which the server raised for itself. A user's
//! worker runs as the user's uid when the users file gives one
//! ([`crate::workers::identity`]). Deciding
//! what to do when a worker fails is [`crate::workers::pool`]'s business.

use std::ffi::OsString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::process::Command;

use crate::config::users::Credentials;
use crate::config::Config;
use crate::jobs::cache::{Package, WorkerCache};
use crate::memory::mapped::{self, MAPPED_MIN};
use crate::protocol::wire::{write_frame, write_frames, write_heads, FrameError, FrameReader};
use crate::workers::bootstrap::{self, STARTUP_TIMEOUT};
use crate::workers::forkserver::{ForkServer, ForkedWorker};
use crate::workers::identity::Identity;
use crate::workers::install::Interpreter;
use crate::workers::process::{self, Process};
use crate::workers::reaper;

/// After a worker's stdout closes, how long it may take to exit by itself
/// before it is killed; and after it exits, how long an answer it wrote
/// just before may take to be read from a pipe a child of it still holds.
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// ppft's worker prints this when it cannot go on (e.g. a package it cannot
/// unpickle), sends that last result and exits; spotting it lets the slot be
/// refilled before another job is handed to a dying process.
const FATAL_MARKER: &[u8] = b"A fatal error has occured during the function execution";
/// Only results this small are searched for [`FATAL_MARKER`]: a fatal
/// result holds a traceback, never bulk data.
const FATAL_SCAN_LIMIT: usize = 64 * 1024;
/// How to start a worker.
#[derive(Debug)]
pub(crate) struct WorkerSpec {
    /// The interpreter.
    pub(crate) python: PathBuf,
    /// Module run with `-m`.
    pub(crate) module: String,
    /// Pickle protocol announced in the handshake.
    pub(crate) proto: i32,
    /// `PYTHONPATH` for the worker: the caller's, then the server's cwd.
    pub(crate) pythonpath: OsString,
    /// Largest result frame accepted from a worker.
    pub(crate) max_frame: usize,
    /// Replace the worker after every job (`-r`).
    pub(crate) restart: bool,
    /// Replace the worker after this many jobs (`--max-jobs-per-worker`);
    /// 0: never.
    pub(crate) max_jobs: u64,
    /// Let a running job whose client left run to its end
    /// (`--keep-abandoned`) instead of stopping its worker.
    pub(crate) keep_abandoned: bool,
    /// Stop the worker of a job that has run this long, and answer the
    /// job (`--job-timeout`); `None`: no limit.
    pub(crate) job_timeout: Option<Duration>,
    /// The server's host name, named in the answer to a job stopped by
    /// `--job-timeout`: a client of many servers learns which one.
    pub(crate) host: String,
    /// The open-file limits (soft, hard) a worker gets before it execs:
    /// the soft limit the server started with, before it raised its own
    /// ([`crate::ops::openfiles`]), so jobs see what they would under
    /// ppft's server; `None`: the server's own, unchanged.
    pub(crate) nofile: Option<(u64, u64)>,
}

impl WorkerSpec {
    /// How this server's workers start: the interpreter the probe found,
    /// and the options that bear on a worker. `listening` names the
    /// server in a stopped job's answer when the host has no name.
    pub(crate) fn new(
        cfg: &Config,
        interpreter: &Interpreter,
        listening: IpAddr,
        nofile: Option<(u64, u64)>,
    ) -> WorkerSpec {
        WorkerSpec {
            python: interpreter.python.clone(),
            module: interpreter.module.clone(),
            proto: cfg.proto.unwrap_or(2),
            pythonpath: interpreter.pythonpath.clone(),
            max_frame: cfg.max_frame_size,
            restart: cfg.restart,
            max_jobs: cfg.max_jobs_per_worker,
            keep_abandoned: cfg.keep_abandoned,
            job_timeout: cfg.job_timeout,
            host: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| listening.to_string()),
            nofile,
        }
    }
}

/// How a job ended on a worker.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The worker answered; the frame goes to the client as is.
    Answered(Bytes),
    /// The worker was gone before it got the job.
    NotStarted,
    /// The worker died while it had the job, or sent an answer that was
    /// refused (the reason says why).
    Died {
        /// Why the answer was refused; `None` if the worker just died.
        refused: Option<String>,
    },
}

/// How a worker was started, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Started {
    /// Forked by the fork-server.
    Fork,
    /// A fresh interpreter.
    Spawn,
}

impl Started {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Started::Fork => "fork",
            Started::Spawn => "spawn",
        }
    }
}

/// A running worker process.
pub(crate) struct Worker {
    /// The worker's process group, killed with it. Declared first so a
    /// worker dropped without [`Worker::stop`] loses its group before its
    /// process is reaped.
    group: ProcessGroup,
    /// The process; dropping it kills it.
    child: Process,
    /// Jobs go in here. A pipe sender rather than tokio's `ChildStdin`,
    /// which cannot wait for room without writing: large arguments go in
    /// by `vmsplice` ([`mapped::vmsplice_all`]).
    stdin: pipe::Sender,
    /// Results come out here.
    stdout: FrameReader<pipe::Receiver>,
    /// The worker's pid (and process group id), for log lines.
    pub(crate) pid: u32,
    /// How it was started.
    pub(crate) started: Started,
    /// Set when the worker's last answer said it is about to exit.
    pub(crate) exiting: bool,
}

impl Worker {
    /// Starts a worker, forked by `forkserver` if there is one (spawned
    /// if it fails), and completes its handshake. With `credentials`, the
    /// worker runs as that uid ([`crate::workers::identity`]).
    pub(crate) async fn start(
        spec: &WorkerSpec,
        forkserver: Option<&ForkServer>,
        credentials: Option<&Credentials>,
    ) -> io::Result<Worker> {
        let Some(forkserver) = forkserver else {
            return Worker::spawn(spec, credentials).await;
        };
        let identity = credentials.map(Identity::of);
        let forked = match forkserver.fork(identity.as_ref()).await {
            Ok(forked) => forked,
            Err(e) => {
                forkserver.fall_back(&e);
                return Worker::spawn(spec, credentials).await;
            }
        };
        let ForkedWorker {
            process,
            stdin,
            stdout,
            stderr,
        } = forked;
        Worker::begin(
            spec,
            Process::Forked(process),
            Started::Fork,
            [stdin, stdout, stderr],
        )
        .await
    }

    /// Starts a fresh interpreter as a worker, as `credentials`' uid if
    /// given, and completes its handshake.
    pub(crate) async fn spawn(
        spec: &WorkerSpec,
        credentials: Option<&Credentials>,
    ) -> io::Result<Worker> {
        let mut cmd = Command::new(&spec.python);
        cmd.arg("-u")
            .arg("-c")
            .arg(bootstrap::worker_code())
            .arg("-m")
            .arg(&spec.module)
            .env("PYTHONPATH", &spec.pythonpath)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        process::prepare(&mut cmd, spec.nofile, credentials.map(Identity::of));
        let (mut child, registered) = reaper::spawn(&mut cmd)?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(io::Error::other("worker pipes missing"));
        };
        let pipes = [
            stdin.into_owned_fd()?,
            stdout.into_owned_fd()?,
            stderr.into_owned_fd()?,
        ];
        let process = Process::Spawned {
            child,
            _registered: registered,
        };
        Worker::begin(spec, process, Started::Spawn, pipes).await
    }

    /// Takes a started worker `process` with the server's ends of its
    /// stdin, stdout and stderr, and completes its handshake.
    async fn begin(
        spec: &WorkerSpec,
        process: Process,
        started: Started,
        [stdin, stdout, stderr]: [OwnedFd; 3],
    ) -> io::Result<Worker> {
        widen_pipe(&stdin);
        widen_pipe(&stdout);
        let pid = process.id();
        // Pipes from the fork-server are blocking; tokio's take that too.
        let stdin = pipe::Sender::from_owned_fd(stdin)?;
        let stdout = pipe::Receiver::from_owned_fd(stdout)?;
        let stderr = pipe::Receiver::from_owned_fd(stderr)?;
        let mut w = Worker {
            group: ProcessGroup::of(pid),
            pid,
            child: process,
            stdin,
            stdout: FrameReader::new(stdout, spec.max_frame),
            started,
            exiting: false,
        };
        tokio::spawn(drain_stderr(w.pid, stderr));
        match w.handshake(spec.proto).await {
            Ok(()) => Ok(w),
            Err(e) => {
                let how = w.stop(true).await;
                Err(io::Error::other(format!("{e} ({how})")))
            }
        }
    }

    /// Reads the worker's pid and tells it the pickle protocol.
    async fn handshake(&mut self, proto: i32) -> io::Result<()> {
        let hello = tokio::time::timeout(STARTUP_TIMEOUT, self.read_or_exit()).await;
        let announced = match hello {
            Ok(Some(Ok(Some(frame)))) => frame,
            Ok(Some(Ok(None)) | None) => {
                return Err(io::Error::other("worker exited during startup"))
            }
            Ok(Some(Err(e))) => return Err(io::Error::other(format!("worker startup: {e}"))),
            Err(_) => return Err(io::Error::other("worker did not start in time")),
        };
        let pid = std::str::from_utf8(&announced)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| io::Error::other("worker announced no pid"))?;
        if pid != self.pid {
            log::debug!("worker pid {} announced pid {pid}", self.pid);
        }
        write_frame(&mut self.stdin, proto.to_string().as_bytes()).await
    }

    /// Runs one job: `package` through the worker's cache, then `args`.
    pub(crate) async fn run(
        &mut self,
        cache: &mut WorkerCache,
        package: &Package,
        args: &[u8],
    ) -> Outcome {
        let package_frame = cache.frame_for(package);
        // A child of the worker may hold its stdin open without reading
        // it: the write must not outlast the worker.
        let mut stdin = Counted {
            pipe: &mut self.stdin,
            written: 0,
        };
        let by_reference = args.len() >= MAPPED_MIN && mapped::is_mapped(args);
        // A send cut short by the worker's exit drops its token, if the
        // splice had begun: the args then stay counted as in a pipe.
        let sent = tokio::select! {
            biased;
            r = send_job(&mut stdin, package_frame, args, by_reference) => Some(r),
            _ = self.child.wait() => None,
        };
        let written = stdin.written;
        let spliced = match sent {
            Some(Ok(spliced)) => spliced,
            // The pipe was closed before this job reached the worker.
            Some(Err(_)) if written == 0 => return Outcome::NotStarted,
            // The worker may still have answered: ppft's worker answers a
            // package it cannot load and exits before reading the args.
            Some(Err(_)) => None,
            None => return self.exited(written).await,
        };
        cache.insert(package.hash);
        match self.read_or_exit().await {
            Some(Ok(Some(result))) => {
                let outcome = self.answered(result);
                // A worker that answered and goes on has read its args
                // whole; an empty pipe holds no reference to their pages,
                // so their mapping may serve a later frame. Only the
                // splice into this pipe is uncounted, and only if there
                // was one; any other way out leaves it counted.
                if let Some(spliced) = spliced {
                    if !self.exiting && unread(&self.stdin) == Some(0) {
                        spliced.drained();
                    }
                }
                outcome
            }
            Some(Ok(None)) => self.unanswered(written),
            Some(Err(e)) => Outcome::Died {
                refused: Some(e.to_string()),
            },
            None => self.exited(written).await,
        }
    }

    /// The next frame from the worker, or `None` if its process exits
    /// first: a child it started may hold its stdout open long after it is
    /// gone, so the end of the pipe alone comes too late. Cancel-safe: a
    /// partly read frame stays buffered, and tokio's `wait` may be dropped.
    async fn read_or_exit(&mut self) -> Option<Result<Option<Bytes>, FrameError>> {
        tokio::select! {
            biased;
            r = self.stdout.read_frame() => Some(r),
            _ = self.child.wait() => None,
        }
    }

    fn answered(&mut self, result: Bytes) -> Outcome {
        self.exiting = result.len() <= FATAL_SCAN_LIMIT
            && result
                .windows(FATAL_MARKER.len())
                .any(|w| w == FATAL_MARKER);
        Outcome::Answered(result)
    }

    /// The worker gave no answer to a job of which `written` bytes went
    /// into its stdin.
    fn unanswered(&self, written: usize) -> Outcome {
        // A worker killed while idle can take a job in the moment before
        // it dies; if it never read a byte of it, the job did not start
        // and must not be answered as if it crashed.
        if unread_bytes(&self.stdin) >= written {
            Outcome::NotStarted
        } else {
            Outcome::Died { refused: None }
        }
    }

    /// The worker's process exited while it had a job. Its group goes
    /// now, and with it the copies of its pipes its children held; an
    /// answer it wrote just before it exited is still read.
    async fn exited(&mut self, written: usize) -> Outcome {
        self.group.kill();
        match tokio::time::timeout(EXIT_GRACE, self.stdout.read_frame()).await {
            Ok(Ok(Some(result))) => {
                let outcome = self.answered(result);
                self.exiting = true;
                outcome
            }
            Ok(Err(e)) => Outcome::Died {
                refused: Some(e.to_string()),
            },
            // The pipe ended, or a child that left the group holds it.
            Ok(Ok(None)) | Err(_) => self.unanswered(written),
        }
    }

    /// Watches a worker that has no job. It has nothing to say, so this
    /// completes only when it died (its process exited, or its stdout
    /// ended), broke the framing, or wrote a frame anyway; true for the
    /// last, the one case worth a warning. Safe to cancel in a `select!`.
    pub(crate) async fn watch_idle(&mut self) -> bool {
        matches!(self.read_or_exit().await, Some(Ok(Some(_))))
    }

    /// Ends the worker and its process group, and reaps it; says how it
    /// ended. A worker whose stdout already closed gets a moment to exit by
    /// itself, so the exit code or signal reported is its own, not ours.
    pub(crate) async fn stop(mut self, graceful: bool) -> String {
        drop(self.stdin);
        let mut exited = None;
        if graceful {
            if let Ok(Ok(status)) = tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
                exited = Some(status);
            }
        }
        // Children its jobs left in its group go with it.
        self.group.kill();
        let status = match exited {
            Some(status) => Ok(status),
            None => {
                let _ = self.child.start_kill();
                self.child.wait().await
            }
        };
        self.group.forget();
        match status {
            Ok(status) => describe(status),
            Err(e) => format!("could not be reaped: {e}"),
        }
    }
}

/// A worker's process group (the worker leads it: `process_group(0)`),
/// SIGKILLed on [`ProcessGroup::kill`] and when dropped unless forgotten.
///
/// Killing by group id is safe while the worker is unreaped or any member
/// is alive: the kernel does not reuse the id of a live group. Once the
/// group is empty and the worker reaped, a new process could take the id
/// and lead a group of its own in between, but only after the pid counter
/// wrapped around, so the group is forgotten once its worker is reaped.
struct ProcessGroup(Option<Pid>);

impl ProcessGroup {
    fn of(pid: u32) -> ProcessGroup {
        // Never 0 (our own group) or 1.
        match i32::try_from(pid) {
            Ok(pid) if pid > 1 => ProcessGroup(Some(Pid::from_raw(pid))),
            _ => ProcessGroup(None),
        }
    }

    fn kill(&self) {
        if let Some(group) = self.0 {
            // ESRCH: nobody left in it.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }

    fn forget(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes one job into a worker's stdin: the package frame, then the
/// args frame. Arguments read into a mapping of their own
/// ([`mapped::is_mapped`]) go in `by_reference` (`vmsplice`) after the
/// package and their header: the worker reads them straight from the
/// server's memory, and the server copies nothing; the splice's token
/// comes back, to be drained once the pipe is known empty. Everything
/// else goes in one `writev`.
async fn send_job(
    stdin: &mut Counted<'_>,
    package_frame: &[u8],
    args: &[u8],
    by_reference: bool,
) -> Result<Option<mapped::Spliced>, crate::protocol::wire::PartialWrite> {
    if !by_reference {
        return write_frames(stdin, &[package_frame, args])
            .await
            .map(|()| None);
    }
    // A failure here comes before any splice: nothing to uncount.
    write_heads(stdin, package_frame, args.len()).await?;
    // Counted in place, so a send cut short by the worker's exit still
    // tells how much went in.
    let Counted { pipe, written } = stdin;
    mapped::vmsplice_all(pipe, args, written)
        .await
        .map(Some)
        .map_err(|error| crate::protocol::wire::PartialWrite {
            written: *written,
            error,
        })
}

/// A worker's stdin that counts the bytes written, so a write cut short
/// by the worker's exit still tells a job the worker never read from one
/// it took.
struct Counted<'a> {
    pipe: &'a mut pipe::Sender,
    written: usize,
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.pipe).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n;
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.pipe).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n;
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.pipe.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.pipe).poll_shutdown(cx)
    }
}

/// Large job frames cross the worker pipes in 64 KiB steps by default, a
/// wake-up of the worker (or of us) per step; a 1 MiB pipe makes that 16
/// times fewer. Best effort: the system limit may be lower.
fn widen_pipe(pipe: &impl AsRawFd) {
    // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours.
    unsafe {
        nix::libc::fcntl(pipe.as_raw_fd(), nix::libc::F_SETPIPE_SZ, 1 << 20);
    }
}

/// Bytes written into a pipe that its reader has not read yet (FIONREAD
/// works on either end of a Linux pipe); 0 if it cannot be told.
fn unread_bytes(pipe: &impl AsRawFd) -> usize {
    unread(pipe).unwrap_or(0)
}

/// [`unread_bytes`], `None` if it cannot be told.
fn unread(pipe: &impl AsRawFd) -> Option<usize> {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    let rc = unsafe { nix::libc::ioctl(pipe.as_raw_fd(), nix::libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).ok()
    } else {
        None
    }
}

/// "exit code 3" or "killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {sig} ({s})"),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        status.to_string()
    }
}

/// Reads whatever a worker writes to stderr so it can never block on a full
/// pipe; logs it at debug level.
async fn drain_stderr(pid: u32, mut stderr: pipe::Receiver) {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if log::log_enabled!(log::Level::Debug) {
            let text = String::from_utf8_lossy(&buf[..n]);
            log::debug!("worker pid {pid} stderr: {}", text.trim_end());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn process_group_zero_or_one_is_never_killed() {
        assert!(ProcessGroup::of(0).0.is_none());
        assert!(ProcessGroup::of(1).0.is_none());
        assert!(ProcessGroup::of(u32::MAX).0.is_none());
        let mut g = ProcessGroup::of(4242);
        assert_eq!(g.0, Some(Pid::from_raw(4242)));
        g.forget();
    }

    #[test]
    fn exit_statuses_are_described() {
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(
            describe(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
    }

    use std::future::Future;

    /// A stand-in for ppft's worker: says its pid, takes the protocol
    /// number, waits for the file `go`, reads whatever its stdin holds,
    /// closes it, answers, and waits to be stopped.
    const CLOSES_STDIN_THEN_ANSWERS: &str = r#"
import os, struct, sys, time
def send(b):
    os.write(1, struct.pack("!Q", len(b)) + b)
def read_exactly(n):
    got = b""
    while len(got) < n:
        more = os.read(0, n - len(got))
        if not more:
            sys.exit(1)
        got += more
    return got
send(str(os.getpid()).encode())
read_exactly(struct.unpack("!Q", read_exactly(8))[0])
while not os.path.exists(GO):
    time.sleep(0.01)
os.read(0, 1 << 24)
os.close(0)
send(b"answer")
time.sleep(600)
"#;

    /// A stand-in for ppft's worker that reads each job whole and answers
    /// it.
    const READS_AND_ANSWERS: &str = r#"
import os, struct, sys
def send(b):
    os.write(1, struct.pack("!Q", len(b)) + b)
def read_exactly(n):
    got = bytearray()
    while len(got) < n:
        more = os.read(0, min(n - len(got), 1 << 20))
        if not more:
            sys.exit(0)
        got += more
    return got
def recv():
    return read_exactly(struct.unpack("!Q", read_exactly(8))[0])
send(str(os.getpid()).encode())
recv()
while True:
    recv()
    recv()
    send(b"answer")
"#;

    /// A stand-in for ppft's worker that answers every job with who it
    /// is: its real, effective and saved uids and gids, its groups, its
    /// death signal, HOME and USER.
    const SAYS_WHO_IT_IS: &str = r#"
import ctypes, os, struct, sys
def send(b):
    os.write(1, struct.pack("!Q", len(b)) + b)
def read_exactly(n):
    got = b""
    while len(got) < n:
        more = os.read(0, n - len(got))
        if not more:
            sys.exit(0)
        got += more
    return got
def recv():
    return read_exactly(struct.unpack("!Q", read_exactly(8))[0])
send(str(os.getpid()).encode())
recv()
while True:
    recv()
    recv()
    signal = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
    send(repr((os.getresuid(), os.getresgid(), os.getgroups(), signal.value,
               os.environ.get("HOME"), os.environ.get("USER"))).encode())
"#;

    /// A directory of its own under the system's temporary directory,
    /// removed when dropped (a failed test too).
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> ScratchDir {
            let dir = std::env::temp_dir().join(format!("ppserver-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            ScratchDir(dir)
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn spec_for(module: &str, dir: &Path) -> WorkerSpec {
        WorkerSpec {
            python: "python3".into(),
            module: module.into(),
            proto: 2,
            pythonpath: dir.as_os_str().to_owned(),
            max_frame: 1 << 20,
            restart: false,
            max_jobs: 0,
            keep_abandoned: false,
            job_timeout: None,
            host: "test".into(),
            nofile: None,
        }
    }

    /// A frame of `len` bytes in a mapping of its own.
    fn mapped_frame(len: usize) -> Bytes {
        let mut f = mapped::Filling::new(len, None).unwrap();
        while !f.is_full() {
            let room = f.unfilled().unwrap();
            room.fill(3);
            let n = room.len();
            f.advance(n);
        }
        f.freeze()
    }

    /// Whether `python3` runs here; the tests that need it say so and
    /// skip when it does not (a machine without Python runs no worker).
    fn python_runs() -> bool {
        // Unregistered: a scan by another test must not reap it.
        let _unregistered = reaper::SCANNING_TESTS
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let ran = std::process::Command::new("python3")
            .args(["-c", ""])
            .status()
            .is_ok_and(|s| s.success());
        if !ran {
            eprintln!("python3 cannot be run here: test skipped");
        }
        ran
    }

    #[tokio::test]
    async fn a_spawned_worker_runs_as_its_users_uid_and_still_dies_with_the_server() {
        // Another uid can run only an interpreter outside root's home.
        let python = Path::new("/usr/bin/python3");
        if !nix::unistd::geteuid().is_root() || !python.exists() || !python_runs() {
            eprintln!("not root, or no /usr/bin/python3: test skipped");
            return;
        }
        let scratch = ScratchDir::new("says-who");
        let dir = &scratch.0;
        std::fs::write(dir.join("says_who.py"), SAYS_WHO_IT_IS).unwrap();
        let mut spec = spec_for("says_who", dir);
        spec.python = python.into();
        let credentials = Credentials {
            uid: 64021,
            gid: 64022,
            groups: Vec::new(),
            account: None,
        };
        let mut w = Worker::spawn(&spec, Some(&credentials)).await.unwrap();
        let cache = crate::jobs::cache::PackageCache::new(1 << 20);
        let package = cache.receive(Bytes::from_static(b"Npackage")).unwrap();
        let outcome = w.run(&mut WorkerCache::default(), &package, b"args").await;
        let Outcome::Answered(answer) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "((64021, 64021, 64021), (64022, 64022, 64022), [], 9, '/', None)",
            "uids and gids all three, no groups, the death signal set after the drop, \
             and no HOME or USER of root's"
        );
        w.stop(false).await;
    }

    #[tokio::test]
    async fn a_job_read_whole_uncounts_its_splice() {
        if !python_runs() {
            return;
        }
        let scratch = ScratchDir::new("reads-whole");
        let dir = &scratch.0;
        std::fs::write(dir.join("reads_whole.py"), READS_AND_ANSWERS).unwrap();
        let mut w = Worker::spawn(&spec_for("reads_whole", dir), None)
            .await
            .unwrap();
        let args = mapped_frame(3 * MAPPED_MIN);
        let cache = crate::jobs::cache::PackageCache::new(1 << 20);
        let package = cache.receive(Bytes::from_static(b"Npackage")).unwrap();
        let mut wcache = WorkerCache::default();
        for _ in 0..2 {
            let outcome = w.run(&mut wcache, &package, &args).await;
            assert!(matches!(outcome, Outcome::Answered(_)), "{outcome:?}");
            assert_eq!(
                mapped::pipes_holding(&args),
                Some(0),
                "read whole, the pipe empty: its mapping may be reused"
            );
        }
        w.stop(false).await;
    }

    #[tokio::test]
    async fn a_header_write_that_fails_uncounts_no_splice() {
        if !python_runs() {
            return;
        }
        let scratch = ScratchDir::new("header-fails");
        let dir = &scratch.0;
        let go = dir.join("go");
        let source =
            CLOSES_STDIN_THEN_ANSWERS.replace("GO", &format!("{:?}", go.to_str().unwrap()));
        std::fs::write(dir.join("closes_stdin.py"), source).unwrap();
        let mut w = Worker::spawn(&spec_for("closes_stdin", dir), None)
            .await
            .unwrap();
        let pid = w.pid;
        // The arguments' pages are in another pipe too, not read yet.
        let args = mapped_frame(2 * MAPPED_MIN);
        let (other, _unread) = pipe::pipe().unwrap();
        let mut n = 0;
        let _in_other = mapped::vmsplice_all(&other, &args[..4096], &mut n)
            .await
            .unwrap();
        assert_eq!(mapped::pipes_holding(&args), Some(1));
        // A package larger than the worker's pipe: the first write fills
        // the pipe and stops short of the arguments' header.
        let cache = crate::jobs::cache::PackageCache::new(1 << 30);
        let mut frame = vec![b'N'];
        frame.resize(4 << 20, b'p');
        let package = cache.receive(Bytes::from(frame)).unwrap();
        let mut wcache = WorkerCache::default();
        {
            let run = w.run(&mut wcache, &package, &args);
            tokio::pin!(run);
            std::future::poll_fn(|cx| {
                assert!(run.as_mut().poll(cx).is_pending(), "the pipe is full");
                Poll::Ready(())
            })
            .await;
            // The worker reads what the pipe holds and closes it: the rest
            // of the package and the header cannot be written.
            std::fs::write(&go, b"").unwrap();
            let stdin = PathBuf::from(format!("/proc/{pid}/fd/0"));
            while stdin.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(matches!(run.await, Outcome::Answered(_)));
        }
        assert_eq!(
            mapped::pipes_holding(&args),
            Some(1),
            "no splice into the worker's pipe was counted, none is uncounted"
        );
        w.stop(false).await;
    }
}
