//! Worker processes: spawned, handshaken, fed jobs, watched and replaced.
//!
//! Each pool slot is one supervising task that owns its worker process
//! (`<python> -u -m ppft`) and speaks the worker side of the protocol over
//! the child's stdin/stdout with the same framing as the sockets:
//!
//! 1. worker -> server: its pid, as a decimal string;
//! 2. server -> worker: the pickle protocol number, as a decimal string;
//! 3. per job: the package through the per-worker `N`/`H` cache, then the
//!    pickled args; the worker answers with the pickled `(result, stdout)`.
//!
//! A worker that dies is noticed at once (its stdout reaches EOF, also while
//! idle), reaped, and replaced. The job it was running is answered with
//! `(None, "...worker died...")` and not retried, since it may crash again;
//! a job handed to a worker that was already dead is put back in the queue.
//! Workers get `PR_SET_PDEATHSIG` so they die with the server even if the
//! server is killed, and their own process group so a Ctrl-C in the
//! server's terminal reaches only the server, which then stops them itself.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;

use crate::cache::WorkerCache;
use crate::scheduler::{Job, Scheduler};
use crate::stats::Stats;
use crate::wire::{write_frame, write_frames, FrameReader, HEADER_LEN};

/// How long a new worker may take to announce its pid (importing ppft and
/// dill on a loaded machine can take seconds).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// After a worker's stdout closes, how long it may take to exit by itself
/// before it is killed.
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// First and largest pause between attempts to start a worker that fails.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Failed starts in a row after which queued jobs are answered with an
/// error if no worker at all is running (instead of waiting forever).
const FAILED_STARTS_BEFORE_GIVING_UP: u32 = 3;
/// How often a job whose worker was found dead before it started is retried
/// on a fresh worker before the client is told.
pub const MAX_START_ATTEMPTS: u8 = 3;
/// ppft's worker prints this when it cannot go on (e.g. a package it cannot
/// unpickle), sends that last result and exits; spotting it lets the slot be
/// refilled before another job is handed to a dying process.
const FATAL_MARKER: &[u8] = b"A fatal error has occured during the function execution";
/// Only results this small are searched for [`FATAL_MARKER`]: a fatal
/// result holds a traceback, never bulk data.
const FATAL_SCAN_LIMIT: usize = 64 * 1024;

/// How to start a worker.
#[derive(Debug)]
pub struct WorkerSpec {
    /// The interpreter.
    pub python: PathBuf,
    /// Module run with `-m`.
    pub module: String,
    /// Pickle protocol announced in the handshake.
    pub proto: i32,
    /// `PYTHONPATH` for the worker: the caller's, then the server's cwd.
    pub pythonpath: OsString,
    /// Largest result frame accepted from a worker.
    pub max_frame: usize,
    /// Replace the worker after every job (`-r`).
    pub restart: bool,
}

