//! The process's outputs: log lines on stderr and the SIGUSR1 statistics
//! table on stdout, each written by its own thread so the server never
//! waits on them.
//!
//! Launchers (pathos, ssh loops, batch scripts) often leave the server's
//! stderr and stdout on a pipe that nobody reads any more, or close its
//! read end. A blocking write there, once the pipe buffer (64 KiB) is full,
//! would stop the single runtime thread and every client with it. So a
//! line is only queued here, in a bounded queue, never blocking the caller;
//! the output's writer thread does the blocking writes and is the only one
//! that can get stuck. Lines that find the queue full, or whose write fails
//! (EPIPE: Rust's runtime ignores SIGPIPE), are dropped and counted; once
//! writing works again, a notice in their place says how many. At exit,
//! [`flush_outputs`] gives the writers a bounded time to finish, so the last
//! lines reach a reader and an unread pipe cannot hold the exit up.
//!
//! The descriptors are never made non-blocking: they are open file
//! descriptions shared with the launcher, which would see EAGAIN too. (If
//! someone else made them non-blocking, the writer waits and retries.)

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;

use crate::logging::format::LogFormat;

/// Bytes of text an output may hold back while its writer is stuck: a few
/// thousand log lines. Beyond that, lines are dropped and counted rather
/// than held in memory.
pub const QUEUE_BYTES: usize = 256 * 1024;

/// Pause before retrying a write to a descriptor someone else made
/// non-blocking (EAGAIN), so the writer waits without spinning.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The server's stderr: log lines.
static STDERR: OnceLock<Sink> = OnceLock::new();
/// The server's stdout: the SIGUSR1 statistics table.
static STDOUT: OnceLock<Sink> = OnceLock::new();

/// What an output is called in its drop notices.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// The descriptor's name: "stderr".
    pub name: &'static str,
    /// What one `send` is, singular and plural: ("log line", "log lines").
    pub unit: (&'static str, &'static str),
}

impl Output {
    /// Log lines on stderr.
    pub const STDERR: Output = Output {
        name: "stderr",
        unit: ("log line", "log lines"),
    };
    /// Statistics tables on stdout.
    pub const STDOUT: Output = Output {
        name: "stdout",
        unit: ("statistics table", "statistics tables"),
    };

    fn count(&self, n: u64) -> String {
        let unit = if n == 1 { self.unit.0 } else { self.unit.1 };
        format!("{n} {unit}")
    }
}

/// Turns a notice's message into the line written (without its newline),
/// e.g. as a WARNING record in the `-f` log format.
pub type NoticeFormat = Box<dyn Fn(&str) -> String + Send>;

/// A notice as a plain line: `ppserver: 3 statistics tables dropped: ...`.
pub fn plain_notice() -> NoticeFormat {
    Box::new(|message| format!("ppserver: {message}"))
}

/// A notice as a WARNING record in the log format.
pub fn log_notice(format: LogFormat) -> NoticeFormat {
    Box::new(move |message| {
        let mut line = String::with_capacity(128);
        format.render(
            &mut line,
            log::Level::Warn,
            &format_args!("{message}"),
            SystemTime::now(),
        );
        line
    })
}

/// One thing waiting for the writer.
enum Item {
    /// Text to write, newline included.
    Text(String),
    /// This many sends were dropped here because the queue was full.
    Dropped(u64),
}

