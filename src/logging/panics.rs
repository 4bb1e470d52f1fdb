//! Panic messages through the log's stderr sink instead of straight to
//! stderr.
//!
//! Rust's default panic hook writes to stderr with a blocking write. When
//! a launcher left stderr on a pipe nobody reads, that write would stop
//! the thread that panicked, the runtime's only one, and every client
//! with it: the very thing [`crate::logging::sink`] exists to prevent. So
//! the server's hook queues the message like a log line, and drops it
//! (counted, as any line that does not fit) when the queue is full or
//! locked by the thread that is panicking. The message keeps the default
//! hook's shape: `thread 'NAME' panicked at FILE:LINE:COL:` then the
//! message, and the backtrace when `RUST_BACKTRACE` asks for one.

use std::backtrace::{Backtrace, BacktraceStatus};
use std::panic::PanicHookInfo;

use crate::logging::sink::{self, Sink};

/// Sends every panic's message to the server's stderr sink from now on.
pub fn install() {
    hook_into(sink::stderr());
}

/// Sends every panic's message to `sink` from now on.
fn hook_into(sink: &'static Sink) {
    std::panic::set_hook(Box::new(move |info| {
        sink.try_send(describe(info));
    }));
}

/// The default hook's text for `info`.
fn describe(info: &PanicHookInfo<'_>) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let message = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("Box<dyn Any>");
    let mut text = match info.location() {
        Some(at) => format!("thread '{name}' panicked at {at}:\n{message}"),
        None => format!("thread '{name}' panicked:\n{message}"),
    };
    let trace = Backtrace::capture();
    if trace.status() == BacktraceStatus::Captured {
        text.push_str(&format!("\nstack backtrace:\n{trace}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::sink::{plain_notice, Output};
    use std::io::Read;

    #[test]
    fn a_panic_is_told_through_the_sink_and_never_waits_on_it() {
        let (read, write) = nix::unistd::pipe().unwrap();
        // A tiny queue on a pipe nobody reads yet: the writer thread is
        // stuck once the pipe is full, as under a launcher that went away.
        let sink: &'static Sink = Box::leak(Box::new(Sink::spawn(
            write,
            Output::STDERR,
            plain_notice(),
            4096,
        )));
        let previous = std::panic::take_hook();
        hook_into(sink);
        let first = std::panic::catch_unwind(|| panic!("the first bug"));
        // Far more than the pipe and the queue hold: each panic returns.
        for _ in 0..2000 {
            let _ = std::panic::catch_unwind(|| panic!("{}", "x".repeat(1000)));
        }
        std::panic::set_hook(previous);
        assert!(first.is_err());
        assert!(sink.dropped() > 0, "lines that did not fit were dropped");
        let mut file = std::fs::File::from(read);
        let mut buf = vec![0; 4096];
        let n = file.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.contains("panicked at src/logging/panics.rs:") && text.contains("the first bug"),
            "{text}"
        );
    }
}