/// `PYTHONPATH` for workers: the inherited entries, then the server's
/// working directory, without duplicates. pp workers import user modules
/// named in job packages relative to where the server was started.
pub fn worker_pythonpath(inherited: Option<&OsStr>, cwd: &Path) -> OsString {
    let mut parts: Vec<PathBuf> = inherited
        .map(|p| {
            std::env::split_paths(p)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if !parts.iter().any(|p| p == cwd) {
        parts.push(cwd.to_path_buf());
    }
    std::env::join_paths(parts).unwrap_or_else(|_| cwd.as_os_str().to_owned())
}

/// Worker modules tried, in order, when none is chosen: ppft's worker, then
/// pp 1.7's. (ppft also installs a `pp` shim, but it has no `_worker`.)
pub const WORKER_MODULES: &[&str] = &["ppft", "pp._worker"];

/// Finds which of `candidates` the interpreter can run as a worker, and the
/// `__version__` of its package (what clients compare against). This is
/// also the startup check that the worker package is installed at all.
pub async fn probe_worker(
    python: &Path,
    candidates: &[&str],
    pythonpath: &OsStr,
) -> Result<(String, String), String> {
    let script = "import importlib, importlib.util, sys\n\
                  for mod in sys.argv[1:]:\n\
                  \x20   try:\n\
                  \x20       if importlib.util.find_spec(mod) is None: continue\n\
                  \x20   except ImportError: continue\n\
                  \x20   pkg = importlib.import_module(mod.split('.')[0])\n\
                  \x20   sys.stdout.write(mod + ' ' + str(pkg.__version__))\n\
                  \x20   break\n";
    let run = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(candidates)
        .env("PYTHONPATH", pythonpath)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let shown = python.display();
    let out = match tokio::time::timeout(STARTUP_TIMEOUT, run).await {
        Err(_) => return Err(format!("{shown} did not answer within {STARTUP_TIMEOUT:?}")),
        Ok(Err(e)) => {
            return Err(format!(
                "cannot run the worker interpreter {shown} (--python): {e}"
            ))
        }
        Ok(Ok(out)) => out,
    };
    let answer = String::from_utf8_lossy(&out.stdout);
    match answer.trim().split_once(' ') {
        Some((module, version)) if out.status.success() && !version.is_empty() => {
            if !version.is_ascii() {
                return Err(format!("{module}'s __version__ is not ASCII: {version:?}"));
            }
            Ok((module.to_string(), version.to_string()))
        }
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("").trim();
            Err(format!(
                "the worker interpreter {shown} cannot import {}{}; install ppft with: \
                 {shown} -m pip install ppft==1.7.8 dill  (or choose another with --python)",
                candidates.join(" or "),
                if last.is_empty() {
                    String::new()
                } else {
                    format!(" ({last})")
                },
            ))
        }
    }
}

/// How a job ended on a worker.
#[derive(Debug)]
enum Outcome {
    /// The worker answered; the frame goes to the client as is.
    Answered(Bytes),
    /// The worker was gone before it got the job.
    NotStarted,
    /// The worker died while it had the job, or sent an answer that was
    /// refused (the reason says why).
    Died { refused: Option<String> },
}

/// A running worker process.
struct Worker {
    /// The process; dropping it kills it (`kill_on_drop`).
    child: Child,
    /// Jobs go in here.
    stdin: ChildStdin,
    /// Results come out here.
    stdout: FrameReader<ChildStdout>,
    /// The pid the worker announced, for log lines.
    pid: u32,
    /// Set when the worker's last answer said it is about to exit.
    exiting: bool,
}

impl Worker {
    /// Starts a worker and completes its handshake.
    async fn spawn(spec: &WorkerSpec) -> io::Result<Worker> {
        let mut cmd = Command::new(&spec.python);
        cmd.arg("-u")
            .arg("-m")
            .arg(&spec.module)
            .env("PYTHONPATH", &spec.pythonpath)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (prctl, getppid); it allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
                // The server may have died between fork and prctl.
                if nix::unistd::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(io::Error::other("worker pipes missing"));
        };
        widen_pipe(&stdin);
        widen_pipe(&stdout);
        let mut w = Worker {
            pid: child.id().unwrap_or(0),
            child,
            stdin,
            stdout: FrameReader::new(stdout, spec.max_frame),
            exiting: false,
        };
        tokio::spawn(drain_stderr(w.pid, stderr));
        let hello = tokio::time::timeout(STARTUP_TIMEOUT, w.stdout.read_frame()).await;
        let announced = match hello {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return Err(io::Error::other("worker exited during startup")),
            Ok(Err(e)) => return Err(io::Error::other(format!("worker startup: {e}"))),
            Err(_) => return Err(io::Error::other("worker did not start in time")),
        };
        let pid = std::str::from_utf8(&announced)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| io::Error::other("worker announced no pid"))?;
        if pid != w.pid {
            log::debug!("worker pid {} announced pid {pid}", w.pid);
        }
        write_frame(&mut w.stdin, spec.proto.to_string().as_bytes()).await?;
        Ok(w)
    }

    /// Runs one job.
    async fn run(&mut self, cache: &mut WorkerCache, job: &Job) -> Outcome {
        let package_frame = cache.frame_for(&job.package);
        let written = match write_frames(&mut self.stdin, &[package_frame, &job.args]).await {
            Ok(()) => 2 * HEADER_LEN + package_frame.len() + job.args.len(),
            // The pipe was closed before this job reached the worker.
            Err(e) if e.written == 0 => return Outcome::NotStarted,
            // The worker may still have answered: ppft's worker answers a
            // package it cannot load and exits before reading the args.
            Err(e) => e.written,
        };
        cache.insert(job.package.hash);
        match self.stdout.read_frame().await {
            Ok(Some(result)) => {
                self.exiting = result.len() <= FATAL_SCAN_LIMIT
                    && result
                        .windows(FATAL_MARKER.len())
                        .any(|w| w == FATAL_MARKER);
                Outcome::Answered(result)
            }
            // A worker killed while idle can take a job in the moment
            // before its pipes close; if it never read a byte of it, the
            // job did not start and must not be answered as if it crashed.
            Ok(None) if unread_bytes(&self.stdin) >= written => Outcome::NotStarted,
            Ok(None) => Outcome::Died { refused: None },
            Err(e) => Outcome::Died {
                refused: Some(e.to_string()),
            },
        }
    }

    /// Ends the worker and reaps it; says how it ended. A worker whose
    /// stdout already closed gets a moment to exit by itself, so the exit
    /// code or signal reported is its own, not ours.
    async fn stop(mut self, graceful: bool) -> String {
        drop(self.stdin);
        if graceful {
            if let Ok(Ok(status)) = tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
                return describe(status);
            }
        }
        let _ = self.child.start_kill();
        match self.child.wait().await {
            Ok(status) => describe(status),
            Err(e) => format!("could not be reaped: {e}"),
        }
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
fn unread_bytes(pipe: &ChildStdin) -> usize {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    let rc = unsafe { nix::libc::ioctl(pipe.as_raw_fd(), nix::libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
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
async fn drain_stderr(pid: u32, mut stderr: tokio::process::ChildStderr) {
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

/// Everything a slot's supervisor shares with the rest of the server.
#[derive(Debug, Clone)]
pub struct PoolContext {
    /// How to start workers.
    pub spec: Arc<WorkerSpec>,
    /// Where jobs come from.
    pub scheduler: Arc<Scheduler>,
    /// Where job times go.
    pub stats: Arc<Stats>,
    /// Becomes true when the server stops.
    pub shutdown: watch::Receiver<bool>,
}

/// Keeps pool slot `slot` filled with a live worker and feeds it jobs until
/// shutdown, then stops the worker and reaps it.
pub async fn supervise(slot: usize, mut ctx: PoolContext) {
    let mut backoff = BACKOFF_START;
    // Failed starts in a row.
    let mut failures = 0;
    loop {
        let spawned = tokio::select! {
            w = Worker::spawn(&ctx.spec) => w,
            _ = ctx.shutdown.wait_for(|&s| s) => return,
        };
        let mut worker = match spawned {
            Ok(w) => {
                backoff = BACKOFF_START;
                failures = 0;
                log::debug!("slot {slot}: worker pid {} ready", w.pid);
                w
            }
            Err(e) => {
                log::error!(
                    "slot {slot}: cannot start worker {} -u -m {}: {e}; retrying in {backoff:?}",
                    ctx.spec.python.display(),
                    ctx.spec.module
                );
                failures += 1;
                if failures >= FAILED_STARTS_BEFORE_GIVING_UP {
                    let text = format!(
                        "ppserver: no worker process could be started ({} -u -m {}: {e}); \
                         the job was not run\n",
                        ctx.spec.python.display(),
                        ctx.spec.module
                    );
                    let answered = ctx
                        .scheduler
                        .fail_queued_if_no_workers(&crate::pickle::none_with_text(&text));
                    if answered > 0 {
                        log::error!(
                            "{answered} queued jobs answered with an error: no worker is running"
                        );
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = ctx.shutdown.wait_for(|&s| s) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let ended = serve(slot, &mut worker, &mut ctx).await;
        match ended {
            Ended::Shutdown => {
                worker.stop(false).await;
                return;
            }
            Ended::Replace => {
                let pid = worker.pid;
                let how = worker.stop(true).await;
                log::debug!("slot {slot}: worker pid {pid} replaced ({how})");
            }
            Ended::Died { job, refused } => {
                let pid = worker.pid;
                let how = match refused {
                    // The worker is alive but out of step: stop it now.
                    Some(reason) => {
                        worker.stop(false).await;
                        format!("its answer was refused: {reason}")
                    }
                    None => worker.stop(true).await,
                };
                match job {
                    Some(job) => answer_died(job, pid, &how),
                    None => log::warn!(
                        "slot {slot}: idle worker pid {pid} died ({how}); starting a new one"
                    ),
                }
            }
            Ended::NotStarted { job } => {
                let pid = worker.pid;
                let how = worker.stop(true).await;
                log::warn!(
                    "slot {slot}: worker pid {pid} was gone ({how}) before job {} started",
                    job.id
                );
                if let Some(job) = retry_or_answer(job, pid, &how) {
                    ctx.scheduler.requeue_front(job);
                }
            }
        }
    }
}

/// Why [`serve`] stopped using a worker.
enum Ended {
    /// The server is stopping.
    Shutdown,
    /// `-r`, or the worker said it is exiting: replace it.
    Replace,
    /// The worker died, while running `job` if there is one.
    Died {
        job: Option<Job>,
        refused: Option<String>,
    },
    /// The worker was dead before it could start `job`.
    NotStarted { job: Job },
}

/// Feeds jobs to one live worker until it must be replaced.
async fn serve(slot: usize, worker: &mut Worker, ctx: &mut PoolContext) -> Ended {
    // The worker counts as live for exactly as long as it is served.
    let _live = ctx.scheduler.worker_up();
    let mut cache = WorkerCache::default();
    loop {
        let (job, back) = match ctx.scheduler.next_job(slot, cache) {
            Ok(got) => got,
            Err(mut waiting) => {
                tokio::select! {
                    got = waiting.job() => match got {
                        Some(got) => got,
                        None => return Ended::Shutdown,
                    },
                    said = worker.stdout.read_frame() => {
                        // An idle worker has nothing to say: it died, or
                        // broke the protocol; either way it is replaced.
                        if let Ok(Some(_)) = said {
                            log::warn!("slot {slot}: worker pid {} wrote while idle; replacing it", worker.pid);
                        }
                        if let Some(job) = waiting.withdraw() {
                            ctx.scheduler.requeue_front(job);
                        }
                        return Ended::Died { job: None, refused: None };
                    }
                    _ = ctx.shutdown.wait_for(|&s| s) => {
                        // A job handed over at this very moment is dropped;
                        // its session closes, as for every in-flight job.
                        drop(waiting.withdraw());
                        return Ended::Shutdown;
                    }
                }
            }
        };
        cache = back;
        let started = Instant::now();
        let _running = ctx.stats.running();
        let outcome = tokio::select! {
            o = worker.run(&mut cache, &job) => o,
            _ = ctx.shutdown.wait_for(|&s| s) => return Ended::Shutdown,
        };
        match outcome {
            Outcome::Answered(result) => {
                ctx.stats.record_job(started.elapsed());
                if job.reply.send(result).is_err() {
                    log::debug!("job {}: client gone, result discarded", job.id);
                }
                if ctx.spec.restart || worker.exiting {
                    return Ended::Replace;
                }
            }
            Outcome::Died { refused } => {
                ctx.stats.record_job(started.elapsed());
                return Ended::Died {
                    job: Some(job),
                    refused,
                };
            }
            Outcome::NotStarted => return Ended::NotStarted { job },
        }
    }
}

/// Tells the client its job's worker died.
fn answer_died(job: Job, pid: u32, how: &str) {
    log::warn!(
        "job {}: worker pid {pid} died while running it ({how}); the job is not retried",
        job.id
    );
    let text = format!(
        "ppserver: the worker process (pid {pid}) running this job died ({how}); \
         the job was not retried\n"
    );
    let _ = job.reply.send(crate::pickle::none_with_text(&text));
}

/// A job that never reached a live worker goes back to the queue, unless
/// that has happened too often (workers that die at once, every time).
fn retry_or_answer(mut job: Job, pid: u32, how: &str) -> Option<Job> {
    job.attempts += 1;
    if job.attempts < MAX_START_ATTEMPTS {
        return Some(job);
    }
    let text = format!(
        "ppserver: the job could not be started: {} workers in a row died before \
         receiving it (last: pid {pid}, {how})\n",
        MAX_START_ATTEMPTS
    );
    let _ = job.reply.send(crate::pickle::none_with_text(&text));
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pythonpath_keeps_inherited_entries_first_and_adds_cwd_once() {
        let cwd = Path::new("/srv/app");
        assert_eq!(worker_pythonpath(None, cwd), OsString::from("/srv/app"));
        assert_eq!(
            worker_pythonpath(Some(OsStr::new("/a:/b")), cwd),
            OsString::from("/a:/b:/srv/app")
        );
        assert_eq!(
            worker_pythonpath(Some(OsStr::new("/srv/app:/a")), cwd),
            OsString::from("/srv/app:/a")
        );
        assert_eq!(
            worker_pythonpath(Some(OsStr::new("")), cwd),
            OsString::from("/srv/app")
        );
    }

    #[test]
    fn exit_statuses_are_described() {
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(
            describe(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
    }
}