#[derive(Default)]
struct Queue {
    /// Waiting for the writer, in order.
    items: VecDeque<Item>,
    /// Bytes of text in `items`, held to the sink's cap.
    bytes: usize,
    /// The writer has taken items out and not finished writing them: a
    /// flush must wait for those too.
    busy: bool,
    /// The `Sink` is gone: the writer ends once nothing is left.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer: items arrived, or the sink closed.
    work: Condvar,
    /// Wakes `flush_for`: the writer has written everything it had.
    idle: Condvar,
    /// Sends that never reached the output, for `dropped()`.
    dropped: AtomicU64,
    /// `QUEUE_BYTES`, smaller in tests.
    cap: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One output (a descriptor) with its queue and writer thread. `send` never
/// blocks; only the writer thread waits on the descriptor.
pub struct Sink {
    shared: Arc<Shared>,
}

impl Sink {
    /// Starts the writer thread for `target` (any descriptor: stderr, a
    /// pipe's write end), queueing at most `cap` bytes of text.
    pub fn spawn(
        target: impl AsFd + Send + 'static,
        output: Output,
        notice: NoticeFormat,
        cap: usize,
    ) -> Sink {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            dropped: AtomicU64::new(0),
            cap,
        });
        let writer = Writer {
            shared: shared.clone(),
            output,
            notice,
            failed: None,
            mid_line: false,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("{}-writer", output.name))
            .spawn(move || writer.run(target));
        if let Err(e) = spawned {
            // Without a writer, sends fill the queue and are then dropped
            // and counted: the server still serves, it just says nothing.
            eprintln!(
                "ppserver: cannot start the {} writer thread: {e}",
                output.name
            );
        }
        Sink { shared }
    }

    /// Queues `text` and a newline for the output, or drops and counts it
    /// if the queue is full. Never blocks on the output.
    pub fn send(&self, text: String) {
        let q = self.shared.lock();
        self.queue_locked(q, text);
    }

    /// Queues `text` under the held lock `q`, or drops and counts it;
    /// whether it was queued.
    fn queue_locked(&self, mut q: MutexGuard<'_, Queue>, mut text: String) -> bool {
        text.push('\n');
        if q.bytes + text.len() > self.shared.cap && !q.items.is_empty() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            match q.items.back_mut() {
                Some(Item::Dropped(n)) => *n += 1,
                _ => q.items.push_back(Item::Dropped(1)),
            }
            return false;
        }
        q.bytes += text.len();
        q.items.push_back(Item::Text(text));
        drop(q);
        self.shared.work.notify_one();
        true
    }

    /// [`Sink::send`] for a caller that may be interrupting this very sink
    /// (a panic hook): if the queue's lock is held, even by this thread,
    /// the text is dropped and counted instead of waited for. Returns
    /// whether it was queued.
    pub fn try_send(&self, text: String) -> bool {
        let q = match self.shared.queue.try_lock() {
            Ok(q) => q,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        self.queue_locked(q, text)
    }

    /// How many sends never reached the output (queue full or write failed).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything sent so far has been written (or dropped), at
    /// most `timeout`; true if it was. An output nobody reads makes this
    /// return false after `timeout`, never hang.
    pub fn flush_for(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.lock();
        while !q.items.is_empty() || q.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = match self.shared.idle.wait_timeout(q, left) {
                Ok((q, _)) => q,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

impl Drop for Sink {
    /// Lets the writer end once it has written what is queued (the process's
    /// own sinks are never dropped).
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_one();
    }
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    output: Output,
    notice: NoticeFormat,
    /// Sends lost by failed writes (or whose notice was), and why the last
    /// write failed: said before the next text that gets out.
    failed: Option<(u64, std::io::Error)>,
    /// A failed write left a line half written: start on a new line.
    mid_line: bool,
}

impl Writer {
    fn run(mut self, target: impl AsFd) {
        let mut buf = Vec::new();
        let mut pieces: Vec<Piece> = Vec::new();
        loop {
            let items = {
                let mut q = self.shared.lock();
                q.busy = false;
                while q.items.is_empty() {
                    self.shared.idle.notify_all();
                    if q.closed {
                        return;
                    }
                    q = self.shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.busy = true;
                q.bytes = 0;
                std::mem::take(&mut q.items)
            };
            buf.clear();
            pieces.clear();
            if self.mid_line {
                buf.push(b'\n');
            }
            if let Some((n, e)) = self.failed.take() {
                let why = format!("writing to {} failed ({e})", self.output.name);
                self.push_notice(&mut buf, n, &why);
                pieces.push(Piece::notice(buf.len(), n));
            }
            for item in items {
                match item {
                    Item::Text(text) => {
                        buf.extend_from_slice(text.as_bytes());
                        pieces.push(Piece::text(buf.len()));
                    }
                    Item::Dropped(n) => {
                        let why = format!("{} was not being read fast enough", self.output.name);
                        self.push_notice(&mut buf, n, &why);
                        pieces.push(Piece::notice(buf.len(), n));
                    }
                }
            }
            match write_all(&target, &buf) {
                Ok(()) => self.mid_line = false,
                Err((written, e)) => {
                    let lost = || pieces.iter().filter(|p| p.end > written);
                    let texts = lost().filter(|p| p.text).count() as u64;
                    self.shared.dropped.fetch_add(texts, Ordering::Relaxed);
                    self.failed = Some((lost().map(|p| p.sends).sum(), e));
                    if written > 0 {
                        self.mid_line = buf[written - 1] != b'\n';
                    }
                }
            }
        }
    }

    fn push_notice(&self, buf: &mut Vec<u8>, n: u64, why: &str) {
        let message = format!("{} dropped: {why}", self.output.count(n));
        buf.extend_from_slice((self.notice)(&message).as_bytes());
        buf.push(b'\n');
    }
}

/// A line in the writer's buffer, to count what a failed write lost.
struct Piece {
    /// Offset in the buffer just past it.
    end: usize,
    /// Sends it stands for: 1 for a text, the count for a notice.
    sends: u64,
    /// A text (not yet counted as dropped), not a notice (whose sends were).
    text: bool,
}

impl Piece {
    fn text(end: usize) -> Piece {
        Piece {
            end,
            sends: 1,
            text: true,
        }
    }

    fn notice(end: usize, sends: u64) -> Piece {
        Piece {
            end,
            sends,
            text: false,
        }
    }
}

/// Writes all of `buf`, blocking; on failure, how much got out and why.
fn write_all(target: &impl AsFd, buf: &[u8]) -> Result<(), (usize, std::io::Error)> {
    let mut written = 0;
    while written < buf.len() {
        match nix::unistd::write(target.as_fd(), &buf[written..]) {
            Ok(0) => return Err((written, std::io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => std::thread::sleep(RETRY_PAUSE),
            Err(e) => return Err((written, e.into())),
        }
    }
    Ok(())
}

/// The server's stderr, for log lines (its writer starts on first use).
pub fn stderr() -> &'static Sink {
    STDERR.get_or_init(|| {
        Sink::spawn(
            std::io::stderr(),
            Output::STDERR,
            plain_notice(),
            QUEUE_BYTES,
        )
    })
}

/// The server's stdout, for the SIGUSR1 statistics table.
pub fn stdout() -> &'static Sink {
    STDOUT.get_or_init(|| {
        Sink::spawn(
            std::io::stdout(),
            Output::STDOUT,
            plain_notice(),
            QUEUE_BYTES,
        )
    })
}

/// At exit: waits, at most `timeout` in all, until what was sent to stderr
/// and stdout has been written, so the last lines still come out when
/// someone reads them, and a pipe nobody reads cannot hold up the exit.
pub fn flush_outputs(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for sink in [STDERR.get(), STDOUT.get()].into_iter().flatten() {
        sink.flush_for(deadline.saturating_duration_since(Instant::now()));
    }
}

/// The `log` logger: records at or above `level`, rendered in the `-f`
/// format, queued on stderr's sink.
pub struct Logger {
    /// Info by default, Debug with `-d`.
    level: log::LevelFilter,
    /// The `-f` format.
    format: LogFormat,
    /// Where the rendered lines go.
    sink: &'static Sink,
}

impl Logger {
    /// A logger for `level` and `format` writing to `sink`.
    pub fn new(level: log::LevelFilter, format: LogFormat, sink: &'static Sink) -> Logger {
        Logger {
            level,
            format,
            sink,
        }
    }

    /// Makes this the process's logger, on stderr (whose drop notices are
    /// then WARNING records in `format`), and starts stdout's writer too.
    pub fn install(level: log::LevelFilter, format: LogFormat) -> Result<(), log::SetLoggerError> {
        let notice = log_notice(format.clone());
        let sink = STDERR
            .get_or_init(|| Sink::spawn(std::io::stderr(), Output::STDERR, notice, QUEUE_BYTES));
        log::set_logger(Box::leak(Box::new(Logger::new(level, format, sink))))?;
        log::set_max_level(level);
        stdout();
        Ok(())
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = String::with_capacity(128);
        self.format
            .render(&mut line, record.level(), record.args(), SystemTime::now());
        self.sink.send(line);
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::sync::mpsc;

    const TEST_CAP: usize = 16 * 1024;
    const WAIT: Duration = Duration::from_secs(60);

    fn pipe_sink() -> (OwnedFd, Sink) {
        let (read, write) = nix::unistd::pipe().unwrap();
        (
            read,
            Sink::spawn(write, Output::STDERR, plain_notice(), TEST_CAP),
        )
    }

    /// Reads `read` on a thread; the chunks come back on the channel.
    fn drain(read: OwnedFd) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut file = std::fs::File::from(read);
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = file.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// Text from `rx` until it contains `want` (bounded by WAIT).
    fn read_until(rx: &mpsc::Receiver<Vec<u8>>, want: &str) -> String {
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains(want) {
            match rx.recv_timeout(WAIT) {
                Ok(chunk) => got.extend(chunk),
                Err(e) => {
                    let text = String::from_utf8_lossy(&got);
                    let tail = &text[text.len().saturating_sub(300)..];
                    panic!("{e} before {want:?}; {} bytes, ending {tail:?}", got.len());
                }
            }
        }
        String::from_utf8(got).unwrap()
    }

    /// The count in a notice line, if it is one.
    fn notice_count(line: &str) -> Option<u64> {
        let rest = line.strip_prefix("ppserver: ")?;
        let (n, rest) = rest.split_once(' ')?;
        rest.contains("dropped: stderr was not being read fast enough")
            .then(|| n.parse().unwrap())
    }

    #[test]
    fn unread_pipe_drops_lines_and_says_so_once_read() {
        let (read, sink) = pipe_sink();
        const SENT: u64 = 100_000;
        for i in 0..SENT {
            sink.send(format!("line {i:06} of the unread pipe test"));
        }
        // All sends returned although nobody reads: the test got here.
        assert!(sink.dropped() > 0, "nothing dropped");

        let rx = drain(read);
        assert!(sink.flush_for(WAIT), "not flushed once the pipe is read");
        let dropped = sink.dropped();
        sink.send("later line".into());
        assert!(sink.flush_for(WAIT));
        let text = read_until(&rx, "later line\n");
        let lines: Vec<&str> = text.lines().collect();
        let notices: Vec<u64> = lines.iter().filter_map(|l| notice_count(l)).collect();
        assert_eq!(
            notices.iter().sum::<u64>(),
            dropped,
            "notices say every drop"
        );
        let written = lines.iter().filter(|l| l.starts_with("line ")).count() as u64;
        assert_eq!(written + dropped, SENT, "every line written or counted");
        let before = lines[lines.len() - 2];
        assert!(
            notice_count(before).is_some(),
            "no notice before the later line: {before:?}"
        );
        assert_eq!(lines.last(), Some(&"later line"));
        assert_eq!(sink.dropped(), dropped, "nothing dropped once read");
    }

    #[test]
    fn try_send_drops_instead_of_waiting_for_its_own_lock() {
        let (_read, sink) = pipe_sink();
        let held = sink.shared.lock();
        assert!(!sink.try_send("from a panic hook".into()));
        drop(held);
        assert_eq!(sink.dropped(), 1);
        assert!(sink.try_send("once free".into()));
    }

    #[test]
    fn closed_pipe_counts_drops_without_panicking() {
        let (read, sink) = pipe_sink();
        drop(read);
        for i in 0..1000 {
            sink.send(format!("line {i} to a closed pipe"));
        }
        assert!(sink.flush_for(WAIT), "writer stuck on a closed pipe");
        assert_eq!(sink.dropped(), 1000);
    }

    #[test]
    fn lines_are_written_in_order_when_read() {
        let (read, sink) = pipe_sink();
        let rx = drain(read);
        for i in 0..200 {
            sink.send(format!("line {i}"));
        }
        assert!(sink.flush_for(WAIT));
        let text = read_until(&rx, "line 199\n");
        let want: String = (0..200).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, want);
        assert_eq!(sink.dropped(), 0);
    }

    #[test]
    fn logger_renders_records_in_the_log_format() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let format = LogFormat::parse("%(levelname)s|%(message)s").unwrap();
        let sink: &'static Sink = Box::leak(Box::new(Sink::spawn(
            write,
            Output::STDERR,
            log_notice(format.clone()),
            TEST_CAP,
        )));
        let logger = Logger::new(log::LevelFilter::Info, format, sink);
        let rx = drain(read);
        for (level, message) in [
            (log::Level::Debug, "hidden"),
            (log::Level::Info, "shown"),
            (log::Level::Warn, "warned"),
        ] {
            log::Log::log(
                &logger,
                &log::Record::builder()
                    .level(level)
                    .args(format_args!("{message}"))
                    .build(),
            );
        }
        assert!(sink.flush_for(WAIT));
        assert_eq!(read_until(&rx, "warned\n"), "INFO|shown\nWARNING|warned\n");
    }

    #[test]
    fn notices_say_singular_and_plural() {
        assert_eq!(Output::STDERR.count(1), "1 log line");
        assert_eq!(Output::STDOUT.count(2), "2 statistics tables");
    }
}
